//! The daemon's life: start every source, and stop in one order.
//!
//! Start-up: the Kafka producer first (its one owner, [`SharedProducer`],
//! shared by every source), then each source on its own: connect, check the
//! schema and the grants, start the lease task, the watcher, the LISTEN
//! task and the relay loop.
//!
//! Shutdown, when the `shutdown` future completes (or a source stops on an
//! error no retry can fix, which stops that source alone):
//!
//! 1. **Stop claiming.** The shutdown token is cancelled: the relay loop
//!    claims no new batch, the lease task stops renewing (the leases stay
//!    held until they are handed back), the watcher and LISTEN stop.
//! 2. **Finish in-flight batches.** [`Relay::run`] waits for Kafka's
//!    answers to every batch it has in flight…
//! 3. **…and settles them**, each in its own transaction, before it returns.
//! 4. **Hand back the leases** ([`lease::hand_back_all`]) — only now, since
//!    a batch settling needs its leases — or, without leases, mark this
//!    relay as stopped in `outbox_relays`. Then the source's pool closes.
//! 5. **Flush the producer**, once every source has stopped, for at most
//!    `relay.shutdown_timeout_ms`.
//! 6. **Exit**, with the first source's error if any.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::{self, Settings};
use crate::http::{self, Readiness};
use crate::publish::SharedProducer;
use crate::relay::Relay;
use crate::startup::{
    check_privileges, check_schema, connect_db, connect_kafka, hostname, metrics_handle, relay_id,
    RunError, VERSION,
};
use crate::watch::{listen, watch, SourceHealth};
use crate::{lease, metrics, sql};

/// Runs the relay until `shutdown` completes, then stops in the order the
/// module documentation gives. Kept in one piece on purpose: start-up and
/// steps 1, 5 and 6 read top to bottom in the order they happen.
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
        let producer = SharedProducer::new(
            Arc::new(connect_kafka(&settings, &token).await?),
            settings.kafka.clone(),
        );
        let health = Arc::new(SourceHealth::new(readiness.clone()));
        let sources = settings.sources();
        tracing::info!(
            sources = sources.len(),
            events = catalog.events.len(),
            brokers = %settings.kafka.brokers,
            leases = settings.leases.enabled,
            "relay started"
        );
        let mut tasks = tokio::task::JoinSet::new();
        for source in sources {
            let name = source.name.clone();
            metrics::init_source(&name, &catalog);
            let task = run_source(
                source,
                producer.clone(),
                catalog.clone(),
                settings.clone(),
                health.clone(),
                token.child_token(),
            );
            tasks.spawn(async move { (name, task.await) });
        }
        // Steps 1 to 4 run in each source's task.
        let mut first_error = None;
        while let Some(done) = tasks.join_next().await {
            if let (name, Err(err)) = done.expect("source task panicked") {
                tracing::error!(source = %name, error = %err, "source stopped");
                first_error.get_or_insert(err);
            }
        }
        // 5. Flush the producer.
        let timeout = Duration::from_millis(settings.relay.shutdown_timeout_ms);
        let flushed = tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .expect("flush task panicked");
        if let Err(err) = flushed {
            tracing::warn!(error = %err, "producer flush at shutdown did not complete");
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    };
    tokio::pin!(work);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut work => r,
        _ = &mut shutdown => {
            tracing::info!("shutdown requested; finishing the in-flight batch");
            // 1. Stop claiming.
            token.cancel();
            work.await
        }
    };
    token.cancel();
    // 6. Exit.
    tracing::info!("relay stopped");
    result
}

/// Relays one source database until `token` is cancelled, then stops it
/// (steps 1 to 4). A source that is down keeps retrying on its own; the
/// others are not held up. One piece on purpose, like [`run`]: what a
/// source starts is what it stops, in order, at the end.
async fn run_source(
    source: config::Source,
    producer: Arc<SharedProducer>,
    catalog: Arc<Catalog>,
    settings: Arc<Settings>,
    health: Arc<SourceHealth>,
    token: CancellationToken,
) -> Result<(), RunError> {
    health.set(&source.name, false);
    let pool = connect_db(&settings, &source, &token).await?;
    // The schema first: a pending migration also explains missing grants.
    let schema = match check_schema(&pool, &source.name, &settings, &token).await {
        Ok(line) => line,
        Err(err) => {
            pool.close().await;
            return Err(err);
        }
    };
    health.set_schema(&source.name, schema);
    if let Err(err) = check_privileges(&pool, &source.name).await {
        pool.close().await;
        return Err(err);
    }
    let relay_id = relay_id();
    let url = source.url.expose().to_string();
    let mut relay = Relay::new(pool.clone(), producer.current(), catalog, settings.clone())
        .with_producer(producer)
        .with_source(&source.name);
    let mut lease_task = None;
    if settings.leases.enabled {
        let leases = lease::Leases::new(
            relay_id.clone(),
            source.name.clone(),
            hostname(),
            settings.leases.clone(),
            lease::takeover_fence(&settings.kafka),
        );
        relay = relay.with_leases(leases.clone());
        let lease_health = health.clone();
        let name = source.name.clone();
        let renewing = tokio::spawn(lease::renew(
            leases.clone(),
            url.clone(),
            relay.progress(),
            Arc::new(move |state| lease_health.set_leases(&name, state)),
            token.clone(),
        ));
        lease_task = Some((leases, renewing));
    }
    let relay = Arc::new(relay);
    if settings.relay.listen {
        tokio::spawn(listen(url.clone(), relay.wake(), token.clone()));
    }
    tracing::info!(source = %relay.source(), relay_id = %relay_id, "relaying source");
    let watcher = tokio::spawn(watch(
        relay.clone(),
        relay_id.clone(),
        health,
        token.clone(),
    ));
    // 2 and 3: the loop returns once the token is cancelled and its batches
    // in flight have settled.
    let result = relay.clone().run(token.clone()).await;
    if result.is_err() {
        // 1, for this source alone: a fatal error of this source must not
        // leave its leases held.
        token.cancel();
    }
    // 4. Hand back the leases: the renewals stopped with the token, and no
    // batch is in flight any more.
    if let Some((leases, renewing)) = lease_task {
        if let Ok(conn) = renewing.await {
            lease::hand_back_all(&leases, &url, conn).await;
        }
    } else if let Ok(mut conn) = pool.acquire().await {
        let _ = sql::leave(&mut conn, &relay_id).await;
    }
    let _ = watcher.await;
    pool.close().await;
    result?;
    Ok(())
}
