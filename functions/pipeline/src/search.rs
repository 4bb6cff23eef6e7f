//! Use-case: vectors for analysed images, and the searches over them.
//!
//! - [`Search::index`]: a `done` image gets its vector from the configured [`Embedder`]
//!   (computed from the resized JPEG, so nothing is decoded twice), booked on the ledger once
//!   (kind `embedding`), and stored in the tenant's part of the [`VectorStore`]. Where
//!   near-duplicate skip may run, the image also gets the offline visual vector ($0).
//! - [`Search::similar`] / [`Search::similar_to_image`]: nearest images of one tenant.
//! - [`Search::text`]: a text query in the image space when the embedder understands words,
//!   else a keyword ranking over the analysis text (`mode: keyword`).
//! - [`Search::near_duplicate`]: the analysed image an upload is a near-copy of, if any.
//!
//! An embedding failure never fails an analysis: the analyzer logs it and `sightline reindex`
//! embeds what is missing.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sightline_core::embed::{self, NearDupThreshold, LOCAL_EMBED_DIMS, LOCAL_EMBED_MODEL};
use sightline_core::limiter::{Denied, Limits, RateLimiter};
use sightline_core::model::{AnalysisResult, ImageRecord, ImageStatus};
use sightline_core::pricing::{PriceTable, Usage};
use sightline_core::retry::{classify, RetryClass};
use tracing::{debug, warn};

use crate::ports::{
    day_of, rfc3339, BlobStore, Clock, Embedder, Embedding, LedgerKind, ProviderError, Repository,
    Spend, StoreError, VectorHit, VectorIndex, VectorMeta, VectorQuery, VectorRecord, VectorStore,
    MAX_TOP_K,
};
use crate::settings::{Dedupe, Settings};

/// Errors of the search use-cases, mapped to HTTP statuses by the router.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("image {0} not found")]
    NoImage(String),
    #[error("image {0} has no vector yet (it is not analysed, or `sightline reindex` has not run since the embedder changed)")]
    NoVector(String),
    #[error("similarity search is off (embedder = off)")]
    Off,
    #[error("{0}")]
    BadRequest(String),
    #[error("embedding provider: {0}")]
    Provider(Box<ProviderError>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ProviderError> for SearchError {
    fn from(e: ProviderError) -> SearchError {
        SearchError::Provider(Box::new(e))
    }
}

/// How a text query was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// The query's embedding against the images' (a model that understands words).
    Vector,
    /// Words of the query against the analysis text (tags, description, text in the image).
    Keyword,
}

/// One found image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchHit {
    pub image_id: String,
    /// Cosine distance (vector search; 0 is the same direction), or 1 − the keyword score.
    pub distance: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resized_key: Option<String>,
    /// A short-lived URL of the resized image (set by the HTTP API for thumbnails).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thumbnail_url: Option<String>,
}

/// The answer to a search.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SearchResults {
    pub mode: SearchMode,
    pub model: String,
    pub results: Vec<SearchHit>,
}

/// What a reindex did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReindexReport {
    pub indexed: u64,
    /// Done images that had their vector already.
    pub skipped: u64,
    pub failed: u64,
}

/// The analysed image an upload may reuse.
#[derive(Debug, Clone, PartialEq)]
pub struct NearDuplicate {
    pub image_id: String,
    pub distance: f32,
    pub result: AnalysisResult,
}

/// The search use-cases over their ports.
pub struct Search {
    pub repo: Arc<dyn Repository>,
    /// Resized JPEGs (reindex reads them).
    pub blobs: Arc<dyn BlobStore>,
    pub vectors: Arc<dyn VectorStore>,
    /// None: the embedder is off (visual vectors for near-duplicate skip may still be kept).
    pub embedder: Option<Arc<dyn Embedder>>,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    /// Indexes known to exist (ensure_index once per process and index).
    ensured: Mutex<HashSet<VectorIndex>>,
    /// Requests to a paid embedding model (`embedding_rpm`), as the analyzer limits its model.
    limiter: Mutex<RateLimiter>,
}

/// The index of the offline visual vectors (near-duplicate skip, and `similar` with the local
/// embedder).
pub fn visual_index() -> VectorIndex {
    VectorIndex::new(LOCAL_EMBED_MODEL, LOCAL_EMBED_DIMS as u32)
}

/// Attempts of a transient embedding or vector-store error before the indexing gives up (the
/// analysis is done either way; reindex picks it up).
const ATTEMPTS: u32 = 3;

impl Search {
    pub fn new(
        repo: Arc<dyn Repository>,
        blobs: Arc<dyn BlobStore>,
        vectors: Arc<dyn VectorStore>,
        embedder: Option<Arc<dyn Embedder>>,
        settings: Arc<Settings>,
        clock: Arc<dyn Clock>,
    ) -> Search {
        Search {
            repo,
            blobs,
            vectors,
            embedder,
            ensured: Mutex::new(HashSet::new()),
            limiter: Mutex::new(RateLimiter::with_limits(
                Limits::new(settings.embedding_rpm, 0, settings.limit_burst)
                    .per_instance(settings.max_concurrency),
            )),
            settings,
            clock,
        }
    }

    /// One embedding call under the limiter, with the analysis' retry classes: a wait for the
    /// limiter up to `max_inline_wait` happens in place; transient errors are tried again a
    /// few times (a 429's Retry-After also pauses the limiter); permanent ones fail at once.
    async fn embed<'a, F, Fut>(
        &self,
        embedder: &dyn Embedder,
        mut call: F,
    ) -> Result<Embedding, SearchError>
    where
        F: FnMut() -> Fut + 'a,
        Fut: std::future::Future<Output = Result<Embedding, ProviderError>> + 'a,
    {
        let limited = embedder.is_paid();
        let mut attempt = 0u32;
        loop {
            if limited {
                self.wait_for_limiter().await?;
            }
            match call().await {
                Ok(e) => return Ok(e),
                Err(e) => {
                    attempt += 1;
                    if let sightline_core::retry::FailureKind::Http {
                        status: 429,
                        retry_after: Some(wait),
                    } = e.kind
                    {
                        if let Ok(mut l) = self.limiter.lock() {
                            l.block_for(wait, self.clock.now_ms());
                        }
                    }
                    if attempt >= ATTEMPTS || classify(&e.kind) == RetryClass::Permanent {
                        return Err(e.into());
                    }
                    let wait = sightline_core::retry::retry_delay(&e.kind, attempt, 0.5)
                        .min(self.settings.max_inline_wait);
                    warn!(error = %e.message, attempt, "embedding call failed; trying again");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn wait_for_limiter(&self) -> Result<(), SearchError> {
        let started = self.clock.now_ms();
        loop {
            let now = self.clock.now_ms();
            let denied = match self.limiter.lock() {
                Ok(mut l) => l.try_reserve(0, now).err(),
                Err(_) => None,
            };
            let Some(Denied::Wait(wait)) = denied else {
                return Ok(());
            };
            let waited = Duration::from_millis(now.saturating_sub(started));
            if waited + wait > self.settings.max_inline_wait {
                return Err(SearchError::Provider(Box::new(ProviderError {
                    kind: sightline_core::retry::FailureKind::Http {
                        status: 429,
                        retry_after: Some(wait),
                    },
                    message: format!(
                        "embedding_rpm reached: the next call may go in {} ms",
                        wait.as_millis()
                    ),
                    rate: Default::default(),
                    usage: None,
                    billed: false,
                })));
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// The index the configured embedder's vectors go to.
    pub fn index(&self) -> Option<VectorIndex> {
        self.embedder
            .as_ref()
            .map(|e| VectorIndex::new(e.model(), e.dims()))
    }

    /// Whether visual vectors are kept besides the embedder's: near-duplicate skip needs them
    /// for every image, whatever the embedder.
    fn keeps_visual(&self) -> bool {
        self.settings.dedupe == Dedupe::Near
            || self
                .settings
                .tenant_dedupe
                .values()
                .any(|d| *d == Dedupe::Near)
    }

    async fn ensure(&self, index: &VectorIndex) -> Result<(), StoreError> {
        let known = self
            .ensured
            .lock()
            .map(|s| s.contains(index))
            .unwrap_or(false);
        if !known {
            self.vectors.ensure_index(index).await?;
            if let Ok(mut s) = self.ensured.lock() {
                s.insert(index.clone());
            }
        }
        Ok(())
    }

    /// Give a `done` image its vectors. `jpeg` is its resized JPEG. Idempotent: a repeat
    /// replaces the vector and books nothing twice.
    pub async fn index_image(&self, record: &ImageRecord, jpeg: &[u8]) -> Result<(), SearchError> {
        let Some(result) = &record.result else {
            return Err(SearchError::NoVector(record.image_id.clone()));
        };
        let meta = meta_of(result);
        let mut visual: Option<Vec<f32>> = None;
        if let Some(embedder) = &self.embedder {
            let index = VectorIndex::new(embedder.model(), embedder.dims());
            let emb = self
                .embed(embedder.as_ref(), || embedder.embed_image(jpeg))
                .await?;
            self.book(record, embedder.as_ref(), &emb).await?;
            if index == visual_index() {
                visual = Some(emb.vector.clone());
            }
            self.put(&index, record, emb.vector, &meta).await?;
        }
        if visual.is_none() && self.keeps_visual() {
            let v = visual_vector(jpeg).await?;
            self.put(&visual_index(), record, v, &meta).await?;
        }
        Ok(())
    }

    /// Give a stored image its vectors if it is done (its record and resized JPEG read from
    /// the stores); a missing or unfinished image is left alone.
    pub async fn index_stored(&self, tenant: &str, image_id: &str) -> Result<(), SearchError> {
        let Some(record) = self.repo.get_image(tenant, image_id).await? else {
            return Ok(());
        };
        let (Some(_), Some(key)) = (&record.result, &record.resized_key) else {
            return Ok(());
        };
        let jpeg = self
            .blobs
            .get(key, self.settings.prepare.max_input_bytes)
            .await?;
        self.index_image(&record, &jpeg).await
    }

    /// [`Search::index_stored`] that only logs a failure: an embedding never fails the step that
    /// finished the image (`sightline reindex` embeds what is missing).
    pub async fn index_or_log(&self, tenant: &str, image_id: &str) {
        if let Err(e) = self.index_stored(tenant, image_id).await {
            warn!(error = %e, image_id, "could not index the image; `sightline reindex` will");
        }
    }

    async fn put(
        &self,
        index: &VectorIndex,
        record: &ImageRecord,
        vector: Vec<f32>,
        meta: &VectorMeta,
    ) -> Result<(), SearchError> {
        self.ensure(index).await?;
        let rec = VectorRecord {
            tenant: record.tenant.clone(),
            image_id: record.image_id.clone(),
            vector,
            meta: meta.clone(),
        };
        let mut attempt = 0;
        loop {
            match self
                .vectors
                .put_vectors(index, std::slice::from_ref(&rec))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && attempt + 1 < ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Book an image's embedding once: the spend id names the model, dimension and content.
    async fn book(
        &self,
        record: &ImageRecord,
        embedder: &dyn Embedder,
        emb: &Embedding,
    ) -> Result<(), SearchError> {
        let spend_id = format!(
            "embed:{}:{}:{}/{}:{}",
            embedder.model(),
            embedder.dims(),
            record.tenant,
            record.image_id,
            record.sha256.as_deref().unwrap_or("")
        );
        self.book_embedding(&record.tenant, &record.image_id, &spend_id, embedder, emb)
            .await
    }

    async fn book_embedding(
        &self,
        tenant: &str,
        image_id: &str,
        spend_id: &str,
        embedder: &dyn Embedder,
        emb: &Embedding,
    ) -> Result<(), SearchError> {
        if !embedder.is_paid() {
            return Ok(());
        }
        let price = PriceTable::builtin()
            .embedding_model(embedder.model())
            .map_err(|e| SearchError::BadRequest(e.to_string()))?;
        let spend = Spend {
            day: day_of(&rfc3339(self.clock.now_ms())).to_string(),
            model: embedder.model().to_string(),
            calls: 1,
            usage: Usage {
                input_tokens: emb.input_tokens,
                output_tokens: 0,
                cached_tokens: 0,
            },
            cost_usd: price.cost_usd(emb.images, emb.input_tokens),
            calls_at_estimate: 0,
            cost_at_estimate_usd: 0.0,
            lane: Default::default(),
            saved_usd: 0.0,
            kind: LedgerKind::Embedding,
        };
        let mut attempt = 0;
        loop {
            match self
                .repo
                .book_spend(tenant, image_id, spend_id, &spend)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && attempt + 1 < ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The analysed image of `tenant` that the resized JPEG `jpeg` is a near-copy of, analysed
    /// with `model` and this prompt version; None when there is none, or the skip is off for
    /// the tenant.
    pub async fn near_duplicate(
        &self,
        tenant: &str,
        image_id: &str,
        jpeg: &[u8],
        model: &str,
    ) -> Result<Option<NearDuplicate>, SearchError> {
        if self.settings.dedupe_for(tenant) != Dedupe::Near {
            return Ok(None);
        }
        let threshold = NearDupThreshold::default();
        let own = visual_signature(jpeg).await?;
        let vector = own.embedding.clone();
        let hits = self
            .vectors
            .query(
                &visual_index(),
                &VectorQuery {
                    tenant: tenant.to_string(),
                    vector,
                    top_k: 5,
                    tag: None,
                },
            )
            .await?;
        for hit in hits {
            if hit.image_id == image_id || hit.distance > threshold.max_cosine_distance {
                continue;
            }
            let Some(rec) = self.repo.get_image(tenant, &hit.image_id).await? else {
                continue;
            };
            let Some(result) = rec.result else { continue };
            if rec.status != ImageStatus::Done
                || result.model != model
                || result.prompt_version != self.settings.prompt_version
            {
                continue;
            }
            // The rule wants the perceptual hashes to agree too (the vector alone is the first
            // filter): the candidate's are computed from its resized JPEG, only for the few
            // within the cosine threshold.
            let Some(key) = &rec.resized_key else {
                continue;
            };
            let theirs = match self
                .blobs
                .get(key, self.settings.prepare.max_input_bytes)
                .await
            {
                Ok(bytes) => visual_signature(&bytes).await?,
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            if embed::is_near_duplicate(&own, &theirs, &threshold) {
                return Ok(Some(NearDuplicate {
                    image_id: hit.image_id,
                    distance: hit.distance,
                    result,
                }));
            }
        }
        Ok(None)
    }

    /// Images of `tenant` like image `image_id`, nearest first (the image itself left out).
    pub async fn similar(
        &self,
        tenant: &str,
        image_id: &str,
        top: usize,
    ) -> Result<SearchResults, SearchError> {
        let index = self.index().ok_or(SearchError::Off)?;
        let top = check_top(top)?;
        if self.repo.get_image(tenant, image_id).await?.is_none() {
            return Err(SearchError::NoImage(image_id.to_string()));
        }
        let Some(own) = self.vectors.get_vector(&index, tenant, image_id).await? else {
            return Err(SearchError::NoVector(image_id.to_string()));
        };
        let hits = self
            .query(&index, tenant, own.vector, (top + 1).min(MAX_TOP_K))
            .await?;
        let hits: Vec<VectorHit> = hits
            .into_iter()
            .filter(|h| h.image_id != image_id)
            .take(top)
            .collect();
        Ok(SearchResults {
            mode: SearchMode::Vector,
            model: index.model.clone(),
            results: self.found(tenant, hits).await?,
        })
    }

    /// Images of `tenant` like an image given as bytes (any format the pipeline reads; it is
    /// prepared as an upload would be, then embedded). A paid embedder books the call.
    pub async fn similar_to_image(
        &self,
        tenant: &str,
        bytes: &[u8],
        top: usize,
    ) -> Result<SearchResults, SearchError> {
        let embedder = self.embedder.clone().ok_or(SearchError::Off)?;
        let top = check_top(top)?;
        let opts = self.settings.prepare;
        let owned = bytes.to_vec();
        let prepared =
            tokio::task::spawn_blocking(move || sightline_core::prepare::prepare(&owned, &opts))
                .await
                .map_err(|e| SearchError::BadRequest(format!("preparing the image: {e}")))?
                .map_err(|e| SearchError::BadRequest(format!("the query image: {e}")))?;
        let emb = self
            .embed(embedder.as_ref(), || embedder.embed_image(&prepared.jpeg))
            .await?;
        self.query_results(embedder.as_ref(), tenant, emb, top)
            .await
    }

    /// A query's own embedding booked (a paid query is money too), then its nearest images.
    async fn query_results(
        &self,
        embedder: &dyn Embedder,
        tenant: &str,
        emb: Embedding,
        top: usize,
    ) -> Result<SearchResults, SearchError> {
        if emb.images > 0 || emb.input_tokens > 0 {
            let id = format!("query:{}", uuid::Uuid::new_v4().simple());
            self.book_embedding(tenant, &id, &id, embedder, &emb)
                .await?;
        }
        let index = VectorIndex::new(embedder.model(), embedder.dims());
        let hits = self.query(&index, tenant, emb.vector, top).await?;
        Ok(SearchResults {
            mode: SearchMode::Vector,
            model: index.model.clone(),
            results: self.found(tenant, hits).await?,
        })
    }

    /// Images of `tenant` matching a text query: in the image space when the embedder
    /// understands words, else by keywords over the analysis text.
    pub async fn text(
        &self,
        tenant: &str,
        q: &str,
        top: usize,
    ) -> Result<SearchResults, SearchError> {
        let q = q.trim();
        if q.is_empty() {
            return Err(SearchError::BadRequest("the query is empty".into()));
        }
        if q.chars().count() > 1000 {
            return Err(SearchError::BadRequest(
                "the query is over 1,000 characters".into(),
            ));
        }
        let top = check_top(top)?;
        match &self.embedder {
            Some(embedder) if embedder.understands_text() => {
                let emb = self
                    .embed(embedder.as_ref(), || embedder.embed_text(q))
                    .await?;
                self.query_results(embedder.as_ref(), tenant, emb, top)
                    .await
            }
            _ => self.keyword(tenant, q, top).await,
        }
    }

    async fn query(
        &self,
        index: &VectorIndex,
        tenant: &str,
        vector: Vec<f32>,
        top: usize,
    ) -> Result<Vec<VectorHit>, SearchError> {
        Ok(self
            .vectors
            .query(
                index,
                &VectorQuery {
                    tenant: tenant.to_string(),
                    vector,
                    top_k: top,
                    tag: None,
                },
            )
            .await?)
    }

    /// Hits with what the records say of them; hits whose image is gone are left out.
    async fn found(
        &self,
        tenant: &str,
        hits: Vec<VectorHit>,
    ) -> Result<Vec<SearchHit>, SearchError> {
        let mut out = Vec::with_capacity(hits.len());
        for hit in hits {
            match self.repo.get_image(tenant, &hit.image_id).await? {
                Some(rec) => out.push(hit_of(&rec, hit.distance)),
                None => debug!(image_id = %hit.image_id, "a vector outlived its image"),
            }
        }
        Ok(out)
    }

    /// Keyword ranking over every analysed image of the tenant: the share of the query's words
    /// found in its analysis text, tags counting double.
    async fn keyword(
        &self,
        tenant: &str,
        q: &str,
        top: usize,
    ) -> Result<SearchResults, SearchError> {
        let words = words_of(q);
        if words.is_empty() {
            return Err(SearchError::BadRequest(
                "the query has no words to look for".into(),
            ));
        }
        let mut scored: Vec<(f32, ImageRecord)> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self
                .repo
                .list_images(tenant, Some(ImageStatus::Done), 200, cursor.as_deref())
                .await?;
            for rec in page.images {
                let Some(result) = &rec.result else { continue };
                let score = keyword_score(&words, result);
                if score > 0.0 {
                    scored.push((score, rec));
                }
            }
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        scored.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then_with(|| a.1.image_id.cmp(&b.1.image_id))
        });
        Ok(SearchResults {
            mode: SearchMode::Keyword,
            model: "keyword".into(),
            results: scored
                .into_iter()
                .take(top)
                .map(|(score, rec)| hit_of(&rec, 1.0 - score))
                .collect(),
        })
    }

    /// Give a tenant's done images their vectors: those missing one, or all with `all`.
    /// Images whose vector cannot be made are counted and logged; the rest go on.
    pub async fn reindex(&self, tenant: &str, all: bool) -> Result<ReindexReport, SearchError> {
        let mut report = ReindexReport::default();
        let mut cursor: Option<String> = None;
        loop {
            let (page, next) = self
                .reindex_page(tenant, all, cursor.as_deref(), 100)
                .await?;
            report.indexed += page.indexed;
            report.skipped += page.skipped;
            report.failed += page.failed;
            match next {
                Some(c) => cursor = Some(c),
                None => return Ok(report),
            }
        }
    }

    /// One page of [`Search::reindex`]: up to `limit` done images from `cursor` (None: the
    /// newest), and the cursor of the next page (None: the last one). A caller with a deadline
    /// (the reconcile Lambda) goes page by page and hands the cursor on.
    pub async fn reindex_page(
        &self,
        tenant: &str,
        all: bool,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<(ReindexReport, Option<String>), SearchError> {
        let mut report = ReindexReport::default();
        let page = self
            .repo
            .list_images(tenant, Some(ImageStatus::Done), limit.max(1), cursor)
            .await?;
        for rec in page.images {
            if !all && self.has_vector(&rec).await? {
                report.skipped += 1;
                continue;
            }
            let done = async {
                let key = rec
                    .resized_key
                    .clone()
                    .ok_or_else(|| SearchError::NoVector(rec.image_id.clone()))?;
                let jpeg = self
                    .blobs
                    .get(&key, self.settings.prepare.max_input_bytes)
                    .await?;
                self.index_image(&rec, &jpeg).await
            };
            match done.await {
                Ok(()) => report.indexed += 1,
                Err(e) => {
                    warn!(error = %e, image_id = %rec.image_id, "could not index");
                    report.failed += 1;
                }
            }
        }
        Ok((report, page.next_cursor))
    }

    /// Delete an image's vectors (every index).
    pub async fn forget(&self, tenant: &str, image_id: &str) -> Result<(), SearchError> {
        Ok(self
            .vectors
            .delete_vectors(tenant, &[image_id.to_string()])
            .await?)
    }

    /// Whether a done image already has its vector in the embedder's index (reindex skips it).
    pub async fn has_vector(&self, record: &ImageRecord) -> Result<bool, SearchError> {
        // Every index this image should be in: the embedder's, and the visual one when
        // near-duplicate skip needs it (the same index when the embedder is the visual one).
        let mut wanted: Vec<VectorIndex> = self.index().into_iter().collect();
        if self.keeps_visual() && !wanted.contains(&visual_index()) {
            wanted.push(visual_index());
        }
        for index in wanted {
            if self
                .vectors
                .get_vector(&index, &record.tenant, &record.image_id)
                .await?
                .is_none()
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Delete an image: its record, its original and resized objects, and its vectors. The ledger
/// keeps what was paid; the idempotency cache keeps the answer for the same bytes.
pub async fn delete_image(
    repo: &dyn Repository,
    blobs: &dyn crate::ports::BlobStore,
    search: Option<&Search>,
    record: &ImageRecord,
) -> Result<(), SearchError> {
    if let Some(search) = search {
        search.forget(&record.tenant, &record.image_id).await?;
    }
    for key in [&record.original_key, &record.resized_key]
        .into_iter()
        .flatten()
    {
        blobs.delete(key).await?;
    }
    repo.delete_image(&record.tenant, &record.image_id).await?;
    Ok(())
}

fn check_top(top: usize) -> Result<usize, SearchError> {
    if top == 0 || top > MAX_TOP_K {
        return Err(SearchError::BadRequest(format!(
            "top must be 1..={MAX_TOP_K}, not {top}"
        )));
    }
    Ok(top)
}

/// The offline visual vector of a JPEG, off the async threads.
async fn visual_vector(jpeg: &[u8]) -> Result<Vec<f32>, SearchError> {
    Ok(visual_signature(jpeg).await?.embedding)
}

/// The offline visual vector and perceptual hashes of a JPEG (one decode), off the async
/// threads.
async fn visual_signature(jpeg: &[u8]) -> Result<embed::VisualSignature, SearchError> {
    let bytes = jpeg.to_vec();
    tokio::task::spawn_blocking(move || embed::visual_signature(&bytes))
        .await
        .map_err(|e| SearchError::BadRequest(format!("visual embedding task: {e}")))?
        .map_err(|e| SearchError::BadRequest(format!("visual embedding: {e}")))
}

fn analysis_strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| analysis_strings(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| analysis_strings(v, out)),
        _ => {}
    }
}

fn tags_of(result: &AnalysisResult) -> Vec<String> {
    match result.analysis.get("tags") {
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|t| t.as_str())
            .map(|t| t.trim().to_lowercase())
            .filter(|t| !t.is_empty())
            .take(50)
            .collect(),
        _ => Vec::new(),
    }
}

fn meta_of(result: &AnalysisResult) -> VectorMeta {
    VectorMeta {
        status: ImageStatus::Done.as_str().to_string(),
        tags: tags_of(result),
    }
}

fn hit_of(rec: &ImageRecord, distance: f32) -> SearchHit {
    let (description, tags) = match &rec.result {
        Some(r) => (
            r.analysis
                .get("description")
                .and_then(|d| d.as_str())
                .map(str::to_string),
            tags_of(r),
        ),
        None => (None, Vec::new()),
    };
    SearchHit {
        image_id: rec.image_id.clone(),
        distance,
        description,
        tags,
        resized_key: rec.resized_key.clone(),
        thumbnail_url: None,
    }
}

/// Lowercased words of two letters or more.
fn words_of(text: &str) -> Vec<String> {
    let mut seen = BTreeMap::new();
    for w in text
        .split(|c: char| !c.is_alphanumeric())
        .map(|w| w.to_lowercase())
        .filter(|w| w.chars().count() >= 2)
    {
        seen.entry(w).or_insert(());
    }
    seen.into_keys().collect()
}

/// Share of the query words found in the analysis (a word found in the tags counts 2, in the
/// other text 1; normalised to 0..=1).
fn keyword_score(words: &[String], result: &AnalysisResult) -> f32 {
    let tags: HashSet<String> = tags_of(result).iter().flat_map(|t| words_of(t)).collect();
    let mut strings = Vec::new();
    analysis_strings(&result.analysis, &mut strings);
    let text: HashSet<String> = strings.iter().flat_map(|s| words_of(s)).collect();
    let got: f32 = words
        .iter()
        .map(|w| {
            if tags.contains(w) {
                2.0
            } else if text.contains(w) {
                1.0
            } else {
                0.0
            }
        })
        .sum();
    got / (2.0 * words.len() as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(analysis: serde_json::Value) -> AnalysisResult {
        serde_json::from_value(serde_json::json!({
            "provider": "local", "model": "m", "analysis": analysis,
            "usage": {"input_tokens": 0, "output_tokens": 0}, "cost_usd": 0.0, "cached": false,
            "idempotency_key": "k", "prompt_version": "v1", "price_version": "p",
            "completed_at": "2026-11-30T00:00:00.000Z"
        }))
        .unwrap()
    }

    #[test]
    fn keyword_score_counts_tags_double_and_ignores_case_and_punctuation() {
        let r = result(serde_json::json!({
            "description": "A pair of RED running shoes.",
            "tags": ["Shoes", "sport"],
        }));
        let words = words_of("red shoes!");
        // "red" in the description (1), "shoes" in the tags (2), of 4.
        assert!((keyword_score(&words, &r) - 0.75).abs() < 1e-6);
        assert_eq!(keyword_score(&words_of("cat"), &r), 0.0);
    }

    #[test]
    fn words_are_deduplicated_and_short_ones_dropped() {
        assert_eq!(words_of("a Red red, shoe"), ["red", "shoe"]);
    }

    #[test]
    fn top_is_bounded() {
        assert!(check_top(0).is_err());
        assert!(check_top(MAX_TOP_K + 1).is_err());
        assert_eq!(check_top(10).unwrap(), 10);
    }
}
