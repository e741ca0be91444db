//! The Event Model envelope: turns a claimed outbox row into a Kafka record
//! (topic, key, JSON value, headers), or into the reason it can never be one.
//!
//! Value: `{"id","type","source","schemaVersion","tenantId","occurredAt","data"}`
//! plus `correlationId` / `causationId` when the row carries them. Headers
//! follow the CloudEvents Kafka binding (`ce_*`) and W3C trace context.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::catalog::{Catalog, EventDef};
use crate::failure::DlqReason;
use crate::sql::OutboxRow;

/// CloudEvents spec version announced in `ce_specversion`.
pub const CE_SPECVERSION: &str = "1.0";

/// Bytes a record needs beyond key, value and headers (record framing);
/// counted so that the size check before producing errs on the safe side.
const RECORD_OVERHEAD: usize = 128;

/// A row ready to produce.
#[derive(Debug)]
pub struct Prepared {
    pub id: i64,
    pub vpartition: i16,
    pub event_id: String,
    pub def: Arc<EventDef>,
    /// Full Kafka topic name (configured prefix included).
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
    pub occurred_at: DateTime<Utc>,
}

/// A row that can never be published as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub reason: DlqReason,
    pub message: String,
}

fn reject(reason: DlqReason, message: String) -> Rejected {
    Rejected { reason, message }
}

/// Trace and correlation context a writer may put in the row's `headers`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RowHeaders {
    traceparent: Option<String>,
    tracestate: Option<String>,
    correlation_id: Option<String>,
    causation_id: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Envelope<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    source: &'a str,
    schema_version: &'a str,
    tenant_id: Option<&'a str>,
    occurred_at: &'a str,
    data: &'a serde_json::value::RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    correlation_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    causation_id: Option<&'a str>,
}

/// RFC 3339, UTC, milliseconds: `2026-11-29T13:14:48.123Z`.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The partition key: the catalog's key field of the payload, as a string.
fn partition_key(def: &EventDef, payload: &Value) -> Result<String, Rejected> {
    let field = &def.partition_key;
    match payload.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        // Integers only: a float's text form is not stable across writers
        // (1.0 vs 1), and the key decides the partition.
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Some(Value::String(_)) => Err(reject(
            DlqReason::MissingPartitionKey,
            format!("partition key $.{field} is empty"),
        )),
        Some(other) => Err(reject(
            DlqReason::MissingPartitionKey,
            format!(
                "partition key $.{field} must be a non-empty string or integer, found {}",
                match other {
                    Value::Null => "null",
                    Value::Bool(_) => "boolean",
                    Value::Array(_) => "array",
                    Value::Number(_) => "non-integer number",
                    _ => "object",
                }
            ),
        )),
        None => Err(reject(
            DlqReason::MissingPartitionKey,
            format!("partition key $.{field} is missing"),
        )),
    }
}

/// Builds the Kafka record for one row, or says why it can never be one.
pub fn prepare(
    row: &OutboxRow,
    catalog: &Catalog,
    topic_prefix: &str,
    max_message_bytes: usize,
) -> Result<Prepared, Rejected> {
    let Some(def) = catalog.get(&row.event_type) else {
        return Err(reject(
            DlqReason::UnknownEventType,
            format!(
                "event type {} is not in the event catalog; declare it in a catalog file, then replay",
                row.event_type
            ),
        ));
    };
    if row.publisher.as_deref() != Some(def.publisher.as_str()) {
        return Err(reject(
            DlqReason::ForbiddenPublisher,
            format!(
                "403 Forbidden: publisher {} may not publish {} (the catalog allows only {})",
                row.publisher
                    .as_deref()
                    .unwrap_or("(none: the row bypassed the publisher trigger)"),
                row.event_type,
                def.publisher
            ),
        ));
    }
    let payload: Value = serde_json::from_str(&row.payload).map_err(|e| {
        reject(
            DlqReason::InvalidPayload,
            format!("$: payload is not valid JSON: {e}"),
        )
    })?;
    if !payload.is_object() {
        // Same message as validate_payload, before the key lookup below
        // would misreport a non-object payload as a missing key.
        let err = def.validate_payload(&payload).unwrap_err();
        return Err(reject(DlqReason::InvalidPayload, err.to_string()));
    }
    let key = partition_key(def, &payload)?;
    def.validate_payload(&payload)
        .map_err(|e| reject(DlqReason::InvalidPayload, e.to_string()))?;

    let row_headers: RowHeaders = match &row.headers {
        Some(text) => serde_json::from_str(text).unwrap_or_default(),
        None => RowHeaders::default(),
    };
    let tenant_id = row
        .tenant_id
        .as_deref()
        .or_else(|| payload.get("tenantId").and_then(Value::as_str));
    let occurred_at = format_time(row.occurred_at);
    let data: &serde_json::value::RawValue = serde_json::from_str(&row.payload).map_err(|e| {
        reject(
            DlqReason::InvalidPayload,
            format!("$: payload is not valid JSON: {e}"),
        )
    })?;
    let envelope = Envelope {
        id: &row.event_id,
        event_type: &row.event_type,
        source: &def.publisher,
        schema_version: &def.schema_version,
        tenant_id,
        occurred_at: &occurred_at,
        data,
        correlation_id: row_headers.correlation_id.as_deref(),
        causation_id: row_headers.causation_id.as_deref(),
    };
    let mut value = Vec::with_capacity(row.payload.len() + 256);
    serde_json::to_writer(&mut value, &envelope).expect("serializing to a Vec cannot fail");

    let mut headers: Vec<(&'static str, String)> = vec![
        ("ce_specversion", CE_SPECVERSION.to_string()),
        ("ce_id", row.event_id.clone()),
        ("ce_type", row.event_type.clone()),
        ("ce_source", def.publisher.clone()),
        ("ce_time", occurred_at.clone()),
        ("ce_schemaversion", def.schema_version.clone()),
        ("content-type", "application/json".to_string()),
    ];
    if let Some(t) = tenant_id {
        headers.push(("ce_tenantid", t.to_string()));
    }
    if let Some(v) = row_headers.traceparent {
        headers.push(("traceparent", v));
    }
    if let Some(v) = row_headers.tracestate {
        headers.push(("tracestate", v));
    }
    if let Some(v) = row_headers.correlation_id {
        headers.push(("ce_correlationid", v));
    }
    if let Some(v) = row_headers.causation_id {
        headers.push(("ce_causationid", v));
    }

    let size = value.len()
        + key.len()
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + RECORD_OVERHEAD;
    if size > max_message_bytes {
        return Err(reject(
            DlqReason::MessageTooLarge,
            format!(
                "serialized message is {size} bytes; the limit (kafka.max_message_bytes) is {max_message_bytes}"
            ),
        ));
    }
    Ok(Prepared {
        id: row.id,
        vpartition: row.vpartition,
        event_id: row.event_id.clone(),
        def: def.clone(),
        topic: format!("{topic_prefix}{}", def.topic),
        key,
        value,
        headers,
        occurred_at: row.occurred_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    fn catalog() -> Catalog {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/catalog/kernel.toml"
        ));
        Catalog::load(&[path]).unwrap()
    }

    fn row(event_type: &str, payload: Value) -> OutboxRow {
        OutboxRow {
            id: 7,
            event_id: "01j9pa5mz70000000000000000".into(),
            event_type: event_type.into(),
            tenant_id: None,
            payload: payload.to_string(),
            headers: None,
            occurred_at: DateTime::parse_from_rfc3339("2026-11-29T10:00:00.123456Z")
                .unwrap()
                .with_timezone(&Utc),
            attempts: 0,
            publisher: Some("money".into()),
            vpartition: 0,
        }
    }

    fn credited() -> Value {
        json!({"txId": "t1", "userId": "u1", "amountCents": 100, "currency": "USD"})
    }

    #[test]
    fn builds_envelope_key_topic_and_headers() {
        let mut r = row("money.wallet.credited", credited());
        r.tenant_id = Some("tenant-a".into());
        r.headers = Some(
            json!({"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "correlationId": "c-1"})
                .to_string(),
        );
        let p = prepare(&r, &catalog(), "t1.", 1_000_000).unwrap();
        assert_eq!(p.topic, "t1.platform.money.events");
        assert_eq!(p.key, "u1");
        let v: Value = serde_json::from_slice(&p.value).unwrap();
        assert_eq!(
            v,
            json!({
                "id": "01j9pa5mz70000000000000000",
                "type": "money.wallet.credited",
                "source": "money",
                "schemaVersion": "1.0.0",
                "tenantId": "tenant-a",
                "occurredAt": "2026-11-29T10:00:00.123Z",
                "data": credited(),
                "correlationId": "c-1"
            })
        );
        let h: std::collections::HashMap<_, _> = p.headers.iter().cloned().collect();
        assert_eq!(h["ce_id"], "01j9pa5mz70000000000000000");
        assert_eq!(h["ce_type"], "money.wallet.credited");
        assert_eq!(h["ce_tenantid"], "tenant-a");
        assert_eq!(
            h["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
    }

    #[test]
    fn tenant_falls_back_to_payload_then_null() {
        let mut r = row(
            "billing.plan.changed",
            json!({"tenantId": "t-9", "oldPlan": "a", "newPlan": "b"}),
        );
        r.publisher = Some("billing".into());
        let p = prepare(&r, &catalog(), "", 1_000_000).unwrap();
        let v: Value = serde_json::from_slice(&p.value).unwrap();
        assert_eq!(v["tenantId"], "t-9");
        assert_eq!(p.key, "t-9");
        let p = prepare(
            &row("money.wallet.credited", credited()),
            &catalog(),
            "",
            1_000_000,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&p.value).unwrap();
        assert_eq!(v["tenantId"], Value::Null);
    }

    #[test]
    fn permanent_failures_carry_reason_and_field_path() {
        let c = catalog();
        let e = prepare(&row("money.wallet.refunded", credited()), &c, "", 1_000_000).unwrap_err();
        assert_eq!(e.reason, DlqReason::UnknownEventType);

        let mut missing_key = credited();
        missing_key.as_object_mut().unwrap().remove("userId");
        let e = prepare(
            &row("money.wallet.credited", missing_key),
            &c,
            "",
            1_000_000,
        )
        .unwrap_err();
        assert_eq!(e.reason, DlqReason::MissingPartitionKey);
        assert_eq!(e.message, "partition key $.userId is missing");

        let mut empty_key = credited();
        empty_key["userId"] = json!("");
        let e = prepare(&row("money.wallet.credited", empty_key), &c, "", 1_000_000).unwrap_err();
        assert_eq!(e.reason, DlqReason::MissingPartitionKey);

        let mut bad_type = credited();
        bad_type["amountCents"] = json!("100");
        let e = prepare(&row("money.wallet.credited", bad_type), &c, "", 1_000_000).unwrap_err();
        assert_eq!(e.reason, DlqReason::InvalidPayload);
        assert_eq!(e.message, "$.amountCents: expected integer, found string");

        let e = prepare(
            &row("money.wallet.credited", json!("text")),
            &c,
            "",
            1_000_000,
        )
        .unwrap_err();
        assert_eq!(e.reason, DlqReason::InvalidPayload);
        assert!(
            e.message.starts_with("$: payload must be a JSON object"),
            "{}",
            e.message
        );

        let e = prepare(&row("money.wallet.credited", credited()), &c, "", 200).unwrap_err();
        assert_eq!(e.reason, DlqReason::MessageTooLarge);
    }

    #[test]
    fn a_row_from_the_wrong_publisher_is_forbidden() {
        let mut r = row("money.wallet.credited", credited());
        r.publisher = Some("@acme/crm".into());
        let e = prepare(&r, &catalog(), "", 1_000_000).unwrap_err();
        assert_eq!(e.reason, DlqReason::ForbiddenPublisher);
        assert!(e.message.starts_with(
            "403 Forbidden: publisher @acme/crm may not publish money.wallet.credited"
        ));
        r.publisher = None;
        let e = prepare(&r, &catalog(), "", 1_000_000).unwrap_err();
        assert_eq!(e.reason, DlqReason::ForbiddenPublisher);
    }
}
