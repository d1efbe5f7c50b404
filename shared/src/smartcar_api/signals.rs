//! From a V3 `GET /vehicles/{id}/signals` answer to the signal model webhooks use
//! ([`crate::event::Signal`]), and from there to the event record the poller produces.
//!
//! One normaliser for both sources: a REST signal is `{id, type, attributes{code, name, group,
//! status, body}, meta{oemUpdatedAt, retrievedAt, ingestedAt}}`, a webhook signal carries the same
//! fields without the `attributes` wrapper. Timestamps arrive as ISO-8601 strings, epoch
//! milliseconds or epoch seconds ([`EpochMillis::from_json`] reads all three). A signal whose status
//! is not `SUCCESS` never yields a value: Smartcar keeps a stale `body` beside an `ERROR`, and
//! reading it would overwrite fresher state with an old reading.
//!
//! The poller produces what it read as a synthesized v4 `VEHICLE_STATE` event (see
//! [`poll_event`]) so that the processor applies it with the same claim, freshness rule, dead
//! letters and traces as a webhook.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::clock::EpochMillis;
use crate::event::{Signal, SignalStatus, MAX_SIGNALS};
use crate::ids::{EventId, SignalCode, VehicleId};

/// Prefix of a polled event's id: `poll-` + hex SHA-256 of the vehicle id and the response bytes.
pub const POLL_EVENT_ID_PREFIX: &str = "poll-";
/// `meta.source` of a synthesized poll event (webhooks never carry it).
pub const POLL_SOURCE: &str = "poll";

/// Why a 200 answer cannot be used. Each names the field, so an operator can compare with the
/// body logged beside it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("response body is not JSON: {0}")]
    NotJson(String),
    #[error("response field `{field}` has the wrong shape: expected {expected}")]
    Shape {
        field: String,
        expected: &'static str,
    },
    #[error("response field `{field}` has no usable signal code (code, id or group + name)")]
    NoCode { field: String },
    #[error("response lists {0} signals, more than the {MAX_SIGNALS} accepted")]
    TooManySignals(usize),
    #[error("response is for vehicle {found}, not the requested {requested}")]
    WrongVehicle { requested: String, found: String },
}

impl ResponseError {
    /// Bounded label for metrics.
    pub fn class(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "not_json",
            Self::Shape { .. } | Self::NoCode { .. } | Self::TooManySignals(_) => "wrong_shape",
            Self::WrongVehicle { .. } => "wrong_vehicle",
        }
    }
}

/// A usable signals answer.
#[derive(Debug, Clone, PartialEq)]
pub struct PolledSignals {
    pub signals: Vec<Signal>,
    /// `included.vehicle.attributes.mode`, upper-cased (`LIVE`, `TEST`, `SIMULATED`).
    pub mode: Option<String>,
    /// `links.next` when the answer says there is another page.
    pub next_page: Option<String>,
}

fn shape(field: impl Into<String>, expected: &'static str) -> ResponseError {
    ResponseError::Shape {
        field: field.into(),
        expected,
    }
}

fn obj<'a>(
    v: Option<&'a Value>,
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, ResponseError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(shape(field, "an object")),
    }
}

fn text<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Reads a signals answer for `vehicle`. `data` may be a list (`/signals`) or one resource
/// (`/signals/{code}`), and a single resource may come unwrapped.
pub fn normalise(vehicle: &VehicleId, body: &[u8]) -> Result<PolledSignals, ResponseError> {
    let root: Value =
        serde_json::from_slice(body).map_err(|e| ResponseError::NotJson(e.to_string()))?;
    let Value::Object(root) = root else {
        return Err(shape("(root)", "an object"));
    };
    let items: Vec<(String, &Map<String, Value>)> = match root.get("data") {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let field = format!("data[{i}]");
                match v {
                    Value::Object(m) => Ok((field, m)),
                    _ => Err(shape(field, "a signal object")),
                }
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Object(m)) => vec![("data".to_string(), m)],
        Some(_) => return Err(shape("data", "an array of signals")),
        // `GET /signals/{code}` has been seen without the `data` wrapper.
        None if root.contains_key("attributes") => vec![("(root)".to_string(), &root)],
        None => return Err(shape("data", "an array of signals")),
    };
    if items.len() > MAX_SIGNALS {
        return Err(ResponseError::TooManySignals(items.len()));
    }
    let included = obj(root.get("included"), "included")?
        .map(|i| obj(i.get("vehicle"), "included.vehicle"))
        .transpose()?
        .flatten();
    if let Some(found) = included.and_then(|v| text(v, "id")) {
        if found != vehicle.as_str() {
            return Err(ResponseError::WrongVehicle {
                requested: vehicle.to_string(),
                found: found.to_string(),
            });
        }
    }
    let mode = included
        .and_then(|v| v.get("attributes"))
        .and_then(Value::as_object)
        .and_then(|a| text(a, "mode"))
        .map(str::to_ascii_uppercase);
    let next_page = obj(root.get("links"), "links")?
        .and_then(|l| text(l, "next"))
        .map(str::to_owned);
    let signals = items
        .into_iter()
        .map(|(field, v)| signal(&field, v))
        .collect::<Result<_, _>>()?;
    Ok(PolledSignals {
        signals,
        mode,
        next_page,
    })
}

/// One JSON:API signal resource (or a webhook-shaped signal) as a [`Signal`].
fn signal(field: &str, item: &Map<String, Value>) -> Result<Signal, ResponseError> {
    let attrs = obj(item.get("attributes"), &format!("{field}.attributes"))?.unwrap_or(item);
    let code = text(attrs, "code")
        .or_else(|| text(item, "id"))
        .and_then(|c| SignalCode::parse(c).ok())
        .or_else(|| match (text(attrs, "group"), text(attrs, "name")) {
            (Some(g), Some(n)) => SignalCode::from_group_name(&format!("{g}.{n}")).ok(),
            _ => None,
        })
        .ok_or_else(|| ResponseError::NoCode {
            field: field.to_string(),
        })?;
    let status_field = format!("{field}.attributes.status");
    let status = match obj(attrs.get("status"), &status_field)? {
        None => SignalStatus::Success,
        Some(s) => match s.get("value") {
            None | Some(Value::Null) => SignalStatus::Success,
            Some(Value::String(v)) if v == "SUCCESS" => SignalStatus::Success,
            Some(Value::String(_)) => {
                let err = obj(s.get("error"), &format!("{status_field}.error"))?;
                let get = |k: &str| err.and_then(|e| text(e, k)).map(str::to_owned);
                SignalStatus::Error {
                    error_type: get("type"),
                    code: get("code"),
                }
            }
            Some(_) => return Err(shape(format!("{status_field}.value"), "a string")),
        },
    };
    // Resource-level `meta` first (V3), else inside the signal (webhook shape).
    let meta = match obj(item.get("meta"), &format!("{field}.meta"))? {
        Some(m) => Some(m),
        None => obj(attrs.get("meta"), &format!("{field}.attributes.meta"))?,
    };
    let ts = |k: &str| meta.and_then(|m| m.get(k)).and_then(EpochMillis::from_json);
    let body = match status {
        SignalStatus::Success => attrs.get("body").filter(|b| !b.is_null()).cloned(),
        SignalStatus::Error { .. } => None,
    };
    Ok(Signal {
        code,
        status,
        body,
        oem_updated_at: ts("oemUpdatedAt"),
        fetched_at: ts("retrievedAt").or_else(|| ts("fetchedAt")),
    })
}

/// The deterministic event id of one answer: the same vehicle and the same bytes always give
/// the same id, so a poll repeated before anything changed is a duplicate the processor drops.
pub fn poll_event_id(vehicle: &VehicleId, response: &[u8]) -> EventId {
    let mut h = Sha256::new();
    h.update(vehicle.as_str().as_bytes());
    h.update(b"\n");
    h.update(response);
    let id = format!("{POLL_EVENT_ID_PREFIX}{}", hex::encode(h.finalize()));
    // 5 + 64 ASCII characters, no control character: always a valid id, whatever the input.
    EventId::parse(id).expect("poll- + 64 hex digits is a valid event id")
}

/// What the poller knows about one fetch, besides the signals.
#[derive(Debug, Clone)]
pub struct PollMeta<'a> {
    pub vehicle: &'a VehicleId,
    pub user_id: Option<&'a str>,
    /// Why the poll was made (bounded label, e.g. `receiver_outage`).
    pub reason: &'a str,
    /// When the answer arrived: the event's `deliveredAt` (the delivery clock of its
    /// availability writes).
    pub fetched_at: EpochMillis,
}

/// The record value the poller produces: a v4 `VEHICLE_STATE` event in webhook shape, with
/// `meta.source: "poll"`, that [`crate::event::Event::parse`] reads like any webhook.
pub fn poll_event(meta: &PollMeta<'_>, event_id: &EventId, polled: &PolledSignals) -> Vec<u8> {
    let ms = |t: Option<EpochMillis>| t.map_or(Value::Null, |t| json!(t.as_i64()));
    let signals: Vec<Value> = polled
        .signals
        .iter()
        .map(|s| {
            let status = match &s.status {
                SignalStatus::Success => json!({ "value": "SUCCESS" }),
                SignalStatus::Error { error_type, code } => {
                    json!({ "value": "ERROR", "error": { "type": error_type, "code": code } })
                }
            };
            let mut o = json!({
                "code": s.code.as_str(),
                "status": status,
                "meta": { "oemUpdatedAt": ms(s.oem_updated_at), "retrievedAt": ms(s.fetched_at) },
            });
            if let (Some(b), Value::Object(m)) = (&s.body, &mut o) {
                m.insert("body".into(), b.clone());
            }
            o
        })
        .collect();
    let mut data = json!({ "vehicle": { "id": meta.vehicle.as_str() }, "signals": signals });
    if let (Some(u), Value::Object(d)) = (meta.user_id, &mut data) {
        d.insert("user".into(), json!({ "id": u }));
    }
    json!({
        "eventId": event_id.as_str(),
        "eventType": "VEHICLE_STATE",
        "vehicleId": meta.vehicle.as_str(),
        "data": data,
        "meta": {
            "deliveredAt": meta.fetched_at.as_i64(),
            "mode": polled.mode,
            "version": "4.0",
            "source": POLL_SOURCE,
            "pollReason": meta.reason,
        },
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, EventKind, EventSource};

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rest-v3");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn vehicle(id: &str) -> VehicleId {
        VehicleId::parse(id).unwrap_or_else(|e| panic!("{e}"))
    }

    fn iso(s: &str) -> Option<i64> {
        EpochMillis::parse_str(s).map(EpochMillis::as_i64)
    }

    #[test]
    fn success_fixture_reads_every_signal_with_iso_times() {
        let v = vehicle("6f1c2a9e-3b7d-4c55-9a1e-0d8b4f2c7e13");
        let p =
            normalise(&v, &fixture("signals.200.success.json")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.signals.len(), 8);
        assert_eq!(p.mode.as_deref(), Some("LIVE"));
        assert_eq!(p.next_page, None);
        let soc = &p.signals[0];
        assert_eq!(soc.code.as_str(), "tractionbattery-stateofcharge");
        assert_eq!(soc.status, SignalStatus::Success);
        assert_eq!(soc.body, Some(json!({ "value": 64, "unit": "percent" })));
        assert_eq!(
            soc.oem_updated_at.map(EpochMillis::as_i64),
            iso("2026-11-29T17:58:31.000Z")
        );
        assert_eq!(
            soc.fetched_at.map(EpochMillis::as_i64),
            iso("2026-11-29T18:04:10.902Z")
        );
        // The VIN has only `ingestedAt`: no car time, no fetch time.
        let vin = &p.signals[7];
        assert_eq!(vin.code.as_str(), "vehicleidentification-vin");
        assert_eq!((vin.oem_updated_at, vin.fetched_at), (None, None));
    }

    #[test]
    fn an_error_signal_never_yields_its_stale_body() {
        let v = vehicle("0b7e4d21-9c3a-4f6e-8d25-7a1f3e9c5b40");
        let p = normalise(&v, &fixture("signals.200.per-signal-errors.json"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.signals.len(), 5);
        let wattage = &p.signals[1];
        assert_eq!(wattage.code.as_str(), "charge-wattage");
        assert_eq!(
            wattage.status,
            SignalStatus::Error {
                error_type: Some("VEHICLE_STATE".into()),
                code: Some("NOT_CHARGING".into())
            }
        );
        assert_eq!(wattage.body, None, "the stale 7200 W is not a value");
        assert!(p.signals[2].status.is_not_capable());
        let kinds: Vec<_> = p
            .signals
            .iter()
            .map(|s| match &s.status {
                SignalStatus::Success => "SUCCESS".to_string(),
                SignalStatus::Error { error_type, .. } => error_type.clone().unwrap_or_default(),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "SUCCESS",
                "VEHICLE_STATE",
                "COMPATIBILITY",
                "PERMISSION",
                "CONNECTED_SERVICES_ACCOUNT"
            ]
        );
    }

    #[test]
    fn epoch_seconds_and_milliseconds_are_accepted() {
        let v = vehicle("car");
        let body = br#"{"data":[
            {"id":"a-b","type":"signal","attributes":{"code":"a-b","status":{"value":"SUCCESS"},"body":{"value":1}},
             "meta":{"oemUpdatedAt":1696156800,"retrievedAt":1752104218549}},
            {"type":"signal","attributes":{"group":"Charge","name":"IsCharging","body":{"value":true}},
             "meta":{"oemUpdatedAt":0}}]}"#;
        let p = normalise(&v, body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.signals[0].oem_updated_at.map(EpochMillis::as_i64),
            Some(1_696_156_800_000)
        );
        assert_eq!(
            p.signals[0].fetched_at.map(EpochMillis::as_i64),
            Some(1_752_104_218_549)
        );
        assert_eq!(p.signals[1].code.as_str(), "charge-ischarging");
        assert_eq!(p.signals[1].oem_updated_at, None, "0 means unknown");
    }

    #[test]
    fn one_signal_wrapped_in_data_is_read() {
        let v = vehicle("car");
        let body = br#"{"data":{"id":"odometer-traveleddistance","type":"signal","attributes":{"status":{"value":"SUCCESS"},"body":{"value":5}},"meta":{"oemUpdatedAt":"2026-11-29T16:41:05.512Z"}}}"#;
        let p = normalise(&v, body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.signals[0].code.as_str(), "odometer-traveleddistance");
        assert_eq!(p.signals[0].body, Some(json!({ "value": 5 })));
    }

    #[test]
    fn unusable_answers_name_the_field() {
        let v = vehicle("car");
        let cases: [(&[u8], &str); 6] = [
            (b"<html>bad gateway</html>", "not_json"),
            (b"[]", "wrong_shape"),
            (br#"{"data":5}"#, "wrong_shape"),
            (
                br#"{"data":[{"type":"signal","attributes":{}}]}"#,
                "wrong_shape",
            ),
            (
                br#"{"data":[{"id":"a-b","attributes":{"status":{"value":7}}}]}"#,
                "wrong_shape",
            ),
            (
                br#"{"data":[],"included":{"vehicle":{"id":"other-car"}}}"#,
                "wrong_vehicle",
            ),
        ];
        for (body, class) in cases {
            let got = normalise(&v, body);
            assert_eq!(
                got.as_ref().map_err(ResponseError::class).err(),
                Some(class),
                "{}: {got:?}",
                String::from_utf8_lossy(body)
            );
        }
        let e = normalise(
            &v,
            br#"{"data":[{"id":"a-b","attributes":{"status":{"value":7}}}]}"#,
        );
        assert!(
            e.err()
                .is_some_and(|e| e.to_string().contains("data[0].attributes.status.value")),
            "the message names the field"
        );
        // The 404 body is an error answer, not signals.
        assert!(normalise(&v, &fixture("signals.404.error-body.json")).is_err());
    }

    #[test]
    fn the_poll_event_parses_like_a_webhook_and_is_marked_polled() {
        let v = vehicle("0b7e4d21-9c3a-4f6e-8d25-7a1f3e9c5b40");
        let raw = fixture("signals.200.per-signal-errors.json");
        let polled = normalise(&v, &raw).unwrap_or_else(|e| panic!("{e}"));
        let id = poll_event_id(&v, &raw);
        assert!(id.as_str().starts_with("poll-") && id.as_str().len() == 69);
        assert_eq!(id, poll_event_id(&v, &raw), "deterministic");
        assert_ne!(id, poll_event_id(&vehicle("other"), &raw));
        let fetched_at = EpochMillis::new(1_764_400_000_000).unwrap_or_else(EpochMillis::now);
        let meta = PollMeta {
            vehicle: &v,
            user_id: Some("user-1"),
            reason: "operator",
            fetched_at,
        };
        let body = poll_event(&meta, &id, &polled);
        let e = Event::parse(&body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.envelope.event_id, id);
        assert_eq!(e.envelope.source, EventSource::Poll);
        assert_eq!(e.envelope.user_id.as_deref(), Some("user-1"));
        assert_eq!(e.envelope.delivered_at, Some(fetched_at));
        let EventKind::VehicleState { vehicle, signals } = e.kind else {
            panic!("not a VEHICLE_STATE: {:?}", e.kind);
        };
        assert_eq!(vehicle, v);
        assert_eq!(
            signals, polled.signals,
            "the processor reads what the poller read"
        );
    }
}
