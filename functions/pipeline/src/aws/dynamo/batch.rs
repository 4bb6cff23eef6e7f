//! The batch lane's state in the same table (docs/aws.md), over the existing indexes:
//!
//! | item | pk | sk | index |
//! | batch item | `BITEM#{custom_id}` | `BITEM` | gsi3: `BPENDING` while pending, `BITEMS#{batchId}` while in a batch; gsi3sk `{created ms, 13 digits}#{custom_id}` |
//! | batch record | `BATCH#{batchId}` | `BATCH` | gsi1 `BATCHES#{tenant}`, gsi2 `BATCHES`, gsi3 `BOPEN` while open; sk `{created ms}#{batchId}` |
//!
//! An item's `doc` (the [`BatchItem`] JSON) holds its waiters; `batch_id`, `not_before_ms`,
//! `attempts` and `ended` are attributes of their own so every move is one conditional
//! update, and they take precedence over `doc` when read. `ver` counts waiter changes (the
//! optimistic lock of a join). Index reads are eventually consistent: a move shows in a
//! listing a moment later, and every move is conditional, so a stale listing takes nothing
//! twice.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Put, TransactWriteItem, Update};
use sightline_core::model::AnalysisResult;
use tokio::task::JoinSet;

use super::{
    get_n, get_s, get_u64, idem_pk, is_conditional_failure, json_err, n, s, DynamoRepository, Item,
};
use crate::aws::sdk_err;
use crate::ports::{
    BatchItem, BatchRecord, BatchStore, BatchWaiter, Enqueued, ItemEnd, StoreError, StoreResult,
};

/// gsi3 partition of pending items (oldest first).
const PENDING_PK: &str = "BPENDING";
/// gsi3 partition of open batch records.
const OPEN_PK: &str = "BOPEN";
/// gsi2 partition of every batch record.
const ALL_BATCHES_PK: &str = "BATCHES";
/// Optimistic rounds of an enqueue before it reports contention as transient.
const ENQUEUE_ROUNDS: u32 = 5;
/// Conditional item moves in flight at once (an assignment moves up to a whole batch).
const MOVES_IN_FLIGHT: usize = 16;

pub fn item_pk(custom_id: &str) -> String {
    format!("BITEM#{custom_id}")
}

pub fn batch_pk(batch_id: &str) -> String {
    format!("BATCH#{batch_id}")
}

/// gsi3 partition of the items of a batch.
pub fn batch_items_pk(batch_id: &str) -> String {
    format!("BITEMS#{batch_id}")
}

pub fn tenant_batches_pk(tenant: &str) -> String {
    format!("BATCHES#{tenant}")
}

/// Sort key by creation time, zero-padded so strings sort like numbers.
fn created_sk(created_ms: u64, id: &str) -> String {
    format!("{created_ms:013}#{id}")
}

fn build_err(e: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::Permanent(format!("dynamodb request: {e}"))
}

/// An item back from the table: `doc` with the attributes that are authoritative put back.
fn item_from(raw: &Item) -> StoreResult<BatchItem> {
    let doc =
        get_s(raw, "doc").ok_or_else(|| StoreError::Permanent("batch item has no doc".into()))?;
    let mut item: BatchItem = serde_json::from_str(doc).map_err(json_err)?;
    item.batch_id = get_s(raw, "batch_id").map(str::to_string);
    item.not_before_ms = get_u64(raw, "not_before_ms");
    item.attempts = u32::try_from(get_u64(raw, "attempts")).unwrap_or(u32::MAX);
    item.ended = get_s(raw, "ended")
        .map(|e| serde_json::from_str::<ItemEnd>(e).map_err(json_err))
        .transpose()?;
    Ok(item)
}

fn record_from(raw: &Item) -> StoreResult<BatchRecord> {
    let doc =
        get_s(raw, "doc").ok_or_else(|| StoreError::Permanent("batch record has no doc".into()))?;
    serde_json::from_str(doc).map_err(json_err)
}

impl DynamoRepository {
    /// A new pending item: waiters = `waiter` only, no batch, not ended.
    fn new_item(&self, item: &BatchItem, waiter: &BatchWaiter) -> StoreResult<Item> {
        let mut new = item.clone();
        new.batch_id = None;
        new.ended = None;
        new.waiters = vec![waiter.clone()];
        let doc = serde_json::to_string(&new).map_err(json_err)?;
        Ok(HashMap::from([
            ("pk".to_string(), s(item_pk(&new.custom_id))),
            ("sk".to_string(), s("BITEM")),
            ("doc".to_string(), s(doc)),
            ("not_before_ms".to_string(), n(new.not_before_ms)),
            ("created_ms".to_string(), n(new.created_ms)),
            ("attempts".to_string(), n(new.attempts)),
            ("ver".to_string(), n(1)),
            ("gsi3pk".to_string(), s(PENDING_PK)),
            (
                "gsi3sk".to_string(),
                s(created_sk(new.created_ms, &new.custom_id)),
            ),
        ]))
    }

    /// The idempotency key is not answered: checked in the same transaction as the write.
    fn not_answered(&self, key: &str) -> StoreResult<TransactWriteItem> {
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(idem_pk(key), "IDEM")))
            .condition_expression("attribute_not_exists(pk) OR #state <> :done")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":done", s("done"))
            .build()
            .map_err(build_err)?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }

    /// Run a two-step enqueue transaction; false when a condition failed (retry the round).
    async fn enqueue_write(&self, items: Vec<TransactWriteItem>) -> StoreResult<bool> {
        let res = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) => match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(ex))
                    if ex
                        .cancellation_reasons()
                        .iter()
                        .any(|r| r.code() == Some("ConditionalCheckFailed")) =>
                {
                    Ok(false)
                }
                _ => Err(sdk_err("dynamodb TransactWriteItems enqueue_batch", e)),
            },
        }
    }

    /// Every page of a query on partition `pk` of `index` (`gsi1`..`gsi3`, whose partition
    /// attribute is `{index}pk`), in sort order (`forward`), with an optional filter; stops once
    /// `limit` items are read.
    pub(super) async fn index_items(
        &self,
        index: &str,
        pk: &str,
        forward: bool,
        filter: Option<(&str, Vec<(&str, AttributeValue)>)>,
        limit: usize,
        op: &str,
    ) -> StoreResult<Vec<Item>> {
        self.query_pages(limit, op, |start, read| {
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(index)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", format!("{index}pk"))
                .expression_attribute_values(":pk", s(pk))
                .scan_index_forward(forward)
                .set_exclusive_start_key(start);
            match &filter {
                Some((expr, values)) => {
                    q = q.filter_expression(*expr);
                    if expr.contains("#status") {
                        // A reserved word, named.
                        q = q.expression_attribute_names("#status", "status");
                    }
                    for (k, v) in values {
                        q = q.expression_attribute_values(*k, v.clone());
                    }
                }
                // Unfiltered, a page need hold no more than what is still wanted.
                None => {
                    let left = limit.saturating_sub(read);
                    q = q.limit(i32::try_from(left).unwrap_or(i32::MAX));
                }
            }
            q
        })
        .await
    }

    /// A conditional update of one item; false when its condition failed.
    async fn move_item(req: UpdateItemFluentBuilder, op: &'static str) -> StoreResult<bool> {
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_failure(&e) => Ok(false),
            Err(e) => Err(sdk_err(op, e)),
        }
    }

    /// An UpdateItem of the batch item `custom_id`.
    fn item_update(&self, custom_id: &str) -> UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(item_pk(custom_id), "BITEM")))
    }

    fn batch_item(&self, batch: &BatchRecord) -> StoreResult<Item> {
        let doc = serde_json::to_string(batch).map_err(json_err)?;
        let sk = created_sk(batch.created_ms, &batch.batch_id);
        let mut item: Item = HashMap::from([
            ("pk".to_string(), s(batch_pk(&batch.batch_id))),
            ("sk".to_string(), s("BATCH")),
            ("doc".to_string(), s(doc)),
            ("state".to_string(), s(batch.state.as_str())),
            ("tenant".to_string(), s(&batch.tenant)),
            ("created_ms".to_string(), n(batch.created_ms)),
            ("gsi1pk".to_string(), s(tenant_batches_pk(&batch.tenant))),
            ("gsi1sk".to_string(), s(sk.clone())),
            ("gsi2pk".to_string(), s(ALL_BATCHES_PK)),
            ("gsi2sk".to_string(), s(sk.clone())),
        ]);
        if batch.state.is_open() {
            item.insert("gsi3pk".into(), s(OPEN_PK));
            item.insert("gsi3sk".into(), s(sk));
        }
        Ok(item)
    }
}

#[async_trait]
impl BatchStore for DynamoRepository {
    async fn enqueue_batch(&self, item: &BatchItem, waiter: &BatchWaiter) -> StoreResult<Enqueued> {
        for _ in 0..ENQUEUE_ROUNDS {
            if let Some(done) = self.cached_answer(&item.key).await? {
                return Ok(Enqueued::Cached(Box::new(done)));
            }
            let stored = self.get_item(item_pk(&item.custom_id), "BITEM").await?;
            // An ended item (failed for good, its batch not purged yet) is no live request.
            let live = match &stored {
                Some(raw) if !raw.contains_key("ended") => Some((item_from(raw)?, raw)),
                _ => None,
            };
            let (write, outcome) = match live {
                Some((existing, _)) if existing.waiters.contains(waiter) => {
                    return Ok(Enqueued::AlreadyWaiting)
                }
                Some((mut existing, raw)) => {
                    let ver = get_n(raw, "ver").unwrap_or("0").to_string();
                    existing.waiters.push(waiter.clone());
                    let doc = serde_json::to_string(&existing).map_err(json_err)?;
                    let update = Update::builder()
                        .table_name(&self.table)
                        .set_key(Some(Self::key(item_pk(&item.custom_id), "BITEM")))
                        .update_expression("SET doc = :doc, ver = ver + :one")
                        .condition_expression("ver = :ver AND attribute_not_exists(ended)")
                        .expression_attribute_values(":doc", s(doc))
                        .expression_attribute_values(":one", n(1))
                        .expression_attribute_values(":ver", AttributeValue::N(ver))
                        .build()
                        .map_err(build_err)?;
                    (
                        TransactWriteItem::builder().update(update).build(),
                        Enqueued::Joined,
                    )
                }
                None => {
                    // Replaces an ended item too (it leaves its batch, as in SQLite).
                    let put = Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(self.new_item(item, waiter)?))
                        .condition_expression("attribute_not_exists(pk) OR attribute_exists(ended)")
                        .build()
                        .map_err(build_err)?;
                    (
                        TransactWriteItem::builder().put(put).build(),
                        Enqueued::Created,
                    )
                }
            };
            if self
                .enqueue_write(vec![self.not_answered(&item.key)?, write])
                .await?
            {
                return Ok(outcome);
            }
            // Answered, created or joined in between: look again.
        }
        Err(StoreError::Transient(format!(
            "batch item {} kept changing",
            item.custom_id
        )))
    }

    async fn cached_answer(&self, key: &str) -> StoreResult<Option<AnalysisResult>> {
        // The idempotency item that `complete` and `cache_result` write (`done_item`).
        let Some(raw) = self.get_item(idem_pk(key), "IDEM").await? else {
            return Ok(None);
        };
        if get_s(&raw, "state") != Some("done") {
            return Ok(None);
        }
        get_s(&raw, "result")
            .map(|r| serde_json::from_str(r).map_err(json_err))
            .transpose()
    }

    async fn pending_batch_items(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<BatchItem>> {
        let raw = self
            .index_items(
                "gsi3",
                PENDING_PK,
                true,
                Some(("not_before_ms <= :now", vec![(":now", n(now_ms))])),
                limit,
                "dynamodb Query pending batch items",
            )
            .await?;
        raw.iter().map(item_from).collect()
    }

    async fn batch_items(&self, batch_id: &str) -> StoreResult<Vec<BatchItem>> {
        let raw = self
            .index_items(
                "gsi3",
                &batch_items_pk(batch_id),
                true,
                None,
                usize::MAX,
                "dynamodb Query batch items",
            )
            .await?;
        raw.iter().map(item_from).collect()
    }

    async fn assign_batch_items(
        &self,
        batch_id: &str,
        custom_ids: &[String],
    ) -> StoreResult<Vec<String>> {
        let mut taken = vec![false; custom_ids.len()];
        for (chunk_no, chunk) in custom_ids.chunks(MOVES_IN_FLIGHT).enumerate() {
            let mut moves = JoinSet::new();
            for (i, id) in chunk.iter().enumerate() {
                let req = self
                    .item_update(id)
                    .update_expression("SET batch_id = :b, gsi3pk = :g")
                    .condition_expression("attribute_exists(pk) AND attribute_not_exists(batch_id)")
                    .expression_attribute_values(":b", s(batch_id))
                    .expression_attribute_values(":g", s(batch_items_pk(batch_id)));
                let at = chunk_no * MOVES_IN_FLIGHT + i;
                moves.spawn(async move {
                    (at, Self::move_item(req, "dynamodb UpdateItem assign").await)
                });
            }
            let mut failed = None;
            while let Some(joined) = moves.join_next().await {
                let (at, res) =
                    joined.map_err(|e| StoreError::Transient(format!("assign task ended: {e}")))?;
                match res {
                    Ok(ok) => taken[at] = ok,
                    Err(e) => failed = Some(e),
                }
            }
            // The moves that landed stay; the caller releases what it does not submit.
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(custom_ids
            .iter()
            .zip(taken)
            .filter(|(_, t)| *t)
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn release_batch_item(
        &self,
        custom_id: &str,
        batch_id: &str,
        count_attempt: bool,
        not_before_ms: u64,
    ) -> StoreResult<bool> {
        let req = self
            .item_update(custom_id)
            .update_expression(
                "SET gsi3pk = :g, not_before_ms = :nb, \
                 attempts = if_not_exists(attempts, :zero) + :inc REMOVE batch_id",
            )
            .condition_expression("batch_id = :b")
            .expression_attribute_values(":b", s(batch_id))
            .expression_attribute_values(":g", s(PENDING_PK))
            .expression_attribute_values(":nb", n(not_before_ms))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":inc", n(u32::from(count_attempt)));
        Self::move_item(req, "dynamodb UpdateItem release batch item").await
    }

    async fn end_batch_item(
        &self,
        custom_id: &str,
        batch_id: &str,
        end: &ItemEnd,
    ) -> StoreResult<bool> {
        let req = self
            .item_update(custom_id)
            .update_expression("SET ended = :e")
            .condition_expression("batch_id = :b AND attribute_not_exists(ended)")
            .expression_attribute_values(":b", s(batch_id))
            .expression_attribute_values(":e", s(serde_json::to_string(end).map_err(json_err)?));
        Self::move_item(req, "dynamodb UpdateItem end batch item").await
    }

    async fn drop_pending_item(&self, custom_id: &str) -> StoreResult<bool> {
        let res = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(item_pk(custom_id), "BITEM")))
            .condition_expression("attribute_exists(pk) AND attribute_not_exists(batch_id)")
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_failure(&e) => Ok(false),
            Err(e) => Err(sdk_err("dynamodb DeleteItem pending batch item", e)),
        }
    }

    async fn defer_batch_item(&self, custom_id: &str, not_before_ms: u64) -> StoreResult<bool> {
        let req = self
            .item_update(custom_id)
            .update_expression("SET not_before_ms = :nb")
            .condition_expression("attribute_exists(pk) AND attribute_not_exists(batch_id)")
            .expression_attribute_values(":nb", n(not_before_ms));
        Self::move_item(req, "dynamodb UpdateItem defer batch item").await
    }

    async fn purge_batch(&self, batch_id: &str) -> StoreResult<()> {
        let items = self
            .index_items(
                "gsi3",
                &batch_items_pk(batch_id),
                true,
                Some(("attribute_exists(ended)", Vec::new())),
                usize::MAX,
                "dynamodb Query batch items to purge",
            )
            .await?;
        for raw in items {
            let Some(pk) = get_s(&raw, "pk") else {
                continue;
            };
            // Only if it is still this batch's ended item (the index may lag behind).
            let res = self
                .client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(Self::key(pk.to_string(), "BITEM")))
                .condition_expression("batch_id = :b AND attribute_exists(ended)")
                .expression_attribute_values(":b", s(batch_id))
                .send()
                .await;
            match res {
                Ok(_) => {}
                Err(e) if is_conditional_failure(&e) => {}
                Err(e) => return Err(sdk_err("dynamodb DeleteItem batch item", e)),
            }
        }
        Ok(())
    }

    async fn put_batch(&self, batch: &BatchRecord) -> StoreResult<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(self.batch_item(batch)?))
            .send()
            .await
            .map_err(|e| sdk_err("dynamodb PutItem batch", e))?;
        Ok(())
    }

    async fn close_batch(&self, batch: &BatchRecord) -> StoreResult<bool> {
        let res = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(self.batch_item(batch)?))
            .condition_expression("#state IN (:submitting, :running)")
            .expression_attribute_names("#state", "state")
            .expression_attribute_values(":submitting", s("submitting"))
            .expression_attribute_values(":running", s("running"))
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_failure(&e) => Ok(false),
            Err(e) => Err(sdk_err("dynamodb PutItem close batch", e)),
        }
    }

    async fn get_batch(&self, batch_id: &str) -> StoreResult<Option<BatchRecord>> {
        self.get_item(batch_pk(batch_id), "BATCH")
            .await?
            .map(|raw| record_from(&raw))
            .transpose()
    }

    async fn list_batches(
        &self,
        tenant: Option<&str>,
        open_only: bool,
        limit: usize,
    ) -> StoreResult<Vec<BatchRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let raw = if open_only {
            // Open batches are few: one sparse partition, filtered by tenant.
            let filter = tenant.map(|t| ("tenant = :t", vec![(":t", s(t))]));
            self.index_items(
                "gsi3",
                OPEN_PK,
                false,
                filter,
                limit,
                "dynamodb Query open batches",
            )
            .await?
        } else {
            let (index, pk) = match tenant {
                Some(t) => ("gsi1", tenant_batches_pk(t)),
                None => ("gsi2", ALL_BATCHES_PK.to_string()),
            };
            self.index_items(index, &pk, false, None, limit, "dynamodb Query batches")
                .await?
        };
        raw.iter().map(record_from).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_keys_sort_like_numbers() {
        assert!(created_sk(999, "b") < created_sk(1_000, "a"));
        assert_eq!(created_sk(5, "x"), "0000000000005#x");
    }
}
