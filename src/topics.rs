//! Topic provisioning: `outbox-relay topics ensure`.
//!
//! Creates the catalog's missing topics with the configured partitions and
//! replication and the catalog's retention (7 days by default, 30 for
//! `platform.audit.events`). Existing topics are compared; drift is reported
//! and changed only when asked (`--apply`).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
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

pub fn admin_client(settings: &Settings) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    client_config(&settings.kafka).create()
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

pub async fn ensure(
    settings: &Settings,
    catalog: &Catalog,
    apply: bool,
) -> Result<Vec<TopicReport>, TopicsError> {
    let admin = admin_client(settings)?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))?;
    let existing: BTreeMap<String, i32> = metadata
        .topics()
        .iter()
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect();
    let mut reports = Vec::new();
    let wanted = desired(settings, catalog);

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
        for result in admin.create_topics(&new_topics, &opts).await? {
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
                Err((topic, code)) => {
                    return Err(TopicsError::Topic {
                        topic,
                        message: format!("create failed: {code}"),
                    })
                }
            }
        }
    }

    for (topic, (partitions, retention_ms)) in &wanted {
        let Some(&actual_partitions) = existing.get(topic) else {
            continue;
        };
        let configs = admin
            .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
            .await?;
        let actual_retention = configs
            .into_iter()
            .next()
            .and_then(|r| r.ok())
            .and_then(|r| r.get("retention.ms").and_then(|e| e.value.clone()))
            .and_then(|v| v.parse::<i64>().ok());
        let mut changes = Vec::new();
        if actual_retention != Some(*retention_ms) {
            changes.push(format!(
                "retention.ms {} -> {retention_ms}",
                actual_retention.map_or("unset".into(), |v| v.to_string())
            ));
        }
        if actual_partitions < *partitions {
            changes.push(format!("partitions {actual_partitions} -> {partitions}"));
        } else if actual_partitions > *partitions {
            changes.push(format!(
                "partitions {actual_partitions} > configured {partitions} (Kafka cannot shrink a topic; left as is)"
            ));
        }
        if changes.is_empty() {
            reports.push(TopicReport {
                topic: topic.clone(),
                partitions: actual_partitions,
                retention_ms: *retention_ms,
                action: TopicAction::UpToDate,
            });
            continue;
        }
        if apply {
            if actual_retention != Some(*retention_ms) {
                let value = retention_ms.to_string();
                let alter =
                    AlterConfig::new(ResourceSpecifier::Topic(topic)).set("retention.ms", &value);
                for r in admin.alter_configs([&alter], &opts).await? {
                    if let Err((_, code)) = r {
                        return Err(TopicsError::Topic {
                            topic: topic.clone(),
                            message: format!("changing retention.ms failed: {code}"),
                        });
                    }
                }
            }
            if actual_partitions < *partitions {
                let more = NewPartitions::new(topic, *partitions as usize);
                for r in admin.create_partitions([&more], &opts).await? {
                    if let Err((_, code)) = r {
                        return Err(TopicsError::Topic {
                            topic: topic.clone(),
                            message: format!("adding partitions failed: {code}"),
                        });
                    }
                }
            }
        }
        reports.push(TopicReport {
            topic: topic.clone(),
            partitions: actual_partitions.max(if apply { *partitions } else { 0 }),
            retention_ms: if apply {
                *retention_ms
            } else {
                actual_retention.unwrap_or(-1)
            },
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
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let configs = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await?;
    Ok(configs
        .into_iter()
        .next()
        .and_then(|r| r.ok())
        .and_then(|r| r.get("retention.ms").and_then(|e| e.value.clone()))
        .and_then(|v| v.parse().ok()))
}
