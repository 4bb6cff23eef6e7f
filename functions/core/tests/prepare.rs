//! Image preparation against real photos and hostile inputs.
use std::io::Cursor;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use sightline_core::prepare::{probe, sniff, SourceFormat};
use sightline_core::{prepare, PrepareError, PrepareOptions};

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
