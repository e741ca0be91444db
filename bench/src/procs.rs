//! The two peers as separate processes: the real `outbox-relay run` binary
//! (configured through environment variables, as a deployment would) and
//! Kafka Connect standalone with Debezium (through bench/peers/debezium/run.sh).
//! Both are sampled for resident memory while they run.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Builds the release `outbox-relay` binary (a no-op when it is up to date)
/// and returns its path, so every run measures the current source.
pub fn build_relay() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = workspace_root();
    let out = Command::new(cargo)
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "--quiet",
            "--bin",
            "outbox-relay",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("cargo build --release --bin outbox-relay failed");
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "outbox-relay" {
            if let Some(exe) = v["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!("cargo did not report the outbox-relay executable")
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ has a parent")
        .to_path_buf()
}

/// Samples VmRSS of a process every 50 ms; keeps the peak.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak_kib.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match rss_kib(pid) {
                    Some(kib) => {
                        p.fetch_max(kib, Ordering::Relaxed);
                    }
                    None => return,
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler {
            stop,
            peak_kib,
            handle: Some(handle),
        }
    }

    /// Peak so far, then starts a new window (the next mode's peak).
    pub fn take_peak(&self, current_pid: u32) -> f64 {
        let peak = self
            .peak_kib
            .swap(rss_kib(current_pid).unwrap_or(0), Ordering::Relaxed);
        peak as f64 / 1024.0
    }

    pub fn peak_mib(&self) -> f64 {
        self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

pub fn sigterm(pid: u32) {
    // SAFETY: kill(2) with a pid this harness spawned; no memory is shared.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
}

/// A running `outbox-relay run`.
pub struct RelayProcess {
    child: Child,
    pub rss: RssSampler,
    pub started: Instant,
}

impl RelayProcess {
    /// Starts the relay; its log goes to `log`. Returns once it logged
    /// "relay started" (connected to both Postgres and Kafka) when `wait`.
    pub fn spawn(bin: &Path, env: &[(String, String)], log: &Path, wait: bool) -> Result<Self> {
        let started = Instant::now();
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .current_dir(workspace_root())
            .env("OUTBOX_RELAY_CONFIG", "/dev/null")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let rss = RssSampler::start(child.id());
        let stderr = child.stderr.take().expect("piped");
        let mut file = std::fs::File::create(log)?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(file, "{line}");
                if line.contains("relay started") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let mut p = RelayProcess {
            child,
            rss,
            started,
        };
        if wait && rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = p.child.kill();
            bail!("the relay did not start within 60 s; see {}", log.display());
        }
        if let Some(status) = p.child.try_wait()? {
            bail!(
                "the relay exited at start ({status}); see {}",
                log.display()
            );
        }
        Ok(p)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits (SIGKILL after 30 s). Returns the peak RSS in MiB.
    pub fn stop(mut self) -> Result<f64> {
        let peak = self.rss.peak_mib();
        sigterm(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    eprintln!("warning: the relay exited with {status}");
                }
                return Ok(peak);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the relay did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Kafka Connect standalone with the Debezium connector, driven through
/// bench/peers/debezium/run.sh and the worker's REST API.
pub struct Debezium {
    pub env: Vec<(String, String)>,
    pub rest_port: u16,
    pub pid: u32,
    pub rss: RssSampler,
    stopped: bool,
}

pub const CONNECTOR: &str = "outbox-bench";

fn run_sh() -> PathBuf {
    workspace_root().join("bench/peers/debezium/run.sh")
}

impl Debezium {
    /// Fetches the jars (cached) and starts the worker; returns when the
    /// connector and its task report RUNNING.
    pub fn start(env: Vec<(String, String)>, rest_port: u16) -> Result<Self> {
        let out = Command::new("bash")
            .arg(run_sh())
            .arg("start")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::inherit())
            .output()
            .context("running bench/peers/debezium/run.sh start")?;
        if !out.status.success() {
            bail!("bench/peers/debezium/run.sh start failed (its message is above)");
        }
        let pid: u32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("run.sh start prints the worker's pid")?;
        Ok(Debezium {
            env,
            rest_port,
            pid,
            rss: RssSampler::start(pid),
            stopped: false,
        })
    }

    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let status = Command::new("bash")
            .arg(run_sh())
            .arg("stop")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .status()?;
        if !status.success() {
            bail!("bench/peers/debezium/run.sh stop failed");
        }
        Ok(())
    }

    /// PUT /connectors/<name>/pause|resume on the worker's REST API.
    pub async fn connector(&self, action: &str) -> Result<()> {
        let (code, body) = http(
            self.rest_port,
            "PUT",
            &format!("/connectors/{CONNECTOR}/{action}"),
        )
        .await?;
        if !(200..300).contains(&code) {
            bail!("connector {action}: HTTP {code}: {body}");
        }
        Ok(())
    }

    /// Waits until the connector and its task report `state`.
    pub async fn wait_state(&self, state: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, body) = http(
                self.rest_port,
                "GET",
                &format!("/connectors/{CONNECTOR}/status"),
            )
            .await
            .unwrap_or((0, String::new()));
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) {
                let tasks = v["tasks"].as_array().cloned().unwrap_or_default();
                if v["connector"]["state"] == state
                    && !tasks.is_empty()
                    && tasks.iter().all(|t| t["state"] == state)
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("connector not {state} after {timeout:?}: {body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Debezium {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A minimal HTTP request to 127.0.0.1 (the Connect REST API needs no more,
/// and it keeps an HTTP client stack out of the harness). HTTP/1.0 so that
/// the answer is never chunked.
pub async fn http(port: u16, method: &str, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// Per-batch stage timings the relay logs at trace level ("batch timings",
/// enabled with `--relay-env RUST_LOG=info,outbox_relay::relay=trace`),
/// averaged over a mode.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BatchTimings {
    pub batches: u64,
    pub mean_rows: f64,
    /// Mean µs per batch of each stage, in the order the relay runs them.
    pub stages_us: Vec<(String, f64)>,
}

pub fn batch_timings(log: &Path) -> Option<BatchTimings> {
    let text = std::fs::read_to_string(log).ok()?;
    let mut t = BatchTimings::default();
    let mut rows = 0u64;
    let mut sums: Vec<(String, f64)> = Vec::new();
    for line in text.lines().filter(|l| l.contains("batch timings")) {
        t.batches += 1;
        for field in line.split_whitespace() {
            let Some((k, v)) = field.split_once('=') else {
                continue;
            };
            let Ok(v) = v.trim_matches(|c: char| !c.is_ascii_digit()).parse::<u64>() else {
                continue;
            };
            if k == "rows" {
                rows += v;
            } else if let Some(stage) = k.strip_suffix("_us") {
                match sums.iter_mut().find(|(s, _)| s == stage) {
                    Some((_, sum)) => *sum += v as f64,
                    None => sums.push((stage.to_string(), v as f64)),
                }
            }
        }
    }
    if t.batches == 0 {
        return None;
    }
    t.mean_rows = rows as f64 / t.batches as f64;
    t.stages_us = sums
        .into_iter()
        .map(|(s, sum)| (s, sum / t.batches as f64))
        .collect();
    Some(t)
}
