//! sightline-api Lambda entry point: API Gateway HTTP API (payload v2) → axum router.

use lambda_http::Error;
use sightline_pipeline::aws::{config, AwsEnv, Clients};

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .without_time();
    if std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("JSON")) {
        builder.json().with_current_span(false).init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    init_tracing();
    let env = AwsEnv::from_env()?;
    let settings = config::settings_from_env()?;
    let sdk = config::sdk_config_from_env().await;
    let clients = Clients::new(&sdk, env.endpoint_url.as_deref());
    let app = sightline_api::app(sightline_api::api_state(&env, &clients, settings));
    lambda_http::run(app).await
}
