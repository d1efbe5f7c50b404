//! The receiver's cheap look at a body: just enough to key and label the Kafka record.
//!
//! A validly signed body is persisted whatever it contains, so nothing here can fail the request:
//! fields of the wrong type are simply absent, and a body that is not JSON yields an empty
//! [`Routing`]. Values are read by visitors straight from the parser, so large arrays
//! (`data.signals`, legacy `payload.vehicles[].data`) are skipped without being materialised;
//! `serde(untagged)` would buffer a whole subtree first, which is why it is not used here.

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Visitor methods that read every JSON scalar other than a string as `Default::default()`.
macro_rules! non_string_scalars_are_default {
    () => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
    };
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// A string field that tolerates any JSON type: non-strings become `None`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Lenient(Option<String>);

impl<'de> Deserialize<'de> for Lenient {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Lenient;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Lenient, E> {
                Ok(Lenient(Some(s.to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Lenient, A::Error> {
                skip_map(map).map(|()| Lenient(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Lenient, A::Error> {
                skip_seq(seq).map(|()| Lenient(None))
            }
            non_string_scalars_are_default!();
        }
        d.deserialize_any(V)
    }
}

/// Reads an object as `T`; any other JSON value is skipped and gives `T::default()`.
struct LenientObj<T>(PhantomData<T>);

impl<T> LenientObj<T> {
    fn new() -> Self {
        Self(PhantomData)
    }
}

impl<'de, T: Deserialize<'de> + Default> Visitor<'de> for LenientObj<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        skip_seq(seq).map(|()| T::default())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<T, E> {
        Ok(T::default())
    }
    non_string_scalars_are_default!();
}

impl<'de, T: Deserialize<'de> + Default> DeserializeSeed<'de> for LenientObj<T> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_any(self)
    }
}

fn lenient_obj<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    LenientObj::new().deserialize(d)
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
struct RawLegacyVehicle {
    vehicle_id: Lenient,
}

/// `vehicleId` of the first entry of legacy `payload.vehicles`; the other entries (and their
/// `data` arrays) are skipped unread.
#[derive(Default)]
struct FirstVehicleId(Lenient);

impl<'de> Deserialize<'de> for FirstVehicleId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FirstVehicleId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FirstVehicleId, A::Error> {
                let first = seq.next_element_seed(LenientObj::<RawLegacyVehicle>::new())?;
                skip_seq(seq)?;
                Ok(FirstVehicleId(first.unwrap_or_default().vehicle_id))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FirstVehicleId, A::Error> {
                skip_map(map).map(|()| FirstVehicleId::default())
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<FirstVehicleId, E> {
                Ok(FirstVehicleId::default())
            }
            non_string_scalars_are_default!();
        }
        d.deserialize_any(V)
    }
}

/// Legacy v2 `payload`: the VERIFY challenge, or an event's ids.
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct RawPayload {
    challenge: Lenient,
    event_id: Lenient,
    vehicle_id: Lenient,
    vehicles: FirstVehicleId,
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
    payload: RawPayload,
    #[serde(deserialize_with = "lenient_obj")]
    meta: RawMeta,
}

/// What the receiver needs from a body: ids and type for headers and logs, the record key,
/// and the challenge of a VERIFY.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Routing {
    /// `eventId`, else legacy `payload.eventId`, if present and a string. Legacy bodies without
    /// one get a derived id only in the processor's full parse ([`crate::event::Envelope`]).
    pub event_id: Option<String>,
    /// `eventType`, or legacy `eventName` upper-cased.
    pub event_type: Option<String>,
    /// `vehicleId`, else `data.vehicle.id`, else legacy `payload.vehicleId`, else legacy
    /// `payload.vehicles[0].vehicleId`.
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
        let payload = raw.payload;
        Self {
            event_id: non_empty(raw.event_id).or_else(|| non_empty(payload.event_id)),
            event_type,
            vehicle_id: non_empty(raw.vehicle_id)
                .or_else(|| non_empty(raw.data.vehicle.id))
                .or_else(|| non_empty(payload.vehicle_id))
                .or_else(|| non_empty(payload.vehicles.0)),
            delivery_id: non_empty(raw.meta.delivery_id),
            challenge: non_empty(raw.data.challenge).or_else(|| non_empty(payload.challenge)),
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
    fn legacy_key_is_payload_vehicle_then_first_listed_vehicle() {
        let event_based = Routing::sniff(
            br#"{"version":"2.0","webhookId":"wh-1","eventName":"eventBased","mode":"test","payload":{"eventId":"ev-1","vehicleId":"car-a","eventType":"CHARGING_COMPLETED","eventTime":"2023-01-02T03:04:05.000Z"}}"#,
        );
        assert_eq!(event_based.key(), Some("car-a"));
        assert_eq!(event_based.event_id.as_deref(), Some("ev-1"));
        assert_eq!(event_based.event_type.as_deref(), Some("EVENTBASED"));
        let scheduled = Routing::sniff(
            br#"{"version":"2.0","webhookId":"wh-1","eventName":"scheduled","mode":"live","payload":{"vehicles":[{"vehicleId":"car-a","requestId":"r1","data":[{"path":"/odometer","code":200,"body":{"distance":1234.5},"headers":{"sc-data-age":"2023-01-02T03:04:05.000Z","sc-unit-system":"metric"}},{"path":"/battery","code":409,"body":{"type":"VEHICLE_STATE","code":"ASLEEP","statusCode":409,"description":"The vehicle is asleep."}}]},{"vehicleId":"car-b","requestId":"r2","data":[]}]}}"#,
        );
        assert_eq!(scheduled.key(), Some("car-a"));
        assert_eq!(scheduled.vehicle_id.as_deref(), Some("car-a"));
        assert_eq!(scheduled.event_id, None);
        assert_eq!(scheduled.event_type.as_deref(), Some("SCHEDULED"));
    }

    #[test]
    fn legacy_vehicle_list_of_wrong_shape_never_fails() {
        for body in [
            &br#"{"eventName":"dynamic","payload":{"vehicles":[5,{"vehicleId":"b"}]}}"#[..],
            br#"{"eventName":"dynamic","payload":{"vehicles":[{"vehicleId":7}]}}"#,
            br#"{"eventName":"dynamic","payload":{"vehicles":[]}}"#,
            br#"{"eventName":"dynamic","payload":{"vehicles":{"vehicleId":"a"}}}"#,
            br#"{"eventName":"dynamic","payload":{"vehicles":"a"}}"#,
            br#"{"eventName":"dynamic","payload":[{"vehicleId":"a"}]}"#,
        ] {
            let r = Routing::sniff(body);
            assert!(r.is_json_object, "{}", String::from_utf8_lossy(body));
            assert_eq!(r.key(), None, "{}", String::from_utf8_lossy(body));
            assert_eq!(r.event_type.as_deref(), Some("DYNAMIC"));
        }
        // Fields after the skipped array are still read.
        let r = Routing::sniff(
            br#"{"eventName":"dynamic","payload":{"vehicles":[{"vehicleId":"a","data":[{"x":[1,{"y":2}]}]},{"vehicleId":"b"}],"eventId":"e"}}"#,
        );
        assert_eq!((r.key(), r.event_id.as_deref()), (Some("a"), Some("e")));
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
