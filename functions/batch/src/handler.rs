//! sightline-batch: an EventBridge schedule → one [`BatchLane::tick`] per invocation.
//!
//! A tick polls every open batch (reconciling the ended ones line by line) and submits the
//! pending items that are due (a full group, or one whose oldest item waited
//! `batch_max_wait`). Every step is conditional on the state it read, so two ticks that
//! overlap (a slow tick and the next minute's) take nothing twice and book nothing twice.
//!
//! Any event ticks: the schedule's, or any JSON of a manual invocation. A store error fails
//! the invocation (Lambda retries the asynchronous invocation; the next minute's tick carries
//! on anyway). With the local analyzer there is no batch API: the analyzer then answers
//! batch-lane jobs in real time, and each invocation only says so.
//!
//! Each invocation writes one EMF document: the tick's counts (batches submitted, refused and
//! ended; lines answered, failed and retried; items sent to the real-time lane; cache hits)
//! and the open batches and pending items left (gauges), besides the provider spend the
//! reconciliation records per model.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::sync::Arc;

use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use sightline_pipeline::batch::{BatchError, BatchLane, TickReport};
use sightline_pipeline::metrics::emf::{Emf, EmfBatch};
use sightline_pipeline::metrics::observe_tick;
use tracing::{info, warn};

#[derive(Clone)]
pub struct BatchHandler {
    /// None when the provider has no batch API (the local analyzer).
    pub lane: Option<BatchLane>,
    /// Where each invocation's metrics are written (stdout in Lambda).
    pub emf: Emf,
}

impl BatchHandler {
    pub fn new(lane: Option<BatchLane>) -> BatchHandler {
        BatchHandler {
            lane,
            emf: Emf::lambda("batch"),
        }
    }

    /// Handle one invocation: one tick, its report logged, returned and written as metrics.
    pub async fn handle(&self, event: serde_json::Value) -> Result<TickReport, BatchError> {
        match serde_json::from_value::<EventBridgeEvent>(event) {
            Ok(e) => info!(
                event_id = e.id.as_deref().unwrap_or_default(),
                time = ?e.time,
                source = %e.source,
                detail_type = %e.detail_type,
                "scheduled batch tick"
            ),
            Err(_) => info!("batch tick invoked without an EventBridge event (manual run)"),
        }
        let batch = Arc::new(EmfBatch::default());
        let report = match &self.lane {
            Some(lane) => {
                let mut lane = lane.clone();
                lane.metrics = batch.clone();
                lane.tick(false).await
            }
            None => {
                warn!("the provider has no batch API (local analyzer): nothing to tick");
                Ok(TickReport::default())
            }
        };
        if let Ok(r) = &report {
            observe_tick(&*batch, r);
        }
        self.emf.flush(&batch);
        let report = report?;
        info!(?report, "batch tick finished");
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use serde_json::{json, Value};
    use sightline_core::batch::{BatchLimits, BatchPhase, OPENAI_BATCH_LIMITS};
    use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
    use sightline_pipeline::metrics::emf::MemoryLines;
    use sightline_pipeline::ports::{
        rfc3339, BatchLine, BatchProvider, BatchRecord, BatchRequest, BatchState, BatchStore,
        Clock, ProviderBatch, ProviderError, SystemClock,
    };
    use sightline_pipeline::Settings;

    /// A provider whose batches all still run (a tick only polls them).
    struct StillRunning;

    #[async_trait]
    impl BatchProvider for StillRunning {
        fn name(&self) -> &str {
            "openai"
        }
        fn limits(&self) -> BatchLimits {
            OPENAI_BATCH_LIMITS
        }
        fn encode(&self, _: &BatchRequest) -> Result<Vec<u8>, ProviderError> {
            panic!("nothing is pending: nothing to encode")
        }
        async fn submit(&self, _: &str, _: Vec<Vec<u8>>) -> Result<String, ProviderError> {
            panic!("nothing is pending: nothing to submit")
        }
        async fn status(&self, id: &str) -> Result<ProviderBatch, ProviderError> {
            Ok(ProviderBatch {
                provider_batch_id: id.to_string(),
                status: "in_progress".into(),
                phase: BatchPhase::Running,
                error: None,
            })
        }
        async fn results(&self, _: &str) -> Result<Vec<BatchLine>, ProviderError> {
            panic!("a running batch has no results")
        }
        async fn find(&self, _: &str, _: u64) -> Result<Option<String>, ProviderError> {
            Ok(None)
        }
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<SqliteRepository>,
        handler: BatchHandler,
        emf: Arc<MemoryLines>,
    }

    fn fixture(with_lane: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteDb::in_memory().unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let store = Arc::new(SqliteRepository::new(db.clone()));
        let lane = with_lane.then(|| BatchLane {
            blobs: Arc::new(FileBlobStore::new(dir.path())),
            repo: store.clone(),
            store: store.clone(),
            provider: Arc::new(StillRunning),
            queue: Arc::new(SqliteQueue::new(db, "analyze", 5, clock.clone())),
            settings: Arc::new(Settings::default()),
            clock,
            metrics: sightline_pipeline::metrics::no_metrics(),
            search: None,
        });
        let mut handler = BatchHandler::new(lane);
        let emf = Arc::new(MemoryLines::default());
        handler.emf = Emf::new("batch-fn", emf.clone());
        Fixture {
            _dir: dir,
            store,
            handler,
            emf,
        }
    }

    /// The one EMF document of the invocation.
    fn document(f: &Fixture) -> Value {
        let lines = f.emf.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        serde_json::from_str(&lines[0]).unwrap()
    }

    fn scheduled_event() -> Value {
        json!({
            "version": "0", "id": "e-1", "detail-type": "Scheduled Event",
            "source": "aws.events", "account": "123456789012",
            "time": "2026-05-01T00:00:00Z", "region": "eu-west-1",
            "resources": ["arn:aws:events:eu-west-1:123456789012:rule/batch"], "detail": {}
        })
    }

    fn running_batch(id: &str) -> BatchRecord {
        let now = SystemClock.now_ms();
        BatchRecord {
            batch_id: id.into(),
            tenant: "acme".into(),
            provider: "openai".into(),
            model: "gpt-4.1-mini".into(),
            state: BatchState::Running,
            provider_batch_id: Some(format!("pb-{id}")),
            provider_status: Some("in_progress".into()),
            error: None,
            requests: 2,
            counts: Default::default(),
            cost_usd: 0.0,
            saved_usd: 0.0,
            hold: None,
            created_at: rfc3339(now),
            created_ms: now,
            submitted_at: Some(rfc3339(now)),
            ended_at: None,
        }
    }

    #[tokio::test]
    async fn a_scheduled_tick_polls_open_batches_and_reports_them() {
        let f = fixture(true);
        f.store.put_batch(&running_batch("b1")).await.unwrap();
        f.store.put_batch(&running_batch("b2")).await.unwrap();
        let report = f.handler.handle(scheduled_event()).await.unwrap();
        assert_eq!(
            report,
            TickReport {
                open_batches: 2,
                ..TickReport::default()
            }
        );
        let doc = document(&f);
        assert_eq!(doc["Function"], "batch-fn");
        assert_eq!(doc["BatchesOpen"], 2.0);
        assert_eq!(doc["BatchItemsPending"], 0.0);
        assert_eq!(doc["BatchesSubmitted"], 0.0);
        // Still running: polled, left open, its provider status kept.
        let b1 = f.store.get_batch("b1").await.unwrap().unwrap();
        assert_eq!(b1.state, BatchState::Running);
    }

    #[tokio::test]
    async fn any_event_ticks_a_manual_run_too() {
        let f = fixture(true);
        f.store.put_batch(&running_batch("b1")).await.unwrap();
        for event in [json!({}), json!("tick"), Value::Null] {
            let report = f.handler.handle(event).await.unwrap();
            assert_eq!(report.open_batches, 1);
        }
        assert_eq!(f.emf.lines().len(), 3);
    }

    #[tokio::test]
    async fn without_a_batch_api_it_reports_nothing_to_do() {
        let f = fixture(false);
        let report = f.handler.handle(scheduled_event()).await.unwrap();
        assert!(report.is_idle());
        let doc = document(&f);
        assert_eq!(doc["BatchesOpen"], 0.0);
        assert_eq!(doc["BatchLinesAnswered"], 0.0);
    }

    #[test]
    fn the_tick_report_becomes_the_batch_metrics() {
        let report = TickReport {
            batches_submitted: 1,
            requests_submitted: 2,
            batches_failed: 3,
            batches_ended: 4,
            lines_answered: 5,
            lines_failed: 6,
            lines_retried: 7,
            items_to_realtime: 8,
            items_cached: 9,
            open_batches: 10,
            pending_items: 11,
            deferred_items: 0,
            next_due_ms: None,
        };
        let batch = EmfBatch::default();
        observe_tick(&batch, &report);
        // Gauges keep the last level, counters add up.
        observe_tick(&batch, &report);
        let docs = batch.take_documents("batch-fn", 1);
        assert_eq!(docs.len(), 1);
        let d = &docs[0];
        for (name, value) in [
            ("BatchesSubmitted", 2.0),
            ("BatchRequestsSubmitted", 4.0),
            ("BatchesRefused", 6.0),
            ("BatchesEnded", 8.0),
            ("BatchLinesAnswered", 10.0),
            ("BatchLinesFailed", 12.0),
            ("BatchLinesRetried", 14.0),
            ("BatchItemsToRealtime", 16.0),
            ("CacheHits", 18.0),
            ("BatchesOpen", 10.0),
            ("BatchItemsPending", 11.0),
        ] {
            assert_eq!(d[name], value, "{name}");
        }
        let names: Vec<&str> = d["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 11, "{names:?}");
    }
}
