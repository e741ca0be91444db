//! The one place that decides what a failure means: retry, dead-letter, or stop.
//!
//! * Permanent: the row can never be published as it is → DLQ with a reason.
//!   The envelope checks ([`crate::envelope::prepare`]) find most of these
//!   before anything is produced; the broker's answers below find the rest.
//! * Transient: the world is temporarily broken (broker down, leader change,
//!   missing topic, bad credentials, a topic ACL that denies the relay,
//!   Postgres restarting) → retried without limit; the lag alert covers it.
//!   Nothing the operator has to fix by hand ever lands in the DLQ for it:
//!   dead-lettering it would only reorder its key when it is replayed.
//! * Unknown: retried, but only `relay.max_attempts` failures of this class
//!   are tolerated per row; the last one moves the row to the DLQ as
//!   `retries_exhausted`. Transient failures do not use up that budget, so a
//!   long outage followed by one odd error does not dead-letter anything.
//!   The counting happens in SQL (`outbox_schedule_retry`), in the same
//!   statement that reschedules the row.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

pub use outbox_model::DlqReason;

/// A statement gave up waiting for a row lock (`lock_timeout`, 55P03).
pub fn is_lock_timeout(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|c| c == "55P03")
}

/// What to do with one row after a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    Permanent(DlqReason),
    /// Retried without limit; the label is the `reason` on
    /// `outbox_publish_failures_total`.
    Transient(&'static str),
    /// Retried until `relay.max_attempts` failures of this class.
    Unknown,
}

impl Class {
    /// The `reason` label on `outbox_publish_failures_total` for a failure
    /// that is retried.
    pub fn retry_label(&self) -> &'static str {
        match self {
            Class::Transient(label) => label,
            Class::Unknown => "unknown",
            Class::Permanent(reason) => reason.as_str(),
        }
    }

    /// Whether this failure uses up the row's `relay.max_attempts` budget.
    pub fn counts_toward_max_attempts(&self) -> bool {
        matches!(self, Class::Unknown)
    }
}

/// Broker answers that no retry can fix for this message.
const PERMANENT_KAFKA: &[(RDKafkaErrorCode, DlqReason)] = &[
    // Local (librdkafka's message.max.bytes) or the broker's limit.
    (
        RDKafkaErrorCode::MessageSizeTooLarge,
        DlqReason::MessageTooLarge,
    ),
    // RECORD_LIST_TOO_LARGE: the record alone exceeds the segment size.
    (
        RDKafkaErrorCode::MessageBatchTooLarge,
        DlqReason::MessageTooLarge,
    ),
];

/// The retry label of a topic ACL that denies the relay's principal. An
/// operator's fix (grant the ACL), so it is retried like every other
/// operator's fix, and logged at ERROR: dead-lettering the topic's events
/// would lose their order when they are replayed.
pub const TOPIC_AUTHORIZATION_FAILED: &str = "topic_authorization_failed";

/// Failures of the world, not of the message: retried forever.
const TRANSIENT_KAFKA: &[(RDKafkaErrorCode, &str)] = &[
    (RDKafkaErrorCode::MessageTimedOut, "timeout"),
    (RDKafkaErrorCode::RequestTimedOut, "timeout"),
    (RDKafkaErrorCode::OperationTimedOut, "timeout"),
    (RDKafkaErrorCode::TimedOutQueue, "timeout"),
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
    (RDKafkaErrorCode::ReplicaNotAvailable, "leader_change"),
    (
        RDKafkaErrorCode::PreferredLeaderNotAvailable,
        "leader_change",
    ),
    (RDKafkaErrorCode::FencedLeaderEpoch, "leader_change"),
    (RDKafkaErrorCode::UnknownLeaderEpoch, "leader_change"),
    (RDKafkaErrorCode::NotEnoughReplicas, "not_enough_replicas"),
    (
        RDKafkaErrorCode::NotEnoughReplicasAfterAppend,
        "not_enough_replicas",
    ),
    (RDKafkaErrorCode::ISRInsufficient, "not_enough_replicas"),
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
    (RDKafkaErrorCode::ProducerFenced, "producer_fenced"),
    (RDKafkaErrorCode::Fatal, "producer_fatal"),
    // A topic that does not exist yet, or a topic prefix that names none, is
    // an operator's fix (`topics ensure`), not the event's fault: nothing is
    // dead-lettered for it.
    (RDKafkaErrorCode::UnknownTopicOrPartition, "unknown_topic"),
    (RDKafkaErrorCode::UnknownTopic, "unknown_topic"),
    (RDKafkaErrorCode::UnknownPartition, "unknown_topic"),
    (RDKafkaErrorCode::UnknownTopicId, "unknown_topic"),
    (RDKafkaErrorCode::InvalidTopic, "unknown_topic"),
    (
        RDKafkaErrorCode::TopicAuthorizationFailed,
        TOPIC_AUTHORIZATION_FAILED,
    ),
    // The relay's own credentials or cluster-level rights (idempotent
    // writes need IDEMPOTENT_WRITE on the cluster): every row would fail
    // alike, so none of them is the event's fault.
    (RDKafkaErrorCode::Authentication, "broker_authentication"),
    (RDKafkaErrorCode::SSL, "broker_authentication"),
    (
        RDKafkaErrorCode::SaslAuthenticationFailed,
        "broker_authentication",
    ),
    (
        RDKafkaErrorCode::UnsupportedSASLMechanism,
        "broker_authentication",
    ),
    (RDKafkaErrorCode::IllegalSASLState, "broker_authentication"),
    (
        RDKafkaErrorCode::ClusterAuthorizationFailed,
        "broker_authentication",
    ),
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

/// Classifies a produce or delivery error. Errors without a librdkafka code
/// (a cancelled delivery future, a client that could not be created) are of
/// unknown class: retried, within the row's budget.
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
    /// failure, deadlock, server restarting). Retried without limit: no row
    /// is at fault, and rows of the failed step stay in the outbox.
    Retry,
    /// Configuration or deployment error that no retry fixes (missing
    /// table, insufficient privilege, wrong password, no such database):
    /// stop with the message.
    Fatal,
}

pub fn classify_db(err: &sqlx::Error) -> DbClass {
    match err {
        sqlx::Error::Database(db) => classify_sqlstate(db.code().as_deref().unwrap_or_default()),
        sqlx::Error::Configuration(_) | sqlx::Error::Migrate(_) => DbClass::Fatal,
        // I/O, TLS, protocol, pool time-outs: the connection, not the query.
        _ => DbClass::Retry,
    }
}

/// Classifies a Postgres SQLSTATE.
pub fn classify_sqlstate(code: &str) -> DbClass {
    match code {
        // insufficient_privilege, undefined_table/function/column,
        // invalid_catalog_name (no such database), invalid authorization,
        // invalid password, invalid_schema_name
        "42501" | "42P01" | "42883" | "42703" | "3D000" | "28000" | "28P01" | "3F000" => {
            DbClass::Fatal
        }
        // Everything else is retried, explicitly including:
        // 40001 serialization_failure, 40P01 deadlock_detected, class 08
        // connection exceptions, class 57 operator intervention (admin
        // shutdown, cannot connect now while the server starts), class 53
        // insufficient resources, 55P03 lock_not_available.
        _ => DbClass::Retry,
    }
}

/// How the running relay loop treats a database error. Its credentials
/// worked at start-up, so a refusal now (28000: the role may not log in or
/// no pg_hba.conf entry matches; 28P01: wrong password) is a change in
/// progress — a credential rotation, an hba reload, a failover to a server
/// not configured yet — and is waited out unready (`/readyz` answers 503,
/// the lag alert covers a long one) instead of ending the process. At
/// start-up the same codes stop it with the message ([`classify_db`]).
pub fn classify_db_running(err: &sqlx::Error) -> DbClass {
    match err {
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("28000" | "28P01")) => {
            DbClass::Retry
        }
        _ => classify_db(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_is_permanent() {
        assert_eq!(
            classify_code(RDKafkaErrorCode::MessageSizeTooLarge),
            Class::Permanent(DlqReason::MessageTooLarge)
        );
        assert_eq!(
            classify_code(RDKafkaErrorCode::MessageBatchTooLarge),
            Class::Permanent(DlqReason::MessageTooLarge)
        );
    }

    #[test]
    fn a_topic_acl_is_an_operators_fix_retried_without_limit() {
        let class = classify_code(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert_eq!(class, Class::Transient("topic_authorization_failed"));
        assert!(!class.counts_toward_max_attempts());
        assert_eq!(class.retry_label(), "topic_authorization_failed");
        // No broker answer produces the reason any more; old entries parse.
        for code in PERMANENT_KAFKA.iter().map(|(c, _)| *c) {
            assert_ne!(
                classify_code(code),
                Class::Permanent(DlqReason::TopicAuthorizationFailed)
            );
        }
        assert_eq!(
            DlqReason::parse("topic_authorization_failed"),
            Some(DlqReason::TopicAuthorizationFailed)
        );
    }

    #[test]
    fn outages_are_transient_and_unknowns_are_bounded() {
        for (code, label) in [
            (RDKafkaErrorCode::MessageTimedOut, "timeout"),
            (RDKafkaErrorCode::RequestTimedOut, "timeout"),
            (RDKafkaErrorCode::AllBrokersDown, "broker_unavailable"),
            (RDKafkaErrorCode::NotLeaderForPartition, "leader_change"),
            (RDKafkaErrorCode::UnknownTopicOrPartition, "unknown_topic"),
            (RDKafkaErrorCode::UnknownTopic, "unknown_topic"),
            (
                RDKafkaErrorCode::ClusterAuthorizationFailed,
                "broker_authentication",
            ),
        ] {
            assert_eq!(classify_code(code), Class::Transient(label), "{code:?}");
            assert!(!classify_code(code).counts_toward_max_attempts());
        }
        for code in [
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::InvalidTimestamp,
            RDKafkaErrorCode::PolicyViolation,
            RDKafkaErrorCode::Unknown,
        ] {
            assert_eq!(classify_code(code), Class::Unknown, "{code:?}");
            assert!(classify_code(code).counts_toward_max_attempts());
        }
        assert_eq!(classify_kafka(&KafkaError::Canceled), Class::Unknown);
    }

    #[test]
    fn no_code_is_listed_twice() {
        let mut codes: Vec<i32> = PERMANENT_KAFKA
            .iter()
            .map(|(c, _)| *c as i32)
            .chain(TRANSIENT_KAFKA.iter().map(|(c, _)| *c as i32))
            .collect();
        let n = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), n);
    }

    #[test]
    fn reasons_are_distinct_snake_case_and_parse_back() {
        let mut names: Vec<_> = DlqReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DlqReason::ALL.len());
        assert!(names
            .iter()
            .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        for r in DlqReason::ALL {
            assert_eq!(DlqReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(DlqReason::parse("timeout"), None);
    }

    #[test]
    fn sqlstates_that_no_retry_fixes_are_fatal() {
        for code in ["42501", "42P01", "42883", "3D000", "28P01"] {
            assert_eq!(classify_sqlstate(code), DbClass::Fatal, "{code}");
        }
        for code in [
            "40001", "40P01", "08006", "57P01", "57P03", "53300", "55P03",
        ] {
            assert_eq!(classify_sqlstate(code), DbClass::Retry, "{code}");
        }
    }
}
