//! `carhook-bench` (run by `make bench`): every figure next to its limit, measured in one run on one
//! machine against the real broker and store.
//!
//! - receiver: acknowledged requests/s and p99 vs (a) a bare hyper server answering 200 to the same
//!   requests from the same load tool, and (b) a plain rdkafka producer loop writing records of the
//!   same size with acks=all; the ratio is to the smaller of the two;
//! - processor: events/s drained from a pre-filled topic vs a plain loop doing the same CQL writes;
//! - end to end: latency from the receiver's 200 to the state being visible, at half the measured
//!   receiver maximum;
//! - replay: catch-up rate over the same backlog.
//!
//! Results go to `bench/results-<date>.json` and `bench/latest.md`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use carhook_tests::sim::load::{self, body_from, body_template, LoadSpec, Mode};
use carhook_tests::*;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};

#[path = "../bench/receiver.rs"]
mod receiver;

fn secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// Pre-fills a fresh events topic with `n` events, then measures the processor draining it, the
/// plain CQL loop doing the same writes, and replay over the same backlog.
async fn processor_figures(n: u64, body_bytes: usize) -> Value {
    let s = settings(&[]);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let producer: FutureProducer = shared::kafka::producer_config(&s.kafka)
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let template = body_template(body_bytes);
    let mut pending = Vec::new();
    for i in 0..n {
        let body = body_from(&template, i);
        let key = format!("load-veh-{}", i % 1000);
        pending.push(async {
            let (producer, body, key, topic) =
                (producer.clone(), body, key, s.kafka.events_topic.clone());
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&body),
                    Duration::from_secs(30),
                )
                .await
                .is_ok()
        });
        if pending.len() >= 512 {
            futures::future::join_all(pending.drain(..)).await;
        }
    }
    futures::future::join_all(pending).await;
    let started = Instant::now();
    let p = spawn_processor(&s).await;
    eventually(Duration::from_secs(900), || async {
        metric_value(p.addr, "carhook_processor_events_total").await >= n as f64
    })
    .await;
    let drain = n as f64 / started.elapsed().as_secs_f64();
    p.stop().await;

    // The same CQL writes from a plain loop: claim + state batch per event, one loop per partition.
    let session = Arc::new(
        shared::cql::connect(&s.cql)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let store = carhook_processor::store::Store::prepare(session, &s.cql.keyspace, 7)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ctx = carhook_processor::effects::Context {
        received_at: shared::clock::EpochMillis::now(),
        delivered_at: shared::clock::EpochMillis::now(),
        logic_version: 1,
        rate_limit_backoff_secs: 900,
        max_skew_ms: 60_000,
    };
    let started = Instant::now();
    let loops = usize::try_from(s.kafka.partitions).unwrap_or(6);
    let template = Arc::new(template);
    let mut tasks = Vec::new();
    for l in 0..loops {
        let (store, template) = (store.clone(), Arc::clone(&template));
        tasks.push(tokio::spawn(async move {
            let mut i = l as u64;
            while i < n {
                let body = body_from(&template.replace("load-", "plain-"), i);
                if let Ok(ev) = shared::event::Event::parse(&body) {
                    let pos = carhook_processor::store::Position {
                        topic: "plain".into(),
                        partition: l as i32,
                        offset: i as i64,
                    };
                    let _ = store
                        .claim(
                            ev.envelope.event_id.as_str(),
                            None,
                            &pos,
                            "plain",
                            ctx.delivered_at,
                        )
                        .await;
                    let _ = store
                        .apply(&carhook_processor::effects::plan(&ev, ctx))
                        .await;
                }
                i += loops as u64;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let plain = n as f64 / started.elapsed().as_secs_f64();

    let st = store.clone();
    let req = carhook_processor::replay::ReplayRequest {
        from: carhook_processor::replay::Bound::Offsets(BTreeMap::new()),
        to: None,
        vehicle: None,
        dry_run: false,
        group: None,
        max_records: None,
    };
    let started = Instant::now();
    let sum = carhook_processor::replay::replay(
        &s,
        &st,
        &req,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let replay_rate = sum.read as f64 / started.elapsed().as_secs_f64();
    drop_keyspace(&s).await;
    json!({"events": n, "body_bytes": body_from(&template, 0).len(), "processor_drain_per_sec": drain, "plain_cql_loop_per_sec": plain,
        "ratio": drain / plain, "replay_per_sec": replay_rate})
}

/// Receiver + processor running; load at `rate`; a sample of events is polled in the store until
/// visible after its 200.
async fn end_to_end(rate: u32, duration: Duration) -> Value {
    let s = settings(&[]);
    let r = spawn_receiver(&s).await;
    let p = spawn_processor(&s).await;
    let bg = tokio::spawn(load::run(
        LoadSpec {
            addr: r.addr,
            path: s.receiver.path.clone(),
            token: TOKEN.to_string(),
            mode: Mode::Rate(rate),
            duration,
            body_bytes: 4096,
            max_inflight: 4096,
        },
        None,
    ));
    let session = Arc::new(
        shared::cql::connect(&s.cql)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let q = format!(
        "SELECT code FROM {}.signal_state WHERE vehicle_id = ? LIMIT 1",
        s.cql.keyspace
    );
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + duration;
    let mut i = 0;
    while Instant::now() < deadline {
        let vehicle = format!("e2e-probe-{i}");
        let body = state_event(
            &format!("e2e-{i}"),
            &vehicle,
            &[(
                "charge-ischarging",
                json!({"value": true}),
                1_764_000_000_000,
            )],
        );
        let reply = post(
            r.addr,
            &s.receiver.path,
            body.clone(),
            Some(&sign(TOKEN, &body)),
        )
        .await;
        let acked = Instant::now();
        if reply.status == 200 {
            loop {
                let seen = session
                    .query_unpaged(q.as_str(), (vehicle.as_str(),))
                    .await
                    .ok()
                    .and_then(|r| r.into_rows_result().ok())
                    .is_some_and(|r| r.rows_num() > 0);
                if seen || acked.elapsed() > Duration::from_secs(30) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let _ = hist.record(
                u64::try_from(acked.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bg = bg.await.ok();
    p.stop().await;
    r.stop().await;
    drop_keyspace(&s).await;
    json!({"load_rate_per_sec": rate, "achieved_per_sec": bg.map(|b| b.throughput_per_sec), "samples": hist.len(),
        "p50_ms": hist.value_at_quantile(0.5) as f64 / 1000.0, "p99_ms": hist.value_at_quantile(0.99) as f64 / 1000.0, "max_ms": hist.max() as f64 / 1000.0})
}

fn f(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| {
        if x >= 100.0 {
            format!("{x:.0}")
        } else {
            format!("{x:.2}")
        }
    })
}

/// Per-write cost of the two freshness designs and of the dedup claim, on the real store:
/// (a) `INSERT … IF NOT EXISTS` (the claim), (b) a conditional `UPDATE … IF ts < ?` (the LWT way to
/// order state), (c) `UPDATE … USING TIMESTAMP` (the chosen way). Sequential latency and 6-way rate.
async fn cql_costs(n: usize) -> Value {
    let s = settings(&[]);
    let session = Arc::new(
        shared::cql::connect(&s.cql)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    shared::cql::migrate(&session, &s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ks = &s.cql.keyspace;
    session
        .query_unpaged(format!("CREATE TABLE IF NOT EXISTS {ks}.lwt_state (vehicle_id text, code text, ts bigint, value text, PRIMARY KEY (vehicle_id, code))"), ())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let claim = session.prepare(format!("INSERT INTO {ks}.processed_events (event_id, status) VALUES (?, 'claimed') IF NOT EXISTS")).await.unwrap_or_else(|e| panic!("{e}"));
    let lwt_seed = session.prepare(format!("INSERT INTO {ks}.lwt_state (vehicle_id, code, ts, value) VALUES (?, 'c', 0, '') IF NOT EXISTS")).await.unwrap_or_else(|e| panic!("{e}"));
    let lwt = session.prepare(format!("UPDATE {ks}.lwt_state SET ts = ?, value = ? WHERE vehicle_id = ? AND code = 'c' IF ts < ?")).await.unwrap_or_else(|e| panic!("{e}"));
    let ts = session.prepare(format!("UPDATE {ks}.signal_state USING TIMESTAMP ? SET value = ? WHERE vehicle_id = ? AND code = 'c'")).await.unwrap_or_else(|e| panic!("{e}"));
    let value = "x".repeat(200);
    let mut out = serde_json::Map::new();
    for (name, which) in [
        ("claim_insert_if_not_exists", 0),
        ("lwt_update_if_older", 1),
        ("update_using_timestamp", 2),
    ] {
        let (session2, claim2, lwt_seed2, lwt2, ts2, value2) = (
            Arc::clone(&session),
            claim.clone(),
            lwt_seed.clone(),
            lwt.clone(),
            ts.clone(),
            value.clone(),
        );
        let one = move |i: usize| {
            let (session, claim, lwt_seed, lwt, ts, value) = (
                Arc::clone(&session2),
                claim2.clone(),
                lwt_seed2.clone(),
                lwt2.clone(),
                ts2.clone(),
                value2.clone(),
            );
            async move {
                let v = format!("veh-{}", i % 500);
                let t = 1_764_000_000_000_000_i64 + i as i64;
                let r = match which {
                    0 => session
                        .execute_unpaged(&claim, (format!("ev-{i}"),))
                        .await
                        .map(|_| ()),
                    1 => {
                        if i < 500 {
                            let _ = session.execute_unpaged(&lwt_seed, (v.clone(),)).await;
                        }
                        session
                            .execute_unpaged(&lwt, (t, value.as_str(), v.as_str(), t))
                            .await
                            .map(|_| ())
                    }
                    _ => session
                        .execute_unpaged(&ts, (t, value.as_str(), v.as_str()))
                        .await
                        .map(|_| ()),
                };
                if let Err(e) = r {
                    panic!("{name} failed: {e}");
                }
            }
        };
        let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap_or_else(|e| panic!("{e}"));
        for i in 0..n {
            let t = Instant::now();
            one(i + which * 1_000_000).await;
            let _ = h.record(
                u64::try_from(t.elapsed().as_micros())
                    .unwrap_or(u64::MAX)
                    .max(1),
            );
        }
        let started = Instant::now();
        let tasks: Vec<_> = (0..6)
            .map(|w| {
                let one = one.clone();
                tokio::spawn(async move {
                    for i in 0..n / 6 {
                        one(2_000_000 + which * 1_000_000 + w * 100_000 + i).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        let rate = (n / 6 * 6) as f64 / started.elapsed().as_secs_f64();
        out.insert(name.to_string(), json!({"p50_ms": h.value_at_quantile(0.5) as f64 / 1000.0, "p99_ms": h.value_at_quantile(0.99) as f64 / 1000.0, "writes_per_sec_6_way": rate}));
    }
    drop_keyspace(&s).await;
    Value::Object(out)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    receiver::serve_if_asked().await;
    if std::env::var("BENCH_ONLY").as_deref() == Ok("cql") {
        let v = cql_costs(
            std::env::var("BENCH_EVENTS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1200),
        )
        .await;
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    let dur = secs("BENCH_SECONDS", 10);
    let events: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let machine = format!(
        "{} cores, {} GB RAM, {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok()))
            .map_or(0, |kb| kb / 1_048_576),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default()
    );
    let (r4, r50, receiver_md) = receiver::figures(dur.as_secs()).await;
    if std::env::var("BENCH_ONLY").as_deref() == Ok("receiver") {
        let all = json!({"receiver_4kb": r4, "receiver_50kb": r50});
        println!(
            "{}\n{receiver_md}",
            serde_json::to_string_pretty(&all).unwrap_or_default()
        );
        return;
    }
    eprintln!("bench: processor 4 KB ...");
    let p4 = processor_figures(events, 4096).await;
    eprintln!("bench: processor 50 KB ...");
    let p50 = processor_figures(events / 5, 50_000).await;
    eprintln!("bench: CQL write costs ...");
    let cql = cql_costs(1200).await;
    let half = (r4["receiver"]["throughput_per_sec"]
        .as_f64()
        .unwrap_or(200.0)
        / 2.0)
        .min(p4["processor_drain_per_sec"].as_f64().unwrap_or(f64::MAX)) as u32;
    eprintln!("bench: end to end at {half}/s ...");
    let e2e = end_to_end(half.max(1), dur).await;
    let date = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}-{:02}-{:02}T{:02}{:02}",
        date.year(),
        u8::from(date.month()),
        date.day(),
        date.hour(),
        date.minute()
    );
    let all = json!({"date": stamp, "machine": machine, "git": std::env::var("BENCH_GIT").unwrap_or_default(),
        "receiver_4kb": r4, "receiver_50kb": r50, "processor_4kb": p4, "processor_50kb": p50, "end_to_end": e2e, "cql_write_costs": cql});
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join(format!("results-{stamp}.json")),
        serde_json::to_string_pretty(&all).unwrap_or_default(),
    );
    let mut md = format!("Measured {stamp} UTC on {machine} (`make bench`; Kafka, Cassandra and the services all on this machine).\n\n");
    md.push_str(&receiver_md);
    md.push_str("\n| figure | 4 KB | 50 KB | limit it is measured against |\n|---|---|---|---|\n");
    md.push_str(&format!(
        "| processor drain events/s | {} | {} | |\n",
        f(&p4["processor_drain_per_sec"]),
        f(&p50["processor_drain_per_sec"])
    ));
    md.push_str(&format!(
        "| plain CQL loop (same writes) events/s | {} | {} | |\n",
        f(&p4["plain_cql_loop_per_sec"]),
        f(&p50["plain_cql_loop_per_sec"])
    ));
    md.push_str(&format!(
        "| processor / plain CQL loop | {} | {} | 1.0 = at the limit |\n",
        f(&p4["ratio"]),
        f(&p50["ratio"])
    ));
    md.push_str(&format!(
        "| replay catch-up events/s | {} | {} | processor drain |\n",
        f(&p4["replay_per_sec"]),
        f(&p50["replay_per_sec"])
    ));
    md.push_str(&format!("| end to end 200 → state visible p50 / p99 ms (at {}/s) | {} / {} | | Smartcar budget: none; SLO target < 1 s |\n", half, f(&e2e["p50_ms"]), f(&e2e["p99_ms"])));
    md.push_str("\nCQL write cost on this store (sequential p50 / p99 ms; writes/s with 6 concurrent writers):\n\n| write | p50 ms | p99 ms | writes/s |\n|---|---|---|---|\n");
    for k in [
        "claim_insert_if_not_exists",
        "lwt_update_if_older",
        "update_using_timestamp",
    ] {
        md.push_str(&format!(
            "| {k} | {} | {} | {} |\n",
            f(&cql[k]["p50_ms"]),
            f(&cql[k]["p99_ms"]),
            f(&cql[k]["writes_per_sec_6_way"])
        ));
    }
    let _ = std::fs::write(dir.join("latest.md"), &md);
    println!("{md}");
}
