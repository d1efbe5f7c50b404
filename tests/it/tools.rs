//! The operator commands as a script sees them: the real `processor` binary, stdout holding only
//! the result (JSON that parses), logs on stderr, and the documented exit codes.

use std::process::Stdio;
use std::time::Duration;

use carhook_tests::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use shared::config::Settings;

/// What one command run left behind.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `processor ARGS` with `s`'s configuration (and `extra` environment), stdin not a terminal.
fn processor(s: &Settings, args: &[&str], extra: &[(&str, &str)]) -> Run {
    let out = std::process::Command::new(workspace_bin("processor"))
        .args(args)
        .env_clear()
        .envs(child_env(s, free_port(), "cli"))
        .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn processor: {e}"));
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// stdout as one JSON document (the whole of it: no log line may be mixed in).
fn json(r: &Run) -> serde_json::Value {
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}): {}\nstderr: {}",
            r.stdout, r.stderr
        )
    })
}

/// Writes dead letters straight to the dead-letter topic: (error class, event id).
async fn letters(s: &Settings, classes: &[(&str, &str)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &s.kafka.brokers)
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    for (class, id) in classes {
        let h = OwnedHeaders::new()
            .insert(Header {
                key: shared::headers::EVENT_ID,
                value: Some(*id),
            })
            .insert(Header {
                key: shared::headers::DLQ_ERROR_CLASS,
                value: Some(*class),
            });
        producer
            .send(
                FutureRecord::<str, [u8]>::to(&s.kafka.dlq_topic)
                    .key("car-cli")
                    .payload(b"{not json".as_slice())
                    .headers(h),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("{e}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_commands_report_completeness_refuse_unconfirmed_all_and_check_reasons() {
    let s = settings(&[("CARHOOK__KAFKA__PARTITIONS", "2")]);
    shared::kafka::ensure_topics(&s.kafka)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    letters(
        &s,
        &[
            ("not_json", "cli-1"),
            ("wrong_type", "cli-2"),
            ("not_json", "cli-3"),
        ],
    )
    .await;

    let all = processor(&s, &["dlq", "list", "--output", "json"], &[]);
    assert_eq!(all.code, Some(0), "{}", all.stderr);
    let v = json(&all);
    assert_eq!(v["letters"].as_array().map(Vec::len), Some(3), "{v:#}");
    assert_eq!(v["coverage"]["read"], 3, "{v:#}");
    assert_eq!(v["coverage"]["complete"], true, "{v:#}");
    assert!(all.stderr.contains("read 3 letter(s)"), "{}", all.stderr);
    // `--json` stays an alias of `--output json`.
    let alias = processor(&s, &["dlq", "list", "--json", "--reason", "not_json"], &[]);
    assert_eq!(json(&alias)["letters"].as_array().map(Vec::len), Some(2));

    let limited = processor(&s, &["dlq", "list", "--json", "--limit", "1"], &[]);
    assert_eq!(limited.code, Some(0), "{}", limited.stderr);
    let v = json(&limited);
    assert_eq!(v["letters"].as_array().map(Vec::len), Some(1), "{v:#}");
    assert_eq!(v["coverage"]["limit_reached"], true, "{v:#}");
    assert_eq!(v["coverage"]["complete"], false, "{v:#}");

    let table = processor(&s, &["dlq", "list"], &[]);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    assert!(table.stdout.contains("cli-2"), "{}", table.stdout);

    let first = json(&all)["letters"][0]["position"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let show = processor(&s, &["dlq", "show", &first], &[]);
    assert_eq!(show.code, Some(0), "{}", show.stderr);
    assert_eq!(json(&show)["position"], first.as_str());
    let missing = processor(&s, &["dlq", "show", "1:999999"], &[]);
    assert_eq!(missing.code, Some(3), "not found: {}", missing.stderr);
    assert!(missing.stdout.is_empty(), "{}", missing.stdout);

    let bad = processor(&s, &["dlq", "list", "--reason", "not-json"], &[]);
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);
    for class in ["not_json", "missing_field", "store_refused"] {
        assert!(
            bad.stderr.contains(class),
            "the classes are listed: {}",
            bad.stderr
        );
    }
    let bad = processor(&s, &["dlq", "redrive", "--reason", "bogus"], &[]);
    assert_eq!(bad.code, Some(2), "{}", bad.stderr);

    let migrated = processor(&s, &["migrate"], &[]);
    assert_eq!(migrated.code, Some(0), "{}", migrated.stderr);
    let before = record_count(&s.kafka.brokers, &s.kafka.events_topic);
    let refused = processor(&s, &["dlq", "redrive", "--all"], &[]);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    assert_eq!(
        record_count(&s.kafka.brokers, &s.kafka.events_topic),
        before,
        "nothing redriven without --yes"
    );
    let dry = processor(&s, &["dlq", "redrive", "--all", "--dry-run"], &[]);
    assert_eq!(dry.code, Some(0), "{}", dry.stderr);
    let v = json(&dry);
    assert_eq!(v["selected"], 3, "{v:#}");
    assert_eq!(v["coverage"]["complete"], true, "{v:#}");

    // A broker nobody listens on: exit 4.
    let down = processor(
        &s,
        &["dlq", "list"],
        &[("CARHOOK__KAFKA__BROKERS", "127.0.0.1:1")],
    );
    assert_eq!(down.code, Some(4), "{}", down.stderr);
    drop_keyspace(&s).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn state_and_replay_print_only_their_result_on_stdout_with_distinct_exit_codes() {
    let s = settings(&[]);
    let p = spawn_processor(&s).await;
    let body = state_event(
        "cli-state-1",
        "car-cli",
        &[(
            "odometer-traveleddistance",
            serde_json::json!({"value": 7, "unit": "km"}),
            1_761_896_000_000,
        )],
    );
    produce_raw(
        &s.kafka.brokers,
        &s.kafka.events_topic,
        &[(Some("car-cli"), body.as_slice())],
    )
    .await;
    state_where(&s, "car-cli", |v| v["signals"].is_object()).await;
    p.stop().await;

    let known = processor(&s, &["state", "car-cli"], &[]);
    assert_eq!(known.code, Some(0), "{}", known.stderr);
    assert!(json(&known)["signals"]["odometer-traveleddistance"].is_object());
    let table = processor(&s, &["state", "car-cli", "--output", "table"], &[]);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    assert!(
        table.stdout.contains("odometer-traveleddistance"),
        "{}",
        table.stdout
    );
    let unknown = processor(&s, &["state", "no-such-car"], &[]);
    assert_eq!(unknown.code, Some(3), "{}", unknown.stderr);
    assert!(unknown.stdout.is_empty(), "{}", unknown.stdout);
    let down = processor(
        &s,
        &["state", "car-cli"],
        &[("CARHOOK__CQL__NODES", "127.0.0.1:1")],
    );
    assert_eq!(down.code, Some(4), "{}", down.stderr);

    // Replay logs at INFO (to stderr) while its summary is the whole of stdout.
    let replay = processor(&s, &["replay", "--from", "0:0", "--dry-run"], &[]);
    assert_eq!(replay.code, Some(0), "{}", replay.stderr);
    let v = json(&replay);
    assert_eq!(v["read"], 1, "{v:#}");
    assert!(
        replay.stderr.contains("replay"),
        "logs on stderr: {}",
        replay.stderr
    );
    let usage = processor(&s, &["replay", "--from", "yesterday"], &[]);
    assert_eq!(usage.code, Some(2), "{}", usage.stderr);
    drop_keyspace(&s).await;
}
