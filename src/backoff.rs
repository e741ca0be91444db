//! Capped exponential backoff for reconnecting to Postgres, shared by the
//! relay loop, the lease task and start-up.

use std::time::Duration;

/// Capped exponential backoff with jitter for reconnecting to Postgres.
pub fn db_backoff() -> impl Iterator<Item = Duration> {
    outbox_model::backoff::capped(Duration::from_millis(100), Duration::from_secs(5))
}
