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
                format!("carhook_receiver_build_info{{version=\"{version}\"}} 1"),
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
                format!("carhook_processor_build_info{{version=\"{version}\"}} 1"),
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
