//! Log volume: each service writes one compact line per event (not one per step, not the whole
//! span context on every line), and `telemetry.event_log` drops the lines of successful events
//! while failures stay logged whole.

use std::time::Duration;

use carhook_tests::*;

/// Longest per-event line either service may write (today's lines are about 300 bytes; the old
/// ones repeated every span attribute and were over 1 KB for the processor).
const MAX_LINE_BYTES: usize = 512;

/// The JSON lines of `log` written inside a span named `span` at INFO or above.
fn lines_in_span(log: &std::path::Path, span: &str) -> Vec<(String, serde_json::Value)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| Some((l.to_string(), serde_json::from_str(l).ok()?)))
        .filter(|(_, v): &(String, serde_json::Value)| v["span"]["name"] == span)
        .collect()
}

fn assert_one_compact_line_per_event(
    service: &str,
    lines: &[(String, serde_json::Value)],
    events: &[String],
) {
    for id in events {
        let n = lines
            .iter()
            .filter(|(_, v)| v["span"]["event_id"] == id.as_str())
            .count();
        assert_eq!(n, 1, "{service}: {n} lines for event {id}: {lines:#?}");
    }
    assert_eq!(
        lines.len(),
        events.len(),
        "{service}: one line per event, no more: {lines:#?}"
    );
    for (text, v) in lines {
        assert!(
            text.len() <= MAX_LINE_BYTES,
            "{service}: a {} byte line: {text}",
            text.len()
        );
        assert!(
            v["span"]["trace_id"]
                .as_str()
                .is_some_and(|t| t.len() == 32),
            "{service}: no trace id: {text}"
        );
        assert!(
            v["duration_ms"].is_number() || v["latency_ms"].is_number(),
            "{text}"
        );
        assert!(v["outcome"].is_string(), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_service_writes_one_compact_line_per_event() {
    const N: usize = 20;
    let s = settings(&[]);
    let log_r = std::env::temp_dir().join(format!("{}.logs.receiver.log", s.cql.keyspace));
    let log_p = std::env::temp_dir().join(format!("{}.logs.processor.log", s.cql.keyspace));
    let processor = ChildService::processor(&s, "logs", &log_p, &[]).await;
    let receiver = ChildService::receiver(&s, &log_r, &[]).await;
    let events: Vec<String> = (0..N).map(|i| format!("{}-e{i}", s.cql.keyspace)).collect();
    for (i, id) in events.iter().enumerate() {
        let body = state_event(
            id,
            &format!("car-{}", i % 4),
            &[(
                "odometer-traveleddistance",
                serde_json::json!({"value": i, "unit": "km"}),
                1_761_896_000_000 + i as i64,
            )],
        );
        let reply = post(
            receiver.addr,
            "/webhooks/smartcar",
            body.clone(),
            Some(&sign(TOKEN, &body)),
        )
        .await;
        assert_eq!(reply.status, 200);
    }
    eventually(Duration::from_secs(60), || async {
        metric_value(processor.admin, "carhook_processor_events_total").await >= N as f64
    })
    .await;
    assert_eq!(receiver.terminate(), Some(0));
    assert_eq!(processor.terminate(), Some(0));

    let received = lines_in_span(&log_r, "request");
    assert_one_compact_line_per_event("receiver", &received, &events);
    let processed = lines_in_span(&log_p, "process");
    assert_one_compact_line_per_event("processor", &processed, &events);
    for (text, v) in &processed {
        assert_eq!(v["level"], "INFO", "{text}");
        assert_eq!(v["outcome"], "applied", "{text}");
        assert!(v["span"]["vehicle_id"].is_string(), "{text}");
    }
    drop_keyspace(&s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn event_log_errors_keeps_dead_letters_and_drops_successful_lines() {
    const N: usize = 10;
    let s = settings(&[]);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log = std::env::temp_dir().join(format!("{}.logs-errors.processor.log", s.cql.keyspace));
    let processor = ChildService::processor(
        &s,
        "logs-errors",
        &log,
        &[("CARHOOK__TELEMETRY__EVENT_LOG", "errors")],
    )
    .await;
    let bodies: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            state_event(
                &format!("{}-e{i}", s.cql.keyspace),
                "car-quiet",
                &[(
                    "odometer-traveleddistance",
                    serde_json::json!({"value": i, "unit": "km"}),
                    1_761_896_000_000 + i as i64,
                )],
            )
        })
        .collect();
    let mut records: Vec<(Option<&str>, &[u8])> = bodies
        .iter()
        .map(|b| (Some("car-quiet"), b.as_slice()))
        .collect();
    records.push((Some("car-quiet"), b"not json at all".as_slice()));
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &records).await;
    eventually(Duration::from_secs(60), || async {
        metric_value(processor.admin, "carhook_processor_events_total").await > N as f64
    })
    .await;
    assert_eq!(processor.terminate(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let count = |message: &str| {
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["message"] == message)
            .count()
    };
    assert_eq!(count("event processed"), 0, "{text}");
    assert_eq!(count("event dead-lettered"), 1, "{text}");
    assert!(text.contains("not_json"), "the reason is logged: {text}");
    drop_keyspace(&s).await;
}
