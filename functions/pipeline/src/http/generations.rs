//! Generation routes: start a job (JSON rows or a CSV body), read jobs and their rows, list
//! webhook deliveries (dead letters among them) and redeliver one.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use sightline_core::generate::{plan_job, Limits, RowsInput, TemplateSet, TemplateSpec};

use super::{path_param, query, tenant, ApiError, ApiState};
use crate::generation::{Generations, Submission, SubmitError, TemplatesError};
use crate::ports::DeliveryStatus;

/// A job as a JSON body. `template` names one of the server's templates file, or is a
/// template inline; rows come as `rows` (objects) or `csv` (text with a header).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobBody {
    #[serde(default)]
    template: Option<TemplateRef>,
    #[serde(default)]
    rows: Option<serde_json::Value>,
    #[serde(default)]
    csv: Option<String>,
    #[serde(default)]
    webhook_url: Option<String>,
    /// Also a webhook per row once it is final.
    #[serde(default)]
    webhook_rows: bool,
    #[serde(default)]
    regenerate: Option<bool>,
    /// Every row with this image model instead of the template's.
    #[serde(default)]
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateRef {
    Named(String),
    Inline(TemplateSpec),
}

fn generations_of(state: &ApiState) -> Result<&Generations, ApiError> {
    state.generations.as_deref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "generation_off",
            "generation jobs are not configured on this deployment",
        )
    })
}

/// The deployment's named templates.
async fn server_templates(generations: &Generations) -> Result<TemplateSet, ApiError> {
    generations.templates.load().await.map_err(|e| match e {
        TemplatesError::NoTemplates => ApiError::bad_request(e.to_string()),
        other => {
            tracing::error!(error = %other, "templates unusable");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the templates file cannot be read or is invalid",
            )
        }
    })
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::Store(s) => s.into(),
        other => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "job_refused",
            other.to_string(),
        ),
    }
}

/// `POST /v1/generations`: a JSON job, or a CSV body (`content-type: text/csv`) with
/// `?template=NAME[&webhook_url=…&regenerate=…&model=…]`. Every row is checked before
/// anything is stored or paid; the errors carry row numbers.
pub(super) async fn create(
    State(state): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let generations = generations_of(&state)?;
    let q = query(q)?;
    let body = body.map_err(|e| ApiError::bad_request(format!("body: {}", e.body_text())))?;
    let is_csv = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/csv"));
    let job: JobBody = if is_csv {
        for k in q.keys() {
            if !matches!(
                k.as_str(),
                "template" | "webhook_url" | "webhook_rows" | "regenerate" | "model"
            ) {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {k:?}"
                )));
            }
        }
        let flag = |name: &str| match q.get(name).map(String::as_str) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(_) => Err(ApiError::bad_request(format!(
                "{name} must be true or false"
            ))),
        };
        let regenerate = flag("regenerate")?;
        let webhook_rows = flag("webhook_rows")?.unwrap_or(false);
        JobBody {
            template: q.get("template").cloned().map(TemplateRef::Named),
            rows: None,
            csv: Some(
                String::from_utf8(body.to_vec())
                    .map_err(|_| ApiError::bad_request("the CSV is not UTF-8"))?,
            ),
            webhook_url: q.get("webhook_url").cloned(),
            webhook_rows,
            regenerate,
            model: q.get("model").cloned(),
        }
    } else {
        if !q.is_empty() {
            return Err(ApiError::bad_request(
                "a JSON job takes no query parameters",
            ));
        }
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid job: {e}")))?
    };
    let (set, name) = match &job.template {
        Some(TemplateRef::Inline(spec)) => (
            TemplateSet::inline(spec).map_err(|e| ApiError::bad_request(e.to_string()))?,
            None,
        ),
        Some(TemplateRef::Named(n)) => (server_templates(generations).await?, Some(n.clone())),
        None => (server_templates(generations).await?, None),
    };
    let rows_json;
    let input = match (&job.rows, &job.csv) {
        (Some(rows), None) => {
            rows_json = serde_json::to_vec(rows)
                .map_err(|e| ApiError::bad_request(format!("rows: {e}")))?;
            RowsInput::Json(&rows_json)
        }
        (None, Some(csv)) => RowsInput::Csv(csv.as_bytes()),
        _ => {
            return Err(ApiError::bad_request(
                "send rows (JSON objects) or csv, one of them",
            ))
        }
    };
    let mut requests = plan_job(&set, name.as_deref(), input, &Limits::default()).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "job_refused",
            format!("nothing was paid: {e}"),
        )
    })?;
    if let Some(model) = &job.model {
        for r in &mut requests {
            r.model = model.clone();
        }
    }
    let template = name
        .or_else(|| set.default_name().map(str::to_string))
        .unwrap_or_else(|| sightline_core::generate::INLINE_TEMPLATE.to_string());
    let created = generations
        .submit(Submission {
            tenant,
            template,
            requests,
            webhook_url: job.webhook_url,
            webhook_rows: job.webhook_rows,
            regenerate: job.regenerate,
            source: "api".into(),
            job_id: None,
        })
        .await
        .map_err(submit_error)?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "job": created }))))
}

/// `GET /v1/generations`: the tenant's jobs, newest first (`limit`, default 50).
pub(super) async fn list(
    State(state): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let generations = generations_of(&state)?;
    let limit = limit_param(&query(q)?, &[])?;
    let jobs = generations.store.list_jobs(&tenant, limit).await?;
    Ok(Json(json!({ "jobs": jobs })))
}

/// `GET /v1/generations/{id}`: the job, its counts, costs and every row's status.
pub(super) async fn get(
    State(state): State<ApiState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let generations = generations_of(&state)?;
    let id = path_param(id)?;
    let report = generations
        .job_report(&tenant, &id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such job"))?;
    Ok(Json(json!(report)))
}

fn limit_param(q: &BTreeMap<String, String>, allowed: &[&str]) -> Result<usize, ApiError> {
    for k in q.keys() {
        if k != "limit" && !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}"
            )));
        }
    }
    match q.get("limit") {
        None => Ok(50),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::bad_request("limit must be an integer from 1 to 1000")),
    }
}

/// `GET /v1/webhooks/deliveries?status=pending|delivered|gone|dead`: the tenant's deliveries.
pub(super) async fn deliveries(
    State(state): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let generations = generations_of(&state)?;
    let q = query(q)?;
    let limit = limit_param(&q, &["status"])?;
    let status = match q.get("status") {
        None => None,
        Some(s) => Some(DeliveryStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request("status must be pending, delivered, gone or dead")
        })?),
    };
    let found = generations
        .store
        .list_deliveries(&tenant, status, limit)
        .await?;
    // The bodies are the job summaries the API already serves: left out of the list.
    let items: Vec<serde_json::Value> = found
        .iter()
        .map(|d| {
            json!({
                "delivery_id": d.delivery_id, "job_id": d.job_id, "url": d.url, "event": d.event,
                "status": d.status, "attempts": d.attempts, "last_status": d.last_status,
                "last_error": d.last_error, "created_at": d.created_at, "updated_at": d.updated_at,
            })
        })
        .collect();
    Ok(Json(json!({ "deliveries": items })))
}

/// `POST /v1/webhooks/deliveries/{id}/redeliver`: send it again from now (same `webhook-id`).
pub(super) async fn redeliver(
    State(state): State<ApiState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let tenant = tenant(&state, &headers).await?;
    let deliveries = state.deliveries.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "generation_off",
            "webhook deliveries are not configured on this deployment",
        )
    })?;
    let id = path_param(id)?;
    let d = deliveries
        .redeliver(&tenant, &id)
        .await
        .map_err(|e| match e {
            crate::ports::StoreError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such delivery")
            }
            other => other.into(),
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(
            json!({ "delivery_id": d.delivery_id, "status": d.status, "next_at_ms": d.next_at_ms }),
        ),
    ))
}
