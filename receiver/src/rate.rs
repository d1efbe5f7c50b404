//! A token bucket: the rate limit on unsigned VERIFY answers and on quarantine copies.

use std::sync::Mutex;
use std::time::Instant;

/// Allows `per_sec` events per second on average, bursts up to `per_sec`.
#[derive(Debug)]
pub struct RateLimit {
    per_sec: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    /// A full bucket.
    pub fn per_second(per_sec: u32) -> Self {
        let per_sec = f64::from(per_sec);
        Self {
            per_sec,
            state: Mutex::new((per_sec, Instant::now())),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.per_sec;
        s.0 = (s.0 + refill).min(self.per_sec);
        s.1 = now;
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_empties_then_refuses() {
        let r = RateLimit::per_second(3);
        assert!(r.try_take() && r.try_take() && r.try_take());
        assert!(!r.try_take());
        assert!(!RateLimit::per_second(0).try_take());
    }
}
