//! The event catalog: which events exist, who may publish them, where they go.
//!
//! Loaded from TOML files (the kernel's `config/catalog/kernel.toml` plus any
//! module files beside it) and validated as a whole before the relay starts.
//! Every error names the file and the entry so an operator can fix it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

/// The catalog file format this build understands.
pub const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("catalog {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("catalog {path}: {entry}: {message}")]
    Invalid {
        path: PathBuf,
        entry: String,
        message: String,
    },
    #[error("catalog: no files found in {paths:?}")]
    Empty { paths: Vec<PathBuf> },
}

/// JSON type of a payload field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Object,
}

/// The JSON type of a value, as the catalog's checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonKind {
    Null,
    Boolean,
    /// A number that fits i64 or u64.
    Integer,
    /// Any other number.
    Float,
    String,
    Array,
    Object,
}

impl JsonKind {
    pub fn of(value: &Value) -> JsonKind {
        match value {
            Value::Null => JsonKind::Null,
            Value::Bool(_) => JsonKind::Boolean,
            Value::Number(n) if n.is_i64() || n.is_u64() => JsonKind::Integer,
            Value::Number(_) => JsonKind::Float,
            Value::String(_) => JsonKind::String,
            Value::Array(_) => JsonKind::Array,
            Value::Object(_) => JsonKind::Object,
        }
    }

    /// The kind of a valid JSON text, from its first character (and, for
    /// numbers, whether it is an integer that fits 64 bits) — without
    /// building the value.
    pub fn of_raw(json: &str) -> JsonKind {
        match json.as_bytes().first() {
            Some(b'"') => JsonKind::String,
            Some(b'{') => JsonKind::Object,
            Some(b'[') => JsonKind::Array,
            Some(b't' | b'f') => JsonKind::Boolean,
            Some(b'n') | None => JsonKind::Null,
            Some(_) if json.parse::<i64>().is_ok() || json.parse::<u64>().is_ok() => {
                JsonKind::Integer
            }
            Some(_) => JsonKind::Float,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            JsonKind::Null => "null",
            JsonKind::Boolean => "boolean",
            JsonKind::Integer => "integer",
            JsonKind::Float => "number",
            JsonKind::String => "string",
            JsonKind::Array => "array",
            JsonKind::Object => "object",
        }
    }
}

impl FieldType {
    pub fn matches(self, value: &Value) -> bool {
        self.accepts(JsonKind::of(value))
    }

    pub fn accepts(self, kind: JsonKind) -> bool {
        match self {
            FieldType::String => kind == JsonKind::String,
            FieldType::Integer => kind == JsonKind::Integer,
            FieldType::Number => matches!(kind, JsonKind::Integer | JsonKind::Float),
            FieldType::Boolean => kind == JsonKind::Boolean,
            FieldType::Array => kind == JsonKind::Array,
            FieldType::Object => kind == JsonKind::Object,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Integer => "integer",
            FieldType::Number => "number",
            FieldType::Boolean => "boolean",
            FieldType::Array => "array",
            FieldType::Object => "object",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublisherKind {
    Kernel,
    Module,
}

#[derive(Debug, Clone)]
pub struct Publisher {
    pub id: String,
    pub name: String,
    pub kind: PublisherKind,
    /// Event-type domains (first name segment) this kernel publisher owns.
    pub domains: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct EventDef {
    pub event_type: String,
    pub publisher: String,
    /// Catalog topic name, before any configured prefix.
    pub topic: String,
    pub schema_version: String,
    /// URI of the data schema (`outbox-relay catalog schema`): the
    /// envelope's `dataschema` and the `ce_dataschema` header.
    pub dataschema: String,
    pub partition_key: String,
    /// Required payload fields and their JSON types, in file order.
    pub payload: Vec<(String, FieldType)>,
    pub subscribers: Vec<String>,
    pub description: String,
    /// The file that declared it.
    pub file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadError {
    /// JSON path of the offending field, e.g. `$.amountCents`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

impl EventDef {
    /// Checks a payload against the declared fields. Extra fields are allowed
    /// so publishers can add fields before consumers need them.
    pub fn validate_payload(&self, payload: &Value) -> Result<(), PayloadError> {
        let Some(object) = payload.as_object() else {
            return Err(not_an_object(JsonKind::of(payload)));
        };
        self.check_fields(|field| object.get(field).map(JsonKind::of))
    }

    /// The field checks of [`EventDef::validate_payload`], over any view of
    /// an object: `kind_of` gives the JSON kind of a field, if present.
    pub fn check_fields(
        &self,
        kind_of: impl Fn(&str) -> Option<JsonKind>,
    ) -> Result<(), PayloadError> {
        for (field, ty) in &self.payload {
            match kind_of(field) {
                None => {
                    return Err(PayloadError {
                        path: format!("$.{field}"),
                        message: format!("required field missing (expected {})", ty.as_str()),
                    })
                }
                Some(kind) if !ty.accepts(kind) => {
                    return Err(PayloadError {
                        path: format!("$.{field}"),
                        message: format!("expected {}, found {}", ty.as_str(), kind.name()),
                    })
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// The error for a payload that is not a JSON object.
pub fn not_an_object(kind: JsonKind) -> PayloadError {
    PayloadError {
        path: "$".into(),
        message: format!("payload must be a JSON object, found {}", kind.name()),
    }
}

#[derive(Debug, Clone)]
pub struct TopicDef {
    pub name: String,
    /// `None` means the configured default (7 days).
    pub retention_days: Option<u32>,
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// `version` of each loaded file, by file.
    pub versions: Vec<(PathBuf, String)>,
    pub publishers: BTreeMap<String, Publisher>,
    pub events: BTreeMap<String, Arc<EventDef>>,
    pub topics: BTreeMap<String, TopicDef>,
}

// On-disk format.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRepr {
    format: u32,
    version: String,
    #[serde(default)]
    publishers: BTreeMap<String, PublisherRepr>,
    #[serde(default)]
    topics: BTreeMap<String, TopicRepr>,
    #[serde(default)]
    events: Vec<EventRepr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublisherRepr {
    name: String,
    kind: PublisherKind,
    #[serde(default)]
    domains: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicRepr {
    retention_days: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventRepr {
    #[serde(rename = "type")]
    event_type: String,
    publisher: String,
    topic: Option<String>,
    schema_version: String,
    partition_key: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    subscribers: Vec<String>,
    #[serde(default)]
    payload: toml::Table,
}

/// Kafka's own rule for legal topic names.
pub fn valid_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `domain.entity.action`, lowercase, as the outbox table's check constraint.
pub fn valid_event_type(name: &str) -> bool {
    let mut segments = 0;
    for segment in name.split('.') {
        segments += 1;
        let mut chars = segment.chars();
        match chars.next() {
            Some(c) if c.is_ascii_lowercase() => {}
            _ => return false,
        }
        if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
            return false;
        }
    }
    segments >= 2
}

/// The domain of an event type: its first name segment.
pub fn domain_of(event_type: &str) -> &str {
    event_type.split('.').next().unwrap_or(event_type)
}

/// The topic an event goes to when the catalog names none.
pub fn default_topic(event_type: &str) -> String {
    format!("platform.{}.events", domain_of(event_type))
}

impl Catalog {
    /// Loads every catalog file under `paths` (files, or directories whose
    /// `*.toml` files are read in name order) and validates the whole.
    pub fn load(paths: &[PathBuf]) -> Result<Catalog, CatalogError> {
        let mut files = Vec::new();
        for path in paths {
            if path.is_dir() {
                let entries = std::fs::read_dir(path).map_err(|source| CatalogError::Read {
                    path: path.clone(),
                    source,
                })?;
                let mut found: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|ext| ext == "toml"))
                    .collect();
                found.sort();
                files.extend(found);
            } else {
                files.push(path.clone());
            }
        }
        if files.is_empty() {
            return Err(CatalogError::Empty {
                paths: paths.to_vec(),
            });
        }
        let mut sources = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|source| CatalogError::Read {
                path: file.clone(),
                source,
            })?;
            sources.push((file, text));
        }
        Self::from_sources(&sources)
    }

    /// Builds a catalog from (file name, TOML text) pairs; the unit of validation.
    pub fn from_sources(sources: &[(PathBuf, String)]) -> Result<Catalog, CatalogError> {
        let mut catalog = Catalog::default();
        let mut parsed = Vec::new();
        for (path, text) in sources {
            let repr: FileRepr = toml::from_str(text).map_err(|e| CatalogError::Parse {
                path: path.clone(),
                message: e.to_string().trim_end().replace('\n', " "),
            })?;
            if repr.format != FORMAT {
                return Err(CatalogError::Invalid {
                    path: path.clone(),
                    entry: "format".into(),
                    message: format!(
                        "format {} is not supported by this relay (it reads format {FORMAT})",
                        repr.format
                    ),
                });
            }
            catalog.versions.push((path.clone(), repr.version.clone()));
            // Publishers and topics of every file first, so that a module
            // file may refer to a publisher declared in another file.
            for (id, p) in &repr.publishers {
                let invalid = |message: String| CatalogError::Invalid {
                    path: path.clone(),
                    entry: format!("publisher `{id}`"),
                    message,
                };
                if catalog.publishers.contains_key(id) {
                    return Err(invalid("declared twice".into()));
                }
                if p.kind == PublisherKind::Module && !p.domains.is_empty() {
                    return Err(invalid(
                        "a module publisher cannot own domains; only kernel publishers do".into(),
                    ));
                }
                for domain in &p.domains {
                    if let Some(owner) = catalog
                        .publishers
                        .values()
                        .find(|other| other.domains.contains(domain))
                    {
                        return Err(invalid(format!(
                            "domain `{domain}` is already owned by publisher `{}`",
                            owner.id
                        )));
                    }
                }
                catalog.publishers.insert(
                    id.clone(),
                    Publisher {
                        id: id.clone(),
                        name: p.name.clone(),
                        kind: p.kind,
                        domains: p.domains.clone(),
                    },
                );
            }
            for (name, t) in &repr.topics {
                if !valid_topic_name(name) {
                    return Err(CatalogError::Invalid {
                        path: path.clone(),
                        entry: format!("topic `{name}`"),
                        message: "not a legal Kafka topic name (letters, digits, `.`, `_`, `-`; at most 249)".into(),
                    });
                }
                if catalog.topics.contains_key(name) {
                    return Err(CatalogError::Invalid {
                        path: path.clone(),
                        entry: format!("topic `{name}`"),
                        message: "declared twice".into(),
                    });
                }
                if t.retention_days == Some(0) {
                    return Err(CatalogError::Invalid {
                        path: path.clone(),
                        entry: format!("topic `{name}`"),
                        message: "retention_days must be at least 1".into(),
                    });
                }
                catalog.topics.insert(
                    name.clone(),
                    TopicDef {
                        name: name.clone(),
                        retention_days: t.retention_days,
                    },
                );
            }
            parsed.push((path.clone(), repr.events));
        }
        for (path, events) in parsed {
            for event in events {
                let def = catalog.validate_event(&path, event)?;
                catalog
                    .topics
                    .entry(def.topic.clone())
                    .or_insert_with(|| TopicDef {
                        name: def.topic.clone(),
                        retention_days: None,
                    });
                catalog.events.insert(def.event_type.clone(), Arc::new(def));
            }
        }
        Ok(catalog)
    }

    fn validate_event(&self, path: &Path, e: EventRepr) -> Result<EventDef, CatalogError> {
        let invalid = |message: String| CatalogError::Invalid {
            path: path.to_path_buf(),
            entry: format!("event `{}`", e.event_type),
            message,
        };
        if !valid_event_type(&e.event_type) {
            return Err(invalid(
                "type must be lowercase `domain.entity.action` (letters, digits, `_`)".into(),
            ));
        }
        if let Some(existing) = self.events.get(&e.event_type) {
            return Err(invalid(format!(
                "duplicate event type (first declared in {})",
                existing.file.display()
            )));
        }
        let Some(publisher) = self.publishers.get(&e.publisher) else {
            return Err(invalid(format!(
                "unknown publisher `{}` (declare it under [publishers] first; known: {})",
                e.publisher,
                self.publishers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let domain = domain_of(&e.event_type);
        if let Some(owner) = self
            .publishers
            .values()
            .find(|p| p.domains.iter().any(|d| d == domain))
        {
            if owner.id != publisher.id {
                return Err(invalid(format!(
                    "`{domain}.*` events can only be published by `{}` ({}), not `{}`",
                    owner.id, owner.name, publisher.id
                )));
            }
        } else if publisher.kind == PublisherKind::Kernel {
            return Err(invalid(format!(
                "kernel publisher `{}` does not own domain `{domain}`; add it to its domains",
                publisher.id
            )));
        }
        let topic = e
            .topic
            .clone()
            .unwrap_or_else(|| default_topic(&e.event_type));
        if !valid_topic_name(&topic) {
            return Err(invalid(format!(
                "topic `{topic}` is not a legal Kafka topic name (letters, digits, `.`, `_`, `-`; at most 249)"
            )));
        }
        let valid_version = e.schema_version.split('.').count() == 3
            && e.schema_version
                .split('.')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
        if !valid_version {
            return Err(invalid(format!(
                "schema_version `{}` is not MAJOR.MINOR.PATCH",
                e.schema_version
            )));
        }
        let mut payload = Vec::new();
        for (field, ty) in &e.payload {
            let ty: FieldType = ty.clone().try_into().map_err(|_| {
                invalid(format!(
                    "payload field `{field}` has type {ty}; expected one of string, integer, number, boolean, array, object"
                ))
            })?;
            payload.push((field.clone(), ty));
        }
        match payload.iter().find(|(f, _)| *f == e.partition_key) {
            None => {
                return Err(invalid(format!(
                    "partition_key `{}` is not among the payload fields ({})",
                    e.partition_key,
                    payload
                        .iter()
                        .map(|(f, _)| f.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
            Some((_, FieldType::String | FieldType::Integer)) => {}
            Some((_, ty)) => {
                return Err(invalid(format!(
                    "partition_key `{}` has type {}; a key must be a string or integer",
                    e.partition_key,
                    ty.as_str()
                )))
            }
        }
        Ok(EventDef {
            dataschema: crate::schema::data_uri(&e.event_type, &e.schema_version),
            event_type: e.event_type,
            publisher: e.publisher,
            topic,
            schema_version: e.schema_version,
            partition_key: e.partition_key,
            payload,
            subscribers: e.subscribers,
            description: e.description,
            file: path.to_path_buf(),
        })
    }

    pub fn get(&self, event_type: &str) -> Option<&Arc<EventDef>> {
        self.events.get(event_type)
    }

    /// Retention of a catalog topic in days, falling back to `default_days`.
    pub fn retention_days(&self, topic: &str, default_days: u32) -> u32 {
        self.topics
            .get(topic)
            .and_then(|t| t.retention_days)
            .unwrap_or(default_days)
    }

    /// A plain-text table, one event per line (`outbox-relay catalog list`).
    pub fn render_table(&self, default_retention_days: u32) -> String {
        let headers = [
            "EVENT",
            "PUBLISHER",
            "TOPIC",
            "RETENTION",
            "SCHEMA",
            "KEY",
            "PAYLOAD",
        ];
        let rows: Vec<[String; 7]> = self
            .events
            .values()
            .map(|e| {
                [
                    e.event_type.clone(),
                    e.publisher.clone(),
                    e.topic.clone(),
                    format!("{}d", self.retention_days(&e.topic, default_retention_days)),
                    e.schema_version.clone(),
                    e.partition_key.clone(),
                    e.payload
                        .iter()
                        .map(|(f, t)| format!("{f}:{}", t.as_str()))
                        .collect::<Vec<_>>()
                        .join(" "),
                ]
            })
            .collect();
        let mut widths = headers.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: Vec<&str>| {
            let mut text = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                if i + 1 == cells.len() {
                    text.push_str(cell);
                } else {
                    text.push_str(&format!("{cell:<w$}  "));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(headers.to_vec());
        for row in &rows {
            line(row.iter().map(String::as_str).collect());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kernel() -> (PathBuf, String) {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/catalog/kernel.toml"
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        (path, text)
    }

    fn with_module(module: &str) -> Result<Catalog, CatalogError> {
        Catalog::from_sources(&[kernel(), ("module.toml".into(), module.to_string())])
    }

    fn err_of(module: &str) -> String {
        with_module(module).unwrap_err().to_string()
    }

    #[test]
    fn kernel_catalog_has_all_thirteen_events() {
        let c = Catalog::from_sources(&[kernel()]).unwrap();
        assert_eq!(c.events.len(), 13);
        let e = c.get("money.wallet.credited").unwrap();
        assert_eq!(e.publisher, "money");
        assert_eq!(e.topic, "platform.money.events");
        assert_eq!(e.partition_key, "userId");
        assert_eq!(c.retention_days("platform.audit.events", 7), 30);
        assert_eq!(c.retention_days("platform.auth.events", 7), 7);
        let keys: Vec<_> = c
            .events
            .values()
            .map(|e| e.partition_key.as_str())
            .collect();
        for key in [
            "userId",
            "moduleId",
            "fileId",
            "notificationId",
            "auditId",
            "tenantId",
        ] {
            assert!(keys.contains(&key), "{key}");
        }
    }

    const MODULE_HEADER: &str = "format = 1\nversion = \"1\"\n[publishers.\"@acme/crm\"]\nname = \"CRM\"\nkind = \"module\"\n";

    #[test]
    fn module_events_load_from_their_own_file_with_default_topic() {
        let c = with_module(&format!(
            "{MODULE_HEADER}[[events]]\ntype = \"crm.contact.created\"\npublisher = \"@acme/crm\"\nschema_version = \"1.0.0\"\npartition_key = \"contactId\"\n[events.payload]\ncontactId = \"string\"\n"
        ))
        .unwrap();
        assert_eq!(c.events.len(), 14);
        assert_eq!(
            c.get("crm.contact.created").unwrap().topic,
            "platform.crm.events"
        );
    }

    #[test]
    fn duplicate_type_is_named() {
        let err = err_of("format = 1\nversion = \"1\"\n[[events]]\ntype = \"auth.user.created\"\npublisher = \"iam\"\nschema_version = \"1.0.0\"\npartition_key = \"userId\"\n[events.payload]\nuserId = \"string\"\n");
        assert!(
            err.contains("module.toml: event `auth.user.created`: duplicate event type"),
            "{err}"
        );
    }

    #[test]
    fn key_field_must_be_a_payload_field() {
        let err = err_of(&format!("{MODULE_HEADER}[[events]]\ntype = \"crm.contact.created\"\npublisher = \"@acme/crm\"\nschema_version = \"1.0.0\"\npartition_key = \"id\"\n[events.payload]\ncontactId = \"string\"\n"));
        assert!(err.contains("event `crm.contact.created`: partition_key `id` is not among the payload fields (contactId)"), "{err}");
    }

    #[test]
    fn bad_topic_is_named() {
        let err = err_of(&format!("{MODULE_HEADER}[[events]]\ntype = \"crm.contact.created\"\npublisher = \"@acme/crm\"\ntopic = \"crm events!\"\nschema_version = \"1.0.0\"\npartition_key = \"contactId\"\n[events.payload]\ncontactId = \"string\"\n"));
        assert!(
            err.contains(
                "event `crm.contact.created`: topic `crm events!` is not a legal Kafka topic name"
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_publisher_is_named() {
        let err = err_of("format = 1\nversion = \"1\"\n[[events]]\ntype = \"crm.contact.created\"\npublisher = \"@acme/nope\"\nschema_version = \"1.0.0\"\npartition_key = \"contactId\"\n[events.payload]\ncontactId = \"string\"\n");
        assert!(
            err.contains("event `crm.contact.created`: unknown publisher `@acme/nope`"),
            "{err}"
        );
    }

    #[test]
    fn a_module_can_never_declare_a_kernel_event() {
        let err = err_of(&format!("{MODULE_HEADER}[[events]]\ntype = \"money.wallet.refunded\"\npublisher = \"@acme/crm\"\nschema_version = \"1.0.0\"\npartition_key = \"userId\"\n[events.payload]\nuserId = \"string\"\n"));
        assert!(err.contains("`money.*` events can only be published by `money` (Money Service), not `@acme/crm`"), "{err}");
    }

    #[test]
    fn unknown_field_type_is_named() {
        let err = err_of(&format!("{MODULE_HEADER}[[events]]\ntype = \"crm.contact.created\"\npublisher = \"@acme/crm\"\nschema_version = \"1.0.0\"\npartition_key = \"contactId\"\n[events.payload]\ncontactId = \"uuid\"\n"));
        assert!(
            err.contains("payload field `contactId` has type \"uuid\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_in_a_file_are_rejected() {
        let err = err_of("format = 1\nversion = \"1\"\nevnts = []\n");
        assert!(
            err.contains("module.toml") && err.contains("evnts"),
            "{err}"
        );
    }

    #[test]
    fn payload_validation_names_the_field_path() {
        let c = Catalog::from_sources(&[kernel()]).unwrap();
        let e = c.get("money.wallet.credited").unwrap();
        let ok = json!({"txId": "t", "userId": "u", "amountCents": 5, "currency": "USD"});
        assert_eq!(e.validate_payload(&ok), Ok(()));
        let wrong = json!({"txId": "t", "userId": "u", "amountCents": "5", "currency": "USD"});
        assert_eq!(
            e.validate_payload(&wrong).unwrap_err().to_string(),
            "$.amountCents: expected integer, found string"
        );
        let missing = json!({"txId": "t", "amountCents": 5, "currency": "USD"});
        assert_eq!(
            e.validate_payload(&missing).unwrap_err().to_string(),
            "$.userId: required field missing (expected string)"
        );
        assert_eq!(
            e.validate_payload(&json!([1])).unwrap_err().to_string(),
            "$: payload must be a JSON object, found array"
        );
    }

    #[test]
    fn table_lists_every_event() {
        let c = Catalog::from_sources(&[kernel()]).unwrap();
        let table = c.render_table(7);
        assert_eq!(table.lines().count(), 14);
        assert!(table.lines().any(|l| l.starts_with("audit.record.created")
            && l.contains("platform.audit.events")
            && l.contains("30d")));
    }
}
