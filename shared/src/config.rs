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
    /// A secret or certificate file that cannot be read: start-up stops (exit 2).
    #[error("configuration key `{key}`: cannot read {path}: {source}")]
    File {
        key: &'static str,
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
    pub poller: PollerSettings,
    pub telemetry: TelemetrySettings,
}

/// Smartcar credentials: the webhook's management tokens and the REST API's client credentials.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SmartcarSettings {
    /// Comma-separated Application Management Tokens, current first.
    pub management_tokens: Option<SecretString>,
    /// Alternatively, a file holding the same comma-separated list (e.g. a mounted Secret).
    pub management_tokens_file: Option<PathBuf>,
    /// V3 API client id (`client_…`), for the application token (client credentials). Required
    /// by the poller only.
    pub client_id: Option<String>,
    /// The client secret from the environment; prefer [`SmartcarSettings::client_secret_file`].
    pub client_secret: Option<SecretString>,
    /// A file holding the client secret (a mounted Secret); read at start-up.
    pub client_secret_file: Option<PathBuf>,
    /// OAuth2 token endpoint for the client-credentials grant.
    pub token_url: String,
    /// Base of the V3 vehicle API (`{vehicle_api_url}/vehicles/{id}/signals`).
    pub vehicle_api_url: String,
    /// Longest one API or token request may take (Smartcar documents slow vehicle reads).
    pub api_timeout_ms: u64,
    /// The token is minted again this long before it expires.
    pub token_refresh_margin_secs: u64,
}

impl Default for SmartcarSettings {
    fn default() -> Self {
        Self {
            management_tokens: None,
            management_tokens_file: None,
            client_id: None,
            client_secret: None,
            client_secret_file: None,
            token_url: "https://iam.smartcar.com/oauth2/token".into(),
            vehicle_api_url: "https://vehicle.api.smartcar.com/v3".into(),
            api_timeout_ms: 60_000,
            token_refresh_margin_secs: 300,
        }
    }
}

impl std::fmt::Debug for SmartcarSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmartcarSettings")
            .field(
                "management_tokens",
                &self.management_tokens.as_ref().map(|_| "[redacted]"),
            )
            .field("management_tokens_file", &self.management_tokens_file)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("client_secret_file", &self.client_secret_file)
            .field("token_url", &self.token_url)
            .field("vehicle_api_url", &self.vehicle_api_url)
            .field("api_timeout_ms", &self.api_timeout_ms)
            .field("token_refresh_margin_secs", &self.token_refresh_margin_secs)
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

    /// The REST API's client credentials, required by the poller only: (client id, secret).
    pub fn client_credentials(&self) -> Result<(String, SecretString), ConfigError> {
        let id = self
            .client_id
            .clone()
            .filter(|id| !id.trim().is_empty())
            .ok_or_else(|| {
                invalid(
                    "smartcar.client_id",
                    "is required by the poller (CARHOOK__SMARTCAR__CLIENT_ID)",
                )
            })?;
        let secret = self.client_secret.clone().ok_or_else(|| {
            invalid(
                "smartcar.client_secret_file",
                "is required by the poller (CARHOOK__SMARTCAR__CLIENT_SECRET_FILE, a mounted Secret)",
            )
        })?;
        Ok((id, secret))
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
    /// Compacted changelog of vehicle state documents, keyed by vehicle (see the README's
    /// "Following vehicle state").
    pub state_topic: String,
    /// Short-retention topic keeping raw bytes of rejected deliveries for diagnosis.
    pub quarantine_topic: String,
    /// Durable poll requests for the poller, keyed by vehicle.
    pub poll_topic: String,
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
    /// How clients reach the brokers: plaintext, ssl, sasl_plaintext or sasl_ssl.
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism (required with sasl_*): PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    /// The SASL password from the environment; prefer [`KafkaSettings::sasl_password_file`].
    pub sasl_password: Option<SecretString>,
    /// A file holding the SASL password (a mounted Secret); read at start-up.
    pub sasl_password_file: Option<PathBuf>,
    /// PEM CA bundle that signs the brokers' certificates (default: the system's).
    pub ssl_ca_file: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS.
    pub ssl_certificate_file: Option<PathBuf>,
    pub ssl_key_file: Option<PathBuf>,
    /// A file holding the client key's passphrase, when it has one.
    pub ssl_key_password_file: Option<PathBuf>,
    /// The client key's passphrase from the environment.
    pub ssl_key_password: Option<SecretString>,
    /// Check that the broker certificate names the host connected to (`https`); turn off only
    /// for brokers whose certificates do not carry their advertised names.
    pub ssl_endpoint_identification: bool,
    /// Other librdkafka properties, passed through as given (keys with `.`; in the environment
    /// `CARHOOK__KAFKA__PROPERTIES__SOCKET_TIMEOUT_MS` is `socket.timeout.ms`). Properties that
    /// carhook sets itself for its guarantees are refused.
    pub properties: std::collections::BTreeMap<String, String>,
}

/// Kafka `security.protocol`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    #[serde(alias = "PLAINTEXT")]
    Plaintext,
    #[serde(alias = "SSL")]
    Ssl,
    #[serde(alias = "SASL_PLAINTEXT")]
    SaslPlaintext,
    #[serde(alias = "SASL_SSL")]
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

/// Kafka `sasl.mechanism`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN", alias = "plain")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256", alias = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512", alias = "scram-sha-512")]
    ScramSha512,
    /// Recognised so the refusal can say why: this build's librdkafka has no OIDC token
    /// retrieval (it is built without libcurl).
    #[serde(rename = "OAUTHBEARER", alias = "oauthbearer")]
    OauthBearer,
}

impl SaslMechanism {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::OauthBearer => "OAUTHBEARER",
        }
    }
}

/// librdkafka properties carhook sets for its guarantees (or from its own keys): a pass-through
/// value for one of them is refused, naming the reason.
pub const OWNED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "use kafka.brokers"),
    ("acks", "acks=all is what a 200 promises"),
    ("request.required.acks", "acks=all is what a 200 promises"),
    (
        "enable.idempotence",
        "idempotence keeps retried produces single",
    ),
    ("transactional.id", "set per processor instance for fencing"),
    ("transaction.timeout.ms", "carhook sizes its transactions"),
    ("isolation.level", "consumers read committed records only"),
    (
        "enable.auto.commit",
        "offsets are committed in the transaction",
    ),
    (
        "enable.auto.offset.store",
        "offsets are stored after effects",
    ),
    ("group.id", "use kafka.consumer_group"),
    (
        "partitioner",
        "vehicle keys must partition like Java clients",
    ),
    ("message.timeout.ms", "use kafka.delivery_timeout_ms"),
    (
        "max.in.flight.requests.per.connection",
        "bounded by idempotence",
    ),
    ("max.in.flight", "bounded by idempotence"),
    ("security.protocol", "use kafka.security_protocol"),
    ("sasl.mechanism", "use kafka.sasl_mechanism"),
    ("sasl.mechanisms", "use kafka.sasl_mechanism"),
    ("sasl.username", "use kafka.sasl_username"),
    ("sasl.password", "use kafka.sasl_password_file"),
    ("ssl.ca.location", "use kafka.ssl_ca_file"),
    ("ssl.certificate.location", "use kafka.ssl_certificate_file"),
    ("ssl.key.location", "use kafka.ssl_key_file"),
    ("ssl.key.password", "use kafka.ssl_key_password_file"),
    (
        "ssl.endpoint.identification.algorithm",
        "use kafka.ssl_endpoint_identification",
    ),
];

impl Default for KafkaSettings {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            events_topic: "smartcar.events".into(),
            dlq_topic: "smartcar.events.dlq".into(),
            actions_topic: "smartcar.actions".into(),
            state_topic: "smartcar.vehicle-state".into(),
            quarantine_topic: "smartcar.events.quarantine".into(),
            poll_topic: "smartcar.poll-requests".into(),
            partitions: 6,
            replication_factor: 1,
            events_retention_hours: 7 * 24,
            dlq_retention_hours: 14 * 24,
            quarantine_retention_hours: 24,
            create_topics: true,
            delivery_timeout_ms: 5_000,
            linger_ms: 2,
            consumer_group: "carhook-processor".into(),
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            sasl_password_file: None,
            ssl_ca_file: None,
            ssl_certificate_file: None,
            ssl_key_file: None,
            ssl_key_password_file: None,
            ssl_key_password: None,
            ssl_endpoint_identification: true,
            properties: std::collections::BTreeMap::new(),
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
    /// Password authentication: the role name, and its password from the environment or (better)
    /// a file.
    pub username: Option<String>,
    pub password: Option<SecretString>,
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle that signs the nodes' certificates: setting it turns TLS on. Certificates
    /// are checked against the CA and the node's IP address.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for nodes that require client certificates.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// The datacenter this deployment runs in: requests are coordinated there only, never failing
    /// over to another (LOCAL_QUORUM and LOCAL_SERIAL claims are linearizable only when every
    /// processor coordinates in one datacenter). Required when the replication names several.
    pub local_datacenter: Option<String>,
    /// Consistency of reads and writes.
    pub consistency: CqlConsistency,
    /// Consistency of the claims' Paxos round.
    pub serial_consistency: CqlSerialConsistency,
}

/// Read/write consistency levels that keep claims and state exact (anything weaker than a quorum
/// could lose an acknowledged write).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CqlConsistency {
    #[default]
    LocalQuorum,
    Quorum,
    EachQuorum,
    All,
}

/// Serial consistency of lightweight transactions.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CqlSerialConsistency {
    #[default]
    LocalSerial,
    Serial,
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
            username: None,
            password: None,
            password_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            local_datacenter: None,
            consistency: CqlConsistency::LocalQuorum,
            serial_consistency: CqlSerialConsistency::LocalSerial,
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
    /// Records collected per batch at most; a transaction commits once its records reach it.
    pub batch_max: usize,
    /// How long to wait to fill a batch.
    pub batch_wait_ms: u64,
    /// How long processed records wait for their transaction (offsets, actions, dead letters) while
    /// more batches are processed: longer means fewer transactions, and fewer batches held back
    /// behind a commit. A record's state is written when it is processed, not when it commits.
    pub commit_interval_ms: u64,
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
    /// How far a car's or Smartcar's clock may run ahead of receive time before the timestamp is
    /// not trusted (the next clock is used instead).
    pub max_clock_skew_ms: u64,
    /// Write a record to the state changelog (`kafka.state_topic`) for every event that changed a
    /// vehicle's state, in the same transaction as the offsets. Off by default: it costs a fifth (4 KB
    /// events) to two fifths (50 KB) of the drain rate today (README, "Following vehicle state").
    pub changelog: bool,
    /// Memory the changelog's vehicle views may take, in bytes (estimated from their documents
    /// and cells): past it the least recently used views whose last record is committed are
    /// dropped, and read back from the changelog when their vehicle's next event comes (README,
    /// "Following vehicle state").
    pub changelog_cache_bytes: u64,
}

impl Default for ProcessorSettings {
    fn default() -> Self {
        Self {
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            instance_id: "processor-0".into(),
            batch_max: 500,
            batch_wait_ms: 10,
            commit_interval_ms: 100,
            concurrency: 32,
            max_attempts: 3,
            logic_version: 1,
            rate_limit_backoff_secs: 900,
            max_backoff_ms: 30_000,
            shutdown_grace_ms: 20_000,
            max_clock_skew_ms: 60_000,
            changelog: false,
            changelog_cache_bytes: 32 * 1024 * 1024,
        }
    }
}

/// The REST poller (`processor poll run`): budgets that are never exceeded, and its triggers.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PollerSettings {
    /// Poller `/health`, `/ready`, `/metrics`.
    pub admin_listen: SocketAddr,
    /// Consumer group reading the poll-request topic.
    pub consumer_group: String,
    /// Global token bucket: requests that may be made at once (Smartcar's default: 120).
    pub bucket_capacity: u32,
    /// Global token bucket: one request is added back every this many milliseconds
    /// (Smartcar's default 2/min is 30000).
    pub bucket_refill_ms: u64,
    /// Per vehicle: at least this long between two polls.
    pub min_interval_secs: u64,
    /// Per vehicle: at most this many polls per calendar month (UTC).
    pub monthly_cap: u32,
    /// A `retry-after` longer than this is capped (a 429 waits at most this long).
    pub max_retry_after_secs: u64,
    /// A 429 without `retry-after` waits this long for its scope.
    pub default_retry_after_secs: u64,
    /// 5xx and transport failures: first back-off (doubled each try, full jitter).
    pub backoff_base_ms: u64,
    /// 5xx and transport failures: longest back-off.
    pub backoff_max_ms: u64,
    /// 5xx and transport failures: tries of one request in all.
    pub max_tries: u32,
    /// Requests polled at once.
    pub concurrency: usize,
    /// Receiver: a vehicle answered 503 for longer than this (Smartcar's retry window, ~3 min)
    /// gets a poll once the receiver recovers.
    pub outage_window_secs: u64,
    /// Receiver: vehicles remembered after a 503 (beyond it, the oldest are forgotten and counted).
    pub outage_max_vehicles: usize,
    /// Safety net: these signal codes (comma-separated, e.g.
    /// `tractionbattery-stateofcharge,odometer-traveleddistance`)…
    pub safety_net_signals: String,
    /// …older than this on a vehicle…
    pub safety_net_max_age_secs: u64,
    /// …that had a webhook within this long (a polled event does not count) get a poll (0 turns
    /// the safety net off).
    pub safety_net_active_secs: u64,
    /// How often the safety net looks.
    pub safety_net_every_secs: u64,
}

impl Default for PollerSettings {
    fn default() -> Self {
        Self {
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9095)),
            consumer_group: "carhook-poller".into(),
            bucket_capacity: 120,
            bucket_refill_ms: 30_000,
            min_interval_secs: 1_800,
            monthly_cap: 500,
            max_retry_after_secs: 3_600,
            default_retry_after_secs: 60,
            backoff_base_ms: 30_000,
            backoff_max_ms: 3_600_000,
            max_tries: 3,
            concurrency: 8,
            outage_window_secs: 175,
            outage_max_vehicles: 100_000,
            safety_net_signals: String::new(),
            safety_net_max_age_secs: 86_400,
            safety_net_active_secs: 0,
            safety_net_every_secs: 600,
        }
    }
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    Grpc,
    #[serde(alias = "http/protobuf")]
    HttpProtobuf,
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Pretty,
}

/// Which per-event log lines (one per webhook delivery, one per processed record) are written.
/// Failures — rejected or unacknowledged deliveries, dead letters, store errors — are always
/// written whole, whatever this says.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum EventLog {
    /// Every event's line.
    #[default]
    All,
    /// A share of successful events (`telemetry.event_log_sample_ratio`), chosen by trace id, so
    /// the receiver and the processor keep or drop the same events.
    Sample,
    /// Only failures; successful events are counted in the metrics, not logged.
    Errors,
}

/// Logging and tracing settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    /// `tracing` filter directive, e.g. `info,carhook_receiver=debug`.
    pub log_level: String,
    /// Per-event lines written at INFO: `all`, `sample` or `errors`.
    pub event_log: EventLog,
    /// With `event_log = sample`: the share of successful events logged, 0.0–1.0.
    pub event_log_sample_ratio: f64,
    /// OTLP endpoint, e.g. `http://otel-collector:4317` (gRPC) or `https://api.vendor.io/v1/traces`
    /// (HTTP). Unset: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`, and
    /// without any nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http_protobuf`. Unset: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` /
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, `http/protobuf`), else gRPC.
    pub otlp_protocol: Option<OtlpProtocol>,
    /// PEM CA bundle for an `https` endpoint signed by a private CA (default: public roots).
    /// Unset: `OTEL_EXPORTER_OTLP_CERTIFICATE`.
    pub otlp_ca_file: Option<PathBuf>,
    /// A file of `key=value,key=value` request headers (an API key: a mounted Secret). Merged
    /// with `OTEL_EXPORTER_OTLP_HEADERS`; this file wins on a clash.
    pub otlp_headers_file: Option<PathBuf>,
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
            event_log: EventLog::All,
            event_log_sample_ratio: 0.01,
            otlp_endpoint: None,
            otlp_protocol: None,
            otlp_ca_file: None,
            otlp_headers_file: None,
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
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        settings.kafka.properties = settings
            .kafka
            .properties
            .into_iter()
            .map(|(k, v)| (k.replace('_', "."), v))
            .collect();
        settings.validate()?;
        settings.read_secrets()?;
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
            ("kafka.state_topic", &k.state_topic),
            ("kafka.quarantine_topic", &k.quarantine_topic),
            ("kafka.poll_topic", &k.poll_topic),
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
        if p.commit_interval_ms > 10_000 {
            return Err(invalid(
                "processor.commit_interval_ms",
                "must be at most 10000 (records wait that long for their offsets, actions and dead letters)",
            ));
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
        if !(1_000..=86_400_000).contains(&p.max_clock_skew_ms) {
            return Err(invalid(
                "processor.max_clock_skew_ms",
                "must be between 1000 and 86400000 (one day)",
            ));
        }
        if p.instance_id.trim().is_empty() {
            return Err(invalid("processor.instance_id", "is empty"));
        }
        self.poller.validate()?;
        let sc = &self.smartcar;
        for (key, url) in [
            ("smartcar.token_url", &sc.token_url),
            ("smartcar.vehicle_api_url", &sc.vehicle_api_url),
        ] {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err(invalid(key, format!("{url:?} is not an http(s) URL")));
            }
        }
        if sc.api_timeout_ms == 0 {
            return Err(invalid("smartcar.api_timeout_ms", "must be positive"));
        }
        self.kafka.validate_security()?;
        self.cql.validate_security()?;
        if !(0.0..=1.0).contains(&self.telemetry.sampling_ratio) {
            return Err(invalid(
                "telemetry.sampling_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        if !(0.0..=1.0).contains(&self.telemetry.event_log_sample_ratio) {
            return Err(invalid(
                "telemetry.event_log_sample_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        Ok(())
    }
}

impl Settings {
    /// The poller refuses to start without client credentials (exit 2, naming the key).
    pub fn client_credentials_check(&self) -> Result<(), ConfigError> {
        self.smartcar.client_credentials().map(drop)
    }
}

impl PollerSettings {
    /// The safety net's signal codes.
    pub fn safety_net_codes(&self) -> Vec<String> {
        self.safety_net_signals
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.bucket_capacity == 0 {
            return Err(invalid("poller.bucket_capacity", "must be positive"));
        }
        if self.bucket_refill_ms == 0 {
            return Err(invalid("poller.bucket_refill_ms", "must be positive"));
        }
        if self.monthly_cap == 0 {
            return Err(invalid("poller.monthly_cap", "must be positive"));
        }
        if self.max_tries == 0 {
            return Err(invalid("poller.max_tries", "must be positive"));
        }
        if !(1..=256).contains(&self.concurrency) {
            return Err(invalid("poller.concurrency", "must be between 1 and 256"));
        }
        if self.backoff_base_ms == 0 || self.backoff_base_ms > self.backoff_max_ms {
            return Err(invalid(
                "poller.backoff_base_ms",
                "must be positive and at most poller.backoff_max_ms",
            ));
        }
        if self.outage_max_vehicles == 0 {
            return Err(invalid("poller.outage_max_vehicles", "must be positive"));
        }
        if self.safety_net_every_secs == 0 {
            return Err(invalid("poller.safety_net_every_secs", "must be positive"));
        }
        Ok(())
    }
}

impl Settings {
    /// Reads the secret files into their values and checks that every certificate file can be
    /// read, so a missing mount stops start-up naming its key instead of failing a handshake later.
    fn read_secrets(&mut self) -> Result<(), ConfigError> {
        let sc = &mut self.smartcar;
        if let Some(path) = &sc.client_secret_file {
            sc.client_secret = Some(read_secret("smartcar.client_secret_file", path)?);
        }
        let k = &mut self.kafka;
        if let Some(path) = &k.sasl_password_file {
            k.sasl_password = Some(read_secret("kafka.sasl_password_file", path)?);
        }
        if let Some(path) = &k.ssl_key_password_file {
            k.ssl_key_password = Some(read_secret("kafka.ssl_key_password_file", path)?);
        }
        for (key, path) in [
            ("kafka.ssl_ca_file", &k.ssl_ca_file),
            ("kafka.ssl_certificate_file", &k.ssl_certificate_file),
            ("kafka.ssl_key_file", &k.ssl_key_file),
        ] {
            if let Some(path) = path {
                readable(key, path)?;
            }
        }
        let t = &self.telemetry;
        for (key, path) in [
            ("telemetry.otlp_ca_file", &t.otlp_ca_file),
            ("telemetry.otlp_headers_file", &t.otlp_headers_file),
        ] {
            if let Some(path) = path {
                readable(key, path)?;
            }
        }
        let c = &mut self.cql;
        if let Some(path) = &c.password_file {
            c.password = Some(read_secret("cql.password_file", path)?);
        }
        for (key, path) in [
            ("cql.tls_ca_file", &c.tls_ca_file),
            ("cql.tls_cert_file", &c.tls_cert_file),
            ("cql.tls_key_file", &c.tls_key_file),
        ] {
            if let Some(path) = path {
                readable(key, path)?;
            }
        }
        Ok(())
    }
}

/// A secret file's content, without the trailing newline a mounted Secret often has.
pub fn read_secret(key: &'static str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File {
        key,
        path: path.to_path_buf(),
        source,
    })?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(ConfigError::File {
            key,
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "the file is empty"),
        });
    }
    Ok(SecretString::from(value.to_string()))
}

fn readable(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| ConfigError::File {
            key,
            path: path.to_path_buf(),
            source,
        })
}

impl KafkaSettings {
    /// Combinations that cannot work, refused before connecting.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let p = self.security_protocol;
        match (p.uses_sasl(), self.sasl_mechanism) {
            (true, None) => {
                return Err(invalid(
                    "kafka.sasl_mechanism",
                    format!(
                        "is required with security_protocol {} (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)",
                        p.as_str()
                    ),
                ))
            }
            (false, Some(m)) => {
                return Err(invalid(
                    "kafka.sasl_mechanism",
                    format!(
                        "{} is set but security_protocol {} does not use SASL",
                        m.as_str(),
                        p.as_str()
                    ),
                ))
            }
            (true, Some(SaslMechanism::OauthBearer)) => {
                return Err(invalid(
                    "kafka.sasl_mechanism",
                    "OAUTHBEARER needs librdkafka's OIDC token retrieval, which this build lacks (no libcurl); use SCRAM or PLAIN",
                ))
            }
            (true, Some(_)) => {
                if self.sasl_username.as_deref().is_none_or(str::is_empty) {
                    return Err(invalid("kafka.sasl_username", "is required with SASL"));
                }
                if self.sasl_password.is_none() && self.sasl_password_file.is_none() {
                    return Err(invalid(
                        "kafka.sasl_password_file",
                        "is required with SASL (or kafka.sasl_password)",
                    ));
                }
            }
            (false, None) => {}
        }
        if !p.uses_tls() {
            for (key, set) in [
                ("kafka.ssl_ca_file", self.ssl_ca_file.is_some()),
                (
                    "kafka.ssl_certificate_file",
                    self.ssl_certificate_file.is_some(),
                ),
                ("kafka.ssl_key_file", self.ssl_key_file.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        key,
                        format!(
                            "is set but security_protocol {} does not use TLS (ssl or sasl_ssl)",
                            p.as_str()
                        ),
                    ));
                }
            }
        }
        if self.ssl_certificate_file.is_some() != self.ssl_key_file.is_some() {
            return Err(invalid(
                "kafka.ssl_key_file",
                "a client certificate and its key come together (kafka.ssl_certificate_file and kafka.ssl_key_file)",
            ));
        }
        for name in self.properties.keys() {
            if let Some((_, why)) = OWNED_KAFKA_PROPERTIES.iter().find(|(k, _)| k == name) {
                return Err(ConfigError::Invalid {
                    key: "kafka.properties",
                    problem: format!("`{name}` is set by carhook: {why}"),
                });
            }
        }
        Ok(())
    }
}

impl CqlSettings {
    fn validate_security(&self) -> Result<(), ConfigError> {
        let has_password = self.password.is_some() || self.password_file.is_some();
        match (
            self.username.as_deref().is_some_and(|u| !u.is_empty()),
            has_password,
        ) {
            (true, false) => {
                return Err(invalid(
                    "cql.password_file",
                    "is required with cql.username (or cql.password)",
                ))
            }
            (false, true) => return Err(invalid("cql.username", "is required with a password")),
            _ => {}
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(invalid(
                "cql.tls_key_file",
                "a client certificate and its key come together (cql.tls_cert_file and cql.tls_key_file)",
            ));
        }
        if self.tls_cert_file.is_some() && self.tls_ca_file.is_none() {
            return Err(invalid(
                "cql.tls_ca_file",
                "is required with a client certificate (it turns TLS on)",
            ));
        }
        let dcs = replication_datacenters(&self.replication);
        if dcs.len() > 1 && self.local_datacenter.is_none() {
            return Err(invalid(
                "cql.local_datacenter",
                format!(
                    "is required: cql.replication names datacenters {dcs:?}, and claims are exact only when every processor coordinates in one"
                ),
            ));
        }
        if let Some(dc) = &self.local_datacenter {
            if !dcs.is_empty() && !dcs.contains(dc) {
                return Err(invalid(
                    "cql.local_datacenter",
                    format!("{dc:?} is not one of the datacenters in cql.replication {dcs:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// The datacenters a `NetworkTopologyStrategy` replication map names (empty for other classes).
pub fn replication_datacenters(replication: &str) -> Vec<String> {
    if !replication.contains("NetworkTopologyStrategy") {
        return Vec::new();
    }
    replication
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .split(',')
        .filter_map(|pair| pair.split_once(':'))
        .map(|(k, _)| k.trim().trim_matches(['\'', '"']).to_string())
        .filter(|k| k != "class" && k != "replication_factor")
        .collect()
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
        assert!(err(&[("CARHOOK__PROCESSOR__COMMIT_INTERVAL_MS", "60000")])
            .contains("processor.commit_interval_ms"));
        assert!(err(&[("CARHOOK__KAFKA__BROKER", "x")]).contains("broker"));
        // Security combinations that cannot work, each naming its key.
        assert!(err(&[("CARHOOK__KAFKA__SECURITY_PROTOCOL", "sasl_ssl")])
            .contains("kafka.sasl_mechanism"));
        assert!(err(&[
            ("CARHOOK__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
            ("CARHOOK__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
            ("CARHOOK__KAFKA__SASL_USERNAME", "carhook"),
        ])
        .contains("kafka.sasl_password_file"));
        assert!(err(&[
            ("CARHOOK__KAFKA__SECURITY_PROTOCOL", "sasl_ssl"),
            ("CARHOOK__KAFKA__SASL_MECHANISM", "OAUTHBEARER"),
        ])
        .contains("OIDC"));
        assert!(err(&[("CARHOOK__KAFKA__SASL_MECHANISM", "PLAIN")]).contains("does not use SASL"));
        assert!(err(&[("CARHOOK__KAFKA__SSL_CA_FILE", "/etc/ssl/ca.pem")])
            .contains("kafka.ssl_ca_file"));
        assert!(err(&[("CARHOOK__KAFKA__SECURITY_PROTOCOL", "tls")])
            .contains("kafka.security_protocol"));
        assert!(
            err(&[("CARHOOK__KAFKA__PROPERTIES__ENABLE_IDEMPOTENCE", "false")])
                .contains("`enable.idempotence` is set by carhook")
        );
        assert!(err(&[("CARHOOK__CQL__USERNAME", "carhook")]).contains("cql.password_file"));
        assert!(err(&[("CARHOOK__CQL__TLS_CERT_FILE", "/c.pem")]).contains("cql.tls_key_file"));
        assert!(err(&[("CARHOOK__CQL__CONSISTENCY", "one")]).contains("cql.consistency"));
        let two_dcs = "{'class': 'NetworkTopologyStrategy', 'eu-west': 3, 'us-east': 3}";
        assert!(err(&[("CARHOOK__CQL__REPLICATION", two_dcs)]).contains("cql.local_datacenter"));
        assert!(err(&[
            ("CARHOOK__CQL__REPLICATION", two_dcs),
            ("CARHOOK__CQL__LOCAL_DATACENTER", "ap-south"),
        ])
        .contains("not one of the datacenters"));
        let no_tokens = Settings::load_from(None, env(&[]))
            .map(|s| s.smartcar.tokens().err().map(|e| e.to_string()));
        assert!(matches!(no_tokens, Ok(Some(m)) if m.contains("smartcar.management_tokens")));
    }

    /// Secrets come from files (a trailing newline dropped), a missing file stops start-up naming
    /// its key, and no secret shows in `Debug`.
    #[test]
    fn secrets_are_read_from_files_and_never_printed() {
        let dir = std::env::temp_dir().join(format!("carhook-secrets-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let kafka = dir.join("kafka-password");
        let cql = dir.join("cql-password");
        let _ = std::fs::write(&kafka, "kafka-s3cret\n");
        let _ = std::fs::write(&cql, "cql-s3cret");
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let (kafka_path, cql_path) = (path(&kafka), path(&cql));
        let s = Settings::load_from(
            None,
            env(&[
                ("CARHOOK__KAFKA__SECURITY_PROTOCOL", "SASL_SSL"),
                ("CARHOOK__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512"),
                ("CARHOOK__KAFKA__SASL_USERNAME", "carhook"),
                ("CARHOOK__KAFKA__SASL_PASSWORD_FILE", &kafka_path),
                ("CARHOOK__KAFKA__PROPERTIES__SOCKET_TIMEOUT_MS", "30000"),
                ("CARHOOK__CQL__USERNAME", "carhook"),
                ("CARHOOK__CQL__PASSWORD_FILE", &cql_path),
            ]),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        use secrecy::ExposeSecret;
        assert_eq!(
            s.kafka.sasl_password.as_ref().map(|p| p.expose_secret()),
            Some("kafka-s3cret")
        );
        assert_eq!(
            s.cql.password.as_ref().map(|p| p.expose_secret()),
            Some("cql-s3cret")
        );
        assert_eq!(
            s.kafka
                .properties
                .get("socket.timeout.ms")
                .map(String::as_str),
            Some("30000")
        );
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "a secret in Debug: {shown}");
        let missing = Settings::load_from(
            None,
            env(&[
                ("CARHOOK__CQL__USERNAME", "carhook"),
                ("CARHOOK__CQL__PASSWORD_FILE", "/nonexistent/cql-password"),
            ]),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            missing.contains("cql.password_file") && missing.contains("/nonexistent/cql-password"),
            "{missing}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn replication_names_its_datacenters() {
        assert_eq!(
            replication_datacenters("{'class': 'NetworkTopologyStrategy', 'dc1': 3, \"dc2\": 2}"),
            vec!["dc1".to_string(), "dc2".to_string()]
        );
        assert!(
            replication_datacenters("{'class': 'SimpleStrategy', 'replication_factor': 1}")
                .is_empty()
        );
    }
}
