//! Generation jobs, rows, generated images and webhook deliveries in SQLite. Rows keep their
//! status and attempt in columns beside the document, so conditional updates are one
//! statement; each step is one transaction.

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sightline_core::genjob::{JobStatus, RowStatus};

use super::{db_err, json_err, write_tx, SqliteRepository};
use crate::ports::{
    DeliveryStatus, GenClaim, GeneratedObject, GenerationJob, GenerationRow, GenerationStore,
    StoreResult, WebhookDelivery,
};

fn to_doc<T: Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(json_err)
}

fn of_doc<T: DeserializeOwned>(doc: &str) -> StoreResult<T> {
    serde_json::from_str(doc).map_err(json_err)
}

fn docs<T: DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> StoreResult<Vec<T>> {
    let mut st = conn.prepare_cached(sql).map_err(db_err)?;
    let found: Vec<String> = st
        .query_map(args, |r| r.get(0))
        .map_err(db_err)?
        .collect::<Result<_, _>>()
        .map_err(db_err)?;
    found.iter().map(|d| of_doc(d)).collect()
}

fn store_row(conn: &Connection, row: &GenerationRow) -> StoreResult<()> {
    conn.execute(
        "INSERT INTO gen_rows (tenant, job_id, row, status, attempt, doc) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (tenant, job_id, row) DO UPDATE SET status = ?4, attempt = ?5, doc = ?6",
        params![
            row.tenant,
            row.job_id,
            row.row,
            row.status.as_str(),
            row.attempt,
            to_doc(row)?
        ],
    )
    .map_err(db_err)?;
    Ok(())
}

fn store_delivery(conn: &Connection, d: &WebhookDelivery) -> StoreResult<()> {
    conn.execute(
        "INSERT INTO webhook_deliveries (tenant, delivery_id, status, next_at, attempts, created_at, doc)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (tenant, delivery_id) DO UPDATE SET status = ?3, next_at = ?4, attempts = ?5, doc = ?7",
        params![
            d.tenant,
            d.delivery_id,
            d.status.as_str(),
            d.next_at_ms as i64,
            d.attempts,
            d.created_at,
            to_doc(d)?
        ],
    )
    .map_err(db_err)?;
    Ok(())
}

#[async_trait]
impl GenerationStore for SqliteRepository {
    async fn create_job(&self, job: &GenerationJob, rows: &[GenerationRow]) -> StoreResult<()> {
        let (job, rows) = (job.clone(), rows.to_vec());
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                tx.execute(
                    "INSERT INTO gen_jobs (tenant, job_id, status, created_at, doc) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![job.tenant, job.job_id, job.status.as_str(), job.created_at, to_doc(&job)?],
                )
                .map_err(db_err)?;
                for row in &rows {
                    store_row(&tx, row)?;
                }
                tx.commit().map_err(db_err)
            })
            .await
    }

    async fn get_job(&self, tenant: &str, job_id: &str) -> StoreResult<Option<GenerationJob>> {
        let (t, j) = (tenant.to_string(), job_id.to_string());
        self.db
            .with(move |c| {
                Ok(docs(
                    c,
                    "SELECT doc FROM gen_jobs WHERE tenant = ?1 AND job_id = ?2",
                    params![t, j],
                )?
                .pop())
            })
            .await
    }

    async fn list_jobs(&self, tenant: &str, limit: usize) -> StoreResult<Vec<GenerationJob>> {
        let t = tenant.to_string();
        self.db
            .with(move |c| {
                docs(
                    c,
                    "SELECT doc FROM gen_jobs WHERE tenant = ?1 ORDER BY created_at DESC, job_id DESC LIMIT ?2",
                    params![t, limit as i64],
                )
            })
            .await
    }

    async fn running_jobs(&self, limit: usize) -> StoreResult<Vec<GenerationJob>> {
        self.db
            .with(move |c| {
                docs(
                    c,
                    "SELECT doc FROM gen_jobs WHERE status = ?1 ORDER BY created_at LIMIT ?2",
                    params![JobStatus::Running.as_str(), limit as i64],
                )
            })
            .await
    }

    async fn rows(&self, tenant: &str, job_id: &str) -> StoreResult<Vec<GenerationRow>> {
        let (t, j) = (tenant.to_string(), job_id.to_string());
        self.db
            .with(move |c| {
                docs(
                    c,
                    "SELECT doc FROM gen_rows WHERE tenant = ?1 AND job_id = ?2 ORDER BY row",
                    params![t, j],
                )
            })
            .await
    }

    async fn get_row(
        &self,
        tenant: &str,
        job_id: &str,
        row: u32,
    ) -> StoreResult<Option<GenerationRow>> {
        let (t, j) = (tenant.to_string(), job_id.to_string());
        self.db
            .with(move |c| {
                Ok(docs(
                    c,
                    "SELECT doc FROM gen_rows WHERE tenant = ?1 AND job_id = ?2 AND row = ?3",
                    params![t, j, row],
                )?
                .pop())
            })
            .await
    }

    async fn update_row(
        &self,
        row: &GenerationRow,
        expected: (RowStatus, u32),
    ) -> StoreResult<bool> {
        let row = row.clone();
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let n = tx
                    .execute(
                        "UPDATE gen_rows SET status = ?4, attempt = ?5, doc = ?6
                         WHERE tenant = ?1 AND job_id = ?2 AND row = ?3 AND status = ?7 AND attempt = ?8",
                        params![
                            row.tenant,
                            row.job_id,
                            row.row,
                            row.status.as_str(),
                            row.attempt,
                            to_doc(&row)?,
                            expected.0.as_str(),
                            expected.1
                        ],
                    )
                    .map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                Ok(n == 1)
            })
            .await
    }

    async fn finish_job(
        &self,
        tenant: &str,
        job_id: &str,
        finished_at: &str,
        delivery: Option<&WebhookDelivery>,
    ) -> StoreResult<bool> {
        let (t, j, at, d) = (
            tenant.to_string(),
            job_id.to_string(),
            finished_at.to_string(),
            delivery.cloned(),
        );
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let doc: Option<String> = tx
                    .query_row(
                        "SELECT doc FROM gen_jobs WHERE tenant = ?1 AND job_id = ?2 AND status = ?3",
                        params![t, j, JobStatus::Running.as_str()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db_err)?;
                let Some(doc) = doc else {
                    return Ok(false);
                };
                let mut job: GenerationJob = of_doc(&doc)?;
                job.status = JobStatus::Finished;
                job.finished_at = Some(at);
                tx.execute(
                    "UPDATE gen_jobs SET status = ?3, doc = ?4 WHERE tenant = ?1 AND job_id = ?2",
                    params![t, j, job.status.as_str(), to_doc(&job)?],
                )
                .map_err(db_err)?;
                if let Some(d) = &d {
                    store_delivery(&tx, d)?;
                }
                tx.commit().map_err(db_err)?;
                Ok(true)
            })
            .await
    }

    async fn claim_generation(
        &self,
        tenant: &str,
        key: &str,
        owner: &str,
        lease: Duration,
        now_ms: u64,
    ) -> StoreResult<GenClaim> {
        let (t, k, o) = (tenant.to_string(), key.to_string(), owner.to_string());
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let found: Option<(Option<String>, Option<i64>, Option<String>)> = tx
                    .query_row(
                        "SELECT owner, lease_until, doc FROM gen_objects WHERE tenant = ?1 AND key = ?2",
                        params![t, k],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()
                    .map_err(db_err)?;
                let until = (now_ms + lease.as_millis() as u64) as i64;
                let claim = match found {
                    Some((_, _, Some(doc))) => GenClaim::Done(Box::new(of_doc(&doc)?)),
                    Some((Some(holder), Some(lease_until), None))
                        if holder != o && lease_until > now_ms as i64 =>
                    {
                        GenClaim::Busy {
                            retry_in: Duration::from_millis((lease_until - now_ms as i64) as u64),
                        }
                    }
                    _ => {
                        tx.execute(
                            "INSERT INTO gen_objects (tenant, key, owner, lease_until) VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (tenant, key) DO UPDATE SET owner = ?3, lease_until = ?4",
                            params![t, k, o, until],
                        )
                        .map_err(db_err)?;
                        GenClaim::Acquired
                    }
                };
                tx.commit().map_err(db_err)?;
                Ok(claim)
            })
            .await
    }

    async fn release_generation(&self, tenant: &str, key: &str, owner: &str) -> StoreResult<()> {
        let (t, k, o) = (tenant.to_string(), key.to_string(), owner.to_string());
        self.db
            .with(move |c| {
                c.execute(
                    "DELETE FROM gen_objects WHERE tenant = ?1 AND key = ?2 AND owner = ?3 AND doc IS NULL",
                    params![t, k, o],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn put_generated(&self, object: &GeneratedObject) -> StoreResult<()> {
        let o = object.clone();
        self.db
            .with(move |c| {
                c.execute(
                    "INSERT INTO gen_objects (tenant, key, doc) VALUES (?1, ?2, ?3)
                     ON CONFLICT (tenant, key) DO UPDATE SET doc = COALESCE(doc, ?3), owner = NULL, lease_until = NULL",
                    params![o.tenant, o.key, to_doc(&o)?],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn forget_generated(&self, object: &GeneratedObject) -> StoreResult<()> {
        let o = object.clone();
        self.db
            .with(move |c| {
                c.execute(
                    "DELETE FROM gen_objects WHERE tenant = ?1 AND key = ?2 AND doc = ?3",
                    params![o.tenant, o.key, to_doc(&o)?],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn put_delivery(&self, delivery: &WebhookDelivery) -> StoreResult<()> {
        let d = delivery.clone();
        self.db.with(move |c| store_delivery(c, &d)).await
    }

    async fn get_delivery(
        &self,
        tenant: &str,
        delivery_id: &str,
    ) -> StoreResult<Option<WebhookDelivery>> {
        let (t, id) = (tenant.to_string(), delivery_id.to_string());
        self.db
            .with(move |c| {
                Ok(docs(
                    c,
                    "SELECT doc FROM webhook_deliveries WHERE tenant = ?1 AND delivery_id = ?2",
                    params![t, id],
                )?
                .pop())
            })
            .await
    }

    async fn due_deliveries(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<WebhookDelivery>> {
        self.db
            .with(move |c| {
                docs(
                    c,
                    "SELECT doc FROM webhook_deliveries WHERE status = ?1 AND next_at <= ?2 ORDER BY next_at LIMIT ?3",
                    params![DeliveryStatus::Pending.as_str(), now_ms as i64, limit as i64],
                )
            })
            .await
    }

    async fn update_delivery(
        &self,
        delivery: &WebhookDelivery,
        expected_attempts: u32,
    ) -> StoreResult<bool> {
        let d = delivery.clone();
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let n = tx
                    .execute(
                        "UPDATE webhook_deliveries SET status = ?3, next_at = ?4, attempts = ?5, doc = ?6
                         WHERE tenant = ?1 AND delivery_id = ?2 AND attempts = ?7",
                        params![
                            d.tenant,
                            d.delivery_id,
                            d.status.as_str(),
                            d.next_at_ms as i64,
                            d.attempts,
                            to_doc(&d)?,
                            expected_attempts
                        ],
                    )
                    .map_err(db_err)?;
                tx.commit().map_err(db_err)?;
                Ok(n == 1)
            })
            .await
    }

    async fn list_deliveries(
        &self,
        tenant: &str,
        status: Option<DeliveryStatus>,
        limit: usize,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        let t = tenant.to_string();
        self.db
            .with(move |c| match status {
                Some(s) => docs(
                    c,
                    "SELECT doc FROM webhook_deliveries WHERE tenant = ?1 AND status = ?2
                     ORDER BY created_at DESC, delivery_id DESC LIMIT ?3",
                    params![t, s.as_str(), limit as i64],
                ),
                None => docs(
                    c,
                    "SELECT doc FROM webhook_deliveries WHERE tenant = ?1
                     ORDER BY created_at DESC, delivery_id DESC LIMIT ?2",
                    params![t, limit as i64],
                ),
            })
            .await
    }
}
