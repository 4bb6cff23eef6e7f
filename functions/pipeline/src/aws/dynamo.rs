//! DynamoDB repository: the single-table design of docs/aws.md.
//!
//! | item | pk | sk |
//! | image (+ result) | `T#{tenant}#I#{imageId}` | `IMAGE` (gsi1 by time, gsi2 by status) |
//! | idempotency | `IDEM#{sha256}:{model}:{promptVersion}` | `IDEM` |
//! | ledger | `T#{tenant}#COST` | `{YYYY-MM-DD}#{model}` |
//! | API key | `KEY#{sha256(key)}` | `KEY` |
//!
//! The image item keeps the record JSON in `doc`; `status`, `error`, `result` (JSON) and
//! `updated_at` are separate attributes so `complete` and `mark_failed` can update them with
//! conditions, and they take precedence over `doc` when read.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use aws_sdk_dynamodb::Client;
use base64::Engine;
use sightline_core::model::{AnalysisResult, ImageRecord, ImageStatus};

use super::sdk_err;
use crate::ports::{
    day_of, Claim, Completion, CostRow, ImagePage, Repository, StoreError, StoreResult,
};

/// Idempotency items expire after 30 days (TTL attribute `expires_at`).
const IDEM_TTL_SECS: u64 = 30 * 86_400;
/// A `pending` record (upload URL handed out, nothing uploaded yet) expires after 7 days; the
/// resize function's write replaces the whole item, TTL attribute included.
const PENDING_TTL_SECS: u64 = 7 * 86_400;

/// When a record last written at `updated_at` (RFC 3339) should expire if still pending.
fn pending_expiry(updated_at: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(updated_at, &time::format_description::well_known::Rfc3339)
        .ok()?;
    u64::try_from(t.unix_timestamp())
        .ok()
        .map(|s| s + PENDING_TTL_SECS)
}

type Item = HashMap<String, AttributeValue>;

#[derive(Clone, Debug)]
pub struct DynamoRepository {
    client: Client,
    table: String,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A finite f64 as a DynamoDB number (Rust's Display never uses exponents).
fn nf(v: f64) -> AttributeValue {
    AttributeValue::N(if v.is_finite() {
        format!("{v}")
    } else {
        "0".into()
    })
}

fn get_s<'a>(item: &'a Item, k: &str) -> Option<&'a str> {
    item.get(k).and_then(|v| v.as_s().ok()).map(String::as_str)
}

fn get_n<'a>(item: &'a Item, k: &str) -> Option<&'a str> {
    item.get(k).and_then(|v| v.as_n().ok()).map(String::as_str)
}

fn get_u64(item: &Item, k: &str) -> u64 {
    get_n(item, k)
        .and_then(|v| v.parse::<f64>().ok())
        .map(|f| f.max(0.0) as u64)
        .unwrap_or(0)
}

fn get_f64(item: &Item, k: &str) -> f64 {
    get_n(item, k).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Permanent(format!("stored JSON is invalid: {e}"))
}

pub fn image_pk(tenant: &str, image_id: &str) -> String {
    format!("T#{tenant}#I#{image_id}")
}

pub fn tenant_pk(tenant: &str) -> String {
    format!("T#{tenant}")
}

pub fn status_pk(tenant: &str, status: ImageStatus) -> String {
    format!("T#{tenant}#S#{}", status.as_str())
}

pub fn ledger_pk(tenant: &str) -> String {
    format!("T#{tenant}#COST")
}

pub fn idem_pk(key: &str) -> String {
    format!("IDEM#{key}")
}

pub fn key_pk(key_sha256: &str) -> String {
    format!("KEY#{key_sha256}")
}

fn time_sk(created_at: &str, image_id: &str) -> String {
    format!("{created_at}#{image_id}")
}

/// Read an image item back into a record (attributes override `doc`).
fn record_from_item(item: &Item) -> StoreResult<ImageRecord> {
    let doc =
        get_s(item, "doc").ok_or_else(|| StoreError::Permanent("image item has no doc".into()))?;
    let mut rec: ImageRecord = serde_json::from_str(doc).map_err(json_err)?;
    if let Some(st) = get_s(item, "status").and_then(ImageStatus::parse) {
        rec.status = st;
    }
    rec.error = get_s(item, "error").map(str::to_string);
    if let Some(r) = get_s(item, "result") {
        rec.result = Some(serde_json::from_str(r).map_err(json_err)?);
    }
    if let Some(u) = get_s(item, "updated_at") {
        rec.updated_at = u.to_string();
    }
    Ok(rec)
}

fn is_conditional_failure<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(
    e: &aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
) -> bool {
    e.as_service_error()
        .and_then(|s| s.code())
        .is_some_and(|c| c == "ConditionalCheckFailedException")
}

impl DynamoRepository {
    pub fn new(client: Client, table: impl Into<String>) -> DynamoRepository {
        DynamoRepository {
            client,
            table: table.into(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    fn key(pk: String, sk: &str) -> Item {
        HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
    }

    async fn get_item(&self, pk: String, sk: &str) -> StoreResult<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_err("dynamodb GetItem", e))?;
        Ok(out.item)
    }

    /// Decide Cached / Busy from the current idempotency item (after a lost condition).
    fn claim_state(item: &Item, owner: &str, now_ms: u64) -> StoreResult<Option<Claim>> {
        if get_s(item, "state") == Some("done") {
            if let Some(r) = get_s(item, "result") {
                let result: AnalysisResult = serde_json::from_str(r).map_err(json_err)?;
                return Ok(Some(Claim::Cached(Box::new(result))));
            }
        }
        let until = get_u64(item, "lease_until");
        if get_s(item, "owner").is_some_and(|o| o != owner) && until > now_ms {
            return Ok(Some(Claim::Busy {
                retry_in: Duration::from_millis(until - now_ms),
            }));
        }
        Ok(None)
    }

    fn encode_cursor(item: &Item, index_pk: &str, index_sk: &str) -> Option<String> {
        let mut m = BTreeMap::new();
        for k in ["pk", "sk", index_pk, index_sk] {
            m.insert(k.to_string(), get_s(item, k)?.to_string());
        }
        let json = serde_json::to_string(&m).ok()?;
        Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json))
    }

    fn decode_cursor(
        cursor: &str,
        index_pk: &str,
        index_sk: &str,
        expect_pk: &str,
    ) -> StoreResult<Item> {
        let bad = || StoreError::Permanent("invalid cursor".into());
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(cursor)
            .map_err(|_| bad())?;
        let m: BTreeMap<String, String> = serde_json::from_slice(&raw).map_err(|_| bad())?;
        // A cursor only continues the listing it came from (no other tenant, no other index).
        if m.len() != 4
            || m.get(index_pk).map(String::as_str) != Some(expect_pk)
            || !m.contains_key(index_sk)
        {
            return Err(bad());
        }
        if !(m.contains_key("pk") && m.get("sk").map(String::as_str) == Some("IMAGE")) {
            return Err(bad());
        }
        Ok(m.into_iter().map(|(k, v)| (k, s(v))).collect())
    }
}

#[async_trait]
impl Repository for DynamoRepository {
    async fn put_image(&self, record: &ImageRecord) -> StoreResult<()> {
        let doc = serde_json::to_string(record).map_err(json_err)?;
        let tsk = time_sk(&record.created_at, &record.image_id);
        let mut item: Item = HashMap::from([
            (
                "pk".to_string(),
                s(image_pk(&record.tenant, &record.image_id)),
            ),
            ("sk".to_string(), s("IMAGE")),
            ("gsi1pk".to_string(), s(tenant_pk(&record.tenant))),
            ("gsi1sk".to_string(), s(tsk.clone())),
            (
                "gsi2pk".to_string(),
                s(status_pk(&record.tenant, record.status)),
            ),
            ("gsi2sk".to_string(), s(tsk)),
            ("tenant".to_string(), s(&record.tenant)),
            ("image_id".to_string(), s(&record.image_id)),
            ("status".to_string(), s(record.status.as_str())),
            ("created_at".to_string(), s(&record.created_at)),
            ("updated_at".to_string(), s(&record.updated_at)),
            ("doc".to_string(), s(doc)),
        ]);
        if let Some(e) = &record.error {
            item.insert("error".into(), s(e));
        }
        if record.status == ImageStatus::Pending {
            if let Some(at) = pending_expiry(&record.updated_at) {
                item.insert("expires_at".into(), n(at));
            }
        }
        if let Some(r) = &record.result {
            item.insert(
                "result".into(),
                s(serde_json::to_string(r).map_err(json_err)?),
            );
        }
        // A late resize retry never wipes an analysis that landed in between.
        match self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(#result)")
            .expression_attribute_names("#result", "result")
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Ok(()),
            Err(e) => Err(sdk_err("dynamodb PutItem image", e)),
        }
    }

    async fn get_image(&self, tenant: &str, image_id: &str) -> StoreResult<Option<ImageRecord>> {
        self.get_item(image_pk(tenant, image_id), "IMAGE")
            .await?
            .map(|i| record_from_item(&i))
            .transpose()
    }

    async fn list_images(
        &self,
        tenant: &str,
        status: Option<ImageStatus>,
        limit: usize,
        cursor: Option<&str>,
    ) -> StoreResult<ImagePage> {
        let limit = limit.clamp(1, 1000);
        let (index, ipk, isk, pk_value) = match status {
            None => ("gsi1", "gsi1pk", "gsi1sk", tenant_pk(tenant)),
            Some(st) => ("gsi2", "gsi2pk", "gsi2sk", status_pk(tenant, st)),
        };
        let mut start = cursor
            .map(|c| Self::decode_cursor(c, ipk, isk, &pk_value))
            .transpose()?;
        // Read one more than asked so the last page has no cursor.
        let mut items: Vec<Item> = Vec::with_capacity(limit + 1);
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(index)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", ipk)
                .expression_attribute_values(":pk", s(pk_value.clone()))
                .scan_index_forward(false)
                .limit((limit + 1 - items.len()) as i32)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_err("dynamodb Query images", e))?;
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(k) if items.len() <= limit => start = Some(k),
                _ => break,
            }
        }
        let more = items.len() > limit;
        items.truncate(limit);
        let next_cursor = if more {
            items.last().and_then(|i| Self::encode_cursor(i, ipk, isk))
        } else {
            None
        };
        let images = items
            .iter()
            .map(record_from_item)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(ImagePage {
            images,
            next_cursor,
        })
    }

    async fn mark_failed(
        &self,
        tenant: &str,
        image_id: &str,
        error: &str,
        now: &str,
    ) -> StoreResult<()> {
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(image_pk(tenant, image_id), "IMAGE")))
            .update_expression(
                "SET #status = :failed, #error = :e, updated_at = :now, gsi2pk = :g2",
            )
            .condition_expression(
                "attribute_exists(pk) AND #status <> :done AND attribute_not_exists(#result)",
            )
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#error", "error")
            .expression_attribute_names("#result", "result")
            .expression_attribute_values(":failed", s(ImageStatus::Failed.as_str()))
            .expression_attribute_values(":done", s(ImageStatus::Done.as_str()))
            .expression_attribute_values(":e", s(error))
            .expression_attribute_values(":now", s(now))
            .expression_attribute_values(":g2", s(status_pk(tenant, ImageStatus::Failed)))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            // Absent or already done: nothing to mark.
            Err(e) if is_conditional_failure(&e) => Ok(()),
            Err(e) => Err(sdk_err("dynamodb UpdateItem mark_failed", e)),
        }
    }

    async fn claim(
        &self,
        key: &str,
        owner: &str,
        lease: Duration,
        now_ms: u64,
    ) -> StoreResult<Claim> {
        let until = now_ms.saturating_add(lease.as_millis() as u64);
        let expires = now_ms / 1000 + IDEM_TTL_SECS;
        for _ in 0..3 {
            let res = self
                .client
                .put_item()
                .table_name(&self.table)
                .item("pk", s(idem_pk(key)))
                .item("sk", s("IDEM"))
                .item("state", s("inflight"))
                .item("owner", s(owner))
                .item("lease_until", n(until))
                .item("expires_at", n(expires))
                .condition_expression(
                    "attribute_not_exists(pk) OR (#state <> :done AND (#owner = :me OR lease_until <= :now))",
                )
                .expression_attribute_names("#state", "state")
                .expression_attribute_names("#owner", "owner")
                .expression_attribute_values(":done", s("done"))
                .expression_attribute_values(":me", s(owner))
                .expression_attribute_values(":now", n(now_ms))
                .send()
                .await;
            match res {
                Ok(_) => return Ok(Claim::Acquired),
                Err(e) if is_conditional_failure(&e) => {
                    // Someone else holds it, or it is done: read what is there.
                    if let Some(item) = self.get_item(idem_pk(key), "IDEM").await? {
                        if let Some(c) = Self::claim_state(&item, owner, now_ms)? {
                            return Ok(c);
                        }
                    }
                    // Changed in between (released or expired): try again.
                }
                Err(e) => return Err(sdk_err("dynamodb PutItem claim", e)),
            }
        }
        Err(StoreError::Transient(format!(
            "claim on {key} kept changing"
        )))
    }

    async fn release_claim(&self, key: &str, owner: &str) -> StoreResult<()> {
        let res = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(idem_pk(key), "IDEM")))
            .condition_expression("#state = :inflight AND #owner = :me")
            .expression_attribute_names("#state", "state")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":inflight", s("inflight"))
            .expression_attribute_values(":me", s(owner))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Ok(()),
            Err(e) => Err(sdk_err("dynamodb DeleteItem claim", e)),
        }
    }

    async fn complete(
        &self,
        tenant: &str,
        image_id: &str,
        result: &AnalysisResult,
        estimated_cost_usd: f64,
    ) -> StoreResult<Completion> {
        let result_json = serde_json::to_string(result).map_err(json_err)?;
        let perm = |e: aws_sdk_dynamodb::error::BuildError| {
            StoreError::Permanent(format!("dynamodb request: {e}"))
        };
        let image = Update::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(image_pk(tenant, image_id), "IMAGE")))
            .update_expression(
                "SET #result = :r, #status = :done, updated_at = :u, gsi2pk = :g2 REMOVE #error",
            )
            .condition_expression("attribute_exists(pk) AND attribute_not_exists(#result)")
            .expression_attribute_names("#result", "result")
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#error", "error")
            .expression_attribute_values(":r", s(result_json.clone()))
            .expression_attribute_values(":done", s(ImageStatus::Done.as_str()))
            .expression_attribute_values(":u", s(&result.completed_at))
            .expression_attribute_values(":g2", s(status_pk(tenant, ImageStatus::Done)))
            .build()
            .map_err(perm)?;
        let day = day_of(&result.completed_at).to_string();
        let ledger = Update::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(
                ledger_pk(tenant),
                &format!("{day}#{}", result.model),
            )))
            .update_expression(
                "SET #day = :day, #model = :model \
                 ADD images :one, cached_images :cached, input_tokens :in, output_tokens :out, \
                 cost_usd :cost, estimated_cost_usd :est",
            )
            .expression_attribute_names("#day", "day")
            .expression_attribute_names("#model", "model")
            .expression_attribute_values(":day", s(day))
            .expression_attribute_values(":model", s(&result.model))
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":cached", n(u64::from(result.cached)))
            .expression_attribute_values(":in", n(result.usage.input_tokens))
            .expression_attribute_values(":out", n(result.usage.output_tokens))
            .expression_attribute_values(":cost", nf(result.cost_usd))
            .expression_attribute_values(":est", nf(estimated_cost_usd))
            .build()
            .map_err(perm)?;
        let mut items = vec![TransactWriteItem::builder().update(image).build()];
        if !result.cached {
            let expires = epoch_secs() + IDEM_TTL_SECS;
            let idem = Put::builder()
                .table_name(&self.table)
                .item("pk", s(idem_pk(&result.idempotency_key)))
                .item("sk", s("IDEM"))
                .item("state", s("done"))
                .item("result", s(result_json))
                .item("expires_at", n(expires))
                .build()
                .map_err(perm)?;
            items.push(TransactWriteItem::builder().put(idem).build());
        }
        items.push(TransactWriteItem::builder().update(ledger).build());
        let res = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        let err = match res {
            Ok(_) => return Ok(Completion::Stored),
            Err(e) => e,
        };
        let canceled = matches!(
            err.as_service_error(),
            Some(TransactWriteItemsError::TransactionCanceledException(_))
        );
        let condition_failed = match err.as_service_error() {
            Some(TransactWriteItemsError::TransactionCanceledException(ex)) => ex
                .cancellation_reasons()
                .iter()
                .any(|r| r.code() == Some("ConditionalCheckFailed")),
            _ => false,
        };
        if !canceled {
            return Err(sdk_err("dynamodb TransactWriteItems complete", err));
        }
        // Find out which condition failed: no image, or the image already has its result.
        match self.get_image(tenant, image_id).await? {
            None => Err(StoreError::NotFound(format!("image {tenant}/{image_id}"))),
            Some(rec) if rec.result.is_some() => Ok(Completion::AlreadyDone),
            Some(_) if condition_failed => Err(StoreError::Transient(
                "complete: condition failed but the image has no result yet".into(),
            )),
            // Canceled for another reason (conflict with a concurrent transaction).
            Some(_) => Err(StoreError::Transient(format!(
                "dynamodb TransactWriteItems complete: {}",
                aws_sdk_dynamodb::error::DisplayErrorContext(&err)
            ))),
        }
    }

    async fn costs(&self, tenant: &str, from: &str, to: &str) -> StoreResult<Vec<CostRow>> {
        let mut rows = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND sk BETWEEN :from AND :to")
                .expression_attribute_values(":pk", s(ledger_pk(tenant)))
                .expression_attribute_values(":from", s(from))
                .expression_attribute_values(":to", s(format!("{to}~")))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_err("dynamodb Query costs", e))?;
            for item in out.items() {
                let Some((day, model)) = get_s(item, "sk").and_then(|k| k.split_once('#')) else {
                    continue;
                };
                rows.push(CostRow {
                    day: day.to_string(),
                    model: model.to_string(),
                    images: get_u64(item, "images"),
                    cached_images: get_u64(item, "cached_images"),
                    input_tokens: get_u64(item, "input_tokens"),
                    output_tokens: get_u64(item, "output_tokens"),
                    cost_usd: get_f64(item, "cost_usd"),
                    estimated_cost_usd: get_f64(item, "estimated_cost_usd"),
                });
            }
            match out.last_evaluated_key {
                Some(k) => start = Some(k),
                None => break,
            }
        }
        rows.sort_by(|a, b| (&a.day, &a.model).cmp(&(&b.day, &b.model)));
        Ok(rows)
    }

    async fn put_api_key(&self, key_sha256: &str, tenant: &str) -> StoreResult<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(key_pk(key_sha256)))
            .item("sk", s("KEY"))
            .item("tenant", s(tenant))
            .send()
            .await
            .map_err(|e| sdk_err("dynamodb PutItem api key", e))?;
        Ok(())
    }

    async fn tenant_for_key(&self, key_sha256: &str) -> StoreResult<Option<String>> {
        Ok(self
            .get_item(key_pk(key_sha256), "KEY")
            .await?
            .and_then(|i| get_s(&i, "tenant").map(str::to_string)))
    }
}

fn epoch_secs() -> u64 {
    use crate::ports::Clock;
    crate::ports::SystemClock.now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_records_expire_a_week_after_their_last_write() {
        // 2026-01-01T00:00:00Z is 1767225600.
        assert_eq!(
            pending_expiry("2026-01-01T00:00:00.000Z"),
            Some(1_767_225_600 + 7 * 86_400)
        );
        assert_eq!(pending_expiry("yesterday"), None);
    }

    #[test]
    fn cursors_round_trip_and_stay_in_their_partition() {
        let item: Item = HashMap::from([
            ("pk".to_string(), s("T#a#I#x")),
            ("sk".to_string(), s("IMAGE")),
            ("gsi1pk".to_string(), s("T#a")),
            ("gsi1sk".to_string(), s("2026-01-01T00:00:00.000Z#x")),
            ("doc".to_string(), s("{}")),
        ]);
        let c = DynamoRepository::encode_cursor(&item, "gsi1pk", "gsi1sk").unwrap();
        let back = DynamoRepository::decode_cursor(&c, "gsi1pk", "gsi1sk", "T#a").unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(get_s(&back, "gsi1sk"), Some("2026-01-01T00:00:00.000Z#x"));
        assert!(DynamoRepository::decode_cursor(&c, "gsi1pk", "gsi1sk", "T#b").is_err());
        assert!(DynamoRepository::decode_cursor(&c, "gsi2pk", "gsi2sk", "T#a").is_err());
        assert!(DynamoRepository::decode_cursor("!!", "gsi1pk", "gsi1sk", "T#a").is_err());
    }

    #[test]
    fn numbers_never_use_exponents() {
        assert_eq!(nf(1e-7), AttributeValue::N("0.0000001".into()));
        assert_eq!(nf(f64::NAN), AttributeValue::N("0".into()));
    }
}
