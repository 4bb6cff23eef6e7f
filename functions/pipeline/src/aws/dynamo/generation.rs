//! Generation jobs, rows, generated images and webhook deliveries in the same table:
//!
//! | item | pk | sk | index |
//! | job | `GJOB#{tenant}#{job}` | `JOB` | gsi1 `GJOBS#{tenant}` (newest first), gsi3 `GRUNNING` while running; sk `{created ms}#{job}` |
//! | row | `GJOB#{tenant}#{job}` | `ROW#{row, 6 digits}` | |
//! | generated image | `GOBJ#{tenant}#{key}` | `GOBJ` | |
//! | delivery | `WHD#{tenant}#{id}` | `WHD` | gsi1 `WHDS#{tenant}` (newest first), gsi2 `WHDUE` while pending, sk `{next ms}#{id}` |
//!
//! A row's `status` and `attempt`, a delivery's `attempts` and a job's `status` are attributes
//! of their own, so every move is one conditional write; `doc` holds the rest.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use futures_util::TryStreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sightline_core::genjob::{JobStatus, RowStatus};

use super::{get_s, get_u64, is_conditional_failure, json_err, n, s, DynamoRepository, Item};
use crate::aws::sdk_err;
use crate::ports::{
    DeliveryStatus, GenClaim, GeneratedObject, GenerationJob, GenerationRow, GenerationStore,
    StoreError, StoreResult, WebhookDelivery,
};
/// BatchWriteItem calls in flight at once while a job's rows are stored.
const ROW_WRITE_CONCURRENCY: usize = 8;

const RUNNING_PK: &str = "GRUNNING";
const DUE_PK: &str = "WHDUE";

fn job_pk(tenant: &str, job_id: &str) -> String {
    format!("GJOB#{tenant}#{job_id}")
}

fn row_sk(row: u32) -> String {
    format!("ROW#{row:06}")
}

fn object_pk(tenant: &str, key: &str) -> String {
    format!("GOBJ#{tenant}#{key}")
}

fn delivery_pk(tenant: &str, id: &str) -> String {
    format!("WHD#{tenant}#{id}")
}

fn ms_sk(ms: u64, id: &str) -> String {
    format!("{ms:013}#{id}")
}

fn to_doc<T: Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(json_err)
}

fn of_item<T: DeserializeOwned>(item: &Item) -> StoreResult<T> {
    let doc = get_s(item, "doc").ok_or_else(|| StoreError::Permanent("item has no doc".into()))?;
    serde_json::from_str(doc).map_err(json_err)
}

fn build_err(e: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::Permanent(format!("dynamodb request: {e}"))
}

fn created_ms(rfc: &str) -> u64 {
    crate::ports::parse_rfc3339_ms(rfc).unwrap_or(0)
}

fn job_item(job: &GenerationJob) -> StoreResult<Item> {
    let mut item = DynamoRepository::key(job_pk(&job.tenant, &job.job_id), "JOB");
    let sk = ms_sk(created_ms(&job.created_at), &job.job_id);
    item.insert("doc".into(), s(to_doc(job)?));
    item.insert("status".into(), s(job.status.as_str()));
    item.insert("gsi1pk".into(), s(format!("GJOBS#{}", job.tenant)));
    item.insert("gsi1sk".into(), s(sk.clone()));
    if job.status == JobStatus::Running {
        item.insert("gsi3pk".into(), s(RUNNING_PK));
        item.insert("gsi3sk".into(), s(sk));
    }
    Ok(item)
}

fn row_item(row: &GenerationRow) -> StoreResult<Item> {
    let mut item = DynamoRepository::key(job_pk(&row.tenant, &row.job_id), &row_sk(row.row));
    item.insert("doc".into(), s(to_doc(row)?));
    item.insert("status".into(), s(row.status.as_str()));
    item.insert("attempt".into(), n(row.attempt));
    Ok(item)
}

fn delivery_item(d: &WebhookDelivery) -> StoreResult<Item> {
    let mut item = DynamoRepository::key(delivery_pk(&d.tenant, &d.delivery_id), "WHD");
    item.insert("doc".into(), s(to_doc(d)?));
    item.insert("status".into(), s(d.status.as_str()));
    item.insert("attempts".into(), n(d.attempts));
    item.insert("gsi1pk".into(), s(format!("WHDS#{}", d.tenant)));
    item.insert(
        "gsi1sk".into(),
        s(ms_sk(created_ms(&d.created_at), &d.delivery_id)),
    );
    if d.status == DeliveryStatus::Pending {
        item.insert("gsi2pk".into(), s(DUE_PK));
        item.insert("gsi2sk".into(), s(ms_sk(d.next_at_ms, &d.delivery_id)));
    }
    Ok(item)
}

impl DynamoRepository {
    async fn put_if(
        &self,
        item: Item,
        condition: Option<(&str, Vec<(&str, AttributeValue)>)>,
        op: &str,
    ) -> StoreResult<bool> {
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item));
        if let Some((expr, values)) = condition {
            if expr.contains("#status") {
                put = put.expression_attribute_names("#status", "status");
            }
            put = put.condition_expression(expr);
            for (k, v) in values {
                put = put.expression_attribute_values(k, v);
            }
        }
        match put.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_failure(&e) => Ok(false),
            Err(e) => Err(sdk_err(op, e)),
        }
    }

    async fn query_pk(&self, pk: String, sk_prefix: &str) -> StoreResult<Vec<Item>> {
        self.query_pages(usize::MAX, "dynamodb Query rows", |start, _| {
            self.client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :p)")
                .expression_attribute_values(":pk", s(pk.clone()))
                .expression_attribute_values(":p", s(sk_prefix))
                .consistent_read(true)
                .set_exclusive_start_key(start)
        })
        .await
    }

    /// One BatchWriteItem of up to 25 rows, its unprocessed items written again (8 rounds).
    async fn write_rows(&self, chunk: &[GenerationRow]) -> StoreResult<()> {
        let mut writes = Vec::with_capacity(chunk.len());
        for row in chunk {
            writes.push(
                aws_sdk_dynamodb::types::WriteRequest::builder()
                    .put_request(
                        aws_sdk_dynamodb::types::PutRequest::builder()
                            .set_item(Some(row_item(row)?))
                            .build()
                            .map_err(build_err)?,
                    )
                    .build(),
            );
        }
        let mut pending = Some(std::collections::HashMap::from([(
            self.table.clone(),
            writes,
        )]));
        let mut round = 0u32;
        while let Some(req) = pending.take().filter(|r| !r.is_empty()) {
            let out = self
                .client
                .batch_write_item()
                .set_request_items(Some(req))
                .send()
                .await
                .map_err(|e| sdk_err("dynamodb BatchWriteItem rows", e))?;
            pending = out.unprocessed_items;
            round += 1;
            if round > 8 {
                return Err(StoreError::Transient(
                    "rows left unprocessed after 8 rounds".into(),
                ));
            }
            if pending.as_ref().is_some_and(|p| !p.is_empty()) {
                tokio::time::sleep(Duration::from_millis(50 * u64::from(round))).await;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl GenerationStore for DynamoRepository {
    async fn create_job(&self, job: &GenerationJob, rows: &[GenerationRow]) -> StoreResult<()> {
        // Rows first, the job last: a job is only listed (and swept) once its rows exist, and
        // a retried create writes the same items again. Batches of 25 (BatchWriteItem's
        // most), a few in flight.
        futures_util::stream::iter(rows.chunks(25).map(Ok))
            .try_for_each_concurrent(ROW_WRITE_CONCURRENCY, |chunk| self.write_rows(chunk))
            .await?;
        self.put_if(job_item(job)?, None, "dynamodb PutItem job")
            .await
            .map(|_| ())
    }

    async fn get_job(&self, tenant: &str, job_id: &str) -> StoreResult<Option<GenerationJob>> {
        self.get_item(job_pk(tenant, job_id), "JOB")
            .await?
            .map(|i| of_item(&i))
            .transpose()
    }

    async fn list_jobs(&self, tenant: &str, limit: usize) -> StoreResult<Vec<GenerationJob>> {
        let raw = self
            .index_items(
                "gsi1",
                &format!("GJOBS#{tenant}"),
                false,
                None,
                limit,
                "dynamodb Query jobs",
            )
            .await?;
        raw.iter().map(of_item).collect()
    }

    async fn running_jobs(&self, limit: usize) -> StoreResult<Vec<GenerationJob>> {
        let raw = self
            .index_items(
                "gsi3",
                RUNNING_PK,
                true,
                None,
                limit,
                "dynamodb Query running jobs",
            )
            .await?;
        raw.iter().map(of_item).collect()
    }

    async fn rows(&self, tenant: &str, job_id: &str) -> StoreResult<Vec<GenerationRow>> {
        let raw = self.query_pk(job_pk(tenant, job_id), "ROW#").await?;
        raw.iter().map(of_item).collect()
    }

    async fn get_row(
        &self,
        tenant: &str,
        job_id: &str,
        row: u32,
    ) -> StoreResult<Option<GenerationRow>> {
        self.get_item(job_pk(tenant, job_id), &row_sk(row))
            .await?
            .map(|i| of_item(&i))
            .transpose()
    }

    async fn update_row(
        &self,
        row: &GenerationRow,
        expected: (RowStatus, u32),
    ) -> StoreResult<bool> {
        self.put_if(
            row_item(row)?,
            Some((
                "#status = :s AND attempt = :a",
                vec![(":s", s(expected.0.as_str())), (":a", n(expected.1))],
            )),
            "dynamodb PutItem row",
        )
        .await
    }

    async fn finish_job(
        &self,
        tenant: &str,
        job_id: &str,
        finished_at: &str,
        delivery: Option<&WebhookDelivery>,
    ) -> StoreResult<bool> {
        let Some(mut job) = self.get_job(tenant, job_id).await? else {
            return Ok(false);
        };
        if job.status != JobStatus::Running {
            return Ok(false);
        }
        job.status = JobStatus::Finished;
        job.finished_at = Some(finished_at.to_string());
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(job_pk(tenant, job_id), "JOB")))
            .update_expression("SET #status = :f, doc = :doc REMOVE gsi3pk, gsi3sk")
            .condition_expression("#status = :r")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":f", s(JobStatus::Finished.as_str()))
            .expression_attribute_values(":r", s(JobStatus::Running.as_str()))
            .expression_attribute_values(":doc", s(to_doc(&job)?))
            .build()
            .map_err(build_err)?;
        let mut items = vec![TransactWriteItem::builder().update(update).build()];
        if let Some(d) = delivery {
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(delivery_item(d)?))
                .condition_expression("attribute_not_exists(pk)")
                .build()
                .map_err(build_err)?;
            items.push(TransactWriteItem::builder().put(put).build());
        }
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => {
                let cancelled = e
                    .as_service_error()
                    .is_some_and(|s| s.is_transaction_canceled_exception());
                if cancelled {
                    // Finished by another worker meanwhile (or a transient conflict: the
                    // sweep tries again).
                    Ok(false)
                } else {
                    Err(sdk_err("dynamodb TransactWriteItems finish job", e))
                }
            }
        }
    }

    async fn claim_generation(
        &self,
        tenant: &str,
        key: &str,
        owner: &str,
        lease: Duration,
        now_ms: u64,
    ) -> StoreResult<GenClaim> {
        let pk = object_pk(tenant, key);
        let until = now_ms + lease.as_millis() as u64;
        let claimed = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(pk.clone(), "GOBJ")))
            .update_expression("SET #owner = :o, lease_until = :u")
            .condition_expression(
                "attribute_not_exists(doc) AND (attribute_not_exists(#owner) OR #owner = :o OR lease_until < :now)",
            )
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":o", s(owner))
            .expression_attribute_values(":u", n(until))
            .expression_attribute_values(":now", n(now_ms))
            .send()
            .await;
        match claimed {
            Ok(_) => Ok(GenClaim::Acquired),
            Err(e) if is_conditional_failure(&e) => {
                let Some(item) = self.get_item(pk, "GOBJ").await? else {
                    return Ok(GenClaim::Busy {
                        retry_in: Duration::from_secs(1),
                    });
                };
                if get_s(&item, "doc").is_some() {
                    return Ok(GenClaim::Done(Box::new(of_item(&item)?)));
                }
                let until = get_u64(&item, "lease_until");
                Ok(GenClaim::Busy {
                    retry_in: Duration::from_millis(until.saturating_sub(now_ms).max(1000)),
                })
            }
            Err(e) => Err(sdk_err("dynamodb UpdateItem generation claim", e)),
        }
    }

    async fn release_generation(&self, tenant: &str, key: &str, owner: &str) -> StoreResult<()> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(object_pk(tenant, key), "GOBJ")))
            .condition_expression("attribute_not_exists(doc) AND #owner = :o")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":o", s(owner))
            .send()
            .await;
        match out {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Ok(()),
            Err(e) => Err(sdk_err("dynamodb DeleteItem generation claim", e)),
        }
    }

    async fn put_generated(&self, object: &GeneratedObject) -> StoreResult<()> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(
                object_pk(&object.tenant, &object.key),
                "GOBJ",
            )))
            .update_expression("SET doc = :doc REMOVE #owner, lease_until")
            .condition_expression("attribute_not_exists(doc)")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":doc", s(to_doc(object)?))
            .send()
            .await;
        match out {
            // The first record of a key stays.
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Ok(()),
            Err(e) => Err(sdk_err("dynamodb UpdateItem generated image", e)),
        }
    }

    async fn forget_generated(&self, object: &GeneratedObject) -> StoreResult<()> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(
                object_pk(&object.tenant, &object.key),
                "GOBJ",
            )))
            .condition_expression("doc = :doc")
            .expression_attribute_values(":doc", s(to_doc(object)?))
            .send()
            .await;
        match out {
            Ok(_) => Ok(()),
            // Gone already, or a newer record of the key: keep it.
            Err(e) if is_conditional_failure(&e) => Ok(()),
            Err(e) => Err(sdk_err("dynamodb DeleteItem generated image", e)),
        }
    }

    async fn put_delivery(&self, delivery: &WebhookDelivery) -> StoreResult<()> {
        self.put_if(delivery_item(delivery)?, None, "dynamodb PutItem delivery")
            .await
            .map(|_| ())
    }

    async fn get_delivery(
        &self,
        tenant: &str,
        delivery_id: &str,
    ) -> StoreResult<Option<WebhookDelivery>> {
        self.get_item(delivery_pk(tenant, delivery_id), "WHD")
            .await?
            .map(|i| of_item(&i))
            .transpose()
    }

    async fn due_deliveries(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<WebhookDelivery>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .index_name("gsi2")
            .key_condition_expression("gsi2pk = :pk AND gsi2sk < :upto")
            .expression_attribute_values(":pk", s(DUE_PK))
            // Every sort key of a time up to now sorts below `{now + 1}#`.
            .expression_attribute_values(":upto", s(format!("{:013}#", now_ms + 1)))
            .limit(i32::try_from(limit).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(|e| sdk_err("dynamodb Query due deliveries", e))?;
        let mut due = Vec::new();
        for item in out.items.unwrap_or_default() {
            let d: WebhookDelivery = of_item(&item)?;
            // The index is eventually consistent: only what is still pending and due.
            if d.status == DeliveryStatus::Pending && d.next_at_ms <= now_ms {
                due.push(d);
            }
        }
        Ok(due)
    }

    async fn update_delivery(
        &self,
        delivery: &WebhookDelivery,
        expected_attempts: u32,
    ) -> StoreResult<bool> {
        self.put_if(
            delivery_item(delivery)?,
            Some(("attempts = :a", vec![(":a", n(expected_attempts))])),
            "dynamodb PutItem delivery",
        )
        .await
    }

    async fn list_deliveries(
        &self,
        tenant: &str,
        status: Option<DeliveryStatus>,
        limit: usize,
    ) -> StoreResult<Vec<WebhookDelivery>> {
        let filter = status.map(|st| ("#status = :st", vec![(":st", s(st.as_str()))]));
        let raw = self
            .index_items(
                "gsi1",
                &format!("WHDS#{tenant}"),
                false,
                filter,
                limit,
                "dynamodb Query deliveries",
            )
            .await?;
        raw.iter().map(of_item).collect()
    }
}
