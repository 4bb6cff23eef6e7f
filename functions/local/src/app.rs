//! Wiring of the local runtime: SQLite + files adapters, provider, use-cases.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sightline_core::keys::UPLOAD_PREFIX;
use sightline_pipeline::analyze::Analyzer;
use sightline_pipeline::ingest::Ingest;
use sightline_pipeline::local::{FileBlobStore, SqliteDb, SqliteQueue, SqliteRepository};
use sightline_pipeline::ports::{BlobStore, Clock, Queue, Repository, SystemClock, VisionProvider};
use sightline_pipeline::providers::local::LocalAnalyzer;
use sightline_pipeline::providers::openai::OpenAiProvider;
use sightline_pipeline::reconcile::Reconciler;
use sightline_pipeline::worker::{OnOutcome, WorkerPool};

use crate::config::{Config, ProviderKind};

/// Local tenant for CLI runs and the default serve key.
pub const LOCAL_TENANT: &str = "local";
/// Deliveries before a message is dead-lettered locally.
pub const MAX_RECEIVES: u32 = 8;
/// The local analyze queue (a table of the data dir's SQLite database).
pub const ANALYZE_QUEUE: &str = "analyze";

#[derive(Clone)]
pub struct LocalApp {
    pub config: Config,
    pub db: SqliteDb,
    pub clock: Arc<dyn Clock>,
    pub blobs: Arc<dyn BlobStore>,
    pub repo: Arc<dyn Repository>,
    pub queue: Arc<SqliteQueue>,
    pub provider: Arc<dyn VisionProvider>,
    pub ingest: Ingest,
    pub analyzer: Analyzer,
    pub reconciler: Reconciler,
}

impl LocalApp {
    pub fn open(config: Config) -> anyhow::Result<LocalApp> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let db_path = config.data_dir.join("sightline.db");
        let db =
            SqliteDb::open(&db_path).with_context(|| format!("opening {}", db_path.display()))?;
        let blobs: Arc<dyn BlobStore> = Arc::new(FileBlobStore::new(config.data_dir.join("blobs")));
        // Records and their job messages are written in one transaction.
        let repo: Arc<dyn Repository> =
            Arc::new(SqliteRepository::with_job_queue(db.clone(), ANALYZE_QUEUE));
        let queue = Arc::new(SqliteQueue::new(
            db.clone(),
            ANALYZE_QUEUE,
            MAX_RECEIVES,
            clock.clone(),
        ));
        let provider: Arc<dyn VisionProvider> = match config.provider {
            ProviderKind::Local => Arc::new(LocalAnalyzer),
            ProviderKind::OpenAi => Arc::new(OpenAiProvider::new(
                &config.openai_base_url,
                config.openai_api_key.as_deref().unwrap_or_default(),
                config.timeout,
            )?),
        };
        let mut settings = config.settings.clone();
        settings.max_receives = MAX_RECEIVES;
        settings.fit_lease_to(config.timeout);
        let settings = Arc::new(settings);
        let queue_port: Arc<dyn Queue> = queue.clone();
        let ingest = Ingest::new(
            blobs.clone(),
            repo.clone(),
            queue_port,
            settings.clone(),
            clock.clone(),
            UPLOAD_PREFIX,
        );
        let analyzer = Analyzer::new(
            blobs.clone(),
            repo.clone(),
            provider.clone(),
            settings,
            clock.clone(),
        );
        Ok(LocalApp {
            config,
            db,
            clock,
            blobs,
            repo,
            queue,
            provider,
            reconciler: Reconciler::new(ingest.clone()),
            ingest,
            analyzer,
        })
    }

    pub fn workers(&self, on_outcome: Option<OnOutcome>) -> WorkerPool {
        WorkerPool {
            queue: self.queue.clone(),
            analyzer: self.analyzer.clone(),
            workers: self.config.workers,
            // One message per receive: a worker handles messages one at a time, and a batch
            // would sit hidden behind the first one, its visibility running out unhandled.
            batch_size: 1,
            visibility: self.config.timeout * 2 + Duration::from_secs(30),
            idle_poll: Duration::from_millis(100),
            on_outcome,
        }
    }
}
