//! The container image, built from the repository's `Dockerfile` unchanged
//! (scripts/image.sh: podman with runc, local base images, `--pull=never`)
//! and run against the suite's PostgreSQL and Kafka: `migrate`, `topics
//! ensure` and `run` from the image, an event arrives, the process is not
//! root, and `podman stop` (SIGTERM) ends it with exit code 0 within the
//! grace period. Prints the image size.
//!
//! Slow (a release build inside the builder image): ignored by a plain
//! `cargo test`; scripts/test.sh runs it with `--ignored`.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const IMAGE: &str = "localhost/outbox-relay:test";

/// `bash scripts/image.sh ARGS`, whatever its exit status (see [`ok`]): the
/// container's clean-up ignores a failure.
fn image_sh(args: &[&str]) -> Output {
    Command::new("bash")
        .arg("scripts/image.sh")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running scripts/image.sh")
}

fn ok(out: &Output, what: &str) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// `podman run --rm` of the image with this host's settings (scripts/image.sh run).
fn run_image(env: &[(&str, String)], args: &[&str]) -> Output {
    let mut cmd = vec!["run".to_string(), "--rm".into()];
    for (k, v) in env {
        cmd.push("-e".into());
        cmd.push(format!("{k}={v}"));
    }
    cmd.push(IMAGE.into());
    cmd.extend(args.iter().map(|a| a.to_string()));
    let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
    image_sh(&refs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "builds the container image (minutes); scripts/test.sh runs it"]
async fn the_image_migrates_ensures_topics_runs_as_non_root_and_stops_cleanly() {
    let t0 = Instant::now();
    let out = tokio::task::spawn_blocking(|| image_sh(&["build"]))
        .await
        .unwrap();
    ok(&out, "scripts/image.sh build");
    let built_in = t0.elapsed();

    let env = TestEnv::new().await;
    let base = [
        (
            "OUTBOX_RELAY_KAFKA__BROKERS",
            env.settings.kafka.brokers.clone(),
        ),
        ("OUTBOX_RELAY_KAFKA__TOPIC_PREFIX", env.prefix.clone()),
        (
            "OUTBOX_RELAY_RELAY__SOURCE",
            env.settings.relay.source.clone(),
        ),
        (
            "OUTBOX_RELAY_TOPICS__PARTITIONS",
            env.settings.topics.partitions.to_string(),
        ),
    ];
    // migrate as the schema owner (nothing left to apply: the environment
    // is migrated; the image's binary checks and says so).
    let mut migrate_env = base.to_vec();
    migrate_env.push(("DATABASE_URL", env.fixtures_url().to_string()));
    let text = ok(&run_image(&migrate_env, &["migrate"]), "migrate");
    assert!(text.contains("catalog events mirrored"), "{text}");
    let text = ok(&run_image(&base, &["topics", "ensure"]), "topics ensure");
    assert!(text.contains("up to date"), "{text}");

    // run, detached, as the relay role.
    let name = format!("outbox-relay-test-{}", env.id);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut args = vec![
        "run".to_string(),
        "-d".into(),
        "--name".into(),
        name.clone(),
        "-e".into(),
        format!("DATABASE_URL={}", env.relay_url()),
        "-e".into(),
        format!("OUTBOX_RELAY_HTTP__LISTEN=127.0.0.1:{port}"),
    ];
    for (k, v) in &base {
        args.push("-e".into());
        args.push(format!("{k}={v}"));
    }
    args.push(IMAGE.into());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&image_sh(&refs), "podman run -d");
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = image_sh(&["podman", "rm", "-f", &self.0]);
        }
    }
    let _remove = Remove(name.clone());

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
    let logs = || ok(&image_sh(&["podman", "logs", &name]), "podman logs");
    assert_eq!(
        got.len(),
        1,
        "nothing arrived; the container's log:\n{}",
        logs()
    );
    assert_eq!(got[0].headers["ce_id"], id);

    // Not root: the relay runs as uid/gid 10001.
    let status = ok(
        &image_sh(&["podman", "exec", &name, "cat", "/proc/1/status"]),
        "podman exec",
    );
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    assert_eq!(uid, "10001", "{status}");

    // SIGTERM within the compose file's grace period (40 s): exit code 0.
    let t = Instant::now();
    ok(
        &image_sh(&["podman", "stop", "-t", "40", &name]),
        "podman stop",
    );
    let stopped_in = t.elapsed();
    let code = ok(
        &image_sh(&[
            "podman",
            "inspect",
            "--format",
            "{{.State.ExitCode}}",
            &name,
        ]),
        "podman inspect",
    );
    assert_eq!(code.trim(), "0", "exit code; log:\n{}", logs());
    assert!(stopped_in < Duration::from_secs(40), "{stopped_in:?}");
    assert!(
        logs().contains("relay stopped") || logs().contains("stopp"),
        "{}",
        logs()
    );

    let size = ok(
        &image_sh(&["podman", "image", "inspect", "--format", "{{.Size}}", IMAGE]),
        "podman image inspect",
    );
    let bytes: f64 = size.trim().parse().unwrap();
    println!(
        "image {IMAGE}: {:.1} MiB; build {:.0}s; stopped in {:.1}s",
        bytes / 1048576.0,
        built_in.as_secs_f64(),
        stopped_in.as_secs_f64()
    );
    assert!(bytes < 300.0 * 1048576.0, "the image grew to {bytes} bytes");
}
