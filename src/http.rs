//! The operator endpoint: `/metrics`, `/healthz` and `/readyz` on one listener.
//!
//! A deliberately small HTTP/1.1 responder (GET only, one request per
//! connection): three fixed routes do not justify a web framework in a
//! daemon whose RSS budget is 64 MiB.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What `/readyz` reports, updated by the relay's background checks.
#[derive(Debug, Default)]
pub struct Readiness {
    pub postgres: AtomicBool,
    pub kafka: AtomicBool,
}

impl Readiness {
    pub fn set_postgres(&self, ok: bool) {
        self.postgres.store(ok, Ordering::Relaxed);
    }
    pub fn set_kafka(&self, ok: bool) {
        self.kafka.store(ok, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.postgres.load(Ordering::Relaxed) && self.kafka.load(Ordering::Relaxed)
    }
    fn report(&self) -> String {
        let word = |b: &AtomicBool| {
            if b.load(Ordering::Relaxed) {
                "ok"
            } else {
                "unavailable"
            }
        };
        format!(
            "postgres: {}\nkafka: {}\n",
            word(&self.postgres),
            word(&self.kafka)
        )
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    readiness: Arc<Readiness>,
    token: CancellationToken,
) {
    loop {
        let (mut socket, _) = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(error = %err, "accepting an HTTP connection failed");
                    continue;
                }
            },
        };
        let handle = handle.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(
                std::time::Duration::from_secs(5),
                socket.read(&mut buf),
            )
            .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("/");
            let (status, content_type, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", handle.render()),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                "/readyz" if readiness.is_ready() => ("200 OK", "text/plain", readiness.report()),
                "/readyz" => ("503 Service Unavailable", "text/plain", readiness.report()),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
