//! The outbox's shared vocabulary, used by the relay, the writer library and
//! the consumer kit alike: the event catalog and the schemas rendered from
//! it, the Event Model envelope (written by the relay, read by consumers),
//! the trace context a writer stores with a row, DLQ reasons, event ids,
//! the `Secret` setting type and the retry schedule.
//!
//! It depends on neither a Kafka nor a database client, so that every
//! audience can share one definition of each.

pub mod backoff;
pub mod catalog;
pub mod dlq;
pub mod envelope;
pub mod ids;
pub mod schema;
pub mod secret;

pub use dlq::DlqReason;
pub use ids::new_event_id;
pub use secret::Secret;
