//! Circuit breaker around the Kafka producer.
//!
//! After `failures` consecutive produce failures the circuit opens: requests get 503 at once instead
//! of queueing behind a dead broker. After `open_for`, one probe request is let through (half-open);
//! its success closes the circuit, its failure re-opens it.
//!
//! Two rules keep the breaker from sticking (issue #13):
//! - A probe's outcome is always recorded: [`Admit::Probe`] carries a [`ProbeGuard`] that counts as a
//!   failure when the request is dropped before it records (client gone, HTTP/2 reset, a load
//!   balancer's timeout), so the breaker re-opens and probes again instead of staying half-open.
//! - Requests are not the only probe. Behind a load balancer an unready pod gets no requests, so the
//!   receiver's background broker check calls [`Breaker::broker_healthy`]: a healthy broker closes a
//!   half-open circuit, or an open one whose open period has run out (which counts as half-open).
//!
//! Why it is hand-written while rate limiting (`governor`) and retry (`backon`) come from crates: it
//! is small (three states behind one mutex), every rule above is pinned by the tests below and by the
//! receiver's integration tests, and its states map directly onto what the service reports — `/ready`
//! and `carhook_receiver_circuit_open` follow [`Breaker::is_open`], and the background broker check
//! closes it through [`Breaker::broker_healthy`]. A general-purpose breaker wraps the guarded call
//! and counts its results; the two rules above (an abandoned half-open probe counts as a failure, an
//! outside health check may close the circuit) would have to be rebuilt around it, for less code
//! saved than they take.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// The breaker. Cheap to check; one mutex, no allocation.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    open_for: Duration,
}

/// Permission to try a produce.
#[derive(Debug)]
pub enum Admit {
    /// Circuit closed: go ahead.
    Yes,
    /// Half-open: this request is the probe; record its outcome through the guard.
    Probe(ProbeGuard),
    /// Open: answer 503 now.
    No,
}

/// The half-open probe's obligation to report. Dropped without [`ProbeGuard::record`], it records a
/// failure: an abandoned probe proved nothing, and the next one must be let through after `open_for`.
#[derive(Debug)]
pub struct ProbeGuard {
    breaker: Option<Arc<Breaker>>,
}

impl ProbeGuard {
    /// Records the probe's produce result.
    pub fn record(mut self, ok: bool) {
        if let Some(b) = self.breaker.take() {
            b.record(ok);
        }
    }
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Some(b) = self.breaker.take() {
            tracing::debug!("half-open probe abandoned before its outcome; counted as a failure");
            b.record(false);
        }
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, open_for: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            open_for,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Whether a request may produce now.
    pub fn admit(self: &Arc<Self>) -> Admit {
        let probe = self.with(|s| match *s {
            State::Closed { .. } => Some(false),
            State::Open { until } if Instant::now() >= until => {
                *s = State::HalfOpen;
                Some(true)
            }
            State::Open { .. } | State::HalfOpen => None,
        });
        match probe {
            Some(false) => Admit::Yes,
            Some(true) => Admit::Probe(ProbeGuard {
                breaker: Some(Arc::clone(self)),
            }),
            None => Admit::No,
        }
    }

    /// Records a produce result.
    pub fn record(&self, ok: bool) {
        let (threshold, open_for) = (self.threshold, self.open_for);
        self.with(|s| {
            *s = match (*s, ok) {
                (_, true) => State::Closed { failures: 0 },
                (State::Closed { failures }, false) if failures + 1 < threshold => State::Closed {
                    failures: failures + 1,
                },
                (_, false) => State::Open {
                    until: Instant::now() + open_for,
                },
            }
        });
    }

    /// The background broker check succeeded: close a half-open circuit, or an open one whose
    /// open period is over. A circuit opened moments ago stays open for its full period, so a
    /// broker that answers metadata but fails produces cannot flap the breaker faster than
    /// requests would. Returns whether this closed the circuit.
    pub fn broker_healthy(&self) -> bool {
        self.with(|s| match *s {
            State::HalfOpen => {
                *s = State::Closed { failures: 0 };
                true
            }
            State::Open { until } if Instant::now() >= until => {
                *s = State::Closed { failures: 0 };
                true
            }
            State::Open { .. } | State::Closed { .. } => false,
        })
    }

    /// Whether the circuit is open (or half-open, waiting on its probe).
    pub fn is_open(&self) -> bool {
        self.with(|s| !matches!(s, State::Closed { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_probe(a: &Admit) -> bool {
        matches!(a, Admit::Probe(_))
    }

    #[test]
    fn opens_after_threshold_and_probes_after_cooldown() {
        let b = Breaker::new(3, Duration::from_millis(20));
        b.record(false);
        b.record(false);
        assert!(matches!(b.admit(), Admit::Yes));
        b.record(false);
        assert!(b.is_open());
        assert!(matches!(b.admit(), Admit::No));
        std::thread::sleep(Duration::from_millis(25));
        let probe = b.admit();
        assert!(is_probe(&probe));
        assert!(matches!(b.admit(), Admit::No), "only one probe at a time");
        if let Admit::Probe(g) = probe {
            g.record(true);
        }
        assert!(!b.is_open());
        assert!(matches!(b.admit(), Admit::Yes));
    }

    #[test]
    fn failed_probe_reopens() {
        let b = Breaker::new(1, Duration::from_millis(1));
        b.record(false);
        std::thread::sleep(Duration::from_millis(2));
        if let Admit::Probe(g) = b.admit() {
            g.record(false);
        } else {
            panic!("expected a probe");
        }
        assert!(matches!(b.admit(), Admit::No));
    }

    #[test]
    fn abandoned_probe_counts_as_a_failure_and_a_new_probe_follows() {
        let b = Breaker::new(1, Duration::from_millis(5));
        b.record(false);
        std::thread::sleep(Duration::from_millis(6));
        drop(b.admit());
        assert!(b.is_open());
        assert!(matches!(b.admit(), Admit::No), "re-opened, not half-open");
        std::thread::sleep(Duration::from_millis(6));
        assert!(is_probe(&b.admit()));
    }

    #[test]
    fn healthy_broker_closes_only_an_expired_or_half_open_circuit() {
        let b = Breaker::new(1, Duration::from_millis(30));
        b.record(false);
        assert!(!b.broker_healthy(), "a fresh open period is served in full");
        assert!(b.is_open());
        std::thread::sleep(Duration::from_millis(35));
        assert!(b.broker_healthy());
        assert!(!b.is_open());
        b.record(false);
        std::thread::sleep(Duration::from_millis(35));
        let _probe = b.admit();
        assert!(b.broker_healthy(), "half-open closes too");
        assert!(matches!(b.admit(), Admit::Yes));
    }
}
