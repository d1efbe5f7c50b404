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
