//! Evaluation of the local visual embedding and the near-duplicate rule on the repository's
//! own photos (a module of the `prepare` test binary: one integration-test binary per crate).
//!
//! 10 source photos, 5 copies of each made here (resized to 50 %, re-encoded at JPEG q50,
//! cropped 10 %, brightened 15 %, mirrored) and 50 unrelated images (tiles of three photos
//! that are not sources). Every image goes through what the pipeline does before embedding:
//! `prepare` with default options (≤ 1024 px, JPEG q85), then `visual_signature` of that JPEG.
//!
//! Asserted (the "done when"): recall@5 of the copies, with each source as the query
//! over everything else, is at least 0.9; `NearDupThreshold::default()` reuses at least 90 %
//! of the (source, copy) pairs and none of the (source, unrelated) or (source, other source)
//! pairs. The figures are printed (`--nocapture`) for the notes.
use std::io::Cursor;
use std::path::PathBuf;
use std::time::Instant;

use image::{imageops, DynamicImage, ImageFormat, RgbImage};
use sightline_core::embed::{
    cosine_distance, hash_distance, is_near_duplicate, visual_signature, NearDupThreshold,
    VisualSignature, LOCAL_EMBED_DIMS,
};
use sightline_core::{prepare, PrepareOptions};

fn fixtures() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests")
}

const SOURCES: [&str; 10] = [
    "fixtures/photos/Garden.jpg",
    "fixtures/photos/Dune.jpg",
    "fixtures/photos/Wood.jpg",
    "fixtures/photos/Storm.jpg",
    "fixtures/photos/LadyBird.jpg",
    "fixtures/samples/hubble_deep_field.jpg",
    "fixtures/samples/rocket.jpg",
    "fixtures/samples/astronaut.png",
    "fixtures/samples/chelsea.png",
    "fixtures/samples/coffee.png",
];

/// Photos cut into tiles for the unrelated images: (path, long edge to tile at, columns, rows).
/// 30 + 12 + 8 = 50 tiles. None of them shows a source.
const UNRELATED: [(&str, u32, u32, u32); 3] = [
    ("fixtures/large/elephants_progressive.jpg", 1800, 6, 5),
    ("fixtures-embed/RainDrops.jpg", 1600, 4, 3),
    ("fixtures-embed/TwoWings.jpg", 1600, 4, 2),
];

const COPY_KINDS: [&str; 5] = [
    "resized 50%",
    "jpeg q50",
    "cropped 10%",
    "brighter 15%",
    "mirrored",
];

fn read(rel: &str) -> Vec<u8> {
    let path = fixtures().join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg(img: &RgbImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(img)
        .unwrap();
    out
}

/// Prepared (upright sRGB, fitted within `max_edge`) pixels of an uploaded file.
fn prepared_pixels(bytes: &[u8], max_edge: u32) -> RgbImage {
    let opts = PrepareOptions {
        max_edge,
        quality: 95,
        ..PrepareOptions::default()
    };
    let p = prepare(bytes, &opts).unwrap();
    image::load_from_memory(&p.jpeg).unwrap().into_rgb8()
}

/// What the pipeline would store for an uploaded file: the signature of its prepared JPEG.
fn pipeline_signature(bytes: &[u8]) -> VisualSignature {
    let p = prepare(bytes, &PrepareOptions::default()).unwrap();
    visual_signature(&p.jpeg).unwrap()
}

/// The five altered copies of `master`, as the files someone would upload.
fn copies(master: &RgbImage) -> [Vec<u8>; 5] {
    let (w, h) = master.dimensions();
    let resized = imageops::resize(master, w / 2, h / 2, imageops::FilterType::Triangle);
    let (dx, dy) = (w / 20, h / 20);
    let cropped = imageops::crop_imm(master, dx, dy, w - 2 * dx, h - 2 * dy).to_image();
    let mut brighter = master.clone();
    for p in brighter.pixels_mut() {
        for c in p.0.iter_mut() {
            *c = (f32::from(*c) * 1.15).round().min(255.0) as u8;
        }
    }
    let mirrored = imageops::flip_horizontal(master);
    [
        png(&resized),
        jpeg(master, 50),
        png(&cropped),
        png(&brighter),
        png(&mirrored),
    ]
}

/// `cols`×`rows` tiles of the photo at `rel`, resized to `long_edge` first.
fn tiles(rel: &str, long_edge: u32, cols: u32, rows: u32) -> Vec<Vec<u8>> {
    let img = DynamicImage::ImageRgb8(prepared_pixels(&read(rel), long_edge));
    let (tw, th) = (img.width() / cols, img.height() / rows);
    let mut out = Vec::new();
    for r in 0..rows {
        for c in 0..cols {
            out.push(png(&img.crop_imm(c * tw, r * th, tw, th).into_rgb8()));
        }
    }
    out
}

#[test]
fn local_embedding_finds_altered_copies_and_near_dup_rule_reuses_only_them() {
    let started = Instant::now();
    let mut sources = Vec::new();
    let mut copy_sigs: Vec<[VisualSignature; 5]> = Vec::new();
    for rel in SOURCES {
        let prepared = prepare(&read(rel), &PrepareOptions::default()).unwrap();
        sources.push(visual_signature(&prepared.jpeg).unwrap());
        // The copies are made from the photo as the product sees it (≤ 1024 px): a copy
        // resized to 50 % is then a 512-px image, smaller than the source's embedding input.
        let master = image::load_from_memory(&prepared.jpeg).unwrap().into_rgb8();
        copy_sigs.push(copies(&master).map(|c| pipeline_signature(&c)));
    }
    let unrelated: Vec<VisualSignature> = UNRELATED
        .iter()
        .flat_map(|&(rel, edge, cols, rows)| tiles(rel, edge, cols, rows))
        .map(|t| pipeline_signature(&t))
        .collect();
    assert_eq!(unrelated.len(), 50);
    let built = started.elapsed();
    for s in sources
        .iter()
        .chain(copy_sigs.iter().flatten())
        .chain(&unrelated)
    {
        assert_eq!(s.embedding.len(), LOCAL_EMBED_DIMS);
    }

    // recall@5: each source queries a gallery of every copy, every unrelated tile and the
    // other sources; the share of its own 5 copies among its 5 nearest.
    let mut recall_sum = 0.0;
    for (i, query) in sources.iter().enumerate() {
        // (distance, is one of this source's copies)
        let mut gallery: Vec<(f32, bool)> = Vec::new();
        for (j, cs) in copy_sigs.iter().enumerate() {
            for c in cs {
                gallery.push((cosine_distance(&query.embedding, &c.embedding), i == j));
            }
        }
        for u in &unrelated {
            gallery.push((cosine_distance(&query.embedding, &u.embedding), false));
        }
        for (j, other) in sources.iter().enumerate() {
            if j != i {
                gallery.push((cosine_distance(&query.embedding, &other.embedding), false));
            }
        }
        gallery.sort_by(|a, b| a.0.total_cmp(&b.0));
        let hits = gallery[..5].iter().filter(|g| g.1).count();
        if hits < 5 {
            eprintln!("{}: {hits}/5 copies in the top 5", SOURCES[i]);
        }
        recall_sum += hits as f64 / 5.0;
    }
    let recall = recall_sum / sources.len() as f64;

    // Near-duplicate rule.
    let t = NearDupThreshold::default();
    let mut reused = 0;
    let mut kind_reused = [0; 5];
    let (mut max_copy_cos, mut max_copy_ham) = (0f32, 0u32);
    let mut kind_max = [(0f32, 0u32); 5];
    for (s, cs) in sources.iter().zip(&copy_sigs) {
        for (k, c) in cs.iter().enumerate() {
            let cos = cosine_distance(&s.embedding, &c.embedding);
            let ham = hash_distance(&s.hashes, &c.hashes);
            max_copy_cos = max_copy_cos.max(cos);
            max_copy_ham = max_copy_ham.max(ham);
            kind_max[k] = (kind_max[k].0.max(cos), kind_max[k].1.max(ham));
            if is_near_duplicate(s, c, &t) {
                reused += 1;
                kind_reused[k] += 1;
            }
        }
    }
    let reuse_rate = f64::from(reused) / 50.0;
    let (mut min_neg_cos, mut min_neg_ham) = (f32::MAX, u32::MAX);
    let mut false_reuse = Vec::new();
    // Negative pairs that each signal alone would let through.
    let (mut neg_pairs, mut neg_cos_pass, mut neg_ham_pass) = (0, 0, 0);
    for (i, s) in sources.iter().enumerate() {
        let others = sources
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(j, o)| (SOURCES[j].to_string(), o));
        let tiles = unrelated
            .iter()
            .enumerate()
            .map(|(k, u)| (format!("tile {k}"), u));
        for (name, o) in others.chain(tiles) {
            let cos = cosine_distance(&s.embedding, &o.embedding);
            let ham = hash_distance(&s.hashes, &o.hashes);
            min_neg_cos = min_neg_cos.min(cos);
            min_neg_ham = min_neg_ham.min(ham);
            neg_pairs += 1;
            neg_cos_pass += usize::from(cos <= t.max_cosine_distance);
            neg_ham_pass += usize::from(ham <= t.max_hamming);
            if is_near_duplicate(s, o, &t) {
                false_reuse.push(format!("{} ~ {name} (cos {cos:.4}, ham {ham})", SOURCES[i]));
            }
        }
    }

    eprintln!("embed eval: 10 sources, 50 copies, 50 unrelated; built in {built:.2?}");
    eprintln!("  recall@5 = {recall:.3}");
    eprintln!(
        "  near-dup (cos ≤ {}, hamming ≤ {}): reused {reused}/50 = {reuse_rate:.2} of copies, {} false",
        t.max_cosine_distance,
        t.max_hamming,
        false_reuse.len()
    );
    for (k, kind) in COPY_KINDS.iter().enumerate() {
        eprintln!(
            "    {kind:<13} reused {}/10, largest cosine {:.4}, largest hamming {}",
            kind_reused[k], kind_max[k].0, kind_max[k].1
        );
    }
    eprintln!(
        "  margin: copies up to cosine {max_copy_cos:.4} / hamming {max_copy_ham}; \
         unrelated and other sources from cosine {min_neg_cos:.4} / hamming {min_neg_ham}"
    );
    eprintln!(
        "  of {neg_pairs} unrelated/other-source pairs, {neg_cos_pass} pass the cosine \
         threshold alone and {neg_ham_pass} the hamming threshold alone"
    );
    eprintln!("  total {:.2?}", started.elapsed());

    assert!(recall >= 0.9, "recall@5 {recall:.3} < 0.9");
    assert!(reuse_rate >= 0.9, "reused {reused}/50 copies");
    assert!(
        false_reuse.is_empty(),
        "reused for unrelated images: {false_reuse:#?}"
    );
}
