//! The floor: a bare Kafka producer with the relay's producer settings,
//! producing the relay's records (same topics under its own prefix, keys,
//! envelopes and headers) on the writers' paced schedule, with no PostgreSQL
//! in the way. Its send → append latency is what any relay on this broker
//! pays at least; the relay's commit → append latency minus this is what
//! the relay itself adds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use outbox_relay::catalog::Catalog;
use outbox_relay::config::{Compression, KafkaSettings};
use outbox_relay::envelope;
use outbox_relay::publish;
use outbox_relay::sql::OutboxRow;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::workload::{Commit, Mix, WriteReport};

/// Counts failed deliveries (a failure also shows as a missing event in the
/// read-back).
#[derive(Default)]
pub struct Ctx {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut f) = self.first_error.lock() {
                f.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

pub struct Floor {
    producer: ThreadedProducer<Ctx>,
    catalog: Arc<Catalog>,
    mix: Arc<Mix>,
    prefix: String,
    settings: KafkaSettings,
}

/// The relay's Kafka settings: its defaults, with the brokers of this run
/// and any `linger_ms` or `compression` given to the relay with
/// `--relay-env`, so both measure the same producer.
pub fn settings(brokers: &str, relay_env: &[(String, String)]) -> Result<KafkaSettings> {
    let mut k = KafkaSettings {
        brokers: brokers.to_string(),
        client_id: "outbox-bench-floor".into(),
        ..KafkaSettings::default()
    };
    for (key, value) in relay_env {
        match key.as_str() {
            "OUTBOX_RELAY_KAFKA__LINGER_MS" => {
                k.linger_ms = value
                    .parse()
                    .with_context(|| format!("{key}={value}: not a number"))?;
            }
            "OUTBOX_RELAY_KAFKA__COMPRESSION" => {
                k.compression = match value.as_str() {
                    "none" => Compression::None,
                    "gzip" => Compression::Gzip,
                    "snappy" => Compression::Snappy,
                    "lz4" => Compression::Lz4,
                    "zstd" => Compression::Zstd,
                    _ => anyhow::bail!("{key}={value}: unknown compression"),
                };
            }
            _ => {}
        }
    }
    Ok(k)
}

impl Floor {
    /// A producer built from the relay's own `producer_config` (acks=all,
    /// idempotence, murmur2_random, lz4, linger 2 ms, the same queue and
    /// batch limits).
    pub fn new(
        settings: KafkaSettings,
        catalog: Arc<Catalog>,
        mix: Arc<Mix>,
        prefix: &str,
    ) -> Result<Self> {
        let producer = publish::producer_config(&settings)
            .create_with_context(Ctx::default())
            .context("creating the floor producer")?;
        Ok(Floor {
            producer,
            catalog,
            mix,
            prefix: prefix.to_string(),
            settings,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "acks=all, idempotence, {}, linger.ms={}",
            self.settings.compression.as_str(),
            self.settings.linger_ms
        )
    }

    /// The record the relay would build for the event `seq` had it been
    /// written to the outbox just now.
    fn record(&self, seq: u64) -> Result<envelope::Prepared> {
        prepare(
            &self.mix,
            &self.catalog,
            &self.prefix,
            self.settings.max_message_bytes,
            seq,
        )
    }

    /// Produces on the writers' open-loop schedule: `writers` tasks take
    /// sequence numbers from the shared counter and send each at
    /// `(seq - first) / rate` after the start, as [`crate::workload::write`]
    /// commits them. The record is built before its instant is read; the
    /// instant (host clock, µs, the clock the writers' commit times come
    /// from) is taken right before `send`, and stands in for the commit.
    pub async fn produce(
        self: &Arc<Self>,
        seq: Arc<AtomicU64>,
        writers: usize,
        rate: f64,
        duration: Duration,
    ) -> Result<WriteReport> {
        let seq_from = seq.load(Ordering::SeqCst);
        let start = Instant::now();
        let tstart = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..writers.max(1) {
            let (me, seq) = (self.clone(), seq.clone());
            tasks.push(tokio::spawn(async move {
                let mut commits = Vec::new();
                let mut errors = 0u64;
                let mut first_error = None;
                loop {
                    let s = seq.fetch_add(1, Ordering::SeqCst);
                    let due = Duration::from_secs_f64((s - seq_from) as f64 / rate);
                    if due >= duration {
                        break;
                    }
                    tokio::time::sleep_until(tstart + due).await;
                    let mut msg = match me.record(s) {
                        Ok(m) => m,
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                            continue;
                        }
                    };
                    let headers = msg.headers.take().unwrap_or_default();
                    let mut record = BaseRecord::to(&msg.topic)
                        .key(msg.key.as_bytes())
                        .payload(&msg.value)
                        .headers(headers)
                        .timestamp(msg.occurred_at.timestamp_millis());
                    let sent_us = chrono::Utc::now().timestamp_micros();
                    loop {
                        match me.producer.send(record) {
                            Ok(()) => {
                                commits.push(Commit {
                                    seq: s,
                                    commit_us: sent_us,
                                });
                                break;
                            }
                            Err((
                                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                                back,
                            )) => {
                                record = back;
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            Err((e, _)) => {
                                errors += 1;
                                first_error.get_or_insert_with(|| e.to_string());
                                break;
                            }
                        }
                    }
                }
                (commits, errors, first_error)
            }));
        }
        WriteReport::collect(tasks, start).await
    }

    /// Deliveries that failed so far, and the first error.
    pub fn failed(&self) -> (u64, Option<String>) {
        let ctx = self.producer.context();
        (
            ctx.failed.load(Ordering::Relaxed),
            ctx.first_error.lock().ok().and_then(|f| f.clone()),
        )
    }

    pub fn flush(&self) {
        let _ = self.producer.flush(Duration::from_secs(30));
    }
}

/// The record the relay would build for the event `seq` of the mix had it
/// been written to the outbox just now: `envelope::prepare` on the row, for
/// the topics under `prefix`.
pub fn prepare(
    mix: &Mix,
    catalog: &Catalog,
    prefix: &str,
    max_message_bytes: usize,
    seq: u64,
) -> Result<envelope::Prepared> {
    let e = mix.event(seq);
    let info = &mix.types[e.type_idx];
    let row = OutboxRow {
        id: seq as i64,
        event_id: mix.relay_id(seq),
        event_type: info.event_type.clone(),
        tenant_id: e.tenant,
        payload: e.payload,
        headers: None,
        occurred_at: chrono::Utc::now(),
        attempts: 0,
        publisher: Some(info.publisher.clone()),
        vpartition: 0,
        bytes: 0,
        available_at: chrono::Utc::now(),
    };
    envelope::prepare(&row, catalog, prefix, max_message_bytes)
        .map_err(|r| anyhow::anyhow!("event {seq}: {}", r.message))
}
