//! outbox-relay: carries events from a transactional PostgreSQL outbox to Kafka.
//!
//! The data path: [`config`] → [`catalog`] → the [`relay`] pipeline (claim
//! ([`sql`]) → prepare ([`envelope`]) → produce ([`publish`], Kafka) →
//! settle: ack / retry / DLQ, classified by [`failure`]). [`lifecycle`]
//! starts the sources and stops them in one documented order. [`writer`]
//! (the `outbox-writer` crate) is the library kernel services use to
//! enqueue events; [`consumer`] (`outbox-consumer`) the kit modules consume
//! with; both share [`catalog`] and the envelope with the relay through
//! `outbox-model`.

pub mod backoff;
pub mod config;
pub mod dlq;
pub mod envelope;
pub mod failure;
pub mod http;
pub mod lease;
pub mod lifecycle;
pub mod metrics;
pub mod privileges;
pub mod publish;
pub mod relay;
pub mod sql;
pub mod status;
pub mod tls;
pub mod topics;

// The crates each audience depends on by itself, under the paths the
// relay's modules and tests have always used.
pub use outbox_consumer as consumer;
pub use outbox_model::{catalog, schema};
pub use outbox_writer as writer;

/// Months of dedupe partitions kept created ahead of time.
pub const DEDUPE_MONTHS_AHEAD: i32 = 3;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::http::Readiness;
use crate::publish::RelayProducer;
use crate::relay::Relay;

pub use lifecycle::run;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Above this many pending rows the backlog gauge reports the planner's
/// estimate instead of counting.
pub const EXACT_COUNT_BELOW: i64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Relay(#[from] relay::RelayError),
    /// The database's schema does not fit this binary (migrations pending
    /// or unfinished); the message names them and the fix.
    #[error("{0}")]
    Schema(String),
    #[error("metrics: {0}")]
    Metrics(String),
    /// A Kafka TLS or SASL setting that no retry can fix; the message names
    /// the setting and the fix.
    #[error("kafka: {0}")]
    KafkaSetup(String),
    /// The relay's database role lacks a grant it needs.
    #[error("postgres: {0}")]
    Privileges(String),
    #[error("http listener on {addr}: {source}")]
    Http {
        addr: String,
        source: std::io::Error,
    },
}

/// The process-wide Prometheus recorder (installed once, however many
/// relays a process runs, as tests do).
pub fn metrics_handle() -> Result<PrometheusHandle, RunError> {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    // Serializes the first installs: two relays starting at once (parallel
    // tests) must not both try to set the global recorder.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let _installing = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let h = metrics::install().map_err(|e| RunError::Metrics(e.to_string()))?;
    Ok(HANDLE.get_or_init(|| h).clone())
}

/// Connects to a source database, retrying with capped backoff (logged)
/// unless `relay.fail_fast` is set.
pub async fn connect_db(
    settings: &Settings,
    source: &config::Source,
    token: &CancellationToken,
) -> Result<PgPool, RunError> {
    let mut delays = relay::db_backoff();
    // A stalled relay's transaction must end before another relay may
    // take its leases over: bounded by the lease ttl plus one Kafka wait.
    let idle = Duration::from_millis(settings.leases.ttl_ms + settings.kafka.message_timeout_ms);
    loop {
        match sql::connect_relay(
            source.url.expose(),
            source.max_connections,
            Duration::from_millis(settings.database.connect_timeout_ms),
            idle,
        )
        .await
        {
            Ok(pool) => return Ok(pool),
            Err(err) if settings.relay.fail_fast || token.is_cancelled() => return Err(err.into()),
            Err(err) if failure::classify_db(&err) == failure::DbClass::Fatal => {
                return Err(err.into())
            }
            Err(err) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(source = %source.name, error = %err,
                    retry_in_ms = delay.as_millis() as u64, "waiting for Postgres");
                tokio::select! {
                    _ = token.cancelled() => return Err(err.into()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Creates the producer and waits until Kafka answers a metadata request,
/// retrying with capped backoff (logged) unless `relay.fail_fast` is set.
pub async fn connect_kafka(
    settings: &Settings,
    token: &CancellationToken,
) -> Result<RelayProducer, RunError> {
    tls::check_files(&settings.kafka).map_err(RunError::KafkaSetup)?;
    let producer = publish::create_producer(&settings.kafka)?;
    let mut delays = outbox_model::backoff::capped(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let p = producer.clone();
        let result = tokio::task::spawn_blocking(move || {
            publish::check_metadata(&p, Duration::from_secs(5))
        })
        .await
        .expect("metadata task panicked");
        match result {
            Ok(_) => return Ok(producer),
            // A refused certificate or password does not heal by waiting.
            Err(err) if explained(&producer, settings).is_some() => {
                let why = explained(&producer, settings).unwrap_or_default();
                tracing::error!(error = %err, "{why}");
                return Err(RunError::KafkaSetup(why));
            }
            Err(err) if settings.relay.fail_fast || token.is_cancelled() => return Err(err.into()),
            Err(err) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error = %err, brokers = %settings.kafka.brokers,
                    retry_in_ms = delay.as_millis() as u64, "waiting for Kafka");
                tokio::select! {
                    _ = token.cancelled() => return Err(err.into()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn explained(producer: &RelayProducer, settings: &Settings) -> Option<String> {
    use rdkafka::producer::Producer;
    let last = producer.client().context().last_error()?;
    tls::explain(&settings.kafka, &last)
}

/// A name for this relay process, unique enough to tell relays apart in
/// `outbox_relays`, `outbox_leases` and logs.
pub fn relay_id() -> String {
    format!(
        "{}-{}-{}",
        hostname(),
        std::process::id(),
        &writer::new_event_id()[20..]
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Readiness of every source plus Kafka, folded into [`Readiness`].
#[derive(Default)]
struct SourceHealth {
    readiness: Arc<Readiness>,
    sources: std::sync::Mutex<std::collections::HashMap<String, bool>>,
    leases: std::sync::Mutex<std::collections::HashMap<String, http::LeaseState>>,
    schemas: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl SourceHealth {
    fn set(&self, source: &str, ok: bool) {
        let mut map = self.sources.lock().expect("source health");
        map.insert(source.to_string(), ok);
        self.readiness.set_postgres(map.values().all(|ok| *ok));
    }

    fn schema_of(&self, source: &str) -> Option<String> {
        self.schemas
            .lock()
            .expect("schema health")
            .get(source)
            .cloned()
    }

    /// One schema line for all sources: the shared state, or each source's.
    fn set_schema(&self, source: &str, summary: String) {
        let mut map = self.schemas.lock().expect("schema health");
        map.insert(source.to_string(), summary);
        let first = map.values().next().cloned().unwrap_or_default();
        let folded = if map.values().all(|s| *s == first) {
            first
        } else {
            map.iter()
                .map(|(name, s)| format!("{name} {s}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        self.readiness.set_schema(folded);
    }

    /// Unavailable if any source's lease task cannot reach its database;
    /// otherwise holding the sum of partitions, or standing by.
    fn set_leases(&self, source: &str, state: http::LeaseState) {
        use http::LeaseState::*;
        let mut map = self.leases.lock().expect("lease health");
        map.insert(source.to_string(), state);
        let folded = map.values().fold(StandingBy, |acc, s| match (acc, *s) {
            (Unavailable, _) | (_, Unavailable) => Unavailable,
            (Holding(a), Holding(b)) => Holding(a + b),
            (Holding(n), StandingBy) | (StandingBy, Holding(n)) => Holding(n),
            (StandingBy, StandingBy) => StandingBy,
        });
        self.readiness.set_leases(folded);
    }
}

/// Compares a source's schema with this binary's migrations before relaying
/// it: pending or unfinished migrations stop the source (the relay's
/// statements would fail on missing columns or functions, or worse, work on
/// half a change); migrations this binary does not know are expected while
/// relays are rolled after `migrate` and only warned about. Returns the
/// `/readyz` schema line. An outage is waited out like [`connect_db`] does.
pub async fn check_schema(
    pool: &PgPool,
    source: &str,
    settings: &Settings,
    token: &CancellationToken,
) -> Result<String, RunError> {
    let mut delays = relay::db_backoff();
    loop {
        match sql::schema_status(pool).await {
            Ok(status) => return schema_verdict(source, &status),
            Err(err @ sql::SchemaError::NoAccess { .. }) => {
                // Not fatal: the relay's own privileges are what it needs
                // to work, and a role without this grant worked before the
                // check existed. It is said loudly, and on /readyz.
                tracing::warn!(source = %source, error = %err,
                    "cannot compare the database schema with this binary");
                return Ok(schema_unknown(&err));
            }
            Err(err)
                if err.is_transient() && !settings.relay.fail_fast && !token.is_cancelled() =>
            {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(source = %source, error = %err,
                    retry_in_ms = delay.as_millis() as u64, "waiting to read the schema version");
                tokio::select! {
                    _ = token.cancelled() => return Err(RunError::Schema(err.to_string())),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(sql::SchemaError::Db(err)) => return Err(err.into()),
        }
    }
}

fn schema_unknown(err: &sql::SchemaError) -> String {
    match err {
        sql::SchemaError::NoAccess { role } => format!(
            "unknown (role {role} may not read _sqlx_migrations: \
             GRANT SELECT ON _sqlx_migrations TO outbox_relay, outbox_admin)"
        ),
        other => format!("unknown ({other})"),
    }
}

/// What start-up does with a schema status: an error that stops the source,
/// or the `/readyz` line (after a warning when the schema is newer or edited).
pub fn schema_verdict(source: &str, status: &sql::SchemaStatus) -> Result<String, RunError> {
    let list = |ms: &[sql::MigrationInfo]| {
        ms.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !status.failed.is_empty() {
        return Err(RunError::Schema(format!(
            "source {source}: migration {} started and did not finish; the schema is in an \
             unknown state, so the relay does not start. Repair it (see docs/operations.md, \
             Upgrading), then run `outbox-relay migrate`",
            list(&status.failed)
        )));
    }
    if !status.pending.is_empty() {
        return Err(RunError::Schema(format!(
            "source {source}: the database schema is older than this binary (outbox-relay \
             {VERSION}): migrations {} are pending. Run `outbox-relay migrate` (from this \
             release) first, then start the relay; `outbox-relay migrate --dry-run` lists them",
            list(&status.pending)
        )));
    }
    if !status.unknown.is_empty() {
        tracing::warn!(source = %source, unknown = %list(&status.unknown), version = VERSION,
            "the database schema is newer than this binary: it has migrations this release does \
             not know. Expected while relays are rolled after `migrate`; finish the upgrade \
             (or check the release notes allow this binary on that schema)");
    }
    if !status.mismatched.is_empty() {
        tracing::warn!(source = %source, edited = %list(&status.mismatched),
            "applied migrations differ from this binary's files (edited after release): \
             `outbox-relay migrate` will refuse to run until they match");
    }
    Ok(status.summary())
}

/// Every two seconds: backlog gauges and readiness of one source (and the
/// heartbeat when leases are off; the lease task sends it otherwise).
/// Cheap with millions of rows: see [`sql::backlog`].
async fn watch(
    relay: Arc<Relay>,
    relay_id: String,
    health: Arc<SourceHealth>,
    token: CancellationToken,
) {
    let source = relay.source().to_string();
    let host = hostname();
    let pool = relay.pool().clone();
    // Fixed at install, so read once: the "partitions without owner" alert
    // compares it with the leases relays report.
    let mut partitions_known = relay.leases().is_none();
    // The schema can move under a running relay (`migrate` of a later
    // release during a rolling upgrade): re-read it every 15 rounds (30 s).
    let mut round: u64 = 0;
    loop {
        round += 1;
        if round % 15 == 0 {
            let line = match sql::schema_status(&pool).await {
                Ok(status) => Some(status.summary()),
                Err(err @ sql::SchemaError::NoAccess { .. }) => Some(schema_unknown(&err)),
                // An outage: the backlog query reports it.
                Err(_) => None,
            };
            if let Some(line) = line {
                if health.schema_of(&source).as_deref() != Some(line.as_str()) {
                    tracing::warn!(source = %source, schema = %line, "the database schema changed");
                }
                health.set_schema(&source, line);
            }
        }
        let reachable = match sql::backlog(&pool, EXACT_COUNT_BELOW).await {
            Ok(b) => {
                health.set(&source, true);
                metrics::backlog(&source, b.pending, b.oldest_pending_age_seconds, b.dlq_dead);
                match sql::dlq_age_and_forced(&pool).await {
                    Ok((age, forced)) => metrics::dlq_age(&source, age, forced),
                    Err(err) => {
                        tracing::warn!(source = %source, error = %err, "DLQ age query failed")
                    }
                }
                true
            }
            Err(err) => {
                health.set(&source, false);
                tracing::warn!(source = %source, error = %err, "backlog query failed");
                false
            }
        };
        // The coming months' dedupe partitions, at start and hourly (1800
        // rounds): dedupe rows of a month without one land in the DEFAULT
        // partition, which a purge cannot drop.
        if reachable && round % 1800 == 1 {
            match sql::dedupe_partitions_ensure(&pool, DEDUPE_MONTHS_AHEAD).await {
                Ok(created) if !created.is_empty() => {
                    tracing::info!(source = %source, partitions = ?created, "created dedupe partitions")
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(source = %source, error = %err,
                    "creating the coming months' dedupe partitions failed; retried in an hour"),
            }
        }
        if reachable && !partitions_known {
            if let Ok(mut conn) = pool.acquire().await {
                if let Ok(n) = sql::vpartition_count(&mut conn).await {
                    metrics::lease_partitions(&source, n as usize);
                    partitions_known = true;
                }
            }
        }
        if relay.leases().is_none() {
            if let Ok(mut conn) = pool.acquire().await {
                let _ = sql::heartbeat(
                    &mut conn,
                    &relay_id,
                    &source,
                    &host,
                    VERSION,
                    relay.progress().last_publish(),
                    relay.progress().published_total() as i64,
                )
                .await;
            }
        }
        let p = relay.producer();
        let kafka_ok = tokio::task::spawn_blocking(move || {
            publish::check_metadata(&p, Duration::from_secs(2)).is_ok()
        })
        .await
        .unwrap_or(false);
        health.readiness.set_kafka(kafka_ok);
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Wakes the relay loop on `outbox_relay` notifications; reconnects with
/// backoff, and the loop keeps polling meanwhile.
async fn listen(url: String, wake: Arc<tokio::sync::Notify>, token: CancellationToken) {
    let mut delays = relay::db_backoff();
    while !token.is_cancelled() {
        let listener = async {
            let mut l = sqlx::postgres::PgListener::connect(&url).await?;
            l.listen("outbox_relay").await?;
            Ok::<_, sqlx::Error>(l)
        };
        let mut listener = match listener.await {
            Ok(l) => l,
            Err(err) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %err, "LISTEN failed; polling only");
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                n = listener.recv() => match n {
                    Ok(_) => wake.notify_one(),
                    Err(err) => {
                        tracing::warn!(error = %err, "LISTEN connection lost");
                        break;
                    }
                },
            }
        }
    }
}

/// Stops a source at start-up when its role lacks a grant of the
/// `outbox_relay` group, naming the grant, instead of failing at the first
/// retry or dead letter that needs it.
async fn check_privileges(pool: &PgPool, source: &str) -> Result<(), RunError> {
    let missing = privileges::missing(pool, "outbox_relay").await?;
    if missing.is_empty() {
        return Ok(());
    }
    let role: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(pool)
        .await?;
    let message = privileges::missing_message(&role, "outbox_relay", &missing);
    tracing::error!(source = %source, role = %role, missing = missing.len(), "{message}");
    Err(RunError::Privileges(message))
}
