//! The relay's data path in SQL: its connection settings, the claim, and
//! settling a batch (delete, dead-letter, reschedule).

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};
use std::str::FromStr;
use std::time::Duration;

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
    /// When the row became due: a claim takes retried rows in this order.
    pub available_at: DateTime<Utc>,
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
            // Those settings price the plans they rule out with a huge
            // cost; on PostgreSQL before 18 that cost also crosses
            // `jit_above_cost`, and every claim (a few index lookups) was
            // compiled to machine code first: 200 to 300 ms each where the
            // server has JIT.
            ("jit", "off".to_string()),
            (
                "idle_in_transaction_session_timeout",
                format!("{}ms", idle_timeout.as_millis()),
            ),
        ])
        .options(DEAD_PEER);
    let port = options.get_port();
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .after_connect(move |_, _| {
            Box::pin(async move {
                super::sockets::guard(port);
                Ok(())
            })
        })
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
/// The relay's own sockets get the same keepalives and user timeout
/// ([`super::sockets`]), so that it does not wait forever on a server
/// that vanished.
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
            available_at: row.try_get(11)?,
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
    " AS bytes, available_at"
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

/// Waits in the server, at most `wait`, until the outbox holds a fresh row
/// or a due retried row, looking every `every` (`outbox_wait_due`,
/// migration 0013); true as soon as one is there. What an idle relay does
/// between claims: one call instead of a transaction and a claim every
/// `every`; on the server a look reads the id sequence, and the table
/// only when a writer took an id lately (or every tenth look).
pub async fn wait_due(pool: &PgPool, wait: Duration, every: Duration) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT outbox_wait_due($1, $2)")
        .bind(wait.as_millis().min(i32::MAX as u128) as i32)
        .bind(every.as_millis().clamp(1, i32::MAX as u128) as i32)
        .fetch_one(pool)
        .await
}

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
    let locked = sqlx::query_scalar(&format!(
        "WITH due AS ({DUE}), \
         free AS ( \
             SELECT id FROM outbox WHERE id = ANY(ARRAY(SELECT id FROM due)) FOR UPDATE SKIP LOCKED \
         ) \
         SELECT DISTINCT vpartition FROM due WHERE id NOT IN (SELECT id FROM free) ORDER BY 1",
        DUE = due_rows("vpartition", "AND vpartition = ANY($3)", "")
    ))
    .bind(limit)
    .bind(after)
    .bind(vpartitions)
    .fetch_all(&mut *tx)
    .await?;
    tx.rollback().await?;
    Ok(locked)
}

/// Claims due rows after the row `after_id` (0: from the start) in claim
/// order (see [`claim_order`]) — of the given virtual partitions when
/// leases are on — up to `limit` rows and, past the first row, `max_bytes`
/// of payload and headers (see [`claim_statement`]), and deletes them in one
/// statement, inside the savepoint [`begin_claim`] opened: nothing is
/// removed until that transaction commits after Kafka acknowledged the
/// batch, and [`unclaim`] undoes the delete when some rows must stay. Rows
/// come back in claim order; the last one is where a pipelined claim goes
/// on.
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
    rows.sort_unstable_by_key(claim_order);
    Ok(rows)
}

/// The order in which claims take and publish rows: retried rows (moved
/// to negative ids by `outbox_reschedule`) in the order they came due, rows
/// that failed together (one due instant) in id order; then the other rows
/// in ordering-id order. A key's fresh rows keep the order they were
/// written in; a retried row lets later events of its key pass anyway
/// (docs/delivery.md).
pub fn claim_order(row: &OutboxRow) -> (bool, Option<DateTime<Utc>>, i64) {
    (row.id > 0, (row.id < 0).then_some(row.available_at), row.id)
}

/// The claim statement: $1 limit in rows, $2 the row to go on after (0:
/// from the start; see `due_rows`), $3 byte budget, $4 the leased virtual
/// partitions (with leases).
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
                 SELECT id, bytes, sum(bytes) OVER (ORDER BY {CLAIM_ORDER} ROWS UNBOUNDED PRECEDING) AS upto \
                   FROM ({DUE}) due \
             ) sized \
              WHERE upto - bytes < $3)) \
           AND available_at <= now() \
         RETURNING {CLAIMED_COLUMNS}",
        DUE = due_rows(
            &format!("{ROW_BYTES} AS bytes", ROW_BYTES = row_bytes!()),
            filter,
            lock
        )
    )
}

/// [`claim_order`] in SQL, over the columns of [`due_rows`].
const CLAIM_ORDER: &str = "id > 0, CASE WHEN id < 0 THEN available_at END, id";

/// The first `$1` due rows after the row `$2` in claim order (0: from the
/// start; no row has id 0), `filter` narrowing them and `lock` locking them:
/// retried rows, then fresh rows. Columns: `id`, `columns`, `available_at`.
///
/// A row that failed was moved to a negative id (`outbox_reschedule`,
/// migration 0012), below every fresh row, where the primary key walk of
/// fresh rows never meets it. Due retried rows are found through
/// `outbox_retried_due_idx` (`available_at, id` of rows with a negative id,
/// which no insert maintains): rows not due yet are never read, however
/// many wait. They are taken in the order they came due (rows that failed
/// together share the instant and keep their id order), at most `$1` of
/// them. Fresh rows come after them, walked by the primary key in id order,
/// as many as the limit leaves: Append runs its branches in turn, and the
/// Limit above stops pulling (and locking) once it has `$1` rows. A row
/// with a positive id that failed before the upgrade (or under a relay of
/// 0.1.0) is due like a fresh one.
///
/// A pipelined claim goes on after its relay's last claimed row. After a
/// fresh row it takes fresh rows above it and no retried row: those wait
/// for the next claim from the start, like any due row below the cursor.
/// After a retried row (a batch of retried rows only) it takes retried rows
/// after that row in (due instant, id) order, and fresh rows from the
/// start (none is in flight). The cursor row is read as this statement's
/// snapshot sees it: still there, deleted by the relay's own uncommitted
/// batch; if that batch has ended since, no retried row is taken.
fn due_rows(columns: &str, filter: &str, lock: &str) -> String {
    format!(
        "SELECT * FROM ( \
             SELECT * FROM ( \
                 SELECT id, {columns}, available_at FROM outbox \
                  WHERE id < 0 AND available_at <= now() \
                    AND (available_at, id) > ( \
                        CASE WHEN $2::bigint = 0 THEN '-infinity'::timestamptz \
                             WHEN $2 > 0 THEN 'infinity'::timestamptz \
                             ELSE coalesce((SELECT c.available_at FROM outbox c WHERE c.id = $2), \
                                           'infinity'::timestamptz) END, \
                        $2) \
                    {filter} \
                  ORDER BY available_at, id \
                  LIMIT $1 \
                  {lock}) retried \
             UNION ALL \
             SELECT * FROM ( \
                 SELECT id, {columns}, available_at FROM outbox \
                  WHERE id > greatest($2, 0) AND available_at <= now() {filter} \
                  ORDER BY id \
                  LIMIT $1 \
                  {lock}) fresh \
         ) due_rows LIMIT $1"
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
/// (`outbox_schedule_retry`), and moves the rows below the fresh rows
/// (`outbox_reschedule`: a negative id, see [`claim_statement`]), so that
/// claims do not read them until they are due. Rows flagged `unknown`
/// (error of unknown class) that reach `max_attempts` such failures are
/// dead-lettered as `retries_exhausted` instead; their ids (as given) are
/// returned.
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
    sqlx::query_scalar("SELECT outbox_reschedule($1, $2, $3, $4, $5, $6)")
        .bind(ids)
        .bind(errors)
        .bind(unknown)
        .bind(max_attempts as i32)
        .bind(base_ms as i64)
        .bind(cap_ms as i64)
        .fetch_all(tx)
        .await
}
