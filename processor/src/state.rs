//! The current state of one vehicle as applications see it (`processor state <vehicle-id>`): the
//! stored cells rendered through [`crate::view`], so it is the very document the state changelog
//! carries.

use scylla::client::session::Session;
use serde_json::Value;

use crate::view::View;

/// Why the state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("vehicle {0} is unknown: no event for it has been applied")]
    UnknownVehicle(String),
    #[error("reading state of vehicle {vehicle}: {message}")]
    Store { vehicle: String, message: String },
}

/// A vehicle's stored cells and its bookkeeping row (last event seen), if any.
pub async fn stored_view(
    session: &Session,
    keyspace: &str,
    vehicle: &str,
) -> Result<(View, Option<Value>), StateError> {
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
        .map_err(|e| err(&e))?
        .map(|(info,)| {
            info.and_then(|d| serde_json::from_str(&d).ok())
                .unwrap_or(Value::Null)
        });
    let mut view = View::default();
    let signal_rows = session
        .query_unpaged(
            q(
                "signal_state",
                "code, value, WRITETIME(value), availability, WRITETIME(availability)",
            ),
            (vehicle,),
        )
        .await
        .map_err(|e| err(&e))?
        .into_rows_result()
        .map_err(|e| err(&e))?;
    for row in signal_rows
        .rows::<(
            String,
            Option<String>,
            Option<i64>,
            Option<String>,
            Option<i64>,
        )>()
        .map_err(|e| err(&e))?
    {
        let (code, value, value_ts, availability, availability_ts) = row.map_err(|e| err(&e))?;
        if let (Some(doc), Some(ts)) = (value, value_ts) {
            view.put_value(&code, &doc, ts);
        }
        if let (Some(doc), Some(ts)) = (availability, availability_ts) {
            view.put_availability(&code, &doc, ts);
        }
    }
    let error_rows = session
        .query_unpaged(
            q("vehicle_errors", "error_key, state, WRITETIME(state)"),
            (vehicle,),
        )
        .await
        .map_err(|e| err(&e))?
        .into_rows_result()
        .map_err(|e| err(&e))?;
    for row in error_rows
        .rows::<(String, Option<String>, Option<i64>)>()
        .map_err(|e| err(&e))?
    {
        let (key, state, ts) = row.map_err(|e| err(&e))?;
        if let (Some(doc), Some(ts)) = (state, ts) {
            view.put_error(&key, &doc, ts);
        }
    }
    Ok((view, info))
}

/// Reads the vehicle's state document (README, "Vehicle state document").
pub async fn vehicle_state(
    session: &Session,
    keyspace: &str,
    vehicle: &str,
) -> Result<Value, StateError> {
    let (view, info) = stored_view(session, keyspace, vehicle).await?;
    if info.is_none() && view.is_empty() {
        return Err(StateError::UnknownVehicle(vehicle.to_string()));
    }
    Ok(view.render(vehicle))
}

/// The state document plus `lastEvent`: the bookkeeping of the last event applied (its id, type,
/// delivery time, legacy details). Not part of the document, so not in the changelog.
pub async fn vehicle_state_with_last_event(
    session: &Session,
    keyspace: &str,
    vehicle: &str,
) -> Result<Value, StateError> {
    let (view, info) = stored_view(session, keyspace, vehicle).await?;
    if info.is_none() && view.is_empty() {
        return Err(StateError::UnknownVehicle(vehicle.to_string()));
    }
    let mut doc = view.render(vehicle);
    doc["lastEvent"] = info.unwrap_or(Value::Null);
    Ok(doc)
}
