//! Producing poll requests onto `kafka.poll_topic`, keyed by vehicle (operators' resync, the
//! safety net, the processor's triggers). Idempotent producer, acks=all: a request that was
//! acknowledged is durable.

use rdkafka::producer::{FutureProducer, FutureRecord};
use shared::config::KafkaSettings;
use shared::poll_request::PollRequest;

/// A producer of poll requests.
#[derive(Clone)]
pub struct RequestProducer {
    producer: FutureProducer,
    topic: String,
    timeout: std::time::Duration,
}

impl RequestProducer {
    /// A producer for `s.poll_topic`.
    pub fn new(s: &KafkaSettings) -> Result<Self, rdkafka::error::KafkaError> {
        Ok(Self {
            producer: shared::kafka::producer_config(s)
                .set("client.id", "carhook-poll-requests")
                .create()?,
            topic: s.poll_topic.clone(),
            timeout: s.delivery_timeout(),
        })
    }

    /// Produces one request and waits for the broker's acknowledgement.
    pub async fn request(&self, r: &PollRequest) -> Result<(), String> {
        let value = r.to_json();
        let record = FutureRecord::to(&self.topic)
            .key(r.vehicle_id.as_str())
            .payload(&value);
        self.producer
            .send(record, self.timeout)
            .await
            .map(|_| ())
            .map_err(|(e, _)| {
                format!(
                    "poll request for vehicle {} to {}: {e}",
                    r.vehicle_id, self.topic
                )
            })
    }
}
