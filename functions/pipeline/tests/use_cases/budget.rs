//! Spending caps in the analyze use-case: holds before paid calls, waits and failures over
//! budget, on the local adapters with a paid provider that takes its time.

use std::sync::Arc;
use std::time::Duration;

use sightline_core::budget::{BudgetCaps, Periods};
use sightline_core::model::{AnalysisJob, Detail, ImageRecord, ImageStatus};
use sightline_core::pricing::{PriceTable, Usage};
use sightline_pipeline::analyze::{AnalyzeOutcome, Analyzer, BUDGET_EXCEEDED};
use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteRepository};
use sightline_pipeline::ports::{BlobStore, Clock, Repository};
use sightline_pipeline::settings::OverBudget;
use sightline_pipeline::Settings;

use crate::analyze::{record_of, sha, Scripted};

/// 2026-11-30T20:00:00Z: the day rolls over in four hours.
const NOW_MS: u64 = 1_796_068_800_000;
const MIDNIGHT_MS: u64 = 1_796_083_200_000;

struct Fixed;
impl Clock for Fixed {
    fn now_ms(&self) -> u64 {
        NOW_MS
    }
}

struct Fixture {
    analyzer: Analyzer,
    repo: Arc<dyn Repository>,
    /// Every call answers after 30 ms with 1000 tokens in and 100 out.
    provider: Arc<Scripted>,
    _dir: tempfile::TempDir,
}

/// `images` distinct images of tenant `t` (no two share bytes: no cache hits).
async fn fixture(images: usize, settings: Settings) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(dir.path()));
    let repo: Arc<dyn Repository> = Arc::new(SqliteRepository::new(SqliteDb::in_memory().unwrap()));
    let provider = Scripted::new(Vec::new());
    *provider.latency.lock().unwrap() = Duration::from_millis(30);
    let settings = Settings {
        model: "gpt-4o".into(),
        max_receives: 5,
        ..settings
    };
    let analyzer = Analyzer::new(
        blobs.clone(),
        repo.clone(),
        provider.clone(),
        Arc::new(settings),
        Arc::new(Fixed),
    );
    for i in 0..images {
        let id = format!("i{i}");
        let bytes = jpeg(i);
        blobs
            .put(&format!("resized/t/{id}.jpg"), bytes.clone(), "image/jpeg")
            .await
            .unwrap();
        let record = ImageRecord {
            sha256: Some(sha(&bytes)),
            ..record_of("t", &id)
        };
        repo.put_image(&record, None).await.unwrap();
    }
    Fixture {
        analyzer,
        repo,
        provider,
        _dir: dir,
    }
}

fn jpeg(i: usize) -> Vec<u8> {
    vec![0xFF, 0xD8, (i % 256) as u8, (i / 256) as u8]
}

fn job(i: usize) -> String {
    serde_json::to_string(&AnalysisJob {
        v: 1,
        image_id: format!("i{i}"),
        tenant: "t".into(),
        resized_key: format!("resized/t/i{i}.jpg"),
        sha256: sha(&jpeg(i)),
        width: 1024,
        height: 1024,
        detail: None,
        lane: None,
        check: None,
    })
    .unwrap()
}

/// What one call of the fixture's model is estimated to cost (the amount each hold takes).
fn one_estimate(settings: &Settings) -> f64 {
    PriceTable::builtin()
        .estimate(
            "gpt-4o",
            1024,
            1024,
            &settings.estimate_params(Detail::High),
        )
        .unwrap()
        .cost_usd
}

fn capped(daily_usd: f64) -> Settings {
    Settings {
        budget: BudgetCaps::from_amounts(daily_usd, 0.0),
        ..Settings::default()
    }
}

async fn spent_today(repo: &dyn Repository) -> (f64, f64) {
    let c = repo
        .budget_counts("t", &Periods::at(NOW_MS), NOW_MS)
        .await
        .unwrap();
    (c.day.spent_usd, c.day.reserved_usd)
}

#[tokio::test]
async fn twenty_workers_racing_a_daily_cap_overshoot_it_by_at_most_one_estimate_and_the_rest_wait()
{
    let f = fixture(20, capped(0.05)).await;
    let estimate = one_estimate(&Settings::default());
    let mut tasks = Vec::new();
    for i in 0..20 {
        let analyzer = f.analyzer.clone();
        tasks.push(tokio::spawn(
            async move { analyzer.handle(&job(i), 1).await },
        ));
    }
    let mut done = 0;
    let mut waiting = 0;
    for t in tasks {
        match t.await.unwrap() {
            AnalyzeOutcome::Done { .. } => done += 1,
            o @ AnalyzeOutcome::Retry { delay, .. } => {
                assert!(o.is_budget_wait(), "{o:?}");
                assert_eq!(delay, Duration::from_millis(MIDNIGHT_MS - NOW_MS));
                waiting += 1;
            }
            other => panic!("neither done nor waiting: {other:?}"),
        }
    }
    let (spent, reserved) = spent_today(&*f.repo).await;
    assert!(spent <= 0.05 + estimate + 1e-12, "spent {spent}");
    // A refusal means holds and spending reached the cap; each call cost at most its hold.
    assert!(
        done as f64 * estimate >= 0.05,
        "{done} calls of {estimate} held"
    );
    assert_eq!(reserved, 0.0, "every hold was settled");
    assert_eq!(done, f.provider.calls().len());
    assert_eq!(done + waiting, 20);
    assert!(waiting > 0);
    for i in 0..20 {
        let rec = f
            .repo
            .get_image("t", &format!("i{i}"))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(
            rec.status,
            ImageStatus::Failed,
            "a waiting image is not failed"
        );
    }
}

#[tokio::test]
async fn a_budget_wait_on_the_last_delivery_leaves_the_image_queued() {
    let f = fixture(1, capped(0.000_001)).await;
    f.repo
        .book_spend(
            "t",
            "other",
            "spent-before",
            &sightline_pipeline::ports::Spend {
                day: "2026-11-30".into(),
                model: "gpt-4o".into(),
                calls: 1,
                usage: Usage::default(),
                cost_usd: 0.01,
                calls_at_estimate: 0,
                cost_at_estimate_usd: 0.0,
                lane: Default::default(),
                saved_usd: 0.0,
                kind: Default::default(),
            },
        )
        .await
        .unwrap();
    let outcome = f.analyzer.handle(&job(0), 5).await;
    assert!(outcome.is_budget_wait(), "{outcome:?}");
    let rec = f.repo.get_image("t", "i0").await.unwrap().unwrap();
    assert_eq!(rec.status, ImageStatus::Queued);
    assert_eq!(f.provider.calls().len(), 0);
}

#[tokio::test]
async fn over_budget_with_fail_fails_the_image_for_good_without_a_call() {
    let f = fixture(
        2,
        Settings {
            over_budget: OverBudget::Fail,
            ..capped(0.001)
        },
    )
    .await;
    // The first call is admitted (nothing spent yet) and spends over the cap.
    assert!(matches!(
        f.analyzer.handle(&job(0), 1).await,
        AnalyzeOutcome::Done { .. }
    ));
    assert_eq!(
        f.analyzer.handle(&job(1), 1).await,
        AnalyzeOutcome::Failed(BUDGET_EXCEEDED.into())
    );
    let rec = f.repo.get_image("t", "i1").await.unwrap().unwrap();
    assert_eq!(rec.status, ImageStatus::Failed);
    assert!(rec.permanent_failure);
    assert_eq!(f.provider.calls().len(), 1);
}

#[tokio::test]
async fn a_tenants_own_budget_overrides_the_settings() {
    let f = fixture(2, capped(0.001)).await;
    f.repo
        .set_tenant_budget(
            "t",
            Some(&BudgetCaps {
                daily_usd: None,
                monthly_usd: Some(100.0),
            }),
        )
        .await
        .unwrap();
    for i in 0..2 {
        let o = f.analyzer.handle(&job(i), 1).await;
        assert!(matches!(o, AnalyzeOutcome::Done { .. }), "{o:?}");
    }
}
