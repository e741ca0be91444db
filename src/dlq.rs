//! DLQ repair as the CLI runs it: the repaired event is checked against the
//! relay's own catalog and envelope rules before the database accepts it,
//! so an admin learns at once, by field path, what the relay would refuse.

use crate::catalog::Catalog;
use crate::config::KafkaSettings;
use crate::envelope;
use crate::sql::{self, OutboxRow, Repair};

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("no DLQ entry has event id {0}; `outbox-relay dlq list` shows the dead entries")]
    NotFound(String),
    #[error("DLQ entry {event_id} is {state}, not dead: only a dead entry can be repaired")]
    NotDead { event_id: String, state: String },
    /// The relay would dead-letter the repaired event again.
    #[error(
        "the repaired event {event_id} would be refused ({reason}): {message}. Nothing was changed; \
         fix the payload and repair again"
    )]
    Invalid {
        event_id: String,
        reason: &'static str,
        message: String,
    },
    #[error("{0}")]
    Db(#[from] sqlx::Error),
}

/// Checks the event a repair would publish exactly as the relay will: the
/// catalog's fields, the partition key, the JSON portability rules, the
/// publisher and the size limit.
pub fn check(
    entry: &sql::DlqContent,
    repair: &Repair,
    catalog: &Catalog,
    kafka: &KafkaSettings,
) -> Result<(), RepairError> {
    let row = OutboxRow {
        id: entry.outbox_id,
        event_id: entry.event_id.clone(),
        event_type: entry.event_type.clone(),
        tenant_id: repair.tenant_id.clone().or_else(|| entry.tenant_id.clone()),
        payload: repair.payload.to_string(),
        headers: repair
            .headers
            .as_ref()
            .or(entry.headers.as_ref())
            .map(|h| h.to_string()),
        occurred_at: entry.occurred_at,
        attempts: 0,
        publisher: entry.publisher.clone(),
        vpartition: entry.vpartition.unwrap_or(0),
        bytes: 0,
        available_at: entry.occurred_at,
    };
    envelope::prepare(&row, catalog, &kafka.topic_prefix, kafka.max_message_bytes)
        .map(|_| ())
        .map_err(|rejected| RepairError::Invalid {
            event_id: entry.event_id.clone(),
            reason: rejected.reason.as_str(),
            message: rejected.message,
        })
}

/// Checks the repair ([`check`]), then calls `outbox_dlq_repair`, which
/// records the revision and replays the entry under the same id. Returns
/// the revision number.
pub async fn repair(
    pool: &sqlx::PgPool,
    catalog: &Catalog,
    kafka: &KafkaSettings,
    repair: &Repair,
) -> Result<i32, RepairError> {
    let entry = sql::dlq_content(pool, &repair.event_id)
        .await?
        .ok_or_else(|| RepairError::NotFound(repair.event_id.clone()))?;
    if entry.state != "dead" {
        return Err(RepairError::NotDead {
            event_id: entry.event_id,
            state: entry.state,
        });
    }
    check(&entry, repair, catalog, kafka)?;
    Ok(sql::dlq_repair(pool, repair).await?)
}
