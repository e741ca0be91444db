//! TLS and SASL to Kafka for real: a broker of this suite's own
//! (scripts/tls-env.sh) with an SSL listener and a SASL_SSL listener
//! (SCRAM-SHA-512), certificates made on this machine by scripts/tls.sh.
//! The `outbox-relay run` binary publishes through each; a wrong password,
//! a CA that did not sign the broker's certificate and an expired
//! certificate each stop start-up with an error naming the setting. The
//! relay's PostgreSQL connections use `sslmode=verify-full` throughout.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::common::*;

/// The broker's state directory, ports and credentials (scripts/tls.env).
fn tls_env(key: &str) -> String {
    env_value(&env_file(include_str!("../../scripts/tls.env")), key)
}

fn certs(file: &str) -> String {
    PathBuf::from(tls_env("OUTBOX_STATE_DIR"))
        .join("certs")
        .join(file)
        .display()
        .to_string()
}

/// Starts (or finds running) the TLS/SASL broker; once per test process.
async fn services() {
    static UP: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    UP.get_or_init(|| async {
        script_async("tls-env.sh", &["up"], &[]).await;
    })
    .await;
}

async fn env() -> TestEnv {
    services().await;
    TestEnv::on_services(
        &server_superuser_url(),
        &format!("127.0.0.1:{}", tls_env("OUTBOX_KAFKA_PORT")),
        3,
    )
    .await
}

fn ssl(ca: &str) -> Vec<(String, String)> {
    vec![
        (
            "OUTBOX_RELAY_KAFKA__BROKERS".into(),
            format!("localhost:{}", tls_env("OUTBOX_KAFKA_SSL_PORT")),
        ),
        ("OUTBOX_RELAY_KAFKA__SECURITY_PROTOCOL".into(), "ssl".into()),
        ("OUTBOX_RELAY_KAFKA__TLS__CA_LOCATION".into(), certs(ca)),
    ]
}

fn sasl_ssl(password: &str) -> Vec<(String, String)> {
    vec![
        (
            "OUTBOX_RELAY_KAFKA__BROKERS".into(),
            format!("localhost:{}", tls_env("OUTBOX_KAFKA_SASL_SSL_PORT")),
        ),
        (
            "OUTBOX_RELAY_KAFKA__SECURITY_PROTOCOL".into(),
            "sasl_ssl".into(),
        ),
        (
            "OUTBOX_RELAY_KAFKA__TLS__CA_LOCATION".into(),
            certs("ca.crt"),
        ),
        (
            "OUTBOX_RELAY_KAFKA__SASL__MECHANISM".into(),
            "SCRAM-SHA-512".into(),
        ),
        (
            "OUTBOX_RELAY_KAFKA__SASL__USERNAME".into(),
            tls_env("OUTBOX_TLS_SCRAM_USER"),
        ),
        ("OUTBOX_RELAY_KAFKA__SASL__PASSWORD".into(), password.into()),
    ]
}

fn spawn(env: &TestEnv, vars: &[(String, String)]) -> Spawned {
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.spawn_process(&refs)
}

/// The relay role's URL with `sslmode=verify-full` against the suite's CA
/// (scripts/pg.sh turns TLS on with the certificates of scripts/tls.sh).
fn verify_full_url(env: &TestEnv, ca: &str) -> String {
    let state =
        std::env::var("OUTBOX_STATE_DIR").unwrap_or_else(|_| "/var/tmp/outbox-relay".into());
    format!(
        "{}?sslmode=verify-full&sslrootcert={state}/certs/{ca}",
        env.relay_url()
    )
}

async fn publishes_through(mut vars: Vec<(String, String)>) {
    let env = env().await;
    vars.push(("DATABASE_URL".into(), verify_full_url(&env, "ca.crt")));
    let relay = spawn(&env, &vars);
    let id = env
        .insert("auth.user.created", example_payload("auth.user.created"))
        .await;
    let got = env
        .consume(
            &[env.topic("platform.auth.events")],
            1,
            Duration::from_secs(60),
        )
        .await;
    // Every connection of the relay's role is TLS (superuser: reading other
    // sessions' pg_stat_ssl rows needs it).
    let (tls, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
           FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.usename = $1",
    )
    .bind(&env.relay_role)
    .fetch_one(env.fixtures())
    .await
    .unwrap();
    let (status, log) = relay.terminate();
    assert!(
        tls > 0 && plain == 0,
        "relay connections: {tls} TLS, {plain} plain"
    );
    assert_eq!(got.len(), 1, "nothing arrived; the relay's log:\n{log}");
    assert_eq!(got[0].headers["ce_id"], id);
    assert!(status.success(), "{log}");
}

/// Runs the relay until it exits (it must, within a minute): its stderr.
async fn start_up_error(vars: Vec<(String, String)>) -> String {
    let env = env().await;
    let mut relay = spawn(&env, &vars);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = relay.try_wait().unwrap() {
            assert!(!status.success());
            use std::io::Read;
            let mut log = String::new();
            if let Some(mut pipe) = relay.stderr.take() {
                pipe.read_to_string(&mut log).unwrap();
            }
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "the relay kept running with a bad TLS/SASL setting"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_through_an_ssl_listener() {
    publishes_through(ssl("ca.crt")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_through_a_sasl_ssl_scram_sha_512_listener() {
    publishes_through(sasl_ssl(&tls_env("OUTBOX_TLS_SCRAM_PASSWORD"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_start_up_naming_the_setting() {
    let log = start_up_error(sasl_ssl("not-the-password")).await;
    assert!(
        log.contains("kafka.sasl.password: the broker refused the credentials of user `relay`"),
        "{log}"
    );
    assert!(
        !log.contains("not-the-password"),
        "the password leaked: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_stops_start_up_naming_the_setting() {
    let log = start_up_error(ssl("other-ca.crt")).await;
    assert!(
        log.contains("kafka.tls.ca_location: the broker's certificate is not signed by a CA in")
            && log.contains("other-ca.crt"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_stops_start_up_naming_the_setting() {
    let mut vars = ssl("ca.crt");
    vars.push((
        "OUTBOX_RELAY_KAFKA__TLS__CERTIFICATE_LOCATION".into(),
        certs("expired.crt"),
    ));
    vars.push((
        "OUTBOX_RELAY_KAFKA__TLS__KEY_LOCATION".into(),
        certs("expired.key"),
    ));
    let log = start_up_error(vars).await;
    assert!(
        log.contains("kafka.tls.certificate_location: the certificate CN=expired relay client")
            && log.contains("expired on Jan  2 00:00:00 2020 GMT; renew it"),
        "{log}"
    );
}
