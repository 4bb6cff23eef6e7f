//! Rate-limit maths: requests per minute and tokens per minute, reserve then correct.
//!
//! Pure and clock-free: callers pass `now` in milliseconds, so the same maths runs in a
//! Lambda, the local worker pool and the tests.

use std::time::Duration;

/// A continuously refilling bucket holding at most `capacity` units, refilled at
/// `capacity` per minute. The level may go negative after a correction (debt is repaid
/// by refill before new reservations pass).
#[derive(Debug, Clone)]
struct Bucket {
    capacity: f64,
    level: f64,
    last_ms: u64,
}

impl Bucket {
    fn new(per_minute: u64, now_ms: u64) -> Bucket {
        Bucket {
            capacity: per_minute as f64,
            level: per_minute as f64,
            last_ms: now_ms,
        }
    }

    fn refill(&mut self, now_ms: u64) {
        if now_ms > self.last_ms {
            let dt = (now_ms - self.last_ms) as f64;
            self.level = (self.level + dt * self.capacity / 60_000.0).min(self.capacity);
            self.last_ms = now_ms;
        }
    }

    /// Milliseconds until `amount` fits (0 when it fits now). An amount larger than the
    /// whole bucket passes once the bucket is full and leaves it in debt, so a request
    /// bigger than one instance's share still goes through at the average rate.
    fn wait_ms(&self, amount: f64) -> u64 {
        let needed = amount.min(self.capacity);
        if self.level >= needed || self.capacity <= 0.0 {
            return 0;
        }
        ((needed - self.level) * 60_000.0 / self.capacity).ceil() as u64
    }
}

/// A granted reservation; hand it back to [`RateLimiter::correct`] with the real usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub tokens: u64,
}

/// Why a reservation cannot be granted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Try again after this long.
    Wait(Duration),
}

/// What the provider's `x-ratelimit-*` headers said about its own buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProviderView {
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

/// RPM + TPM limiter. A limit of 0 means unlimited.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rpm: u64,
    tpm: u64,
    requests: Bucket,
    tokens: Bucket,
    /// Provider said: nothing before this instant.
    blocked_until_ms: u64,
}

impl RateLimiter {
    pub fn new(rpm: u64, tpm: u64, now_ms: u64) -> RateLimiter {
        RateLimiter {
            rpm,
            tpm,
            requests: Bucket::new(rpm, now_ms),
            tokens: Bucket::new(tpm, now_ms),
            blocked_until_ms: 0,
        }
    }

    /// Per-instance share of a global limit: global ÷ max concurrency (at least 1 when set).
    pub fn per_instance(global: u64, max_concurrency: u64) -> u64 {
        if global == 0 {
            return 0;
        }
        (global / max_concurrency.max(1)).max(1)
    }

    pub fn limits(&self) -> (u64, u64) {
        (self.rpm, self.tpm)
    }

    /// Reserve one request and `tokens` estimated tokens, or say how long to wait.
    pub fn try_reserve(&mut self, tokens: u64, now_ms: u64) -> Result<Reservation, Denied> {
        self.requests.refill(now_ms);
        self.tokens.refill(now_ms);
        let mut wait = self.blocked_until_ms.saturating_sub(now_ms);
        if self.rpm > 0 {
            wait = wait.max(self.requests.wait_ms(1.0));
        }
        if self.tpm > 0 {
            wait = wait.max(self.tokens.wait_ms(tokens as f64));
        }
        if wait > 0 {
            return Err(Denied::Wait(Duration::from_millis(wait)));
        }
        if self.rpm > 0 {
            self.requests.level -= 1.0;
        }
        if self.tpm > 0 {
            self.tokens.level -= tokens as f64;
        }
        Ok(Reservation { tokens })
    }

    /// Replace the estimate with the tokens the provider reported (refund or extra debt).
    pub fn correct(&mut self, reservation: Reservation, actual_tokens: u64, now_ms: u64) {
        if self.tpm == 0 {
            return;
        }
        self.tokens.refill(now_ms);
        self.tokens.level += reservation.tokens as f64 - actual_tokens as f64;
        self.tokens.level = self.tokens.level.min(self.tokens.capacity);
    }

    /// A call that never reached the provider gives its reservation back.
    pub fn release(&mut self, reservation: Reservation, now_ms: u64) {
        self.correct(reservation, 0, now_ms);
        if self.rpm > 0 {
            self.requests.refill(now_ms);
            self.requests.level = (self.requests.level + 1.0).min(self.requests.capacity);
        }
    }

    /// Follow the provider's view (x-ratelimit-remaining-* / reset-*): our buckets may not
    /// hold more than the provider says remains, and an exhausted provider bucket blocks
    /// everything until the provider says it resets.
    pub fn observe(&mut self, view: &ProviderView, now_ms: u64) {
        self.requests.refill(now_ms);
        self.tokens.refill(now_ms);
        if let Some(r) = view.remaining_requests {
            if self.rpm > 0 {
                self.requests.level = self.requests.level.min(r as f64);
            }
            if let (0, Some(reset)) = (r, view.reset_requests) {
                self.block_for(reset, now_ms);
            }
        }
        if let Some(t) = view.remaining_tokens {
            if self.tpm > 0 {
                self.tokens.level = self.tokens.level.min(t as f64);
            }
            if let (0, Some(reset)) = (t, view.reset_tokens) {
                self.block_for(reset, now_ms);
            }
        }
    }

    /// The provider said "wait" (429 Retry-After): nothing passes before then.
    pub fn block_for(&mut self, wait: Duration, now_ms: u64) {
        let until = now_ms.saturating_add(wait.as_millis() as u64);
        self.blocked_until_ms = self.blocked_until_ms.max(until);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_allows_burst_then_paces() {
        let mut l = RateLimiter::new(60, 0, 0);
        for _ in 0..60 {
            l.try_reserve(1000, 0).unwrap();
        }
        // One request refills per second.
        assert_eq!(
            l.try_reserve(1, 0),
            Err(Denied::Wait(Duration::from_millis(1000)))
        );
        assert!(l.try_reserve(1, 1000).is_ok());
    }

    #[test]
    fn tpm_reserves_estimate_and_corrects_with_usage() {
        let mut l = RateLimiter::new(0, 10_000, 0);
        let r = l.try_reserve(6_000, 0).unwrap();
        assert!(matches!(l.try_reserve(6_000, 0), Err(Denied::Wait(_))));
        // The call used less than reserved: the difference comes back at once.
        l.correct(r, 2_000, 0);
        assert!(l.try_reserve(6_000, 0).is_ok());
        // Over-use becomes debt that delays the next caller.
        let mut l = RateLimiter::new(0, 6_000, 0);
        let r = l.try_reserve(1_000, 0).unwrap();
        l.correct(r, 6_000, 0);
        match l.try_reserve(1_000, 0) {
            Err(Denied::Wait(d)) => assert_eq!(d, Duration::from_millis(10_000)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn larger_than_the_bucket_passes_when_full_and_leaves_debt() {
        let mut l = RateLimiter::new(10, 1_000, 0);
        // A full bucket lets it through, so a small per-instance share never blocks forever.
        assert!(l.try_reserve(2_500, 0).is_ok());
        // Then the debt (1 500 tokens) plus the next request must refill first: 1.5 + 1 min.
        match l.try_reserve(1_000, 0) {
            Err(Denied::Wait(d)) => assert_eq!(d, Duration::from_secs(150)),
            other => panic!("{other:?}"),
        }
        assert!(l.try_reserve(1_000, 150_000).is_ok());
    }

    #[test]
    fn release_refunds_request_and_tokens() {
        let mut l = RateLimiter::new(1, 100, 0);
        let r = l.try_reserve(100, 0).unwrap();
        assert!(l.try_reserve(1, 0).is_err());
        l.release(r, 0);
        assert!(l.try_reserve(100, 0).is_ok());
    }

    #[test]
    fn provider_headers_and_retry_after_are_followed() {
        let mut l = RateLimiter::new(100, 100_000, 0);
        let view = ProviderView {
            remaining_requests: Some(0),
            remaining_tokens: Some(50_000),
            ..Default::default()
        };
        l.observe(&view, 0);
        assert!(matches!(l.try_reserve(1, 0), Err(Denied::Wait(_))));
        // An exhausted token bucket with a reset time blocks until then, not just by refill.
        let mut l = RateLimiter::new(100, 100_000, 0);
        let view = ProviderView {
            remaining_tokens: Some(0),
            reset_tokens: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        l.observe(&view, 1_000);
        assert_eq!(
            l.try_reserve(10, 1_000),
            Err(Denied::Wait(Duration::from_secs(20)))
        );
        assert!(l.try_reserve(10, 21_000).is_ok());
        let mut l = RateLimiter::new(100, 100_000, 0);
        l.block_for(Duration::from_secs(5), 1_000);
        assert_eq!(
            l.try_reserve(1, 2_000),
            Err(Denied::Wait(Duration::from_secs(4)))
        );
        assert!(l.try_reserve(1, 6_000).is_ok());
    }

    #[test]
    fn per_instance_share() {
        assert_eq!(RateLimiter::per_instance(500, 5), 100);
        assert_eq!(RateLimiter::per_instance(3, 5), 1);
        assert_eq!(RateLimiter::per_instance(0, 5), 0);
        assert_eq!(RateLimiter::per_instance(100, 0), 100);
    }
}
