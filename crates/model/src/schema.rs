//! JSON Schemas (draft 2020-12) of the published events, generated from the
//! catalog: one for the envelope and one for `data`, per event type and
//! schema version. `outbox-relay catalog schema` writes them; the envelope's
//! `dataschema` (header `ce_dataschema`) names the data schema of the event.
//!
//! Layout of a schema directory (the kernel's is committed under
//! `config/schemas/`):
//!
//! ```text
//! <event type>/<schema version>/data.schema.json
//! <event type>/<schema version>/envelope.schema.json
//! ```
//!
//! A schema, once written for a version, is that version's contract:
//! [`check_compatibility`] compares the catalog with a schema directory and
//! refuses a change that breaks consumers within a major version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::catalog::{Catalog, EventDef, FieldType};

/// The JSON Schema dialect of every generated schema.
pub const DIALECT: &str = "https://json-schema.org/draft/2020-12/schema";

/// Prefix of every schema URI: `urn:outbox-relay:schema:<type>:<version>`
/// names the data schema, with `:envelope` appended the envelope's.
pub const URI_PREFIX: &str = "urn:outbox-relay:schema:";

pub const DATA_FILE: &str = "data.schema.json";
pub const ENVELOPE_FILE: &str = "envelope.schema.json";

/// The URI of an event's data schema: the envelope's `dataschema`.
pub fn data_uri(event_type: &str, version: &str) -> String {
    format!("{URI_PREFIX}{event_type}:{version}")
}

/// The URI of an event's envelope schema.
pub fn envelope_uri(event_type: &str, version: &str) -> String {
    format!("{}:envelope", data_uri(event_type, version))
}

/// The data schema of one event: a JSON object with the catalog's fields,
/// each required with its JSON type. Other fields are allowed (publishers
/// add fields before consumers need them).
pub fn data_schema(def: &EventDef) -> Value {
    let mut schema = data_body(def);
    let body = schema.as_object_mut().expect("an object");
    let mut out = Map::new();
    out.insert("$schema".into(), json!(DIALECT));
    out.insert(
        "$id".into(),
        json!(data_uri(&def.event_type, &def.schema_version)),
    );
    out.insert(
        "title".into(),
        json!(format!("{} {} data", def.event_type, def.schema_version)),
    );
    if !def.description.is_empty() {
        out.insert("description".into(), json!(def.description));
    }
    out.append(body);
    Value::Object(out)
}

fn field_schema(def: &EventDef, field: &str, ty: FieldType) -> Value {
    let mut s = json!({ "type": ty.as_str() });
    // The relay refuses an empty or blank string key (missing_partition_key).
    if field == def.partition_key && ty == FieldType::String {
        s["pattern"] = json!("\\S");
    }
    s
}

fn data_body(def: &EventDef) -> Value {
    let properties: Map<String, Value> = def
        .payload
        .iter()
        .map(|(f, ty)| (f.clone(), field_schema(def, f, *ty)))
        .collect();
    let required: Vec<&str> = def.payload.iter().map(|(f, _)| f.as_str()).collect();
    json!({
        "type": "object",
        "required": required,
        "properties": properties,
        "additionalProperties": true,
    })
}

/// The envelope schema of one event: the Event Model envelope with this
/// event's type, source, version and data schema fixed, `data` inline.
pub fn envelope_schema(def: &EventDef) -> Value {
    json!({
        "$schema": DIALECT,
        "$id": envelope_uri(&def.event_type, &def.schema_version),
        "title": format!("{} {} envelope", def.event_type, def.schema_version),
        "type": "object",
        "required": ["id", "type", "source", "schemaVersion", "dataschema", "tenantId", "occurredAt", "data"],
        "properties": {
            "id": { "type": "string", "minLength": 1 },
            "type": { "const": def.event_type },
            "source": { "const": def.publisher },
            "schemaVersion": { "const": def.schema_version },
            "dataschema": { "const": data_uri(&def.event_type, &def.schema_version) },
            "tenantId": { "type": ["string", "null"] },
            "occurredAt": {
                "type": "string",
                "format": "date-time",
                "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z$"
            },
            "data": data_body(def),
            "correlationId": { "type": "string" },
            "causationId": { "type": "string" },
        },
        "additionalProperties": false,
    })
}

/// Pretty JSON with a final newline, as the files are written.
pub fn render(schema: &Value) -> String {
    let mut s = serde_json::to_string_pretty(schema).expect("a JSON value");
    s.push('\n');
    s
}

/// Every schema file of the catalog: relative path → contents.
pub fn files(catalog: &Catalog) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    for def in catalog.events.values() {
        let dir = Path::new(&def.event_type).join(&def.schema_version);
        out.insert(dir.join(DATA_FILE), render(&data_schema(def)));
        out.insert(dir.join(ENVELOPE_FILE), render(&envelope_schema(def)));
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error("schema directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("schema {path}: not valid JSON: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{}", .0.join("\n"))]
    Incompatible(Vec<String>),
}

/// Writes every schema of the catalog under `dir`; returns the paths written.
/// Schemas of other versions already in `dir` stay: they are the contracts
/// of events already published.
pub fn write_all(catalog: &Catalog, dir: &Path) -> Result<Vec<PathBuf>, SchemaError> {
    let mut written = Vec::new();
    for (rel, text) in files(catalog) {
        let path = dir.join(&rel);
        let io = |source| SchemaError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path.parent().expect("a parent")).map_err(io)?;
        std::fs::write(&path, text).map_err(io)?;
        written.push(path);
    }
    Ok(written)
}

/// A version `MAJOR.MINOR.PATCH` (the catalog checked its form).
fn version_parts(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.').map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next()??))
}

/// A field of a stored data schema: its JSON type.
fn stored_fields(schema: &Value) -> BTreeMap<String, String> {
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    required
        .into_iter()
        .map(|f| {
            let ty = schema["properties"][f]["type"]
                .as_str()
                .unwrap_or("any")
                .to_string();
            (f.to_string(), ty)
        })
        .collect()
}

/// Compares the catalog with the schemas stored in `dir` (as `catalog
/// schema` wrote them): every problem, each naming the event, the versions,
/// the field and the fix. Within one major version a new version must keep
/// every field of every earlier one, with the same type; a version already
/// stored must not change at all; a version must not go backwards.
pub fn check_compatibility(catalog: &Catalog, dir: &Path) -> Result<(), SchemaError> {
    let mut problems = Vec::new();
    for def in catalog.events.values() {
        let type_dir = dir.join(&def.event_type);
        let Ok(entries) = std::fs::read_dir(&type_dir) else {
            continue; // a new event type: nothing published to break
        };
        let Some(current) = version_parts(&def.schema_version) else {
            continue;
        };
        let new_schema = data_schema(def);
        let new_fields = stored_fields(&new_schema);
        let mut versions: Vec<(u64, u64, u64, String)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                version_parts(&name).map(|(a, b, c)| (a, b, c, name))
            })
            .collect();
        versions.sort();
        for (major, minor, patch, name) in versions {
            let path = type_dir.join(&name).join(DATA_FILE);
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(source) => return Err(SchemaError::Io { path, source }),
            };
            let stored: Value = serde_json::from_str(&text).map_err(|e| SchemaError::Parse {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let event = &def.event_type;
            let version = &def.schema_version;
            if (major, minor, patch) == current {
                if stored != new_schema {
                    problems.push(format!(
                        "event `{event}`: the catalog changed schema version {version}, which is \
                         already published ({}); a published version never changes: give the \
                         change a new schema_version (a minor bump when it only adds fields, a \
                         major bump otherwise) and run `outbox-relay catalog schema`",
                        path.display()
                    ));
                }
                continue;
            }
            if major != current.0 {
                continue; // another major version: free to differ
            }
            if (major, minor, patch) > current {
                problems.push(format!(
                    "event `{event}`: schema_version {version} is older than the published \
                     {name} ({}); versions only go up: use a version above {name}",
                    path.display()
                ));
                continue;
            }
            for (field, ty) in stored_fields(&stored) {
                match new_fields.get(&field) {
                    None => problems.push(format!(
                        "event `{event}`: schema_version {version} drops field `{field}` that \
                         {name} requires ({}); consumers of {major}.x read it: keep the field, \
                         or make this version {}.0.0",
                        path.display(),
                        major + 1
                    )),
                    Some(new_ty) if *new_ty != ty => problems.push(format!(
                        "event `{event}`: schema_version {version} changes field `{field}` from \
                         {ty} to {new_ty} ({name}: {}); consumers of {major}.x decode it as {ty}: \
                         keep the type, or make this version {}.0.0",
                        path.display(),
                        major + 1
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(SchemaError::Incompatible(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> (PathBuf, String) {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/catalog/kernel.toml"
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        (path, text)
    }

    fn catalog_with(edit: impl Fn(String) -> String) -> Catalog {
        let (path, text) = kernel();
        Catalog::from_sources(&[(path, edit(text))]).unwrap()
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("schema-{}", crate::ids::new_event_id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The money.wallet.credited block of kernel.toml, edited.
    fn edit_credited(text: String, from: &str, to: &str) -> String {
        let start = text.find("type = \"money.wallet.credited\"").unwrap();
        let end = start + text[start..].find("[[events]]").unwrap();
        let block = text[start..end].replacen(from, to, 1);
        assert_ne!(block, text[start..end], "{from} not in the block");
        format!("{}{block}{}", &text[..start], &text[end..])
    }

    #[test]
    fn every_event_has_a_data_and_an_envelope_schema() {
        let c = catalog_with(|t| t);
        let files = files(&c);
        assert_eq!(files.len(), 2 * c.events.len());
        let data: Value = serde_json::from_str(
            &files[&PathBuf::from("money.wallet.credited/1.0.0/data.schema.json")],
        )
        .unwrap();
        assert_eq!(data["$schema"], DIALECT);
        assert_eq!(
            data["$id"],
            "urn:outbox-relay:schema:money.wallet.credited:1.0.0"
        );
        assert_eq!(
            data["required"],
            json!(["txId", "userId", "amountCents", "currency"])
        );
        assert_eq!(
            data["properties"]["amountCents"],
            json!({"type": "integer"})
        );
        assert_eq!(
            data["properties"]["userId"],
            json!({"type": "string", "pattern": "\\S"})
        );
        let env: Value = serde_json::from_str(
            &files[&PathBuf::from("money.wallet.credited/1.0.0/envelope.schema.json")],
        )
        .unwrap();
        assert_eq!(env["properties"]["source"]["const"], "money");
        assert_eq!(env["properties"]["dataschema"]["const"], data["$id"]);
        assert_eq!(env["properties"]["data"]["required"], data["required"]);
    }

    #[test]
    fn compatible_changes_pass_and_breaking_ones_name_the_field_and_fix() {
        let dir = temp_dir();
        write_all(&catalog_with(|t| t), &dir).unwrap();
        check_compatibility(&catalog_with(|t| t), &dir).unwrap();

        // A new optional-for-consumers field in a minor version: compatible.
        let added = catalog_with(|t| {
            let t = edit_credited(
                t,
                "schema_version = \"1.0.0\"",
                "schema_version = \"1.1.0\"",
            );
            edit_credited(
                t,
                "currency = \"string\"",
                "currency = \"string\"\nnote = \"string\"",
            )
        });
        check_compatibility(&added, &dir).unwrap();

        // The same version, changed.
        let err = check_compatibility(
            &catalog_with(|t| {
                edit_credited(
                    t,
                    "currency = \"string\"",
                    "currency = \"string\"\nnote = \"string\"",
                )
            }),
            &dir,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("event `money.wallet.credited`: the catalog changed schema version 1.0.0, which is already published"),
            "{err}"
        );

        // A field dropped, or its type changed, in a minor version.
        let dropped = catalog_with(|t| {
            let t = edit_credited(
                t,
                "schema_version = \"1.0.0\"",
                "schema_version = \"1.1.0\"",
            );
            edit_credited(t, "currency = \"string\"\n", "")
        });
        let err = check_compatibility(&dropped, &dir).unwrap_err().to_string();
        assert!(
            err.contains("schema_version 1.1.0 drops field `currency` that 1.0.0 requires")
                && err.contains("make this version 2.0.0"),
            "{err}"
        );
        let retyped = catalog_with(|t| {
            let t = edit_credited(
                t,
                "schema_version = \"1.0.0\"",
                "schema_version = \"1.1.0\"",
            );
            edit_credited(t, "amountCents = \"integer\"", "amountCents = \"number\"")
        });
        let err = check_compatibility(&retyped, &dir).unwrap_err().to_string();
        assert!(
            err.contains("changes field `amountCents` from integer to number"),
            "{err}"
        );

        // The same break in a new major version is fine.
        let major = catalog_with(|t| {
            let t = edit_credited(
                t,
                "schema_version = \"1.0.0\"",
                "schema_version = \"2.0.0\"",
            );
            edit_credited(t, "currency = \"string\"\n", "")
        });
        check_compatibility(&major, &dir).unwrap();

        // Once 1.1.0 is published, 1.0.1 is going backwards.
        write_all(&added, &dir).unwrap();
        let back = catalog_with(|t| {
            edit_credited(
                t,
                "schema_version = \"1.0.0\"",
                "schema_version = \"1.0.1\"",
            )
        });
        let err = check_compatibility(&back, &dir).unwrap_err().to_string();
        assert!(
            err.contains("schema_version 1.0.1 is older than the published 1.1.0"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
