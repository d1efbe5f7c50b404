//! Kafka client construction and topic provisioning, so both services configure librdkafka the same
//! way (and the way `KAFKA-CQL-NOTES.md` says: idempotence, murmur2 partitioning, lz4, bounded timeouts).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::KafkaSettings;

/// A topic the project owns, with its retention.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub retention_ms: u64,
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("kafka admin client for {brokers}: {source}")]
    Client { brokers: String, source: KafkaError },
    #[error("creating topic {topic}: {reason}")]
    Create { topic: String, reason: String },
}

/// Base settings every client shares.
pub fn base_config(s: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.brokers)
        .set("client.id", "carhook")
        .set("socket.keepalive.enable", "true")
        .set("log_level", "4");
    c
}

/// The producer the receiver uses: idempotent (acks=all), lz4, small linger, delivery timeout inside
/// Smartcar's 15 s budget, Java-compatible key partitioning.
pub fn producer_config(s: &KafkaSettings) -> ClientConfig {
    let mut c = base_config(s);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", s.linger_ms.to_string())
        .set("message.timeout.ms", s.delivery_timeout_ms.to_string())
        .set(
            "request.timeout.ms",
            s.delivery_timeout_ms.min(5_000).to_string(),
        )
        .set("partitioner", "murmur2_random")
        .set("queue.buffering.max.messages", "100000")
        .set("queue.buffering.max.kbytes", "262144");
    c
}

/// The topics the project owns: events, dead letters, actions, quarantine.
pub fn owned_topics(s: &KafkaSettings) -> Vec<TopicSpec> {
    let hours = |h: u64| h * 3_600_000;
    vec![
        TopicSpec {
            name: s.events_topic.clone(),
            partitions: s.partitions,
            retention_ms: hours(s.events_retention_hours),
        },
        TopicSpec {
            name: s.dlq_topic.clone(),
            partitions: s.partitions,
            retention_ms: hours(s.dlq_retention_hours),
        },
        TopicSpec {
            name: s.actions_topic.clone(),
            partitions: s.partitions,
            retention_ms: hours(s.events_retention_hours),
        },
        TopicSpec {
            name: s.quarantine_topic.clone(),
            partitions: 1,
            retention_ms: hours(s.quarantine_retention_hours),
        },
    ]
}

/// Creates the owned topics if missing. Idempotent: an existing topic is left as it is.
pub async fn ensure_topics(s: &KafkaSettings) -> Result<(), TopicError> {
    let admin: AdminClient<DefaultClientContext> =
        base_config(s)
            .create()
            .map_err(|source| TopicError::Client {
                brokers: s.brokers.clone(),
                source,
            })?;
    let specs = owned_topics(s);
    let retention: Vec<String> = specs.iter().map(|t| t.retention_ms.to_string()).collect();
    let min_isr = if s.replication_factor >= 3 { "2" } else { "1" };
    let new: Vec<NewTopic> = specs
        .iter()
        .zip(&retention)
        .map(|(t, r)| {
            NewTopic::new(
                &t.name,
                t.partitions,
                TopicReplication::Fixed(s.replication_factor),
            )
            .set("retention.ms", r)
            .set("min.insync.replicas", min_isr)
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new.iter(), &opts)
        .await
        .map_err(|source| TopicError::Client {
            brokers: s.brokers.clone(),
            source,
        })?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(TopicError::Create {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}
