//! The receiver's cheap look at a body: just enough to key and label the Kafka record.
//!
//! A validly signed body is persisted whatever it contains, so nothing here can fail the request:
//! fields of the wrong type are simply absent, and a body that is not JSON yields an empty
//! [`Routing`]. The parse reads only the objects that hold routing fields (the top level, `data`,
//! `data.vehicle`, `payload`, `payload.vehicles[0]`, `meta`) and their keys and string values;
//! every other value is passed over by [`skip`], which finds where a value ends without parsing
//! it. So `data.signals`, most of a 50 KB body, costs a vector scan and nothing is built for it.
//!
//! What it reads, it checks as a JSON parser would: object syntax, strings (UTF-8, escapes, no
//! raw control characters), nothing after the top-level object, and no routing key twice in one
//! object (serde's derive refuses that too, and which copy counts would be a guess). What it skips,
//! it checks only for strings that end and brackets that balance. The tests hold it equal to a
//! full parse on every well-formed body and name the malformed ones where the two differ.

mod skip;

use std::borrow::Cow;

/// A routing field as read: a string value, or `None` for any other JSON value.
type Field = Option<String>;

/// A cursor over the body. Every method returns `None` for input it cannot read, which ends the
/// parse with an empty [`Routing`].
struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Reader<'a> {
    /// The next byte that is not JSON whitespace, not consumed; `None` at the end.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&c) = self.b.get(self.i) {
            if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(c);
            }
            self.i += 1;
        }
        None
    }

    /// Consumes `c`, the next byte after whitespace.
    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// The string at the cursor, checked and unescaped as serde_json reads a string.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        let start = self.i;
        let end = skip::string(self.b, start)?;
        self.i = end;
        let raw = &self.b[start + 1..end - 1];
        if raw.contains(&b'\\') {
            serde_json::from_slice::<String>(&self.b[start..end])
                .ok()
                .map(Cow::Owned)
        } else if raw.iter().any(|&c| c < 0x20) {
            None
        } else {
            std::str::from_utf8(raw).ok().map(Cow::Borrowed)
        }
    }

    /// Passes over the value at the cursor.
    fn skip(&mut self) -> Option<()> {
        self.i = match self.peek()? {
            b'"' => skip::string(self.b, self.i)?,
            b'{' | b'[' => skip::container(self.b, self.i)?,
            _ => return self.scalar(),
        };
        Some(())
    }

    /// Passes over a number, `true`, `false` or `null`.
    fn scalar(&mut self) -> Option<()> {
        let rest = &self.b[self.i..];
        let len = rest
            .iter()
            .position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            .unwrap_or(rest.len());
        let word = &rest[..len];
        self.i += len;
        let number = matches!(word.first(), Some(b'-' | b'0'..=b'9'))
            && word
                .iter()
                .all(|c| matches!(c, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'));
        (number || matches!(word, b"true" | b"false" | b"null")).then_some(())
    }

    /// A routing field: a string is kept, any other value passed over.
    fn field(&mut self) -> Option<Field> {
        if self.peek()? == b'"' {
            Some(Some(self.string()?.into_owned()))
        } else {
            self.skip().map(|()| None)
        }
    }

    /// Calls `member(key, self)` for each member of the object at the cursor, with the cursor on
    /// the member's value (which `member` must consume). Any other value is passed over.
    fn object(&mut self, mut member: impl FnMut(&str, &mut Self) -> Option<()>) -> Option<()> {
        if self.peek()? != b'{' {
            return self.skip();
        }
        self.i += 1;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            let key = self.string()?;
            self.eat(b':')?;
            member(&key, self)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// Calls `member(key, self)` for each member of the object at the cursor whose key is one of
    /// `keys`, with the cursor on its value (which `member` must consume); other members are passed
    /// over. One of `keys` given twice makes the body unroutable: serde's derive refuses that too,
    /// and which copy counts would be a guess. Any value other than an object is passed over.
    fn fields(
        &mut self,
        keys: &[&'static str],
        mut member: impl FnMut(&'static str, &mut Self) -> Option<()>,
    ) -> Option<()> {
        let mut seen = 0u32;
        self.object(|key, r| {
            let Some(k) = keys.iter().position(|&known| known == key) else {
                return r.skip();
            };
            let bit = 1 << k;
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            member(keys[k], r)
        })
    }

    /// `vehicleId` of the first entry of the array at the cursor (legacy `payload.vehicles`); the
    /// other entries are passed over. Any other value gives `None`.
    fn first_listed_vehicle(&mut self) -> Option<Field> {
        if self.peek()? != b'[' {
            return self.skip().map(|()| None);
        }
        self.i += 1;
        if self.eat(b']').is_some() {
            return Some(None);
        }
        let mut id = None;
        self.fields(&["vehicleId"], |_, r| {
            id = r.field()?;
            Some(())
        })?;
        loop {
            match self.peek()? {
                b',' => {
                    self.i += 1;
                    self.skip()?;
                }
                b']' => {
                    self.i += 1;
                    return Some(id);
                }
                _ => return None,
            }
        }
    }
}

/// Every routing field, where the body has it.
#[derive(Default)]
struct Raw {
    event_id: Field,
    event_type: Field,
    event_name: Field,
    vehicle_id: Field,
    data_vehicle_id: Field,
    data_challenge: Field,
    payload_event_id: Field,
    payload_vehicle_id: Field,
    payload_first_listed: Field,
    payload_challenge: Field,
    delivery_id: Field,
}

impl Raw {
    /// Reads the routing fields of a body that is one JSON object.
    fn read(body: &[u8]) -> Option<Self> {
        let mut r = Reader { b: body, i: 0 };
        // Only objects are envelopes.
        if r.peek()? != b'{' {
            return None;
        }
        let mut raw = Self::default();
        let keys = [
            "eventId",
            "eventType",
            "eventName",
            "vehicleId",
            "data",
            "payload",
            "meta",
        ];
        r.fields(&keys, |key, r| {
            match key {
                "eventId" => raw.event_id = r.field()?,
                "eventType" => raw.event_type = r.field()?,
                "eventName" => raw.event_name = r.field()?,
                "vehicleId" => raw.vehicle_id = r.field()?,
                "data" => raw.read_data(r)?,
                "payload" => raw.read_payload(r)?,
                _ => {
                    // meta
                    r.fields(&["deliveryId"], |_, r| {
                        raw.delivery_id = r.field()?;
                        Some(())
                    })?;
                }
            }
            Some(())
        })?;
        // Nothing but whitespace may follow the object.
        r.peek().is_none().then_some(raw)
    }

    /// `data`: the vehicle's id and a VERIFY's challenge.
    fn read_data(&mut self, r: &mut Reader<'_>) -> Option<()> {
        r.fields(&["vehicle", "challenge"], |key, r| {
            if key == "vehicle" {
                r.fields(&["id"], |_, r| {
                    self.data_vehicle_id = r.field()?;
                    Some(())
                })
            } else {
                self.data_challenge = r.field()?;
                Some(())
            }
        })
    }

    /// Legacy v2 `payload`: the VERIFY challenge, or an event's ids.
    fn read_payload(&mut self, r: &mut Reader<'_>) -> Option<()> {
        let keys = ["challenge", "eventId", "vehicleId", "vehicles"];
        r.fields(&keys, |key, r| {
            match key {
                "challenge" => self.payload_challenge = r.field()?,
                "eventId" => self.payload_event_id = r.field()?,
                "vehicleId" => self.payload_vehicle_id = r.field()?,
                _ => self.payload_first_listed = r.first_listed_vehicle()?,
            }
            Some(())
        })
    }
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
    /// Whether the body was read as one JSON object (its skipped values are checked only for
    /// strings that end and brackets that balance, see the module doc).
    pub is_json_object: bool,
}

impl Routing {
    /// Reads routing fields from any bytes. Never fails.
    pub fn sniff(body: &[u8]) -> Self {
        let Some(raw) = Raw::read(body) else {
            return Self::default();
        };
        let non_empty = |f: Field| f.filter(|s| !s.is_empty());
        let event_type = non_empty(raw.event_type)
            .or_else(|| non_empty(raw.event_name).map(|n| n.to_ascii_uppercase()));
        Self {
            event_id: non_empty(raw.event_id).or_else(|| non_empty(raw.payload_event_id)),
            event_type,
            vehicle_id: non_empty(raw.vehicle_id)
                .or_else(|| non_empty(raw.data_vehicle_id))
                .or_else(|| non_empty(raw.payload_vehicle_id))
                .or_else(|| non_empty(raw.payload_first_listed)),
            delivery_id: non_empty(raw.delivery_id),
            challenge: non_empty(raw.data_challenge).or_else(|| non_empty(raw.payload_challenge)),
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
    use crate::testkit::{protocol_shapes, variants};

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

    #[test]
    fn streaming_parse_equals_a_full_parse_on_every_protocol_shape() {
        let checked =
            crate::testkit::each_shape_with_each_field_set(ROUTING_PATHS, &variants(), same);
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
            match rng.random_range(0..if depth == 0 { 7 } else { 11 }) {
                0 => Value::Null,
                1 => json!(rng.random_bool(0.5)),
                2 => json!(rng.random_range(-1000..1000)),
                3 => json!(rng.random::<f64>() * 1e6),
                4 => json!(""),
                5 => json!(format!("s{}", rng.random_range(0..100))),
                // What a structure scan could mistake for structure, sometimes longer than its
                // 64-byte blocks.
                6 => json!(r#"s"]}{[\"#.repeat(rng.random_range(1..30))),
                7 | 8 => {
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

    /// Cut short or corrupted bodies: the routing parse never panics, and a body cut anywhere
    /// before its last byte is never routed (its top-level object cannot be complete).
    #[test]
    fn cut_and_corrupted_bodies_never_panic_and_cut_ones_never_route() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(23);
        for shape in protocol_shapes() {
            let body = serde_json::to_vec(&shape).unwrap_or_default();
            for cut in 0..body.len() {
                assert_eq!(
                    Routing::sniff(&body[..cut]),
                    Routing::default(),
                    "{}",
                    String::from_utf8_lossy(&body[..cut])
                );
            }
            for _ in 0..2_000 {
                let mut bad = body.clone();
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..bad.len());
                    bad[at] = *b"\"{}[]:,\\ a0\xff"
                        .get(rng.random_range(0..12))
                        .unwrap_or(&b'x');
                }
                let _ = Routing::sniff(&bad);
            }
        }
    }

    /// Where the two differ, on purpose: input a full parse rejects but the routing parse need not
    /// read. Skipped values are checked only for strings that end and brackets that balance, so the
    /// body is still routed; a repeated routing key makes it unroutable (as serde's derive did).
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
        // Syntax errors inside a skipped value: passed over.
        for bad in [
            &br#"{"vehicleId":"v","data":{"signals":[1,]}}"#[..],
            br#"{"vehicleId":"v","data":{"signals":[{"a":1]}}}"#,
            br#"{"vehicleId":"v","data":{"signals":[tru, 01, {"a" "b"}]}}"#,
        ] {
            assert_eq!(reference(bad), Routing::default());
            assert_eq!(keyed(Routing::sniff(bad)).as_deref(), Some("v"));
        }
        // Syntax errors where the routing parse reads fail both: the objects that hold routing
        // fields, their keys and string values, an unterminated value, what follows the body.
        for bad in [
            &br#"{"vehicleId":"v",}"#[..],
            br#"{"vehicleId":"v" "eventId":"e"}"#,
            br#"{"vehicleId":"v","data":{"vehicle":{"id":"w",}}}"#,
            br#"{"vehicleId":"v","payload":{"vehicles":[{"vehicleId":"a"} {"vehicleId":"b"}]}}"#,
            br#"{"vehicleId":"v\x"}"#,
            b"{\"vehicleId\":\"v\x01\"}",
            b"{\"vehicleId\":\"\xff\"}",
            br#"{"vehicleId":"v","version":nul}"#,
            br#"{"vehicleId":"v","data":{"signals":[[]}}"#,
            br#"{"vehicleId":"v","data":"abc}"#,
            br#"{"vehicleId":"v"} trailing"#,
        ] {
            same(bad);
            assert_eq!(Routing::sniff(bad), Routing::default());
        }
    }
}
