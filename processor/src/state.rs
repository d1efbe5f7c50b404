//! The current state of one vehicle as applications see it (`processor state <vehicle-id>`): the
//! stored cells rendered through [`crate::view`], so it is the very document the state changelog
//! carries.

use scylla::client::session::Session;
use serde_json::Value;

use crate::store::{cells_from, ERROR_CELL_COLUMNS, SIGNAL_CELL_COLUMNS};
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
    let signals = session
        .query_unpaged(q("signal_state", SIGNAL_CELL_COLUMNS), (vehicle,))
        .await
        .map_err(|e| err(&e))?;
    let errors = session
        .query_unpaged(q("vehicle_errors", ERROR_CELL_COLUMNS), (vehicle,))
        .await
        .map_err(|e| err(&e))?;
    let mut view = View::default();
    for c in cells_from(signals, errors).map_err(|e| err(&e))? {
        view.put(&c);
    }
    Ok((view, info))
}

/// Reads the vehicle's state document (README, "Vehicle state document").
pub async fn vehicle_state(
    session: &Session,
    keyspace: &str,
    vehicle: &str,
) -> Result<Value, StateError> {
    read(session, keyspace, vehicle, false).await
}

/// The state document plus `lastEvent`: the bookkeeping of the last event applied (its id, type,
/// delivery time, legacy details). Not part of the document, so not in the changelog.
pub async fn vehicle_state_with_last_event(
    session: &Session,
    keyspace: &str,
    vehicle: &str,
) -> Result<Value, StateError> {
    read(session, keyspace, vehicle, true).await
}

async fn read(
    session: &Session,
    keyspace: &str,
    vehicle: &str,
    last_event: bool,
) -> Result<Value, StateError> {
    let (view, info) = stored_view(session, keyspace, vehicle).await?;
    if info.is_none() && view.is_empty() {
        return Err(StateError::UnknownVehicle(vehicle.to_string()));
    }
    let mut doc = view.render(vehicle);
    if last_event {
        doc["lastEvent"] = info.unwrap_or(Value::Null);
    }
    Ok(doc)
}
