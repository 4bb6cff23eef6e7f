//! The Lambda log subscriber (`sightline_pipeline::aws::init_tracing`) follows Lambda's
//! advanced logging controls, and every log line of a record carries the record's ids.
//!
//! One test in its own binary: it sets the process environment and installs the global
//! subscriber, as a Lambda bootstrap does once.

use std::io::Write;
use std::sync::{Arc, Mutex};

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use serde_json::Value;
use sightline_analyze::AnalyzeHandler;
use sightline_pipeline::analyze::Analyzer;
use sightline_pipeline::ingest::{Ingest, IngestOutcome};
use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
use sightline_pipeline::metrics::emf::{Emf, MemoryLines};
use sightline_pipeline::ports::{BlobStore, Repository, SystemClock};
use sightline_pipeline::providers::local::LocalAnalyzer;
use sightline_pipeline::Settings;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn png() -> Vec<u8> {
    let img = image::RgbImage::from_fn(32, 24, |x, y| image::Rgb([x as u8 * 7, y as u8 * 9, 1]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn sqs(id: &str, body: String) -> SqsMessage {
    let mut m = SqsMessage::default();
    m.message_id = Some(id.to_string());
    m.receipt_handle = Some(format!("r-{id}"));
    m.body = Some(body);
    m
}

#[tokio::test]
async fn lambda_log_level_and_json_format_are_honoured_and_lines_carry_the_record_ids() {
    // What Lambda sets from the template's LoggingConfig (ApplicationLogLevel, LogFormat).
    std::env::set_var("AWS_LAMBDA_LOG_LEVEL", "WARN");
    std::env::set_var("AWS_LAMBDA_LOG_FORMAT", "JSON");
    std::env::remove_var("RUST_LOG");
    let captured = Captured::default();
    let writer = captured.clone();
    sightline_pipeline::aws::init_tracing_with_writer(move || writer.clone());

    let dir = tempfile::tempdir().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(dir.path()));
    let db = SqliteDb::in_memory().unwrap();
    let repo: Arc<dyn Repository> = Arc::new(SqliteRepository::new(db.clone()));
    let settings = Arc::new(Settings::default());
    let queue = Arc::new(SqliteQueue::new(db, "analyze", 5, Arc::new(SystemClock)));
    let ingest = Ingest::new(
        blobs.clone(),
        repo.clone(),
        queue.clone(),
        settings.clone(),
        Arc::new(SystemClock),
        "uploads/",
    );
    let IngestOutcome::Queued(job) = ingest
        .ingest_bytes("acme", "img-1", "test", None, png())
        .await
        .unwrap()
    else {
        panic!("not queued")
    };
    let good = serde_json::to_string(&job).unwrap();
    // A job naming content its image does not hold: deleted with a warning.
    let mut stale_job = job.clone();
    stale_job.sha256 = "0".repeat(64);
    let stale = serde_json::to_string(&stale_job).unwrap();

    let analyzer = Analyzer::new(
        blobs,
        repo,
        Arc::new(LocalAnalyzer),
        settings,
        Arc::new(SystemClock),
    );
    let mut handler = AnalyzeHandler::new(analyzer, queue, "analyze");
    handler.emf = Emf::new("analyze", Arc::new(MemoryLines::default()));
    handler.concurrency = 1;
    let mut event = SqsEvent::default();
    event.records = vec![sqs("m-stale", stale), sqs("m-good", good)];
    let resp = handler.handle(event, None).await.unwrap();
    assert!(resp.batch_item_failures.is_empty());

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    // The good record logged "handled" at INFO: filtered out at WARN.
    assert!(
        lines
            .iter()
            .all(|l| l["level"] == "WARN" || l["level"] == "ERROR"),
        "{text}"
    );
    let stale_line = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("no longer has"))
        })
        .unwrap_or_else(|| panic!("no warning about the stale job in {text}"));
    let span = &stale_line["span"];
    assert_eq!(span["name"], "record");
    assert_eq!(span["message_id"], "m-stale");
    assert_eq!(span["image_id"], "img-1");
    assert_eq!(span["tenant"], "acme");
}
