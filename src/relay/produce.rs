//! Stage 3, produce: queue the batch's messages in the producer strictly in
//! claim order (re-checking the lease right before each one), then wait for
//! Kafka's answers until they are all in, the leases run short, or the
//! delivery reports are overdue.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{Postgres, Transaction};

use super::prepare::{PreparedBatch, Row, State};
use super::Relay;
use crate::envelope::Prepared;
use crate::publish::{self, RelayProducer};

/// How long past `kafka.message_timeout_ms` a batch waits for delivery
/// reports that librdkafka should already have sent.
const REPORT_MARGIN: Duration = Duration::from_secs(10);

/// A batch whose messages are queued in the producer, its rows still
/// locked by its open transaction.
pub(super) struct InFlight {
    tx: Transaction<'static, Postgres>,
    /// The prepared rows are [`State::Queued`]; their messages are in
    /// `messages`, in the same (claim) order.
    rows: Vec<Row>,
    messages: Vec<Prepared>,
    epochs: HashMap<i16, i64>,
    produced: publish::Produced,
    producer: Arc<RelayProducer>,
    started: Instant,
    claimed_in: Duration,
    produced_in: Duration,
    gate: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

/// A batch with Kafka's answers, ready to settle.
pub(super) struct Answered {
    pub tx: Transaction<'static, Postgres>,
    /// In claim order; every prepared row is [`State::Answered`].
    pub rows: Vec<Row>,
    pub epochs: HashMap<i16, i64>,
    /// The producer the batch was queued in, for the fatal-error check.
    pub producer: Arc<RelayProducer>,
    pub started: Instant,
    pub claimed_in: Duration,
    pub produced_in: Duration,
    pub acked_in: Duration,
    pub _gate: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

impl Relay {
    /// Queues the messages of a prepared batch in the producer, without
    /// waiting for Kafka.
    pub(super) async fn produce(&self, batch: PreparedBatch) -> InFlight {
        let PreparedBatch {
            tx,
            mut rows,
            epochs,
            started,
            claimed_in,
            gate,
        } = batch;
        let mut messages = Vec::with_capacity(rows.len());
        for row in &mut rows {
            if matches!(row.state, State::Ready(_)) {
                let State::Ready(msg) = std::mem::replace(&mut row.state, State::Queued) else {
                    unreachable!("matched just above");
                };
                messages.push(msg);
            }
        }
        let producer = self.producer.current();
        // The lease is checked again right before each message: this task
        // may have waited (its produce turn, a full queue, a paused process)
        // since the claim, and a partition taken over meanwhile must get
        // nothing more from this relay. What is not sent stays unsettled.
        // Each partition's deadline is read once per batch; per message only
        // the clock is read.
        let deadlines: Option<HashMap<i16, Option<Instant>>> = self.leases.as_ref().map(|l| {
            let mut d = HashMap::new();
            for m in &messages {
                d.entry(m.vpartition)
                    .or_insert_with(|| l.still_valid(m.vpartition, epochs[&m.vpartition]));
            }
            d
        });
        // A partition an earlier batch still in flight held back sends
        // nothing either: its held-back rows go out again only after that
        // batch settles, so a later batch's events of the same keys must
        // not overtake them.
        let held = self.held_back.lock().expect("held-back lock").clone();
        let may_send = |m: &Prepared| {
            !held.contains(&m.vpartition)
                && match &deadlines {
                    None => true,
                    Some(d) => d
                        .get(&m.vpartition)
                        .copied()
                        .flatten()
                        .is_some_and(|until| until > Instant::now()),
                }
        };
        let produced = publish::produce(&producer, &mut messages, may_send).await;
        let newly: Vec<i16> = produced.held_back().difference(&held).copied().collect();
        if !newly.is_empty() {
            tracing::warn!(vpartitions = ?newly,
                "lease not provable right before sending; these partitions' events wait for the batches in flight to settle");
            self.held_back.lock().expect("held-back lock").extend(newly);
        }
        InFlight {
            tx,
            rows,
            messages,
            epochs,
            produced,
            producer,
            started,
            claimed_in,
            produced_in: started.elapsed(),
            gate,
        }
    }

    /// Waits for Kafka's answers to a batch in flight and hands each to its
    /// row.
    pub(super) async fn answers(&self, batch: InFlight) -> Answered {
        let InFlight {
            tx,
            mut rows,
            messages,
            epochs,
            produced,
            producer,
            started,
            claimed_in,
            produced_in,
            gate,
        } = batch;
        // librdkafka reports every message within message.timeout.ms of
        // queueing it; past that (plus a margin for a busy machine) a missing
        // report can only be lost, and waiting longer would stall the
        // pipeline. Unanswered rows are published again.
        let reports_due =
            started + Duration::from_millis(self.settings.kafka.message_timeout_ms) + REPORT_MARGIN;
        let give_up = async {
            tokio::select! {
                _ = self.lease_deadline(&messages, &epochs) => {}
                _ = tokio::time::sleep_until(reports_due.into()) => {
                    tracing::warn!(events = messages.len(),
                        "delivery reports overdue; the batch's unanswered events will be published again");
                }
            }
        };
        let results = publish::acks(produced, give_up).await;
        let acked_in = started.elapsed();
        // The answers come in message order, which is the order of the
        // queued rows.
        let mut answers = messages.into_iter().zip(results);
        for row in &mut rows {
            if matches!(row.state, State::Queued) {
                let (msg, answer) = answers.next().expect("an answer per queued row");
                row.state = State::Answered { msg, answer };
            }
        }
        Answered {
            tx,
            rows,
            epochs,
            producer,
            started,
            claimed_in,
            produced_in,
            acked_in,
            _gate: gate,
        }
    }

    /// Completes when the leases of the batch's partitions run short (never
    /// without leases). Renewals extend the wait while the leases hold.
    async fn lease_deadline(&self, batch: &[Prepared], epochs: &HashMap<i16, i64>) {
        let Some(leases) = &self.leases else {
            return std::future::pending().await;
        };
        let vps: BTreeSet<i16> = batch.iter().map(|m| m.vpartition).collect();
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
}
