//! The reconciler against the states a crash leaves between two writes, on the local adapters
//! (a repository without its own queue, so a recorded job may never have been sent — the
//! DynamoDB + SQS case).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sightline_core::model::{ImageRecord, ImageStatus};
use sightline_pipeline::ingest::Ingest;
use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
use sightline_pipeline::ports::{rfc3339, BlobStore, Clock, Queue, Repository};
use sightline_pipeline::reconcile::{Reconciler, SweepReport};
use sightline_pipeline::Settings;

struct ManualClock(AtomicU64);
impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub(crate) const T0: u64 = 1_800_000_000_000;

pub(crate) struct World {
    pub(crate) reconciler: Reconciler,
    pub(crate) ingest: Ingest,
    pub(crate) repo: Arc<dyn Repository>,
    pub(crate) blobs: Arc<dyn BlobStore>,
    pub(crate) queue: Arc<SqliteQueue>,
    clock: Arc<ManualClock>,
    _dir: tempfile::TempDir,
}

fn world() -> World {
    world_with(Settings {
        pending_ttl: Duration::from_secs(3600),
        stuck_after: Duration::from_secs(600),
        ..Settings::default()
    })
}

pub(crate) fn world_with(settings: Settings) -> World {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock(AtomicU64::new(T0)));
    let db = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
    let repo: Arc<dyn Repository> = Arc::new(SqliteRepository::new(db.clone()));
    let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(dir.path().join("blobs")));
    let queue = Arc::new(SqliteQueue::new(db, "analyze", 5, clock.clone()));
    let ingest = Ingest::new(
        blobs.clone(),
        repo.clone(),
        queue.clone(),
        Arc::new(settings),
        clock.clone(),
        "uploads/",
    );
    World {
        reconciler: Reconciler::new(ingest.clone()),
        ingest,
        repo,
        blobs,
        queue,
        clock,
        _dir: dir,
    }
}

pub(crate) fn pending(id: &str, created_ms: u64) -> ImageRecord {
    ImageRecord {
        image_id: id.into(),
        tenant: "t".into(),
        source: format!("{id}.png"),
        status: ImageStatus::Pending,
        error: None,
        permanent_failure: false,
        original: None,
        resized: None,
        orientation: None,
        sha256: None,
        original_sha256: None,
        original_key: Some(format!("uploads/t/{id}.png")),
        resized_key: None,
        estimate: None,
        original_estimate: None,
        result: None,
        extra_spend: None,
        detail: None,
        lane: None,
        created_at: rfc3339(created_ms),
        updated_at: rfc3339(created_ms),
        generation: None,
    }
}

pub(crate) fn png(shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([shade, x as u8, y as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

pub(crate) async fn messages(q: &SqliteQueue) -> Vec<String> {
    let got = q.receive(10, Duration::from_secs(60)).await.unwrap();
    for m in &got {
        q.delete(&m.receipt).await.unwrap();
    }
    got.into_iter().map(|m| m.body).collect()
}

#[tokio::test]
async fn a_crash_after_the_upload_was_stored_is_resized_by_the_reconciler() {
    let w = world();
    // The upload URL was handed out and the original stored; the process died before the resize.
    w.repo
        .put_image(&pending("up", T0), Some(T0 + 1_000))
        .await
        .unwrap();
    w.blobs
        .put("uploads/t/up.png", png(10), "image/png")
        .await
        .unwrap();
    // Not due yet: nothing happens.
    assert!(w.reconciler.sweep(100).await.unwrap().is_empty());
    w.clock.0.store(T0 + 1_000, Ordering::SeqCst);
    let report = w.reconciler.sweep(100).await.unwrap();
    assert_eq!(report.resized, 1, "{report:?}");
    let rec = w.repo.get_image("t", "up").await.unwrap().unwrap();
    assert_eq!(rec.status, ImageStatus::Queued);
    assert_eq!(rec.original_key.as_deref(), Some("uploads/t/up.png"));
    let sent = messages(&w.queue).await;
    assert_eq!(sent.len(), 1);
    assert!(sent[0].contains("\"image_id\":\"up\""));
    // Its recheck moved on to the stuck time: the next sweep does nothing.
    assert!(w.reconciler.sweep(100).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_job_recorded_but_never_sent_is_sent_by_the_reconciler_and_only_then() {
    let w = world();
    w.repo
        .put_image(&pending("q", T0), Some(T0 + 900_000))
        .await
        .unwrap();
    w.blobs
        .put("uploads/t/q.png", png(20), "image/png")
        .await
        .unwrap();
    // The resize ran: the record is queued (due soon) and the job was sent, confirmed.
    let ingest = &w.reconciler.ingest;
    ingest.ingest_key("uploads/t/q.png").await.unwrap();
    assert_eq!(messages(&w.queue).await.len(), 1);
    // Had the process died between the record and the send, the record would still be due
    // `reconcile_after` from now; simulate that by making it due, with no message.
    w.repo
        .set_recheck("t", "q", Some(T0 + 5_000))
        .await
        .unwrap();
    w.clock.0.store(T0 + 5_000, Ordering::SeqCst);
    let report = w.reconciler.sweep(100).await.unwrap();
    assert_eq!(
        report,
        SweepReport {
            requeued: 1,
            ..Default::default()
        }
    );
    let sent = messages(&w.queue).await;
    assert_eq!(sent.len(), 1, "the job again");
    // Still not done after stuck_after: sent once more, not every sweep.
    w.clock.0.store(T0 + 5_000 + 599_000, Ordering::SeqCst);
    assert!(w.reconciler.sweep(100).await.unwrap().is_empty());
    w.clock.0.store(T0 + 5_000 + 600_000, Ordering::SeqCst);
    assert_eq!(w.reconciler.sweep(100).await.unwrap().requeued, 1);
}

#[tokio::test]
async fn unused_upload_urls_expire_and_finished_images_leave_the_schedule() {
    let w = world();
    // Never uploaded: looked at after the URL expired, deleted after the pending TTL.
    w.repo
        .put_image(&pending("never", T0), Some(T0 + 1_000))
        .await
        .unwrap();
    let mut done = pending("done", T0);
    done.status = ImageStatus::Done;
    w.repo.put_image(&done, Some(T0 + 1_000)).await.unwrap();
    w.clock.0.store(T0 + 1_000, Ordering::SeqCst);
    let report = w.reconciler.sweep(100).await.unwrap();
    assert_eq!((report.expired, report.settled), (0, 2), "{report:?}");
    assert!(w.repo.get_image("t", "never").await.unwrap().is_some());
    // One hour after its creation the record goes; the done one was never looked at again.
    w.clock.0.store(T0 + 3_600_000, Ordering::SeqCst);
    let report = w.reconciler.sweep(100).await.unwrap();
    assert_eq!(
        report,
        SweepReport {
            expired: 1,
            ..Default::default()
        }
    );
    assert!(w.repo.get_image("t", "never").await.unwrap().is_none());
    assert!(w.repo.get_image("t", "done").await.unwrap().is_some());
    assert!(w.reconciler.sweep(100).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_second_different_upload_to_an_image_is_refused_and_the_first_stands() {
    let w = world();
    w.repo.put_image(&pending("v", T0), None).await.unwrap();
    w.blobs
        .put("uploads/t/v.png", png(30), "image/png")
        .await
        .unwrap();
    let ingest = &w.reconciler.ingest;
    ingest.ingest_key("uploads/t/v.png").await.unwrap();
    let first = w.repo.get_image("t", "v").await.unwrap().unwrap();
    // The same upload again (a retried S3 event): harmless, the job is sent again.
    let again = ingest.ingest_key("uploads/t/v.png").await.unwrap();
    assert!(matches!(
        again,
        sightline_pipeline::ingest::IngestOutcome::Queued(_)
    ));
    assert_eq!(w.repo.get_image("t", "v").await.unwrap().unwrap(), first);
    // Other bytes under the same key (a replayed presigned URL): refused.
    w.blobs
        .put("uploads/t/v.png", png(31), "image/png")
        .await
        .unwrap();
    let out = ingest.ingest_key("uploads/t/v.png").await.unwrap();
    assert!(
        matches!(&out, sightline_pipeline::ingest::IngestOutcome::Refused { reason, .. } if reason.contains("first upload stands")),
        "{out:?}"
    );
    assert_eq!(w.repo.get_image("t", "v").await.unwrap().unwrap(), first);
    assert!(w
        .blobs
        .size(first.resized_key.as_deref().unwrap())
        .await
        .unwrap()
        .is_some());
}
