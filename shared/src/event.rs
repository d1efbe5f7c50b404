//! The processor's full reading of a Smartcar event (`SMARTCAR.md` §4–6).
//!
//! Parsing is tolerant where Smartcar is inconsistent (vehicle id in two places, `fetchedAt` vs
//! `retrievedAt`, triggers in two shapes, `deliveredAt` in three forms, legacy v2 bodies) and strict
//! only where the processor cannot act: a body that is not a JSON object, an event without a usable
//! `eventId`, a known event type whose required structure is missing. Those are [`EventError`]s,
//! each naming the field, and the processor dead-letters them.
//!
//! Legacy v2 bodies (`version: "2.0"`, `eventName`, `payload`) are recognised by that shape before
//! anything else is read, because they carry no top-level `eventId` or `vehicleId`. Their
//! idempotency key is derived (see [`Envelope::event_id`]) so that every retry of the same bytes
//! deduplicates like a current event.
//!
//! A current event is read straight from its bytes (`wire`): only the signals' bodies, `meta`
//! timestamps and `data.errors[]` entries become `serde_json::Value`s; the fields read are typed,
//! and everything else is passed over without being built (at 50 KB, about 40 % of the time of
//! reading the whole body as a `Value` tree first). Legacy bodies are rare and still read whole.

use std::borrow::Cow;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::clock::EpochMillis;
use crate::ids::{EventId, IdError, SignalCode, VehicleId, MAX_ID_LEN};

mod wire;

/// Signals (or legacy readings) in one event beyond which the event is refused
/// (Smartcar's 50 KB cap allows ~500).
pub const MAX_SIGNALS: usize = 2_000;

/// Prefix of a legacy event id built from the vehicles' `requestId`s.
pub const LEGACY_REQUEST_ID_PREFIX: &str = "v2-request:";
/// Prefix of a legacy event id built from the SHA-256 of the raw body.
pub const LEGACY_BODY_HASH_PREFIX: &str = "sha256:";

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
    #[error("event has {0} signals or legacy readings, more than the {MAX_SIGNALS} accepted")]
    TooManySignals(usize),
}

impl EventError {
    /// Every value [`EventError::class`] can take (metrics export each at 0 from start-up).
    pub const CLASSES: [&'static str; 6] = [
        "not_json",
        "not_object",
        "missing_field",
        "wrong_type",
        "invalid_id",
        "too_many_signals",
    ];

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
    /// The idempotency key: `eventId`. Legacy v2 bodies: `payload.eventId`, else a top-level
    /// `eventId`, else `v2-request:` + the vehicles' `requestId`s joined with `,` (when every vehicle
    /// has one and the result fits an id), else `sha256:` + hex SHA-256 of the raw body.
    pub event_id: EventId,
    /// `eventType` as sent (legacy `eventName` upper-cased).
    pub event_type: String,
    /// `vehicleId`, else `data.vehicle.id`. Legacy: `payload.vehicleId`, else the first
    /// `payload.vehicles[].vehicleId`.
    pub vehicle_id: Option<VehicleId>,
    /// `meta.deliveryId` (legacy bodies carry none).
    pub delivery_id: Option<String>,
    /// `meta.deliveredAt` (legacy bodies carry none).
    pub delivered_at: Option<EpochMillis>,
    /// `meta.mode` (legacy: top-level `mode`) normalised to upper case (`LIVE`, `TEST`, `SIMULATED`).
    pub mode: Option<String>,
    /// `meta.version`, or the legacy top-level `version`.
    pub version: Option<String>,
    /// Where the event came from: a Smartcar webhook, or carhook's own REST poll
    /// (`meta.source: "poll"`, written only by the poller; Smartcar sends no `meta.source`).
    pub source: EventSource,
    /// `data.user.id`: the user whose connection the vehicle belongs to (sent with API
    /// authentication); the poller needs it as `sc-user-id`.
    pub user_id: Option<String>,
}

/// Where an event's readings came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventSource {
    /// Delivered by Smartcar to the webhook.
    #[default]
    Webhook,
    /// Read by carhook's poller from the REST API.
    Poll,
}

impl EventSource {
    /// `webhook` or `poll`, as stored with each value and shown by `processor state`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Poll => "poll",
        }
    }
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
    /// A legacy v2 data event (`eventBased`, `dynamic`, `scheduled`, …), one entry per vehicle.
    Legacy(LegacyEvent),
    /// An event type this version does not know: counted, not failed.
    Unknown,
}

/// A legacy v2 data event (`SMARTCAR.md` §4).
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyEvent {
    /// `eventName` as sent: "eventBased", "dynamic", "scheduled", or anything else.
    pub event_name: String,
    /// One entry per vehicle (eventBased: exactly one; dynamic/scheduled: `payload.vehicles[]`).
    /// Never empty.
    pub vehicles: Vec<LegacyVehicle>,
}

/// One vehicle of a legacy event.
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyVehicle {
    /// `payload.vehicleId` (eventBased) or `payload.vehicles[].vehicleId`.
    pub vehicle: VehicleId,
    /// `payload.vehicles[].requestId` (dynamic/scheduled); empty strings are `None`.
    pub request_id: Option<String>,
    /// eventBased: `payload.eventType`, e.g. `CHARGING_COMPLETED`.
    pub event_type: Option<String>,
    /// eventBased: `payload.eventTime` (ISO-8601, epoch ms or epoch seconds).
    pub event_time: Option<EpochMillis>,
    /// dynamic/scheduled: the usable `data[]` entries, in order.
    pub readings: Vec<LegacyReading>,
}

/// One `data[]` entry of a legacy vehicle: the answer of one v2 endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct LegacyReading {
    /// The endpoint, e.g. "/odometer", as sent.
    pub path: String,
    /// HTTP status of that path; anything other than 200 is that path's error.
    pub code: i64,
    /// The body as sent (on error: Smartcar's error object with `type`, `code`, `description`);
    /// `Null` when absent.
    pub body: Value,
    /// `headers.sc-data-age`: when the car produced the reading (ISO-8601 or epoch).
    pub data_age: Option<EpochMillis>,
    /// `headers.sc-unit-system`, e.g. "metric".
    pub unit_system: Option<String>,
}

impl LegacyReading {
    /// Whether the path was read successfully (`code` 200).
    pub fn is_success(&self) -> bool {
        self.code == 200
    }
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

/// A field the parse needs: `Ok(None)` when absent or `null`, the error naming the field (its
/// path built only then) when it has another type.
fn read<'de, T: wire::Shape<'de>>(
    field: wire::Field<T>,
    path: impl FnOnce() -> String,
) -> Result<Option<T>, EventError> {
    match field {
        wire::Field::Absent => Ok(None),
        wire::Field::Got(v) => Ok(Some(v)),
        wire::Field::Wrong => Err(EventError::WrongType {
            field: path(),
            expected: T::EXPECTED,
        }),
    }
}

/// `data.signals[i]`: its code from `code`, else from `group` and `name`.
fn parse_signal(i: usize, v: wire::Field<wire::Signal<'_>>) -> Result<Signal, EventError> {
    let path = || format!("data.signals[{i}]");
    let wire::Field::Got(o) = v else {
        return Err(EventError::WrongType {
            field: path(),
            expected: "an object",
        });
    };
    let bad = |source| EventError::InvalidId {
        field: path(),
        source,
    };
    let code = match read(o.code, || format!("{}.code", path()))? {
        Some(code) => SignalCode::parse(code).map_err(bad)?,
        None => {
            let group = read(o.group, || format!("{}.group", path()))?;
            let name = read(o.name, || format!("{}.name", path()))?;
            match (group, name) {
                (Some(g), Some(n)) => {
                    SignalCode::from_group_name(&format!("{g}.{n}")).map_err(bad)?
                }
                _ => return Err(EventError::Missing("signal code")),
            }
        }
    };
    let status = match read(o.status, || format!("{}.status", path()))? {
        None => SignalStatus::Success,
        Some(s) => match read(s.value, || format!("{}.status.value", path()))?.as_deref() {
            None | Some("SUCCESS") => SignalStatus::Success,
            Some(_) => {
                let err = read(s.error, || format!("{}.status.error", path()))?;
                let (error_type, code) =
                    err.map_or((None, None), |e| (e.error_type.lenient(), e.code.lenient()));
                SignalStatus::Error {
                    error_type: error_type.map(Cow::into_owned),
                    code: code.map(Cow::into_owned),
                }
            }
        },
    };
    let meta = read(o.meta, || format!("{}.meta", path()))?.unwrap_or_default();
    let ts = |v: &Option<Value>| v.as_ref().and_then(EpochMillis::from_json);
    let body = match &status {
        SignalStatus::Success => o.body.filter(|b| !b.is_null()),
        SignalStatus::Error { .. } => None,
    };
    Ok(Signal {
        code,
        status,
        body,
        oem_updated_at: ts(&meta.oem_updated_at),
        fetched_at: ts(&meta.fetched_at).or_else(|| ts(&meta.retrieved_at)),
    })
}

/// `data.errors[i]`, kept whole as `raw` once its fields are read.
fn parse_error_item(i: usize, v: Value) -> Result<VehicleErrorItem, EventError> {
    let path = format!("data.errors[{i}]");
    let Value::Object(o) = &v else {
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
    let code = str_field(o, "code", &format!("{path}.code"))?.map(str::to_owned);
    let description =
        str_field(o, "description", &format!("{path}.description"))?.map(str::to_owned);
    Ok(VehicleErrorItem {
        error_type,
        code,
        state,
        description,
        resolution,
        signals,
        raw: v,
    })
}

fn parse_vehicle_id(v: &str, field: impl Into<String>) -> Result<VehicleId, EventError> {
    VehicleId::parse(v).map_err(|source| EventError::InvalidId {
        field: field.into(),
        source,
    })
}

/// A `data[]` entry, or `None` when the processor could not act on it: no `path` string, or no
/// usable `code` (a missing one means 200 only when a `body` came with it).
fn parse_legacy_reading(v: &Value) -> Option<LegacyReading> {
    let o = v.as_object()?;
    let path = o.get("path")?.as_str().filter(|p| !p.is_empty())?;
    let body = o.get("body").cloned().unwrap_or(Value::Null);
    let code = match o.get("code") {
        None | Some(Value::Null) if body.is_null() => return None,
        None | Some(Value::Null) => 200,
        Some(c) => c
            .as_i64()
            .or_else(|| c.as_str().and_then(|s| s.trim().parse().ok()))?,
    };
    // HTTP header names are case-insensitive; Smartcar copies them into JSON as received.
    let headers = o.get("headers").and_then(Value::as_object);
    let header = |name: &str| {
        headers.and_then(|h| {
            h.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
    };
    Some(LegacyReading {
        path: path.to_owned(),
        code,
        body,
        data_age: header("sc-data-age").and_then(EpochMillis::from_json),
        unit_system: header("sc-unit-system")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// One vehicle: `payload` itself (eventBased) or an entry of `payload.vehicles[]`.
fn parse_legacy_vehicle(
    o: &Map<String, Value>,
    path: &str,
    missing_vehicle: &'static str,
) -> Result<LegacyVehicle, EventError> {
    let vehicle_field = format!("{path}.vehicleId");
    let vehicle =
        str_field(o, "vehicleId", &vehicle_field)?.ok_or(EventError::Missing(missing_vehicle))?;
    let optional = |k: &str| {
        o.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(str::to_owned)
    };
    let readings = array_field(o, "data", &format!("{path}.data"))?
        .map(|a| a.iter().filter_map(parse_legacy_reading).collect())
        .unwrap_or_default();
    Ok(LegacyVehicle {
        vehicle: parse_vehicle_id(vehicle, vehicle_field)?,
        request_id: optional("requestId"),
        event_type: optional("eventType"),
        event_time: o.get("eventTime").and_then(EpochMillis::from_json),
        readings,
    })
}

/// Entries of `data[]` in the given vehicle objects, counted before anything is built.
fn legacy_reading_count<'a>(vehicles: impl Iterator<Item = &'a Value>) -> usize {
    vehicles
        .filter_map(|v| v.get("data"))
        .filter_map(Value::as_array)
        .map(Vec::len)
        .sum()
}

fn parse_legacy_vehicles(
    event_name: &str,
    payload: &Map<String, Value>,
) -> Result<Vec<LegacyVehicle>, EventError> {
    let listed = ["dynamic", "scheduled"]
        .iter()
        .any(|n| event_name.eq_ignore_ascii_case(n));
    // Unknown names are read by shape: a `vehicles` array is the list form.
    let list = if event_name.eq_ignore_ascii_case("eventBased") {
        None
    } else {
        match array_field(payload, "vehicles", "payload.vehicles")? {
            None if listed => return Err(EventError::Missing("payload.vehicles")),
            list => list,
        }
    };
    let Some(list) = list else {
        let readings = payload
            .get("data")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if readings > MAX_SIGNALS {
            return Err(EventError::TooManySignals(readings));
        }
        return Ok(vec![parse_legacy_vehicle(
            payload,
            "payload",
            "payload.vehicleId",
        )?]);
    };
    if list.is_empty() {
        return Err(EventError::Missing("payload.vehicles[0]"));
    }
    let readings = legacy_reading_count(list.iter());
    if readings > MAX_SIGNALS {
        return Err(EventError::TooManySignals(readings));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            let path = format!("payload.vehicles[{i}]");
            let Value::Object(o) = v else {
                return Err(EventError::WrongType {
                    field: path,
                    expected: "an object",
                });
            };
            parse_legacy_vehicle(o, &path, "payload.vehicles[].vehicleId")
        })
        .collect()
}

/// The idempotency key of a legacy body (see [`Envelope::event_id`]).
fn legacy_event_id(
    root: &Map<String, Value>,
    payload: &Map<String, Value>,
    vehicles: &[LegacyVehicle],
    body: &[u8],
) -> Result<EventId, EventError> {
    let given = |obj, field: &'static str| -> Result<Option<EventId>, EventError> {
        str_field(obj, "eventId", field)?
            .map(|id| {
                EventId::parse(id).map_err(|source| EventError::InvalidId {
                    field: field.into(),
                    source,
                })
            })
            .transpose()
    };
    if let Some(id) = given(payload, "payload.eventId")? {
        return Ok(id);
    }
    if let Some(id) = given(root, "eventId")? {
        return Ok(id);
    }
    if let Some(id) = request_ids_key(vehicles) {
        return Ok(id);
    }
    let hash = format!(
        "{LEGACY_BODY_HASH_PREFIX}{}",
        hex::encode(Sha256::digest(body))
    );
    EventId::parse(hash).map_err(|source| EventError::InvalidId {
        field: "body".into(),
        source,
    })
}

/// `v2-request:r1,r2,…` when every vehicle has a `requestId`. `None` when one lacks it, when one
/// contains the separator (two lists could then join to the same key), or when the key would
/// not be a valid id (too long, control characters): the body hash is used instead.
fn request_ids_key(vehicles: &[LegacyVehicle]) -> Option<EventId> {
    if vehicles.is_empty() {
        return None;
    }
    let ids = vehicles
        .iter()
        .map(|v| v.request_id.as_deref().filter(|r| !r.contains(',')))
        .collect::<Option<Vec<_>>>()?;
    let key = format!("{LEGACY_REQUEST_ID_PREFIX}{}", ids.join(","));
    if key.len() > MAX_ID_LEN {
        return None;
    }
    EventId::parse(key).ok()
}

/// The body read whole as a `Value` tree, which must be an object.
fn whole_object(body: &[u8]) -> Result<Map<String, Value>, EventError> {
    match serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))? {
        Value::Object(root) => Ok(root),
        _ => Err(EventError::NotObject),
    }
}

impl Event {
    /// Parses raw bytes as received from Smartcar.
    pub fn parse(body: &[u8]) -> Result<Self, EventError> {
        let root: wire::Field<wire::Root<'_>> =
            serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))?;
        let wire::Field::Got(root) = root else {
            // Not an object; read whole to tell NotObject from NotJson (an array nested deeper
            // than serde_json's limit is not JSON it accepts, though passing over it succeeds).
            return Err(whole_object(body).err().unwrap_or(EventError::NotObject));
        };
        if root.is_legacy_shape()? {
            // Rare, and read as a whole (`payload`'s shape depends on `eventName`).
            return Self::from_legacy(&whole_object(body)?, body);
        }
        Self::from_wire(root)
    }

    /// A legacy v2 body; `body` is the raw bytes, hashed when nothing else identifies the event.
    fn from_legacy(root: &Map<String, Value>, body: &[u8]) -> Result<Self, EventError> {
        let event_name =
            str_field(root, "eventName", "eventName")?.ok_or(EventError::Missing("eventName"))?;
        let empty = Map::new();
        let payload = obj_field(root, "payload", "payload")?.unwrap_or(&empty);
        let (legacy, vehicle_id) = if event_name.eq_ignore_ascii_case("verify") {
            (None, None)
        } else {
            let vehicles = parse_legacy_vehicles(event_name, payload)?;
            let vehicle_id = match str_field(payload, "vehicleId", "payload.vehicleId")? {
                Some(v) => Some(parse_vehicle_id(v, "payload.vehicleId")?),
                None => vehicles.first().map(|v| v.vehicle.clone()),
            };
            let legacy = LegacyEvent {
                event_name: event_name.to_owned(),
                vehicles,
            };
            (Some(legacy), vehicle_id)
        };
        let vehicles = legacy.as_ref().map_or(&[][..], |l| l.vehicles.as_slice());
        let root_str = |k: &str| root.get(k).and_then(Value::as_str).map(str::to_owned);
        let envelope = Envelope {
            event_id: legacy_event_id(root, payload, vehicles, body)?,
            event_type: event_name.to_ascii_uppercase(),
            vehicle_id,
            delivery_id: None,
            delivered_at: None,
            mode: root_str("mode").map(|m| m.to_ascii_uppercase()),
            version: root_str("version"),
            source: EventSource::Webhook,
            user_id: None,
        };
        let kind = legacy.map_or(EventKind::Verify, EventKind::Legacy);
        Ok(Event { envelope, kind })
    }

    /// A current event, from the fields [`wire::Root`] read. The checks, their order and the
    /// fields errors name are those of reading the same body as a `Value` tree (the tests hold the
    /// two equal).
    fn from_wire(root: wire::Root<'_>) -> Result<Self, EventError> {
        let wire::Root {
            event_type,
            event_id,
            version,
            vehicle_id,
            data,
            meta,
            ..
        } = root;
        let event_type = read(event_type, || "eventType".into())?
            .ok_or(EventError::Missing("eventType"))?
            .into_owned();
        let event_id =
            read(event_id, || "eventId".into())?.ok_or(EventError::Missing("eventId"))?;
        let event_id = EventId::parse(event_id).map_err(|source| EventError::InvalidId {
            field: "eventId".into(),
            source,
        })?;
        let mut data = read(data, || "data".into())?;
        let meta = read(meta, || "meta".into())?.unwrap_or_default();
        let vehicle_raw = match read(vehicle_id, || "vehicleId".into())? {
            Some(v) => Some((v, "vehicleId")),
            None => match data.as_mut().map(|d| std::mem::take(&mut d.vehicle)) {
                None => None,
                Some(vehicle) => read(vehicle, || "data.vehicle".into())?
                    .map(|v| read(v.id, || "data.vehicle.id".into()))
                    .transpose()?
                    .flatten()
                    .map(|v| (v, "data.vehicle.id")),
            },
        };
        let vehicle_id = vehicle_raw
            .map(|(v, field)| {
                VehicleId::parse(v).map_err(|source| EventError::InvalidId {
                    field: field.into(),
                    source,
                })
            })
            .transpose()?;
        let text = |f: wire::Str<'_>| f.lenient().map(Cow::into_owned);
        let user_id = data
            .as_mut()
            .and_then(|d| std::mem::take(&mut d.user).lenient())
            .and_then(|u| u.id.lenient())
            .filter(|u| !u.is_empty() && u.len() <= MAX_ID_LEN && !u.chars().any(char::is_control))
            .map(Cow::into_owned);
        let envelope = Envelope {
            event_id,
            event_type,
            vehicle_id,
            delivery_id: text(meta.delivery_id),
            delivered_at: meta.delivered_at.as_ref().and_then(EpochMillis::from_json),
            mode: text(meta.mode).map(|m| m.to_ascii_uppercase()),
            version: text(meta.version).or_else(|| text(version)),
            source: match meta.source.lenient().as_deref() {
                Some(crate::smartcar_api::POLL_SOURCE) => EventSource::Poll,
                _ => EventSource::Webhook,
            },
            user_id,
        };
        let need_vehicle = || {
            envelope
                .vehicle_id
                .clone()
                .ok_or(EventError::Missing("vehicleId or data.vehicle.id"))
        };
        let kind = match envelope.event_type.as_str() {
            "VERIFY" => EventKind::Verify,
            "VEHICLE_STATE" => {
                let vehicle = need_vehicle()?;
                let signals = data.ok_or(EventError::Missing("data"))?.signals;
                let signals = read(signals, || "data.signals".into())?
                    .ok_or(EventError::Missing("data.signals"))?;
                if signals.len() > MAX_SIGNALS {
                    return Err(EventError::TooManySignals(signals.len()));
                }
                let signals = signals
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| parse_signal(i, s))
                    .collect::<Result<_, _>>()?;
                EventKind::VehicleState { vehicle, signals }
            }
            "VEHICLE_ERROR" => {
                let vehicle = need_vehicle()?;
                let errors = data.ok_or(EventError::Missing("data"))?.errors;
                let errors = read(errors, || "data.errors".into())?
                    .ok_or(EventError::Missing("data.errors"))?;
                let errors = errors
                    .into_iter()
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

    /// The parse as it was before [`wire`]: the whole body read as a `serde_json::Value` tree, kept
    /// to hold [`Event::parse`] equal to it.
    mod reference {
        use super::super::*;

        pub(super) fn parse(body: &[u8]) -> Result<Event, EventError> {
            let root = whole_object(body)?;
            if is_legacy_shape(&root)? {
                return Event::from_legacy(&root, body);
            }
            from_object(&root)
        }

        /// The legacy v2 shape: `eventName` without `eventType`, or a top-level `version` "2…".
        fn is_legacy_shape(root: &Map<String, Value>) -> Result<bool, EventError> {
            let named = str_field(root, "eventName", "eventName")?.is_some()
                && matches!(root.get("eventType"), None | Some(Value::Null));
            let v2 = root
                .get("version")
                .and_then(Value::as_str)
                .is_some_and(|v| v.starts_with('2'));
            Ok(named || v2)
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

        fn from_object(root: &Map<String, Value>) -> Result<Event, EventError> {
            let event_type = str_field(root, "eventType", "eventType")?
                .ok_or(EventError::Missing("eventType"))?
                .to_owned();
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
                source: match meta_str("source").as_deref() {
                    Some(crate::smartcar_api::POLL_SOURCE) => EventSource::Poll,
                    _ => EventSource::Webhook,
                },
                user_id: data
                    .and_then(|d| d.get("user"))
                    .and_then(Value::as_object)
                    .and_then(|u| u.get("id"))
                    .and_then(Value::as_str)
                    .filter(|u| {
                        !u.is_empty() && u.len() <= MAX_ID_LEN && !u.chars().any(char::is_control)
                    })
                    .map(str::to_owned),
            };
            let need_vehicle = || {
                vehicle_id
                    .clone()
                    .ok_or(EventError::Missing("vehicleId or data.vehicle.id"))
            };
            let kind = match event_type.as_str() {
                "VERIFY" => EventKind::Verify,
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
                        .map(|(i, e)| parse_error_item(i, e.clone()))
                        .collect::<Result<_, _>>()?;
                    EventKind::VehicleError { vehicle, errors }
                }
                _ => EventKind::Unknown,
            };
            Ok(Event { envelope, kind })
        }
    }

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
        // An unknown legacy name without `vehicles` is read as one vehicle; a top-level
        // `eventId`, when a legacy body has one, is the key.
        let legacy = br#"{"version":"2.0","eventId":"e2","eventName":"schedule","payload":{"vehicleId":"v"}}"#;
        let e = Event::parse(legacy);
        let Ok(Event {
            envelope,
            kind:
                EventKind::Legacy(LegacyEvent {
                    event_name,
                    vehicles,
                }),
        }) = e
        else {
            panic!("unexpected {e:?}");
        };
        assert_eq!(event_name, "schedule");
        assert_eq!(vehicles.len(), 1);
        assert_eq!(vehicles[0].vehicle.as_str(), "v");
        assert_eq!(envelope.event_id.as_str(), "e2");
        assert_eq!(envelope.event_type, "SCHEDULE");
    }

    /// The SMARTCAR.md §4 scheduled body, with a second vehicle.
    const SCHEDULED: &[u8] = br#"{"version":"2.0","webhookId":"wh-1","eventName":"scheduled","mode":"live","payload":{"vehicles":[{"vehicleId":"car-a","requestId":"r1","data":[{"path":"/odometer","code":200,"body":{"distance":1234.5},"headers":{"sc-data-age":"2023-01-02T03:04:05.000Z","sc-unit-system":"metric"}},{"path":"/battery","code":409,"body":{"type":"VEHICLE_STATE","code":"ASLEEP","statusCode":409,"description":"The vehicle is asleep."}}]},{"vehicleId":"car-b","requestId":"r2","data":[{"path":"/odometer","code":200,"body":{"distance":99.0},"headers":{"sc-data-age":1672628645}}]}]}}"#;

    /// The SMARTCAR.md §4 dynamic body: no event id, no request id.
    const DYNAMIC: &[u8] = br#"{"version":"2.0","webhookId":"wh-1","eventName":"dynamic","mode":"live","payload":{"vehicles":[{"vehicleId":"car-a","data":[{"path":"/odometer","code":200,"body":{"distance":1234.5},"headers":{"sc-data-age":"2023-01-02T03:04:05.000Z","sc-unit-system":"metric"}}]}]}}"#;

    fn legacy(body: &[u8]) -> (Envelope, LegacyEvent) {
        match Event::parse(body) {
            Ok(Event {
                envelope,
                kind: EventKind::Legacy(l),
            }) => (envelope, l),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn legacy_event_based_takes_id_vehicle_type_and_time_from_payload() {
        let body = br#"{"version":"2.0","webhookId":"wh-1","eventName":"eventBased","mode":"test","payload":{"eventId":"ev-1","vehicleId":"car-a","eventType":"CHARGING_COMPLETED","eventTime":"2023-01-02T03:04:05.000Z"}}"#;
        let (envelope, event) = legacy(body);
        assert_eq!(envelope.event_id.as_str(), "ev-1");
        assert_eq!(envelope.event_type, "EVENTBASED");
        assert_eq!(
            envelope.vehicle_id.as_ref().map(VehicleId::as_str),
            Some("car-a")
        );
        assert_eq!(envelope.mode.as_deref(), Some("TEST"));
        assert_eq!(envelope.version.as_deref(), Some("2.0"));
        assert_eq!(envelope.delivered_at, None);
        assert_eq!(event.event_name, "eventBased");
        let [v] = event.vehicles.as_slice() else {
            panic!("expected one vehicle: {event:?}");
        };
        assert_eq!(v.vehicle.as_str(), "car-a");
        assert_eq!(v.event_type.as_deref(), Some("CHARGING_COMPLETED"));
        assert_eq!(v.event_time.map(EpochMillis::as_i64), Some(1672628645000));
        assert!(v.readings.is_empty());
    }

    #[test]
    fn legacy_scheduled_lists_every_vehicle_keyed_by_request_ids() {
        let (envelope, event) = legacy(SCHEDULED);
        assert_eq!(envelope.event_id.as_str(), "v2-request:r1,r2");
        assert_eq!(envelope.event_type, "SCHEDULED");
        assert_eq!(
            envelope.vehicle_id.as_ref().map(VehicleId::as_str),
            Some("car-a")
        );
        assert_eq!(envelope.mode.as_deref(), Some("LIVE"));
        let [a, b] = event.vehicles.as_slice() else {
            panic!("expected two vehicles: {event:?}");
        };
        assert_eq!(a.vehicle.as_str(), "car-a");
        assert_eq!(a.request_id.as_deref(), Some("r1"));
        assert_eq!(b.vehicle.as_str(), "car-b");
        let [odometer, battery] = a.readings.as_slice() else {
            panic!("expected two readings: {a:?}");
        };
        assert_eq!(odometer.path, "/odometer");
        assert!(odometer.is_success());
        assert_eq!(odometer.body["distance"], 1234.5);
        assert_eq!(
            odometer.data_age.map(EpochMillis::as_i64),
            Some(1672628645000)
        );
        assert_eq!(odometer.unit_system.as_deref(), Some("metric"));
        assert_eq!(battery.code, 409);
        assert!(!battery.is_success());
        assert_eq!(battery.body["code"], "ASLEEP");
        assert_eq!(battery.data_age, None);
        // Epoch seconds are accepted too.
        assert_eq!(
            b.readings[0].data_age.map(EpochMillis::as_i64),
            Some(1672628645000)
        );
    }

    #[test]
    fn legacy_dynamic_without_request_ids_is_keyed_by_body_hash() {
        let (envelope, event) = legacy(DYNAMIC);
        assert_eq!(
            envelope.event_id.as_str(),
            "sha256:680f04fa5160e334bee1613b4172538f835ee269785732576aa7637127d29904"
        );
        assert_eq!(event.vehicles[0].readings.len(), 1);
        // The same bytes always give the same id; other bytes (a retry re-serialised with a
        // space, or another vehicle) give another.
        assert_eq!(legacy(DYNAMIC).0.event_id, envelope.event_id);
        let spaced = String::from_utf8_lossy(DYNAMIC).replacen(',', ", ", 1);
        assert_ne!(legacy(spaced.as_bytes()).0.event_id, envelope.event_id);
        let other = String::from_utf8_lossy(DYNAMIC).replace("car-a", "car-b");
        assert_ne!(legacy(other.as_bytes()).0.event_id, envelope.event_id);
    }

    #[test]
    fn legacy_request_key_falls_back_to_hash_when_any_request_id_is_missing_or_too_long() {
        let one_missing = String::from_utf8_lossy(SCHEDULED).replace(r#","requestId":"r2""#, "");
        let (envelope, _) = legacy(one_missing.as_bytes());
        assert!(envelope.event_id.as_str().starts_with("sha256:"));
        let long = "r".repeat(MAX_ID_LEN);
        let too_long =
            String::from_utf8_lossy(SCHEDULED).replace(r#""r1""#, &format!("\"{long}\""));
        let (envelope, _) = legacy(too_long.as_bytes());
        assert!(envelope.event_id.as_str().starts_with("sha256:"));
    }

    #[test]
    fn legacy_readings_without_path_or_status_are_skipped() {
        let body = br#"{"version":"2.0","eventName":"dynamic","payload":{"vehicles":[{"vehicleId":"v","data":[{"code":200,"body":{}},{"path":"/fuel"},{"path":"/location","body":{"latitude":1.5}},{"path":"/odometer","code":"500","body":null},7]}]}}"#;
        let (_, event) = legacy(body);
        let readings = &event.vehicles[0].readings;
        assert_eq!(readings.len(), 2);
        assert_eq!(
            (readings[0].path.as_str(), readings[0].code),
            ("/location", 200)
        );
        assert_eq!(
            (readings[1].path.as_str(), readings[1].code),
            ("/odometer", 500)
        );
        assert_eq!(readings[1].body, Value::Null);
    }

    #[test]
    fn legacy_readings_count_against_max_signals() {
        let reading = r#"{"path":"/odometer","code":200,"body":{}}"#;
        let data = vec![reading; MAX_SIGNALS / 2 + 1].join(",");
        let body = format!(
            r#"{{"version":"2.0","eventName":"scheduled","payload":{{"vehicles":[{{"vehicleId":"a","data":[{data}]}},{{"vehicleId":"b","data":[{data}]}}]}}}}"#
        );
        assert_eq!(
            Event::parse(body.as_bytes()).err(),
            Some(EventError::TooManySignals(MAX_SIGNALS + 2))
        );
    }

    #[test]
    fn legacy_verify_without_event_id_is_still_verify() {
        let body = br#"{"version":"2.0","eventName":"verify","payload":{"challenge":"xyz"}}"#;
        let e = Event::parse(body);
        let Ok(Event {
            envelope,
            kind: EventKind::Verify,
        }) = e
        else {
            panic!("unexpected {e:?}");
        };
        assert_eq!(envelope.event_type, "VERIFY");
        assert!(envelope.event_id.as_str().starts_with("sha256:"));
        assert_eq!(envelope.vehicle_id, None);
    }

    #[test]
    fn legacy_without_vehicle_names_the_missing_field() {
        let cases: [(&[u8], EventError); 6] = [
            (
                br#"{"version":"2.0","eventName":"eventBased","payload":{"eventId":"e","eventType":"CHARGING_COMPLETED"}}"#,
                EventError::Missing("payload.vehicleId"),
            ),
            (
                br#"{"version":"2.0","eventName":"scheduled","payload":{}}"#,
                EventError::Missing("payload.vehicles"),
            ),
            (
                br#"{"version":"2.0","eventName":"dynamic","payload":{"vehicles":[]}}"#,
                EventError::Missing("payload.vehicles[0]"),
            ),
            (
                br#"{"version":"2.0","eventName":"scheduled","payload":{"vehicles":[{"vehicleId":"a"},{"requestId":"r2"}]}}"#,
                EventError::Missing("payload.vehicles[].vehicleId"),
            ),
            (
                br#"{"version":"2.0","eventName":"scheduled","payload":{"vehicles":[{"vehicleId":"a"},5]}}"#,
                EventError::WrongType {
                    field: "payload.vehicles[1]".into(),
                    expected: "an object",
                },
            ),
            (
                br#"{"version":"2.0","eventName":"dynamic","payload":{"vehicles":[{"vehicleId":""}]}}"#,
                EventError::InvalidId {
                    field: "payload.vehicles[0].vehicleId".into(),
                    source: IdError::Empty,
                },
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                Event::parse(body).err(),
                Some(want),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
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

    /// The two parses agree. Where both find the body is not JSON, serde_json's message may
    /// differ: it names what it was reading ("an object" or "a value"), and in a value the parse
    /// does not read, invalid UTF-8 is found only at the string's end.
    fn same(body: &[u8]) {
        let at = |r: Result<Event, EventError>| match r {
            Err(EventError::NotJson(_)) => Err(EventError::NotJson(String::new())),
            other => other,
        };
        assert_eq!(
            at(Event::parse(body)),
            at(reference::parse(body)),
            "{}",
            String::from_utf8_lossy(body)
        );
    }

    /// Paths the parse reads, down to the first signal's and the first error's fields.
    const EVENT_PATHS: &[&[&str]] = &[
        &["eventId"],
        &["eventType"],
        &["eventName"],
        &["version"],
        &["vehicleId"],
        &["data"],
        &["data", "vehicle"],
        &["data", "vehicle", "id"],
        &["data", "user"],
        &["data", "user", "id"],
        &["data", "signals"],
        &["data", "signals", "0"],
        &["data", "signals", "0", "code"],
        &["data", "signals", "0", "group"],
        &["data", "signals", "0", "name"],
        &["data", "signals", "0", "status"],
        &["data", "signals", "0", "status", "value"],
        &["data", "signals", "0", "status", "error"],
        &["data", "signals", "0", "status", "error", "type"],
        &["data", "signals", "0", "status", "error", "code"],
        &["data", "signals", "0", "meta"],
        &["data", "signals", "0", "meta", "oemUpdatedAt"],
        &["data", "signals", "0", "meta", "fetchedAt"],
        &["data", "signals", "0", "meta", "retrievedAt"],
        &["data", "signals", "0", "body"],
        &["data", "signals", "1"],
        &["data", "errors"],
        &["data", "errors", "0"],
        &["meta"],
        &["meta", "deliveryId"],
        &["meta", "deliveredAt"],
        &["meta", "mode"],
        &["meta", "version"],
        &["meta", "source"],
        &["payload"],
    ];

    /// The shared field variants and the values signals are read for.
    fn event_variants() -> Vec<Option<Value>> {
        use serde_json::json;
        let mut out = crate::testkit::variants();
        out.extend(
            [
                json!("VEHICLE_STATE"),
                json!("VEHICLE_ERROR"),
                json!("VERIFY"),
                json!("SUCCESS"),
                json!("ERROR"),
                json!("poll"),
                json!("Battery.StateOfCharge"),
                json!("tractionbattery-stateofcharge"),
                json!("2.0"),
                json!(1_764_000_000_000_i64),
                json!(1_764_000_000),
                json!("2025-11-20T10:00:00Z"),
                json!({"value": "ERROR", "error": {"type": "COMPATIBILITY", "code": "VEHICLE_NOT_CAPABLE"}}),
                json!({"value": "SUCCESS", "error": 5}),
                json!({"code": "odometer-traveleddistance", "body": {"value": 1}}),
                json!({"group": "Odometer", "name": "TraveledDistance", "status": {"value": "ERROR", "error": []}}),
                json!({"oemUpdatedAt": "2025-11-20T10:00:00Z", "retrievedAt": 1_764_000_000_000_i64}),
                json!([{"type": "CONNECTED_VEHICLE", "state": "RESOLVED", "signals": ["Battery.Range", {"code": "x-y"}]}]),
            ]
            .map(Some),
        );
        out
    }

    #[test]
    fn parse_equals_a_full_value_parse_on_every_protocol_shape() {
        let checked =
            crate::testkit::each_shape_with_each_field_set(EVENT_PATHS, &event_variants(), same);
        assert!(checked > 2_000, "{checked}");
    }

    /// Protocol shapes with one to three of the read fields set to random values (or removed),
    /// nested values built from the keys the parse reads; seeded so a failure reproduces.
    #[test]
    fn parse_equals_a_full_value_parse_on_random_bodies() {
        use rand::{Rng, SeedableRng};
        use serde_json::json;
        const KEYS: &[&str] = &[
            "code",
            "group",
            "name",
            "status",
            "value",
            "error",
            "type",
            "meta",
            "body",
            "id",
            "oemUpdatedAt",
            "retrievedAt",
            "signals",
            "state",
            "x",
        ];
        fn gen(rng: &mut rand::rngs::StdRng, depth: u32) -> Value {
            match rng.random_range(0..if depth == 0 { 8 } else { 12 }) {
                0 => Value::Null,
                1 => json!(rng.random_bool(0.5)),
                2 => json!(rng.random_range(-1000..1000)),
                3 => json!(rng.random::<f64>() * 1e6),
                4 => json!(""),
                5 => json!(["SUCCESS", "ERROR", "A.B", "a-b", "é\"\\"][rng.random_range(0..5)]),
                6 => json!(1_764_000_000_000_i64 + rng.random_range(0..1000)),
                7 => json!(format!("s{}", rng.random_range(0..100))),
                8..=10 => {
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
        let shapes = crate::testkit::protocol_shapes();
        let mut rng = rand::rngs::StdRng::seed_from_u64(29);
        for _ in 0..20_000 {
            let mut v = shapes[rng.random_range(0..shapes.len())].clone();
            for _ in 0..rng.random_range(1..4) {
                let path = EVENT_PATHS[rng.random_range(0..EVENT_PATHS.len())];
                let to = rng.random_bool(0.9).then(|| gen(&mut rng, 3));
                crate::testkit::set_path(&mut v, path, to);
            }
            same(&serde_json::to_vec(&v).unwrap_or_default());
        }
    }

    /// Malformed JSON fails both alike, wherever it is.
    #[test]
    fn parse_equals_a_full_value_parse_on_cut_and_corrupted_bodies() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        for shape in crate::testkit::protocol_shapes() {
            let body = serde_json::to_vec(&shape).unwrap_or_default();
            for cut in 0..body.len() {
                same(&body[..cut]);
            }
            for _ in 0..500 {
                let mut bad = body.clone();
                let at = rng.random_range(0..bad.len());
                bad[at] = *b"\"{}[]:,\\ a0"
                    .get(rng.random_range(0..11))
                    .unwrap_or(&b'x');
                // Corruption inside a value the parse does not read may leave it valid JSON
                // that only the full parse rejects (see the next test); otherwise they agree.
                if Event::parse(&bad).is_ok()
                    && matches!(reference::parse(&bad), Err(EventError::NotJson(_)))
                {
                    continue;
                }
                same(&bad);
            }
        }
    }

    /// Where the two differ, on purpose: a value the parse never reads is checked for syntax
    /// only, so the event is applied where the full parse dead-lettered it.
    #[test]
    fn bodies_only_the_full_value_parse_rejects() {
        let ok_signal = r#"{"code":"odometer-traveleddistance","body":{"value":1}}"#;
        let event = |extra: &str| {
            format!(
                r#"{{"eventId":"e","eventType":"VEHICLE_STATE","vehicleId":"v","data":{{"signals":[{ok_signal},{{"code":"a-b","x":{extra}}}]}}}}"#
            )
        };
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for unread in ["1e400", deep.as_str()] {
            let body = event(unread);
            assert!(matches!(
                reference::parse(body.as_bytes()),
                Err(EventError::NotJson(_))
            ));
            let parsed = Event::parse(body.as_bytes()).unwrap_or_else(|e| panic!("{e}: {body}"));
            let EventKind::VehicleState { signals, .. } = parsed.kind else {
                panic!("{body}");
            };
            assert_eq!(signals.len(), 2);
        }
        // A body that is not an object is read whole: nesting past the limit is not JSON.
        let deep_array = deep.as_bytes();
        assert!(matches!(
            Event::parse(deep_array),
            Err(EventError::NotJson(_))
        ));
        same(deep_array);
        same(b"[1]");
        // Where the parse reads, it rejects the same: in a body, in a code.
        for read in [
            event("1").replace(r#"{"value":1}"#, r#"{"value":1e400}"#),
            event("1").replace(r#""a-b""#, r#""a\x""#),
        ] {
            assert!(
                matches!(Event::parse(read.as_bytes()), Err(EventError::NotJson(_))),
                "{read}"
            );
        }
    }
}
