//! The offline generator: a deterministic picture drawn from the prompt and seed ($0, no
//! network), so generation jobs run end to end with no key (demos, tests). The same prompt,
//! seed and size always give the same pixels; the format only changes the encoding.

use async_trait::async_trait;
use image::{Rgb, RgbImage};
use sha2::{Digest, Sha256};
use sightline_core::generate::{Size, MAX_SIDE, MIN_SIDE};
use sightline_core::retry::FailureKind;

use super::gen_common::{content_type, encode, AUTO_SIDE};
use crate::ports::{GeneratedImage, GenerationCall, ImageGenerator, ProviderError, RateInfo};

/// The model id of the price table's `[[image_models]]` entry ($0).
pub const LOCAL_IMAGE_MODEL: &str = "local-canvas";

#[derive(Debug, Clone, Copy, Default)]
pub struct LocalGenerator;

fn refused(message: String) -> ProviderError {
    ProviderError {
        // A 400 is what a provider answers an impossible size: permanent, never billed.
        kind: FailureKind::Http {
            status: 400,
            retry_after: None,
        },
        message,
        rate: RateInfo::default(),
        usage: None,
        billed: false,
    }
}

/// The pixel size of a call: `auto` is square at [`AUTO_SIDE`]; sides outside what a request
/// may ask ([`MIN_SIDE`]..=[`MAX_SIDE`]) are refused.
pub fn dimensions(size: Size) -> Result<(u32, u32), String> {
    let (w, h) = match size {
        Size::Auto => (AUTO_SIDE, AUTO_SIDE),
        Size::Pixels { width, height } => (width, height),
    };
    let ok = |s: u32| (MIN_SIDE..=MAX_SIDE).contains(&s);
    if ok(w) && ok(h) {
        Ok((w, h))
    } else {
        Err(format!(
            "size {w}x{h}: each side must be {MIN_SIDE} to {MAX_SIDE} pixels"
        ))
    }
}

/// The picture for `prompt` and `seed`: a diagonal gradient between two colours of the hash,
/// with discs and bars placed by further bytes of it. Fixed-point arithmetic only, so every
/// platform draws the same pixels.
pub fn draw(prompt: &str, seed: Option<u64>, width: u32, height: u32) -> RgbImage {
    let mut h = Sha256::new();
    h.update(b"sightline/local-canvas/v1\0");
    h.update((prompt.len() as u64).to_be_bytes());
    h.update(prompt.as_bytes());
    match seed {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            h.update(s.to_be_bytes());
        }
    }
    let d: [u8; 32] = h.finalize().into();
    let from = [d[0], d[1], d[2]];
    let to = [d[3], d[4], d[5]];
    let span = u64::from(width) + u64::from(height);
    let mut img = RgbImage::from_fn(width, height, |x, y| {
        let t = u64::from(x) + u64::from(y);
        let mix =
            |a: u8, b: u8| ((u64::from(a) * (span - t) + u64::from(b) * t) / span.max(1)) as u8;
        Rgb([
            mix(from[0], to[0]),
            mix(from[1], to[1]),
            mix(from[2], to[2]),
        ])
    });
    let (w, hgt) = (u64::from(width), u64::from(height));
    // Three discs: centre and radius from the hash, colour the inverse of a hash colour.
    for i in 0..3 {
        let b = &d[6 + i * 4..10 + i * 4];
        let cx = u64::from(b[0]) * w / 255;
        let cy = u64::from(b[1]) * hgt / 255;
        let r = (u64::from(b[2]) % 64 + 16) * w.min(hgt) / 256;
        let colour = Rgb([255 - d[b[3] as usize % 32], d[(i * 7) % 32], b[3]]);
        let (x0, x1) = (cx.saturating_sub(r), (cx + r).min(w));
        let (y0, y1) = (cy.saturating_sub(r), (cy + r).min(hgt));
        for y in y0..y1 {
            for x in x0..x1 {
                let (dx, dy) = (x.abs_diff(cx), y.abs_diff(cy));
                if dx * dx + dy * dy <= r * r {
                    img.put_pixel(x as u32, y as u32, colour);
                }
            }
        }
    }
    // Two horizontal bars.
    for i in 0..2 {
        let b = &d[18 + i * 3..21 + i * 3];
        let y0 = u64::from(b[0]) * hgt / 255;
        let y1 = (y0 + (u64::from(b[1]) % 32 + 4) * hgt / 256).min(hgt);
        let colour = Rgb([b[2], 255 - b[2], d[24 + i]]);
        for y in y0..y1 {
            for x in 0..w {
                img.put_pixel(x as u32, y as u32, colour);
            }
        }
    }
    img
}

#[async_trait]
impl ImageGenerator for LocalGenerator {
    fn name(&self) -> &str {
        "local"
    }

    fn is_paid(&self) -> bool {
        false
    }

    async fn generate(&self, req: &GenerationCall) -> Result<GeneratedImage, ProviderError> {
        let (width, height) = dimensions(req.size).map_err(refused)?;
        let (prompt, seed, format) = (req.prompt.clone(), req.seed, req.output_format);
        // Drawing and encoding a 4096² picture takes a while: off the async workers.
        let bytes = tokio::task::spawn_blocking(move || {
            encode(&draw(&prompt, seed, width, height), format)
        })
        .await
        .map_err(|e| refused(format!("local generator task: {e}")))?
        .map_err(|e| refused(format!("encoding the picture as {format}: {e}")))?;
        Ok(GeneratedImage {
            bytes,
            content_type: content_type(format).to_string(),
            width,
            height,
            usage: None,
            model: LOCAL_IMAGE_MODEL.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::gen_common::check_bytes;
    use sightline_core::generate::{OutputFormat, Quality};

    fn call(prompt: &str, size: Size, format: OutputFormat, seed: Option<u64>) -> GenerationCall {
        GenerationCall {
            model: LOCAL_IMAGE_MODEL.into(),
            prompt: prompt.into(),
            size,
            quality: Quality::High,
            output_format: format,
            seed,
        }
    }

    #[tokio::test]
    async fn pictures_are_deterministic_and_in_the_asked_format_and_size() {
        let size = Size::Pixels {
            width: 96,
            height: 64,
        };
        for f in [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp] {
            let a = LocalGenerator
                .generate(&call("a red fox", size, f, None))
                .await
                .unwrap();
            let b = LocalGenerator
                .generate(&call("a red fox", size, f, None))
                .await
                .unwrap();
            assert_eq!(a, b, "{f}");
            assert_eq!((a.width, a.height), (96, 64));
            assert_eq!(check_bytes(&a.bytes, f).unwrap(), (96, 64), "{f}");
            assert_eq!(a.content_type, content_type(f));
            assert_eq!(a.usage, None);
        }
        let fox = draw("a red fox", None, 96, 64);
        assert_ne!(fox, draw("a blue fox", None, 96, 64));
        assert_ne!(fox, draw("a red fox", Some(1), 96, 64));
        assert_eq!(
            draw("a red fox", Some(1), 96, 64),
            draw("a red fox", Some(1), 96, 64)
        );
        let auto = LocalGenerator
            .generate(&call("x", Size::Auto, OutputFormat::Png, None))
            .await
            .unwrap();
        assert_eq!((auto.width, auto.height), (AUTO_SIDE, AUTO_SIDE));
        assert!(!LocalGenerator.is_paid());
    }

    #[tokio::test]
    async fn an_impossible_size_is_a_permanent_unbilled_refusal() {
        let e = LocalGenerator
            .generate(&call(
                "x",
                Size::Pixels {
                    width: 8,
                    height: 64,
                },
                OutputFormat::Png,
                None,
            ))
            .await
            .unwrap_err();
        assert_eq!(
            sightline_core::retry::classify(&e.kind),
            sightline_core::retry::RetryClass::Permanent
        );
        assert!(!e.billed);
    }
}
