//! Every SQL statement the relay and its CLI run, as small functions,
//! grouped by who runs them: `outbox` the relay's claim and settlement,
//! `leases` ownership of virtual partitions, `admin` the CLI's DLQ,
//! retention and statistics, `schema` migrations; `sockets` sets TCP
//! keepalives on the relay's own connections. (The writer library's
//! and the consumer kit's statements live in their own crates.)
//!
//! Failure handling and DLQ administration live in SQL functions
//! (`migrations/0003_dlq.sql`); the functions here call them, so the relay,
//! the CLI and an admin at a psql prompt share one implementation.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

mod admin;
mod leases;
mod outbox;
mod schema;
pub mod sockets;

pub use admin::*;
pub use leases::*;
pub use outbox::*;
pub use schema::*;

/// The migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub async fn connect(url: &str, max_connections: u32, timeout: Duration) -> sqlx::Result<PgPool> {
    let options = PgConnectOptions::from_str(url)?.application_name("outbox-relay");
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(timeout)
        .connect_with(options)
        .await
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
