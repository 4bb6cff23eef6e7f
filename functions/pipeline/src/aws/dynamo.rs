//! DynamoDB repository: the single-table design of docs/aws.md.
//!
//! | item | pk | sk |
//! | image (+ result) | `T#{tenant}#I#{imageId}` | `IMAGE` (gsi1 by time, gsi2 by status, gsi3 by recheck time while not final) |
//! | idempotency | `IDEM#{idempotency key}` | `IDEM` |
//! | ledger | `T#{tenant}#COST` | `{YYYY-MM-DD}#{model}` |
//! | spend marker | `SPEND#{spendId}` | `SPEND` |
//! | API key | `KEY#{sha256(key)}` | `KEY` (gsi1pk `KEYS#{tenant}`) |
//! | tenant budget caps | `T#{tenant}#BUDGET` | `CAPS` |
//! | budget holds of a period | `T#{tenant}#BUDGET` | `D#{YYYY-MM-DD}` / `M#{YYYY-MM}` |
//! | batch item | `BITEM#{custom_id}` | `BITEM` (gsi3pk `BPENDING` while pending, `BITEMS#{batchId}` in a batch) |
//! | batch record | `BATCH#{batchId}` | `BATCH` (gsi1pk `BATCHES#{tenant}`, gsi2pk `BATCHES`, gsi3pk `BOPEN` while open) |
//! | shared rate limit of a model | `LIMIT#{provider}:{model}` | `LIMIT` (`rq`, `tk`, `nb`: the limit's state; `ver`) |
//!
//! The batch lane's items and records are in [`batch`].
//!
//! The image item keeps the record JSON in `doc`; `status`, `error`, `result` (JSON) and
//! `updated_at` are separate attributes so `complete` and `mark_failed` can update them with
//! conditions, and they take precedence over `doc` when read.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem, Update};
use aws_sdk_dynamodb::Client;
use base64::Engine;
use sightline_core::budget::{self, BudgetCaps, Counted, Periods};
use sightline_core::limiter::{LimitOp, LimitOutcome, LimitState, Limits};
use sightline_core::model::{AnalysisResult, ExtraSpend, ImageRecord, ImageStatus};

use super::sdk_err;

pub mod batch;
pub mod generation;
use crate::ports::{
    api_key_id, day_of, ApiKeyInfo, BudgetCounts, BudgetHold, Claim, Clock, Completion, CostRow,
    Failure, ImagePage, LedgerKind, PutImage, RateLimitStore, Repository, Spend, StoreError,
    StoreResult,
};

/// Idempotency items expire after 30 days (TTL attribute `expires_at`).
const IDEM_TTL_SECS: u64 = 30 * 86_400;
/// Spend markers (exactly-once booking of money without a result) expire after 90 days.
const SPEND_TTL_SECS: u64 = 90 * 86_400;
/// Budget hold items outlive their period by this long (TTL attribute `expires_at`).
const HOLDS_TTL_SECS: u64 = 40 * 86_400;
/// Optimistic rounds of a budget reservation before it reports contention as transient.
const BUDGET_ROUNDS: u32 = 20;
/// Optimistic rounds of a shared rate-limit op before it reports contention as transient.
const LIMIT_ROUNDS: u32 = 50;
/// A shared limit's item outlives its last write by this long (TTL attribute `expires_at`);
/// one that expires was idle, and a missing item is a full limit anyway.
const LIMIT_TTL_SECS: u64 = 86_400;
/// The one partition of the sparse recheck index (gsi3): images not final, by recheck time.
const RECHECK_PK: &str = "RECHECK";

/// gsi3 sort key: the recheck time, zero-padded so strings sort like numbers.
fn recheck_sk(at_ms: u64, tenant: &str, image_id: &str) -> String {
    format!("{at_ms:013}#{tenant}#{image_id}")
}

/// When a record created at `created_at` (RFC 3339) expires if still pending: the TTL
/// attribute (epoch seconds) that DynamoDB deletes it by, on the same rule as the reconciler's
/// sweep (created + the pending TTL setting).
fn pending_expiry(created_at: &str, ttl: Duration) -> Option<u64> {
    let t = time::OffsetDateTime::parse(created_at, &time::format_description::well_known::Rfc3339)
        .ok()?;
    u64::try_from(t.unix_timestamp())
        .ok()
        .map(|s| s + ttl.as_secs())
}

type Item = HashMap<String, AttributeValue>;

#[derive(Clone, Debug)]
pub struct DynamoRepository {
    client: Client,
    table: String,
    /// A `pending` record (upload URL handed out, nothing uploaded yet) expires this long after
    /// its creation; the resize function's write replaces the whole item, TTL included.
    pending_ttl: Duration,
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

/// gsi1 partition of a tenant's API keys (image partitions there start with `T#`).
pub fn keys_pk(tenant: &str) -> String {
    format!("KEYS#{tenant}")
}

pub fn budget_pk(tenant: &str) -> String {
    format!("T#{tenant}#BUDGET")
}

/// Live holds of a period item: id → (amount, expires_ms).
fn holds_of(item: Option<&Item>) -> Vec<(String, f64, u64)> {
    let Some(map) = item
        .and_then(|i| i.get("holds"))
        .and_then(|v| v.as_m().ok())
    else {
        return Vec::new();
    };
    map.iter()
        .filter_map(|(id, v)| {
            let hold = v.as_m().ok()?;
            Some((id.clone(), get_f64(hold, "a"), get_u64(hold, "x")))
        })
        .collect()
}

fn holds_value(holds: &[(String, f64, u64)]) -> AttributeValue {
    AttributeValue::M(
        holds
            .iter()
            .map(|(id, a, x)| {
                let hold = HashMap::from([("a".to_string(), nf(*a)), ("x".to_string(), n(x))]);
                (id.clone(), AttributeValue::M(hold))
            })
            .collect(),
    )
}

pub fn limit_pk(key: &str) -> String {
    format!("LIMIT#{key}")
}

pub fn spend_pk(spend_id: &str) -> String {
    format!("SPEND#{spend_id}")
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
    if let Some(p) = item.get("permanent_failure").and_then(|v| v.as_bool().ok()) {
        rec.permanent_failure = *p;
    }
    if let Some(r) = get_s(item, "result") {
        rec.result = Some(serde_json::from_str(r).map_err(json_err)?);
    }
    if let Some(u) = get_s(item, "updated_at") {
        rec.updated_at = u.to_string();
    }
    // Money booked on the image by book_spend (atomic ADDs, so attributes, not the doc).
    if item.contains_key("extra_calls") {
        rec.extra_spend = Some(ExtraSpend {
            calls: get_u64(item, "extra_calls"),
            input_tokens: get_u64(item, "extra_input_tokens"),
            output_tokens: get_u64(item, "extra_output_tokens"),
            cost_usd: get_f64(item, "extra_cost_usd"),
            cost_at_estimate_usd: get_f64(item, "extra_cost_at_estimate_usd"),
        });
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

/// What one ledger row gains.
struct LedgerAdd<'a> {
    day: &'a str,
    model: &'a str,
    images: u64,
    cached_images: u64,
    calls: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
    estimated_cost_usd: f64,
    calls_at_estimate: u64,
    cost_at_estimate_usd: f64,
    /// The money came through the batch lane (it also counts in the batch attributes).
    batch: bool,
    /// A near-duplicate's reused analysis (it also counts in the reuse attributes).
    reused: bool,
    saved_usd: f64,
    kind: LedgerKind,
}

impl DynamoRepository {
    /// The items of a query, page after page, until it ends or `limit` items were read.
    /// `page` builds the query of each page from where the last one ended and how many items
    /// were read so far (to ask no more than is still wanted).
    pub(super) async fn query_pages(
        &self,
        limit: usize,
        op: &str,
        page: impl Fn(
            Option<Item>,
            usize,
        ) -> aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder,
    ) -> StoreResult<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = page(start.take(), items.len())
                .send()
                .await
                .map_err(|e| sdk_err(op, e))?;
            items.extend(out.items.unwrap_or_default());
            match out.last_evaluated_key {
                Some(k) if items.len() < limit => start = Some(k),
                _ => break,
            }
        }
        items.truncate(limit);
        Ok(items)
    }

    /// The tenant's ledger rows of days `from..=to` (`YYYY-MM-DD`), all pages. `consistent`
    /// reads see every booking that completed before the query (the budget needs that).
    async fn ledger_rows(
        &self,
        tenant: &str,
        from: &str,
        to: &str,
        consistent: bool,
        op: &str,
    ) -> StoreResult<Vec<Item>> {
        self.query_pages(usize::MAX, op, |start, _| {
            self.client
                .query()
                .table_name(&self.table)
                .consistent_read(consistent)
                .key_condition_expression("pk = :pk AND sk BETWEEN :from AND :to")
                .expression_attribute_values(":pk", s(ledger_pk(tenant)))
                .expression_attribute_values(":from", s(from))
                .expression_attribute_values(":to", s(format!("{to}~")))
                .set_exclusive_start_key(start)
        })
        .await
    }

    /// Spent per the ledger rows of the tenant's month (consistent reads): (day, month).
    async fn ledger_spent(&self, tenant: &str, periods: &Periods) -> StoreResult<(f64, f64)> {
        let (mut day, mut month) = (0.0, 0.0);
        let day_prefix = format!("{}#", periods.day);
        let (from, to) = (
            format!("{}-01", periods.month),
            format!("{}-31", periods.month),
        );
        let rows = self
            .ledger_rows(tenant, &from, &to, true, "dynamodb Query budget spent")
            .await?;
        for item in &rows {
            let cost = get_f64(item, "cost_usd");
            month += cost;
            if get_s(item, "sk").is_some_and(|k| k.starts_with(&day_prefix)) {
                day += cost;
            }
        }
        Ok((day, month))
    }

    /// The hold items of both periods, then the ledger. Read in that order, a booking that
    /// lands in between is counted twice (held and spent), never zero times: its hold is only
    /// settled after the booking, and a settle bumps the version our write is conditioned on.
    async fn budget_state(
        &self,
        tenant: &str,
        periods: &Periods,
    ) -> StoreResult<(Option<Item>, Option<Item>, f64, f64)> {
        let day_item = self
            .get_item(budget_pk(tenant), &format!("D#{}", periods.day))
            .await?;
        let month_item = self
            .get_item(budget_pk(tenant), &format!("M#{}", periods.month))
            .await?;
        let (spent_day, spent_month) = self.ledger_spent(tenant, periods).await?;
        Ok((day_item, month_item, spent_day, spent_month))
    }

    /// A conditional write of a period's holds: only if nobody changed them since `item`.
    fn holds_update(
        &self,
        tenant: &str,
        sk: String,
        item: Option<&Item>,
        holds: &[(String, f64, u64)],
        period_end_ms: u64,
    ) -> StoreResult<Update> {
        let ver = item.map(|i| get_u64(i, "ver")).unwrap_or(0);
        Update::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(budget_pk(tenant), &sk)))
            .update_expression("SET holds = :holds, ver = :next, expires_at = :ttl")
            .condition_expression("attribute_not_exists(ver) OR ver = :ver")
            .expression_attribute_values(":holds", holds_value(holds))
            .expression_attribute_values(":next", n(ver + 1))
            .expression_attribute_values(":ver", n(ver))
            .expression_attribute_values(":ttl", n(period_end_ms / 1000 + HOLDS_TTL_SECS))
            .build()
            .map_err(|e| StoreError::Permanent(e.to_string()))
    }

    /// The ledger row's atomic ADD for `a` (one item per tenant, day and model).
    fn ledger_update(
        &self,
        tenant: &str,
        a: &LedgerAdd<'_>,
    ) -> Result<Update, aws_sdk_dynamodb::error::BuildError> {
        let batch_add = if a.batch {
            ", batch_images :images, batch_calls :calls, batch_cost_usd :cost, batch_saved_usd :saved"
        } else {
            ""
        };
        let reused_add = if a.reused {
            ", reused_images :images, reused_saved_usd :saved"
        } else {
            ""
        };
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(
                ledger_pk(tenant),
                &format!("{}#{}", a.day, a.model),
            )))
            .update_expression(format!(
                "SET #day = :day, #model = :model, #kind = :kind \
                 ADD images :images, cached_images :cached, calls :calls, input_tokens :in, \
                 output_tokens :out, cost_usd :cost, estimated_cost_usd :est, \
                 calls_at_estimate :calls_est, cost_at_estimate_usd :cost_est{batch_add}{reused_add}"
            ))
            .expression_attribute_names("#day", "day")
            .expression_attribute_names("#model", "model")
            .expression_attribute_names("#kind", "kind")
            .expression_attribute_values(":kind", s(a.kind.as_str()))
            .expression_attribute_values(":day", s(a.day))
            .expression_attribute_values(":model", s(a.model))
            .expression_attribute_values(":images", n(a.images))
            .expression_attribute_values(":cached", n(a.cached_images))
            .expression_attribute_values(":calls", n(a.calls))
            .expression_attribute_values(":in", n(a.input_tokens))
            .expression_attribute_values(":out", n(a.output_tokens))
            .expression_attribute_values(":cost", nf(a.cost_usd))
            .expression_attribute_values(":est", nf(a.estimated_cost_usd))
            .expression_attribute_values(":calls_est", n(a.calls_at_estimate))
            .expression_attribute_values(":cost_est", nf(a.cost_at_estimate_usd));
        if a.batch || a.reused {
            update
                .expression_attribute_values(":saved", nf(a.saved_usd))
                .build()
        } else {
            update.build()
        }
    }

    /// The idempotency item of a finished answer (replaces an in-flight claim).
    fn done_item(
        &self,
        result: &AnalysisResult,
        result_json: String,
    ) -> Result<Put, aws_sdk_dynamodb::error::BuildError> {
        Put::builder()
            .table_name(&self.table)
            .item("pk", s(idem_pk(&result.idempotency_key)))
            .item("sk", s("IDEM"))
            .item("state", s("done"))
            .item("result", s(result_json))
            .item("expires_at", n(epoch_secs() + IDEM_TTL_SECS))
            .build()
    }

    /// A tenant's API key items (gsi1, partition `KEYS#{tenant}`).
    async fn key_items(&self, tenant: &str) -> StoreResult<Vec<Item>> {
        self.query_pages(usize::MAX, "dynamodb Query api keys", |start, _| {
            self.client
                .query()
                .table_name(&self.table)
                .index_name("gsi1")
                .key_condition_expression("gsi1pk = :pk")
                .expression_attribute_values(":pk", s(keys_pk(tenant)))
                .set_exclusive_start_key(start)
        })
        .await
    }

    pub fn new(client: Client, table: impl Into<String>) -> DynamoRepository {
        DynamoRepository {
            client,
            table: table.into(),
            pending_ttl: crate::Settings::default().pending_ttl,
        }
    }

    /// The pending TTL of the settings (`SIGHTLINE_PENDING_TTL_SECS`).
    pub fn with_pending_ttl(mut self, ttl: Duration) -> DynamoRepository {
        self.pending_ttl = ttl;
        self
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
        let bad = || StoreError::InvalidInput("invalid cursor".into());
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
    async fn put_image(
        &self,
        record: &ImageRecord,
        recheck_at_ms: Option<u64>,
    ) -> StoreResult<PutImage> {
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
        if let Some(o) = &record.original_sha256 {
            item.insert("original_sha256".into(), s(o));
        }
        if let Some(at) = recheck_at_ms {
            item.insert("gsi3pk".into(), s(RECHECK_PK));
            item.insert(
                "gsi3sk".into(),
                s(recheck_sk(at, &record.tenant, &record.image_id)),
            );
        }
        if record.status == ImageStatus::Pending {
            if let Some(at) = pending_expiry(&record.created_at, self.pending_ttl) {
                item.insert("expires_at".into(), n(at));
            }
        }
        if let Some(r) = &record.result {
            item.insert(
                "result".into(),
                s(serde_json::to_string(r).map_err(json_err)?),
            );
        }
        // A late resize retry never wipes an analysis that landed in between, and once a
        // record has an original, only that original may rewrite it.
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .expression_attribute_names("#result", "result")
            .expression_attribute_names("#orig", "original_sha256");
        put = match &record.original_sha256 {
            Some(o) => put
                .condition_expression(
                    "attribute_not_exists(#result) AND (attribute_not_exists(#orig) OR #orig = :orig)",
                )
                .expression_attribute_values(":orig", s(o)),
            None => put.condition_expression(
                "attribute_not_exists(#result) AND attribute_not_exists(#orig)",
            ),
        };
        match put.send().await {
            Ok(_) => Ok(PutImage::Stored),
            Err(e) if is_conditional_failure(&e) => {
                let stored = self.get_image(&record.tenant, &record.image_id).await?;
                Ok(match stored {
                    Some(r) if r.result.is_some() => PutImage::HasResult,
                    _ => PutImage::OtherUpload,
                })
            }
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
        failure: Failure,
        now: &str,
    ) -> StoreResult<()> {
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(image_pk(tenant, image_id), "IMAGE")))
            .update_expression(
                "SET #status = :failed, #error = :e, permanent_failure = :p, updated_at = :now, \
                 gsi2pk = :g2 REMOVE gsi3pk, gsi3sk",
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
            .expression_attribute_values(":p", AttributeValue::Bool(failure == Failure::Permanent))
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

    async fn set_recheck(
        &self,
        tenant: &str,
        image_id: &str,
        recheck_at_ms: Option<u64>,
    ) -> StoreResult<()> {
        let req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(image_pk(tenant, image_id), "IMAGE")))
            .condition_expression("attribute_exists(pk)");
        let req = match recheck_at_ms {
            Some(at) => req
                .update_expression("SET gsi3pk = :r, gsi3sk = :at")
                .expression_attribute_values(":r", s(RECHECK_PK))
                .expression_attribute_values(":at", s(recheck_sk(at, tenant, image_id))),
            None => req.update_expression("REMOVE gsi3pk, gsi3sk"),
        };
        match req.send().await {
            Ok(_) => Ok(()),
            Err(e) if is_conditional_failure(&e) => Ok(()),
            Err(e) => Err(sdk_err("dynamodb UpdateItem recheck", e)),
        }
    }

    async fn due_rechecks(&self, now_ms: u64, limit: usize) -> StoreResult<Vec<ImageRecord>> {
        let limit = limit.clamp(1, 1000);
        // Every gsi3sk starts with a 13-digit time: below the next millisecond = due.
        let upper = format!("{:013}", now_ms.saturating_add(1));
        let items = self
            .query_pages(limit, "dynamodb Query rechecks", |start, read| {
                self.client
                    .query()
                    .table_name(&self.table)
                    .index_name("gsi3")
                    .key_condition_expression("gsi3pk = :r AND gsi3sk < :upper")
                    .expression_attribute_values(":r", s(RECHECK_PK))
                    .expression_attribute_values(":upper", s(upper.clone()))
                    .limit(i32::try_from(limit - read).unwrap_or(i32::MAX))
                    .set_exclusive_start_key(start)
            })
            .await?;
        items.iter().map(record_from_item).collect()
    }

    async fn expire_pending(&self, tenant: &str, image_id: &str) -> StoreResult<bool> {
        let res = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(image_pk(tenant, image_id), "IMAGE")))
            .condition_expression("#status = :pending")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":pending", s(ImageStatus::Pending.as_str()))
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_failure(&e) => Ok(false),
            Err(e) => Err(sdk_err("dynamodb DeleteItem pending", e)),
        }
    }

    async fn delete_image(&self, tenant: &str, image_id: &str) -> StoreResult<bool> {
        let res = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(image_pk(tenant, image_id), "IMAGE")))
            .condition_expression("attribute_exists(pk)")
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if is_conditional_failure(&e) => Ok(false),
            Err(e) => Err(sdk_err("dynamodb DeleteItem image", e)),
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
                "SET #result = :r, #status = :done, updated_at = :u, gsi2pk = :g2 REMOVE #error, gsi3pk, gsi3sk",
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
        let ledger = self
            .ledger_update(
                tenant,
                &LedgerAdd {
                    day: day_of(&result.completed_at),
                    model: &result.model,
                    images: 1,
                    cached_images: u64::from(result.cached),
                    calls: u64::from(result.calls),
                    input_tokens: result.usage.input_tokens,
                    output_tokens: result.usage.output_tokens,
                    cost_usd: result.cost_usd,
                    estimated_cost_usd,
                    calls_at_estimate: u64::from(result.usage_estimated),
                    cost_at_estimate_usd: result.cost_at_estimate_usd,
                    batch: !result.lane.is_realtime(),
                    reused: result.reused_from.is_some(),
                    saved_usd: result.saved_usd,
                    kind: LedgerKind::Analysis,
                },
            )
            .map_err(perm)?;
        let mut items = vec![TransactWriteItem::builder().update(image).build()];
        if !result.cached {
            let idem = self.done_item(result, result_json).map_err(perm)?;
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

    async fn cache_result(&self, result: &AnalysisResult) -> StoreResult<()> {
        let json = serde_json::to_string(result).map_err(json_err)?;
        let item = self
            .done_item(result, json)
            .map_err(|e| StoreError::Permanent(format!("dynamodb request: {e}")))?;
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item.item))
            .send()
            .await
            .map_err(|e| sdk_err("dynamodb PutItem cache", e))?;
        Ok(())
    }

    async fn book_spend(
        &self,
        tenant: &str,
        image_id: &str,
        spend_id: &str,
        spend: &Spend,
    ) -> StoreResult<()> {
        let perm = |e: aws_sdk_dynamodb::error::BuildError| {
            StoreError::Permanent(format!("dynamodb request: {e}"))
        };
        let marker = Put::builder()
            .table_name(&self.table)
            .item("pk", s(spend_pk(spend_id)))
            .item("sk", s("SPEND"))
            .item("tenant", s(tenant))
            .item("image_id", s(image_id))
            .item("expires_at", n(epoch_secs() + SPEND_TTL_SECS))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(perm)?;
        let ledger = self
            .ledger_update(
                tenant,
                &LedgerAdd {
                    day: &spend.day,
                    model: &spend.model,
                    images: 0,
                    cached_images: 0,
                    calls: spend.calls,
                    input_tokens: spend.usage.input_tokens,
                    output_tokens: spend.usage.output_tokens,
                    cost_usd: spend.cost_usd,
                    estimated_cost_usd: 0.0,
                    calls_at_estimate: spend.calls_at_estimate,
                    cost_at_estimate_usd: spend.cost_at_estimate_usd,
                    batch: !spend.lane.is_realtime(),
                    reused: false,
                    saved_usd: spend.saved_usd,
                    kind: spend.kind,
                },
            )
            .map_err(perm)?;
        let extra = spend.as_extra();
        let image = Update::builder()
            .table_name(&self.table)
            .set_key(Some(Self::key(image_pk(tenant, image_id), "IMAGE")))
            .update_expression(
                "ADD extra_calls :c, extra_input_tokens :i, extra_output_tokens :o, \
                 extra_cost_usd :cost, extra_cost_at_estimate_usd :est",
            )
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":c", n(extra.calls))
            .expression_attribute_values(":i", n(extra.input_tokens))
            .expression_attribute_values(":o", n(extra.output_tokens))
            .expression_attribute_values(":cost", nf(extra.cost_usd))
            .expression_attribute_values(":est", nf(extra.cost_at_estimate_usd))
            .build()
            .map_err(perm)?;
        // An embedding is paid for the image's vector, not for an answer: ledger only.
        let mut with_image = spend.kind == LedgerKind::Analysis;
        loop {
            let mut items = vec![
                TransactWriteItem::builder().put(marker.clone()).build(),
                TransactWriteItem::builder().update(ledger.clone()).build(),
            ];
            if with_image {
                items.push(TransactWriteItem::builder().update(image.clone()).build());
            }
            let res = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items))
                .send()
                .await;
            let Err(e) = res else {
                return Ok(());
            };
            let failed: Vec<bool> = match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(ex)) => ex
                    .cancellation_reasons()
                    .iter()
                    .map(|r| r.code() == Some("ConditionalCheckFailed"))
                    .collect(),
                _ => Vec::new(),
            };
            match failed.as_slice() {
                // The marker exists: booked before.
                [true, ..] => return Ok(()),
                // The image is gone: the ledger still gets the money.
                [false, _, true] if with_image => with_image = false,
                _ => return Err(sdk_err("dynamodb TransactWriteItems spend", e)),
            }
        }
    }

    async fn costs(&self, tenant: &str, from: &str, to: &str) -> StoreResult<Vec<CostRow>> {
        let items = self
            .ledger_rows(tenant, from, to, false, "dynamodb Query costs")
            .await?;
        let mut rows = Vec::new();
        for item in &items {
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
                calls: get_u64(item, "calls"),
                calls_at_estimate: get_u64(item, "calls_at_estimate"),
                cost_at_estimate_usd: get_f64(item, "cost_at_estimate_usd"),
                batch_images: get_u64(item, "batch_images"),
                batch_calls: get_u64(item, "batch_calls"),
                batch_cost_usd: get_f64(item, "batch_cost_usd"),
                batch_saved_usd: get_f64(item, "batch_saved_usd"),
                kind: LedgerKind::parse(get_s(item, "kind").unwrap_or_default()),
                reused_images: get_u64(item, "reused_images"),
                reused_saved_usd: get_f64(item, "reused_saved_usd"),
            });
        }
        rows.sort_by(|a, b| (&a.day, &a.model).cmp(&(&b.day, &b.model)));
        Ok(rows)
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
        let id = uuid::Uuid::new_v4().simple().to_string();
        for _ in 0..BUDGET_ROUNDS {
            let (day_item, month_item, spent_day, spent_month) =
                self.budget_state(tenant, periods).await?;
            let live = |item: Option<&Item>| {
                let mut h = holds_of(item);
                h.retain(|(_, _, x)| *x > now_ms);
                h
            };
            let (mut day_holds, mut month_holds) =
                (live(day_item.as_ref()), live(month_item.as_ref()));
            let held = |h: &[(String, f64, u64)]| h.iter().map(|(_, a, _)| a).sum::<f64>();
            let day = Counted {
                spent_usd: spent_day,
                reserved_usd: held(&day_holds),
            };
            let month = Counted {
                spent_usd: spent_month,
                reserved_usd: held(&month_holds),
            };
            if let Some(period) = budget::refusing(caps, day, month) {
                return Ok(BudgetHold::Over(period));
            }
            day_holds.push((id.clone(), amount, expires_ms));
            month_holds.push((id.clone(), amount, expires_ms));
            let day_update = self.holds_update(
                tenant,
                format!("D#{}", periods.day),
                day_item.as_ref(),
                &day_holds,
                periods.next_day_ms,
            )?;
            let month_update = self.holds_update(
                tenant,
                format!("M#{}", periods.month),
                month_item.as_ref(),
                &month_holds,
                periods.next_month_ms,
            )?;
            let res = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().update(day_update).build())
                .transact_items(TransactWriteItem::builder().update(month_update).build())
                .send()
                .await;
            match res {
                Ok(_) => return Ok(BudgetHold::Reserved(id)),
                // Someone reserved or settled meanwhile: read again.
                Err(e)
                    if matches!(
                        e.as_service_error(),
                        Some(TransactWriteItemsError::TransactionCanceledException(_))
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(5 + rand::random::<u64>() % 20)).await;
                }
                Err(e) => return Err(sdk_err("dynamodb TransactWriteItems budget", e)),
            }
        }
        Err(StoreError::Transient(format!(
            "budget of {tenant} kept changing"
        )))
    }

    async fn settle_budget(&self, tenant: &str, periods: &Periods, id: &str) -> StoreResult<()> {
        for sk in [format!("D#{}", periods.day), format!("M#{}", periods.month)] {
            let res = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(Self::key(budget_pk(tenant), &sk)))
                .update_expression("REMOVE holds.#id ADD ver :one")
                .condition_expression("attribute_exists(holds.#id)")
                .expression_attribute_names("#id", id)
                .expression_attribute_values(":one", n(1))
                .send()
                .await;
            match res {
                Ok(_) => {}
                Err(e) if is_conditional_failure(&e) => {} // already settled or expired
                Err(e) => return Err(sdk_err("dynamodb UpdateItem settle budget", e)),
            }
        }
        Ok(())
    }

    async fn budget_counts(
        &self,
        tenant: &str,
        periods: &Periods,
        now_ms: u64,
    ) -> StoreResult<BudgetCounts> {
        let (day_item, month_item, spent_day, spent_month) =
            self.budget_state(tenant, periods).await?;
        let held = |item: Option<&Item>| {
            holds_of(item)
                .iter()
                .filter(|(_, _, x)| *x > now_ms)
                .map(|(_, a, _)| a)
                .sum::<f64>()
        };
        Ok(BudgetCounts {
            day: Counted {
                spent_usd: spent_day,
                reserved_usd: held(day_item.as_ref()),
            },
            month: Counted {
                spent_usd: spent_month,
                reserved_usd: held(month_item.as_ref()),
            },
        })
    }

    async fn tenant_budget(&self, tenant: &str) -> StoreResult<Option<BudgetCaps>> {
        let item = self.get_item(budget_pk(tenant), "CAPS").await?;
        Ok(item.map(|i| BudgetCaps {
            daily_usd: get_n(&i, "daily_usd").and_then(|v| v.parse().ok()),
            monthly_usd: get_n(&i, "monthly_usd").and_then(|v| v.parse().ok()),
        }))
    }

    async fn set_tenant_budget(&self, tenant: &str, caps: Option<&BudgetCaps>) -> StoreResult<()> {
        let key = Self::key(budget_pk(tenant), "CAPS");
        match caps {
            None => {
                self.client
                    .delete_item()
                    .table_name(&self.table)
                    .set_key(Some(key))
                    .send()
                    .await
                    .map_err(|e| sdk_err("dynamodb DeleteItem budget", e))?;
            }
            Some(caps) => {
                let mut item = key;
                if let Some(d) = caps.daily_usd {
                    item.insert("daily_usd".into(), nf(d));
                }
                if let Some(m) = caps.monthly_usd {
                    item.insert("monthly_usd".into(), nf(m));
                }
                self.client
                    .put_item()
                    .table_name(&self.table)
                    .set_item(Some(item))
                    .send()
                    .await
                    .map_err(|e| sdk_err("dynamodb PutItem budget", e))?;
            }
        }
        Ok(())
    }

    async fn add_api_key(
        &self,
        key_sha256: &str,
        tenant: &str,
        created_at: &str,
    ) -> StoreResult<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(key_pk(key_sha256)))
            .item("sk", s("KEY"))
            .item("tenant", s(tenant))
            .item("key_sha256", s(key_sha256))
            .item("created_at", s(created_at))
            .item("gsi1pk", s(keys_pk(tenant)))
            .item("gsi1sk", s(format!("{created_at}#{key_sha256}")))
            .send()
            .await
            .map_err(|e| sdk_err("dynamodb PutItem api key", e))?;
        Ok(())
    }

    async fn list_api_keys(&self, tenant: &str) -> StoreResult<Vec<ApiKeyInfo>> {
        Ok(self
            .key_items(tenant)
            .await?
            .iter()
            .filter_map(|i| {
                Some(ApiKeyInfo {
                    id: api_key_id(get_s(i, "key_sha256")?),
                    tenant: get_s(i, "tenant")?.to_string(),
                    created_at: get_s(i, "created_at").unwrap_or_default().to_string(),
                })
            })
            .collect())
    }

    async fn revoke_api_key(&self, tenant: &str, key_id: &str) -> StoreResult<bool> {
        if key_id.len() != 12 {
            return Ok(false);
        }
        let mut revoked = false;
        for item in self.key_items(tenant).await? {
            let Some(hash) = get_s(&item, "key_sha256") else {
                continue;
            };
            if api_key_id(hash) != key_id {
                continue;
            }
            let res = self
                .client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(Self::key(key_pk(hash), "KEY")))
                .condition_expression("tenant = :t")
                .expression_attribute_values(":t", s(tenant))
                .send()
                .await;
            match res {
                Ok(_) => revoked = true,
                Err(e) if is_conditional_failure(&e) => {}
                Err(e) => return Err(sdk_err("dynamodb DeleteItem api key", e)),
            }
        }
        Ok(revoked)
    }

    async fn tenant_for_key(&self, key_sha256: &str) -> StoreResult<Option<String>> {
        Ok(self
            .get_item(key_pk(key_sha256), "KEY")
            .await?
            .and_then(|i| get_s(&i, "tenant").map(str::to_string)))
    }
}

/// The shared rate limit: one item per key, read consistently, changed by the core's maths and
/// written back only if nobody wrote it since (its `ver`); a lost race reads again. One read
/// and one write per grant; a denied take writes nothing.
#[async_trait]
impl RateLimitStore for DynamoRepository {
    async fn apply_limit(
        &self,
        key: &str,
        limits: &Limits,
        op: &LimitOp,
        clock: Arc<dyn Clock>,
    ) -> StoreResult<LimitOutcome> {
        for round in 0..LIMIT_ROUNDS {
            let item = self.get_item(limit_pk(key), "LIMIT").await?;
            let now_ms = clock.now_ms();
            let mut state = item
                .as_ref()
                .map(|i| LimitState {
                    requests_full_at_ms: get_f64(i, "rq"),
                    tokens_full_at_ms: get_f64(i, "tk"),
                    not_before_ms: get_f64(i, "nb"),
                })
                .unwrap_or_default();
            let outcome = state.apply(limits, op, now_ms);
            if !outcome.changes_state() {
                return Ok(outcome);
            }
            let ver = item.as_ref().map(|i| get_u64(i, "ver"));
            let mut put = self
                .client
                .put_item()
                .table_name(&self.table)
                .item("pk", s(limit_pk(key)))
                .item("sk", s("LIMIT"))
                .item("rq", nf(state.requests_full_at_ms))
                .item("tk", nf(state.tokens_full_at_ms))
                .item("nb", nf(state.not_before_ms))
                .item("ver", n(ver.unwrap_or(0) + 1))
                .item("expires_at", n(now_ms / 1000 + LIMIT_TTL_SECS));
            put = match ver {
                Some(v) => put
                    .condition_expression("ver = :ver")
                    .expression_attribute_values(":ver", n(v)),
                None => put.condition_expression("attribute_not_exists(pk)"),
            };
            match put.send().await {
                Ok(_) => return Ok(outcome),
                // Another instance wrote first: read its state and decide again.
                Err(e) if is_conditional_failure(&e) => {
                    let spread = 4u64 << round.min(4);
                    tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % spread)).await;
                }
                Err(e) => return Err(sdk_err("dynamodb PutItem rate limit", e)),
            }
        }
        Err(StoreError::Transient(format!(
            "the shared rate limit {key} kept changing"
        )))
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
    fn pending_records_expire_the_pending_ttl_after_their_creation() {
        // 2026-01-01T00:00:00Z is 1767225600.
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(
            pending_expiry("2026-01-01T00:00:00.000Z", week),
            Some(1_767_225_600 + 7 * 86_400)
        );
        assert_eq!(pending_expiry("yesterday", week), None);
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
