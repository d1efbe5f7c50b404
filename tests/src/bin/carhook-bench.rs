//! `carhook-bench` (run by `make bench`): every figure next to its limit, measured in one run on one
//! machine against the real broker and store.
//!
//! - receiver: acknowledged requests/s and p99 vs (a) a bare hyper server answering 200 to the same
//!   requests from the same load tool, and (b) a plain rdkafka producer loop writing records of the
//!   same size with acks=all; the ratio is to the smaller of the two;
//! - processor: events/s drained from a pre-filled topic vs a plain loop doing the same CQL writes;
//! - end to end: latency from the receiver's 200 to the state being visible, at half the maximum
//!   the whole pipeline sustains on the machine (measured first);
//! - replay: catch-up rate over the same backlog.
//!
//! Results go to `bench/results-<date>.json` and `bench/latest.md`. `--figure` picks one figure;
//! `--help` lists the options. The processor and replay figures live in
//! `carhook_tests::bench::processor`, the end-to-end figure in `carhook_tests::bench::end_to_end`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use carhook_tests::bench::end_to_end::{end_to_end, end_to_end_max};
use carhook_tests::bench::processor::processor_figures;
use carhook_tests::*;
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

/// Receiver figures: each server its own process (this binary, re-executed), loaded by `wrk`.
#[path = "../bench/receiver.rs"]
mod receiver;

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

/// Which figure to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Figure {
    /// Everything below, in one run.
    All,
    /// Receiver req/s, CPU per request, RSS and p99 vs bare hyper, a same-settings baseline (read +
    /// acks=all produce) and a plain producer (4 KB and 50 KB; needs `wrk`).
    Receiver,
    /// Processor drain vs the plain CQL loop, and replay catch-up (4 KB and 50 KB).
    Processor,
    /// Two processor instances sharing the group vs the plain loop at twice the concurrency (4 KB).
    ProcessorTwo,
    /// End-to-end latency (200 → state visible) at half the whole pipeline's measured sustained maximum
    EndToEnd,
    /// Per-write cost of the claim, a conditional update and a timestamped update.
    Cql,
}

/// Measures each carhook figure next to its limit against the real broker and store; writes
/// bench/results-<date>.json and bench/latest.md.
#[derive(Parser, Debug)]
#[command(name = "carhook-bench")]
struct Args {
    /// The figures to measure (repeat the flag or separate with commas).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "all",
        env = "BENCH_ONLY"
    )]
    figure: Vec<Figure>,
    /// Measurements per processor figure (median and spread are reported).
    #[arg(long, default_value_t = 3, env = "BENCH_RUNS")]
    runs: usize,
    /// Backlog size for the 4 KB processor figure (the 50 KB one uses a fifth).
    #[arg(long, default_value_t = 5000, env = "BENCH_EVENTS")]
    events: u64,
    /// Duration of each load phase (receiver, end to end), seconds.
    #[arg(long, default_value_t = 10, env = "BENCH_SECONDS")]
    seconds: u64,
    /// End-to-end load rate; default half the sustained maximum of receiver and processor together, measured first
    #[arg(long)]
    rate: Option<u32>,
    /// `processor.changelog_cache_bytes` for the processor figure's drain with the changelog on;
    /// default the shipped default
    #[arg(long, env = "BENCH_CHANGELOG_CACHE_BYTES")]
    changelog_cache_bytes: Option<u64>,
}

fn machine() -> String {
    format!(
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
    )
}

/// `median (min–max)` of a summarised figure.
fn spread(v: &Value) -> String {
    if v["median"].is_null() {
        return "-".into();
    }
    format!("{} ({}–{})", f(&v["median"]), f(&v["min"]), f(&v["max"]))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // Re-executed as one of the receiver figure's servers: serve, never return.
    receiver::serve_if_asked().await;
    let args = Args::parse();
    let dur = Duration::from_secs(args.seconds);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let runs = args.runs.max(1);
    let wants = |f: Figure| args.figure.contains(&Figure::All) || args.figure.contains(&f);
    let mut all = serde_json::Map::new();
    let mut md = String::new();
    if wants(Figure::Receiver) {
        let (r4, r50, receiver_md) = receiver::figures(dur.as_secs()).await;
        md.push_str(&receiver_md);
        md.push('\n');
        all.insert("receiver_4kb".into(), r4);
        all.insert("receiver_50kb".into(), r50);
    }
    if wants(Figure::Processor) {
        eprintln!("bench: processor 4 KB ...");
        let p4 = processor_figures(args.events, 4096, 1, runs, args.changelog_cache_bytes).await;
        eprintln!("bench: processor 50 KB ...");
        let p50 =
            processor_figures(args.events / 5, 50_000, 1, runs, args.changelog_cache_bytes).await;
        md.push_str(&format!("Processor as shipped (state changelog off), median (min–max) of {runs} runs; the plain loop runs {} workers, the processor's concurrency budget; the changelog rows are a second drain of the same backlog with it on (`processor.changelog_cache_bytes` {}):\n\n", p4["concurrency"], p4["changelog_cache_budget_bytes"]));
        md.push_str("| figure | 4 KB | 50 KB | target |\n|---|---|---|---|\n");
        for (label, key, target) in [
            ("processor drain events/s", "processor_drain_per_sec", ""),
            (
                "plain CQL loop (same writes) events/s",
                "plain_cql_loop_per_sec",
                "",
            ),
            ("processor / plain CQL loop", "ratio", "≥ 0.8"),
            ("replay catch-up events/s", "replay_per_sec", ""),
            ("replay / processor drain", "replay_to_drain", "≥ 1.0"),
            ("processor peak RSS MB", "processor_peak_rss_mb", "< 128"),
            (
                "drain with changelog on events/s",
                "drain_with_changelog_per_sec",
                "",
            ),
            (
                "drain with / without changelog",
                "changelog_drain_ratio",
                "",
            ),
            (
                "processor peak RSS MB, changelog on",
                "changelog_peak_rss_mb",
                "",
            ),
            (
                "changelog views in memory at the end, estimated bytes",
                "changelog_cache_bytes_at_end",
                "",
            ),
            (
                "changelog views read back from the changelog",
                "changelog_views_read_back",
                "",
            ),
            (
                "drain with changelog on, restored from a full changelog, events/s",
                "drain_with_changelog_restored_per_sec",
                "",
            ),
            (
                "that drain / drain without changelog",
                "changelog_restored_drain_ratio",
                "",
            ),
            (
                "processor peak RSS MB, restored from a full changelog",
                "changelog_restored_peak_rss_mb",
                "",
            ),
            (
                "views read back in that drain",
                "changelog_restored_views_read_back",
                "",
            ),
            ("state changelog records written", "state_changes", ""),
            (
                "CPU ms per event, drain without changelog: processor",
                "drain_cpu_ms_service",
                "",
            ),
            ("… Kafka", "drain_cpu_ms_kafka", ""),
            ("… Cassandra", "drain_cpu_ms_cassandra", ""),
            (
                "CPU ms per event, drain with changelog: processor",
                "changelog_cpu_ms_service",
                "",
            ),
            ("… Kafka", "changelog_cpu_ms_kafka", ""),
            ("… Cassandra", "changelog_cpu_ms_cassandra", ""),
            (
                "CPU ms per event, plain CQL loop: the loop (bench process)",
                "plain_cpu_ms_service",
                "",
            ),
            ("… Cassandra", "plain_cpu_ms_cassandra", ""),
            (
                "processor log bytes per event (stdout + stderr, `info`)",
                "processor_log_bytes_per_event",
                "",
            ),
        ] {
            md.push_str(&format!(
                "| {label} | {} | {} | {target} |\n",
                spread(&p4[key]),
                spread(&p50[key])
            ));
        }
        md.push('\n');
        all.insert("processor_4kb".into(), p4);
        all.insert("processor_50kb".into(), p50);
    }
    if wants(Figure::ProcessorTwo) {
        eprintln!("bench: two processors, 4 KB ...");
        let p2 = processor_figures(args.events, 4096, 2, runs, None).await;
        md.push_str(&format!(
            "Two processor instances in one group vs the plain loop at {} workers (4 KB), median (min–max) of {runs} runs: drain {} events/s, plain loop {}, ratio {} (target ≥ 0.8); peak RSS {} MB.\n\n",
            p2["concurrency"],
            spread(&p2["processor_drain_per_sec"]),
            spread(&p2["plain_cql_loop_per_sec"]),
            spread(&p2["ratio"]),
            spread(&p2["processor_peak_rss_mb"]),
        ));
        all.insert("processor_two_4kb".into(), p2);
    }
    if wants(Figure::Cql) {
        eprintln!("bench: CQL write costs ...");
        let cql = cql_costs(1200).await;
        md.push_str("CQL write cost on this store (sequential p50 / p99 ms; writes/s with 6 concurrent writers):\n\n| write | p50 ms | p99 ms | writes/s |\n|---|---|---|---|\n");
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
        md.push('\n');
        all.insert("cql_write_costs".into(), cql);
    }
    if wants(Figure::EndToEnd) {
        // Half the maximum the whole pipeline sustains here (receiver, processor, broker, store and
        // the load generator share the machine), measured first unless `--rate` gives the rate.
        let half = match args.rate {
            Some(r) => r,
            None => {
                eprintln!("bench: end to end, the sustained maximum ...");
                let max = end_to_end_max().await;
                let half = (max["max_per_sec"].as_f64().unwrap_or(400.0) / 2.0) as u32;
                md.push_str(&format!("End to end, sustained maximum (32 closed-loop senders, 4 KB, {} s): {} accepted/s, {} applied/s.\n\n", max["window_secs"], f(&max["accepted_per_sec"]), f(&max["applied_per_sec"])));
                all.insert("end_to_end_max".into(), max);
                half
            }
        };
        eprintln!("bench: end to end at {half}/s ...");
        let e2e = end_to_end(half.max(1), dur).await;
        md.push_str(&format!("End to end, 200 → state visible, at {half}/s ({} s, probes at {}/s of it): p50 {} ms, p99 {} ms, max {} ms ({} samples, {} lost, {} refused; target p99 < 100 ms).\n\n", dur.as_secs(), e2e["probes_per_sec"], f(&e2e["p50_ms"]), f(&e2e["p99_ms"]), f(&e2e["max_ms"]), e2e["samples"], e2e["lost"], e2e["refused"]));
        let inside = &e2e["processor"];
        md.push_str(&format!("Inside the processor over the same run, p50 / p99 ms: processing (claim + writes) {} / {}, transaction commit {} / {}, received to committed {} / {}.\n\n", f(&inside["processing_p50_ms"]), f(&inside["processing_p99_ms"]), f(&inside["transaction_p50_ms"]), f(&inside["transaction_p99_ms"]), f(&inside["received_to_committed_p50_ms"]), f(&inside["received_to_committed_p99_ms"])));
        all.insert("end_to_end".into(), e2e);
    }
    let date = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}-{:02}-{:02}T{:02}{:02}",
        date.year(),
        u8::from(date.month()),
        date.day(),
        date.hour(),
        date.minute()
    );
    let machine = machine();
    all.insert("date".into(), json!(stamp));
    all.insert("machine".into(), json!(machine));
    all.insert("command".into(), json!(command));
    all.insert(
        "git".into(),
        json!(std::env::var("BENCH_GIT").unwrap_or_default()),
    );
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(
        dir.join(format!("results-{stamp}.json")),
        serde_json::to_string_pretty(&Value::Object(all)).unwrap_or_default(),
    );
    let md = format!("Measured {stamp} UTC on {machine} with `{command}` (git {}; Kafka, Cassandra and the services all on this machine).\n\n{md}", std::env::var("BENCH_GIT").unwrap_or_default());
    let _ = std::fs::write(dir.join("latest.md"), &md);
    println!("{md}");
}
