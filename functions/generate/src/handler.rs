//! sightline-generate: the generation queue's records (event source mapping with
//! `ReportBatchItemFailures`) → one [`Generations::handle`] per record through the pipeline's
//! [`SqsBatchHandler`] (retries with visibility delays, batch item failures, no record started
//! near the deadline, a span per record with its job, row and tenant, EMF metrics); and S3
//! events of CSV files dropped under `generations/{tenant}/{template}/` → one job per file
//! ([`Generations::submit_drop`], a receipt `{key}.result.json` beside it).
//!
//! One function takes both event kinds, told apart by the records' `eventSource`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use anyhow::{bail, Context};
use aws_lambda_events::event::s3::S3Event;
use aws_lambda_events::event::sqs::SqsEvent;
use sightline_pipeline::aws::s3_events::created_objects;
use sightline_pipeline::generation::{DropOutcome, Generations, DROP_PREFIX};
use tracing::{info, info_span, Instrument};

pub use sightline_pipeline::aws::sqs_batch::SqsBatchHandler;

/// The generate function's queue handler.
pub type GenerateHandler = SqsBatchHandler<Generations>;

/// What one invocation carries.
#[derive(Debug)]
pub enum Invocation {
    /// Records of the generation queue.
    Queue(SqsEvent),
    /// Objects created under the drop prefix.
    Drops(S3Event),
}

impl Invocation {
    /// Tell an SQS batch from an S3 notification by the first record's `eventSource`.
    pub fn parse(payload: serde_json::Value) -> anyhow::Result<Invocation> {
        let source = payload
            .get("Records")
            .and_then(|r| r.get(0))
            .and_then(|r| r.get("eventSource"))
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_string();
        match source.as_str() {
            "aws:sqs" => Ok(Invocation::Queue(
                serde_json::from_value(payload).context("an SQS event")?,
            )),
            "aws:s3" => Ok(Invocation::Drops(
                serde_json::from_value(payload).context("an S3 event")?,
            )),
            "" => bail!("an event without records: expected SQS records or an S3 notification"),
            other => bail!("unexpected event source {other:?}: expected aws:sqs or aws:s3"),
        }
    }
}

/// The version that makes a dropped object one job: its version id, else its ETag, else the
/// event's sequencer.
fn object_version(record: &aws_lambda_events::event::s3::S3EventRecord) -> String {
    let o = &record.s3.object;
    o.version_id
        .clone()
        .filter(|v| !v.is_empty() && v != "null")
        .or_else(|| o.e_tag.clone().filter(|v| !v.is_empty()))
        .or_else(|| o.sequencer.clone())
        .unwrap_or_default()
}

/// Start the job of every CSV the event names. A storage error fails the invocation (Lambda
/// retries the event; a job already started is found, not started again); a refused file is
/// logged and described in its receipt.
pub async fn handle_drops(
    generations: &Generations,
    event: S3Event,
) -> anyhow::Result<Vec<(String, DropOutcome)>> {
    let mut outcomes = Vec::new();
    for (key, record) in created_objects(&event) {
        if !key.starts_with(DROP_PREFIX) || !key.to_ascii_lowercase().ends_with(".csv") {
            info!(key, "skipping a key that is no CSV drop");
            continue;
        }
        let version = object_version(record);
        let span = info_span!("drop", key = %key);
        let outcome = generations
            .submit_drop(&key, &version)
            .instrument(span)
            .await
            .with_context(|| format!("starting the job of {key}"))?;
        outcomes.push((key, outcome));
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::event::sqs::SqsMessage;
    use sightline_core::genjob::RowStatus;
    use sightline_pipeline::generation::{drop_receipt_key, Generators, Submission};
    use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
    use sightline_pipeline::metrics::emf::{Emf, MemoryLines};
    use sightline_pipeline::ports::{
        BlobStore, Clock, GenerationStore, Queue, Repository, SystemClock,
    };
    use sightline_pipeline::providers::gen_local::LocalGenerator;
    use sightline_pipeline::webhook_url::{Mode, SystemResolver};
    use sightline_pipeline::Settings;
    use std::sync::Arc;
    use std::time::Duration;

    const TEMPLATES: &str = r#"
default = "hero"
[defaults]
model = "local-canvas"
size = "1024x1024"
quality = "low"
[templates.hero]
prompt = "A studio photo of {product}"
output_key = "products/{sku}.png"
"#;

    struct Fixture {
        generations: Generations,
        repo: Arc<SqliteRepository>,
        blobs: Arc<dyn BlobStore>,
        queue: Arc<dyn Queue>,
        _dir: tempfile::TempDir,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(dir.path().join("blobs")));
        let repo = Arc::new(SqliteRepository::new(db.clone()));
        let queue: Arc<dyn Queue> = Arc::new(SqliteQueue::new(db, "generate", 5, clock.clone()));
        let generations = Generations::new(
            repo.clone(),
            repo.clone(),
            blobs.clone(),
            queue.clone(),
            Arc::new(Generators::new(Box::new(|_: &str| {
                Ok(Arc::new(LocalGenerator) as _)
            }))),
            Arc::new(Settings::default()),
            clock,
            Mode::Aws,
            Arc::new(SystemResolver::default()),
        )
        .with_templates(sightline_pipeline::generation::TemplatesSource::Blob {
            blobs: blobs.clone(),
            key: sightline_pipeline::generation::TEMPLATES_KEY.into(),
        });
        Fixture {
            generations,
            repo,
            blobs,
            queue,
            _dir: dir,
        }
    }

    impl Fixture {
        async fn put_templates(&self) {
            self.blobs
                .put(
                    sightline_pipeline::generation::TEMPLATES_KEY,
                    TEMPLATES.as_bytes().to_vec(),
                    "text/plain",
                )
                .await
                .unwrap();
        }
    }

    fn s3_created(key: &str, etag: &str) -> S3Event {
        serde_json::from_value(serde_json::json!({"Records": [{
            "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
            "eventTime": "2026-12-01T00:00:00.000Z", "eventName": "ObjectCreated:Put",
            "userIdentity": {"principalId": "x"}, "requestParameters": {"sourceIPAddress": "127.0.0.1"},
            "responseElements": {},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "c",
                   "bucket": {"name": "b", "ownerIdentity": {"principalId": "x"}, "arn": "arn:aws:s3:::b"},
                   "object": {"key": key, "size": 10, "eTag": etag, "sequencer": "01"}}
        }]}))
        .unwrap()
    }

    #[test]
    fn an_invocation_is_told_apart_by_its_event_source() {
        let sqs = serde_json::json!({"Records": [{"eventSource": "aws:sqs", "messageId": "m", "body": "{}"}]});
        assert!(matches!(Invocation::parse(sqs), Ok(Invocation::Queue(e)) if e.records.len() == 1));
        let s3 = serde_json::to_value(s3_created("generations/acme/hero/a.csv", "e1")).unwrap();
        assert!(matches!(Invocation::parse(s3), Ok(Invocation::Drops(_))));
        let other = serde_json::json!({"Records": [{"eventSource": "aws:sns"}]});
        assert!(Invocation::parse(other)
            .unwrap_err()
            .to_string()
            .contains("aws:sns"));
        assert!(Invocation::parse(serde_json::json!({"detail": {}})).is_err());
    }

    #[tokio::test]
    async fn a_dropped_csv_starts_one_job_even_when_its_event_comes_twice() {
        let f = fixture();
        f.put_templates().await;
        let key = "generations/acme/hero/spring batch.csv";
        f.blobs
            .put(
                key,
                b"sku,product\nA1,red mug\nA2,blue vase\n".to_vec(),
                "text/csv",
            )
            .await
            .unwrap();
        // S3 events carry keys URL-encoded (a space as `+`).
        let event = s3_created("generations/acme/hero/spring+batch.csv", "\"etag-1\"");
        let first = handle_drops(&f.generations, event.clone()).await.unwrap();
        let DropOutcome::Started { job_id, rows } = &first[0].1 else {
            panic!("{first:?}");
        };
        assert_eq!(*rows, 2);
        let again = handle_drops(&f.generations, event).await.unwrap();
        assert_eq!(
            again[0].1,
            DropOutcome::AlreadyStarted {
                job_id: job_id.clone()
            }
        );
        let jobs = f.repo.list_jobs("acme", 10).await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].template, "hero");
        assert_eq!(jobs[0].source, format!("s3:{key}"));
        assert_eq!(f.repo.rows("acme", job_id).await.unwrap().len(), 2);
        // One message per row, not per delivery of the event.
        let msgs = f.queue.receive(10, Duration::from_secs(30)).await.unwrap();
        assert_eq!(msgs.len(), 2);
        let receipt: serde_json::Value =
            serde_json::from_slice(&f.blobs.get(&drop_receipt_key(key), 1 << 20).await.unwrap())
                .unwrap();
        assert_eq!(receipt["job_id"], job_id.as_str());
        // The same key with new content is a new job.
        let changed = handle_drops(
            &f.generations,
            s3_created("generations/acme/hero/spring+batch.csv", "\"etag-2\""),
        )
        .await
        .unwrap();
        assert!(matches!(&changed[0].1, DropOutcome::Started { job_id: j, .. } if j != job_id));
    }

    #[tokio::test]
    async fn a_bad_csv_is_refused_with_its_row_number_in_the_receipt_and_nothing_is_queued() {
        let f = fixture();
        f.put_templates().await;
        let key = "generations/acme/hero/bad.csv";
        f.blobs
            .put(key, b"sku,product\nA1,red mug\nA2,\n".to_vec(), "text/csv")
            .await
            .unwrap();
        let out = handle_drops(&f.generations, s3_created(key, "e"))
            .await
            .unwrap();
        let DropOutcome::Refused(reason) = &out[0].1 else {
            panic!("{out:?}");
        };
        assert!(reason.contains("row 2"), "{reason}");
        let receipt: serde_json::Value =
            serde_json::from_slice(&f.blobs.get(&drop_receipt_key(key), 1 << 20).await.unwrap())
                .unwrap();
        assert_eq!(receipt["status"], "refused");
        assert!(receipt["error"].as_str().unwrap().contains("row 2"));
        assert!(f
            .queue
            .receive(10, Duration::ZERO)
            .await
            .unwrap()
            .is_empty());
        assert!(f.repo.list_jobs("acme", 10).await.unwrap().is_empty());
        // An unknown template, a key without one, and no templates file: refused, not retried.
        for (key, why) in [
            ("generations/acme/nope/x.csv", "nope"),
            ("generations/acme/x.csv", "expected"),
        ] {
            f.blobs
                .put(key, b"sku\n1\n".to_vec(), "text/csv")
                .await
                .unwrap();
            let out = handle_drops(&f.generations, s3_created(key, "e"))
                .await
                .unwrap();
            assert!(
                matches!(&out[0].1, DropOutcome::Refused(r) if r.contains(why)),
                "{key}: {out:?}"
            );
        }
        // Receipts and the templates file are no drops.
        let out = handle_drops(&f.generations, s3_created(&drop_receipt_key(key), "e"))
            .await
            .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn a_drop_names_its_webhook_in_its_metadata_and_a_meaningless_value_is_refused() {
        use sightline_pipeline::generation::{
            DropOptions, DROP_WEBHOOK_ROWS_META, DROP_WEBHOOK_URL_META,
        };
        let meta = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<std::collections::BTreeMap<_, _>>()
        };
        assert_eq!(
            DropOptions::from_metadata(&meta(&[("owner", "ops")])),
            Ok(DropOptions::default()),
            "other metadata is not ours"
        );
        assert_eq!(
            DropOptions::from_metadata(&meta(&[
                (DROP_WEBHOOK_URL_META, " https://hooks.example.com/x "),
                (DROP_WEBHOOK_ROWS_META, "TRUE"),
            ])),
            Ok(DropOptions {
                webhook_url: Some("https://hooks.example.com/x".into()),
                webhook_rows: true,
            })
        );
        let no_url = DropOptions::from_metadata(&meta(&[(DROP_WEBHOOK_ROWS_META, "true")]));
        assert!(no_url.unwrap_err().contains(DROP_WEBHOOK_URL_META));
        let maybe = DropOptions::from_metadata(&meta(&[
            (DROP_WEBHOOK_URL_META, "https://hooks.example.com/x"),
            (DROP_WEBHOOK_ROWS_META, "maybe"),
        ]));
        assert!(maybe.unwrap_err().contains("maybe"));
    }

    fn sqs_record(id: &str, body: &str) -> SqsMessage {
        let mut m = SqsMessage::default();
        m.message_id = Some(id.into());
        m.receipt_handle = Some(format!("r-{id}"));
        m.body = Some(body.into());
        m.attributes
            .insert("ApproximateReceiveCount".into(), "1".into());
        m
    }

    #[tokio::test]
    async fn queue_records_generate_their_rows_and_a_bad_one_is_reported_for_the_dead_letter_queue()
    {
        let f = fixture();
        let plan = sightline_core::generate::plan_job(
            &sightline_core::generate::TemplateSet::from_toml(TEMPLATES).unwrap(),
            None,
            sightline_core::generate::RowsInput::Csv(b"sku,product\nA1,red mug\nA2,blue vase\n"),
            &sightline_core::generate::Limits::default(),
        )
        .unwrap();
        let job = f
            .generations
            .submit(Submission {
                tenant: "acme".into(),
                template: "hero".into(),
                requests: plan,
                webhook_url: None,
                webhook_rows: false,
                regenerate: None,
                source: "test".into(),
                job_id: None,
            })
            .await
            .unwrap();
        let msgs = f.queue.receive(10, Duration::from_secs(30)).await.unwrap();
        let mut event = SqsEvent::default();
        for (i, m) in msgs.iter().enumerate() {
            event.records.push(sqs_record(&format!("m{i}"), &m.body));
        }
        event
            .records
            .push(sqs_record("bad", "{\"not\": \"a row\"}"));
        let lines = Arc::new(MemoryLines::default());
        let mut handler = GenerateHandler::new(f.generations.clone(), f.queue.clone(), "generate");
        handler.emf = Emf::new("generate-fn", lines.clone());
        let (resp, outcomes) = handler.handle_with_outcomes(event, None).await;
        let failed: Vec<&str> = resp
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.as_str())
            .collect();
        assert_eq!(failed, vec!["bad"], "{outcomes:?}");
        for row in f.repo.rows("acme", &job.job_id).await.unwrap() {
            // Handed to the analysis: the upload exists and its record names the row.
            assert_eq!(row.status, RowStatus::Checking);
            let image_id = row.image_id.clone().unwrap();
            let rec = f.repo.get_image("acme", &image_id).await.unwrap().unwrap();
            assert_eq!(rec.generation.unwrap().row, row.row);
            assert!(f
                .blobs
                .get(rec.original_key.as_deref().unwrap(), 1 << 24)
                .await
                .is_ok());
        }
        let doc: serde_json::Value = lines
            .lines()
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|d| d.get("ImagesGenerated").is_some())
            .unwrap();
        assert_eq!(doc["ImagesGenerated"], 2.0);
        assert_eq!(doc["Retries"], 1.0);
    }
}
