//! The local stack itself: a record round-trips through the real broker; the real CQL store takes a
//! write and gives it back; migrations are idempotent and recorded.

use std::time::Duration;

use carhook_tests::*;
use rdkafka::Message;

#[tokio::test]
async fn kafka_round_trips_a_record() {
    let s = settings(&[]);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some("car-1"), b"hello")],
    )
    .await;
    let got = read_topic(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        1,
        Duration::from_secs(20),
    );
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload(), Some(&b"hello"[..]));
    assert_eq!(got[0].key(), Some(&b"car-1"[..]));
}

/// Migrations are not bound by the data path's request timeout: schema changes wait for schema
/// agreement, which on a busy node took longer than the 3 s default and made the processor exit
/// at start. With a 1 ms request timeout every statement failed before.
#[tokio::test]
async fn migrations_are_not_bound_by_the_data_request_timeout() {
    let s = settings(&[("CARHOOK__CQL__REQUEST_TIMEOUT_MS", "1")]);
    let session = shared::cql::connect(&s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let applied = shared::cql::migrate(&session, &s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(applied.len(), shared::cql::MIGRATIONS.len());
    drop_keyspace(&settings(&[("CARHOOK__CQL__KEYSPACE", &s.cql.keyspace)])).await;
}

#[tokio::test]
async fn cql_store_migrates_idempotently_and_reads_back_writes() {
    let s = settings(&[]);
    let session = shared::cql::connect(&s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let first = shared::cql::migrate(&session, &s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let all: Vec<i32> = shared::cql::MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(first, all);
    let second = shared::cql::migrate(&session, &s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(second.is_empty(), "second run applied {second:?}");
    let ks = &s.cql.keyspace;
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.vehicles (vehicle_id, info) VALUES (?, ?)"),
            ("v1", "{\"x\":1}"),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let row = session
        .query_unpaged(
            format!("SELECT info FROM {ks}.vehicles WHERE vehicle_id = ?"),
            ("v1",),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_rows_result()
        .unwrap_or_else(|e| panic!("{e}"))
        .single_row::<(String,)>()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(row.0, "{\"x\":1}");
    drop_keyspace(&s).await;
}

/// A service that has seen no traffic already exports every series whose labels are known (at 0)
/// and its build: `rate()` alerts and dashboards see the first error, not a series appearing from
/// nothing (before, `carhook_processor_store_errors_total` and others were absent until then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_services_export_known_series_at_zero_and_their_build() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let p = spawn_processor(&s).await;
    let version = env!("CARGO_PKG_VERSION");
    for (admin, lines) in [
        (
            r.admin,
            vec![
                "carhook_receiver_requests_total{outcome=\"kafka_unavailable\"} 0".to_string(),
                "carhook_receiver_requests_total{outcome=\"circuit_open\"} 0".to_string(),
                "carhook_receiver_signature_failures_total{reason=\"mismatch\"} 0".to_string(),
                "carhook_receiver_quarantined_total{result=\"dropped\"} 0".to_string(),
                "carhook_receiver_verify_challenges_total{result=\"refused_rate\"} 0".to_string(),
                "carhook_receiver_request_body_bytes_count 0".to_string(),
                format!("carhook_build_info{{service=\"receiver\",version=\"{version}\"}} 1"),
            ],
        ),
        (
            p.addr,
            vec![
                "carhook_processor_store_errors_total{kind=\"transient\"} 0".to_string(),
                "carhook_processor_store_errors_total{kind=\"refused\"} 0".to_string(),
                "carhook_processor_dead_letters_total{reason=\"not_json\"} 0".to_string(),
                "carhook_processor_dead_letters_total{reason=\"store_refused\"} 0".to_string(),
                "carhook_processor_actions_total{type=\"RECONNECT_REQUIRED\"} 0".to_string(),
                "carhook_processor_transactions_total{result=\"aborted\"} 0".to_string(),
                "carhook_processor_events_total{outcome=\"dead_lettered\"} 0".to_string(),
                "carhook_processor_rebalances_total{kind=\"revoke\"} 0".to_string(),
                "carhook_processor_vehicle_errors_total{type=\"PERMISSION\",state=\"resolved\"} 0"
                    .to_string(),
                "carhook_processor_vehicle_errors_total{type=\"other\",state=\"error\"} 0"
                    .to_string(),
                "carhook_processor_event_freshness_seconds_count 0".to_string(),
                format!("carhook_build_info{{service=\"processor\",version=\"{version}\"}} 1"),
            ],
        ),
    ] {
        let (status, text) = get(admin, "/metrics").await;
        assert_eq!(status, 200);
        for line in lines {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in:\n{text}"
            );
        }
    }
    p.stop().await;
    r.stop().await;
    drop_keyspace(&s).await;
}

/// One delivery is measured on its whole way: its body size at the receiver; at the processor, the
/// time from receipt to commit, each CQL statement by operation and table, and the age of the
/// partition's oldest uncommitted record, which is 0 once everything is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_measured_from_its_body_to_its_commit() {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let p = spawn_processor(&s).await;
    let body = state_event(
        "evt-measured",
        "car-measured",
        &[(
            "tractionbattery-stateofcharge",
            serde_json::json!({"unit":"percent","value":61}),
            1_731_940_328_000,
        )],
    );
    let len = body.len();
    let answer = post(
        r.addr,
        "/webhooks/smartcar",
        body.clone(),
        Some(&sign(TOKEN, &body)),
    )
    .await;
    assert_eq!(answer.status, 200);
    let applied = r#"carhook_processor_events_total{outcome="applied"}"#;
    eventually(Duration::from_secs(60), || async {
        metric_value(p.addr, applied).await == 1.0
    })
    .await;
    assert_eq!(
        metric_value(r.admin, "carhook_receiver_request_body_bytes_count").await,
        1.0
    );
    #[allow(clippy::cast_precision_loss)]
    let bytes = len as f64;
    assert_eq!(
        metric_value(r.admin, "carhook_receiver_request_body_bytes_sum").await,
        bytes
    );
    assert_eq!(
        metric_value(p.addr, "carhook_processor_event_freshness_seconds_count").await,
        1.0
    );
    let freshness = metric_value(p.addr, "carhook_processor_event_freshness_seconds_sum").await;
    assert!(
        freshness > 0.0 && freshness < 60.0,
        "receipt to commit took {freshness} s"
    );
    let claim = r#"carhook_processor_cql_duration_seconds_count{operation="INSERT",table="processed_events",result="ok"}"#;
    assert_eq!(metric_value(p.addr, claim).await, 1.0, "one claim");
    let write = r#"carhook_processor_cql_duration_seconds_count{operation="BATCH UPDATE",table="batch",result="ok"}"#;
    assert!(metric_value(p.addr, write).await >= 1.0, "the state write");
    assert!(
        metric_value(
            p.addr,
            "carhook_processor_transaction_duration_seconds_count"
        )
        .await
            >= 1.0,
        "the transaction that committed it"
    );
    // Reported every 5 s for each assigned partition; all committed, so every age is 0.
    eventually(Duration::from_secs(30), || async {
        let (_, text) = get(p.addr, "/metrics").await;
        let ages: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with("carhook_processor_consumer_lag_age_seconds{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        !ages.is_empty() && ages.iter().all(|a| *a == 0.0)
    })
    .await;
    p.stop().await;
    r.stop().await;
    drop_keyspace(&s).await;
}

/// A test's teardown deletes the topics it created (named after its keyspace) and no other: runs
/// must not pile up partitions in the local broker, which ran out of file handles at ~20,000.
#[tokio::test]
async fn teardown_deletes_the_tests_own_topics() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let s = settings(&[]);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = shared::kafka::owned_topics(&s.kafka)
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(names.iter().all(|n| n.starts_with(&s.cql.keyspace)));
    let client: BaseConsumer = shared::kafka::base_config(&s.kafka)
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let present = |client: &BaseConsumer| -> usize {
        let md = client
            .fetch_metadata(None, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}"));
        md.topics()
            .iter()
            .filter(|t| names.iter().any(|n| n == t.name()))
            .count()
    };
    assert_eq!(present(&client), names.len(), "created");
    drop_keyspace(&s).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while present(&client) > 0 {
        assert!(std::time::Instant::now() < deadline, "topics still listed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
