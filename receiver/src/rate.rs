//! The rate limit on unsigned VERIFY answers and on quarantine copies: `governor`'s GCRA limiter
//! (a token bucket in effect), `per_sec` per second with bursts up to `per_sec`, lock-free.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Allows `per_sec` events per second on average, bursts up to `per_sec`; 0 allows none.
#[derive(Debug)]
pub struct RateLimit(Option<DefaultDirectRateLimiter>);

impl RateLimit {
    /// A full bucket.
    pub fn per_second(per_sec: u32) -> Self {
        Self(NonZeroU32::new(per_sec).map(|n| RateLimiter::direct(Quota::per_second(n))))
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        self.0.as_ref().is_some_and(|l| l.check().is_ok())
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
