//! Running the `outbox-relay` binary and the repository's scripts.

use std::ffi::OsStr;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::TestEnv;

/// The `outbox-relay` binary, run from the repository root with no
/// configuration file and none of the caller's settings (`OUTBOX_RELAY_*`,
/// `DATABASE_URL`, `RUST_LOG`): whatever a test runs it with is explicit.
pub fn relay_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("OUTBOX_RELAY_") || name == "DATABASE_URL" || name == "RUST_LOG" {
            cmd.env_remove(&k);
        }
    }
    cmd.env("OUTBOX_RELAY_CONFIG", "/dev/null");
    cmd
}

/// [`relay_command`] with these environment variables.
pub fn relay_command_with<K: AsRef<OsStr>, V: AsRef<OsStr>>(vars: &[(K, V)]) -> Command {
    let mut cmd = relay_command();
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

/// Runs a command to its end: whether it succeeded, and its stdout
/// followed by its stderr.
pub fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A finished command's exit code, stdout and stderr, for a failure message.
pub fn output_text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The stdout of a command that must have succeeded.
pub fn stdout_of(out: &Output) -> String {
    assert!(out.status.success(), "{}", output_text(out));
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// A path in the repository.
pub fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Runs `bash scripts/<script> ARGS` from the repository root with these
/// environment variables; it must succeed. Its stdout (trimmed) and how
/// long it took.
pub fn script(script: &str, args: &[&str], vars: &[(String, String)]) -> (String, Duration) {
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(format!("scripts/{script}"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running scripts/{script}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{script} {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        started.elapsed(),
    )
}

/// [`script`] off the async runtime's threads; how long it took.
pub async fn script_async(script: &str, args: &[&str], vars: &[(String, String)]) -> Duration {
    let script = script.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let vars = vars.to_vec();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self::script(&script, &args, &vars).1
    })
    .await
    .unwrap()
}

/// `KEY=VALUE` lines (comments and blank lines aside) of an environment
/// file such as `scripts/faults.env`, which the scripts source and the
/// tests read, so that each value is written once.
pub fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The value of `key` in an [`env_file`].
pub fn env_value(vars: &[(String, String)], key: &str) -> String {
    vars.iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("{key} is not set"))
        .1
        .clone()
}

impl TestEnv {
    /// The `outbox-relay` binary pointed at this environment as the relay
    /// role ([`TestEnv::process_env`]).
    pub fn command(&self) -> Command {
        relay_command_with(&self.process_env())
    }

    /// [`TestEnv::process_env`] with the admin role's `DATABASE_URL`: for
    /// the operator's commands (`dlq …`, `status`), which a relay's role
    /// does not run.
    pub fn admin_process_env(&self) -> Vec<(String, String)> {
        let mut vars = self.process_env();
        for (k, v) in &mut vars {
            if k == "DATABASE_URL" {
                *v = self.admin_url();
            }
        }
        assert!(vars.iter().any(|(k, _)| k == "DATABASE_URL"));
        vars
    }

    /// The `outbox-relay` binary pointed at this environment as the admin
    /// role.
    pub fn admin_command(&self) -> Command {
        relay_command_with(&self.admin_process_env())
    }

    /// Starts the real `outbox-relay run` binary against this environment,
    /// with `extra` environment variables; its stderr is piped.
    pub fn spawn_process(&self, extra: &[(&str, &str)]) -> Spawned {
        let mut cmd = self.command();
        cmd.arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Spawned(cmd.spawn().expect("starting outbox-relay"))
    }
}

/// A child process that is killed when dropped, so that a failing test never
/// leaves a relay running (and polling, and holding leases) behind it.
pub struct Spawned(pub Child);

impl std::ops::Deref for Spawned {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Spawned {
    /// Stops the process with SIGTERM (a graceful shutdown) and returns its
    /// exit status and everything it wrote to stderr.
    pub fn terminate(mut self) -> (ExitStatus, String) {
        use std::io::Read;
        kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM).unwrap();
        let status = self.0.wait().unwrap();
        let mut stderr = String::new();
        if let Some(mut pipe) = self.0.stderr.take() {
            pipe.read_to_string(&mut stderr).unwrap();
        }
        (status, stderr)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads a child's stderr as it comes (a full pipe would block its
/// logging), into a buffer the test can look at while it runs.
pub fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    use std::io::Read;
    let mut pipe = child.stderr.take().expect("stderr is piped");
    let out = Arc::new(Mutex::new(String::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    out
}

/// The `outbox-relay run` binary logging JSON, its log collected as it
/// comes; killed when dropped.
pub struct RelayProcess {
    child: Spawned,
    log: Arc<Mutex<String>>,
}

impl RelayProcess {
    pub fn start(env: &TestEnv, extra: &[(&str, &str)]) -> RelayProcess {
        let mut vars = vec![("OUTBOX_RELAY_LOG__FORMAT", "json")];
        vars.extend_from_slice(extra);
        let mut child = env.spawn_process(&vars);
        let log = collect_stderr(&mut child);
        RelayProcess { child, log }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Its last `n` log lines.
    pub fn tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// How many log lines contain `needle`.
    pub fn lines_containing(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The JSON log lines whose message starts with `prefix`.
    pub fn logged(&self, prefix: &str) -> Vec<Value> {
        self.log
            .lock()
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| {
                v["message"]
                    .as_str()
                    .or(v["fields"]["message"].as_str())
                    .is_some_and(|m| m.starts_with(prefix))
            })
            .collect()
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn sigkill(&mut self) {
        kill(self.pid(), Signal::SIGKILL).unwrap();
        self.child.wait().unwrap();
    }

    /// Waits up to 30 s for it to relay its source (connected, schema and
    /// grants checked, lease task started); panics with its log if not.
    pub async fn wait_started(&self) {
        let started = super::eventually(Duration::from_secs(30), || async {
            !self.logged("relaying source").is_empty()
        })
        .await;
        assert!(
            started,
            "the relay did not start; it logged:\n{}",
            self.tail(20)
        );
    }

    /// SIGTERM, and the exit must be clean: a failure shows the exit status
    /// and the relay's last log lines, which say why it stopped.
    pub fn stop_cleanly(mut self) {
        kill(self.pid(), Signal::SIGTERM).unwrap();
        let status = self.wait(Duration::from_secs(60)).unwrap_or_else(|| {
            panic!(
                "the relay exits after SIGTERM; it logged:\n{}",
                self.tail(40)
            )
        });
        assert!(
            status.success(),
            "the relay exits cleanly after SIGTERM, not {status:?}; it logged:\n{}",
            self.tail(40)
        );
    }

    /// Its exit status, if it exits within `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
