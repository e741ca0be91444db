//! Why a row is in the DLQ: `outbox_dlq.reason`, and the `reason` label of
//! `outbox_events_dead_lettered_total`.

/// Machine-readable reason stored in `outbox_dlq.reason` and used as the
/// `reason` label of `outbox_events_dead_lettered_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DlqReason {
    UnknownEventType,
    InvalidPayload,
    MissingPartitionKey,
    MessageTooLarge,
    /// No longer produced: the relay retries a topic ACL that denies it.
    /// Kept so that entries of earlier releases still parse.
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

    pub fn parse(s: &str) -> Option<DlqReason> {
        DlqReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}
