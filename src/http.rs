//! The operator endpoint: `/metrics`, `/healthz` and `/readyz` on one listener.
//!
//! A deliberately small HTTP/1.1 responder (GET and HEAD, one request per
//! connection): three fixed routes do not justify a web framework in a
//! daemon whose RSS budget is 64 MiB.
//!
//! * `/healthz`: the process is alive and serving (200 while it runs).
//! * `/readyz`: the relay can do its work: Postgres answered the last
//!   backlog query, Kafka answered the last metadata request, and — when
//!   leases are in use — the last lease round succeeded, holding partitions
//!   or standing by. 503 otherwise, with the failing part named in the body.
//!   A `schema:` line says how the database's schema compares with the
//!   binary's migrations (`current`, `newer than this binary (…)`, …); it
//!   informs and does not decide: a relay on a newer schema is the middle of a
//!   rolling upgrade and keeps working, and one on an older schema never
//!   starts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use crate::lease::LeaseState;

/// What `/readyz` reports, updated by the relay's background checks
/// ([`crate::run`]'s watcher sets Postgres and Kafka every two seconds; the
/// lease task sets the lease state after each round). Leases stay out of the
/// verdict until a lease state is first set, so a relay running without
/// leases is judged on Postgres and Kafka alone.
#[derive(Debug, Default)]
pub struct Readiness {
    pub postgres: AtomicBool,
    pub kafka: AtomicBool,
    leases: Mutex<Option<LeaseState>>,
    schema: Mutex<Option<String>>,
}

impl Readiness {
    pub fn set_postgres(&self, ok: bool) {
        self.postgres.store(ok, Ordering::Relaxed);
    }
    pub fn set_kafka(&self, ok: bool) {
        self.kafka.store(ok, Ordering::Relaxed);
    }
    pub fn set_leases(&self, state: LeaseState) {
        *self.leases.lock().expect("readiness leases") = Some(state);
    }
    pub fn leases(&self) -> Option<LeaseState> {
        *self.leases.lock().expect("readiness leases")
    }
    /// The schema line (see [`crate::sql::SchemaStatus::summary`]).
    pub fn set_schema(&self, summary: String) {
        *self.schema.lock().expect("readiness schema") = Some(summary);
    }
    pub fn schema(&self) -> Option<String> {
        self.schema.lock().expect("readiness schema").clone()
    }
    pub fn is_ready(&self) -> bool {
        self.postgres.load(Ordering::Relaxed)
            && self.kafka.load(Ordering::Relaxed)
            && self.leases().is_none_or(LeaseState::is_ready)
    }

    /// The `/readyz` body: one `part: state` line per check.
    pub fn report(&self) -> String {
        let word = |b: &AtomicBool| {
            if b.load(Ordering::Relaxed) {
                "ok"
            } else {
                "unavailable"
            }
        };
        let mut out = format!(
            "postgres: {}\nkafka: {}\n",
            word(&self.postgres),
            word(&self.kafka)
        );
        match self.leases() {
            None => {}
            Some(LeaseState::Unavailable) => out.push_str("leases: unavailable\n"),
            Some(LeaseState::Holding(n)) => out.push_str(&format!("leases: holding {n}\n")),
            Some(LeaseState::StandingBy) => out.push_str("leases: standing by\n"),
        }
        if let Some(schema) = self.schema() {
            out.push_str(&format!("schema: {schema}\n"));
        }
        out
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `token` is cancelled.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    readiness: Arc<Readiness>,
    token: CancellationToken,
) {
    loop {
        let (socket, _) = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(error = %err, "accepting an HTTP connection failed");
                    // Out of file descriptors, typically: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        let readiness = readiness.clone();
        tokio::spawn(respond(socket, handle, readiness));
    }
}

/// Largest request head read; the routes take no body.
const MAX_HEAD: usize = 8 * 1024;

async fn respond(mut socket: TcpStream, handle: PrometheusHandle, readiness: Arc<Readiness>) {
    // Read the request head, which may arrive in several segments; a
    // client that sends nothing for 5 s is dropped.
    let mut buf = Vec::with_capacity(1024);
    let head_read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_HEAD {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    if head_read.is_err() || buf.is_empty() {
        return;
    }
    let request = String::from_utf8_lossy(&buf);
    let mut first = request.lines().next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("");
    let target = first.next().unwrap_or("/");
    let path = target.split('?').next().unwrap_or(target);

    let (status, content_type, body) = if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET and HEAD\n".to_string(),
        )
    } else {
        match path {
            "/metrics" => (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                handle.render(),
            ),
            "/healthz" => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_string()),
            "/readyz" => {
                // One snapshot for both the verdict and the body.
                let report = readiness.report();
                let ready = readiness.is_ready();
                let status = if ready {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                (status, "text/plain; charset=utf-8", report)
            }
            _ => (
                "404 Not Found",
                "text/plain; charset=utf-8",
                "not found; try /metrics, /healthz or /readyz\n".to_string(),
            ),
        }
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    if method != "HEAD" {
        response.push_str(&body);
    }
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_count_only_once_set() {
        let r = Readiness::default();
        r.set_postgres(true);
        r.set_kafka(true);
        assert!(r.is_ready());
        assert_eq!(r.report(), "postgres: ok\nkafka: ok\n");

        r.set_leases(LeaseState::Unavailable);
        assert!(!r.is_ready());
        assert_eq!(r.report(), "postgres: ok\nkafka: ok\nleases: unavailable\n");

        r.set_leases(LeaseState::after_round(0));
        assert!(r.is_ready(), "a standby is ready");
        assert_eq!(r.report(), "postgres: ok\nkafka: ok\nleases: standing by\n");

        r.set_leases(LeaseState::after_round(7));
        assert!(r.is_ready());
        assert!(r.report().ends_with("leases: holding 7\n"));

        r.set_kafka(false);
        assert!(!r.is_ready());
        assert!(r.report().contains("kafka: unavailable\n"));
    }

    #[test]
    fn the_schema_line_informs_without_deciding() {
        let r = Readiness::default();
        r.set_postgres(true);
        r.set_kafka(true);
        r.set_schema("newer than this binary (0008 unknown to it)".into());
        assert!(
            r.is_ready(),
            "an older relay on a newer schema keeps working"
        );
        assert_eq!(
            r.report(),
            "postgres: ok\nkafka: ok\nschema: newer than this binary (0008 unknown to it)\n"
        );
    }
}
