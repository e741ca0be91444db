//! outbox-relay: carries events from a transactional PostgreSQL outbox to Kafka.
//!
//! The data path, one module each: [`config`] → [`catalog`] → claim
//! ([`sql`]) → [`envelope`] → [`publish`] (Kafka) → ack / retry / DLQ
//! ([`relay`], classified by [`failure`]). [`writer`] is the library kernel
//! services use to enqueue events.

pub mod catalog;
pub mod config;
pub mod envelope;
pub mod failure;
pub mod http;
pub mod metrics;
pub mod publish;
pub mod relay;
pub mod sql;
pub mod status;
pub mod topics;
pub mod writer;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backon::BackoffBuilder;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::Settings;
use crate::http::Readiness;
use crate::publish::RelayProducer;
use crate::relay::Relay;

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
    #[error("metrics: {0}")]
    Metrics(String),
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
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let h = metrics::install().map_err(|e| RunError::Metrics(e.to_string()))?;
    Ok(HANDLE.get_or_init(|| h).clone())
}

/// Connects to Postgres, retrying with capped backoff (logged) unless
/// `relay.fail_fast` is set.
pub async fn connect_db(
    settings: &Settings,
    token: &CancellationToken,
) -> Result<PgPool, RunError> {
    let db = &settings.database;
    let mut delays = relay::db_backoff();
    loop {
        match sql::connect(
            db.url.expose(),
            db.max_connections,
            Duration::from_millis(db.connect_timeout_ms),
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
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64,
                    "waiting for Postgres");
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
    let producer = publish::create_producer(&settings.kafka)?;
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let p = producer.clone();
        let result = tokio::task::spawn_blocking(move || {
            publish::check_metadata(&p, Duration::from_secs(5))
        })
        .await
        .expect("metadata task panicked");
        match result {
            Ok(_) => return Ok(producer),
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

/// A name for this relay process, unique enough to tell relays apart in
/// `outbox_relays` and logs.
pub fn relay_id() -> String {
    let host = hostname();
    format!(
        "{host}-{}-{}",
        std::process::id(),
        &writer::new_event_id()[20..]
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Every two seconds: backlog gauges, readiness, and this relay's heartbeat.
/// Cheap with millions of rows: see [`sql::backlog`].
async fn watch(
    relay: Arc<Relay>,
    relay_id: String,
    settings: Arc<Settings>,
    readiness: Arc<Readiness>,
    token: CancellationToken,
) {
    let source = settings.relay.source.clone();
    let host = hostname();
    let pool = relay.pool().clone();
    loop {
        match sql::backlog(&pool, EXACT_COUNT_BELOW).await {
            Ok(b) => {
                readiness.set_postgres(true);
                metrics::backlog(&source, b.pending, b.oldest_pending_age_seconds, b.dlq_dead);
            }
            Err(err) => {
                readiness.set_postgres(false);
                tracing::warn!(error = %err, "backlog query failed");
            }
        }
        if let Err(err) = sql::heartbeat(
            &pool,
            &relay_id,
            &source,
            &host,
            VERSION,
            relay.last_publish(),
            relay.published_total() as i64,
        )
        .await
        {
            tracing::debug!(error = %err, "heartbeat failed");
        }
        let p = relay.producer();
        let kafka_ok = tokio::task::spawn_blocking(move || {
            publish::check_metadata(&p, Duration::from_secs(2)).is_ok()
        })
        .await
        .unwrap_or(false);
        readiness.set_kafka(kafka_ok);
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Runs the relay until `shutdown` completes: stop claiming, finish the
/// in-flight batch, flush the producer, return.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let token = CancellationToken::new();
    let settings = Arc::new(settings);
    let catalog = Arc::new(Catalog::load(&settings.catalog.paths)?);
    let handle = metrics_handle()?;
    metrics::relay_info(VERSION);
    let readiness = Arc::new(Readiness::default());

    if let Some(addr) = settings.http_listen() {
        let listener = http::bind(addr).await.map_err(|source| RunError::Http {
            addr: addr.to_string(),
            source,
        })?;
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
        tokio::spawn(http::serve(
            listener,
            handle,
            readiness.clone(),
            token.clone(),
        ));
    }

    let work = async {
        let pool = connect_db(&settings, &token).await?;
        let producer = Arc::new(connect_kafka(&settings, &token).await?);
        tracing::info!(
            source = %settings.relay.source,
            events = catalog.events.len(),
            brokers = %settings.kafka.brokers,
            "relay started"
        );
        let relay = Arc::new(Relay::new(
            pool.clone(),
            producer,
            catalog.clone(),
            settings.clone(),
        ));
        let relay_id = relay_id();
        let watcher = tokio::spawn(watch(
            relay.clone(),
            relay_id.clone(),
            settings.clone(),
            readiness.clone(),
            token.clone(),
        ));
        let result = relay.run(token.clone()).await;
        token.cancel();
        let _ = watcher.await;
        let _ = sql::leave(&pool, &relay_id).await;
        let producer = relay.producer();
        let timeout = Duration::from_millis(settings.relay.shutdown_timeout_ms);
        let flushed = tokio::task::spawn_blocking(move || publish::flush(&producer, timeout))
            .await
            .expect("flush task panicked");
        if let Err(err) = flushed {
            tracing::warn!(error = %err, "producer flush at shutdown did not complete");
        }
        pool.close().await;
        result.map_err(RunError::from)
    };
    tokio::pin!(work);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut work => r,
        _ = &mut shutdown => {
            tracing::info!("shutdown requested; finishing the in-flight batch");
            token.cancel();
            work.await
        }
    };
    token.cancel();
    tracing::info!("relay stopped");
    result
}
