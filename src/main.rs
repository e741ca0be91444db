//! The `outbox-relay` command line. Thin: parses arguments, loads settings,
//! and calls the library.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use outbox_relay::catalog::Catalog;
use outbox_relay::config::Settings;
use outbox_relay::sql::{self, DlqFilter};
use outbox_relay::{status, topics};

#[derive(Parser)]
#[command(
    name = "outbox-relay",
    version,
    about = "Relays events from a PostgreSQL outbox to Kafka"
)]
struct Cli {
    /// Configuration file (default: config/relay.toml when it exists).
    #[arg(long, global = true, env = "OUTBOX_RELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay until SIGINT or SIGTERM.
    Run,
    /// Apply the database migrations and mirror the catalog into the database.
    Migrate {
        /// Change nothing: list the applied and pending migrations and exit
        /// 0 when nothing would run, 3 when migrations would run, 4 when
        /// `migrate` would refuse (an edited or unfinished migration, or
        /// migrations this binary does not know).
        #[arg(long, visible_alias = "check")]
        dry_run: bool,
    },
    /// Inspect or validate the event catalog.
    #[command(subcommand)]
    Catalog(CatalogCmd),
    /// Create or check the catalog's Kafka topics.
    #[command(subcommand)]
    Topics(TopicsCmd),
    /// Inspect, replay or discard dead-lettered events.
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// Retention: forget dedupe rows older than the dedupe horizon, and
    /// relays that stopped reporting.
    #[command(subcommand)]
    Retention(RetentionCmd),
    /// Backlog, lag, DLQ depth and last publish of the outbox.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CatalogCmd {
    /// Print the loaded catalog as a table.
    List,
    /// Validate catalog files (the kernel's plus the given ones) without
    /// starting, and check their event schemas against the published ones.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The published schemas (as `catalog schema` wrote them): a change
        /// that breaks consumers within a major version fails the check.
        /// Skipped when the directory does not exist.
        #[arg(long, default_value = "config/schemas")]
        schemas: PathBuf,
    },
    /// Write a JSON Schema (2020-12) per event type and version, for the
    /// envelope and for `data`: DIR/<type>/<version>/{envelope,data}.schema.json.
    Schema {
        #[arg(long, default_value = "config/schemas")]
        out: PathBuf,
    },
    /// Mirror the catalog into the database (publisher checks use it).
    Sync,
}

#[derive(Subcommand)]
enum TopicsCmd {
    /// Create missing topics; report drift of existing ones.
    Ensure {
        /// Change drifted retention and partition counts.
        #[arg(long)]
        apply: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RetentionCmd {
    /// The dedupe horizon, the dedupe partitions a purge would drop, and
    /// what it would delete; `--apply` drops and deletes.
    Dedupe {
        #[arg(long)]
        apply: bool,
        /// Also create this many months of partitions ahead.
        #[arg(long, default_value_t = outbox_relay::DEDUPE_MONTHS_AHEAD)]
        months_ahead: i32,
    },
    /// Forget relays that have not reported for this many hours.
    Relays {
        #[arg(long, default_value_t = 168)]
        older_than_hours: i32,
    },
}

#[derive(Args, Clone, Default)]
struct Filter {
    #[arg(long)]
    event_id: Option<String>,
    #[arg(long = "type")]
    event_type: Option<String>,
    #[arg(long)]
    reason: Option<String>,
    /// Dead-lettered at or after (RFC 3339).
    #[arg(long)]
    from: Option<DateTime<Utc>>,
    /// Dead-lettered before (RFC 3339).
    #[arg(long)]
    to: Option<DateTime<Utc>>,
}

impl From<Filter> for DlqFilter {
    fn from(f: Filter) -> Self {
        DlqFilter {
            event_id: f.event_id,
            event_type: f.event_type,
            reason: f.reason,
            from: f.from,
            to: f.to,
        }
    }
}

#[derive(Subcommand)]
enum DlqCmd {
    /// List dead events (state 'dead').
    List {
        #[command(flatten)]
        filter: Filter,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Move dead events back into the outbox (same id, same occurredAt).
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// Replay every dead event when no filter is given.
        #[arg(long)]
        all: bool,
        /// Also replay events older than the dedupe horizon (consumers may
        /// have forgotten them and process them twice); needs --why.
        #[arg(long, requires = "why")]
        force: bool,
        /// Why the replay is forced (kept in outbox_dlq_revisions).
        #[arg(long)]
        why: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Replace a dead event's payload (and optionally tenant or headers),
    /// checked against the catalog, and publish it under the same event id.
    Repair {
        #[arg(long)]
        event_id: String,
        /// The corrected payload: a file holding one JSON object ("-" = stdin).
        #[arg(long)]
        payload_file: PathBuf,
        /// Why (kept with the original in outbox_dlq_revisions).
        #[arg(long)]
        why: String,
        /// Replace the tenant id too.
        #[arg(long)]
        tenant_id: Option<String>,
        /// Replace the headers too: a file holding one JSON object.
        #[arg(long)]
        headers_file: Option<PathBuf>,
        /// Repair an event older than the dedupe horizon anyway.
        #[arg(long)]
        force: bool,
    },
    /// Delete replayed and discarded entries (never dead ones).
    Purge {
        /// Settled (replayed or discarded) more than this many days ago.
        #[arg(long)]
        older_than_days: i32,
    },
    /// Mark dead events as discarded, with a recorded reason.
    Discard {
        #[command(flatten)]
        filter: Filter,
        /// Why they are discarded (kept in outbox_dlq.discard_reason).
        #[arg(long)]
        why: String,
    },
}

fn init_tracing(settings: &Settings) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if settings.log.format == outbox_relay::config::LogFormat::Json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn pool(settings: &Settings) -> Result<sqlx::PgPool> {
    sql::connect(
        settings.database.url.expose(),
        2,
        std::time::Duration::from_millis(settings.database.connect_timeout_ms),
    )
    .await
    .context("connecting to Postgres (database.url / DATABASE_URL)")
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref())?;
    init_tracing(&settings);
    match cli.command {
        Command::Run => outbox_relay::run(settings, shutdown_signal()).await?,
        Command::Migrate { dry_run: true } => {
            let pool = pool(&settings).await?;
            let status = sql::schema_status(&pool)
                .await
                .context("comparing the database schema with this binary's migrations")?;
            print!("{}", render_schema(&status));
            pool.close().await;
            std::process::exit(dry_run_exit_code(&status));
        }
        Command::Migrate { dry_run: false } => {
            let catalog = Catalog::load(&settings.catalog.paths)?;
            let pool = pool(&settings).await?;
            // Read first so that the output names what this run applied; a
            // role that cannot read it cannot migrate either, and says so below.
            let before = sql::schema_status(&pool).await.ok();
            sql::migrate_with(&pool, settings.leases.vpartitions)
                .await
                .context(
                    "applying migrations (`outbox-relay migrate --dry-run` shows how the database \
                     differs from this binary's migrations)",
                )?;
            for m in before.iter().flat_map(|b| &b.pending) {
                println!("applied  {m}");
            }
            let n = sql::sync_catalog(&pool, &catalog).await?;
            println!("migrations applied; {n} catalog events mirrored into outbox_catalog");
        }
        Command::Catalog(CatalogCmd::List) => {
            let catalog = Catalog::load(&settings.catalog.paths)?;
            print!(
                "{}",
                catalog.render_table(settings.topics.default_retention_days)
            );
        }
        Command::Catalog(CatalogCmd::Check { files, schemas }) => {
            let mut paths = settings.catalog.paths.clone();
            for f in &files {
                if !paths.iter().any(|p| p == f || f.starts_with(p)) {
                    paths.push(f.clone());
                }
            }
            let catalog = Catalog::load(&paths)?;
            let schemas_note = if schemas.is_dir() {
                outbox_relay::schema::check_compatibility(&catalog, &schemas).with_context(
                    || {
                        format!(
                            "the catalog's event schemas break the published ones in {}",
                            schemas.display()
                        )
                    },
                )?;
                format!("; schemas compatible with {}", schemas.display())
            } else {
                format!(
                    "; no published schemas at {} (--schemas) to compare with",
                    schemas.display()
                )
            };
            println!(
                "ok: {} events, {} publishers, {} topics{schemas_note}",
                catalog.events.len(),
                catalog.publishers.len(),
                catalog.topics.len()
            );
        }
        Command::Catalog(CatalogCmd::Schema { out }) => {
            let catalog = Catalog::load(&settings.catalog.paths)?;
            let written = outbox_relay::schema::write_all(&catalog, &out)?;
            for path in &written {
                println!("{}", path.display());
            }
            eprintln!(
                "wrote {} schemas of {} events to {}",
                written.len(),
                catalog.events.len(),
                out.display()
            );
        }
        Command::Catalog(CatalogCmd::Sync) => {
            let catalog = Catalog::load(&settings.catalog.paths)?;
            let pool = pool(&settings).await?;
            let n = sql::sync_catalog(&pool, &catalog).await?;
            println!("{n} catalog events mirrored into outbox_catalog");
        }
        Command::Topics(TopicsCmd::Ensure { apply, json }) => {
            let catalog = Catalog::load(&settings.catalog.paths)?;
            let reports = topics::ensure(&settings, &catalog, apply).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                for r in &reports {
                    let days = r.retention_ms as f64 / topics::DAY_MS as f64;
                    let what = match &r.action {
                        topics::TopicAction::Created => "created".to_string(),
                        topics::TopicAction::UpToDate => "up to date".to_string(),
                        topics::TopicAction::Drift {
                            changes,
                            applied: true,
                        } => {
                            format!("changed: {}", changes.join("; "))
                        }
                        topics::TopicAction::Drift {
                            changes,
                            applied: false,
                        } => {
                            format!("DRIFT (run with --apply to change): {}", changes.join("; "))
                        }
                    };
                    let min_isr = r.min_insync_replicas.map_or("?".into(), |n| n.to_string());
                    println!(
                        "{:<40} partitions={:<3} replicas={} min.insync={min_isr} retention={days}d  {what}",
                        r.topic, r.partitions, r.replication_factor
                    );
                    for warning in &r.warnings {
                        println!("  WARNING: {warning}");
                    }
                }
            }
        }
        Command::Dlq(cmd) => dlq(&settings, cmd).await?,
        Command::Retention(cmd) => retention(&settings, cmd).await?,
        Command::Status { json } => {
            let report = status::collect_all(&settings).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            if !report.all_read() {
                bail!("some sources could not be read");
            }
        }
    }
    Ok(())
}

/// `migrate --dry-run`: nothing would run.
const DRY_RUN_CURRENT: i32 = 0;
/// `migrate --dry-run`: `migrate` would apply migrations.
const DRY_RUN_PENDING: i32 = 3;
/// `migrate --dry-run`: `migrate` would refuse to run.
const DRY_RUN_REFUSED: i32 = 4;

fn dry_run_exit_code(status: &sql::SchemaStatus) -> i32 {
    if status.migrate_would_refuse() {
        DRY_RUN_REFUSED
    } else if !status.pending.is_empty() {
        DRY_RUN_PENDING
    } else {
        DRY_RUN_CURRENT
    }
}

/// The `migrate --dry-run` report: one line per migration, then what to do.
fn render_schema(status: &sql::SchemaStatus) -> String {
    let mut out = String::new();
    let mut line = |state: &str, m: &sql::MigrationInfo, note: &str| {
        out.push_str(&format!("{state:<9}{m}{note}\n"));
    };
    let mut all: Vec<(&str, &sql::MigrationInfo, &str)> = Vec::new();
    all.extend(status.applied.iter().map(|m| ("applied", m, "")));
    all.extend(status.pending.iter().map(|m| ("pending", m, "")));
    all.extend(
        status
            .unknown
            .iter()
            .map(|m| ("unknown", m, "  (applied by a newer release)")),
    );
    all.extend(status.mismatched.iter().map(|m| {
        (
            "edited",
            m,
            "  (applied, but this binary's file has another checksum)",
        )
    }));
    all.extend(
        status
            .failed
            .iter()
            .map(|m| ("failed", m, "  (started and did not finish)")),
    );
    all.sort_by_key(|(_, m, _)| m.version);
    for (state, m, note) in all {
        line(state, m, note);
    }
    let versions = |ms: &[sql::MigrationInfo]| {
        ms.iter()
            .map(|m| format!("{:04}", m.version))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if status.is_current() {
        out.push_str("\nthe schema is current: `outbox-relay migrate` has nothing to run\n");
        return out;
    }
    out.push('\n');
    if !status.failed.is_empty() {
        out.push_str(&format!(
            "migration {} started and did not finish: `migrate` refuses to run until the schema \
             is repaired by hand and its _sqlx_migrations row removed (docs/operations.md, Upgrading)\n",
            versions(&status.failed)
        ));
    }
    if !status.mismatched.is_empty() {
        out.push_str(&format!(
            "migration {} was changed after it was applied: `migrate` refuses to run. Use the \
             released file again (CHANGELOG.md names each release's commit) and put the change \
             in a new migration\n",
            versions(&status.mismatched)
        ));
    }
    if !status.unknown.is_empty() {
        out.push_str(&format!(
            "the database is newer than this binary (outbox-relay {}): it has migration {} that \
             this release does not know, so this release's `migrate` refuses to run; use the \
             newer release's `migrate`\n",
            outbox_relay::VERSION,
            versions(&status.unknown)
        ));
    }
    if !status.pending.is_empty() {
        out.push_str(&format!(
            "{} migration(s) would run: {}; `outbox-relay migrate` applies them\n",
            status.pending.len(),
            versions(&status.pending)
        ));
    }
    out
}

/// The `dlq replay` report: as before 0.2.0, `replayed N event(s)` and the
/// replayed ids one a line (scripts read them), then, when some entries
/// were skipped, how many and a table of why.
fn render_replay(lines: &[sql::ReplayLine]) -> String {
    let (replayed, skipped): (Vec<_>, Vec<_>) = lines.iter().partition(|l| l.replayed());
    let mut out = format!("replayed {} event(s)\n", replayed.len());
    for l in &replayed {
        match &l.reason {
            Some(reason) => out.push_str(&format!("{}  {reason}\n", l.event_id)),
            None => out.push_str(&format!("{}\n", l.event_id)),
        }
    }
    if skipped.is_empty() {
        return out;
    }
    out.push_str(&format!("skipped {} event(s)\n", skipped.len()));
    out.push_str(&format!("{:<26}  {:<22}  DETAIL\n", "EVENT_ID", "REASON"));
    for l in &skipped {
        out.push_str(&format!(
            "{:<26}  {:<22}  {}\n",
            l.event_id,
            l.reason.as_deref().unwrap_or("-"),
            l.detail.as_deref().unwrap_or("")
        ));
    }
    out
}

/// A file holding one JSON object ("-" = stdin).
fn read_json(path: &std::path::Path, flag: &str) -> Result<serde_json::Value> {
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()))?
    };
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{flag} {} is not JSON", path.display()))?;
    if !value.is_object() {
        bail!(
            "{flag} {} must hold one JSON object (the event's payload or headers)",
            path.display()
        );
    }
    Ok(value)
}

async fn retention(settings: &Settings, cmd: RetentionCmd) -> Result<()> {
    let pool = pool(settings).await?;
    match cmd {
        RetentionCmd::Dedupe {
            apply,
            months_ahead,
        } => {
            let days = sql::dedupe_horizon_days(&pool).await?;
            println!("dedupe horizon: {days} days (outbox_config.dedupe_horizon_days)");
            for p in sql::dedupe_partitions_ensure(&pool, months_ahead).await? {
                println!("created  {p}");
            }
            for p in sql::dedupe_purge(&pool, !apply).await? {
                println!(
                    "{:<12} {:<40} {:>12} row(s), events before {}",
                    p.action,
                    p.partition_name,
                    p.rows_removed,
                    outbox_relay::envelope::format_time(p.events_before)
                );
            }
            if !apply {
                println!("dry run: --apply drops and deletes");
            }
        }
        RetentionCmd::Relays { older_than_hours } => {
            let ids = sql::relays_purge(&pool, older_than_hours).await?;
            println!("forgot {} relay(s)", ids.len());
            for id in ids {
                println!("{id}");
            }
        }
    }
    Ok(())
}

async fn dlq(settings: &Settings, cmd: DlqCmd) -> Result<()> {
    let pool = pool(settings).await?;
    match cmd {
        DlqCmd::List {
            filter,
            limit,
            json,
        } => {
            let entries = sql::dlq_list(&pool, &filter.into(), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(());
            }
            println!(
                "{:<26}  {:<30}  {:<22}  {:>8}  {:<24}  ERROR",
                "EVENT_ID", "TYPE", "REASON", "ATTEMPTS", "DEAD_LETTERED_AT"
            );
            for e in entries {
                println!(
                    "{:<26}  {:<30}  {:<22}  {:>8}  {:<24}  {}",
                    e.event_id,
                    e.event_type,
                    e.reason,
                    e.attempts,
                    outbox_relay::envelope::format_time(e.dead_lettered_at),
                    e.last_error
                );
            }
        }
        DlqCmd::Replay {
            filter,
            all,
            force,
            why,
            json,
        } => {
            let f: DlqFilter = filter.into();
            let unfiltered = f.event_id.is_none()
                && f.event_type.is_none()
                && f.reason.is_none()
                && f.from.is_none()
                && f.to.is_none();
            if unfiltered && !all {
                bail!("refusing to replay every dead event: give --event-id or a filter (--type, --reason, --from, --to), or --all");
            }
            let lines = sql::dlq_replay_report(&pool, &f, force, why.as_deref()).await?;
            for l in lines
                .iter()
                .filter(|l| l.reason.as_deref() == Some("forced_past_horizon"))
            {
                tracing::warn!(event_id = %l.event_id, why = why.as_deref().unwrap_or_default(),
                    "replayed an event older than the dedupe horizon: consumers may process it twice");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            } else {
                print!("{}", render_replay(&lines));
            }
        }
        DlqCmd::Repair {
            event_id,
            payload_file,
            why,
            tenant_id,
            headers_file,
            force,
        } => {
            let catalog = Catalog::load(&settings.catalog.paths)?;
            let payload = read_json(&payload_file, "--payload-file")?;
            let headers = headers_file
                .map(|f| read_json(&f, "--headers-file"))
                .transpose()?;
            let repair = sql::Repair {
                event_id: event_id.clone(),
                payload,
                why,
                tenant_id,
                headers,
                force,
            };
            let revision =
                outbox_relay::dlq::repair(&pool, &catalog, &settings.kafka, &repair).await?;
            if force {
                tracing::warn!(event_id = %event_id,
                    "repair forced: the event may be older than the dedupe horizon");
            }
            println!("repaired {event_id} (revision {revision}); replayed under the same event id");
        }
        DlqCmd::Purge { older_than_days } => {
            let (entries, revisions) = sql::dlq_purge(&pool, older_than_days).await?;
            println!(
                "deleted {entries} replayed or discarded entr(y/ies) and {revisions} revision(s) of purged entries"
            );
        }
        DlqCmd::Discard { filter, why } => {
            let ids = sql::dlq_discard(&pool, &why, &filter.into()).await?;
            println!("discarded {} event(s)", ids.len());
            for id in ids {
                println!("{id}");
            }
        }
    }
    Ok(())
}
