//! Operational metrics: one definition of the metric set, fed by the use-cases, rendered two
//! ways — CloudWatch Embedded Metric Format lines in the Lambdas ([`emf`]) and the Prometheus
//! text exposition of `sightline serve` ([`prometheus`]).
//!
//! Most metrics are derived from the outcomes the use-cases return ([`observe_analyze`],
//! [`observe_ingest`]); the analyzer adds what no outcome tells: provider 429s, fallback
//! switches, and the tokens and money of every provider call (an answer that lost its race, or
//! invalid answers of a failed image, are paid too). Components write to a [`Recorder`]; the
//! default one, [`NoMetrics`], drops everything.

pub mod emf;
pub mod prometheus;

use std::sync::Arc;
use std::time::Duration;

use sightline_core::pricing::Usage;

use crate::analyze::AnalyzeOutcome;
use crate::ingest::IngestOutcome;
use crate::ports::StoreResult;

/// CloudWatch namespace of every metric.
pub const NAMESPACE: &str = "sightline";
/// Dimension (EMF) / label (Prometheus) naming the function: the Lambda function name on
/// AWS, the role (`resize`, `analyze`, `reconcile`) in `sightline serve`.
pub const FUNCTION_DIMENSION: &str = "Function";
/// Second dimension of the per-model metrics ([`Metric::by_model`]).
pub const MODEL_DIMENSION: &str = "Model";

/// How a metric aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Summed: EMF sums per invocation, Prometheus keeps a `_total` counter.
    Counter,
    /// One value per observation: an EMF value array, a Prometheus histogram.
    Distribution,
    /// A level read at the end of an invocation: the last value counts (EMF one value per
    /// invocation, a Prometheus gauge).
    Gauge,
}

/// Every metric sightline emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Images that got their result (analyze: analysed or served from the cache) or were
    /// resized and queued (resize, reconcile).
    ImagesProcessed,
    /// Images recorded `failed`: a bad image (resize) or a permanent analysis failure.
    ImagesFailed,
    /// Results served from the idempotency cache at $0 (analyze).
    CacheHits,
    /// Messages handed back to the queue to be retried later (analyze).
    Retries,
    /// HTTP 429 answers of the vision provider (analyze; per model).
    ProviderThrottles,
    /// Moves to the next model of the fallback chain (analyze; per model switched away from).
    FallbackSwitches,
    /// Input tokens of provider calls (analyze; per model).
    InputTokens,
    /// Output tokens of provider calls (analyze; per model).
    OutputTokens,
    /// Money of provider calls in USD, from reported usage and the price table (per model).
    CostUsd,
    /// Jobs the reconciler sent again (lost between two writes, or stuck).
    JobsRequeued,
    /// Time to handle one record (an SQS message, an upload), in milliseconds.
    RecordLatency,
    /// Provider batches submitted (batch).
    BatchesSubmitted,
    /// Requests (lines) in the batches submitted (batch).
    BatchRequestsSubmitted,
    /// Batches the provider refused (validation, the enqueued-token limit) (batch).
    BatchesRefused,
    /// Batches that ended and whose lines were reconciled (batch).
    BatchesEnded,
    /// Batch lines answered and booked (batch).
    BatchLinesAnswered,
    /// Batch lines failed for good (their images failed) (batch).
    BatchLinesFailed,
    /// Batch lines back to pending (transient errors, expiry, cancellation) (batch).
    BatchLinesRetried,
    /// Batch items whose images went to the real-time lane after `batch_attempts` (batch).
    BatchItemsToRealtime,
    /// Batches open (submitting or running) at the end of a tick (batch; a gauge).
    BatchesOpen,
    /// Batch items pending at the end of a tick (batch; a gauge).
    BatchItemsPending,
}

impl Metric {
    pub const ALL: [Metric; 21] = [
        Metric::ImagesProcessed,
        Metric::ImagesFailed,
        Metric::CacheHits,
        Metric::Retries,
        Metric::ProviderThrottles,
        Metric::FallbackSwitches,
        Metric::InputTokens,
        Metric::OutputTokens,
        Metric::CostUsd,
        Metric::JobsRequeued,
        Metric::RecordLatency,
        Metric::BatchesSubmitted,
        Metric::BatchRequestsSubmitted,
        Metric::BatchesRefused,
        Metric::BatchesEnded,
        Metric::BatchLinesAnswered,
        Metric::BatchLinesFailed,
        Metric::BatchLinesRetried,
        Metric::BatchItemsToRealtime,
        Metric::BatchesOpen,
        Metric::BatchItemsPending,
    ];

    /// The CloudWatch metric name.
    pub fn name(self) -> &'static str {
        match self {
            Metric::ImagesProcessed => "ImagesProcessed",
            Metric::ImagesFailed => "ImagesFailed",
            Metric::CacheHits => "CacheHits",
            Metric::Retries => "Retries",
            Metric::ProviderThrottles => "ProviderThrottles",
            Metric::FallbackSwitches => "FallbackSwitches",
            Metric::InputTokens => "InputTokens",
            Metric::OutputTokens => "OutputTokens",
            Metric::CostUsd => "CostUsd",
            Metric::JobsRequeued => "JobsRequeued",
            Metric::RecordLatency => "RecordLatency",
            Metric::BatchesSubmitted => "BatchesSubmitted",
            Metric::BatchRequestsSubmitted => "BatchRequestsSubmitted",
            Metric::BatchesRefused => "BatchesRefused",
            Metric::BatchesEnded => "BatchesEnded",
            Metric::BatchLinesAnswered => "BatchLinesAnswered",
            Metric::BatchLinesFailed => "BatchLinesFailed",
            Metric::BatchLinesRetried => "BatchLinesRetried",
            Metric::BatchItemsToRealtime => "BatchItemsToRealtime",
            Metric::BatchesOpen => "BatchesOpen",
            Metric::BatchItemsPending => "BatchItemsPending",
        }
    }

    /// The CloudWatch unit (EMF `Unit`). USD has no CloudWatch unit: `None`.
    pub fn unit(self) -> &'static str {
        match self {
            Metric::CostUsd => "None",
            Metric::RecordLatency => "Milliseconds",
            _ => "Count",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Metric::RecordLatency => Kind::Distribution,
            Metric::BatchesOpen | Metric::BatchItemsPending => Kind::Gauge,
            _ => Kind::Counter,
        }
    }

    /// Whether the metric is also broken down by model (a second dimension set).
    pub fn by_model(self) -> bool {
        matches!(
            self,
            Metric::ProviderThrottles
                | Metric::FallbackSwitches
                | Metric::InputTokens
                | Metric::OutputTokens
                | Metric::CostUsd
        )
    }

    /// The Prometheus family name (counters end in `_total`; latency is in seconds there).
    pub fn prometheus_name(self) -> &'static str {
        match self {
            Metric::ImagesProcessed => "sightline_images_processed_total",
            Metric::ImagesFailed => "sightline_images_failed_total",
            Metric::CacheHits => "sightline_cache_hits_total",
            Metric::Retries => "sightline_retries_total",
            Metric::ProviderThrottles => "sightline_provider_throttles_total",
            Metric::FallbackSwitches => "sightline_fallback_switches_total",
            Metric::InputTokens => "sightline_input_tokens_total",
            Metric::OutputTokens => "sightline_output_tokens_total",
            Metric::CostUsd => "sightline_cost_usd_total",
            Metric::JobsRequeued => "sightline_jobs_requeued_total",
            Metric::RecordLatency => "sightline_record_latency_seconds",
            Metric::BatchesSubmitted => "sightline_batches_submitted_total",
            Metric::BatchRequestsSubmitted => "sightline_batch_requests_submitted_total",
            Metric::BatchesRefused => "sightline_batches_refused_total",
            Metric::BatchesEnded => "sightline_batches_ended_total",
            Metric::BatchLinesAnswered => "sightline_batch_lines_answered_total",
            Metric::BatchLinesFailed => "sightline_batch_lines_failed_total",
            Metric::BatchLinesRetried => "sightline_batch_lines_retried_total",
            Metric::BatchItemsToRealtime => "sightline_batch_items_to_realtime_total",
            Metric::BatchesOpen => "sightline_batches_open",
            Metric::BatchItemsPending => "sightline_batch_items_pending",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Metric::ImagesProcessed => {
                "Images resized and queued (resize, reconcile) or that got their result (analyze)."
            }
            Metric::ImagesFailed => {
                "Images recorded failed (bad image, permanent analysis failure)."
            }
            Metric::CacheHits => "Results served from the idempotency cache at no cost.",
            Metric::Retries => "Messages handed back to the queue to be retried later.",
            Metric::ProviderThrottles => "HTTP 429 answers of the vision provider.",
            Metric::FallbackSwitches => "Switches to the next model of the fallback chain.",
            Metric::InputTokens => "Input tokens of provider calls.",
            Metric::OutputTokens => "Output tokens of provider calls.",
            Metric::CostUsd => "Cost of provider calls in USD (reported usage, price table).",
            Metric::JobsRequeued => "Jobs the reconciler sent again.",
            Metric::RecordLatency => "Time to handle one record (queue message or upload).",
            Metric::BatchesSubmitted => "Provider batches submitted.",
            Metric::BatchRequestsSubmitted => "Requests in the provider batches submitted.",
            Metric::BatchesRefused => "Batches the provider refused.",
            Metric::BatchesEnded => "Batches ended and reconciled.",
            Metric::BatchLinesAnswered => "Batch lines answered and booked.",
            Metric::BatchLinesFailed => "Batch lines failed for good.",
            Metric::BatchLinesRetried => "Batch lines back to pending.",
            Metric::BatchItemsToRealtime => {
                "Batch items sent to the real-time lane after their batch attempts."
            }
            Metric::BatchesOpen => "Batches open at the end of the last tick.",
            Metric::BatchItemsPending => "Batch items pending at the end of the last tick.",
        }
    }

    /// The metric of a CloudWatch name.
    pub fn from_name(name: &str) -> Option<Metric> {
        Metric::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// Where metric events go. `model` matters for [`Metric::by_model`] metrics only.
pub trait Recorder: Send + Sync {
    fn record(&self, metric: Metric, model: Option<&str>, value: f64);
}

/// Drops every event (the default of the use-cases).
pub struct NoMetrics;

impl Recorder for NoMetrics {
    fn record(&self, _: Metric, _: Option<&str>, _: f64) {}
}

/// A recorder that drops everything.
pub fn no_metrics() -> Arc<dyn Recorder> {
    Arc::new(NoMetrics)
}

fn count(yes: bool) -> f64 {
    if yes {
        1.0
    } else {
        0.0
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The metrics of one handled analyze message. Counters are recorded even when zero, so a
/// quiet interval reads 0 rather than "no data".
pub fn observe_analyze(rec: &dyn Recorder, outcome: &AnalyzeOutcome, elapsed: Duration) {
    let processed = matches!(
        outcome,
        AnalyzeOutcome::Done { .. } | AnalyzeOutcome::Cached | AnalyzeOutcome::Reused { .. }
    );
    rec.record(Metric::ImagesProcessed, None, count(processed));
    rec.record(
        Metric::ImagesFailed,
        None,
        count(matches!(outcome, AnalyzeOutcome::Failed(_))),
    );
    rec.record(
        Metric::CacheHits,
        None,
        count(matches!(outcome, AnalyzeOutcome::Cached)),
    );
    rec.record(Metric::Retries, None, count(outcome.is_retry()));
    rec.record(Metric::RecordLatency, None, millis(elapsed));
}

/// The metrics of one upload (resize). A storage error fails the invocation (Lambda's own
/// `Errors` metric) and counts in neither counter.
pub fn observe_ingest(rec: &dyn Recorder, outcome: &StoreResult<IngestOutcome>, elapsed: Duration) {
    rec.record(
        Metric::ImagesProcessed,
        None,
        count(matches!(outcome, Ok(IngestOutcome::Queued(_)))),
    );
    rec.record(
        Metric::ImagesFailed,
        None,
        count(matches!(outcome, Ok(IngestOutcome::Failed { .. }))),
    );
    rec.record(Metric::RecordLatency, None, millis(elapsed));
}

/// The metrics of one tick of the batch lane (zeros too, so a quiet minute reads 0).
pub fn observe_tick(rec: &dyn Recorder, r: &crate::batch::TickReport) {
    for (metric, value) in [
        (Metric::BatchesSubmitted, r.batches_submitted),
        (Metric::BatchRequestsSubmitted, r.requests_submitted),
        (Metric::BatchesRefused, r.batches_failed),
        (Metric::BatchesEnded, r.batches_ended),
        (Metric::BatchLinesAnswered, r.lines_answered),
        (Metric::BatchLinesFailed, r.lines_failed),
        (Metric::BatchLinesRetried, r.lines_retried),
        (Metric::BatchItemsToRealtime, r.items_to_realtime),
        (Metric::CacheHits, r.items_cached),
        (Metric::BatchesOpen, r.open_batches),
        (Metric::BatchItemsPending, r.pending_items),
    ] {
        rec.record(metric, None, value as f64);
    }
}

/// Tokens and money of the provider calls made with `model` for one job.
pub fn observe_spend(rec: &dyn Recorder, model: &str, usage: &Usage, cost_usd: f64) {
    rec.record(Metric::InputTokens, Some(model), usage.input_tokens as f64);
    rec.record(
        Metric::OutputTokens,
        Some(model),
        usage.output_tokens as f64,
    );
    rec.record(Metric::CostUsd, Some(model), cost_usd);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_distinct_names_and_a_known_unit() {
        let mut names: Vec<_> = Metric::ALL.iter().map(|m| m.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Metric::ALL.len());
        for m in Metric::ALL {
            assert_eq!(Metric::from_name(m.name()), Some(m));
            assert!(["Count", "Milliseconds", "None"].contains(&m.unit()));
            let p = m.prometheus_name();
            assert!(p.starts_with("sightline_"));
            assert_eq!(p.ends_with("_total"), m.kind() == Kind::Counter, "{p}");
        }
    }
}
