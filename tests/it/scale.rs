//! Several relay processes on one outbox: per-key order, bounded failover,
//! lease fencing, and several source databases in one process.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;

const TTL_MS: u64 = 3000;
const RENEW_MS: u64 = 1000;
const BATCH: usize = 200;
const DEPTH: usize = 3;

fn lease_env() -> Vec<(&'static str, String)> {
    vec![
        ("OUTBOX_RELAY_LEASES__TTL_MS", TTL_MS.to_string()),
        (
            "OUTBOX_RELAY_LEASES__RENEW_INTERVAL_MS",
            RENEW_MS.to_string(),
        ),
        ("OUTBOX_RELAY_KAFKA__MESSAGE_TIMEOUT_MS", "3000".into()),
        ("OUTBOX_RELAY_RELAY__BATCH_SIZE", BATCH.to_string()),
        ("OUTBOX_RELAY_RELAY__PIPELINE_DEPTH", DEPTH.to_string()),
    ]
}

fn spawn(env: &TestEnv) -> Spawned {
    let vars = lease_env();
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.spawn_process(&refs)
}

fn signal(child: &std::process::Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// Writes `n` events over `keys` keys as multi-row inserts, as the notify
/// publisher's writer (which names the ids: it may not read them back);
/// each payload carries its per-key sequence number.
async fn write(env: &TestEnv, from: usize, n: usize, keys: usize) -> Vec<(String, usize)> {
    write_as(&env.writer("notify").await, from, n, keys).await
}

/// [`write`] through a given pool of the notify publisher's writer role.
async fn write_as(
    writer: &sqlx::PgPool,
    from: usize,
    n: usize,
    keys: usize,
) -> Vec<(String, usize)> {
    let mut written = Vec::with_capacity(n);
    let chunk = 100;
    let mut i = from;
    while i < from + n {
        let end = (i + chunk).min(from + n);
        let ids: Vec<String> = (i..end)
            .map(|_| outbox_relay::writer::new_event_id())
            .collect();
        let payloads: Vec<serde_json::Value> = (i..end)
            .map(|j| json!({"notificationId": format!("key-{}", j % keys), "channel": "email", "userId": "u", "seq": j}))
            .collect();
        sqlx::query(
            "INSERT INTO outbox (event_id, event_type, payload) \
             SELECT e, 'notify.notification.sent', p \
               FROM unnest($1::text[], $2::jsonb[]) WITH ORDINALITY AS t(e, p, o) ORDER BY o",
        )
        .bind(&ids)
        .bind(&payloads)
        .execute(writer)
        .await
        .unwrap();
        for (id, j) in ids.into_iter().zip(i..end) {
            written.push((id, j));
        }
        i = end;
    }
    written
}

/// Owners of live leases, and how many partitions have none.
async fn lease_owners(env: &TestEnv) -> (HashMap<String, i64>, i64) {
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT CASE WHEN expires_at > now() THEN owner END AS o, count(*) FROM outbox_leases GROUP BY 1",
    )
    .fetch_all(env.admin())
    .await
    .unwrap();
    let mut owners = HashMap::new();
    let mut unowned = 0;
    for (o, n) in rows {
        match o {
            Some(o) => {
                owners.insert(o, n);
            }
            None => unowned += n,
        }
    }
    (owners, unowned)
}

/// Waits (up to 15 s) until every lease of `env` has an owner: the relay
/// has started and, with nothing written, goes idle.
async fn every_lease_taken(env: &TestEnv) {
    assert!(
        eventually(Duration::from_secs(15), || async {
            lease_owners(env).await.1 == 0
        })
        .await,
        "the relay did not take every lease within 15 s"
    );
}

/// Checks delivery, per-key order of first occurrences, and that every
/// duplicate re-delivers an id seen before. Returns the duplicate count.
fn check_order(got: &[Received], written: &[(String, usize)]) -> usize {
    let seq_of: HashMap<&str, usize> = written.iter().map(|(id, s)| (id.as_str(), *s)).collect();
    let mut seen = HashSet::new();
    let mut last_seq: HashMap<String, usize> = HashMap::new();
    let mut duplicates = 0;
    // Messages of one key share a Kafka partition; consume order within a
    // partition is offset order.
    let mut by_partition: HashMap<(String, i32), Vec<&Received>> = HashMap::new();
    for m in got {
        by_partition
            .entry((m.topic.clone(), m.partition))
            .or_default()
            .push(m);
    }
    for msgs in by_partition.values_mut() {
        msgs.sort_by_key(|m| m.offset);
        for m in msgs.iter() {
            let id = m.value["id"].as_str().unwrap().to_string();
            let seq = seq_of[id.as_str()];
            if !seen.insert(id) {
                duplicates += 1;
                continue;
            }
            if let Some(prev) = last_seq.insert(m.key.clone(), seq) {
                assert!(
                    prev < seq,
                    "key {}: seq {seq} published after {prev}",
                    m.key
                );
            }
        }
    }
    let all: HashSet<&str> = written.iter().map(|(id, _)| id.as_str()).collect();
    let got_ids: HashSet<&str> = seen.iter().map(String::as_str).collect();
    assert_eq!(got_ids, all, "every event delivered");
    duplicates
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_killed_and_restarted_keep_per_key_order() {
    let env = TestEnv::new().await;
    let total = 50_000;
    let keys = 500;
    let topic = env.topic("platform.notify.events");
    let mut relays: Vec<Spawned> = (0..3).map(|_| spawn(&env)).collect();
    let mut written = Vec::new();
    let mut failovers = Vec::new();
    for round in 0..10 {
        written.extend(write(&env, round * 5000, 5000, keys).await);
        if round % 3 == 1 {
            // SIGKILL one relay: its leases must move within the bound.
            let victim = round % relays.len();
            signal(&relays[victim], Signal::SIGKILL);
            relays[victim].wait().unwrap();
            let killed_at = Instant::now();
            let moved = eventually(Duration::from_millis(TTL_MS * 4), || async {
                let (owners, unowned) = lease_owners(&env).await;
                unowned == 0 && owners.len() == 2
            })
            .await;
            assert!(moved, "leases of the killed relay were taken over");
            failovers.push(killed_at.elapsed());
            relays[victim] = spawn(&env);
        }
    }
    assert!(
        eventually(Duration::from_secs(120), || async {
            env.outbox_count().await == 0
        })
        .await,
        "outbox drained"
    );
    // A relay that joins receives its share within a few lease periods.
    let shared = eventually(Duration::from_millis(RENEW_MS * 6), || async {
        let (owners, unowned) = lease_owners(&env).await;
        unowned == 0
            && owners.len() == 3
            && owners.values().all(|n| *n <= 256_u32.div_ceil(3) as i64)
    })
    .await;
    let (owners, _) = lease_owners(&env).await;
    assert!(shared, "every relay holds its fair share: {owners:?}");
    for r in &relays {
        signal(r, Signal::SIGTERM);
    }
    for r in &mut relays {
        assert!(r.wait().unwrap().success());
    }
    let (owners, _) = lease_owners(&env).await;
    assert!(
        owners.is_empty(),
        "graceful shutdown hands every lease back: {owners:?}"
    );

    let got = env
        .consume(&[topic], total + 5000, Duration::from_secs(30))
        .await;
    let duplicates = check_order(&got, &written);
    let bound = Duration::from_millis(TTL_MS + RENEW_MS);
    println!(
        "scale: {total} events over {keys} keys, 3 relays, {} kills; received {}, duplicates {duplicates}, lost 0; failover times {:?} (bound {bound:?})",
        failovers.len(),
        got.len(),
        failovers
    );
    for f in &failovers {
        assert!(
            *f <= bound + Duration::from_millis(1500),
            "failover {f:?} beyond {bound:?}"
        );
    }
    assert_eq!(env.dlq_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_relay_is_fenced_out_after_another_takes_over() {
    let env = TestEnv::new().await;
    let keys = 50;
    let topic = env.topic("platform.notify.events");
    let a = spawn(&env);
    assert!(
        eventually(Duration::from_secs(10), || async {
            lease_owners(&env).await.1 == 0
        })
        .await
    );
    let mut written = write(&env, 0, 2000, keys).await;
    // Pause A while events stream in, probably in the middle of a batch.
    let writer_env = &env;
    let stream = async {
        let mut w = Vec::new();
        for round in 0..10 {
            w.extend(write(writer_env, 2000 + round * 200, 200, keys).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w
    };
    let pause = async {
        tokio::time::sleep(Duration::from_millis(60)).await;
        signal(&a, Signal::SIGSTOP);
    };
    let (streamed, _) = tokio::join!(stream, pause);
    written.extend(streamed);
    let paused_at = Instant::now();
    let (before, _) = lease_owners(&env).await;
    let a_id = before.keys().next().unwrap().clone();
    let mut b = spawn(&env);
    // B takes every partition once A's leases lapse.
    let b_owns_all = eventually(Duration::from_millis(TTL_MS * 5), || async {
        let (owners, unowned) = lease_owners(&env).await;
        unowned == 0 && owners.len() == 1 && !owners.contains_key(&a_id)
    })
    .await;
    assert!(b_owns_all, "B took over A's partitions");
    let takeover = paused_at.elapsed();
    written.extend(write(&env, 4000, 1000, keys).await);
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.outbox_count().await == 0
        })
        .await,
        "B drains while A is paused"
    );
    let before_resume = env
        .consume(
            std::slice::from_ref(&topic),
            100_000,
            Duration::from_secs(5),
        )
        .await
        .len();
    signal(&a, Signal::SIGCONT);
    // After A resumes and notices, the rows B already published are gone:
    // A can neither delete nor publish them again. New events flow once.
    tokio::time::sleep(Duration::from_millis(TTL_MS)).await;
    written.extend(write(&env, 5000, 1000, keys).await);
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.outbox_count().await == 0
        })
        .await,
        "drained after A resumed"
    );
    let (owners, unowned) = lease_owners(&env).await;
    assert_eq!(unowned, 0);
    assert_eq!(owners.len(), 2, "A rejoined under new epochs: {owners:?}");
    let epochs: i64 = sqlx::query_scalar("SELECT max(epoch) FROM outbox_leases")
        .fetch_one(env.admin())
        .await
        .unwrap();
    assert!(epochs >= 2, "ownership changes raised the epoch");

    signal(&a, Signal::SIGTERM);
    signal(&b, Signal::SIGTERM);
    let mut a = a;
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());

    let got = env
        .consume(&[topic], 100_000, Duration::from_secs(15))
        .await;
    let duplicates = check_order(&got, &written);
    println!(
        "fencing: takeover after pause {takeover:?}; {} written, {} received ({before_resume} before A resumed), {duplicates} duplicates",
        written.len(),
        got.len()
    );
    // Only the batches in flight at the pause may be delivered twice.
    assert!(duplicates <= BATCH * DEPTH, "{duplicates} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unreachable_source_does_not_stall_another() {
    let a = TestEnv::new().await;
    let b = TestEnv::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "[[sources]]\nname = \"a\"\nurl = \"{}\"\n\n[[sources]]\nname = \"b\"\nurl = \"{}\"\n",
            a.relay_url(),
            b.relay_url()
        ),
    )
    .unwrap();
    // Both databases publish to a's topics (one prefix for the process).
    b.insert("auth.role.changed", example_payload("auth.role.changed"))
        .await;
    a.insert("auth.role.changed", example_payload("auth.role.changed"))
        .await;
    let config_path = config.display().to_string();
    let vars = lease_env();
    let mut env_vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env_vars.push(("OUTBOX_RELAY_CONFIG", &config_path));
    let mut relay = a.spawn_process(&env_vars);
    assert!(
        eventually(Duration::from_secs(20), || async {
            a.outbox_count().await == 0 && b.outbox_count().await == 0
        })
        .await
    );

    // Source b becomes unreachable: no new connection, existing ones cut.
    // Fixture: an outage of the server, which only its superuser can stage.
    let server = sqlx::PgPool::connect(&server_superuser_url())
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS false",
        b.db_name
    ))
    .execute(&server)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()")
        .bind(&b.db_name)
        .execute(&server)
        .await
        .unwrap();
    for _ in 0..20 {
        a.insert("auth.role.changed", example_payload("auth.role.changed"))
            .await;
    }
    let a_flows = eventually(Duration::from_secs(20), || async {
        a.outbox_count().await == 0
    })
    .await;
    sqlx::query(&format!(
        "ALTER DATABASE {} ALLOW_CONNECTIONS true",
        b.db_name
    ))
    .execute(&server)
    .await
    .unwrap();
    assert!(a_flows, "source a kept publishing while b was unreachable");
    b.insert("auth.role.changed", example_payload("auth.role.changed"))
        .await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            b.outbox_count().await == 0
        })
        .await,
        "source b resumed after it came back"
    );
    signal(&relay, Signal::SIGTERM);
    assert!(relay.wait().unwrap().success());
    let got = a
        .consume(
            &[a.topic("platform.auth.events")],
            100,
            Duration::from_secs(10),
        )
        .await;
    assert!(got.len() >= 23, "{} messages", got.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_an_idle_relay_before_its_poll_interval() {
    let env = TestEnv::new().await;
    // Wake-ups are switched on and off by the admin.
    sqlx::query("SELECT outbox_enable_notify()")
        .execute(env.admin())
        .await
        .unwrap();
    // Poll only every 60 s: an event can only arrive sooner through NOTIFY.
    let relay = env.spawn_process(&[
        ("OUTBOX_RELAY_RELAY__LISTEN", "true"),
        ("OUTBOX_RELAY_RELAY__IDLE_INTERVAL_MS", "60000"),
    ]);
    let consumer = env.consumer(&[env.topic("platform.auth.events")]);
    // Let the relay take its leases and go idle.
    every_lease_taken(&env).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    one_event_arrives_then_stop(
        &env,
        &consumer,
        relay,
        "woken by NOTIFY long before the 60 s poll",
    )
    .await;

    sqlx::query("SELECT outbox_disable_notify()")
        .execute(env.admin())
        .await
        .unwrap();
    let triggers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_trigger WHERE tgname = 'outbox_notify'")
            .fetch_one(env.admin())
            .await
            .unwrap();
    assert_eq!(triggers, 0);
}

/// An event written now reaches `consumer` (subscribed to the auth
/// topic); then `relay` stops cleanly.
async fn one_event_arrives_then_stop(
    env: &TestEnv,
    consumer: &rdkafka::consumer::StreamConsumer,
    mut relay: Spawned,
    why: &str,
) {
    let id = env
        .insert("auth.role.changed", example_payload("auth.role.changed"))
        .await;
    let got = read(consumer, 1, Duration::from_secs(20)).await;
    signal(&relay, Signal::SIGTERM);
    assert!(relay.wait().unwrap().success());
    assert_eq!(got.len(), 1, "{why}");
    assert_eq!(got[0].value["id"], id.as_str());
}

/// An idle relay waits inside PostgreSQL (`outbox_wait_due`, migration
/// 0013) instead of claiming every idle interval: a few claims a second
/// where the poll made 200, and an event written while it waits is
/// published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_waits_in_the_server_instead_of_claiming_every_interval() {
    let env = TestEnv::new().await;
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let relay = env.spawn_process(&[("OUTBOX_RELAY_HTTP__LISTEN", listen.as_str())]);
    let consumer = env.consumer(&[env.topic("platform.auth.events")]);
    every_lease_taken(&env).await;
    let claims = |text: &str| sum(text, "outbox_claim_duration_seconds_count", &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = claims(&scrape(port).await);
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let during = claims(&scrape(port).await) - before;
    // One claim per wait (at most 500 ms each): about 6. Polling every
    // 5 ms would make about 600.
    assert!(
        during <= 20.0,
        "{during} claims in {window:?} on an empty outbox"
    );

    one_event_arrives_then_stop(
        &env,
        &consumer,
        relay,
        "the event written while the relay waited",
    )
    .await;
    println!("{during} claims in {window:?} while idle");
}

/// A wait the server refuses (here: `EXECUTE` revoked under a running
/// relay, a privilege error that would stop the relay if a claim met it)
/// is logged, and the relay polls instead: events are still published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_idle_wait_is_logged_and_the_relay_polls_instead() {
    let env = TestEnv::new().await;
    let relay = env.spawn_process(&[]);
    let consumer = env.consumer(&[env.topic("platform.auth.events")]);
    every_lease_taken(&env).await;
    sqlx::query("REVOKE EXECUTE ON FUNCTION outbox_wait_due(integer, integer) FROM outbox_relay")
        .execute(env.fixtures())
        .await
        .unwrap();
    // The wait under way ends within 500 ms; the next one is refused.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let id = env
        .insert("auth.role.changed", example_payload("auth.role.changed"))
        .await;
    let got = read(&consumer, 1, Duration::from_secs(20)).await;
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    assert_eq!(got.len(), 1, "published while polling:\n{log}");
    assert_eq!(got[0].value["id"], id.as_str());
    assert!(
        log.contains("waiting for rows in the server failed") && log.contains("permission denied"),
        "{log}"
    );
}

/// `outbox_wait_due` answers true as soon as a fresh row or a due retried
/// row is there (a row committed while it waits included), false at the
/// end of its wait otherwise; a retried row that is not due yet does not
/// count. Only the relay role may call it (it holds a session while it
/// waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_side_wait_answers_when_a_row_is_due_and_only_to_the_relay() {
    let env = TestEnv::new().await;
    let relay = env.relay_pool().await;
    let wait = |ms: i32| {
        let relay = relay.clone();
        async move {
            let started = Instant::now();
            let due: bool = sqlx::query_scalar("SELECT outbox_wait_due($1, 5)")
                .bind(ms)
                .fetch_one(&relay)
                .await
                .unwrap();
            (due, started.elapsed())
        }
    };

    let (due, took) = wait(300).await;
    assert!(!due, "an empty outbox");
    assert!(
        took >= Duration::from_millis(300),
        "answered after {took:?}"
    );

    // A row committed while the server waits ends the wait.
    let waiting = tokio::spawn(wait(20_000));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = env
        .insert("auth.role.changed", example_payload("auth.role.changed"))
        .await;
    let (due, took) = waiting.await.unwrap();
    assert!(due);
    assert!(
        took < Duration::from_secs(10),
        "the wait went on {took:?} after the row was committed"
    );

    // A writer's transaction that commits well after it took the row's id
    // (the server reads the table on every look only shortly after an id
    // is taken, then on every tenth look).
    let writer = env.writer("iam").await;
    let waiting = tokio::spawn(wait(20_000));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut tx = writer.begin().await.unwrap();
    sqlx::query("INSERT INTO outbox (event_type, payload) VALUES ($1, $2)")
        .bind("auth.role.changed")
        .bind(example_payload("auth.role.changed"))
        .execute(&mut *tx)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    tx.commit().await.unwrap();
    let (due, took) = waiting.await.unwrap();
    assert!(due, "a row committed 400 ms after its id was taken");
    assert!(took < Duration::from_secs(10), "answered after {took:?}");
    sqlx::query("DELETE FROM outbox WHERE event_id <> $1")
        .bind(&id)
        .execute(&relay)
        .await
        .unwrap();

    // The row failed, as the relay reschedules it: its retry is half an
    // hour to an hour away (base and cap 1 h), so it is not due.
    let reschedule = |delay_ms: i64| {
        let (relay, id) = (relay.clone(), id.clone());
        async move {
            let row: i64 = sqlx::query_scalar("SELECT id FROM outbox WHERE event_id = $1")
                .bind(&id)
                .fetch_one(&relay)
                .await
                .unwrap();
            sqlx::query(
                "SELECT outbox_reschedule(ARRAY[$1], ARRAY['broker unavailable'], ARRAY[false], 100, $2, $2)",
            )
            .bind(row)
            .bind(delay_ms)
            .execute(&relay)
            .await
            .unwrap();
        }
    };
    reschedule(3_600_000).await;
    let (due, _) = wait(200).await;
    assert!(!due, "a retried row that is not due yet");
    // Rescheduled again with no delay: due at once.
    reschedule(0).await;
    let (due, took) = wait(20_000).await;
    assert!(due, "a retried row that is due");
    assert!(took < Duration::from_secs(10), "answered after {took:?}");

    for (who, pool) in [
        ("writer", env.writer("iam").await),
        ("admin", env.admin().clone()),
    ] {
        let err = sqlx::query_scalar::<_, bool>("SELECT outbox_wait_due(100, 5)")
            .fetch_one(&pool)
            .await
            .expect_err(who);
        assert_eq!(db_error(&err).0, "42501", "{who}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_get_the_virtual_partition_of_their_key_at_insert() {
    let env = TestEnv::new().await;
    write(&env, 0, 1000, 100).await;
    // The admin reads the rows back; the partition function is the
    // writer's alone (its insert trigger runs it), so the writer computes
    // the expected partition of each key.
    let rows: Vec<(String, i16)> =
        sqlx::query_as("SELECT payload ->> 'notificationId', vpartition FROM outbox")
            .fetch_all(env.admin())
            .await
            .unwrap();
    assert_eq!(rows.len(), 1000);
    let keys: Vec<String> = rows.iter().map(|(k, _)| k.clone()).collect();
    let stored: Vec<i16> = rows.iter().map(|(_, v)| *v).collect();
    let (distinct, mismatched): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT v), count(*) FILTER (WHERE v <> outbox_vpartition(k, 256)) \
           FROM unnest($1::text[], $2::int2[]) AS t(k, v)",
    )
    .bind(&keys)
    .bind(&stored)
    .fetch_one(&env.writer("notify").await)
    .await
    .unwrap();
    assert!(
        distinct > 50,
        "100 keys spread over the 256 partitions: {distinct}"
    );
    assert_eq!(mismatched, 0, "computed from the catalog's key field");
    let per_key: i64 = sqlx::query_scalar(
        "SELECT max(n) FROM (SELECT count(DISTINCT vpartition) AS n FROM outbox \
          GROUP BY payload ->> 'notificationId') s",
    )
    .fetch_one(env.admin())
    .await
    .unwrap();
    assert_eq!(per_key, 1, "one key, one partition");
}

/// Statistics of a queue table swing: an ANALYZE right after a drain
/// records an empty table, and the next claims run against thousands of
/// rows, most of them dead. Planned from those statistics, a claim must
/// still walk the primary key from the cursor and stop at its limit —
/// never scan the table, build a bitmap of every row above the cursor, or
/// sort — whether PostgreSQL plans it for the values (the first
/// executions) or generically (later ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_walks_the_primary_key_whatever_the_statistics_say() {
    let env = TestEnv::new().await;
    // Fixture: freezing the statistics (no autovacuum, an ANALYZE of the
    // empty table) takes the table's owner; no deployed role may.
    sqlx::query("ALTER TABLE outbox SET (autovacuum_enabled = false)")
        .execute(env.fixtures())
        .await
        .unwrap();
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(env.fixtures())
        .await
        .unwrap();
    write_users(&env, 30_000).await;
    let relay_pool = relay_role_pool(&env, 1).await;
    // The relay deletes what it published: all but the last 200 rows.
    sqlx::query("DELETE FROM outbox WHERE id < (SELECT max(id) - 200 FROM outbox)")
        .execute(&relay_pool)
        .await
        .unwrap();
    for leased in [true, false] {
        for mode in ["force_custom_plan", "force_generic_plan"] {
            let plan = claim_plan(&relay_pool, leased, mode, 0, false).await;

            let mut nodes = Vec::new();
            collect_nodes(&plan[0]["Plan"], &mut nodes);
            for bad in ["Seq Scan", "Bitmap Heap Scan", "Hash Join"] {
                assert!(
                    !nodes.iter().any(|n| n == bad),
                    "leased={leased} {mode}: the claim plan has a {bad} node: {nodes:?}\n{plan:#}"
                );
            }
            // Sorting the claimed rows again (the byte budget's running sum
            // over locked rows) is bounded by the limit; sorting the outbox
            // is not.
            assert!(
                sorts_are_bounded(&plan[0]["Plan"]),
                "leased={leased} {mode}: the claim plan sorts rows no Limit bounds: {nodes:?}\n{plan:#}"
            );
            assert!(
                nodes.iter().filter(|n| *n == "Index Scan").count() >= 2,
                "leased={leased} {mode}: expected index scans on outbox_pkey: {nodes:?}"
            );
        }
    }
}

/// Rows waiting for a retry are out of the claim's way: with 100 000 rows
/// rescheduled an hour ahead (a broker outage), an empty claim reads
/// neither them nor their index entries, under custom and generic plans,
/// leased and plain; a due retried row and fresh rows are still claimed,
/// fresh ones in id order. Prints the empty claim's execution time with the
/// rows where they failed (as before migration 0012) and moved apart.
#[tokio::test]
async fn an_empty_claim_does_not_read_rows_waiting_for_a_retry() {
    const WAITING: i64 = 100_000;
    let env = TestEnv::new().await;
    write_users(&env, WAITING).await;
    let relay_pool = relay_role_pool(&env, 1).await;
    // Every row failed and waits an hour, where it is (what relays before
    // migration 0012 did, and still do until upgraded).
    let retry = |function: &str| {
        format!(
            "SELECT count(*) FROM {function}(ARRAY(SELECT id FROM outbox ORDER BY id), \
                 array_fill('broker down'::text, ARRAY[{WAITING}]), array_fill(false, ARRAY[{WAITING}]), \
                 10, 3600000, 3600000)"
        )
    };
    sqlx::query(&retry("outbox_schedule_retry"))
        .execute(&relay_pool)
        .await
        .unwrap();
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(env.fixtures())
        .await
        .unwrap();
    let explain = |leased: bool, mode: &'static str, after: i64| {
        let relay_pool = relay_pool.clone();
        async move { claim_plan(&relay_pool, leased, mode, after, true).await }
    };

    let before = explain(false, "force_custom_plan", 0).await;
    println!(
        "empty claim, {WAITING} rows waiting for a retry at their ids: {:.3} ms, \
         {} rows removed by filter, {} shared buffers hit",
        before[0]["Execution Time"].as_f64().unwrap(),
        sum_of(&before[0]["Plan"], "Rows Removed by Filter"),
        buffers(&before[0]["Plan"]),
    );
    assert!(
        sum_of(&before[0]["Plan"], "Rows Removed by Filter") >= WAITING,
        "rows rescheduled where they are are walked (and still claimed when due): {before:#}"
    );

    // The same rows, rescheduled by an upgraded relay: moved apart.
    let moved: i64 = sqlx::query_scalar(&retry("outbox_reschedule"))
        .fetch_one(&relay_pool)
        .await
        .unwrap();
    assert_eq!(moved, 0, "nothing dead-lettered");
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(env.fixtures())
        .await
        .unwrap();
    let (waiting, positive): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE id > 0) FROM outbox")
            .fetch_one(env.fixtures())
            .await
            .unwrap();
    assert_eq!((waiting, positive), (WAITING, 0));
    // From the start, and pipelined after a retried row (a batch of
    // retried rows in flight).
    let first: i64 = sqlx::query_scalar("SELECT min(id) FROM outbox")
        .fetch_one(env.fixtures())
        .await
        .unwrap();
    for (leased, mode, after) in [true, false]
        .into_iter()
        .flat_map(|l| ["force_custom_plan", "force_generic_plan"].map(|m| (l, m)))
        .flat_map(|(l, m)| [0, first].map(|a| (l, m, a)))
    {
        let plan = explain(leased, mode, after).await;
        let root = &plan[0]["Plan"];
        let removed = sum_of(root, "Rows Removed by Filter");
        let hit = buffers(root);
        println!(
            "empty claim (leased={leased}, {mode}, after {after}), {WAITING} rows waiting for a \
             retry apart: {:.3} ms, {removed} rows removed by filter, {hit} shared buffers",
            plan[0]["Execution Time"].as_f64().unwrap(),
        );
        let mut nodes = Vec::new();
        collect_nodes(root, &mut nodes);
        for bad in ["Seq Scan", "Bitmap Heap Scan", "Hash Join"] {
            assert!(
                !nodes.iter().any(|n| n == bad),
                "leased={leased} {mode} after {after}: the claim plan has a {bad} node: {nodes:?}\n{plan:#}"
            );
        }
        assert!(
            sorts_are_bounded(root),
            "leased={leased} {mode} after {after}: the claim plan sorts rows no Limit bounds: {nodes:?}\n{plan:#}"
        );
        assert_eq!(
            root["Actual Rows"], 0,
            "leased={leased} {mode} after {after}: nothing is due"
        );
        assert!(
            removed < 10,
            "leased={leased} {mode} after {after}: the claim filtered {removed} rows\n{plan:#}"
        );
        assert!(
            hit < 50,
            "leased={leased} {mode} after {after}: the claim read {hit} buffers\n{plan:#}"
        );
    }

    // A retried row comes due, fresh rows are written: all are claimed,
    // the retried row first, the fresh rows in the order they were written.
    let due: i64 = sqlx::query_scalar(
        "UPDATE outbox SET available_at = now() - interval '1 second' \
          WHERE id = (SELECT id FROM outbox ORDER BY id OFFSET 500 LIMIT 1) RETURNING id",
    )
    .fetch_one(env.fixtures())
    .await
    .unwrap();
    let mut fresh = Vec::new();
    for g in 0..3 {
        fresh.push(
            env.insert(
                "auth.user.created",
                json!({"userId": format!("fresh-{g}"), "email": format!("fresh-{g}@example.com")}),
            )
            .await,
        );
    }
    for leased in [true, false] {
        let mut tx = outbox_relay::sql::begin_claim(&relay_pool).await.unwrap();
        let vps: Vec<i16> = (0..256).collect();
        let rows =
            outbox_relay::sql::claim(&mut tx, 10, 16 << 20, leased.then_some(vps.as_slice()), 0)
                .await
                .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(rows.len(), 4, "leased={leased}: {rows:?}");
        assert_eq!(rows[0].id, due, "leased={leased}");
        assert!(rows[0].attempts > 0 && rows[0].id < 0);
        assert_eq!(
            rows[1..]
                .iter()
                .map(|r| r.event_id.clone())
                .collect::<Vec<_>>(),
            fresh,
            "leased={leased}: fresh rows in the order written"
        );
        assert!(rows[1..].windows(2).all(|w| w[0].id < w[1].id));
        assert!(rows[1..].iter().all(|r| r.attempts == 0 && r.id > 0));
        // A limit of 2 takes the retried row and the first fresh one.
        let mut tx = outbox_relay::sql::begin_claim(&relay_pool).await.unwrap();
        let rows =
            outbox_relay::sql::claim(&mut tx, 2, 16 << 20, leased.then_some(vps.as_slice()), 0)
                .await
                .unwrap();
        tx.rollback().await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.id).collect::<Vec<_>>()[..1],
            [due],
            "leased={leased}"
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].event_id, fresh[0], "leased={leased}");
    }

    // Retried rows are taken in the order they came due, rows that failed
    // together in id order, and a pipelined claim goes on after the last
    // row of the batch in flight: it neither waits on that batch's rows
    // nor takes a row of a group before one the batch left.
    let group = |offset: i64, n: i64, ago: &str| {
        format!(
            "UPDATE outbox SET available_at = now() - interval '{ago}' \
              WHERE id IN (SELECT id FROM outbox ORDER BY id OFFSET {offset} LIMIT {n}) \
             RETURNING id"
        )
    };
    let mut earlier: Vec<i64> = sqlx::query_scalar(&group(2000, 2, "3 seconds"))
        .fetch_all(env.fixtures())
        .await
        .unwrap();
    let mut together: Vec<i64> = sqlx::query_scalar(&group(1000, 3, "2 seconds"))
        .fetch_all(env.fixtures())
        .await
        .unwrap();
    earlier.sort_unstable();
    together.sort_unstable();
    let pool = relay_role_pool(&env, 2).await;
    let vps: Vec<i16> = (0..256).collect();
    let mut in_flight = outbox_relay::sql::begin_claim(&pool).await.unwrap();
    let first = outbox_relay::sql::claim(&mut in_flight, 3, 16 << 20, Some(&vps), 0)
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(|r| r.id).collect::<Vec<_>>(),
        [earlier[0], earlier[1], together[0]]
    );
    let mut tx = outbox_relay::sql::begin_claim(&pool).await.unwrap();
    let next =
        outbox_relay::sql::claim(&mut tx, 10, 16 << 20, Some(&vps), first.last().unwrap().id)
            .await
            .unwrap();
    tx.rollback().await.unwrap();
    in_flight.rollback().await.unwrap();
    assert_eq!(
        next.iter().map(|r| r.id).take(3).collect::<Vec<_>>(),
        [together[1], together[2], due]
    );
    assert_eq!(
        next[3..]
            .iter()
            .map(|r| r.event_id.clone())
            .collect::<Vec<_>>(),
        fresh
    );
    // After a fresh row, a pipelined claim takes fresh rows only.
    let mut tx = outbox_relay::sql::begin_claim(&pool).await.unwrap();
    let after_fresh = outbox_relay::sql::claim(&mut tx, 10, 16 << 20, Some(&vps), next[3].id)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        after_fresh
            .iter()
            .map(|r| r.event_id.clone())
            .collect::<Vec<_>>(),
        fresh[1..]
    );
}

/// Shared buffers a plan hit or read (a node's count includes its children's).
fn buffers(plan: &serde_json::Value) -> i64 {
    plan["Shared Hit Blocks"].as_i64().unwrap_or(0)
        + plan["Shared Read Blocks"].as_i64().unwrap_or(0)
}

/// The sum of `key` over the plan's nodes.
fn sum_of(plan: &serde_json::Value, key: &str) -> i64 {
    plan[key].as_i64().unwrap_or(0)
        + plan["Plans"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| sum_of(p, key))
            .sum::<i64>()
}

/// `n` `auth.user.created` events, as the iam publisher's writer.
async fn write_users(env: &TestEnv, n: i64) {
    sqlx::query(
        "INSERT INTO outbox (event_type, tenant_id, payload) \
         SELECT 'auth.user.created', 'tenant-1', \
                jsonb_build_object('userId', 'u' || g, 'email', 'u' || g || '@example.com') \
           FROM generate_series(1, $1) g",
    )
    .bind(n)
    .execute(&env.writer("iam").await)
    .await
    .unwrap();
}

/// The waits (ms) of a relay's "took over leases that expired" lines.
fn takeover_waits(lines: &[serde_json::Value]) -> Vec<i64> {
    lines
        .iter()
        .map(|l| l["wait_ms"].as_i64().unwrap_or(0))
        .collect()
}

/// A pool of `size` connections as the relay's own: its role and its
/// session settings.
async fn relay_role_pool(env: &TestEnv, size: u32) -> sqlx::PgPool {
    outbox_relay::sql::connect_relay(
        &env.relay_url(),
        size,
        Duration::from_secs(5),
        Duration::from_secs(60),
    )
    .await
    .unwrap()
}

/// The plan of the claim statement, prepared as the relay prepares it,
/// under `mode` (`plan_cache_mode`), for a claim after the row `after` (0:
/// from the start) of all 256 partitions when `leased`. With `analyze` it
/// is executed twice, in a transaction rolled back after: the first run
/// pays for loading the relation's metadata and pages into this backend;
/// the second is what every idle poll costs.
async fn claim_plan(
    pool: &sqlx::PgPool,
    leased: bool,
    mode: &str,
    after: i64,
    analyze: bool,
) -> serde_json::Value {
    let all = (0..256)
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("SET LOCAL plan_cache_mode = {mode}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    // A prepared statement outlives the transaction on its pooled
    // connection: deallocated below.
    let name = "claim_plan";
    sqlx::query(&format!(
        "PREPARE {name} AS {}",
        outbox_relay::sql::claim_statement(leased)
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    let args = if leased {
        format!("2000, {after}, 16777216, '{{{all}}}'")
    } else {
        format!("2000, {after}, 16777216")
    };
    let (options, runs) = if analyze {
        ("ANALYZE, BUFFERS, FORMAT JSON", 2)
    } else {
        ("FORMAT JSON", 1)
    };
    let mut plan = serde_json::Value::Null;
    for _ in 0..runs {
        plan = sqlx::query_scalar(&format!("EXPLAIN ({options}) EXECUTE {name}({args})"))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query(&format!("DEALLOCATE {name}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    plan
}

/// Every Sort node of the plan has a Limit below it.
fn sorts_are_bounded(plan: &serde_json::Value) -> bool {
    let children = || plan["Plans"].as_array().into_iter().flatten();
    if plan["Node Type"] == "Sort" {
        let mut below = Vec::new();
        for child in children() {
            collect_nodes(child, &mut below);
        }
        if !below.iter().any(|n| n == "Limit") {
            return false;
        }
    }
    children().all(sorts_are_bounded)
}

fn collect_nodes(plan: &serde_json::Value, out: &mut Vec<String>) {
    if let Some(t) = plan["Node Type"].as_str() {
        out.push(t.to_string());
    }
    if let Some(children) = plan["Plans"].as_array() {
        for child in children {
            collect_nodes(child, out);
        }
    }
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_megabytes_are_claimed_within_the_byte_budget() {
    let env = TestEnv::new().await;
    let writer = env.writer("iam").await;
    // 4000 rows of 3 MB each (12 GB as the relay reads them), written by
    // the server from a small statement: a repeated pattern that TOAST
    // compresses to a few kilobytes per row, so that a budget counting
    // stored sizes would load hundreds of rows at once.
    const ROWS: i64 = 4000;
    let base = example_payload("auth.user.created");
    let started = Instant::now();
    let mut tx = writer.begin().await.unwrap();
    // lz4 instead of the default pglz: the same compression ratio for this
    // pattern, written several times faster (a writer's own session setting).
    sqlx::query("SET LOCAL default_toast_compression = lz4")
        .execute(&mut *tx)
        .await
        .unwrap();
    for chunk in 0..8 {
        sqlx::query(
            "INSERT INTO outbox (event_type, payload) \
             SELECT 'auth.user.created', $1::jsonb || jsonb_build_object('blob', repeat(md5(g::text), 93750)) \
               FROM generate_series($2::bigint, $3::bigint) g",
        )
        .bind(&base)
        .bind(chunk * ROWS / 8)
        .bind((chunk + 1) * ROWS / 8 - 1)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let (stored, counted): (i64, i64) = sqlx::query_as(
        "SELECT sum(pg_column_size(payload))::bigint, sum(payload_bytes)::bigint FROM outbox",
    )
    .fetch_one(env.admin())
    .await
    .unwrap();
    eprintln!(
        "{ROWS} rows written in {:.1} s: {} MB stored, {} MB counted",
        started.elapsed().as_secs_f64(),
        stored >> 20,
        counted >> 20
    );
    assert!(counted >= ROWS * 3_000_000, "payload_bytes: {counted}");
    // Ordinary events behind them must not stall.
    let mut small = Vec::new();
    for _ in 0..10 {
        small.push(
            env.insert("auth.user.created", example_payload("auth.user.created"))
                .await,
        );
    }

    // The defaults: 4000 rows or 16 MiB per claim, two batches in flight,
    // Kafka's 1 MB message limit (so every 3 MB row is dead-lettered).
    let started = Instant::now();
    let mut relay = env.spawn_process(&[]);
    // Read as it comes: 4000 dead-letter lines would fill the pipe.
    let log = collect_stderr(&mut relay);
    let pid = relay.id();
    let drained = eventually(Duration::from_secs(900), || async {
        env.outbox_count().await == 0
    })
    .await;
    let peak = peak_rss(pid);
    let took = started.elapsed();
    let (status, _) = relay.terminate();
    let log = log.lock().unwrap().clone();
    let skip = log.chars().count().saturating_sub(4000);
    let tail: String = log.chars().skip(skip).collect();
    assert!(drained, "outbox not drained; the relay's log ends:\n{tail}");
    assert!(status.success(), "{tail}");
    eprintln!(
        "{ROWS} rows of 3 MB drained in {:.1} s; relay peak RSS {} MiB",
        took.as_secs_f64(),
        peak >> 20
    );
    let reasons: Vec<(String, i64)> = sqlx::query_as(
        "SELECT reason, count(*) FROM outbox_dlq WHERE state = 'dead' GROUP BY reason",
    )
    .fetch_all(env.admin())
    .await
    .unwrap();
    assert_eq!(reasons, vec![("message_too_large".to_string(), ROWS)]);
    // The DLQ keeps the whole payload (a sample: reading back 12 GB
    // would take longer than the rest of the test).
    let kept: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT payload FROM outbox_dlq ORDER BY outbox_id LIMIT 40) s \
          WHERE length(payload->>'blob') = 3000000",
    )
    .fetch_one(env.admin())
    .await
    .unwrap();
    assert_eq!(kept, 40);
    let got = env
        .consume(
            &[env.topic("platform.auth.events")],
            small.len(),
            Duration::from_secs(30),
        )
        .await;
    let ids: HashSet<&str> = got.iter().map(|m| m.headers["ce_id"].as_str()).collect();
    for id in &small {
        assert!(ids.contains(id.as_str()), "{id} not published");
    }
    // The bound docs/scaling.md states for the defaults: 2 batches of at
    // most 16 MiB + one row, each held as row text, envelope and
    // librdkafka's copy, over a process of a few tens of MiB. Counting
    // stored (compressed) sizes, a claim would hold 12 GB.
    assert!(peak < 400 << 20, "peak RSS {} MiB", peak >> 20);
}

/// The Kafka-side fence, made deterministic: relay A is stopped (SIGSTOP)
/// while its claim waits on a row lock, the lock is released, and the claim
/// completes in the server with A still stopped — so A resumes between
/// claim and produce. Meanwhile A's leases expire, its stalled session is
/// ended by the server, and B takes over (after the takeover fence) and
/// publishes everything, including the rows A had claimed, and newer
/// events of the same keys. When A resumes longer than TTL +
/// `message.timeout.ms` later, it must send nothing of them: every event
/// arrives exactly once, in per-key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_paused_between_claim_and_produce_publishes_nothing_after_the_takeover() {
    let env = TestEnv::new().await;
    let keys = 40;
    let topic = env.topic("platform.notify.events");
    let mut written = write(&env, 0, 600, keys).await;

    // The stand-in for a slow former transaction (fixture): it holds the
    // first row, so A's first claim waits on it.
    let mut holder = env.fixtures().begin().await.unwrap();
    sqlx::query("SELECT id FROM outbox ORDER BY id LIMIT 1 FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let vars = lease_env();
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut a = RelayProcess::start(&env, &refs);
    let relay_role = env.relay_role.clone();
    let mut waiting = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !waiting && Instant::now() < deadline {
        waiting = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
              WHERE datname = current_database() AND usename = $1 AND wait_event_type = 'Lock')",
        )
        .bind(&relay_role)
        .fetch_one(env.fixtures())
        .await
        .unwrap();
        if !waiting {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }
    assert!(
        waiting,
        "A's claim never waited on the held row:\n{}",
        a.tail(20)
    );
    kill(a.pid(), Signal::SIGSTOP).unwrap();
    let paused_at = Instant::now();
    // Released within the claim's lock timeout: the claim completes in the
    // server and its rows wait, locked by A's open batch, for A to resume.
    holder.rollback().await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                  WHERE datname = current_database() AND usename = $1 AND state = 'idle in transaction')",
            )
            .bind(&relay_role)
            .fetch_one(env.fixtures())
            .await
            .unwrap()
        })
        .await,
        "A's claim completed while A is stopped"
    );

    let b = RelayProcess::start(&env, &refs);
    written.extend(write(&env, 600, 400, keys).await);
    assert!(
        eventually(Duration::from_secs(90), || async {
            env.outbox_count().await == 0
        })
        .await,
        "B published everything while A is stopped:\n{}",
        b.tail(20)
    );
    let took_over = b.logged("took over leases that expired");
    assert!(
        !took_over.is_empty() && took_over.iter().all(|l| l["wait_ms"].as_i64() > Some(0)),
        "B waited out the takeover fence: {took_over:?}"
    );
    // Paused for longer than TTL + message.timeout.ms in all.
    let pause = Duration::from_millis(TTL_MS + 3000 + 2000);
    tokio::time::sleep(pause.saturating_sub(paused_at.elapsed())).await;
    kill(a.pid(), Signal::SIGCONT).unwrap();
    let resumed_at = paused_at.elapsed();
    // A finds its batch's session ended by the server once it tries to
    // settle, after producing (or not).
    assert!(
        eventually(Duration::from_secs(20), || async {
            a.lines_containing("idle-in-transaction timeout") > 0
        })
        .await,
        "A resumed into its claimed batch:\n{}",
        a.tail(30)
    );
    written.extend(write(&env, 1000, 400, keys).await);
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.outbox_count().await == 0
        })
        .await,
        "drained after A resumed"
    );
    assert!(a.running(), "A survives the lost batch:\n{}", a.tail(30));
    let a_log = a.log_text();
    b.stop_cleanly();
    a.stop_cleanly();

    let got = env
        .consume(&[topic], written.len() + 1000, Duration::from_secs(15))
        .await;
    let duplicates = check_order(&got, &written);
    println!(
        "claim-produce pause: A stopped {:.1}s; {} written, {} received, {duplicates} duplicates; B's takeover waits {:?} ms",
        resumed_at.as_secs_f64(),
        written.len(),
        got.len(),
        takeover_waits(&took_over)
    );
    assert_eq!(
        duplicates, 0,
        "A published rows of partitions taken over while it was stopped"
    );
    assert!(
        a_log.contains("lease not provable right before sending"),
        "A checked its lease before sending the claimed batch:\n{a_log}"
    );
}

/// A frozen connection rather than a dead process: relay A reaches
/// PostgreSQL through a proxy that freezes in the middle of A's claim (the
/// claim has run in the server and holds its rows; its answer never reaches
/// A), as over a frozen VM or a stalled link whose kernels still
/// acknowledge. B, connected directly, must keep publishing its own
/// partitions at full speed, and A's partitions, including the rows A's
/// frozen claim holds, must be published again within the failover bound:
/// A's leases expire, B takes them on its next renewal and waits out the
/// takeover fence, and the server ends A's open batches
/// (`idle_in_transaction_session_timeout`), which releases their rows. When
/// the link thaws, A rejoins and nothing is lost or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_connection_delays_only_its_partitions_and_only_within_the_bound() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let env = TestEnv::new().await;
    let keys = 200;
    let topic = env.topic("platform.notify.events");
    let relay_url = env.relay_url();
    let server = tokio::net::lookup_host(server_of(&relay_url))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = FreezingProxy::start(server).await;

    // A steady stream: 20 events every 50 ms over 200 keys.
    let stop = Arc::new(AtomicBool::new(false));
    let writing = {
        let stop = stop.clone();
        let pool = env.writer("notify").await;
        tokio::spawn(async move {
            let mut written = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let from = written.len();
                written.extend(write_as(&pool, from, 20, keys).await);
            }
            written
        })
    };

    let port_b = free_port();
    let mut a_vars = lease_env();
    a_vars.push(("DATABASE_URL", proxy.url(&relay_url)));
    // A claims every 200 ms once it has caught up (not every 5 ms), so that
    // a row can be found that A has not claimed yet: the one the fixture
    // holds below.
    a_vars.push(("OUTBOX_RELAY_RELAY__IDLE_INTERVAL_MS", "200".into()));
    let mut b_vars = lease_env();
    b_vars.push(("OUTBOX_RELAY_HTTP__LISTEN", format!("127.0.0.1:{port_b}")));
    let a_refs: Vec<(&str, &str)> = a_vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let b_refs: Vec<(&str, &str)> = b_vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut a = RelayProcess::start(&env, &a_refs);
    let b = RelayProcess::start(&env, &b_refs);
    assert!(
        eventually(Duration::from_secs(30), || async {
            let (owners, unowned) = lease_owners(&env).await;
            owners.len() == 2 && unowned == 0
        })
        .await,
        "both relays hold leases:\nA: {}\nB: {}",
        a.tail(10),
        b.tail(10)
    );
    let relay_id = |r: &RelayProcess| {
        r.logged("relaying source")[0]["relay_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let a_id = relay_id(&a);

    // B's published count, sampled every 200 ms.
    let samples: Arc<Mutex<Vec<(Instant, f64)>>> = Arc::default();
    let sampling = {
        let samples = samples.clone();
        tokio::spawn(async move {
            loop {
                let total: f64 = parse(&scrape(port_b).await)
                    .iter()
                    .filter(|s| s.name == "outbox_events_published_total")
                    .map(|s| s.value)
                    .sum();
                samples.lock().unwrap().push((Instant::now(), total));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    let a_parts: Vec<i16> = sqlx::query_scalar(
        "SELECT vpartition FROM outbox_leases WHERE owner = $1 AND expires_at > now() ORDER BY 1",
    )
    .bind(&a_id)
    .fetch_all(env.fixtures())
    .await
    .unwrap();
    assert!(!a_parts.is_empty());

    // Freeze in the middle of a claim: a fixture holds the newest row of
    // A's partitions; once A's claim waits on it, the link freezes and the
    // row is released, so the claim completes in the server and its answer
    // stays in the proxy.
    let mut claim_pid = None;
    for _ in 0..20 {
        let mut holder = env.fixtures().begin().await.unwrap();
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM outbox WHERE vpartition = ANY($1) ORDER BY id DESC LIMIT 1 \
             FOR UPDATE SKIP LOCKED",
        )
        .bind(&a_parts)
        .fetch_optional(&mut *holder)
        .await
        .unwrap();
        if held.is_some() {
            let deadline = Instant::now() + Duration::from_millis(400);
            while claim_pid.is_none() && Instant::now() < deadline {
                claim_pid = sqlx::query_scalar(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                       AND client_port = ANY($1) AND wait_event_type = 'Lock' LIMIT 1",
                )
                .bind(proxy.upstream_ports())
                .fetch_optional(env.fixtures())
                .await
                .unwrap();
            }
        }
        if claim_pid.is_some() {
            proxy.freeze();
        }
        holder.rollback().await.unwrap();
        if claim_pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let frozen_at = Instant::now();
    let claim_pid: i32 = claim_pid.unwrap_or_else(|| {
        panic!(
            "A's claim never waited on the held row; ports {:?}; A logged:\n{}",
            proxy.upstream_ports(),
            a.tail(20)
        )
    });
    assert!(
        eventually(Duration::from_secs(2), || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
                  WHERE pid = $1 AND state = 'idle in transaction')",
            )
            .bind(claim_pid)
            .fetch_one(env.fixtures())
            .await
            .unwrap()
        })
        .await,
        "A's claim completed in the server after the freeze"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let below: i64 = sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM outbox")
        .fetch_one(env.fixtures())
        .await
        .unwrap();
    // A's partitions' events written before the freeze, including the rows
    // A's frozen sessions hold, until all are published.
    let pending_of_a = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM outbox WHERE vpartition = ANY($1) AND id <= $2",
        )
        .bind(&a_parts)
        .bind(below)
        .fetch_one(env.fixtures())
        .await
        .unwrap()
    };
    let at_freeze = pending_of_a().await;
    let mut resumed_at = None;
    let mut recovered_at = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while recovered_at.is_none() && Instant::now() < deadline {
        let left = pending_of_a().await;
        if left < at_freeze && resumed_at.is_none() {
            resumed_at = Some(Instant::now());
        }
        if left == 0 {
            recovered_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered_at = recovered_at.unwrap_or_else(|| {
        panic!(
            "A's partitions were not published while A is frozen:\nB: {}",
            b.tail(30)
        )
    });
    let resumed_at = resumed_at.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after_end = Instant::now();
    proxy.thaw();
    let thawed_at = Instant::now();

    // A rejoins: it takes a share of the partitions again.
    assert!(
        eventually(Duration::from_secs(60), || async {
            lease_owners(&env).await.0.contains_key(&a_id)
        })
        .await,
        "A holds leases again after the thaw:\n{}",
        a.tail(30)
    );
    let rejoined = thawed_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let written = writing.await.unwrap();
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.outbox_count().await == 0
        })
        .await,
        "drained after the thaw"
    );
    sampling.abort();
    assert!(a.running(), "A survives the frozen link:\n{}", a.tail(30));
    let b_took_over = b.logged("took over leases that expired");
    b.stop_cleanly();
    a.stop_cleanly();

    // B's rate between the first sample at or after `from` and the last
    // one at or before `to`.
    let rate = |from: Instant, to: Instant| {
        let samples = samples.lock().unwrap();
        let (t0, v0) = *samples.iter().find(|(t, _)| *t >= from).unwrap();
        let (t1, v1) = *samples.iter().rev().find(|(t, _)| *t <= to).unwrap();
        (v1 - v0) / (t1 - t0).as_secs_f64()
    };
    let before = rate(frozen_at - Duration::from_secs(5), frozen_at);
    // Until B begins on A's partitions (their count is polled every
    // 100 ms): B's own partitions alone.
    let during = rate(frozen_at, resumed_at - Duration::from_millis(100));
    let after = rate(recovered_at, after_end);
    let got = env
        .consume(&[topic], written.len() + 2000, Duration::from_secs(20))
        .await;
    let duplicates = check_order(&got, &written);
    let bound = Duration::from_millis(TTL_MS + RENEW_MS + 3000 + 2000);
    println!(
        "frozen link: A held {} partitions; B published {before:.0}/s before, {during:.0}/s \
         during, {after:.0}/s after; A's partitions resumed {:.1} s and caught up {:.1} s \
         after the freeze (bound {:.0} s); A rejoined {:.1} s after the thaw; {} written, {} \
         received, {duplicates} duplicates; B's takeover waits {:?} ms",
        a_parts.len(),
        (resumed_at - frozen_at).as_secs_f64(),
        (recovered_at - frozen_at).as_secs_f64(),
        bound.as_secs_f64(),
        rejoined.as_secs_f64(),
        written.len(),
        got.len(),
        takeover_waits(&b_took_over)
    );
    assert!(
        during >= 0.8 * before,
        "B kept its own partitions at full speed: {during:.0}/s during, {before:.0}/s before"
    );
    assert!(
        recovered_at - frozen_at <= bound + Duration::from_secs(3),
        "A's partitions were published again {:.1} s after the freeze (bound {:.0} s + 3 s)",
        (recovered_at - frozen_at).as_secs_f64(),
        bound.as_secs_f64()
    );
    assert!(
        duplicates <= DEPTH * BATCH,
        "{duplicates} duplicates: more than A's batches in flight at the freeze"
    );
}
