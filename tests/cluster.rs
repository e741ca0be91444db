//! Broker faults on a real three-broker Kafka cluster (scripts/cluster.sh:
//! three KRaft nodes on loopback, each broker and controller): under a
//! steady stream of keyed events, SIGKILL of the leader of the busiest
//! partition and its restart, SIGKILL of another broker and its restart, and
//! a rolling restart of all three. Nothing may be lost and no key may see
//! its events out of order.
//!
//! The topics are made by `topics ensure` with its defaults on a
//! three-broker cluster (3 replicas, `min.insync.replicas = 2`); the real
//! `outbox-relay` binary publishes as a login role in `outbox_relay`, the
//! stream is inserted by a mapped `outbox_writer` role, and a plain Kafka
//! consumer reads everything back. The database is on the shared
//! PostgreSQL; the cluster is this binary's own (other ports, its own state
//! directory), so other tests never see a broker go away. It stays
//! up afterwards; `bash scripts/cluster.sh destroy` (or the end of
//! scripts/test.sh) removes it.
//!
//! Each fault prints a row of the broker-fault table (docs/delivery.md):
//! `cargo test --test cluster -- --nocapture`

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use sqlx::PgPool;

const TOPIC: &str = "platform.notify.events";
const EVENT_TYPE: &str = "notify.notification.sent";
const PARTITIONS: i32 = 3;
/// Partition keys of the stream; each carries its own sequence numbers.
const KEYS: usize = 24;
/// The stream: `CHUNK` events per transaction every `EVERY`, ~200 events/s.
const CHUNK: usize = 10;
const EVERY: Duration = Duration::from_millis(50);
/// How long a SIGKILLed broker stays down at least: longer than Kafka's
/// `broker.session.timeout.ms` (9 s), so the controller fences it and moves
/// its leaderships while it is away, as with a crashed host.
const DOWN_FOR: Duration = Duration::from_secs(15);
/// The relay's `kafka.message_timeout_ms` here (why: see where it is used).
const MESSAGE_TIMEOUT_MS: &str = "30000";

/// The tests stop brokers: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `scripts/cluster.sh ARGS` and returns its stdout and how long it took.
fn cluster(args: &[&str]) -> (String, Duration) {
    script("cluster.sh", args, &[])
}

async fn cluster_async(args: &[&str]) -> Duration {
    script_async("cluster.sh", args, &[]).await
}

/// Deletes a test's topics: every partition left on the cluster is loaded
/// again by each broker restart, which would slow the next run's faults.
async fn delete_topics(bootstrap: &str, prefix: &str) {
    let mut settings = outbox_relay::config::Settings::default();
    settings.kafka.brokers = bootstrap.to_string();
    let admin = outbox_relay::topics::admin_client(&settings).unwrap();
    let c = client(bootstrap);
    let md = c.fetch_metadata(None, Duration::from_secs(10)).unwrap();
    let names: Vec<String> = md
        .topics()
        .iter()
        .map(|t| t.name().to_string())
        .filter(|t| t.starts_with(prefix))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for r in admin
        .delete_topics(&names, &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap_or_else(|(t, e)| panic!("deleting {t}: {e}"));
    }
}

/// Takes the serial lock, starts the cluster if it is not running, and
/// returns its bootstrap servers.
async fn exclusive() -> (tokio::sync::MutexGuard<'static, ()>, String) {
    let guard = SERIAL.lock().await;
    let bootstrap = tokio::task::spawn_blocking(|| {
        cluster(&["up"]);
        cluster(&["bootstrap"]).0
    })
    .await
    .unwrap();
    (guard, bootstrap)
}

// ------------------------------------------------------------------ metadata

struct PartitionState {
    leader: i32,
    replicas: Vec<i32>,
    isr: Vec<i32>,
}

fn client(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap()
}

/// Leader, replicas and ISR of each partition of `topic`, from a broker's
/// metadata. `None` while no broker answers.
fn partitions(client: &BaseConsumer, topic: &str) -> Option<BTreeMap<i32, PartitionState>> {
    let md = client
        .fetch_metadata(Some(topic), Duration::from_secs(3))
        .ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    Some(
        t.partitions()
            .iter()
            .map(|p| {
                (
                    p.id(),
                    PartitionState {
                        leader: p.leader(),
                        replicas: p.replicas().to_vec(),
                        isr: p.isr().to_vec(),
                    },
                )
            })
            .collect(),
    )
}

/// Waits until every partition of `topic` has all three replicas in sync
/// and a leader; returns how long that took.
async fn wait_isr_full(bootstrap: &str, topic: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    let c = client(bootstrap);
    loop {
        if let Some(ps) = partitions(&c, topic) {
            if ps.len() == PARTITIONS as usize
                && ps.values().all(|p| p.isr.len() == 3 && p.leader >= 0)
            {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < timeout,
            "the ISR of {topic} did not recover within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The partition holding the most messages of `topic` (high watermarks).
fn busiest_partition(bootstrap: &str, topic: &str) -> i32 {
    let c = client(bootstrap);
    (0..PARTITIONS)
        .max_by_key(|p| {
            c.fetch_watermarks(topic, *p, Duration::from_secs(10))
                .map_or(-1, |(_, high)| high)
        })
        .unwrap()
}

// ------------------------------------------------------------------ writer

/// One written event: its id, key, sequence number within the key, and the
/// phase of the test (which fault) it was written in.
#[derive(Clone)]
struct Written {
    id: String,
    key: String,
    seq: i64,
    phase: usize,
}

/// A steady stream as a service writes it: one transaction per chunk, as the
/// writer role, ids chosen by the writer. Keys rotate, and each key's
/// payloads carry consecutive sequence numbers.
struct Writer {
    written: Arc<Mutex<Vec<Written>>>,
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(pool: PgPool) -> Writer {
        let written = Arc::new(Mutex::new(Vec::new()));
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (written, phase, stop) = (written.clone(), phase.clone(), stop.clone());
            async move {
                let mut next_seq = [0i64; KEYS];
                let mut n = 0usize;
                let mut tick = tokio::time::interval(EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let phase = phase.load(Ordering::Relaxed);
                    let mut chunk = Vec::with_capacity(CHUNK);
                    for _ in 0..CHUNK {
                        let k = n % KEYS;
                        n += 1;
                        chunk.push(Written {
                            id: outbox_relay::writer::new_event_id(),
                            key: format!("k-{k:02}"),
                            seq: next_seq[k],
                            phase,
                        });
                        next_seq[k] += 1;
                    }
                    let ids: Vec<&str> = chunk.iter().map(|w| w.id.as_str()).collect();
                    let payloads: Vec<Value> = chunk
                        .iter()
                        .map(|w| {
                            json!({"notificationId": w.key, "channel": "email",
                                   "userId": "u-1", "seq": w.seq})
                        })
                        .collect();
                    // PostgreSQL is not the fault here: any error is the test's.
                    sqlx::query(
                        "INSERT INTO outbox (event_id, event_type, payload) \
                         SELECT id, $3, p FROM unnest($1::text[], $2::jsonb[]) AS t(id, p)",
                    )
                    .bind(&ids)
                    .bind(&payloads)
                    .bind(EVENT_TYPE)
                    .execute(&pool)
                    .await
                    .expect("the writer role inserts a chunk");
                    written.lock().unwrap().extend(chunk);
                }
            }
        });
        Writer {
            written,
            phase,
            stop,
            task,
        }
    }

    fn set_phase(&self, phase: usize) {
        self.phase.store(phase, Ordering::Relaxed);
    }

    fn count(&self) -> usize {
        self.written.lock().unwrap().len()
    }

    async fn finish(self) -> Vec<Written> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let w = self.written.lock().unwrap().clone();
        w
    }
}

// ------------------------------------------------------------------ Kafka side

/// The relay's `outbox_events_published_total` (summed over its labels),
/// scraped from its `/metrics` every 100 ms: it grows when a batch's
/// acknowledged rows are settled, i.e. on successful publishes.
struct Published {
    samples: Arc<Mutex<Vec<(Instant, f64)>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

/// The relay's `outbox_events_published_total`, summed over its series.
async fn published_total(port: u16) -> Option<f64> {
    let (_, body) = tokio::time::timeout(Duration::from_secs(2), get(port, "/metrics"))
        .await
        .ok()??;
    Some(sum(&body, "outbox_events_published_total", &[]))
}

impl Published {
    fn start(port: u16) -> Published {
        let runtime = tokio::runtime::Handle::current();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (samples, stop) = (samples.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(total) = runtime.block_on(published_total(port)) {
                        samples.lock().unwrap().push((Instant::now(), total));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Published {
            samples,
            stop,
            thread,
        }
    }

    fn latest(&self) -> f64 {
        self.samples.lock().unwrap().last().map_or(0.0, |s| s.1)
    }

    /// The longest time between two consecutive increases of the counter
    /// that ends after `from` and starts before `to`: how long publishing
    /// stopped around a fault (the pause `from` falls in counts whole).
    fn longest_pause(&self, from: Instant, to: Instant) -> Duration {
        let samples = self.samples.lock().unwrap();
        let mut worst = Duration::ZERO;
        let mut last: Option<(Instant, f64)> = None;
        for (at, total) in samples.iter() {
            match last {
                Some((prev_at, prev)) if *total > prev => {
                    if *at >= from && prev_at <= to {
                        worst = worst.max(*at - prev_at);
                    }
                    last = Some((*at, *total));
                }
                None => last = Some((*at, *total)),
                _ => {}
            }
        }
        worst
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

/// A plain consumer assigned every partition from the beginning (no group,
/// so a coordinator moving between brokers never rewinds it), reading in
/// the background for the whole test. Records are kept once per
/// (partition, offset).
struct Reader {
    got: Arc<Mutex<BTreeMap<(i32, i64), Received>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Reader {
    fn start(bootstrap: &str, topic: &str) -> Reader {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", format!("cluster-test-{}", unique()))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let got = Arc::new(Mutex::new(BTreeMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (got, stop) = (got.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    // Errors while a broker is down are the client's to
                    // recover from; it keeps fetching once a leader answers.
                    if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                        let r = received(&m);
                        got.lock().unwrap().insert((r.partition, r.offset), r);
                    }
                }
            }
        });
        Reader { got, stop, thread }
    }

    fn distinct_ids(&self) -> usize {
        self.got
            .lock()
            .unwrap()
            .values()
            .filter_map(|r| r.value["id"].as_str())
            .collect::<HashSet<_>>()
            .len()
    }

    fn finish(self) -> Vec<Received> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let got = self.got.lock().unwrap();
        got.values().cloned().collect()
    }
}

// ------------------------------------------------------------------ verdict

#[derive(Default, Debug)]
struct PhaseOutcome {
    written: usize,
    received: usize,
    duplicates: usize,
    lost: usize,
    /// Events that arrived (first copy) before an earlier event of their key.
    order_breaks: usize,
}

/// Per phase: what was written, what arrived, and order per key, judged on
/// each event's first copy in partition order (a duplicate may repeat an
/// earlier event; a later event may never arrive before an earlier one).
fn outcomes(written: &[Written], got: &[Received], phases: usize) -> Vec<PhaseOutcome> {
    let by_id: HashMap<&str, &Written> = written.iter().map(|w| (w.id.as_str(), w)).collect();
    let mut out: Vec<PhaseOutcome> = (0..phases).map(|_| PhaseOutcome::default()).collect();
    for w in written {
        out[w.phase].written += 1;
    }
    let mut ordered: Vec<&Received> = got.iter().collect();
    ordered.sort_by_key(|m| (m.partition, m.offset));
    let mut seen: HashSet<&str> = HashSet::new();
    let mut last_seq: HashMap<&str, i64> = HashMap::new();
    for m in ordered {
        let id = m.value["id"].as_str().expect("an envelope id");
        assert_eq!(m.headers["ce_id"], id);
        let w = by_id
            .get(id)
            .unwrap_or_else(|| panic!("{id} was never written"));
        assert_eq!(m.key, w.key, "the Kafka key is the partition key");
        assert_eq!(m.value["data"]["seq"], json!(w.seq));
        let phase = &mut out[w.phase];
        phase.received += 1;
        if !seen.insert(id) {
            phase.duplicates += 1;
            continue;
        }
        let last = last_seq.entry(w.key.as_str()).or_insert(-1);
        if w.seq < *last {
            phase.order_breaks += 1;
        }
        *last = (*last).max(w.seq);
    }
    for w in written {
        if !seen.contains(w.id.as_str()) {
            out[w.phase].lost += 1;
        }
    }
    out
}

// ------------------------------------------------------------------ tests

/// The CLI's report on a three-broker cluster: the defaults give three
/// replicas and `min.insync.replicas = 2`, without warnings; a topic whose
/// `min.insync.replicas` was lowered by hand is reported as drift with a
/// warning, and `--apply` puts it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_ensure_on_three_brokers_replicates_and_reports_min_insync_drift() {
    let (_serial, bootstrap) = exclusive().await;
    let prefix = format!("o{}.", unique());
    let ensure = |extra: &[&str]| {
        let out = relay_command()
            .args(["topics", "ensure", "--json"])
            .args(extra)
            .env("OUTBOX_RELAY_KAFKA__BROKERS", &bootstrap)
            .env("OUTBOX_RELAY_KAFKA__TOPIC_PREFIX", &prefix)
            .env(
                "OUTBOX_RELAY_CATALOG__PATHS",
                format!("[\"{}\"]", catalog_dir().display()),
            )
            .env("OUTBOX_RELAY_TOPICS__PARTITIONS", "2")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let reports: Value = serde_json::from_slice(&out.stdout).unwrap();
        reports
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["topic"].as_str().unwrap().to_string(), r.clone()))
            .collect::<BTreeMap<String, Value>>()
    };
    let created = ensure(&[]);
    assert_eq!(created.len(), 7);
    for (topic, r) in &created {
        assert_eq!(r["action"], "created", "{topic}");
        assert_eq!(r["replication_factor"], 3, "{topic}");
        assert_eq!(r["min_insync_replicas"], 2, "{topic}");
        assert!(r.get("warnings").is_none(), "{r}");
    }
    // On the cluster itself, as the brokers report it.
    let auth = format!("{prefix}platform.auth.events");
    let c = client(&bootstrap);
    let ps = partitions(&c, &auth).expect("metadata");
    assert!(ps.values().all(|p| p.replicas.len() == 3), "three replicas");

    let again = ensure(&[]);
    assert!(
        again.values().all(|r| r["action"] == "up_to_date"),
        "{again:?}"
    );

    let mut settings = outbox_relay::config::Settings::default();
    settings.kafka.brokers = bootstrap.clone();
    let admin = outbox_relay::topics::admin_client(&settings).unwrap();
    // AlterConfigs replaces the topic's overrides: retention is sent along.
    let week = (7 * outbox_relay::topics::DAY_MS).to_string();
    let lowered = AlterConfig::new(ResourceSpecifier::Topic(&auth))
        .set("min.insync.replicas", "1")
        .set("retention.ms", &week);
    let res = admin
        .alter_configs([&lowered], &AdminOptions::new())
        .await
        .unwrap();
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");

    // A topic's configuration reaches every broker through the metadata
    // log, a moment after AlterConfigs returns; the CLI may ask a broker
    // that has not applied it yet.
    let settle = |wanted: &dyn Fn(&BTreeMap<String, Value>) -> bool| {
        let mut last = ensure(&[]);
        for _ in 0..40 {
            if wanted(&last) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
            last = ensure(&[]);
        }
        last
    };
    let drift = settle(&|r| r[&auth]["action"] == "drift");
    assert_eq!(drift[&auth]["action"], "drift");
    assert_eq!(
        drift[&auth]["changes"],
        json!(["min.insync.replicas 1 -> 2"])
    );
    assert_eq!(drift[&auth]["min_insync_replicas"], 1);
    let warning = drift[&auth]["warnings"][0].as_str().unwrap_or_default();
    assert!(
        warning.starts_with("min.insync.replicas 1 on a 3-broker cluster"),
        "{}",
        drift[&auth]
    );

    let applied = ensure(&["--apply"]);
    assert_eq!(applied[&auth]["applied"], true);
    assert_eq!(applied[&auth]["min_insync_replicas"], 2);
    let settled = settle(&|r| r.values().all(|r| r["action"] == "up_to_date"));
    assert!(
        settled.values().all(|r| r["action"] == "up_to_date"),
        "{settled:?}"
    );
    delete_topics(&bootstrap, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_kills_and_a_rolling_restart_lose_nothing_and_keep_per_key_order() {
    let (_serial, bootstrap) = exclusive().await;
    let test_started = Instant::now();
    // Topics from `topics ensure` with its defaults: 3 replicas and
    // min.insync.replicas 2 on this cluster.
    let env = TestEnv::on_services(&server_superuser_url(), &bootstrap, PARTITIONS).await;
    let topic = env.topic(TOPIC);
    {
        let c = client(&bootstrap);
        let ps = partitions(&c, &topic).expect("metadata");
        assert!(ps.values().all(|p| p.replicas.len() == 3), "three replicas");
    }
    wait_isr_full(&bootstrap, &topic, Duration::from_secs(60)).await;

    let reader = Reader::start(&bootstrap, &topic);
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    // kafka.message_timeout_ms above the time the cluster takes to move a
    // dead broker's leaderships (broker.session.timeout.ms, 9 s, plus the
    // election and, on a busy machine, much more): within it librdkafka's
    // idempotent producer retries in order and without duplicates. See
    // docs/delivery.md for what the default 10 s does instead.
    let relay = RelayProcess::start(
        &env,
        &[
            ("OUTBOX_RELAY_HTTP__LISTEN", metrics_addr.as_str()),
            ("OUTBOX_RELAY_KAFKA__MESSAGE_TIMEOUT_MS", MESSAGE_TIMEOUT_MS),
        ],
    );
    let published = Published::start(metrics_port);
    let publisher = env.catalog.get(EVENT_TYPE).unwrap().publisher.clone();
    let writer = Writer::start(env.writer(&publisher).await);

    // Warm-up: publishing is under way.
    assert!(
        eventually(Duration::from_secs(60), || async {
            published.latest() > 200.0
        })
        .await,
        "the relay publishes to the cluster: {}",
        relay.tail(30)
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Progress on stderr, so a slow or stuck step shows where it was.
    let progress = |what: &str| eprintln!("CLUSTER | {} {what}", secs(test_started.elapsed()));
    progress("warmed up");
    let meta = client(&bootstrap);
    let mut rows: Vec<(String, usize, Duration, String)> = Vec::new();

    // 1: SIGKILL the leader of the busiest partition, restart it.
    writer.set_phase(1);
    let busiest = busiest_partition(&bootstrap, &topic);
    let leader = partitions(&meta, &topic).unwrap()[&busiest].leader;
    let before = writer.count();
    let killed_at = Instant::now();
    cluster_async(&["kill", &leader.to_string()]).await;
    // The controller moves the leadership once it has fenced the dead
    // broker (later still if that broker was the active controller too).
    let moved = eventually(Duration::from_secs(90), || async {
        partitions(&meta, &topic)
            .is_some_and(|ps| ps[&busiest].leader >= 0 && ps[&busiest].leader != leader)
    })
    .await;
    assert!(
        moved,
        "partition {busiest} got no new leader within 90 s of broker {leader}'s death"
    );
    let moved_after = killed_at.elapsed();
    tokio::time::sleep(DOWN_FOR.saturating_sub(moved_after)).await;
    let start_took = cluster_async(&["start", &leader.to_string()]).await;
    let isr_took = wait_isr_full(&bootstrap, &topic, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pause = published.longest_pause(killed_at, Instant::now());
    rows.push((
        format!(
            "SIGKILL of broker {leader}, leader of the busiest partition ({busiest}); new leader after {}, down {}, restart {}, ISR full {} later",
            secs(moved_after),
            secs(DOWN_FOR.max(moved_after)),
            secs(start_took),
            secs(isr_took)
        ),
        1,
        pause,
        format!("{} events written meanwhile", writer.count() - before),
    ));

    progress("fault 1 done");
    // 2: SIGKILL another broker: now a follower of the busiest partition.
    writer.set_phase(2);
    let ps = partitions(&meta, &topic).unwrap();
    let lead_now = ps[&busiest].leader;
    let other = (1..=3)
        .find(|b| *b != leader && *b != lead_now)
        .expect("a third broker");
    let before = writer.count();
    let killed_at = Instant::now();
    cluster_async(&["kill", &other.to_string()]).await;
    tokio::time::sleep(DOWN_FOR).await;
    let start_took = cluster_async(&["start", &other.to_string()]).await;
    let isr_took = wait_isr_full(&bootstrap, &topic, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pause = published.longest_pause(killed_at, Instant::now());
    rows.push((
        format!(
            "SIGKILL of broker {other} (a follower of partition {busiest}); down {}, restart {}, ISR full {} later",
            secs(DOWN_FOR),
            secs(start_took),
            secs(isr_took)
        ),
        2,
        pause,
        format!("{} events written meanwhile", writer.count() - before),
    ));

    progress("fault 2 done");
    // 3: rolling restart, one broker at a time, each back in every ISR
    // before the next goes (SIGTERM: controlled shutdown moves its
    // leaderships first).
    writer.set_phase(3);
    let before = writer.count();
    let rolling_started = Instant::now();
    let mut steps = Vec::new();
    for b in 1..=3 {
        let stop_took = cluster_async(&["stop", &b.to_string()]).await;
        let start_took = cluster_async(&["start", &b.to_string()]).await;
        let isr_took = wait_isr_full(&bootstrap, &topic, Duration::from_secs(120)).await;
        steps.push(format!(
            "broker {b}: stop {}, start {}, ISR {}",
            secs(stop_took),
            secs(start_took),
            secs(isr_took)
        ));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pause = published.longest_pause(rolling_started, Instant::now());
    rows.push((
        format!(
            "rolling restart of all three, {} ({})",
            secs(rolling_started.elapsed()),
            steps.join("; ")
        ),
        3,
        pause,
        format!("{} events written meanwhile", writer.count() - before),
    ));

    progress("rolling restart done");
    // Settle: the writer stops, the relay drains the outbox, the reader
    // catches up with everything.
    writer.set_phase(4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let written = writer.finish().await;
    let drained = eventually(Duration::from_secs(120), || async {
        env.outbox_count().await == 0
    })
    .await;
    assert!(drained, "the outbox drains: {}", relay.tail(40));
    progress("outbox drained");
    let all: HashSet<&str> = written.iter().map(|w| w.id.as_str()).collect();
    eventually(Duration::from_secs(120), || async {
        reader.distinct_ids() >= all.len()
    })
    .await;
    progress("read back");
    published.stop();
    let got = reader.finish();
    let mut relay = relay;
    assert!(relay.running(), "the relay stayed up: {}", relay.tail(40));
    let retried = relay.lines_containing("publish failed; events stay in the outbox");
    relay.stop_cleanly();
    assert_eq!(
        env.dlq_count().await,
        0,
        "a broker fault dead-letters nothing"
    );

    delete_topics(&bootstrap, &env.prefix).await;
    let phases = outcomes(&written, &got, 5);
    println!(
        "CLUSTER | relay: kafka.message_timeout_ms {MESSAGE_TIMEOUT_MS}, publish failures retried: {retried}; warm-up written {}, settle written {}",
        phases[0].written, phases[4].written
    );
    for (fault, phase, pause, note) in &rows {
        let o = &phases[*phase];
        println!(
            "FAULT | {fault} | written {} | received {} | duplicates {} | lost {} | per-key order breaks {} | time to resume (longest pause in published events) {} | {note}",
            o.written,
            o.received,
            o.duplicates,
            o.lost,
            o.order_breaks,
            secs(*pause)
        );
    }
    println!(
        "CLUSTER | whole test {} for {} events",
        secs(test_started.elapsed()),
        written.len()
    );
    for (i, o) in phases.iter().enumerate() {
        assert_eq!(o.lost, 0, "phase {i}: {o:?}");
        assert_eq!(o.order_breaks, 0, "phase {i}: {o:?}");
    }
    for (fault, _, pause, _) in &rows {
        // Kafka moves a dead broker's leaderships within ~10 s on an idle
        // machine; the bound leaves room for a busy one. Longer means the
        // relay did not resume on its own.
        assert!(
            *pause < Duration::from_secs(90),
            "{fault}: publishing paused {pause:?}"
        );
    }
}
