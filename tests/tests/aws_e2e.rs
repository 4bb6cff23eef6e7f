//! End to end on the emulator: S3 uploads → (notification queue, played by the harness as the
//! event source mapping) → resize handler → analyze queue → analyze handler (real `SqsEvent`s,
//! batch item failures, visibility delays, DLQ) → DynamoDB; provider = the simulator with
//! 429s, 5xx and a malformed response injected; then the api handler over lambda_http requests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lambda_events::event::s3::S3Event;
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use http_body_util::BodyExt;
use sightline_analyze::AnalyzeHandler;
use sightline_core::keys::parse_upload_key;
use sightline_core::model::{idempotency_key, AnalysisJob, ImageStatus};
use sightline_pipeline::analyze::Analyzer;
use sightline_pipeline::aws::{
    Clients, DynamoRepository, S3BlobStore, S3Presigner, S3VectorStore, SqsQueue,
};
use sightline_pipeline::http::{hash_api_key, router, ApiState};
use sightline_pipeline::ingest::Ingest;
use sightline_pipeline::ports::{BlobStore, Clock, Queue, QueueMessage, Repository, SystemClock};
use sightline_pipeline::providers::local::LocalAnalyzer;
use sightline_pipeline::providers::local_embed::LocalEmbedder;
use sightline_pipeline::providers::openai::OpenAiProvider;
use sightline_pipeline::search::Search;
use sightline_pipeline::settings::Dedupe;
use sightline_pipeline::Settings;
use sightline_tests::sim::{EveryNth, Fault, FaultPlan, SimConfig, SimServer};
use sightline_tests::{aws_setup, contract::unique, emulator::Emulator};
use tower::ServiceExt;

fn sample(rel: &str) -> Vec<u8> {
    let p = format!("{}/fixtures/{rel}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn sqs_event(msgs: &[QueueMessage]) -> SqsEvent {
    let mut ev = SqsEvent::default();
    for m in msgs {
        let mut r = SqsMessage::default();
        r.message_id = Some(m.message_id.clone());
        r.receipt_handle = Some(m.receipt.clone());
        r.body = Some(m.body.clone());
        r.attributes.insert(
            "ApproximateReceiveCount".into(),
            m.receive_count.to_string(),
        );
        r.event_source = Some("aws:sqs".into());
        ev.records.push(r);
    }
    ev
}

/// The S3 event in a notification body. moto leaves out `userIdentity` and
/// `requestParameters`, which real S3 always sends (and the event type requires): fill them in.
fn s3_event(body: &str) -> S3Event {
    let mut v: serde_json::Value = serde_json::from_str(body).expect("notification body is JSON");
    for r in v["Records"].as_array_mut().expect("Records").iter_mut() {
        let obj = r.as_object_mut().expect("record object");
        obj.entry("userIdentity")
            .or_insert(serde_json::json!({"principalId": "emulator"}));
        obj.entry("requestParameters")
            .or_insert(serde_json::json!({"sourceIPAddress": "127.0.0.1"}));
    }
    serde_json::from_value(v).expect("S3 event")
}

async fn api_call(app: axum::Router, uri: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let mut b = lambda_http::http::Request::builder().uri(uri);
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    let req: lambda_http::Request = b.body(lambda_http::Body::Empty).unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// The pipeline test's maxReceiveCount. Each delivery of a good image fails with probability
/// about 0.47 under its fault plan (0.2 5xx + 0.2 429, and a malformed answer's second call),
/// so with 3 receives a good image ended in the DLQ in about one run in three whenever the
/// timing of retries changed which image drew the faults. With 12 the chance is about 1e-4 per
/// image. The poison job still reaches the DLQ (12 redeliveries of about 2 s); the garbage body,
/// whose redeliveries back off exponentially, gets a queue of its own with 3 receives.
const MAX_RECEIVES: u32 = 12;
const GARBAGE_RECEIVES: u32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_end_to_end_on_the_emulator() {
    let emu = Emulator::start().await.expect("emulator");
    let sdk = emu.sdk_config().await;
    let clients = Clients::new(&sdk, Some(&emu.endpoint));

    // Resources as in docs/aws.md (short timeouts for test speed).
    let bucket = unique("e2e-bucket-");
    let table = unique("e2e-table-");
    aws_setup::create_bucket(&clients.s3, &bucket)
        .await
        .unwrap();
    aws_setup::create_table(&clients.dynamodb, &table)
        .await
        .unwrap();
    let notif_url = aws_setup::create_queue(
        &clients.sqs,
        &unique("e2e-notify-"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let notif_arn = aws_setup::queue_arn(&clients.sqs, &notif_url)
        .await
        .unwrap();
    aws_setup::notify_queue_on_prefix(&clients.s3, &bucket, &notif_arn, "uploads/")
        .await
        .unwrap();
    let (analyze_url, dlq_url) = aws_setup::create_queue_with_dlq(
        &clients.sqs,
        &unique("e2e-analyze-"),
        Duration::from_secs(30),
        MAX_RECEIVES,
    )
    .await
    .unwrap();

    let (garbage_url, garbage_dlq_url) = aws_setup::create_queue_with_dlq(
        &clients.sqs,
        &unique("e2e-garbage-"),
        Duration::from_secs(30),
        GARBAGE_RECEIVES,
    )
    .await
    .unwrap();

    // Provider simulator: 429s (Retry-After 1 s), 5xx, and every 6th answer malformed.
    let sim = SimServer::start(SimConfig {
        api_key: "sk-e2e".into(),
        faults: FaultPlan {
            error_rate: 0.2,
            error_statuses: vec![500, 503],
            rate_limit_rate: 0.2,
            retry_after_s: 1.0,
            every_nth: Some(EveryNth {
                n: 6,
                fault: Fault::Malformed,
            }),
            ..FaultPlan::default()
        },
        seed: 7,
        ..SimConfig::default()
    })
    .await
    .unwrap();

    let settings = Arc::new(Settings {
        max_inline_wait: Duration::from_secs(1),
        claim_lease: Duration::from_secs(5),
        max_concurrency: 1,
        // The analyze queue's maxReceiveCount.
        max_receives: MAX_RECEIVES,
        ..Settings::default()
    });
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let blobs = Arc::new(S3BlobStore::new(clients.s3.clone(), &bucket));
    let repo: Arc<dyn Repository> =
        Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &table));
    let analyze_q = Arc::new(
        SqsQueue::new(clients.sqs.clone(), &analyze_url).with_wait(Duration::from_millis(300)),
    );
    let notif_q =
        SqsQueue::new(clients.sqs.clone(), &notif_url).with_wait(Duration::from_millis(300));
    let dlq = SqsQueue::new(clients.sqs.clone(), &dlq_url).with_wait(Duration::ZERO);
    let ingest = Ingest::new(
        blobs.clone(),
        repo.clone(),
        analyze_q.clone(),
        settings.clone(),
        clock.clone(),
        "uploads/",
    );
    let provider =
        Arc::new(OpenAiProvider::new(&sim.base_url, "sk-e2e", Duration::from_secs(20)).unwrap());
    let analyzer = Analyzer::new(
        blobs.clone(),
        repo.clone(),
        provider,
        settings.clone(),
        clock.clone(),
    );
    let handler = AnalyzeHandler::new(analyzer.clone(), analyze_q.clone(), "analyze");
    let garbage_q =
        Arc::new(SqsQueue::new(clients.sqs.clone(), &garbage_url).with_wait(Duration::ZERO));
    let garbage_dlq =
        SqsQueue::new(clients.sqs.clone(), &garbage_dlq_url).with_wait(Duration::ZERO);
    let garbage_handler = AnalyzeHandler::new(analyzer, garbage_q.clone(), "analyze");

    // Uploads: good images under awkward keys, hostile ones, another tenant.
    let good: Vec<(&str, &str)> = vec![
        ("uploads/acme/a b+c(1)é.jpg", "samples/rocket.jpg"),
        ("uploads/acme/chelsea.png", "samples/chelsea.png"),
        ("uploads/acme/coffee 2.png", "samples/coffee.png"),
        (
            "uploads/acme/hubble+deep.jpg",
            "samples/hubble_deep_field.jpg",
        ),
        ("uploads/acme/garden.jpg", "photos/Garden.jpg"),
        ("uploads/globex/g.jpg", "photos/LadyBird.jpg"),
    ];
    let mut truncated = sample("samples/rocket.jpg");
    truncated.truncate(truncated.len() / 3);
    let bad: Vec<(&str, Vec<u8>)> = vec![
        (
            "uploads/acme/notes.jpg",
            b"this is not an image at all".to_vec(),
        ),
        ("uploads/acme/truncated.jpg", truncated),
        ("uploads/acme/empty.jpg", Vec::new()),
    ];
    for (key, file) in &good {
        blobs.put(key, sample(file), "image/jpeg").await.unwrap();
    }
    for (key, bytes) in &bad {
        blobs.put(key, bytes.clone(), "image/jpeg").await.unwrap();
    }
    // Outside the trigger prefix: no event.
    blobs
        .put(
            "elsewhere/x.jpg",
            sample("samples/rocket.jpg"),
            "image/jpeg",
        )
        .await
        .unwrap();
    let id = |key: &str| parse_upload_key(key, "uploads/").unwrap();

    // A poison job: its idempotency key is held by a stuck worker the whole time, so every
    // delivery is Busy → transient → batch item failure, until the redrive moves it to the DLQ.
    let poison_sha = "ee".repeat(32);
    let mut poison = sightline_tests::contract::record(
        "acme",
        "poison",
        "2026-01-01T00:00:00.000Z",
        ImageStatus::Queued,
    );
    poison.sha256 = Some(poison_sha.clone());
    repo.put_image(&poison, None).await.unwrap();
    let poison_job = AnalysisJob {
        v: AnalysisJob::VERSION,
        image_id: "poison".into(),
        tenant: "acme".into(),
        resized_key: "resized/acme/poison.jpg".into(),
        sha256: poison_sha.clone(),
        width: 10,
        height: 10,
        detail: None,
        lane: None,
        check: None,
    };
    let poison_body = serde_json::to_string(&poison_job).unwrap();
    let poison_key = idempotency_key(
        settings.cache_scope("acme"),
        &poison_sha,
        &settings.model,
        &settings.answer_params(settings.detail),
    );
    repo.claim(
        &poison_key,
        "stuck-worker",
        Duration::from_secs(2),
        clock.now_ms(),
    )
    .await
    .unwrap();
    // And a body that is no job at all: never dropped, it must reach the DLQ too.
    let garbage_body = "{\"this is\": \"not a job\"".to_string();
    analyze_q.send(vec![poison_body.clone()]).await.unwrap();
    garbage_q.send(vec![garbage_body.clone()]).await.unwrap();

    // The stuck worker renews its short lease the whole time, beside the handlers (which wait
    // in place for a busy claim, up to max_inline_wait, before handing the job back).
    let stuck_worker = {
        let (repo, clock, key) = (repo.clone(), clock.clone(), poison_key.clone());
        tokio::spawn(async move {
            loop {
                if let Err(e) = repo
                    .claim(&key, "stuck-worker", Duration::from_secs(2), clock.now_ms())
                    .await
                {
                    eprintln!("the stuck worker could not renew its claim: {e}");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    // The harness plays both event source mappings.
    let mut test_events = 0;
    let mut upload_keys_seen = BTreeSet::new();
    let mut jobs_seen: BTreeMap<String, AnalysisJob> = BTreeMap::new();
    let mut failures_reported = 0;
    let mut replayed = false;
    let mut dead = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if Instant::now() >= deadline {
            let mut states = Vec::new();
            for (key, _) in &good {
                let k = id(key);
                let rec = repo.get_image(&k.tenant, &k.image_id).await.unwrap();
                states.push((key.to_string(), rec.map(|r| (r.status, r.error))));
            }
            let dead_bodies: Vec<&str> = dead
                .iter()
                .map(|m: &QueueMessage| m.body.as_str())
                .collect();
            panic!(
                "pipeline did not settle: good images {states:?}; dead letters {dead_bodies:?}; \
                 failures reported {failures_reported}; jobs seen {:?}",
                jobs_seen.keys().collect::<Vec<_>>()
            );
        }
        for m in notif_q.receive(10, Duration::from_secs(30)).await.unwrap() {
            if m.body.contains("s3:TestEvent") {
                test_events += 1;
                notif_q.delete(&m.receipt).await.unwrap();
                continue;
            }
            let event = s3_event(&m.body);
            for k in sightline_resize::keys_from_event(&event, "uploads/") {
                upload_keys_seen.insert(k);
            }
            sightline_resize::handle(&ingest, event.clone())
                .await
                .expect("resize");
            if !replayed {
                // S3 delivers at least once: the same event again is harmless.
                sightline_resize::handle(&ingest, event)
                    .await
                    .expect("resize replay");
                replayed = true;
            }
            notif_q.delete(&m.receipt).await.unwrap();
        }

        let msgs = analyze_q
            .receive(10, Duration::from_secs(30))
            .await
            .unwrap();
        if !msgs.is_empty() {
            for m in &msgs {
                if let Ok(job) = AnalysisJob::parse(&m.body) {
                    jobs_seen.insert(job.image_id.clone(), job);
                }
            }
            let resp = handler.handle(sqs_event(&msgs), None).await.unwrap();
            let failed: BTreeSet<String> = resp
                .batch_item_failures
                .iter()
                .map(|f| f.item_identifier.clone())
                .collect();
            assert!(failed.iter().all(|f| !f.is_empty()));
            failures_reported += failed.len();
            for m in msgs.iter().filter(|m| !failed.contains(&m.message_id)) {
                analyze_q.delete(&m.receipt).await.unwrap();
            }
        }
        dead.extend(dlq.receive(10, Duration::from_secs(300)).await.unwrap());
        let msgs = garbage_q
            .receive(10, Duration::from_secs(30))
            .await
            .unwrap();
        if !msgs.is_empty() {
            let resp = garbage_handler
                .handle(sqs_event(&msgs), None)
                .await
                .unwrap();
            failures_reported += resp.batch_item_failures.len();
            let failed: BTreeSet<&str> = resp
                .batch_item_failures
                .iter()
                .map(|f| f.item_identifier.as_str())
                .collect();
            for m in msgs
                .iter()
                .filter(|m| !failed.contains(m.message_id.as_str()))
            {
                garbage_q.delete(&m.receipt).await.unwrap();
            }
        }
        dead.extend(
            garbage_dlq
                .receive(10, Duration::from_secs(300))
                .await
                .unwrap(),
        );

        let mut all_done = !jobs_seen.is_empty();
        for (key, _) in &good {
            let k = id(key);
            let rec = repo.get_image(&k.tenant, &k.image_id).await.unwrap();
            all_done &= rec.is_some_and(|r| r.status == ImageStatus::Done);
        }
        if all_done && dead.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stuck_worker.abort();

    // Only uploads triggered the resize function; the test event came first and was skipped.
    assert!(test_events >= 1);
    let expected_keys: BTreeSet<String> = good
        .iter()
        .map(|(k, _)| k.to_string())
        .chain(bad.iter().map(|(k, _)| k.to_string()))
        .collect();
    assert_eq!(upload_keys_seen, expected_keys);

    // The poison job and the garbage body ended in the DLQ after maxReceiveCount deliveries,
    // reported as failures; the poison image is marked failed on its last delivery.
    let mut dead_bodies: Vec<&str> = dead.iter().map(|m| m.body.as_str()).collect();
    dead_bodies.sort();
    let mut expected_dead = vec![poison_body.as_str(), garbage_body.as_str()];
    expected_dead.sort();
    assert_eq!(dead_bodies, expected_dead);
    assert!(
        failures_reported >= (MAX_RECEIVES + GARBAGE_RECEIVES) as usize,
        "failures reported: {failures_reported}"
    );
    let p = repo.get_image("acme", "poison").await.unwrap().unwrap();
    assert_eq!((p.status, p.result.is_none()), (ImageStatus::Failed, true));
    let why = p.error.unwrap_or_default();
    assert!(
        why.contains(&format!("gave up after {MAX_RECEIVES} deliveries")),
        "{why}"
    );

    // Every good image: exactly one result, one successful provider answer per image.
    let stats = sim.stats().await;
    let mut acme_cost = 0.0;
    let mut acme_done = 0u64;
    for (key, _) in &good {
        let k = id(key);
        let rec = repo
            .get_image(&k.tenant, &k.image_id)
            .await
            .unwrap()
            .unwrap();
        let result = rec.result.as_ref().expect("result");
        assert_eq!(rec.status, ImageStatus::Done);
        assert!(!result.cached);
        assert!(result.cost_usd > 0.0);
        assert!(result.usage.input_tokens > 0);
        assert!(result.analysis["description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()));
        let sha = rec.sha256.clone().unwrap();
        assert_eq!(stats.completions_per_image.get(&sha), Some(&1), "{key}");
        assert_eq!(
            rec.resized_key.as_deref(),
            Some(format!("resized/{}/{}/{sha}.jpg", k.tenant, k.image_id).as_str()),
            "the resized key names its content"
        );
        assert!(
            blobs
                .size(rec.resized_key.as_deref().unwrap())
                .await
                .unwrap()
                .unwrap()
                > 0
        );
        if k.tenant == "acme" {
            acme_cost += result.cost_usd;
            acme_done += 1;
        }
    }
    // Faults were really injected and survived.
    assert!(
        stats.faults.rate_limit + stats.faults.http_500 + stats.faults.http_503 > 0,
        "{stats:?}"
    );
    assert!(stats.faults.malformed >= 1, "{stats:?}");
    assert_eq!(jobs_seen.len(), good.len() + 1);

    // Bad images are failed with a reason, and never queued.
    for (key, _) in &bad {
        let k = id(key);
        let rec = repo
            .get_image(&k.tenant, &k.image_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.status, ImageStatus::Failed, "{key}");
        assert!(rec.error.as_deref().is_some_and(|e| !e.is_empty()), "{key}");
        assert!(!jobs_seen.contains_key(&k.image_id));
    }

    // The ledger equals the sum of the results.
    let today = &sightline_pipeline::ports::rfc3339(clock.now_ms())[..10];
    let rows = repo.costs("acme", today, today).await.unwrap();
    let ledger_cost: f64 = rows.iter().map(|r| r.cost_usd).sum();
    let ledger_images: u64 = rows.iter().map(|r| r.images).sum();
    assert!(
        (ledger_cost - acme_cost).abs() < 1e-9,
        "{ledger_cost} vs {acme_cost}"
    );
    assert_eq!(ledger_images, acme_done);

    // A duplicate job (twice) never calls the provider again.
    let dup_job = &jobs_seen[&id(good[0].0).image_id];
    let before = sim.stats().await.requests;
    let body = serde_json::to_string(dup_job).unwrap();
    analyze_q.send(vec![body.clone(), body]).await.unwrap();
    let msgs = sightline_tests::contract::receive_n(
        analyze_q.as_ref(),
        2,
        Duration::from_secs(30),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(msgs.len(), 2);
    let (resp, outcomes) = handler.handle_with_outcomes(sqs_event(&msgs), None).await;
    assert!(resp.batch_item_failures.is_empty());
    assert!(
        outcomes
            .iter()
            .all(|(_, o)| *o == sightline_pipeline::analyze::AnalyzeOutcome::AlreadyDone),
        "{outcomes:?}"
    );
    assert_eq!(sim.stats().await.requests, before);
    let rows2 = repo.costs("acme", today, today).await.unwrap();
    assert_eq!(rows2, rows);

    // The api handler with lambda_http requests.
    repo.add_api_key(
        &hash_api_key("key-acme"),
        "acme",
        "2026-01-01T00:00:00.000Z",
    )
    .await
    .unwrap();
    let app = router(ApiState {
        repo: repo.clone(),
        presigner: Arc::new(S3Presigner::new(clients.s3.clone(), &bucket)),
        settings: settings.clone(),
        clock: clock.clone(),
        batches: None,
        search: None,
        blobs: Arc::new(S3BlobStore::new(clients.s3.clone(), &bucket)),
        deliveries: None,
        generations: None,
    });
    let first = id(good[0].0);
    let (st, body) = api_call(
        app.clone(),
        &format!("/v1/images/{}", first.image_id),
        Some("key-acme"),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["image_id"], first.image_id.as_str());
    assert_eq!(body["status"], "done");
    assert!(body["result"]["cost_usd"].as_f64().is_some_and(|c| c > 0.0));
    let (st, body) = api_call(app.clone(), "/v1/images?limit=100", Some("key-acme")).await;
    assert_eq!(st, 200);
    let listed = body["images"].as_array().unwrap();
    // 5 good + 3 bad + the poison record, all acme, none of globex.
    assert_eq!(listed.len(), 9, "{body}");
    assert!(listed.iter().all(|i| i["tenant"] == "acme"));
    let (st, body) = api_call(
        app.clone(),
        &format!("/v1/costs?from={today}&to={today}"),
        Some("key-acme"),
    )
    .await;
    assert_eq!(st, 200);
    assert!(
        (body["total"]["cost_usd"].as_f64().unwrap() - acme_cost).abs() < 1e-9,
        "{body}"
    );
    assert_eq!(body["total"]["images"], acme_done);
    let (st, _) = api_call(app.clone(), "/v1/images", None).await;
    assert_eq!(st, 401);
    let globex = id("uploads/globex/g.jpg");
    let (st, _) = api_call(
        app.clone(),
        &format!("/v1/images/{}", globex.image_id),
        Some("key-acme"),
    )
    .await;
    assert_eq!(st, 404);
}

/// The reconcile Lambda's handler on the emulator, the harness playing EventBridge: crash states
/// between two writes are found through the gsi3 rechecks and finished, then the jobs it sent
/// are analysed by the analyze handler (offline analyzer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciler_lambda_recovers_what_a_crash_left_on_the_emulator() {
    use sightline_core::model::{ImageRecord, ImageSize};
    use sightline_pipeline::providers::local::LocalAnalyzer;
    use sightline_pipeline::reconcile::Reconciler;
    use sightline_reconcile::{ReconcileHandler, Stop};

    let fixture = |name: &str| {
        let p = format!("{}/fixtures/samples/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
    };

    let emu = Emulator::start().await.expect("emulator");
    let sdk = emu.sdk_config().await;
    let clients = Clients::new(&sdk, Some(&emu.endpoint));
    let bucket = unique("rec-bucket-");
    let table = unique("rec-table-");
    aws_setup::create_bucket(&clients.s3, &bucket)
        .await
        .unwrap();
    aws_setup::create_table(&clients.dynamodb, &table)
        .await
        .unwrap();
    let (analyze_url, _dlq_url) = aws_setup::create_queue_with_dlq(
        &clients.sqs,
        &unique("rec-analyze-"),
        Duration::from_secs(30),
        3,
    )
    .await
    .unwrap();

    // The pending TTL is short here: an upload URL unused for a minute is expired.
    let settings = Arc::new(Settings {
        pending_ttl: Duration::from_secs(60),
        max_concurrency: 1,
        max_receives: 3,
        ..Settings::default()
    });
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let blobs = Arc::new(S3BlobStore::new(clients.s3.clone(), &bucket));
    let repo: Arc<dyn Repository> =
        Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &table));
    let analyze_q = Arc::new(
        SqsQueue::new(clients.sqs.clone(), &analyze_url).with_wait(Duration::from_millis(300)),
    );
    // Wired as the Lambda's main wires it.
    let ingest = Ingest::new(
        blobs.clone(),
        repo.clone(),
        analyze_q.clone(),
        settings.clone(),
        clock.clone(),
        "uploads/",
    );
    let reconcile = ReconcileHandler::new(Reconciler::new(ingest), 1000);

    let now = clock.now_ms();
    let past = now - 60_000;
    let record = |id: &str, status: ImageStatus, created_ms: u64| -> ImageRecord {
        let at = sightline_pipeline::ports::rfc3339(created_ms);
        serde_json::from_value(serde_json::json!({
            "image_id": id, "tenant": "acme", "source": format!("uploads/acme/{id}.jpg"),
            "status": status, "created_at": at, "updated_at": at,
        }))
        .unwrap()
    };

    // (a) An upload whose resize never ran: the original is stored, the record still pending.
    let upload_key = "uploads/acme/x.jpg";
    blobs
        .put(upload_key, fixture("rocket.jpg"), "image/jpeg")
        .await
        .unwrap();
    let mut lost_resize = record("x", ImageStatus::Pending, now - 120_000);
    lost_resize.original_key = Some(upload_key.into());
    repo.put_image(&lost_resize, Some(past)).await.unwrap();

    // (b) Resized and recorded, but the job never reached the queue.
    let prepared =
        sightline_core::prepare(&fixture("hubble_deep_field.jpg"), &settings.prepare).unwrap();
    let unsent_key = sightline_core::keys::resized_key("acme", "y", &prepared.sha256);
    blobs
        .put(&unsent_key, prepared.jpeg.clone(), "image/jpeg")
        .await
        .unwrap();
    let mut unsent = record("y", ImageStatus::Queued, now - 120_000);
    unsent.sha256 = Some(prepared.sha256.clone());
    unsent.resized_key = Some(unsent_key.clone());
    unsent.resized = Some(ImageSize {
        width: prepared.width,
        height: prepared.height,
        bytes: prepared.bytes,
    });
    repo.put_image(&unsent, Some(past)).await.unwrap();

    // (c) An upload URL nobody used, handed out an hour ago (TTL 60 s).
    let mut unused = record("z", ImageStatus::Pending, now - 3_600_000);
    unused.original_key = Some("uploads/acme/z.jpg".into());
    repo.put_image(&unused, Some(past)).await.unwrap();

    // (d) A finished image whose recheck was left behind.
    let finished = record("w", ImageStatus::Done, now - 120_000);
    repo.put_image(&finished, Some(past)).await.unwrap();

    let due: BTreeSet<String> = repo
        .due_rechecks(now, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.image_id)
        .collect();
    assert_eq!(due, ["w", "x", "y", "z"].map(String::from).into());

    // EventBridge's scheduled event, with the invocation deadline of a 300 s function.
    let event = serde_json::json!({
        "version": "0",
        "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2026-01-01T00:05:00Z",
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/sightline-ReconcileFunctionSweep"],
        "detail": {}
    });
    let deadline = || std::time::SystemTime::now() + Duration::from_secs(300);
    let run = reconcile
        .handle(event.clone(), Some(deadline()))
        .await
        .expect("reconcile");
    let r = &run.report;
    assert_eq!(
        (r.resized, r.requeued, r.expired, r.settled, r.errors),
        (1, 1, 1, 1, 0),
        "{run:?}"
    );
    assert_eq!(run.stopped, Stop::Drained);

    // (a) resized and queued.
    let x = repo.get_image("acme", "x").await.unwrap().expect("x");
    assert_eq!(x.status, ImageStatus::Queued);
    let x_key = x.resized_key.clone().expect("x resized");
    assert!(x_key.starts_with("resized/acme/x/"), "{x_key}");
    assert!(blobs.size(&x_key).await.unwrap().is_some_and(|n| n > 0));
    // (b) unchanged, (c) gone, (d) still done.
    assert_eq!(
        repo.get_image("acme", "y")
            .await
            .unwrap()
            .expect("y")
            .status,
        ImageStatus::Queued
    );
    assert!(repo.get_image("acme", "z").await.unwrap().is_none());
    assert_eq!(
        repo.get_image("acme", "w")
            .await
            .unwrap()
            .expect("w")
            .status,
        ImageStatus::Done
    );
    // Nothing is due now; (a) and (b) are looked at again only if their jobs get stuck, and
    // (d) never again.
    assert!(repo
        .due_rechecks(clock.now_ms(), 100)
        .await
        .unwrap()
        .is_empty());
    let ten_years = clock.now_ms() + 10 * 365 * 86_400_000;
    let later: BTreeSet<String> = repo
        .due_rechecks(ten_years, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.image_id)
        .collect();
    assert_eq!(later, ["x", "y"].map(String::from).into());

    // The next scheduled run finds nothing to do.
    let again = reconcile
        .handle(event, Some(deadline()))
        .await
        .expect("second reconcile");
    assert!(again.report.is_empty(), "{again:?}");

    // One job each for (a) and (b), nothing else.
    let msgs = sightline_tests::contract::receive_n(
        analyze_q.as_ref(),
        3,
        Duration::from_secs(60),
        Duration::from_secs(5),
    )
    .await;
    let mut jobs: Vec<AnalysisJob> = msgs
        .iter()
        .map(|m| AnalysisJob::parse(&m.body).expect("a job"))
        .collect();
    jobs.sort_by(|a, b| a.image_id.cmp(&b.image_id));
    assert_eq!(
        jobs.iter()
            .map(|j| (j.image_id.as_str(), j.resized_key.as_str()))
            .collect::<Vec<_>>(),
        vec![("x", x_key.as_str()), ("y", unsent_key.as_str())]
    );

    // The analyze handler finishes both (the harness plays the event source mapping).
    let analyzer = Analyzer::new(
        blobs.clone(),
        repo.clone(),
        Arc::new(LocalAnalyzer),
        settings.clone(),
        clock.clone(),
    );
    let handler = AnalyzeHandler::new(analyzer, analyze_q.clone(), "analyze");
    let resp = handler.handle(sqs_event(&msgs), None).await.unwrap();
    assert!(
        resp.batch_item_failures.is_empty(),
        "{:?}",
        resp.batch_item_failures
    );
    for m in &msgs {
        analyze_q.delete(&m.receipt).await.unwrap();
    }
    for job in &jobs {
        let id = job.image_id.as_str();
        let rec = repo.get_image("acme", id).await.unwrap().expect(id);
        assert_eq!(rec.status, ImageStatus::Done, "{id}");
        assert_eq!(rec.sha256.as_deref(), Some(job.sha256.as_str()), "{id}");
        let result = rec.result.expect("result");
        assert_eq!(result.provider, "local", "{id}");
    }
    assert_eq!(jobs[1].sha256, prepared.sha256);
    assert!(repo.due_rechecks(ten_years, 100).await.unwrap().is_empty());
}

/// A JPEG of `rel` at half its size and 10% brighter: a near-duplicate of the original.
fn altered_copy(rel: &str) -> Vec<u8> {
    let img = image::load_from_memory(&sample(rel)).unwrap().to_rgb8();
    let mut small = image::imageops::resize(
        &img,
        img.width() / 2,
        img.height() / 2,
        image::imageops::FilterType::Triangle,
    );
    for p in small.pixels_mut() {
        for c in p.0.iter_mut() {
            *c = (*c as f32 * 1.1).min(255.0) as u8;
        }
    }
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(small)
        .write_to(
            &mut std::io::Cursor::new(&mut out),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    out
}

/// Upload → resize → analyse → embed (S3 Vectors) → `similar`, `search` and delete through the
/// api router, on the emulator; a near-duplicate reuses its original's analysis; tenant globex,
/// holding the very same photo, never sees acme's images and acme never sees globex's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn similarity_search_end_to_end_on_the_emulator() {
    let emu = Emulator::start().await.expect("emulator");
    let sdk = emu.sdk_config().await;
    let clients = Clients::new(&sdk, Some(&emu.endpoint));
    let bucket = unique("search-bucket-");
    let table = unique("search-table-");
    let vector_bucket = unique("search-vectors-");
    aws_setup::create_bucket(&clients.s3, &bucket)
        .await
        .unwrap();
    aws_setup::create_table(&clients.dynamodb, &table)
        .await
        .unwrap();
    let s3v = sightline_pipeline::aws::aws_sdk_s3vectors::Client::new(&sdk);
    aws_setup::create_vector_bucket(&s3v, &vector_bucket)
        .await
        .unwrap();
    let analyze_url = aws_setup::create_queue(
        &clients.sqs,
        &unique("search-analyze-"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();

    // The offline analyzer and embedder: no key; near-duplicate skip for acme only.
    let settings = Arc::new(Settings {
        tenant_dedupe: [("acme".to_string(), Dedupe::Near)].into(),
        ..Settings::default()
    });
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let blobs: Arc<dyn BlobStore> = Arc::new(S3BlobStore::new(clients.s3.clone(), &bucket));
    let repo: Arc<dyn Repository> =
        Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &table));
    let analyze_q = Arc::new(
        SqsQueue::new(clients.sqs.clone(), &analyze_url).with_wait(Duration::from_millis(300)),
    );
    let search = Arc::new(Search::new(
        repo.clone(),
        blobs.clone(),
        Arc::new(S3VectorStore::new(s3v.clone(), &vector_bucket)),
        Some(Arc::new(LocalEmbedder)),
        settings.clone(),
        clock.clone(),
    ));
    let ingest = Ingest::new(
        blobs.clone(),
        repo.clone(),
        analyze_q.clone(),
        settings.clone(),
        clock.clone(),
        "uploads/",
    );
    let analyzer = Analyzer::new(
        blobs.clone(),
        repo.clone(),
        Arc::new(LocalAnalyzer),
        settings.clone(),
        clock.clone(),
    )
    .with_search(search.clone());
    let handler = AnalyzeHandler::new(analyzer, analyze_q.clone(), "analyze");

    // Two rounds: the originals first, then acme's near-copy (it must find Garden analysed).
    let rounds: Vec<Vec<(&str, Vec<u8>)>> = vec![
        vec![
            ("uploads/acme/garden.jpg", sample("photos/Garden.jpg")),
            ("uploads/acme/dune.jpg", sample("photos/Dune.jpg")),
            ("uploads/acme/rocket.jpg", sample("samples/rocket.jpg")),
            ("uploads/globex/g-garden.jpg", sample("photos/Garden.jpg")),
            ("uploads/globex/ladybird.jpg", sample("photos/LadyBird.jpg")),
        ],
        vec![(
            "uploads/acme/garden-copy.jpg",
            altered_copy("photos/Garden.jpg"),
        )],
    ];
    for round in &rounds {
        let keys: Vec<String> = round.iter().map(|(k, _)| k.to_string()).collect();
        for (key, bytes) in round {
            blobs.put(key, bytes.clone(), "image/jpeg").await.unwrap();
        }
        ingest.ingest_keys(&keys).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let msgs = analyze_q
                .receive(10, Duration::from_secs(30))
                .await
                .unwrap();
            if !msgs.is_empty() {
                let resp = handler.handle(sqs_event(&msgs), None).await.unwrap();
                assert!(resp.batch_item_failures.is_empty(), "{resp:?}");
            }
            let mut done = 0;
            for key in &keys {
                let i = parse_upload_key(key, "uploads/").unwrap();
                let rec = repo.get_image(&i.tenant, &i.image_id).await.unwrap();
                if rec.is_some_and(|r| r.status == ImageStatus::Done) {
                    done += 1;
                }
            }
            if done == keys.len() {
                break;
            }
            assert!(Instant::now() < deadline, "images not done in time");
        }
    }
    let id = |key: &str| parse_upload_key(key, "uploads/").unwrap().image_id;
    let copy = repo
        .get_image("acme", &id("uploads/acme/garden-copy.jpg"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        copy.result.as_ref().and_then(|r| r.reused_from.clone()),
        Some(id("uploads/acme/garden.jpg")),
        "the near-copy reused Garden's analysis"
    );

    // The api router over the same adapters, with a key per tenant.
    for (key, tenant) in [("key-acme", "acme"), ("key-globex", "globex")] {
        repo.add_api_key(&hash_api_key(key), tenant, "2026-01-01T00:00:00.000Z")
            .await
            .unwrap();
    }
    let app = router(ApiState {
        repo: repo.clone(),
        presigner: Arc::new(S3Presigner::new(clients.s3.clone(), &bucket)),
        settings: settings.clone(),
        clock: clock.clone(),
        batches: None,
        search: Some(search.clone()),
        blobs: blobs.clone(),
        deliveries: None,
        generations: None,
    });
    let garden = id("uploads/acme/garden.jpg");
    let (st, body) = api_call(
        app.clone(),
        &format!("/v1/images/{garden}/similar?top=10"),
        Some("key-acme"),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["mode"], "vector");
    let ids: Vec<String> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["image_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids.first(),
        Some(&id("uploads/acme/garden-copy.jpg")),
        "{body}"
    );
    // Each hit carries a presigned URL of its resized JPEG (the widget's thumbnails).
    let thumb = body["results"][0]["thumbnail_url"]
        .as_str()
        .expect("thumbnail_url");
    let bytes = reqwest::get(thumb).await.unwrap().bytes().await.unwrap();
    assert_eq!(&bytes[..2], &[0xFF, 0xD8], "a JPEG");
    // Only acme's other three images: never globex's identical Garden.
    let expected: BTreeSet<String> = [
        "uploads/acme/garden-copy.jpg",
        "uploads/acme/dune.jpg",
        "uploads/acme/rocket.jpg",
    ]
    .iter()
    .map(|k| id(k))
    .collect();
    assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), expected);

    // globex cannot ask about acme's image, and its own search sees only its two images.
    let (st, _) = api_call(
        app.clone(),
        &format!("/v1/images/{garden}/similar"),
        Some("key-globex"),
    )
    .await;
    assert_eq!(st, 404);
    let globex_garden = id("uploads/globex/g-garden.jpg");
    let (st, body) = api_call(
        app.clone(),
        &format!("/v1/images/{globex_garden}/similar"),
        Some("key-globex"),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let ids: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["image_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id("uploads/globex/ladybird.jpg").as_str()]);

    // Text search: keyword mode with the offline embedder, tenant-scoped.
    let (st, body) = api_call(app.clone(), "/v1/search?q=image&top=50", Some("key-globex")).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["mode"], "keyword");
    let found: BTreeSet<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["image_id"].as_str().unwrap())
        .collect();
    assert!(found.iter().all(|i| {
        *i == globex_garden.as_str() || *i == id("uploads/globex/ladybird.jpg").as_str()
    }));
    let (st, _) = api_call(app.clone(), "/v1/search?top=5", Some("key-acme")).await;
    assert_eq!(st, 400, "q is required");

    // Deleting the copy removes its record and its vector: similar no longer lists it.
    let copy_id = id("uploads/acme/garden-copy.jpg");
    let req = lambda_http::http::Request::builder()
        .method("DELETE")
        .uri(format!("/v1/images/{copy_id}"))
        .header("x-api-key", "key-acme")
        .body(lambda_http::Body::Empty)
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert!(repo.get_image("acme", &copy_id).await.unwrap().is_none());
    let (_, body) = api_call(
        app.clone(),
        &format!("/v1/images/{garden}/similar"),
        Some("key-acme"),
    )
    .await;
    assert!(body["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["image_id"] != copy_id.as_str()));
}

// Generation jobs on the same stack (a file of its own; one test binary).
#[path = "aws_e2e/generation.rs"]
mod generation;
