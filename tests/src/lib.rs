//! Test harness: each test spawns the real services (in-process, on port 0) against the real Kafka
//! broker and CQL store, with fresh topic, keyspace and group names so tests run in parallel.

pub mod bench;
pub mod sim;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use secrecy::SecretString;
use shared::config::Settings;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The token the harness signs with (current), and the older one of a rotation pair.
pub const TOKEN: &str = "test-current-token";
pub const OLD_TOKEN: &str = "test-previous-token";

/// The protocol examples shipped beside the repository.
pub fn examples_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/protocol/examples")
}

/// A protocol example, compacted as Smartcar sends it.
pub fn example(name: &str) -> Vec<u8> {
    let raw = std::fs::read(examples_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let v: serde_json::Value =
        serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
    serde_json::to_vec(&v).unwrap_or_default()
}

/// A unique lower-case name for topics, keyspaces and groups.
pub fn fresh(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}", &id[..12])
}

/// Installs the services' own logging and tracing once per test process (warn level), so spans get
/// real trace ids and `traceparent` headers are written as in production.
pub fn telemetry() {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        let t = shared::config::TelemetrySettings {
            // `RUST_LOG` widens the test log (e.g. `warn,rdkafka=debug`) when a failure needs it.
            log_level: std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            ..Default::default()
        };
        if let Ok(handle) = shared::telemetry::init(&t, "carhook-tests") {
            std::mem::forget(handle);
        }
    });
}

/// The local stack's directory (`CARHOOK_STACK_DIR`, else `.stack` in the repository): its
/// `secrets/` and `tls/` hold the development credentials.
pub fn stack_dir() -> std::path::PathBuf {
    std::env::var_os("CARHOOK_STACK_DIR").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.stack"),
        std::path::PathBuf::from,
    )
}

/// The pid of a component of the local stack (`kafka`, `cassandra`), from its pid file; None when
/// it is not recorded.
pub fn stack_pid(component: &str) -> Option<u32> {
    std::fs::read_to_string(stack_dir().join("run").join(format!("{component}.pid")))
        .ok()
        .and_then(|p| p.trim().parse().ok())
}

/// A development credential file of the stack, as a string path.
pub fn stack_file(relative: &str) -> String {
    stack_dir().join(relative).to_string_lossy().into_owned()
}

/// Where the tests find the stack: the plaintext Kafka listener and the CQL nodes, overridable
/// with the services' own `CARHOOK__KAFKA__BROKERS` / `CARHOOK__CQL__NODES` to run the suites
/// against another cluster; the CQL login is the stack's development role when it has one.
fn stack_env() -> Vec<(String, String)> {
    let mut env = Vec::new();
    for key in ["CARHOOK__KAFKA__BROKERS", "CARHOOK__CQL__NODES"] {
        if let Ok(v) = std::env::var(key) {
            env.push((key.to_string(), v));
        }
    }
    if stack_dir().join("secrets/cql-password").exists() {
        env.push(("CARHOOK__CQL__USERNAME".into(), "carhook".into()));
        env.push((
            "CARHOOK__CQL__PASSWORD_FILE".into(),
            stack_file("secrets/cql-password"),
        ));
    }
    env
}

/// The stack's SASL_SSL listener (`CARHOOK_TEST_KAFKA_SECURE_BROKERS`, default 127.0.0.1:9093).
pub fn secure_brokers() -> String {
    std::env::var("CARHOOK_TEST_KAFKA_SECURE_BROKERS").unwrap_or_else(|_| "127.0.0.1:9093".into())
}

/// Settings for one test: fresh topics, keyspace, group; services on port 0.
pub fn settings(extra: &[(&str, &str)]) -> Settings {
    telemetry();
    let name = fresh("t");
    let mut env: HashMap<String, String> = [
        (
            "CARHOOK__SMARTCAR__MANAGEMENT_TOKENS",
            format!("{TOKEN},{OLD_TOKEN}"),
        ),
        ("CARHOOK__KAFKA__EVENTS_TOPIC", format!("{name}.events")),
        ("CARHOOK__KAFKA__DLQ_TOPIC", format!("{name}.events.dlq")),
        ("CARHOOK__KAFKA__ACTIONS_TOPIC", format!("{name}.actions")),
        (
            "CARHOOK__KAFKA__STATE_TOPIC",
            format!("{name}.vehicle-state"),
        ),
        // Off by default in production (its cost); every suite runs with it, so each of them
        // exercises it. Tests that need it off say so.
        ("CARHOOK__PROCESSOR__CHANGELOG", "true".into()),
        (
            "CARHOOK__KAFKA__QUARANTINE_TOPIC",
            format!("{name}.quarantine"),
        ),
        (
            "CARHOOK__KAFKA__POLL_TOPIC",
            format!("{name}.poll-requests"),
        ),
        ("CARHOOK__POLLER__CONSUMER_GROUP", format!("{name}-poller")),
        ("CARHOOK__POLLER__ADMIN_LISTEN", "127.0.0.1:0".into()),
        ("CARHOOK__KAFKA__CONSUMER_GROUP", format!("{name}-group")),
        ("CARHOOK__CQL__KEYSPACE", name.clone()),
        ("CARHOOK__RECEIVER__LISTEN", "127.0.0.1:0".into()),
        ("CARHOOK__RECEIVER__ADMIN_LISTEN", "127.0.0.1:0".into()),
        ("CARHOOK__PROCESSOR__ADMIN_LISTEN", "127.0.0.1:0".into()),
        ("CARHOOK__PROCESSOR__INSTANCE_ID", format!("{name}-p0")),
        ("CARHOOK__TELEMETRY__LOG_LEVEL", "warn".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .chain(stack_env())
    .collect();
    for (k, v) in extra {
        env.insert((*k).to_string(), (*v).to_string());
    }
    Settings::load_from(None, env).unwrap_or_else(|e| panic!("test settings: {e}"))
}

/// Lower-case hex HMAC-SHA256, as Smartcar signs.
pub fn sign(token: &str, body: &[u8]) -> String {
    shared::signature::sign(&SecretString::from(token.to_string()), body)
}

/// A service running inside the test process, on a runtime of its own. Dropping it (a test that
/// panicked half-way) tells the service to stop, so the test process never waits on it forever.
pub struct Running {
    /// The service's main address: the receiver's webhook listener, the processor's admin listener.
    pub addr: SocketAddr,
    /// Where `/health`, `/ready` and `/metrics` are served.
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Running {
    /// Signals shutdown and waits for the service to finish (bounded).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        self.join(Duration::from_secs(30)).await;
    }

    /// Waits up to `within` for the service to finish by itself (after a signal or a shutdown).
    pub async fn join(&mut self, within: Duration) {
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(within, task).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A loopback listener on an ephemeral port, bound now so its address is known before the service runs.
fn bind_local() -> (std::net::TcpListener, SocketAddr) {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("nonblocking: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"));
    (listener, addr)
}

/// Runs a service in-process on ephemeral ports (a main and an admin listener) and waits until its
/// admin `ready_path` answers 200. A service with a single listener (the processor's admin) gets
/// the same address twice: `main_is_admin`.
///
/// The service gets a runtime of its own on its own thread, as in production. Tests run on a
/// single-threaded runtime and call blocking helpers (`read_topic`, `record_count`); a service
/// spawned onto the test's runtime would be frozen for as long as such a call blocks — its Kafka
/// transaction then outlives `transaction.timeout.ms` and the broker aborts it, so the records it
/// produced never become visible to the very reader that is waiting for them.
async fn spawn_in_process<F, Fut, E>(
    name: &'static str,
    ready_within: Duration,
    ready_path: &'static str,
    main_is_admin: bool,
    run: F,
) -> Running
where
    F: FnOnce(TcpListener, Option<TcpListener>, CancellationToken) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let (listener, addr) = bind_local();
    let (admin_listener, admin) = if main_is_admin {
        (None, addr)
    } else {
        let (l, a) = bind_local();
        (Some(l), a)
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{name} runtime: {e}"));
        rt.block_on(async move {
            let tokio_listener = |l: std::net::TcpListener| {
                TcpListener::from_std(l).unwrap_or_else(|e| panic!("listener: {e}"))
            };
            let listener = tokio_listener(listener);
            let admin_listener = admin_listener.map(tokio_listener);
            if let Err(e) = run(listener, admin_listener, stop).await {
                panic!("{name} failed: {e}");
            }
        });
        // Tasks the service left behind (e.g. a lag reporter) end with its runtime.
        rt.shutdown_timeout(Duration::from_secs(5));
    });
    let running = Running {
        addr,
        admin,
        shutdown,
        task: Some(task),
    };
    // On time-out the panic names what the service still waits for (its `/ready` lists the
    // conditions that do not hold: store, consumer, transactions, ...), so a slow start-up in a
    // test run says which stage it was.
    let deadline = Instant::now() + ready_within;
    loop {
        let (status, body) = get(running.admin, ready_path).await;
        if status == 200 {
            return running;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not ready within {ready_within:?}; its {ready_path} answered {status}: {}",
            body.trim()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts the receiver (webhook and admin listeners on ephemeral ports) and waits until it is ready.
pub async fn spawn_receiver(settings: &Settings) -> Running {
    spawn_receiver_until(settings, "/ready").await
}

/// Starts the receiver and waits only until it is alive (`/health`): for tests whose broker is
/// unreachable on purpose, so the receiver never becomes ready.
pub async fn spawn_receiver_unready(settings: &Settings) -> Running {
    spawn_receiver_until(settings, "/health").await
}

async fn spawn_receiver_until(settings: &Settings, ready_path: &'static str) -> Running {
    let s = settings.clone();
    spawn_in_process(
        "receiver",
        Duration::from_secs(30),
        ready_path,
        false,
        move |l, admin, stop| async move {
            let admin = admin.unwrap_or_else(|| panic!("receiver needs an admin listener"));
            carhook_receiver::run(s, l, admin, stop).await
        },
    )
    .await
}

/// Waits once per test process until the broker's transaction coordinator answers: one committed
/// transaction on a scratch topic. On a freshly formatted broker the coordinator loads lazily, and
/// the first transactions of a test would otherwise spend their deadline waiting for it.
pub async fn warm_transactions(settings: &Settings) {
    static WARM: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    WARM.get_or_init(|| async {
        let mut k = settings.kafka.clone();
        k.events_topic = "carhook-test-warmup".into();
        k.dlq_topic = "carhook-test-warmup.dlq".into();
        k.actions_topic = "carhook-test-warmup.actions".into();
        k.state_topic = "carhook-test-warmup.state".into();
        k.quarantine_topic = "carhook-test-warmup.q".into();
        k.poll_topic = "carhook-test-warmup.poll".into();
        shared::kafka::ensure_topics(&k)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut full = settings.clone();
        full.kafka = k.clone();
        let producer =
            carhook_processor::consumer::transactional_producer(&full, "carhook-test-warmup")
                .unwrap_or_else(|e| panic!("{e}"));
        tokio::task::spawn_blocking(move || {
            use rdkafka::producer::Producer;
            let deadline = Instant::now() + Duration::from_secs(120);
            while let Err(e) = producer.init_transactions(Duration::from_secs(30)) {
                assert!(
                    Instant::now() < deadline,
                    "transaction coordinator never became ready: {e}"
                );
            }
            producer
                .begin_transaction()
                .unwrap_or_else(|e| panic!("{e}"));
            let rec =
                rdkafka::producer::FutureRecord::<str, str>::to(&k.events_topic).payload("warm-up");
            let _ = producer.send_result(rec);
            producer
                .commit_transaction(Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("warm-up commit: {e}"));
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    })
    .await;
}

/// Starts the processor (admin on an ephemeral port) and waits until it is ready.
pub async fn spawn_processor(settings: &Settings) -> Running {
    warm_transactions(settings).await;
    let s = settings.clone();
    spawn_in_process(
        "processor",
        Duration::from_secs(60),
        "/ready",
        true,
        move |l, _, stop| carhook_processor::run(s, l, stop),
    )
    .await
}

/// Polls `check` until it holds or `within` passes (then panics).
pub async fn eventually<F, Fut>(within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An HTTP response as a test sees it.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// POSTs `body` with optional `SC-Signature` and extra headers.
pub async fn post(addr: SocketAddr, path: &str, body: Vec<u8>, signature: Option<&str>) -> Reply {
    request(addr, http::Method::POST, path, body, signature).await
}

/// Any request.
pub async fn request(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    body: Vec<u8>,
    signature: Option<&str>,
) -> Reply {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .header("user-agent", "Smartcar/test");
    if let Some(sig) = signature {
        req = req.header("SC-Signature", sig);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|e| panic!("request: {e}"));
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("http: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body,
    }
}

/// GET returning (status, body text).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let Ok(req) = http::Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new()))
    else {
        return (0, String::new());
    };
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
        Err(_) => (0, String::new()),
    }
}

/// Sum of high watermarks of `topic` (records ever written; 0 for a missing topic).
pub fn record_count(brokers: &str, topic: &str) -> i64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap_or_else(|e| panic!("consumer: {e}"));
    let Ok(md) = c.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
        return 0;
    };
    md.topics()
        .iter()
        .flat_map(|t| t.partitions())
        .filter_map(|p| {
            c.fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .ok()
        })
        .map(|(_, high)| high)
        .sum()
}

/// Reads every committed record of `topic` from the beginning until `expected` are seen or `within`
/// passes, then keeps reading briefly so extra records (duplicates) would show up too.
pub fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    within: Duration,
) -> Vec<OwnedMessage> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", fresh("reader"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap_or_else(|e| panic!("consumer: {e}"));
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("metadata: {e}"));
    let mut tpl = TopicPartitionList::new();
    for p in md.topics().iter().flat_map(|t| t.partitions()) {
        let _ = tpl.add_partition_offset(topic, p.id(), Offset::Beginning);
    }
    c.assign(&tpl).unwrap_or_else(|e| panic!("assign: {e}"));
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    let mut settle: Option<Instant> = None;
    loop {
        if out.len() >= expected && settle.is_none() {
            settle = Some(Instant::now() + Duration::from_millis(1500));
        }
        if settle.is_some_and(|s| Instant::now() > s) || Instant::now() > deadline {
            break;
        }
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push(m.detach());
        }
    }
    out
}

/// Reads every committed record of `topic` up to its end as of now: stops once each partition
/// has reported end-of-partition, so nothing present is missed and nothing is waited for. Errors
/// name the topic (unknown topic, no end reached `within`).
pub fn read_to_end(
    brokers: &str,
    topic: &str,
    within: Duration,
) -> Result<Vec<OwnedMessage>, String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", fresh("reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(|e| format!("{topic}: consumer: {e}"))?;
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| format!("{topic}: metadata: {e}"))?;
    let mut tpl = TopicPartitionList::new();
    let mut open = std::collections::BTreeSet::new();
    for t in md.topics() {
        if let Some(e) = t.error() {
            return Err(format!("{topic}: {e:?}"));
        }
        for p in t.partitions() {
            let _ = tpl.add_partition_offset(topic, p.id(), Offset::Beginning);
            open.insert(p.id());
        }
    }
    c.assign(&tpl)
        .map_err(|e| format!("{topic}: assign: {e}"))?;
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    while !open.is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "{topic}: partitions {open:?} did not reach their end within {within:?}"
            ));
        }
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
            }
            Some(Err(e)) => return Err(format!("{topic}: {e}")),
            None => {}
        }
    }
    Ok(out)
}

/// A header's value as text.
pub fn header(msg: &OwnedMessage, name: &str) -> Option<String> {
    let h = msg.headers()?;
    (0..h.count())
        .map(|i| h.get(i))
        .find(|x| x.key == name)
        .and_then(|x| x.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Builds a compact VEHICLE_STATE body.
pub fn state_event(
    event_id: &str,
    vehicle: &str,
    signals: &[(&str, serde_json::Value, i64)],
) -> Vec<u8> {
    let signals: Vec<serde_json::Value> = signals
        .iter()
        .map(|(code, body, oem)| {
            serde_json::json!({"code": code, "name": code, "group": code, "body": body,
                "status": {"value": "SUCCESS"}, "meta": {"oemUpdatedAt": oem, "retrievedAt": oem + 1000}})
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "eventId": event_id, "eventType": "VEHICLE_STATE",
        "data": {"user": {"id": "u1"}, "vehicle": {"id": vehicle, "make": "TESLA", "model": "Model 3", "year": 2020}, "signals": signals},
        "meta": {"version": "4.0", "deliveryId": uuid::Uuid::new_v4().to_string(), "deliveredAt": 1_761_896_351_529_i64, "mode": "LIVE"}
    }))
    .unwrap_or_default()
}

/// Builds a compact VEHICLE_ERROR body.
pub fn error_event(
    event_id: &str,
    vehicle: &str,
    errors: serde_json::Value,
    delivered_at: i64,
) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "eventId": event_id, "eventType": "VEHICLE_ERROR", "vehicleId": vehicle,
        "data": {"vehicle": {"id": vehicle}, "errors": errors},
        "meta": {"version": "4.0", "deliveryId": uuid::Uuid::new_v4().to_string(), "deliveredAt": delivered_at, "mode": "LIVE"}
    }))
    .unwrap_or_default()
}

/// Produces raw records straight to a topic (bypassing the receiver), e.g. poison or pre-fills.
pub async fn produce_raw(brokers: &str, topic: &str, records: &[(Option<&str>, &[u8])]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap_or_else(|e| panic!("producer: {e}"));
    for (key, value) in records {
        let mut r = FutureRecord::<str, [u8]>::to(topic).payload(value);
        if let Some(k) = key {
            r = r.key(k);
        }
        p.send(r, Duration::from_secs(10))
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
}

/// Reads a vehicle's state as `processor state --last-event` prints it: the state document plus
/// `lastEvent` (the bookkeeping of the last event applied).
pub async fn vehicle_state(settings: &Settings, vehicle: &str) -> Option<serde_json::Value> {
    let session = shared::cql::connect(&settings.cql).await.ok()?;
    carhook_processor::state::vehicle_state_with_last_event(
        &session,
        &settings.cql.keyspace,
        vehicle,
    )
    .await
    .ok()
}

/// Reads a vehicle's state document exactly as `processor state` prints it.
pub async fn state_document(settings: &Settings, vehicle: &str) -> Option<serde_json::Value> {
    let session = shared::cql::connect(&settings.cql).await.ok()?;
    carhook_processor::state::vehicle_state(&session, &settings.cql.keyspace, vehicle)
        .await
        .ok()
}

/// Polls a vehicle's state until `pred` holds (panics with the last state after 60 s).
pub async fn state_where(
    settings: &Settings,
    vehicle: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(v) = vehicle_state(settings, vehicle).await {
            if pred(&v) {
                return v;
            }
            last = v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("state of {vehicle} never matched; last: {last:#}");
}

/// Drops a test's keyspace and deletes its topics, so repeated runs do not pile up tables in the
/// store or partitions in the broker. A broker holds a few open files per partition: about 20,000
/// partitions of earlier runs exhausted the local broker's file limit ("Too many open files") and
/// stopped it. Only the test's own topics (named after its keyspace, see [`settings`]) are deleted,
/// never a shared or default one.
pub async fn drop_keyspace(settings: &Settings) {
    if let Ok(session) = shared::cql::connect(&settings.cql).await {
        let _ = session
            .query_unpaged(
                format!("DROP KEYSPACE IF EXISTS {}", settings.cql.keyspace),
                (),
            )
            .await;
    }
    delete_topics(settings).await;
}

/// Deletes the topics of `settings` that belong to this test alone (their names start with its
/// keyspace); a topic that is not there is no error.
pub async fn delete_topics(settings: &Settings) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let own = format!("{}.", settings.cql.keyspace);
    let names: Vec<String> = shared::kafka::owned_topics(&settings.kafka)
        .into_iter()
        .map(|t| t.name)
        .filter(|n| n.starts_with(&own))
        .collect();
    if names.is_empty() {
        return;
    }
    let Ok(admin) = shared::kafka::base_config(&settings.kafka)
        .create::<AdminClient<rdkafka::client::DefaultClientContext>>()
    else {
        return;
    };
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let _ = admin.delete_topics(&refs, &opts).await;
}

/// Spawns `program` with exactly `env`, its stdout and stderr both written to `out`.
pub fn spawn_logged(
    program: &std::path::Path,
    args: &[&str],
    env: Vec<(String, String)>,
    out: std::fs::File,
) -> std::process::Child {
    let err = out.try_clone().unwrap_or_else(|e| panic!("{e}"));
    std::process::Command::new(program)
        .args(args)
        .env_clear()
        .envs(env)
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()))
}

/// The `CARHOOK__*` environment that reproduces `settings` for a child process.
pub fn child_env(s: &Settings, admin: SocketAddr, instance: &str) -> Vec<(String, String)> {
    [
        (
            "CARHOOK__SMARTCAR__MANAGEMENT_TOKENS",
            format!("{TOKEN},{OLD_TOKEN}"),
        ),
        ("CARHOOK__KAFKA__BROKERS", s.kafka.brokers.clone()),
        ("CARHOOK__KAFKA__EVENTS_TOPIC", s.kafka.events_topic.clone()),
        ("CARHOOK__KAFKA__DLQ_TOPIC", s.kafka.dlq_topic.clone()),
        (
            "CARHOOK__KAFKA__ACTIONS_TOPIC",
            s.kafka.actions_topic.clone(),
        ),
        ("CARHOOK__KAFKA__STATE_TOPIC", s.kafka.state_topic.clone()),
        (
            "CARHOOK__PROCESSOR__CHANGELOG",
            s.processor.changelog.to_string(),
        ),
        (
            "CARHOOK__PROCESSOR__CHANGELOG_CACHE_BYTES",
            s.processor.changelog_cache_bytes.to_string(),
        ),
        (
            "CARHOOK__KAFKA__QUARANTINE_TOPIC",
            s.kafka.quarantine_topic.clone(),
        ),
        ("CARHOOK__KAFKA__POLL_TOPIC", s.kafka.poll_topic.clone()),
        (
            "CARHOOK__KAFKA__CONSUMER_GROUP",
            s.kafka.consumer_group.clone(),
        ),
        ("CARHOOK__KAFKA__PARTITIONS", s.kafka.partitions.to_string()),
        ("CARHOOK__CQL__KEYSPACE", s.cql.keyspace.clone()),
        ("CARHOOK__PROCESSOR__ADMIN_LISTEN", admin.to_string()),
        ("CARHOOK__PROCESSOR__INSTANCE_ID", instance.to_string()),
        (
            "CARHOOK__PROCESSOR__BATCH_MAX",
            s.processor.batch_max.to_string(),
        ),
        ("CARHOOK__TELEMETRY__LOG_LEVEL", "info".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .chain(security_env(s))
    .collect()
}

/// The connection and credential keys of `s` as environment (file paths, never secret values).
fn security_env(s: &Settings) -> Vec<(String, String)> {
    let path =
        |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
    let k = &s.kafka;
    let c = &s.cql;
    [
        ("CARHOOK__CQL__NODES", Some(c.nodes.clone())),
        ("CARHOOK__CQL__USERNAME", c.username.clone()),
        ("CARHOOK__CQL__PASSWORD_FILE", path(&c.password_file)),
        ("CARHOOK__CQL__TLS_CA_FILE", path(&c.tls_ca_file)),
        (
            "CARHOOK__KAFKA__SECURITY_PROTOCOL",
            Some(k.security_protocol.as_str().to_string()),
        ),
        (
            "CARHOOK__KAFKA__SASL_MECHANISM",
            k.sasl_mechanism.map(|m| m.as_str().to_string()),
        ),
        ("CARHOOK__KAFKA__SASL_USERNAME", k.sasl_username.clone()),
        (
            "CARHOOK__KAFKA__SASL_PASSWORD_FILE",
            path(&k.sasl_password_file),
        ),
        ("CARHOOK__KAFKA__SSL_CA_FILE", path(&k.ssl_ca_file)),
    ]
    .into_iter()
    .filter_map(|(key, v)| v.map(|v| (key.to_string(), v)))
    .collect()
}

/// A free loopback port (bound and released).
pub fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    l.local_addr().unwrap_or_else(|e| panic!("addr: {e}"))
}

/// Path of a workspace binary built next to the test executable.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    exe.parent()
        .and_then(|d| d.parent())
        .map(|d| d.join(name))
        .unwrap_or_else(|| panic!("no target dir"))
}

/// A service running as its own OS process (so it can be killed with SIGKILL or sent SIGTERM).
pub struct ChildService {
    pub child: std::process::Child,
    /// The service's main address (receiver webhook listener, or processor admin address).
    pub addr: SocketAddr,
    /// The address serving `/health`, `/ready` and `/metrics`.
    pub admin: SocketAddr,
}

impl Drop for ChildService {
    /// A test that fails half-way must not leave its services running: kill whatever is still alive.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl ChildService {
    /// Starts `processor run` with `settings` (plus `extra` environment) and waits until ready.
    pub async fn processor(
        s: &Settings,
        instance: &str,
        log: &std::path::Path,
        extra: &[(&str, &str)],
    ) -> Self {
        warm_transactions(s).await;
        let admin = free_port();
        let mut env = child_env(s, admin, instance);
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string())),
        );
        Self::start(
            "processor",
            &["run"],
            env,
            admin,
            log,
            Duration::from_secs(60),
        )
        .await
    }

    /// Starts `receiver` with `settings` (plus `extra` environment) and waits until ready.
    pub async fn receiver(s: &Settings, log: &std::path::Path, extra: &[(&str, &str)]) -> Self {
        Self::receiver_on(free_port(), s, log, extra).await
    }

    /// Starts `receiver` listening on `listen` (e.g. the address of one it replaces), its admin
    /// endpoints on a free port.
    pub async fn receiver_on(
        listen: SocketAddr,
        s: &Settings,
        log: &std::path::Path,
        extra: &[(&str, &str)],
    ) -> Self {
        let admin = free_port();
        let mut env = child_env(s, free_port(), "unused");
        env.push(("CARHOOK__RECEIVER__LISTEN".into(), listen.to_string()));
        env.push(("CARHOOK__RECEIVER__ADMIN_LISTEN".into(), admin.to_string()));
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string())),
        );
        let mut child =
            Self::start("receiver", &[], env, admin, log, Duration::from_secs(30)).await;
        child.addr = listen;
        child
    }

    /// Spawns `bin` and waits until `admin` answers `/ready`.
    async fn start(
        bin: &str,
        args: &[&str],
        env: Vec<(String, String)>,
        admin: SocketAddr,
        log: &std::path::Path,
        within: Duration,
    ) -> Self {
        let child = Self::launch(bin, args, env, admin, log);
        eventually(within, || async { get(admin, "/ready").await.0 == 200 }).await;
        child
    }

    /// Spawns `bin` (stdout and stderr appended to `log`) without waiting for anything: for
    /// services that must come up not ready.
    pub fn launch(
        bin: &str,
        args: &[&str],
        env: Vec<(String, String)>,
        admin: SocketAddr,
        log: &std::path::Path,
    ) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{e}"));
        let child = spawn_logged(&workspace_bin(bin), args, env, out);
        Self {
            child,
            addr: admin,
            admin,
        }
    }

    /// SIGSTOP / SIGCONT: a stalled process (GC pause, noisy neighbour).
    pub fn signal(&self, sig: &str) {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// SIGKILL: no drain, no commit, no goodbye.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

/// Reads a counter or gauge sample from a `/metrics` page (0 when absent).
pub async fn metric_value(admin: SocketAddr, line_prefix: &str) -> f64 {
    let (_, text) = get(admin, "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        // From 0.0: `Sum` for f64 starts at -0.0, which the bench printed as "-0.00" for a
        // metric with no line yet.
        .fold(0.0, |sum, v| sum + v)
}

/// POSTs without any `SC-Signature` header; `None` when the connection fails.
pub async fn try_post_unsigned(addr: SocketAddr, path: &str, body: Vec<u8>) -> Option<u16> {
    try_exchange(addr, path, body, None).await.map(|(s, _)| s)
}

/// POSTs a signed body; `None` when the connection fails (e.g. the server is draining).
pub async fn try_post(addr: SocketAddr, path: &str, body: Vec<u8>, signature: &str) -> Option<u16> {
    try_exchange(addr, path, body, Some(signature))
        .await
        .map(|(s, _)| s)
}

/// POSTs with an optional `SC-Signature`; the status and the whole answer body, or `None` when
/// the connection fails or the answer is cut off.
pub async fn try_exchange(
    addr: SocketAddr,
    path: &str,
    body: Vec<u8>,
    signature: Option<&str>,
) -> Option<(u16, Bytes)> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::post(format!("http://{addr}{path}"));
    if let Some(sig) = signature {
        req = req.header("SC-Signature", sig);
    }
    let req = req.body(Full::new(Bytes::from(body))).ok()?;
    let res = client.request(req).await.ok()?;
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.ok()?.to_bytes();
    Some((status, bytes))
}
