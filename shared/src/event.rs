//! The processor's full reading of a Smartcar event (`SMARTCAR.md` §4–6).
//!
//! Parsing is tolerant where Smartcar is inconsistent (vehicle id in two places, `fetchedAt` vs
//! `retrievedAt`, triggers in two shapes, `deliveredAt` in three forms, legacy v2 bodies) and strict
//! only where the processor cannot act: a body that is not a JSON object, an event without a usable
//! `eventId`, a known event type whose required structure is missing. Those are [`EventError`]s,
//! each naming the field, and the processor dead-letters them.

use serde_json::{Map, Value};

use crate::clock::EpochMillis;
use crate::ids::{EventId, IdError, SignalCode, VehicleId};

/// Signals in one event beyond which the event is refused (Smartcar's 50 KB cap allows ~500).
pub const MAX_SIGNALS: usize = 2_000;

/// Why an event cannot be applied. Deterministic: retrying the same bytes fails the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("body is not JSON: {0}")]
    NotJson(String),
    #[error("body is JSON but not an object")]
    NotObject,
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("field `{field}` has the wrong type: expected {expected}")]
    WrongType {
        field: String,
        expected: &'static str,
    },
    #[error("field `{field}` is invalid: {source}")]
    InvalidId { field: String, source: IdError },
    #[error("`data.signals` has {0} entries, more than the {MAX_SIGNALS} accepted")]
    TooManySignals(usize),
}

impl EventError {
    /// Bounded label for metrics and the dead-letter `error-class` header.
    pub fn class(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "not_json",
            Self::NotObject => "not_object",
            Self::Missing(_) => "missing_field",
            Self::WrongType { .. } => "wrong_type",
            Self::InvalidId { .. } => "invalid_id",
            Self::TooManySignals(_) => "too_many_signals",
        }
    }
}

/// Fields every event carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub event_id: EventId,
    /// `eventType` as sent (legacy `eventName` upper-cased).
    pub event_type: String,
    /// `vehicleId`, else `data.vehicle.id`.
    pub vehicle_id: Option<VehicleId>,
    pub delivery_id: Option<String>,
    pub delivered_at: Option<EpochMillis>,
    /// `meta.mode` normalised to upper case (`LIVE`, `TEST`, `SIMULATED`).
    pub mode: Option<String>,
    /// `meta.version`, or the legacy top-level `version`.
    pub version: Option<String>,
}

/// A parsed event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub envelope: Envelope,
    pub kind: EventKind,
}

/// What the event says.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// Signal values for one vehicle.
    VehicleState {
        vehicle: VehicleId,
        signals: Vec<Signal>,
    },
    /// Errors (or their resolution) for one vehicle.
    VehicleError {
        vehicle: VehicleId,
        errors: Vec<VehicleErrorItem>,
    },
    /// A handshake; answered by the receiver, never applied.
    Verify,
    /// A legacy v2 data event: recorded and counted, not applied.
    Legacy { event_name: String },
    /// An event type this version does not know: counted, not failed.
    Unknown,
}

/// One entry of `data.signals[]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    pub code: SignalCode,
    pub status: SignalStatus,
    /// The signal body as received (absent on error).
    pub body: Option<Value>,
    pub oem_updated_at: Option<EpochMillis>,
    /// `meta.fetchedAt`, or `meta.retrievedAt` as live traffic names it.
    pub fetched_at: Option<EpochMillis>,
}

/// A signal's status: absent or `SUCCESS` means success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalStatus {
    Success,
    Error {
        error_type: Option<String>,
        code: Option<String>,
    },
}

impl SignalStatus {
    /// Whether the car cannot supply this signal at all.
    pub fn is_not_capable(&self) -> bool {
        matches!(self, Self::Error { code: Some(c), .. } if c == "VEHICLE_NOT_CAPABLE")
    }
}

/// `ERROR` or `RESOLVED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorState {
    Error,
    Resolved,
}

/// One entry of `data.errors[]`.
#[derive(Debug, Clone, PartialEq)]
pub struct VehicleErrorItem {
    pub error_type: String,
    pub code: Option<String>,
    pub state: ErrorState,
    pub description: Option<String>,
    /// `resolution.type`, e.g. `REAUTHENTICATE`.
    pub resolution: Option<String>,
    pub signals: Vec<SignalCode>,
    /// The item as received, kept for the state view.
    pub raw: Value,
}

impl VehicleErrorItem {
    /// The stable identity of this error for a vehicle: `TYPE` or `TYPE:CODE`.
    pub fn key(&self) -> String {
        match &self.code {
            Some(c) => format!("{}:{}", self.error_type, c),
            None => self.error_type.clone(),
        }
    }

    /// PERMISSION or a REAUTHENTICATE resolution: the user must reconnect the vehicle.
    pub fn needs_reconnect(&self) -> bool {
        self.error_type == "PERMISSION"
            || self.code.as_deref() == Some("PERMISSION")
            || self.code.as_deref() == Some("AUTHENTICATION_FAILED")
            || self.resolution.as_deref() == Some("REAUTHENTICATE")
    }

    /// COMPATIBILITY / VEHICLE_NOT_CAPABLE: the listed signals are not supported.
    pub fn is_not_capable(&self) -> bool {
        self.code.as_deref() == Some("VEHICLE_NOT_CAPABLE")
    }

    /// RATE_LIMIT (as a type or an UPSTREAM code).
    pub fn is_rate_limit(&self) -> bool {
        self.error_type == "RATE_LIMIT" || self.code.as_deref() == Some("RATE_LIMIT")
    }
}

fn str_field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<Option<&'a str>, EventError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(EventError::WrongType {
            field: path.to_string(),
            expected: "a string",
        }),
    }
}

fn obj_field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, EventError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(EventError::WrongType {
            field: path.to_string(),
            expected: "an object",
        }),
    }
}

fn array_field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    path: &str,
) -> Result<Option<&'a Vec<Value>>, EventError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(EventError::WrongType {
            field: path.to_string(),
            expected: "an array",
        }),
    }
}

fn signal_code(v: &Value, path: &str) -> Result<SignalCode, EventError> {
    let bad = |source| EventError::InvalidId {
        field: path.to_string(),
        source,
    };
    match v {
        Value::String(s) => SignalCode::from_group_name(s).map_err(bad),
        Value::Object(o) => {
            if let Some(code) = str_field(o, "code", &format!("{path}.code"))? {
                return SignalCode::parse(code).map_err(bad);
            }
            let group = str_field(o, "group", &format!("{path}.group"))?;
            let name = str_field(o, "name", &format!("{path}.name"))?;
            match (group, name) {
                (Some(g), Some(n)) => SignalCode::from_group_name(&format!("{g}.{n}")).map_err(bad),
                _ => Err(EventError::Missing("signal code")),
            }
        }
        _ => Err(EventError::WrongType {
            field: path.to_string(),
            expected: "a signal object or \"Group.Name\"",
        }),
    }
}

fn parse_signal(i: usize, v: &Value) -> Result<Signal, EventError> {
    let path = format!("data.signals[{i}]");
    let Value::Object(o) = v else {
        return Err(EventError::WrongType {
            field: path,
            expected: "an object",
        });
    };
    let code = signal_code(v, &path)?;
    let status = match obj_field(o, "status", &format!("{path}.status"))? {
        None => SignalStatus::Success,
        Some(s) => match str_field(s, "value", &format!("{path}.status.value"))? {
            None | Some("SUCCESS") => SignalStatus::Success,
            Some(_) => {
                let err = obj_field(s, "error", &format!("{path}.status.error"))?;
                let get = |k: &str| {
                    err.and_then(|e| e.get(k))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                };
                SignalStatus::Error {
                    error_type: get("type"),
                    code: get("code"),
                }
            }
        },
    };
    let meta = obj_field(o, "meta", &format!("{path}.meta"))?;
    let ts = |k: &str| meta.and_then(|m| m.get(k)).and_then(EpochMillis::from_json);
    let body = match &status {
        SignalStatus::Success => o.get("body").filter(|b| !b.is_null()).cloned(),
        SignalStatus::Error { .. } => None,
    };
    Ok(Signal {
        code,
        status,
        body,
        oem_updated_at: ts("oemUpdatedAt"),
        fetched_at: ts("fetchedAt").or_else(|| ts("retrievedAt")),
    })
}

fn parse_error_item(i: usize, v: &Value) -> Result<VehicleErrorItem, EventError> {
    let path = format!("data.errors[{i}]");
    let Value::Object(o) = v else {
        return Err(EventError::WrongType {
            field: path,
            expected: "an object",
        });
    };
    let error_type = str_field(o, "type", &format!("{path}.type"))?
        .ok_or(EventError::Missing("data.errors[].type"))?
        .to_owned();
    let state = match str_field(o, "state", &format!("{path}.state"))? {
        Some("RESOLVED") => ErrorState::Resolved,
        _ => ErrorState::Error,
    };
    let resolution = match o.get("resolution") {
        Some(Value::Object(r)) => r.get("type").and_then(Value::as_str).map(str::to_owned),
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let signals = array_field(o, "signals", &format!("{path}.signals"))?
        .map(|a| {
            a.iter()
                .enumerate()
                .map(|(j, s)| signal_code(s, &format!("{path}.signals[{j}]")))
                .collect()
        })
        .transpose()?
        .unwrap_or_default();
    Ok(VehicleErrorItem {
        error_type,
        code: str_field(o, "code", &format!("{path}.code"))?.map(str::to_owned),
        state,
        description: str_field(o, "description", &format!("{path}.description"))?
            .map(str::to_owned),
        resolution,
        signals,
        raw: v.clone(),
    })
}

impl Event {
    /// Parses raw bytes as received from Smartcar.
    pub fn parse(body: &[u8]) -> Result<Self, EventError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))?;
        let Value::Object(root) = value else {
            return Err(EventError::NotObject);
        };
        Self::from_object(&root)
    }

    fn from_object(root: &Map<String, Value>) -> Result<Self, EventError> {
        let legacy_name = str_field(root, "eventName", "eventName")?;
        let event_type = match (str_field(root, "eventType", "eventType")?, legacy_name) {
            (Some(t), _) => t.to_owned(),
            (None, Some(n)) => n.to_ascii_uppercase(),
            (None, None) => return Err(EventError::Missing("eventType")),
        };
        let event_id =
            str_field(root, "eventId", "eventId")?.ok_or(EventError::Missing("eventId"))?;
        let event_id = EventId::parse(event_id).map_err(|source| EventError::InvalidId {
            field: "eventId".into(),
            source,
        })?;
        let data = obj_field(root, "data", "data")?;
        let meta = obj_field(root, "meta", "meta")?;
        let vehicle_raw = match str_field(root, "vehicleId", "vehicleId")? {
            Some(v) => Some((v, "vehicleId")),
            None => data
                .map(|d| obj_field(d, "vehicle", "data.vehicle"))
                .transpose()?
                .flatten()
                .map(|v| str_field(v, "id", "data.vehicle.id"))
                .transpose()?
                .flatten()
                .map(|v| (v, "data.vehicle.id")),
        };
        let vehicle_id = vehicle_raw
            .map(|(v, field)| {
                VehicleId::parse(v).map_err(|source| EventError::InvalidId {
                    field: field.into(),
                    source,
                })
            })
            .transpose()?;
        let meta_str = |k: &str| {
            meta.and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let envelope = Envelope {
            event_id,
            event_type: event_type.clone(),
            vehicle_id: vehicle_id.clone(),
            delivery_id: meta_str("deliveryId"),
            delivered_at: meta
                .and_then(|m| m.get("deliveredAt"))
                .and_then(EpochMillis::from_json),
            mode: meta_str("mode").map(|m| m.to_ascii_uppercase()),
            version: meta_str("version").or_else(|| {
                root.get("version")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            }),
        };
        let is_legacy = legacy_name.is_some() && root.get("eventType").is_none();
        let need_vehicle = || {
            vehicle_id
                .clone()
                .ok_or(EventError::Missing("vehicleId or data.vehicle.id"))
        };
        let kind = match event_type.as_str() {
            "VERIFY" => EventKind::Verify,
            _ if is_legacy => EventKind::Legacy {
                event_name: legacy_name.unwrap_or_default().to_owned(),
            },
            "VEHICLE_STATE" => {
                let vehicle = need_vehicle()?;
                let signals = data
                    .ok_or(EventError::Missing("data"))
                    .and_then(|d| array_field(d, "signals", "data.signals"))?
                    .ok_or(EventError::Missing("data.signals"))?;
                if signals.len() > MAX_SIGNALS {
                    return Err(EventError::TooManySignals(signals.len()));
                }
                let signals = signals
                    .iter()
                    .enumerate()
                    .map(|(i, s)| parse_signal(i, s))
                    .collect::<Result<_, _>>()?;
                EventKind::VehicleState { vehicle, signals }
            }
            "VEHICLE_ERROR" => {
                let vehicle = need_vehicle()?;
                let errors = data
                    .ok_or(EventError::Missing("data"))
                    .and_then(|d| array_field(d, "errors", "data.errors"))?
                    .ok_or(EventError::Missing("data.errors"))?;
                let errors = errors
                    .iter()
                    .enumerate()
                    .map(|(i, e)| parse_error_item(i, e))
                    .collect::<Result<_, _>>()?;
                EventKind::VehicleError { vehicle, errors }
            }
            _ => EventKind::Unknown,
        };
        Ok(Event { envelope, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/protocol/examples"
    );

    fn example(name: &str) -> Vec<u8> {
        std::fs::read(format!("{EXAMPLES}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn signal_change_example() {
        let e = Event::parse(&example("vehicle_state.v4.signal-change.json"))
            .map_err(|e| e.to_string());
        let Ok(Event {
            envelope,
            kind: EventKind::VehicleState { vehicle, signals },
        }) = e
        else {
            panic!("unexpected {e:?}");
        };
        assert_eq!(
            envelope.event_id.as_str(),
            "550e8400-e29b-41d4-a716-446655440000"
        );
        assert_eq!(vehicle.as_str(), "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2");
        assert_eq!(signals.len(), 3);
        assert_eq!(
            signals[0].oem_updated_at.map(EpochMillis::as_i64),
            Some(1731940328000)
        );
        assert_eq!(
            signals[0].fetched_at.map(EpochMillis::as_i64),
            Some(1731940330000)
        );
    }

    #[test]
    fn responses_page_shape_has_partial_failure_and_nested_vehicle() {
        let e = Event::parse(&example("vehicle_state.v4.responses-page-shape.json"));
        let Ok(Event {
            kind: EventKind::VehicleState { vehicle, signals },
            ..
        }) = e
        else {
            panic!("unexpected {e:?}");
        };
        assert_eq!(vehicle.as_str(), "123e4567-e89b-12d3-a456-426614174000");
        assert!(signals[1].status.is_not_capable());
        assert_eq!(signals[1].body, None);
        assert_eq!(
            signals[0].fetched_at.map(EpochMillis::as_i64),
            Some(1758668712404)
        );
    }

    #[test]
    fn error_example_lists_signals() {
        let e = Event::parse(&example("vehicle_error.v4.error.json"));
        let Ok(Event {
            kind: EventKind::VehicleError { errors, .. },
            ..
        }) = e
        else {
            panic!("unexpected {e:?}");
        };
        assert_eq!(errors[0].key(), "COMPATIBILITY:VEHICLE_NOT_CAPABLE");
        assert!(errors[0].is_not_capable());
        assert_eq!(errors[0].signals.len(), 2);
    }

    #[test]
    fn verify_and_legacy_route_by_shape() {
        assert!(matches!(
            Event::parse(&example("verify.v4.json")).map(|e| e.kind),
            Ok(EventKind::Verify)
        ));
        let legacy = br#"{"version":"2.0","eventId":"e2","eventName":"schedule","payload":{"vehicleId":"v"}}"#;
        assert!(matches!(
            Event::parse(legacy).map(|e| e.kind),
            Ok(EventKind::Legacy { .. })
        ));
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(Event::parse(b"[1]").err(), Some(EventError::NotObject));
        assert_eq!(
            Event::parse(br#"{"eventType":"VEHICLE_STATE"}"#).err(),
            Some(EventError::Missing("eventId"))
        );
        assert_eq!(
            Event::parse(br#"{"eventId":1,"eventType":"X"}"#).err(),
            Some(EventError::WrongType {
                field: "eventId".into(),
                expected: "a string"
            })
        );
        let no_vehicle = br#"{"eventId":"e","eventType":"VEHICLE_STATE","data":{"signals":[]}}"#;
        assert_eq!(
            Event::parse(no_vehicle).err(),
            Some(EventError::Missing("vehicleId or data.vehicle.id"))
        );
        let bad_signal = br#"{"eventId":"e","eventType":"VEHICLE_STATE","vehicleId":"v","data":{"signals":[{"code":"a"},5]}}"#;
        assert_eq!(
            Event::parse(bad_signal).err(),
            Some(EventError::WrongType {
                field: "data.signals[1]".into(),
                expected: "an object"
            })
        );
        let unknown = br#"{"eventId":"e","eventType":"SOMETHING_NEW"}"#;
        assert!(matches!(
            Event::parse(unknown).map(|e| e.kind),
            Ok(EventKind::Unknown)
        ));
    }
}
