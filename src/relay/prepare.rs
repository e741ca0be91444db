//! Stage 2, prepare: build each claimed row's envelope. A row that can
//! never be published as it is (unknown type, invalid payload, too large,
//! forbidden publisher, …) is rejected here, before anything is produced,
//! and goes to the DLQ when the batch settles.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use sqlx::{Postgres, Transaction};

use super::claim::Claimed;
use super::Relay;
use crate::envelope::{self, Prepared, Rejected};
use crate::publish::Ack;

/// One claimed row on its way through the stages: what settling needs of
/// it (the payload is in the envelope once prepared; the row's text is
/// dropped) and how far it got.
pub(crate) struct Row {
    pub id: i64,
    pub vpartition: i16,
    pub event_id: String,
    /// The row's own `event_type` column.
    pub event_type: String,
    pub attempts: i32,
    pub state: State,
}

/// How far a row got.
pub(crate) enum State {
    /// Refused by [`envelope::prepare`]: dead-lettered when the batch settles.
    Rejected(Rejected),
    /// Its envelope is built and waits for the batch's produce turn.
    Ready(Prepared),
    /// Handed to the produce stage, which holds the message meanwhile.
    Queued,
    /// Kafka's answer for the message: `None` when none came in time (or
    /// the message was never sent because the lease ran short).
    Answered {
        msg: Prepared,
        answer: Option<Result<Ack, KafkaError>>,
    },
}

/// A prepared batch, its rows still deleted by its open transaction.
pub(super) struct PreparedBatch {
    pub tx: Transaction<'static, Postgres>,
    /// In claim (ordering-id) order.
    pub rows: Vec<Row>,
    pub epochs: HashMap<i16, i64>,
    pub started: Instant,
    pub claimed_in: Duration,
    pub gate: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

impl Relay {
    /// Builds the envelopes of a claimed batch; rejected rows are logged
    /// here, as they are found.
    pub(super) fn prepare(&self, claimed: Claimed) -> PreparedBatch {
        let Claimed {
            tx,
            rows: claimed_rows,
            epochs,
            started,
            claimed_in,
            gate,
        } = claimed;
        let mut rows = Vec::with_capacity(claimed_rows.len());
        // Each claimed row is dropped once its envelope is built: a batch
        // in flight need not hold the payloads.
        for row in claimed_rows {
            let state = match envelope::prepare(
                &row,
                &self.catalog,
                &self.settings.kafka.topic_prefix,
                self.settings.kafka.max_message_bytes,
            ) {
                Ok(p) => State::Ready(p),
                Err(rejected) => {
                    tracing::error!(
                        event_id = %row.event_id,
                        event_type = %row.event_type,
                        reason = rejected.reason.as_str(),
                        error = %rejected.message,
                        "event dead-lettered"
                    );
                    State::Rejected(rejected)
                }
            };
            rows.push(Row {
                id: row.id,
                vpartition: row.vpartition,
                event_id: row.event_id,
                event_type: row.event_type,
                attempts: row.attempts,
                state,
            });
        }
        PreparedBatch {
            tx,
            rows,
            epochs,
            started,
            claimed_in,
            gate,
        }
    }
}
