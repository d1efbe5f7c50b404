//! The two promises under the inputs and timings real Smartcar traffic and real clusters produce:
//! each event has exactly one effect, and the freshest value wins. Each test pins one behaviour
//! against the real broker and store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use carhook_processor::replay::{self, Bound, ReplayRequest};
use carhook_processor::store::Store;
use carhook_tests::*;
use serde_json::{json, Value};
use shared::config::Settings;
use shared::headers;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

async fn metric(p: &Running, line_prefix: &str) -> f64 {
    metric_value(p.addr, line_prefix).await
}

fn now_ms() -> i64 {
    shared::clock::EpochMillis::now().as_i64()
}

/// A VEHICLE_STATE body with explicit delivery time; signals are (code, status-or-body, oem).
fn state_body(event_id: &str, vehicle: &str, signals: Value, delivered_at: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "eventId": event_id, "eventType": "VEHICLE_STATE",
        "data": {"vehicle": {"id": vehicle}, "signals": signals},
        "meta": {"version": "4.0", "deliveryId": uuid::Uuid::new_v4().to_string(), "deliveredAt": delivered_at, "mode": "LIVE"}
    }))
    .unwrap_or_default()
}

async fn session(s: &Settings) -> scylla::client::session::Session {
    shared::cql::connect(&s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn action_kinds(s: &Settings, expected: usize) -> Vec<String> {
    read_topic(&s.kafka.brokers, &s.kafka.actions_topic, expected, WAIT)
        .iter()
        .filter_map(|m| header(m, headers::ACTION_TYPE))
        .collect()
}

#[tokio::test]
async fn a_fresh_value_is_not_shown_unavailable_because_the_car_clock_lags_delivery() {
    let s = settings(&[]);
    let p = spawn_processor(&s).await;
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let car = "car-lag";
    let t0 = now_ms() - 600_000;
    // Delivered at t0: the signal could not be read.
    let failed = state_body(
        "lag-1",
        car,
        json!([{"code": "tractionbattery-stateofcharge", "status": {"value": "ERROR", "error": {"type": "UPSTREAM", "code": "NO_RESPONSE"}}}]),
        t0,
    );
    // Delivered ten seconds later: a good value the car produced a minute before t0 (normal lag).
    let good = state_body(
        "lag-2",
        car,
        json!([{"code": "tractionbattery-stateofcharge", "body": {"unit": "percent", "value": 64}, "meta": {"oemUpdatedAt": t0 - 60_000}}]),
        t0 + 10_000,
    );
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(car), &failed), (Some(car), &good)],
    )
    .await;
    let st = state_where(&s, car, |v| {
        v["lastEvent"]["lastEventId"] == "lag-2"
            && v["signals"]["tractionbattery-stateofcharge"]["body"]["value"] == 64
    })
    .await;
    assert_eq!(
        st["signals"]["tractionbattery-stateofcharge"]["status"], "available",
        "the later delivery says the signal is available: {st:#}"
    );
    p.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn a_far_future_car_clock_neither_freezes_the_signal_nor_dead_letters_the_event() {
    let s = settings(&[]);
    let p = spawn_processor(&s).await;
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let car = "car-future";
    let now = now_ms();
    let ten_years = 10 * 365 * 86_400_000_i64;
    let broken = state_body(
        "future-1",
        car,
        json!([{"code": "odometer-traveleddistance", "body": {"unit": "km", "value": 1}, "meta": {"oemUpdatedAt": now + ten_years}}]),
        now - 5_000,
    );
    let next = state_body(
        "future-2",
        car,
        json!([{"code": "odometer-traveleddistance", "body": {"unit": "km", "value": 2}, "meta": {"oemUpdatedAt": now - 1_000}}]),
        now,
    );
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(car), &broken), (Some(car), &next)],
    )
    .await;
    let st = state_where(&s, car, |v| v["lastEvent"]["lastEventId"] == "future-2").await;
    assert_eq!(
        st["signals"]["odometer-traveleddistance"]["body"]["value"], 2,
        "a value from a broken clock must not freeze the signal: {st:#}"
    );
    eventually(WAIT, || async {
        metric(
            &p,
            r#"carhook_processor_untrusted_timestamps_total{clock="oem_updated_at"}"#,
        )
        .await
            == 1.0
    })
    .await;
    assert_eq!(
        metric(
            &p,
            r#"carhook_processor_events_total{outcome="dead_lettered"}"#
        )
        .await,
        0.0
    );
    p.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn actions_follow_the_reconnect_flag_so_the_last_action_agrees_with_state() {
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "1")]);
    let p = spawn_processor(&s).await;
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let car = "car-flag";
    let t0 = 1_761_896_351_529_i64;
    let perm = |state: &str| json!([{"type": "PERMISSION", "code": null, "state": state}]);
    let events = [
        error_event("flag-a", car, perm("ERROR"), t0), // clear -> set: REQUIRED
        error_event("flag-b", car, perm("ERROR"), t0 + 2_000), // already set: nothing
        error_event("flag-c", car, perm("RESOLVED"), t0 + 1_000), // older than b: nothing
        error_event("flag-d", car, perm("RESOLVED"), t0 + 3_000), // set -> clear: RESOLVED
        error_event("flag-e", car, perm("RESOLVED"), t0 + 4_000), // already clear: nothing
    ];
    let recs: Vec<(Option<&str>, &[u8])> =
        events.iter().map(|e| (Some(car), e.as_slice())).collect();
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &recs).await;
    let st = state_where(&s, car, |v| v["lastEvent"]["lastEventId"] == "flag-e").await;
    assert_eq!(st["needsReconnect"], false);
    eventually(WAIT, || async {
        metric(&p, r#"carhook_processor_events_total{outcome="applied"}"#).await == 5.0
    })
    .await;
    assert_eq!(
        action_kinds(&s, 2),
        vec!["RECONNECT_REQUIRED", "RECONNECT_RESOLVED"],
        "one action per real change of the flag, the last one agreeing with state"
    );
    p.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn an_owner_reapplied_after_its_dead_letter_aborted_keeps_its_claim_and_a_later_copy_stays_a_duplicate(
) {
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "1")]);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    carhook_processor::migrate(&s)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let car = "car-dl";
    let t0 = 1_761_896_351_529_i64;
    // The state a crash leaves: offset 0 claimed the event, failed, was marked dead-lettered, and
    // the transaction carrying its dead letter aborted. Offset 0 will be delivered again.
    let db = session(&s).await;
    db.query_unpaged(
        format!(
            "INSERT INTO {}.processed_events (event_id, status, topic, partition, \"offset\", vehicle_id, claimed_by) \
             VALUES ('dl-1', 'dead_lettered', ?, 0, 0, ?, 'crashed') USING TTL 604800",
            s.cql.keyspace
        ),
        (&s.kafka.events_topic, car),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let perm = json!([{"type": "PERMISSION", "code": null, "state": "ERROR"}]);
    let owner = error_event("dl-1", car, perm.clone(), t0);
    let retry = error_event("dl-1", car, perm, t0 + 25_000);
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(car), &owner), (Some(car), &retry)],
    )
    .await;
    let p = spawn_processor(&s).await;
    eventually(WAIT, || async {
        metric(&p, r#"carhook_processor_events_total{outcome="duplicate"}"#).await == 1.0
    })
    .await;
    assert_eq!(
        action_kinds(&s, 1),
        vec!["RECONNECT_REQUIRED"],
        "the retry copy must not apply the event a second time"
    );
    let (status, ttl): (Option<String>, Option<i32>) = db
        .query_unpaged(
            format!(
                "SELECT status, TTL(status) FROM {}.processed_events WHERE event_id = 'dl-1'",
                s.cql.keyspace
            ),
            (),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_rows_result()
        .unwrap_or_else(|e| panic!("{e}"))
        .first_row()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(status.as_deref(), Some("claimed"));
    assert!(
        ttl.is_some_and(|t| t > 0),
        "status has the claim's TTL: {ttl:?}"
    );
    p.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn replay_applies_only_the_owner_copy_with_the_delivery_time_of_its_claim() {
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "1")]);
    let p = spawn_processor(&s).await;
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let car = "car-retry";
    let t0 = 1_761_896_351_529_i64;
    let perm = |state: &str| json!([{"type": "PERMISSION", "code": null, "state": state}]);
    // The ERROR's first copy, its resolution, then Smartcar's retry of the ERROR with a refreshed
    // deliveredAt (the first copy's acknowledgement was lost).
    let recs = [
        error_event("retry-err", car, perm("ERROR"), t0),
        error_event("retry-ok", car, perm("RESOLVED"), t0 + 20_000),
        error_event("retry-err", car, perm("ERROR"), t0 + 50_000),
    ];
    let recs: Vec<(Option<&str>, &[u8])> = recs.iter().map(|e| (Some(car), e.as_slice())).collect();
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &recs).await;
    eventually(WAIT, || async {
        metric(&p, r#"carhook_processor_events_total{outcome="duplicate"}"#).await == 1.0
    })
    .await;
    let st = state_where(&s, car, |v| v["lastEvent"]["lastEventId"] == "retry-ok").await;
    assert_eq!(st["needsReconnect"], false);
    p.stop().await;

    let store = Store::prepare(Arc::new(session(&s).await), &s.cql.keyspace, 7)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let sum = replay::replay(
        &s,
        &store,
        &ReplayRequest {
            from: Bound::Offsets(BTreeMap::new()),
            to: None,
            vehicle: None,
            dry_run: false,
            group: None,
            max_records: None,
            max_rate: None,
            emit_changes: false,
        },
        CancellationToken::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(sum.complete, "{sum:?}");
    assert_eq!(sum.skipped, 1, "the retry copy is not the owner: {sum:?}");
    let after = vehicle_state(&s, car)
        .await
        .unwrap_or_else(|| panic!("no state"));
    assert_eq!(
        after["needsReconnect"], false,
        "replay must not let the retried ERROR beat the resolution: {after:#}"
    );
    assert_eq!(after["lastEvent"]["lastEventId"], "retry-ok");
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn legacy_v2_bodies_are_claimed_applied_per_vehicle_and_never_dead_lettered() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let p = spawn_processor(&s).await;
    let event_based = br#"{"version":"2.0","webhookId":"wh","eventName":"eventBased","mode":"test","payload":{"eventId":"lg-ev-1","vehicleId":"lg-car-a","eventType":"CHARGING_COMPLETED","eventTime":"2023-01-02T03:04:05.000Z"}}"#.to_vec();
    let scheduled = br#"{"version":"2.0","webhookId":"wh","eventName":"scheduled","mode":"live","payload":{"vehicles":[{"vehicleId":"lg-car-b","requestId":"lg-r1","data":[{"path":"/odometer","code":200,"body":{"distance":1234.5},"headers":{"sc-data-age":"2023-01-02T03:04:05.000Z","sc-unit-system":"metric"}},{"path":"/battery","code":409,"body":{"type":"VEHICLE_STATE","code":"ASLEEP","statusCode":409,"description":"The vehicle is asleep."}}]},{"vehicleId":"lg-car-c","requestId":"lg-r2","data":[{"path":"/odometer","code":200,"body":{"distance":99.5},"headers":{"sc-data-age":"2023-01-02T03:04:06.000Z"}}]}]}}"#.to_vec();
    let dynamic = br#"{"version":"2.0","webhookId":"wh","eventName":"dynamic","mode":"live","payload":{"vehicles":[{"vehicleId":"lg-car-d","data":[{"path":"/fuel","code":200,"body":{"percentRemaining":0.5},"headers":{"sc-data-age":"2023-01-02T03:04:07.000Z"}}]}]}}"#.to_vec();
    // The dynamic body twice: no event id, no request id; the body's hash makes the copies one event.
    for b in [&event_based, &scheduled, &dynamic, &dynamic] {
        assert_eq!(
            post(
                r.addr,
                "/webhooks/smartcar",
                b.clone(),
                Some(&sign(TOKEN, b))
            )
            .await
            .status,
            200
        );
    }
    let a = state_where(&s, "lg-car-a", |v| {
        v["lastEvent"]["lastEventId"] == "lg-ev-1"
    })
    .await;
    assert_eq!(a["lastEvent"]["legacy"]["eventType"], "CHARGING_COMPLETED");
    let b = state_where(&s, "lg-car-b", |v| {
        v["signals"].as_object().map(|o| o.len()) == Some(2)
    })
    .await;
    assert_eq!(b["signals"]["v2-odometer"]["body"]["distance"], 1234.5);
    assert_eq!(b["signals"]["v2-odometer"]["status"], "available");
    assert_eq!(b["signals"]["v2-battery"]["status"], "unavailable");
    assert_eq!(b["signals"]["v2-battery"]["error"]["code"], "ASLEEP");
    assert_eq!(b["lastEvent"]["lastEventId"], "v2-request:lg-r1,lg-r2");
    let c = state_where(&s, "lg-car-c", |v| !v["signals"]["v2-odometer"].is_null()).await;
    assert_eq!(c["signals"]["v2-odometer"]["body"]["distance"], 99.5);
    let d = state_where(&s, "lg-car-d", |v| !v["signals"]["v2-fuel"].is_null()).await;
    assert!(d["lastEvent"]["lastEventId"]
        .as_str()
        .is_some_and(|id| id.starts_with("sha256:")));
    eventually(WAIT, || async {
        metric(&p, r#"carhook_processor_events_total{outcome="duplicate"}"#).await == 1.0
    })
    .await;
    assert_eq!(
        metric(&p, r#"carhook_processor_events_total{outcome="applied"}"#).await,
        3.0
    );
    assert_eq!(
        metric(
            &p,
            r#"carhook_processor_events_total{outcome="dead_lettered"}"#
        )
        .await,
        0.0
    );
    assert_eq!(
        metric(
            &p,
            r#"carhook_processor_legacy_events_total{form="scheduled"}"#
        )
        .await,
        1.0
    );
    let dead = record_count(&s.kafka.brokers, &s.kafka.dlq_topic);
    assert_eq!(dead, 0, "no legacy body is dead-lettered");
    p.stop().await;
    r.stop().await;
    drop_keyspace(&s).await;
}
