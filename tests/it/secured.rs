//! Secured connections end to end: the receiver and processor over Kafka SASL_SSL (SCRAM-SHA-512,
//! the stack's own CA) and CQL with password authentication over TLS — and the failures an
//! operator meets first: a wrong password, a CA that does not sign the servers, a secret file that
//! is not mounted. Each must give a clear answer (exit 2 naming the key, or not-ready with a log
//! line naming the cause), never a hang and never a 200.

use std::time::Duration;

use carhook_tests::*;

/// SASL_SSL and TLS CQL with the stack's development credentials, plus `extra`.
fn secured(extra: &[(&str, &str)]) -> shared::config::Settings {
    let (brokers, password, ca) = (
        secure_brokers(),
        stack_file("secrets/kafka-password"),
        stack_file("tls/ca.pem"),
    );
    let mut env: Vec<(&str, &str)> = vec![
        ("CARHOOK__KAFKA__BROKERS", &brokers),
        ("CARHOOK__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
        ("CARHOOK__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
        ("CARHOOK__KAFKA__SASL_USERNAME", "carhook"),
        ("CARHOOK__KAFKA__SASL_PASSWORD_FILE", &password),
        ("CARHOOK__KAFKA__SSL_CA_FILE", &ca),
        ("CARHOOK__CQL__TLS_CA_FILE", &ca),
    ];
    env.extend_from_slice(extra);
    settings(&env)
}

/// A file holding `content`, removed with the test's temp dir.
fn temp_file(name: &str, content: &str) -> String {
    let dir = std::env::temp_dir().join(fresh("carhook-secured"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap_or_else(|e| panic!("{e}"));
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_travels_over_sasl_ssl_and_tls_cql() {
    let s = secured(&[]);
    let r = spawn_receiver(&s).await;
    let p = spawn_processor(&s).await;
    let vehicle = fresh("secured-car");
    let body = state_event(
        &fresh("ev"),
        &vehicle,
        &[(
            "tractionbattery-stateofcharge",
            serde_json::json!({"value": 71}),
            1_761_896_000_000,
        )],
    );
    let reply = post(
        r.addr,
        &s.receiver.path,
        body.clone(),
        Some(&sign(TOKEN, &body)),
    )
    .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    // The brokers setting names only the SASL_SSL listener, and the CQL session is the TLS one
    // logged in as `carhook`: the value arriving proves both paths.
    state_where(&s, &vehicle, |v| {
        v["signals"]["tractionbattery-stateofcharge"]["body"]["value"] == 71
    })
    .await;
    p.stop().await;
    r.stop().await;
    drop_keyspace(&s).await;
}

/// Runs `bin` with `env` until it exits (killed after `within`): its exit code (None when it
/// had to be killed) and everything it wrote. Output goes to a file, not a pipe, so a chatty
/// child never blocks on a full pipe.
fn run_to_exit(
    bin: &str,
    args: &[&str],
    env: Vec<(String, String)>,
    within: Duration,
) -> (Option<i32>, String) {
    let log = std::env::temp_dir().join(format!("{}.{bin}.out", fresh("secured")));
    // The admin address is never asked for: this child is only waited on.
    let mut service = ChildService::launch(bin, args, env, free_port(), &log);
    let deadline = std::time::Instant::now() + within;
    let code = loop {
        if let Ok(Some(status)) = service.child.try_wait() {
            break status.code();
        }
        if std::time::Instant::now() > deadline {
            drop(service); // kills and reaps it
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (code, std::fs::read_to_string(&log).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_file_stops_start_up_naming_the_key() {
    let s = secured(&[]);
    for (bin, args, key, value) in [
        (
            "receiver",
            vec![],
            "CARHOOK__KAFKA__SASL_PASSWORD_FILE",
            "/nonexistent/kafka-password",
        ),
        (
            "processor",
            vec!["run"],
            "CARHOOK__CQL__PASSWORD_FILE",
            "/nonexistent/cql-password",
        ),
    ] {
        let mut env = child_env(&s, free_port(), "missing-secret");
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
        let (code, out) = run_to_exit(bin, &args, env, Duration::from_secs(20));
        let config_key = key
            .trim_start_matches("CARHOOK__")
            .to_ascii_lowercase()
            .replacen("__", ".", 1);
        assert_eq!(code, Some(2), "{bin}: {out}");
        assert!(
            out.contains(&config_key) && out.contains(value),
            "{bin} must name {config_key} and the path: {out}"
        );
    }
}

/// Polls until `log` contains `needle` (the service's own words for the cause).
async fn log_names(log: &std::path::Path, needle: &str) {
    let log = log.to_path_buf();
    let needle = needle.to_string();
    eventually(Duration::from_secs(30), move || {
        let (log, needle) = (log.clone(), needle.clone());
        async move { std::fs::read_to_string(&log).is_ok_and(|t| t.contains(&needle)) }
    })
    .await;
}

/// A refused Kafka login or an unknown broker CA. A receiver that provisions its topics at start
/// stops there, naming the cause; one that does not (topics made by a Helm job) stays up but not
/// ready, answers a signed delivery 503 (Smartcar retries), and its log names the cause. Before,
/// provisioning reported only "OperationTimedOut": the admin client never serves error events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_kafka_credentials_or_ca_are_named_and_never_answered_200() {
    let wrong_password = temp_file("kafka-password", "not-the-password\n");
    let other_ca = other_ca();
    for (what, key, value, cause) in [
        (
            "wrong password",
            "CARHOOK__KAFKA__SASL_PASSWORD_FILE",
            wrong_password.as_str(),
            "SASL authentication error",
        ),
        (
            "unknown CA",
            "CARHOOK__KAFKA__SSL_CA_FILE",
            other_ca.as_str(),
            "certificate verify failed",
        ),
    ] {
        let s = secured(&[(key, value)]);
        let (listen, admin) = (free_port(), free_port());
        let mut env = child_env(&s, free_port(), "unused");
        env.push(("CARHOOK__RECEIVER__LISTEN".into(), listen.to_string()));
        env.push(("CARHOOK__RECEIVER__ADMIN_LISTEN".into(), admin.to_string()));
        let (code, out) = run_to_exit("receiver", &[], env.clone(), Duration::from_secs(40));
        assert!(
            code.is_some_and(|c| c != 0) && out.contains(cause),
            "{what}: provisioning must stop start-up naming {cause:?}; exit {code:?}: {out}"
        );
        env.push(("CARHOOK__KAFKA__CREATE_TOPICS".into(), "false".into()));
        let log = std::env::temp_dir().join(format!("{}.receiver.log", fresh("secured")));
        let child = ChildService::launch("receiver", &[], env, admin, &log);
        eventually(Duration::from_secs(20), || async {
            get(admin, "/health").await.0 == 200
        })
        .await;
        log_names(&log, cause).await;
        let (status, body) = get(admin, "/ready").await;
        assert_eq!(status, 503, "{what}: /ready answered {status} {body}");
        let event = state_event(&fresh("ev"), "car-secured", &[]);
        let answer = post(
            listen,
            &s.receiver.path,
            event.clone(),
            Some(&sign(TOKEN, &event)),
        )
        .await;
        assert_eq!(
            answer.status, 503,
            "{what}: a delivery was answered {}",
            answer.status
        );
        drop(child);
    }
}

/// A refused CQL login or an unknown node CA: the processor stays up but not ready (it cannot
/// claim anything) and its log names the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_cql_credentials_or_ca_leave_the_processor_not_ready_and_say_why() {
    let wrong_password = temp_file("cql-password", "not-the-password\n");
    let other_ca = other_ca();
    for (what, key, value, cause) in [
        (
            "wrong password",
            "CARHOOK__CQL__PASSWORD_FILE",
            wrong_password.as_str(),
            "Provided username carhook and/or password are incorrect",
        ),
        (
            "unknown CA",
            "CARHOOK__CQL__TLS_CA_FILE",
            other_ca.as_str(),
            "certificate verify failed",
        ),
    ] {
        let s = secured(&[(key, value)]);
        let log = std::env::temp_dir().join(format!("{}.processor.log", fresh("secured")));
        let admin = free_port();
        let env = child_env(&s, admin, &fresh("secured-p"));
        let child = ChildService::launch("processor", &["run"], env, admin, &log);
        eventually(Duration::from_secs(20), || async {
            get(admin, "/health").await.0 == 200
        })
        .await;
        log_names(&log, cause).await;
        let (status, body) = get(admin, "/ready").await;
        assert_eq!(status, 503, "{what}: /ready answered {status} {body}");
        assert!(body.contains("store"), "{what}: {body}");
        drop(child);
    }
}

/// A CA that signed nothing the stack serves.
fn other_ca() -> String {
    let dir = std::env::temp_dir().join(fresh("carhook-other-ca"));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let (key, pem) = (dir.join("ca.key"), dir.join("ca.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=some other CA", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&pem)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "openssl could not make a CA");
    pem.to_string_lossy().into_owned()
}

/// One export an OTLP/HTTP collector received: its `x-api-key` header and the decoded request.
type Export = (
    Option<String>,
    opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
);

/// What an OTLP/HTTP collector received.
#[derive(Clone, Default)]
struct HttpCollector(std::sync::Arc<std::sync::Mutex<Vec<Export>>>);

/// An OTLP/HTTP (protobuf) collector on a free port: `POST /v1/traces`.
async fn http_collector() -> (std::net::SocketAddr, HttpCollector) {
    use http_body_util::BodyExt;
    use prost::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let seen = HttpCollector::default();
    let store = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            let key = req
                                .headers()
                                .get("x-api-key")
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            let path_ok = req.uri().path() == "/v1/traces";
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let decoded = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body);
                            let status = match (path_ok, decoded) {
                                (true, Ok(r)) => {
                                    if let Ok(mut s) = store.0.lock() {
                                        s.push((key, r));
                                    }
                                    200
                                }
                                _ => 400,
                            };
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/x-protobuf")
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap_or_default(),
                            )
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    (addr, seen)
}

/// One event over SASL_SSL and TLS CQL, traced to a collector over OTLP/HTTP (protobuf) with an
/// API key read from a headers file: every export carries the key, the spans of both services form
/// one trace, and the resource names service, version and instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secured_path_is_traced_over_otlp_http_with_an_api_key() {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
    let (otlp, collector) = http_collector().await;
    let headers = temp_file("otlp-headers", "x-api-key=s3cret%2Dkey\n");
    let endpoint = format!("http://{otlp}/v1/traces");
    let s = secured(&[]);
    let extra = [
        ("CARHOOK__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
        ("CARHOOK__TELEMETRY__OTLP_PROTOCOL", "http_protobuf"),
        ("CARHOOK__TELEMETRY__OTLP_HEADERS_FILE", headers.as_str()),
    ];
    let log = std::env::temp_dir().join(format!("{}.secured-trace.log", s.cql.keyspace));
    let processor = ChildService::processor(&s, &fresh("traced"), &log, &extra).await;
    let receiver = ChildService::receiver(&s, &log, &extra).await;
    let vehicle = fresh("traced-car");
    let body = state_event(
        &fresh("ev"),
        &vehicle,
        &[(
            "charge-ischarging",
            serde_json::json!({"value": true}),
            1_761_896_000_000,
        )],
    );
    let reply = post(
        receiver.addr,
        &s.receiver.path,
        body.clone(),
        Some(&sign(TOKEN, &body)),
    )
    .await;
    assert_eq!(reply.status, 200);
    state_where(&s, &vehicle, |v| {
        v["signals"]["charge-ischarging"]["body"]["value"] == true
    })
    .await;
    assert_eq!(receiver.terminate(), Some(0));
    assert_eq!(processor.terminate(), Some(0));
    let got = collector.0.lock().map(|g| g.clone()).unwrap_or_default();
    assert!(!got.is_empty(), "nothing exported");
    assert!(
        got.iter()
            .all(|(key, _)| key.as_deref() == Some("s3cret-key")),
        "an export without the API key: {:?}",
        got.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
        .as_ref()
        .and_then(|v| v.value.as_ref())
    {
        Some(AnyValue::StringValue(s)) => s.clone(),
        _ => String::new(),
    };
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut spans = Vec::new();
    for (_, req) in &got {
        for rs in &req.resource_spans {
            let attrs: std::collections::BTreeMap<String, String> = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .map(|kv| (kv.key.clone(), text(&kv.value)))
                .collect();
            for key in ["service.name", "service.version", "service.instance.id"] {
                assert!(
                    attrs.get(key).is_some_and(|v| !v.is_empty()),
                    "resource without {key}: {attrs:?}"
                );
            }
            for ss in &rs.scope_spans {
                for sp in &ss.spans {
                    spans.push((attrs["service.name"].clone(), sp.clone()));
                }
            }
        }
    }
    for (svc, sp) in &spans {
        println!(
            "{svc:<18} {:<28} trace={} span={} parent={}",
            sp.name,
            hex(&sp.trace_id),
            hex(&sp.span_id),
            hex(&sp.parent_span_id)
        );
    }
    let request = spans
        .iter()
        .find(|(svc, sp)| svc == "carhook-receiver" && sp.name.starts_with("POST"))
        .map(|(_, sp)| sp.trace_id.clone())
        .unwrap_or_else(|| panic!("no request span"));
    assert!(
        spans.iter().any(|(svc, sp)| svc == "carhook-processor"
            && sp.name.starts_with("BATCH UPDATE")
            && sp.trace_id == request),
        "the processor's write is not in the request's trace"
    );
    drop_keyspace(&s).await;
}
