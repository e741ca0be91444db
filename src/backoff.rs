//! Capped exponential backoff for reconnecting to Postgres, shared by the
//! relay loop, the lease task and start-up.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Capped exponential backoff with jitter for reconnecting to Postgres.
pub fn db_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
