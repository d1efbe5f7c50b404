//! Realistic Smartcar deliveries from a seed: VEHICLE_STATE in both payload shapes with signals from
//! many groups, VEHICLE_ERROR of every kind (several items, string or object signal lists), legacy
//! v2 bodies in all three forms, VERIFY challenges, and the fault mixes (duplicates, out-of-order,
//! invalid signatures, partial failures, near-50 KB bodies, missing optional fields, unknown types,
//! lagging car clocks, signal time 0, `deliveredAt` as epoch ms, epoch seconds or ISO-8601).
//!
//! Freshness is never ambiguous: per vehicle and signal no two values share a time, and no two
//! deliveries of one vehicle share a `deliveredAt` as the processor reads it (epoch seconds are
//! truncated, so only every eighth event may use them; see [`DeliveredFormat::Seconds`]). Ties
//! would let the store and the truth pick different winners.
//!
//! Every event is kept as a [`SimEvent`] — what the simulator *meant* — so the ground truth is
//! computed from the simulator's own model, independently of the code under test.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Fault ratios, each 0.0–1.0.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Faults {
    pub duplicates: f64,
    pub out_of_order: f64,
    pub invalid_signatures: f64,
    pub partial_failures: f64,
    pub large_bodies: f64,
    pub missing_optional: f64,
    pub unknown_types: f64,
    pub errors: f64,
    /// Share of signal values whose car clock lags delivery by a varying 1–90 s (normal in real
    /// traffic: `oemUpdatedAt` is older than `deliveredAt`).
    #[serde(default)]
    pub clock_lag: f64,
    /// 1.0: a retry carries a refreshed `deliveredAt` (Smartcar's real behaviour, 25/50/100 s
    /// later); 0.0: retries keep the first attempt's time. Campaigns that kill the broker use 0.0:
    /// a copy answered 503 may still have been persisted, and the truth cannot know which copy
    /// then owns the event.
    #[serde(default)]
    pub retry_refresh: f64,
    /// Share of duplicates sent concurrently with the first delivery (the same delivery twice at
    /// once) instead of as a later retry of an acknowledged event.
    #[serde(default)]
    pub concurrent_duplicates: f64,
    /// Share of responses-page-shape events whose trigger names its signal as a `"Group.Name"`
    /// string (live traffic) instead of an object.
    #[serde(default)]
    pub string_triggers: f64,
    /// Share of VEHICLE_ERROR events whose items list signals as `"Group.Name"` strings.
    #[serde(default)]
    pub string_error_signals: f64,
    /// Share of signal values sent with `oemUpdatedAt: 0` ("unknown"): the fetch time orders them.
    #[serde(default)]
    pub zero_time: f64,
    /// Share of events whose `deliveredAt` is not epoch ms: half epoch seconds (only on every
    /// eighth event, see [`DeliveredFormat::Seconds`]), half ISO-8601 strings.
    #[serde(default)]
    pub delivered_formats: f64,
    /// Share of VEHICLE_ERROR events with two or three items.
    #[serde(default)]
    pub multi_errors: f64,
    /// Share of events sent as legacy v2 bodies (eventBased, dynamic, scheduled in turn).
    #[serde(default)]
    pub legacy: f64,
    /// Share of events that are VERIFY challenges (current and legacy form in turn): answered with
    /// the HMAC of the challenge, never stored.
    #[serde(default)]
    pub verify: f64,
}

impl Faults {
    /// Every fault on, at modest ratios.
    pub fn all() -> Self {
        Self {
            duplicates: 0.15,
            out_of_order: 0.15,
            invalid_signatures: 0.05,
            partial_failures: 0.2,
            large_bodies: 0.02,
            missing_optional: 0.2,
            unknown_types: 0.03,
            errors: 0.12,
            clock_lag: 0.6,
            retry_refresh: 1.0,
            concurrent_duplicates: 0.5,
            string_triggers: 0.5,
            string_error_signals: 0.5,
            zero_time: 0.05,
            delivered_formats: 0.2,
            multi_errors: 0.3,
            legacy: 0.06,
            verify: 0.02,
        }
    }
}

/// How much later than the first attempt Smartcar's retry `attempt` (1–3) is delivered, when
/// retries refresh `deliveredAt`: 25, 50 and 100 s apart. The sub-second parts differ so no two
/// deliveries of one vehicle ever share a millisecond (ticks are whole seconds).
pub const RETRY_REFRESH_MS: [i64; 3] = [25_137, 75_271, 175_409];

/// `deliveredAt` of a later, separate delivery of an acknowledged event (a duplicate).
pub const DUPLICATE_REFRESH_MS: i64 = 5_311;

/// How a refused delivery's signature is wrong (every variant must get 401 on every attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BadSignature {
    /// Signed with a token the receiver does not know.
    WrongToken,
    /// No `SC-Signature` header at all.
    Missing,
    /// A hex string of the wrong length (a truncated header).
    WrongLength,
    /// The right MAC in upper-case hex (Smartcar sends lower-case; refused).
    UpperCase,
    /// The right token over other bytes: the body re-serialised before signing (the SDK bug).
    OtherBody,
}

impl BadSignature {
    const ALL: [Self; 5] = [
        Self::WrongToken,
        Self::Missing,
        Self::WrongLength,
        Self::UpperCase,
        Self::OtherBody,
    ];
}

/// How `meta.deliveredAt` is written (SMARTCAR.md §4: usually epoch ms, sometimes epoch seconds or
/// an ISO-8601 string).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DeliveredFormat {
    #[default]
    Millis,
    /// Whole seconds: the processor sees the time truncated. Only events whose index is a multiple
    /// of 8 use it, and other formats never fall on a whole second ([`SUB_SECOND_MS`]), so no two
    /// deliveries of one vehicle read the same: Smartcar's retry offsets truncate to 25, 75 and 175
    /// s, and no difference of two of {0, 25, 75, 175} is a non-zero multiple of 8.
    Seconds,
    /// RFC 3339 with milliseconds, e.g. `2025-11-24T16:00:00.123Z`.
    Iso,
}

/// Sub-second part of every `deliveredAt` that is not in epoch seconds (see
/// [`DeliveredFormat::Seconds`]).
pub const SUB_SECOND_MS: i64 = 123;

/// Prefix of a legacy body's event id built from its vehicles' `requestId`s (the processor's
/// documented rule for v2 bodies without an `eventId`).
pub const LEGACY_REQUEST_ID_PREFIX: &str = "v2-request:";

/// Prefix of a legacy body's event id built from the SHA-256 of its bytes (no `eventId`, no
/// `requestId`: the `dynamic` form).
pub const LEGACY_BODY_HASH_PREFIX: &str = "sha256:";

/// One signal value the simulator sent.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SimSignal {
    pub code: String,
    /// `None`: the signal failed with `error` (type, code).
    pub body: Option<Value>,
    pub error: Option<(String, Option<String>)>,
    /// The car time that orders the value: `oemUpdatedAt`, or with `zero_time` the fetch time.
    pub oem: i64,
    /// Sent as `oemUpdatedAt: 0` ("unknown"), with `oem` as the fetch time.
    #[serde(default)]
    pub zero_time: bool,
}

/// One VEHICLE_ERROR item.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SimError {
    pub error_type: String,
    pub code: Option<String>,
    pub resolved: bool,
    pub reauthenticate: bool,
    pub signals: Vec<String>,
}

impl SimError {
    /// The simulator's own statement of which errors need the user to reconnect.
    pub fn needs_reconnect(&self) -> bool {
        self.error_type == "PERMISSION" || self.reauthenticate
    }

    /// Identity of the error per vehicle.
    pub fn key(&self) -> String {
        match &self.code {
            Some(c) => format!("{}:{c}", self.error_type),
            None => self.error_type.clone(),
        }
    }
}

/// The three legacy v2 data forms (SMARTCAR.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LegacyForm {
    /// One vehicle, one event (`payload.eventId`), no readings.
    EventBased,
    /// Readings, no event id and no request id: identified by the hash of the body.
    Dynamic,
    /// Readings of one or more vehicles, each with a `requestId`.
    Scheduled,
}

/// One vehicle of a legacy body.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SimLegacyVehicle {
    pub vehicle: String,
    pub request_id: Option<String>,
    /// `/odometer` answered 200 with this distance, read by the car at this time (ms).
    pub odometer: Option<(f64, i64)>,
    /// `sc-data-age` in epoch seconds (the time is whole seconds then) instead of ISO-8601.
    pub age_in_seconds: bool,
    /// `/battery` answered 409 `VEHICLE_STATE`/`ASLEEP`.
    pub battery_asleep: bool,
}

/// What an event is.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum SimKind {
    State(Vec<SimSignal>),
    Errors(Vec<SimError>),
    Unknown,
    /// A legacy v2 body; its first vehicle is the event's.
    Legacy(LegacyForm, Vec<SimLegacyVehicle>),
    /// A VERIFY challenge (`legacy`: the v2 `eventName: "verify"` form), signed with the token.
    Verify {
        legacy: bool,
    },
}

/// One event as the simulator meant it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SimEvent {
    pub event_id: String,
    pub vehicle: String,
    /// The moment the event describes (ms): the car's time of its readings before any clock lag.
    pub t: i64,
    /// `deliveredAt` of the first delivery: the simulator's tick when it is sent.
    #[serde(default)]
    pub delivered: i64,
    /// How `deliveredAt` is written.
    #[serde(default)]
    pub delivered_format: DeliveredFormat,
    /// Whether retries carry a refreshed `deliveredAt` (see [`Faults::retry_refresh`]).
    #[serde(default)]
    pub refresh: bool,
    /// Whether the duplicate is sent concurrently with the first delivery (same bytes).
    #[serde(default)]
    pub concurrent_duplicate: bool,
    pub kind: SimKind,
    /// Signed wrongly (see `bad_signature_kind`): must be rejected on every attempt.
    pub bad_signature: bool,
    /// How the signature is wrong, when it is.
    #[serde(default)]
    pub bad_signature_kind: Option<BadSignature>,
    /// Delivered a second time with a new deliveryId (a Smartcar retry of an acknowledged event).
    pub duplicate: bool,
    /// Payload shape: `true` = responses-page shape (no top-level vehicleId, top-level triggers).
    pub page_shape: bool,
    /// The top-level trigger names its signal as a `"Group.Name"` string.
    #[serde(default)]
    pub string_trigger: bool,
    /// Error items list their signals as `"Group.Name"` strings.
    #[serde(default)]
    pub string_error_signals: bool,
    pub sparse: bool,
    pub large: bool,
}

impl SimEvent {
    /// The Kafka key its records must carry: the vehicle (a legacy body's first vehicle); None
    /// for VERIFY, which is answered and never stored.
    pub fn key(&self) -> Option<&str> {
        match &self.kind {
            SimKind::Verify { .. } => None,
            SimKind::Legacy(_, vehicles) => vehicles.first().map(|v| v.vehicle.as_str()),
            _ => Some(&self.vehicle),
        }
    }

    /// The id the system knows the event by: `eventId`, or for a legacy body without one its
    /// request ids or the SHA-256 of its bytes.
    pub fn stored_id(&self) -> String {
        match &self.kind {
            SimKind::Legacy(LegacyForm::Scheduled, vehicles) => {
                let ids: Vec<&str> = vehicles
                    .iter()
                    .filter_map(|v| v.request_id.as_deref())
                    .collect();
                format!("{LEGACY_REQUEST_ID_PREFIX}{}", ids.join(","))
            }
            SimKind::Legacy(LegacyForm::Dynamic, _) => {
                use sha2::{Digest, Sha256};
                format!(
                    "{LEGACY_BODY_HASH_PREFIX}{}",
                    hex::encode(Sha256::digest(body(self, 0)))
                )
            }
            _ => self.event_id.clone(),
        }
    }
}

/// The catalogue: `(Group, Name)` as Smartcar spells them; the code is both lower-cased and
/// joined by `-` (SMARTCAR.md §5).
const CATALOGUE: &[(&str, &str)] = &[
    ("TractionBattery", "StateOfCharge"),
    ("TractionBattery", "Range"),
    ("Charge", "IsCharging"),
    ("Charge", "Voltage"),
    ("Odometer", "TraveledDistance"),
    ("Location", "PreciseLocation"),
    ("Closure", "Doors"),
    ("Transmission", "GearState"),
    ("Motion", "CurrentSpeed"),
    ("Climate", "CabinTemperature"),
    ("LowVoltageBattery", "StateOfCharge"),
    ("Diagnostics", "DTCList"),
];

fn code_of(group: &str, name: &str) -> String {
    format!("{}-{}", group.to_lowercase(), name.to_lowercase())
}

/// `(Group, Name)` of a catalogue code.
fn display(code: &str) -> (&'static str, &'static str) {
    CATALOGUE
        .iter()
        .find(|(g, n)| code_of(g, n) == code)
        .copied()
        .unwrap_or(("Unknown", "Unknown"))
}

fn body_for(code: &str, rng: &mut StdRng, large: bool) -> Value {
    match code {
        "tractionbattery-stateofcharge" | "lowvoltagebattery-stateofcharge" => {
            json!({"unit": "percent", "value": rng.random_range(0..=100)})
        }
        "tractionbattery-range" => {
            json!({"unit": "kilometers", "value": rng.random_range(0.0..600.0_f64).round()})
        }
        "charge-ischarging" => json!({"value": rng.random_bool(0.5)}),
        "charge-voltage" => json!({"unit": "volts", "value": rng.random_range(110..=400)}),
        "odometer-traveleddistance" => {
            json!({"unit": "kilometers", "value": rng.random_range(0..300_000)})
        }
        "location-preciselocation" => json!({
            "latitude": f64::from(rng.random_range(-90_000..90_000)) / 1000.0,
            "longitude": f64::from(rng.random_range(-180_000..180_000)) / 1000.0,
            "heading": rng.random_range(0..360), "direction": "N"}),
        "closure-doors" => json!({"values": [
            {"row": 0, "column": 0, "isOpen": rng.random_bool(0.1), "isLocked": rng.random_bool(0.8)},
            {"row": 0, "column": 1, "isOpen": false, "isLocked": true}], "rowCount": 2, "columnCount": 2}),
        "transmission-gearstate" => {
            let gear = ["PARK", "DRIVE", "REVERSE", "NEUTRAL"][rng.random_range(0..4)];
            json!({"value": gear})
        }
        "motion-currentspeed" => json!({"unit": "kph", "value": rng.random_range(0..180)}),
        "climate-cabintemperature" => {
            json!({"unit": "celsius", "value": rng.random_range(-20..45)})
        }
        _ => {
            let n = if large { 350 } else { rng.random_range(0..4) };
            let values: Vec<Value> = (0..n)
                .map(|i| json!({"code": format!("P{:04}", rng.random_range(0..9999)), "timestamp": format!("2025-11-{:02}T10:00:{:02}.000Z", 1 + i % 28, i % 60), "description": "Simulated diagnostic trouble code with a long description text"}))
                .collect();
            json!({"values": values})
        }
    }
}

/// Car times already given to a (vehicle, signal): a value never shares its time with another
/// value of the same cell, so "the freshest wins" has one answer.
#[derive(Default)]
struct CarTimes(std::collections::BTreeMap<(String, String), std::collections::BTreeSet<i64>>);

impl CarTimes {
    /// `want` (rounded down to a multiple of `step`), or the nearest earlier free time.
    fn take(&mut self, vehicle: &str, code: &str, want: i64, step: i64) -> i64 {
        let used = self
            .0
            .entry((vehicle.to_string(), code.to_string()))
            .or_default();
        let mut t = want - want.rem_euclid(step);
        while used.contains(&t) {
            t -= step;
        }
        used.insert(t);
        t
    }
}

/// Events of kinds in turn, so any run with a few of them covers every variant.
#[derive(Default)]
struct Turns {
    bad: usize,
    legacy: usize,
    verify: usize,
}

/// Generates `events_per_vehicle` events for each of `vehicles` vehicles.
pub fn generate(
    seed: u64,
    vehicles: usize,
    events_per_vehicle: usize,
    faults: Faults,
) -> Vec<SimEvent> {
    let mut rng = StdRng::seed_from_u64(seed);
    let base: i64 = 1_764_000_000_000;
    let mut out = Vec::new();
    let mut turns = Turns::default();
    let mut times = CarTimes::default();
    let name = |v: usize| format!("sim-{seed}-veh-{v:05}");
    for v in 0..vehicles {
        let vehicle = name(v);
        for i in 0..events_per_vehicle {
            // One second of simulated time per tick; events are unique in time per vehicle.
            let tick = base + (i as i64) * 1000;
            let mut t = tick;
            let out_of_order = i > 2 && rng.random_bool(faults.out_of_order);
            if out_of_order {
                // Describes the car at an earlier moment, but is delivered now.
                t = base + rng.random_range(0..(i as i64 - 1)) * 1000 + 500;
            }
            let event_id = format!("{vehicle}-ev-{i:05}");
            let sparse = rng.random_bool(faults.missing_optional);
            let kind = if rng.random_bool(faults.verify) {
                turns.verify += 1;
                SimKind::Verify {
                    legacy: turns.verify % 2 == 0,
                }
            } else if rng.random_bool(faults.legacy) {
                turns.legacy += 1;
                let form = [
                    LegacyForm::EventBased,
                    LegacyForm::Dynamic,
                    LegacyForm::Scheduled,
                ][(turns.legacy - 1) % 3];
                let mut members = vec![vehicle.clone()];
                if form == LegacyForm::Scheduled && vehicles > 1 {
                    members.push(name((v + 1) % vehicles));
                }
                let list = members
                    .into_iter()
                    .enumerate()
                    .map(|(k, member)| {
                        let readings = form != LegacyForm::EventBased;
                        let age_in_seconds = readings && rng.random_bool(0.5);
                        let step = if age_in_seconds { 1000 } else { 1 };
                        let lag = rng.random_range(0..30_000);
                        let odometer = readings.then(|| {
                            let at = times.take(&member, "v2-odometer", t - lag, step);
                            (f64::from(rng.random_range(0..600_000)) / 2.0, at)
                        });
                        SimLegacyVehicle {
                            request_id: (form == LegacyForm::Scheduled)
                                .then(|| format!("{event_id}-r{k}")),
                            vehicle: member,
                            odometer,
                            age_in_seconds,
                            battery_asleep: readings && rng.random_bool(0.5),
                        }
                    })
                    .collect();
                SimKind::Legacy(form, list)
            } else if rng.random_bool(faults.unknown_types) {
                SimKind::Unknown
            } else if rng.random_bool(faults.errors) {
                let n = if rng.random_bool(faults.multi_errors) {
                    rng.random_range(2..=3)
                } else {
                    1
                };
                let mut items: Vec<SimError> = Vec::new();
                while items.len() < n {
                    let x = random_error(&mut rng);
                    if !items.iter().any(|y| y.key() == x.key()) {
                        items.push(x);
                    }
                }
                SimKind::Errors(items)
            } else {
                let large = rng.random_bool(faults.large_bodies);
                let n = rng.random_range(3..=8);
                let mut codes: Vec<String> = CATALOGUE.iter().map(|(g, n)| code_of(g, n)).collect();
                for k in (1..codes.len()).rev() {
                    codes.swap(k, rng.random_range(0..=k));
                }
                let mut chosen: Vec<String> = codes.into_iter().take(n).collect();
                if large && !chosen.iter().any(|c| c == "diagnostics-dtclist") {
                    chosen.push("diagnostics-dtclist".into());
                }
                let partial = rng.random_bool(faults.partial_failures);
                let signals = chosen
                    .into_iter()
                    .enumerate()
                    .map(|(j, code)| {
                        if partial && j == 0 {
                            let (ty, c) = if rng.random_bool(0.5) {
                                ("UPSTREAM", Some("NO_RESPONSE"))
                            } else {
                                ("COMPATIBILITY", Some("VEHICLE_NOT_CAPABLE"))
                            };
                            SimSignal {
                                code,
                                body: None,
                                error: Some((ty.to_string(), c.map(str::to_string))),
                                oem: t,
                                zero_time: false,
                            }
                        } else {
                            // Time 0 needs a fetch time to fall back on: not in sparse bodies.
                            let zero_time = !sparse && rng.random_bool(faults.zero_time);
                            let lag = if rng.random_bool(faults.clock_lag) {
                                rng.random_range(1_000..90_000)
                            } else {
                                0
                            };
                            let oem = times.take(&vehicle, &code, t - lag, 1);
                            SimSignal {
                                body: Some(body_for(
                                    &code,
                                    &mut rng,
                                    large && code == "diagnostics-dtclist",
                                )),
                                code,
                                error: None,
                                oem,
                                zero_time,
                            }
                        }
                    })
                    .collect();
                SimKind::State(signals)
            };
            let verify = matches!(kind, SimKind::Verify { .. });
            let duplicate = rng.random_bool(faults.duplicates);
            // A VERIFY without a signature is a separate, rate-limited path; the mix signs them.
            let bad_signature = !verify && rng.random_bool(faults.invalid_signatures);
            // Variants in turn, so any run with five refused events covers all of them.
            let bad_signature_kind = bad_signature.then(|| {
                turns.bad += 1;
                BadSignature::ALL[(turns.bad - 1) % BadSignature::ALL.len()]
            });
            let delivered_format = if rng.random_bool(faults.delivered_formats) {
                if i % 8 == 0 && rng.random_bool(0.5) {
                    DeliveredFormat::Seconds
                } else {
                    DeliveredFormat::Iso
                }
            } else {
                DeliveredFormat::Millis
            };
            let page_shape = rng.random_bool(0.5);
            out.push(SimEvent {
                event_id,
                vehicle: vehicle.clone(),
                t,
                delivered: match delivered_format {
                    DeliveredFormat::Seconds => tick,
                    _ => tick + SUB_SECOND_MS,
                },
                delivered_format,
                refresh: rng.random_bool(faults.retry_refresh),
                concurrent_duplicate: duplicate && rng.random_bool(faults.concurrent_duplicates),
                large: matches!(&kind, SimKind::State(s) if s.iter().any(|x| x.code == "diagnostics-dtclist" && x.body.as_ref().is_some_and(|b| b["values"].as_array().is_some_and(|a| a.len() > 100)))),
                kind,
                bad_signature,
                bad_signature_kind,
                duplicate,
                page_shape,
                string_trigger: page_shape && rng.random_bool(faults.string_triggers),
                string_error_signals: rng.random_bool(faults.string_error_signals),
                sparse,
            });
        }
    }
    out
}

fn random_error(rng: &mut StdRng) -> SimError {
    let resolved = rng.random_bool(0.3);
    let (ty, code, reauth, signals): (&str, Option<&str>, bool, Vec<String>) =
        match rng.random_range(0..6) {
            0 => ("PERMISSION", None, false, vec![]),
            1 => (
                "CONNECTED_SERVICES_ACCOUNT",
                Some("AUTHENTICATION_FAILED"),
                true,
                vec![],
            ),
            2 => (
                "COMPATIBILITY",
                Some("VEHICLE_NOT_CAPABLE"),
                false,
                vec!["location-preciselocation".into(), "closure-doors".into()],
            ),
            3 => ("UPSTREAM", Some("NO_RESPONSE"), false, vec![]),
            4 => ("RATE_LIMIT", Some("VEHICLE"), false, vec![]),
            _ => ("VEHICLE_STATE", Some("ASLEEP"), false, vec![]),
        };
    SimError {
        error_type: ty.into(),
        code: code.map(str::to_string),
        resolved,
        reauthenticate: reauth,
        signals,
    }
}

/// `deliveredAt` of delivery `attempt` of `e` (ms): 0 is the first, 1–3 Smartcar's retries,
/// anything higher a later duplicate of an acknowledged event.
pub fn delivered_at(e: &SimEvent, attempt: u32) -> i64 {
    let first = if e.delivered == 0 { e.t } else { e.delivered };
    match (attempt, e.refresh) {
        (0, _) => first,
        (1..=3, true) => first + RETRY_REFRESH_MS[attempt as usize - 1],
        (_, true) => first + DUPLICATE_REFRESH_MS,
        (n, false) => first + i64::from(n),
    }
}

/// The delivery time the system can read from delivery `attempt` of `e`: [`delivered_at`] at the
/// precision it was written with (whole seconds for epoch seconds).
pub fn delivered_as_read(e: &SimEvent, attempt: u32) -> i64 {
    let t = delivered_at(e, attempt);
    match e.delivered_format {
        DeliveredFormat::Seconds => t - t.rem_euclid(1000),
        DeliveredFormat::Millis | DeliveredFormat::Iso => t,
    }
}

/// RFC 3339 in UTC with milliseconds, written from the calendar fields (not by the code under
/// test).
pub fn iso(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// The challenge a VERIFY event carries (short, `[A-Za-z0-9-]`, like Smartcar's).
pub fn challenge(e: &SimEvent) -> String {
    format!("{}-challenge", e.event_id)
}

/// A `"Group.Name"` string or a `{code, name, group}` object for a signal reference.
fn signal_ref(code: &str, as_string: bool) -> Value {
    let (group, name) = display(code);
    if as_string {
        json!(format!("{group}.{name}"))
    } else {
        json!({"code": code, "name": name, "group": group})
    }
}

/// A legacy v2 body: no `meta`, so every attempt sends the same bytes.
fn legacy_body(e: &SimEvent, form: LegacyForm, vehicles: &[SimLegacyVehicle]) -> Value {
    let mode = if e.sparse { "live" } else { "test" };
    let root = |name: &str, payload: Value| {
        json!({"version": "2.0", "webhookId": "5a8e5e38-1e12-4011-a36d-56f120053f9e",
            "eventName": name, "mode": mode, "payload": payload})
    };
    match form {
        LegacyForm::EventBased => root(
            "eventBased",
            json!({"eventId": e.event_id, "vehicleId": e.vehicle, "eventType": "CHARGING_COMPLETED",
                "eventTime": iso(e.t)}),
        ),
        LegacyForm::Dynamic | LegacyForm::Scheduled => {
            let list: Vec<Value> = vehicles
                .iter()
                .map(|v| {
                    let mut data = Vec::new();
                    if let Some((distance, at)) = v.odometer {
                        let age = if v.age_in_seconds {
                            json!(at / 1000)
                        } else {
                            json!(iso(at))
                        };
                        data.push(json!({"path": "/odometer", "code": 200, "body": {"distance": distance},
                            "headers": {"sc-data-age": age, "sc-unit-system": "metric"}}));
                    }
                    if v.battery_asleep {
                        data.push(json!({"path": "/battery", "code": 409, "body": {"type": "VEHICLE_STATE",
                            "code": "ASLEEP", "statusCode": 409, "description": "The vehicle is asleep."}}));
                    }
                    let mut entry = json!({"vehicleId": v.vehicle, "data": data});
                    if let Some(r) = &v.request_id {
                        entry["requestId"] = json!(r);
                    }
                    entry
                })
                .collect();
            let name = if form == LegacyForm::Dynamic {
                "dynamic"
            } else {
                "scheduled"
            };
            root(name, json!({"vehicles": list}))
        }
    }
}

/// The wire body of one delivery of `e` (attempt 0 is the first; later ones are retries or
/// duplicates with a new deliveryId and deliveredAt).
pub fn body(e: &SimEvent, attempt: u32) -> Vec<u8> {
    let delivered_at = delivered_at(e, attempt);
    let delivery_id = format!("{}-d{attempt}", e.event_id);
    let vehicle = json!({"id": e.vehicle, "make": "TESLA", "model": "Model 3", "year": 2020});
    let delivered_json = match e.delivered_format {
        DeliveredFormat::Millis => json!(delivered_at),
        DeliveredFormat::Seconds => json!(delivered_at / 1000),
        DeliveredFormat::Iso => json!(iso(delivered_at)),
    };
    let mut meta = json!({"version": "4.0", "deliveryId": delivery_id, "deliveredAt": delivered_json,
        "webhookId": "5a8e5e38-1e12-4011-a36d-56f120053f9e", "webhookName": "carhook sim", "mode": "TEST"});
    let mut root = match &e.kind {
        SimKind::Legacy(form, vehicles) => {
            return serde_json::to_vec(&legacy_body(e, *form, vehicles)).unwrap_or_default();
        }
        SimKind::Verify { legacy: true } => {
            return serde_json::to_vec(&json!({"version": "2.0", "eventName": "verify",
                "payload": {"challenge": challenge(e)}}))
            .unwrap_or_default();
        }
        SimKind::Verify { legacy: false } => {
            json!({"eventId": e.event_id, "eventType": "VERIFY", "data": {"challenge": challenge(e)}})
        }
        SimKind::Unknown => {
            json!({"eventId": e.event_id, "eventType": "VEHICLE_SOMETHING_NEW", "vehicleId": e.vehicle,
            "data": {"vehicle": vehicle, "whatever": {"x": 1}}})
        }
        SimKind::Errors(errs) => {
            let errors: Vec<Value> = errs
                .iter()
                .map(|x| {
                    let signals: Vec<Value> = x
                        .signals
                        .iter()
                        .map(|c| signal_ref(c, e.string_error_signals))
                        .collect();
                    json!({"type": x.error_type, "code": x.code, "state": if x.resolved { "RESOLVED" } else { "ERROR" },
                        "description": "simulated", "resolution": {"type": if x.reauthenticate { "REAUTHENTICATE" } else { "RETRY_LATER" }},
                        "signals": signals})
                })
                .collect();
            json!({"eventId": e.event_id, "eventType": "VEHICLE_ERROR", "vehicleId": e.vehicle,
                "data": {"user": {"id": "sim-user"}, "vehicle": vehicle, "errors": errors}})
        }
        SimKind::State(signals) => {
            let list: Vec<Value> = signals
                .iter()
                .map(|s| {
                    let (group, name) = display(&s.code);
                    match (&s.body, &s.error) {
                        (Some(b), _) => {
                            let fetched = if e.page_shape { "retrievedAt" } else { "fetchedAt" };
                            let m = if s.zero_time {
                                json!({"oemUpdatedAt": 0, fetched: s.oem})
                            } else if e.sparse {
                                json!({"oemUpdatedAt": s.oem})
                            } else {
                                json!({"oemUpdatedAt": s.oem, fetched: s.oem + 1500})
                            };
                            let mut sig = json!({"code": s.code, "name": name, "group": group, "body": b, "meta": m});
                            if e.page_shape {
                                sig["status"] = json!({"value": "SUCCESS"});
                            }
                            sig
                        }
                        (None, err) => {
                            let (ty, code) = err.clone().unwrap_or_default();
                            json!({"code": s.code, "name": name, "group": group, "status": {"value": "ERROR", "error": {"type": ty, "code": code}}})
                        }
                    }
                })
                .collect();
            let first = signals.first().map(|s| s.code.clone()).unwrap_or_default();
            if e.page_shape {
                json!({"eventId": e.event_id, "eventType": "VEHICLE_STATE",
                    "data": {"user": {"id": "sim-user"}, "vehicle": vehicle, "signals": list},
                    "triggers": [{"type": "SIGNAL_UPDATED", "signal": signal_ref(&first, e.string_trigger)}]})
            } else {
                json!({"eventId": e.event_id, "eventType": "VEHICLE_STATE", "vehicleId": e.vehicle,
                    "data": {"user": {"id": "sim-user"}, "vehicle": vehicle, "triggers": [signal_ref(&first, false)], "signals": list}})
            }
        }
    };
    if e.sparse {
        if let Some(m) = meta.as_object_mut() {
            for k in ["webhookId", "webhookName", "mode"] {
                m.remove(k);
            }
        }
    } else if let SimKind::State(s) = &e.kind {
        meta["signalCount"] = json!(s.len());
    }
    root["meta"] = meta;
    serde_json::to_vec(&root).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_events_and_bodies_parse_as_smartcar() {
        let a = generate(7, 3, 40, Faults::all());
        let b = generate(7, 3, 40, Faults::all());
        assert_eq!(
            serde_json::to_string(&a).ok(),
            serde_json::to_string(&b).ok()
        );
        for e in &a {
            let bytes = body(e, 0);
            assert!(
                bytes.len() < 50_000,
                "{} is {} bytes",
                e.event_id,
                bytes.len()
            );
            let parsed = shared::event::Event::parse(&bytes);
            assert!(parsed.is_ok(), "{}: {parsed:?}", e.event_id);
        }
        assert!(
            a.iter().any(|e| e.large),
            "the large-body fault produced no near-50 KB body"
        );
    }

    /// The default mix holds every variant the simulator can send, at the size `make test` runs.
    #[test]
    fn the_full_mix_covers_every_variant() {
        let events = generate(20_251_129, 12, 20, Faults::all());
        let has = |what: &str, f: &dyn Fn(&SimEvent) -> bool| {
            assert!(events.iter().any(f), "no {what} in the mix");
        };
        has("string trigger", &|e| {
            e.string_trigger && matches!(e.kind, SimKind::State(_))
        });
        has("string error signals", &|e| {
            e.string_error_signals
                && matches!(&e.kind, SimKind::Errors(x) if x.iter().any(|i| !i.signals.is_empty()))
        });
        has(
            "signal time 0",
            &|e| matches!(&e.kind, SimKind::State(s) if s.iter().any(|x| x.zero_time)),
        );
        for f in [DeliveredFormat::Seconds, DeliveredFormat::Iso] {
            has(&format!("{f:?} deliveredAt"), &|e| {
                e.delivered_format == f && !matches!(e.kind, SimKind::Legacy(..))
            });
        }
        has(
            "multi-item error",
            &|e| matches!(&e.kind, SimKind::Errors(x) if x.len() > 1),
        );
        for form in [
            LegacyForm::EventBased,
            LegacyForm::Dynamic,
            LegacyForm::Scheduled,
        ] {
            has(
                &format!("legacy {form:?}"),
                &|e| matches!(&e.kind, SimKind::Legacy(f, _) if *f == form),
            );
        }
        has(
            "two-vehicle scheduled body",
            &|e| matches!(&e.kind, SimKind::Legacy(LegacyForm::Scheduled, v) if v.len() > 1),
        );
        for legacy in [false, true] {
            has(
                &format!("VERIFY (legacy {legacy})"),
                &|e| matches!(e.kind, SimKind::Verify { legacy: l } if l == legacy),
            );
        }
    }

    /// The id the truth expects for each event is the one the parser gives it (legacy rules
    /// included), and every body routes as the kind it was meant as.
    #[test]
    fn stored_ids_and_kinds_agree_with_the_parser() {
        use shared::event::{Event, EventKind};
        for e in generate(3, 6, 60, Faults::all()) {
            let parsed =
                Event::parse(&body(&e, 0)).unwrap_or_else(|x| panic!("{}: {x}", e.event_id));
            let kind_ok = match (&e.kind, &parsed.kind) {
                (SimKind::Verify { .. }, EventKind::Verify)
                | (SimKind::Legacy(..), EventKind::Legacy(_)) => true,
                (SimKind::Verify { .. } | SimKind::Legacy(..), _) => false,
                _ => true,
            };
            assert!(kind_ok, "{}: routed as {:?}", e.event_id, parsed.kind);
            if !matches!(e.kind, SimKind::Verify { legacy: true }) {
                assert_eq!(
                    parsed.envelope.event_id.as_str(),
                    e.stored_id(),
                    "{}",
                    e.event_id
                );
            }
        }
    }

    /// No two values of one vehicle's signal share a car time, and no two deliveries of one vehicle
    /// share a `deliveredAt` as read (whatever attempt acknowledges them): ties would make the
    /// store's winner differ from the truth's.
    #[test]
    fn no_ties_in_either_clock() {
        let events = generate(11, 4, 400, Faults::all());
        let mut values = std::collections::BTreeSet::new();
        let mut deliveries: std::collections::BTreeMap<(String, i64), String> = Default::default();
        for e in &events {
            if let SimKind::State(s) = &e.kind {
                for x in s.iter().filter(|x| x.body.is_some()) {
                    assert!(
                        values.insert((e.vehicle.clone(), x.code.clone(), x.oem)),
                        "{} {} tie at {}",
                        e.vehicle,
                        x.code,
                        x.oem
                    );
                }
            }
            if let SimKind::Legacy(_, vs) = &e.kind {
                for v in vs {
                    if let Some((_, at)) = v.odometer {
                        assert!(values.insert((v.vehicle.clone(), "v2-odometer".into(), at)));
                    }
                }
            }
            if matches!(e.kind, SimKind::State(_) | SimKind::Errors(_)) {
                for attempt in 0..=3 {
                    let at = delivered_as_read(e, attempt);
                    if let Some(other) =
                        deliveries.insert((e.vehicle.clone(), at), e.event_id.clone())
                    {
                        assert_eq!(
                            other, e.event_id,
                            "{} and {other} both delivered at {at}",
                            e.event_id
                        );
                    }
                }
            }
        }
    }
}
