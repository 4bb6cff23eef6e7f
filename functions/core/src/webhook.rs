//! Webhooks: Standard Webhooks signing and verification, and the delivery retry rules.
//!
//! Signing follows the Standard Webhooks specification (symmetric scheme): the signed content
//! is `{webhook-id}.{webhook-timestamp}.{body}`, the signature HMAC-SHA256 with the tenant's
//! secret, sent as `v1,<base64>` in `webhook-signature` next to `webhook-id` and
//! `webhook-timestamp` (unix seconds). Secrets are shown as `whsec_<base64>`.
//!
//! A receiver checks a delivery with [`WebhookSecret::verify`]:
//!
//! ```
//! use sightline_core::webhook::{ReceivedHeaders, WebhookSecret, DEFAULT_TOLERANCE};
//!
//! let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
//! let body = br#"{"type":"generation.completed"}"#;
//! let sent = secret.headers("msg_1", 1_700_000_000, body).unwrap();
//! // On the receiving side, with the request's headers and its raw body bytes:
//! let received = ReceivedHeaders {
//!     id: Some(&sent.id),
//!     timestamp: Some(&sent.timestamp),
//!     signature: Some(&sent.signature),
//! };
//! assert!(secret.verify(&received, body, 1_700_000_060, DEFAULT_TOLERANCE).is_ok());
//! ```
//!
//! The network side (SSRF checks, sending) lives in the pipeline crate; this module is pure.

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// How a symmetric secret is shown to its owner, so it is recognisable wherever it is pasted.
pub const SECRET_PREFIX: &str = "whsec_";
/// The spec's bounds for a symmetric secret: at least 24 bytes, at most 64 (512 bits).
pub const MIN_SECRET_BYTES: usize = 24;
pub const MAX_SECRET_BYTES: usize = 64;
/// How far a delivery's timestamp may be from the receiver's clock, either way: the window in
/// which a captured request could be replayed (the receiver dedupes on `webhook-id` within it).
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(5 * 60);
/// Longest accepted message id: ours are short; a cap keeps a header within reason.
pub const MAX_MESSAGE_ID_LEN: usize = 256;

/// Why a secret is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a webhook secret starts with `whsec_`")]
    MissingPrefix,
    #[error("the webhook secret is not valid base64")]
    NotBase64,
    #[error("a webhook secret is {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, not {0}")]
    Length(usize),
}

/// Why a delivery cannot be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The id is part of the signed content, delimited by `.`: an id with a `.` (or with
    /// characters a header cannot carry) would make two different deliveries sign alike.
    #[error("message id {0:?} must be 1 to 256 visible ASCII characters without `.`")]
    BadMessageId(String),
}

/// Why a received delivery is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("header `{0}` is missing")]
    MissingHeader(&'static str),
    #[error("`webhook-timestamp` is not unix seconds")]
    BadTimestamp,
    #[error("the delivery is {0} s older than the tolerance allows")]
    TooOld(u64),
    #[error("the delivery is {0} s further in the future than the tolerance allows")]
    TooNew(u64),
    #[error("no `v1` signature in `webhook-signature`")]
    NoSignature,
    #[error("no signature matches")]
    BadSignature,
}

/// A tenant's symmetric signing secret. `Debug` hides it.
#[derive(Clone)]
pub struct WebhookSecret {
    key: Vec<u8>,
    /// HMAC keyed once at construction; each signature starts from a clone of it.
    keyed: HmacSha256,
}

impl PartialEq for WebhookSecret {
    fn eq(&self, other: &WebhookSecret) -> bool {
        self.key == other.key
    }
}

impl Eq for WebhookSecret {}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecret(whsec_…, {} bytes)", self.key.len())
    }
}

/// The three headers of a signed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookHeaders {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
}

impl WebhookHeaders {
    /// (name, value) pairs ready for an HTTP client.
    pub fn pairs(&self) -> [(&'static str, &str); 3] {
        [
            (HEADER_ID, &self.id),
            (HEADER_TIMESTAMP, &self.timestamp),
            (HEADER_SIGNATURE, &self.signature),
        ]
    }
}

/// The Standard Webhooks headers of a received request, as found (None when absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceivedHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

impl<'a> ReceivedHeaders<'a> {
    /// Pick the three headers out of (name, value) pairs, names compared case-insensitively
    /// as HTTP requires.
    pub fn from_pairs<I>(pairs: I) -> ReceivedHeaders<'a>
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        let mut h = ReceivedHeaders::default();
        for (name, value) in pairs {
            if name.eq_ignore_ascii_case(HEADER_ID) {
                h.id = Some(value);
            } else if name.eq_ignore_ascii_case(HEADER_TIMESTAMP) {
                h.timestamp = Some(value);
            } else if name.eq_ignore_ascii_case(HEADER_SIGNATURE) {
                h.signature = Some(value);
            }
        }
        h
    }
}

impl WebhookSecret {
    /// A secret from its `whsec_<base64>` form (standard alphabet, padded), checked for the
    /// spec's length bounds.
    pub fn parse(text: &str) -> Result<WebhookSecret, SecretError> {
        let b64 = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = BASE64.decode(b64).map_err(|_| SecretError::NotBase64)?;
        WebhookSecret::from_bytes(&key)
    }

    /// A secret from raw key bytes, e.g. fresh random ones (core has no RNG: the caller
    /// supplies 32 random bytes).
    pub fn from_bytes(key: &[u8]) -> Result<WebhookSecret, SecretError> {
        if !(MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        // HMAC takes keys of any length; the error arm is for the type's sake.
        let keyed = HmacSha256::new_from_slice(key).map_err(|_| SecretError::Length(key.len()))?;
        Ok(WebhookSecret {
            key: key.to_vec(),
            keyed,
        })
    }

    /// The `whsec_<base64>` form, to show the owner once or to store. Named so that a secret
    /// never reaches a log through `{}` by accident.
    pub fn expose(&self) -> String {
        format!("{SECRET_PREFIX}{}", BASE64.encode(&self.key))
    }

    /// HMAC state over `{id}.{timestamp}.{body}`.
    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `v1,<base64>` signature of one delivery. `timestamp` is the attempt's unix seconds
    /// (each retry is signed anew with its own).
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> Result<String, SignError> {
        check_message_id(id)?;
        let tag = self
            .mac(id, &timestamp.to_string(), body)
            .finalize()
            .into_bytes();
        Ok(format!("v1,{}", BASE64.encode(tag)))
    }

    /// The three headers of one delivery.
    pub fn headers(
        &self,
        id: &str,
        timestamp: i64,
        body: &[u8],
    ) -> Result<WebhookHeaders, SignError> {
        Ok(WebhookHeaders {
            id: id.to_string(),
            timestamp: timestamp.to_string(),
            signature: self.sign(id, timestamp, body)?,
        })
    }

    /// Check a received delivery: the headers are present, the timestamp is within
    /// `tolerance` of `now` (unix seconds) either way, and one of the space-separated `v1`
    /// signatures matches `body` (the raw bytes, before any JSON parsing). Other versions
    /// (`v1a`, …) are skipped; several signatures are how a sender rotates its secret.
    /// Comparison is constant-time (`hmac`'s `verify_slice`).
    pub fn verify(
        &self,
        headers: &ReceivedHeaders<'_>,
        body: &[u8],
        now: i64,
        tolerance: Duration,
    ) -> Result<(), VerifyError> {
        let id = headers.id.ok_or(VerifyError::MissingHeader(HEADER_ID))?;
        let timestamp = headers
            .timestamp
            .ok_or(VerifyError::MissingHeader(HEADER_TIMESTAMP))?;
        let signatures = headers
            .signature
            .ok_or(VerifyError::MissingHeader(HEADER_SIGNATURE))?;

        let timestamp = timestamp.trim();
        if timestamp.is_empty()
            || timestamp.len() > 18
            || !timestamp.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(VerifyError::BadTimestamp);
        }
        let sent: i64 = timestamp.parse().map_err(|_| VerifyError::BadTimestamp)?;
        let skew = i128::from(now) - i128::from(sent);
        let allowed = i128::from(tolerance.as_secs());
        if skew > allowed {
            return Err(VerifyError::TooOld(over(skew - allowed)));
        }
        if -skew > allowed {
            return Err(VerifyError::TooNew(over(-skew - allowed)));
        }

        let mac = self.mac(id, timestamp, body);
        let mut any_v1 = false;
        for candidate in signatures.split_ascii_whitespace() {
            let Some(b64) = candidate.strip_prefix("v1,") else {
                continue;
            };
            any_v1 = true;
            let Ok(tag) = BASE64.decode(b64) else {
                continue;
            };
            if mac.clone().verify_slice(&tag).is_ok() {
                return Ok(());
            }
        }
        Err(if any_v1 {
            VerifyError::BadSignature
        } else {
            VerifyError::NoSignature
        })
    }
}

fn over(secs: i128) -> u64 {
    u64::try_from(secs).unwrap_or(u64::MAX)
}

fn check_message_id(id: &str) -> Result<(), SignError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_MESSAGE_ID_LEN
        && id.bytes().all(|b| b.is_ascii_graphic() && b != b'.');
    if ok {
        Ok(())
    } else {
        Err(SignError::BadMessageId(id.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery: outcome of an attempt, and when to try again
// ---------------------------------------------------------------------------------------------

/// Longest one delivery attempt may take, connection to response (the spec recommends
/// 15–30 s; a receiver that needs longer should answer first and work after).
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long after the first attempt a delivery keeps being retried before it is dead-lettered.
pub const DELIVERY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
/// A failure this close to the end of the window is final: a last attempt seconds later
/// would only be queue lag's duplicate of the one that just failed.
pub const WINDOW_SLACK: Duration = Duration::from_secs(60);
/// A receiver's Retry-After is followed up to this long (SQS's longest visibility timeout,
/// so the worker can always hold a message that long).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(12 * 60 * 60);

/// Delay after the n-th failed attempt (index n-1), from the spec's example schedule. The
/// 24 h window cuts it: in practice the attempts fall at 0, 5 s, 5 min 5 s, 35 min 5 s,
/// 2 h 35 min 5 s, 7 h 35 min 5 s, 17 h 35 min 5 s and 24 h.
pub const RETRY_SCHEDULE: [Duration; 9] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 60 * 60),
    Duration::from_secs(5 * 60 * 60),
    Duration::from_secs(10 * 60 * 60),
    Duration::from_secs(14 * 60 * 60),
    Duration::from_secs(20 * 60 * 60),
    Duration::from_secs(24 * 60 * 60),
];

/// What one attempt's result means for the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// 2xx: done.
    Delivered,
    /// 410 Gone: the receiver wants no more; stop now, dead-letter, and disable the endpoint.
    Gone,
    /// Anything else: try again per [`delivery_delay`], or dead-letter when it says None.
    Retry { retry_after: Option<Duration> },
}

impl DeliveryOutcome {
    /// Classify a response, per the spec's status handling: 2xx is success; 410 stops; every
    /// other status is a failure that is retried on the schedule. That includes 3xx (we follow
    /// no redirects: the owner should update the URL), 429/502/503/504 (load: Retry-After, if
    /// any, is honoured) and other 4xx such as 401/404, which are most often a receiver being
    /// deployed or misconfigured for a while, and the 24 h window bounds what they cost.
    pub fn from_status(status: u16, retry_after: Option<Duration>) -> DeliveryOutcome {
        match status {
            200..=299 => DeliveryOutcome::Delivered,
            410 => DeliveryOutcome::Gone,
            _ => DeliveryOutcome::Retry { retry_after },
        }
    }

    /// A timeout, refused connection, reset or TLS failure: retried like a 5xx.
    pub fn transport_failure() -> DeliveryOutcome {
        DeliveryOutcome::Retry { retry_after: None }
    }
}

/// How long to wait before the next attempt, or None when the delivery is over and goes to
/// the dead-letter record.
///
/// `failed_attempts` counts attempts made so far, all failed (1 after the first); `since_first`
/// is the time from the first attempt to now; `retry_after` the receiver's header, if it sent
/// one. The wait is the schedule's step, or Retry-After when that is longer (capped at
/// [`MAX_RETRY_AFTER`]): a receiver can slow us down, never speed us up. No attempt is placed
/// after [`DELIVERY_WINDOW`]: the one that would pass it is moved to the window's end, and a
/// failure within [`WINDOW_SLACK`] of the end is final. Jitter, if wanted, is the caller's.
pub fn delivery_delay(
    failed_attempts: u32,
    since_first: Duration,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    if failed_attempts == 0 {
        return Some(Duration::ZERO);
    }
    let remaining = DELIVERY_WINDOW.checked_sub(since_first)?;
    if remaining <= WINDOW_SLACK {
        return None;
    }
    let index = usize::try_from(failed_attempts - 1)
        .unwrap_or(usize::MAX)
        .min(RETRY_SCHEDULE.len() - 1);
    let step = RETRY_SCHEDULE[index];
    let wait = match retry_after {
        Some(ra) => step.max(ra.min(MAX_RETRY_AFTER)),
        None => step,
    };
    Some(wait.min(remaining))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The Standard Webhooks test vector, from standard-webhooks/standard-webhooks,
    // libraries/go/webhook_test.go (TestWebhookSign); the other libraries' tests use the same.
    const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SPEC_TIMESTAMP: i64 = 1_614_265_330;
    const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SPEC_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn secret() -> WebhookSecret {
        WebhookSecret::parse(SPEC_SECRET).unwrap()
    }

    fn received<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> ReceivedHeaders<'a> {
        ReceivedHeaders {
            id: Some(id),
            timestamp: Some(ts),
            signature: Some(sig),
        }
    }

    const TS: &str = "1614265330";

    #[test]
    fn signing_matches_the_specs_published_test_vector() {
        assert_eq!(
            secret().sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY).unwrap(),
            SPEC_SIGNATURE
        );
    }

    #[test]
    fn the_specs_test_vector_verifies_within_tolerance() {
        let h = received(SPEC_ID, TS, SPEC_SIGNATURE);
        assert_eq!(
            secret().verify(&h, SPEC_BODY, SPEC_TIMESTAMP + 10, DEFAULT_TOLERANCE),
            Ok(())
        );
    }

    #[test]
    fn headers_carry_id_timestamp_and_signature() {
        let h = secret()
            .headers(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY)
            .unwrap();
        assert_eq!(
            h.pairs(),
            [
                ("webhook-id", SPEC_ID),
                ("webhook-timestamp", TS),
                ("webhook-signature", SPEC_SIGNATURE)
            ]
        );
    }

    #[test]
    fn verify_refuses_a_changed_body_id_or_timestamp() {
        let s = secret();
        let now = SPEC_TIMESTAMP;
        let bad = |h: ReceivedHeaders<'_>, body: &[u8]| s.verify(&h, body, now, DEFAULT_TOLERANCE);
        assert_eq!(
            bad(
                received(SPEC_ID, TS, SPEC_SIGNATURE),
                br#"{"test": 2432232315}"#
            ),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            bad(received("msg_other", TS, SPEC_SIGNATURE), SPEC_BODY),
            Err(VerifyError::BadSignature)
        );
        assert_eq!(
            bad(received(SPEC_ID, "1614265331", SPEC_SIGNATURE), SPEC_BODY),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn verify_refuses_a_signature_made_with_another_secret() {
        let other = WebhookSecret::from_bytes(&[7u8; 32]).unwrap();
        let sig = other.sign(SPEC_ID, SPEC_TIMESTAMP, SPEC_BODY).unwrap();
        assert_eq!(
            secret().verify(
                &received(SPEC_ID, TS, &sig),
                SPEC_BODY,
                SPEC_TIMESTAMP,
                DEFAULT_TOLERANCE
            ),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn verify_accepts_any_one_matching_signature_among_several() {
        let list = format!(
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1a,AAAA v2,xyz  {SPEC_SIGNATURE} v1,!!notbase64 v1,"
        );
        assert_eq!(
            secret().verify(
                &received(SPEC_ID, TS, &list),
                SPEC_BODY,
                SPEC_TIMESTAMP,
                DEFAULT_TOLERANCE
            ),
            Ok(())
        );
    }

    #[test]
    fn verify_refuses_empty_and_truncated_signatures() {
        let tag = BASE64
            .decode(SPEC_SIGNATURE.trim_start_matches("v1,"))
            .unwrap();
        let half = format!("v1,{}", BASE64.encode(&tag[..16]));
        for sig in ["v1,", half.as_str()] {
            assert_eq!(
                secret().verify(
                    &received(SPEC_ID, TS, sig),
                    SPEC_BODY,
                    SPEC_TIMESTAMP,
                    DEFAULT_TOLERANCE
                ),
                Err(VerifyError::BadSignature),
                "{sig:?}"
            );
        }
    }

    #[test]
    fn verify_without_a_v1_signature_says_so() {
        let g0 = SPEC_SIGNATURE.trim_start_matches("v1,");
        for sig in ["", "v1a,abc v2,def", g0] {
            assert_eq!(
                secret().verify(
                    &received(SPEC_ID, TS, sig),
                    SPEC_BODY,
                    SPEC_TIMESTAMP,
                    DEFAULT_TOLERANCE
                ),
                Err(VerifyError::NoSignature),
                "{sig:?}"
            );
        }
    }

    #[test]
    fn verify_refuses_stale_and_future_timestamps_beyond_tolerance() {
        let s = secret();
        let h = received(SPEC_ID, TS, SPEC_SIGNATURE);
        let tol = DEFAULT_TOLERANCE.as_secs() as i64;
        let at = |now| s.verify(&h, SPEC_BODY, now, DEFAULT_TOLERANCE);
        assert_eq!(at(SPEC_TIMESTAMP + tol), Ok(()));
        assert_eq!(at(SPEC_TIMESTAMP + tol + 1), Err(VerifyError::TooOld(1)));
        assert_eq!(at(SPEC_TIMESTAMP - tol), Ok(()));
        assert_eq!(at(SPEC_TIMESTAMP - tol - 1), Err(VerifyError::TooNew(1)));
    }

    #[test]
    fn verify_refuses_missing_headers_and_malformed_timestamps() {
        let s = secret();
        let v = |h: ReceivedHeaders<'_>| s.verify(&h, SPEC_BODY, SPEC_TIMESTAMP, DEFAULT_TOLERANCE);
        let full = received(SPEC_ID, TS, SPEC_SIGNATURE);
        assert_eq!(
            v(ReceivedHeaders { id: None, ..full }),
            Err(VerifyError::MissingHeader("webhook-id"))
        );
        assert_eq!(
            v(ReceivedHeaders {
                timestamp: None,
                ..full
            }),
            Err(VerifyError::MissingHeader("webhook-timestamp"))
        );
        assert_eq!(
            v(ReceivedHeaders {
                signature: None,
                ..full
            }),
            Err(VerifyError::MissingHeader("webhook-signature"))
        );
        for ts in [
            "",
            "-1614265330",
            "+1614265330",
            "1614265330.0",
            "16e8",
            "99999999999999999999",
        ] {
            assert_eq!(
                v(received(SPEC_ID, ts, SPEC_SIGNATURE)),
                Err(VerifyError::BadTimestamp),
                "{ts:?}"
            );
        }
    }

    #[test]
    fn received_headers_are_found_whatever_their_case() {
        let pairs = [
            ("Webhook-Id", SPEC_ID),
            ("content-type", "application/json"),
            ("WEBHOOK-TIMESTAMP", TS),
            ("webhook-signature", SPEC_SIGNATURE),
        ];
        let h = ReceivedHeaders::from_pairs(pairs);
        assert_eq!(h, received(SPEC_ID, TS, SPEC_SIGNATURE));
    }

    #[test]
    fn secrets_need_the_prefix_base64_and_24_to_64_bytes() {
        assert_eq!(
            WebhookSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SecretError::MissingPrefix)
        );
        assert_eq!(
            WebhookSecret::parse("whsec_not*base64"),
            Err(SecretError::NotBase64)
        );
        assert_eq!(
            WebhookSecret::parse("whsec_c2hvcnQ="),
            Err(SecretError::Length(5))
        );
        assert_eq!(
            WebhookSecret::from_bytes(&[0; 65]),
            Err(SecretError::Length(65))
        );
        assert!(WebhookSecret::from_bytes(&[0; 64]).is_ok());
    }

    #[test]
    fn a_secret_round_trips_through_its_whsec_form_and_hides_in_debug() {
        let s = WebhookSecret::from_bytes(&[42u8; 32]).unwrap();
        let shown = s.expose();
        assert!(shown.starts_with("whsec_"));
        assert_eq!(WebhookSecret::parse(&shown).unwrap(), s);
        assert_eq!(secret().expose(), SPEC_SECRET);
        let debug = format!("{s:?}");
        assert!(!debug.contains(&shown[6..]), "{debug}");
    }

    #[test]
    fn signing_refuses_ids_that_would_blur_the_signed_content() {
        for id in ["", "a.b", "has space", "tab\t", "é", &"x".repeat(257)] {
            assert!(
                matches!(
                    secret().sign(id, SPEC_TIMESTAMP, SPEC_BODY),
                    Err(SignError::BadMessageId(_))
                ),
                "{id:?}"
            );
        }
    }

    // --- delivery ---------------------------------------------------------------------------

    #[test]
    fn statuses_classify_per_the_spec() {
        assert_eq!(
            DeliveryOutcome::from_status(200, None),
            DeliveryOutcome::Delivered
        );
        assert_eq!(
            DeliveryOutcome::from_status(204, None),
            DeliveryOutcome::Delivered
        );
        assert_eq!(
            DeliveryOutcome::from_status(410, Some(Duration::from_secs(9))),
            DeliveryOutcome::Gone
        );
        for s in [100, 301, 302, 400, 401, 404, 408, 429, 500, 502, 503, 504] {
            assert!(
                matches!(
                    DeliveryOutcome::from_status(s, None),
                    DeliveryOutcome::Retry { .. }
                ),
                "{s}"
            );
        }
        assert_eq!(
            DeliveryOutcome::from_status(503, Some(Duration::from_secs(30))),
            DeliveryOutcome::Retry {
                retry_after: Some(Duration::from_secs(30))
            }
        );
        assert_eq!(
            DeliveryOutcome::transport_failure(),
            DeliveryOutcome::Retry { retry_after: None }
        );
    }

    /// Run the schedule with attempts taking no time: the attempt times and the final None.
    fn attempt_times(retry_after: Option<Duration>) -> Vec<Duration> {
        let mut at = Duration::ZERO;
        let mut times = vec![at];
        let mut failed = 1;
        while let Some(wait) = delivery_delay(failed, at, retry_after) {
            at += wait;
            times.push(at);
            failed += 1;
            assert!(failed < 100, "the schedule must end");
        }
        times
    }

    #[test]
    fn retries_follow_the_spec_schedule_and_end_at_24_hours() {
        let h = |h: u64, m: u64, s: u64| Duration::from_secs(h * 3600 + m * 60 + s);
        assert_eq!(
            attempt_times(None),
            [
                h(0, 0, 0),
                h(0, 0, 5),
                h(0, 5, 5),
                h(0, 35, 5),
                h(2, 35, 5),
                h(7, 35, 5),
                h(17, 35, 5),
                h(24, 0, 0),
            ]
        );
    }

    #[test]
    fn first_attempt_is_immediate_and_failures_after_the_window_are_final() {
        assert_eq!(
            delivery_delay(0, Duration::ZERO, None),
            Some(Duration::ZERO)
        );
        assert_eq!(
            delivery_delay(1, Duration::ZERO, None),
            Some(Duration::from_secs(5))
        );
        assert_eq!(delivery_delay(3, DELIVERY_WINDOW, None), None);
        assert_eq!(
            delivery_delay(3, DELIVERY_WINDOW + Duration::from_secs(1), None),
            None
        );
        assert_eq!(
            delivery_delay(3, DELIVERY_WINDOW - Duration::from_secs(30), None),
            None,
            "within the slack"
        );
        assert_eq!(
            delivery_delay(u32::MAX, Duration::ZERO, None),
            Some(DELIVERY_WINDOW),
            "past the table, the last step"
        );
    }

    #[test]
    fn retry_after_can_slow_retries_but_not_hurry_them() {
        let ten_min = Duration::from_secs(600);
        assert_eq!(
            delivery_delay(1, Duration::ZERO, Some(ten_min)),
            Some(ten_min),
            "longer than the 5 s step: honoured"
        );
        assert_eq!(
            delivery_delay(4, Duration::ZERO, Some(Duration::from_secs(1))),
            Some(Duration::from_secs(2 * 3600)),
            "shorter than the 2 h step: the step"
        );
        assert_eq!(
            delivery_delay(1, Duration::ZERO, Some(Duration::from_secs(7 * 24 * 3600))),
            Some(MAX_RETRY_AFTER),
            "capped"
        );
        assert_eq!(
            delivery_delay(2, Duration::from_secs(20 * 3600), Some(MAX_RETRY_AFTER)),
            Some(Duration::from_secs(4 * 3600)),
            "never past the window"
        );
    }

    #[test]
    fn a_receiver_asking_for_long_waits_still_gets_a_bounded_number_of_attempts() {
        let times = attempt_times(Some(Duration::from_secs(3 * 3600)));
        assert_eq!(times.last(), Some(&DELIVERY_WINDOW));
        assert!(times.len() <= 10, "{times:?}");
    }
}
