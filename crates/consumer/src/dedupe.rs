//! The consumer kit's SQL: its start-up check of the dedupe table, the
//! permanent dedupe record, and parked events.

use sqlx::{PgConnection, PgPool};

/// What a consumer's role may do with the dedupe table, for the kit's
/// start-up check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupeAccess {
    /// `processed_event_ids` exists.
    pub exists: bool,
    /// The role holds INSERT on it (a member of `outbox_consumer`).
    pub can_insert: bool,
    /// `outbox_consumer_roles` exists (migration 0007 or later).
    pub mapping_table: bool,
    /// Row security lets it write rows of this consumer name: it is mapped
    /// with `outbox_map_consumer`, or it is the owner or a superuser.
    pub mapped: bool,
}

/// Step by step, because PostgreSQL resolves every table a statement names,
/// and checks the privileges on it, before it evaluates any condition: a
/// missing table or a role without access would otherwise answer with a raw
/// error instead of the message that names the fix.
pub async fn dedupe_access(pool: &PgPool, consumer: &str) -> sqlx::Result<DedupeAccess> {
    let mut access = DedupeAccess::default();
    (access.exists, access.can_insert, access.mapping_table) = sqlx::query_as(
        "SELECT to_regclass('processed_event_ids') IS NOT NULL, \
                CASE WHEN to_regclass('processed_event_ids') IS NULL THEN false \
                     ELSE has_table_privilege('processed_event_ids', 'INSERT') END, \
                to_regclass('outbox_consumer_roles') IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    if !access.exists || !access.can_insert {
        return Ok(access);
    }
    let bypasses: bool = sqlx::query_scalar(
        "SELECT (SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user) \
             OR pg_has_role(current_user, (SELECT relowner FROM pg_class \
                                            WHERE oid = 'processed_event_ids'::regclass), 'USAGE')",
    )
    .fetch_one(pool)
    .await?;
    access.mapped = bypasses
        || (access.mapping_table
            && sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM outbox_consumer_roles \
                                 WHERE role_name = current_user AND consumer = $1)",
            )
            .bind(consumer)
            .fetch_one(pool)
            .await?);
    Ok(access)
}

/// Records that `consumer` processed `event_id`; false when it already had.
/// No conflict target and no RETURNING: the consumer role needs INSERT only.
pub async fn mark_processed(
    tx: &mut PgConnection,
    consumer: &str,
    event_id: &str,
) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "INSERT INTO processed_event_ids (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    )
    .bind(consumer)
    .bind(event_id)
    .execute(tx)
    .await?
    .rows_affected()
        == 1)
}

/// An event the consumer kit gave up on (its `Park` policy).
pub struct ParkedEvent<'a> {
    pub consumer: &'a str,
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub envelope: serde_json::Value,
    pub error: String,
    pub attempts: i32,
}

pub async fn park_event(pool: &PgPool, e: &ParkedEvent<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO consumer_parked_events \
             (consumer, event_id, event_type, topic, \"partition\", \"offset\", envelope, last_error, attempts) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (consumer, event_id) DO UPDATE SET \
             topic = EXCLUDED.topic, \"partition\" = EXCLUDED.\"partition\", \"offset\" = EXCLUDED.\"offset\", \
             last_error = EXCLUDED.last_error, \
             attempts = consumer_parked_events.attempts + EXCLUDED.attempts, parked_at = now()",
    )
    .bind(e.consumer)
    .bind(e.event_id)
    .bind(e.event_type)
    .bind(e.topic)
    .bind(e.partition)
    .bind(e.offset)
    .bind(&e.envelope)
    .bind(&e.error)
    .bind(e.attempts)
    .execute(pool)
    .await?;
    Ok(())
}
