//! Kafka: the producer's configuration and producing one batch.
//!
//! Safety settings are not negotiable: `enable.idempotence=true`, `acks=all`,
//! `partitioner=murmur2_random` (the partition a Java client picks for the
//! same key). `message.timeout.ms` is bounded so that an outage surfaces to
//! the relay's own retry loop instead of hiding inside librdkafka.

use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;

use crate::config::KafkaSettings;
use crate::envelope::Prepared;
use crate::metrics;

/// Client context that turns librdkafka statistics into gauges and its log
/// lines into tracing events.
#[derive(Clone, Default)]
pub struct RelayContext;

impl ClientContext for RelayContext {
    fn stats(&self, stats: Statistics) {
        metrics::producer_queue(stats.msg_cnt, stats.msg_size);
        for broker in stats.brokers.values() {
            if let Some(rtt) = &broker.rtt {
                if broker.nodeid >= 0 {
                    metrics::broker_rtt(&broker.name, rtt.avg as f64 / 1_000_000.0);
                }
            }
        }
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel::*;
        match level {
            Emerg | Alert | Critical | Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}")
            }
            Warning => tracing::warn!(target: "librdkafka", facility = fac, "{message}"),
            Notice | Info => tracing::info!(target: "librdkafka", facility = fac, "{message}"),
            Debug => tracing::debug!(target: "librdkafka", facility = fac, "{message}"),
        }
    }
}

pub type RelayProducer = FutureProducer<RelayContext>;

/// librdkafka properties for the relay's producer.
pub fn producer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = client_config(k);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("compression.type", &k.compression)
        .set("linger.ms", k.linger_ms.to_string())
        .set("message.timeout.ms", k.message_timeout_ms.to_string())
        .set(
            "request.timeout.ms",
            k.request_timeout_ms.min(k.message_timeout_ms).to_string(),
        )
        .set(
            "message.max.bytes",
            k.max_message_bytes.max(1_000_000).to_string(),
        )
        // A batch of the relay is at most relay.batch_size messages; keep the
        // whole batch in one queue so produce() does not block on QueueFull.
        .set("queue.buffering.max.messages", "200000")
        .set("batch.num.messages", "10000")
        .set("statistics.interval.ms", "5000");
    for (key, value) in &k.librdkafka {
        c.set(key, value);
    }
    c
}

/// Connection and security properties shared by producer, admin and consumer clients.
pub fn client_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("client.id", &k.client_id)
        .set("security.protocol", &k.security_protocol);
    if let Some(sasl) = &k.sasl {
        c.set("sasl.mechanism", &sasl.mechanism)
            .set("sasl.username", &sasl.username)
            .set("sasl.password", sasl.password.expose());
    }
    if let Some(tls) = &k.tls {
        if let Some(p) = &tls.ca_location {
            c.set("ssl.ca.location", p.display().to_string());
        }
        if let Some(p) = &tls.certificate_location {
            c.set("ssl.certificate.location", p.display().to_string());
        }
        if let Some(p) = &tls.key_location {
            c.set("ssl.key.location", p.display().to_string());
        }
        if let Some(p) = &tls.key_password {
            c.set("ssl.key.password", p.expose());
        }
    }
    c
}

pub fn create_producer(k: &KafkaSettings) -> Result<RelayProducer, KafkaError> {
    producer_config(k).create_with_context(RelayContext)
}

/// Kafka's answer for one message.
#[derive(Debug)]
pub struct Ack {
    pub partition: i32,
    pub offset: i64,
}

/// A batch handed to librdkafka: the delivery reports still to come, and
/// the messages it refused outright.
pub struct Produced {
    results: Vec<Option<Result<Ack, KafkaError>>>,
    pending: Vec<(usize, DeliveryFuture)>,
}

/// Queues every message of a batch, in order, without waiting for Kafka:
/// the order of these calls is the order within each Kafka partition.
pub async fn produce(producer: &RelayProducer, batch: &mut [Prepared]) -> Produced {
    let mut results: Vec<Option<Result<Ack, KafkaError>>> = Vec::with_capacity(batch.len());
    let mut pending = Vec::with_capacity(batch.len());
    for (i, msg) in batch.iter_mut().enumerate() {
        let headers = msg.headers.take().unwrap_or_default();
        let mut record = FutureRecord::to(&msg.topic)
            .key(msg.key.as_bytes())
            .payload(&msg.value)
            .headers(headers)
            .timestamp(msg.occurred_at.timestamp_millis());
        results.push(None);
        loop {
            match producer.send_result(record) {
                Ok(future) => {
                    pending.push((i, future));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is full: let librdkafka drain it.
                    record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((err, _)) => {
                    results[i] = Some(Err(err));
                    break;
                }
            }
        }
    }
    Produced { results, pending }
}

/// Waits for the delivery reports of a produced batch until they are all in
/// or `give_up` completes. Results are index-aligned with the batch; `None`
/// means no report arrived in time (the message may still be delivered: the
/// row must be published again).
pub async fn acks(
    produced: Produced,
    give_up: impl std::future::Future<Output = ()>,
) -> Vec<Option<Result<Ack, KafkaError>>> {
    let Produced {
        mut results,
        pending,
    } = produced;
    let mut pending: FuturesUnordered<_> = pending
        .into_iter()
        .map(|(i, future)| future.map(move |delivery| (i, delivery)))
        .collect();
    tokio::pin!(give_up);
    loop {
        tokio::select! {
            biased;
            next = pending.next() => match next {
                Some((i, delivery)) => {
                    results[i] = Some(match delivery {
                        Ok(Ok(d)) => Ok(Ack {
                            partition: d.partition,
                            offset: d.offset,
                        }),
                        Ok(Err((err, _))) => Err(err),
                        Err(_canceled) => Err(KafkaError::Canceled),
                    });
                }
                None => break,
            },
            _ = &mut give_up => break,
        }
    }
    results
}

/// Fetches cluster metadata: the readiness check of the Kafka side.
pub fn check_metadata(producer: &RelayProducer, timeout: Duration) -> Result<usize, KafkaError> {
    let md = producer.client().fetch_metadata(None, timeout)?;
    Ok(md.brokers().len())
}

/// Flushes what is still queued; used at shutdown.
pub fn flush(producer: &RelayProducer, timeout: Duration) -> Result<(), KafkaError> {
    producer.flush(rdkafka::util::Timeout::After(timeout))
}

/// Whether librdkafka raised a fatal error (idempotent producer state lost);
/// the producer must then be recreated.
pub fn fatal_error(producer: &RelayProducer) -> Option<String> {
    producer
        .client()
        .fatal_error()
        .map(|(code, msg)| format!("{code:?}: {msg}"))
}
