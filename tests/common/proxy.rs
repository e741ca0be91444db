//! A TCP proxy on loopback that can freeze: it stops passing bytes in
//! either direction and keeps every connection open, as a frozen host or
//! a stalled network link does while the kernels at both ends still
//! acknowledge what they were sent. Connections accepted while frozen are
//! held too, and reach the server only after a thaw.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct FreezingProxy {
    pub port: u16,
    frozen: watch::Sender<bool>,
    /// The proxy's own ports towards the server: `client_port` of the
    /// sessions that came through it, in `pg_stat_activity`.
    upstream_ports: Arc<Mutex<Vec<u16>>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FreezingProxy {
    /// Listens on a free loopback port and forwards every connection to
    /// `upstream`.
    pub async fn start(upstream: SocketAddr) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frozen, _) = watch::channel(false);
        let upstream_ports = Arc::new(Mutex::new(Vec::new()));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let frozen = frozen.clone();
            let ports = upstream_ports.clone();
            let tasks = tasks.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let mut thawed = frozen.subscribe();
                    let ports = ports.clone();
                    let pumps = tasks.clone();
                    let frozen = frozen.clone();
                    let task = tokio::spawn(async move {
                        if thawed.wait_for(|f| !*f).await.is_err() {
                            return;
                        }
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        ports
                            .lock()
                            .unwrap()
                            .push(server.local_addr().unwrap().port());
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        let up = tokio::spawn(pump(client_read, server_write, frozen.subscribe()));
                        let down =
                            tokio::spawn(pump(server_read, client_write, frozen.subscribe()));
                        pumps.lock().unwrap().extend([up, down]);
                    });
                    tasks.lock().unwrap().push(task);
                }
            })
        };
        tasks.lock().unwrap().push(accept);
        FreezingProxy {
            port,
            frozen,
            upstream_ports,
            tasks,
        }
    }

    /// From now on nothing passes, either way.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Everything held passes again.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    pub fn upstream_ports(&self) -> Vec<i32> {
        self.upstream_ports
            .lock()
            .unwrap()
            .iter()
            .map(|p| i32::from(*p))
            .collect()
    }

    /// `url` (a PostgreSQL URL on loopback) through this proxy.
    pub fn url(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("URL has a scheme");
        let (user, rest) = rest.split_once('@').expect("URL has a user");
        let (_, path) = rest.split_once('/').expect("URL has a database");
        format!("{scheme}://{user}@127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Copies one direction; while frozen it reads nothing more and holds
/// what it read, so the sender's buffers fill as over a stalled link.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
