//! `sightline generate`, `generations` and `webhook`: generation jobs on the embedded default.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use sightline_core::generate::{plan_job, Limits, RowsInput, TemplateSet};
use sightline_core::genjob::{JobStatus, RowCounts};
use sightline_core::webhook::{ReceivedHeaders, WebhookSecret, DEFAULT_TOLERANCE};
use sightline_pipeline::generation::{JobReport, Submission};
use sightline_pipeline::ports::DeliveryStatus;
use tokio::sync::watch;

use crate::app::{LocalApp, LOCAL_TENANT};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Template name in the templates file (default: the file's `default`, or its only one).
    #[arg(long)]
    pub template: Option<String>,
    /// Rows as CSV: the header names the template's variables (`_model`, `_size`, … set
    /// per-row settings).
    #[arg(long, conflicts_with = "rows_json")]
    pub csv: Option<PathBuf>,
    /// Rows as a JSON array of objects.
    #[arg(long = "rows-json")]
    pub rows_json: Option<PathBuf>,
    /// The templates file.
    #[arg(long, default_value = "templates.toml")]
    pub templates: PathBuf,
    /// Generate every row with this image model instead of the template's (`--model` is the
    /// analysis model that checks the images).
    #[arg(long = "image-model")]
    pub image_model: Option<String>,
    /// POST the finished job's summary here, signed with `webhook_secret`.
    #[arg(long)]
    pub webhook: Option<String>,
    /// Also POST each row to the webhook once it is final (`generation.row.finished`).
    #[arg(long, requires = "webhook")]
    pub webhook_rows: bool,
    /// Do not regenerate rows whose check fails (the `regenerate_on_mismatch` setting).
    #[arg(long)]
    pub no_regenerate: bool,
    /// Generate and analyse in this process until the job finishes (else it is only queued,
    /// for `sightline serve` to work on).
    #[arg(long)]
    pub wait: bool,
    /// The job report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum WebhookAction {
    /// Check a received webhook's signature (exit 1 when it does not verify).
    Verify {
        /// The `whsec_` secret.
        #[arg(long, env = "SIGHTLINE_WEBHOOK_SECRET", hide_env_values = true)]
        secret: String,
        /// The `webhook-id` header.
        #[arg(long)]
        id: String,
        /// The `webhook-timestamp` header.
        #[arg(long)]
        timestamp: String,
        /// The `webhook-signature` header.
        #[arg(long)]
        signature: String,
        /// File with the raw body as received.
        #[arg(long)]
        body: PathBuf,
    },
    /// The tenant's webhook deliveries (`--dead`: only dead letters).
    Deliveries {
        #[arg(long)]
        dead: bool,
        #[arg(long)]
        json: bool,
    },
    /// Send a delivery again (a dead letter, a 410, or a delivered one) now.
    Redeliver { delivery_id: String },
}

fn read_rows(args: &GenerateArgs) -> anyhow::Result<(Vec<u8>, bool)> {
    match (&args.csv, &args.rows_json) {
        (Some(p), None) => Ok((
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            true,
        )),
        (None, Some(p)) => Ok((
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            false,
        )),
        _ => bail!("name the rows: --csv FILE or --rows-json FILE"),
    }
}

pub async fn generate(app: &LocalApp, args: GenerateArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.templates)
        .with_context(|| format!("reading the templates file {}", args.templates.display()))?;
    let set = TemplateSet::from_toml(&text)
        .with_context(|| format!("in {}", args.templates.display()))?;
    let (rows, csv) = read_rows(&args)?;
    let input = if csv {
        RowsInput::Csv(&rows)
    } else {
        RowsInput::Json(&rows)
    };
    // Every row is checked before anything is stored or paid; errors carry row numbers.
    let mut requests = plan_job(&set, args.template.as_deref(), input, &Limits::default())
        .map_err(|e| anyhow::anyhow!("the job was refused, nothing was paid:\n{e}"))?;
    if let Some(model) = &args.image_model {
        for r in &mut requests {
            r.model = model.clone();
        }
    }
    let template = args
        .template
        .clone()
        .or_else(|| set.default_name().map(str::to_string))
        .unwrap_or_else(|| "(per row)".into());
    let job = app
        .generations
        .submit(Submission {
            tenant: LOCAL_TENANT.into(),
            template,
            requests,
            webhook_url: args.webhook.clone(),
            webhook_rows: args.webhook_rows,
            regenerate: args.no_regenerate.then_some(false),
            source: "cli".into(),
            job_id: None,
        })
        .await?;
    if !args.wait {
        println!(
            "job {} queued: {} rows (`sightline serve` works on it; `sightline generations {}` shows it)",
            job.job_id, job.rows, job.job_id
        );
        return Ok(());
    }
    let report = wait_for(app, &job.job_id, job.rows, args.json).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report_text(&report));
    }
    Ok(())
}

/// Run the generation and analysis workers, the sweep and the deliveries in this process
/// until the job finishes; the progress bar counts final rows.
async fn wait_for(
    app: &LocalApp,
    job_id: &str,
    rows: u64,
    quiet: bool,
) -> anyhow::Result<JobReport> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let instance = app.start_instance(stop_rx.clone()).await?;
    let generators = tokio::spawn(app.generation_workers(None).run(stop_rx.clone()));
    let analysts = tokio::spawn(app.workers(None).run(stop_rx.clone()));
    let bar = crate::run::progress_bar(rows);
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut last_sweep = std::time::Instant::now();
    // The progress comes from the rows alone (two reads a tick); the full report, which reads
    // every image's analysis, is made once the job has finished.
    let store = &app.generations.store;
    loop {
        let job = store
            .get_job(LOCAL_TENANT, job_id)
            .await?
            .context("the job disappeared")?;
        let rows = store.rows(LOCAL_TENANT, job_id).await?;
        let mut c = RowCounts::default();
        for r in &rows {
            c.add(r.status, r.first_check.is_some(), r.reused);
        }
        let generated: f64 = rows.iter().map(|r| r.generation_cost_usd).sum();
        bar.set_position(c.done + c.mismatch + c.failed);
        bar.set_message(format!(
            "{} done, {} mismatch, {} failed, generation ${generated:.4}",
            c.done, c.mismatch, c.failed
        ));
        if job.status == JobStatus::Finished {
            break;
        }
        if last_sweep.elapsed() > Duration::from_secs(5) {
            app.generations.sweep().await?;
            last_sweep = std::time::Instant::now();
        }
        // Rows' webhooks (`--webhook-rows`) go out while the job runs.
        app.deliveries.deliver_due(100).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    // The job's webhook: attempted now, and retried here while its next attempt is near (the
    // first steps of the schedule); later ones are `serve`'s.
    deliver_while_near(app, job_id).await?;
    let _ = stop_tx.send(true);
    let _ = generators.await;
    let _ = analysts.await;
    let _ = instance.await;
    app.generations
        .job_report(LOCAL_TENANT, job_id)
        .await?
        .context("the job disappeared")
}

/// How far off a webhook retry `--wait` still waits for.
const NEAR: Duration = Duration::from_secs(60);

async fn deliver_while_near(app: &LocalApp, job_id: &str) -> anyhow::Result<()> {
    loop {
        app.deliveries.deliver_due(100).await?;
        let pending = app
            .generations
            .store
            .list_deliveries(LOCAL_TENANT, Some(DeliveryStatus::Pending), 1000)
            .await?
            .into_iter()
            .filter(|d| d.job_id == job_id)
            .map(|d| d.next_at_ms)
            .min();
        let Some(next_at) = pending else {
            return Ok(());
        };
        let wait = next_at.saturating_sub(app.clock.now_ms());
        if wait > NEAR.as_millis() as u64 {
            eprintln!(
                "the webhook is not delivered yet; its next attempt is in {} s (`sightline serve` makes it)",
                wait / 1000
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(wait.clamp(50, 1000))).await;
    }
}

pub fn report_text(r: &JobReport) -> String {
    let mut out = String::new();
    let c = r.counts;
    out.push_str(&format!(
        "job {} ({}): {} rows: {} done, {} mismatch, {} failed; {} regenerated, {} reused\n",
        r.job.job_id,
        r.job.status.as_str(),
        c.total,
        c.done,
        c.mismatch,
        c.failed,
        c.regenerated,
        c.reused
    ));
    for row in &r.rows {
        let detail = match (&row.error, &row.check) {
            (Some(e), _) => e.clone(),
            (None, Some(check)) if !check.issues.is_empty() => check.issues.join("; "),
            _ => String::new(),
        };
        out.push_str(&format!(
            "  row {:>4}  {:<8} {}{}  {}\n",
            row.row,
            row.status.as_str(),
            row.output_key.as_deref().unwrap_or("-"),
            if row.first_check.is_some() {
                " (regenerated)"
            } else {
                ""
            },
            detail
        ));
    }
    out.push_str(&format!(
        "cost: generation ${:.6} + analysis ${:.6} = ${:.6}\n",
        r.generation_cost_usd,
        r.analysis_cost_usd,
        r.generation_cost_usd + r.analysis_cost_usd
    ));
    out
}

/// `sightline generations [JOB_ID]`: the jobs, or one job's rows.
pub async fn generations(app: &LocalApp, job_id: Option<String>, json: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match job_id {
        Some(id) => {
            let report = app
                .generations
                .job_report(LOCAL_TENANT, &id)
                .await?
                .with_context(|| format!("no generation job {id}"))?;
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                write!(stdout, "{}", report_text(&report))?;
            }
        }
        None => {
            for job in app.generations.store.list_jobs(LOCAL_TENANT, 100).await? {
                if json {
                    writeln!(stdout, "{}", serde_json::to_string(&job)?)?;
                } else {
                    writeln!(
                        stdout,
                        "{}  {:<8}  {:>5} rows  {}  {}",
                        job.job_id,
                        job.status.as_str(),
                        job.rows,
                        job.created_at,
                        job.template
                    )?;
                }
            }
        }
    }
    Ok(())
}

pub async fn webhook(app: Option<&LocalApp>, action: WebhookAction) -> anyhow::Result<()> {
    match action {
        WebhookAction::Verify {
            secret,
            id,
            timestamp,
            signature,
            body,
        } => {
            let secret = WebhookSecret::parse(&secret).context("the secret")?;
            let body =
                std::fs::read(&body).with_context(|| format!("reading {}", body.display()))?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            let headers = ReceivedHeaders {
                id: Some(&id),
                timestamp: Some(&timestamp),
                signature: Some(&signature),
            };
            secret
                .verify(&headers, &body, now, DEFAULT_TOLERANCE)
                .map_err(|e| anyhow::anyhow!("does not verify: {e}"))?;
            println!("verified");
            Ok(())
        }
        WebhookAction::Deliveries { dead, json } => {
            let app = app.context("no app")?;
            let status = dead.then_some(DeliveryStatus::Dead);
            for d in app
                .generations
                .store
                .list_deliveries(LOCAL_TENANT, status, 100)
                .await?
            {
                if json {
                    println!("{}", serde_json::to_string(&d)?);
                } else {
                    println!(
                        "{}  {:<9}  job {}  {} attempts  last {}  {}",
                        d.delivery_id,
                        d.status.as_str(),
                        d.job_id,
                        d.attempts,
                        d.last_status
                            .map(|s| s.to_string())
                            .or(d.last_error.clone())
                            .unwrap_or_else(|| "-".into()),
                        d.url
                    );
                }
            }
            Ok(())
        }
        WebhookAction::Redeliver { delivery_id } => {
            let app = app.context("no app")?;
            app.deliveries
                .redeliver(LOCAL_TENANT, &delivery_id)
                .await
                .with_context(|| format!("redelivering {delivery_id}"))?;
            let report = app.deliveries.deliver_due(100).await?;
            println!(
                "{delivery_id}: {}",
                if report.delivered > 0 {
                    "delivered"
                } else {
                    "attempted; not delivered yet (`sightline serve` keeps retrying)"
                }
            );
            Ok(())
        }
    }
}
