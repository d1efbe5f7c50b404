//! The REST polling fallback end to end: the real `processor run` and `processor poll …`
//! binaries against the real Kafka and CQL store, Smartcar's API faked over real HTTP by
//! `smartcar-sim`'s [`FakeApi`] with its own ground truth.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use carhook_tests::sim::api::{FakeApi, Fault};
use carhook_tests::sim::truth::ApiVehicle;
use carhook_tests::*;
use serde_json::{json, Value};
use shared::config::Settings;

const CLIENT_ID: &str = "client_carhook-test";
const CLIENT_SECRET: &str = "fake-secret-NOT-FOR-PRODUCTION";
/// Car times of the readings (2024-11-18…), well before any receive time.
const T0: i64 = 1_731_930_000_000;

/// The environment a poller (or `poll now` / `poll resync`) child needs besides `child_env`.
pub(crate) fn poller_env(
    s: &Settings,
    api: &FakeApi,
    admin: SocketAddr,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let secret: PathBuf = std::env::temp_dir().join(format!("{}.client-secret", s.cql.keyspace));
    std::fs::write(&secret, CLIENT_SECRET).unwrap_or_else(|e| panic!("{e}"));
    let mut env = child_env(s, free_port(), "poller");
    for (k, v) in [
        ("CARHOOK__SMARTCAR__CLIENT_ID", CLIENT_ID.to_string()),
        (
            "CARHOOK__SMARTCAR__CLIENT_SECRET_FILE",
            secret.to_string_lossy().into_owned(),
        ),
        ("CARHOOK__SMARTCAR__TOKEN_URL", api.token_url()),
        ("CARHOOK__SMARTCAR__VEHICLE_API_URL", api.vehicle_api_url()),
        ("CARHOOK__SMARTCAR__API_TIMEOUT_MS", "10000".into()),
        ("CARHOOK__POLLER__ADMIN_LISTEN", admin.to_string()),
        (
            "CARHOOK__POLLER__CONSUMER_GROUP",
            s.poller.consumer_group.clone(),
        ),
        ("CARHOOK__POLLER__MIN_INTERVAL_SECS", "0".into()),
        ("CARHOOK__POLLER__BACKOFF_BASE_MS", "100".into()),
        ("CARHOOK__POLLER__BACKOFF_MAX_MS", "1000".into()),
        ("CARHOOK__POLLER__BUCKET_CAPACITY", "1000".into()),
        ("CARHOOK__POLLER__BUCKET_REFILL_MS", "10".into()),
    ] {
        env.push((k.to_string(), v));
    }
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push(((*k).to_string(), (*v).to_string()));
    }
    env
}

/// Starts `processor poll run` and waits until it is ready.
pub(crate) async fn start_poller(
    s: &Settings,
    api: &FakeApi,
    extra: &[(&str, &str)],
) -> ChildService {
    let admin = free_port();
    let env = poller_env(s, api, admin, extra);
    let log = std::env::temp_dir().join(format!("{}.poller.log", s.cql.keyspace));
    let child = ChildService::launch("processor", &["poll", "run"], env, admin, &log);
    eventually(Duration::from_secs(60), || async {
        get(admin, "/ready").await.0 == 200
    })
    .await;
    child
}

/// Runs a `processor poll …` one-shot command; (exit code, stdout, stderr).
async fn poll_command(s: &Settings, api: &FakeApi, args: &[&str]) -> (Option<i32>, String, String) {
    poll_command_with(s, api, args, &[]).await
}

/// As [`poll_command`], with `extra` environment.
async fn poll_command_with(
    s: &Settings,
    api: &FakeApi,
    args: &[&str],
    extra: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let env = poller_env(s, api, free_port(), extra);
    let args: Vec<String> = args.iter().map(|a| (*a).to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(workspace_bin("processor"))
            .args(&args)
            .env_clear()
            .envs(env)
            .output()
            .unwrap_or_else(|e| panic!("processor {args:?}: {e}"));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Puts a poll request for `vehicle` (of user `u1`) on the poll-request topic.
pub(crate) async fn request_poll(s: &Settings, vehicle: &str) {
    let body =
        json!({"vehicleId": vehicle, "userId": "u1", "reason": "operator", "requestedAt": 1})
            .to_string();
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.poll_topic,
        &[(Some(vehicle), body.as_bytes())],
    )
    .await;
}

async fn poll_results(admin: SocketAddr, result: &str) -> f64 {
    metric_value(
        admin,
        &format!("carhook_poller_polls_total{{reason=\"operator\",result=\"{result}\"}}"),
    )
    .await
}

/// Produces `body` to the events topic as the poller does: keyed by vehicle, marked as polled.
async fn produce_polled(s: &Settings, vehicle: &str, body: &[u8]) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let p: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &s.kafka.brokers)
        .create()
        .unwrap_or_else(|e| panic!("producer: {e}"));
    let h = OwnedHeaders::new()
        .insert(Header {
            key: shared::headers::SOURCE,
            value: Some(shared::smartcar_api::POLL_SOURCE),
        })
        .insert(Header {
            key: shared::headers::POLL_REASON,
            value: Some("operator"),
        });
    p.send(
        FutureRecord::<str, [u8]>::to(&s.kafka.events_topic)
            .key(vehicle)
            .payload(body)
            .headers(h),
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
}

pub(crate) async fn fake() -> FakeApi {
    FakeApi::start(CLIENT_ID, CLIENT_SECRET, 3_600).await
}

pub(crate) fn soc(v: i64) -> Value {
    json!({"unit": "percent", "value": v})
}

fn km(v: i64) -> Value {
    json!({"unit": "km", "value": v})
}

#[tokio::test]
async fn a_poll_never_overwrites_a_fresher_webhook_value_and_vice_versa() {
    let s = settings(&[]);
    let api = fake().await;
    let log = std::env::temp_dir().join(format!("{}.processor.log", s.cql.keyspace));
    let _processor = ChildService::processor(&s, "p0", &log, &[]).await;
    let car = "car-fresh";
    // The webhook: battery at T0+120 s (fresh), odometer at T0 (old); it carries user u1.
    let hook = state_event(
        "hook-1",
        car,
        &[
            ("tractionbattery-stateofcharge", soc(80), T0 + 120_000),
            ("odometer-traveleddistance", km(100), T0),
        ],
    );
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(car), &hook)],
    )
    .await;
    state_where(&s, car, |v| {
        v["signals"]["odometer-traveleddistance"]["body"]["value"] == 100
    })
    .await;
    // Smartcar's API: an older battery reading, a newer odometer.
    api.set_vehicle(
        car,
        ApiVehicle::new(
            "u1",
            &[
                ("tractionbattery-stateofcharge", soc(70), T0 + 60_000),
                ("odometer-traveleddistance", km(150), T0 + 60_000),
            ],
        ),
    );
    // `poll now` without --user-id: the processor kept u1 from the webhook.
    let (code, out, err) = poll_command(&s, &api, &["poll", "now", car]).await;
    assert_eq!(code, Some(0), "poll now failed: {err}\n{out}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["applied"], true, "{report:#}");
    assert!(report["eventId"]
        .as_str()
        .is_some_and(|id| id.starts_with("poll-")));
    let state = state_where(&s, car, |v| {
        v["signals"]["odometer-traveleddistance"]["body"]["value"] == 150
    })
    .await;
    let battery = &state["signals"]["tractionbattery-stateofcharge"];
    assert_eq!(
        battery["body"]["value"], 80,
        "the older poll lost: {state:#}"
    );
    assert_eq!(battery["source"], "webhook");
    assert_eq!(
        state["signals"]["odometer-traveleddistance"]["source"],
        "poll"
    );
    // A webhook older than the polled odometer does not win either (its other signal shows it
    // was applied).
    let late = state_event(
        "hook-2",
        car,
        &[
            ("odometer-traveleddistance", km(120), T0 + 30_000),
            ("charge-ischarging", json!({"value": true}), T0 + 200_000),
        ],
    );
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(car), &late)],
    )
    .await;
    let state = state_where(&s, car, |v| {
        v["signals"]["charge-ischarging"]["body"]["value"] == true
    })
    .await;
    assert_eq!(
        state["signals"]["odometer-traveleddistance"]["body"]["value"], 150,
        "{state:#}"
    );
    assert_eq!(
        state["signals"]["odometer-traveleddistance"]["source"],
        "poll"
    );
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn poll_now_fails_clearly_for_an_unknown_user_and_a_missing_vehicle() {
    let s = settings(&[]);
    let api = fake().await;
    // No webhook ever named this vehicle's user.
    // Not found (exit 3, as `processor state` for an unknown vehicle).
    let (code, out, err) = poll_command(&s, &api, &["poll", "now", "car-nobody"]).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(
        err.contains("no user id known") && err.contains("--user-id"),
        "{err}"
    );
    assert!(out.is_empty(), "nothing on stdout for a failure: {out}");
    // With a user, but Smartcar does not know the vehicle: 404, named.
    let (code, _, err) =
        poll_command(&s, &api, &["poll", "now", "car-nobody", "--user-id", "u1"]).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("car-nobody") && err.contains("404"), "{err}");
    // The store unreachable: exit 4.
    let (code, _, err) = poll_command_with(
        &s,
        &api,
        &["poll", "now", "car-nobody", "--user-id", "u1"],
        &[("CARHOOK__CQL__NODES", "127.0.0.1:1")],
    )
    .await;
    assert_eq!(code, Some(4), "{err}");
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn a_429_waits_retry_after_for_its_scope_only() {
    let s = settings(&[]);
    let api = fake().await;
    for car in ["car-a", "car-b", "car-c", "car-d"] {
        api.set_vehicle(
            car,
            ApiVehicle::new("u1", &[("odometer-traveleddistance", km(1), T0)]),
        );
    }
    let poller = start_poller(&s, &api, &[]).await;
    // Vehicle scope: car-a waits 2 s; car-b is not held up.
    api.fault(
        "car-a",
        Fault::RateLimited {
            vehicle_scope: true,
            retry_after_secs: Some(2),
        },
    );
    request_poll(&s, "car-a").await;
    request_poll(&s, "car-b").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "polled").await >= 2.0
    })
    .await;
    let a = api.calls_for("car-a");
    let b = api.calls_for("car-b");
    assert_eq!(a.iter().map(|c| c.status).collect::<Vec<_>>(), [429, 200]);
    assert!(
        a[1].at.duration_since(a[0].at) >= Duration::from_secs(2),
        "retry-after not honoured"
    );
    assert_eq!(b.len(), 1);
    assert!(
        b[0].at < a[1].at,
        "a vehicle-scoped 429 held up another vehicle"
    );
    // Application scope: after it, no vehicle is asked anything for 2 s.
    api.fault(
        "*",
        Fault::RateLimited {
            vehicle_scope: false,
            retry_after_secs: Some(2),
        },
    );
    request_poll(&s, "car-c").await;
    request_poll(&s, "car-d").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "polled").await >= 4.0
    })
    .await;
    let calls = api.calls();
    let limited = calls
        .iter()
        .position(|c| c.status == 429 && (c.vehicle == "car-c" || c.vehicle == "car-d"));
    let limited = limited.unwrap_or_else(|| panic!("no application 429 seen: {calls:?}"));
    for later in &calls[limited + 1..] {
        assert!(
            later.at.duration_since(calls[limited].at) >= Duration::from_secs(2),
            "{} asked {:?} after an application-wide retry-after of 2 s",
            later.vehicle,
            later.at.duration_since(calls[limited].at)
        );
    }
    assert_eq!(
        metric_value(
            poller.admin,
            "carhook_poller_requests_total{outcome=\"rate_limited\"}"
        )
        .await,
        2.0
    );
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn a_430_stops_that_vehicle_and_is_never_retried() {
    let s = settings(&[]);
    let api = fake().await;
    api.set_vehicle(
        "car-billed",
        ApiVehicle::new("u1", &[("odometer-traveleddistance", km(1), T0)]),
    );
    let poller = start_poller(&s, &api, &[]).await;
    api.fault("car-billed", Fault::Billing);
    request_poll(&s, "car-billed").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "failed").await >= 1.0
    })
    .await;
    request_poll(&s, "car-billed").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "skipped_blocked").await >= 1.0
    })
    .await;
    let calls = api.calls_for("car-billed");
    assert_eq!(
        calls.iter().map(|c| c.status).collect::<Vec<_>>(),
        [430],
        "a 430 was retried"
    );
    assert_eq!(record_count(&s.kafka.brokers, &s.kafka.events_topic), 0);
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn a_token_expiring_mid_run_is_reminted_once() {
    let s = settings(&[]);
    let api = fake().await;
    for car in ["car-1", "car-2"] {
        api.set_vehicle(
            car,
            ApiVehicle::new("u1", &[("odometer-traveleddistance", km(1), T0)]),
        );
    }
    let poller = start_poller(&s, &api, &[]).await;
    request_poll(&s, "car-1").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "polled").await >= 1.0
    })
    .await;
    assert_eq!(api.minted(), 1);
    api.expire_tokens();
    request_poll(&s, "car-2").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "polled").await >= 2.0
    })
    .await;
    assert_eq!(api.minted(), 2, "one re-mint after the 401");
    let statuses: Vec<u16> = api.calls_for("car-2").iter().map(|c| c.status).collect();
    assert_eq!(statuses, [401, 200]);
    assert_eq!(
        metric_value(poller.admin, "carhook_poller_tokens_minted_total").await,
        2.0
    );
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn bad_responses_are_counted_never_crash_the_poller_and_never_write_state() {
    let s = settings(&[]);
    let api = fake().await;
    for car in ["car-html", "car-shape", "car-gone", "car-good"] {
        api.set_vehicle(
            car,
            ApiVehicle::new("u1", &[("odometer-traveleddistance", km(1), T0)]),
        );
    }
    let poller = start_poller(&s, &api, &[]).await;
    api.fault("car-html", Fault::NotJson);
    api.fault("car-shape", Fault::WrongShape);
    api.fault("car-gone", Fault::NotFound);
    for car in ["car-html", "car-shape", "car-gone"] {
        request_poll(&s, car).await;
    }
    let admin = poller.admin;
    eventually(Duration::from_secs(30), || async {
        metric_value(admin, "carhook_poller_requests_total{outcome=\"not_json\"}").await == 1.0
            && metric_value(
                admin,
                "carhook_poller_requests_total{outcome=\"bad_response\"}",
            )
            .await
                == 1.0
            && metric_value(
                admin,
                "carhook_poller_requests_total{outcome=\"not_found\"}",
            )
            .await
                == 1.0
    })
    .await;
    assert_eq!(get(admin, "/health").await.0, 200, "the poller is still up");
    assert_eq!(
        record_count(&s.kafka.brokers, &s.kafka.events_topic),
        0,
        "nothing produced for a bad answer"
    );
    // And it still polls a good vehicle afterwards.
    request_poll(&s, "car-good").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(admin, "polled").await >= 1.0
    })
    .await;
    assert_eq!(record_count(&s.kafka.brokers, &s.kafka.events_topic), 1);
    // The polled record: keyed by vehicle, marked as polled, carrying the poll's trace context.
    let brokers = s.kafka.brokers.clone();
    let topic = s.kafka.events_topic.clone();
    let records = tokio::task::spawn_blocking(move || {
        read_topic(&brokers, &topic, 1, Duration::from_secs(30))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let m = &records[0];
    assert_eq!(rdkafka::Message::key(m), Some("car-good".as_bytes()));
    assert_eq!(header(m, "carhook-source").as_deref(), Some("poll"));
    assert_eq!(
        header(m, "carhook-poll-reason").as_deref(),
        Some("operator")
    );
    assert!(header(m, "carhook-event-id").is_some_and(|id| id.starts_with("poll-")));
    // Each failure was logged, naming its vehicle and what was wrong.
    let log = std::fs::read_to_string(
        std::env::temp_dir().join(format!("{}.poller.log", s.cql.keyspace)),
    )
    .unwrap_or_default();
    for (car, what) in [
        ("car-html", "not JSON"),
        ("car-shape", "unusable 200 answer"),
        ("car-gone", "404"),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains(car) && l.contains(what)),
            "no WARN line for {car} saying {what:?} in the poller log:\n{log}"
        );
    }
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn the_global_bucket_is_never_exceeded_under_a_resync_of_1000_vehicles() {
    const VEHICLES: usize = 1000;
    const CAPACITY: u32 = 20;
    const REFILL_MS: u64 = 15;
    let s = settings(&[]);
    let api = fake().await;
    let log = std::env::temp_dir().join(format!("{}.processor.log", s.cql.keyspace));
    let processor = ChildService::processor(&s, "p0", &log, &[]).await;
    let mut hooks = Vec::with_capacity(VEHICLES);
    for i in 0..VEHICLES {
        let car = format!("car-{i:04}");
        api.set_vehicle(
            &car,
            ApiVehicle::new("u1", &[("odometer-traveleddistance", km(i as i64), T0 + 1)]),
        );
        hooks.push((
            car.clone(),
            state_event(
                &format!("hook-{i}"),
                &car,
                &[("odometer-traveleddistance", km(0), T0)],
            ),
        ));
    }
    let records: Vec<(Option<&str>, &[u8])> = hooks
        .iter()
        .map(|(c, b)| (Some(c.as_str()), b.as_slice()))
        .collect();
    produce_raw(&s.kafka.brokers, &s.kafka.events_topic, &records).await;
    eventually(Duration::from_secs(120), || async {
        metric_value(
            processor.admin,
            "carhook_processor_events_total{outcome=\"applied\"}",
        )
        .await
            >= VEHICLES as f64
    })
    .await;
    let poller = start_poller(
        &s,
        &api,
        &[
            ("CARHOOK__POLLER__BUCKET_CAPACITY", &CAPACITY.to_string()),
            ("CARHOOK__POLLER__BUCKET_REFILL_MS", &REFILL_MS.to_string()),
            ("CARHOOK__POLLER__CONCURRENCY", "16"),
        ],
    )
    .await;
    // The webhooks were delivered at 2025-10-31 (state_event's deliveredAt).
    let (code, out, err) = poll_command(
        &s,
        &api,
        &["poll", "resync", "--since", "2025-10-01T00:00:00Z"],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!("\"requested\": {VEHICLES}")), "{out}");
    let admin = poller.admin;
    eventually(Duration::from_secs(180), || async {
        metric_value(
            admin,
            "carhook_poller_polls_total{reason=\"resync\",result=\"polled\"}",
        )
        .await
            >= VEHICLES as f64
    })
    .await;
    let calls = api.calls();
    assert_eq!(calls.len(), VEHICLES, "one request per vehicle");
    // Never more than capacity + elapsed / refill since the first request (plus one for the
    // request in flight at the boundary and 50 ms for transit jitter between admission and
    // arrival at the fake).
    let first = calls[0].at;
    for (i, c) in calls.iter().enumerate() {
        let elapsed = c.at.duration_since(first) + Duration::from_millis(50);
        let allowed = u128::from(CAPACITY) + elapsed.as_millis() / u128::from(REFILL_MS) + 1;
        assert!(
            (i as u128 + 1) <= allowed,
            "request {} arrived {:?} after the first: the bucket allows {allowed}",
            i + 1,
            c.at.duration_since(first)
        );
    }
    let took = calls[VEHICLES - 1].at.duration_since(first);
    eprintln!(
        "bucket {CAPACITY} + 1 per {REFILL_MS} ms: {VEHICLES} requests took {took:?} after the first (the formula allows no less than {} ms)",
        (VEHICLES as u64 - u64::from(CAPACITY) - 1) * REFILL_MS
    );
    let floor = Duration::from_millis((VEHICLES as u64 - u64::from(CAPACITY) - 1) * REFILL_MS);
    assert!(
        took >= floor.saturating_sub(Duration::from_millis(50)),
        "{took:?} is faster than the bucket permits ({floor:?})"
    );
    assert_eq!(
        api.minted(),
        1,
        "16 requests at once share one token (single-flight)"
    );
    // And the polled values reached the store as polled values.
    let state = state_where(&s, "car-0999", |v| {
        v["signals"]["odometer-traveleddistance"]["source"] == "poll"
    })
    .await;
    assert_eq!(
        state["signals"]["odometer-traveleddistance"]["body"]["value"],
        999
    );
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn a_dead_letter_and_a_resolved_error_each_request_one_poll_in_the_batch_transaction() {
    let s = settings(&[]);
    let processor = spawn_processor(&s).await;
    let resolved = error_event(
        "err-resolved",
        "car-resolved",
        json!([{"type":"PERMISSION","code":null,"state":"RESOLVED"}]),
        1_761_896_351_529,
    );
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[
            (Some("car-poison"), b"{not json".as_slice()),
            (Some("car-resolved"), resolved.as_slice()),
        ],
    )
    .await;
    // A polled record that is poison must not ask for another poll (a loop).
    produce_polled(&s, "car-polled-poison", b"{not json").await;
    eventually(Duration::from_secs(60), || async {
        metric_value(processor.admin, "carhook_processor_dead_letters_total").await >= 2.0
    })
    .await;
    let brokers = s.kafka.brokers.clone();
    let topic = s.kafka.poll_topic.clone();
    let requests = tokio::task::spawn_blocking(move || {
        read_topic(&brokers, &topic, 2, Duration::from_secs(60))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut got: Vec<(String, String)> = requests
        .iter()
        .map(|m| {
            let v: Value = serde_json::from_slice(rdkafka::Message::payload(m).unwrap_or_default())
                .unwrap_or_default();
            (
                v["vehicleId"].as_str().unwrap_or_default().to_string(),
                v["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("car-poison".to_string(), "dead_letter".to_string()),
            ("car-resolved".to_string(), "error_resolved".to_string())
        ],
        "exactly one request each, none for the polled poison record"
    );
    assert_eq!(
        metric_value(
            processor.admin,
            "carhook_processor_poll_requests_total{reason=\"dead_letter\"}"
        )
        .await,
        1.0
    );
    processor.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn a_receiver_outage_longer_than_the_retry_window_polls_those_vehicles_once() {
    const PATH: &str = "/webhooks/smartcar";
    // The outage: the events topic does not exist yet (the broker creates no topic by itself),
    // so every produce times out and the receiver answers 503.
    let s = settings(&[
        ("CARHOOK__KAFKA__CREATE_TOPICS", "false"),
        ("CARHOOK__KAFKA__DELIVERY_TIMEOUT_MS", "1000"),
        ("CARHOOK__RECEIVER__BREAKER_FAILURES", "1000"),
        ("CARHOOK__POLLER__OUTAGE_WINDOW_SECS", "3"),
    ]);
    let mut others = s.kafka.clone();
    others.events_topic = format!("{}.unused", s.kafka.events_topic);
    shared::kafka::ensure_topics(&others)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let receiver = spawn_receiver_unready(&s).await;
    let deliver = |event: &str, car: &str| {
        let body = state_event(event, car, &[("odometer-traveleddistance", km(1), T0)]);
        let sig = sign(TOKEN, &body);
        let addr = receiver.addr;
        async move { post(addr, PATH, body, Some(&sig)).await.status }
    };
    let started = std::time::Instant::now();
    assert_eq!(deliver("long-1", "car-long").await, 503);
    while started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Refused only just now: Smartcar's retries will reach the recovered receiver.
    assert_eq!(deliver("short-1", "car-short").await, 503);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut n = 0;
    eventually(Duration::from_secs(60), || {
        n += 1;
        let event = format!("ok-{n}");
        async move { deliver(&event, "car-ok").await == 200 }
    })
    .await;
    let brokers = s.kafka.brokers.clone();
    let topic = s.kafka.poll_topic.clone();
    let requests = tokio::task::spawn_blocking(move || {
        read_topic(&brokers, &topic, 1, Duration::from_secs(30))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<Value> = requests
        .iter()
        .map(|m| {
            serde_json::from_slice(rdkafka::Message::payload(m).unwrap_or_default())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(
        got.len(),
        1,
        "one request, for the long outage only: {got:?}"
    );
    assert_eq!(got[0]["vehicleId"], "car-long");
    assert_eq!(got[0]["reason"], "receiver_outage");
    assert_eq!(
        metric_value(
            receiver.admin,
            "carhook_receiver_outage_polls_total{result=\"requested\"}"
        )
        .await,
        1.0
    );
    // The poller answers that request with Smartcar's truth. The vehicle's user is known from a
    // webhook applied before the outage (an older odometer reading).
    let processor = spawn_processor(&s).await;
    let earlier = state_event(
        "long-0",
        "car-long",
        &[("odometer-traveleddistance", km(1), T0)],
    );
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some("car-long"), &earlier)],
    )
    .await;
    state_where(&s, "car-long", |v| {
        v["signals"]["odometer-traveleddistance"]["body"]["value"] == 1
    })
    .await;
    let api = fake().await;
    let truth = ApiVehicle::new(
        "u1",
        &[
            ("odometer-traveleddistance", km(4242), T0 + 5_000),
            ("tractionbattery-stateofcharge", soc(55), T0 + 5_000),
        ],
    );
    api.set_vehicle("car-long", truth.clone());
    let poller = start_poller(&s, &api, &[]).await;
    let state = state_where(&s, "car-long", |v| {
        v["signals"]["odometer-traveleddistance"]["source"] == "poll"
    })
    .await;
    for (code, (body, _)) in &truth.signals {
        assert_eq!(&state["signals"][code]["body"], body, "{code}: {state:#}");
        assert_eq!(state["signals"][code]["source"], "poll", "{code}");
    }
    assert_eq!(
        metric_value(
            poller.admin,
            "carhook_poller_polls_total{reason=\"receiver_outage\",result=\"polled\"}"
        )
        .await,
        1.0
    );
    assert_eq!(api.calls_for("car-long").len(), 1, "polled once");
    processor.stop().await;
    receiver.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn the_safety_net_polls_an_active_vehicle_whose_configured_signal_is_too_old() {
    let s = settings(&[]);
    let processor = spawn_processor(&s).await;
    // Both vehicles were active (their webhooks were delivered on 2025-10-31); car-stale's
    // battery reading is from 2024, car-fresh's a second old: only car-stale is polled.
    let stale = state_event(
        "s-1",
        "car-stale",
        &[("tractionbattery-stateofcharge", soc(10), T0)],
    );
    let fresh = state_event(
        "f-1",
        "car-fresh",
        &[(
            "tractionbattery-stateofcharge",
            soc(90),
            shared::clock::EpochMillis::now().as_i64() - 1_000,
        )],
    );
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some("car-stale"), &stale), (Some("car-fresh"), &fresh)],
    )
    .await;
    state_where(&s, "car-fresh", |v| {
        v["signals"]["tractionbattery-stateofcharge"]["body"]["value"] == 90
    })
    .await;
    state_where(&s, "car-stale", |v| {
        v["signals"]["tractionbattery-stateofcharge"]["body"]["value"] == 10
    })
    .await;
    let api = fake().await;
    for car in ["car-stale", "car-fresh"] {
        api.set_vehicle(
            car,
            ApiVehicle::new(
                "u1",
                &[("tractionbattery-stateofcharge", soc(42), T0 + 1_000)],
            ),
        );
    }
    let poller = start_poller(
        &s,
        &api,
        &[
            (
                "CARHOOK__POLLER__SAFETY_NET_SIGNALS",
                "tractionbattery-stateofcharge",
            ),
            ("CARHOOK__POLLER__SAFETY_NET_MAX_AGE_SECS", "86400"),
            // Active within ~460 days: the fixed deliveredAt of the test events.
            ("CARHOOK__POLLER__SAFETY_NET_ACTIVE_SECS", "40000000"),
            ("CARHOOK__POLLER__SAFETY_NET_EVERY_SECS", "1"),
            ("CARHOOK__POLLER__MIN_INTERVAL_SECS", "3600"),
        ],
    )
    .await;
    let state = state_where(&s, "car-stale", |v| {
        v["signals"]["tractionbattery-stateofcharge"]["source"] == "poll"
    })
    .await;
    assert_eq!(
        state["signals"]["tractionbattery-stateofcharge"]["body"]["value"],
        42
    );
    // Later rounds ask again, but the minimum interval keeps it to one billable request.
    eventually(Duration::from_secs(30), || async {
        metric_value(
            poller.admin,
            "carhook_poller_polls_total{reason=\"safety_net\",result=\"skipped_min_interval\"}",
        )
        .await
            >= 1.0
    })
    .await;
    assert_eq!(api.calls_for("car-stale").len(), 1);
    assert!(
        api.calls_for("car-fresh").is_empty(),
        "a fresh value needs no poll"
    );
    processor.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn a_token_is_minted_again_before_it_expires_without_a_401() {
    let s = settings(&[]);
    // Tokens live 4 s: the poller refreshes at half their life (its margin is larger).
    let api = FakeApi::start(CLIENT_ID, CLIENT_SECRET, 4).await;
    for car in ["car-1", "car-2"] {
        api.set_vehicle(
            car,
            ApiVehicle::new("u1", &[("odometer-traveleddistance", km(1), T0)]),
        );
    }
    let poller = start_poller(&s, &api, &[]).await;
    request_poll(&s, "car-1").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "polled").await >= 1.0
    })
    .await;
    let first = api.calls_for("car-1")[0].at;
    while first.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    request_poll(&s, "car-2").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "polled").await >= 2.0
    })
    .await;
    assert_eq!(api.minted(), 2);
    assert!(
        api.calls().iter().all(|c| c.status == 200),
        "no request was refused: {:?}",
        api.calls()
    );
    drop_keyspace(&s).await;
}

/// The poller's log (`start_poller` writes it).
fn poller_log(s: &Settings) -> String {
    std::fs::read_to_string(std::env::temp_dir().join(format!("{}.poller.log", s.cql.keyspace)))
        .unwrap_or_default()
}

/// A `state_event` delivered now (its fixed `deliveredAt` is in 2025).
fn delivered_now(body: &[u8]) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(body).unwrap_or_default();
    v["meta"]["deliveredAt"] = json!(shared::clock::EpochMillis::now().as_i64());
    serde_json::to_vec(&v).unwrap_or_default()
}

#[tokio::test]
async fn a_failed_poll_still_sets_the_minimum_interval() {
    let s = settings(&[]);
    let api = fake().await;
    // car-gone is unknown to Smartcar (404); car-down answers 503 to every try.
    api.set_vehicle(
        "car-down",
        ApiVehicle::new("u1", &[("odometer-traveleddistance", km(1), T0)]),
    );
    for _ in 0..3 {
        api.fault("car-down", Fault::Server(503));
    }
    let poller = start_poller(
        &s,
        &api,
        &[
            ("CARHOOK__POLLER__MIN_INTERVAL_SECS", "3600"),
            ("CARHOOK__POLLER__MAX_TRIES", "3"),
        ],
    )
    .await;
    for car in ["car-gone", "car-down"] {
        request_poll(&s, car).await;
    }
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "not_found").await + poll_results(poller.admin, "failed").await
            >= 2.0
    })
    .await;
    // Asked again: the failed attempts count, so neither vehicle is asked again this hour.
    for car in ["car-gone", "car-down"] {
        request_poll(&s, car).await;
    }
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "skipped_min_interval").await >= 2.0
    })
    .await;
    assert_eq!(api.calls_for("car-gone").len(), 1, "{:?}", api.calls());
    assert_eq!(
        api.calls_for("car-down")
            .iter()
            .map(|c| c.status)
            .collect::<Vec<_>>(),
        [503, 503, 503],
        "three tries of the first poll, none of the second"
    );
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn retries_stop_at_the_monthly_cap() {
    let s = settings(&[]);
    let api = fake().await;
    api.set_vehicle(
        "car-capped",
        ApiVehicle::new("u1", &[("odometer-traveleddistance", km(1), T0)]),
    );
    for _ in 0..3 {
        api.fault("car-capped", Fault::Server(500));
    }
    let poller = start_poller(
        &s,
        &api,
        &[
            ("CARHOOK__POLLER__MONTHLY_CAP", "2"),
            ("CARHOOK__POLLER__MAX_TRIES", "3"),
        ],
    )
    .await;
    request_poll(&s, "car-capped").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "skipped_monthly_cap").await >= 1.0
    })
    .await;
    assert_eq!(
        api.calls_for("car-capped")
            .iter()
            .map(|c| c.status)
            .collect::<Vec<_>>(),
        [500, 500],
        "the third try would have been the month's third request, over the cap of 2"
    );
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn a_5xx_is_retried_with_backoff_then_succeeds_or_gives_up_counted() {
    let s = settings(&[]);
    let api = fake().await;
    for car in ["car-flaky", "car-broken"] {
        api.set_vehicle(
            car,
            ApiVehicle::new("u1", &[("odometer-traveleddistance", km(7), T0)]),
        );
    }
    api.fault("car-flaky", Fault::Server(502));
    api.fault("car-flaky", Fault::Server(503));
    for _ in 0..3 {
        api.fault("car-broken", Fault::Server(500));
    }
    let poller = start_poller(&s, &api, &[("CARHOOK__POLLER__MAX_TRIES", "3")]).await;
    request_poll(&s, "car-flaky").await;
    request_poll(&s, "car-broken").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "polled").await >= 1.0
            && poll_results(poller.admin, "failed").await >= 1.0
    })
    .await;
    let flaky = api.calls_for("car-flaky");
    assert_eq!(
        flaky.iter().map(|c| c.status).collect::<Vec<_>>(),
        [502, 503, 200]
    );
    // BACKOFF_BASE_MS is 100 (poller_env): every retry waited at least that.
    for pair in flaky.windows(2) {
        assert!(
            pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(100),
            "retried without backing off: {flaky:?}"
        );
    }
    assert_eq!(
        api.calls_for("car-broken")
            .iter()
            .map(|c| c.status)
            .collect::<Vec<_>>(),
        [500, 500, 500],
        "gave up after poller.max_tries"
    );
    assert_eq!(
        metric_value(
            poller.admin,
            "carhook_poller_requests_total{outcome=\"server_error\"}"
        )
        .await,
        5.0
    );
    assert_eq!(
        record_count(&s.kafka.brokers, &s.kafka.events_topic),
        1,
        "only the vehicle that answered in the end was produced"
    );
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn an_answer_slower_than_the_client_timeout_is_a_counted_failure_that_writes_nothing() {
    let s = settings(&[]);
    let api = fake().await;
    api.set_vehicle(
        "car-slow",
        ApiVehicle::new("u1", &[("odometer-traveleddistance", km(3), T0)]),
    );
    for _ in 0..2 {
        api.fault("car-slow", Fault::Slow(Duration::from_secs(4)));
    }
    let poller = start_poller(
        &s,
        &api,
        &[
            ("CARHOOK__SMARTCAR__API_TIMEOUT_MS", "1000"),
            ("CARHOOK__POLLER__MAX_TRIES", "2"),
        ],
    )
    .await;
    request_poll(&s, "car-slow").await;
    eventually(Duration::from_secs(30), || async {
        poll_results(poller.admin, "failed").await >= 1.0
    })
    .await;
    assert_eq!(api.calls_for("car-slow").len(), 2, "each try timed out");
    assert_eq!(
        metric_value(
            poller.admin,
            "carhook_poller_requests_total{outcome=\"transport\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        record_count(&s.kafka.brokers, &s.kafka.events_topic),
        0,
        "nothing produced"
    );
    assert!(
        poller_log(&s)
            .lines()
            .any(|l| l.contains("WARN") && l.contains("car-slow") && l.contains("poll failed")),
        "{}",
        poller_log(&s)
    );
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn a_signal_error_in_a_200_never_overwrites_the_stored_value() {
    let s = settings(&[]);
    let api = fake().await;
    let processor = spawn_processor(&s).await;
    let car = "car-signal-error";
    let hook = state_event(
        "hook-se",
        car,
        &[
            ("tractionbattery-stateofcharge", soc(80), T0),
            ("odometer-traveleddistance", km(100), T0),
        ],
    );
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some(car), &hook)],
    )
    .await;
    state_where(&s, car, |v| {
        v["signals"]["tractionbattery-stateofcharge"]["body"]["value"] == 80
    })
    .await;
    // Smartcar's battery reading is newer, but answered as an ERROR (with its stale body).
    api.set_vehicle(
        car,
        ApiVehicle::new(
            "u1",
            &[
                ("tractionbattery-stateofcharge", soc(5), T0 + 600_000),
                ("odometer-traveleddistance", km(130), T0 + 600_000),
            ],
        ),
    );
    api.fault(
        car,
        Fault::SignalError {
            code: "tractionbattery-stateofcharge".into(),
            error_type: "VEHICLE_STATE".into(),
        },
    );
    let _poller = start_poller(&s, &api, &[]).await;
    request_poll(&s, car).await;
    let state = state_where(&s, car, |v| {
        v["signals"]["odometer-traveleddistance"]["source"] == "poll"
    })
    .await;
    let battery = &state["signals"]["tractionbattery-stateofcharge"];
    assert_eq!(battery["body"]["value"], 80, "{state:#}");
    assert_eq!(battery["source"], "webhook", "{state:#}");
    assert_eq!(
        state["signals"]["odometer-traveleddistance"]["body"]["value"],
        130
    );
    processor.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn every_page_of_a_paginated_signals_answer_is_read() {
    let s = settings(&[]);
    let api = fake().await;
    api.set_page_size(2);
    let processor = spawn_processor(&s).await;
    let car = "car-paged";
    let signals = [
        ("tractionbattery-stateofcharge", soc(61), T0),
        ("odometer-traveleddistance", km(4000), T0),
        ("charge-ischarging", json!({"value": false}), T0),
    ];
    api.set_vehicle(car, ApiVehicle::new("u1", &signals));
    let poller = start_poller(&s, &api, &[]).await;
    request_poll(&s, car).await;
    let state = state_where(&s, car, |v| {
        signals
            .iter()
            .all(|(code, _, _)| v["signals"][code]["source"] == "poll")
    })
    .await;
    for (code, body, _) in &signals {
        assert_eq!(&state["signals"][code]["body"], body, "{code}: {state:#}");
    }
    assert_eq!(api.calls_for(car).len(), 2, "two pages, two requests");
    assert_eq!(
        metric_value(
            poller.admin,
            "carhook_poller_requests_total{outcome=\"ok\"}"
        )
        .await,
        2.0
    );
    processor.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn poll_now_exits_non_zero_when_the_polled_event_is_not_applied_in_time() {
    let s = settings(&[]);
    let api = fake().await;
    api.set_vehicle(
        "car-unapplied",
        ApiVehicle::new("u1", &[("odometer-traveleddistance", km(9), T0)]),
    );
    // No processor runs: the polled event waits on the events topic.
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (code, out, err) = poll_command(
        &s,
        &api,
        &[
            "poll",
            "now",
            "car-unapplied",
            "--user-id",
            "u1",
            "--wait-secs",
            "2",
        ],
    )
    .await;
    assert_eq!(code, Some(1), "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("car-unapplied") && err.contains("no processor applied it"),
        "{err}"
    );
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(report["applied"], false, "{report:#}");
    assert_eq!(record_count(&s.kafka.brokers, &s.kafka.events_topic), 1);
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn poll_now_keeps_stdout_for_the_result_and_prints_a_table_on_request() {
    let s = settings(&[]);
    let api = fake().await;
    let _processor = spawn_processor(&s).await;
    api.set_vehicle(
        "car-cli",
        ApiVehicle::new("u1", &[("odometer-traveleddistance", km(11), T0)]),
    );
    // A retried 5xx makes the poll log a WARN line: it must land on stderr.
    api.fault("car-cli", Fault::Server(503));
    let (code, out, err) =
        poll_command(&s, &api, &["poll", "now", "car-cli", "--user-id", "u1"]).await;
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    let report: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {out}"));
    assert_eq!(report["applied"], true, "{report:#}");
    assert!(
        err.contains("transient failure"),
        "the retry is logged on stderr: {err}"
    );
    let (code, out, err) = poll_command(
        &s,
        &api,
        &[
            "poll",
            "now",
            "car-cli",
            "--user-id",
            "u1",
            "--output",
            "table",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("SIGNAL") && out.contains("odometer-traveleddistance"),
        "{out}"
    );
    let (code, out, err) = poll_command(
        &s,
        &api,
        &[
            "poll",
            "resync",
            "--since",
            "2025-10-01T00:00:00Z",
            "--output",
            "table",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("requested"), "{out}");
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn the_safety_net_does_not_poll_a_vehicle_whose_only_recent_activity_is_polls() {
    let s = settings(&[]);
    let processor = spawn_processor(&s).await;
    let api = fake().await;
    // Both have a stale battery reading. car-driving had a webhook just now; car-parked's last
    // webhook is from 2025, and a poll (`poll now`) is all that happened to it since.
    let parked = state_event(
        "parked-1",
        "car-parked",
        &[("tractionbattery-stateofcharge", soc(10), T0)],
    );
    let driving = delivered_now(&state_event(
        "driving-1",
        "car-driving",
        &[("tractionbattery-stateofcharge", soc(20), T0)],
    ));
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[
            (Some("car-parked"), &parked),
            (Some("car-driving"), &driving),
        ],
    )
    .await;
    for car in ["car-parked", "car-driving"] {
        state_where(&s, car, |v| {
            v["signals"]["tractionbattery-stateofcharge"]["source"] == "webhook"
        })
        .await;
        // Smartcar has nothing newer: the readings stay stale after a poll.
        api.set_vehicle(
            car,
            ApiVehicle::new("u1", &[("tractionbattery-stateofcharge", soc(30), T0 + 1)]),
        );
    }
    let (code, _, err) = poll_command(&s, &api, &["poll", "now", "car-parked"]).await;
    assert_eq!(code, Some(0), "{err}");
    let poller = start_poller(
        &s,
        &api,
        &[
            (
                "CARHOOK__POLLER__SAFETY_NET_SIGNALS",
                "tractionbattery-stateofcharge",
            ),
            ("CARHOOK__POLLER__SAFETY_NET_MAX_AGE_SECS", "86400"),
            ("CARHOOK__POLLER__SAFETY_NET_ACTIVE_SECS", "3600"),
            ("CARHOOK__POLLER__SAFETY_NET_EVERY_SECS", "1"),
        ],
    )
    .await;
    // The net runs (car-driving is polled), and several rounds later car-parked has still only
    // had the operator's poll.
    eventually(Duration::from_secs(30), || async {
        !api.calls_for("car-driving").is_empty()
    })
    .await;
    eventually(Duration::from_secs(30), || async {
        poller_log(&s).matches("safety net round done").count() >= 3
    })
    .await;
    assert_eq!(
        api.calls_for("car-parked").len(),
        1,
        "a vehicle active only through its own polls was polled by the safety net"
    );
    assert!(
        metric_value(
            poller.admin,
            "carhook_poller_requested_total{reason=\"safety_net\"}"
        )
        .await
            >= 1.0
    );
    processor.stop().await;
    drop_keyspace(&s).await;
}

#[tokio::test]
async fn smartcar_sim_api_injects_faults_from_its_command_line() {
    let listen = free_port();
    let log = std::env::temp_dir().join(format!("{}.smartcar-sim.log", fresh("sim")));
    // Killed when dropped, also when an assertion fails.
    let _sim = ChildService::launch(
        "smartcar-sim",
        &[
            "api",
            "--listen",
            &listen.to_string(),
            "--vehicles",
            "1",
            "--fault",
            "5xx=502:1",
            "--fault",
            "429-vehicle=7:1",
        ],
        Vec::new(),
        listen,
        &log,
    );
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let token_url = format!("http://{listen}/oauth2/token");
    // Until it listens: a token by client credentials.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut token = None;
    while token.is_none() && std::time::Instant::now() < deadline {
        let answer = http
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "client_carhook-dev"),
                ("client_secret", "carhook-dev-secret-NOT-FOR-PRODUCTION"),
            ])
            .send()
            .await;
        match answer {
            Ok(a) => {
                let v: Value = serde_json::from_slice(&a.bytes().await.unwrap_or_default())
                    .unwrap_or_default();
                token = v["access_token"].as_str().map(str::to_owned);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let token = token.unwrap_or_default();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let answer = http
            .get(format!("http://{listen}/v3/vehicles/car-0/signals"))
            .bearer_auth(&token)
            .header("sc-user-id", "u1")
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        seen.push((
            answer.status().as_u16(),
            answer
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ));
    }
    assert_eq!(
        seen,
        [(502, None), (429, Some("7".to_string())), (200, None)],
        "the injected faults in order, then the normal answer"
    );
}
