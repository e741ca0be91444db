//! outbox-relay: carries events from a transactional PostgreSQL outbox to Kafka.
//!
//! The data path: [`config`] → [`catalog`] → the [`relay`] pipeline (claim
//! ([`sql`]) → prepare ([`envelope`]) → produce ([`publish`], Kafka) →
//! settle: ack / retry / DLQ, classified by [`failure`]). [`lifecycle`]
//! starts the sources and stops them in one documented order. [`writer`]
//! (the `outbox-writer` crate) is the library kernel services use to
//! enqueue events; [`consumer`] (`outbox-consumer`) the kit modules consume
//! with; both share [`catalog`] and the envelope with the relay through
//! `outbox-model`.

pub mod backoff;
pub mod config;
pub mod dlq;
pub mod envelope;
pub mod failure;
pub mod http;
pub mod lease;
pub mod lifecycle;
pub mod metrics;
pub mod privileges;
pub mod publish;
pub mod relay;
pub mod sql;
pub mod startup;
pub mod status;
pub mod tls;
pub mod topics;
pub mod watch;

// The crates each audience depends on by itself, under the paths the
// relay's modules and tests have always used.
pub use outbox_consumer as consumer;
pub use outbox_model::{catalog, schema};
pub use outbox_writer as writer;

/// Months of dedupe partitions kept created ahead of time.
pub const DEDUPE_MONTHS_AHEAD: i32 = 3;

pub use lifecycle::run;
pub use startup::{
    check_schema, connect_db, connect_kafka, metrics_handle, relay_id, schema_verdict, RunError,
    EXACT_COUNT_BELOW, VERSION,
};
