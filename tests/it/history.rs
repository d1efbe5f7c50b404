//! Operating history against real Kafka and CQL: replay after a logic change, replay beside live
//! traffic, interrupted-and-resumed replay, and redrive of fixed and still-broken dead letters.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use carhook_processor::dlq::{self, LetterPos, Selection};
use carhook_processor::replay::{self, Bound, ReplayRequest};
use carhook_processor::store::Store;
use carhook_tests::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use shared::config::Settings;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

fn odo(event: &str, car: &str, value: i64, oem: i64) -> Vec<u8> {
    state_event(
        event,
        car,
        &[(
            "odometer-traveleddistance",
            json!({"unit": "km", "value": value}),
            oem,
        )],
    )
}

async fn store(s: &Settings) -> Store {
    let session = Arc::new(
        shared::cql::connect(&s.cql)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    Store::prepare(session, &s.cql.keyspace, 7)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn everything() -> ReplayRequest {
    ReplayRequest {
        from: Bound::Offsets(BTreeMap::new()),
        to: None,
        vehicle: None,
        dry_run: false,
        group: None,
        max_records: None,
        max_rate: None,
        emit_changes: false,
    }
}

fn committed(s: &Settings) -> Vec<(i32, Offset)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &s.kafka.brokers)
        .set("group.id", &s.kafka.consumer_group)
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut tpl = TopicPartitionList::new();
    for p in 0..s.kafka.partitions {
        tpl.add_partition(&s.kafka.events_topic, p);
    }
    let got = c
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}"));
    got.elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect()
}

async fn value_where(
    s: &Settings,
    car: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let st = vehicle_state(s, car).await.unwrap_or_default();
        let sig = st["signals"]["odometer-traveleddistance"].clone();
        if pred(&sig) {
            return sig;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{car} never matched: {st:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn replay_after_a_logic_change_takes_effect_at_equal_time_never_over_newer_and_emits_no_action(
) {
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "2")]);
    let p = spawn_processor(&s).await;
    let (t1, t2) = (1_731_940_000_000_i64, 1_731_940_500_000_i64);
    let perm = error_event(
        "perm",
        "car-r",
        json!([{"type": "PERMISSION", "code": null, "state": "ERROR"}]),
        t1,
    );
    let (old, new) = (odo("old", "car-r", 1, t1), odo("new", "car-r", 2, t2));
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[
            (Some("car-r"), &old),
            (Some("car-r"), &new),
            (Some("car-r"), &perm),
        ],
    )
    .await;
    value_where(&s, "car-r", |v| {
        v["body"]["value"] == 2 && v["logicVersion"] == 1
    })
    .await;
    eventually(WAIT, || async {
        vehicle_state(&s, "car-r")
            .await
            .is_some_and(|v| v["needsReconnect"] == true)
    })
    .await;
    let live_offsets = committed(&s);

    // Logic version 2: a dry run reports, writes nothing.
    let mut v2 = s.clone();
    v2.processor.logic_version = 2;
    let st = store(&v2).await;
    let dry = replay::replay(
        &v2,
        &st,
        &ReplayRequest {
            dry_run: true,
            ..everything()
        },
        CancellationToken::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // Under v2 every event re-derives its availability at its own delivery time (the logic version
    // breaks the tie), the error changes too, but the older odometer *value* still loses to the
    // newer one: exactly one stale cell.
    assert_eq!((dry.read, dry.applied, dry.unchanged), (3, 3, 0), "{dry:?}");
    assert_eq!(dry.stale_cells, 1, "{dry:?}");
    assert_eq!(
        value_where(&s, "car-r", |_| true).await["logicVersion"],
        1,
        "dry run wrote nothing"
    );

    // The real replay, with live traffic interleaved: a fresher value arrives while it runs.
    let newest = odo("newest", "car-r", 3, t2 + 1000);
    let live_records = [(Some("car-r"), newest.as_slice())];
    let live = produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &live_records);
    let req = ReplayRequest {
        group: Some(fresh("replay")),
        ..everything()
    };
    let (sum, ()) = tokio::join!(
        replay::replay(&v2, &st, &req, CancellationToken::new()),
        live
    );
    let sum = sum.unwrap_or_else(|e| panic!("{e}"));
    assert!(sum.complete);
    assert!(sum.read >= 3 && sum.applied >= 2, "{sum:?}");
    // A replay writes without reading first (the dry run above counted the stale cell): the older
    // odometer value loses by its write timestamp, as the state below shows.
    // Newest live value wins over everything replayed; nothing older came back.
    let v = value_where(&s, "car-r", |v| v["body"]["value"] == 3).await;
    assert_eq!(v["eventId"], "newest");
    // Replay emitted no action; live processing emitted exactly one.
    let actions = read_topic(
        &s.kafka.brokers,
        &s.kafka.actions_topic,
        1,
        Duration::from_secs(10),
    );
    assert_eq!(actions.len(), 1);
    // Replay used its own group: the live group's offsets only moved by the live record.
    let after = committed(&s);
    let moved: i64 = after
        .iter()
        .zip(&live_offsets)
        .map(|((_, a), (_, b))| a.to_raw().unwrap_or(0) - b.to_raw().unwrap_or(0))
        .sum();
    assert!(moved <= 1, "live offsets moved by {moved}");
    p.stop().await;

    // Without live interference, the equal-time value is rewritten under the new logic.
    let car2 = odo("solo", "car-solo", 7, t1);
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some("car-solo"), &car2)],
    )
    .await;
    let p = spawn_processor(&s).await;
    value_where(&s, "car-solo", |v| v["logicVersion"] == 1).await;
    let only = ReplayRequest {
        vehicle: Some("car-solo".into()),
        group: Some(fresh("replay")),
        ..everything()
    };
    let sum = replay::replay(&v2, &st, &only, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sum.applied, 1, "{sum:?}");
    let v = value_where(&s, "car-solo", |v| v["logicVersion"] == 2).await;
    assert_eq!(v["body"]["value"], 7);
    p.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn interrupted_replay_resumes_where_it_stopped() {
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "3")]);
    let p = spawn_processor(&s).await;
    let events: Vec<(String, Vec<u8>)> = (0..30)
        .map(|i| {
            (
                format!("car-{}", i % 3),
                odo(
                    &format!("e{i}"),
                    &format!("car-{}", i % 3),
                    i,
                    1_731_940_000_000 + i,
                ),
            )
        })
        .collect();
    let refs: Vec<(Option<&str>, &[u8])> = events
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.as_slice()))
        .collect();
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &refs).await;
    value_where(&s, "car-2", |v| v["body"]["value"] == 29).await;
    p.stop().await;
    let st = store(&s).await;
    let group = fresh("resume");
    let first = ReplayRequest {
        group: Some(group.clone()),
        max_records: Some(10),
        ..everything()
    };
    let a = replay::replay(&s, &st, &first, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((a.read, a.complete), (10, false), "{a:?}");
    let rest = ReplayRequest {
        group: Some(group),
        ..everything()
    };
    let b = replay::replay(&s, &st, &rest, CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((b.read, b.complete), (20, true), "{b:?}");
    assert_eq!(
        a.applied + b.applied,
        30,
        "every record of the range written exactly once across the two runs"
    );
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn redrive_brings_back_fixed_letters_once_and_loop_guards_still_broken_ones() {
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "1")]);
    let p = spawn_processor(&s).await;
    // A still-broken letter: dead-lettered by the processor.
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some("car-d"), b"{not json".as_slice())],
    )
    .await;
    eventually(WAIT, || async {
        dlq::read_letters(&s).map(|l| l.len()).unwrap_or(0) == 1
    })
    .await;
    // A fixed letter: a valid event an older processor version had dead-lettered.
    let good = odo("fixed-1", "car-d", 42, 1_731_940_000_000);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &s.kafka.brokers)
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let h = OwnedHeaders::new()
        .insert(Header {
            key: shared::headers::EVENT_ID,
            value: Some("fixed-1"),
        })
        .insert(Header {
            key: shared::headers::DLQ_ERROR_CLASS,
            value: Some("wrong_type"),
        })
        .insert(Header {
            key: shared::headers::DLQ_FIRST_FAILURE_AT,
            value: Some("1731940000000"),
        });
    producer
        .send(
            FutureRecord::<str, [u8]>::to(&s.kafka.dlq_topic)
                .key("car-d")
                .payload(&good)
                .headers(h),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("{e}"));
    let letters = dlq::read_letters(&s).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(letters.len(), 2);
    assert_eq!(letters[0].reason(), "not_json");
    let session = shared::cql::connect(&s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let fixed = Selection::Positions(vec![LetterPos {
        partition: 0,
        offset: letters[1].pos.offset,
    }]);

    let dry = dlq::redrive(&s, &session, &fixed, true, 3)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(dry.redriven, 1);
    let events_before = record_count(&s.kafka.brokers, &s.kafka.events_topic);
    let once = dlq::redrive(&s, &session, &fixed, false, 3)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(once.redriven, 1, "{once:?}");
    value_where(&s, "car-d", |v| v["body"]["value"] == 42).await;
    let twice = dlq::redrive(&s, &session, &fixed, false, 3)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (twice.redriven, twice.already_redriven),
        (0, 1),
        "{twice:?}"
    );
    assert_eq!(
        record_count(&s.kafka.brokers, &s.kafka.events_topic),
        events_before + 1,
        "one copy only"
    );

    // The broken one fails again and comes back carrying its redrive count; the loop guard stops it.
    let broken = dlq::redrive(
        &s,
        &session,
        &Selection::Reason("not_json".into()),
        false,
        1,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(broken.redriven, 1);
    eventually(WAIT, || async {
        dlq::read_letters(&s).map(|l| l.len()).unwrap_or(0) == 3
    })
    .await;
    let letters = dlq::read_letters(&s).unwrap_or_else(|e| panic!("{e}"));
    let again = letters
        .iter()
        .find(|l| l.redrive_count() == 1)
        .unwrap_or_else(|| panic!("no redriven letter came back"));
    assert_eq!(again.reason(), "not_json");
    let guard = dlq::redrive(
        &s,
        &session,
        &Selection::Positions(vec![again.pos]),
        false,
        1,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(guard.refused_loop_guard, 1, "{guard:?}");
    p.stop().await;
    drop_keyspace(&s).await;
}

/// The events topic carries transaction markers (the processor writes refresh requests to it in its
/// transactions) and can carry aborted records; a read_committed consumer never receives either, so
/// a replay that waited for a record at the range's last offset never finished. Here the partition
/// ends in an aborted record, its abort marker, two committed events and their commit marker.
#[tokio::test]
async fn replay_finishes_a_range_that_ends_in_transaction_markers() {
    use rdkafka::producer::Producer;
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "1")]);
    let p = spawn_processor(&s).await;
    let producer = carhook_processor::consumer::transactional_producer(&s, &fresh("txn-writer"))
        .unwrap_or_else(|e| panic!("{e}"));
    producer
        .init_transactions(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let send = |event: &str, value: i64| {
        let body = odo(event, "car-m", value, 1_731_940_000_000 + value);
        let producer = producer.clone();
        let topic = s.kafka.events_topic.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic).key("car-m").payload(&body),
                    Duration::from_secs(30),
                )
                .await
                .unwrap_or_else(|(e, _)| panic!("{e}"));
        }
    };
    producer
        .begin_transaction()
        .unwrap_or_else(|e| panic!("{e}"));
    send("aborted", 99).await;
    producer
        .abort_transaction(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    producer
        .begin_transaction()
        .unwrap_or_else(|e| panic!("{e}"));
    send("m1", 1).await;
    send("m2", 2).await;
    producer
        .commit_transaction(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    value_where(&s, "car-m", |v| v["body"]["value"] == 2).await;
    p.stop().await;
    let st = store(&s).await;
    let done = tokio::time::timeout(
        WAIT,
        replay::replay(&s, &st, &everything(), CancellationToken::new()),
    )
    .await
    .unwrap_or_else(|_| panic!("the replay never finished a range ending in transaction markers"))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((done.read, done.complete), (2, true), "{done:?}");
    drop_keyspace(&s).await;
}
