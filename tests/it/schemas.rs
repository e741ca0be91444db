//! The event schemas consumers get: `outbox-relay catalog schema` writes one
//! JSON Schema per event type and version (envelope and data), the committed
//! `config/schemas/` is exactly that, every event the relay publishes
//! validates against its schema with an independent validator (Python's
//! `jsonschema`), and `catalog check` refuses a change that breaks the
//! published schemas within a major version.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{example_payload, relay_command, repo, run, TestEnv};
use serde_json::{json, Value};

/// Every file under `dir`, relative, with its contents.
fn tree(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let text = std::fs::read_to_string(&p).unwrap();
                out.push((p.strip_prefix(dir).unwrap().to_path_buf(), text));
            }
        }
    }
    out.sort();
    out
}

fn validate(schemas: &Path, events: &Path, extra: &[&str]) -> (bool, String) {
    run(Command::new("python3")
        .arg(repo("scripts/validate-events.py"))
        .args(extra)
        .arg(schemas)
        .arg(events))
}

#[test]
fn the_committed_schemas_are_what_catalog_schema_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = run(relay_command()
        .args(["catalog", "schema", "--out"])
        .arg(dir.path()));
    assert!(ok, "{out}");
    assert!(out.contains("wrote 26 schemas of 13 events"), "{out}");
    let generated = tree(dir.path());
    assert_eq!(generated.len(), 26);
    let committed = tree(&repo("config/schemas"));
    for (path, text) in &generated {
        let found = committed.iter().find(|(p, _)| p == path);
        assert_eq!(
            found.map(|(_, t)| t),
            Some(text),
            "config/schemas/{} differs from `outbox-relay catalog schema` (run it and commit the result)",
            path.display()
        );
    }
    // Each is a valid draft 2020-12 schema for the independent validator.
    let (ok, out) = run(Command::new("python3").arg("-c").arg(
        "import json,sys,jsonschema\n\
         for p in sys.argv[1:]:\n    jsonschema.Draft202012Validator.check_schema(json.load(open(p)))\n\
         print('checked', len(sys.argv) - 1)",
    ).args(generated.iter().map(|(p, _)| dir.path().join(p))));
    assert!(ok && out.contains("checked 26"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_published_event_validates_against_its_schema() {
    let env = TestEnv::new().await;
    let types: Vec<String> = env.catalog.events.keys().cloned().collect();
    for t in &types {
        env.insert(t, example_payload(t)).await;
    }
    // The optional envelope fields too, and extra payload fields.
    let writer = env.writer("money").await;
    let mut payload = example_payload("money.wallet.credited");
    payload["memo"] = json!({"note": "extra fields are allowed"});
    sqlx::query("INSERT INTO outbox (event_id, event_type, tenant_id, payload, headers) VALUES ($1, $2, $3, $4, $5)")
        .bind(outbox_relay::writer::new_event_id())
        .bind("money.wallet.credited")
        .bind("01j9p3kz5f00000000000000")
        .bind(payload)
        .bind(json!({"correlationId": "c-1", "causationId": "k-1", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}))
        .execute(&writer)
        .await
        .unwrap();
    let r = env.relay().await;
    env.drain(&r).await;
    let n = types.len() + 1;
    let got = env
        .consume(&env.all_topics(), n, Duration::from_secs(30))
        .await;
    assert_eq!(got.len(), n);

    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    let (ok, out) = run(relay_command()
        .args(["catalog", "schema", "--out"])
        .arg(&schemas));
    assert!(ok, "{out}");
    let events = dir.path().join("events.jsonl");
    let lines: Vec<String> = got
        .iter()
        .map(|m| json!({"topic": m.topic, "headers": m.headers, "value": m.value}).to_string())
        .collect();
    std::fs::write(&events, lines.join("\n")).unwrap();
    let (ok, out) = validate(
        &schemas,
        &events,
        &["--require-all", "--min", &n.to_string()],
    );
    assert!(ok, "{out}");
    assert!(out.starts_with(&format!("{n} events valid")), "{out}");
    for m in &got {
        let t = m.value["type"].as_str().unwrap();
        let v = m.value["schemaVersion"].as_str().unwrap();
        let uri = format!("urn:outbox-relay:schema:{t}:{v}");
        assert_eq!(m.value["dataschema"], uri.as_str());
        assert_eq!(m.headers["ce_dataschema"], uri);
    }

    // The validator is not vacuous: a wrong type in data, a missing field,
    // an unknown envelope field and a header that disagrees each fail.
    let base = got
        .iter()
        .find(|m| m.value["type"] == "money.wallet.credited")
        .unwrap();
    let record = |value: Value, headers: &std::collections::HashMap<String, String>| {
        json!({"headers": headers, "value": value}).to_string()
    };
    let mut wrong_type = base.value.clone();
    wrong_type["data"]["amountCents"] = json!("100");
    let mut missing = base.value.clone();
    missing["data"].as_object_mut().unwrap().remove("currency");
    let mut extra = base.value.clone();
    extra["priority"] = json!(1);
    let mut other_header = base.headers.clone();
    other_header.insert(
        "ce_dataschema".into(),
        "urn:outbox-relay:schema:money.wallet.credited:9.0.0".into(),
    );
    for (what, line, says) in [
        (
            "wrong type",
            record(wrong_type, &base.headers),
            "'100' is not of type 'integer'",
        ),
        (
            "missing field",
            record(missing, &base.headers),
            "'currency' is a required property",
        ),
        (
            "unknown envelope field",
            record(extra, &base.headers),
            "priority",
        ),
        (
            "header disagrees",
            record(base.value.clone(), &other_header),
            "differs from the envelope's dataschema",
        ),
    ] {
        std::fs::write(&events, line).unwrap();
        let (ok, out) = validate(&schemas, &events, &[]);
        assert!(!ok, "{what}: {out}");
        assert!(out.contains(says), "{what}: {out}");
    }
}

/// The kernel catalog with money.wallet.credited edited, in a directory of
/// its own; `catalog check` run with it as the catalog.
fn check_edited(edit: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = std::fs::read_to_string(repo("config/catalog/kernel.toml")).unwrap();
    let start = kernel.find("type = \"money.wallet.credited\"").unwrap();
    let end = start + kernel[start..].find("[[events]]").unwrap();
    let mut block = kernel[start..end].to_string();
    for (from, to) in edit {
        assert!(block.contains(from), "{from}");
        block = block.replacen(from, to, 1);
    }
    let file = dir.path().join("kernel.toml");
    std::fs::write(
        &file,
        format!("{}{block}{}", &kernel[..start], &kernel[end..]),
    )
    .unwrap();
    run(relay_command()
        .env(
            "OUTBOX_RELAY_CATALOG__PATHS",
            format!("[\"{}\"]", dir.path().display()),
        )
        .args(["catalog", "check", "--schemas"])
        .arg(repo("config/schemas"))
        .arg(&file))
}

#[test]
fn catalog_check_refuses_a_change_that_breaks_the_published_schemas() {
    let (ok, out) = check_edited(&[]);
    assert!(ok, "{out}");
    assert!(out.contains("schemas compatible with"), "{out}");

    // A field added in a minor version: compatible.
    let (ok, out) = check_edited(&[
        ("schema_version = \"1.0.0\"", "schema_version = \"1.1.0\""),
        (
            "currency = \"string\"",
            "currency = \"string\"\nmemo = \"string\"",
        ),
    ]);
    assert!(ok, "{out}");

    // A field dropped within major version 1.
    let (ok, out) = check_edited(&[
        ("schema_version = \"1.0.0\"", "schema_version = \"1.1.0\""),
        ("currency = \"string\"\n", ""),
    ]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("the catalog's event schemas break the published ones")
            && out.contains("event `money.wallet.credited`: schema_version 1.1.0 drops field `currency` that 1.0.0 requires")
            && out.contains("make this version 2.0.0"),
        "{out}"
    );

    // A type changed without any version change.
    let (ok, out) = check_edited(&[("amountCents = \"integer\"", "amountCents = \"string\"")]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("the catalog changed schema version 1.0.0, which is already published"),
        "{out}"
    );

    // The same break as a new major version: allowed.
    let (ok, out) = check_edited(&[
        ("schema_version = \"1.0.0\"", "schema_version = \"2.0.0\""),
        ("currency = \"string\"\n", ""),
    ]);
    assert!(ok, "{out}");
}
