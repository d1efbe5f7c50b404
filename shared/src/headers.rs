//! Kafka record header names: the contract between the receiver, the processor and operators' tools.

/// The event's `eventId` (absent when the body has none).
pub const EVENT_ID: &str = "carhook-event-id";
/// The event's `eventType` (or legacy `eventName`).
pub const EVENT_TYPE: &str = "carhook-event-type";
/// `meta.deliveryId`: differs on every Smartcar attempt.
pub const DELIVERY_ID: &str = "carhook-delivery-id";
/// When the receiver accepted the request, epoch milliseconds as decimal text.
pub const RECEIVED_AT: &str = "carhook-received-at";
/// Index of the management token that verified the body (0 = current). Never the token.
pub const TOKEN_INDEX: &str = "carhook-token-index";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// W3C trace state.
pub const TRACESTATE: &str = "tracestate";
/// Where an event record came from: `poll` on records the REST poller produced (absent on
/// webhook records, which the receiver produces).
pub const SOURCE: &str = "carhook-source";
/// A polled record: why the poll was made (`receiver_outage`, `operator`, …).
pub const POLL_REASON: &str = "carhook-poll-reason";

/// Why a quarantined delivery was rejected (signature failure reason).
pub const REJECT_REASON: &str = "carhook-reject-reason";

/// Dead-letter provenance: the topic the record was read from.
pub const DLQ_ORIGINAL_TOPIC: &str = "carhook-dlq-original-topic";
/// Dead-letter provenance: partition of the original record.
pub const DLQ_ORIGINAL_PARTITION: &str = "carhook-dlq-original-partition";
/// Dead-letter provenance: offset of the original record.
pub const DLQ_ORIGINAL_OFFSET: &str = "carhook-dlq-original-offset";
/// Dead-letter provenance: bounded error class (see the processor's `PoisonReason`).
pub const DLQ_ERROR_CLASS: &str = "carhook-dlq-error-class";
/// Dead-letter provenance: human-readable error naming the field or key.
pub const DLQ_ERROR_MESSAGE: &str = "carhook-dlq-error-message";
/// Dead-letter provenance: processing attempts made before giving up.
pub const DLQ_ATTEMPTS: &str = "carhook-dlq-attempts";
/// Dead-letter provenance: first failure time, epoch milliseconds.
pub const DLQ_FIRST_FAILURE_AT: &str = "carhook-dlq-first-failure-at";
/// How many times an operator re-published this record from the dead-letter topic.
pub const REDRIVE_COUNT: &str = "carhook-redrive-count";

/// Action records: which action (`RECONNECT_REQUIRED`, `RECONNECT_RESOLVED`).
pub const ACTION_TYPE: &str = "carhook-action-type";

/// State changelog records: the signal codes whose entry in the document changed, comma-separated
/// (error keys as `error:<key>`).
pub const CHANGED: &str = "carhook-changed";
/// State changelog records: the write timestamp of every cell the document was rendered from
/// (internal, versioned JSON): what a processor restores its view of the vehicle from.
pub const CELL_TIMES: &str = "carhook-cell-times";
/// A carhook control record on the events topic (not a Smartcar event): its kind, e.g.
/// [`CONTROL_REFRESH_STATE`].
pub const CONTROL: &str = "carhook-control";
/// Control kind: re-read the keyed vehicle's state from the store and record it in the state
/// changelog if it differs (what `processor replay --emit-changes` sends after correcting state).
pub const CONTROL_REFRESH_STATE: &str = "refresh-state";
