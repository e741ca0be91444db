//! Operating the relay against real Postgres and real Kafka: `/metrics`
//! counters and gauges as events are published, retried and dead-lettered;
//! `/readyz` while Postgres refuses the relay's role; `status --json`;
//! `topics ensure` with its drift report; JSON logs.
//!
//! The metrics recorder is process-global, so every test here uses its own
//! `relay.source` label (TestEnv gives each a unique one), and only
//! `metrics_move_as_events_are_published_retried_and_dead_lettered` publishes
//! in this process: the unlabelled histograms are then its alone.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use outbox_relay::config::{Secret, Settings};
use outbox_relay::topics;
use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
use serde_json::{json, Value};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

// ---------------------------------------------------------------- helpers

/// Runs the library's relay in this process until the returned sender fires.
fn start(settings: Settings) -> (oneshot::Sender<()>, JoinHandle<Result<(), String>>) {
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        outbox_relay::run(settings, async {
            let _ = rx.await;
        })
        .await
        .map_err(|e| e.to_string())
    });
    (tx, task)
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    assert!(eventually(timeout, cond).await, "timed out waiting: {what}");
}

async fn topic_exists(settings: &Settings, topic: &str) -> bool {
    let admin = topics::admin_client(settings).unwrap();
    let md = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    md.topics().iter().any(|t| t.name() == topic)
}

async fn partition_count(settings: &Settings, topic: &str) -> usize {
    let admin = topics::admin_client(settings).unwrap();
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    md.topics()[0].partitions().len()
}

async fn topic_config(settings: &Settings, topic: &str, key: &str) -> Option<String> {
    let admin = topics::admin_client(settings).unwrap();
    let res = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();
    let resource = res.into_iter().next().unwrap().unwrap();
    resource.get(key).and_then(|e| e.value.clone())
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_events_are_published_retried_and_dead_lettered() {
    let env = TestEnv::new().await;
    let source = env.settings.relay.source.clone();
    let auth_topic = env.topic("platform.auth.events");
    let money_topic = env.topic("platform.money.events");
    // Billing events fail transiently: their topic is gone before the relay
    // starts, and a missing topic is retried, never dead-lettered.
    let billing_topic = env.topic("platform.billing.events");
    {
        let admin = topics::admin_client(&env.settings).unwrap();
        let res = admin
            .delete_topics(&[&billing_topic], &AdminOptions::new())
            .await
            .unwrap();
        assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    }
    wait_for("billing topic deleted", Duration::from_secs(30), || async {
        !topic_exists(&env.settings, &billing_topic).await
    })
    .await;

    let port = free_port();
    let mut settings = env.settings.clone();
    settings.http.listen = format!("127.0.0.1:{port}");
    // Fail messages for the missing topic after 100 ms instead of waiting
    // for it to appear, and report librdkafka statistics twice a second.
    settings
        .kafka
        .librdkafka
        .insert("topic.metadata.propagation.max.ms".into(), "100".into());
    settings
        .kafka
        .librdkafka
        .insert("statistics.interval.ms".into(), "500".into());
    let started_at = chrono::Utc::now().timestamp() as f64;
    let (stop, task) = start(settings);

    wait_for("/readyz 200", Duration::from_secs(30), || async {
        matches!(get(port, "/readyz").await, Some((200, _)))
    })
    .await;
    let before = scrape(port).await;
    assert_eq!(
        value(
            &before,
            "outbox_relay_info",
            &[("version", outbox_relay::VERSION)]
        ),
        Some(1.0)
    );
    for (name, kind) in [
        ("outbox_pending_events", "gauge"),
        ("outbox_oldest_pending_age_seconds", "gauge"),
        ("outbox_dlq_events", "gauge"),
        ("outbox_relay_info", "gauge"),
    ] {
        assert!(
            before.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind}\n{before}"
        );
    }

    // Phase 1: five events publish, two are dead-lettered.
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            env.insert("auth.user.created", example_payload("auth.user.created"))
                .await,
        );
    }
    for _ in 0..2 {
        ids.push(
            env.insert(
                "money.wallet.credited",
                example_payload("money.wallet.credited"),
            )
            .await,
        );
    }
    let tenant = "01j9p3kz5f00000000000000";
    ids.push(
        env.insert(
            "auth.user.created",
            json!({"email": "no-user-id@example.com", "tenantId": tenant, "roles": []}),
        )
        .await,
    );
    // A type the catalog does not know, written around the publisher
    // trigger (which would refuse it): its name must not become a label.
    // Fixture: no deployed role may disable the trigger or write an event
    // the catalog does not know, so only the superuser can forge this row.
    sqlx::query("ALTER TABLE outbox DISABLE TRIGGER outbox_stamp_publisher")
        .execute(env.fixtures())
        .await
        .unwrap();
    ids.push(
        sqlx::query_scalar(
            "INSERT INTO outbox (event_type, payload) VALUES ('ghost.thing.happened', '{}') RETURNING event_id",
        )
        .fetch_one(env.fixtures())
        .await
        .unwrap(),
    );
    sqlx::query("ALTER TABLE outbox ENABLE TRIGGER outbox_stamp_publisher")
        .execute(env.fixtures())
        .await
        .unwrap();
    wait_for("outbox drained", Duration::from_secs(30), || async {
        env.outbox_count().await == 0 && env.dlq_count().await == 2
    })
    .await;
    let published = |text: &str, event_type: &str, topic: &str| {
        value(
            text,
            "outbox_events_published_total",
            &[
                ("source", &source),
                ("event_type", event_type),
                ("topic", topic),
            ],
        )
    };
    // The relay counts a batch just after committing it: wait for the last
    // counter of this phase, then every figure must be exact.
    let counted = |m: &str| {
        value(
            m,
            "outbox_publish_latency_seconds_count",
            &[("source", &source)],
        )
        .unwrap_or(0.0)
            - value(
                &before,
                "outbox_publish_latency_seconds_count",
                &[("source", &source)],
            )
            .unwrap_or(0.0)
            >= 5.0
            && series(
                m,
                "outbox_events_dead_lettered_total",
                &[("source", &source)],
            )
            .iter()
            .map(|s| s.value)
            .sum::<f64>()
                >= 2.0
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut m = scrape(port).await;
    while !counted(&m) {
        assert!(
            std::time::Instant::now() < deadline,
            "phase 1 not counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        m = scrape(port).await;
    }
    for (name, kind) in [
        ("outbox_events_published_total", "counter"),
        ("outbox_events_dead_lettered_total", "counter"),
        ("outbox_publish_latency_seconds", "histogram"),
        ("outbox_batch_size", "histogram"),
        ("outbox_claim_duration_seconds", "histogram"),
    ] {
        assert!(
            m.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind}\n{m}"
        );
    }
    assert_eq!(published(&m, "auth.user.created", &auth_topic), Some(3.0));
    assert_eq!(
        published(&m, "money.wallet.credited", &money_topic),
        Some(2.0)
    );
    assert_eq!(
        series(&m, "outbox_events_published_total", &[("source", &source)]).len(),
        2,
        "one series per (event type, topic) published"
    );
    assert_eq!(
        value(
            &m,
            "outbox_events_dead_lettered_total",
            &[
                ("source", &source),
                ("event_type", "auth.user.created"),
                ("reason", "missing_partition_key")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &m,
            "outbox_events_dead_lettered_total",
            &[
                ("source", &source),
                ("event_type", "unknown"),
                ("reason", "unknown_event_type")
            ]
        ),
        Some(1.0)
    );
    assert!(!m.contains("ghost.thing.happened"));
    // Only the series exported at 0 from start-up (for the ACL alert).
    assert!(
        series(&m, "outbox_publish_failures_total", &[("source", &source)])
            .iter()
            .all(|s| s.value == 0.0)
    );
    // The histograms carry the source.
    let of_source =
        |text: &str, name: &str| value(text, name, &[("source", &source)]).unwrap_or(0.0);
    let delta = |name: &str| of_source(&m, name) - of_source(&before, name);
    assert_eq!(delta("outbox_publish_latency_seconds_count"), 5.0);
    assert!(delta("outbox_publish_latency_seconds_sum") > 0.0);
    assert_eq!(
        delta("outbox_batch_size_sum"),
        7.0,
        "every row claimed exactly once"
    );
    assert!(delta("outbox_claim_duration_seconds_count") >= 1.0);
    let last_publish = value(
        &m,
        "outbox_last_publish_timestamp_seconds",
        &[("source", &source)],
    )
    .unwrap();
    assert!(last_publish >= started_at, "{last_publish} < {started_at}");
    wait_for(
        "backlog gauges refreshed",
        Duration::from_secs(10),
        || async {
            let m = scrape(port).await;
            value(&m, "outbox_pending_events", &[("source", &source)]) == Some(0.0)
                && value(
                    &m,
                    "outbox_oldest_pending_age_seconds",
                    &[("source", &source)],
                ) == Some(0.0)
                && value(&m, "outbox_dlq_events", &[("source", &source)]) == Some(2.0)
        },
    )
    .await;
    // One relay: it ends up holding every virtual partition.
    let partitions: i32 = sqlx::query_scalar("SELECT vpartitions FROM outbox_config")
        .fetch_one(env.admin())
        .await
        .unwrap();
    wait_for("lease gauges", Duration::from_secs(20), || async {
        let m = scrape(port).await;
        let p = value(&m, "outbox_lease_partitions", &[("source", &source)]);
        p == Some(partitions as f64)
            && value(&m, "outbox_leases_owned", &[("source", &source)]) == p
    })
    .await;
    // librdkafka statistics arrive every 500 ms here.
    wait_for("librdkafka statistics", Duration::from_secs(10), || async {
        let m = scrape(port).await;
        value(&m, "outbox_kafka_producer_queue_messages", &[]).is_some()
            && series(&m, "outbox_kafka_broker_rtt_seconds", &[])
                .iter()
                .any(|s| s.value > 0.0 && s.labels.contains_key("broker"))
    })
    .await;

    // Phase 2: two billing events are retried while their topic is missing.
    for _ in 0..2 {
        ids.push(
            env.insert(
                "billing.plan.changed",
                example_payload("billing.plan.changed"),
            )
            .await,
        );
    }
    wait_for(
        "transient failures counted",
        Duration::from_secs(30),
        || async {
            let m = scrape(port).await;
            value(
                &m,
                "outbox_publish_failures_total",
                &[("source", &source), ("reason", "unknown_topic")],
            )
            .unwrap_or(0.0)
                >= 2.0
                && value(&m, "outbox_pending_events", &[("source", &source)]) == Some(2.0)
        },
    )
    .await;
    let age = |m: &str| {
        value(
            m,
            "outbox_oldest_pending_age_seconds",
            &[("source", &source)],
        )
        .unwrap()
    };
    let first_age = age(&scrape(port).await);
    wait_for("lag gauge grows", Duration::from_secs(10), || async {
        age(&scrape(port).await) > first_age
    })
    .await;

    // No label carries an event id or a tenant id.
    let m = scrape(port).await;
    for id in &ids {
        assert!(!m.contains(id.as_str()), "event id {id} in /metrics");
    }
    assert!(!m.contains(tenant), "tenant id in /metrics");

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    // Stopped: every recorded attempt of the retried rows is one failure.
    let attempts: i64 = sqlx::query_scalar(
        "SELECT sum(attempts)::bigint FROM outbox WHERE event_type = 'billing.plan.changed'",
    )
    .fetch_one(env.admin())
    .await
    .unwrap();
    let last_errors: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT last_error FROM outbox \
          WHERE event_type = 'billing.plan.changed' AND last_error IS NOT NULL",
    )
    .fetch_all(env.admin())
    .await
    .unwrap();
    let after = recorded();
    let failures = series(
        &after,
        "outbox_publish_failures_total",
        &[("source", &source)],
    );
    // The invariant: each recorded attempt is exactly one counted failure,
    // whatever the broker answered. A missing topic is what the broker
    // answers almost always; another answer now and then (seen once on a
    // loaded machine) is counted under its own reason, not lost.
    let total: f64 = failures.iter().map(|s| s.value).sum();
    assert_eq!(total, attempts as f64, "{failures:?}; {last_errors:?}");
    let missing = failures
        .iter()
        .find(|s| s.labels["reason"] == "unknown_topic")
        .map_or(0.0, |s| s.value);
    assert!(
        missing >= 2.0 && missing > total / 2.0,
        "failures not counted as a missing topic: {failures:?}; last errors: {last_errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_unready_while_postgres_refuses_the_relay_and_recovers() {
    let env = TestEnv::new().await;
    // A relay login role of its own, so that refusing it leaves every
    // other role of this environment alone.
    let role = env.login_role("relay", &["outbox_relay"]).await;
    let port = free_port();
    let mut settings = env.settings.clone();
    settings.http.listen = format!("127.0.0.1:{port}");
    settings.database.url = Secret::new(env.url_as(&role));
    assert!(settings.database.url.expose().contains(&role));
    settings.database.connect_timeout_ms = 1_000;
    let (stop, task) = start(settings);

    // The body names each check on its own line; a lease line joins them
    // when leases are wired into readiness, so only these two are matched.
    let readyz = || async {
        get(port, "/readyz").await.map(|(code, body)| {
            let lines: Vec<String> = body
                .lines()
                .filter(|l| l.starts_with("postgres:") || l.starts_with("kafka:"))
                .map(String::from)
                .collect();
            (code, lines.join("\n"))
        })
    };
    wait_for("ready", Duration::from_secs(30), || async {
        readyz().await == Some((200, "postgres: ok\nkafka: ok".into()))
    })
    .await;
    assert_eq!(get(port, "/healthz").await, Some((200, "ok\n".into())));
    assert_eq!(get(port, "/nope").await.map(|(code, _)| code), Some(404));

    // Postgres stays up for everyone else; this relay's role may no longer
    // log in and its sessions are cut. Fixture: the outage is the server's
    // doing (ALTER ROLE and terminating another role's sessions are the
    // superuser's), not anything a deployed role does.
    sqlx::query(&format!("ALTER ROLE {role} NOLOGIN"))
        .execute(env.fixtures())
        .await
        .unwrap();
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1) t",
    )
    .bind(&role)
    .fetch_one(env.fixtures())
    .await
    .unwrap();
    assert!(terminated >= 1, "the relay had no session to terminate");
    let unready = eventually(Duration::from_secs(30), || async {
        readyz().await == Some((503, "postgres: unavailable\nkafka: ok".into()))
    })
    .await;
    assert!(
        unready,
        "not unready; the relay {}",
        if task.is_finished() {
            format!("stopped: {:?}", task.await)
        } else {
            format!("runs, /readyz: {:?}", readyz().await)
        }
    );
    assert_eq!(
        get(port, "/healthz").await,
        Some((200, "ok\n".into())),
        "alive while unready"
    );

    // Fixture: the outage ends.
    sqlx::query(&format!("ALTER ROLE {role} LOGIN"))
        .execute(env.fixtures())
        .await
        .unwrap();
    wait_for("ready again", Duration::from_secs(30), || async {
        readyz().await == Some((200, "postgres: ok\nkafka: ok".into()))
    })
    .await;

    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
    // The role is cluster-wide: leave none behind.
    env.drop_role(&role).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_matches_the_database() {
    let env = TestEnv::new().await;
    let source = env.settings.relay.source.clone();
    // Three pending events, the first 90 s old; four dead-lettered, one of
    // them then discarded.
    let mut ids = Vec::new();
    for (i, event_type) in [
        "auth.user.created",
        "auth.role.changed",
        "money.wallet.debited",
        "files.file.uploaded",
        "notify.notification.sent",
        "billing.plan.changed",
        "audit.record.created",
    ]
    .iter()
    .enumerate()
    {
        let age = if i == 0 { 90 } else { 0 };
        // Each event from its publisher's writer, which may state when it
        // occurred but may not read the row back: the admin reads its id.
        let publisher = &env.catalog.get(event_type).unwrap().publisher;
        let event_id = outbox_relay::writer::new_event_id();
        sqlx::query(
            "INSERT INTO outbox (event_id, event_type, payload, occurred_at) \
             VALUES ($1, $2, $3, now() - make_interval(secs => $4))",
        )
        .bind(&event_id)
        .bind(event_type)
        .bind(example_payload(event_type))
        .bind(age as f64)
        .execute(&env.writer(publisher).await)
        .await
        .unwrap();
        let id: i64 = sqlx::query_scalar("SELECT id FROM outbox WHERE event_id = $1")
            .bind(&event_id)
            .fetch_one(env.admin())
            .await
            .unwrap();
        ids.push(id);
    }
    // The relay dead-letters; the admin discards.
    let _: i32 = sqlx::query_scalar("SELECT outbox_dead_letter($1, $2, $3)")
        .bind(&ids[3..])
        .bind([
            "invalid_payload",
            "message_too_large",
            "invalid_payload",
            "retries_exhausted",
        ])
        .bind(["e1", "e2", "e3", "e4"])
        .fetch_one(&env.relay_pool().await)
        .await
        .unwrap();
    let discarded: Vec<String> =
        sqlx::query_scalar("SELECT outbox_dlq_discard('test', p_reason => 'retries_exhausted')")
            .fetch_all(env.admin())
            .await
            .unwrap();
    assert_eq!(discarded.len(), 1);
    // Two relays of this source, one of another source (not shown).
    // Fixture: forged registrations with a made-up past (hosts, versions,
    // totals, publish times) that no running relay would write.
    for (relay_id, src, last_publish, total) in [
        (
            "relay-a",
            source.as_str(),
            Some("2026-01-02T03:04:05.678Z"),
            10i64,
        ),
        (
            "relay-b",
            source.as_str(),
            Some("2026-01-02T03:04:09.001Z"),
            32,
        ),
        ("relay-c", "elsewhere", Some("2026-05-05T00:00:00Z"), 7),
    ] {
        sqlx::query(
            "INSERT INTO outbox_relays (relay_id, source, host, version, last_publish_at, published_total, heartbeat_at) \
             VALUES ($1, $2, 'host-1', '0.1.0', $3::timestamptz, $4, now() - interval '4 seconds')",
        )
        .bind(relay_id)
        .bind(src)
        .bind(last_publish)
        .bind(total)
        .execute(env.fixtures())
        .await
        .unwrap();
    }

    // relay-b holds two live leases; relay-a's one lease has expired.
    // Fixture: leases of relays that do not run, one of them expired.
    sqlx::query(
        "UPDATE outbox_leases SET owner = 'relay-b', epoch = 1, expires_at = now() + interval '1 hour' \
          WHERE vpartition IN (0, 1)",
    )
    .execute(env.fixtures())
    .await
    .unwrap();
    sqlx::query(
        "UPDATE outbox_leases SET owner = 'relay-a', epoch = 1, expires_at = now() - interval '1 second' \
          WHERE vpartition = 2",
    )
    .execute(env.fixtures())
    .await
    .unwrap();
    let partitions: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_leases")
        .fetch_one(env.admin())
        .await
        .unwrap();
    assert!(partitions > 3);

    // `status` is an operator's command: it runs as the admin role.
    let admin_env = env.admin_process_env();
    let out = relay_command_with(&admin_env)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_str(&stdout_of(&out)).unwrap();
    let db_age: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - occurred_at)::float8 FROM outbox ORDER BY id LIMIT 1",
    )
    .fetch_one(env.admin())
    .await
    .unwrap();
    let db_pending: i64 = env.outbox_count().await;
    assert_eq!(db_pending, 3);
    assert_eq!(report["sources"].as_array().unwrap().len(), 1, "{report}");
    let s = &report["sources"][0];
    assert_eq!(s["source"], source.as_str());
    assert_eq!(s["pending"], db_pending);
    assert_eq!(s["pending_is_estimate"], false);
    let age = s["oldest_pending_age_seconds"].as_f64().unwrap();
    assert!(
        age >= 90.0 && age <= db_age,
        "status said {age}, the database {db_age} a moment later"
    );
    assert_eq!(s["dlq_dead"], env.dlq_count().await);
    assert_eq!(s["dlq_dead"], 3);
    assert_eq!(s["dlq_is_estimate"], false);
    assert_eq!(
        s["dlq_by_reason"],
        json!([
            {"reason": "invalid_payload", "events": 2},
            {"reason": "message_too_large", "events": 1},
        ])
    );
    assert_eq!(s["leases"], json!({"partitions": partitions, "owned": 2}));
    // Every relay registered in the database, whatever source label it uses.
    assert_eq!(s["last_publish_at"], "2026-05-05T00:00:00Z");
    let relays = s["relays"].as_array().unwrap();
    let ids: Vec<&str> = relays
        .iter()
        .map(|r| r["relay_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["relay-a", "relay-b", "relay-c"], "{report}");
    assert_eq!(relays[0]["published_total"], 10);
    assert_eq!(relays[0]["last_publish_at"], "2026-01-02T03:04:05.678Z");
    assert_eq!(relays[0]["leases"], 0);
    assert_eq!(relays[1]["leases"], 2);
    assert_eq!(relays[1]["host"], "host-1");
    assert_eq!(relays[2]["source"], "elsewhere");
    for r in relays {
        let hb = r["heartbeat_age_seconds"].as_f64().unwrap();
        assert!((4.0..30.0).contains(&hb), "heartbeat age {hb}");
    }

    // A second source that cannot be read is reported with its error,
    // without hiding the first; the exit status says something failed.
    let mut two = admin_env.clone();
    two.push((
        "OUTBOX_RELAY_SOURCES".into(),
        format!(
            "[{{name=\"{source}\", url=\"{}\"}}, {{name=\"gone\", url=\"{}\"}}]",
            env.admin_url(),
            with_database(&env.admin_url(), "no_such_database_here")
        ),
    ));
    let out = relay_command_with(&two)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let both: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(both["sources"][0]["pending"], 3, "{both}");
    assert_eq!(both["sources"][1]["source"], "gone");
    let error = both["sources"][1]["error"].as_str().unwrap();
    assert!(
        error.contains("\"no_such_database_here\" does not exist"),
        "{error}"
    );

    // The human table says the same.
    let out = relay_command_with(&admin_env)
        .args(["status"])
        .output()
        .unwrap();
    let table = stdout_of(&out);
    let lines: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "SOURCE",
            "PENDING",
            "OLDEST_PENDING",
            "DLQ",
            "RELAYS",
            "LEASES",
            "LAST_PUBLISH"
        ],
        "{table}"
    );
    let row = &lines[1];
    assert_eq!(row[0], source, "{table}");
    assert_eq!(row[1], "3", "{table}");
    assert!(row[2].starts_with("1m3"), "{table}");
    let leases = format!("2/{partitions}");
    assert_eq!(
        row[3..],
        ["3", "3", leases.as_str(), "2026-05-05T00:00:00.000Z"],
        "{table}"
    );
    assert!(
        lines.iter().any(|l| l[..] == ["invalid_payload", "2"]),
        "{table}"
    );
    assert!(
        lines.iter().any(|l| l.first() == Some(&"relay-b")
            && l[1..5] == [source.as_str(), "host-1", "0.1.0", "2"]),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_ensure_creates_with_catalog_retention_and_applies_drift_only_when_asked() {
    let prefix = format!("o{}.", unique());
    let mut settings = Settings::default();
    settings.kafka.brokers = brokers();
    settings.kafka.topic_prefix = prefix.clone();
    let env = vec![
        ("OUTBOX_RELAY_KAFKA__BROKERS".to_string(), brokers()),
        (
            "OUTBOX_RELAY_KAFKA__TOPIC_PREFIX".to_string(),
            prefix.clone(),
        ),
        (
            "OUTBOX_RELAY_CATALOG__PATHS".to_string(),
            format!("[\"{}\"]", catalog_dir().display()),
        ),
    ];
    let ensure = |extra: &[&str], partitions: &str| {
        let mut env = env.clone();
        env.push(("OUTBOX_RELAY_TOPICS__PARTITIONS".into(), partitions.into()));
        let out = relay_command_with(&env)
            .args(["topics", "ensure", "--json"])
            .args(extra)
            .output()
            .unwrap();
        let reports: Value = serde_json::from_str(&stdout_of(&out)).unwrap();
        reports
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["topic"].as_str().unwrap().to_string(), r.clone()))
            .collect::<BTreeMap<String, Value>>()
    };
    let catalog_topics = [
        "platform.audit.events",
        "platform.auth.events",
        "platform.billing.events",
        "platform.files.events",
        "platform.module.events",
        "platform.money.events",
        "platform.notify.events",
    ];
    let auth = format!("{prefix}platform.auth.events");
    let audit = format!("{prefix}platform.audit.events");

    let created = ensure(&[], "2");
    assert_eq!(
        created.keys().cloned().collect::<Vec<_>>(),
        catalog_topics
            .iter()
            .map(|t| format!("{prefix}{t}"))
            .collect::<Vec<_>>()
    );
    for (topic, r) in &created {
        assert_eq!(r["action"], "created", "{topic}");
        assert_eq!(r["partitions"], 2, "{topic}");
    }
    assert_eq!(created[&auth]["retention_ms"], 7 * DAY_MS);
    assert_eq!(created[&audit]["retention_ms"], 30 * DAY_MS);
    // Read back from the broker, which serves a new topic's configuration
    // a moment after the controller created it.
    for (topic, days) in [(&auth, 7), (&audit, 30)] {
        let mut read = None;
        for _ in 0..100 {
            read = topics::retention_ms(&settings, topic).await.unwrap();
            if read.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(read, Some(days * DAY_MS), "{topic}");
    }
    assert_eq!(partition_count(&settings, &auth).await, 2);

    let again = ensure(&[], "2");
    assert!(
        again.values().all(|r| r["action"] == "up_to_date"),
        "{again:?}"
    );

    // Someone shortens retention by hand (and sets an unrelated override);
    // the configuration now asks for 3 partitions.
    let admin = topics::admin_client(&settings).unwrap();
    let alter = AlterConfig::new(ResourceSpecifier::Topic(&auth))
        .set("retention.ms", "86400000")
        .set("max.message.bytes", "2000000");
    let res = admin
        .alter_configs([&alter], &AdminOptions::new())
        .await
        .unwrap();
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
    assert_eq!(
        topics::retention_ms(&settings, &auth).await.unwrap(),
        Some(DAY_MS)
    );

    let drift = ensure(&[], "3");
    assert_eq!(drift[&auth]["action"], "drift");
    assert_eq!(drift[&auth]["applied"], false);
    assert_eq!(
        drift[&auth]["changes"],
        json!(["retention.ms 86400000 -> 604800000", "partitions 2 -> 3"])
    );
    assert_eq!(drift[&audit]["changes"], json!(["partitions 2 -> 3"]));
    // Reported, not changed.
    assert_eq!(
        topics::retention_ms(&settings, &auth).await.unwrap(),
        Some(DAY_MS)
    );
    assert_eq!(partition_count(&settings, &auth).await, 2);

    let applied = ensure(&["--apply"], "3");
    assert_eq!(applied[&auth]["action"], "drift");
    assert_eq!(applied[&auth]["applied"], true);
    assert_eq!(
        topics::retention_ms(&settings, &auth).await.unwrap(),
        Some(7 * DAY_MS)
    );
    assert_eq!(
        topics::retention_ms(&settings, &audit).await.unwrap(),
        Some(30 * DAY_MS)
    );
    assert_eq!(partition_count(&settings, &auth).await, 3);
    assert_eq!(partition_count(&settings, &audit).await, 3);
    assert_eq!(
        topic_config(&settings, &auth, "max.message.bytes")
            .await
            .as_deref(),
        Some("2000000"),
        "fixing retention keeps the topic's other overrides"
    );

    let settled = ensure(&[], "3");
    assert!(
        settled.values().all(|r| r["action"] == "up_to_date"),
        "{settled:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_event_id_and_type_of_a_dead_lettered_event() {
    let env = TestEnv::new().await;
    let id = env
        .insert("auth.user.created", json!({"email": "x@example.com"}))
        .await;
    let child = env.spawn_process(&[("OUTBOX_RELAY_LOG__FORMAT", "json")]);
    let dead = eventually(Duration::from_secs(30), || async {
        env.dlq_count().await == 1
    })
    .await;
    let (status, stderr) = child.terminate();
    assert!(dead, "not dead-lettered; stderr:\n{stderr}");
    assert!(status.success(), "{status:?}\n{stderr}");
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let entry = lines
        .iter()
        .find(|l| l["message"] == "event dead-lettered")
        .unwrap_or_else(|| panic!("no dead-letter line:\n{stderr}"));
    assert_eq!(entry["level"], "ERROR");
    assert_eq!(entry["event_id"], id.as_str());
    assert_eq!(entry["event_type"], "auth.user.created");
    assert_eq!(entry["reason"], "missing_partition_key");
}

/// Metric names (with a histogram's `_bucket`/`_sum`/`_count` suffix
/// removed) in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("outbox_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let name = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(name.to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn alerts_dashboard_and_docs_use_the_metrics_the_relay_exports() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    // Every metric name src/metrics.rs defines.
    let exported: Vec<String> = read("src/metrics.rs")
        .lines()
        .filter(|l| l.starts_with("pub const ") && l.contains(": &str = \"outbox_"))
        .map(|l| l.split('"').nth(1).unwrap().to_string())
        .collect();
    assert!(exported.len() >= 17, "{exported:?}");

    let alerts = read("deploy/prometheus/alerts.yml");
    let mut exprs: Vec<String> = alerts
        .split("- alert:")
        .skip(1)
        .map(|rule| {
            let from = rule.find("expr:").expect("rule without expr");
            let to = rule.find("labels:").expect("rule without labels");
            rule[from..to].to_string()
        })
        .collect();
    let exprs_in_rules = exprs.len();
    assert_eq!(exprs_in_rules, alerts.matches("- alert:").count());
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/outbox-relay.json")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    let mut used = std::collections::BTreeSet::new();
    for expr in &exprs {
        for name in metric_names(expr) {
            assert!(exported.contains(&name), "{name} is not exported: {expr}");
            used.insert(name);
        }
    }
    // The dashboard and the rules cover the metrics the issue fixed.
    for name in [
        "outbox_events_published_total",
        "outbox_publish_failures_total",
        "outbox_events_dead_lettered_total",
        "outbox_pending_events",
        "outbox_oldest_pending_age_seconds",
        "outbox_dlq_events",
        "outbox_publish_latency_seconds",
        "outbox_batch_size",
        "outbox_claim_duration_seconds",
        "outbox_leases_owned",
        "outbox_relay_info",
        "outbox_kafka_producer_queue_messages",
        "outbox_kafka_broker_rtt_seconds",
    ] {
        assert!(used.contains(name), "{name} is on no panel and in no rule");
    }
    // Every runbook link of a rule names a section of the runbook.
    let runbook = read("docs/operations.md");
    let anchors: Vec<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == ' ' || *c == '-')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let links: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook: docs/operations.md#"))
        .collect();
    assert_eq!(links.len(), exprs_in_rules, "every rule links the runbook");
    for link in links {
        assert!(
            anchors.iter().any(|a| a == link),
            "no section #{link} in {anchors:?}"
        );
    }
    // Every exported metric is documented.
    let docs = read("docs/metrics.md");
    for name in &exported {
        assert!(
            docs.contains(&format!("`{name}`")),
            "{name} missing from docs/metrics.md"
        );
    }
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    // promtool comes with the prometheus package that scripts/deps.sh installs.
    let out = Command::new("promtool")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus"))
        .args(["test", "rules", "alerts_test.yml"])
        .output()
        .expect("promtool (Debian package prometheus) is not installed: run scripts/deps.sh");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
