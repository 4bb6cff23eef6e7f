//! `sightline serve`: the api Lambda's router, local presigned uploads, the widget,
//! in-process workers and the reconciler, on one port; `GET /metrics` tells what they counted.

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::json;
use sightline_core::keys::{parse_upload_key, UPLOAD_PREFIX};
use sightline_core::model::ImageStatus;
use sightline_pipeline::http::{hash_api_key, method_not_allowed, routes, ApiError, ApiState};
use sightline_pipeline::local::{LocalPresigner, TokenUse};
use sightline_pipeline::metrics::prometheus::{self, write_gauge};
use sightline_pipeline::metrics::Metric;
use sightline_pipeline::ports::{rfc3339, Presigner};
use tokio::sync::watch;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;
use tracing::{error, info, warn};

use crate::app::{LocalApp, ANALYZE_QUEUE, LOCAL_TENANT};

/// The widget page is served under a strict CSP: same-origin scripts and WASM only.
pub const CSP: &str = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; img-src 'self' blob: data:; \
connect-src 'self'; worker-src 'self'; style-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The API key a fresh data dir starts with when `serve` is given none.
pub const DEFAULT_API_KEY: &str = "sightline-local-key";

/// File in the data dir holding the upload-URL signing secret (so URLs survive a restart).
const SECRET_FILE: &str = "upload-secret";

#[derive(Clone)]
struct UploadState {
    app: LocalApp,
    presigner: LocalPresigner,
}

/// Where the widget's files are: `--web-dir`, else ./wasm-client, else next to the sources.
pub fn default_web_dir() -> PathBuf {
    let cwd = PathBuf::from("wasm-client");
    if cwd.join("www").is_dir() {
        return cwd;
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../wasm-client"))
}

/// The data dir's upload signing secret, created (owner-only) on first use.
pub fn upload_secret(data_dir: &FsPath) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let secret = hex::decode(text.trim())
                .with_context(|| format!("{} is not a hex secret", path.display()))?;
            anyhow::ensure!(
                secret.len() >= 32,
                "{} holds a secret shorter than 32 bytes",
                path.display()
            );
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)?;
            let secret: [u8; 32] = rand::random();
            write_private(&path, hex::encode(secret).as_bytes())?;
            // Two processes may start at once: whoever wrote first wins, both read it back.
            upload_secret_read(&path)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn upload_secret_read(path: &FsPath) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path)?;
    Ok(hex::decode(text.trim())?)
}

/// Create a file readable by its owner only, failing if it exists.
fn write_private(path: &FsPath, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(mut f) => {
            f.write_all(bytes)?;
            f.sync_all()?;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Make `api_key` the local tenant's only key (`--api-key` given), or give a data dir without
/// keys the default one. Returns the key to print, if `serve` knows it.
pub async fn setup_api_key(app: &LocalApp, api_key: Option<&str>) -> anyhow::Result<String> {
    let now = rfc3339(app.clock.now_ms());
    match api_key {
        Some(key) => {
            let hash = hash_api_key(key);
            app.repo.add_api_key(&hash, LOCAL_TENANT, &now).await?;
            let me = sightline_pipeline::ports::api_key_id(&hash);
            for old in app.repo.list_api_keys(LOCAL_TENANT).await? {
                if old.id != me {
                    app.repo.revoke_api_key(LOCAL_TENANT, &old.id).await?;
                    info!(key_id = %old.id, "revoked the previous API key");
                }
            }
            Ok(key.to_string())
        }
        None => {
            if app.repo.list_api_keys(LOCAL_TENANT).await?.is_empty() {
                app.repo
                    .add_api_key(&hash_api_key(DEFAULT_API_KEY), LOCAL_TENANT, &now)
                    .await?;
                return Ok(DEFAULT_API_KEY.to_string());
            }
            Ok("(the data dir's existing key; see `sightline keys list`)".to_string())
        }
    }
}

/// Build the whole local app router (API + uploads + widget). `base_url` is what clients
/// use to reach this server (presigned URLs point at it).
pub async fn build_router(
    app: &LocalApp,
    base_url: &str,
    web_dir: PathBuf,
) -> anyhow::Result<Router> {
    let secret = upload_secret(app.config.data_dir())?;
    let presigner = LocalPresigner::new(secret, base_url, app.clock.clone());
    let presigner_port: Arc<dyn Presigner> = Arc::new(presigner.clone());
    let api = routes(ApiState {
        repo: app.repo.clone(),
        presigner: presigner_port,
        settings: Arc::new(app.config.settings.clone()),
        clock: app.clock.clone(),
        batches: Some(app.batch_store.clone()),
        search: Some(app.search.clone()),
        blobs: app.blobs.clone(),
        deliveries: Some(app.deliveries.clone()),
        generations: Some(app.generations.clone()),
    });
    let max_body = app.config.settings.prepare.max_input_bytes as usize + 1;
    let uploads = Router::new()
        .route("/local-upload/{token}", put(local_upload))
        .route("/local-download/{token}", get(local_download))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(UploadState {
            app: app.clone(),
            presigner,
        });
    let csp = SetResponseHeaderLayer::overriding(
        axum::http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    let web = Router::new()
        .nest_service("/pkg", ServeDir::new(web_dir.join("pkg")))
        .fallback_service(ServeDir::new(web_dir.join("www")))
        .layer(csp);
    let metrics = Router::new()
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app.clone());
    Ok(api.merge(uploads).merge(metrics).merge(web))
}

/// `GET /metrics`: what this process counted (the metric set the Lambdas write as EMF), in
/// Prometheus text format, and the local queue's depth. No API key, as usual for a metrics
/// endpoint: it tells counts, never content, and the server listens on loopback unless
/// `--addr` says otherwise.
async fn metrics(State(app): State<LocalApp>) -> Result<impl IntoResponse, ApiError> {
    let mut text = app.metrics.render();
    let queue = [("queue", ANALYZE_QUEUE)];
    let depth = app.queue.depth().await?;
    let dead = app.queue.dead_letters().await?.len();
    write_gauge(
        &mut text,
        "sightline_queue_messages",
        "Messages in the local analyze queue (visible or in flight).",
        &queue,
        depth as f64,
    );
    write_gauge(
        &mut text,
        "sightline_dead_letter_messages",
        "Messages of the local analyze queue that used up their receives.",
        &queue,
        dead as f64,
    );
    Ok((
        [(axum::http::header::CONTENT_TYPE, prometheus::CONTENT_TYPE)],
        text,
    ))
}

fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

fn used() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "upload_url_used",
        "this upload URL was already used; ask POST /v1/uploads for a new one",
    )
}

/// GET of a presigned local download URL (thumbnails of search results): the signed key's
/// bytes, while the URL lasts. Only resized images are ever signed for reading.
async fn local_download(
    State(st): State<UploadState>,
    token: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(token) =
        token.map_err(|e| forbidden(format!("invalid download URL: {}", e.body_text())))?;
    let grant = st
        .presigner
        .verify_download(&token)
        .map_err(|e| forbidden(e.to_string()))?;
    let bytes = st
        .app
        .blobs
        .get(
            &grant.read_key,
            st.app.config.settings.prepare.max_input_bytes,
        )
        .await?;
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "image/jpeg"),
            (axum::http::header::CACHE_CONTROL, "private, max-age=300"),
        ],
        bytes,
    )
        .into_response())
}

/// PUT to a presigned local URL: check signature, expiry, type and size; use the URL up;
/// store the original durably; acknowledge; then resize (like the S3 notification).
async fn local_upload(
    State(st): State<UploadState>,
    token: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(token) =
        token.map_err(|e| forbidden(format!("invalid upload URL: {}", e.body_text())))?;
    // Over the size limit (or unreadable) whatever the URL: axum's own answer is plain text.
    let body = body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_request"
        };
        ApiError::new(status, code, e.body_text())
    })?;
    let grant = st
        .presigner
        .verify(&token)
        .map_err(|e| forbidden(e.to_string()))?;
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct != grant.content_type {
        return Err(forbidden(format!(
            "content-type {ct:?} does not match the signed {:?}",
            grant.content_type
        )));
    }
    if body.len() as u64 != grant.content_length {
        return Err(forbidden(format!(
            "body is {} bytes; the URL was signed for {}",
            body.len(),
            grant.content_length
        )));
    }
    let app = &st.app;
    let Some(target) = parse_upload_key(&grant.key, UPLOAD_PREFIX) else {
        return Err(forbidden("the URL names no upload key"));
    };
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&body))
    };
    // An image that already has its bytes takes no others, whichever URL they come with; the
    // same bytes again are a retry of an upload that landed (its answer was lost).
    if let Some(rec) = app.repo.get_image(&target.tenant, &target.image_id).await? {
        if rec.status != ImageStatus::Pending {
            return match rec.original_sha256 {
                Some(first) if first == sha => Ok(Json(json!({"ok": true, "key": grant.key}))),
                _ => Err(used()),
            };
        }
    }
    let now = app.clock.now_ms();
    // The URL is bound to the first content it carries, before that content is stored: a
    // replay with other bytes is refused, a retry of the same bytes (say, after this server
    // died mid-write) stores them again.
    let token = app
        .db
        .use_upload_token(&grant.nonce, &sha, grant.expires_ms, now)
        .await?;
    if token == TokenUse::OtherContent {
        return Err(used());
    }
    app.blobs
        .put(&grant.key, body.to_vec(), &grant.content_type)
        .await?;
    // Stored durably. If this process dies before the resize below, the reconciler finds
    // the original once the recheck is due and resizes it.
    let recheck = now + app.config.settings.reconcile_after.as_millis() as u64;
    if let Err(e) = app
        .repo
        .set_recheck(&target.tenant, &target.image_id, Some(recheck))
        .await
    {
        warn!(error = %e, key = %grant.key, "could not schedule the upload's recheck");
    }
    let worker = app.clone();
    let key = grant.key.clone();
    tokio::spawn(async move {
        if let Err(e) = worker.ingest.ingest_key(&key).await {
            error!(error = %e, key, "resizing the upload failed; the reconciler will retry it");
        }
    });
    Ok(Json(json!({"ok": true, "key": grant.key})))
}

/// Sweep at start, then every `reconcile_every`, until `stop`.
async fn reconcile_loop(app: LocalApp, mut stop: watch::Receiver<bool>) {
    let every = app.config.settings.reconcile_every;
    loop {
        match app.reconciler.sweep(10_000).await {
            Ok(report) => {
                let requeued = report.requeued as f64;
                let metrics = &app.reconciler.ingest.metrics;
                metrics.record(Metric::JobsRequeued, None, requeued);
            }
            Err(e) => warn!(error = %e, "reconciler sweep failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Webhook attempts are due at seconds' notice (the schedule starts at 5 s): look often.
const DELIVERY_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Attempt due webhook deliveries every second, and sweep generation jobs with the
/// reconciler's period, until `stop`.
async fn generation_loop(app: LocalApp, mut stop: watch::Receiver<bool>) {
    let every = app.config.settings.reconcile_every;
    let mut last_sweep: Option<std::time::Instant> = None;
    loop {
        if last_sweep.is_none_or(|t| t.elapsed() >= every) {
            match app.generations.sweep().await {
                Ok(report) if report != Default::default() => info!(?report, "generation sweep"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "generation sweep failed"),
            }
            last_sweep = Some(std::time::Instant::now());
        }
        match app.deliveries.deliver_due(100).await {
            Ok(report) if report.attempted > 0 => info!(?report, "webhook deliveries"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "webhook deliveries failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(DELIVERY_POLL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Poll open batches and submit what is due every `batch_poll_secs`, until `stop`.
async fn batch_loop(app: LocalApp, mut stop: watch::Receiver<bool>) {
    let Some(lane) = app.batch.clone() else {
        return;
    };
    let every = app.config.settings.batch_poll_every;
    loop {
        match lane.tick(false).await {
            Ok(report) if report != Default::default() => info!(?report, "batch lane"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "batch lane tick failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Run the server until Ctrl-C.
pub async fn serve(
    app: LocalApp,
    addr: SocketAddr,
    api_key: Option<&str>,
    web_dir: PathBuf,
) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening on a non-loopback address: the API (and /metrics, which needs no key) is reachable from the network");
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let base_url = format!("http://{local}");
    let shown_key = setup_api_key(&app, api_key).await?;
    let router = build_router(&app, &base_url, web_dir).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let instance = app.start_instance(stop_rx.clone()).await?;
    let workers = tokio::spawn(app.workers(None).run(stop_rx.clone()));
    let batches = tokio::spawn(batch_loop(app.clone(), stop_rx.clone()));
    let generators = tokio::spawn(app.generation_workers(None).run(stop_rx.clone()));
    let generation = tokio::spawn(generation_loop(app.clone(), stop_rx.clone()));
    let reconciler = tokio::spawn(reconcile_loop(app.clone(), stop_rx));
    info!(url = %base_url, "sightline serve is listening");
    eprintln!("sightline serve: {base_url}/  (API key: {shown_key})");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    let _ = stop_tx.send(true);
    let _ = workers.await;
    let _ = reconciler.await;
    let _ = batches.await;
    let _ = generators.await;
    let _ = generation.await;
    let _ = instance.await;
    Ok(())
}
