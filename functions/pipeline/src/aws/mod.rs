//! AWS adapters (feature `aws`): S3 blobs and presigned uploads, SQS queue, DynamoDB
//! repository (single-table design of docs/aws.md), S3 Vectors vector store, and
//! configuration from the environment.

pub mod config;
pub mod dynamo;
pub mod generation;
pub mod presign;
pub mod s3;
pub mod s3_events;
pub mod secrets;
pub mod sqs;
pub mod sqs_batch;
pub mod vectors;

pub use config::{sdk_config_from_env, vector_store, AwsEnv, Clients};

// The SDK crates, for callers that build clients or requests themselves.
pub use aws_config;
pub use aws_sdk_dynamodb;
pub use aws_sdk_s3;
pub use aws_sdk_s3vectors;
pub use aws_sdk_sqs;
pub use aws_sdk_ssm;
pub use dynamo::DynamoRepository;
pub use presign::S3Presigner;
pub use s3::S3BlobStore;
pub use sqs::SqsQueue;
pub use vectors::S3VectorStore;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::ports::StoreError;

/// Tracing for the Lambda binaries: the runtime's own subscriber, which follows Lambda's
/// advanced logging controls — `AWS_LAMBDA_LOG_LEVEL` (the template's `ApplicationLogLevel`)
/// sets the level, else `RUST_LOG`, else INFO; `AWS_LAMBDA_LOG_FORMAT=JSON` (`LogFormat`)
/// writes one JSON object per line with a `level` field (so Lambda can filter too) and the
/// fields of the current span and its parents (request id, message id, image id, tenant).
/// Lines go to stdout, without ANSI colours or timestamps (CloudWatch adds them).
pub fn init_tracing() {
    lambda_runtime::tracing::init_default_subscriber();
}

/// [`init_tracing`] writing somewhere else than stdout (tests capture the lines).
pub fn init_tracing_with_writer<W>(writer: W)
where
    W: for<'w> lambda_runtime::tracing::subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    lambda_runtime::tracing::init_default_subscriber_with_writer(writer);
}

/// Error codes that mean "slow down / try again".
const TRANSIENT_CODES: &[&str] = &[
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "SlowDown",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "ServiceUnavailable",
    "TransactionConflictException",
    "TransactionInProgressException",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "KMS.ThrottlingException",
];

/// Whether an SDK error is worth retrying: throttling, 5xx, timeouts, dispatch failures.
pub fn is_transient<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> bool {
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            status >= 500
                || status == 429
                || se
                    .err()
                    .code()
                    .is_some_and(|c| TRANSIENT_CODES.contains(&c))
        }
        _ => false,
    }
}

/// Map an SDK error to a [`StoreError`] (Transient or Permanent), naming the operation.
pub fn sdk_err<E>(op: &str, e: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let transient = is_transient(&e);
    let msg = format!("{op}: {}", DisplayErrorContext(&e));
    if transient {
        StoreError::Transient(msg)
    } else {
        StoreError::Permanent(msg)
    }
}

/// Seconds for an SQS duration argument: rounded up, clamped to 0..=43200 (12 h).
pub fn sqs_seconds(d: std::time::Duration) -> i32 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.min(43_200) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sqs_seconds_round_up_and_clamp() {
        assert_eq!(sqs_seconds(Duration::ZERO), 0);
        assert_eq!(sqs_seconds(Duration::from_millis(1)), 1);
        assert_eq!(sqs_seconds(Duration::from_millis(2500)), 3);
        assert_eq!(sqs_seconds(Duration::from_secs(99_999)), 43_200);
    }
}
