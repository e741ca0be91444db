//! The consumer kit: how a module receives kernel events, exactly once in
//! effect, the Rust counterpart of the platform SDK's
//! `kernel.events().subscribe(...)`.
//!
//! It owns the module's side of the catalog's rules:
//!
//! * the module's `module.manifest.json` declares the kernel events it reads
//!   (`events.subscribes[]`); an entry the catalog does not know stops
//!   start-up, and a handler for an event the manifest does not declare is
//!   refused with [`ConsumerError::Forbidden`] (403);
//! * it subscribes only to the topics the catalog maps those events to (with
//!   the configured topic prefix) and skips other event types found there;
//! * permanent dedupe: every message is handled in one Postgres transaction
//!   that first inserts `(consumer, event_id)` into `processed_event_ids`;
//!   the handler runs in that transaction only when the row is new, and the
//!   Kafka offset is committed only after the transaction committed. There
//!   is no mode without it (the catalog requires it for `money.*`: a DLQ
//!   replay may re-deliver an event weeks later);
//! * a failing handler rolls back and is retried with capped backoff; what
//!   happens after repeated failure is [`FailurePolicy`];
//! * it has no publish API: kernel events are read-only for modules.
//!
//! It depends on the model crate, rdkafka and sqlx; not on the relay, its
//! configuration loader or its metrics exporter.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool, catalog: std::sync::Arc<outbox_model::catalog::Catalog>,
//! #               kafka: outbox_consumer::kafka::KafkaSettings) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_consumer::{Consumer, ConsumerSettings, Manifest};
//! let manifest = Manifest::load("module.manifest.json")?;
//! let settings = ConsumerSettings::new(&manifest.name, kafka);
//! let mut consumer = Consumer::new(&manifest, catalog, pool, settings)?;
//! consumer.subscribe("auth.user.created", |conn, event| {
//!     Box::pin(async move {
//!         sqlx::query("INSERT INTO contacts (user_id) VALUES ($1)")
//!             .bind(event.data["userId"].as_str())
//!             .execute(conn)
//!             .await?;
//!         Ok(())
//!     })
//! })?;
//! consumer.run(tokio_util::sync::CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

pub mod dedupe;
pub mod kafka;
pub mod metrics;

pub use outbox_model::envelope::{Delivery, Event};

use crate::dedupe as sql;
use crate::kafka::{client_config, KafkaSettings};
use outbox_model::catalog::Catalog;

/// The error a handler returns; any error type converts with `?`.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("manifest {path}: cannot read: {source}")]
    ManifestRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {path}: {message}")]
    ManifestInvalid { path: PathBuf, message: String },
    #[error(
        "manifest {path}: events.subscribes[{index}]: unknown event type `{event_type}`: not in the event catalog"
    )]
    UnknownEvent {
        path: PathBuf,
        index: usize,
        event_type: String,
    },
    #[error(
        "403 Forbidden: module {module} may not subscribe to {event_type}: it is not declared in events.subscribes[] of {manifest}"
    )]
    Forbidden {
        module: String,
        event_type: String,
        manifest: PathBuf,
    },
    #[error("a handler for {event_type} is already subscribed")]
    AlreadySubscribed { event_type: String },
    #[error("no handler is subscribed: nothing to consume")]
    NoHandlers,
    #[error("consumer setting `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("dedupe table: {0}")]
    Schema(String),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

impl ConsumerError {
    /// The platform's HTTP status for this error, where it has one (403 for
    /// an undeclared subscription, as the SDK answers).
    pub fn status(&self) -> Option<u16> {
        match self {
            ConsumerError::Forbidden { .. } => Some(403),
            _ => None,
        }
    }
}

/// The parts of `module.manifest.json` the kit reads; other keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// The module's name, e.g. `@acme/crm`.
    pub name: String,
    #[serde(default)]
    pub events: ManifestEvents,
    /// Where it was loaded from (for error messages).
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ManifestEvents {
    /// Kernel event types the module subscribes to.
    #[serde(default)]
    pub subscribes: Vec<String>,
}

impl Manifest {
    pub fn load(path: impl AsRef<Path>) -> Result<Manifest, ConsumerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConsumerError::ManifestRead {
            path: path.to_path_buf(),
            source,
        })?;
        Manifest::parse(path, &text)
    }

    pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<Manifest, ConsumerError> {
        let path = path.as_ref().to_path_buf();
        let mut manifest: Manifest =
            serde_json::from_str(text).map_err(|e| ConsumerError::ManifestInvalid {
                path: path.clone(),
                message: e.to_string(),
            })?;
        if manifest.name.trim().is_empty() {
            return Err(ConsumerError::ManifestInvalid {
                path,
                message: "`name` is empty".into(),
            });
        }
        manifest.path = path;
        Ok(manifest)
    }
}

/// What happens to an event whose handler keeps failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Retry with capped backoff until it succeeds. Nothing is skipped and
    /// order is kept, but this consumer makes no progress meanwhile (the
    /// lag grows and `outbox_consumer_retrying_attempts` shows it). The
    /// default: right for money.
    Block,
    /// After this many failed attempts, record the event in
    /// `consumer_parked_events` (envelope, last error, attempts), commit
    /// its offset and go on. It is not marked processed, so a redelivery or
    /// a DLQ replay runs the handler again.
    Park { after_attempts: u32 },
}

/// How one consumer runs. [`ConsumerSettings::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Recorded in `processed_event_ids.consumer`: the dedupe scope. Keep it
    /// stable for the life of the module (changing it re-handles history).
    pub name: String,
    /// Kafka consumer group.
    pub group_id: String,
    /// Brokers, security and `topic_prefix` (the producer-only fields and the
    /// producer passthrough map are not used).
    pub kafka: KafkaSettings,
    /// Where a new consumer group starts.
    pub auto_offset_reset: OffsetReset,
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    pub on_failure: FailurePolicy,
    /// Extra librdkafka consumer properties (e.g. `session.timeout.ms`).
    /// Commit behaviour is the kit's and cannot be set here.
    pub librdkafka: BTreeMap<String, String>,
}

/// Where a consumer group without committed offsets starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    /// From the oldest retained event: a new module sees history.
    Earliest,
    /// Only events published after it first joined.
    Latest,
}

impl OffsetReset {
    /// librdkafka's `auto.offset.reset` value.
    pub fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
        }
    }
}

/// librdkafka properties the kit owns: the exactly-once effect depends on them.
const OWNED_CONSUMER_KEYS: &[&str] = &[
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
];

impl ConsumerSettings {
    pub fn new(name: &str, kafka: KafkaSettings) -> ConsumerSettings {
        ConsumerSettings {
            name: name.to_string(),
            group_id: name.to_string(),
            kafka,
            auto_offset_reset: OffsetReset::Earliest,
            retry_min_ms: 200,
            retry_max_ms: 30_000,
            on_failure: FailurePolicy::Block,
            librdkafka: BTreeMap::new(),
        }
    }

    fn validate(&self) -> Result<(), ConsumerError> {
        let invalid = |key, message: &str| ConsumerError::Invalid {
            key,
            message: message.to_string(),
        };
        if self.name.trim().is_empty() {
            return Err(invalid("name", "is empty"));
        }
        if self.group_id.trim().is_empty() {
            return Err(invalid("group_id", "is empty"));
        }
        if self.retry_min_ms == 0 || self.retry_max_ms < self.retry_min_ms {
            return Err(invalid(
                "retry_max_ms",
                "must be ≥ retry_min_ms, and retry_min_ms > 0",
            ));
        }
        if self.on_failure == (FailurePolicy::Park { after_attempts: 0 }) {
            return Err(invalid("on_failure", "Park needs at least 1 attempt"));
        }
        for key in self.librdkafka.keys() {
            if OWNED_CONSUMER_KEYS.contains(&key.as_str()) {
                return Err(ConsumerError::Invalid {
                    key: "librdkafka",
                    message: format!("`{key}` is set by the consumer kit"),
                });
            }
            if let Some((_, owner)) = kafka::CONNECTION_KEYS.iter().find(|(k, _)| k == key) {
                return Err(ConsumerError::Invalid {
                    key: "librdkafka",
                    message: format!("`{key}` is set from {owner}; set that instead"),
                });
            }
        }
        Ok(())
    }
}

/// A subscribed handler: runs inside the dedupe transaction.
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        event: &'a Event,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<F> Handler for F
where
    F: for<'a> Fn(&'a mut PgConnection, &'a Event) -> BoxFuture<'a, Result<(), HandlerError>>
        + Send
        + Sync
        + 'static,
{
    fn handle<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        event: &'a Event,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        self(conn, event)
    }
}

/// What became of one message; the `outcome` label of
/// `outbox_consumer_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The handler ran and its transaction committed.
    Processed,
    /// Already in `processed_event_ids` (redelivery or replay): skipped.
    Duplicate,
    /// An event type on a subscribed topic that this consumer has no handler for.
    Skipped,
    /// One handler attempt failed and was rolled back (counted per attempt).
    Failed,
    /// Given up on under [`FailurePolicy::Park`].
    Parked,
    /// Not a decodable envelope: parked (its text and the decode error) in
    /// `consumer_parked_events` under the name `undecodable:TOPIC:PARTITION:OFFSET`.
    Invalid,
    /// Its `source` is not the catalog's publisher for its type: never handled.
    ForbiddenSource,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Processed => "processed",
            Outcome::Duplicate => "duplicate",
            Outcome::Skipped => "skipped",
            Outcome::Failed => "failed",
            Outcome::Parked => "parked",
            Outcome::Invalid => "invalid",
            Outcome::ForbiddenSource => "forbidden_source",
        }
    }
}

/// Running totals of one consumer, for the embedding service and its tests
/// (the same counts go to Prometheus).
#[derive(Debug, Default)]
pub struct ConsumerStats {
    processed: AtomicU64,
    duplicates: AtomicU64,
    skipped: AtomicU64,
    failed_attempts: AtomicU64,
    parked: AtomicU64,
    invalid: AtomicU64,
    forbidden_source: AtomicU64,
}

/// A copy of [`ConsumerStats`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub processed: u64,
    pub duplicates: u64,
    pub skipped: u64,
    pub failed_attempts: u64,
    pub parked: u64,
    pub invalid: u64,
    pub forbidden_source: u64,
}

impl ConsumerStats {
    fn counter(&self, outcome: Outcome) -> &AtomicU64 {
        match outcome {
            Outcome::Processed => &self.processed,
            Outcome::Duplicate => &self.duplicates,
            Outcome::Skipped => &self.skipped,
            Outcome::Failed => &self.failed_attempts,
            Outcome::Parked => &self.parked,
            Outcome::Invalid => &self.invalid,
            Outcome::ForbiddenSource => &self.forbidden_source,
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            processed: get(&self.processed),
            duplicates: get(&self.duplicates),
            skipped: get(&self.skipped),
            failed_attempts: get(&self.failed_attempts),
            parked: get(&self.parked),
            invalid: get(&self.invalid),
            forbidden_source: get(&self.forbidden_source),
        }
    }
}

type Hook = Arc<dyn Fn(&Event) + Send + Sync>;

/// One module's consumer: manifest, catalog, handlers, dedupe database.
pub struct Consumer {
    module: String,
    manifest_path: PathBuf,
    declared: BTreeSet<String>,
    catalog: Arc<Catalog>,
    pool: PgPool,
    settings: ConsumerSettings,
    handlers: HashMap<String, Arc<dyn Handler>>,
    stats: Arc<ConsumerStats>,
    after_db_commit: Option<Hook>,
}

/// Why one delivery attempt failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("handler: {0}")]
    Handler(HandlerError),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
}

impl Consumer {
    /// Checks the manifest against the catalog: every `events.subscribes[]`
    /// entry must be a catalog event.
    pub fn new(
        manifest: &Manifest,
        catalog: Arc<Catalog>,
        pool: PgPool,
        settings: ConsumerSettings,
    ) -> Result<Consumer, ConsumerError> {
        settings.validate()?;
        let mut declared = BTreeSet::new();
        for (index, event_type) in manifest.events.subscribes.iter().enumerate() {
            if catalog.get(event_type).is_none() {
                return Err(ConsumerError::UnknownEvent {
                    path: manifest.path.clone(),
                    index,
                    event_type: event_type.clone(),
                });
            }
            declared.insert(event_type.clone());
        }
        Ok(Consumer {
            module: manifest.name.clone(),
            manifest_path: manifest.path.clone(),
            declared,
            catalog,
            pool,
            settings,
            handlers: HashMap::new(),
            stats: Arc::default(),
            after_db_commit: None,
        })
    }

    /// Registers the handler of one declared event type. An event the
    /// manifest does not declare is [`ConsumerError::Forbidden`] (403).
    pub fn subscribe<F>(&mut self, event_type: &str, handler: F) -> Result<&mut Self, ConsumerError>
    where
        F: for<'a> Fn(&'a mut PgConnection, &'a Event) -> BoxFuture<'a, Result<(), HandlerError>>
            + Send
            + Sync
            + 'static,
    {
        self.subscribe_handler(event_type, Arc::new(handler))
    }

    /// [`Consumer::subscribe`] for a handler type of one's own.
    pub fn subscribe_handler(
        &mut self,
        event_type: &str,
        handler: Arc<dyn Handler>,
    ) -> Result<&mut Self, ConsumerError> {
        if !self.declared.contains(event_type) {
            return Err(ConsumerError::Forbidden {
                module: self.module.clone(),
                event_type: event_type.to_string(),
                manifest: self.manifest_path.clone(),
            });
        }
        if self.handlers.contains_key(event_type) {
            return Err(ConsumerError::AlreadySubscribed {
                event_type: event_type.to_string(),
            });
        }
        self.handlers.insert(event_type.to_string(), handler);
        Ok(self)
    }

    /// Called after an event's dedupe transaction committed and before its
    /// Kafka offset is committed: for instrumentation and crash tests. It
    /// runs on the consumer's task, so it must be quick.
    pub fn after_db_commit(&mut self, hook: impl Fn(&Event) + Send + Sync + 'static) {
        self.after_db_commit = Some(Arc::new(hook));
    }

    /// The Kafka topics the subscribed events map to, prefix included.
    pub fn topics(&self) -> Vec<String> {
        let topics: BTreeSet<String> = self
            .handlers
            .keys()
            .filter_map(|t| self.catalog.get(t))
            .map(|def| self.settings.kafka.topic(&def.topic))
            .collect();
        topics.into_iter().collect()
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        self.stats.clone()
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// Consumes until `token` is cancelled. An event in retry when the token
    /// fires is left uncommitted and is delivered again on the next start.
    pub async fn run(self, token: CancellationToken) -> Result<(), ConsumerError> {
        if self.handlers.is_empty() {
            return Err(ConsumerError::NoHandlers);
        }
        self.check_schema().await?;
        for event_type in self.declared.iter() {
            if !self.handlers.contains_key(event_type) {
                tracing::warn!(consumer = %self.settings.name, event_type = %event_type,
                    "declared in the manifest but no handler is subscribed; not consumed");
            }
        }
        metrics::describe_consumer();
        let consumer: StreamConsumer<KitContext> =
            self.kafka_config().create_with_context(KitContext {
                consumer: self.settings.name.clone(),
            })?;
        let topics = self.topics();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names)?;
        tracing::info!(consumer = %self.settings.name, module = %self.module,
            group = %self.settings.group_id, topics = ?topics, "consumer started");

        loop {
            let received = tokio::select! {
                _ = token.cancelled() => break,
                m = consumer.recv() => m,
            };
            let msg = match received {
                Ok(msg) => msg,
                Err(err) => {
                    tracing::warn!(consumer = %self.settings.name, error = %err, "kafka consumer error");
                    continue;
                }
            };
            let Some(outcome) = self.process(&msg, &token).await else {
                break;
            };
            metrics::consumer_retrying(&self.settings.name, 0);
            // Asynchronous: a lost offset commit only means a redelivery,
            // which the dedupe table absorbs.
            if let Err(err) = consumer.commit_message(&msg, CommitMode::Async) {
                tracing::warn!(consumer = %self.settings.name, topic = msg.topic(),
                    partition = msg.partition(), offset = msg.offset(), outcome = outcome.as_str(),
                    error = %err, "offset commit failed; the event will be redelivered and deduplicated");
            }
        }
        tracing::info!(consumer = %self.settings.name, "consumer stopped");
        Ok(())
    }

    fn kafka_config(&self) -> rdkafka::ClientConfig {
        let mut c = client_config(&self.settings.kafka);
        c.set("group.id", &self.settings.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                self.settings.auto_offset_reset.as_str(),
            );
        for (key, value) in &self.settings.librdkafka {
            c.set(key, value);
        }
        c
    }

    /// Fails start-up with a clear message when the dedupe table is missing
    /// or this role may not write it, instead of retrying every event.
    async fn check_schema(&self) -> Result<(), ConsumerError> {
        let name = &self.settings.name;
        let access = sql::dedupe_access(&self.pool, name).await?;
        if !access.exists {
            return Err(ConsumerError::Schema(
                "table processed_event_ids does not exist in this database; run `outbox-relay migrate` against it".into(),
            ));
        }
        let role = || async {
            sqlx::query_scalar::<_, String>("SELECT current_user::text")
                .fetch_one(&self.pool)
                .await
        };
        if !access.can_insert {
            return Err(ConsumerError::Schema(format!(
                "role {} may not insert into processed_event_ids; GRANT outbox_consumer TO it (consumer {name})",
                role().await?
            )));
        }
        if !access.mapping_table && !access.mapped {
            return Err(ConsumerError::Schema(
                "table outbox_consumer_roles does not exist: this database's schema is older than the \
                 consumer kit; run `outbox-relay migrate` against it, then map the consumer's role"
                    .into(),
            ));
        }
        if !access.mapped {
            let role = role().await?;
            return Err(ConsumerError::Schema(format!(
                "role {role} is not mapped to consumer {name}, so it may not read or write that consumer's \
                 dedupe and parked rows; an admin runs SELECT outbox_map_consumer('{role}', '{name}')"
            )));
        }
        Ok(())
    }

    fn count(&self, event_type: &str, outcome: Outcome) {
        self.stats.counter(outcome).fetch_add(1, Ordering::Relaxed);
        metrics::consumer_event(&self.settings.name, event_type, outcome.as_str());
    }

    /// Handles one message to an outcome, or `None` when cancelled first.
    async fn process(
        &self,
        msg: &BorrowedMessage<'_>,
        token: &CancellationToken,
    ) -> Option<Outcome> {
        let name = &self.settings.name;
        let mut event: Event = match serde_json::from_slice(msg.payload().unwrap_or_default()) {
            Ok(e) => e,
            Err(err) => return self.park_undecodable(msg, &err, token).await,
        };
        event.delivery = Delivery {
            topic: msg.topic().to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        let Some(handler) = self.handlers.get(&event.event_type) else {
            tracing::debug!(consumer = %name, event_id = %event.id, event_type = %event.event_type,
                "no handler for this event type; skipped");
            let label = if self.catalog.get(&event.event_type).is_some() {
                event.event_type.as_str()
            } else {
                "(unknown)"
            };
            self.count(label, Outcome::Skipped);
            return Some(Outcome::Skipped);
        };
        // Subscribed types are catalog types (checked at start-up).
        let allowed = self
            .catalog
            .get(&event.event_type)
            .map(|def| def.publisher.as_str());
        if allowed != Some(event.source.as_str()) {
            tracing::error!(consumer = %name, event_id = %event.id, event_type = %event.event_type,
                source = %event.source, allowed = allowed.unwrap_or("(none)"),
                "403 Forbidden: event from a publisher the catalog does not allow; not handled");
            self.count(&event.event_type, Outcome::ForbiddenSource);
            return Some(Outcome::ForbiddenSource);
        }

        let mut delays = self.retry_delays();
        let mut attempts: u32 = 0;
        loop {
            attempts += 1;
            let started = Instant::now();
            let err = match self.attempt(handler.as_ref(), &event).await {
                Ok(true) => {
                    tracing::debug!(consumer = %name, event_id = %event.id, event_type = %event.event_type,
                        attempts, elapsed_ms = started.elapsed().as_millis() as u64, "event processed");
                    self.count(&event.event_type, Outcome::Processed);
                    return Some(Outcome::Processed);
                }
                Ok(false) => {
                    tracing::info!(consumer = %name, event_id = %event.id, event_type = %event.event_type,
                        outcome = "duplicate", "event already processed; skipped");
                    self.count(&event.event_type, Outcome::Duplicate);
                    return Some(Outcome::Duplicate);
                }
                Err(err) => err,
            };
            self.count(&event.event_type, Outcome::Failed);
            metrics::consumer_retrying(name, attempts);
            if let FailurePolicy::Park { after_attempts } = self.settings.on_failure {
                if attempts >= after_attempts {
                    match self.park(&event, &err, attempts).await {
                        Ok(()) => {
                            tracing::error!(consumer = %name, event_id = %event.id,
                                event_type = %event.event_type, attempts, error = %err,
                                "handler keeps failing; event parked in consumer_parked_events");
                            self.count(&event.event_type, Outcome::Parked);
                            return Some(Outcome::Parked);
                        }
                        Err(park_err) => {
                            tracing::error!(consumer = %name, event_id = %event.id, error = %park_err,
                                "parking the event failed; retrying it");
                        }
                    }
                }
            }
            let delay = delays
                .next()
                .unwrap_or(Duration::from_millis(self.settings.retry_max_ms));
            tracing::error!(consumer = %name, event_id = %event.id, event_type = %event.event_type,
                attempt = attempts, retry_in_ms = delay.as_millis() as u64, error = %err,
                "handler failed; rolled back, offset not committed, retrying");
            tokio::select! {
                _ = token.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn retry_delays(&self) -> impl Iterator<Item = Duration> {
        outbox_model::backoff::capped(
            Duration::from_millis(self.settings.retry_min_ms),
            Duration::from_millis(self.settings.retry_max_ms),
        )
    }

    /// A message the kit cannot decode as an envelope can never be handled.
    /// It is parked — its text as a JSON string, under a name made of its
    /// Kafka position, since nothing in it can be trusted — and counted as
    /// `invalid`; only then is its offset committed. Until the park
    /// succeeds it is retried, never skipped. `None` when cancelled first.
    async fn park_undecodable(
        &self,
        msg: &BorrowedMessage<'_>,
        err: &serde_json::Error,
        token: &CancellationToken,
    ) -> Option<Outcome> {
        let name = &self.settings.name;
        // jsonb strings cannot hold NUL.
        let text =
            String::from_utf8_lossy(msg.payload().unwrap_or_default()).replace('\0', "\u{fffd}");
        let event_id = format!(
            "undecodable:{}:{}:{}",
            msg.topic(),
            msg.partition(),
            msg.offset()
        );
        let error = format!("not a decodable event envelope: {err}");
        let mut delays = self.retry_delays();
        loop {
            let parked = sql::park_event(
                &self.pool,
                &sql::ParkedEvent {
                    consumer: name,
                    event_id: &event_id,
                    event_type: "(undecodable)",
                    topic: msg.topic(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                    envelope: Value::String(text.clone()),
                    error: error.clone(),
                    attempts: 1,
                },
            )
            .await;
            match parked {
                Ok(()) => {
                    tracing::error!(consumer = %name, topic = msg.topic(), partition = msg.partition(),
                        offset = msg.offset(), error = %err,
                        "message is not a decodable event envelope; parked in consumer_parked_events");
                    self.count("(invalid)", Outcome::Invalid);
                    return Some(Outcome::Invalid);
                }
                Err(park_err) => {
                    let delay = delays
                        .next()
                        .unwrap_or(Duration::from_millis(self.settings.retry_max_ms));
                    tracing::error!(consumer = %name, topic = msg.topic(), partition = msg.partition(),
                        offset = msg.offset(), error = %park_err, retry_in_ms = delay.as_millis() as u64,
                        "parking an undecodable message failed; offset not committed, retrying");
                    tokio::select! {
                        _ = token.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One dedupe transaction. `Ok(true)`: handled and committed;
    /// `Ok(false)`: a duplicate, nothing done.
    async fn attempt(&self, handler: &dyn Handler, event: &Event) -> Result<bool, AttemptError> {
        let mut tx = self.pool.begin().await?;
        // A concurrent delivery of the same event waits here for the other
        // transaction, then sees the row.
        let new = sql::mark_processed(&mut tx, &self.settings.name, &event.id).await?;
        if !new {
            tx.rollback().await?;
            return Ok(false);
        }
        if let Err(err) = handler.handle(&mut tx, event).await {
            tx.rollback().await?;
            return Err(AttemptError::Handler(err));
        }
        tx.commit().await?;
        if let Some(hook) = &self.after_db_commit {
            hook(event);
        }
        Ok(true)
    }

    async fn park(&self, event: &Event, err: &AttemptError, attempts: u32) -> sqlx::Result<()> {
        let envelope = serde_json::to_value(event).unwrap_or(Value::Null);
        sql::park_event(
            &self.pool,
            &sql::ParkedEvent {
                consumer: &self.settings.name,
                event_id: &event.id,
                event_type: &event.event_type,
                topic: &event.delivery.topic,
                partition: event.delivery.partition,
                offset: event.delivery.offset,
                envelope,
                error: err.to_string(),
                attempts: attempts as i32,
            },
        )
        .await
    }
}

/// librdkafka logs into tracing; rebalances and commit failures are logged.
struct KitContext {
    consumer: String,
}

impl ClientContext for KitContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        kafka::log(level, Some(&self.consumer), fac, message);
    }
}

impl ConsumerContext for KitContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(consumer = %self.consumer, partitions = tpl.count(), "partitions assigned")
            }
            Rebalance::Revoke(tpl) => {
                tracing::info!(consumer = %self.consumer, partitions = tpl.count(), "partitions revoked")
            }
            Rebalance::Error(err) => {
                tracing::warn!(consumer = %self.consumer, error = %err, "rebalance error")
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(err) = result {
            tracing::warn!(consumer = %self.consumer, error = %err,
                "offset commit failed; events after the last committed offset will be redelivered and deduplicated");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn catalog() -> Arc<Catalog> {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/catalog/kernel.toml"
        ));
        Arc::new(Catalog::load(&[path]).unwrap())
    }

    #[test]
    fn envelope_decodes_with_null_tenant_and_optional_correlation() {
        let v = json!({"id": "01j9pa5mz70000000000000000", "type": "money.wallet.credited",
            "source": "money", "schemaVersion": "1.0.0", "tenantId": null,
            "occurredAt": "2026-11-29T10:00:00.123Z",
            "data": {"txId": "t", "userId": "u", "amountCents": 5, "currency": "USD"}});
        let e: Event = serde_json::from_value(v).unwrap();
        assert_eq!(e.tenant_id, None);
        assert_eq!(e.correlation_id, None);
        assert_eq!(e.occurred_at.timestamp_millis() % 1000, 123);
        let typed: outbox_writer::WalletCredited = e.data_as().unwrap();
        assert_eq!(typed.amount_cents, 5);
    }

    /// Keys the kit sets itself, and the connection's keys, which belong to
    /// the `[kafka]` settings: a passthrough may set neither.
    #[tokio::test]
    async fn owned_librdkafka_keys_are_refused_naming_their_owner() {
        for (key, expected) in [
            (
                "enable.auto.commit",
                "consumer setting `librdkafka`: `enable.auto.commit` is set by the consumer kit",
            ),
            (
                "sasl.password",
                "consumer setting `librdkafka`: `sasl.password` is set from kafka.sasl.password; set that instead",
            ),
        ] {
            let mut s = ConsumerSettings::new("m", KafkaSettings::default());
            s.librdkafka.insert(key.into(), "x".into());
            let pool = sqlx::PgPool::connect_lazy("postgres://localhost/x").unwrap();
            let manifest = Manifest::parse("m.json", r#"{"name": "m"}"#).unwrap();
            let err = Consumer::new(&manifest, catalog(), pool, s)
                .err()
                .unwrap()
                .to_string();
            assert_eq!(err, expected);
        }
    }

    #[test]
    fn a_manifest_without_name_is_invalid() {
        let err = Manifest::parse("m.json", r#"{"events": {"subscribes": []}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("manifest m.json: missing field `name`"),
            "{err}"
        );
    }
}
