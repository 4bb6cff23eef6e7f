//! Vector store on Amazon S3 Vectors: one vector bucket, one index per embedding space
//! ([`VectorIndex::name`]: model and dimension), cosine distance.
//!
//! Each image's vector is stored under the key `{tenant}/{image_id}` with filterable metadata
//! `{tenant, model, image_id, status, tags}`. Every query carries a `tenant` metadata filter,
//! and hits are checked against the tenant again before they are returned, so no tenant ever
//! sees another's images. Tenants may not contain `/`, which keeps keys unambiguous.
//!
//! Unlike the port's exact search, QueryVectors is an approximate nearest-neighbour search on
//! AWS: a hit may occasionally be missing from the top k (the emulator's search is exact).

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_s3vectors::types::{DataType, DistanceMetric, PutInputVector, VectorData};
use aws_sdk_s3vectors::Client;
use aws_smithy_types::{Document, Number};
use serde::{Deserialize, Serialize};

use super::sdk_err;
use crate::ports::{
    StoreError, StoreResult, VectorHit, VectorIndex, VectorMeta, VectorQuery, VectorRecord,
    VectorStore, MAX_TOP_K,
};

/// Vectors per PutVectors and keys per DeleteVectors call (the API's limit).
const MAX_WRITE_BATCH: usize = 500;
/// A PutVectors request may be at most 20 MiB; batches aim below this, since vectors are sent
/// as JSON numbers whose length varies.
const PUT_PAYLOAD_BUDGET: usize = 16 * 1024 * 1024;
/// Room one float32 takes in a request at most (a JSON number like `-0.0123456789,`).
const BYTES_PER_VALUE: usize = 16;
/// Filterable metadata may be 2 KB per vector. AWS does not document how it measures it, so
/// the compact JSON of the metadata is kept well under that; tags beyond it are dropped.
const FILTERABLE_METADATA_BUDGET: usize = 1800;
/// Vector keys are at most 1,024 characters.
const MAX_KEY_CHARS: usize = 1024;

/// What is stored beside each vector. All of it is filterable (the index declares no
/// non-filterable keys): `tenant` isolates tenants, `tags` serves the tag filter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredMeta {
    tenant: String,
    model: String,
    image_id: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    tags: Vec<String>,
}

/// Vectors in one S3 vector bucket (created by the template; its indexes are created on
/// demand by [`VectorStore::ensure_index`]).
#[derive(Debug)]
pub struct S3VectorStore {
    client: Client,
    bucket: String,
    /// Indexes known to exist, so a warm function does not call CreateIndex for every image.
    known_indexes: Mutex<HashSet<String>>,
}

impl S3VectorStore {
    pub fn new(client: Client, bucket: impl Into<String>) -> S3VectorStore {
        S3VectorStore {
            client,
            bucket: bucket.into(),
            known_indexes: Mutex::new(HashSet::new()),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn is_known(&self, index: &str) -> bool {
        // A poisoned lock only means another thread panicked mid-insert; the set is still a
        // valid cache (at worst CreateIndex is called once more).
        self.known_indexes
            .lock()
            .map(|s| s.contains(index))
            .unwrap_or(false)
    }

    fn remember(&self, index: String) {
        if let Ok(mut s) = self.known_indexes.lock() {
            s.insert(index);
        }
    }

    fn forget(&self, index: &str) {
        if let Ok(mut s) = self.known_indexes.lock() {
            s.remove(index);
        }
    }

    /// Every index of the bucket, by name.
    async fn index_names(&self) -> StoreResult<Vec<String>> {
        let mut names = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .list_indexes()
                .vector_bucket_name(&self.bucket)
                .set_next_token(token.take())
                .send()
                .await
                .map_err(|e| sdk_err("s3vectors ListIndexes", e))?;
            names.extend(out.indexes.into_iter().map(|i| i.index_name));
            match out.next_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => return Ok(names),
            }
        }
    }
}

/// The key of an image's vector. Tenants cannot contain `/`, so the first `/` separates the
/// two and no two (tenant, image) pairs share a key.
fn vector_key(tenant: &str, image_id: &str) -> StoreResult<String> {
    check_tenant(tenant)?;
    if image_id.is_empty() {
        return Err(StoreError::InvalidInput("empty image id".into()));
    }
    let key = format!("{tenant}/{image_id}");
    if key.chars().count() > MAX_KEY_CHARS {
        return Err(StoreError::InvalidInput(format!(
            "vector key of {tenant}/{image_id} is over {MAX_KEY_CHARS} characters"
        )));
    }
    Ok(key)
}

fn check_tenant(tenant: &str) -> StoreResult<()> {
    if tenant.is_empty() || tenant.contains('/') {
        return Err(StoreError::InvalidInput(format!(
            "tenant {tenant:?} cannot key vectors (empty or containing '/')"
        )));
    }
    Ok(())
}

/// A vector S3 Vectors accepts in a cosine index: the index's dimension, finite values and
/// not all zero (a zero vector has no direction).
fn check_vector(index: &VectorIndex, vector: &[f32], what: &str) -> StoreResult<()> {
    if vector.len() != index.dims as usize {
        return Err(StoreError::InvalidInput(format!(
            "{what} has {} dimensions, index {} has {}",
            vector.len(),
            index.name(),
            index.dims
        )));
    }
    if !vector.iter().all(|x| x.is_finite()) {
        return Err(StoreError::InvalidInput(format!(
            "{what} has a non-finite value"
        )));
    }
    if vector.iter().all(|x| *x == 0.0) {
        return Err(StoreError::InvalidInput(format!(
            "{what} is all zeros (no cosine distance)"
        )));
    }
    Ok(())
}

/// The metadata of a record, its tags cut (with a warning) to keep within the filterable
/// metadata limit; refused when even without tags it would not fit.
fn stored_meta(index: &VectorIndex, record: &VectorRecord) -> StoreResult<serde_json::Value> {
    let mut meta = StoredMeta {
        tenant: record.tenant.clone(),
        model: index.model.clone(),
        image_id: record.image_id.clone(),
        status: record.meta.status.clone(),
        tags: record.meta.tags.clone(),
    };
    let size = |m: &StoredMeta| serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
    let tags = meta.tags.len();
    while size(&meta) > FILTERABLE_METADATA_BUDGET && meta.tags.pop().is_some() {}
    if size(&meta) > FILTERABLE_METADATA_BUDGET {
        return Err(StoreError::InvalidInput(format!(
            "metadata of {}/{} is over {FILTERABLE_METADATA_BUDGET} bytes without tags",
            record.tenant, record.image_id
        )));
    }
    if meta.tags.len() < tags {
        tracing::warn!(
            tenant = %record.tenant,
            image_id = %record.image_id,
            kept = meta.tags.len(),
            dropped = tags - meta.tags.len(),
            "vector metadata over the filterable limit: tags dropped from the vector (the image keeps them)"
        );
    }
    serde_json::to_value(&meta)
        .map_err(|e| StoreError::Permanent(format!("vector metadata of {}: {e}", meta.image_id)))
}

/// Records per PutVectors call: at most [`MAX_WRITE_BATCH`], fewer for large vectors so a
/// request stays under the payload limit.
fn put_batch_size(dims: u32) -> usize {
    let per_vector = dims as usize * BYTES_PER_VALUE + FILTERABLE_METADATA_BUDGET + MAX_KEY_CHARS;
    (PUT_PAYLOAD_BUDGET / per_vector).clamp(1, MAX_WRITE_BATCH)
}

/// serde_json → Smithy document (metadata and filters travel as documents).
fn to_document(value: serde_json::Value) -> Document {
    use serde_json::Value;
    match value {
        Value::Null => Document::Null,
        Value::Bool(b) => Document::Bool(b),
        Value::Number(n) => Document::Number(if let Some(u) = n.as_u64() {
            Number::PosInt(u)
        } else if let Some(i) = n.as_i64() {
            Number::NegInt(i)
        } else {
            Number::Float(n.as_f64().unwrap_or(0.0))
        }),
        Value::String(s) => Document::String(s),
        Value::Array(a) => Document::Array(a.into_iter().map(to_document).collect()),
        Value::Object(o) => {
            Document::Object(o.into_iter().map(|(k, v)| (k, to_document(v))).collect())
        }
    }
}

/// Smithy document → serde_json (metadata coming back).
fn from_document(doc: &Document) -> serde_json::Value {
    use serde_json::Value;
    match doc {
        Document::Null => Value::Null,
        Document::Bool(b) => Value::Bool(*b),
        Document::Number(Number::PosInt(u)) => Value::from(*u),
        Document::Number(Number::NegInt(i)) => Value::from(*i),
        Document::Number(Number::Float(f)) => {
            serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
        }
        Document::String(s) => Value::String(s.clone()),
        Document::Array(a) => Value::Array(a.iter().map(from_document).collect()),
        Document::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), from_document(v)))
                .collect(),
        ),
    }
}

fn parse_meta(doc: Option<&Document>, key: &str) -> StoreResult<StoredMeta> {
    let doc = doc.ok_or_else(|| StoreError::Permanent(format!("vector {key} has no metadata")))?;
    serde_json::from_value(from_document(doc))
        .map_err(|e| StoreError::Permanent(format!("metadata of vector {key}: {e}")))
}

/// The query's metadata filter: the tenant always, the tag when asked (a list-valued `tags`
/// matches when any element equals the value).
fn query_filter(query: &VectorQuery) -> Document {
    let tenant = serde_json::json!({ "tenant": query.tenant });
    let filter = match &query.tag {
        Some(tag) => serde_json::json!({ "$and": [tenant, { "tags": tag }] }),
        None => tenant,
    };
    to_document(filter)
}

#[async_trait]
impl VectorStore for S3VectorStore {
    async fn ensure_index(&self, index: &VectorIndex) -> StoreResult<()> {
        let name = index.name();
        if self.is_known(&name) {
            return Ok(());
        }
        let dimension = i32::try_from(index.dims)
            .map_err(|_| StoreError::InvalidInput(format!("dimension {}", index.dims)))?;
        match self
            .client
            .create_index()
            .vector_bucket_name(&self.bucket)
            .index_name(&name)
            .data_type(DataType::Float32)
            .dimension(dimension)
            .distance_metric(DistanceMetric::Cosine)
            .send()
            .await
        {
            Ok(_) => {
                tracing::info!(bucket = %self.bucket, index = %name, "created vector index");
            }
            // Created earlier, by another instance or by the template.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conflict_exception()) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_not_found_exception()) =>
            {
                return Err(StoreError::Permanent(format!(
                    "s3vectors CreateIndex {name}: vector bucket {} does not exist",
                    self.bucket
                )));
            }
            Err(e) => return Err(sdk_err("s3vectors CreateIndex", e)),
        }
        self.remember(name);
        Ok(())
    }

    async fn put_vectors(&self, index: &VectorIndex, records: &[VectorRecord]) -> StoreResult<()> {
        // Everything is checked before the first call, so a bad record writes nothing. The
        // last record of a key wins, as it would across calls.
        let mut by_key: BTreeMap<String, PutInputVector> = BTreeMap::new();
        for record in records {
            let key = vector_key(&record.tenant, &record.image_id)?;
            check_vector(
                index,
                &record.vector,
                &format!("vector of {}/{}", record.tenant, record.image_id),
            )?;
            let vector = PutInputVector::builder()
                .key(&key)
                .data(VectorData::Float32(record.vector.clone()))
                .metadata(to_document(stored_meta(index, record)?))
                .build()
                .map_err(|e| StoreError::Permanent(format!("s3vectors vector {key}: {e}")))?;
            by_key.insert(key, vector);
        }
        let name = index.name();
        let vectors: Vec<PutInputVector> = by_key.into_values().collect();
        for batch in vectors.chunks(put_batch_size(index.dims)) {
            match self
                .client
                .put_vectors()
                .vector_bucket_name(&self.bucket)
                .index_name(&name)
                .set_vectors(Some(batch.to_vec()))
                .send()
                .await
            {
                Ok(_) => {}
                // The index was deleted since it was ensured (cached): forget it, so the retry's
                // ensure_index creates it again.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_not_found_exception()) =>
                {
                    self.forget(&name);
                    return Err(StoreError::Transient(format!(
                        "s3vectors PutVectors: index {name} of vector bucket {} not found",
                        self.bucket
                    )));
                }
                Err(e) => return Err(sdk_err("s3vectors PutVectors", e)),
            }
        }
        Ok(())
    }

    async fn get_vector(
        &self,
        index: &VectorIndex,
        tenant: &str,
        image_id: &str,
    ) -> StoreResult<Option<VectorRecord>> {
        let key = vector_key(tenant, image_id)?;
        let out = match self
            .client
            .get_vectors()
            .vector_bucket_name(&self.bucket)
            .index_name(index.name())
            .keys(&key)
            .return_data(true)
            .return_metadata(true)
            .send()
            .await
        {
            Ok(out) => out,
            // No index yet: nothing stored in it.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_not_found_exception()) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(sdk_err("s3vectors GetVectors", e)),
        };
        let Some(found) = out.vectors.into_iter().find(|v| v.key == key) else {
            return Ok(None);
        };
        let vector = match found.data {
            Some(VectorData::Float32(v)) => v,
            other => {
                return Err(StoreError::Permanent(format!(
                    "vector {key} came back without float32 data ({other:?})"
                )))
            }
        };
        let meta = parse_meta(found.metadata.as_ref(), &key)?;
        Ok(Some(VectorRecord {
            tenant: tenant.to_string(),
            image_id: image_id.to_string(),
            vector,
            meta: VectorMeta {
                status: meta.status,
                tags: meta.tags,
            },
        }))
    }

    async fn delete_vectors(&self, tenant: &str, image_ids: &[String]) -> StoreResult<()> {
        let keys = image_ids
            .iter()
            .map(|id| vector_key(tenant, id))
            .collect::<StoreResult<Vec<_>>>()?;
        if keys.is_empty() {
            return Ok(());
        }
        // An image may have vectors in any index (one per model it was embedded with).
        for name in self.index_names().await? {
            for batch in keys.chunks(MAX_WRITE_BATCH) {
                match self
                    .client
                    .delete_vectors()
                    .vector_bucket_name(&self.bucket)
                    .index_name(&name)
                    .set_keys(Some(batch.to_vec()))
                    .send()
                    .await
                {
                    Ok(_) => {}
                    // Deleted since it was listed: its vectors are gone with it.
                    Err(e)
                        if e.as_service_error()
                            .is_some_and(|s| s.is_not_found_exception()) =>
                    {
                        break
                    }
                    Err(e) => return Err(sdk_err("s3vectors DeleteVectors", e)),
                }
            }
        }
        Ok(())
    }

    async fn query(&self, index: &VectorIndex, query: &VectorQuery) -> StoreResult<Vec<VectorHit>> {
        check_tenant(&query.tenant)?;
        check_vector(index, &query.vector, "query vector")?;
        let top_k = query.top_k.min(MAX_TOP_K);
        if top_k == 0 {
            return Ok(Vec::new());
        }
        let name = index.name();
        let out = match self
            .client
            .query_vectors()
            .vector_bucket_name(&self.bucket)
            .index_name(&name)
            .top_k(top_k as i32)
            .query_vector(VectorData::Float32(query.vector.clone()))
            .filter(query_filter(query))
            .return_distance(true)
            .return_metadata(true)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_not_found_exception()) =>
            {
                return Ok(Vec::new())
            }
            Err(e) => return Err(sdk_err("s3vectors QueryVectors", e)),
        };
        // Distances are only cosine distances (what the port promises) in a cosine index; one
        // created by hand with another metric must not pass silently.
        if let Some(metric) = out.distance_metric.as_ref() {
            if *metric != DistanceMetric::Cosine {
                return Err(StoreError::Permanent(format!(
                    "vector index {name} uses {metric} distance, not cosine"
                )));
            }
        }
        let prefix = format!("{}/", query.tenant);
        let mut hits = Vec::with_capacity(out.vectors.len());
        for v in out.vectors {
            let meta = parse_meta(v.metadata.as_ref(), &v.key)?;
            // The filter already keeps other tenants out; this check makes sure a mistake in
            // it could never show them.
            let Some(image_id) = v.key.strip_prefix(&prefix) else {
                tracing::error!(key = %v.key, tenant = %query.tenant, "vector query returned another tenant's key; dropped");
                continue;
            };
            if meta.tenant != query.tenant {
                tracing::error!(key = %v.key, tenant = %query.tenant, "vector query returned another tenant's metadata; dropped");
                continue;
            }
            let distance = v.distance.ok_or_else(|| {
                StoreError::Permanent(format!("vector query hit {} has no distance", v.key))
            })?;
            hits.push(VectorHit {
                image_id: image_id.to_string(),
                distance,
                meta: VectorMeta {
                    status: meta.status,
                    tags: meta.tags,
                },
            });
        }
        hits.sort_by(|a, b| {
            a.distance
                .total_cmp(&b.distance)
                .then_with(|| a.image_id.cmp(&b.image_id))
        });
        Ok(hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tags: Vec<String>) -> VectorRecord {
        VectorRecord {
            tenant: "t".into(),
            image_id: "img".into(),
            vector: vec![1.0, 0.0],
            meta: VectorMeta {
                status: "done".into(),
                tags,
            },
        }
    }

    #[test]
    fn keys_are_unambiguous() {
        assert_eq!(vector_key("t", "a/b").unwrap(), "t/a/b");
        assert!(matches!(
            vector_key("t/a", "b"),
            Err(StoreError::InvalidInput(_))
        ));
        assert!(matches!(
            vector_key("", "b"),
            Err(StoreError::InvalidInput(_))
        ));
        assert!(matches!(
            vector_key("t", ""),
            Err(StoreError::InvalidInput(_))
        ));
        let long = "x".repeat(MAX_KEY_CHARS);
        assert!(matches!(
            vector_key("t", &long),
            Err(StoreError::InvalidInput(_))
        ));
    }

    #[test]
    fn vectors_are_checked() {
        let index = VectorIndex::new("m", 2);
        assert!(check_vector(&index, &[0.6, 0.8], "v").is_ok());
        for bad in [
            &[1.0][..],
            &[0.0, 0.0],
            &[f32::NAN, 1.0],
            &[f32::INFINITY, 0.0],
        ] {
            assert!(
                matches!(
                    check_vector(&index, bad, "v"),
                    Err(StoreError::InvalidInput(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn metadata_keeps_within_the_filterable_limit() {
        let index = VectorIndex::new("m", 2);
        let meta = stored_meta(&index, &record(vec!["a".into(), "b".into()])).unwrap();
        assert_eq!(
            meta,
            serde_json::json!({"tenant": "t", "model": "m", "image_id": "img", "status": "done", "tags": ["a", "b"]})
        );
        let many: Vec<String> = (0..500).map(|i| format!("tag-{i:03}")).collect();
        let meta = stored_meta(&index, &record(many.clone())).unwrap();
        let kept = meta["tags"].as_array().unwrap();
        assert!(!kept.is_empty() && kept.len() < many.len());
        assert_eq!(kept[0], "tag-000"); // the first tags are kept
        assert!(serde_json::to_vec(&meta).unwrap().len() <= FILTERABLE_METADATA_BUDGET);
    }

    #[test]
    fn batches_respect_count_and_payload_limits() {
        assert_eq!(put_batch_size(256), MAX_WRITE_BATCH);
        let big = put_batch_size(4096);
        assert!(big < MAX_WRITE_BATCH);
        assert!(big * (4096 * BYTES_PER_VALUE) < 20 * 1024 * 1024);
    }

    #[test]
    fn documents_round_trip() {
        let value = serde_json::json!({
            "s": "x", "b": true, "n": 3, "neg": -2, "f": 0.5, "a": ["y", 1], "null": null
        });
        assert_eq!(from_document(&to_document(value.clone())), value);
    }

    #[test]
    fn queries_filter_on_tenant_and_tag() {
        let mut q = VectorQuery {
            tenant: "t".into(),
            vector: vec![1.0],
            top_k: 3,
            tag: None,
        };
        assert_eq!(
            from_document(&query_filter(&q)),
            serde_json::json!({"tenant": "t"})
        );
        q.tag = Some("shoe".into());
        assert_eq!(
            from_document(&query_filter(&q)),
            serde_json::json!({"$and": [{"tenant": "t"}, {"tags": "shoe"}]})
        );
    }
}
