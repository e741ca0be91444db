//! From (commit time, append time) pairs to latency percentiles and to the
//! backlog and oldest-pending age over time.
//!
//! Commit time: the Postgres clock read by the writer's INSERT (RETURNING
//! clock_timestamp()) in an autocommit statement, so the commit follows it
//! within the WAL flush. Append time: the broker's LogAppendTime of the record
//! (millisecond resolution; the midpoint of the millisecond is used). Both
//! clocks are the same host clock.

use serde::Serialize;

use crate::kafka::Seen;
use crate::workload::Commit;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn latency(values_ms: &[f64]) -> Latency {
    let mut v = values_ms.to_vec();
    v.sort_by(f64::total_cmp);
    Latency {
        count: v.len(),
        p50_ms: percentile(&v, 0.50),
        p90_ms: percentile(&v, 0.90),
        p99_ms: percentile(&v, 0.99),
        max_ms: v.last().copied().unwrap_or(f64::NAN),
    }
}

/// One event's journey.
#[derive(Debug, Clone, Copy)]
pub struct Trip {
    pub commit_us: i64,
    pub append_us: i64,
}

impl Trip {
    pub fn latency_ms(&self) -> f64 {
        (self.append_us - self.commit_us) as f64 / 1000.0
    }
}

#[derive(Debug, Default)]
pub struct Joined {
    pub trips: Vec<Trip>,
    /// Committed but never seen in Kafka.
    pub missing: u64,
    /// Seen more than once (at-least-once redelivery).
    pub duplicates: u64,
}

/// Matches what the writers committed with what Kafka holds. `commits` is
/// sorted by sequence number.
pub fn join(commits: &[Commit], seen: &[Seen]) -> Joined {
    let mut out = Joined::default();
    if commits.is_empty() {
        return out;
    }
    let base = commits[0].seq;
    let span = (commits[commits.len() - 1].seq - base + 1) as usize;
    let mut index = vec![u32::MAX; span];
    for (i, c) in commits.iter().enumerate() {
        index[(c.seq - base) as usize] = i as u32;
    }
    let mut first_append = vec![i64::MIN; commits.len()];
    for s in seen {
        if s.seq < base || (s.seq - base) as usize >= span {
            continue;
        }
        let i = index[(s.seq - base) as usize];
        if i == u32::MAX {
            continue;
        }
        let slot = &mut first_append[i as usize];
        if *slot == i64::MIN {
            *slot = s.append_ms * 1000 + 500;
        } else {
            out.duplicates += 1;
        }
    }
    for (c, &a) in commits.iter().zip(&first_append) {
        if a == i64::MIN {
            out.missing += 1;
        } else {
            out.trips.push(Trip {
                commit_us: c.commit_us,
                append_us: a,
            });
        }
    }
    out
}

/// The state of the pipeline at one instant.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the phase started.
    pub t_s: f64,
    /// Events committed and not yet appended.
    pub backlog: u64,
    /// Age of the oldest such event, ms (0 when none).
    pub oldest_pending_ms: f64,
    /// p99 and max latency of the events committed in the step ending here.
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Events committed in the step, per second.
    pub commit_rate: f64,
}

/// Samples every `step_ms` from `start_us` until every trip has ended.
pub fn timeline(trips: &[Trip], start_us: i64, step_ms: i64) -> Vec<Sample> {
    if trips.is_empty() {
        return Vec::new();
    }
    let step = step_ms * 1000;
    let end = trips
        .iter()
        .map(|t| t.append_us.max(t.commit_us))
        .max()
        .unwrap_or(start_us);
    let n = ((end - start_us) / step + 2).max(1) as usize;
    let mut backlog = vec![0u64; n];
    let mut oldest = vec![i64::MAX; n];
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); n];
    for t in trips {
        // Sample j is at start + j*step; the event is pending at samples in
        // [commit, append).
        let first = ((t.commit_us - start_us).max(0) + step - 1) / step;
        let mut j = first.max(0) as usize;
        while j < n && start_us + (j as i64) * step < t.append_us {
            backlog[j] += 1;
            oldest[j] = oldest[j].min(t.commit_us);
            j += 1;
        }
        // The step a commit belongs to: (j-1)*step, j*step].
        let k = (((t.commit_us - start_us).max(0) + step - 1) / step) as usize;
        if k < n {
            lat[k].push(t.latency_ms());
        }
    }
    (0..n)
        .map(|j| {
            let at = start_us + j as i64 * step;
            let mut l = std::mem::take(&mut lat[j]);
            l.sort_by(f64::total_cmp);
            Sample {
                t_s: (j as i64 * step) as f64 / 1e6,
                backlog: backlog[j],
                oldest_pending_ms: if oldest[j] == i64::MAX {
                    0.0
                } else {
                    (at - oldest[j]) as f64 / 1000.0
                },
                p99_ms: percentile(&l, 0.99),
                max_ms: l.last().copied().unwrap_or(f64::NAN),
                commit_rate: l.len() as f64 * 1000.0 / step_ms as f64,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn join_counts_missing_and_duplicates() {
        let commits: Vec<Commit> = (10..15)
            .map(|s| Commit {
                seq: s,
                commit_us: s as i64 * 1000,
            })
            .collect();
        let seen = vec![
            Seen {
                seq: 10,
                append_ms: 12,
            },
            Seen {
                seq: 11,
                append_ms: 14,
            },
            Seen {
                seq: 11,
                append_ms: 15,
            },
            Seen {
                seq: 13,
                append_ms: 20,
            },
            Seen {
                seq: 99,
                append_ms: 20,
            },
        ];
        let j = join(&commits, &seen);
        assert_eq!(j.trips.len(), 3);
        assert_eq!(j.missing, 2);
        assert_eq!(j.duplicates, 1);
        assert_eq!(j.trips[0].latency_ms(), 2.5);
    }

    #[test]
    fn timeline_tracks_backlog_and_oldest_pending() {
        // Two events committed at 0 and 50 ms, appended at 250 and 120 ms.
        let trips = [
            Trip {
                commit_us: 0,
                append_us: 250_000,
            },
            Trip {
                commit_us: 50_000,
                append_us: 120_000,
            },
        ];
        let t = timeline(&trips, 0, 100);
        assert_eq!(t[0].backlog, 1);
        assert_eq!(t[1].backlog, 2);
        assert_eq!(t[1].oldest_pending_ms, 100.0);
        assert_eq!(t[2].backlog, 1);
        assert_eq!(t[2].oldest_pending_ms, 200.0);
        assert_eq!(t[3].backlog, 0);
        assert_eq!(t[3].oldest_pending_ms, 0.0);
    }
}
