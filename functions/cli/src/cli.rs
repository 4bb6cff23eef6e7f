//! The `sightline` command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::json;
use sightline_core::model::{Estimate, ImageStatus};
use sightline_core::prepare;
use sightline_core::pricing::PriceTable;
use sightline_pipeline::http::{budget_report, cost_report, default_window, hash_api_key};
use sightline_pipeline::ports::api_key_id;

use crate::app::{LocalApp, LOCAL_TENANT};
use crate::config::{CommonOpts, Config};
use crate::run::{
    collect_inputs, image_json, progress_bar, run_pipeline, summarize, summary_json, summary_table,
};

#[derive(Debug, Parser)]
#[command(
    name = "sightline",
    version,
    about = "Shrink, price and analyse images with vision LLMs — locally or on AWS"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run files or directories through resize → queue → analysis on the embedded default.
    Run {
        /// Image files or directories (recursive; jpg, jpeg, png, webp, gif).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// One JSON object per image on stdout, then a summary object.
        #[arg(long)]
        json: bool,
        /// With `--lane batch`: poll until the batches are answered (else the run returns once
        /// they are submitted, and `sightline batches` follows them).
        #[arg(long)]
        wait: bool,
    },
    /// Tokens and cost per model, original vs resized, without storing or calling anything.
    Estimate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Models to price (repeatable; default: the configured model).
        #[arg(long = "models", value_delimiter = ',')]
        models: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Serve the HTTP API, the upload widget, in-process workers and the reconciler.
    Serve {
        #[arg(long, default_value = "127.0.0.1:8787")]
        addr: SocketAddr,
        /// API key of the local tenant: replaces every other key it had. Without it, the
        /// data dir keeps its keys (a new one starts with `sightline-local-key`).
        #[arg(long, env = "SIGHTLINE_API_KEY")]
        api_key: Option<String>,
        /// Directory with the widget (`www/`) and the built WASM package (`pkg/`).
        #[arg(long)]
        web_dir: Option<PathBuf>,
    },
    /// List analysed images, newest first.
    Results {
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Cost totals by model and day.
    Costs {
        /// First day, YYYY-MM-DD (default: 29 days ago).
        #[arg(long)]
        from: Option<String>,
        /// Last day, YYYY-MM-DD (default: today).
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the models in the price table: prices (standard, cached input, batch), image-token
    /// rule and source.
    Models {
        /// The whole table as one JSON object (version, and per model every price, the image
        /// rule with its parameters, source and date).
        #[arg(long)]
        json: bool,
    },
    /// API keys: list, create, revoke, rotate (stored as sha256; a key is shown only once).
    Keys {
        #[command(subcommand)]
        action: KeysAction,
        /// Tenant whose keys these are.
        #[arg(long, global = true, default_value = LOCAL_TENANT)]
        tenant: String,
        #[arg(long, global = true)]
        json: bool,
    },
    /// Batches of the batch lane: provider, model, state, line counts, cost, times.
    Batches {
        /// Only batches not ended yet.
        #[arg(long)]
        open: bool,
        /// One JSON object per batch.
        #[arg(long)]
        json: bool,
    },
    /// One reconciler sweep: resize lost uploads, re-send lost jobs, expire unused uploads.
    Reconcile {
        #[arg(long)]
        json: bool,
    },
    /// Images like one already analysed (its id) or like an image file, nearest first.
    Similar {
        /// An image id (`sightline results` lists them) or the path of an image file.
        target: String,
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long)]
        json: bool,
    },
    /// Find analysed images by text: in the image space with an embedder that understands
    /// words, else by keywords over the analysis (the answer says which).
    Search {
        query: String,
        #[arg(long, default_value_t = 10)]
        top: usize,
        #[arg(long)]
        json: bool,
    },
    /// Give analysed images their vectors with the configured embedder: those without one, or
    /// all of them with `--all` (after changing the embedding model).
    Reindex {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Delete an image: its record, files and vectors (the ledger keeps what was paid).
    Delete { image_id: String },
    /// Generate images from a template and rows (CSV or JSON); each is analysed and checked
    /// against its prompt; a rerun of the same rows pays nothing.
    Generate(crate::generate::GenerateArgs),
    /// Generation jobs, newest first, or one job's rows, checks and cost.
    Generations {
        job_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Webhooks: verify a signature, list deliveries, redeliver.
    Webhook {
        #[command(subcommand)]
        action: crate::generate::WebhookAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// The tenant's keys (ids and creation times; keys themselves are not stored).
    List,
    /// A new random key, added next to the existing ones; printed once.
    Create,
    /// Revoke a key by the id `keys list` shows.
    Revoke { id: String },
    /// A new random key that replaces every other key of the tenant; printed once.
    Rotate,
}

pub async fn main_with(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Models { json } => models(json),
        Command::Estimate {
            files,
            models,
            json,
        } => {
            let config = Config::resolve(&cli.common)?;
            estimate(&config, &files, &models, json)
        }
        Command::Run { paths, json, wait } => {
            let config = Config::resolve(&cli.common)?;
            let inputs = collect_inputs(&paths)?;
            if inputs.is_empty() {
                bail!("no images (jpg, jpeg, png, webp, gif) found in the given paths");
            }
            let model = config.settings.model.clone();
            let app = LocalApp::open(config)?;
            let pb = progress_bar(inputs.len() as u64);
            let records = run_pipeline(&app, &inputs, &pb, wait).await?;
            pb.finish_and_clear();
            let summary = summarize(&records);
            let mut out = std::io::stdout().lock();
            if json {
                for r in &records {
                    writeln!(out, "{}", image_json(r))?;
                }
                writeln!(out, "{}", summary_json(&summary, &model))?;
            } else {
                for r in records.iter().filter(|r| r.status == ImageStatus::Failed) {
                    writeln!(
                        out,
                        "failed  {}: {}",
                        r.source,
                        r.error.as_deref().unwrap_or("unknown error")
                    )?;
                }
                write!(out, "{}", summary_table(&summary, &model))?;
            }
            Ok(())
        }
        Command::Serve {
            addr,
            api_key,
            web_dir,
        } => {
            let config = Config::resolve(&cli.common)?;
            let app = LocalApp::open(config)?;
            crate::serve::serve(
                app,
                addr,
                api_key.as_deref(),
                web_dir.unwrap_or_else(crate::serve::default_web_dir),
            )
            .await
        }
        Command::Keys {
            action,
            tenant,
            json,
        } => {
            let app = LocalApp::open(Config::resolve(&cli.common)?)?;
            keys(&app, action, &tenant, json).await
        }
        Command::Reconcile { json } => {
            let app = LocalApp::open(Config::resolve(&cli.common)?)?;
            let report = app.reconciler.sweep(usize::MAX).await?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else {
                writeln!(
                    out,
                    "resized {}  requeued {}  expired {}  settled {}  errors {}",
                    report.resized, report.requeued, report.expired, report.settled, report.errors
                )?;
            }
            Ok(())
        }
        Command::Results {
            status,
            limit,
            json,
        } => {
            let config = Config::resolve(&cli.common)?;
            let status = status
                .map(|s| {
                    ImageStatus::parse(&s).with_context(|| {
                        format!("unknown status {s:?}; use pending, queued, done or failed")
                    })
                })
                .transpose()?;
            let app = LocalApp::open(config)?;
            let page = app
                .repo
                .list_images(LOCAL_TENANT, status, limit.clamp(1, 1000), None)
                .await?;
            let mut out = std::io::stdout().lock();
            for r in &page.images {
                if json {
                    writeln!(out, "{}", image_json(r))?;
                } else {
                    let desc = r
                        .result
                        .as_ref()
                        .and_then(|x| {
                            x.analysis
                                .get("description")
                                .and_then(|d| d.as_str())
                                .map(str::to_string)
                        })
                        .or_else(|| r.error.clone())
                        .unwrap_or_default();
                    writeln!(out, "{:<8} {:<40} {}", r.status.as_str(), r.image_id, desc)?;
                }
            }
            Ok(())
        }
        Command::Similar { target, top, json } => {
            let app = LocalApp::open(Config::resolve(&cli.common)?)?;
            let path = std::path::Path::new(&target);
            let found = if path.is_file() {
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                app.search.similar_to_image(LOCAL_TENANT, &bytes, top).await
            } else {
                app.search.similar(LOCAL_TENANT, &target, top).await
            }
            .map_err(|e| anyhow::anyhow!("similar {target}: {e}"))?;
            print_found(&found, json)
        }
        Command::Search { query, top, json } => {
            let app = LocalApp::open(Config::resolve(&cli.common)?)?;
            let found = app
                .search
                .text(LOCAL_TENANT, &query, top)
                .await
                .map_err(|e| anyhow::anyhow!("search {query:?}: {e}"))?;
            print_found(&found, json)
        }
        Command::Reindex { all, json } => {
            let app = LocalApp::open(Config::resolve(&cli.common)?)?;
            let report = app
                .search
                .reindex(LOCAL_TENANT, all)
                .await
                .map_err(|e| anyhow::anyhow!("reindex: {e}"))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "reindexed {} images ({} already had a vector, {} failed)",
                    report.indexed, report.skipped, report.failed
                );
            }
            if report.failed > 0 {
                bail!(
                    "{} images could not be indexed (see the log)",
                    report.failed
                );
            }
            Ok(())
        }
        Command::Generate(args) => {
            let app = LocalApp::open(Config::resolve(&cli.common)?)?;
            crate::generate::generate(&app, args).await
        }
        Command::Generations { job_id, json } => {
            let app = LocalApp::open(Config::resolve(&cli.common)?)?;
            crate::generate::generations(&app, job_id, json).await
        }
        Command::Webhook { action } => {
            let app = match action {
                crate::generate::WebhookAction::Verify { .. } => None,
                _ => Some(LocalApp::open(Config::resolve(&cli.common)?)?),
            };
            crate::generate::webhook(app.as_ref(), action).await
        }
        Command::Delete { image_id } => {
            let app = LocalApp::open(Config::resolve(&cli.common)?)?;
            let record = app
                .repo
                .get_image(LOCAL_TENANT, &image_id)
                .await?
                .with_context(|| format!("no image {image_id}"))?;
            sightline_pipeline::search::delete_image(
                app.repo.as_ref(),
                app.blobs.as_ref(),
                Some(app.search.as_ref()),
                &record,
            )
            .await
            .map_err(|e| anyhow::anyhow!("deleting {image_id}: {e}"))?;
            println!("deleted {image_id}");
            Ok(())
        }
        Command::Costs { from, to, json } => {
            let config = Config::resolve(&cli.common)?;
            let app = LocalApp::open(config)?;
            let (df, dt) = default_window(app.clock.now_ms());
            let (from, to) = (from.unwrap_or(df), to.unwrap_or(dt));
            let rows = app.repo.costs(LOCAL_TENANT, &from, &to).await?;
            let mut report = cost_report(&from, &to, rows);
            report.budget = budget_report(
                &*app.repo,
                &app.config.settings,
                LOCAL_TENANT,
                app.clock.now_ms(),
            )
            .await?;
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", serde_json::to_string(&report)?)?;
            } else {
                writeln!(out, "costs {from} .. {to}")?;
                writeln!(
                    out,
                    "{:<12} {:<22} {:>7} {:>7} {:>6} {:>12} {:>12} {:>12}",
                    "day",
                    "model",
                    "images",
                    "cached",
                    "calls",
                    "input tok",
                    "output tok",
                    "cost USD"
                )?;
                for r in &report.rows {
                    writeln!(
                        out,
                        "{:<12} {:<22} {:>7} {:>7} {:>6} {:>12} {:>12} {:>12.6}",
                        r.day,
                        r.model,
                        r.images,
                        r.cached_images,
                        r.calls,
                        r.input_tokens,
                        r.output_tokens,
                        r.cost_usd
                    )?;
                }
                let t = &report.total;
                writeln!(
                    out,
                    "{:<12} {:<22} {:>7} {:>7} {:>6} {:>12} {:>12} {:>12.6}",
                    "total",
                    "",
                    t.images,
                    t.cached_images,
                    t.calls,
                    t.input_tokens,
                    t.output_tokens,
                    t.cost_usd
                )?;
                writeln!(
                    out,
                    "reported by the provider ${:.6}; booked at the estimate ${:.6} ({} calls whose usage could not be read)",
                    t.reported_cost_usd, t.cost_at_estimate_usd, t.calls_at_estimate
                )?;
                let l = &report.by_lane;
                writeln!(
                    out,
                    "by lane: real-time {} images, {} calls, ${:.6}; batch {} images, {} calls, ${:.6} (saved ${:.6} against real-time prices)",
                    l.realtime.images,
                    l.realtime.calls,
                    l.realtime.cost_usd,
                    l.batch.images,
                    l.batch.calls,
                    l.batch.cost_usd,
                    l.batch_saved_usd
                )?;
                let k = &report.by_kind;
                writeln!(
                    out,
                    "by kind: analysis {} calls ${:.6}; embedding {} calls ${:.6}; generation {} calls ${:.6}; near-duplicates reused {} images, sparing ${:.6}",
                    k.analysis.calls,
                    k.analysis.cost_usd,
                    k.embedding.calls,
                    k.embedding.cost_usd,
                    k.generation.calls,
                    k.generation.cost_usd,
                    k.reused_images,
                    k.reused_saved_usd
                )?;
                let b = &report.budget;
                for p in [&b.daily, &b.monthly] {
                    let cap = p
                        .cap_usd
                        .map_or_else(|| "none".to_string(), |c| format!("${c:.6}"));
                    writeln!(
                        out,
                        "budget {}: cap {cap}, spent ${:.6}, reserved ${:.6} ({}, over budget: {})",
                        p.period, p.spent_usd, p.reserved_usd, b.source, b.over_budget
                    )?;
                }
            }
            Ok(())
        }
        Command::Batches { open, json } => {
            let config = Config::resolve(&cli.common)?;
            let app = LocalApp::open(config)?;
            let batches = app
                .batch_store
                .list_batches(Some(LOCAL_TENANT), open, 1000)
                .await?;
            let mut out = std::io::stdout().lock();
            if json {
                for b in &batches {
                    writeln!(out, "{}", serde_json::to_string(b)?)?;
                }
                return Ok(());
            }
            writeln!(
                out,
                "{:<32} {:<9} {:<14} {:<11} {:>6} {:>6} {:>6} {:>6} {:>11} {:<24} {:<24}",
                "batch",
                "provider",
                "model",
                "state",
                "lines",
                "done",
                "failed",
                "retry",
                "cost USD",
                "submitted",
                "ended"
            )?;
            for b in &batches {
                writeln!(
                    out,
                    "{:<32} {:<9} {:<14} {:<11} {:>6} {:>6} {:>6} {:>6} {:>11.6} {:<24} {:<24}",
                    b.batch_id,
                    b.provider,
                    b.model,
                    b.provider_status
                        .as_deref()
                        .filter(|_| b.state == sightline_pipeline::ports::BatchState::Running)
                        .unwrap_or(b.state.as_str()),
                    b.requests,
                    b.counts.succeeded,
                    b.counts.failed,
                    b.counts.retried,
                    b.cost_usd,
                    b.submitted_at.as_deref().unwrap_or("-"),
                    b.ended_at.as_deref().unwrap_or("-")
                )?;
                if let Some(e) = &b.error {
                    writeln!(out, "    error: {e}")?;
                }
            }
            if batches.is_empty() {
                writeln!(out, "no {}batches", if open { "open " } else { "" })?;
            }
            Ok(())
        }
    }
}

/// A new random API key: `sl_` and 32 hex digits (128 bits).
fn new_api_key() -> String {
    let bytes: [u8; 16] = rand::random();
    format!("sl_{}", hex::encode(bytes))
}

async fn keys(app: &LocalApp, action: KeysAction, tenant: &str, json: bool) -> anyhow::Result<()> {
    let repo = &app.repo;
    let now = sightline_pipeline::ports::rfc3339(app.clock.now_ms());
    let mut out = std::io::stdout().lock();
    match action {
        KeysAction::List => {
            let keys = repo.list_api_keys(tenant).await?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&keys)?)?;
            } else {
                writeln!(out, "{:<14} {:<26} tenant", "id", "created")?;
                for k in keys {
                    writeln!(out, "{:<14} {:<26} {}", k.id, k.created_at, k.tenant)?;
                }
            }
        }
        KeysAction::Create | KeysAction::Rotate => {
            let key = new_api_key();
            let hash = hash_api_key(&key);
            repo.add_api_key(&hash, tenant, &now).await?;
            let id = api_key_id(&hash);
            let mut revoked = Vec::new();
            if matches!(action, KeysAction::Rotate) {
                for old in repo.list_api_keys(tenant).await? {
                    if old.id != id && repo.revoke_api_key(tenant, &old.id).await? {
                        revoked.push(old.id);
                    }
                }
            }
            if json {
                writeln!(
                    out,
                    "{}",
                    json!({"id": id, "key": key, "tenant": tenant, "revoked": revoked})
                )?;
            } else {
                writeln!(out, "{key}")?;
                eprintln!(
                    "key {id} for tenant {tenant}; shown only now{}",
                    if revoked.is_empty() {
                        String::new()
                    } else {
                        format!("; revoked {}", revoked.join(", "))
                    }
                );
            }
        }
        KeysAction::Revoke { id } => {
            if !repo.revoke_api_key(tenant, &id).await? {
                bail!("tenant {tenant} has no key with id {id:?} (see `sightline keys list`)");
            }
            if json {
                writeln!(out, "{}", json!({"revoked": id, "tenant": tenant}))?;
            } else {
                writeln!(out, "revoked {id}")?;
            }
        }
    }
    Ok(())
}

fn models(as_json: bool) -> anyhow::Result<()> {
    let t = PriceTable::builtin();
    let mut out = std::io::stdout().lock();
    if as_json {
        serde_json::to_writer(&mut out, t)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(out, "price table {} (USD per 1M tokens)", t.version())?;
    writeln!(
        out,
        "{:<18} {:>8} {:>8} {:>8} {:>8} {:>9}  {:<13} source",
        "model", "in", "cached", "out", "batch in", "batch out", "image rule"
    )?;
    for m in t.models() {
        writeln!(
            out,
            "{:<18} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>9.3}  {:<13} {} ({})",
            m.id,
            m.input_per_mtok,
            m.cached_input_per_mtok,
            m.output_per_mtok,
            m.batch_input_per_mtok,
            m.batch_output_per_mtok,
            m.image.name(),
            m.source,
            m.as_of
        )?;
    }
    Ok(())
}

fn estimate(
    config: &Config,
    files: &[PathBuf],
    models: &[String],
    as_json: bool,
) -> anyhow::Result<()> {
    let table = PriceTable::builtin();
    let models: Vec<String> = if models.is_empty() {
        vec![config.settings.model.clone()]
    } else {
        models.to_vec()
    };
    for m in &models {
        table.model(m)?;
    }
    let params = config.settings.estimate_params(config.settings.detail);
    let opts = config.settings.prepare;
    let mut out = std::io::stdout().lock();
    if !as_json {
        writeln!(
            out,
            "{:<32} {:<18} {:>11} {:>11} {:>9} {:>9} {:>11} {:>11} {:>11}",
            "file",
            "model",
            "original",
            "resized",
            "tok orig",
            "tok new",
            "cost orig",
            "cost new",
            "batch new"
        )?;
    }
    let mut failures = 0;
    for f in files {
        let name = f.display().to_string();
        let size = std::fs::metadata(f)
            .with_context(|| format!("{name}: cannot read"))?
            .len();
        let result = if size > opts.max_input_bytes {
            Err(sightline_core::PrepareError::TooLarge {
                bytes: size,
                max: opts.max_input_bytes,
            })
        } else {
            let bytes = std::fs::read(f).with_context(|| format!("{name}: cannot read"))?;
            prepare(&bytes, &opts)
        };
        let p = match result {
            Ok(v) => v,
            Err(e) => {
                failures += 1;
                if as_json {
                    writeln!(
                        out,
                        "{}",
                        json!({"file": name, "error": e.to_string(), "code": e.code()})
                    )?;
                } else {
                    writeln!(out, "{name:<32} error: {e}")?;
                }
                continue;
            }
        };
        for m in &models {
            let price = table.model(m)?;
            let orig = table.estimate(m, p.original_width, p.original_height, &params)?;
            let new = table.estimate(m, p.width, p.height, &params)?;
            let orig_batch = table.batch_cost_usd(&orig)?;
            let new_batch = table.batch_cost_usd(&new)?;
            if as_json {
                let side = |w: u32, h: u32, bytes: u64, e: &Estimate, batch: f64| {
                    json!({
                        "width": w, "height": h, "bytes": bytes,
                        "tokens": e.tokens, "image_tokens": e.image_tokens,
                        "input_tokens": e.input_tokens, "output_tokens": e.output_tokens,
                        "cost_usd": e.cost_usd, "batch_cost_usd": batch,
                    })
                };
                writeln!(
                    out,
                    "{}",
                    json!({
                        "file": name, "model": m,
                        "detail": params.detail,
                        "price_version": new.price_version,
                        // Per 1M tokens: what a prompt-cache hit would pay for input.
                        "cached_input_per_mtok": price.cached_input_per_mtok,
                        "original": side(p.original_width, p.original_height, p.original_bytes, &orig, orig_batch),
                        "resized": side(p.width, p.height, p.bytes, &new, new_batch),
                    })
                )?;
            } else {
                writeln!(
                    out,
                    "{:<32} {:<18} {:>11} {:>11} {:>9} {:>9} {:>11.6} {:>11.6} {:>11.6}",
                    truncate(&name, 32),
                    m,
                    format!("{}x{}", p.original_width, p.original_height),
                    format!("{}x{}", p.width, p.height),
                    orig.tokens,
                    new.tokens,
                    orig.cost_usd,
                    new.cost_usd,
                    new_batch
                )?;
            }
        }
    }
    if failures > 0 && failures == files.len() {
        bail!("no file could be estimated");
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(n - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}

/// Search results: one JSON object, or a line per image.
fn print_found(
    found: &sightline_pipeline::search::SearchResults,
    json: bool,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(found)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "mode: {} ({})",
        match found.mode {
            sightline_pipeline::search::SearchMode::Vector => "vector",
            sightline_pipeline::search::SearchMode::Keyword => "keyword",
        },
        found.model
    )?;
    for hit in &found.results {
        writeln!(
            out,
            "{:.4} {:<40} {}",
            hit.distance,
            hit.image_id,
            hit.description.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}
