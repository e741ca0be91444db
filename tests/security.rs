//! The publisher and privilege boundaries of docs/security.md, each proven
//! against real Postgres (and, for the relay, real Kafka) as the login roles
//! services would use: who may publish what, what each group role may touch,
//! and what the relay does with a row that bypassed the trigger.

mod common;

use std::time::Duration;

use common::*;
use outbox_relay::catalog::Catalog;
use outbox_relay::sql;
use serde_json::{json, Value};
use sqlx::postgres::PgDatabaseError;
use sqlx::{Connection, PgConnection};

const FORBIDDEN: &str = "42501";

/// Runs `sql` and returns its SQLSTATE and message (panics if it succeeds).
async fn refused(pool: &sqlx::PgPool, sql: &str) -> (String, String) {
    let err = sqlx::query(sql)
        .execute(pool)
        .await
        .expect_err(&format!("`{sql}` must be refused"));
    db_error(&err)
}

async fn insert_as(
    pool: &sqlx::PgPool,
    event_type: &str,
    payload: Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO outbox (event_type, payload) VALUES ($1, $2)")
        .bind(event_type)
        .bind(payload)
        .execute(pool)
        .await
        .map(|_| ())
}

/// (type, publisher) of every row in the outbox, read as the superuser.
async fn outbox_rows(env: &TestEnv) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT event_type, publisher FROM outbox ORDER BY id")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

fn denied(table: &str) -> (String, String) {
    (
        FORBIDDEN.to_string(),
        format!("permission denied for table {table}"),
    )
}

fn denied_function(function: &str) -> (String, String) {
    (
        FORBIDDEN.to_string(),
        format!("permission denied for function {function}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_can_insert_but_cannot_read_change_or_delete_any_event() {
    use outbox_relay::writer::{enqueue, enqueue_with, Options, WalletCredited};
    let env = TestEnv::new().await;
    let money = env.writer_role("money_svc", "money").await;
    let pool = env.pool_as(&money).await;

    // The writer library works with INSERT alone, its idempotent retry too.
    let event = WalletCredited {
        tx_id: "tx-1".into(),
        user_id: "user-1".into(),
        amount_cents: 100,
        currency: "USD".into(),
    };
    let mut tx = pool.begin().await.unwrap();
    let id = enqueue(&mut tx, &event).await.unwrap();
    let options = Options {
        event_id: Some(id.clone()),
        ..Default::default()
    };
    enqueue_with(&mut tx, &event, options).await.unwrap();
    tx.commit().await.unwrap();

    for sql in [
        "SELECT count(*) FROM outbox",
        "UPDATE outbox SET payload = '{}'",
        "DELETE FROM outbox",
        "TRUNCATE outbox",
        // RETURNING reads the row back.
        "INSERT INTO outbox (event_type, payload) VALUES ('money.wallet.credited', \
         '{\"txId\": \"t\", \"userId\": \"u\", \"amountCents\": 1, \"currency\": \"USD\"}') RETURNING event_id",
        // The publisher is stamped, never supplied.
        "INSERT INTO outbox (event_type, payload, publisher) VALUES ('money.wallet.credited', \
         '{\"txId\": \"t\", \"userId\": \"u\", \"amountCents\": 1, \"currency\": \"USD\"}', 'money')",
        // The ordering id cannot be chosen to jump the queue.
        "INSERT INTO outbox (id, event_type, payload) OVERRIDING SYSTEM VALUE VALUES (1, 'money.wallet.credited', \
         '{\"txId\": \"t\", \"userId\": \"u\", \"amountCents\": 1, \"currency\": \"USD\"}')",
    ] {
        assert_eq!(refused(&pool, sql).await, denied("outbox"), "{sql}");
    }
    assert_eq!(
        refused(&pool, "SELECT * FROM outbox_dlq").await,
        denied("outbox_dlq")
    );
    assert_eq!(
        refused(&pool, "SELECT * FROM processed_event_ids").await,
        denied("processed_event_ids")
    );
    assert_eq!(
        refused(
            &pool,
            "INSERT INTO outbox_publisher_roles (role_name, publisher) VALUES (current_user, 'iam')"
        )
        .await,
        denied("outbox_publisher_roles")
    );

    assert_eq!(
        outbox_rows(&env).await,
        vec![("money.wallet.credited".into(), Some("money".into()))],
        "exactly the one event, stamped with the role's publisher"
    );
    pool.close().await;
    env.drop_role(&money).await;
}

/// A catalog with one module publisher and one module event beside the kernel's.
async fn with_module_catalog(env: &TestEnv) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("crm.toml"),
        r#"format = 1
version = "1"
[publishers."@acme/crm"]
name = "CRM"
kind = "module"
[[events]]
type = "crm.contact.created"
publisher = "@acme/crm"
schema_version = "1.0.0"
partition_key = "contactId"
[events.payload]
contactId = "string"
"#,
    )
    .unwrap();
    let catalog = Catalog::load(&[catalog_dir(), dir.path().to_path_buf()]).unwrap();
    sql::sync_catalog(&env.pool, &catalog).await.unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_role_can_never_publish_a_kernel_event() {
    let env = TestEnv::new().await;
    let _catalog = with_module_catalog(&env).await;
    let crm = env.writer_role("crm_module", "@acme/crm").await;
    let pool = env.pool_as(&crm).await;

    for event_type in ["auth.user.created", "money.wallet.credited"] {
        let err = insert_as(&pool, event_type, example_payload(event_type))
            .await
            .unwrap_err();
        assert_eq!(
            db_error(&err),
            (
                FORBIDDEN.to_string(),
                format!(
                    "403 Forbidden: role {crm} (publisher @acme/crm) may not publish {event_type}"
                )
            )
        );
    }
    // Its own event is fine.
    insert_as(&pool, "crm.contact.created", json!({"contactId": "c-1"}))
        .await
        .unwrap();
    assert_eq!(
        outbox_rows(&env).await,
        vec![("crm.contact.created".into(), Some("@acme/crm".into()))],
        "nothing of the refused inserts is left to reach Kafka"
    );
    pool.close().await;
    env.drop_role(&crm).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iam_cannot_publish_money_events_and_unknown_types_and_unmapped_roles_are_refused() {
    let env = TestEnv::new().await;
    let iam = env.writer_role("iam_svc", "iam").await;
    let nobody = env.login_role("unmapped_svc", &["outbox_writer"]).await;
    let pool = env.pool_as(&iam).await;

    let err = insert_as(
        &pool,
        "money.wallet.credited",
        example_payload("money.wallet.credited"),
    )
    .await
    .unwrap_err();
    assert_eq!(
        db_error(&err),
        (
            FORBIDDEN.to_string(),
            format!(
                "403 Forbidden: role {iam} (publisher iam) may not publish money.wallet.credited"
            )
        )
    );
    let pg = err
        .as_database_error()
        .unwrap()
        .downcast_ref::<PgDatabaseError>();
    assert_eq!(
        pg.detail(),
        Some("The catalog allows only publisher money to publish money.wallet.credited.")
    );

    let err = insert_as(&pool, "money.wallet.refunded", json!({"userId": "u"}))
        .await
        .unwrap_err();
    assert_eq!(
        db_error(&err),
        (
            "22023".to_string(),
            "unknown event type money.wallet.refunded: not in the event catalog".to_string()
        )
    );

    let unmapped = env.pool_as(&nobody).await;
    let err = insert_as(
        &unmapped,
        "auth.user.created",
        example_payload("auth.user.created"),
    )
    .await
    .unwrap_err();
    assert_eq!(
        db_error(&err),
        (
            FORBIDDEN.to_string(),
            format!(
                "403 Forbidden: role {nobody} has no publisher mapping and may not publish auth.user.created"
            )
        )
    );

    // The trigger runs with the writer's rights: temporary tables named like
    // the mapping or pg_class must not fool it.
    let mut conn = PgConnection::connect(&env.url_as(&iam)).await.unwrap();
    sqlx::raw_sql(
        "CREATE TEMP TABLE outbox_publisher_roles (role_name name, publisher text); \
         INSERT INTO outbox_publisher_roles VALUES (current_user, 'money')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let err = sqlx::query("INSERT INTO outbox (event_type, payload) VALUES ($1, $2)")
        .bind("money.wallet.credited")
        .bind(example_payload("money.wallet.credited"))
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        db_error(&err),
        (
            FORBIDDEN.to_string(),
            format!(
                "403 Forbidden: role {iam} (publisher iam) may not publish money.wallet.credited"
            )
        )
    );
    conn.close().await.unwrap();
    let mut conn = PgConnection::connect(&env.url_as(&nobody)).await.unwrap();
    sqlx::raw_sql(
        "CREATE TEMP TABLE pg_class (oid oid, relowner oid); \
         INSERT INTO pg_class SELECT 'outbox'::regclass, oid FROM pg_roles WHERE rolname = current_user",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let err = sqlx::query("INSERT INTO outbox (event_type, payload) VALUES ($1, $2)")
        .bind("money.wallet.credited")
        .bind(example_payload("money.wallet.credited"))
        .execute(&mut conn)
        .await
        .unwrap_err();
    assert_eq!(
        db_error(&err),
        (
            FORBIDDEN.to_string(),
            format!("403 Forbidden: role {nobody} has no publisher mapping and may not publish money.wallet.credited")
        )
    );
    conn.close().await.unwrap();

    // Its own event goes through; nothing else was written.
    insert_as(
        &pool,
        "auth.user.created",
        example_payload("auth.user.created"),
    )
    .await
    .unwrap();
    assert_eq!(
        outbox_rows(&env).await,
        vec![("auth.user.created".into(), Some("iam".into()))]
    );

    // A group role cannot be mapped: each of its members could act as it.
    let err = sqlx::query("SELECT outbox_map_publisher('outbox_writer', 'money')")
        .execute(&env.pool)
        .await
        .unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "22023");
    assert!(
        message.starts_with("role outbox_writer has members (") && message.contains(&iam),
        "{message}"
    );

    pool.close().await;
    unmapped.close().await;
    env.drop_role(&iam).await;
    env.drop_role(&nobody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_role_cannot_replay_discard_map_or_write_events() {
    let env = TestEnv::new().await;
    let relay = env.login_role("relay", &["outbox_relay"]).await;
    let admin = env.login_role("admin", &["outbox_admin"]).await;
    let consumer = env.login_role("consumer", &["outbox_consumer"]).await;
    let pool = env.pool_as(&relay).await;

    for (sql, function) in [
        ("SELECT outbox_dlq_replay()", "outbox_dlq_replay"),
        (
            "SELECT outbox_dlq_replay_event('01j9pa5mz70000000000000000')",
            "outbox_dlq_replay_event",
        ),
        (
            "SELECT outbox_dlq_discard('no reason', '01j9pa5mz70000000000000000')",
            "outbox_dlq_discard",
        ),
        (
            "SELECT outbox_map_publisher(current_user, 'money')",
            "outbox_map_publisher",
        ),
    ] {
        assert_eq!(
            refused(&pool, sql).await,
            denied_function(function),
            "{sql}"
        );
    }
    for sql in [
        "INSERT INTO outbox (event_type, payload) VALUES ('auth.role.changed', '{}')",
        "UPDATE outbox SET payload = '{}'",
        "UPDATE outbox SET publisher = 'money'",
    ] {
        assert_eq!(refused(&pool, sql).await, denied("outbox"), "{sql}");
    }
    assert_eq!(
        refused(&pool, "DELETE FROM outbox_publisher_roles").await,
        denied("outbox_publisher_roles")
    );
    // What it needs works.
    sqlx::query("UPDATE outbox SET attempts = attempts + 1, available_at = now() WHERE false")
        .execute(&pool)
        .await
        .unwrap();

    // The admin can replay (nothing to replay here: false, not an error).
    let admin_pool = env.pool_as(&admin).await;
    let replayed: bool =
        sqlx::query_scalar("SELECT outbox_dlq_replay_event('01j9pa5mz70000000000000000')")
            .fetch_one(&admin_pool)
            .await
            .unwrap();
    assert!(!replayed);
    assert_eq!(
        refused(
            &admin_pool,
            "INSERT INTO outbox (event_type, payload) VALUES ('auth.role.changed', '{}')"
        )
        .await,
        denied("outbox")
    );

    // The consumer role: the dedupe table and nothing else.
    let consumer_pool = env.pool_as(&consumer).await;
    sqlx::query("INSERT INTO processed_event_ids (consumer, event_id) VALUES ('c', 'e') ON CONFLICT DO NOTHING")
        .execute(&consumer_pool)
        .await
        .unwrap();
    assert_eq!(
        refused(&consumer_pool, "SELECT * FROM outbox").await,
        denied("outbox")
    );
    assert_eq!(
        refused(&consumer_pool, "DELETE FROM processed_event_ids").await,
        denied("processed_event_ids")
    );

    for p in [pool, admin_pool, consumer_pool] {
        p.close().await;
    }
    for r in [relay, admin, consumer] {
        env.drop_role(&r).await;
    }
}

/// A free local port for the relay's /metrics listener.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn scrape(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// Stops a relay process with SIGTERM; returns its stderr (JSON log lines).
fn stop(child: Spawned) -> String {
    let (status, stderr) = child.terminate();
    assert!(status.success(), "relay exit {status:?}: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_money_services_event_is_published_by_a_relay_running_as_a_login_role() {
    let env = TestEnv::new().await;
    let money = env.writer_role("money_svc", "money").await;
    let relay = env.login_role("relay", &["outbox_relay"]).await;
    let writer = env.pool_as(&money).await;
    insert_as(
        &writer,
        "money.wallet.credited",
        example_payload("money.wallet.credited"),
    )
    .await
    .unwrap();

    let relay_url = env.url_as(&relay);
    let child = env.spawn_process(&[
        ("DATABASE_URL", relay_url.as_str()),
        ("OUTBOX_RELAY_LOG__FORMAT", "json"),
    ]);
    let got = env
        .consume(
            &[env.topic("platform.money.events")],
            1,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].value["type"], "money.wallet.credited");
    assert_eq!(got[0].value["source"], "money");
    assert_eq!(
        got[0].value["data"],
        example_payload("money.wallet.credited")
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.outbox_count().await == 0
        })
        .await,
        "the relay role deleted the published row"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_relays")
                .fetch_one(&env.pool)
                .await
                .unwrap()
                == 1
        })
        .await,
        "the relay role records its heartbeat"
    );
    let stderr = stop(child);
    assert!(
        !stderr.contains("permission denied") && !stderr.contains("\"level\":\"ERROR\""),
        "{stderr}"
    );
    writer.close().await;
    env.drop_role(&money).await;
    env.drop_role(&relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_row_that_bypassed_the_trigger_is_dead_lettered_as_forbidden_publisher() {
    let env = TestEnv::new().await;
    let relay = env.login_role("relay", &["outbox_relay"]).await;

    // Only a superuser can skip triggers; such a row has whatever publisher
    // it was given, or none.
    let mut su = PgConnection::connect(&env.db_url).await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut su)
        .await
        .unwrap();
    let mut forged = Vec::new();
    for publisher in [Some("@acme/crm"), None] {
        let id: String = sqlx::query_scalar(
            "INSERT INTO outbox (event_type, payload, publisher) VALUES ('money.wallet.credited', $1, $2) \
             RETURNING event_id",
        )
        .bind(example_payload("money.wallet.credited"))
        .bind(publisher)
        .fetch_one(&mut su)
        .await
        .unwrap();
        forged.push(id);
    }
    su.close().await.unwrap();

    let port = free_port().to_string();
    let relay_url = env.url_as(&relay);
    let child = env.spawn_process(&[
        ("DATABASE_URL", relay_url.as_str()),
        ("OUTBOX_RELAY_LOG__FORMAT", "json"),
        ("OUTBOX_RELAY_HTTP__LISTEN", &format!("127.0.0.1:{port}")),
    ]);
    assert!(
        eventually(Duration::from_secs(30), || async {
            env.dlq_count().await == 2
        })
        .await,
        "both forged rows reach the DLQ"
    );
    let metrics = scrape(port.parse().unwrap()).await;
    let stderr = stop(child);

    let dead: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT event_id, reason, last_error, publisher FROM outbox_dlq ORDER BY outbox_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        dead,
        vec![
            (
                forged[0].clone(),
                "forbidden_publisher".to_string(),
                "403 Forbidden: publisher @acme/crm may not publish money.wallet.credited (the catalog allows only money)".to_string(),
                Some("@acme/crm".to_string())
            ),
            (
                forged[1].clone(),
                "forbidden_publisher".to_string(),
                "403 Forbidden: publisher (none: the row bypassed the publisher trigger) may not publish money.wallet.credited (the catalog allows only money)".to_string(),
                None
            ),
        ]
    );
    assert_eq!(env.outbox_count().await, 0);
    let source = &env.settings.relay.source;
    let line = format!(
        "outbox_events_dead_lettered_total{{source=\"{source}\",event_type=\"money.wallet.credited\",reason=\"forbidden_publisher\"}} 2"
    );
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    for id in &forged {
        let logged = stderr.lines().any(|l| {
            let Ok(v) = serde_json::from_str::<Value>(l) else {
                return false;
            };
            v["level"] == "ERROR"
                && v["event_id"] == id.as_str()
                && v["reason"] == "forbidden_publisher"
                && v["event_type"] == "money.wallet.credited"
        });
        assert!(logged, "error log for {id} in\n{stderr}");
    }
    let got = env
        .consume(
            &[env.topic("platform.money.events")],
            1,
            Duration::from_secs(3),
        )
        .await;
    assert!(got.is_empty(), "nothing reached Kafka: {got:?}");
    env.drop_role(&relay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_cannot_replay_forged_events_through_a_temporary_table() {
    let env = TestEnv::new().await;
    let admin = env.login_role("admin", &["outbox_admin"]).await;
    // One connection: a temporary table lives in its session.
    let mut conn = env.pool_as(&admin).await.acquire().await.unwrap().detach();
    sqlx::query(
        "CREATE TEMP TABLE outbox_dlq AS \
         SELECT '01j9pa5mz70000000000000000'::text AS event_id, 1::bigint AS outbox_id, \
                'money.wallet.credited'::text AS event_type, NULL::text AS tenant_id, \
                '{\"txId\": \"t\", \"userId\": \"u\", \"amountCents\": 1, \"currency\": \"USD\"}'::jsonb AS payload, \
                NULL::jsonb AS headers, now() AS occurred_at, 'money'::text AS publisher, \
                'dead'::text AS state, 'invalid_payload'::text AS reason, now() AS dead_lettered_at, \
                0 AS replay_count, NULL::timestamptz AS last_replayed_at",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let replayed: Vec<String> =
        sqlx::query_scalar("SELECT outbox_dlq_replay(p_reason => 'invalid_payload')")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert!(
        replayed.is_empty(),
        "the temp table was not read: {replayed:?}"
    );
    assert_eq!(
        env.outbox_count().await,
        0,
        "nothing forged reached the outbox"
    );
}
