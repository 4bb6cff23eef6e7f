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
