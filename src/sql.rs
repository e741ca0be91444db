//! Every SQL statement the relay and its CLI run, as small functions.
//!
//! Failure handling and DLQ administration live in SQL functions
//! (`migrations/0003_dlq.sql`); the functions here call them, so the relay,
//! the CLI and an admin at a psql prompt share one implementation.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use std::str::FromStr;
use std::time::Duration;

use crate::catalog::Catalog;

/// The migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// An outbox row claimed for publishing.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: String,
    pub event_type: String,
    pub tenant_id: Option<String>,
    /// The jsonb payload as text: it goes into the envelope unchanged. The
    /// relay empties it, and `headers`, once the envelope is built.
    pub payload: String,
    pub headers: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub attempts: i32,
    pub publisher: Option<String>,
    pub vpartition: i16,
    /// What the claim counted against `relay.max_batch_bytes` for this row.
    pub bytes: i64,
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

/// One migration as [`schema_status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationInfo {
    pub version: i64,
    pub description: String,
}

impl std::fmt::Display for MigrationInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04} {}", self.version, self.description)
    }
}

/// A row of `_sqlx_migrations`, the table in which sqlx records what it applied.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AppliedRow {
    pub version: i64,
    pub description: String,
    pub success: bool,
    pub checksum: Vec<u8>,
}

/// The database's schema compared with a binary's migrations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SchemaStatus {
    /// Applied, and the same as the binary's file.
    pub applied: Vec<MigrationInfo>,
    /// The binary's migrations the database does not have: `migrate` would
    /// run them (the schema is older than the binary).
    pub pending: Vec<MigrationInfo>,
    /// Applied migrations the binary does not know: the schema is newer
    /// (an older binary during a rolling upgrade, or a binary rollback).
    pub unknown: Vec<MigrationInfo>,
    /// Applied, but the binary's file has another checksum: a migration was
    /// edited after it was applied. sqlx's `migrate` refuses to run then.
    pub mismatched: Vec<MigrationInfo>,
    /// Started and not finished (`success = false`): `migrate` refuses to run
    /// until an operator repairs it.
    pub failed: Vec<MigrationInfo>,
}

impl SchemaStatus {
    /// True when `migrate` would apply nothing and refuse nothing.
    pub fn is_current(&self) -> bool {
        self.pending.is_empty()
            && self.unknown.is_empty()
            && self.mismatched.is_empty()
            && self.failed.is_empty()
    }

    /// True when this binary's `migrate` would fail before applying anything.
    pub fn migrate_would_refuse(&self) -> bool {
        !self.unknown.is_empty() || !self.mismatched.is_empty() || !self.failed.is_empty()
    }

    /// The highest version this database has applied, if any.
    pub fn latest_applied(&self) -> Option<i64> {
        self.applied
            .iter()
            .chain(&self.unknown)
            .chain(&self.mismatched)
            .map(|m| m.version)
            .max()
    }

    /// One line for `/readyz` and logs.
    pub fn summary(&self) -> String {
        fn versions(ms: &[MigrationInfo]) -> String {
            ms.iter()
                .map(|m| format!("{:04}", m.version))
                .collect::<Vec<_>>()
                .join(", ")
        }
        let mut parts = Vec::new();
        if !self.pending.is_empty() {
            parts.push(format!(
                "older than this binary (pending {})",
                versions(&self.pending)
            ));
        }
        if !self.unknown.is_empty() {
            parts.push(format!(
                "newer than this binary ({} unknown to it)",
                versions(&self.unknown)
            ));
        }
        if !self.mismatched.is_empty() {
            parts.push(format!(
                "edited migrations ({} differ from this binary's)",
                versions(&self.mismatched)
            ));
        }
        if !self.failed.is_empty() {
            parts.push(format!(
                "failed migrations ({} did not finish)",
                versions(&self.failed)
            ));
        }
        if parts.is_empty() {
            match self.latest_applied() {
                Some(v) => format!("current ({v:04})"),
                None => "current (no migrations)".into(),
            }
        } else {
            parts.join("; ")
        }
    }
}

/// Compares what a database applied (`_sqlx_migrations`) with a migrator's
/// migrations. Pure, so that every case is unit-tested without a database.
pub fn compare_schema(migrator: &sqlx::migrate::Migrator, applied: &[AppliedRow]) -> SchemaStatus {
    let info = |version: i64, description: &str| MigrationInfo {
        version,
        description: description.to_string(),
    };
    let mut status = SchemaStatus::default();
    let known: Vec<_> = migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    for m in &known {
        match applied.iter().find(|a| a.version == m.version) {
            None => status.pending.push(info(m.version, &m.description)),
            Some(a) if !a.success => status.failed.push(info(a.version, &a.description)),
            Some(a) if a.checksum != *m.checksum => {
                status.mismatched.push(info(a.version, &a.description))
            }
            Some(a) => status.applied.push(info(a.version, &a.description)),
        }
    }
    for a in applied {
        if !known.iter().any(|m| m.version == a.version) {
            if a.success {
                status.unknown.push(info(a.version, &a.description));
            } else {
                status.failed.push(info(a.version, &a.description));
            }
        }
    }
    status.failed.sort_by_key(|m| m.version);
    status
}

/// Why [`schema_status`] could not read the schema's state.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The role may not read sqlx's table. The relay's and the admin's
    /// group roles need SELECT on it to compare the schema at start-up.
    #[error(
        "role {role} may not read _sqlx_migrations, where sqlx records the applied migrations, so \
         the schema cannot be compared with this binary: an admin runs \
         `GRANT SELECT ON _sqlx_migrations TO outbox_relay, outbox_admin;` (once per database)"
    )]
    NoAccess { role: String },
    #[error("reading _sqlx_migrations: {0}")]
    Db(#[from] sqlx::Error),
}

impl SchemaError {
    /// Whether retrying may help (an outage), rather than a fix by an admin.
    pub fn is_transient(&self) -> bool {
        match self {
            SchemaError::NoAccess { .. } => false,
            SchemaError::Db(err) => {
                crate::failure::classify_db(err) == crate::failure::DbClass::Retry
            }
        }
    }
}

/// The database's schema compared with [`MIGRATOR`], the migrations this
/// binary embeds. A database without `_sqlx_migrations` (never migrated) has
/// every migration pending. Needs SELECT on `_sqlx_migrations` only.
pub async fn schema_status(pool: &PgPool) -> Result<SchemaStatus, SchemaError> {
    schema_status_of(pool, &MIGRATOR).await
}

/// [`schema_status`] against any migrator (tests use a release's files).
pub async fn schema_status_of(
    pool: &PgPool,
    migrator: &sqlx::migrate::Migrator,
) -> Result<SchemaStatus, SchemaError> {
    // Asked first rather than inferred from an error: the answer names the
    // role, and a missing table is a fresh database, not an error.
    let (exists, readable, role): (bool, bool, String) = sqlx::query_as(
        "SELECT to_regclass('_sqlx_migrations') IS NOT NULL, \
                CASE WHEN to_regclass('_sqlx_migrations') IS NULL THEN false \
                     ELSE has_table_privilege('_sqlx_migrations', 'SELECT') END, \
                current_user::text",
    )
    .fetch_one(pool)
    .await?;
    if !exists {
        return Ok(compare_schema(migrator, &[]));
    }
    if !readable {
        return Err(SchemaError::NoAccess { role });
    }
    let rows: Vec<AppliedRow> = sqlx::query_as(
        "SELECT version, description, success, checksum FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(pool)
    .await?;
    Ok(compare_schema(migrator, &rows))
}

/// Applies the migrations; a new database gets `vpartitions` virtual
/// partitions (an existing one keeps its count).
pub async fn migrate_with(
    pool: &PgPool,
    vpartitions: u32,
) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT set_config('outbox.vpartitions', $1, false)")
        .bind(vpartitions.to_string())
        .execute(&mut *conn)
        .await?;
    MIGRATOR.run(&mut *conn).await
}

/// A pool for a relay: a row lock held by a stalled relay surfaces as an
/// error after `lock_timeout` instead of blocking a batch, and a stalled
/// relay's open transaction is ended by the server after `idle_timeout`.
pub async fn connect_relay(
    url: &str,
    max_connections: u32,
    timeout: Duration,
    idle_timeout: Duration,
) -> sqlx::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?
        .application_name("outbox-relay")
        .options([
            // A commit lost in a server crash only brings acknowledged rows
            // back, to be published again with the same ids: at-least-once
            // holds without waiting for the WAL flush on every batch.
            ("synchronous_commit", "off".to_string()),
            ("lock_timeout", "2s".to_string()),
            // The outbox is a queue: its statistics swing between empty (an
            // ANALYZE right after a drain) and millions of rows. Planned for
            // an empty table, a claim would read every row above the cursor
            // and sort them, or scan every dead row; each relay query has an
            // index that serves it in order, so plans without one are priced
            // out.
            ("enable_seqscan", "off".to_string()),
            ("enable_bitmapscan", "off".to_string()),
            ("enable_sort", "off".to_string()),
            (
                "idle_in_transaction_session_timeout",
                format!("{}ms", idle_timeout.as_millis()),
            ),
        ])
        .options(DEAD_PEER);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_with(options)
        .await
}

/// The server ends a relay's session, and with it the row locks of its
/// open batch, within a bound when the relay's host stops answering (a
/// frozen VM, a network partition, a half-open connection). Without these a
/// backend blocked sending to it waits for the kernel's TCP retries (about
/// 15 minutes), and the rows it holds stall their partitions for every
/// other relay.
///  * `tcp_user_timeout`: data the server sent stays unacknowledged 10 s;
///  * keepalives: an idle connection whose peer is gone, after 5 + 3 × 2 s;
///  * `statement_timeout`: no relay statement runs anywhere near a minute.
///
/// An idle transaction is ended by `idle_in_transaction_session_timeout`.
/// A paused relay process on a live host is answered by its kernel, so only
/// the last bounds it (see docs/scaling.md for what remains open).
pub const DEAD_PEER: [(&str, &str); 5] = [
    ("tcp_user_timeout", "10000"),
    ("tcp_keepalives_idle", "5"),
    ("tcp_keepalives_interval", "2"),
    ("tcp_keepalives_count", "3"),
    ("statement_timeout", "60s"),
];

// Read by position in CLAIMED_COLUMNS order: looking every column up by name
// costs a hash lookup per column per row, a visible share of a drain.
impl<'r> sqlx::FromRow<'r, PgRow> for OutboxRow {
    fn from_row(row: &'r PgRow) -> sqlx::Result<Self> {
        Ok(OutboxRow {
            id: row.try_get(0)?,
            event_id: row.try_get(1)?,
            event_type: row.try_get(2)?,
            tenant_id: row.try_get(3)?,
            payload: row.try_get(4)?,
            headers: row.try_get(5)?,
            occurred_at: row.try_get(6)?,
            attempts: row.try_get(7)?,
            publisher: row.try_get(8)?,
            vpartition: row.try_get(9)?,
            bytes: row.try_get(10)?,
        })
    }
}

/// What a claim counts of a row against `relay.max_batch_bytes`: its size
/// before compression, or its stored size for rows written before migration
/// 0010. Read from the row header; the payload is not loaded for it.
macro_rules! row_bytes {
    () => {
        "coalesce(payload_bytes, pg_column_size(payload) + coalesce(pg_column_size(headers), 0))::bigint"
    };
}

/// Columns of a claimed row, in the order [`OutboxRow`] reads them.
const CLAIMED_COLUMNS: &str = concat!(
    "id, event_id, event_type, tenant_id, payload::text AS payload, \
     headers::text AS headers, occurred_at, attempts, publisher, vpartition, ",
    row_bytes!(),
    " AS bytes"
);

/// Opens a claim's transaction with the savepoint [`unclaim`] rolls back
/// to, in one round trip: the relay claims up to a few hundred times a
/// second, and on a busy machine every round trip waits for a core.
pub async fn begin_claim(pool: &PgPool) -> sqlx::Result<Transaction<'static, Postgres>> {
    pool.begin_with(BEGIN_CLAIM).await
}

/// A batch's transaction waits at most 500 ms for a row lock (the pool's 2 s
/// is for everything else): under leases only a stalled former owner holds
/// rows this relay claims, and the sooner the claim gives up, the sooner
/// the relay finds that owner's partitions and claims around them.
const BEGIN_CLAIM: &str = "BEGIN; SET LOCAL lock_timeout = '500ms'; SAVEPOINT claim";

/// Of `vpartitions`, those whose due rows (above `after`, the first `limit`
/// of them) include one locked by another transaction. Locks nothing for
/// long: its own `SKIP LOCKED` locks end with the rolled-back transaction.
pub async fn locked_partitions(
    pool: &PgPool,
    vpartitions: &[i16],
    after: i64,
    limit: i64,
) -> sqlx::Result<Vec<i16>> {
    let mut tx = pool.begin().await?;
    let locked = sqlx::query_scalar(
        "WITH due AS ( \
             SELECT id, vpartition FROM outbox \
              WHERE id > $2 AND available_at <= now() AND vpartition = ANY($1) \
              ORDER BY id LIMIT $3 \
         ), free AS ( \
             SELECT id FROM outbox WHERE id = ANY(ARRAY(SELECT id FROM due)) FOR UPDATE SKIP LOCKED \
         ) \
         SELECT DISTINCT vpartition FROM due WHERE id NOT IN (SELECT id FROM free) ORDER BY 1",
    )
    .bind(vpartitions)
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    tx.rollback().await?;
    Ok(locked)
}

/// Claims due rows above `after_id` in ordering-id order — of the given
/// virtual partitions when leases are on — up to `limit` rows and, past the
/// first row, `max_bytes` of payload and headers (see [`claim_statement`]),
/// and deletes them in one statement, inside the savepoint [`begin_claim`]
/// opened: nothing is removed until that transaction commits after Kafka
/// acknowledged the batch, and [`unclaim`] undoes the delete when some rows
/// must stay. Rows come back in ordering-id order.
///
/// Without leases, other relays skip the locked rows (SKIP LOCKED). With
/// leases there is no SKIP LOCKED: a row still locked by a relay that lost
/// its lease must hold the batch back (until `lock_timeout`), never be
/// jumped over, or a later event of the same key would overtake it.
pub async fn claim(
    tx: &mut Transaction<'_, Postgres>,
    limit: i64,
    max_bytes: i64,
    vpartitions: Option<&[i16]>,
    after_id: i64,
) -> sqlx::Result<Vec<OutboxRow>> {
    let sql = claim_statement(vpartitions.is_some());
    let mut query = sqlx::query_as::<_, OutboxRow>(&sql)
        .bind(limit)
        .bind(after_id)
        .bind(max_bytes);
    if let Some(vps) = vpartitions {
        query = query.bind(vps);
    }
    let mut rows = query.fetch_all(&mut **tx).await?;
    rows.sort_unstable_by_key(|r| r.id);
    Ok(rows)
}

/// The claim statement: $1 limit in rows, $2 ordering id to start above,
/// $3 byte budget, $4 the leased virtual partitions (with leases).
///
/// The budget counts each row's `payload_bytes` (its size before TOAST
/// compression, set by the insert trigger; the stored size for rows written
/// before migration 0010). A row is taken while the rows before it hold
/// less than the budget, so the first row always is: a claim loads at most
/// the budget plus one row, whatever writers insert. Sizes come from the
/// row's header, not from its payload: rows past the budget are never
/// loaded.
pub fn claim_statement(leased: bool) -> String {
    // With leases no other relay claims these partitions, so the claim waits
    // on rows another transaction holds (a stalled former owner) instead of
    // skipping them. The DELETE waits on them by itself; locking them first
    // (FOR UPDATE) would only write a second WAL record for every row.
    let (filter, lock) = if leased {
        ("AND vpartition = ANY($4)", "")
    } else {
        ("", "FOR UPDATE SKIP LOCKED")
    };
    // `available_at` is tested again outside the subquery: a row the
    // DELETE had to wait for is re-read after the wait, and only conditions
    // of the DELETE itself are checked again on it. A stalled owner that
    // rescheduled the row before its transaction ended must not have it
    // claimed at once.
    format!(
        "DELETE FROM outbox WHERE id = ANY(ARRAY( \
             SELECT id FROM ( \
                 SELECT id, bytes, sum(bytes) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS upto \
                   FROM (SELECT id, {ROW_BYTES} AS bytes \
                           FROM outbox \
                          WHERE id > $2 AND available_at <= now() {filter} \
                          ORDER BY id \
                          LIMIT $1 \
                          {lock}) due \
             ) sized \
              WHERE upto - bytes < $3)) \
           AND available_at <= now() \
         RETURNING {CLAIMED_COLUMNS}",
        ROW_BYTES = row_bytes!()
    )
}

/// Undoes a claim's delete (the rows are back, unlocked) and locks `ids`
/// again, so that the batch can be settled row by row: delete what Kafka
/// acknowledged, dead-letter or reschedule the rest.
pub async fn unclaim(tx: &mut Transaction<'_, Postgres>, ids: &[i64]) -> sqlx::Result<()> {
    sqlx::query("ROLLBACK TO SAVEPOINT claim")
        .execute(&mut **tx)
        .await?;
    sqlx::query("SELECT id FROM outbox WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(ids)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The partitions of `vpartitions` still leased to `relay` under the given
/// epochs (see `outbox_lease_fence` for why no lock is taken).
pub async fn lease_fence(
    tx: &mut PgConnection,
    relay: &str,
    vpartitions: &[i16],
    epochs: &[i64],
) -> sqlx::Result<Vec<i16>> {
    sqlx::query_scalar("SELECT outbox_lease_fence($1, $2, $3)")
        .bind(relay)
        .bind(vpartitions)
        .bind(epochs)
        .fetch_all(tx)
        .await
}

pub async fn lease_renew(
    conn: &mut PgConnection,
    relay: &str,
    ttl_ms: u64,
) -> sqlx::Result<Vec<(i16, i64)>> {
    sqlx::query_as("SELECT vpartition, epoch FROM outbox_lease_renew($1, $2)")
        .bind(relay)
        .bind(ttl_ms as i32)
        .fetch_all(conn)
        .await
}

pub async fn lease_acquire(
    conn: &mut PgConnection,
    relay: &str,
    ttl_ms: u64,
    max: usize,
) -> sqlx::Result<Vec<(i16, i64)>> {
    sqlx::query_as("SELECT vpartition, epoch FROM outbox_lease_acquire($1, $2, $3)")
        .bind(relay)
        .bind(ttl_ms as i32)
        .bind(max as i32)
        .fetch_all(conn)
        .await
}

pub async fn lease_release(
    conn: &mut PgConnection,
    relay: &str,
    vpartitions: &[i16],
) -> sqlx::Result<i32> {
    sqlx::query_scalar("SELECT outbox_lease_release($1, $2)")
        .bind(relay)
        .bind(vpartitions)
        .fetch_one(conn)
        .await
}

pub async fn vpartition_count(conn: &mut PgConnection) -> sqlx::Result<i32> {
    sqlx::query_scalar("SELECT vpartitions FROM outbox_config")
        .fetch_one(conn)
        .await
}

/// Relays of this database whose heartbeat is younger than `ttl_ms`.
pub async fn live_relays(conn: &mut PgConnection, ttl_ms: u64) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox_relays \
          WHERE stopped_at IS NULL AND heartbeat_at > now() - make_interval(secs => $1 / 1000.0)",
    )
    .bind(ttl_ms as f64)
    .fetch_one(conn)
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

/// Records a failed attempt per row and pushes `available_at` forward
/// (`outbox_schedule_retry`). Rows flagged `unknown` (error of unknown
/// class) that reach `max_attempts` such failures are dead-lettered as
/// `retries_exhausted` instead; their ids are returned.
pub async fn schedule_retry(
    tx: &mut PgConnection,
    ids: &[i64],
    errors: &[String],
    unknown: &[bool],
    max_attempts: u32,
    base_ms: u64,
    cap_ms: u64,
) -> sqlx::Result<Vec<i64>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT outbox_schedule_retry($1, $2, $3, $4, $5, $6)")
        .bind(ids)
        .bind(errors)
        .bind(unknown)
        .bind(max_attempts as i32)
        .bind(base_ms as i64)
        .bind(cap_ms as i64)
        .fetch_all(tx)
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
                coalesce(extract(epoch FROM now() - (SELECT occurred_at FROM outbox ORDER BY id LIMIT 1)), 0)::float8 \
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

/// Records this relay's heartbeat, last publish time and running total.
pub async fn heartbeat(
    conn: &mut PgConnection,
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
         ON CONFLICT (relay_id) DO UPDATE SET heartbeat_at = now(), stopped_at = NULL, \
             last_publish_at = coalesce(EXCLUDED.last_publish_at, outbox_relays.last_publish_at), \
             published_total = EXCLUDED.published_total",
    )
    .bind(relay_id)
    .bind(source)
    .bind(host)
    .bind(version)
    .bind(last_publish)
    .bind(published_total)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks this relay stopped at shutdown (it no longer counts as a member),
/// and forgets relays stopped more than a week ago.
pub async fn leave(conn: &mut PgConnection, relay_id: &str) -> sqlx::Result<()> {
    sqlx::query(
        "WITH stopped AS (UPDATE outbox_relays SET stopped_at = now() WHERE relay_id = $1) \
         DELETE FROM outbox_relays WHERE stopped_at < now() - interval '7 days'",
    )
    .bind(relay_id)
    .execute(conn)
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
    /// Set when the relay shut down gracefully.
    pub stopped_at: Option<DateTime<Utc>>,
}

pub async fn relays(pool: &PgPool) -> sqlx::Result<Vec<RelayRow>> {
    sqlx::query_as(
        "SELECT relay_id, source, host, version, started_at, heartbeat_at, last_publish_at, published_total, \
                stopped_at \
           FROM outbox_relays ORDER BY relay_id",
    )
    .fetch_all(pool)
    .await
}

/// The database's clock, the partition count, and the partitions with a live lease.
pub async fn lease_totals(pool: &PgPool) -> sqlx::Result<(DateTime<Utc>, i64, i64)> {
    sqlx::query_as(
        "SELECT now(), count(*), \
                count(*) FILTER (WHERE owner IS NOT NULL AND expires_at > now()) \
           FROM outbox_leases",
    )
    .fetch_one(pool)
    .await
}

/// Live leases per owner.
pub async fn leases_by_owner(pool: &PgPool) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT owner, count(*) FROM outbox_leases \
          WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner",
    )
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `_sqlx_migrations` as `migrate` leaves it with every embedded migration.
    fn all_applied() -> Vec<AppliedRow> {
        MIGRATOR
            .iter()
            .map(|m| AppliedRow {
                version: m.version,
                description: m.description.to_string(),
                success: true,
                checksum: m.checksum.to_vec(),
            })
            .collect()
    }

    fn versions(ms: &[MigrationInfo]) -> Vec<i64> {
        ms.iter().map(|m| m.version).collect()
    }

    #[test]
    fn a_fresh_database_has_every_migration_pending() {
        let s = compare_schema(&MIGRATOR, &[]);
        let all: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        assert!(all.len() >= 6);
        assert_eq!(versions(&s.pending), all);
        assert!(s.applied.is_empty() && !s.is_current() && !s.migrate_would_refuse());
        assert!(s
            .summary()
            .starts_with("older than this binary (pending 0001, 0002"));
    }

    #[test]
    fn a_migrated_database_is_current() {
        let s = compare_schema(&MIGRATOR, &all_applied());
        assert!(s.is_current(), "{s:?}");
        let last = MIGRATOR.iter().map(|m| m.version).max().unwrap();
        assert_eq!(s.summary(), format!("current ({last:04})"));
        assert_eq!(s.applied[0].to_string(), "0001 outbox");
    }

    #[test]
    fn a_missing_migration_is_pending_and_an_unknown_one_is_newer() {
        let mut rows = all_applied();
        let last = rows.pop().unwrap();
        let s = compare_schema(&MIGRATOR, &rows);
        assert_eq!(versions(&s.pending), vec![last.version]);
        assert!(!s.migrate_would_refuse());

        let mut rows = all_applied();
        rows.push(AppliedRow {
            version: 9001,
            description: "from a later release".into(),
            success: true,
            checksum: vec![1, 2, 3],
        });
        let s = compare_schema(&MIGRATOR, &rows);
        assert_eq!(versions(&s.unknown), vec![9001]);
        assert!(s.pending.is_empty() && s.migrate_would_refuse());
        assert_eq!(s.summary(), "newer than this binary (9001 unknown to it)");
    }

    #[test]
    fn an_edited_or_unfinished_migration_is_reported() {
        let mut rows = all_applied();
        rows[2].checksum[0] ^= 0xff;
        rows[3].success = false;
        let s = compare_schema(&MIGRATOR, &rows);
        assert_eq!(versions(&s.mismatched), vec![rows[2].version]);
        assert_eq!(versions(&s.failed), vec![rows[3].version]);
        assert!(s.migrate_would_refuse());
        assert_eq!(
            s.summary(),
            "edited migrations (0003 differ from this binary's); failed migrations (0004 did not finish)"
        );
    }
}
