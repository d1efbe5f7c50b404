//! Realistic Smartcar deliveries from a seed: VEHICLE_STATE in both payload shapes with signals from
//! many groups, VEHICLE_ERROR of every kind, and the fault mixes (duplicates, out-of-order, invalid
//! signatures, partial failures, near-50 KB bodies, missing optional fields, unknown types).
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

/// One signal value the simulator sent.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SimSignal {
    pub code: String,
    /// `None`: the signal failed with `error` (type, code).
    pub body: Option<Value>,
    pub error: Option<(String, Option<String>)>,
    /// oemUpdatedAt for values.
    pub oem: i64,
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

/// What an event is.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum SimKind {
    State(Vec<SimSignal>),
    Errors(Vec<SimError>),
    Unknown,
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
    pub sparse: bool,
    pub large: bool,
}

const CATALOGUE: &[&str] = &[
    "tractionbattery-stateofcharge",
    "tractionbattery-range",
    "charge-ischarging",
    "charge-voltage",
    "odometer-traveleddistance",
    "location-preciselocation",
    "closure-doors",
    "transmission-gearstate",
    "motion-currentspeed",
    "climate-cabintemperature",
    "lowvoltagebattery-stateofcharge",
    "diagnostics-dtclist",
];

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
    let mut bad_seen = 0usize;
    for v in 0..vehicles {
        let vehicle = format!("sim-{seed}-veh-{v:05}");
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
            let kind = if rng.random_bool(faults.unknown_types) {
                SimKind::Unknown
            } else if rng.random_bool(faults.errors) {
                SimKind::Errors(vec![random_error(&mut rng)])
            } else {
                let large = rng.random_bool(faults.large_bodies);
                let n = rng.random_range(3..=8);
                let mut codes: Vec<&str> = CATALOGUE.to_vec();
                for k in (1..codes.len()).rev() {
                    codes.swap(k, rng.random_range(0..=k));
                }
                let mut chosen: Vec<&str> = codes.into_iter().take(n).collect();
                if large && !chosen.contains(&"diagnostics-dtclist") {
                    chosen.push("diagnostics-dtclist");
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
                                code: code.to_string(),
                                body: None,
                                error: Some((ty.to_string(), c.map(str::to_string))),
                                oem: t,
                            }
                        } else {
                            let lag = if rng.random_bool(faults.clock_lag) {
                                rng.random_range(1_000..90_000)
                            } else {
                                0
                            };
                            SimSignal {
                                code: code.to_string(),
                                body: Some(body_for(
                                    code,
                                    &mut rng,
                                    large && code == "diagnostics-dtclist",
                                )),
                                error: None,
                                oem: t - lag,
                            }
                        }
                    })
                    .collect();
                SimKind::State(signals)
            };
            let duplicate = rng.random_bool(faults.duplicates);
            let bad_signature = rng.random_bool(faults.invalid_signatures);
            // Variants in turn, so any run with five refused events covers all of them.
            let bad_signature_kind = bad_signature.then(|| {
                bad_seen += 1;
                BadSignature::ALL[(bad_seen - 1) % BadSignature::ALL.len()]
            });
            out.push(SimEvent {
                event_id,
                vehicle: vehicle.clone(),
                t,
                delivered: tick,
                refresh: rng.random_bool(faults.retry_refresh),
                concurrent_duplicate: duplicate && rng.random_bool(faults.concurrent_duplicates),
                large: matches!(&kind, SimKind::State(s) if s.iter().any(|x| x.code == "diagnostics-dtclist" && x.body.as_ref().is_some_and(|b| b["values"].as_array().is_some_and(|a| a.len() > 100)))),
                kind,
                bad_signature,
                bad_signature_kind,
                duplicate,
                page_shape: rng.random_bool(0.5),
                sparse: rng.random_bool(faults.missing_optional),
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

/// `deliveredAt` of delivery `attempt` of `e`: 0 is the first, 1–3 Smartcar's retries, anything
/// higher a later duplicate of an acknowledged event.
pub fn delivered_at(e: &SimEvent, attempt: u32) -> i64 {
    let first = if e.delivered == 0 { e.t } else { e.delivered };
    match (attempt, e.refresh) {
        (0, _) => first,
        (1..=3, true) => first + RETRY_REFRESH_MS[attempt as usize - 1],
        (_, true) => first + DUPLICATE_REFRESH_MS,
        (n, false) => first + i64::from(n),
    }
}

/// The wire body of one delivery of `e` (attempt 0 is the first; later ones are retries or
/// duplicates with a new deliveryId and deliveredAt).
pub fn body(e: &SimEvent, attempt: u32) -> Vec<u8> {
    let delivered_at = delivered_at(e, attempt);
    let delivery_id = format!("{}-d{attempt}", e.event_id);
    let vehicle = json!({"id": e.vehicle, "make": "TESLA", "model": "Model 3", "year": 2020});
    let mut meta = json!({"version": "4.0", "deliveryId": delivery_id, "deliveredAt": delivered_at,
        "webhookId": "5a8e5e38-1e12-4011-a36d-56f120053f9e", "webhookName": "carhook sim", "mode": "TEST"});
    let mut root = match &e.kind {
        SimKind::Unknown => {
            json!({"eventId": e.event_id, "eventType": "VEHICLE_SOMETHING_NEW", "vehicleId": e.vehicle,
            "data": {"vehicle": vehicle, "whatever": {"x": 1}}})
        }
        SimKind::Errors(errs) => {
            let errors: Vec<Value> = errs
                .iter()
                .map(|x| {
                    let signals: Vec<Value> = x.signals.iter().map(|c| json!({"code": c})).collect();
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
                    let (group, name) = s.code.split_once('-').unwrap_or((&s.code, &s.code));
                    match (&s.body, &s.error) {
                        (Some(b), _) => {
                            let mut m = json!({"oemUpdatedAt": s.oem});
                            if !e.sparse {
                                m[if e.page_shape { "retrievedAt" } else { "fetchedAt" }] = json!(s.oem + 1500);
                            }
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
                    "triggers": [{"type": "SIGNAL_UPDATED", "signal": {"code": first}}]})
            } else {
                json!({"eventId": e.event_id, "eventType": "VEHICLE_STATE", "vehicleId": e.vehicle,
                    "data": {"user": {"id": "sim-user"}, "vehicle": vehicle, "triggers": [{"code": first}], "signals": list}})
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
}
