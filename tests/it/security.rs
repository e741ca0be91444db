//! The publisher and privilege boundaries of docs/security.md, each proven
//! against real Postgres (and, for the relay, real Kafka) as the login roles
//! services would use: who may publish what, what each group role may touch,
//! and what the relay does with a row that bypassed the trigger.

use std::time::Duration;

use crate::common::*;
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

/// (type, publisher) of every row in the outbox, read as the admin role.
async fn outbox_rows(env: &TestEnv) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT event_type, publisher FROM outbox ORDER BY id")
        .fetch_all(env.admin())
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
        // The size a claim counts is measured, never supplied (a row
        // claiming to be small would slip past relay.max_batch_bytes).
        "INSERT INTO outbox (event_type, payload, payload_bytes) VALUES ('money.wallet.credited', \
         '{\"txId\": \"t\", \"userId\": \"u\", \"amountCents\": 1, \"currency\": \"USD\"}', 1)",
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
    sql::sync_catalog(env.admin(), &catalog).await.unwrap();
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
        .execute(env.admin())
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
    let (_, consumer_pool) = env.consumer_role("c").await;
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
    for r in [relay, admin] {
        env.drop_role(&r).await;
    }
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
                .fetch_one(env.admin())
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

    // Only a superuser can skip triggers (a fixture no deployed role can
    // make); such a row has whatever publisher it was given, or none.
    let mut su = PgConnection::connect(env.fixtures_url()).await.unwrap();
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
    .fetch_all(env.admin())
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

/// Hole: the trigger runs with the writer's rights, so before the functions'
/// search_path was pinned a writer owning a schema could put its own
/// operators and functions ahead of pg_catalog's and pass as another
/// publisher, or move its key to another virtual partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_search_path_can_neither_forge_a_publisher_nor_move_a_partition() {
    let env = TestEnv::new().await;
    let iam = env.writer_role("iam_svc", "iam").await;
    let nobody = env.login_role("unmapped_svc", &["outbox_writer"]).await;
    for role in [&iam, &nobody] {
        // A schema of its own, as a service may well have (fixture: only an
        // admin of the database creates schemas).
        sqlx::query(&format!("CREATE SCHEMA s_{role} AUTHORIZATION {role}"))
            .execute(env.fixtures())
            .await
            .unwrap();
    }
    // Everything the trigger and the partition function call, shadowed by
    // versions that let anything through or send every key elsewhere.
    let shadow = |schema: String| {
        format!(
            "CREATE FUNCTION {schema}.always(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true'; \
             CREATE OPERATOR {schema}.= (LEFTARG = text, RIGHTARG = text, FUNCTION = {schema}.always); \
             CREATE FUNCTION {schema}.pg_has_role(name, oid, text) RETURNS boolean LANGUAGE sql AS 'SELECT true'; \
             CREATE FUNCTION {schema}.current_setting(text) RETURNS text LANGUAGE sql AS 'SELECT ''on''::text'; \
             CREATE FUNCTION {schema}.hashtextextended(text, bigint) RETURNS bigint LANGUAGE sql AS 'SELECT 7::bigint'; \
             CREATE FUNCTION {schema}.jsonb_typeof(jsonb) RETURNS text LANGUAGE sql AS 'SELECT ''object''::text'; \
             SET search_path = {schema}, pg_catalog, public"
        )
    };
    let mut iam_conn = PgConnection::connect(&env.url_as(&iam)).await.unwrap();
    sqlx::raw_sql(&shadow(format!("s_{iam}")))
        .execute(&mut iam_conn)
        .await
        .unwrap();
    let mut nobody_conn = PgConnection::connect(&env.url_as(&nobody)).await.unwrap();
    sqlx::raw_sql(&shadow(format!("s_{nobody}")))
        .execute(&mut nobody_conn)
        .await
        .unwrap();

    let insert = "INSERT INTO outbox (event_type, payload) VALUES ($1, $2)";
    let money = example_payload("money.wallet.credited");
    let err = sqlx::query(insert)
        .bind("money.wallet.credited")
        .bind(&money)
        .execute(&mut iam_conn)
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, FORBIDDEN, "{err}");
    let err = sqlx::query(insert)
        .bind("money.wallet.credited")
        .bind(&money)
        .execute(&mut nobody_conn)
        .await
        .unwrap_err();
    assert_eq!(
        db_error(&err),
        (
            FORBIDDEN.to_string(),
            format!("403 Forbidden: role {nobody} has no publisher mapping and may not publish money.wallet.credited")
        )
    );
    let err = sqlx::query(insert)
        .bind("auth.user.created")
        .bind(json!(["not", "an", "object"]))
        .execute(&mut iam_conn)
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, "22023", "{err}");

    // Its own event lands in the partition a clean session computes.
    let payload = example_payload("auth.user.created");
    sqlx::query(insert)
        .bind("auth.user.created")
        .bind(&payload)
        .execute(&mut iam_conn)
        .await
        .unwrap();
    let (publisher, vpartition, expected): (String, i16, i16) = sqlx::query_as(
        "SELECT publisher, vpartition, outbox_vpartition(payload ->> 'userId', \
                (SELECT vpartitions FROM outbox_config)) FROM outbox",
    )
    .fetch_one(env.fixtures())
    .await
    .unwrap();
    assert_eq!(publisher, "iam");
    assert_eq!(vpartition, expected);
    assert_ne!(expected, 7, "the key must not hash like the shadow");
    assert_eq!(
        outbox_rows(&env).await,
        vec![("auth.user.created".into(), Some("iam".into()))]
    );

    // Every function of the outbox runs with a search_path of its own, but
    // the two on every insert's path that are safe without one (see 0007).
    let unpinned: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p \
          WHERE p.proname LIKE 'outbox%' AND p.pronamespace = 'public'::regnamespace \
            AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, public, pg_temp'], false) \
          ORDER BY 1",
    )
    .fetch_all(env.admin())
    .await
    .unwrap();
    assert_eq!(
        unpinned,
        vec!["outbox_ulid()", "outbox_vpartition(text,integer)"],
        "functions without a pinned search_path"
    );
    iam_conn.close().await.unwrap();
    nobody_conn.close().await.unwrap();
}

/// Hole: any consumer role could insert another consumer's dedupe row (the
/// money ledger would then skip a real credit) or read and rewrite its
/// parked events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_consumer_role_touches_only_its_own_dedupe_and_parked_rows() {
    let env = TestEnv::new().await;
    let (ledger_role, ledger) = env.consumer_role("money-ledger").await;
    let (crm_role, crm) = env.consumer_role("@acme/crm").await;
    let event = outbox_relay::writer::new_event_id();
    let mark = "INSERT INTO processed_event_ids (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";
    let park = "INSERT INTO consumer_parked_events \
                (consumer, event_id, event_type, topic, \"partition\", \"offset\", envelope, last_error, attempts) \
                VALUES ($1, $2, 'money.wallet.credited', 't', 0, 1, '{\"amountCents\": 1}', 'e', 1)";
    // Each does its own work.
    for (pool, name) in [(&ledger, "money-ledger"), (&crm, "@acme/crm")] {
        sqlx::query(mark)
            .bind(name)
            .bind("01aaaaaaaaaaaaaaaaaaaaaaaa")
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(park)
            .bind(name)
            .bind("01bbbbbbbbbbbbbbbbbbbbbbbb")
            .execute(pool)
            .await
            .unwrap();
    }

    // The hostile module cannot mark the ledger's event processed…
    let err = sqlx::query(mark)
        .bind("money-ledger")
        .bind(&event)
        .execute(&crm)
        .await
        .unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, FORBIDDEN);
    assert_eq!(
        message,
        "new row violates row-level security policy for table \"processed_event_ids\""
    );
    // …nor park in its name, nor see, rewrite or delete its rows.
    let err = sqlx::query(park)
        .bind("money-ledger")
        .bind(&event)
        .execute(&crm)
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, FORBIDDEN);
    let seen: Vec<String> = sqlx::query_scalar(
        "SELECT consumer FROM processed_event_ids UNION ALL SELECT consumer FROM consumer_parked_events",
    )
    .fetch_all(&crm)
    .await
    .unwrap();
    assert_eq!(seen, vec!["@acme/crm", "@acme/crm"]);
    let rewritten = sqlx::query(
        "UPDATE consumer_parked_events SET envelope = '{\"amountCents\": 0}', consumer = '@acme/crm' \
          WHERE consumer = 'money-ledger'",
    )
    .execute(&crm)
    .await
    .unwrap();
    assert_eq!(rewritten.rows_affected(), 0);
    assert_eq!(
        refused(&crm, "DELETE FROM processed_event_ids").await,
        denied("processed_event_ids")
    );
    // It cannot map itself to the ledger either.
    assert_eq!(
        refused(
            &crm,
            &format!("INSERT INTO outbox_consumer_roles (role_name, consumer) VALUES ('{crm_role}', 'money-ledger')")
        )
        .await,
        denied("outbox_consumer_roles")
    );
    assert_eq!(
        refused(
            &crm,
            &format!("SELECT outbox_map_consumer('{crm_role}', 'money-ledger')")
        )
        .await,
        denied_function("outbox_map_consumer")
    );
    let mappings: Vec<String> = sqlx::query_scalar("SELECT consumer FROM outbox_consumer_roles")
        .fetch_all(&crm)
        .await
        .unwrap();
    assert_eq!(mappings, vec!["@acme/crm"], "it sees its own mapping only");

    // The ledger's rows are exactly its own, untouched; the event is still new to it.
    let ledger_rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_id, consumer FROM processed_event_ids \
         UNION ALL SELECT envelope::text, consumer FROM consumer_parked_events ORDER BY 1",
    )
    .fetch_all(&ledger)
    .await
    .unwrap();
    assert_eq!(
        ledger_rows,
        vec![
            (
                "01aaaaaaaaaaaaaaaaaaaaaaaa".to_string(),
                "money-ledger".to_string()
            ),
            (
                "{\"amountCents\": 1}".to_string(),
                "money-ledger".to_string()
            ),
        ]
    );
    let fresh = sqlx::query(mark)
        .bind("money-ledger")
        .bind(&event)
        .execute(&ledger)
        .await
        .unwrap();
    assert_eq!(
        fresh.rows_affected(),
        1,
        "the ledger still handles the event"
    );

    // A group role cannot be mapped: every member could act as it.
    let err = sqlx::query("SELECT outbox_map_consumer('outbox_consumer', 'money-ledger')")
        .execute(env.admin())
        .await
        .unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, "22023");
    assert!(message.contains(&ledger_role), "{message}");
}

/// Hole: writers could read the whole role mapping, and the documented
/// idempotent insert needed a privilege writers do not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_see_only_their_own_mapping_and_retry_an_insert_without_reading() {
    let env = TestEnv::new().await;
    let money = env.writer("money").await;
    let _iam = env.writer("iam").await;
    let mapped: Vec<(String, String)> =
        sqlx::query_as("SELECT role_name::text, publisher FROM outbox_publisher_roles")
            .fetch_all(&money)
            .await
            .unwrap();
    assert_eq!(mapped.len(), 1, "{mapped:?}");
    assert_eq!(mapped[0].1, "money");
    assert_eq!(
        refused(&money, "SELECT * FROM outbox_consumer_roles").await,
        denied("outbox_consumer_roles")
    );

    // The idempotent retry the docs show: the writer supplies the id, and
    // `ON CONFLICT DO NOTHING` (no target) needs INSERT alone.
    let id = outbox_relay::writer::new_event_id();
    for _ in 0..3 {
        sqlx::query(
            "INSERT INTO outbox (event_id, event_type, payload) VALUES ($1, 'money.wallet.credited', $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&id)
        .bind(example_payload("money.wallet.credited"))
        .execute(&money)
        .await
        .unwrap();
    }
    let rows: Vec<String> = sqlx::query_scalar("SELECT event_id FROM outbox")
        .fetch_all(env.admin())
        .await
        .unwrap();
    assert_eq!(rows, vec![id.clone()]);
    // A conflict target needs SELECT, which writers do not get.
    let err = sqlx::query(
        "INSERT INTO outbox (event_id, event_type, payload) VALUES ($1, 'money.wallet.credited', $2) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&id)
    .bind(example_payload("money.wallet.credited"))
    .execute(&money)
    .await
    .unwrap_err();
    assert_eq!(db_error(&err), denied("outbox"));
}

/// Hole: the relay published what the consumer kit cannot decode, and a
/// payload that is not an object reached the DLQ instead of being refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_consumers_cannot_decode_are_refused_at_insert_or_dead_lettered_by_name() {
    let env = TestEnv::new().await;
    let iam = env.writer("iam").await;
    for (payload, kind) in [
        (json!([1, 2]), "array"),
        (json!("text"), "string"),
        (json!(7), "number"),
        (Value::Null, "null"),
    ] {
        let err = insert_as(&iam, "auth.user.created", payload)
            .await
            .unwrap_err();
        assert_eq!(
            db_error(&err),
            (
                "22023".to_string(),
                format!("payload of auth.user.created must be a JSON object, not a JSON {kind}")
            )
        );
    }

    // Valid jsonb, but not decodable without loss: deep nesting and numbers
    // beyond a double or a 64-bit integer. Written as text so PostgreSQL,
    // not serde_json, parses them.
    let user = "01j9pa5mz700000000000000";
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let bad = [
        (
            format!(r#"{{"userId": "{user}", "email": "a@b.c", "x": {deep}}}"#),
            "nests deeper than 64 levels",
        ),
        (
            format!(r#"{{"userId": "{user}", "email": "a@b.c", "x": 1e400}}"#),
            "beyond the range of a double",
        ),
        (
            format!(
                r#"{{"userId": "{user}", "email": "a@b.c", "x": 123456789012345678901234567890}}"#
            ),
            "would change when decoded",
        ),
    ];
    let mut ids = Vec::new();
    for (text, _) in &bad {
        let id = outbox_relay::writer::new_event_id();
        sqlx::query("INSERT INTO outbox (event_id, event_type, payload) VALUES ($1, 'auth.user.created', $2::jsonb)")
            .bind(&id)
            .bind(text)
            .execute(&iam)
            .await
            .unwrap();
        ids.push(id);
    }
    let good = env
        .insert("auth.user.created", example_payload("auth.user.created"))
        .await;

    let relay = env.relay().await;
    env.drain(&relay).await;
    let dead: Vec<(String, String, String)> =
        sqlx::query_as("SELECT event_id, reason, last_error FROM outbox_dlq ORDER BY outbox_id")
            .fetch_all(env.admin())
            .await
            .unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    for ((id, reason, error), (expected_id, (_, says))) in dead.iter().zip(ids.iter().zip(&bad)) {
        assert_eq!(id, expected_id);
        assert_eq!(reason, "invalid_payload");
        assert!(error.contains(says), "{error}");
    }
    let got = env
        .consume(
            &[env.topic("platform.auth.events")],
            2,
            Duration::from_secs(15),
        )
        .await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].value["id"], good.as_str());
    assert_eq!(env.outbox_count().await, 0);
}

/// The relay checks its own grants at start-up and names the one missing,
/// instead of failing at the first retry that needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_role_missing_a_grant_stops_at_start_up_naming_it() {
    let env = TestEnv::new().await;
    // Fixture: a database whose grants lag behind the binary, as before the
    // grant of unknown_failures was added.
    sqlx::query("REVOKE UPDATE (unknown_failures) ON outbox FROM outbox_relay")
        .execute(env.fixtures())
        .await
        .unwrap();
    let mut child = env.spawn_process(&[("OUTBOX_RELAY_LOG__FORMAT", "json")]);
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the relay kept running without the grant"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    let expected = format!(
        "role {} lacks privileges that outbox_relay holds: UPDATE (unknown_failures) ON outbox. \
         Make it a member (GRANT outbox_relay TO {0})",
        env.relay_role
    );
    assert!(stderr.contains(&expected), "{expected} in\n{stderr}");
}

/// The privilege matrix of src/privileges.rs is what the database grants —
/// no more (a widened role) and no less (a broken relay) — checked over
/// every table, column, view, sequence and function of the schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_privilege_matrix_is_exactly_what_each_group_holds() {
    use outbox_relay::privileges::{self, GROUPS};
    let env = TestEnv::new().await;
    let q = env.fixtures();
    let columns = schema_columns(q).await;
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT oid::regprocedure::text FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1",
    )
    .fetch_all(q)
    .await
    .unwrap();
    let sequences: Vec<String> = sqlx::query_scalar(
        "SELECT relname::text FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'S'",
    )
    .fetch_all(q)
    .await
    .unwrap();
    assert!(columns.len() > 60 && functions.len() > 15 && !sequences.is_empty());

    let mut wrong = Vec::new();
    let mut checked = 0;
    for group in GROUPS {
        for (table, _, column) in &columns {
            for privilege in ["SELECT", "INSERT", "UPDATE", "REFERENCES"] {
                let held: bool = sqlx::query_scalar("SELECT has_column_privilege($1, $2, $3, $4)")
                    .bind(group)
                    .bind(table)
                    .bind(column)
                    .bind(privilege)
                    .fetch_one(q)
                    .await
                    .unwrap();
                checked += 1;
                if held != privileges::allows_column(group, privilege, table, column) {
                    wrong.push(format!(
                        "{group}: {privilege} ({column}) ON {table}: held = {held}"
                    ));
                }
            }
        }
        let mut tables: Vec<&String> = columns.iter().map(|(t, _, _)| t).collect();
        tables.dedup();
        for table in tables {
            for privilege in ["DELETE", "TRUNCATE", "TRIGGER"] {
                let held: bool = sqlx::query_scalar("SELECT has_table_privilege($1, $2, $3)")
                    .bind(group)
                    .bind(table)
                    .bind(privilege)
                    .fetch_one(q)
                    .await
                    .unwrap();
                checked += 1;
                if held != privileges::allows_table(group, privilege, table) {
                    wrong.push(format!("{group}: {privilege} ON {table}: held = {held}"));
                }
            }
        }
        for sequence in &sequences {
            for privilege in ["USAGE", "SELECT", "UPDATE"] {
                let held: bool = sqlx::query_scalar("SELECT has_sequence_privilege($1, $2, $3)")
                    .bind(group)
                    .bind(sequence)
                    .bind(privilege)
                    .fetch_one(q)
                    .await
                    .unwrap();
                checked += 1;
                if held {
                    wrong.push(format!("{group}: {privilege} ON SEQUENCE {sequence}"));
                }
            }
        }
        for function in &functions {
            let held: bool = sqlx::query_scalar(
                "SELECT has_function_privilege($1, $2::regprocedure, 'EXECUTE')",
            )
            .bind(group)
            .bind(function)
            .fetch_one(q)
            .await
            .unwrap();
            checked += 1;
            if held != privileges::allows_function(group, function) {
                wrong.push(format!(
                    "{group}: EXECUTE ON FUNCTION {function}: held = {held}"
                ));
            }
        }
    }
    // And no grant of the matrix names an object that does not exist.
    for grant in privileges::GRANTS {
        let exists = match grant.on {
            privileges::On::Table(t) => columns.iter().any(|(x, _, _)| x == t),
            privileges::On::Columns(t, cols) => cols
                .iter()
                .all(|c| columns.iter().any(|(x, _, y)| x == t && y == c)),
            privileges::On::Function(f) => functions.iter().any(|x| x == f),
        };
        if !exists {
            wrong.push(format!("the matrix names a missing object: {grant:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {checked} cells differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The same matrix, by attempting every operation as a login member of each
/// group: what is allowed runs (or fails for another reason than a
/// privilege), what is denied fails with 42501.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_of_the_matrix_is_allowed_or_refused_as_declared() {
    use outbox_relay::privileges::{self, GROUPS};
    let env = TestEnv::new().await;
    let q = env.fixtures();
    let columns = schema_columns(q).await;
    // Each function called with typed NULLs (inside a rolled-back transaction).
    let functions: Vec<(String, String)> = sqlx::query_as(
        "SELECT p.oid::regprocedure::text, \
                format('SELECT %I(%s)', p.proname, \
                       (SELECT string_agg(format('NULL::%s', format_type(t, NULL)), ', ' ORDER BY n) \
                          FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, n))) \
           FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1",
    )
    .fetch_all(q)
    .await
    .unwrap();

    let mut wrong = Vec::new();
    let mut attempts = 0;
    for group in GROUPS {
        let role = match group {
            "outbox_writer" => env.writer_role("mw", "iam").await,
            "outbox_consumer" => env.consumer_role("matrix").await.0,
            _ => env.login_role("m", &[group]).await,
        };
        let mut conn = PgConnection::connect(&env.url_as(&role)).await.unwrap();
        let mut cases: Vec<(String, bool)> = Vec::new();
        let mut tables: Vec<(&String, &String)> = Vec::new();
        for (table, kind, column) in &columns {
            if !tables.iter().any(|(t, _)| *t == table) {
                tables.push((table, kind));
            }
            let col = format!("\"{column}\"");
            cases.push((
                format!("SELECT {col} FROM {table} WHERE false"),
                privileges::allows_column(group, "SELECT", table, column),
            ));
            // Views of the schema are not updatable: PostgreSQL refuses the
            // statement before it checks privileges (the catalog test covers them).
            if kind == "v" {
                continue;
            }
            cases.push((
                format!(
                    "INSERT INTO {table} ({col}) OVERRIDING SYSTEM VALUE SELECT NULL WHERE false"
                ),
                privileges::allows_column(group, "INSERT", table, column),
            ));
            cases.push((
                format!("UPDATE {table} SET {col} = DEFAULT WHERE false"),
                privileges::allows_column(group, "UPDATE", table, column),
            ));
        }
        for (table, kind) in tables {
            if kind == "v" {
                continue;
            }
            cases.push((
                format!("DELETE FROM {table} WHERE false"),
                privileges::allows_table(group, "DELETE", table),
            ));
            cases.push((format!("TRUNCATE {table}"), false));
        }
        cases.push(("SELECT nextval('outbox_id_seq')".into(), false));
        for (signature, call) in &functions {
            cases.push((call.clone(), privileges::allows_function(group, signature)));
        }
        for (sql, allowed) in cases {
            attempts += 1;
            let mut tx = conn.begin().await.unwrap();
            let result = sqlx::query(&sql).execute(&mut *tx).await;
            let refused = matches!(&result, Err(e) if e.as_database_error()
                .and_then(|d| d.code()).as_deref() == Some(FORBIDDEN));
            if refused == allowed {
                wrong.push(format!(
                    "{group}: `{sql}` should be {}: {result:?}",
                    if allowed { "allowed" } else { "refused" }
                ));
            }
            let _ = tx.rollback().await;
        }
        conn.close().await.unwrap();
    }
    assert!(attempts > 1000, "{attempts}");
    assert!(
        wrong.is_empty(),
        "{} of {attempts} attempts differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// (table or view, relkind, column) of every column of the schema, in order.
async fn schema_columns(q: &sqlx::PgPool) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT c.relname::text, c.relkind::text, a.attname::text FROM pg_class c \
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
          WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'v', 'p') \
          ORDER BY 1, a.attnum",
    )
    .fetch_all(q)
    .await
    .unwrap()
}

/// docs/security.md shows the matrix as the code declares it.
#[test]
fn the_security_doc_shows_the_declared_matrix() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/security.md")).unwrap();
    let table = outbox_relay::privileges::markdown();
    assert!(
        doc.contains(&table),
        "docs/security.md must contain the matrix as src/privileges.rs renders it:\n\n{table}"
    );
}
