//! Upgrading in place from the previous release, against real Postgres and
//! real Kafka: a database built with that release's migrations and filled
//! the way its roles fill it (pending events of several publishers, rows
//! under retry, DLQ entries in every state, dedupe rows, parked events,
//! leases of a running relay) is migrated by this binary and relayed by it,
//! and nothing is lost. Also: the guard that keeps released migrations
//! unchanged, and what `migrate --dry-run`, start-up and `/readyz` say about
//! a schema older or newer than the binary.
//!
//! The previous release is the newest `tests/fixtures/release-<version>/`:
//! byte copies of `migrations/` at the commit CHANGELOG.md records for that
//! release. After each release, add a fixture directory for it (copy each
//! file with `git show <commit>:migrations/<file>`); these tests then target
//! it, and the older fixtures stay as the record.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use outbox_relay::config::Secret;
use outbox_relay::consumer::{Consumer, ConsumerSettings, Manifest};
use outbox_relay::sql::{self, DlqFilter};
use serde_json::{json, Value};
use sqlx::migrate::Migrator;
use sqlx::PgPool;

use tokio_util::sync::CancellationToken;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

// ------------------------------------------------------------- releases

/// A release fixture: its version, its migrations directory, and the commit
/// CHANGELOG.md records for it.
struct Release {
    version: String,
    migrations: PathBuf,
    commit: Option<String>,
}

fn semver(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.').map(|p| p.parse::<u64>().ok());
    let parsed = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(parsed)
}

/// The newest `tests/fixtures/release-<version>/`.
fn previous_release() -> Release {
    let dir = Path::new(ROOT).join("tests/fixtures");
    let version = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let v = name.strip_prefix("release-")?.to_string();
            Some((semver(&v)?, v))
        })
        .max()
        .map(|(_, v)| v)
        .expect("no tests/fixtures/release-<version>/ directory: the last release's migrations are missing");
    let changelog = std::fs::read_to_string(Path::new(ROOT).join("CHANGELOG.md"))
        .expect("CHANGELOG.md is missing");
    Release {
        commit: release_commit(&changelog, &version),
        migrations: dir.join(format!("release-{version}/migrations")),
        version,
    }
}

/// The commit named ("commit <hash>") in the section of `version` of the changelog.
fn release_commit(changelog: &str, version: &str) -> Option<String> {
    let heading = format!("## [{version}]");
    let section: String = changelog
        .lines()
        .skip_while(|l| !l.starts_with(&heading))
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect::<Vec<_>>()
        .join(" ");
    let words: Vec<&str> = section.split_whitespace().collect();
    words.windows(2).find_map(|w| {
        let hash = w[1].trim_end_matches(['.', ',', ')', ';']);
        (w[0] == "commit"
            && (7..=40).contains(&hash.len())
            && hash.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| hash.to_string())
    })
}

fn sql_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    names.sort();
    names
}

/// Every way `migrations` differs from the released files in `fixture`:
/// a released file that is missing or changed. New files are fine.
fn guard_problems(version: &str, fixture: &Path, migrations: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for name in sql_files(fixture) {
        let released = std::fs::read(fixture.join(&name)).unwrap();
        match std::fs::read(migrations.join(&name)) {
            Err(_) => problems.push(format!(
                "migrations/{name} of release {version} is missing: every database of that \
                 release has applied it, and sqlx stops on an applied migration it cannot find; \
                 restore it, and put the change in a new migration"
            )),
            Ok(current) if current != released => problems.push(format!(
                "migrations/{name} differs from release {version} \
                 (tests/fixtures/release-{version}/migrations/{name}): every database of that \
                 release has applied it, and sqlx refuses to migrate on a checksum mismatch; \
                 restore the released file, and put the change in a new migration"
            )),
            Ok(_) => {}
        }
    }
    problems
}

fn git(args: &[&str]) -> Option<Vec<u8>> {
    let out = Command::new("git")
        .args(args)
        .current_dir(ROOT)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

/// The claim of the 0.1.0 relay (its `sql::claim_statement(true)`), which
/// may still run while `migrate` upgrades its database.
const OLD_RELAY_CLAIM: &str = "DELETE FROM outbox WHERE id = ANY(ARRAY( \
     SELECT id FROM outbox \
      WHERE id > $2 AND available_at <= now() AND vpartition = ANY($3) \
      ORDER BY id \
      LIMIT $1)) \
 RETURNING id";

#[tokio::test]
async fn migrations_of_the_last_release_are_unchanged() {
    let release = previous_release();
    let commit = release.commit.clone().unwrap_or_else(|| {
        panic!(
            "CHANGELOG.md records no commit for release {}: write \"commit <hash>\" under its heading",
            release.version
        )
    });
    let files = sql_files(&release.migrations);
    assert!(
        !files.is_empty(),
        "{}: no migrations",
        release.migrations.display()
    );

    let mut problems = guard_problems(
        &release.version,
        &release.migrations,
        &Path::new(ROOT).join("migrations"),
    );
    // The same, as sqlx sees it: the binary embeds every released
    // migration under its version, description and checksum.
    let released = Migrator::new(release.migrations.as_path()).await.unwrap();
    for m in released.iter() {
        match sql::MIGRATOR.iter().find(|c| c.version == m.version) {
            None => problems.push(format!(
                "the binary does not embed migration {:04} {} of release {}; put the change in a new migration",
                m.version, m.description, release.version
            )),
            Some(c) if c.checksum != m.checksum || c.description != m.description => {
                problems.push(format!(
                    "the binary's migration {:04} {} has another checksum than release {}'s; put the change in a new migration",
                    c.version, c.description, release.version
                ))
            }
            Some(_) => {}
        }
    }

    // The fixture itself must be the release: checked against git's copy
    // when the history is there (a shallow clone may lack the commit).
    if git(&["cat-file", "-e", &format!("{commit}^{{commit}}")]).is_some() {
        let listed = git(&["ls-tree", "--name-only", &commit, "migrations/"]).unwrap();
        let at_release: Vec<String> = String::from_utf8(listed)
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("migrations/"))
            .filter(|n| n.ends_with(".sql"))
            .map(String::from)
            .collect();
        if at_release != files {
            problems.push(format!(
                "tests/fixtures/release-{}/migrations holds {files:?}, but commit {commit} has {at_release:?}",
                release.version
            ));
        }
        for name in &at_release {
            let original = git(&["show", &format!("{commit}:migrations/{name}")]).unwrap();
            if std::fs::read(release.migrations.join(name)).ok() != Some(original) {
                problems.push(format!(
                    "tests/fixtures/release-{v}/migrations/{name} is not the file of commit {commit}: \
                     regenerate it with `git show {commit}:migrations/{name}`",
                    v = release.version
                ));
            }
        }
    } else {
        eprintln!(
            "commit {commit} is not in this clone's history: the fixture was compared with migrations/ only"
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_guard_names_an_edited_or_removed_migration() {
    let release = previous_release();
    let dir = tempfile::tempdir().unwrap();
    let files = sql_files(&release.migrations);
    for name in &files {
        std::fs::copy(release.migrations.join(name), dir.path().join(name)).unwrap();
    }
    std::fs::write(dir.path().join("9999_later.sql"), "SELECT 1;\n").unwrap();
    assert!(
        guard_problems(&release.version, &release.migrations, dir.path()).is_empty(),
        "an added migration is allowed"
    );

    let edited = &files[files.len() / 2];
    let mut text = std::fs::read(dir.path().join(edited)).unwrap();
    text.extend_from_slice(b"\n-- a later fix\n");
    std::fs::write(dir.path().join(edited), text).unwrap();
    std::fs::remove_file(dir.path().join(&files[0])).unwrap();
    let problems = guard_problems(&release.version, &release.migrations, dir.path());
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with(&format!("migrations/{} of release", files[0])));
    assert!(problems[0].contains("is missing"));
    assert!(problems[1].starts_with(&format!("migrations/{edited} differs from release")));
    assert!(problems
        .iter()
        .all(|p| p.contains("put the change in a new migration")));
}

#[test]
fn the_changelog_records_the_commit_of_each_release() {
    let text = "## [Unreleased]\n\n## [0.3.0] - 2027-01-05\n\nReleased from commit 0123abc.\n\n## [0.2.0] - x\n\nNone here.\n";
    assert_eq!(release_commit(text, "0.3.0").as_deref(), Some("0123abc"));
    assert_eq!(release_commit(text, "0.2.0"), None);
    let release = previous_release();
    assert!(release.commit.is_some(), "release {}", release.version);
}

// -------------------------------------------------------------- helpers

/// A test environment whose schema is what `migrator` makes, applied as the
/// superuser, plus the catalog mirror that `migrate` writes.
async fn env_with(migrator: &Migrator) -> TestEnv {
    let mut env = TestEnv::with_migrator(migrator).await;
    // A relay that stops is replaced within seconds, so that taking over the
    // old relay's leases does not dominate the test's run time.
    env.settings.leases.ttl_ms = 3_000;
    env.settings.leases.renew_interval_ms = 1_000;
    env
}

/// A migrator of `files` of `dir` only (copied to a temporary directory).
async fn migrator_of(dir: &Path, files: &[String]) -> (Migrator, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    for name in files {
        std::fs::copy(dir.join(name), tmp.path().join(name)).unwrap();
    }
    (Migrator::new(tmp.path()).await.unwrap(), tmp)
}

/// The `outbox-relay` binary pointed at `env`, free of the caller's settings.
fn binary(env: &TestEnv, args: &[&str]) -> Command {
    let mut cmd = env.command();
    cmd.args(args);
    // Migrating is the schema owner's job; everything else runs as the relay.
    if args.first() == Some(&"migrate") {
        cmd.env("DATABASE_URL", env.fixtures_url());
    }
    cmd
}

fn dry_run(env: &TestEnv) -> (i32, String) {
    let out = binary(env, &["migrate", "--dry-run"]).output().unwrap();
    (
        out.status.code().expect("migrate --dry-run was killed"),
        output_text(&out),
    )
}

fn latest(m: &Migrator) -> i64 {
    m.iter()
        .map(|m| m.version)
        .max()
        .expect("a migrator without migrations")
}

// ------------------------------------------------- the old release's data

/// The consumer kit's login role, set up as an admin does for the schema
/// the database has: a member of `outbox_consumer` (created when `role` is
/// None), and mapped to its consumer names where the schema maps consumer
/// roles (`outbox_map_consumer`, from the release after 0.1.0 on).
async fn consumer_role(
    env: &TestEnv,
    admin: &PgPool,
    role: Option<String>,
    consumers: &[&str],
) -> String {
    let role = match role {
        Some(r) => r,
        None => env.login_role("consumer", &["outbox_consumer"]).await,
    };
    let maps: bool = sqlx::query_scalar("SELECT to_regproc('outbox_map_consumer') IS NOT NULL")
        .fetch_one(admin)
        .await
        .unwrap();
    if maps {
        for c in consumers {
            sqlx::query("SELECT outbox_map_consumer($1, $2)")
                .bind(&role)
                .bind(c)
                .execute(admin)
                .await
                .unwrap();
        }
    }
    role
}

/// A service's writer login role, mapped to its publisher by the admin role.
async fn writer(env: &TestEnv, admin: &PgPool, what: &str, publisher: &str) -> (String, PgPool) {
    let role = env.login_role(what, &["outbox_writer"]).await;
    sqlx::query("SELECT outbox_map_publisher($1, $2)")
        .bind(&role)
        .bind(publisher)
        .execute(admin)
        .await
        .unwrap();
    let pool = env.pool_as(&role).await;
    (role, pool)
}

/// One event written as a service writes it: a plain INSERT with its own id
/// (a writer may not read the outbox, so nothing is returned).
async fn write(writer: &PgPool, event_type: &str, headers: Option<Value>) -> String {
    let id = outbox_relay::writer::new_event_id();
    sqlx::query(
        "INSERT INTO outbox (event_id, event_type, tenant_id, payload, headers) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&id)
    .bind(event_type)
    .bind("01j9p3kz5f00000000000000")
    .bind(example_payload(event_type))
    .bind(headers)
    .execute(writer)
    .await
    .unwrap_or_else(|e| panic!("writing {event_type}: {e}"));
    id
}

async fn ordering_ids(pool: &PgPool, event_ids: &[String]) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM outbox WHERE event_id = ANY($1) ORDER BY id")
        .bind(event_ids)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Row counts of every table the upgrade must carry over.
async fn counts(pool: &PgPool) -> BTreeMap<&'static str, i64> {
    let queries: [(&str, &str); 11] = [
        ("outbox (pending)", "SELECT count(*) FROM outbox"),
        (
            "outbox under retry",
            "SELECT count(*) FROM outbox WHERE attempts > 0",
        ),
        (
            "outbox_dlq dead",
            "SELECT count(*) FROM outbox_dlq WHERE state = 'dead'",
        ),
        (
            "outbox_dlq replayed",
            "SELECT count(*) FROM outbox_dlq WHERE state = 'replayed'",
        ),
        (
            "outbox_dlq discarded",
            "SELECT count(*) FROM outbox_dlq WHERE state = 'discarded'",
        ),
        (
            "processed_event_ids",
            "SELECT count(*) FROM processed_event_ids",
        ),
        (
            "consumer_parked_events",
            "SELECT count(*) FROM consumer_parked_events",
        ),
        (
            "outbox_leases held",
            "SELECT count(*) FROM outbox_leases WHERE owner IS NOT NULL",
        ),
        ("outbox_relays", "SELECT count(*) FROM outbox_relays"),
        (
            "outbox_publisher_roles",
            "SELECT count(*) FROM outbox_publisher_roles",
        ),
        ("outbox_catalog", "SELECT count(*) FROM outbox_catalog"),
    ];
    let mut out = BTreeMap::new();
    for (name, q) in queries {
        out.insert(name, sqlx::query_scalar(q).fetch_one(pool).await.unwrap());
    }
    out
}

/// Every row of the tables the upgrade must carry over, as JSON text.
async fn snapshot(pool: &PgPool) -> Vec<String> {
    let tables = [
        "SELECT 'outbox' AS t, id, event_id, event_type, tenant_id, payload, headers, occurred_at, \
                available_at, attempts, unknown_failures, last_error, first_failed_at, publisher, vpartition \
           FROM outbox",
        "SELECT 'dlq' AS t, * FROM outbox_dlq",
        "SELECT 'processed' AS t, * FROM processed_event_ids",
        "SELECT 'parked' AS t, * FROM consumer_parked_events",
        "SELECT 'lease' AS t, * FROM outbox_leases",
        "SELECT 'relay' AS t, * FROM outbox_relays",
        "SELECT 'publisher' AS t, role_name, publisher FROM outbox_publisher_roles",
    ];
    let mut rows = Vec::new();
    for q in tables {
        let mut part: Vec<String> =
            sqlx::query_scalar(&format!("SELECT to_jsonb(r)::text FROM ({q}) r"))
                .fetch_all(pool)
                .await
                .unwrap();
        part.sort();
        rows.extend(part);
    }
    rows
}

fn print_counts(columns: &[(&str, &BTreeMap<&'static str, i64>)]) {
    let mut header = format!("{:<24}", "table");
    for (name, _) in columns {
        header.push_str(&format!("{name:>16}"));
    }
    println!("{header}");
    for key in columns[0].1.keys() {
        let mut line = format!("{key:<24}");
        for (_, c) in columns {
            line.push_str(&format!("{:>16}", c[key]));
        }
        println!("{line}");
    }
}

// ------------------------------------------------------- the upgrade test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installation_of_the_last_release_upgrades_in_place_and_loses_nothing() {
    outbox_relay::metrics_handle().unwrap();
    let release = previous_release();
    let old = Migrator::new(release.migrations.as_path()).await.unwrap();
    let env = env_with(&old).await;
    println!(
        "release {} (commit {}) -> {}: database {}",
        release.version,
        release.commit.as_deref().unwrap_or("?"),
        outbox_relay::VERSION,
        env.db_name
    );

    // --- The old release's roles, as its README sets them up.
    let admin_role = env.login_role("admin", &["outbox_admin"]).await;
    let admin = env.pool_as(&admin_role).await;
    let relay_role = env.login_role("relay", &["outbox_relay"]).await;
    let relay_db = env.pool_as(&relay_role).await;
    let (iam_role, iam) = writer(&env, &admin, "iam_svc", "iam").await;
    let (money_role, money) = writer(&env, &admin, "money_svc", "money").await;
    let (files_role, files) = writer(&env, &admin, "files_svc", "file-storage").await;
    let (billing_role, billing) = writer(&env, &admin, "billing_svc", "billing").await;
    let crm = format!("crm-{}", unique());
    let audit_sync = format!("audit-sync-{}", unique());
    let consumer = consumer_role(&env, &admin, None, &[&crm, &audit_sync]).await;
    let consumer_db = env.pool_as(&consumer).await;

    // --- Pending events of several publishers and types.
    let corr = Some(
        json!({"correlationId": "corr-upgrade", "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}),
    );
    let mut pending: Vec<String> = Vec::new();
    for _ in 0..4 {
        pending.push(write(&iam, "auth.user.created", corr.clone()).await);
    }
    pending.push(write(&iam, "auth.user.logged_in", None).await);
    pending.push(write(&iam, "auth.role.changed", None).await);
    for _ in 0..3 {
        pending.push(write(&money, "money.wallet.credited", corr.clone()).await);
    }
    pending.push(write(&money, "money.wallet.debited", None).await);
    pending.push(write(&files, "files.file.uploaded", None).await);
    pending.push(write(&files, "files.file.uploaded", None).await);
    pending.push(write(&billing, "billing.plan.changed", None).await);
    pending.push(write(&billing, "billing.subscription.changed", None).await);
    // A writer of the old release can still not publish another's events.
    let forbidden = sqlx::query(
        "INSERT INTO outbox (event_type, payload) VALUES ('money.wallet.credited', '{}'::jsonb)",
    )
    .execute(&iam)
    .await
    .unwrap_err();
    assert_eq!(db_error(&forbidden).0, "42501");

    // --- Rows under retry, through the relay's retry function: two due
    // again already (the same failure twice, one of unknown class), two not
    // due for a few seconds. Called as the owner, as a relay of this release
    // running as the owner does: the release's `outbox_relay` group role
    // lacks UPDATE on `outbox.unknown_failures` (added in 0003 without a
    // grant), so a least-privilege relay of 0.1.0 stopped at its first
    // retry instead of leaving rows like these.
    let due_again = ordering_ids(env.fixtures(), &pending[6..8]).await;
    let later = ordering_ids(env.fixtures(), &pending[8..10]).await;
    for (ids, unknown, base_ms) in [
        (&due_again, vec![false, true], 1_i64),
        (&due_again, vec![false, false], 1),
        (&later, vec![false, false], 4_000),
    ] {
        let exhausted: Vec<i64> =
            sqlx::query_scalar("SELECT outbox_schedule_retry($1, $2, $3, 5, $4, $4)")
                .bind(ids)
                .bind(vec!["broker transport failure".to_string(); ids.len()])
                .bind(unknown)
                .bind(base_ms)
                .fetch_all(env.fixtures())
                .await
                .unwrap();
        assert!(exhausted.is_empty());
    }

    // --- DLQ entries in every state: dead-lettered by the old relay; one
    // discarded and one replayed (back in the outbox) by the admin role.
    let mut dead = Vec::new();
    for _ in 0..4 {
        dead.push(write(&money, "money.wallet.credited", None).await);
    }
    let dead_ids = ordering_ids(env.fixtures(), &dead).await;
    let moved: i32 = sqlx::query_scalar("SELECT outbox_dead_letter($1, $2, $3)")
        .bind(&dead_ids)
        .bind(vec![
            "topic_authorization_failed",
            "topic_authorization_failed",
            "invalid_payload",
            "invalid_payload",
        ])
        .bind(vec!["denied by the broker".to_string(); 4])
        .fetch_one(&relay_db)
        .await
        .unwrap();
    assert_eq!(moved, 4);
    let discarded: Vec<String> =
        sqlx::query_scalar("SELECT outbox_dlq_discard('test data', p_event_id => $1)")
            .bind(&dead[2])
            .fetch_all(&admin)
            .await
            .unwrap();
    assert_eq!(discarded, vec![dead[2].clone()]);
    let replayed: bool = sqlx::query_scalar("SELECT outbox_dlq_replay_event($1)")
        .bind(&dead[3])
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(replayed);
    pending.push(dead[3].clone());
    let still_dead = [dead[0].clone(), dead[1].clone()];

    // --- The consumer side: dedupe rows (one for an event still pending,
    // which must never reach the handler) and parked events.
    let already_processed = pending[0].clone();
    for (consumer_name, event_id) in [
        (&crm, already_processed.clone()),
        (&crm, outbox_relay::writer::new_event_id()),
        (&crm, outbox_relay::writer::new_event_id()),
        (&audit_sync, outbox_relay::writer::new_event_id()),
    ] {
        sqlx::query("INSERT INTO processed_event_ids (consumer, event_id) VALUES ($1, $2)")
            .bind(consumer_name)
            .bind(event_id)
            .execute(&consumer_db)
            .await
            .unwrap();
    }
    for (consumer_name, n) in [(&crm, 1), (&audit_sync, 2)] {
        sqlx::query(
            "INSERT INTO consumer_parked_events \
                 (consumer, event_id, event_type, topic, \"partition\", \"offset\", envelope, last_error, attempts) \
             VALUES ($1, $2, 'auth.user.created', 'platform.auth.events', 0, $3, $4, 'handler failed', 3)",
        )
        .bind(consumer_name)
        .bind(outbox_relay::writer::new_event_id())
        .bind(n as i64)
        .bind(json!({"id": "x", "type": "auth.user.created"}))
        .execute(&consumer_db)
        .await
        .unwrap();
    }

    // --- An old relay that still runs: registered, holding every partition
    // under a lease that expires soon, and in the middle of a claim.
    let old_relay = format!("old-relay-{}", unique());
    sqlx::query(
        "INSERT INTO outbox_relays (relay_id, source, host, version) VALUES ($1, $2, 'old-host', $3)",
    )
    .bind(&old_relay)
    .bind(&env.settings.relay.source)
    .bind(&release.version)
    .execute(&relay_db)
    .await
    .unwrap();
    let held: Vec<(i16, i64)> =
        sqlx::query_as("SELECT vpartition, epoch FROM outbox_lease_acquire($1, 3000, 4096)")
            .bind(&old_relay)
            .fetch_all(&relay_db)
            .await
            .unwrap();
    let old_epochs: HashMap<i16, i64> = held.iter().copied().collect();
    let partitions: i32 = sqlx::query_scalar("SELECT vpartitions FROM outbox_config")
        .fetch_one(env.fixtures())
        .await
        .unwrap();
    assert_eq!(held.len(), partitions as usize);

    let before = counts(env.fixtures()).await;
    let rows_before = snapshot(env.fixtures()).await;
    let pending_partitions: Vec<i16> = sqlx::query_scalar("SELECT DISTINCT vpartition FROM outbox")
        .fetch_all(env.fixtures())
        .await
        .unwrap();
    assert_eq!(before["outbox (pending)"], pending.len() as i64);

    // The old relay claims a batch and holds it, uncommitted, while
    // `migrate` runs; its publish then fails and the claim rolls back.
    let vps: Vec<i16> = held.iter().map(|(vp, _)| *vp).collect();
    let mut claim = sql::begin_claim(&relay_db).await.unwrap();
    let claimed: Vec<i64> = sqlx::query_scalar(OLD_RELAY_CLAIM)
        .bind(5i64)
        .bind(0i64)
        .bind(&vps)
        .fetch_all(&mut *claim)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 5);
    let in_flight = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        claim.rollback().await.unwrap();
    });

    // --- The upgrade: what `migrate --dry-run` says, then the migrations.
    let pending_migrations = sql::MIGRATOR
        .iter()
        .filter(|m| !old.version_exists(m.version))
        .count();
    let (code, out) = dry_run(&env);
    assert_eq!(
        code,
        if pending_migrations == 0 { 0 } else { 3 },
        "{pending_migrations} migration(s) newer than release {}: {out}",
        release.version
    );
    let started = Instant::now();
    sql::migrate(env.fixtures()).await.unwrap();
    println!(
        "migrate took {:?} while the old relay held a claim",
        started.elapsed()
    );
    in_flight.await.unwrap();
    let (code, out) = dry_run(&env);
    assert_eq!(code, 0, "{out}");
    assert!(sql::schema_status(env.fixtures())
        .await
        .unwrap()
        .is_current());

    let migrated = counts(env.fixtures()).await;
    assert_eq!(migrated, before, "the migrations changed rows");
    assert_eq!(
        snapshot(env.fixtures()).await,
        rows_before,
        "the migrations changed rows"
    );
    // Rows the old release rescheduled stay where they failed (0012 moves
    // only rows that fail under an upgraded relay): the claim still finds
    // them by the primary key when they come due, below.
    let (under_retry, moved_apart): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE attempts > 0), count(*) FILTER (WHERE id < 0) FROM outbox",
    )
    .fetch_one(env.fixtures())
    .await
    .unwrap();
    assert_eq!(
        (under_retry, moved_apart),
        (before["outbox under retry"], 0)
    );
    let consumer = consumer_role(&env, &admin, Some(consumer), &[&crm, &audit_sync]).await;

    // --- The current relay, as the relay role, until the outbox is empty:
    // the rows under retry come due, the old relay's leases expire.
    let port = free_port();
    let mut settings = env.settings.clone();
    settings.database.url = Secret::new(env.url_as(&relay_role));
    settings.http.listen = format!("127.0.0.1:{port}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay_task = tokio::spawn(outbox_relay::run(settings, async {
        let _ = stopped.await;
    }));
    let empty = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
            .fetch_one(env.fixtures())
            .await
            .unwrap()
            == 0
    };
    assert!(
        eventually(Duration::from_secs(60), empty).await,
        "the outbox did not drain: {:?}",
        counts(env.fixtures()).await
    );
    // Readiness is re-checked periodically; a busy broker may miss one check.
    let mut ready = (0, String::new());
    for _ in 0..30 {
        ready = get(port, "/readyz").await.expect("GET /readyz");
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (code, body) = ready;
    assert_eq!(code, 200, "{body}");
    let readable: bool =
        sqlx::query_scalar("SELECT has_table_privilege($1, '_sqlx_migrations', 'SELECT')")
            .bind(&relay_role)
            .fetch_one(env.fixtures())
            .await
            .unwrap();
    let latest = latest(&sql::MIGRATOR);
    let schema_line = body.lines().find(|l| l.starts_with("schema: ")).unwrap();
    if readable {
        assert_eq!(schema_line, format!("schema: current ({latest:04})"));
    } else {
        assert_eq!(
            schema_line,
            format!(
                "schema: unknown (role {relay_role} may not read _sqlx_migrations: \
                 GRANT SELECT ON _sqlx_migrations TO outbox_relay, outbox_admin)"
            )
        );
    }

    // --- The DLQ of the old release, through the admin role: listed,
    // replayed (published with its id) and discarded.
    let listed = sql::dlq_list(&admin, &DlqFilter::default(), 100)
        .await
        .unwrap();
    let listed_ids: Vec<&str> = listed.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(
        listed_ids,
        still_dead.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(listed
        .iter()
        .all(|e| e.reason == "topic_authorization_failed"));
    let one = |id: &str| DlqFilter {
        event_id: Some(id.to_string()),
        ..Default::default()
    };
    assert_eq!(
        sql::dlq_replay(&admin, &one(&still_dead[0])).await.unwrap(),
        vec![still_dead[0].clone()]
    );
    assert_eq!(
        sql::dlq_discard(&admin, "not needed after the upgrade", &one(&still_dead[1]))
            .await
            .unwrap(),
        vec![still_dead[1].clone()]
    );
    assert!(sql::dlq_list(&admin, &DlqFilter::default(), 100)
        .await
        .unwrap()
        .is_empty());
    pending.push(still_dead[0].clone());
    assert!(
        eventually(Duration::from_secs(30), empty).await,
        "the replayed event was not published"
    );
    stop.send(()).unwrap();
    relay_task.await.unwrap().unwrap();

    // --- Kafka: every pending event exactly once, with its original id.
    let kafka = env.consumer(&env.all_topics());
    let mut received = read(&kafka, pending.len(), Duration::from_secs(60)).await;
    received.extend(read(&kafka, 1, Duration::from_secs(3)).await);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for r in &received {
        *seen
            .entry(r.value["id"].as_str().unwrap().to_string())
            .or_default() += 1;
        assert_eq!(r.headers["ce_id"], r.value["id"].as_str().unwrap());
    }
    let expected: BTreeSet<String> = pending.iter().cloned().collect();
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "published ids differ from the pending ones"
    );
    assert!(seen.values().all(|n| *n == 1), "duplicates: {seen:?}");
    let by_id: HashMap<&str, &Received> = received
        .iter()
        .map(|r| (r.value["id"].as_str().unwrap(), r))
        .collect();
    let first = by_id[pending[0].as_str()];
    assert_eq!(first.value["type"], "auth.user.created");
    assert_eq!(first.value["source"], "iam");
    assert_eq!(first.value["correlationId"], "corr-upgrade");
    assert_eq!(first.topic, env.topic("platform.auth.events"));
    assert_eq!(by_id[dead[3].as_str()].value["source"], "money");

    // --- The relay's own state: the partitions of the pending events were
    // taken over from the old relay under new epochs (so its fencing holds),
    // and both relays are known.
    let epochs: HashMap<i16, i64> =
        sqlx::query_as::<_, (i16, i64)>("SELECT vpartition, epoch FROM outbox_leases")
            .fetch_all(env.fixtures())
            .await
            .unwrap()
            .into_iter()
            .collect();
    assert!(!pending_partitions.is_empty());
    for vp in &pending_partitions {
        assert!(
            epochs[vp] > old_epochs[vp],
            "partition {vp} was not taken over under a new epoch"
        );
    }
    let versions: Vec<(String, String)> =
        sqlx::query_as("SELECT relay_id, version FROM outbox_relays ORDER BY started_at")
            .fetch_all(env.fixtures())
            .await
            .unwrap();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert_eq!(versions[0], (old_relay.clone(), release.version.clone()));
    assert_eq!(versions[1].1, outbox_relay::VERSION);

    // --- The consumer kit, as the consumer role, under the consumer name
    // that processed one of these events before the upgrade: it skips that
    // one (dedupe holds) and handles the others.
    let manifest = Manifest::parse(
        "module.manifest.json",
        r#"{"name": "@acme/crm", "version": "1.2.0",
            "events": {"subscribes": ["auth.user.created", "money.wallet.credited"]}}"#,
    )
    .unwrap();
    let mut kit_settings = ConsumerSettings::new(&crm, env.settings.kafka.clone());
    kit_settings.retry_min_ms = 20;
    kit_settings.retry_max_ms = 200;
    let mut kit = Consumer::new(
        &manifest,
        env.catalog.clone(),
        env.pool_as(&consumer).await,
        kit_settings,
    )
    .unwrap();
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    for event_type in ["auth.user.created", "money.wallet.credited"] {
        let handled = handled.clone();
        kit.subscribe(event_type, move |_conn, event| {
            let handled = handled.clone();
            Box::pin(async move {
                handled.lock().unwrap().push(event.id.clone());
                Ok(())
            })
        })
        .unwrap();
    }
    let subscribed: BTreeSet<String> = received
        .iter()
        .filter(|r| {
            r.value["type"] == "auth.user.created" || r.value["type"] == "money.wallet.credited"
        })
        .map(|r| r.value["id"].as_str().unwrap().to_string())
        .collect();
    assert!(subscribed.contains(&already_processed));
    let stats = kit.stats();
    let token = CancellationToken::new();
    let kit_task = tokio::spawn(kit.run(token.clone()));
    let want = subscribed.len() as u64 - 1;
    let done = eventually(Duration::from_secs(60), || async {
        let s = stats.snapshot();
        s.processed == want && s.duplicates == 1
    })
    .await;
    token.cancel();
    kit_task.await.unwrap().unwrap();
    assert!(
        done,
        "the consumer kit did not finish: {:?}",
        stats.snapshot()
    );
    let handled: BTreeSet<String> = handled.lock().unwrap().iter().cloned().collect();
    assert!(
        !handled.contains(&already_processed),
        "an event processed before the upgrade reached the handler again"
    );
    assert_eq!(handled.len() as u64, want);
    assert_eq!(
        handled,
        subscribed
            .iter()
            .filter(|id| **id != already_processed)
            .cloned()
            .collect()
    );

    let after = counts(env.fixtures()).await;
    print_counts(&[
        ("before", &before),
        ("after migrate", &migrated),
        ("after relay", &after),
    ]);
    println!(
        "published {} events to Kafka, each once with its original id; consumer kit: {:?}",
        received.len(),
        stats.snapshot()
    );
    assert_eq!(after["outbox (pending)"], 0);
    assert_eq!(after["outbox_dlq dead"], 0);
    assert_eq!(
        after["outbox_dlq replayed"],
        before["outbox_dlq replayed"] + 1
    );
    assert_eq!(
        after["outbox_dlq discarded"],
        before["outbox_dlq discarded"] + 1
    );
    assert_eq!(
        after["processed_event_ids"],
        before["processed_event_ids"] + want as i64
    );
    assert_eq!(
        after["consumer_parked_events"],
        before["consumer_parked_events"]
    );
    assert_eq!(after["outbox_relays"], before["outbox_relays"] + 1);

    for role in [
        admin_role,
        relay_role,
        iam_role,
        money_role,
        files_role,
        billing_role,
        consumer,
    ] {
        env.drop_role(&role).await;
    }
}

// ------------------------------------------- schema older or newer than us

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_start_up_and_readyz_say_how_the_schema_differs_from_the_binary() {
    // A database one migration behind this binary.
    let dir = Path::new(ROOT).join("migrations");
    let mut files = sql_files(&dir);
    let newest = files.pop().unwrap();
    let (behind, _tmp) = migrator_of(&dir, &files).await;
    let env = env_with(&behind).await;
    // From 0007 on the relay may read the migration history; a database
    // behind by a later migration has that grant already.
    sqlx::query("GRANT SELECT ON _sqlx_migrations TO outbox_relay")
        .execute(env.fixtures())
        .await
        .unwrap();
    let last = latest(&sql::MIGRATOR);
    let last_name = sql::MIGRATOR
        .iter()
        .find(|m| m.version == last)
        .map(|m| format!("{last:04} {}", m.description))
        .unwrap();
    assert!(newest.starts_with(&format!("{last:04}_")), "{newest}");

    let (code, out) = dry_run(&env);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains(&format!("\npending  {last_name}\n")), "{out}");
    assert!(out.contains("applied  0001 outbox\n"), "{out}");
    assert!(out.contains("1 migration(s) would run"), "{out}");

    // The relay refuses to start on it, naming the migration and the fix.
    let out = binary(&env, &["run"]).output().unwrap();
    assert!(!out.status.success(), "{}", output_text(&out));
    let text = output_text(&out);
    assert!(text.contains("older than this binary"), "{text}");
    assert!(
        text.contains(&format!("migrations {last_name} are pending")),
        "{text}"
    );
    assert!(text.contains("Run `outbox-relay migrate`"), "{text}");

    let out = binary(&env, &["migrate"]).output().unwrap();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("applied  {last_name}\n")),
        "{}",
        output_text(&out)
    );
    let (code, out) = dry_run(&env);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the schema is current"), "{out}");

    // A newer schema (a later release migrated; this is the older relay of
    // a rolling upgrade): dry-run says `migrate` would refuse, the relay
    // warns and runs, ready, and /readyz names the unknown migration.
    let later = last + 1;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ($1, 'from a later release', true, '\\x00', 1)",
    )
    .bind(later)
    .execute(env.fixtures())
    .await
    .unwrap();
    let (code, out) = dry_run(&env);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains(&format!("unknown  {later:04} from a later release")),
        "{out}"
    );
    assert!(
        out.contains("the database is newer than this binary"),
        "{out}"
    );

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let process = env.spawn_process(&[("OUTBOX_RELAY_HTTP__LISTEN", listen.as_str())]);
    let ready = eventually(Duration::from_secs(30), || async {
        matches!(get(port, "/readyz").await, Some((200, _)))
    })
    .await;
    let body = get(port, "/readyz").await.map(|(_, b)| b);
    let (_, stderr) = process.terminate();
    assert!(ready, "not ready: {body:?}\n{stderr}");
    assert!(
        body.as_deref().unwrap().contains(&format!(
            "schema: newer than this binary ({later:04} unknown to it)\n"
        )),
        "{body:?}"
    );
    assert!(
        stderr.contains("the database schema is newer than this binary"),
        "{stderr}"
    );

    // An applied migration that was edited afterwards.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(later)
        .execute(env.fixtures())
        .await
        .unwrap();
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = 1")
        .execute(env.fixtures())
        .await
        .unwrap();
    let (code, out) = dry_run(&env);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("edited   0001 outbox"), "{out}");
    assert!(out.contains("put the change in a new migration"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_cannot_read_the_migrations_table_is_told_the_grant_it_needs() {
    let env = TestEnv::new().await;
    let role = env.login_role("relay", &["outbox_relay"]).await;
    // Whatever a later migration grants: this is about a role without it.
    sqlx::query("REVOKE ALL ON _sqlx_migrations FROM outbox_relay, PUBLIC")
        .execute(env.fixtures())
        .await
        .unwrap();
    let pool = env.pool_as(&role).await;
    let err = sql::schema_status(&pool).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "role {role} may not read _sqlx_migrations, where sqlx records the applied \
             migrations, so the schema cannot be compared with this binary: an admin runs \
             `GRANT SELECT ON _sqlx_migrations TO outbox_relay, outbox_admin;` (once per database)"
        )
    );
    sqlx::query("GRANT SELECT ON _sqlx_migrations TO outbox_relay")
        .execute(env.fixtures())
        .await
        .unwrap();
    assert!(sql::schema_status(&pool).await.unwrap().is_current());
    pool.close().await;
    env.drop_role(&role).await;
}
