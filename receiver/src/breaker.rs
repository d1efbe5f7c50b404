//! Circuit breaker around the Kafka producer.
//!
//! After `failures` consecutive produce failures the circuit opens: requests get 503 at once instead
//! of queueing behind a dead broker. After `open_for`, one probe request is let through (half-open);
//! its success closes the circuit, its failure re-opens it.

use std::sync::Mutex;
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
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Circuit closed: go ahead.
    Yes,
    /// Half-open: this request is the probe.
    Probe,
    /// Open: answer 503 now.
    No,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            open_for,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut guard = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// Whether a request may produce now.
    pub fn admit(&self) -> Admit {
        self.with(|s| match *s {
            State::Closed { .. } => Admit::Yes,
            State::Open { until } if Instant::now() >= until => {
                *s = State::HalfOpen;
                Admit::Probe
            }
            State::Open { .. } | State::HalfOpen => Admit::No,
        })
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

    /// Whether the circuit is open (or half-open, waiting on its probe).
    pub fn is_open(&self) -> bool {
        self.with(|s| !matches!(s, State::Closed { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_after_cooldown() {
        let b = Breaker::new(3, Duration::from_millis(20));
        b.record(false);
        b.record(false);
        assert_eq!(b.admit(), Admit::Yes);
        b.record(false);
        assert!(b.is_open());
        assert_eq!(b.admit(), Admit::No);
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(b.admit(), Admit::Probe);
        assert_eq!(b.admit(), Admit::No, "only one probe at a time");
        b.record(true);
        assert!(!b.is_open());
        assert_eq!(b.admit(), Admit::Yes);
    }

    #[test]
    fn failed_probe_reopens() {
        let b = Breaker::new(1, Duration::from_millis(1));
        b.record(false);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(b.admit(), Admit::Probe);
        b.record(false);
        assert_eq!(b.admit(), Admit::No);
    }
}
