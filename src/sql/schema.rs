//! Migrations and the schema check: which migrations a database has, and
//! whether it fits this binary.

use serde::Serialize;
use sqlx::PgPool;

use super::*;

/// One migration as [`schema_status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationInfo {
    pub version: i64,
    pub description: String,
}

impl std::fmt::Display for MigrationInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04} {}", self.version, self.description)
    }
}

/// A row of `_sqlx_migrations`, the table in which sqlx records what it applied.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AppliedRow {
    pub version: i64,
    pub description: String,
    pub success: bool,
    pub checksum: Vec<u8>,
}

/// The database's schema compared with a binary's migrations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SchemaStatus {
    /// Applied, and the same as the binary's file.
    pub applied: Vec<MigrationInfo>,
    /// The binary's migrations the database does not have: `migrate` would
    /// run them (the schema is older than the binary).
    pub pending: Vec<MigrationInfo>,
    /// Applied migrations the binary does not know: the schema is newer
    /// (an older binary during a rolling upgrade, or a binary rollback).
    pub unknown: Vec<MigrationInfo>,
    /// Applied, but the binary's file has another checksum: a migration was
    /// edited after it was applied. sqlx's `migrate` refuses to run then.
    pub mismatched: Vec<MigrationInfo>,
    /// Started and not finished (`success = false`): `migrate` refuses to run
    /// until an operator repairs it.
    pub failed: Vec<MigrationInfo>,
}

impl SchemaStatus {
    /// True when `migrate` would apply nothing and refuse nothing.
    pub fn is_current(&self) -> bool {
        self.pending.is_empty()
            && self.unknown.is_empty()
            && self.mismatched.is_empty()
            && self.failed.is_empty()
    }

    /// True when this binary's `migrate` would fail before applying anything.
    pub fn migrate_would_refuse(&self) -> bool {
        !self.unknown.is_empty() || !self.mismatched.is_empty() || !self.failed.is_empty()
    }

    /// The highest version this database has applied, if any.
    pub fn latest_applied(&self) -> Option<i64> {
        self.applied
            .iter()
            .chain(&self.unknown)
            .chain(&self.mismatched)
            .map(|m| m.version)
            .max()
    }

    /// One line for `/readyz` and logs.
    pub fn summary(&self) -> String {
        fn versions(ms: &[MigrationInfo]) -> String {
            ms.iter()
                .map(|m| format!("{:04}", m.version))
                .collect::<Vec<_>>()
                .join(", ")
        }
        let mut parts = Vec::new();
        if !self.pending.is_empty() {
            parts.push(format!(
                "older than this binary (pending {})",
                versions(&self.pending)
            ));
        }
        if !self.unknown.is_empty() {
            parts.push(format!(
                "newer than this binary ({} unknown to it)",
                versions(&self.unknown)
            ));
        }
        if !self.mismatched.is_empty() {
            parts.push(format!(
                "edited migrations ({} differ from this binary's)",
                versions(&self.mismatched)
            ));
        }
        if !self.failed.is_empty() {
            parts.push(format!(
                "failed migrations ({} did not finish)",
                versions(&self.failed)
            ));
        }
        if parts.is_empty() {
            match self.latest_applied() {
                Some(v) => format!("current ({v:04})"),
                None => "current (no migrations)".into(),
            }
        } else {
            parts.join("; ")
        }
    }
}

/// Compares what a database applied (`_sqlx_migrations`) with a migrator's
/// migrations. Pure, so that every case is unit-tested without a database.
pub fn compare_schema(migrator: &sqlx::migrate::Migrator, applied: &[AppliedRow]) -> SchemaStatus {
    let info = |version: i64, description: &str| MigrationInfo {
        version,
        description: description.to_string(),
    };
    let mut status = SchemaStatus::default();
    let known: Vec<_> = migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    for m in &known {
        match applied.iter().find(|a| a.version == m.version) {
            None => status.pending.push(info(m.version, &m.description)),
            Some(a) if !a.success => status.failed.push(info(a.version, &a.description)),
            Some(a) if a.checksum != *m.checksum => {
                status.mismatched.push(info(a.version, &a.description))
            }
            Some(a) => status.applied.push(info(a.version, &a.description)),
        }
    }
    for a in applied {
        if !known.iter().any(|m| m.version == a.version) {
            if a.success {
                status.unknown.push(info(a.version, &a.description));
            } else {
                status.failed.push(info(a.version, &a.description));
            }
        }
    }
    status.failed.sort_by_key(|m| m.version);
    status
}

/// Why [`schema_status`] could not read the schema's state.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The role may not read sqlx's table. The relay's and the admin's
    /// group roles need SELECT on it to compare the schema at start-up.
    #[error(
        "role {role} may not read _sqlx_migrations, where sqlx records the applied migrations, so \
         the schema cannot be compared with this binary: an admin runs \
         `GRANT SELECT ON _sqlx_migrations TO outbox_relay, outbox_admin;` (once per database)"
    )]
    NoAccess { role: String },
    #[error("reading _sqlx_migrations: {0}")]
    Db(#[from] sqlx::Error),
}

impl SchemaError {
    /// Whether retrying may help (an outage), rather than a fix by an admin.
    pub fn is_transient(&self) -> bool {
        match self {
            SchemaError::NoAccess { .. } => false,
            SchemaError::Db(err) => {
                crate::failure::classify_db(err) == crate::failure::DbClass::Retry
            }
        }
    }
}

/// The database's schema compared with [`MIGRATOR`], the migrations this
/// binary embeds. A database without `_sqlx_migrations` (never migrated) has
/// every migration pending. Needs SELECT on `_sqlx_migrations` only.
pub async fn schema_status(pool: &PgPool) -> Result<SchemaStatus, SchemaError> {
    schema_status_of(pool, &MIGRATOR).await
}

/// [`schema_status`] against any migrator (tests use a release's files).
pub async fn schema_status_of(
    pool: &PgPool,
    migrator: &sqlx::migrate::Migrator,
) -> Result<SchemaStatus, SchemaError> {
    // Asked first rather than inferred from an error: the answer names the
    // role, and a missing table is a fresh database, not an error.
    let (exists, readable, role): (bool, bool, String) = sqlx::query_as(
        "SELECT to_regclass('_sqlx_migrations') IS NOT NULL, \
                CASE WHEN to_regclass('_sqlx_migrations') IS NULL THEN false \
                     ELSE has_table_privilege('_sqlx_migrations', 'SELECT') END, \
                current_user::text",
    )
    .fetch_one(pool)
    .await?;
    if !exists {
        return Ok(compare_schema(migrator, &[]));
    }
    if !readable {
        return Err(SchemaError::NoAccess { role });
    }
    let rows: Vec<AppliedRow> = sqlx::query_as(
        "SELECT version, description, success, checksum FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(pool)
    .await?;
    Ok(compare_schema(migrator, &rows))
}

/// Applies the migrations; a new database gets `vpartitions` virtual
/// partitions (an existing one keeps its count).
pub async fn migrate_with(
    pool: &PgPool,
    vpartitions: u32,
) -> Result<(), sqlx::migrate::MigrateError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT set_config('outbox.vpartitions', $1, false)")
        .bind(vpartitions.to_string())
        .execute(&mut *conn)
        .await?;
    MIGRATOR.run(&mut *conn).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `_sqlx_migrations` as `migrate` leaves it with every embedded migration.
    fn all_applied() -> Vec<AppliedRow> {
        MIGRATOR
            .iter()
            .map(|m| AppliedRow {
                version: m.version,
                description: m.description.to_string(),
                success: true,
                checksum: m.checksum.to_vec(),
            })
            .collect()
    }

    fn versions(ms: &[MigrationInfo]) -> Vec<i64> {
        ms.iter().map(|m| m.version).collect()
    }

    #[test]
    fn a_fresh_database_has_every_migration_pending() {
        let s = compare_schema(&MIGRATOR, &[]);
        let all: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        assert!(all.len() >= 6);
        assert_eq!(versions(&s.pending), all);
        assert!(s.applied.is_empty() && !s.is_current() && !s.migrate_would_refuse());
        assert!(s
            .summary()
            .starts_with("older than this binary (pending 0001, 0002"));
    }

    #[test]
    fn a_migrated_database_is_current() {
        let s = compare_schema(&MIGRATOR, &all_applied());
        assert!(s.is_current(), "{s:?}");
        let last = MIGRATOR.iter().map(|m| m.version).max().unwrap();
        assert_eq!(s.summary(), format!("current ({last:04})"));
        assert_eq!(s.applied[0].to_string(), "0001 outbox");
    }

    #[test]
    fn a_missing_migration_is_pending_and_an_unknown_one_is_newer() {
        let mut rows = all_applied();
        let last = rows.pop().unwrap();
        let s = compare_schema(&MIGRATOR, &rows);
        assert_eq!(versions(&s.pending), vec![last.version]);
        assert!(!s.migrate_would_refuse());

        let mut rows = all_applied();
        rows.push(AppliedRow {
            version: 9001,
            description: "from a later release".into(),
            success: true,
            checksum: vec![1, 2, 3],
        });
        let s = compare_schema(&MIGRATOR, &rows);
        assert_eq!(versions(&s.unknown), vec![9001]);
        assert!(s.pending.is_empty() && s.migrate_would_refuse());
        assert_eq!(s.summary(), "newer than this binary (9001 unknown to it)");
    }

    #[test]
    fn an_edited_or_unfinished_migration_is_reported() {
        let mut rows = all_applied();
        rows[2].checksum[0] ^= 0xff;
        rows[3].success = false;
        let s = compare_schema(&MIGRATOR, &rows);
        assert_eq!(versions(&s.mismatched), vec![rows[2].version]);
        assert_eq!(versions(&s.failed), vec![rows[3].version]);
        assert!(s.migrate_would_refuse());
        assert_eq!(
            s.summary(),
            "edited migrations (0003 differ from this binary's); failed migrations (0004 did not finish)"
        );
    }
}
