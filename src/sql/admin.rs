//! What the CLI and the gauges run: backlog and DLQ statistics, the DLQ
//! admin functions, and the dedupe and DLQ retention purges.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::catalog::Catalog;

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
        "INSERT INTO outbox_catalog (event_type, publisher, topic, schema_version, partition_key, vpartitions) \
         SELECT t.*, (SELECT vpartitions FROM outbox_config) \
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS t \
         ON CONFLICT (event_type) DO UPDATE SET publisher = EXCLUDED.publisher, topic = EXCLUDED.topic, \
             schema_version = EXCLUDED.schema_version, partition_key = EXCLUDED.partition_key, \
             vpartitions = EXCLUDED.vpartitions, synced_at = now()",
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
/// each count stops at `exact_below` rows and is the planner's estimate
/// above (the table's `reltuples` for the outbox, the partial index's for
/// dead DLQ entries); the oldest age reads one row through the primary key.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Backlog {
    pub pending: i64,
    pub pending_is_estimate: bool,
    pub oldest_pending_age_seconds: f64,
    pub dlq_dead: i64,
    pub dlq_is_estimate: bool,
}

pub async fn backlog(pool: &PgPool, exact_below: i64) -> sqlx::Result<Backlog> {
    // The oldest pending row is the first retried row (negative ids,
    // migration 0012) or the first other row, whichever occurred first.
    sqlx::query_as::<_, Backlog>(
        "WITH est AS ( \
             SELECT greatest(c.reltuples, 0)::bigint AS n FROM pg_class c WHERE c.oid = 'outbox'::regclass \
         ), exact AS ( \
             SELECT count(*) AS n FROM (SELECT 1 FROM outbox LIMIT $1) s \
         ), dlq_est AS ( \
             SELECT greatest(c.reltuples, 0)::bigint AS n FROM pg_class c WHERE c.oid = 'outbox_dlq_dead_idx'::regclass \
         ), dlq_exact AS ( \
             SELECT count(*) AS n FROM (SELECT 1 FROM outbox_dlq WHERE state = 'dead' LIMIT $1) s \
         ) \
         SELECT CASE WHEN exact.n < $1 THEN exact.n ELSE greatest(est.n, exact.n) END AS pending, \
                exact.n >= $1 AS pending_is_estimate, \
                coalesce(extract(epoch FROM now() - (SELECT min(occurred_at) FROM ( \
                    (SELECT occurred_at FROM outbox WHERE id < 0 ORDER BY id LIMIT 1) \
                    UNION ALL (SELECT occurred_at FROM outbox WHERE id > 0 ORDER BY id LIMIT 1)) oldest)), \
                         0)::float8 \
                    AS oldest_pending_age_seconds, \
                CASE WHEN dlq_exact.n < $1 THEN dlq_exact.n ELSE greatest(dlq_est.n, dlq_exact.n) END AS dlq_dead, \
                dlq_exact.n >= $1 AS dlq_is_estimate \
           FROM est, exact, dlq_est, dlq_exact",
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
    /// The ordering id the event had in the outbox.
    pub outbox_id: i64,
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

/// `outbox_dlq_list(...)`: dead events, oldest first.
pub async fn dlq_list(pool: &PgPool, f: &DlqFilter, limit: i64) -> sqlx::Result<Vec<DlqEntry>> {
    sqlx::query_as::<_, DlqEntry>(
        "SELECT event_id, event_type, tenant_id, reason, last_error, attempts, occurred_at, \
                first_failed_at, dead_lettered_at, state, replay_count, outbox_id \
           FROM outbox_dlq_list(p_event_id => $1, p_event_type => $2, p_reason => $3, \
                                p_from => $4, p_to => $5, p_limit => $6)",
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

/// One line of a replay report: `replayed`, or `skipped` with the reason
/// (`older_than_horizon`, `unknown_event_type`, `publisher_not_allowed`,
/// `already_pending`, `insert_failed`) and what to do about it. A replay
/// forced past the dedupe horizon is `replayed` with reason
/// `forced_past_horizon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ReplayLine {
    pub event_id: String,
    pub outcome: String,
    pub reason: Option<String>,
    pub detail: Option<String>,
}

impl ReplayLine {
    pub fn replayed(&self) -> bool {
        self.outcome == "replayed"
    }
}

/// `outbox_dlq_replay_report(...)`: replays what it can, entry by entry,
/// and says why it skipped the rest. `force` (with `why`, recorded in
/// `outbox_dlq_revisions`) replays events older than the dedupe horizon.
pub async fn dlq_replay_report(
    pool: &PgPool,
    f: &DlqFilter,
    force: bool,
    why: Option<&str>,
) -> sqlx::Result<Vec<ReplayLine>> {
    sqlx::query_as(
        "SELECT event_id, outcome, reason, detail \
           FROM outbox_dlq_replay_report(p_event_type => $1, p_reason => $2, p_from => $3, p_to => $4, \
                                         p_event_id => $5, p_force => $6, p_why => $7)",
    )
    .bind(&f.event_type)
    .bind(&f.reason)
    .bind(f.from)
    .bind(f.to)
    .bind(&f.event_id)
    .bind(force)
    .bind(why)
    .fetch_all(pool)
    .await
}

/// A DLQ entry with its content, for `dlq repair`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DlqContent {
    pub event_id: String,
    pub outbox_id: i64,
    pub event_type: String,
    pub tenant_id: Option<String>,
    pub payload: serde_json::Value,
    pub headers: Option<serde_json::Value>,
    pub occurred_at: DateTime<Utc>,
    pub publisher: Option<String>,
    pub vpartition: Option<i16>,
    pub state: String,
    pub reason: String,
}

pub async fn dlq_content(pool: &PgPool, event_id: &str) -> sqlx::Result<Option<DlqContent>> {
    sqlx::query_as(
        "SELECT event_id, outbox_id, event_type, tenant_id, payload, headers, occurred_at, publisher, \
                vpartition, state, reason \
           FROM outbox_dlq WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_optional(pool)
    .await
}

/// What `outbox_dlq_repair` is given.
#[derive(Debug, Clone)]
pub struct Repair {
    pub event_id: String,
    pub payload: serde_json::Value,
    pub why: String,
    /// `None` keeps the entry's.
    pub tenant_id: Option<String>,
    /// `None` keeps the entry's.
    pub headers: Option<serde_json::Value>,
    /// Repair an event older than the dedupe horizon anyway.
    pub force: bool,
}

/// `outbox_dlq_repair(...)`: returns the revision number.
pub async fn dlq_repair(pool: &PgPool, r: &Repair) -> sqlx::Result<i32> {
    sqlx::query_scalar(
        "SELECT outbox_dlq_repair(p_event_id => $1, p_payload => $2, p_why => $3, p_tenant_id => $4, \
                                  p_headers => $5, p_force => $6)",
    )
    .bind(&r.event_id)
    .bind(&r.payload)
    .bind(&r.why)
    .bind(&r.tenant_id)
    .bind(&r.headers)
    .bind(r.force)
    .fetch_one(pool)
    .await
}

/// One row of the DLQ's audit trail.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Revision {
    pub event_id: String,
    pub revision: i32,
    pub kind: String,
    pub old_payload: Option<serde_json::Value>,
    pub new_payload: Option<serde_json::Value>,
    pub made_by: String,
    pub made_at: DateTime<Utc>,
    pub why: String,
}

pub async fn dlq_revisions(pool: &PgPool, event_id: &str) -> sqlx::Result<Vec<Revision>> {
    sqlx::query_as(
        "SELECT event_id, revision, kind, old_payload, new_payload, made_by, made_at, why \
           FROM outbox_dlq_revisions WHERE event_id = $1 ORDER BY revision",
    )
    .bind(event_id)
    .fetch_all(pool)
    .await
}

/// The age of the oldest dead DLQ entry in seconds (0 when there is none)
/// and the number of replays forced past the dedupe horizon so far.
pub async fn dlq_age_and_forced(pool: &PgPool) -> sqlx::Result<(f64, i64)> {
    sqlx::query_as(
        "SELECT coalesce(extract(epoch FROM now() - (SELECT min(dead_lettered_at) FROM outbox_dlq \
                                                    WHERE state = 'dead')), 0)::float8, \
                (SELECT count(*) FROM outbox_dlq_revisions WHERE kind = 'forced_replay')",
    )
    .fetch_one(pool)
    .await
}

/// `outbox_dedupe_partitions_ensure(months_ahead)`: the partitions it created.
pub async fn dedupe_partitions_ensure(
    pool: &PgPool,
    months_ahead: i32,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT outbox_dedupe_partitions_ensure($1)")
        .bind(months_ahead)
        .fetch_all(pool)
        .await
}

/// One line of `outbox_dedupe_purge`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DedupePurged {
    pub partition_name: String,
    /// Every dedupe row of the partition is of an event before this.
    pub events_before: DateTime<Utc>,
    pub action: String,
    pub rows_removed: i64,
}

pub async fn dedupe_purge(pool: &PgPool, dry_run: bool) -> sqlx::Result<Vec<DedupePurged>> {
    sqlx::query_as(
        "SELECT partition_name, events_before, action, rows_removed FROM outbox_dedupe_purge($1)",
    )
    .bind(dry_run)
    .fetch_all(pool)
    .await
}

/// `outbox_dlq_purge`: deleted (entries, revisions).
pub async fn dlq_purge(pool: &PgPool, older_than_days: i32) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as("SELECT entries, revisions FROM outbox_dlq_purge(make_interval(days => $1))")
        .bind(older_than_days)
        .fetch_one(pool)
        .await
}

/// `outbox_relays_purge`: the forgotten relay ids.
pub async fn relays_purge(pool: &PgPool, older_than_hours: i32) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT outbox_relays_purge(make_interval(hours => $1))")
        .bind(older_than_hours)
        .fetch_all(pool)
        .await
}

/// The dedupe horizon in days (`outbox_config.dedupe_horizon_days`).
pub async fn dedupe_horizon_days(pool: &PgPool) -> sqlx::Result<i32> {
    sqlx::query_scalar("SELECT dedupe_horizon_days FROM outbox_config")
        .fetch_one(pool)
        .await
}
