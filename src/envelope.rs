//! Turns a claimed outbox row into a Kafka record (topic, key, envelope
//! JSON, headers), or into the reason it can never be one. The envelope's
//! definition, shared with consumers, is [`outbox_model::envelope`].

use std::sync::Arc;

use chrono::{DateTime, Utc};
use outbox_model::envelope::{headers as h, EnvelopeFields, TraceContext};
use rdkafka::message::{Header, OwnedHeaders};
use serde_json::value::RawValue;
use serde_json::Value;

pub use outbox_model::envelope::{format_time, CE_SPECVERSION};

use crate::catalog::{not_an_object, Catalog, EventDef, JsonKind};
use crate::sql::OutboxRow;
use outbox_model::DlqReason;

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
    /// The envelope JSON; emptied once the producer has its own copy.
    pub value: Vec<u8>,
    /// Taken by the producer when the record is queued.
    pub headers: Option<OwnedHeaders>,
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

/// The payload's top-level fields. Normally raw JSON texts, without building
/// values: the checks need only each field's kind, and the envelope carries
/// the payload text unchanged. A payload whose keys use escape sequences
/// (which cannot be borrowed) is parsed in full instead.
enum Fields<'a> {
    Raw(std::collections::BTreeMap<&'a str, &'a RawValue>),
    Parsed(serde_json::Map<String, Value>),
}

impl<'a> Fields<'a> {
    fn parse(payload: &'a str) -> Result<Fields<'a>, Rejected> {
        if let Ok(raw) = serde_json::from_str(payload) {
            return Ok(Fields::Raw(raw));
        }
        match serde_json::from_str::<Value>(payload) {
            Ok(Value::Object(map)) => Ok(Fields::Parsed(map)),
            Ok(other) => Err(reject(
                DlqReason::InvalidPayload,
                not_an_object(JsonKind::of(&other)).to_string(),
            )),
            Err(e) => Err(reject(
                DlqReason::InvalidPayload,
                format!("$: payload is not valid JSON: {e}"),
            )),
        }
    }

    fn kind(&self, field: &str) -> Option<JsonKind> {
        match self {
            Fields::Raw(m) => m.get(field).map(|raw| JsonKind::of_raw(raw.get())),
            Fields::Parsed(m) => m.get(field).map(JsonKind::of),
        }
    }

    fn string(&self, field: &str) -> Option<String> {
        match self {
            Fields::Raw(m) => m
                .get(field)
                .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok()),
            Fields::Parsed(m) => m.get(field).and_then(Value::as_str).map(str::to_owned),
        }
    }

    /// The JSON text of an integer field.
    fn integer_text(&self, field: &str) -> Option<String> {
        match self {
            Fields::Raw(m) => m.get(field).map(|raw| raw.get().to_string()),
            Fields::Parsed(m) => m.get(field).map(Value::to_string),
        }
    }
}

/// The deepest nesting of objects and arrays a payload may have. PostgreSQL
/// stores far deeper documents, but decoders do not read them back: the
/// consumer kit's serde_json stops at 128 levels (the envelope adds one),
/// and other languages' defaults are lower still.
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// The JSON contract between the relay and every consumer: whatever is
/// published decodes without loss. jsonb keeps numbers as exact decimals of
/// any size and nesting of any depth; a consumer decodes numbers into 64-bit
/// integers or IEEE 754 doubles. A payload that nests deeper than
/// [`MAX_PAYLOAD_DEPTH`] or holds a number neither can represent exactly
/// (`1e400`, a 30-digit integer, more decimal digits than a double keeps)
/// is refused with a message naming it. `payload` is valid JSON (PostgreSQL
/// printed it, [`Fields::parse`] read it), so one pass over its bytes
/// suffices.
fn check_portable(payload: &str) -> Result<(), String> {
    let b = payload.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_PAYLOAD_DEPTH {
                    return Err(format!(
                        "$: payload nests deeper than {MAX_PAYLOAD_DEPTH} levels of objects and arrays, \
                         which consumers' JSON decoders refuse; flatten it"
                    ));
                }
            }
            b'}' | b']' => depth -= 1,
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < b.len() && matches!(b[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                check_number(&payload[start..i])?;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// A JSON number decodes without loss when it is a 64-bit integer, or when
/// the nearest double prints back as the same decimal value.
fn check_number(token: &str) -> Result<(), String> {
    let integer = !token.contains(['.', 'e', 'E']);
    if integer && (token.parse::<i64>().is_ok() || token.parse::<u64>().is_ok()) {
        return Ok(());
    }
    let shown = if token.len() > 40 {
        format!("{}… ({} characters)", &token[..40], token.len())
    } else {
        token.to_string()
    };
    let x: f64 = token.parse().unwrap_or(f64::NAN);
    if !x.is_finite() {
        return Err(format!(
            "$: number {shown} is beyond the range of a double and of a 64-bit integer, \
             so consumers cannot decode it; send it as a string"
        ));
    }
    if decimal(token) != decimal(&format!("{x:e}")) {
        return Err(format!(
            "$: number {shown} would change when decoded (it is neither a 64-bit integer nor exactly \
             a double, which keeps about 15 significant digits); send it as a string"
        ));
    }
    Ok(())
}

/// A decimal number as (negative, significant digits, power of ten), so
/// that `0.10`, `1e-1` and `.1e0` compare equal. Zero has no digits.
fn decimal(token: &str) -> (bool, String, i64) {
    let (negative, unsigned) = match token.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, token),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (
            &unsigned[..at],
            unsigned[at + 1..].parse::<i64>().unwrap_or(0),
        ),
        None => (unsigned, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let significant = digits.trim_end_matches('0');
    if significant.is_empty() {
        return (false, String::new(), 0);
    }
    let power = exponent - frac.len() as i64 + (digits.len() - significant.len()) as i64;
    (negative, significant.to_string(), power)
}

/// The partition key: the catalog's key field of the payload, as a string.
fn partition_key(def: &EventDef, fields: &Fields<'_>) -> Result<String, Rejected> {
    let field = &def.partition_key;
    let kind = fields.kind(field);
    match kind {
        Some(JsonKind::String) => match fields.string(field) {
            Some(s) if !s.trim().is_empty() => Ok(s),
            _ => Err(reject(
                DlqReason::MissingPartitionKey,
                format!("partition key $.{field} is empty"),
            )),
        },
        // Integers only: a float's text form is not stable across writers
        // (1.0 vs 1), and the key decides the partition.
        Some(JsonKind::Integer) => Ok(fields.integer_text(field).unwrap_or_default()),
        Some(other) => Err(reject(
            DlqReason::MissingPartitionKey,
            format!(
                "partition key $.{field} must be a non-empty string or integer, found {}",
                match other {
                    JsonKind::Float => "non-integer number",
                    other => other.name(),
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
    // The message holds the payload verbatim: a payload over the limit by
    // itself is refused before megabytes of it are parsed.
    if row.payload.len() + RECORD_OVERHEAD > max_message_bytes {
        return Err(reject(
            DlqReason::MessageTooLarge,
            format!(
                "the payload alone is {} bytes; the limit (kafka.max_message_bytes) is {max_message_bytes}",
                row.payload.len()
            ),
        ));
    }
    let fields = Fields::parse(&row.payload)?;
    check_portable(&row.payload).map_err(|e| reject(DlqReason::InvalidPayload, e))?;
    let key = partition_key(def, &fields)?;
    def.check_fields(|field| fields.kind(field))
        .map_err(|e| reject(DlqReason::InvalidPayload, e.to_string()))?;

    let row_headers: TraceContext = match &row.headers {
        Some(text) => serde_json::from_str(text).unwrap_or_default(),
        None => TraceContext::default(),
    };
    let payload_tenant = match row.tenant_id {
        Some(_) => None,
        None => fields.string("tenantId"),
    };
    let tenant_id = row.tenant_id.as_deref().or(payload_tenant.as_deref());
    let occurred_at = format_time(row.occurred_at);
    let envelope = EnvelopeFields {
        id: &row.event_id,
        event_type: &row.event_type,
        source: &def.publisher,
        schema_version: &def.schema_version,
        dataschema: &def.dataschema,
        tenant_id,
        occurred_at: &occurred_at,
        correlation_id: row_headers.correlation_id.as_deref(),
        causation_id: row_headers.causation_id.as_deref(),
    };
    let mut value = Vec::with_capacity(row.payload.len() + 256);
    envelope.write(&mut value, &row.payload);

    // Built straight into librdkafka's header list from borrowed values.
    let mut headers = OwnedHeaders::new_with_capacity(12);
    let mut header_bytes = 0;
    macro_rules! add {
        ($name:expr, $value:expr) => {{
            let (name, value): (&str, &str) = ($name, $value);
            header_bytes += name.len() + value.len();
            headers = headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }};
    }
    add!(h::SPECVERSION, CE_SPECVERSION);
    add!(h::ID, &row.event_id);
    add!(h::TYPE, &row.event_type);
    add!(h::SOURCE, &def.publisher);
    add!(h::TIME, &occurred_at);
    add!(h::SCHEMAVERSION, &def.schema_version);
    add!(h::DATASCHEMA, &def.dataschema);
    add!(h::CONTENT_TYPE, "application/json");
    if let Some(t) = tenant_id {
        add!(h::TENANTID, t);
    }
    if let Some(v) = &row_headers.traceparent {
        add!(h::TRACEPARENT, v);
    }
    if let Some(v) = &row_headers.tracestate {
        add!(h::TRACESTATE, v);
    }
    if let Some(v) = &row_headers.correlation_id {
        add!(h::CORRELATIONID, v);
    }
    if let Some(v) = &row_headers.causation_id {
        add!(h::CAUSATIONID, v);
    }

    let size = value.len() + key.len() + header_bytes + RECORD_OVERHEAD;
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
        topic: outbox_consumer::kafka::prefixed(topic_prefix, &def.topic),
        key,
        value,
        headers: Some(headers),
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
            bytes: 0,
            available_at: DateTime::parse_from_rfc3339("2026-11-29T10:00:00.123456Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    fn header_map(p: &Prepared) -> std::collections::HashMap<String, String> {
        use rdkafka::message::Headers;
        p.headers
            .as_ref()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h.key.to_string(),
                    String::from_utf8(h.value.unwrap().to_vec()).unwrap(),
                )
            })
            .collect()
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
                "dataschema": "urn:outbox-relay:schema:money.wallet.credited:1.0.0",
                "tenantId": "tenant-a",
                "occurredAt": "2026-11-29T10:00:00.123Z",
                "data": credited(),
                "correlationId": "c-1"
            })
        );
        let h = header_map(&p);
        assert_eq!(h["ce_id"], "01j9pa5mz70000000000000000");
        assert_eq!(h["ce_type"], "money.wallet.credited");
        assert_eq!(h["ce_tenantid"], "tenant-a");
        assert_eq!(
            h["ce_dataschema"],
            "urn:outbox-relay:schema:money.wallet.credited:1.0.0"
        );
        assert_eq!(
            h["traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
    }

    #[test]
    fn data_is_the_payload_text_byte_for_byte_and_strings_are_escaped() {
        let mut r = row("money.wallet.credited", credited());
        // As PostgreSQL prints jsonb: spaces after separators, numbers as
        // written, non-ASCII unescaped.
        r.payload = r#"{"txId": "t1", "userId": "u1", "amountCents": 100, "currency": "USD", "rate": 1.50, "note": "caf\u00e9 \"x\" ü"}"#.into();
        r.tenant_id = Some("t\"1\\\n".into());
        r.headers = Some(json!({"correlationId": "c\u{1}", "causationId": "k"}).to_string());
        let p = prepare(&r, &catalog(), "", 1_000_000).unwrap();
        let text = std::str::from_utf8(&p.value).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"id":"01j9pa5mz70000000000000000","type":"money.wallet.credited","#,
                r#""source":"money","schemaVersion":"1.0.0","#,
                r#""dataschema":"urn:outbox-relay:schema:money.wallet.credited:1.0.0","#,
                r#""tenantId":"t\"1\\\n","#,
                r#""occurredAt":"2026-11-29T10:00:00.123Z","#,
                r#""data":{"txId": "t1", "userId": "u1", "amountCents": 100, "currency": "USD", "rate": 1.50, "note": "caf\u00e9 \"x\" ü"},"#,
                r#""correlationId":"c\u0001","causationId":"k"}"#
            )
        );
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["tenantId"], "t\"1\\\n");
        assert_eq!(v["data"]["note"], "café \"x\" ü");
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
        assert!(
            e.message.starts_with("serialized message is"),
            "{}",
            e.message
        );

        // A payload over the limit by itself is refused unparsed.
        let mut r = row("money.wallet.credited", credited());
        r.payload = format!("{{\"x\": \"{}", "y".repeat(5000));
        let e = prepare(&r, &c, "", 4096).unwrap_err();
        assert_eq!(e.reason, DlqReason::MessageTooLarge);
        assert!(
            e.message.starts_with("the payload alone is 5007 bytes"),
            "{}",
            e.message
        );
    }

    #[test]
    fn escaped_field_names_and_number_kinds_are_checked_like_plain_ones() {
        let c = catalog();
        // An extra field whose name needs an escape: valid JSON, accepted.
        let mut r = row("money.wallet.credited", credited());
        r.payload =
            r#"{"txId": "t", "userId": "u\u00e9", "amountCents": 5, "currency": "USD", "a\"b": 1}"#
                .into();
        let p = prepare(&r, &c, "", 1_000_000).unwrap();
        assert_eq!(p.key, "u\u{e9}");
        let v: Value = serde_json::from_slice(&p.value).unwrap();
        assert_eq!(v["data"]["a\"b"], 1);

        let mut r = row("files.file.uploaded", json!({}));
        r.publisher = Some("file-storage".into());
        r.payload =
            json!({"fileId": 4.5, "userId": "u", "bucket": "b", "key": "k", "size": 1}).to_string();
        let e = prepare(&r, &c, "", 1_000_000).unwrap_err();
        assert_eq!(e.reason, DlqReason::MissingPartitionKey);
        assert!(e.message.contains("non-integer number"), "{}", e.message);
        r.payload = json!({"fileId": "f", "userId": "u", "bucket": "b", "key": "k", "size": 1.5})
            .to_string();
        let e = prepare(&r, &c, "", 1_000_000).unwrap_err();
        assert_eq!(e.message, "$.size: expected integer, found number");
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

    /// What the relay publishes, the consumer kit decodes to the same value;
    /// what it could not, is refused before publishing.
    #[test]
    fn only_payloads_that_decode_without_loss_are_published() {
        let c = catalog();
        let with = |extra: &str| {
            let mut r = row("money.wallet.credited", credited());
            r.payload = format!(
                r#"{{"txId": "t", "userId": "u", "amountCents": 5, "currency": "USD", "x": {extra}}}"#
            );
            prepare(&r, &c, "", 10_000_000)
        };
        for ok in [
            "0",
            "-0",
            "9223372036854775807",
            "-9223372036854775808",
            "18446744073709551615",
            "0.1",
            "1.50",
            "-2.5e-3",
            "1e20",
            "100000000000000000000",
            "1.7976931348623157e308",
            "3.141592653589793",
            r#""1e400 in a string""#,
            r#"[[[{"a": [1, 2.25]}]]]"#,
        ] {
            let p = with(ok).unwrap_or_else(|e| panic!("{ok}: {}", e.message));
            let decoded: outbox_model::envelope::Event = serde_json::from_slice(&p.value).unwrap();
            let original: Value = serde_json::from_str(ok).unwrap();
            assert_eq!(decoded.data["x"], original, "{ok}");
        }
        let big = format!("1{}", "0".repeat(400));
        for (bad, says) in [
            (big.as_str(), "beyond the range"),
            ("1e400", "beyond the range"),
            ("123456789012345678901234567890", "would change"),
            ("3.14159265358979323846", "would change"),
            ("1e-400", "would change"),
        ] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.reason, DlqReason::InvalidPayload, "{bad}");
            assert!(e.message.contains(says), "{bad}: {}", e.message);
            assert!(e.message.contains("send it as a string"), "{}", e.message);
        }
        assert!(with(&big).unwrap_err().message.contains("(401 characters)"));

        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(with(&deep(MAX_PAYLOAD_DEPTH - 1)).is_ok());
        let e = with(&deep(MAX_PAYLOAD_DEPTH)).unwrap_err();
        assert_eq!(e.reason, DlqReason::InvalidPayload);
        assert!(e.message.contains("deeper than 64 levels"), "{}", e.message);
        // Brackets and digits inside strings are text, not structure.
        let quoted = format!(r#""{}\" 1e400 {}""#, "[".repeat(200), "{".repeat(200));
        assert!(with(&quoted).is_ok());
    }
}
