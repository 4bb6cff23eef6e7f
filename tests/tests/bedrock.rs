//! Bedrock through the real SDK (`aws-sdk-bedrockruntime`, SigV4 with static test credentials,
//! region us-east-1, the endpoint overridden to the simulator) and the OpenAI-compatible
//! embedder, against the provider simulator: Converse analysis (usage read, throttling,
//! validation and server errors classified, billed and unbilled failures), Titan and Nova
//! embeddings (dimensions honoured, near-identical images closer than unrelated ones, text in
//! the same space, oversized images scaled down) and `POST /v1/embeddings`.
//!
//!   cargo test -p sightline-tests --test bedrock

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use sightline_core::model::Detail;
use sightline_core::pricing::{text_tokens, PriceTable, DEFAULT_PROMPT};
use sightline_core::retry::{classify, FailureKind, RetryClass};
use sightline_pipeline::ports::{Embedder, ProviderError, VisionProvider, VisionRequest};
use sightline_pipeline::providers::bedrock::BedrockProvider;
use sightline_pipeline::providers::bedrock_embed::BedrockEmbedder;
use sightline_pipeline::providers::embed_openai::OpenAiEmbedder;
use sightline_tests::emulator::sdk_config;
use sightline_tests::sim::{
    embed, EveryNth, Fault, FaultPlan, SimConfig, SimServer, MESSAGE_OVERHEAD_TOKENS,
};

const NOVA_LITE: &str = "amazon.nova-lite-v1:0";
const CLAUDE: &str = "global.anthropic.claude-haiku-4-5-20251001-v1:0";
const TITAN: &str = "amazon.titan-embed-image-v1";
const NOVA_EMBED: &str = "amazon.nova-2-multimodal-embeddings-v1:0";
const TIMEOUT: Duration = Duration::from_secs(10);

async fn sim(faults: FaultPlan) -> (SimServer, aws_config::SdkConfig) {
    let sim = SimServer::start(SimConfig {
        faults,
        timeout_hang_ms: 3_000,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    // http://127.0.0.1:PORT: the SDK posts to /model/{id}/converse and /model/{id}/invoke.
    let sdk = sdk_config(&sim.anthropic_base_url()).await;
    (sim, sdk)
}

/// Every call gets `fault`.
fn always(fault: Fault) -> FaultPlan {
    FaultPlan {
        every_nth: Some(EveryNth { n: 1, fault }),
        retry_after_s: 2.0,
        ..FaultPlan::default()
    }
}

fn encode(img: &image::RgbImage, quality: u8) -> Vec<u8> {
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut jpeg), quality)
        .encode_image(img)
        .unwrap();
    jpeg
}

/// A picture: `top` colour above, `bottom` below, with a soft horizontal gradient; `wobble`
/// shifts every pixel a little (a near-identical copy of the same picture).
fn picture(w: u32, h: u32, top: [u8; 3], bottom: [u8; 3], wobble: u8) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let base = if y < h / 2 { top } else { bottom };
        let shade = (x * 24 / w.max(1)) as u8;
        let jitter = ((x * 7 + y * 13) % 3) as u8 * wobble;
        image::Rgb(base.map(|c| c.saturating_add(shade).saturating_sub(jitter)))
    })
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn unit(v: &[f32]) -> bool {
    (v.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-3
}

fn request(model: &str, w: u32, h: u32) -> VisionRequest {
    VisionRequest {
        model: model.into(),
        jpeg: Arc::new(encode(&picture(w, h, [200, 40, 30], [30, 60, 200], 0), 85)),
        width: w,
        height: h,
        prompt: DEFAULT_PROMPT.into(),
        max_output_tokens: 600,
        detail: Detail::High,
        check: None,
    }
}

fn http_kind(e: &ProviderError) -> (u16, Option<Duration>) {
    match e.kind {
        FailureKind::Http {
            status,
            retry_after,
        } => (status, retry_after),
        ref other => panic!("not an HTTP failure: {other:?} ({})", e.message),
    }
}

#[tokio::test]
async fn converse_answers_with_the_usage_of_the_models_image_rule() {
    let (sim, sdk) = sim(FaultPlan::none()).await;
    let provider = BedrockProvider::from_sdk_config(&sdk, TIMEOUT);
    assert_eq!(provider.name(), "bedrock");
    for (model, w, h) in [(NOVA_LITE, 1024, 768), (CLAUDE, 800, 600)] {
        let req = request(model, w, h);
        let r = provider.analyze(&req).await.unwrap();
        assert!(r.analysis["description"]
            .as_str()
            .unwrap()
            .contains("image"));
        assert_eq!(r.model, model);
        let price = PriceTable::builtin().model(model).unwrap();
        let usage = r.usage.expect("Converse reports usage");
        assert_eq!(
            usage.input_tokens,
            MESSAGE_OVERHEAD_TOKENS
                + text_tokens(DEFAULT_PROMPT)
                + price.image_tokens(w, h, Detail::High),
            "{model}"
        );
        assert!(usage.output_tokens > 0);
    }
    let stats = sim.stats().await;
    assert_eq!(stats.completions, 2);
    assert_eq!(stats.unauthorized, 0, "the SDK's SigV4 header is taken");
}

#[tokio::test]
async fn throttling_is_a_transient_429_with_the_retry_after_sent() {
    let (sim, sdk) = sim(always(Fault::RateLimit)).await;
    let provider = BedrockProvider::from_sdk_config(&sdk, TIMEOUT);
    let e = provider
        .analyze(&request(NOVA_LITE, 640, 480))
        .await
        .unwrap_err();
    assert_eq!(http_kind(&e), (429, Some(Duration::from_secs(2))));
    assert_eq!(classify(&e.kind), RetryClass::Transient);
    assert!(e.message.contains("ThrottlingException"), "{}", e.message);
    assert!(!e.billed);
    // The simulator's own limiter throttles the same way.
    let mut cfg = sim.config().await;
    cfg.faults = FaultPlan::none();
    cfg.rpm = 1;
    sim.set_config(cfg).await.unwrap();
    provider
        .analyze(&request(NOVA_LITE, 640, 480))
        .await
        .unwrap();
    let e = provider
        .analyze(&request(NOVA_LITE, 640, 480))
        .await
        .unwrap_err();
    let (status, retry_after) = http_kind(&e);
    assert_eq!(status, 429);
    assert!(retry_after.is_some_and(|d| d <= Duration::from_secs(60)));
    assert_eq!(sim.stats().await.rate_limited, 1);
}

#[tokio::test]
async fn validation_errors_are_permanent_and_server_errors_transient() {
    let (sim, sdk) = sim(FaultPlan::none()).await;
    let provider = BedrockProvider::from_sdk_config(&sdk, TIMEOUT);
    // A model Bedrock does not have: ValidationException.
    let e = provider
        .analyze(&request("gpt-4o", 64, 64))
        .await
        .unwrap_err();
    assert_eq!(http_kind(&e).0, 400);
    assert_eq!(classify(&e.kind), RetryClass::Permanent);
    assert!(e.message.contains("ValidationException"), "{}", e.message);
    // An image Bedrock cannot read: ValidationException too.
    let mut broken = request(NOVA_LITE, 64, 64);
    broken.jpeg = Arc::new(b"not an image".to_vec());
    let e = provider.analyze(&broken).await.unwrap_err();
    assert_eq!(classify(&e.kind), RetryClass::Permanent, "{}", e.message);
    for (status, code, seen) in [
        (503, "ServiceUnavailableException", 503),
        (500, "InternalServerException", 500),
        (504, "ModelTimeoutException", 408),
    ] {
        let mut cfg = sim.config().await;
        cfg.faults = FaultPlan {
            error_rate: 1.0,
            error_statuses: vec![status],
            ..FaultPlan::default()
        };
        sim.set_config(cfg).await.unwrap();
        let e = provider
            .analyze(&request(NOVA_LITE, 64, 64))
            .await
            .unwrap_err();
        assert_eq!(http_kind(&e).0, seen, "{}", e.message);
        assert!(e.message.contains(code), "{}", e.message);
        assert_eq!(classify(&e.kind), RetryClass::Transient);
        assert!(!e.billed);
    }
}

#[tokio::test]
async fn unusable_answers_are_billed_and_hangs_time_out() {
    let (sim, sdk) = sim(always(Fault::Malformed)).await;
    let provider = BedrockProvider::from_sdk_config(&sdk, TIMEOUT);
    let e = provider
        .analyze(&request(NOVA_LITE, 64, 64))
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::InvalidOutput, "{}", e.message);
    assert!(e.billed, "a cut 200 was answered");

    let mut cfg = sim.config().await;
    cfg.faults = always(Fault::BadContent);
    sim.set_config(cfg).await.unwrap();
    let e = provider
        .analyze(&request(NOVA_LITE, 64, 64))
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::InvalidOutput);
    assert!(e.billed && e.usage.is_some(), "its usage is still read");

    let mut cfg = sim.config().await;
    cfg.faults = always(Fault::Timeout);
    sim.set_config(cfg).await.unwrap();
    let quick = BedrockProvider::from_sdk_config(&sdk, Duration::from_millis(400));
    let e = quick
        .analyze(&request(NOVA_LITE, 64, 64))
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Timeout, "{}", e.message);
    assert!(!e.billed);
}

/// A red-over-blue picture, a near-identical copy, and an unrelated one.
fn three_pictures() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let a = encode(&picture(320, 240, [210, 40, 30], [30, 60, 200], 0), 90);
    let near = encode(&picture(320, 240, [210, 40, 30], [30, 60, 200], 3), 60);
    let other = encode(&picture(320, 240, [240, 230, 60], [20, 150, 60], 0), 90);
    (a, near, other)
}

async fn check_embedder(embedder: &dyn Embedder, dims: u32) {
    let (a, near, other) = three_pictures();
    let va = embedder.embed_image(&a).await.unwrap();
    assert_eq!(va.vector.len(), dims as usize);
    assert!(unit(&va.vector));
    assert_eq!((va.images, va.input_tokens), (1, 0));
    let vn = embedder.embed_image(&near).await.unwrap().vector;
    let vo = embedder.embed_image(&other).await.unwrap().vector;
    let (close, far) = (cos(&va.vector, &vn), cos(&va.vector, &vo));
    assert!(
        close > 0.95 && close > far + 0.2,
        "near {close}, unrelated {far}"
    );
    // Text lands in the same space: "red blue" is nearer the red-and-blue picture.
    let t = embedder.embed_text("red blue").await.unwrap();
    assert_eq!(t.vector.len(), dims as usize);
    assert!(unit(&t.vector));
    assert_eq!(t.images, 0);
    assert!(
        cos(&t.vector, &va.vector) > cos(&t.vector, &vo),
        "text nearer its colours"
    );
}

#[tokio::test]
async fn titan_and_nova_embed_images_and_text_at_the_dimension_asked() {
    let (sim, sdk) = sim(FaultPlan::none()).await;
    for (model, dims) in [
        (TITAN, 256),
        (TITAN, 1024),
        (NOVA_EMBED, 384),
        (NOVA_EMBED, 3072),
    ] {
        let e = BedrockEmbedder::from_sdk_config(&sdk, model, dims, TIMEOUT).unwrap();
        assert_eq!((e.name(), e.model(), e.dims()), ("bedrock", model, dims));
        assert!(e.understands_text());
        check_embedder(&e, dims).await;
    }
    // Titan counts text tokens; Nova reports none.
    let titan = BedrockEmbedder::from_sdk_config(&sdk, TITAN, 384, TIMEOUT).unwrap();
    let t = titan
        .embed_text("a red square on a blue floor")
        .await
        .unwrap();
    assert_eq!(t.input_tokens, text_tokens("a red square on a blue floor"));
    let nova = BedrockEmbedder::from_sdk_config(&sdk, NOVA_EMBED, 1024, TIMEOUT).unwrap();
    assert_eq!(
        nova.embed_text("a red square").await.unwrap().input_tokens,
        0
    );
    let stats = sim.stats().await.embeddings;
    assert_eq!(stats.embeddings, 4 * 4 + 2);
    assert_eq!(stats.per_model[TITAN], 8 + 1);
    assert_eq!(stats.bad_requests, 0);
}

#[tokio::test]
async fn an_image_over_the_models_edge_is_scaled_down_before_it_is_sent() {
    let (sim, sdk) = sim(FaultPlan::none()).await;
    // Titan refuses images over 2048 px; this one is 2600 wide.
    let wide = picture(2600, 1300, [210, 40, 30], [30, 60, 200], 0);
    let jpeg = encode(&wide, 85);
    let titan = BedrockEmbedder::from_sdk_config(&sdk, TITAN, 256, TIMEOUT).unwrap();
    let v = titan.embed_image(&jpeg).await.unwrap().vector;
    // Scaling keeps the colour layout: the vector is the original's.
    let original = embed::image_vector(&jpeg, 256).unwrap();
    assert!(cos(&v, &original) > 0.99);
    assert_eq!(sim.stats().await.embeddings.bad_requests, 0);
}

#[tokio::test]
async fn bedrock_embedding_failures_are_classified_like_analysis() {
    let (sim, sdk) = sim(always(Fault::RateLimit)).await;
    let nova = BedrockEmbedder::from_sdk_config(&sdk, NOVA_EMBED, 256, TIMEOUT).unwrap();
    let (a, _, _) = three_pictures();
    let e = nova.embed_image(&a).await.unwrap_err();
    assert_eq!(http_kind(&e), (429, Some(Duration::from_secs(2))));
    assert!(e.message.contains("ThrottlingException"));
    assert!(!e.billed);

    let mut cfg = sim.config().await;
    cfg.faults = always(Fault::BadContent);
    sim.set_config(cfg).await.unwrap();
    let e = nova.embed_text("red").await.unwrap_err();
    assert_eq!(e.kind, FailureKind::InvalidOutput);
    assert!(e.billed, "a vector of the wrong size was still answered");

    let mut cfg = sim.config().await;
    cfg.faults = FaultPlan {
        error_rate: 1.0,
        error_statuses: vec![503],
        ..FaultPlan::default()
    };
    sim.set_config(cfg).await.unwrap();
    let e = nova.embed_image(&a).await.unwrap_err();
    assert_eq!(http_kind(&e).0, 503);
    assert_eq!(classify(&e.kind), RetryClass::Transient);
    assert_eq!(sim.stats().await.faults.total(), 3);
}

#[tokio::test]
async fn openai_compatible_embeddings_through_v1_embeddings() {
    let (sim, _) = sim(FaultPlan::none()).await;
    let clip = OpenAiEmbedder::new(
        &sim.base_url,
        Some("sk-sim".into()),
        "clip-vit-b-32",
        512,
        TIMEOUT,
    )
    .unwrap();
    check_embedder(&clip, 512).await;
    let t = clip.embed_text("a red square").await.unwrap();
    assert_eq!(
        t.input_tokens,
        text_tokens("a red square"),
        "usage.prompt_tokens"
    );
    // The same picture has the same vector on every route.
    let (a, _, _) = three_pictures();
    let direct = embed::image_vector(&a, 512).unwrap();
    assert!(cos(&clip.embed_image(&a).await.unwrap().vector, &direct) > 0.9999);

    // Throttling carries its Retry-After and the x-ratelimit state; a wrong key is permanent.
    let mut cfg = sim.config().await;
    cfg.faults = always(Fault::RateLimit);
    sim.set_config(cfg).await.unwrap();
    let e = clip.embed_image(&a).await.unwrap_err();
    assert_eq!(http_kind(&e), (429, Some(Duration::from_secs(2))));
    assert_eq!(e.rate.remaining_requests, Some(0));
    let stranger = OpenAiEmbedder::new(
        &sim.base_url,
        Some("sk-wrong".into()),
        "clip-vit-b-32",
        512,
        TIMEOUT,
    )
    .unwrap();
    let e = stranger.embed_text("red").await.unwrap_err();
    assert_eq!(http_kind(&e).0, 401);
    assert_eq!(classify(&e.kind), RetryClass::Permanent);
    assert_eq!(sim.stats().await.embeddings.unauthorized, 1);
}

// ---------------------------------------------------------------------------------------------
// Image generation: Nova Canvas and Titan Image Generator v2 through InvokeModel
// ---------------------------------------------------------------------------------------------

mod images {
    use super::*;
    use sightline_core::generate::{OutputFormat, Quality, Size};
    use sightline_pipeline::ports::{GenerationCall, ImageGenerator};
    use sightline_pipeline::providers::gen_bedrock::BedrockGenerator;
    use sightline_tests::sim::images::REFUSE_MARKER;

    const NOVA_CANVAS: &str = "amazon.nova-canvas-v1:0";
    const TITAN_IMAGE: &str = "amazon.titan-image-generator-v2:0";

    fn call(model: &str, prompt: &str, format: OutputFormat) -> GenerationCall {
        GenerationCall {
            model: model.into(),
            prompt: prompt.into(),
            size: Size::Pixels {
                width: 1280,
                height: 720,
            },
            quality: Quality::High,
            output_format: format,
            seed: Some(7),
        }
    }

    #[tokio::test]
    async fn nova_canvas_and_titan_answer_an_image_in_the_asked_format_priced_per_image() {
        let (sim, sdk) = sim(FaultPlan::default()).await;
        let gen = BedrockGenerator::from_sdk_config(&sdk, TIMEOUT);
        for (model, format) in [
            (NOVA_CANVAS, OutputFormat::Png),
            (TITAN_IMAGE, OutputFormat::Jpeg),
        ] {
            let img = gen
                .generate(&call(model, "a harbour", format))
                .await
                .unwrap();
            assert_eq!(img.usage, None, "bedrock bills per image");
            assert!(img.width > img.height);
            let decoded = image::load_from_memory(&img.bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (img.width, img.height));
            let price = PriceTable::builtin().image_model(model).unwrap();
            let cost = price.cost_usd(
                Size::Pixels {
                    width: 1280,
                    height: 720,
                },
                Quality::High,
                img.usage.as_ref(),
            );
            assert!(cost.unwrap() > 0.0, "{model}");
        }
        assert_eq!(
            image::guess_format(
                &gen.generate(&call(TITAN_IMAGE, "x", OutputFormat::Jpeg))
                    .await
                    .unwrap()
                    .bytes
            )
            .unwrap(),
            image::ImageFormat::Jpeg
        );
        assert_eq!(sim.stats().await.images.images, 3);
    }

    #[tokio::test]
    async fn throttling_server_errors_refusals_and_bad_images_are_classified() {
        let (_sim, sdk) = sim(always(Fault::RateLimit)).await;
        let gen = BedrockGenerator::from_sdk_config(&sdk, TIMEOUT);
        let e = gen
            .generate(&call(NOVA_CANVAS, "x", OutputFormat::Png))
            .await
            .unwrap_err();
        assert_eq!(http_kind(&e), (429, Some(Duration::from_secs(2))));
        assert_eq!(classify(&e.kind), RetryClass::Transient);

        let (_sim, sdk) = sim(always(Fault::Http503)).await;
        let gen = BedrockGenerator::from_sdk_config(&sdk, TIMEOUT);
        let e = gen
            .generate(&call(NOVA_CANVAS, "x", OutputFormat::Png))
            .await
            .unwrap_err();
        assert_eq!(classify(&e.kind), RetryClass::Transient);
        assert!(!e.billed);

        let (_sim, sdk) = sim(FaultPlan::default()).await;
        let gen = BedrockGenerator::from_sdk_config(&sdk, TIMEOUT);
        let e = gen
            .generate(&call(NOVA_CANVAS, REFUSE_MARKER, OutputFormat::Png))
            .await
            .unwrap_err();
        assert_eq!(http_kind(&e).0, 400);
        assert_eq!(classify(&e.kind), RetryClass::Permanent);
        assert!(!e.billed);

        let (_sim, sdk) = sim(always(Fault::BadContent)).await;
        let gen = BedrockGenerator::from_sdk_config(&sdk, TIMEOUT);
        let e = gen
            .generate(&call(TITAN_IMAGE, "x", OutputFormat::Png))
            .await
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidOutput);
        assert!(e.billed);
    }
}
