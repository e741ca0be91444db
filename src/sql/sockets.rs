//! TCP keepalives and a user timeout on the relay's own sockets to
//! PostgreSQL: the relay's side of [`super::DEAD_PEER`].
//!
//! The server ends a session whose relay went away ([`super::DEAD_PEER`]);
//! these end the relay's wait on a server that went away. Without them a
//! relay whose request was acknowledged and whose server then vanished
//! without a reset (a host powered off, a firewall or NAT that dropped the
//! flow) waits for the answer as long as the connection looks open, which
//! is forever: it publishes nothing until restarted.
//!
//! The client library opens its sockets itself and has no keepalive
//! setting, so right after each connection is made the relay finds its
//! sockets among the process's open files (`/proc/self/fd`, Linux) and sets
//! the options on every TCP socket connected to the database's port that
//! has no keepalive yet. Where there is no `/proc` it does nothing.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// The server side's values ([`super::DEAD_PEER`]): a silent peer is
/// noticed after 5 + 3 × 2 s idle, or 10 s of unacknowledged data.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;
const USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets keepalives and the user timeout on this process's TCP sockets to
/// `db_port` that have none yet; returns how many it set.
pub fn guard(db_port: u16) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let keepalive = TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let mut set = 0;
    for entry in dir.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        // Only sockets are handed to setsockopt.
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: `fd` was open in this process a moment ago and is only
        // borrowed for these calls, never closed. Closed and reused for
        // another file meanwhile, the calls fail (not a socket) or find a
        // socket that is not to the database, and change nothing.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = SockRef::from(&fd);
        let to_db = socket
            .peer_addr()
            .ok()
            .and_then(|addr| addr.as_socket())
            .is_some_and(|addr| addr.port() == db_port);
        if !to_db || socket.keepalive().unwrap_or(true) {
            continue;
        }
        if socket.set_tcp_user_timeout(Some(USER_TIMEOUT)).is_ok()
            && socket.set_tcp_keepalive(&keepalive).is_ok()
        {
            set += 1;
        }
    }
    set
}
