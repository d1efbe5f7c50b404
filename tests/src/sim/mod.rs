//! smartcar-sim: realistic signed traffic, ground truth, and the comparison with what the system holds.
//!
//! - [`generate`]: events from a seed, with fault mixes, in both payload shapes.
//! - [`send`]: delivering them like Smartcar (concurrent, retries after 25/50/100 s, scalable).
//! - [`truth`]: what the system must hold afterwards, from the simulator's own model.
//! - [`check`]: the readable diff between truth and the system, read from CQL and Kafka directly.
//! - [`hmac`]: the simulator's own HMAC-SHA256 (independent of the code under test).
//! - [`target`]: the webhook URL (`http://` or `https://`, `--ca-file`) and its client.
//! - [`api`]: a fake Smartcar V3 REST API (token, signals, connections) with injectable faults.
//! - [`load`]: fixed-rate or fixed-concurrency load with HDR latency percentiles.

pub mod api;
pub mod check;
pub mod generate;
pub mod hmac;
pub mod load;
pub mod send;
pub mod target;
pub mod truth;

use std::collections::BTreeMap;

/// Everything a `send` run leaves for `check`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Run {
    pub seed: u64,
    pub faults: generate::Faults,
    pub report: send::SendReport,
    pub deliveries: Vec<send::Delivery>,
    pub truth: truth::Truth,
}

impl Run {
    /// Builds the run record from what was sent and how it went.
    pub fn new(
        seed: u64,
        faults: generate::Faults,
        events: &[generate::SimEvent],
        deliveries: Vec<send::Delivery>,
        report: send::SendReport,
    ) -> Self {
        let acked: BTreeMap<String, u32> = deliveries
            .iter()
            .filter(|d| d.acknowledged)
            .map(|d| (d.event_id.clone(), d.acked_attempt.unwrap_or(0)))
            .collect();
        let truth = truth::Truth::compute(events, &acked);
        Self {
            seed,
            faults,
            report,
            deliveries,
            truth,
        }
    }
}
