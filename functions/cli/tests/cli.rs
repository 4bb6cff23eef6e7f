//! End-to-end tests of the `sightline` binary on the embedded default (SQLite + files).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sightline_tests::sim::{EveryNth, Fault, FaultPlan, SimConfig, SimServer};

/// The sample runs are CPU-heavy; run them one at a time on small CI machines.
static HEAVY: Mutex<()> = Mutex::new(());

/// The repository's test fixtures (tests/fixtures: samples/, photos/, large/).
fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn sightline(data_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sightline"));
    c.arg("--data-dir").arg(data_dir);
    for k in [
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
    ] {
        c.env_remove(k);
    }
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
    assert_eq!(images.len(), 12);
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
    assert_eq!(summary["done"], 12);
    assert_eq!(summary["failed"], 0);
    assert!(summary["image_tokens_saved"].as_u64().unwrap() > 0);

    // The terminal commands see the same data.
    let out = sightline(dir.path())
        .args(["results", "--status", "done", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 12);
    let out = sightline(dir.path())
        .args(["costs", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["total"]["images"], 12);
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
            limit_model: Default::default(),
            quantum_ms: 1_000,
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
            batch: Default::default(),
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
    assert_eq!(images.len(), 12);
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
        stats.completions, 12,
        "one good completion per image: {stats:?}"
    );
    assert!(stats.faults.malformed > 0, "{stats:?}");

    // Ledger = what the images cost: their results, and paid calls outside a result (an
    // invalid answer followed by a failed retry) that each image carries as extra_spend.
    let extra = |i: &Value, k: &str| i["extra_spend"][k].as_f64().unwrap_or(0.0);
    let sum: f64 = images
        .iter()
        .map(|i| i["cost_usd"].as_f64().unwrap() + extra(i, "cost_usd"))
        .sum();
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
        .map(|i| i["usage"]["input_tokens"].as_u64().unwrap() + extra(i, "input_tokens") as u64)
        .sum();
    assert_eq!(report["total"]["input_tokens"].as_u64().unwrap(), tokens);
    // Every call the provider billed is in the ledger, the truncated answers at their
    // estimate (their usage cannot be read), never at $0.
    let billed = stats.completions + stats.faults.malformed + stats.faults.bad_content;
    assert_eq!(
        report["total"]["calls"].as_u64().unwrap(),
        billed,
        "{report}"
    );
    assert_eq!(
        report["total"]["calls_at_estimate"].as_u64().unwrap(),
        stats.faults.malformed,
        "{report}"
    );
    let at_estimate = report["total"]["cost_at_estimate_usd"].as_f64().unwrap();
    assert!(at_estimate > 0.0, "{report}");
    assert!(
        (report["total"]["reported_cost_usd"].as_f64().unwrap() + at_estimate - sum).abs() < 1e-9
    );

    // Second run: everything cached, no provider call, no cost.
    let before = rt.block_on(sim.stats()).requests;
    let (images, summary) = run(dir.path());
    assert_eq!(
        rt.block_on(sim.stats()).requests,
        before,
        "no provider calls on the second run"
    );
    assert_eq!(summary["cached"], 12);
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
    assert_eq!(report["total"]["cached_images"], 12);
}

#[test]
fn anthropic_run_against_the_simulator_with_faults_books_every_paid_call_then_all_cached() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt
        .block_on(SimServer::start(SimConfig {
            api_key: "sk-ant-test".into(),
            rpm: 0,
            tpm: 0,
            limit_model: Default::default(),
            quantum_ms: 1_000,
            latency_ms: 10,
            jitter_ms: 10,
            seed: 3,
            timeout_hang_ms: 1_000,
            faults: FaultPlan {
                // 503 is answered as Anthropic's 529 overloaded_error on /v1/messages.
                error_rate: 0.2,
                error_statuses: vec![500, 503],
                rate_limit_rate: 0.2,
                retry_after_s: 1.0,
                every_nth: Some(EveryNth {
                    n: 4,
                    fault: Fault::Malformed,
                }),
                ..FaultPlan::default()
            },
            batch: Default::default(),
        }))
        .unwrap();
    let photos = samples().join("photos");
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        let mut c = sightline(dir.path());
        c.args([
            "--provider",
            "anthropic",
            "--model",
            "claude-haiku-4-5",
            "--workers",
            "2",
        ])
        .arg("run")
        .arg(&photos)
        .arg("--json")
        .env("ANTHROPIC_API_KEY", "sk-ant-test")
        .env("ANTHROPIC_BASE_URL", sim.anthropic_base_url());
        run_json(&mut c)
    };
    let (images, summary) = run();
    assert_eq!(images.len(), 5);
    for img in &images {
        assert_eq!(img["status"], "done", "{img}");
        assert_eq!(img["provider"], "anthropic");
        assert_eq!(img["model"], "claude-haiku-4-5");
        assert!(img["result"]["description"].as_str().is_some());
        // Billed by Claude's image rule, the same the estimate uses, plus the prompt.
        let input = img["usage"]["input_tokens"].as_u64().unwrap();
        assert!(
            input > img["estimate"]["image_tokens"].as_u64().unwrap(),
            "{img}"
        );
        assert!(img["cost_usd"].as_f64().unwrap() > 0.0);
    }
    let stats = rt.block_on(sim.stats());
    assert_eq!(stats.completions, 5, "one good answer per image: {stats:?}");
    assert!(stats.faults.malformed > 0, "{stats:?}");
    assert!(stats.faults.http_503 > 0, "a 529 was injected: {stats:?}");
    assert!(stats.faults.rate_limit > 0, "a 429 was injected: {stats:?}");

    // Ledger = Σ what the images cost (results and extra spend); every billed call booked
    // once, the unreadable ones at their estimate.
    let extra = |i: &Value, k: &str| i["extra_spend"][k].as_f64().unwrap_or(0.0);
    let sum: f64 = images
        .iter()
        .map(|i| i["cost_usd"].as_f64().unwrap() + extra(i, "cost_usd"))
        .sum();
    let costs = || {
        let out = sightline(dir.path())
            .args(["costs", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let report = costs();
    assert!(
        (report["total"]["cost_usd"].as_f64().unwrap() - sum).abs() < 1e-9,
        "{report} vs {sum}"
    );
    assert!((summary["cost_usd"].as_f64().unwrap() - sum).abs() < 1e-9);
    assert_eq!(
        report["total"]["calls"].as_u64().unwrap(),
        stats.completions + stats.faults.malformed + stats.faults.bad_content,
        "{report}"
    );
    assert_eq!(
        report["total"]["calls_at_estimate"].as_u64().unwrap(),
        stats.faults.malformed,
        "{report}"
    );

    // Second run: all cached, no call, no cost.
    let before = rt.block_on(sim.stats()).requests;
    let (images, summary) = run();
    assert_eq!(
        rt.block_on(sim.stats()).requests,
        before,
        "no provider call"
    );
    assert_eq!(summary["cached"], 5);
    assert!(images
        .iter()
        .all(|i| i["cached"] == true && i["cost_usd"].as_f64() == Some(0.0)));
    let report = costs();
    assert!((report["total"]["cost_usd"].as_f64().unwrap() - sum).abs() < 1e-9);
    assert_eq!(report["total"]["cached_images"], 5);
}

#[test]
fn explicit_anthropic_without_its_key_fails_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = sightline(dir.path())
        .args([
            "--provider",
            "anthropic",
            "--model",
            "claude-haiku-4-5",
            "run",
        ])
        .arg(samples().join("photos/Garden.jpg"))
        .env("OPENAI_API_KEY", "sk-test")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ANTHROPIC_API_KEY"), "{err}");
}

#[test]
fn detail_low_is_sent_priced_low_and_cached_apart_from_high() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt
        .block_on(SimServer::start(SimConfig {
            api_key: "sk-test".into(),
            rpm: 0,
            tpm: 0,
            limit_model: Default::default(),
            quantum_ms: 1_000,
            latency_ms: 5,
            jitter_ms: 0,
            seed: 1,
            timeout_hang_ms: 1_000,
            faults: FaultPlan::default(),
            batch: Default::default(),
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let photo = samples().join("photos/Garden.jpg");
    let run = |detail: &str| {
        let mut c = sightline(dir.path());
        c.args([
            "--provider",
            "openai",
            "--model",
            "gpt-4o",
            "--detail",
            detail,
        ])
        .arg("run")
        .arg(&photo)
        .arg("--json")
        .env("OPENAI_API_KEY", "sk-test")
        .env("OPENAI_BASE_URL", &sim.base_url);
        let (images, _) = run_json(&mut c);
        assert_eq!(images.len(), 1);
        images.into_iter().next().unwrap()
    };
    let completions = || rt.block_on(sim.stats()).completions;

    let low = run("low");
    assert_eq!(low["status"], "done", "{low}");
    assert_eq!(low["cached"], false);
    // Priced low: a fixed 85 tokens for the image on gpt-4o, whatever its size.
    assert_eq!(low["estimate"]["image_tokens"], 85, "{low}");
    assert_eq!(completions(), 1);

    let high = run("high");
    assert_eq!(high["cached"], false, "a low answer is not reused for high");
    assert_eq!(completions(), 2);
    let high_image = high["estimate"]["image_tokens"].as_u64().unwrap();
    assert!(high_image > 85, "{high}");
    // Sent low: the simulator bills image tokens by the detail it received, by OpenAI's rules.
    let input = |v: &Value| v["usage"]["input_tokens"].as_u64().unwrap();
    assert_eq!(input(&high) - input(&low), high_image - 85, "{low} {high}");
    assert!(low["cost_usd"].as_f64().unwrap() < high["cost_usd"].as_f64().unwrap());

    // Each detail has its own cache entry.
    let again = run("low");
    assert_eq!(again["cached"], true, "{again}");
    assert_eq!(again["cost_usd"].as_f64(), Some(0.0));
    assert_eq!(
        again["result"]["description"], low["result"]["description"],
        "the low answer"
    );
    assert_eq!(completions(), 2, "no call for a cached detail");

    // `estimate --detail low` prices the same 85 tokens.
    let out = sightline(dir.path())
        .args([
            "--detail", "low", "estimate", "--models", "gpt-4o", "--json",
        ])
        .arg(&photo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let est: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(est["resized"]["image_tokens"], 85, "{est}");
}

#[test]
fn batch_lane_run_waits_for_its_batch_books_it_at_batch_prices_and_joins_a_batch_in_flight() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt
        .block_on(SimServer::start(SimConfig {
            api_key: "sk-test".into(),
            seed: 2,
            ..SimConfig::default()
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let photos = samples().join("photos");
    let cmd = |detail: &str| {
        let mut c = sightline(dir.path());
        c.args([
            "--provider",
            "openai",
            "--model",
            "gpt-4.1-mini",
            "--lane",
            "batch",
            "--detail",
            detail,
        ])
        .env("OPENAI_API_KEY", "sk-test")
        .env("OPENAI_BASE_URL", &sim.base_url)
        .env("SIGHTLINE_BATCH_POLL_SECS", "1");
        c
    };
    let stats = || rt.block_on(sim.stats());

    // --wait: submitted as soon as the images are prepared, polled until answered.
    let (images, summary) = run_json(cmd("high").args(["run", "--json", "--wait"]).arg(&photos));
    assert_eq!(images.len(), 5);
    let table = sightline_core::pricing::PriceTable::builtin();
    let price = table.model("gpt-4.1-mini").unwrap();
    for img in &images {
        assert_eq!(img["status"], "done", "{img}");
        assert_eq!(img["lane"], "batch", "{img}");
        let usage = sightline_core::pricing::Usage {
            input_tokens: img["usage"]["input_tokens"].as_u64().unwrap(),
            output_tokens: img["usage"]["output_tokens"].as_u64().unwrap(),
            cached_tokens: 0,
        };
        let cost = img["cost_usd"].as_f64().unwrap();
        assert!((cost - price.batch_cost_usd(&usage)).abs() < 1e-12, "{img}");
        assert!(img["saved_usd"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(
        stats().completions,
        0,
        "nothing went through the real-time lane"
    );
    assert_eq!(stats().batch.lines_billed, 5);
    let batches = stdout_of(cmd("high").args(["batches", "--json"]));
    let batch: Value = serde_json::from_str(batches.lines().next().unwrap()).unwrap();
    assert_eq!(batches.lines().count(), 1, "{batches}");
    assert_eq!(batch["state"], "ended");
    assert_eq!(batch["requests"], 5);
    assert_eq!(batch["counts"]["succeeded"], 5);
    let total = summary["cost_usd"].as_f64().unwrap();
    assert!((batch["cost_usd"].as_f64().unwrap() - total).abs() < 1e-12);
    let costs: Value =
        serde_json::from_str(&stdout_of(cmd("high").args(["costs", "--json"]))).unwrap();
    assert_eq!(costs["by_lane"]["batch"]["calls"], 5, "{costs}");
    assert_eq!(costs["by_lane"]["realtime"]["calls"], 0);
    assert!((costs["by_lane"]["batch"]["cost_usd"].as_f64().unwrap() - total).abs() < 1e-12);
    assert!(costs["by_lane"]["batch_saved_usd"].as_f64().unwrap() > 0.0);

    // The same bytes again: answered from the cache at $0, no batch.
    let (again, _) = run_json(cmd("high").args(["run", "--json", "--wait"]).arg(&photos));
    assert!(again.iter().all(|i| i["cached"] == true), "{again:?}");
    assert_eq!(stats().batch.batches_created, 1);

    // Without --wait the run returns once its batch is submitted; a second run of the same
    // images joins the batch in flight and waits for it: one request per key, paid once.
    let (queued, _) = run_json(cmd("low").args(["run", "--json"]).arg(&photos));
    assert!(queued.iter().all(|i| i["status"] == "queued"), "{queued:?}");
    let open = stdout_of(cmd("low").args(["batches", "--open", "--json"]));
    assert_eq!(open.lines().count(), 1, "{open}");
    let (joined, _) = run_json(cmd("low").args(["run", "--json", "--wait"]).arg(&photos));
    assert!(joined.iter().all(|i| i["status"] == "done"), "{joined:?}");
    assert_eq!(stats().batch.batches_created, 2);
    assert_eq!(
        stats().batch.lines_billed,
        10,
        "the joined images were not sent again"
    );
    let paid = joined.iter().filter(|i| i["cached"] == false).count();
    assert_eq!(
        paid, 0,
        "the second run's images share the first run's answers"
    );
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
    std::fs::copy(
        samples().join("samples/rocket.jpg"),
        input.join("good1.jpg"),
    )
    .unwrap();
    std::fs::copy(
        samples().join("samples/chelsea.png"),
        input.join("good2.png"),
    )
    .unwrap();
    std::fs::write(input.join("empty.jpg"), b"").unwrap();
    std::fs::write(input.join("notes.jpg"), b"this is not an image at all").unwrap();
    std::fs::write(input.join("vector.png"), b"<?xml version=\"1.0\"?><svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1\" height=\"1\"/>").unwrap();
    let rocket = std::fs::read(samples().join("samples/rocket.jpg")).unwrap();
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

fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run sightline");
    assert!(
        out.status.success(),
        "sightline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn models_json_prints_every_price_rule_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let text = stdout_of(sightline(dir.path()).args(["models", "--json"]));
    let table: Value = serde_json::from_str(text.trim()).unwrap();
    assert!(!table["version"].as_str().unwrap().is_empty());
    let models = table["models"].as_array().unwrap();
    assert!(models.len() >= 9, "{table}");
    for m in models {
        for key in [
            "input_per_mtok",
            "cached_input_per_mtok",
            "output_per_mtok",
            "batch_input_per_mtok",
            "batch_output_per_mtok",
        ] {
            assert!(m[key].as_f64().unwrap() > 0.0, "{key} of {m}");
        }
        assert!(m["batch_input_per_mtok"].as_f64() < m["input_per_mtok"].as_f64());
        assert!(m["source"].as_str().unwrap().starts_with("https://"));
        assert!(!m["as_of"].as_str().unwrap().is_empty());
        assert!(m["image"]["rule"].is_string(), "{m}");
    }
    let claude = models
        .iter()
        .find(|m| m["id"] == "claude-sonnet-4-5")
        .unwrap();
    assert_eq!(claude["provider"], "anthropic");
    assert_eq!(claude["image"]["max_long_edge"], 1568);
    // The table view names the same columns.
    let text = stdout_of(sightline(dir.path()).arg("models"));
    let header = text.lines().nth(1).unwrap();
    for col in ["cached", "batch in", "batch out", "image rule"] {
        assert!(header.contains(col), "{header}");
    }
    assert!(text.contains("claude-haiku-4-5") && text.contains("anthropic"));
}

#[test]
fn estimate_json_adds_batch_cost_and_cached_price_from_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let table: Value =
        serde_json::from_str(stdout_of(sightline(dir.path()).args(["models", "--json"])).trim())
            .unwrap();
    let price = |id: &str| {
        table["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap()
            .clone()
    };
    let text = stdout_of(
        sightline(dir.path())
            .args([
                "estimate",
                "--json",
                "--models",
                "claude-sonnet-4-5,gpt-4o-mini",
            ])
            .arg(samples().join("large/phone12mp.jpg")),
    );
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let p = price(row["model"].as_str().unwrap());
        assert_eq!(row["price_version"], table["version"]);
        assert_eq!(row["cached_input_per_mtok"], p["cached_input_per_mtok"]);
        for side in ["original", "resized"] {
            let e = &row[side];
            let (input, output) = (
                e["input_tokens"].as_u64().unwrap(),
                e["output_tokens"].as_u64().unwrap(),
            );
            assert_eq!(e["tokens"].as_u64().unwrap(), input + output);
            assert!(e["image_tokens"].as_u64().unwrap() < input);
            let cost = (input as f64 * p["input_per_mtok"].as_f64().unwrap()
                + output as f64 * p["output_per_mtok"].as_f64().unwrap())
                / 1e6;
            let batch = (input as f64 * p["batch_input_per_mtok"].as_f64().unwrap()
                + output as f64 * p["batch_output_per_mtok"].as_f64().unwrap())
                / 1e6;
            assert!(
                (e["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12,
                "{row}"
            );
            assert!(
                (e["batch_cost_usd"].as_f64().unwrap() - batch).abs() < 1e-12,
                "{row}"
            );
        }
    }
    // Claude sees the 12 MP photo at 952x1269 (1611 tokens) and the resized 768x1024 whole.
    let claude = &rows[0];
    assert_eq!(claude["model"], "claude-sonnet-4-5");
    assert_eq!(claude["original"]["image_tokens"], 1611);
    assert_eq!(claude["resized"]["image_tokens"], 1049);
    // The table view has the batch column too.
    let text = stdout_of(
        sightline(dir.path())
            .args(["estimate", "--models", "gpt-4o"])
            .arg(samples().join("large/phone12mp.jpg")),
    );
    assert!(text.lines().next().unwrap().contains("batch new"), "{text}");
}

struct Served {
    child: std::process::Child,
    url: String,
    /// Everything serve wrote to stderr (logs), for assertions after it stopped.
    log: std::sync::Arc<Mutex<Vec<String>>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// SIGKILL: no shutdown code runs (a crash, an OOM kill, a power cut of the process).
    fn kill9(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.url.clone()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

fn start_serve(data: &Path) -> Served {
    serve_with(data, "127.0.0.1:0", Some("k-test"), &[])
}

/// `sightline serve` on `addr` with `env`; waits until it prints its URL.
fn serve_with(data: &Path, addr: &str, api_key: Option<&str>, env: &[(&str, &str)]) -> Served {
    let mut cmd = sightline(data);
    cmd.args(["serve", "--addr", addr]);
    if let Some(k) = api_key {
        cmd.args(["--api-key", k]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let log = std::sync::Arc::new(Mutex::new(Vec::new()));
    let url = loop {
        let line = lines.next().expect("serve printed its URL").unwrap();
        log.lock().unwrap().push(line.clone());
        if let Some(rest) = line.strip_prefix("sightline serve: ") {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches('/')
                .to_string();
        }
    };
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    Served { child, url, log }
}

/// POST /v1/uploads for `bytes`: (image id, presigned PUT URL).
async fn new_upload(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    name: &str,
    content_type: &str,
    len: usize,
) -> (String, String) {
    let r = http
        .post(format!("{base}/v1/uploads"))
        .header("x-api-key", key)
        .json(&serde_json::json!({"filename": name, "content_type": content_type, "content_length": len}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let up: Value = r.json().await.unwrap();
    (
        up["image_id"].as_str().unwrap().to_string(),
        up["upload"]["url"].as_str().unwrap().to_string(),
    )
}

async fn put_upload(
    http: &reqwest::Client,
    url: &str,
    content_type: &str,
    bytes: Vec<u8>,
) -> reqwest::Response {
    http.put(url)
        .header("content-type", content_type)
        .body(bytes)
        .send()
        .await
        .unwrap()
}

/// Poll until every image is done or failed; returns the records.
async fn wait_final(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    ids: &[String],
    within: Duration,
) -> Vec<Value> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    for id in ids {
        loop {
            let r = http
                .get(format!("{base}/v1/images/{id}"))
                .header("x-api-key", key)
                .send()
                .await;
            if let Ok(r) = r {
                if r.status() == 200 {
                    let v: Value = r.json().await.unwrap();
                    if v["status"] == "done" || v["status"] == "failed" {
                        out.push(v);
                        break;
                    }
                    assert!(Instant::now() < deadline, "image not final in time: {v}");
                }
            }
            assert!(Instant::now() < deadline, "image {id} not final in time");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    out
}

async fn get_json(http: &reqwest::Client, url: &str, key: &str) -> Value {
    http.get(url)
        .header("x-api-key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A small PNG whose pixels (and so whose resized JPEG) differ for every `n`.
fn distinct_png(n: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, ((n * 37 + x * y) % 256) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
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

    // Every route answers errors in JSON, the upload route and undecodable paths included.
    // A body just over the 25 MB limit: the server stops reading one byte short of its end
    // (a client still sending megabytes would see the connection closed under it).
    let over = 25 * 1024 * 1024 + 2;
    for (method, path, status, body) in [
        ("GET", "/v1/images/%FF", 400, Vec::new()),
        ("PUT", "/local-upload/x", 413, vec![0u8; over]),
        ("PUT", "/local-upload/x", 403, b"hello".to_vec()),
        ("GET", "/local-upload/x", 405, Vec::new()),
        ("DELETE", "/v1/images", 405, Vec::new()),
    ] {
        let r = http
            .request(method.parse().unwrap(), api(path))
            .header("x-api-key", "k-test")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{method} {path}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{method} {path}"
        );
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["code"].is_string(), "{method} {path}: {v}");
    }

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

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_upload_url_is_refused_and_the_first_upload_stands() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_serve(dir.path());
    let http = reqwest::Client::new();
    let first = std::fs::read(samples().join("samples/rocket.jpg")).unwrap();
    // Another image of exactly the same length: the signature (key, type, length) fits it.
    let mut second = distinct_png(1);
    second.resize(first.len(), 0);
    let (id, url) = new_upload(&http, &s.url, "k-test", "a.jpg", "image/jpeg", first.len()).await;
    assert_eq!(
        put_upload(&http, &url, "image/jpeg", first.clone())
            .await
            .status(),
        200
    );
    // The same bytes again (a client retrying after a lost answer) are fine; others are not.
    assert_eq!(
        put_upload(&http, &url, "image/jpeg", first.clone())
            .await
            .status(),
        200
    );
    let r = put_upload(&http, &url, "image/jpeg", second.clone()).await;
    assert_eq!(r.status(), 409);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upload_url_used");

    let done = wait_final(
        &http,
        &s.url,
        "k-test",
        std::slice::from_ref(&id),
        Duration::from_secs(60),
    )
    .await;
    let rec = &done[0];
    assert_eq!(rec["status"], "done", "{rec}");
    assert_eq!(rec["original_sha256"], sha256_hex(&first));
    // What was analysed is what the record names: the resized object's bytes hash to it.
    let resized_key = rec["resized_key"].as_str().unwrap();
    let resized = std::fs::read(dir.path().join("blobs").join(resized_key)).unwrap();
    assert_eq!(rec["sha256"].as_str().unwrap(), sha256_hex(&resized));
    assert!(resized_key.contains(rec["sha256"].as_str().unwrap()));
    // The original on disk is still the first upload.
    let original = std::fs::read(
        dir.path()
            .join("blobs")
            .join(rec["original_key"].as_str().unwrap()),
    )
    .unwrap();
    assert_eq!(original, first);

    // After a restart the URL still verifies (the secret persists) and is still used up.
    let addr = s.kill9();
    let s = serve_with(
        dir.path(),
        addr.trim_start_matches("http://"),
        Some("k-test"),
        &[],
    );
    let r = put_upload(&http, &url, "image/jpeg", second).await;
    assert_eq!(r.status(), 409);
    assert_eq!(
        put_upload(&http, &url, "image/jpeg", first).await.status(),
        200
    );
    let again = get_json(&http, &format!("{}/v1/images/{id}", s.url), "k-test").await;
    assert_eq!(again["result"], rec["result"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_uploads_and_analysis_loses_nothing_and_books_every_paid_call_once() {
    let sim = SimServer::start(SimConfig {
        api_key: "sk-kill".into(),
        latency_ms: 700,
        seed: 3,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("OPENAI_API_KEY", "sk-kill"),
        ("OPENAI_BASE_URL", sim.base_url.as_str()),
        ("SIGHTLINE_PROVIDER", "openai"),
        ("SIGHTLINE_WORKERS", "4"),
        ("SIGHTLINE_TIMEOUT_SECS", "5"),
        ("SIGHTLINE_RECONCILE_EVERY_SECS", "1"),
        ("SIGHTLINE_RECONCILE_AFTER_SECS", "2"),
    ];
    let s = serve_with(dir.path(), "127.0.0.1:0", Some("k-kill"), &env);
    let addr = s.url.trim_start_matches("http://").to_string();
    let http = reqwest::Client::new();
    let n = 16u32;
    let mut ids = Vec::new();
    let mut urls = Vec::new();
    for i in 0..n {
        let png = distinct_png(i);
        let (id, url) = new_upload(&http, &s.url, "k-kill", "p.png", "image/png", png.len()).await;
        ids.push(id);
        urls.push((url, png));
    }
    // Half uploaded, then killed the moment their PUTs are acknowledged (resizes running).
    for (url, png) in &urls[..8] {
        assert_eq!(
            put_upload(&http, url, "image/png", png.clone())
                .await
                .status(),
            200
        );
    }
    s.kill9();
    // URLs handed out before the crash still work after it.
    let s = serve_with(dir.path(), &addr, Some("k-kill"), &env);
    for (url, png) in &urls[8..] {
        assert_eq!(
            put_upload(&http, url, "image/png", png.clone())
                .await
                .status(),
            200
        );
    }
    // Killed again while provider calls are in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sim.stats().await.in_flight == 0 {
        assert!(Instant::now() < deadline, "no provider call started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let in_flight = sim.stats().await.in_flight;
    s.kill9();
    let s = serve_with(dir.path(), &addr, Some("k-kill"), &env);

    let recs = wait_final(&http, &s.url, "k-kill", &ids, Duration::from_secs(120)).await;
    for r in &recs {
        assert_eq!(r["status"], "done", "{r}");
        assert!(r["result"]["cost_usd"].as_f64().unwrap() > 0.0, "{r}");
    }
    // Ledger = Σ results, and every billed call is booked once: the calls in flight at the
    // kill were paid and are lost (their answers never arrived), nothing else.
    let costs = get_json(&http, &format!("{}/v1/costs", s.url), "k-kill").await;
    let sum: f64 = recs
        .iter()
        .map(|r| {
            r["result"]["cost_usd"].as_f64().unwrap()
                + r["extra_spend"]["cost_usd"].as_f64().unwrap_or(0.0)
        })
        .sum();
    assert!(
        (costs["total"]["cost_usd"].as_f64().unwrap() - sum).abs() < 1e-9,
        "{costs}"
    );
    assert_eq!(costs["total"]["images"], u64::from(n));
    let stats = sim.stats().await;
    let booked = costs["total"]["calls"].as_u64().unwrap();
    assert_eq!(booked, u64::from(n), "{costs}");
    let lost = stats.completions - booked;
    assert!(
        lost <= in_flight.max(4),
        "paid {} booked {booked} in flight at the kill {in_flight}",
        stats.completions
    );
    // Nothing left behind: no pending or queued image, no message.
    for status in ["pending", "queued"] {
        let page = get_json(
            &http,
            &format!("{}/v1/images?status={status}", s.url),
            "k-kill",
        )
        .await;
        assert_eq!(
            page["images"].as_array().unwrap().len(),
            0,
            "{status}: {page}"
        );
    }
}

/// The value of one Prometheus sample (`series` = name with its labels), if present.
fn prom_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_metrics_count_what_was_uploaded_and_analysed() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_serve(dir.path());
    let http = reqwest::Client::new();
    // Two different images, then (once they are done, so it finds the cache filled rather
    // than the claim held) a copy of the first: a cache hit.
    for batch in [vec![1, 2], vec![1]] {
        let mut ids = Vec::new();
        for n in batch {
            let png = distinct_png(n);
            let (id, url) =
                new_upload(&http, &s.url, "k-test", "p.png", "image/png", png.len()).await;
            assert_eq!(
                put_upload(&http, &url, "image/png", png).await.status(),
                200
            );
            ids.push(id);
        }
        let done = wait_final(&http, &s.url, "k-test", &ids, Duration::from_secs(60)).await;
        assert!(done.iter().all(|v| v["status"] == "done"), "{done:?}");
    }

    // Counted right after each result is stored: poll briefly. No API key needed.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let r = http.get(format!("{}/metrics", s.url)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        let text = r.text().await.unwrap();
        let analysed = prom_sample(
            &text,
            r#"sightline_images_processed_total{function="analyze"}"#,
        );
        if analysed == Some(3.0) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (series, want) in [
        (
            r#"sightline_images_processed_total{function="resize"}"#,
            3.0,
        ),
        (r#"sightline_images_failed_total{function="resize"}"#, 0.0),
        (
            r#"sightline_images_processed_total{function="analyze"}"#,
            3.0,
        ),
        (r#"sightline_cache_hits_total{function="analyze"}"#, 1.0),
        (r#"sightline_images_failed_total{function="analyze"}"#, 0.0),
        (
            r#"sightline_record_latency_seconds_count{function="analyze"}"#,
            3.0,
        ),
        (
            r#"sightline_record_latency_seconds_bucket{function="analyze",le="+Inf"}"#,
            3.0,
        ),
        (
            r#"sightline_record_latency_seconds_count{function="resize"}"#,
            3.0,
        ),
        (r#"sightline_queue_messages{queue="analyze"}"#, 0.0),
        (r#"sightline_dead_letter_messages{queue="analyze"}"#, 0.0),
    ] {
        assert_eq!(
            prom_sample(&text, series),
            Some(want),
            "{series} in\n{text}"
        );
    }
    // The offline analyzer is free: its calls are counted per model at $0.
    assert_eq!(
        prom_sample(
            &text,
            r#"sightline_cost_usd_total{function="analyze",model="sightline-local-v1"}"#
        ),
        Some(0.0),
        "{text}"
    );
    for family in [
        "# TYPE sightline_images_processed_total counter",
        "# TYPE sightline_provider_throttles_total counter",
        "# TYPE sightline_record_latency_seconds histogram",
        "# HELP sightline_retries_total ",
    ] {
        assert!(text.contains(family), "{family} in\n{text}");
    }
    // Only GET.
    let r = http
        .post(format!("{}/metrics", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_api_key_replaces_the_old_one_and_keys_rotate_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let status = |url: String, key: &'static str| {
        let http = http.clone();
        async move {
            http.get(format!("{url}/v1/images"))
                .header("x-api-key", key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // A new data dir without --api-key starts with the documented default key.
    let s = serve_with(dir.path(), "127.0.0.1:0", None, &[]);
    assert_eq!(status(s.url.clone(), "sightline-local-key").await, 200);
    drop(s);
    let s = serve_with(dir.path(), "127.0.0.1:0", Some("old-key"), &[]);
    assert_eq!(status(s.url.clone(), "old-key").await, 200);
    assert_eq!(status(s.url.clone(), "sightline-local-key").await, 401);
    drop(s);
    let s = serve_with(dir.path(), "127.0.0.1:0", Some("new-key"), &[]);
    assert_eq!(status(s.url.clone(), "new-key").await, 200);
    assert_eq!(
        status(s.url.clone(), "old-key").await,
        401,
        "the old key stops working"
    );
    drop(s);

    // Rotate from the command line: a new random key, every other one revoked.
    let out = sightline(dir.path())
        .args(["keys", "rotate", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated: Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = rotated["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("sl_") && key.len() == 35, "{key}");
    assert_eq!(rotated["revoked"].as_array().unwrap().len(), 1);
    let out = sightline(dir.path())
        .args(["keys", "create", "--json"])
        .output()
        .unwrap();
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = sightline(dir.path())
        .args(["keys", "list", "--json"])
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed_ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed_ids.len(), 2);
    assert!(listed_ids.contains(&rotated["id"].as_str().unwrap()));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(&key),
        "keys are never listed"
    );
    // Without --api-key, serve keeps the data dir's keys.
    let s = serve_with(dir.path(), "127.0.0.1:0", None, &[]);
    let with = |k: String| {
        let http = http.clone();
        let url = s.url.clone();
        async move {
            http.get(format!("{url}/v1/images"))
                .header("x-api-key", k)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(with(key.clone()).await, 200);
    assert_eq!(
        with(created["key"].as_str().unwrap().to_string()).await,
        200
    );
    assert_eq!(with("new-key".into()).await, 401);
    assert_eq!(with("sightline-local-key".into()).await, 401);
    let out = sightline(dir.path())
        .args(["keys", "revoke", created["id"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        with(created["key"].as_str().unwrap().to_string()).await,
        401
    );
    let out = sightline(dir.path())
        .args(["keys", "revoke", "000000000000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no key"));
}

/// Peak resident memory of a process (Linux), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// A 10000×10000 PNG of one flat colour: a few hundred KB that decode to 300 MB.
fn bomb_sized_png() -> Vec<u8> {
    let (w, h) = (10_000u32, 10_000u32);
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let mut writer = enc.write_header().unwrap();
        let mut stream = writer.stream_writer().unwrap();
        let row = vec![200u8; w as usize * 3];
        for _ in 0..h {
            std::io::Write::write_all(&mut stream, &row).unwrap();
        }
        stream.finish().unwrap();
    }
    out
}

// HEAVY only keeps CPU-heavy tests apart; each test owns its runtime, so holding it
// across awaits blocks nothing but the other heavy tests.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread")]
async fn twelve_concurrent_bomb_sized_uploads_stay_within_the_memory_budget() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let budget_mb = 512u64;
    let s = serve_with(
        dir.path(),
        "127.0.0.1:0",
        Some("k"),
        &[("SIGHTLINE_RESIZE_MEMORY_MB", "512")],
    );
    let png = bomb_sized_png();
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    let mut puts = Vec::new();
    for _ in 0..12 {
        let (id, url) = new_upload(&http, &s.url, "k", "bomb.png", "image/png", png.len()).await;
        ids.push(id);
        let (http, png) = (http.clone(), png.clone());
        puts.push(tokio::spawn(async move {
            put_upload(&http, &url, "image/png", png).await.status()
        }));
    }
    for p in puts {
        assert_eq!(
            p.await.unwrap(),
            200,
            "uploads past the budget wait, they are not dropped"
        );
    }
    let recs = wait_final(&http, &s.url, "k", &ids, Duration::from_secs(600)).await;
    for r in &recs {
        assert_eq!(r["status"], "done", "{r}");
        assert_eq!(r["resized"]["width"], 1024);
    }
    let peak = peak_rss(s.pid());
    eprintln!(
        "12 concurrent 10000x10000 PNGs ({} KB each), budget {budget_mb} MB: peak RSS {} MB",
        png.len() / 1024,
        peak >> 20
    );
    // One decode is 300 MB; without the budget, 12 at once took 4 GB.
    assert!(peak < (budget_mb + 256) << 20, "peak RSS {} MB", peak >> 20);
}

// HEAVY only keeps CPU-heavy tests apart; each test owns its runtime, so holding it
// across awaits blocks nothing but the other heavy tests.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread")]
async fn serve_and_run_share_one_data_dir() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let s = serve_with(dir.path(), "127.0.0.1:0", Some("k"), &[]);
    let http = reqwest::Client::new();
    // Uploads through serve while `run` works on the same database.
    let data = dir.path().to_path_buf();
    let run = std::thread::spawn(move || {
        sightline(&data)
            .arg("run")
            .arg(samples().join("samples"))
            .arg(samples().join("photos"))
            .arg("--json")
            .output()
            .unwrap()
    });
    let mut ids = Vec::new();
    for i in 0..24 {
        let png = distinct_png(100 + i);
        let (id, url) = new_upload(&http, &s.url, "k", "p.png", "image/png", png.len()).await;
        assert_eq!(
            put_upload(&http, &url, "image/png", png).await.status(),
            200
        );
        ids.push(id);
    }
    let out = run.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let (images, summary) = {
        let lines: Vec<Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let (s, i): (Vec<Value>, Vec<Value>) =
            lines.into_iter().partition(|v| v["summary"] == true);
        (i, s[0].clone())
    };
    assert_eq!(summary["failed"], 0, "{images:?}");
    assert_eq!(summary["done"], 10);
    let recs = wait_final(&http, &s.url, "k", &ids, Duration::from_secs(120)).await;
    assert!(recs.iter().all(|r| r["status"] == "done"));
    for text in [stderr.to_string(), s.log_text()] {
        assert!(!text.contains("database is locked"), "{text}");
        assert!(!text.contains("SQLITE_BUSY"), "{text}");
    }
}

#[test]
fn costs_report_the_budget_from_the_settings() {
    let dir = tempfile::tempdir().unwrap();
    let out = sightline(dir.path())
        .env("SIGHTLINE_BUDGET_DAILY_USD", "0.5")
        .env("SIGHTLINE_OVER_BUDGET", "fail")
        .args(["costs", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let budget = &report["budget"];
    assert_eq!(budget["source"], "settings");
    assert_eq!(budget["over_budget"], "fail");
    assert_eq!(budget["daily"]["cap_usd"], 0.5);
    assert_eq!(budget["daily"]["spent_usd"], 0.0);
    assert_eq!(budget["daily"]["remaining_usd"], 0.5);
    assert_eq!(budget["monthly"]["cap_usd"], Value::Null);
    assert_eq!(report["to"].as_str(), budget["daily"]["period"].as_str());
}

#[test]
fn a_run_over_its_daily_budget_ends_with_the_rest_queued() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt
        .block_on(SimServer::start(SimConfig {
            api_key: "sk-test".into(),
            rpm: 0,
            tpm: 0,
            limit_model: Default::default(),
            quantum_ms: 1_000,
            latency_ms: 20,
            jitter_ms: 0,
            seed: 7,
            timeout_hang_ms: 4_000,
            faults: FaultPlan::default(),
            batch: Default::default(),
        }))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut c = sightline(dir.path());
    c.args([
        "--provider",
        "openai",
        "--model",
        "gpt-4.1-mini",
        "--workers",
        "1",
    ])
    .arg("run")
    .arg(samples())
    .arg("--json")
    .env("OPENAI_API_KEY", "sk-test")
    .env("OPENAI_BASE_URL", &sim.base_url)
    // Far below one call: the first call is admitted, nothing after it.
    .env("SIGHTLINE_BUDGET_DAILY_USD", "0.000001");
    let (images, _) = run_json(&mut c);
    assert_eq!(images.len(), 12);
    let done = images.iter().filter(|i| i["status"] == "done").count();
    let queued = images.iter().filter(|i| i["status"] == "queued").count();
    assert_eq!((done, queued), (1, 11), "{images:?}");
    assert_eq!(rt.block_on(sim.stats()).completions, 1);
}

/// Write `src` scaled to `scale` of its size (and brightened by `gain`) as a JPEG at `dst`.
fn altered_copy(src: &Path, dst: &Path, scale: f32, gain: f32) {
    let img = image::open(src).unwrap().to_rgb8();
    let (w, h) = (
        (img.width() as f32 * scale) as u32,
        (img.height() as f32 * scale) as u32,
    );
    let mut small = image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle);
    for p in small.pixels_mut() {
        for c in p.0.iter_mut() {
            *c = (*c as f32 * gain).min(255.0) as u8;
        }
    }
    image::DynamicImage::ImageRgb8(small)
        .save_with_format(dst, image::ImageFormat::Jpeg)
        .unwrap();
}

#[test]
fn similar_search_near_duplicate_skip_and_delete_work_offline() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let data = tempfile::tempdir().unwrap();
    let first = tempfile::tempdir().unwrap();
    for name in ["Garden.jpg", "Dune.jpg", "Wood.jpg"] {
        std::fs::copy(samples().join("photos").join(name), first.path().join(name)).unwrap();
    }
    let (images, _) = run_json(
        sightline(data.path())
            .arg("run")
            .arg(first.path())
            .args(["--json", "--dedupe", "near"]),
    );
    assert_eq!(images.len(), 3);
    let garden = by_source(&images, "Garden.jpg")["image_id"]
        .as_str()
        .unwrap()
        .to_string();

    // A half-size, 10% brighter copy of Garden reuses its analysis at $0; an unrelated image
    // is analysed.
    let second = tempfile::tempdir().unwrap();
    altered_copy(
        &samples().join("photos/Garden.jpg"),
        &second.path().join("garden-copy.jpg"),
        0.5,
        1.1,
    );
    std::fs::copy(
        samples().join("samples/rocket.jpg"),
        second.path().join("rocket.jpg"),
    )
    .unwrap();
    let (images, summary) = run_json(
        sightline(data.path())
            .arg("run")
            .arg(second.path())
            .args(["--json", "--dedupe", "near"]),
    );
    assert_eq!(summary["done"], 2, "{summary}");
    let copy = by_source(&images, "garden-copy.jpg");
    assert_eq!(
        copy["reused_from"].as_str(),
        Some(garden.as_str()),
        "{copy}"
    );
    assert!(by_source(&images, "rocket.jpg")["reused_from"].is_null());
    let copy_id = copy["image_id"].as_str().unwrap().to_string();

    let out = sightline(data.path())
        .args(["costs", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["rows"].as_array().expect("rows");
    let reused: u64 = rows
        .iter()
        .map(|r| r["reused_images"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(reused, 1, "{report}");
    assert_eq!(report["by_kind"]["reused_images"], 1, "{report}");
    // The offline embedder calls nobody: nothing of it is on the ledger.
    assert!(rows.iter().all(|r| r["kind"] != "embedding"), "{report}");
    assert_eq!(report["by_kind"]["embedding"]["calls"], 0, "{report}");

    // `similar` by id: the copy is Garden's nearest; by file: Garden's photo finds both.
    let out = sightline(data.path())
        .args(["similar", &garden, "--top", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(found["mode"], "vector");
    assert_eq!(found["results"][0]["image_id"], copy_id.as_str(), "{found}");
    assert_eq!(found["results"].as_array().unwrap().len(), 3);
    let out = sightline(data.path())
        .arg("similar")
        .arg(samples().join("photos/Garden.jpg"))
        .args(["--top", "2", "--json"])
        .output()
        .unwrap();
    let found: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = found["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["image_id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&garden.as_str()) && ids.contains(&copy_id.as_str()),
        "{found}"
    );

    // Text search with the offline embedder is a keyword search over the analyses.
    let out = sightline(data.path())
        .args(["search", "image", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(found["mode"], "keyword");

    // Deleting the copy removes it from the results; reindex has nothing missing.
    let out = sightline(data.path())
        .args(["delete", &copy_id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = sightline(data.path())
        .args(["similar", &garden, "--json"])
        .output()
        .unwrap();
    let found: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(found["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|h| h["image_id"] != copy_id.as_str()));
    let out = sightline(data.path())
        .args(["reindex", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["indexed"].as_u64(), report["failed"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(report["skipped"], 4);
}

#[test]
fn a_remote_embedder_gives_vector_search_and_books_every_embedding_call_once() {
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt
        .block_on(SimServer::start(SimConfig {
            api_key: "sk-test".into(),
            rpm: 0,
            tpm: 0,
            seed: 3,
            ..SimConfig::default()
        }))
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let with_sim = |c: &mut Command| {
        c.args(["--embedder", "openai"])
            .env("OPENAI_API_KEY", "sk-test")
            .env("OPENAI_BASE_URL", &sim.base_url)
            .env("SIGHTLINE_EMBEDDING_MODEL", "clip-vit-b-32");
    };
    let mut run = sightline(data.path());
    with_sim(&mut run);
    run.args(["--provider", "openai", "run"])
        .arg(samples().join("photos"))
        .arg("--json");
    let (images, summary) = run_json(&mut run);
    assert_eq!(summary["done"], 5, "{summary}");

    // A text query lands in the image space: vector mode, through the sim's /v1/embeddings.
    let mut search = sightline(data.path());
    with_sim(&mut search);
    let out = search
        .args(["search", "red flowers", "--top", "3", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(found["mode"], "vector", "{found}");
    assert_eq!(found["model"], "clip-vit-b-32");
    assert_eq!(found["results"].as_array().unwrap().len(), 3);

    let garden = by_source(&images, "Garden.jpg")["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut similar = sightline(data.path());
    with_sim(&mut similar);
    let out = similar
        .args(["similar", &garden, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(found["results"].as_array().unwrap().len(), 4, "{found}");

    // Every embedding the simulator answered (5 images, 1 query) is one ledger call, kind
    // `embedding`, on the embedding model's own row.
    let stats = rt.block_on(sim.stats());
    assert_eq!(stats.embeddings.embeddings, 6, "{stats:?}");
    let out = sightline(data.path())
        .args(["costs", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let embedding: Vec<&Value> = rows.iter().filter(|r| r["kind"] == "embedding").collect();
    assert!(
        embedding.iter().all(|r| r["model"] == "clip-vit-b-32"),
        "{report}"
    );
    let calls: u64 = embedding.iter().map(|r| r["calls"].as_u64().unwrap()).sum();
    assert_eq!(calls, 6, "{report}");
    assert_eq!(report["by_kind"]["embedding"]["calls"], 6, "{report}");
    // Lanes are how analyses are paid: the embedding calls are not in them.
    assert_eq!(
        report["by_lane"]["realtime"]["calls"], report["by_kind"]["analysis"]["calls"],
        "{report}"
    );
}

/// 100 rows against the simulator's Images API and chat completions, with faults on both
/// (429s with Retry-After, 5xx, timeouts, cut bodies), one row the safety system refuses and
/// two whose check fails. Every row ends generated and analysed or failed with its reason,
/// the ledger is the job's generation plus analysis cost, the finished job's webhook arrives
/// signed after its receiver failed three times, and the same CSV again pays nothing.
#[test]
fn generate_100_rows_against_the_simulator_with_faults_then_a_rerun_pays_nothing() {
    use sightline_core::webhook::{ReceivedHeaders, WebhookSecret, DEFAULT_TOLERANCE};
    use sightline_tests::webhook_receiver::WebhookReceiver;
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let _g = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt
        .block_on(SimServer::start(SimConfig {
            api_key: "sk-test".into(),
            rpm: 0,
            tpm: 0,
            latency_ms: 5,
            jitter_ms: 10,
            seed: 11,
            timeout_hang_ms: 4_000,
            limit_model: Default::default(),
            quantum_ms: 1_000,
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
            batch: Default::default(),
        }))
        .unwrap();
    let receiver = rt
        .block_on(WebhookReceiver::start(vec![500, 503, 500]))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let templates = dir.path().join("templates.toml");
    std::fs::write(
        &templates,
        r#"
[templates.hero]
prompt = "A studio photo of {product} in {colour}"
model = "gpt-image-1-mini"
size = "1024x1024"
quality = "low"
output_key = "products/{sku}.png"
"#,
    )
    .unwrap();
    let mut csv = String::from("sku,product,colour\n");
    for i in 1..=100 {
        let product = match i {
            37 => "a REFUSE thing".to_string(),
            50 | 51 => format!("lamp {i} [mismatch]"),
            _ => format!("lamp {i}"),
        };
        csv.push_str(&format!("SKU-{i},{product},colour {}\n", i % 7));
    }
    let rows = dir.path().join("rows.csv");
    std::fs::write(&rows, &csv).unwrap();
    let data = dir.path().join("data");
    let generate = || {
        let mut c = sightline(&data);
        c.args([
            "--provider",
            "openai",
            "--model",
            "gpt-4.1-mini",
            "--timeout-secs",
            "2",
            "--workers",
            "4",
            "generate",
            "--template",
            "hero",
            "--json",
            "--wait",
            "--webhook",
            &receiver.url,
        ])
        .arg("--templates")
        .arg(&templates)
        .arg("--csv")
        .arg(&rows)
        .env("OPENAI_API_KEY", "sk-test")
        .env("OPENAI_BASE_URL", &sim.base_url)
        .env("SIGHTLINE_WEBHOOK_SECRET", SECRET)
        // 5 s, 5 min, 30 min become 5 ms, 0.3 s, 1.8 s.
        .env("SIGHTLINE_WEBHOOK_RETRY_SCALE", "0.001");
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "generate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let report = generate();
    let counts = &report["counts"];
    let failed: Vec<String> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "failed")
        .map(|r| format!("row {}: {}", r["row"], r["error"]))
        .collect();
    assert_eq!(counts["failed"], 1, "{counts} {failed:?}");
    assert_eq!(counts["total"], 100, "{counts}");
    assert_eq!(counts["done"], 97, "{counts}");
    assert_eq!(counts["mismatch"], 2, "{counts}");
    assert_eq!(counts["failed"], 1, "{counts}");
    assert_eq!(counts["regenerated"], 2, "{counts}");
    let rows_out = report["rows"].as_array().unwrap();
    let refused = rows_out.iter().find(|r| r["row"] == 37).unwrap();
    assert!(
        refused["error"].as_str().unwrap().contains("safety system"),
        "{refused}"
    );
    for r in rows_out.iter().filter(|r| r["status"] == "done") {
        assert_eq!(r["check"]["matches"], true, "{r}");
        assert!(r["generation_cost_usd"].as_f64().unwrap() > 0.0, "{r}");
    }
    let stats = rt.block_on(sim.stats());
    assert!(stats.faults.total() > 0, "faults were injected: {stats:?}");

    // The ledger is what the job cost: generation plus analysis, every paid call once.
    let costs = || {
        let out = sightline(&data).args(["costs", "--json"]).output().unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let ledger = costs()["total"]["cost_usd"].as_f64().unwrap();
    let job_cost = report["generation_cost_usd"].as_f64().unwrap()
        + report["analysis_cost_usd"].as_f64().unwrap();
    assert!(
        (ledger - job_cost).abs() < 1e-9,
        "{ledger} vs {job_cost}: {} {}",
        costs()["by_kind"],
        json!({"gen": report["generation_cost_usd"], "analysis": report["analysis_cost_usd"]})
    );

    // The webhook: three failures, then delivered; every attempt signed with the secret,
    // one message id, the summary in the body.
    let got = receiver.deliveries();
    assert_eq!(got.len(), 4, "{got:?}");
    let secret = WebhookSecret::parse(SECRET).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for d in &got {
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
    let body: Value = serde_json::from_slice(&got[3].body).unwrap();
    assert_eq!(body["type"], "generation.job.finished");
    assert_eq!(body["data"]["counts"]["done"], 97);

    // The same CSV again: nothing generated, nothing analysed, nothing paid.
    let images_before = rt.block_on(sim.stats()).images.images;
    let again = generate();
    assert_eq!(again["counts"]["done"], 97, "{}", again["counts"]);
    assert_eq!(again["counts"]["reused"], 99, "{}", again["counts"]);
    assert_eq!(again["generation_cost_usd"].as_f64(), Some(0.0));
    assert_eq!(again["analysis_cost_usd"].as_f64(), Some(0.0));
    assert_eq!(rt.block_on(sim.stats()).images.images, images_before);
    assert!((costs()["total"]["cost_usd"].as_f64().unwrap() - ledger).abs() < 1e-9);
}
