//! The writer library for kernel services written in Rust: typed structs for
//! the catalog's events and [`enqueue`], which inserts the outbox row inside
//! the caller's own transaction. It needs sqlx (PostgreSQL) and the model
//! crate only: no Kafka client.
//!
//! ```no_run
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox_writer::{enqueue, UserCreated};
//! let mut tx = pool.begin().await?;
//! // ... the service's own writes ...
//! let event_id = enqueue(&mut tx, &UserCreated {
//!     user_id: "01j9pa5mz700000000000000".into(),
//!     email: "ada@example.com".into(),
//!     tenant_id: "01j9p3kz5f00000000000000".into(),
//!     roles: vec!["member".into()],
//! }).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```

use serde::Serialize;
use sqlx::PgConnection;

/// An event of the catalog, serialized as its payload.
pub trait Event: Serialize {
    const EVENT_TYPE: &'static str;
    /// The tenant the event belongs to, when the payload names one.
    fn tenant_id(&self) -> Option<&str> {
        None
    }
}

/// Trace and correlation context stored in the row's `headers` column and
/// carried to Kafka headers and the envelope.
pub use outbox_model::envelope::TraceContext as Context;
pub use outbox_model::new_event_id;

/// Options for [`enqueue_with`].
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Supply the id to make retrying the same insert idempotent (the row is
    /// inserted at most once while it is pending).
    pub event_id: Option<String>,
    /// Overrides the event's own tenant.
    pub tenant_id: Option<String>,
    pub context: Option<Context>,
}

/// Inserts `event` into the outbox on the caller's connection (normally
/// inside its transaction). Returns the event id.
pub async fn enqueue<E: Event>(conn: &mut PgConnection, event: &E) -> Result<String, sqlx::Error> {
    enqueue_with(conn, event, Options::default()).await
}

pub async fn enqueue_with<E: Event>(
    conn: &mut PgConnection,
    event: &E,
    options: Options,
) -> Result<String, sqlx::Error> {
    let event_id = options.event_id.unwrap_or_else(new_event_id);
    let tenant = options
        .tenant_id
        .or_else(|| event.tenant_id().map(str::to_owned));
    let payload = serde_json::to_value(event).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let headers = options
        .context
        .map(|c| serde_json::to_value(c).map_err(|e| sqlx::Error::Encode(Box::new(e))))
        .transpose()?;
    insert_event(
        conn,
        &event_id,
        E::EVENT_TYPE,
        tenant.as_deref(),
        payload,
        headers,
    )
    .await?;
    Ok(event_id)
}

/// No RETURNING and no conflict target: both need SELECT, and a writer role
/// has INSERT privilege only. The only unique key a writer can hit is the
/// event id (the ordering id is generated), so a repeated insert is a no-op.
async fn insert_event(
    conn: &mut PgConnection,
    event_id: &str,
    event_type: &str,
    tenant_id: Option<&str>,
    payload: serde_json::Value,
    headers: Option<serde_json::Value>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO outbox (event_id, event_type, tenant_id, payload, headers) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
    )
    .bind(event_id)
    .bind(event_type)
    .bind(tenant_id)
    .bind(payload)
    .bind(headers)
    .execute(conn)
    .await?;
    Ok(())
}

macro_rules! events {
    ($(
        $(#[$doc:meta])*
        $name:ident = $event_type:literal $(, tenant = $tenant:ident)? {
            $( $field:ident : $ty:ty ),* $(,)?
        }
    )*) => {$(
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        pub struct $name { $( pub $field: $ty ),* }

        impl Event for $name {
            const EVENT_TYPE: &'static str = $event_type;
            $(fn tenant_id(&self) -> Option<&str> { Some(&self.$tenant) })?
        }
    )*};
}

events! {
    /// A new user account was created.
    UserCreated = "auth.user.created", tenant = tenant_id {
        user_id: String, email: String, tenant_id: String, roles: Vec<String>,
    }
    /// A user logged in (password, OAuth, wallet).
    UserLoggedIn = "auth.user.logged_in", tenant = tenant_id {
        user_id: String, tenant_id: String, ip: String, user_agent: String,
    }
    /// A user's roles changed.
    RoleChanged = "auth.role.changed" {
        user_id: String, old_roles: Vec<String>, new_roles: Vec<String>,
    }
    /// A module was registered in the Module Registry.
    ModuleRegistered = "module.registry.registered" {
        module_id: String, name: String, version: String,
    }
    /// A module was activated for a tenant.
    ModuleActivated = "module.registry.activated" { module_id: String }
    /// A module was deactivated for a tenant.
    ModuleDeactivated = "module.registry.deactivated" { module_id: String }
    /// Funds were added to a wallet.
    WalletCredited = "money.wallet.credited" {
        tx_id: String, user_id: String, amount_cents: i64, currency: String,
    }
    /// Funds were deducted from a wallet.
    WalletDebited = "money.wallet.debited" {
        tx_id: String, user_id: String, amount_cents: i64, currency: String,
    }
    /// A file was uploaded and stored.
    FileUploaded = "files.file.uploaded" {
        file_id: String, user_id: String, bucket: String, key: String, size: i64,
    }
    /// A notification was delivered or attempted.
    NotificationSent = "notify.notification.sent" {
        notification_id: String, channel: String, user_id: String,
    }
    /// An audit record was written.
    AuditRecordCreated = "audit.record.created" {
        audit_id: String, action: String, user_id: String,
    }
    /// A tenant changed plan.
    PlanChanged = "billing.plan.changed", tenant = tenant_id {
        tenant_id: String, old_plan: String, new_plan: String,
    }
    /// A subscription changed status.
    SubscriptionChanged = "billing.subscription.changed", tenant = tenant_id {
        tenant_id: String, old_status: String, new_status: String,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_model::catalog::Catalog;
    use std::path::PathBuf;

    /// Every typed struct serializes to a payload the catalog accepts, so the
    /// writer library and the catalog cannot drift apart silently.
    #[test]
    fn typed_events_match_the_catalog() {
        let catalog = Catalog::load(&[PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../config/catalog/kernel.toml"
        ))])
        .unwrap();
        fn check<E: Event>(catalog: &Catalog, e: E) -> &'static str {
            let def = catalog.get(E::EVENT_TYPE).expect(E::EVENT_TYPE);
            let v = serde_json::to_value(&e).unwrap();
            def.validate_payload(&v).unwrap();
            assert_eq!(
                v.as_object().unwrap().len(),
                def.payload.len(),
                "{}",
                E::EVENT_TYPE
            );
            E::EVENT_TYPE
        }
        let s = || "x".to_string();
        let types = [
            check(
                &catalog,
                UserCreated {
                    user_id: s(),
                    email: s(),
                    tenant_id: s(),
                    roles: vec![],
                },
            ),
            check(
                &catalog,
                UserLoggedIn {
                    user_id: s(),
                    tenant_id: s(),
                    ip: s(),
                    user_agent: s(),
                },
            ),
            check(
                &catalog,
                RoleChanged {
                    user_id: s(),
                    old_roles: vec![],
                    new_roles: vec![],
                },
            ),
            check(
                &catalog,
                ModuleRegistered {
                    module_id: s(),
                    name: s(),
                    version: s(),
                },
            ),
            check(&catalog, ModuleActivated { module_id: s() }),
            check(&catalog, ModuleDeactivated { module_id: s() }),
            check(
                &catalog,
                WalletCredited {
                    tx_id: s(),
                    user_id: s(),
                    amount_cents: 1,
                    currency: s(),
                },
            ),
            check(
                &catalog,
                WalletDebited {
                    tx_id: s(),
                    user_id: s(),
                    amount_cents: 1,
                    currency: s(),
                },
            ),
            check(
                &catalog,
                FileUploaded {
                    file_id: s(),
                    user_id: s(),
                    bucket: s(),
                    key: s(),
                    size: 1,
                },
            ),
            check(
                &catalog,
                NotificationSent {
                    notification_id: s(),
                    channel: s(),
                    user_id: s(),
                },
            ),
            check(
                &catalog,
                AuditRecordCreated {
                    audit_id: s(),
                    action: s(),
                    user_id: s(),
                },
            ),
            check(
                &catalog,
                PlanChanged {
                    tenant_id: s(),
                    old_plan: s(),
                    new_plan: s(),
                },
            ),
            check(
                &catalog,
                SubscriptionChanged {
                    tenant_id: s(),
                    old_status: s(),
                    new_status: s(),
                },
            ),
        ];
        assert_eq!(types.len(), catalog.events.len());
    }

    #[test]
    fn event_ids_are_lowercase_ulids() {
        let id = new_event_id();
        assert_eq!(id.len(), 26);
        assert!(id
            .chars()
            .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase()));
    }
}
