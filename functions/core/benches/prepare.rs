//! Prepare the reference 12 MP phone photo (EXIF orientation 6) to a 1024-px JPEG.
use criterion::{criterion_group, criterion_main, Criterion};
use sightline_core::{prepare, PrepareOptions};

fn bench(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/large/phone12mp.jpg");
    let phone = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (the benchmark input)", path.display()));
    let opts = PrepareOptions::default();
    let mut g = c.benchmark_group("prepare");
    g.sample_size(20);
    g.bench_function("phone12mp_to_1024", |b| {
        b.iter(|| prepare(&phone, &opts).map(|p| p.bytes))
    });
    // Baseline in the same run: decode alone with the `image` crate.
    g.bench_function("baseline_image_decode_only", |b| {
        b.iter(|| image::load_from_memory(&phone).map(|i| i.width()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
