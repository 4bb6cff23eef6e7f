//! `lambda-host`: one process that plays AWS Lambda **and** its event source for one sightline
//! function against an AWS endpoint (the emulator), so a harness can SIGKILL "the Lambda" in the
//! middle of a batch and start it again. Used by the AWS fault run
//! (`fault-run --target aws`, `sightline_tests::fault_run_aws`).
//!
//! ```text
//! lambda-host --role resize    [--concurrency 2] [--function-timeout-secs 30]
//! lambda-host --role analyze   [--concurrency 2] [--function-timeout-secs 180]
//! lambda-host --role reconcile [--every-secs 5]  [--function-timeout-secs 300]
//! ```
//!
//! Configured like the real functions, by the environment (docs/aws.md), read through
//! `AwsEnv::from_env`, `config::settings_from_env`, `config::sdk_config_from_env` and
//! `config::provider_from_env`, and wired to the same handlers as `functions/*/src/main.rs`
//! (`sightline_resize::handle`, `sightline_analyze::AnalyzeHandler`,
//! `sightline_reconcile::ReconcileHandler` over `Ingest`/`Analyzer` and the S3/SQS/DynamoDB
//! adapters). One variable is the host's own:
//!
//! - `SIGHTLINE_NOTIFY_QUEUE_URL` (resize): the SQS queue that receives the bucket's
//!   `s3:ObjectCreated:*` notifications; it stands in for Lambda's asynchronous invocation queue.
//!
//! The fault run shortens the provider timeout with the ordinary setting
//! (`SIGHTLINE_TIMEOUT_SECS`), so a simulated hang costs seconds, not half a minute; the claim
//! lease and the per-record budget follow from it as in the analyze Lambda.
//!
//! Event sources:
//!
//! - **resize**: long-polls the notification queue; skips (deletes) `s3:TestEvent`; each
//!   notification is one invocation with the S3 event of its body; Ok → delete, Err or function
//!   timeout → leave it (visible again after the queue's visibility timeout, like an async
//!   retry); after `--max-attempts` deliveries a still-failing event is dropped, as Lambda drops
//!   an async event after its retries.
//! - **analyze**: `--concurrency` pollers (concurrent "instances"), each receiving up to 10
//!   messages with their system attributes into an `SqsEvent`, invoking the handler with a
//!   deadline of now + function timeout, then deleting every message not listed in
//!   `batchItemFailures` (ReportBatchItemFailures). An invocation error or a function timeout
//!   deletes nothing: the whole batch comes back after the visibility timeout.
//! - **reconcile**: an EventBridge scheduled event every `--every-secs` (default
//!   `SIGHTLINE_RECONCILE_EVERY_SECS`), with a deadline.
//!
//! Besides the functions' own tracing (stdout, `RUST_LOG`), the host prints one line per
//! invocation start and end, `@@host {json}`, which the harness reads to know what is in
//! flight when it kills the process (and, from the resize role, which images were queued).

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use aws_lambda_events::event::s3::S3Event;
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};
use sightline_analyze::AnalyzeHandler;
use sightline_pipeline::analyze::Analyzer;
use sightline_pipeline::aws::aws_sdk_sqs;
use sightline_pipeline::aws::aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, Message, MessageSystemAttributeName,
};
use sightline_pipeline::aws::{config, AwsEnv, Clients, DynamoRepository, S3BlobStore, SqsQueue};
use sightline_pipeline::ingest::{Ingest, IngestOutcome};
use sightline_pipeline::ports::SystemClock;
use sightline_pipeline::reconcile::Reconciler;
use sightline_reconcile::ReconcileHandler;

/// Env var: the notification queue of the resize role.
const NOTIFY_QUEUE_ENV: &str = "SIGHTLINE_NOTIFY_QUEUE_URL";
/// Prefix of the lines the harness parses.
const EVENT_PREFIX: &str = "@@host ";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Resize,
    Analyze,
    Reconcile,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Resize => "resize",
            Role::Analyze => "analyze",
            Role::Reconcile => "reconcile",
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "lambda-host",
    about = "Play Lambda and its event source for one sightline function against an AWS \
             endpoint (configured by the functions' environment variables)"
)]
struct Args {
    /// Which function to host.
    #[arg(long, value_enum)]
    role: Role,
    /// Invocations at once (analyze: concurrent batches, like concurrent Lambda instances;
    /// resize: concurrent events; reconcile: always 1).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// The function timeout: the invocation's deadline, and the time after which the host
    /// abandons an invocation as Lambda would [default: resize 30, analyze 180, reconcile 300].
    #[arg(long)]
    function_timeout_secs: Option<u64>,
    /// reconcile: seconds between scheduled invocations [default: SIGHTLINE_RECONCILE_EVERY_SECS].
    #[arg(long)]
    every_secs: Option<u64>,
    /// Long-poll wait of each ReceiveMessage, seconds (≤ 20).
    #[arg(long, default_value_t = 2)]
    wait_secs: u64,
    /// analyze: messages per batch (the event source mapping's BatchSize, ≤ 10).
    #[arg(long, default_value_t = 10)]
    batch_size: usize,
    /// resize: deliveries of a failing event before it is dropped (Lambda's async retries).
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
}

impl Args {
    fn function_timeout(&self) -> Duration {
        Duration::from_secs(self.function_timeout_secs.unwrap_or(match self.role {
            Role::Resize => 30,
            Role::Analyze => 180,
            Role::Reconcile => 300,
        }))
    }
}

/// One `@@host` line on stdout (std's stdout is line-buffered: the line is out at once).
fn emit(v: Value) {
    println!("{EVENT_PREFIX}{v}");
}

/// The host's own diagnostics, on stderr, in the functions' plain log format
/// (`LEVEL target: message`).
fn log(level: &str, msg: &str) {
    eprintln!("{level:>5} lambda_host: {msg}");
}

fn ms_since(t: Instant) -> u64 {
    t.elapsed().as_millis() as u64
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    sightline_pipeline::aws::init_tracing();
    let role = args.role;
    let result = match role {
        Role::Resize => resize(args).await,
        Role::Analyze => analyze(args).await,
        Role::Reconcile => reconcile(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lambda-host ({}): {e:#}", role.as_str());
            emit(json!({"ev": "fatal", "role": role.as_str(), "error": format!("{e:#}")}));
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SQS as the event source
// ---------------------------------------------------------------------------------------------

/// ReceiveMessage with every system attribute, the queue's own visibility timeout (as the
/// event source mapping does), long polling.
async fn receive(
    sqs: &aws_sdk_sqs::Client,
    url: &str,
    max: usize,
    wait: Duration,
) -> anyhow::Result<Vec<Message>> {
    let out = sqs
        .receive_message()
        .queue_url(url)
        .max_number_of_messages(max.clamp(1, 10) as i32)
        .wait_time_seconds(wait.as_secs().min(20) as i32)
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "ReceiveMessage: {}",
                aws_sdk_sqs::error::DisplayErrorContext(&e)
            )
        })?;
    Ok(out.messages().to_vec())
}

fn receive_count_of(m: &Message) -> u32 {
    m.attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The record of an `SqsEvent` for a received message, as the event source mapping builds it.
fn sqs_record(m: &Message, queue_arn: Option<&str>, region: Option<&str>) -> SqsMessage {
    let mut r = SqsMessage::default();
    r.message_id = m.message_id().map(str::to_string);
    r.receipt_handle = m.receipt_handle().map(str::to_string);
    r.body = m.body().map(str::to_string);
    r.md5_of_body = m.md5_of_body().map(str::to_string);
    r.md5_of_message_attributes = m.md5_of_message_attributes().map(str::to_string);
    if let Some(attrs) = m.attributes() {
        for (k, v) in attrs {
            r.attributes.insert(k.as_str().to_string(), v.clone());
        }
    }
    r.event_source = Some("aws:sqs".into());
    r.event_source_arn = queue_arn.map(str::to_string);
    r.aws_region = region.map(str::to_string);
    r
}

/// DeleteMessageBatch for the given receipt handles; returns how many were deleted.
async fn delete_batch(sqs: &aws_sdk_sqs::Client, url: &str, receipts: &[String]) -> u64 {
    let mut deleted = 0u64;
    for chunk in receipts.chunks(10) {
        let mut entries = Vec::with_capacity(chunk.len());
        for (i, r) in chunk.iter().enumerate() {
            match DeleteMessageBatchRequestEntry::builder()
                .id(format!("d{i}"))
                .receipt_handle(r)
                .build()
            {
                Ok(e) => entries.push(e),
                Err(e) => log("WARN", &format!("delete entry: {e}")),
            }
        }
        match sqs
            .delete_message_batch()
            .queue_url(url)
            .set_entries(Some(entries))
            .send()
            .await
        {
            Ok(out) => {
                deleted += out.successful().len() as u64;
                for f in out.failed() {
                    log(
                        "WARN",
                        &format!("DeleteMessageBatch entry {} failed: {}", f.id(), f.code()),
                    );
                }
            }
            // The messages come back after their visibility timeout: a redelivery, which the
            // handlers must (and do) tolerate.
            Err(e) => log(
                "WARN",
                &format!(
                    "DeleteMessageBatch failed: {}",
                    aws_sdk_sqs::error::DisplayErrorContext(&e)
                ),
            ),
        }
    }
    deleted
}

async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> Option<String> {
    sqs.get_queue_attributes()
        .queue_url(url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .ok()?
        .attributes()?
        .get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .cloned()
}

/// A short pause after a failed receive (the endpoint is down or restarting).
async fn receive_failed(role: Role, e: &anyhow::Error) {
    log("WARN", &format!("{}: receive failed: {e:#}", role.as_str()));
    tokio::time::sleep(Duration::from_millis(500)).await;
}

// ---------------------------------------------------------------------------------------------
// resize
// ---------------------------------------------------------------------------------------------

/// The S3 event in a notification body, or None for `s3:TestEvent`. Emulators leave out
/// record fields real S3 always sends (`userIdentity`, `requestParameters`,
/// `responseElements`), which the event type requires: they are filled in with neutral values.
fn s3_event_of(body: &str) -> anyhow::Result<Option<S3Event>> {
    let mut v: Value = serde_json::from_str(body).context("notification body is not JSON")?;
    if v.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return Ok(None);
    }
    let records = v
        .get_mut("Records")
        .and_then(Value::as_array_mut)
        .context("notification without Records")?;
    for r in records.iter_mut() {
        if let Some(obj) = r.as_object_mut() {
            let defaults = [
                ("userIdentity", json!({"principalId": "AWS:lambda-host"})),
                ("requestParameters", json!({"sourceIPAddress": "127.0.0.1"})),
                ("responseElements", json!({})),
            ];
            for (k, d) in defaults {
                if obj.get(k).is_none_or(Value::is_null) {
                    obj.insert(k.to_string(), d);
                }
            }
        }
    }
    Ok(Some(
        serde_json::from_value(v).context("notification is not an S3 event")?,
    ))
}

async fn resize(args: Args) -> anyhow::Result<()> {
    let env = AwsEnv::from_env()?;
    let settings = Arc::new(config::settings_from_env()?);
    let notify_url = std::env::var(NOTIFY_QUEUE_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .with_context(|| format!("{NOTIFY_QUEUE_ENV} is required for --role resize"))?;
    let sdk = config::sdk_config_from_env().await;
    let clients = Clients::new(&sdk, env.endpoint_url.as_deref());
    // As functions/resize/src/main.rs.
    let ingest = Arc::new(Ingest::new(
        Arc::new(S3BlobStore::new(clients.s3.clone(), &env.bucket)),
        Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &env.table)),
        Arc::new(SqsQueue::new(clients.sqs.clone(), env.require_queue()?)),
        settings,
        Arc::new(SystemClock),
        &env.upload_prefix,
    ));
    let timeout = args.function_timeout();
    let invocations = Arc::new(AtomicU64::new(0));
    emit(json!({"ev": "ready", "role": "resize", "pid": std::process::id()}));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (sqs, url, ingest, invocations) = (
            clients.sqs.clone(),
            notify_url.clone(),
            ingest.clone(),
            invocations.clone(),
        );
        let (wait, max_attempts) = (Duration::from_secs(args.wait_secs), args.max_attempts);
        workers.spawn(async move {
            loop {
                let msgs = match receive(&sqs, &url, 1, wait).await {
                    Ok(m) => m,
                    Err(e) => {
                        receive_failed(Role::Resize, &e).await;
                        continue;
                    }
                };
                for m in msgs {
                    let Some(receipt) = m.receipt_handle().map(str::to_string) else {
                        continue;
                    };
                    let body = m.body().unwrap_or_default();
                    let attempt = receive_count_of(&m);
                    let event = match s3_event_of(body) {
                        Ok(Some(e)) => e,
                        Ok(None) => {
                            delete_batch(&sqs, &url, &[receipt]).await;
                            emit(json!({"ev": "skip", "role": "resize", "why": "s3:TestEvent"}));
                            continue;
                        }
                        Err(e) => {
                            // Lambda could not even deserialize it: an invocation error.
                            log("ERROR", &format!("undecodable notification: {e:#}: {body}"));
                            if attempt >= max_attempts {
                                delete_batch(&sqs, &url, &[receipt]).await;
                                emit(json!({"ev": "dropped", "role": "resize",
                                            "error": format!("{e:#}"), "body": body}));
                            }
                            continue;
                        }
                    };
                    let keys = sightline_resize::keys_from_event(&event, &ingest.upload_prefix);
                    let n = invocations.fetch_add(1, Ordering::Relaxed) + 1;
                    let records = event.records.len();
                    emit(json!({"ev": "start", "role": "resize", "inv": n,
                                "records": records, "keys": keys, "attempt": attempt}));
                    let began = Instant::now();
                    let outcome =
                        tokio::time::timeout(timeout, sightline_resize::handle(&ingest, event))
                            .await;
                    let mut queued: Vec<[String; 2]> = Vec::new();
                    let (result, error, objects) = match outcome {
                        Ok(Ok(outcomes)) => {
                            delete_batch(&sqs, &url, std::slice::from_ref(&receipt)).await;
                            for o in &outcomes {
                                if let IngestOutcome::Queued(job) = o {
                                    queued.push([job.tenant.clone(), job.image_id.clone()]);
                                }
                            }
                            ("ok", None, outcomes.len())
                        }
                        Ok(Err(e)) => ("error", Some(e.to_string()), 0),
                        Err(_) => ("timeout", None, 0),
                    };
                    let mut dropped = false;
                    if result != "ok" && attempt >= max_attempts {
                        delete_batch(&sqs, &url, std::slice::from_ref(&receipt)).await;
                        dropped = true;
                    }
                    emit(
                        json!({"ev": "end", "role": "resize", "inv": n, "result": result,
                                "records": records, "error": error, "objects": objects,
                                "queued": queued,
                                "attempt": attempt,
                                "dropped": dropped, "ms": ms_since(began)}),
                    );
                }
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.context("resize worker")?;
    }
    bail!("every resize worker stopped")
}

// ---------------------------------------------------------------------------------------------
// analyze
// ---------------------------------------------------------------------------------------------

async fn analyze(args: Args) -> anyhow::Result<()> {
    let env = AwsEnv::from_env()?;
    // As functions/analyze/src/main.rs.
    let settings = config::settings_from_env()?;
    let provider_timeout = settings.provider_timeout;
    let sdk = config::sdk_config_from_env().await;
    let clients = Clients::new(&sdk, env.endpoint_url.as_deref());
    let provider = config::provider_from_env(&env, &sdk, &settings).await?;
    let claim_lease = settings.claim_lease;
    let repo = Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &env.table));
    let mut analyzer = Analyzer::new(
        Arc::new(S3BlobStore::new(clients.s3.clone(), &env.bucket)),
        repo.clone(),
        provider,
        Arc::new(settings),
        Arc::new(SystemClock),
    );
    if analyzer.settings.shared_limit {
        analyzer = analyzer.with_shared_limit(repo);
    }
    let queue_url = env.require_queue()?.to_string();
    let queue = Arc::new(SqsQueue::new(clients.sqs.clone(), &queue_url));
    let handler = Arc::new(AnalyzeHandler::new(analyzer, queue, "analyze"));
    let arn = queue_arn(&clients.sqs, &queue_url).await;
    let region = sdk.region().map(|r| r.to_string());
    let timeout = args.function_timeout();
    let invocations = Arc::new(AtomicU64::new(0));
    emit(
        json!({"ev": "ready", "role": "analyze", "pid": std::process::id(),
                "provider_timeout_ms": provider_timeout.as_millis() as u64,
                "claim_lease_ms": claim_lease.as_millis() as u64,
                "record_budget_ms": handler.record_budget.as_millis() as u64,
                "handler_concurrency": handler.concurrency,
                "pollers": args.concurrency.max(1)}),
    );
    let mut pollers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (sqs, url, handler, invocations) = (
            clients.sqs.clone(),
            queue_url.clone(),
            handler.clone(),
            invocations.clone(),
        );
        let (arn, region) = (arn.clone(), region.clone());
        let (wait, batch) = (Duration::from_secs(args.wait_secs), args.batch_size);
        pollers.spawn(async move {
            loop {
                let msgs = match receive(&sqs, &url, batch, wait).await {
                    Ok(m) if m.is_empty() => continue,
                    Ok(m) => m,
                    Err(e) => {
                        receive_failed(Role::Analyze, &e).await;
                        continue;
                    }
                };
                let mut event = SqsEvent::default();
                event.records = msgs
                    .iter()
                    .map(|m| sqs_record(m, arn.as_deref(), region.as_deref()))
                    .collect();
                let n = invocations.fetch_add(1, Ordering::Relaxed) + 1;
                let counts: Vec<u32> = msgs.iter().map(receive_count_of).collect();
                emit(json!({"ev": "start", "role": "analyze", "inv": n,
                            "records": msgs.len(), "receive_counts": counts}));
                let began = Instant::now();
                let deadline = SystemTime::now() + timeout;
                let outcome =
                    tokio::time::timeout(timeout, handler.handle(event, Some(deadline))).await;
                let (result, failures, deleted) = match outcome {
                    Ok(Ok(resp)) => {
                        let failed: HashSet<&str> = resp
                            .batch_item_failures
                            .iter()
                            .map(|f| f.item_identifier.as_str())
                            .collect();
                        let done: Vec<String> = msgs
                            .iter()
                            .filter(|m| !failed.contains(m.message_id().unwrap_or_default()))
                            .filter_map(|m| m.receipt_handle().map(str::to_string))
                            .collect();
                        let deleted = delete_batch(&sqs, &url, &done).await;
                        ("ok", failed.len(), deleted)
                    }
                    // UnreportableRetry: the invocation failed, the whole batch comes back.
                    Ok(Err(e)) => {
                        log("ERROR", &format!("invocation failed: {e}"));
                        ("error", msgs.len(), 0)
                    }
                    // Lambda ends the invocation at its timeout; nothing is deleted.
                    Err(_) => ("timeout", msgs.len(), 0),
                };
                emit(
                    json!({"ev": "end", "role": "analyze", "inv": n, "result": result,
                            "records": msgs.len(), "failures": failures,
                            "deleted": deleted, "ms": ms_since(began)}),
                );
            }
        });
    }
    while let Some(r) = pollers.join_next().await {
        r.context("analyze poller")?;
    }
    bail!("every analyze poller stopped")
}

// ---------------------------------------------------------------------------------------------
// reconcile
// ---------------------------------------------------------------------------------------------

/// An EventBridge scheduled event, as the schedule rule sends it.
fn scheduled_event(n: u64, region: &str) -> Value {
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let time = sightline_pipeline::ports::rfc3339(now_ms);
    json!({
        "version": "0",
        "id": format!("lambda-host-{}-{n}", std::process::id()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        // EventBridge sends whole seconds.
        "time": format!("{}Z", &time[..19]),
        "region": region,
        "resources": ["arn:aws:events:::rule/lambda-host-reconcile"],
        "detail": {}
    })
}

async fn reconcile(args: Args) -> anyhow::Result<()> {
    let env = AwsEnv::from_env()?;
    // As functions/reconcile/src/main.rs.
    let settings = Arc::new(config::settings_from_env()?);
    let max = sightline_reconcile::max_from_env()?;
    let queue_url = env.require_queue()?.to_string();
    let every = args
        .every_secs
        .map(Duration::from_secs)
        .unwrap_or(settings.reconcile_every)
        .max(Duration::from_millis(100));
    let sdk = config::sdk_config_from_env().await;
    let region = sdk
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "us-east-1".into());
    let clients = Clients::new(&sdk, env.endpoint_url.as_deref());
    let ingest = Ingest::new(
        Arc::new(S3BlobStore::new(clients.s3.clone(), &env.bucket)),
        Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &env.table)),
        Arc::new(SqsQueue::new(clients.sqs.clone(), &queue_url)),
        settings,
        Arc::new(SystemClock),
        &env.upload_prefix,
    );
    let handler = ReconcileHandler::new(Reconciler::new(ingest), max);
    let timeout = args.function_timeout();
    emit(
        json!({"ev": "ready", "role": "reconcile", "pid": std::process::id(),
                "every_ms": every.as_millis() as u64}),
    );
    let mut n = 0u64;
    loop {
        tokio::time::sleep(every).await;
        n += 1;
        emit(json!({"ev": "start", "role": "reconcile", "inv": n, "records": 0}));
        let began = Instant::now();
        let deadline = SystemTime::now() + timeout;
        let outcome = tokio::time::timeout(
            timeout,
            handler.handle(scheduled_event(n, &region), Some(deadline)),
        )
        .await;
        let (result, run) = match outcome {
            Ok(Ok(run)) => ("ok", serde_json::to_value(&run).unwrap_or(Value::Null)),
            Ok(Err(e)) => ("error", json!({"error": e.to_string()})),
            Err(_) => ("timeout", Value::Null),
        };
        emit(
            json!({"ev": "end", "role": "reconcile", "inv": n, "result": result,
                    "run": run, "ms": ms_since(began)}),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_events_are_skipped_and_sparse_records_filled_in() {
        assert!(
            s3_event_of(r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Bucket":"b"}"#)
                .unwrap()
                .is_none()
        );
        let body = r#"{"Records":[{"eventVersion":"2.1","eventSource":"aws:s3",
            "awsRegion":"us-east-1","eventTime":"2026-01-01T00:00:00.000Z",
            "eventName":"ObjectCreated:Put",
            "s3":{"s3SchemaVersion":"1.0","configurationId":"c",
                  "bucket":{"name":"b","arn":"arn:aws:s3:::b"},
                  "object":{"key":"uploads%2Ft%2Fa+b.png","size":3}}}]}"#;
        let e = s3_event_of(body).unwrap().unwrap();
        assert_eq!(
            sightline_resize::keys_from_event(&e, "uploads/"),
            vec!["uploads/t/a b.png".to_string()]
        );
        assert!(s3_event_of("not json").is_err());
    }

    #[test]
    fn scheduled_events_parse_as_eventbridge_events() {
        let v = scheduled_event(3, "us-east-1");
        let e: aws_lambda_events::event::eventbridge::EventBridgeEvent =
            serde_json::from_value(v).unwrap();
        assert_eq!(e.detail_type, "Scheduled Event");
    }
}
