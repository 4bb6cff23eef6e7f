//! The OpenAPI spec (infra/openapi.yaml) lists exactly the API's routes, each with responses and
//! (except health) the API-key security requirement; the template's HttpApi events agree with it.
//! The router ↔ spec check lives with the router (it needs the pipeline crate).

mod common;

use std::collections::BTreeSet;

use common::{as_list, openapi, template};
use serde_json::Value;

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "options", "head", "trace",
];

/// (METHOD, path, operation) for every operation in the spec.
fn operations(spec: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (k, op) in item.as_object().expect("path item") {
            if METHODS.contains(&k.as_str()) {
                out.push((k.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    out
}

fn expected_routes() -> BTreeSet<(String, String)> {
    sightline_infra_checks::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect()
}

/// Follow a local `$ref` (`#/components/...`).
fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let ptr = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("non-local $ref {r}"));
            let target = spec
                .pointer(ptr)
                .unwrap_or_else(|| panic!("dangling $ref {r}"));
            resolve(spec, target)
        }
        None => v,
    }
}

fn schema<'a>(spec: &'a Value, name: &str) -> &'a Value {
    &spec["components"]["schemas"][name]
}

fn required(s: &Value) -> BTreeSet<String> {
    as_list(&s["required"])
        .iter()
        .map(|x| x.as_str().expect("required name").to_string())
        .collect()
}

fn props(s: &Value) -> BTreeSet<String> {
    s["properties"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn spec_is_openapi_3_0_3_with_both_security_schemes() {
    let spec = openapi();
    assert_eq!(spec["openapi"], "3.0.3");
    let schemes = &spec["components"]["securitySchemes"];
    assert_eq!(schemes["apiKey"]["type"], "apiKey");
    assert_eq!(schemes["apiKey"]["in"], "header");
    assert_eq!(schemes["apiKey"]["name"], "x-api-key");
    assert_eq!(schemes["bearer"]["type"], "http");
    assert_eq!(schemes["bearer"]["scheme"], "bearer");
}

#[test]
fn spec_lists_exactly_the_routes() {
    let spec = openapi();
    let got: BTreeSet<(String, String)> = operations(&spec)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    assert_eq!(got, expected_routes());
    assert_eq!(
        operations(&spec).len(),
        sightline_infra_checks::ROUTES.len(),
        "no duplicates"
    );
}

#[test]
fn every_route_has_responses_and_security_except_health() {
    let spec = openapi();
    let public: BTreeSet<(String, String)> = sightline_infra_checks::PUBLIC_ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let schemes: BTreeSet<String> = spec["components"]["securitySchemes"]
        .as_object()
        .expect("securitySchemes")
        .keys()
        .cloned()
        .collect();
    for (m, p, op) in operations(&spec) {
        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|c| c.starts_with('2')),
            "{m} {p}: a success response"
        );
        for (code, r) in responses {
            let r = resolve(&spec, r);
            assert!(r["description"].is_string(), "{m} {p} {code}: description");
            if let Some(s) = r["content"]["application/json"]["schema"].as_object() {
                let _ = resolve(&spec, &Value::Object(s.clone()));
            }
        }
        // Effective security: the operation's own, else the top-level one.
        let security = if op.get("security").is_some() {
            &op["security"]
        } else {
            &spec["security"]
        };
        let reqs = as_list(security);
        let admin = sightline_infra_checks::ADMIN_ROUTES
            .iter()
            .any(|(am, ap)| *am == m && *ap == p);
        if admin {
            let names: BTreeSet<String> = reqs
                .iter()
                .flat_map(|r| r.as_object().expect("requirement").keys().cloned())
                .collect();
            assert_eq!(names, set(&["adminKey"]), "{m} {p}: the admin key only");
            assert!(responses.contains_key("401") && responses.contains_key("403"));
        } else if public.contains(&(m.clone(), p.clone())) {
            assert!(
                reqs.is_empty(),
                "{m} {p} needs no authentication (security: [])"
            );
        } else {
            assert!(!reqs.is_empty(), "{m} {p} requires an API key");
            let mut names = BTreeSet::new();
            for req in &reqs {
                let obj = req.as_object().expect("security requirement");
                assert!(
                    !obj.is_empty(),
                    "{m} {p}: an empty requirement would allow anonymous"
                );
                for name in obj.keys() {
                    assert!(schemes.contains(name), "{m} {p}: unknown scheme {name}");
                    names.insert(name.clone());
                }
            }
            assert_eq!(
                names,
                set(&["apiKey", "bearer"]),
                "{m} {p}: x-api-key or bearer"
            );
            assert!(responses.contains_key("401"), "{m} {p}: 401");
        }
    }
}

#[test]
fn routes_have_the_documented_statuses() {
    let spec = openapi();
    let ops = operations(&spec);
    for (m, p, codes) in [
        (
            "POST",
            "/v1/uploads",
            &["201", "400", "401", "413", "429", "500"][..],
        ),
        ("GET", "/v1/images/{id}", &["200", "401", "404"][..]),
        ("GET", "/v1/images", &["200", "400", "401"][..]),
        ("GET", "/v1/costs", &["200", "400", "401"][..]),
        ("GET", "/v1/batches", &["200", "400", "401"][..]),
        (
            "POST",
            "/v1/images/{id}/analyze",
            &["202", "400", "401", "404", "409"][..],
        ),
        ("GET", "/v1/health", &["200"][..]),
        ("DELETE", "/v1/images/{id}", &["204", "401", "404"][..]),
        (
            "GET",
            "/v1/images/{id}/similar",
            &["200", "400", "401", "404", "409", "503"][..],
        ),
        ("GET", "/v1/search", &["200", "400", "401", "503"][..]),
        (
            "POST",
            "/v1/search",
            &["200", "400", "401", "413", "503"][..],
        ),
    ] {
        let (_, _, op) = ops
            .iter()
            .find(|(om, op_path, _)| om == m && op_path == p)
            .unwrap_or_else(|| panic!("{m} {p}"));
        for c in codes {
            assert!(op["responses"].get(*c).is_some(), "{m} {p} documents {c}");
        }
    }
}

#[test]
fn schemas_match_the_api() {
    let spec = openapi();

    let up = schema(&spec, "UploadRequest");
    assert_eq!(required(up), set(&["content_type", "content_length"]));
    assert_eq!(
        props(up),
        set(&[
            "filename",
            "content_type",
            "content_length",
            "detail",
            "lane"
        ])
    );
    // The detail values are the ones the pipeline reads.
    for v in as_list(&up["properties"]["detail"]["enum"]) {
        let v = v.as_str().expect("enum");
        assert_eq!(
            sightline_core::model::Detail::parse(v).map(|d| d.as_str()),
            Some(v)
        );
    }
    assert_eq!(as_list(&up["properties"]["detail"]["enum"]).len(), 3);
    let types: BTreeSet<String> = as_list(&up["properties"]["content_type"]["enum"])
        .iter()
        .map(|v| v.as_str().expect("enum").to_string())
        .collect();
    assert_eq!(
        types,
        set(&["image/jpeg", "image/png", "image/webp", "image/gif"])
    );
    let len = &up["properties"]["content_length"];
    assert_eq!(len["type"], "integer");
    assert_eq!(len["minimum"], 1);
    assert_eq!(len["maximum"], 26_214_400);

    let resp = schema(&spec, "UploadResponse");
    assert_eq!(required(resp), set(&["image_id", "key", "upload"]));
    let upload = resolve(&spec, &resp["properties"]["upload"]);
    assert_eq!(
        required(upload),
        set(&["url", "method", "headers", "expires_at"])
    );
    assert_eq!(
        as_list(&upload["properties"]["method"]["enum"]),
        vec![Value::from("PUT")]
    );
    assert_eq!(
        upload["properties"]["headers"]["additionalProperties"]["type"],
        "string"
    );

    let rec = schema(&spec, "ImageRecord");
    assert_eq!(
        props(rec),
        set(&[
            "image_id",
            "tenant",
            "source",
            "status",
            "error",
            "permanent_failure",
            "original",
            "resized",
            "orientation",
            "sha256",
            "original_sha256",
            "original_key",
            "resized_key",
            "estimate",
            "original_estimate",
            "result",
            "extra_spend",
            "lane",
            "created_at",
            "updated_at",
        ])
    );
    let extra = resolve(&spec, &rec["properties"]["extra_spend"]);
    assert_eq!(
        props(extra),
        set(&[
            "calls",
            "input_tokens",
            "output_tokens",
            "cost_usd",
            "cost_at_estimate_usd"
        ])
    );
    assert_eq!(
        required(rec),
        set(&[
            "image_id",
            "tenant",
            "source",
            "status",
            "created_at",
            "updated_at"
        ])
    );
    let status = resolve(&spec, &rec["properties"]["status"]);
    assert_eq!(
        as_list(&status["enum"]),
        ["pending", "queued", "done", "failed"]
            .map(Value::from)
            .to_vec()
    );
    let size = resolve(&spec, &rec["properties"]["original"]);
    assert_eq!(props(size), set(&["width", "height", "bytes"]));
    let est = resolve(&spec, &rec["properties"]["estimate"]);
    assert_eq!(
        props(est),
        set(&[
            "model",
            "image_tokens",
            "input_tokens",
            "output_tokens",
            "tokens",
            "cost_usd",
            "price_version"
        ])
    );
    let result = resolve(&spec, &rec["properties"]["result"]);
    assert_eq!(
        props(result),
        set(&[
            "provider",
            "model",
            "analysis",
            "usage",
            "cost_usd",
            "cached",
            "calls",
            "usage_estimated",
            "cost_at_estimate_usd",
            "lane",
            "batch_id",
            "saved_usd",
            "reused_from",
            "idempotency_key",
            "prompt_version",
            "price_version",
            "completed_at"
        ])
    );
    assert_eq!(result["properties"]["analysis"]["type"], "object");
    let usage = resolve(&spec, &result["properties"]["usage"]);
    assert_eq!(
        props(usage),
        set(&["input_tokens", "output_tokens", "cached_tokens"])
    );

    let page = schema(&spec, "ImagePage");
    assert_eq!(required(page), set(&["images", "next_cursor"]));
    assert_eq!(page["properties"]["next_cursor"]["nullable"], true);

    let row_fields = [
        "images",
        "cached_images",
        "calls",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "estimated_cost_usd",
        "calls_at_estimate",
        "cost_at_estimate_usd",
    ];
    let row = schema(&spec, "CostRow");
    let mut with_keys = row_fields.to_vec();
    with_keys.extend([
        "day",
        "model",
        "batch_images",
        "batch_calls",
        "batch_cost_usd",
        "batch_saved_usd",
        "kind",
        "reused_images",
        "reused_saved_usd",
    ]);
    assert_eq!(props(row), set(&with_keys));
    assert_eq!(required(row), set(&with_keys));
    // Totals add what the provider reported, apart from what was booked at the estimate.
    let mut totals = row_fields.to_vec();
    totals.push("reported_cost_usd");
    assert_eq!(props(schema(&spec, "CostTotals")), set(&totals));
    assert_eq!(required(schema(&spec, "CostTotals")), set(&totals));
    let report = schema(&spec, "CostReport");
    assert_eq!(
        required(report),
        set(&["from", "to", "total", "by_model", "by_day", "rows", "by_lane", "by_kind", "budget"])
    );
    // The lane and batch schemas name exactly what the API serializes.
    let lanes = serde_json::to_value(sightline_pipeline::http::LaneCosts::default()).unwrap();
    let keys_of = |v: &Value| {
        v.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(props(schema(&spec, "LaneCosts")), keys_of(&lanes));
    assert_eq!(props(schema(&spec, "LaneTotals")), keys_of(&lanes["batch"]));
    let batch = sightline_pipeline::ports::BatchRecord {
        batch_id: "b".into(),
        tenant: "t".into(),
        provider: "openai".into(),
        model: "m".into(),
        state: sightline_pipeline::ports::BatchState::Ended,
        provider_batch_id: Some("p".into()),
        provider_status: Some("completed".into()),
        error: Some("e".into()),
        requests: 1,
        counts: Default::default(),
        cost_usd: 0.0,
        saved_usd: 0.0,
        hold: Some(sightline_pipeline::ports::BatchHold {
            id: "h".into(),
            at_ms: 1,
        }),
        created_at: "x".into(),
        created_ms: 1,
        submitted_at: Some("x".into()),
        ended_at: Some("x".into()),
    };
    let batch = serde_json::to_value(batch).unwrap();
    assert_eq!(props(schema(&spec, "BatchRecord")), keys_of(&batch));
    assert_eq!(
        props(schema(&spec, "BatchCounts")),
        keys_of(&batch["counts"])
    );
    // The budget schemas name exactly what the API serializes.
    let budget = serde_json::to_value(sightline_pipeline::http::BudgetReport::default()).unwrap();
    let keys = |v: &Value| {
        v.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(props(schema(&spec, "BudgetReport")), keys(&budget));
    assert_eq!(required(schema(&spec, "BudgetReport")), keys(&budget));
    assert_eq!(props(schema(&spec, "PeriodBudget")), keys(&budget["daily"]));
    assert_eq!(
        required(schema(&spec, "PeriodBudget")),
        keys(&budget["daily"])
    );

    let err = schema(&spec, "Error");
    assert_eq!(required(err), set(&["error"]));
    assert_eq!(
        required(&err["properties"]["error"]),
        set(&["code", "message"])
    );

    let health = schema(&spec, "Health");
    assert_eq!(
        as_list(&health["properties"]["status"]["enum"]),
        vec![Value::from("ok")]
    );
}

#[test]
fn list_and_cost_query_parameters() {
    let spec = openapi();
    let params = |p: &str| -> Vec<Value> {
        as_list(&spec["paths"][p]["get"]["parameters"])
            .iter()
            .map(|x| resolve(&spec, x).clone())
            .collect()
    };
    let list = params("/v1/images");
    let names: BTreeSet<String> = list
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, set(&["status", "limit", "cursor"]));
    let limit = list.iter().find(|x| x["name"] == "limit").unwrap();
    assert_eq!(limit["schema"]["minimum"], 1);
    assert_eq!(limit["schema"]["maximum"], 100);
    let costs = params("/v1/costs");
    let names: BTreeSet<String> = costs
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, set(&["from", "to"]));
    for c in &costs {
        assert_eq!(c["schema"]["format"], "date");
    }
    let id = &spec["paths"]["/v1/images/{id}"]["get"]["parameters"][0];
    assert_eq!(id["in"], "path");
    assert_eq!(id["required"], true);
}

#[test]
fn every_ref_resolves() {
    let spec = openapi();
    let mut pairs = Vec::new();
    common::walk(&spec, &mut pairs);
    let mut n = 0;
    for (k, v) in pairs {
        if k == "$ref" {
            let r = v.as_str().expect("$ref string");
            let ptr = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("non-local $ref {r}"));
            assert!(spec.pointer(ptr).is_some(), "dangling $ref {r}");
            n += 1;
        }
    }
    assert!(n > 10);
}

#[test]
fn template_http_api_events_match_the_spec() {
    let spec = openapi();
    let t = template();
    let mut from_template = BTreeSet::new();
    for (_, r) in t["Resources"].as_object().expect("Resources") {
        if let Some(events) = r["Properties"]["Events"].as_object() {
            for e in events.values().filter(|e| e["Type"] == "HttpApi") {
                from_template.insert((
                    e["Properties"]["Method"]
                        .as_str()
                        .expect("Method")
                        .to_uppercase(),
                    e["Properties"]["Path"].as_str().expect("Path").to_string(),
                ));
            }
        }
    }
    let from_spec: BTreeSet<(String, String)> = operations(&spec)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    assert_eq!(from_template, from_spec);
}
