//! CloudWatch Embedded Metric Format: metric events of one Lambda invocation, written as JSON log
//! lines that CloudWatch Logs turns into metrics (no PutMetricData call, no extra IAM).
//!
//! One [`EmfBatch`] collects an invocation's events; [`Emf::flush`] writes at most:
//! - one document with dimension set `[Function]`: the summed counters and up to 100 latency
//!   values (EMF takes an array of values per metric; more go into further documents);
//! - one document per model with dimension sets `[Function]` and `[Function, Model]` for the
//!   per-model counters (tokens, cost, throttles, fallback switches), so they sum per function
//!   and break down per model.
//!
//! Lines go to a [`LineSink`]: stdout in Lambda ([`StdoutLines`]), memory in tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::{Kind, Metric, Recorder, FUNCTION_DIMENSION, MODEL_DIMENSION, NAMESPACE};

/// Most values EMF takes in one metric's value array.
pub const MAX_VALUES: usize = 100;

/// Where EMF lines are written, one JSON document per call.
pub trait LineSink: Send + Sync {
    fn write_line(&self, line: &str);
}

/// Standard output, where Lambda captures logs (and so EMF) for CloudWatch Logs.
pub struct StdoutLines;

impl LineSink for StdoutLines {
    fn write_line(&self, line: &str) {
        use std::io::Write;
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        // One write under the lock: a log line written at the same time never splits it.
        let mut out = std::io::stdout().lock();
        // Nowhere better to report a broken stdout: the logs go there too.
        let _ = out.write_all(&buf).and_then(|()| out.flush());
    }
}

/// Keeps the lines in memory (tests).
#[derive(Default)]
pub struct MemoryLines {
    lines: Mutex<Vec<String>>,
}

impl MemoryLines {
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }
}

impl LineSink for MemoryLines {
    fn write_line(&self, line: &str) {
        lock(&self.lines).push(line.to_string());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct Tally {
    /// Counters without a model.
    totals: BTreeMap<Metric, f64>,
    /// Per-model counters, by model.
    models: BTreeMap<String, BTreeMap<Metric, f64>>,
    /// Observations of distributions.
    values: BTreeMap<Metric, Vec<f64>>,
}

/// The metric events of one invocation.
#[derive(Default)]
pub struct EmfBatch {
    tally: Mutex<Tally>,
}

impl Recorder for EmfBatch {
    fn record(&self, metric: Metric, model: Option<&str>, value: f64) {
        if !value.is_finite() {
            return;
        }
        let mut t = lock(&self.tally);
        match (metric.kind(), model) {
            (Kind::Distribution, _) => t.values.entry(metric).or_default().push(value),
            (Kind::Counter, Some(model)) if metric.by_model() => {
                *t.models
                    .entry(model.to_string())
                    .or_default()
                    .entry(metric)
                    .or_default() += value
            }
            (Kind::Counter, _) => *t.totals.entry(metric).or_default() += value,
            // The level at the end of the invocation.
            (Kind::Gauge, _) => {
                t.totals.insert(metric, value);
            }
        }
    }
}

impl EmfBatch {
    /// The EMF documents of everything recorded so far, which is then forgotten.
    pub fn take_documents(&self, function: &str, timestamp_ms: u64) -> Vec<Value> {
        let t = std::mem::take(&mut *lock(&self.tally));
        let mut docs = Vec::new();
        let mut first: Vec<(Metric, Value)> =
            t.totals.into_iter().map(|(m, v)| (m, json!(v))).collect();
        let mut more = Vec::new();
        for (metric, values) in t.values {
            let mut chunks = values.chunks(MAX_VALUES);
            if let Some(c) = chunks.next() {
                first.push((metric, json!(c)));
            }
            more.extend(chunks.map(|c| vec![(metric, json!(c))]));
        }
        if !first.is_empty() {
            docs.push(document(function, None, timestamp_ms, first));
        }
        docs.extend(
            more.into_iter()
                .map(|values| document(function, None, timestamp_ms, values)),
        );
        for (model, counters) in t.models {
            let values = counters.into_iter().map(|(m, v)| (m, json!(v))).collect();
            docs.push(document(function, Some(&model), timestamp_ms, values));
        }
        docs
    }
}

/// One EMF document: the `_aws` metadata, the dimension values and the metric values.
fn document(
    function: &str,
    model: Option<&str>,
    timestamp_ms: u64,
    values: Vec<(Metric, Value)>,
) -> Value {
    let mut dimensions = vec![json!([FUNCTION_DIMENSION])];
    if model.is_some() {
        dimensions.push(json!([FUNCTION_DIMENSION, MODEL_DIMENSION]));
    }
    let metrics: Vec<Value> = values
        .iter()
        .map(|(m, _)| json!({"Name": m.name(), "Unit": m.unit()}))
        .collect();
    let mut root = Map::new();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": dimensions,
                "Metrics": metrics,
            }],
        }),
    );
    root.insert(FUNCTION_DIMENSION.into(), json!(function));
    if let Some(model) = model {
        root.insert(MODEL_DIMENSION.into(), json!(model));
    }
    for (m, v) in values {
        root.insert(m.name().into(), v);
    }
    Value::Object(root)
}

/// Writes the EMF lines of a function's invocations.
#[derive(Clone)]
pub struct Emf {
    function: String,
    sink: Arc<dyn LineSink>,
}

/// Set by Lambda to the function's name (what `Ref` of the function gives in the template).
pub const FUNCTION_NAME_ENV: &str = "AWS_LAMBDA_FUNCTION_NAME";

impl Emf {
    /// `function` is the value of the Function dimension.
    pub fn new(function: impl Into<String>, sink: Arc<dyn LineSink>) -> Emf {
        Emf {
            function: function.into(),
            sink,
        }
    }

    /// For a Lambda function: stdout, dimension Function = the function's name (so the
    /// template's dashboard can name it), else `role` (outside Lambda).
    pub fn lambda(role: &str) -> Emf {
        let name = std::env::var(FUNCTION_NAME_ENV)
            .ok()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| role.to_string());
        Emf::new(name, Arc::new(StdoutLines))
    }

    pub fn function(&self) -> &str {
        &self.function
    }

    /// Write the batch's documents (nothing when nothing was recorded) and empty it.
    pub fn flush(&self, batch: &EmfBatch) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for doc in batch.take_documents(&self.function, now_ms) {
            self.sink.write_line(&doc.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric_names(doc: &Value) -> Vec<String> {
        doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_batch_sums_counters_and_keeps_latencies_per_invocation() {
        let b = EmfBatch::default();
        b.record(Metric::ImagesProcessed, None, 1.0);
        b.record(Metric::ImagesProcessed, None, 1.0);
        b.record(Metric::Retries, None, 0.0);
        b.record(Metric::RecordLatency, None, 12.5);
        b.record(Metric::RecordLatency, None, 30.0);
        b.record(Metric::InputTokens, Some("m1"), 100.0);
        b.record(Metric::InputTokens, Some("m1"), 50.0);
        b.record(Metric::CostUsd, Some("m2"), 0.25);
        b.record(Metric::CostUsd, Some("m2"), f64::NAN);
        let docs = b.take_documents("fn-a", 1_700_000_000_000);
        assert_eq!(docs.len(), 3, "{docs:?}");

        let d = &docs[0];
        assert_eq!(d["_aws"]["Timestamp"], 1_700_000_000_000u64);
        let directive = &d["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "sightline");
        assert_eq!(directive["Dimensions"], json!([["Function"]]));
        assert_eq!(d["Function"], "fn-a");
        assert_eq!(
            metric_names(d),
            vec!["ImagesProcessed", "Retries", "RecordLatency"]
        );
        assert_eq!(d["ImagesProcessed"], 2.0);
        assert_eq!(d["Retries"], 0.0);
        assert_eq!(d["RecordLatency"], json!([12.5, 30.0]));
        assert!(directive["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["Name"] == "RecordLatency" && m["Unit"] == "Milliseconds"));

        let m1 = &docs[1];
        assert_eq!(
            m1["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([["Function"], ["Function", "Model"]])
        );
        assert_eq!(
            (m1["Model"].as_str(), m1["InputTokens"].as_f64()),
            (Some("m1"), Some(150.0))
        );
        let m2 = &docs[2];
        assert_eq!(
            (m2["Model"].as_str(), m2["CostUsd"].as_f64()),
            (Some("m2"), Some(0.25))
        );
        assert_eq!(
            m2["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"],
            "None"
        );

        // Taken: a second flush of the same batch writes nothing.
        assert!(b.take_documents("fn-a", 1).is_empty());
    }

    #[test]
    fn more_than_a_hundred_latencies_spread_over_several_documents() {
        let b = EmfBatch::default();
        for i in 0..250 {
            b.record(Metric::RecordLatency, None, f64::from(i));
        }
        let docs = b.take_documents("f", 0);
        let sizes: Vec<usize> = docs
            .iter()
            .map(|d| d["RecordLatency"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, vec![100, 100, 50]);
    }

    #[test]
    fn flush_writes_one_json_line_per_document() {
        let sink = Arc::new(MemoryLines::default());
        let emf = Emf::new("resize-fn", sink.clone());
        let b = EmfBatch::default();
        emf.flush(&b);
        assert!(sink.lines().is_empty(), "nothing recorded, nothing written");
        b.record(Metric::ImagesFailed, None, 1.0);
        emf.flush(&b);
        let lines = sink.lines();
        assert_eq!(lines.len(), 1);
        assert!(!lines[0].contains('\n'));
        let doc: Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(doc["Function"], "resize-fn");
        assert_eq!(doc["ImagesFailed"], 1.0);
        assert!(doc["_aws"]["Timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    }
}
