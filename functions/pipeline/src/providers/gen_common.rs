//! What every image generator shares: encoding a picture in the asked format, and checking a
//! provider's image (base64 within a bound, decodes, is the asked format) before it is stored.

use std::io::Cursor;

use base64::Engine;
use image::{ImageFormat, RgbImage};
use sightline_core::generate::OutputFormat;
use sightline_core::pricing::Usage;

use super::http::bad_answer;
use crate::ports::{ProviderError, RateInfo};

/// The most base64 accepted for one image: a 4096×4096 PNG is well under it, so anything
/// larger is not an image we asked for, and decoding it would only spend memory.
pub const MAX_IMAGE_B64_BYTES: usize = 50 * 1024 * 1024;

/// The side used when the size is `auto` and the provider leaves the choice to us.
pub const AUTO_SIDE: u32 = 1024;

pub fn image_format(f: OutputFormat) -> ImageFormat {
    match f {
        OutputFormat::Png => ImageFormat::Png,
        OutputFormat::Jpeg => ImageFormat::Jpeg,
        OutputFormat::Webp => ImageFormat::WebP,
    }
}

pub fn content_type(f: OutputFormat) -> &'static str {
    match f {
        OutputFormat::Png => "image/png",
        OutputFormat::Jpeg => "image/jpeg",
        OutputFormat::Webp => "image/webp",
    }
}

/// Encode `rgb` as `format` (WebP is lossless: the only WebP encoder the `image` crate has).
pub fn encode(rgb: &RgbImage, format: OutputFormat) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Cursor::new(Vec::new());
    rgb.write_to(&mut out, image_format(format))?;
    Ok(out.into_inner())
}

/// Why a provider's image is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ImageCheckError {
    #[error("the image is {0} bytes of base64, over the {MAX_IMAGE_B64_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("the image is not base64: {0}")]
    NotBase64(#[from] base64::DecodeError),
    #[error("the image is {found}, not the {asked} asked for")]
    WrongFormat { asked: OutputFormat, found: String },
    #[error("the image does not decode: {0}")]
    Undecodable(#[from] image::ImageError),
}

/// Decode one base64 image and check it is a real image of `format`: its bytes and size.
pub fn check_b64(b64: &str, format: OutputFormat) -> Result<(Vec<u8>, u32, u32), ImageCheckError> {
    if b64.len() > MAX_IMAGE_B64_BYTES {
        return Err(ImageCheckError::TooLarge(b64.len()));
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim())?;
    let (width, height) = check_bytes(&bytes, format)?;
    Ok((bytes, width, height))
}

/// Check `bytes` decode as `format`; their size.
pub fn check_bytes(bytes: &[u8], format: OutputFormat) -> Result<(u32, u32), ImageCheckError> {
    let found = image::guess_format(bytes)?;
    if found != image_format(format) {
        return Err(ImageCheckError::WrongFormat {
            asked: format,
            found: format!("{found:?}").to_ascii_lowercase(),
        });
    }
    // A full decode, not just the header: a truncated body must not be stored as an image.
    let img = image::load_from_memory_with_format(bytes, found)?;
    Ok((img.width(), img.height()))
}

/// A provider's base64 image as a checked [`crate::ports::GeneratedImage`], or the billed
/// invalid output it is.
// The error every provider call returns, unboxed like it.
#[allow(clippy::result_large_err)]
pub(crate) fn generated(
    b64: &str,
    format: OutputFormat,
    usage: Option<Usage>,
    model: String,
    rate: RateInfo,
) -> Result<crate::ports::GeneratedImage, ProviderError> {
    let (bytes, width, height) =
        check_b64(b64, format).map_err(|e| bad_answer(e.to_string(), rate, usage))?;
    Ok(crate::ports::GeneratedImage {
        bytes,
        content_type: content_type(format).to_string(),
        width,
        height,
        usage,
        model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_checked_for_their_format_and_for_decoding() {
        let rgb = RgbImage::from_pixel(8, 4, image::Rgb([10, 20, 30]));
        for f in [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::Webp] {
            let bytes = encode(&rgb, f).unwrap();
            assert_eq!(check_bytes(&bytes, f).unwrap(), (8, 4), "{f}");
        }
        let png = encode(&rgb, OutputFormat::Png).unwrap();
        assert!(matches!(
            check_bytes(&png, OutputFormat::Jpeg),
            Err(ImageCheckError::WrongFormat { .. })
        ));
        // A truncated PNG has the right magic but does not decode.
        assert!(matches!(
            check_bytes(&png[..png.len() / 2], OutputFormat::Png),
            Err(ImageCheckError::Undecodable(_))
        ));
        assert!(matches!(
            check_b64("%%%", OutputFormat::Png),
            Err(ImageCheckError::NotBase64(_))
        ));
        let huge = "A".repeat(MAX_IMAGE_B64_BYTES + 4);
        assert!(matches!(
            check_b64(&huge, OutputFormat::Png),
            Err(ImageCheckError::TooLarge(_))
        ));
    }

    #[test]
    fn an_unusable_image_is_billed_invalid_output_with_its_usage() {
        let usage = Usage {
            input_tokens: 3,
            output_tokens: 272,
            cached_tokens: 0,
        };
        let e = generated(
            "aGVsbG8=",
            OutputFormat::Png,
            Some(usage),
            "m".into(),
            RateInfo::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind, sightline_core::retry::FailureKind::InvalidOutput);
        assert!(e.billed);
        assert_eq!(e.usage, Some(usage));
    }
}
