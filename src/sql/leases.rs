//! Leases on virtual partitions, and the relays table they are kept in.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

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

/// Takes up to `max` free or expired leases: (partition, epoch, and how many
/// milliseconds to wait before publishing it — the window in which the
/// former owner's producer may still deliver what it queued, when that
/// owner's lease expired instead of being handed back; see
/// `outbox_lease_acquire`).
pub async fn lease_acquire(
    conn: &mut PgConnection,
    relay: &str,
    ttl_ms: u64,
    max: usize,
    fence_ms: u64,
) -> sqlx::Result<Vec<(i16, i64, i32)>> {
    sqlx::query_as("SELECT vpartition, epoch, fenced_ms FROM outbox_lease_acquire($1, $2, $3, $4)")
        .bind(relay)
        .bind(ttl_ms as i32)
        .bind(max as i32)
        .bind(fence_ms.min(i32::MAX as u64) as i32)
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
