//! Topic provisioning: `outbox-relay topics ensure`.
//!
//! Creates the catalog's missing topics with the configured partitions and
//! replication and the catalog's retention (7 days by default, 30 for
//! `platform.audit.events`). Existing topics are compared; drift is reported
//! and changed only when asked (`--apply`).

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
use crate::config::Settings;
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

/// One catalog topic after `ensure`: its partition count and retention as
/// they now are on the cluster, and what was done.
#[derive(Debug, Clone, Serialize)]
pub struct TopicReport {
    pub topic: String,
    pub partitions: i32,
    pub retention_ms: i64,
    #[serde(flatten)]
    pub action: TopicAction,
}

#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    #[error("kafka admin: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {topic}: {message}")]
    Topic { topic: String, message: String },
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

/// Partition counts of the topics that exist, by name.
async fn existing_partitions(
    admin: &AdminClient<DefaultClientContext>,
) -> Result<BTreeMap<String, i32>, KafkaError> {
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
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

/// Sets `retention.ms`, keeping every other topic-level override. The admin
/// API librdkafka offers here (AlterConfigs) replaces a topic's whole
/// configuration: an override left out of the request is reset to the
/// broker default, so each one is sent back as it is.
async fn set_retention(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    current: &ConfigResource,
    retention_ms: i64,
) -> Result<(), TopicsError> {
    let mut entries: BTreeMap<&str, String> = BTreeMap::new();
    for e in &current.entries {
        if e.source != ConfigSource::DynamicTopic || e.name == "retention.ms" {
            continue;
        }
        match &e.value {
            Some(v) => {
                entries.insert(e.name.as_str(), v.clone());
            }
            // A sensitive override is not readable, so it could not be sent
            // back: changing retention would silently drop it.
            None => {
                return Err(topic_error(
                    topic,
                    format!(
                        "override `{}` is not readable (sensitive); change retention.ms by hand",
                        e.name
                    ),
                ))
            }
        }
    }
    let retention = retention_ms.to_string();
    let mut alter =
        AlterConfig::new(ResourceSpecifier::Topic(topic)).set("retention.ms", &retention);
    for (k, v) in &entries {
        alter = alter.set(k, v);
    }
    for r in admin.alter_configs([&alter], &admin_options()).await? {
        if let Err((_, code)) = r {
            return Err(topic_error(
                topic,
                format!("changing retention.ms failed: {code}"),
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
    let mut existing = existing_partitions(&admin).await?;
    let mut reports = Vec::new();

    let missing: Vec<(&String, &(i32, i64))> = wanted
        .iter()
        .filter(|(t, _)| !existing.contains_key(*t))
        .collect();
    if !missing.is_empty() {
        let retention: Vec<String> = missing.iter().map(|(_, (_, r))| r.to_string()).collect();
        let new_topics: Vec<NewTopic> = missing
            .iter()
            .zip(&retention)
            .map(|((name, (partitions, _)), retention)| {
                NewTopic::new(
                    name,
                    *partitions,
                    TopicReplication::Fixed(settings.topics.replication_factor),
                )
                .set("retention.ms", retention)
            })
            .collect();
        let mut raced = false;
        for result in admin.create_topics(&new_topics, &admin_options()).await? {
            match result {
                Ok(topic) => {
                    let (partitions, retention_ms) = wanted[&topic];
                    reports.push(TopicReport {
                        topic,
                        partitions,
                        retention_ms,
                        action: TopicAction::Created,
                    });
                }
                // Created meanwhile (another `ensure`, a deploy job): it is
                // compared below like any existing topic.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => raced = true,
                Err((topic, code)) => {
                    return Err(topic_error(&topic, format!("create failed: {code}")))
                }
            }
        }
        if raced {
            existing = existing_partitions(&admin).await?;
        }
    }

    let created: Vec<String> = reports.iter().map(|r| r.topic.clone()).collect();
    let to_check: Vec<&str> = wanted
        .keys()
        .filter(|t| existing.contains_key(*t) && !created.contains(t))
        .map(String::as_str)
        .collect();
    let configs = describe(&admin, &to_check).await?;
    for topic in to_check {
        let (partitions, retention_ms) = wanted[topic];
        let actual_partitions = existing[topic];
        let config = &configs[topic];
        let actual_retention = retention_of(config);
        let retention_drift = actual_retention != Some(retention_ms);
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
        if changes.is_empty() {
            reports.push(TopicReport {
                topic: topic.to_string(),
                partitions: actual_partitions,
                retention_ms,
                action: TopicAction::UpToDate,
            });
            continue;
        }
        let mut now_partitions = actual_partitions;
        let mut now_retention = actual_retention.unwrap_or(-1);
        if apply {
            if retention_drift {
                set_retention(&admin, topic, config, retention_ms).await?;
                now_retention = retention_ms;
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
            action: TopicAction::Drift {
                changes,
                applied: apply,
            },
        });
    }
    reports.sort_by(|a, b| a.topic.cmp(&b.topic));
    Ok(reports)
}

/// Reads `retention.ms` of a topic back through the admin API.
pub async fn retention_ms(settings: &Settings, topic: &str) -> Result<Option<i64>, TopicsError> {
    let admin = admin_client(settings)?;
    let configs = describe(&admin, &[topic]).await?;
    Ok(configs.get(topic).and_then(retention_of))
}
