//! The relay loop: claim → envelope → publish → ack / retry / DLQ, one batch per step.
//!
//! One step runs in one Postgres transaction: the claimed rows stay locked
//! while Kafka acknowledges them, and the transaction that deletes them is
//! the one that claimed them. A row is never removed before Kafka's ack.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::Settings;
use crate::envelope::{self, Prepared};
use crate::failure::{self, Class, DbClass, DlqReason};
use crate::lease::Leases;
use crate::metrics;
use crate::publish::{self, RelayProducer};
use crate::sql;

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

struct Dead {
    ids: Vec<i64>,
    reasons: Vec<&'static str>,
    errors: Vec<String>,
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
        let relay = &self.settings.relay;
        // Held for the whole step: a lease is handed back only between steps.
        let _gate = match &self.leases {
            Some(l) => Some(l.step_gate.read().await),
            None => None,
        };
        let usable = self.leases.as_ref().map(|l| l.usable());
        if usable.as_ref().is_some_and(|u| u.vpartitions.is_empty()) {
            // Standing by: no partition leased (yet).
            return Ok(Outcome::Empty);
        }
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let rows = match &usable {
            Some(u) => {
                sql::claim_partitions(&mut tx, relay.batch_size as i64, &u.vpartitions).await?
            }
            None => sql::claim(&mut tx, relay.batch_size as i64).await?,
        };
        let claimed_in = started.elapsed();
        metrics::batch(rows.len(), claimed_in);
        if rows.is_empty() {
            tx.rollback().await?;
            return Ok(Outcome::Empty);
        }

        let mut dead = Dead {
            ids: Vec::new(),
            reasons: Vec::new(),
            errors: Vec::new(),
        };
        let mut dead_types: Vec<(String, DlqReason)> = Vec::new();
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
                    dead.ids.push(row.id);
                    dead.reasons.push(rejected.reason.as_str());
                    dead.errors.push(rejected.message);
                    dead_types.push((row.event_type.clone(), rejected.reason));
                }
            }
        }

        let producer = self.producer();
        let epochs: HashMap<i16, i64> = match &usable {
            Some(u) => u
                .vpartitions
                .iter()
                .copied()
                .zip(u.epochs.iter().copied())
                .collect(),
            None => HashMap::new(),
        };
        let give_up = self.lease_deadline(&ready, &epochs);
        let prepared_in = started.elapsed();
        let results = publish::publish_batch(&producer, &ready, give_up).await;
        let acked_in = started.elapsed();

        let now = Utc::now();
        let mut acked = Vec::with_capacity(ready.len());
        let mut published_by: HashMap<(&str, &str), u64> = HashMap::new();
        let mut retry_ids = Vec::new();
        let mut retry_errors = Vec::new();
        // Rows whose failure is of unknown class: only those use up
        // relay.max_attempts (counted in SQL by sql::schedule_retry).
        let mut unknown_ids = std::collections::HashSet::new();
        let mut unsettled = 0usize;
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
                    *published_by
                        .entry((msg.def.event_type.as_str(), msg.topic.as_str()))
                        .or_default() += 1;
                    let latency = (now - msg.occurred_at).num_microseconds().unwrap_or(0);
                    metrics::publish_latency(latency as f64 / 1e6);
                    continue;
                }
                Some(Err(err)) => err,
            };
            let class = failure::classify_kafka(&err);
            match class {
                Class::Permanent(reason) => {
                    tracing::error!(event_id = %msg.event_id, event_type = %msg.def.event_type,
                        reason = reason.as_str(), error = %err, "event dead-lettered");
                    dead.ids.push(msg.id);
                    dead.reasons.push(reason.as_str());
                    dead.errors.push(err.to_string());
                    dead_types.push((msg.def.event_type.clone(), reason));
                }
                Class::Transient(label) => {
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
        if let (Some(leases), false) = (&self.leases, epochs.is_empty()) {
            // Fencing: settle only rows of partitions still ours under the
            // epoch we claimed them with.
            let touched: std::collections::BTreeSet<i16> =
                rows.iter().map(|r| r.vpartition).collect();
            let vps: Vec<i16> = touched.iter().copied().collect();
            let eps: Vec<i64> = vps.iter().map(|vp| epochs[vp]).collect();
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
                let mut i = 0;
                while i < dead.ids.len() {
                    if keep(&dead.ids[i]) {
                        i += 1;
                    } else {
                        dead.ids.remove(i);
                        dead.reasons.remove(i);
                        dead.errors.remove(i);
                        dead_types.remove(i);
                    }
                }
                let mut i = 0;
                while i < retry_ids.len() {
                    if keep(&retry_ids[i]) {
                        i += 1;
                    } else {
                        retry_ids.remove(i);
                        retry_errors.remove(i);
                    }
                }
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
        for id in &exhausted {
            let row = rows
                .iter()
                .find(|r| r.id == *id)
                .expect("an exhausted row is a claimed row");
            tracing::error!(event_id = %row.event_id, event_type = %row.event_type,
                reason = DlqReason::RetriesExhausted.as_str(), max_attempts = relay.max_attempts,
                "event dead-lettered");
            dead_types.push((row.event_type.clone(), DlqReason::RetriesExhausted));
        }
        let settled_in = started.elapsed();
        let committed = tx.commit().await;
        tracing::trace!(
            rows = rows.len(),
            claim_us = claimed_in.as_micros() as u64,
            prepare_us = (prepared_in - claimed_in).as_micros() as u64,
            publish_us = (acked_in - prepared_in).as_micros() as u64,
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

        for ((event_type, topic), n) in published_by {
            metrics::published(self.source(), event_type, topic, n);
        }
        for (event_type, reason) in &dead_types {
            metrics::dead_lettered(self.source(), event_type, reason.as_str());
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
        Ok(Outcome::Batch(BatchReport {
            claimed: rows.len(),
            published: acked.len(),
            dead_lettered: dead.ids.len() + exhausted.len(),
            retried: retry_ids.len() - exhausted.len(),
        }))
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

    /// Steps until `token` is cancelled. A full batch loops at once; an
    /// empty or partial one waits `relay.idle_interval_ms`. Database errors
    /// back off (capped) and retry; errors no retry can fix end the loop.
    pub async fn run(&self, token: CancellationToken) -> Result<(), RelayError> {
        let idle = self.settings.idle_interval();
        let full = self.settings.relay.batch_size as usize;
        let mut backoff = db_backoff();
        while !token.is_cancelled() {
            let mut wakeable = false;
            let wait = match self.step().await {
                Ok(Outcome::Batch(r)) if r.claimed >= full && r.retried == 0 => {
                    backoff = db_backoff();
                    continue;
                }
                Ok(_) => {
                    backoff = db_backoff();
                    wakeable = true;
                    idle
                }
                Err(RelayError::Db(err)) => {
                    metrics::db_error(self.source());
                    if failure::classify_db_running(&err) == DbClass::Fatal {
                        tracing::error!(error = %err, "database error that no retry can fix");
                        return Err(err.into());
                    }
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                        "database unavailable; retrying");
                    delay
                }
                Err(err) => return Err(err),
            };
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified(), if wakeable => {}
            }
        }
        Ok(())
    }
}

/// Capped exponential backoff with jitter for reconnecting to Postgres.
pub fn db_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
