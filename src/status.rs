//! `outbox-relay status`: what an operator asks first — how far behind are
//! we, what is dead, who is relaying, who holds the leases, and when did
//! anything last reach Kafka. One report per source database.
//!
//! Every figure comes from the source database itself, so the command works
//! when no relay is running (which is when it is needed most). The backlog
//! figures are the ones the gauges use ([`sql::backlog`]): bounded counts,
//! estimates above [`crate::EXACT_COUNT_BELOW`] rows, flagged as such.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::config::{Settings, Source};
use crate::envelope::format_time;
use crate::sql::{self, RelayRow};

/// Every configured source, in configuration order.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub sources: Vec<SourceReport>,
}

/// One source: its status, or why it could not be read.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum SourceReport {
    Ok(Box<SourceStatus>),
    Failed { source: String, error: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceStatus {
    pub source: String,
    pub pending: i64,
    pub pending_is_estimate: bool,
    pub oldest_pending_age_seconds: f64,
    pub dlq_dead: i64,
    pub dlq_is_estimate: bool,
    /// Exact, by reason (`dlq_dead` may be an estimate on a huge DLQ).
    pub dlq_by_reason: Vec<DlqCount>,
    pub leases: LeaseSummary,
    /// Relays registered in this database (every `source` label: two
    /// deployments naming one database differently show up here).
    pub relays: Vec<RelayStatus>,
    /// The latest publish any registered relay reported.
    pub last_publish_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DlqCount {
    pub reason: String,
    pub events: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LeaseSummary {
    /// Virtual partitions of this database.
    pub partitions: i64,
    /// Partitions with an owner whose lease has not expired.
    pub owned: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RelayStatus {
    #[serde(flatten)]
    pub row: RelayRow,
    /// Seconds since the relay's last heartbeat, on the database's clock.
    pub heartbeat_age_seconds: f64,
    /// Live leases it holds.
    pub leases: i64,
}

/// Reads every configured source; one that cannot be read (unreachable,
/// refused, not migrated) is reported with the error without hiding the
/// others.
pub async fn collect_all(settings: &Settings) -> StatusReport {
    let mut sources = Vec::new();
    for source in settings.sources() {
        let timeout = Duration::from_millis(settings.database.connect_timeout_ms);
        let report = match read_source(&source, timeout).await {
            Ok(status) => SourceReport::Ok(Box::new(status)),
            Err(err) => SourceReport::Failed {
                source: source.name.clone(),
                error: err.to_string(),
            },
        };
        sources.push(report);
    }
    StatusReport { sources }
}

async fn read_source(source: &Source, timeout: Duration) -> sqlx::Result<SourceStatus> {
    let pool = sql::connect(source.url.expose(), 2, timeout).await?;
    let status = collect(&pool, &source.name).await;
    pool.close().await;
    status
}

/// The status of the source database behind `pool`, labelled `source`.
pub async fn collect(pool: &PgPool, source: &str) -> sqlx::Result<SourceStatus> {
    let backlog = sql::backlog(pool, crate::EXACT_COUNT_BELOW).await?;
    let dlq_by_reason = sql::dlq_by_reason(pool)
        .await?
        .into_iter()
        .map(|(reason, events)| DlqCount { reason, events })
        .collect();
    let (db_now, partitions, owned) = sql::lease_totals(pool).await?;
    let held: BTreeMap<String, i64> = sql::leases_by_owner(pool).await?.into_iter().collect();
    let relays: Vec<RelayStatus> = sql::relays(pool)
        .await?
        .into_iter()
        .map(|row| RelayStatus {
            heartbeat_age_seconds: ((db_now - row.heartbeat_at).num_milliseconds() as f64 / 1e3)
                .max(0.0),
            leases: held.get(&row.relay_id).copied().unwrap_or(0),
            row,
        })
        .collect();
    let last_publish_at = relays.iter().filter_map(|r| r.row.last_publish_at).max();
    Ok(SourceStatus {
        source: source.to_string(),
        pending: backlog.pending,
        pending_is_estimate: backlog.pending_is_estimate,
        oldest_pending_age_seconds: backlog.oldest_pending_age_seconds,
        dlq_dead: backlog.dlq_dead,
        dlq_is_estimate: backlog.dlq_is_estimate,
        dlq_by_reason,
        leases: LeaseSummary { partitions, owned },
        relays,
        last_publish_at,
    })
}

/// `95` → `1m35s`; whole seconds, largest two units.
pub fn format_age(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

impl StatusReport {
    /// Whether every source could be read.
    pub fn all_read(&self) -> bool {
        self.sources
            .iter()
            .all(|s| matches!(s, SourceReport::Ok(_)))
    }

    /// The human table: one line per source, then each source's DLQ
    /// reasons and relays. `~` marks an estimate.
    pub fn render(&self) -> String {
        let approx = |estimate: bool| if estimate { "~" } else { "" };
        let rows: Vec<Vec<String>> = self
            .sources
            .iter()
            .map(|s| match s {
                SourceReport::Ok(s) => vec![
                    s.source.clone(),
                    format!("{}{}", approx(s.pending_is_estimate), s.pending),
                    format_age(s.oldest_pending_age_seconds),
                    format!("{}{}", approx(s.dlq_is_estimate), s.dlq_dead),
                    s.relays
                        .iter()
                        .filter(|r| r.row.stopped_at.is_none())
                        .count()
                        .to_string(),
                    format!("{}/{}", s.leases.owned, s.leases.partitions),
                    s.last_publish_at
                        .map(format_time)
                        .unwrap_or_else(|| "-".into()),
                ],
                SourceReport::Failed { source, .. } => {
                    let mut row = vec![source.clone()];
                    row.extend(["-", "-", "-", "-", "-", "ERROR"].map(String::from));
                    row
                }
            })
            .collect();
        let mut out = table(
            &[
                "SOURCE",
                "PENDING",
                "OLDEST_PENDING",
                "DLQ",
                "RELAYS",
                "LEASES",
                "LAST_PUBLISH",
            ],
            &rows,
        );
        for s in &self.sources {
            if let SourceReport::Failed { source, error } = s {
                out.push_str(&format!("\n{source}: {error}\n"));
            }
        }
        for s in &self.sources {
            let SourceReport::Ok(s) = s else { continue };
            if !s.dlq_by_reason.is_empty() {
                out.push_str(&format!("\nDLQ of {} by reason\n", s.source));
                let rows: Vec<Vec<String>> = s
                    .dlq_by_reason
                    .iter()
                    .map(|d| vec![d.reason.clone(), d.events.to_string()])
                    .collect();
                out.push_str(&table(&["REASON", "EVENTS"], &rows));
            }
            if !s.relays.is_empty() {
                out.push_str(&format!("\nRelays of {}\n", s.source));
                let rows: Vec<Vec<String>> = s
                    .relays
                    .iter()
                    .map(|r| {
                        vec![
                            r.row.relay_id.clone(),
                            r.row.source.clone(),
                            r.row.host.clone(),
                            r.row.version.clone(),
                            r.leases.to_string(),
                            match r.row.stopped_at {
                                Some(t) => format!("stopped {}", format_time(t)),
                                None => format_age(r.heartbeat_age_seconds),
                            },
                            r.row
                                .last_publish_at
                                .map(format_time)
                                .unwrap_or_else(|| "-".into()),
                            r.row.published_total.to_string(),
                        ]
                    })
                    .collect();
                out.push_str(&table(
                    &[
                        "RELAY_ID",
                        "SOURCE",
                        "HOST",
                        "VERSION",
                        "LEASES",
                        "HEARTBEAT",
                        "LAST_PUBLISH",
                        "PUBLISHED",
                    ],
                    &rows,
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(format_age(0.4), "0s");
        assert_eq!(format_age(59.0), "59s");
        assert_eq!(format_age(95.0), "1m35s");
        assert_eq!(format_age(3600.0 * 5.0 + 61.0), "5h01m");
        assert_eq!(format_age(86_400.0 * 3.0 + 7200.0), "3d02h");
        assert_eq!(format_age(-3.0), "0s");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xxxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A     LONGER\nxxxx  1\ny     22\n");
    }
}
