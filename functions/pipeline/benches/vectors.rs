//! Vector search on the embedded default: median latency of one exact cosine query (top 10,
//! one tenant) over 10k and 100k stored vectors of the offline embedder's dimension, in
//! sqlite-vec inside the project's SQLite database. The baseline measured in the same run is
//! a plain Rust scan over the same vectors in memory (what sqlite-vec's scan costs on top of
//! the arithmetic). `cargo bench -p sightline-pipeline --bench vectors`.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sightline_core::embed::{cosine_distance, LOCAL_EMBED_DIMS, LOCAL_EMBED_MODEL};
use sightline_pipeline::local::{SqliteDb, SqliteVectorStore};
use sightline_pipeline::ports::{VectorIndex, VectorMeta, VectorQuery, VectorRecord, VectorStore};

/// Deterministic pseudo-random unit vectors (xorshift), no extra dependency.
fn vectors(n: usize, dims: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            let mut v: Vec<f32> = (0..dims)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    (s % 20_001) as f32 / 10_000.0 - 1.0
                })
                .collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-9);
            v.iter_mut().for_each(|x| *x /= norm);
            v
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dims = LOCAL_EMBED_DIMS;
    let index = VectorIndex::new(LOCAL_EMBED_MODEL, dims as u32);
    let mut group = c.benchmark_group("vector_query_top10");
    group.sample_size(20);
    for n in [10_000usize, 100_000] {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = SqliteDb::open(&dir.path().join("bench.db")).expect("db");
        let store: Arc<dyn VectorStore> = Arc::new(SqliteVectorStore::new(db));
        let all = vectors(n, dims, 7);
        rt.block_on(async {
            store.ensure_index(&index).await.expect("index");
            // Another tenant's vectors share the table: the query must skip them by index.
            for (tenant, chunk) in [("bench", &all[..]), ("other", &all[..n / 10])] {
                for (i, part) in chunk.chunks(5_000).enumerate() {
                    let records: Vec<VectorRecord> = part
                        .iter()
                        .enumerate()
                        .map(|(j, v)| VectorRecord {
                            tenant: tenant.into(),
                            image_id: format!("img-{}", i * 5_000 + j),
                            vector: v.clone(),
                            meta: VectorMeta::default(),
                        })
                        .collect();
                    store.put_vectors(&index, &records).await.expect("put");
                }
            }
        });
        let query = vectors(1, dims, 99).remove(0);
        group.bench_with_input(BenchmarkId::new("sqlite_vec", n), &n, |b, _| {
            b.iter(|| {
                rt.block_on(store.query(
                    &index,
                    &VectorQuery {
                        tenant: "bench".into(),
                        vector: query.clone(),
                        top_k: 10,
                        tag: None,
                    },
                ))
                .expect("query")
            })
        });
        group.bench_with_input(BenchmarkId::new("rust_scan_in_memory", n), &n, |b, _| {
            b.iter(|| {
                let mut d: Vec<(f32, usize)> = all
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (cosine_distance(&query, v), i))
                    .collect();
                d.select_nth_unstable_by(9, |a, b| a.0.total_cmp(&b.0));
                d.truncate(10);
                d
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
