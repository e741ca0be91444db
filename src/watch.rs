//! What runs beside each source's relay: the backlog gauges and readiness
//! (every two seconds), LISTEN/NOTIFY wake-ups, and the folding of every
//! source's health into `/readyz`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::http::{self, Readiness};
use crate::relay::Relay;
use crate::startup::{hostname, schema_unknown, EXACT_COUNT_BELOW, VERSION};
use crate::DEDUPE_MONTHS_AHEAD;
use crate::{metrics, publish, relay, sql};

/// Readiness of every source plus Kafka, folded into [`Readiness`].
#[derive(Default)]
pub(crate) struct SourceHealth {
    readiness: Arc<Readiness>,
    sources: std::sync::Mutex<std::collections::HashMap<String, bool>>,
    leases: std::sync::Mutex<std::collections::HashMap<String, http::LeaseState>>,
    schemas: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl SourceHealth {
    pub(crate) fn new(readiness: Arc<Readiness>) -> SourceHealth {
        SourceHealth {
            readiness,
            ..SourceHealth::default()
        }
    }

    pub(crate) fn set(&self, source: &str, ok: bool) {
        let mut map = self.sources.lock().expect("source health");
        map.insert(source.to_string(), ok);
        self.readiness.set_postgres(map.values().all(|ok| *ok));
    }

    pub(crate) fn schema_of(&self, source: &str) -> Option<String> {
        self.schemas
            .lock()
            .expect("schema health")
            .get(source)
            .cloned()
    }

    /// One schema line for all sources: the shared state, or each source's.
    pub(crate) fn set_schema(&self, source: &str, summary: String) {
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
    pub(crate) fn set_leases(&self, source: &str, state: http::LeaseState) {
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

/// Every two seconds: backlog gauges and readiness of one source (and the
/// heartbeat when leases are off; the lease task sends it otherwise).
/// Cheap with millions of rows: see [`sql::backlog`].
pub(crate) async fn watch(
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
pub(crate) async fn listen(url: String, wake: Arc<tokio::sync::Notify>, token: CancellationToken) {
    let mut delays = relay::db_backoff();
    while !token.is_cancelled() {
        let listener = async {
            let port = url.parse::<sqlx::postgres::PgConnectOptions>()?.get_port();
            let mut l = sqlx::postgres::PgListener::connect(&url).await?;
            l.listen("outbox_relay").await?;
            crate::sql::sockets::guard(port);
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
