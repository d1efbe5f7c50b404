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

    /// The routing rules applied to a full `serde_json::Value` parse: the reference the streaming
    /// parse must equal on every well-formed body.
    fn reference(body: &[u8]) -> Routing {
        use serde_json::Value;
        let Ok(Value::Object(top)) = serde_json::from_slice::<Value>(body) else {
            return Routing::default();
        };
        let s = |v: Option<&Value>| {
            v.and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        fn obj(v: Option<&Value>) -> Option<&serde_json::Map<String, Value>> {
            v.and_then(Value::as_object)
        }
        let data = obj(top.get("data"));
        let payload = obj(top.get("payload"));
        let meta = obj(top.get("meta"));
        let first_listed = payload
            .and_then(|p| p.get("vehicles"))
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_object)
            .and_then(|v| s(v.get("vehicleId")));
        Routing {
            event_id: s(top.get("eventId")).or_else(|| s(payload.and_then(|p| p.get("eventId")))),
            event_type: s(top.get("eventType"))
                .or_else(|| s(top.get("eventName")).map(|n| n.to_ascii_uppercase())),
            vehicle_id: s(top.get("vehicleId"))
                .or_else(|| s(obj(data.and_then(|d| d.get("vehicle"))).and_then(|v| v.get("id"))))
                .or_else(|| s(payload.and_then(|p| p.get("vehicleId"))))
                .or(first_listed),
            delivery_id: s(meta.and_then(|m| m.get("deliveryId"))),
            challenge: s(data.and_then(|d| d.get("challenge")))
                .or_else(|| s(payload.and_then(|p| p.get("challenge")))),
            is_json_object: true,
        }
    }

    fn same(body: &[u8]) {
        assert_eq!(
            Routing::sniff(body),
            reference(body),
            "{}",
            String::from_utf8_lossy(body)
        );
    }

    /// Every body shape the protocol doc and the example files show.
    fn protocol_shapes() -> Vec<serde_json::Value> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/protocol");
        let mut out = Vec::new();
        let examples = std::fs::read_dir(dir.join("examples")).unwrap_or_else(|e| panic!("{e}"));
        for entry in examples.flatten() {
            let raw = std::fs::read(entry.path()).unwrap_or_else(|e| panic!("{e}"));
            out.push(serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{e}")));
        }
        let examples_found = out.len();
        assert!(examples_found >= 4, "protocol examples missing");
        // The inline bodies of SMARTCAR.md (`{…}` in back-quotes) that are complete JSON.
        let doc =
            std::fs::read_to_string(dir.join("SMARTCAR.md")).unwrap_or_else(|e| panic!("{e}"));
        for quoted in doc.split('`').skip(1).step_by(2) {
            if let Ok(v @ serde_json::Value::Object(_)) = serde_json::from_str(quoted) {
                out.push(v);
            }
        }
        assert!(
            out.len() >= examples_found + 3,
            "SMARTCAR.md bodies missing"
        );
        out
    }

    /// Values every routing field is tried with: each JSON type, empty and escaped strings, and the
    /// objects/arrays the other routing rules look into.
    fn variants() -> Vec<Option<serde_json::Value>> {
        use serde_json::json;
        [
            json!("x-1"),
            json!(""),
            json!("ü \"q\" \\ \u{1F697} \n"),
            json!(5),
            json!(-1),
            json!(1.5e300),
            json!(18446744073709551615_u64),
            json!(true),
            json!(null),
            json!([]),
            json!(["a", {"vehicleId": "b"}]),
            json!([{"vehicleId": "first", "data": [{"path": "/odometer", "body": {"distance": 1}}]}, {"vehicleId": "second"}]),
            json!([{"vehicleId": 7}, {"vehicleId": "second"}]),
            json!({}),
            json!({"id": "obj-id", "vehicleId": "obj-vid", "challenge": "obj-ch", "eventId": "obj-ev", "deliveryId": "obj-d"}),
            json!({"vehicle": {"id": "nested"}, "vehicles": [{"vehicleId": "listed"}], "challenge": ["x"]}),
        ]
        .into_iter()
        .map(Some)
        .chain([None])
        .collect()
    }

    /// Paths the routing parse reads (and the containers they sit in).
    const ROUTING_PATHS: &[&[&str]] = &[
        &["eventId"],
        &["eventType"],
        &["eventName"],
        &["vehicleId"],
        &["data"],
        &["data", "vehicle"],
        &["data", "vehicle", "id"],
        &["data", "challenge"],
        &["data", "signals"],
        &["payload"],
        &["payload", "eventId"],
        &["payload", "vehicleId"],
        &["payload", "challenge"],
        &["payload", "vehicles"],
        &["meta"],
        &["meta", "deliveryId"],
    ];

    fn set_path(v: &mut serde_json::Value, path: &[&str], to: Option<serde_json::Value>) {
        let Some((last, parents)) = path.split_last() else {
            return;
        };
        let mut cur = v;
        for p in parents {
            let Some(next) = cur.as_object_mut().map(|o| {
                o.entry(p.to_string())
                    .or_insert_with(|| serde_json::json!({}))
            }) else {
                return;
            };
            cur = next;
        }
        if let Some(o) = cur.as_object_mut() {
            match to {
                Some(x) => {
                    o.insert(last.to_string(), x);
                }
                None => {
                    o.remove(*last);
                }
            }
        }
    }

    #[test]
    fn streaming_parse_equals_a_full_parse_on_every_protocol_shape() {
        let mut checked = 0;
        for shape in protocol_shapes() {
            same(&serde_json::to_vec(&shape).unwrap_or_default());
            same(&serde_json::to_vec_pretty(&shape).unwrap_or_default());
            for path in ROUTING_PATHS {
                for to in variants() {
                    let mut v = shape.clone();
                    set_path(&mut v, path, to);
                    same(&serde_json::to_vec(&v).unwrap_or_default());
                    checked += 1;
                }
            }
        }
        assert!(checked > 500, "{checked}");
    }

    /// Random objects built from the routing keys and others, nested, every JSON type: the
    /// property `sniff == reference`, seeded so a failure reproduces.
    #[test]
    fn streaming_parse_equals_a_full_parse_on_random_bodies() {
        use rand::{Rng, SeedableRng};
        use serde_json::{json, Map, Value};
        const KEYS: &[&str] = &[
            "eventId",
            "eventType",
            "eventName",
            "vehicleId",
            "data",
            "vehicle",
            "id",
            "challenge",
            "payload",
            "vehicles",
            "meta",
            "deliveryId",
            "signals",
            "version",
            "x",
        ];
        fn gen(rng: &mut rand::rngs::StdRng, depth: u32) -> Value {
            match rng.random_range(0..if depth == 0 { 6 } else { 9 }) {
                0 => Value::Null,
                1 => json!(rng.random_bool(0.5)),
                2 => json!(rng.random_range(-1000..1000)),
                3 => json!(rng.random::<f64>() * 1e6),
                4 => json!(""),
                5 => json!(format!("s{}", rng.random_range(0..100))),
                6 | 7 => {
                    let mut m = Map::new();
                    for _ in 0..rng.random_range(0..6) {
                        let k = KEYS[rng.random_range(0..KEYS.len())];
                        m.insert(k.to_string(), gen(rng, depth - 1));
                    }
                    Value::Object(m)
                }
                _ => Value::Array(
                    (0..rng.random_range(0..4))
                        .map(|_| gen(rng, depth - 1))
                        .collect(),
                ),
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        for _ in 0..20_000 {
            let mut top = Map::new();
            for _ in 0..rng.random_range(0..8) {
                let k = KEYS[rng.random_range(0..KEYS.len())];
                top.insert(k.to_string(), gen(&mut rng, 4));
            }
            same(&serde_json::to_vec(&Value::Object(top)).unwrap_or_default());
        }
    }

    /// Where the two differ, on purpose: input a full parse rejects but the routing parse need not
    /// read. Skipped values are checked for syntax, not for meaning, so the body is still routed;
    /// a repeated routing key fails both the old and the streaming parse (serde's derive).
    #[test]
    fn bodies_a_full_parse_rejects() {
        let keyed = |r: Routing| r.key().map(str::to_owned);
        // A number out of f64 range in a skipped field.
        let big = br#"{"vehicleId":"v","data":{"signals":[{"body":{"value":1e400}}]}}"#;
        assert_eq!(reference(big), Routing::default());
        assert_eq!(keyed(Routing::sniff(big)).as_deref(), Some("v"));
        // Deeper nesting than serde_json's recursion limit, in a skipped field.
        let deep = format!(
            r#"{{"vehicleId":"v","data":{{"signals":{}{}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(reference(deep.as_bytes()), Routing::default());
        assert_eq!(keyed(Routing::sniff(deep.as_bytes())).as_deref(), Some("v"));
        // A repeated routing key: a full parse keeps the last, the routing parse gives up.
        let twice = br#"{"vehicleId":"a","vehicleId":"b"}"#;
        assert_eq!(reference(twice).key(), Some("b"));
        assert_eq!(Routing::sniff(twice), Routing::default());
        // Invalid UTF-8 inside a skipped string.
        let mut latin1 = br#"{"vehicleId":"v","data":{"signals":[{"name":"x"#.to_vec();
        latin1.extend_from_slice(b"\xe9\"}]}}");
        assert_eq!(reference(&latin1), Routing::default());
        assert_eq!(keyed(Routing::sniff(&latin1)).as_deref(), Some("v"));
        // Syntax errors anywhere fail both.
        same(br#"{"vehicleId":"v","data":{"signals":[1,]}}"#);
        same(br#"{"vehicleId":"v"} trailing"#);
    }
}
