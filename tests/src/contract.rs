//! One adapter contract for the ports, run against the local adapters (SQLite, files) and the
//! AWS adapters (DynamoDB, SQS, S3 on the emulator). Each function panics on a violation.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sightline_core::batch::custom_id;
use sightline_core::budget::{BudgetCaps, Period, Periods};
use sightline_core::limiter::{Denied, Grant, Learnt, LimitOp, LimitOutcome, Limits};
use sightline_core::model::{AnalysisResult, Detail, ImageRecord, ImageStatus};
use sightline_core::pricing::Usage;
use sightline_pipeline::ports::Clock;
use sightline_pipeline::ports::{
    api_key_id, BatchItem, BatchRecord, BatchState, BatchStore, BatchWaiter, BlobStore, BudgetHold,
    Claim, Completion, Enqueued, Failure, ItemEnd, JobDelivery, LedgerKind, LineCounts, PutImage,
    Queue, QueueMessage, RateLimitStore, Repository, Spend, StoreError, VectorIndex, VectorMeta,
    VectorQuery, VectorRecord, VectorStore, MAX_TOP_K,
};

/// A unique suffix so runs and tests never share tenants or keys.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}{}", nanos % 1_000_000_000_000)
}

pub fn record(tenant: &str, image_id: &str, created_at: &str, status: ImageStatus) -> ImageRecord {
    ImageRecord {
        image_id: image_id.to_string(),
        tenant: tenant.to_string(),
        source: format!("uploads/{tenant}/{image_id}.jpg"),
        status,
        error: (status == ImageStatus::Failed).then(|| "bad image".to_string()),
        permanent_failure: false,
        original: None,
        resized: None,
        orientation: Some(1),
        sha256: Some("ab".repeat(32)),
        original_sha256: None,
        original_key: None,
        resized_key: Some(format!("resized/{tenant}/{image_id}.jpg")),
        estimate: None,
        original_estimate: None,
        result: None,
        extra_spend: None,
        detail: None,
        lane: None,
        created_at: created_at.to_string(),
        updated_at: created_at.to_string(),
        generation: None,
    }
}

pub fn result(
    key: &str,
    model: &str,
    completed_at: &str,
    cost: f64,
    cached: bool,
) -> AnalysisResult {
    AnalysisResult {
        provider: "openai".into(),
        model: model.into(),
        analysis: serde_json::json!({"description": "a test image", "tags": ["x"]}),
        usage: if cached {
            Usage::default()
        } else {
            Usage {
                input_tokens: 1000,
                output_tokens: 50,
                cached_tokens: 0,
            }
        },
        cost_usd: cost,
        cached,
        calls: u32::from(!cached),
        usage_estimated: false,
        cost_at_estimate_usd: 0.0,
        lane: Default::default(),
        batch_id: None,
        reused_from: None,
        saved_usd: 0.0,
        idempotency_key: key.into(),
        prompt_version: "v1".into(),
        price_version: "test".into(),
        completed_at: completed_at.into(),
    }
}

fn ids(images: &[ImageRecord]) -> Vec<String> {
    images.iter().map(|r| r.image_id.clone()).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

/// Images: put/get, listing newest first with cursors and a status filter, tenant isolation.
pub async fn images_contract(repo: Arc<dyn Repository>) {
    let a = unique("ta");
    let b = unique("tb");
    let statuses = [
        ImageStatus::Queued,
        ImageStatus::Failed,
        ImageStatus::Queued,
        ImageStatus::Failed,
        ImageStatus::Queued,
    ];
    for (i, st) in statuses.iter().enumerate() {
        let rec = record(
            &a,
            &format!("img-{}", i + 1),
            &format!("2026-01-0{}T00:00:00.000Z", i + 1),
            *st,
        );
        repo.put_image(&rec, None).await.unwrap();
    }
    let other = record(&b, "img-1", "2026-01-09T00:00:00.000Z", ImageStatus::Queued);
    repo.put_image(&other, None).await.unwrap();

    let got = repo.get_image(&a, "img-2").await.unwrap().unwrap();
    assert_eq!(
        got,
        record(&a, "img-2", "2026-01-02T00:00:00.000Z", ImageStatus::Failed)
    );
    assert_eq!(got.error.as_deref(), Some("bad image"));
    assert_eq!(repo.get_image(&b, "img-1").await.unwrap().unwrap(), other);
    assert_eq!(repo.get_image(&a, "img-9").await.unwrap(), None);
    assert_eq!(
        repo.get_image(&unique("nobody"), "img-1").await.unwrap(),
        None
    );

    // Newest first, two at a time.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = repo
            .list_images(&a, None, 2, cursor.as_deref())
            .await
            .unwrap();
        pages += 1;
        assert!(page.images.len() <= 2);
        seen.extend(ids(&page.images));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
        assert!(pages < 10, "cursor never ends");
    }
    assert_eq!(seen, vec!["img-5", "img-4", "img-3", "img-2", "img-1"]);
    assert_eq!(
        pages, 3,
        "exactly three pages of 2, 2, 1 (no empty last page)"
    );

    let all = repo.list_images(&a, None, 100, None).await.unwrap();
    assert_eq!(
        ids(&all.images),
        vec!["img-5", "img-4", "img-3", "img-2", "img-1"]
    );
    assert_eq!(all.next_cursor, None);

    let failed = repo
        .list_images(&a, Some(ImageStatus::Failed), 100, None)
        .await
        .unwrap();
    assert_eq!(ids(&failed.images), vec!["img-4", "img-2"]);
    let first = repo
        .list_images(&a, Some(ImageStatus::Queued), 1, None)
        .await
        .unwrap();
    assert_eq!(ids(&first.images), vec!["img-5"]);
    let rest = repo
        .list_images(
            &a,
            Some(ImageStatus::Queued),
            5,
            first.next_cursor.as_deref(),
        )
        .await
        .unwrap();
    assert_eq!(ids(&rest.images), vec!["img-3", "img-1"]);
    assert_eq!(rest.next_cursor, None);

    let theirs = repo.list_images(&b, None, 100, None).await.unwrap();
    assert_eq!(theirs.images, vec![other.clone()]);
    assert!(repo
        .list_images(&unique("nobody"), None, 10, None)
        .await
        .unwrap()
        .images
        .is_empty());

    // Overwrite (a resize retry) replaces the record and its status index.
    let mut again = record(&a, "img-5", "2026-01-05T00:00:00.000Z", ImageStatus::Failed);
    again.error = Some("second try".into());
    repo.put_image(&again, None).await.unwrap();
    assert_eq!(repo.get_image(&a, "img-5").await.unwrap().unwrap(), again);
    let failed = repo
        .list_images(&a, Some(ImageStatus::Failed), 100, None)
        .await
        .unwrap();
    assert_eq!(ids(&failed.images), vec!["img-5", "img-4", "img-2"]);
    let queued = repo
        .list_images(&a, Some(ImageStatus::Queued), 100, None)
        .await
        .unwrap();
    assert_eq!(ids(&queued.images), vec!["img-3", "img-1"]);

    // mark_failed records the reason; on a missing image it creates nothing.
    repo.mark_failed(
        &a,
        "img-3",
        "provider said no",
        Failure::Permanent,
        "2026-02-01T00:00:00.000Z",
    )
    .await
    .unwrap();
    let f = repo.get_image(&a, "img-3").await.unwrap().unwrap();
    assert_eq!(f.status, ImageStatus::Failed);
    assert_eq!(f.error.as_deref(), Some("provider said no"));
    assert!(f.permanent_failure, "a permanent failure says so");
    assert_eq!(f.updated_at, "2026-02-01T00:00:00.000Z");
    assert_eq!(f.created_at, "2026-01-03T00:00:00.000Z");
    let failed = repo
        .list_images(&a, Some(ImageStatus::Failed), 100, None)
        .await
        .unwrap();
    assert_eq!(
        ids(&failed.images),
        vec!["img-5", "img-4", "img-3", "img-2"]
    );
    repo.mark_failed(
        &a,
        "img-404",
        "x",
        Failure::GaveUp,
        "2026-02-01T00:00:00.000Z",
    )
    .await
    .unwrap();
    assert_eq!(repo.get_image(&a, "img-404").await.unwrap(), None);
    // Deleting an image removes its record whatever its state; a second delete finds nothing.
    let gone = unique("gone-");
    repo.put_image(
        &record(&gone, "d1", "2026-05-01T00:00:00.000Z", ImageStatus::Done),
        None,
    )
    .await
    .unwrap();
    assert!(repo.delete_image(&gone, "d1").await.unwrap());
    assert!(repo.get_image(&gone, "d1").await.unwrap().is_none());
    assert!(!repo.delete_image(&gone, "d1").await.unwrap());
}

/// Claims: acquire, busy while leased, re-entrant for the owner, expiry, release, cached.
/// Completion: exactly once, ledger sums, AlreadyDone on duplicates, costs by day and model.
pub async fn claims_and_completion_contract(repo: Arc<dyn Repository>) {
    let t = unique("tc");
    let key = format!("{}:gpt-4.1-mini:v1", "cd".repeat(32));
    let now = 1_800_000_000_000u64;
    let lease = Duration::from_secs(60);
    assert_eq!(
        repo.claim(&key, "o1", lease, now).await.unwrap(),
        Claim::Acquired
    );
    match repo.claim(&key, "o2", lease, now + 1_000).await.unwrap() {
        Claim::Busy { retry_in } => assert_eq!(retry_in, Duration::from_secs(59)),
        other => panic!("expected Busy, got {other:?}"),
    }
    assert_eq!(
        repo.claim(&key, "o1", lease, now + 2_000).await.unwrap(),
        Claim::Acquired
    );
    // o1's renewed lease ends at now + 62 s; after that o2 may take it.
    assert_eq!(
        repo.claim(&key, "o2", lease, now + 62_001).await.unwrap(),
        Claim::Acquired
    );
    // Releasing someone else's claim does nothing; releasing one's own frees it.
    repo.release_claim(&key, "o1").await.unwrap();
    assert!(matches!(
        repo.claim(&key, "o3", lease, now + 63_000).await.unwrap(),
        Claim::Busy { .. }
    ));
    repo.release_claim(&key, "o2").await.unwrap();
    assert_eq!(
        repo.claim(&key, "o3", lease, now + 63_000).await.unwrap(),
        Claim::Acquired
    );

    for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
        let rec = record(
            &t,
            id,
            &format!("2026-03-0{}T00:00:00.000Z", i + 1),
            ImageStatus::Queued,
        );
        repo.put_image(&rec, None).await.unwrap();
    }
    let day1 = "2026-03-05T10:00:00.000Z";
    let r1 = result(&key, "gpt-4.1-mini", day1, 0.0125, false);
    assert_eq!(
        repo.complete(&t, "a", &r1, 0.01).await.unwrap(),
        Completion::Stored
    );
    let a = repo.get_image(&t, "a").await.unwrap().unwrap();
    assert_eq!(a.status, ImageStatus::Done);
    assert_eq!(a.result.as_ref(), Some(&r1));
    assert_eq!(a.error, None);
    assert_eq!(a.updated_at, day1);
    // A duplicate writes nothing.
    let dup = result(&key, "gpt-4.1-mini", "2026-03-05T11:00:00.000Z", 0.5, false);
    assert_eq!(
        repo.complete(&t, "a", &dup, 0.5).await.unwrap(),
        Completion::AlreadyDone
    );
    assert_eq!(
        repo.get_image(&t, "a")
            .await
            .unwrap()
            .unwrap()
            .result
            .as_ref(),
        Some(&r1)
    );
    // The cache now answers any claimant, at once.
    assert_eq!(
        repo.claim(&key, "o9", lease, now + 64_000).await.unwrap(),
        Claim::Cached(Box::new(r1.clone()))
    );
    // A done image is never marked failed.
    repo.mark_failed(&t, "a", "late failure", Failure::GaveUp, day1)
        .await
        .unwrap();
    let a = repo.get_image(&t, "a").await.unwrap().unwrap();
    assert_eq!((a.status, a.error), (ImageStatus::Done, None));
    assert!(!a.permanent_failure);
    // Nor overwritten by a late resize retry.
    let late = record(&t, "a", "2026-03-01T00:00:00.000Z", ImageStatus::Queued);
    repo.put_image(&late, None).await.unwrap();
    let a = repo.get_image(&t, "a").await.unwrap().unwrap();
    assert_eq!(
        (a.status, a.result.as_ref()),
        (ImageStatus::Done, Some(&r1))
    );

    // A cached reuse on another image ($0), another model, another day.
    let r2 = result(&key, "gpt-4.1-mini", "2026-03-05T12:00:00.000Z", 0.0, true);
    assert_eq!(
        repo.complete(&t, "b", &r2, 0.0).await.unwrap(),
        Completion::Stored
    );
    let key2 = format!("{}:gpt-4o:v1", "ef".repeat(32));
    let r3 = result(&key2, "gpt-4o", "2026-03-05T13:00:00.000Z", 0.03, false);
    assert_eq!(
        repo.complete(&t, "c", &r3, 0.02).await.unwrap(),
        Completion::Stored
    );
    let key3 = format!("{}:gpt-4.1-mini:v1", "01".repeat(32));
    let r4 = result(
        &key3,
        "gpt-4.1-mini",
        "2026-03-07T00:00:01.000Z",
        0.0075,
        false,
    );
    assert_eq!(
        repo.complete(&t, "d", &r4, 0.005).await.unwrap(),
        Completion::Stored
    );
    assert_eq!(
        repo.complete(&t, "d", &r4, 0.005).await.unwrap(),
        Completion::AlreadyDone
    );
    // No image, no result.
    assert!(matches!(
        repo.complete(&t, "zzz", &r4, 0.0).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(repo.get_image(&t, "zzz").await.unwrap(), None);

    let done = repo
        .list_images(&t, Some(ImageStatus::Done), 10, None)
        .await
        .unwrap();
    assert_eq!(ids(&done.images), vec!["d", "c", "b", "a"]);
    assert!(repo
        .list_images(&t, Some(ImageStatus::Queued), 10, None)
        .await
        .unwrap()
        .images
        .is_empty());

    let rows = repo.costs(&t, "2026-03-01", "2026-03-31").await.unwrap();
    let got: Vec<(String, String, u64, u64, u64, u64)> = rows
        .iter()
        .map(|r| {
            (
                r.day.clone(),
                r.model.clone(),
                r.images,
                r.cached_images,
                r.input_tokens,
                r.output_tokens,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("2026-03-05".into(), "gpt-4.1-mini".into(), 2, 1, 1000, 50),
            ("2026-03-05".into(), "gpt-4o".into(), 1, 0, 1000, 50),
            ("2026-03-07".into(), "gpt-4.1-mini".into(), 1, 0, 1000, 50),
        ]
    );
    assert!(close(rows[0].cost_usd, 0.0125) && close(rows[0].estimated_cost_usd, 0.01));
    assert!(close(rows[1].cost_usd, 0.03) && close(rows[1].estimated_cost_usd, 0.02));
    assert!(close(rows[2].cost_usd, 0.0075) && close(rows[2].estimated_cost_usd, 0.005));
    let total: f64 = rows.iter().map(|r| r.cost_usd).sum();
    let results: f64 = [&r1, &r2, &r3, &r4].iter().map(|r| r.cost_usd).sum();
    assert!(close(total, results));
    // Day bounds are inclusive; other tenants see nothing.
    let one_day = repo.costs(&t, "2026-03-07", "2026-03-07").await.unwrap();
    assert_eq!(one_day.len(), 1);
    assert_eq!(one_day[0].model, "gpt-4.1-mini");
    assert!(repo
        .costs(&t, "2026-03-06", "2026-03-06")
        .await
        .unwrap()
        .is_empty());
    assert!(repo
        .costs(&unique("nobody"), "2026-01-01", "2026-12-31")
        .await
        .unwrap()
        .is_empty());
}

/// API keys map (hashed) to tenants; a tenant lists its keys and revokes them by id.
pub async fn api_keys_contract(repo: Arc<dyn Repository>) {
    let tenant = unique("acme");
    let h1 = format!("{:a>64}", unique("1"));
    let h2 = format!("{:b>64}", unique("2"));
    let h3 = format!("{:c>64}", unique("3"));
    repo.add_api_key(&h1, &tenant, "2026-01-01T00:00:00.000Z")
        .await
        .unwrap();
    assert_eq!(
        repo.tenant_for_key(&h1).await.unwrap().as_deref(),
        Some(tenant.as_str())
    );
    assert_eq!(repo.tenant_for_key(&h2).await.unwrap(), None);
    repo.add_api_key(&h2, &tenant, "2026-01-02T00:00:00.000Z")
        .await
        .unwrap();
    let other = unique("globex");
    repo.add_api_key(&h3, &other, "2026-01-03T00:00:00.000Z")
        .await
        .unwrap();
    let listed = repo.list_api_keys(&tenant).await.unwrap();
    let listed_ids: Vec<&str> = listed.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(listed_ids, vec![api_key_id(&h1), api_key_id(&h2)]);
    assert_eq!(listed[0].created_at, "2026-01-01T00:00:00.000Z");
    assert!(listed
        .iter()
        .all(|k| k.tenant == tenant && k.id.len() == 12));
    // Another tenant cannot revoke them; a malformed id revokes nothing.
    assert!(!repo.revoke_api_key(&other, &api_key_id(&h1)).await.unwrap());
    assert!(!repo.revoke_api_key(&tenant, "").await.unwrap());
    assert!(!repo.revoke_api_key(&tenant, &h1[..6]).await.unwrap());
    assert!(repo
        .revoke_api_key(&tenant, &api_key_id(&h1))
        .await
        .unwrap());
    assert_eq!(repo.tenant_for_key(&h1).await.unwrap(), None, "revoked");
    assert_eq!(
        repo.tenant_for_key(&h2).await.unwrap().as_deref(),
        Some(tenant.as_str())
    );
    assert!(!repo
        .revoke_api_key(&tenant, &api_key_id(&h1))
        .await
        .unwrap());
    assert_eq!(repo.list_api_keys(&tenant).await.unwrap().len(), 1);
    assert_eq!(repo.list_api_keys(&other).await.unwrap().len(), 1);
}

/// The record guard (never over a result, never over another upload), recheck times, the
/// transactional outbox of `put_queued`, and expiry of unused uploads.
pub async fn records_and_rechecks_contract(repo: Arc<dyn Repository>) {
    let t = unique("tr");
    let base = 1_900_000_000_000u64;
    let due = |repo: Arc<dyn Repository>, t: String, at: u64| async move {
        let mut got: Vec<String> = repo
            .due_rechecks(at, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.tenant == t)
            .map(|r| r.image_id)
            .collect();
        got.sort();
        got
    };
    let mut first = record(&t, "u1", "2026-04-01T00:00:00.000Z", ImageStatus::Queued);
    first.original_sha256 = Some("aa".repeat(32));
    assert_eq!(
        repo.put_image(&first, Some(base + 100)).await.unwrap(),
        PutImage::Stored
    );
    // The same upload again rewrites it; another upload, or none, does not.
    assert_eq!(
        repo.put_image(&first, Some(base + 100)).await.unwrap(),
        PutImage::Stored
    );
    let mut second = first.clone();
    second.original_sha256 = Some("bb".repeat(32));
    second.sha256 = Some("cd".repeat(32));
    assert_eq!(
        repo.put_image(&second, None).await.unwrap(),
        PutImage::OtherUpload
    );
    let mut anon = first.clone();
    anon.original_sha256 = None;
    assert_eq!(
        repo.put_image(&anon, None).await.unwrap(),
        PutImage::OtherUpload
    );
    assert_eq!(repo.get_image(&t, "u1").await.unwrap().unwrap(), first);

    // Due at its recheck time, not before; moved and cleared by set_recheck.
    assert!(due(repo.clone(), t.clone(), base + 99).await.is_empty());
    assert_eq!(due(repo.clone(), t.clone(), base + 100).await, vec!["u1"]);
    repo.set_recheck(&t, "u1", Some(base + 10)).await.unwrap();
    assert_eq!(due(repo.clone(), t.clone(), base + 10).await, vec!["u1"]);
    repo.set_recheck(&t, "u1", None).await.unwrap();
    assert!(due(repo.clone(), t.clone(), u64::MAX / 4).await.is_empty());
    repo.set_recheck(&t, "nobody", Some(base)).await.unwrap();
    assert_eq!(repo.get_image(&t, "nobody").await.unwrap(), None);

    // Finishing clears the recheck: complete and mark_failed.
    let done = record(&t, "u2", "2026-04-01T00:00:01.000Z", ImageStatus::Queued);
    let failed = record(&t, "u3", "2026-04-01T00:00:02.000Z", ImageStatus::Queued);
    repo.put_image(&done, Some(base)).await.unwrap();
    repo.put_image(&failed, Some(base)).await.unwrap();
    assert_eq!(due(repo.clone(), t.clone(), base).await, vec!["u2", "u3"]);
    let key = format!("t:{t}/{}:gpt-4.1-mini:v1", "ee".repeat(32));
    let r = result(
        &key,
        "gpt-4.1-mini",
        "2026-04-02T00:00:00.000Z",
        0.001,
        false,
    );
    assert_eq!(
        repo.complete(&t, "u2", &r, 0.001).await.unwrap(),
        Completion::Stored
    );
    repo.mark_failed(
        &t,
        "u3",
        "bad",
        Failure::Permanent,
        "2026-04-02T00:00:00.000Z",
    )
    .await
    .unwrap();
    assert!(due(repo.clone(), t.clone(), base).await.is_empty());
    assert_eq!(
        repo.put_image(&done, Some(base)).await.unwrap(),
        PutImage::HasResult
    );

    // put_queued: the record and its job together, or the record due for the send.
    let mut q = record(&t, "u4", "2026-04-01T00:00:03.000Z", ImageStatus::Queued);
    q.original_sha256 = Some("44".repeat(32));
    let (put, delivery) = repo
        .put_queued(&q, "{\"job\":4}", base, base + 50, base + 5000)
        .await
        .unwrap();
    assert_eq!(put, PutImage::Stored);
    match delivery {
        JobDelivery::SendIt => {
            assert_eq!(due(repo.clone(), t.clone(), base + 50).await, vec!["u4"])
        }
        JobDelivery::Delivered => {
            assert!(due(repo.clone(), t.clone(), base + 4999).await.is_empty());
            assert_eq!(due(repo.clone(), t.clone(), base + 5000).await, vec!["u4"]);
        }
    }
    let (put, _) = repo
        .put_queued(&done, "{}", base, base, base)
        .await
        .unwrap();
    assert_eq!(put, PutImage::HasResult);

    // Only a pending record expires.
    let pending = record(&t, "p1", "2026-04-01T00:00:04.000Z", ImageStatus::Pending);
    repo.put_image(&pending, Some(base)).await.unwrap();
    assert!(!repo.expire_pending(&t, "u4").await.unwrap());
    assert!(repo.get_image(&t, "u4").await.unwrap().is_some());
    assert!(repo.expire_pending(&t, "p1").await.unwrap());
    assert_eq!(repo.get_image(&t, "p1").await.unwrap(), None);
    assert!(!repo.expire_pending(&t, "p1").await.unwrap());
}

/// Money without a result is booked once per spend id; calls and estimated parts add up.
pub async fn spend_contract(repo: Arc<dyn Repository>) {
    let t = unique("ts");
    let spend = Spend {
        day: "2026-05-01".into(),
        model: "gpt-4.1-mini".into(),
        calls: 2,
        usage: Usage {
            input_tokens: 900,
            output_tokens: 100,
            cached_tokens: 0,
        },
        cost_usd: 0.004,
        calls_at_estimate: 1,
        cost_at_estimate_usd: 0.0025,
        lane: Default::default(),
        saved_usd: 0.0,
        kind: Default::default(),
    };
    repo.put_image(
        &record(&t, "s1", "2026-05-01T00:00:00.000Z", ImageStatus::Queued),
        Some(1),
    )
    .await
    .unwrap();
    repo.book_spend(&t, "s1", "spend-1", &spend).await.unwrap();
    repo.book_spend(&t, "s1", "spend-1", &spend).await.unwrap();
    // The image carries what it cost outside a result; its recheck is left alone.
    let extra = repo
        .get_image(&t, "s1")
        .await
        .unwrap()
        .unwrap()
        .extra_spend
        .unwrap();
    assert_eq!(
        (extra.calls, extra.input_tokens, extra.output_tokens),
        (2, 900, 100)
    );
    assert!(close(extra.cost_usd, 0.004) && close(extra.cost_at_estimate_usd, 0.0025));
    assert!(repo
        .due_rechecks(1, 1000)
        .await
        .unwrap()
        .iter()
        .any(|r| r.tenant == t && r.image_id == "s1"));
    // It stays when the image completes, next to the result.
    let k = format!("t:{t}/{}:gpt-4.1-mini:v1", "34".repeat(32));
    let r = result(&k, "gpt-4.1-mini", "2026-05-01T00:30:00.000Z", 0.001, false);
    repo.complete(&t, "s1", &r, 0.001).await.unwrap();
    let rec = repo.get_image(&t, "s1").await.unwrap().unwrap();
    assert_eq!(rec.extra_spend.map(|e| e.calls), Some(2));
    assert!(rec.result.is_some());
    // Money for an image that is gone still reaches the ledger.
    repo.book_spend(&t, "nobody", "spend-2", &spend)
        .await
        .unwrap();
    let rows = repo.costs(&t, "2026-05-01", "2026-05-01").await.unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(
        (
            row.images,
            row.calls,
            row.input_tokens,
            row.output_tokens,
            row.calls_at_estimate
        ),
        (1, 5, 2800, 250, 2)
    );
    assert!(close(row.cost_usd, 0.009) && close(row.cost_at_estimate_usd, 0.005));

    // A result whose usage was partly estimated adds its calls and estimated part too.
    repo.put_image(
        &record(&t, "e1", "2026-05-01T00:00:00.000Z", ImageStatus::Queued),
        None,
    )
    .await
    .unwrap();
    let mut r = result(
        &format!("t:{t}/{}:gpt-4.1-mini:v1", "12".repeat(32)),
        "gpt-4.1-mini",
        "2026-05-01T01:00:00.000Z",
        0.003,
        false,
    );
    r.calls = 2;
    r.usage_estimated = true;
    r.cost_at_estimate_usd = 0.001;
    assert_eq!(
        repo.complete(&t, "e1", &r, 0.002).await.unwrap(),
        Completion::Stored
    );
    let row = repo.costs(&t, "2026-05-01", "2026-05-01").await.unwrap()[0].clone();
    assert_eq!((row.images, row.calls, row.calls_at_estimate), (2, 7, 3));
    assert!(close(row.cost_usd, 0.012) && close(row.cost_at_estimate_usd, 0.006));
    assert!(close(row.estimated_cost_usd, 0.003));
    assert_eq!(row.kind, LedgerKind::Analysis);

    // An embedding is booked once, on a row of its own kind, and never on the image.
    let embedding = Spend {
        day: "2026-05-01".into(),
        model: "amazon.titan-embed-image-v1".into(),
        calls: 1,
        usage: Usage::default(),
        cost_usd: 0.00006,
        calls_at_estimate: 0,
        cost_at_estimate_usd: 0.0,
        lane: Default::default(),
        saved_usd: 0.0,
        kind: LedgerKind::Embedding,
    };
    repo.book_spend(&t, "e1", "embed-e1", &embedding)
        .await
        .unwrap();
    repo.book_spend(&t, "e1", "embed-e1", &embedding)
        .await
        .unwrap();
    let rows = repo.costs(&t, "2026-05-01", "2026-05-01").await.unwrap();
    let emb = rows
        .iter()
        .find(|r| r.model == "amazon.titan-embed-image-v1")
        .unwrap();
    assert_eq!(
        (emb.kind, emb.calls, emb.images),
        (LedgerKind::Embedding, 1, 0)
    );
    assert!(close(emb.cost_usd, 0.00006));
    let rec = repo.get_image(&t, "e1").await.unwrap().unwrap();
    assert!(rec.extra_spend.is_none(), "{:?}", rec.extra_spend);

    // A generated image is booked once per spend id, on a `generation` row of its model.
    let generation = Spend {
        model: "gpt-image-1".into(),
        usage: Usage {
            input_tokens: 9,
            output_tokens: 408,
            cached_tokens: 0,
        },
        cost_usd: 0.016365,
        kind: LedgerKind::Generation,
        ..embedding.clone()
    };
    for _ in 0..2 {
        repo.book_spend(&t, "e1", "gen-row-1", &generation)
            .await
            .unwrap();
    }
    let rows = repo.costs(&t, "2026-05-01", "2026-05-01").await.unwrap();
    let gen = rows.iter().find(|r| r.model == "gpt-image-1").unwrap();
    assert_eq!(
        (gen.kind, gen.calls, gen.output_tokens),
        (LedgerKind::Generation, 1, 408)
    );
    assert!(close(gen.cost_usd, 0.016365));
    let rec = repo.get_image(&t, "e1").await.unwrap().unwrap();
    assert!(rec.extra_spend.is_none(), "{:?}", rec.extra_spend);

    // A near-duplicate's reused analysis counts as an image at $0 with what it spared.
    repo.put_image(
        &record(&t, "n1", "2026-05-01T00:00:00.000Z", ImageStatus::Queued),
        None,
    )
    .await
    .unwrap();
    let mut r = result(
        &format!("t:{t}/{}:gpt-4.1-mini:v1", "56".repeat(32)),
        "gpt-4.1-mini",
        "2026-05-01T02:00:00.000Z",
        0.0,
        false,
    );
    r.calls = 0;
    r.usage = Usage::default();
    r.reused_from = Some("e1".into());
    r.saved_usd = 0.002;
    repo.complete(&t, "n1", &r, 0.002).await.unwrap();
    let row = repo
        .costs(&t, "2026-05-01", "2026-05-01")
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.model == "gpt-4.1-mini")
        .unwrap();
    assert_eq!((row.images, row.calls, row.reused_images), (3, 7, 1));
    assert!(close(row.cost_usd, 0.012) && close(row.reused_saved_usd, 0.002));
    assert_eq!(row.batch_images, 0);
    let rec = repo.get_image(&t, "n1").await.unwrap().unwrap();
    assert_eq!(
        rec.result.and_then(|r| r.reused_from).as_deref(),
        Some("e1")
    );
}

/// Budget holds: reserved atomically against the ledger's spent money and the live holds,
/// refused once a cap is spent, freed by settle or by their expiry; per-tenant caps.
pub async fn budget_contract(repo: Arc<dyn Repository>) {
    let t = unique("tb");
    // 2026-05-10T12:00:00Z
    let now = 1_778_414_400_000u64;
    let periods = Periods::at(now);
    assert_eq!(
        (periods.day.as_str(), periods.month.as_str()),
        ("2026-05-10", "2026-05")
    );
    let caps = BudgetCaps::from_amounts(0.05, 1.0);
    let later = now + 60_000;

    // Nothing spent: a hold fits and counts as reserved for the day and the month.
    let BudgetHold::Reserved(h1) = repo
        .reserve_budget(&t, &periods, 0.03, &caps, now, later)
        .await
        .unwrap()
    else {
        panic!("an empty budget refused a hold");
    };
    let counts = repo.budget_counts(&t, &periods, now).await.unwrap();
    assert!(close(counts.day.reserved_usd, 0.03) && close(counts.month.reserved_usd, 0.03));
    assert!(close(counts.day.spent_usd, 0.0));
    // Under the cap (0.03 < 0.05): one more fits; then 0.06 is held and the day refuses.
    let BudgetHold::Reserved(h2) = repo
        .reserve_budget(&t, &periods, 0.03, &caps, now, later)
        .await
        .unwrap()
    else {
        panic!("a hold under the cap was refused");
    };
    assert_eq!(
        repo.reserve_budget(&t, &periods, 0.01, &caps, now, later)
            .await
            .unwrap(),
        BudgetHold::Over(Period::Day)
    );
    // The ledger books the real cost, then the hold is settled: spent is what was booked.
    repo.put_image(
        &record(&t, "b1", "2026-05-10T11:00:00.000Z", ImageStatus::Queued),
        None,
    )
    .await
    .unwrap();
    let k = format!("t:{t}/{}:gpt-4.1-mini:v1", "56".repeat(32));
    let r = result(&k, "gpt-4.1-mini", "2026-05-10T12:00:01.000Z", 0.02, false);
    repo.complete(&t, "b1", &r, 0.03).await.unwrap();
    repo.settle_budget(&t, &periods, &h1).await.unwrap();
    repo.settle_budget(&t, &periods, &h1).await.unwrap(); // idempotent
    let counts = repo.budget_counts(&t, &periods, now).await.unwrap();
    assert!(close(counts.day.spent_usd, 0.02) && close(counts.day.reserved_usd, 0.03));
    assert!(close(counts.month.spent_usd, 0.02) && close(counts.month.reserved_usd, 0.03));
    assert_eq!(
        repo.reserve_budget(&t, &periods, 0.01, &caps, now, later)
            .await
            .unwrap(),
        BudgetHold::Over(Period::Day)
    );
    // A hold whose process died counts until it expires, then not at all.
    let after = later + 1;
    let counts = repo.budget_counts(&t, &periods, after).await.unwrap();
    assert!(close(counts.day.reserved_usd, 0.0));
    let BudgetHold::Reserved(h3) = repo
        .reserve_budget(&t, &periods, 0.02, &caps, after, after + 60_000)
        .await
        .unwrap()
    else {
        panic!("an expired hold still counted");
    };
    repo.settle_budget(&t, &periods, &h2).await.unwrap(); // expired: a no-op
    repo.settle_budget(&t, &periods, &h3).await.unwrap();
    // The month counts other days of the month, not other months.
    let spend = Spend {
        day: "2026-05-02".into(),
        model: "gpt-4.1-mini".into(),
        calls: 1,
        usage: Usage::default(),
        cost_usd: 0.99,
        calls_at_estimate: 0,
        cost_at_estimate_usd: 0.0,
        lane: Default::default(),
        saved_usd: 0.0,
        kind: Default::default(),
    };
    repo.book_spend(&t, "gone", &format!("{t}-may"), &spend)
        .await
        .unwrap();
    let april = Spend {
        day: "2026-04-30".into(),
        ..spend.clone()
    };
    repo.book_spend(&t, "gone", &format!("{t}-april"), &april)
        .await
        .unwrap();
    let counts = repo.budget_counts(&t, &periods, after).await.unwrap();
    assert!(close(counts.month.spent_usd, 1.01) && close(counts.day.spent_usd, 0.02));
    let day_only = BudgetCaps::from_amounts(0.5, 0.0);
    assert!(matches!(
        repo.reserve_budget(&t, &periods, 0.01, &day_only, after, after + 1)
            .await
            .unwrap(),
        BudgetHold::Reserved(_)
    ));
    let day_spent = BudgetCaps::from_amounts(0.02, 0.0);
    assert_eq!(
        repo.reserve_budget(&t, &periods, 0.01, &day_spent, after, after + 1)
            .await
            .unwrap(),
        BudgetHold::Over(Period::Day)
    );
    let month_only = BudgetCaps::from_amounts(0.0, 1.0);
    assert_eq!(
        repo.reserve_budget(&t, &periods, 0.01, &month_only, after, after + 1)
            .await
            .unwrap(),
        BudgetHold::Over(Period::Month)
    );

    // Twenty concurrent holds near a cap: exactly the ones that fit are admitted (binary-exact
    // amounts: 0, 0.125, 0.25 and 0.375 held are under 0.5, the fifth is not).
    let racer = unique("tr");
    let half = BudgetCaps::from_amounts(0.5, 0.0);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (repo, racer, periods) = (repo.clone(), racer.clone(), periods.clone());
        tasks.push(tokio::spawn(async move {
            repo.reserve_budget(&racer, &periods, 0.125, &half, now, later)
                .await
                .unwrap()
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        match t.await.unwrap() {
            BudgetHold::Reserved(_) => admitted += 1,
            BudgetHold::Over(p) => assert_eq!(p, Period::Day),
        }
    }
    assert_eq!(admitted, 4, "holds admitted by racing reservations");
    let counts = repo.budget_counts(&racer, &periods, now).await.unwrap();
    assert!(close(counts.day.reserved_usd, 0.5));

    // A tenant's own caps: absent, set, replaced, removed.
    assert_eq!(repo.tenant_budget(&t).await.unwrap(), None);
    let own = BudgetCaps {
        daily_usd: Some(2.5),
        monthly_usd: None,
    };
    repo.set_tenant_budget(&t, Some(&own)).await.unwrap();
    assert_eq!(repo.tenant_budget(&t).await.unwrap(), Some(own));
    let own = BudgetCaps {
        daily_usd: None,
        monthly_usd: Some(40.0),
    };
    repo.set_tenant_budget(&t, Some(&own)).await.unwrap();
    assert_eq!(repo.tenant_budget(&t).await.unwrap(), Some(own));
    repo.set_tenant_budget(&t, None).await.unwrap();
    assert_eq!(repo.tenant_budget(&t).await.unwrap(), None);
}

/// Everything the repository promises.
pub async fn repository_contract(repo: Arc<dyn Repository>) {
    images_contract(repo.clone()).await;
    claims_and_completion_contract(repo.clone()).await;
    records_and_rechecks_contract(repo.clone()).await;
    spend_contract(repo.clone()).await;
    budget_contract(repo.clone()).await;
    api_keys_contract(repo).await;
}

/// A pending batch item of `key` for `tenant` (its one waiter is set by the enqueue).
pub fn batch_item(key: &str, tenant: &str, created_ms: u64, not_before_ms: u64) -> BatchItem {
    BatchItem {
        custom_id: custom_id(key),
        key: key.to_string(),
        tenant: tenant.to_string(),
        provider: "openai".into(),
        model: "gpt-4.1-mini".into(),
        sha256: "ab".repeat(32),
        resized_key: format!("resized/{tenant}/x.jpg"),
        width: 512,
        height: 384,
        bytes: 40_000,
        detail: Detail::Low,
        estimate_usd: 0.0002,
        estimate_input_tokens: 300,
        estimate_output_tokens: 100,
        waiters: Vec::new(),
        batch_id: None,
        attempts: 0,
        created_ms,
        not_before_ms,
        ended: None,
    }
}

pub fn batch_record(
    batch_id: &str,
    tenant: &str,
    created_ms: u64,
    state: BatchState,
) -> BatchRecord {
    BatchRecord {
        batch_id: batch_id.to_string(),
        tenant: tenant.to_string(),
        provider: "openai".into(),
        model: "gpt-4.1-mini".into(),
        state,
        provider_batch_id: None,
        provider_status: None,
        error: None,
        requests: 3,
        counts: LineCounts::default(),
        cost_usd: 0.0,
        saved_usd: 0.0,
        hold: None,
        created_at: sightline_pipeline::ports::rfc3339(created_ms),
        created_ms,
        submitted_at: None,
        ended_at: None,
    }
}

fn waiter(tenant: &str, image_id: &str) -> BatchWaiter {
    BatchWaiter {
        tenant: tenant.to_string(),
        image_id: image_id.to_string(),
    }
}

/// Custom ids of `items` that are among `mine`, in their order (the listings are table-wide).
fn only(items: &[BatchItem], mine: &[&BatchItem]) -> Vec<String> {
    items
        .iter()
        .filter(|i| mine.iter().any(|m| m.custom_id == i.custom_id))
        .map(|i| i.custom_id.clone())
        .collect()
}

fn cids(items: &[&BatchItem]) -> Vec<String> {
    items.iter().map(|i| i.custom_id.clone()).collect()
}

/// Batch items: enqueue (create, join, already waiting, cached), pending order and
/// `not_before`, conditional moves (assign, release, end, drop, defer) and purge.
pub async fn batch_items_contract(repo: Arc<dyn Repository>, store: Arc<dyn BatchStore>) {
    let t = unique("tbi");
    let base = 1_900_000_000_000u64;
    let key = |name: &str| format!("{}:gpt-4.1-mini:v1", unique(&format!("{name}-{t}-")));
    let a = batch_item(&key("a"), &t, base + 3, 0);
    let b = batch_item(&key("b"), &t, base + 1, 0);
    let c = batch_item(&key("c"), &t, base + 2, base + 10_000);
    let d = batch_item(&key("d"), &t, base + 4, 0);
    let mine = [&a, &b, &c, &d];
    let (w1, w2, w3) = (waiter(&t, "i1"), waiter(&t, "i2"), waiter(&t, "i3"));

    assert_eq!(
        store.enqueue_batch(&a, &w1).await.unwrap(),
        Enqueued::Created
    );
    assert_eq!(
        store.enqueue_batch(&a, &w1).await.unwrap(),
        Enqueued::AlreadyWaiting
    );
    assert_eq!(
        store.enqueue_batch(&a, &w2).await.unwrap(),
        Enqueued::Joined
    );
    assert_eq!(
        store.enqueue_batch(&a, &w2).await.unwrap(),
        Enqueued::AlreadyWaiting
    );
    for (item, w) in [(&b, &w1), (&c, &w1), (&d, &w3)] {
        assert_eq!(
            store.enqueue_batch(item, w).await.unwrap(),
            Enqueued::Created
        );
    }

    // Pending: oldest first, only those whose not_before has come.
    let pending = store
        .pending_batch_items(base + 5_000, 10_000)
        .await
        .unwrap();
    assert_eq!(only(&pending, &mine), cids(&[&b, &a, &d]));
    let got_a = pending.iter().find(|i| i.custom_id == a.custom_id).unwrap();
    assert_eq!(got_a.waiters, vec![w1.clone(), w2.clone()]);
    assert_eq!((got_a.batch_id.as_deref(), got_a.attempts), (None, 0));
    assert_eq!(got_a.key, a.key);
    assert_eq!(got_a.ended, None);
    let pending = store
        .pending_batch_items(base + 10_000, 10_000)
        .await
        .unwrap();
    assert_eq!(only(&pending, &mine), cids(&[&b, &c, &a, &d]));
    assert!(
        store
            .pending_batch_items(base + 10_000, 1)
            .await
            .unwrap()
            .len()
            <= 1
    );

    // Defer only pending ones.
    assert!(store
        .defer_batch_item(&b.custom_id, base + 20_000)
        .await
        .unwrap());
    let pending = store
        .pending_batch_items(base + 10_000, 10_000)
        .await
        .unwrap();
    assert_eq!(only(&pending, &mine), cids(&[&c, &a, &d]));
    assert!(!store.defer_batch_item("no-such-item", base).await.unwrap());

    // Assign takes pending items only (deferred ones too), once.
    let (b1, b2, b3) = (unique("bat1-"), unique("bat2-"), unique("bat3-"));
    let ask: Vec<String> = vec![
        a.custom_id.clone(),
        b.custom_id.clone(),
        "no-such-item".into(),
    ];
    assert_eq!(
        store.assign_batch_items(&b1, &ask).await.unwrap(),
        cids(&[&a, &b])
    );
    let ask: Vec<String> = cids(&[&a, &b, &c]);
    assert_eq!(
        store.assign_batch_items(&b2, &ask).await.unwrap(),
        cids(&[&c])
    );
    let in1 = store.batch_items(&b1).await.unwrap();
    assert_eq!(cids(&in1.iter().collect::<Vec<_>>()), cids(&[&b, &a]));
    assert!(in1
        .iter()
        .all(|i| i.batch_id.as_deref() == Some(b1.as_str())));
    assert_eq!(
        cids(
            &store
                .batch_items(&b2)
                .await
                .unwrap()
                .iter()
                .collect::<Vec<_>>()
        ),
        cids(&[&c])
    );
    let pending = store.pending_batch_items(u64::MAX, 10_000).await.unwrap();
    assert_eq!(only(&pending, &mine), cids(&[&d]));
    assert!(!store.defer_batch_item(&a.custom_id, base).await.unwrap());
    assert!(!store.drop_pending_item(&a.custom_id).await.unwrap());

    // An item in a batch can still be joined; it stays in its batch.
    assert_eq!(
        store.enqueue_batch(&a, &w3).await.unwrap(),
        Enqueued::Joined
    );
    let in1 = store.batch_items(&b1).await.unwrap();
    let got_a = in1.iter().find(|i| i.custom_id == a.custom_id).unwrap();
    assert_eq!(got_a.waiters, vec![w1.clone(), w2.clone(), w3.clone()]);
    assert_eq!(got_a.batch_id.as_deref(), Some(b1.as_str()));

    // Release only from the batch that holds it; attempts count when asked.
    assert!(!store
        .release_batch_item(&a.custom_id, &b2, true, 0)
        .await
        .unwrap());
    assert!(store
        .release_batch_item(&a.custom_id, &b1, true, base + 30_000)
        .await
        .unwrap());
    assert!(!store
        .release_batch_item(&a.custom_id, &b1, true, base + 30_000)
        .await
        .unwrap());
    assert!(store
        .release_batch_item(&b.custom_id, &b1, false, 0)
        .await
        .unwrap());
    let pending = store
        .pending_batch_items(base + 10_000, 10_000)
        .await
        .unwrap();
    assert_eq!(only(&pending, &mine), cids(&[&b, &d]));
    let pending = store
        .pending_batch_items(base + 30_000, 10_000)
        .await
        .unwrap();
    assert_eq!(only(&pending, &mine), cids(&[&b, &a, &d]));
    let find = |items: &[BatchItem], id: &str| items.iter().find(|i| i.custom_id == id).cloned();
    let got_a = find(&pending, &a.custom_id).unwrap();
    assert_eq!((got_a.attempts, got_a.not_before_ms), (1, base + 30_000));
    assert_eq!(got_a.batch_id, None);
    assert_eq!(got_a.waiters.len(), 3);
    assert_eq!(find(&pending, &b.custom_id).unwrap().attempts, 0);
    assert!(store.batch_items(&b1).await.unwrap().is_empty());

    // End once, and only in the batch that holds it.
    let end = ItemEnd {
        answered: true,
        cost_usd: 0.0002,
        saved_usd: 0.0002,
    };
    assert!(!store.end_batch_item(&c.custom_id, &b1, &end).await.unwrap());
    assert!(store.end_batch_item(&c.custom_id, &b2, &end).await.unwrap());
    assert!(!store.end_batch_item(&c.custom_id, &b2, &end).await.unwrap());
    let in2 = store.batch_items(&b2).await.unwrap();
    assert_eq!(in2.len(), 1);
    assert_eq!(in2[0].ended.as_ref(), Some(&end));
    assert!(!store.end_batch_item(&a.custom_id, &b1, &end).await.unwrap());

    // Purge deletes a batch's ended items only.
    assert_eq!(
        store
            .assign_batch_items(&b3, &cids(&[&b, &d]))
            .await
            .unwrap(),
        cids(&[&b, &d])
    );
    assert!(store.end_batch_item(&d.custom_id, &b3, &end).await.unwrap());
    store.purge_batch(&b3).await.unwrap();
    let in3 = store.batch_items(&b3).await.unwrap();
    assert_eq!(cids(&in3.iter().collect::<Vec<_>>()), cids(&[&b]));
    assert_eq!(in3[0].ended, None);
    // The purged item is gone: a new enqueue of its key creates it afresh.
    assert_eq!(
        store.enqueue_batch(&d, &w1).await.unwrap(),
        Enqueued::Created
    );

    // An ended item counts as absent on enqueue: a fresh pending item, leaving its batch.
    let w4 = waiter(&t, "i4");
    assert_eq!(
        store.enqueue_batch(&c, &w4).await.unwrap(),
        Enqueued::Created
    );
    let pending = store.pending_batch_items(u64::MAX, 10_000).await.unwrap();
    let got_c = find(&pending, &c.custom_id).unwrap();
    assert_eq!(got_c.waiters, vec![w4.clone()]);
    assert_eq!(
        (got_c.batch_id.as_deref(), got_c.ended.as_ref()),
        (None, None)
    );
    assert!(store.batch_items(&b2).await.unwrap().is_empty());
    store.purge_batch(&b2).await.unwrap();
    assert!(find(
        &store.pending_batch_items(u64::MAX, 10_000).await.unwrap(),
        &c.custom_id
    )
    .is_some());

    // Drop only pending ones.
    assert!(store.drop_pending_item(&c.custom_id).await.unwrap());
    assert!(!store.drop_pending_item(&c.custom_id).await.unwrap());
    assert!(!store.drop_pending_item(&b.custom_id).await.unwrap());
    let pending = store.pending_batch_items(u64::MAX, 10_000).await.unwrap();
    assert_eq!(only(&pending, &mine), cids(&[&a, &d]));

    // Cached: a key answered through `complete` is reused, pending item or not.
    assert_eq!(store.cached_answer(&a.key).await.unwrap(), None);
    let e = batch_item(&key("e"), &t, base + 5, 0);
    for (id, item) in [("img-a", &a), ("img-e", &e)] {
        let rec = record(&t, id, "2026-04-01T00:00:00.000Z", ImageStatus::Queued);
        repo.put_image(&rec, None).await.unwrap();
        let r = result(
            &item.key,
            "gpt-4.1-mini",
            "2026-04-01T00:01:00.000Z",
            0.001,
            false,
        );
        assert_eq!(
            repo.complete(&t, id, &r, 0.001).await.unwrap(),
            Completion::Stored
        );
        assert_eq!(
            store.cached_answer(&item.key).await.unwrap(),
            Some(r.clone())
        );
        assert_eq!(
            store.enqueue_batch(item, &waiter(&t, "i9")).await.unwrap(),
            Enqueued::Cached(Box::new(r))
        );
    }
    let pending = store.pending_batch_items(u64::MAX, 10_000).await.unwrap();
    assert!(
        find(&pending, &e.custom_id).is_none(),
        "a cached key makes no item"
    );
    assert!(
        find(&pending, &a.custom_id).is_some(),
        "the submitter drops it"
    );
}

/// Batch records: put/get, close only while open, listing newest first by tenant and state.
pub async fn batch_records_contract(store: Arc<dyn BatchStore>) {
    let (t, o) = (unique("tbr"), unique("tbr-other-"));
    let base = 1_900_000_000_000u64;
    let r1 = batch_record(&unique("r1-"), &t, base + 1, BatchState::Running);
    let r2 = batch_record(&unique("r2-"), &t, base + 2, BatchState::Ended);
    let r3 = batch_record(&unique("r3-"), &o, base + 3, BatchState::Submitting);
    let r4 = batch_record(&unique("r4-"), &t, base + 4, BatchState::Submitting);
    for r in [&r1, &r2, &r3, &r4] {
        store.put_batch(r).await.unwrap();
    }
    assert_eq!(
        store.get_batch(&r1.batch_id).await.unwrap().as_ref(),
        Some(&r1)
    );
    assert_eq!(store.get_batch("no-such-batch").await.unwrap(), None);

    let ids = |rs: Vec<BatchRecord>| -> Vec<String> {
        rs.into_iter()
            .map(|r| r.batch_id)
            .filter(|id| [&r1, &r2, &r3, &r4].iter().any(|r| &r.batch_id == id))
            .collect()
    };
    let want =
        |rs: &[&BatchRecord]| -> Vec<String> { rs.iter().map(|r| r.batch_id.clone()).collect() };
    let list = |tenant: Option<String>, open: bool, limit: usize| {
        let store = store.clone();
        async move {
            store
                .list_batches(tenant.as_deref(), open, limit)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        ids(list(Some(t.clone()), false, 10).await),
        want(&[&r4, &r2, &r1])
    );
    assert_eq!(
        ids(list(Some(t.clone()), false, 2).await),
        want(&[&r4, &r2])
    );
    assert_eq!(
        ids(list(Some(t.clone()), true, 10).await),
        want(&[&r4, &r1])
    );
    assert_eq!(ids(list(Some(o.clone()), false, 10).await), want(&[&r3]));
    assert_eq!(ids(list(None, true, 10_000).await), want(&[&r4, &r3, &r1]));
    assert_eq!(
        ids(list(None, false, 10_000).await),
        want(&[&r4, &r3, &r2, &r1])
    );
    assert!(list(Some(unique("nobody")), false, 10).await.is_empty());

    // Close only while open: the first closer wins.
    let mut done = r1.clone();
    done.state = BatchState::Ended;
    done.counts = LineCounts {
        succeeded: 2,
        failed: 1,
        retried: 0,
    };
    done.cost_usd = 0.0005;
    done.ended_at = Some("2026-04-02T00:00:00.000Z".into());
    assert!(store.close_batch(&done).await.unwrap());
    let mut late = r1.clone();
    late.state = BatchState::Failed;
    assert!(!store.close_batch(&late).await.unwrap());
    assert_eq!(store.get_batch(&r1.batch_id).await.unwrap(), Some(done));
    let mut r2_again = r2.clone();
    r2_again.state = BatchState::Failed;
    assert!(!store.close_batch(&r2_again).await.unwrap());
    assert_eq!(
        store.get_batch(&r2.batch_id).await.unwrap().as_ref(),
        Some(&r2)
    );
    let ghost = batch_record(&unique("ghost-"), &t, base, BatchState::Ended);
    assert!(!store.close_batch(&ghost).await.unwrap());
    assert_eq!(store.get_batch(&ghost.batch_id).await.unwrap(), None);
    assert_eq!(ids(list(Some(t.clone()), true, 10).await), want(&[&r4]));

    // Put overwrites (submitting → running keeps it open; ended leaves the open listing).
    let mut running = r4.clone();
    running.state = BatchState::Running;
    running.provider_batch_id = Some("batch_abc".into());
    store.put_batch(&running).await.unwrap();
    assert_eq!(
        store.get_batch(&r4.batch_id).await.unwrap(),
        Some(running.clone())
    );
    assert_eq!(ids(list(Some(t.clone()), true, 10).await), want(&[&r4]));
    let mut failed = running;
    failed.state = BatchState::Failed;
    store.put_batch(&failed).await.unwrap();
    assert!(ids(list(Some(t.clone()), true, 10).await).is_empty());
    assert_eq!(ids(list(Some(t), false, 10).await), want(&[&r4, &r2, &r1]));
}

/// Everything the batch store promises (`repo` and `store` are the same adapter).
pub async fn batch_store_contract(repo: Arc<dyn Repository>, store: Arc<dyn BatchStore>) {
    batch_items_contract(repo, store.clone()).await;
    batch_records_contract(store).await;
}

/// Receive until `want` messages are collected or `timeout` passes.
pub async fn receive_n(
    queue: &dyn Queue,
    want: usize,
    visibility: Duration,
    timeout: Duration,
) -> Vec<QueueMessage> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        let got = queue.receive(10, visibility).await.unwrap();
        if got.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        out.extend(got);
    }
    out
}

/// SQS semantics: batching, visibility timeout, redelivery with receive counts, delete,
/// retry_after. `queue` must be empty and have a redrive limit above 5 (or none).
pub async fn queue_contract(queue: Arc<dyn Queue>) {
    let q = queue.as_ref();
    // More than one SendMessageBatch.
    let bodies: Vec<String> = (0..12).map(|i| format!("{{\"n\":{i}}}")).collect();
    q.send(bodies.clone()).await.unwrap();
    let got = receive_n(q, 12, Duration::from_secs(30), Duration::from_secs(20)).await;
    assert_eq!(got.len(), 12);
    let received: BTreeSet<String> = got.iter().map(|m| m.body.clone()).collect();
    assert_eq!(received, bodies.iter().cloned().collect::<BTreeSet<_>>());
    assert!(got.iter().all(|m| m.receive_count == 1));
    assert_eq!(
        got.iter()
            .map(|m| m.message_id.clone())
            .collect::<BTreeSet<_>>()
            .len(),
        12
    );
    // All are hidden now.
    assert!(q
        .receive(10, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());

    let keep = got[0].clone();
    for m in &got[1..] {
        q.delete(&m.receipt).await.unwrap();
    }
    // Visible again at once, counted as a second receive.
    q.retry_after(&keep.receipt, Duration::ZERO).await.unwrap();
    let again = receive_n(q, 1, Duration::from_secs(30), Duration::from_secs(10)).await;
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].message_id.as_str(), again[0].body.as_str()),
        (keep.message_id.as_str(), keep.body.as_str())
    );
    assert_eq!(again[0].receive_count, 2);

    // A delay keeps it hidden until the delay has passed.
    let t0 = Instant::now();
    q.retry_after(&again[0].receipt, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(q
        .receive(10, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    let third = receive_n(q, 1, Duration::from_secs(1), Duration::from_secs(15)).await;
    assert_eq!(third.len(), 1);
    assert!(
        t0.elapsed() >= Duration::from_millis(1500),
        "came back after {:?}",
        t0.elapsed()
    );
    assert_eq!(third[0].receive_count, 3);
    assert_eq!(third[0].body, keep.body);

    // Not deleted within its 1 s visibility: it comes back by itself.
    let fourth = receive_n(q, 1, Duration::from_secs(30), Duration::from_secs(15)).await;
    assert_eq!(fourth.len(), 1);
    assert_eq!(fourth[0].receive_count, 4);
    q.delete(&fourth[0].receipt).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(q
        .receive(10, Duration::from_secs(1))
        .await
        .unwrap()
        .is_empty());
    // Sending nothing is fine.
    q.send(Vec::new()).await.unwrap();
}

/// Blobs: put/get/size/delete, the size limit, awkward keys.
pub async fn blob_contract(blobs: Arc<dyn BlobStore>) {
    let dir = unique("contract");
    let key = format!("{dir}/a b+c(1)é.jpg");
    let bytes: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
    blobs.put(&key, bytes.clone(), "image/jpeg").await.unwrap();
    assert_eq!(blobs.size(&key).await.unwrap(), Some(5000));
    assert_eq!(blobs.get(&key, 5000).await.unwrap(), bytes);
    match blobs.get(&key, 4999).await {
        Err(StoreError::TooLarge { bytes, max, .. }) => assert_eq!((bytes, max), (5000, 4999)),
        other => panic!("expected TooLarge, got {:?}", other.map(|b| b.len())),
    }
    // Overwrite.
    blobs.put(&key, vec![1, 2, 3], "image/jpeg").await.unwrap();
    assert_eq!(blobs.get(&key, 10).await.unwrap(), vec![1, 2, 3]);
    // Empty objects exist.
    let empty = format!("{dir}/empty.jpg");
    blobs.put(&empty, Vec::new(), "image/jpeg").await.unwrap();
    assert_eq!(blobs.size(&empty).await.unwrap(), Some(0));
    assert_eq!(blobs.get(&empty, 0).await.unwrap(), Vec::<u8>::new());

    // What this port writes carries no user metadata; an absent object has none at all.
    assert_eq!(
        blobs.metadata(&key).await.unwrap(),
        Some(Default::default())
    );

    let missing = format!("{dir}/missing.jpg");
    assert_eq!(blobs.size(&missing).await.unwrap(), None);
    assert_eq!(blobs.metadata(&missing).await.unwrap(), None);
    assert!(matches!(
        blobs.get(&missing, 10).await,
        Err(StoreError::NotFound(_))
    ));
    blobs.delete(&key).await.unwrap();
    assert_eq!(blobs.size(&key).await.unwrap(), None);
    blobs.delete(&missing).await.unwrap();
}

/// A unit vector of `dims` pointing mostly along axis `axis`, tilted by `tilt` towards the next
/// axis: cosine distances between such vectors are known in advance.
pub fn unit_vector(dims: usize, axis: usize, tilt: f32) -> Vec<f32> {
    let mut v = vec![0.0f32; dims];
    v[axis % dims] = 1.0;
    v[(axis + 1) % dims] = tilt;
    let norm = (1.0 + tilt * tilt).sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

fn vector_record(tenant: &str, image_id: &str, vector: Vec<f32>, tags: &[&str]) -> VectorRecord {
    VectorRecord {
        tenant: tenant.to_string(),
        image_id: image_id.to_string(),
        vector,
        meta: VectorMeta {
            status: "done".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
        },
    }
}

fn query(tenant: &str, vector: Vec<f32>, top_k: usize, tag: Option<&str>) -> VectorQuery {
    VectorQuery {
        tenant: tenant.to_string(),
        vector,
        top_k,
        tag: tag.map(str::to_string),
    }
}

/// Vectors: exact cosine ranking, tenant isolation, tag filter, replace, delete, dimension
/// checks, separate indexes per model and dimension.
pub async fn vector_store_contract(store: Arc<dyn VectorStore>) {
    let dims = 8;
    let index = VectorIndex::new(unique("contract-model/"), dims as u32);
    let a = unique("tenant-a-");
    let b = unique("tenant-b-");

    // A missing index has no hits.
    let hits = store
        .query(&index, &query(&a, unit_vector(dims, 0, 0.0), 5, None))
        .await
        .unwrap();
    assert!(hits.is_empty(), "{hits:?}");

    store.ensure_index(&index).await.unwrap();
    store.ensure_index(&index).await.unwrap(); // idempotent

    // Tenant A: img-0 .. img-4 at growing angles from axis 0; tenant B: one vector exactly on
    // axis 0, which A's queries must never see.
    let tilts = [0.05f32, 0.2, 0.5, 1.0, 3.0];
    let records: Vec<VectorRecord> = tilts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let tags: &[&str] = if i % 2 == 0 {
                &["even", "shoe"]
            } else {
                &["odd"]
            };
            vector_record(&a, &format!("img-{i}"), unit_vector(dims, 0, *t), tags)
        })
        .collect();
    store.put_vectors(&index, &records).await.unwrap();
    store
        .put_vectors(
            &index,
            &[vector_record(
                &b,
                "img-b",
                unit_vector(dims, 0, 0.0),
                &["even"],
            )],
        )
        .await
        .unwrap();

    let hits = store
        .query(&index, &query(&a, unit_vector(dims, 0, 0.0), 10, None))
        .await
        .unwrap();
    let ids: Vec<&str> = hits.iter().map(|h| h.image_id.as_str()).collect();
    assert_eq!(ids, ["img-0", "img-1", "img-2", "img-3", "img-4"]);
    for (hit, tilt) in hits.iter().zip(tilts) {
        let expected = 1.0 - 1.0 / (1.0 + tilt * tilt).sqrt();
        assert!(
            (hit.distance - expected).abs() < 1e-3,
            "{}: distance {} expected {expected}",
            hit.image_id,
            hit.distance
        );
    }
    assert_eq!(hits[0].meta.tags, ["even", "shoe"]);
    assert_eq!(hits[0].meta.status, "done");

    // top_k and the tag filter.
    let hits = store
        .query(&index, &query(&a, unit_vector(dims, 0, 0.0), 2, None))
        .await
        .unwrap();
    assert_eq!(hits.len(), 2);
    let hits = store
        .query(
            &index,
            &query(&a, unit_vector(dims, 0, 0.0), 10, Some("even")),
        )
        .await
        .unwrap();
    let ids: Vec<&str> = hits.iter().map(|h| h.image_id.as_str()).collect();
    assert_eq!(ids, ["img-0", "img-2", "img-4"]);
    let hits = store
        .query(
            &index,
            &query(&a, unit_vector(dims, 0, 0.0), 10, Some("absent")),
        )
        .await
        .unwrap();
    assert!(hits.is_empty());

    // Tenant B sees only its own vector.
    let hits = store
        .query(&index, &query(&b, unit_vector(dims, 3, 0.0), 10, None))
        .await
        .unwrap();
    let ids: Vec<&str> = hits.iter().map(|h| h.image_id.as_str()).collect();
    assert_eq!(ids, ["img-b"]);
    // An unknown tenant sees nothing.
    let hits = store
        .query(
            &index,
            &query(&unique("nobody-"), unit_vector(dims, 0, 0.0), 10, None),
        )
        .await
        .unwrap();
    assert!(hits.is_empty());

    // get_vector round-trips (f32 values, tags).
    let got = store
        .get_vector(&index, &a, "img-2")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.image_id, "img-2");
    assert_eq!(got.tenant, a);
    for (x, y) in got.vector.iter().zip(unit_vector(dims, 0, 0.5)) {
        assert!((x - y).abs() < 1e-6);
    }
    assert!(store
        .get_vector(&index, &b, "img-2")
        .await
        .unwrap()
        .is_none());

    // Replacing a vector moves it.
    store
        .put_vectors(
            &index,
            &[vector_record(
                &a,
                "img-4",
                unit_vector(dims, 0, 0.0),
                &["odd"],
            )],
        )
        .await
        .unwrap();
    let hits = store
        .query(&index, &query(&a, unit_vector(dims, 0, 0.0), 1, None))
        .await
        .unwrap();
    assert_eq!(hits[0].image_id, "img-4");
    assert!(hits[0].distance.abs() < 1e-4);
    assert_eq!(hits[0].meta.tags, ["odd"]);

    // A wrong dimension is refused, and nothing is written.
    match store
        .put_vectors(
            &index,
            &[vector_record(
                &a,
                "img-bad",
                unit_vector(dims + 1, 0, 0.0),
                &[],
            )],
        )
        .await
    {
        Err(StoreError::InvalidInput(_)) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert!(store
        .get_vector(&index, &a, "img-bad")
        .await
        .unwrap()
        .is_none());

    // Another index (same model, another dimension) is separate.
    let other = VectorIndex::new(index.model.clone(), 4);
    store.ensure_index(&other).await.unwrap();
    store
        .put_vectors(
            &other,
            &[vector_record(&a, "img-0", unit_vector(4, 1, 0.0), &[])],
        )
        .await
        .unwrap();
    let hits = store
        .query(&other, &query(&a, unit_vector(4, 1, 0.0), 10, None))
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);

    // Deleting removes the image's vectors from every index; missing ids are fine.
    store
        .delete_vectors(&a, &["img-0".to_string(), "never-stored".to_string()])
        .await
        .unwrap();
    assert!(store
        .get_vector(&index, &a, "img-0")
        .await
        .unwrap()
        .is_none());
    assert!(store
        .get_vector(&other, &a, "img-0")
        .await
        .unwrap()
        .is_none());
    let hits = store
        .query(&index, &query(&a, unit_vector(dims, 0, 0.0), 10, None))
        .await
        .unwrap();
    let ids: BTreeSet<&str> = hits.iter().map(|h| h.image_id.as_str()).collect();
    assert_eq!(ids, BTreeSet::from(["img-1", "img-2", "img-3", "img-4"]));
    // Tenant B's vector with the same id survives A's delete.
    store
        .delete_vectors(&a, &["img-b".to_string()])
        .await
        .unwrap();
    assert!(store
        .get_vector(&index, &b, "img-b")
        .await
        .unwrap()
        .is_some());

    // Many vectors in one call (adapters batch their writes), and top_k at the maximum.
    let many: Vec<VectorRecord> = (0..250)
        .map(|i| {
            vector_record(
                &b,
                &format!("many-{i:03}"),
                unit_vector(dims, i % dims, (i / dims) as f32 * 0.01),
                &[],
            )
        })
        .collect();
    store.put_vectors(&index, &many).await.unwrap();
    let hits = store
        .query(
            &index,
            &query(&b, unit_vector(dims, 2, 0.0), MAX_TOP_K, None),
        )
        .await
        .unwrap();
    assert_eq!(hits.len(), MAX_TOP_K);
    assert!(hits
        .windows(2)
        .all(|w| w[0].distance <= w[1].distance + 1e-6));
    assert_eq!(hits[0].image_id, "many-002");
}

// ---------------------------------------------------------------------------------------------
// Generation jobs
// ---------------------------------------------------------------------------------------------

fn gen_row(tenant: &str, job_id: &str, row: u32) -> sightline_pipeline::ports::GenerationRow {
    use sightline_core::generate::{GenerationRequest, OutputFormat, Quality, Size};
    sightline_pipeline::ports::GenerationRow {
        job_id: job_id.into(),
        tenant: tenant.into(),
        row,
        request: GenerationRequest {
            row: row as usize,
            template: "t".into(),
            prompt: format!("picture {row}"),
            model: "local-canvas".into(),
            size: Size::Pixels {
                width: 256,
                height: 256,
            },
            quality: Quality::Auto,
            output_format: OutputFormat::Png,
            seed: None,
            output_key: None,
        },
        status: sightline_core::genjob::RowStatus::Queued,
        attempt: 1,
        image_id: None,
        output_key: None,
        generation_cost_usd: 0.0,
        reused: false,
        check: None,
        first_check: None,
        error: None,
        budget_wait_until_ms: None,
        updated_at: "2030-01-01T00:00:00.000Z".into(),
    }
}

fn gen_job(
    tenant: &str,
    job_id: &str,
    rows: u64,
    created_at: &str,
) -> sightline_pipeline::ports::GenerationJob {
    sightline_pipeline::ports::GenerationJob {
        job_id: job_id.into(),
        tenant: tenant.into(),
        template: "t".into(),
        rows,
        webhook_url: Some("https://hooks.example.com/x".into()),
        webhook_rows: false,
        regenerate: true,
        status: sightline_core::genjob::JobStatus::Running,
        source: "contract".into(),
        created_at: created_at.into(),
        finished_at: None,
    }
}

fn delivery(
    tenant: &str,
    id: &str,
    job_id: &str,
    next_at_ms: u64,
) -> sightline_pipeline::ports::WebhookDelivery {
    sightline_pipeline::ports::WebhookDelivery {
        delivery_id: id.into(),
        tenant: tenant.into(),
        job_id: job_id.into(),
        url: "https://hooks.example.com/x".into(),
        event: "generation.job.finished".into(),
        body: "{}".into(),
        status: sightline_pipeline::ports::DeliveryStatus::Pending,
        attempts: 0,
        next_at_ms,
        first_at_ms: next_at_ms,
        last_status: None,
        last_error: None,
        created_at: "2030-01-01T00:00:00.000Z".into(),
        updated_at: "2030-01-01T00:00:00.000Z".into(),
    }
}

/// Jobs and rows: stored together, listed newest first per tenant, rows in order; a row moves
/// only from the state the mover read; a job finishes once, with its delivery in the same
/// write; generated images are claimed by one worker and kept first-wins; deliveries come due
/// by time, move one attempt at a time, and list by status.
pub async fn generation_store_contract(store: Arc<dyn sightline_pipeline::ports::GenerationStore>) {
    use sightline_core::genjob::{JobStatus, RowStatus};
    use sightline_pipeline::ports::{DeliveryStatus, GenClaim, GeneratedObject};
    let tenant = unique("gt");
    let other = unique("go");
    let rows: Vec<_> = (1..=30).map(|r| gen_row(&tenant, "job-a", r)).collect();
    store
        .create_job(
            &gen_job(&tenant, "job-a", 30, "2030-01-01T00:00:00.000Z"),
            &rows,
        )
        .await
        .unwrap();
    store
        .create_job(
            &gen_job(&tenant, "job-b", 1, "2030-01-02T00:00:00.000Z"),
            &[gen_row(&tenant, "job-b", 1)],
        )
        .await
        .unwrap();
    let listed = store.list_jobs(&tenant, 10).await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(ids, ["job-b", "job-a"], "newest first");
    assert!(store.list_jobs(&other, 10).await.unwrap().is_empty());
    assert!(store.get_job(&other, "job-a").await.unwrap().is_none());
    let got = store.rows(&tenant, "job-a").await.unwrap();
    assert_eq!(got.len(), 30);
    assert!(got.windows(2).all(|w| w[0].row < w[1].row), "rows in order");
    assert_eq!(got[4], rows[4]);

    // A row moves only from what the mover read.
    let mut next = rows[0].clone();
    next.status = RowStatus::Checking;
    next.image_id = Some("img-1".into());
    assert!(store
        .update_row(&next, (RowStatus::Queued, 1))
        .await
        .unwrap());
    assert!(
        !store
            .update_row(&next, (RowStatus::Queued, 1))
            .await
            .unwrap(),
        "stale mover loses"
    );
    let stored = store.get_row(&tenant, "job-a", 1).await.unwrap().unwrap();
    assert_eq!(stored.status, RowStatus::Checking);
    assert_eq!(stored.image_id.as_deref(), Some("img-1"));
    let mut regen = stored.clone();
    regen.status = RowStatus::Queued;
    regen.attempt = 2;
    assert!(
        !store
            .update_row(&regen, (RowStatus::Checking, 2))
            .await
            .unwrap(),
        "attempt must match"
    );
    assert!(store
        .update_row(&regen, (RowStatus::Checking, 1))
        .await
        .unwrap());

    // Running jobs are swept; finishing is once, with its delivery.
    let running = store.running_jobs(1000).await.unwrap();
    assert!(running
        .iter()
        .any(|j| j.tenant == tenant && j.job_id == "job-a"));
    let d = delivery(&tenant, "msg_a", "job-a", 1_000);
    assert!(store
        .finish_job(&tenant, "job-a", "2030-01-03T00:00:00.000Z", Some(&d))
        .await
        .unwrap());
    assert!(!store
        .finish_job(
            &tenant,
            "job-a",
            "2030-01-03T00:00:01.000Z",
            Some(&delivery(&tenant, "msg_b", "job-a", 1_000))
        )
        .await
        .unwrap());
    let job = store.get_job(&tenant, "job-a").await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Finished);
    assert_eq!(job.finished_at.as_deref(), Some("2030-01-03T00:00:00.000Z"));
    assert!(store
        .get_delivery(&tenant, "msg_b")
        .await
        .unwrap()
        .is_none());
    // The running list is an index: give it a moment.
    let mut gone = false;
    for _ in 0..20 {
        let running = store.running_jobs(1000).await.unwrap();
        if !running
            .iter()
            .any(|j| j.tenant == tenant && j.job_id == "job-a")
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "a finished job leaves the running list");

    // Generated images: one claim holder, then first record wins for everyone.
    let key = "k".repeat(64);
    let lease = Duration::from_secs(60);
    assert_eq!(
        store
            .claim_generation(&tenant, &key, "w1", lease, 1_000)
            .await
            .unwrap(),
        GenClaim::Acquired
    );
    assert!(matches!(
        store
            .claim_generation(&tenant, &key, "w2", lease, 2_000)
            .await
            .unwrap(),
        GenClaim::Busy { .. }
    ));
    // Another tenant's same key is its own.
    assert_eq!(
        store
            .claim_generation(&other, &key, "w2", lease, 2_000)
            .await
            .unwrap(),
        GenClaim::Acquired
    );
    // A released claim is free at once; an expired one is free to take over.
    store.release_generation(&tenant, &key, "w1").await.unwrap();
    assert_eq!(
        store
            .claim_generation(&tenant, &key, "w2", lease, 3_000)
            .await
            .unwrap(),
        GenClaim::Acquired
    );
    assert_eq!(
        store
            .claim_generation(&tenant, &key, "w3", lease, 3_000 + 61_000)
            .await
            .unwrap(),
        GenClaim::Acquired
    );
    let object = GeneratedObject {
        tenant: tenant.clone(),
        key: key.clone(),
        blob_key: "gen-cache/x.png".into(),
        content_type: "image/png".into(),
        width: 256,
        height: 256,
        provider: "local".into(),
        model: "local-canvas".into(),
        usage: None,
        cost_usd: 0.04,
        created_at: "2030-01-01T00:00:00.000Z".into(),
    };
    store.put_generated(&object).await.unwrap();
    let second = GeneratedObject {
        blob_key: "gen-cache/other.png".into(),
        ..object.clone()
    };
    store.put_generated(&second).await.unwrap();
    match store
        .claim_generation(&tenant, &key, "w4", lease, 4_000)
        .await
        .unwrap()
    {
        GenClaim::Done(o) => assert_eq!(*o, object, "the first record stays"),
        other => panic!("{other:?}"),
    }
    // Releasing after completion changes nothing.
    store.release_generation(&tenant, &key, "w3").await.unwrap();
    assert!(matches!(
        store
            .claim_generation(&tenant, &key, "w5", lease, 5_000)
            .await
            .unwrap(),
        GenClaim::Done(_)
    ));
    // A record whose image is gone is forgotten, and only that record: forgetting another
    // record of the key (or the same one twice) keeps what is stored.
    store.forget_generated(&second).await.unwrap();
    assert!(matches!(
        store
            .claim_generation(&tenant, &key, "w6", lease, 6_000)
            .await
            .unwrap(),
        GenClaim::Done(_)
    ));
    store.forget_generated(&object).await.unwrap();
    store.forget_generated(&object).await.unwrap();
    assert_eq!(
        store
            .claim_generation(&tenant, &key, "w7", lease, 7_000)
            .await
            .unwrap(),
        GenClaim::Acquired,
        "a forgotten key is generated again"
    );
    let again = GeneratedObject {
        cost_usd: 0.1 + 0.2,
        usage: Some(Usage {
            input_tokens: 12,
            output_tokens: 4_160,
            ..Usage::default()
        }),
        created_at: "2030-02-01T00:00:00.000Z".into(),
        ..object.clone()
    };
    store.put_generated(&again).await.unwrap();
    store.forget_generated(&object).await.unwrap();
    let found = match store
        .claim_generation(&tenant, &key, "w8", lease, 8_000)
        .await
        .unwrap()
    {
        GenClaim::Done(o) => *o,
        other => panic!("the newer record was forgotten by an older one: {other:?}"),
    };
    assert_eq!(found, again);
    // The record read back is the one forgotten (no drift in how it is written and compared).
    store.forget_generated(&found).await.unwrap();
    assert_eq!(
        store
            .claim_generation(&tenant, &key, "w9", lease, 9_000)
            .await
            .unwrap(),
        GenClaim::Acquired
    );

    // Deliveries: due by time, one attempt at a time, listed by status.
    store
        .put_delivery(&delivery(&tenant, "msg_c", "job-b", 5_000))
        .await
        .unwrap();
    let mut due_ids = Vec::new();
    for _ in 0..20 {
        due_ids = store
            .due_deliveries(2_000, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|d| d.tenant == tenant)
            .map(|d| d.delivery_id)
            .collect::<Vec<_>>();
        if !due_ids.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(due_ids, ["msg_a"], "msg_c is due at 5 000 only");
    let d = store.get_delivery(&tenant, "msg_a").await.unwrap().unwrap();
    let mut attempt = d.clone();
    attempt.attempts = 1;
    attempt.status = DeliveryStatus::Dead;
    attempt.last_status = Some(500);
    assert!(store.update_delivery(&attempt, 0).await.unwrap());
    assert!(
        !store.update_delivery(&attempt, 0).await.unwrap(),
        "one sender per attempt"
    );
    let dead = store
        .list_deliveries(&tenant, Some(DeliveryStatus::Dead), 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_status, Some(500));
    assert_eq!(
        store
            .list_deliveries(&tenant, None, 10)
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(store
        .list_deliveries(&other, None, 10)
        .await
        .unwrap()
        .is_empty());
    for _ in 0..20 {
        let due = store.due_deliveries(10_000, 1000).await.unwrap();
        let mine: Vec<_> = due.iter().filter(|d| d.tenant == tenant).collect();
        if mine.len() == 1 {
            assert_eq!(mine[0].delivery_id, "msg_c", "a dead letter is never due");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("msg_c never came due");
}

/// A shared rate limit: `a` and `b` are two handles on one store (two processes on one data
/// dir, two Lambda instances on one table). Every op sees the others' writes, concurrent takes
/// each get a slot of their own, a denied take changes nothing, a block holds everyone, and
/// what a caller learnt moves the next slot.
pub async fn rate_limit_contract(a: Arc<dyn RateLimitStore>, b: Arc<dyn RateLimitStore>) {
    struct At(u64);
    impl Clock for At {
        fn now_ms(&self) -> u64 {
            self.0
        }
    }
    let ms = Duration::from_millis;
    let now: u64 = 1_900_000_000_000;
    let clock: Arc<dyn Clock> = Arc::new(At(now));
    // 600 RPM: one every 100 ms; a 500 ms burst holds 5.
    let limits = Limits::new(600, 0, ms(500));
    let take = |max_wait: u64| LimitOp::Take {
        tokens: 0,
        max_wait: ms(max_wait),
        learnt: Learnt::default(),
    };
    let granted = |at_ms: u64| LimitOutcome::Granted(Grant { at_ms, tokens: 0 });
    let key = unique("openai:limit-");

    // A key never used is a full limit: its burst goes now, through either handle.
    for i in 0..5 {
        let s = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            s.apply_limit(&key, &limits, &take(0), clock.clone())
                .await
                .unwrap(),
            granted(now)
        );
    }
    // Then one every 100 ms. Denied when the slot is further than the caller waits, and the
    // denial takes nothing: the next caller gets that same slot.
    assert_eq!(
        b.apply_limit(&key, &limits, &take(50), clock.clone())
            .await
            .unwrap(),
        LimitOutcome::Denied(Denied::Wait(ms(100)))
    );
    assert_eq!(
        b.apply_limit(&key, &limits, &take(100), clock.clone())
            .await
            .unwrap(),
        granted(now + 100)
    );
    assert_eq!(
        a.apply_limit(&key, &limits, &take(1_000), clock.clone())
            .await
            .unwrap(),
        granted(now + 200)
    );

    // Twenty takes at once from both handles: twenty distinct slots, 100 ms apart.
    let outcomes = futures_util::future::join_all((0..20).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (key, clock) = (key.clone(), clock.clone());
        async move { s.apply_limit(&key, &limits, &take(60_000), clock).await }
    }))
    .await;
    let mut slots: Vec<u64> = outcomes
        .into_iter()
        .map(|o| match o.expect("a concurrent take") {
            LimitOutcome::Granted(g) => g.at_ms,
            other => panic!("{other:?}"),
        })
        .collect();
    slots.sort_unstable();
    let want: Vec<u64> = (3..23).map(|k| now + k * 100).collect();
    assert_eq!(slots, want);

    // A 429's block holds every holder of the limit until then.
    assert_eq!(
        a.apply_limit(
            &key,
            &limits,
            &LimitOp::Block {
                until_ms: now + 10_000
            },
            clock.clone()
        )
        .await
        .unwrap(),
        LimitOutcome::Blocked
    );
    assert_eq!(
        b.apply_limit(&key, &limits, &take(60_000), clock.clone())
            .await
            .unwrap(),
        granted(now + 10_000)
    );

    // Tokens: 60,000 TPM, a token a millisecond. Debt learnt by a caller moves the next slot.
    let tokens = Limits::new(0, 60_000, ms(500));
    let token_key = unique("openai:limit-tokens-");
    let take_tokens = |n: u64, delta: i64| LimitOp::Take {
        tokens: n,
        max_wait: ms(60_000),
        learnt: Learnt {
            tokens_delta: delta,
            view: None,
        },
    };
    let at = |o: LimitOutcome| match o {
        LimitOutcome::Granted(g) => g.at_ms,
        other => panic!("{other:?}"),
    };
    let first = a
        .apply_limit(&token_key, &tokens, &take_tokens(500, 0), clock.clone())
        .await
        .unwrap();
    assert_eq!(at(first), now);
    let second = b
        .apply_limit(&token_key, &tokens, &take_tokens(500, 300), clock.clone())
        .await
        .unwrap();
    assert_eq!(at(second), now + 800);

    // Keys are apart: another model's limit is untouched.
    assert_eq!(
        a.apply_limit(&unique("openai:other-"), &limits, &take(0), clock.clone())
            .await
            .unwrap(),
        granted(now)
    );
}

/// A tenant's own webhook secret in the contract's set-up.
pub const OWN_WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The deployment's default webhook secret in the contract's set-up.
pub const DEFAULT_WEBHOOK_SECRET: &str = "whsec_ZGVmYXVsdCBzZWNyZXQgb2YgdGhlIGRlcGxveW1lbnQ=";

/// Webhook secrets, on two adapters set up alike: tenant `acme` has
/// [`OWN_WEBHOOK_SECRET`]; `with_default` falls back to [`DEFAULT_WEBHOOK_SECRET`] for every
/// other tenant, `without_default` has nothing else. A tenant's own secret wins, the default
/// covers the rest (a tenant whose name could not name a secret too), and without one a tenant
/// has none; asking again gives the same answer.
pub async fn webhook_secrets_contract(
    with_default: Arc<dyn sightline_pipeline::ports::WebhookSecrets>,
    without_default: Arc<dyn sightline_pipeline::ports::WebhookSecrets>,
) {
    for secrets in [&with_default, &without_default] {
        for _ in 0..2 {
            assert_eq!(
                secrets.secret_for("acme").await.unwrap().as_deref(),
                Some(OWN_WEBHOOK_SECRET)
            );
        }
    }
    for tenant in ["globex", "a/b", ""] {
        assert_eq!(
            with_default.secret_for(tenant).await.unwrap().as_deref(),
            Some(DEFAULT_WEBHOOK_SECRET),
            "{tenant:?}"
        );
        assert_eq!(
            without_default.secret_for(tenant).await.unwrap(),
            None,
            "{tenant:?}"
        );
    }
}
