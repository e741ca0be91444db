//! The one place that decides what a failure means: retry, dead-letter, or stop.
//!
//! * Permanent: the row can never be published as it is → DLQ with a reason.
//! * Transient: the world is temporarily broken (broker down, leader change,
//!   serialization failure) → retried without limit; the lag alert covers it.
//! * Unknown: retried up to `relay.max_attempts`, then DLQ `retries_exhausted`.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Machine-readable reason stored in `outbox_dlq.reason` and used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DlqReason {
    UnknownEventType,
    InvalidPayload,
    MissingPartitionKey,
    MessageTooLarge,
    TopicAuthorizationFailed,
    ForbiddenPublisher,
    RetriesExhausted,
}

impl DlqReason {
    pub const ALL: [DlqReason; 7] = [
        DlqReason::UnknownEventType,
        DlqReason::InvalidPayload,
        DlqReason::MissingPartitionKey,
        DlqReason::MessageTooLarge,
        DlqReason::TopicAuthorizationFailed,
        DlqReason::ForbiddenPublisher,
        DlqReason::RetriesExhausted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DlqReason::UnknownEventType => "unknown_event_type",
            DlqReason::InvalidPayload => "invalid_payload",
            DlqReason::MissingPartitionKey => "missing_partition_key",
            DlqReason::MessageTooLarge => "message_too_large",
            DlqReason::TopicAuthorizationFailed => "topic_authorization_failed",
            DlqReason::ForbiddenPublisher => "forbidden_publisher",
            DlqReason::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// What to do with one row after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    Permanent(DlqReason),
    /// Retried without limit; the label is the `reason` on
    /// `outbox_publish_failures_total`.
    Transient(&'static str),
    /// Retried up to `max_attempts`.
    Unknown,
}

/// Broker answers that no retry can fix for this message.
const PERMANENT_KAFKA: &[(RDKafkaErrorCode, DlqReason)] = &[
    (
        RDKafkaErrorCode::MessageSizeTooLarge,
        DlqReason::MessageTooLarge,
    ),
    (
        RDKafkaErrorCode::MessageBatchTooLarge,
        DlqReason::MessageTooLarge,
    ),
    (
        RDKafkaErrorCode::TopicAuthorizationFailed,
        DlqReason::TopicAuthorizationFailed,
    ),
];

/// Failures of the world, not of the message: retried forever.
const TRANSIENT_KAFKA: &[(RDKafkaErrorCode, &str)] = &[
    (RDKafkaErrorCode::MessageTimedOut, "timeout"),
    (RDKafkaErrorCode::RequestTimedOut, "timeout"),
    (RDKafkaErrorCode::OperationTimedOut, "timeout"),
    (
        RDKafkaErrorCode::BrokerTransportFailure,
        "broker_unavailable",
    ),
    (RDKafkaErrorCode::AllBrokersDown, "broker_unavailable"),
    (RDKafkaErrorCode::NetworkException, "broker_unavailable"),
    (RDKafkaErrorCode::Resolve, "broker_unavailable"),
    (RDKafkaErrorCode::BrokerNotAvailable, "broker_unavailable"),
    (RDKafkaErrorCode::NotLeaderForPartition, "leader_change"),
    (RDKafkaErrorCode::LeaderNotAvailable, "leader_change"),
    (RDKafkaErrorCode::FencedLeaderEpoch, "leader_change"),
    (RDKafkaErrorCode::UnknownLeaderEpoch, "leader_change"),
    (RDKafkaErrorCode::NotEnoughReplicas, "not_enough_replicas"),
    (
        RDKafkaErrorCode::NotEnoughReplicasAfterAppend,
        "not_enough_replicas",
    ),
    (RDKafkaErrorCode::KafkaStorageError, "broker_storage"),
    (RDKafkaErrorCode::QueueFull, "queue_full"),
    (RDKafkaErrorCode::PurgeQueue, "purged"),
    (RDKafkaErrorCode::PurgeInflight, "purged"),
    (RDKafkaErrorCode::ThrottlingQuotaExceeded, "throttled"),
    (
        RDKafkaErrorCode::OutOfOrderSequenceNumber,
        "producer_fenced",
    ),
    (RDKafkaErrorCode::InvalidProducerEpoch, "producer_fenced"),
    (RDKafkaErrorCode::UnknownProducerId, "producer_fenced"),
    (RDKafkaErrorCode::Fatal, "producer_fatal"),
    // A topic that does not exist yet is an operator's fix (`topics ensure`),
    // not the event's fault: nothing is dead-lettered for it.
    (RDKafkaErrorCode::UnknownTopicOrPartition, "unknown_topic"),
    (RDKafkaErrorCode::UnknownTopic, "unknown_topic"),
    (RDKafkaErrorCode::UnknownPartition, "unknown_topic"),
];

pub fn classify_code(code: RDKafkaErrorCode) -> Class {
    if let Some((_, reason)) = PERMANENT_KAFKA.iter().find(|(c, _)| *c == code) {
        return Class::Permanent(*reason);
    }
    if let Some((_, label)) = TRANSIENT_KAFKA.iter().find(|(c, _)| *c == code) {
        return Class::Transient(label);
    }
    Class::Unknown
}

pub fn classify_kafka(err: &KafkaError) -> Class {
    match err.rdkafka_error_code() {
        Some(code) => classify_code(code),
        None => Class::Unknown,
    }
}

/// How the relay loop treats a database error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbClass {
    /// Back off and try the step again (connection lost, serialization
    /// failure, deadlock, server restarting).
    Retry,
    /// Configuration or deployment error that no retry fixes (missing
    /// table, insufficient privilege): stop with the message.
    Fatal,
}

pub fn classify_db(err: &sqlx::Error) -> DbClass {
    match err {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.as_ref() {
                // serialization_failure, deadlock_detected
                "40001" | "40P01" => DbClass::Retry,
                // insufficient_privilege, undefined_table/function/column
                "42501" | "42P01" | "42883" | "42703" | "3D000" | "28000" | "28P01" => {
                    DbClass::Fatal
                }
                // connection exceptions, operator intervention (restart,
                // shutdown), insufficient resources, query cancelled
                c if c.starts_with("08")
                    || c.starts_with("57")
                    || c.starts_with("53")
                    || c == "55P03" =>
                {
                    DbClass::Retry
                }
                _ => DbClass::Retry,
            }
        }
        sqlx::Error::Configuration(_) | sqlx::Error::Migrate(_) => DbClass::Fatal,
        _ => DbClass::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_authorization_are_permanent() {
        assert_eq!(
            classify_code(RDKafkaErrorCode::MessageSizeTooLarge),
            Class::Permanent(DlqReason::MessageTooLarge)
        );
        assert_eq!(
            classify_code(RDKafkaErrorCode::TopicAuthorizationFailed),
            Class::Permanent(DlqReason::TopicAuthorizationFailed)
        );
    }

    #[test]
    fn outages_are_transient_and_unknowns_are_bounded() {
        assert_eq!(
            classify_code(RDKafkaErrorCode::MessageTimedOut),
            Class::Transient("timeout")
        );
        assert_eq!(
            classify_code(RDKafkaErrorCode::NotLeaderForPartition),
            Class::Transient("leader_change")
        );
        assert_eq!(
            classify_code(RDKafkaErrorCode::UnknownTopicOrPartition),
            Class::Transient("unknown_topic")
        );
        assert_eq!(
            classify_code(RDKafkaErrorCode::InvalidRecord),
            Class::Unknown
        );
    }

    #[test]
    fn reasons_are_distinct_snake_case() {
        let mut names: Vec<_> = DlqReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DlqReason::ALL.len());
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }
}
