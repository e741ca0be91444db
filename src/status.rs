//! `outbox-relay status`: what an operator asks first — how far behind are
//! we, what is dead, who is relaying and when did they last publish.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::config::Settings;
use crate::sql::{self, RelayRow};

#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub source: String,
    pub pending: i64,
    pub pending_is_estimate: bool,
    pub oldest_pending_age_seconds: f64,
    pub dlq_dead: i64,
    pub dlq_by_reason: Vec<DlqCount>,
    pub relays: Vec<RelayRow>,
    pub last_publish_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DlqCount {
    pub reason: String,
    pub events: i64,
}

pub async fn collect(pool: &PgPool, settings: &Settings) -> sqlx::Result<StatusReport> {
    let backlog = sql::backlog(pool, crate::EXACT_COUNT_BELOW).await?;
    let dlq_by_reason = sql::dlq_by_reason(pool)
        .await?
        .into_iter()
        .map(|(reason, events)| DlqCount { reason, events })
        .collect();
    let relays: Vec<RelayRow> = sql::relays(pool)
        .await?
        .into_iter()
        .filter(|r| r.source == settings.relay.source)
        .collect();
    let last_publish_at = relays.iter().filter_map(|r| r.last_publish_at).max();
    Ok(StatusReport {
        source: settings.relay.source.clone(),
        pending: backlog.pending,
        pending_is_estimate: backlog.pending_is_estimate,
        oldest_pending_age_seconds: backlog.oldest_pending_age_seconds,
        dlq_dead: backlog.dlq_dead,
        dlq_by_reason,
        relays,
        last_publish_at,
    })
}

impl StatusReport {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let approx = if self.pending_is_estimate { "~" } else { "" };
        out.push_str(&format!("source                {}\n", self.source));
        out.push_str(&format!("pending               {approx}{}\n", self.pending));
        out.push_str(&format!(
            "oldest pending age    {:.1}s\n",
            self.oldest_pending_age_seconds
        ));
        out.push_str(&format!("dlq (dead)            {}\n", self.dlq_dead));
        for d in &self.dlq_by_reason {
            out.push_str(&format!("  {:<22}{}\n", d.reason, d.events));
        }
        out.push_str(&format!(
            "last publish          {}\n",
            self.last_publish_at
                .map(crate::envelope::format_time)
                .unwrap_or_else(|| "never".into())
        ));
        out.push_str(&format!("relays                {}\n", self.relays.len()));
        for r in &self.relays {
            out.push_str(&format!(
                "  {:<36} host={} version={} heartbeat={} published={}\n",
                r.relay_id,
                r.host,
                r.version,
                crate::envelope::format_time(r.heartbeat_at),
                r.published_total
            ));
        }
        out
    }
}
