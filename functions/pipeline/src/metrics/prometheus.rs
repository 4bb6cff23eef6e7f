//! Prometheus text exposition (format 0.0.4) of the metric events of a long-running process
//! (`sightline serve`): each counter as `<name>_total{function, model?}`, the record latency as
//! a histogram in seconds.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Kind, Metric, Recorder};

/// `Content-Type` of [`Registry::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the latency histogram's buckets: a resize takes tens of
/// milliseconds to seconds, a provider call up to a minute or two with retries.
pub const LATENCY_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// (function, model) of a counter sample.
type Labels = (String, Option<String>);

#[derive(Default, Clone)]
struct Histogram {
    /// Observations per bucket (not cumulative); the last slot is above every bound.
    buckets: [u64; LATENCY_BUCKETS.len() + 1],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct State {
    counters: BTreeMap<(Metric, Labels), f64>,
    histograms: BTreeMap<(Metric, String), Histogram>,
}

/// Cumulative metrics of the process, by function (and model).
#[derive(Default)]
pub struct Registry {
    state: Mutex<State>,
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    /// A recorder whose events carry `function = "{function}"`.
    pub fn recorder(self: &Arc<Self>, function: &str) -> Arc<dyn Recorder> {
        Arc::new(Labelled {
            registry: self.clone(),
            function: function.to_string(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add(&self, function: &str, metric: Metric, model: Option<&str>, value: f64) {
        if !value.is_finite() {
            return;
        }
        let mut s = self.state();
        match metric.kind() {
            Kind::Counter => {
                let model = model.filter(|_| metric.by_model()).map(str::to_string);
                *s.counters
                    .entry((metric, (function.to_string(), model)))
                    .or_default() += value;
            }
            Kind::Gauge => {
                s.counters
                    .insert((metric, (function.to_string(), None)), value);
            }
            Kind::Distribution => {
                // Recorded in milliseconds (the CloudWatch unit); Prometheus wants seconds.
                let seconds = value / 1000.0;
                let h = s
                    .histograms
                    .entry((metric, function.to_string()))
                    .or_default();
                let slot = LATENCY_BUCKETS
                    .iter()
                    .position(|&bound| seconds <= bound)
                    .unwrap_or(LATENCY_BUCKETS.len());
                h.buckets[slot] += 1;
                h.count += 1;
                h.sum += seconds;
            }
        }
    }

    /// The exposition text: `# HELP` and `# TYPE` for every metric, then its samples.
    pub fn render(&self) -> String {
        let (counters, histograms) = {
            let s = self.state();
            (s.counters.clone(), s.histograms.clone())
        };
        let mut out = String::new();
        for metric in Metric::ALL {
            let name = metric.prometheus_name();
            let kind = match metric.kind() {
                Kind::Counter => "counter",
                Kind::Distribution => "histogram",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {name} {}", escape_help(metric.help()));
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for ((_, (function, model)), value) in
                counters.iter().filter(|((m, _), _)| *m == metric)
            {
                let mut labels = vec![("function", function.as_str())];
                if let Some(model) = model {
                    labels.push(("model", model.as_str()));
                }
                let _ = writeln!(out, "{name}{} {value}", label_set(&labels));
            }
            for ((_, function), h) in histograms.iter().filter(|((m, _), _)| *m == metric) {
                let mut cumulative = 0;
                for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                    cumulative += h.buckets[i];
                    let le = bound.to_string();
                    let labels = label_set(&[("function", function), ("le", &le)]);
                    let _ = writeln!(out, "{name}_bucket{labels} {cumulative}");
                }
                let labels = label_set(&[("function", function), ("le", "+Inf")]);
                let _ = writeln!(out, "{name}_bucket{labels} {}", h.count);
                let labels = label_set(&[("function", function)]);
                let _ = writeln!(out, "{name}_sum{labels} {}", h.sum);
                let _ = writeln!(out, "{name}_count{labels} {}", h.count);
            }
        }
        out
    }
}

/// Append one gauge family with a single sample (values read at scrape time, e.g. queue depth).
pub fn write_gauge(out: &mut String, name: &str, help: &str, labels: &[(&str, &str)], value: f64) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} gauge");
    let _ = writeln!(out, "{name}{} {value}", label_set(labels));
}

struct Labelled {
    registry: Arc<Registry>,
    function: String,
}

impl Recorder for Labelled {
    fn record(&self, metric: Metric, model: Option<&str>, value: f64) {
        self.registry.add(&self.function, metric, model, value);
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn label_set(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn gauges_keep_the_last_level() {
        let r = Registry::new();
        let batch = r.recorder("batch");
        batch.record(Metric::BatchItemsPending, None, 7.0);
        batch.record(Metric::BatchItemsPending, None, 3.0);
        batch.record(Metric::BatchesSubmitted, None, 1.0);
        batch.record(Metric::BatchesSubmitted, None, 1.0);
        let text = r.render();
        assert!(text.contains("# TYPE sightline_batch_items_pending gauge"));
        assert_eq!(
            sample(&text, r#"sightline_batch_items_pending{function="batch"}"#),
            Some(3.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"sightline_batches_submitted_total{function="batch"}"#
            ),
            Some(2.0)
        );
    }

    #[test]
    fn counters_render_with_help_type_and_labels() {
        let r = Registry::new();
        let analyze = r.recorder("analyze");
        analyze.record(Metric::ImagesProcessed, None, 1.0);
        analyze.record(Metric::ImagesProcessed, Some("ignored"), 1.0);
        analyze.record(Metric::CostUsd, Some("gpt-4o"), 0.5);
        analyze.record(Metric::CostUsd, Some("gpt-4o"), 0.25);
        r.recorder("resize").record(Metric::ImagesFailed, None, 1.0);
        let text = r.render();
        for m in Metric::ALL {
            assert!(text.contains(&format!("# HELP {} ", m.prometheus_name())));
            assert!(text.contains(&format!("# TYPE {} ", m.prometheus_name())));
        }
        assert!(text.contains("# TYPE sightline_images_processed_total counter"));
        assert_eq!(
            sample(
                &text,
                r#"sightline_images_processed_total{function="analyze"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"sightline_cost_usd_total{function="analyze",model="gpt-4o"}"#
            ),
            Some(0.75)
        );
        assert_eq!(
            sample(&text, r#"sightline_images_failed_total{function="resize"}"#),
            Some(1.0)
        );
    }

    #[test]
    fn latency_is_a_cumulative_histogram_in_seconds() {
        let r = Registry::new();
        let rec = r.recorder("analyze");
        for ms in [5.0, 40.0, 40.0, 2_000.0, 500_000.0] {
            rec.record(Metric::RecordLatency, None, ms);
        }
        let text = r.render();
        assert!(text.contains("# TYPE sightline_record_latency_seconds histogram"));
        let bucket = |le: &str| {
            sample(
                &text,
                &format!(
                    r#"sightline_record_latency_seconds_bucket{{function="analyze",le="{le}"}}"#
                ),
            )
        };
        assert_eq!(bucket("0.01"), Some(1.0));
        assert_eq!(bucket("0.05"), Some(3.0));
        assert_eq!(bucket("2.5"), Some(4.0));
        assert_eq!(bucket("120"), Some(4.0));
        assert_eq!(bucket("+Inf"), Some(5.0));
        assert_eq!(
            sample(
                &text,
                r#"sightline_record_latency_seconds_count{function="analyze"}"#
            ),
            Some(5.0)
        );
        let sum = sample(
            &text,
            r#"sightline_record_latency_seconds_sum{function="analyze"}"#,
        )
        .unwrap();
        assert!((sum - 502.085).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            label_set(&[("model", "a\"b\\c\nd")]),
            r#"{model="a\"b\\c\nd"}"#
        );
        let mut out = String::new();
        write_gauge(&mut out, "q", "depth", &[("queue", "analyze")], 3.0);
        assert_eq!(
            out,
            "# HELP q depth\n# TYPE q gauge\nq{queue=\"analyze\"} 3\n"
        );
    }
}
