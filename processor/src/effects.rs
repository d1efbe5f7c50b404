//! What an event means for vehicle state: a pure translation from a parsed [`Event`] to
//! [`Plan`]s of idempotent, timestamp-ordered writes and the actions they may cause. No I/O here,
//! so every rule of SMARTCAR.md §4–6 is unit-tested in memory; [`crate::store`] executes the plan.
//!
//! Two clocks, each owning its own cells, never mixed in one cell:
//! - **values** are ordered by the car's clock: `oemUpdatedAt`, else fetch time (or a legacy
//!   reading's `sc-data-age`), else delivery time, else receive time;
//! - **availability** (available / unavailable / unsupported), **vehicle errors** and the vehicle's
//!   last-event record are ordered by the delivery clock: the `deliveredAt` stored with the event's
//!   claim (the first persisted copy's, so a Smartcar retry with a refreshed `deliveredAt` or a
//!   replay writes the same timestamps as the original).
//!
//! Either is written as the CQL write timestamp `(ms * 1000 + logic version)`; the store keeps the
//! highest per cell, so an older write never overwrites a newer one whatever the arrival order, and
//! applying the same event twice is a no-op. A clock more than `max_skew_ms` ahead of receive time
//! (a broken car clock) is not trusted: the next clock is used, and the plan says which was dropped.

use serde::Serialize;
use serde_json::{json, Value};
use shared::clock::{EpochMillis, Freshness, FreshnessSource};
use shared::event::{
    ErrorState, Event, EventKind, EventSource, LegacyEvent, LegacyVehicle, SignalStatus,
    VehicleErrorItem,
};
use shared::ids::{SignalCode, VehicleId};

/// One cell write: JSON document and its write timestamp (µs).
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub doc: String,
    pub timestamp: i64,
}

/// One write of a time column: the value (epoch ms) and its write timestamp (µs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeCell {
    pub value: i64,
    pub timestamp: i64,
}

/// A signal's new last-good value, ordered by the car's clock.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueWrite {
    pub code: SignalCode,
    pub value: Cell,
}

/// A signal's availability, ordered by the delivery clock.
#[derive(Debug, Clone, PartialEq)]
pub struct AvailabilityWrite {
    pub code: SignalCode,
    pub availability: Cell,
}

/// A vehicle error's new state.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorWrite {
    pub key: String,
    pub state: Cell,
}

/// An action for the application (emitted on the actions topic, keyed by vehicle) — but only if
/// the reconnect flag it belongs to really changes (decided by the store).
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// `RECONNECT_REQUIRED` or `RECONNECT_RESOLVED`.
    pub kind: &'static str,
    /// `{eventId}:{index}`: stable, so a consumer can deduplicate if it wants belt and braces.
    pub action_id: String,
    pub body: Value,
    /// The reconnect flag: the error key, the state it moves to, and the delivery time (ms).
    pub error_key: String,
    pub flag_state: &'static str,
    pub at: i64,
}

/// Everything one event does to one vehicle.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub vehicle: Option<VehicleId>,
    pub values: Vec<ValueWrite>,
    pub availability: Vec<AvailabilityWrite>,
    pub errors: Vec<ErrorWrite>,
    pub vehicle_info: Option<Cell>,
    /// The delivery time of a webhook (never of a polled event): `vehicles.last_webhook_at`,
    /// what "recently active" means to the poller's safety net and resync.
    pub last_webhook: Option<TimeCell>,
    /// The vehicle's Smartcar user id (`data.user.id`), ordered by the delivery clock: the
    /// poller's `sc-user-id`.
    pub user: Option<Cell>,
    /// Where the event's readings came from (a webhook or a REST poll).
    pub source: EventSource,
    /// A vehicle error was RESOLVED: data may flow again, so one refresh poll is requested.
    pub refresh_poll: bool,
    /// Candidate actions; the pipeline keeps those whose flag changed.
    pub actions: Vec<Action>,
    /// Bounded error-type labels of the VEHICLE_ERROR items, for counting.
    pub error_types: Vec<&'static str>,
    /// Clocks that were ahead of receive time by more than the allowed skew (not trusted).
    pub untrusted: Vec<&'static str>,
}

/// Inputs besides the event itself.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// When the receiver accepted the record (header, else the record's timestamp).
    pub received_at: EpochMillis,
    /// The delivery time stored with the event's claim (see [`delivery_time`]).
    pub delivered_at: EpochMillis,
    pub logic_version: u16,
    pub rate_limit_backoff_secs: u64,
    /// How far a clock may run ahead of `received_at` and still be trusted.
    pub max_skew_ms: i64,
}

impl Context {
    /// `t` if it is no later than receive time plus the allowed skew; else None, noted in `plan`.
    fn trusted(
        &self,
        t: Option<EpochMillis>,
        clock: &'static str,
        plan: &mut Plan,
    ) -> Option<EpochMillis> {
        match t {
            Some(t) if t.as_i64() > self.received_at.as_i64().saturating_add(self.max_skew_ms) => {
                plan.untrusted.push(clock);
                None
            }
            other => other,
        }
    }

    fn delivered(&self) -> Freshness {
        Freshness {
            at: self.delivered_at,
            source: FreshnessSource::DeliveredAt,
        }
    }
}

/// The delivery clock of a copy: its `deliveredAt` when known and no later than receive time
/// plus the allowed skew, else receive time. Stored with the claim by the copy that owns it.
/// Returns the time and, when `deliveredAt` was dropped as untrusted, `"delivered_at"`.
pub fn delivery_time(
    delivered_at: Option<EpochMillis>,
    received_at: EpochMillis,
    max_skew_ms: i64,
) -> (EpochMillis, Option<&'static str>) {
    match delivered_at {
        Some(t) if t.as_i64() > received_at.as_i64().saturating_add(max_skew_ms) => {
            (received_at, Some("delivered_at"))
        }
        Some(t) => (t, None),
        None => (received_at, None),
    }
}

/// Error types Smartcar documents, then `other` for anything else (labels stay bounded).
pub const ERROR_TYPE_LABELS: &[&str] = &[
    "CONNECTED_SERVICES_ACCOUNT",
    "VEHICLE_STATE",
    "COMPATIBILITY",
    "PERMISSION",
    "UPSTREAM",
    "RATE_LIMIT",
    "AUTHENTICATION",
    "BILLING",
    "SERVER",
    "VALIDATION",
    "other",
];

/// The `type` label of a vehicle error: its type when Smartcar documents it, else `other`.
pub fn error_type_label(t: &str) -> &'static str {
    ERROR_TYPE_LABELS
        .iter()
        .find(|k| **k == t)
        .copied()
        .unwrap_or("other")
}

fn ms(t: Option<EpochMillis>) -> Value {
    t.map_or(Value::Null, |t| json!(t.as_i64()))
}

/// Translates an event into one plan per vehicle it concerns (none for VERIFY and unknown types;
/// several for a legacy v2 body listing several vehicles).
pub fn plans(event: &Event, ctx: Context) -> Vec<Plan> {
    match &event.kind {
        EventKind::Legacy(l) => l
            .vehicles
            .iter()
            .map(|v| legacy_plan(event, l, v, ctx))
            .collect(),
        EventKind::VehicleState { .. } | EventKind::VehicleError { .. } => vec![plan(event, ctx)],
        EventKind::Verify | EventKind::Unknown => Vec::new(),
    }
}

/// Translates a current-version event into its plan.
pub fn plan(event: &Event, ctx: Context) -> Plan {
    let env = &event.envelope;
    let event_id = env.event_id.as_str();
    let delivered = ctx.delivered();
    let delivered_ts = delivered.write_timestamp(ctx.logic_version);
    let source = env.source.as_str();
    let mut p = Plan {
        source: env.source,
        ..Plan::default()
    };
    match &event.kind {
        EventKind::VehicleState { vehicle, signals } => {
            p.vehicle = Some(vehicle.clone());
            for s in signals {
                match &s.status {
                    SignalStatus::Success => {
                        let oem = ctx.trusted(s.oem_updated_at, "oem_updated_at", &mut p);
                        let fetched = ctx.trusted(s.fetched_at, "fetched_at", &mut p);
                        let f =
                            Freshness::pick(oem, fetched, Some(ctx.delivered_at), ctx.received_at);
                        p.values.push(ValueWrite {
                            code: s.code.clone(),
                            value: Cell {
                                doc: doc_text(&ValueDoc {
                                    body: s.body.as_ref(),
                                    event_id,
                                    fetched_at: s.fetched_at.map(EpochMillis::as_i64),
                                    freshness: f.at.as_i64(),
                                    freshness_source: f.source,
                                    logic_version: ctx.logic_version,
                                    oem_updated_at: s.oem_updated_at.map(EpochMillis::as_i64),
                                    source,
                                }),
                                timestamp: f.write_timestamp(ctx.logic_version),
                            },
                        });
                        p.availability.push(AvailabilityWrite {
                            code: s.code.clone(),
                            availability: available(event_id, delivered, delivered_ts),
                        });
                    }
                    SignalStatus::Error { error_type, code } => {
                        let status = if s.status.is_not_capable() {
                            "unsupported"
                        } else {
                            "unavailable"
                        };
                        p.availability.push(AvailabilityWrite {
                            code: s.code.clone(),
                            availability: Cell {
                                doc: json!({
                                    "status": status,
                                    "error": { "type": error_type, "code": code },
                                    "since": delivered.at.as_i64(),
                                    "eventId": event_id,
                                    "source": source,
                                })
                                .to_string(),
                                timestamp: delivered_ts,
                            },
                        });
                    }
                }
            }
        }
        EventKind::VehicleError { vehicle, errors } => {
            p.vehicle = Some(vehicle.clone());
            for (i, e) in errors.iter().enumerate() {
                p.refresh_poll |= e.state == ErrorState::Resolved;
                p.error_types.push(error_type_label(&e.error_type));
                p.errors.push(ErrorWrite {
                    key: e.key(),
                    state: Cell {
                        doc: error_doc(e, event_id, delivered, ctx).to_string(),
                        timestamp: delivered_ts,
                    },
                });
                if e.is_not_capable() {
                    let status = match e.state {
                        ErrorState::Error => "unsupported",
                        ErrorState::Resolved => "available",
                    };
                    for code in &e.signals {
                        p.availability.push(AvailabilityWrite {
                            code: code.clone(),
                            availability: Cell {
                                doc: json!({
                                    "status": status,
                                    "error": (status == "unsupported").then(|| json!({ "type": e.error_type, "code": e.code })),
                                    "since": delivered.at.as_i64(),
                                    "eventId": event_id,
                                })
                                .to_string(),
                                timestamp: delivered_ts,
                            },
                        });
                    }
                }
                if e.needs_reconnect() {
                    let (kind, flag_state) = match e.state {
                        ErrorState::Error => ("RECONNECT_REQUIRED", "ERROR"),
                        ErrorState::Resolved => ("RECONNECT_RESOLVED", "RESOLVED"),
                    };
                    p.actions.push(Action {
                        kind,
                        action_id: format!("{event_id}:{i}"),
                        body: json!({
                            "actionId": format!("{event_id}:{i}"),
                            "type": kind,
                            "vehicleId": vehicle.as_str(),
                            "eventId": event_id,
                            "errorType": e.error_type,
                            "errorCode": e.code,
                            "description": e.description,
                            "suggestedUserMessage": e.raw.get("suggestedUserMessage"),
                            "occurredAt": delivered.at.as_i64(),
                        }),
                        error_key: e.key(),
                        flag_state,
                        at: delivered.at.as_i64(),
                    });
                }
            }
        }
        EventKind::Verify | EventKind::Legacy(_) | EventKind::Unknown => {}
    }
    if let Some(v) = &p.vehicle {
        p.vehicle_info = Some(Cell {
            doc: json!({
                "vehicleId": v.as_str(),
                "lastEventId": event_id,
                "lastEventType": env.event_type,
                "lastDeliveredAt": delivered.at.as_i64(),
                "mode": env.mode,
            })
            .to_string(),
            timestamp: delivered_ts,
        });
        p.user = env.user_id.as_ref().map(|u| Cell {
            doc: u.clone(),
            timestamp: delivered_ts,
        });
        // A poll's own event is not activity: were it, a parked vehicle polled by the safety net
        // would look active again and be polled again, for ever.
        p.last_webhook = (env.source == EventSource::Webhook).then_some(TimeCell {
            value: delivered.at.as_i64(),
            timestamp: delivered_ts,
        });
    }
    p
}

/// The signal code a legacy v2 reading is stored under: `v2` and the path, e.g. `/odometer` →
/// `v2-odometer`, `/charge/limit` → `v2-charge-limit`.
pub fn legacy_code(path: &str) -> Option<SignalCode> {
    let tail: String = path
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c == '/' {
                '-'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    if tail.is_empty() {
        return None;
    }
    SignalCode::parse(format!("v2-{tail}")).ok()
}

/// One vehicle of a legacy v2 body: its readings (ordered by `sc-data-age`) and its last event.
fn legacy_plan(event: &Event, l: &LegacyEvent, v: &LegacyVehicle, ctx: Context) -> Plan {
    let env = &event.envelope;
    let event_id = env.event_id.as_str();
    let delivered = ctx.delivered();
    let delivered_ts = delivered.write_timestamp(ctx.logic_version);
    let mut p = Plan {
        vehicle: Some(v.vehicle.clone()),
        ..Plan::default()
    };
    for r in &v.readings {
        let Some(code) = legacy_code(&r.path) else {
            continue;
        };
        if r.is_success() {
            let age = ctx.trusted(r.data_age, "fetched_at", &mut p);
            let f = match age {
                Some(at) => Freshness {
                    at,
                    source: FreshnessSource::ScDataAge,
                },
                None => delivered,
            };
            p.values.push(ValueWrite {
                code: code.clone(),
                value: Cell {
                    doc: json!({
                        "body": r.body,
                        "oemUpdatedAt": Value::Null,
                        "fetchedAt": Value::Null,
                        "scDataAge": ms(r.data_age),
                        "unitSystem": r.unit_system,
                        "path": r.path,
                        "freshness": f.at.as_i64(),
                        "freshnessSource": f.source,
                        "eventId": event_id,
                        "logicVersion": ctx.logic_version,
                        "legacy": true,
                    })
                    .to_string(),
                    timestamp: f.write_timestamp(ctx.logic_version),
                },
            });
            p.availability.push(AvailabilityWrite {
                code,
                availability: available(event_id, delivered, delivered_ts),
            });
        } else {
            p.availability.push(AvailabilityWrite {
                code,
                availability: Cell {
                    doc: json!({
                        "status": "unavailable",
                        "error": {
                            "type": r.body.get("type"),
                            "code": r.body.get("code"),
                            "statusCode": r.code,
                            "description": r.body.get("description"),
                        },
                        "since": delivered.at.as_i64(),
                        "eventId": event_id,
                    })
                    .to_string(),
                    timestamp: delivered_ts,
                },
            });
        }
    }
    p.last_webhook = Some(TimeCell {
        value: delivered.at.as_i64(),
        timestamp: delivered_ts,
    });
    p.vehicle_info = Some(Cell {
        doc: json!({
            "vehicleId": v.vehicle.as_str(),
            "lastEventId": event_id,
            "lastEventType": env.event_type,
            "lastDeliveredAt": delivered.at.as_i64(),
            "mode": env.mode,
            "legacy": {
                "eventName": l.event_name,
                "eventType": v.event_type,
                "eventTime": ms(v.event_time),
                "requestId": v.request_id,
            },
        })
        .to_string(),
        timestamp: delivered_ts,
    });
    p
}

/// A signal's "available" cell, as a good value reports it (delivery clock).
fn available(event_id: &str, delivered: Freshness, timestamp: i64) -> Cell {
    Cell {
        doc: doc_text(&AvailableDoc {
            event_id,
            since: delivered.at.as_i64(),
            status: "available",
        }),
        timestamp,
    }
}

/// A signal value's stored document. Written from this struct rather than a `json!` object (a
/// 50 KB event has some 250 of them, and building each as a map of cloned values cost more than
/// parsing the event), in the same bytes: the fields are in name order, as serde_json's `Map`
/// sorts its keys, and a tie at equal timestamps compares the stored bytes
/// ([`crate::view`]). A test pins the equality.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ValueDoc<'a> {
    body: Option<&'a Value>,
    event_id: &'a str,
    fetched_at: Option<i64>,
    freshness: i64,
    freshness_source: FreshnessSource,
    logic_version: u16,
    oem_updated_at: Option<i64>,
    source: &'a str,
}

/// An available signal's stored availability document, as [`ValueDoc`].
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AvailableDoc<'a> {
    event_id: &'a str,
    since: i64,
    status: &'a str,
}

/// A document's compact JSON text (serializing these structs into a string cannot fail).
fn doc_text<T: Serialize>(doc: &T) -> String {
    serde_json::to_string(doc).unwrap_or_default()
}

fn error_doc(e: &VehicleErrorItem, event_id: &str, delivered: Freshness, ctx: Context) -> Value {
    let backoff_until = (e.is_rate_limit() && e.state == ErrorState::Error).then(|| {
        delivered.at.as_i64() + i64::try_from(ctx.rate_limit_backoff_secs).unwrap_or(0) * 1000
    });
    json!({
        "state": match e.state { ErrorState::Error => "ERROR", ErrorState::Resolved => "RESOLVED" },
        "type": e.error_type,
        "code": e.code,
        "description": e.description,
        "resolution": e.resolution,
        "signals": e.signals.iter().map(SignalCode::as_str).collect::<Vec<_>>(),
        "needsReconnect": e.needs_reconnect(),
        "backoffUntil": backoff_until,
        "since": delivered.at.as_i64(),
        "eventId": event_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> EpochMillis {
        EpochMillis::new(ms).unwrap_or_else(EpochMillis::now)
    }

    fn ctx() -> Context {
        Context {
            received_at: at(1_700_000_001_000),
            delivered_at: at(1_700_000_000_000),
            logic_version: 1,
            rate_limit_backoff_secs: 60,
            max_skew_ms: 60_000,
        }
    }

    /// The context the pipeline builds for `e`: its own `deliveredAt` as the claim's.
    fn ctx_of(e: &Event) -> Context {
        let c = ctx();
        Context {
            delivered_at: delivery_time(e.envelope.delivered_at, c.received_at, c.max_skew_ms).0,
            ..c
        }
    }

    fn parse(s: &str) -> Event {
        Event::parse(s.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The stored documents are written from structs; their bytes must equal those of the
    /// `json!` objects written before (sorted keys), or a tie at equal timestamps between an old
    /// and a new document would be settled differently than the store settles it.
    #[test]
    fn value_and_availability_documents_keep_their_stored_bytes() {
        let bodies = [
            None,
            Some(json!({"value": 4.5, "unit": "percent"})),
            Some(json!({"z": [1, {"b": null, "a": "é\"\\\n"}], "a": {"y": true, "x": -0.0}})),
            Some(json!("text")),
        ];
        let times = [None, Some(1_764_000_000_123)];
        let mut checked = 0;
        for body in &bodies {
            for oem in times {
                for fetched in times {
                    for freshness_source in
                        [FreshnessSource::OemUpdatedAt, FreshnessSource::ReceivedAt]
                    {
                        let new = doc_text(&ValueDoc {
                            body: body.as_ref(),
                            event_id: "ev-\"1\"",
                            fetched_at: fetched,
                            freshness: 1_764_000_000_500,
                            freshness_source,
                            logic_version: 3,
                            oem_updated_at: oem,
                            source: "poll",
                        });
                        let old = json!({
                            "body": body,
                            "oemUpdatedAt": oem,
                            "fetchedAt": fetched,
                            "freshness": 1_764_000_000_500_i64,
                            "freshnessSource": freshness_source,
                            "eventId": "ev-\"1\"",
                            "logicVersion": 3,
                            "source": "poll",
                        })
                        .to_string();
                        assert_eq!(new, old);
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 32);
        let new = available(
            "ev-1",
            Freshness {
                at: at(1_764_000_000_000),
                source: FreshnessSource::DeliveredAt,
            },
            7,
        );
        assert_eq!(
            new.doc,
            json!({ "status": "available", "since": 1_764_000_000_000_i64, "eventId": "ev-1" })
                .to_string()
        );
    }

    #[test]
    fn newer_oem_time_gets_higher_timestamp() {
        let mk = |oem: i64, v: i64| {
            parse(&format!(
                r#"{{"eventId":"e{v}","eventType":"VEHICLE_STATE","vehicleId":"car","data":{{"signals":[{{"code":"odometer-traveleddistance","body":{{"value":{v}}},"meta":{{"oemUpdatedAt":{oem}}}}}]}},"meta":{{"deliveredAt":1}}}}"#
            ))
        };
        let old = plan(&mk(1_000_000_000_000, 1), ctx());
        let new = plan(&mk(1_000_000_000_500, 2), ctx());
        assert!(new.values[0].value.timestamp > old.values[0].value.timestamp);
        assert_eq!(
            plan(&mk(1_000_000_000_000, 1), ctx()),
            old,
            "same event, same plan: re-applying is a no-op"
        );
    }

    #[test]
    fn missing_oem_falls_back_to_fetch_then_delivery() {
        let e = parse(
            r#"{"eventId":"e","eventType":"VEHICLE_STATE","vehicleId":"car","data":{"signals":[
            {"code":"a-b","body":{"value":1},"meta":{"oemUpdatedAt":0,"retrievedAt":1700000000100}},
            {"code":"c-d","body":{"value":2}}]},"meta":{"deliveredAt":1700000000200}}"#,
        );
        let p = plan(&e, ctx_of(&e));
        assert_eq!(p.values[0].value.timestamp, 1_700_000_000_100_001);
        assert_eq!(p.values[1].value.timestamp, 1_700_000_000_200_001);
    }

    #[test]
    fn availability_follows_the_delivery_clock_and_values_the_car_clock() {
        // The car's value is a minute older than the delivery: normal lag.
        let e = parse(
            r#"{"eventId":"e","eventType":"VEHICLE_STATE","vehicleId":"car","data":{"signals":[
            {"code":"a-b","body":{"value":1},"meta":{"oemUpdatedAt":1699999940000}}]},"meta":{"deliveredAt":1700000000000}}"#,
        );
        let p = plan(&e, ctx_of(&e));
        assert_eq!(p.values[0].value.timestamp, 1_699_999_940_000_001);
        assert_eq!(
            p.availability[0].availability.timestamp,
            1_700_000_000_000_001
        );
        assert!(p.availability[0]
            .availability
            .doc
            .contains(r#""status":"available""#));
    }

    #[test]
    fn a_clock_far_ahead_of_receive_time_is_not_trusted() {
        let e = parse(
            r#"{"eventId":"e","eventType":"VEHICLE_STATE","vehicleId":"car","data":{"signals":[
            {"code":"a-b","body":{"value":1},"meta":{"oemUpdatedAt":2000000000000,"retrievedAt":1700000000100}}]},
            "meta":{"deliveredAt":1900000000000}}"#,
        );
        let c = ctx_of(&e);
        assert_eq!(
            c.delivered_at,
            at(1_700_000_001_000),
            "future deliveredAt falls back to receive time"
        );
        let p = plan(&e, c);
        assert_eq!(
            p.values[0].value.timestamp, 1_700_000_000_100_001,
            "fetch time used instead"
        );
        assert_eq!(p.untrusted, vec!["oem_updated_at"]);
    }

    #[test]
    fn legacy_scheduled_body_plans_each_vehicle_by_data_age() {
        let body = br#"{"version":"2.0","webhookId":"w","eventName":"scheduled","mode":"live","payload":{"vehicles":[
            {"vehicleId":"v1","requestId":"r1","data":[
              {"path":"/odometer","code":200,"body":{"distance":1234.5},"headers":{"sc-data-age":"2023-11-14T22:13:20.000Z","sc-unit-system":"metric"}},
              {"path":"/battery","code":409,"body":{"type":"VEHICLE_STATE","code":"ASLEEP","statusCode":409,"description":"asleep"}}]},
            {"vehicleId":"v2","requestId":"r2","data":[]}]}}"#;
        let e = Event::parse(body).unwrap_or_else(|e| panic!("{e}"));
        let ps = plans(&e, ctx());
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].vehicle.as_ref().map(|v| v.as_str()), Some("v1"));
        assert_eq!(ps[0].values[0].code.as_str(), "v2-odometer");
        assert_eq!(ps[0].values[0].value.timestamp, 1_700_000_000_000_001);
        assert!(ps[0].availability[1]
            .availability
            .doc
            .contains(r#""code":"ASLEEP""#));
        assert!(ps[1]
            .vehicle_info
            .as_ref()
            .is_some_and(|i| i.doc.contains(r#""requestId":"r2""#)));
        assert!(ps.iter().all(|p| p.actions.is_empty()));
    }

    #[test]
    fn partial_failure_keeps_good_values_and_marks_failed() {
        let e = parse(
            r#"{"eventId":"e","eventType":"VEHICLE_STATE","vehicleId":"car","data":{"signals":[
            {"code":"a-b","body":{"value":1},"meta":{"oemUpdatedAt":1700000000000}},
            {"code":"c-d","status":{"value":"ERROR","error":{"type":"UPSTREAM","code":"NO_RESPONSE"}}},
            {"code":"e-f","status":{"value":"ERROR","error":{"type":"COMPATIBILITY","code":"VEHICLE_NOT_CAPABLE"}}}]}}"#,
        );
        let p = plan(&e, ctx());
        assert_eq!(p.values.len(), 1);
        assert_eq!(p.availability.len(), 3);
        assert!(p.availability[0]
            .availability
            .doc
            .contains(r#""status":"available""#));
        assert!(p.availability[1]
            .availability
            .doc
            .contains(r#""status":"unavailable""#));
        assert!(p.availability[2]
            .availability
            .doc
            .contains(r#""status":"unsupported""#));
    }

    #[test]
    fn reconnect_errors_emit_one_action_each_and_resolution_clears() {
        let mk = |state: &str| {
            parse(&format!(
                r#"{{"eventId":"e-{state}","eventType":"VEHICLE_ERROR","vehicleId":"car","data":{{"errors":[
            {{"type":"PERMISSION","code":null,"state":"{state}"}},
            {{"type":"UPSTREAM","code":"RATE_LIMIT","state":"{state}"}}]}},"meta":{{"deliveredAt":1700000000000}}}}"#
            ))
        };
        let err = plan(&mk("ERROR"), ctx());
        assert_eq!(err.actions.len(), 1);
        assert_eq!(err.actions[0].kind, "RECONNECT_REQUIRED");
        assert_eq!(err.actions[0].action_id, "e-ERROR:0");
        assert!(err.errors[1]
            .state
            .doc
            .contains(r#""backoffUntil":1700000060000"#));
        let resolved = plan(&mk("RESOLVED"), ctx());
        assert_eq!(resolved.actions[0].kind, "RECONNECT_RESOLVED");
        assert!(
            resolved.refresh_poll && !err.refresh_poll,
            "a resolution asks for one refresh poll"
        );
        assert!(resolved.errors[0]
            .state
            .doc
            .contains(r#""state":"RESOLVED""#));
    }

    #[test]
    fn a_polled_value_says_so_and_orders_by_the_car_clock_like_a_webhook() {
        let mk = |id: &str, source: &str, oem: i64, v: i64| {
            parse(&format!(
                r#"{{"eventId":"{id}","eventType":"VEHICLE_STATE","vehicleId":"car","data":{{"user":{{"id":"u-1"}},"signals":[{{"code":"a-b","body":{{"value":{v}}},"meta":{{"oemUpdatedAt":{oem}}}}}]}},"meta":{{"deliveredAt":1700000000000{source}}}}}"#
            ))
        };
        let poll = mk("poll-1", r#","source":"poll""#, 1_699_999_000_000, 1);
        let hook = mk("e-1", "", 1_699_999_500_000, 2);
        let (p, w) = (plan(&poll, ctx_of(&poll)), plan(&hook, ctx_of(&hook)));
        assert_eq!(p.source, EventSource::Poll);
        assert!(p.values[0].value.doc.contains(r#""source":"poll""#));
        assert!(w.values[0].value.doc.contains(r#""source":"webhook""#));
        assert!(
            w.values[0].value.timestamp > p.values[0].value.timestamp,
            "the fresher webhook value wins over the older poll"
        );
        let newer_poll = mk("poll-2", r#","source":"poll""#, 1_699_999_900_000, 3);
        assert!(
            plan(&newer_poll, ctx_of(&newer_poll)).values[0]
                .value
                .timestamp
                > w.values[0].value.timestamp,
            "and a fresher poll wins over the older webhook value"
        );
        assert_eq!(
            p.user,
            Some(Cell {
                doc: "u-1".into(),
                timestamp: 1_700_000_000_000_001
            })
        );
        // Only the webhook is activity (the safety net's "recently active").
        assert_eq!(p.last_webhook, None, "a poll is not activity");
        assert_eq!(
            w.last_webhook.map(|t| t.value),
            Some(1_700_000_000_000),
            "a webhook is"
        );
    }

    #[test]
    fn not_capable_error_marks_signals_unsupported() {
        let e = parse(
            r#"{"eventId":"e","eventType":"VEHICLE_ERROR","vehicleId":"car","data":{"errors":[
            {"type":"COMPATIBILITY","code":"VEHICLE_NOT_CAPABLE","state":"ERROR","signals":["Location.PreciseLocation"]}]}}"#,
        );
        let p = plan(&e, ctx());
        assert_eq!(p.availability[0].code.as_str(), "location-preciselocation");
        assert!(p.actions.is_empty());
    }
}
