//! Comparing the ground truth with what the system holds: vehicle state (read from the CQL tables
//! directly, never through the processor's own state view), the actions, dead-letter, events and
//! quarantine topics, whether every event was acknowledged and every VERIFY answered. Returns a
//! readable diff. Only this run's vehicles, events and bytes are judged, so it works against a
//! live deployment with other traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use shared::config::Settings;

use super::send::Delivery;
use super::truth::Truth;

/// Differences between truth and system; empty means they agree. `expect_dropped` is the number
/// of events a campaign intends to be dropped (never acknowledged after all of Smartcar's
/// attempts); any other number is a difference.
pub async fn diff(
    settings: &Settings,
    truth: &Truth,
    deliveries: &[Delivery],
    expect_dropped: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    if truth.dropped.len() != expect_dropped {
        let some: Vec<&String> = truth.dropped.iter().take(10).collect();
        out.push(format!(
            "{} event(s) never acknowledged after every attempt (expected {expect_dropped}), e.g. {some:?}",
            truth.dropped.len()
        ));
    }
    for d in deliveries
        .iter()
        .filter(|d| d.challenge_answered == Some(false))
    {
        out.push(format!(
            "VERIFY {}: a 2xx answer did not carry the HMAC of the challenge",
            d.event_id
        ));
    }
    out.extend(check_bytes(settings, truth, deliveries));
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
        let got = match read_state(&session, &settings.cql.keyspace, vehicle).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                out.push(format!("{vehicle}: no state in the store"));
                continue;
            }
            Err(e) => {
                out.push(format!("{vehicle}: reading state: {e}"));
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
        if read_state(&session, &settings.cql.keyspace, vehicle)
            .await
            .is_ok_and(|s| s.is_some())
        {
            out.push(format!(
                "{vehicle}: has state, but only unknown-type or rejected events were sent for it"
            ));
        }
    }
    if settings.processor.changelog {
        out.extend(check_changelog(settings, &session, truth).await);
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
    // Only this run's letters count: a live deployment has other traffic and earlier runs.
    let ours = truth.run_vehicles();
    let letters = carhook_processor::dlq::read_letters(settings)
        .map(|l| {
            l.iter()
                .filter(|x| {
                    use rdkafka::Message;
                    x.msg
                        .key()
                        .is_some_and(|k| ours.contains(String::from_utf8_lossy(k).as_ref()))
                })
                .count()
        })
        .unwrap_or(usize::MAX);
    if letters != truth.dead_letters {
        out.push(format!(
            "dead-letter topic holds {letters} letters, expected {}",
            truth.dead_letters
        ));
    }
    out
}

/// The state changelog of this run's vehicles: each has records, no record repeats the one before
/// it (a duplicate), and the last one is the vehicle's state document. Records commit with the
/// offsets, a moment after the state is written: read again for up to 20 s until they agree.
async fn check_changelog(
    settings: &Settings,
    session: &scylla::client::session::Session,
    truth: &Truth,
) -> Vec<String> {
    use rdkafka::Message;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut problems = Vec::new();
        let records = match crate::read_to_end(
            &settings.kafka.brokers,
            &settings.kafka.state_topic,
            Duration::from_secs(30),
        ) {
            Ok(r) => r,
            Err(e) => return vec![format!("state changelog: {e}")],
        };
        let mut by: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        for m in &records {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            if truth.vehicles.contains_key(&key) {
                let doc = serde_json::from_slice(m.payload().unwrap_or_default())
                    .unwrap_or(serde_json::Value::Null);
                by.entry(key).or_default().push(doc);
            }
        }
        for vehicle in truth.vehicles.keys() {
            let docs = by.get(vehicle).map(Vec::as_slice).unwrap_or_default();
            if let Some(w) = docs.windows(2).find(|w| w[0] == w[1]) {
                problems.push(format!(
                    "{vehicle}: state changelog repeats a record: {}",
                    w[1]
                ));
            }
            let state =
                carhook_processor::state::vehicle_state(session, &settings.cql.keyspace, vehicle)
                    .await
                    .ok();
            if docs.last() != state.as_ref() {
                problems.push(format!(
                    "{vehicle}: the last of {} state changelog record(s) is not its state",
                    docs.len()
                ));
            }
        }
        if problems.is_empty() || std::time::Instant::now() > deadline {
            let mut out = Vec::new();
            listed(&mut out, problems);
            return out;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Differences listed one per line up to this many per kind, then counted.
const LISTED: usize = 10;

fn listed(out: &mut Vec<String>, lines: Vec<String>) {
    let n = lines.len();
    out.extend(lines.into_iter().take(LISTED));
    if n > LISTED {
        out.push(format!("… and {} more like the above", n - LISTED));
    }
}

/// The raw bytes: every acknowledged delivery's exact bytes are on the events topic under the
/// event's vehicle; every record there keyed by one of this run's vehicles is byte-identical to
/// something sent (no re-serialisation, no foreign bytes); refused deliveries and VERIFY
/// challenges never reach it. The quarantine topic holds only refused bytes of this run, and some
/// of them when deliveries were refused (it is rate-limited, so not necessarily all).
fn check_bytes(settings: &Settings, truth: &Truth, deliveries: &[Delivery]) -> Vec<String> {
    use rdkafka::Message;
    let mut out = Vec::new();
    let within = Duration::from_secs(30);
    let events = match crate::read_to_end(
        &settings.kafka.brokers,
        &settings.kafka.events_topic,
        within,
    ) {
        Ok(r) => r,
        Err(e) => return vec![format!("cannot read the events topic: {e}")],
    };
    let quarantine = match crate::read_to_end(
        &settings.kafka.brokers,
        &settings.kafka.quarantine_topic,
        within,
    ) {
        Ok(r) => r,
        Err(e) => return vec![format!("cannot read the quarantine topic: {e}")],
    };
    let refused = |d: &Delivery| truth.rejected.contains(&d.event_id);
    let verify = |d: &Delivery| truth.verifies.contains(&d.event_id);
    // Digest → the event that sent it, by class.
    let mut accepted: BTreeMap<&str, &str> = BTreeMap::new();
    let mut forbidden: BTreeMap<&str, &str> = BTreeMap::new();
    for d in deliveries {
        for sent in &d.sent {
            if refused(d) || verify(d) {
                forbidden.insert(sent, &d.event_id);
            } else {
                accepted.insert(sent, &d.event_id);
            }
        }
    }
    let ours = truth.run_vehicles();
    let key_of = |m: &rdkafka::message::OwnedMessage| {
        m.key().map(|k| String::from_utf8_lossy(k).into_owned())
    };
    let mut on_topic: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    let (mut foreign_bytes, mut leaked) = (Vec::new(), Vec::new());
    for m in &events {
        if crate::header(m, shared::headers::CONTROL).is_some() {
            // The processor's own control records (a state refresh for a vehicle a legacy body
            // of another vehicle's partition wrote), not a delivery.
            continue;
        }
        let digest = super::send::digest(m.payload().unwrap_or_default());
        let key = key_of(m);
        if let Some(id) = forbidden.get(digest.as_str()) {
            leaked.push(format!(
                "events topic {}@{}: holds the bytes of {id}, which was refused or is a VERIFY",
                m.partition(),
                m.offset()
            ));
        } else if key.as_ref().is_some_and(|k| ours.contains(k))
            && !accepted.contains_key(digest.as_str())
        {
            foreign_bytes.push(format!(
                "events topic {}@{} keyed {}: bytes differ from every delivery sent",
                m.partition(),
                m.offset(),
                key.as_deref().unwrap_or_default()
            ));
        }
        on_topic.entry(digest).or_default().push(key);
    }
    let mut missing = Vec::new();
    for d in deliveries.iter().filter(|d| !refused(d) && !verify(d)) {
        let Some(acked) = &d.acked_sha256 else {
            continue;
        };
        match on_topic.get(acked) {
            None => missing.push(format!(
                "{}: acknowledged, but its bytes are not on the events topic",
                d.event_id
            )),
            Some(keys) if !keys.contains(&d.key) => missing.push(format!(
                "{}: on the events topic keyed {keys:?}, expected {:?}",
                d.event_id, d.key
            )),
            Some(_) => {}
        }
    }
    listed(&mut out, missing);
    listed(&mut out, foreign_bytes);
    listed(&mut out, leaked);
    let run_ids: BTreeSet<&str> = deliveries.iter().map(|d| d.event_id.as_str()).collect();
    let mut quarantined = 0usize;
    let mut wrong = Vec::new();
    for m in &quarantine {
        let digest = super::send::digest(m.payload().unwrap_or_default());
        let id = crate::header(m, shared::headers::EVENT_ID);
        let mine = accepted.contains_key(digest.as_str())
            || forbidden.contains_key(digest.as_str())
            || id.as_deref().is_some_and(|i| run_ids.contains(i));
        if !mine {
            continue;
        }
        match (
            accepted.get(digest.as_str()),
            forbidden.get(digest.as_str()),
        ) {
            (_, Some(id)) if truth.rejected.contains(*id) => quarantined += 1,
            (Some(id), _) | (_, Some(id)) => wrong.push(format!(
                "quarantine {}@{}: holds the bytes of {id}, which was not refused",
                m.partition(),
                m.offset()
            )),
            (None, None) => wrong.push(format!(
                "quarantine {}@{} ({}): bytes differ from every delivery sent",
                m.partition(),
                m.offset(),
                id.unwrap_or_default()
            )),
        }
    }
    listed(&mut out, wrong);
    let refused_requests: usize = deliveries
        .iter()
        .filter(|d| refused(d))
        .map(|d| d.sent.len())
        .sum();
    if refused_requests > 0 && quarantined == 0 {
        out.push(format!(
            "none of the {refused_requests} refused deliveries reached the quarantine topic"
        ));
    }
    out
}

/// One vehicle's state straight from the tables (`vehicles`, `signal_state`, `vehicle_errors`),
/// in the shape the comparison needs: `signals.{code}.{body,eventId,status}`, `needsReconnect`,
/// `unsupportedSignals`. None when the vehicle has no row.
async fn read_state(
    session: &scylla::client::session::Session,
    keyspace: &str,
    vehicle: &str,
) -> Result<Option<serde_json::Value>, String> {
    use serde_json::{json, Value};
    let rows = |table: &str, cols: &str| {
        format!("SELECT {cols} FROM {keyspace}.{table} WHERE vehicle_id = ?")
    };
    let doc = |d: Option<String>| -> Value {
        d.and_then(|d| serde_json::from_str(&d).ok())
            .unwrap_or(Value::Null)
    };
    let known = session
        .query_unpaged(rows("vehicles", "vehicle_id"), (vehicle,))
        .await
        .map_err(|e| e.to_string())?
        .into_rows_result()
        .map_err(|e| e.to_string())?
        .rows_num()
        > 0;
    if !known {
        return Ok(None);
    }
    let mut signals = serde_json::Map::new();
    let mut unsupported = Vec::new();
    let res = session
        .query_unpaged(
            rows("signal_state", "code, value, availability"),
            (vehicle,),
        )
        .await
        .map_err(|e| e.to_string())?
        .into_rows_result()
        .map_err(|e| e.to_string())?;
    for row in res
        .rows::<(String, Option<String>, Option<String>)>()
        .map_err(|e| e.to_string())?
    {
        let (code, value, availability) = row.map_err(|e| e.to_string())?;
        let (value, availability) = (doc(value), doc(availability));
        let status = availability["status"]
            .as_str()
            .unwrap_or("available")
            .to_string();
        if status == "unsupported" {
            unsupported.push(Value::from(code.clone()));
        }
        signals.insert(
            code,
            json!({"body": value["body"], "eventId": value["eventId"], "status": status}),
        );
    }
    let mut needs_reconnect = false;
    let res = session
        .query_unpaged(rows("vehicle_errors", "state"), (vehicle,))
        .await
        .map_err(|e| e.to_string())?
        .into_rows_result()
        .map_err(|e| e.to_string())?;
    for row in res.rows::<(Option<String>,)>().map_err(|e| e.to_string())? {
        let (state,) = row.map_err(|e| e.to_string())?;
        let state = doc(state);
        needs_reconnect |= state["state"] == "ERROR" && state["needsReconnect"] == true;
    }
    Ok(Some(json!({
        "signals": signals,
        "needsReconnect": needs_reconnect,
        "unsupportedSignals": unsupported,
    })))
}

/// Actions follow the reconnect flags: every id is a candidate and appears at most once, each
/// flag's actions (in topic order; one vehicle is one partition) alternate starting with
/// `RECONNECT_REQUIRED`, and the last agrees with the flag's final state.
fn check_actions(truth: &Truth, actions: &[rdkafka::message::OwnedMessage]) -> Vec<String> {
    use rdkafka::Message;
    let mut out = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut sequences: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let ours = truth.run_vehicles();
    for a in actions {
        // Only this run's vehicles: other traffic on a live system is not ours to judge.
        if !a
            .key()
            .is_some_and(|k| ours.contains(String::from_utf8_lossy(k).as_ref()))
        {
            continue;
        }
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
