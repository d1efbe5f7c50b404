//! The processor against real Kafka and CQL: exactly-once effects, freshest-wins state, error
//! actions, dead letters, rebalances and crashes.

use std::time::Duration;

use carhook_tests::*;
use rdkafka::Message;
use serde_json::{json, Value};
use shared::headers;

const WAIT: Duration = Duration::from_secs(60);

async fn metric(p: &Running, line_prefix: &str) -> f64 {
    let (_, text) = get(p.addr, "/metrics").await;
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn duplicate_delivery_applies_once() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let p = spawn_processor(&s).await;
    // Same eventId, different deliveryId (and so different bytes and signature): a Smartcar retry.
    let first = state_event(
        "evt-dup",
        "car-dup",
        &[(
            "tractionbattery-stateofcharge",
            json!({"unit":"percent","value":50}),
            1_731_940_328_000,
        )],
    );
    let retry = state_event(
        "evt-dup",
        "car-dup",
        &[(
            "tractionbattery-stateofcharge",
            json!({"unit":"percent","value":50}),
            1_731_940_328_000,
        )],
    );
    assert_ne!(first, retry);
    for b in [&first, &retry] {
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
    let st = state_where(&s, "car-dup", |v| {
        v["signals"]["tractionbattery-stateofcharge"]["body"]["value"] == 50
    })
    .await;
    assert_eq!(
        st["signals"]["tractionbattery-stateofcharge"]["eventId"],
        "evt-dup"
    );
    eventually(WAIT, || async {
        metric(&p, r#"carhook_processor_events_total{outcome="duplicate"}"#).await == 1.0
    })
    .await;
    assert_eq!(
        metric(&p, r#"carhook_processor_events_total{outcome="applied"}"#).await,
        1.0
    );
    p.stop().await;
    r.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn older_signal_never_overwrites_newer() {
    let s = settings(&[]);
    let p = spawn_processor(&s).await;
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let newer = state_event(
        "evt-new",
        "car-ooo",
        &[(
            "odometer-traveleddistance",
            json!({"unit":"km","value":200}),
            1_731_940_400_000,
        )],
    );
    let older = state_event(
        "evt-old",
        "car-ooo",
        &[
            (
                "odometer-traveleddistance",
                json!({"unit":"km","value":100}),
                1_731_940_300_000,
            ),
            (
                "charge-ischarging",
                json!({"value": true}),
                1_731_940_300_000,
            ),
        ],
    );
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some("car-ooo"), &newer), (Some("car-ooo"), &older)],
    )
    .await;
    let st = state_where(&s, "car-ooo", |v| {
        v["signals"]["charge-ischarging"]["body"]["value"] == true
    })
    .await;
    assert_eq!(
        st["signals"]["odometer-traveleddistance"]["body"]["value"], 200,
        "{st:#}"
    );
    assert_eq!(
        st["signals"]["odometer-traveleddistance"]["eventId"],
        "evt-new"
    );
    assert_eq!(
        st["signals"]["odometer-traveleddistance"]["oemUpdatedAt"],
        1_731_940_400_000_i64
    );
    p.stop().await;
    drop_keyspace(&s).await;
}

fn with_event_id(body: Vec<u8>, id: &str) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&body).unwrap_or_default();
    v["eventId"] = json!(id);
    serde_json::to_vec(&v).unwrap_or_default()
}

#[tokio::test]
async fn protocol_examples_partial_failure_and_legacy_are_handled() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let p = spawn_processor(&s).await;
    let legacy = br#"{"version":"2.0","eventId":"legacy-1","eventName":"schedule","payload":{"vehicleId":"v2car"}}"#.to_vec();
    let bodies = vec![
        example("vehicle_state.v4.signal-change.json"),
        with_event_id(
            example("vehicle_state.v4.responses-page-shape.json"),
            "page-shape-1",
        ),
        legacy,
    ];
    for b in &bodies {
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
    let st = state_where(&s, "9af13248-3b73-4c9d-9a4b-d937ce6bc8e2", |v| {
        v["signals"].as_object().map(|o| o.len()) == Some(3)
    })
    .await;
    assert_eq!(
        st["signals"]["charge-voltage"]["body"],
        json!({"unit":"volts","value":240})
    );
    assert_eq!(
        st["signals"]["tractionbattery-stateofcharge"]["status"],
        "available"
    );
    // responses-page shape: vehicle from data.vehicle.id; one signal not capable -> unsupported.
    let st = state_where(&s, "123e4567-e89b-12d3-a456-426614174000", |v| {
        v["signals"].as_object().map(|o| o.len()) == Some(3)
    })
    .await;
    assert_eq!(
        st["signals"]["location-preciselocation"]["body"]["latitude"],
        37.7749
    );
    assert_eq!(st["signals"]["location-isathome"]["status"], "unsupported");
    assert_eq!(st["unsupportedSignals"], json!(["location-isathome"]));
    // A later partial failure keeps the last good value and marks the signal unavailable.
    let failing = serde_json::to_vec(&json!({
        "eventId": "page-shape-2", "eventType": "VEHICLE_STATE",
        "data": {"vehicle": {"id": "123e4567-e89b-12d3-a456-426614174000"}, "signals": [
            {"code": "tractionbattery-stateofcharge", "status": {"value": "ERROR", "error": {"type": "UPSTREAM", "code": "NO_RESPONSE"}}},
            {"code": "location-preciselocation", "body": {"latitude": 1.5, "longitude": 2.5}, "meta": {"oemUpdatedAt": 1_758_668_800_000_i64}}
        ]},
        // Delivered after the example (1761896351529): availability follows the delivery clock.
        "meta": {"deliveredAt": 1_761_896_400_000_i64}
    })).unwrap_or_default();
    assert_eq!(
        post(
            r.addr,
            "/webhooks/smartcar",
            failing.clone(),
            Some(&sign(TOKEN, &failing))
        )
        .await
        .status,
        200
    );
    let st = state_where(&s, "123e4567-e89b-12d3-a456-426614174000", |v| {
        v["signals"]["tractionbattery-stateofcharge"]["status"] == "unavailable"
    })
    .await;
    let soc = &st["signals"]["tractionbattery-stateofcharge"];
    assert_eq!(soc["body"]["value"], 75, "last good value kept: {soc}");
    assert_eq!(soc["error"]["code"], "NO_RESPONSE");
    assert_eq!(
        st["signals"]["location-preciselocation"]["body"]["latitude"],
        1.5
    );
    eventually(WAIT, || async {
        metric(&p, r#"carhook_processor_legacy_events_total{form="other"}"#).await == 1.0
    })
    .await;
    // The legacy body is claimed and recorded as its vehicle's last event, not ignored.
    let v2 = state_where(&s, "v2car", |v| v["lastEvent"]["lastEventId"] == "legacy-1").await;
    assert_eq!(v2["lastEvent"]["legacy"]["eventName"], "schedule");
    assert!(
        vehicle_state(&s, "no-such-car").await.is_none(),
        "unknown vehicle has no state"
    );
    p.stop().await;
    r.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn vehicle_errors_flag_act_and_resolve() {
    let s = settings(&[]);
    let p = spawn_processor(&s).await;
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let car = "car-err";
    let t0 = 1_761_896_351_529_i64;
    let events = [
        error_event(
            "e1",
            car,
            json!([{"type":"PERMISSION","code":null,"state":"ERROR","description":"grant lacks scope","signals":[]}]),
            t0,
        ),
        error_event(
            "e2",
            car,
            json!([{"type":"COMPATIBILITY","code":"VEHICLE_NOT_CAPABLE","state":"ERROR","signals":[{"code":"location-preciselocation"}]}]),
            t0 + 1,
        ),
        error_event(
            "e3",
            car,
            json!([{"type":"UPSTREAM","code":"NO_RESPONSE","state":"ERROR"}]),
            t0 + 2,
        ),
        error_event(
            "e4",
            car,
            json!([{"type":"RATE_LIMIT","code":"VEHICLE","state":"ERROR"}]),
            t0 + 3,
        ),
        error_event(
            "e5",
            car,
            json!([{"type":"CONNECTED_SERVICES_ACCOUNT","code":"AUTHENTICATION_FAILED","state":"ERROR","resolution":{"type":"REAUTHENTICATE"}}]),
            t0 + 4,
        ),
    ];
    let recs: Vec<(Option<&str>, &[u8])> =
        events.iter().map(|e| (Some(car), e.as_slice())).collect();
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &recs).await;
    let st = state_where(&s, car, |v| {
        v["activeErrors"].as_array().map(Vec::len) == Some(5)
    })
    .await;
    assert_eq!(st["needsReconnect"], true);
    assert_eq!(
        st["unsupportedSignals"],
        json!(["location-preciselocation"])
    );
    assert!(st["rateLimitedUntil"].as_i64().is_some_and(|t| t > t0));
    // Resolve both reconnect errors (the PERMISSION one delivered out of order, older than it).
    let resolved = [
        error_event(
            "r1",
            car,
            json!([{"type":"PERMISSION","code":null,"state":"RESOLVED"}]),
            t0 + 10,
        ),
        error_event(
            "r5",
            car,
            json!([{"type":"CONNECTED_SERVICES_ACCOUNT","code":"AUTHENTICATION_FAILED","state":"RESOLVED","resolution":{"type":"REAUTHENTICATE"}}]),
            t0 + 11,
        ),
    ];
    let recs: Vec<(Option<&str>, &[u8])> =
        resolved.iter().map(|e| (Some(car), e.as_slice())).collect();
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &recs).await;
    let st = state_where(&s, car, |v| v["needsReconnect"] == false).await;
    assert_eq!(st["activeErrors"].as_array().map(Vec::len), Some(3));
    let actions = read_topic(&s.kafka.brokers, &s.kafka.actions_topic, 4, WAIT);
    let mut kinds: Vec<String> = actions
        .iter()
        .filter_map(|m| header(m, headers::ACTION_TYPE))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            "RECONNECT_REQUIRED",
            "RECONNECT_REQUIRED",
            "RECONNECT_RESOLVED",
            "RECONNECT_RESOLVED"
        ]
    );
    assert!(actions.iter().all(|m| m.key() == Some(car.as_bytes())));
    let body: Value =
        serde_json::from_slice(actions[0].payload().unwrap_or_default()).unwrap_or_default();
    assert_eq!(body["vehicleId"], car);
    p.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn poison_goes_to_the_dead_letter_topic_with_provenance_and_the_partition_continues() {
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "1")]);
    let p = spawn_processor(&s).await;
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let good = state_event(
        "after-poison",
        "car-p",
        &[(
            "charge-ischarging",
            json!({"value": false}),
            1_731_940_328_000,
        )],
    );
    let no_id =
        br#"{"eventType":"VEHICLE_STATE","vehicleId":"car-p","data":{"signals":[]}}"#.to_vec();
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[
            (Some("car-p"), b"{not json".as_slice()),
            (Some("car-p"), no_id.as_slice()),
            (Some("car-p"), good.as_slice()),
        ],
    )
    .await;
    state_where(&s, "car-p", |v| {
        v["signals"]["charge-ischarging"]["body"]["value"] == false
    })
    .await;
    let dead = read_topic(&s.kafka.brokers, &s.kafka.dlq_topic, 2, WAIT);
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].payload(), Some(&b"{not json"[..]));
    assert_eq!(dead[0].key(), Some(&b"car-p"[..]));
    assert_eq!(
        header(&dead[0], headers::DLQ_ERROR_CLASS).as_deref(),
        Some("not_json")
    );
    assert_eq!(
        header(&dead[0], headers::DLQ_ORIGINAL_TOPIC).as_deref(),
        Some(s.kafka.events_topic.as_str())
    );
    assert_eq!(
        header(&dead[0], headers::DLQ_ORIGINAL_PARTITION).as_deref(),
        Some("0")
    );
    assert_eq!(
        header(&dead[0], headers::DLQ_ORIGINAL_OFFSET).as_deref(),
        Some("0")
    );
    assert_eq!(
        header(&dead[1], headers::DLQ_ERROR_CLASS).as_deref(),
        Some("missing_field")
    );
    assert!(header(&dead[1], headers::DLQ_ERROR_MESSAGE).is_some_and(|m| m.contains("eventId")));
    assert!(header(&dead[1], headers::DLQ_ATTEMPTS).is_some());
    assert!(header(&dead[1], headers::DLQ_FIRST_FAILURE_AT).is_some());
    p.stop().await;
    drop_keyspace(&s).await;
}

/// The harness runs services on runtimes of their own: a test blocked in a synchronous Kafka read
/// must not freeze the processor it is waiting for (before, the processor shared the test's
/// single-threaded runtime, its transaction outlived `transaction.timeout.ms` and was aborted by
/// the broker, and the reader saw nothing).
#[tokio::test]
async fn processor_commits_while_the_test_thread_is_blocked_reading() {
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "1")]);
    let p = spawn_processor(&s).await;
    let car = "car-blocked-reader";
    let e = error_event(
        "blocked-1",
        car,
        json!([{"type":"PERMISSION","code":null,"state":"ERROR"}]),
        1_761_896_351_529,
    );
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &[(Some(car), &e)]).await;
    // Blocks this thread (and with it the test's runtime) until the action is visible.
    let actions = read_topic(&s.kafka.brokers, &s.kafka.actions_topic, 1, WAIT);
    assert_eq!(actions.len(), 1, "the action was never committed");
    assert_eq!(
        header(&actions[0], headers::ACTION_TYPE).as_deref(),
        Some("RECONNECT_REQUIRED")
    );
    p.stop().await;
    drop_keyspace(&s).await;
}

/// librdkafka (2.12.1) aborts the whole process, `BUG: Invalid transaction state transition`, when
/// a resumed commit call runs out in its first stage while an earlier call's `EndTxn` is still in
/// flight ([`carhook_processor::txn`]). The processor resumed commits called with a short timeout
/// (`commit_timeout_ms = 0` in a test), and two CI runs died this way; this test, run through that
/// resume path, died 3 runs out of 3. Several producers (the race needs clients competing for the
/// CPU) commit thousands of transactions through the processor's transactional calls: every record
/// must be committed, and the process must live.
#[tokio::test]
async fn thousands_of_concurrent_commits_all_land_and_never_abort_the_process() {
    use futures::future::join_all;
    use rdkafka::producer::{FutureRecord, Producer};

    const PRODUCERS: usize = 3;
    const TRANSACTIONS: usize = 1500;
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "3")]);
    warm_transactions(&s).await;
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let topic = s.kafka.events_topic.clone();
    let mut producers = Vec::new();
    for i in 0..PRODUCERS {
        let (s, topic) = (s.clone(), topic.clone());
        producers.push(tokio::spawn(async move {
            let p = carhook_processor::consumer::transactional_producer(&s, &fresh("txn-resume"))
                .unwrap_or_else(|e| panic!("{e}"));
            let init = p.clone();
            tokio::task::spawn_blocking(move || init.init_transactions(Duration::from_secs(30)))
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("init_transactions: {e}"));
            for t in 0..TRANSACTIONS {
                p.begin_transaction()
                    .unwrap_or_else(|e| panic!("producer {i}, transaction {t}: begin: {e}"));
                let values: Vec<String> = (0..1 + t % 3).map(|m| format!("{i}-{t}-{m}")).collect();
                let sends = values.iter().map(|v| {
                    p.send(
                        FutureRecord::<str, str>::to(&topic).key(v).payload(v),
                        Duration::from_secs(20),
                    )
                });
                for r in join_all(sends).await {
                    r.unwrap_or_else(|(e, _)| panic!("producer {i}, transaction {t}: send: {e}"));
                }
                carhook_processor::txn::call(&p, Duration::from_secs(30), |p, timeout| {
                    p.commit_transaction(timeout)
                })
                .await
                .unwrap_or_else(|e| panic!("producer {i}, transaction {t}: commit: {e}"));
            }
        }));
    }
    for p in producers {
        p.await.unwrap_or_else(|e| panic!("{e}"));
    }
    // Per producer: 1 + t % 3 records in transaction t.
    let expected = PRODUCERS * (TRANSACTIONS + (TRANSACTIONS / 3) * 3);
    let committed = read_topic(&s.kafka.brokers, &topic, expected, WAIT);
    assert_eq!(committed.len(), expected, "committed records");
}

/// A producer fenced by another instance with the same transactional id (a zombie after a pod
/// restart) is unusable for good: the processor rebuilds its Kafka clients, fences the intruder in
/// turn, rejoins the group and processes on, instead of rewinding one batch forever.
#[tokio::test]
async fn a_fenced_processor_rebuilds_its_kafka_clients_and_keeps_processing() {
    use rdkafka::producer::Producer;
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "1")]);
    let p = spawn_processor(&s).await;
    let car = "car-fenced";
    let t0 = 1_761_896_351_529_i64;
    let perm = |state: &str| json!([{"type":"PERMISSION","code":null,"state":state}]);
    let first = error_event("fenced-1", car, perm("ERROR"), t0);
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(car), &first)],
    )
    .await;
    assert_eq!(
        read_topic(&s.kafka.brokers, &s.kafka.actions_topic, 1, WAIT).len(),
        1
    );
    // Another instance claims the same transactional id: the processor's producer is fenced.
    let id = format!("{}-{}", s.kafka.consumer_group, s.processor.instance_id);
    let intruder = carhook_processor::consumer::transactional_producer(&s, &id)
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::task::spawn_blocking(move || {
        intruder
            .init_transactions(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("fencing: {e}"));
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let second = error_event("fenced-2", car, perm("RESOLVED"), t0 + 1_000);
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(car), &second)],
    )
    .await;
    let actions = read_topic(&s.kafka.brokers, &s.kafka.actions_topic, 2, WAIT);
    let kinds: Vec<String> = actions
        .iter()
        .filter_map(|m| header(m, headers::ACTION_TYPE))
        .collect();
    assert_eq!(kinds, vec!["RECONNECT_REQUIRED", "RECONNECT_RESOLVED"]);
    assert_eq!(
        metric(&p, "carhook_processor_client_rebuilds_total").await,
        1.0
    );
    eventually(WAIT, || async { get(p.addr, "/ready").await.0 == 200 }).await;
    p.stop().await;
    drop_keyspace(&s).await;
}

/// Lanes run vehicles concurrently, each vehicle's events one after another in offset order. The
/// reconnect actions show the order: a vehicle's ERROR, RESOLVED, ERROR … each move its flag (one
/// action each) only when applied in that order; a RESOLVED applied before its ERROR moves nothing.
#[tokio::test]
async fn lanes_apply_each_vehicles_events_in_order_and_emit_every_action() {
    let s = settings(&[
        ("CARHOOK__KAFKA__PARTITIONS", "1"),
        ("CARHOOK__PROCESSOR__CONCURRENCY", "16"),
    ]);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let t0 = 1_761_896_351_529_i64;
    let vehicles: Vec<String> = (0..24).map(|v| format!("car-lane-{v}")).collect();
    let steps = 6;
    let mut bodies: Vec<(String, Vec<u8>)> = Vec::new();
    // Round-robin over vehicles, so every batch mixes them and one partition holds them all.
    for step in 0..steps {
        for car in &vehicles {
            let state = if step % 2 == 0 { "ERROR" } else { "RESOLVED" };
            bodies.push((
                car.clone(),
                error_event(
                    &format!("{car}-{step}"),
                    car,
                    json!([{"type":"PERMISSION","code":null,"state":state,"signals":[]}]),
                    t0 + step,
                ),
            ));
        }
    }
    let recs: Vec<(Option<&str>, &[u8])> = bodies
        .iter()
        .map(|(k, b)| (Some(k.as_str()), b.as_slice()))
        .collect();
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &recs).await;
    let p = spawn_processor(&s).await;
    let expected = vehicles.len() * steps as usize;
    let actions = read_topic(&s.kafka.brokers, &s.kafka.actions_topic, expected, WAIT);
    assert_eq!(actions.len(), expected, "one action per event");
    for car in &vehicles {
        let kinds: Vec<String> = actions
            .iter()
            .filter(|m| m.key() == Some(car.as_bytes()))
            .filter_map(|m| header(m, headers::ACTION_TYPE))
            .collect();
        let want: Vec<&str> = (0..steps)
            .map(|i| {
                if i % 2 == 0 {
                    "RECONNECT_REQUIRED"
                } else {
                    "RECONNECT_RESOLVED"
                }
            })
            .collect();
        assert_eq!(kinds, want, "{car}");
    }
    p.stop().await;
    drop_keyspace(&s).await;
}
