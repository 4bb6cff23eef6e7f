//! A small ICC profile writer for the test fixtures: RGB matrix/TRC profiles from published
//! primaries and white points, and a CMYK profile with an AToB0 `mft2` (lut16) table.
//! Written from the ICC specification (ICC.1:2001-04 / v2.4 layouts), not from any profile file.

/// Linear-light [r, g, b] → XYZ matrix (rows X, Y, Z) from xy primaries and white, white Y = 1.
pub fn rgb_to_xyz(prim: [[f64; 2]; 3], white: [f64; 2]) -> [[f64; 3]; 3] {
    let xyz = |[x, y]: [f64; 2]| [x / y, 1.0, (1.0 - x - y) / y];
    let cols = [xyz(prim[0]), xyz(prim[1]), xyz(prim[2])];
    let p = [
        [cols[0][0], cols[1][0], cols[2][0]],
        [cols[0][1], cols[1][1], cols[2][1]],
        [cols[0][2], cols[1][2], cols[2][2]],
    ];
    let s = mul_vec(invert(p), xyz(white));
    let mut m = [[0.0; 3]; 3];
    for r in 0..3 {
        for c in 0..3 {
            m[r][c] = p[r][c] * s[c];
        }
    }
    m
}

pub fn mul(a: [[f64; 3]; 3], b: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut m = [[0.0; 3]; 3];
    for r in 0..3 {
        for c in 0..3 {
            m[r][c] = (0..3).map(|k| a[r][k] * b[k][c]).sum();
        }
    }
    m
}

pub fn mul_vec(a: [[f64; 3]; 3], v: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|r| (0..3).map(|k| a[r][k] * v[k]).sum())
}

pub fn invert(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let [[a, b, c], [d, e, f], [g, h, i]] = m;
    let det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g);
    [
        [
            (e * i - f * h) / det,
            (c * h - b * i) / det,
            (b * f - c * e) / det,
        ],
        [
            (f * g - d * i) / det,
            (a * i - c * g) / det,
            (c * d - a * f) / det,
        ],
        [
            (d * h - e * g) / det,
            (b * g - a * h) / det,
            (a * e - b * d) / det,
        ],
    ]
}

/// Bradford chromatic adaptation from white `from` (XYZ) to white `to`.
pub fn bradford(from: [f64; 3], to: [f64; 3]) -> [[f64; 3]; 3] {
    const B: [[f64; 3]; 3] = [
        [0.8951, 0.2664, -0.1614],
        [-0.7502, 1.7135, 0.0367],
        [0.0389, -0.0685, 1.0296],
    ];
    let s = mul_vec(B, from);
    let d = mul_vec(B, to);
    let scale = [
        [d[0] / s[0], 0.0, 0.0],
        [0.0, d[1] / s[1], 0.0],
        [0.0, 0.0, d[2] / s[2]],
    ];
    mul(invert(B), mul(scale, B))
}

/// The ICC PCS white (D50), as the specification gives it.
pub const D50: [f64; 3] = [0.9642, 1.0, 0.8249];

pub fn white_xyz([x, y]: [f64; 2]) -> [f64; 3] {
    [x / y, 1.0, (1.0 - x - y) / y]
}

/// How a profile's tone response curve is stored.
pub enum Trc {
    /// `para` function type 3: the sRGB curve (also Display P3's).
    Srgb,
    /// `curv` sampled at `n` points of a pure gamma (one copy per channel).
    SampledGamma(f64, usize),
}

fn s15f16(v: f64) -> [u8; 4] {
    ((v * 65536.0).round() as i32).to_be_bytes()
}

fn xyz_tag(v: [f64; 3]) -> Vec<u8> {
    let mut t = b"XYZ \0\0\0\0".to_vec();
    for c in v {
        t.extend_from_slice(&s15f16(c));
    }
    t
}

fn desc_tag(text: &str) -> Vec<u8> {
    // textDescriptionType: ASCII count + text + NUL, empty Unicode and ScriptCode parts.
    let mut t = b"desc\0\0\0\0".to_vec();
    t.extend_from_slice(&((text.len() + 1) as u32).to_be_bytes());
    t.extend_from_slice(text.as_bytes());
    t.push(0);
    t.extend_from_slice(&[0; 8]); // Unicode language code + count
    t.extend_from_slice(&[0; 3]); // ScriptCode code + count
    t.extend_from_slice(&[0; 67]);
    t
}

fn text_tag(text: &str) -> Vec<u8> {
    let mut t = b"text\0\0\0\0".to_vec();
    t.extend_from_slice(text.as_bytes());
    t.push(0);
    t
}

fn trc_tag(trc: &Trc) -> Vec<u8> {
    match *trc {
        Trc::Srgb => {
            let mut t = b"para\0\0\0\0".to_vec();
            t.extend_from_slice(&3u16.to_be_bytes());
            t.extend_from_slice(&[0, 0]);
            for p in [2.4, 1.0 / 1.055, 0.055 / 1.055, 1.0 / 12.92, 0.04045] {
                t.extend_from_slice(&s15f16(p));
            }
            t
        }
        Trc::SampledGamma(g, n) => {
            let mut t = b"curv\0\0\0\0".to_vec();
            t.extend_from_slice(&(n as u32).to_be_bytes());
            for i in 0..n {
                let y = (i as f64 / (n - 1) as f64).powf(g);
                t.extend_from_slice(&((y * 65535.0).round() as u16).to_be_bytes());
            }
            t
        }
    }
}

/// Header + tag table + tag data (each 4-byte aligned).
fn assemble(
    class: &[u8; 4],
    space: &[u8; 4],
    pcs: &[u8; 4],
    tags: &[([u8; 4], Vec<u8>)],
) -> Vec<u8> {
    let mut data = Vec::new();
    let mut table = Vec::new();
    let table_len = 4 + 12 * tags.len();
    for (sig, body) in tags {
        while data.len() % 4 != 0 {
            data.push(0);
        }
        let offset = 128 + table_len + data.len();
        table.extend_from_slice(sig);
        table.extend_from_slice(&(offset as u32).to_be_bytes());
        table.extend_from_slice(&(body.len() as u32).to_be_bytes());
        data.extend_from_slice(body);
    }
    while data.len() % 4 != 0 {
        data.push(0);
    }
    let size = 128 + table_len + data.len();
    let mut p = Vec::with_capacity(size);
    p.extend_from_slice(&(size as u32).to_be_bytes());
    p.extend_from_slice(b"\0\0\0\0"); // preferred CMM: none
    p.extend_from_slice(&[2, 0x40, 0, 0]); // version 2.4
    p.extend_from_slice(class);
    p.extend_from_slice(space);
    p.extend_from_slice(pcs);
    p.extend_from_slice(&[0x07, 0xE9, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0]); // 2025-01-01
    p.extend_from_slice(b"acsp");
    p.extend_from_slice(&[0; 4]); // platform
    p.extend_from_slice(&[0; 4]); // flags
    p.extend_from_slice(&[0; 8]); // manufacturer, model
    p.extend_from_slice(&[0; 8]); // attributes
    p.extend_from_slice(&0u32.to_be_bytes()); // perceptual intent
    for c in D50 {
        p.extend_from_slice(&s15f16(c));
    }
    p.extend_from_slice(&[0; 4]); // creator
    p.extend_from_slice(&[0; 16]); // profile ID (none)
    p.extend_from_slice(&[0; 28]); // reserved
    assert_eq!(p.len(), 128);
    p.extend_from_slice(&(tags.len() as u32).to_be_bytes());
    p.extend_from_slice(&table);
    p.extend_from_slice(&data);
    assert_eq!(p.len(), size);
    p
}

/// A display-class RGB matrix/TRC profile: colorants Bradford-adapted to D50 (with a
/// `chad` tag saying so), media white D50, the same curve on all three channels.
pub fn rgb_profile(description: &str, prim: [[f64; 2]; 3], white: [f64; 2], trc: Trc) -> Vec<u8> {
    let adapt = bradford(white_xyz(white), D50);
    let m = mul(adapt, rgb_to_xyz(prim, white));
    let mut chad = b"sf32\0\0\0\0".to_vec();
    for row in adapt {
        for v in row {
            chad.extend_from_slice(&s15f16(v));
        }
    }
    let curve = trc_tag(&trc);
    let tags = vec![
        (*b"desc", desc_tag(description)),
        (
            *b"cprt",
            text_tag("No copyright, use freely (sightline test profile)"),
        ),
        (*b"wtpt", xyz_tag(D50)),
        (*b"chad", chad),
        (*b"rXYZ", xyz_tag([m[0][0], m[1][0], m[2][0]])),
        (*b"gXYZ", xyz_tag([m[0][1], m[1][1], m[2][1]])),
        (*b"bXYZ", xyz_tag([m[0][2], m[1][2], m[2][2]])),
        (*b"rTRC", curve.clone()),
        (*b"gTRC", curve.clone()),
        (*b"bTRC", curve),
    ];
    assemble(b"mntr", b"RGB ", b"XYZ ", &tags)
}

/// CIE L*a*b* (D50) of an XYZ colour (D50-relative).
pub fn xyz_to_lab(xyz: [f64; 3]) -> [f64; 3] {
    let f = |t: f64| {
        if t > 216.0 / 24389.0 {
            t.cbrt()
        } else {
            (24389.0 / 27.0 * t + 16.0) / 116.0
        }
    };
    let [fx, fy, fz] = [f(xyz[0] / D50[0]), f(xyz[1] / D50[1]), f(xyz[2] / D50[2])];
    [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
}

/// An output-class CMYK profile whose AToB0 (`mft2`, Lab PCS, legacy 16-bit Lab encoding)
/// samples `model` (ink amounts 0–1 → D50 XYZ) on a `grid`⁴ lattice, with the per-channel
/// input curves `input_curve` (ink → lattice coordinate, 0–1) ahead of it.
pub fn cmyk_profile(
    description: &str,
    grid: usize,
    input_curve: impl Fn(f64) -> f64,
    model: impl Fn([f64; 4]) -> [f64; 3],
    inverse_input_curve: impl Fn(f64) -> f64,
) -> Vec<u8> {
    let mut t = b"mft2\0\0\0\0".to_vec();
    t.extend_from_slice(&[4, 3, grid as u8, 0]);
    for r in 0..3 {
        for c in 0..3 {
            t.extend_from_slice(&s15f16(if r == c { 1.0 } else { 0.0 }));
        }
    }
    const IN_ENTRIES: usize = 256;
    const OUT_ENTRIES: usize = 2;
    t.extend_from_slice(&(IN_ENTRIES as u16).to_be_bytes());
    t.extend_from_slice(&(OUT_ENTRIES as u16).to_be_bytes());
    for _ in 0..4 {
        for i in 0..IN_ENTRIES {
            let v = input_curve(i as f64 / (IN_ENTRIES - 1) as f64).clamp(0.0, 1.0);
            t.extend_from_slice(&((v * 65535.0).round() as u16).to_be_bytes());
        }
    }
    // CLUT: first input channel varies slowest.
    let coord = |i: usize| inverse_input_curve(i as f64 / (grid - 1) as f64);
    for c in 0..grid {
        for m in 0..grid {
            for y in 0..grid {
                for k in 0..grid {
                    let lab = xyz_to_lab(model([coord(c), coord(m), coord(y), coord(k)]));
                    // Legacy (v2) 16-bit Lab: L 0–100 → 0–0xFF00, a/b −128…127.996 → 0–0xFFFF.
                    let l = (lab[0].clamp(0.0, 100.0) * 65280.0 / 100.0).round() as u16;
                    let a = ((lab[1].clamp(-128.0, 127.996) + 128.0) * 256.0).round() as u16;
                    let b = ((lab[2].clamp(-128.0, 127.996) + 128.0) * 256.0).round() as u16;
                    for v in [l, a, b] {
                        t.extend_from_slice(&v.to_be_bytes());
                    }
                }
            }
        }
    }
    for _ in 0..3 {
        t.extend_from_slice(&0u16.to_be_bytes());
        t.extend_from_slice(&u16::MAX.to_be_bytes());
    }
    let tags = vec![
        (*b"desc", desc_tag(description)),
        (
            *b"cprt",
            text_tag("No copyright, use freely (sightline test profile)"),
        ),
        (*b"wtpt", xyz_tag(D50)),
        (*b"A2B0", t),
    ];
    assemble(b"prtr", b"CMYK", b"Lab ", &tags)
}
