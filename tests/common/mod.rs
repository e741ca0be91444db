//! Test helpers: each test gets its own database (migrated, catalog mirrored)
//! and its own topic prefix (topics created through `topics::ensure`) on the
//! local Postgres and Kafka that `scripts/services.sh up` starts, and reads
//! back through a real Kafka consumer.
//!
//! The one set of helpers of every test binary (`tests/it`, `tests/faults.rs`,
//! `tests/cluster.rs`, `tests/image.rs`): the environment here, running the
//! `outbox-relay` binary and the scripts in `process`, the HTTP endpoints and
//! the Prometheus text format in `metrics`, a TCP proxy that freezes in
//! `proxy`.
#![allow(dead_code)]

mod metrics;
mod process;
mod proxy;

// Each binary uses a part of them.
#[allow(unused_imports)]
pub use self::metrics::*;
#[allow(unused_imports)]
pub use self::process::*;
#[allow(unused_imports)]
pub use self::proxy::*;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::catalog::Catalog;
use outbox_relay::config::{Secret, Settings};
use outbox_relay::relay::{Outcome, Relay};
use outbox_relay::{publish, sql, topics};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::ClientConfig;
use serde_json::Value;
use sqlx::PgPool;

/// The superuser of the local server (creating test databases only).
pub fn server_superuser_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/postgres".into())
}

pub fn brokers() -> String {
    std::env::var("OUTBOX_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

pub fn catalog_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/config/catalog"))
}

/// A short unique lowercase name part.
pub fn unique() -> String {
    outbox_relay::writer::new_event_id()[..26].to_string()
}

/// Replaces the database name of a Postgres URL.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{db}")
}

/// One test's database and topics, and the login roles that use them as the
/// documented deployment does: a relay role in `outbox_relay`, an admin in
/// `outbox_admin`, a writer per publisher in `outbox_writer` (mapped), a
/// consumer role per consumer name in `outbox_consumer` (mapped). The
/// superuser only migrates and sets up fixtures, and only through
/// [`TestEnv::fixtures`], so that no test uses it by accident.
pub struct TestEnv {
    pub id: String,
    pub db_name: String,
    superuser: PgPool,
    superuser_url: String,
    pub prefix: String,
    /// Settings of a relay running as [`TestEnv::relay_role`].
    pub settings: Settings,
    pub catalog: Arc<Catalog>,
    pub relay_role: String,
    pub admin_role: String,
    admin: PgPool,
    writers: tokio::sync::Mutex<HashMap<String, PgPool>>,
    consumers: tokio::sync::Mutex<HashMap<String, (String, PgPool)>>,
    roles: std::sync::atomic::AtomicUsize,
}

/// One message read back from Kafka.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub value: Value,
    pub headers: HashMap<String, String>,
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        Self::with_partitions(3).await
    }

    pub async fn with_partitions(partitions: i32) -> TestEnv {
        Self::on_services(&server_superuser_url(), &brokers(), partitions).await
    }

    /// An environment on the given Postgres (superuser URL) and Kafka, for
    /// tests that run their own services.
    pub async fn on_services(admin_url: &str, brokers: &str, partitions: i32) -> TestEnv {
        Self::create(admin_url, brokers, partitions, None).await
    }

    /// An environment whose schema is what `migrator` makes (an older
    /// release's migrations, for the upgrade tests) instead of this binary's.
    pub async fn with_migrator(migrator: &sqlx::migrate::Migrator) -> TestEnv {
        Self::create(&server_superuser_url(), &brokers(), 3, Some(migrator)).await
    }

    async fn create(
        admin_url: &str,
        brokers: &str,
        partitions: i32,
        migrator: Option<&sqlx::migrate::Migrator>,
    ) -> TestEnv {
        let id = unique();
        let db_name = format!("t_{id}");
        let admin = sqlx::PgPool::connect(admin_url)
            .await
            .expect("local Postgres is not running: run `bash scripts/services.sh up`");
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let superuser_url = with_database(admin_url, &db_name);
        let superuser = PgPool::connect(&superuser_url).await.unwrap();
        match migrator {
            Some(m) => m.run(&superuser).await.unwrap(),
            None => sql::migrate(&superuser).await.unwrap(),
        }
        let catalog = Arc::new(Catalog::load(&[catalog_dir()]).unwrap());
        sql::sync_catalog(&superuser, &catalog).await.unwrap();

        // Role names carry the database's id, so scripts/sweep.sh can drop
        // them with it.
        let relay_role = format!("t_{id}_relay");
        let admin_role = format!("t_{id}_admin");
        for (role, group) in [(&relay_role, "outbox_relay"), (&admin_role, "outbox_admin")] {
            sqlx::query(&format!("CREATE ROLE {role} LOGIN IN ROLE {group}"))
                .execute(&superuser)
                .await
                .unwrap();
        }
        let relay_url = with_user(&superuser_url, &relay_role);
        let admin_pool = small_pool(&with_user(&superuser_url, &admin_role)).await;

        let prefix = format!("t{id}.");
        let mut settings = Settings::default();
        settings.database.url = Secret::new(relay_url);
        settings.kafka.brokers = brokers.to_string();
        settings.kafka.topic_prefix = prefix.clone();
        settings.catalog.paths = vec![catalog_dir()];
        settings.topics.partitions = partitions;
        settings.http.listen = String::new();
        settings.relay.source = format!("t{}", &id[16..]);
        settings.relay.retry_base_ms = 50;
        settings.relay.retry_max_ms = 500;
        topics::ensure(&settings, &catalog, false)
            .await
            .expect("local Kafka is not running: run `bash scripts/services.sh up`");
        TestEnv {
            id,
            db_name,
            superuser,
            superuser_url,
            prefix,
            settings,
            catalog,
            relay_role,
            admin_role,
            admin: admin_pool,
            writers: Default::default(),
            consumers: Default::default(),
            roles: Default::default(),
        }
    }

    /// The superuser: for migrations and fixtures that no deployed role
    /// performs (a catalog entry removed under a pending row, a forged row,
    /// a stalled lock). Never for what a writer, relay, admin or consumer does.
    pub fn fixtures(&self) -> &PgPool {
        &self.superuser
    }

    /// The superuser's URL of this database (fixtures only, as above).
    pub fn fixtures_url(&self) -> &str {
        &self.superuser_url
    }

    /// The relay role's URL (the relay's `DATABASE_URL`).
    pub fn relay_url(&self) -> String {
        self.url_as(&self.relay_role)
    }

    /// The admin role's URL (for `outbox-relay dlq …`, `status`).
    pub fn admin_url(&self) -> String {
        self.url_as(&self.admin_role)
    }

    /// A pool as the admin role: DLQ functions, mappings, and reading state
    /// back (it may read the outbox, the DLQ and the dedupe tables).
    pub fn admin(&self) -> &PgPool {
        &self.admin
    }

    /// A pool as the relay role, with the relay's own connection settings.
    pub async fn relay_pool(&self) -> PgPool {
        sql::connect_relay(
            &self.relay_url(),
            4,
            Duration::from_secs(10),
            Duration::from_secs(60),
        )
        .await
        .unwrap()
    }

    /// A pool as this environment's writer role for `publisher` (created and
    /// mapped on first use).
    pub async fn writer(&self, publisher: &str) -> PgPool {
        let mut writers = self.writers.lock().await;
        if let Some(pool) = writers.get(publisher) {
            return pool.clone();
        }
        let role = self.writer_role("w", publisher).await;
        let pool = small_pool(&self.url_as(&role)).await;
        writers.insert(publisher.to_string(), pool.clone());
        pool
    }

    /// A pool as this environment's consumer role for the consumer `name`
    /// (created and mapped on first use), and the role's name.
    pub async fn consumer_role(&self, name: &str) -> (String, PgPool) {
        let mut consumers = self.consumers.lock().await;
        if let Some(found) = consumers.get(name) {
            return found.clone();
        }
        let role = self.login_role("c", &["outbox_consumer"]).await;
        sqlx::query("SELECT outbox_map_consumer($1, $2)")
            .bind(&role)
            .bind(name)
            .execute(&self.admin)
            .await
            .unwrap();
        let pool = small_pool(&self.url_as(&role)).await;
        consumers.insert(name.to_string(), (role.clone(), pool.clone()));
        (role, pool)
    }

    /// A pool as the consumer role for `name`.
    pub async fn consumer_pool(&self, name: &str) -> PgPool {
        self.consumer_role(name).await.1
    }

    pub fn topic(&self, catalog_topic: &str) -> String {
        format!("{}{catalog_topic}", self.prefix)
    }

    /// Inserts one event with plain SQL as the writer role of the event's
    /// catalog publisher. Returns the generated event id.
    pub async fn insert(&self, event_type: &str, payload: Value) -> String {
        let publisher = self
            .catalog
            .get(event_type)
            .unwrap_or_else(|| panic!("{event_type} is not in the catalog"))
            .publisher
            .clone();
        let writer = self.writer(&publisher).await;
        // A writer may not read the outbox (no RETURNING): it names the id.
        let event_id = outbox_relay::writer::new_event_id();
        sqlx::query("INSERT INTO outbox (event_id, event_type, payload) VALUES ($1, $2, $3)")
            .bind(&event_id)
            .bind(event_type)
            .bind(payload)
            .execute(&writer)
            .await
            .unwrap();
        event_id
    }

    pub async fn outbox_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&self.admin)
            .await
            .unwrap()
    }

    pub async fn dlq_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox_dlq WHERE state = 'dead'")
            .fetch_one(&self.admin)
            .await
            .unwrap()
    }

    /// A relay on this environment, for driving one step at a time.
    pub async fn relay(&self) -> Relay {
        self.relay_with(self.settings.clone()).await
    }

    /// A relay with these settings, connected as the relay role.
    pub async fn relay_with(&self, settings: Settings) -> Relay {
        let producer = publish::create_producer(&settings.kafka).unwrap();
        Relay::new(
            self.relay_pool().await,
            Arc::new(producer),
            self.catalog.clone(),
            Arc::new(settings),
        )
    }

    /// Steps until a step finds nothing due; returns the steps' outcomes.
    pub async fn drain(&self, relay: &Relay) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        loop {
            let o = relay.step().await.unwrap();
            if o == Outcome::Empty {
                return outcomes;
            }
            outcomes.push(o);
        }
    }

    /// A consumer reading `topics` from the beginning with its own group.
    pub fn consumer(&self, topics: &[String]) -> StreamConsumer {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.settings.kafka.brokers)
            .set("group.id", format!("test-{}", unique()))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).unwrap();
        consumer
    }

    /// Reads until `n` messages arrived or `timeout` passed.
    pub async fn consume(&self, topics: &[String], n: usize, timeout: Duration) -> Vec<Received> {
        let consumer = self.consumer(topics);
        read(&consumer, n, timeout).await
    }

    /// Every catalog topic of this environment.
    pub fn all_topics(&self) -> Vec<String> {
        self.catalog.topics.keys().map(|t| self.topic(t)).collect()
    }

    /// Environment variables that point the `outbox-relay` binary here.
    pub fn process_env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        vec![
            ("DATABASE_URL".into(), self.relay_url()),
            (
                "OUTBOX_RELAY_KAFKA__BROKERS".into(),
                s.kafka.brokers.clone(),
            ),
            (
                "OUTBOX_RELAY_KAFKA__TOPIC_PREFIX".into(),
                self.prefix.clone(),
            ),
            (
                "OUTBOX_RELAY_CATALOG__PATHS".into(),
                format!("[\"{}\"]", catalog_dir().display()),
            ),
            ("OUTBOX_RELAY_RELAY__SOURCE".into(), s.relay.source.clone()),
            (
                "OUTBOX_RELAY_RELAY__RETRY_BASE_MS".into(),
                s.relay.retry_base_ms.to_string(),
            ),
            (
                "OUTBOX_RELAY_RELAY__RETRY_MAX_MS".into(),
                s.relay.retry_max_ms.to_string(),
            ),
            ("OUTBOX_RELAY_HTTP__LISTEN".into(), String::new()),
            ("RUST_LOG".into(), "info".into()),
        ]
    }
}

pub async fn read(consumer: &StreamConsumer, n: usize, timeout: Duration) -> Vec<Received> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => out.push(received(&m)),
            // A topic created a moment ago may not be in the consumer's
            // metadata yet: it catches up on its own.
            Ok(Err(e))
                if e.rdkafka_error_code()
                    == Some(rdkafka::error::RDKafkaErrorCode::UnknownTopicOrPartition) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => panic!("consumer error: {e}"),
            Err(_) => break,
        }
    }
    out
}

pub fn received<M: Message>(m: &M) -> Received {
    let mut headers = HashMap::new();
    if let Some(h) = m.headers() {
        for i in 0..h.count() {
            let header = h.get(i);
            headers.insert(
                header.key.to_string(),
                String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
            );
        }
    }
    let r = Received {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
        value: serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or(Value::Null),
        headers,
    };
    record_published(&r);
    r
}

/// With `OUTBOX_TEST_EVENT_LOG` set (scripts/test.sh sets it), every event
/// a test reads back that the relay published (it names its schema in
/// `ce_dataschema`) is appended to `<dir>/<pid>.jsonl`; after the suite,
/// scripts/validate-events.py checks each against its JSON Schema.
pub fn record_published(r: &Received) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let Some(dir) = std::env::var_os("OUTBOX_TEST_EVENT_LOG") else {
        return;
    };
    if !r.headers.contains_key("ce_dataschema") {
        return;
    }
    let line = serde_json::json!({"topic": r.topic, "headers": r.headers, "value": r.value});
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{}.jsonl", std::process::id())))
        .unwrap();
    writeln!(f, "{line}").unwrap();
}

/// Example payloads of the catalog (the seed's examples).
pub fn example_payload(event_type: &str) -> Value {
    use serde_json::json;
    let user = "01j9pa5mz700000000000000";
    let tenant = "01j9p3kz5f00000000000000";
    match event_type {
        "auth.user.created" => {
            json!({"userId": user, "email": "ada@example.com", "tenantId": tenant, "roles": ["member"]})
        }
        "auth.user.logged_in" => {
            json!({"userId": user, "tenantId": tenant, "ip": "203.0.113.42", "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7)..."})
        }
        "auth.role.changed" => {
            json!({"userId": user, "oldRoles": ["member"], "newRoles": ["member", "moderator"]})
        }
        "module.registry.registered" => {
            json!({"moduleId": "01j9pamod100000000000000", "name": "@acme/crm", "version": "1.2.0"})
        }
        "module.registry.activated" | "module.registry.deactivated" => {
            json!({"moduleId": "01j9pamod100000000000000"})
        }
        "money.wallet.credited" => {
            json!({"txId": "01j9patx500000000000000", "userId": user, "amountCents": 10000, "currency": "USD"})
        }
        "money.wallet.debited" => {
            json!({"txId": "01j9patx600000000000000", "userId": user, "amountCents": 2500, "currency": "USD"})
        }
        "files.file.uploaded" => {
            json!({"fileId": "01j9paf1l000000000000000", "userId": user, "bucket": "module-crm-attachments", "key": "tenants/01j9p3kz.../contacts/01j9pa5m.../resume.pdf", "size": 204800})
        }
        "notify.notification.sent" => {
            json!({"notificationId": "01j9panot700000000000000", "channel": "email", "userId": user})
        }
        "audit.record.created" => {
            json!({"auditId": "01j9paaud800000000000000", "action": "auth.user.logged_in", "userId": user})
        }
        "billing.plan.changed" => {
            json!({"tenantId": tenant, "oldPlan": "starter", "newPlan": "professional"})
        }
        "billing.subscription.changed" => {
            json!({"tenantId": tenant, "oldStatus": "trialing", "newStatus": "active"})
        }
        other => panic!("no example for {other}"),
    }
}

/// Java's `Utils.murmur2`, written from the Kafka client's definition, so
/// tests can check the partition independently of librdkafka.
pub fn murmur2(data: &[u8]) -> i32 {
    let seed: u32 = 0x9747_b28c;
    let m: u32 = 0x5bd1_e995;
    let r = 24;
    let len = data.len();
    let mut h: u32 = seed ^ (len as u32);
    let chunks = len / 4;
    for i in 0..chunks {
        let b = &data[i * 4..i * 4 + 4];
        let mut k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        k = k.wrapping_mul(m);
        k ^= k >> r;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    let tail = &data[chunks * 4..];
    match tail.len() {
        3 => {
            h ^= (tail[2] as u32) << 16;
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(m);
        }
        2 => {
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(m);
        }
        1 => {
            h ^= tail[0] as u32;
            h = h.wrapping_mul(m);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner picks for a key.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// Waits for `cond` (polled every 50 ms) up to `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The host and port of a Postgres URL.
pub fn server_of(url: &str) -> (String, u16) {
    let (_, rest) = url.split_once("://").expect("database URL has a scheme");
    let rest = rest.split_once('@').map_or(rest, |(_, host)| host);
    let host_port = rest.split(['/', '?']).next().unwrap();
    let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, "5432"));
    (host.to_string(), port.parse().expect("database URL port"))
}

/// Replaces the user of a Postgres URL (the local server trusts every role).
pub fn with_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("database URL has a scheme");
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{host}")
}

/// SQLSTATE and message of a database error (panics on any other error).
pub fn db_error(err: &sqlx::Error) -> (String, String) {
    let db = err
        .as_database_error()
        .unwrap_or_else(|| panic!("expected a database error, got {err}"));
    (
        db.code().unwrap_or_default().into_owned(),
        db.message().to_string(),
    )
}

impl TestEnv {
    /// Creates a login role named `t_{id}_{what}{n}` (roles are cluster-wide;
    /// the database's id lets scripts/sweep.sh drop them with it) as a
    /// member of `groups`.
    pub async fn login_role(&self, what: &str, groups: &[&str]) -> String {
        let n = self
            .roles
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let role = format!("t_{}_{what}{n}", self.id);
        let mut sql = format!("CREATE ROLE {role} LOGIN");
        if !groups.is_empty() {
            sql.push_str(&format!(" IN ROLE {}", groups.join(", ")));
        }
        sqlx::query(&sql).execute(&self.superuser).await.unwrap();
        role
    }

    /// A writer login role mapped to `publisher` by the admin role.
    pub async fn writer_role(&self, what: &str, publisher: &str) -> String {
        let role = self.login_role(what, &["outbox_writer"]).await;
        sqlx::query("SELECT outbox_map_publisher($1, $2)")
            .bind(&role)
            .bind(publisher)
            .execute(&self.admin)
            .await
            .unwrap();
        role
    }

    /// This environment's database URL as `role`.
    pub fn url_as(&self, role: &str) -> String {
        with_user(&self.superuser_url, role)
    }

    /// A small pool on this environment's database as `role`.
    pub async fn pool_as(&self, role: &str) -> PgPool {
        small_pool(&self.url_as(role)).await
    }

    /// Drops a role made by [`TestEnv::login_role`] (best effort: its
    /// privileges live in this database only).
    pub async fn drop_role(&self, role: &str) {
        let _ = sqlx::query(&format!("DROP OWNED BY {role}"))
            .execute(&self.superuser)
            .await;
        let _ = sqlx::query(&format!("DROP ROLE {role}"))
            .execute(&self.superuser)
            .await;
    }
}

async fn small_pool(url: &str) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap()
}

/// A duration as seconds with one decimal, for the tables tests print.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
