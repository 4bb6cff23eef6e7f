//! Embedded ICC profiles → sRGB, with qcms (Firefox's colour management, pure Rust, builds
//! for wasm32).
//!
//! Pixels of a wide-gamut photo (Display P3, Adobe RGB) or a profiled CMYK JPEG only look
//! right when converted through their profile; the prepared JPEG carries no profile, so a
//! model (and every viewer) reads it as sRGB. Rules:
//! - no profile, or a profile that is sRGB (a cheap header check, then a probe of the built
//!   transform), → the pixels are left exactly as they are;
//! - a profile that cannot be used (corrupt, too large, a kind qcms cannot convert, or one
//!   whose transform does not map white to light and black to dark) → ignored, pixels treated
//!   as sRGB, and [`ColorHandling::ProfileIgnored`] says so. Never an error, never a panic.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// Largest embedded profile looked at (real ones are a few hundred bytes to a few hundred KB;
/// qcms itself refuses 4 MB and more).
pub const MAX_PROFILE_BYTES: usize = 4 * 1024 * 1024;

/// What [`crate::prepare::prepare`] did about colour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColorHandling {
    /// No embedded profile, or an sRGB one: pixels used as they are.
    #[default]
    Srgb,
    /// Converted from the embedded ICC profile (RGB or CMYK) to sRGB.
    Converted,
    /// A profile was embedded but could not be used; pixels were treated as sRGB.
    ProfileIgnored,
}

/// The colour space an ICC header declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProfileSpace {
    Rgb,
    Cmyk,
    Gray,
    Other,
}

/// The header facts needed before handing a profile to qcms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProfileHeader {
    pub space: ProfileSpace,
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be_s15f16(b: &[u8], at: usize) -> Option<f64> {
    be_u32(b, at).map(|v| f64::from(v as i32) / 65536.0)
}

/// Check the ICC header: declared size within the data, the `acsp` signature, a known
/// colour space. None for anything else (garbage, truncated, too large).
pub(crate) fn header(icc: &[u8]) -> Option<ProfileHeader> {
    if icc.len() < 132 || icc.len() > MAX_PROFILE_BYTES {
        return None;
    }
    let size = usize::try_from(be_u32(icc, 0)?).ok()?;
    if size < 132 || size > icc.len() || icc.get(36..40)? != b"acsp" {
        return None;
    }
    let space = match icc.get(16..20)? {
        b"RGB " => ProfileSpace::Rgb,
        b"CMYK" => ProfileSpace::Cmyk,
        b"GRAY" => ProfileSpace::Gray,
        _ => ProfileSpace::Other,
    };
    Some(ProfileHeader { space })
}

/// The data of tag `sig` (offset and size checked against the profile), if present.
fn tag<'a>(icc: &'a [u8], sig: &[u8; 4]) -> Option<&'a [u8]> {
    let count = be_u32(icc, 128)?;
    if count > 1024 {
        return None;
    }
    (0..count as usize).find_map(|i| {
        let at = 132 + i * 12;
        if icc.get(at..at + 4)? != sig {
            return None;
        }
        let offset = usize::try_from(be_u32(icc, at + 4)?).ok()?;
        let len = usize::try_from(be_u32(icc, at + 8)?).ok()?;
        icc.get(offset..offset.checked_add(len)?)
    })
}

/// sRGB's D50-adapted colorants (IEC 61966-2-1 primaries, Bradford), as profiles store them.
const SRGB_COLORANTS: [(&[u8; 4], [f64; 3]); 3] = [
    (b"rXYZ", [0.4361, 0.2225, 0.0139]),
    (b"gXYZ", [0.3851, 0.7169, 0.0971]),
    (b"bXYZ", [0.1431, 0.0606, 0.7141]),
];

fn srgb_eotf(v: f64) -> f64 {
    if v <= 0.04045 {
        v / 12.92
    } else {
        ((v + 0.055) / 1.055).powf(2.4)
    }
}

/// True when a `curv` or `para` tag is the sRGB transfer curve (within 8-bit rounding).
fn is_srgb_curve(t: &[u8]) -> bool {
    let eval: Box<dyn Fn(f64) -> Option<f64>> = match t.get(0..4) {
        Some(b"curv") => {
            let Some(n) = be_u32(t, 8).map(|n| n as usize) else {
                return false;
            };
            if n < 2 || t.len() < 12 + 2 * n {
                return false; // n = 0 (identity) and 1 (pure gamma) are never sRGB
            }
            Box::new(move |x: f64| {
                let pos = x * (n - 1) as f64;
                let i = (pos.floor() as usize).min(n - 2);
                let f = pos - i as f64;
                let a = f64::from(u16::from_be_bytes([
                    *t.get(12 + 2 * i)?,
                    *t.get(13 + 2 * i)?,
                ]));
                let b = f64::from(u16::from_be_bytes([
                    *t.get(14 + 2 * i)?,
                    *t.get(15 + 2 * i)?,
                ]));
                Some((a + (b - a) * f) / 65535.0)
            })
        }
        Some(b"para") => {
            let func = t.get(8..10).map(|b| u16::from_be_bytes([b[0], b[1]]));
            let p: Vec<f64> = (0..7).filter_map(|i| be_s15f16(t, 12 + 4 * i)).collect();
            match func {
                // Y = (aX+b)^g for X ≥ d, cX below; sRGB's is type 3.
                Some(3) if p.len() >= 5 => Box::new(move |x: f64| {
                    Some(if x >= p[4] {
                        (p[1] * x + p[2]).max(0.0).powf(p[0])
                    } else {
                        p[3] * x
                    })
                }),
                _ => return false,
            }
        }
        _ => return false,
    };
    (0..=32).all(|i| {
        let x = f64::from(i) / 32.0;
        eval(x).is_some_and(|y| (y - srgb_eotf(x)).abs() < 0.5 / 255.0)
    })
}

/// The cheap check: an RGB matrix/TRC profile with sRGB's colorants and transfer curves
/// (how "sRGB IEC61966-2.1" and its compact variants are written). No LUT tags.
pub(crate) fn looks_like_srgb(icc: &[u8]) -> bool {
    if header(icc).map(|h| h.space) != Some(ProfileSpace::Rgb)
        || tag(icc, b"A2B0").is_some()
        || tag(icc, b"A2B1").is_some()
    {
        return false;
    }
    let colorants = SRGB_COLORANTS.iter().all(|(sig, want)| {
        tag(icc, sig).is_some_and(|t| {
            t.get(0..4) == Some(b"XYZ ")
                && (0..3)
                    .all(|i| be_s15f16(t, 8 + 4 * i).is_some_and(|v| (v - want[i]).abs() < 0.0025))
        })
    });
    colorants
        && [b"rTRC", b"gTRC", b"bTRC"]
            .iter()
            .all(|sig| tag(icc, sig).is_some_and(is_srgb_curve))
}

fn srgb_profile() -> &'static qcms::Profile {
    static SRGB: OnceLock<Box<qcms::Profile>> = OnceLock::new();
    SRGB.get_or_init(|| {
        let mut p = qcms::Profile::new_sRGB();
        p.precache_output_transform();
        p
    })
}

/// An embedded profile turned into a transform to sRGB, or the reason there is none.
pub(crate) enum Plan {
    /// Leave the pixels as they are (no profile, or sRGB).
    Keep,
    /// A profile was present and unusable: leave the pixels, report it.
    Ignored,
    /// RGB pixels in place through this transform.
    Rgb(qcms::Transform),
    /// CMYK (ink amounts, 0 = none) to RGB through this transform.
    Cmyk(qcms::Transform),
}

impl Plan {
    pub(crate) fn handling(&self) -> ColorHandling {
        match self {
            Plan::Keep => ColorHandling::Srgb,
            Plan::Ignored => ColorHandling::ProfileIgnored,
            Plan::Rgb(_) | Plan::Cmyk(_) => ColorHandling::Converted,
        }
    }
}

/// The plan for RGB pixels carrying `icc` (None = no profile embedded).
pub(crate) fn plan_rgb(icc: Option<&[u8]>) -> Plan {
    let Some(icc) = icc else {
        return Plan::Keep;
    };
    match header(icc).map(|h| h.space) {
        Some(ProfileSpace::Rgb) => {}
        // A grey profile on grey pixels: not converted (grey stays grey; tone curves of
        // grey profiles are close to sRGB's for viewing), but not an error either.
        Some(ProfileSpace::Gray) => return Plan::Keep,
        _ => return Plan::Ignored,
    }
    if looks_like_srgb(icc) {
        return Plan::Keep;
    }
    let Some(input) = qcms::Profile::new_from_slice(icc, false) else {
        return Plan::Ignored;
    };
    let Some(t) = qcms::Transform::new(
        &input,
        srgb_profile(),
        qcms::DataType::RGB8,
        qcms::Intent::default(),
    ) else {
        return Plan::Ignored;
    };
    // Probe a 17×17×17 grid (5k pixels, microseconds): a transform that moves nothing by
    // more than rounding is sRGB in disguise (e.g. a v4 sRGB profile), so skip it.
    let levels: Vec<u8> = (0..=16u16).map(|i| (i * 255 / 16) as u8).collect();
    let mut grid = Vec::with_capacity(17 * 17 * 17 * 3);
    for &r in &levels {
        for &g in &levels {
            for &b in &levels {
                grid.extend_from_slice(&[r, g, b]);
            }
        }
    }
    let before = grid.clone();
    t.apply(&mut grid);
    if grid.iter().zip(&before).all(|(a, b)| a.abs_diff(*b) <= 1) {
        return Plan::Keep;
    }
    // White must stay light and black dark: a garbage profile that qcms still accepted
    // (zero colorants, broken curves) would otherwise turn a photo black or invert it.
    let mut probe = [255, 255, 255, 0, 0, 0];
    t.apply(&mut probe);
    if plausible(&probe[0..3], &probe[3..6]) {
        Plan::Rgb(t)
    } else {
        Plan::Ignored
    }
}

/// The plan for CMYK pixels carrying `icc`; `Keep` means "use today's naive conversion".
pub(crate) fn plan_cmyk(icc: Option<&[u8]>) -> Plan {
    let Some(icc) = icc else {
        return Plan::Keep;
    };
    if header(icc).map(|h| h.space) != Some(ProfileSpace::Cmyk) {
        return Plan::Ignored;
    }
    // qcms converts CMYK only through an AToB0 lut8/lut16 table (how v2 press profiles
    // are built); without one it has no CMYK path at all.
    if !tag(icc, b"A2B0").is_some_and(|t| matches!(t.get(0..4), Some(b"mft1" | b"mft2"))) {
        return Plan::Ignored;
    }
    let Some(input) = qcms::Profile::new_from_slice(icc, false) else {
        return Plan::Ignored;
    };
    let Some(t) = qcms::Transform::new_to(
        &input,
        srgb_profile(),
        qcms::DataType::CMYK,
        qcms::DataType::RGB8,
        qcms::Intent::default(),
    ) else {
        return Plan::Ignored;
    };
    // Paper must come out light and full ink dark.
    let mut rgb = [0u8; 6];
    t.convert(&[0, 0, 0, 0, 255, 255, 255, 255], &mut rgb);
    if plausible(&rgb[0..3], &rgb[3..6]) {
        Plan::Cmyk(t)
    } else {
        Plan::Ignored
    }
}

fn plausible(white: &[u8], black: &[u8]) -> bool {
    white.iter().all(|&c| c >= 180) && black.iter().all(|&c| c <= 100)
}

/// Convert RGB8 pixels in place (a length that is not whole pixels is left alone).
pub(crate) fn apply_rgb(t: &qcms::Transform, rgb: &mut [u8]) {
    if rgb.len().is_multiple_of(3) {
        t.apply(rgb);
    }
}

/// CMYK (4 bytes a pixel, ink amounts) → RGB (3 bytes a pixel) in the same buffer, a block
/// at a time, so no second full-size buffer is needed: the RGB of block k ends before the
/// CMYK of block k+1 starts. Returns the RGB bytes (the buffer truncated to 3/4).
pub(crate) fn cmyk_to_rgb_in_place(t: &qcms::Transform, mut buf: Vec<u8>) -> Vec<u8> {
    const BLOCK: usize = 4096;
    let pixels = buf.len() / 4;
    let mut cmyk = [0u8; BLOCK * 4];
    let mut rgb = [0u8; BLOCK * 3];
    let mut done = 0;
    while done < pixels {
        let n = (pixels - done).min(BLOCK);
        cmyk[..n * 4].copy_from_slice(&buf[done * 4..(done + n) * 4]);
        t.convert(&cmyk[..n * 4], &mut rgb[..n * 3]);
        buf[done * 3..(done + n) * 3].copy_from_slice(&rgb[..n * 3]);
        done += n;
    }
    buf.truncate(pixels * 3);
    buf
}

/// ICC chunks of a JPEG (APP2 `ICC_PROFILE\0`, seq 1-based, count): where each one's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IccChunk {
    pub seq: u8,
    pub count: u8,
    pub start: usize,
    pub end: usize,
}

/// What the chunks of a JPEG add up to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JpegIcc {
    None,
    /// Chunks missing, duplicated, inconsistent, or over [`MAX_PROFILE_BYTES`].
    Invalid,
    Profile(Vec<u8>),
}

/// Reassemble a profile split over APP2 markers, in sequence order, checking the total
/// size before allocating.
pub(crate) fn assemble_jpeg_icc(bytes: &[u8], chunks: &[IccChunk]) -> JpegIcc {
    let Some(first) = chunks.first() else {
        return JpegIcc::None;
    };
    let count = first.count;
    if count == 0 || chunks.len() != usize::from(count) {
        return JpegIcc::Invalid;
    }
    let mut ordered: Vec<Option<&IccChunk>> = vec![None; usize::from(count)];
    for c in chunks {
        if c.count != count || c.seq == 0 || c.seq > count {
            return JpegIcc::Invalid;
        }
        let slot = &mut ordered[usize::from(c.seq - 1)];
        if slot.is_some() {
            return JpegIcc::Invalid;
        }
        *slot = Some(c);
    }
    let total: usize = chunks.iter().map(|c| c.end.saturating_sub(c.start)).sum();
    if total > MAX_PROFILE_BYTES {
        return JpegIcc::Invalid;
    }
    let mut out = Vec::with_capacity(total);
    for c in ordered.into_iter().flatten() {
        match bytes.get(c.start..c.end) {
            Some(data) => out.extend_from_slice(data),
            None => return JpegIcc::Invalid,
        }
    }
    JpegIcc::Profile(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_truncated_headers_are_not_profiles() {
        assert_eq!(header(&[]), None);
        assert_eq!(header(&[0u8; 200]), None);
        let mut h = vec![0u8; 200];
        h[0..4].copy_from_slice(&200u32.to_be_bytes());
        h[36..40].copy_from_slice(b"acsp");
        h[16..20].copy_from_slice(b"RGB ");
        assert_eq!(header(&h).map(|h| h.space), Some(ProfileSpace::Rgb));
        // Declared size beyond the data.
        h[0..4].copy_from_slice(&100_000u32.to_be_bytes());
        assert_eq!(header(&h), None);
        // Tag table claiming a tag past the end is simply absent.
        h[0..4].copy_from_slice(&200u32.to_be_bytes());
        h[128..132].copy_from_slice(&1u32.to_be_bytes());
        h[132..136].copy_from_slice(b"rXYZ");
        h[136..140].copy_from_slice(&u32::MAX.to_be_bytes());
        h[140..144].copy_from_slice(&20u32.to_be_bytes());
        assert_eq!(tag(&h, b"rXYZ"), None);
        assert!(matches!(plan_rgb(Some(&h)), Plan::Ignored));
        assert!(matches!(plan_cmyk(Some(&h)), Plan::Ignored));
    }

    #[test]
    fn icc_chunks_are_reassembled_in_sequence_order() {
        let bytes = b"..AAAA..BB..";
        let a = IccChunk {
            seq: 1,
            count: 2,
            start: 2,
            end: 6,
        };
        let b = IccChunk {
            seq: 2,
            count: 2,
            start: 8,
            end: 10,
        };
        assert_eq!(
            assemble_jpeg_icc(bytes, &[b, a]),
            JpegIcc::Profile(b"AAAABB".to_vec())
        );
        assert_eq!(assemble_jpeg_icc(bytes, &[]), JpegIcc::None);
        assert_eq!(assemble_jpeg_icc(bytes, &[a]), JpegIcc::Invalid);
        assert_eq!(assemble_jpeg_icc(bytes, &[a, a]), JpegIcc::Invalid);
        let out_of_range = IccChunk { end: 99, ..b };
        assert_eq!(
            assemble_jpeg_icc(bytes, &[a, out_of_range]),
            JpegIcc::Invalid
        );
    }
}
