//! sightline use-cases over ports, the shared HTTP router, providers and local adapters.
//!
//! - [`ports`]: the traits (blob store, queue, repository, vision provider, presigner, clock).
//! - [`ingest`], [`analyze`] and [`batch`] (the batch lane): the use-cases; [`worker`]: in-process queue consumers.
//! - [`http`]: the API router used by the api Lambda and `sightline serve`.
//! - [`metrics`]: the metric set, rendered as CloudWatch EMF (Lambda) and Prometheus (serve).
//! - [`local`]: files + SQLite adapters; [`providers`]: OpenAI-compatible and offline analyzers.
//! - [`webhook_url`]: webhook URLs checked against SSRF after DNS resolution.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod analyze;
#[cfg(feature = "aws")]
pub mod aws;
pub mod batch;
pub mod delivery;
pub mod generation;
pub mod http;
pub mod ingest;
pub mod local;
pub mod metrics;
pub mod ports;
pub mod providers;
pub mod reconcile;
pub mod search;
pub mod settings;
pub mod webhook_url;
pub mod worker;

pub use settings::Settings;
