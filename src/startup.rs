//! What a source needs before it relays, each step with an error that names
//! the fix: the metrics recorder, the database and Kafka connections
//! (outages waited out unless `relay.fail_fast`), the schema check against
//! this binary's migrations, and the relay role's privileges.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::publish::RelayProducer;
use crate::{catalog, config, failure, metrics, privileges, publish, relay, sql, tls, writer};

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
    let mut delays =
        outbox_model::backoff::capped(Duration::from_millis(200), Duration::from_secs(10));
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

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
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

pub(crate) fn schema_unknown(err: &sql::SchemaError) -> String {
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

/// Stops a source at start-up when its role lacks a grant of the
/// `outbox_relay` group, naming the grant, instead of failing at the first
/// retry or dead letter that needs it.
pub(crate) async fn check_privileges(pool: &PgPool, source: &str) -> Result<(), RunError> {
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
