//! Image preparation: check limits, decode, orient, convert to sRGB RGB, resize, encode JPEG.
//!
//! Limits are checked from the header before anything large is allocated. The output
//! JPEG carries no metadata (no EXIF, no GPS, no ICC profile) and is already upright; an
//! embedded ICC profile is applied first (see [`crate::color`]), so the pixels are sRGB.

use std::io::Cursor;

use fast_image_resize as fir;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::color::{self, ColorHandling, IccChunk, JpegIcc, Plan};

/// Knobs for [`prepare`]; the defaults are the product's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrepareOptions {
    /// Longest edge of the output, in pixels; smaller images are never upscaled.
    pub max_edge: u32,
    /// JPEG quality, 1–100.
    pub quality: u8,
    /// Largest accepted input, in bytes.
    pub max_input_bytes: u64,
    /// Largest accepted width × height, read from the header before decoding.
    pub max_pixels: u64,
    /// Decoder allocation limit, in bytes.
    pub max_alloc_bytes: u64,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            max_edge: 1024,
            quality: 85,
            max_input_bytes: 25 * 1024 * 1024,
            max_pixels: 100_000_000,
            max_alloc_bytes: 1024 * 1024 * 1024,
        }
    }
}

/// Why an image cannot be prepared. Every variant is permanent for that image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    #[error("empty file (0 bytes)")]
    Empty,
    #[error("file is {bytes} bytes, over the {max}-byte limit")]
    TooLarge { bytes: u64, max: u64 },
    #[error("SVG (vector) images are not supported; export a PNG or JPEG")]
    Svg,
    #[error("not an image (no known image signature)")]
    NotAnImage,
    #[error("unsupported image format {0}; use JPEG, PNG, WebP or GIF")]
    Unsupported(String),
    #[error("image is {width}×{height} = {pixels} pixels, over the {max}-pixel limit")]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        max: u64,
    },
    #[error("image has zero width or height")]
    ZeroDimensions,
    #[error("image needs more memory to decode than the {max}-byte limit")]
    MemoryLimit { max: u64 },
    #[error("image data is truncated")]
    Truncated,
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    #[error("invalid options: {0}")]
    Options(String),
    #[error("could not encode the output JPEG: {0}")]
    Encode(String),
}

impl PrepareError {
    /// A short stable code for APIs and logs.
    pub fn code(&self) -> &'static str {
        match self {
            PrepareError::Empty => "empty",
            PrepareError::TooLarge { .. } => "too_large",
            PrepareError::Svg => "svg_unsupported",
            PrepareError::NotAnImage => "not_an_image",
            PrepareError::Unsupported(_) => "unsupported_format",
            PrepareError::TooManyPixels { .. } => "too_many_pixels",
            PrepareError::ZeroDimensions => "zero_dimensions",
            PrepareError::MemoryLimit { .. } => "memory_limit",
            PrepareError::Truncated => "truncated",
            PrepareError::Corrupt(_) => "corrupt",
            PrepareError::Options(_) => "invalid_options",
            PrepareError::Encode(_) => "encode_failed",
        }
    }
}

/// What the header says, without decoding pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub format: SourceFormat,
    /// Upright (display) size, after EXIF orientation.
    pub width: u32,
    pub height: u32,
    /// EXIF orientation, 1–8 (1 when absent).
    pub orientation: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Jpeg,
    Png,
    Webp,
    Gif,
}

impl SourceFormat {
    fn image_format(self) -> ImageFormat {
        match self {
            SourceFormat::Jpeg => ImageFormat::Jpeg,
            SourceFormat::Png => ImageFormat::Png,
            SourceFormat::Webp => ImageFormat::WebP,
            SourceFormat::Gif => ImageFormat::Gif,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            SourceFormat::Jpeg => "jpg",
            SourceFormat::Png => "png",
            SourceFormat::Webp => "webp",
            SourceFormat::Gif => "gif",
        }
    }
}

/// The prepared image and the facts about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreparedImage {
    #[serde(skip)]
    pub jpeg: Vec<u8>,
    pub format: SourceFormat,
    pub orientation: u8,
    /// Upright size of the original.
    pub original_width: u32,
    pub original_height: u32,
    pub original_bytes: u64,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    /// Lower-case hex sha256 of `jpeg`.
    pub sha256: String,
    /// Whether an embedded ICC profile was converted to sRGB, absent, or unusable.
    #[serde(default)]
    pub color: ColorHandling,
}

/// Identify the format from the signature; SVG and non-images get their own errors.
pub fn sniff(bytes: &[u8]) -> Result<SourceFormat, PrepareError> {
    if bytes.is_empty() {
        return Err(PrepareError::Empty);
    }
    match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => Ok(SourceFormat::Jpeg),
        Ok(ImageFormat::Png) => Ok(SourceFormat::Png),
        Ok(ImageFormat::WebP) => Ok(SourceFormat::Webp),
        Ok(ImageFormat::Gif) => Ok(SourceFormat::Gif),
        Ok(other) => Err(PrepareError::Unsupported(
            format!("{other:?}").to_uppercase(),
        )),
        Err(_) if looks_like_svg(bytes) => Err(PrepareError::Svg),
        Err(_) => Err(PrepareError::NotAnImage),
    }
}

fn looks_like_svg(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(4096)];
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let t = text.trim_start_matches('\u{feff}').trim_start();
    t.starts_with('<') && t.contains("<svg")
}

fn limits(opts: &PrepareOptions) -> Limits {
    let mut l = Limits::default();
    l.max_alloc = Some(opts.max_alloc_bytes);
    // Individual sides: a 100 MP budget never needs a side over 1M pixels.
    l.max_image_width = Some(1 << 20);
    l.max_image_height = Some(1 << 20);
    l
}

fn map_image_error(e: image::ImageError, opts: &PrepareOptions) -> PrepareError {
    use image::error::{ImageError, LimitErrorKind};
    match e {
        ImageError::Limits(l) => match l.kind() {
            LimitErrorKind::InsufficientMemory => PrepareError::MemoryLimit {
                max: opts.max_alloc_bytes,
            },
            _ => PrepareError::Corrupt(l.to_string()),
        },
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            PrepareError::Truncated
        }
        ImageError::Unsupported(u) => PrepareError::Unsupported(u.to_string()),
        other => {
            let msg = other.to_string();
            let lower = msg.to_ascii_lowercase();
            if lower.contains("eof")
                || lower.contains("end of file")
                || lower.contains("truncat")
                || lower.contains("no more bytes")
                || lower.contains("exhausted")
            {
                PrepareError::Truncated
            } else {
                PrepareError::Corrupt(msg)
            }
        }
    }
}

pub(crate) fn check_options(opts: &PrepareOptions) -> Result<(), PrepareError> {
    if opts.max_edge == 0 || opts.max_edge > 16_384 {
        return Err(PrepareError::Options(format!(
            "max_edge must be 1..=16384, got {}",
            opts.max_edge
        )));
    }
    if !(1..=100).contains(&opts.quality) {
        return Err(PrepareError::Options(format!(
            "quality must be 1..=100, got {}",
            opts.quality
        )));
    }
    Ok(())
}

pub(crate) fn check_size(bytes: &[u8], opts: &PrepareOptions) -> Result<(), PrepareError> {
    if bytes.is_empty() {
        return Err(PrepareError::Empty);
    }
    let len = bytes.len() as u64;
    if len > opts.max_input_bytes {
        return Err(PrepareError::TooLarge {
            bytes: len,
            max: opts.max_input_bytes,
        });
    }
    Ok(())
}

pub(crate) fn check_pixels(
    width: u32,
    height: u32,
    opts: &PrepareOptions,
) -> Result<(), PrepareError> {
    if width == 0 || height == 0 {
        return Err(PrepareError::ZeroDimensions);
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > opts.max_pixels {
        return Err(PrepareError::TooManyPixels {
            width,
            height,
            pixels,
            max: opts.max_pixels,
        });
    }
    Ok(())
}

fn swaps_axes(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Width and height straight from a PNG IHDR or GIF screen descriptor, so absurd sizes are
/// refused before any decoder computes buffer sizes (some overflow on 32-bit targets).
/// For a GIF this is the larger of the screen and the first frame's extent: the decoder
/// allocates a frame larger than its screen in full.
pub(crate) fn header_dimensions(bytes: &[u8], format: SourceFormat) -> Option<(u32, u32)> {
    match format {
        SourceFormat::Png if bytes.len() >= 24 && &bytes[12..16] == b"IHDR" => Some((
            u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]),
            u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]),
        )),
        SourceFormat::Gif if bytes.len() >= 10 => {
            let screen = (u16_le(bytes, 6)?, u16_le(bytes, 8)?);
            Some(match gif_first_frame_extent(bytes) {
                Some((fw, fh)) => (screen.0.max(fw), screen.1.max(fh)),
                None => screen,
            })
        }
        _ => None,
    }
}

fn u16_le(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u32::from(u16::from_le_bytes([b[0], b[1]])))
}

/// Right and bottom edge (left + width, top + height) of a GIF's first image descriptor,
/// walking the block structure without decoding anything. None when the file ends first.
pub(crate) fn gif_first_frame_extent(bytes: &[u8]) -> Option<(u32, u32)> {
    let packed = *bytes.get(10)?;
    let mut i = 13usize;
    if packed & 0x80 != 0 {
        // Global colour table: 3 · 2^(n+1) bytes.
        i = i.checked_add(3 << ((packed & 0x07) + 1))?;
    }
    loop {
        match *bytes.get(i)? {
            0x2C => {
                let left = u16_le(bytes, i + 1)?;
                let top = u16_le(bytes, i + 3)?;
                let width = u16_le(bytes, i + 5)?;
                let height = u16_le(bytes, i + 7)?;
                return Some((left + width, top + height));
            }
            0x21 => {
                // Extension: label, then data sub-blocks until a zero length.
                i = i.checked_add(2)?;
                loop {
                    let len = usize::from(*bytes.get(i)?);
                    i = i.checked_add(1 + len)?;
                    if len == 0 {
                        break;
                    }
                }
            }
            _ => return None,
        }
    }
}

/// Size, signature and pixel checks, then a decoder that has read the header.
/// Returns the format, the decoder, its stored size and the EXIF orientation.
fn open<'a>(
    bytes: &'a [u8],
    opts: &PrepareOptions,
) -> Result<(SourceFormat, impl ImageDecoder + 'a, u32, u32, Orientation), PrepareError> {
    check_size(bytes, opts)?;
    let format = sniff(bytes)?;
    if let Some((w, h)) = header_dimensions(bytes, format) {
        check_pixels(w, h, opts)?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format.image_format());
    reader.limits(limits(opts));
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| map_image_error(e, opts))?;
    let (w, h) = decoder.dimensions();
    check_pixels(w, h, opts)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    Ok((format, decoder, w, h, orientation))
}

/// Read format, upright size and orientation from the header; no pixel decoding.
pub fn probe(bytes: &[u8], opts: &PrepareOptions) -> Result<ImageInfo, PrepareError> {
    let (format, _decoder, w, h, orientation) = open(bytes, opts)?;
    let (width, height) = if swaps_axes(orientation) {
        (h, w)
    } else {
        (w, h)
    };
    Ok(ImageInfo {
        format,
        width,
        height,
        orientation: orientation.to_exif(),
    })
}

/// Output size that fits `max_edge` on the long side, never upscaling.
pub fn fit_within(width: u32, height: u32, max_edge: u32) -> (u32, u32) {
    let long = width.max(height);
    if long <= max_edge || long == 0 {
        return (width, height);
    }
    let scale = f64::from(max_edge) / f64::from(long);
    let w = ((f64::from(width) * scale).round() as u32).clamp(1, max_edge);
    let h = ((f64::from(height) * scale).round() as u32).clamp(1, max_edge);
    (w, h)
}

/// Bytes the decode and colour conversion of an image may hold at once, from its header:
/// the decoder's own limits do not cover every format's buffers, so they are budgeted here.
fn decode_budget(
    decoder: &impl ImageDecoder,
    stored_w: u32,
    stored_h: u32,
    jpeg: Option<&Option<JpegHeader>>,
) -> u64 {
    let decoded_bytes = decoder.total_bytes();
    let pixels = u64::from(stored_w) * u64::from(stored_h);
    let convert_bytes = if decoder.color_type() == image::ColorType::Rgb8 {
        0
    } else {
        // RGB out, and an RGBA8 copy on the way for layouts with alpha.
        pixels
            * if decoder.color_type().has_alpha() {
                7
            } else {
                3
            }
    };
    // A progressive JPEG keeps every DCT coefficient (2 bytes per sample, up to 3 full-size
    // components) until its last scan, whatever scale it is decoded at.
    let progressive = jpeg.is_some_and(|h| h.as_ref().is_some_and(JpegHeader::is_progressive));
    let coefficient_bytes = if progressive { pixels * 3 * 2 } else { 0 };
    // A CMYK JPEG decodes to 4 bytes a pixel before it becomes RGB.
    let cmyk = jpeg.is_some_and(|h| h.as_ref().is_some_and(|h| h.components == Some(4)));
    let cmyk_bytes = if cmyk { pixels } else { 0 };
    decoded_bytes
        .saturating_add(convert_bytes)
        .saturating_add(coefficient_bytes)
        .saturating_add(cmyk_bytes)
}

/// Peak memory [`prepare`] may need for these bytes, read from the header alone: the input,
/// the decode budget, and the resized and encoded output. Callers that run several prepares at
/// once weigh each by this against a shared memory budget. Errors are the ones `prepare` would
/// return for the header (limits, unknown format, corrupt header).
pub fn memory_estimate(bytes: &[u8], opts: &PrepareOptions) -> Result<u64, PrepareError> {
    check_options(opts)?;
    let (format, decoder, stored_w, stored_h, _) = open(bytes, opts)?;
    let jpeg = (format == SourceFormat::Jpeg).then(|| jpeg_header(bytes));
    let budget = decode_budget(&decoder, stored_w, stored_h, jpeg.as_ref());
    let (out_w, out_h) = fit_within(stored_w, stored_h, opts.max_edge);
    // The resized RGB, its upright copy and the JPEG being written.
    let output = u64::from(out_w) * u64::from(out_h) * 3 * 3;
    Ok((bytes.len() as u64)
        .saturating_add(budget.min(opts.max_alloc_bytes))
        .saturating_add(output))
}

/// Decode, orient, convert, resize and encode one image.
pub fn prepare(bytes: &[u8], opts: &PrepareOptions) -> Result<PreparedImage, PrepareError> {
    let decoded = decode_fit(bytes, opts)?;
    let upright = decoded.rgb;
    let jpeg = encode_jpeg(&upright, opts.quality)?;
    let sha256 = hex::encode(Sha256::digest(&jpeg));
    Ok(PreparedImage {
        format: decoded.format,
        orientation: decoded.orientation,
        original_width: decoded.original_width,
        original_height: decoded.original_height,
        original_bytes: bytes.len() as u64,
        width: upright.width(),
        height: upright.height(),
        bytes: jpeg.len() as u64,
        sha256,
        jpeg,
        color: decoded.color,
    })
}

/// An image decoded by [`decode_fit`]: upright sRGB pixels and the facts about the original.
pub(crate) struct Decoded {
    /// Upright, sRGB, fitted within `max_edge`.
    pub(crate) rgb: RgbImage,
    pub(crate) format: SourceFormat,
    /// EXIF orientation of the original, 1–8.
    pub(crate) orientation: u8,
    /// Upright size of the original.
    pub(crate) original_width: u32,
    pub(crate) original_height: u32,
    pub(crate) color: ColorHandling,
}

/// Everything [`prepare`] does except the JPEG encode, under the same limits: other
/// consumers of pixels (the visual embedding) decode through here so that one bounded decode
/// path exists.
pub(crate) fn decode_fit(bytes: &[u8], opts: &PrepareOptions) -> Result<Decoded, PrepareError> {
    check_options(opts)?;
    let (format, mut decoder, stored_w, stored_h, orientation) = open(bytes, opts)?;
    // JPEG marker segments, walked once: None inside when the structure breaks before a scan.
    let jpeg = (format == SourceFormat::Jpeg).then(|| jpeg_header(bytes));
    if decode_budget(&decoder, stored_w, stored_h, jpeg.as_ref()) > opts.max_alloc_bytes {
        return Err(PrepareError::MemoryLimit {
            max: opts.max_alloc_bytes,
        });
    }
    // Some JPEG decoders fill a cut-off scan with grey instead of failing; refuse it here.
    if let Some(header) = &jpeg {
        if !header.as_ref().is_some_and(|h| h.has_eoi(bytes)) {
            return Err(PrepareError::Truncated);
        }
    }
    let (up_w, up_h) = if swaps_axes(orientation) {
        (stored_h, stored_w)
    } else {
        (stored_w, stored_h)
    };
    // Resize in stored orientation (fewer pixels to rotate afterwards).
    let (out_w, out_h) = fit_within(up_w, up_h, opts.max_edge);
    let (target_w, target_h) = if swaps_axes(orientation) {
        (out_h, out_w)
    } else {
        (out_w, out_h)
    };
    let color = decoder.color_type();
    let plan = colour_plan(bytes, jpeg.as_ref(), &mut decoder);
    let rgb = if format == SourceFormat::Jpeg
        && matches!(color, image::ColorType::Rgb8 | image::ColorType::L8)
    {
        // Baseline/progressive RGB or grey JPEG: decode at a reduced DCT scale (1/2, 1/4, 1/8)
        // that still covers the target, which skips most of the decode work for large photos.
        // On native targets libjpeg-turbo (SIMD) does it when the file is a plain 8-bit
        // one- or three-component JPEG; otherwise, or when it meets anything it warns about,
        // jpeg-decoder (pure Rust, the only decoder on wasm32). A CMYK JPEG with a usable
        // profile comes this way too, through jpeg-decoder, converted right after decoding.
        drop(decoder);
        let cmyk = match &plan {
            Plan::Cmyk(t) => Some(t),
            _ => None,
        };
        let fast = match (&jpeg, cmyk) {
            (Some(Some(header)), None) if header.suits_native_decode() => {
                native_decode(bytes, target_w, target_h, opts.max_alloc_bytes)
            }
            _ => None,
        };
        let scaled = match fast {
            Some(rgb) => Some(rgb),
            // Everything else, and anything the native decoder refused or warned about: the
            // pure-Rust decoder, with the errors and output it always had.
            None => decode_jpeg_scaled(bytes, target_w, target_h, opts.max_alloc_bytes, cmyk)?,
        };
        match scaled {
            Some(rgb) => rgb,
            // CMYK/YCCK or 12-bit: the general decoder converts those.
            None => {
                let mut reader =
                    ImageReader::with_format(Cursor::new(bytes), format.image_format());
                reader.limits(limits(opts));
                to_srgb8(reader.decode().map_err(|e| map_image_error(e, opts))?)
            }
        }
    } else {
        // GIF and WebP animations: the decoder yields the first frame.
        let decoded = DynamicImage::from_decoder(decoder).map_err(|e| map_image_error(e, opts))?;
        to_srgb8(decoded)
    };
    let mut resized = resize_rgb(rgb, target_w, target_h)?;
    // RGB profiles convert after the resize, in place: a fraction of the pixels (1/4 to 1/16
    // of a phone photo's decode) for an error far below JPEG's; see the `color` tests.
    if let Plan::Rgb(t) = &plan {
        color::apply_rgb(t, &mut resized);
    }
    let mut upright = DynamicImage::ImageRgb8(resized);
    upright.apply_orientation(orientation);
    Ok(Decoded {
        rgb: upright.into_rgb8(),
        format,
        orientation: orientation.to_exif(),
        original_width: up_w,
        original_height: up_h,
        color: plan.handling(),
    })
}

/// How the pixels' colours get to sRGB, from the embedded ICC profile. Never fails: an
/// unusable profile is ignored (and reported), not an error for the image.
fn colour_plan(
    bytes: &[u8],
    jpeg: Option<&Option<JpegHeader>>,
    decoder: &mut impl ImageDecoder,
) -> Plan {
    let icc = match jpeg {
        // Read from our own marker walk: chunked, size-checked before allocating.
        Some(header) => match header
            .as_ref()
            .map(|h| color::assemble_jpeg_icc(bytes, &h.icc))
        {
            None | Some(JpegIcc::None) => None,
            Some(JpegIcc::Invalid) => return Plan::Ignored,
            Some(JpegIcc::Profile(p)) => Some(p),
        },
        None => match decoder.icc_profile() {
            Ok(p) => p,
            Err(_) => return Plan::Ignored,
        },
    };
    let cmyk = jpeg.is_some_and(|h| h.as_ref().is_some_and(|h| h.components == Some(4)));
    if cmyk {
        color::plan_cmyk(icc.as_deref())
    } else {
        color::plan_rgb(icc.as_deref())
    }
}

struct JpegHeader {
    /// The SOFn marker of the frame, if one came before the first scan.
    sof: Option<u8>,
    /// Sample precision of the frame, in bits (8 or 12 in practice).
    precision: Option<u8>,
    /// Number of components in the frame (3 for YCbCr/RGB, 4 for CMYK/YCCK).
    components: Option<u8>,
    /// APP2 `ICC_PROFILE` chunks before the first scan.
    icc: Vec<IccChunk>,
    /// Offset of the first scan's entropy-coded data.
    scan_start: usize,
}

impl JpegHeader {
    /// True when the frame header is SOF2 (progressive, Huffman).
    fn is_progressive(&self) -> bool {
        self.sof == Some(0xC2)
    }

    /// True for what the native decoder takes: one frame, 8-bit, Huffman-coded baseline,
    /// extended sequential or progressive (SOF0/1/2), grey or three-component colour.
    fn suits_native_decode(&self) -> bool {
        matches!(self.sof, Some(0xC0..=0xC2))
            && self.precision == Some(8)
            && matches!(self.components, Some(1 | 3))
    }

    /// True when the scan data is followed by an EOI marker: inside entropy-coded data every
    /// FF byte is stuffed (FF 00) or a restart marker, so FF D9 there is the real end.
    fn has_eoi(&self, bytes: &[u8]) -> bool {
        let scan = self.scan_start.min(bytes.len());
        // From the end: a whole file has it in its last bytes (or before trailing padding),
        // so this stops at once instead of reading megabytes of scan data.
        bytes[scan..].windows(2).rev().any(|w| w == [0xFF, 0xD9])
    }
}

/// Walk the marker segments from SOI to the first SOS. None when the structure breaks first.
fn jpeg_header(bytes: &[u8]) -> Option<JpegHeader> {
    let mut i = 2; // after SOI
    let mut sof = None;
    let mut precision = None;
    let mut components = None;
    let mut icc = Vec::new();
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return None;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        let len = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        // SOF0–SOF15, except DHT (C4), JPG (C8) and DAC (CC).
        if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            // Only the first frame header counts: a second SOF is the pure-Rust path's business.
            if sof.is_none() {
                precision = bytes.get(i + 4).copied();
                // Length (2), precision (1), height (2), width (2), then the component count.
                components = bytes.get(i + 9).copied();
            } else {
                // Two frame headers in one image: not a plain JPEG.
                precision = None;
            }
            sof = sof.or(Some(marker));
        }
        // APP2 "ICC_PROFILE\0", sequence number, chunk count, then the chunk's data.
        const ICC_TAG: &[u8] = b"ICC_PROFILE\0";
        let body_start = i + 4;
        let body_end = i.saturating_add(2).saturating_add(len).min(bytes.len());
        if marker == 0xE2 && bytes.get(body_start..body_start + 12) == Some(ICC_TAG) {
            if let (Some(&seq), Some(&count)) =
                (bytes.get(body_start + 12), bytes.get(body_start + 13))
            {
                // At most 255 chunks exist; more markers than that is not a profile.
                if icc.len() < 256 && body_start + 14 <= body_end {
                    icc.push(IccChunk {
                        seq,
                        count,
                        start: body_start + 14,
                        end: body_end,
                    });
                }
            }
        }
        if marker == 0xDA {
            return Some(JpegHeader {
                sof,
                precision,
                components,
                icc,
                scan_start: i.saturating_add(2).saturating_add(len),
            });
        }
        i = i.saturating_add(2).saturating_add(len);
    }
    None
}

/// Decode a JPEG with DCT scaling to the smallest size ≥ (target_w, target_h), as RGB.
/// A CMYK JPEG is converted through `cmyk` (its ICC profile's transform) when given.
/// None when the JPEG is not 8-bit RGB or grey, or CMYK without a transform.
fn decode_jpeg_scaled(
    bytes: &[u8],
    target_w: u32,
    target_h: u32,
    max_alloc: u64,
    cmyk: Option<&qcms::Transform>,
) -> Result<Option<RgbImage>, PrepareError> {
    let mut dec = jpeg_decoder::Decoder::new(Cursor::new(bytes));
    dec.read_info().map_err(map_jpeg_error)?;
    match dec.info().map(|i| i.pixel_format) {
        Some(jpeg_decoder::PixelFormat::RGB24 | jpeg_decoder::PixelFormat::L8) => {}
        Some(jpeg_decoder::PixelFormat::CMYK32) if cmyk.is_some() => {}
        _ => return Ok(None),
    }
    dec.set_max_decoding_buffer_size(usize::try_from(max_alloc).unwrap_or(usize::MAX));
    // Full size, read before any scaling (info() reports the scaled size afterwards).
    let full = dec
        .info()
        .ok_or_else(|| PrepareError::Corrupt("JPEG has no frame header".into()))?;
    let req_w = u16::try_from(target_w).unwrap_or(u16::MAX);
    let req_h = u16::try_from(target_h).unwrap_or(u16::MAX);
    // The decoder takes a scale when *either* side reaches the request; both must, or the
    // resize would upscale. So ask for the smallest scaled size where both do.
    let (sw, sh) = [8u32, 4, 2]
        .into_iter()
        .map(|d| (div_ceil(full.width, d), div_ceil(full.height, d)))
        .find(|&(sw, sh)| sw >= req_w && sh >= req_h)
        .unwrap_or((full.width, full.height));
    let (mut w, mut h) = dec.scale(sw, sh).map_err(map_jpeg_error)?;
    if w < req_w || h < req_h {
        // Tiny sides can round so that a smaller scale also "reaches": full size always fits.
        (w, h) = dec.scale(full.width, full.height).map_err(map_jpeg_error)?;
    }
    let pixels = dec.decode().map_err(map_jpeg_error)?;
    let info = dec
        .info()
        .ok_or_else(|| PrepareError::Corrupt("JPEG has no frame header".into()))?;
    let (w, h) = (u32::from(w), u32::from(h));
    let n = w as usize * h as usize;
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 if pixels.len() == n * 3 => pixels,
        jpeg_decoder::PixelFormat::L8 if pixels.len() == n => {
            pixels.iter().flat_map(|&l| [l, l, l]).collect()
        }
        // jpeg-decoder undoes Adobe's inverted storage (APP14; Photoshop writes every CMYK
        // JPEG that way, and the image crate's decoder assumes it too): these are ink amounts,
        // 0 = no ink, which is what an ICC CMYK profile expects.
        jpeg_decoder::PixelFormat::CMYK32 if pixels.len() == n * 4 => match cmyk {
            Some(t) => color::cmyk_to_rgb_in_place(t, pixels),
            None => return Ok(None),
        },
        other => {
            return Err(PrepareError::Corrupt(format!(
                "unexpected JPEG pixel data ({other:?}, {} bytes for {w}×{h})",
                pixels.len()
            )))
        }
    };
    RgbImage::from_raw(w, h, rgb)
        .map(Some)
        .ok_or_else(|| PrepareError::Corrupt("short JPEG pixel buffer".into()))
}

/// The libjpeg-turbo decode at a DCT scale covering the target; `None` sends the file to the
/// pure-Rust path (always on wasm32, where no C is built).
#[cfg(not(target_arch = "wasm32"))]
fn native_decode(bytes: &[u8], target_w: u32, target_h: u32, max_alloc: u64) -> Option<RgbImage> {
    crate::native_jpeg::decode_scaled(bytes, target_w, target_h, max_alloc)
}

#[cfg(target_arch = "wasm32")]
fn native_decode(
    _bytes: &[u8],
    _target_w: u32,
    _target_h: u32,
    _max_alloc: u64,
) -> Option<RgbImage> {
    None
}

fn div_ceil(n: u16, d: u32) -> u16 {
    // n ≤ u16::MAX and d ≥ 1, so the result fits.
    u16::try_from(u32::from(n).div_ceil(d)).unwrap_or(u16::MAX)
}

fn map_jpeg_error(e: jpeg_decoder::Error) -> PrepareError {
    match e {
        jpeg_decoder::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            PrepareError::Truncated
        }
        jpeg_decoder::Error::Unsupported(u) => {
            PrepareError::Unsupported(format!("JPEG feature {u:?}"))
        }
        other => {
            let msg = other.to_string();
            if msg.to_ascii_lowercase().contains("eof") {
                PrepareError::Truncated
            } else {
                PrepareError::Corrupt(msg)
            }
        }
    }
}

/// Any decoded layout (palette, grey, 16-bit, alpha, CMYK already converted by the decoder)
/// → 8-bit RGB, alpha flattened on white.
fn to_srgb8(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for px in rgba.pixels() {
        let [r, g, b, a] = px.0;
        let a = u32::from(a);
        for c in [r, g, b] {
            // c·a + 255·(1−a), rounded.
            out.push(((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    // Length is exactly w·h·3 by construction.
    RgbImage::from_raw(w, h, out).unwrap_or_else(|| RgbImage::new(w, h))
}

fn resize_rgb(src: RgbImage, w: u32, h: u32) -> Result<RgbImage, PrepareError> {
    if src.dimensions() == (w, h) {
        return Ok(src);
    }
    let (sw, sh) = src.dimensions();
    // The typed API keeps only the RGB8 kernels in the binary (much smaller WASM).
    let src_img =
        fir::images::TypedImageRef::<fir::pixels::U8x3>::from_buffer(sw, sh, src.as_raw())
            .map_err(|e| PrepareError::Corrupt(format!("resize source: {e}")))?;
    let mut out = vec![0u8; w as usize * h as usize * 3];
    {
        let mut dst = fir::images::TypedImage::<fir::pixels::U8x3>::from_buffer(w, h, &mut out)
            .map_err(|e| PrepareError::Corrupt(format!("resize target: {e}")))?;
        let options = fir::ResizeOptions::new()
            .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Lanczos3));
        fir::Resizer::new()
            .resize_typed(&src_img, &mut dst, &options)
            .map_err(|e| PrepareError::Corrupt(format!("resize: {e}")))?;
    }
    RgbImage::from_raw(w, h, out)
        .ok_or_else(|| PrepareError::Corrupt("resize produced a short buffer".into()))
}

/// The output JPEG: libjpeg-turbo on native targets, the `image` crate's encoder on wasm32.
#[cfg(not(target_arch = "wasm32"))]
fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, PrepareError> {
    crate::native_jpeg::encode(img, quality)
}

#[cfg(target_arch = "wasm32")]
fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, PrepareError> {
    let mut out = Vec::with_capacity(img.as_raw().len() / 8);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| PrepareError::Encode(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::ImageEncoder;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 241) as u8, 90])
        });
        encode_jpeg(&img, 80).unwrap()
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = RgbImage::new(w, h);
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    #[test]
    fn memory_estimate_grows_with_pixels_not_file_size() {
        let opts = PrepareOptions::default();
        let small = memory_estimate(&jpeg(64, 64), &opts).unwrap();
        // A flat 4000×4000 PNG is a few hundred KB on disk and 48 MB decoded.
        let bomb = png(4000, 4000);
        assert!(bomb.len() < 1_000_000, "{}", bomb.len());
        let big = memory_estimate(&bomb, &opts).unwrap();
        assert!(big >= 4000 * 4000 * 3, "{big}");
        assert!(small < 1_000_000, "{small}");
        // The same refusals as prepare, from the header alone.
        assert_eq!(memory_estimate(&[], &opts), Err(PrepareError::Empty));
        let tight = PrepareOptions {
            max_pixels: 1000,
            ..opts
        };
        assert!(matches!(
            memory_estimate(&bomb, &tight),
            Err(PrepareError::TooManyPixels { .. })
        ));
    }

    #[test]
    fn scaled_jpeg_decode_never_goes_below_the_target() {
        // Half of 2046 is 1023 < 1024: the decoder alone would pick ½ (height reaches 500).
        for (w, h, tw, th) in [
            (2046, 1000, 1024, 500),
            (3000, 130, 1024, 44),
            (4032, 3024, 1024, 768),
        ] {
            let rgb = decode_jpeg_scaled(&jpeg(w, h), tw, th, u64::MAX, None)
                .unwrap()
                .unwrap();
            assert!(
                rgb.width() >= tw && rgb.height() >= th,
                "{w}x{h} → {:?}",
                rgb.dimensions()
            );
        }
        // Still scaled where it can be: 4032×3024 → 1024×768 decodes at ¼ (1008×756 is too small).
        let rgb = decode_jpeg_scaled(&jpeg(4032, 3024), 1024, 768, u64::MAX, None)
            .unwrap()
            .unwrap();
        assert_eq!(rgb.dimensions(), (2016, 1512));
    }

    #[test]
    fn gif_block_walk_is_bounded() {
        assert_eq!(gif_first_frame_extent(b"GIF89a"), None);
        // Global table claimed but cut off.
        assert_eq!(
            gif_first_frame_extent(b"GIF89a\x01\x00\x01\x00\x87\x00\x00"),
            None
        );
        // An extension whose sub-block runs off the end.
        assert_eq!(
            gif_first_frame_extent(b"GIF89a\x01\x00\x01\x00\x00\x00\x00\x21\xF9\xFF"),
            None
        );
    }

    fn fixture(rel: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures")
                .join(rel),
        )
        .unwrap()
    }

    fn embedded(jpeg: &[u8]) -> Vec<u8> {
        let header = jpeg_header(jpeg).unwrap();
        match color::assemble_jpeg_icc(jpeg, &header.icc) {
            JpegIcc::Profile(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn srgb_profiles_are_recognised_without_building_a_transform() {
        // HP's "sRGB IEC61966-2.1" (1024-point curves) as a sample photo embeds it, and the
        // tests' own (parametric curves).
        assert!(color::looks_like_srgb(&embedded(&fixture(
            "samples/hubble_deep_field.jpg"
        ))));
        assert!(color::looks_like_srgb(&fixture("../fixtures-icc/srgb.icc")));
        // Adobe RGB (1998) in rocket.jpg, and Display P3: not sRGB.
        assert!(!color::looks_like_srgb(&embedded(&fixture(
            "samples/rocket.jpg"
        ))));
        assert!(!color::looks_like_srgb(&fixture(
            "../fixtures-icc/display-p3.icc"
        )));
    }

    #[test]
    fn icc_chunks_are_found_in_the_marker_walk() {
        let adobe = fixture("../fixtures-icc/adobergb_chelsea.jpg");
        let header = jpeg_header(&adobe).unwrap();
        assert_eq!(header.icc.len(), 2);
        assert_eq!(header.components, Some(3));
        assert_eq!(
            embedded(&adobe),
            fixture("../fixtures-icc/adobe-rgb-compatible.icc")
        );
        let cmyk = fixture("../fixtures-icc/cmyk_astronaut.jpg");
        assert_eq!(jpeg_header(&cmyk).unwrap().components, Some(4));
    }

    #[test]
    fn progressive_is_told_from_the_frame_marker() {
        let bytes = jpeg(16, 16);
        let header = jpeg_header(&bytes).unwrap();
        assert!(!header.is_progressive() && header.has_eoi(&bytes));
        let progressive = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/large/elephants_progressive.jpg"),
        )
        .unwrap();
        assert!(jpeg_header(&progressive).unwrap().is_progressive());
    }
}
