//! sightline-resize: S3 `ObjectCreated:*` on the uploads prefix → [`Ingest::ingest_keys`].
//!
//! Keys in S3 events are form-urlencoded (`+` for spaces, `%2F` even for `/` on some
//! emulators); they are decoded before use. Records that are not object creations, or whose
//! key is outside the upload prefix, are skipped. A storage error fails the invocation so
//! Lambda retries it (every write is an idempotent overwrite).
//!
//! Each object is handled in a span with its key, tenant and image id (see
//! [`Ingest::ingest_key`]); the invocation's metrics (images processed and failed, time per
//! object) are written as CloudWatch EMF lines when it ends, also when it fails.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::sync::Arc;

use aws_lambda_events::event::s3::S3Event;
use sightline_pipeline::aws::s3_events::created_objects;
use sightline_pipeline::ingest::{Ingest, IngestOutcome};
use sightline_pipeline::metrics::emf::{Emf, EmfBatch};
use sightline_pipeline::ports::StoreError;
use tracing::{info, warn};

/// The decoded keys of the event's object-creation records under `upload_prefix`.
pub fn keys_from_event(event: &S3Event, upload_prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for (key, _) in created_objects(event) {
        if !key.starts_with(upload_prefix) {
            info!(key, "skipping a key outside the upload prefix");
            continue;
        }
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// Handle one S3 event: prepare every new upload and queue one batch of jobs. Metrics go to
/// stdout as EMF (see [`handle_with`]).
pub async fn handle(ingest: &Ingest, event: S3Event) -> Result<Vec<IngestOutcome>, StoreError> {
    handle_with(ingest, event, &Emf::lambda("resize")).await
}

/// [`handle`], writing the invocation's metrics to `emf`.
pub async fn handle_with(
    ingest: &Ingest,
    event: S3Event,
    emf: &Emf,
) -> Result<Vec<IngestOutcome>, StoreError> {
    let keys = keys_from_event(&event, &ingest.upload_prefix);
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let batch = Arc::new(EmfBatch::default());
    let mut recording = ingest.clone();
    recording.metrics = batch.clone();
    let result = recording.ingest_keys(&keys).await;
    emf.flush(&batch);
    let outcomes = result?;
    for o in &outcomes {
        match o {
            IngestOutcome::Queued(job) => {
                info!(tenant = %job.tenant, image_id = %job.image_id, "queued")
            }
            IngestOutcome::Failed { image_id, reason } => warn!(image_id, reason, "rejected"),
            IngestOutcome::Refused { image_id, reason } => warn!(image_id, reason, "refused"),
            IngestOutcome::Ignored(why) => info!(why, "ignored"),
        }
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(records: &[(&str, &str)]) -> S3Event {
        let recs: Vec<serde_json::Value> = records
            .iter()
            .map(|(name, key)| {
                serde_json::json!({
                    "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
                    "eventTime": "2026-01-01T00:00:00.000Z", "eventName": name,
                    "userIdentity": {"principalId": "x"}, "requestParameters": {"sourceIPAddress": "1.2.3.4"},
                    "responseElements": {},
                    "s3": {"s3SchemaVersion": "1.0", "configurationId": "c",
                           "bucket": {"name": "b", "arn": "arn:aws:s3:::b"},
                           "object": {"key": key, "size": 3}}
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "Records": recs })).unwrap()
    }

    #[test]
    fn decodes_and_filters_keys() {
        let e = event(&[
            ("ObjectCreated:Put", "uploads/acme/a+b%2Bc%281%29%C3%A9.jpg"),
            ("ObjectCreated:Put", "uploads%2Facme%2Fx.png"),
            ("ObjectRemoved:Delete", "uploads/acme/gone.jpg"),
            ("ObjectCreated:Put", "resized/acme/a.jpg"),
            (
                "ObjectCreated:CompleteMultipartUpload",
                "uploads/acme/x.png",
            ),
        ]);
        assert_eq!(
            keys_from_event(&e, "uploads/"),
            vec![
                "uploads/acme/a b+c(1)é.jpg".to_string(),
                "uploads/acme/x.png".to_string()
            ]
        );
    }

    #[test]
    fn an_event_without_records_yields_no_keys() {
        assert!(keys_from_event(&S3Event::default(), "uploads/").is_empty());
    }

    fn png() -> Vec<u8> {
        let img =
            image::RgbImage::from_fn(32, 24, |x, y| image::Rgb([x as u8 * 7, y as u8 * 9, 3]));
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut out, image::ImageFormat::Png)
            .unwrap();
        out.into_inner()
    }

    #[tokio::test]
    async fn an_invocation_emits_images_processed_failed_and_latency_as_emf() {
        use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
        use sightline_pipeline::metrics::emf::MemoryLines;
        use sightline_pipeline::ports::{BlobStore, SystemClock};
        use sightline_pipeline::Settings;

        let dir = tempfile::tempdir().unwrap();
        let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(dir.path()));
        blobs
            .put("uploads/acme/good.png", png(), "image/png")
            .await
            .unwrap();
        blobs
            .put(
                "uploads/acme/bad.png",
                b"not an image".to_vec(),
                "image/png",
            )
            .await
            .unwrap();
        let db = SqliteDb::in_memory().unwrap();
        let ingest = Ingest::new(
            blobs,
            Arc::new(SqliteRepository::new(db.clone())),
            Arc::new(SqliteQueue::new(db, "analyze", 5, Arc::new(SystemClock))),
            Arc::new(Settings::default()),
            Arc::new(SystemClock),
            "uploads/",
        );
        let lines = Arc::new(MemoryLines::default());
        let emf = Emf::new("resize-fn", lines.clone());
        let e = event(&[
            ("ObjectCreated:Put", "uploads/acme/good.png"),
            ("ObjectCreated:Put", "uploads/acme/bad.png"),
        ]);
        let outcomes = handle_with(&ingest, e, &emf).await.unwrap();
        assert!(
            matches!(outcomes[0], IngestOutcome::Queued(_)),
            "{outcomes:?}"
        );
        assert!(
            matches!(outcomes[1], IngestOutcome::Failed { .. }),
            "{outcomes:?}"
        );

        let docs: Vec<serde_json::Value> = lines
            .lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(docs.len(), 1, "{docs:?}");
        let d = &docs[0];
        assert_eq!(d["Function"], "resize-fn");
        let directive = &d["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "sightline");
        assert_eq!(directive["Dimensions"], serde_json::json!([["Function"]]));
        let units: Vec<(String, String)> = directive["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["Name"].as_str().unwrap().into(),
                    m["Unit"].as_str().unwrap().into(),
                )
            })
            .collect();
        for (name, unit) in [
            ("ImagesProcessed", "Count"),
            ("ImagesFailed", "Count"),
            ("RecordLatency", "Milliseconds"),
        ] {
            assert!(units.contains(&(name.into(), unit.into())), "{units:?}");
        }
        assert_eq!(d["ImagesProcessed"], 1.0);
        assert_eq!(d["ImagesFailed"], 1.0);
        assert_eq!(d["RecordLatency"].as_array().map(Vec::len), Some(2));

        // An event with nothing to do writes no metrics.
        handle_with(
            &ingest,
            event(&[("ObjectRemoved:Delete", "uploads/acme/good.png")]),
            &emf,
        )
        .await
        .unwrap();
        assert_eq!(lines.lines().len(), 1);
    }
}
