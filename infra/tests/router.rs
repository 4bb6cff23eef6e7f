//! The router, its route list and the OpenAPI spec agree: every route the router serves is in
//! the spec and every operation in the spec is served by the router.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use sightline_pipeline::http::{router, ApiState, ROUTES};
use sightline_pipeline::local::{LocalPresigner, SqliteDb, SqliteRepository};
use sightline_pipeline::ports::SystemClock;
use sightline_pipeline::Settings;
use tower::ServiceExt;

fn spec_routes() -> BTreeSet<(String, String)> {
    let spec: Value =
        serde_yaml::from_str(sightline_infra_checks::OPENAPI_YAML).expect("openapi.yaml parses");
    let mut out = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if ["get", "put", "post", "delete", "patch"].contains(&method.as_str()) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

fn app() -> axum::Router {
    let clock = Arc::new(SystemClock);
    router(ApiState {
        repo: Arc::new(SqliteRepository::new(
            SqliteDb::in_memory().expect("sqlite"),
        )),
        presigner: Arc::new(LocalPresigner::new(
            b"k".to_vec(),
            "http://127.0.0.1:1",
            clock.clone(),
        )),
        settings: Arc::new(Settings::default()),
        clock,
        batches: None,
        search: None,
        blobs: Arc::new(sightline_pipeline::local::FileBlobStore::new(
            std::env::temp_dir().join("sightline-router-test"),
        )),
        deliveries: None,
        generations: None,
    })
}

async fn is_unrouted(method: &str, path: &str) -> bool {
    let resp = app()
        .oneshot(
            Request::builder()
                .method(method)
                .uri(path)
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("router answers");
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        return true;
    }
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    v["error"]["message"] == "no such route"
}

#[tokio::test]
async fn router_routes_match_the_openapi_spec() {
    let router_routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        router_routes,
        spec_routes(),
        "router ROUTES vs infra/openapi.yaml"
    );
    // ROUTES is what the router really serves (path parameters filled in)…
    for (m, p) in ROUTES {
        let path = p.replace("{id}", "some-id");
        assert!(
            !is_unrouted(m, &path).await,
            "{m} {p} is not served by the router"
        );
    }
    // …and nothing else is served.
    for (m, p) in [
        ("PUT", "/v1/images/x"),
        ("DELETE", "/v1/search"),
        ("GET", "/v1/uploads"),
        ("POST", "/v1/costs"),
        ("GET", "/v2/images"),
    ] {
        assert!(is_unrouted(m, p).await, "{m} {p} should not be routed");
    }
}
