//! The application-wide budget: Smartcar's `RATE_LIMIT:SMARTCAR_API` bucket (by default 120
//! requests, refilling one every 30 s) mirrored locally so the poller never exceeds it, and the
//! pause an application-scoped 429 imposes on every request.
//!
//! The bucket is `governor`'s GCRA limiter: `Quota::with_period(refill).allow_burst(capacity)` is
//! exactly "capacity at once, then one per refill period", and `until_ready` waits without
//! spinning. It is in memory: one poller replica owns the budget (the chart runs one), and a
//! restarted poller starts with a full bucket. Starting empty instead was rejected: it would hold
//! back every restart's first polls for up to `capacity × refill` (an hour by default) — a crash
//! loop would never poll at all — to guard against a case Smartcar answers by itself: if its
//! bucket was in fact spent, its 429 (application scope) pauses the poller for `retry-after`.
//! `processor poll now` runs in its own process with its own bucket, outside this one.
//! Per-vehicle budgets (minimum interval, monthly cap, blocks) are in the CQL store, so they
//! survive restarts and, but for the minimum interval, hold for `poll now` too.

use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::middleware::StateInformationMiddleware;
use governor::{clock::DefaultClock, state::InMemoryState, state::NotKeyed, Quota, RateLimiter};
use tokio::time::Instant;

type Bucket = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// The global bucket and the application pause.
pub struct GlobalBudget {
    bucket: Bucket,
    capacity: u32,
    paused_until: Mutex<Option<Instant>>,
}

impl GlobalBudget {
    /// A full bucket of `capacity`, one request back every `refill`.
    pub fn new(capacity: u32, refill: Duration) -> Self {
        let burst = NonZeroU32::new(capacity).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(refill.max(Duration::from_millis(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Self {
            bucket: RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(),
            capacity,
            paused_until: Mutex::new(None),
        }
    }

    /// The configured capacity.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Waits until the application is not paused and the bucket has a request, takes it, and
    /// returns what is left in the bucket.
    pub async fn admit(&self) -> u32 {
        loop {
            let pause = self.paused_until.lock().ok().and_then(|p| *p);
            if let Some(until) = pause.filter(|u| *u > Instant::now()) {
                tokio::time::sleep_until(until).await;
                continue;
            }
            match self.bucket.check() {
                Ok(snapshot) => return snapshot.remaining_burst_capacity(),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(
                        &governor::clock::DefaultClock::default(),
                    ));
                    tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
                }
            }
        }
    }

    /// Pauses every request until `for_` from now (an application-scoped 429). A longer pause
    /// already in force is kept.
    pub fn pause(&self, for_: Duration) {
        if let Ok(mut p) = self.paused_until.lock() {
            let until = Instant::now() + for_;
            if p.is_none_or(|cur| cur < until) {
                *p = Some(until);
            }
        }
    }

    /// Seconds until the application pause ends (0 when none).
    pub fn paused_for(&self) -> Duration {
        self.paused_until
            .lock()
            .ok()
            .and_then(|p| *p)
            .map_or(Duration::ZERO, |u| {
                u.saturating_duration_since(Instant::now())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_bucket_gives_its_capacity_then_one_per_refill() {
        let b = GlobalBudget::new(3, Duration::from_millis(200));
        let started = std::time::Instant::now();
        let mut left = Vec::new();
        for _ in 0..5 {
            left.push(b.admit().await);
        }
        assert_eq!(&left[..3], &[2, 1, 0]);
        // Two more needed two refills: the formula capacity + elapsed / refill holds.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(350),
            "5 requests from a bucket of 3 refilling every 200 ms took only {elapsed:?}"
        );
    }

    #[tokio::test]
    async fn an_application_pause_holds_every_request() {
        let b = GlobalBudget::new(10, Duration::from_millis(1));
        b.pause(Duration::from_millis(150));
        b.pause(Duration::from_millis(10));
        assert!(
            b.paused_for() > Duration::from_millis(100),
            "the longer pause is kept"
        );
        let started = std::time::Instant::now();
        b.admit().await;
        assert!(started.elapsed() >= Duration::from_millis(140));
    }
}
