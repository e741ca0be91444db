//! A run's own database and topics on the local services, and their removal.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{Context, Result};
use outbox_relay::catalog::Catalog;
use outbox_relay::sql;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};

use crate::kafka;
use crate::workload::Mix;

/// Kafka partitions per topic: the relay's default `topics.partitions`.
pub const PARTITIONS: i32 = 6;

pub fn admin_url() -> String {
    std::env::var("OUTBOX_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/postgres".into())
}

pub fn brokers() -> String {
    std::env::var("OUTBOX_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

pub fn catalog_dir() -> PathBuf {
    crate::procs::workspace_root().join("config/catalog")
}

fn with_database(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{db}")
}

pub struct BenchEnv {
    pub id: String,
    pub db_name: String,
    pub db_url: String,
    pub pool: PgPool,
    pub brokers: String,
    pub mix: Arc<Mix>,
    pub catalog: Arc<Catalog>,
    /// Topic prefix of the relay's and of Debezium's topics.
    pub relay_prefix: String,
    pub dbz_prefix: String,
    /// Topic prefix of the floor's topics (a bare producer, no PostgreSQL).
    pub floor_prefix: String,
    pub topics: Vec<String>,
}

impl BenchEnv {
    /// Creates database `bench_<id>` (migrated, catalog mirrored, plus the
    /// plain and Debezium-shaped tables) and the topics of both peers and
    /// of the floor.
    pub async fn create(with_debezium: bool, with_floor: bool) -> Result<BenchEnv> {
        let id = outbox_relay::writer::new_event_id()[14..].to_string();
        let db_name = format!("bench_{id}");
        let mut admin = PgConnection::connect(&admin_url())
            .await
            .context("local Postgres is not running: run `bash scripts/services.sh up`")?;
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        let db_url = with_database(&admin_url(), &db_name);
        let pool = PgPool::connect(&db_url).await?;
        sql::migrate(&pool).await?;
        let catalog = Catalog::load(&[catalog_dir()])?;
        sql::sync_catalog(&pool, &catalog).await?;
        // The writer-tax baseline: outbox's columns, defaults, constraints
        // and indexes, without its trigger.
        sqlx::query("CREATE TABLE outbox_plain (LIKE outbox INCLUDING ALL)")
            .execute(&pool)
            .await?;
        // Debezium's outbox shape, as its documentation describes it.
        sqlx::query(
            "CREATE TABLE dbz_outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
             aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL)",
        )
        .execute(&pool)
        .await?;
        let mix = Arc::new(Mix::new(&catalog)?);
        let brokers = brokers();
        let relay_prefix = format!("bench{id}r.");
        let dbz_prefix = format!("bench{id}d.");
        let floor_prefix = format!("bench{id}f.");
        let mut env = BenchEnv {
            id,
            db_name,
            db_url,
            pool,
            brokers,
            mix,
            catalog: Arc::new(catalog),
            relay_prefix,
            dbz_prefix,
            floor_prefix,
            topics: Vec::new(),
        };
        let mut topics = env.peer_topics(&env.relay_prefix);
        if with_debezium {
            topics.extend(env.peer_topics(&env.dbz_prefix));
        }
        if with_floor {
            // The same topics, partitions and configuration as the peers'.
            topics.extend(env.peer_topics(&env.floor_prefix));
        }
        // Recorded before creating so that a partial failure still cleans up.
        env.topics = topics.clone();
        kafka::create_topics(&env.brokers, &topics, PARTITIONS)
            .await
            .context("local Kafka is not running: run `bash scripts/services.sh up`")?;
        Ok(env)
    }

    pub fn peer_topics(&self, prefix: &str) -> Vec<String> {
        self.mix
            .topics()
            .iter()
            .map(|t| format!("{prefix}{t}"))
            .collect()
    }

    /// Environment of the `outbox-relay run` process (as tests/common's
    /// `process_env`), with the relay's own defaults for everything else.
    pub fn relay_env(&self, extra: &[(String, String)]) -> Vec<(String, String)> {
        let mut v = vec![
            ("DATABASE_URL".to_string(), self.db_url.clone()),
            ("OUTBOX_RELAY_KAFKA__BROKERS".into(), self.brokers.clone()),
            (
                "OUTBOX_RELAY_KAFKA__TOPIC_PREFIX".into(),
                self.relay_prefix.clone(),
            ),
            (
                "OUTBOX_RELAY_CATALOG__PATHS".into(),
                format!("[\"{}\"]", catalog_dir().display()),
            ),
            (
                "OUTBOX_RELAY_RELAY__SOURCE".into(),
                format!("bench{}", &self.id[..6]),
            ),
            ("OUTBOX_RELAY_HTTP__LISTEN".into(), String::new()),
            ("RUST_LOG".into(), "info".into()),
        ];
        v.extend(extra.iter().cloned());
        v
    }

    /// Environment of bench/peers/debezium/run.sh for this run.
    pub fn debezium_env(
        &self,
        rest_port: u16,
        log_dest: &std::path::Path,
    ) -> Result<Vec<(String, String)>> {
        let o = PgConnectOptions::from_str(&self.db_url)?;
        Ok(vec![
            ("DBZ_LOG_DEST".into(), log_dest.display().to_string()),
            ("DBZ_NAME".into(), format!("bench_{}", self.id)),
            ("DBZ_DB_HOST".into(), o.get_host().to_string()),
            ("DBZ_DB_PORT".into(), o.get_port().to_string()),
            ("DBZ_DB_USER".into(), o.get_username().to_string()),
            ("DBZ_DB_NAME".into(), self.db_name.clone()),
            ("DBZ_KAFKA".into(), self.brokers.clone()),
            ("DBZ_TOPIC_PREFIX".into(), self.dbz_prefix.clone()),
            ("DBZ_REST_PORT".into(), rest_port.to_string()),
        ])
    }

    pub async fn truncate(&self, table: &str) -> Result<()> {
        sqlx::query(&format!("TRUNCATE {table}"))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Cleans up the dead rows a previous phase left in `table` and
    /// refreshes its statistics, so each phase starts from the same table
    /// (Debezium's is truncated instead).
    pub async fn vacuum(&self, table: &str) -> Result<()> {
        sqlx::query(&format!("VACUUM (ANALYZE) {table}"))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends any checkpoint in progress. A drain writes enough WAL to start
    /// one that spreads its writes over minutes; without this, whichever
    /// peer's phases follow a drain would be measured during it and the
    /// other's not.
    pub async fn checkpoint(&self) -> Result<()> {
        sqlx::query("CHECKPOINT").execute(&self.pool).await?;
        Ok(())
    }

    /// The PostgreSQL backends (pids) of this run's database that a peer
    /// holds: the relay's sessions (`application_name` `outbox-relay`,
    /// `outbox-relay-leases`) or, for Debezium, every session that names
    /// itself (its JDBC connections and its WAL sender); the harness's own
    /// sessions set no application name.
    pub async fn peer_backends(&self, relay: bool) -> Result<Vec<u32>> {
        let sql = if relay {
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE 'outbox-relay%'"
        } else {
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND application_name <> '' \
             AND backend_type IN ('client backend', 'walsender')"
        };
        let pids: Vec<i32> = sqlx::query_scalar(sql).fetch_all(&self.pool).await?;
        Ok(pids.into_iter().map(|p| p as u32).collect())
    }

    pub async fn outbox_empty(&self) -> Result<bool> {
        Ok(
            sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM outbox)")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Drops the replication slot (if Debezium left it), the database and
    /// the topics. Best effort: reports and goes on.
    pub async fn cleanup(self) {
        self.pool.close().await;
        match PgConnection::connect(&admin_url()).await {
            Ok(mut admin) => {
                let slot = format!("bench_{}_slot", self.id);
                if let Err(e) = sqlx::query(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                )
                .bind(&slot)
                .execute(&mut admin)
                .await
                {
                    eprintln!("warning: dropping replication slot {slot}: {e}");
                }
                if let Err(e) = sqlx::query(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.db_name
                ))
                .execute(&mut admin)
                .await
                {
                    eprintln!("warning: dropping database {}: {e}", self.db_name);
                }
                let _ = admin.close().await;
            }
            Err(e) => eprintln!("warning: cannot connect to drop {}: {e}", self.db_name),
        }
        if let Err(e) = kafka::delete_topics(&self.brokers, &self.topics).await {
            eprintln!("warning: deleting topics: {e}");
        }
    }
}
