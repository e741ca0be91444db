//! Virtual-partition leases: which partitions this relay may publish, for how long.
//!
//! A dedicated task with its own connection (so a busy pool never starves
//! it) heartbeats, renews the leases it holds, takes its fair share of free
//! or expired ones and hands back extras once the in-flight batch is done.
//! The relay loop reads [`Leases::usable`] before each claim and presents
//! the epochs when it settles the batch ([`crate::sql::lease_fence`]).
//!
//! Safety: a lease is trusted locally only until `renewal start + ttl -
//! margin`, measured on this process's monotonic clock from *before* the
//! renewal request, so it always ends before the database lets another
//! relay take it. A lease taken over from an owner whose lease *expired*
//! is not published until that owner's producer can no longer deliver what
//! it queued (`Leases::new`'s `takeover_fence`, see `outbox_lease_acquire`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use tokio_util::sync::CancellationToken;

use crate::backoff::db_backoff;
use crate::config::{KafkaSettings, LeaseSettings};
use crate::{metrics, sql};

/// The lease side of readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// No lease round has succeeded yet, or the last one failed: whatever
    /// this relay held is lapsing. Not ready.
    Unavailable,
    /// The last round succeeded and this relay holds this many partitions.
    Holding(usize),
    /// The last round succeeded but every partition has a live owner: a hot
    /// standby, ready to take over partitions when their owner stops.
    StandingBy,
}

impl LeaseState {
    /// The state after a successful lease round that left `held` partitions.
    pub fn after_round(held: usize) -> LeaseState {
        if held == 0 {
            LeaseState::StandingBy
        } else {
            LeaseState::Holding(held)
        }
    }

    pub fn is_ready(self) -> bool {
        !matches!(self, LeaseState::Unavailable)
    }
}

/// What the heartbeat row says about the relay's work: the relay loop's
/// progress, read by the lease task without knowing the relay.
pub trait Activity: Send + Sync {
    /// When the last batch was acknowledged.
    fn last_publish(&self) -> Option<chrono::DateTime<chrono::Utc>>;
    /// Events published since the relay started.
    fn published_total(&self) -> u64;
}

#[derive(Debug, Clone, Copy)]
struct Held {
    epoch: i64,
    valid_until: Instant,
    /// Taken over from an owner whose lease expired: not claimed before
    /// this, when whatever that owner's producer still held has been
    /// delivered or expired.
    fenced_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct View {
    held: BTreeMap<i16, Held>,
    /// Handed back after the in-flight batch; not claimed meanwhile.
    releasing: BTreeSet<i16>,
}

/// Lease state shared by the lease task and the relay loop.
pub struct Leases {
    relay_id: String,
    settings: LeaseSettings,
    /// How long after a former owner's expiry its producer may still
    /// deliver: `kafka.message_timeout_ms` plus a margin.
    takeover_fence: Duration,
    view: Mutex<View>,
    /// Every batch in flight holds a read guard until it has settled; handing
    /// a lease back takes the write guard, so it waits for them.
    pub step_gate: Arc<tokio::sync::RwLock<()>>,
    /// Process-wide identity facts for the heartbeat row.
    source: String,
    host: String,
}

/// The partitions a step may claim, with the epochs to present.
#[derive(Debug, Clone, Default)]
pub struct Usable {
    pub vpartitions: Vec<i16>,
    pub epochs: Vec<i64>,
}

impl Usable {
    /// Keeps the partitions (with their epochs) for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(i16, i64) -> bool) {
        let (vps, epochs): (Vec<i16>, Vec<i64>) = self
            .vpartitions
            .iter()
            .copied()
            .zip(self.epochs.iter().copied())
            .filter(|(vp, epoch)| keep(*vp, *epoch))
            .unzip();
        self.vpartitions = vps;
        self.epochs = epochs;
    }
}

impl Leases {
    pub fn new(
        relay_id: String,
        source: String,
        host: String,
        settings: LeaseSettings,
        takeover_fence: Duration,
    ) -> Arc<Leases> {
        Arc::new(Leases {
            relay_id,
            settings,
            takeover_fence,
            view: Mutex::new(View::default()),
            step_gate: Arc::new(tokio::sync::RwLock::new(())),
            source,
            host,
        })
    }

    pub fn relay_id(&self) -> &str {
        &self.relay_id
    }

    /// Margin before local expiry in which a lease is no longer used for
    /// new work: room for one batch to settle.
    fn margin(&self) -> Duration {
        Duration::from_millis(self.settings.ttl_ms / 5)
    }

    /// Partitions held for at least the margin, past their takeover fence
    /// and not being handed back.
    pub fn usable(&self) -> Usable {
        let now = Instant::now();
        let margin = self.margin();
        let view = self.view.lock().expect("lease view");
        let mut u = Usable::default();
        for (vp, h) in &view.held {
            if h.valid_until > now + margin
                && h.fenced_until.is_none_or(|f| f <= now)
                && !view.releasing.contains(vp)
            {
                u.vpartitions.push(*vp);
                u.epochs.push(h.epoch);
            }
        }
        u
    }

    /// Whether `vp` is still held under `epoch` with time to settle a batch.
    pub fn still_valid(&self, vp: i16, epoch: i64) -> Option<Instant> {
        let view = self.view.lock().expect("lease view");
        view.held
            .get(&vp)
            .filter(|h| h.epoch == epoch)
            .map(|h| h.valid_until - self.margin() / 2)
    }

    pub fn held_count(&self) -> usize {
        self.view.lock().expect("lease view").held.len()
    }

    fn replace(
        &self,
        renewed: &[(i16, i64)],
        acquired: &[(i16, i64, i32)],
        valid_until: Instant,
        now: Instant,
    ) {
        let mut view = self.view.lock().expect("lease view");
        let mut held = BTreeMap::new();
        for (vp, epoch) in renewed {
            // A renewed lease keeps the fence it was taken over with.
            let fenced_until = view
                .held
                .get(vp)
                .filter(|h| h.epoch == *epoch)
                .and_then(|h| h.fenced_until)
                .filter(|f| *f > now);
            held.insert(
                *vp,
                Held {
                    epoch: *epoch,
                    valid_until,
                    fenced_until,
                },
            );
        }
        for (vp, epoch, fenced_ms) in acquired {
            let fenced_until =
                (*fenced_ms > 0).then(|| now + Duration::from_millis(*fenced_ms as u64));
            held.insert(
                *vp,
                Held {
                    epoch: *epoch,
                    valid_until,
                    fenced_until,
                },
            );
        }
        view.releasing.retain(|vp| held.contains_key(vp));
        view.held = held;
    }

    fn forget_all(&self) {
        let mut view = self.view.lock().expect("lease view");
        view.held.clear();
        view.releasing.clear();
    }

    /// One renewal round; returns the partitions to hand back.
    async fn round(
        &self,
        conn: &mut PgConnection,
        total: usize,
        last_publish: Option<chrono::DateTime<chrono::Utc>>,
        published_total: i64,
    ) -> sqlx::Result<Vec<i16>> {
        let ttl = self.settings.ttl_ms;
        // Measured before the request: the database's expiry is later than
        // anything this process derives from it.
        let started = Instant::now();
        sql::heartbeat(
            conn,
            &self.relay_id,
            &self.source,
            &self.host,
            crate::VERSION,
            last_publish,
            published_total,
        )
        .await?;
        let renewed = sql::lease_renew(conn, &self.relay_id, ttl).await?;
        let live = sql::live_relays(conn, ttl).await?.max(1) as usize;
        let fair = total.div_ceil(live);
        let acquired = if renewed.len() < fair {
            let fence = self.takeover_fence.as_millis() as u64;
            sql::lease_acquire(conn, &self.relay_id, ttl, fair - renewed.len(), fence).await?
        } else {
            Vec::new()
        };
        let fenced: Vec<i16> = acquired
            .iter()
            .filter(|(_, _, ms)| *ms > 0)
            .map(|(vp, _, _)| *vp)
            .collect();
        if let Some(longest) = acquired
            .iter()
            .map(|(_, _, ms)| *ms)
            .max()
            .filter(|ms| *ms > 0)
        {
            tracing::info!(vpartitions = ?fenced, wait_ms = longest,
                "took over leases that expired; publishing them once the former owner's producer can no longer deliver");
        }
        let valid_until = started + Duration::from_millis(ttl);
        self.replace(&renewed, &acquired, valid_until, Instant::now());
        let mut extras = Vec::new();
        let mut view = self.view.lock().expect("lease view");
        let held = view.held.len();
        if held > fair {
            // Hand back the highest partitions not already on their way out.
            let want = held - fair - view.releasing.len().min(held - fair);
            let candidates: Vec<i16> = view
                .held
                .keys()
                .rev()
                .filter(|vp| !view.releasing.contains(vp))
                .take(want)
                .copied()
                .collect();
            for vp in candidates {
                view.releasing.insert(vp);
                extras.push(vp);
            }
        }
        Ok(extras)
    }
}

/// How long after a former owner's lease expired its producer may still
/// deliver a message it queued while the lease held: librdkafka expires a
/// queued message `message.timeout.ms` after it was queued, checking once a
/// second and always before it transmits after a pause; the margin covers
/// that second and the request's way to the broker. Relays of one outbox
/// must share `kafka.message_timeout_ms` (each assumes the others' is its own).
pub fn takeover_fence(kafka: &KafkaSettings) -> Duration {
    Duration::from_millis(kafka.message_timeout_ms) + TAKEOVER_MARGIN
}

const TAKEOVER_MARGIN: Duration = Duration::from_secs(2);

async fn connect(url: &str) -> sqlx::Result<PgConnection> {
    let options = url
        .parse::<PgConnectOptions>()?
        .application_name("outbox-relay-leases")
        .options(sql::DEAD_PEER);
    let conn = options.connect().await?;
    sql::sockets::guard(options.get_port());
    Ok(conn)
}

/// The lease task: heartbeats and renews until `token` is cancelled, then
/// returns its connection for [`hand_back_all`]. It hands nothing back by
/// itself: the batches in flight still need their leases to settle, so the
/// shutdown sequence ([`crate::lifecycle`]) calls [`hand_back_all`] once the
/// relay loop has drained.
pub async fn renew(
    leases: Arc<Leases>,
    url: String,
    activity: Arc<dyn Activity>,
    report: Arc<dyn Fn(LeaseState) + Send + Sync>,
    token: CancellationToken,
) -> Option<PgConnection> {
    let interval = Duration::from_millis(leases.settings.renew_interval_ms);
    let mut conn: Option<PgConnection> = None;
    let mut total = 0usize;
    let mut backoff = db_backoff();
    while !token.is_cancelled() {
        if conn.is_none() {
            match connect(&url).await {
                Ok(mut c) => match sql::vpartition_count(&mut c).await {
                    Ok(n) => {
                        total = n as usize;
                        conn = Some(c);
                        backoff = db_backoff();
                    }
                    Err(err) => tracing::warn!(error = %err, "reading the partition count failed"),
                },
                Err(err) => {
                    tracing::warn!(error = %err, "lease connection failed; leases will lapse")
                }
            }
        }
        let mut wait = interval;
        if let Some(c) = conn.as_mut() {
            let (last_publish, published) =
                (activity.last_publish(), activity.published_total() as i64);
            match leases.round(c, total, last_publish, published).await {
                Ok(extras) => {
                    metrics::leases_owned(&leases.source, leases.held_count());
                    report(LeaseState::after_round(leases.held_count()));
                    if !extras.is_empty() {
                        tokio::spawn(hand_back(leases.clone(), url.clone(), extras));
                    }
                }
                Err(err) => {
                    report(LeaseState::Unavailable);
                    tracing::warn!(error = %err, "lease renewal failed; leases will lapse unless it recovers");
                    conn = None;
                    wait = backoff.next().unwrap_or(interval).min(interval);
                }
            }
        } else {
            report(LeaseState::Unavailable);
            wait = backoff.next().unwrap_or(interval).min(interval);
        }
        tokio::select! {
            _ = token.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    conn
}

/// Draining handoff: hands every lease back and marks this relay as gone,
/// on the lease task's connection when it still has one. Called once the
/// relay loop has settled its last batch.
pub async fn hand_back_all(leases: &Leases, url: &str, conn: Option<PgConnection>) {
    let held: Vec<i16> = leases
        .view
        .lock()
        .expect("lease view")
        .held
        .keys()
        .copied()
        .collect();
    leases.forget_all();
    metrics::leases_owned(&leases.source, 0);
    let conn = match conn {
        Some(c) => Some(c),
        None => connect(url).await.ok(),
    };
    if let Some(mut c) = conn {
        if let Err(err) = sql::lease_release(&mut c, &leases.relay_id, &held).await {
            tracing::warn!(error = %err, "handing leases back failed; they lapse after the ttl");
        }
        let _ = sql::leave(&mut c, &leases.relay_id).await;
        tracing::info!(leases = held.len(), "leases handed back");
    }
}

/// Hands partitions back once the step in flight has settled.
async fn hand_back(leases: Arc<Leases>, url: String, vpartitions: Vec<i16>) {
    let _gate = leases.step_gate.write().await;
    let result = async {
        let mut c = connect(&url).await?;
        sql::lease_release(&mut c, &leases.relay_id, &vpartitions).await
    }
    .await;
    let mut view = leases.view.lock().expect("lease view");
    match result {
        Ok(n) => {
            for vp in &vpartitions {
                view.held.remove(vp);
                view.releasing.remove(vp);
            }
            tracing::info!(released = n, "rebalanced: leases handed to other relays");
        }
        Err(err) => {
            for vp in &vpartitions {
                view.releasing.remove(vp);
            }
            tracing::warn!(error = %err, "handing leases back failed; keeping them");
        }
    }
}
