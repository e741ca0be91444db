//! The one retry schedule every outbox component uses: exponential from a
//! minimum to a cap, with jitter so that many clients retrying the same
//! outage do not retry in step, and no limit on the number of attempts
//! (each caller decides when to give up).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays from `min` doubling up to `max`, jittered, without end.
pub fn capped(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_never_end() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let delays: Vec<Duration> = capped(min, max).take(50).collect();
        assert_eq!(delays.len(), 50);
        // Jitter adds up to one more delay on top of each step.
        assert!(
            delays.iter().all(|d| *d >= min && *d <= max * 2),
            "{delays:?}"
        );
        assert!(delays[40..].iter().all(|d| *d >= max), "{delays:?}");
    }
}
