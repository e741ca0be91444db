//! Every metric the relay exports: names, help texts and typed record functions.
//!
//! Names are a public interface (dashboards and alert rules in `deploy/`
//! depend on them). Labels stay low-cardinality: source, event type, topic,
//! reason — never an event id, tenant id or key. Every per-source metric,
//! histograms included, carries `source`: one process may serve several.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const PUBLISHED: &str = "outbox_events_published_total";
pub const PUBLISH_FAILURES: &str = "outbox_publish_failures_total";
pub const DEAD_LETTERED: &str = "outbox_events_dead_lettered_total";
pub const PENDING: &str = "outbox_pending_events";
pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
pub const DLQ_EVENTS: &str = "outbox_dlq_events";
/// How long the oldest dead entry has waited for an admin: the "DLQ entries
/// older than N days" alert.
pub const DLQ_OLDEST_DEAD_AGE: &str = "outbox_dlq_oldest_dead_age_seconds";
/// Replays and repairs forced past the dedupe horizon, as recorded in
/// `outbox_dlq_revisions` (so every relay of a source reports the same).
pub const DLQ_FORCED_REPLAYS: &str = "outbox_dlq_forced_replays_total";
pub const PUBLISH_LATENCY: &str = "outbox_publish_latency_seconds";
pub const BATCH_SIZE: &str = "outbox_batch_size";
pub const CLAIM_DURATION: &str = "outbox_claim_duration_seconds";
pub const LEASES_OWNED: &str = "outbox_leases_owned";
pub const BLOCKED_PARTITIONS: &str = "outbox_blocked_partitions";
/// Virtual partitions of a source. `sum by (source) (outbox_leases_owned)`
/// below it means some partitions have no owner and nobody publishes them.
pub const LEASE_PARTITIONS: &str = "outbox_lease_partitions";
pub const RELAY_INFO: &str = "outbox_relay_info";
pub const PRODUCER_QUEUE_MESSAGES: &str = "outbox_kafka_producer_queue_messages";
pub const PRODUCER_QUEUE_BYTES: &str = "outbox_kafka_producer_queue_bytes";
pub const BROKER_RTT: &str = "outbox_kafka_broker_rtt_seconds";
pub const LAST_PUBLISH: &str = "outbox_last_publish_timestamp_seconds";
pub const DB_ERRORS: &str = "outbox_database_errors_total";
pub use outbox_consumer::metrics::{CONSUMER_EVENTS, CONSUMER_RETRYING};

/// Installs the global recorder and returns the handle that renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let latency_buckets = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(PUBLISH_LATENCY.into()), &latency_buckets)?
        .set_buckets_for_metric(Matcher::Full(CLAIM_DURATION.into()), &latency_buckets)?
        .set_buckets_for_metric(
            Matcher::Full(BATCH_SIZE.into()),
            &[
                1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
            ],
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_counter!(
        PUBLISHED,
        "Events acknowledged by Kafka and removed from the outbox."
    );
    describe_counter!(
        PUBLISH_FAILURES,
        "Transient publish failures; the event stays in the outbox and is retried."
    );
    describe_counter!(
        DEAD_LETTERED,
        "Events moved to outbox_dlq, by event type and reason."
    );
    describe_gauge!(
        PENDING,
        "Events waiting in the outbox, retries included (the planner's estimate above 100k)."
    );
    describe_gauge!(
        OLDEST_PENDING_AGE,
        "Age of the oldest event still in the outbox, in seconds: the lag alert."
    );
    describe_gauge!(
        DLQ_EVENTS,
        "Dead events waiting for an admin in outbox_dlq (the planner's estimate above 100k)."
    );
    describe_gauge!(
        DLQ_OLDEST_DEAD_AGE,
        "Seconds since the oldest dead entry of outbox_dlq was dead-lettered (0 when none)."
    );
    describe_counter!(
        DLQ_FORCED_REPLAYS,
        "DLQ replays forced past the dedupe horizon (consumers may process them twice)."
    );
    describe_histogram!(
        PUBLISH_LATENCY,
        "From the event's occurredAt to Kafka's acknowledgement, in seconds."
    );
    describe_histogram!(BATCH_SIZE, "Rows claimed per non-empty batch.");
    describe_histogram!(
        CLAIM_DURATION,
        "Time to claim one batch, empty claims included, in seconds."
    );
    describe_gauge!(LEASES_OWNED, "Virtual-partition leases this relay holds.");
    describe_gauge!(
        BLOCKED_PARTITIONS,
        "Leased partitions left out of claims because another transaction (a stalled former owner) holds their rows."
    );
    describe_gauge!(
        LEASE_PARTITIONS,
        "Virtual partitions of the source; every one should have an owner."
    );
    describe_gauge!(
        RELAY_INFO,
        "Always 1; the version label says which build runs."
    );
    describe_gauge!(
        PRODUCER_QUEUE_MESSAGES,
        "Messages in librdkafka's producer queues."
    );
    describe_gauge!(
        PRODUCER_QUEUE_BYTES,
        "Bytes in librdkafka's producer queues."
    );
    describe_gauge!(
        BROKER_RTT,
        "Average broker round-trip time per broker, in seconds."
    );
    describe_gauge!(
        LAST_PUBLISH,
        "Unix time of the last batch Kafka acknowledged."
    );
    describe_counter!(DB_ERRORS, "Database errors the relay loop backed off on.");
}

pub fn relay_info(version: &'static str) {
    gauge!(RELAY_INFO, "version" => version).set(1.0);
}

pub fn published(source: &str, event_type: &str, topic: &str, n: u64) {
    counter!(PUBLISHED, "source" => source.to_owned(), "event_type" => event_type.to_owned(), "topic" => topic.to_owned())
        .increment(n);
}

pub fn publish_failure(source: &str, reason: &'static str) {
    counter!(PUBLISH_FAILURES, "source" => source.to_owned(), "reason" => reason).increment(1);
}

/// The label for an event type the catalog does not know. Such a type
/// comes from whatever a writer stored, so it never becomes a label value
/// itself (it is in the log line and the DLQ row). No catalog type can be
/// called this: catalog types contain a dot.
pub const UNKNOWN_EVENT_TYPE_LABEL: &str = "unknown";

pub fn dead_lettered(source: &str, event_type: &str, reason: &'static str) {
    let event_type = if reason == crate::failure::DlqReason::UnknownEventType.as_str() {
        UNKNOWN_EVENT_TYPE_LABEL
    } else {
        event_type
    };
    dead_lettered_by(source, event_type, reason, 1);
}

pub fn backlog(source: &str, pending: i64, oldest_age_seconds: f64, dlq: i64) {
    gauge!(PENDING, "source" => source.to_owned()).set(pending as f64);
    gauge!(OLDEST_PENDING_AGE, "source" => source.to_owned()).set(oldest_age_seconds);
    gauge!(DLQ_EVENTS, "source" => source.to_owned()).set(dlq as f64);
}

/// The DLQ's age figures, read from the database with the backlog.
pub fn dlq_age(source: &str, oldest_dead_age_seconds: f64, forced_replays: i64) {
    gauge!(DLQ_OLDEST_DEAD_AGE, "source" => source.to_owned()).set(oldest_dead_age_seconds);
    counter!(DLQ_FORCED_REPLAYS, "source" => source.to_owned())
        .absolute(forced_replays.max(0) as u64);
}

/// A source's counters at zero, before anything happened: Prometheus's
/// `increase()` and `rate()` ignore the first sample of a series, so a
/// counter that first appeared at 1 (the first dead letter after a start)
/// would never show an increase, and `OutboxDlqGrowing` would stay silent.
pub fn init_source(source: &str, catalog: &crate::catalog::Catalog) {
    use crate::failure::DlqReason;
    for reason in DlqReason::ALL {
        if reason == DlqReason::TopicAuthorizationFailed {
            // No longer produced (an ACL is retried, not dead-lettered).
            continue;
        }
        if reason == DlqReason::UnknownEventType {
            dead_lettered_by(source, UNKNOWN_EVENT_TYPE_LABEL, reason.as_str(), 0);
            continue;
        }
        for event_type in catalog.events.keys() {
            dead_lettered_by(source, event_type, reason.as_str(), 0);
        }
    }
    counter!(DB_ERRORS, "source" => source.to_owned()).increment(0);
    // OutboxTopicAuthorizationFailed must see the first denial, too.
    counter!(PUBLISH_FAILURES, "source" => source.to_owned(), "reason" => crate::failure::TOPIC_AUTHORIZATION_FAILED)
        .increment(0);
}

fn dead_lettered_by(source: &str, event_type: &str, reason: &'static str, n: u64) {
    counter!(DEAD_LETTERED, "source" => source.to_owned(), "event_type" => event_type.to_owned(), "reason" => reason)
        .increment(n);
}

/// A batch's latencies: the histogram is looked up once, not per event.
pub fn publish_latencies(source: &str, seconds: impl IntoIterator<Item = f64>) {
    let h = histogram!(PUBLISH_LATENCY, "source" => source.to_owned());
    for s in seconds {
        h.record(s.max(0.0));
    }
}

/// One claim. An idle relay claims nothing at least once per idle wait
/// (more often when the rows there are not its to take); those empty
/// claims would bury the batch-size distribution under zeros,
/// so only their duration is kept (a slow empty claim points at dead index
/// entries at the head of the outbox: see docs/operations.md).
pub fn batch(source: &str, size: usize, claim: Duration) {
    if size > 0 {
        histogram!(BATCH_SIZE, "source" => source.to_owned()).record(size as f64);
    }
    histogram!(CLAIM_DURATION, "source" => source.to_owned()).record(claim.as_secs_f64());
}

pub fn last_publish(source: &str, unix_seconds: f64) {
    gauge!(LAST_PUBLISH, "source" => source.to_owned()).set(unix_seconds);
}

pub fn leases_owned(source: &str, n: usize) {
    gauge!(LEASES_OWNED, "source" => source.to_owned()).set(n as f64);
}

pub fn blocked_partitions(source: &str, n: usize) {
    gauge!(BLOCKED_PARTITIONS, "source" => source.to_owned()).set(n as f64);
}

pub fn lease_partitions(source: &str, n: usize) {
    gauge!(LEASE_PARTITIONS, "source" => source.to_owned()).set(n as f64);
}

pub fn producer_queue(messages: u64, bytes: u64) {
    gauge!(PRODUCER_QUEUE_MESSAGES).set(messages as f64);
    gauge!(PRODUCER_QUEUE_BYTES).set(bytes as f64);
}

pub fn broker_rtt(broker: &str, seconds: f64) {
    gauge!(BROKER_RTT, "broker" => broker.to_owned()).set(seconds);
}

pub fn db_error(source: &str) {
    counter!(DB_ERRORS, "source" => source.to_owned()).increment(1);
}
