//! The vehicle-state changelog (`kafka.state_topic`): exactly the records the events' changes call
//! for, in order, the last one equal to `processor state`. Crash and rebalance: tests/it/crash.rs.

use std::collections::BTreeMap;
use std::time::Duration;

use carhook_tests::*;
use rdkafka::message::OwnedMessage;
use rdkafka::Message;
use serde_json::{json, Value};
use shared::config::Settings;
use shared::headers;

const T0: i64 = 1_764_000_000_000;

fn state(event_id: &str, car: &str, signals: Value, delivered_at: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "eventId": event_id, "eventType": "VEHICLE_STATE",
        "data": {"user": {"id": "u"}, "vehicle": {"id": car}, "signals": signals},
        "meta": {"version": "4.0", "deliveryId": uuid::Uuid::new_v4().to_string(), "deliveredAt": delivered_at, "mode": "LIVE"}
    }))
    .unwrap_or_default()
}

fn soc(value: i64, oem: i64) -> Value {
    json!({"code": "tractionbattery-stateofcharge", "name": "StateOfCharge", "group": "TractionBattery",
        "body": {"unit": "percent", "value": value}, "meta": {"oemUpdatedAt": oem}})
}

fn odometer(value: i64, oem: i64) -> Value {
    json!({"code": "odometer-traveleddistance", "name": "TraveledDistance", "group": "Odometer",
        "body": {"unit": "km", "value": value}, "meta": {"oemUpdatedAt": oem}})
}

fn account_error(event_id: &str, car: &str, state: &str, delivered_at: i64) -> Vec<u8> {
    error_event(
        event_id,
        car,
        json!([{"type": "CONNECTED_SERVICES_ACCOUNT", "code": "SUBSCRIPTION", "state": state,
            "description": "subscription expired", "resolution": {"type": "REAUTHENTICATE"}, "signals": []}]),
        delivered_at,
    )
}

/// The changelog's records per vehicle, once `sentinel` (the last event, a change; ending in `:`,
/// any event id it begins) is in: every record before it in its partition is then committed too.
async fn records_until(
    s: &Settings,
    car: &str,
    sentinel: &str,
) -> BTreeMap<String, Vec<OwnedMessage>> {
    let brokers = s.kafka.brokers.clone();
    let topic = s.kafka.state_topic.clone();
    let (car, sentinel) = (car.to_owned(), sentinel.to_owned());
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let all = read_to_end(&brokers, &topic, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}"));
            let done = all.iter().any(|m| {
                m.key() == Some(car.as_bytes())
                    && header(m, headers::EVENT_ID).is_some_and(|id| {
                        id == sentinel || (sentinel.ends_with(':') && id.starts_with(&sentinel))
                    })
            });
            if done {
                let mut by: BTreeMap<String, Vec<OwnedMessage>> = BTreeMap::new();
                for m in all {
                    let k = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                    by.entry(k).or_default().push(m);
                }
                return by;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no change record of {sentinel} for {car}; records: {}",
                all.len()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The event id header of each record, in order.
fn event_ids(records: &[OwnedMessage]) -> Vec<String> {
    records
        .iter()
        .filter_map(|m| header(m, headers::EVENT_ID))
        .collect()
}

fn doc(m: &OwnedMessage) -> Value {
    serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_default()
}

#[tokio::test]
async fn only_real_changes_are_recorded_in_order_and_the_last_record_is_the_state() {
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "2")]);
    let _p = spawn_processor(&s).await;
    let car = "cl-car";
    let e1 = state("cl-e1", car, json!([soc(50, T0)]), T0 + 1_000);
    // The same event again, as Smartcar retries it (new delivery id, later delivery).
    let e1_again = state("cl-e1", car, json!([soc(50, T0)]), T0 + 2_000);
    // Older than what is stored: out of order, no change.
    let stale = state("cl-e0", car, json!([soc(40, T0 - 60_000)]), T0 + 3_000);
    // Partial failure: the charge level could not be read, a new odometer value could.
    let partial = state(
        "cl-e2",
        car,
        json!([{"code": "tractionbattery-stateofcharge", "name": "StateOfCharge", "group": "TractionBattery",
            "status": {"value": "ERROR", "error": {"type": "UPSTREAM", "code": "NO_RESPONSE"}}}, odometer(100, T0 + 4_000)]),
        T0 + 4_000,
    );
    let err = account_error("cl-e3", car, "ERROR", T0 + 5_000);
    let resolved = account_error("cl-e4", car, "RESOLVED", T0 + 6_000);
    // The same odometer reading again under another event id. At equal timestamps the store keeps
    // the greater document (the event id decides): this one loses, nothing a reader sees changes.
    let same = state("cl-a5", car, json!([odometer(100, T0 + 4_000)]), T0 + 7_000);
    let sentinel = state("cl-e6", car, json!([soc(55, T0 + 8_000)]), T0 + 8_000);
    // A legacy v2 body (readings ordered by sc-data-age) for two other vehicles, twice. It is keyed
    // by the first; the second's partition owner is asked to refresh it.
    let legacy = br#"{"version":"2.0","webhookId":"wh","eventName":"scheduled","mode":"live","payload":{"vehicles":[{"vehicleId":"cl-legacy","requestId":"cl-r1","data":[{"path":"/odometer","code":200,"body":{"distance":1234.5},"headers":{"sc-data-age":"2023-01-02T03:04:05.000Z"}}]},{"vehicleId":"cl-legacy-b","requestId":"cl-r2","data":[{"path":"/odometer","code":200,"body":{"distance":99.5},"headers":{"sc-data-age":"2023-01-02T03:04:06.000Z"}}]}]}}"#.to_vec();
    let records: Vec<(Option<&str>, &[u8])> = [
        &e1, &e1_again, &stale, &partial, &err, &resolved, &same, &sentinel,
    ]
    .into_iter()
    .map(|b| (Some(car), b.as_slice()))
    .chain([
        (Some("cl-legacy"), legacy.as_slice()),
        (Some("cl-legacy"), legacy.as_slice()),
    ])
    .collect();
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &records).await;
    let by = records_until(&s, car, "cl-e6").await;
    let mine = by.get(car).cloned().unwrap_or_default();
    let ids = event_ids(&mine);
    assert_eq!(
        ids,
        ["cl-e1", "cl-e2", "cl-e3", "cl-e4", "cl-e6"],
        "one record per real change: no duplicate, stale or no-op event"
    );
    let changed: Vec<String> = mine
        .iter()
        .filter_map(|m| header(m, headers::CHANGED))
        .collect();
    assert_eq!(changed[0], "tractionbattery-stateofcharge");
    assert_eq!(
        changed[1],
        "odometer-traveleddistance,tractionbattery-stateofcharge"
    );
    assert!(
        changed[2].starts_with("error:") && changed[2] == changed[3],
        "{changed:?}"
    );
    let types: Vec<String> = mine
        .iter()
        .filter_map(|m| header(m, headers::EVENT_TYPE))
        .collect();
    assert_eq!(types[2], "VEHICLE_ERROR");
    let docs: Vec<Value> = mine.iter().map(doc).collect();
    assert_eq!(docs[0]["version"], 1);
    assert_eq!(
        docs[1]["signals"]["tractionbattery-stateofcharge"]["status"],
        "unavailable"
    );
    assert_eq!(
        docs[1]["signals"]["tractionbattery-stateofcharge"]["body"]["value"], 50,
        "last good value kept"
    );
    assert_eq!(docs[2]["needsReconnect"], true);
    assert_eq!(docs[3]["needsReconnect"], false);
    assert!(
        docs.iter()
            .all(|d| d.get("lastEvent").is_none() && d.get("vehicle").is_none()),
        "no bookkeeping in the document"
    );
    let state = state_document(&s, car).await.unwrap_or_default();
    assert_eq!(
        docs.last(),
        Some(&state),
        "the last record is the current state"
    );
    // The legacy vehicle: one record (the second copy is a duplicate), equal to its state.
    let legacy_records = by.get("cl-legacy").cloned().unwrap_or_default();
    assert_eq!(legacy_records.len(), 1, "legacy body recorded once");
    assert_eq!(
        Some(doc(&legacy_records[0])),
        state_document(&s, "cl-legacy").await,
    );
    assert_eq!(
        doc(&legacy_records[0])["signals"]["v2-odometer"]["body"]["distance"],
        1234.5
    );
    let b = records_until(&s, "cl-legacy-b", "refresh:").await;
    let b = b.get("cl-legacy-b").cloned().unwrap_or_default();
    assert_eq!(
        b.len(),
        1,
        "the second vehicle recorded once, by its own partition's owner"
    );
    assert_eq!(
        header(&b[0], headers::EVENT_TYPE).as_deref(),
        Some("CARHOOK_STATE_REFRESH")
    );
    assert_eq!(Some(doc(&b[0])), state_document(&s, "cl-legacy-b").await);
    assert_eq!(
        doc(&b[0])["signals"]["v2-odometer"]["body"]["distance"],
        99.5
    );
}

#[tokio::test]
async fn a_restarted_processor_restores_its_views_from_the_changelog_not_from_the_store() {
    // After a restart the processor's views come from the changelog; a stale event then still
    // writes nothing, and a fresh one writes exactly one record.
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "2")]);
    let car = "cl-restart";
    {
        let p = spawn_processor(&s).await;
        let first = state("rs-1", car, json!([soc(70, T0), odometer(10, T0)]), T0);
        produce_raw(
            &s.kafka.brokers,
            &s.kafka.events_topic,
            &[(Some(car), &first)],
        )
        .await;
        records_until(&s, car, "rs-1").await;
        p.stop().await;
    }
    let _p = spawn_processor(&s).await;
    let stale = state("rs-0", car, json!([soc(60, T0 - 1_000)]), T0 + 1_000);
    let fresh = state("rs-2", car, json!([odometer(11, T0 + 2_000)]), T0 + 2_000);
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(car), &stale), (Some(car), &fresh)],
    )
    .await;
    let by = records_until(&s, car, "rs-2").await;
    let mine = by.get(car).cloned().unwrap_or_default();
    let ids = event_ids(&mine);
    assert_eq!(ids, ["rs-1", "rs-2"]);
    assert_eq!(
        mine.last()
            .and_then(|m| header(m, headers::CHANGED))
            .as_deref(),
        Some("odometer-traveleddistance"),
        "the restored view knew the charge level: only the odometer changed"
    );
    assert_eq!(Some(doc(&mine[1])), state_document(&s, car).await);
}

/// An error resolved twice: the second resolution wins in the store without changing the
/// document, so no record carries its write time. A late ERROR dated between the two resolutions
/// then loses in the store and must not be recorded, whether the view that settles it stayed in
/// memory, was dropped from the cache and read back (`cache_bytes` "1": every view is dropped once
/// its records commit), or was restored by a new processor (`restart`).
async fn a_late_error_between_two_resolutions_is_not_recorded(cache_bytes: &str, restart: bool) {
    let s = settings(&[
        ("CARHOOK__KAFKA__PARTITIONS", "2"),
        ("CARHOOK__PROCESSOR__CHANGELOG_CACHE_BYTES", cache_bytes),
    ]);
    let mut p = spawn_processor(&s).await;
    let car = "cl-late";
    let events = [
        account_error("ev-1", car, "ERROR", T0 + 1_000),
        account_error("ev-2", car, "RESOLVED", T0 + 2_000),
        account_error("ev-3", car, "RESOLVED", T0 + 4_000),
        account_error("ev-late", car, "ERROR", T0 + 3_000),
        state("ev-5", car, json!([soc(40, T0 + 5_000)]), T0 + 5_000),
    ];
    let mut committed = 0.0;
    for (i, e) in events.iter().enumerate() {
        if restart && i == 3 {
            p.stop().await;
            p = spawn_processor(&s).await;
            committed = 0.0;
        }
        produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &[(Some(car), e)]).await;
        // Committed (counted after the commit) before the next is sent.
        committed += 1.0;
        eventually(Duration::from_secs(30), || async {
            metric_value(p.addr, "carhook_processor_events_total").await >= committed
        })
        .await;
    }
    let by = records_until(&s, car, "ev-5").await;
    let mine = by.get(car).cloned().unwrap_or_default();
    let ids = event_ids(&mine);
    assert_eq!(ids, ["ev-1", "ev-2", "ev-5"]);
    assert_eq!(mine.last().map(doc), state_document(&s, car).await);
    if cache_bytes == "1" && !restart {
        // Each event after the first reads the view back once: the view loaded while the event's
        // cells are written is kept for it until it commits.
        assert_eq!(
            metric_value(
                p.addr,
                "carhook_processor_changelog_view_loads_total{from=\"changelog\"}"
            )
            .await,
            4.0,
            "one read back per event after the first"
        );
    }
}

#[tokio::test]
async fn a_view_dropped_from_the_cache_and_read_back_settles_a_late_event_as_the_store_does() {
    a_late_error_between_two_resolutions_is_not_recorded("1", false).await;
}

#[tokio::test]
async fn a_view_restored_after_a_restart_settles_a_late_event_as_the_store_does() {
    a_late_error_between_two_resolutions_is_not_recorded("33554432", true).await;
}

#[tokio::test]
async fn a_view_restored_then_read_back_by_offset_settles_a_late_event_as_the_store_does() {
    a_late_error_between_two_resolutions_is_not_recorded("1", true).await;
}

#[tokio::test]
async fn with_the_changelog_off_nothing_is_written_to_it() {
    let s = settings(&[("CARHOOK__PROCESSOR__CHANGELOG", "false")]);
    let p = spawn_processor(&s).await;
    let car = "cl-off";
    let e = state("off-1", car, json!([soc(10, T0)]), T0);
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &[(Some(car), &e)]).await;
    state_where(&s, car, |v| {
        v["signals"]["tractionbattery-stateofcharge"]["body"]["value"] == 10
    })
    .await;
    eventually(Duration::from_secs(30), || async {
        metric_value(
            p.addr,
            "carhook_processor_events_total{outcome=\"applied\"}",
        )
        .await
            >= 1.0
    })
    .await;
    assert_eq!(record_count(&s.kafka.brokers, &s.kafka.state_topic), 0);
}

/// Plays a previous owner that applied `records` to the store and died before its transaction
/// committed: their effects are in the store, their offsets and change records are not.
async fn apply_without_committing(s: &Settings, records: &[OwnedMessage]) {
    use carhook_processor::pipeline::{Pipeline, PipelineSettings};
    let session = std::sync::Arc::new(
        shared::cql::connect(&s.cql)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let store = carhook_processor::store::Store::prepare(session, &s.cql.keyspace, 7)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let metrics = carhook_processor::metrics::Metrics::register(
        &mut prometheus_client::registry::Registry::default(),
    );
    let pipeline = Pipeline::new(
        store,
        PipelineSettings {
            instance_id: "dead-owner".into(),
            logic_version: 1,
            rate_limit_backoff_secs: 900,
            max_attempts: 3,
            max_clock_skew_ms: 60_000,
        },
        metrics,
    );
    for m in records {
        pipeline
            .handle(m)
            .await
            .unwrap_or_else(|e| panic!("previous owner: {e}"));
    }
}

#[tokio::test]
async fn records_a_dead_owner_applied_but_never_committed_get_their_change_records_from_the_next() {
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "2")]);
    // `old` has committed history: one record in the changelog.
    {
        let p = spawn_processor(&s).await;
        let first = state("old-0", "cl-old", json!([odometer(0, T0)]), T0);
        produce_raw(
            &s.kafka.brokers,
            &s.kafka.events_topic,
            &[(Some("cl-old"), &first)],
        )
        .await;
        records_until(&s, "cl-old", "old-0").await;
        p.stop().await;
    }
    let mut events = Vec::new();
    for (car, prefix, from) in [("cl-old", "old", 1), ("cl-new", "new", 0)] {
        for i in from..3 {
            events.push((
                car,
                state(
                    &format!("{prefix}-{i}"),
                    car,
                    json!([odometer(i, T0 + i * 1_000)]),
                    T0 + i * 1_000,
                ),
            ));
        }
    }
    let refs: Vec<(Option<&str>, &[u8])> = events
        .iter()
        .map(|(c, b)| (Some(*c), b.as_slice()))
        .collect();
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &refs).await;
    let brokers = s.kafka.brokers.clone();
    let topic = s.kafka.events_topic.clone();
    let uncommitted: Vec<OwnedMessage> =
        tokio::task::spawn_blocking(move || read_to_end(&brokers, &topic, Duration::from_secs(30)))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .filter(|m| header_or_body_id(m) != "old-0")
            .collect();
    assert_eq!(uncommitted.len(), 5);
    apply_without_committing(&s, &uncommitted).await;
    // The store already shows the last values; the next owner must still record every change.
    let _p = spawn_processor(&s).await;
    records_until(&s, "cl-new", "new-2").await;
    let by = records_until(&s, "cl-old", "old-2").await;
    for (car, want) in [
        ("cl-old", vec!["old-0", "old-1", "old-2"]),
        ("cl-new", vec!["new-0", "new-1", "new-2"]),
    ] {
        let recs = by.get(car).cloned().unwrap_or_default();
        let ids = event_ids(&recs);
        assert_eq!(ids, want, "{car}: one record per change, in order");
        let values: Vec<Value> = recs
            .iter()
            .map(|m| doc(m)["signals"]["odometer-traveleddistance"]["body"]["value"].clone())
            .collect();
        assert_eq!(values.last(), Some(&json!(2)));
        assert_eq!(
            values,
            (3 - want.len() as i64..3)
                .map(|i| json!(i))
                .collect::<Vec<_>>(),
            "{car}: each record shows the state right after its event, not the store's later state"
        );
        assert_eq!(recs.last().map(doc), state_document(&s, car).await);
    }
}

fn header_or_body_id(m: &OwnedMessage) -> String {
    serde_json::from_slice::<Value>(m.payload().unwrap_or_default())
        .ok()
        .and_then(|v| v["eventId"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[tokio::test]
async fn replay_with_emit_changes_records_the_corrected_state_through_the_live_processor() {
    use carhook_processor::replay::{self, Bound, ReplayRequest};
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "2")]);
    let _live = spawn_processor(&s).await;
    let car = "cl-replay";
    let first = state("rp-1", car, json!([soc(40, T0), odometer(5, T0)]), T0);
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(car), &first)],
    )
    .await;
    records_until(&s, car, "rp-1").await;
    // The operator replays with fixed logic (a new logic version): the stored cells change.
    let mut fixed = s.clone();
    fixed.processor.logic_version = 2;
    let session = std::sync::Arc::new(
        shared::cql::connect(&s.cql)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let store = carhook_processor::store::Store::prepare(session, &s.cql.keyspace, 7)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let sum = replay::replay(
        &fixed,
        &store,
        &ReplayRequest {
            from: Bound::Offsets(BTreeMap::new()),
            to: None,
            vehicle: None,
            dry_run: false,
            group: None,
            max_records: None,
            max_rate: None,
            emit_changes: true,
        },
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sum.refresh_requested, 1, "{sum:?}");
    // The live processor records the corrected state...
    let brokers = s.kafka.brokers.clone();
    let topic = s.kafka.state_topic.clone();
    let refreshed = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let all = read_to_end(&brokers, &topic, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{e}"));
            if let Some(m) = all.into_iter().find(|m| {
                header(m, headers::EVENT_TYPE).as_deref() == Some("CARHOOK_STATE_REFRESH")
            }) {
                return m;
            }
            assert!(std::time::Instant::now() < deadline, "no refresh record");
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let d = doc(&refreshed);
    assert_eq!(d["signals"]["odometer-traveleddistance"]["logicVersion"], 2);
    assert_eq!(Some(d), state_document(&s, car).await);
    // ...and its view knows it: the next live change's record still equals the state.
    let next = state("rp-2", car, json!([soc(41, T0 + 1_000)]), T0 + 1_000);
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(car), &next)],
    )
    .await;
    let by = records_until(&s, car, "rp-2").await;
    let last = by.get(car).and_then(|r| r.last()).map(doc);
    assert_eq!(
        last.as_ref()
            .map(|d| d["signals"]["odometer-traveleddistance"]["logicVersion"].clone()),
        Some(json!(2))
    );
    assert_eq!(last, state_document(&s, car).await);
}
