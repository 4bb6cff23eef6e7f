//! Generation jobs over the local adapters: rows generated (a scripted paid generator with
//! faults, and the offline one), checked by the offline analyzer, regenerated once, paid
//! once, and the finished job's webhook delivered signed to a receiver on loopback that
//! fails, recovers, or answers 410.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::{HeaderMap, StatusCode};
use sightline_core::generate::{plan_job, Limits, RowsInput, TemplateSet};
use sightline_core::genjob::{JobStatus, RowStatus};
use sightline_core::retry::FailureKind;
use sightline_core::webhook::{ReceivedHeaders, WebhookSecret, DEFAULT_TOLERANCE};
use sightline_pipeline::analyze::Analyzer;
use sightline_pipeline::delivery::{Deliveries, HttpPoster};
use sightline_pipeline::generation::{GenerateOutcome, Generations, Generators, Submission};
use sightline_pipeline::ingest::Ingest;
use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
use sightline_pipeline::ports::{
    BlobStore, Clock, DeliveryStatus, GeneratedImage, GenerationCall, GenerationStore,
    ImageGenerator, LedgerKind, ProviderError, Queue, RateInfo, Repository, SystemClock,
};
use sightline_pipeline::providers::gen_local::LocalGenerator;
use sightline_pipeline::providers::local::LocalAnalyzer;
use sightline_pipeline::webhook_url::{Mode, SystemResolver};
use sightline_pipeline::Settings;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PAID: &str = "gpt-image-1-mini";

/// A generator around the offline one: scripted errors first, a refusal for prompts that
/// say "forbidden", and a wrong picture for prompts that say "[wrong]" (always) or
/// "[wrong-once]" (first call of that prompt only). Paid when it plays a paid model.
struct Scripted {
    paid: bool,
    errors: Mutex<VecDeque<FailureKind>>,
    calls: AtomicUsize,
    wrong_once_seen: Mutex<Vec<String>>,
}

impl Scripted {
    fn new(paid: bool, errors: Vec<FailureKind>) -> Arc<Scripted> {
        Arc::new(Scripted {
            paid,
            errors: Mutex::new(errors.into()),
            calls: AtomicUsize::new(0),
            wrong_once_seen: Mutex::new(Vec::new()),
        })
    }
}

fn error(kind: FailureKind, billed: bool) -> ProviderError {
    ProviderError {
        message: format!("{kind:?}"),
        kind,
        rate: RateInfo::default(),
        usage: None,
        billed,
    }
}

#[async_trait]
impl ImageGenerator for Scripted {
    fn name(&self) -> &str {
        if self.paid {
            "openai"
        } else {
            "local"
        }
    }
    fn is_paid(&self) -> bool {
        self.paid
    }
    async fn generate(&self, req: &GenerationCall) -> Result<GeneratedImage, ProviderError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(kind) = self.errors.lock().unwrap().pop_front() {
            return Err(error(kind, false));
        }
        if req.prompt.contains("forbidden") {
            let refused = FailureKind::Http {
                status: 400,
                retry_after: None,
            };
            return Err(error(refused, false));
        }
        let mut call = req.clone();
        let wrong = req.prompt.contains("[wrong]")
            || (req.prompt.contains("[wrong-once]") && {
                let mut seen = self.wrong_once_seen.lock().unwrap();
                let first = !seen.contains(&req.prompt);
                seen.push(req.prompt.clone());
                first
            });
        if wrong {
            call.prompt = format!("something else entirely: {}", req.prompt);
        }
        call.model = sightline_pipeline::providers::gen_local::LOCAL_IMAGE_MODEL.into();
        let mut image = LocalGenerator.generate(&call).await?;
        image.model = req.model.clone();
        Ok(image)
    }
}

struct Fixture {
    settings: Arc<Settings>,
    blobs: Arc<dyn BlobStore>,
    repo: Arc<SqliteRepository>,
    ingest: Ingest,
    generations: Generations,
    analyzer: Analyzer,
    analyze_queue: Arc<dyn Queue>,
    generate_queue: Arc<dyn Queue>,
    deliveries: Deliveries,
    paid: Arc<Scripted>,
    _dir: tempfile::TempDir,
}

fn fixture(paid_errors: Vec<FailureKind>) -> Fixture {
    fixture_with(paid_errors, |_| {})
}

fn fixture_with(paid_errors: Vec<FailureKind>, tweak: impl FnOnce(&mut Settings)) -> Fixture {
    fixture_on(paid_errors, tweak, |files| files, true)
}

/// `blobs` may wrap the file store. `inline_ingest`: the generation ingests its uploads itself
/// (locally), or leaves that to the upload's trigger (on AWS).
fn fixture_on(
    paid_errors: Vec<FailureKind>,
    tweak: impl FnOnce(&mut Settings),
    blobs: impl FnOnce(Arc<dyn BlobStore>) -> Arc<dyn BlobStore>,
    inline_ingest: bool,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::open(&dir.path().join("db.sqlite")).unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let blobs = blobs(Arc::new(FileBlobStore::new(dir.path().join("blobs"))));
    let repo = Arc::new(SqliteRepository::with_job_queue(db.clone(), "analyze"));
    let analyze_queue: Arc<dyn Queue> =
        Arc::new(SqliteQueue::new(db.clone(), "analyze", 5, clock.clone()));
    let generate_queue: Arc<dyn Queue> =
        Arc::new(SqliteQueue::new(db.clone(), "generate", 5, clock.clone()));
    let mut settings = Settings {
        webhook_secret: Some(SECRET.into()),
        // 5 s, 5 min, 30 min … become 0.5 ms, 30 ms, 180 ms.
        webhook_retry_scale: 0.0001,
        max_receives: 5,
        ..Settings::default()
    };
    tweak(&mut settings);
    let settings = Arc::new(settings);
    let ingest = Ingest::new(
        blobs.clone(),
        repo.clone(),
        analyze_queue.clone(),
        settings.clone(),
        clock.clone(),
        sightline_core::keys::UPLOAD_PREFIX,
    );
    let paid = Scripted::new(true, paid_errors);
    let local = Scripted::new(false, Vec::new());
    let generators = {
        let (paid, local) = (paid.clone(), local.clone());
        Generators::new(Box::new(move |model: &str| {
            Ok(if model == PAID {
                paid.clone() as Arc<dyn ImageGenerator>
            } else {
                local.clone() as Arc<dyn ImageGenerator>
            })
        }))
    };
    let resolver = Arc::new(SystemResolver::default());
    let generations = Generations::new(
        repo.clone(),
        repo.clone(),
        blobs.clone(),
        generate_queue.clone(),
        Arc::new(generators),
        settings.clone(),
        clock.clone(),
        Mode::Local,
        resolver.clone(),
    );
    let generations = if inline_ingest {
        generations.with_ingest(ingest.clone())
    } else {
        generations
    };
    let analyzer = Analyzer::new(
        blobs.clone(),
        repo.clone(),
        Arc::new(LocalAnalyzer),
        settings.clone(),
        clock.clone(),
    )
    .with_generations(Arc::new(generations.clone()));
    let deliveries = Deliveries {
        store: repo.clone(),
        poster: Arc::new(HttpPoster::new(Mode::Local, resolver)),
        secrets: settings.clone(),
        settings: settings.clone(),
        clock,
    };
    Fixture {
        settings,
        blobs,
        repo,
        ingest,
        generations,
        analyzer,
        analyze_queue,
        generate_queue,
        deliveries,
        paid,
        _dir: dir,
    }
}

/// Run both queues until neither has visible work, then a sweep; until the job finishes.
async fn run_job(f: &Fixture, tenant: &str, job_id: &str) {
    for _ in 0..400 {
        let mut moved = false;
        for m in f
            .generate_queue
            .receive(10, Duration::from_secs(30))
            .await
            .unwrap()
        {
            moved = true;
            let out = f.generations.handle(&m.body, m.receive_count).await;
            match out {
                sightline_pipeline::generation::GenerateOutcome::Retry { .. } => f
                    .generate_queue
                    .retry_after(&m.receipt, Duration::from_millis(10))
                    .await
                    .unwrap(),
                _ => f.generate_queue.delete(&m.receipt).await.unwrap(),
            }
        }
        for m in f
            .analyze_queue
            .receive(10, Duration::from_secs(30))
            .await
            .unwrap()
        {
            moved = true;
            let out = f.analyzer.handle(&m.body, m.receive_count).await;
            if out.is_retry() {
                f.analyze_queue
                    .retry_after(&m.receipt, Duration::from_millis(10))
                    .await
                    .unwrap();
            } else {
                f.analyze_queue.delete(&m.receipt).await.unwrap();
            }
        }
        let job = f.repo.get_job(tenant, job_id).await.unwrap().unwrap();
        if job.status == JobStatus::Finished {
            return;
        }
        if !moved {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!("job {job_id} did not finish");
}

/// Run a job to its end, then its report.
async fn run_to_report(
    f: &Fixture,
    tenant: &str,
    job_id: &str,
) -> sightline_pipeline::generation::JobReport {
    run_job(f, tenant, job_id).await;
    f.generations
        .job_report(tenant, job_id)
        .await
        .unwrap()
        .unwrap()
}

fn templates() -> TemplateSet {
    TemplateSet::from_toml(
        r#"
[templates.hero]
prompt = "A studio photo of {product}"
model = "gpt-image-1-mini"
size = "1024x1024"
quality = "low"
output_key = "products/{sku}.png"
"#,
    )
    .unwrap()
}

/// The requests of `csv`'s rows with the paid `hero` template.
fn plan(csv: &str) -> Vec<sightline_core::generate::GenerationRequest> {
    plan_job(
        &templates(),
        Some("hero"),
        RowsInput::Csv(csv.as_bytes()),
        &Limits::default(),
    )
    .unwrap()
}

async fn submit(f: &Fixture, tenant: &str, csv: &str, webhook: Option<String>) -> String {
    let requests = plan(csv);
    f.generations
        .submit(Submission {
            tenant: tenant.into(),
            template: "hero".into(),
            requests,
            webhook_url: webhook,
            webhook_rows: false,
            regenerate: None,
            source: "test".into(),
            job_id: None,
        })
        .await
        .unwrap()
        .job_id
}

fn generation_ledger(rows: &[sightline_pipeline::ports::CostRow]) -> (u64, f64) {
    rows.iter()
        .filter(|r| r.kind == LedgerKind::Generation)
        .fold((0, 0.0), |(c, usd), r| (c + r.calls, usd + r.cost_usd))
}

fn today() -> String {
    sightline_pipeline::ports::rfc3339(SystemClock.now_ms())[..10].to_string()
}

#[tokio::test]
async fn a_job_generates_checks_and_books_every_row_once_and_a_rerun_pays_nothing() {
    let throttled = FailureKind::Http {
        status: 429,
        retry_after: Some(Duration::from_millis(10)),
    };
    let f = fixture(vec![throttled, FailureKind::Timeout]);
    let csv = "sku,product\nA1,red lamp\nB2,blue chair\nC3,forbidden thing\nD4,green vase\n";
    let job_id = submit(&f, "acme", csv, None).await;
    run_job(&f, "acme", &job_id).await;

    let report = f
        .generations
        .job_report("acme", &job_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.counts.total, 4);
    assert_eq!(report.counts.done, 3, "{:?}", report.rows);
    assert_eq!(report.counts.failed, 1);
    let refused = report.rows.iter().find(|r| r.row == 3).unwrap();
    assert_eq!(refused.status, RowStatus::Failed);
    assert!(
        refused.error.as_deref().unwrap().contains("400"),
        "{refused:?}"
    );
    let done = report.rows.iter().find(|r| r.row == 1).unwrap();
    assert_eq!(
        done.output_key.as_deref(),
        Some(format!("generated/acme/{job_id}/products/A1.png").as_str())
    );
    // The offline analyzer cannot judge the paid model's pictures: delivered unchecked.
    assert_eq!(done.check.as_ref().unwrap().matches, None);

    // Three images paid, once each, at the price table's per-image price; the ledger agrees.
    let per_image = sightline_core::PriceTable::builtin()
        .image_model(PAID)
        .unwrap()
        .cost_usd(
            sightline_core::generate::Size::Pixels {
                width: 1024,
                height: 1024,
            },
            sightline_core::generate::Quality::Low,
            None,
        )
        .unwrap();
    assert!(per_image > 0.0);
    assert!((report.generation_cost_usd - 3.0 * per_image).abs() < 1e-9);
    let day = today();
    let costs = f.repo.costs("acme", &day, &day).await.unwrap();
    let (calls, usd) = generation_ledger(&costs);
    assert_eq!(calls, 3);
    assert!((usd - report.generation_cost_usd).abs() < 1e-9);
    let calls_made = f.paid.calls.load(Ordering::SeqCst);

    // The same CSV again: every image found by its key, nothing paid, nothing called.
    let again = submit(&f, "acme", csv, None).await;
    let rerun = run_to_report(&f, "acme", &again).await;
    assert_eq!(rerun.counts.done, 3);
    assert_eq!(rerun.counts.reused, 3);
    assert_eq!(rerun.generation_cost_usd, 0.0);
    // Only the refused row asks the provider again (a refusal is not an image to reuse).
    assert_eq!(f.paid.calls.load(Ordering::SeqCst), calls_made + 1);
    let (calls_after, usd_after) =
        generation_ledger(&f.repo.costs("acme", &day, &day).await.unwrap());
    assert_eq!((calls_after, usd_after), (calls, usd));

    // Another tenant's identical rows are its own to pay for.
    let other = submit(&f, "globex", "sku,product\nA1,red lamp\n", None).await;
    let theirs = run_to_report(&f, "globex", &other).await;
    assert_eq!(theirs.counts.reused, 0);
    assert!((theirs.generation_cost_usd - per_image).abs() < 1e-9);
}

/// A job of more rows than the images-per-minute limit lets through at once: each row waits
/// for its slot in hand (as analyses do) instead of going back to the queue, where every
/// denial spent one of its few deliveries and a large job failed most rows "gave up".
#[tokio::test]
async fn rows_beyond_the_images_per_minute_limit_wait_for_their_slot_instead_of_failing() {
    let f = fixture_with(Vec::new(), |s| {
        // 10 images a second, a burst of 5; two deliveries per row.
        s.generation_ipm = 600;
        s.max_receives = 2;
    });
    let mut csv = String::from("sku,product\n");
    for i in 0..15 {
        csv.push_str(&format!("S{i},lamp number {i}\n"));
    }
    let began = std::time::Instant::now();
    let job_id = submit(&f, "acme", &csv, None).await;
    let report = run_to_report(&f, "acme", &job_id).await;
    assert_eq!(report.counts.done, 15, "{:?}", report.rows);
    assert_eq!(report.counts.failed, 0);
    assert_eq!(f.paid.calls.load(Ordering::SeqCst), 15, "one call per row");
    // The limit held: past the burst, the other ten images came at 10 a second.
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "{:?}",
        began.elapsed()
    );
}

/// Two jobs asking for the same image at once (a rerun started while the first still runs):
/// the row that finds the other's claim waits for it in hand and goes on the moment it is let
/// go, instead of going back to the queue until the claim's lease (minutes) runs out.
#[tokio::test]
async fn a_row_that_finds_its_image_being_made_waits_for_it_in_hand_not_for_the_lease() {
    let f = fixture(Vec::new());
    let job_id = submit(&f, "acme", "sku,product\nA1,red lamp\n", None).await;
    let row = f.repo.get_row("acme", &job_id, 1).await.unwrap().unwrap();
    let key = row.current_request().idempotency_key();
    // Another worker holds the image's claim for the whole lease.
    let lease = f.settings.generation_lease();
    let now = SystemClock.now_ms();
    assert_eq!(
        f.repo
            .claim_generation("acme", &key, "other:worker", lease, now)
            .await
            .unwrap(),
        sightline_pipeline::ports::GenClaim::Acquired
    );
    let msg = f
        .generate_queue
        .receive(1, Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    let let_go = {
        let repo = f.repo.clone();
        let key = key.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            repo.release_generation("acme", &key, "other:worker")
                .await
                .unwrap();
        })
    };
    let began = std::time::Instant::now();
    let out = f.generations.handle(&msg.body, msg.receive_count).await;
    let_go.await.unwrap();
    assert!(matches!(out, GenerateOutcome::Generated { .. }), "{out:?}");
    assert!(began.elapsed() >= Duration::from_millis(500));
    assert!(began.elapsed() < lease, "{:?}", began.elapsed());
    assert_eq!(f.paid.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_rerun_generates_again_an_image_whose_cached_copy_expired_and_reuses_the_rest() {
    let f = fixture(Vec::new());
    let csv = "sku,product\nA1,red lamp\nB2,blue chair\n";
    let first = submit(&f, "acme", csv, None).await;
    run_job(&f, "acme", &first).await;
    let calls_made = f.paid.calls.load(Ordering::SeqCst);
    assert_eq!(calls_made, 2);

    // The bucket's lifecycle rule expires A1's cached image (locally: someone deleted it).
    let key = plan(csv)[0].idempotency_key();
    let lease = Duration::from_secs(60);
    let cached = match f
        .repo
        .claim_generation("acme", &key, "test", lease, SystemClock.now_ms())
        .await
        .unwrap()
    {
        sightline_pipeline::ports::GenClaim::Done(o) => o,
        other => panic!("A1 is not cached: {other:?}"),
    };
    f.blobs.delete(&cached.blob_key).await.unwrap();

    let again = submit(&f, "acme", csv, None).await;
    let rerun = run_to_report(&f, "acme", &again).await;
    assert_eq!(rerun.counts.done, 2, "{:?}", rerun.rows);
    assert_eq!(rerun.counts.reused, 1, "only B2's image is still cached");
    let a1 = rerun.rows.iter().find(|r| r.row == 1).unwrap();
    assert!(!a1.reused && a1.generation_cost_usd > 0.0, "{a1:?}");
    assert_eq!(f.paid.calls.load(Ordering::SeqCst), calls_made + 1);
    // The new image is cached again under the same key, and its output is there.
    assert!(f.blobs.get(&cached.blob_key, u64::MAX).await.is_ok());
    let output = a1.output_key.as_deref().unwrap();
    assert!(f.blobs.get(output, u64::MAX).await.is_ok());
    let (calls, _) = generation_ledger(&f.repo.costs("acme", &today(), &today()).await.unwrap());
    assert_eq!(calls, 3, "two images, then A1 once more");
}

/// A blob store that plays S3 with its upload trigger on AWS at its fastest: writing an
/// upload ingests and analyses it before the write returns, so the analysis ends before the
/// generation has moved its row to `checking`.
struct InstantAnalysis {
    files: Arc<dyn BlobStore>,
    then: std::sync::OnceLock<(Ingest, Analyzer, Arc<dyn Queue>)>,
    analysed: AtomicUsize,
}

#[async_trait]
impl BlobStore for InstantAnalysis {
    async fn put(
        &self,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> sightline_pipeline::ports::StoreResult<()> {
        self.files.put(key, bytes, content_type).await?;
        if let (Some((ingest, analyzer, queue)), true) = (
            self.then.get(),
            key.starts_with(sightline_core::keys::UPLOAD_PREFIX),
        ) {
            ingest.ingest_key(key).await?;
            for m in queue.receive(10, Duration::from_secs(30)).await? {
                assert!(!analyzer.handle(&m.body, m.receive_count).await.is_retry());
                queue.delete(&m.receipt).await?;
                self.analysed.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }
    async fn size(&self, key: &str) -> sightline_pipeline::ports::StoreResult<Option<u64>> {
        self.files.size(key).await
    }
    async fn get(
        &self,
        key: &str,
        max_bytes: u64,
    ) -> sightline_pipeline::ports::StoreResult<Vec<u8>> {
        self.files.get(key, max_bytes).await
    }
    async fn delete(&self, key: &str) -> sightline_pipeline::ports::StoreResult<()> {
        self.files.delete(key).await
    }
    async fn metadata(
        &self,
        key: &str,
    ) -> sightline_pipeline::ports::StoreResult<Option<std::collections::BTreeMap<String, String>>>
    {
        self.files.metadata(key).await
    }
}

#[tokio::test]
async fn an_analysis_that_ends_before_its_row_moves_to_checking_still_settles_the_row() {
    let mut racing = None;
    let f = fixture_on(
        Vec::new(),
        |_| {},
        |files| {
            let store = Arc::new(InstantAnalysis {
                files,
                then: std::sync::OnceLock::new(),
                analysed: AtomicUsize::new(0),
            });
            racing = Some(store.clone());
            store
        },
        false,
    );
    let racing = racing.unwrap();
    let then = (
        f.ingest.clone(),
        f.analyzer.clone(),
        f.analyze_queue.clone(),
    );
    assert!(racing.then.set(then).is_ok());

    // No sweep runs, and every analysis ends inside the upload's write, before its row moves:
    // only the hand-over can settle the rows, regenerations included.
    let job_id = submit_local(&f, "acme", None).await;
    let report = run_to_report(&f, "acme", &job_id).await;
    assert_eq!(
        (report.counts.done, report.counts.mismatch),
        (2, 1),
        "{:?}",
        report.rows
    );
    assert_eq!(report.counts.regenerated, 2);
    assert_eq!(
        racing.analysed.load(Ordering::SeqCst),
        5,
        "one analysis per picture: rows 2 and 3 were drawn twice"
    );
}

fn local_templates_csv() -> &'static str {
    "sku,product\nA1,a lamp\nB2,a chair [wrong-once]\nC3,a vase [wrong]\n"
}

async fn submit_local(f: &Fixture, tenant: &str, webhook: Option<String>) -> String {
    submit_local_with(f, tenant, webhook, false).await
}

async fn submit_local_with(
    f: &Fixture,
    tenant: &str,
    webhook: Option<String>,
    webhook_rows: bool,
) -> String {
    let set = TemplateSet::from_toml(
        r#"
[templates.hero]
prompt = "A photo of {product}"
model = "local-canvas"
size = "512x512"
"#,
    )
    .unwrap();
    let requests = plan_job(
        &set,
        Some("hero"),
        RowsInput::Csv(local_templates_csv().as_bytes()),
        &Limits::default(),
    )
    .unwrap();
    f.generations
        .submit(Submission {
            tenant: tenant.into(),
            template: "hero".into(),
            requests,
            webhook_url: webhook,
            webhook_rows,
            regenerate: None,
            source: "test".into(),
            job_id: None,
        })
        .await
        .unwrap()
        .job_id
}

#[tokio::test]
async fn a_row_whose_check_fails_is_regenerated_once_and_then_reported_as_a_mismatch() {
    let f = fixture(Vec::new());
    let job_id = submit_local(&f, "acme", None).await;
    let report = run_to_report(&f, "acme", &job_id).await;
    let row = |n: u32| report.rows.iter().find(|r| r.row == n).unwrap().clone();
    assert_eq!(row(1).status, RowStatus::Done);
    assert_eq!(row(1).check.as_ref().unwrap().matches, Some(true));
    assert!(row(1).first_check.is_none());
    // Wrong once: regenerated with a new seed, and the second picture passes.
    assert_eq!(row(2).status, RowStatus::Done, "{:?}", row(2));
    assert_eq!(row(2).attempt, 2);
    assert_eq!(row(2).first_check.as_ref().unwrap().matches, Some(false));
    // Always wrong: regenerated once, then a mismatch with the check's issues.
    assert_eq!(row(3).status, RowStatus::Mismatch);
    assert_eq!(row(3).attempt, 2);
    assert!(!row(3).check.as_ref().unwrap().issues.is_empty());
    assert_eq!(
        (
            report.counts.done,
            report.counts.mismatch,
            report.counts.regenerated
        ),
        (2, 1, 2)
    );
}

/// One received request: its headers and raw body.
type Received = (HeaderMap, Vec<u8>);

/// A webhook receiver on loopback: answers `script` in order (then 200), records what came.
#[derive(Clone, Default)]
struct Receiver {
    script: Arc<Mutex<VecDeque<u16>>>,
    got: Arc<Mutex<Vec<Received>>>,
}

async fn receiver(script: Vec<u16>) -> (Receiver, String) {
    let r = Receiver {
        script: Arc::new(Mutex::new(script.into())),
        ..Default::default()
    };
    let state = r.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let state = state.clone();
            async move {
                state.got.lock().unwrap().push((headers, body.to_vec()));
                let status = state.script.lock().unwrap().pop_front().unwrap_or(200);
                StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (r, format!("http://{addr}/hook"))
}

/// Deliver what is due until nothing is pending (the scaled 24 h window is 8.6 s).
async fn deliver_until_settled(f: &Fixture, tenant: &str) -> Vec<DeliveryStatus> {
    for _ in 0..1000 {
        f.deliveries.deliver_due(10).await.unwrap();
        let all = f.repo.list_deliveries(tenant, None, 10).await.unwrap();
        if all.iter().all(|d| d.status != DeliveryStatus::Pending) {
            return all.iter().map(|d| d.status).collect();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("deliveries did not settle");
}

#[tokio::test]
async fn the_finished_job_webhook_arrives_signed_after_three_failures() {
    let f = fixture(Vec::new());
    let (rx, url) = receiver(vec![500, 503, 500]).await;
    let job_id = submit_local(&f, "acme", Some(url)).await;
    run_job(&f, "acme", &job_id).await;
    assert_eq!(
        deliver_until_settled(&f, "acme").await,
        [DeliveryStatus::Delivered]
    );
    let got = rx.got.lock().unwrap().clone();
    assert_eq!(got.len(), 4, "three failures, then the delivery");
    let secret = WebhookSecret::parse(SECRET).unwrap();
    let now = (SystemClock.now_ms() / 1000) as i64;
    let ids: Vec<String> = got
        .iter()
        .map(|(h, body)| {
            let pairs: Vec<(&str, &str)> = h
                .iter()
                .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
                .collect();
            secret
                .verify(
                    &ReceivedHeaders::from_pairs(pairs),
                    body,
                    now,
                    DEFAULT_TOLERANCE,
                )
                .expect("every attempt verifies");
            h.get("webhook-id").unwrap().to_str().unwrap().to_string()
        })
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "one message id: {ids:?}");
    let body: serde_json::Value = serde_json::from_slice(&got[3].1).unwrap();
    assert_eq!(body["type"], "generation.job.finished");
    assert_eq!(body["data"]["job_id"], job_id);
    assert_eq!(body["data"]["counts"]["total"], 3);
    assert_eq!(body["data"]["counts"]["mismatch"], 1);
    // A tampered body does not verify.
    let (h, _) = &got[3];
    let pairs: Vec<(&str, &str)> = h
        .iter()
        .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
        .collect();
    assert!(secret
        .verify(
            &ReceivedHeaders::from_pairs(pairs),
            b"{}",
            now,
            DEFAULT_TOLERANCE
        )
        .is_err());
}

#[tokio::test]
async fn a_410_stops_delivery_and_redeliver_sends_it_again() {
    let f = fixture(Vec::new());
    let (rx, url) = receiver(vec![410]).await;
    let job_id = submit_local(&f, "acme", Some(url)).await;
    run_job(&f, "acme", &job_id).await;
    assert_eq!(
        deliver_until_settled(&f, "acme").await,
        [DeliveryStatus::Gone]
    );
    // No more attempts, however long we wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.deliveries.deliver_due(10).await.unwrap();
    assert_eq!(rx.got.lock().unwrap().len(), 1);
    let d = f
        .repo
        .list_deliveries("acme", Some(DeliveryStatus::Gone), 10)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(d.last_status, Some(410));
    // By hand: sent again, delivered.
    f.deliveries
        .redeliver("acme", &d.delivery_id)
        .await
        .unwrap();
    assert_eq!(
        deliver_until_settled(&f, "acme").await,
        [DeliveryStatus::Delivered]
    );
    assert_eq!(rx.got.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_receiver_that_never_recovers_ends_in_a_dead_letter() {
    let f = fixture(Vec::new());
    let (rx, url) = receiver(vec![500; 50]).await;
    let job_id = submit_local(&f, "acme", Some(url)).await;
    run_job(&f, "acme", &job_id).await;
    assert_eq!(
        deliver_until_settled(&f, "acme").await,
        [DeliveryStatus::Dead]
    );
    let attempts = rx.got.lock().unwrap().len();
    // The schedule's attempts within the (scaled) 24 h window, then a dead letter.
    assert!((6..=10).contains(&attempts), "{attempts}");
    let dead = f
        .repo
        .list_deliveries("acme", Some(DeliveryStatus::Dead), 10)
        .await
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].last_status, Some(500));
}

#[tokio::test]
async fn a_job_is_refused_before_anything_is_stored_for_an_unsafe_webhook_or_an_unpriced_model() {
    let f = fixture(Vec::new());
    let requests = plan_job(
        &templates(),
        Some("hero"),
        RowsInput::Csv(b"sku,product\nA1,lamp\n"),
        &Limits::default(),
    )
    .unwrap();
    let sub = |url: Option<&str>, requests: Vec<_>| Submission {
        tenant: "acme".into(),
        template: "hero".into(),
        requests,
        webhook_url: url.map(str::to_string),
        webhook_rows: false,
        regenerate: None,
        source: "test".into(),
        job_id: None,
    };
    for bad in [
        "http://169.254.169.254/latest/meta-data",
        "https://10.0.0.1/hook",
        "ftp://127.0.0.1/hook",
    ] {
        let err = f
            .generations
            .submit(sub(Some(bad), requests.clone()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("webhook"), "{bad}: {err}");
    }
    let mut unpriced = requests.clone();
    unpriced[0].model = "dall-e-9".into();
    let err = f.generations.submit(sub(None, unpriced)).await.unwrap_err();
    assert!(err.to_string().contains("dall-e-9"), "{err}");
    assert!(f.repo.list_jobs("acme", 10).await.unwrap().is_empty());
    assert!(f
        .generate_queue
        .receive(10, Duration::from_secs(1))
        .await
        .unwrap()
        .is_empty());
}

async fn api_call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    content_type: &str,
    body: &str,
) -> (StatusCode, serde_json::Value) {
    use tower::ServiceExt;
    let req = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header("x-api-key", "acme-key")
        .header("content-type", content_type)
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test]
async fn the_api_starts_jobs_from_json_or_csv_refuses_bad_rows_and_reports_rows_and_deliveries() {
    let f = fixture(Vec::new());
    f.repo
        .add_api_key(
            &sightline_pipeline::http::hash_api_key("acme-key"),
            "acme",
            "2026-12-01T00:00:00Z",
        )
        .await
        .unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let app = sightline_pipeline::http::router(sightline_pipeline::http::ApiState {
        repo: f.repo.clone(),
        presigner: Arc::new(sightline_pipeline::local::LocalPresigner::new(
            b"k".to_vec(),
            "http://127.0.0.1:1",
            clock.clone(),
        )),
        settings: f.settings.clone(),
        clock,
        batches: None,
        search: None,
        blobs: f.blobs.clone(),
        generations: Some(Arc::new(f.generations.clone())),
        deliveries: Some(f.deliveries.clone()),
    });
    let (rx, url) = receiver(vec![]).await;
    let job = serde_json::json!({
        "template": {"prompt": "A photo of {product}", "model": "local-canvas", "size": "256x256"},
        "rows": [{"product": "a lamp"}, {"product": "a chair"}],
        "webhook_url": url,
    });
    let (status, body) = api_call(
        &app,
        "POST",
        "/v1/generations",
        "application/json",
        &job.to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job_id = body["job"]["job_id"].as_str().unwrap().to_string();
    assert_eq!(body["job"]["rows"], 2);

    assert!(body["job"].get("webhook_rows").is_none(), "{body}");
    // Per-row webhooks are asked for by a flag; a flag that is not a boolean is refused.
    let (status, body) = api_call(
        &app,
        "POST",
        "/v1/generations?template=hero&webhook_rows=yes",
        "text/csv",
        "product\na lamp\n",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("webhook_rows must be true or false"),
        "{body}"
    );

    // A CSV body needs a named template, and this server has no templates file.
    let (status, body) = api_call(
        &app,
        "POST",
        "/v1/generations?template=hero",
        "text/csv",
        "product\na lamp\n",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // A row missing its variable: refused with its row number, nothing stored.
    let bad = serde_json::json!({
        "template": {"prompt": "A photo of {product}", "model": "local-canvas"},
        "csv": "product,colour\na lamp,red\n,blue\n",
    });
    let (status, body) = api_call(
        &app,
        "POST",
        "/v1/generations",
        "application/json",
        &bad.to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("row 2"),
        "{body}"
    );
    let (_, list) = api_call(&app, "GET", "/v1/generations", "application/json", "").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);

    run_job(&f, "acme", &job_id).await;
    let (status, report) = api_call(
        &app,
        "GET",
        &format!("/v1/generations/{job_id}"),
        "application/json",
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["counts"]["done"], 2, "{report}");
    assert_eq!(report["rows"][0]["status"], "done");
    assert_eq!(
        deliver_until_settled(&f, "acme").await,
        [DeliveryStatus::Delivered]
    );
    assert_eq!(rx.got.lock().unwrap().len(), 1);
    let (_, deliveries) = api_call(
        &app,
        "GET",
        "/v1/webhooks/deliveries?status=delivered",
        "application/json",
        "",
    )
    .await;
    let id = deliveries["deliveries"][0]["delivery_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = api_call(
        &app,
        "POST",
        &format!("/v1/webhooks/deliveries/{id}/redeliver"),
        "application/json",
        "",
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        deliver_until_settled(&f, "acme").await,
        [DeliveryStatus::Delivered]
    );
    assert_eq!(rx.got.lock().unwrap().len(), 2);
    // An unknown job id is a 404.
    let (status, _) = api_call(&app, "GET", "/v1/generations/nope", "application/json", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// The price table's price of one image of the `hero` template's requests.
fn hero_image_price() -> f64 {
    sightline_core::PriceTable::builtin()
        .image_model(PAID)
        .unwrap()
        .cost_usd(
            sightline_core::generate::Size::parse("1024x1024").unwrap(),
            sightline_core::generate::Quality::Low,
            None,
        )
        .unwrap()
}

#[tokio::test]
async fn a_capped_tenant_pays_for_no_image_past_its_cap_and_the_rest_fail_as_set() {
    let per_image = hero_image_price();
    assert!(per_image > 0.0);
    let f = fixture_with(Vec::new(), |s| {
        // Two images fit, a third would not (a call is admitted while spent + held is under
        // the cap).
        s.budget = sightline_core::budget::BudgetCaps::from_amounts(per_image * 2.0, 0.0);
        s.over_budget = sightline_pipeline::settings::OverBudget::Fail;
    });
    let csv = "sku,product\nA1,red lamp\nB2,blue chair\nC3,green vase\nD4,grey desk\n";
    let job_id = submit(&f, "acme", csv, None).await;
    let report = run_to_report(&f, "acme", &job_id).await;
    assert_eq!(
        (report.counts.done, report.counts.failed),
        (2, 2),
        "{:?}",
        report.rows
    );
    for r in report.rows.iter().filter(|r| r.status == RowStatus::Failed) {
        assert_eq!(r.error.as_deref(), Some("budget exceeded"), "{r:?}");
        assert_eq!(r.generation_cost_usd, 0.0);
    }
    // Two calls paid and booked, within the cap; nothing was held back.
    let (calls, usd) = generation_ledger(&f.repo.costs("acme", &today(), &today()).await.unwrap());
    assert_eq!(calls, 2);
    assert!((usd - 2.0 * per_image).abs() < 1e-9 && usd <= per_image * 2.0 + 1e-12);
    assert_eq!(f.paid.calls.load(Ordering::SeqCst), 2);
    let periods = sightline_core::budget::Periods::at(SystemClock.now_ms());
    let counts = f
        .repo
        .budget_counts("acme", &periods, SystemClock.now_ms())
        .await
        .unwrap();
    assert_eq!(counts.day.reserved_usd, 0.0, "{counts:?}");
}

#[tokio::test]
async fn a_row_over_budget_waits_for_the_period_and_the_sweep_leaves_it_alone() {
    let per_image = hero_image_price();
    let f = fixture_with(Vec::new(), |s| {
        s.budget = sightline_core::budget::BudgetCaps::from_amounts(per_image, 0.0);
        s.over_budget = sightline_pipeline::settings::OverBudget::Wait;
        // The sweep would resend any queued row older than this.
        s.stuck_after = Duration::ZERO;
    });
    let job_id = submit(
        &f,
        "acme",
        "sku,product\nA1,red lamp\nB2,blue chair\n",
        None,
    )
    .await;
    let msgs = f
        .generate_queue
        .receive(10, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(msgs.len(), 2);
    let first = f.generations.handle(&msgs[0].body, 1).await;
    assert!(
        matches!(first, GenerateOutcome::Generated { .. }),
        "{first:?}"
    );
    // The second waits for tomorrow, even on what would be its last delivery.
    let second = f.generations.handle(&msgs[1].body, 5).await;
    let GenerateOutcome::Retry { delay, reason } = &second else {
        panic!("{second:?}");
    };
    assert!(
        reason.starts_with(sightline_pipeline::analyze::BUDGET_WAIT),
        "{reason}"
    );
    assert!(*delay > Duration::from_secs(1) && *delay <= Duration::from_secs(11 * 3600));
    let row = f.repo.get_row("acme", &job_id, 2).await.unwrap().unwrap();
    assert_eq!(row.status, RowStatus::Queued);
    assert!(row.budget_wait_until_ms.unwrap() > SystemClock.now_ms());
    for m in &msgs {
        f.generate_queue.delete(&m.receipt).await.unwrap();
    }
    // The sweep sends no copy of the waiting row.
    let swept = f.generations.sweep().await.unwrap();
    assert_eq!(swept.resent, 0, "{swept:?}");
    assert!(f
        .generate_queue
        .receive(10, Duration::from_secs(30))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(f.paid.calls.load(Ordering::SeqCst), 1);
}

/// The `(headers, body)` pairs a receiver got, each checked against the tenant's secret.
fn verified_bodies(got: &[Received]) -> Vec<(String, serde_json::Value)> {
    let secret = WebhookSecret::parse(SECRET).unwrap();
    let now = (SystemClock.now_ms() / 1000) as i64;
    got.iter()
        .map(|(h, body)| {
            let pairs: Vec<(&str, &str)> = h
                .iter()
                .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
                .collect();
            secret
                .verify(
                    &ReceivedHeaders::from_pairs(pairs),
                    body,
                    now,
                    DEFAULT_TOLERANCE,
                )
                .expect("every delivery verifies");
            (
                h.get("webhook-id").unwrap().to_str().unwrap().to_string(),
                serde_json::from_slice(body).unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn with_webhook_rows_each_row_is_posted_once_when_final_and_then_the_job() {
    let f = fixture(Vec::new());
    let (rx, url) = receiver(Vec::new()).await;
    let job_id = submit_local_with(&f, "acme", Some(url), true).await;
    run_job(&f, "acme", &job_id).await;
    let statuses = deliver_until_settled(&f, "acme").await;
    assert_eq!(statuses.len(), 4, "{statuses:?}");
    let got = verified_bodies(&rx.got.lock().unwrap().clone());
    let rows: Vec<&serde_json::Value> = got
        .iter()
        .filter(|(_, b)| b["type"] == "generation.row.finished")
        .map(|(_, b)| &b["data"])
        .collect();
    // One event per row, none for the first (failed) check of the regenerated row.
    let mut numbers: Vec<u64> = rows.iter().map(|r| r["row"].as_u64().unwrap()).collect();
    numbers.sort();
    assert_eq!(numbers, [1, 2, 3]);
    for r in &rows {
        assert_eq!(r["job_id"], job_id.as_str());
        assert!(
            matches!(r["status"].as_str(), Some("done" | "mismatch")),
            "{r}"
        );
    }
    let regenerated = rows.iter().find(|r| r["row"] == 2).unwrap();
    assert_eq!(regenerated["regenerated"], true);
    assert_eq!(regenerated["status"], "done");
    let ids: BTreeSet<&String> = got.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 4, "a message id per event");
    assert_eq!(
        got.iter()
            .filter(|(_, b)| b["type"] == "generation.job.finished")
            .count(),
        1
    );
}

#[tokio::test]
async fn a_row_webhook_lost_between_two_writes_is_recorded_when_the_job_finishes() {
    let f = fixture(Vec::new());
    let job_id = submit_local_with(&f, "acme", Some("http://127.0.0.1:9/hook".into()), true).await;
    // Every row ends without its own webhook being recorded (a crash after the row's write).
    for row in f.repo.rows("acme", &job_id).await.unwrap() {
        let mut failed = row.clone();
        failed.status = RowStatus::Failed;
        failed.error = Some("lost".into());
        assert!(f
            .repo
            .update_row(&failed, (RowStatus::Queued, 1))
            .await
            .unwrap());
    }
    assert!(f.generations.maybe_finish("acme", &job_id).await.unwrap());
    let deliveries = f.repo.list_deliveries("acme", None, 10).await.unwrap();
    let mut events: Vec<(String, String)> = deliveries
        .iter()
        .map(|d| (d.event.clone(), d.delivery_id.clone()))
        .collect();
    events.sort();
    let mut want: Vec<(String, String)> = (1..=3)
        .map(|r| {
            (
                "generation.row.finished".to_string(),
                Generations::row_delivery_id(&job_id, r),
            )
        })
        .collect();
    want.sort();
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events[0].0, "generation.job.finished");
    assert_eq!(events[1..].to_vec(), want);
}
