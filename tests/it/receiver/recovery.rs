//! The breaker never sticks, without stopping the shared broker: Kafka cannot take events while the
//! events topic is missing (the test broker does not auto-create topics), and is healthy again once
//! the topic is created. The outage suite covers the same behaviours with the broker itself stopped.

use std::time::Duration;

use carhook_tests::*;

const PATH: &str = "/webhooks/smartcar";

async fn send(r: &Running, i: usize) -> Reply {
    let body = state_event(
        &format!("rec-{i}"),
        "car-rec",
        &[(
            "charge-ischarging",
            serde_json::json!({"value": true}),
            1_731_940_328_000,
        )],
    );
    let sig = sign(TOKEN, &body);
    post(r.addr, PATH, body, Some(&sig)).await
}

/// Sends until the admin `/ready` names the open breaker; returns the next event number.
async fn open_the_breaker(r: &Running) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        assert_eq!(send(r, i).await.status, 503, "no topic must mean 503");
        i += 1;
        if get(r.admin, "/ready").await.1.contains("circuit-closed") {
            return i;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the breaker never opened"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn readiness_returns_without_webhook_traffic_once_kafka_takes_events_again() {
    let s = settings(&[
        ("CARHOOK__KAFKA__CREATE_TOPICS", "false"),
        ("CARHOOK__KAFKA__DELIVERY_TIMEOUT_MS", "1500"),
        ("CARHOOK__RECEIVER__BREAKER_FAILURES", "2"),
        ("CARHOOK__RECEIVER__BREAKER_OPEN_MS", "1000"),
    ]);
    let r = spawn_receiver_unready(&s).await;
    let next = open_the_breaker(&r).await;
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // No webhook request from here on: behind a Service an unready pod gets none.
    eventually(Duration::from_secs(15), || async {
        get(r.admin, "/ready").await.0 == 200
    })
    .await;
    assert_eq!(send(&r, next).await.status, 200);
    r.stop().await;
}

#[tokio::test]
async fn cancelled_probe_is_recorded_so_the_breaker_probes_again() {
    let open = Duration::from_millis(300);
    let s = settings(&[
        ("CARHOOK__KAFKA__CREATE_TOPICS", "false"),
        ("CARHOOK__KAFKA__DELIVERY_TIMEOUT_MS", "3000"),
        ("CARHOOK__RECEIVER__BREAKER_FAILURES", "1"),
        ("CARHOOK__RECEIVER__BREAKER_OPEN_MS", "300"),
    ]);
    let r = spawn_receiver_unready(&s).await;
    let next = open_the_breaker(&r).await;
    // After the open period the next request is the half-open probe. Its client gives up while
    // the produce still waits (a load balancer's timeout, a reset stream).
    tokio::time::sleep(open + Duration::from_millis(200)).await;
    let cancelled = tokio::time::timeout(Duration::from_millis(800), send(&r, next)).await;
    assert!(cancelled.is_err(), "the probe must still be producing");
    // The abandoned probe counts as a failure: after another open period a new probe really
    // tries Kafka (kafka_unavailable) instead of every request being refused as circuit_open.
    tokio::time::sleep(open + Duration::from_millis(200)).await;
    let unavailable = r#"carhook_receiver_requests_total{outcome="kafka_unavailable"}"#;
    let before = metric_value(r.admin, unavailable).await;
    assert_eq!(send(&r, next + 1).await.status, 503);
    assert_eq!(
        metric_value(r.admin, unavailable).await,
        before + 1.0,
        "after a cancelled probe the breaker must let a new probe through"
    );
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut i = next + 2;
    eventually(Duration::from_secs(15), || {
        i += 1;
        let r = &r;
        async move { send(r, i).await.status == 200 }
    })
    .await;
    r.stop().await;
}
