//! sightline-api: the shared axum router (`sightline_pipeline::http::router`) over DynamoDB
//! and S3 presigned uploads, served by `lambda_http` behind an API Gateway HTTP API.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

use std::sync::Arc;

use sightline_pipeline::aws::{AwsEnv, Clients, DynamoRepository, S3BlobStore, S3Presigner};
use sightline_pipeline::http::{router, ApiState};
use sightline_pipeline::ports::{Clock, SystemClock};
use sightline_pipeline::Settings;

/// The API state over the AWS adapters.
pub fn api_state(env: &AwsEnv, clients: &Clients, settings: Settings) -> ApiState {
    ApiState {
        repo: Arc::new(
            DynamoRepository::new(clients.dynamodb.clone(), &env.table)
                .with_pending_ttl(settings.pending_ttl),
        ),
        presigner: Arc::new(S3Presigner::new(clients.s3.clone(), &env.bucket)),
        settings: Arc::new(settings),
        clock: Arc::new(SystemClock) as Arc<dyn Clock>,
        batches: None,
        search: None,
        blobs: Arc::new(S3BlobStore::new(clients.s3.clone(), &env.bucket)),
        deliveries: None,
        generations: None,
    }
}

/// The router the Lambda serves (the same one as `sightline serve`).
pub fn app(state: ApiState) -> axum::Router {
    router(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use lambda_http::{Body, Request};
    use sightline_pipeline::http::hash_api_key;
    use sightline_pipeline::local::{LocalPresigner, SqliteDb, SqliteRepository};
    use sightline_pipeline::ports::Repository;
    use tower::ServiceExt;

    async fn call(app: axum::Router, req: Request) -> (u16, serde_json::Value) {
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    /// The router's state over SQLite, with key "k1" for tenant acme.
    async fn state() -> ApiState {
        let repo = Arc::new(SqliteRepository::new(SqliteDb::in_memory().unwrap()));
        repo.add_api_key(&hash_api_key("k1"), "acme", "2026-01-01T00:00:00.000Z")
            .await
            .unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        ApiState {
            repo: repo.clone(),
            batches: Some(repo),
            presigner: Arc::new(LocalPresigner::new(
                b"s".to_vec(),
                "http://x",
                clock.clone(),
            )),
            settings: Arc::new(Settings::default()),
            clock,
            search: None,
            blobs: Arc::new(sightline_pipeline::local::FileBlobStore::new(
                std::env::temp_dir().join("sightline-api-handler-test"),
            )),
            deliveries: None,
            generations: None,
        }
    }

    #[tokio::test]
    async fn a_query_image_over_two_megabytes_reaches_the_search_route_and_an_oversized_one_is_413()
    {
        let state = state().await;
        let post = |len: usize| {
            lambda_http::http::Request::builder()
                .method("POST")
                .uri("/v1/search?top=3")
                .header("x-api-key", "k1")
                .body(Body::Binary(vec![0xFF; len]))
                .unwrap()
        };
        // 3 MB passes axum's default 2 MB limit (search is off here: 503, not 413).
        let (status, body) = call(app(state.clone()), post(3 << 20)).await;
        assert_eq!(status, 503, "{body}");
        // Over the upload limit: a JSON 413.
        let over = state.settings.prepare.max_input_bytes as usize + 1;
        let (status, body) = call(app(state), post(over)).await;
        assert_eq!(status, 413, "{body}");
        assert_eq!(body["error"]["code"], "too_large");
    }

    #[tokio::test]
    async fn lambda_http_requests_reach_the_router() {
        let state = state().await;
        let unauth = lambda_http::http::Request::builder()
            .uri("/v1/images")
            .body(Body::Empty)
            .unwrap();
        assert_eq!(call(app(state.clone()), unauth).await.0, 401);
        let ok = lambda_http::http::Request::builder()
            .uri("/v1/images")
            .header("x-api-key", "k1")
            .body(Body::Empty)
            .unwrap();
        let (status, body) = call(app(state.clone()), ok).await;
        assert_eq!(status, 200);
        assert_eq!(body["images"], serde_json::json!([]));
        let missing = lambda_http::http::Request::builder()
            .uri("/v1/images/nope")
            .header("authorization", "Bearer k1")
            .body(Body::Empty)
            .unwrap();
        assert_eq!(call(app(state), missing).await.0, 404);
    }

    #[tokio::test]
    async fn every_error_is_json() {
        let state = state().await;
        let req = |method: &str, uri: &str, body: Body| {
            lambda_http::http::Request::builder()
                .method(method)
                .uri(uri)
                .header("x-api-key", "")
                .header("authorization", "Bearer k1")
                .body(body)
                .unwrap()
        };
        // An empty x-api-key does not hide the Bearer key.
        assert_eq!(
            call(app(state.clone()), req("GET", "/v1/images", Body::Empty))
                .await
                .0,
            200
        );
        let cases = [
            (req("GET", "/v1/nope", Body::Empty), 404, "not_found"),
            (
                req("DELETE", "/v1/images", Body::Empty),
                405,
                "method_not_allowed",
            ),
            (
                req("GET", "/v1/costs?from=2026-02-30", Body::Empty),
                400,
                "bad_request",
            ),
            (
                req("GET", "/v1/costs?from=2026-13-01", Body::Empty),
                400,
                "bad_request",
            ),
            (
                req(
                    "POST",
                    "/v1/uploads",
                    Body::Binary(vec![b' '; 3 * 1024 * 1024]),
                ),
                413,
                "too_large",
            ),
            (
                req("POST", "/v1/uploads", Body::Text("{".into())),
                400,
                "bad_request",
            ),
        ];
        for (request, status, code) in cases {
            let uri = request.uri().to_string();
            let (got, body) = call(app(state.clone()), request).await;
            assert_eq!(
                (got, body["error"]["code"].as_str()),
                (status, Some(code)),
                "{uri}: {body}"
            );
        }
        let ok = req(
            "GET",
            "/v1/costs?from=2024-02-29&to=2024-03-01",
            Body::Empty,
        );
        assert_eq!(call(app(state), ok).await.0, 200);
    }

    #[tokio::test]
    async fn a_failed_image_is_queued_again_on_the_lane_asked_and_others_are_refused() {
        use sightline_core::model::{ImageRecord, ImageStatus, Lane};
        let state = state().await;
        let record = |id: &str, status: ImageStatus| ImageRecord {
            image_id: id.into(),
            tenant: "acme".into(),
            source: format!("{id}.jpg"),
            status,
            error: (status == ImageStatus::Failed).then(|| "budget exceeded".into()),
            permanent_failure: status == ImageStatus::Failed,
            original: None,
            resized: None,
            orientation: None,
            sha256: Some("ab".repeat(32)),
            original_sha256: None,
            original_key: None,
            resized_key: Some(format!("resized/acme/{id}/x.jpg")),
            estimate: None,
            original_estimate: None,
            result: None,
            extra_spend: None,
            detail: None,
            lane: None,
            created_at: "2026-11-30T00:00:00.000Z".into(),
            updated_at: "2026-11-30T00:00:00.000Z".into(),
            generation: None,
        };
        for (id, status) in [
            ("failed", ImageStatus::Failed),
            ("queued", ImageStatus::Queued),
            ("waiting", ImageStatus::Pending),
        ] {
            state
                .repo
                .put_image(&record(id, status), None)
                .await
                .unwrap();
        }
        let post = |id: &str, body: &str| {
            lambda_http::http::Request::builder()
                .method("POST")
                .uri(format!("/v1/images/{id}/analyze"))
                .header("x-api-key", "k1")
                .body(Body::Text(body.into()))
                .unwrap()
        };
        let (status, body) = call(app(state.clone()), post("failed", r#"{"lane":"batch"}"#)).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["status"], "queued");
        assert_eq!(body["lane"], "batch");
        assert!(body["error"].is_null() && body["permanent_failure"].is_null());
        let stored = state
            .repo
            .get_image("acme", "failed")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (stored.status, stored.lane),
            (ImageStatus::Queued, Some(Lane::Batch))
        );
        // Due for the reconciler now: its next sweep sends the job.
        let due = state.repo.due_rechecks(u64::MAX / 2, 10).await.unwrap();
        assert!(due.iter().any(|r| r.image_id == "failed"));
        for (id, body, want) in [
            ("failed", "", 409),
            ("queued", "", 409),
            ("waiting", "{}", 409),
            ("nope", "", 404),
            ("queued", r#"{"lane":"slow"}"#, 400),
            ("queued", r#"{"model":"x"}"#, 400),
        ] {
            let (got, resp) = call(app(state.clone()), post(id, body)).await;
            assert_eq!(got, want, "{id} {body}: {resp}");
            assert!(resp["error"]["message"].is_string(), "{resp}");
        }
    }

    #[tokio::test]
    async fn a_tenant_budget_is_set_and_removed_only_with_the_admin_key() {
        let mut state = state().await;
        let req = |method: &str, key: Option<&str>, body: &str| {
            let mut b = lambda_http::http::Request::builder()
                .method(method)
                .uri("/v1/tenants/acme/budget");
            if let Some(k) = key {
                b = b.header("x-admin-key", k);
            }
            b.body(Body::Text(body.into())).unwrap()
        };
        let caps = r#"{"daily_usd": 2.5, "monthly_usd": null}"#;
        // No admin key configured: the route is closed.
        assert_eq!(
            call(app(state.clone()), req("PUT", Some("x"), caps))
                .await
                .0,
            403
        );
        state.settings = Arc::new(Settings {
            admin_api_key: Some("root-key".into()),
            ..Settings::default()
        });
        for key in [None, Some("root-kex"), Some("")] {
            let (status, body) = call(app(state.clone()), req("PUT", key, caps)).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (401, Some("unauthorized"))
            );
        }
        // A tenant's API key is not an admin key.
        assert_eq!(
            call(app(state.clone()), req("PUT", Some("k1"), caps))
                .await
                .0,
            401
        );
        let bad = r#"{"daily_usd": -1}"#;
        assert_eq!(
            call(app(state.clone()), req("PUT", Some("root-key"), bad))
                .await
                .0,
            400
        );
        let (status, body) = call(app(state.clone()), req("PUT", Some("root-key"), caps)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["source"], "tenant");
        assert_eq!(body["daily"]["cap_usd"], 2.5);
        assert_eq!(body["monthly"]["cap_usd"], serde_json::Value::Null);
        let own = state.repo.tenant_budget("acme").await.unwrap();
        assert_eq!(own.and_then(|c| c.daily()), Some(2.5));
        let (status, _) = call(app(state.clone()), req("DELETE", Some("root-key"), "")).await;
        assert_eq!(status, 204);
        assert_eq!(state.repo.tenant_budget("acme").await.unwrap(), None);
    }
}
