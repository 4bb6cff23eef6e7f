//! Wiring of the local runtime: SQLite + files adapters, provider, use-cases.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sightline_core::keys::UPLOAD_PREFIX;
use sightline_pipeline::analyze::Analyzer;
use sightline_pipeline::batch::BatchLane;
use sightline_pipeline::delivery::{Deliveries, HttpPoster};
use sightline_pipeline::generation::{GenerateOutcome, Generations, Generators};
use sightline_pipeline::ingest::Ingest;
use sightline_pipeline::local::{
    FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository, SqliteVectorStore,
};
use sightline_pipeline::metrics::prometheus::Registry;
use sightline_pipeline::ports::{
    BatchStore, BlobStore, Clock, Queue, Repository, SystemClock, VisionProvider,
};
use sightline_pipeline::providers::select::{build_batch_provider, build_embedder, build_provider};
use sightline_pipeline::reconcile::Reconciler;
use sightline_pipeline::search::Search;
use sightline_pipeline::webhook_url::{Mode, Resolve, SystemResolver};
use sightline_pipeline::worker::{OnOutcome, WorkerPool};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;

/// Local tenant for CLI runs and the default serve key.
pub const LOCAL_TENANT: &str = "local";
/// The local analyze queue (a table of the data dir's SQLite database).
pub const ANALYZE_QUEUE: &str = "analyze";
/// The local generation queue (one message per job row's attempt).
pub const GENERATE_QUEUE: &str = "generate";
/// How often a running process tells the data dir it is alive.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A process silent for this long counts as dead even if its pid still exists.
const STALE_AFTER: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct LocalApp {
    pub config: Config,
    /// This process's name in the data dir: prefix of its claim owners and queue receipts.
    pub instance: String,
    pub db: SqliteDb,
    pub clock: Arc<dyn Clock>,
    pub blobs: Arc<dyn BlobStore>,
    pub repo: Arc<dyn Repository>,
    pub queue: Arc<SqliteQueue>,
    pub provider: Arc<dyn VisionProvider>,
    pub ingest: Ingest,
    pub analyzer: Analyzer,
    pub reconciler: Reconciler,
    /// Batch items and batch records (the SQLite repository).
    pub batch_store: Arc<dyn BatchStore>,
    /// The batch lane (None with the offline analyzer: it has no batches and costs nothing).
    pub batch: Option<BatchLane>,
    /// What the use-cases of this process counted (`GET /metrics` of `sightline serve`).
    pub metrics: Arc<Registry>,
    /// Vectors (sqlite-vec in the same database) and the searches over them.
    pub search: Arc<Search>,
    /// Generation jobs (their queue is [`GENERATE_QUEUE`]).
    pub generations: Arc<Generations>,
    pub generate_queue: Arc<SqliteQueue>,
    /// Webhook deliveries of generation jobs.
    pub deliveries: Deliveries,
}

impl LocalApp {
    pub fn open(config: Config) -> anyhow::Result<LocalApp> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let db_path = config.data_dir().join("sightline.db");
        let db =
            SqliteDb::open(&db_path).with_context(|| format!("opening {}", db_path.display()))?;
        let blobs: Arc<dyn BlobStore> =
            Arc::new(FileBlobStore::new(config.data_dir().join("blobs")));
        // Records and their job messages are written in one transaction.
        let sqlite_repo = Arc::new(SqliteRepository::with_job_queue(db.clone(), ANALYZE_QUEUE));
        let repo: Arc<dyn Repository> = sqlite_repo.clone();
        let instance = uuid::Uuid::new_v4().simple().to_string();
        let queue = Arc::new(
            SqliteQueue::new(
                db.clone(),
                ANALYZE_QUEUE,
                config.settings.max_receives,
                clock.clone(),
            )
            .with_instance(&instance),
        );
        let provider: Arc<dyn VisionProvider> = build_provider(&config.settings, &config.keys)?;
        let settings = Arc::new(config.settings.clone());
        let search = Arc::new(Search::new(
            repo.clone(),
            blobs.clone(),
            Arc::new(SqliteVectorStore::new(db.clone())),
            build_embedder(&config.settings, &config.keys)?,
            settings.clone(),
            clock.clone(),
        ));
        let queue_port: Arc<dyn Queue> = queue.clone();
        let metrics = Registry::new();
        let mut ingest = Ingest::new(
            blobs.clone(),
            repo.clone(),
            queue_port,
            settings.clone(),
            clock.clone(),
            UPLOAD_PREFIX,
        );
        // The reconciler's resizes are counted apart from the uploads' own.
        let mut reconciler_ingest = ingest.clone();
        reconciler_ingest.metrics = metrics.recorder("reconcile");
        ingest.metrics = metrics.recorder("resize");
        let mut analyzer = Analyzer::new(
            blobs.clone(),
            repo.clone(),
            provider.clone(),
            settings.clone(),
            clock.clone(),
        );
        analyzer.instance = instance.clone();
        analyzer.metrics = metrics.recorder("analyze");
        let generate_queue = Arc::new(
            SqliteQueue::new(
                db.clone(),
                GENERATE_QUEUE,
                config.settings.max_receives,
                clock.clone(),
            )
            .with_instance(&instance),
        );
        let resolver: Arc<dyn Resolve> = Arc::new(SystemResolver::default());
        let generators = Generators::for_settings(settings.clone(), config.keys.clone());
        let generations = Arc::new(
            Generations::new(
                sqlite_repo.clone(),
                repo.clone(),
                blobs.clone(),
                generate_queue.clone(),
                Arc::new(generators),
                settings.clone(),
                clock.clone(),
                Mode::Local,
                resolver.clone(),
            )
            .with_ingest(ingest.clone())
            .with_instance(&instance),
        );
        let deliveries = Deliveries {
            store: sqlite_repo.clone(),
            poster: Arc::new(HttpPoster::new(Mode::Local, resolver)),
            secrets: settings.clone(),
            settings: settings.clone(),
            clock: clock.clone(),
        };
        if config.settings.shared_limit {
            // Every process on this data dir draws from one limit in its database.
            analyzer = analyzer.with_shared_limit(sqlite_repo.clone());
        }
        let analyzer = analyzer
            .with_search(search.clone())
            .with_generations(generations.clone());
        let batch =
            build_batch_provider(&config.settings, &config.keys)?.map(|provider| BatchLane {
                blobs: blobs.clone(),
                repo: repo.clone(),
                store: sqlite_repo.clone(),
                provider,
                queue: queue.clone(),
                settings: Arc::new(config.settings.clone()),
                clock: clock.clone(),
                metrics: metrics.recorder("batch"),
                search: Some(search.clone()),
            });
        let analyzer = match batch {
            Some(_) => analyzer.with_batches(sqlite_repo.clone()),
            None => analyzer,
        };
        Ok(LocalApp {
            config,
            instance,
            db,
            clock,
            blobs,
            repo,
            queue,
            provider,
            reconciler: Reconciler::new(reconciler_ingest),
            batch,
            batch_store: sqlite_repo,
            ingest,
            analyzer,
            metrics,
            search,
            generations,
            generate_queue,
            deliveries,
        })
    }

    /// Register this process in the data dir, give back what processes that died left
    /// (their claims and received messages: work killed mid-way resumes at once), and keep
    /// doing both every few seconds until `stop`, when the registration is removed.
    pub async fn start_instance(
        &self,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        self.db
            .heartbeat(&self.instance, self.clock.now_ms())
            .await?;
        self.recover_dead().await;
        let app = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                    _ = stop.changed() => break,
                }
                if let Err(e) = app.db.heartbeat(&app.instance, app.clock.now_ms()).await {
                    warn!(error = %e, "heartbeat failed");
                }
                app.recover_dead().await;
            }
            if let Err(e) = app.db.retire(&app.instance).await {
                warn!(error = %e, "could not retire this instance");
            }
        }))
    }

    async fn recover_dead(&self) {
        let now = self.clock.now_ms();
        match self
            .db
            .recover_dead_instances(&self.instance, now, STALE_AFTER.as_millis() as u64)
            .await
        {
            Ok(dead) if !dead.is_empty() => {
                info!(
                    ?dead,
                    "gave back the claims and messages of processes that died"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "recovering dead instances failed"),
        }
    }

    /// Workers of the generation queue (a provider call each, like the analysis workers).
    pub fn generation_workers(
        &self,
        on_outcome: Option<OnOutcome<GenerateOutcome>>,
    ) -> WorkerPool<Generations> {
        WorkerPool {
            queue: self.generate_queue.clone(),
            handler: (*self.generations).clone(),
            workers: self.config.settings.workers,
            batch_size: 1,
            // Hidden as long as its generation claim may be held (a row's worst case with its
            // limiter waits, and a margin): a row still being made is not received again.
            visibility: self.config.settings.generation_lease(),
            idle_poll: Duration::from_millis(100),
            on_outcome,
        }
    }

    pub fn workers(&self, on_outcome: Option<OnOutcome>) -> WorkerPool {
        WorkerPool {
            queue: self.queue.clone(),
            handler: self.analyzer.clone(),
            workers: self.config.settings.workers,
            // One message per receive: a worker handles messages one at a time, and a batch
            // would sit hidden behind the first one, its visibility running out unhandled.
            batch_size: 1,
            // Hidden as long as its claim may be held: a record's worst case and a margin.
            visibility: self.config.settings.claim_lease,
            idle_poll: Duration::from_millis(100),
            on_outcome,
        }
    }
}
