//! S3 event notifications as the Lambdas receive them (resize: uploads; generate: CSV drops).

use aws_lambda_events::event::s3::{S3Event, S3EventRecord};
use sightline_core::keys::decode_s3_event_key;
use tracing::{info, warn};

/// The object-creation records of an event with their decoded keys (S3 sends keys
/// form-urlencoded: `+` for spaces, `%2F` even for `/` on some emulators). Other records,
/// records without a key and undecodable keys are logged and skipped.
pub fn created_objects(event: &S3Event) -> Vec<(String, &S3EventRecord)> {
    let mut out = Vec::new();
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
        match decode_s3_event_key(raw) {
            Ok(key) => out.push((key, record)),
            Err(e) => warn!(raw, error = %e, "skipping an undecodable key"),
        }
    }
    out
}
