//! The native JPEG fast path: libjpeg-turbo 3 (SIMD), through its TurboJPEG API in
//! `turbojpeg-sys`, for the decode with DCT-domain scaling and for the output encode. Only on
//! native targets: the wasm32 build keeps the pure-Rust decoder and encoder and compiles no C.
//!
//! The decode is a fast path, not a second decoder with its own rules. [`crate::prepare`]
//! calls it only after every limit has been checked from the header (size, pixels, memory
//! budget, EOI present), and only for plain 8-bit Huffman JPEGs (baseline, extended or
//! progressive) with one or three components. Anything libjpeg-turbo rejects *or warns about*
//! (it is told to stop at the first warning: corrupt data, extraneous bytes, a premature end)
//! comes back as `None`, and the caller decodes the file with the pure-Rust decoder exactly as
//! before, so hostile and damaged files keep the errors and output they had. Errors never
//! cross the FFI boundary as a panic or an abort: TurboJPEG catches libjpeg's error exits with
//! setjmp/longjmp inside C and returns -1, which is all this module looks at.

use std::ffi::{c_int, CStr};

use image::RgbImage;
use turbojpeg_sys as tj;

use crate::prepare::PrepareError;

/// Most progressive scans the fast path decodes before handing the file to the pure-Rust
/// decoder (libjpeg-turbo's guard against scan-count time bombs; real encoders write ≤ 20).
const SCAN_LIMIT: c_int = 500;

/// Quality from which the encoder keeps full-resolution chroma (4:4:4), as ImageMagick does:
/// a caller asking for near-lossless output gets no chroma blur at colour edges. Below it
/// 4:2:0, libjpeg's and sharp's default.
const FULL_CHROMA_FROM_QUALITY: u8 = 90;

/// A TurboJPEG instance, destroyed on drop.
struct Handle(tj::tjhandle);

impl Handle {
    fn new(kind: tj::TJINIT) -> Option<Self> {
        // SAFETY: tj3Init takes a plain enum value and returns an owned instance or null.
        let h = unsafe { tj::tj3Init(kind as c_int) };
        (!h.is_null()).then_some(Handle(h))
    }

    /// Set a parameter; false when TurboJPEG refuses it.
    fn set(&mut self, param: tj::TJPARAM, value: c_int) -> bool {
        // SAFETY: self.0 is a live instance; tj3Set validates `param` and `value`.
        unsafe { tj::tj3Set(self.0, param as c_int, value) == 0 }
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: self.0 is a live instance; unknown parameters return -1.
        unsafe { tj::tj3Get(self.0, param as c_int) }
    }

    /// The instance's last error message.
    fn error(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the instance (or a
        // static one), valid until the next call on it; it is copied out at once.
        let msg = unsafe { tj::tj3GetErrorStr(self.0) };
        if msg.is_null() {
            return "unknown libjpeg-turbo error".into();
        }
        // SAFETY: non-null, NUL-terminated (see above).
        unsafe { CStr::from_ptr(msg) }
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: self.0 came from tj3Init and is destroyed exactly once.
        unsafe { tj::tj3Destroy(self.0) };
    }
}

/// Smallest DCT scale M/8 among 1/8, 1/4, 1/2 and 1 whose output covers the target on both
/// sides; sides scale as TurboJPEG scales them (rounded up). Returns (M, scaled width, scaled
/// height).
///
/// libjpeg-turbo offers every M/8, but only these four have SIMD inverse DCTs (x86-64 and
/// Arm NEON alike); the others run plain C kernels, for the chroma planes at twice the luma
/// size. Measured on the 12 MP phone photo (one core, x86-64, medians of 21): decoding at ½
/// (2016×1512) and resizing from there took 40.3 ms per prepare, at 3/8 (1512×1134) 45.4 ms,
/// although the resize had half the pixels. These are also the scales of the pure-Rust path,
/// so both decoders hand the resize the same size.
pub(crate) fn scale_for(width: u32, height: u32, target_w: u32, target_h: u32) -> (u32, u32, u32) {
    let scaled = |side: u32, m: u32| (u64::from(side) * u64::from(m)).div_ceil(8) as u32;
    [1, 2, 4, 8]
        .into_iter()
        .map(|m| (m, scaled(width, m), scaled(height, m)))
        .find(|&(_, w, h)| w >= target_w && h >= target_h)
        .unwrap_or((8, width, height))
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Decode `bytes` as RGB at the smallest DCT scale that still covers (target_w, target_h).
/// `None` when libjpeg-turbo reports any error or warning (it stops at the first warning), or
/// the frame is not a plain 8-bit grey/YCbCr/RGB Huffman JPEG: the caller then takes the
/// pure-Rust path. `max_memory` caps libjpeg-turbo's intermediate buffers (progressive
/// coefficients), in bytes.
pub(crate) fn decode_scaled(
    bytes: &[u8],
    target_w: u32,
    target_h: u32,
    max_memory: u64,
) -> Option<RgbImage> {
    let mut h = Handle::new(tj::TJINIT_TJINIT_DECOMPRESS)?;
    let max_mb = c_int::try_from(max_memory.div_ceil(1 << 20)).unwrap_or(c_int::MAX);
    let configured = h.set(tj::TJPARAM_TJPARAM_STOPONWARNING, 1)
        && h.set(tj::TJPARAM_TJPARAM_SCANLIMIT, SCAN_LIMIT)
        && h.set(tj::TJPARAM_TJPARAM_MAXMEMORY, max_mb.max(1))
        // The ICC profile is read by our own marker walk; libjpeg-turbo would copy it (and
        // warn about a damaged one).
        && h.set(tj::TJPARAM_TJPARAM_SAVEMARKERS, 0);
    if !configured {
        return None;
    }
    let len = tj::size_t::try_from(bytes.len()).ok()?;
    // SAFETY: the pointer and length describe `bytes`, which outlives the call; TurboJPEG
    // only reads it.
    if unsafe { tj::tj3DecompressHeader(h.0, bytes.as_ptr(), len) } != 0 {
        return None;
    }
    let plain_colour = matches!(
        h.get(tj::TJPARAM_TJPARAM_COLORSPACE) as tj::TJCS,
        tj::TJCS_TJCS_YCbCr | tj::TJCS_TJCS_GRAY | tj::TJCS_TJCS_RGB
    );
    if !plain_colour
        || h.get(tj::TJPARAM_TJPARAM_PRECISION) != 8
        || h.get(tj::TJPARAM_TJPARAM_LOSSLESS) != 0
        || h.get(tj::TJPARAM_TJPARAM_ARITHMETIC) != 0
    {
        return None;
    }
    let width = u32::try_from(h.get(tj::TJPARAM_TJPARAM_JPEGWIDTH)).ok()?;
    let height = u32::try_from(h.get(tj::TJPARAM_TJPARAM_JPEGHEIGHT)).ok()?;
    if width == 0 || height == 0 {
        return None;
    }
    let (m, w, hgt) = scale_for(width, height, target_w, target_h);
    // TurboJPEG lists its factors in lowest terms (1/2, not 4/8) and accepts only those.
    let g = gcd(m, 8);
    let factor = tj::tjscalingfactor {
        num: (m / g) as c_int,
        denom: (8 / g) as c_int,
    };
    // SAFETY: live instance; the factor is one of TurboJPEG's (M/8, checked by the call).
    if unsafe { tj::tj3SetScalingFactor(h.0, factor) } != 0 {
        return None;
    }
    let pitch = usize::try_from(w).ok()?.checked_mul(3)?;
    let mut pixels = vec![0u8; pitch.checked_mul(usize::try_from(hgt).ok()?)?];
    // SAFETY: `pixels` holds exactly pitch × scaled height bytes, which is what TurboJPEG
    // writes for this scaling factor with TJPF_RGB (scaled sides rounded up, as computed);
    // `bytes` is only read.
    let rc = unsafe {
        tj::tj3Decompress8(
            h.0,
            bytes.as_ptr(),
            len,
            pixels.as_mut_ptr(),
            c_int::try_from(pitch).ok()?,
            tj::TJPF_TJPF_RGB,
        )
    };
    if rc != 0 {
        return None;
    }
    RgbImage::from_raw(w, hgt, pixels)
}

/// Baseline JPEG at `quality`: 4:2:0 chroma below [`FULL_CHROMA_FROM_QUALITY`], 4:4:4 from
/// it; no metadata but the JFIF header, standard Huffman tables, accurate integer DCT.
pub(crate) fn encode(img: &RgbImage, quality: u8) -> Result<Vec<u8>, PrepareError> {
    let mut h = Handle::new(tj::TJINIT_TJINIT_COMPRESS)
        .ok_or_else(|| PrepareError::Encode("libjpeg-turbo: no compressor".into()))?;
    let subsamp = if quality >= FULL_CHROMA_FROM_QUALITY {
        tj::TJSAMP_TJSAMP_444
    } else {
        tj::TJSAMP_TJSAMP_420
    };
    if !(h.set(tj::TJPARAM_TJPARAM_QUALITY, c_int::from(quality))
        && h.set(tj::TJPARAM_TJPARAM_SUBSAMP, subsamp))
    {
        return Err(PrepareError::Encode(h.error()));
    }
    let too_big = || PrepareError::Encode("image too large for libjpeg-turbo".into());
    let width = c_int::try_from(img.width()).map_err(|_| too_big())?;
    let height = c_int::try_from(img.height()).map_err(|_| too_big())?;
    let pitch = width.checked_mul(3).ok_or_else(too_big)?;
    let mut out: *mut u8 = std::ptr::null_mut();
    let mut out_len: tj::size_t = 0;
    // SAFETY: `img` holds width × height RGB pixels, rows `pitch` bytes apart, read only.
    // With a null output pointer TurboJPEG allocates the JPEG buffer itself (tj3Alloc) and
    // reports it through `out`/`out_len`; it is freed below with tj3Free.
    let rc = unsafe {
        tj::tj3Compress8(
            h.0,
            img.as_raw().as_ptr(),
            width,
            pitch,
            height,
            tj::TJPF_TJPF_RGB,
            &mut out,
            &mut out_len,
        )
    };
    let result = if rc != 0 || out.is_null() {
        Err(PrepareError::Encode(h.error()))
    } else {
        usize::try_from(out_len)
            .map_err(|_| too_big())
            // SAFETY: on success `out` points at `out_len` initialised bytes owned by us.
            .map(|n| unsafe { std::slice::from_raw_parts(out, n) }.to_vec())
    };
    if !out.is_null() {
        // SAFETY: allocated by TurboJPEG for this call, freed once.
        unsafe { tj::tj3Free(out.cast()) };
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_is_the_smallest_simd_scale_that_covers_the_target() {
        // The phone photo stored landscape, fitted to 1024×768: ¼ (1008×756) falls short.
        assert_eq!(scale_for(4032, 3024, 1024, 768), (4, 2016, 1512));
        assert_eq!(scale_for(8192, 6144, 1100, 825), (2, 2048, 1536));
        assert_eq!(scale_for(8192, 6144, 1000, 750), (1, 1024, 768));
        // Half of 2046 is 1023: ½ does not cover 1024, so full size.
        assert_eq!(scale_for(2046, 1000, 1024, 500), (8, 2046, 1000));
        // Small enough already: full size.
        assert_eq!(scale_for(800, 600, 800, 600), (8, 800, 600));
        // A sliver: the short side decides (¼ would give 33 rows).
        assert_eq!(scale_for(3000, 130, 1024, 44), (4, 1500, 65));
    }

    #[test]
    fn warnings_and_errors_send_the_file_back_to_the_pure_rust_path() {
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]));
        let good = encode(&img, 85).unwrap();
        let back = decode_scaled(&good, 64, 48, u64::MAX).unwrap();
        assert_eq!(back.dimensions(), (64, 48));
        // Cut in the middle of the scan: libjpeg-turbo would pad with grey and warn.
        assert!(decode_scaled(&good[..good.len() / 2], 64, 48, u64::MAX).is_none());
        // Entropy data overwritten: garbage (extraneous bytes, bad codes), or a stray marker.
        let sos = good.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let mut garbage = good.clone();
        garbage[sos + 20..sos + 60].fill(0x5A);
        assert!(decode_scaled(&garbage, 64, 48, u64::MAX).is_none());
        let mut marker = good.clone();
        marker[sos + 30..sos + 32].copy_from_slice(&[0xFF, 0xD0]);
        assert!(decode_scaled(&marker, 64, 48, u64::MAX).is_none());
        assert!(decode_scaled(b"\xFF\xD8\xFF\xE0 not a jpeg", 8, 8, u64::MAX).is_none());
    }
}
