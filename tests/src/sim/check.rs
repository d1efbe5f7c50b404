//! Comparing the ground truth with what the system holds: vehicle state (through the processor's
//! own state view), the actions topic and the dead-letter topic. Returns a readable diff.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use shared::config::Settings;

use super::send::Delivery;
use super::truth::Truth;

/// Differences between truth and system; empty means they agree.
pub async fn diff(settings: &Settings, truth: &Truth, deliveries: &[Delivery]) -> Vec<String> {
    let mut out = Vec::new();
    for d in deliveries
        .iter()
        .filter(|d| truth.rejected.contains(&d.event_id))
    {
        if d.statuses.iter().any(|s| *s != 401) {
            out.push(format!(
                "{}: invalid signature answered {:?}, expected 401 on every attempt",
                d.event_id, d.statuses
            ));
        }
    }
    let session = match shared::cql::connect(&settings.cql).await {
        Ok(s) => s,
        Err(e) => return vec![format!("cannot read state: {e}")],
    };
    for (vehicle, want) in &truth.vehicles {
        let got = match carhook_processor::state::vehicle_state(
            &session,
            &settings.cql.keyspace,
            vehicle,
        )
        .await
        {
            Ok(v) => v,
            Err(e) => {
                out.push(format!("{vehicle}: {e}"));
                continue;
            }
        };
        let empty = serde_json::Map::new();
        let signals = got["signals"].as_object().unwrap_or(&empty);
        for (code, s) in &want.signals {
            let Some(g) = signals.get(code) else {
                out.push(format!(
                    "{vehicle} {code}: missing, expected {} {:?}",
                    s.status, s.body
                ));
                continue;
            };
            if g["status"].as_str() != Some(s.status.as_str()) {
                out.push(format!(
                    "{vehicle} {code}: status {} , expected {}",
                    g["status"], s.status
                ));
            }
            if let Some(body) = &s.body {
                if &g["body"] != body || g["eventId"].as_str() != s.event_id.as_deref() {
                    out.push(format!(
                        "{vehicle} {code}: value {} from {}, expected {} from {:?}",
                        g["body"], g["eventId"], body, s.event_id
                    ));
                }
            }
        }
        let extra: Vec<&String> = signals
            .keys()
            .filter(|c| !want.signals.contains_key(*c))
            .collect();
        if !extra.is_empty() {
            out.push(format!("{vehicle}: unexpected signals {extra:?}"));
        }
        if got["needsReconnect"].as_bool() != Some(want.needs_reconnect()) {
            out.push(format!(
                "{vehicle}: needsReconnect {}, expected {}",
                got["needsReconnect"],
                want.needs_reconnect()
            ));
        }
        let unsupported: BTreeSet<String> = got["unsupportedSignals"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if unsupported != want.unsupported() {
            out.push(format!(
                "{vehicle}: unsupported {unsupported:?}, expected {:?}",
                want.unsupported()
            ));
        }
    }
    for vehicle in &truth.absent {
        if carhook_processor::state::vehicle_state(&session, &settings.cql.keyspace, vehicle)
            .await
            .is_ok()
        {
            out.push(format!(
                "{vehicle}: has state, but only unknown-type or rejected events were sent for it"
            ));
        }
    }
    let must_set = truth
        .flags
        .values()
        .flat_map(|f| f.values())
        .filter(|s| **s)
        .count();
    let actions = crate::read_topic(
        &settings.kafka.brokers,
        &settings.kafka.actions_topic,
        must_set,
        Duration::from_secs(20),
    );
    out.extend(check_actions(truth, &actions));
    let letters = carhook_processor::dlq::read_letters(settings)
        .map(|l| l.len())
        .unwrap_or(usize::MAX);
    if letters != truth.dead_letters {
        out.push(format!(
            "dead-letter topic holds {letters} letters, expected {}",
            truth.dead_letters
        ));
    }
    out
}

/// Actions follow the reconnect flags: every id is a candidate and appears at most once, each
/// flag's actions (in topic order; one vehicle is one partition) alternate starting with
/// `RECONNECT_REQUIRED`, and the last agrees with the flag's final state.
fn check_actions(truth: &Truth, actions: &[rdkafka::message::OwnedMessage]) -> Vec<String> {
    use rdkafka::Message;
    let mut out = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut sequences: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for a in actions {
        let id = crate::header(a, "carhook-action-id").unwrap_or_default();
        *counts.entry(id.clone()).or_default() += 1;
        let kind = crate::header(a, "carhook-action-type").unwrap_or_default();
        let vehicle = a
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let body: serde_json::Value =
            serde_json::from_slice(a.payload().unwrap_or_default()).unwrap_or_default();
        let key = match (body["errorType"].as_str(), body["errorCode"].as_str()) {
            (Some(t), Some(c)) => format!("{t}:{c}"),
            (Some(t), None) => t.to_string(),
            _ => String::new(),
        };
        sequences.entry((vehicle, key)).or_default().push(kind);
    }
    for (id, n) in &counts {
        if !truth.actions.contains(id) {
            out.push(format!("action {id}: unexpected"));
        } else if *n > 1 {
            out.push(format!("action {id}: emitted {n} times"));
        }
    }
    for (vehicle, flags) in &truth.flags {
        for (key, set) in flags {
            let seq = sequences
                .remove(&(vehicle.clone(), key.clone()))
                .unwrap_or_default();
            let alternates = seq.iter().enumerate().all(|(i, k)| {
                k == if i % 2 == 0 {
                    "RECONNECT_REQUIRED"
                } else {
                    "RECONNECT_RESOLVED"
                }
            });
            let agrees = if *set {
                seq.last().map(String::as_str) == Some("RECONNECT_REQUIRED")
            } else {
                seq.last().is_none_or(|k| k == "RECONNECT_RESOLVED")
            };
            if !alternates || !agrees {
                out.push(format!(
                    "actions for {vehicle} {key}: {seq:?}; must alternate from RECONNECT_REQUIRED and end {}",
                    if *set { "set (RECONNECT_REQUIRED)" } else { "clear" }
                ));
            }
        }
    }
    for ((vehicle, key), seq) in sequences {
        out.push(format!(
            "actions for {vehicle} {key}: {seq:?}, but no such reconnect flag was sent"
        ));
    }
    out
}
