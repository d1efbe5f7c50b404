//! Layered settings: defaults < optional TOML file (`--config PATH` or `CARHOOK_CONFIG`) <
//! environment `CARHOOK__SECTION__KEY`. The environment names are a public contract.
//!
//! Everything is validated before a service binds or connects: a bad value is a [`ConfigError`]
//! naming the key and what is wrong, and the binaries exit non-zero with it. Unknown keys are
//! refused too, so a typo (`CARHOOK__KAFKA__BROKER`) fails loudly instead of being ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

use crate::signature::{ManagementTokens, TokensError};

/// Environment variable naming the optional TOML file.
pub const CONFIG_FILE_ENV: &str = "CARHOOK_CONFIG";

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error("configuration key `smartcar.management_tokens`: {0} (set CARHOOK__SMARTCAR__MANAGEMENT_TOKENS or smartcar.management_tokens_file)")]
    Tokens(#[from] TokensError),
    #[error("configuration key `smartcar.management_tokens_file`: cannot read {path}: {source}")]
    TokensFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// All settings of both services.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub smartcar: SmartcarSettings,
    pub kafka: KafkaSettings,
    pub cql: CqlSettings,
    pub receiver: ReceiverSettings,
    pub processor: ProcessorSettings,
    pub telemetry: TelemetrySettings,
}

/// Smartcar credentials.
#[derive(Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SmartcarSettings {
    /// Comma-separated Application Management Tokens, current first.
    pub management_tokens: Option<SecretString>,
    /// Alternatively, a file holding the same comma-separated list (e.g. a mounted Secret).
    pub management_tokens_file: Option<PathBuf>,
}

impl std::fmt::Debug for SmartcarSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmartcarSettings")
            .field(
                "management_tokens",
                &self.management_tokens.as_ref().map(|_| "[redacted]"),
            )
            .field("management_tokens_file", &self.management_tokens_file)
            .finish()
    }
}

impl SmartcarSettings {
    /// The token list, from the variable or the file. Required by the receiver only.
    pub fn tokens(&self) -> Result<ManagementTokens, ConfigError> {
        use secrecy::ExposeSecret;
        if let Some(csv) = &self.management_tokens {
            return Ok(ManagementTokens::from_csv(csv.expose_secret())?);
        }
        if let Some(path) = &self.management_tokens_file {
            let csv = std::fs::read_to_string(path).map_err(|source| ConfigError::TokensFile {
                path: path.clone(),
                source,
            })?;
            return Ok(ManagementTokens::from_csv(&csv)?);
        }
        Err(TokensError::None.into())
    }
}

/// Kafka topics and client settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    pub events_topic: String,
    pub dlq_topic: String,
    pub actions_topic: String,
    /// Short-retention topic keeping raw bytes of rejected deliveries for diagnosis.
    pub quarantine_topic: String,
    /// Partitions for topics the project creates.
    pub partitions: i32,
    pub replication_factor: i32,
    /// Events topic retention: the replay window.
    pub events_retention_hours: u64,
    pub dlq_retention_hours: u64,
    pub quarantine_retention_hours: u64,
    /// Create missing topics at start (the services and `processor migrate`); off when a Helm job does it.
    pub create_topics: bool,
    /// Producer delivery timeout; must stay well inside Smartcar's 15 s budget.
    pub delivery_timeout_ms: u64,
    /// Producer linger: small batching under load.
    pub linger_ms: u64,
    /// Processor consumer group.
    pub consumer_group: String,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            events_topic: "smartcar.events".into(),
            dlq_topic: "smartcar.events.dlq".into(),
            actions_topic: "smartcar.actions".into(),
            quarantine_topic: "smartcar.events.quarantine".into(),
            partitions: 6,
            replication_factor: 1,
            events_retention_hours: 7 * 24,
            dlq_retention_hours: 14 * 24,
            quarantine_retention_hours: 24,
            create_topics: true,
            delivery_timeout_ms: 5_000,
            linger_ms: 2,
            consumer_group: "carhook-processor".into(),
        }
    }
}

/// CQL store settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CqlSettings {
    /// Contact points, comma-separated `host:port`.
    pub nodes: String,
    pub keyspace: String,
    /// Replication clause used when the keyspace is created, e.g.
    /// `{'class': 'NetworkTopologyStrategy', 'dc1': 3}` in production.
    pub replication: String,
    /// Per-request timeout: short, because a stuck request stalls a partition.
    pub request_timeout_ms: u64,
    /// How long processed event ids are kept for deduplication.
    pub dedup_ttl_days: u32,
    /// Run migrations at start (off when a Helm job does it).
    pub migrate: bool,
}

impl Default for CqlSettings {
    fn default() -> Self {
        Self {
            nodes: "127.0.0.1:9042".into(),
            keyspace: "carhook".into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            request_timeout_ms: 3_000,
            dedup_ttl_days: 7,
            migrate: true,
        }
    }
}

/// Receiver settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReceiverSettings {
    /// The webhook listener: serves only [`ReceiverSettings::path`].
    pub listen: SocketAddr,
    /// `/health`, `/ready` and `/metrics`, apart from the public webhook port.
    pub admin_listen: SocketAddr,
    /// Webhook path.
    pub path: String,
    /// Largest accepted body; Smartcar's cap is 50 KB.
    pub max_body_bytes: usize,
    /// Time allowed to receive the request headers, from their first byte.
    pub header_timeout_ms: u64,
    /// Time allowed to receive the whole body (also bounded by the request deadline).
    pub body_timeout_ms: u64,
    /// The whole request — headers, body, verification, produce — is answered within this; a
    /// produce still waiting at the deadline gets 503 + `Retry-After`. Well under Smartcar's 15 s.
    pub request_timeout_ms: u64,
    /// How long an idle keep-alive connection (no request started) stays open. Load balancers
    /// reuse idle connections for 60 s or more; closing them first races their next request.
    pub idle_timeout_ms: u64,
    /// Bodies being read at once before answering 503: bounds slow senders apart from
    /// [`ReceiverSettings::max_inflight`].
    pub max_body_reads: usize,
    /// Verified requests being produced at once before answering 503.
    pub max_inflight: usize,
    /// Consecutive produce failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before a probe (a request, or the background broker check)
    /// may close it.
    pub breaker_open_ms: u64,
    /// `Retry-After` seconds on 503.
    pub retry_after_secs: u64,
    /// Unsigned VERIFY challenges answered per second (signing-oracle guard).
    pub verify_per_sec: u32,
    /// Rejected deliveries copied to the quarantine topic per second.
    pub quarantine_per_sec: u32,
    /// Drain time on SIGTERM.
    pub shutdown_grace_ms: u64,
}

impl Default for ReceiverSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            path: "/webhooks/smartcar".into(),
            max_body_bytes: 64 * 1024,
            header_timeout_ms: 3_000,
            body_timeout_ms: 10_000,
            request_timeout_ms: 10_000,
            idle_timeout_ms: 75_000,
            max_body_reads: 256,
            max_inflight: 1024,
            breaker_failures: 5,
            breaker_open_ms: 2_000,
            retry_after_secs: 5,
            verify_per_sec: 5,
            quarantine_per_sec: 20,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl ReceiverSettings {
    /// Time a request has once its headers are in: the request deadline less the header
    /// allowance, so that from the first header byte to the answer never exceeds
    /// `request_timeout_ms`.
    pub fn after_headers(&self) -> Duration {
        Duration::from_millis(
            self.request_timeout_ms
                .saturating_sub(self.header_timeout_ms),
        )
    }
}

/// Processor settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessorSettings {
    pub admin_listen: SocketAddr,
    /// Stable instance id (pod name in Kubernetes); also the Kafka transactional id suffix, so a
    /// restarted instance fences its predecessor's open transaction.
    pub instance_id: String,
    /// Records handled per transaction at most.
    pub batch_max: usize,
    /// How long to wait to fill a batch.
    pub batch_wait_ms: u64,
    /// Records processed at once (lanes: each holds one partition's events of some vehicles, in
    /// order). Also replay's concurrency.
    pub concurrency: usize,
    /// Deterministic failures of one record before it is dead-lettered.
    pub max_attempts: u32,
    /// Version of the state-derivation logic: breaks ties at equal `oemUpdatedAt` on replay.
    pub logic_version: u16,
    /// Default back-off after a RATE_LIMIT error when Smartcar gives none.
    pub rate_limit_backoff_secs: u64,
    /// Longest pause between retries of a transient failure.
    pub max_backoff_ms: u64,
    pub shutdown_grace_ms: u64,
    /// Time one `commit_transaction` or `abort_transaction` call may block. A call that runs out
    /// is resumed with the time left of the transaction budget (`transaction.timeout.ms`), never
    /// abandoned: librdkafka keeps committing in the background. 0 makes every call return at
    /// once and be polled until the commit completes (how the tests force the resume path).
    pub commit_timeout_ms: u64,
    /// How far a car's or Smartcar's clock may run ahead of receive time before the timestamp is
    /// not trusted (the next clock is used instead).
    pub max_clock_skew_ms: u64,
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        Self {
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            instance_id: "processor-0".into(),
            batch_max: 500,
            batch_wait_ms: 10,
            concurrency: 32,
            max_attempts: 3,
            logic_version: 1,
            rate_limit_backoff_secs: 900,
            max_backoff_ms: 30_000,
            shutdown_grace_ms: 20_000,
            commit_timeout_ms: 10_000,
            max_clock_skew_ms: 60_000,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

/// Logging and tracing settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// `tracing` filter directive, e.g. `info,carhook_receiver=debug`.
    pub log_level: String,
    /// OTLP/gRPC endpoint, e.g. `http://otel-collector:4317`. Unset: nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// Fraction of traces sampled, 0.0–1.0 (parent-based).
    pub sampling_ratio: f64,
    /// `service.name` override.
    pub service_name: Option<String>,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Json,
            log_level: "info".into(),
            otlp_endpoint: None,
            sampling_ratio: 1.0,
            service_name: None,
        }
    }
}

impl Settings {
    /// Loads from the optional file and the process environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_from(file, env)
    }

    /// Loads from an explicit environment (tests inject it; they never mutate the process env).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env: std::collections::HashMap<String, String> = env.into_iter().collect();
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env.get(CONFIG_FILE_ENV).map(PathBuf::from));
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("CARHOOK")
                .prefix_separator("__")
                .separator("__")
                .source(Some(env)),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values that deserialise but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "is empty"));
        }
        for (key, topic) in [
            ("kafka.events_topic", &k.events_topic),
            ("kafka.dlq_topic", &k.dlq_topic),
            ("kafka.actions_topic", &k.actions_topic),
            ("kafka.quarantine_topic", &k.quarantine_topic),
        ] {
            validate_topic(key, topic)?;
        }
        if k.partitions < 1 {
            return Err(invalid(
                "kafka.partitions",
                format!("{} is not a positive partition count", k.partitions),
            ));
        }
        if k.replication_factor < 1 {
            return Err(invalid("kafka.replication_factor", "must be at least 1"));
        }
        if !(100..=14_000).contains(&k.delivery_timeout_ms) {
            return Err(invalid(
                "kafka.delivery_timeout_ms",
                format!(
                    "{} ms is outside 100..=14000: a 200 must come inside Smartcar's 15 s",
                    k.delivery_timeout_ms
                ),
            ));
        }
        let c = &self.cql;
        if c.nodes.split(',').all(|n| n.trim().is_empty()) {
            return Err(invalid("cql.nodes", "is empty"));
        }
        if c.keyspace.is_empty()
            || c.keyspace.len() > 48
            || !c
                .keyspace
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            || !c.keyspace.starts_with(|ch: char| ch.is_ascii_alphabetic())
        {
            return Err(invalid(
                "cql.keyspace",
                format!(
                    "{:?} is not a CQL identifier (letters, digits, _; starts with a letter; ≤ 48)",
                    c.keyspace
                ),
            ));
        }
        if c.dedup_ttl_days < 7 {
            return Err(invalid(
                "cql.dedup_ttl_days",
                "must be at least 7: Smartcar retries and replays need a week of processed ids",
            ));
        }
        if c.request_timeout_ms == 0 {
            return Err(invalid("cql.request_timeout_ms", "must be positive"));
        }
        let r = &self.receiver;
        if !r.path.starts_with('/') {
            return Err(invalid(
                "receiver.path",
                format!("{:?} must start with '/'", r.path),
            ));
        }
        if r.max_body_bytes < 1024 {
            return Err(invalid("receiver.max_body_bytes", "must be at least 1024"));
        }
        if r.max_inflight == 0 {
            return Err(invalid("receiver.max_inflight", "must be positive"));
        }
        if r.max_body_reads == 0 {
            return Err(invalid("receiver.max_body_reads", "must be positive"));
        }
        if r.admin_listen == r.listen && r.listen.port() != 0 {
            return Err(invalid(
                "receiver.admin_listen",
                format!(
                    "{} is also receiver.listen: the admin endpoints need their own port",
                    r.admin_listen
                ),
            ));
        }
        if !(1_000..=14_000).contains(&r.request_timeout_ms) {
            return Err(invalid(
                "receiver.request_timeout_ms",
                format!(
                    "{} ms is outside 1000..=14000: the answer must come inside Smartcar's 15 s",
                    r.request_timeout_ms
                ),
            ));
        }
        if r.header_timeout_ms == 0 || r.header_timeout_ms * 2 > r.request_timeout_ms {
            return Err(invalid(
                "receiver.header_timeout_ms",
                format!(
                    "{} ms must be positive and at most half of receiver.request_timeout_ms ({} ms), which it is part of",
                    r.header_timeout_ms, r.request_timeout_ms
                ),
            ));
        }
        if r.idle_timeout_ms < 1_000 {
            return Err(invalid("receiver.idle_timeout_ms", "must be at least 1000"));
        }
        if r.breaker_failures == 0 {
            return Err(invalid("receiver.breaker_failures", "must be positive"));
        }
        let p = &self.processor;
        if p.batch_max == 0 {
            return Err(invalid("processor.batch_max", "must be positive"));
        }
        if !(1..=1024).contains(&p.concurrency) {
            return Err(invalid(
                "processor.concurrency",
                "must be between 1 and 1024",
            ));
        }
        if p.max_attempts == 0 {
            return Err(invalid("processor.max_attempts", "must be positive"));
        }
        if p.logic_version > 999 {
            return Err(invalid("processor.logic_version", "must be at most 999"));
        }
        if p.commit_timeout_ms > 60_000 {
            return Err(invalid(
                "processor.commit_timeout_ms",
                "must be at most 60000",
            ));
        }
        if !(1_000..=86_400_000).contains(&p.max_clock_skew_ms) {
            return Err(invalid(
                "processor.max_clock_skew_ms",
                "must be between 1000 and 86400000 (one day)",
            ));
        }
        if p.instance_id.trim().is_empty() {
            return Err(invalid("processor.instance_id", "is empty"));
        }
        if !(0.0..=1.0).contains(&self.telemetry.sampling_ratio) {
            return Err(invalid(
                "telemetry.sampling_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        Ok(())
    }
}

fn validate_topic(key: &'static str, topic: &str) -> Result<(), ConfigError> {
    let ok = !topic.is_empty()
        && topic.len() <= 249
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{topic:?} is not a valid Kafka topic name"),
        ))
    }
}

impl KafkaSettings {
    /// The producer delivery timeout.
    pub fn delivery_timeout(&self) -> Duration {
        Duration::from_millis(self.delivery_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_the_documented_contract() {
        let s = Settings::load_from(None, env(&[])).map_err(|e| e.to_string());
        let s = match s {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(s.kafka.brokers, "127.0.0.1:9092");
        assert_eq!(s.kafka.events_topic, "smartcar.events");
        assert_eq!(s.kafka.dlq_topic, "smartcar.events.dlq");
        assert_eq!(s.cql.nodes, "127.0.0.1:9042");
        assert_eq!(s.cql.keyspace, "carhook");
        assert_eq!(s.receiver.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.receiver.admin_listen.to_string(), "127.0.0.1:9090");
        assert!(s.receiver.request_timeout_ms < 15_000);
        assert_eq!(s.receiver.idle_timeout_ms, 75_000);
        assert_eq!(s.processor.admin_listen.to_string(), "127.0.0.1:9091");
        assert!(s.kafka.partitions >= 6);
    }

    #[test]
    fn environment_overrides_and_tokens_rotate() {
        let s = Settings::load_from(
            None,
            env(&[
                ("CARHOOK__KAFKA__EVENTS_TOPIC", "t1"),
                ("CARHOOK__SMARTCAR__MANAGEMENT_TOKENS", "new,old"),
                ("CARHOOK__RECEIVER__MAX_BODY_BYTES", "2048"),
            ]),
        );
        let s = s.map_err(|e| e.to_string());
        assert_eq!(s.as_ref().map(|s| s.kafka.events_topic.as_str()), Ok("t1"));
        assert_eq!(s.as_ref().map(|s| s.receiver.max_body_bytes), Ok(2048));
        assert_eq!(
            s.as_ref()
                .map(|s| s.smartcar.tokens().map(|t| t.len()).ok()),
            Ok(Some(2))
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = |pairs: &[(&str, &str)]| {
            Settings::load_from(None, env(pairs))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err(&[("CARHOOK__RECEIVER__MAX_BODY_BYTES", "lots")])
            .contains("receiver.max_body_bytes"));
        assert!(err(&[("CARHOOK__RECEIVER__LISTEN", "nowhere")]).contains("receiver.listen"));
        assert!(
            err(&[("CARHOOK__RECEIVER__ADMIN_LISTEN", "127.0.0.1:8080")])
                .contains("receiver.admin_listen")
        );
        assert!(err(&[("CARHOOK__RECEIVER__REQUEST_TIMEOUT_MS", "15000")])
            .contains("receiver.request_timeout_ms"));
        assert!(err(&[("CARHOOK__RECEIVER__HEADER_TIMEOUT_MS", "9000")])
            .contains("receiver.header_timeout_ms"));
        assert!(err(&[("CARHOOK__RECEIVER__IDLE_TIMEOUT_MS", "10")])
            .contains("receiver.idle_timeout_ms"));
        assert!(
            err(&[("CARHOOK__RECEIVER__MAX_BODY_READS", "0")]).contains("receiver.max_body_reads")
        );
        assert!(
            err(&[("CARHOOK__KAFKA__EVENTS_TOPIC", "bad topic!")]).contains("kafka.events_topic")
        );
        assert!(err(&[("CARHOOK__CQL__KEYSPACE", "1x")]).contains("cql.keyspace"));
        assert!(err(&[("CARHOOK__KAFKA__BROKER", "x")]).contains("broker"));
        let no_tokens = Settings::load_from(None, env(&[]))
            .map(|s| s.smartcar.tokens().err().map(|e| e.to_string()));
        assert!(matches!(no_tokens, Ok(Some(m)) if m.contains("smartcar.management_tokens")));
    }
}
