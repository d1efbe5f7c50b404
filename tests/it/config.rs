//! The binaries refuse bad configuration before binding anything, naming the key.

use std::process::Command;

fn bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    // target/<profile>/deps/it-<hash> -> target/<profile>/<name>
    exe.parent()
        .and_then(|d| d.parent())
        .map(|d| d.join(name))
        .unwrap_or_else(|| panic!("no target dir"))
}

#[test]
fn receiver_without_token_exits_naming_the_key() {
    let out = Command::new(bin("receiver"))
        .env_clear()
        .env("CARHOOK__RECEIVER__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap_or_else(|e| panic!("run receiver: {e}"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("smartcar.management_tokens"), "{err}");
}

#[test]
fn bad_value_exits_naming_the_key_and_never_prints_the_token() {
    let out = Command::new(bin("receiver"))
        .env_clear()
        .env(
            "CARHOOK__SMARTCAR__MANAGEMENT_TOKENS",
            "super-secret-token-value",
        )
        .env("CARHOOK__RECEIVER__MAX_BODY_BYTES", "plenty")
        .output()
        .unwrap_or_else(|e| panic!("run receiver: {e}"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("receiver.max_body_bytes"), "{err}");
    assert!(!err.contains("super-secret-token-value"));
    let out = Command::new(bin("processor"))
        .arg("migrate")
        .env_clear()
        .env("CARHOOK__KAFKA__EVENTS_TOPIC", "no spaces allowed")
        .output()
        .unwrap_or_else(|e| panic!("run processor: {e}"));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("kafka.events_topic"));
}
