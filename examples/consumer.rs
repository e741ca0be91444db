//! An example module consumer built on the consumer kit (the `outbox-consumer`
//! crate, with `outbox-model` for the catalog and `outbox-writer`'s typed events):
//! the CRM module records an activity row for every new user and every
//! wallet credit, inside the dedupe transaction of each event.
//!
//! ```text
//! DATABASE_URL=postgres://crm_consumer@127.0.0.1:55432/crm \
//!   cargo run --example consumer -- --manifest examples/module.manifest.json
//! ```
//!
//! It subscribes handlers to `auth.user.created` and `money.wallet.credited`;
//! a manifest that does not declare both stops it with 403 Forbidden. Stops
//! on SIGINT or SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use outbox_consumer::kafka::KafkaSettings;
use outbox_consumer::{Consumer, ConsumerSettings, FailurePolicy, Manifest};
use outbox_model::catalog::Catalog;
use outbox_writer::{UserCreated, WalletCredited};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Example module consumer of kernel events")]
struct Args {
    /// The module's database (its own tables and processed_event_ids).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    brokers: String,
    /// Prepended to every catalog topic, as the relay's kafka.topic_prefix.
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "")]
    topic_prefix: String,
    #[arg(long, default_value = "examples/module.manifest.json")]
    manifest: PathBuf,
    /// Catalog files or directories (repeatable).
    #[arg(long = "catalog", default_value = "config/catalog")]
    catalog: Vec<PathBuf>,
    /// Dedupe scope in processed_event_ids (default: the manifest's name).
    #[arg(long)]
    name: Option<String>,
    /// Kafka consumer group (default: the consumer name).
    #[arg(long)]
    group: Option<String>,
    /// Park an event after this many failed attempts instead of retrying forever.
    #[arg(long)]
    park_after: Option<u32>,
    /// Extra librdkafka consumer property, KEY=VALUE (repeatable).
    #[arg(long = "kafka-property", value_parser = key_value)]
    kafka_properties: Vec<(String, String)>,
    /// Crash-test hook: after an event's transaction commits and before its
    /// offset is committed, print `db-committed <event id>` and hang, so a
    /// test can kill the process exactly there.
    #[arg(long, hide = true)]
    hang_after_db_commit: bool,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

/// The module's own table. Created here only when missing, because a
/// least-privilege consumer role cannot create tables (docs/consumer.md).
async fn ensure_table(pool: &sqlx::PgPool) -> Result<()> {
    let missing: bool = sqlx::query_scalar("SELECT to_regclass('crm_activity') IS NULL")
        .fetch_one(pool)
        .await?;
    if missing {
        sqlx::query(
            "CREATE TABLE crm_activity (\
                 id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                 event_id text NOT NULL, \
                 event_type text NOT NULL, \
                 user_id text NOT NULL, \
                 detail text NOT NULL, \
                 recorded_at timestamptz NOT NULL DEFAULT now())",
        )
        .execute(pool)
        .await
        .context("creating crm_activity")?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .json()
        .flatten_event(true)
        .init();

    let manifest = Manifest::load(&args.manifest)?;
    let catalog = Arc::new(Catalog::load(&args.catalog)?);
    let pool = sqlx::PgPool::connect(&args.database_url)
        .await
        .context("connecting to Postgres (DATABASE_URL)")?;
    ensure_table(&pool).await?;

    let kafka = KafkaSettings {
        brokers: args.brokers.clone(),
        topic_prefix: args.topic_prefix.clone(),
        client_id: "example-consumer".into(),
        ..KafkaSettings::default()
    };
    let mut settings = ConsumerSettings::new(args.name.as_deref().unwrap_or(&manifest.name), kafka);
    if let Some(group) = args.group {
        settings.group_id = group;
    }
    if let Some(after_attempts) = args.park_after {
        settings.on_failure = FailurePolicy::Park { after_attempts };
    }
    settings.librdkafka.extend(args.kafka_properties);

    let mut consumer = Consumer::new(&manifest, catalog, pool, settings)?;
    consumer.subscribe("auth.user.created", |conn, event| {
        Box::pin(async move {
            let user: UserCreated = event.data_as()?;
            sqlx::query(
                "INSERT INTO crm_activity (event_id, event_type, user_id, detail) VALUES ($1, $2, $3, $4)",
            )
            .bind(&event.id)
            .bind(&event.event_type)
            .bind(&user.user_id)
            .bind(format!("contact created for {}", user.email))
            .execute(conn)
            .await?;
            Ok(())
        })
    })?;
    consumer.subscribe("money.wallet.credited", |conn, event| {
        Box::pin(async move {
            let credit: WalletCredited = event.data_as()?;
            sqlx::query(
                "INSERT INTO crm_activity (event_id, event_type, user_id, detail) VALUES ($1, $2, $3, $4)",
            )
            .bind(&event.id)
            .bind(&event.event_type)
            .bind(&credit.user_id)
            .bind(format!("credited {} {}", credit.amount_cents, credit.currency))
            .execute(conn)
            .await?;
            Ok(())
        })
    })?;
    if args.hang_after_db_commit {
        consumer.after_db_commit(|event| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "db-committed {}", event.id);
            let _ = out.flush();
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        });
    }

    let token = CancellationToken::new();
    let stop = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        stop.cancel();
    });
    consumer.run(token).await?;
    Ok(())
}
