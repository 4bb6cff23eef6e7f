//! The Anthropic provider (`sightline_pipeline::providers::anthropic`) against the provider
//! simulator's `POST /v1/messages`: answers, usage and rate state, and how each failure is
//! classified and billed.
//!
//!   cargo test -p sightline-tests --test anthropic_provider

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use sightline_core::model::Detail;
use sightline_core::pricing::{text_tokens, PriceTable, DEFAULT_PROMPT};
use sightline_core::retry::{classify, retry_delay, FailureKind, RetryClass};
use sightline_pipeline::ports::{ProviderError, VisionProvider, VisionRequest};
use sightline_pipeline::providers::anthropic::AnthropicProvider;
use sightline_tests::sim::{
    EveryNth, Fault, FaultPlan, SimConfig, SimServer, MESSAGE_OVERHEAD_TOKENS,
};

const KEY: &str = "sk-ant-sim";
const MODEL: &str = "claude-haiku-4-5";

fn sim_config(faults: FaultPlan) -> SimConfig {
    SimConfig {
        api_key: KEY.into(),
        rpm: 50,
        tpm: 100_000,
        faults,
        timeout_hang_ms: 3_000,
        ..SimConfig::default()
    }
}

/// Every call gets `fault`.
fn always(fault: Fault) -> FaultPlan {
    FaultPlan {
        every_nth: Some(EveryNth { n: 1, fault }),
        retry_after_s: 3.0,
        ..FaultPlan::default()
    }
}

fn request(w: u32, h: u32) -> VisionRequest {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut jpeg), 80)
        .encode_image(&img)
        .unwrap();
    VisionRequest {
        model: MODEL.into(),
        jpeg: Arc::new(jpeg),
        width: w,
        height: h,
        prompt: DEFAULT_PROMPT.into(),
        max_output_tokens: 400,
        // Claude has no detail: whatever is asked, it is not sent and not billed differently.
        detail: Detail::Low,
        check: None,
    }
}

fn provider(sim: &SimServer, key: &str) -> AnthropicProvider {
    AnthropicProvider::new(&sim.anthropic_base_url(), key, Duration::from_secs(1)).unwrap()
}

async fn failure(sim: &SimServer, key: &str) -> ProviderError {
    provider(sim, key)
        .analyze(&request(320, 240))
        .await
        .expect_err("the call fails")
}

#[tokio::test]
async fn an_answer_carries_the_analysis_usage_and_the_limiters_view() {
    let sim = SimServer::start(sim_config(FaultPlan::none()))
        .await
        .unwrap();
    let p = provider(&sim, KEY);
    assert_eq!(p.name(), "anthropic");
    assert!(p.is_paid());
    let resp = p.analyze(&request(1024, 768)).await.unwrap();
    assert_eq!(resp.model, MODEL);
    assert!(resp.analysis["description"]
        .as_str()
        .unwrap()
        .contains("1024x768"));
    let usage = resp.usage.expect("usage reported");
    let image = PriceTable::builtin()
        .model(MODEL)
        .unwrap()
        .image_tokens(1024, 768, Detail::High);
    assert_eq!(
        usage.input_tokens,
        image + MESSAGE_OVERHEAD_TOKENS + text_tokens(DEFAULT_PROMPT)
    );
    assert!(usage.output_tokens > 0);
    assert_eq!(usage.cached_tokens, 0);
    // anthropic-ratelimit-* headers: one request of 50 used, its tokens off 100k, the window
    // resets within a minute.
    assert_eq!(resp.rate.remaining_requests, Some(49));
    assert_eq!(
        resp.rate.remaining_tokens,
        Some(100_000 - usage.input_tokens - 400)
    );
    for reset in [resp.rate.reset_requests, resp.rate.reset_tokens] {
        let reset = reset.expect("a reset time");
        assert!(
            reset > Duration::from_secs(55) && reset <= Duration::from_secs(61),
            "{reset:?}"
        );
    }
    assert_eq!(sim.stats().await.completions, 1);
}

#[tokio::test]
async fn a_429_is_transient_and_waits_the_retry_after() {
    let sim = SimServer::start(sim_config(always(Fault::RateLimit)))
        .await
        .unwrap();
    let e = failure(&sim, KEY).await;
    assert_eq!(
        e.kind,
        FailureKind::Http {
            status: 429,
            retry_after: Some(Duration::from_secs(3))
        }
    );
    assert_eq!(classify(&e.kind), RetryClass::Transient);
    assert_eq!(retry_delay(&e.kind, 1, 0.0), Duration::from_secs(3));
    assert!(e.message.contains("rate_limit_error"), "{}", e.message);
    // The limiter learns the requests are exhausted until the reset.
    assert_eq!(e.rate.remaining_requests, Some(0));
    assert!(!e.billed && e.usage.is_none());
}

#[tokio::test]
async fn overloaded_529_and_api_error_500_are_transient() {
    for (fault, status, kind) in [
        (Fault::Http503, 529, "overloaded_error"),
        (Fault::Http500, 500, "api_error"),
    ] {
        let sim = SimServer::start(sim_config(always(fault))).await.unwrap();
        let e = failure(&sim, KEY).await;
        assert!(
            matches!(e.kind, FailureKind::Http { status: s, .. } if s == status),
            "{:?}",
            e.kind
        );
        assert_eq!(classify(&e.kind), RetryClass::Transient, "{status}");
        assert!(e.message.contains(kind), "{}", e.message);
        assert!(!e.billed);
    }
}

#[tokio::test]
async fn a_wrong_key_is_a_permanent_401() {
    let sim = SimServer::start(sim_config(FaultPlan::none()))
        .await
        .unwrap();
    let e = failure(&sim, "sk-ant-wrong").await;
    assert!(matches!(e.kind, FailureKind::Http { status: 401, .. }));
    assert_eq!(classify(&e.kind), RetryClass::Permanent);
    assert!(e.message.contains("authentication_error"), "{}", e.message);
    assert!(!e.billed);
    assert_eq!(sim.stats().await.unauthorized, 1);
}

#[tokio::test]
async fn a_model_the_messages_api_does_not_serve_is_a_permanent_404() {
    let sim = SimServer::start(sim_config(FaultPlan::none()))
        .await
        .unwrap();
    let mut req = request(64, 64);
    req.model = "gpt-4o".into();
    let e = provider(&sim, KEY).analyze(&req).await.unwrap_err();
    assert!(matches!(e.kind, FailureKind::Http { status: 404, .. }));
    assert_eq!(classify(&e.kind), RetryClass::Permanent);
}

#[tokio::test]
async fn a_malformed_200_is_billed_invalid_output_without_usage() {
    let sim = SimServer::start(sim_config(always(Fault::Malformed)))
        .await
        .unwrap();
    let e = failure(&sim, KEY).await;
    assert_eq!(e.kind, FailureKind::InvalidOutput);
    assert!(e.billed, "the provider answered: the call is paid");
    assert!(e.usage.is_none(), "a cut body reports no usage");
    assert_eq!(e.rate.remaining_requests, Some(49));
}

#[tokio::test]
async fn a_200_whose_text_is_not_json_is_billed_with_its_usage() {
    let sim = SimServer::start(sim_config(always(Fault::BadContent)))
        .await
        .unwrap();
    let e = failure(&sim, KEY).await;
    assert_eq!(e.kind, FailureKind::InvalidOutput);
    assert!(e.billed);
    assert!(e
        .usage
        .is_some_and(|u| u.input_tokens > 0 && u.output_tokens > 0));
}

#[tokio::test]
async fn a_hang_is_a_transient_timeout_not_billed() {
    let sim = SimServer::start(sim_config(always(Fault::Timeout)))
        .await
        .unwrap();
    let e = failure(&sim, KEY).await;
    assert_eq!(e.kind, FailureKind::Timeout);
    assert_eq!(classify(&e.kind), RetryClass::Transient);
    assert!(!e.billed);
}

// ---------------------------------------------------------------------------------------------
// Message Batches: the Anthropic batch client against the simulator
// ---------------------------------------------------------------------------------------------

mod batches {
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};
    use sightline_core::batch::{BatchPhase, ANTHROPIC_BATCH_LIMITS};
    use sightline_core::retry::FailureKind;
    use sightline_pipeline::ports::{
        BatchLine, BatchProvider, BatchRequest, LineOutcome, ProviderBatch, VisionProvider,
    };
    use sightline_pipeline::providers::anthropic_batch::AnthropicBatchProvider;
    use sightline_tests::sim::{BatchConfig, FaultPlan, SimConfig, SimServer};

    use super::{provider, request, sim_config, KEY, MODEL};

    fn config(batch: BatchConfig) -> SimConfig {
        SimConfig {
            batch: BatchConfig {
                delay_ms: 150,
                ..batch
            },
            ..sim_config(FaultPlan::none())
        }
    }

    fn client(sim: &SimServer) -> AnthropicBatchProvider {
        AnthropicBatchProvider::new(&sim.anthropic_base_url(), KEY, Duration::from_secs(10))
            .unwrap()
    }

    fn requests(n: u32) -> Vec<BatchRequest> {
        (0..n)
            .map(|i| BatchRequest {
                custom_id: sightline_core::batch::custom_id(&format!("k{i}")),
                request: request(200 + i * 50, 150 + i * 20),
            })
            .collect()
    }

    async fn submit(p: &AnthropicBatchProvider, reqs: &[BatchRequest]) -> String {
        let encoded = reqs.iter().map(|r| p.encode(r).unwrap()).collect();
        p.submit("ours", encoded).await.unwrap()
    }

    async fn wait_ended(p: &AnthropicBatchProvider, id: &str) -> ProviderBatch {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let b = p.status(id).await.unwrap();
            if b.phase != BatchPhase::Running {
                return b;
            }
            assert_eq!(b.status, "in_progress");
            assert!(Instant::now() < until, "batch {id} still running");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    fn by_id<'a>(lines: &'a [BatchLine], custom_id: &str) -> &'a LineOutcome {
        &lines
            .iter()
            .find(|l| l.custom_id == custom_id)
            .expect("a line per request")
            .outcome
    }

    #[tokio::test]
    async fn anthropic_batch_answers_match_the_realtime_answers_and_usage_by_custom_id() {
        let sim = SimServer::start(config(BatchConfig {
            shuffle: true,
            ..BatchConfig::default()
        }))
        .await
        .unwrap();
        let p = client(&sim);
        assert_eq!(p.name(), "anthropic");
        assert_eq!(p.limits(), ANTHROPIC_BATCH_LIMITS);
        let reqs = requests(4);
        let id = submit(&p, &reqs).await;
        assert!(id.starts_with("msgbatch_"), "{id}");
        let ended = wait_ended(&p, &id).await;
        assert_eq!((ended.status.as_str(), ended.error), ("ended", None));
        let lines = p.results(&id).await.unwrap();
        assert_eq!(lines.len(), 4);
        let realtime = provider(&sim, KEY);
        for r in &reqs {
            let LineOutcome::Answered(a) = by_id(&lines, &r.custom_id) else {
                panic!("{:?}", by_id(&lines, &r.custom_id))
            };
            let now = realtime.analyze(&r.request).await.unwrap();
            assert_eq!(a.usage, now.usage, "same tokens as the real-time call");
            assert_eq!(a.analysis, now.analysis);
            assert_eq!(a.model, MODEL);
        }
        // Results may be read again; each read counts.
        assert_eq!(p.results(&id).await.unwrap().len(), 4);
        let s = sim.stats().await.batch;
        assert_eq!((s.lines_billed, s.results_fetches), (4, 2));
        // Anthropic keeps no metadata to find a batch by.
        assert_eq!(p.find("ours", 0).await.unwrap(), None);
    }

    #[tokio::test]
    async fn anthropic_refuses_an_invalid_batch_at_create() {
        let sim = SimServer::start(config(BatchConfig {
            fail_validation: true,
            ..BatchConfig::default()
        }))
        .await
        .unwrap();
        let p = client(&sim);
        let encoded = requests(1).iter().map(|r| p.encode(r).unwrap()).collect();
        let e = p.submit("ours", encoded).await.unwrap_err();
        assert!(
            matches!(e.kind, FailureKind::Http { status: 400, .. }),
            "{e:?}"
        );
        assert!(e.message.contains("invalid_request_error"), "{}", e.message);
        assert_eq!(sim.stats().await.batch.batches_failed, 1);

        // custom_ids are checked against ^[a-zA-Z0-9_-]{1,64}$, and the request count.
        let mut c = sim.config().await;
        c.batch.fail_validation = false;
        c.batch.max_requests = 2;
        sim.set_config(c).await.unwrap();
        let post = |body: Value| {
            reqwest::Client::new()
                .post(sim.url("/v1/messages/batches"))
                .header("x-api-key", KEY)
                .header("anthropic-version", "2023-06-01")
                .json(&body)
                .send()
        };
        let params = json!({"model": MODEL, "max_tokens": 10,
            "messages": [{"role": "user", "content": "hi"}]});
        for body in [
            json!({"requests": [{"custom_id": "has.dot", "params": params}]}),
            json!({"requests": [{"custom_id": "a", "params": params},
                {"custom_id": "a", "params": params}]}),
            json!({"requests": [{"custom_id": "a", "params": params},
                {"custom_id": "b", "params": params}, {"custom_id": "c", "params": params}]}),
        ] {
            let resp = post(body).await.unwrap();
            assert_eq!(resp.status(), 400);
        }
        let resp = post(json!({"requests": [{"custom_id": "a", "params": params}]}))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "message_batch");
        assert_eq!(v["processing_status"], "in_progress");
        assert_eq!(v["request_counts"]["processing"], 1);
    }

    #[tokio::test]
    async fn an_expired_anthropic_batch_ends_with_answers_and_expired_lines() {
        let sim = SimServer::start(config(BatchConfig {
            expire_done_fraction: Some(0.5),
            ..BatchConfig::default()
        }))
        .await
        .unwrap();
        let p = client(&sim);
        let reqs = requests(4);
        let id = submit(&p, &reqs).await;
        assert_eq!(wait_ended(&p, &id).await.phase, BatchPhase::Ended);
        let lines = p.results(&id).await.unwrap();
        let answered = lines
            .iter()
            .filter(|l| matches!(l.outcome, LineOutcome::Answered(_)))
            .count();
        assert_eq!(answered, 2);
        for r in &reqs[2..] {
            assert!(
                matches!(by_id(&lines, &r.custom_id), LineOutcome::Unprocessed(w) if w == "expired")
            );
        }
        let status: Value = reqwest::Client::new()
            .get(sim.url(&format!("/v1/messages/batches/{id}")))
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(status["request_counts"]["expired"], 2);
        assert_eq!(status["request_counts"]["succeeded"], 2);
        assert!(status["results_url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/v1/messages/batches/{id}/results")));
        let s = sim.stats().await.batch;
        assert_eq!(
            (s.batches_expired, s.lines_billed, s.lines_unprocessed),
            (1, 2, 2)
        );
    }

    #[tokio::test]
    async fn anthropic_line_errors_come_back_as_http_failures_by_error_type() {
        let sim = SimServer::start(config(BatchConfig {
            transient_error_rate: 0.3,
            permanent_error_rate: 0.3,
            invalid_output_rate: 0.2,
            ..BatchConfig::default()
        }))
        .await
        .unwrap();
        let p = client(&sim);
        let reqs = requests(20);
        let id = submit(&p, &reqs).await;
        wait_ended(&p, &id).await;
        let lines = p.results(&id).await.unwrap();
        let (mut billed, mut transient, mut permanent) = (0u64, 0, 0);
        for l in &lines {
            match &l.outcome {
                LineOutcome::Answered(_) => billed += 1,
                LineOutcome::Failed(e) if e.billed => {
                    assert_eq!(e.kind, FailureKind::InvalidOutput);
                    billed += 1;
                }
                LineOutcome::Failed(e) => match e.kind {
                    FailureKind::Http { status: 400, .. } => permanent += 1,
                    FailureKind::Http {
                        status: 429 | 500, ..
                    } => transient += 1,
                    ref k => panic!("{k:?}"),
                },
                other => panic!("{other:?}"),
            }
        }
        assert!(transient > 0 && permanent > 0);
        assert_eq!(sim.stats().await.batch.lines_billed, billed);
    }
}
