//! Where the machine's CPU went during a phase: every process is sampled
//! from /proc every 100 ms and charged to a component (the relay, this run's
//! Postgres backends, Postgres' shared processes, the Kafka broker, Kafka
//! Connect, the harness itself, everything else). Processes that start and
//! exit within the phase (a relay, writer backends) are counted up to their
//! last sample.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct CpuSplit {
    pub wall_s: f64,
    /// CPU seconds per component, largest first.
    pub cpu_s: Vec<(String, f64)>,
    /// Busy share of all cores over the phase, percent.
    pub machine_busy_pct: f64,
}

struct Proc {
    component: &'static str,
    first: u64,
    last: u64,
}

pub struct CpuMonitor {
    stop: Arc<AtomicBool>,
    procs: Arc<Mutex<HashMap<u32, Proc>>>,
    db_name: String,
    handle: Option<std::thread::JoinHandle<()>>,
    started: Instant,
    busy0: (u64, u64),
}

fn ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn component(pid: u32, db_name: &str) -> &'static str {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    let comm = comm.trim();
    if comm.starts_with("outbox-relay") {
        "relay"
    } else if comm == "outbox-bench" {
        "harness (writers, checks)"
    } else if comm == "postgres" || cmd.starts_with("postgres") {
        if cmd.contains("walsender") {
            "postgres: WAL senders (logical decoding)"
        } else if cmd.contains(db_name) {
            "postgres: this run's sessions"
        } else if cmd.contains('(') {
            "postgres: other sessions"
        } else {
            "postgres: shared (WAL writer, checkpointer, ...)"
        }
    } else if cmd.contains("ConnectStandalone") {
        "kafka connect + debezium"
    } else if cmd.contains("kafka.Kafka") {
        let state =
            std::env::var("OUTBOX_STATE_DIR").unwrap_or_else(|_| "/var/tmp/outbox-relay".into());
        if cmd.contains(&format!("{state}/kafka/server.properties")) {
            "kafka broker"
        } else {
            "other kafka brokers"
        }
    } else {
        "other"
    }
}

/// (busy, total) jiffies of all CPUs.
pub fn machine() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = s.lines().next().unwrap_or("");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn scan(procs: &Mutex<HashMap<u32, Proc>>, db_name: &str, baseline: bool) {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    let mut map = procs.lock().expect("cpu monitor lock");
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Some(t) = ticks(pid) else { continue };
        map.entry(pid)
            .and_modify(|p| p.last = t)
            .or_insert_with(|| Proc {
                component: component(pid, db_name),
                // A process first seen after the start began during the
                // phase: all its time counts.
                first: if baseline { t } else { 0 },
                last: t,
            });
    }
}

impl CpuMonitor {
    pub fn start(db_name: &str) -> Self {
        let procs = Arc::new(Mutex::new(HashMap::new()));
        scan(&procs, db_name, true);
        let stop = Arc::new(AtomicBool::new(false));
        let (s, p, db) = (stop.clone(), procs.clone(), db_name.to_string());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                scan(&p, &db, false);
            }
        });
        CpuMonitor {
            stop,
            procs,
            handle: Some(handle),
            db_name: db_name.to_string(),
            started: Instant::now(),
            busy0: machine(),
        }
    }

    /// Charges these processes to `component` instead of the one their
    /// name gives (e.g. one peer's PostgreSQL backends among the run's).
    /// Processes not seen yet are recorded now, from their current time.
    pub fn relabel(&self, pids: &[u32], component: &'static str) {
        let mut map = self.procs.lock().expect("cpu monitor lock");
        for &pid in pids {
            if let Some(p) = map.get_mut(&pid) {
                p.component = component;
            } else if let Some(t) = ticks(pid) {
                map.insert(
                    pid,
                    Proc {
                        component,
                        first: t,
                        last: t,
                    },
                );
            }
        }
    }

    pub fn finish(mut self) -> CpuSplit {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        // A last sample, so the phase's end is counted up to now.
        scan(&self.procs, &self.db_name, false);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut by: HashMap<&'static str, u64> = HashMap::new();
        for p in self.procs.lock().expect("cpu monitor lock").values() {
            *by.entry(p.component).or_default() += p.last.saturating_sub(p.first);
        }
        let mut cpu_s: Vec<(String, f64)> = by
            .into_iter()
            .filter(|(_, t)| *t > 0)
            .map(|(c, t)| (c.to_string(), t as f64 / hz))
            .collect();
        cpu_s.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (b1, t1) = machine();
        let busy = (b1 - self.busy0.0) as f64 / (t1 - self.busy0.1).max(1) as f64 * 100.0;
        CpuSplit {
            wall_s: self.started.elapsed().as_secs_f64(),
            cpu_s,
            machine_busy_pct: busy,
        }
    }
}

/// CPU seconds (user and system, every thread) a process has used so far.
pub fn process_cpu_s(pid: u32) -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks(pid).map(|t| t as f64 / hz)
}

/// The local Kafka broker's process (the one the monitor charges to
/// "kafka broker"), if it runs on this machine.
pub fn kafka_broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| component(pid, "") == "kafka broker")
}

/// Busy CPU seconds of all cores between two [`machine`] readings.
pub fn busy_s(from: (u64, u64), to: (u64, u64)) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    to.0.saturating_sub(from.0) as f64 / hz
}
