//! The search use-case with a scripted paid embedder on the local adapters (sqlite-vec).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sightline_core::model::ImageStatus;
use sightline_core::retry::FailureKind;
use sightline_pipeline::analyze::{AnalyzeOutcome, Analyzer};
use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteRepository, SqliteVectorStore};
use sightline_pipeline::ports::{
    BlobStore, Embedder, Embedding, LedgerKind, ProviderError, RateInfo, Repository, SystemClock,
};
use sightline_pipeline::search::{Search, SearchError, SearchMode};
use sightline_pipeline::Settings;

use crate::analyze::{record_of, sha, Scripted};

const MODEL: &str = "amazon.titan-embed-image-v1";
const DIMS: u32 = 256;

/// A paid embedder from a script: errors first, then vectors that put the image's id bytes in
/// the first dimensions; text is embedded the same way.
struct ScriptedEmbedder {
    errors: Mutex<VecDeque<FailureKind>>,
    calls: Mutex<u32>,
}

impl ScriptedEmbedder {
    fn new(errors: Vec<FailureKind>) -> Arc<ScriptedEmbedder> {
        Arc::new(ScriptedEmbedder {
            errors: Mutex::new(errors.into()),
            calls: Mutex::new(0),
        })
    }
    fn calls(&self) -> u32 {
        *self.calls.lock().unwrap()
    }
    fn vector_of(bytes: &[u8]) -> Vec<f32> {
        let mut v = vec![0.01f32; DIMS as usize];
        for (i, b) in bytes.iter().take(DIMS as usize).enumerate() {
            v[i] += *b as f32 / 255.0;
        }
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }
    fn next(&self) -> Result<(), Box<ProviderError>> {
        *self.calls.lock().unwrap() += 1;
        match self.errors.lock().unwrap().pop_front() {
            Some(kind) => Err(Box::new(ProviderError {
                kind,
                message: "scripted".into(),
                rate: RateInfo::default(),
                usage: None,
                billed: false,
            })),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Embedder for ScriptedEmbedder {
    fn name(&self) -> &str {
        "bedrock"
    }
    fn model(&self) -> &str {
        MODEL
    }
    fn dims(&self) -> u32 {
        DIMS
    }
    fn understands_text(&self) -> bool {
        true
    }
    async fn embed_image(&self, jpeg: &[u8]) -> Result<Embedding, ProviderError> {
        self.next().map_err(|e| *e)?;
        Ok(Embedding {
            vector: Self::vector_of(jpeg),
            input_tokens: 0,
            images: 1,
        })
    }
    async fn embed_text(&self, text: &str) -> Result<Embedding, ProviderError> {
        self.next().map_err(|e| *e)?;
        Ok(Embedding {
            vector: Self::vector_of(text.as_bytes()),
            input_tokens: 7,
            images: 0,
        })
    }
}

struct Fixture {
    search: Arc<Search>,
    analyzer: Analyzer,
    repo: Arc<dyn Repository>,
    blobs: Arc<dyn BlobStore>,
    embedder: Arc<ScriptedEmbedder>,
    _dir: tempfile::TempDir,
}

async fn fixture(errors: Vec<FailureKind>, settings: Settings) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::in_memory().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(dir.path()));
    let repo: Arc<dyn Repository> = Arc::new(SqliteRepository::new(db.clone()));
    let embedder = ScriptedEmbedder::new(errors);
    let settings = Arc::new(Settings {
        model: "gpt-4o".into(),
        max_inline_wait: Duration::from_millis(300),
        // The analysis calls are not what these tests limit: with the default 200,000 TPM
        // the burst holds one 1024-px image's reservation at a time.
        rpm: 0,
        tpm: 0,
        ..settings
    });
    let search = Arc::new(Search::new(
        repo.clone(),
        blobs.clone(),
        Arc::new(SqliteVectorStore::new(db)),
        Some(embedder.clone()),
        settings.clone(),
        Arc::new(SystemClock),
    ));
    let analyzer = Analyzer::new(
        blobs.clone(),
        repo.clone(),
        Scripted::new(Vec::new()),
        settings,
        Arc::new(SystemClock),
    )
    .with_search(search.clone());
    Fixture {
        search,
        analyzer,
        repo,
        blobs,
        embedder,
        _dir: dir,
    }
}

/// An image with its own resized bytes, queued, and its job.
async fn image(f: &Fixture, tenant: &str, id: &str, bytes: &[u8]) -> String {
    let mut rec = record_of(tenant, id);
    rec.sha256 = Some(sha(bytes));
    f.blobs
        .put(
            rec.resized_key.as_deref().unwrap(),
            bytes.to_vec(),
            "image/jpeg",
        )
        .await
        .unwrap();
    f.repo.put_image(&rec, None).await.unwrap();
    serde_json::json!({
        "v": 1, "image_id": id, "tenant": tenant,
        "resized_key": rec.resized_key, "sha256": sha(bytes), "width": 10, "height": 10
    })
    .to_string()
}

fn embedding_rows(rows: &[sightline_pipeline::ports::CostRow]) -> (u64, f64) {
    rows.iter()
        .filter(|r| r.kind == LedgerKind::Embedding)
        .fold((0, 0.0), |(c, usd), r| (c + r.calls, usd + r.cost_usd))
}

fn today() -> String {
    sightline_pipeline::ports::day_of(&sightline_pipeline::ports::rfc3339(
        sightline_pipeline::ports::Clock::now_ms(&SystemClock),
    ))
    .to_string()
}

#[tokio::test]
async fn a_done_image_is_embedded_once_and_its_embedding_booked_once_as_kind_embedding() {
    let f = fixture(Vec::new(), Settings::default()).await;
    let job = image(&f, "t", "a", b"\xFF\xD8first").await;
    assert!(matches!(
        f.analyzer.handle(&job, 1).await,
        AnalyzeOutcome::Done { .. }
    ));
    assert_eq!(f.embedder.calls(), 1);
    // Indexing again (a duplicate delivery, a reindex --all) replaces the vector, books nothing.
    f.search.index_stored("t", "a").await.unwrap();
    let day = today();
    let rows = f.repo.costs("t", &day, &day).await.unwrap();
    let (calls, usd) = embedding_rows(&rows);
    assert_eq!(calls, 1, "{rows:?}");
    let price = sightline_core::pricing::PriceTable::builtin()
        .embedding_model(MODEL)
        .unwrap()
        .per_image_usd;
    assert!((usd - price).abs() < 1e-12);
    // The record carries no embedding money (it is not an answer's).
    let rec = f.repo.get_image("t", "a").await.unwrap().unwrap();
    assert!(rec.extra_spend.is_none());
}

#[tokio::test]
async fn a_failing_embedder_never_fails_the_analysis_and_reindex_catches_up() {
    let permanent = FailureKind::Http {
        status: 400,
        retry_after: None,
    };
    let f = fixture(vec![permanent], Settings::default()).await;
    let job = image(&f, "t", "a", b"\xFF\xD8first").await;
    assert!(matches!(
        f.analyzer.handle(&job, 1).await,
        AnalyzeOutcome::Done { .. }
    ));
    let rec = f.repo.get_image("t", "a").await.unwrap().unwrap();
    assert_eq!(rec.status, ImageStatus::Done);
    assert!(matches!(
        f.search.similar("t", "a", 5).await,
        Err(SearchError::NoVector(_))
    ));
    let report = f.search.reindex("t", false).await.unwrap();
    assert_eq!((report.indexed, report.failed), (1, 0));
    assert!(f.search.similar("t", "a", 5).await.is_ok());
    // Nothing is missing now: a second reindex skips it.
    assert_eq!(f.search.reindex("t", false).await.unwrap().skipped, 1);
}

#[tokio::test]
async fn transient_embedding_errors_are_retried_in_place() {
    let f = fixture(
        vec![
            FailureKind::Http {
                status: 503,
                retry_after: None,
            },
            FailureKind::Timeout,
        ],
        Settings::default(),
    )
    .await;
    let job = image(&f, "t", "a", b"\xFF\xD8first").await;
    f.analyzer.handle(&job, 1).await;
    assert_eq!(f.embedder.calls(), 3);
    assert!(f.search.similar("t", "a", 5).await.is_ok());
}

#[tokio::test]
async fn the_embedding_rpm_holds_calls_back_and_gives_up_past_the_inline_wait() {
    let f = fixture(
        Vec::new(),
        Settings {
            embedding_rpm: 1,
            ..Settings::default()
        },
    )
    .await;
    let a = image(&f, "t", "a", b"\xFF\xD8first").await;
    let b = image(&f, "t", "b", b"\xFF\xD8second").await;
    f.analyzer.handle(&a, 1).await;
    // The second call would wait a minute, past max_inline_wait: no call, no vector (yet).
    f.analyzer.handle(&b, 1).await;
    assert_eq!(f.embedder.calls(), 1);
    assert!(matches!(
        f.search.similar("t", "b", 5).await,
        Err(SearchError::NoVector(_))
    ));
}

#[tokio::test]
async fn similar_and_text_search_stay_within_the_tenant_and_text_queries_are_booked() {
    let f = fixture(Vec::new(), Settings::default()).await;
    for (tenant, id, bytes) in [
        ("t", "a", &b"\xFF\xD8aaaa"[..]),
        ("t", "b", b"\xFF\xD8aaab"),
        ("t", "c", b"\xFF\xD8zzzz"),
        ("u", "x", b"\xFF\xD8aaaa"),
    ] {
        let job = image(&f, tenant, id, bytes).await;
        f.analyzer.handle(&job, 1).await;
    }
    let found = f.search.similar("t", "a", 10).await.unwrap();
    assert_eq!(found.mode, SearchMode::Vector);
    let ids: Vec<&str> = found.results.iter().map(|h| h.image_id.as_str()).collect();
    assert_eq!(
        ids,
        ["b", "c"],
        "nearest first, itself and tenant u left out"
    );
    let found = f.search.text("u", "anything", 10).await.unwrap();
    assert_eq!(found.mode, SearchMode::Vector);
    let ids: Vec<&str> = found.results.iter().map(|h| h.image_id.as_str()).collect();
    assert_eq!(ids, ["x"]);
    let day = today();
    let (calls, _) = embedding_rows(&f.repo.costs("u", &day, &day).await.unwrap());
    assert_eq!(calls, 2, "the image and the text query");
    // Unknown image, bad top, empty query: clear errors.
    assert!(matches!(
        f.search.similar("t", "nope", 5).await,
        Err(SearchError::NoImage(_))
    ));
    assert!(matches!(
        f.search.similar("t", "a", 0).await,
        Err(SearchError::BadRequest(_))
    ));
    assert!(matches!(
        f.search.text("t", "  ", 5).await,
        Err(SearchError::BadRequest(_))
    ));
    // A deleted image's vector goes with it.
    let rec = f.repo.get_image("t", "b").await.unwrap().unwrap();
    sightline_pipeline::search::delete_image(
        f.repo.as_ref(),
        f.blobs.as_ref(),
        Some(&f.search),
        &rec,
    )
    .await
    .unwrap();
    let ids: Vec<String> = f
        .search
        .similar("t", "a", 10)
        .await
        .unwrap()
        .results
        .into_iter()
        .map(|h| h.image_id)
        .collect();
    assert_eq!(ids, ["c"]);
}

#[tokio::test]
async fn with_the_embedder_off_near_duplicate_skip_still_gets_visual_vectors_from_reindex() {
    let dir = tempfile::tempdir().unwrap();
    let db = SqliteDb::in_memory().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(dir.path()));
    let repo: Arc<dyn Repository> = Arc::new(SqliteRepository::new(db.clone()));
    let settings = Arc::new(Settings {
        dedupe: sightline_pipeline::settings::Dedupe::Near,
        embedder: sightline_pipeline::settings::EmbedderKind::Off,
        ..Settings::default()
    });
    let search = Search::new(
        repo.clone(),
        blobs.clone(),
        Arc::new(SqliteVectorStore::new(db)),
        None,
        settings,
        Arc::new(SystemClock),
    );
    // A done image with a real resized JPEG and no vector.
    let img = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, 60])
    });
    let mut jpeg = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let mut rec = record_of("t", "a");
    rec.status = ImageStatus::Done;
    rec.sha256 = Some(sha(&jpeg));
    rec.result = Some(
        serde_json::from_value(serde_json::json!({
            "provider": "local", "model": "m", "analysis": {"description": "x", "tags": []},
            "usage": {"input_tokens": 0, "output_tokens": 0}, "cost_usd": 0.0, "cached": false,
            "idempotency_key": "k", "prompt_version": "v1", "price_version": "p",
            "completed_at": "2026-11-30T00:00:00.000Z"
        }))
        .unwrap(),
    );
    blobs
        .put(rec.resized_key.as_deref().unwrap(), jpeg, "image/jpeg")
        .await
        .unwrap();
    repo.put_image(&rec, None).await.unwrap();

    let first = search.reindex("t", false).await.unwrap();
    assert_eq!((first.indexed, first.failed), (1, 0));
    assert_eq!(search.reindex("t", false).await.unwrap().skipped, 1);
    // No embedder: no similarity search, but the visual vector serves the skip.
    assert!(matches!(
        search.similar("t", "a", 5).await,
        Err(SearchError::Off)
    ));
}
