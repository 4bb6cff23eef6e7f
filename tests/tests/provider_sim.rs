//! Tests of the OpenAI provider simulator (`sightline_tests::sim`) over real HTTP.
//!
//!   cargo test -p sightline-tests --test provider_sim

use std::io::Cursor;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sightline_core::model::Detail;
use sightline_core::pricing::{text_tokens, PriceTable};
use sightline_core::retry::{parse_reset, parse_retry_after};
use sightline_tests::sim::{
    is_poison, EveryNth, Fault, FaultPlan, LimitModel, SimConfig, SimServer,
    MESSAGE_OVERHEAD_TOKENS, REPLY_PRIMING_TOKENS,
};

const KEY: &str = "sk-sim-test";
const PROMPT: &str = "Describe this image as a json object with description, category, tags, objects, text and quality_issues.";

fn cfg() -> SimConfig {
    SimConfig {
        api_key: KEY.into(),
        ..SimConfig::default()
    }
}

/// A deterministic JPEG: a gradient whose base colour depends on `shade`.
fn jpeg(w: u32, h: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            shade,
            ((x * 255) / w.max(1)) as u8,
            ((y * 255) / h.max(1)) as u8 / 2 + shade / 2,
        ])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut out), 80)
        .encode_image(&img)
        .unwrap();
    out
}

fn data_url(bytes: &[u8]) -> String {
    format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn body(model: &str, image: &[u8], detail: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{
            "role": "user",
            "content": [
                {"type": "text", "text": PROMPT},
                {"type": "image_url", "image_url": {"url": data_url(image), "detail": detail}}
            ]
        }],
        "max_tokens": max_tokens,
        "response_format": {"type": "json_object"},
        "temperature": 0
    })
}

/// The simulator's text part of the prompt for [`body`]: one user message with PROMPT.
fn text_part() -> u64 {
    REPLY_PRIMING_TOKENS + MESSAGE_OVERHEAD_TOKENS + text_tokens("user") + text_tokens(PROMPT)
}

async fn post(
    client: &Client,
    sim: &SimServer,
    body: &Value,
    fault: Option<&str>,
) -> reqwest::Response {
    let mut req = client
        .post(format!("{}/chat/completions", sim.base_url))
        .bearer_auth(KEY)
        .json(body);
    if let Some(f) = fault {
        req = req.header("x-sim-fault", f);
    }
    req.send().await.unwrap()
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

fn assert_limit_headers(resp: &reqwest::Response) {
    for h in [
        "x-ratelimit-limit-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
    ] {
        header(resp, h).parse::<u64>().unwrap();
    }
    for h in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        let v = header(resp, h);
        assert!(parse_reset(v).is_some(), "{h}: {v:?}");
    }
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test]
async fn usage_follows_the_core_image_token_rule() {
    let sim = SimServer::start(cfg()).await.unwrap();
    let client = Client::new();
    let img = jpeg(1024, 1024, 90);

    let high = post(&client, &sim, &body("gpt-4o", &img, "high", 500), None).await;
    assert_eq!(high.status(), StatusCode::OK);
    assert_limit_headers(&high);
    let high: Value = high.json().await.unwrap();
    assert_eq!(high["object"], "chat.completion");
    assert_eq!(high["model"], "gpt-4o");
    assert!(high["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(high["choices"][0]["finish_reason"], "stop");
    assert_eq!(high["choices"][0]["message"]["role"], "assistant");
    let usage = &high["usage"];
    // OpenAI's worked example: 1024×1024 high on gpt-4o = 85 + 4·170 = 765.
    assert_eq!(usage["prompt_tokens"].as_u64().unwrap(), 765 + text_part());
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);

    let content = high["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        usage["completion_tokens"].as_u64().unwrap(),
        text_tokens(content)
    );
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    let analysis: Value = serde_json::from_str(content).unwrap();
    assert!(!analysis["description"].as_str().unwrap().is_empty());
    assert!(analysis["description"]
        .as_str()
        .unwrap()
        .contains("1024x1024"));
    assert!(analysis["category"].is_string());
    assert!(analysis["text"].is_string());
    for k in ["tags", "objects", "quality_issues"] {
        let arr = analysis[k].as_array().unwrap();
        assert!(arr.iter().all(Value::is_string), "{k}: {arr:?}");
    }
    assert!(!analysis["tags"].as_array().unwrap().is_empty());

    // detail=low is always 85 on gpt-4o; auto is high.
    let low: Value = post(&client, &sim, &body("gpt-4o", &img, "low", 500), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        low["usage"]["prompt_tokens"].as_u64().unwrap(),
        85 + text_part()
    );
    let auto: Value = post(&client, &sim, &body("gpt-4o", &img, "auto", 500), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        auto["usage"]["prompt_tokens"],
        high["usage"]["prompt_tokens"]
    );

    // Other models and sizes: the same numbers as the core estimator.
    let table = PriceTable::builtin();
    for (model, w, h) in [
        ("gpt-4.1-mini", 800, 600),
        ("gpt-4o", 300, 200),
        ("gpt-4o-mini", 2048, 1024),
    ] {
        let img = jpeg(w, h, 40);
        let resp: Value = post(&client, &sim, &body(model, &img, "high", 500), None)
            .await
            .json()
            .await
            .unwrap();
        let want = table.model(model).unwrap().image_tokens(w, h, Detail::High) + text_part();
        assert_eq!(
            resp["usage"]["prompt_tokens"].as_u64().unwrap(),
            want,
            "{model} {w}x{h}"
        );
    }

    let stats = sim.stats().await;
    assert_eq!(stats.requests, 6);
    assert_eq!(stats.completions, 6);
    assert_eq!(stats.requests_per_image[&sha(&img)], 3);
    assert_eq!(stats.completions_per_image[&sha(&img)], 3);
    sim.shutdown();
}

#[tokio::test]
async fn content_is_deterministic_per_image_and_differs_between_images() {
    let sim = SimServer::start(cfg()).await.unwrap();
    let client = Client::new();
    let dark = jpeg(640, 480, 10);
    let bright = jpeg(640, 480, 250);
    let content = |v: Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let a1 = content(
        post(&client, &sim, &body("gpt-4o", &dark, "high", 500), None)
            .await
            .json()
            .await
            .unwrap(),
    );
    let a2 = content(
        post(&client, &sim, &body("gpt-4o", &dark, "high", 500), None)
            .await
            .json()
            .await
            .unwrap(),
    );
    let b = content(
        post(&client, &sim, &body("gpt-4o", &bright, "high", 500), None)
            .await
            .json()
            .await
            .unwrap(),
    );
    assert_eq!(a1, a2);
    assert_ne!(a1, b);
    let a: Value = serde_json::from_str(&a1).unwrap();
    let b: Value = serde_json::from_str(&b).unwrap();
    assert_ne!(a["description"], b["description"]);
    assert!(a["description"].as_str().unwrap().contains("640x480"));
    let stats = sim.stats().await;
    assert_eq!(stats.requests_per_image[&sha(&dark)], 2);
    assert_eq!(stats.requests_per_image[&sha(&bright)], 1);
    assert_eq!(stats.completions_per_image[&sha(&dark)], 2);
}

#[tokio::test]
async fn max_tokens_cuts_the_content_with_finish_reason_length() {
    let sim = SimServer::start(cfg()).await.unwrap();
    let client = Client::new();
    let resp: Value = post(
        &client,
        &sim,
        &body("gpt-4o", &jpeg(256, 256, 100), "low", 5),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(resp["choices"][0]["finish_reason"], "length");
    assert_eq!(resp["usage"]["completion_tokens"], 5);
    let content = resp["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(content).is_err());
    assert_eq!(content.chars().count(), 20);
}

#[tokio::test]
async fn auth_errors_are_401_invalid_api_key() {
    let sim = SimServer::start(cfg()).await.unwrap();
    let client = Client::new();
    let b = body("gpt-4o", &jpeg(64, 64, 1), "low", 100);
    let url = format!("{}/chat/completions", sim.base_url);

    let missing = client.post(&url).json(&b).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    let e: Value = missing.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_api_key");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(e["error"]["message"].as_str().unwrap().contains("API key"));

    let wrong = client
        .post(&url)
        .bearer_auth("sk-wrong-key-123")
        .json(&b)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let e: Value = wrong.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_api_key");
    assert!(!e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("sk-wrong-key-123"));

    let stats = sim.stats().await;
    assert_eq!(stats.unauthorized, 2);
    assert_eq!(stats.completions, 0);
    assert!(stats.requests_per_image.is_empty());
}

#[tokio::test]
async fn unknown_model_is_404_and_bad_bodies_are_400() {
    let sim = SimServer::start(cfg()).await.unwrap();
    let client = Client::new();
    let img = jpeg(64, 64, 1);

    let resp = post(&client, &sim, &body("sim-model", &img, "low", 100), None).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_limit_headers(&resp);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("sim-model"));

    // Not JSON.
    let resp = client
        .post(format!("{}/chat/completions", sim.base_url))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error");

    // Bad base64 in the data URL.
    let mut b = body("gpt-4o", &img, "low", 100);
    b["messages"][0]["content"][1]["image_url"]["url"] =
        json!("data:image/jpeg;base64,@@not base64@@");
    let resp = post(&client, &sim, &b, None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_image_url");

    // Valid base64, not an image.
    b["messages"][0]["content"][1]["image_url"]["url"] = json!(format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(b"definitely not a jpeg")
    ));
    let resp = post(&client, &sim, &b, None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "invalid_image_format");

    // Remote URLs are not fetched.
    b["messages"][0]["content"][1]["image_url"]["url"] = json!("https://example.com/a.jpg");
    assert_eq!(
        post(&client, &sim, &b, None).await.status(),
        StatusCode::BAD_REQUEST
    );

    // json_object without the word "json" in the messages (OpenAI rejects it too).
    let mut b = body("gpt-4o", &img, "low", 100);
    b["messages"][0]["content"][0]["text"] = json!("Describe this image.");
    assert_eq!(
        post(&client, &sim, &b, None).await.status(),
        StatusCode::BAD_REQUEST
    );

    // Unknown fault name.
    let resp = post(
        &client,
        &sim,
        &body("gpt-4o", &img, "low", 100),
        Some("explode"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    let stats = sim.stats().await;
    assert_eq!(stats.not_found, 1);
    assert_eq!(stats.bad_requests, 6);
    assert_eq!(stats.completions, 0);
    assert_eq!(stats.tokens_billed, 0);
}

#[tokio::test]
async fn rpm_exhaustion_is_429_with_retry_after_and_headers() {
    let sim = SimServer::start(SimConfig { rpm: 2, ..cfg() })
        .await
        .unwrap();
    let client = Client::new();
    let img = jpeg(128, 128, 50);
    let b = body("gpt-4o", &img, "low", 100);

    let first = post(&client, &sim, &b, None).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&first, "x-ratelimit-remaining-requests"), "1");
    let reset = parse_reset(header(&first, "x-ratelimit-reset-requests")).unwrap();
    assert!(
        reset > Duration::from_secs(58) && reset <= Duration::from_secs(60),
        "{reset:?}"
    );

    let second = post(&client, &sim, &b, None).await;
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(header(&second, "x-ratelimit-remaining-requests"), "0");

    let third = post(&client, &sim, &b, None).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_limit_headers(&third);
    assert_eq!(header(&third, "x-ratelimit-remaining-requests"), "0");
    let retry = parse_retry_after(header(&third, "retry-after")).unwrap();
    assert!(
        retry > Duration::from_secs(55) && retry <= Duration::from_secs(60),
        "{retry:?}"
    );
    let e: Value = third.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert_eq!(e["error"]["type"], "requests");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("requests per min (RPM): Limit 2, Used 2, Requested 1. Please try again in"),
        "{msg}"
    );

    let stats = sim.stats().await;
    assert_eq!(stats.completions, 2);
    assert_eq!(stats.rate_limited, 1);
    assert_eq!(stats.requests, 3);

    // A reset empties the windows.
    sim.reset().await;
    assert_eq!(post(&client, &sim, &b, None).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn tpm_counts_prompt_plus_max_tokens() {
    let img = jpeg(1024, 1024, 70);
    let prompt = 765 + text_part();
    let max_tokens = 300;
    let per_request = prompt + max_tokens;
    // Room for exactly two requests.
    let tpm = 2 * per_request + 10;
    let sim = SimServer::start(SimConfig { tpm, ..cfg() }).await.unwrap();
    let client = Client::new();
    let b = body("gpt-4o", &img, "high", max_tokens);

    let first = post(&client, &sim, &b, None).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), tpm.to_string());
    assert_eq!(
        header(&first, "x-ratelimit-remaining-tokens"),
        (tpm - per_request).to_string()
    );
    assert_eq!(post(&client, &sim, &b, None).await.status(), StatusCode::OK);
    let third = post(&client, &sim, &b, None).await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(parse_retry_after(header(&third, "retry-after")).is_some());
    assert_eq!(header(&third, "x-ratelimit-remaining-tokens"), "10");
    let e: Value = third.json().await.unwrap();
    assert_eq!(e["error"]["type"], "tokens");
    let msg = e["error"]["message"].as_str().unwrap();
    let want = format!(
        "tokens per min (TPM): Limit {tpm}, Used {}, Requested {per_request}.",
        2 * per_request
    );
    assert!(msg.contains(&want), "{msg}\nwant: {want}");

    // Billing counts actual usage, not the estimate.
    let stats = sim.stats().await;
    assert_eq!(stats.prompt_tokens, 2 * prompt);
    assert_eq!(
        stats.tokens_billed,
        stats.prompt_tokens + stats.completion_tokens
    );
    assert!(stats.completion_tokens > 0 && stats.completion_tokens < 2 * max_tokens);
}

#[tokio::test]
async fn a_quantized_limit_refuses_a_burst_past_its_quantum_while_the_minute_has_room() {
    // 600 RPM enforced per second: 10 at once, then one every 100 ms.
    let sim = SimServer::start(SimConfig {
        rpm: 600,
        limit_model: LimitModel::Quantized,
        quantum_ms: 1_000,
        ..cfg()
    })
    .await
    .unwrap();
    let client = Client::new();
    let b = body("gpt-4o", &jpeg(64, 64, 10), "low", 50);
    let started = Instant::now();
    for i in 0..10 {
        let r = post(&client, &sim, &b, None).await;
        assert_eq!(r.status(), StatusCode::OK, "request {i}");
        if i == 0 {
            // The headers report the minute's bucket, OpenAI's way: one of 600 used, full
            // again ("reset to its initial state") in 100 ms.
            assert_eq!(header(&r, "x-ratelimit-limit-requests"), "600");
            assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "599");
            let reset = parse_reset(header(&r, "x-ratelimit-reset-requests")).unwrap();
            assert!(reset <= Duration::from_millis(100), "{reset:?}");
        }
    }
    let refused = post(&client, &sim, &b, None).await;
    if started.elapsed() < Duration::from_millis(90) {
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        // Refused with most of the minute left: the quantum is what is enforced.
        let remaining: u64 = header(&refused, "x-ratelimit-remaining-requests")
            .parse()
            .unwrap();
        assert!(remaining >= 590, "{remaining}");
        let retry = parse_retry_after(header(&refused, "retry-after")).unwrap();
        assert!(retry <= Duration::from_millis(100), "{retry:?}");
        tokio::time::sleep(retry).await;
    }
    assert_eq!(post(&client, &sim, &b, None).await.status(), StatusCode::OK);
    let stats = sim.stats().await;
    assert!(stats.completions == 11 || stats.completions == 12);
}

#[tokio::test]
async fn a_quantized_token_limit_counts_prompt_plus_max_tokens_and_reports_them() {
    let img = jpeg(64, 64, 20);
    let max_tokens = 300;
    // 60,000 TPM per second: a quantum of 1,000 tokens holds two requests of this size.
    let sim = SimServer::start(SimConfig {
        tpm: 60_000,
        limit_model: LimitModel::Quantized,
        ..cfg()
    })
    .await
    .unwrap();
    let client = Client::new();
    let b = body("gpt-4o", &img, "low", max_tokens);
    let per_request = 85 + text_part() + max_tokens;
    assert!(2 * per_request <= 1_000 && 3 * per_request > 1_000);
    let started = Instant::now();
    assert_eq!(post(&client, &sim, &b, None).await.status(), StatusCode::OK);
    assert_eq!(post(&client, &sim, &b, None).await.status(), StatusCode::OK);
    let third = post(&client, &sim, &b, None).await;
    if started.elapsed() < Duration::from_millis(100) {
        assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
        let e: Value = third.json().await.unwrap();
        assert_eq!(e["error"]["type"], "tokens");
    }
    let stats = sim.stats().await;
    assert_eq!(stats.tokens_admitted, stats.completions * per_request);
}

#[test]
fn limit_models_parse_by_name() {
    assert_eq!("quantized".parse::<LimitModel>(), Ok(LimitModel::Quantized));
    assert_eq!(
        "sliding-minute".parse::<LimitModel>(),
        Ok(LimitModel::SlidingMinute)
    );
    assert!("fixed".parse::<LimitModel>().is_err());
    assert_eq!(LimitModel::default(), LimitModel::SlidingMinute);
}

#[tokio::test]
async fn forced_faults_via_header() {
    let sim = SimServer::start(SimConfig {
        timeout_hang_ms: 3_000,
        faults: FaultPlan {
            retry_after_s: 2.5,
            ..FaultPlan::default()
        },
        ..cfg()
    })
    .await
    .unwrap();
    let client = Client::new();
    let b = body("gpt-4o", &jpeg(200, 100, 30), "low", 200);

    for (fault, status) in [
        ("500", StatusCode::INTERNAL_SERVER_ERROR),
        ("502", StatusCode::BAD_GATEWAY),
        ("503", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let resp = post(&client, &sim, &b, Some(fault)).await;
        assert_eq!(resp.status(), status, "{fault}");
        assert_limit_headers(&resp);
    }

    let resp = post(&client, &sim, &b, Some("429")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_limit_headers(&resp);
    assert_eq!(header(&resp, "retry-after"), "2.5");
    assert_eq!(
        parse_retry_after(header(&resp, "retry-after")),
        Some(Duration::from_millis(2500))
    );
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");

    let resp = post(&client, &sim, &b, Some("malformed")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(text.starts_with('{'));
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

    let resp = post(&client, &sim, &b, Some("bad-content")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(content).is_err(), "{content}");
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Timeout: the client gives up first.
    let started = Instant::now();
    let err = client
        .post(format!("{}/chat/completions", sim.base_url))
        .bearer_auth(KEY)
        .header("x-sim-fault", "timeout")
        .timeout(Duration::from_millis(400))
        .json(&b)
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A client that waits longer than the hang sees the connection dropped, not a response.
    let started = Instant::now();
    let resp = client
        .post(format!("{}/chat/completions", sim.base_url))
        .bearer_auth(KEY)
        .header("x-sim-fault", "timeout")
        .timeout(Duration::from_secs(20))
        .json(&b)
        .send()
        .await;
    let failed = match resp {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(failed, "a timeout fault must not yield a complete response");
    assert!(started.elapsed() >= Duration::from_millis(2_900));

    // "none" overrides the plan; the plain request succeeds.
    assert_eq!(
        post(&client, &sim, &b, Some("none")).await.status(),
        StatusCode::OK
    );

    let stats = sim.stats().await;
    assert_eq!(stats.faults.http_500, 1);
    assert_eq!(stats.faults.http_502, 1);
    assert_eq!(stats.faults.http_503, 1);
    assert_eq!(stats.faults.rate_limit, 1);
    assert_eq!(stats.faults.malformed, 1);
    assert_eq!(stats.faults.bad_content, 1);
    assert_eq!(stats.faults.timeout, 2);
    assert_eq!(stats.faults.total(), 8);
    assert_eq!(stats.completions, 1);
    assert_eq!(stats.rate_limited, 0);
    assert_eq!(stats.requests, 9);
    // All nine calls carried the same image.
    assert_eq!(
        stats
            .requests_per_image
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![9]
    );
    assert_eq!(
        stats
            .completions_per_image
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![1]
    );
}

#[tokio::test]
async fn every_nth_schedule_is_deterministic() {
    let sim = SimServer::start(SimConfig {
        faults: FaultPlan {
            every_nth: Some(EveryNth {
                n: 3,
                fault: Fault::Http503,
            }),
            ..FaultPlan::default()
        },
        ..cfg()
    })
    .await
    .unwrap();
    let client = Client::new();
    let b = body("gpt-4o", &jpeg(64, 64, 5), "low", 200);
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(post(&client, &sim, &b, None).await.status().as_u16());
    }
    assert_eq!(statuses, vec![200, 200, 503, 200, 200, 503, 200]);
    assert_eq!(sim.stats().await.faults.http_503, 2);
}

async fn run_probabilistic(seed: u64) -> Vec<u16> {
    let sim = SimServer::start(SimConfig {
        seed,
        faults: FaultPlan {
            error_rate: 0.3,
            malformed_rate: 0.2,
            ..FaultPlan::default()
        },
        ..cfg()
    })
    .await
    .unwrap();
    let client = Client::new();
    let b = body("gpt-4o", &jpeg(64, 64, 5), "low", 200);
    let mut out = Vec::new();
    for _ in 0..30 {
        let resp = post(&client, &sim, &b, None).await;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        // Encode malformed 200s as 1 so they count separately.
        let parsed = serde_json::from_str::<Value>(&text).is_ok();
        out.push(if status == 200 && !parsed { 1 } else { status });
    }
    let stats = sim.stats().await;
    let ok = out.iter().filter(|s| **s == 200).count() as u64;
    let malformed = out.iter().filter(|s| **s == 1).count() as u64;
    assert_eq!(stats.completions, ok);
    assert_eq!(stats.faults.malformed, malformed);
    assert_eq!(
        stats.faults.http_500 + stats.faults.http_502 + stats.faults.http_503,
        out.iter().filter(|s| **s >= 500).count() as u64
    );
    out
}

#[tokio::test]
async fn probabilistic_faults_are_reproducible_with_a_seed() {
    let a = run_probabilistic(7).await;
    let b = run_probabilistic(7).await;
    assert_eq!(a, b);
    let c = run_probabilistic(8).await;
    assert_ne!(a, c, "a different seed gives a different sequence");
    assert!(
        a.contains(&200) && a.iter().any(|s| *s >= 500) && a.contains(&1),
        "{a:?}"
    );
}

#[tokio::test]
async fn poison_images_are_always_rejected_with_400_as_is_poison_predicts() {
    let seed = 11;
    let rate = 0.3;
    let sim = SimServer::start(SimConfig {
        seed,
        faults: FaultPlan {
            poison_rate: rate,
            ..FaultPlan::default()
        },
        ..cfg()
    })
    .await
    .unwrap();
    let client = Client::new();
    // 40 distinct images: different sizes and shades.
    let images: Vec<Vec<u8>> = (0..40u32)
        .map(|i| jpeg(40 + i, 32 + (i % 7), (i * 6) as u8))
        .collect();
    let shas: Vec<String> = images.iter().map(|im| sha(im)).collect();
    let mut distinct = shas.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 40, "the images are distinct");
    let poison: Vec<bool> = shas.iter().map(|s| is_poison(seed, s, rate)).collect();
    let n_poison = poison.iter().filter(|p| **p).count() as u64;
    assert!(
        n_poison > 0 && n_poison < 40,
        "seed {seed} gives a mix: {n_poison} poison"
    );

    // Ask twice: the answer depends on the image only. A forced "none" does not save a poison
    // image either.
    for round in 0..2 {
        for (img, is_p) in images.iter().zip(&poison) {
            let fault = (round == 1).then_some("none");
            let resp = post(&client, &sim, &body("gpt-4o", img, "low", 200), fault).await;
            if *is_p {
                assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
                assert_limit_headers(&resp);
                let e: Value = resp.json().await.unwrap();
                assert_eq!(e["error"]["code"], "image_rejected");
                assert_eq!(e["error"]["type"], "invalid_request_error");
                assert_eq!(e["error"]["param"], Value::Null);
                let msg = e["error"]["message"].as_str().unwrap();
                assert!(
                    msg.contains("image was rejected (simulated poison image)"),
                    "{msg}"
                );
            } else {
                assert_eq!(resp.status(), StatusCode::OK);
                let v: Value = resp.json().await.unwrap();
                assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
            }
        }
    }

    let stats = sim.stats().await;
    assert_eq!(stats.requests, 80);
    assert_eq!(stats.poisoned, 2 * n_poison);
    assert_eq!(stats.poisoned_images, n_poison);
    assert_eq!(stats.completions, 2 * (40 - n_poison));
    assert_eq!(stats.bad_requests, 0, "poison is counted on its own");
    assert_eq!(stats.faults.total(), 0);
    for (s, is_p) in shas.iter().zip(&poison) {
        assert_eq!(stats.requests_per_image[s], 2, "every call is counted");
        assert_eq!(
            stats.poisoned_per_image.get(s).copied().unwrap_or(0),
            if *is_p { 2 } else { 0 }
        );
        assert_eq!(
            stats.completions_per_image.get(s).copied().unwrap_or(0),
            if *is_p { 0 } else { 2 }
        );
    }
    // Poison answers are billed nothing.
    assert_eq!(
        stats.prompt_tokens,
        2 * (40 - n_poison) * (85 + text_part())
    );
}

#[tokio::test]
async fn poison_rate_is_validated_on_its_own_not_in_the_probability_sum() {
    let sim = SimServer::start(cfg()).await.unwrap();
    let with = |poison_rate: f64, error_rate: f64| SimConfig {
        faults: FaultPlan {
            poison_rate,
            error_rate,
            ..FaultPlan::default()
        },
        ..cfg()
    };
    sim.set_config(with(0.5, 0.9)).await.unwrap();
    sim.set_config(with(1.0, 1.0)).await.unwrap();
    assert!(sim.set_config(with(1.5, 0.0)).await.is_err());
    assert!(sim.set_config(with(-0.1, 0.0)).await.is_err());
    let resp = Client::new()
        .post(sim.url("/sim/config"))
        .json(&json!({"faults": {"poison_rate": 0.25}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(sim.config().await.faults.poison_rate, 0.25);
    // The edges of the helper.
    assert!(!is_poison(1, "abc", 0.0));
    assert!(is_poison(1, "abc", 1.0));
    assert_eq!(is_poison(1, "abc", 0.5), is_poison(1, "abc", 0.5));
}

#[tokio::test]
async fn stats_reset_and_config_over_http() {
    let sim = SimServer::start(cfg()).await.unwrap();
    let client = Client::new();
    let img1 = jpeg(100, 100, 1);
    let img2 = jpeg(100, 100, 200);
    for img in [&img1, &img1, &img2] {
        let resp = post(&client, &sim, &body("gpt-4o", img, "low", 200), None).await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    let http: Value = client
        .get(sim.url("/sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(http["requests"], 3);
    assert_eq!(http["completions"], 3);
    assert_eq!(http["requests_per_image"][sha(&img1)], 2);
    assert_eq!(http["requests_per_image"][sha(&img2)], 1);
    let direct = sim.stats().await;
    assert_eq!(serde_json::to_value(&direct).unwrap(), http);
    assert_eq!(
        direct.tokens_billed,
        direct.prompt_tokens + direct.completion_tokens
    );
    assert_eq!(direct.prompt_tokens, 3 * (85 + text_part()));
    assert_eq!(direct.in_flight, 0);
    assert!(direct.peak_in_flight >= 1);

    // Reset.
    let resp = client.post(sim.url("/sim/reset")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let s = sim.stats().await;
    assert_eq!(s.requests, 0);
    assert_eq!(s.tokens_billed, 0);
    assert!(s.requests_per_image.is_empty());

    // Partial config patch: RPM 1 and a 504 schedule on every 2nd request.
    let resp = client
        .post(sim.url("/sim/config"))
        .json(&json!({"rpm": 1, "faults": {"every_nth": {"n": 2, "fault": "504"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let new_cfg: Value = resp.json().await.unwrap();
    assert_eq!(new_cfg["rpm"], 1);
    assert_eq!(
        new_cfg["api_key"], KEY,
        "unpatched fields keep their values"
    );
    assert_eq!(
        sim.config().await.faults.every_nth.unwrap().fault,
        Fault::Http504
    );
    let b = body("gpt-4o", &img1, "low", 200);
    assert_eq!(post(&client, &sim, &b, None).await.status(), StatusCode::OK);
    // The 2nd valid request is scheduled for a 504, but a 5xx needs admission first: RPM 1 → 429.
    let second = post(&client, &sim, &b, None).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&second, "x-ratelimit-limit-requests"), "1");

    // Invalid patches are rejected and leave the config alone.
    for bad in [
        json!({"rpm": "lots"}),
        json!({"faults": {"error_rate": 1.5}}),
        json!({"no_such_knob": 1}),
        json!({"faults": {"error_statuses": [418]}}),
    ] {
        let resp = client
            .post(sim.url("/sim/config"))
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    assert_eq!(sim.config().await.rpm, 1);

    // Library API: set_config.
    sim.set_config(cfg()).await.unwrap();
    assert!(sim
        .set_config(SimConfig {
            faults: FaultPlan {
                error_rate: 0.7,
                timeout_rate: 0.7,
                ..FaultPlan::default()
            },
            ..cfg()
        })
        .await
        .is_err());
}

#[tokio::test]
async fn latency_is_applied() {
    let sim = SimServer::start(SimConfig {
        latency_ms: 250,
        jitter_ms: 50,
        ..cfg()
    })
    .await
    .unwrap();
    let client = Client::new();
    let b = body("gpt-4o", &jpeg(64, 64, 5), "low", 200);
    let started = Instant::now();
    assert_eq!(post(&client, &sim, &b, None).await.status(), StatusCode::OK);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn a_request_whose_client_gave_up_is_still_answered_and_billed() {
    let sim = SimServer::start(SimConfig {
        latency_ms: 400,
        ..cfg()
    })
    .await
    .unwrap();
    let impatient = Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let b = body("gpt-4o", &jpeg(64, 64, 9), "low", 200);
    let r = impatient
        .post(format!("{}/chat/completions", sim.base_url))
        .bearer_auth(KEY)
        .json(&b)
        .send()
        .await;
    assert!(r.is_err(), "the client timed out");
    // Like OpenAI: the generation runs to the end and is billed although nobody reads it.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stats = sim.stats().await;
    assert_eq!(stats.completions, 1, "{stats:?}");
    assert!(stats.tokens_billed > 0);
}

#[tokio::test]
async fn binds_loopback_only_and_stops() {
    let sim = SimServer::start(cfg()).await.unwrap();
    assert!(sim.addr().ip().is_loopback());
    assert!(sim.base_url.starts_with("http://127.0.0.1:") && sim.base_url.ends_with("/v1"));
    let models: Value = Client::new()
        .get(format!("{}/models", sim.base_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "gpt-4o"));
    let url = sim.url("/sim/stats");
    sim.shutdown_and_wait().await;
    assert!(Client::new().get(url).send().await.is_err());
}

// ---------------------------------------------------------------------------------------------
// Anthropic Messages API (`POST /v1/messages`)
// ---------------------------------------------------------------------------------------------

fn anthropic_body(model: &str, image: &[u8], max_tokens: u64) -> Value {
    json!({
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{
            "role": "user",
            "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                    "data": base64::engine::general_purpose::STANDARD.encode(image)}},
                {"type": "text", "text": PROMPT}
            ]
        }]
    })
}

async fn post_messages(
    client: &Client,
    sim: &SimServer,
    body: &Value,
    fault: Option<&str>,
) -> reqwest::Response {
    let mut req = client
        .post(format!("{}/v1/messages", sim.anthropic_base_url()))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(body);
    if let Some(f) = fault {
        req = req.header("x-sim-fault", f);
    }
    req.send().await.unwrap()
}

/// Seconds from now until an `anthropic-ratelimit-*-reset` instant (negative if past).
fn reset_in(resp: &reqwest::Response, name: &str) -> f64 {
    let at = time::OffsetDateTime::parse(
        header(resp, name),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    (at - time::OffsetDateTime::now_utc()).as_seconds_f64()
}

fn assert_anthropic_error(v: &Value, kind: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(!v["error"]["message"].as_str().unwrap().is_empty(), "{v}");
}

#[tokio::test]
async fn anthropic_messages_answer_in_text_blocks_with_usage_by_the_claude_image_rule() {
    let sim = SimServer::start(cfg()).await.unwrap();
    let client = Client::new();
    let img = jpeg(1024, 768, 70);
    let resp = post_messages(
        &client,
        &sim,
        &anthropic_body("claude-haiku-4-5", &img, 500),
        None,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    for h in [
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-remaining",
    ] {
        header(&resp, h).parse::<u64>().unwrap();
    }
    for h in [
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
    ] {
        let s = reset_in(&resp, h);
        assert!((-1.0..=2.0).contains(&s), "{h}: {s}");
    }
    assert!(header(&resp, "request-id").starts_with("req_"));
    assert!(resp
        .headers()
        .get("x-ratelimit-remaining-requests")
        .is_none());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-haiku-4-5");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["content"][0]["type"], "text");
    let text = v["content"][0]["text"].as_str().unwrap();
    let analysis: Value = serde_json::from_str(text).unwrap();
    assert!(analysis["description"]
        .as_str()
        .unwrap()
        .contains("1024x768"));
    // Input = the model's image rule + the text, as documented: one message's overhead.
    let image = PriceTable::builtin()
        .model("claude-haiku-4-5")
        .unwrap()
        .image_tokens(1024, 768, Detail::High);
    assert_eq!(image, 1049, "Claude: ceil(1024·768/750)");
    let usage = &v["usage"];
    assert_eq!(
        usage["input_tokens"].as_u64().unwrap(),
        image + MESSAGE_OVERHEAD_TOKENS + text_tokens(PROMPT)
    );
    assert_eq!(usage["output_tokens"].as_u64().unwrap(), text_tokens(text));
    assert_eq!(usage["cache_read_input_tokens"], 0);

    // The same image gets the same analysis on either route.
    let openai: Value = post(
        &client,
        &sim,
        &body("claude-haiku-4-5", &img, "high", 500),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(openai["choices"][0]["message"]["content"], text);

    // A small max_tokens cuts the text with stop_reason max_tokens.
    let cut: Value = post_messages(
        &client,
        &sim,
        &anthropic_body("claude-haiku-4-5", &img, 10),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(cut["stop_reason"], "max_tokens");
    assert_eq!(cut["usage"]["output_tokens"], 10);

    let stats = sim.stats().await;
    assert_eq!((stats.requests, stats.completions), (3, 3));
    assert_eq!(stats.requests_per_image[&sha(&img)], 3);
}

#[tokio::test]
async fn anthropic_auth_needs_x_api_key_then_anthropic_version() {
    let sim = SimServer::start(cfg()).await.unwrap();
    let client = Client::new();
    let url = format!("{}/v1/messages", sim.anthropic_base_url());
    let b = anthropic_body("claude-haiku-4-5", &jpeg(64, 64, 1), 100);
    for (key, version, status, kind) in [
        (None, Some("2023-06-01"), 401, "authentication_error"),
        (
            Some("sk-wrong"),
            Some("2023-06-01"),
            401,
            "authentication_error",
        ),
        (Some(KEY), None, 400, "invalid_request_error"),
    ] {
        let mut req = client.post(&url).json(&b);
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        if let Some(v) = version {
            req = req.header("anthropic-version", v);
        }
        // A bearer key is not how Anthropic authenticates.
        let resp = req.bearer_auth(KEY).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{key:?} {version:?}");
        assert_anthropic_error(&resp.json().await.unwrap(), kind);
    }
    let stats = sim.stats().await;
    assert_eq!((stats.unauthorized, stats.bad_requests), (2, 1));
    assert_eq!(stats.completions, 0);
}

#[tokio::test]
async fn anthropic_route_serves_claude_models_only_and_checks_its_body() {
    let sim = SimServer::start(cfg()).await.unwrap();
    let client = Client::new();
    let img = jpeg(64, 64, 2);
    let resp = post_messages(&client, &sim, &anthropic_body("gpt-4o", &img, 100), None).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_anthropic_error(&resp.json().await.unwrap(), "not_found_error");

    let mut no_max = anthropic_body("claude-haiku-4-5", &img, 100);
    no_max.as_object_mut().unwrap().remove("max_tokens");
    let mut bad_media = anthropic_body("claude-haiku-4-5", &img, 100);
    bad_media["messages"][0]["content"][0]["source"]["media_type"] = json!("image/bmp");
    let mut image_from_assistant = anthropic_body("claude-haiku-4-5", &img, 100);
    image_from_assistant["messages"][0]["role"] = json!("assistant");
    let mut not_an_image = anthropic_body("claude-haiku-4-5", &img, 100);
    not_an_image["messages"][0]["content"][0]["source"]["data"] =
        json!(base64::engine::general_purpose::STANDARD.encode(b"not an image"));
    for b in [no_max, bad_media, image_from_assistant, not_an_image] {
        let resp = post_messages(&client, &sim, &b, None).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{b}");
        assert_anthropic_error(&resp.json().await.unwrap(), "invalid_request_error");
    }
    let stats = sim.stats().await;
    assert_eq!((stats.not_found, stats.bad_requests), (1, 4));
}

#[tokio::test]
async fn anthropic_faults_speak_anthropic_and_share_the_fault_plan() {
    let sim = SimServer::start(SimConfig {
        timeout_hang_ms: 2_000,
        faults: FaultPlan {
            retry_after_s: 2.5,
            ..FaultPlan::default()
        },
        ..cfg()
    })
    .await
    .unwrap();
    let client = Client::new();
    let b = anthropic_body("claude-haiku-4-5", &jpeg(200, 100, 30), 300);

    let resp = post_messages(&client, &sim, &b, Some("429")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    // Whole seconds, rounded up.
    assert_eq!(header(&resp, "retry-after"), "3");
    assert_eq!(header(&resp, "anthropic-ratelimit-requests-remaining"), "0");
    assert_anthropic_error(&resp.json().await.unwrap(), "rate_limit_error");

    for (fault, status, kind) in [
        ("503", 529, "overloaded_error"),
        ("529", 529, "overloaded_error"),
        ("500", 500, "api_error"),
        ("504", 504, "api_error"),
    ] {
        let resp = post_messages(&client, &sim, &b, Some(fault)).await;
        assert_eq!(resp.status().as_u16(), status, "{fault}");
        assert!(resp
            .headers()
            .contains_key("anthropic-ratelimit-requests-remaining"));
        assert_anthropic_error(&resp.json().await.unwrap(), kind);
    }

    let resp = post_messages(&client, &sim, &b, Some("malformed")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

    let v: Value = post_messages(&client, &sim, &b, Some("bad-content"))
        .await
        .json()
        .await
        .unwrap();
    let content = v["content"][0]["text"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(content).is_err(), "{content}");
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 0);

    let err = client
        .post(format!("{}/v1/messages", sim.anthropic_base_url()))
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .header("x-sim-fault", "timeout")
        .timeout(Duration::from_millis(300))
        .json(&b)
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");

    let stats = sim.stats().await;
    assert_eq!(stats.faults.rate_limit, 1);
    assert_eq!(stats.faults.http_503, 2);
    assert_eq!(stats.faults.http_500, 1);
    assert_eq!(stats.faults.http_504, 1);
    assert_eq!(stats.faults.malformed, 1);
    assert_eq!(stats.faults.bad_content, 1);
    assert_eq!(stats.faults.timeout, 1);
    assert_eq!(stats.completions, 0);
}

#[tokio::test]
async fn both_routes_share_one_key_s_rate_limit_windows() {
    let sim = SimServer::start(SimConfig { rpm: 2, ..cfg() })
        .await
        .unwrap();
    let client = Client::new();
    let img = jpeg(64, 64, 3);
    assert_eq!(
        post(&client, &sim, &body("gpt-4o", &img, "low", 100), None)
            .await
            .status(),
        StatusCode::OK
    );
    let ok = post_messages(
        &client,
        &sim,
        &anthropic_body("claude-haiku-4-5", &img, 100),
        None,
    )
    .await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(header(&ok, "anthropic-ratelimit-requests-limit"), "2");
    assert_eq!(header(&ok, "anthropic-ratelimit-requests-remaining"), "0");

    let limited = post_messages(
        &client,
        &sim,
        &anthropic_body("claude-haiku-4-5", &img, 100),
        None,
    )
    .await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = header(&limited, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let reset = reset_in(&limited, "anthropic-ratelimit-requests-reset");
    assert!(reset > 50.0 && reset <= 61.0, "{reset}");
    assert_anthropic_error(&limited.json().await.unwrap(), "rate_limit_error");
    assert_eq!(sim.stats().await.rate_limited, 1);
}

// ---------------------------------------------------------------------------------------------
// Batch endpoints (OpenAI Files + Batches) and the OpenAI batch client
// ---------------------------------------------------------------------------------------------

mod openai_batch {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use reqwest::{Client, StatusCode};
    use serde_json::{json, Value};
    use sightline_core::batch::BatchPhase;
    use sightline_core::model::Detail;
    use sightline_core::pricing::DEFAULT_PROMPT;
    use sightline_core::retry::FailureKind;
    use sightline_pipeline::ports::{
        BatchLine, BatchProvider, BatchRequest, LineOutcome, ProviderBatch, VisionProvider,
        VisionRequest,
    };
    use sightline_pipeline::providers::openai::OpenAiProvider;
    use sightline_pipeline::providers::openai_batch::OpenAiBatchProvider;
    use sightline_tests::sim::{is_poison, BatchConfig, FaultPlan, SimConfig, SimServer};

    use super::{cfg, jpeg, sha, KEY};

    const MODEL: &str = "gpt-4.1-mini";

    fn batch_cfg(batch: BatchConfig) -> SimConfig {
        SimConfig {
            batch: BatchConfig {
                delay_ms: 150,
                ..batch
            },
            ..cfg()
        }
    }

    fn request(i: u8) -> VisionRequest {
        let (w, h) = (200 + u32::from(i) * 40, 160 + u32::from(i) * 10);
        VisionRequest {
            model: MODEL.into(),
            jpeg: Arc::new(jpeg(w, h, i.wrapping_mul(37))),
            width: w,
            height: h,
            prompt: DEFAULT_PROMPT.into(),
            max_output_tokens: 400,
            detail: if i.is_multiple_of(2) {
                Detail::High
            } else {
                Detail::Low
            },
            check: None,
        }
    }

    fn batch_requests(n: u8) -> Vec<BatchRequest> {
        (0..n)
            .map(|i| BatchRequest {
                custom_id: sightline_core::batch::custom_id(&format!("key-{i}")),
                request: request(i),
            })
            .collect()
    }

    fn client(sim: &SimServer) -> OpenAiBatchProvider {
        OpenAiBatchProvider::new(&sim.base_url, KEY, Duration::from_secs(10)).unwrap()
    }

    async fn submit(p: &OpenAiBatchProvider, batch_id: &str, reqs: &[BatchRequest]) -> String {
        let encoded = reqs.iter().map(|r| p.encode(r).unwrap()).collect();
        p.submit(batch_id, encoded).await.unwrap()
    }

    async fn wait_ended(p: &dyn BatchProvider, id: &str) -> ProviderBatch {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let b = p.status(id).await.unwrap();
            if b.phase != BatchPhase::Running {
                return b;
            }
            assert!(Instant::now() < until, "batch {id} still {}", b.status);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    fn by_id<'a>(lines: &'a [BatchLine], custom_id: &str) -> &'a LineOutcome {
        &lines
            .iter()
            .find(|l| l.custom_id == custom_id)
            .unwrap_or_else(|| panic!("no line for {custom_id}"))
            .outcome
    }

    #[tokio::test]
    async fn openai_batch_lines_cost_exactly_what_the_realtime_calls_cost() {
        let sim = SimServer::start(batch_cfg(BatchConfig::default()))
            .await
            .unwrap();
        let p = client(&sim);
        assert_eq!(p.limits(), sightline_core::batch::OPENAI_BATCH_LIMITS);
        let reqs = batch_requests(3);
        let id = submit(&p, "b-1", &reqs).await;
        assert!(id.starts_with("batch_"), "{id}");
        let ended = wait_ended(&p, &id).await;
        assert_eq!(
            (ended.status.as_str(), ended.phase),
            ("completed", BatchPhase::Ended)
        );
        assert_eq!(ended.error, None);
        let lines = p.results(&id).await.unwrap();
        assert_eq!(lines.len(), 3);
        let realtime = OpenAiProvider::new(&sim.base_url, KEY, Duration::from_secs(10)).unwrap();
        let mut input = 0;
        let mut output = 0;
        for r in &reqs {
            let LineOutcome::Answered(answer) = by_id(&lines, &r.custom_id) else {
                panic!("{:?}", by_id(&lines, &r.custom_id))
            };
            let now = realtime.analyze(&r.request).await.unwrap();
            assert_eq!(answer.usage, now.usage, "same tokens as the real-time call");
            assert_eq!(answer.analysis, now.analysis, "same answer");
            assert_eq!(answer.model, MODEL);
            let u = answer.usage.unwrap();
            input += u.input_tokens;
            output += u.output_tokens;
        }
        let s = sim.stats().await.batch;
        assert_eq!(s.batches_created, 1);
        assert_eq!(s.batches_ended, 1);
        assert_eq!(s.lines_billed, 3);
        assert_eq!((s.input_tokens, s.output_tokens), (input, output));
        assert_eq!(s.results_fetches, 1, "one output file, no error file");
    }

    /// Uploads `jsonl` as a batch input file; the raw response.
    async fn upload(sim: &SimServer, jsonl: String) -> reqwest::Response {
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::bytes(jsonl.into_bytes()).file_name("in.jsonl"),
            );
        Client::new()
            .post(format!("{}/files", sim.base_url))
            .bearer_auth(KEY)
            .multipart(form)
            .send()
            .await
            .unwrap()
    }

    fn jsonl_line(custom_id: &str, url: &str) -> String {
        json!({"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "json please"}]}})
        .to_string()
    }

    #[tokio::test]
    async fn file_uploads_check_lines_custom_ids_and_the_configured_limits() {
        let sim = SimServer::start(batch_cfg(BatchConfig {
            max_file_lines: 2,
            max_file_bytes: 1_000,
            ..BatchConfig::default()
        }))
        .await
        .unwrap();
        let ok = format!(
            "{}\n{}\n",
            jsonl_line("a", "/v1/chat/completions"),
            jsonl_line("b", "/v1/chat/completions")
        );
        let resp = upload(&sim, ok.clone()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let file: Value = resp.json().await.unwrap();
        assert_eq!(file["object"], "file");
        assert_eq!(file["purpose"], "batch");
        assert_eq!(file["bytes"], ok.len());
        assert!(file["id"].as_str().unwrap().starts_with("file-"));
        let content = Client::new()
            .get(format!(
                "{}/files/{}/content",
                sim.base_url,
                file["id"].as_str().unwrap()
            ))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(content.text().await.unwrap(), ok);

        for (bad, why) in [
            (
                format!(
                    "{}\n{}\n",
                    jsonl_line("a", "/v1/chat/completions"),
                    jsonl_line("a", "/v1/chat/completions")
                ),
                "duplicate",
            ),
            (format!("{}\n", jsonl_line("a", "/v1/embeddings")), "url"),
            ("{not json\n".to_string(), "JSON"),
            (
                (0..3)
                    .map(|i| jsonl_line(&i.to_string(), "/v1/chat/completions") + "\n")
                    .collect(),
                "more than 2",
            ),
            (
                format!(
                    "{}\n",
                    jsonl_line(&"x".repeat(1_000), "/v1/chat/completions")
                ),
                "too large",
            ),
        ] {
            let resp = upload(&sim, bad).await;
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{why}");
            let v: Value = resp.json().await.unwrap();
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(msg.contains(why), "{why}: {msg}");
        }
        assert_eq!(sim.stats().await.batch.files_uploaded, 1);
    }

    #[tokio::test]
    async fn a_batch_walks_validating_in_progress_then_completed_and_lists_newest_first() {
        let sim = SimServer::start(SimConfig {
            batch: BatchConfig {
                delay_ms: 600,
                ..BatchConfig::default()
            },
            ..cfg()
        })
        .await
        .unwrap();
        let p = client(&sim);
        let first = submit(&p, "first", &batch_requests(1)).await;
        let second = submit(&p, "second", &batch_requests(2)).await;
        let get = |id: String| {
            let url = format!("{}/batches/{id}", sim.base_url);
            async move {
                let v: Value = Client::new()
                    .get(url)
                    .bearer_auth(KEY)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                v
            }
        };
        let v = get(second.clone()).await;
        assert_eq!(v["status"], "validating");
        assert_eq!(v["request_counts"]["total"], 2);
        assert_eq!(v["metadata"]["sightline_batch"], "second");
        assert_eq!(v["completion_window"], "24h");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(get(second.clone()).await["status"], "in_progress");
        let done = wait_ended(&p, &second).await;
        assert_eq!(done.status, "completed");
        let v = get(second.clone()).await;
        assert_eq!(
            v["request_counts"],
            json!({"total": 2, "completed": 2, "failed": 0})
        );
        assert!(v["output_file_id"].is_string());
        assert!(
            v["error_file_id"].is_null(),
            "no failed line, no error file"
        );
        assert!(v["completed_at"].is_u64());

        let list: Value = Client::new()
            .get(format!("{}/batches?limit=1", sim.base_url))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list["data"][0]["id"], second.as_str(), "newest first");
        assert_eq!(list["has_more"], true);
        assert_eq!(list["last_id"], second.as_str());
        let rest: Value = Client::new()
            .get(format!("{}/batches?limit=5&after={second}", sim.base_url))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(rest["data"][0]["id"], first.as_str());
        assert_eq!(rest["has_more"], false);
    }

    #[tokio::test]
    async fn a_batch_over_the_enqueued_token_limit_is_created_then_fails_token_limit_exceeded() {
        let sim = SimServer::start(batch_cfg(BatchConfig {
            delay_ms: 400,
            enqueued_token_limit: 1,
            ..BatchConfig::default()
        }))
        .await
        .unwrap();
        let p = client(&sim);
        // Even one batch alone is over a limit of one token: the create still succeeds.
        let id = submit(&p, "too-big", &batch_requests(2)).await;
        let b = wait_ended(&p, &id).await;
        assert_eq!((b.status.as_str(), b.phase), ("failed", BatchPhase::Failed));
        let error = b.error.expect("the reason");
        assert!(error.starts_with("token_limit_exceeded: "), "{error}");
        assert!(p.results(&id).await.unwrap().is_empty(), "nothing ran");

        // A limit that holds one batch: the second, sent while the first runs, fails; once
        // the first has ended there is room again.
        let mut c = sim.config().await;
        let one = {
            let probe = SimServer::start(batch_cfg(BatchConfig::default()))
                .await
                .unwrap();
            let pp = client(&probe);
            let pid = submit(&pp, "probe", &batch_requests(2)).await;
            wait_ended(&pp, &pid).await;
            probe.stats().await.batch.input_tokens
        };
        c.batch.enqueued_token_limit = one + one / 2;
        sim.set_config(c).await.unwrap();
        let a = submit(&p, "a", &batch_requests(2)).await;
        let b = submit(&p, "b", &batch_requests(2)).await;
        assert_eq!(wait_ended(&p, &b).await.phase, BatchPhase::Failed);
        assert_eq!(wait_ended(&p, &a).await.phase, BatchPhase::Ended);
        let c2 = submit(&p, "c", &batch_requests(2)).await;
        assert_eq!(wait_ended(&p, &c2).await.status, "completed");
        let s = sim.stats().await.batch;
        assert_eq!(s.batches_created, 4);
        assert_eq!(s.batches_failed, 2);
        assert_eq!(s.lines_billed, 4, "failed batches bill nothing");
    }

    #[tokio::test]
    async fn a_validation_failure_fails_the_whole_batch_with_its_error() {
        let sim = SimServer::start(batch_cfg(BatchConfig {
            fail_validation: true,
            ..BatchConfig::default()
        }))
        .await
        .unwrap();
        let p = client(&sim);
        let id = submit(&p, "v", &batch_requests(2)).await;
        let b = wait_ended(&p, &id).await;
        assert_eq!(b.phase, BatchPhase::Failed);
        assert!(b.error.unwrap().starts_with("invalid_request: "));
        let s = sim.stats().await.batch;
        assert_eq!((s.batches_failed, s.lines_billed), (1, 0));
    }

    #[tokio::test]
    async fn an_expired_batch_answers_part_of_its_lines_and_leaves_the_rest_unprocessed() {
        let sim = SimServer::start(batch_cfg(BatchConfig {
            expire_done_fraction: Some(0.5),
            ..BatchConfig::default()
        }))
        .await
        .unwrap();
        let p = client(&sim);
        let reqs = batch_requests(4);
        let id = submit(&p, "e", &reqs).await;
        let b = wait_ended(&p, &id).await;
        assert_eq!((b.status.as_str(), b.phase), ("expired", BatchPhase::Ended));
        let lines = p.results(&id).await.unwrap();
        assert_eq!(lines.len(), 4);
        for (i, r) in reqs.iter().enumerate() {
            match (i < 2, by_id(&lines, &r.custom_id)) {
                (true, LineOutcome::Answered(_)) => {}
                (false, LineOutcome::Unprocessed(why)) => {
                    assert!(why.starts_with("batch_expired"), "{why}")
                }
                (_, other) => panic!("line {i}: {other:?}"),
            }
        }
        let s = sim.stats().await.batch;
        assert_eq!(s.batches_expired, 1);
        assert_eq!((s.lines_billed, s.lines_unprocessed), (2, 2));
        assert_eq!(s.results_fetches, 2, "an output file and an error file");
    }

    #[tokio::test]
    async fn shuffled_output_maps_by_custom_id_and_results_can_be_fetched_again() {
        let sim = SimServer::start(batch_cfg(BatchConfig {
            shuffle: true,
            ..BatchConfig::default()
        }))
        .await
        .unwrap();
        let p = client(&sim);
        let reqs = batch_requests(8);
        let id = submit(&p, "s", &reqs).await;
        wait_ended(&p, &id).await;
        let first = p.results(&id).await.unwrap();
        let order: Vec<&str> = first.iter().map(|l| l.custom_id.as_str()).collect();
        let input: Vec<&str> = reqs.iter().map(|r| r.custom_id.as_str()).collect();
        assert_ne!(order, input, "shuffled");
        let again = p.results(&id).await.unwrap();
        let again_order: Vec<&str> = again.iter().map(|l| l.custom_id.as_str()).collect();
        assert_eq!(order, again_order, "the same file each time");
        for r in &reqs {
            let LineOutcome::Answered(a) = by_id(&first, &r.custom_id) else {
                panic!()
            };
            // Each answer describes its own image (sizes differ per request).
            let size = format!("{}x{}", r.request.width, r.request.height);
            assert!(
                a.analysis["description"].as_str().unwrap().contains(&size),
                "{size}"
            );
        }
        let s = sim.stats().await.batch;
        assert_eq!(s.results_fetches, 2);
        assert_eq!(s.lines_billed, 8, "fetching twice bills nothing more");
    }

    #[tokio::test]
    async fn line_faults_and_poison_images_fail_lines_and_only_answered_lines_bill() {
        let sim = SimServer::start(batch_cfg(BatchConfig {
            transient_error_rate: 0.2,
            permanent_error_rate: 0.2,
            invalid_output_rate: 0.2,
            ..BatchConfig::default()
        }))
        .await
        .unwrap();
        let mut c = sim.config().await;
        c.faults = FaultPlan {
            poison_rate: 0.1,
            ..FaultPlan::default()
        };
        sim.set_config(c.clone()).await.unwrap();
        let p = client(&sim);
        let reqs = batch_requests(30);
        let id = submit(&p, "f", &reqs).await;
        wait_ended(&p, &id).await;
        let lines = p.results(&id).await.unwrap();
        assert_eq!(lines.len(), 30);
        let (mut answered, mut invalid, mut transient, mut permanent, mut poisoned) =
            (0u64, 0u64, 0, 0, 0);
        let (mut input, mut output) = (0u64, 0u64);
        for r in &reqs {
            let poison = is_poison(c.seed, &sha(&r.request.jpeg), c.faults.poison_rate);
            match by_id(&lines, &r.custom_id) {
                LineOutcome::Answered(a) => {
                    assert!(!poison);
                    answered += 1;
                    let u = a.usage.unwrap();
                    (input, output) = (input + u.input_tokens, output + u.output_tokens);
                }
                LineOutcome::Failed(e) if e.kind == FailureKind::InvalidOutput => {
                    assert!(e.billed && !poison);
                    invalid += 1;
                    let u = e.usage.expect("invalid output carries usage");
                    (input, output) = (input + u.input_tokens, output + u.output_tokens);
                }
                LineOutcome::Failed(e) => {
                    assert!(!e.billed);
                    match e.kind {
                        FailureKind::Http { status: 400, .. } if poison => {
                            assert!(e.message.contains("poison"), "{}", e.message);
                            poisoned += 1
                        }
                        FailureKind::Http { status: 400, .. } => permanent += 1,
                        FailureKind::Http {
                            status: 429 | 500, ..
                        } => transient += 1,
                        ref k => panic!("{k:?}"),
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(answered > 0 && invalid > 0 && transient > 0 && permanent > 0);
        let s = sim.stats().await.batch;
        assert_eq!(s.lines_billed, answered + invalid, "provider-billed lines");
        assert_eq!(s.lines_invalid_output, invalid);
        assert_eq!((s.input_tokens, s.output_tokens), (input, output));
        assert_eq!(s.lines_errored, transient + permanent + poisoned);
        assert_eq!(s.lines_poisoned, poisoned);
        // Batch lines stay out of the real-time counters.
        assert_eq!(sim.stats().await.completions, 0);
    }

    #[tokio::test]
    async fn find_locates_an_openai_batch_by_our_batch_id() {
        let sim = SimServer::start(batch_cfg(BatchConfig::default()))
            .await
            .unwrap();
        let p = client(&sim);
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let a = submit(&p, "ours-a", &batch_requests(1)).await;
        let b = submit(&p, "ours-b", &batch_requests(1)).await;
        assert_eq!(p.find("ours-a", since).await.unwrap(), Some(a));
        assert_eq!(p.find("ours-b", since).await.unwrap(), Some(b));
        assert_eq!(p.find("never-sent", since).await.unwrap(), None);
        // Batches from before `since` are not looked at.
        assert_eq!(p.find("ours-a", since + 60_000).await.unwrap(), None);
    }
}

// ---------------------------------------------------------------------------------------------
// Image generation: `POST /v1/images/generations` through the pipeline's OpenAI generator
// ---------------------------------------------------------------------------------------------

mod images {
    use super::*;
    use sightline_core::generate::{OutputFormat, Quality, Size};
    use sightline_core::retry::{classify, FailureKind, RetryClass};
    use sightline_pipeline::ports::{GenerationCall, ImageGenerator};
    use sightline_pipeline::providers::gen_local::LocalGenerator;
    use sightline_pipeline::providers::gen_openai::OpenAiGenerator;
    use sightline_tests::sim::images::REFUSE_MARKER;

    fn call(prompt: &str, quality: Quality, format: OutputFormat) -> GenerationCall {
        GenerationCall {
            model: "gpt-image-1".into(),
            prompt: prompt.into(),
            size: Size::Pixels {
                width: 1024,
                height: 1536,
            },
            quality,
            output_format: format,
            seed: None,
        }
    }

    async fn generator(faults: FaultPlan) -> (SimServer, OpenAiGenerator) {
        let sim = SimServer::start(SimConfig { faults, ..cfg() })
            .await
            .unwrap();
        let gen = OpenAiGenerator::new(&sim.url("/v1"), KEY, Duration::from_secs(10)).unwrap();
        (sim, gen)
    }

    fn always(fault: Fault) -> FaultPlan {
        FaultPlan {
            every_nth: Some(EveryNth { n: 1, fault }),
            retry_after_s: 2.0,
            ..FaultPlan::default()
        }
    }

    #[tokio::test]
    async fn an_image_comes_back_checked_with_its_usage_and_cost() {
        let (sim, gen) = generator(FaultPlan::default()).await;
        let prompt = "a lighthouse on a cliff at dawn";
        for (format, mime) in [
            (OutputFormat::Png, "image/png"),
            (OutputFormat::Jpeg, "image/jpeg"),
            (OutputFormat::Webp, "image/webp"),
        ] {
            let img = gen
                .generate(&call(prompt, Quality::Low, format))
                .await
                .unwrap();
            assert_eq!(img.content_type, mime);
            // A real picture of the asked aspect (portrait), small.
            assert!(img.height > img.width, "{}x{}", img.width, img.height);
            let usage = img.usage.unwrap();
            assert_eq!(usage.input_tokens, text_tokens(prompt));
            // OpenAI's published output tokens for a low-quality portrait image.
            assert_eq!(usage.output_tokens, 408);
            let price = PriceTable::builtin().image_model("gpt-image-1").unwrap();
            let cost = price
                .cost_usd(img_size(), Quality::Low, Some(&usage))
                .unwrap();
            let expected = (usage.input_tokens as f64 * 5.0 + 408.0 * 40.0) / 1e6;
            assert!((cost - expected).abs() < 1e-12, "{cost}");
            // The token price lands on the published per-image figure ($0.016), near enough.
            assert!((cost - 0.016).abs() < 0.001, "{cost}");
        }
        let stats = sim.stats().await;
        assert_eq!(stats.images.images, 3);
        assert_eq!(stats.images.output_tokens, 3 * 408);
        assert_eq!(stats.images.per_model["gpt-image-1"], 3);
        assert_eq!(stats.images.billed, 3);
        assert_eq!(stats.images.usable_per_prompt[prompt], 3);
        assert_eq!(stats.requests, 0, "image calls are not vision calls");
    }

    fn img_size() -> Size {
        Size::Pixels {
            width: 1024,
            height: 1536,
        }
    }

    #[tokio::test]
    async fn a_429_keeps_its_retry_after_and_is_transient() {
        let (_sim, gen) = generator(always(Fault::RateLimit)).await;
        let e = gen
            .generate(&call("x", Quality::Low, OutputFormat::Png))
            .await
            .unwrap_err();
        match e.kind {
            FailureKind::Http {
                status: 429,
                retry_after: Some(wait),
            } => assert_eq!(wait, Duration::from_secs(2)),
            ref other => panic!("{other:?}"),
        }
        assert_eq!(classify(&e.kind), RetryClass::Transient);
        assert!(!e.billed);
    }

    #[tokio::test]
    async fn the_images_per_minute_window_refuses_the_next_image() {
        let sim = SimServer::start(SimConfig { rpm: 1, ..cfg() })
            .await
            .unwrap();
        let gen = OpenAiGenerator::new(&sim.url("/v1"), KEY, Duration::from_secs(10)).unwrap();
        gen.generate(&call("one", Quality::Low, OutputFormat::Png))
            .await
            .unwrap();
        let e = gen
            .generate(&call("two", Quality::Low, OutputFormat::Png))
            .await
            .unwrap_err();
        assert!(matches!(e.kind, FailureKind::Http { status: 429, .. }));
        assert!(e.rate.remaining_requests == Some(0), "{:?}", e.rate);
    }

    #[tokio::test]
    async fn server_errors_are_transient_and_unbilled() {
        for fault in [Fault::Http500, Fault::Http502, Fault::Http503] {
            let (_sim, gen) = generator(always(fault)).await;
            let e = gen
                .generate(&call("x", Quality::Low, OutputFormat::Png))
                .await
                .unwrap_err();
            assert_eq!(classify(&e.kind), RetryClass::Transient, "{fault}");
            assert!(!e.billed, "{fault}");
        }
    }

    #[tokio::test]
    async fn malformed_answers_and_undecodable_images_are_billed_invalid_output() {
        let (_sim, gen) = generator(always(Fault::Malformed)).await;
        let e = gen
            .generate(&call("x", Quality::Low, OutputFormat::Png))
            .await
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidOutput);
        assert!(e.billed);

        let (sim, gen) = generator(always(Fault::BadContent)).await;
        let e = gen
            .generate(&call("x", Quality::Medium, OutputFormat::Png))
            .await
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidOutput, "{}", e.message);
        assert!(e.billed);
        // The usage was reported with the bad image, so it is booked at its tokens.
        assert_eq!(e.usage.map(|u| u.output_tokens), Some(1584));
        let stats = sim.stats().await;
        assert_eq!(stats.images.images, 0);
        // Paid all the same, and not counted as a usable image of its prompt.
        assert_eq!(stats.images.billed, 1);
        assert!(stats.images.usable_per_prompt.is_empty());
    }

    #[tokio::test]
    async fn a_refused_prompt_is_permanent_and_unbilled() {
        let (sim, gen) = generator(FaultPlan::default()).await;
        let e = gen
            .generate(&call(
                &format!("please {REFUSE_MARKER} this"),
                Quality::Low,
                OutputFormat::Png,
            ))
            .await
            .unwrap_err();
        assert!(matches!(e.kind, FailureKind::Http { status: 400, .. }));
        assert_eq!(classify(&e.kind), RetryClass::Permanent);
        assert!(!e.billed);
        assert!(e.message.contains("safety system"), "{}", e.message);
        // A model the table does not price, or a size OpenAI refuses: permanent too.
        let e = gen
            .generate(&GenerationCall {
                model: "dall-e-9".into(),
                ..call("x", Quality::Low, OutputFormat::Png)
            })
            .await
            .unwrap_err();
        assert!(matches!(e.kind, FailureKind::Http { status: 404, .. }));
        let e = gen
            .generate(&GenerationCall {
                size: Size::Pixels {
                    width: 640,
                    height: 480,
                },
                ..call("x", Quality::Low, OutputFormat::Png)
            })
            .await
            .unwrap_err();
        assert!(matches!(e.kind, FailureKind::Http { status: 400, .. }));
        let stats = sim.stats().await;
        assert_eq!((stats.images.refused, stats.images.bad_requests), (1, 2));
    }

    #[tokio::test]
    async fn the_local_generator_needs_no_simulator_and_is_deterministic() {
        let size = Size::Pixels {
            width: 320,
            height: 200,
        };
        let c = GenerationCall {
            model: "local-canvas".into(),
            size,
            seed: Some(42),
            ..call("a red kite", Quality::High, OutputFormat::Jpeg)
        };
        let a = LocalGenerator.generate(&c).await.unwrap();
        let b = LocalGenerator.generate(&c).await.unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(
            image::guess_format(&a.bytes).unwrap(),
            image::ImageFormat::Jpeg
        );
        let decoded = image::load_from_memory(&a.bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (320, 200));
        let price = PriceTable::builtin().image_model(&a.model).unwrap();
        assert_eq!(price.cost_usd(size, Quality::High, None).unwrap(), 0.0);
    }
}

/// A generated image's check prompt gets a verdict: the simulator cannot see what a picture
/// shows, so a request marked `[mismatch]` fails and any other passes; the offline rule that
/// reads it is the pipeline's (`CheckVerdict::of_analysis`).
#[tokio::test]
async fn check_prompts_get_a_matches_prompt_verdict_and_plain_prompts_none() {
    use sightline_core::genjob::{check_prompt, CheckVerdict};
    use sightline_pipeline::ports::{VisionProvider, VisionRequest};
    use sightline_pipeline::providers::openai::OpenAiProvider;
    let sim = SimServer::start(cfg()).await.unwrap();
    let provider = OpenAiProvider::new(&sim.base_url, KEY, Duration::from_secs(10)).unwrap();
    let ask = |prompt: String| VisionRequest {
        model: "gpt-4o".into(),
        jpeg: std::sync::Arc::new(jpeg(320, 240, 90)),
        width: 320,
        height: 240,
        prompt,
        max_output_tokens: 400,
        detail: Detail::High,
        check: None,
    };
    let base = sightline_core::pricing::DEFAULT_PROMPT;
    let ok = provider
        .analyze(&ask(check_prompt(base, "a red lamp on a desk")))
        .await
        .unwrap();
    assert_eq!(
        CheckVerdict::of_analysis(&ok.analysis),
        CheckVerdict {
            matches: Some(true),
            issues: vec![]
        }
    );
    let bad = provider
        .analyze(&ask(check_prompt(base, "a blue chair [mismatch]")))
        .await
        .unwrap();
    let verdict = CheckVerdict::of_analysis(&bad.analysis);
    assert_eq!(verdict.matches, Some(false));
    assert_eq!(verdict.issues.len(), 1);
    let plain = provider.analyze(&ask(base.to_string())).await.unwrap();
    assert!(plain.analysis.get("matches_prompt").is_none());
}
