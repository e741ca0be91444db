//! Every SQL statement the relay and its CLI run, as small functions.
//!
//! Failure handling and DLQ administration live in SQL functions
//! (`migrations/0003_dlq.sql`); the functions here call them, so the relay,
//! the CLI and an admin at a psql prompt share one implementation.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use std::str::FromStr;
use std::time::Duration;

use crate::catalog::Catalog;

/// The migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// An outbox row claimed for publishing.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub tenant_id: Option<String>,
    /// The jsonb payload as text: it goes into the envelope unchanged.
    pub payload: String,
    pub headers: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub attempts: i32,
    pub publisher: Option<String>,
}

pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> sqlx::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?.application_name("outbox-relay");
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_with(options)
        .await
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Claims up to `limit` due rows in ordering-id order. The row locks last
/// until the transaction ends; other relays skip them.
pub async fn claim(tx: &mut Transaction<'_, Postgres>, limit: i64) -> sqlx::Result<Vec<OutboxRow>> {
    sqlx::query_as::<_, OutboxRow>(
        "SELECT id, event_id, event_type, tenant_id, payload::text AS payload, \
                headers::text AS headers, occurred_at, attempts, publisher \
           FROM outbox \
          WHERE available_at <= now() \
          ORDER BY id \
          LIMIT $1 \
          FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(&mut **tx)
    .await
}

/// Deletes rows Kafka acknowledged.
pub async fn delete_published(tx: &mut PgConnection, ids: &[i64]) -> sqlx::Result<u64> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(tx)
        .await?
        .rows_affected())
}

/// Moves rows to the DLQ with a reason and message each.
pub async fn dead_letter(
    tx: &mut PgConnection,
    ids: &[i64],
    reasons: &[&str],
    errors: &[String],
) -> sqlx::Result<i32> {
    if ids.is_empty() {
        return Ok(0);
    }
    sqlx::query_scalar("SELECT outbox_dead_letter($1, $2, $3)")
        .bind(ids)
        .bind(reasons)
        .bind(errors)
        .fetch_one(tx)
        .await
}

/// Records a transient failure and pushes `available_at` forward.
pub async fn schedule_retry(
    tx: &mut PgConnection,
    ids: &[i64],
    errors: &[String],
    base_ms: u64,
    cap_ms: u64,
) -> sqlx::Result<i32> {
    if ids.is_empty() {
        return Ok(0);
    }
    sqlx::query_scalar("SELECT outbox_schedule_retry($1, $2, $3, $4)")
        .bind(ids)
        .bind(errors)
        .bind(base_ms as i64)
        .bind(cap_ms as i64)
        .fetch_one(tx)
        .await
}

/// Mirrors the catalog into `outbox_catalog` so the publisher trigger can
/// check writers. Event types no longer in the catalog are removed.
pub async fn sync_catalog(pool: &PgPool, catalog: &Catalog) -> sqlx::Result<u64> {
    let mut types = Vec::new();
    let mut publishers = Vec::new();
    let mut topics = Vec::new();
    let mut versions = Vec::new();
    let mut keys = Vec::new();
    for e in catalog.events.values() {
        types.push(e.event_type.clone());
        publishers.push(e.publisher.clone());
        topics.push(e.topic.clone());
        versions.push(e.schema_version.clone());
        keys.push(e.partition_key.clone());
    }
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM outbox_catalog WHERE event_type <> ALL($1)")
        .bind(&types)
        .execute(&mut *tx)
        .await?;
    let n = sqlx::query(
        "INSERT INTO outbox_catalog (event_type, publisher, topic, schema_version, partition_key) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
         ON CONFLICT (event_type) DO UPDATE SET publisher = EXCLUDED.publisher, topic = EXCLUDED.topic, \
             schema_version = EXCLUDED.schema_version, partition_key = EXCLUDED.partition_key, synced_at = now()",
    )
    .bind(&types)
    .bind(&publishers)
    .bind(&topics)
    .bind(&versions)
    .bind(&keys)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(n)
}

/// Backlog figures for gauges and `status`, cheap with millions of rows:
/// the count is the planner's estimate above `exact_below` rows, the oldest
/// age reads one row through the primary key.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Backlog {
    pub pending: i64,
    pub pending_is_estimate: bool,
    pub oldest_pending_age_seconds: f64,
    pub dlq_dead: i64,
}

pub async fn backlog(pool: &PgPool, exact_below: i64) -> sqlx::Result<Backlog> {
    sqlx::query_as::<_, Backlog>(
        "WITH est AS ( \
             SELECT greatest(c.reltuples, 0)::bigint AS n FROM pg_class c WHERE c.oid = 'outbox'::regclass \
         ), exact AS ( \
             SELECT count(*) AS n FROM (SELECT 1 FROM outbox LIMIT $1) s \
         ) \
         SELECT CASE WHEN exact.n < $1 THEN exact.n ELSE greatest(est.n, exact.n) END AS pending, \
                exact.n >= $1 AS pending_is_estimate, \
                coalesce(extract(epoch FROM now() - (SELECT occurred_at FROM outbox ORDER BY id LIMIT 1)), 0)::float8 \
                    AS oldest_pending_age_seconds, \
                (SELECT count(*) FROM outbox_dlq WHERE state = 'dead') AS dlq_dead \
           FROM est, exact",
    )
    .bind(exact_below)
    .fetch_one(pool)
    .await
}

/// Dead events by reason (for `status` and the DLQ gauge).
pub async fn dlq_by_reason(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT reason, count(*) FROM outbox_dlq WHERE state = 'dead' GROUP BY reason ORDER BY reason",
    )
    .fetch_all(pool)
    .await
}

/// One DLQ entry as `dlq list` shows it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DlqEntry {
    pub event_id: String,
    pub event_type: String,
    pub tenant_id: Option<String>,
    pub reason: String,
    pub last_error: String,
    pub attempts: i32,
    pub occurred_at: DateTime<Utc>,
    pub first_failed_at: DateTime<Utc>,
    pub dead_lettered_at: DateTime<Utc>,
    pub state: String,
    pub replay_count: i32,
}

/// Filters shared by `dlq list`, `dlq replay` and `dlq discard`; `None` = any.
#[derive(Debug, Clone, Default)]
pub struct DlqFilter {
    pub event_id: Option<String>,
    pub event_type: Option<String>,
    pub reason: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

pub async fn dlq_list(pool: &PgPool, f: &DlqFilter, limit: i64) -> sqlx::Result<Vec<DlqEntry>> {
    sqlx::query_as::<_, DlqEntry>(
        "SELECT event_id, event_type, tenant_id, reason, last_error, attempts, occurred_at, \
                first_failed_at, dead_lettered_at, state, replay_count \
           FROM outbox_dlq \
          WHERE state = 'dead' \
            AND ($1::text IS NULL OR event_id = $1) \
            AND ($2::text IS NULL OR event_type = $2) \
            AND ($3::text IS NULL OR reason = $3) \
            AND ($4::timestamptz IS NULL OR dead_lettered_at >= $4) \
            AND ($5::timestamptz IS NULL OR dead_lettered_at < $5) \
          ORDER BY dead_lettered_at, outbox_id \
          LIMIT $6",
    )
    .bind(&f.event_id)
    .bind(&f.event_type)
    .bind(&f.reason)
    .bind(f.from)
    .bind(f.to)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// `outbox_dlq_replay(...)`: returns the replayed event ids.
pub async fn dlq_replay(pool: &PgPool, f: &DlqFilter) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT outbox_dlq_replay(p_event_type => $1, p_reason => $2, p_from => $3, p_to => $4, p_event_id => $5)",
    )
    .bind(&f.event_type)
    .bind(&f.reason)
    .bind(f.from)
    .bind(f.to)
    .bind(&f.event_id)
    .fetch_all(pool)
    .await
}

/// `outbox_dlq_discard(...)`: returns the discarded event ids.
pub async fn dlq_discard(pool: &PgPool, why: &str, f: &DlqFilter) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT outbox_dlq_discard(p_why => $1, p_event_id => $2, p_event_type => $3, p_reason => $4, \
                                   p_from => $5, p_to => $6)",
    )
    .bind(why)
    .bind(&f.event_id)
    .bind(&f.event_type)
    .bind(&f.reason)
    .bind(f.from)
    .bind(f.to)
    .fetch_all(pool)
    .await
}

/// Records this relay's heartbeat, last publish time and running total.
pub async fn heartbeat(
    pool: &PgPool,
    relay_id: &str,
    source: &str,
    host: &str,
    version: &str,
    last_publish: Option<DateTime<Utc>>,
    published_total: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO outbox_relays (relay_id, source, host, version, last_publish_at, published_total) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now(), \
             last_publish_at = coalesce(EXCLUDED.last_publish_at, outbox_relays.last_publish_at), \
             published_total = EXCLUDED.published_total",
    )
    .bind(relay_id)
    .bind(source)
    .bind(host)
    .bind(version)
    .bind(last_publish)
    .bind(published_total)
    .execute(pool)
    .await?;
    Ok(())
}

/// Removes this relay's membership row at shutdown.
pub async fn leave(pool: &PgPool, relay_id: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM outbox_relays WHERE relay_id = $1")
        .bind(relay_id)
        .execute(pool)
        .await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RelayRow {
    pub relay_id: String,
    pub source: String,
    pub host: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub last_publish_at: Option<DateTime<Utc>>,
    pub published_total: i64,
}

pub async fn relays(pool: &PgPool) -> sqlx::Result<Vec<RelayRow>> {
    sqlx::query_as(
        "SELECT relay_id, source, host, version, started_at, heartbeat_at, last_publish_at, published_total \
           FROM outbox_relays ORDER BY relay_id",
    )
    .fetch_all(pool)
    .await
}
