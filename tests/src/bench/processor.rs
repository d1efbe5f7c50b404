//! The processor's figures for `carhook-bench`: drain rate against a plain CQL loop doing the same
//! writes with the same concurrency, replay catch-up over the same backlog, and end-to-end latency.
//!
//! How each side is timed, so the ratio compares work and not set-up: the processor runs as its own
//! OS process (the release binary, so the RSS reported is its own) and sets up (tables, prepared
//! statements, transactions, group join) before it handles its first record; the plain loop
//! prepares its statements first. Both are timed from the moment the first tenth of the records is
//! done (the same warm-up) to the moment the last one is, and the rate is over the records in
//! between. Each figure is measured `runs` times; the report gives the median and the spread.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;
use serde_json::{json, Value};
use shared::config::Settings;

use crate::sim::load::{body_from, body_template};
use crate::{
    child_env, drop_keyspace, eventually, free_port, get, metric_value, settings, warm_transactions,
};

/// Median and spread of repeated measurements.
pub fn summary(xs: &[f64]) -> Value {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return json!({"median": null, "min": null, "max": null, "runs": []});
    }
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    json!({"median": median, "min": v[0], "max": v[v.len() - 1], "runs": xs})
}

/// The release binary `name` next to this bench binary, unless the environment variable
/// `override_var` names another build (e.g. an older one, measured side by side).
pub(crate) fn release_bin(name: &str, override_var: &str) -> std::path::PathBuf {
    if let Some(p) = std::env::var_os(override_var) {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    exe.parent()
        .map(|d| d.join(name))
        .unwrap_or_else(|| panic!("no target dir"))
}

/// The release `processor` binary (`BENCH_PROCESSOR_BIN` overrides it).
fn processor_bin() -> std::path::PathBuf {
    release_bin("processor", "BENCH_PROCESSOR_BIN")
}

/// A processor running as its own process (killed on drop).
pub(crate) struct Child {
    pub(crate) child: std::process::Child,
    pub(crate) admin: SocketAddr,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Child {
    /// Spawns `bin` with exactly `env` (stdout and stderr to `log`) and waits until its admin
    /// address `admin` answers `/ready` with 200.
    pub(crate) async fn start(
        bin: &std::path::Path,
        args: &[&str],
        env: Vec<(String, String)>,
        admin: SocketAddr,
        log: &std::path::Path,
    ) -> Self {
        let out = std::fs::File::create(log).unwrap_or_else(|e| panic!("{e}"));
        let child = crate::spawn_logged(bin, args, env, out);
        let c = Self { child, admin };
        eventually(Duration::from_secs(60), || async {
            get(admin, "/ready").await.0 == 200
        })
        .await;
        c
    }

    /// Peak resident set size so far, in MB (VmHWM).
    pub(crate) fn peak_rss_mb(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

/// Starts a processor with production logging (`info`, JSON, as `child_env` sets), its stdout and
/// stderr going to `log`, so the drain also measures what logging costs and how much it writes.
pub(crate) async fn start_processor(s: &Settings, instance: &str, log: &std::path::Path) -> Child {
    warm_transactions(s).await;
    let admin = free_port();
    let env = child_env(s, admin, instance);
    Child::start(&processor_bin(), &["run"], env, admin, log).await
}

/// Replay catch-up over the whole backlog, as an operator runs it: the shipped `processor replay`
/// binary, its own consumer group. Timed like the drain, from the first tenth of the backlog
/// replayed to the last, as the group's committed offsets show it (the replay commits after each
/// batch), so start-up (clients, offsets lookup, first fetch) is outside the timed part.
async fn replay_rate(s: &Settings, n: u64) -> f64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let group = format!("{}-replay", s.kafka.consumer_group);
    let log = std::env::temp_dir().join(format!("carhook-bench-{}-replay.log", s.cql.keyspace));
    let out = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
    let err = out.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let mut child = std::process::Command::new(processor_bin())
        .args(["replay", "--from", "0:0", "--group", &group])
        .env_clear()
        .envs(child_env(s, free_port(), "bench-replay"))
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", processor_bin().display()));
    let watcher: Arc<BaseConsumer> = Arc::new(
        shared::kafka::base_config(&s.kafka)
            .set("group.id", &group)
            .create()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let topic = s.kafka.events_topic.clone();
    let partitions = s.kafka.partitions;
    let committed = || {
        let (watcher, topic) = (Arc::clone(&watcher), topic.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let mut tpl = rdkafka::TopicPartitionList::new();
                for p in 0..partitions {
                    tpl.add_partition(&topic, p);
                }
                watcher
                    .committed_offsets(tpl, Duration::from_secs(5))
                    .map_or(0, |c| {
                        c.elements()
                            .iter()
                            .filter_map(|e| e.offset().to_raw())
                            .filter(|o| *o > 0)
                            .map(|o| o as u64)
                            .sum()
                    })
            })
            .await
            .unwrap_or(0)
        }
    };
    let (rate, _) = timed(
        n,
        n / 10,
        Duration::from_secs(900),
        &[child.id()],
        committed,
    )
    .await;
    let status = child.wait().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status.success(),
        "processor replay exited with {status}; its log: {}",
        log.display()
    );
    let _ = std::fs::remove_file(&log);
    rate
}

/// Fills `s`'s events topic with `n` events of about `body_bytes`, keyed over 1000 vehicles, in one
/// Kafka transaction: the processors read committed records only, so the whole backlog appears at
/// once, on every partition, to processors that are already running and settled in their group.
async fn prefill(s: &Settings, n: u64, body_bytes: usize) -> usize {
    use rdkafka::producer::Producer;
    let producer = carhook_processor::consumer::transactional_producer(
        s,
        &format!("{}-bench-prefill", s.kafka.consumer_group),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    producer
        .init_transactions(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    producer
        .begin_transaction()
        .unwrap_or_else(|e| panic!("{e}"));
    let template = body_template(body_bytes);
    let mut pending = Vec::new();
    let mut sent = 0;
    for i in 0..n {
        // Keyed by the vehicle the body names, as the receiver keys it: 1000 vehicles, each with
        // its events in order on one partition.
        let key = format!("load-veh-{}", i % 1000);
        let body = body_from(&template.replace("load-veh-@@N@@", &key), i);
        let (producer, topic) = (producer.clone(), s.kafka.events_topic.clone());
        pending.push(async move {
            producer
                .send(
                    FutureRecord::to(&topic).key(&key).payload(&body),
                    Duration::from_secs(30),
                )
                .await
                .is_ok()
        });
        if pending.len() >= 512 {
            sent += futures::future::join_all(pending.drain(..))
                .await
                .into_iter()
                .filter(|ok| *ok)
                .count();
        }
    }
    sent += futures::future::join_all(pending)
        .await
        .into_iter()
        .filter(|ok| *ok)
        .count();
    assert_eq!(sent as u64, n, "the backlog was not fully produced");
    producer
        .commit_transaction(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    body_from(&template, 0).len()
}

/// Waits until the processors' group has settled: `instances` members, the group stable, and every
/// member holding partitions (the group is cooperative: a member that just joined is stable with
/// nothing assigned until the next round). A rebalance inside the timed part would measure one
/// instance and a pause, not the instances sharing the work.
async fn settled(s: &Settings, instances: usize) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client: Arc<BaseConsumer> = Arc::new(
        shared::kafka::base_config(&s.kafka)
            .create()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    let group = s.kafka.consumer_group.clone();
    eventually(Duration::from_secs(120), || {
        let (client, group) = (Arc::clone(&client), group.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let Ok(list) = client
                    .client()
                    .fetch_group_list(Some(&group), Duration::from_secs(5))
                else {
                    return false;
                };
                list.groups().iter().any(|g| {
                    g.state() == "Stable"
                        && g.members().len() == instances
                        && g.members()
                            .iter()
                            .all(|m| m.assignment().is_some_and(|a| assigned_partitions(a) > 0))
                })
            })
            .await
            .unwrap_or(false)
        }
    })
    .await;
}

/// Partitions in a consumer-protocol assignment (version i16, then topics: i32 count, each a
/// string — i16 length and bytes — and an i32 array of partitions); 0 if it does not parse.
fn assigned_partitions(a: &[u8]) -> usize {
    let be16 = |b: &[u8], at: usize| b.get(at..at + 2).map(|x| i16::from_be_bytes([x[0], x[1]]));
    let be32 = |b: &[u8], at: usize| {
        b.get(at..at + 4)
            .map(|x| i32::from_be_bytes([x[0], x[1], x[2], x[3]]))
    };
    let mut at = 2;
    let Some(topics) = be32(a, at) else { return 0 };
    at += 4;
    let mut n = 0;
    for _ in 0..topics.max(0) {
        let Some(len) = be16(a, at) else { return 0 };
        at += 2 + usize::try_from(len.max(0)).unwrap_or(0);
        let Some(count) = be32(a, at) else { return 0 };
        at += 4 + 4 * usize::try_from(count.max(0)).unwrap_or(0);
        n += usize::try_from(count.max(0)).unwrap_or(0);
    }
    n
}

/// CPU milliseconds per record over a timed span: the service doing the work (all its processes),
/// the broker and the store. On a 2-core machine the three share the cores, so this shows where a
/// change in throughput comes from.
#[derive(Debug, Clone, Copy, Default)]
struct CpuPerRecord {
    service: f64,
    kafka: f64,
    cassandra: f64,
}

impl CpuPerRecord {
    fn json(&self, prefix: &str) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert(format!("{prefix}_cpu_ms_service"), json!(self.service));
        m.insert(format!("{prefix}_cpu_ms_kafka"), json!(self.kafka));
        m.insert(format!("{prefix}_cpu_ms_cassandra"), json!(self.cassandra));
        m
    }
}

/// Times the span between `warm_up` and `n` records done, as `done()` reports them; polls every
/// 10 ms. Returns records/s over that span and the CPU each record cost `services` (their pids),
/// the broker and the store over it.
async fn timed<F, Fut>(
    n: u64,
    warm_up: u64,
    within: Duration,
    services: &[u32],
    mut done: F,
) -> (f64, CpuPerRecord)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let stack: Vec<u32> = ["kafka", "cassandra"]
        .iter()
        .map(|c| crate::stack_pid(c).unwrap_or(0))
        .collect();
    let cpu = || -> [f64; 3] {
        [
            services.iter().map(|p| crate::bench::cpu_secs(*p)).sum(),
            crate::bench::cpu_secs(stack[0]),
            crate::bench::cpu_secs(stack[1]),
        ]
    };
    let deadline = Instant::now() + within;
    let mut t0 = None;
    loop {
        let d = done().await;
        if t0.is_none() && d >= warm_up {
            t0 = Some((Instant::now(), cpu(), d));
        }
        if d >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {d} of {n} records done within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (end, (start, cpu0, d0)) = (cpu(), t0.unwrap_or((Instant::now(), [0.0; 3], n)));
    let secs = start.elapsed().as_secs_f64().max(0.001);
    let records = (n.saturating_sub(d0)).max(1) as f64;
    let per = |i: usize| (end[i] - cpu0[i]) * 1000.0 / records;
    (
        (n - warm_up) as f64 / secs,
        CpuPerRecord {
            service: per(0),
            kafka: per(1),
            cassandra: per(2),
        },
    )
}

/// The same CQL writes as the processor (claim + state writes per event) from `concurrency`
/// workers taking events from a shared counter; timed like the drain.
async fn plain_loop(
    s: &Settings,
    n: u64,
    body_bytes: usize,
    concurrency: usize,
) -> (f64, CpuPerRecord) {
    let session = Arc::new(
        shared::cql::connect(&s.cql)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
    );
    shared::cql::migrate(&session, &s.cql)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
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
    let template = Arc::new(body_template(body_bytes).replace("load-", "plain-"));
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (store, template, next, done) = (
            store.clone(),
            Arc::clone(&template),
            Arc::clone(&next),
            Arc::clone(&done),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let body = body_from(&template, i);
                if let Ok(ev) = shared::event::Event::parse(&body) {
                    let pos = carhook_processor::store::Position {
                        topic: "plain".into(),
                        partition: i32::try_from(w).unwrap_or(0),
                        offset: i64::try_from(i).unwrap_or(0),
                    };
                    let _ = store
                        .claim(
                            ev.envelope.event_id.as_str(),
                            ev.envelope.vehicle_id.as_ref().map(|v| v.as_str()),
                            &pos,
                            "plain",
                            ctx.delivered_at,
                        )
                        .await;
                    for plan in carhook_processor::effects::plans(&ev, ctx) {
                        let _ = store.apply(&plan).await;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let counter = Arc::clone(&done);
    let me = [std::process::id()];
    let (rate, cpu) = timed(n, n / 10, Duration::from_secs(900), &me, || {
        let c = Arc::clone(&counter);
        async move { c.load(Ordering::Relaxed) }
    })
    .await;
    for t in tasks {
        let _ = t.await;
    }
    (rate, cpu)
}

/// Events handled by the processors at `admins` (every outcome).
async fn handled(admins: &[SocketAddr]) -> u64 {
    let mut sum = 0.0;
    for a in admins {
        sum += metric_value(*a, "carhook_processor_events_total").await;
    }
    sum as u64
}

/// One run: a fresh topic and keyspace filled with `n` events; `instances` processors drain it;
/// the plain loop does the same writes with the same total concurrency; replay catches up over the
/// backlog.
async fn processor_run(
    n: u64,
    body_bytes: usize,
    instances: usize,
    changelog_cache_bytes: Option<u64>,
) -> Value {
    // The drain measured against the plain loop runs as shipped: the state changelog off (the test
    // harness turns it on for every suite). Its cost is measured by a second drain with it on.
    let mut s = settings(&[]);
    s.processor.changelog = false;
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let concurrency = plain_concurrency(&s) * instances;
    let mut procs = Vec::new();
    let logs: Vec<std::path::PathBuf> = (0..instances)
        .map(|i| std::env::temp_dir().join(format!("carhook-bench-{}-{i}.log", s.cql.keyspace)))
        .collect();
    for (i, log) in logs.iter().enumerate() {
        procs.push(start_processor(&s, &format!("bench-{i}"), log).await);
    }
    let admins: Vec<SocketAddr> = procs.iter().map(|p| p.admin).collect();
    // The processors run and share the partitions before the backlog appears (all at once).
    settled(&s, instances).await;
    let bytes = prefill(&s, n, body_bytes).await;
    let pids: Vec<u32> = procs.iter().map(|p| p.child.id()).collect();
    let (drain, drain_cpu) = timed(n, n / 10, Duration::from_secs(900), &pids, || {
        handled(&admins)
    })
    .await;
    let rss = procs.iter().map(Child::peak_rss_mb).fold(0.0_f64, f64::max);
    let events = handled(&admins).await.max(1);
    drop(procs); // SIGTERM: each writes out its queued lines before it exits
    let log_bytes: u64 = logs
        .iter()
        .map(|l| std::fs::metadata(l).map_or(0, |m| m.len()))
        .sum();
    for l in &logs {
        let _ = std::fs::remove_file(l);
    }
    let log_bytes_per_event = log_bytes as f64 / events as f64;
    // The changelog's cost: the same backlog drained again with it on, into a fresh keyspace and
    // group (so every event is applied again, not a duplicate), first with the changelog empty,
    // then once more with it holding every vehicle's record, as after a restart: the processor
    // restores from it, and reads back the views its cache could not keep.
    let mut on = s.clone();
    on.processor.changelog = true;
    if let Some(bytes) = changelog_cache_bytes {
        on.processor.changelog_cache_bytes = bytes;
    }
    let (cold, changes, restored) = if instances == 1 {
        let cold = changelog_drain(&on, n, "changelog").await;
        let changes = crate::record_count(&s.kafka.brokers, &s.kafka.state_topic);
        let restored = changelog_drain(&on, n, "changelog-restored").await;
        (cold, changes, restored)
    } else {
        let none = ChangelogDrain::default();
        (none.clone(), 0, none)
    };
    let (plain, plain_cpu) = plain_loop(&s, n, body_bytes, concurrency).await;
    let replay_rate = if instances == 1 {
        replay_rate(&s, n).await
    } else {
        f64::NAN
    };
    drop_keyspace(&s).await;
    let mut v = json!({"events": n, "body_bytes": bytes, "instances": instances, "concurrency": concurrency,
        "processor_drain_per_sec": drain, "plain_cql_loop_per_sec": plain, "ratio": drain / plain,
        "replay_per_sec": replay_rate, "replay_to_drain": replay_rate / drain, "processor_peak_rss_mb": rss,
        "state_changes": changes, "drain_with_changelog_per_sec": cold.rate,
        "changelog_drain_ratio": cold.rate / drain, "changelog_peak_rss_mb": cold.rss,
        "changelog_cache_budget_bytes": on.processor.changelog_cache_bytes,
        "changelog_cache_bytes_at_end": cold.cache_bytes,
        "changelog_views_read_back": cold.read_back, "changelog_views_from_store": cold.from_store,
        "drain_with_changelog_restored_per_sec": restored.rate,
        "changelog_restored_drain_ratio": restored.rate / drain,
        "changelog_restored_peak_rss_mb": restored.rss,
        "changelog_restored_views_read_back": restored.read_back,
        "processor_log_bytes_per_event": log_bytes_per_event});
    if let Value::Object(m) = &mut v {
        m.extend(drain_cpu.json("drain"));
        m.extend(cold.cpu.json("changelog"));
        m.extend(plain_cpu.json("plain"));
    }
    v
}

/// One drain of the backlog with the changelog on.
#[derive(Debug, Clone, Default)]
struct ChangelogDrain {
    rate: f64,
    cpu: CpuPerRecord,
    rss: f64,
    /// Views read back from the changelog, loaded from the store, and the cache at the end.
    read_back: f64,
    from_store: f64,
    cache_bytes: f64,
}

/// Drains `on`'s backlog with one processor in a fresh keyspace and group named after `name`.
async fn changelog_drain(on: &Settings, n: u64, name: &str) -> ChangelogDrain {
    let mut on = on.clone();
    on.kafka.consumer_group = format!("{}-{name}", on.kafka.consumer_group);
    on.cql.keyspace = format!("{}_{}", on.cql.keyspace, name.replace('-', "_"));
    let log = std::env::temp_dir().join(format!("{}.bench.log", on.cql.keyspace));
    let p = start_processor(&on, &format!("bench-{name}"), &log).await;
    let admins = [p.admin];
    let (rate, cpu) = timed(n, n / 10, Duration::from_secs(900), &[p.child.id()], || {
        handled(&admins)
    })
    .await;
    let loads = "carhook_processor_changelog_view_loads_total";
    let drain = ChangelogDrain {
        rate,
        cpu,
        rss: p.peak_rss_mb(),
        read_back: metric_value(p.admin, &format!("{loads}{{from=\"changelog\"}}")).await,
        from_store: metric_value(p.admin, &format!("{loads}{{from=\"store\"}}")).await,
        cache_bytes: metric_value(p.admin, "carhook_processor_changelog_cache_bytes").await,
    };
    drop(p);
    let _ = std::fs::remove_file(&log);
    drop_keyspace(&on).await;
    drain
}

/// The plain loop's concurrency for one processor instance: the processor's own budget
/// (`processor.concurrency`).
fn plain_concurrency(s: &Settings) -> usize {
    s.processor.concurrency
}

/// `runs` processor runs; every figure as median and spread.
pub async fn processor_figures(
    n: u64,
    body_bytes: usize,
    instances: usize,
    runs: usize,
    changelog_cache_bytes: Option<u64>,
) -> Value {
    let mut all = Vec::new();
    for r in 0..runs {
        eprintln!(
            "bench:   run {}/{runs} ({n} events of {body_bytes} B, {instances} processor(s))",
            r + 1
        );
        let v = processor_run(n, body_bytes, instances, changelog_cache_bytes).await;
        eprintln!("bench:   {v}");
        all.push(v);
    }
    let pick = |k: &str| -> Vec<f64> {
        all.iter()
            .map(|v| v[k].as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    let mut out = serde_json::Map::new();
    for k in [
        "processor_drain_per_sec",
        "plain_cql_loop_per_sec",
        "ratio",
        "replay_per_sec",
        "replay_to_drain",
        "processor_peak_rss_mb",
        "state_changes",
        "drain_with_changelog_per_sec",
        "changelog_drain_ratio",
        "changelog_peak_rss_mb",
        "changelog_cache_bytes_at_end",
        "changelog_views_read_back",
        "drain_with_changelog_restored_per_sec",
        "changelog_restored_drain_ratio",
        "changelog_restored_peak_rss_mb",
        "changelog_restored_views_read_back",
        "processor_log_bytes_per_event",
        "drain_cpu_ms_service",
        "drain_cpu_ms_kafka",
        "drain_cpu_ms_cassandra",
        "changelog_cpu_ms_service",
        "changelog_cpu_ms_kafka",
        "changelog_cpu_ms_cassandra",
        "plain_cpu_ms_service",
        "plain_cpu_ms_cassandra",
    ] {
        out.insert(k.to_string(), summary(&pick(k)));
    }
    out.insert("events".into(), json!(n));
    out.insert(
        "body_bytes".into(),
        all.first().map_or(Value::Null, |v| v["body_bytes"].clone()),
    );
    out.insert("instances".into(), json!(instances));
    out.insert(
        "changelog_cache_budget_bytes".into(),
        all.first()
            .map_or(Value::Null, |v| v["changelog_cache_budget_bytes"].clone()),
    );
    out.insert(
        "concurrency".into(),
        all.first()
            .map_or(Value::Null, |v| v["concurrency"].clone()),
    );
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::assigned_partitions;

    #[test]
    fn assignment_bytes_count_their_partitions() {
        // version 3, two topics: "ev" with partitions 0 and 4, "x" with none; user data after.
        let mut a = vec![0, 3, 0, 0, 0, 2];
        a.extend([0, 2, b'e', b'v', 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 4]);
        a.extend([0, 1, b'x', 0, 0, 0, 0]);
        a.extend([0xff, 0xff, 0xff, 0xff]);
        assert_eq!(assigned_partitions(&a), 2);
        assert_eq!(assigned_partitions(&[0, 3, 0, 0, 0, 0]), 0);
        assert_eq!(assigned_partitions(&[0, 3]), 0);
    }
}
