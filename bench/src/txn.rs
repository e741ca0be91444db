//! What a transactional producer would cost the relay, next to the
//! idempotent producer it uses: the relay's producer settings
//! (`publish::producer_config`), records (`envelope::prepare` on the mix's
//! events) and batch path (`publish::produce`, then every delivery report of
//! the batch with `publish::acks`), with no PostgreSQL in the way.
//!
//! The transactional variant adds a `transactional.id` and wraps each batch
//! in `begin_transaction` … `commit_transaction`. A read_committed consumer
//! sees a batch only once its commit returns, so that instant is when its
//! events are published; for the idempotent producer it is the batch's last
//! delivery report (when the relay settles the batch). A transactional
//! producer has one open transaction at a time, so its batches cannot
//! overlap: it runs at pipeline depth 1, the idempotent producer at the
//! depths asked for (the relay's default is 2).
//!
//! Each round runs every variant on topics of its own (the catalog topics
//! under a fresh prefix, 6 partitions), in an order that rotates from round
//! to round, in two phases:
//! - drain: a backlog produced in full batches, as fast as the variant goes;
//! - steady: events due at a fixed rate; every tick, what is due and not
//!   yet sent is one batch (as the relay claims what was committed since its
//!   last claim); latency is from the instant an event was due to the
//!   instant it is published.

use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use outbox_relay::catalog::Catalog;
use outbox_relay::config::KafkaSettings;
use outbox_relay::envelope::Prepared;
use outbox_relay::publish::{self, Ack, RelayContext, RelayProducer};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;

use crate::analysis::{latency, Latency};
use crate::kafka::{self, Offsets, Watermarks};
use crate::workload::Mix;
use crate::{cpu, env, floor};

#[derive(Args, Clone, Debug)]
pub struct TxnOpts {
    /// Kafka bootstrap servers (default: $OUTBOX_TEST_KAFKA or the local broker).
    #[arg(long)]
    brokers: Option<String>,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Events of the drain phase.
    #[arg(long, default_value_t = 200_000)]
    drain_events: u64,
    /// Events per batch in the drain (the relay's relay.batch_size).
    #[arg(long, default_value_t = 4000)]
    drain_batch: usize,
    /// Pipeline depths of the idempotent producer, comma separated (the
    /// transactional producer always runs at depth 1).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    depths: Vec<usize>,
    /// Events per second of the steady phase.
    #[arg(long, default_value_t = 5000.0)]
    steady_rate: f64,
    #[arg(long, default_value_t = 20.0)]
    steady_secs: f64,
    /// Sleep after finding nothing due (the relay's relay.idle_interval_ms).
    #[arg(long, default_value_t = 5)]
    steady_tick_ms: u64,
    /// Most events one steady batch takes.
    #[arg(long, default_value_t = 4000)]
    steady_max_batch: usize,
    /// Phases to run, comma separated: drain,steady.
    #[arg(long, value_delimiter = ',', default_value = "drain,steady")]
    phases: Vec<String>,
    /// Extra librdkafka property of the transactional producer
    /// (KEY=VALUE, repeatable), e.g. transaction.timeout.ms=10000.
    #[arg(long = "txn-config", value_parser = crate::parse_kv)]
    txn_config: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Idempotent { depth: usize },
    Transactional,
}

impl Variant {
    fn label(self) -> String {
        match self {
            Variant::Idempotent { depth } => format!("idempotent, depth {depth}"),
            Variant::Transactional => "transactional".into(),
        }
    }

    fn short(self) -> String {
        match self {
            Variant::Idempotent { depth } => format!("i{depth}"),
            Variant::Transactional => "t".into(),
        }
    }
}

/// The variants in the order round `round` runs them: rotated by one each
/// round, so none always runs first or last.
fn order(variants: &[Variant], round: usize) -> Vec<Variant> {
    let mut v = variants.to_vec();
    if !v.is_empty() {
        let n = round % v.len();
        v.rotate_left(n);
    }
    v
}

/// One batch, settled.
struct Settled {
    /// Indexes (within the phase) of its events.
    events: Range<u64>,
    /// When its events are published: the last delivery report, or the
    /// commit's return.
    at: Instant,
    /// From the first send to the last delivery report.
    acks: Duration,
    /// `commit_transaction` alone (transactional only).
    commit: Option<Duration>,
    /// Partitions the batch went to: a transaction writes a commit marker
    /// to each.
    partitions: usize,
    failed: usize,
}

/// Distinct (topic, partition) pairs of a batch's successful deliveries,
/// and its failures (an error or no report).
fn tally(batch: &[Prepared], results: &[Option<Result<Ack, KafkaError>>]) -> (usize, usize) {
    let mut partitions = HashSet::new();
    let mut failed = 0;
    for (msg, r) in batch.iter().zip(results) {
        match r {
            Some(Ok(ack)) => {
                partitions.insert((msg.topic.as_str(), ack.partition));
            }
            _ => failed += 1,
        }
    }
    (partitions.len(), failed)
}

/// A producer of one variant and its batches in flight.
struct Lane {
    variant: Variant,
    producer: Arc<RelayProducer>,
    in_flight: VecDeque<JoinHandle<Settled>>,
}

impl Lane {
    /// A producer with the relay's settings; the transactional one with a
    /// `transactional.id` of its own, its transactions initialised.
    fn new(
        variant: Variant,
        settings: &KafkaSettings,
        txn_id: &str,
        extra: &[(String, String)],
    ) -> Result<Lane> {
        let mut config = publish::producer_config(settings);
        if variant == Variant::Transactional {
            config.set("transactional.id", txn_id);
            for (k, v) in extra {
                config.set(k, v);
            }
        }
        let producer: RelayProducer = config
            .create_with_context(RelayContext::default())
            .with_context(|| format!("creating the {} producer", variant.label()))?;
        if variant == Variant::Transactional {
            tokio::task::block_in_place(|| producer.init_transactions(Duration::from_secs(60)))
                .context("init_transactions")?;
        }
        Ok(Lane {
            variant,
            producer: Arc::new(producer),
            in_flight: VecDeque::new(),
        })
    }

    /// Sends a batch; returns the batches that settled meanwhile. The
    /// idempotent producer waits for the oldest batch only when `depth`
    /// batches are in flight; the transactional one settles each batch
    /// before it returns.
    async fn send(&mut self, mut batch: Vec<Prepared>, events: Range<u64>) -> Result<Vec<Settled>> {
        let mut settled = Vec::new();
        match self.variant {
            Variant::Idempotent { depth } => {
                while self.in_flight.len() >= depth.max(1) {
                    settled.push(self.oldest().await?);
                }
                let sent = Instant::now();
                let produced = publish::produce(&self.producer, &mut batch, |_| true).await;
                self.in_flight.push_back(tokio::spawn(async move {
                    let results = publish::acks(produced, std::future::pending()).await;
                    let at = Instant::now();
                    let (partitions, failed) = tally(&batch, &results);
                    Settled {
                        events,
                        at,
                        acks: at - sent,
                        commit: None,
                        partitions,
                        failed,
                    }
                }));
            }
            Variant::Transactional => {
                self.producer
                    .begin_transaction()
                    .context("begin_transaction")?;
                let sent = Instant::now();
                let produced = publish::produce(&self.producer, &mut batch, |_| true).await;
                let results = publish::acks(produced, std::future::pending()).await;
                let acked = Instant::now();
                let (partitions, failed) = tally(&batch, &results);
                tokio::task::block_in_place(|| {
                    self.producer.commit_transaction(Duration::from_secs(60))
                })
                .context("commit_transaction")?;
                let at = Instant::now();
                settled.push(Settled {
                    events,
                    at,
                    acks: acked - sent,
                    commit: Some(at - acked),
                    partitions,
                    failed,
                });
            }
        }
        Ok(settled)
    }

    async fn oldest(&mut self) -> Result<Settled> {
        let h = self.in_flight.pop_front().context("no batch in flight")?;
        Ok(h.await?)
    }

    /// Waits for every batch in flight.
    async fn finish(&mut self) -> Result<Vec<Settled>> {
        let mut settled = Vec::new();
        while !self.in_flight.is_empty() {
            settled.push(self.oldest().await?);
        }
        Ok(settled)
    }
}

/// What one variant did in one round.
#[derive(Debug, Clone, Default)]
struct Outcome {
    drain: Option<Drain>,
    steady: Option<Steady>,
    /// Events produced to the variant's topics (warm-ups included).
    events: u64,
    /// Commit markers its transactions wrote (one per partition and commit).
    markers: u64,
    check: Option<Check>,
}

#[derive(Debug, Clone, Default)]
struct Batches {
    count: u64,
    failed: u64,
    acks_ms: f64,
    commit_ms: Option<f64>,
    partitions: f64,
    size: f64,
}

impl Batches {
    fn of(settled: &[Settled]) -> Batches {
        let n = settled.len().max(1) as f64;
        let commits: Vec<f64> = settled
            .iter()
            .filter_map(|s| s.commit.map(|c| c.as_secs_f64() * 1000.0))
            .collect();
        Batches {
            count: settled.len() as u64,
            failed: settled.iter().map(|s| s.failed as u64).sum(),
            acks_ms: settled
                .iter()
                .map(|s| s.acks.as_secs_f64() * 1000.0)
                .sum::<f64>()
                / n,
            commit_ms: (!commits.is_empty())
                .then(|| commits.iter().sum::<f64>() / commits.len() as f64),
            partitions: settled.iter().map(|s| s.partitions as f64).sum::<f64>() / n,
            size: settled
                .iter()
                .map(|s| (s.events.end - s.events.start) as f64)
                .sum::<f64>()
                / n,
        }
    }
}

/// CPU seconds used during a phase by this process (producer threads
/// included), by the Kafka broker, and by everything else on the machine
/// (other work running meanwhile: how noisy the phase was).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    own_s: f64,
    broker_s: Option<f64>,
    other_s: f64,
}

struct CpuMark {
    own: f64,
    broker: Option<(u32, f64)>,
    machine: (u64, u64),
}

impl CpuMark {
    fn now(broker: Option<u32>) -> CpuMark {
        CpuMark {
            own: cpu::process_cpu_s(std::process::id()).unwrap_or(f64::NAN),
            broker: broker.and_then(|pid| cpu::process_cpu_s(pid).map(|s| (pid, s))),
            machine: cpu::machine(),
        }
    }

    fn since(&self) -> Cpu {
        let own_s = cpu::process_cpu_s(std::process::id()).unwrap_or(f64::NAN) - self.own;
        let broker_s = self
            .broker
            .and_then(|(pid, s0)| cpu::process_cpu_s(pid).map(|s| s - s0));
        let busy = cpu::busy_s(self.machine, cpu::machine());
        Cpu {
            own_s,
            broker_s,
            other_s: (busy - own_s - broker_s.unwrap_or(0.0)).max(0.0),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Drain {
    events: u64,
    secs: f64,
    batches: Batches,
    cpu: Cpu,
}

#[derive(Debug, Clone, Default)]
struct Steady {
    latency: Latency,
    batches: Batches,
    /// Events sent per second over the phase (the target is the rate).
    achieved_rate: f64,
    cpu: Cpu,
}

/// What a read_committed consumer finds on a variant's topics.
#[derive(Debug, Clone, Default)]
struct Check {
    /// Sum of the partitions' end offsets: records and commit markers.
    end_offsets: i64,
    records: u64,
    distinct: u64,
    foreign: u64,
}

struct Bench {
    opts: TxnOpts,
    brokers: String,
    settings: KafkaSettings,
    mix: Arc<Mix>,
    catalog: Arc<Catalog>,
    run_id: String,
    broker_pid: Option<u32>,
    /// Sequence numbers are unique over the run (event ids carry them).
    next_seq: u64,
    topics: Vec<String>,
}

pub async fn run(opts: TxnOpts) -> Result<()> {
    let brokers = opts.brokers.clone().unwrap_or_else(env::brokers);
    let catalog = Catalog::load(&[env::catalog_dir()])?;
    let mix = Arc::new(Mix::new(&catalog)?);
    let mut settings = floor::settings(&brokers, &[])?;
    settings.client_id = "outbox-bench-txn".into();
    let run_id = outbox_relay::writer::new_event_id()[18..].to_string();
    let mut bench = Bench {
        brokers,
        settings,
        mix,
        catalog: Arc::new(catalog),
        run_id,
        broker_pid: cpu::kafka_broker_pid(),
        next_seq: 1,
        topics: Vec::new(),
        opts,
    };
    let outcome = tokio::select! {
        r = bench.rounds() => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    eprintln!("[txn] deleting {} topics", bench.topics.len());
    if let Err(e) = kafka::delete_topics(&bench.brokers, &bench.topics).await {
        eprintln!("warning: deleting topics: {e:#}");
    }
    let rounds = outcome?;
    let md = bench.markdown(&rounds);
    println!("{md}");
    let broken: Vec<String> = rounds
        .iter()
        .flatten()
        .filter_map(|(v, o)| problem(*v, o))
        .collect();
    if !broken.is_empty() {
        bail!("check failed: {}", broken.join("; "));
    }
    Ok(())
}

/// Why a variant's round does not add up, if it does not.
fn problem(v: Variant, o: &Outcome) -> Option<String> {
    let c = o.check.as_ref()?;
    let failed = o.drain.as_ref().map_or(0, |d| d.batches.failed)
        + o.steady.as_ref().map_or(0, |s| s.batches.failed);
    let expected_end = o.events as i64 + o.markers as i64;
    if failed > 0
        || c.records != o.events
        || c.distinct != o.events
        || c.foreign > 0
        || c.end_offsets != expected_end
    {
        Some(format!(
            "{}: {} events sent, {failed} failed; read_committed saw {} records ({} distinct, {} foreign); end offsets {} (expected {expected_end})",
            v.label(),
            o.events,
            c.records,
            c.distinct,
            c.foreign,
            c.end_offsets
        ))
    } else {
        None
    }
}

type Round = Vec<(Variant, Outcome)>;

impl Bench {
    fn variants(&self) -> Vec<Variant> {
        let mut v: Vec<Variant> = self
            .opts
            .depths
            .iter()
            .map(|&depth| Variant::Idempotent { depth })
            .collect();
        v.push(Variant::Transactional);
        v
    }

    fn phase(&self, name: &str) -> bool {
        self.opts.phases.iter().any(|p| p == name)
    }

    fn prefix(&self, round: usize, v: Variant) -> String {
        format!("benchtxn{}.r{round}{}.", self.run_id, v.short())
    }

    fn topic_names(&self, prefix: &str) -> Vec<String> {
        self.mix
            .topics()
            .iter()
            .map(|t| format!("{prefix}{t}"))
            .collect()
    }

    fn batch(&mut self, prefix: &str, n: u64) -> Result<Vec<Prepared>> {
        let first = self.next_seq;
        self.next_seq += n;
        (first..first + n)
            .map(|seq| {
                floor::prepare(
                    &self.mix,
                    &self.catalog,
                    prefix,
                    self.settings.max_message_bytes,
                    seq,
                )
            })
            .collect()
    }

    async fn rounds(&mut self) -> Result<Vec<Round>> {
        let variants = self.variants();
        let mut rounds = Vec::new();
        for round in 1..=self.opts.rounds {
            let names: Vec<String> = variants
                .iter()
                .flat_map(|&v| self.topic_names(&self.prefix(round, v)))
                .collect();
            self.topics.extend(names.iter().cloned());
            kafka::create_topics(&self.brokers, &names, env::PARTITIONS)
                .await
                .context("creating the round's topics")?;
            let mut results = Vec::new();
            for v in order(&variants, round - 1) {
                eprintln!("[txn] round {round}: {}", v.label());
                let o = self.variant(round, v).await?;
                results.push((v, o));
            }
            results.sort_by_key(|(v, _)| variants.iter().position(|x| x == v));
            rounds.push(results);
        }
        Ok(rounds)
    }

    async fn variant(&mut self, round: usize, v: Variant) -> Result<Outcome> {
        let prefix = self.prefix(round, v);
        let topics = self.topic_names(&prefix);
        let txn_id = format!("outbox-bench-txn-{}-{round}", self.run_id);
        let mut out = Outcome::default();
        if self.phase("drain") {
            let mut lane = self.lane(v, &txn_id, &prefix, &mut out).await?;
            let d = self.drain(&mut lane, &prefix, &mut out).await?;
            eprintln!(
                "[txn]   drain: {:.0} events/s ({} batches, acks {:.1} ms, commit {})",
                d.events as f64 / d.secs,
                d.batches.count,
                d.batches.acks_ms,
                fmt_opt(d.batches.commit_ms, 1)
            );
            out.drain = Some(d);
        }
        if self.phase("steady") {
            let mut lane = self.lane(v, &txn_id, &prefix, &mut out).await?;
            let s = self.steady(&mut lane, &prefix, &mut out).await?;
            eprintln!(
                "[txn]   steady: p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} ms ({} batches of {:.0}, commit {})",
                s.latency.p50_ms,
                s.latency.p90_ms,
                s.latency.p99_ms,
                s.latency.max_ms,
                s.batches.count,
                s.batches.size,
                fmt_opt(s.batches.commit_ms, 1)
            );
            out.steady = Some(s);
        }
        let (brokers, mix, expected) = (self.brokers.clone(), self.mix.clone(), out.events);
        let check =
            tokio::task::spawn_blocking(move || read_committed(&brokers, &topics, &mix, expected))
                .await??;
        out.check = Some(check);
        Ok(out)
    }

    /// A fresh producer of the variant, warmed up with one small batch to
    /// every topic (connections, metadata, the producer id; for the
    /// transactional producer its first transaction).
    async fn lane(
        &mut self,
        v: Variant,
        txn_id: &str,
        prefix: &str,
        out: &mut Outcome,
    ) -> Result<Lane> {
        let mut lane = Lane::new(v, &self.settings, txn_id, &self.opts.txn_config)?;
        let batch = self.batch(prefix, 200)?;
        let mut settled = lane.send(batch, 0..200).await?;
        settled.extend(lane.finish().await?);
        account(out, v, &settled);
        Ok(lane)
    }

    async fn drain(&mut self, lane: &mut Lane, prefix: &str, out: &mut Outcome) -> Result<Drain> {
        let n = self.opts.drain_events;
        let size = self.opts.drain_batch.max(1) as u64;
        let mut settled = Vec::new();
        let mark = CpuMark::now(self.broker_pid);
        let t0 = Instant::now();
        let mut next = 0;
        while next < n {
            let end = (next + size).min(n);
            let batch = self.batch(prefix, end - next)?;
            settled.extend(lane.send(batch, next..end).await?);
            next = end;
        }
        settled.extend(lane.finish().await?);
        let secs = settled
            .iter()
            .map(|s| s.at)
            .max()
            .map_or(0.0, |at| (at - t0).as_secs_f64());
        let cpu = mark.since();
        account(out, lane.variant, &settled);
        Ok(Drain {
            events: n,
            secs,
            batches: Batches::of(&settled),
            cpu,
        })
    }

    async fn steady(&mut self, lane: &mut Lane, prefix: &str, out: &mut Outcome) -> Result<Steady> {
        let rate = self.opts.steady_rate;
        let n = (rate * self.opts.steady_secs) as u64;
        let tick = Duration::from_millis(self.opts.steady_tick_ms);
        let max = self.opts.steady_max_batch.max(1) as u64;
        let mut settled = Vec::new();
        let mark = CpuMark::now(self.broker_pid);
        let t0 = Instant::now();
        let mut next = 0;
        while next < n {
            let due = due_count(t0.elapsed(), rate).min(n);
            if due <= next {
                tokio::time::sleep(tick).await;
                continue;
            }
            let end = due.min(next + max);
            let batch = self.batch(prefix, end - next)?;
            settled.extend(lane.send(batch, next..end).await?);
            next = end;
        }
        settled.extend(lane.finish().await?);
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = mark.since();
        let mut lat = Vec::with_capacity(n as usize);
        for s in &settled {
            for i in s.events.clone() {
                let due = t0 + Duration::from_secs_f64(i as f64 / rate);
                lat.push(s.at.saturating_duration_since(due).as_secs_f64() * 1000.0);
            }
        }
        account(out, lane.variant, &settled);
        Ok(Steady {
            latency: latency(&lat),
            batches: Batches::of(&settled),
            achieved_rate: n as f64 / elapsed,
            cpu,
        })
    }
}

/// Events due by `elapsed` when event `i` is due at `i / rate`.
fn due_count(elapsed: Duration, rate: f64) -> u64 {
    (elapsed.as_secs_f64() * rate).floor() as u64 + 1
}

/// Adds a phase's batches to the variant's totals.
fn account(out: &mut Outcome, v: Variant, settled: &[Settled]) {
    for s in settled {
        out.events += s.events.end - s.events.start;
        if v == Variant::Transactional {
            out.markers += s.partitions as u64;
        }
    }
}

/// Reads every partition of `topics` from the start with
/// `isolation.level=read_committed` (blocking) until `expected` records
/// came and no more follow, or none comes for a while; counts them and
/// their distinct event ids.
fn read_committed(brokers: &str, topics: &[String], mix: &Mix, expected: u64) -> Result<Check> {
    let wm = Watermarks::new(brokers, topics.to_vec(), env::PARTITIONS)?;
    let ends: Offsets = wm.read()?;
    let consumer: BaseConsumer = kafka::client(brokers)
        .set("group.id", "outbox-bench-txn-check")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.max.bytes", "52428800")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..env::PARTITIONS {
            tpl.add_partition_offset(t, p, Offset::Beginning)?;
        }
    }
    consumer.assign(&tpl)?;
    let mut check = Check {
        end_offsets: ends.total(),
        ..Check::default()
    };
    let mut seen = HashSet::new();
    let mut last = Instant::now();
    let quiet = Duration::from_secs(3);
    loop {
        let silence = last.elapsed();
        if (check.records >= expected && silence > Duration::from_millis(500)) || silence > quiet {
            break;
        }
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = msg.context("reading back")?;
        last = Instant::now();
        check.records += 1;
        let seq = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == "ce_id").and_then(|h| h.value))
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|id| mix.seq_of(id));
        match seq {
            Some(s) => {
                seen.insert(s);
            }
            None => check.foreign += 1,
        }
    }
    check.distinct = seen.len() as u64;
    Ok(check)
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".into(), |x| format!("{x:.digits$}"))
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

impl Bench {
    fn markdown(&self, rounds: &[Round]) -> String {
        let o = &self.opts;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Transactional vs idempotent producer (run {})\n",
            self.run_id
        );
        let _ = writeln!(
            s,
            "Brokers {}; producer: the relay's settings ({}, linger.ms={}), \
             topics: {} catalog topics × {} partitions per variant and round; \
             drain {} events in batches of {}; steady {} events/s for {} s, \
             tick {} ms; {} rounds.{}\n",
            self.brokers,
            self.settings.compression.as_str(),
            self.settings.linger_ms,
            self.mix.topics().len(),
            env::PARTITIONS,
            o.drain_events,
            o.drain_batch,
            o.steady_rate,
            o.steady_secs,
            o.steady_tick_ms,
            o.rounds,
            if o.txn_config.is_empty() {
                String::new()
            } else {
                format!(" Transactional producer extra config: {:?}.", o.txn_config)
            }
        );
        let has_drain = rounds.iter().flatten().any(|(_, x)| x.drain.is_some());
        let has_steady = rounds.iter().flatten().any(|(_, x)| x.steady.is_some());
        if has_drain {
            let _ = writeln!(s, "## Drain\n");
            let _ = writeln!(
                s,
                "| round | variant | events/s | batches | mean acks ms | mean commit ms | partitions/batch | own CPU s | broker CPU s | other CPU s |"
            );
            let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            for (r, round) in rounds.iter().enumerate() {
                for (v, x) in round {
                    let Some(d) = &x.drain else { continue };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {:.0} | {} | {:.1} | {} | {:.1} | {:.2} | {} | {:.2} |",
                        r + 1,
                        v.label(),
                        d.events as f64 / d.secs,
                        d.batches.count,
                        d.batches.acks_ms,
                        fmt_opt(d.batches.commit_ms, 1),
                        d.batches.partitions,
                        d.cpu.own_s,
                        fmt_opt(d.cpu.broker_s, 2),
                        d.cpu.other_s
                    );
                }
            }
            let _ = writeln!(s, "\nMedians over the rounds:\n");
            let _ = writeln!(
                s,
                "| variant | events/s | mean acks ms | mean commit ms | own CPU s | broker CPU s |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
            for v in self.variants() {
                let ds: Vec<&Drain> = rounds
                    .iter()
                    .flatten()
                    .filter(|(x, _)| *x == v)
                    .filter_map(|(_, o)| o.drain.as_ref())
                    .collect();
                let m = |f: &dyn Fn(&Drain) -> Option<f64>| {
                    fmt_opt(median(ds.iter().filter_map(|d| f(d)).collect()), 1)
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    v.label(),
                    m(&|d| Some(d.events as f64 / d.secs)),
                    m(&|d| Some(d.batches.acks_ms)),
                    m(&|d| d.batches.commit_ms),
                    m(&|d| Some(d.cpu.own_s)),
                    m(&|d| d.cpu.broker_s),
                );
            }
            let _ = writeln!(s);
        }
        if has_steady {
            let _ = writeln!(s, "## Steady: latency from due to published (ms)\n");
            let _ = writeln!(
                s,
                "| round | variant | p50 | p90 | p99 | max | batches | events/batch | mean acks ms | mean commit ms | partitions/batch | achieved ev/s | own CPU s | broker CPU s | other CPU s |"
            );
            let _ = writeln!(
                s,
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for (r, round) in rounds.iter().enumerate() {
                for (v, x) in round {
                    let Some(st) = &x.steady else { continue };
                    let l = &st.latency;
                    let b = &st.batches;
                    let _ = writeln!(
                        s,
                        "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} | {:.1} | {:.0} | {:.2} | {} | {:.2} |",
                        r + 1,
                        v.label(),
                        l.p50_ms,
                        l.p90_ms,
                        l.p99_ms,
                        l.max_ms,
                        b.count,
                        b.size,
                        b.acks_ms,
                        fmt_opt(b.commit_ms, 1),
                        b.partitions,
                        st.achieved_rate,
                        st.cpu.own_s,
                        fmt_opt(st.cpu.broker_s, 2),
                        st.cpu.other_s
                    );
                }
            }
            let _ = writeln!(s, "\nMedians over the rounds:\n");
            let _ = writeln!(
                s,
                "| variant | p50 | p90 | p99 | max | events/batch | mean commit ms | own CPU s | broker CPU s |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            for v in self.variants() {
                let ss: Vec<&Steady> = rounds
                    .iter()
                    .flatten()
                    .filter(|(x, _)| *x == v)
                    .filter_map(|(_, o)| o.steady.as_ref())
                    .collect();
                let m = |f: &dyn Fn(&Steady) -> Option<f64>| {
                    fmt_opt(median(ss.iter().filter_map(|x| f(x)).collect()), 1)
                };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    v.label(),
                    m(&|x| Some(x.latency.p50_ms)),
                    m(&|x| Some(x.latency.p90_ms)),
                    m(&|x| Some(x.latency.p99_ms)),
                    m(&|x| Some(x.latency.max_ms)),
                    m(&|x| Some(x.batches.size)),
                    m(&|x| x.batches.commit_ms),
                    m(&|x| Some(x.cpu.own_s)),
                    m(&|x| x.cpu.broker_s),
                );
            }
            let _ = writeln!(s);
        }
        let _ = writeln!(
            s,
            "## Check (read_committed read-back per variant and round)\n"
        );
        let _ = writeln!(
            s,
            "| round | variant | events sent | records read | distinct | end offsets | commit markers | ok |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---|");
        for (r, round) in rounds.iter().enumerate() {
            for (v, x) in round {
                let Some(c) = &x.check else { continue };
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    r + 1,
                    v.label(),
                    x.events,
                    c.records,
                    c.distinct,
                    c.end_offsets,
                    x.markers,
                    if problem(*v, x).is_none() {
                        "yes"
                    } else {
                        "NO"
                    }
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_rotates_per_round() {
        let v = [
            Variant::Idempotent { depth: 1 },
            Variant::Idempotent { depth: 2 },
            Variant::Transactional,
        ];
        assert_eq!(order(&v, 0), v.to_vec());
        assert_eq!(order(&v, 1), vec![v[1], v[2], v[0]]);
        assert_eq!(order(&v, 2), vec![v[2], v[0], v[1]]);
        assert_eq!(order(&v, 3), v.to_vec());
    }

    #[test]
    fn due_count_includes_the_event_due_now() {
        assert_eq!(due_count(Duration::ZERO, 5000.0), 1);
        assert_eq!(due_count(Duration::from_micros(150), 5000.0), 1);
        assert_eq!(due_count(Duration::from_micros(250), 5000.0), 2);
        assert_eq!(due_count(Duration::from_secs(1), 5000.0), 5001);
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN]), None);
    }
}
