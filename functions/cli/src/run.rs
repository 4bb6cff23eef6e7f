//! `sightline run PATH...`: every image through the full pipeline on the embedded default.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use sightline_core::keys::sanitize_id;
use sightline_core::model::{ImageRecord, ImageStatus, Lane};
use sightline_pipeline::analyze::AnalyzeOutcome;
use sightline_pipeline::ingest::IngestOutcome;
use sightline_pipeline::ports::{rfc3339, Failure};
use sightline_pipeline::worker::OnOutcome;
use tokio::sync::watch;
use tracing::warn;

use crate::app::{LocalApp, LOCAL_TENANT};

const EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "gif"];

/// Files named on the command line plus, recursively, images in named directories (sorted).
pub fn collect_inputs(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            walk(p, &mut out)?;
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// Run every input through resize → queue → analysis; return the final records, in input order.
/// Batch-lane images are submitted at once when all are prepared; with `wait_for_batches` the
/// run polls until they are answered, else it returns with them waiting (`sightline batches`).
pub async fn run_pipeline(
    app: &LocalApp,
    inputs: &[PathBuf],
    progress: &ProgressBar,
    wait_for_batches: bool,
) -> anyhow::Result<Vec<ImageRecord>> {
    let run_tag = uuid::Uuid::now_v7().simple().to_string();
    let ids: Vec<String> = inputs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
            format!("{}-{}-{}", &run_tag[..12], i, sanitize_id(stem))
        })
        .collect();
    let pending: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));

    // Workers start first so analysis overlaps resizing.
    let (stop_tx, stop_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = watch::channel(0u64);
    let pending_cb = pending.clone();
    let pb = progress.clone();
    let on_outcome: OnOutcome = Arc::new(move |msg, outcome| {
        // A job waiting for its budget period is done for this run: its image stays queued
        // and `serve` (or a later run) analyses it once the period rolls over.
        if outcome.is_retry() && !outcome.is_budget_wait() {
            return;
        }
        // Recorded for a batch: not final until its batch answers (the record says so).
        if *outcome == AnalyzeOutcome::Batched {
            done_tx.send_modify(|n| *n += 1);
            return;
        }
        if let Ok(job) = sightline_core::model::AnalysisJob::parse(&msg.body) {
            if let Ok(mut p) = pending_cb.lock() {
                if p.remove(&job.image_id) {
                    pb.inc(1);
                }
            }
        }
        done_tx.send_modify(|n| *n += 1);
    });
    let instance = app.start_instance(stop_rx.clone()).await?;
    let pool = app.workers(Some(on_outcome));
    let workers = tokio::spawn(pool.run(stop_rx));

    // Resize with bounded parallelism (CPU-bound work on blocking threads).
    let parallel = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = tokio::task::JoinSet::new();
    for (path, id) in inputs.iter().zip(ids.iter()) {
        let permit = sem.clone().acquire_owned().await?;
        let app = app.clone();
        let (path, id) = (path.clone(), id.clone());
        let pending = pending.clone();
        tasks.spawn(async move {
            let _permit = permit;
            // Waited for before the job exists: a worker may finish it before ingest returns.
            if let Ok(mut p) = pending.lock() {
                p.insert(id.clone());
            }
            let r = ingest_file(&app, &path, &id).await;
            if !matches!(r, Ok(IngestOutcome::Queued(_))) {
                if let Ok(mut p) = pending.lock() {
                    p.remove(&id);
                }
            }
            r.map(|o| (id, o))
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok((_, IngestOutcome::Queued(_)))) => {}
            Ok(Ok((_, _))) => progress.inc(1),
            Ok(Err(e)) => bail!("storage error while resizing: {e}"),
            Err(e) => bail!("resize task failed: {e}"),
        }
    }

    // Wait until every queued image is final, or the queue is empty (dead-lettered rest).
    // Another process on the same data dir (`serve`) may handle some of our jobs, so the
    // records are checked too, not only what our own workers report.
    let mut last_check = std::time::Instant::now();
    loop {
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = std::time::Instant::now();
            count_final(app, &pending, progress).await?;
        }
        let left = pending.lock().map(|p| p.len()).unwrap_or(0);
        if left == 0 {
            break;
        }
        if app.queue.depth().await? == 0 {
            let candidates: Vec<String> = pending
                .lock()
                .map(|p| p.iter().cloned().collect())
                .unwrap_or_default();
            let mut waiting_for_batch = false;
            let mut stuck = Vec::new();
            for id in candidates {
                let recorded = app.repo.get_image(LOCAL_TENANT, &id).await?;
                // Queued on the batch lane: its job was recorded for a batch, it is not stuck.
                let in_batch = app.batch.is_some()
                    && recorded.as_ref().is_some_and(|r| {
                        r.status == ImageStatus::Queued && r.lane == Some(Lane::Batch)
                    });
                if in_batch {
                    waiting_for_batch = true;
                } else {
                    stuck.push((id, recorded));
                }
            }
            for (id, recorded) in stuck {
                // The analyzer records its own reason on the last delivery; keep that one.
                if !recorded.is_some_and(|r| r.status.is_final()) {
                    let reason = format!(
                        "gave up after {} attempts (dead-lettered)",
                        app.config.settings.max_receives
                    );
                    app.repo
                        .mark_failed(
                            LOCAL_TENANT,
                            &id,
                            &reason,
                            Failure::GaveUp,
                            &rfc3339(app.clock.now_ms()),
                        )
                        .await?;
                }
                if pending.lock().map(|mut p| p.remove(&id)).unwrap_or(false) {
                    progress.inc(1);
                }
            }
            // What is left waits for the batch lane: the batch phase.
            if waiting_for_batch {
                wait_for_batch_lane(app, &pending, progress, wait_for_batches).await?;
            }
            break;
        }
        tokio::select! {
            _ = done_rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    let _ = stop_tx.send(true);
    if let Err(e) = workers.await {
        warn!(error = %e, "workers ended abnormally");
    }
    let _ = instance.await;
    let mut records = Vec::with_capacity(ids.len());
    for id in &ids {
        if let Some(r) = app.repo.get_image(LOCAL_TENANT, id).await? {
            records.push(r);
        }
    }
    Ok(records)
}

/// Take the images whose records are final off `pending`, counting each on the bar once.
/// Another process on the same data dir (`serve`) may finish some of them.
async fn count_final(
    app: &LocalApp,
    pending: &Mutex<HashSet<String>>,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    let ids: Vec<String> = pending
        .lock()
        .map(|p| p.iter().cloned().collect())
        .unwrap_or_default();
    for id in ids {
        let done = app
            .repo
            .get_image(LOCAL_TENANT, &id)
            .await?
            .is_some_and(|r| r.status.is_final());
        if done && pending.lock().map(|mut p| p.remove(&id)).unwrap_or(false) {
            progress.inc(1);
        }
    }
    Ok(())
}

/// Submit what waits for a batch at once; with `wait`, poll (and resubmit what comes back for
/// retry) until every image of the run is final. The real-time workers keep running: images
/// whose batch attempts are used up come back through the queue.
async fn wait_for_batch_lane(
    app: &LocalApp,
    pending: &Mutex<HashSet<String>>,
    progress: &ProgressBar,
    wait: bool,
) -> anyhow::Result<()> {
    let Some(lane) = &app.batch else {
        return Ok(());
    };
    let every = app.config.settings.batch_poll_every;
    loop {
        let report = lane.tick(true).await?;
        progress.set_message(format!(
            "batch lane: {} open, {} pending",
            report.open_batches, report.pending_items
        ));
        // Held back for long (a budget period): not worth waiting in this process.
        let due_in = report
            .next_due_ms
            .map_or(0, |at| at.saturating_sub(app.clock.now_ms()));
        let only_deferred = report.open_batches == 0
            && report.pending_items > 0
            && report.pending_items == report.deferred_items
            && due_in > 3_600_000;
        if only_deferred {
            progress.suspend(|| {
                eprintln!(
                    "{} batch requests are held back (over budget, or backing off after a refused batch); `sightline serve` submits them when they are due",
                    report.deferred_items
                )
            });
            return Ok(());
        }
        if !wait {
            let left = pending.lock().map(|p| p.len()).unwrap_or(0);
            progress.suspend(|| {
                eprintln!(
                    "{left} images wait for the batch lane; `sightline batches` follows them (or run with --wait)"
                )
            });
            return Ok(());
        }
        let deadline = std::time::Instant::now() + every;
        while std::time::Instant::now() < deadline {
            count_final(app, pending, progress).await?;
            if pending.lock().map(|p| p.is_empty()).unwrap_or(true) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(250).min(every)).await;
        }
    }
}

async fn ingest_file(
    app: &LocalApp,
    path: &Path,
    id: &str,
) -> Result<IngestOutcome, sightline_pipeline::ports::StoreError> {
    let source = path.display().to_string();
    let max = app.config.settings.prepare.max_input_bytes;
    // Size check before reading the file.
    let size = match tokio::fs::metadata(path).await {
        Ok(m) => m.len(),
        Err(e) => {
            return app
                .ingest
                .reject(
                    LOCAL_TENANT,
                    id,
                    &source,
                    None,
                    None,
                    &format!("cannot read file: {e}"),
                )
                .await
        }
    };
    if size > max {
        let reason = sightline_core::PrepareError::TooLarge { bytes: size, max }.to_string();
        return app
            .ingest
            .reject(LOCAL_TENANT, id, &source, Some(size), None, &reason)
            .await;
    }
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            app.ingest
                .ingest_bytes(LOCAL_TENANT, id, &source, None, bytes)
                .await
        }
        Err(e) => {
            app.ingest
                .reject(
                    LOCAL_TENANT,
                    id,
                    &source,
                    Some(size),
                    None,
                    &format!("cannot read file: {e}"),
                )
                .await
        }
    }
}

/// One JSON object per image (the `--json` format).
pub fn image_json(r: &ImageRecord) -> Value {
    let res = r.result.as_ref();
    json!({
        "image_id": r.image_id,
        "source": r.source,
        "status": r.status.as_str(),
        "error": r.error,
        "original": r.original.map(|o| json!({"width": o.width, "height": o.height, "bytes": o.bytes})),
        "resized": r.resized.map(|o| json!({"width": o.width, "height": o.height, "bytes": o.bytes})),
        "orientation": r.orientation,
        "sha256": r.sha256,
        "estimate": r.estimate.as_ref().map(|e| json!({"model": e.model, "tokens": e.tokens, "image_tokens": e.image_tokens, "cost_usd": e.cost_usd})),
        "original_estimate": r.original_estimate.as_ref().map(|e| json!({"model": e.model, "tokens": e.tokens, "image_tokens": e.image_tokens, "cost_usd": e.cost_usd})),
        "usage": res.map(|x| json!({"input_tokens": x.usage.input_tokens, "output_tokens": x.usage.output_tokens, "cached_tokens": x.usage.cached_tokens})),
        "cost_usd": res.map(|x| x.cost_usd),
        "provider": res.map(|x| x.provider.clone()),
        "model": res.map(|x| x.model.clone()),
        "cached": res.map(|x| x.cached).unwrap_or(false),
        "lane": res.map(|x| x.lane.as_str()).or(r.lane.map(|l| l.as_str())),
        "batch_id": res.and_then(|x| x.batch_id.clone()),
        "saved_usd": res.map(|x| x.saved_usd),
        "reused_from": res.and_then(|x| x.reused_from.clone()),
        "result": res.map(|x| x.analysis.clone()),
        "extra_spend": r.extra_spend,
    })
}

/// Totals for the summary table and the `"summary": true` object.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub images: u64,
    pub done: u64,
    pub failed: u64,
    pub cached: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: f64,
    pub estimated_cost_usd: f64,
    pub original_image_tokens: u64,
    pub resized_image_tokens: u64,
    pub by_model: BTreeMap<String, (u64, u64, u64, f64)>,
}

pub fn summarize(records: &[ImageRecord]) -> Summary {
    let mut s = Summary::default();
    for r in records {
        s.images += 1;
        match r.status {
            ImageStatus::Done => s.done += 1,
            _ => s.failed += 1,
        }
        if let (Some(o), Some(e)) = (&r.original_estimate, &r.estimate) {
            s.original_image_tokens += o.image_tokens;
            s.resized_image_tokens += e.image_tokens;
        }
        if let Some(e) = &r.estimate {
            s.estimated_cost_usd += e.cost_usd;
        }
        // Paid calls outside the result (invalid answers): part of what the run cost.
        if let Some(x) = &r.extra_spend {
            s.input_tokens += x.input_tokens;
            s.output_tokens += x.output_tokens;
            s.cost_usd += x.cost_usd;
        }
        if let Some(res) = &r.result {
            if res.cached {
                s.cached += 1;
            }
            s.input_tokens += res.usage.input_tokens;
            s.output_tokens += res.usage.output_tokens;
            s.cost_usd += res.cost_usd;
            let m = s.by_model.entry(res.model.clone()).or_default();
            m.0 += 1;
            m.1 += res.usage.input_tokens;
            m.2 += res.usage.output_tokens;
            m.3 += res.cost_usd;
        }
    }
    s
}

pub fn summary_json(s: &Summary, estimate_model: &str) -> Value {
    json!({
        "summary": true,
        "images": s.images,
        "done": s.done,
        "failed": s.failed,
        "cached": s.cached,
        "input_tokens": s.input_tokens,
        "output_tokens": s.output_tokens,
        "cost_usd": s.cost_usd,
        "by_model": s.by_model.iter().map(|(m, v)| json!({"model": m, "images": v.0, "input_tokens": v.1, "output_tokens": v.2, "cost_usd": v.3})).collect::<Vec<_>>(),
        "estimate_model": estimate_model,
        "estimated_cost_usd": s.estimated_cost_usd,
        "image_tokens_original": s.original_image_tokens,
        "image_tokens_resized": s.resized_image_tokens,
        "image_tokens_saved": s.original_image_tokens.saturating_sub(s.resized_image_tokens),
    })
}

pub fn summary_table(s: &Summary, estimate_model: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "images {:>5}   done {:>5}   failed {:>5}   cached {:>5}\n",
        s.images, s.done, s.failed, s.cached
    ));
    out.push_str(&format!(
        "{:<24} {:>7} {:>12} {:>12} {:>12}\n",
        "model", "images", "input tok", "output tok", "cost USD"
    ));
    for (m, v) in &s.by_model {
        out.push_str(&format!(
            "{:<24} {:>7} {:>12} {:>12} {:>12.6}\n",
            m, v.0, v.1, v.2, v.3
        ));
    }
    out.push_str(&format!(
        "{:<24} {:>7} {:>12} {:>12} {:>12.6}\n",
        "total", s.done, s.input_tokens, s.output_tokens, s.cost_usd
    ));
    let saved = s
        .original_image_tokens
        .saturating_sub(s.resized_image_tokens);
    let pct = if s.original_image_tokens > 0 {
        100.0 * saved as f64 / s.original_image_tokens as f64
    } else {
        0.0
    };
    out.push_str(&format!(
        "estimate on {estimate_model}: ${:.6} for these images; resizing saved {saved} image tokens ({pct:.1}%: {} → {})\n",
        s.estimated_cost_usd, s.original_image_tokens, s.resized_image_tokens
    ));
    out
}

pub fn progress_bar(len: u64) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} images {msg}",
    ) {
        pb.set_style(style);
    }
    pb
}
