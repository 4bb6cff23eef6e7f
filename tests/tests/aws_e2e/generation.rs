//! Generation jobs on the emulator stack, the harness playing the event source mappings and
//! EventBridge: a 100-row CSV posted to the api handler → generation queue → generate handler
//! (real `SqsEvent`s, batch item failures, visibility delays) → images in the bucket as
//! uploads → S3 notification → resize handler → analyze queue → analyze handler (the check by
//! analysis moves each row on) → the job finishes → the reconcile handler's deliveries task
//! signs the webhook with the tenant's secret from SSM. Faults on both provider APIs; then the
//! same CSV dropped under `generations/` (the generate handler's S3 path) pays nothing.

use super::*;
use sightline_core::webhook::{ReceivedHeaders, WebhookSecret, DEFAULT_TOLERANCE};
use sightline_generate::{handle_drops, GenerateHandler};
use sightline_pipeline::aws::aws_sdk_ssm;
use sightline_pipeline::aws::generation::GenerationSide;
use sightline_pipeline::aws::secrets::SsmWebhookSecrets;
use sightline_pipeline::delivery::{Deliveries, HttpPoster};
use sightline_pipeline::generation::{
    drop_receipt_key, Generations, Generators, TemplatesSource, DROP_WEBHOOK_ROWS_META,
    DROP_WEBHOOK_URL_META,
};
use sightline_pipeline::ports::{DeliveryStatus, GenerationStore, WebhookSecrets};
use sightline_pipeline::providers::select::ProviderKeys;
use sightline_pipeline::reconcile::Reconciler;
use sightline_pipeline::settings::ProviderKind;
use sightline_pipeline::webhook_url::{Mode, SystemResolver};
use sightline_reconcile::ReconcileHandler;
use sightline_tests::webhook_receiver::WebhookReceiver;

const ACME_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const GLOBEX_SECRET: &str = "whsec_dGhpcyBpcyBnbG9iZXgncyBvd24gc2VjcmV0IQ==";

const TEMPLATES: &str = r#"
[templates.hero]
prompt = "A studio photo of {product} in {colour}"
model = "gpt-image-1-mini"
size = "1024x1024"
quality = "low"
output_key = "products/{sku}.png"
"#;

/// 100 rows: row 37 is refused by the provider's safety system, rows 50 and 51 fail their
/// check (and are generated once more, failing again).
fn hundred_rows() -> String {
    let mut csv = String::from("sku,product,colour\n");
    for i in 1..=100 {
        let product = match i {
            37 => "a REFUSE thing".to_string(),
            50 | 51 => format!("lamp {i} [mismatch]"),
            _ => format!("lamp {i}"),
        };
        csv.push_str(&format!("SKU-{i},{product},colour {}\n", i % 7));
    }
    csv
}

async fn api_send(
    app: axum::Router,
    method: &str,
    uri: &str,
    key: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let req: lambda_http::Request = lambda_http::http::Request::builder()
        .method(method)
        .uri(uri)
        .header("x-api-key", key)
        .header("content-type", content_type)
        .body(lambda_http::Body::Binary(body))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

/// Each delivery verifies with `secret` and carries one message id.
fn assert_signed(got: &[sightline_tests::webhook_receiver::Delivery], secret: &str) {
    let secret = WebhookSecret::parse(secret).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for d in got {
        let pairs = d.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        secret
            .verify(
                &ReceivedHeaders::from_pairs(pairs),
                &d.body,
                now,
                DEFAULT_TOLERANCE,
            )
            .unwrap();
        assert_eq!(d.header("webhook-id"), got[0].header("webhook-id"));
    }
}

struct Stack {
    notif_q: SqsQueue,
    generate_q: Arc<SqsQueue>,
    analyze_q: Arc<SqsQueue>,
    dead: Vec<SqsQueue>,
    ingest: Ingest,
    generations: Arc<Generations>,
    generate: GenerateHandler,
    analyze: AnalyzeHandler,
    reconcile: ReconcileHandler,
}

impl Stack {
    /// Play every event source once: S3 notifications (uploads → resize, CSV drops →
    /// generate), the generation and analyze queues (failed records left for their visibility
    /// delay), the deliveries schedule, and the sweep when `sweep`. Returns the dead letters.
    async fn tick(&self, sweep: bool) -> Vec<QueueMessage> {
        for m in self
            .notif_q
            .receive(10, Duration::from_secs(30))
            .await
            .unwrap()
        {
            if !m.body.contains("s3:TestEvent") {
                let event = s3_event(&m.body);
                let key = event.records[0].s3.object.key.clone().unwrap_or_default();
                if key.starts_with("generations") {
                    handle_drops(&self.generations, event).await.expect("drop");
                } else {
                    sightline_resize::handle(&self.ingest, event)
                        .await
                        .expect("resize");
                }
            }
            self.notif_q.delete(&m.receipt).await.unwrap();
        }
        for (queue, analyze) in [(&self.generate_q, false), (&self.analyze_q, true)] {
            let msgs = queue.receive(10, Duration::from_secs(30)).await.unwrap();
            if msgs.is_empty() {
                continue;
            }
            let resp = if analyze {
                self.analyze.handle(sqs_event(&msgs), None).await.unwrap()
            } else {
                self.generate.handle(sqs_event(&msgs), None).await.unwrap()
            };
            let failed: BTreeSet<String> = resp
                .batch_item_failures
                .iter()
                .map(|f| f.item_identifier.clone())
                .collect();
            for m in msgs.iter().filter(|m| !failed.contains(&m.message_id)) {
                queue.delete(&m.receipt).await.unwrap();
            }
        }
        self.reconcile
            .handle_event(serde_json::json!({"task": "deliveries"}), None)
            .await
            .unwrap();
        if sweep {
            self.reconcile
                .handle_event(
                    serde_json::json!({"detail-type": "Scheduled Event", "source": "aws.events"}),
                    None,
                )
                .await
                .unwrap();
        }
        let mut dead = Vec::new();
        for q in &self.dead {
            dead.extend(q.receive(10, Duration::from_secs(300)).await.unwrap());
        }
        dead
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_jobs_end_to_end_on_the_emulator() {
    let emu = Emulator::start().await.expect("emulator");
    let sdk = emu.sdk_config().await;
    let clients = Clients::new(&sdk, Some(&emu.endpoint));
    let bucket = unique("gen-bucket-");
    let table = unique("gen-table-");
    aws_setup::create_bucket(&clients.s3, &bucket)
        .await
        .unwrap();
    aws_setup::create_table(&clients.dynamodb, &table)
        .await
        .unwrap();
    // One notification queue for both prefixes, as the template's two S3 events.
    let notif_url = aws_setup::create_queue(
        &clients.sqs,
        &unique("gen-notify-"),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let notif_arn = aws_setup::queue_arn(&clients.sqs, &notif_url)
        .await
        .unwrap();
    aws_setup::notify_queue_on(
        &clients.s3,
        &bucket,
        &notif_arn,
        &[("uploads/", None), ("generations/", Some(".csv"))],
    )
    .await
    .unwrap();
    let (analyze_url, analyze_dlq) = aws_setup::create_queue_with_dlq(
        &clients.sqs,
        &unique("gen-analyze-"),
        Duration::from_secs(30),
        5,
    )
    .await
    .unwrap();
    let (generate_url, generate_dlq) = aws_setup::create_queue_with_dlq(
        &clients.sqs,
        &unique("gen-rows-"),
        Duration::from_secs(30),
        5,
    )
    .await
    .unwrap();

    // The tenants' webhook secrets in SSM, as SecureStrings under the stack's path.
    let ssm = aws_sdk_ssm::Client::new(&sdk);
    let secrets_path = format!("/{}/webhook-secrets/", unique("e2e"));
    for (tenant, secret) in [("acme", ACME_SECRET), ("globex", GLOBEX_SECRET)] {
        ssm.put_parameter()
            .name(format!("{secrets_path}{tenant}"))
            .value(secret)
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .send()
            .await
            .unwrap();
    }

    // Faults on the Images API and chat completions alike.
    let sim = SimServer::start(SimConfig {
        api_key: "sk-e2e".into(),
        latency_ms: 5,
        jitter_ms: 10,
        seed: 23,
        timeout_hang_ms: 4_000,
        faults: FaultPlan {
            error_rate: 0.04,
            rate_limit_rate: 0.04,
            retry_after_s: 1.0,
            timeout_rate: 0.01,
            every_nth: Some(EveryNth {
                n: 23,
                fault: Fault::Malformed,
            }),
            ..FaultPlan::default()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let acme_hook = WebhookReceiver::start(vec![500, 503, 500]).await.unwrap();
    let globex_hook = WebhookReceiver::start(vec![410]).await.unwrap();

    let settings = Arc::new(Settings {
        openai_base_url: sim.base_url.clone(),
        provider_timeout: Duration::from_secs(2),
        max_inline_wait: Duration::from_secs(1),
        max_receives: 5,
        // 5 s, 5 min, 30 min become 5 ms, 0.3 s, 1.8 s.
        webhook_retry_scale: 0.001,
        stuck_after: Duration::from_secs(20),
        ..Settings::default()
    });
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let blobs = Arc::new(S3BlobStore::new(clients.s3.clone(), &bucket));
    let repo = Arc::new(DynamoRepository::new(clients.dynamodb.clone(), &table));
    let analyze_q = Arc::new(
        SqsQueue::new(clients.sqs.clone(), &analyze_url).with_wait(Duration::from_millis(200)),
    );
    let generate_q = Arc::new(
        SqsQueue::new(clients.sqs.clone(), &generate_url).with_wait(Duration::from_millis(200)),
    );
    let ingest = Ingest::new(
        blobs.clone(),
        repo.clone(),
        analyze_q.clone(),
        settings.clone(),
        clock.clone(),
        "uploads/",
    );
    let secrets: Arc<dyn WebhookSecrets> = Arc::new(SsmWebhookSecrets::new(
        ssm.clone(),
        &secrets_path,
        settings.clone(),
    ));
    let keys = {
        let mut k = ProviderKeys::default();
        k.set(ProviderKind::OpenAi, Some("sk-e2e".into()));
        k
    };
    let generators = Generators::for_settings(settings.clone(), keys);
    // Mode::Local: the receivers listen on loopback, which the deployed mode refuses by design
    // (its checks are the webhook_url unit tests).
    let resolver = Arc::new(SystemResolver::default());
    let generations = Arc::new(
        Generations::new(
            repo.clone(),
            repo.clone(),
            blobs.clone(),
            generate_q.clone(),
            Arc::new(generators),
            settings.clone(),
            clock.clone(),
            Mode::Local,
            resolver.clone(),
        )
        .with_secrets(secrets.clone())
        .with_templates(TemplatesSource::Blob {
            blobs: blobs.clone(),
            key: sightline_pipeline::generation::TEMPLATES_KEY.into(),
        }),
    );
    let deliveries = Arc::new(Deliveries {
        store: repo.clone(),
        poster: Arc::new(HttpPoster::new(Mode::Local, resolver)),
        secrets,
        settings: settings.clone(),
        clock: clock.clone(),
    });
    let provider =
        Arc::new(OpenAiProvider::new(&sim.base_url, "sk-e2e", Duration::from_secs(2)).unwrap());
    let analyzer = Analyzer::new(
        blobs.clone(),
        repo.clone(),
        provider,
        settings.clone(),
        clock.clone(),
    )
    .with_generations(generations.clone());
    let mut reconcile = ReconcileHandler::new(Reconciler::new(ingest.clone()), 100);
    reconcile.generation = Some(GenerationSide {
        generations: generations.clone(),
        deliveries: deliveries.clone(),
    });
    let stack = Stack {
        notif_q: SqsQueue::new(clients.sqs.clone(), &notif_url)
            .with_wait(Duration::from_millis(200)),
        generate_q: generate_q.clone(),
        analyze_q: analyze_q.clone(),
        dead: vec![
            SqsQueue::new(clients.sqs.clone(), &analyze_dlq).with_wait(Duration::ZERO),
            SqsQueue::new(clients.sqs.clone(), &generate_dlq).with_wait(Duration::ZERO),
        ],
        ingest,
        generations: generations.clone(),
        generate: GenerateHandler::new(
            generations.as_ref().clone(),
            generate_q.clone(),
            "generate",
        ),
        analyze: AnalyzeHandler::new(analyzer, analyze_q.clone(), "analyze"),
        reconcile,
    };

    // The templates object, and the api with a key per tenant.
    blobs
        .put(
            sightline_pipeline::generation::TEMPLATES_KEY,
            TEMPLATES.as_bytes().to_vec(),
            "application/toml",
        )
        .await
        .unwrap();
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
        search: None,
        blobs: blobs.clone(),
        deliveries: Some(deliveries.as_ref().clone()),
        generations: Some(generations.clone()),
    });

    // acme: 100 rows with a webhook that fails 3 times; globex: 3 rows to a receiver that
    // answers 410 Gone.
    let csv = hundred_rows();
    let hook = |url: &str| url.replace(':', "%3A").replace('/', "%2F");
    let (st, body) = api_send(
        app.clone(),
        "POST",
        &format!(
            "/v1/generations?template=hero&webhook_url={}",
            hook(&acme_hook.url)
        ),
        "key-acme",
        "text/csv",
        csv.clone().into_bytes(),
    )
    .await;
    assert_eq!(st, 202, "{body}");
    let acme_job = body["job"]["job_id"].as_str().unwrap().to_string();
    let (st, body) = api_send(
        app.clone(),
        "POST",
        &format!(
            "/v1/generations?template=hero&webhook_url={}",
            hook(&globex_hook.url)
        ),
        "key-globex",
        "text/csv",
        b"sku,product,colour\nG1,vase,red\nG2,mug,blue\nG3,cup,green\n".to_vec(),
    )
    .await;
    assert_eq!(st, 202, "{body}");
    let globex_job = body["job"]["job_id"].as_str().unwrap().to_string();
    // A tenant without a secret cannot name a webhook; nothing is stored.
    repo.add_api_key(
        &hash_api_key("key-initech"),
        "initech",
        "2026-01-01T00:00:00.000Z",
    )
    .await
    .unwrap();
    let (st, body) = api_send(
        app.clone(),
        "POST",
        &format!(
            "/v1/generations?template=hero&webhook_url={}",
            hook(&acme_hook.url)
        ),
        "key-initech",
        "text/csv",
        b"sku,product,colour\nI1,desk,grey\n".to_vec(),
    )
    .await;
    assert_eq!(st, 422, "{body}");

    let delivered = |tenant: &'static str, job: String| {
        let repo = repo.clone();
        async move {
            repo.list_deliveries(tenant, None, 10)
                .await
                .unwrap()
                .into_iter()
                .find(|d| d.job_id == job && d.status != DeliveryStatus::Pending)
        }
    };
    let started = Instant::now();
    let mut ticks = 0u32;
    let mut dead = Vec::new();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(420),
            "generation did not settle: {}",
            serde_json::to_string(
                &generations
                    .job_report("acme", &acme_job)
                    .await
                    .unwrap()
                    .map(|r| r.counts)
            )
            .unwrap()
        );
        ticks += 1;
        dead.extend(stack.tick(ticks.is_multiple_of(20)).await);
        if delivered("acme", acme_job.clone()).await.is_some()
            && delivered("globex", globex_job.clone()).await.is_some()
        {
            break;
        }
    }
    assert!(dead.is_empty(), "dead letters: {dead:?}");

    // Every row generated and analysed, or failed with its reason.
    let (st, report) = api_call(
        app.clone(),
        &format!("/v1/generations/{acme_job}"),
        Some("key-acme"),
    )
    .await;
    assert_eq!(st, 200, "{report}");
    let counts = &report["counts"];
    assert_eq!(counts["total"], 100, "{counts}");
    assert_eq!(counts["done"], 97, "{counts}");
    assert_eq!(counts["mismatch"], 2, "{counts}");
    assert_eq!(counts["regenerated"], 2, "{counts}");
    assert_eq!(counts["failed"], 1, "{counts}");
    assert_eq!(report["job"]["status"], "finished");
    let rows = report["rows"].as_array().unwrap();
    let refused = rows.iter().find(|r| r["row"] == 37).unwrap();
    assert!(
        refused["error"].as_str().unwrap().contains("safety system"),
        "{refused}"
    );
    for r in rows.iter().filter(|r| r["status"] == "done") {
        assert_eq!(r["check"]["matches"], true, "{r}");
        // Delivered where the job said, in the bucket.
        let key = r["output_key"].as_str().unwrap();
        assert!(
            key.starts_with(&format!("generated/acme/{acme_job}/products/SKU-")),
            "{key}"
        );
        assert!(!blobs.get(key, 1 << 24).await.unwrap().is_empty());
    }
    let stats = sim.stats().await;
    assert!(stats.faults.total() > 0, "faults were injected: {stats:?}");

    // The ledger is what the job cost: generation plus analysis, every paid call once.
    let today = &sightline_pipeline::ports::rfc3339(clock.now_ms())[..10];
    let ledger = || async {
        repo.costs("acme", today, today)
            .await
            .unwrap()
            .iter()
            .map(|r| r.cost_usd)
            .sum::<f64>()
    };
    let ledger_total = ledger().await;
    let job_cost = report["generation_cost_usd"].as_f64().unwrap()
        + report["analysis_cost_usd"].as_f64().unwrap();
    assert!(job_cost > 0.0);
    assert!(
        (ledger_total - job_cost).abs() < 1e-9,
        "ledger {ledger_total} vs job {job_cost}"
    );

    // acme's webhook: 3 failures, then delivered; signed with acme's secret from SSM.
    let got = acme_hook.deliveries();
    assert_eq!(got.len(), 4, "{got:?}");
    assert_signed(&got, ACME_SECRET);
    let summary: serde_json::Value = serde_json::from_slice(&got[3].body).unwrap();
    assert_eq!(summary["type"], "generation.job.finished");
    assert_eq!(summary["data"]["job_id"], acme_job.as_str());
    assert_eq!(summary["data"]["counts"]["done"], 97);
    // globex's: one attempt, 410 Gone, no more (signed with globex's own secret).
    let got = globex_hook.deliveries();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_signed(&got, GLOBEX_SECRET);
    let (st, body) = api_call(
        app.clone(),
        "/v1/webhooks/deliveries?status=gone",
        Some("key-globex"),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["deliveries"][0]["job_id"], globex_job.as_str());
    assert_eq!(body["deliveries"][0]["attempts"], 1);
    for _ in 0..3 {
        stack.tick(false).await;
    }
    assert_eq!(globex_hook.deliveries().len(), 1, "a 410 stops delivery");

    // A drop whose metadata means nothing is refused in its receipt, before anything is
    // stored or paid.
    let put_drop = |key: &'static str, body: String, meta: Vec<(&'static str, String)>| {
        let mut put = clients
            .s3
            .put_object()
            .bucket(&bucket)
            .key(key)
            .content_type("text/csv")
            .body(body.into_bytes().into());
        for (k, v) in meta {
            put = put.metadata(k, v);
        }
        put.send()
    };
    let bad_key = "generations/acme/hero/bad metadata.csv";
    put_drop(
        bad_key,
        "sku,product\nX1,a mug\n".into(),
        vec![(DROP_WEBHOOK_ROWS_META, "maybe".into())],
    )
    .await
    .unwrap();

    // The same CSV dropped under generations/, naming acme's webhook in its metadata: a job
    // of its own that generates nothing, analyses nothing and pays nothing.
    let images_before = sim.stats().await.images.images;
    let drop_key = "generations/acme/hero/rerun of spring.csv";
    put_drop(
        drop_key,
        csv,
        vec![(DROP_WEBHOOK_URL_META, acme_hook.url.clone())],
    )
    .await
    .unwrap();
    let started = Instant::now();
    let rerun = loop {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "the rerun did not settle"
        );
        stack.tick(false).await;
        let jobs = repo.list_jobs("acme", 10).await.unwrap();
        if let Some(j) = jobs.iter().find(|j| j.source == format!("s3:{drop_key}")) {
            if j.status == sightline_core::genjob::JobStatus::Finished {
                break j.job_id.clone();
            }
        }
    };
    let receipt: serde_json::Value = serde_json::from_slice(
        &blobs
            .get(&drop_receipt_key(drop_key), 1 << 20)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(receipt["job_id"], rerun.as_str());
    let again = generations
        .job_report("acme", &rerun)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.counts.reused, 99, "{:?}", again.counts);
    assert_eq!(again.counts.done, 97, "{:?}", again.counts);
    assert_eq!(again.generation_cost_usd, 0.0);
    assert_eq!(again.analysis_cost_usd, 0.0);
    assert_eq!(sim.stats().await.images.images, images_before);
    assert!((ledger().await - ledger_total).abs() < 1e-9);

    // The drop's webhook arrives, signed with acme's secret (its receiver answers 200 now).
    let started = Instant::now();
    while acme_hook.deliveries().len() < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the drop's webhook did not arrive"
        );
        stack.tick(false).await;
    }
    let got = acme_hook.deliveries();
    assert_eq!(got.len(), 5, "one delivery for the drop's job");
    assert_signed(&got[4..], ACME_SECRET);
    let summary: serde_json::Value = serde_json::from_slice(&got[4].body).unwrap();
    assert_eq!(summary["type"], "generation.job.finished");
    assert_eq!(summary["data"]["job_id"], rerun.as_str());

    let refused: serde_json::Value = serde_json::from_slice(
        &blobs
            .get(&drop_receipt_key(bad_key), 1 << 20)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(refused["status"], "refused", "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains(DROP_WEBHOOK_ROWS_META),
        "{refused}"
    );
    let jobs = repo.list_jobs("acme", 10).await.unwrap();
    assert!(!jobs.iter().any(|j| j.source == format!("s3:{bad_key}")));
}
