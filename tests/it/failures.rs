//! Failure handling against real Postgres and the real local Kafka broker:
//! every dead-letter reason, poison-row isolation, transient failures that
//! must never reach the DLQ, retry scheduling, and DLQ administration (SQL
//! functions and the `outbox-relay dlq` CLI).
//!
//! Every role acts as deployed: events are written by the writer role of
//! their publisher, relays run as the relay role, DLQ administration and
//! reading state back are the admin role's. The superuser only sets up
//! fixtures no deployed role can (see `Row::forge`), each with its reason.
//!
//! librdkafka's mock cluster stands in for Kafka only where a single real
//! broker cannot be made to return the error: a topic authorization failure
//! and an error of unknown class.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use chrono::{DateTime, Utc};
use outbox_relay::catalog::Catalog;
use outbox_relay::failure::{self, DbClass};
use outbox_relay::relay::{BatchReport, Outcome};
use outbox_relay::{sql, topics};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

// ------------------------------------------------------------------ helpers

/// One `outbox_dlq` row, every column a test checks.
#[derive(Debug, Clone, sqlx::FromRow)]
struct DlqRow {
    event_id: String,
    outbox_id: i64,
    event_type: String,
    tenant_id: Option<String>,
    payload: Value,
    headers: Option<Value>,
    occurred_at: DateTime<Utc>,
    publisher: Option<String>,
    reason: String,
    last_error: String,
    attempts: i32,
    first_failed_at: DateTime<Utc>,
    dead_lettered_at: DateTime<Utc>,
    state: String,
    replay_count: i32,
    last_replayed_at: Option<DateTime<Utc>>,
    discarded_by: Option<String>,
    discard_reason: Option<String>,
}

/// The DLQ as the admin role reads it.
async fn dlq(env: &TestEnv) -> BTreeMap<String, DlqRow> {
    sqlx::query_as::<_, DlqRow>(
        "SELECT event_id, outbox_id, event_type, tenant_id, payload, headers, occurred_at, publisher, \
                reason, last_error, attempts, first_failed_at, dead_lettered_at, state, replay_count, \
                last_replayed_at, discarded_by, discard_reason \
           FROM outbox_dlq",
    )
    .fetch_all(env.admin())
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.event_id.clone(), r))
    .collect()
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct PendingRow {
    id: i64,
    event_id: String,
    event_type: String,
    tenant_id: Option<String>,
    payload: Value,
    headers: Option<Value>,
    occurred_at: DateTime<Utc>,
    publisher: Option<String>,
    attempts: i32,
    unknown_failures: i32,
    last_error: Option<String>,
    first_failed_at: Option<DateTime<Utc>>,
    /// available_at - now(), in milliseconds.
    due_in_ms: f64,
}

/// The outbox as the admin role reads it.
async fn pending(env: &TestEnv) -> Vec<PendingRow> {
    sqlx::query_as::<_, PendingRow>(
        "SELECT id, event_id, event_type, tenant_id, payload, headers, occurred_at, publisher, attempts, \
                unknown_failures, last_error, first_failed_at, \
                (extract(epoch FROM available_at - now()) * 1000)::float8 AS due_in_ms \
           FROM outbox ORDER BY id",
    )
    .fetch_all(env.admin())
    .await
    .unwrap()
}

/// A row as a writer (or a bug) could leave it.
///
/// [`Row::insert`] writes it as the writer role of the event type's catalog
/// publisher, as a service does. [`Row::forge`] writes it as the superuser:
/// only for rows no deployed writer can leave any more, because the insert
/// trigger refuses them (a stated `publisher`, a non-object payload) or
/// because it is skipped (`bypass_trigger`: triggers off, the way a row of
/// a type that has since left the catalog, or one written by a tool that
/// skipped the publisher trigger, looks to the relay). The relay must still
/// handle such rows: they exist in databases written before the trigger
/// checked them, and a DLQ replay (the owner's path) re-inserts old entries
/// unchecked.
struct Row<'a> {
    event_type: &'a str,
    payload: Value,
    tenant_id: Option<&'a str>,
    headers: Option<Value>,
    publisher: Option<&'a str>,
    occurred_at: Option<&'a str>,
    bypass_trigger: bool,
}

impl<'a> Row<'a> {
    fn new(event_type: &'a str, payload: Value) -> Self {
        Row {
            event_type,
            payload,
            tenant_id: None,
            headers: None,
            publisher: None,
            occurred_at: None,
            bypass_trigger: false,
        }
    }

    /// Inserts as the writer of the type's catalog publisher. A writer may
    /// not read the outbox (no RETURNING), so the id is chosen here.
    async fn insert(self, env: &TestEnv) -> String {
        assert!(
            self.publisher.is_none() && !self.bypass_trigger,
            "a writer can neither state a publisher nor skip the trigger: use Row::forge"
        );
        let publisher = env
            .catalog
            .get(self.event_type)
            .unwrap_or_else(|| panic!("{} is not in the catalog", self.event_type))
            .publisher
            .clone();
        let writer = env.writer(&publisher).await;
        let id = outbox_relay::writer::new_event_id();
        sqlx::query(
            "INSERT INTO outbox (event_id, event_type, payload, tenant_id, headers, occurred_at) \
             VALUES ($1, $2, $3, $4, $5, coalesce($6::timestamptz, now()))",
        )
        .bind(&id)
        .bind(self.event_type)
        .bind(&self.payload)
        .bind(self.tenant_id)
        .bind(&self.headers)
        .bind(self.occurred_at)
        .execute(&writer)
        .await
        .unwrap();
        id
    }

    /// Inserts as the superuser: a fixture no deployed role can write (see
    /// the type's comment); each caller says why.
    async fn forge(self, env: &TestEnv) -> String {
        let mut tx = env.fixtures().begin().await.unwrap();
        if self.bypass_trigger {
            sqlx::query("SET LOCAL session_replication_role = replica")
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        let id = outbox_relay::writer::new_event_id();
        sqlx::query(
            "INSERT INTO outbox (event_id, event_type, payload, tenant_id, headers, publisher, occurred_at) \
             VALUES ($1, $2, $3, $4, $5, $6, coalesce($7::timestamptz, now()))",
        )
        .bind(&id)
        .bind(self.event_type)
        .bind(&self.payload)
        .bind(self.tenant_id)
        .bind(&self.headers)
        .bind(self.publisher)
        .bind(self.occurred_at)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        id
    }
}

fn credited(user: &str) -> Value {
    json!({"txId": format!("tx-{}", unique()), "userId": user, "amountCents": 100, "currency": "USD"})
}

fn without(mut v: Value, field: &str) -> Value {
    v.as_object_mut().unwrap().remove(field);
    v
}

fn with(mut v: Value, field: &str, value: Value) -> Value {
    v[field] = value;
    v
}

/// Incompressible text (base64 of xorshift output), so that lz4 cannot
/// shrink an oversize message under the broker's limit.
fn noise(len: usize) -> String {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            B64[(x >> 58) as usize] as char
        })
        .collect()
}

fn batch(claimed: usize, published: usize, dead_lettered: usize, retried: usize) -> Outcome {
    Outcome::Batch(BatchReport {
        claimed,
        published,
        dead_lettered,
        retried,
    })
}

/// Ids of received messages, in arrival order.
fn ids(got: &[Received]) -> Vec<String> {
    got.iter()
        .map(|m| m.value["id"].as_str().unwrap().to_string())
        .collect()
}

// ------------------------------------------------------------------ permanent failures

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_permanent_failure_is_dead_lettered_intact_with_reason_message_and_metric() {
    outbox_relay::metrics_handle().unwrap();
    let env = TestEnv::new().await;
    let source = env.settings.relay.source.clone();

    let first = env
        .insert("money.wallet.credited", credited("user-a"))
        .await;
    let mut expected: Vec<(String, &str, String)> = Vec::new();
    let mut expect = |id: String, reason: &'static str, msg: String| {
        expected.push((id, reason, msg));
    };

    let unknown_payload = json!({"refundId": "r-1", "userId": "user-a"});
    // Superuser fixture: the trigger refuses an unknown type from every
    // writer, so a pending row of one (no publisher stamped) exists only
    // with the trigger skipped.
    let unknown = Row {
        tenant_id: Some("tenant-9"),
        headers: Some(
            json!({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}),
        ),
        occurred_at: Some("2026-01-02T03:04:05.678901Z"),
        bypass_trigger: true,
        ..Row::new("money.wallet.refunded", unknown_payload.clone())
    }
    .forge(&env)
    .await;
    expect(
        unknown.clone(),
        "unknown_event_type",
        "event type money.wallet.refunded is not in the event catalog; declare it in a catalog file, then replay".into(),
    );
    // Superuser fixture: since 0007 the trigger refuses a non-object
    // payload from writers; rows written before that still reach the relay.
    expect(
        Row::new("money.wallet.credited", json!("just text"))
            .forge(&env)
            .await,
        "invalid_payload",
        "$: payload must be a JSON object, found string".into(),
    );
    expect(
        Row::new(
            "money.wallet.credited",
            without(credited("user-a"), "currency"),
        )
        .insert(&env)
        .await,
        "invalid_payload",
        "$.currency: required field missing (expected string)".into(),
    );
    expect(
        Row::new(
            "money.wallet.credited",
            with(credited("user-a"), "amountCents", json!("100")),
        )
        .insert(&env)
        .await,
        "invalid_payload",
        "$.amountCents: expected integer, found string".into(),
    );
    expect(
        Row::new(
            "money.wallet.credited",
            without(credited("user-a"), "userId"),
        )
        .insert(&env)
        .await,
        "missing_partition_key",
        "partition key $.userId is missing".into(),
    );
    expect(
        Row::new(
            "money.wallet.credited",
            with(credited("user-a"), "userId", json!(" ")),
        )
        .insert(&env)
        .await,
        "missing_partition_key",
        "partition key $.userId is empty".into(),
    );
    expect(
        Row::new(
            "money.wallet.credited",
            with(credited("user-a"), "userId", json!(1.5)),
        )
        .insert(&env)
        .await,
        "missing_partition_key",
        "partition key $.userId must be a non-empty string or integer, found non-integer number"
            .into(),
    );
    // Superuser fixture: a writer cannot state a publisher, and the trigger
    // refuses billing's writer for a money event; only the owner's path
    // (a replay of an entry older than a catalog change) leaves such a row.
    let forbidden = Row {
        publisher: Some("billing"),
        ..Row::new("money.wallet.credited", credited("user-a"))
    }
    .forge(&env)
    .await;
    expect(
        forbidden.clone(),
        "forbidden_publisher",
        "403 Forbidden: publisher billing may not publish money.wallet.credited (the catalog allows only money)".into(),
    );
    // Over the configured kafka.max_message_bytes (1 MB): rejected before producing.
    let oversize = Row::new(
        "money.wallet.credited",
        with(credited("user-a"), "memo", json!(noise(1_100_000))),
    )
    .insert(&env)
    .await;
    let last = env
        .insert("money.wallet.credited", credited("user-a"))
        .await;

    let relay = env.relay().await;
    assert_eq!(env.drain(&relay).await, vec![batch(11, 2, 9, 0)]);
    assert_eq!(env.outbox_count().await, 0);

    let dead = dlq(&env).await;
    for (id, reason, message) in &expected {
        let row = &dead[id];
        assert_eq!(
            (row.reason.as_str(), row.last_error.as_str()),
            (*reason, message.as_str()),
            "{id}"
        );
    }
    let big = &dead[&oversize];
    assert_eq!(big.reason, "message_too_large");
    assert!(
        // The payload alone is over the limit: refused before it is parsed.
        big.last_error.starts_with("the payload alone is 11")
            && big
                .last_error
                .ends_with(" bytes; the limit (kafka.max_message_bytes) is 1000000"),
        "{}",
        big.last_error
    );
    assert_eq!(dead.len(), expected.len() + 1);
    for row in dead.values() {
        assert_eq!(row.state, "dead");
        assert_eq!(row.attempts, 1, "one attempt: the envelope check");
        assert_eq!(row.replay_count, 0);
        assert_eq!(row.first_failed_at, row.dead_lettered_at);
    }
    // Everything the row had, kept.
    let u = &dead[&unknown];
    assert_eq!(u.event_type, "money.wallet.refunded");
    assert_eq!(u.payload, unknown_payload);
    assert_eq!(u.tenant_id.as_deref(), Some("tenant-9"));
    assert_eq!(
        u.headers,
        Some(json!({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}))
    );
    assert_eq!(
        u.occurred_at,
        "2026-01-02T03:04:05.678901Z"
            .parse::<DateTime<Utc>>()
            .unwrap()
    );
    assert_eq!(u.publisher, None);
    assert_eq!(dead[&forbidden].publisher.as_deref(), Some("billing"));
    let mut ordering: Vec<(i64, &str)> = dead
        .values()
        .map(|r| (r.outbox_id, r.event_id.as_str()))
        .collect();
    ordering.sort();
    assert!(ordering.windows(2).all(|w| w[0].0 < w[1].0));

    for (reason, n) in [
        ("unknown_event_type", 1.0),
        ("invalid_payload", 3.0),
        ("missing_partition_key", 3.0),
        ("forbidden_publisher", 1.0),
        ("message_too_large", 1.0),
        ("retries_exhausted", 0.0),
    ] {
        assert_eq!(
            counter(
                "outbox_events_dead_lettered_total",
                &source,
                "reason",
                reason
            ),
            n,
            "{reason}"
        );
    }

    let got = env
        .consume(
            &[env.topic("platform.money.events")],
            3,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(ids(&got), vec![first, last]);

    // A type still missing from the catalog cannot be replayed: the replay
    // skips it (tests/it/dlq.rs shows the reasons it reports) and changes nothing.
    let replayed: Vec<String> =
        sqlx::query_scalar("SELECT outbox_dlq_replay(p_reason => 'unknown_event_type')")
            .fetch_all(env.admin())
            .await
            .unwrap();
    assert!(replayed.is_empty(), "{replayed:?}");
    assert_eq!(dlq(&env).await[&unknown].state, "dead");
    assert_eq!(env.outbox_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_never_hold_back_their_batch_or_later_events_of_their_key() {
    let env = TestEnv::new().await;
    let keys = ["user-k1", "user-k2", "user-k3"];
    let mut good: HashMap<&str, Vec<String>> = HashMap::new();
    let mut poison = HashSet::new();
    for i in 0..30 {
        let key = keys[i % 3];
        if i % 4 == 1 {
            // Same key, broken payload: lands in the DLQ, the key moves on.
            poison.insert(
                Row::new("money.wallet.debited", without(credited(key), "txId"))
                    .insert(&env)
                    .await,
            );
        } else {
            good.entry(key)
                .or_default()
                .push(env.insert("money.wallet.debited", credited(key)).await);
        }
    }
    let relay = env.relay().await;
    assert_eq!(
        env.drain(&relay).await,
        vec![batch(30, 30 - poison.len(), poison.len(), 0)]
    );
    let dead = dlq(&env).await;
    assert_eq!(dead.keys().cloned().collect::<HashSet<_>>(), poison);
    assert!(dead.values().all(|r| r.reason == "invalid_payload"
        && r.last_error == "$.txId: required field missing (expected string)"));

    let got = env
        .consume(
            &[env.topic("platform.money.events")],
            30,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(got.len(), 30 - poison.len());
    for key in keys {
        let of_key: Vec<&Received> = got.iter().filter(|m| m.key == key).collect();
        assert_eq!(
            ids(&of_key.iter().map(|m| (*m).clone()).collect::<Vec<_>>()),
            good[key],
            "every good event of {key}, in order"
        );
        let partitions: HashSet<i32> = of_key.iter().map(|m| m.partition).collect();
        assert_eq!(partitions.len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_rejects_an_oversize_message_it_is_dead_lettered_and_its_key_moves_on() {
    outbox_relay::metrics_handle().unwrap();
    let env = TestEnv::new().await;
    // Above the broker's 1 MB message.max.bytes: the relay's own check lets
    // the message through, so the broker is the one to refuse it.
    let mut settings = env.settings.clone();
    settings.kafka.max_message_bytes = 4_000_000;
    let before = env
        .insert(
            "files.file.uploaded",
            example_payload("files.file.uploaded"),
        )
        .await;
    let big = Row::new(
        "files.file.uploaded",
        with(
            example_payload("files.file.uploaded"),
            "key",
            json!(noise(1_400_000)),
        ),
    )
    .insert(&env)
    .await;
    let after = env
        .insert(
            "files.file.uploaded",
            example_payload("files.file.uploaded"),
        )
        .await;

    let relay = env.relay_with(settings).await;
    assert_eq!(env.drain(&relay).await, vec![batch(3, 2, 1, 0)]);
    let dead = dlq(&env).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[&big].reason, "message_too_large");
    assert_eq!(
        dead[&big].last_error,
        "Message production error: MessageSizeTooLarge (Broker: Message size too large)"
    );
    assert_eq!(
        counter(
            "outbox_events_dead_lettered_total",
            &env.settings.relay.source,
            "reason",
            "message_too_large"
        ),
        1.0
    );
    let got = env
        .consume(
            &[env.topic("platform.files.events")],
            3,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(ids(&got), vec![before, after]);
}

// ------------------------------------------------------------------ transient failures

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_transient_however_often_it_fails_and_publishes_once_created() {
    outbox_relay::metrics_handle().unwrap();
    let env = TestEnv::new().await;
    // A prefix whose topics do not exist; the broker does not auto-create.
    let mut settings = env.settings.clone();
    settings.kafka.topic_prefix = format!("missing{}.", unique());
    settings.kafka.message_timeout_ms = 2_000;
    settings.relay.max_attempts = 1;
    settings.relay.retry_base_ms = 300;
    settings.relay.retry_max_ms = 600;
    let mut written = Vec::new();
    for user in ["user-1", "user-2", "user-1"] {
        written.push(
            env.insert(
                "auth.role.changed",
                with(example_payload("auth.role.changed"), "userId", json!(user)),
            )
            .await,
        );
    }
    let relay = env.relay_with(settings.clone()).await;
    for attempt in 1..=3 {
        let started = Instant::now();
        assert_eq!(step_when_due(&relay).await, batch(3, 0, 0, 3));
        assert!(started.elapsed() < Duration::from_secs(5));
        let delay_ms = [300.0, 600.0, 600.0][attempt as usize - 1];
        let rows = pending(&env).await;
        assert_eq!(
            rows.iter().map(|r| r.event_id.clone()).collect::<Vec<_>>(),
            written
        );
        for r in &rows {
            assert_eq!((r.attempts, r.unknown_failures), (attempt, 0));
            let err = r.last_error.as_deref().unwrap();
            assert!(
                err.contains("UnknownTopic") || err.contains("MessageTimedOut"),
                "{err}"
            );
            assert!(
                r.due_in_ms > 0.0 && r.due_in_ms <= delay_ms,
                "pushed into the future by at most {delay_ms} ms: {}",
                r.due_in_ms
            );
        }
        // One jitter per statement: rows that failed together come due together.
        assert_eq!(rows[0].due_in_ms, rows[2].due_in_ms);
    }
    assert_eq!(
        env.dlq_count().await,
        0,
        "max_attempts = 1 and still no DLQ"
    );
    assert!(
        counter(
            "outbox_publish_failures_total",
            &env.settings.relay.source,
            "reason",
            "unknown_topic"
        ) + counter(
            "outbox_publish_failures_total",
            &env.settings.relay.source,
            "reason",
            "timeout"
        ) == 9.0
    );

    topics::ensure(&settings, &env.catalog, false)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.outbox_count().await > 0 {
        assert!(Instant::now() < deadline, "published once the topic exists");
        relay.step().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = env
        .consume(
            &[format!(
                "{}platform.auth.events",
                settings.kafka.topic_prefix
            )],
            3,
            Duration::from_secs(10),
        )
        .await;
    let mut got_ids = ids(&got);
    got_ids.sort();
    let mut want = written.clone();
    want.sort();
    assert_eq!(got_ids, want);
    assert_eq!(env.dlq_count().await, 0);
}

/// Regression: the relay role lacked UPDATE on `unknown_failures`, so the
/// first transient publish failure made `outbox_schedule_retry` fail with
/// 42501 and the relay process stop. The real binary, as the relay role,
/// against topics that do not exist: every failed round reschedules the rows
/// (never the DLQ, even with max_attempts = 1), the process keeps running
/// and logs no permission error, and once pointed at the existing topics it
/// publishes every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_role_survives_transient_publish_failures_and_then_publishes_everything_once() {
    let env = TestEnv::new().await;
    // Written by the writer roles of two publishers, for two topics.
    let mut written = Vec::new();
    for user in ["user-1", "user-2", "user-1"] {
        written.push(
            env.insert(
                "auth.role.changed",
                with(example_payload("auth.role.changed"), "userId", json!(user)),
            )
            .await,
        );
        written.push(env.insert("money.wallet.credited", credited(user)).await);
    }

    // A prefix whose topics do not exist (the broker does not auto-create).
    let missing = format!("missing{}.", unique());
    let mut relay = env.spawn_process(&[
        ("OUTBOX_RELAY_KAFKA__TOPIC_PREFIX", &missing),
        ("OUTBOX_RELAY_KAFKA__MESSAGE_TIMEOUT_MS", "1500"),
        ("OUTBOX_RELAY_RELAY__MAX_ATTEMPTS", "1"),
        ("OUTBOX_RELAY_LOG__FORMAT", "json"),
    ]);
    let log = collect_stderr(&mut relay);
    let rounds = || async {
        sqlx::query_as::<_, (i64, Option<i32>)>("SELECT count(*), min(attempts) FROM outbox")
            .fetch_one(env.admin())
            .await
            .unwrap()
    };
    let expected = written.len() as i64;
    let retried = eventually(Duration::from_secs(60), || {
        let exited = relay.try_wait().unwrap();
        let log = log.clone();
        async move {
            assert!(
                exited.is_none(),
                "the relay stopped ({exited:?}):\n{}",
                log.lock().unwrap()
            );
            let (n, min) = rounds().await;
            assert_eq!(n, expected, "no row leaves the outbox");
            min.unwrap_or(0) >= 3
        }
    })
    .await;
    assert!(
        retried,
        "three failed rounds per row: {:?}\n{}",
        rounds().await,
        log.lock().unwrap()
    );
    assert!(
        relay.try_wait().unwrap().is_none(),
        "still running after three rounds of failures:\n{}",
        log.lock().unwrap()
    );
    // And still retrying: the rows keep coming due and failing.
    let (_, before) = rounds().await;
    let still = eventually(Duration::from_secs(30), || async {
        rounds().await.1 > before
    })
    .await;
    assert!(still, "another round after {before:?}");
    assert!(relay.try_wait().unwrap().is_none(), "still running");
    let rows = pending(&env).await;
    assert_eq!(
        rows.iter().map(|r| r.event_id.clone()).collect::<Vec<_>>(),
        written
    );
    for r in &rows {
        assert!(r.attempts >= 3, "{r:?}");
        assert_eq!(r.unknown_failures, 0, "a missing topic is transient: {r:?}");
        assert!(r.first_failed_at.is_some());
        let err = r.last_error.as_deref().unwrap();
        assert!(
            err.contains("UnknownTopic") || err.contains("MessageTimedOut"),
            "{err}"
        );
    }
    assert_eq!(
        env.dlq_count().await,
        0,
        "max_attempts = 1 and still no DLQ"
    );

    let (status, _) = relay.terminate();
    let stderr = log.lock().unwrap().clone();
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("publish failed; events stay in the outbox"),
        "{stderr}"
    );
    let lower = stderr.to_lowercase();
    assert!(
        !lower.contains("permission denied") && !lower.contains("42501"),
        "{stderr}"
    );

    // The same relay role, pointed at the existing topics.
    let mut relay = env.spawn_process(&[("OUTBOX_RELAY_LOG__FORMAT", "json")]);
    let log = collect_stderr(&mut relay);
    let drained = eventually(Duration::from_secs(30), || async {
        env.outbox_count().await == 0
    })
    .await;
    let (status, _) = relay.terminate();
    let stderr = log.lock().unwrap().clone();
    assert!(drained, "{stderr}");
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(
        !stderr.to_lowercase().contains("permission denied"),
        "{stderr}"
    );
    assert_eq!(env.dlq_count().await, 0);
    let got = env
        .consume(
            &[
                env.topic("platform.auth.events"),
                env.topic("platform.money.events"),
            ],
            written.len() + 1,
            Duration::from_secs(10),
        )
        .await;
    let mut got_ids = ids(&got);
    got_ids.sort();
    let mut want = written.clone();
    want.sort();
    assert_eq!(got_ids, want, "every event, exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_delay_is_exponential_capped_and_jittered_in_sql() {
    let env = TestEnv::new().await;
    // The relay's outbox_schedule_retry calls it; only the relay may.
    let relay_pool = env.relay_pool().await;
    // Equal jitter: [d/2, d] with d = min(cap, base * 2^(attempts-1)).
    let rows: Vec<(i32, f64, f64)> = sqlx::query_as(
        "SELECT a, extract(epoch FROM outbox_retry_delay(a, 500, 60000, 0.0))::float8, \
                   extract(epoch FROM outbox_retry_delay(a, 500, 60000, 1.0))::float8 \
           FROM generate_series(1, 12) AS a",
    )
    .fetch_all(&relay_pool)
    .await
    .unwrap();
    let expected = [
        0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0, 60.0,
    ];
    for ((a, lo, hi), d) in rows.iter().zip(expected) {
        assert_eq!((*lo, *hi), (d / 2.0, d), "attempt {a}");
    }
    let (lo, hi): (f64, f64) = sqlx::query_as(
        "SELECT min(s), max(s) FROM (SELECT extract(epoch FROM outbox_retry_delay(3, 500, 60000))::float8 AS s \
           FROM generate_series(1, 200)) t",
    )
    .fetch_one(&relay_pool)
    .await
    .unwrap();
    assert!(
        lo >= 1.0 && hi <= 2.0 && hi - lo > 0.2,
        "jittered: {lo}..{hi}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_unknown_class_failures_use_up_max_attempts() {
    let env = TestEnv::new().await;
    let transient = env
        .insert("auth.role.changed", example_payload("auth.role.changed"))
        .await;
    let unknown = env
        .insert("auth.role.changed", example_payload("auth.role.changed"))
        .await;
    let ids_of = |rows: &[PendingRow]| -> HashMap<String, i64> {
        rows.iter().map(|r| (r.event_id.clone(), r.id)).collect()
    };
    // The relay's settle path, as the relay role.
    let relay_pool = env.relay_pool().await;
    // Many transient failures, then unknown ones: only the unknown count.
    for round in 1..=5 {
        // The first failure moves the rows below the fresh ones (a new id).
        let by_id = ids_of(&pending(&env).await);
        let (t, u) = (by_id[&transient], by_id[&unknown]);
        let mut tx = relay_pool.begin().await.unwrap();
        let (ids, unknown_flags) = if round <= 3 {
            (vec![t, u], vec![false, false])
        } else {
            (vec![t, u], vec![false, true])
        };
        let errors = vec![format!("error {round}"); 2];
        let exhausted = sql::schedule_retry(&mut tx, &ids, &errors, &unknown_flags, 2, 10, 10)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            exhausted,
            if round == 5 { vec![u] } else { vec![] },
            "round {round}"
        );
    }
    let rows = pending(&env).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].event_id.as_str(),
            rows[0].attempts,
            rows[0].unknown_failures
        ),
        (transient.as_str(), 5, 0)
    );
    assert_eq!(rows[0].last_error.as_deref(), Some("error 5"));
    let dead = dlq(&env).await;
    let row = &dead[&unknown];
    assert_eq!(row.reason, "retries_exhausted");
    assert_eq!(row.attempts, 5);
    assert_eq!(
        row.last_error,
        "gave up after 5 attempts (2 failures of unknown class, relay.max_attempts = 2): error 5"
    );
    assert!(row.first_failed_at < row.dead_lettered_at);
}

/// Postgres answers that no retry fixes stop the relay; the rest are retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_postgres_errors_are_classified_retry_or_fatal() {
    let env = TestEnv::new().await;
    // The errors the relay's own connection gets.
    let relay_pool = env.relay_pool().await;
    let raise = |code: &'static str| {
        let pool = relay_pool.clone();
        async move {
            sqlx::query(&format!(
                "DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{code}'; END $$"
            ))
            .execute(&pool)
            .await
            .unwrap_err()
        }
    };
    for code in ["40001", "40P01", "57P01", "55P03", "53300"] {
        assert_eq!(
            failure::classify_db(&raise(code).await),
            DbClass::Retry,
            "{code}"
        );
    }
    let missing = sqlx::query("SELECT * FROM no_such_table")
        .execute(&relay_pool)
        .await
        .unwrap_err();
    assert_eq!(failure::classify_db(&missing), DbClass::Fatal);
    let refused = sql::connect(
        &with_user("postgres://127.0.0.1:1/postgres", &env.relay_role),
        2,
        Duration::from_secs(2),
    )
    .await
    .unwrap_err();
    assert_eq!(failure::classify_db(&refused), DbClass::Retry);
    let no_db = sql::connect(
        &with_database(&env.relay_url(), "no_such_database"),
        2,
        Duration::from_secs(2),
    )
    .await
    .unwrap_err();
    assert_eq!(failure::classify_db(&no_db), DbClass::Fatal);
}

/// A serialization failure, a deadlock and a connection killed while
/// committing a batch that Kafka already acknowledged (a deferred trigger
/// fires at commit): the relay loop backs off and tries again, nothing is
/// dead-lettered, and the event is re-delivered with the same envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_failures_while_settling_are_retried_and_redeliver_the_same_envelope() {
    outbox_relay::metrics_handle().unwrap();
    let env = TestEnv::new().await;
    // Superuser fixture: the injected faults (no deployed role may add a
    // trigger to the outbox). A sequence, not a table: its increments survive
    // the rollbacks. The trigger fires in the relay role's settling
    // transaction; SECURITY DEFINER lets it count on the fixture's own
    // sequence without granting the relay anything.
    sqlx::raw_sql(
        "CREATE SEQUENCE fault_seq; \
         CREATE FUNCTION fault() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ \
         DECLARE n bigint := nextval('fault_seq'); \
         BEGIN \
           IF n = 1 THEN RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; END IF; \
           IF n = 2 THEN RAISE EXCEPTION 'injected' USING ERRCODE = '40P01'; END IF; \
           IF n = 3 THEN PERFORM pg_terminate_backend(pg_backend_pid()); PERFORM pg_sleep(5); END IF; \
           RETURN NULL; \
         END $$; \
         CREATE CONSTRAINT TRIGGER fault AFTER DELETE ON outbox \
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fault();",
    )
    .execute(env.fixtures())
    .await
    .unwrap();
    let id = env
        .insert(
            "notify.notification.sent",
            example_payload("notify.notification.sent"),
        )
        .await;

    let relay = Arc::new(env.relay().await);
    let token = CancellationToken::new();
    let task = tokio::spawn({
        let (relay, token) = (relay.clone(), token.clone());
        async move { relay.run(token).await }
    });
    let drained = eventually(Duration::from_secs(30), || async {
        env.outbox_count().await == 0
    })
    .await;
    token.cancel();
    task.await.unwrap().unwrap();
    assert!(drained);
    // The fixture's sequence: only its owner reads it.
    let faults: i64 = sqlx::query_scalar("SELECT last_value FROM fault_seq")
        .fetch_one(env.fixtures())
        .await
        .unwrap();
    assert_eq!(faults, 4, "three failed settles, then the one that commits");
    assert_eq!(env.dlq_count().await, 0);
    assert_eq!(
        counter(
            "outbox_database_errors_total",
            &env.settings.relay.source,
            "source",
            &env.settings.relay.source
        ),
        3.0
    );

    let got = env
        .consume(
            &[env.topic("platform.notify.events")],
            5,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(ids(&got), vec![id.clone(); 4], "published once per attempt");
    assert!(got
        .windows(2)
        .all(|w| w[0].value == w[1].value && w[0].key == w[1].key && w[0].headers == w[1].headers));
}

// ------------------------------------------------------------------ mock cluster

/// A relay environment whose Kafka is librdkafka's mock cluster, with the
/// catalog's topics created on it.
async fn on_mock(
    mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    env: &TestEnv,
) -> outbox_relay::config::Settings {
    let mut settings = env.settings.clone();
    settings.kafka.brokers = mock.bootstrap_servers();
    settings.kafka.message_timeout_ms = 1_500;
    settings.relay.retry_base_ms = 10;
    settings.relay.retry_max_ms = 20;
    for topic in env.catalog.topics.keys() {
        mock.create_topic(&env.topic(topic), 3, 1).unwrap();
    }
    settings
}

async fn step_when_due(relay: &outbox_relay::relay::Relay) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = relay.step().await.unwrap();
        if o != Outcome::Empty || Instant::now() > deadline {
            return o;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_cluster_unknown_errors_are_retried_up_to_max_attempts_then_dead_lettered() {
    outbox_relay::metrics_handle().unwrap();
    let env = TestEnv::new().await;
    let mock = MockCluster::new(1).unwrap();
    let mut settings = on_mock(&mock, &env).await;
    settings.relay.max_attempts = 3;
    let relay = env.relay_with(settings).await;
    env.insert(
        "audit.record.created",
        example_payload("audit.record.created"),
    )
    .await;
    assert_eq!(step_when_due(&relay).await, batch(1, 1, 0, 0));

    let id = env
        .insert(
            "audit.record.created",
            example_payload("audit.record.created"),
        )
        .await;
    // First an outage (transient: does not count), then three errors of a
    // class the relay does not know.
    mock.broker_down(1).unwrap();
    assert_eq!(step_when_due(&relay).await, batch(1, 0, 0, 1));
    let rows = pending(&env).await;
    assert_eq!((rows[0].attempts, rows[0].unknown_failures), (1, 0));
    mock.broker_up(1).unwrap();
    // Armed only once the producer is connected again, so that each error
    // answers one attempt of the row.
    let producer = relay.producer();
    tokio::task::spawn_blocking(move || {
        while outbox_relay::publish::check_metadata(&producer, Duration::from_secs(1)).is_err() {}
    })
    .await
    .unwrap();
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_INVALID_RECORD; 3],
    );
    assert_eq!(step_when_due(&relay).await, batch(1, 0, 0, 1));
    assert_eq!(step_when_due(&relay).await, batch(1, 0, 0, 1));
    let rows = pending(&env).await;
    assert_eq!((rows[0].attempts, rows[0].unknown_failures), (3, 2));
    assert_eq!(step_when_due(&relay).await, batch(1, 0, 1, 0));
    let dead = dlq(&env).await;
    let row = &dead[&id];
    assert_eq!(row.reason, "retries_exhausted");
    assert_eq!(row.attempts, 4);
    assert_eq!(
        row.last_error,
        "gave up after 4 attempts (3 failures of unknown class, relay.max_attempts = 3): \
         Message production error: InvalidRecord (Broker: Broker failed to validate record)"
    );
    assert_eq!(
        counter(
            "outbox_events_dead_lettered_total",
            &env.settings.relay.source,
            "reason",
            "retries_exhausted"
        ),
        1.0
    );
    assert_eq!(
        counter(
            "outbox_publish_failures_total",
            &env.settings.relay.source,
            "reason",
            "unknown"
        ),
        3.0
    );
}

// ------------------------------------------------------------------ DLQ administration

/// A relay whose catalog lacks `billing.*`, as an older relay build would:
/// its billing events are dead-lettered as unknown_event_type, the kind of
/// failure an operator fixes and then replays.
async fn relay_without_billing(env: &TestEnv) -> outbox_relay::relay::Relay {
    let mut old: Catalog = (*env.catalog).clone();
    old.events.retain(|t, _| !t.starts_with("billing."));
    let producer = outbox_relay::publish::create_producer(&env.settings.kafka).unwrap();
    outbox_relay::relay::Relay::new(
        env.relay_pool().await,
        Arc::new(producer),
        Arc::new(old),
        Arc::new(env.settings.clone()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_one_event_by_id_republishes_it_with_the_same_id_and_occurred_at() {
    let env = TestEnv::new().await;
    let one = Row {
        tenant_id: Some("tenant-1"),
        headers: Some(json!({"correlationId": "corr-7"})),
        occurred_at: Some("2026-03-04T05:06:07.123Z"),
        ..Row::new(
            "billing.plan.changed",
            example_payload("billing.plan.changed"),
        )
    }
    .insert(&env)
    .await;
    let other = env
        .insert(
            "billing.plan.changed",
            example_payload("billing.plan.changed"),
        )
        .await;
    let old = relay_without_billing(&env).await;
    assert_eq!(env.drain(&old).await, vec![batch(2, 0, 2, 0)]);
    let before = dlq(&env).await;

    let replayed: bool = sqlx::query_scalar("SELECT outbox_dlq_replay_event($1)")
        .bind(&one)
        .fetch_one(env.admin())
        .await
        .unwrap();
    assert!(replayed);
    let rows = pending(&env).await;
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    let d = &before[&one];
    assert_eq!(r.event_id, one);
    assert!(r.id > d.outbox_id, "a new ordering id");
    assert_eq!(
        (
            &r.event_type,
            &r.tenant_id,
            &r.payload,
            &r.headers,
            r.occurred_at,
            &r.publisher
        ),
        (
            &d.event_type,
            &d.tenant_id,
            &d.payload,
            &d.headers,
            d.occurred_at,
            &d.publisher
        )
    );
    assert_eq!(
        (
            r.attempts,
            r.unknown_failures,
            r.last_error.as_deref(),
            r.first_failed_at
        ),
        (0, 0, None, None)
    );
    assert!(r.due_in_ms <= 0.0);
    let after = dlq(&env).await;
    assert_eq!(
        (after[&one].state.as_str(), after[&one].replay_count),
        ("replayed", 1)
    );
    assert!(after[&one].last_replayed_at.is_some());
    assert_eq!(after[&other].state, "dead");

    // The fixed relay (full catalog) publishes it.
    let relay = env.relay().await;
    assert_eq!(env.drain(&relay).await, vec![batch(1, 1, 0, 0)]);
    let got = env
        .consume(
            &[env.topic("platform.billing.events")],
            2,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(ids(&got), vec![one.clone()]);
    assert_eq!(got[0].value["occurredAt"], "2026-03-04T05:06:07.123Z");
    assert_eq!(got[0].value["tenantId"], "tenant-1");
    assert_eq!(got[0].value["correlationId"], "corr-7");
    assert_eq!(got[0].headers["ce_id"], one);

    let summary: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT reason, event_type, events FROM outbox_dlq_summary ORDER BY 1, 2")
            .fetch_all(env.admin())
            .await
            .unwrap();
    assert_eq!(
        summary,
        vec![(
            "unknown_event_type".to_string(),
            "billing.plan.changed".to_string(),
            1
        )]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_filter_moves_exactly_the_matching_events_in_their_original_order() {
    let env = TestEnv::new().await;
    let relay = env.relay().await;
    let missing_currency = |user: &str| without(credited(user), "currency");
    // Wave 1.
    let c1 = Row::new("money.wallet.credited", missing_currency("u1"))
        .insert(&env)
        .await;
    let d1 = Row::new("money.wallet.debited", missing_currency("u1"))
        .insert(&env)
        .await;
    let c2 = Row::new("money.wallet.credited", missing_currency("u2"))
        .insert(&env)
        .await;
    let k1 = Row::new("money.wallet.credited", without(credited("u1"), "userId"))
        .insert(&env)
        .await;
    // Superuser fixture: a row stamped with a publisher the catalog does not
    // allow, which no writer can leave (see Row).
    let f1 = Row {
        publisher: Some("billing"),
        ..Row::new("money.wallet.credited", credited("u3"))
    }
    .forge(&env)
    .await;
    assert_eq!(env.drain(&relay).await, vec![batch(5, 0, 5, 0)]);
    let between: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(env.admin())
        .await
        .unwrap();
    // Wave 2.
    let c3 = Row::new("money.wallet.credited", missing_currency("u4"))
        .insert(&env)
        .await;
    assert_eq!(env.drain(&relay).await, vec![batch(1, 0, 1, 0)]);

    let replay = |event_type: Option<&'static str>,
                  reason: Option<&'static str>,
                  from: Option<DateTime<Utc>>,
                  to: Option<DateTime<Utc>>| {
        let pool = env.admin().clone();
        async move {
            let mut ids: Vec<String> = sqlx::query_scalar(
                "SELECT outbox_dlq_replay(p_event_type => $1, p_reason => $2, p_from => $3, p_to => $4)",
            )
            .bind(event_type)
            .bind(reason)
            .bind(from)
            .bind(to)
            .fetch_all(&pool)
            .await
            .unwrap();
            ids.sort();
            ids
        }
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        replay(Some("money.wallet.debited"), None, None, None).await,
        vec![d1.clone()]
    );
    assert_eq!(
        replay(None, Some("missing_partition_key"), None, None).await,
        vec![k1.clone()]
    );
    assert_eq!(
        replay(
            Some("money.wallet.credited"),
            Some("invalid_payload"),
            None,
            Some(between)
        )
        .await,
        sorted(vec![c1.clone(), c2.clone()])
    );
    assert_eq!(
        replay(None, None, Some(between), None).await,
        vec![c3.clone()]
    );
    // A publisher the catalog does not allow is never replayed (the replay
    // reports it as publisher_not_allowed; tests/it/dlq.rs reads the report).
    assert_eq!(
        replay(None, Some("forbidden_publisher"), None, None).await,
        Vec::<String>::new()
    );
    // In the outbox again in their original order (new ordering ids follow the old ones).
    let dead = dlq(&env).await;
    let back: Vec<String> = pending(&env)
        .await
        .into_iter()
        .map(|r| r.event_id)
        .collect();
    let replay_order = vec![d1.clone(), k1.clone(), c1.clone(), c2.clone(), c3.clone()];
    assert_eq!(
        back, replay_order,
        "one call after another, each in original order"
    );

    // Unfixed, they fail again: same DLQ entries, dead again, history kept.
    assert_eq!(env.drain(&relay).await, vec![batch(5, 0, 5, 0)]);
    let again = dlq(&env).await;
    assert_eq!(again.len(), 6);
    for (id, old) in dead.iter().filter(|(id, _)| **id != f1) {
        let new = &again[id];
        assert_eq!(new.state, "dead");
        assert_eq!(new.replay_count, 1);
        assert_eq!(new.reason, old.reason);
        assert_eq!(
            new.first_failed_at, old.first_failed_at,
            "first failure kept"
        );
        assert!(new.dead_lettered_at > old.dead_lettered_at);
        assert!(new.outbox_id > old.outbox_id);
    }
    assert_eq!(
        again[&f1].publisher.as_deref(),
        Some("billing"),
        "a replay cannot launder a publisher"
    );
    assert_eq!(again[&f1].state, "dead");
    assert_eq!(again[&f1].replay_count, 0);
    assert_eq!(again[&f1].dead_lettered_at, dead[&f1].dead_lettered_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_twice_never_yields_two_outbox_rows() {
    let env = TestEnv::new().await;
    let id = env
        .insert(
            "billing.plan.changed",
            example_payload("billing.plan.changed"),
        )
        .await;
    let other = env
        .insert(
            "billing.plan.changed",
            example_payload("billing.plan.changed"),
        )
        .await;
    let old = relay_without_billing(&env).await;
    env.drain(&old).await;
    assert_eq!(env.dlq_count().await, 2);
    let replay_one = |id: String| {
        let pool = env.admin().clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT outbox_dlq_replay_event($1)")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    // Twice in a row.
    assert!(replay_one(id.clone()).await);
    assert!(!replay_one(id.clone()).await);
    assert_eq!(env.outbox_count().await, 1);

    // Concurrently: the second waits for the first's lock, then finds
    // nothing left to replay. Two admin sessions, the first on its own pool.
    let first_admin = env.pool_as(&env.admin_role).await;
    let mut a = first_admin.begin().await.unwrap();
    let first: Vec<String> = sqlx::query_scalar("SELECT outbox_dlq_replay(p_event_id => $1)")
        .bind(&other)
        .fetch_all(&mut *a)
        .await
        .unwrap();
    let second = tokio::spawn(replay_one(other.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "waits on the DLQ row lock");
    a.commit().await.unwrap();
    assert!(!second.await.unwrap());
    assert_eq!(first, vec![other.clone()]);
    assert_eq!(env.outbox_count().await, 2);

    // Published, then replayed again: still not replayable (not dead).
    let relay = env.relay().await;
    assert_eq!(env.drain(&relay).await, vec![batch(2, 2, 0, 0)]);
    assert!(!replay_one(id.clone()).await);
    assert_eq!(env.outbox_count().await, 0);

    // A dead entry whose id is back in the outbox by other means (a writer
    // re-inserted it) is left alone and stays dead.
    let third = env
        .insert(
            "billing.plan.changed",
            example_payload("billing.plan.changed"),
        )
        .await;
    env.drain(&old).await;
    let (event_type, payload): (String, Value) =
        sqlx::query_as("SELECT event_type, payload FROM outbox_dlq WHERE event_id = $1")
            .bind(&third)
            .fetch_one(env.admin())
            .await
            .unwrap();
    sqlx::query("INSERT INTO outbox (event_id, event_type, payload) VALUES ($1, $2, $3)")
        .bind(&third)
        .bind(event_type)
        .bind(payload)
        .execute(&env.writer("billing").await)
        .await
        .unwrap();
    assert!(!replay_one(third.clone()).await);
    assert_eq!(env.outbox_count().await, 1);
    assert_eq!(dlq(&env).await[&third].state, "dead");
    let got = env
        .consume(
            &[env.topic("platform.billing.events")],
            3,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(
        ids(&got).into_iter().collect::<HashSet<_>>(),
        HashSet::from([id, other])
    );
    assert_eq!(got.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discard_records_who_and_why_and_needs_both_a_reason_and_a_filter() {
    let env = TestEnv::new().await;
    let a = Row::new("money.wallet.credited", without(credited("u1"), "currency"))
        .insert(&env)
        .await;
    let b = Row::new("money.wallet.credited", without(credited("u1"), "userId"))
        .insert(&env)
        .await;
    let relay = env.relay().await;
    env.drain(&relay).await;

    let err = sqlx::query("SELECT outbox_dlq_discard(p_why => 'cleanup')")
        .execute(env.admin())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("refusing to discard every dead event"),
        "{err}"
    );
    let err = sqlx::query("SELECT outbox_dlq_discard(p_why => ' ', p_event_id => $1)")
        .bind(&a)
        .execute(env.admin())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("a discard needs a reason"),
        "{err}"
    );

    let discarded: Vec<String> = sqlx::query_scalar(
        "SELECT outbox_dlq_discard(p_why => 'test data, never valid', p_reason => 'invalid_payload')",
    )
    .fetch_all(env.admin())
    .await
    .unwrap();
    assert_eq!(discarded, vec![a.clone()]);
    let rows = dlq(&env).await;
    assert_eq!(rows[&a].state, "discarded");
    assert_eq!(
        rows[&a].discarded_by.as_deref(),
        Some(env.admin_role.as_str()),
        "the admin who discarded it"
    );
    assert_eq!(
        rows[&a].discard_reason.as_deref(),
        Some("test data, never valid")
    );
    assert_eq!(rows[&b].state, "dead");
    // Discarded is final: not replayable, not listed, not counted.
    let replayed: Vec<String> = sqlx::query_scalar("SELECT outbox_dlq_replay(p_event_id => $1)")
        .bind(&a)
        .fetch_all(env.admin())
        .await
        .unwrap();
    assert!(replayed.is_empty());
    assert_eq!(env.dlq_count().await, 1);
    let listed: Vec<String> = sqlx::query_scalar("SELECT event_id FROM outbox_dlq_list()")
        .fetch_all(env.admin())
        .await
        .unwrap();
    assert_eq!(listed, vec![b]);
}

/// Runs `outbox-relay <args>` as the admin role (the DLQ commands are an
/// admin's), with the rest of the relay's environment.
fn cli(env: &TestEnv, args: &[&str]) -> (bool, String, String) {
    let out = env
        .admin_command()
        .env("RUST_LOG", "warn")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_cli_lists_replays_and_discards_through_the_sql_functions() {
    let env = TestEnv::new().await;
    let bad = Row::new("money.wallet.credited", without(credited("u1"), "currency"))
        .insert(&env)
        .await;
    let keyless = Row::new("money.wallet.credited", without(credited("u1"), "userId"))
        .insert(&env)
        .await;
    let relay = env.relay().await;
    env.drain(&relay).await;
    let old = relay_without_billing(&env).await;
    let plan = env
        .insert(
            "billing.plan.changed",
            example_payload("billing.plan.changed"),
        )
        .await;
    env.drain(&old).await;

    let (ok, out, err) = cli(&env, &["dlq", "list", "--json"]);
    assert!(ok, "{err}");
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    let by_id: HashMap<&str, &Value> = listed
        .iter()
        .map(|e| (e["event_id"].as_str().unwrap(), e))
        .collect();
    assert_eq!(by_id.len(), 3);
    assert_eq!(by_id[bad.as_str()]["reason"], "invalid_payload");
    assert_eq!(
        by_id[bad.as_str()]["last_error"],
        "$.currency: required field missing (expected string)"
    );
    assert_eq!(by_id[keyless.as_str()]["reason"], "missing_partition_key");
    assert_eq!(by_id[plan.as_str()]["reason"], "unknown_event_type");
    assert_eq!(by_id[plan.as_str()]["attempts"], 1);
    assert_eq!(by_id[plan.as_str()]["state"], "dead");

    let (ok, out, _) = cli(&env, &["dlq", "list", "--reason", "missing_partition_key"]);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("EVENT_ID"));
    assert!(
        lines[1].starts_with(&keyless) && lines[1].contains("partition key $.userId is missing")
    );

    let (ok, _, err) = cli(&env, &["dlq", "replay"]);
    assert!(!ok);
    assert!(err.contains("refusing to replay every dead event"), "{err}");

    let (ok, out, err) = cli(&env, &["dlq", "replay", "--event-id", &plan]);
    assert!(ok, "{err}");
    assert_eq!(out, format!("replayed 1 event(s)\n{plan}\n"));
    let (ok, out, _) = cli(&env, &["dlq", "replay", "--event-id", &plan]);
    assert!(ok);
    assert_eq!(out, "replayed 0 event(s)\n");
    assert_eq!(env.outbox_count().await, 1);

    let (ok, _, err) = cli(&env, &["dlq", "discard", "--why", "x"]);
    assert!(!ok);
    assert!(
        err.contains("refusing to discard every dead event"),
        "{err}"
    );
    let (ok, out, err) = cli(
        &env,
        &[
            "dlq",
            "discard",
            "--type",
            "money.wallet.credited",
            "--reason",
            "invalid_payload",
            "--why",
            "bad test data",
        ],
    );
    assert!(ok, "{err}");
    assert_eq!(out, format!("discarded 1 event(s)\n{bad}\n"));
    let rows = dlq(&env).await;
    assert_eq!(
        (
            rows[&bad].state.as_str(),
            rows[&bad].discard_reason.as_deref()
        ),
        ("discarded", Some("bad test data"))
    );

    let (ok, out, _) = cli(&env, &["dlq", "list", "--json"]);
    assert!(ok);
    let listed: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|e| e["event_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec![keyless.as_str()]
    );
}
