//! Results: the JSON document, the Markdown table and the target checks.

use serde::Serialize;

use crate::analysis::{Latency, Sample};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Integrity {
    pub written: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub misrouted: u64,
    pub foreign: u64,
}

impl Integrity {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.misrouted == 0 && self.foreign == 0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Drain {
    pub events: u64,
    /// From starting (relay) or resuming (Debezium) until Kafka held every
    /// event (for the relay: until the outbox was empty, which it empties
    /// only after Kafka's acknowledgements).
    pub acked_s: f64,
    /// Relay only: until the outbox was empty.
    pub deleted_s: Option<f64>,
    pub events_per_s: f64,
    pub rss_mib: f64,
    pub integrity: Integrity,
    /// Relay only, when its trace-level batch timings were logged.
    pub batch_timings: Option<crate::procs::BatchTimings>,
    pub cpu: crate::cpu::CpuSplit,
}

#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    pub events: u64,
    pub latency: Latency,
    pub rss_mib: f64,
    pub integrity: Integrity,
}

/// What an empty outbox costs a peer: the CPU of its process and of its
/// PostgreSQL sessions over `seconds` with nothing written, after its
/// warm-up, in percent of one core.
#[derive(Debug, Clone, Serialize)]
pub struct EmptyOutbox {
    pub seconds: f64,
    /// The relay process (Debezium: the Kafka Connect worker).
    pub process_pct: f64,
    /// The peer's own backends in this run's database.
    pub postgres_pct: f64,
    pub postgres_sessions: usize,
    /// `process_pct + postgres_pct`.
    pub total_pct: f64,
    /// Shown, not part of the sum.
    pub kafka_broker_pct: f64,
    /// Busy share of all cores over the window, percent.
    pub machine_busy_pct: f64,
    pub cpu: crate::cpu::CpuSplit,
}

#[derive(Debug, Clone, Serialize)]
pub struct Load {
    pub writers: usize,
    pub seconds: f64,
    /// `None`: as fast as the writers can.
    pub target_rate: Option<f64>,
    pub commit_rate: f64,
    pub latency: Latency,
    pub max_oldest_pending_ms: f64,
    pub max_backlog: u64,
    /// From the last commit until Kafka held every event.
    pub catch_up_s: f64,
    pub rss_mib: f64,
    pub integrity: Integrity,
    pub batch_timings: Option<crate::procs::BatchTimings>,
    pub cpu: crate::cpu::CpuSplit,
    pub timeline: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Peer {
    pub name: String,
    pub drain: Option<Drain>,
    pub idle: Option<Idle>,
    pub steady: Option<Load>,
    pub max: Option<Load>,
    /// Idle mode: the CPU an empty outbox costs, before the idle events.
    pub empty_outbox: Option<EmptyOutbox>,
    /// Writer commit rate into this peer's outbox shape with nothing relaying.
    pub max_rate_without: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tax {
    pub writers: usize,
    pub seconds: f64,
    /// Single-event transactions per second into each table.
    pub outbox_rate: f64,
    pub plain_rate: f64,
    pub dbz_rate: f64,
    /// How much slower the outbox (trigger included) is than the plain
    /// table of the same shape, percent.
    pub tax_pct: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub value: String,
    pub met: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub run_id: String,
    pub mode: String,
    pub started_at: String,
    pub host: Host,
    pub tax: Option<Tax>,
    pub relay: Peer,
    pub debezium: Option<Peer>,
    /// The floor: a bare producer with the relay's producer settings at the
    /// same rate, no PostgreSQL; its latency is send → append (idle and
    /// steady only).
    pub floor: Option<Peer>,
    /// Each peer's latency minus the floor's.
    pub over_floor: Option<OverFloor>,
    pub targets: Vec<Target>,
}

/// What each peer adds over the floor, ms (`None` where a mode did not run).
#[derive(Debug, Clone, Default, Serialize)]
pub struct OverFloor {
    pub relay_steady_p50_ms: Option<f64>,
    pub relay_steady_p99_ms: Option<f64>,
    pub relay_idle_p50_ms: Option<f64>,
    pub debezium_steady_p50_ms: Option<f64>,
    pub debezium_steady_p99_ms: Option<f64>,
    pub debezium_idle_p50_ms: Option<f64>,
}

pub fn over_floor(relay: &Peer, floor: &Peer, debezium: Option<&Peer>) -> OverFloor {
    let steady = |p: &Peer, f: fn(&Latency) -> f64| {
        Some(f(&p.steady.as_ref()?.latency) - f(&floor.steady.as_ref()?.latency))
    };
    let idle =
        |p: &Peer| Some(p.idle.as_ref()?.latency.p50_ms - floor.idle.as_ref()?.latency.p50_ms);
    OverFloor {
        relay_steady_p50_ms: steady(relay, |l| l.p50_ms),
        relay_steady_p99_ms: steady(relay, |l| l.p99_ms),
        relay_idle_p50_ms: idle(relay),
        debezium_steady_p50_ms: debezium.and_then(|d| steady(d, |l| l.p50_ms)),
        debezium_steady_p99_ms: debezium.and_then(|d| steady(d, |l| l.p99_ms)),
        debezium_idle_p50_ms: debezium.and_then(idle),
    }
}

/// The floor's table: its idle and steady latency beside each peer's and
/// the difference, then the p99 differences in a line each.
fn floor_section(r: &Results, floor: &Peer) -> String {
    let d = r.debezium.as_ref();
    let mut s = String::from(
        "\nThe floor: a bare producer with the relay's producer configuration (acks=all, \
         idempotence, the relay's compression and linger.ms) producing the same events, keys and sizes at the same rate to topics \
         of its own, no PostgreSQL; its latency runs from just before `send` to the broker's \
         append.\n\n",
    );
    if d.is_some() {
        s.push_str(
            "| measure | floor | outbox-relay | relay − floor | Debezium 3.6.1 | Debezium − floor |\n\
             |---|---:|---:|---:|---:|---:|\n",
        );
    } else {
        s.push_str("| measure | floor | outbox-relay | relay − floor |\n|---|---:|---:|---:|\n");
    }
    type Pick = fn(&Peer) -> Option<f64>;
    let rows: [(&str, Pick); 6] = [
        ("steady p50, ms", |p| {
            Some(p.steady.as_ref()?.latency.p50_ms)
        }),
        ("steady p90, ms", |p| {
            Some(p.steady.as_ref()?.latency.p90_ms)
        }),
        ("steady p99, ms", |p| {
            Some(p.steady.as_ref()?.latency.p99_ms)
        }),
        ("steady max, ms", |p| {
            Some(p.steady.as_ref()?.latency.max_ms)
        }),
        ("idle single event p50, ms", |p| {
            Some(p.idle.as_ref()?.latency.p50_ms)
        }),
        ("idle single event max, ms", |p| {
            Some(p.idle.as_ref()?.latency.max_ms)
        }),
    ];
    let cell = |v: Option<f64>| v.map_or("–".into(), fmt_ms);
    let diff = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => fmt_ms(a - b),
        _ => "–".into(),
    };
    for (label, pick) in rows {
        let Some(fv) = pick(floor) else { continue };
        let rv = pick(&r.relay);
        s.push_str(&format!(
            "| {label} | {} | {} | {} |",
            fmt_ms(fv),
            cell(rv),
            diff(rv, Some(fv))
        ));
        if let Some(d) = d {
            let dv = pick(d);
            s.push_str(&format!(" {} | {} |", cell(dv), diff(dv, Some(fv))));
        }
        s.push('\n');
    }
    if let Some(o) = &r.over_floor {
        s.push('\n');
        if let Some(x) = o.relay_steady_p99_ms {
            s.push_str(&format!("relay p99 − floor p99 = {x:.1} ms (steady)\n"));
        }
        if let Some(x) = o.debezium_steady_p99_ms {
            s.push_str(&format!("Debezium p99 − floor p99 = {x:.1} ms (steady)\n"));
        }
    }
    s
}

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub cpus: usize,
    pub mem_gib: f64,
    pub relay_binary: String,
}

fn fmt_rate(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_pct(v: f64) -> String {
    format!("{v:.1} %")
}

fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// How many times better the relay is: `higher` for rates, else for times.
fn ratio(relay: Option<f64>, dbz: Option<f64>, higher_is_better: bool) -> String {
    match (relay, dbz) {
        (Some(r), Some(d)) if r > 0.0 && d > 0.0 && r.is_finite() && d.is_finite() => {
            let x = if higher_is_better { r / d } else { d / r };
            format!("{x:.1}×")
        }
        _ => "–".into(),
    }
}

struct Row {
    label: &'static str,
    relay: Option<f64>,
    dbz: Option<f64>,
    fmt: fn(f64) -> String,
    higher_is_better: Option<bool>,
}

pub fn markdown(r: &Results) -> String {
    let d = r.debezium.as_ref();
    let rl = &r.relay;
    let lat = |l: &Option<Load>, f: fn(&Latency) -> f64| l.as_ref().map(|x| f(&x.latency));
    let rows = vec![
        Row {
            label: "drain, events/s",
            relay: rl.drain.as_ref().map(|x| x.events_per_s),
            dbz: d.and_then(|d| d.drain.as_ref().map(|x| x.events_per_s)),
            fmt: fmt_rate,
            higher_is_better: Some(true),
        },
        Row {
            label: "steady commit rate, events/s",
            relay: rl.steady.as_ref().map(|x| x.commit_rate),
            dbz: d.and_then(|d| d.steady.as_ref().map(|x| x.commit_rate)),
            fmt: fmt_rate,
            higher_is_better: None,
        },
        Row {
            label: "steady p50 commit→append, ms",
            relay: lat(&rl.steady, |l| l.p50_ms),
            dbz: d.and_then(|d| lat(&d.steady, |l| l.p50_ms)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
        Row {
            label: "steady p90, ms",
            relay: lat(&rl.steady, |l| l.p90_ms),
            dbz: d.and_then(|d| lat(&d.steady, |l| l.p90_ms)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
        Row {
            label: "steady p99, ms",
            relay: lat(&rl.steady, |l| l.p99_ms),
            dbz: d.and_then(|d| lat(&d.steady, |l| l.p99_ms)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
        Row {
            label: "steady max, ms",
            relay: lat(&rl.steady, |l| l.max_ms),
            dbz: d.and_then(|d| lat(&d.steady, |l| l.max_ms)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
        Row {
            label: "idle single event p50, ms",
            relay: rl.idle.as_ref().map(|x| x.latency.p50_ms),
            dbz: d.and_then(|d| d.idle.as_ref().map(|x| x.latency.p50_ms)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
        Row {
            label: "idle single event max, ms",
            relay: rl.idle.as_ref().map(|x| x.latency.max_ms),
            dbz: d.and_then(|d| d.idle.as_ref().map(|x| x.latency.max_ms)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
        Row {
            label: "idle, empty outbox: CPU of one core, relay + its PostgreSQL sessions",
            relay: rl.empty_outbox.as_ref().map(|x| x.total_pct),
            dbz: d.and_then(|d| d.empty_outbox.as_ref().map(|x| x.total_pct)),
            fmt: fmt_pct,
            higher_is_better: Some(false),
        },
        Row {
            label: "max writer rate, nothing relaying, events/s",
            relay: rl.max_rate_without,
            dbz: d.and_then(|d| d.max_rate_without),
            fmt: fmt_rate,
            higher_is_better: Some(true),
        },
        Row {
            label: "max writer rate, relaying, events/s",
            relay: rl.max.as_ref().map(|x| x.commit_rate),
            dbz: d.and_then(|d| d.max.as_ref().map(|x| x.commit_rate)),
            fmt: fmt_rate,
            higher_is_better: Some(true),
        },
        Row {
            label: "max: oldest pending age, ms",
            relay: rl.max.as_ref().map(|x| x.max_oldest_pending_ms),
            dbz: d.and_then(|d| d.max.as_ref().map(|x| x.max_oldest_pending_ms)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
        Row {
            label: "max: p99 commit→append, ms",
            relay: lat(&rl.max, |l| l.p99_ms),
            dbz: d.and_then(|d| lat(&d.max, |l| l.p99_ms)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
        Row {
            label: "RSS drain, MiB",
            relay: rl.drain.as_ref().map(|x| x.rss_mib),
            dbz: d.and_then(|d| d.drain.as_ref().map(|x| x.rss_mib)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
        Row {
            label: "RSS idle, MiB",
            relay: rl.idle.as_ref().map(|x| x.rss_mib),
            dbz: d.and_then(|d| d.idle.as_ref().map(|x| x.rss_mib)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
        Row {
            label: "RSS steady, MiB",
            relay: rl.steady.as_ref().map(|x| x.rss_mib),
            dbz: d.and_then(|d| d.steady.as_ref().map(|x| x.rss_mib)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
        Row {
            label: "RSS max, MiB",
            relay: rl.max.as_ref().map(|x| x.rss_mib),
            dbz: d.and_then(|d| d.max.as_ref().map(|x| x.rss_mib)),
            fmt: fmt_ms,
            higher_is_better: Some(false),
        },
    ];
    let mut s = String::new();
    s.push_str(&format!(
        "## outbox-bench {} ({}, run {})\n\n",
        r.mode, r.started_at, r.run_id
    ));
    if d.is_some() {
        s.push_str(
            "| measure | outbox-relay | Debezium 3.6.1 | relay advantage |\n|---|---:|---:|---:|\n",
        );
    } else {
        s.push_str("| measure | outbox-relay |\n|---|---:|\n");
    }
    for row in rows {
        let Some(rv) = row.relay else { continue };
        if d.is_some() {
            let adv = match row.higher_is_better {
                Some(h) => ratio(Some(rv), row.dbz, h),
                None => String::new(),
            };
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                row.label,
                (row.fmt)(rv),
                row.dbz.map_or("–".into(), row.fmt),
                adv
            ));
        } else {
            s.push_str(&format!("| {} | {} |\n", row.label, (row.fmt)(rv)));
        }
    }
    if let Some(f) = &r.floor {
        s.push_str(&floor_section(r, f));
    }
    if let Some(t) = &r.tax {
        s.push_str(&format!(
            "\nWriter tax ({} writers, {:.0} s per table, single-event transactions, nothing relaying): \
             outbox {} /s, the same table without its trigger {} /s ({:.1} % tax)",
            t.writers,
            t.seconds,
            fmt_rate(t.outbox_rate),
            fmt_rate(t.plain_rate),
            t.tax_pct,
        ));
        if t.dbz_rate > 0.0 {
            s.push_str(&format!(
                ", Debezium's outbox table {} /s",
                fmt_rate(t.dbz_rate)
            ));
        }
        s.push_str(".\n");
    }
    let mut integrity = Vec::new();
    for p in std::iter::once(rl).chain(d).chain(r.floor.as_ref()) {
        let parts: [(&str, Option<&Integrity>); 4] = [
            ("drain", p.drain.as_ref().map(|x| &x.integrity)),
            ("idle", p.idle.as_ref().map(|x| &x.integrity)),
            ("steady", p.steady.as_ref().map(|x| &x.integrity)),
            ("max", p.max.as_ref().map(|x| &x.integrity)),
        ];
        for (mode, i) in parts {
            if let Some(i) = i {
                integrity.push(format!(
                    "{} {mode}: {} written, {} missing, {} duplicated, {} misrouted",
                    p.name, i.written, i.missing, i.duplicates, i.misrouted
                ));
            }
        }
    }
    s.push_str(&format!("\nDelivery check: {}.\n", integrity.join("; ")));
    for p in std::iter::once(rl).chain(d) {
        if let Some(e) = &p.empty_outbox {
            s.push_str(&format!("\n{}\n", empty_outbox_line(&p.name, e)));
        }
    }
    for p in std::iter::once(rl).chain(d).chain(r.floor.as_ref()) {
        let splits = [
            ("drain", p.drain.as_ref().map(|x| &x.cpu)),
            ("steady", p.steady.as_ref().map(|x| &x.cpu)),
            ("max", p.max.as_ref().map(|x| &x.cpu)),
        ];
        for (mode, c) in splits {
            if let Some(c) = c {
                let parts: Vec<String> = c
                    .cpu_s
                    .iter()
                    .filter(|(_, s)| *s >= 0.05)
                    .map(|(n, s)| format!("{n} {s:.1}"))
                    .collect();
                s.push_str(&format!(
                    "\nCPU, {} {mode} ({:.1} s wall, machine {:.0} % busy), CPU-seconds: {}.\n",
                    p.name,
                    c.wall_s,
                    c.machine_busy_pct,
                    parts.join(", ")
                ));
            }
        }
    }
    let timings = [
        (
            "drain",
            rl.drain.as_ref().and_then(|x| x.batch_timings.as_ref()),
        ),
        (
            "steady",
            rl.steady.as_ref().and_then(|x| x.batch_timings.as_ref()),
        ),
        (
            "max",
            rl.max.as_ref().and_then(|x| x.batch_timings.as_ref()),
        ),
    ];
    for (mode, t) in timings {
        if let Some(t) = t {
            let stages: Vec<String> = t
                .stages_us
                .iter()
                .map(|(s, us)| format!("{s} {:.2} ms", us / 1000.0))
                .collect();
            s.push_str(&format!(
                "\nRelay batch timings, {mode}: {} batches of {:.0} rows on average; per batch {}.\n",
                t.batches,
                t.mean_rows,
                stages.join(", ")
            ));
        }
    }
    if !r.targets.is_empty() {
        s.push_str("\n| target | goal | measured | met |\n|---|---|---|---|\n");
        for t in &r.targets {
            s.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                t.name,
                t.goal,
                t.value,
                if t.met { "yes" } else { "**no**" }
            ));
        }
    }
    s
}

/// One line on what an empty outbox cost a peer.
pub fn empty_outbox_line(name: &str, e: &EmptyOutbox) -> String {
    let process = if name == "outbox-relay" {
        "relay"
    } else {
        "Kafka Connect"
    };
    format!(
        "{name} empty outbox: {process} {:.1} % + PostgreSQL {:.1} % ({} sessions) = {:.1} % of one core \
         over {:.0} s, nothing written; Kafka broker {:.1} % (not counted), machine {:.0} % busy",
        e.process_pct,
        e.postgres_pct,
        e.postgres_sessions,
        e.total_pct,
        e.seconds,
        e.kafka_broker_pct,
        e.machine_busy_pct
    )
}

/// The targets, checked against this run.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let rl = &r.relay;
    let d = r.debezium.as_ref();
    if let Some(x) = &rl.drain {
        t.push(Target {
            name: "drain throughput".into(),
            goal: "≥ 100 k events/s".into(),
            value: format!("{} events/s", fmt_rate(x.events_per_s)),
            met: x.events_per_s >= 100_000.0,
        });
    }
    if let Some(x) = &rl.steady {
        let rate = x.target_rate.unwrap_or(0.0);
        t.push(Target {
            name: format!("steady {} events/s p99", fmt_rate(rate)),
            goal: "≤ 50 ms, rate held".into(),
            value: format!(
                "{} ms at {} /s",
                fmt_ms(x.latency.p99_ms),
                fmt_rate(x.commit_rate)
            ),
            met: x.latency.p99_ms <= 50.0 && x.commit_rate >= 0.97 * rate,
        });
    }
    if let Some(x) = &rl.idle {
        t.push(Target {
            name: "idle single-event latency".into(),
            goal: "≤ 15 ms (every event)".into(),
            value: format!(
                "p50 {} ms, max {} ms",
                fmt_ms(x.latency.p50_ms),
                fmt_ms(x.latency.max_ms)
            ),
            met: x.latency.max_ms <= 15.0,
        });
    }
    if let Some(x) = &rl.empty_outbox {
        t.push(Target {
            name: "empty outbox, relay + its PostgreSQL sessions".into(),
            goal: "≤ 2 % of one core".into(),
            value: format!(
                "{:.1} % ({:.1} % + {:.1} %) over {:.0} s",
                x.total_pct, x.process_pct, x.postgres_pct, x.seconds
            ),
            met: x.total_pct <= 2.0,
        });
    }
    if let Some(x) = &rl.max {
        t.push(Target {
            name: "oldest pending at the writers' max rate".into(),
            goal: "< 1 s".into(),
            value: format!(
                "{} ms at {} /s",
                fmt_ms(x.max_oldest_pending_ms),
                fmt_rate(x.commit_rate)
            ),
            met: x.max_oldest_pending_ms < 1000.0,
        });
    }
    let rss: Vec<f64> = [
        rl.drain.as_ref().map(|x| x.rss_mib),
        rl.idle.as_ref().map(|x| x.rss_mib),
        rl.steady.as_ref().map(|x| x.rss_mib),
        rl.max.as_ref().map(|x| x.rss_mib),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !rss.is_empty() {
        let peak = rss.iter().cloned().fold(0.0, f64::max);
        t.push(Target {
            name: "relay RSS, every mode".into(),
            goal: "≤ 64 MiB".into(),
            value: format!("peak {peak:.1} MiB"),
            met: peak <= 64.0,
        });
    }
    if let Some(x) = r.over_floor.as_ref().and_then(|o| o.relay_steady_p99_ms) {
        t.push(Target {
            name: "steady p99 over the floor (bare producer)".into(),
            goal: "≤ 10 ms".into(),
            value: format!("{} ms", fmt_ms(x)),
            met: x <= 10.0,
        });
    }
    if let Some(d) = d {
        if let (Some(a), Some(b)) = (&rl.drain, &d.drain) {
            let x = a.events_per_s / b.events_per_s;
            t.push(Target {
                name: "throughput vs Debezium (drain)".into(),
                goal: "≥ 3×".into(),
                value: format!("{x:.1}×"),
                met: x >= 3.0,
            });
        }
        if let (Some(a), Some(b)) = (&rl.steady, &d.steady) {
            let x = b.latency.p99_ms / a.latency.p99_ms;
            t.push(Target {
                name: "steady p99 vs Debezium".into(),
                goal: "≥ 5× lower".into(),
                value: format!("{x:.1}× lower"),
                met: x >= 5.0,
            });
        }
    }
    let all_delivered = std::iter::once(rl)
        .chain(d)
        .chain(r.floor.as_ref())
        .all(|p| {
            p.drain.as_ref().is_none_or(|x| x.integrity.ok())
                && p.idle.as_ref().is_none_or(|x| x.integrity.ok())
                && p.steady.as_ref().is_none_or(|x| x.integrity.ok())
                && p.max.as_ref().is_none_or(|x| x.integrity.ok())
        });
    t.push(Target {
        name: "every event delivered, on its topic and key".into(),
        goal: "0 missing, 0 misrouted".into(),
        value: if all_delivered {
            "yes".into()
        } else {
            "no".into()
        },
        met: all_delivered,
    });
    t
}
