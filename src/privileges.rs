//! The privilege matrix: what each group role may do to each table, column
//! and function of the outbox schema, declared once.
//!
//! The migrations grant exactly this; `tests/it/security.rs` checks it two ways
//! (PostgreSQL's `has_*_privilege` over every object of the schema, and an
//! attempt of every operation as a login member of each group), so a later
//! migration that adds a column or a function cannot silently break the
//! relay or widen a role. Anything not listed here is denied. The relay
//! checks its own rows at start-up ([`missing`]), and `docs/security.md`
//! shows the matrix as [`markdown`] renders it.

use sqlx::PgPool;

/// The four group roles the migrations create.
pub const GROUPS: [&str; 4] = [
    "outbox_writer",
    "outbox_relay",
    "outbox_admin",
    "outbox_consumer",
];

/// What a grant is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// A table or view, every column.
    Table(&'static str),
    /// Some columns of a table.
    Columns(&'static str, &'static [&'static str]),
    /// A function, by its signature as `regprocedure` prints it.
    Function(&'static str),
}

/// One allowed privilege of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub group: &'static str,
    /// `SELECT`, `INSERT`, `UPDATE`, `DELETE` or `EXECUTE`.
    pub privilege: &'static str,
    pub on: On,
    /// Which code path needs it.
    pub why: &'static str,
}

const fn g(group: &'static str, privilege: &'static str, on: On, why: &'static str) -> Grant {
    Grant {
        group,
        privilege,
        on,
        why,
    }
}

const W: &str = "outbox_writer";
const R: &str = "outbox_relay";
const A: &str = "outbox_admin";
const C: &str = "outbox_consumer";

/// The columns an event is made of: all a writer may set.
pub const EVENT_COLUMNS: &[&str] = &[
    "event_id",
    "event_type",
    "tenant_id",
    "payload",
    "headers",
    "occurred_at",
];

/// The retry bookkeeping the relay updates (`outbox_schedule_retry`).
pub const RETRY_COLUMNS: &[&str] = &[
    "attempts",
    "unknown_failures",
    "last_error",
    "first_failed_at",
    "available_at",
];

/// What `outbox_reschedule` updates: the retry bookkeeping, and the id of
/// a failed row, which moves below the fresh rows (migration 0012).
pub const RESCHEDULE_COLUMNS: &[&str] = &[
    "attempts",
    "unknown_failures",
    "last_error",
    "first_failed_at",
    "available_at",
    "id",
];

/// What the relay may write into the DLQ's audit trail: never who or when
/// (`made_by`, `made_at` take their defaults, the session and the time).
pub const REVISION_COLUMNS: &[&str] = &[
    "event_id",
    "revision",
    "kind",
    "old_payload",
    "old_tenant_id",
    "old_headers",
    "new_payload",
    "new_tenant_id",
    "new_headers",
    "why",
    "detail",
];

/// Every allowed privilege. Everything else is denied.
pub const GRANTS: &[Grant] = &[
    // Writers: one insert of an event, nothing else.
    g(W, "INSERT", On::Columns("outbox", EVENT_COLUMNS), "the event insert"),
    g(W, "SELECT", On::Table("outbox_catalog"), "the insert trigger runs as the writer"),
    g(W, "SELECT", On::Table("outbox_publisher_roles"), "the insert trigger; row security shows each role its own row"),
    g(W, "EXECUTE", On::Function("outbox_ulid()"), "the event id default"),
    g(W, "EXECUTE", On::Function("outbox_vpartition(text,integer)"), "the insert trigger"),
    // Relay: claim, settle, dead-letter, lease, heartbeat.
    g(R, "SELECT", On::Table("outbox"), "claim (DELETE … RETURNING), backlog"),
    g(R, "DELETE", On::Table("outbox"), "claim, delete after the ack"),
    g(R, "UPDATE", On::Columns("outbox", RESCHEDULE_COLUMNS), "outbox_reschedule; row locks of a settling batch"),
    g(R, "SELECT", On::Table("outbox_dlq"), "outbox_dead_letter, status"),
    g(R, "INSERT", On::Table("outbox_dlq"), "outbox_dead_letter"),
    g(R, "UPDATE", On::Table("outbox_dlq"), "outbox_dead_letter of a replayed entry"),
    g(R, "SELECT", On::Table("outbox_dlq_revisions"), "outbox_dead_letter: the next revision number"),
    g(R, "INSERT", On::Columns("outbox_dlq_revisions", REVISION_COLUMNS), "outbox_dead_letter: a row a dead entry refused"),
    g(R, "SELECT", On::Table("outbox_config"), "the partition count"),
    g(R, "SELECT", On::Table("outbox_relays"), "membership, status"),
    g(R, "INSERT", On::Table("outbox_relays"), "heartbeat"),
    g(R, "UPDATE", On::Table("outbox_relays"), "heartbeat, graceful stop"),
    g(R, "DELETE", On::Table("outbox_relays"), "forgetting relays stopped a week ago"),
    g(R, "SELECT", On::Table("outbox_leases"), "lease functions"),
    g(R, "UPDATE", On::Table("outbox_leases"), "lease functions"),
    g(R, "SELECT", On::Table("_sqlx_migrations"), "schema version check at start-up"),
    g(R, "EXECUTE", On::Function("outbox_dead_letter(bigint[],text[],text[])"), "permanent failures"),
    g(R, "EXECUTE", On::Function("outbox_schedule_retry(bigint[],text[],boolean[],integer,bigint,bigint)"), "transient failures (relays before 0.2.0; outbox_reschedule)"),
    g(R, "EXECUTE", On::Function("outbox_reschedule(bigint[],text[],boolean[],integer,bigint,bigint)"), "transient failures"),
    g(R, "EXECUTE", On::Function("outbox_retry_delay(integer,bigint,bigint,double precision)"), "outbox_schedule_retry"),
    g(R, "EXECUTE", On::Function("outbox_wait_due(integer,integer)"), "waiting for rows while idle"),
    g(R, "EXECUTE", On::Function("outbox_lease_renew(text,integer)"), "leases"),
    g(R, "EXECUTE", On::Function("outbox_lease_acquire(text,integer,integer)"), "leases (relays before 0.2.0)"),
    g(R, "EXECUTE", On::Function("outbox_lease_acquire(text,integer,integer,integer)"), "leases, fenced on takeover"),
    g(R, "EXECUTE", On::Function("outbox_lease_release(text,smallint[])"), "leases"),
    g(R, "EXECUTE", On::Function("outbox_lease_fence(text,smallint[],bigint[])"), "fencing a batch"),
    g(R, "EXECUTE", On::Function("outbox_dedupe_partitions_ensure(integer,timestamp with time zone)"), "the coming months' dedupe partitions"),
    // Admin: read everything, DLQ and mapping functions, catalog mirror.
    g(A, "SELECT", On::Table("outbox"), "inspection"),
    g(A, "SELECT", On::Table("outbox_dlq"), "inspection"),
    g(A, "SELECT", On::Table("outbox_dlq_summary"), "inspection"),
    g(A, "SELECT", On::Table("outbox_dlq_revisions"), "the DLQ's audit trail (append-only)"),
    g(A, "SELECT", On::Table("processed_event_ids"), "inspection"),
    g(A, "SELECT", On::Table("consumer_parked_events"), "inspection"),
    g(A, "DELETE", On::Table("consumer_parked_events"), "removing a handled parked event"),
    g(A, "SELECT", On::Table("outbox_config"), "catalog sync"),
    g(A, "SELECT", On::Table("outbox_relays"), "status"),
    g(A, "SELECT", On::Table("outbox_leases"), "status"),
    g(A, "SELECT", On::Table("outbox_lease_summary"), "status"),
    g(A, "SELECT", On::Table("_sqlx_migrations"), "migrate --dry-run"),
    g(A, "SELECT", On::Table("outbox_catalog"), "catalog sync"),
    g(A, "INSERT", On::Table("outbox_catalog"), "catalog sync"),
    g(A, "UPDATE", On::Table("outbox_catalog"), "catalog sync"),
    g(A, "DELETE", On::Table("outbox_catalog"), "catalog sync"),
    g(A, "SELECT", On::Table("outbox_publisher_roles"), "publisher mapping"),
    g(A, "INSERT", On::Table("outbox_publisher_roles"), "publisher mapping"),
    g(A, "UPDATE", On::Table("outbox_publisher_roles"), "publisher mapping"),
    g(A, "DELETE", On::Table("outbox_publisher_roles"), "publisher mapping"),
    g(A, "SELECT", On::Table("outbox_consumer_roles"), "consumer mapping"),
    g(A, "INSERT", On::Table("outbox_consumer_roles"), "consumer mapping"),
    g(A, "UPDATE", On::Table("outbox_consumer_roles"), "consumer mapping"),
    g(A, "DELETE", On::Table("outbox_consumer_roles"), "consumer mapping"),
    g(A, "EXECUTE", On::Function("outbox_map_publisher(name,text)"), "publisher mapping"),
    g(A, "EXECUTE", On::Function("outbox_map_consumer(name,text)"), "consumer mapping"),
    g(A, "EXECUTE", On::Function("outbox_dlq_list(text,text,timestamp with time zone,timestamp with time zone,text,bigint)"), "dlq list"),
    g(A, "EXECUTE", On::Function("outbox_dlq_replay(text,text,timestamp with time zone,timestamp with time zone,text)"), "dlq replay"),
    g(A, "EXECUTE", On::Function("outbox_dlq_replay_event(text)"), "dlq replay"),
    g(A, "EXECUTE", On::Function("outbox_dlq_discard(text,text,text,text,timestamp with time zone,timestamp with time zone)"), "dlq discard"),
    g(A, "EXECUTE", On::Function("outbox_dlq_replay_report(text,text,timestamp with time zone,timestamp with time zone,text,boolean,text)"), "dlq replay"),
    g(A, "EXECUTE", On::Function("outbox_dlq_repair(text,jsonb,text,text,jsonb,boolean)"), "dlq repair"),
    g(A, "EXECUTE", On::Function("outbox_set_dedupe_horizon(integer)"), "retention"),
    g(A, "EXECUTE", On::Function("outbox_dedupe_partitions_ensure(integer,timestamp with time zone)"), "retention"),
    g(A, "EXECUTE", On::Function("outbox_dedupe_purge(boolean)"), "retention"),
    g(A, "EXECUTE", On::Function("outbox_dlq_purge(interval)"), "retention"),
    g(A, "EXECUTE", On::Function("outbox_relays_purge(interval)"), "retention"),
    g(A, "EXECUTE", On::Function("outbox_enable_notify()"), "wake-ups"),
    g(A, "EXECUTE", On::Function("outbox_disable_notify()"), "wake-ups"),
    // Consumers: their own dedupe and parked rows (row security by mapping).
    g(C, "SELECT", On::Table("processed_event_ids"), "dedupe"),
    g(C, "INSERT", On::Table("processed_event_ids"), "dedupe"),
    g(C, "SELECT", On::Table("consumer_parked_events"), "parking"),
    g(C, "INSERT", On::Table("consumer_parked_events"), "parking"),
    g(C, "UPDATE", On::Table("consumer_parked_events"), "parking again"),
    g(C, "SELECT", On::Table("outbox_consumer_roles"), "row security; the kit's start-up check"),
];

impl Grant {
    /// Whether this grant allows `privilege` on `column` of `table`.
    pub fn allows_column(&self, group: &str, privilege: &str, table: &str, column: &str) -> bool {
        self.group == group
            && self.privilege == privilege
            && match self.on {
                On::Table(t) => t == table,
                On::Columns(t, cols) => t == table && cols.contains(&column),
                On::Function(_) => false,
            }
    }
}

/// Whether `group` may do `privilege` on the whole table or view `table`
/// (DELETE, TRUNCATE, TRIGGER, REFERENCES are table-wide).
pub fn allows_table(group: &str, privilege: &str, table: &str) -> bool {
    GRANTS.iter().any(|g| {
        g.group == group && g.privilege == privilege && matches!(g.on, On::Table(t) if t == table)
    })
}

pub fn allows_column(group: &str, privilege: &str, table: &str, column: &str) -> bool {
    GRANTS
        .iter()
        .any(|g| g.allows_column(group, privilege, table, column))
}

pub fn allows_function(group: &str, signature: &str) -> bool {
    GRANTS
        .iter()
        .any(|g| g.group == group && matches!(g.on, On::Function(f) if f == signature))
}

/// A privilege of the matrix that the connected role does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub grant: &'static Grant,
    /// The column, for a column grant.
    pub column: Option<&'static str>,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.grant;
        match (g.on, self.column) {
            (On::Columns(t, _), Some(c)) => write!(f, "{} ({c}) ON {t}", g.privilege),
            (On::Table(t) | On::Columns(t, _), _) => write!(f, "{} ON {t}", g.privilege),
            (On::Function(func), _) => write!(f, "EXECUTE ON FUNCTION {func}"),
        }
    }
}

/// The privileges of `group` that the connected role does not hold. An
/// object that does not exist yet (migrations pending) counts as missing.
pub async fn missing(pool: &PgPool, group: &str) -> sqlx::Result<Vec<Missing>> {
    let mut wanted: Vec<Missing> = Vec::new();
    let (mut kinds, mut objects, mut columns, mut privileges) = (vec![], vec![], vec![], vec![]);
    for grant in GRANTS.iter().filter(|g| g.group == group) {
        let mut want = |kind: &'static str, object: &'static str, column: Option<&'static str>| {
            kinds.push(kind);
            objects.push(object);
            columns.push(column.unwrap_or(""));
            privileges.push(grant.privilege);
            wanted.push(Missing { grant, column });
        };
        match grant.on {
            On::Table(t) => want("table", t, None),
            On::Columns(t, cols) => cols.iter().for_each(|c| want("column", t, Some(c))),
            On::Function(f) => want("function", f, None),
        }
    }
    // CASE keeps has_*_privilege from raising on an object that does not exist.
    let held: Vec<bool> = sqlx::query_scalar(
        "SELECT coalesce(CASE k \
             WHEN 'table' THEN CASE WHEN to_regclass(o) IS NOT NULL THEN has_table_privilege(o, p) END \
             WHEN 'column' THEN CASE WHEN to_regclass(o) IS NOT NULL THEN has_column_privilege(o, c, p) END \
             WHEN 'function' THEN CASE WHEN to_regprocedure(o) IS NOT NULL THEN has_function_privilege(o, p) END \
           END, false) \
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY AS t(k, o, c, p, n) \
          ORDER BY n",
    )
    .bind(&kinds)
    .bind(&objects)
    .bind(&columns)
    .bind(&privileges)
    .fetch_all(pool)
    .await?;
    Ok(wanted
        .into_iter()
        .zip(held)
        .filter_map(|(m, ok)| (!ok).then_some(m))
        .collect())
}

/// The start-up error for a role that lacks some of its group's privileges.
pub fn missing_message(role: &str, group: &str, missing: &[Missing]) -> String {
    let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
    format!(
        "role {role} lacks privileges that {group} holds: {}. Make it a member (GRANT {group} TO {role}); \
         if it is one already, the database's grants are behind this binary: run `outbox-relay migrate`",
        list.join("; ")
    )
}

/// The matrix as a Markdown table: one row per object, one column per group.
pub fn markdown() -> String {
    let mut objects: Vec<String> = Vec::new();
    let label = |on: &On| match on {
        On::Table(t) | On::Columns(t, _) => format!("`{t}`"),
        On::Function(f) => format!("`{}`", f.split('(').next().unwrap_or(f)),
    };
    // Tables and views first, then functions, each in declaration order.
    for functions in [false, true] {
        for grant in GRANTS {
            let l = label(&grant.on);
            if matches!(grant.on, On::Function(_)) == functions && !objects.contains(&l) {
                objects.push(l);
            }
        }
    }
    let mut out = String::from("| object |");
    for group in GROUPS {
        out.push_str(&format!(" `{group}` |"));
    }
    out.push_str("\n| --- |");
    for _ in GROUPS {
        out.push_str(" --- |");
    }
    out.push('\n');
    for object in &objects {
        out.push_str(&format!("| {object} |"));
        for group in GROUPS {
            let mut cell: Vec<String> = Vec::new();
            for entry in GRANTS
                .iter()
                .filter(|g| g.group == group && &label(&g.on) == object)
                .map(|g| match g.on {
                    On::Columns(_, cols) => format!("{} ({})", g.privilege, cols.join(", ")),
                    _ => g.privilege.to_string(),
                })
            {
                // Overloads of one function share a row.
                if !cell.contains(&entry) {
                    cell.push(entry);
                }
            }
            out.push_str(&format!(" {} |", cell.join(", ")));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_grant_names_a_known_group_and_privilege() {
        for grant in GRANTS {
            assert!(GROUPS.contains(&grant.group), "{grant:?}");
            let ok = match grant.on {
                On::Function(_) => grant.privilege == "EXECUTE",
                _ => ["SELECT", "INSERT", "UPDATE", "DELETE"].contains(&grant.privilege),
            };
            assert!(ok, "{grant:?}");
        }
    }

    #[test]
    fn the_relay_may_update_every_retry_column_and_writers_only_event_columns() {
        for c in RETRY_COLUMNS {
            assert!(allows_column("outbox_relay", "UPDATE", "outbox", c), "{c}");
            assert!(
                !allows_column("outbox_writer", "UPDATE", "outbox", c),
                "{c}"
            );
        }
        assert!(!allows_column(
            "outbox_writer",
            "INSERT",
            "outbox",
            "publisher"
        ));
        assert!(!allows_column("outbox_writer", "INSERT", "outbox", "id"));
        assert!(!allows_column(
            "outbox_relay",
            "UPDATE",
            "outbox",
            "payload"
        ));
    }

    #[test]
    fn markdown_has_a_row_per_object_and_a_column_per_group() {
        let md = markdown();
        assert!(md.starts_with(
            "| object | `outbox_writer` | `outbox_relay` | `outbox_admin` | `outbox_consumer` |"
        ));
        let outbox = md.lines().find(|l| l.starts_with("| `outbox` |")).unwrap();
        assert!(outbox.contains("INSERT (event_id, event_type"), "{outbox}");
        assert!(
            outbox.contains("UPDATE (attempts, unknown_failures"),
            "{outbox}"
        );
    }
}
