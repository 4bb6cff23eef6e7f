//! Writes the colour-management test fixtures in tests/fixtures-icc/ (committed; rerun only
//! to change them): `cargo run -p sightline-core --example icc_fixtures`.
//!
//! Profiles are written from published primaries (Display P3: SMPTE EG 432-1 primaries with
//! D65 and the sRGB curve; Adobe RGB (1998)-compatible: its published primaries, D65, gamma
//! 563/256) and a made-up press model for CMYK. Images are the sample photos' sRGB pixels
//! re-expressed in those spaces, plus synthetic saturated patches.
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};

mod cmyk_model;
mod icc;

const SRGB: [[f64; 2]; 3] = [[0.64, 0.33], [0.30, 0.60], [0.15, 0.06]];
const P3: [[f64; 2]; 3] = [[0.680, 0.320], [0.265, 0.690], [0.150, 0.060]];
const ADOBE: [[f64; 2]; 3] = [[0.64, 0.33], [0.21, 0.71], [0.15, 0.06]];
const D65: [f64; 2] = [0.3127, 0.3290];
const ADOBE_GAMMA: f64 = 563.0 / 256.0;

/// The sample photos the images derive from.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Where the colour fixtures go: beside tests/fixtures, not in it, because the CLI's tests run
/// `sightline run tests/fixtures` and count the images found there.
fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures-icc")
}

fn srgb_eotf(v: f64) -> f64 {
    if v <= 0.04045 {
        v / 12.92
    } else {
        ((v + 0.055) / 1.055).powf(2.4)
    }
}

fn srgb_oetf(v: f64) -> f64 {
    let v = v.clamp(0.0, 1.0);
    if v <= 0.0031308 {
        v * 12.92
    } else {
        1.055 * v.powf(1.0 / 2.4) - 0.055
    }
}

fn to_u8(v: f64) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// sRGB pixels re-expressed in another RGB space (same D65 white, so no adaptation).
fn from_srgb(img: &RgbImage, prim: [[f64; 2]; 3], encode: impl Fn(f64) -> f64) -> RgbImage {
    let m = icc::mul(
        icc::invert(icc::rgb_to_xyz(prim, D65)),
        icc::rgb_to_xyz(SRGB, D65),
    );
    let mut out = img.clone();
    for px in out.pixels_mut() {
        let lin = px.0.map(|c| srgb_eotf(f64::from(c) / 255.0));
        let v = icc::mul_vec(m, lin);
        px.0 = v.map(|c| to_u8(encode(c.clamp(0.0, 1.0))));
    }
    out
}

fn jpeg_with_profile(img: &RgbImage, quality: u8, profile: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = JpegEncoder::new_with_quality(&mut out, quality);
    enc.set_icc_profile(profile.to_vec()).unwrap();
    enc.write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        ExtendedColorType::Rgb8,
    )
    .unwrap();
    out
}

fn png_with_profile(img: &RgbImage, profile: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = PngEncoder::new(&mut out);
    enc.set_icc_profile(profile.to_vec()).unwrap();
    enc.write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        ExtendedColorType::Rgb8,
    )
    .unwrap();
    out
}

/// Saturated patches in the target space's own code values, 48 px each, 8 × 6.
fn patches() -> RgbImage {
    const ROWS: [[[u8; 3]; 8]; 6] = [
        [
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [0, 255, 255],
            [255, 0, 255],
            [255, 255, 0],
            [255, 255, 255],
            [0, 0, 0],
        ],
        [
            [191, 0, 0],
            [0, 191, 0],
            [0, 0, 191],
            [0, 191, 191],
            [191, 0, 191],
            [191, 191, 0],
            [191, 191, 191],
            [64, 64, 64],
        ],
        [
            [255, 128, 128],
            [128, 255, 128],
            [128, 128, 255],
            [128, 255, 255],
            [255, 128, 255],
            [255, 255, 128],
            [230, 230, 230],
            [25, 25, 25],
        ],
        [
            [224, 172, 140],
            [198, 134, 104],
            [141, 85, 60],
            [110, 160, 220],
            [80, 140, 60],
            [230, 200, 60],
            [200, 60, 40],
            [60, 60, 160],
        ],
        [
            [0, 0, 0],
            [36, 36, 36],
            [73, 73, 73],
            [109, 109, 109],
            [146, 146, 146],
            [182, 182, 182],
            [219, 219, 219],
            [255, 255, 255],
        ],
        [
            [255, 100, 0],
            [255, 0, 100],
            [100, 255, 0],
            [0, 255, 100],
            [0, 100, 255],
            [100, 0, 255],
            [255, 200, 0],
            [0, 200, 255],
        ],
    ];
    RgbImage::from_fn(8 * 48, 6 * 48, |x, y| {
        image::Rgb(ROWS[(y / 48) as usize][(x / 48) as usize])
    })
}

/// APP2 ICC_PROFILE segments for `profile` (split at 65,519 bytes a chunk).
fn app2_chunks(profile: &[u8]) -> Vec<u8> {
    let chunks: Vec<&[u8]> = profile.chunks(65_519).collect();
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        out.extend_from_slice(&[0xFF, 0xE2]);
        out.extend_from_slice(&((2 + 12 + 2 + c.len()) as u16).to_be_bytes());
        out.extend_from_slice(b"ICC_PROFILE\0");
        out.extend_from_slice(&[(i + 1) as u8, chunks.len() as u8]);
        out.extend_from_slice(c);
    }
    out
}

/// The marker segments of a baseline greyscale JPEG from the image crate's encoder.
struct GrayParts {
    dqt: Vec<u8>,
    dht: Vec<u8>,
    quant_table: u8,
    huffman_tables: u8,
    scan: Vec<u8>,
}

fn gray_parts(jpeg: &[u8]) -> GrayParts {
    let (mut dqt, mut dht) = (Vec::new(), Vec::new());
    let mut quant_table = 0;
    let mut i = 2;
    loop {
        assert_eq!(jpeg[i], 0xFF);
        let marker = jpeg[i + 1];
        let len = usize::from(u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]));
        let seg = &jpeg[i..i + 2 + len];
        match marker {
            0xDB => dqt.extend_from_slice(seg),
            0xC4 => dht.extend_from_slice(seg),
            0xC0 => {
                assert_eq!(seg[9], 1, "one component");
                quant_table = seg[12];
            }
            0xDA => {
                assert_eq!(seg[4], 1, "one component in the scan");
                let end = jpeg.len() - 2;
                assert_eq!(&jpeg[end..], &[0xFF, 0xD9]);
                return GrayParts {
                    dqt,
                    dht,
                    quant_table,
                    huffman_tables: seg[6],
                    scan: jpeg[i + 2 + len..end].to_vec(),
                };
            }
            _ => {}
        }
        i += 2 + len;
    }
}

/// A 4-component baseline JPEG the way Photoshop writes CMYK: an Adobe APP14 segment with
/// transform 0 (no colour transform) and inverted samples (255 = no ink). Each plane is
/// encoded by the image crate as greyscale and becomes one non-interleaved scan.
fn cmyk_jpeg(w: u32, h: u32, ink: &[[u8; 4]], quality: u8, profile: &[u8]) -> Vec<u8> {
    let planes: Vec<GrayParts> = (0..4)
        .map(|c| {
            let plane: Vec<u8> = ink.iter().map(|px| 255 - px[c]).collect();
            let mut out = Vec::new();
            JpegEncoder::new_with_quality(&mut out, quality)
                .write_image(&plane, w, h, ExtendedColorType::L8)
                .unwrap();
            gray_parts(&out)
        })
        .collect();
    for p in &planes[1..] {
        assert!(
            p.dqt == planes[0].dqt && p.dht == planes[0].dht,
            "shared tables"
        );
    }
    let mut out = vec![0xFF, 0xD8];
    // APP14 "Adobe": version 100, flags0, flags1, transform 0.
    out.extend_from_slice(&[0xFF, 0xEE, 0, 14]);
    out.extend_from_slice(b"Adobe");
    out.extend_from_slice(&[0, 100, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&app2_chunks(profile));
    out.extend_from_slice(&planes[0].dqt);
    out.extend_from_slice(&[0xFF, 0xC0, 0, 8 + 3 * 4, 8]);
    out.extend_from_slice(&(h as u16).to_be_bytes());
    out.extend_from_slice(&(w as u16).to_be_bytes());
    out.push(4);
    for id in 1..=4u8 {
        out.extend_from_slice(&[id, 0x11, planes[0].quant_table]);
    }
    out.extend_from_slice(&planes[0].dht);
    for (id, p) in (1..=4u8).zip(&planes) {
        out.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, id, p.huffman_tables, 0, 63, 0]);
        out.extend_from_slice(&p.scan);
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

/// Ink for an sRGB pixel: a plain separation with 60 % grey component replacement.
fn separate(rgb: [u8; 3]) -> [u8; 4] {
    let [r, g, b] = rgb.map(|c| f64::from(c) / 255.0);
    let k = 0.6 * (1.0 - r.max(g).max(b));
    let ink = |c: f64| ((1.0 - c - k) / (1.0 - k)).clamp(0.0, 1.0);
    [ink(r), ink(g), ink(b), k].map(to_u8)
}

fn write(name: &str, bytes: &[u8]) {
    let path = out_dir().join(name);
    std::fs::write(&path, bytes).unwrap();
    println!("{} ({} bytes)", path.display(), bytes.len());
}

fn load(rel: &str) -> RgbImage {
    image::open(fixtures().join(rel)).unwrap().into_rgb8()
}

fn main() {
    std::fs::create_dir_all(out_dir()).unwrap();

    let p3 = icc::rgb_profile(
        "Display P3 (sightline test profile)",
        P3,
        D65,
        icc::Trc::Srgb,
    );
    // The curve sampled at 16,384 points per channel (as some scanner and camera profiles
    // store it): 98 KB, so the profile is split over two JPEG APP2 markers.
    let adobe = icc::rgb_profile(
        "Adobe RGB (1998)-compatible (sightline test profile)",
        ADOBE,
        D65,
        icc::Trc::SampledGamma(ADOBE_GAMMA, 16_384),
    );
    let srgb = icc::rgb_profile("sRGB (sightline test profile)", SRGB, D65, icc::Trc::Srgb);
    let adapt = icc::bradford(icc::white_xyz(D65), icc::D50);
    let srgb_to_xyz = icc::mul(adapt, icc::rgb_to_xyz(SRGB, D65));
    let cmyk = icc::cmyk_profile(
        "CMYK press (sightline test profile)",
        9,
        cmyk_model::dot_gain,
        |ink| icc::mul_vec(srgb_to_xyz, cmyk_model::ink_to_linear_srgb(ink)),
        cmyk_model::inverse_dot_gain,
    );
    write("display-p3.icc", &p3);
    write("adobe-rgb-compatible.icc", &adobe);
    write("srgb.icc", &srgb);
    write("cmyk-press.icc", &cmyk);

    let coffee = load("samples/coffee.png");
    let coffee_p3 = from_srgb(&coffee, P3, srgb_oetf);
    write("p3_coffee.jpg", &jpeg_with_profile(&coffee_p3, 95, &p3));

    let chelsea = load("samples/chelsea.png");
    let chelsea_adobe = from_srgb(&chelsea, ADOBE, |v| v.powf(1.0 / ADOBE_GAMMA));
    write(
        "adobergb_chelsea.jpg",
        &jpeg_with_profile(&chelsea_adobe, 95, &adobe),
    );

    write("p3_patches.png", &png_with_profile(&patches(), &p3));

    // CMYK: the astronaut separated, under a strip of solid ink patches (C, M, Y, K, then
    // the overprints CM, CY, MY and a 50 % cyan tint).
    let astronaut = load("samples/astronaut.png");
    let (w, h) = astronaut.dimensions();
    let strip: [[u8; 4]; 8] = [
        [255, 0, 0, 0],
        [0, 255, 0, 0],
        [0, 0, 255, 0],
        [0, 0, 0, 255],
        [255, 255, 0, 0],
        [255, 0, 255, 0],
        [0, 255, 255, 0],
        [128, 0, 0, 0],
    ];
    let ink: Vec<[u8; 4]> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| {
            if y < 64 {
                strip[(x * 8 / w) as usize]
            } else {
                separate(astronaut.get_pixel(x, y).0)
            }
        })
        .collect();
    write("cmyk_astronaut.jpg", &cmyk_jpeg(w, h, &ink, 95, &cmyk));

    // Sanity: the image crate reads every file back.
    for name in [
        "p3_coffee.jpg",
        "adobergb_chelsea.jpg",
        "p3_patches.png",
        "cmyk_astronaut.jpg",
    ] {
        let bytes = std::fs::read(out_dir().join(name)).unwrap();
        let img = image::ImageReader::new(Cursor::new(&bytes))
            .with_guessed_format()
            .unwrap()
            .decode()
            .unwrap();
        println!("{name}: {}x{} {:?}", img.width(), img.height(), img.color());
    }
}
