//! sightline-resize: S3 `ObjectCreated:*` on the uploads prefix → [`Ingest::ingest_keys`].
//!
//! Keys in S3 events are form-urlencoded (`+` for spaces, `%2F` even for `/` on some
//! emulators); they are decoded before use. Records that are not object creations, or whose
//! key is outside the upload prefix, are skipped. A storage error fails the invocation so
//! Lambda retries it (every write is an idempotent overwrite).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use aws_lambda_events::event::s3::S3Event;
use sightline_core::keys::decode_s3_event_key;
use sightline_pipeline::ingest::{Ingest, IngestOutcome};
use sightline_pipeline::ports::StoreError;
use tracing::{info, warn};

/// The decoded keys of the event's object-creation records under `upload_prefix`.
pub fn keys_from_event(event: &S3Event, upload_prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    for record in &event.records {
        let name = record.event_name.as_deref().unwrap_or_default();
        if !name.starts_with("ObjectCreated:") && !name.starts_with("s3:ObjectCreated:") {
            info!(
                event = name,
                "skipping a record that is not an object creation"
            );
            continue;
        }
        let Some(raw) = record.s3.object.key.as_deref() else {
            warn!("skipping a record without an object key");
            continue;
        };
        let key = match decode_s3_event_key(raw) {
            Ok(k) => k,
            Err(e) => {
                warn!(raw, error = %e, "skipping an undecodable key");
                continue;
            }
        };
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

/// Handle one S3 event: prepare every new upload and queue one batch of jobs.
pub async fn handle(ingest: &Ingest, event: S3Event) -> Result<Vec<IngestOutcome>, StoreError> {
    let keys = keys_from_event(&event, &ingest.upload_prefix);
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let outcomes = ingest.ingest_keys(&keys).await?;
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
}
