//! The Event Model envelope, both ways: [`EnvelopeFields::write`] is how the
//! relay encodes it, [`Event`] is how consumers decode it, and the test at
//! the bottom keeps the two in step.
//!
//! Value: `{"id","type","source","schemaVersion","dataschema","tenantId","occurredAt","data"}`
//! plus `correlationId` / `causationId` when the row carries them. Headers
//! follow the CloudEvents Kafka binding (`ce_*`, names in [`headers`]) and
//! W3C trace context.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// CloudEvents spec version announced in `ce_specversion`.
pub const CE_SPECVERSION: &str = "1.0";

/// Kafka header names the relay sets on every record (the optional ones
/// only when the row carries the value).
pub mod headers {
    pub const SPECVERSION: &str = "ce_specversion";
    pub const ID: &str = "ce_id";
    pub const TYPE: &str = "ce_type";
    pub const SOURCE: &str = "ce_source";
    pub const TIME: &str = "ce_time";
    pub const SCHEMAVERSION: &str = "ce_schemaversion";
    pub const DATASCHEMA: &str = "ce_dataschema";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const TENANTID: &str = "ce_tenantid";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    pub const CORRELATIONID: &str = "ce_correlationid";
    pub const CAUSATIONID: &str = "ce_causationid";
}

/// Trace and correlation context: what a writer stores in the row's
/// `headers` column, and what the relay carries to Kafka headers and the
/// envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
}

/// RFC 3339, UTC, milliseconds: `2026-11-29T13:14:48.123Z`.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A decoded Event Model envelope, as the relay produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The catalog publisher that wrote it (checked against the catalog).
    pub source: String,
    pub schema_version: String,
    pub tenant_id: Option<String>,
    pub occurred_at: DateTime<Utc>,
    pub data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// Where the message was read from; not part of the envelope.
    #[serde(skip)]
    pub delivery: Delivery,
}

/// Kafka coordinates of a delivered event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivery {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl Event {
    /// The payload as a typed struct, e.g. the writer library's `UserCreated`.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.data)
    }
}

/// The envelope's fields besides `data`, borrowed, for encoding.
#[derive(Debug, Clone, Copy)]
pub struct EnvelopeFields<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub source: &'a str,
    pub schema_version: &'a str,
    pub dataschema: &'a str,
    pub tenant_id: Option<&'a str>,
    /// Already formatted with [`format_time`].
    pub occurred_at: &'a str,
    pub correlation_id: Option<&'a str>,
    pub causation_id: Option<&'a str>,
}

/// Whitespace JSON allows around a value.
const JSON_WHITESPACE: &[char] = &[' ', '\t', '\n', '\r'];

impl EnvelopeFields<'_> {
    /// Writes the envelope JSON with `payload` (already checked to be a JSON
    /// object) as `data`, byte for byte: parsing the payload a second time
    /// to embed it would cost as much as the checks did.
    pub fn write(&self, out: &mut Vec<u8>, payload: &str) {
        fn field(out: &mut Vec<u8>, name: &str, value: Option<&str>) {
            out.extend_from_slice(name.as_bytes());
            serde_json::to_writer(&mut *out, &value).expect("writing to a Vec cannot fail");
        }
        field(out, "{\"id\":", Some(self.id));
        field(out, ",\"type\":", Some(self.event_type));
        field(out, ",\"source\":", Some(self.source));
        field(out, ",\"schemaVersion\":", Some(self.schema_version));
        field(out, ",\"dataschema\":", Some(self.dataschema));
        field(out, ",\"tenantId\":", self.tenant_id);
        field(out, ",\"occurredAt\":", Some(self.occurred_at));
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(payload.trim_matches(JSON_WHITESPACE).as_bytes());
        if let Some(v) = self.correlation_id {
            field(out, ",\"correlationId\":", Some(v));
        }
        if let Some(v) = self.causation_id {
            field(out, ",\"causationId\":", Some(v));
        }
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_the_relay_writes_consumers_decode_field_for_field() {
        let occurred = DateTime::parse_from_rfc3339("2026-11-29T10:00:00.123Z")
            .unwrap()
            .with_timezone(&Utc);
        let time = format_time(occurred);
        assert_eq!(time, "2026-11-29T10:00:00.123Z");
        for (tenant, correlation, causation) in [
            (None, None, None),
            (Some("t-\"1\""), Some("c-1"), Some("e-0")),
        ] {
            let fields = EnvelopeFields {
                id: "01j9pa5mz70000000000000000",
                event_type: "money.wallet.credited",
                source: "money",
                schema_version: "1.0.0",
                dataschema: "urn:outbox-relay:schema:money.wallet.credited:1.0.0",
                tenant_id: tenant,
                occurred_at: &time,
                correlation_id: correlation,
                causation_id: causation,
            };
            let mut out = Vec::new();
            fields.write(&mut out, " {\"txId\": \"tx-1\", \"amountCents\": 5}\n");
            let event: Event = serde_json::from_slice(&out).unwrap();
            assert_eq!(
                event,
                Event {
                    id: fields.id.into(),
                    event_type: fields.event_type.into(),
                    source: fields.source.into(),
                    schema_version: fields.schema_version.into(),
                    tenant_id: tenant.map(Into::into),
                    occurred_at: occurred,
                    data: json!({"txId": "tx-1", "amountCents": 5}),
                    correlation_id: correlation.map(Into::into),
                    causation_id: causation.map(Into::into),
                    delivery: Delivery::default(),
                }
            );
            let raw: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(raw["dataschema"], fields.dataschema);
        }
    }

    #[test]
    fn a_trace_context_round_trips_and_omits_what_is_absent() {
        let c = TraceContext {
            correlation_id: Some("c-1".into()),
            ..TraceContext::default()
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(text, r#"{"correlationId":"c-1"}"#);
        assert_eq!(serde_json::from_str::<TraceContext>(&text).unwrap(), c);
        assert_eq!(
            serde_json::from_str::<TraceContext>("{}").unwrap(),
            TraceContext::default()
        );
    }
}
