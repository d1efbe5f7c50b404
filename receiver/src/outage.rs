//! Vehicles whose events the receiver refused with 503 (Kafka unavailable, deadline), remembered
//! so that after recovery the ones whose outage outlasted Smartcar's retry window (~3 min: after
//! that Smartcar drops the event for good) get a poll of the REST API.
//!
//! Memory is bounded (`poller.outage_max_vehicles`, oldest forgotten first and counted): a long
//! outage of a large fleet still requests polls for the most recent vehicles. A vehicle refused
//! for less than the window needs nothing: Smartcar's own retries reach the recovered receiver.
//! Recovery is the first accepted request after refusals; the check on the accepted path is one
//! atomic load while nothing is remembered.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The refused vehicles.
pub struct Outages {
    window: Duration,
    max: usize,
    any: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Vehicle → its first refusal since the last recovery.
    first: HashMap<String, Instant>,
    /// Insertion order, to forget the oldest beyond `max`.
    order: VecDeque<String>,
}

/// What a recovery found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Refused for longer than the window: poll these.
    pub to_poll: Vec<String>,
    /// Refused for less: Smartcar's retries cover them.
    pub covered: usize,
}

impl Outages {
    /// Remembers up to `max` vehicles; `window` is Smartcar's retry window.
    pub fn new(window: Duration, max: usize) -> Self {
        Self {
            window,
            max: max.max(1),
            any: AtomicBool::new(false),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A 503 for `vehicle` at `now`. Returns whether an older vehicle was forgotten to make room.
    pub fn refused(&self, vehicle: &str, now: Instant) -> bool {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.any.store(true, Ordering::Release);
        if g.first.contains_key(vehicle) {
            return false;
        }
        g.first.insert(vehicle.to_string(), now);
        g.order.push_back(vehicle.to_string());
        if g.order.len() > self.max {
            if let Some(old) = g.order.pop_front() {
                g.first.remove(&old);
                return true;
            }
        }
        false
    }

    /// A request was accepted at `now`: the outage is over. Forgets every vehicle and returns the
    /// ones refused longer ago than the window.
    pub fn accepted(&self, now: Instant) -> Option<Recovered> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.any.store(false, Ordering::Release);
        let mut out = Recovered::default();
        for v in std::mem::take(&mut g.order) {
            if let Some(first) = g.first.remove(&v) {
                if now.saturating_duration_since(first) >= self.window {
                    out.to_poll.push(v);
                } else {
                    out.covered += 1;
                }
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_outages_longer_than_the_window_are_polled_once() {
        let o = Outages::new(Duration::from_secs(180), 10);
        let t0 = Instant::now();
        assert_eq!(o.accepted(t0), None, "nothing refused: nothing to do");
        o.refused("car-long", t0);
        o.refused("car-long", t0 + Duration::from_secs(100));
        o.refused("car-short", t0 + Duration::from_secs(150));
        let r = o.accepted(t0 + Duration::from_secs(200));
        assert_eq!(
            r,
            Some(Recovered {
                to_poll: vec!["car-long".into()],
                covered: 1
            })
        );
        assert_eq!(
            o.accepted(t0 + Duration::from_secs(201)),
            None,
            "each outage is answered once"
        );
    }

    #[test]
    fn memory_is_bounded_oldest_forgotten_first() {
        let o = Outages::new(Duration::ZERO, 2);
        let t = Instant::now();
        assert!(!o.refused("a", t));
        assert!(!o.refused("b", t));
        assert!(o.refused("c", t));
        let r = o.accepted(t).unwrap_or_default();
        assert_eq!(r.to_poll, ["b", "c"]);
    }
}
