//! carhook's shared library: every Smartcar rule and every piece of plumbing both services need,
//! written once.
//!
//! - [`signature`]: `SC-Signature` verification, token rotation and the VERIFY challenge.
//! - [`envelope`]: the cheap routing parse the receiver does (key, ids, type) on a verified body.
//! - [`event`]: the full, tolerant event model the processor applies.
//! - [`ids`] and [`clock`]: domain newtypes (event id, vehicle id, signal code, freshness time).
//! - [`config`]: layered settings (defaults < TOML file < `CARHOOK__SECTION__KEY`).
//! - [`headers`]: the Kafka record header names that connect the two services.
//! - [`kafka`] and [`cql`]: client construction, topic provisioning and schema migrations.
//! - [`smartcar_api`]: the Smartcar V3 REST client (application token, signals) and the
//!   normaliser that turns its answers into the webhook signal model.
//! - [`poll_request`]: the durable poll request the poller consumes.
//! - [`telemetry`], [`admin`], [`shutdown`]: logging/tracing, the admin HTTP endpoints, signal handling.

pub mod admin;
pub mod clock;
pub mod config;
pub mod cql;
pub mod cql_trace;
pub mod envelope;
pub mod event;
pub mod headers;
pub mod ids;
pub mod kafka;
pub mod poll_request;
pub mod shutdown;
pub mod signature;
pub mod smartcar_api;
pub mod telemetry;
#[cfg(test)]
mod testkit;
