//! outbox-bench: measures outbox-relay against Debezium's Postgres connector
//! with the Outbox Event Router on the local Postgres and Kafka.
//!
//!   outbox-bench smoke            seconds-long check of the harness, relay only
//!   outbox-bench compare          both relays, every mode (alias: full)
//!   outbox-bench compare --quick  the same with short phases
//!   outbox-bench txn-cost         transactional vs idempotent producer
//!
//! Modes: writer tax, drain, idle single events, steady paced load, writers
//! at their max rate. See bench/README.md for the method.

mod analysis;
mod chart;
mod cpu;
mod env;
mod floor;
mod kafka;
mod procs;
mod report;
mod txn;
mod workload;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::analysis::{join, latency, timeline};
use crate::env::BenchEnv;
use crate::floor::Floor;
use crate::kafka::{Offsets, Watermarks};
use crate::procs::{Debezium, RelayProcess};
use crate::report::{Drain, EmptyOutbox, Idle, Integrity, Load, Peer, Results, Tax};
use crate::workload::{write, Shape, WriteSpec};

#[derive(Parser)]
#[command(
    name = "outbox-bench",
    about = "Benchmarks outbox-relay against Debezium's outbox event router"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A smoke run: every mode with tiny numbers against the relay alone;
    /// fails when an event is lost or misrouted. Needs only the local services.
    Smoke(Opts),
    /// Both relays, every mode, side by side with ratios.
    #[command(visible_alias = "full")]
    Compare(Opts),
    /// What a transactional producer (one transaction per batch) costs
    /// next to the relay's idempotent producer: drain throughput and
    /// steady latency on the local Kafka, no PostgreSQL.
    TxnCost(txn::TxnOpts),
}

#[derive(Args, Clone)]
struct Opts {
    /// Short phases (a minute or two in all) instead of the full run.
    #[arg(long)]
    quick: bool,
    /// Measure the relay only (no Debezium).
    #[arg(long)]
    relay_only: bool,
    /// Skip the floor: a bare producer with the relay's producer settings at
    /// the same rate (idle and steady), no PostgreSQL.
    #[arg(long)]
    no_floor: bool,
    /// Modes to run, comma separated: tax,drain,idle,steady,max.
    #[arg(long, value_delimiter = ',')]
    modes: Option<Vec<String>>,
    #[arg(long)]
    drain_events: Option<u64>,
    #[arg(long)]
    idle_events: Option<u64>,
    #[arg(long)]
    steady_rate: Option<f64>,
    #[arg(long)]
    steady_secs: Option<f64>,
    #[arg(long)]
    steady_writers: Option<usize>,
    #[arg(long)]
    max_secs: Option<f64>,
    #[arg(long)]
    max_writers: Option<usize>,
    #[arg(long)]
    tax_secs: Option<f64>,
    /// Idle mode: seconds the CPU of an empty outbox is measured for.
    #[arg(long)]
    empty_secs: Option<f64>,
    /// Extra environment for the relay process (KEY=VALUE, repeatable),
    /// e.g. OUTBOX_RELAY_RELAY__BATCH_SIZE=5000.
    #[arg(long = "relay-env", value_parser = parse_kv)]
    relay_env: Vec<(String, String)>,
    /// Use this relay binary instead of building target/release/outbox-relay.
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Record a `perf record -g` profile of the relay process in each mode.
    #[arg(long)]
    perf: bool,
    /// Output directory (default bench/out/<mode>-<run id>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Port of the Kafka Connect REST API.
    #[arg(long, default_value_t = 18083)]
    connect_port: u16,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s}"))
}

#[derive(Debug, Clone)]
struct Params {
    drain_events: u64,
    idle_events: u64,
    steady_rate: f64,
    steady_secs: f64,
    steady_writers: usize,
    max_secs: f64,
    max_writers: usize,
    tax_secs: f64,
    /// Idle mode: the empty outbox's CPU is measured this long.
    empty_secs: f64,
    /// Debezium runs paced load this long first, so its JVM is warm.
    warmup_secs: f64,
}

impl Params {
    fn smoke() -> Self {
        Params {
            drain_events: 5_000,
            idle_events: 3,
            steady_rate: 500.0,
            steady_secs: 2.0,
            steady_writers: 4,
            max_secs: 2.0,
            max_writers: 4,
            tax_secs: 1.0,
            empty_secs: 2.0,
            warmup_secs: 2.0,
        }
    }
    fn quick() -> Self {
        Params {
            drain_events: 50_000,
            idle_events: 10,
            steady_rate: 5_000.0,
            steady_secs: 5.0,
            steady_writers: 16,
            max_secs: 5.0,
            max_writers: 16,
            tax_secs: 3.0,
            empty_secs: 10.0,
            warmup_secs: 5.0,
        }
    }
    fn full() -> Self {
        Params {
            drain_events: 500_000,
            idle_events: 30,
            steady_rate: 5_000.0,
            steady_secs: 30.0,
            steady_writers: 16,
            max_secs: 20.0,
            max_writers: 16,
            tax_secs: 10.0,
            empty_secs: 30.0,
            warmup_secs: 15.0,
        }
    }
    fn with(mut self, o: &Opts) -> Self {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = o.$f { self.$f = v; } )* };
        }
        set!(
            drain_events,
            idle_events,
            steady_rate,
            steady_secs,
            steady_writers,
            max_secs,
            max_writers,
            tax_secs,
            empty_secs
        );
        self
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (name, opts, params, with_dbz) = match cli.command {
        Command::TxnCost(o) => return rt.block_on(txn::run(o)),
        Command::Smoke(o) => {
            let p = Params::smoke().with(&o);
            ("smoke", o, p, false)
        }
        Command::Compare(o) => {
            let p = if o.quick {
                Params::quick()
            } else {
                Params::full()
            }
            .with(&o);
            let dbz = !o.relay_only;
            (if o.quick { "quick" } else { "full" }, o, p, dbz)
        }
    };
    rt.block_on(run(name, opts, params, with_dbz))
}

struct Ctx {
    env: BenchEnv,
    params: Params,
    opts: Opts,
    bin: PathBuf,
    out: PathBuf,
    seq: Arc<AtomicU64>,
    modes: Vec<String>,
}

impl Ctx {
    fn mode(&self, m: &str) -> bool {
        self.modes.iter().any(|x| x == m)
    }
}

async fn run(name: &str, opts: Opts, params: Params, with_dbz: bool) -> Result<()> {
    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let bin = match &opts.relay_bin {
        Some(b) => b.clone(),
        None => {
            eprintln!("[bench] building the release outbox-relay binary");
            tokio::task::spawn_blocking(procs::build_relay).await??
        }
    };
    let modes = opts.modes.clone().unwrap_or_else(|| {
        ["tax", "drain", "idle", "steady", "max"]
            .map(String::from)
            .to_vec()
    });
    let with_floor = !opts.no_floor && modes.iter().any(|m| m == "idle" || m == "steady");
    let env = BenchEnv::create(with_dbz, with_floor).await?;
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| procs::workspace_root().join(format!("bench/out/{name}-{}", env.id)));
    std::fs::create_dir_all(&out)?;
    eprintln!(
        "[bench] run {} ({name}): database {}, topics {}* / {}* / {}* (floor), output {}",
        env.id,
        env.db_name,
        env.relay_prefix,
        env.dbz_prefix,
        env.floor_prefix,
        out.display()
    );
    let ctx = Ctx {
        env,
        params,
        opts,
        bin: bin.clone(),
        out: out.clone(),
        seq: Arc::new(AtomicU64::new(1)),
        modes,
    };
    let outcome = tokio::select! {
        r = body(&ctx, with_dbz, with_floor) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    eprintln!("[bench] cleaning up run {}", ctx.env.id);
    ctx.env.cleanup().await;
    let (tax, relay, floor, debezium) = outcome?;
    let over_floor = floor
        .as_ref()
        .map(|f| report::over_floor(&relay, f, debezium.as_ref()));
    let mut results = Results {
        run_id: ctx_id(&out),
        mode: name.to_string(),
        started_at,
        host: host(&bin),
        tax,
        relay,
        debezium,
        floor,
        over_floor,
        targets: Vec::new(),
    };
    results.targets = report::targets(&results);
    let md = report::markdown(&results);
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out.join("results.md"), &md)?;
    if let Err(e) = chart::draw(&results, &out.join("chart.png")) {
        eprintln!("warning: chart: {e:#}");
    }
    println!("{md}");
    println!(
        "Results: {}/results.{{md,json}}, chart: {}/chart.png",
        out.display(),
        out.display()
    );
    let broken: Vec<&str> = results
        .targets
        .iter()
        .filter(|t| t.name.starts_with("every event") && !t.met)
        .map(|t| t.name.as_str())
        .collect();
    if !broken.is_empty() {
        bail!("delivery check failed: events were lost or misrouted (see the table above)");
    }
    Ok(())
}

fn ctx_id(out: &Path) -> String {
    out.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn host(bin: &Path) -> report::Host {
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0);
    report::Host {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        relay_binary: bin.display().to_string(),
    }
}

type Peers = (Option<Tax>, Peer, Option<Peer>, Option<Peer>);

async fn body(ctx: &Ctx, with_dbz: bool, with_floor: bool) -> Result<Peers> {
    let tax = if ctx.mode("tax") {
        Some(writer_tax(ctx, with_dbz).await?)
    } else {
        None
    };
    let relay = relay_peer(ctx, tax.as_ref().map(|t| t.outbox_rate)).await?;
    let floor = if with_floor {
        Some(floor_peer(ctx).await?)
    } else {
        None
    };
    let dbz = if with_dbz {
        Some(debezium_peer(ctx, tax.as_ref().map(|t| t.dbz_rate)).await?)
    } else {
        None
    };
    Ok((tax, relay, floor, dbz))
}

/// Writers as fast as they can into each table with nothing relaying. The
/// tables take turns in two rounds so that a change in the machine's load
/// during the run skews all of them alike.
async fn writer_tax(ctx: &Ctx, with_dbz: bool) -> Result<Tax> {
    const ROUNDS: u32 = 2;
    let p = &ctx.params;
    let mut events = [0usize; 3];
    let mut secs = [0f64; 3];
    let shapes = [Shape::Relay, Shape::Plain, Shape::Debezium];
    eprintln!(
        "[bench] writer tax: {} writers, {} s per table, in {ROUNDS} rounds",
        p.max_writers, p.tax_secs
    );
    for _ in 0..ROUNDS {
        for (i, shape) in shapes.into_iter().enumerate() {
            if shape == Shape::Debezium && !with_dbz {
                continue;
            }
            let spec = WriteSpec {
                shape,
                writers: p.max_writers,
                rate: None,
                duration: Duration::from_secs_f64(p.tax_secs / f64::from(ROUNDS)),
                returning: false,
            };
            let r = write(&ctx.env.db_url, ctx.env.mix.clone(), ctx.seq.clone(), spec).await?;
            check_errors(&r, shape.table())?;
            events[i] += r.commits.len();
            secs[i] += r.elapsed.as_secs_f64();
            ctx.env.truncate(shape.table()).await?;
        }
    }
    ctx.env.vacuum("outbox").await?;
    let rate = |i: usize| {
        if secs[i] > 0.0 {
            events[i] as f64 / secs[i]
        } else {
            0.0
        }
    };
    Ok(Tax {
        writers: p.max_writers,
        seconds: p.tax_secs,
        outbox_rate: rate(0),
        plain_rate: rate(1),
        dbz_rate: rate(2),
        tax_pct: (1.0 - rate(0) / rate(1)) * 100.0,
    })
}

fn check_errors(r: &workload::WriteReport, what: &str) -> Result<()> {
    if r.errors > 0 {
        bail!(
            "{} inserts into {what} failed, first: {}",
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

/// Polls end offsets until they sum to `target`; returns when that was seen.
async fn wait_appended(
    wm: &Arc<Watermarks>,
    target: i64,
    timeout: Duration,
) -> Result<(Instant, Offsets)> {
    let deadline = Instant::now() + timeout;
    loop {
        let w = wm.clone();
        let offsets = tokio::task::spawn_blocking(move || w.read()).await??;
        if offsets.total() >= target {
            return Ok((Instant::now(), offsets));
        }
        if Instant::now() > deadline {
            bail!(
                "Kafka holds {} of {} events after {timeout:?}",
                offsets.total(),
                target
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn read_back(
    ctx: &Ctx,
    from: &Offsets,
    to: &Offsets,
    prefix: &str,
    id_header: &str,
) -> Result<kafka::ReadBack> {
    let (brokers, from, to, mix, prefix, header) = (
        ctx.env.brokers.clone(),
        from.clone(),
        to.clone(),
        ctx.env.mix.clone(),
        prefix.to_string(),
        id_header.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        kafka::read_range(&brokers, &from, &to, &mix, &prefix, &header)
    })
    .await?
}

/// Which peer a phase drives, and how.
enum Driver<'a> {
    /// A fresh relay process per mode.
    Relay,
    /// The one Connect worker.
    Debezium(&'a Debezium),
    /// The floor: a bare producer, no PostgreSQL (idle and steady only).
    Floor(&'a Arc<Floor>),
}

impl Driver<'_> {
    fn shape(&self) -> Shape {
        match self {
            Driver::Relay | Driver::Floor(_) => Shape::Relay,
            Driver::Debezium(_) => Shape::Debezium,
        }
    }
    fn id_header(&self) -> &'static str {
        match self {
            Driver::Relay | Driver::Floor(_) => "ce_id",
            Driver::Debezium(_) => "id",
        }
    }
    fn name(&self) -> &'static str {
        match self {
            Driver::Relay => "outbox-relay",
            Driver::Debezium(_) => "Debezium",
            Driver::Floor(_) => "floor",
        }
    }
}

/// A running relay (and optional profiler) for the span of one mode.
struct RelayRun {
    proc: RelayProcess,
    perf: Option<std::process::Child>,
}

impl RelayRun {
    fn start(ctx: &Ctx, mode: &str, wait: bool) -> Result<Self> {
        let env = ctx.env.relay_env(&ctx.opts.relay_env);
        let proc = RelayProcess::spawn(
            &ctx.bin,
            &env,
            &ctx.out.join(format!("relay-{mode}.log")),
            wait,
        )?;
        let perf = if ctx.opts.perf {
            Some(
                std::process::Command::new("perf")
                    .args(["record", "-F", "499", "-g", "-q", "-o"])
                    .arg(ctx.out.join(format!("perf-{mode}.data")))
                    .args(["-p", &proc.pid().to_string()])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .context("starting perf")?,
            )
        } else {
            None
        };
        Ok(RelayRun { proc, perf })
    }

    fn stop(self) -> Result<f64> {
        if let Some(mut p) = self.perf {
            // SIGINT makes perf write its file and exit.
            // SAFETY: kill(2) on a child this harness spawned.
            unsafe {
                libc::kill(p.id() as i32, libc::SIGINT);
            }
            let _ = p.wait();
        }
        self.proc.stop()
    }
}

async fn relay_peer(ctx: &Ctx, rate_without: Option<f64>) -> Result<Peer> {
    let wm = Arc::new(Watermarks::new(
        &ctx.env.brokers,
        ctx.env.peer_topics(&ctx.env.relay_prefix),
        env::PARTITIONS,
    )?);
    let mut peer = Peer {
        name: "outbox-relay".into(),
        drain: None,
        idle: None,
        steady: None,
        max: None,
        empty_outbox: None,
        max_rate_without: rate_without,
    };
    let prefix = ctx.env.relay_prefix.clone();
    if ctx.mode("drain") {
        let n = ctx.params.drain_events;
        eprintln!("[bench] relay drain: preloading {n} events");
        let before = wm.read()?;
        workload::preload(
            &ctx.env.db_url,
            Shape::Relay,
            ctx.env.mix.clone(),
            ctx.seq.clone(),
            n,
            1000,
        )
        .await?;
        ctx.env.vacuum("outbox").await?;
        ctx.env.checkpoint().await?;
        let monitor = cpu::CpuMonitor::start(&ctx.env.db_name);
        let run = RelayRun::start(ctx, "drain", false)?;
        let t0 = run.proc.started;
        // The relay deletes a row only after Kafka acknowledged it: an empty
        // outbox means every event is in Kafka (checked right after). A
        // primary-key probe of Postgres disturbs the run less than polling
        // Kafka's end offsets would.
        while !ctx.env.outbox_empty().await? {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let deleted_at = Instant::now();
        let (_, after) =
            wait_appended(&wm, before.total() + n as i64, Duration::from_secs(60)).await?;
        let cpu = monitor.finish();
        let rss = run.stop()?;
        let rb = read_back(ctx, &before, &after, &prefix, "ce_id").await?;
        let integrity = drain_integrity(n, &rb);
        let secs = (deleted_at - t0).as_secs_f64();
        eprintln!("[bench] relay drain: {n} events in {secs:.2} s");
        peer.drain = Some(Drain {
            events: n,
            acked_s: (deleted_at - t0).as_secs_f64(),
            deleted_s: Some(secs),
            events_per_s: n as f64 / secs,
            rss_mib: rss,
            integrity,
            batch_timings: procs::batch_timings(&ctx.out.join("relay-drain.log")),
            cpu,
        });
    }
    for mode in ["idle", "steady", "max"] {
        if !ctx.mode(mode) {
            continue;
        }
        let run = RelayRun::start(ctx, mode, true)?;
        // The same warm-up as Debezium's: both are measured as long-running
        // processes, not in their first seconds (connection pools, plan
        // caches, producer metadata, the JIT).
        warm_up(ctx, Shape::Relay, &wm, "outbox-relay").await?;
        if mode == "idle" {
            // Kafka holds the warm-up; the relay deletes its rows right after.
            wait_outbox_empty(ctx).await?;
        }
        ctx.env.vacuum("outbox").await?;
        ctx.env.checkpoint().await?;
        // Let the relay settle into its idle loop before the first event.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if mode == "idle" {
            let pid = run.proc.pid();
            peer.empty_outbox = Some(empty_outbox(ctx, "outbox-relay", &[pid], true).await?);
        }
        let result = load_phase(ctx, &Driver::Relay, &wm, &prefix, mode).await;
        let rss = run.stop()?;
        let timings = procs::batch_timings(&ctx.out.join(format!("relay-{mode}.log")));
        match (mode, result?) {
            ("idle", Phase::Idle(mut x)) => {
                x.rss_mib = rss;
                peer.idle = Some(x);
            }
            ("steady", Phase::Load(mut x)) => {
                x.rss_mib = rss;
                x.batch_timings = timings;
                peer.steady = Some(x);
            }
            (_, Phase::Load(mut x)) => {
                x.rss_mib = rss;
                x.batch_timings = timings;
                peer.max = Some(x);
            }
            _ => unreachable!(),
        }
    }
    Ok(peer)
}

async fn wait_outbox_empty(ctx: &Ctx) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ctx.env.outbox_empty().await? {
        if Instant::now() > deadline {
            bail!("the relay's outbox is not empty 60 s after its warm-up");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The CPU an empty outbox costs a peer: nothing is written (the warm-up's
/// writers have finished and no other phase runs) for `empty_secs` while
/// every process's CPU time is sampled; the peer's process (`pids`) and its
/// own backends in this run's database are summed, in percent of one core.
/// The Kafka broker, PostgreSQL's shared processes and the harness are shown
/// in the split but not counted.
async fn empty_outbox(ctx: &Ctx, name: &str, pids: &[u32], relay: bool) -> Result<EmptyOutbox> {
    // By pid: other relays or Connect workers on the machine are not this one.
    let (process, sessions) = if relay {
        ("the relay (this run)", "postgres: the relay's sessions")
    } else {
        ("Kafka Connect (this run)", "postgres: Debezium's sessions")
    };
    let secs = ctx.params.empty_secs;
    let monitor = cpu::CpuMonitor::start(&ctx.env.db_name);
    monitor.relabel(pids, process);
    let backends = ctx.env.peer_backends(relay).await?;
    monitor.relabel(&backends, sessions);
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    // Sessions opened during the window (a reconnect) count too.
    let mut after = ctx.env.peer_backends(relay).await?;
    monitor.relabel(&after, sessions);
    let split = monitor.finish();
    after.extend(backends);
    after.sort_unstable();
    after.dedup();
    let cpu_of = |c: &str| {
        split
            .cpu_s
            .iter()
            .filter(|(n, _)| n == c)
            .map(|(_, s)| s)
            .sum::<f64>()
    };
    let pct = |c: &str| cpu_of(c) / split.wall_s.max(1e-9) * 100.0;
    let (process_pct, postgres_pct) = (pct(process), pct(sessions));
    let e = EmptyOutbox {
        seconds: split.wall_s,
        process_pct,
        postgres_pct,
        postgres_sessions: after.len(),
        total_pct: process_pct + postgres_pct,
        kafka_broker_pct: pct("kafka broker"),
        machine_busy_pct: split.machine_busy_pct,
        cpu: split,
    };
    eprintln!("[bench] {}", report::empty_outbox_line(name, &e));
    Ok(e)
}

/// Paced load that is not measured, so that each peer is measured as a
/// long-running process: `warmup_secs` at up to 2000 events/s, until Kafka
/// holds all of it.
async fn warm_up(ctx: &Ctx, shape: Shape, wm: &Arc<Watermarks>, name: &str) -> Result<()> {
    let before = tokio::task::block_in_place(|| wm.read())?;
    let spec = WriteSpec {
        shape,
        writers: ctx.params.steady_writers,
        rate: Some(ctx.params.steady_rate.min(2000.0)),
        duration: Duration::from_secs_f64(ctx.params.warmup_secs),
        returning: true,
    };
    let w = write(&ctx.env.db_url, ctx.env.mix.clone(), ctx.seq.clone(), spec).await?;
    check_errors(&w, shape.table())?;
    wait_appended(
        wm,
        before.total() + w.commits.len() as i64,
        Duration::from_secs(300),
    )
    .await
    .with_context(|| format!("{name} warm-up: events did not reach Kafka"))?;
    eprintln!(
        "[bench] {name} warm-up: {} events delivered",
        w.commits.len()
    );
    Ok(())
}

fn drain_integrity(n: u64, rb: &kafka::ReadBack) -> Integrity {
    let mut seqs: Vec<u64> = rb.seen.iter().map(|s| s.seq).collect();
    seqs.sort_unstable();
    let total = seqs.len() as u64;
    seqs.dedup();
    if let Some(p) = &rb.first_problem {
        eprintln!("warning: {p}");
    }
    Integrity {
        written: n,
        missing: n.saturating_sub(seqs.len() as u64),
        duplicates: total - seqs.len() as u64,
        misrouted: rb.misrouted,
        foreign: rb.foreign,
    }
}

enum Phase {
    Idle(Idle),
    Load(Load),
}

/// Idle, steady or max against a running peer: write, wait until Kafka
/// holds everything, read it back, join with the commits.
async fn load_phase(
    ctx: &Ctx,
    d: &Driver<'_>,
    wm: &Arc<Watermarks>,
    prefix: &str,
    mode: &str,
) -> Result<Phase> {
    let p = &ctx.params;
    let (writers, rate, secs) = match mode {
        // One event at a time, ~4 per second: each finds the peer idle.
        "idle" => (1, Some(4.0), p.idle_events as f64 / 4.0),
        "steady" => (p.steady_writers, Some(p.steady_rate), p.steady_secs),
        _ => (p.max_writers, None, p.max_secs),
    };
    eprintln!(
        "[bench] {} {mode}: {writers} writers, {} for {secs} s",
        d.name(),
        rate.map_or("as fast as they can".into(), |r| format!("{r} events/s"))
    );
    if let Driver::Debezium(dbz) = d {
        dbz.rss.take_peak(dbz.pid);
    }
    let before = tokio::task::block_in_place(|| wm.read())?;
    let monitor = cpu::CpuMonitor::start(&ctx.env.db_name);
    let started_us = chrono::Utc::now().timestamp_micros();
    let w = if let Driver::Floor(f) = d {
        let rate = rate.context("the floor runs paced modes only")?;
        let w = f
            .produce(
                ctx.seq.clone(),
                writers,
                rate,
                Duration::from_secs_f64(secs),
            )
            .await?;
        check_errors(&w, "the floor's topics")?;
        w
    } else {
        let spec = WriteSpec {
            shape: d.shape(),
            writers,
            rate,
            duration: Duration::from_secs_f64(secs),
            returning: true,
        };
        let w = write(&ctx.env.db_url, ctx.env.mix.clone(), ctx.seq.clone(), spec).await?;
        check_errors(&w, d.shape().table())?;
        w
    };
    let n = w.commits.len() as i64;
    let (_, after) = wait_appended(wm, before.total() + n, Duration::from_secs(600)).await?;
    let cpu = monitor.finish();
    let rss = match d {
        Driver::Debezium(dbz) => dbz.rss.take_peak(dbz.pid),
        Driver::Relay | Driver::Floor(_) => 0.0,
    };
    if let Driver::Floor(f) = d {
        if let (n @ 1.., first) = f.failed() {
            eprintln!(
                "warning: floor: {n} deliveries failed, first: {}",
                first.as_deref().unwrap_or("?")
            );
        }
    }
    let rb = read_back(ctx, &before, &after, prefix, d.id_header()).await?;
    if let Some(p) = &rb.first_problem {
        eprintln!("warning: {p}");
    }
    let j = join(&w.commits, &rb.seen);
    let integrity = Integrity {
        written: w.commits.len() as u64,
        missing: j.missing,
        duplicates: j.duplicates,
        misrouted: rb.misrouted,
        foreign: rb.foreign,
    };
    let lats: Vec<f64> = j.trips.iter().map(|t| t.latency_ms()).collect();
    let lat = latency(&lats);
    eprintln!(
        "[bench] {} {mode}: {} events at {:.0}/s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        d.name(),
        w.commits.len(),
        w.rate(),
        lat.p50_ms,
        lat.p99_ms,
        lat.max_ms
    );
    if let Driver::Debezium(_) = d {
        // Debezium's outbox only grows (rows are never deleted by the
        // connector); keep each phase's table the size the relay's would be.
        ctx.env.truncate("dbz_outbox").await?;
    }
    if mode == "idle" {
        return Ok(Phase::Idle(Idle {
            events: w.commits.len() as u64,
            latency: lat,
            rss_mib: rss,
            integrity,
        }));
    }
    let tl = timeline(&j.trips, started_us, 250);
    let last_commit = j.trips.iter().map(|t| t.commit_us).max().unwrap_or(0);
    let last_append = j.trips.iter().map(|t| t.append_us).max().unwrap_or(0);
    Ok(Phase::Load(Load {
        writers,
        seconds: secs,
        target_rate: rate,
        commit_rate: w.rate(),
        // Exact, not sampled: the oldest pending event's age peaks just before
        // that event is appended, at its latency; so the peak over the phase
        // is the largest latency.
        max_oldest_pending_ms: lat.max_ms,
        max_backlog: tl.iter().map(|s| s.backlog).max().unwrap_or(0),
        catch_up_s: ((last_append - last_commit) as f64 / 1e6).max(0.0),
        latency: lat,
        rss_mib: rss,
        integrity,
        batch_timings: None,
        cpu,
        timeline: tl,
    }))
}

/// The floor: a bare producer with the relay's producer settings, producing
/// the relay's records at the same paced rate to topics of its own, with the
/// same warm-up; idle and steady only.
async fn floor_peer(ctx: &Ctx) -> Result<Peer> {
    let wm = Arc::new(Watermarks::new(
        &ctx.env.brokers,
        ctx.env.peer_topics(&ctx.env.floor_prefix),
        env::PARTITIONS,
    )?);
    let prefix = ctx.env.floor_prefix.clone();
    let settings = floor::settings(&ctx.env.brokers, &ctx.opts.relay_env)?;
    let f = Arc::new(Floor::new(
        settings,
        ctx.env.catalog.clone(),
        ctx.env.mix.clone(),
        &prefix,
    )?);
    eprintln!("[bench] floor: a bare producer ({})", f.describe());
    let mut peer = Peer {
        name: "floor".into(),
        drain: None,
        idle: None,
        steady: None,
        max: None,
        empty_outbox: None,
        max_rate_without: None,
    };
    // The peers' warm-up: the producer's connections and metadata, the
    // broker's first appends to each partition.
    let before = tokio::task::block_in_place(|| wm.read())?;
    let w = f
        .produce(
            ctx.seq.clone(),
            ctx.params.steady_writers,
            ctx.params.steady_rate.min(2000.0),
            Duration::from_secs_f64(ctx.params.warmup_secs),
        )
        .await?;
    check_errors(&w, "the floor's topics")?;
    wait_appended(
        &wm,
        before.total() + w.commits.len() as i64,
        Duration::from_secs(300),
    )
    .await
    .context("floor warm-up: events did not reach Kafka")?;
    eprintln!(
        "[bench] floor warm-up: {} events delivered",
        w.commits.len()
    );
    let d = Driver::Floor(&f);
    for mode in ["idle", "steady"] {
        if !ctx.mode(mode) {
            continue;
        }
        ctx.env.checkpoint().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        match (mode, load_phase(ctx, &d, &wm, &prefix, mode).await?) {
            ("idle", Phase::Idle(x)) => peer.idle = Some(x),
            (_, Phase::Load(x)) => peer.steady = Some(x),
            _ => unreachable!(),
        }
    }
    tokio::task::block_in_place(|| f.flush());
    Ok(peer)
}

async fn debezium_peer(ctx: &Ctx, rate_without: Option<f64>) -> Result<Peer> {
    let wm = Arc::new(Watermarks::new(
        &ctx.env.brokers,
        ctx.env.peer_topics(&ctx.env.dbz_prefix),
        env::PARTITIONS,
    )?);
    let prefix = ctx.env.dbz_prefix.clone();
    eprintln!("[bench] starting Kafka Connect + Debezium (jars fetched on first use)");
    let envs = ctx
        .env
        .debezium_env(ctx.opts.connect_port, &ctx.out.join("debezium-connect.log"))?;
    let mut dbz = tokio::task::block_in_place(|| Debezium::start(envs, ctx.opts.connect_port))?;
    let d = Driver::Debezium(&dbz);
    let mut peer = Peer {
        name: "Debezium".into(),
        drain: None,
        idle: None,
        steady: None,
        max: None,
        empty_outbox: None,
        max_rate_without: rate_without,
    };
    let result: Result<()> = async {
        warm_up(ctx, Shape::Debezium, &wm, "Debezium").await?;
        ctx.env.truncate("dbz_outbox").await?;
        if ctx.mode("idle") {
            ctx.env.checkpoint().await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            // For comparison only: a failure here does not end the run.
            match empty_outbox(ctx, "Debezium", &[dbz.pid], false).await {
                Ok(e) => peer.empty_outbox = Some(e),
                Err(e) => eprintln!("warning: Debezium empty outbox: {e:#}"),
            }
        }
        for mode in ["idle", "steady", "max"] {
            if !ctx.mode(mode) {
                continue;
            }
            ctx.env.checkpoint().await?;
            match (mode, load_phase(ctx, &d, &wm, &prefix, mode).await?) {
                ("idle", Phase::Idle(x)) => peer.idle = Some(x),
                ("steady", Phase::Load(x)) => peer.steady = Some(x),
                (_, Phase::Load(x)) => peer.max = Some(x),
                _ => unreachable!(),
            }
        }
        if ctx.mode("drain") {
            let n = ctx.params.drain_events;
            // Paused, the connector leaves the new rows in the WAL; resumed,
            // it drains them: the same start as a relay started on a backlog.
            dbz.connector("pause").await?;
            dbz.wait_state("PAUSED", Duration::from_secs(60)).await?;
            eprintln!("[bench] Debezium drain: preloading {n} events (connector paused)");
            let before = wm.read()?;
            workload::preload(
                &ctx.env.db_url,
                Shape::Debezium,
                ctx.env.mix.clone(),
                ctx.seq.clone(),
                n,
                1000,
            )
            .await?;
            ctx.env.checkpoint().await?;
            dbz.rss.take_peak(dbz.pid);
            let monitor = cpu::CpuMonitor::start(&ctx.env.db_name);
            let t0 = Instant::now();
            dbz.connector("resume").await?;
            let (acked_at, after) =
                wait_appended(&wm, before.total() + n as i64, Duration::from_secs(1800)).await?;
            let cpu = monitor.finish();
            let rss = dbz.rss.take_peak(dbz.pid);
            let secs = (acked_at - t0).as_secs_f64();
            eprintln!("[bench] Debezium drain: {n} events in {secs:.2} s");
            let rb = read_back(ctx, &before, &after, &prefix, "id").await?;
            peer.drain = Some(Drain {
                events: n,
                acked_s: secs,
                deleted_s: None,
                events_per_s: n as f64 / secs,
                rss_mib: rss,
                integrity: drain_integrity(n, &rb),
                batch_timings: None,
                cpu,
            });
        }
        Ok(())
    }
    .await;
    tokio::task::block_in_place(|| dbz.stop())?;
    result?;
    Ok(peer)
}
