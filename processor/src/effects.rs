//! What an event means for vehicle state: a pure translation from a parsed [`Event`] to a [`Plan`]
//! of idempotent, timestamp-ordered writes and the actions to emit. No I/O here, so every rule of
//! SMARTCAR.md §5–6 is unit-tested in memory; [`crate::store`] executes the plan for real.
//!
//! Freshness: each signal entry is ordered by its own clock — `oemUpdatedAt`, else fetch time, else
//! delivery time, else receive time — written as the CQL write timestamp `(ms * 1000 + logic
//! version)`. The store keeps, per cell, the write with the highest timestamp, so an older value
//! never overwrites a newer one whatever the arrival order or which processor writes, and applying
//! the same event twice writes the same cells with the same timestamps: a no-op.

use serde_json::{json, Value};
use shared::clock::{EpochMillis, Freshness};
use shared::event::{ErrorState, Event, EventKind, SignalStatus, VehicleErrorItem};
use shared::ids::{SignalCode, VehicleId};

/// One cell write: JSON document and its write timestamp (µs).
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub doc: String,
    pub timestamp: i64,
}

/// A signal's new last-good value (availability is set with it).
#[derive(Debug, Clone, PartialEq)]
pub struct ValueWrite {
    pub code: SignalCode,
    pub value: Cell,
    pub availability: Cell,
}

/// A signal's availability only (error, unsupported, or cleared).
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

/// An action for the application (emitted on the actions topic, keyed by vehicle).
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    /// `RECONNECT_REQUIRED` or `RECONNECT_RESOLVED`.
    pub kind: &'static str,
    /// `{eventId}:{index}`: stable, so a consumer can deduplicate if it wants belt and braces.
    pub action_id: String,
    pub body: Value,
}

/// Everything one event does.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    pub vehicle: Option<VehicleId>,
    pub values: Vec<ValueWrite>,
    pub availability: Vec<AvailabilityWrite>,
    pub errors: Vec<ErrorWrite>,
    pub vehicle_info: Option<Cell>,
    pub actions: Vec<Action>,
    /// Bounded error-type labels of the VEHICLE_ERROR items, for counting.
    pub error_types: Vec<&'static str>,
}

/// Inputs besides the event itself.
#[derive(Debug, Clone, Copy)]
pub struct Context {
    /// When the receiver accepted the record (header), the last freshness fallback.
    pub received_at: EpochMillis,
    pub logic_version: u16,
    pub rate_limit_backoff_secs: u64,
}

/// Error types Smartcar documents; anything else is counted as `other` to keep labels bounded.
pub fn error_type_label(t: &str) -> &'static str {
    const KNOWN: &[&str] = &[
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
    ];
    KNOWN.iter().find(|k| **k == t).copied().unwrap_or("other")
}

fn ms(t: Option<EpochMillis>) -> Value {
    t.map_or(Value::Null, |t| json!(t.as_i64()))
}

/// Translates an event into its plan.
pub fn plan(event: &Event, ctx: Context) -> Plan {
    let env = &event.envelope;
    let event_id = env.event_id.as_str();
    let delivered = Freshness::pick(None, None, env.delivered_at, ctx.received_at);
    let mut p = Plan::default();
    match &event.kind {
        EventKind::VehicleState { vehicle, signals } => {
            p.vehicle = Some(vehicle.clone());
            for s in signals {
                let f = Freshness::pick(
                    s.oem_updated_at,
                    s.fetched_at,
                    env.delivered_at,
                    ctx.received_at,
                );
                let ts = f.write_timestamp(ctx.logic_version);
                match &s.status {
                    SignalStatus::Success => p.values.push(ValueWrite {
                        code: s.code.clone(),
                        value: Cell {
                            doc: json!({
                                "body": s.body,
                                "oemUpdatedAt": ms(s.oem_updated_at),
                                "fetchedAt": ms(s.fetched_at),
                                "freshness": f.at.as_i64(),
                                "freshnessSource": f.source,
                                "eventId": event_id,
                                "logicVersion": ctx.logic_version,
                            })
                            .to_string(),
                            timestamp: ts,
                        },
                        availability: Cell {
                            doc: json!({ "status": "available", "since": f.at.as_i64(), "eventId": event_id }).to_string(),
                            timestamp: ts,
                        },
                    }),
                    SignalStatus::Error { error_type, code } => {
                        let status = if s.status.is_not_capable() { "unsupported" } else { "unavailable" };
                        p.availability.push(AvailabilityWrite {
                            code: s.code.clone(),
                            availability: Cell {
                                doc: json!({
                                    "status": status,
                                    "error": { "type": error_type, "code": code },
                                    "since": f.at.as_i64(),
                                    "eventId": event_id,
                                })
                                .to_string(),
                                timestamp: ts,
                            },
                        });
                    }
                }
            }
        }
        EventKind::VehicleError { vehicle, errors } => {
            p.vehicle = Some(vehicle.clone());
            let ts = delivered.write_timestamp(ctx.logic_version);
            for (i, e) in errors.iter().enumerate() {
                p.error_types.push(error_type_label(&e.error_type));
                p.errors.push(ErrorWrite {
                    key: e.key(),
                    state: Cell {
                        doc: error_doc(e, event_id, delivered, ctx).to_string(),
                        timestamp: ts,
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
                                timestamp: ts,
                            },
                        });
                    }
                }
                if e.needs_reconnect() {
                    let kind = match e.state {
                        ErrorState::Error => "RECONNECT_REQUIRED",
                        ErrorState::Resolved => "RECONNECT_RESOLVED",
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
                    });
                }
            }
        }
        EventKind::Verify | EventKind::Legacy { .. } | EventKind::Unknown => {}
    }
    if let Some(v) = &p.vehicle {
        let info = match &event.kind {
            EventKind::VehicleState { .. } | EventKind::VehicleError { .. } => json!({
                "vehicleId": v.as_str(),
                "lastEventId": event_id,
                "lastEventType": env.event_type,
                "lastDeliveredAt": delivered.at.as_i64(),
                "mode": env.mode,
            }),
            _ => Value::Null,
        };
        p.vehicle_info = Some(Cell {
            doc: info.to_string(),
            timestamp: delivered.write_timestamp(ctx.logic_version),
        });
    }
    p
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

    fn ctx() -> Context {
        Context {
            received_at: EpochMillis::new(1_700_000_000_000).unwrap_or_else(EpochMillis::now),
            logic_version: 1,
            rate_limit_backoff_secs: 60,
        }
    }

    fn parse(s: &str) -> Event {
        Event::parse(s.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
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
        let p = plan(&e, ctx());
        assert_eq!(p.values[0].value.timestamp, 1_700_000_000_100_001);
        assert_eq!(p.values[1].value.timestamp, 1_700_000_000_200_001);
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
        assert_eq!(p.availability.len(), 2);
        assert!(p.availability[0]
            .availability
            .doc
            .contains(r#""status":"unavailable""#));
        assert!(p.availability[1]
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
        assert!(resolved.errors[0]
            .state
            .doc
            .contains(r#""state":"RESOLVED""#));
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
