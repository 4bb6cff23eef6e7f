//! End-to-end tests of the `sightline` binary on the embedded default (SQLite + files).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use sightline_tests::sim::{EveryNth, Fault, FaultPlan, SimConfig, SimServer};

/// The sample runs are CPU-heavy; run them one at a time on small CI machines.
static HEAVY: Mutex<()> = Mutex::new(());

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/samples")
}

fn sightline(data_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sightline"));
    c.arg("--data-dir").arg(data_dir);
    c.env_remove("OPENAI_API_KEY").env_remove("OPENAI_BASE_URL");
    for (k, _) in std::env::vars() {
        if k.starts_with("SIGHTLINE_") {
            c.env_remove(k);
        }
    }
    c
}

fn run_json(cmd: &mut Command) -> (Vec<Value>, Value) {
    let out = cmd.output().expect("run sightline");
    assert!(
        out.status.success(),
        "sightline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (summary, images): (Vec<Value>, Vec<Value>) =
        lines.into_iter().partition(|v| v["summary"] == true);
    assert_eq!(summary.len(), 1, "exactly one summary object");
    (images, summary.into_iter().next().unwrap())
}

fn by_source<'a>(images: &'a [Value], suffix: &str) -> &'a Value {
    images
        .iter()
        .find(|i| i["source"].as_str().unwrap().ends_with(suffix))
        .unwrap_or_else(|| panic!("no image {suffix}"))
}

#[test]
fn run_samples_with_the_local_analyzer() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (images, summary) = run_json(
        sightline(dir.path())
            .arg("run")
            .arg(samples())
            .arg("--json"),
    );
    assert_eq!(images.len(), 14);
    for img in &images {
        assert_eq!(img["status"], "done", "{img}");
        let (w, h) = (
            img["resized"]["width"].as_u64().unwrap(),
            img["resized"]["height"].as_u64().unwrap(),
        );
        assert!(w.max(h) <= 1024, "{img}");
        assert_eq!(img["provider"], "local");
        assert_eq!(img["cost_usd"].as_f64(), Some(0.0));
        assert!(
            img["estimate"]["cost_usd"].as_f64().unwrap() > 0.0,
            "the paid model's price is shown"
        );
        let metrics = &img["result"]["metrics"];
        assert!(metrics["dominant_colors"].as_array().unwrap().len() >= 3);
        assert_eq!(metrics["perceptual_hash"].as_str().unwrap().len(), 16);
        assert!(metrics["sharpness"].as_f64().is_some());
    }
    let phone = by_source(&images, "large/phone12mp.jpg");
    assert_eq!(
        (
            phone["resized"]["width"].as_u64(),
            phone["resized"]["height"].as_u64()
        ),
        (Some(768), Some(1024))
    );
    assert_eq!(
        (
            phone["original"]["width"].as_u64(),
            phone["original"]["height"].as_u64()
        ),
        (Some(3024), Some(4032))
    );
    assert_eq!(summary["done"], 14);
    assert_eq!(summary["failed"], 0);
    assert!(summary["image_tokens_saved"].as_u64().unwrap() > 0);

    // The terminal commands see the same data.
    let out = sightline(dir.path())
        .args(["results", "--status", "done", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 14);
    let out = sightline(dir.path())
        .args(["costs", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["total"]["images"], 14);
}

#[test]
fn run_against_the_provider_simulator_with_faults_then_all_cached() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt
        .block_on(SimServer::start(SimConfig {
            api_key: "sk-test".into(),
            rpm: 0,
            tpm: 0,
            latency_ms: 20,
            jitter_ms: 20,
            seed: 7,
            timeout_hang_ms: 4_000,
            faults: FaultPlan {
                error_rate: 0.15,
                rate_limit_rate: 0.15,
                retry_after_s: 1.0,
                timeout_rate: 0.03,
                every_nth: Some(EveryNth {
                    n: 9,
                    fault: Fault::Malformed,
                }),
                ..FaultPlan::default()
            },
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |dir: &Path| {
        let mut c = sightline(dir);
        c.args([
            "--provider",
            "openai",
            "--model",
            "gpt-4.1-mini",
            "--timeout-secs",
            "2",
            "--workers",
            "4",
        ])
        .arg("run")
        .arg(samples())
        .arg("--json")
        .env("OPENAI_API_KEY", "sk-test")
        .env("OPENAI_BASE_URL", &sim.base_url);
        run_json(&mut c)
    };
    let (images, summary) = run(dir.path());
    assert_eq!(images.len(), 14);
    for img in &images {
        assert_eq!(img["status"], "done", "{img}");
        assert_eq!(img["provider"], "openai");
        assert!(img["usage"]["input_tokens"].as_u64().unwrap() > 0);
        assert!(img["cost_usd"].as_f64().unwrap() > 0.0);
        assert!(img["result"]["description"].as_str().is_some());
    }
    let stats = rt.block_on(sim.stats());
    assert!(stats.faults.total() > 0, "faults were injected: {stats:?}");
    assert_eq!(
        stats.completions, 14,
        "one billed completion per image: {stats:?}"
    );

    // Ledger = sum of results.
    let sum: f64 = images.iter().map(|i| i["cost_usd"].as_f64().unwrap()).sum();
    let out = sightline(dir.path())
        .args(["costs", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        (report["total"]["cost_usd"].as_f64().unwrap() - sum).abs() < 1e-9,
        "{report} vs {sum}"
    );
    assert!((summary["cost_usd"].as_f64().unwrap() - sum).abs() < 1e-9);
    let tokens: u64 = images
        .iter()
        .map(|i| i["usage"]["input_tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(report["total"]["input_tokens"].as_u64().unwrap(), tokens);

    // Second run: everything cached, no provider call, no cost.
    let before = rt.block_on(sim.stats()).requests;
    let (images, summary) = run(dir.path());
    assert_eq!(
        rt.block_on(sim.stats()).requests,
        before,
        "no provider calls on the second run"
    );
    assert_eq!(summary["cached"], 14);
    assert!(images
        .iter()
        .all(|i| i["cached"] == true && i["cost_usd"].as_f64() == Some(0.0)));
    let out = sightline(dir.path())
        .args(["costs", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        (report["total"]["cost_usd"].as_f64().unwrap() - sum).abs() < 1e-9,
        "ledger unchanged by cache hits"
    );
    assert_eq!(report["total"]["cached_images"], 14);
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut c = kind.to_vec();
    c.extend_from_slice(data);
    out.extend_from_slice(&c);
    out.extend_from_slice(&crc32(&c).to_be_bytes());
}

#[test]
fn hostile_inputs_fail_clearly_and_the_rest_completes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::copy(samples().join("small/rocket.jpg"), input.join("good1.jpg")).unwrap();
    std::fs::copy(samples().join("small/chelsea.png"), input.join("good2.png")).unwrap();
    std::fs::write(input.join("empty.jpg"), b"").unwrap();
    std::fs::write(input.join("notes.jpg"), b"this is not an image at all").unwrap();
    std::fs::write(input.join("vector.png"), b"<?xml version=\"1.0\"?><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1\" height=\"1\"/>").unwrap();
    let rocket = std::fs::read(samples().join("small/rocket.jpg")).unwrap();
    std::fs::write(input.join("truncated.jpg"), &rocket[..rocket.len() / 2]).unwrap();
    let mut bomb = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&200_000u32.to_be_bytes());
    ihdr.extend_from_slice(&200_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    png_chunk(&mut bomb, b"IHDR", &ihdr);
    png_chunk(
        &mut bomb,
        b"IDAT",
        &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    std::fs::write(input.join("bomb.png"), &bomb).unwrap();

    let (images, summary) = run_json(
        sightline(&dir.path().join("data"))
            .arg("run")
            .arg(&input)
            .arg("--json"),
    );
    assert_eq!(images.len(), 7);
    assert_eq!(summary["done"], 2);
    assert_eq!(summary["failed"], 5);
    for (name, want) in [
        ("empty.jpg", "empty"),
        ("notes.jpg", "not an image"),
        ("vector.png", "SVG"),
        ("truncated.jpg", "truncated"),
        ("bomb.png", "pixel limit"),
    ] {
        let img = by_source(&images, name);
        assert_eq!(img["status"], "failed", "{name}");
        let err = img["error"].as_str().unwrap();
        assert!(err.contains(want), "{name}: {err}");
    }
    assert_eq!(by_source(&images, "good1.jpg")["status"], "done");
    assert_eq!(by_source(&images, "good2.png")["status"], "done");
}

#[test]
fn bad_arguments_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let out = sightline(dir.path())
        .args(["--model", "gpt-99", "run"])
        .arg(samples())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown model \"gpt-99\""));
    let out = sightline(dir.path())
        .args(["run", "/definitely/not/here"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file or directory"));
    let out = sightline(dir.path())
        .args(["--provider", "openai", "run"])
        .arg(samples())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("OPENAI_API_KEY"));
    // estimate stores nothing and calls nothing.
    let out = sightline(dir.path())
        .args(["estimate", "--models", "gpt-4o,claude-sonnet-4-5", "--json"])
        .arg(samples().join("large/phone12mp.jpg"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["resized"]["width"], 768);
    assert_eq!(rows[0]["resized"]["image_tokens"], 765);
    assert!(rows[0]["original"]["tokens"].as_u64() >= rows[0]["resized"]["tokens"].as_u64());
    assert!(!dir.path().join("sightline.db").exists());
}

struct Served {
    child: std::process::Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_serve(data: &Path) -> Served {
    let mut child = sightline(data)
        .args(["serve", "--addr", "127.0.0.1:0", "--api-key", "k-test"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines.next().expect("serve printed its URL").unwrap();
        if let Some(rest) = line.strip_prefix("sightline serve: ") {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches('/')
                .to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Served { child, url }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_uploads_through_a_presigned_url_and_answers_queries() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_serve(dir.path());
    let http = reqwest::Client::new();
    let api = |p: &str| format!("{}{p}", s.url);
    assert_eq!(
        http.get(api("/v1/health")).send().await.unwrap().status(),
        200
    );

    // Auth and validation errors are JSON with proper codes.
    let r = http
        .post(api("/v1/uploads"))
        .json(&serde_json::json!({"content_type": "image/jpeg", "content_length": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let r = http
        .post(api("/v1/uploads"))
        .header("x-api-key", "wrong")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(api("/v1/uploads"))
        .header("x-api-key", "k-test")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(api("/v1/uploads"))
        .bearer_auth("k-test")
        .json(&serde_json::json!({"content_type": "text/html", "content_length": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(api("/v1/uploads"))
        .bearer_auth("k-test")
        .json(&serde_json::json!({"content_type": "image/png", "content_length": 999_999_999u64}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        http.get(api("/v1/images?status=bogus"))
            .header("x-api-key", "k-test")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        http.get(api("/v1/images/nope"))
            .header("x-api-key", "k-test")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        http.get(api("/v1/costs?from=yesterday"))
            .header("x-api-key", "k-test")
            .send()
            .await
            .unwrap()
            .status(),
        400
    );

    // Upload the phone photo through the presigned URL.
    let bytes = std::fs::read(samples().join("large/phone12mp.jpg")).unwrap();
    let r = http
        .post(api("/v1/uploads"))
        .header("x-api-key", "k-test")
        .json(&serde_json::json!({"filename": "phone12mp.jpg", "content_type": "image/jpeg", "content_length": bytes.len()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let up: Value = r.json().await.unwrap();
    let id = up["image_id"].as_str().unwrap().to_string();
    let url = up["upload"]["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("http://127.0.0.1:"));
    // The URL is bound to the size and the type.
    let r = http
        .put(&url)
        .header("content-type", "image/jpeg")
        .body(bytes[..100].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .put(&url)
        .header("content-type", "image/png")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let tampered = format!("{}x", url);
    assert_eq!(
        http.put(&tampered)
            .header("content-type", "image/jpeg")
            .body(bytes.clone())
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let r = http
        .put(&url)
        .header("content-type", "image/jpeg")
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    let deadline = Instant::now() + Duration::from_secs(90);
    let img = loop {
        let r = http
            .get(api(&format!("/v1/images/{id}")))
            .header("x-api-key", "k-test")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        if v["status"] == "done" || v["status"] == "failed" {
            break v;
        }
        assert!(Instant::now() < deadline, "image not done in time: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(img["status"], "done", "{img}");
    assert_eq!(img["resized"]["width"], 768);
    assert_eq!(img["resized"]["height"], 1024);
    assert!(img["result"]["analysis"]["description"].as_str().is_some());

    let list: Value = http
        .get(api("/v1/images?status=done&limit=10"))
        .header("x-api-key", "k-test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["images"][0]["image_id"], id);
    let costs: Value = http
        .get(api("/v1/costs"))
        .header("x-api-key", "k-test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(costs["total"]["images"], 1);
    // The widget page is served under a strict CSP.
    let r = http.get(api("/")).send().await.unwrap();
    if r.status() == 200 {
        let csp = r
            .headers()
            .get("content-security-policy")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(csp.contains("script-src 'self' 'wasm-unsafe-eval'"));
    }
}
