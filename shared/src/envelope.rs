//! The receiver's cheap look at a body: just enough to key and label the Kafka record.
//!
//! A validly signed body is persisted whatever it contains, so nothing here can fail the request:
//! fields of the wrong type are simply absent, and a body that is not JSON yields an empty
//! [`Routing`]. Large arrays (`data.signals`) are skipped without being materialised.

use serde::de::{Deserializer, IgnoredAny};
use serde::Deserialize;

/// A string field that tolerates any JSON type: non-strings become `None`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Lenient(Option<String>);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Any {
            S(String),
            Other(IgnoredAny),
        }
        Ok(Lenient(match Any::deserialize(d)? {
            Any::S(s) => Some(s),
            Any::Other(_) => None,
        }))
    }
}

fn lenient_obj<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OrAny<T> {
        T(T),
        Other(IgnoredAny),
    }
    Ok(match OrAny::<T>::deserialize(d)? {
        OrAny::T(t) => t,
        OrAny::Other(_) => T::default(),
    })
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawVehicle {
    id: Lenient,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawData {
    #[serde(deserialize_with = "lenient_obj")]
    vehicle: RawVehicle,
    challenge: Lenient,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawMeta {
    delivery_id: Lenient,
}

#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawEnvelope {
    event_id: Lenient,
    event_type: Lenient,
    event_name: Lenient,
    vehicle_id: Lenient,
    #[serde(deserialize_with = "lenient_obj")]
    data: RawData,
    #[serde(deserialize_with = "lenient_obj")]
    payload: RawData,
    #[serde(deserialize_with = "lenient_obj")]
    meta: RawMeta,
}

/// What the receiver needs from a body: ids and type for headers and logs, the record key,
/// and the challenge of a VERIFY.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Routing {
    /// `eventId`, if present and a string.
    pub event_id: Option<String>,
    /// `eventType`, or legacy `eventName` upper-cased.
    pub event_type: Option<String>,
    /// `vehicleId`, else `data.vehicle.id`.
    pub vehicle_id: Option<String>,
    /// `meta.deliveryId`.
    pub delivery_id: Option<String>,
    /// The VERIFY challenge (`data.challenge`, legacy `payload.challenge`).
    pub challenge: Option<String>,
    /// Whether the body parsed as a JSON object at all.
    pub is_json_object: bool,
}

impl Routing {
    /// Reads routing fields from any bytes. Never fails.
    pub fn sniff(body: &[u8]) -> Self {
        // serde would also read a struct from a JSON array; only objects are envelopes.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Self::default();
        }
        let Ok(raw) = serde_json::from_slice::<RawEnvelope>(body) else {
            return Self::default();
        };
        let non_empty = |l: Lenient| l.0.filter(|s| !s.is_empty());
        let event_type = non_empty(raw.event_type)
            .or_else(|| non_empty(raw.event_name).map(|n| n.to_ascii_uppercase()));
        Self {
            event_id: non_empty(raw.event_id),
            event_type,
            vehicle_id: non_empty(raw.vehicle_id).or_else(|| non_empty(raw.data.vehicle.id)),
            delivery_id: non_empty(raw.meta.delivery_id),
            challenge: non_empty(raw.data.challenge).or_else(|| non_empty(raw.payload.challenge)),
            is_json_object: true,
        }
    }

    /// Whether this is a VERIFY handshake (current or legacy form).
    pub fn is_verify(&self) -> bool {
        self.event_type.as_deref() == Some("VERIFY")
    }

    /// The Kafka record key: vehicle id, else event id, else none (the partitioner then spreads it).
    pub fn key(&self) -> Option<&str> {
        self.vehicle_id.as_deref().or(self.event_id.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_prefers_vehicle_then_data_vehicle_then_event() {
        let a = Routing::sniff(br#"{"eventId":"e","vehicleId":"v","data":{"vehicle":{"id":"w"}}}"#);
        assert_eq!(a.key(), Some("v"));
        let b = Routing::sniff(br#"{"eventId":"e","data":{"vehicle":{"id":"w"}}}"#);
        assert_eq!(b.key(), Some("w"));
        let c = Routing::sniff(br#"{"eventId":"e","data":[1,2]}"#);
        assert_eq!(c.key(), Some("e"));
    }

    #[test]
    fn wrong_types_and_garbage_never_fail() {
        let r =
            Routing::sniff(br#"{"eventId":5,"eventType":null,"meta":"x","data":{"vehicle":7}}"#);
        assert_eq!(
            r,
            Routing {
                is_json_object: true,
                ..Routing::default()
            }
        );
        assert_eq!(Routing::sniff(b"\xff\xfe not json"), Routing::default());
        assert_eq!(Routing::sniff(b"[1,2,3]"), Routing::default());
    }

    #[test]
    fn verify_current_and_legacy() {
        let v4 =
            Routing::sniff(br#"{"eventId":"e","eventType":"VERIFY","data":{"challenge":"abc"}}"#);
        assert!(v4.is_verify());
        assert_eq!(v4.challenge.as_deref(), Some("abc"));
        let v2 = Routing::sniff(
            br#"{"version":"2.0","eventName":"verify","payload":{"challenge":"xyz"}}"#,
        );
        assert!(v2.is_verify());
        assert_eq!(v2.challenge.as_deref(), Some("xyz"));
    }
}
