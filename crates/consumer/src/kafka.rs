//! How every client of the outbox connects to Kafka: the `[kafka]` settings
//! (brokers, security, and the relay's producer options), the librdkafka
//! properties they become, and librdkafka's log routed into `tracing`.
//! The relay's producer and admin client and the kit's consumers all build
//! their configuration here, so that they connect the same way.

use std::collections::BTreeMap;
use std::path::PathBuf;

use outbox_model::Secret;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};

/// `kafka.security_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's `security.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// `kafka.sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's `sasl.mechanism` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// `kafka.compression`: the relay producer's `compression.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    /// librdkafka's `compression.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// The `[kafka]` settings. A consumer uses the connection fields and
/// `topic_prefix`; the rest configure the relay's producer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub brokers: String,
    pub client_id: String,
    /// Prepended to every catalog topic (`staging.` → `staging.platform.auth.events`).
    pub topic_prefix: String,
    pub security_protocol: SecurityProtocol,
    pub sasl: Option<SaslSettings>,
    pub tls: Option<TlsSettings>,
    pub compression: Compression,
    pub linger_ms: u64,
    /// Bound on how long librdkafka keeps retrying one message before the
    /// relay's own retry loop takes over.
    pub message_timeout_ms: u64,
    pub request_timeout_ms: u64,
    /// Largest serialized message the relay will produce; larger rows go to
    /// the DLQ before producing. Keep it ≤ the broker's `message.max.bytes`.
    pub max_message_bytes: usize,
    /// Raw librdkafka properties, applied last. Keys that the typed settings
    /// above own are rejected.
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for KafkaSettings {
    /// A broker on loopback, as the project's scripts start it.
    fn default() -> Self {
        KafkaSettings {
            brokers: "127.0.0.1:19092".into(),
            client_id: "outbox-relay".into(),
            topic_prefix: String::new(),
            security_protocol: SecurityProtocol::Plaintext,
            sasl: None,
            tls: None,
            compression: Compression::Lz4,
            linger_ms: 2,
            message_timeout_ms: 10_000,
            request_timeout_ms: 5_000,
            max_message_bytes: 1_000_000,
            librdkafka: BTreeMap::new(),
        }
    }
}

impl KafkaSettings {
    /// The Kafka topic of a catalog topic under this `topic_prefix`.
    pub fn topic(&self, catalog_topic: &str) -> String {
        prefixed(&self.topic_prefix, catalog_topic)
    }
}

/// The Kafka topic of a catalog topic: `topic_prefix` + its name
/// (`staging.` + `platform.auth.events`).
pub fn prefixed(topic_prefix: &str, catalog_topic: &str) -> String {
    format!("{topic_prefix}{catalog_topic}")
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SaslSettings {
    pub mechanism: SaslMechanism,
    pub username: String,
    pub password: Secret,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub ca_location: Option<PathBuf>,
    pub certificate_location: Option<PathBuf>,
    pub key_location: Option<PathBuf>,
    pub key_password: Option<Secret>,
}

/// The librdkafka properties [`client_config`] sets (and their aliases),
/// with the setting that owns each: no passthrough map may set them.
pub const CONNECTION_KEYS: &[(&str, &str)] = &[
    ("bootstrap.servers", "kafka.brokers"),
    ("metadata.broker.list", "kafka.brokers"),
    ("client.id", "kafka.client_id"),
    ("security.protocol", "kafka.security_protocol"),
    ("sasl.mechanism", "kafka.sasl.mechanism"),
    ("sasl.mechanisms", "kafka.sasl.mechanism"),
    ("sasl.username", "kafka.sasl.username"),
    ("sasl.password", "kafka.sasl.password"),
    ("ssl.ca.location", "kafka.tls.ca_location"),
    ("ssl.certificate.location", "kafka.tls.certificate_location"),
    ("ssl.key.location", "kafka.tls.key_location"),
    ("ssl.key.password", "kafka.tls.key_password"),
];

/// Connection and security properties shared by producer, admin and consumer clients.
pub fn client_config(k: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("client.id", &k.client_id)
        .set("security.protocol", k.security_protocol.as_str());
    if let Some(sasl) = &k.sasl {
        c.set("sasl.mechanism", sasl.mechanism.as_str())
            .set("sasl.username", &sasl.username)
            .set("sasl.password", sasl.password.expose());
    }
    if let Some(tls) = &k.tls {
        if let Some(p) = &tls.ca_location {
            c.set("ssl.ca.location", p.display().to_string());
        }
        if let Some(p) = &tls.certificate_location {
            c.set("ssl.certificate.location", p.display().to_string());
        }
        if let Some(p) = &tls.key_location {
            c.set("ssl.key.location", p.display().to_string());
        }
        if let Some(p) = &tls.key_password {
            c.set("ssl.key.password", p.expose());
        }
    }
    c
}

/// One librdkafka log line into `tracing` (target `librdkafka`), at the
/// matching level; `consumer` names the kit's consumer when there is one.
pub fn log(level: RDKafkaLogLevel, consumer: Option<&str>, fac: &str, message: &str) {
    use RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error => {
            tracing::error!(target: "librdkafka", consumer, facility = fac, "{message}")
        }
        Warning => tracing::warn!(target: "librdkafka", consumer, facility = fac, "{message}"),
        Notice | Info => {
            tracing::info!(target: "librdkafka", consumer, facility = fac, "{message}")
        }
        Debug => tracing::debug!(target: "librdkafka", consumer, facility = fac, "{message}"),
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(SecurityProtocol, SaslMechanism, Compression);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_settings_spell_what_librdkafka_expects_and_parse_back() {
        for (p, s) in [
            (SecurityProtocol::Plaintext, "plaintext"),
            (SecurityProtocol::Ssl, "ssl"),
            (SecurityProtocol::SaslPlaintext, "sasl_plaintext"),
            (SecurityProtocol::SaslSsl, "sasl_ssl"),
        ] {
            assert_eq!(p.as_str(), s);
            assert_eq!(
                serde_json::from_str::<SecurityProtocol>(&format!("\"{s}\"")).unwrap(),
                p
            );
        }
        for (m, s) in [
            (SaslMechanism::Plain, "PLAIN"),
            (SaslMechanism::ScramSha256, "SCRAM-SHA-256"),
            (SaslMechanism::ScramSha512, "SCRAM-SHA-512"),
        ] {
            assert_eq!(m.as_str(), s);
            assert_eq!(
                serde_json::from_str::<SaslMechanism>(&format!("\"{s}\"")).unwrap(),
                m
            );
        }
        for (c, s) in [
            (Compression::None, "none"),
            (Compression::Gzip, "gzip"),
            (Compression::Snappy, "snappy"),
            (Compression::Lz4, "lz4"),
            (Compression::Zstd, "zstd"),
        ] {
            assert_eq!(c.as_str(), s);
            assert_eq!(
                serde_json::from_str::<Compression>(&format!("\"{s}\"")).unwrap(),
                c
            );
        }
        let err = serde_json::from_str::<Compression>("\"brotli\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`brotli`") && err.contains("`zstd`"), "{err}");
    }

    #[test]
    fn a_topic_prefix_is_prepended() {
        let k = KafkaSettings {
            topic_prefix: "staging.".into(),
            ..KafkaSettings::default()
        };
        assert_eq!(
            k.topic("platform.auth.events"),
            "staging.platform.auth.events"
        );
        assert_eq!(KafkaSettings::default().topic("t"), "t");
    }

    #[test]
    fn secrets_reach_librdkafka_but_not_debug_output() {
        let k = KafkaSettings {
            security_protocol: SecurityProtocol::SaslSsl,
            sasl: Some(SaslSettings {
                mechanism: SaslMechanism::ScramSha512,
                username: "relay".into(),
                password: Secret::new("s3cret"),
            }),
            ..KafkaSettings::default()
        };
        let c = client_config(&k);
        assert_eq!(c.get("sasl.password"), Some("s3cret"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert!(!format!("{k:?}").contains("s3cret"));
        for key in c.config_map().keys() {
            assert!(
                CONNECTION_KEYS.iter().any(|(k, _)| k == key),
                "{key} is set by client_config but not protected"
            );
        }
    }
}
