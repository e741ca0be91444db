//! The main path against real Postgres and real Kafka: every catalog event
//! from a plain SQL insert to a message on its topic, partitioning, commit
//! visibility, and shutdown.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::common::*;
use outbox_relay::relay::{BatchReport, Outcome};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_catalog_event_arrives_on_its_topic_with_envelope_key_and_headers() {
    let env = TestEnv::new().await;
    let mut inserted = HashMap::new();
    for (event_type, _) in env.catalog.events.iter() {
        let id = env.insert(event_type, example_payload(event_type)).await;
        inserted.insert(id, event_type.clone());
    }
    // One row with trace context and an explicit tenant column.
    let traced = outbox_relay::writer::new_event_id();
    sqlx::query(
        "INSERT INTO outbox (event_id, event_type, tenant_id, payload, headers) VALUES \
         ($1, 'money.wallet.debited', 'tenant-x', $2, $3)",
    )
    .bind(&traced)
    .bind(example_payload("money.wallet.debited"))
    .bind(
        json!({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                 "correlationId": "corr-1", "causationId": "cause-1"}),
    )
    .execute(&env.writer("money").await)
    .await
    .unwrap();

    let relay = env.relay().await;
    let outcomes = env.drain(&relay).await;
    assert_eq!(
        outcomes,
        vec![Outcome::Batch(BatchReport {
            claimed: 14,
            published: 14,
            dead_lettered: 0,
            retried: 0
        })]
    );
    assert_eq!(env.outbox_count().await, 0, "acknowledged rows are deleted");

    let got = env
        .consume(&env.all_topics(), 14, Duration::from_secs(30))
        .await;
    assert_eq!(got.len(), 14);
    for m in &got {
        let id = m.value["id"].as_str().unwrap().to_string();
        let def = env.catalog.get(m.value["type"].as_str().unwrap()).unwrap();
        assert_eq!(
            m.topic,
            env.topic(&def.topic),
            "topic of {}",
            def.event_type
        );
        assert_eq!(m.value["source"], def.publisher.as_str());
        assert_eq!(m.value["schemaVersion"], "1.0.0");
        let key_value = m.value["data"][&def.partition_key].as_str().unwrap();
        assert_eq!(m.key, key_value, "key of {}", def.event_type);
        let occurred_at = m.value["occurredAt"].as_str().unwrap();
        assert_eq!(
            occurred_at.len(),
            "2026-11-29T13:25:04.227Z".len(),
            "{occurred_at}"
        );
        assert!(occurred_at.ends_with('Z'));
        assert_eq!(m.headers["ce_id"], id);
        assert_eq!(m.headers["ce_type"], def.event_type);
        assert_eq!(m.headers["ce_source"], def.publisher);
        assert_eq!(m.headers["ce_specversion"], "1.0");
        assert_eq!(m.headers["ce_schemaversion"], "1.0.0");
        assert_eq!(m.headers["ce_time"], occurred_at);
        if id == traced {
            assert_eq!(m.value["tenantId"], "tenant-x");
            assert_eq!(m.headers["ce_tenantid"], "tenant-x");
            assert_eq!(
                m.headers["traceparent"],
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            );
            assert_eq!(m.value["correlationId"], "corr-1");
            assert_eq!(m.value["causationId"], "cause-1");
            assert_eq!(m.headers["ce_correlationid"], "corr-1");
            continue;
        }
        let event_type = &inserted[&id];
        assert_eq!(m.value["type"], event_type.as_str());
        assert_eq!(
            m.value["data"],
            example_payload(event_type),
            "data unchanged"
        );
        // tenantId: the row has none, so it comes from the payload or is null.
        let expected_tenant = example_payload(event_type)
            .get("tenantId")
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(m.value["tenantId"], expected_tenant, "{event_type}");
        assert_eq!(
            m.value["dataschema"],
            format!("urn:outbox-relay:schema:{event_type}:1.0.0").as_str()
        );
        assert_eq!(m.headers["ce_dataschema"], m.value["dataschema"]);
        assert_eq!(
            m.value.as_object().unwrap().len(),
            8,
            "exactly the envelope fields: {}",
            m.value
        );
    }
    let ids: HashSet<_> = got.iter().map(|m| m.headers["ce_id"].clone()).collect();
    assert_eq!(ids.len(), 14);
    assert!(ids.iter().all(|id| id.len() == 26
        && id
            .chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_for_a_key_is_the_java_clients_murmur2_choice() {
    let env = TestEnv::with_partitions(6).await;
    let mut keys = Vec::new();
    for i in 0..60 {
        let user = format!("user-{i}-{}", unique());
        let mut payload = example_payload("auth.role.changed");
        payload["userId"] = json!(user);
        env.insert("auth.role.changed", payload).await;
        keys.push(user);
    }
    let relay = env.relay().await;
    env.drain(&relay).await;
    let got = env
        .consume(
            &[env.topic("platform.auth.events")],
            60,
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(got.len(), 60);
    let partitions: HashSet<i32> = got.iter().map(|m| m.partition).collect();
    assert!(partitions.len() > 1, "keys spread over partitions");
    for m in &got {
        assert_eq!(
            m.partition,
            java_partition(m.key.as_bytes(), 6),
            "key {}",
            m.key
        );
    }
}

#[test]
fn murmur2_matches_the_java_clients_known_values() {
    // Values from the Kafka client's own UtilsTest.
    assert_eq!(murmur2(b"21"), -973932308);
    assert_eq!(murmur2(b"foobar"), -790332482);
    assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
    assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
    assert_eq!(
        murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
        -58897971
    );
    assert_eq!(murmur2(b"abc"), 479470107);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_events_are_never_published_and_late_commits_still_are() {
    let env = TestEnv::new().await;
    let relay = env.relay().await;

    // A transaction that rolls back publishes nothing.
    let mut tx = env.writer("iam").await.begin().await.unwrap();
    sqlx::query("INSERT INTO outbox (event_type, payload) VALUES ('auth.role.changed', $1)")
        .bind(example_payload("auth.role.changed"))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    // A slow transaction takes an ordering id first but commits last.
    let billing = env.writer("billing").await;
    let mut slow = billing.begin().await.unwrap();
    let slow_id = outbox_relay::writer::new_event_id();
    sqlx::query(
        "INSERT INTO outbox (event_id, event_type, payload) VALUES ($1, 'billing.plan.changed', $2)",
    )
    .bind(&slow_id)
    .bind(example_payload("billing.plan.changed"))
    .execute(&mut *slow)
    .await
    .unwrap();
    let fast_id = env
        .insert(
            "billing.subscription.changed",
            example_payload("billing.subscription.changed"),
        )
        .await;

    let first = env.drain(&relay).await;
    assert_eq!(first.len(), 1);
    slow.commit().await.unwrap();
    let second = env.drain(&relay).await;
    assert_eq!(
        second.len(),
        1,
        "the late commit is claimed on a later step"
    );

    let topics = env.all_topics();
    let got = env.consume(&topics, 3, Duration::from_secs(10)).await;
    let ids: Vec<&str> = got
        .iter()
        .map(|m| m.value["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![fast_id.as_str(), slow_id.as_str()]);
    assert_eq!(env.outbox_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_library_enqueues_inside_the_callers_transaction() {
    use outbox_relay::writer::{enqueue, enqueue_with, Context, Options, WalletCredited};
    let env = TestEnv::new().await;
    let event = WalletCredited {
        tx_id: "tx-1".into(),
        user_id: "user-1".into(),
        amount_cents: 500,
        currency: "EUR".into(),
    };
    let mut tx = env.writer("money").await.begin().await.unwrap();
    let id = enqueue(&mut tx, &event).await.unwrap();
    // Retrying the same insert with the same id is idempotent.
    let again = enqueue_with(
        &mut tx,
        &event,
        Options {
            event_id: Some(id.clone()),
            context: Some(Context {
                correlation_id: Some("c".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(again, id);
    tx.commit().await.unwrap();
    assert_eq!(env.outbox_count().await, 1);

    let relay = env.relay().await;
    env.drain(&relay).await;
    let got = env
        .consume(
            &[env.topic("platform.money.events")],
            1,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(got[0].value["id"], id.as_str());
    assert_eq!(got[0].value["data"]["amountCents"], 500);
    assert_eq!(got[0].key, "user-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_loses_nothing_and_exits_zero() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    let env = TestEnv::new().await;
    let total = 3000;
    let mut child = env.spawn_process(&[("OUTBOX_RELAY_RELAY__BATCH_SIZE", "100")]);
    let mut written = HashSet::new();
    for i in 0..total {
        let mut payload = example_payload("notify.notification.sent");
        payload["notificationId"] = json!(format!("n-{}", i % 50));
        written.insert(env.insert("notify.notification.sent", payload).await);
        if i == total / 2 {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        }
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");
    let left = env.outbox_count().await;
    assert!(left > 0, "the stop happened mid-stream");

    let mut again = env.spawn_process(&[]);
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.outbox_count().await == 0
        })
        .await,
        "the restarted relay drains the rest"
    );
    kill(Pid::from_raw(again.id() as i32), Signal::SIGTERM).unwrap();
    assert!(again.wait().unwrap().success());

    let got = env
        .consume(
            &[env.topic("platform.notify.events")],
            total,
            Duration::from_secs(60),
        )
        .await;
    let ids: HashSet<String> = got
        .iter()
        .map(|m| m.value["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, written, "every event arrived");
    assert_eq!(env.dlq_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_generated_event_ids_are_distinct_lowercase_ulids_of_insert_time() {
    let env = TestEnv::new().await;
    // The writer role evaluates the default on every insert.
    let ids: Vec<String> = sqlx::query_scalar("SELECT outbox_ulid() FROM generate_series(1, 2000)")
        .fetch_all(&env.writer("iam").await)
        .await
        .unwrap();
    let now_ms = chrono::Utc::now().timestamp_millis() as u64;
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len());
    for id in &ids {
        assert_eq!(id, &id.to_lowercase());
        let ulid = ulid::Ulid::from_string(&id.to_uppercase()).expect("a valid ULID");
        assert!(
            now_ms.abs_diff(ulid.timestamp_ms()) < 60_000,
            "{id}: time part is now"
        );
    }
}
