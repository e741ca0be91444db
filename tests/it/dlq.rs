//! The DLQ's repair, replay report, dead-letter conflicts, dedupe horizon and
//! retention (docs/dlq.md), against real Postgres and Kafka, as the login
//! roles that perform each step in a deployment: the writer writes, the
//! relay relays and dead-letters, the admin repairs, replays and purges, the
//! consumer kit dedupes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use chrono::{DateTime, Datelike, Utc};
use outbox_relay::consumer::{Consumer, ConsumerSettings, Manifest};
use outbox_relay::dlq::RepairError;
use outbox_relay::sql::{self, DlqFilter, Repair};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const FORBIDDEN: &str = "42501";
const INVALID: &str = "22023";

/// A lowercase ULID of the instant `at` (random part from a fresh id).
fn ulid_at(at: DateTime<Utc>) -> String {
    const A: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut ms = at.timestamp_millis() as u64;
    let mut time = [0u8; 10];
    for c in time.iter_mut().rev() {
        *c = A[(ms & 31) as usize];
        ms >>= 5;
    }
    let fresh = outbox_relay::writer::new_event_id();
    format!("{}{}", std::str::from_utf8(&time).unwrap(), &fresh[10..26])
}

/// Inserts an event as the writer role of its publisher, with a chosen id
/// (and, optionally, the time it says it occurred).
async fn write(
    env: &TestEnv,
    event_id: &str,
    event_type: &str,
    payload: Value,
    occurred_at: Option<DateTime<Utc>>,
) {
    let publisher = env.catalog.get(event_type).unwrap().publisher.clone();
    let writer = env.writer(&publisher).await;
    sqlx::query(
        "INSERT INTO outbox (event_id, event_type, payload, occurred_at) \
         VALUES ($1, $2, $3, coalesce($4, now()))",
    )
    .bind(event_id)
    .bind(event_type)
    .bind(payload)
    .bind(occurred_at)
    .execute(&writer)
    .await
    .unwrap();
}

/// What the relay does with a permanent failure: `outbox_dead_letter`, as
/// the relay role.
async fn dead_letter(relay: &PgPool, event_id: &str, reason: &str, error: &str) -> i32 {
    sqlx::query_scalar(
        "SELECT outbox_dead_letter(ARRAY(SELECT id FROM outbox WHERE event_id = $1), ARRAY[$2], ARRAY[$3])",
    )
    .bind(event_id)
    .bind(reason)
    .bind(error)
    .fetch_one(relay)
    .await
    .unwrap()
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Entry {
    state: String,
    reason: String,
    payload: Value,
    last_error: String,
    attempts: i32,
    replay_count: i32,
}

async fn entry(env: &TestEnv, event_id: &str) -> Entry {
    sqlx::query_as(
        "SELECT state, reason, payload, last_error, attempts, replay_count FROM outbox_dlq WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_one(env.admin())
    .await
    .unwrap()
}

fn one(event_id: &str) -> DlqFilter {
    DlqFilter {
        event_id: Some(event_id.to_string()),
        ..Default::default()
    }
}

fn repair(event_id: &str, payload: Value) -> Repair {
    Repair {
        event_id: event_id.to_string(),
        payload,
        why: "amountCents was written as a string by wallet-svc 2.3.1 (INC-4711)".into(),
        tenant_id: None,
        headers: None,
        force: false,
    }
}

/// Steps the relay until the outbox is empty: a publish that timed out on
/// a busy machine is rescheduled, and a plain drain stops at it.
async fn drain_all(env: &TestEnv, relay: &outbox_relay::relay::Relay) {
    let empty = eventually(Duration::from_secs(60), || async {
        env.drain(relay).await;
        env.outbox_count().await == 0
    })
    .await;
    assert!(empty, "the outbox did not drain");
}

/// `outbox-relay …` as the admin role, against this environment.
fn admin_cli(env: &TestEnv, args: &[&str]) -> (bool, String) {
    run(env.admin_command().args(args))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repaired_credit_is_published_once_under_its_id_with_the_original_kept() {
    let env = TestEnv::new().await;
    let relay = env.relay().await;
    // The writer's bug: amountCents as a string. The relay dead-letters it.
    let id = outbox_relay::writer::new_event_id();
    let mut bad = example_payload("money.wallet.credited");
    bad["amountCents"] = json!("10000");
    write(&env, &id, "money.wallet.credited", bad.clone(), None).await;
    env.drain(&relay).await;
    let dead = entry(&env, &id).await;
    assert_eq!(
        (dead.state.as_str(), dead.reason.as_str()),
        ("dead", "invalid_payload")
    );
    let occurred_at: DateTime<Utc> =
        sqlx::query_scalar("SELECT occurred_at FROM outbox_dlq WHERE event_id = $1")
            .bind(&id)
            .fetch_one(env.admin())
            .await
            .unwrap();

    // A repair that is still wrong is refused by the catalog check, naming
    // the field, and changes nothing.
    let mut still_bad = bad.clone();
    still_bad["amountCents"] = json!(100.5);
    let err = outbox_relay::dlq::repair(
        env.admin(),
        &env.catalog,
        &env.settings.kafka,
        &repair(&id, still_bad),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            RepairError::Invalid {
                reason: "invalid_payload",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("$.amountCents: expected integer"),
        "{err}"
    );
    // Through the binary too, with the same message.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("payload.json");
    std::fs::write(
        &file,
        json!({"txId": "t", "amountCents": 1, "currency": "USD"}).to_string(),
    )
    .unwrap();
    let (ok, out) = admin_cli(
        &env,
        &[
            "dlq",
            "repair",
            "--event-id",
            &id,
            "--payload-file",
            file.to_str().unwrap(),
            "--why",
            "x",
        ],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("partition key $.userId is missing"), "{out}");
    assert!(out.contains("Nothing was changed"), "{out}");
    // The database's own checks, for a caller that skips the CLI.
    let mut no_key = example_payload("money.wallet.credited");
    no_key.as_object_mut().unwrap().remove("userId");
    let err = sql::dlq_repair(env.admin(), &repair(&id, no_key))
        .await
        .unwrap_err();
    assert_eq!(
        db_error(&err),
        (
            INVALID.into(),
            "partition key $.userId of the repaired payload must be a non-empty string or integer"
                .into()
        )
    );
    let err = sql::dlq_repair(env.admin(), &repair(&id, json!([1])))
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, INVALID);
    assert_eq!(
        entry(&env, &id).await,
        dead,
        "a refused repair changed the entry"
    );
    assert!(sql::dlq_revisions(env.admin(), &id)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(env.outbox_count().await, 0);

    // The valid repair, through the binary: revision 1, replayed.
    let good = example_payload("money.wallet.credited");
    std::fs::write(&file, good.to_string()).unwrap();
    let why = "amountCents was written as a string by wallet-svc 2.3.1 (INC-4711)";
    let (ok, out) = admin_cli(
        &env,
        &[
            "dlq",
            "repair",
            "--event-id",
            &id,
            "--payload-file",
            file.to_str().unwrap(),
            "--why",
            why,
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("repaired {id} (revision 1)")),
        "{out}"
    );
    // A second repair of the same entry is refused: it is no longer dead.
    let err = outbox_relay::dlq::repair(
        env.admin(),
        &env.catalog,
        &env.settings.kafka,
        &repair(&id, good.clone()),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RepairError::NotDead { .. }), "{err}");

    // The audit trail: the original and the repair, who, why.
    let revisions = sql::dlq_revisions(env.admin(), &id).await.unwrap();
    assert_eq!(revisions.len(), 1);
    let r = &revisions[0];
    assert_eq!(
        (r.revision, r.kind.as_str(), r.why.as_str()),
        (1, "repair", why)
    );
    assert_eq!(r.old_payload.as_ref(), Some(&bad));
    assert_eq!(r.new_payload.as_ref(), Some(&good));
    assert_eq!(r.made_by, env.admin_role);
    let e = entry(&env, &id).await;
    assert_eq!(
        (e.state.as_str(), e.replay_count, &e.payload),
        ("replayed", 1, &good)
    );

    // Published under the same id and occurredAt. Then the writer retries
    // its insert of the same id (as writers do after a timeout), so the
    // event reaches Kafka a second time.
    drain_all(&env, &relay).await;
    write(&env, &id, "money.wallet.credited", good.clone(), None).await;
    drain_all(&env, &relay).await;
    let topic = env.topic("platform.money.events");
    let got = env
        .consume(std::slice::from_ref(&topic), 2, Duration::from_secs(20))
        .await;
    assert_eq!(got.len(), 2, "{got:?}");
    for m in &got {
        assert_eq!(m.value["id"], json!(id));
        assert_eq!(m.value["data"], good);
    }
    assert_eq!(
        got[0].value["occurredAt"],
        json!(outbox_relay::envelope::format_time(occurred_at))
    );

    // The ledger's consumer kit, as its consumer role, credits it once.
    let (_, consumer_pool) = env.consumer_role("money-ledger").await;
    let manifest = Manifest::parse(
        "module.manifest.json",
        r#"{"name": "money-ledger", "version": "1.0.0",
            "events": {"subscribes": ["money.wallet.credited"]}}"#,
    )
    .unwrap();
    let mut settings = ConsumerSettings::new("money-ledger", env.settings.kafka.clone());
    // A consumer group of this test's own on the shared broker.
    settings.group_id = format!("money-ledger-{}", env.id);
    settings.retry_min_ms = 20;
    settings.retry_max_ms = 200;
    let mut kit = Consumer::new(
        &manifest,
        env.catalog.clone(),
        consumer_pool.clone(),
        settings,
    )
    .unwrap();
    let credited: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let seen = credited.clone();
    kit.subscribe("money.wallet.credited", move |_conn, event| {
        let seen = seen.clone();
        Box::pin(async move {
            let cents = event.data["amountCents"]
                .as_i64()
                .ok_or("amountCents is not an integer")?;
            seen.lock().unwrap().push((event.id.clone(), cents));
            Ok(())
        })
    })
    .unwrap();
    let stats = kit.stats();
    let token = CancellationToken::new();
    let task = tokio::spawn(kit.run(token.clone()));
    let done = eventually(Duration::from_secs(45), || async {
        let s = stats.snapshot();
        s.processed == 1 && s.duplicates == 1
    })
    .await;
    token.cancel();
    task.await.unwrap().unwrap();
    assert!(done, "{:?}", stats.snapshot());
    assert_eq!(*credited.lock().unwrap(), vec![(id.clone(), 10_000)]);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM processed_event_ids WHERE event_id = $1")
            .bind(&id)
            .fetch_one(&consumer_pool)
            .await
            .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_replays_what_it_can_and_says_why_it_skipped_the_rest() {
    let env = TestEnv::new().await;
    let relay = env.relay_pool().await;
    let ids: Vec<String> = (0..4)
        .map(|_| outbox_relay::writer::new_event_id())
        .collect();
    let [unknown, forbidden, pending, fine] = [&ids[0], &ids[1], &ids[2], &ids[3]];
    for (id, event_type) in [
        (unknown, "billing.plan.changed"),
        (forbidden, "audit.record.created"),
        (pending, "auth.user.created"),
        (fine, "auth.user.created"),
    ] {
        write(&env, id, event_type, example_payload(event_type), None).await;
        assert_eq!(
            dead_letter(&relay, id, "retries_exhausted", "broker said no").await,
            1
        );
    }
    // Since then: billing.plan.changed left the catalog, audit.record.created
    // moved to another publisher (both as `catalog sync` would, as admin),
    // and a writer inserted one of the ids again.
    sqlx::query("DELETE FROM outbox_catalog WHERE event_type = 'billing.plan.changed'")
        .execute(env.admin())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE outbox_catalog SET publisher = 'iam' WHERE event_type = 'audit.record.created'",
    )
    .execute(env.admin())
    .await
    .unwrap();
    write(
        &env,
        pending,
        "auth.user.created",
        example_payload("auth.user.created"),
        None,
    )
    .await;

    // The 0003 function, unfiltered, no longer fails as a whole (it used to
    // raise 22023 for the unknown type and replay nothing).
    assert_eq!(
        sql::dlq_replay(env.admin(), &DlqFilter::default())
            .await
            .unwrap(),
        vec![fine.clone()]
    );
    // The report, through the binary, as the table an admin reads.
    let (ok, out) = admin_cli(&env, &["dlq", "replay", "--all"]);
    assert!(ok, "{out}");
    assert!(
        out.starts_with("replayed 0 event(s)\nskipped 3 event(s)\nEVENT_ID"),
        "{out}"
    );
    for (id, reason) in [
        (unknown, "unknown_event_type"),
        (forbidden, "publisher_not_allowed"),
        (pending, "already_pending"),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{out}"));
        assert!(line.contains(reason), "{line}");
    }
    // And as JSON, after the catalog is put back: the unknown type replays,
    // the others are still reported.
    let catalog = outbox_relay::catalog::Catalog::load(&[catalog_dir()]).unwrap();
    sql::sync_catalog(env.admin(), &catalog).await.unwrap();
    sqlx::query(
        "UPDATE outbox_catalog SET publisher = 'iam' WHERE event_type = 'audit.record.created'",
    )
    .execute(env.admin())
    .await
    .unwrap();
    let (ok, out) = admin_cli(&env, &["dlq", "replay", "--all", "--json"]);
    assert!(ok, "{out}");
    let report: Vec<sql::ReplayLine> = serde_json::from_str::<Value>(&out)
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|l| sql::ReplayLine {
                    event_id: l["event_id"].as_str().unwrap().into(),
                    outcome: l["outcome"].as_str().unwrap().into(),
                    reason: l["reason"].as_str().map(Into::into),
                    detail: None,
                })
                .collect()
        })
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    let brief: Vec<(&str, &str, Option<&str>)> = report
        .iter()
        .map(|l| (l.event_id.as_str(), l.outcome.as_str(), l.reason.as_deref()))
        .collect();
    assert_eq!(
        brief,
        vec![
            (unknown.as_str(), "replayed", None),
            (forbidden.as_str(), "skipped", Some("publisher_not_allowed")),
            (pending.as_str(), "skipped", Some("already_pending")),
        ]
    );
    assert_eq!(entry(&env, forbidden).await.state, "dead");
    assert_eq!(entry(&env, pending).await.state, "dead");
    let in_outbox: Vec<String> = sqlx::query_scalar("SELECT event_id FROM outbox ORDER BY id")
        .fetch_all(env.admin())
        .await
        .unwrap();
    assert_eq!(
        in_outbox,
        vec![pending.clone(), fine.clone(), unknown.clone()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_entry_is_never_overwritten_and_the_row_that_met_it_is_kept() {
    let env = TestEnv::new().await;
    let relay = env.relay_pool().await;
    let id = outbox_relay::writer::new_event_id();
    let first = example_payload("auth.user.created");
    write(&env, &id, "auth.user.created", first.clone(), None).await;
    dead_letter(&relay, &id, "invalid_payload", "first failure").await;

    // The writer inserts the same id with other content; it fails too.
    let mut other = first.clone();
    other["email"] = json!("grace@example.com");
    write(&env, &id, "auth.user.created", other.clone(), None).await;
    assert_eq!(
        dead_letter(&relay, &id, "message_too_large", "second failure").await,
        1
    );
    let e = entry(&env, &id).await;
    assert_eq!(
        (e.state.as_str(), e.reason.as_str(), &e.payload),
        ("dead", "invalid_payload", &first)
    );
    assert!(
        e.last_error.starts_with("first failure\n"),
        "{}",
        e.last_error
    );
    assert!(
        e.last_error.contains(
            "dead-lettered again (message_too_large) with other content, kept as revision 1"
        ),
        "{}",
        e.last_error
    );
    assert_eq!(env.outbox_count().await, 0, "the row left the outbox");
    let (kind, new_payload, detail, made_by): (String, Value, Value, String) = sqlx::query_as(
        "SELECT kind, new_payload, detail, made_by FROM outbox_dlq_revisions WHERE event_id = $1 AND revision = 1",
    )
    .bind(&id)
    .fetch_one(env.admin())
    .await
    .unwrap();
    assert_eq!(kind, "dead_lettered_again");
    assert_eq!(new_payload, other, "the refused row's content is kept");
    assert_eq!(detail["payload"], other);
    assert_eq!(detail["dl_error"], json!("second failure"));
    assert_eq!(made_by, env.relay_role);

    // The same content again: the entry records the new failure.
    write(&env, &id, "auth.user.created", first.clone(), None).await;
    dead_letter(&relay, &id, "message_too_large", "third failure").await;
    let e = entry(&env, &id).await;
    assert_eq!(
        (
            e.state.as_str(),
            e.reason.as_str(),
            e.last_error.as_str(),
            e.attempts,
            &e.payload
        ),
        ("dead", "message_too_large", "third failure", 2, &first)
    );
    assert_eq!(sql::dlq_revisions(env.admin(), &id).await.unwrap().len(), 1);

    // Replayed, then failing again: the entry is the event's again.
    assert_eq!(
        sql::dlq_replay(env.admin(), &one(&id)).await.unwrap(),
        vec![id.clone()]
    );
    dead_letter(&relay, &id, "invalid_payload", "after the replay").await;
    let e = entry(&env, &id).await;
    assert_eq!(
        (e.state.as_str(), e.last_error.as_str(), e.replay_count),
        ("dead", "after the replay", 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_older_than_the_dedupe_horizon_replay_only_when_forced_and_are_counted() {
    let env = TestEnv::new().await;
    let relay = env.relay_pool().await;
    let long_ago = Utc::now() - chrono::Duration::days(401);
    // Old by its stated time, and old by its id's time.
    let by_time = outbox_relay::writer::new_event_id();
    let by_id = ulid_at(long_ago);
    let recent = outbox_relay::writer::new_event_id();
    write(
        &env,
        &by_time,
        "auth.user.created",
        example_payload("auth.user.created"),
        Some(long_ago),
    )
    .await;
    write(
        &env,
        &by_id,
        "auth.user.created",
        example_payload("auth.user.created"),
        None,
    )
    .await;
    write(
        &env,
        &recent,
        "auth.user.created",
        example_payload("auth.user.created"),
        None,
    )
    .await;
    for id in [&by_time, &by_id, &recent] {
        dead_letter(&relay, id, "retries_exhausted", "gave up").await;
    }
    assert_eq!(sql::dedupe_horizon_days(env.admin()).await.unwrap(), 400);

    let report = sql::dlq_replay_report(env.admin(), &DlqFilter::default(), false, None)
        .await
        .unwrap();
    let outcomes: Vec<(&str, &str, Option<&str>)> = report
        .iter()
        .map(|l| (l.event_id.as_str(), l.outcome.as_str(), l.reason.as_deref()))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (by_time.as_str(), "skipped", Some("older_than_horizon")),
            (by_id.as_str(), "skipped", Some("older_than_horizon")),
            (recent.as_str(), "replayed", None),
        ]
    );
    assert!(report[0]
        .detail
        .as_deref()
        .unwrap()
        .contains("older than the dedupe horizon"));
    // A repair of an old event is refused the same way.
    let err = sql::dlq_repair(
        env.admin(),
        &repair(&by_time, example_payload("auth.user.created")),
    )
    .await
    .unwrap_err();
    let (code, message) = db_error(&err);
    assert_eq!(code, INVALID);
    assert!(
        message.contains("older than the dedupe horizon (400 days)"),
        "{message}"
    );
    // Forcing needs a reason.
    let err = sql::dlq_replay_report(env.admin(), &one(&by_time), true, None)
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, INVALID);

    // Forced, through the binary: replayed, logged, recorded and counted.
    let (ok, out) = admin_cli(
        &env,
        &[
            "dlq",
            "replay",
            "--event-id",
            &by_time,
            "--force",
            "--why",
            "customer asked (INC-9)",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.starts_with(&format!(
            "replayed 1 event(s)\n{by_time}  forced_past_horizon\n"
        )),
        "{out}"
    );
    assert!(!out.contains("skipped"), "{out}");
    assert!(
        out.contains("WARN") && out.contains("older than the dedupe horizon"),
        "{out}"
    );
    let revisions = sql::dlq_revisions(env.admin(), &by_time).await.unwrap();
    assert_eq!(revisions.len(), 1);
    assert_eq!(
        (
            revisions[0].kind.as_str(),
            revisions[0].why.as_str(),
            revisions[0].made_by.as_str()
        ),
        (
            "forced_replay",
            "customer asked (INC-9)",
            env.admin_role.as_str()
        )
    );
    let (_, forced) = sql::dlq_age_and_forced(&relay).await.unwrap();
    assert_eq!(forced, 1);
    assert_eq!(entry(&env, &by_id).await.state, "dead");

    // The horizon is the admin's setting, within bounds.
    let err = sqlx::query("SELECT outbox_set_dedupe_horizon(7)")
        .execute(env.admin())
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, INVALID);
    sqlx::query("SELECT outbox_set_dedupe_horizon(500)")
        .execute(env.admin())
        .await
        .unwrap();
    let report = sql::dlq_replay_report(env.admin(), &DlqFilter::default(), false, None)
        .await
        .unwrap();
    assert_eq!(report.len(), 1);
    assert_eq!(
        (report[0].event_id.as_str(), report[0].outcome.as_str()),
        (by_id.as_str(), "replayed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_partitions_past_the_horizon_are_dropped_whole_and_dedupe_holds_across_them() {
    let env = TestEnv::new().await;
    let (_, consumer) = env.consumer_role("crm").await;
    let mark = |id: String| {
        let consumer = consumer.clone();
        async move {
            let mut conn = consumer.acquire().await.unwrap();
            outbox_relay::consumer::dedupe::mark_processed(&mut conn, "crm", &id)
                .await
                .unwrap()
        }
    };
    let old = ulid_at(Utc::now() - chrono::Duration::days(600));
    let new = outbox_relay::writer::new_event_id();
    assert!(mark(old.clone()).await);
    assert!(mark(new.clone()).await);
    assert!(
        !mark(old.clone()).await,
        "dedupe holds in the DEFAULT partition"
    );
    assert!(
        !mark(new.clone()).await,
        "dedupe holds in the month's partition"
    );
    // A dedupe row whose id is no ULID, processed long ago.
    sqlx::query("INSERT INTO processed_event_ids (consumer, event_id, processed_at) VALUES ('crm', 'legacy-7', now() - interval '2 years')")
        .execute(&consumer)
        .await
        .unwrap();
    let partition = |id: String| {
        let admin = env.admin().clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT tableoid::regclass::text FROM processed_event_ids WHERE event_id = $1",
            )
            .bind(id)
            .fetch_one(&admin)
            .await
            .unwrap()
        }
    };
    assert_eq!(partition(old.clone()).await, "processed_event_ids_default");
    let month = |days: i64| {
        format!(
            "processed_event_ids_p{}",
            (Utc::now() - chrono::Duration::days(days)).format("%Y%m")
        )
    };
    assert_eq!(partition(new.clone()).await, month(0));

    // The admin creates the old month's partition: its row moves there.
    let created: Vec<String> = sqlx::query_scalar(
        "SELECT outbox_dedupe_partitions_ensure(0, now() - interval '600 days')",
    )
    .fetch_all(env.admin())
    .await
    .unwrap();
    assert_eq!(created, vec![month(600)]);
    assert_eq!(partition(old.clone()).await, month(600));
    assert!(!mark(old.clone()).await);

    // Nobody deletes dedupe rows or partitions by hand.
    for (pool, sql) in [
        (env.admin(), "DELETE FROM processed_event_ids".to_string()),
        (env.admin(), format!("DROP TABLE {}", month(600))),
        (&consumer, "DELETE FROM processed_event_ids".to_string()),
        (
            &consumer,
            format!(
                "INSERT INTO {} (consumer, event_id) VALUES ('crm', 'x')",
                month(0)
            ),
        ),
    ] {
        let err = sqlx::query(&sql).execute(pool).await.unwrap_err();
        assert_eq!(db_error(&err).0, FORBIDDEN, "{sql}");
    }

    // A dry run reports, changes nothing.
    let dry = sql::dedupe_purge(env.admin(), true).await.unwrap();
    let brief: Vec<(&str, &str, i64)> = dry
        .iter()
        .map(|p| (p.partition_name.as_str(), p.action.as_str(), p.rows_removed))
        .collect();
    let old_month = month(600);
    assert_eq!(
        brief,
        vec![
            (old_month.as_str(), "would drop", 1),
            ("processed_event_ids_default", "would delete", 1),
        ]
    );
    assert!(!mark(old.clone()).await);

    // Through the binary: the partition is dropped, the old non-ULID row
    // deleted; everything younger than the horizon stays.
    let (ok, out) = admin_cli(&env, &["retention", "dedupe", "--apply"]);
    assert!(ok, "{out}");
    assert!(out.contains("dedupe horizon: 400 days"), "{out}");
    assert!(out.contains(&format!("dropped      {old_month}")), "{out}");
    let left: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM processed_event_ids ORDER BY 1")
            .fetch_all(env.admin())
            .await
            .unwrap();
    assert_eq!(left, vec![new.clone()]);
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&old_month)
        .fetch_one(env.admin())
        .await
        .unwrap();
    assert!(!exists);
    assert!(!mark(new.clone()).await);
    // Created ahead: the next three months' partitions exist.
    for m in 1..=3 {
        let name = format!(
            "processed_event_ids_p{}",
            (Utc::now().date_naive().with_day(1).unwrap() + chrono::Months::new(m)).format("%Y%m")
        );
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&name)
            .fetch_one(env.admin())
            .await
            .unwrap();
        assert!(exists, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_settled_dlq_entries_and_stale_relays_are_purged_and_dead_ones_never() {
    let env = TestEnv::new().await;
    let relay = env.relay_pool().await;
    let ids: Vec<String> = (0..3)
        .map(|_| outbox_relay::writer::new_event_id())
        .collect();
    for id in &ids {
        write(
            &env,
            id,
            "auth.user.created",
            example_payload("auth.user.created"),
            None,
        )
        .await;
        dead_letter(&relay, id, "retries_exhausted", "gave up").await;
    }
    sql::dlq_replay(env.admin(), &one(&ids[0])).await.unwrap();
    sql::dlq_discard(env.admin(), "test data", &one(&ids[1]))
        .await
        .unwrap();
    // Fixture: time passes (the entries settled, the relay stopped reporting).
    sqlx::query(
        "UPDATE outbox_dlq SET last_replayed_at = now() - interval '100 days', \
                discarded_at = CASE WHEN discarded_at IS NOT NULL THEN now() - interval '100 days' END, \
                dead_lettered_at = now() - interval '100 days'",
    )
    .execute(env.fixtures())
    .await
    .unwrap();

    let err = sql::dlq_purge(env.admin(), 0).await.unwrap_err();
    assert_eq!(db_error(&err).0, INVALID);
    let (ok, out) = admin_cli(&env, &["dlq", "purge", "--older-than-days", "90"]);
    assert!(ok, "{out}");
    assert!(out.contains("deleted 2 replayed or discarded"), "{out}");
    let left: Vec<(String, String)> = sqlx::query_as("SELECT event_id, state FROM outbox_dlq")
        .fetch_all(env.admin())
        .await
        .unwrap();
    assert_eq!(
        left,
        vec![(ids[2].clone(), "dead".to_string())],
        "a dead entry is never purged"
    );

    let mut conn = relay.acquire().await.unwrap();
    for r in ["relay-a", "relay-b"] {
        sql::heartbeat(&mut conn, r, "default", "host", "0.2.0", None, 0)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE outbox_relays SET heartbeat_at = now() - interval '3 days' WHERE relay_id = 'relay-a'")
        .execute(env.fixtures())
        .await
        .unwrap();
    let err = sql::relays_purge(env.admin(), 0).await.unwrap_err();
    assert_eq!(db_error(&err).0, INVALID);
    let (ok, out) = admin_cli(&env, &["retention", "relays", "--older-than-hours", "24"]);
    assert!(ok, "{out}");
    assert!(out.contains("forgot 1 relay(s)\nrelay-a"), "{out}");
    assert_eq!(
        sql::relays(env.admin())
            .await
            .unwrap()
            .iter()
            .map(|r| r.relay_id.as_str())
            .collect::<Vec<_>>(),
        vec!["relay-b"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_is_append_only_and_repair_is_the_admins_alone() {
    let env = TestEnv::new().await;
    let relay = env.relay_pool().await;
    let id = outbox_relay::writer::new_event_id();
    write(
        &env,
        &id,
        "auth.user.created",
        example_payload("auth.user.created"),
        None,
    )
    .await;
    dead_letter(&relay, &id, "invalid_payload", "bad").await;
    let rev = sql::dlq_repair(
        env.admin(),
        &repair(&id, example_payload("auth.user.created")),
    )
    .await
    .unwrap();
    assert_eq!(rev, 1);

    for (who, pool) in [("admin", env.admin()), ("relay", &relay)] {
        for sql in [
            "UPDATE outbox_dlq_revisions SET why = 'nothing happened'",
            "DELETE FROM outbox_dlq_revisions",
            "TRUNCATE outbox_dlq_revisions",
        ] {
            let err = sqlx::query(sql).execute(pool).await.unwrap_err();
            assert_eq!(db_error(&err).0, FORBIDDEN, "{who}: {sql}");
        }
    }
    // The admin cannot add rows either; the relay cannot sign them.
    let err = sqlx::query("INSERT INTO outbox_dlq_revisions (event_id, revision, kind, why) VALUES ($1, 9, 'repair', 'x')")
        .bind(&id)
        .execute(env.admin())
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, FORBIDDEN);
    let err = sqlx::query("INSERT INTO outbox_dlq_revisions (event_id, revision, kind, why, made_by) VALUES ($1, 9, 'repair', 'x', 'alice')")
        .bind(&id)
        .execute(&relay)
        .await
        .unwrap_err();
    assert_eq!(db_error(&err).0, FORBIDDEN);
    // Only the admin may repair.
    let writer = env.writer("iam").await;
    for pool in [&relay, &writer] {
        let err = sql::dlq_repair(pool, &repair(&id, json!({})))
            .await
            .unwrap_err();
        assert_eq!(db_error(&err).0, FORBIDDEN);
    }
    assert_eq!(sql::dlq_revisions(env.admin(), &id).await.unwrap().len(), 1);
}

/// A broker that denies the relay a topic (librdkafka's mock cluster, the
/// only broker here with per-topic errors): the events wait in the outbox,
/// in order, however often they fail, and go out once the ACL is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_acl_error_is_retried_without_limit_and_never_dead_lettered() {
    use outbox_relay::relay::{BatchReport, Outcome};
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaRespErr;
    outbox_relay::metrics_handle().unwrap();
    let env = TestEnv::new().await;
    let mock = MockCluster::new(1).unwrap();
    let mut settings = env.settings.clone();
    settings.kafka.brokers = mock.bootstrap_servers();
    settings.kafka.message_timeout_ms = 1_500;
    settings.relay.retry_base_ms = 10;
    settings.relay.retry_max_ms = 20;
    // An unknown-class failure would be dead-lettered at the first attempt.
    settings.relay.max_attempts = 1;
    // So that the grant is noticed within a second, not the default 5 min.
    settings
        .kafka
        .librdkafka
        .insert("topic.metadata.refresh.interval.ms".into(), "1000".into());
    for topic in env.catalog.topics.keys() {
        mock.create_topic(&env.topic(topic), 3, 1).unwrap();
    }
    let source = settings.relay.source.clone();
    let relay = env.relay_with(settings).await;
    let step = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let o = relay.step().await.unwrap();
            if o != Outcome::Empty || std::time::Instant::now() > deadline {
                return o;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let batch = |claimed, published, dead_lettered, retried| {
        Outcome::Batch(BatchReport {
            claimed,
            published,
            dead_lettered,
            retried,
        })
    };
    let notify = || example_payload("notify.notification.sent");
    env.insert("notify.notification.sent", notify()).await;
    assert_eq!(step().await, batch(1, 1, 0, 0), "warm-up");

    let audit = env.topic("platform.audit.events");
    mock.topic_error(
        &audit,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
    )
    .unwrap();
    let denied = vec![
        env.insert(
            "audit.record.created",
            example_payload("audit.record.created"),
        )
        .await,
        env.insert(
            "audit.record.created",
            example_payload("audit.record.created"),
        )
        .await,
    ];
    env.insert("notify.notification.sent", notify()).await;
    assert_eq!(step().await, batch(3, 1, 0, 2));
    for _ in 0..2 {
        assert_eq!(step().await, batch(2, 0, 0, 2));
    }
    assert_eq!(
        env.dlq_count().await,
        0,
        "nothing is dead-lettered for an ACL"
    );
    let rows: Vec<(String, i32, String)> =
        sqlx::query_as("SELECT event_id, attempts, last_error FROM outbox ORDER BY id")
            .fetch_all(env.admin())
            .await
            .unwrap();
    assert_eq!(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), denied);
    for (_, attempts, error) in &rows {
        assert_eq!(*attempts, 3);
        assert!(error.contains("TopicAuthorizationFailed"), "{error}");
    }
    assert!(
        counter(
            "outbox_publish_failures_total",
            &source,
            "reason",
            "topic_authorization_failed"
        ) >= 6.0
    );
    assert_eq!(
        counter(
            "outbox_events_dead_lettered_total",
            &source,
            "reason",
            "topic_authorization_failed"
        ),
        0.0
    );

    // The ACL is granted: both go out, in their order.
    mock.topic_error(&audit, RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR)
        .unwrap();
    // The producer learns of it with its next metadata refresh; until then
    // the events keep failing, and keep waiting.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match step().await {
            Outcome::Batch(b) if b.published == 2 => break,
            Outcome::Batch(b) => assert_eq!((b.dead_lettered, b.retried), (0, 2)),
            other => panic!("{other:?}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not published after the grant"
        );
    }
    assert_eq!(env.outbox_count().await, 0);
    let consumer: rdkafka::consumer::StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", format!("test-{}", unique()))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    rdkafka::consumer::Consumer::subscribe(&consumer, &[audit.as_str()]).unwrap();
    let got = read(&consumer, 2, Duration::from_secs(10)).await;
    let got: Vec<String> = got
        .iter()
        .map(|m| m.value["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, denied);
}
