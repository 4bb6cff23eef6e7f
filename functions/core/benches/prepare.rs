//! Prepare the reference 12 MP phone photo (EXIF orientation 6) to a 1024-px JPEG; the same
//! photo carrying a Display P3 profile (as every recent iPhone photo does), and a profiled
//! CMYK JPEG.
use criterion::{criterion_group, criterion_main, Criterion};
use sightline_core::{prepare, PrepareOptions};

fn fixture(rel: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (a benchmark input)", path.display()))
}

/// `jpeg` with `profile` in one APP2 ICC_PROFILE marker right after SOI.
fn with_profile(jpeg: &[u8], profile: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE2]);
    out.extend_from_slice(&((16 + profile.len()) as u16).to_be_bytes());
    out.extend_from_slice(b"ICC_PROFILE\0\x01\x01");
    out.extend_from_slice(profile);
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn bench(c: &mut Criterion) {
    let phone = fixture("large/phone12mp.jpg");
    let phone_p3 = with_profile(&phone, &fixture("../fixtures-icc/display-p3.icc"));
    let cmyk = fixture("../fixtures-icc/cmyk_astronaut.jpg");
    let opts = PrepareOptions::default();
    let mut g = c.benchmark_group("prepare");
    g.sample_size(20);
    g.bench_function("phone12mp_to_1024", |b| {
        b.iter(|| prepare(&phone, &opts).map(|p| p.bytes))
    });
    g.bench_function("phone12mp_display_p3_to_1024", |b| {
        b.iter(|| prepare(&phone_p3, &opts).map(|p| p.bytes))
    });
    g.bench_function("cmyk_profiled_512", |b| {
        b.iter(|| prepare(&cmyk, &opts).map(|p| p.bytes))
    });
    // Baseline in the same run: decode alone with the `image` crate.
    g.bench_function("baseline_image_decode_only", |b| {
        b.iter(|| image::load_from_memory(&phone).map(|i| i.width()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
