//! The consumer kit against real Postgres, real Kafka and the real relay:
//! SQL insert → relay → handler, permanent dedupe (a crash between the
//! database commit and the offset commit, a replay a day later), failing
//! handlers, and the manifest's 403 rules — in the library and in the
//! example consumer binary.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use outbox_relay::consumer::{
    Consumer, ConsumerError, ConsumerSettings, Event, FailurePolicy, Manifest, StatsSnapshot,
};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const MANIFEST: &str = r#"{"name": "@acme/crm", "version": "1.2.0",
  "events": {"subscribes": ["auth.user.created", "money.wallet.credited"]}}"#;

fn settings(env: &TestEnv, name: &str) -> ConsumerSettings {
    let mut s = ConsumerSettings::new(name, env.settings.kafka.clone());
    s.retry_min_ms = 20;
    s.retry_max_ms = 200;
    // A restarted member gets its partitions back without waiting 45 s
    // for the dead one's session to expire.
    s.librdkafka
        .insert("session.timeout.ms".into(), "6000".into());
    s
}

/// The handlers' side effect: one row per handler run that committed, and
/// deliberately no unique key, so a second run would show. It is the
/// module's own table. Fixture: the module's schema owner (the superuser
/// here) creates it and grants it to the module's consumer role; no outbox
/// role may create tables.
async fn side_effect_table(env: &TestEnv, role: &str) {
    sqlx::query(
        "CREATE TABLE side_effects (id bigint GENERATED ALWAYS AS IDENTITY, \
         consumer text NOT NULL, event_id text NOT NULL, event_type text NOT NULL)",
    )
    .execute(env.fixtures())
    .await
    .unwrap();
    sqlx::query(&format!("GRANT SELECT, INSERT ON side_effects TO {role}"))
        .execute(env.fixtures())
        .await
        .unwrap();
}

/// Handler runs recorded for `event_id`, read by the module's own role.
async fn side_effects(pool: &PgPool, event_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM side_effects WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Subscribes a handler that records the side effect (and the event, when
/// asked) and fails while `fail` says so.
fn record(
    consumer: &mut Consumer,
    event_type: &str,
    seen: Arc<Mutex<Vec<Event>>>,
    fail: Arc<dyn Fn(&Event) -> bool + Send + Sync>,
) {
    let name = consumer.name().to_string();
    consumer
        .subscribe(event_type, move |conn, event| {
            let seen = seen.clone();
            let fail = fail.clone();
            let name = name.clone();
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO side_effects (consumer, event_id, event_type) VALUES ($1, $2, $3)",
                )
                .bind(&name)
                .bind(&event.id)
                .bind(&event.event_type)
                .execute(&mut *conn)
                .await?;
                if fail(event) {
                    return Err("poison pill".into());
                }
                seen.lock().unwrap().push(event.clone());
                Ok(())
            })
        })
        .unwrap();
}

fn never() -> Arc<dyn Fn(&Event) -> bool + Send + Sync> {
    Arc::new(|_| false)
}

async fn wait_stats(
    stats: &outbox_relay::consumer::ConsumerStats,
    want: impl Fn(StatsSnapshot) -> bool,
) {
    let ok = eventually(Duration::from_secs(45), || async { want(stats.snapshot()) }).await;
    assert!(ok, "stats never matched: {:?}", stats.snapshot());
}

fn metric(name: &str, consumer: &str, event_type: &str, outcome: &str) -> Option<f64> {
    value(
        &recorded(),
        name,
        &[
            ("consumer", consumer),
            ("event_type", event_type),
            ("outcome", outcome),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sql_insert_reaches_the_kit_handler_through_the_relay() {
    outbox_relay::metrics_handle().unwrap();
    let env = TestEnv::new().await;
    let name = format!("crm-{}", unique());
    let (role, pool) = env.consumer_role(&name).await;
    side_effect_table(&env, &role).await;

    // The iam writer names the id (it may not read the row back); the
    // admin reads when the database says the event occurred.
    let created = outbox_relay::writer::new_event_id();
    sqlx::query(
        "INSERT INTO outbox (event_id, event_type, tenant_id, payload, headers) \
         VALUES ($1, 'auth.user.created', 'tenant-x', $2, $3)",
    )
    .bind(&created)
    .bind(example_payload("auth.user.created"))
    .bind(json!({"correlationId": "corr-1"}))
    .execute(&env.writer("iam").await)
    .await
    .unwrap();
    let occurred_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT occurred_at FROM outbox WHERE event_id = $1")
            .bind(&created)
            .fetch_one(env.admin())
            .await
            .unwrap();
    // Same topic, not subscribed: skipped. Another topic: never read.
    env.insert(
        "auth.user.logged_in",
        example_payload("auth.user.logged_in"),
    )
    .await;
    env.insert(
        "billing.plan.changed",
        example_payload("billing.plan.changed"),
    )
    .await;
    let credited = env
        .insert(
            "money.wallet.credited",
            example_payload("money.wallet.credited"),
        )
        .await;
    let relay = env.relay().await;
    env.drain(&relay).await;

    let manifest = Manifest::parse("module.manifest.json", MANIFEST).unwrap();
    let mut consumer = Consumer::new(
        &manifest,
        env.catalog.clone(),
        pool.clone(),
        settings(&env, &name),
    )
    .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    record(&mut consumer, "auth.user.created", seen.clone(), never());
    record(
        &mut consumer,
        "money.wallet.credited",
        seen.clone(),
        never(),
    );
    assert_eq!(
        consumer.topics(),
        vec![
            env.topic("platform.auth.events"),
            env.topic("platform.money.events")
        ]
    );
    let stats = consumer.stats();
    let token = CancellationToken::new();
    let task = tokio::spawn(consumer.run(token.clone()));
    wait_stats(&stats, |s| s.processed == 2 && s.skipped == 1).await;
    token.cancel();
    task.await.unwrap().unwrap();

    let seen = seen.lock().unwrap().clone();
    let user = seen
        .iter()
        .find(|e| e.id == created)
        .expect("auth.user.created handled");
    assert_eq!(user.event_type, "auth.user.created");
    assert_eq!(user.source, "iam");
    assert_eq!(user.schema_version, "1.0.0");
    assert_eq!(user.tenant_id.as_deref(), Some("tenant-x"));
    assert_eq!(
        user.occurred_at.timestamp_millis(),
        occurred_at.timestamp_millis()
    );
    assert_eq!(user.data, example_payload("auth.user.created"));
    assert_eq!(user.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(user.delivery.topic, env.topic("platform.auth.events"));
    let typed: outbox_relay::writer::UserCreated = user.data_as().unwrap();
    assert_eq!(typed.email, "ada@example.com");
    assert!(seen.iter().any(|e| e.id == credited && e.source == "money"));
    assert_eq!(seen.len(), 2);

    assert_eq!(side_effects(&pool, &created).await, 1);
    assert_eq!(side_effects(&pool, &credited).await, 1);
    let processed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_event_ids WHERE consumer = $1")
            .bind(&name)
            .fetch_one(env.admin())
            .await
            .unwrap();
    assert_eq!(processed, 2);
    let m = "outbox_consumer_events_total";
    assert_eq!(
        metric(m, &name, "auth.user.created", "processed"),
        Some(1.0)
    );
    assert_eq!(
        metric(m, &name, "auth.user.logged_in", "skipped"),
        Some(1.0)
    );
    assert_eq!(metric(m, &name, "billing.plan.changed", "skipped"), None);
    env.drop_role(&role).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_rolls_back_and_is_retried_until_it_succeeds() {
    outbox_relay::metrics_handle().unwrap();
    let env = TestEnv::new().await;
    let name = format!("crm-{}", unique());
    let (role, pool) = env.consumer_role(&name).await;
    side_effect_table(&env, &role).await;
    let id = env
        .insert("auth.user.created", example_payload("auth.user.created"))
        .await;
    env.drain(&env.relay().await).await;

    let manifest = Manifest::parse("module.manifest.json", MANIFEST).unwrap();
    let mut consumer = Consumer::new(
        &manifest,
        env.catalog.clone(),
        pool.clone(),
        settings(&env, &name),
    )
    .unwrap();
    let failures = Arc::new(AtomicU32::new(0));
    let f = failures.clone();
    record(
        &mut consumer,
        "auth.user.created",
        Arc::default(),
        Arc::new(move |_| f.fetch_add(1, Ordering::SeqCst) < 2),
    );
    let stats = consumer.stats();
    let token = CancellationToken::new();
    let task = tokio::spawn(consumer.run(token.clone()));
    wait_stats(&stats, |s| s.processed == 1).await;
    token.cancel();
    task.await.unwrap().unwrap();

    assert_eq!(
        failures.load(Ordering::SeqCst),
        3,
        "two failures, then success"
    );
    assert_eq!(stats.snapshot().failed_attempts, 2);
    assert_eq!(
        side_effects(&pool, &id).await,
        1,
        "the failed attempts' writes were rolled back"
    );
    let m = "outbox_consumer_events_total";
    assert_eq!(metric(m, &name, "auth.user.created", "failed"), Some(2.0));
    assert_eq!(
        metric(m, &name, "auth.user.created", "processed"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_park_policy_a_poison_event_is_parked_and_the_next_one_processed() {
    let env = TestEnv::new().await;
    let name = format!("crm-{}", unique());
    let (role, pool) = env.consumer_role(&name).await;
    side_effect_table(&env, &role).await;
    let mut poison = example_payload("auth.user.created");
    poison["email"] = json!("poison@example.com");
    let bad = env.insert("auth.user.created", poison).await;
    let good = env
        .insert("auth.user.created", example_payload("auth.user.created"))
        .await;
    env.drain(&env.relay().await).await;

    let manifest = Manifest::parse("module.manifest.json", MANIFEST).unwrap();
    let mut s = settings(&env, &name);
    s.on_failure = FailurePolicy::Park { after_attempts: 3 };
    let mut consumer = Consumer::new(&manifest, env.catalog.clone(), pool.clone(), s).unwrap();
    record(
        &mut consumer,
        "auth.user.created",
        Arc::default(),
        Arc::new(|e: &Event| e.data["email"] == "poison@example.com"),
    );
    let stats = consumer.stats();
    let token = CancellationToken::new();
    let task = tokio::spawn(consumer.run(token.clone()));
    wait_stats(&stats, |s| s.processed == 1 && s.parked == 1).await;
    token.cancel();
    task.await.unwrap().unwrap();

    assert_eq!(stats.snapshot().failed_attempts, 3);
    let parked: (String, String, i32, Value) = sqlx::query_as(
        "SELECT event_id, last_error, attempts, envelope FROM consumer_parked_events WHERE consumer = $1",
    )
    .bind(&name)
    .fetch_one(env.admin())
    .await
    .unwrap();
    assert_eq!(parked.0, bad);
    assert_eq!(parked.1, "handler: poison pill");
    assert_eq!(parked.2, 3);
    assert_eq!(parked.3["data"]["email"], "poison@example.com");
    let processed: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM processed_event_ids WHERE consumer = $1")
            .bind(&name)
            .fetch_all(env.admin())
            .await
            .unwrap();
    assert_eq!(
        processed,
        vec![good.clone()],
        "a parked event is not marked processed"
    );
    assert_eq!(side_effects(&pool, &bad).await, 0);
    assert_eq!(side_effects(&pool, &good).await, 1);
    env.drop_role(&role).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_replayed_from_the_dlq_a_day_later_is_skipped() {
    outbox_relay::metrics_handle().unwrap();
    let env = TestEnv::new().await;
    let name = format!("crm-{}", unique());
    let (role, pool) = env.consumer_role(&name).await;
    side_effect_table(&env, &role).await;
    let id = env
        .insert(
            "money.wallet.credited",
            example_payload("money.wallet.credited"),
        )
        .await;
    let relay = env.relay().await;
    env.drain(&relay).await;

    let manifest = Manifest::parse("module.manifest.json", MANIFEST).unwrap();
    let mut consumer = Consumer::new(
        &manifest,
        env.catalog.clone(),
        pool.clone(),
        settings(&env, &name),
    )
    .unwrap();
    record(
        &mut consumer,
        "money.wallet.credited",
        Arc::default(),
        never(),
    );
    let stats = consumer.stats();
    let token = CancellationToken::new();
    let task = tokio::spawn(consumer.run(token.clone()));
    wait_stats(&stats, |s| s.processed == 1).await;

    // A day later: the dedupe row is 25 hours old (past any TTL cache) and
    // the same event comes back from the DLQ, as when Kafka had stored it
    // but its acknowledgement was lost until the relay gave up. Fixtures:
    // no role may backdate a dedupe row or write a DLQ entry with a
    // made-up history, so the superuser fakes the day that passed.
    sqlx::query(
        "UPDATE processed_event_ids SET processed_at = now() - interval '25 hours' \
         WHERE consumer = $1 AND event_id = $2",
    )
    .bind(&name)
    .bind(&id)
    .execute(env.fixtures())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox_dlq (event_id, outbox_id, event_type, payload, occurred_at, publisher, \
                                 reason, last_error, attempts, first_failed_at, dead_lettered_at) \
         VALUES ($1, 1, 'money.wallet.credited', $2, now() - interval '26 hours', 'money', \
                 'retries_exhausted', 'after 12 attempts: Message timed out', 12, \
                 now() - interval '26 hours', now() - interval '25 hours')",
    )
    .bind(&id)
    .bind(example_payload("money.wallet.credited"))
    .execute(env.fixtures())
    .await
    .unwrap();
    // The admin replays it.
    let replayed: bool = sqlx::query_scalar("SELECT outbox_dlq_replay_event($1)")
        .bind(&id)
        .fetch_one(env.admin())
        .await
        .unwrap();
    assert!(replayed);
    env.drain(&relay).await;

    wait_stats(&stats, |s| s.duplicates == 1).await;
    token.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(stats.snapshot().processed, 1);
    assert_eq!(
        side_effects(&pool, &id).await,
        1,
        "the handler did not run again"
    );
    let age_hours: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - processed_at)::float8 / 3600 FROM processed_event_ids \
         WHERE consumer = $1 AND event_id = $2",
    )
    .bind(&name)
    .bind(&id)
    .fetch_one(env.admin())
    .await
    .unwrap();
    assert!(
        age_hours > 24.9,
        "the dedupe row is the original one: {age_hours}"
    );
    assert_eq!(
        metric(
            "outbox_consumer_events_total",
            &name,
            "money.wallet.credited",
            "duplicate"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn subscribing_to_an_event_the_manifest_does_not_declare_is_403() {
    let env_catalog = Arc::new(outbox_relay::catalog::Catalog::load(&[catalog_dir()]).unwrap());
    let manifest = Manifest::parse(
        "crm/module.manifest.json",
        r#"{"name": "@acme/crm", "events": {"subscribes": ["auth.user.created"]}}"#,
    )
    .unwrap();
    // Never connected: building and subscribing touch no database.
    let pool = sqlx::PgPool::connect_lazy(&unconnected_consumer_url()).unwrap();
    let kafka = outbox_relay::config::Settings::default().kafka;
    let mut consumer = Consumer::new(
        &manifest,
        env_catalog,
        pool,
        ConsumerSettings::new("crm", kafka),
    )
    .unwrap();
    let err = consumer
        .subscribe("money.wallet.credited", |_, _| Box::pin(async { Ok(()) }))
        .err()
        .unwrap();
    assert!(matches!(err, ConsumerError::Forbidden { .. }), "{err:?}");
    assert_eq!(err.status(), Some(403));
    assert_eq!(
        err.to_string(),
        "403 Forbidden: module @acme/crm may not subscribe to money.wallet.credited: \
         it is not declared in events.subscribes[] of crm/module.manifest.json"
    );
    consumer
        .subscribe("auth.user.created", |_, _| Box::pin(async { Ok(()) }))
        .unwrap();
    assert_eq!(consumer.topics(), vec!["platform.auth.events".to_string()]);
}

#[test]
fn an_unknown_manifest_entry_fails_start_up() {
    let catalog = Arc::new(outbox_relay::catalog::Catalog::load(&[catalog_dir()]).unwrap());
    let manifest = Manifest::parse(
        "crm/module.manifest.json",
        r#"{"name": "@acme/crm", "events": {"subscribes": ["auth.user.created", "money.wallet.refunded"]}}"#,
    )
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    // Never connected: the manifest is checked before any database use.
    let pool = sqlx::PgPool::connect_lazy(&unconnected_consumer_url()).unwrap();
    let kafka = outbox_relay::config::Settings::default().kafka;
    let err = Consumer::new(
        &manifest,
        catalog,
        pool,
        ConsumerSettings::new("crm", kafka),
    )
    .err()
    .unwrap();
    assert_eq!(
        err.to_string(),
        "manifest crm/module.manifest.json: events.subscribes[1]: unknown event type \
         `money.wallet.refunded`: not in the event catalog"
    );
}

/// The example consumer binary, built once per test run (a plain
/// `cargo test --test it consumer::` does not build examples).
fn example_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // target/<profile>/deps/<test> → target/<profile>/examples/consumer
            let exe = std::env::current_exe().unwrap();
            let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .args(["build", "--quiet", "--example", "consumer"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            let status = build
                .status()
                .expect("running cargo build --example consumer");
            assert!(status.success(), "building the example consumer failed");
            profile_dir.join("examples/consumer")
        })
        .clone()
}

/// The example consumer as the login role of `url`.
fn example(
    env: &TestEnv,
    url: &str,
    name: &str,
    manifest: &std::path::Path,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(example_binary());
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", url)
        .env("KAFKA_BROKERS", &env.settings.kafka.brokers)
        .env("KAFKA_TOPIC_PREFIX", &env.prefix)
        .env("RUST_LOG", "info")
        .arg("--manifest")
        .arg(manifest)
        .arg("--catalog")
        .arg(catalog_dir())
        .args([
            "--name",
            name,
            "--kafka-property",
            "session.timeout.ms=6000",
        ])
        .args(extra)
        .stdin(Stdio::null());
    cmd
}

fn example_manifest() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/module.manifest.json"
    ))
}

/// Committed offsets of `group` on the partitions of `topic`.
async fn committed(group: &str, topic: &str, partitions: i32) -> Vec<Offset> {
    let (group, topic) = (group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        c.committed_offsets(tpl, Duration::from_secs(10))
            .unwrap()
            .elements()
            .iter()
            .map(|e| e.offset())
            .collect()
    })
    .await
    .unwrap()
}

/// The example module's rows for `event_id`, read by the module's role.
async fn activity(pool: &PgPool, event_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM crm_activity WHERE event_id = $1")
        .bind(event_id)
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// The example module's table, as `examples/consumer.rs` would create it.
/// Fixture: the module's schema owner (the superuser here) creates it and
/// grants it to the module's consumer roles, which may not create tables.
async fn crm_activity_table(env: &TestEnv, roles: &[&str]) {
    sqlx::query(
        "CREATE TABLE crm_activity (\
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
             event_id text NOT NULL, \
             event_type text NOT NULL, \
             user_id text NOT NULL, \
             detail text NOT NULL, \
             recorded_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(env.fixtures())
    .await
    .unwrap();
    for role in roles {
        sqlx::query(&format!("GRANT SELECT, INSERT ON crm_activity TO {role}"))
            .execute(env.fixtures())
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_db_commit_and_offset_commit_the_example_consumer_has_exactly_one_effect() {
    let env = TestEnv::new().await;
    let first = env
        .insert("auth.user.created", example_payload("auth.user.created"))
        .await;
    let relay = env.relay().await;
    env.drain(&relay).await;
    let name = format!("crm-{}", unique());
    let topic = env.topic("platform.auth.events");
    // Both runs of the consumer use the role mapped to its name.
    let (role, pool) = env.consumer_role(&name).await;
    crm_activity_table(&env, &[&role]).await;
    let url = env.url_as(&role);

    let mut crashing = example(
        &env,
        &url,
        &name,
        &example_manifest(),
        &["--hang-after-db-commit"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let stdout = crashing.stdout.take().unwrap();
    let line = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line
        }),
    )
    .await
    .expect("the consumer reached its database commit")
    .unwrap();
    assert_eq!(line.trim(), format!("db-committed {first}"));

    // Exactly at the crash point: the effect and the dedupe row are
    // committed, the offset is not.
    assert_eq!(activity(&pool, &first).await, 1);
    assert_eq!(
        committed(&name, &topic, 3).await,
        vec![Offset::Invalid; 3],
        "no offset committed before the crash"
    );
    kill(Pid::from_raw(crashing.id() as i32), Signal::SIGKILL).unwrap();
    crashing.wait().unwrap();

    let mut restarted = example(&env, &url, &name, &example_manifest(), &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logs = collect_stderr(&mut restarted);
    let redelivered_and_skipped = eventually(Duration::from_secs(60), || {
        let logs = logs.clone();
        let first = first.clone();
        async move {
            logs.lock().unwrap().lines().any(|l| {
                serde_json::from_str::<Value>(l)
                    .is_ok_and(|v| v["outcome"] == "duplicate" && v["event_id"] == first.as_str())
            })
        }
    })
    .await;
    assert!(
        redelivered_and_skipped,
        "the restarted consumer got the event again and skipped it:\n{}",
        logs.lock().unwrap()
    );
    // It is live past the duplicate.
    let second = env
        .insert("auth.user.created", example_payload("auth.user.created"))
        .await;
    env.drain(&relay).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            activity(&pool, &second).await == 1
        })
        .await,
        "the next event is processed"
    );
    assert_eq!(activity(&pool, &first).await, 1, "exactly one effect");
    assert!(
        eventually(Duration::from_secs(15), || async {
            committed(&name, &topic, 3)
                .await
                .iter()
                .filter(|o| matches!(o, Offset::Offset(_)))
                .count()
                >= 1
        })
        .await,
        "offsets are committed after processing"
    );

    kill(Pid::from_raw(restarted.id() as i32), Signal::SIGTERM).unwrap();
    let status = restarted.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_consumer_refuses_to_start_on_403_or_an_unknown_manifest_entry() {
    let env = TestEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            r#"{"name": "@acme/crm", "events": {"subscribes": ["auth.user.created"]}}"#,
            "403 Forbidden: module @acme/crm may not subscribe to money.wallet.credited",
        ),
        (
            r#"{"name": "@acme/crm", "events": {"subscribes": ["auth.user.created", "money.wallet.refunded"]}}"#,
            "events.subscribes[1]: unknown event type `money.wallet.refunded`: not in the event catalog",
        ),
    ];
    // One consumer name, one mapped role each; the module's table exists,
    // so only the manifest can stop them.
    let names: Vec<String> = (0..cases.len())
        .map(|_| format!("crm-{}", unique()))
        .collect();
    let mut roles = Vec::new();
    for name in &names {
        roles.push(env.consumer_role(name).await.0);
    }
    crm_activity_table(&env, &roles.iter().map(String::as_str).collect::<Vec<_>>()).await;
    for (i, (manifest, expected)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("manifest-{i}.json"));
        std::fs::write(&path, manifest).unwrap();
        let out = example(&env, &env.url_as(&roles[i]), &names[i], &path, &[])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{expected} in {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_produced_around_the_relay_are_never_handled() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let env = TestEnv::new().await;
    let name = format!("crm-{}", unique());
    let (role, pool) = env.consumer_role(&name).await;
    side_effect_table(&env, &role).await;
    let topic = env.topic("platform.money.events");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let forged = outbox_relay::writer::new_event_id();
    let envelope = json!({"id": forged, "type": "money.wallet.credited", "source": "@acme/crm",
        "schemaVersion": "1.0.0", "tenantId": null, "occurredAt": "2026-11-29T10:00:00.000Z",
        "data": example_payload("money.wallet.credited")})
    .to_string();
    for payload in [envelope.as_str(), "not an envelope"] {
        producer
            .send(
                FutureRecord::<str, str>::to(&topic)
                    .key("k")
                    .payload(payload),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let legit = env
        .insert(
            "money.wallet.credited",
            example_payload("money.wallet.credited"),
        )
        .await;
    env.drain(&env.relay().await).await;

    let manifest = Manifest::parse("module.manifest.json", MANIFEST).unwrap();
    let mut consumer = Consumer::new(
        &manifest,
        env.catalog.clone(),
        pool.clone(),
        settings(&env, &name),
    )
    .unwrap();
    record(
        &mut consumer,
        "money.wallet.credited",
        Arc::default(),
        never(),
    );
    let stats = consumer.stats();
    let token = CancellationToken::new();
    let task = tokio::spawn(consumer.run(token.clone()));
    wait_stats(&stats, |s| {
        s.processed == 1 && s.forbidden_source == 1 && s.invalid == 1
    })
    .await;
    token.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(side_effects(&pool, &forged).await, 0);
    assert_eq!(side_effects(&pool, &legit).await, 1);
    let processed: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM processed_event_ids WHERE consumer = $1")
            .bind(&name)
            .fetch_all(env.admin())
            .await
            .unwrap();
    assert_eq!(processed, vec![legit]);
}

/// The start-up error of a kit on `pool` as consumer `name`, or `None` when
/// it started (it then stops at once: its token is already cancelled).
async fn start_up_error(env: &TestEnv, pool: PgPool, name: &str) -> Option<ConsumerError> {
    let manifest = Manifest::parse("module.manifest.json", MANIFEST).unwrap();
    let mut consumer =
        Consumer::new(&manifest, env.catalog.clone(), pool, settings(env, name)).unwrap();
    consumer
        .subscribe("auth.user.created", |_, _| Box::pin(async { Ok(()) }))
        .unwrap();
    let token = CancellationToken::new();
    token.cancel();
    tokio::time::timeout(Duration::from_secs(60), consumer.run(token))
        .await
        .expect("the kit neither failed nor stopped")
        .err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_role_not_mapped_to_the_name_fails_start_up_naming_the_mapping() {
    let env = TestEnv::new().await;
    let name = format!("crm-{}", unique());

    // A role in outbox_consumer that no admin mapped to this name.
    let role = env.login_role("c", &["outbox_consumer"]).await;
    let pool = env.pool_as(&role).await;
    let err = start_up_error(&env, pool.clone(), &name)
        .await
        .expect("an unmapped role started");
    assert!(matches!(err, ConsumerError::Schema(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "dedupe table: role {role} is not mapped to consumer {name}, so it may not read or write \
             that consumer's dedupe and parked rows; an admin runs SELECT outbox_map_consumer('{role}', '{name}')"
        )
    );
    // Mapped to another consumer's name: still not this one's.
    let other = format!("billing-{}", unique());
    sqlx::query("SELECT outbox_map_consumer($1, $2)")
        .bind(&role)
        .bind(&other)
        .execute(env.admin())
        .await
        .unwrap();
    let err = start_up_error(&env, pool.clone(), &name)
        .await
        .expect("a role mapped to another name started");
    assert!(
        err.to_string()
            .contains(&format!("outbox_map_consumer('{role}', '{name}')")),
        "{err}"
    );
    // What the message says to run is enough.
    sqlx::query(&format!("SELECT outbox_map_consumer('{role}', '{name}')"))
        .execute(env.admin())
        .await
        .unwrap();
    let started = start_up_error(&env, pool, &name).await;
    assert!(started.is_none(), "{started:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_outside_outbox_consumer_fails_start_up_naming_the_grant() {
    let env = TestEnv::new().await;
    let name = format!("crm-{}", unique());
    let bare = env.login_role("c", &[]).await;
    let err = start_up_error(&env, env.pool_as(&bare).await, &name)
        .await
        .expect("a role without grants started");
    assert!(matches!(err, ConsumerError::Schema(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "dedupe table: role {bare} may not insert into processed_event_ids; \
             GRANT outbox_consumer TO it (consumer {name})"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_without_the_dedupe_table_fails_start_up() {
    let env = TestEnv::new().await;
    let name = format!("crm-{}", unique());
    let (_, mapped) = env.consumer_role(&name).await;
    // A database migrated without the dedupe table. Fixture: only the
    // owner may drop the table.
    sqlx::query("DROP TABLE processed_event_ids")
        .execute(env.fixtures())
        .await
        .unwrap();
    let err = start_up_error(&env, mapped, &name)
        .await
        .expect("started without a dedupe table");
    assert!(matches!(err, ConsumerError::Schema(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "dedupe table: table processed_event_ids does not exist in this database; \
         run `outbox-relay migrate` against it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_the_migrations_never_ran_on_fails_start_up() {
    let env = TestEnv::new().await;
    let name = format!("crm-{}", unique());
    let (role, _) = env.consumer_role(&name).await;
    // Fixture: an empty database next to the test's (named so that
    // scripts/sweep.sh drops it if this test does not get to).
    let empty = format!("t_{}", unique());
    let server = sqlx::PgPool::connect(&server_superuser_url())
        .await
        .unwrap();
    sqlx::query(&format!("CREATE DATABASE {empty}"))
        .execute(&server)
        .await
        .unwrap();
    let pool = PgPool::connect(&with_database(&env.url_as(&role), &empty))
        .await
        .unwrap();
    let err = start_up_error(&env, pool.clone(), &name).await;
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE {empty} WITH (FORCE)"))
        .execute(&server)
        .await
        .unwrap();
    let err = err.expect("started on an empty database");
    assert!(matches!(err, ConsumerError::Schema(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "dedupe table: table processed_event_ids does not exist in this database; \
         run `outbox-relay migrate` against it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_is_parked_and_counted_invalid_before_its_offset_moves() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    outbox_relay::metrics_handle().unwrap();
    let env = TestEnv::new().await;
    let name = format!("crm-{}", unique());
    let (role, pool) = env.consumer_role(&name).await;
    side_effect_table(&env, &role).await;
    let topic = env.topic("platform.auth.events");

    // Two messages on a subscribed topic that no envelope decoder accepts,
    // written around the relay into the partition where the relay will then
    // put a good event (its key is the catalog's partition key, userId).
    let payload = example_payload("auth.user.created");
    let key = payload["userId"].as_str().unwrap().to_string();
    let partition = java_partition(key.as_bytes(), 3);
    let mut data = String::from("1");
    for _ in 0..200 {
        data = format!("{{\"a\":{data}}}");
    }
    let deep = format!(
        "{{\"id\":\"{}\",\"type\":\"auth.user.created\",\"source\":\"iam\",\"schemaVersion\":\"1.0.0\",\
         \"tenantId\":null,\"occurredAt\":\"2026-11-29T10:00:00.000Z\",\"data\":{data}}}",
        outbox_relay::writer::new_event_id()
    );
    assert!(
        serde_json::from_str::<Value>(&deep).is_err(),
        "too deep for the kit"
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let mut raw = Vec::new();
    for text in ["not json", deep.as_str()] {
        let delivered = producer
            .send(
                FutureRecord::<str, str>::to(&topic)
                    .partition(partition)
                    .key(&key)
                    .payload(text),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(delivered.partition, partition);
        raw.push((text.to_string(), delivered.offset));
    }
    let good = env.insert("auth.user.created", payload).await;
    env.drain(&env.relay().await).await;

    // Fixture: a stalled database, where the kit's park waits. Only the
    // superuser may lock the table against the consumer's insert.
    let mut stall = env.fixtures().begin().await.unwrap();
    sqlx::query("LOCK TABLE consumer_parked_events IN SHARE MODE")
        .execute(&mut *stall)
        .await
        .unwrap();

    let manifest = Manifest::parse("module.manifest.json", MANIFEST).unwrap();
    let mut consumer = Consumer::new(
        &manifest,
        env.catalog.clone(),
        pool.clone(),
        settings(&env, &name),
    )
    .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    record(&mut consumer, "auth.user.created", seen.clone(), never());
    let stats = consumer.stats();
    let token = CancellationToken::new();
    let task = tokio::spawn(consumer.run(token.clone()));

    // The kit reached the first message and waits to park it: nothing is
    // counted, handled or committed meanwhile.
    let waiting = eventually(Duration::from_secs(45), || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks WHERE NOT granted \
              AND relation = 'consumer_parked_events'::regclass",
        )
        .fetch_one(env.admin())
        .await
        .unwrap()
            >= 1
    })
    .await;
    assert!(
        waiting,
        "the kit never tried to park: {:?}",
        stats.snapshot()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(stats.snapshot(), StatsSnapshot::default());
    assert_eq!(
        committed(&name, &topic, 3).await[partition as usize],
        Offset::Invalid,
        "no offset committed before the message is parked"
    );
    stall.rollback().await.unwrap();

    wait_stats(&stats, |s| s.invalid == 2 && s.processed == 1).await;
    let expected_offset = {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let e = &seen[0];
        assert_eq!(e.id, good);
        assert_eq!(
            e.delivery.partition, partition,
            "the good event follows them"
        );
        assert!(e.delivery.offset > raw[1].1);
        e.delivery.offset + 1
    };
    assert!(
        eventually(Duration::from_secs(15), || async {
            committed(&name, &topic, 3).await[partition as usize] == Offset::Offset(expected_offset)
        })
        .await,
        "the committed offset moved past both messages and the good event: {:?}",
        committed(&name, &topic, 3).await
    );
    token.cancel();
    task.await.unwrap().unwrap();

    let snapshot = stats.snapshot();
    assert_eq!((snapshot.parked, snapshot.skipped), (0, 0), "{snapshot:?}");
    assert_eq!(
        metric(
            "outbox_consumer_events_total",
            &name,
            "(invalid)",
            "invalid"
        ),
        Some(2.0)
    );
    // The admin reads what was parked: each message's text, intact, under
    // its Kafka position.
    // event_id, event_type, topic, partition, offset, envelope, last_error, attempts
    type Parked = (String, String, String, i32, i64, Value, String, i32);
    let parked: Vec<Parked> = sqlx::query_as(
        "SELECT event_id, event_type, topic, \"partition\", \"offset\", envelope, last_error, attempts \
           FROM consumer_parked_events WHERE consumer = $1 ORDER BY \"offset\"",
    )
    .bind(&name)
    .fetch_all(env.admin())
    .await
    .unwrap();
    assert_eq!(parked.len(), 2, "{parked:?}");
    for (row, (text, offset)) in parked.iter().zip(&raw) {
        assert_eq!(row.0, format!("undecodable:{topic}:{partition}:{offset}"));
        assert_eq!(row.1, "(undecodable)");
        assert_eq!(
            (row.2.as_str(), row.3, row.4),
            (topic.as_str(), partition, *offset)
        );
        assert_eq!(row.5, Value::String(text.clone()));
        assert!(
            row.6.starts_with("not a decodable event envelope: "),
            "{}",
            row.6
        );
        assert_eq!(row.7, 1);
    }
    assert!(parked[1].6.contains("recursion limit"), "{}", parked[1].6);
    // The deep one is valid JSON all the same: Postgres reads it back.
    let depth_ok: bool = sqlx::query_scalar(
        "SELECT jsonb_typeof((envelope #>> '{}')::jsonb) = 'object' \
           FROM consumer_parked_events WHERE consumer = $1 AND \"offset\" = $2",
    )
    .bind(&name)
    .bind(raw[1].1)
    .fetch_one(env.admin())
    .await
    .unwrap();
    assert!(depth_ok);
    let processed: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM processed_event_ids WHERE consumer = $1")
            .bind(&name)
            .fetch_all(env.admin())
            .await
            .unwrap();
    assert_eq!(
        processed,
        vec![good.clone()],
        "a parked message is not processed"
    );
    assert_eq!(side_effects(&pool, &good).await, 1);
}

/// A consumer login role's URL on the local server, for pools that are never
/// connected (the kit checks a manifest before it uses its database).
fn unconnected_consumer_url() -> String {
    with_user(&server_superuser_url(), "crm_consumer")
}
