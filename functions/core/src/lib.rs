//! sightline core: the domain with no AWS and no async runtime. Builds for wasm32.
//!
//! - [`prepare`]: limits, decode, EXIF orientation, sRGB, resize, JPEG (libjpeg-turbo on native
//!   targets for plain JPEG decode and the encode; pure Rust everywhere else and on wasm32).
//! - [`batch`]: lanes, batch `custom_id`s, splitting by the providers' limits.
//! - [`budget`]: spending-cap periods (UTC day and month) and reservation maths.
//! - [`color`]: embedded ICC profiles (Display P3, Adobe RGB, CMYK) converted to sRGB.
//! - [`embed`]: the offline visual embedding, perceptual hash and near-duplicate rule.
//! - [`header`]: what `prepare` would do, from the header alone (the browser's first-load module).
//! - [`generate`]: generation jobs: templates, CSV/JSON rows, requests and idempotency keys.
//! - [`genjob`]: generation jobs as they run: row and job states, the check by analysis.
//! - [`pricing`]: the versioned price table and image-token rules (one estimator everywhere).
//! - [`retry`]: transient vs permanent, backoff.
//! - [`limiter`]: RPM + TPM buckets with a short burst, scheduled takes, corrections.
//! - [`keys`]: blob key layout and S3 event key decoding.
//! - [`model`]: records, results and queue messages.
//! - [`webhook`]: Standard Webhooks signing and verification, delivery outcome and retry schedule.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod batch;
pub mod budget;
pub mod color;
pub mod embed;
pub mod generate;
pub mod genjob;
pub mod header;
pub mod keys;
pub mod limiter;
pub mod model;
// libjpeg-turbo decode and encode; native targets only (wasm32 stays pure Rust).
#[cfg(not(target_arch = "wasm32"))]
mod native_jpeg;
pub mod prepare;
pub mod pricing;
pub mod retry;
pub mod webhook;

pub use model::{
    AnalysisJob, AnalysisResult, Detail, Estimate, ImageRecord, ImageSize, ImageStatus,
};
pub use prepare::{memory_estimate, prepare, probe, PrepareError, PrepareOptions, PreparedImage};
pub use pricing::{EstimateParams, PriceTable, Usage};
