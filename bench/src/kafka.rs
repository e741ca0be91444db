//! Kafka side of the harness: the run's topics (LogAppendTime, so every
//! record carries the broker's append instant), end offsets, and reading
//! back what a phase produced.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, Timestamp, TopicPartitionList};

use crate::workload::Mix;

pub fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// Creates the topics with `message.timestamp.type=LogAppendTime`: the
/// record timestamp is then the broker's append time whatever the producer
/// sends, which is what commit → append latency is measured against.
pub async fn create_topics(brokers: &str, names: &[String], partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client(brokers).create()?;
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| {
            NewTopic::new(n, partitions, TopicReplication::Fixed(1))
                .set("message.timestamp.type", "LogAppendTime")
                .set("retention.ms", "86400000")
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics(&topics, &opts).await? {
        if let Err((t, e)) = r {
            bail!("creating topic {t}: {e}");
        }
    }
    // The broker answers NotLeaderForPartition for a new topic until it has
    // taken up leadership of every partition (a leader in the metadata is
    // not enough): wait until their end offsets can be read.
    let wm = Watermarks::new(brokers, names.to_vec(), partitions)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = tokio::task::block_in_place(|| wm.read()) {
        if Instant::now() > deadline {
            return Err(e.context("new topics still have no leader after 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

pub async fn delete_topics(brokers: &str, names: &[String]) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client(brokers).create()?;
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.delete_topics(&refs, &opts).await? {
        if let Err((t, e)) = r {
            eprintln!("warning: deleting topic {t}: {e}");
        }
    }
    Ok(())
}

/// End offset of every partition of a set of topics.
#[derive(Debug, Clone, Default)]
pub struct Offsets(pub HashMap<(String, i32), i64>);

impl Offsets {
    pub fn total(&self) -> i64 {
        self.0.values().sum()
    }
}

/// Reads end offsets (blocking: call from `spawn_blocking` or a thread).
pub struct Watermarks {
    consumer: BaseConsumer,
    topics: Vec<String>,
    partitions: i32,
}

impl Watermarks {
    pub fn new(brokers: &str, topics: Vec<String>, partitions: i32) -> Result<Self> {
        let consumer: BaseConsumer = client(brokers)
            .set("group.id", "outbox-bench-watermarks")
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(Watermarks {
            consumer,
            topics,
            partitions,
        })
    }

    /// One ListOffsets round trip for every partition (polling partition
    /// by partition would load the broker it measures).
    pub fn read(&self) -> Result<Offsets> {
        let mut tpl = TopicPartitionList::new();
        for t in &self.topics {
            for p in 0..self.partitions {
                tpl.add_partition_offset(t, p, Offset::End)?;
            }
        }
        let got = self
            .consumer
            .offsets_for_times(tpl, Duration::from_secs(10))
            .with_context(|| format!("reading end offsets of {:?}", self.topics))?;
        let mut m = HashMap::new();
        for e in got.elements() {
            let Offset::Offset(o) = e.offset() else {
                bail!(
                    "no end offset for {}/{}: {:?}",
                    e.topic(),
                    e.partition(),
                    e.offset()
                );
            };
            m.insert((e.topic().to_string(), e.partition()), o);
        }
        Ok(Offsets(m))
    }
}

/// One record read back.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub seq: u64,
    pub append_ms: i64,
}

#[derive(Debug, Default)]
pub struct ReadBack {
    pub seen: Vec<Seen>,
    /// Records whose topic or key differ from what the event's catalog entry
    /// prescribes (must be 0).
    pub misrouted: u64,
    /// Records without a parsable id of this run (must be 0).
    pub foreign: u64,
    pub first_problem: Option<String>,
}

/// Reads every record between `from` and `to` (blocking). `prefix` is the
/// peer's topic prefix and `id_header` the header carrying the event id
/// (`ce_id` for the relay, `id` for Debezium's event router).
pub fn read_range(
    brokers: &str,
    from: &Offsets,
    to: &Offsets,
    mix: &Mix,
    prefix: &str,
    id_header: &str,
) -> Result<ReadBack> {
    let consumer: BaseConsumer = client(brokers)
        .set("group.id", "outbox-bench-reader")
        .set("enable.auto.commit", "false")
        .set("fetch.max.bytes", "52428800")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
    for ((t, p), &end) in &to.0 {
        let start = from.0.get(&(t.clone(), *p)).copied().unwrap_or(0);
        if end > start {
            tpl.add_partition_offset(t, *p, Offset::Offset(start))?;
            remaining.insert((t.clone(), *p), end);
        }
    }
    let mut out = ReadBack::default();
    if remaining.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let mut last_progress = Instant::now();
    while !remaining.is_empty() {
        if last_progress.elapsed() > Duration::from_secs(30) {
            bail!(
                "reading back: no record for 30 s with {} partitions unfinished",
                remaining.len()
            );
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = msg.context("consumer")?;
        last_progress = Instant::now();
        let tp = (m.topic().to_string(), m.partition());
        if let Some(&end) = remaining.get(&tp) {
            if m.offset() + 1 >= end {
                remaining.remove(&tp);
            }
            if m.offset() >= end {
                continue;
            }
        } else {
            continue;
        }
        let append_ms = match m.timestamp() {
            Timestamp::LogAppendTime(ms) => ms,
            other => {
                bail!("record timestamp is {other:?}, not LogAppendTime: topic created elsewhere?")
            }
        };
        let id = m.headers().and_then(|h| {
            h.iter()
                .find(|h| h.key == id_header)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        let Some(seq) = id.as_deref().and_then(|id| mix.seq_of(id)) else {
            out.foreign += 1;
            out.first_problem
                .get_or_insert_with(|| format!("record without an id of this run: {id:?}"));
            continue;
        };
        let e = mix.event(seq);
        let topic = format!("{prefix}{}", mix.types[e.type_idx].topic);
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        if m.topic() != topic || key.as_deref() != Some(e.key.as_str()) {
            out.misrouted += 1;
            out.first_problem.get_or_insert_with(|| {
                format!(
                    "event {seq}: on {} with key {key:?}, expected {topic} with key {}",
                    m.topic(),
                    e.key
                )
            });
        }
        out.seen.push(Seen { seq, append_ms });
    }
    Ok(out)
}
