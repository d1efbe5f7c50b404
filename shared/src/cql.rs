//! CQL session construction and the project's schema migrations.
//!
//! Migrations are the `.cql` files in `shared/migrations/cql/`, applied in file order and recorded
//! in `{keyspace}.schema_migrations` with a checksum. Every statement is idempotent (`IF NOT EXISTS`),
//! so a crash mid-migration or two instances migrating at once is harmless; a recorded migration
//! whose file changed afterwards is refused, because the deployed schema would no longer match.
//! The same code runs from the services at start, from `processor migrate`, and from the Helm hook Job.

use std::time::Duration;

use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::{Consistency, SerialConsistency};
use sha2::{Digest, Sha256};

use crate::config::{CqlConsistency, CqlSerialConsistency, CqlSettings};
use scylla::policies::load_balancing::DefaultPolicy;

/// The migrations, in order: (version, name, text).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "keyspace",
        include_str!("../migrations/cql/0001_keyspace.cql"),
    ),
    (
        2,
        "processed_events",
        include_str!("../migrations/cql/0002_processed_events.cql"),
    ),
    (
        3,
        "vehicle_state",
        include_str!("../migrations/cql/0003_vehicle_state.cql"),
    ),
    (
        4,
        "redriven_letters",
        include_str!("../migrations/cql/0004_redriven_letters.cql"),
    ),
    (
        5,
        "claim_delivery_and_reconnect_flags",
        include_str!("../migrations/cql/0005_claim_delivery_and_reconnect_flags.cql"),
    ),
    (
        6,
        "poller",
        include_str!("../migrations/cql/0006_poller.cql"),
    ),
    (
        7,
        "vehicle_last_webhook",
        include_str!("../migrations/cql/0007_vehicle_last_webhook.cql"),
    ),
];

/// CQL failures, naming what an operator needs.
#[derive(Debug, thiserror::Error)]
pub enum CqlError {
    #[error("connecting to CQL nodes {nodes}: {source}")]
    Connect {
        nodes: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("migration {version} ({name}): {source}")]
    Migration {
        version: i32,
        name: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("migration {version} ({name}) was applied with checksum {recorded} but the file now has {current}: the schema in keyspace {keyspace} does not match this build")]
    Drift {
        version: i32,
        name: &'static str,
        keyspace: String,
        recorded: String,
        current: String,
    },
}

/// Opens a session with the project's settings: consistency (LOCAL_QUORUM / LOCAL_SERIAL by
/// default), a short request timeout (the driver's 30 s default would stall a consumer loop),
/// password authentication, TLS, and — with `local_datacenter` — requests coordinated in that
/// datacenter only, never failing over (a claim's LOCAL_SERIAL round is exact only when every
/// processor uses the same datacenter).
pub async fn connect(s: &CqlSettings) -> Result<Session, CqlError> {
    use secrecy::ExposeSecret;
    let connect_error = |e: Box<dyn std::error::Error + Send + Sync>| CqlError::Connect {
        nodes: s.nodes.clone(),
        source: e,
    };
    let mut profile = ExecutionProfile::builder()
        .consistency(match s.consistency {
            CqlConsistency::LocalQuorum => Consistency::LocalQuorum,
            CqlConsistency::Quorum => Consistency::Quorum,
            CqlConsistency::EachQuorum => Consistency::EachQuorum,
            CqlConsistency::All => Consistency::All,
        })
        .serial_consistency(Some(match s.serial_consistency {
            CqlSerialConsistency::LocalSerial => SerialConsistency::LocalSerial,
            CqlSerialConsistency::Serial => SerialConsistency::Serial,
        }))
        .request_timeout(Some(Duration::from_millis(s.request_timeout_ms)));
    if let Some(dc) = &s.local_datacenter {
        let policy = DefaultPolicy::builder()
            .prefer_datacenter(dc.clone())
            .permit_dc_failover(false)
            .build();
        profile = profile.load_balancing_policy(policy);
    }
    let nodes: Vec<&str> = s
        .nodes
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    let mut builder = SessionBuilder::new()
        .known_nodes(nodes)
        // Schema metadata of carhook's own keyspace only (token-aware routing needs its
        // replication). By default the driver reads and keeps every keyspace's tables and types:
        // on a shared cluster that is memory and start-up time spent on other applications.
        .keyspaces_to_fetch([s.keyspace.clone()])
        .connection_timeout(Duration::from_secs(5))
        .default_execution_profile_handle(profile.build().into_handle());
    if let (Some(user), Some(password)) = (&s.username, &s.password) {
        builder = builder.user(user, password.expose_secret());
    }
    if let Some(ca) = &s.tls_ca_file {
        builder = builder.tls_context(Some(tls(s, ca).map_err(connect_error)?));
    }
    builder
        .build()
        .await
        .map_err(|e| connect_error(Box::new(e)))
}

/// The TLS connector: the nodes' certificates must chain to `ca` and name the node's IP address
/// (the driver checks it); a client certificate is presented when configured.
fn tls(
    s: &CqlSettings,
    ca: &std::path::Path,
) -> Result<openssl::ssl::SslConnectorBuilder, Box<dyn std::error::Error + Send + Sync>> {
    use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
    let file_error = |key: &str, path: &std::path::Path, e: openssl::error::ErrorStack| {
        format!("configuration key `{key}`: {}: {e}", path.display())
    };
    let mut b = SslConnector::builder(SslMethod::tls())?;
    b.set_ca_file(ca)
        .map_err(|e| file_error("cql.tls_ca_file", ca, e))?;
    if let (Some(cert), Some(key)) = (&s.tls_cert_file, &s.tls_key_file) {
        b.set_certificate_chain_file(cert)
            .map_err(|e| file_error("cql.tls_cert_file", cert, e))?;
        b.set_private_key_file(key, SslFiletype::PEM)
            .map_err(|e| file_error("cql.tls_key_file", key, e))?;
    }
    b.set_verify(SslVerifyMode::PEER);
    Ok(b)
}

fn render(text: &str, s: &CqlSettings) -> String {
    text.replace("{keyspace}", &s.keyspace)
        .replace("{replication}", &s.replication)
}

fn statements(text: &str) -> Vec<String> {
    // Comments first: a ';' inside a comment must not split a statement.
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn checksum(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Applies every migration not yet recorded. Returns the versions applied now.
pub async fn migrate(session: &Session, s: &CqlSettings) -> Result<Vec<i32>, CqlError> {
    let mut applied = Vec::new();
    for &(version, name, text) in MIGRATIONS {
        let wrap = |e: Box<dyn std::error::Error + Send + Sync>| CqlError::Migration {
            version,
            name,
            source: e,
        };
        let sum = checksum(text);
        // The keyspace must exist before the ledger can; version 1 creates it and is safe to repeat.
        if version > 1 {
            if let Some(recorded) = recorded_checksum(session, s, version).await.map_err(wrap)? {
                if recorded != sum {
                    return Err(CqlError::Drift {
                        version,
                        name,
                        keyspace: s.keyspace.clone(),
                        recorded,
                        current: sum,
                    });
                }
                continue;
            }
        }
        for stmt in statements(&render(text, s)) {
            let adds_column = is_add_column(&stmt);
            match session.query_unpaged(ddl(stmt), ()).await {
                Ok(_) => {}
                // `ALTER TABLE … ADD` has no portable `IF NOT EXISTS` (ScyllaDB lacks it): a column
                // that exists already (another instance migrating concurrently, or a run that
                // stopped before recording the version) is the wanted state.
                Err(e) if adds_column && column_exists(&e.to_string()) => {}
                Err(e) => return Err(wrap(Box::new(e))),
            }
        }
        if version == 1 {
            let ledger = format!(
                "CREATE TABLE IF NOT EXISTS {}.schema_migrations (version int PRIMARY KEY, name text, checksum text, applied_at timestamp)",
                s.keyspace
            );
            session
                .query_unpaged(ddl(ledger), ())
                .await
                .map_err(|e| wrap(Box::new(e)))?;
            if recorded_checksum(session, s, version)
                .await
                .map_err(wrap)?
                .is_some()
            {
                continue;
            }
        }
        let record = format!(
            "INSERT INTO {}.schema_migrations (version, name, checksum, applied_at) VALUES (?, ?, ?, toTimestamp(now()))",
            s.keyspace
        );
        session
            .query_unpaged(ddl(record), (version, name, &sum))
            .await
            .map_err(|e| wrap(Box::new(e)))?;
        tracing::info!(version, name, keyspace = %s.keyspace, "cql migration applied");
        applied.push(version);
    }
    Ok(applied)
}

/// Time a schema statement may take. DDL waits for schema agreement and, on a busy node, takes
/// far longer than a data request: under the data path's short timeout a migration failed with
/// "exceeded a client timeout of 3000ms" on a loaded machine and the processor exited at start.
pub const DDL_TIMEOUT: Duration = Duration::from_secs(60);

/// A migration statement (schema change, or the ledger's read and write) with [`DDL_TIMEOUT`].
fn ddl(text: String) -> scylla::statement::unprepared::Statement {
    let mut st = scylla::statement::unprepared::Statement::new(text);
    st.set_request_timeout(Some(DDL_TIMEOUT));
    st
}

fn is_add_column(stmt: &str) -> bool {
    let s = stmt.trim_start().to_ascii_uppercase();
    s.starts_with("ALTER TABLE") && s.contains(" ADD ")
}

fn column_exists(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("already exist") || m.contains("conflicts with an existing column")
}

async fn recorded_checksum(
    session: &Session,
    s: &CqlSettings,
    version: i32,
) -> Result<Option<String>, Box<dyn std::error::Error + Send + Sync>> {
    let q = format!(
        "SELECT checksum FROM {}.schema_migrations WHERE version = ?",
        s.keyspace
    );
    let rows = session
        .query_unpaged(ddl(q), (version,))
        .await?
        .into_rows_result()?;
    Ok(rows
        .maybe_first_row::<(Option<String>,)>()?
        .and_then(|(c,)| c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_and_render() {
        let s = CqlSettings {
            keyspace: "ks1".into(),
            ..CqlSettings::default()
        };
        let all: Vec<String> = MIGRATIONS
            .iter()
            .flat_map(|(_, _, t)| statements(&render(t, &s)))
            .collect();
        assert!(all.len() >= 5, "{all:?}");
        assert!(all
            .iter()
            .all(|st| !st.contains('{') || st.contains("replication")));
        // Every statement is safe to repeat: `IF NOT EXISTS`, or a column addition whose
        // "already exists" answer the runner accepts.
        assert!(all
            .iter()
            .all(|st| st.contains("IF NOT EXISTS") || is_add_column(st)));
        assert!(column_exists(
            "Invalid column name delivered_at because it conflicts with an existing column"
        ));
        assert!(column_exists(
            "Column with name 'delivered_at' already exists"
        ));
        assert!(all[0].starts_with("CREATE KEYSPACE IF NOT EXISTS ks1"));
    }
}
