//! A durable request to poll one vehicle through the REST API: the value of a record on
//! `kafka.poll_topic`, keyed by vehicle id so one vehicle's requests stay in order on one
//! partition. Whoever notices that webhook data may be lost (the receiver after an outage, the
//! processor after a dead letter or a RESOLVED error, the safety net, an operator) produces one;
//! `processor poll run` consumes them under its budgets.

use serde::{Deserialize, Serialize};

use crate::clock::EpochMillis;
use crate::ids::VehicleId;

/// Why a poll was requested (a bounded metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PollReason {
    /// The receiver answered 503 for this vehicle for longer than Smartcar retries.
    ReceiverOutage,
    /// The processor dead-lettered an unusable event of this vehicle.
    DeadLetter,
    /// A vehicle error was RESOLVED: one refresh.
    ErrorResolved,
    /// A configured signal is older than its maximum age on an active vehicle.
    SafetyNet,
    /// `processor poll now`.
    Operator,
    /// `processor poll resync --since`.
    Resync,
}

impl PollReason {
    /// Every reason, for metrics exported at 0 from start-up.
    pub const ALL: [PollReason; 6] = [
        Self::ReceiverOutage,
        Self::DeadLetter,
        Self::ErrorResolved,
        Self::SafetyNet,
        Self::Operator,
        Self::Resync,
    ];

    /// The label (`receiver_outage`, `dead_letter`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReceiverOutage => "receiver_outage",
            Self::DeadLetter => "dead_letter",
            Self::ErrorResolved => "error_resolved",
            Self::SafetyNet => "safety_net",
            Self::Operator => "operator",
            Self::Resync => "resync",
        }
    }
}

/// The record value on the poll-request topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PollRequest {
    pub vehicle_id: String,
    /// The `sc-user-id` when the requester knows it; else the poller reads it from the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    pub reason: PollReason,
    /// Epoch milliseconds.
    pub requested_at: i64,
}

/// Why a poll-request record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PollRequestError {
    #[error("poll request is not the JSON {{vehicleId, userId?, reason, requestedAt}}: {0}")]
    Json(#[from] serde_json::Error),
    #[error("poll request field `vehicleId` is invalid: {0}")]
    Vehicle(#[from] crate::ids::IdError),
}

impl PollRequest {
    /// A request made now.
    pub fn new(vehicle: &VehicleId, user_id: Option<String>, reason: PollReason) -> Self {
        Self {
            vehicle_id: vehicle.to_string(),
            user_id,
            reason,
            requested_at: EpochMillis::now().as_i64(),
        }
    }

    /// The record value.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a record value; the vehicle id is checked like any other.
    pub fn parse(bytes: &[u8]) -> Result<(Self, VehicleId), PollRequestError> {
        let r: Self = serde_json::from_slice(bytes)?;
        let v = VehicleId::parse(r.vehicle_id.clone())?;
        Ok((r, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_bad_fields() {
        let v = VehicleId::parse("car-1").unwrap_or_else(|e| panic!("{e}"));
        let r = PollRequest::new(&v, Some("u-1".into()), PollReason::ReceiverOutage);
        let json = String::from_utf8(r.to_json()).unwrap_or_default();
        assert!(json.contains(r#""reason":"receiver_outage""#), "{json}");
        let (back, vehicle) = PollRequest::parse(json.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((back, vehicle), (r, v));
        let no_user = br#"{"vehicleId":"car-2","reason":"resync","requestedAt":1}"#;
        assert!(PollRequest::parse(no_user).is_ok_and(|(r, _)| r.user_id.is_none()));
        let bad = PollRequest::parse(br#"{"vehicleId":"","reason":"resync","requestedAt":1}"#);
        assert!(bad.is_err_and(|e| e.to_string().contains("vehicleId")));
        let unknown = PollRequest::parse(br#"{"vehicleId":"c","reason":"whim","requestedAt":1}"#);
        assert!(unknown.is_err());
    }
}
