//! The receiver against the real broker: a 200 means the exact bytes are on the events topic; every
//! rejection leaves the events topic untouched.

use std::time::Duration;

use carhook_tests::*;
use rdkafka::Message;
use shared::headers;

mod http_contract;
mod recovery;

const PATH: &str = "/webhooks/smartcar";

#[tokio::test]
async fn signed_event_is_acknowledged_only_with_exact_bytes_key_and_headers_on_the_topic() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let body = example("vehicle_state.v4.signal-change.json");
    let reply = post(r.addr, PATH, body.clone(), Some(&sign(TOKEN, &body))).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let got = read_topic(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        1,
        Duration::from_secs(20),
    );
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(
        m.payload(),
        Some(body.as_slice()),
        "bytes must be unchanged"
    );
    assert_eq!(m.key(), Some(&b"9af13248-3b73-4c9d-9a4b-d937ce6bc8e2"[..]));
    assert_eq!(
        header(m, headers::EVENT_ID).as_deref(),
        Some("550e8400-e29b-41d4-a716-446655440000")
    );
    assert_eq!(
        header(m, headers::EVENT_TYPE).as_deref(),
        Some("VEHICLE_STATE")
    );
    assert_eq!(
        header(m, headers::DELIVERY_ID).as_deref(),
        Some("48b25f8f-9fea-42e1-9085-81043682cbb8")
    );
    assert_eq!(header(m, headers::TOKEN_INDEX).as_deref(), Some("0"));
    assert!(header(m, headers::RECEIVED_AT)
        .and_then(|v| v.parse::<i64>().ok())
        .is_some());
    let tp = header(m, headers::TRACEPARENT).unwrap_or_default();
    assert!(
        tp.starts_with("00-") && tp.len() == 55,
        "traceparent {tp:?}"
    );
    r.stop().await;
}

#[tokio::test]
async fn every_protocol_example_is_accepted_and_keyed_by_vehicle() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let names = [
        "vehicle_state.v4.signal-change.json",
        "vehicle_state.v4.responses-page-shape.json",
        "vehicle_error.v4.error.json",
    ];
    for name in names {
        let body = example(name);
        let reply = post(r.addr, PATH, body.clone(), Some(&sign(TOKEN, &body))).await;
        assert_eq!(reply.status, 200, "{name}");
    }
    let got = read_topic(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        names.len(),
        Duration::from_secs(20),
    );
    assert_eq!(got.len(), names.len());
    // The responses-page shape has no top-level vehicleId: the key comes from data.vehicle.id.
    assert!(got.iter().all(|m| m.key().is_some_and(|k| k.len() == 36)));
    r.stop().await;
}

#[tokio::test]
async fn rotation_accepts_both_tokens_and_rejects_a_third() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let body = example("vehicle_error.v4.error.json");
    assert_eq!(
        post(r.addr, PATH, body.clone(), Some(&sign(TOKEN, &body)))
            .await
            .status,
        200
    );
    assert_eq!(
        post(r.addr, PATH, body.clone(), Some(&sign(OLD_TOKEN, &body)))
            .await
            .status,
        200
    );
    let third = post(
        r.addr,
        PATH,
        body.clone(),
        Some(&sign("another-application", &body)),
    )
    .await;
    assert_eq!(third.status, 401);
    let got = read_topic(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        2,
        Duration::from_secs(20),
    );
    let mut idx: Vec<_> = got
        .iter()
        .filter_map(|m| header(m, headers::TOKEN_INDEX))
        .collect();
    idx.sort();
    assert_eq!(idx, vec!["0", "1"]);
    r.stop().await;
}

#[tokio::test]
async fn bad_signatures_get_401_and_nothing_reaches_the_events_topic() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let body = example("vehicle_state.v4.signal-change.json");
    let good = sign(TOKEN, &body);
    let cases: Vec<(&str, Option<String>)> = vec![
        ("missing", None),
        ("empty", Some(String::new())),
        ("upper-case hex", Some(good.to_uppercase())),
        ("wrong length", Some(good[..63].to_string())),
        ("not hex", Some("z".repeat(64))),
        ("signature of another body", Some(sign(TOKEN, b"{}"))),
    ];
    for (name, sig) in &cases {
        let reply = post(r.addr, PATH, body.clone(), sig.as_deref()).await;
        assert_eq!(reply.status, 401, "{name}");
        let text = String::from_utf8_lossy(&reply.body);
        assert!(!text.contains(TOKEN), "{name}: token leaked");
    }
    // Quarantine keeps the raw bytes of the rejected deliveries (rate-limited, short retention).
    let quarantined = read_topic(
        &s.kafka.brokers,
        &s.kafka.quarantine_topic,
        cases.len(),
        Duration::from_secs(20),
    );
    assert_eq!(quarantined.len(), cases.len());
    assert!(quarantined
        .iter()
        .all(|m| m.payload() == Some(body.as_slice())));
    assert_eq!(
        header(&quarantined[0], headers::REJECT_REASON).as_deref(),
        Some("missing")
    );
    assert_eq!(record_count(&s.kafka.brokers, &s.kafka.events_topic), 0);
    let (_, metrics) = get(r.admin, "/metrics").await;
    assert!(
        metrics.contains(r#"carhook_receiver_signature_failures_total{reason="mismatch"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(TOKEN) && !metrics.contains(OLD_TOKEN),
        "a token leaked into the metrics"
    );
    r.stop().await;
}

#[tokio::test]
async fn verify_answers_match_the_sdk_vectors_and_are_never_stored() {
    let s = settings(&[("CARHOOK__SMARTCAR__MANAGEMENT_TOKENS", "amt")]);
    let r = spawn_receiver(&s).await;
    let body = br#"{"eventId":"v1","eventType":"VERIFY","data":{"challenge":"challenge"},"meta":{"version":"4.0"}}"#.to_vec();
    // Signed and unsigned forms both answer with HMAC(current token, challenge).
    for sig in [Some(sign("amt", &body)), None] {
        let reply = post(r.addr, PATH, body.clone(), sig.as_deref()).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
        assert_eq!(
            v["challenge"],
            "9baf5a7464bd86740ad5a06e439dcf535a075022ed2c92d74efacf646d79328e"
        );
    }
    // Legacy form.
    let legacy =
        br#"{"version":"2.0","eventName":"verify","payload":{"challenge":"challenge"}}"#.to_vec();
    assert_eq!(
        post(r.addr, PATH, legacy.clone(), Some(&sign("amt", &legacy)))
            .await
            .status,
        200
    );
    // A signed VERIFY whose signature is wrong is refused.
    assert_eq!(
        post(r.addr, PATH, body.clone(), Some(&sign("other", &body)))
            .await
            .status,
        401
    );
    // Signing-oracle guard: an unsigned challenge that is JSON (or not token-shaped) is refused.
    let probe = serde_json::to_vec(
        &serde_json::json!({"eventType":"VERIFY","data":{"challenge":"{\"pizza\":\"pasta\"}"}}),
    )
    .unwrap_or_default();
    let reply = post(r.addr, PATH, probe, None).await;
    assert_eq!(reply.status, 401);
    assert!(!String::from_utf8_lossy(&reply.body).contains("4c05a8da"));
    assert_eq!(record_count(&s.kafka.brokers, &s.kafka.events_topic), 0);
    r.stop().await;
}

#[tokio::test]
async fn body_limits_methods_and_paths() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    // ~50 KB, Smartcar's cap: accepted.
    let pad = "x".repeat(50_000 - 200);
    let big = serde_json::to_vec(&serde_json::json!({"eventId":"big","eventType":"VEHICLE_STATE","vehicleId":"v","data":{"pad":pad}})).unwrap_or_default();
    assert!(big.len() <= 50_000 && big.len() > 49_000);
    assert_eq!(
        post(r.addr, PATH, big.clone(), Some(&sign(TOKEN, &big)))
            .await
            .status,
        200
    );
    // Over the 64 KiB limit: 413, nothing stored.
    let huge = vec![b'a'; 70_000];
    assert_eq!(
        post(r.addr, PATH, huge.clone(), Some(&sign(TOKEN, &huge)))
            .await
            .status,
        413
    );
    assert_eq!(
        request(r.addr, http::Method::GET, PATH, vec![], None)
            .await
            .status,
        405
    );
    assert_eq!(
        post(r.addr, "/elsewhere", b"{}".to_vec(), None)
            .await
            .status,
        404
    );
    assert_eq!(get(r.admin, "/health").await.0, 200);
    assert_eq!(record_count(&s.kafka.brokers, &s.kafka.events_topic), 1);
    r.stop().await;
}

#[tokio::test]
async fn signed_garbage_is_persisted_unchanged_for_the_processor_to_dead_letter() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let bodies: Vec<Vec<u8>> = vec![
        b"not json at all".to_vec(),
        b"[1,2,3]".to_vec(),
        vec![0xff, 0xfe, 0x00],
    ];
    for b in &bodies {
        assert_eq!(
            post(r.addr, PATH, b.clone(), Some(&sign(TOKEN, b)))
                .await
                .status,
            200
        );
    }
    let got = read_topic(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        bodies.len(),
        Duration::from_secs(20),
    );
    let mut payloads: Vec<Vec<u8>> = got
        .iter()
        .filter_map(|m| m.payload().map(<[u8]>::to_vec))
        .collect();
    payloads.sort();
    let mut want = bodies.clone();
    want.sort();
    assert_eq!(payloads, want);
    r.stop().await;
}

#[tokio::test]
async fn unreachable_broker_answers_503_with_retry_after_within_the_bound() {
    // Nothing listens on port 1: every produce fails within the delivery timeout.
    let s = settings(&[
        ("CARHOOK__KAFKA__BROKERS", "127.0.0.1:1"),
        ("CARHOOK__KAFKA__CREATE_TOPICS", "false"),
        ("CARHOOK__KAFKA__DELIVERY_TIMEOUT_MS", "1500"),
        ("CARHOOK__RECEIVER__BREAKER_FAILURES", "2"),
    ]);
    let r = spawn_receiver_unready(&s).await;
    let addr = r.addr;
    assert_eq!(
        get(r.admin, "/ready").await.0,
        503,
        "not ready without a broker"
    );
    let body = example("vehicle_error.v4.error.json");
    for attempt in 0..3 {
        let started = std::time::Instant::now();
        let reply = post(addr, PATH, body.clone(), Some(&sign(TOKEN, &body))).await;
        assert_eq!(reply.status, 503, "attempt {attempt}");
        assert!(reply.headers.get("retry-after").is_some());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answer took {:?}",
            started.elapsed()
        );
    }
    let (_, metrics) = get(r.admin, "/metrics").await;
    assert!(
        metrics.contains(r#"carhook_receiver_requests_total{outcome="circuit_open"}"#),
        "{metrics}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_loses_no_acknowledged_event() {
    let s = settings(&[]);
    let mut r = spawn_receiver(&s).await;
    let addr = r.addr;
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..300 {
        let body = state_event(
            &format!("term-{i}"),
            &format!("car-{}", i % 13),
            &[(
                "charge-ischarging",
                serde_json::json!({"value": true}),
                1_731_940_328_000,
            )],
        );
        let sig = sign(TOKEN, &body);
        let counter = std::sync::Arc::clone(&answered);
        tasks.push(tokio::spawn(async move {
            let reply =
                tokio::time::timeout(Duration::from_secs(20), try_post(addr, PATH, body, &sig))
                    .await;
            let ok = matches!(reply, Ok(Some(200)));
            if ok {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            (i, ok)
        }));
        if i == 150 {
            // SIGTERM arrives mid-load: after some acknowledgements, with the rest still coming.
            eventually(Duration::from_secs(30), || {
                let n = answered.load(std::sync::atomic::Ordering::SeqCst);
                async move { n >= 20 }
            })
            .await;
            r.shutdown.cancel();
        }
    }
    let mut acked = std::collections::HashSet::new();
    for t in tasks {
        if let Ok((i, true)) = t.await {
            acked.insert(format!("term-{i}"));
        }
    }
    r.join(Duration::from_secs(30)).await;
    assert!(
        !acked.is_empty(),
        "some requests were acknowledged before the drain"
    );
    let on_topic: std::collections::HashSet<String> = read_topic(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        acked.len(),
        Duration::from_secs(30),
    )
    .iter()
    .filter_map(|m| header(m, headers::EVENT_ID))
    .collect();
    let lost: Vec<_> = acked.difference(&on_topic).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
}
