//! SQLite adapters: the repository (images, results, idempotency, ledger, API keys) and a
//! queue with SQS semantics (batch receive, visibility timeout, receive count, DLQ, delay).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use sightline_core::budget::{self, BudgetCaps, Counted, Periods};
use sightline_core::limiter::{LimitOp, LimitOutcome, LimitState, Limits};
use sightline_core::model::{AnalysisResult, ImageRecord, ImageStatus};

use crate::ports::{
    api_key_id, day_of, ApiKeyInfo, BudgetCounts, BudgetHold, Claim, Clock, Completion, CostRow,
    Failure, ImagePage, JobDelivery, LedgerKind, PutImage, Queue, QueueMessage, RateLimitStore,
    Repository, Spend, StoreError, StoreResult,
};

/// Connection settings (outside any transaction: journal_mode cannot change inside one).
const PRAGMAS: &str = r#"
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
"#;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS images (
    tenant TEXT NOT NULL, image_id TEXT NOT NULL, status TEXT NOT NULL,
    created_at TEXT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (tenant, image_id));
CREATE INDEX IF NOT EXISTS images_by_time ON images (tenant, created_at DESC, image_id DESC);
CREATE INDEX IF NOT EXISTS images_by_status ON images (tenant, status, created_at DESC, image_id DESC);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, state TEXT NOT NULL, owner TEXT, lease_until INTEGER, result TEXT);
CREATE TABLE IF NOT EXISTS ledger (
    tenant TEXT NOT NULL, day TEXT NOT NULL, model TEXT NOT NULL,
    images INTEGER NOT NULL DEFAULT 0, cached_images INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0, estimated_cost_usd REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant, day, model));
CREATE TABLE IF NOT EXISTS api_keys (key_sha256 TEXT PRIMARY KEY, tenant TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, message_id TEXT NOT NULL,
    body TEXT NOT NULL, visible_at INTEGER NOT NULL, receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT, dead INTEGER NOT NULL DEFAULT 0, sent_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS queue_visible ON queue (queue, dead, visible_at, seq);
CREATE TABLE IF NOT EXISTS spends (spend_id TEXT PRIMARY KEY, tenant TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS upload_tokens (nonce TEXT PRIMARY KEY, expires_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS budgets (
    tenant TEXT PRIMARY KEY, daily_usd REAL, monthly_usd REAL);
CREATE TABLE IF NOT EXISTS budget_holds (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, day TEXT NOT NULL, month TEXT NOT NULL,
    amount_usd REAL NOT NULL, expires_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS budget_holds_by_tenant ON budget_holds (tenant, month, day);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY, pid INTEGER NOT NULL, started_at INTEGER NOT NULL, heartbeat_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS batch_items (
    custom_id TEXT PRIMARY KEY, batch_id TEXT, not_before_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS batch_items_pending ON batch_items (created_ms) WHERE batch_id IS NULL;
CREATE INDEX IF NOT EXISTS batch_items_by_batch ON batch_items (batch_id) WHERE batch_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, state TEXT NOT NULL,
    created_ms INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS batches_by_time ON batches (created_ms DESC);
CREATE TABLE IF NOT EXISTS vector_indexes (
    name TEXT PRIMARY KEY, model TEXT NOT NULL, dims INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (
    index_name TEXT NOT NULL, tenant TEXT NOT NULL, image_id TEXT NOT NULL,
    vector BLOB NOT NULL, status TEXT NOT NULL, tags TEXT NOT NULL,
    PRIMARY KEY (index_name, tenant, image_id));
CREATE INDEX IF NOT EXISTS vectors_by_image ON vectors (tenant, image_id);
CREATE TABLE IF NOT EXISTS gen_jobs (
    tenant TEXT NOT NULL, job_id TEXT NOT NULL, status TEXT NOT NULL,
    created_at TEXT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (tenant, job_id));
CREATE INDEX IF NOT EXISTS gen_jobs_running ON gen_jobs (status, created_at);
CREATE TABLE IF NOT EXISTS gen_rows (
    tenant TEXT NOT NULL, job_id TEXT NOT NULL, row INTEGER NOT NULL,
    status TEXT NOT NULL, attempt INTEGER NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (tenant, job_id, row));
CREATE TABLE IF NOT EXISTS gen_objects (
    tenant TEXT NOT NULL, key TEXT NOT NULL, owner TEXT, lease_until INTEGER, doc TEXT,
    PRIMARY KEY (tenant, key));
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    tenant TEXT NOT NULL, delivery_id TEXT NOT NULL, status TEXT NOT NULL,
    next_at INTEGER NOT NULL, attempts INTEGER NOT NULL, created_at TEXT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (tenant, delivery_id));
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (status, next_at);
CREATE TABLE IF NOT EXISTS rate_limits (
    key TEXT PRIMARY KEY, requests_full_at REAL NOT NULL, tokens_full_at REAL NOT NULL,
    not_before REAL NOT NULL);
"#;

/// Columns added after the first release: (table, column, definition). Added at open when an
/// older database lacks them.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("images", "recheck_at", "INTEGER"),
    ("ledger", "calls", "INTEGER NOT NULL DEFAULT 0"),
    ("ledger", "calls_at_estimate", "INTEGER NOT NULL DEFAULT 0"),
    ("ledger", "cost_at_estimate_usd", "REAL NOT NULL DEFAULT 0"),
    ("api_keys", "created_at", "TEXT NOT NULL DEFAULT ''"),
    ("queue", "ref", "TEXT"),
    ("upload_tokens", "sha256", "TEXT"),
    ("ledger", "batch_images", "INTEGER NOT NULL DEFAULT 0"),
    ("ledger", "batch_calls", "INTEGER NOT NULL DEFAULT 0"),
    ("ledger", "batch_cost_usd", "REAL NOT NULL DEFAULT 0"),
    ("ledger", "batch_saved_usd", "REAL NOT NULL DEFAULT 0"),
    ("ledger", "kind", "TEXT NOT NULL DEFAULT 'analysis'"),
    ("ledger", "reused_images", "INTEGER NOT NULL DEFAULT 0"),
    ("ledger", "reused_saved_usd", "REAL NOT NULL DEFAULT 0"),
];

/// Indexes over added columns (created after the columns exist).
const ADDED_INDEXES: &str = r#"
CREATE INDEX IF NOT EXISTS images_recheck ON images (recheck_at) WHERE recheck_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant, created_at);
CREATE INDEX IF NOT EXISTS queue_live_ref ON queue (queue, ref) WHERE dead = 0;
"#;

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, definition) in ADDED_COLUMNS {
        let present: bool = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists(params![column])?;
        if !present {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
            ))?;
        }
    }
    conn.execute_batch(ADDED_INDEXES)
}

/// A write transaction that takes the write lock at once: a deferred one that reads first
/// can fail with SQLITE_BUSY when it upgrades while another process writes (the busy timeout
/// does not help there).
fn write_tx(c: &mut Connection) -> StoreResult<Transaction<'_>> {
    c.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)
}

/// Make sqlite-vec's functions part of every connection opened from now on (once per process).
fn register_sqlite_vec() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sqlite3_vec_init is an SQLite extension entry point, the signature
        // sqlite3_auto_extension expects; the sqlite-vec crate declares it without arguments,
        // hence the cast. It is registered before any connection that uses it is opened.
        unsafe {
            rusqlite::ffi::sqlite3_auto_extension(Some(std::mem::transmute::<
                *const (),
                unsafe extern "C" fn(
                    *mut rusqlite::ffi::sqlite3,
                    *mut *mut std::os::raw::c_char,
                    *const rusqlite::ffi::sqlite3_api_routines,
                ) -> std::os::raw::c_int,
            >(
                sqlite_vec::sqlite3_vec_init as *const (),
            )));
        }
    });
}

/// What a use of a single-use upload token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// Never used before: now bound to this content.
    First,
    /// Used before for the same content: an idempotent retry.
    SameContent,
    /// Used before for other content: a replay, refused.
    OtherContent,
}

/// One SQLite database file holding everything local.
#[derive(Clone)]
pub struct SqliteDb {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteDb {
    pub fn open(path: &Path) -> anyhow::Result<SqliteDb> {
        register_sqlite_vec();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn in_memory() -> anyhow::Result<SqliteDb> {
        register_sqlite_vec();
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> anyhow::Result<SqliteDb> {
        // Two processes on one data dir (`serve` and `run`) wait for each other's writes.
        conn.busy_timeout(Duration::from_secs(30))?;
        // Switching a new file to WAL wants it to itself: when another process is switching it
        // at the same moment SQLite may answer SQLITE_BUSY at once, without the busy handler.
        let mut tries = 0;
        loop {
            match conn.execute_batch(PRAGMAS) {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(f, _))
                    if tries < 50
                        && matches!(
                            f.code,
                            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                        ) =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Schema and migrations in one write transaction: processes opening a new (or older)
        // data dir at the same moment would otherwise both see a column missing and both add it.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(SCHEMA)?;
        migrate(&tx)?;
        tx.commit()?;
        Ok(SqliteDb {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Run a closure on the connection off the async threads.
    pub(crate) async fn with<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn
                .lock()
                .map_err(|_| StoreError::Permanent("sqlite connection lock poisoned".into()))?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Permanent(format!("sqlite task failed: {e}")))?
    }

    /// Bind a single-use upload token to the content it uploads. The first use binds it; the
    /// same content again (a client retrying after a lost answer, or after the server died
    /// mid-write) may use it again; other content never may. Tokens past their expiry are
    /// forgotten on the way (they no longer verify anyway).
    pub async fn use_upload_token(
        &self,
        nonce: &str,
        content_sha256: &str,
        expires_ms: u64,
        now_ms: u64,
    ) -> StoreResult<TokenUse> {
        let (nonce, sha) = (nonce.to_string(), content_sha256.to_string());
        self.with(move |c| {
            let tx = write_tx(c)?;
            tx.execute(
                "DELETE FROM upload_tokens WHERE expires_ms < ?1",
                params![now_ms as i64],
            )
            .map_err(db_err)?;
            let bound: Option<Option<String>> = tx
                .query_row(
                    "SELECT sha256 FROM upload_tokens WHERE nonce = ?1",
                    params![nonce],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            let used = match bound {
                None => {
                    tx.execute(
                        "INSERT INTO upload_tokens (nonce, expires_ms, sha256) VALUES (?1, ?2, ?3)",
                        params![nonce, expires_ms as i64, sha],
                    )
                    .map_err(db_err)?;
                    TokenUse::First
                }
                Some(Some(first)) if first == sha => TokenUse::SameContent,
                Some(_) => TokenUse::OtherContent,
            };
            tx.commit().map_err(db_err)?;
            Ok(used)
        })
        .await
    }

    /// Register this process as a live instance (claim owners and queue receipts it writes
    /// start with `id:`), or refresh its heartbeat.
    pub async fn heartbeat(&self, id: &str, now_ms: u64) -> StoreResult<()> {
        let id = id.to_string();
        let pid = i64::from(std::process::id());
        self.with(move |c| {
            c.execute(
                "INSERT INTO instances (id, pid, started_at, heartbeat_at) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = ?3",
                params![id, pid, now_ms as i64],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    /// This instance is shutting down cleanly: its rows go.
    pub async fn retire(&self, id: &str) -> StoreResult<()> {
        let id = id.to_string();
        self.with(move |c| {
            c.execute("DELETE FROM instances WHERE id = ?1", params![id])
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    /// Give back what instances that died left behind: their in-flight claims, analysis and
    /// generation (so the next delivery may call the provider at once), and the messages they
    /// had received (visible again now, not after the visibility timeout). An instance is dead
    /// when its process is gone (it was killed) or its heartbeat is older than
    /// `stale_after_ms`. Returns the ids of the instances recovered.
    pub async fn recover_dead_instances(
        &self,
        me: &str,
        now_ms: u64,
        stale_after_ms: u64,
    ) -> StoreResult<Vec<String>> {
        let me = me.to_string();
        self.with(move |c| {
            let tx = write_tx(c)?;
            let rows: Vec<(String, i64, i64)> = {
                let mut stmt = tx
                    .prepare("SELECT id, pid, heartbeat_at FROM instances WHERE id <> ?1")
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(params![me], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                rows
            };
            let mut dead = Vec::new();
            for (id, pid, beat) in rows {
                let stale = now_ms as i64 - beat > stale_after_ms as i64;
                if stale || !process_alive(pid) {
                    let prefix = format!("{id}:%");
                    tx.execute(
                        "DELETE FROM idempotency WHERE state = 'inflight' AND owner LIKE ?1",
                        params![prefix],
                    )
                    .map_err(db_err)?;
                    // Its generation claims too: an image it was making is not on record, so
                    // the row's next delivery may generate it at once.
                    tx.execute(
                        "DELETE FROM gen_objects WHERE doc IS NULL AND owner LIKE ?1",
                        params![prefix],
                    )
                    .map_err(db_err)?;
                    tx.execute(
                        "UPDATE queue SET visible_at = ?2, receipt = NULL WHERE receipt LIKE ?1 AND dead = 0",
                        params![prefix, now_ms as i64],
                    )
                    .map_err(db_err)?;
                    tx.execute("DELETE FROM instances WHERE id = ?1", params![id])
                        .map_err(db_err)?;
                    dead.push(id);
                }
            }
            tx.commit().map_err(db_err)?;
            Ok(dead)
        })
        .await
    }
}

/// Whether a process with this pid runs on this machine. Without /proc (not Linux) only the
/// heartbeat tells, so every process counts as alive here.
fn process_alive(pid: i64) -> bool {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    pid == i64::from(std::process::id()) || proc.join(pid.to_string()).exists()
}

fn db_err(e: rusqlite::Error) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            StoreError::Transient(e.to_string())
        }
        other => StoreError::Permanent(other.to_string()),
    }
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Permanent(format!("stored JSON is invalid: {e}"))
}

fn encode_cursor(created_at: &str, image_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_at}\n{image_id}"))
}

fn decode_cursor(cursor: &str) -> StoreResult<(String, String)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| StoreError::InvalidInput("invalid cursor".into()))?;
    let text =
        String::from_utf8(raw).map_err(|_| StoreError::InvalidInput("invalid cursor".into()))?;
    let (a, b) = text
        .split_once('\n')
        .ok_or_else(|| StoreError::InvalidInput("invalid cursor".into()))?;
    Ok((a.to_string(), b.to_string()))
}

/// Repository over [`SqliteDb`].
#[derive(Clone)]
pub struct SqliteRepository {
    db: SqliteDb,
    /// The [`SqliteQueue`] in the same database that jobs go to, when there is one: a queued
    /// record and its job message are then written in one transaction.
    job_queue: Option<String>,
}

impl SqliteRepository {
    pub fn new(db: SqliteDb) -> SqliteRepository {
        SqliteRepository {
            db,
            job_queue: None,
        }
    }

    /// A repository whose `put_queued` also enqueues the job on `queue` (a [`SqliteQueue`] of
    /// the same name in the same database), atomically with the record.
    pub fn with_job_queue(db: SqliteDb, queue: &str) -> SqliteRepository {
        SqliteRepository {
            db,
            job_queue: Some(queue.to_string()),
        }
    }
}

/// The guard of every record write: never over a result, and once a record has an original,
/// only that original may rewrite it. Ok(Err(refusal)), or Ok(Ok(record to write)): the new
/// record, keeping the money already booked on the stored one.
fn guard_write(tx: &Connection, rec: &ImageRecord) -> StoreResult<Result<ImageRecord, PutImage>> {
    let stored = load_image(tx, &rec.tenant, &rec.image_id)?;
    Ok(match stored {
        Some(stored) if stored.result.is_some() => Err(PutImage::HasResult),
        Some(stored)
            if stored.original_sha256.is_some()
                && stored.original_sha256 != rec.original_sha256 =>
        {
            Err(PutImage::OtherUpload)
        }
        Some(stored) => {
            let mut rec = rec.clone();
            rec.extra_spend = rec.extra_spend.or(stored.extra_spend);
            Ok(rec)
        }
        None => Ok(rec.clone()),
    })
}

/// The image a job message is for (`tenant/image_id`), when the body names one.
fn job_ref(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(format!(
        "{}/{}",
        v.get("tenant")?.as_str()?,
        v.get("image_id")?.as_str()?
    ))
}

/// Enqueue a message, unless it is a job for an image that already has a live (not dead,
/// not deleted) message on this queue: that one will be delivered, so a re-send (the
/// reconciler's, a retried ingest's) adds nothing but load. Returns whether it was added.
fn insert_message(tx: &Connection, queue: &str, body: &str, now_ms: i64) -> StoreResult<bool> {
    let job = job_ref(body);
    if let Some(r) = &job {
        let live: bool = tx
            .prepare_cached("SELECT 1 FROM queue WHERE queue = ?1 AND ref = ?2 AND dead = 0")
            .and_then(|mut st| st.exists(params![queue, r]))
            .map_err(db_err)?;
        if live {
            return Ok(false);
        }
    }
    tx.execute(
        "INSERT INTO queue (queue, message_id, body, visible_at, sent_at, ref) VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
        params![queue, uuid::Uuid::new_v4().to_string(), body, now_ms, job],
    )
    .map_err(db_err)?;
    Ok(true)
}

fn load_image(conn: &Connection, tenant: &str, image_id: &str) -> StoreResult<Option<ImageRecord>> {
    let doc: Option<String> = conn
        .query_row(
            "SELECT doc FROM images WHERE tenant = ?1 AND image_id = ?2",
            params![tenant, image_id],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?;
    doc.map(|d| serde_json::from_str(&d).map_err(json_err))
        .transpose()
}

/// Write a record; `recheck_at` is the reconciler's next look (None: none).
fn store_image(conn: &Connection, rec: &ImageRecord, recheck_at: Option<u64>) -> StoreResult<()> {
    let doc = serde_json::to_string(rec).map_err(json_err)?;
    conn.execute(
        "INSERT INTO images (tenant, image_id, status, created_at, doc, recheck_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (tenant, image_id) DO UPDATE SET status = ?3, created_at = ?4, doc = ?5, recheck_at = ?6",
        params![
            rec.tenant,
            rec.image_id,
            rec.status.as_str(),
            rec.created_at,
            doc,
            recheck_at.map(|v| v as i64)
        ],
    )
    .map_err(db_err)?;
    Ok(())
}

/// The idempotency entry of a finished answer (ends any in-flight claim on its key).
fn cache_done(conn: &Connection, result: &AnalysisResult) -> StoreResult<()> {
    let doc = serde_json::to_string(result).map_err(json_err)?;
    conn.execute(
        "INSERT INTO idempotency (key, state, result) VALUES (?1, 'done', ?2)
         ON CONFLICT (key) DO UPDATE SET state = 'done', owner = NULL, lease_until = NULL, result = ?2",
        params![result.idempotency_key, doc],
    )
    .map_err(db_err)?;
    Ok(())
}

/// Rewrite a record's document alone (its recheck time stays as it is).
fn store_doc(conn: &Connection, rec: &ImageRecord) -> StoreResult<()> {
    let doc = serde_json::to_string(rec).map_err(json_err)?;
    conn.execute(
        "UPDATE images SET doc = ?3, status = ?4 WHERE tenant = ?1 AND image_id = ?2",
        params![rec.tenant, rec.image_id, doc, rec.status.as_str()],
    )
    .map_err(db_err)?;
    Ok(())
}

/// What one ledger row gains.
struct LedgerAdd<'a> {
    tenant: &'a str,
    day: &'a str,
    model: &'a str,
    images: i64,
    cached_images: i64,
    calls: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost_usd: f64,
    estimated_cost_usd: f64,
    calls_at_estimate: i64,
    cost_at_estimate_usd: f64,
    /// The money came through the batch lane (it also counts in the batch columns).
    batch: bool,
    /// A near-duplicate's reused analysis (it also counts in the reuse columns).
    reused: bool,
    saved_usd: f64,
    kind: LedgerKind,
}

fn add_to_ledger(conn: &Connection, a: &LedgerAdd<'_>) -> StoreResult<()> {
    let (batch_images, batch_calls, batch_cost, batch_saved) = if a.batch {
        (a.images, a.calls, a.cost_usd, a.saved_usd)
    } else {
        (0, 0, 0.0, 0.0)
    };
    let (reused_images, reused_saved) = if a.reused {
        (a.images, a.saved_usd)
    } else {
        (0, 0.0)
    };
    conn.execute(
        "INSERT INTO ledger (tenant, day, model, images, cached_images, calls, input_tokens, output_tokens,
                             cost_usd, estimated_cost_usd, calls_at_estimate, cost_at_estimate_usd,
                             batch_images, batch_calls, batch_cost_usd, batch_saved_usd,
                             kind, reused_images, reused_saved_usd)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)
         ON CONFLICT (tenant, day, model) DO UPDATE SET
           images = images + ?4, cached_images = cached_images + ?5, calls = calls + ?6,
           input_tokens = input_tokens + ?7, output_tokens = output_tokens + ?8,
           cost_usd = cost_usd + ?9, estimated_cost_usd = estimated_cost_usd + ?10,
           calls_at_estimate = calls_at_estimate + ?11, cost_at_estimate_usd = cost_at_estimate_usd + ?12,
           batch_images = batch_images + ?13, batch_calls = batch_calls + ?14,
           batch_cost_usd = batch_cost_usd + ?15, batch_saved_usd = batch_saved_usd + ?16,
           kind = ?17, reused_images = reused_images + ?18,
           reused_saved_usd = reused_saved_usd + ?19",
        params![
            a.tenant,
            a.day,
            a.model,
            a.images,
            a.cached_images,
            a.calls,
            a.input_tokens,
            a.output_tokens,
            a.cost_usd,
            a.estimated_cost_usd,
            a.calls_at_estimate,
            a.cost_at_estimate_usd,
            batch_images,
            batch_calls,
            batch_cost,
            batch_saved,
            a.kind.as_str(),
            reused_images,
            reused_saved
        ],
    )
    .map_err(db_err)?;
    Ok(())
}

/// Spent (ledger) and live held money of a tenant for `periods`. Spent comes from the ledger
/// rows themselves, which only the booking transactions write: it is exact by construction.
fn budget_counts_in(
    conn: &Connection,
    tenant: &str,
    periods: &Periods,
    now_ms: u64,
) -> StoreResult<BudgetCounts> {
    let month_days = format!("{}-%", periods.month);
    let (spent_day, spent_month): (f64, f64) = conn
        .query_row(
            "SELECT COALESCE(SUM(CASE WHEN day = ?2 THEN cost_usd ELSE 0 END), 0),
                    COALESCE(SUM(cost_usd), 0)
             FROM ledger WHERE tenant = ?1 AND day LIKE ?3",
            params![tenant, periods.day, month_days],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db_err)?;
    let (held_day, held_month): (f64, f64) = conn
        .query_row(
            "SELECT COALESCE(SUM(CASE WHEN day = ?2 THEN amount_usd ELSE 0 END), 0),
                    COALESCE(SUM(amount_usd), 0)
             FROM budget_holds WHERE tenant = ?1 AND month = ?3 AND expires_ms > ?4",
            params![tenant, periods.day, periods.month, now_ms as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(db_err)?;
    Ok(BudgetCounts {
        day: Counted {
            spent_usd: spent_day,
            reserved_usd: held_day,
        },
        month: Counted {
            spent_usd: spent_month,
            reserved_usd: held_month,
        },
    })
}

mod batch;
mod generation;
mod vectors;

pub use vectors::SqliteVectorStore;

#[async_trait]
impl Repository for SqliteRepository {
    async fn put_image(
        &self,
        record: &ImageRecord,
        recheck_at_ms: Option<u64>,
    ) -> StoreResult<PutImage> {
        let rec = record.clone();
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                // A late resize retry never wipes an analysis that landed in between.
                let outcome = match guard_write(&tx, &rec)? {
                    Err(refused) => refused,
                    Ok(rec) => {
                        store_image(&tx, &rec, recheck_at_ms)?;
                        PutImage::Stored
                    }
                };
                tx.commit().map_err(db_err)?;
                Ok(outcome)
            })
            .await
    }

    async fn put_queued(
        &self,
        record: &ImageRecord,
        job_body: &str,
        now_ms: u64,
        recheck_unsent_ms: u64,
        recheck_sent_ms: u64,
    ) -> StoreResult<(PutImage, JobDelivery)> {
        let Some(queue) = self.job_queue.clone() else {
            let put = self.put_image(record, Some(recheck_unsent_ms)).await?;
            return Ok((put, JobDelivery::SendIt));
        };
        let (rec, body) = (record.clone(), job_body.to_string());
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let outcome = match guard_write(&tx, &rec)? {
                    Err(refused) => refused,
                    Ok(rec) => {
                        store_image(&tx, &rec, Some(recheck_sent_ms))?;
                        insert_message(&tx, &queue, &body, now_ms as i64)?;
                        PutImage::Stored
                    }
                };
                tx.commit().map_err(db_err)?;
                Ok((outcome, JobDelivery::Delivered))
            })
            .await
    }

    async fn get_image(&self, tenant: &str, image_id: &str) -> StoreResult<Option<ImageRecord>> {
        let (t, i) = (tenant.to_string(), image_id.to_string());
        self.db.with(move |c| load_image(c, &t, &i)).await
    }

    async fn list_images(
        &self,
        tenant: &str,
        status: Option<ImageStatus>,
        limit: usize,
        cursor: Option<&str>,
    ) -> StoreResult<ImagePage> {
        let tenant = tenant.to_string();
        let after = cursor.map(decode_cursor).transpose()?;
        let limit = limit.clamp(1, 1000);
        self.db
            .with(move |c| {
                let (ca, id) = after.unwrap_or_else(|| ("\u{10FFFF}".into(), String::new()));
                let status = status.map(|s| s.as_str().to_string());
                let mut stmt = c
                    .prepare(
                        "SELECT doc, created_at, image_id FROM images
                         WHERE tenant = ?1 AND (?2 IS NULL OR status = ?2)
                           AND (created_at < ?3 OR (created_at = ?3 AND image_id < ?4))
                         ORDER BY created_at DESC, image_id DESC LIMIT ?5",
                    )
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(params![tenant, status, ca, id, (limit + 1) as i64], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                        ))
                    })
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                let more = rows.len() > limit;
                let mut images = Vec::with_capacity(limit);
                let mut last = None;
                for (doc, created, id) in rows.into_iter().take(limit) {
                    images.push(serde_json::from_str(&doc).map_err(json_err)?);
                    last = Some((created, id));
                }
                let next_cursor = match (more, last) {
                    (true, Some((c, i))) => Some(encode_cursor(&c, &i)),
                    _ => None,
                };
                Ok(ImagePage {
                    images,
                    next_cursor,
                })
            })
            .await
    }

    async fn mark_failed(
        &self,
        tenant: &str,
        image_id: &str,
        error: &str,
        failure: Failure,
        now: &str,
    ) -> StoreResult<()> {
        let (t, i, e, now) = (
            tenant.to_string(),
            image_id.to_string(),
            error.to_string(),
            now.to_string(),
        );
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                if let Some(mut rec) = load_image(&tx, &t, &i)? {
                    if rec.status != ImageStatus::Done {
                        rec.status = ImageStatus::Failed;
                        rec.error = Some(e);
                        rec.permanent_failure = failure == Failure::Permanent;
                        rec.updated_at = now;
                        store_image(&tx, &rec, None)?;
                    }
                }
                tx.commit().map_err(db_err)
            })
            .await
    }

    async fn set_recheck(
        &self,
        tenant: &str,
        image_id: &str,
        recheck_at_ms: Option<u64>,
    ) -> StoreResult<()> {
        let (t, i) = (tenant.to_string(), image_id.to_string());
        self.db
            .with(move |c| {
                c.execute(
                    "UPDATE images SET recheck_at = ?3 WHERE tenant = ?1 AND image_id = ?2",
                    params![t, i, recheck_at_ms.map(|v| v as i64)],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn due_rechecks(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<ImageRecord>> {
        let limit = limit.clamp(1, 1000) as i64;
        self.db
            .with(move |c| {
                let mut stmt = c
                    .prepare(
                        "SELECT doc FROM images WHERE recheck_at IS NOT NULL AND recheck_at <= ?1
                         ORDER BY recheck_at LIMIT ?2",
                    )
                    .map_err(db_err)?;
                let docs = stmt
                    .query_map(params![now_ms as i64, limit], |r| r.get::<_, String>(0))
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                docs.iter()
                    .map(|d| serde_json::from_str(d).map_err(json_err))
                    .collect()
            })
            .await
    }

    async fn expire_pending(&self, tenant: &str, image_id: &str) -> StoreResult<bool> {
        let (t, i) = (tenant.to_string(), image_id.to_string());
        self.db
            .with(move |c| {
                c.execute(
                    "DELETE FROM images WHERE tenant = ?1 AND image_id = ?2 AND status = 'pending'",
                    params![t, i],
                )
                .map(|n| n == 1)
                .map_err(db_err)
            })
            .await
    }

    async fn delete_image(&self, tenant: &str, image_id: &str) -> StoreResult<bool> {
        let (t, i) = (tenant.to_string(), image_id.to_string());
        self.db
            .with(move |c| {
                c.execute(
                    "DELETE FROM images WHERE tenant = ?1 AND image_id = ?2",
                    params![t, i],
                )
                .map(|n| n == 1)
                .map_err(db_err)
            })
            .await
    }

    async fn claim(
        &self,
        key: &str,
        owner: &str,
        lease: Duration,
        now_ms: u64,
    ) -> StoreResult<Claim> {
        let (key, owner) = (key.to_string(), owner.to_string());
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let row: Option<(String, Option<String>, Option<i64>, Option<String>)> = tx
                    .query_row(
                        "SELECT state, owner, lease_until, result FROM idempotency WHERE key = ?1",
                        params![key],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )
                    .optional()
                    .map_err(db_err)?;
                let until = now_ms.saturating_add(lease.as_millis() as u64) as i64;
                let claim = match row {
                    Some((state, _, _, Some(result))) if state == "done" => {
                        Claim::Cached(Box::new(serde_json::from_str(&result).map_err(json_err)?))
                    }
                    Some((_, Some(o), Some(lu), _)) if o != owner && lu > now_ms as i64 => {
                        Claim::Busy {
                            retry_in: Duration::from_millis((lu - now_ms as i64) as u64),
                        }
                    }
                    _ => {
                        tx.execute(
                            "INSERT INTO idempotency (key, state, owner, lease_until) VALUES (?1, 'inflight', ?2, ?3)
                             ON CONFLICT (key) DO UPDATE SET state = 'inflight', owner = ?2, lease_until = ?3",
                            params![key, owner, until],
                        )
                        .map_err(db_err)?;
                        Claim::Acquired
                    }
                };
                tx.commit().map_err(db_err)?;
                Ok(claim)
            })
            .await
    }

    async fn release_claim(&self, key: &str, owner: &str) -> StoreResult<()> {
        let (key, owner) = (key.to_string(), owner.to_string());
        self.db
            .with(move |c| {
                c.execute(
                    "DELETE FROM idempotency WHERE key = ?1 AND owner = ?2 AND state = 'inflight'",
                    params![key, owner],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn complete(
        &self,
        tenant: &str,
        image_id: &str,
        result: &AnalysisResult,
        estimated_cost_usd: f64,
    ) -> StoreResult<Completion> {
        let (t, i, result) = (tenant.to_string(), image_id.to_string(), result.clone());
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let Some(mut rec) = load_image(&tx, &t, &i)? else {
                    return Err(StoreError::NotFound(format!("image {t}/{i}")));
                };
                if rec.result.is_some() {
                    return Ok(Completion::AlreadyDone);
                }
                rec.status = ImageStatus::Done;
                rec.error = None;
                rec.updated_at = result.completed_at.clone();
                rec.result = Some(result.clone());
                store_image(&tx, &rec, None)?;
                if !result.cached {
                    cache_done(&tx, &result)?;
                }
                add_to_ledger(
                    &tx,
                    &LedgerAdd {
                        tenant: &t,
                        day: day_of(&result.completed_at),
                        model: &result.model,
                        images: 1,
                        cached_images: i64::from(result.cached),
                        calls: i64::from(result.calls),
                        input_tokens: result.usage.input_tokens as i64,
                        output_tokens: result.usage.output_tokens as i64,
                        cost_usd: result.cost_usd,
                        estimated_cost_usd,
                        calls_at_estimate: i64::from(result.usage_estimated),
                        cost_at_estimate_usd: result.cost_at_estimate_usd,
                        batch: !result.lane.is_realtime(),
                        saved_usd: result.saved_usd,
                        reused: result.reused_from.is_some(),
                        kind: LedgerKind::Analysis,
                    },
                )?;
                tx.commit().map_err(db_err)?;
                Ok(Completion::Stored)
            })
            .await
    }

    async fn cache_result(&self, result: &AnalysisResult) -> StoreResult<()> {
        let result = result.clone();
        self.db.with(move |c| cache_done(c, &result)).await
    }

    async fn book_spend(
        &self,
        tenant: &str,
        image_id: &str,
        spend_id: &str,
        spend: &Spend,
    ) -> StoreResult<()> {
        let (t, image, id, sp) = (
            tenant.to_string(),
            image_id.to_string(),
            spend_id.to_string(),
            spend.clone(),
        );
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let first = tx
                    .execute(
                        "INSERT INTO spends (spend_id, tenant) VALUES (?1, ?2) ON CONFLICT (spend_id) DO NOTHING",
                        params![id, t],
                    )
                    .map_err(db_err)?
                    == 1;
                if first {
                    add_to_ledger(
                        &tx,
                        &LedgerAdd {
                            tenant: &t,
                            day: &sp.day,
                            model: &sp.model,
                            images: 0,
                            cached_images: 0,
                            calls: sp.calls as i64,
                            input_tokens: sp.usage.input_tokens as i64,
                            output_tokens: sp.usage.output_tokens as i64,
                            cost_usd: sp.cost_usd,
                            estimated_cost_usd: 0.0,
                            calls_at_estimate: sp.calls_at_estimate as i64,
                            cost_at_estimate_usd: sp.cost_at_estimate_usd,
                            batch: !sp.lane.is_realtime(),
                            saved_usd: sp.saved_usd,
                            reused: false,
                            kind: sp.kind,
                        },
                    )?;
                    let on_image = sp.kind == LedgerKind::Analysis;
                    if let Some(mut rec) = load_image(&tx, &t, &image)?.filter(|_| on_image) {
                        rec.extra_spend
                            .get_or_insert_with(Default::default)
                            .add(&sp.as_extra());
                        store_doc(&tx, &rec)?;
                    }
                }
                tx.commit().map_err(db_err)
            })
            .await
    }

    async fn costs(&self, tenant: &str, from: &str, to: &str) -> StoreResult<Vec<CostRow>> {
        let (t, from, to) = (tenant.to_string(), from.to_string(), to.to_string());
        self.db
            .with(move |c| {
                let mut stmt = c
                    .prepare(
                        "SELECT day, model, images, cached_images, input_tokens, output_tokens, cost_usd,
                                estimated_cost_usd, calls, calls_at_estimate, cost_at_estimate_usd,
                                batch_images, batch_calls, batch_cost_usd, batch_saved_usd,
                                kind, reused_images, reused_saved_usd
                         FROM ledger WHERE tenant = ?1 AND day >= ?2 AND day <= ?3 ORDER BY day, model",
                    )
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(params![t, from, to], |r| {
                        Ok(CostRow {
                            day: r.get(0)?,
                            model: r.get(1)?,
                            images: r.get::<_, i64>(2)? as u64,
                            cached_images: r.get::<_, i64>(3)? as u64,
                            input_tokens: r.get::<_, i64>(4)? as u64,
                            output_tokens: r.get::<_, i64>(5)? as u64,
                            cost_usd: r.get(6)?,
                            estimated_cost_usd: r.get(7)?,
                            calls: r.get::<_, i64>(8)? as u64,
                            calls_at_estimate: r.get::<_, i64>(9)? as u64,
                            cost_at_estimate_usd: r.get(10)?,
                            batch_images: r.get::<_, i64>(11)? as u64,
                            batch_calls: r.get::<_, i64>(12)? as u64,
                            batch_cost_usd: r.get(13)?,
                            batch_saved_usd: r.get(14)?,
                            kind: LedgerKind::parse(&r.get::<_, String>(15)?),
                            reused_images: r.get::<_, i64>(16)? as u64,
                            reused_saved_usd: r.get(17)?,
                        })
                    })
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                Ok(rows)
            })
            .await
    }

    async fn reserve_budget(
        &self,
        tenant: &str,
        periods: &Periods,
        amount: f64,
        caps: &BudgetCaps,
        now_ms: u64,
        expires_ms: u64,
    ) -> StoreResult<BudgetHold> {
        let (t, p, caps) = (tenant.to_string(), periods.clone(), *caps);
        self.db
            .with(move |c| {
                // One write transaction: no other reservation or booking interleaves.
                let tx = write_tx(c)?;
                tx.execute(
                    "DELETE FROM budget_holds WHERE tenant = ?1 AND expires_ms <= ?2",
                    params![t, now_ms as i64],
                )
                .map_err(db_err)?;
                let counts = budget_counts_in(&tx, &t, &p, now_ms)?;
                if let Some(period) = budget::refusing(&caps, counts.day, counts.month) {
                    return Ok(BudgetHold::Over(period));
                }
                let id = uuid::Uuid::new_v4().simple().to_string();
                tx.execute(
                    "INSERT INTO budget_holds (id, tenant, day, month, amount_usd, expires_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![id, t, p.day, p.month, amount, expires_ms as i64],
                )
                .map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                Ok(BudgetHold::Reserved(id))
            })
            .await
    }

    async fn settle_budget(&self, tenant: &str, _periods: &Periods, id: &str) -> StoreResult<()> {
        let (t, id) = (tenant.to_string(), id.to_string());
        self.db
            .with(move |c| {
                c.execute(
                    "DELETE FROM budget_holds WHERE id = ?1 AND tenant = ?2",
                    params![id, t],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn budget_counts(
        &self,
        tenant: &str,
        periods: &Periods,
        now_ms: u64,
    ) -> StoreResult<BudgetCounts> {
        let (t, p) = (tenant.to_string(), periods.clone());
        self.db
            .with(move |c| budget_counts_in(c, &t, &p, now_ms))
            .await
    }

    async fn tenant_budget(&self, tenant: &str) -> StoreResult<Option<BudgetCaps>> {
        let t = tenant.to_string();
        self.db
            .with(move |c| {
                c.query_row(
                    "SELECT daily_usd, monthly_usd FROM budgets WHERE tenant = ?1",
                    params![t],
                    |r| {
                        Ok(BudgetCaps {
                            daily_usd: r.get(0)?,
                            monthly_usd: r.get(1)?,
                        })
                    },
                )
                .optional()
                .map_err(db_err)
            })
            .await
    }

    async fn set_tenant_budget(&self, tenant: &str, caps: Option<&BudgetCaps>) -> StoreResult<()> {
        let (t, caps) = (tenant.to_string(), caps.copied());
        self.db
            .with(move |c| {
                match caps {
                    Some(caps) => c.execute(
                        "INSERT INTO budgets (tenant, daily_usd, monthly_usd) VALUES (?1, ?2, ?3)
                         ON CONFLICT (tenant) DO UPDATE SET daily_usd = ?2, monthly_usd = ?3",
                        params![t, caps.daily_usd, caps.monthly_usd],
                    ),
                    None => c.execute("DELETE FROM budgets WHERE tenant = ?1", params![t]),
                }
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn add_api_key(
        &self,
        key_sha256: &str,
        tenant: &str,
        created_at: &str,
    ) -> StoreResult<()> {
        let (k, t, at) = (
            key_sha256.to_string(),
            tenant.to_string(),
            created_at.to_string(),
        );
        self.db
            .with(move |c| {
                c.execute(
                    "INSERT INTO api_keys (key_sha256, tenant, created_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key_sha256) DO UPDATE SET tenant = ?2, created_at = ?3",
                    params![k, t, at],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn list_api_keys(&self, tenant: &str) -> StoreResult<Vec<ApiKeyInfo>> {
        let t = tenant.to_string();
        self.db
            .with(move |c| {
                let mut stmt = c
                    .prepare(
                        "SELECT key_sha256, tenant, created_at FROM api_keys WHERE tenant = ?1
                         ORDER BY created_at, key_sha256",
                    )
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(params![t], |r| {
                        Ok(ApiKeyInfo {
                            id: api_key_id(&r.get::<_, String>(0)?),
                            tenant: r.get(1)?,
                            created_at: r.get(2)?,
                        })
                    })
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                Ok(rows)
            })
            .await
    }

    async fn revoke_api_key(&self, tenant: &str, key_id: &str) -> StoreResult<bool> {
        let (t, id) = (tenant.to_string(), key_id.to_string());
        if id.len() != 12 {
            return Ok(false);
        }
        self.db
            .with(move |c| {
                c.execute(
                    "DELETE FROM api_keys WHERE tenant = ?1 AND substr(key_sha256, 1, 12) = ?2",
                    params![t, id],
                )
                .map(|n| n > 0)
                .map_err(db_err)
            })
            .await
    }

    async fn tenant_for_key(&self, key_sha256: &str) -> StoreResult<Option<String>> {
        let k = key_sha256.to_string();
        self.db
            .with(move |c| {
                c.query_row(
                    "SELECT tenant FROM api_keys WHERE key_sha256 = ?1",
                    params![k],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)
            })
            .await
    }
}

/// The shared rate limit: every process on the data dir reads and writes the one row of a key
/// inside one write transaction, so no two ops interleave.
#[async_trait]
impl RateLimitStore for SqliteRepository {
    async fn apply_limit(
        &self,
        key: &str,
        limits: &Limits,
        op: &LimitOp,
        clock: Arc<dyn Clock>,
    ) -> StoreResult<LimitOutcome> {
        let (key, limits, op) = (key.to_string(), *limits, *op);
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                // The write lock may have been waited for: the time is now, not before it.
                let now_ms = clock.now_ms();
                let mut state = tx
                    .query_row(
                        "SELECT requests_full_at, tokens_full_at, not_before FROM rate_limits
                         WHERE key = ?1",
                        params![key],
                        |r| {
                            Ok(LimitState {
                                requests_full_at_ms: r.get(0)?,
                                tokens_full_at_ms: r.get(1)?,
                                not_before_ms: r.get(2)?,
                            })
                        },
                    )
                    .optional()
                    .map_err(db_err)?
                    .unwrap_or_default();
                let outcome = state.apply(&limits, &op, now_ms);
                if outcome.changes_state() {
                    tx.execute(
                        "INSERT INTO rate_limits (key, requests_full_at, tokens_full_at, not_before)
                         VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (key) DO UPDATE SET requests_full_at = ?2,
                             tokens_full_at = ?3, not_before = ?4",
                        params![
                            key,
                            state.requests_full_at_ms,
                            state.tokens_full_at_ms,
                            state.not_before_ms
                        ],
                    )
                    .map_err(db_err)?;
                    tx.commit().map_err(db_err)?;
                }
                Ok(outcome)
            })
            .await
    }
}

/// A named queue in [`SqliteDb`] with SQS semantics.
#[derive(Clone)]
pub struct SqliteQueue {
    db: SqliteDb,
    name: String,
    /// Prefix of the receipts this queue hands out (`{instance}:{uuid}`), so messages held by
    /// a process that died can be made visible again.
    instance: String,
    /// Messages received more than this often go to the dead-letter state.
    max_receives: u32,
    clock: Arc<dyn Clock>,
}

/// A message that was moved to the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message_id: String,
    pub body: String,
    pub receive_count: u32,
}

impl SqliteQueue {
    pub fn new(db: SqliteDb, name: &str, max_receives: u32, clock: Arc<dyn Clock>) -> SqliteQueue {
        SqliteQueue {
            db,
            name: name.to_string(),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            max_receives: max_receives.max(1),
            clock,
        }
    }

    /// Name the instance whose receipts this queue hands out (see
    /// [`SqliteDb::recover_dead_instances`]).
    pub fn with_instance(mut self, instance: &str) -> SqliteQueue {
        self.instance = instance.to_string();
        self
    }

    /// Messages not yet deleted nor dead (visible or in flight).
    pub async fn depth(&self) -> StoreResult<u64> {
        let q = self.name.clone();
        self.db
            .with(move |c| {
                c.query_row(
                    "SELECT COUNT(*) FROM queue WHERE queue = ?1 AND dead = 0",
                    params![q],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n as u64)
                .map_err(db_err)
            })
            .await
    }

    pub async fn dead_letters(&self) -> StoreResult<Vec<DeadLetter>> {
        let q = self.name.clone();
        self.db
            .with(move |c| {
                let mut stmt = c
                    .prepare("SELECT message_id, body, receive_count FROM queue WHERE queue = ?1 AND dead = 1 ORDER BY seq")
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(params![q], |r| {
                        Ok(DeadLetter {
                            message_id: r.get(0)?,
                            body: r.get(1)?,
                            receive_count: r.get::<_, i64>(2)? as u32,
                        })
                    })
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                Ok(rows)
            })
            .await
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn send(&self, bodies: Vec<String>) -> StoreResult<()> {
        let q = self.name.clone();
        let now = self.clock.now_ms() as i64;
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                for body in bodies {
                    insert_message(&tx, &q, &body, now)?;
                }
                tx.commit().map_err(db_err)
            })
            .await
    }

    async fn receive(&self, max: usize, visibility: Duration) -> StoreResult<Vec<QueueMessage>> {
        let q = self.name.clone();
        let instance = self.instance.clone();
        let now = self.clock.now_ms() as i64;
        let max_receives = i64::from(self.max_receives);
        let hide_until = now + visibility.as_millis() as i64;
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let candidates: Vec<(i64, String, String, i64)> = {
                    let mut stmt = tx
                        .prepare(
                            "SELECT seq, message_id, body, receive_count FROM queue
                             WHERE queue = ?1 AND dead = 0 AND visible_at <= ?2 ORDER BY visible_at, seq LIMIT ?3",
                        )
                        .map_err(db_err)?;
                    let rows = stmt
                        .query_map(params![q, now, (max.clamp(1, 10) * 4) as i64], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                        })
                        .map_err(db_err)?
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(db_err)?;
                    rows
                };
                let mut out = Vec::new();
                for (seq, message_id, body, count) in candidates {
                    if count >= max_receives {
                        // Like SQS redrive: received maxReceiveCount times and not deleted → DLQ.
                        tx.execute("UPDATE queue SET dead = 1, receipt = NULL WHERE seq = ?1", params![seq])
                            .map_err(db_err)?;
                        continue;
                    }
                    if out.len() >= max.clamp(1, 10) {
                        break;
                    }
                    let receipt = format!("{instance}:{}", uuid::Uuid::new_v4().simple());
                    tx.execute(
                        "UPDATE queue SET receive_count = receive_count + 1, visible_at = ?2, receipt = ?3 WHERE seq = ?1",
                        params![seq, hide_until, receipt],
                    )
                    .map_err(db_err)?;
                    out.push(QueueMessage {
                        message_id,
                        receipt,
                        body,
                        receive_count: (count + 1) as u32,
                    });
                }
                tx.commit().map_err(db_err)?;
                Ok(out)
            })
            .await
    }

    async fn delete(&self, receipt: &str) -> StoreResult<()> {
        let (q, r) = (self.name.clone(), receipt.to_string());
        self.db
            .with(move |c| {
                c.execute(
                    "DELETE FROM queue WHERE queue = ?1 AND receipt = ?2",
                    params![q, r],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn retry_after(&self, receipt: &str, delay: Duration) -> StoreResult<()> {
        let (q, r) = (self.name.clone(), receipt.to_string());
        let at = self.clock.now_ms() as i64 + delay.as_millis() as i64;
        self.db
            .with(move |c| {
                c.execute(
                    "UPDATE queue SET visible_at = ?3 WHERE queue = ?1 AND receipt = ?2 AND dead = 0",
                    params![q, r, at],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    struct ManualClock(AtomicU64);
    impl Clock for ManualClock {
        fn now_ms(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn queue(max_receives: u32) -> (SqliteQueue, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock(AtomicU64::new(1_000_000)));
        let db = SqliteDb::in_memory().unwrap();
        (
            SqliteQueue::new(db, "q", max_receives, clock.clone()),
            clock,
        )
    }

    #[test]
    fn processes_opening_a_new_data_dir_at_once_all_get_the_whole_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sightline.db");
        // Separate connections race as separate processes do (each its own schema check).
        let openers: Vec<_> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || SqliteDb::open(&path).map(|_| ()))
            })
            .collect();
        for o in openers {
            if let Err(e) = o.join().unwrap() {
                panic!("an opener failed: {e:#}");
            }
        }
        let db = SqliteDb::open(&path).unwrap();
        let conn = db.conn.lock().unwrap();
        for (table, column, _) in ADDED_COLUMNS {
            let present: bool = conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
                ))
                .unwrap()
                .exists(params![column])
                .unwrap();
            assert!(present, "{table}.{column}");
        }
    }

    #[tokio::test]
    async fn visibility_timeout_hides_then_redelivers_with_counts() {
        let (q, clock) = queue(5);
        q.send(vec!["a".into(), "b".into(), "c".into()])
            .await
            .unwrap();
        let first = q.receive(2, Duration::from_secs(30)).await.unwrap();
        assert_eq!(first.len(), 2, "batch size is honoured");
        assert!(first.iter().all(|m| m.receive_count == 1));
        let rest = q.receive(10, Duration::from_secs(30)).await.unwrap();
        assert_eq!(rest.len(), 1);
        assert!(
            q.receive(10, Duration::from_secs(30))
                .await
                .unwrap()
                .is_empty(),
            "in flight = invisible"
        );
        // Deleted messages are gone; the others come back after the timeout with count 2.
        q.delete(&first[0].receipt).await.unwrap();
        clock.0.fetch_add(30_001, Ordering::SeqCst);
        let again = q.receive(10, Duration::from_secs(30)).await.unwrap();
        let mut bodies: Vec<_> = again.iter().map(|m| m.body.as_str()).collect();
        bodies.sort();
        assert_eq!(bodies.len(), 2);
        assert!(!bodies.contains(&first[0].body.as_str()));
        assert!(again.iter().all(|m| m.receive_count == 2));
        assert_eq!(q.depth().await.unwrap(), 2);
        // A stale receipt from the first delivery no longer deletes anything.
        q.delete(&first[1].receipt).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), 2);
    }

    #[tokio::test]
    async fn retry_after_delays_redelivery() {
        let (q, clock) = queue(5);
        q.send(vec!["x".into()]).await.unwrap();
        let m = q
            .receive(1, Duration::from_secs(300))
            .await
            .unwrap()
            .remove(0);
        q.retry_after(&m.receipt, Duration::from_secs(2))
            .await
            .unwrap();
        clock.0.fetch_add(1_000, Ordering::SeqCst);
        assert!(q
            .receive(1, Duration::from_secs(300))
            .await
            .unwrap()
            .is_empty());
        clock.0.fetch_add(1_001, Ordering::SeqCst);
        let m = q.receive(1, Duration::from_secs(300)).await.unwrap();
        assert_eq!(m[0].receive_count, 2);
    }

    #[tokio::test]
    async fn dead_letter_after_max_receives() {
        let (q, clock) = queue(3);
        q.send(vec!["poison".into()]).await.unwrap();
        for n in 1..=3 {
            let m = q.receive(1, Duration::from_secs(1)).await.unwrap();
            assert_eq!(m[0].receive_count, n);
            clock.0.fetch_add(1_001, Ordering::SeqCst);
        }
        assert!(q
            .receive(1, Duration::from_secs(1))
            .await
            .unwrap()
            .is_empty());
        let dead = q.dead_letters().await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].body.as_str(), dead[0].receive_count),
            ("poison", 3)
        );
        assert_eq!(q.depth().await.unwrap(), 0);
    }

    #[tokio::test]
    async fn claims_and_messages_of_a_dead_process_are_given_back() {
        let clock = Arc::new(ManualClock(AtomicU64::new(1_000_000)));
        let db = SqliteDb::in_memory().unwrap();
        let repo = SqliteRepository::new(db.clone());
        let dead_q = SqliteQueue::new(db.clone(), "q", 5, clock.clone()).with_instance("dead");
        let live_q = SqliteQueue::new(db.clone(), "q", 5, clock.clone()).with_instance("live");
        db.heartbeat("dead", 1_000_000).await.unwrap();
        db.heartbeat("live", 1_000_000).await.unwrap();
        // A pid that cannot exist stands for a process killed with -9.
        db.with(|c| {
            c.execute(
                "UPDATE instances SET pid = 2147483646 WHERE id = 'dead'",
                [],
            )
            .map_err(db_err)
            .map(|_| ())
        })
        .await
        .unwrap();
        dead_q.send(vec!["a".into(), "b".into()]).await.unwrap();
        let held = dead_q.receive(1, Duration::from_secs(300)).await.unwrap();
        assert!(held[0].receipt.starts_with("dead:"));
        let lease = Duration::from_secs(300);
        assert_eq!(
            repo.claim("k1", "dead:h1", lease, 1_000_000).await.unwrap(),
            Claim::Acquired
        );
        assert_eq!(
            repo.claim("k2", "live:h2", lease, 1_000_000).await.unwrap(),
            Claim::Acquired
        );
        // Generation claims: an image the dead process was making, one the live one is.
        use crate::ports::{GenClaim, GenerationStore};
        for (key, owner) in [("g1", "dead:h5"), ("g2", "live:h6")] {
            assert_eq!(
                repo.claim_generation("acme", key, owner, lease, 1_000_000)
                    .await
                    .unwrap(),
                GenClaim::Acquired
            );
        }
        let gone = db
            .recover_dead_instances("live", 1_000_100, 30_000)
            .await
            .unwrap();
        assert_eq!(gone, vec!["dead".to_string()]);
        // The dead process's claim is free now, the live one's is not.
        assert_eq!(
            repo.claim("k1", "live:h3", lease, 1_000_200).await.unwrap(),
            Claim::Acquired
        );
        assert!(matches!(
            repo.claim("k2", "live:h4", lease, 1_000_200).await.unwrap(),
            Claim::Busy { .. }
        ));
        assert_eq!(
            repo.claim_generation("acme", "g1", "live:h7", lease, 1_000_200)
                .await
                .unwrap(),
            GenClaim::Acquired
        );
        assert!(matches!(
            repo.claim_generation("acme", "g2", "live:h8", lease, 1_000_200)
                .await
                .unwrap(),
            GenClaim::Busy { .. }
        ));
        // Its received message is visible again at once, not after 300 s.
        clock.0.store(1_000_200, Ordering::SeqCst);
        let got = live_q.receive(10, Duration::from_secs(300)).await.unwrap();
        let mut bodies: Vec<_> = got.iter().map(|m| m.body.as_str()).collect();
        bodies.sort();
        assert_eq!(bodies, vec!["a", "b"]);
        // A live process with a fresh heartbeat is left alone; a silent one is not.
        assert!(db
            .recover_dead_instances("dead", 1_000_300, 30_000)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            db.recover_dead_instances("x", 1_040_000, 30_000)
                .await
                .unwrap(),
            vec!["live".to_string()]
        );
    }

    #[tokio::test]
    async fn a_job_is_not_queued_twice_while_one_for_its_image_is_live() {
        let (q, clock) = queue(2);
        let job = r#"{"v":1,"tenant":"t","image_id":"i","resized_key":"k"}"#.to_string();
        q.send(vec![job.clone(), job.clone()]).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), 1, "the re-send is a no-op");
        // In flight is still live.
        let m = q
            .receive(1, Duration::from_secs(1))
            .await
            .unwrap()
            .remove(0);
        q.send(vec![job.clone()]).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), 1);
        // Deleted (done) or dead-lettered: a re-send queues it again.
        q.delete(&m.receipt).await.unwrap();
        q.send(vec![job.clone()]).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), 1);
        for _ in 0..3 {
            clock.0.fetch_add(1_001, Ordering::SeqCst);
            let _ = q.receive(1, Duration::from_secs(1)).await.unwrap();
        }
        assert_eq!(q.dead_letters().await.unwrap().len(), 1);
        q.send(vec![job]).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), 1);
        // Bodies that name no image are never held back.
        q.send(vec!["x".into(), "x".into()]).await.unwrap();
        assert_eq!(q.depth().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn an_upload_token_is_bound_to_the_content_of_its_first_use() {
        let db = SqliteDb::in_memory().unwrap();
        let use_it = |sha: &'static str, now: u64| {
            let db = db.clone();
            async move { db.use_upload_token("n1", sha, 10_000, now).await.unwrap() }
        };
        assert_eq!(use_it("aa", 1).await, TokenUse::First);
        assert_eq!(use_it("aa", 2).await, TokenUse::SameContent);
        assert_eq!(use_it("bb", 3).await, TokenUse::OtherContent);
        // Expired tokens are forgotten (their URL no longer verifies anyway).
        assert_eq!(use_it("bb", 10_001).await, TokenUse::First);
    }
}
