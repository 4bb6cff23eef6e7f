//! Rate-limit maths: requests and tokens per minute, each a bucket that holds a short burst
//! and refills at the steady rate; a take is *scheduled* (the caller learns the instant its
//! request may go), so one state serves the workers of a process or, kept in a store, every
//! process and Lambda instance that shares a limit.
//!
//! Why this shape. OpenAI documents that its per-minute limits "can be quantized, meaning they
//! are enforced over shorter periods of time (e.g. 60,000 requests/minute may be enforced as
//! 1,000 requests/second)", so short bursts get 429s "even when you are technically below the
//! rate limit per minute" (help article 6891753); and that `x-ratelimit-reset-*` is the time
//! until the limit "resets to its initial state" — 1 s after one request of a 60 RPM limit in
//! its own example: a bucket refilled continuously, not a window. A bucket holding a fraction of
//! a second at the steady rate (the burst, [`DEFAULT_BURST`]) is accepted by a provider that
//! enforces per second and by one that enforces per minute; a minute's burst only by the latter.
//!
//! A bucket is kept as the instant it is full again (`*_full_at_ms`): its level at `t` is
//! `capacity − max(0, full_at − t) / interval`, and taking `n` units at `s` moves `full_at` to
//! `max(full_at, s) + n × interval`. Three numbers make the whole state ([`LimitState`]), cheap
//! to store and to change in one conditional write.
//!
//! Pure and clock-free: callers pass `now` in milliseconds.

use std::time::Duration;

/// The burst a limit lets through at once, as time at the steady rate: half of the one-second
/// period a quantizing provider enforces over (OpenAI's example), the other half left for the
/// jitter between the instant a request is scheduled and the instant it reaches the provider.
pub const DEFAULT_BURST: Duration = Duration::from_millis(500);

/// Requests and tokens per minute (0 = unlimited) and the burst, as time at the steady rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub rpm: u64,
    pub tpm: u64,
    pub burst: Duration,
}

impl Limits {
    pub fn new(rpm: u64, tpm: u64, burst: Duration) -> Limits {
        Limits { rpm, tpm, burst }
    }

    /// Neither requests nor tokens are limited.
    pub fn is_unlimited(&self) -> bool {
        self.rpm == 0 && self.tpm == 0
    }

    /// One of `instances`' equal shares (each limit divided, at least 1 when set).
    pub fn per_instance(self, instances: u64) -> Limits {
        Limits {
            rpm: RateLimiter::per_instance(self.rpm, instances),
            tpm: RateLimiter::per_instance(self.tpm, instances),
            burst: self.burst,
        }
    }

    fn requests(&self) -> Option<Dim> {
        Dim::of(self.rpm, self.burst)
    }

    fn tokens(&self) -> Option<Dim> {
        Dim::of(self.tpm, self.burst)
    }

    /// Units of the burst: (requests, tokens); 0 for an unlimited dimension.
    pub fn capacity(&self) -> (f64, f64) {
        (
            self.requests().map_or(0.0, |d| d.capacity),
            self.tokens().map_or(0.0, |d| d.capacity),
        )
    }
}

/// One limited dimension: milliseconds per unit at the steady rate, units of the burst.
#[derive(Debug, Clone, Copy)]
struct Dim {
    interval: f64,
    capacity: f64,
}

impl Dim {
    fn of(per_minute: u64, burst: Duration) -> Option<Dim> {
        (per_minute > 0).then(|| {
            let interval = 60_000.0 / per_minute as f64;
            Dim {
                interval,
                // At least one unit, or a slow limit would never let a request through.
                capacity: (burst.as_secs_f64() * 1000.0 / interval).max(1.0),
            }
        })
    }

    /// The first instant `units` fit in a bucket full at `full_at`. More than the whole bucket
    /// fits once it is full (and leaves it in debt), so a request larger than the burst still
    /// goes through at the average rate.
    fn earliest(&self, full_at: f64, units: f64) -> f64 {
        full_at - (self.capacity - units.min(self.capacity)) * self.interval
    }

    /// `full_at` for a bucket holding at most `remaining` units at `t`.
    fn full_at_holding(&self, remaining: f64, t: f64) -> f64 {
        t + (self.capacity - remaining).max(0.0) * self.interval
    }
}

/// A granted take: the request may go at `at_ms` (now, or a little later); hand it back to
/// [`LimitState::correct`] with what the provider counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub at_ms: u64,
    pub tokens: u64,
}

impl Grant {
    /// How long to wait from `now_ms` before sending.
    pub fn wait(&self, now_ms: u64) -> Duration {
        Duration::from_millis(self.at_ms.saturating_sub(now_ms))
    }
}

/// Why a take was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Its slot is further away than the caller would wait: try again after this long.
    Wait(Duration),
}

/// What the provider's rate-limit headers said about its own buckets (`x-ratelimit-*`,
/// `anthropic-ratelimit-*`). `reset_*` is the time until that bucket is full again, as both
/// OpenAI and Anthropic define it; `limit_*` its size per minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProviderView {
    pub limit_requests: Option<u64>,
    pub limit_tokens: Option<u64>,
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub reset_requests: Option<Duration>,
    pub reset_tokens: Option<Duration>,
}

/// What a caller learnt since its last take, folded into its next one (a shared limit gets it
/// with the same write): tokens the provider counted beyond (or short of) what was reserved,
/// and the latest headers with the instant they were read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Learnt {
    pub tokens_delta: i64,
    pub view: Option<(ProviderView, u64)>,
}

impl Learnt {
    pub fn is_empty(&self) -> bool {
        self.tokens_delta == 0 && self.view.is_none()
    }

    /// Add `other` (learnt later): deltas add up, the later view wins.
    pub fn merge(&mut self, other: Learnt) {
        self.tokens_delta += other.tokens_delta;
        match (self.view, other.view) {
            (Some((_, mine)), Some((_, theirs))) if mine > theirs => {}
            (_, Some(v)) => self.view = Some(v),
            _ => {}
        }
    }
}

/// One atomic change of a limit's state (what a shared store applies in one write).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LimitOp {
    /// Schedule one request of `tokens`, if its slot is at most `max_wait` away, after folding
    /// in `learnt`.
    Take {
        tokens: u64,
        max_wait: Duration,
        learnt: Learnt,
    },
    /// Nothing goes before `until_ms` (the provider answered 429 with a Retry-After).
    Block { until_ms: u64 },
}

/// What an op did. `Denied` leaves the state as it was (nothing to write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitOutcome {
    Granted(Grant),
    Denied(Denied),
    Blocked,
}

impl LimitOutcome {
    /// The op changed the state (a store must write it).
    pub fn changes_state(&self) -> bool {
        !matches!(self, LimitOutcome::Denied(_))
    }
}

/// A limit's whole state: when each bucket is full again and when anything may go at all
/// (milliseconds since the epoch; the default, all zero, is a full, open limit).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LimitState {
    pub requests_full_at_ms: f64,
    pub tokens_full_at_ms: f64,
    pub not_before_ms: f64,
}

impl LimitState {
    /// Schedule one request of `tokens`: the earliest instant both buckets hold what it takes
    /// (and the provider's block is over). Granted when that is at most `max_wait` from now;
    /// else denied with the wait and the state unchanged.
    pub fn take(
        &mut self,
        limits: &Limits,
        tokens: u64,
        now_ms: u64,
        max_wait: Duration,
    ) -> Result<Grant, Denied> {
        let now = now_ms as f64;
        let (requests, token_dim) = (limits.requests(), limits.tokens());
        let mut at = now.max(self.not_before_ms);
        if let Some(d) = requests {
            at = at.max(d.earliest(self.requests_full_at_ms, 1.0));
        }
        if let Some(d) = token_dim {
            at = at.max(d.earliest(self.tokens_full_at_ms, tokens as f64));
        }
        let wait = at - now;
        if wait > max_wait.as_secs_f64() * 1000.0 {
            return Err(Denied::Wait(Duration::from_millis(wait.ceil() as u64)));
        }
        if let Some(d) = requests {
            self.requests_full_at_ms = self.requests_full_at_ms.max(at) + d.interval;
        }
        if let Some(d) = token_dim {
            self.tokens_full_at_ms = self.tokens_full_at_ms.max(at) + tokens as f64 * d.interval;
        }
        Ok(Grant {
            at_ms: at.ceil() as u64,
            tokens,
        })
    }

    /// The provider counted `counted` tokens for a take that reserved `grant.tokens`: the
    /// difference becomes debt or comes back.
    pub fn correct(&mut self, limits: &Limits, grant: Grant, counted: u64) {
        self.shift_tokens(limits, counted as i64 - grant.tokens as i64);
    }

    fn shift_tokens(&mut self, limits: &Limits, delta: i64) {
        if let Some(d) = limits.tokens() {
            self.tokens_full_at_ms += delta as f64 * d.interval;
        }
    }

    /// Follow the provider's view read at `at_ms`: our buckets hold no more than it says
    /// remains; a dimension it reports exhausted waits until its next unit refills (the reset
    /// is the time to a full bucket: one unit takes reset ÷ limit; without a limit, the whole
    /// reset).
    pub fn observe(&mut self, limits: &Limits, view: &ProviderView, at_ms: u64) {
        let t = at_ms as f64;
        let dims = [
            (
                limits.requests(),
                view.remaining_requests,
                view.reset_requests,
                view.limit_requests,
                &mut self.requests_full_at_ms,
            ),
            (
                limits.tokens(),
                view.remaining_tokens,
                view.reset_tokens,
                view.limit_tokens,
                &mut self.tokens_full_at_ms,
            ),
        ];
        let mut not_before = self.not_before_ms;
        for (dim, remaining, reset, limit, full_at) in dims {
            let (Some(d), Some(r)) = (dim, remaining) else {
                continue;
            };
            *full_at = full_at.max(d.full_at_holding(r as f64, t));
            if let (0, Some(reset)) = (r, reset) {
                let unit = match limit {
                    Some(l) if l > 0 => reset.as_secs_f64() * 1000.0 / l as f64,
                    _ => reset.as_secs_f64() * 1000.0,
                };
                not_before = not_before.max(t + unit);
            }
        }
        self.not_before_ms = not_before;
    }

    /// Nothing goes before `until_ms`.
    pub fn block_until(&mut self, until_ms: u64) {
        self.not_before_ms = self.not_before_ms.max(until_ms as f64);
    }

    /// Apply one op; a denied take leaves the state untouched (learnt included: the caller
    /// keeps it for its next take).
    pub fn apply(&mut self, limits: &Limits, op: &LimitOp, now_ms: u64) -> LimitOutcome {
        match *op {
            LimitOp::Take {
                tokens,
                max_wait,
                learnt,
            } => {
                let mut next = *self;
                next.shift_tokens(limits, learnt.tokens_delta);
                if let Some((view, at)) = learnt.view {
                    next.observe(limits, &view, at);
                }
                match next.take(limits, tokens, now_ms, max_wait) {
                    Ok(grant) => {
                        *self = next;
                        LimitOutcome::Granted(grant)
                    }
                    Err(denied) => LimitOutcome::Denied(denied),
                }
            }
            LimitOp::Block { until_ms } => {
                self.block_until(until_ms);
                LimitOutcome::Blocked
            }
        }
    }
}

/// A limit kept in this process.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    limits: Limits,
    state: LimitState,
}

impl RateLimiter {
    /// `rpm` and `tpm` with the default burst.
    pub fn new(rpm: u64, tpm: u64) -> RateLimiter {
        RateLimiter::with_limits(Limits::new(rpm, tpm, DEFAULT_BURST))
    }

    pub fn with_limits(limits: Limits) -> RateLimiter {
        RateLimiter {
            limits,
            state: LimitState::default(),
        }
    }

    /// Per-instance share of a global limit: global ÷ max concurrency (at least 1 when set).
    pub fn per_instance(global: u64, max_concurrency: u64) -> u64 {
        if global == 0 {
            return 0;
        }
        (global / max_concurrency.max(1)).max(1)
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Schedule one request (see [`LimitState::take`]).
    pub fn take(&mut self, tokens: u64, now_ms: u64, max_wait: Duration) -> Result<Grant, Denied> {
        self.state.take(&self.limits, tokens, now_ms, max_wait)
    }

    /// One request now, or how long until one may go.
    pub fn try_reserve(&mut self, tokens: u64, now_ms: u64) -> Result<Grant, Denied> {
        self.take(tokens, now_ms, Duration::ZERO)
    }

    pub fn correct(&mut self, grant: Grant, counted: u64) {
        self.state.correct(&self.limits, grant, counted);
    }

    pub fn observe(&mut self, view: &ProviderView, now_ms: u64) {
        self.state.observe(&self.limits, view, now_ms);
    }

    /// The provider said "wait" (429 Retry-After): nothing passes before then.
    pub fn block_for(&mut self, wait: Duration, now_ms: u64) {
        self.state
            .block_until(now_ms.saturating_add(wait.as_millis() as u64));
    }

    pub fn apply(&mut self, op: &LimitOp, now_ms: u64) -> LimitOutcome {
        self.state.apply(&self.limits, op, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn a_fresh_limit_lets_its_short_burst_through_then_paces_at_the_steady_rate() {
        // 600 RPM: 10 a second; a 500 ms burst is 5 requests.
        let mut l = RateLimiter::new(600, 0);
        for _ in 0..5 {
            assert_eq!(l.try_reserve(0, 1_000).unwrap().at_ms, 1_000);
        }
        assert_eq!(l.try_reserve(0, 1_000), Err(Denied::Wait(ms(100))));
        // Scheduled instead: one every 100 ms.
        assert_eq!(l.take(0, 1_000, HOUR).unwrap().at_ms, 1_100);
        assert_eq!(l.take(0, 1_000, HOUR).unwrap().at_ms, 1_200);
        // Idle for a while: the bucket is full again, and holds no more than the burst.
        for _ in 0..5 {
            assert_eq!(l.try_reserve(0, 60_000).unwrap().at_ms, 60_000);
        }
        assert!(l.try_reserve(0, 60_000).is_err());
    }

    #[test]
    fn no_second_and_no_minute_sees_more_than_the_limit_plus_the_burst() {
        let mut l = RateLimiter::new(600, 0);
        let slots: Vec<u64> = (0..2_000)
            .map(|_| l.take(0, 0, HOUR).unwrap().at_ms)
            .collect();
        for (window, most) in [(1_000, 10 + 5), (60_000, 600 + 5)] {
            let busiest = slots
                .iter()
                .map(|&start| {
                    slots
                        .iter()
                        .filter(|&&s| s >= start && s < start + window)
                        .count()
                })
                .max()
                .unwrap();
            assert!(busiest <= most, "{busiest} in {window} ms");
        }
        // 1,000 requests: 5 at once, then 995 at 10 a second.
        assert_eq!(slots[999], 99_500);
    }

    #[test]
    fn tokens_pace_by_what_each_request_asks() {
        // 60,000 TPM: a token a millisecond; the burst holds 500.
        let mut l = RateLimiter::new(0, 60_000);
        assert_eq!(l.take(500, 0, HOUR).unwrap().at_ms, 0);
        assert_eq!(l.take(500, 0, HOUR).unwrap().at_ms, 500);
        assert_eq!(l.take(250, 0, HOUR).unwrap().at_ms, 750);
        // Both limits: the later of the two slots.
        let mut l = RateLimiter::new(600, 60_000);
        assert_eq!(l.take(400, 0, HOUR).unwrap().at_ms, 0);
        assert_eq!(l.take(400, 0, HOUR).unwrap().at_ms, 300);
        assert_eq!(l.take(100, 0, HOUR).unwrap().at_ms, 400);
    }

    #[test]
    fn a_request_larger_than_the_burst_goes_when_the_bucket_is_full_and_leaves_debt() {
        let mut l = RateLimiter::new(0, 60_000);
        assert_eq!(l.take(2_000, 0, HOUR).unwrap().at_ms, 0);
        // The debt (1,500 tokens) is repaid, then the next 500 fit: 2 s.
        assert_eq!(l.take(500, 0, HOUR).unwrap().at_ms, 2_000);
    }

    #[test]
    fn a_denied_take_changes_nothing() {
        let mut l = RateLimiter::new(60, 0);
        l.try_reserve(0, 0).unwrap();
        let before = l.clone();
        assert_eq!(l.take(0, 0, ms(999)), Err(Denied::Wait(ms(1_000))));
        assert_eq!(l.state, before.state);
        assert_eq!(l.take(0, 0, ms(1_000)).unwrap().at_ms, 1_000);
    }

    #[test]
    fn corrections_to_what_the_provider_counted_add_debt_or_give_tokens_back() {
        let mut l = RateLimiter::new(0, 60_000);
        let g = l.take(500, 0, HOUR).unwrap();
        // The provider counted 800: the 300 extra delay the next request.
        l.correct(g, 800);
        assert_eq!(l.take(500, 0, HOUR).unwrap().at_ms, 800);
        let g = l.take(500, 0, HOUR).unwrap();
        assert_eq!(g.at_ms, 1_300);
        // It counted 100 of 500: 400 come back.
        l.correct(g, 100);
        assert_eq!(l.take(500, 0, HOUR).unwrap().at_ms, 1_400);
    }

    #[test]
    fn provider_headers_cap_our_buckets_and_an_exhausted_one_waits_for_its_next_unit() {
        // It says 2 requests remain: only 2 of our 5 go now.
        let mut l = RateLimiter::new(600, 0);
        let view = ProviderView {
            remaining_requests: Some(2),
            ..Default::default()
        };
        l.observe(&view, 0);
        assert!(l.try_reserve(0, 0).is_ok());
        assert!(l.try_reserve(0, 0).is_ok());
        assert_eq!(l.try_reserve(0, 0), Err(Denied::Wait(ms(100))));
        // Remaining 1,000,000 (a minute's bucket) caps nothing.
        let mut l = RateLimiter::new(600, 0);
        let view = ProviderView {
            remaining_requests: Some(1_000_000),
            ..Default::default()
        };
        l.observe(&view, 0);
        for _ in 0..5 {
            assert!(l.try_reserve(0, 0).is_ok());
        }
        // Tokens exhausted, full again in 30 s of a 60,000 limit: the next token in 0.5 ms,
        // so our own pacing rules (an empty 500-token burst refills in 500 ms).
        let mut l = RateLimiter::new(0, 60_000);
        let view = ProviderView {
            limit_tokens: Some(60_000),
            remaining_tokens: Some(0),
            reset_tokens: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        l.observe(&view, 1_000);
        assert_eq!(l.take(500, 1_000, HOUR).unwrap().at_ms, 1_500);
        // Requests exhausted at a provider allowing 6 a minute: 10 s to its next one.
        let mut l = RateLimiter::new(600, 0);
        let view = ProviderView {
            limit_requests: Some(6),
            remaining_requests: Some(0),
            reset_requests: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        l.observe(&view, 1_000);
        assert_eq!(l.try_reserve(0, 1_000), Err(Denied::Wait(ms(10_000))));
        // Without the limit header, the whole reset.
        let mut l = RateLimiter::new(600, 0);
        let view = ProviderView {
            remaining_requests: Some(0),
            reset_requests: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        l.observe(&view, 1_000);
        assert_eq!(l.try_reserve(0, 1_000), Err(Denied::Wait(ms(20_000))));
        assert!(l.try_reserve(0, 21_000).is_ok());
    }

    #[test]
    fn a_retry_after_holds_everything_until_then() {
        let mut l = RateLimiter::new(600, 100_000);
        l.block_for(Duration::from_secs(5), 1_000);
        assert_eq!(l.try_reserve(1, 2_000), Err(Denied::Wait(ms(4_000))));
        assert_eq!(l.take(1, 2_000, HOUR).unwrap().at_ms, 6_000);
    }

    #[test]
    fn an_op_folds_what_was_learnt_into_its_take_and_a_denied_one_writes_nothing() {
        let limits = Limits::new(0, 60_000, DEFAULT_BURST);
        let mut s = LimitState::default();
        let take = |tokens, max_wait, learnt| LimitOp::Take {
            tokens,
            max_wait,
            learnt,
        };
        let out = s.apply(&limits, &take(500, HOUR, Learnt::default()), 0);
        assert_eq!(
            out,
            LimitOutcome::Granted(Grant {
                at_ms: 0,
                tokens: 500
            })
        );
        // 300 tokens of debt learnt: the slot moves by 300 ms; with no wait allowed, denied,
        // and the state (debt included) stays as it was for the caller to bring again.
        let debt = Learnt {
            tokens_delta: 300,
            view: None,
        };
        let before = s;
        let out = s.apply(&limits, &take(500, Duration::ZERO, debt), 0);
        assert_eq!(out, LimitOutcome::Denied(Denied::Wait(ms(800))));
        assert!(!out.changes_state());
        assert_eq!(s, before);
        let out = s.apply(&limits, &take(500, HOUR, debt), 0);
        assert!(matches!(out, LimitOutcome::Granted(g) if g.at_ms == 800));
        assert_eq!(
            s.apply(&limits, &LimitOp::Block { until_ms: 9_000 }, 0),
            LimitOutcome::Blocked
        );
        assert_eq!(s.take(&limits, 1, 0, HOUR).unwrap().at_ms, 9_000);
    }

    #[test]
    fn learnt_adds_up_and_keeps_the_latest_view() {
        let view = |r| ProviderView {
            remaining_requests: Some(r),
            ..Default::default()
        };
        let mut a = Learnt {
            tokens_delta: 5,
            view: Some((view(1), 20)),
        };
        a.merge(Learnt {
            tokens_delta: -2,
            view: Some((view(2), 10)),
        });
        assert_eq!(a.tokens_delta, 3);
        assert_eq!(a.view, Some((view(1), 20)));
        a.merge(Learnt {
            tokens_delta: 0,
            view: Some((view(3), 30)),
        });
        assert_eq!(a.view, Some((view(3), 30)));
        assert!(Learnt::default().is_empty());
    }

    #[test]
    fn per_instance_share() {
        assert_eq!(RateLimiter::per_instance(500, 5), 100);
        assert_eq!(RateLimiter::per_instance(3, 5), 1);
        assert_eq!(RateLimiter::per_instance(0, 5), 0);
        assert_eq!(RateLimiter::per_instance(100, 0), 100);
        let l = Limits::new(600, 200_000, DEFAULT_BURST).per_instance(4);
        assert_eq!((l.rpm, l.tpm), (150, 50_000));
        assert!(Limits::new(0, 0, DEFAULT_BURST).is_unlimited());
    }
}
