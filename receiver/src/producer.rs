//! Persisting verified bodies to the events topic, and rejected ones to quarantine.
//!
//! [`EventProducer::persist`] takes a [`Verified`] body — only a successful signature check makes
//! one — and resolves only when the broker acknowledged the record with acks=all, or with the error
//! that must become a 503 — at the latest at the request's deadline. The circuit breaker turns a dead
//! broker into immediate 503s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use shared::clock::EpochMillis;
use shared::config::KafkaSettings;
use shared::envelope::Routing;
use shared::headers;
use shared::signature::{SignatureError, Verified};
use tracing::Instrument;

use crate::breaker::{Admit, Breaker};
use crate::metrics::Metrics;
use crate::rate::RateLimit;

/// Why a record was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("circuit open after repeated produce failures")]
    CircuitOpen,
    #[error("request deadline reached before kafka acknowledged the record on {topic}")]
    Deadline { topic: String },
    #[error("kafka did not acknowledge the record on {topic}: {source}")]
    Kafka { topic: String, source: KafkaError },
}

/// How long each request of the readiness check may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the readiness check found the events topic unable to take produces.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("metadata request failed: {0}")]
    Metadata(KafkaError),
    #[error("the events topic is unknown to the broker or has no partitions")]
    NoPartitions,
    #[error("the broker reports the events topic as {0}")]
    Topic(RDKafkaErrorCode),
    #[error("the broker reports partition {partition} as {code}")]
    Partition {
        partition: i32,
        code: RDKafkaErrorCode,
    },
    #[error("partition {partition} has no leader")]
    NoLeader { partition: i32 },
    #[error("leader broker {broker} (partition {partition}) did not answer over its connection: {source}")]
    Leader {
        broker: i32,
        partition: i32,
        source: KafkaError,
    },
    #[error("the check was cancelled")]
    Cancelled,
}

/// Where a record landed.
#[derive(Debug, Clone, Copy)]
pub struct Acked {
    pub partition: i32,
    pub offset: i64,
}

/// The receiver's producer: events (awaited) and quarantine (fire-and-forget, rate-limited).
pub struct EventProducer {
    producer: FutureProducer,
    settings: KafkaSettings,
    breaker: Arc<Breaker>,
    quarantine_rate: RateLimit,
    metrics: Metrics,
}

fn add(h: OwnedHeaders, key: &str, value: Option<&str>) -> OwnedHeaders {
    match value {
        Some(v) => h.insert(Header {
            key,
            value: Some(v),
        }),
        None => h,
    }
}

impl EventProducer {
    /// Creates the producer. Connects lazily; readiness is checked by [`EventProducer::probe`].
    pub fn new(
        settings: &KafkaSettings,
        breaker: Arc<Breaker>,
        quarantine_per_sec: u32,
        metrics: Metrics,
    ) -> Result<Self, KafkaError> {
        let producer: FutureProducer = shared::kafka::producer_config(settings).create()?;
        Ok(Self {
            producer,
            settings: settings.clone(),
            breaker,
            quarantine_rate: RateLimit::per_second(quarantine_per_sec),
            metrics,
        })
    }

    /// Produces a poll request (reason `receiver_outage`) for `vehicle` to the poll-request topic
    /// and waits for the acknowledgement.
    pub async fn request_poll(&self, vehicle: &str) -> Result<(), String> {
        let id = shared::ids::VehicleId::parse(vehicle).map_err(|e| format!("vehicle id: {e}"))?;
        let req = shared::poll_request::PollRequest::new(
            &id,
            None,
            shared::poll_request::PollReason::ReceiverOutage,
        );
        let value = req.to_json();
        let record = FutureRecord::<str, [u8]>::to(&self.settings.poll_topic)
            .key(vehicle)
            .payload(&value);
        self.producer
            .send(record, self.settings.delivery_timeout())
            .await
            .map(drop)
            .map_err(|(e, _)| format!("producing to {}: {e}", self.settings.poll_topic))
    }

    /// Whether the breaker is open.
    pub fn circuit_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// The breaker, for the background broker check.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Persists a verified body to the events topic and waits for the broker's acknowledgement,
    /// until `deadline` at the latest.
    pub async fn persist(
        &self,
        body: Verified,
        routing: &Routing,
        deadline: Instant,
    ) -> Result<Acked, PersistError> {
        let topic = self.settings.events_topic.as_str();
        // librdkafka's own message timeout can overrun (idempotent producers wait out in-flight
        // retries), so the answer is bounded here too, by whichever ends first: the delivery
        // timeout (plus a little) or the request's deadline. Past it Smartcar gets a 503 and
        // retries; if the record lands after all, eventId dedup absorbs the second copy.
        let own = Instant::now() + self.settings.delivery_timeout() + Duration::from_millis(250);
        let until = own.min(deadline);
        if until <= Instant::now() {
            return Err(PersistError::Deadline {
                topic: topic.to_string(),
            });
        }
        let admit = self.breaker.admit();
        self.metrics
            .circuit_open
            .set(i64::from(matches!(admit, Admit::No)));
        let probe = match admit {
            Admit::No => return Err(PersistError::CircuitOpen),
            Admit::Yes => None,
            Admit::Probe(guard) => Some(guard),
        };
        let span = tracing::info_span!(
            "send",
            otel.name = format!("send {topic}"),
            otel.kind = "producer",
            messaging.system = "kafka",
            messaging.operation.name = "send",
            messaging.operation.type = "send",
            messaging.destination.name = topic,
            messaging.kafka.message.key = routing.key().unwrap_or(""),
            messaging.destination.partition.id = tracing::field::Empty,
            messaging.kafka.offset = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let received_at = EpochMillis::now().as_i64().to_string();
        let token_index = body.token_index().to_string();
        let mut h = OwnedHeaders::new();
        h = add(h, headers::EVENT_ID, routing.event_id.as_deref());
        h = add(h, headers::EVENT_TYPE, routing.event_type.as_deref());
        h = add(h, headers::DELIVERY_ID, routing.delivery_id.as_deref());
        h = add(h, headers::RECEIVED_AT, Some(&received_at));
        h = add(h, headers::TOKEN_INDEX, Some(&token_index));
        for (k, v) in shared::telemetry::inject(&span) {
            h = h.insert(Header {
                key: &k,
                value: Some(&v),
            });
        }
        let payload = body.into_body();
        let mut record = FutureRecord::<str, [u8]>::to(topic)
            .payload(&payload)
            .headers(h);
        if let Some(key) = routing.key() {
            record = record.key(key);
        }
        let started = Instant::now();
        let send = self
            .producer
            .send(record, Timeout::After(self.settings.delivery_timeout()));
        let result = match tokio::time::timeout_at(until.into(), send)
            .instrument(span.clone())
            .await
        {
            Ok(Ok(delivery)) => Ok(delivery),
            Ok(Err((e, _))) => Err(Some(e)),
            Err(_) if until < own => Err(None),
            Err(_) => Err(Some(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut,
            ))),
        };
        self.metrics
            .produce_duration
            .observe(started.elapsed().as_secs_f64());
        // A broker that cannot acknowledge within the time left counts as failing either way.
        match probe {
            Some(guard) => guard.record(result.is_ok()),
            None => self.breaker.record(result.is_ok()),
        }
        self.metrics
            .circuit_open
            .set(i64::from(self.breaker.is_open()));
        match result {
            Ok(delivery) => {
                span.record(
                    "messaging.destination.partition.id",
                    delivery.partition.to_string(),
                );
                span.record("messaging.kafka.offset", delivery.offset);
                Ok(Acked {
                    partition: delivery.partition,
                    offset: delivery.offset,
                })
            }
            Err(Some(source)) => {
                // error.type: the librdkafka error code (e.g. MessageTimedOut), a bounded set.
                let kind = source
                    .rdkafka_error_code()
                    .map_or_else(|| "kafka".to_string(), |c| format!("{c:?}"));
                shared::telemetry::record_error(&span, &kind, &source.to_string());
                Err(PersistError::Kafka {
                    topic: topic.to_string(),
                    source,
                })
            }
            Err(None) => {
                shared::telemetry::record_error(
                    &span,
                    "deadline",
                    "no acknowledgement within the request deadline",
                );
                Err(PersistError::Deadline {
                    topic: topic.to_string(),
                })
            }
        }
    }

    /// Keeps the raw bytes of a rejected delivery on the short-retention quarantine topic, so an
    /// operator can diagnose "VERIFY passes, live events fail". Rate-limited and never awaited:
    /// quarantine must not slow down or fail the 401.
    pub fn quarantine(&self, body: &[u8], routing: &Routing, reason: &SignatureError) {
        if !self.quarantine_rate.try_take() {
            self.metrics
                .quarantined
                .get_or_create(&vec![("result", "rate_limited")])
                .inc();
            return;
        }
        tracing::debug!(
            event_id = routing.event_id.as_deref().unwrap_or(""),
            body = %String::from_utf8_lossy(body),
            "quarantined body"
        );
        let mut h = OwnedHeaders::new();
        h = add(h, headers::REJECT_REASON, Some(reason.reason()));
        h = add(h, headers::EVENT_ID, routing.event_id.as_deref());
        h = add(h, headers::DELIVERY_ID, routing.delivery_id.as_deref());
        h = add(
            h,
            headers::RECEIVED_AT,
            Some(&EpochMillis::now().as_i64().to_string()),
        );
        let record = FutureRecord::<str, [u8]>::to(&self.settings.quarantine_topic)
            .payload(body)
            .headers(h);
        let outcome = match self.producer.send_result(record) {
            Ok(_) => "queued",
            Err(_) => "dropped",
        };
        self.metrics
            .quarantined
            .get_or_create(&vec![("result", outcome)])
            .inc();
    }

    /// The readiness check: could a produce to the events topic be delivered now?
    ///
    /// A metadata answer alone does not say so. librdkafka sends a metadata request over any
    /// connection — right after a broker restart, over the bootstrap connection it opens at once for
    /// that request — while produces go over the connection to each partition's leader, which first
    /// waits out librdkafka's reconnect backoff. Readiness that trusted metadata said 200 while every
    /// produce still failed with its delivery timeout. So, after the metadata, the check asks each
    /// leader for the watermarks of one of its partitions: that ListOffsets request travels over the
    /// leader's own connection, and it is answered only once produces could be.
    pub async fn probe(self: &Arc<Self>) -> Result<(), NotReady> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || me.probe_blocking())
            .await
            .unwrap_or(Err(NotReady::Cancelled))
    }

    fn probe_blocking(&self) -> Result<(), NotReady> {
        let topic = &self.settings.events_topic;
        let client = self.producer.client();
        let md = client
            .fetch_metadata(Some(topic), PROBE_TIMEOUT)
            .map_err(NotReady::Metadata)?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or(NotReady::NoPartitions)?;
        if let Some(e) = t.error() {
            return Err(NotReady::Topic(RDKafkaErrorCode::from(e)));
        }
        if t.partitions().is_empty() {
            return Err(NotReady::NoPartitions);
        }
        // One partition per leader: each leader's connection is asked once.
        let mut leaders = std::collections::BTreeMap::new();
        for p in t.partitions() {
            if let Some(e) = p.error() {
                return Err(NotReady::Partition {
                    partition: p.id(),
                    code: RDKafkaErrorCode::from(e),
                });
            }
            if p.leader() < 0 {
                return Err(NotReady::NoLeader { partition: p.id() });
            }
            leaders.entry(p.leader()).or_insert(p.id());
        }
        for (broker, partition) in leaders {
            client
                .fetch_watermarks(topic, partition, PROBE_TIMEOUT)
                .map_err(|source| NotReady::Leader {
                    broker,
                    partition,
                    source,
                })?;
        }
        Ok(())
    }

    /// Waits for everything queued (quarantine included) to be delivered, up to `timeout`.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "producer flush incomplete at shutdown");
        }
    }
}
