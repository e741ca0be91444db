//! Kafka: the producer's configuration and producing one batch.
//!
//! Safety settings are not negotiable: `enable.idempotence=true`, `acks=all`,
//! `partitioner=murmur2_random` (the partition a Java client picks for the
//! same key). `message.timeout.ms` is bounded so that an outage surfaces to
//! the relay's own retry loop instead of hiding inside librdkafka.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::KafkaResult;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig,
};
use rdkafka::statistics::Statistics;
use rdkafka::ClientContext;

use crate::config::KafkaSettings;
use crate::envelope::Prepared;
use crate::metrics;

/// Client context that turns librdkafka statistics into gauges and its log
/// lines into tracing events, and hands delivery reports to their batch.
#[derive(Clone, Default)]
pub struct RelayContext {
    batches: Arc<Batches>,
    /// librdkafka's last client error (a failed TLS handshake or SASL
    /// authentication shows only here), for the start-up checks.
    last_error: Arc<Mutex<Option<String>>>,
}

impl RelayContext {
    /// The last error librdkafka reported for the client as a whole.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Batches whose delivery reports are still expected, by sequence number.
/// A message's delivery opaque is its batch's sequence number and its index
/// in the batch (`seq << INDEX_BITS | index`), so a report costs a map
/// lookup instead of a channel and a wake-up per message.
#[derive(Default)]
struct Batches {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Tracker>>>,
}

/// Room for relay.batch_size (at most 50 000) in the low bits of the opaque.
const INDEX_BITS: u32 = 24;

/// The delivery reports of one batch.
struct Tracker {
    results: Mutex<Vec<Option<Result<Ack, KafkaError>>>>,
    /// Reports still to come; the batch's task is woken once, at zero.
    remaining: AtomicUsize,
    done: tokio::sync::Notify,
}

impl Tracker {
    /// A message that was never handed to librdkafka: no report will come,
    /// and its result stays `None` (unsettled: the row is published again).
    fn skip(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    fn record(&self, index: usize, result: Result<Ack, KafkaError>) {
        let mut results = self.results.lock().expect("delivery results lock");
        if let Some(slot) = results.get_mut(index) {
            if slot.is_none() {
                *slot = Some(result);
                drop(results);
                if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    self.done.notify_one();
                }
            }
        }
    }
}

impl ProducerContext for RelayContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, report: &DeliveryResult<'_>, opaque: usize) {
        let seq = (opaque >> INDEX_BITS) as u64;
        let index = opaque & ((1 << INDEX_BITS) - 1);
        let tracker = self
            .batches
            .open
            .lock()
            .expect("delivery batches lock")
            .get(&seq)
            .cloned();
        // No tracker: the batch stopped waiting (lease lost, timeout); its
        // unanswered rows are published again.
        if let Some(tracker) = tracker {
            let result = match report {
                Ok(m) => Ok(Ack {
                    partition: m.partition(),
                    offset: m.offset(),
                }),
                Err((err, _)) => Err(err.clone()),
            };
            tracker.record(index, result);
        }
    }
}

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

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!(target: "librdkafka", error = %error, "{reason}");
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        outbox_consumer::kafka::log(level, None, fac, message);
    }
}

/// The relay's producer: librdkafka's, with a thread of its own that serves
/// delivery reports (and statistics and log lines) as they come.
///
/// rdkafka's `ThreadedProducer` polls in 100 ms slices, and its poll loop
/// passes the time left in whole milliseconds: the last fraction of a
/// millisecond of each slice becomes polls with no wait, a spin that cost
/// an idle relay about 1 % of a core. Here each poll waits up to
/// [`POLL_SLICE`], so that spin happens once a second at most; a poll
/// still returns as soon as a report is there.
///
/// Clones share the client and its thread, which stops once the last
/// clone is dropped.
#[derive(Clone)]
pub struct RelayProducer(Arc<Polled>);

struct Polled {
    producer: Arc<BaseProducer<RelayContext>>,
    stop: Arc<AtomicBool>,
}

/// How long one poll of the producer's thread waits for an event.
const POLL_SLICE: Duration = Duration::from_secs(1);

impl FromClientConfigAndContext<RelayContext> for RelayProducer {
    fn from_config_and_context(config: &ClientConfig, context: RelayContext) -> KafkaResult<Self> {
        let producer = Arc::new(BaseProducer::from_config_and_context(config, context)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopping) = (producer.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-reports".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    polled.poll(POLL_SLICE);
                }
                // The last reference to librdkafka's client may be this
                // one: it is destroyed here, after the relay let it go.
            })
            .map_err(|e| {
                KafkaError::ClientCreation(format!("starting the producer's thread: {e}"))
            })?;
        Ok(RelayProducer(Arc::new(Polled { producer, stop })))
    }
}

impl std::ops::Deref for RelayProducer {
    type Target = BaseProducer<RelayContext>;
    fn deref(&self) -> &Self::Target {
        &self.0.producer
    }
}

impl Drop for Polled {
    // The thread is not joined: it sees the flag within one slice and then
    // drops its share of the client. Whoever drops the producer (shutdown,
    // after its flush; recovery from a fatal error) does not wait for it.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// librdkafka properties for the relay's producer.
pub fn producer_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = client_config(k);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("compression.type", k.compression.as_str())
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

pub use outbox_consumer::kafka::client_config;

pub fn create_producer(k: &KafkaSettings) -> Result<RelayProducer, KafkaError> {
    producer_config(k).create_with_context(RelayContext::default())
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
    seq: u64,
    tracker: Arc<Tracker>,
    batches: Arc<Batches>,
    /// Virtual partitions with messages `may_send` refused.
    held_back: BTreeSet<i16>,
}

impl Produced {
    /// The virtual partitions of which some messages were not sent.
    pub fn held_back(&self) -> &BTreeSet<i16> {
        &self.held_back
    }
}

impl Drop for Produced {
    fn drop(&mut self) {
        // Late reports of a batch nobody waits for any more are dropped.
        if let Ok(mut open) = self.batches.open.lock() {
            open.remove(&self.seq);
        }
    }
}

/// Queues every message of a batch, in order, without waiting for Kafka:
/// the order of these calls is the order within each Kafka partition.
/// `may_send` is asked right before each message is handed to librdkafka;
/// a message it refuses is not sent, and neither is any later message of
/// the same virtual partition (their results stay `None`), so a partition's
/// messages that do go out are a prefix of it: nothing overtakes a message
/// held back. The relay uses it to re-check its lease after every wait: a
/// process paused between claim and produce (a frozen VM, SIGSTOP) must not
/// publish rows another relay owns by now.
pub async fn produce(
    producer: &RelayProducer,
    batch: &mut [Prepared],
    may_send: impl Fn(&Prepared) -> bool,
) -> Produced {
    let batches = producer.context().batches.clone();
    let seq = batches.next.fetch_add(1, Ordering::Relaxed);
    let tracker = Arc::new(Tracker {
        results: Mutex::new((0..batch.len()).map(|_| None).collect()),
        remaining: AtomicUsize::new(batch.len()),
        done: tokio::sync::Notify::new(),
    });
    // Registered before the first send: a report can arrive at once.
    batches
        .open
        .lock()
        .expect("delivery batches lock")
        .insert(seq, tracker.clone());
    let base = (seq as usize) << INDEX_BITS;
    let mut held_back = BTreeSet::new();
    for (i, msg) in batch.iter_mut().enumerate() {
        if held_back.contains(&msg.vpartition) || !may_send(msg) {
            held_back.insert(msg.vpartition);
            msg.value = Vec::new();
            tracker.skip();
            continue;
        }
        let headers = msg.headers.take().unwrap_or_default();
        let mut record = BaseRecord::with_opaque_to(&msg.topic, base | i)
            .key(msg.key.as_bytes())
            .payload(&msg.value)
            .headers(headers)
            .timestamp(msg.occurred_at.timestamp_millis());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is full: let librdkafka drain it.
                    record = back;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    if !may_send(msg) {
                        held_back.insert(msg.vpartition);
                        tracker.skip();
                        break;
                    }
                }
                Err((err, _)) => {
                    tracker.record(i, Err(err));
                    break;
                }
            }
        }
        // librdkafka keeps its own copy until the broker answers; a batch in
        // flight need not hold a second one.
        msg.value = Vec::new();
    }
    Produced {
        seq,
        tracker,
        batches,
        held_back,
    }
}

/// Waits for the delivery reports of a produced batch until they are all in
/// or `give_up` completes. Results are index-aligned with the batch; `None`
/// means no report arrived in time (the message may still be delivered: the
/// row must be published again).
pub async fn acks(
    produced: Produced,
    give_up: impl std::future::Future<Output = ()>,
) -> Vec<Option<Result<Ack, KafkaError>>> {
    tokio::pin!(give_up);
    let tracker = produced.tracker.clone();
    while tracker.remaining.load(Ordering::Acquire) > 0 {
        tokio::select! {
            biased;
            // A notification sent before this wait began is kept as a permit.
            _ = tracker.done.notified() => {}
            _ = &mut give_up => break,
        }
    }
    drop(produced);
    let mut results = tracker.results.lock().expect("delivery results lock");
    std::mem::take(&mut *results)
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

/// The one owner of the relay's Kafka producer, shared by every source of
/// the process: it creates the producer, recreates it after a fatal error
/// and flushes it at shutdown. Relays borrow the current producer for each
/// batch ([`SharedProducer::current`]) and report back after it
/// ([`SharedProducer::recover`]); they never replace it themselves.
pub struct SharedProducer {
    kafka: KafkaSettings,
    current: Mutex<Arc<RelayProducer>>,
    /// Whether the current producer has answered nothing but timeouts.
    stall: Mutex<Stall>,
}

/// Kafka's answers to one batch, as far as the producer's health goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answers {
    pub acked: usize,
    pub timed_out: usize,
}

/// Since when a producer has answered every message with a timeout.
///
/// After a broker restart librdkafka can keep a partition's leader as
/// unknown in its metadata cache ("new leader -1 not found in cache") and
/// time out every message for that partition, for minutes, while a new
/// client finds the leader at once. The relay retries those rows without
/// limit and loses nothing, but publishes nothing either: a producer that
/// has acknowledged nothing for three message timeouts while its messages
/// kept timing out is replaced. During a real outage that replaces it once
/// every three timeouts, which costs a reconnect.
#[derive(Debug, Default)]
pub struct Stall {
    since: Option<std::time::Instant>,
}

impl Stall {
    /// Records one batch's answers; true when the producer should be
    /// replaced (then the record starts over). An acknowledgement ends a
    /// stall; a batch with no answer at all (nothing produced) changes
    /// nothing.
    pub fn record(&mut self, answers: Answers, now: std::time::Instant, after: Duration) -> bool {
        if answers.acked > 0 {
            self.since = None;
            return false;
        }
        if answers.timed_out == 0 {
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= after {
            self.since = None;
            return true;
        }
        false
    }
}

impl SharedProducer {
    pub fn new(producer: Arc<RelayProducer>, kafka: KafkaSettings) -> Arc<SharedProducer> {
        Arc::new(SharedProducer {
            kafka,
            current: Mutex::new(producer),
            stall: Mutex::new(Stall::default()),
        })
    }

    /// The producer new batches are queued in.
    pub fn current(&self) -> Arc<RelayProducer> {
        self.current.lock().expect("producer lock").clone()
    }

    /// Called after a batch settled with the producer it used and Kafka's
    /// `answers`: when that producer hit a fatal error (idempotent producer
    /// state lost), or has stalled ([`Stall`]), a fresh one replaces it.
    /// Several batches (or sources) may report the same producer; only the
    /// first replaces it, and answers of a producer already replaced do not
    /// count.
    pub fn recover(&self, used: &Arc<RelayProducer>, answers: Answers) -> Result<(), KafkaError> {
        let fatal = fatal_error(used);
        let mut current = self.current.lock().expect("producer lock");
        if !Arc::ptr_eq(&current, used) {
            return Ok(());
        }
        let mut stall = self.stall.lock().expect("stall lock");
        let after = Duration::from_millis(self.kafka.message_timeout_ms.saturating_mul(3));
        let stalled = stall.record(answers, std::time::Instant::now(), after);
        if let Some(fatal) = fatal {
            tracing::error!(error = %fatal, "producer hit a fatal error; recreating it");
        } else if stalled {
            tracing::warn!(
                stalled_for_ms = after.as_millis() as u64,
                "no message acknowledged and every one timed out for three message timeouts; \
                 recreating the producer (its rows are retried)"
            );
            // What the old producer still holds fails now, as retries,
            // rather than being delivered after the new producer's messages.
            used.purge(PurgeConfig::default().queue().inflight().non_blocking());
        } else {
            return Ok(());
        }
        *stall = Stall::default();
        *current = Arc::new(create_producer(&self.kafka)?);
        Ok(())
    }

    /// Flushes the current producer (blocking); the last step of shutdown.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        flush(&self.current(), timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const TIMEOUTS: Answers = Answers {
        acked: 0,
        timed_out: 40,
    };

    /// Instants `s` seconds after one start.
    fn clock() -> impl Fn(u64) -> Instant {
        let t0 = Instant::now();
        move |s| t0 + Duration::from_secs(s)
    }

    #[test]
    fn a_producer_that_only_times_out_for_the_whole_window_is_replaced_once() {
        let after = Duration::from_secs(30);
        let at = clock();
        let mut stall = Stall::default();
        assert!(!stall.record(TIMEOUTS, at(0), after));
        assert!(!stall.record(TIMEOUTS, at(29), after));
        // A batch that produced nothing says nothing about the producer.
        assert!(!stall.record(Answers::default(), at(29), after));
        assert!(stall.record(TIMEOUTS, at(30), after));
        // The record starts over: the new producer gets a window of its own.
        assert!(!stall.record(TIMEOUTS, at(31), after));
        assert!(!stall.record(TIMEOUTS, at(60), after));
        assert!(stall.record(TIMEOUTS, at(61), after));
    }

    #[test]
    fn one_acknowledgement_ends_a_stall() {
        let after = Duration::from_secs(30);
        let at = clock();
        let mut stall = Stall::default();
        assert!(!stall.record(TIMEOUTS, at(0), after));
        // Some partitions answer (others time out): not stalled.
        let partly = Answers {
            acked: 1,
            timed_out: 39,
        };
        assert!(!stall.record(partly, at(20), after));
        assert!(!stall.record(TIMEOUTS, at(40), after));
        assert!(!stall.record(TIMEOUTS, at(69), after));
        assert!(stall.record(TIMEOUTS, at(70), after));
    }
}
