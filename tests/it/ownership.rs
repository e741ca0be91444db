//! Ownership when a relay stalls instead of dying: a former owner's open
//! batch must hold back only its own partitions, a claim that waited on it
//! must not take rows it rescheduled, a fence must use the clock of the
//! check, and a relay that cannot prove its lease sends nothing more.
//! Relays and writers run as the documented login roles; the superuser only
//! plays the stalled owner (an open transaction holding row locks).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::common::*;
use outbox_relay::publish;
use outbox_relay::sql;
use serde_json::json;

/// Inserts one `notify.notification.sent` per key, as the notify writer;
/// returns (event id, key) in insert order.
async fn write_keys(env: &TestEnv, keys: usize) -> Vec<(String, String)> {
    let writer = env.writer("notify").await;
    let mut out = Vec::new();
    for k in 0..keys {
        let id = outbox_relay::writer::new_event_id();
        let key = format!("key-{k}");
        sqlx::query(
            "INSERT INTO outbox (event_id, event_type, payload) VALUES ($1, 'notify.notification.sent', $2)",
        )
        .bind(&id)
        .bind(json!({"notificationId": key, "channel": "email", "userId": "u"}))
        .execute(&writer)
        .await
        .unwrap();
        out.push((id, key));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stalled_former_owner_holds_back_only_its_own_partitions() {
    let env = TestEnv::new().await;
    let written = write_keys(&env, 60).await;
    let vpartition: HashMap<String, i16> =
        sqlx::query_as::<_, (String, i16)>("SELECT event_id, vpartition FROM outbox")
            .fetch_all(env.admin())
            .await
            .unwrap()
            .into_iter()
            .collect();

    // The stalled owner: a transaction that claimed the first row and never
    // ends (its host froze). Only a superuser fixture can stand in for it.
    let (stalled_id, _) = &written[0];
    let stalled_vp = vpartition[stalled_id];
    let mut stalled = env.fixtures().begin().await.unwrap();
    sqlx::query("SELECT id FROM outbox WHERE event_id = $1 FOR UPDATE")
        .bind(stalled_id)
        .execute(&mut *stalled)
        .await
        .unwrap();

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let relay = env.spawn_process(&[
        ("OUTBOX_RELAY_HTTP__LISTEN", listen.as_str()),
        ("OUTBOX_RELAY_LOG__FORMAT", "json"),
    ]);
    let started = Instant::now();
    let others: HashSet<&str> = written
        .iter()
        .filter(|(id, _)| vpartition[id] != stalled_vp)
        .map(|(id, _)| id.as_str())
        .collect();
    let held: Vec<&str> = written
        .iter()
        .filter(|(id, _)| vpartition[id] == stalled_vp)
        .map(|(id, _)| id.as_str())
        .collect();
    assert!(others.len() >= 50, "{} keys elsewhere", others.len());

    let topic = env.topic("platform.notify.events");
    let consumer = env.consumer(std::slice::from_ref(&topic));
    let first = read(&consumer, others.len(), Duration::from_secs(30)).await;
    let others_in = started.elapsed();
    let got: HashSet<String> = first
        .iter()
        .map(|m| m.value["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        got.len(),
        others.len(),
        "every event of the other partitions arrives while the owner stalls"
    );
    assert!(got.iter().all(|id| others.contains(id.as_str())), "{got:?}");
    let metrics = scrape(port).await;
    let source = &env.settings.relay.source;
    assert!(
        metrics
            .lines()
            .any(|l| l == format!("outbox_blocked_partitions{{source=\"{source}\"}} 1")),
        "{metrics}"
    );

    // The stalled owner's transaction ends (its session is terminated, or
    // it rolls back): its partition follows, in order.
    stalled.rollback().await.unwrap();
    let rest = read(&consumer, held.len(), Duration::from_secs(20)).await;
    let rest_ids: Vec<&str> = rest
        .iter()
        .map(|m| m.value["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        rest_ids, held,
        "the blocked partition, complete and in order"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.outbox_count().await == 0
        })
        .await
    );
    let (status, stderr) = relay.terminate();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("claiming the other partitions"), "{stderr}");
    println!(
        "stalled owner: {} events of other partitions published {:.1}s after start; \
         its partition's {} events after it ended",
        others.len(),
        others_in.as_secs_f64(),
        held.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_waited_on_a_lock_does_not_take_a_row_rescheduled_meanwhile() {
    let env = TestEnv::new().await;
    write_keys(&env, 1).await;
    let all: Vec<i16> = (0..256).collect();

    // The former owner: locks the row, then reschedules it an hour ahead
    // (what its retry does) and commits while the new claim waits.
    let mut owner = env.fixtures().begin().await.unwrap();
    sqlx::query("SELECT id FROM outbox FOR UPDATE")
        .execute(&mut *owner)
        .await
        .unwrap();
    let relay = env.relay_pool().await;
    let waiting = tokio::spawn(async move {
        let mut tx = sql::begin_claim(&relay).await.unwrap();
        let rows = sql::claim(&mut tx, 100, i64::MAX, Some(&all), 0)
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        rows
    });
    // Once the claim waits on the lock (it gives up after 500 ms, failing
    // this test loudly rather than passing it without a wait).
    let mut waited = false;
    for _ in 0..400 {
        waited = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                             WHERE datname = current_database() AND wait_event_type = 'Lock')",
        )
        .fetch_one(env.fixtures())
        .await
        .unwrap();
        if waited {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(waited, "the claim never waited on the locked row");
    sqlx::query("UPDATE outbox SET available_at = now() + interval '1 hour', attempts = 1")
        .execute(&mut *owner)
        .await
        .unwrap();
    owner.commit().await.unwrap();
    let rows = waiting.await.unwrap();
    assert!(
        rows.is_empty(),
        "a row not due for an hour was claimed: {rows:?}"
    );
    assert_eq!(env.outbox_count().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_fence_uses_the_clock_of_the_check() {
    let env = TestEnv::new().await;
    // A lease of this relay that runs out 1 s from now (fixture: leases are
    // the lease task's to write).
    sqlx::query(
        "UPDATE outbox_leases SET owner = 'r1', epoch = 7, expires_at = clock_timestamp() + interval '1 second' \
          WHERE vpartition = 3",
    )
    .execute(env.fixtures())
    .await
    .unwrap();
    let relay = env.relay_pool().await;
    let mut tx = relay.begin().await.unwrap();
    let held = sql::lease_fence(&mut tx, "r1", &[3], &[7]).await.unwrap();
    assert_eq!(held, vec![3], "held while it lasts");
    // A batch that waited for Kafka past the expiry, in the same transaction.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = sql::lease_fence(&mut tx, "r1", &[3], &[7]).await.unwrap();
    assert!(held.is_empty(), "an expired lease passed the fence");
    tx.rollback().await.unwrap();
}

/// The fence on the Kafka side: a message the relay may no longer send (its
/// lease ran out while it waited) is not handed to librdkafka, nor is any
/// later message of its partition, while other partitions' messages go
/// out; the results of those held back stay open so that their rows are not
/// deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_prove_its_lease_sends_nothing_more_of_that_partition() {
    let env = TestEnv::new().await;
    // key-0, key-1, key-0 again: the first and last share a partition.
    write_keys(&env, 2).await;
    write_keys(&env, 1).await;
    let relay_pool = env.relay_pool().await;
    let mut tx = sql::begin_claim(&relay_pool).await.unwrap();
    let rows = sql::claim(&mut tx, 10, i64::MAX, None, 0).await.unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].vpartition, rows[2].vpartition);
    assert_ne!(rows[0].vpartition, rows[1].vpartition);
    let mut ready: Vec<_> = rows
        .iter()
        .map(|r| outbox_relay::envelope::prepare(r, &env.catalog, &env.prefix, 1_000_000).unwrap())
        .collect();
    let producer = publish::create_producer(&env.settings.kafka).unwrap();
    let refused = ready[0].id;
    let produced = publish::produce(&producer, &mut ready, |m| m.id != refused).await;
    assert_eq!(
        produced.held_back().iter().copied().collect::<Vec<_>>(),
        vec![rows[0].vpartition]
    );
    let results = publish::acks(produced, tokio::time::sleep(Duration::from_secs(20))).await;
    tx.rollback().await.unwrap();
    assert!(results[0].is_none(), "{results:?}");
    assert!(matches!(results[1], Some(Ok(_))), "{results:?}");
    assert!(
        results[2].is_none(),
        "a later message of a held-back partition was sent: {results:?}"
    );
    let got = env
        .consume(
            &[env.topic("platform.notify.events")],
            3,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].value["id"], rows[1].event_id.as_str());
}

/// A lease taken from an owner whose lease expired is fenced for the
/// window in which that owner's producer may still deliver; one handed back
/// (the owner flushed first), or expired longer ago than the window, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_taken_over_from_an_expired_owner_is_fenced_for_its_producers_window() {
    let env = TestEnv::new().await;
    // Fixture: leases are the lease task's to write.
    sqlx::raw_sql(
        "UPDATE outbox_leases SET owner = NULL, expires_at = '-infinity' WHERE vpartition > 5; \
         UPDATE outbox_leases SET owner = 'old', epoch = 4, expires_at = clock_timestamp() - interval '1 second' \
          WHERE vpartition = 1; \
         UPDATE outbox_leases SET owner = NULL, epoch = 4, expires_at = '-infinity' WHERE vpartition = 2; \
         UPDATE outbox_leases SET owner = 'old', epoch = 4, expires_at = clock_timestamp() - interval '1 minute' \
          WHERE vpartition = 3; \
         UPDATE outbox_leases SET owner = 'new', epoch = 4, expires_at = clock_timestamp() - interval '1 second' \
          WHERE vpartition = 4; \
         UPDATE outbox_leases SET owner = 'old', epoch = 4, expires_at = clock_timestamp() + interval '1 minute' \
          WHERE vpartition IN (0, 5)",
    )
    .execute(env.fixtures())
    .await
    .unwrap();
    let relay = env.relay_pool().await;
    let mut conn = relay.acquire().await.unwrap();
    let got = sql::lease_acquire(&mut conn, "new", 3000, 4, 5000)
        .await
        .unwrap();
    let fenced: HashMap<i16, i32> = got.iter().map(|(vp, _, ms)| (*vp, *ms)).collect();
    assert_eq!(
        fenced.keys().copied().collect::<HashSet<_>>(),
        HashSet::from([1, 2, 3, 4]),
        "free and expired leases are taken, live ones are not: {got:?}"
    );
    assert!(
        (3500..=4000).contains(&fenced[&1]),
        "expired 1 s ago, fence 5 s: about 4 s to wait, got {}",
        fenced[&1]
    );
    assert_eq!(fenced[&2], 0, "handed back: no wait");
    assert_eq!(fenced[&3], 0, "the window closed long ago");
    assert_eq!(fenced[&4], 0, "its own producer keeps its order");
    assert!(got.iter().all(|(_, epoch, _)| *epoch == 5), "{got:?}");
}

/// Every connection the relay holds to PostgreSQL (its pool's, its lease
/// task's and its LISTEN connection) has TCP keepalives, so a relay waiting on a server that
/// vanished without a reset gets an error instead of waiting forever. Read
/// from the kernel's socket table: an idle socket with keepalives has its
/// keepalive timer armed (`tr` 2 in `/proc/net/tcp`), one without has no
/// timer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_relay_connection_to_postgres_has_tcp_keepalives() {
    let env = TestEnv::new().await;
    let relay = RelayProcess::start(&env, &[("OUTBOX_RELAY_RELAY__LISTEN", "true")]);
    relay.wait_started().await;
    let (_, db_port) = server_of(&env.relay_url());
    let pid = relay.pid().as_raw();
    // Socket inode → (samples it was seen in, whether a keepalive timer
    // was seen on it). A socket gets its keepalives right after its
    // connection's handshake: one that was just opened is judged once it
    // has been seen for a second.
    let mut seen: HashMap<u64, (u32, bool)> = HashMap::new();
    for _ in 0..40 {
        let inodes: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter_map(|t| {
                let t = t.to_string_lossy().into_owned();
                t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                let remote_port = f[2]
                    .rsplit_once(':')
                    .map(|(_, p)| u16::from_str_radix(p, 16).unwrap());
                let inode: u64 = f[9].parse().unwrap();
                // st 01: established.
                if f[3] != "01" || remote_port != Some(db_port) || !inodes.contains(&inode) {
                    continue;
                }
                let keepalive = f[5].starts_with("02:");
                let entry = seen.entry(inode).or_default();
                entry.0 += 1;
                entry.1 |= keepalive;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop_cleanly();
    let judged: Vec<bool> = seen
        .values()
        .filter(|(samples, _)| *samples >= 10)
        .map(|(_, keepalive)| *keepalive)
        .collect();
    assert!(
        judged.len() >= 3,
        "the relay's pool, lease task and LISTEN are connected: {seen:?}"
    );
    assert!(
        judged.iter().all(|k| *k),
        "every connection to PostgreSQL has TCP keepalives (inode → samples, keepalive seen): {seen:?}"
    );
}
