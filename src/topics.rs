//! Topic provisioning: `outbox-relay topics ensure`.
//!
//! Creates the catalog's missing topics with the configured partitions and
//! replication and the catalog's retention (7 days by default, 30 for
//! `platform.audit.events`). Existing topics are compared; drift is reported
//! and changed only when asked (`--apply`).
//!
//! Replication defaults to what the cluster can carry: `min(3, brokers)`
//! replicas and, with 3 or more, `min.insync.replicas = 2`, so that a write
//! acknowledged with `acks=all` is on at least two brokers. A topic left with
//! one replica, or with `min.insync.replicas = 1` on a multi-broker cluster,
//! is warned about in the log and in the report.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigResource, ConfigSource, NewPartitions, NewTopic,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;

use crate::catalog::Catalog;
use crate::config::{Settings, TopicSettings};
use crate::publish::client_config;

pub const DAY_MS: i64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum TopicAction {
    Created,
    UpToDate,
    /// Differences found; `applied` says whether they were changed.
    Drift {
        changes: Vec<String>,
        applied: bool,
    },
}

/// One catalog topic after `ensure`: its partition count, replication and
/// retention as they now are on the cluster, and what was done.
#[derive(Debug, Clone, Serialize)]
pub struct TopicReport {
    pub topic: String,
    pub partitions: i32,
    pub retention_ms: i64,
    /// Replicas of the topic's least replicated partition.
    pub replication_factor: i32,
    /// The topic's effective `min.insync.replicas` (its own or the broker's).
    pub min_insync_replicas: Option<i32>,
    #[serde(flatten)]
    pub action: TopicAction,
    /// Durability warnings (also logged at WARN).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Replication of the catalog's new topics, decided from the settings and
/// the number of brokers in the cluster's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicationPlan {
    pub replication_factor: i32,
    /// `min.insync.replicas` to set on new topics; `None` leaves the
    /// broker's default.
    pub min_insync_replicas: Option<i32>,
}

/// The replication of new topics: `topics.replication_factor`, or unset
/// `min(3, brokers)`; `topics.min_insync_replicas`, or unset 2 when there
/// are 3 or more replicas (a write acknowledged with `acks=all` is then on
/// two brokers, and one broker may be down without refusing writes).
///
/// The broker count is of the brokers the metadata lists, which are the live
/// ones: a cluster with a broker down at this moment gets fewer replicas on
/// its *new* topics. Set `topics.replication_factor` where that matters.
pub fn replication_plan(
    topics: &TopicSettings,
    brokers: usize,
) -> Result<ReplicationPlan, TopicsError> {
    if brokers == 0 {
        return Err(TopicsError::Config {
            key: "kafka.brokers",
            message: "the cluster's metadata lists no brokers".into(),
        });
    }
    let replication_factor = topics
        .replication_factor
        .unwrap_or_else(|| brokers.min(3) as i32);
    let min_insync_replicas = min_insync_for(topics, replication_factor);
    if let Some(min_isr) = min_insync_replicas {
        if min_isr > replication_factor {
            return Err(TopicsError::Config {
                key: "topics.min_insync_replicas",
                message: format!(
                    "{min_isr} is more than the {replication_factor} replica(s) of new topics \
                     (topics.replication_factor unset: min(3, {brokers} broker(s))); \
                     no write with acks=all could succeed"
                ),
            });
        }
    }
    Ok(ReplicationPlan {
        replication_factor,
        min_insync_replicas,
    })
}

/// The `min.insync.replicas` a topic with `replicas` replicas should have:
/// the setting, or unset 2 from 3 replicas up (`None`: the broker default).
pub fn min_insync_for(topics: &TopicSettings, replicas: i32) -> Option<i32> {
    topics.min_insync_replicas.or((replicas >= 3).then_some(2))
}

/// What is unsafe about a topic with `replicas` replicas and an effective
/// `min.insync.replicas` of `min_isr` on a cluster of `brokers`.
pub fn durability_warnings(replicas: i32, min_isr: Option<i32>, brokers: usize) -> Vec<String> {
    let mut warnings = Vec::new();
    if replicas <= 1 {
        warnings.push(format!(
            "1 replica: losing that broker's disk loses acknowledged events; \
             fine for one-broker development only ({brokers} broker(s) in the cluster; \
             topics.replication_factor sets it)"
        ));
    } else if brokers > 1 && min_isr.unwrap_or(1) <= 1 {
        warnings.push(format!(
            "min.insync.replicas 1 on a {brokers}-broker cluster: acks=all is satisfied by \
             the leader alone once its followers fall behind, and that leader's loss loses \
             acknowledged events (topics.min_insync_replicas sets it)"
        ));
    }
    warnings
}

#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    #[error("kafka admin: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {topic}: {message}")]
    Topic { topic: String, message: String },
    #[error("configuration key `{key}`: {message}")]
    Config { key: &'static str, message: String },
}

fn topic_error(topic: &str, message: impl Into<String>) -> TopicsError {
    TopicsError::Topic {
        topic: topic.to_string(),
        message: message.into(),
    }
}

pub fn admin_client(settings: &Settings) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    client_config(&settings.kafka).create()
}

fn admin_options() -> AdminOptions {
    AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))
}

/// Desired (partitions, retention.ms) for every catalog topic, by full name.
pub fn desired(settings: &Settings, catalog: &Catalog) -> BTreeMap<String, (i32, i64)> {
    catalog
        .topics
        .keys()
        .map(|t| {
            let days = catalog.retention_days(t, settings.topics.default_retention_days);
            (
                settings.topic_name(t),
                (settings.topics.partitions, days as i64 * DAY_MS),
            )
        })
        .collect()
}

/// A topic as the cluster's metadata shows it.
#[derive(Debug, Clone, Copy)]
struct Existing {
    partitions: i32,
    /// Replicas of its least replicated partition.
    replicas: i32,
}

/// The brokers in the cluster's metadata, and the topics that exist.
struct ClusterView {
    brokers: Vec<i32>,
    topics: BTreeMap<String, Existing>,
}

async fn cluster_view(
    admin: &AdminClient<DefaultClientContext>,
) -> Result<ClusterView, KafkaError> {
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))?;
    Ok(ClusterView {
        brokers: metadata.brokers().iter().map(|b| b.id()).collect(),
        topics: metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| {
                let existing = Existing {
                    partitions: t.partitions().len() as i32,
                    replicas: t
                        .partitions()
                        .iter()
                        .map(|p| p.replicas().len() as i32)
                        .min()
                        .unwrap_or(0),
                };
                (t.name().to_string(), existing)
            })
            .collect(),
    })
}

/// The broker's default `min.insync.replicas` (what a topic without its own
/// gets). `None` if the broker does not say.
async fn broker_min_insync(
    admin: &AdminClient<DefaultClientContext>,
    broker: i32,
) -> Result<Option<i32>, KafkaError> {
    let results = admin
        .describe_configs([&ResourceSpecifier::Broker(broker)], &admin_options())
        .await?;
    Ok(results
        .into_iter()
        .next()
        .and_then(|r| r.ok())
        .and_then(|r| min_insync_of(&r)))
}

/// The configuration of each named topic, in one request.
async fn describe(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[&str],
) -> Result<BTreeMap<String, ConfigResource>, TopicsError> {
    if topics.is_empty() {
        return Ok(BTreeMap::new());
    }
    let specifiers: Vec<ResourceSpecifier> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let results = admin
        .describe_configs(specifiers.iter(), &admin_options())
        .await?;
    let mut out = BTreeMap::new();
    for (topic, result) in topics.iter().zip(results) {
        let resource = result
            .map_err(|code| topic_error(topic, format!("describing configs failed: {code}")))?;
        out.insert(topic.to_string(), resource);
    }
    Ok(out)
}

fn retention_of(resource: &ConfigResource) -> Option<i64> {
    resource
        .get("retention.ms")
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.parse().ok())
}

fn min_insync_of(resource: &ConfigResource) -> Option<i32> {
    resource
        .get("min.insync.replicas")
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.parse().ok())
}

/// Sets `changes` (name, value), keeping every other topic-level override.
/// The admin API librdkafka offers here (AlterConfigs) replaces a topic's
/// whole configuration: an override left out of the request is reset to the
/// broker default, so each one is sent back as it is.
async fn set_configs(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    current: &ConfigResource,
    changes: &[(&str, String)],
) -> Result<(), TopicsError> {
    let what = changes
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(", ");
    let mut entries: BTreeMap<&str, String> = BTreeMap::new();
    for e in &current.entries {
        if e.source != ConfigSource::DynamicTopic || changes.iter().any(|(k, _)| *k == e.name) {
            continue;
        }
        match &e.value {
            Some(v) => {
                entries.insert(e.name.as_str(), v.clone());
            }
            // A sensitive override is not readable, so it could not be sent
            // back: changing the others would silently drop it.
            None => {
                return Err(topic_error(
                    topic,
                    format!(
                        "override `{}` is not readable (sensitive); change {what} by hand",
                        e.name
                    ),
                ))
            }
        }
    }
    let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
    for (k, v) in changes {
        alter = alter.set(k, v);
    }
    for (k, v) in &entries {
        alter = alter.set(k, v);
    }
    for r in admin.alter_configs([&alter], &admin_options()).await? {
        if let Err((_, code)) = r {
            return Err(topic_error(
                topic,
                format!("changing {what} failed: {code}"),
            ));
        }
    }
    Ok(())
}

pub async fn ensure(
    settings: &Settings,
    catalog: &Catalog,
    apply: bool,
) -> Result<Vec<TopicReport>, TopicsError> {
    let admin = admin_client(settings)?;
    let wanted = desired(settings, catalog);
    let mut view = cluster_view(&admin).await?;
    let brokers = view.brokers.len();
    let plan = replication_plan(&settings.topics, brokers)?;
    tracing::info!(
        brokers,
        replication_factor = plan.replication_factor,
        min_insync_replicas = plan.min_insync_replicas,
        "replication of new topics"
    );
    let mut reports = Vec::new();

    let missing: Vec<(&String, &(i32, i64))> = wanted
        .iter()
        .filter(|(t, _)| !view.topics.contains_key(*t))
        .collect();
    if !missing.is_empty() {
        let retention: Vec<String> = missing.iter().map(|(_, (_, r))| r.to_string()).collect();
        let min_isr = plan.min_insync_replicas.map(|n| n.to_string());
        let new_topics: Vec<NewTopic> = missing
            .iter()
            .zip(&retention)
            .map(|((name, (partitions, _)), retention)| {
                let topic = NewTopic::new(
                    name,
                    *partitions,
                    TopicReplication::Fixed(plan.replication_factor),
                )
                .set("retention.ms", retention);
                match &min_isr {
                    Some(n) => topic.set("min.insync.replicas", n),
                    None => topic,
                }
            })
            .collect();
        // What a new topic without its own min.insync.replicas gets.
        let effective_min_isr = match plan.min_insync_replicas {
            Some(n) => Some(n),
            None => broker_min_insync(&admin, view.brokers[0]).await?,
        };
        let mut raced = false;
        for result in admin.create_topics(&new_topics, &admin_options()).await? {
            match result {
                Ok(topic) => {
                    let (partitions, retention_ms) = wanted[&topic];
                    reports.push(TopicReport {
                        topic,
                        partitions,
                        retention_ms,
                        replication_factor: plan.replication_factor,
                        min_insync_replicas: effective_min_isr,
                        action: TopicAction::Created,
                        warnings: durability_warnings(
                            plan.replication_factor,
                            effective_min_isr,
                            brokers,
                        ),
                    });
                }
                // Created meanwhile (another `ensure`, a deploy job): it is
                // compared below like any existing topic.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => raced = true,
                Err((topic, RDKafkaErrorCode::InvalidReplicationFactor)) => {
                    return Err(topic_error(
                        &topic,
                        format!(
                            "create failed: {} replicas asked for, {brokers} broker(s) live; \
                             check topics.replication_factor",
                            plan.replication_factor
                        ),
                    ))
                }
                Err((topic, code)) => {
                    return Err(topic_error(&topic, format!("create failed: {code}")))
                }
            }
        }
        if raced {
            view = cluster_view(&admin).await?;
        }
    }

    let created: Vec<String> = reports.iter().map(|r| r.topic.clone()).collect();
    let to_check: Vec<&str> = wanted
        .keys()
        .filter(|t| view.topics.contains_key(*t) && !created.contains(t))
        .map(String::as_str)
        .collect();
    let configs = describe(&admin, &to_check).await?;
    for topic in to_check {
        let (partitions, retention_ms) = wanted[topic];
        let Existing {
            partitions: actual_partitions,
            replicas,
        } = view.topics[topic];
        let config = &configs[topic];
        let actual_retention = retention_of(config);
        let retention_drift = actual_retention != Some(retention_ms);
        let actual_min_isr = min_insync_of(config);
        // Follows the topic's own replicas, not the plan's: an existing
        // three-replica topic wants 2 even while a broker is down.
        let wanted_min_isr = min_insync_for(&settings.topics, replicas);
        let mut set_min_isr = None;
        let mut changes = Vec::new();
        if retention_drift {
            changes.push(format!(
                "retention.ms {} -> {retention_ms}",
                actual_retention.map_or("unset".into(), |v| v.to_string())
            ));
        }
        if actual_partitions < partitions {
            changes.push(format!("partitions {actual_partitions} -> {partitions}"));
        } else if actual_partitions > partitions {
            changes.push(format!(
                "partitions {actual_partitions} > configured {partitions} (Kafka cannot shrink a topic; left as is)"
            ));
        }
        if replicas < plan.replication_factor {
            changes.push(format!(
                "replication factor {replicas} -> {} (never changed by ensure: adding replicas \
                 is a partition reassignment, kafka-reassign-partitions.sh)",
                plan.replication_factor
            ));
        } else if replicas > plan.replication_factor && settings.topics.replication_factor.is_some()
        {
            changes.push(format!(
                "replication factor {replicas} > configured {} (left as is)",
                plan.replication_factor
            ));
        }
        if let Some(n) = wanted_min_isr.filter(|n| Some(*n) != actual_min_isr) {
            let from = actual_min_isr.map_or("unset".into(), |v| v.to_string());
            if n > replicas {
                changes.push(format!(
                    "min.insync.replicas {from} -> {n} (not applied: more than the topic's \
                     {replicas} replica(s) would refuse every write)"
                ));
            } else {
                changes.push(format!("min.insync.replicas {from} -> {n}"));
                set_min_isr = Some(n);
            }
        }
        let mut now_min_isr = actual_min_isr;
        if changes.is_empty() {
            reports.push(TopicReport {
                topic: topic.to_string(),
                partitions: actual_partitions,
                retention_ms,
                replication_factor: replicas,
                min_insync_replicas: now_min_isr,
                action: TopicAction::UpToDate,
                warnings: durability_warnings(replicas, now_min_isr, brokers),
            });
            continue;
        }
        let mut now_partitions = actual_partitions;
        let mut now_retention = actual_retention.unwrap_or(-1);
        if apply {
            let mut alter: Vec<(&str, String)> = Vec::new();
            if retention_drift {
                alter.push(("retention.ms", retention_ms.to_string()));
            }
            if let Some(n) = set_min_isr {
                alter.push(("min.insync.replicas", n.to_string()));
            }
            if !alter.is_empty() {
                set_configs(&admin, topic, config, &alter).await?;
                now_retention = retention_ms;
                now_min_isr = set_min_isr.or(now_min_isr);
            }
            if actual_partitions < partitions {
                let more = NewPartitions::new(topic, partitions as usize);
                for r in admin.create_partitions([&more], &admin_options()).await? {
                    if let Err((_, code)) = r {
                        return Err(topic_error(
                            topic,
                            format!("adding partitions failed: {code}"),
                        ));
                    }
                }
                now_partitions = partitions;
            }
        } else {
            tracing::warn!(topic, changes = %changes.join("; "), "topic drift (not changed without --apply)");
        }
        reports.push(TopicReport {
            topic: topic.to_string(),
            partitions: now_partitions,
            retention_ms: now_retention,
            replication_factor: replicas,
            min_insync_replicas: now_min_isr,
            action: TopicAction::Drift {
                changes,
                applied: apply,
            },
            warnings: durability_warnings(replicas, now_min_isr, brokers),
        });
    }
    reports.sort_by(|a, b| a.topic.cmp(&b.topic));
    for r in &reports {
        for warning in &r.warnings {
            tracing::warn!(topic = %r.topic, "{warning}");
        }
    }
    Ok(reports)
}

/// Reads `retention.ms` of a topic back through the admin API.
pub async fn retention_ms(settings: &Settings, topic: &str) -> Result<Option<i64>, TopicsError> {
    let admin = admin_client(settings)?;
    let configs = describe(&admin, &[topic]).await?;
    Ok(configs.get(topic).and_then(retention_of))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(replication_factor: Option<i32>, min_insync_replicas: Option<i32>) -> TopicSettings {
        TopicSettings {
            partitions: 6,
            replication_factor,
            min_insync_replicas,
            default_retention_days: 7,
        }
    }

    fn plan(rf: i32, min_isr: Option<i32>) -> ReplicationPlan {
        ReplicationPlan {
            replication_factor: rf,
            min_insync_replicas: min_isr,
        }
    }

    #[test]
    fn unset_replication_follows_the_broker_count() {
        let unset = topics(None, None);
        assert_eq!(replication_plan(&unset, 1).unwrap(), plan(1, None));
        assert_eq!(replication_plan(&unset, 2).unwrap(), plan(2, None));
        assert_eq!(replication_plan(&unset, 3).unwrap(), plan(3, Some(2)));
        assert_eq!(replication_plan(&unset, 7).unwrap(), plan(3, Some(2)));
    }

    #[test]
    fn explicit_settings_win() {
        assert_eq!(
            replication_plan(&topics(Some(1), None), 3).unwrap(),
            plan(1, None)
        );
        assert_eq!(
            replication_plan(&topics(Some(5), None), 5).unwrap(),
            plan(5, Some(2))
        );
        assert_eq!(
            replication_plan(&topics(Some(5), Some(3)), 5).unwrap(),
            plan(5, Some(3))
        );
        assert_eq!(
            replication_plan(&topics(None, Some(1)), 3).unwrap(),
            plan(3, Some(1))
        );
        // More replicas than brokers is Kafka's to refuse at creation.
        assert_eq!(
            replication_plan(&topics(Some(3), None), 1).unwrap(),
            plan(3, Some(2))
        );
    }

    #[test]
    fn min_insync_above_the_resolved_replicas_names_the_setting() {
        let err = replication_plan(&topics(None, Some(2)), 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "configuration key `topics.min_insync_replicas`: 2 is more than the 1 replica(s)"
            ),
            "{err}"
        );
        let err = replication_plan(&topics(None, None), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no brokers"), "{err}");
    }

    #[test]
    fn one_replica_or_one_insync_replica_is_warned_about() {
        // One broker: one replica, one warning (the development setup).
        let w = durability_warnings(1, Some(1), 1);
        assert_eq!(w.len(), 1);
        assert!(w[0].starts_with("1 replica:"), "{w:?}");
        // One replica on a cluster that could carry three.
        assert!(durability_warnings(1, None, 3)[0].starts_with("1 replica:"));
        // Replicated, but acks=all may be satisfied by the leader alone.
        let w = durability_warnings(3, Some(1), 3);
        assert!(
            w[0].starts_with("min.insync.replicas 1 on a 3-broker"),
            "{w:?}"
        );
        assert!(durability_warnings(2, None, 2)[0].starts_with("min.insync.replicas 1"));
        // The defaults on three brokers: nothing to say.
        assert!(durability_warnings(3, Some(2), 3).is_empty());
        assert!(durability_warnings(2, Some(2), 2).is_empty());
    }

    #[test]
    fn an_existing_topic_wants_min_insync_by_its_own_replicas() {
        let unset = topics(None, None);
        assert_eq!(min_insync_for(&unset, 3), Some(2));
        assert_eq!(min_insync_for(&unset, 2), None);
        assert_eq!(min_insync_for(&unset, 1), None);
        assert_eq!(min_insync_for(&topics(None, Some(3)), 1), Some(3));
    }
}
