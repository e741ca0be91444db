//! Stage 1, claim: take due rows of the usable (leased, unblocked)
//! partitions in one statement that deletes them inside a still-open
//! transaction, and set aside partitions whose rows another transaction
//! holds.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use sqlx::{Postgres, Transaction};

use super::{Relay, RelayError};
use crate::failure;
use crate::lease::Usable;
use crate::metrics;
use crate::sql::{self, OutboxRow};

/// A claimed batch, its rows deleted by its still-open transaction.
pub(super) struct Claimed {
    pub tx: Transaction<'static, Postgres>,
    pub rows: Vec<OutboxRow>,
    /// The epoch each leased partition was claimed under (empty without leases).
    pub epochs: HashMap<i16, i64>,
    pub started: Instant,
    pub claimed_in: Duration,
    /// Held until the batch settles: a lease is handed back only when no
    /// batch of it is in flight.
    pub gate: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

impl Claimed {
    /// Whether the claim stopped at the row limit or the byte budget: more
    /// rows are probably due.
    pub fn was_full(&self, batch_size: usize, max_batch_bytes: i64) -> bool {
        self.rows.len() >= batch_size
            || self.rows.iter().map(|r| r.bytes).sum::<i64>() >= max_batch_bytes
    }
}

/// Leased partitions with rows still locked by another transaction (a
/// stalled former owner): left out of claims until a probe finds them
/// free, so that one stalled owner holds back only its own partitions.
#[derive(Default)]
pub(super) struct Blocked {
    vpartitions: BTreeSet<i16>,
    probed: Option<Instant>,
}

/// How often partitions blocked by another transaction's row locks are
/// probed to see whether they are free again.
const BLOCKED_PROBE_EVERY: Duration = Duration::from_millis(500);

impl Relay {
    /// Claims a batch (rows with an ordering id above `after`, when given).
    /// The returned batch keeps its transaction open until it is settled.
    pub(super) async fn claim(&self, after: Option<i64>) -> Result<Option<Claimed>, RelayError> {
        let relay = &self.settings.relay;
        // Held until the batch settles: a lease is handed back only when no
        // batch of it is in flight.
        let gate = match &self.leases {
            Some(l) => Some(l.step_gate.clone().read_owned().await),
            None => None,
        };
        let usable = match self.leases.as_ref().map(|l| l.usable()) {
            Some(u) => Some(self.scanned(self.unblocked(u).await?, after)),
            None => None,
        };
        if usable.as_ref().is_some_and(|u| u.vpartitions.is_empty()) {
            // Standing by: no partition leased (yet), or every one blocked.
            return Ok(None);
        }
        let started = Instant::now();
        let mut tx = sql::begin_claim(&self.pool).await?;
        let vpartitions = usable.as_ref().map(|u| u.vpartitions.as_slice());
        let claimed = sql::claim(
            &mut tx,
            relay.batch_size as i64,
            relay.max_batch_bytes as i64,
            vpartitions,
            after.unwrap_or(0),
        )
        .await;
        let rows = match (claimed, vpartitions) {
            (Ok(rows), _) => rows,
            (Err(err), Some(vps)) if failure::is_lock_timeout(&err) => {
                drop(tx);
                self.block(vps, after.unwrap_or(0)).await?;
                return Ok(None);
            }
            (Err(err), _) => return Err(err.into()),
        };
        let claimed_in = started.elapsed();
        metrics::batch(self.source(), rows.len(), claimed_in);
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(None);
        }
        let epochs: HashMap<i16, i64> = match &usable {
            Some(u) => u
                .vpartitions
                .iter()
                .copied()
                .zip(u.epochs.iter().copied())
                .collect(),
            None => HashMap::new(),
        };
        Ok(Some(Claimed {
            tx,
            rows,
            epochs,
            started,
            claimed_in,
            gate,
        }))
    }

    /// A claim from the start (`after` is `None`) records the partitions it
    /// covers; a pipelined claim (above the cursor) keeps only those, under
    /// the same epochs. A partition that became usable since (a lease just
    /// taken over, a blocked partition free again) may have due rows below
    /// the cursor: claiming above it would publish that partition's newer
    /// events before its older ones, so it waits for the next claim from
    /// the start (at the latest `FULL_SCAN_EVERY`).
    fn scanned(&self, usable: Usable, after: Option<i64>) -> Usable {
        let mut scanned = self.scanned.lock().expect("scanned partitions");
        keep_scanned(usable, &mut scanned, after)
    }

    /// A claim waited its lock timeout (500 ms, `sql::begin_claim`) on a row another
    /// transaction holds: with leases that is a former owner that stalled
    /// with its batch open (a frozen host, a half-open connection). Find
    /// which partitions it holds and leave them out until they are free;
    /// the others go on at once.
    async fn block(&self, vpartitions: &[i16], after: i64) -> Result<(), RelayError> {
        let locked = sql::locked_partitions(
            &self.pool,
            vpartitions,
            after,
            self.settings.relay.batch_size as i64,
        )
        .await?;
        // Free again, they come back only with a claim from the start.
        self.scanned
            .lock()
            .expect("scanned partitions")
            .retain(|vp, _| !locked.contains(vp));
        let mut blocked = self.blocked.lock().expect("blocked partitions");
        blocked.vpartitions.extend(locked.iter().copied());
        blocked.probed = Some(Instant::now());
        metrics::blocked_partitions(&self.source, blocked.vpartitions.len());
        // Empty when the holder's transaction ended between the claim and
        // the probe: nothing to leave out.
        if !locked.is_empty() {
            tracing::warn!(source = %self.source, vpartitions = ?locked,
                "rows of these partitions are locked by another transaction (a stalled former owner?); \
                 claiming the other partitions until they are free");
        }
        Ok(())
    }

    /// The usable leases less the blocked partitions; every
    /// `BLOCKED_PROBE_EVERY` the blocked ones are probed and those free
    /// again come back.
    async fn unblocked(&self, mut usable: Usable) -> Result<Usable, RelayError> {
        let (blocked, probe) = {
            let b = self.blocked.lock().expect("blocked partitions");
            let due = b.probed.is_none_or(|t| t.elapsed() >= BLOCKED_PROBE_EVERY);
            (b.vpartitions.clone(), due)
        };
        if blocked.is_empty() {
            return Ok(usable);
        }
        // Only partitions still leased can be blocked for this relay.
        let held: Vec<i16> = blocked
            .iter()
            .copied()
            .filter(|vp| usable.vpartitions.contains(vp))
            .collect();
        let still = if probe && !held.is_empty() {
            sql::locked_partitions(&self.pool, &held, 0, self.settings.relay.batch_size as i64)
                .await?
        } else if probe {
            Vec::new()
        } else {
            held
        };
        {
            let mut b = self.blocked.lock().expect("blocked partitions");
            if probe {
                let freed: Vec<i16> = b
                    .vpartitions
                    .iter()
                    .copied()
                    .filter(|vp| !still.contains(vp))
                    .collect();
                if !freed.is_empty() {
                    tracing::info!(source = %self.source, vpartitions = ?freed,
                        "blocked partitions are free again; claiming them");
                }
                b.vpartitions = still.iter().copied().collect();
                b.probed = Some(Instant::now());
            }
            metrics::blocked_partitions(&self.source, b.vpartitions.len());
        }
        usable.retain(|vp, _| !still.contains(&vp));
        Ok(usable)
    }
}

/// [`Relay::scanned`]'s rule: a claim from the start (`after` is `None`)
/// records what it covers; a pipelined one keeps only those partitions,
/// under the same epochs.
fn keep_scanned(mut usable: Usable, scanned: &mut HashMap<i16, i64>, after: Option<i64>) -> Usable {
    match after {
        None => {
            *scanned = usable
                .vpartitions
                .iter()
                .copied()
                .zip(usable.epochs.iter().copied())
                .collect();
        }
        Some(_) => usable.retain(|vp, epoch| scanned.get(&vp) == Some(&epoch)),
    }
    usable
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usable(leases: &[(i16, i64)]) -> Usable {
        Usable {
            vpartitions: leases.iter().map(|l| l.0).collect(),
            epochs: leases.iter().map(|l| l.1).collect(),
        }
    }

    #[test]
    fn a_pipelined_claim_takes_only_partitions_the_last_claim_from_the_start_covered() {
        let mut scanned = HashMap::new();
        let first = keep_scanned(usable(&[(1, 7), (2, 7)]), &mut scanned, None);
        assert_eq!(first.vpartitions, vec![1, 2]);
        // Partition 3 was just taken over, 2 changed hands and came back
        // under a new epoch: neither may be claimed above the cursor.
        let pipelined = keep_scanned(usable(&[(1, 7), (2, 8), (3, 1)]), &mut scanned, Some(500));
        assert_eq!(pipelined.vpartitions, vec![1]);
        assert_eq!(pipelined.epochs, vec![7]);
        // The next claim from the start covers them all again.
        let again = keep_scanned(usable(&[(1, 7), (2, 8), (3, 1)]), &mut scanned, None);
        assert_eq!(again.vpartitions, vec![1, 2, 3]);
        let pipelined = keep_scanned(usable(&[(1, 7), (2, 8), (3, 1)]), &mut scanned, Some(900));
        assert_eq!(pipelined.vpartitions, vec![1, 2, 3]);
        assert_eq!(pipelined.epochs, vec![7, 8, 1]);
    }
}
