//! SQLite adapters: the repository (images, results, idempotency, ledger, API keys) and a
//! queue with SQS semantics (batch receive, visibility timeout, receive count, DLQ, delay).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use rusqlite::{params, Connection, OptionalExtension};
use sightline_core::model::{AnalysisResult, ImageRecord, ImageStatus};

use crate::ports::{
    day_of, Claim, Clock, Completion, CostRow, ImagePage, Queue, QueueMessage, Repository,
    StoreError, StoreResult,
};

const SCHEMA: &str = r#"
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
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
"#;

/// One SQLite database file holding everything local.
#[derive(Clone)]
pub struct SqliteDb {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteDb {
    pub fn open(path: &Path) -> anyhow::Result<SqliteDb> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    pub fn in_memory() -> anyhow::Result<SqliteDb> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> anyhow::Result<SqliteDb> {
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteDb {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Run a closure on the connection off the async threads.
    async fn with<T, F>(&self, f: F) -> StoreResult<T>
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
        .map_err(|_| StoreError::Permanent("invalid cursor".into()))?;
    let text =
        String::from_utf8(raw).map_err(|_| StoreError::Permanent("invalid cursor".into()))?;
    let (a, b) = text
        .split_once('\n')
        .ok_or_else(|| StoreError::Permanent("invalid cursor".into()))?;
    Ok((a.to_string(), b.to_string()))
}

/// Repository over [`SqliteDb`].
#[derive(Clone)]
pub struct SqliteRepository {
    db: SqliteDb,
}

impl SqliteRepository {
    pub fn new(db: SqliteDb) -> SqliteRepository {
        SqliteRepository { db }
    }
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

fn store_image(conn: &Connection, rec: &ImageRecord) -> StoreResult<()> {
    let doc = serde_json::to_string(rec).map_err(json_err)?;
    conn.execute(
        "INSERT INTO images (tenant, image_id, status, created_at, doc) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tenant, image_id) DO UPDATE SET status = ?3, created_at = ?4, doc = ?5",
        params![
            rec.tenant,
            rec.image_id,
            rec.status.as_str(),
            rec.created_at,
            doc
        ],
    )
    .map_err(db_err)?;
    Ok(())
}

#[async_trait]
impl Repository for SqliteRepository {
    async fn put_image(&self, record: &ImageRecord) -> StoreResult<()> {
        let rec = record.clone();
        self.db
            .with(move |c| {
                // A late resize retry never wipes an analysis that landed in between.
                let stored = load_image(c, &rec.tenant, &rec.image_id)?;
                if stored.is_some_and(|r| r.result.is_some()) {
                    return Ok(());
                }
                store_image(c, &rec)
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
                let tx = c.transaction().map_err(db_err)?;
                if let Some(mut rec) = load_image(&tx, &t, &i)? {
                    if rec.status != ImageStatus::Done {
                        rec.status = ImageStatus::Failed;
                        rec.error = Some(e);
                        rec.updated_at = now;
                        store_image(&tx, &rec)?;
                    }
                }
                tx.commit().map_err(db_err)
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
                let tx = c.transaction().map_err(db_err)?;
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
                let tx = c.transaction().map_err(db_err)?;
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
                store_image(&tx, &rec)?;
                if !result.cached {
                    let doc = serde_json::to_string(&result).map_err(json_err)?;
                    tx.execute(
                        "INSERT INTO idempotency (key, state, result) VALUES (?1, 'done', ?2)
                         ON CONFLICT (key) DO UPDATE SET state = 'done', owner = NULL, lease_until = NULL, result = ?2",
                        params![result.idempotency_key, doc],
                    )
                    .map_err(db_err)?;
                }
                let cached = i64::from(result.cached);
                tx.execute(
                    "INSERT INTO ledger (tenant, day, model, images, cached_images, input_tokens, output_tokens, cost_usd, estimated_cost_usd)
                     VALUES (?1, ?2, ?3, 1, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (tenant, day, model) DO UPDATE SET
                       images = images + 1, cached_images = cached_images + ?4,
                       input_tokens = input_tokens + ?5, output_tokens = output_tokens + ?6,
                       cost_usd = cost_usd + ?7, estimated_cost_usd = estimated_cost_usd + ?8",
                    params![
                        t,
                        day_of(&result.completed_at),
                        result.model,
                        cached,
                        result.usage.input_tokens as i64,
                        result.usage.output_tokens as i64,
                        result.cost_usd,
                        estimated_cost_usd
                    ],
                )
                .map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                Ok(Completion::Stored)
            })
            .await
    }

    async fn costs(&self, tenant: &str, from: &str, to: &str) -> StoreResult<Vec<CostRow>> {
        let (t, from, to) = (tenant.to_string(), from.to_string(), to.to_string());
        self.db
            .with(move |c| {
                let mut stmt = c
                    .prepare(
                        "SELECT day, model, images, cached_images, input_tokens, output_tokens, cost_usd, estimated_cost_usd
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
                        })
                    })
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                Ok(rows)
            })
            .await
    }

    async fn put_api_key(&self, key_sha256: &str, tenant: &str) -> StoreResult<()> {
        let (k, t) = (key_sha256.to_string(), tenant.to_string());
        self.db
            .with(move |c| {
                c.execute(
                    "INSERT INTO api_keys (key_sha256, tenant) VALUES (?1, ?2)
                     ON CONFLICT (key_sha256) DO UPDATE SET tenant = ?2",
                    params![k, t],
                )
                .map_err(db_err)?;
                Ok(())
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

/// A named queue in [`SqliteDb`] with SQS semantics.
#[derive(Clone)]
pub struct SqliteQueue {
    db: SqliteDb,
    name: String,
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
            max_receives: max_receives.max(1),
            clock,
        }
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
                let tx = c.transaction().map_err(db_err)?;
                for body in bodies {
                    tx.execute(
                        "INSERT INTO queue (queue, message_id, body, visible_at, sent_at) VALUES (?1, ?2, ?3, ?4, ?4)",
                        params![q, uuid::Uuid::new_v4().to_string(), body, now],
                    )
                    .map_err(db_err)?;
                }
                tx.commit().map_err(db_err)
            })
            .await
    }

    async fn receive(&self, max: usize, visibility: Duration) -> StoreResult<Vec<QueueMessage>> {
        let q = self.name.clone();
        let now = self.clock.now_ms() as i64;
        let max_receives = i64::from(self.max_receives);
        let hide_until = now + visibility.as_millis() as i64;
        self.db
            .with(move |c| {
                let tx = c.transaction().map_err(db_err)?;
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
                    let receipt = uuid::Uuid::new_v4().to_string();
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
}
