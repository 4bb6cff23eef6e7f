//! Image preparation against real photos and hostile inputs; the visual embedding's
//! evaluation is a module of this binary (one integration-test binary per crate).
use std::io::Cursor;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use sightline_core::prepare::{probe, sniff, SourceFormat};
use sightline_core::{prepare, PrepareError, PrepareOptions};

mod embed_eval;

/// The repository's test fixtures (tests/fixtures: samples/, photos/, large/).
fn samples() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn encode(img: &DynamicImage, fmt: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).unwrap();
    out.into_inner()
}

fn no_exif(jpeg: &[u8]) -> bool {
    // APP1 (EXIF/XMP) markers must not appear in the output.
    !jpeg.windows(2).any(|w| w == [0xFF, 0xE1]) && !jpeg.windows(4).any(|w| w == b"Exif")
}

#[test]
fn phone_photo_comes_out_portrait_without_exif() {
    let bytes = std::fs::read(samples().join("large/phone12mp.jpg")).unwrap();
    let info = probe(&bytes, &PrepareOptions::default()).unwrap();
    assert_eq!((info.width, info.height, info.orientation), (3024, 4032, 6));
    let p = prepare(&bytes, &PrepareOptions::default()).unwrap();
    assert_eq!((p.width, p.height), (768, 1024));
    assert_eq!((p.original_width, p.original_height), (3024, 4032));
    assert_eq!(p.orientation, 6);
    assert!(no_exif(&p.jpeg));
    assert_eq!(p.bytes, p.jpeg.len() as u64);
    assert_eq!(p.sha256.len(), 64);
    let back = image::load_from_memory(&p.jpeg).unwrap();
    assert_eq!((back.width(), back.height()), (768, 1024));
}

#[test]
fn every_sample_prepares_within_the_edge() {
    let mut n = 0;
    for dir in ["samples", "photos", "large"] {
        for e in std::fs::read_dir(samples().join(dir)).unwrap() {
            let path = e.unwrap().path();
            if !matches!(
                path.extension().and_then(|x| x.to_str()),
                Some("jpg" | "png")
            ) {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let p = prepare(&bytes, &PrepareOptions::default())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(p.width.max(p.height) <= 1024, "{}", path.display());
            assert!(p.width.max(p.height) == 1024 || p.width == p.original_width);
            assert!(no_exif(&p.jpeg), "{}", path.display());
            n += 1;
        }
    }
    assert_eq!(n, 12);
}

#[test]
fn orientations_one_to_eight_come_out_upright() {
    // A 4×2 image with a red top-left pixel, stored as each EXIF orientation would store it.
    let mut upright = RgbImage::from_pixel(40, 20, Rgb([0, 0, 255]));
    for y in 0..10 {
        for x in 0..10 {
            upright.put_pixel(x, y, Rgb([255, 0, 0]));
        }
    }
    for o in 1u8..=8 {
        let stored = store_as(&upright, o);
        let jpeg = with_exif_orientation(
            &encode(&DynamicImage::ImageRgb8(stored), ImageFormat::Jpeg),
            o,
        );
        let p = prepare(&jpeg, &PrepareOptions::default()).unwrap();
        assert_eq!((p.width, p.height), (40, 20), "orientation {o}");
        let out = image::load_from_memory(&p.jpeg).unwrap().into_rgb8();
        let tl = out.get_pixel(2, 2);
        assert!(
            tl[0] > 200 && tl[2] < 60,
            "orientation {o}: top-left is {tl:?}"
        );
        let br = out.get_pixel(37, 17);
        assert!(
            br[2] > 200 && br[0] < 60,
            "orientation {o}: bottom-right is {br:?}"
        );
    }
}

/// The inverse of the EXIF transform: what a camera stores for orientation `o`.
fn store_as(img: &RgbImage, o: u8) -> RgbImage {
    use image::imageops::*;
    match o {
        1 => img.clone(),
        2 => flip_horizontal(img),
        3 => rotate180(img),
        4 => flip_vertical(img),
        5 => rotate270(&flip_horizontal(img)),
        6 => rotate270(img),
        7 => rotate90(&flip_horizontal(img)),
        8 => rotate90(img),
        _ => unreachable!(),
    }
}

/// Insert a minimal APP1 EXIF segment with an Orientation tag after SOI.
fn with_exif_orientation(jpeg: &[u8], o: u8) -> Vec<u8> {
    let mut tiff = vec![b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1];
    tiff.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, o, 0, 0]);
    tiff.extend_from_slice(&[0, 0, 0, 0]);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let len = (app1.len() + 2) as u16;
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn pixel_layouts_all_become_rgb_jpeg() {
    let base = DynamicImage::ImageRgba8(RgbaImage::from_fn(64, 48, |x, y| {
        Rgba([
            (x * 4) as u8,
            (y * 5) as u8,
            128,
            if x < 32 { 0 } else { 255 },
        ])
    }));
    let cases = [
        ("rgba png", encode(&base, ImageFormat::Png)),
        (
            "rgba16 png",
            encode(
                &DynamicImage::ImageRgba16(base.to_rgba16()),
                ImageFormat::Png,
            ),
        ),
        (
            "gray png",
            encode(&DynamicImage::ImageLuma8(base.to_luma8()), ImageFormat::Png),
        ),
        (
            "rgb16 png",
            encode(&DynamicImage::ImageRgb16(base.to_rgb16()), ImageFormat::Png),
        ),
        (
            "gray16 png",
            encode(
                &DynamicImage::ImageLuma16(base.to_luma16()),
                ImageFormat::Png,
            ),
        ),
        (
            "gray+alpha png",
            encode(
                &DynamicImage::ImageLumaA8(base.to_luma_alpha8()),
                ImageFormat::Png,
            ),
        ),
        ("gif", encode(&base, ImageFormat::Gif)),
        (
            "webp",
            encode(
                &DynamicImage::ImageRgba8(base.to_rgba8()),
                ImageFormat::WebP,
            ),
        ),
        (
            "gray jpeg",
            encode(
                &DynamicImage::ImageLuma8(base.to_luma8()),
                ImageFormat::Jpeg,
            ),
        ),
    ];
    for (name, bytes) in cases {
        let p =
            prepare(&bytes, &PrepareOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((p.width, p.height), (64, 48), "{name}");
        let out = image::load_from_memory(&p.jpeg).unwrap();
        assert_eq!(out.color(), image::ColorType::Rgb8, "{name}");
    }
    // Transparent pixels are flattened on white.
    let p = prepare(&encode(&base, ImageFormat::Png), &PrepareOptions::default()).unwrap();
    let out = image::load_from_memory(&p.jpeg).unwrap().into_rgb8();
    let px = out.get_pixel(5, 5);
    assert!(px.0.iter().all(|&c| c > 240), "{px:?}");
}

#[test]
fn never_upscales_and_respects_options() {
    let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(300, 100, Rgb([10, 20, 30])));
    let bytes = encode(&img, ImageFormat::Png);
    let p = prepare(&bytes, &PrepareOptions::default()).unwrap();
    assert_eq!((p.width, p.height), (300, 100));
    let small = PrepareOptions {
        max_edge: 150,
        ..Default::default()
    };
    let p = prepare(&bytes, &small).unwrap();
    assert_eq!((p.width, p.height), (150, 50));
    let bad = PrepareOptions {
        quality: 0,
        ..Default::default()
    };
    assert!(matches!(
        prepare(&bytes, &bad),
        Err(PrepareError::Options(_))
    ));
}

#[test]
fn hostile_inputs_are_clear_errors() {
    let opts = PrepareOptions::default();
    assert_eq!(prepare(&[], &opts), Err(PrepareError::Empty));
    assert_eq!(
        prepare(b"hello, world", &opts),
        Err(PrepareError::NotAnImage)
    );
    assert_eq!(
        prepare(
            b"<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
            &opts
        ),
        Err(PrepareError::Svg)
    );
    assert!(matches!(
        prepare(b"BM\x00\x00\x00\x00", &opts),
        Err(PrepareError::Unsupported(_))
    ));

    let tiny = PrepareOptions {
        max_input_bytes: 10,
        ..Default::default()
    };
    assert!(matches!(
        prepare(&[0xFF; 11], &tiny),
        Err(PrepareError::TooLarge { bytes: 11, max: 10 })
    ));

    // Truncated JPEG and PNG.
    let photo = std::fs::read(samples().join("samples/rocket.jpg")).unwrap();
    let r = prepare(&photo[..photo.len() / 2], &opts).map(|p| p.bytes);
    assert_eq!(r, Err(PrepareError::Truncated));
    let png = std::fs::read(samples().join("samples/coffee.png")).unwrap();
    assert!(prepare(&png[..png.len() / 3], &opts).is_err());
    // Header only.
    assert!(prepare(&photo[..200], &opts).is_err());
    // Garbage after a valid signature.
    let mut junk = photo[..4].to_vec();
    junk.extend(std::iter::repeat_n(0xA5u8, 5000));
    assert!(prepare(&junk, &opts).is_err());
}

#[test]
fn decompression_bombs_are_refused_before_decoding() {
    // A PNG header claiming 100000 × 100000 pixels (10 GP), with almost no data.
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    // An IDAT with an empty zlib stream: the decoder gets past its header.
    let mut idat = b"IDAT".to_vec();
    idat.extend_from_slice(&[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    png.extend_from_slice(&8u32.to_be_bytes());
    png.extend_from_slice(&idat);
    png.extend_from_slice(&crc32(&idat).to_be_bytes());
    let r = prepare(&png, &PrepareOptions::default());
    assert!(
        matches!(r, Err(PrepareError::TooManyPixels { .. })),
        "{r:?}"
    );

    // A real, highly compressible 12000×12000 PNG (144 MP) is refused from its header.
    let big = image::GrayImage::new(12_000, 12_000);
    let mut bytes = Cursor::new(Vec::new());
    DynamicImage::ImageLuma8(big)
        .write_to(&mut bytes, ImageFormat::Png)
        .unwrap();
    let bytes = bytes.into_inner();
    assert!(bytes.len() < 2_000_000);
    let r = prepare(&bytes, &PrepareOptions::default());
    assert!(
        matches!(
            r,
            Err(PrepareError::TooManyPixels {
                pixels: 144_000_000,
                ..
            })
        ),
        "{r:?}"
    );
    // A tight decoder memory limit is also enforced.
    let opts = PrepareOptions {
        max_pixels: u64::MAX,
        max_alloc_bytes: 50_000_000,
        ..Default::default()
    };
    let r = prepare(&bytes, &opts);
    assert!(matches!(r, Err(PrepareError::MemoryLimit { .. })), "{r:?}");
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn sniff_formats() {
    let img = DynamicImage::ImageRgb8(RgbImage::new(2, 2));
    assert_eq!(
        sniff(&encode(&img, ImageFormat::Png)).unwrap(),
        SourceFormat::Png
    );
    assert_eq!(
        sniff(&encode(&img, ImageFormat::Jpeg)).unwrap(),
        SourceFormat::Jpeg
    );
    assert_eq!(
        sniff(&encode(&img, ImageFormat::Gif)).unwrap(),
        SourceFormat::Gif
    );
    assert_eq!(
        sniff(&encode(&img, ImageFormat::WebP)).unwrap(),
        SourceFormat::Webp
    );
}

#[test]
fn a_gif_frame_larger_than_its_screen_is_refused_before_decoding() {
    // Screen 1×1, first frame 16000×16000 (256 MP): the decoder would allocate the frame.
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&[1, 0, 1, 0, 0x80, 0, 0]); // screen, 2-entry global table
    gif.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    gif.extend_from_slice(&[0x21, 0xF9, 4, 0, 0, 0, 0, 0]); // graphic control extension
    gif.push(0x2C);
    for v in [0u16, 0, 16_000, 16_000] {
        gif.extend_from_slice(&v.to_le_bytes());
    }
    gif.extend_from_slice(&[0, 2, 2, 0x4C, 0x01, 0, 0x3B]);
    let r = prepare(&gif, &PrepareOptions::default());
    assert!(
        matches!(
            r,
            Err(PrepareError::TooManyPixels {
                width: 16_000,
                height: 16_000,
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn progressive_jpeg_coefficients_count_against_the_memory_budget() {
    // 2820×1586 progressive: 13 MB of RGB out, 27 MB of coefficients held while decoding.
    let bytes = std::fs::read(samples().join("large/elephants_progressive.jpg")).unwrap();
    let tight = PrepareOptions {
        max_alloc_bytes: 30_000_000,
        ..Default::default()
    };
    let r = prepare(&bytes, &tight);
    assert!(matches!(r, Err(PrepareError::MemoryLimit { .. })), "{r:?}");
    let enough = PrepareOptions {
        max_alloc_bytes: 45_000_000,
        ..Default::default()
    };
    let p = prepare(&bytes, &enough).unwrap();
    assert_eq!((p.width, p.height), (1024, 576));
}

// ---------------------------------------------------------------------------------------
// Colour management: embedded ICC profiles converted to sRGB.
//
// The fixtures in tests/fixtures-icc/ come from `cargo run -p sightline-core --example
// icc_fixtures` (profiles written from published primaries, not copied). The references
// below are computed here, independently of qcms: plain matrix maths from the primaries.

use sightline_core::color::ColorHandling;

#[allow(dead_code)] // the generator also uses inverse_dot_gain
#[path = "../examples/icc_fixtures/cmyk_model.rs"]
mod cmyk_model;

/// tests/fixtures-icc: beside tests/fixtures, whose images the CLI's tests count.
fn icc_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures-icc")
}

fn icc_fixture(name: &str) -> Vec<u8> {
    std::fs::read(icc_dir().join(name)).unwrap()
}

const SRGB_PRIMARIES: [[f64; 2]; 3] = [[0.64, 0.33], [0.30, 0.60], [0.15, 0.06]];
const P3_PRIMARIES: [[f64; 2]; 3] = [[0.680, 0.320], [0.265, 0.690], [0.150, 0.060]];
const ADOBE_PRIMARIES: [[f64; 2]; 3] = [[0.64, 0.33], [0.21, 0.71], [0.15, 0.06]];
const D65: [f64; 2] = [0.3127, 0.3290];

/// RGB → XYZ for primaries and white given as xy chromaticities (white Y = 1).
fn primaries_matrix(p: [[f64; 2]; 3], w: [f64; 2]) -> [[f64; 3]; 3] {
    let col = |[x, y]: [f64; 2]| [x / y, 1.0, (1.0 - x - y) / y];
    let (r, g, b, wv) = (col(p[0]), col(p[1]), col(p[2]), col(w));
    let m = [[r[0], g[0], b[0]], [r[1], g[1], b[1]], [r[2], g[2], b[2]]];
    let s = apply3(inverse3(m), wv);
    [0, 1, 2].map(|i| [m[i][0] * s[0], m[i][1] * s[1], m[i][2] * s[2]])
}

fn inverse3(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let cof =
        |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    let adj = [
        [cof(1, 2, 1, 2), -cof(0, 2, 1, 2), cof(0, 1, 1, 2)],
        [-cof(1, 2, 0, 2), cof(0, 2, 0, 2), -cof(0, 1, 0, 2)],
        [cof(1, 2, 0, 1), -cof(0, 2, 0, 1), cof(0, 1, 0, 1)],
    ];
    let det = m[0][0] * adj[0][0] + m[0][1] * adj[1][0] + m[0][2] * adj[2][0];
    adj.map(|row| row.map(|v| v / det))
}

fn apply3(m: [[f64; 3]; 3], v: [f64; 3]) -> [f64; 3] {
    m.map(|row| row[0] * v[0] + row[1] * v[1] + row[2] * v[2])
}

fn matmul3(a: [[f64; 3]; 3], b: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    [0, 1, 2].map(|i| [0, 1, 2].map(|j| (0..3).map(|k| a[i][k] * b[k][j]).sum()))
}

fn srgb_decode(v: f64) -> f64 {
    if v <= 0.04045 {
        v / 12.92
    } else {
        ((v + 0.055) / 1.055).powf(2.4)
    }
}

fn srgb_encode(v: f64) -> f64 {
    let v = v.clamp(0.0, 1.0);
    if v <= 0.0031308 {
        12.92 * v
    } else {
        1.055 * v.powf(1.0 / 2.4) - 0.055
    }
}

/// The reference conversion of RGB code values to sRGB: linearise with the source TRC, to
/// XYZ with its primaries, to linear sRGB (same D65 white: no adaptation needed), clip, encode.
fn reference_to_srgb(src: &RgbImage, prim: [[f64; 2]; 3], decode: impl Fn(f64) -> f64) -> RgbImage {
    let m = matmul3(
        inverse3(primaries_matrix(SRGB_PRIMARIES, D65)),
        primaries_matrix(prim, D65),
    );
    let mut out = src.clone();
    for px in out.pixels_mut() {
        let lin = apply3(m, px.0.map(|c| decode(f64::from(c) / 255.0)));
        px.0 = lin.map(|c| (srgb_encode(c) * 255.0).round() as u8);
    }
    out
}

/// CIE L*a*b* (D65) of an sRGB pixel.
fn lab(px: [u8; 3]) -> [f64; 3] {
    let xyz = apply3(
        primaries_matrix(SRGB_PRIMARIES, D65),
        px.map(|c| srgb_decode(f64::from(c) / 255.0)),
    );
    let white = [0.3127 / 0.3290, 1.0, (1.0 - 0.3127 - 0.3290) / 0.3290];
    let f = |t: f64| {
        if t > 216.0 / 24389.0 {
            t.cbrt()
        } else {
            (24389.0 / 27.0 * t + 16.0) / 116.0
        }
    };
    let [fx, fy, fz] = [0, 1, 2].map(|i| f(xyz[i] / white[i]));
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// Mean and 99th-percentile CIE76 ΔE between two sRGB images of the same size.
fn delta_e(a: &RgbImage, b: &RgbImage) -> (f64, f64) {
    assert_eq!(a.dimensions(), b.dimensions());
    let mut d: Vec<f64> = a
        .pixels()
        .zip(b.pixels())
        .map(|(p, q)| {
            let (l1, l2) = (lab(p.0), lab(q.0));
            ((l1[0] - l2[0]).powi(2) + (l1[1] - l2[1]).powi(2) + (l1[2] - l2[2]).powi(2)).sqrt()
        })
        .collect();
    let mean = d.iter().sum::<f64>() / d.len() as f64;
    d.sort_by(f64::total_cmp);
    (mean, d[d.len() * 99 / 100])
}

/// The pixels exactly as prepare's JPEG decoder (jpeg-decoder) sees them: RGB or CMYK ink.
fn jpeg_pixels(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut dec = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    let px = dec.decode().unwrap();
    let info = dec.info().unwrap();
    (u32::from(info.width), u32::from(info.height), px)
}

/// The JPEG's markers with every APP2 ICC_PROFILE segment removed.
fn strip_icc(jpeg: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    let mut i = 2;
    while jpeg[i + 1] != 0xDA {
        let len = usize::from(u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]));
        let seg = &jpeg[i..i + 2 + len];
        if !(seg[1] == 0xE2 && seg[4..].starts_with(b"ICC_PROFILE\0")) {
            out.extend_from_slice(seg);
        }
        i += 2 + len;
    }
    out.extend_from_slice(&jpeg[i..]);
    out
}

/// APP2 ICC_PROFILE segments carrying `data` in `chunk`-byte pieces, sequence numbers as
/// `seq` says (so tests can break them), all claiming `count` chunks.
fn icc_segments(data: &[u8], chunk: usize, count: u8, seq: impl Fn(usize) -> u8) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in data.chunks(chunk).enumerate() {
        out.extend_from_slice(&[0xFF, 0xE2]);
        out.extend_from_slice(&((16 + c.len()) as u16).to_be_bytes());
        out.extend_from_slice(b"ICC_PROFILE\0");
        out.extend_from_slice(&[seq(i), count]);
        out.extend_from_slice(c);
    }
    out
}

/// `jpeg` with its profile replaced by `profile` (split like encoders do).
fn with_icc(jpeg: &[u8], profile: &[u8]) -> Vec<u8> {
    let n = profile.len().div_ceil(65_519).max(1);
    with_segments(
        jpeg,
        &icc_segments(profile, 65_519, n as u8, |i| (i + 1) as u8),
    )
}

fn with_segments(jpeg: &[u8], segments: &[u8]) -> Vec<u8> {
    let stripped = strip_icc(jpeg);
    let mut out = stripped[..2].to_vec();
    out.extend_from_slice(segments);
    out.extend_from_slice(&stripped[2..]);
    out
}

fn decoded(p: &sightline_core::PreparedImage) -> RgbImage {
    image::load_from_memory(&p.jpeg).unwrap().into_rgb8()
}

/// No resize (the fixtures fit), quality 100: what is left is the colour conversion.
fn exact() -> PrepareOptions {
    PrepareOptions {
        quality: 100,
        ..Default::default()
    }
}

/// Converted vs reference and unconverted vs reference, as (mean, p99) ΔE76 pairs.
fn converted_and_unconverted(bytes: &[u8], reference: &RgbImage) -> ((f64, f64), (f64, f64)) {
    let p = prepare(bytes, &exact()).unwrap();
    assert_eq!(p.color, ColorHandling::Converted);
    let old = prepare(&strip_icc(bytes), &exact()).unwrap();
    assert_eq!(old.color, ColorHandling::Srgb);
    (
        delta_e(&decoded(&p), reference),
        delta_e(&decoded(&old), reference),
    )
}

#[test]
fn display_p3_photo_is_converted_to_srgb() {
    let bytes = icc_fixture("p3_coffee.jpg");
    let (w, h, px) = jpeg_pixels(&bytes);
    let src = RgbImage::from_raw(w, h, px).unwrap();
    let reference = reference_to_srgb(&src, P3_PRIMARIES, srgb_decode);
    let (conv, old) = converted_and_unconverted(&bytes, &reference);
    println!(
        "P3 photo: converted ΔE76 mean {:.2} p99 {:.2}; profile ignored mean {:.2} p99 {:.2}",
        conv.0, conv.1, old.0, old.1
    );
    assert!(conv.0 < 1.0 && conv.1 < 3.0, "{conv:?}");
    assert!(old.0 > 3.0 * conv.0.max(0.5), "{old:?}");
}

#[test]
fn display_p3_patches_png_are_converted_including_out_of_gamut_colours() {
    let bytes = icc_fixture("p3_patches.png");
    let src = image::load_from_memory(&bytes).unwrap().into_rgb8();
    let reference = reference_to_srgb(&src, P3_PRIMARIES, srgb_decode);
    let p = prepare(&bytes, &exact()).unwrap();
    assert_eq!(p.color, ColorHandling::Converted);
    let conv = delta_e(&decoded(&p), &reference);
    let old = delta_e(&src, &reference); // a PNG's pixels were used as they are
    println!(
        "P3 patches: converted ΔE76 mean {:.2} p99 {:.2}; profile ignored mean {:.2} p99 {:.2}",
        conv.0, conv.1, old.0, old.1
    );
    assert!(conv.0 < 1.0 && conv.1 < 3.0, "{conv:?}");
    assert!(old.0 > 3.0 * conv.0.max(0.5), "{old:?}");
}

#[test]
fn adobe_rgb_photo_with_a_profile_split_over_two_app2_markers_is_converted() {
    let bytes = icc_fixture("adobergb_chelsea.jpg");
    let markers = bytes.windows(12).filter(|w| w == b"ICC_PROFILE\0").count();
    assert_eq!(markers, 2);
    let (w, h, px) = jpeg_pixels(&bytes);
    let src = RgbImage::from_raw(w, h, px).unwrap();
    let gamma = 563.0 / 256.0;
    let reference = reference_to_srgb(&src, ADOBE_PRIMARIES, |v| v.powf(gamma));
    let (conv, old) = converted_and_unconverted(&bytes, &reference);
    println!("Adobe RGB photo: converted ΔE76 mean {:.2} p99 {:.2}; profile ignored mean {:.2} p99 {:.2}", conv.0, conv.1, old.0, old.1);
    assert!(conv.0 < 1.0 && conv.1 < 3.0, "{conv:?}");
    assert!(old.0 > 3.0 * conv.0.max(0.5), "{old:?}");
}

#[test]
fn profiled_cmyk_jpeg_converts_through_its_profile() {
    let bytes = icc_fixture("cmyk_astronaut.jpg");
    // jpeg-decoder undoes the Adobe inversion: these are ink amounts (0 = none).
    let (w, h, ink) = jpeg_pixels(&bytes);
    assert_eq!(ink.len(), (w * h * 4) as usize);
    let mut reference = RgbImage::new(w, h);
    for (px, ink) in reference.pixels_mut().zip(ink.chunks_exact(4)) {
        let lin = cmyk_model::ink_to_linear_srgb([0, 1, 2, 3].map(|i| f64::from(ink[i]) / 255.0));
        px.0 = lin.map(|c| (srgb_encode(c) * 255.0).round() as u8);
    }
    let (conv, old) = converted_and_unconverted(&bytes, &reference);
    println!("CMYK photo: converted ΔE76 mean {:.2} p99 {:.2}; profile ignored (naive CMYK) mean {:.2} p99 {:.2}", conv.0, conv.1, old.0, old.1);
    assert!(conv.0 < 2.0 && conv.1 < 5.0, "{conv:?}");
    assert!(old.0 > 3.0 * conv.0.max(0.5), "{old:?}");
    // The solid cyan patch (top-left) is the press's cyan, not sRGB's (0, 255, 255).
    let out = decoded(&prepare(&bytes, &exact()).unwrap());
    let cyan = out.get_pixel(20, 20).0;
    let want = reference.get_pixel(20, 20).0;
    assert!(
        cyan.iter().zip(want).all(|(a, b)| a.abs_diff(b) <= 4),
        "{cyan:?} vs {want:?}"
    );
}

#[test]
fn srgb_profiles_leave_the_output_byte_identical() {
    // Real-world sRGB profiles in the sample set (HP's 3 KB "sRGB IEC61966-2.1"), and the
    // one written for the tests.
    for name in ["astronaut.png", "chelsea.png", "hubble_deep_field.jpg"] {
        let bytes = std::fs::read(samples().join("samples").join(name)).unwrap();
        let p = prepare(&bytes, &PrepareOptions::default()).unwrap();
        assert_eq!(p.color, ColorHandling::Srgb, "{name}");
    }
    let hubble = std::fs::read(samples().join("samples/hubble_deep_field.jpg")).unwrap();
    let plain = prepare(&strip_icc(&hubble), &PrepareOptions::default()).unwrap();
    for profile in [embedded_profile(&hubble), icc_fixture("srgb.icc")] {
        let p = prepare(&with_icc(&hubble, &profile), &PrepareOptions::default()).unwrap();
        assert_eq!(p.color, ColorHandling::Srgb);
        assert_eq!(p.jpeg, plain.jpeg);
    }
    // Unprofiled images report sRGB (and take no colour step at all).
    let phone = std::fs::read(samples().join("large/phone12mp.jpg")).unwrap();
    assert_eq!(
        prepare(&phone, &PrepareOptions::default()).unwrap().color,
        ColorHandling::Srgb
    );
}

#[test]
fn a_real_adobe_rgb_1998_profile_is_converted() {
    // samples/rocket.jpg carries Adobe's own "Adobe RGB (1998)" profile (v2, D65 media white,
    // gamma 563/256): a third-party profile, not one written by our generator.
    let rocket = std::fs::read(samples().join("samples/rocket.jpg")).unwrap();
    assert!(embedded_profile(&rocket)
        .windows(16)
        .any(|w| w == b"Adobe RGB (1998)"));
    let (w, h, px) = jpeg_pixels(&rocket);
    let src = RgbImage::from_raw(w, h, px).unwrap();
    let gamma = 563.0 / 256.0;
    let reference = reference_to_srgb(&src, ADOBE_PRIMARIES, |v| v.powf(gamma));
    let (conv, old) = converted_and_unconverted(&rocket, &reference);
    println!("rocket.jpg (Adobe RGB 1998): converted ΔE76 mean {:.2} p99 {:.2}; profile ignored mean {:.2} p99 {:.2}", conv.0, conv.1, old.0, old.1);
    assert!(conv.0 < 1.0 && conv.1 < 3.0, "{conv:?}");
    assert!(old.0 > 3.0 * conv.0.max(0.5), "{old:?}");
}

fn embedded_profile(jpeg: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 2;
    while jpeg[i + 1] != 0xDA {
        let len = usize::from(u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]));
        if jpeg[i + 1] == 0xE2 && jpeg[i + 4..].starts_with(b"ICC_PROFILE\0") {
            out.extend_from_slice(&jpeg[i + 18..i + 2 + len]);
        }
        i += 2 + len;
    }
    assert!(!out.is_empty());
    out
}

#[test]
fn unusable_profiles_are_ignored_and_the_image_is_still_prepared() {
    let rocket = strip_icc(&std::fs::read(samples().join("samples/rocket.jpg")).unwrap());
    let plain = prepare(&rocket, &PrepareOptions::default()).unwrap();
    let p3 = icc_fixture("display-p3.icc");
    let cmyk = icc_fixture("cmyk-press.icc");
    let mut garbage = vec![0u8; 3000];
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for b in &mut garbage {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        *b = seed as u8;
    }
    // A valid header whose tags point past the end.
    let mut dangling = p3.clone();
    dangling[132 + 4..132 + 8].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut zero_colorants = p3.clone();
    for sig in [b"rXYZ", b"gXYZ", b"bXYZ"] {
        let at = (0..12)
            .map(|i| 132 + 12 * i)
            .find(|&at| &p3[at..at + 4] == sig)
            .unwrap();
        let off = u32::from_be_bytes(p3[at + 4..at + 8].try_into().unwrap()) as usize;
        zero_colorants[off + 8..off + 20].fill(0);
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", with_icc(&rocket, &garbage)),
        ("truncated", with_icc(&rocket, &p3[..p3.len() / 2])),
        ("dangling tag offsets", with_icc(&rocket, &dangling)),
        (
            "zero colorants (would turn the photo black)",
            with_icc(&rocket, &zero_colorants),
        ),
        ("a CMYK profile on RGB pixels", with_icc(&rocket, &cmyk)),
        (
            "a chunk missing",
            with_segments(&rocket, &icc_segments(&p3, 400, 2, |_| 1)),
        ),
        (
            "chunk sequence out of range",
            with_segments(&rocket, &icc_segments(&p3, 400, 2, |i| (i + 2) as u8)),
        ),
        (
            "over 4 MB in 70 chunks",
            with_segments(
                &rocket,
                &icc_segments(&vec![7u8; 70 * 65_000], 65_000, 70, |i| (i + 1) as u8),
            ),
        ),
    ];
    for (name, bytes) in cases {
        let p =
            prepare(&bytes, &PrepareOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(p.color, ColorHandling::ProfileIgnored, "{name}");
        assert_eq!(p.jpeg, plain.jpeg, "{name}: pixels treated as sRGB");
    }
    // PNG iCCP and WebP ICCP with garbage too.
    let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(32, 16, Rgb([200, 40, 90])));
    let mut png = Vec::new();
    let mut enc = image::codecs::png::PngEncoder::new(&mut png);
    image::ImageEncoder::set_icc_profile(&mut enc, garbage.clone()).unwrap();
    image::ImageEncoder::write_image(enc, img.as_bytes(), 32, 16, image::ExtendedColorType::Rgb8)
        .unwrap();
    let p = prepare(&png, &PrepareOptions::default()).unwrap();
    assert_eq!(p.color, ColorHandling::ProfileIgnored);
}

#[test]
fn webp_iccp_profiles_are_converted() {
    let patches = icc_fixture("p3_patches.png");
    let src = image::load_from_memory(&patches).unwrap().into_rgb8();
    let mut webp = Vec::new();
    let mut enc = image::codecs::webp::WebPEncoder::new_lossless(&mut webp);
    image::ImageEncoder::set_icc_profile(&mut enc, icc_fixture("display-p3.icc")).unwrap();
    image::ImageEncoder::write_image(
        enc,
        src.as_raw(),
        src.width(),
        src.height(),
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    let p = prepare(&webp, &exact()).unwrap();
    assert_eq!(p.color, ColorHandling::Converted);
    let reference = reference_to_srgb(&src, P3_PRIMARIES, srgb_decode);
    let (mean, p99) = delta_e(&decoded(&p), &reference);
    assert!(mean < 1.0 && p99 < 3.0, "{mean} {p99}");
}

#[test]
fn mutated_profiles_never_panic_or_fail_the_image() {
    // A deterministic fuzz: flip, zero or max out bytes of real profiles (header, tag table
    // and tag data alike) and prepare. Every image must come out; only the colour handling
    // may change.
    let tiny = encode(
        &DynamicImage::ImageRgb8(RgbImage::from_fn(16, 8, |x, y| {
            Rgb([(x * 16) as u8, (y * 30) as u8, 128])
        })),
        ImageFormat::Jpeg,
    );
    let cmyk_photo = icc_fixture("cmyk_astronaut.jpg");
    let profiles = [
        (icc_fixture("display-p3.icc"), 600),
        (icc_fixture("srgb.icc"), 200),
        (icc_fixture("cmyk-press.icc"), 60),
    ];
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for (profile, rounds) in profiles {
        let is_cmyk = &profile[16..20] == b"CMYK";
        for round in 0..rounds {
            let mut p = profile.clone();
            for _ in 0..1 + next() % 4 {
                // Mostly the first 400 bytes (header, tag table, first tags), where damage matters.
                let span = if next() % 4 == 0 {
                    p.len()
                } else {
                    p.len().min(400)
                };
                let at = (next() as usize) % span;
                p[at] = match next() % 3 {
                    0 => p[at] ^ (1 << (next() % 8)),
                    1 => 0,
                    _ => 0xFF,
                };
            }
            let image = if is_cmyk { &cmyk_photo } else { &tiny };
            let out = prepare(
                &with_icc(image, &p),
                &PrepareOptions {
                    max_edge: 64,
                    ..Default::default()
                },
            );
            assert!(out.is_ok(), "round {round}: {out:?}");
        }
    }
}

#[test]
fn converting_after_the_resize_stays_close_to_converting_before() {
    // The transform runs on the resized pixels. Measure what that costs against converting
    // at full size first, on a saturated photo and on hard-edged out-of-gamut patches.
    let p3_profile = icc_fixture("display-p3.icc");
    let to_p3 = matmul3(
        inverse3(primaries_matrix(P3_PRIMARIES, D65)),
        primaries_matrix(SRGB_PRIMARIES, D65),
    );
    let photo = image::open(samples().join("photos/LadyBird.jpg"))
        .unwrap()
        .into_rgb8();
    let mut photo_p3 = photo.clone();
    for px in photo_p3.pixels_mut() {
        let lin = apply3(to_p3, px.0.map(|c| srgb_decode(f64::from(c) / 255.0)));
        px.0 = lin.map(|c| (srgb_encode(c) * 255.0).round() as u8);
    }
    let patches = image::load_from_memory(&icc_fixture("p3_patches.png"))
        .unwrap()
        .into_rgb8();
    let opts = PrepareOptions {
        quality: 100,
        max_edge: 400,
        ..Default::default()
    };
    for (name, p3) in [("LadyBird photo", photo_p3), ("P3 patches", patches)] {
        let mut png = Vec::new();
        let mut enc = image::codecs::png::PngEncoder::new(&mut png);
        image::ImageEncoder::set_icc_profile(&mut enc, p3_profile.clone()).unwrap();
        image::ImageEncoder::write_image(
            enc,
            p3.as_raw(),
            p3.width(),
            p3.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
        let after = prepare(&png, &opts).unwrap();
        assert_eq!(after.color, ColorHandling::Converted);
        // Reference: convert every full-size pixel first, then prepare the sRGB result.
        let full = reference_to_srgb(&p3, P3_PRIMARIES, srgb_decode);
        let before = prepare(
            &encode(&DynamicImage::ImageRgb8(full), ImageFormat::Png),
            &opts,
        )
        .unwrap();
        let (mean, p99) = delta_e(&decoded(&after), &decoded(&before));
        println!("{name}: convert-after-resize vs convert-before ΔE76 mean {mean:.2} p99 {p99:.2}");
        assert!(mean < 1.0 && p99 < 4.0, "{name}: {mean} {p99}");
    }
}
