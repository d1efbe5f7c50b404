//! The current state of one vehicle as applications see it (`processor state <vehicle-id>`).

use scylla::client::session::Session;
use serde_json::{json, Map, Value};

/// Why the state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("vehicle {0} is unknown: no event for it has been applied")]
    UnknownVehicle(String),
    #[error("reading state of vehicle {vehicle}: {message}")]
    Store { vehicle: String, message: String },
}

fn parse(doc: Option<String>) -> Value {
    doc.and_then(|d| serde_json::from_str(&d).ok())
        .unwrap_or(Value::Null)
}

/// Reads the vehicle's state as the documented JSON shape.
pub async fn vehicle_state(
    session: &Session,
    keyspace: &str,
    vehicle: &str,
) -> Result<Value, StateError> {
    let err = |e: &dyn std::fmt::Display| StateError::Store {
        vehicle: vehicle.to_string(),
        message: e.to_string(),
    };
    let q = |table: &str, cols: &str| {
        format!("SELECT {cols} FROM {keyspace}.{table} WHERE vehicle_id = ?")
    };
    let info = session
        .query_unpaged(q("vehicles", "info"), (vehicle,))
        .await
        .map_err(|e| err(&e))?
        .into_rows_result()
        .map_err(|e| err(&e))?
        .maybe_first_row::<(Option<String>,)>()
        .map_err(|e| err(&e))?;
    let Some((info,)) = info else {
        return Err(StateError::UnknownVehicle(vehicle.to_string()));
    };
    let signal_rows = session
        .query_unpaged(q("signal_state", "code, value, availability"), (vehicle,))
        .await
        .map_err(|e| err(&e))?
        .into_rows_result()
        .map_err(|e| err(&e))?;
    let mut signals = Map::new();
    let mut unsupported = Vec::new();
    for row in signal_rows
        .rows::<(String, Option<String>, Option<String>)>()
        .map_err(|e| err(&e))?
    {
        let (code, value, availability) = row.map_err(|e| err(&e))?;
        let value = parse(value);
        let availability = parse(availability);
        let status = availability
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("available")
            .to_string();
        if status == "unsupported" {
            unsupported.push(Value::from(code.clone()));
        }
        // `webhook` or `poll`; values stored before polling existed all came from webhooks.
        let source = match (&value, value.get("source")) {
            (Value::Null, _) => Value::Null,
            (_, Some(s)) => s.clone(),
            (_, None) => Value::from("webhook"),
        };
        signals.insert(
            code,
            json!({
                "body": value.get("body").cloned().unwrap_or(Value::Null),
                "status": status,
                "oemUpdatedAt": value.get("oemUpdatedAt").cloned().unwrap_or(Value::Null),
                "fetchedAt": value.get("fetchedAt").cloned().unwrap_or(Value::Null),
                "eventId": value.get("eventId").cloned().unwrap_or(Value::Null),
                "logicVersion": value.get("logicVersion").cloned().unwrap_or(Value::Null),
                "source": source,
                "error": availability.get("error").cloned().filter(|e| !e.is_null() && status != "available"),
                "unavailableSince": (status != "available").then(|| availability.get("since").cloned()).flatten(),
            }),
        );
    }
    let error_rows = session
        .query_unpaged(q("vehicle_errors", "error_key, state"), (vehicle,))
        .await
        .map_err(|e| err(&e))?
        .into_rows_result()
        .map_err(|e| err(&e))?;
    let mut active = Vec::new();
    let mut needs_reconnect = false;
    let mut backoff_until: Option<i64> = None;
    for row in error_rows
        .rows::<(String, Option<String>)>()
        .map_err(|e| err(&e))?
    {
        let (key, state) = row.map_err(|e| err(&e))?;
        let state = parse(state);
        if state.get("state").and_then(Value::as_str) != Some("ERROR") {
            continue;
        }
        needs_reconnect |= state
            .get("needsReconnect")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if let Some(b) = state.get("backoffUntil").and_then(Value::as_i64) {
            backoff_until = Some(backoff_until.map_or(b, |x| x.max(b)));
        }
        let mut e = state.as_object().cloned().unwrap_or_default();
        e.insert("key".into(), Value::from(key));
        active.push(Value::Object(e));
    }
    Ok(json!({
        "vehicleId": vehicle,
        "vehicle": parse(info),
        "signals": signals,
        "needsReconnect": needs_reconnect,
        "unsupportedSignals": unsupported,
        "activeErrors": active,
        "rateLimitedUntil": backoff_until,
    }))
}
