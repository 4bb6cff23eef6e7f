//! The batch lane's pure rules: lanes, `custom_id`s, splitting requests by the providers'
//! count and byte limits, and what a provider's batch status means.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How an image reaches the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    /// One call per image, now, at the real-time price.
    #[default]
    Realtime,
    /// Grouped into a provider batch: answered within 24 h at the batch price (half).
    Batch,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Realtime => "realtime",
            Lane::Batch => "batch",
        }
    }

    /// `realtime` or `batch` (any case; `real-time` too).
    pub fn parse(s: &str) -> Option<Lane> {
        match s.trim().to_ascii_lowercase().as_str() {
            "realtime" | "real-time" => Some(Lane::Realtime),
            "batch" => Some(Lane::Batch),
            _ => None,
        }
    }

    pub fn is_realtime(&self) -> bool {
        *self == Lane::Realtime
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `custom_id` of an idempotency key's batch request: the key's sha256 in hex. 64
/// characters of `[0-9a-f]` fit both OpenAI's rules and Anthropic's `[A-Za-z0-9_-]{1,64}`; the
/// store maps it back to the key exactly (the item is stored under it with its key).
pub fn custom_id(idempotency_key: &str) -> String {
    hex::encode(Sha256::digest(idempotency_key.as_bytes()))
}

/// Whether `s` could be a `custom_id` we made (a provider's line is checked before lookup).
pub fn is_custom_id(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// What one provider batch may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_requests: usize,
    /// Bytes of the whole submission (the JSONL file, or the JSON body).
    pub max_bytes: usize,
    /// Bytes each request adds besides its own encoding (a newline, a comma).
    pub per_request_overhead: usize,
    /// Bytes the submission has besides its requests (a JSON envelope).
    pub envelope_bytes: usize,
}

/// OpenAI Batch API: one JSONL input file of at most 50,000 requests and 200 MB.
pub const OPENAI_BATCH_LIMITS: BatchLimits = BatchLimits {
    max_requests: 50_000,
    max_bytes: 200 * 1024 * 1024,
    per_request_overhead: 1,
    envelope_bytes: 0,
};

/// Anthropic Message Batches: at most 100,000 requests and 256 MB in one `{"requests":[…]}` body.
pub const ANTHROPIC_BATCH_LIMITS: BatchLimits = BatchLimits {
    max_requests: 100_000,
    max_bytes: 256 * 1024 * 1024,
    per_request_overhead: 1,
    envelope_bytes: 16,
};

impl BatchLimits {
    /// The tighter of two limits (a provider's and the settings').
    pub fn min(self, max_requests: usize, max_bytes: usize) -> BatchLimits {
        BatchLimits {
            max_requests: self.max_requests.min(max_requests).max(1),
            max_bytes: self.max_bytes.min(max_bytes),
            ..self
        }
    }
}

/// How requests of the given encoded sizes go into batches, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Split {
    /// Consecutive index ranges, each within the limits.
    pub batches: Vec<Range<usize>>,
    /// Requests too large for any batch on their own.
    pub oversize: Vec<usize>,
}

/// Where one more request goes (see [`Packer::offer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pack {
    /// Into the current batch.
    Fits,
    /// The current batch is full: close it; the request opens the next one.
    Full,
    /// Too large for any batch on its own: never submitted.
    Oversize,
}

/// Fills batches one request at a time within the count and byte limits: with base64 images of
/// a few hundred KB the bytes bind long before the count. The one packing rule, used both to
/// split sizes known up front and by the submitter as it encodes requests.
#[derive(Debug, Clone)]
pub struct Packer {
    limits: BatchLimits,
    count: usize,
    bytes: usize,
}

impl Packer {
    pub fn new(limits: BatchLimits) -> Packer {
        Packer {
            limits,
            count: 0,
            bytes: limits.envelope_bytes,
        }
    }

    /// Place a request of `size` encoded bytes (see [`Pack`]).
    pub fn offer(&mut self, size: usize) -> Pack {
        let need = size.saturating_add(self.limits.per_request_overhead);
        if self.limits.envelope_bytes.saturating_add(need) > self.limits.max_bytes {
            return Pack::Oversize;
        }
        let fits = self.count < self.limits.max_requests
            && self.bytes.saturating_add(need) <= self.limits.max_bytes;
        let pack = if fits || self.count == 0 {
            Pack::Fits
        } else {
            self.count = 0;
            self.bytes = self.limits.envelope_bytes;
            Pack::Full
        };
        self.count += 1;
        self.bytes += need;
        pack
    }
}

/// Pack requests of the given encoded sizes into batches, in order (see [`Packer`]).
pub fn split_by_limits(sizes: &[usize], limits: &BatchLimits) -> Split {
    let mut split = Split::default();
    let mut packer = Packer::new(*limits);
    let mut start: Option<usize> = None;
    for (i, &size) in sizes.iter().enumerate() {
        match packer.offer(size) {
            Pack::Oversize => {
                // Ranges hold consecutive requests: an oversize one ends the current batch.
                split.oversize.push(i);
                if let Some(s) = start.take() {
                    split.batches.push(s..i);
                }
                packer = Packer::new(*limits);
            }
            Pack::Fits => {
                start.get_or_insert(i);
            }
            Pack::Full => {
                if let Some(s) = start.replace(i) {
                    split.batches.push(s..i);
                }
            }
        }
    }
    if let Some(s) = start {
        split.batches.push(s..sizes.len());
    }
    split
}

/// Where a provider batch is, whatever the provider calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchPhase {
    /// Accepted and not ended yet (validating, in progress, finalizing, cancelling).
    Running,
    /// Ended with lines to read: completed, expired (part of the lines done) or cancelled.
    Ended,
    /// Refused as a whole before any line ran (validation, the enqueued-token limit): no line
    /// was processed or billed.
    Failed,
}

/// OpenAI batch `status` → phase. Unknown statuses are taken as still running (polled again).
pub fn openai_phase(status: &str) -> BatchPhase {
    match status {
        "completed" | "expired" | "cancelled" => BatchPhase::Ended,
        "failed" => BatchPhase::Failed,
        // validating, in_progress, finalizing, cancelling
        _ => BatchPhase::Running,
    }
}

/// Anthropic `processing_status` → phase (`in_progress`, `canceling`, `ended`).
pub fn anthropic_phase(processing_status: &str) -> BatchPhase {
    match processing_status {
        "ended" => BatchPhase::Ended,
        _ => BatchPhase::Running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: BatchLimits = BatchLimits {
        max_requests: 3,
        max_bytes: 100,
        per_request_overhead: 1,
        envelope_bytes: 0,
    };

    #[test]
    fn custom_ids_fit_both_providers_and_differ_per_key() {
        let a = custom_id("t:acme/abc:gpt-4.1-mini:v1:high:400");
        let b = custom_id("t:acme/abc:gpt-4.1-mini:v1:low:400");
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-'));
        assert!(is_custom_id(&a));
        assert!(!is_custom_id("short"));
        assert!(!is_custom_id(&a.to_uppercase()));
        assert_eq!(custom_id("k"), custom_id("k"), "stable");
    }

    #[test]
    fn the_byte_limit_splits_before_the_count_does() {
        // Ten 30-byte lines: 31 bytes each with the newline; 3 fit in 100 bytes by bytes, and
        // the count limit is 3 too; with 40-byte lines only 2 fit.
        let split = split_by_limits(&[40; 5], &SMALL);
        assert_eq!(split.batches, vec![0..2, 2..4, 4..5]);
        assert!(split.oversize.is_empty());
        let split = split_by_limits(&[10; 7], &SMALL);
        assert_eq!(split.batches, vec![0..3, 3..6, 6..7], "count binds");
    }

    #[test]
    fn every_batch_stays_within_both_limits_and_keeps_every_request() {
        let sizes: Vec<usize> = (0..200).map(|i| (i * 37 % 90) + 1).collect();
        let split = split_by_limits(&sizes, &SMALL);
        let mut seen = 0;
        for r in &split.batches {
            assert!(r.len() <= SMALL.max_requests, "{r:?}");
            let bytes: usize = sizes[r.clone()].iter().map(|s| s + 1).sum();
            assert!(bytes <= SMALL.max_bytes, "{r:?}: {bytes}");
            assert_eq!(r.start, seen, "in order, nothing skipped");
            seen = r.end;
        }
        assert_eq!(seen, sizes.len());
    }

    #[test]
    fn a_request_over_the_byte_limit_alone_is_oversize_not_submitted() {
        let split = split_by_limits(&[10, 150, 10, 99, 10], &SMALL);
        assert_eq!(split.oversize, vec![1]);
        // 99 + 1 = 100 fits exactly, alone.
        assert_eq!(split.batches, vec![0..1, 2..3, 3..4, 4..5]);
    }

    #[test]
    fn an_envelope_counts_against_the_byte_limit() {
        let limits = BatchLimits {
            envelope_bytes: 20,
            ..SMALL
        };
        let split = split_by_limits(&[39, 39], &limits);
        assert_eq!(split.batches, vec![0..2], "20 + 2 × 40 = 100");
        let split = split_by_limits(&[40, 40], &limits);
        assert_eq!(split.batches, vec![0..1, 1..2]);
        assert!(split_by_limits(&[80], &limits).oversize == vec![0]);
    }

    #[test]
    fn provider_statuses_map_to_phases() {
        for s in ["validating", "in_progress", "finalizing", "cancelling"] {
            assert_eq!(openai_phase(s), BatchPhase::Running, "{s}");
        }
        for s in ["completed", "expired", "cancelled"] {
            assert_eq!(openai_phase(s), BatchPhase::Ended, "{s}");
        }
        assert_eq!(openai_phase("failed"), BatchPhase::Failed);
        assert_eq!(anthropic_phase("in_progress"), BatchPhase::Running);
        assert_eq!(anthropic_phase("canceling"), BatchPhase::Running);
        assert_eq!(anthropic_phase("ended"), BatchPhase::Ended);
    }

    #[test]
    fn lanes_parse_and_print() {
        assert_eq!(Lane::parse(" Batch "), Some(Lane::Batch));
        assert_eq!(Lane::parse("real-time"), Some(Lane::Realtime));
        assert_eq!(Lane::parse("slow"), None);
        assert_eq!(Lane::default(), Lane::Realtime);
        assert_eq!(Lane::Batch.to_string(), "batch");
    }
}
