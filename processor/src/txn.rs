//! librdkafka's blocking transactional calls, made from async code: each call once, with the
//! whole transaction budget, never resumed.
//!
//! librdkafka lets a `commit_transaction` that returned "timed out" be called again to resume the
//! commit running in the background. Resuming is not safe (librdkafka 2.12.1,
//! `rdkafka_txnmgr.c`), and carhook does not do it:
//!
//! - each stage of a call hands an operation to librdkafka's main thread and waits for its result.
//!   A stage that runs out leaves the operation queued; its result, when it comes, is handed to
//!   whichever transactional call is waiting then. A later call can so take an earlier stage's
//!   "success" for its own and return before anything was committed, or find its own transaction
//!   moved to "committing" under it (produce then fails with `Erroneous state`);
//! - a call that runs out in its first stage returns as *not* resumable, and librdkafka forgets the
//!   commit under way even when an earlier call's `EndTxn` is still in flight. When the broker answers
//!   that `EndTxn`, librdkafka takes it for an abort (it tells them apart by the name of the call
//!   under way), attempts `CommittingTransaction -> AbortNotAcked` and aborts the whole process:
//!   `rd_kafka_txn_set_state: BUG: Invalid transaction state transition`.
//!
//! The processor used to resume commits called with a short timeout (0 in a test); two CI runs died
//! of the second case. So every call here gets the whole budget, which only a broker that cannot
//! complete the transaction at all uses up (the broker aborts it at `transaction.timeout.ms`
//! anyway), and a call that runs out is final: the caller treats the producer as unusable and
//! rebuilds its Kafka clients, so no later call can pick up a stale result.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;

/// Whether `e` means the call ran out of time with its operation still under way inside librdkafka.
///
/// rust-rdkafka's `commit_transaction` flushes the producer before it calls librdkafka; that
/// flush running out (`Flush(OperationTimedOut)`) counts too.
pub fn ran_out_of_time(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.code() == RDKafkaErrorCode::OperationTimedOut,
        KafkaError::Flush(code) => *code == RDKafkaErrorCode::OperationTimedOut,
        _ => false,
    }
}

/// Runs one blocking transactional call on the blocking pool with `timeout` (the transaction
/// budget); see the module comment for why it is called once.
pub async fn call<F>(producer: &FutureProducer, timeout: Duration, op: F) -> Result<(), KafkaError>
where
    F: FnOnce(&FutureProducer, Duration) -> Result<(), KafkaError> + Send + 'static,
{
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || op(&producer, timeout))
        .await
        .map_err(|_| KafkaError::Canceled)?
}
