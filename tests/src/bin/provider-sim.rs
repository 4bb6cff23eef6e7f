//! `provider-sim`: run the provider simulator (OpenAI chat completions and embeddings, Anthropic
//! Messages, Bedrock Converse and InvokeModel embeddings) until Ctrl-C.
//!
//! ```text
//! provider-sim --port 8090 --rpm 60 --tpm 100000 --latency-ms 300 --error-rate 0.05 --seed 1 --api-key sk-sim
//! provider-sim --port 8090 --poison-rate 0.01   # 1% of images are always rejected (400)
//! ```
//!
//! Point an OpenAI client at the printed OpenAI base URL (`OPENAI_BASE_URL`), an Anthropic client
//! at the Anthropic one (`ANTHROPIC_BASE_URL`), an AWS SDK's Bedrock runtime client at the
//! Bedrock one (`AWS_ENDPOINT_URL_BEDROCK_RUNTIME`, any credentials). `GET /sim/stats`, `POST /sim/reset` and
//! `POST /sim/config` (partial JSON) control it at run time; `x-sim-fault: 500|502|503|504|429|
//! timeout|malformed|bad-content|none` forces a fault for one request (503, also `529`, is
//! Anthropic's 529 `overloaded_error` on `/v1/messages`).

use clap::Parser;
use sightline_tests::sim::{EveryNth, Fault, FaultPlan, LimitModel, SimConfig, SimServer};

#[derive(Debug, Parser)]
#[command(
    name = "provider-sim",
    about = "Fake OpenAI chat completions and embeddings, Anthropic Messages and Bedrock runtime APIs for tests and benchmarks"
)]
struct Args {
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 8090)]
    port: u16,
    /// Accepted key, as a bearer key or `x-api-key` ("" = accept any key).
    #[arg(long, env = "SIM_API_KEY", default_value = "sk-sim")]
    api_key: String,
    /// Requests per minute per key (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    rpm: u64,
    /// Tokens per minute per key (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    tpm: u64,
    /// How RPM and TPM are enforced: `sliding-minute` (a sliding 60 s window) or `quantized`
    /// (OpenAI's documented model: a continuously refilled bucket enforced over --quantum-ms).
    #[arg(long, default_value = "sliding-minute")]
    limit_model: LimitModel,
    /// The period a quantized limit is enforced over.
    #[arg(long, default_value_t = 1_000)]
    quantum_ms: u64,
    /// Fixed latency per admitted request.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Extra random latency in 0..=jitter.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Probability of a 5xx (drawn from --error-statuses).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// 5xx statuses to inject (500, 502, 503, 504), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [500u16, 502, 503])]
    error_statuses: Vec<u16>,
    /// Probability of an injected 429.
    #[arg(long, default_value_t = 0.0)]
    rate_limit_rate: f64,
    /// Retry-After (seconds) of injected 429s.
    #[arg(long, default_value_t = 1.0)]
    retry_after_s: f64,
    /// Probability of a hang (see --timeout-hang-ms).
    #[arg(long, default_value_t = 0.0)]
    timeout_rate: f64,
    /// Probability of a 200 with truncated JSON.
    #[arg(long, default_value_t = 0.0)]
    malformed_rate: f64,
    /// Probability of a 200 whose content is not JSON.
    #[arg(long, default_value_t = 0.0)]
    bad_content_rate: f64,
    /// Inject --nth-fault on every Nth valid request.
    #[arg(long)]
    every_nth: Option<u64>,
    /// Fault for --every-nth: 500|502|503|504|429|timeout|malformed|bad-content.
    #[arg(long, default_value = "500")]
    nth_fault: Fault,
    /// Fraction of images that are always rejected with a 400 `image_rejected` (per image,
    /// chosen from --seed and the image's sha256; see `sim::is_poison`).
    #[arg(long, default_value_t = 0.0)]
    poison_rate: f64,
    /// Seed of the fault/jitter RNG and of the poison-image choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How long a timeout fault hangs before dropping the connection.
    #[arg(long, default_value_t = 30_000)]
    timeout_hang_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let cfg = SimConfig {
        api_key: a.api_key,
        rpm: a.rpm,
        tpm: a.tpm,
        limit_model: a.limit_model,
        quantum_ms: a.quantum_ms,
        latency_ms: a.latency_ms,
        jitter_ms: a.jitter_ms,
        faults: FaultPlan {
            error_rate: a.error_rate,
            error_statuses: a.error_statuses,
            rate_limit_rate: a.rate_limit_rate,
            retry_after_s: a.retry_after_s,
            timeout_rate: a.timeout_rate,
            malformed_rate: a.malformed_rate,
            bad_content_rate: a.bad_content_rate,
            every_nth: a.every_nth.map(|n| EveryNth {
                n,
                fault: a.nth_fault,
            }),
            poison_rate: a.poison_rate,
        },
        seed: a.seed,
        timeout_hang_ms: a.timeout_hang_ms,
        batch: Default::default(),
    };
    let server = SimServer::start_on(cfg.clone(), a.port).await?;
    eprintln!(
        "provider-sim listening: OpenAI base {}, Anthropic and Bedrock base {} (rpm {}, tpm {}, {:?} limits, latency {}+{} ms, seed {}); stats at {}",
        server.base_url,
        server.anthropic_base_url(),
        cfg.rpm,
        cfg.tpm,
        cfg.limit_model,
        cfg.latency_ms,
        cfg.jitter_ms,
        cfg.seed,
        server.url("/sim/stats")
    );
    tokio::signal::ctrl_c().await?;
    let stats = server.stats().await;
    eprintln!(
        "provider-sim: stopping after {} requests ({} completions, {} tokens billed)",
        stats.requests, stats.completions, stats.tokens_billed
    );
    server.shutdown_and_wait().await;
    Ok(())
}
