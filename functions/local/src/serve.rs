//! `sightline serve`: the api Lambda's router, local presigned uploads, the widget and
//! in-process workers, on one port.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::put;
use axum::{Json, Router};
use serde_json::json;
use sightline_pipeline::http::{hash_api_key, routes, ApiError, ApiState};
use sightline_pipeline::local::LocalPresigner;
use sightline_pipeline::ports::Presigner;
use tokio::sync::watch;
use tower_http::services::ServeDir;
use tower_http::set_header::SetResponseHeaderLayer;
use tracing::{error, info};

use crate::app::{LocalApp, LOCAL_TENANT};

/// The widget page is served under a strict CSP: same-origin scripts and WASM only.
pub const CSP: &str = "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; img-src 'self' blob: data:; \
connect-src 'self'; worker-src 'self'; style-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

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

/// Build the whole local app router (API + uploads + widget). `base_url` is what clients
/// use to reach this server (presigned URLs point at it).
pub async fn build_router(
    app: &LocalApp,
    base_url: &str,
    api_key: &str,
    web_dir: PathBuf,
) -> anyhow::Result<Router> {
    app.repo
        .put_api_key(&hash_api_key(api_key), LOCAL_TENANT)
        .await?;
    let secret: [u8; 32] = rand::random();
    let presigner = LocalPresigner::new(secret.to_vec(), base_url, app.clock.clone());
    let presigner_port: Arc<dyn Presigner> = Arc::new(presigner.clone());
    let api = routes(ApiState {
        repo: app.repo.clone(),
        presigner: presigner_port,
        settings: Arc::new(app.config.settings.clone()),
        clock: app.clock.clone(),
    });
    let max_body = app.config.settings.prepare.max_input_bytes as usize + 1;
    let uploads = Router::new()
        .route("/local-upload/{token}", put(local_upload))
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
    Ok(api.merge(uploads).merge(web))
}

/// PUT to a presigned local URL: check signature, expiry, type and size, store, then resize.
async fn local_upload(
    State(st): State<UploadState>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let grant = st
        .presigner
        .verify(&token)
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()))?;
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct != grant.content_type {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "content-type {ct:?} does not match the signed {:?}",
                grant.content_type
            ),
        ));
    }
    if body.len() as u64 != grant.content_length {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "body is {} bytes; the URL was signed for {}",
                body.len(),
                grant.content_length
            ),
        ));
    }
    st.app
        .blobs
        .put(&grant.key, body.to_vec(), &grant.content_type)
        .await
        .map_err(ApiError::from)?;
    // Like the S3 notification: resizing happens after the upload has been accepted.
    let app = st.app.clone();
    let key = grant.key.clone();
    tokio::spawn(async move {
        if let Err(e) = app.ingest.ingest_keys(std::slice::from_ref(&key)).await {
            error!(error = %e, key, "resizing the upload failed");
        }
    });
    Ok(Json(json!({"ok": true, "key": grant.key})))
}

/// Run the server until Ctrl-C.
pub async fn serve(
    app: LocalApp,
    addr: SocketAddr,
    api_key: &str,
    web_dir: PathBuf,
) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening on a non-loopback address: the API is reachable from the network");
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let base_url = format!("http://{local}");
    let router = build_router(&app, &base_url, api_key, web_dir).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let workers = tokio::spawn(app.workers(None).run(stop_rx));
    info!(url = %base_url, "sightline serve is listening");
    eprintln!("sightline serve: {base_url}/  (API key: {api_key})");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    let _ = stop_tx.send(true);
    let _ = workers.await;
    Ok(())
}
