//! `resize-rss`: peak resident memory of the resize Lambda's bootstrap while it handles the
//! 12 MP phone photo end to end (S3 get → prepare → S3 put → DynamoDB record → SQS job), each
//! run a fresh process. S3, DynamoDB and SQS are the emulator (a container started here); the
//! Lambda Runtime API is a stub on 127.0.0.1 that hands out one S3 event, takes the response,
//! and holds the next `next` open; then the process's VmHWM is read from /proc.
//!
//! ```text
//! resize-rss --runs 5 target/lambda/sightline-resize/bootstrap tests/fixtures/large/phone12mp.jpg
//! ```
//! Prints one JSON line: peak RSS median and max (MiB), runs, and what the last run answered.
//! `scripts/bench.sh` runs it for the "resize process ≤ 128 MB" target.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use sightline_pipeline::aws::Clients;
use sightline_tests::emulator::{Emulator, ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY};
use sightline_tests::{aws_setup, contract::unique};
use tokio::sync::Notify;

const NEXT: &str = "/2018-06-01/runtime/invocation/next";

/// The stub's state: the event to hand out once, what came back, and a signal for the second
/// `next` (the invocation is over).
struct Stub {
    event: Mutex<Option<String>>,
    answer: Mutex<Option<(String, String)>>,
    done: Notify,
}

async fn next(State(stub): State<Arc<Stub>>) -> (StatusCode, HeaderMap, String) {
    let event = stub.event.lock().ok().and_then(|mut e| e.take());
    match event {
        Some(body) => {
            let mut h = HeaderMap::new();
            h.insert(
                "lambda-runtime-aws-request-id",
                HeaderValue::from_static("rss-1"),
            );
            let deadline = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() + 60_000)
                .unwrap_or(0);
            if let Ok(v) = HeaderValue::from_str(&deadline.to_string()) {
                h.insert("lambda-runtime-deadline-ms", v);
            }
            h.insert(
                "lambda-runtime-invoked-function-arn",
                HeaderValue::from_static("arn:aws:lambda:us-east-1:000000000000:function:resize"),
            );
            (StatusCode::OK, h, body)
        }
        None => {
            // The invocation is over: say so, and keep this `next` waiting for ever.
            stub.done.notify_one();
            std::future::pending::<()>().await;
            (StatusCode::OK, HeaderMap::new(), String::new())
        }
    }
}

async fn respond(
    State(stub): State<Arc<Stub>>,
    Path((_id, kind)): Path<(String, String)>,
    body: String,
) -> StatusCode {
    if let Ok(mut a) = stub.answer.lock() {
        *a = Some((kind, body));
    }
    StatusCode::ACCEPTED
}

fn s3_event(bucket: &str, key: &str, size: usize) -> String {
    serde_json::json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": REGION,
        "eventTime": "2026-11-30T00:00:00.000Z", "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "rss"}, "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "rss",
               "bucket": {"name": bucket, "ownerIdentity": {"principalId": "rss"}, "arn": format!("arn:aws:s3:::{bucket}")},
               "object": {"key": key, "size": size, "eTag": "x", "sequencer": "1"}}
    }]})
    .to_string()
}

/// VmHWM (peak resident set) of a process, in kB.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).collect::<Vec<_>>();
    let mut runs = 5usize;
    if let Some(i) = args.iter().position(|a| a == "--runs") {
        runs = args.get(i + 1).context("--runs N")?.parse()?;
        args.drain(i..i + 2);
    }
    let [bootstrap, photo] = args.as_slice() else {
        bail!("usage: resize-rss [--runs N] BOOTSTRAP PHOTO");
    };
    let bytes = std::fs::read(photo).with_context(|| photo.clone())?;
    let emu = Emulator::start().await?;
    let sdk = emu.sdk_config().await;
    let clients = Clients::new(&sdk, Some(&emu.endpoint));
    let bucket = unique("rss-bucket-");
    let table = unique("rss-table-");
    aws_setup::create_bucket(&clients.s3, &bucket).await?;
    aws_setup::create_table(&clients.dynamodb, &table).await?;
    let queue =
        aws_setup::create_queue(&clients.sqs, &unique("rss-jobs-"), Duration::from_secs(30))
            .await?;

    let mut peaks = Vec::with_capacity(runs);
    let mut last = None;
    for run in 0..runs {
        // A new image each run, so every run does the whole resize (none is "already done").
        let key = format!("uploads/acme/phone-{run}.jpg");
        clients
            .s3
            .put_object()
            .bucket(&bucket)
            .key(&key)
            .body(bytes.clone().into())
            .send()
            .await?;
        let stub = Arc::new(Stub {
            event: Mutex::new(Some(s3_event(&bucket, &key, bytes.len()))),
            answer: Mutex::new(None),
            done: Notify::new(),
        });
        let app = Router::new()
            .route(NEXT, get(next))
            .route("/2018-06-01/runtime/invocation/{id}/{kind}", post(respond))
            .with_state(stub.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let api = listener.local_addr()?.to_string();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let mut child = tokio::process::Command::new(bootstrap)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("AWS_LAMBDA_RUNTIME_API", &api)
            .env("AWS_LAMBDA_FUNCTION_NAME", "resize")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/resize")
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "local")
            .env("AWS_REGION", REGION)
            .env("AWS_DEFAULT_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/aws-credentials",
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL", &emu.endpoint)
            .env("SIGHTLINE_BUCKET", &bucket)
            .env("SIGHTLINE_TABLE", &table)
            .env("SIGHTLINE_QUEUE_URL", &queue)
            .env("SIGHTLINE_PROVIDER", "local")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bootstrap}"))?;
        let pid = child.id().context("the bootstrap's pid")?;
        tokio::time::timeout(Duration::from_secs(60), stub.done.notified())
            .await
            .context("the bootstrap did not finish its invocation within 60 s")?;
        let peak = peak_rss_kb(pid).context("reading VmHWM")?;
        let _ = child.kill().await;
        server.abort();
        let answer = stub.answer.lock().ok().and_then(|a| a.clone());
        match &answer {
            Some((kind, _)) if kind == "response" => {}
            other => bail!("run {run}: the invocation did not succeed: {other:?}"),
        }
        peaks.push(peak as f64 / 1024.0);
        last = answer;
    }
    peaks.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({
            "peak_rss_mib_median": (peaks[peaks.len() / 2] * 10.0).round() / 10.0,
            "peak_rss_mib_max": (peaks[peaks.len() - 1] * 10.0).round() / 10.0,
            "runs": runs,
            "answer": last.map(|(_, body)| body),
        })
    );
    Ok(())
}
