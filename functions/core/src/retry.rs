//! Retry classification and backoff maths.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether a failure is worth another try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryClass {
    Transient,
    Permanent,
}

/// What went wrong on a provider call, as far as retrying cares.
#[derive(Debug, Clone, PartialEq)]
pub enum FailureKind {
    /// HTTP status from the provider; `retry_after` from its headers.
    Http {
        status: u16,
        retry_after: Option<Duration>,
    },
    Timeout,
    Connection,
    /// The image itself cannot be analysed.
    InvalidImage,
    /// The provider answered, but not with what we asked for.
    InvalidOutput,
}

/// 429, 408, 5xx, timeouts and connection errors are transient; other 4xx and bad input are
/// permanent, except 409 and 425, which the OpenAI and Anthropic SDKs also retry (a request
/// that conflicted with another in flight, or came too early).
pub fn classify(kind: &FailureKind) -> RetryClass {
    match kind {
        FailureKind::Http { status, .. } => classify_status(*status),
        FailureKind::Timeout | FailureKind::Connection => RetryClass::Transient,
        // One retry of invalid output is done in-line by the caller; after that it is permanent.
        FailureKind::InvalidImage | FailureKind::InvalidOutput => RetryClass::Permanent,
    }
}

pub fn classify_status(status: u16) -> RetryClass {
    match status {
        408 | 409 | 425 | 429 => RetryClass::Transient,
        500..=599 => RetryClass::Transient,
        _ => RetryClass::Permanent,
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base·2^attempt)],
/// never below `floor`. `unit` is a uniform random number in [0, 1) supplied by the caller
/// (core has no RNG so it stays deterministic and wasm-friendly).
pub fn backoff(
    attempt: u32,
    base: Duration,
    cap: Duration,
    floor: Duration,
    unit: f64,
) -> Duration {
    let exp = base.as_secs_f64() * 2f64.powi(attempt.min(30) as i32);
    let ceiling = exp.min(cap.as_secs_f64());
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.5
    };
    Duration::from_secs_f64(
        (ceiling * unit)
            .max(floor.as_secs_f64())
            .min(cap.as_secs_f64().max(floor.as_secs_f64())),
    )
}

/// SQS refuses visibility timeouts over 12 hours; no delay is ever longer.
pub const MAX_RETRY_DELAY_SECS: f64 = 43_200.0;

/// Seconds from a header → Duration, refusing what is negative, not finite or over a day
/// (`Duration::from_secs_f64` panics on values it cannot hold, and headers are input).
fn header_secs(secs: f64) -> Option<Duration> {
    if (0.0..86_400.0).contains(&secs) {
        Duration::try_from_secs_f64(secs).ok()
    } else {
        None
    }
}

/// Delay before the next attempt of a transient failure: the provider's Retry-After when it
/// gave one, else backoff. `receive_count` is how often the message was delivered (1 = first).
pub fn retry_delay(kind: &FailureKind, receive_count: u32, unit: f64) -> Duration {
    if let FailureKind::Http {
        retry_after: Some(d),
        ..
    } = kind
    {
        // Spread a herd that got the same Retry-After over an extra 0–20 %, and never ask the
        // queue for more than SQS's longest visibility timeout.
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        let secs = d.as_secs_f64() * (1.0 + 0.2 * unit);
        return Duration::from_secs_f64(secs.min(MAX_RETRY_DELAY_SECS));
    }
    backoff(
        receive_count.saturating_sub(1),
        Duration::from_secs(2),
        Duration::from_secs(300),
        Duration::from_secs(1),
        unit,
    )
}

/// Parse a Retry-After header: delta-seconds (fractional allowed). HTTP dates are not used by
/// LLM providers; they yield None and the caller falls back to backoff.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    header_secs(v.parse().ok()?)
}

/// Parse OpenAI's `x-ratelimit-reset-*` values: "1s", "6m0s", "20ms", "1h2m3.5s", or bare seconds.
pub fn parse_reset(value: &str) -> Option<Duration> {
    let v = value.trim();
    if v.is_empty() {
        return None;
    }
    if let Ok(secs) = v.parse::<f64>() {
        return header_secs(secs);
    }
    let mut total = 0.0f64;
    let mut num = String::new();
    let mut chars = v.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let n: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += n * unit;
        any = true;
    }
    if !num.is_empty() || !any {
        return None;
    }
    header_secs(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert_eq!(classify_status(s), RetryClass::Transient, "{s}");
        }
        for s in [400, 401, 403, 404, 413, 422] {
            assert_eq!(classify_status(s), RetryClass::Permanent, "{s}");
        }
        assert_eq!(classify(&FailureKind::Timeout), RetryClass::Transient);
        assert_eq!(classify(&FailureKind::Connection), RetryClass::Transient);
        assert_eq!(classify(&FailureKind::InvalidImage), RetryClass::Permanent);
        assert_eq!(classify(&FailureKind::InvalidOutput), RetryClass::Permanent);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = |a, u| {
            backoff(
                a,
                Duration::from_secs(2),
                Duration::from_secs(60),
                Duration::from_millis(100),
                u,
            )
        };
        assert_eq!(b(0, 1.0), Duration::from_secs(2));
        assert_eq!(b(3, 1.0), Duration::from_secs(16));
        assert_eq!(b(20, 1.0), Duration::from_secs(60));
        assert_eq!(b(5, 0.0), Duration::from_millis(100));
        assert!(b(5, 0.5) <= Duration::from_secs(32));
        assert_eq!(b(5, f64::NAN), Duration::from_secs(30));
    }

    #[test]
    fn retry_after_wins_over_backoff() {
        let k = FailureKind::Http {
            status: 429,
            retry_after: Some(Duration::from_secs(10)),
        };
        let d = retry_delay(&k, 1, 0.0);
        assert_eq!(d, Duration::from_secs(10));
        assert!(retry_delay(&k, 1, 1.0) <= Duration::from_secs(12));
    }

    #[test]
    fn parses_headers() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_reset("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_reset("2.5"), Some(Duration::from_millis(2500)));
        assert_eq!(parse_reset("soon"), None);
        assert_eq!(parse_reset("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_reset("5x"), None);
    }

    #[test]
    fn hostile_headers_do_not_panic() {
        for v in [
            "1e20",
            "99999999999999999999s",
            "1e300h",
            "NaN",
            "inf",
            "-0.5s",
            "1e400",
        ] {
            assert_eq!(parse_reset(v), None, "{v}");
            assert_eq!(parse_retry_after(v), None, "{v}");
        }
        let k = FailureKind::Http {
            status: 429,
            retry_after: Some(Duration::from_secs(86_000)),
        };
        let d = retry_delay(&k, 1, f64::NAN);
        assert_eq!(d, Duration::from_secs_f64(MAX_RETRY_DELAY_SECS));
    }
}
