//! What [`crate::prepare`] would do with an image, read from its header alone: the same
//! limits and refusals, the upright size, the EXIF orientation and the output size, with no
//! image decoder behind it.
//!
//! This is what the browser's first-load module runs: it decides whether the browser's own
//! decoder can prepare the file (the output size is the server's, from [`fit_within`]) or
//! whether the full decoder must, and it refuses what the server refuses from the header
//! (empty, too large, SVG, not an image, too many pixels, a JPEG cut off before its end)
//! with the server's own errors. Anything it cannot read with certainty (a broken header, a
//! layout the browser may treat differently) is [`Route::Decoder`]: the full `prepare` then
//! gives the server's exact answer. Tests check that every size and orientation read here is
//! the one [`crate::probe`] reads with the real decoders.

use image::metadata::Orientation;
use serde::{Deserialize, Serialize};

use crate::prepare::{
    check_options, check_pixels, check_size, fit_within, gif_first_frame_extent, header_dimensions,
    sniff, PrepareError, PrepareOptions, SourceFormat,
};

/// Facts read from the header, as [`crate::probe`] would give them, and the output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub format: SourceFormat,
    /// Size as stored (before EXIF orientation).
    pub stored_width: u32,
    pub stored_height: u32,
    /// EXIF orientation, 1–8 (1 when absent).
    pub orientation: u8,
    /// Upright (display) size of the original.
    pub width: u32,
    pub height: u32,
    /// Size of the prepared JPEG: the upright size fitted within `max_edge`.
    pub out_width: u32,
    pub out_height: u32,
}

/// Who should decode the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A plain decode gives the server's picture: the browser's own decoder may do it.
    Platform(Header),
    /// The full decoder must: the reason says why (for logs and tests).
    Decoder(&'static str),
}

/// Limits, format and header of `bytes`: an error when `prepare` would refuse the file for
/// what its header says, else who should decode it.
pub fn route(bytes: &[u8], opts: &PrepareOptions) -> Result<Route, PrepareError> {
    check_options(opts)?;
    check_size(bytes, opts)?;
    let format = sniff(bytes)?;
    if let Some((w, h)) = header_dimensions(bytes, format) {
        check_pixels(w, h, opts)?;
    }
    let read = match format {
        SourceFormat::Jpeg => jpeg(bytes)?,
        SourceFormat::Png => png(bytes),
        SourceFormat::Webp => webp(bytes),
        SourceFormat::Gif => gif(bytes),
    };
    let (stored_width, stored_height, orientation) = match read {
        Read::Ok { w, h, orientation } => (w, h, orientation),
        Read::Decoder(why) => return Ok(Route::Decoder(why)),
    };
    check_pixels(stored_width, stored_height, opts)?;
    // The decoders' own buffers grow with the pixels (up to 8 bytes each for 16-bit RGBA,
    // plus conversion copies): well under the allocation limit, the server cannot refuse the
    // image as too big to decode; near it, the full decoder applies the server's exact rule.
    let pixels = u64::from(stored_width) * u64::from(stored_height);
    if pixels.saturating_mul(16) > opts.max_alloc_bytes {
        return Ok(Route::Decoder("near the decode memory limit"));
    }
    let (width, height) = if matches!(orientation, 5..=8) {
        (stored_height, stored_width)
    } else {
        (stored_width, stored_height)
    };
    let (out_width, out_height) = fit_within(width, height, opts.max_edge);
    Ok(Route::Platform(Header {
        format,
        stored_width,
        stored_height,
        orientation,
        width,
        height,
        out_width,
        out_height,
    }))
}

enum Read {
    Ok { w: u32, h: u32, orientation: u8 },
    Decoder(&'static str),
}

fn u16_be(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u32::from(u16::from_be_bytes([s[0], s[1]])))
}

fn u32_be(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn u24_le(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(3)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], 0]))
}

/// The marker segments up to the first scan: frame size, EXIF orientation and, as `prepare`
/// requires, an end-of-image marker after the scan data.
fn jpeg(bytes: &[u8]) -> Result<Read, PrepareError> {
    let mut i = 2; // after SOI
    let mut frame: Option<(u8, u32, u32, u8)> = None;
    let mut exif: Option<&[u8]> = None;
    let mut exif_segments = 0;
    let scan_start = loop {
        let (Some(&ff), Some(&marker)) = (bytes.get(i), bytes.get(i + 1)) else {
            return Ok(Read::Decoder("JPEG header ends before the first scan"));
        };
        if ff != 0xFF {
            return Ok(Read::Decoder("JPEG marker structure is broken"));
        }
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        if matches!(marker, 0x01 | 0xD0..=0xD7) {
            i += 2; // standalone marker
            continue;
        }
        let Some(len) = u16_be(bytes, i + 2).map(|l| l as usize) else {
            return Ok(Read::Decoder("JPEG header ends before the first scan"));
        };
        let body = i + 4;
        let end = i + 2 + len;
        if len < 2 || end > bytes.len() {
            return Ok(Read::Decoder("JPEG segment runs past the end of the file"));
        }
        match marker {
            // SOF0–SOF15, except DHT (C4), JPG (C8) and DAC (CC).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) && frame.is_none() => {
                // Precision (1), height (2), width (2), component count (1).
                let (Some(h), Some(w), Some(&n)) = (
                    u16_be(bytes, body + 1),
                    u16_be(bytes, body + 3),
                    bytes.get(body + 5),
                ) else {
                    return Ok(Read::Decoder("JPEG frame header is cut short"));
                };
                frame = Some((marker, w, h, n));
            }
            // APP1 "Exif\0\0": the decoder keeps the last one before the scan.
            0xE1 if len - 2 > 6 && bytes.get(body..body + 6) == Some(b"Exif\0\0") => {
                exif = Some(&bytes[body + 6..end]);
                exif_segments += 1;
            }
            0xDA => break end,
            _ => {}
        }
        i = end;
    };
    let Some((sof, w, h, components)) = frame else {
        return Ok(Read::Decoder("JPEG has no frame header before its scan"));
    };
    // Some decoders fill a cut-off scan with grey instead of failing: `prepare` refuses a
    // JPEG with no end-of-image marker after its scan data (stuffed FF 00 and restart markers
    // aside, FF D9 there is the real end; searched from the end, where it normally is).
    if !bytes[scan_start..]
        .windows(2)
        .rev()
        .any(|p| p == [0xFF, 0xD9])
    {
        return Err(PrepareError::Truncated);
    }
    if !matches!(sof, 0xC0..=0xC2) {
        return Ok(Read::Decoder(
            "JPEG coding other than baseline or progressive Huffman",
        ));
    }
    if components != 1 && components != 3 {
        // CMYK/YCCK: the server converts the ink through the embedded profile.
        return Ok(Read::Decoder("JPEG is not grey or YCbCr"));
    }
    if exif_segments > 1 {
        return Ok(Read::Decoder(
            "JPEG has several EXIF segments (decoders differ on which counts)",
        ));
    }
    let orientation = exif
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms)
        .to_exif();
    Ok(Read::Ok { w, h, orientation })
}

/// IHDR size; an eXIf chunk (orientation) or an animation defers to the full decoder.
fn png(bytes: &[u8]) -> Read {
    let Some((w, h)) = header_dimensions(bytes, SourceFormat::Png) else {
        return Read::Decoder("PNG has no IHDR chunk first");
    };
    let mut i = 8usize;
    while let (Some(len), Some(kind)) = (u32_be(bytes, i), bytes.get(i + 4..i + 8)) {
        match kind {
            b"eXIf" => return Read::Decoder("PNG carries EXIF (orientation)"),
            b"acTL" => return Read::Decoder("animated PNG"),
            b"IEND" => break,
            _ => {}
        }
        let Some(next) = (len as usize)
            .checked_add(12)
            .and_then(|n| i.checked_add(n))
        else {
            break;
        };
        i = next;
    }
    Read::Ok {
        w,
        h,
        orientation: 1,
    }
}

/// Canvas size of a WebP (VP8X) or the frame size of a simple lossy (VP8) or lossless (VP8L)
/// one. EXIF (orientation) defers to the full decoder.
fn webp(bytes: &[u8]) -> Read {
    let Some(kind) = bytes.get(12..16) else {
        return Read::Decoder("WebP header is cut short");
    };
    let d = 20; // chunk data
    let size = match kind {
        b"VP8X" => {
            let Some(&flags) = bytes.get(d) else {
                return Read::Decoder("WebP header is cut short");
            };
            if flags & 0x08 != 0 {
                return Read::Decoder("WebP carries EXIF (orientation)");
            }
            u24_le(bytes, d + 4)
                .zip(u24_le(bytes, d + 7))
                .map(|(w, h)| (w + 1, h + 1))
        }
        // Frame tag (3), start code 9D 01 2A, then 14-bit width and height.
        b"VP8 " if bytes.get(d + 3..d + 6) == Some(&[0x9D, 0x01, 0x2A]) => {
            bytes.get(d + 6..d + 10).map(|s| {
                (
                    u32::from(u16::from_le_bytes([s[0], s[1]]) & 0x3FFF),
                    u32::from(u16::from_le_bytes([s[2], s[3]]) & 0x3FFF),
                )
            })
        }
        // Signature 2F, then width−1 and height−1 in 14 bits each.
        b"VP8L" if bytes.get(d) == Some(&0x2F) => bytes.get(d + 1..d + 5).map(|s| {
            let v = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            ((v & 0x3FFF) + 1, ((v >> 14) & 0x3FFF) + 1)
        }),
        _ => None,
    };
    match size {
        Some((w, h)) => Read::Ok {
            w,
            h,
            orientation: 1,
        },
        None => Read::Decoder("WebP header is not one this reader knows"),
    }
}

/// The logical screen; a first frame reaching past it defers to the full decoder.
fn gif(bytes: &[u8]) -> Read {
    let (Some(w), Some(h)) = (
        bytes
            .get(6..8)
            .map(|s| u32::from(u16::from_le_bytes([s[0], s[1]]))),
        bytes
            .get(8..10)
            .map(|s| u32::from(u16::from_le_bytes([s[0], s[1]]))),
    ) else {
        return Read::Decoder("GIF header is cut short");
    };
    match gif_first_frame_extent(bytes) {
        Some((fw, fh)) if fw <= w && fh <= h => Read::Ok {
            w,
            h,
            orientation: 1,
        },
        Some(_) => Read::Decoder("GIF frame reaches past its screen"),
        None => Read::Decoder("GIF has no image before its end"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prepare::probe;
    use image::{DynamicImage, ExtendedColorType, ImageEncoder, ImageFormat, RgbImage, RgbaImage};
    use std::io::Cursor;

    fn fixture(rel: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests")
                .join(rel),
        )
        .unwrap()
    }

    fn encode(img: DynamicImage, fmt: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).unwrap();
        out.into_inner()
    }

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 3) as u8, 60]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80)
            .write_image(img.as_raw(), w, h, ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    /// A JPEG with a minimal APP1 EXIF segment (big- or little-endian TIFF) after SOI.
    fn with_exif(jpeg: &[u8], orientation: u16, little: bool) -> Vec<u8> {
        let mut tiff: Vec<u8> = if little {
            vec![
                b'I', b'I', 42, 0, 8, 0, 0, 0, 1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0,
            ]
        } else {
            vec![
                b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1,
            ]
        };
        let v = if little {
            orientation.to_le_bytes()
        } else {
            orientation.to_be_bytes()
        };
        tiff.extend_from_slice(&[v[0], v[1], 0, 0, 0, 0, 0, 0]);
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec();
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    /// `route` agrees with the real decoders' `probe` and with `prepare`'s output size.
    fn agrees_with_the_decoders(bytes: &[u8], opts: &PrepareOptions) -> Header {
        let Route::Platform(h) = route(bytes, opts).unwrap() else {
            panic!("expected the platform route");
        };
        let p = probe(bytes, opts).unwrap();
        assert_eq!(
            (h.format, h.width, h.height, h.orientation),
            (p.format, p.width, p.height, p.orientation)
        );
        let prepared = crate::prepare(bytes, opts).unwrap();
        assert_eq!(
            (h.out_width, h.out_height),
            (prepared.width, prepared.height)
        );
        h
    }

    #[test]
    fn fixtures_read_from_the_header_equal_what_the_decoders_read() {
        let opts = PrepareOptions::default();
        for rel in [
            "fixtures/large/phone12mp.jpg",
            "fixtures/large/elephants_progressive.jpg",
            "fixtures/samples/astronaut.png",
            "fixtures/samples/coffee.png",
            "fixtures/samples/chelsea.png",
            "fixtures/samples/rocket.jpg",
            "fixtures/samples/hubble_deep_field.jpg",
            "fixtures/photos/Storm.jpg",
            "fixtures/photos/Garden.jpg",
            "fixtures/photos/Dune.jpg",
            "fixtures-icc/p3_coffee.jpg",
            "fixtures-icc/adobergb_chelsea.jpg",
            "fixtures-icc/p3_patches.png",
        ] {
            agrees_with_the_decoders(&fixture(rel), &opts);
        }
        let phone = agrees_with_the_decoders(&fixture("fixtures/large/phone12mp.jpg"), &opts);
        assert_eq!(
            (phone.orientation, phone.width, phone.height),
            (6, 3024, 4032)
        );
        assert_eq!((phone.out_width, phone.out_height), (768, 1024));
    }

    #[test]
    fn exif_orientations_one_to_eight_read_as_the_decoder_reads_them() {
        let base = jpeg(300, 200);
        let opts = PrepareOptions {
            max_edge: 120,
            ..PrepareOptions::default()
        };
        for o in 1..=8u16 {
            for little in [false, true] {
                let h = agrees_with_the_decoders(&with_exif(&base, o, little), &opts);
                assert_eq!(u16::from(h.orientation), o);
                let upright = if o >= 5 { (80, 120) } else { (120, 80) };
                assert_eq!((h.out_width, h.out_height), upright, "orientation {o}");
            }
        }
        // Out-of-range values count as no orientation, as in the decoder.
        let h = agrees_with_the_decoders(&with_exif(&base, 9, false), &opts);
        assert_eq!(h.orientation, 1);
    }

    #[test]
    fn webp_and_gif_sizes_equal_the_decoders() {
        let opts = PrepareOptions::default();
        let rgba = RgbaImage::from_fn(1500, 700, |x, y| image::Rgba([x as u8, y as u8, 9, 200]));
        let webp = encode(DynamicImage::ImageRgba8(rgba.clone()), ImageFormat::WebP);
        assert_eq!(&webp[12..16], b"VP8L");
        let h = agrees_with_the_decoders(&webp, &opts);
        assert_eq!((h.out_width, h.out_height), (1024, 478));
        let small = DynamicImage::ImageRgba8(image::imageops::thumbnail(&rgba, 150, 70));
        agrees_with_the_decoders(&encode(small, ImageFormat::Gif), &opts);
    }

    #[test]
    fn the_servers_header_refusals_come_with_the_servers_errors() {
        let opts = PrepareOptions::default();
        let photo = jpeg(64, 48);
        assert_eq!(route(&[], &opts), Err(PrepareError::Empty));
        assert_eq!(route(b"hello", &opts), Err(PrepareError::NotAnImage));
        assert_eq!(
            route(b"<svg xmlns='http://www.w3.org/2000/svg'/>", &opts),
            Err(PrepareError::Svg)
        );
        let cut = &photo[..photo.len() - 40];
        assert_eq!(route(cut, &opts), Err(PrepareError::Truncated));
        assert_eq!(
            crate::prepare(cut, &opts).unwrap_err(),
            PrepareError::Truncated
        );
        let tight = PrepareOptions {
            max_pixels: 1000,
            ..opts
        };
        let err = route(&photo, &tight).unwrap_err();
        assert_eq!(err, crate::prepare(&photo, &tight).unwrap_err());
        assert_eq!(err.code(), "too_many_pixels");
        let small = PrepareOptions {
            max_input_bytes: 10,
            ..opts
        };
        assert_eq!(
            route(&photo, &small).unwrap_err(),
            crate::prepare(&photo, &small).unwrap_err()
        );
    }

    #[test]
    fn what_a_browser_may_decode_differently_goes_to_the_full_decoder() {
        let opts = PrepareOptions::default();
        let cmyk = fixture("fixtures-icc/cmyk_astronaut.jpg");
        assert!(matches!(route(&cmyk, &opts), Ok(Route::Decoder(_))));
        let photo = jpeg(64, 48);
        let twice = with_exif(&with_exif(&photo, 6, false), 3, false);
        assert!(matches!(route(&twice, &opts), Ok(Route::Decoder(_))));
        // A broken marker structure: the full decoder gives the server's error.
        let mut broken = photo.clone();
        broken[4..6].copy_from_slice(&[0xFF, 0xF0]); // the first segment's length
        assert!(matches!(route(&broken, &opts), Ok(Route::Decoder(_))));
        // Near the allocation limit.
        let tight = PrepareOptions {
            max_alloc_bytes: 64 * 48 * 8,
            ..opts
        };
        assert!(matches!(route(&photo, &tight), Ok(Route::Decoder(_))));
    }
}
