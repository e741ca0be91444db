//! The relay pipeline: one batch of outbox rows at a time, through four
//! stages, each in its own file and named in the order data flows:
//!
//! 1. `claim` — take due rows of the usable partitions; the claim deletes
//!    them inside a transaction that stays open until the batch settles.
//! 2. `prepare` — build each row's envelope; a row that can never be
//!    published is rejected here.
//! 3. `produce` — queue the messages in the producer in claim order,
//!    re-checking the lease before each, and wait for Kafka's answers.
//! 4. [`settle`] — plan one [`settle::Settlement`] per row (a pure
//!    function of the answers and the lease fence), write the plan, commit.
//!
//! One row travels as one `Row` (in `prepare`) from stage 2 on. One batch runs
//! in one Postgres transaction: the claimed rows stay locked while Kafka
//! acknowledges them, and the transaction that deletes them is the one that
//! claimed them. A row is never removed before Kafka's ack.
//!
//! [`Relay::run`] keeps several batches in flight (`relay.pipeline_depth`);
//! [`Relay::step`] runs one batch to the end, for tests. The producer is
//! borrowed from its owner ([`SharedProducer`]); stopping, in order, is
//! [`crate::lifecycle`]'s.

mod claim;
mod prepare;
mod produce;
pub mod settle;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::Settings;
use crate::failure::{self, DbClass};
use crate::lease::{Activity, Leases};
use crate::metrics;
use crate::publish::{RelayProducer, SharedProducer};
use crate::sql;

pub use crate::backoff::db_backoff;

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
    producer: Arc<SharedProducer>,
    catalog: Arc<Catalog>,
    settings: Arc<Settings>,
    source: String,
    leases: Option<Arc<Leases>>,
    progress: Arc<Progress>,
    /// Woken by LISTEN/NOTIFY (when `relay.listen` is on) to end an idle wait early.
    wake: Arc<tokio::sync::Notify>,
    /// Partitions left out of claims while another transaction holds their rows.
    blocked: Mutex<claim::Blocked>,
    /// Partitions of which a batch in flight did not send some messages
    /// (its lease was not provable at that moment): later batches send
    /// nothing of them until the pipeline has drained and a claim from the
    /// start picks the held-back rows up again, first.
    held_back: Mutex<BTreeSet<i16>>,
    /// The partitions (and epochs) the last claim from the start covered:
    /// the only ones a pipelined claim, above the cursor, may take.
    scanned: Mutex<HashMap<i16, i64>>,
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

impl Activity for Progress {
    fn last_publish(&self) -> Option<chrono::DateTime<Utc>> {
        Progress::last_publish(self)
    }

    fn published_total(&self) -> u64 {
        Progress::published_total(self)
    }
}

/// A batch settling in its own task.
type BatchTask = JoinHandle<Result<BatchReport, RelayError>>;

impl Relay {
    /// A relay with a producer of its own (tests); [`Relay::with_producer`]
    /// shares the process's.
    pub fn new(
        pool: PgPool,
        producer: Arc<RelayProducer>,
        catalog: Arc<Catalog>,
        settings: Arc<Settings>,
    ) -> Self {
        Relay {
            pool,
            producer: SharedProducer::new(producer, settings.kafka.clone()),
            source: settings.relay.source.clone(),
            catalog,
            settings,
            leases: None,
            progress: Arc::new(Progress::default()),
            wake: Arc::new(tokio::sync::Notify::new()),
            blocked: Mutex::new(claim::Blocked::default()),
            held_back: Mutex::new(BTreeSet::new()),
            scanned: Mutex::new(HashMap::new()),
        }
    }

    /// Borrows the producer from its owner, shared with the other sources.
    pub fn with_producer(mut self, producer: Arc<SharedProducer>) -> Self {
        self.producer = producer;
        self
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

    /// The producer batches are queued in now.
    pub fn producer(&self) -> Arc<RelayProducer> {
        self.producer.current()
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Claims, prepares, produces and settles one batch.
    pub async fn step(&self) -> Result<Outcome, RelayError> {
        // Nothing is in flight between steps.
        self.pipeline_drained();
        match self.claim(None).await? {
            None => Ok(Outcome::Empty),
            Some(claimed) => {
                let in_flight = self.produce(self.prepare(claimed)).await;
                Ok(Outcome::Batch(self.finish(in_flight).await?))
            }
        }
    }

    /// The stages after produce: wait for Kafka's answers, then settle.
    async fn finish(&self, in_flight: produce::InFlight) -> Result<BatchReport, RelayError> {
        self.settle(self.answers(in_flight).await).await
    }

    /// Runs until `token` is cancelled, keeping up to `relay.pipeline_depth`
    /// batches in flight: the next batch is claimed and queued in the
    /// producer while Kafka acknowledges the previous one, and each batch
    /// settles in its own transaction. Messages are queued strictly in claim
    /// order, so the order within a Kafka partition is the outbox order.
    /// Claiming continues at once while batches come back full; an empty
    /// claim with nothing in flight waits for a row ([`Self::idle`]). Database
    /// errors back off (capped) and retry; errors no retry can fix end the
    /// loop. On cancellation, the batches in flight settle before returning.
    pub async fn run(self: Arc<Self>, token: CancellationToken) -> Result<(), RelayError> {
        let idle = self.settings.idle_interval();
        let full = self.settings.relay.batch_size as usize;
        let budget = self.settings.relay.max_batch_bytes as i64;
        let depth = self.settings.relay.pipeline_depth.max(1) as usize;
        let mut backoff = db_backoff();
        let mut inflight: VecDeque<BatchTask> = VecDeque::new();
        let mut cursor: Option<i64> = None;
        let mut last_full_scan = Instant::now();
        let mut waits = IdleWaits::default();
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
                        waits.said_due = false;
                        if !pipelined {
                            last_full_scan = Instant::now();
                        }
                        // Stopped by the row limit or the byte budget:
                        // more rows are probably due.
                        let was_full = claimed.was_full(full, budget);
                        // Rows come back in claim order: the last one is
                        // where a pipelined claim goes on.
                        cursor = claimed.rows.last().map(|r| r.id);
                        inflight.push_back(self.spawn_batch(claimed, &mut produce_turn));
                        if was_full {
                            continue;
                        }
                    }
                    Ok(None) if !pipelined => {
                        last_full_scan = Instant::now();
                        match self.idle(idle, &token, &mut waits).await {
                            Ok(()) => continue,
                            Err(err) => failure = Some(err),
                        }
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
                self.pipeline_drained();
            }
            if let Some(err) = failure {
                // Let the other batches settle first: their rows are locked.
                while let Some(batch) = inflight.pop_front() {
                    let _ = batch.await;
                }
                cursor = None;
                self.pipeline_drained();
                self.back_off(err, &mut backoff, &token).await?;
            }
            if token.is_cancelled() && inflight.is_empty() {
                return Ok(());
            }
        }
    }

    /// Waits after an empty claim with nothing in flight, until a row may
    /// be due. Without LISTEN the wait happens in the server
    /// (`sql::wait_due`): it looks for a row every `interval` and answers
    /// as soon as one is there, so an idle relay makes one call per
    /// `IDLE_WAIT` instead of a claim every `interval`. The server sees
    /// rows of every partition, and rows another relay has locked: when it
    /// said a row was there and the claim then took nothing, the relay
    /// sleeps `interval` instead, as a poll would, so that rows it cannot
    /// take do not keep it claiming without pause. A wait the server
    /// refuses (an error of the statement, not of the connection, which is
    /// backed off from like a claim's) is logged, and the relay polls for a
    /// minute before it tries again: the wait is an economy, never a reason
    /// to stop publishing. With LISTEN, a NOTIFY ends the sleep.
    async fn idle(
        &self,
        interval: Duration,
        token: &CancellationToken,
        waits: &mut IdleWaits,
    ) -> Result<(), RelayError> {
        let failed_lately = waits
            .failed_at
            .is_some_and(|at| at.elapsed() < WAIT_AGAIN_AFTER);
        if self.settings.relay.listen || std::mem::take(&mut waits.said_due) || failed_lately {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = tokio::time::sleep(interval) => {}
                _ = self.wake.notified() => {}
            }
            return Ok(());
        }
        tokio::select! {
            // Dropping the call is safe: the connection finishes reading
            // its answer before it is used again, or is closed with the pool.
            _ = token.cancelled() => {}
            due = sql::wait_due(&self.pool, IDLE_WAIT, interval) => match due {
                Ok(due) => waits.said_due = due,
                // Not an answer of the server (a lost connection, a full
                // pool): backed off like any claim's.
                Err(err) if !matches!(err, sqlx::Error::Database(_)) => return Err(err.into()),
                Err(err) => {
                    tracing::warn!(source = %self.source, error = %err,
                        "waiting for rows in the server failed; polling every idle interval for a minute instead");
                    waits.failed_at = Some(Instant::now());
                }
            },
        }
        Ok(())
    }

    /// No batch is in flight: the next claim starts from the first due row,
    /// so partitions held back by an earlier batch may send again.
    fn pipeline_drained(&self) {
        self.held_back.lock().expect("held-back lock").clear();
    }

    /// Prepares, produces and settles a claimed batch in a task of its own,
    /// while the next claim runs in the loop. Each batch queues its messages
    /// only after the one claimed before it (`produce_turn`), so Kafka still
    /// receives them in claim order.
    fn spawn_batch(
        self: &Arc<Self>,
        claimed: claim::Claimed,
        produce_turn: &mut tokio::sync::oneshot::Receiver<()>,
    ) -> BatchTask {
        let (queued, next_turn) = tokio::sync::oneshot::channel::<()>();
        let turn = std::mem::replace(produce_turn, next_turn);
        let me = self.clone();
        tokio::spawn(async move {
            let _ = turn.await;
            let in_flight = me.produce(me.prepare(claimed)).await;
            let _ = queued.send(());
            me.finish(in_flight).await
        })
    }

    /// After a failed batch or claim: a database error is waited out with
    /// capped backoff (or until `token` is cancelled); any other error, or
    /// one no retry can fix, ends the loop.
    async fn back_off(
        &self,
        err: RelayError,
        backoff: &mut impl Iterator<Item = Duration>,
        token: &CancellationToken,
    ) -> Result<(), RelayError> {
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
        Ok(())
    }
}

/// What the idle waits of one relay loop remember.
#[derive(Default)]
struct IdleWaits {
    /// The last wait ended because the server saw a row.
    said_due: bool,
    /// When a wait last failed (other than by a lost connection).
    failed_at: Option<Instant>,
}

/// How long a relay whose wait in the server failed polls instead.
const WAIT_AGAIN_AFTER: Duration = Duration::from_secs(60);

/// The longest an idle relay's wait in the server lasts before it claims
/// again anyway (rows of partitions it just leased, shutdown).
const IDLE_WAIT: Duration = Duration::from_millis(500);

/// How often a relay claims with nothing in flight, so that rows
/// below its pipelined claims (late commits, retries coming due) are found.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(1);
