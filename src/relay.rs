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
    published_total: AtomicU64,
    last_publish_ms: AtomicI64,
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
            catalog,
            settings,
            published_total: AtomicU64::new(0),
            last_publish_ms: AtomicI64::new(0),
        }
    }

    /// Events this relay published since it started.
    pub fn published_total(&self) -> u64 {
        self.published_total.load(Ordering::Relaxed)
    }

    /// When this relay's last batch was acknowledged.
    pub fn last_publish(&self) -> Option<chrono::DateTime<Utc>> {
        match self.last_publish_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => chrono::DateTime::from_timestamp_millis(ms),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn producer(&self) -> Arc<RelayProducer> {
        self.producer.lock().expect("producer lock").clone()
    }

    fn source(&self) -> &str {
        &self.settings.relay.source
    }

    /// Claims, publishes and settles one batch.
    pub async fn step(&self) -> Result<Outcome, RelayError> {
        let relay = &self.settings.relay;
        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        let rows = sql::claim(&mut tx, relay.batch_size as i64).await?;
        metrics::batch(rows.len(), started.elapsed());
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
        let results = publish::publish_batch(&producer, &ready).await;

        let now = Utc::now();
        let mut acked = Vec::with_capacity(ready.len());
        let mut published_by: HashMap<(&str, &str), u64> = HashMap::new();
        let mut retry_ids = Vec::new();
        let mut retry_errors = Vec::new();
        for ((msg, attempts), result) in ready.iter().zip(&ready_attempts).zip(results) {
            let err = match result {
                Ok(_) => {
                    acked.push(msg.id);
                    *published_by
                        .entry((msg.def.event_type.as_str(), msg.topic.as_str()))
                        .or_default() += 1;
                    let latency = (now - msg.occurred_at).num_microseconds().unwrap_or(0);
                    metrics::publish_latency(latency as f64 / 1e6);
                    continue;
                }
                Err(err) => err,
            };
            let class = failure::classify_kafka(&err);
            let exhausted = *attempts as u32 + 1 >= relay.max_attempts;
            match class {
                Class::Permanent(reason) => {
                    tracing::error!(event_id = %msg.event_id, event_type = %msg.def.event_type,
                        reason = reason.as_str(), error = %err, "event dead-lettered");
                    dead.ids.push(msg.id);
                    dead.reasons.push(reason.as_str());
                    dead.errors.push(err.to_string());
                    dead_types.push((msg.def.event_type.clone(), reason));
                }
                Class::Unknown if exhausted => {
                    let reason = DlqReason::RetriesExhausted;
                    tracing::error!(event_id = %msg.event_id, event_type = %msg.def.event_type,
                        reason = reason.as_str(), attempts = attempts + 1, error = %err, "event dead-lettered");
                    dead.ids.push(msg.id);
                    dead.reasons.push(reason.as_str());
                    dead.errors
                        .push(format!("after {} attempts: {err}", attempts + 1));
                    dead_types.push((msg.def.event_type.clone(), reason));
                }
                Class::Transient(label) => {
                    metrics::publish_failure(self.source(), label);
                    retry_ids.push(msg.id);
                    retry_errors.push(err.to_string());
                }
                Class::Unknown => {
                    metrics::publish_failure(self.source(), "unknown");
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

        sql::delete_published(&mut tx, &acked).await?;
        sql::dead_letter(&mut tx, &dead.ids, &dead.reasons, &dead.errors).await?;
        sql::schedule_retry(
            &mut tx,
            &retry_ids,
            &retry_errors,
            relay.retry_base_ms,
            relay.retry_max_ms,
        )
        .await?;
        if let Err(err) = tx.commit().await {
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
            self.last_publish_ms.store(now_ms, Ordering::Relaxed);
            self.published_total
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
            dead_lettered: dead.ids.len(),
            retried: retry_ids.len(),
        }))
    }

    /// Steps until `token` is cancelled. A full batch loops at once; an
    /// empty or partial one waits `relay.idle_interval_ms`. Database errors
    /// back off (capped) and retry; errors no retry can fix end the loop.
    pub async fn run(&self, token: CancellationToken) -> Result<(), RelayError> {
        let idle = self.settings.idle_interval();
        let full = self.settings.relay.batch_size as usize;
        let mut backoff = db_backoff();
        while !token.is_cancelled() {
            let wait = match self.step().await {
                Ok(Outcome::Batch(r)) if r.claimed >= full && r.retried == 0 => {
                    backoff = db_backoff();
                    continue;
                }
                Ok(_) => {
                    backoff = db_backoff();
                    idle
                }
                Err(RelayError::Db(err)) => {
                    metrics::db_error(self.source());
                    if failure::classify_db(&err) == DbClass::Fatal {
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
