//! Outages of the real dependencies: the Kafka broker and the CQL store are stopped and started
//! again with `deploy/stack/stack.sh`. These tests stop shared services, so they run one at a time
//! (a process-wide lock) and in their own test binary, which cargo runs apart from the parallel suite.
//! `stack.sh` only stops processes it started from its own state directory: from a git worktree
//! that shares another checkout's running stack, set `CARHOOK_STACK_DIR` to that checkout's `.stack`.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use carhook_tests::*;
use serde_json::json;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn stack(args: &[&str]) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/stack/stack.sh");
    let status = Command::new("bash")
        .arg(script)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("stack.sh: {e}"));
    assert!(status.success(), "stack.sh {args:?} failed");
}

/// Starts the component again even if the test panics half-way.
struct Restore(&'static str);

impl Drop for Restore {
    fn drop(&mut self) {
        stack(&["up", self.0]);
    }
}

async fn send(addr: std::net::SocketAddr, i: usize) -> Reply {
    let body = state_event(
        &format!("out-{i}"),
        &format!("car-{}", i % 7),
        &[(
            "charge-ischarging",
            json!({"value": true}),
            1_731_940_328_000,
        )],
    );
    let sig = sign(TOKEN, &body);
    post(addr, "/webhooks/smartcar", body, Some(&sig)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_down_gives_503_with_retry_after_and_broker_back_gives_200_with_nothing_acknowledged_lost(
) {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = settings(&[
        ("CARHOOK__KAFKA__DELIVERY_TIMEOUT_MS", "3000"),
        ("CARHOOK__RECEIVER__BREAKER_FAILURES", "3"),
        ("CARHOOK__RECEIVER__BREAKER_OPEN_MS", "1000"),
    ]);
    let r = spawn_receiver(&s).await;
    let mut acked = HashSet::new();
    for i in 0..20 {
        assert_eq!(send(r.addr, i).await.status, 200);
        acked.insert(format!("out-{i}"));
    }
    {
        let _restore = Restore("kafka");
        stack(&["down", "kafka"]);
        let mut saw_503 = 0;
        for i in 20..30 {
            let started = Instant::now();
            let reply = send(r.addr, i).await;
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "answer took {:?}",
                started.elapsed()
            );
            if reply.status == 200 {
                acked.insert(format!("out-{i}"));
            } else {
                assert_eq!(reply.status, 503);
                assert!(reply.headers.get("retry-after").is_some());
                saw_503 += 1;
            }
        }
        assert!(
            saw_503 >= 9,
            "broker down must mean 503, got {saw_503} of 10"
        );
    }
    // Broker back: the breaker's probe succeeds and requests are acknowledged again.
    let mut next = 30;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let reply = send(r.addr, next).await;
        if reply.status == 200 {
            acked.insert(format!("out-{next}"));
            next += 1;
            break;
        }
        next += 1;
        assert!(Instant::now() < deadline, "receiver never recovered");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for i in next..next + 10 {
        assert_eq!(send(r.addr, i).await.status, 200);
        acked.insert(format!("out-{i}"));
    }
    let on_topic: HashSet<String> = read_topic(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        acked.len(),
        Duration::from_secs(60),
    )
    .iter()
    .filter_map(|m| header(m, shared::headers::EVENT_ID))
    .collect();
    let lost: Vec<_> = acked.difference(&on_topic).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but not on the topic: {lost:?}"
    );
    r.stop().await;
}

/// Sends signed events while the broker is down until the breaker opens (the admin `/ready` names
/// `circuit-closed`); returns the next event number.
async fn open_the_breaker(r: &Running, mut next: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = send(r.addr, next).await;
        next += 1;
        assert_eq!(reply.status, 503, "broker down must mean 503");
        if get(r.admin, "/ready").await.1.contains("circuit-closed") {
            return next;
        }
        assert!(Instant::now() < deadline, "the breaker never opened");
    }
}

/// Starts a receiver (2 s delivery timeout, breaker open after 2 failures for 1 s, plus `extra`),
/// takes the broker down until the breaker opens, brings it back (`stack.sh` waits for it), and waits
/// up to `within` for `/ready` with no webhook traffic at all: behind a Service an unready pod gets no
/// requests. Returns the receiver and the next event number.
async fn restart_broker_until_ready(extra: &[(&str, &str)], within: Duration) -> (Running, usize) {
    let mut pairs = vec![
        ("CARHOOK__KAFKA__DELIVERY_TIMEOUT_MS", "2000"),
        ("CARHOOK__RECEIVER__BREAKER_FAILURES", "2"),
        ("CARHOOK__RECEIVER__BREAKER_OPEN_MS", "1000"),
    ];
    pairs.extend_from_slice(extra);
    let r = spawn_receiver(&settings(&pairs)).await;
    assert_eq!(send(r.addr, 0).await.status, 200);
    let next = {
        let _restore = Restore("kafka");
        stack(&["down", "kafka"]);
        open_the_breaker(&r, 1).await
    };
    let back = Instant::now();
    eventually(within, || async { get(r.admin, "/ready").await.0 == 200 }).await;
    println!("ready again {:?} after the broker", back.elapsed());
    (r, next)
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_returns_without_webhook_traffic_after_the_broker_comes_back() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (r, next) = restart_broker_until_ready(&[], Duration::from_secs(15)).await;
    assert_eq!(send(r.addr, next).await.status, 200);
    r.stop().await;
}

/// Readiness must mean "a produce would be acknowledged now". After a broker restart librdkafka
/// answers a metadata request over a fresh bootstrap connection at once, while the connection to
/// the partitions' leader, which produces use, still waits out its reconnect backoff. Here that
/// backoff is 30 s (22–45 s with jitter) from the leader connection's first failure, and the
/// broker is back about 16 s after it went down: a readiness check that trusted metadata says 200
/// at least 6 s before a produce can succeed. The check must wait for the leader's own connection.
#[tokio::test(flavor = "multi_thread")]
async fn readiness_waits_for_the_leader_connection_not_just_metadata() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let backoff = [
        ("CARHOOK__KAFKA__PROPERTIES__RECONNECT_BACKOFF_MS", "30000"),
        (
            "CARHOOK__KAFKA__PROPERTIES__RECONNECT_BACKOFF_MAX_MS",
            "30000",
        ),
    ];
    let (r, next) = restart_broker_until_ready(&backoff, Duration::from_secs(60)).await;
    let reply = send(r.addr, next).await;
    assert_eq!(
        reply.status,
        200,
        "/ready said 200 but the next delivery was refused: {}",
        String::from_utf8_lossy(&reply.body)
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_probe_is_recorded_so_the_breaker_probes_again() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let open_ms = 300;
    let s = settings(&[
        ("CARHOOK__KAFKA__DELIVERY_TIMEOUT_MS", "3000"),
        ("CARHOOK__RECEIVER__BREAKER_FAILURES", "1"),
        ("CARHOOK__RECEIVER__BREAKER_OPEN_MS", "300"),
    ]);
    let r = spawn_receiver(&s).await;
    assert_eq!(send(r.addr, 0).await.status, 200);
    let unavailable = r#"carhook_receiver_requests_total{outcome="kafka_unavailable"}"#;
    let next = {
        let _restore = Restore("kafka");
        stack(&["down", "kafka"]);
        let next = open_the_breaker(&r, 1).await;
        // Wait out the open period: the next request is the half-open probe. Its client gives up
        // while the produce still waits on the dead broker (a load balancer's timeout, a reset).
        tokio::time::sleep(Duration::from_millis(open_ms + 200)).await;
        let cancelled = tokio::time::timeout(Duration::from_millis(800), send(r.addr, next)).await;
        assert!(cancelled.is_err(), "the probe must still be producing");
        // Its outcome counts as a failure: after another open period a new probe really tries
        // the broker (kafka_unavailable), instead of every request being refused as circuit_open.
        tokio::time::sleep(Duration::from_millis(open_ms + 200)).await;
        let before = metric_value(r.admin, unavailable).await;
        let reply = send(r.addr, next + 1).await;
        assert_eq!(reply.status, 503);
        assert_eq!(
            metric_value(r.admin, unavailable).await,
            before + 1.0,
            "after a cancelled probe the breaker must let a new probe through"
        );
        next + 2
    };
    eventually(Duration::from_secs(15), || async {
        send(r.addr, next).await.status == 200
    })
    .await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn store_down_mid_stream_commits_nothing_dead_letters_nothing_and_completes_after_restart() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = settings(&[
        ("CARHOOK__CQL__REQUEST_TIMEOUT_MS", "1000"),
        ("CARHOOK__PROCESSOR__MAX_BACKOFF_MS", "2000"),
    ]);
    let p = spawn_processor(&s).await;
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let applied = r#"carhook_processor_events_total{outcome="applied"}"#;
    let before = state_event(
        "before",
        "car-s",
        &[(
            "odometer-traveleddistance",
            json!({"value": 1}),
            1_731_940_000_000,
        )],
    );
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some("car-s"), &before)],
    )
    .await;
    eventually(Duration::from_secs(60), || async {
        metric_value(p.admin, applied).await == 1.0
    })
    .await;
    {
        let _restore = Restore("cassandra");
        stack(&["down", "cassandra"]);
        let during: Vec<Vec<u8>> = (0..5)
            .map(|i| {
                state_event(
                    &format!("during-{i}"),
                    "car-s",
                    &[(
                        "odometer-traveleddistance",
                        json!({"value": 10 + i}),
                        1_731_940_100_000 + i64::from(i),
                    )],
                )
            })
            .collect();
        let recs: Vec<(Option<&str>, &[u8])> = during
            .iter()
            .map(|b| (Some("car-s"), b.as_slice()))
            .collect();
        produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &recs).await;
        eventually(Duration::from_secs(60), || async {
            get(p.admin, "/ready").await.0 == 503
        })
        .await;
        assert_eq!(
            metric_value(p.admin, applied).await,
            1.0,
            "nothing applied while the store is down"
        );
        assert_eq!(
            record_count(&s.kafka.brokers, &s.kafka.dlq_topic),
            0,
            "a store outage is never poison"
        );
    }
    eventually(Duration::from_secs(120), || async {
        metric_value(p.admin, applied).await == 6.0
    })
    .await;
    eventually(Duration::from_secs(30), || async {
        get(p.admin, "/ready").await.0 == 200
    })
    .await;
    let st = vehicle_state(&s, "car-s").await.unwrap_or_default();
    assert_eq!(
        st["signals"]["odometer-traveleddistance"]["body"]["value"],
        14
    );
    assert_eq!(record_count(&s.kafka.brokers, &s.kafka.dlq_topic), 0);
    p.stop().await;
    drop_keyspace(&s).await;
}

/// A write the store acknowledged survives a kill -9 of the store. The processor commits a batch's
/// offsets once its writes are acknowledged, so the whole pipeline's promise rests on this. With
/// Cassandra's default `commitlog_sync: periodic`, a restart replays the commit log only up to its
/// last sync marker: the local stack lost the writes acknowledged in the moments before a kill -9
/// (7 and 34 of about 450), and the fault campaign below once found a processor's committed effects
/// gone.
#[tokio::test(flavor = "multi_thread")]
async fn store_keeps_every_acknowledged_write_across_a_kill_9() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let s = settings(&[]);
    let ks = &s.cql.keyspace;
    let session = shared::cql::connect(&s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for ddl in [
        format!(
            "CREATE KEYSPACE {ks} WITH replication = \
             {{'class': 'SimpleStrategy', 'replication_factor': 1}}"
        ),
        format!("CREATE TABLE {ks}.acked (k int PRIMARY KEY, v int)"),
    ] {
        session
            .query_unpaged(ddl, ())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let insert = session
        .prepare(format!("INSERT INTO {ks}.acked (k, v) VALUES (?, ?)"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Eight writes at a time, as the processor writes a batch, until the store is killed under them:
    // the writes acknowledged in the last milliseconds before the kill are the ones at risk.
    let session = std::sync::Arc::new(session);
    let acked = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
    let writer = tokio::spawn({
        let (session, acked) = (session.clone(), acked.clone());
        async move {
            for first in (0..).step_by(8) {
                let writes = (first..first + 8).map(|k| {
                    let (session, insert) = (&session, &insert);
                    async move { (k, session.execute_unpaged(insert, (k, k)).await) }
                });
                let mut refused = false;
                for (k, result) in futures::future::join_all(writes).await {
                    match result {
                        Ok(_) => acked.lock().await.push(k),
                        Err(_) => refused = true,
                    }
                }
                if refused {
                    return;
                }
            }
        }
    });
    eventually(Duration::from_secs(60), || async {
        acked.lock().await.len() >= 400
    })
    .await;
    {
        let _restore = Restore("cassandra");
        tokio::task::spawn_blocking(|| kill9_stack("cassandra"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        writer.await.unwrap_or_else(|e| panic!("{e}"));
    }
    let acked = std::mem::take(&mut *acked.lock().await);
    drop(session);
    let session = shared::cql::connect(&s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let kept: HashSet<i32> = session
        .query_unpaged(format!("SELECT k FROM {ks}.acked"), ())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_rows_result()
        .unwrap_or_else(|e| panic!("{e}"))
        .rows::<(i32,)>()
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|row| row.unwrap_or_else(|e| panic!("{e}")).0)
        .collect();
    let lost: Vec<i32> = acked
        .iter()
        .copied()
        .filter(|k| !kept.contains(k))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost by a kill -9 of the store: {lost:?}",
        lost.len(),
        acked.len()
    );
    drop(session);
    drop_keyspace(&s).await;
}

fn kill9_stack(component: &str) {
    if let Some(pid) = stack_pid(component) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(pid.to_string())
            .status();
        // Wait until it is really gone (its ports released) before anyone restarts it.
        let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while proc_dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The short fault campaign (`make chaos` runs a longer one): signed traffic with duplicates and
/// out-of-order deliveries while a receiver, a processor (of two), the broker and the store are
/// killed with SIGKILL and restarted, and a processor is stalled with SIGSTOP. Afterwards the system
/// must match the simulator's ground truth: every acknowledged event reflected, every action exactly
/// once, and nothing dropped while the system was healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_campaign_loses_nothing_acknowledged_and_applies_nothing_twice() {
    use carhook_tests::sim::{self, generate::Faults};
    let _serial = ONE_AT_A_TIME.lock().await;
    let vehicles: usize = std::env::var("CHAOS_VEHICLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let per_vehicle: usize = std::env::var("CHAOS_EVENTS_PER_VEHICLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "4")]);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log = std::env::temp_dir().join(format!("{}.chaos.log", s.cql.keyspace));
    let fast = [
        ("CARHOOK__KAFKA__DELIVERY_TIMEOUT_MS", "3000"),
        ("CARHOOK__RECEIVER__BREAKER_OPEN_MS", "1000"),
    ];
    let mut proc_a = ChildService::processor(&s, "chaos-a", &log, &[]).await;
    let proc_b = ChildService::processor(&s, "chaos-b", &log, &[]).await;
    let mut recv = ChildService::receiver(&s, &log, &fast).await;
    let addr = recv.addr;
    let faults = Faults {
        duplicates: 0.2,
        out_of_order: 0.2,
        errors: 0.15,
        partial_failures: 0.1,
        ..Faults::default()
    };
    let events = sim::generate::generate(99, vehicles, per_vehicle, faults);
    let path = s.receiver.path.clone();
    // Retries compressed to 12.5/25/50 s (Smartcar: 25/50/100 s): longer than any outage below, even
    // when a killed broker needs its log recovery on a loaded machine. (Invalid
    // signatures are left to the matrix: their four refused attempts would only stretch the run.)
    // Traffic is spread over the whole fault window: slices of events with pauses in between.
    let sender = tokio::spawn({
        let events = events.clone();
        async move {
            let mut all = Vec::new();
            let mut total = sim::send::SendReport::default();
            for slice in events.chunks(events.len().div_ceil(12).max(1)) {
                let (d, r) = sim::send::send_all(addr, &path, TOKEN, slice, 8, 0.5, None).await;
                all.extend(d);
                total.absorb(&r);
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            (all, total)
        }
    });
    let mut injected = Vec::new();
    let pause = |secs: u64| tokio::time::sleep(Duration::from_secs(secs));
    pause(2).await;
    recv.kill9();
    injected.push("kill -9 receiver");
    recv = ChildService::receiver_on(addr, &s, &log, &fast).await;
    pause(2).await;
    proc_a.kill9();
    injected.push("kill -9 processor a");
    proc_a = ChildService::processor(&s, "chaos-a", &log, &[]).await;
    pause(2).await;
    proc_b.signal("STOP");
    injected.push("SIGSTOP processor b (4 s)");
    pause(4).await;
    proc_b.signal("CONT");
    pause(1).await;
    kill9_stack("kafka");
    injected.push("kill -9 kafka");
    stack(&["up", "kafka"]);
    pause(2).await;
    kill9_stack("cassandra");
    injected.push("kill -9 cassandra");
    stack(&["up", "cassandra"]);
    let (deliveries, report) = sender.await.unwrap_or_else(|e| panic!("{e}"));
    let run = sim::Run::new(99, faults, &events, deliveries, report.clone());
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut diff;
    loop {
        diff = sim::check::diff(&s, &run.truth, &run.deliveries, 0).await;
        if diff.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let duplicated = diff.iter().filter(|d| d.contains("emitted")).count();
    println!("| events | faults injected | 200s | 503s | 401s | connection errors | dropped after 4 attempts | differences | duplicated effects |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} |",
        report.events,
        injected.len(),
        injected.join(", "),
        report.ok_2xx,
        report.unavailable_5xx,
        report.unauthorized_401,
        report.connection_errors,
        report.dropped_after_4_attempts,
        diff.len(),
        duplicated
    );
    assert_eq!(
        report.dropped_after_4_attempts, 0,
        "Smartcar would have dropped events: {:?}",
        run.truth.dropped
    );
    assert!(
        diff.is_empty(),
        "system differs from ground truth after the campaign:\n{}",
        diff.join("\n")
    );
    let _ = recv.terminate();
    let _ = proc_a.terminate();
    let _ = proc_b.terminate();
    drop_keyspace(&s).await;
}
