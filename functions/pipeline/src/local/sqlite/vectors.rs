//! Image vectors in the same SQLite database, searched exactly with sqlite-vec's
//! `vec_distance_cosine` (every vector of the tenant in the index is scored: no approximate
//! index to tune or to drift). Vectors are stored as little-endian f32 blobs, the format
//! sqlite-vec reads.

use super::{db_err, json_err, write_tx, SqliteDb};
use crate::ports::{
    StoreError, StoreResult, VectorHit, VectorIndex, VectorMeta, VectorQuery, VectorRecord,
    VectorStore, MAX_TOP_K,
};
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension};

/// The vector store over a [`SqliteDb`].
#[derive(Clone)]
pub struct SqliteVectorStore {
    db: SqliteDb,
}

impl SqliteVectorStore {
    pub fn new(db: SqliteDb) -> SqliteVectorStore {
        SqliteVectorStore { db }
    }
}

fn to_blob(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_blob(blob: &[u8]) -> Vec<f32> {
    blob.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn check_dims(index: &VectorIndex, vector: &[f32]) -> StoreResult<()> {
    if vector.len() != index.dims as usize {
        return Err(StoreError::InvalidInput(format!(
            "a vector of {} dimensions does not fit index {} ({} dimensions)",
            vector.len(),
            index.name(),
            index.dims
        )));
    }
    if vector.iter().any(|x| !x.is_finite()) {
        return Err(StoreError::InvalidInput(
            "a vector holds a NaN or infinite value".into(),
        ));
    }
    Ok(())
}

fn meta_of(status: String, tags: &str) -> StoreResult<VectorMeta> {
    Ok(VectorMeta {
        status,
        tags: serde_json::from_str(tags).map_err(json_err)?,
    })
}

#[async_trait]
impl VectorStore for SqliteVectorStore {
    async fn ensure_index(&self, index: &VectorIndex) -> StoreResult<()> {
        let index = index.clone();
        self.db
            .with(move |c| {
                c.execute(
                    "INSERT INTO vector_indexes (name, model, dims) VALUES (?1, ?2, ?3)
                     ON CONFLICT (name) DO NOTHING",
                    params![index.name(), index.model, index.dims],
                )
                .map_err(db_err)?;
                Ok(())
            })
            .await
    }

    async fn put_vectors(&self, index: &VectorIndex, records: &[VectorRecord]) -> StoreResult<()> {
        for r in records {
            check_dims(index, &r.vector)?;
        }
        let name = index.name();
        let rows: Vec<(String, String, Vec<u8>, String, String)> = records
            .iter()
            .map(|r| {
                Ok((
                    r.tenant.clone(),
                    r.image_id.clone(),
                    to_blob(&r.vector),
                    r.meta.status.clone(),
                    serde_json::to_string(&r.meta.tags).map_err(json_err)?,
                ))
            })
            .collect::<StoreResult<_>>()?;
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                let known: bool = tx
                    .prepare("SELECT 1 FROM vector_indexes WHERE name = ?1")
                    .and_then(|mut s| s.exists(params![name]))
                    .map_err(db_err)?;
                if !known {
                    return Err(StoreError::NotFound(format!("vector index {name}")));
                }
                {
                    let mut put = tx
                        .prepare(
                            "INSERT INTO vectors (index_name, tenant, image_id, vector, status, tags)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                             ON CONFLICT (index_name, tenant, image_id)
                             DO UPDATE SET vector = ?4, status = ?5, tags = ?6",
                        )
                        .map_err(db_err)?;
                    for (tenant, image_id, blob, status, tags) in rows {
                        put.execute(params![name, tenant, image_id, blob, status, tags])
                            .map_err(db_err)?;
                    }
                }
                tx.commit().map_err(db_err)
            })
            .await
    }

    async fn get_vector(
        &self,
        index: &VectorIndex,
        tenant: &str,
        image_id: &str,
    ) -> StoreResult<Option<VectorRecord>> {
        let (name, tenant, image_id) = (index.name(), tenant.to_string(), image_id.to_string());
        self.db
            .with(move |c| {
                let row: Option<(Vec<u8>, String, String)> = c
                    .query_row(
                        "SELECT vector, status, tags FROM vectors
                         WHERE index_name = ?1 AND tenant = ?2 AND image_id = ?3",
                        params![name, tenant, image_id],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()
                    .map_err(db_err)?;
                row.map(|(blob, status, tags)| {
                    Ok(VectorRecord {
                        tenant: tenant.clone(),
                        image_id: image_id.clone(),
                        vector: from_blob(&blob),
                        meta: meta_of(status, &tags)?,
                    })
                })
                .transpose()
            })
            .await
    }

    async fn delete_vectors(&self, tenant: &str, image_ids: &[String]) -> StoreResult<()> {
        let (tenant, ids) = (tenant.to_string(), image_ids.to_vec());
        self.db
            .with(move |c| {
                let tx = write_tx(c)?;
                {
                    let mut delete = tx
                        .prepare("DELETE FROM vectors WHERE tenant = ?1 AND image_id = ?2")
                        .map_err(db_err)?;
                    for id in ids {
                        delete.execute(params![tenant, id]).map_err(db_err)?;
                    }
                }
                tx.commit().map_err(db_err)
            })
            .await
    }

    async fn query(&self, index: &VectorIndex, query: &VectorQuery) -> StoreResult<Vec<VectorHit>> {
        check_dims(index, &query.vector)?;
        if query.top_k == 0 || query.top_k > MAX_TOP_K {
            return Err(StoreError::InvalidInput(format!(
                "top_k must be 1..={MAX_TOP_K}, not {}",
                query.top_k
            )));
        }
        let name = index.name();
        let query = query.clone();
        self.db
            .with(move |c| {
                let mut stmt = c
                    .prepare_cached(
                        "SELECT image_id, vec_distance_cosine(vector, ?1) AS d, status, tags
                         FROM vectors
                         WHERE index_name = ?2 AND tenant = ?3
                           AND (?4 IS NULL
                                OR EXISTS (SELECT 1 FROM json_each(vectors.tags) WHERE value = ?4))
                         ORDER BY d, image_id LIMIT ?5",
                    )
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(
                        params![
                            to_blob(&query.vector),
                            name,
                            query.tenant,
                            query.tag,
                            query.top_k as i64
                        ],
                        |r| {
                            Ok((
                                r.get::<_, String>(0)?,
                                r.get::<_, f64>(1)?,
                                r.get::<_, String>(2)?,
                                r.get::<_, String>(3)?,
                            ))
                        },
                    )
                    .map_err(db_err)?;
                let mut hits = Vec::new();
                for row in rows {
                    let (image_id, distance, status, tags) = row.map_err(db_err)?;
                    hits.push(VectorHit {
                        image_id,
                        distance: distance as f32,
                        meta: meta_of(status, &tags)?,
                    });
                }
                Ok(hits)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_round_trip_as_little_endian_f32() {
        let v = vec![1.0f32, -0.5, 3.25e-7, f32::MAX];
        let blob = to_blob(&v);
        assert_eq!(blob.len(), 16);
        assert_eq!(&blob[..4], &1.0f32.to_le_bytes());
        assert_eq!(from_blob(&blob), v);
    }

    #[tokio::test]
    async fn sqlite_vec_scores_cosine_distance() {
        let db = SqliteDb::in_memory().unwrap();
        let store = SqliteVectorStore::new(db);
        let index = VectorIndex::new("m", 2);
        store.ensure_index(&index).await.unwrap();
        let rec = |id: &str, v: Vec<f32>| VectorRecord {
            tenant: "t".into(),
            image_id: id.into(),
            vector: v,
            meta: VectorMeta::default(),
        };
        store
            .put_vectors(
                &index,
                &[rec("x", vec![1.0, 0.0]), rec("y", vec![0.0, 1.0])],
            )
            .await
            .unwrap();
        let hits = store
            .query(
                &index,
                &VectorQuery {
                    tenant: "t".into(),
                    vector: vec![1.0, 0.0],
                    top_k: 2,
                    tag: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(hits[0].image_id, "x");
        assert!(hits[0].distance.abs() < 1e-6);
        assert!((hits[1].distance - 1.0).abs() < 1e-6);
    }

    #[tokio::test]
    async fn a_nan_vector_is_refused() {
        let store = SqliteVectorStore::new(SqliteDb::in_memory().unwrap());
        let index = VectorIndex::new("m", 2);
        store.ensure_index(&index).await.unwrap();
        let err = store
            .put_vectors(
                &index,
                &[VectorRecord {
                    tenant: "t".into(),
                    image_id: "x".into(),
                    vector: vec![f32::NAN, 0.0],
                    meta: VectorMeta::default(),
                }],
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidInput(_)), "{err}");
    }
}
