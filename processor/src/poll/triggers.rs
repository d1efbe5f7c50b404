//! The processor's poll triggers: what an applied or dead-lettered record asks the poller to do.
//!
//! - An event dead-lettered because it is unusable (not JSON, missing fields, …) lost whatever it
//!   said: poll its vehicle (the record key, which the receiver sets to the vehicle id).
//! - A `RESOLVED` vehicle error means data may flow again: one refresh poll.
//!
//! The requests are produced in the same Kafka transaction as the batch's offsets, actions and
//! dead letters, so each is requested exactly once however often the batch is retried. Records
//! the poller itself produced never trigger a poll (a loop), and neither does replay (no live
//! effects).

use rdkafka::message::{Message, OwnedHeaders, OwnedMessage};
use shared::headers;
use shared::ids::VehicleId;
use shared::poll_request::{PollReason, PollRequest};

use crate::dead_letter::header_str;
use crate::pipeline::Disposition;

/// The poll requests a finished record asks for: (reason, request).
pub fn requests(msg: &OwnedMessage, disposition: &Disposition) -> Vec<PollRequest> {
    if header_str(msg, headers::SOURCE) == Some(shared::smartcar_api::POLL_SOURCE) {
        return Vec::new();
    }
    match disposition {
        Disposition::Poison(p) if p.class != "store_refused" => msg
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| VehicleId::parse(k).ok())
            .map(|v| PollRequest::new(&v, None, PollReason::DeadLetter))
            .into_iter()
            .collect(),
        // A state refresh (control record) is carhook's own, not an event: it asks for nothing.
        Disposition::Applied(a) if !a.refresh => a
            .emits
            .iter()
            .filter(|p| p.refresh_poll)
            .filter_map(|p| p.vehicle.as_ref())
            .map(|v| PollRequest::new(v, None, PollReason::ErrorResolved))
            .collect(),
        _ => Vec::new(),
    }
}

/// A record for the batch's transaction: (topic, key, value, headers), the consumer's shape.
pub type Record = (String, Option<Vec<u8>>, Vec<u8>, OwnedHeaders);

/// The records for the batch's transaction.
pub fn records(poll_topic: &str, msg: &OwnedMessage, disposition: &Disposition) -> Vec<Record> {
    requests(msg, disposition)
        .into_iter()
        .map(|r| {
            (
                poll_topic.to_string(),
                Some(r.vehicle_id.as_bytes().to_vec()),
                r.to_json(),
                OwnedHeaders::new(),
            )
        })
        .collect()
}
