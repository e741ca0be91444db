//! The relay loop: claim → envelope → publish → ack / retry / DLQ, one batch per step.
//!
//! One step runs in one Postgres transaction: the claimed rows stay locked
//! while Kafka acknowledges them, and the transaction that deletes them is
//! the one that claimed them. A row is never removed before Kafka's ack.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::Settings;
use crate::envelope::{self, Prepared};
use crate::failure::{self, Class, DbClass, DlqReason};
use crate::lease::Leases;
use crate::metrics;
use crate::publish::{self, RelayProducer};
use crate::sql::{self, OutboxRow};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// What one step did; tests drive the relay one step at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was due.
    Empty,
    Batch(BatchReport),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    pub claimed: usize,
    pub published: usize,
    pub dead_lettered: usize,
    pub retried: usize,
}

/// One source database's relay: pool, producer, catalog, settings.
pub struct Relay {
    pool: PgPool,
    producer: Mutex<Arc<RelayProducer>>,
    catalog: Arc<Catalog>,
    settings: Arc<Settings>,
    source: String,
    leases: Option<Arc<Leases>>,
    progress: Arc<Progress>,
    /// Woken by LISTEN/NOTIFY (when `relay.listen` is on) to end an idle wait early.
    wake: Arc<tokio::sync::Notify>,
    /// Leased partitions with rows still locked by another transaction (a
    /// stalled former owner): left out of claims until a probe finds them
    /// free, so that one stalled owner holds back only its own partitions.
    blocked: Mutex<Blocked>,
}

#[derive(Default)]
struct Blocked {
    vpartitions: std::collections::BTreeSet<i16>,
    probed: Option<Instant>,
}

/// What this relay has published; read by the heartbeat.
#[derive(Debug, Default)]
pub struct Progress {
    published_total: AtomicU64,
    last_publish_ms: AtomicI64,
}

impl Progress {
    /// Events published since the relay started.
    pub fn published_total(&self) -> u64 {
        self.published_total.load(Ordering::Relaxed)
    }

    /// When the last batch was acknowledged.
    pub fn last_publish(&self) -> Option<chrono::DateTime<Utc>> {
        match self.last_publish_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => chrono::DateTime::from_timestamp_millis(ms),
        }
    }
}

/// Rows of a batch that go to the DLQ, with reason, message and type
/// (index-aligned, as `sql::dead_letter` takes them).
#[derive(Default)]
struct Dead {
    ids: Vec<i64>,
    reasons: Vec<&'static str>,
    errors: Vec<String>,
    types: Vec<String>,
}

impl Dead {
    fn push(&mut self, id: i64, event_type: &str, reason: DlqReason, error: String) {
        self.ids.push(id);
        self.reasons.push(reason.as_str());
        self.errors.push(error);
        self.types.push(event_type.to_string());
    }

    fn retain(&mut self, keep: impl Fn(&i64) -> bool) {
        let mut kept = Dead::default();
        for i in 0..self.ids.len() {
            if keep(&self.ids[i]) {
                kept.ids.push(self.ids[i]);
                kept.reasons.push(self.reasons[i]);
                kept.errors.push(std::mem::take(&mut self.errors[i]));
                kept.types.push(std::mem::take(&mut self.types[i]));
            }
        }
        *self = kept;
    }
}

/// A claimed batch, its rows deleted by its still-open transaction.
struct Claimed {
    tx: Transaction<'static, Postgres>,
    rows: Vec<OutboxRow>,
    epochs: HashMap<i16, i64>,
    started: Instant,
    claimed_in: Duration,
    gate: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

/// A claimed batch whose messages are queued in the producer, its rows
/// still locked by its open transaction.
struct InFlight {
    tx: Transaction<'static, Postgres>,
    rows: Vec<OutboxRow>,
    ready: Vec<Prepared>,
    ready_attempts: Vec<i32>,
    dead: Dead,
    epochs: HashMap<i16, i64>,
    produced: publish::Produced,
    producer: Arc<RelayProducer>,
    started: Instant,
    claimed_in: Duration,
    produced_in: Duration,
    _gate: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

impl Relay {
    pub fn new(
        pool: PgPool,
        producer: Arc<RelayProducer>,
        catalog: Arc<Catalog>,
        settings: Arc<Settings>,
    ) -> Self {
        Relay {
            pool,
            producer: Mutex::new(producer),
            source: settings.relay.source.clone(),
            catalog,
            settings,
            leases: None,
            progress: Arc::new(Progress::default()),
            wake: Arc::new(tokio::sync::Notify::new()),
            blocked: Mutex::new(Blocked::default()),
        }
    }

    /// Ends the current idle wait, if any (a new event was announced).
    pub fn wake(&self) -> Arc<tokio::sync::Notify> {
        self.wake.clone()
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Names the source (the `source` metric label) this relay serves.
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Publishes only leased partitions (several relays on one outbox).
    pub fn with_leases(mut self, leases: Arc<Leases>) -> Self {
        self.leases = Some(leases);
        self
    }

    pub fn leases(&self) -> Option<&Arc<Leases>> {
        self.leases.as_ref()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn producer(&self) -> Arc<RelayProducer> {
        self.producer.lock().expect("producer lock").clone()
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Claims, publishes and settles one batch.
    pub async fn step(&self) -> Result<Outcome, RelayError> {
        match self.claim(None).await? {
            None => Ok(Outcome::Empty),
            Some(claimed) => Ok(Outcome::Batch(
                self.finish(self.queue(claimed).await).await?,
            )),
        }
    }

    /// Claims a batch (rows with an ordering id above `after`, when given).
    /// The returned batch keeps its transaction open until [`Relay::finish`].
    async fn claim(&self, after: Option<i64>) -> Result<Option<Claimed>, RelayError> {
        let relay = &self.settings.relay;
        // Held until the batch settles: a lease is handed back only when no
        // batch of it is in flight.
        let gate = match &self.leases {
            Some(l) => Some(l.step_gate.clone().read_owned().await),
            None => None,
        };
        let usable = match self.leases.as_ref().map(|l| l.usable()) {
            Some(u) => Some(self.unblocked(u).await?),
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
    async fn unblocked(
        &self,
        mut usable: crate::lease::Usable,
    ) -> Result<crate::lease::Usable, RelayError> {
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
        let keep: Vec<bool> = usable
            .vpartitions
            .iter()
            .map(|vp| !still.contains(vp))
            .collect();
        let mut i = 0;
        usable.vpartitions.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        let mut i = 0;
        usable.epochs.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        Ok(usable)
    }

    /// Builds the envelopes of a claimed batch and queues its messages in
    /// the producer, without waiting for Kafka.
    async fn queue(&self, claimed: Claimed) -> InFlight {
        let Claimed {
            tx,
            mut rows,
            epochs,
            started,
            claimed_in,
            gate,
        } = claimed;

        let mut dead = Dead::default();
        let mut ready: Vec<Prepared> = Vec::with_capacity(rows.len());
        let mut ready_attempts: Vec<i32> = Vec::with_capacity(rows.len());
        for row in &rows {
            match envelope::prepare(
                row,
                &self.catalog,
                &self.settings.kafka.topic_prefix,
                self.settings.kafka.max_message_bytes,
            ) {
                Ok(p) => {
                    ready.push(p);
                    ready_attempts.push(row.attempts);
                }
                Err(rejected) => {
                    tracing::error!(
                        event_id = %row.event_id,
                        event_type = %row.event_type,
                        reason = rejected.reason.as_str(),
                        error = %rejected.message,
                        "event dead-lettered"
                    );
                    dead.push(row.id, &row.event_type, rejected.reason, rejected.message);
                }
            }
        }
        // Settling needs only ids, partitions and types: the payloads are in
        // the envelopes now, and a batch in flight need not hold them.
        for row in &mut rows {
            row.payload = String::new();
            row.headers = None;
        }
        let producer = self.producer();
        // The lease is checked again right before each message: this task
        // may have waited (its produce turn, a full queue, a paused process)
        // since the claim, and a partition taken over meanwhile must get
        // nothing more from this relay. What is not sent stays unsettled.
        // Each partition's deadline is read once per batch; per message only
        // the clock is read.
        let deadlines: Option<HashMap<i16, Option<Instant>>> = self.leases.as_ref().map(|l| {
            let mut d = HashMap::new();
            for m in &ready {
                d.entry(m.vpartition)
                    .or_insert_with(|| l.still_valid(m.vpartition, epochs[&m.vpartition]));
            }
            d
        });
        let may_send = |m: &Prepared| match &deadlines {
            None => true,
            Some(d) => d
                .get(&m.vpartition)
                .copied()
                .flatten()
                .is_some_and(|until| until > Instant::now()),
        };
        let produced = publish::produce(&producer, &mut ready, may_send).await;
        InFlight {
            tx,
            rows,
            ready,
            ready_attempts,
            dead,
            epochs,
            produced,
            producer,
            started,
            claimed_in,
            produced_in: started.elapsed(),
            _gate: gate,
        }
    }

    /// Waits for Kafka's answers to a batch and settles it in its own
    /// transaction: delete what was acknowledged, dead-letter what never
    /// can be published, reschedule the rest, commit.
    async fn finish(&self, batch: InFlight) -> Result<BatchReport, RelayError> {
        let relay = &self.settings.relay;
        let InFlight {
            mut tx,
            rows,
            ready,
            ready_attempts,
            mut dead,
            epochs,
            produced,
            producer,
            started,
            claimed_in,
            produced_in,
            ..
        } = batch;
        // librdkafka reports every message within message.timeout.ms of
        // queueing it; past that (plus a margin for a busy machine) a missing
        // report can only be lost, and waiting longer would stall the
        // pipeline. Unanswered rows are published again.
        let reports_due =
            started + Duration::from_millis(self.settings.kafka.message_timeout_ms) + REPORT_MARGIN;
        let give_up = async {
            tokio::select! {
                _ = self.lease_deadline(&ready, &epochs) => {}
                _ = tokio::time::sleep_until(reports_due.into()) => {
                    tracing::warn!(events = ready.len(),
                        "delivery reports overdue; the batch's unanswered events will be published again");
                }
            }
        };
        let results = publish::acks(produced, give_up).await;
        let acked_in = started.elapsed();

        let now = Utc::now();
        let mut acked = Vec::with_capacity(ready.len());
        let mut retry_ids = Vec::new();
        let mut retry_errors = Vec::new();
        // Rows whose failure is of unknown class: only those use up
        // relay.max_attempts (counted in SQL by sql::schedule_retry).
        let mut unknown_ids = std::collections::HashSet::new();
        let mut unsettled = 0usize;
        let mut latencies = Vec::with_capacity(ready.len());
        for ((msg, attempts), result) in ready.iter().zip(&ready_attempts).zip(results) {
            let err = match result {
                None => {
                    // No report before the lease ran short: left for the
                    // next owner, who publishes it again (same id).
                    unsettled += 1;
                    continue;
                }
                Some(Ok(_)) => {
                    acked.push(msg.id);
                    let latency = (now - msg.occurred_at).num_microseconds().unwrap_or(0);
                    latencies.push(latency as f64 / 1e6);
                    continue;
                }
                Some(Err(err)) => err,
            };
            let class = failure::classify_kafka(&err);
            match class {
                Class::Permanent(reason) => {
                    tracing::error!(event_id = %msg.event_id, event_type = %msg.def.event_type,
                        reason = reason.as_str(), error = %err, "event dead-lettered");
                    dead.push(msg.id, &msg.def.event_type, reason, err.to_string());
                }
                Class::Transient(label) => {
                    if label == failure::TOPIC_AUTHORIZATION_FAILED {
                        // Nothing recovers until an operator grants the ACL.
                        tracing::error!(event_id = %msg.event_id, event_type = %msg.def.event_type,
                            topic = %msg.topic, error = %err,
                            "the broker denies the relay this topic; the event is retried until the ACL is granted");
                    }
                    metrics::publish_failure(self.source(), label);
                    retry_ids.push(msg.id);
                    retry_errors.push(err.to_string());
                }
                Class::Unknown => {
                    tracing::warn!(event_id = %msg.event_id, event_type = %msg.def.event_type,
                        attempt = attempts + 1, error = %err, "publish failed with an error of unknown class");
                    metrics::publish_failure(self.source(), class.retry_label());
                    unknown_ids.insert(msg.id);
                    retry_ids.push(msg.id);
                    retry_errors.push(err.to_string());
                }
            }
        }
        metrics::publish_latencies(self.source(), latencies);
        if !retry_ids.is_empty() {
            tracing::warn!(
                events = retry_ids.len(),
                error = %retry_errors[0],
                "publish failed; events stay in the outbox and are retried"
            );
        }
        if unsettled > 0 {
            tracing::warn!(
                events = unsettled,
                "lease ran short before Kafka answered; events left for the next owner"
            );
        }
        // Fast path: every row was acknowledged and every lease held, so
        // the claim's delete stands as it is. Otherwise the delete is undone
        // and the batch settled row by row.
        let clean = dead.ids.is_empty() && retry_ids.is_empty() && unsettled == 0;
        let mut fast = false;
        if clean {
            fast = match (&self.leases, epochs.is_empty()) {
                (Some(leases), false) => {
                    let (vps, eps) = batch_leases(&rows, &epochs);
                    sql::lease_fence(&mut tx, leases.relay_id(), &vps, &eps)
                        .await?
                        .len()
                        == vps.len()
                }
                _ => true,
            };
        }
        if !fast {
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            sql::unclaim(&mut tx, &ids).await?;
            if let (Some(leases), false) = (&self.leases, epochs.is_empty()) {
                // Fencing: settle only rows of partitions still ours under the
                // epoch we claimed them with.
                let (vps, eps) = batch_leases(&rows, &epochs);
                let valid: std::collections::HashSet<i16> =
                    sql::lease_fence(&mut tx, leases.relay_id(), &vps, &eps)
                        .await?
                        .into_iter()
                        .collect();
                if valid.len() < vps.len() {
                    let part_of: HashMap<i64, i16> =
                        rows.iter().map(|r| (r.id, r.vpartition)).collect();
                    let keep = |id: &i64| valid.contains(&part_of[id]);
                    let before = acked.len() + dead.ids.len() + retry_ids.len();
                    acked.retain(keep);
                    dead.retain(keep);
                    let mut kept_errors = Vec::with_capacity(retry_ids.len());
                    let mut kept_ids = Vec::with_capacity(retry_ids.len());
                    for (id, err) in retry_ids.into_iter().zip(retry_errors) {
                        if keep(&id) {
                            kept_ids.push(id);
                            kept_errors.push(err);
                        }
                    }
                    retry_ids = kept_ids;
                    retry_errors = kept_errors;
                    let fenced = before - acked.len() - dead.ids.len() - retry_ids.len();
                    tracing::warn!(
                        events = fenced,
                        lost = vps.len() - valid.len(),
                        "lease lost during the batch; its rows are left to the new owner"
                    );
                }
            }
            sql::delete_published(&mut tx, &acked).await?;
            sql::dead_letter(&mut tx, &dead.ids, &dead.reasons, &dead.errors).await?;
        }
        let unknown: Vec<bool> = retry_ids
            .iter()
            .map(|id| unknown_ids.contains(id))
            .collect();
        let exhausted = sql::schedule_retry(
            &mut tx,
            &retry_ids,
            &retry_errors,
            &unknown,
            relay.max_attempts,
            relay.retry_base_ms,
            relay.retry_max_ms,
        )
        .await?;
        let settled_in = started.elapsed();
        let committed = tx.commit().await;
        tracing::trace!(
            rows = rows.len(),
            claim_us = claimed_in.as_micros() as u64,
            produce_us = (produced_in - claimed_in).as_micros() as u64,
            ack_us = (acked_in - produced_in).as_micros() as u64,
            settle_us = (settled_in - acked_in).as_micros() as u64,
            commit_us = (started.elapsed() - settled_in).as_micros() as u64,
            "batch timings"
        );
        if let Err(err) = committed {
            // Kafka has these events; they will be published again with the
            // same ids once the rows are claimed again (at-least-once).
            tracing::warn!(events = acked.len(), error = %err,
                "commit after Kafka acknowledged failed; these events will be re-delivered");
            return Err(err.into());
        }

        // `acked` is a subsequence of `ready` (both in claim order), so one
        // walk pairs them without building a set. A handful of (type, topic)
        // pairs per batch: a linear scan beats hashing.
        let mut next_acked = acked.iter().peekable();
        let mut published_by: Vec<((&str, &str), u64)> = Vec::new();
        for msg in ready.iter() {
            if next_acked.peek() != Some(&&msg.id) {
                continue;
            }
            next_acked.next();
            let pair = (msg.def.event_type.as_str(), msg.topic.as_str());
            match published_by.iter_mut().find(|(p, _)| *p == pair) {
                Some((_, n)) => *n += 1,
                None => published_by.push((pair, 1)),
            }
        }
        for ((event_type, topic), n) in published_by {
            metrics::published(self.source(), event_type, topic, n);
        }
        for (event_type, reason) in dead.types.iter().zip(&dead.reasons) {
            metrics::dead_lettered(self.source(), event_type, reason);
        }
        for id in &exhausted {
            let row = rows
                .iter()
                .find(|r| r.id == *id)
                .expect("an exhausted row is a claimed row");
            tracing::error!(event_id = %row.event_id, event_type = %row.event_type,
                reason = DlqReason::RetriesExhausted.as_str(), max_attempts = relay.max_attempts,
                "event dead-lettered");
            metrics::dead_lettered(
                self.source(),
                &row.event_type,
                DlqReason::RetriesExhausted.as_str(),
            );
        }
        if !acked.is_empty() {
            let now_ms = Utc::now().timestamp_millis();
            self.progress
                .last_publish_ms
                .store(now_ms, Ordering::Relaxed);
            self.progress
                .published_total
                .fetch_add(acked.len() as u64, Ordering::Relaxed);
            metrics::last_publish(self.source(), now_ms as f64 / 1e3);
        }
        if let Some(fatal) = publish::fatal_error(&producer) {
            tracing::error!(error = %fatal, "producer hit a fatal error; recreating it");
            let fresh = publish::create_producer(&self.settings.kafka)?;
            *self.producer.lock().expect("producer lock") = Arc::new(fresh);
        }
        Ok(BatchReport {
            claimed: rows.len(),
            published: acked.len(),
            dead_lettered: dead.ids.len() + exhausted.len(),
            retried: retry_ids.len() - exhausted.len(),
        })
    }

    /// Completes when the leases of the batch's partitions run short (never
    /// without leases). Renewals extend the wait while the leases hold.
    async fn lease_deadline(&self, batch: &[Prepared], epochs: &HashMap<i16, i64>) {
        let Some(leases) = &self.leases else {
            return std::future::pending().await;
        };
        let vps: std::collections::BTreeSet<i16> = batch.iter().map(|m| m.vpartition).collect();
        loop {
            let mut deadline: Option<Instant> = None;
            for vp in &vps {
                match leases.still_valid(*vp, epochs[vp]) {
                    Some(until) => deadline = Some(deadline.map_or(until, |d| d.min(until))),
                    None => return,
                }
            }
            let Some(deadline) = deadline else {
                return std::future::pending().await;
            };
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }

    /// Runs until `token` is cancelled, keeping up to `relay.pipeline_depth`
    /// batches in flight: the next batch is claimed and queued in the
    /// producer while Kafka acknowledges the previous one, and each batch
    /// settles in its own transaction. Messages are queued strictly in claim
    /// order, so the order within a Kafka partition is the outbox order.
    /// Claiming continues at once while batches come back full; an empty
    /// claim waits `relay.idle_interval_ms` (or a NOTIFY wake-up). Database
    /// errors back off (capped) and retry; errors no retry can fix end the
    /// loop. On cancellation, the batches in flight settle before returning.
    pub async fn run(self: Arc<Self>, token: CancellationToken) -> Result<(), RelayError> {
        let idle = self.settings.idle_interval();
        let full = self.settings.relay.batch_size as usize;
        let budget = self.settings.relay.max_batch_bytes as i64;
        let depth = self.settings.relay.pipeline_depth.max(1) as usize;
        let mut backoff = db_backoff();
        let mut inflight: VecDeque<tokio::task::JoinHandle<Result<BatchReport, RelayError>>> =
            VecDeque::new();
        let mut cursor: Option<i64> = None;
        let mut last_full_scan = Instant::now();
        // Resolved once the latest batch has queued its messages.
        let mut produce_turn = {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let _ = tx.send(());
            rx
        };
        loop {
            let mut failure: Option<RelayError> = None;
            let can_claim = !token.is_cancelled() && inflight.len() < depth;
            // A pipelined claim starts above this relay's own rows in flight:
            // with leases the claim waits on locked rows instead of skipping
            // them, and a batch that settles row by row briefly unlocks its
            // rows (sql::unclaim). Rows below the cursor (a late commit, a
            // retry coming due) are found by a claim with nothing in flight,
            // at least every FULL_SCAN_EVERY.
            let pipelined = !inflight.is_empty();
            let due_full_scan = pipelined && last_full_scan.elapsed() >= FULL_SCAN_EVERY;
            if can_claim && !due_full_scan {
                let after = if pipelined { cursor } else { None };
                match self.claim(after).await {
                    Ok(Some(claimed)) => {
                        if !pipelined {
                            last_full_scan = Instant::now();
                        }
                        // Stopped by the row limit or the byte budget:
                        // more rows are probably due.
                        let was_full = claimed.rows.len() >= full
                            || claimed.rows.iter().map(|r| r.bytes).sum::<i64>() >= budget;
                        // Rows come back in ordering-id order.
                        cursor = claimed.rows.last().map(|r| r.id);
                        // Envelopes and produce calls run in the batch's task
                        // while the next claim runs here; each batch queues
                        // its messages only after the one claimed before it,
                        // so Kafka still receives them in claim order.
                        let (queued, next_turn) = tokio::sync::oneshot::channel::<()>();
                        let turn = std::mem::replace(&mut produce_turn, next_turn);
                        let me = self.clone();
                        inflight.push_back(tokio::spawn(async move {
                            let _ = turn.await;
                            let batch = me.queue(claimed).await;
                            let _ = queued.send(());
                            me.finish(batch).await
                        }));
                        if was_full {
                            continue;
                        }
                    }
                    Ok(None) if !pipelined => {
                        last_full_scan = Instant::now();
                        tokio::select! {
                            _ = token.cancelled() => {}
                            _ = tokio::time::sleep(idle) => {}
                            _ = self.wake.notified() => {}
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(err) => failure = Some(err),
                }
            }
            if let Some(oldest) = inflight.pop_front() {
                match oldest.await.expect("batch task panicked") {
                    Ok(_) => backoff = db_backoff(),
                    Err(err) => failure = failure.or(Some(err)),
                }
            }
            if inflight.is_empty() {
                cursor = None;
            }
            if let Some(err) = failure {
                // Let the other batches settle first: their rows are locked.
                while let Some(batch) = inflight.pop_front() {
                    let _ = batch.await;
                }
                cursor = None;
                let RelayError::Db(err) = err else {
                    return Err(err);
                };
                metrics::db_error(self.source());
                if failure::classify_db_running(&err) == DbClass::Fatal {
                    tracing::error!(error = %err, "database error that no retry can fix");
                    return Err(err.into());
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                    "database unavailable; retrying");
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            if token.is_cancelled() && inflight.is_empty() {
                return Ok(());
            }
        }
    }
}

/// The partitions a batch touched, with the epochs it claimed them under.
fn batch_leases(rows: &[OutboxRow], epochs: &HashMap<i16, i64>) -> (Vec<i16>, Vec<i64>) {
    let touched: std::collections::BTreeSet<i16> = rows.iter().map(|r| r.vpartition).collect();
    let vps: Vec<i16> = touched.into_iter().collect();
    let eps = vps.iter().map(|vp| epochs[vp]).collect();
    (vps, eps)
}

/// How often partitions blocked by another transaction's row locks are
/// probed to see whether they are free again.
const BLOCKED_PROBE_EVERY: Duration = Duration::from_millis(500);

/// How long past `kafka.message_timeout_ms` a batch waits for delivery
/// reports that librdkafka should already have sent.
const REPORT_MARGIN: Duration = Duration::from_secs(10);

/// How often a relay claims with nothing in flight, so that rows
/// below its pipelined claims (late commits, retries coming due) are found.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(1);

/// Capped exponential backoff with jitter for reconnecting to Postgres.
pub fn db_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
