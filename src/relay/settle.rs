//! Stage 4, settle: decide what becomes of each row of a batch and write it
//! in the batch's own transaction.
//!
//! * [`plan`] — a pure function — turns each row's answer (its prepare-time
//!   rejection, or Kafka's ack or error) and the lease fence into one
//!   [`Settlement`] per row.
//! * [`Relay::settle`] reads the fence and applies the plan: on the fast
//!   path (every row acknowledged, every lease held) the claim's own delete
//!   stands and nothing more is written; otherwise the claim is undone
//!   (`sql::unclaim`), the fence is read again with the rows locked again,
//!   and the plan is written row by row in one place ([`Relay::apply`]).
//! * Then come the metrics, the progress the heartbeat reports, and the
//!   producer's fatal-error check.
//!
//! Retry delays and the `relay.max_attempts` budget are not planned here:
//! `outbox_schedule_retry` computes the delay (backoff with jitter, from
//! the failure's time) and counts failures of unknown class against the
//! row's `unknown_failures`, dead-lettering the row as `retries_exhausted`
//! in the same statement; it returns those rows.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use chrono::Utc;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use sqlx::{Postgres, Transaction};

use super::prepare::{Row, State};
use super::produce::Answered;
use super::{BatchReport, Relay, RelayError};
use crate::envelope::Rejected;
use crate::failure::{self, Class, DlqReason};
use crate::metrics;
use crate::publish::{self, Ack};
use crate::sql;

/// What becomes of one claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Kafka acknowledged it: deleted.
    Delete,
    /// It can never be published as it is: moved to the DLQ.
    DeadLetter { reason: DlqReason, error: String },
    /// It failed for now: rescheduled by `outbox_schedule_retry` (which
    /// counts a failure of [`Class::Unknown`] against `relay.max_attempts`).
    Retry { class: Class, error: String },
    /// No answer before the lease ran short (or never sent for that
    /// reason): back in the outbox untouched, published again (same id).
    Release,
    /// Its partition's lease was lost during the batch: left untouched to
    /// the new owner.
    Fenced,
}

/// One row as the planner sees it.
#[derive(Debug)]
pub struct Input<'a> {
    pub vpartition: i16,
    pub answer: Answer<'a>,
}

/// What a row's publishing came to.
#[derive(Debug)]
pub enum Answer<'a> {
    /// Refused by the prepare stage; never produced.
    Rejected(&'a Rejected),
    /// Kafka's delivery report; `None` when none came in time.
    Kafka(Option<&'a Result<Ack, KafkaError>>),
}

/// Which of the batch's partitions are still this relay's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// No leases: every row is this relay's.
    Unleased,
    /// The partitions still leased to this relay under the epochs the batch
    /// claimed them with (`outbox_lease_fence`).
    Held(BTreeSet<i16>),
}

impl Fence {
    pub fn holds(&self, vpartition: i16) -> bool {
        match self {
            Fence::Unleased => true,
            Fence::Held(held) => held.contains(&vpartition),
        }
    }
}

/// What a row's own answer asks for, leases aside.
pub fn judge(answer: &Answer<'_>) -> Settlement {
    match answer {
        Answer::Rejected(rejected) => Settlement::DeadLetter {
            reason: rejected.reason,
            error: rejected.message.clone(),
        },
        Answer::Kafka(None) => Settlement::Release,
        Answer::Kafka(Some(Ok(_))) => Settlement::Delete,
        Answer::Kafka(Some(Err(err))) => match failure::classify_kafka(err) {
            Class::Permanent(reason) => Settlement::DeadLetter {
                reason,
                error: err.to_string(),
            },
            class => Settlement::Retry {
                class,
                error: err.to_string(),
            },
        },
    }
}

/// The settlement of every row of a batch, in the rows' order: what its
/// answer asks for when its partition is still held, [`Settlement::Fenced`]
/// when it is not. An unanswered row is released either way.
pub fn plan(rows: &[Input<'_>], fence: &Fence) -> Vec<Settlement> {
    rows.iter()
        .map(|row| match judge(&row.answer) {
            Settlement::Release => Settlement::Release,
            settlement if fence.holds(row.vpartition) => settlement,
            _ => Settlement::Fenced,
        })
        .collect()
}

/// What a step reports, from its plan and the rows `outbox_schedule_retry`
/// dead-lettered (retries exhausted) instead of rescheduling.
pub fn tally(plan: &[Settlement], exhausted: usize) -> BatchReport {
    let count = |f: fn(&Settlement) -> bool| plan.iter().filter(|s| f(s)).count();
    BatchReport {
        claimed: plan.len(),
        published: count(|s| matches!(s, Settlement::Delete)),
        dead_lettered: count(|s| matches!(s, Settlement::DeadLetter { .. })) + exhausted,
        retried: count(|s| matches!(s, Settlement::Retry { .. })) - exhausted,
    }
}

/// Whether the claim's delete still stands when a plan is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Every row is deleted by the claim itself.
    Stands,
    /// Undone (`sql::unclaim`): every row is back and locked, and is
    /// settled one by one.
    Undone,
}

impl Row {
    fn input(&self) -> Input<'_> {
        let answer = match &self.state {
            State::Rejected(rejected) => Answer::Rejected(rejected),
            State::Answered { answer, .. } => Answer::Kafka(answer.as_ref()),
            // Not produced: nothing can have reached Kafka.
            State::Ready(_) | State::Queued => Answer::Kafka(None),
        };
        Input {
            vpartition: self.vpartition,
            answer,
        }
    }

    /// The event type as the metrics and logs of a produced row name it
    /// (the catalog's), or the row's own before that.
    fn metric_type(&self) -> &str {
        match &self.state {
            State::Answered { msg, .. } => &msg.def.event_type,
            _ => &self.event_type,
        }
    }
}

/// How many of the batch's messages Kafka acknowledged, and how many timed
/// out (librdkafka gave up on them), for the producer's health.
fn answers(rows: &[Row]) -> publish::Answers {
    let mut answers = publish::Answers::default();
    for row in rows {
        match &row.state {
            State::Answered {
                answer: Some(Ok(_)),
                ..
            } => answers.acked += 1,
            State::Answered {
                answer: Some(Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut))),
                ..
            } => answers.timed_out += 1,
            _ => {}
        }
    }
    answers
}

impl Relay {
    /// Settles a batch with Kafka's answers in its own transaction: delete
    /// what was acknowledged, dead-letter what never can be published,
    /// reschedule the rest, commit.
    pub(super) async fn settle(&self, batch: Answered) -> Result<BatchReport, RelayError> {
        let Answered {
            mut tx,
            rows,
            epochs,
            producer,
            started,
            claimed_in,
            produced_in,
            acked_in,
            ..
        } = batch;
        self.report_answers(&rows);
        let inputs: Vec<Input<'_>> = rows.iter().map(Row::input).collect();

        // Fast path: every row was acknowledged and every lease held, so
        // the claim's delete stands as it is. Otherwise the delete is undone
        // and the batch settled row by row.
        let mut fast = None;
        if inputs
            .iter()
            .all(|i| judge(&i.answer) == Settlement::Delete)
        {
            let (fence, _) = self.fence(&mut tx, &rows, &epochs).await?;
            let planned = plan(&inputs, &fence);
            if planned.iter().all(|s| *s == Settlement::Delete) {
                fast = Some(planned);
            }
        }
        let (planned, claim) = match fast {
            Some(planned) => (planned, Claim::Stands),
            None => {
                let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                sql::unclaim(&mut tx, &ids).await?;
                // Fencing: settle only rows of partitions still ours under the
                // epoch we claimed them with.
                let (fence, lost) = self.fence(&mut tx, &rows, &epochs).await?;
                let planned = plan(&inputs, &fence);
                if lost > 0 {
                    let fenced = planned.iter().filter(|s| **s == Settlement::Fenced);
                    tracing::warn!(
                        events = fenced.count(),
                        lost,
                        "lease lost during the batch; its rows are left to the new owner"
                    );
                }
                (planned, Claim::Undone)
            }
        };
        let exhausted = self.apply(&mut tx, &rows, &planned, claim).await?;

        let settled_in = started.elapsed();
        let committed = tx.commit().await;
        tracing::trace!(
            rows = rows.len(),
            claim_us = claimed_in.as_micros() as u64,
            produce_us = (produced_in - claimed_in).as_micros() as u64,
            ack_us = (acked_in - produced_in).as_micros() as u64,
            settle_us = (settled_in - acked_in).as_micros() as u64,
            commit_us = (started.elapsed() - settled_in).as_micros() as u64,
            "batch timings"
        );
        let report = tally(&planned, exhausted.len());
        if let Err(err) = committed {
            // Kafka has these events; they will be published again with the
            // same ids once the rows are claimed again (at-least-once).
            tracing::warn!(events = report.published, error = %err,
                "commit after Kafka acknowledged failed; these events will be re-delivered");
            return Err(err.into());
        }
        self.record(&rows, &planned, &exhausted);
        self.producer.recover(&producer, answers(&rows))?;
        Ok(report)
    }

    /// Logs and counts Kafka's answers as they came, before any fencing:
    /// failures by class, publish latencies, and what is left unsettled.
    fn report_answers(&self, rows: &[Row]) {
        let now = Utc::now();
        let mut latencies = Vec::with_capacity(rows.len());
        let mut retried = 0usize;
        let mut first_retry_error = None;
        let mut unsettled = 0usize;
        for row in rows {
            let State::Answered { msg, answer } = &row.state else {
                continue;
            };
            let err = match answer {
                None => {
                    // No report before the lease ran short: left for the
                    // next owner, who publishes it again (same id).
                    unsettled += 1;
                    continue;
                }
                Some(Ok(_)) => {
                    let latency = (now - msg.occurred_at).num_microseconds().unwrap_or(0);
                    latencies.push(latency as f64 / 1e6);
                    continue;
                }
                Some(Err(err)) => err,
            };
            let class = failure::classify_kafka(err);
            match class {
                Class::Permanent(reason) => {
                    tracing::error!(event_id = %msg.event_id, event_type = %msg.def.event_type,
                        reason = reason.as_str(), error = %err, "event dead-lettered");
                    continue;
                }
                Class::Transient(label) => {
                    if label == failure::TOPIC_AUTHORIZATION_FAILED {
                        // Nothing recovers until an operator grants the ACL.
                        tracing::error!(event_id = %msg.event_id, event_type = %msg.def.event_type,
                            topic = %msg.topic, error = %err,
                            "the broker denies the relay this topic; the event is retried until the ACL is granted");
                    }
                    metrics::publish_failure(self.source(), label);
                }
                Class::Unknown => {
                    tracing::warn!(event_id = %msg.event_id, event_type = %msg.def.event_type,
                        attempt = row.attempts + 1, error = %err, "publish failed with an error of unknown class");
                    metrics::publish_failure(self.source(), class.retry_label());
                }
            }
            retried += 1;
            first_retry_error.get_or_insert_with(|| err.to_string());
        }
        metrics::publish_latencies(self.source(), latencies);
        if let Some(error) = first_retry_error {
            tracing::warn!(
                events = retried,
                error = %error,
                "publish failed; events stay in the outbox and are retried"
            );
        }
        if unsettled > 0 {
            tracing::warn!(
                events = unsettled,
                "lease ran short before Kafka answered; events left for the next owner"
            );
        }
    }

    /// Reads which of the batch's partitions are still leased to this relay
    /// under the epochs it claimed them with, and how many are not.
    async fn fence(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        rows: &[Row],
        epochs: &HashMap<i16, i64>,
    ) -> Result<(Fence, usize), sqlx::Error> {
        let Some(leases) = self.leases.as_ref().filter(|_| !epochs.is_empty()) else {
            return Ok((Fence::Unleased, 0));
        };
        let touched: BTreeSet<i16> = rows.iter().map(|r| r.vpartition).collect();
        let vps: Vec<i16> = touched.into_iter().collect();
        let eps: Vec<i64> = vps.iter().map(|vp| epochs[vp]).collect();
        let held: BTreeSet<i16> = sql::lease_fence(tx, leases.relay_id(), &vps, &eps)
            .await?
            .into_iter()
            .collect();
        let lost = vps.len().saturating_sub(held.len());
        Ok((Fence::Held(held), lost))
    }

    /// Writes a batch's plan: the one place settling executes SQL. Returns
    /// the rows `outbox_schedule_retry` dead-lettered (retries exhausted).
    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        rows: &[Row],
        plan: &[Settlement],
        claim: Claim,
    ) -> Result<Vec<i64>, sqlx::Error> {
        let relay = &self.settings.relay;
        let settled = || rows.iter().zip(plan);
        if claim == Claim::Undone {
            let acked: Vec<i64> = settled()
                .filter(|(_, s)| **s == Settlement::Delete)
                .map(|(r, _)| r.id)
                .collect();
            sql::delete_published(tx, &acked).await?;
            // Rows refused by the prepare stage first, then those the broker
            // refused, each in claim order.
            let (mut ids, mut reasons, mut errors) = (Vec::new(), Vec::new(), Vec::new());
            for refused_early in [true, false] {
                for (row, s) in settled() {
                    if let Settlement::DeadLetter { reason, error } = s {
                        if matches!(row.state, State::Rejected(_)) == refused_early {
                            ids.push(row.id);
                            reasons.push(reason.as_str());
                            errors.push(error.clone());
                        }
                    }
                }
            }
            sql::dead_letter(tx, &ids, &reasons, &errors).await?;
        }
        let (mut ids, mut errors, mut unknown) = (Vec::new(), Vec::new(), Vec::new());
        for (row, s) in settled() {
            if let Settlement::Retry { class, error } = s {
                ids.push(row.id);
                errors.push(error.clone());
                unknown.push(class.counts_toward_max_attempts());
            }
        }
        sql::schedule_retry(
            tx,
            &ids,
            &errors,
            &unknown,
            relay.max_attempts,
            relay.retry_base_ms,
            relay.retry_max_ms,
        )
        .await
    }

    /// Counts a committed batch: events published and dead-lettered, the
    /// progress the heartbeat reports.
    fn record(&self, rows: &[Row], plan: &[Settlement], exhausted: &[i64]) {
        let relay = &self.settings.relay;
        // A handful of (type, topic) pairs per batch: a linear scan beats
        // hashing.
        let mut published_by: Vec<((&str, &str), u64)> = Vec::new();
        let mut published = 0u64;
        for (row, s) in rows.iter().zip(plan) {
            match s {
                Settlement::Delete => {
                    let State::Answered { msg, .. } = &row.state else {
                        continue;
                    };
                    published += 1;
                    let pair = (msg.def.event_type.as_str(), msg.topic.as_str());
                    match published_by.iter_mut().find(|(p, _)| *p == pair) {
                        Some((_, n)) => *n += 1,
                        None => published_by.push((pair, 1)),
                    }
                }
                Settlement::DeadLetter { reason, .. } => {
                    metrics::dead_lettered(self.source(), row.metric_type(), reason.as_str());
                }
                _ => {}
            }
        }
        for ((event_type, topic), n) in published_by {
            metrics::published(self.source(), event_type, topic, n);
        }
        for id in exhausted {
            let row = rows
                .iter()
                .find(|r| r.id == *id)
                .expect("an exhausted row is a claimed row");
            tracing::error!(event_id = %row.event_id, event_type = %row.event_type,
                reason = DlqReason::RetriesExhausted.as_str(), max_attempts = relay.max_attempts,
                "event dead-lettered");
            metrics::dead_lettered(
                self.source(),
                &row.event_type,
                DlqReason::RetriesExhausted.as_str(),
            );
        }
        if published > 0 {
            let now_ms = Utc::now().timestamp_millis();
            self.progress
                .last_publish_ms
                .store(now_ms, Ordering::Relaxed);
            self.progress
                .published_total
                .fetch_add(published, Ordering::Relaxed);
            metrics::last_publish(self.source(), now_ms as f64 / 1e3);
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::RDKafkaErrorCode;

    use super::*;

    fn acked() -> Result<Ack, KafkaError> {
        Ok(Ack {
            partition: 0,
            offset: 7,
        })
    }

    fn failed(code: RDKafkaErrorCode) -> Result<Ack, KafkaError> {
        Err(KafkaError::MessageProduction(code))
    }

    fn kafka(vpartition: i16, answer: &Result<Ack, KafkaError>) -> Input<'_> {
        Input {
            vpartition,
            answer: Answer::Kafka(Some(answer)),
        }
    }

    fn unanswered(vpartition: i16) -> Input<'static> {
        Input {
            vpartition,
            answer: Answer::Kafka(None),
        }
    }

    fn held(vps: &[i16]) -> Fence {
        Fence::Held(vps.iter().copied().collect())
    }

    #[test]
    fn an_acknowledged_row_is_deleted() {
        let ok = acked();
        assert_eq!(
            plan(&[kafka(3, &ok)], &Fence::Unleased),
            vec![Settlement::Delete]
        );
        assert_eq!(
            plan(&[kafka(3, &ok)], &held(&[3])),
            vec![Settlement::Delete]
        );
    }

    #[test]
    fn a_transient_error_is_retried_without_using_up_max_attempts() {
        let down = failed(RDKafkaErrorCode::AllBrokersDown);
        let planned = plan(&[kafka(0, &down)], &Fence::Unleased);
        let [Settlement::Retry { class, error }] = planned.as_slice() else {
            panic!("expected a retry, got {planned:?}");
        };
        assert_eq!(*class, Class::Transient("broker_unavailable"));
        assert!(!class.counts_toward_max_attempts());
        assert_eq!(*error, down.unwrap_err().to_string());
    }

    #[test]
    fn a_permanent_error_is_dead_lettered_with_its_reason() {
        let too_large = failed(RDKafkaErrorCode::MessageSizeTooLarge);
        let planned = plan(&[kafka(0, &too_large)], &Fence::Unleased);
        assert_eq!(
            planned,
            vec![Settlement::DeadLetter {
                reason: DlqReason::MessageTooLarge,
                error: too_large.unwrap_err().to_string(),
            }]
        );
    }

    #[test]
    fn an_error_of_unknown_class_is_retried_against_max_attempts() {
        // outbox_schedule_retry dead-letters the row as retries_exhausted
        // when this failure uses up relay.max_attempts; see `tally` below.
        let odd = failed(RDKafkaErrorCode::InvalidRecord);
        let planned = plan(&[kafka(0, &odd)], &Fence::Unleased);
        let [Settlement::Retry { class, .. }] = planned.as_slice() else {
            panic!("expected a retry, got {planned:?}");
        };
        assert_eq!(*class, Class::Unknown);
        assert!(class.counts_toward_max_attempts());
    }

    #[test]
    fn exhausted_retries_are_reported_as_dead_lettered() {
        let odd = failed(RDKafkaErrorCode::InvalidRecord);
        let ok = acked();
        let planned = plan(
            &[kafka(0, &odd), kafka(0, &odd), kafka(0, &ok)],
            &Fence::Unleased,
        );
        assert_eq!(
            tally(&planned, 1),
            BatchReport {
                claimed: 3,
                published: 1,
                dead_lettered: 1,
                retried: 1,
            }
        );
    }

    #[test]
    fn a_row_rejected_at_prepare_is_dead_lettered() {
        let rejected = Rejected {
            reason: DlqReason::UnknownEventType,
            message: "no catalog entry for billing.Nope".into(),
        };
        let input = Input {
            vpartition: 1,
            answer: Answer::Rejected(&rejected),
        };
        assert_eq!(
            plan(&[input], &held(&[1])),
            vec![Settlement::DeadLetter {
                reason: DlqReason::UnknownEventType,
                error: "no catalog entry for billing.Nope".into(),
            }]
        );
    }

    #[test]
    fn an_unanswered_row_is_released() {
        assert_eq!(
            plan(&[unanswered(2)], &held(&[2])),
            vec![Settlement::Release]
        );
        // Also when the lease is gone: untouched either way.
        assert_eq!(
            plan(&[unanswered(2)], &held(&[])),
            vec![Settlement::Release]
        );
    }

    #[test]
    fn rows_of_a_lost_lease_are_left_to_the_new_owner() {
        let ok = acked();
        let too_large = failed(RDKafkaErrorCode::MessageSizeTooLarge);
        let down = failed(RDKafkaErrorCode::AllBrokersDown);
        let rejected = Rejected {
            reason: DlqReason::InvalidPayload,
            message: "not an object".into(),
        };
        let rows = [
            kafka(5, &ok),
            kafka(5, &too_large),
            kafka(5, &down),
            Input {
                vpartition: 5,
                answer: Answer::Rejected(&rejected),
            },
        ];
        let planned = plan(&rows, &held(&[4]));
        assert_eq!(planned, vec![Settlement::Fenced; 4]);
        let report = tally(&planned, 0);
        assert_eq!(
            report,
            BatchReport {
                claimed: 4,
                ..BatchReport::default()
            }
        );
    }

    #[test]
    fn a_mixed_batch_settles_row_by_row_in_claim_order() {
        let ok = acked();
        let too_large = failed(RDKafkaErrorCode::MessageSizeTooLarge);
        let leader = failed(RDKafkaErrorCode::NotLeaderForPartition);
        let rejected = Rejected {
            reason: DlqReason::MissingPartitionKey,
            message: "no key".into(),
        };
        let rows = [
            kafka(0, &ok),
            Input {
                vpartition: 0,
                answer: Answer::Rejected(&rejected),
            },
            kafka(1, &too_large),
            kafka(1, &leader),
            unanswered(1),
            kafka(2, &ok),
        ];
        let planned = plan(&rows, &held(&[0, 1]));
        assert_eq!(planned[0], Settlement::Delete);
        assert!(matches!(
            planned[1],
            Settlement::DeadLetter {
                reason: DlqReason::MissingPartitionKey,
                ..
            }
        ));
        assert!(matches!(
            planned[2],
            Settlement::DeadLetter {
                reason: DlqReason::MessageTooLarge,
                ..
            }
        ));
        assert!(matches!(
            planned[3],
            Settlement::Retry {
                class: Class::Transient("leader_change"),
                ..
            }
        ));
        assert_eq!(planned[4], Settlement::Release);
        // Partition 2's lease was lost: its acknowledged row is not deleted.
        assert_eq!(planned[5], Settlement::Fenced);
        assert_eq!(
            tally(&planned, 0),
            BatchReport {
                claimed: 6,
                published: 1,
                dead_lettered: 2,
                retried: 1,
            }
        );
    }

    #[test]
    fn judging_ignores_the_fence() {
        let ok = acked();
        assert_eq!(judge(&kafka(9, &ok).answer), Settlement::Delete);
        assert_eq!(judge(&unanswered(9).answer), Settlement::Release);
        assert!(held(&[1]).holds(1) && !held(&[1]).holds(2) && Fence::Unleased.holds(2));
    }
}
