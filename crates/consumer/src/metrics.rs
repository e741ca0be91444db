//! The consumer kit's metrics, through the `metrics` facade: the
//! application installs whatever exporter it uses (the relay's is
//! Prometheus).

use metrics::{counter, describe_counter, describe_gauge, gauge};

/// Consumer kit: every message by outcome (processed, duplicate, skipped,
/// failed = one failed handler attempt, parked, invalid, forbidden_source).
pub const CONSUMER_EVENTS: &str = "outbox_consumer_events_total";
/// Consumer kit: failed attempts of the event a consumer is retrying now; 0
/// when it is not retrying. Above a few, the consumer is blocked.
pub const CONSUMER_RETRYING: &str = "outbox_consumer_retrying_attempts";

/// Help texts of the consumer kit's metrics (a no-op until the application installs a recorder).
pub fn describe_consumer() {
    describe_counter!(
        CONSUMER_EVENTS,
        "Messages a consumer-kit consumer finished, by event type and outcome."
    );
    describe_gauge!(
        CONSUMER_RETRYING,
        "Failed attempts of the event a consumer is retrying now (0 = not retrying)."
    );
}

pub fn consumer_event(consumer: &str, event_type: &str, outcome: &'static str) {
    counter!(CONSUMER_EVENTS, "consumer" => consumer.to_owned(), "event_type" => event_type.to_owned(), "outcome" => outcome)
        .increment(1);
}

pub fn consumer_retrying(consumer: &str, attempts: u32) {
    gauge!(CONSUMER_RETRYING, "consumer" => consumer.to_owned()).set(attempts as f64);
}
