//! The binary's documented error messages for bad configuration and bad
//! catalogs: each names the offending key or entry and stops start-up.

use crate::common::{relay_command, run};

#[test]
fn unknown_config_key_stops_start_up_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    std::fs::write(&file, "[relay]\nbatch_sise = 10\n").unwrap();
    let (ok, out) = run(relay_command().arg("--config").arg(&file).arg("run"));
    assert!(!ok);
    assert!(out.contains("unknown field: found `batch_sise`"), "{out}");
    assert!(out.contains("relay"), "{out}");
}

#[test]
fn bad_env_value_stops_start_up_naming_the_key() {
    let (ok, out) = run(relay_command()
        .env("OUTBOX_RELAY_KAFKA__COMPRESSION", "brotli")
        .arg("run"));
    assert!(!ok);
    assert!(
        out.contains("configuration key `kafka.compression`: `brotli` is not one of none, gzip, snappy, lz4, zstd"),
        "{out}"
    );
}

#[test]
fn passthrough_may_not_weaken_acks() {
    let (ok, out) = run(relay_command()
        .env("OUTBOX_RELAY_KAFKA__LIBRDKAFKA", "{acks=\"1\"}")
        .arg("run"));
    assert!(!ok);
    assert!(out.contains("kafka.librdkafka.\"acks\""), "{out}");
}

#[test]
fn catalog_list_prints_every_kernel_event() {
    let (ok, out) = run(relay_command().args(["catalog", "list"]));
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 14, "{out}");
    assert!(out.lines().any(|l| l.starts_with("money.wallet.credited")
        && l.contains("money")
        && l.contains("userId")));
}

#[test]
fn catalog_check_accepts_a_module_file_and_names_a_bad_entry() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("crm.toml");
    std::fs::write(
        &good,
        r#"format = 1
version = "1.0.0"
[publishers."@acme/crm"]
name = "CRM module"
kind = "module"
[[events]]
type = "crm.contact.created"
publisher = "@acme/crm"
schema_version = "1.0.0"
partition_key = "contactId"
[events.payload]
contactId = "string"
"#,
    )
    .unwrap();
    let (ok, out) = run(relay_command().args(["catalog", "check"]).arg(&good));
    assert!(ok, "{out}");
    assert!(out.contains("ok: 14 events"), "{out}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&good)
            .unwrap()
            .replace("partition_key = \"contactId\"", "partition_key = \"id\""),
    )
    .unwrap();
    let (ok, out) = run(relay_command().args(["catalog", "check"]).arg(&bad));
    assert!(!ok);
    assert!(
        out.contains("bad.toml: event `crm.contact.created`: partition_key `id` is not among the payload fields (contactId)"),
        "{out}"
    );
}

#[test]
fn an_invalid_catalog_stops_the_relay_before_it_connects() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kernel.toml"),
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/catalog/kernel.toml"
        ))
        .unwrap()
        .replacen("publisher = \"money\"", "publisher = \"iam\"", 1),
    )
    .unwrap();
    let (ok, out) = run(relay_command()
        .env(
            "OUTBOX_RELAY_CATALOG__PATHS",
            format!("[\"{}\"]", dir.path().display()),
        )
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .arg("run"));
    assert!(!ok);
    assert!(
        out.contains("event `money.wallet.credited`: `money.*` events can only be published by `money` (Money Service), not `iam`"),
        "{out}"
    );
}
