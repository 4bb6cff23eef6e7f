//! The press model the test CMYK profile encodes: ink amounts (0 = none, 1 = full) → linear
//! sRGB reflectance. Dot gain, then each ink filters the three bands of the paper's light
//! (real cyan ink also absorbs some green, magenta some blue and red, and so on).
//! The profile samples this; the tests compute their reference from it directly.

/// Effective coverage of a nominal ink amount (midtones print darker than asked).
pub fn dot_gain(a: f64) -> f64 {
    1.0 - (1.0 - a).powf(1.5)
}

pub fn inverse_dot_gain(e: f64) -> f64 {
    1.0 - (1.0 - e).powf(1.0 / 1.5)
}

/// Fraction of [red, green, blue] light each full-coverage ink lets through: C, M, Y, K.
const TRANSMIT: [[f64; 3]; 4] = [
    [0.12, 0.60, 0.88],
    [0.80, 0.16, 0.52],
    [0.96, 0.88, 0.08],
    [0.05, 0.05, 0.05],
];

/// Linear sRGB (D65) of the printed colour; paper is white (media-relative).
pub fn ink_to_linear_srgb(ink: [f64; 4]) -> [f64; 3] {
    let mut rgb = [1.0; 3];
    for (amount, transmit) in ink.iter().zip(TRANSMIT) {
        let e = dot_gain(amount.clamp(0.0, 1.0));
        for band in 0..3 {
            rgb[band] *= 1.0 - e * (1.0 - transmit[band]);
        }
    }
    rgb
}
