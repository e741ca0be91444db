//! Settings: figment defaults → TOML file → environment, validated once at start-up.
//!
//! Environment overrides use the prefix `OUTBOX_RELAY_` with `__` between
//! sections (`OUTBOX_RELAY_KAFKA__BROKERS`), plus the conventional
//! `DATABASE_URL`. Unknown keys and bad values stop start-up with the key named.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Environment variable prefix for every setting.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";
/// The configuration file read when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "config/relay.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Figment(#[from] Box<figment::Error>),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("configuration file {path} does not exist (pass --config FILE or create it)")]
    MissingFile { path: PathBuf },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

use outbox_consumer::kafka::CONNECTION_KEYS;
pub use outbox_consumer::kafka::{
    Compression, KafkaSettings, SaslMechanism, SaslSettings, SecurityProtocol, TlsSettings,
};
pub use outbox_model::Secret;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub catalog: CatalogSettings,
    pub relay: RelaySettings,
    pub leases: LeaseSettings,
    /// Several source databases in one process. Empty: the one source is
    /// `database.url`, named `relay.source`.
    pub sources: Vec<SourceSettings>,
    pub topics: TopicSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Connection URL; contains the password, so it is a `Secret`.
    pub url: Secret,
    pub max_connections: u32,
    pub connect_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSettings {
    /// Catalog files or directories (every `*.toml` inside, in name order).
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    /// Name of this outbox source; the `source` label on every metric.
    pub source: String,
    pub batch_size: u32,
    /// Bytes of payload and headers (uncompressed) one claim loads at most,
    /// past its first row: with `pipeline_depth` batches in flight, what
    /// bounds the relay's memory whatever writers insert
    /// (docs/scaling.md). A claim stops at `batch_size` rows or this,
    /// whichever comes first.
    pub max_batch_bytes: u64,
    /// Batches in flight at once: the next is claimed and queued in the
    /// producer while Kafka acknowledges the previous. 1 turns it off.
    pub pipeline_depth: u32,
    /// How often an idle relay looks for new rows: after an empty claim the
    /// server probes the outbox this often and answers when a row is there
    /// (migration 0013); with `listen`, the sleep after an empty claim.
    /// Full batches loop at once.
    pub idle_interval_ms: u64,
    /// LISTEN for the wake-ups that `SELECT outbox_enable_notify()` turns
    /// on, ending the idle sleep as soon as an event is committed.
    pub listen: bool,
    /// Attempts before an error of unknown class is dead-lettered as
    /// `retries_exhausted`. Transient errors are retried without limit.
    pub max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// Exit at start-up when Postgres or Kafka cannot be reached, instead of
    /// retrying with backoff.
    pub fail_fast: bool,
    /// How long shutdown waits for in-flight deliveries.
    pub shutdown_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseSettings {
    /// Publish only the virtual partitions this relay holds a lease on, so
    /// several relays keep per-key order. Off: one relay claims everything
    /// with SKIP LOCKED (do not run two relays on one outbox then).
    pub enabled: bool,
    /// How long a lease lasts without renewal: the failover bound when a
    /// relay dies.
    pub ttl_ms: u64,
    /// How often leases are renewed and rebalanced.
    pub renew_interval_ms: u64,
    /// Virtual partitions created by `outbox-relay migrate` on a new
    /// database. Fixed afterwards (see docs/scaling.md).
    pub vpartitions: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// The `source` label on this database's metrics.
    pub name: String,
    pub url: Secret,
    pub max_connections: Option<u32>,
}

/// One source database as the relay runs it.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub url: Secret,
    pub max_connections: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    pub partitions: i32,
    /// Replicas of new topics. Unset: `min(3, brokers in the cluster)`
    /// (see [`crate::topics::replication_plan`]).
    pub replication_factor: Option<i32>,
    /// `min.insync.replicas` set on the topics. Unset: 2 when a topic has 3
    /// or more replicas, else the broker's default.
    pub min_insync_replicas: Option<i32>,
    pub default_retention_days: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// `/metrics`, `/healthz` and `/readyz`. Empty string disables the listener.
    pub listen: String,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive, e.g. `info,outbox_relay=debug`.
    pub level: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            database: DatabaseSettings {
                url: Secret::new("postgres://postgres@127.0.0.1:55432/postgres"),
                max_connections: 8,
                connect_timeout_ms: 5_000,
            },
            kafka: KafkaSettings::default(),
            catalog: CatalogSettings {
                paths: vec![PathBuf::from("config/catalog")],
            },
            relay: RelaySettings {
                source: "default".into(),
                batch_size: 4000,
                max_batch_bytes: 16 * 1024 * 1024,
                pipeline_depth: 2,
                idle_interval_ms: 5,
                listen: false,
                max_attempts: 12,
                retry_base_ms: 500,
                retry_max_ms: 60_000,
                fail_fast: false,
                shutdown_timeout_ms: 30_000,
            },
            leases: LeaseSettings {
                enabled: true,
                ttl_ms: 10_000,
                renew_interval_ms: 2_000,
                vpartitions: 256,
            },
            sources: Vec::new(),
            topics: TopicSettings {
                partitions: 6,
                replication_factor: None,
                min_insync_replicas: None,
                default_retention_days: 7,
            },
            http: HttpSettings {
                listen: "127.0.0.1:9464".into(),
            },
            log: LogSettings {
                format: LogFormat::Pretty,
                level: "info".into(),
            },
        }
    }
}

/// librdkafka properties of the relay's producer that typed settings own
/// besides the connection's ([`CONNECTION_KEYS`]); the passthrough map may
/// not set them, so that nobody silently disables idempotence or acks=all.
const PRODUCER_KEYS: &[(&str, &str)] = &[
    ("enable.idempotence", "(always true)"),
    ("acks", "(always all)"),
    ("request.required.acks", "(always all)"),
    ("partitioner", "(always murmur2_random)"),
    ("compression.type", "kafka.compression"),
    ("compression.codec", "kafka.compression"),
    ("linger.ms", "kafka.linger_ms"),
    ("queue.buffering.max.ms", "kafka.linger_ms"),
    ("message.timeout.ms", "kafka.message_timeout_ms"),
    ("delivery.timeout.ms", "kafka.message_timeout_ms"),
    ("request.timeout.ms", "kafka.request_timeout_ms"),
    ("message.max.bytes", "kafka.max_message_bytes"),
];

/// A figment error in the words the other start-up errors use; for an
/// enum-like setting, the value found and every value allowed.
fn describe(kind: &figment::error::Kind) -> String {
    match kind {
        figment::error::Kind::UnknownVariant(found, allowed) => {
            format!("`{found}` is not one of {}", allowed.join(", "))
        }
        other => other.to_string(),
    }
}

impl Settings {
    /// The layered figment: defaults → TOML file (if any) → environment.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            figment = figment.merge(Toml::file_exact(file));
        }
        figment
            .merge(
                Env::prefixed(ENV_PREFIX)
                    // OUTBOX_RELAY_CONFIG names the file; it is not a setting.
                    .filter(|key| key != "config")
                    .split("__")
                    .lowercase(true),
            )
            .merge(
                Env::raw()
                    .only(&["DATABASE_URL"])
                    .map(|_| "database.url".into()),
            )
    }

    /// Loads and validates settings. `file = None` reads `config/relay.toml`
    /// when it exists; an explicit file must exist.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let file = match file {
            Some(path) if !path.exists() => {
                return Err(ConfigError::MissingFile {
                    path: path.to_path_buf(),
                })
            }
            Some(path) => Some(path.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
        };
        Self::from_figment(Self::figment(file.as_deref()))
    }

    pub fn from_figment(figment: Figment) -> Result<Settings, ConfigError> {
        let settings: Settings = figment.extract().map_err(|e| {
            // Name the key the way the file spells it, whichever layer
            // (file or environment variable) supplied the bad value.
            if e.path.is_empty() {
                return ConfigError::Figment(Box::new(e));
            }
            let key = e.path.join(".").to_lowercase();
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(src) => format!(" (from {} {src})", m.name),
                    None => format!(" (from {})", m.name),
                })
                .unwrap_or_default();
            ConfigError::invalid(key, format!("{}{source}", describe(&e.kind)))
        })?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.database.url.expose().is_empty() {
            return Err(ConfigError::invalid(
                "database.url",
                "is empty; set it in the config file or DATABASE_URL",
            ));
        }
        if self.database.max_connections < 2 {
            return Err(ConfigError::invalid(
                "database.max_connections",
                "must be at least 2 (one claims while one refreshes gauges)",
            ));
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::invalid("kafka.brokers", "is empty"));
        }
        if self.kafka.sasl.is_some() && !self.kafka.security_protocol.uses_sasl() {
            return Err(ConfigError::invalid(
                "kafka.security_protocol",
                "must be sasl_plaintext or sasl_ssl when [kafka.sasl] is set",
            ));
        }
        if self.kafka.max_message_bytes < 1024 {
            return Err(ConfigError::invalid(
                "kafka.max_message_bytes",
                "must be at least 1024",
            ));
        }
        if self.kafka.message_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "kafka.message_timeout_ms",
                "must be greater than 0 (0 would retry a message forever inside librdkafka)",
            ));
        }
        for key in self.kafka.librdkafka.keys() {
            let mut owned = CONNECTION_KEYS.iter().chain(PRODUCER_KEYS);
            if let Some((_, owner)) = owned.find(|(k, _)| k == key) {
                return Err(ConfigError::invalid(
                    format!("kafka.librdkafka.\"{key}\""),
                    format!("conflicts with a typed setting; use {owner} instead"),
                ));
            }
        }
        if self.catalog.paths.is_empty() {
            return Err(ConfigError::invalid(
                "catalog.paths",
                "is empty; name at least the kernel catalog",
            ));
        }
        if self.relay.source.is_empty()
            || !self
                .relay
                .source
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfigError::invalid(
                "relay.source",
                "must be non-empty ASCII letters, digits, `_` or `-` (it is a metric label)",
            ));
        }
        if self.relay.batch_size == 0 || self.relay.batch_size > 50_000 {
            return Err(ConfigError::invalid(
                "relay.batch_size",
                "must be between 1 and 50000",
            ));
        }
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&self.relay.max_batch_bytes) {
            return Err(ConfigError::invalid(
                "relay.max_batch_bytes",
                "must be between 65536 (64 KiB) and 1073741824 (1 GiB)",
            ));
        }
        if self.relay.pipeline_depth == 0 || self.relay.pipeline_depth > 8 {
            return Err(ConfigError::invalid(
                "relay.pipeline_depth",
                "must be between 1 and 8",
            ));
        }
        if self.relay.max_attempts == 0 {
            return Err(ConfigError::invalid(
                "relay.max_attempts",
                "must be at least 1",
            ));
        }
        if self.relay.retry_base_ms == 0 || self.relay.retry_max_ms < self.relay.retry_base_ms {
            return Err(ConfigError::invalid(
                "relay.retry_max_ms",
                "must be ≥ relay.retry_base_ms, and retry_base_ms > 0",
            ));
        }
        if self.leases.ttl_ms < 1_000 {
            return Err(ConfigError::invalid(
                "leases.ttl_ms",
                "must be at least 1000",
            ));
        }
        if self.leases.renew_interval_ms == 0
            || self.leases.renew_interval_ms * 3 > self.leases.ttl_ms
        {
            return Err(ConfigError::invalid(
                "leases.renew_interval_ms",
                "must be > 0 and at most a third of leases.ttl_ms, so one missed renewal never loses a lease",
            ));
        }
        if self.leases.vpartitions == 0 || self.leases.vpartitions > 4096 {
            return Err(ConfigError::invalid(
                "leases.vpartitions",
                "must be between 1 and 4096",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, src) in self.sources.iter().enumerate() {
            let valid_name = !src.name.is_empty()
                && src
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid_name {
                return Err(ConfigError::invalid(
                    format!("sources[{i}].name"),
                    "must be non-empty ASCII letters, digits, `_` or `-` (it is a metric label)",
                ));
            }
            if !names.insert(src.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("sources[{i}].name"),
                    format!("`{}` is used by two sources", src.name),
                ));
            }
            if src.url.expose().is_empty() {
                return Err(ConfigError::invalid(
                    format!("sources[{i}].url"),
                    "is empty",
                ));
            }
        }
        if self.topics.partitions < 1 {
            return Err(ConfigError::invalid(
                "topics.partitions",
                "must be at least 1",
            ));
        }
        if self.topics.replication_factor.is_some_and(|r| r < 1) {
            return Err(ConfigError::invalid(
                "topics.replication_factor",
                "must be at least 1 (unset: min(3, brokers in the cluster))",
            ));
        }
        if let Some(min_isr) = self.topics.min_insync_replicas {
            if min_isr < 1 {
                return Err(ConfigError::invalid(
                    "topics.min_insync_replicas",
                    "must be at least 1 (unset: 2 with 3 or more replicas)",
                ));
            }
            if let Some(replicas) = self.topics.replication_factor {
                if min_isr > replicas {
                    return Err(ConfigError::invalid(
                        "topics.min_insync_replicas",
                        format!(
                            "{min_isr} is more than topics.replication_factor = {replicas}: \
                             no write with acks=all could ever succeed"
                        ),
                    ));
                }
            }
        }
        if self.topics.default_retention_days == 0 {
            return Err(ConfigError::invalid(
                "topics.default_retention_days",
                "must be at least 1",
            ));
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<SocketAddr>().is_err() {
            return Err(ConfigError::invalid(
                "http.listen",
                format!(
                    "`{}` is not an address like 127.0.0.1:9464 (empty disables the listener)",
                    self.http.listen
                ),
            ));
        }
        Ok(())
    }

    /// The source databases to relay from.
    pub fn sources(&self) -> Vec<Source> {
        if self.sources.is_empty() {
            return vec![Source {
                name: self.relay.source.clone(),
                url: self.database.url.clone(),
                max_connections: self.database.max_connections,
            }];
        }
        self.sources
            .iter()
            .map(|s| Source {
                name: s.name.clone(),
                url: s.url.clone(),
                max_connections: s.max_connections.unwrap_or(self.database.max_connections),
            })
            .collect()
    }

    pub fn http_listen(&self) -> Option<SocketAddr> {
        self.http.listen.parse().ok()
    }

    pub fn idle_interval(&self) -> Duration {
        Duration::from_millis(self.relay.idle_interval_ms)
    }

    /// The full Kafka topic name for a catalog topic.
    pub fn topic_name(&self, catalog_topic: &str) -> String {
        self.kafka.topic(catalog_topic)
    }
}

#[cfg(test)]
// figment's Jail closures return figment::Error, which is large by design.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in_jail() -> Result<Settings, ConfigError> {
        Settings::from_figment(Settings::figment(Some(Path::new("relay.toml"))))
    }

    #[test]
    fn defaults_file_then_env_layer_in_order() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "relay.toml",
                r#"
                [kafka]
                brokers = "file:9092"
                [relay]
                batch_size = 250
                "#,
            )?;
            jail.set_env("OUTBOX_RELAY_KAFKA__BROKERS", "env:9092");
            jail.set_env("DATABASE_URL", "postgres://u:hunter2@db/app");
            let s = load_in_jail().map_err(|e| e.to_string())?;
            assert_eq!(s.kafka.brokers, "env:9092");
            assert_eq!(s.relay.batch_size, 250);
            assert_eq!(s.relay.idle_interval_ms, 5);
            assert_eq!(s.database.url.expose(), "postgres://u:hunter2@db/app");
            Ok(())
        });
    }

    #[test]
    fn enum_like_settings_name_the_key_the_value_and_every_allowed_value() {
        for (file, expected) in [
            (
                "[kafka]\nsecurity_protocol = \"tls\"\n",
                "configuration key `kafka.security_protocol`: `tls` is not one of plaintext, ssl, sasl_plaintext, sasl_ssl",
            ),
            (
                "[kafka]\nsecurity_protocol = \"sasl_ssl\"\n[kafka.sasl]\nmechanism = \"scram\"\nusername = \"u\"\npassword = \"p\"\n",
                "configuration key `kafka.sasl.mechanism`: `scram` is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
            ),
            (
                "[kafka]\ncompression = \"LZ4\"\n",
                "configuration key `kafka.compression`: `LZ4` is not one of none, gzip, snappy, lz4, zstd",
            ),
            (
                "[log]\nformat = \"text\"\n",
                "configuration key `log.format`: `text` is not one of pretty, json",
            ),
        ] {
            Jail::expect_with(|jail| {
                jail.create_file("relay.toml", file)?;
                let err = load_in_jail().unwrap_err().to_string();
                assert!(err.starts_with(expected), "{err}");
                Ok(())
            });
        }
        Jail::expect_with(|jail| {
            jail.create_file(
                "relay.toml",
                "[kafka]\nsecurity_protocol = \"sasl_ssl\"\ncompression = \"zstd\"\n\
                 [kafka.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = \"u\"\npassword = \"p\"\n\
                 [log]\nformat = \"json\"\n",
            )?;
            let s = load_in_jail().map_err(|e| e.to_string())?;
            assert_eq!(s.kafka.security_protocol, SecurityProtocol::SaslSsl);
            assert_eq!(s.kafka.compression, Compression::Zstd);
            assert_eq!(
                s.kafka.sasl.as_ref().map(|s| s.mechanism),
                Some(SaslMechanism::ScramSha512)
            );
            assert_eq!(s.log.format, LogFormat::Json);
            Ok(())
        });
    }

    #[test]
    fn unknown_key_names_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file("relay.toml", "[relay]\nbatch_sise = 5\n")?;
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("batch_sise"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_value_names_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file("relay.toml", "[relay]\nbatch_size = \"lots\"\n")?;
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("relay.batch_size"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_env_value_names_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file("relay.toml", "")?;
            jail.set_env("OUTBOX_RELAY_RELAY__IDLE_INTERVAL_MS", "soon");
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("relay.idle_interval_ms"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn semantic_errors_name_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file("relay.toml", "[relay]\nbatch_size = 0\n")?;
            let err = load_in_jail().unwrap_err().to_string();
            assert_eq!(
                err,
                "configuration key `relay.batch_size`: must be between 1 and 50000"
            );
            Ok(())
        });
    }

    #[test]
    fn passthrough_cannot_override_typed_or_safety_settings() {
        Jail::expect_with(|jail| {
            jail.create_file("relay.toml", "[kafka.librdkafka]\n\"acks\" = \"1\"\n")?;
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("kafka.librdkafka.\"acks\""), "{err}");
            jail.create_file(
                "relay.toml",
                "[kafka.librdkafka]\n\"statistics.interval.ms\" = \"1000\"\n",
            )?;
            let s = load_in_jail().map_err(|e| e.to_string())?;
            assert_eq!(s.kafka.librdkafka["statistics.interval.ms"], "1000");
            Ok(())
        });
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "relay.toml",
                r#"
                [database]
                url = "postgres://relay:s3cr3t-db@db/app"
                [kafka]
                security_protocol = "sasl_ssl"
                [kafka.sasl]
                mechanism = "SCRAM-SHA-512"
                username = "relay"
                password = "s3cr3t-kafka"
                "#,
            )?;
            let s = load_in_jail().map_err(|e| e.to_string())?;
            let debug = format!("{s:?}");
            assert!(!debug.contains("s3cr3t"), "{debug}");
            Ok(())
        });
    }

    #[test]
    fn sasl_requires_a_sasl_protocol() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "relay.toml",
                "[kafka.sasl]\nmechanism = \"PLAIN\"\nusername = \"u\"\npassword = \"p\"\n",
            )?;
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("kafka.security_protocol"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn min_insync_replicas_may_not_exceed_the_replication_factor() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "relay.toml",
                "[topics]\nreplication_factor = 2\nmin_insync_replicas = 3\n",
            )?;
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("`topics.min_insync_replicas`"), "{err}");
            assert!(err.contains("topics.replication_factor = 2"), "{err}");
            jail.create_file("relay.toml", "[topics]\nmin_insync_replicas = 0\n")?;
            let err = load_in_jail().unwrap_err().to_string();
            assert!(err.contains("`topics.min_insync_replicas`"), "{err}");
            // Both unset by default; explicit values are kept.
            jail.create_file("relay.toml", "")?;
            let s = load_in_jail().map_err(|e| e.to_string())?;
            assert_eq!(
                (s.topics.replication_factor, s.topics.min_insync_replicas),
                (None, None)
            );
            jail.set_env("OUTBOX_RELAY_TOPICS__REPLICATION_FACTOR", "1");
            let s = load_in_jail().map_err(|e| e.to_string())?;
            assert_eq!(s.topics.replication_factor, Some(1));
            Ok(())
        });
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let err = Settings::load(Some(Path::new("/nonexistent/relay.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/relay.toml"), "{err}");
    }
}
