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
