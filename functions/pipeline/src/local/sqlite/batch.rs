//! The batch lane's state in SQLite: items by `custom_id` (the `batch_id` column says which
//! batch holds one; NULL while pending) and batch records. Each step is one transaction.

use super::{db_err, json_err, write_tx, SqliteRepository};
use crate::ports::{
    BatchItem, BatchRecord, BatchStore, BatchWaiter, Enqueued, ItemEnd, StoreResult,
};
use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use sightline_core::model::AnalysisResult;

fn cached_in(conn: &Connection, key: &str) -> StoreResult<Option<AnalysisResult>> {
    let doc: Option<String> = conn
        .query_row(
            "SELECT result FROM idempotency WHERE key = ?1 AND state = 'done'",
            params![key],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?
        .flatten();
    doc.map(|d| serde_json::from_str(&d).map_err(json_err))
        .transpose()
}

/// An item row: the document, with the columns that are authoritative put back into it.
fn item_of(doc: &str, batch_id: Option<String>, not_before_ms: i64) -> StoreResult<BatchItem> {
    let mut item: BatchItem = serde_json::from_str(doc).map_err(json_err)?;
    item.batch_id = batch_id;
    item.not_before_ms = not_before_ms.max(0) as u64;
    Ok(item)
}

fn load_item(conn: &Connection, custom_id: &str) -> StoreResult<Option<BatchItem>> {
    let row: Option<(String, Option<String>, i64)> = conn
        .query_row(
            "SELECT doc, batch_id, not_before_ms FROM batch_items WHERE custom_id = ?1",
            params![custom_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()
        .map_err(db_err)?;
    row.map(|(doc, b, nb)| item_of(&doc, b, nb)).transpose()
}

fn store_item(conn: &Connection, item: &BatchItem) -> StoreResult<()> {
    let doc = serde_json::to_string(item).map_err(json_err)?;
    conn.execute(
        "INSERT INTO batch_items (custom_id, batch_id, not_before_ms, created_ms, doc)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (custom_id) DO UPDATE SET batch_id = ?2, not_before_ms = ?3, doc = ?5",
        params![
            item.custom_id,
            item.batch_id,
            item.not_before_ms as i64,
            item.created_ms as i64,
            doc
        ],
    )
    .map_err(db_err)?;
    Ok(())
}

fn query_items(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> StoreResult<Vec<BatchItem>> {
    let mut stmt = conn.prepare(sql).map_err(db_err)?;
    let rows = stmt
        .query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(db_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)?;
    rows.into_iter()
        .map(|(doc, b, nb)| item_of(&doc, b, nb))
        .collect()
}

#[async_trait]
impl BatchStore for SqliteRepository {
    async fn enqueue_batch(&self, item: &BatchItem, waiter: &BatchWaiter) -> StoreResult<Enqueued> {
        let (item, waiter) = (item.clone(), waiter.clone());
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                if let Some(done) = cached_in(&tx, &item.key)? {
                    return Ok(Enqueued::Cached(Box::new(done)));
                }
                // An ended item (failed for good, its batch not purged yet) is no live request.
                let live = load_item(&tx, &item.custom_id)?.filter(|i| i.ended.is_none());
                let outcome = match live {
                    Some(existing) if existing.waiters.contains(&waiter) => {
                        Enqueued::AlreadyWaiting
                    }
                    Some(mut existing) => {
                        existing.waiters.push(waiter);
                        store_item(&tx, &existing)?;
                        Enqueued::Joined
                    }
                    None => {
                        let mut new = item;
                        new.batch_id = None;
                        new.ended = None;
                        new.waiters = vec![waiter];
                        store_item(&tx, &new)?;
                        Enqueued::Created
                    }
                };
                tx.commit().map_err(db_err)?;
                Ok(outcome)
            })
            .await
    }

    async fn cached_answer(&self, key: &str) -> StoreResult<Option<AnalysisResult>> {
        let key = key.to_string();
        self.db.with(move |c| cached_in(c, &key)).await
    }

    async fn pending_batch_items(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<BatchItem>> {
        self.db
            .with(move |c| {
                query_items(
                    c,
                    "SELECT doc, batch_id, not_before_ms FROM batch_items
                     WHERE batch_id IS NULL AND not_before_ms <= ?1
                     ORDER BY created_ms, custom_id LIMIT ?2",
                    // Clamped: `u64::MAX` ("whenever", the tick's count) would wrap to -1.
                    params![now_ms.min(i64::MAX as u64) as i64, limit as i64],
                )
            })
            .await
    }

    async fn batch_items(&self, batch_id: &str) -> StoreResult<Vec<BatchItem>> {
        let batch_id = batch_id.to_string();
        self.db
            .with(move |c| {
                query_items(
                    c,
                    "SELECT doc, batch_id, not_before_ms FROM batch_items
                     WHERE batch_id = ?1 ORDER BY created_ms, custom_id",
                    params![batch_id],
                )
            })
            .await
    }

    async fn assign_batch_items(
        &self,
        batch_id: &str,
        custom_ids: &[String],
    ) -> StoreResult<Vec<String>> {
        let (batch_id, ids) = (batch_id.to_string(), custom_ids.to_vec());
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let mut taken = Vec::with_capacity(ids.len());
                for id in ids {
                    let n = tx
                        .execute(
                            "UPDATE batch_items SET batch_id = ?2 WHERE custom_id = ?1 AND batch_id IS NULL",
                            params![id, batch_id],
                        )
                        .map_err(db_err)?;
                    if n == 1 {
                        taken.push(id);
                    }
                }
                tx.commit().map_err(db_err)?;
                Ok(taken)
            })
            .await
    }

    async fn release_batch_item(
        &self,
        custom_id: &str,
        batch_id: &str,
        count_attempt: bool,
        not_before_ms: u64,
    ) -> StoreResult<bool> {
        let (id, batch_id) = (custom_id.to_string(), batch_id.to_string());
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let Some(mut item) = load_item(&tx, &id)? else {
                    return Ok(false);
                };
                if item.batch_id.as_deref() != Some(batch_id.as_str()) {
                    return Ok(false);
                }
                item.batch_id = None;
                item.attempts += u32::from(count_attempt);
                item.not_before_ms = not_before_ms;
                store_item(&tx, &item)?;
                tx.commit().map_err(db_err)?;
                Ok(true)
            })
            .await
    }

    async fn end_batch_item(
        &self,
        custom_id: &str,
        batch_id: &str,
        end: &ItemEnd,
    ) -> StoreResult<bool> {
        let (id, batch_id, end) = (custom_id.to_string(), batch_id.to_string(), end.clone());
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let Some(mut item) = load_item(&tx, &id)? else {
                    return Ok(false);
                };
                if item.batch_id.as_deref() != Some(batch_id.as_str()) || item.ended.is_some() {
                    return Ok(false);
                }
                item.ended = Some(end);
                store_item(&tx, &item)?;
                tx.commit().map_err(db_err)?;
                Ok(true)
            })
            .await
    }

    async fn drop_pending_item(&self, custom_id: &str) -> StoreResult<bool> {
        let id = custom_id.to_string();
        self.db
            .with(move |c| {
                let n = c
                    .execute(
                        "DELETE FROM batch_items WHERE custom_id = ?1 AND batch_id IS NULL",
                        params![id],
                    )
                    .map_err(db_err)?;
                Ok(n == 1)
            })
            .await
    }

    async fn defer_batch_item(&self, custom_id: &str, not_before_ms: u64) -> StoreResult<bool> {
        let id = custom_id.to_string();
        self.db
            .with(move |c| {
                let n = c
                    .execute(
                        "UPDATE batch_items SET not_before_ms = ?2 WHERE custom_id = ?1 AND batch_id IS NULL",
                        params![id, not_before_ms as i64],
                    )
                    .map_err(db_err)?;
                Ok(n == 1)
            })
            .await
    }

    async fn purge_batch(&self, batch_id: &str) -> StoreResult<()> {
        let batch_id = batch_id.to_string();
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let ended: Vec<String> = query_items(
                    &tx,
                    "SELECT doc, batch_id, not_before_ms FROM batch_items WHERE batch_id = ?1",
                    params![batch_id],
                )?
                .into_iter()
                .filter(|i| i.ended.is_some())
                .map(|i| i.custom_id)
                .collect();
                for id in ended {
                    tx.execute(
                        "DELETE FROM batch_items WHERE custom_id = ?1 AND batch_id = ?2",
                        params![id, batch_id],
                    )
                    .map_err(db_err)?;
                }
                tx.commit().map_err(db_err)
            })
            .await
    }

    async fn put_batch(&self, batch: &BatchRecord) -> StoreResult<()> {
        let batch = batch.clone();
        self.db
            .with(move |c| {
                let doc = serde_json::to_string(&batch).map_err(json_err)?;
                c.execute(
                    "INSERT INTO batches (batch_id, tenant, state, created_ms, doc) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (batch_id) DO UPDATE SET state = ?3, doc = ?5",
                    params![
                        batch.batch_id,
                        batch.tenant,
                        batch.state.as_str(),
                        batch.created_ms as i64,
                        doc
                    ],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn close_batch(&self, batch: &BatchRecord) -> StoreResult<bool> {
        let batch = batch.clone();
        self.db
            .with(move |c| {
                let doc = serde_json::to_string(&batch).map_err(json_err)?;
                let n = c
                    .execute(
                        "UPDATE batches SET state = ?2, doc = ?3
                         WHERE batch_id = ?1 AND state IN ('submitting', 'running')",
                        params![batch.batch_id, batch.state.as_str(), doc],
                    )
                    .map_err(db_err)?;
                Ok(n == 1)
            })
            .await
    }

    async fn get_batch(&self, batch_id: &str) -> StoreResult<Option<BatchRecord>> {
        let batch_id = batch_id.to_string();
        self.db
            .with(move |c| {
                let doc: Option<String> = c
                    .query_row(
                        "SELECT doc FROM batches WHERE batch_id = ?1",
                        params![batch_id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db_err)?;
                doc.map(|d| serde_json::from_str(&d).map_err(json_err))
                    .transpose()
            })
            .await
    }

    async fn list_batches(
        &self,
        tenant: Option<&str>,
        open_only: bool,
        limit: usize,
    ) -> StoreResult<Vec<BatchRecord>> {
        let tenant = tenant.map(str::to_string);
        self.db
            .with(move |c| {
                let mut stmt = c
                    .prepare(
                        "SELECT doc FROM batches
                         WHERE (?1 IS NULL OR tenant = ?1)
                           AND (?2 = 0 OR state IN ('submitting', 'running'))
                         ORDER BY created_ms DESC, batch_id DESC LIMIT ?3",
                    )
                    .map_err(db_err)?;
                let docs = stmt
                    .query_map(params![tenant, open_only, limit as i64], |r| {
                        r.get::<_, String>(0)
                    })
                    .map_err(db_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(db_err)?;
                docs.iter()
                    .map(|d| serde_json::from_str(d).map_err(json_err))
                    .collect()
            })
            .await
    }
}
