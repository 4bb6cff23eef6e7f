//! The local visual embedding: from the pipeline's prepared 1024-px JPEG (decode at a reduced
//! DCT scale, then the features), the features alone on decoded pixels, and embedding plus
//! perceptual hashes from one decode (what the near-duplicate check needs).
use criterion::{criterion_group, criterion_main, Criterion};
use sightline_core::embed::{embed_rgb, perceptual_hashes, visual_embedding, visual_signature};
use sightline_core::{prepare, PrepareOptions};

fn fixture(rel: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (a benchmark input)", path.display()))
}

fn bench(c: &mut Criterion) {
    // What the pipeline embeds: Garden.jpg (2560x1600) prepared to 1024x640, q85.
    let jpeg = prepare(&fixture("photos/Garden.jpg"), &PrepareOptions::default())
        .unwrap()
        .jpeg;
    let full = image::load_from_memory(&jpeg).unwrap().into_rgb8();
    // The size visual_embedding hands to embed_rgb (its decode fits 256 px).
    let small = image::imageops::resize(&full, 256, 160, image::imageops::FilterType::Triangle);
    let mut g = c.benchmark_group("embed");
    g.sample_size(50);
    g.bench_function("visual_embedding_1024_jpeg", |b| {
        b.iter(|| visual_embedding(&jpeg).map(|v| v.len()))
    });
    g.bench_function("visual_signature_1024_jpeg", |b| {
        b.iter(|| visual_signature(&jpeg).map(|s| s.hashes.hash))
    });
    g.bench_function("embed_rgb_1024", |b| b.iter(|| embed_rgb(&full).len()));
    g.bench_function("embed_rgb_256", |b| b.iter(|| embed_rgb(&small).len()));
    g.bench_function("perceptual_hashes_256", |b| {
        b.iter(|| perceptual_hashes(&small).hash)
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
