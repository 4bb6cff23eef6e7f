//! The HTTP API: one axum router for the api Lambda and `sightline serve`.
//!
//! Every /v1 route except health needs an API key (`x-api-key` or `Authorization: Bearer`);
//! the key maps to a tenant, and a tenant never sees another tenant's images (404).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use sightline_core::budget::{BudgetCaps, Counted, Periods};
use sightline_core::keys::upload_key;
use sightline_core::model::{Detail, ImageRecord, ImageStatus, Lane};
use tracing::error;

use crate::ports::{rfc3339, Clock, CostRow, Presigner, PutImage, Repository, StoreError};
use crate::settings::{OverBudget, Settings};

/// Every route of the router (method, path), for the OpenAPI consistency test.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("POST", "/v1/uploads"),
    ("GET", "/v1/images"),
    ("GET", "/v1/images/{id}"),
    ("DELETE", "/v1/images/{id}"),
    ("POST", "/v1/images/{id}/analyze"),
    ("GET", "/v1/images/{id}/similar"),
    ("GET", "/v1/search"),
    ("POST", "/v1/search"),
    ("GET", "/v1/costs"),
    ("GET", "/v1/batches"),
    ("POST", "/v1/generations"),
    ("GET", "/v1/generations"),
    ("GET", "/v1/generations/{id}"),
    ("GET", "/v1/webhooks/deliveries"),
    ("POST", "/v1/webhooks/deliveries/{id}/redeliver"),
    ("PUT", "/v1/tenants/{tenant}/budget"),
    ("DELETE", "/v1/tenants/{tenant}/budget"),
];

#[derive(Clone)]
pub struct ApiState {
    pub repo: Arc<dyn Repository>,
    pub presigner: Arc<dyn Presigner>,
    pub settings: Arc<Settings>,
    pub clock: Arc<dyn Clock>,
    /// The batch lane's records (`GET /v1/batches`); None: the list is empty.
    pub batches: Option<Arc<dyn crate::ports::BatchStore>>,
    /// Similarity and text search; None: those routes answer 503.
    pub search: Option<Arc<crate::search::Search>>,
    /// Where originals and resized images live (deleting an image deletes them).
    pub blobs: Arc<dyn crate::ports::BlobStore>,
    /// Generation jobs; None: their routes answer 503.
    pub generations: Option<Arc<crate::generation::Generations>>,
    /// Webhook deliveries (redeliver); None: 503.
    pub deliveries: Option<crate::delivery::Deliveries>,
}

mod generations;

/// The API with a JSON 404 for anything else (the api Lambda).
pub fn router(state: ApiState) -> Router {
    routes(state).fallback(not_found)
}

/// The API routes alone, for merging into a larger app (`sightline serve` adds the widget).
pub fn routes(state: ApiState) -> Router {
    // A query image may be as large as an upload (axum's default body limit is 2 MB; behind API
    // Gateway and Lambda the request is capped at 6 MB anyway).
    let search_body_limit =
        usize::try_from(state.settings.prepare.max_input_bytes.saturating_add(1))
            .unwrap_or(usize::MAX);
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/uploads", post(create_upload))
        .route("/v1/images", get(list_images))
        .route("/v1/images/{id}", get(get_image).delete(delete_image))
        .route("/v1/images/{id}/analyze", post(reanalyze))
        .route("/v1/images/{id}/similar", get(similar))
        .route(
            "/v1/search",
            get(search_text)
                .post(search_image)
                .layer(axum::extract::DefaultBodyLimit::max(search_body_limit)),
        )
        .route("/v1/costs", get(costs))
        .route("/v1/batches", get(list_batches))
        .route(
            "/v1/generations",
            post(generations::create).get(generations::list),
        )
        .route("/v1/generations/{id}", get(generations::get))
        .route("/v1/webhooks/deliveries", get(generations::deliveries))
        .route(
            "/v1/webhooks/deliveries/{id}/redeliver",
            post(generations::redeliver),
        )
        .route(
            "/v1/tenants/{tenant}/budget",
            put(put_tenant_budget).delete(delete_tenant_budget),
        )
        // JSON, not axum's plain-text defaults, for unknown /v1 paths and wrong methods.
        .route("/v1/{*rest}", any(not_found))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A JSON error: `{"error": {"code", "message"}}`; 500s never carry internals.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such image")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Transient(_) => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "throttled",
                "the service is busy; retry shortly",
            ),
            StoreError::NotFound(_) => ApiError::not_found(),
            StoreError::InvalidInput(m) => ApiError::bad_request(m),
            other => {
                error!(error = %other, "storage error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

/// A body axum could not read (over the size limit, or unreadable) as a JSON error: its own
/// answer is plain text.
fn body_error(e: BytesRejection) -> ApiError {
    let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        "too_large"
    } else {
        "bad_request"
    };
    ApiError::new(e.status(), code, e.body_text())
}

/// Query strings axum cannot parse become JSON 400s.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))
}

/// sha256 hex of an API key, as stored.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

async fn tenant(state: &ApiState, headers: &HeaderMap) -> Result<String, ApiError> {
    // An empty x-api-key (some clients always send the header) does not hide a Bearer key.
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .or_else(|| {
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| {
                    v.strip_prefix("Bearer ")
                        .or_else(|| v.strip_prefix("bearer "))
                })
                .map(str::trim)
                .filter(|k| !k.is_empty())
        })
        .ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing API key")
        })?;
    state
        .repo
        .tenant_for_key(&hash_api_key(key))
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "invalid API key"))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadRequest {
    #[serde(default)]
    filename: Option<String>,
    content_type: String,
    content_length: u64,
    /// Image detail for this image (`low`, `high`, `auto`); default: the tenant's setting.
    #[serde(default)]
    detail: Option<Detail>,
    /// `realtime` or `batch` (half price, within 24 h); default: the settings' lane rule.
    #[serde(default)]
    lane: Option<Lane>,
}

#[derive(Debug, Serialize)]
struct UploadResponse {
    image_id: String,
    key: String,
    upload: crate::ports::PresignedUpload,
}

fn extension_for(content_type: &str) -> Option<&'static str> {
    match content_type {
        "image/jpeg" | "image/jpg" => Some("jpg"),
        "image/png" => Some("png"),
        "image/webp" => Some("webp"),
        "image/gif" => Some("gif"),
        _ => None,
    }
}

async fn create_upload(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<UploadResponse>), ApiError> {
    let tenant = tenant(&state, &headers).await?;
    // The request is a small JSON document; axum's body limit answers in plain text.
    let body = body.map_err(body_error)?;
    let req: UploadRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let ext = extension_for(&req.content_type).ok_or_else(|| {
        ApiError::bad_request(format!(
            "unsupported content_type {:?}; use image/jpeg, image/png, image/webp or image/gif",
            req.content_type
        ))
    })?;
    if req.content_length == 0 {
        return Err(ApiError::bad_request("content_length must be > 0"));
    }
    let max = state.settings.prepare.max_input_bytes;
    if req.content_length > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "content_length {} is over the {max}-byte limit",
                req.content_length
            ),
        ));
    }
    if req.filename.as_ref().is_some_and(|f| f.len() > 1024) {
        return Err(ApiError::bad_request("filename is longer than 1024 bytes"));
    }
    let image_id = uuid::Uuid::now_v7().to_string();
    let key = upload_key(&tenant, &image_id, ext);
    let upload = state
        .presigner
        .presign_put(
            &key,
            &req.content_type,
            req.content_length,
            state.settings.upload_ttl,
        )
        .await?;
    let now = rfc3339(state.clock.now_ms());
    let record = ImageRecord {
        detail: req.detail,
        // Decided now by the one rule (request, key prefix, default), so the record says its
        // lane from the start (the widget follows it).
        lane: Some(state.settings.lane_for(req.lane, &key)),
        ..ImageRecord::pending(
            &tenant,
            &image_id,
            req.filename.unwrap_or_else(|| key.clone()),
            key.clone(),
            &now,
        )
    };
    // If no upload ever arrives, or it arrives and its resize is lost, the reconciler looks
    // at the image once the URL has expired.
    let recheck = state.clock.now_ms()
        + (state.settings.upload_ttl + state.settings.reconcile_after).as_millis() as u64;
    state.repo.put_image(&record, Some(recheck)).await?;
    Ok((
        StatusCode::CREATED,
        Json(UploadResponse {
            image_id,
            key,
            upload,
        }),
    ))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Path parameters axum cannot decode (invalid UTF-8 such as `%FF`) become JSON 400s.
fn path_param<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::bad_request(format!("invalid path: {}", e.body_text())))
}

async fn get_image(
    State(state): State<ApiState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ImageRecord>, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let id = path_param(id)?;
    if !valid_id(&id) {
        return Err(ApiError::not_found());
    }
    state
        .repo
        .get_image(&tenant, &id)
        .await?
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

/// `DELETE /v1/images/{id}`: the record, its original and resized images and its vectors go;
/// the ledger keeps what was paid. Deleting twice answers 404 the second time.
async fn delete_image(
    State(state): State<ApiState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let id = path_param(id)?;
    if !valid_id(&id) {
        return Err(ApiError::not_found());
    }
    let record = state
        .repo
        .get_image(&tenant, &id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    crate::search::delete_image(
        state.repo.as_ref(),
        state.blobs.as_ref(),
        state.search.as_deref(),
        &record,
    )
    .await
    .map_err(search_error)?;
    Ok(StatusCode::NO_CONTENT)
}

fn search_error(e: crate::search::SearchError) -> ApiError {
    use crate::search::SearchError as E;
    match e {
        E::NoImage(_) => ApiError::not_found(),
        E::NoVector(m) => ApiError::new(
            StatusCode::CONFLICT,
            "no_vector",
            format!("image {m} has no vector yet: it is not analysed, or it was analysed before the embedder was set (`sightline reindex`)"),
        ),
        E::Off => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "search_off",
            "similarity search is off here (embedder = off)",
        ),
        E::BadRequest(m) => ApiError::bad_request(m),
        E::Provider(p) => {
            error!(error = %p, "embedding provider");
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "provider",
                format!("the embedding provider failed: {}", p.message),
            )
        }
        E::Store(s) => s.into(),
    }
}

/// How long a thumbnail URL in a search answer lasts.
const THUMBNAIL_TTL: std::time::Duration = std::time::Duration::from_secs(900);

/// Give each hit a short-lived URL of its resized image (the widget shows them). A hit whose
/// URL cannot be made keeps none.
async fn with_thumbnails(
    state: &ApiState,
    mut found: crate::search::SearchResults,
) -> Json<crate::search::SearchResults> {
    for hit in &mut found.results {
        if let Some(key) = &hit.resized_key {
            hit.thumbnail_url = state.presigner.presign_get(key, THUMBNAIL_TTL).await.ok();
        }
    }
    Json(found)
}

fn search_of(state: &ApiState) -> Result<&crate::search::Search, ApiError> {
    state
        .search
        .as_deref()
        .ok_or_else(|| search_error(crate::search::SearchError::Off))
}

/// `top` from a query string: 1..=100, default 10; other keys are refused.
fn top_param(q: &BTreeMap<String, String>, allowed: &[&str]) -> Result<usize, ApiError> {
    for k in q.keys() {
        if k != "top" && !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}"
            )));
        }
    }
    match q.get("top") {
        None => Ok(10),
        Some(t) => t
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=crate::ports::MAX_TOP_K).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "top must be an integer from 1 to {}",
                    crate::ports::MAX_TOP_K
                ))
            }),
    }
}

/// `GET /v1/images/{id}/similar?top=`: the tenant's images nearest to this one.
async fn similar(
    State(state): State<ApiState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<crate::search::SearchResults>, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let id = path_param(id)?;
    let q = query(q)?;
    if !valid_id(&id) {
        return Err(ApiError::not_found());
    }
    let top = top_param(&q, &[])?;
    let found = search_of(&state)?
        .similar(&tenant, &id, top)
        .await
        .map_err(search_error)?;
    Ok(with_thumbnails(&state, found).await)
}

/// `GET /v1/search?q=&top=`: a text query (vector or keyword mode, said in the answer).
async fn search_text(
    State(state): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<crate::search::SearchResults>, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let q = query(q)?;
    let top = top_param(&q, &["q"])?;
    let text = q
        .get("q")
        .ok_or_else(|| ApiError::bad_request("q is required"))?;
    let found = search_of(&state)?
        .text(&tenant, text, top)
        .await
        .map_err(search_error)?;
    Ok(with_thumbnails(&state, found).await)
}

/// `POST /v1/search?top=` with an image as the body: the tenant's images nearest to it.
async fn search_image(
    State(state): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<crate::search::SearchResults>, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let q = query(q)?;
    let top = top_param(&q, &[])?;
    let body = body.map_err(body_error)?;
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "send the query image as the request body",
        ));
    }
    let max = state.settings.prepare.max_input_bytes;
    if body.len() as u64 > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the image is over the {max}-byte limit"),
        ));
    }
    let found = search_of(&state)?
        .similar_to_image(&tenant, &body, top)
        .await
        .map_err(search_error)?;
    Ok(with_thumbnails(&state, found).await)
}

/// `POST /v1/images/{id}/analyze`: analyse a failed image again, on the lane asked for.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReanalyzeRequest {
    /// Default: the lane the image had.
    #[serde(default)]
    lane: Option<Lane>,
}

/// A failed image goes back to `queued` with a recheck due now: the reconciler sends its job
/// on its next sweep (the one path that (re)sends jobs), on the lane asked for. An image that is
/// done, still queued or never uploaded is refused (409): analysing it again would only wait
/// for or pay for what is already under way, or has nothing to analyse.
async fn reanalyze(
    State(state): State<ApiState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ImageRecord>), ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let id = path_param(id)?;
    if !valid_id(&id) {
        return Err(ApiError::not_found());
    }
    let body = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let req: ReanalyzeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ReanalyzeRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
    let mut record = state
        .repo
        .get_image(&tenant, &id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let conflict = |message: String| ApiError::new(StatusCode::CONFLICT, "conflict", message);
    match record.status {
        ImageStatus::Failed if record.resized_key.is_some() && record.sha256.is_some() => {}
        ImageStatus::Failed => {
            return Err(conflict(
                "the image itself could not be prepared; upload it again".into(),
            ))
        }
        ImageStatus::Done => {
            return Err(conflict(
                "the image is analysed; the same bytes, model and prompt would be answered from the cache".into(),
            ))
        }
        ImageStatus::Queued => {
            return Err(conflict(
                "the image is queued for analysis already".into(),
            ))
        }
        ImageStatus::Pending => return Err(conflict("the image was not uploaded yet".into())),
    }
    let now = state.clock.now_ms();
    record.status = ImageStatus::Queued;
    record.error = None;
    record.permanent_failure = false;
    record.lane = req.lane.or(record.lane);
    record.updated_at = rfc3339(now);
    match state.repo.put_image(&record, Some(now)).await? {
        PutImage::Stored => Ok((StatusCode::ACCEPTED, Json(record))),
        PutImage::HasResult | PutImage::OtherUpload => Err(conflict(
            "the image changed meanwhile; look at it again".into(),
        )),
    }
}

async fn list_images(
    State(state): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<crate::ports::ImagePage>, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let q = query(q)?;
    for k in q.keys() {
        if !matches!(k.as_str(), "status" | "limit" | "cursor") {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}"
            )));
        }
    }
    let status = q
        .get("status")
        .map(|s| {
            ImageStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "status must be pending, queued, done or failed, not {s:?}"
                ))
            })
        })
        .transpose()?;
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100).contains(n))
            .ok_or_else(|| ApiError::bad_request("limit must be an integer from 1 to 100"))?,
    };
    let cursor = q.get("cursor").map(String::as_str);
    let page = state
        .repo
        .list_images(&tenant, status, limit, cursor)
        .await?;
    Ok(Json(page))
}

/// `GET /v1/batches?state=open|all&limit=N`: the tenant's batches, newest first.
async fn list_batches(
    State(state): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let q = query(q)?;
    for k in q.keys() {
        if !matches!(k.as_str(), "state" | "limit") {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}"
            )));
        }
    }
    let open_only = match q.get("state").map(String::as_str) {
        None | Some("all") => false,
        Some("open") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "state must be open or all, not {other:?}"
            )))
        }
    };
    let limit = match q.get("limit") {
        None => 50,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::bad_request("limit must be an integer from 1 to 1000"))?,
    };
    let batches = match &state.batches {
        Some(store) => store.list_batches(Some(&tenant), open_only, limit).await?,
        None => Vec::new(),
    };
    Ok(Json(json!({ "batches": batches })))
}

/// Totals over a set of ledger rows.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CostTotals {
    pub images: u64,
    pub cached_images: u64,
    /// Provider calls paid for.
    pub calls: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Everything paid: `reported_cost_usd + cost_at_estimate_usd`.
    pub cost_usd: f64,
    /// Paid at the usage the provider reported.
    pub reported_cost_usd: f64,
    /// The pre-call estimates of the same images.
    pub estimated_cost_usd: f64,
    /// Paid calls whose usage could not be read, booked at their estimate.
    pub calls_at_estimate: u64,
    pub cost_at_estimate_usd: f64,
}

impl CostTotals {
    fn add(&mut self, r: &CostRow) {
        self.images += r.images;
        self.cached_images += r.cached_images;
        self.calls += r.calls;
        self.input_tokens += r.input_tokens;
        self.output_tokens += r.output_tokens;
        self.cost_usd += r.cost_usd;
        self.reported_cost_usd += r.cost_usd - r.cost_at_estimate_usd;
        self.estimated_cost_usd += r.estimated_cost_usd;
        self.calls_at_estimate += r.calls_at_estimate;
        self.cost_at_estimate_usd += r.cost_at_estimate_usd;
    }
}

/// The cost report served by GET /v1/costs and printed by `sightline costs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostReport {
    pub from: String,
    pub to: String,
    pub total: CostTotals,
    pub by_model: Vec<serde_json::Value>,
    pub by_day: Vec<serde_json::Value>,
    pub rows: Vec<CostRow>,
    /// The analysis money split by lane, and what the batch lane saved against real-time prices.
    #[serde(default)]
    pub by_lane: LaneCosts,
    /// The money split by what it bought (analyses, embeddings), and what near-duplicate skip
    /// spared.
    #[serde(default)]
    pub by_kind: KindCosts,
    /// The tenant's caps and what counts against them now (today and this month, UTC).
    #[serde(default)]
    pub budget: BudgetReport,
}

/// One lane's part of the cost report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LaneTotals {
    pub images: u64,
    pub calls: u64,
    pub cost_usd: f64,
}

/// Cost by lane: the batch lane's lines are priced at batch prices; `batch_saved_usd` is what
/// the same usage would have cost more in real time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LaneCosts {
    pub realtime: LaneTotals,
    pub batch: LaneTotals,
    pub batch_saved_usd: f64,
}

/// Cost by what it bought; `reused_*`: near-duplicates that reused an analysis at $0, and the
/// estimates of the calls they spared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct KindCosts {
    pub analysis: LaneTotals,
    pub embedding: LaneTotals,
    #[serde(default)]
    pub generation: LaneTotals,
    pub reused_images: u64,
    pub reused_saved_usd: f64,
}

impl KindCosts {
    fn add(&mut self, r: &CostRow) {
        let part = match r.kind {
            crate::ports::LedgerKind::Analysis => &mut self.analysis,
            crate::ports::LedgerKind::Embedding => &mut self.embedding,
            crate::ports::LedgerKind::Generation => &mut self.generation,
        };
        part.images += r.images;
        part.calls += r.calls;
        part.cost_usd += r.cost_usd;
        self.reused_images += r.reused_images;
        self.reused_saved_usd += r.reused_saved_usd;
    }
}

impl LaneCosts {
    fn add(&mut self, r: &CostRow) {
        // Lanes are how analyses are paid; embeddings and generated images have none.
        if r.kind != crate::ports::LedgerKind::Analysis {
            return;
        }
        self.batch.images += r.batch_images;
        self.batch.calls += r.batch_calls;
        self.batch.cost_usd += r.batch_cost_usd;
        self.batch_saved_usd += r.batch_saved_usd;
        self.realtime.images += r.images.saturating_sub(r.batch_images);
        self.realtime.calls += r.calls.saturating_sub(r.batch_calls);
        self.realtime.cost_usd += r.cost_usd - r.batch_cost_usd;
    }
}

/// One budget period: its cap (None = uncapped), the money the ledger booked in it and the
/// money held by calls in flight.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeriodBudget {
    /// YYYY-MM-DD or YYYY-MM (UTC).
    pub period: String,
    pub cap_usd: Option<f64>,
    pub spent_usd: f64,
    pub reserved_usd: f64,
    /// cap − spent − reserved, never below 0 (None when uncapped).
    pub remaining_usd: Option<f64>,
}

/// A tenant's budget position.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BudgetReport {
    /// `tenant` (its own budget item) or `settings` (budget_daily_usd / budget_monthly_usd).
    pub source: String,
    /// `wait` or `fail`: what a job over budget does.
    pub over_budget: String,
    pub daily: PeriodBudget,
    pub monthly: PeriodBudget,
}

/// The budget position of `tenant` at `now_ms`: its own caps, else the settings'.
pub async fn budget_report(
    repo: &dyn Repository,
    settings: &Settings,
    tenant: &str,
    now_ms: u64,
) -> Result<BudgetReport, StoreError> {
    let own = repo.tenant_budget(tenant).await?;
    let (source, caps) = match own {
        Some(c) => ("tenant", c),
        None => ("settings", settings.budget),
    };
    let periods = Periods::at(now_ms);
    let counts = repo.budget_counts(tenant, &periods, now_ms).await?;
    let period = |name: &str, cap: Option<f64>, c: Counted| PeriodBudget {
        period: name.to_string(),
        cap_usd: cap,
        spent_usd: c.spent_usd,
        reserved_usd: c.reserved_usd,
        remaining_usd: cap.map(|cap| (cap - c.spent_usd - c.reserved_usd).max(0.0)),
    };
    Ok(BudgetReport {
        source: source.to_string(),
        over_budget: match settings.over_budget {
            OverBudget::Wait => "wait".into(),
            OverBudget::Fail => "fail".into(),
        },
        daily: period(&periods.day, caps.daily(), counts.day),
        monthly: period(&periods.month, caps.monthly(), counts.month),
    })
}

pub fn cost_report(from: &str, to: &str, rows: Vec<CostRow>) -> CostReport {
    let mut total = CostTotals::default();
    let mut by_model: BTreeMap<String, CostTotals> = BTreeMap::new();
    let mut by_day: BTreeMap<String, CostTotals> = BTreeMap::new();
    let mut by_lane = LaneCosts::default();
    let mut by_kind = KindCosts::default();
    for r in &rows {
        total.add(r);
        by_lane.add(r);
        by_kind.add(r);
        by_model.entry(r.model.clone()).or_default().add(r);
        by_day.entry(r.day.clone()).or_default().add(r);
    }
    let flatten = |label: &str, k: String, t: CostTotals| {
        let mut v = serde_json::to_value(t).unwrap_or_else(|_| json!({}));
        if let Some(o) = v.as_object_mut() {
            o.insert(label.to_string(), json!(k));
        }
        v
    };
    CostReport {
        from: from.to_string(),
        to: to.to_string(),
        total,
        by_model: by_model
            .into_iter()
            .map(|(k, t)| flatten("model", k, t))
            .collect(),
        by_day: by_day
            .into_iter()
            .map(|(k, t)| flatten("day", k, t))
            .collect(),
        rows,
        by_lane,
        by_kind,
        budget: BudgetReport::default(),
    }
}

/// A real calendar date written YYYY-MM-DD (2026-02-30 is not one).
fn valid_day(s: &str) -> bool {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    s.len() == 10 && time::Date::parse(s, &format).is_ok()
}

/// Default window: the last 30 days up to today (UTC).
pub fn default_window(now_ms: u64) -> (String, String) {
    let to = rfc3339(now_ms)[..10].to_string();
    let from = rfc3339(now_ms.saturating_sub(29 * 86_400_000))[..10].to_string();
    (from, to)
}

async fn costs(
    State(state): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<CostReport>, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let q = query(q)?;
    for k in q.keys() {
        if !matches!(k.as_str(), "from" | "to") {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}"
            )));
        }
    }
    let (dfrom, dto) = default_window(state.clock.now_ms());
    let from = q.get("from").cloned().unwrap_or(dfrom);
    let to = q.get("to").cloned().unwrap_or(dto);
    if !valid_day(&from) || !valid_day(&to) {
        return Err(ApiError::bad_request(
            "from and to must be dates like 2026-01-31",
        ));
    }
    if from > to {
        return Err(ApiError::bad_request("from must not be after to"));
    }
    let rows = state.repo.costs(&tenant, &from, &to).await?;
    let mut report = cost_report(&from, &to, rows);
    report.budget =
        budget_report(&*state.repo, &state.settings, &tenant, state.clock.now_ms()).await?;
    Ok(Json(report))
}

/// The admin key's check: sha256 of both sides compared without an early exit, so the time
/// taken says nothing about how much of a guess was right (nor about the key's length).
fn admin(state: &ApiState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = state.settings.admin_api_key.as_deref() else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "no admin key is configured",
        ));
    };
    let given = headers
        .get("x-admin-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(expected.as_bytes()),
    );
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    if given.is_empty() || diff != 0 {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or invalid admin key",
        ));
    }
    Ok(())
}

/// A tenant's own caps, as PUT: USD amounts, 0 or null for "no cap on this period".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetRequest {
    #[serde(default)]
    daily_usd: Option<f64>,
    #[serde(default)]
    monthly_usd: Option<f64>,
}

fn tenant_param(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let tenant = path_param(p)?;
    if !valid_id(&tenant) {
        return Err(ApiError::bad_request("invalid tenant"));
    }
    Ok(tenant)
}

/// PUT /v1/tenants/{tenant}/budget (admin key): set the tenant's own caps, which override
/// the deployment's settings; answers with the tenant's budget position.
async fn put_tenant_budget(
    State(state): State<ApiState>,
    headers: HeaderMap,
    tenant: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BudgetReport>, ApiError> {
    admin(&state, &headers)?;
    let tenant = tenant_param(tenant)?;
    let body = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let req: BudgetRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    for v in [req.daily_usd, req.monthly_usd].into_iter().flatten() {
        if !v.is_finite() || v < 0.0 {
            return Err(ApiError::bad_request(
                "daily_usd and monthly_usd must be amounts of 0 or more (0 or null = no cap)",
            ));
        }
    }
    let caps =
        BudgetCaps::from_amounts(req.daily_usd.unwrap_or(0.0), req.monthly_usd.unwrap_or(0.0));
    state.repo.set_tenant_budget(&tenant, Some(&caps)).await?;
    let report =
        budget_report(&*state.repo, &state.settings, &tenant, state.clock.now_ms()).await?;
    Ok(Json(report))
}

/// DELETE /v1/tenants/{tenant}/budget (admin key): the tenant falls back to the settings.
async fn delete_tenant_budget(
    State(state): State<ApiState>,
    headers: HeaderMap,
    tenant: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    admin(&state, &headers)?;
    let tenant = tenant_param(tenant)?;
    state.repo.set_tenant_budget(&tenant, None).await?;
    Ok(StatusCode::NO_CONTENT)
}
