//! Crashes and rebalances: kill -9 mid-batch and a second instance joining and leaving mid-stream
//! leave state, actions and the state changelog exactly as an undisturbed run would.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use carhook_tests::*;
use rdkafka::Message;
use serde_json::json;

const VEHICLES: usize = 24;
const STATES_PER_VEHICLE: i64 = 12;

/// Per vehicle: STATES_PER_VEHICLE state events (rising odometer) and one PERMISSION error (one action).
fn workload() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for v in 0..VEHICLES {
        let car = format!("car-{v}");
        for i in 0..STATES_PER_VEHICLE {
            let body = state_event(
                &format!("{car}-s{i}"),
                &car,
                &[(
                    "odometer-traveleddistance",
                    json!({"unit":"km","value": i}),
                    1_731_940_000_000 + i * 1000,
                )],
            );
            out.push((car.clone(), body));
        }
        out.push((
            car.clone(),
            error_event(
                &format!("{car}-perm"),
                &car,
                json!([{"type":"PERMISSION","code":null,"state":"ERROR"}]),
                1_761_896_351_529,
            ),
        ));
    }
    out
}

async fn produce(s: &shared::config::Settings, records: &[(String, Vec<u8>)]) {
    let refs: Vec<(Option<&str>, &[u8])> = records
        .iter()
        .map(|(k, v)| (Some(k.as_str()), v.as_slice()))
        .collect();
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &refs).await;
}

async fn assert_exact_outcome(s: &shared::config::Settings) {
    for v in 0..VEHICLES {
        let car = format!("car-{v}");
        let want = STATES_PER_VEHICLE - 1;
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let st = vehicle_state(s, &car).await.unwrap_or_default();
            if st["signals"]["odometer-traveleddistance"]["body"]["value"] == want
                && st["needsReconnect"] == true
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{car} never converged: {st:#}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let actions = read_topic(
        &s.kafka.brokers,
        &s.kafka.actions_topic,
        VEHICLES,
        Duration::from_secs(60),
    );
    let ids: Vec<String> = actions
        .iter()
        .filter_map(|m| header(m, "carhook-action-id"))
        .collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        ids.len(),
        VEHICLES,
        "exactly one action per PERMISSION event, got {}",
        ids.len()
    );
    assert_eq!(distinct.len(), VEHICLES);
    assert!(actions.iter().all(|m| m.key().is_some()));
}

/// The state changelog against ground truth: every event of the workload changes its vehicle's
/// document (a higher odometer, then the error), so each vehicle has exactly one record per event,
/// in the order sent, none twice, and its last record is what `processor state` shows.
async fn assert_exact_changelog(s: &shared::config::Settings) {
    let per_vehicle = STATES_PER_VEHICLE as usize + 1;
    let brokers = s.kafka.brokers.clone();
    let topic = s.kafka.state_topic.clone();
    let records = tokio::task::spawn_blocking(move || {
        // The last event of every vehicle is a change: once VEHICLES * per_vehicle records are
        // there the workload is in; reading to the end then also shows any extra record.
        read_topic(
            &brokers,
            &topic,
            VEHICLES * per_vehicle,
            Duration::from_secs(60),
        );
        read_to_end(&brokers, &topic, Duration::from_secs(60))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("{e}"));
    let mut by_car: BTreeMap<String, Vec<(String, serde_json::Value)>> = BTreeMap::new();
    for m in &records {
        let car = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let doc: serde_json::Value =
            serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_default();
        let event = header(m, shared::headers::EVENT_ID).unwrap_or_default();
        by_car.entry(car).or_default().push((event, doc));
    }
    assert_eq!(
        by_car.len(),
        VEHICLES,
        "one key per vehicle: {:?}",
        by_car.keys()
    );
    for (car, recs) in &by_car {
        let ids: Vec<&str> = recs.iter().map(|(e, _)| e.as_str()).collect();
        let want: Vec<String> = (0..STATES_PER_VEHICLE)
            .map(|i| format!("{car}-s{i}"))
            .chain([format!("{car}-perm")])
            .collect();
        assert_eq!(
            ids, want,
            "{car}: change records (event ids) in order, each once"
        );
        let last = &recs.last().map(|(_, d)| d.clone()).unwrap_or_default();
        let state = state_document(s, car).await.unwrap_or_default();
        assert_eq!(last, &state, "{car}: the last record is the current state");
    }
}

#[tokio::test]
async fn kill_9_mid_batch_then_restart_gives_the_same_state_and_actions() {
    // A cache of one byte: every view is dropped as soon as its records commit, so a vehicle's
    // events that come after a commit read its view back from the changelog, before and after
    // the crash (how many do depends on timing; tests/it/changelog.rs has the deterministic case).
    let s = settings(&[
        ("CARHOOK__KAFKA__PARTITIONS", "3"),
        ("CARHOOK__PROCESSOR__BATCH_MAX", "20"),
        ("CARHOOK__PROCESSOR__CHANGELOG_CACHE_BYTES", "1"),
    ]);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log = std::env::temp_dir().join(format!("{}.processor.log", s.cql.keyspace));
    let first = ChildService::processor(&s, "crashy", &log, &[]).await;
    produce(&s, &workload()).await;
    eventually(Duration::from_secs(60), || async {
        metric_value(first.addr, "carhook_processor_events_total").await >= 40.0
    })
    .await;
    first.kill9();
    let second = ChildService::processor(&s, "crashy", &log, &[]).await;
    assert_exact_outcome(&s).await;
    assert_exact_changelog(&s).await;
    assert_eq!(second.terminate(), Some(0), "clean exit on SIGTERM");
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn second_instance_joining_and_first_leaving_mid_stream_loses_nothing_and_acts_once() {
    // Views dropped as soon as they are committed (see the kill -9 test).
    let s = settings(&[
        ("CARHOOK__KAFKA__PARTITIONS", "4"),
        ("CARHOOK__PROCESSOR__BATCH_MAX", "10"),
        ("CARHOOK__PROCESSOR__CHANGELOG_CACHE_BYTES", "1"),
    ]);
    let mut s_b = s.clone();
    s_b.processor.instance_id = format!("{}-b", s.processor.instance_id);
    let a = spawn_processor(&s).await;
    let work = workload();
    let (first_half, second_half) = work.split_at(work.len() / 2);
    produce(&s, first_half).await;
    let b = spawn_processor(&s_b).await;
    produce(&s, second_half).await;
    eventually(Duration::from_secs(60), || async {
        metric_value(b.addr, "carhook_processor_events_total").await >= 1.0
            || metric_value(a.addr, "carhook_processor_events_total").await
                >= work.len() as f64 * 0.6
    })
    .await;
    a.stop().await;
    assert_exact_outcome(&s).await;
    assert_exact_changelog(&s).await;
    b.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn a_partition_revoked_while_its_results_wait_to_commit_is_applied_again_by_its_new_owner_once(
) {
    // A long batch wait holds processed results in the first instance while it waits for more
    // records; the second joins then, and the partitions it takes over are revoked from the first
    // with results waiting. Those must be left out of the first's transaction and processed again
    // by the second: state, actions and changelog exactly as an undisturbed run.
    let s = settings(&[
        ("CARHOOK__KAFKA__PARTITIONS", "4"),
        ("CARHOOK__PROCESSOR__BATCH_WAIT_MS", "15000"),
        ("CARHOOK__PROCESSOR__BATCH_MAX", "1000"),
    ]);
    let mut s_b = s.clone();
    s_b.processor.instance_id = format!("{}-b", s.processor.instance_id);
    let a = spawn_processor(&s).await;
    let work = workload();
    produce(&s, &work).await;
    // Written to the store (counted when applied), not yet committed (counted after the commit).
    eventually(Duration::from_secs(60), || async {
        metric_value(a.addr, "carhook_processor_signals_written_total").await >= 1.0
    })
    .await;
    assert_eq!(
        metric_value(
            a.addr,
            "carhook_processor_transactions_total{result=\"committed\"}"
        )
        .await,
        0.0,
        "the first batch must still wait to commit when the second instance joins"
    );
    let b = spawn_processor(&s_b).await;
    assert_exact_outcome(&s).await;
    assert_exact_changelog(&s).await;
    let applied = |p: &Running| {
        let addr = p.addr;
        async move { metric_value(addr, "carhook_processor_events_total{outcome=\"applied\"}").await }
    };
    eventually(Duration::from_secs(30), || async {
        applied(&a).await + applied(&b).await == work.len() as f64
    })
    .await;
    assert!(
        metric_value(b.addr, "carhook_processor_signals_written_total").await > 0.0,
        "the second instance applied again what the first had applied and not committed"
    );
    assert!(
        metric_value(
            a.addr,
            "carhook_processor_rebalances_total{kind=\"revoke\"}"
        )
        .await
            >= 1.0
    );
    a.stop().await;
    b.stop().await;
    drop_keyspace(&s).await;
}
