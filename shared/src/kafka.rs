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
    /// `compact` for the state changelog (kept per key forever), else `delete`.
    pub compacted: bool,
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("kafka admin client for {brokers}: {source}")]
    Client { brokers: String, source: KafkaError },
    #[error("creating topic {topic}: {reason}")]
    Create { topic: String, reason: String },
    #[error("cannot reach the Kafka cluster at {brokers}: {reason}")]
    Unreachable { brokers: String, reason: String },
}

/// A client context that keeps the errors librdkafka reported (and logs them), so a failed call
/// can say why — a refused SASL login, a certificate that does not verify — instead of "timed
/// out". Errors arrive only while the client is polled.
#[derive(Default)]
pub struct Diagnosis {
    seen: std::sync::Mutex<Vec<(KafkaError, String)>>,
}

impl Diagnosis {
    /// The most telling error reported: the latest that is not the "all brokers are down" that
    /// follows every connection failure, else that one.
    pub fn cause(&self) -> Option<String> {
        let seen = self.seen.lock().ok()?;
        let down =
            |e: &KafkaError| e.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown);
        seen.iter()
            .rev()
            .find(|(e, _)| !down(e))
            .or_else(|| seen.last())
            .map(|(_, reason)| reason.clone())
    }
}

impl rdkafka::client::ClientContext for Diagnosis {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!(target: "librdkafka", error = %error, "{reason}");
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((error, reason.to_string()));
        }
    }
}

impl rdkafka::producer::ProducerContext for Diagnosis {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

/// A metadata request to the cluster with the configured security, before anything else: an
/// unreachable cluster, a refused login or an unknown CA is reported with librdkafka's reason.
/// (The admin client cannot do this itself: its error events are never served.)
pub async fn check_connection(s: &KafkaSettings) -> Result<(), TopicError> {
    use rdkafka::producer::{BaseProducer, Producer};
    let config = base_config(s);
    let brokers = s.brokers.clone();
    let unreachable = |reason: String| TopicError::Unreachable {
        brokers: brokers.clone(),
        reason,
    };
    let producer: BaseProducer<Diagnosis> = config
        .create_with_context(Diagnosis::default())
        .map_err(|source| TopicError::Client {
            brokers: s.brokers.clone(),
            source,
        })?;
    tokio::task::spawn_blocking(move || {
        match producer
            .client()
            .fetch_metadata(None, Duration::from_secs(10))
        {
            Ok(_) => Ok(()),
            Err(e) => {
                // Serve the error events queued meanwhile: they carry the cause.
                for _ in 0..10 {
                    producer.poll(Duration::from_millis(50));
                }
                Err(producer.context().cause().unwrap_or_else(|| e.to_string()))
            }
        }
    })
    .await
    .map_err(|e| unreachable(e.to_string()))?
    .map_err(unreachable)
}

/// Base settings every client shares: brokers, security (TLS, SASL) and the pass-through
/// properties. Every client the project builds starts from this, so one setting secures all.
pub fn base_config(s: &KafkaSettings) -> ClientConfig {
    use secrecy::ExposeSecret;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.brokers)
        .set("client.id", "carhook")
        .set("socket.keepalive.enable", "true")
        // librdkafka doubles the wait between reconnects to a broker up to this (default 10 s, and
        // up to 50 % more with jitter). After a broker restart the leader connection, which
        // produces and fetches need, stayed down that long after the broker was back: longer than
        // the receiver's delivery timeout. One second keeps recovery within about a second, and a
        // connection attempt per second to a dead broker costs it nothing.
        .set("reconnect.backoff.max.ms", "1000")
        .set("log_level", "4");
    for (k, v) in &s.properties {
        c.set(k, v);
    }
    c.set("security.protocol", s.security_protocol.as_str());
    if let Some(m) = s.sasl_mechanism {
        c.set("sasl.mechanism", m.as_str());
    }
    if let Some(u) = &s.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(p) = &s.sasl_password {
        c.set("sasl.password", p.expose_secret());
    }
    if s.security_protocol.uses_tls() {
        c.set(
            "ssl.endpoint.identification.algorithm",
            if s.ssl_endpoint_identification {
                "https"
            } else {
                "none"
            },
        );
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        if let Some(ca) = &s.ssl_ca_file {
            c.set("ssl.ca.location", path(ca));
        }
        if let Some(cert) = &s.ssl_certificate_file {
            c.set("ssl.certificate.location", path(cert));
        }
        if let Some(key) = &s.ssl_key_file {
            c.set("ssl.key.location", path(key));
        }
        if let Some(p) = &s.ssl_key_password {
            c.set("ssl.key.password", p.expose_secret());
        }
    }
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
            compacted: false,
        },
        TopicSpec {
            name: s.dlq_topic.clone(),
            partitions: s.partitions,
            retention_ms: hours(s.dlq_retention_hours),
            compacted: false,
        },
        TopicSpec {
            name: s.actions_topic.clone(),
            partitions: s.partitions,
            retention_ms: hours(s.events_retention_hours),
            compacted: false,
        },
        // Partitioned like the events topic and keyed by vehicle with the same partitioner, so a
        // vehicle's change records sit in the partition number of its events: the processor owning
        // events partition p restores its vehicles' views from changelog partition p.
        TopicSpec {
            name: s.state_topic.clone(),
            partitions: s.partitions,
            retention_ms: 0,
            compacted: true,
        },
        TopicSpec {
            name: s.poll_topic.clone(),
            partitions: s.partitions,
            retention_ms: hours(s.events_retention_hours),
            compacted: false,
        },
        TopicSpec {
            name: s.quarantine_topic.clone(),
            partitions: 1,
            retention_ms: hours(s.quarantine_retention_hours),
            compacted: false,
        },
    ]
}

/// Creates the owned topics if missing, after [`check_connection`] (so a refused login or CA is
/// named). Idempotent: an existing topic is left as it is.
pub async fn ensure_topics(s: &KafkaSettings) -> Result<(), TopicError> {
    check_connection(s).await?;
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
            let topic = NewTopic::new(
                &t.name,
                t.partitions,
                TopicReplication::Fixed(s.replication_factor),
            )
            .set("min.insync.replicas", min_isr);
            if t.compacted {
                // Small segments and an eager cleaner keep the uncompacted head short: it is what
                // a processor reads to restore its views after a rebalance.
                topic
                    .set("cleanup.policy", "compact")
                    .set("segment.ms", "3600000")
                    .set("min.cleanable.dirty.ratio", "0.1")
            } else {
                topic.set("retention.ms", r)
            }
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
