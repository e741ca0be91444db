//! The Grafana dashboard and the alert rules against a real Prometheus
//! (Debian's `prometheus`) scraping real relay processes:
//!
//! - relay A publishes a steady load on the shared services;
//! - relay B has a dead-lettered event, then loses its broker (a Kafka of
//!   this test's own, stopped half-way) with events 20 minutes old waiting;
//! - a third target in the job never answers (a relay that is down).
//!
//! Every dashboard panel's expression is evaluated through the HTTP API and
//! must return series; every alert expression (without its threshold) must
//! return series; the alerts that fit each situation fire (`ALERTS`), and
//! the others never do. The rules are `deploy/prometheus/alerts.yml` with
//! every `for:` shortened to 1 s (the expressions are the file's own).
//!
//! Takes about two minutes: `cargo test --test it observability:: -- --nocapture`
//! prints the table of panels and alerts.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

/// The state directory and ports of this test's own broker.
fn broker_env() -> Vec<(String, String)> {
    env_file(include_str!("../../scripts/observability.env"))
}

fn kafka_script(action: &str) {
    script("kafka.sh", &[action], &broker_env());
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One GET to Prometheus's HTTP API; the decoded JSON body.
fn api(port: u16, path_and_query: &str) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("prometheus is listening");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path_and_query} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{path_and_query}: {e}: {resp}"))
}

/// An instant query: the result vector.
fn query(port: u16, expr: &str) -> Vec<Value> {
    let v = api(
        port,
        &format!("/api/v1/query?query={}", percent_encode(expr)),
    );
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// Every panel target's expression of the dashboard, with its panel title.
fn dashboard_exprs() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/outbox-relay.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    let mut stack: Vec<Value> = d["panels"].as_array().unwrap().clone();
    while let Some(p) = stack.pop() {
        if let Some(children) = p["panels"].as_array() {
            stack.extend(children.iter().cloned());
        }
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((p["title"].as_str().unwrap_or("").to_string(), e.to_string()));
            }
        }
    }
    out.sort();
    out
}

/// Each alert of the rules file: name and expression (a small reader for
/// the file's own layout: `- alert:` then `expr:` inline or folded `>-`).
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    let mut name = None;
    while let Some(line) = lines.next() {
        let t = line.trim();
        if let Some(n) = t.strip_prefix("- alert:") {
            name = Some(n.trim().to_string());
        } else if let Some(e) = t.strip_prefix("expr:") {
            let e = e.trim();
            let expr = if e == ">-" {
                let indent = lines
                    .peek()
                    .map(|l| l.len() - l.trim_start().len())
                    .unwrap();
                let mut parts = Vec::new();
                while let Some(l) = lines.peek() {
                    if l.trim().is_empty() || l.len() - l.trim_start().len() < indent {
                        break;
                    }
                    parts.push(lines.next().unwrap().trim().to_string());
                }
                parts.join(" ")
            } else {
                e.to_string()
            };
            out.push((name.take().expect("expr after alert"), expr));
        }
    }
    out
}

/// An alert expression without its final threshold: the series it
/// compares, which must exist whether or not the alert fires.
fn alert_body(expr: &str) -> String {
    if let Some(inner) = expr
        .strip_prefix("absent(")
        .and_then(|e| e.strip_suffix(')'))
    {
        return inner.to_string();
    }
    let first = expr.split(" or ").next().unwrap();
    let re_cut = |s: &str| -> String {
        for op in [" > ", " == ", " < "] {
            if let Some(at) = s.rfind(op) {
                let rhs = s[at + op.len()..].trim();
                // A number, or a product of numbers (`7 * 86400`).
                if rhs.split('*').all(|n| n.trim().parse::<f64>().is_ok()) {
                    return s[..at].trim().to_string();
                }
            }
        }
        s.trim().to_string()
    };
    re_cut(first)
}

/// Waits until `check` holds, or panics with the last reason.
async fn until(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("{what}: {why}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_panels_and_alerts_evaluate_against_a_real_prometheus() {
    let started = Instant::now();
    let mut timings = Vec::new();
    // Relay B's broker: a Kafka of this test's own, so that it can stop it.
    tokio::task::spawn_blocking(|| kafka_script("up"))
        .await
        .unwrap();
    timings.push(format!(
        "broker B up after {:.0}s",
        started.elapsed().as_secs_f64()
    ));
    let env_a = TestEnv::new().await;
    let env_b = TestEnv::on_services(
        &server_superuser_url(),
        &format!(
            "127.0.0.1:{}",
            env_value(&broker_env(), "OUTBOX_KAFKA_PORT")
        ),
        1,
    )
    .await;
    let (port_a, port_b, port_dead, port_prom) =
        (free_port(), free_port(), free_port(), free_port());
    let listen = |p: u16| format!("127.0.0.1:{p}");
    let (la, lb) = (listen(port_a), listen(port_b));
    let relay_a = env_a.spawn_process(&[("OUTBOX_RELAY_HTTP__LISTEN", la.as_str())]);
    let relay_b = env_b.spawn_process(&[("OUTBOX_RELAY_HTTP__LISTEN", lb.as_str())]);
    let (source_a, source_b) = (
        env_a.settings.relay.source.clone(),
        env_b.settings.relay.source.clone(),
    );

    // Prometheus: the repository's rules, `for:` shortened; 1 s scrapes.
    let dir = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    let rules: String = rules
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: 1s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.path().join("alerts.yml"), rules).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n\
         scrape_configs:\n  - job_name: outbox-relay\n    static_configs:\n      - targets: [\"{la}\", \"{lb}\", \"{}\"]\n",
        listen(port_dead)
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let check = Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(dir.path().join("prometheus.yml"))
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let _prom = Spawned(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port_prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus (scripts/deps.sh installs it)"),
    );

    until("prometheus ready", Duration::from_secs(60), || {
        let mut s = TcpStream::connect(("127.0.0.1", port_prom)).map_err(|e| e.to_string())?;
        write!(s, "GET /-/ready HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
        resp.starts_with("HTTP/1.0 200").then_some(()).ok_or(resp)
    })
    .await;
    // Both relays scraped, their zero counters seen, before anything happens.
    until("both relays scraped", Duration::from_secs(60), || {
        for s in [&source_a, &source_b] {
            let q = format!("outbox_events_dead_lettered_total{{source=\"{s}\"}}");
            let r = query(port_prom, &q);
            if r.is_empty() {
                return Err(format!("{q}: no series yet"));
            }
        }
        Ok(())
    })
    .await;

    // From here on, the alerts must be exactly the expected ones. (Before
    // the first scrape, OutboxRelayAllDown is rightly true: with `for: 2m`
    // it waits that out; with the shortened `for:` it fires at once.)
    let scraped = Instant::now();
    let since = || format!("{}s", scraped.elapsed().as_secs().max(1));

    // A: a steady load of every event type, for the rest of the test.
    let load = {
        let types: Vec<String> = env_a.catalog.events.keys().cloned().collect();
        let env_a = std::sync::Arc::new(env_a);
        let e = env_a.clone();
        let task = tokio::spawn(async move {
            for i in 0.. {
                let t = &types[i % types.len()];
                e.insert(t, example_payload(t)).await;
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        (env_a, task)
    };

    // B: one event published, one dead-lettered.
    env_b
        .insert(
            "money.wallet.credited",
            example_payload("money.wallet.credited"),
        )
        .await;
    let mut bad = example_payload("money.wallet.credited");
    bad["amountCents"] = json!("100");
    env_b.insert("money.wallet.credited", bad).await;
    until(
        "B dead-lettered its invalid event",
        Duration::from_secs(30),
        || {
            let q = format!("sum(outbox_events_dead_lettered_total{{source=\"{source_b}\"}}) > 0");
            (!query(port_prom, &q).is_empty())
                .then_some(())
                .ok_or_else(|| "not yet".into())
        },
    )
    .await;

    // B's broker stops; events 20 minutes old wait for it.
    tokio::task::spawn_blocking(|| kafka_script("down"))
        .await
        .unwrap();
    let writer = env_b.writer("money").await;
    for _ in 0..50 {
        sqlx::query("INSERT INTO outbox (event_id, event_type, payload, occurred_at) VALUES ($1, $2, $3, now() - interval '20 minutes')")
            .bind(outbox_relay::writer::new_event_id())
            .bind("money.wallet.debited")
            .bind(example_payload("money.wallet.debited"))
            .execute(&writer)
            .await
            .unwrap();
    }

    // Which alerts fire where: (alert, label, value) → should fire.
    let inst_a = la.clone();
    let inst_b = lb.clone();
    let inst_dead = listen(port_dead);
    let mut expected: BTreeMap<&str, Vec<(&str, String, bool)>> = BTreeMap::new();
    for name in [
        "OutboxLagHigh",
        "OutboxLagCritical",
        "OutboxDlqGrowing",
        "OutboxDlqNotEmpty",
        "OutboxPublishFailing",
    ] {
        expected.insert(
            name,
            vec![
                ("source", source_b.clone(), true),
                ("source", source_a.clone(), false),
            ],
        );
    }
    // B's dead entry is minutes old, not a week; no broker denies an ACL.
    for name in [
        "OutboxPartitionsWithoutOwner",
        "OutboxDatabaseErrors",
        "OutboxDlqEntriesOld",
        "OutboxTopicAuthorizationFailed",
    ] {
        expected.insert(
            name,
            vec![
                ("source", source_a.clone(), false),
                ("source", source_b.clone(), false),
            ],
        );
    }
    expected.insert(
        "OutboxRelayDown",
        vec![
            ("instance", inst_dead.clone(), true),
            ("instance", inst_a.clone(), false),
            ("instance", inst_b.clone(), false),
        ],
    );
    expected.insert("OutboxRelayAllDown", vec![]);
    let rules = alert_rules();
    let names: Vec<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        expected.keys().copied().collect(),
        "every alert of deploy/prometheus/alerts.yml needs its expectation here"
    );

    let firing = |alert: &str, label: &str, value: &str| {
        !query(
            port_prom,
            &format!("ALERTS{{alertname=\"{alert}\",alertstate=\"firing\",{label}=\"{value}\"}}"),
        )
        .is_empty()
    };
    until("the expected alerts fire", Duration::from_secs(120), || {
        let missing: Vec<String> = expected
            .iter()
            .flat_map(|(a, cases)| cases.iter().map(move |c| (a, c)))
            .filter(|(a, (l, v, fire))| *fire && !firing(a, l, v))
            .map(|(a, (l, v, _))| format!("{a}{{{l}={v}}}"))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("not firing: {missing:?}"))
        }
    })
    .await;
    // Let A's rates settle over a few more scrapes under load.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // The report: every panel and alert with its result.
    let mut report = Vec::new();
    let regex = format!("{source_a}|{source_b}");
    for (title, expr) in dashboard_exprs() {
        let q = expr
            .replace("$source", &regex)
            .replace("$__rate_interval", "15s")
            .replace("$__range", "10m");
        let r = query(port_prom, &q);
        report.push(format!("panel  {title:<58} {:>3} series  {expr}", r.len()));
        assert!(!r.is_empty(), "panel `{title}`: `{q}` returned no series");
    }
    // The dashboard's source variable lists both sources.
    let v = api(
        port_prom,
        &format!(
            "/api/v1/label/source/values?match[]={}",
            percent_encode("outbox_pending_events")
        ),
    );
    for s in [&source_a, &source_b] {
        assert!(v["data"].as_array().unwrap().contains(&json!(s)), "{v}");
    }
    // Histograms carry the source: A's own latency and batch size.
    for h in [
        "outbox_publish_latency_seconds_count",
        "outbox_batch_size_count",
        "outbox_claim_duration_seconds_count",
    ] {
        let q = format!("{h}{{source=\"{source_a}\"}} > 0");
        assert!(!query(port_prom, &q).is_empty(), "{q}");
    }
    for (name, expr) in &rules {
        let body = alert_body(expr);
        let r = query(port_prom, &body);
        assert!(!r.is_empty(), "alert {name}: `{body}` returned no series");
        let mut outcome = Vec::new();
        for (label, value, fire) in &expected[name.as_str()] {
            // Fired at some point since both relays were scraped, or never.
            let ever = !query(
                port_prom,
                &format!(
                    "max_over_time(ALERTS{{alertname=\"{name}\",alertstate=\"firing\",{label}=\"{value}\"}}[{}])",
                    since()
                ),
            )
            .is_empty();
            assert_eq!(
                ever,
                *fire,
                "alert {name} for {label}={value}: expected {}",
                if *fire { "firing" } else { "never firing" }
            );
            let who = if value == &source_a || value == &inst_a {
                "A (load)"
            } else if value == &source_b || value == &inst_b {
                "B (DLQ, broker down)"
            } else {
                "dead target"
            };
            outcome.push(format!("{who}: {}", if ever { "FIRES" } else { "silent" }));
        }
        if name == "OutboxRelayAllDown" {
            let ever = !query(
                port_prom,
                &format!(
                    "max_over_time(ALERTS{{alertname=\"OutboxRelayAllDown\"}}[{}])",
                    since()
                ),
            )
            .is_empty();
            assert!(!ever, "OutboxRelayAllDown fired while two relays ran");
            outcome.push("silent".into());
        }
        report.push(format!(
            "alert  {name:<30} {:>3} series  {}",
            r.len(),
            outcome.join(", ")
        ));
    }
    println!("{}", report.join("\n"));
    println!(
        "{}; observability test took {:.0}s",
        timings.join(", "),
        started.elapsed().as_secs_f64()
    );

    load.1.abort();
    let (status, log) = relay_a.terminate();
    assert!(status.success(), "relay A: {log}");
    drop(relay_b);
    drop(load.0);
}
