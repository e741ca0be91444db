//! Disruptive tests: Postgres restarted under the relay, the Kafka broker
//! stopped for 30 s, start-up while both are down, and SIGKILL of the relay
//! at random points of a 10k-event stream.
//!
//! They stop and start services, so they run on their own Postgres and Kafka
//! (started here through scripts/services.sh with another state directory
//! and other ports, the ones of scripts/faults.env), never on the shared
//! ones the other tests use, and one at a time (cargo runs a binary's
//! tests in parallel). The services stay up afterwards for the next run;
//! `bash scripts/faults-env.sh down` stops them.
//!
//! As deployed, the relays run as a login role in `outbox_relay` and the
//! writers as a login role in `outbox_writer` mapped to the stream's
//! publisher; the superuser only creates the database.
//!
//! Each test prints its row of the fault table (docs/delivery.md):
//! `cargo test --test faults -- --nocapture`

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

const TOPIC: &str = "platform.notify.events";
const EVENT_TYPE: &str = "notify.notification.sent";
/// Partition keys of the stream; per-key order is checked on these.
const KEYS: usize = 32;

/// One disruptive test at a time: they share the dedicated services.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The dedicated services' state directory and ports (scripts/faults.env,
/// which scripts/faults-env.sh and scripts/test.sh read too).
fn services_env() -> Vec<(String, String)> {
    env_file(include_str!("../scripts/faults.env"))
}

/// The dedicated server's superuser (creating the test database only).
fn superuser_url() -> String {
    let port = env_value(&services_env(), "OUTBOX_PG_PORT");
    format!("postgres://postgres@127.0.0.1:{port}/postgres")
}

fn kafka() -> String {
    format!(
        "127.0.0.1:{}",
        env_value(&services_env(), "OUTBOX_KAFKA_PORT")
    )
}

/// Runs `scripts/<script>.sh <action>` against the dedicated services and
/// returns how long it took.
fn service(script: &str, action: &str) -> Duration {
    common::script(&format!("{script}.sh"), &[action], &services_env()).1
}

/// Takes the serial lock and makes sure both dedicated services run (a
/// failed test may have left one stopped).
async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().await;
    tokio::task::spawn_blocking(|| service("services", "up"))
        .await
        .unwrap();
    guard
}

async fn service_async(script: &'static str, action: &'static str) -> Duration {
    tokio::task::spawn_blocking(move || service(script, action))
        .await
        .unwrap()
}

async fn new_env() -> TestEnv {
    TestEnv::on_services(&superuser_url(), &kafka(), 3).await
}

/// The URL of a new writer login role mapped to the stream's publisher (the
/// catalog's publisher of [`EVENT_TYPE`]).
async fn writer_url(env: &TestEnv) -> String {
    let publisher = env.catalog.get(EVENT_TYPE).unwrap().publisher.clone();
    env.url_as(&env.writer_role("stream", &publisher).await)
}

// ------------------------------------------------------------------ writer

/// Writes a stream of events the way a service does, as a writer role, one
/// transaction per chunk, with ids chosen by the writer: a chunk whose commit
/// is in doubt (Postgres went away) is written again with the same ids, and
/// `ON CONFLICT DO NOTHING` keeps that idempotent while the rows are pending.
struct Writer {
    written: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    /// `total` events (or until stopped), `chunk` per transaction, one
    /// chunk every `every`, connected with `db_url` (a writer role's, see
    /// [`writer_url`]).
    async fn start(db_url: &str, total: usize, chunk: usize, every: Duration) -> Writer {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(1))
            .connect_lazy(db_url)
            .unwrap();
        let written = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (written, stop) = (written.clone(), stop.clone());
            async move {
                let mut seq = 0usize;
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while seq < total && !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let n = chunk.min(total - seq);
                    let ids: Vec<String> = (0..n)
                        .map(|_| outbox_relay::writer::new_event_id())
                        .collect();
                    let payloads: Vec<Value> = (seq..seq + n)
                        .map(|s| {
                            json!({"notificationId": format!("n-{}", s % KEYS), "channel": "email",
                                   "userId": "u-1", "seq": s})
                        })
                        .collect();
                    while !insert_chunk(&pool, &ids, &payloads).await {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    written.lock().unwrap().extend(ids);
                    seq += n;
                }
            }
        });
        Writer {
            written,
            stop,
            task,
        }
    }

    /// Waits for the writer to finish (after `stop`, the chunk in hand is
    /// still written) and returns the ids in write order.
    async fn finish(self, stop: bool) -> Vec<String> {
        if stop {
            self.stop.store(true, Ordering::Relaxed);
        }
        self.task.await.unwrap();
        let ids = self.written.lock().unwrap().clone();
        ids
    }
}

/// One chunk. No conflict target: naming one needs SELECT on the outbox,
/// which a writer does not have (the ordering id is never supplied, so the
/// event id is the only unique column a retried chunk can collide on).
async fn insert_chunk(pool: &PgPool, ids: &[String], payloads: &[Value]) -> bool {
    sqlx::query(
        "INSERT INTO outbox (event_id, event_type, payload) \
         SELECT id, $3, p FROM unnest($1::text[], $2::jsonb[]) AS t(id, p) \
         ON CONFLICT DO NOTHING",
    )
    .bind(ids)
    .bind(payloads)
    .bind(EVENT_TYPE)
    .execute(pool)
    .await
    .is_ok()
}

// ------------------------------------------------------------------ Kafka side

/// Messages in the topic now (sum of high watermarks; the topic is new, so
/// low watermarks are 0). `None` while the broker does not answer.
fn messages_in(env: &TestEnv) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let topic = env.topic(TOPIC);
    let mut total = 0;
    for p in 0..3 {
        let (_, high) = consumer
            .fetch_watermarks(&topic, p, Duration::from_secs(2))
            .ok()?;
        total += high;
    }
    Some(total)
}

/// Polls until the topic holds more than `than` messages; returns when.
async fn first_message_after(env: &TestEnv, than: i64, timeout: Duration) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if messages_in(env).is_some_and(|n| n > than) {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn wait_drained(env: &TestEnv, timeout: Duration) -> Option<Instant> {
    eventually(timeout, || async { env.outbox_count().await == 0 })
        .await
        .then(Instant::now)
}

/// What the consumer saw of the written stream.
struct Outcome {
    written: usize,
    received: usize,
    duplicates: usize,
    lost: usize,
    /// Event ids seen more than once.
    duplicated: HashSet<String>,
    /// Keys whose events first arrived out of write order.
    reordered_keys: usize,
}

/// Reads every message of the topic and compares it with what was written.
/// Every copy of an event must be the same record: key, value and headers.
async fn verify(env: &TestEnv, written: &[String]) -> Outcome {
    let total = messages_in(env).expect("the broker answers") as usize;
    let got = env
        .consume(&[env.topic(TOPIC)], total, Duration::from_secs(120))
        .await;
    assert_eq!(got.len(), total, "read the whole topic");
    let mut copies: HashMap<String, Vec<&Received>> = HashMap::new();
    for m in &got {
        copies
            .entry(m.value["id"].as_str().unwrap().to_string())
            .or_default()
            .push(m);
    }
    for (id, c) in &copies {
        assert_eq!(c[0].headers["ce_id"], *id);
        for other in &c[1..] {
            assert_eq!(
                (&other.key, &other.value, &other.headers),
                (&c[0].key, &c[0].value, &c[0].headers),
                "a duplicate of {id} is the same envelope"
            );
        }
    }
    let written_set: HashSet<&String> = written.iter().collect();
    let received: HashSet<&String> = copies.keys().collect();
    assert!(
        received.is_subset(&written_set),
        "nothing but written events"
    );
    let lost = written_set.difference(&received).count();
    // Per key, the first arrival of each event must follow write order
    // (seq); redeliveries may repeat earlier events, never skip ahead.
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut reordered: HashSet<String> = HashSet::new();
    let mut by_partition: Vec<&Received> = got.iter().collect();
    by_partition.sort_by_key(|m| (m.partition, m.offset));
    for m in by_partition {
        let id = m.value["id"].as_str().unwrap();
        if !seen.insert(id) {
            continue;
        }
        let seq = m.value["data"]["seq"].as_i64().unwrap();
        let last = last_seq.entry(m.key.clone()).or_insert(-1);
        if seq < *last {
            reordered.insert(m.key.clone());
        }
        *last = (*last).max(seq);
    }
    Outcome {
        written: written.len(),
        received: got.len(),
        duplicates: got.len() - copies.len(),
        lost,
        duplicated: copies
            .iter()
            .filter(|(_, c)| c.len() > 1)
            .map(|(id, _)| id.clone())
            .collect(),
        reordered_keys: reordered.len(),
    }
}

fn table_row(fault: &str, o: &Outcome, recover: &str) {
    println!(
        "FAULT | {fault} | written {} | received {} | duplicates {} | lost {} | per-key order breaks {} | recovery {recover}",
        o.written, o.received, o.duplicates, o.lost, o.reordered_keys
    );
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_the_relay_loses_nothing() {
    let _serial = exclusive().await;
    let env = new_env().await;
    let relay = RelayProcess::start(&env, &[("OUTBOX_RELAY_RELAY__BATCH_SIZE", "200")]);
    let writer = Writer::start(&writer_url(&env).await, 3000, 20, Duration::from_millis(50)).await;
    assert!(first_message_after(&env, 0, Duration::from_secs(30))
        .await
        .is_some());
    tokio::time::sleep(Duration::from_secs(2)).await;

    service_async("pg", "down").await;
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = messages_in(&env).unwrap();
    service_async("pg", "up").await;
    let up_at = Instant::now();
    let resumed = first_message_after(&env, before, Duration::from_secs(30))
        .await
        .expect("publishing resumes after Postgres returns");
    let written = writer.finish(false).await;
    let drained = wait_drained(&env, Duration::from_secs(60))
        .await
        .expect("the backlog drains");

    assert!(
        !relay.logged("database unavailable; retrying").is_empty(),
        "{}",
        relay.log_text()
    );
    relay.stop_cleanly();
    assert_eq!(env.dlq_count().await, 0);
    let o = verify(&env, &written).await;
    table_row(
        &format!("Postgres stopped {} under the relay", secs(up_at - down_at)),
        &o,
        &format!(
            "first publish {} after Postgres was back, backlog drained {} after",
            secs(resumed - up_at),
            secs(drained - up_at)
        ),
    );
    assert_eq!(o.lost, 0);
    assert!(
        o.duplicates <= 200,
        "at most the batch in flight: {}",
        o.duplicates
    );
    assert_eq!(o.reordered_keys, 0);
    assert!(resumed - up_at < Duration::from_secs(10), "capped backoff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_for_30s_nothing_is_dead_lettered_and_publishing_resumes() {
    let _serial = exclusive().await;
    let env = new_env().await;
    // Several message timeouts fit in the outage, and max_attempts = 2 would
    // dead-letter a row on its second failure if transient ones counted.
    let mut relay = RelayProcess::start(
        &env,
        &[
            ("OUTBOX_RELAY_KAFKA__MESSAGE_TIMEOUT_MS", "8000"),
            ("OUTBOX_RELAY_RELAY__MAX_ATTEMPTS", "2"),
            ("OUTBOX_RELAY_RELAY__BATCH_SIZE", "200"),
        ],
    );
    let writer = Writer::start(
        &writer_url(&env).await,
        usize::MAX,
        10,
        Duration::from_millis(100),
    )
    .await;
    assert!(first_message_after(&env, 0, Duration::from_secs(30))
        .await
        .is_some());
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before = messages_in(&env).unwrap();
    let stop_took = service_async("kafka", "down").await;
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(env.dlq_count().await, 0);
    let waiting = env.outbox_count().await;
    let start_took = service_async("kafka", "up").await;
    let up_at = Instant::now();
    let resumed = first_message_after(&env, before, Duration::from_secs(60))
        .await
        .expect("publishing resumes after the broker returns");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = writer.finish(true).await;
    let Some(drained) = wait_drained(&env, Duration::from_secs(60)).await else {
        let (left, max_attempts, due_in): (i64, Option<i32>, Option<f64>) = sqlx::query_as(
            "SELECT count(*), max(attempts), \
                    extract(epoch FROM max(available_at) - now())::float8 FROM outbox",
        )
        .fetch_one(env.admin())
        .await
        .unwrap();
        let log = relay.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "the backlog did not drain within 60 s: {left} rows left, attempts up to \
             {max_attempts:?}, the last due in {due_in:?} s; relay log (newest first):\n{}",
            tail.join("\n")
        );
    };

    let retried = relay.logged("publish failed; events stay in the outbox");
    assert!(retried.len() >= 2, "{}", relay.log_text());
    assert!(relay.running());
    relay.stop_cleanly();
    assert_eq!(env.dlq_count().await, 0, "an outage dead-letters nothing");
    let o = verify(&env, &written).await;
    table_row(
        &format!(
            "Kafka broker stopped {} (graceful stop took {}, start {}), {waiting} events waiting",
            secs(up_at - down_at - start_took),
            secs(stop_took),
            secs(start_took)
        ),
        &o,
        &format!(
            "first publish {} after the broker was ready, backlog drained {} after",
            secs(resumed - up_at),
            secs(drained - up_at)
        ),
    );
    assert_eq!(o.lost, 0);
    assert!(waiting > 0);
    assert!(
        resumed - up_at < Duration::from_secs(15),
        "within seconds: {:?}",
        resumed - up_at
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_while_kafka_and_postgres_are_down_waits_with_backoff_then_runs() {
    let _serial = exclusive().await;
    let env = new_env().await;
    let ids: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..100 {
            let mut p = example_payload(EVENT_TYPE);
            p["notificationId"] = json!(format!("n-{}", i % KEYS));
            p["seq"] = json!(i);
            v.push(env.insert(EVENT_TYPE, p).await);
        }
        v
    };
    service_async("kafka", "down").await;
    service_async("pg", "down").await;

    let started = Instant::now();
    let mut relay = RelayProcess::start(&env, &[]);
    let mut fail_fast = RelayProcess::start(&env, &[("OUTBOX_RELAY_RELAY__FAIL_FAST", "true")]);
    let exited = tokio::task::spawn_blocking(move || {
        let s = fail_fast.wait(Duration::from_secs(30));
        (s, fail_fast)
    })
    .await
    .unwrap();
    let (status, fail_fast) = exited;
    let status = status.expect("relay.fail_fast exits when Kafka is down");
    assert!(!status.success());
    assert!(
        fail_fast.log_text().contains("kafka"),
        "{}",
        fail_fast.log_text()
    );

    assert!(
        eventually(Duration::from_secs(20), || async {
            relay.logged("waiting for Kafka").len() >= 2
        })
        .await,
        "{}",
        relay.log_text()
    );
    assert!(relay.running());
    let kafka_started = Instant::now();
    let kafka_took = service_async("kafka", "up").await;
    // Kafka up, Postgres still down: fail_fast exits, the relay keeps trying.
    let fail_fast = RelayProcess::start(&env, &[("OUTBOX_RELAY_RELAY__FAIL_FAST", "true")]);
    let fail_fast = tokio::task::spawn_blocking(move || {
        let mut p = fail_fast;
        let s = p.wait(Duration::from_secs(30));
        (s, p)
    });
    assert!(
        eventually(Duration::from_secs(30), || async {
            relay.logged("waiting for Postgres").len() >= 2
        })
        .await,
        "{}",
        relay.log_text()
    );
    let waits: Vec<u64> = relay
        .logged("waiting for Postgres")
        .iter()
        .map(|v| v["retry_in_ms"].as_u64().unwrap())
        .collect();
    assert!(waits.iter().all(|ms| *ms <= 5_000), "capped: {waits:?}");
    let (status, fail_fast) = fail_fast.await.unwrap();
    assert!(!status
        .expect("relay.fail_fast exits when Postgres is down")
        .success());
    assert!(
        fail_fast.log_text().contains("postgres"),
        "{}",
        fail_fast.log_text()
    );

    service_async("pg", "up").await;
    let up_at = Instant::now();
    // Read back as the admin role; its pool reconnects after the restart
    // (a query may still fail while the server comes up).
    let drained = eventually(Duration::from_secs(30), || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
            .fetch_one(env.admin())
            .await
            .is_ok_and(|n| n == 0)
    })
    .await;
    assert!(drained, "{}", relay.log_text());
    let drained_at = Instant::now();
    assert!(relay.running());
    relay.stop_cleanly();
    assert_eq!(env.dlq_count().await, 0);
    let o = verify(&env, &ids).await;
    table_row(
        &format!(
            "start-up with Kafka and Postgres down (Kafka started after {}, taking {}; Postgres after {})",
            secs(kafka_started - started),
            secs(kafka_took),
            secs(up_at - started)
        ),
        &o,
        &format!("drained {} after Postgres was back", secs(drained_at - up_at)),
    );
    assert_eq!((o.lost, o.duplicates), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_20_times_during_a_10k_stream_every_event_arrives() {
    let _serial = exclusive().await;
    let env = new_env().await;
    let batch = 200usize;
    // Short leases: a killed relay's partitions are free again within 1 s,
    // and publishable after the takeover fence (kafka.message_timeout_ms,
    // 2 s here, + 2 s past their expiry): about 6 s from one restart to its
    // first publish, each given up to 20 s.
    let extra = [
        ("OUTBOX_RELAY_RELAY__BATCH_SIZE", "200"),
        ("OUTBOX_RELAY_LEASES__TTL_MS", "1000"),
        ("OUTBOX_RELAY_LEASES__RENEW_INTERVAL_MS", "300"),
        ("OUTBOX_RELAY_KAFKA__MESSAGE_TIMEOUT_MS", "2000"),
    ];
    // 60 events/s: the stream (about 170 s) outlasts the 20 kills, so that
    // every restarted relay has something to publish.
    let writer = Writer::start(
        &writer_url(&env).await,
        10_000,
        3,
        Duration::from_millis(50),
    )
    .await;
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d ^ std::process::id() as u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let started = Instant::now();
    let mut kills = 0;
    let mut killed_publishing = 0;
    let mut restart_to_publish: Vec<Duration> = Vec::new();
    while kills < 20 {
        let spawned = Instant::now();
        let mut relay = RelayProcess::start(&env, &extra);
        // Kill at a random point once this relay has begun publishing, so
        // that kills land in claimed-but-unsettled batches.
        let before = messages_in(&env).unwrap_or(0);
        let publishing = first_message_after(&env, before, Duration::from_secs(20)).await;
        tokio::time::sleep(Duration::from_millis(next() % 400)).await;
        relay.sigkill();
        kills += 1;
        if let Some(at) = publishing {
            killed_publishing += 1;
            restart_to_publish.push(at - spawned);
        }
    }
    let kill_phase = started.elapsed();
    restart_to_publish.sort();
    let relay = RelayProcess::start(&env, &extra);
    // The kills may have left nothing to drain: the relay is stopped only
    // once it has started (a SIGTERM before its handler is installed ends
    // the process by the signal's default action).
    relay.wait_started().await;
    let written = writer.finish(false).await;
    let restarted = Instant::now();
    wait_drained(&env, Duration::from_secs(90))
        .await
        .expect("the last relay drains the outbox");
    let drain = restarted.elapsed();
    relay.stop_cleanly();
    assert_eq!(env.dlq_count().await, 0);

    let o = verify(&env, &written).await;
    // Duplicates can only come from batches in flight at a kill: each kill
    // leaves at most one claimed batch (≤ 200 rows, consecutive in write
    // order) unsettled. Cover the duplicated events with windows of 200
    // consecutive writes; no more windows than kills may be needed.
    let position: HashMap<&String, usize> =
        written.iter().enumerate().map(|(i, id)| (id, i)).collect();
    let mut dup_positions: Vec<usize> = o.duplicated.iter().map(|id| position[id]).collect();
    dup_positions.sort();
    let mut windows = 0;
    let mut window_start: Option<usize> = None;
    for p in &dup_positions {
        if window_start.is_none_or(|s| p - s >= batch) {
            windows += 1;
            window_start = Some(*p);
        }
    }
    table_row(
        &format!(
            "SIGKILL x{kills} during a {}-event stream ({killed_publishing} after it had begun publishing, {})",
            written.len(),
            secs(kill_phase)
        ),
        &o,
        &format!(
            "restart to first publish {} median, {} max (lease ttl 1 s); final drain {}",
            secs(restart_to_publish[restart_to_publish.len() / 2]),
            secs(*restart_to_publish.last().unwrap()),
            secs(drain)
        ),
    );
    println!(
        "FAULT | kill loop duplicates fall into {windows} window(s) of {batch} consecutive events (kills: {kills})"
    );
    assert_eq!(o.written, 10_000);
    assert_eq!(
        killed_publishing, kills,
        "every restarted relay resumed publishing"
    );
    assert_eq!(o.lost, 0);
    assert!(windows <= kills, "{windows} windows for {kills} kills");
    assert!(o.duplicates <= kills * batch);
    assert_eq!(o.reordered_keys, 0);
}
