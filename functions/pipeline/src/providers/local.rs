//! The offline analyzer: real image measurements at $0, no network.
//!
//! Dimensions, dominant colours with their share, brightness, contrast, sharpness
//! (variance of the Laplacian) with a blurry flag, and the 64-bit DCT perceptual hash that
//! near-duplicate skip uses (`sightline_core::embed::perceptual_hash`: one rule everywhere).

use async_trait::async_trait;
use image::{GrayImage, RgbImage};
use serde_json::{json, Map, Value};
use sightline_core::embed::{cosine_distance, is_near_duplicate, signature_rgb, NearDupThreshold};
use sightline_core::genjob::{CheckSpec, CHECK_SKIPPED};
use sightline_core::pricing::Usage;
use sightline_core::retry::FailureKind;

use super::gen_local::{draw, LOCAL_IMAGE_MODEL};
use crate::ports::{ProviderError, RateInfo, VisionProvider, VisionRequest, VisionResponse};

/// Model name stored with local results.
pub const LOCAL_MODEL: &str = "sightline-local-v1";

/// Below this variance of the Laplacian an image is called blurry (on ≤1024-px images).
const BLUR_THRESHOLD: f64 = 100.0;

#[derive(Debug, Clone, Default)]
pub struct LocalAnalyzer;

#[async_trait]
impl VisionProvider for LocalAnalyzer {
    fn name(&self) -> &str {
        "local"
    }

    fn is_paid(&self) -> bool {
        false
    }

    async fn analyze(&self, req: &VisionRequest) -> Result<VisionResponse, ProviderError> {
        let jpeg = req.jpeg.clone();
        let check = req.check.clone();
        let analysis = tokio::task::spawn_blocking(move || {
            let mut analysis = analyze_bytes(&jpeg)?;
            if let (Some(spec), Value::Object(map)) = (check, &mut analysis) {
                map.extend(check_bytes(&jpeg, &spec)?);
            }
            Ok::<_, Undecodable>(analysis)
        })
        .await
        .map_err(|e| invalid(format!("analyzer task failed: {e}")))?
        .map_err(|e| invalid(e.to_string()))?;
        Ok(VisionResponse {
            analysis,
            usage: Some(Usage::default()),
            model: LOCAL_MODEL.into(),
            rate: RateInfo::default(),
        })
    }
}

fn invalid(message: String) -> ProviderError {
    ProviderError {
        kind: FailureKind::InvalidImage,
        message,
        rate: RateInfo::default(),
        usage: None,
        billed: false,
    }
}

/// The offline analyzer could not read the image.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode image: {0}")]
pub struct Undecodable(#[from] image::ImageError);

/// The offline check of a generated image against its request. A picture of the offline
/// generator is a function of its request alone, so the checker draws the request again at the
/// analysed size and compares the two by the near-duplicate rule: a picture made for another
/// prompt or seed (or damaged on the way) fails. Pictures of other models it cannot judge,
/// and says so.
pub fn check_bytes(jpeg: &[u8], check: &CheckSpec) -> Result<Map<String, Value>, Undecodable> {
    let mut out = Map::new();
    if check.model != LOCAL_IMAGE_MODEL {
        out.insert("matches_prompt".into(), Value::Null);
        out.insert(
            CHECK_SKIPPED.into(),
            Value::String(format!(
                "the offline analyzer cannot judge pictures of {}; analyse with a vision model to check them",
                check.model
            )),
        );
        return Ok(out);
    }
    let seen = image::load_from_memory(jpeg)?.to_rgb8();
    let (w, h) = seen.dimensions();
    let expected = draw(&check.prompt, check.seed, w, h);
    let a = signature_rgb(&seen);
    let b = signature_rgb(&expected);
    let distance = cosine_distance(&a.embedding, &b.embedding);
    let matches = is_near_duplicate(&a, &b, &NearDupThreshold::default());
    out.insert("matches_prompt".into(), Value::Bool(matches));
    let issues = if matches {
        Vec::new()
    } else {
        vec![Value::String(format!(
            "not the picture its request draws (visual distance {distance:.3})"
        ))]
    };
    out.insert("prompt_issues".into(), Value::Array(issues));
    Ok(out)
}

/// Measure a (resized) image.
pub fn analyze_bytes(bytes: &[u8]) -> Result<Value, Undecodable> {
    let img = image::load_from_memory(bytes)?;
    let rgb = img.to_rgb8();
    let gray = img.to_luma8();
    let (w, h) = rgb.dimensions();
    let colours = dominant_colours(&rgb, 5);
    let (brightness, contrast) = brightness_contrast(&gray);
    let sharpness = laplacian_variance(&gray);
    let hash = sightline_core::embed::perceptual_hash(&rgb);

    let mut issues = Vec::new();
    let blurry = sharpness < BLUR_THRESHOLD;
    if blurry {
        issues.push("blurry");
    }
    if brightness < 0.2 {
        issues.push("dark");
    } else if brightness > 0.85 {
        issues.push("overexposed");
    }
    if contrast < 0.08 {
        issues.push("low_contrast");
    }
    let orientation = if w > h {
        "landscape"
    } else if h > w {
        "portrait"
    } else {
        "square"
    };
    let names: Vec<String> = colours
        .iter()
        .map(|c| c["name"].as_str().unwrap_or("").to_string())
        .collect();
    let mut tags: Vec<String> = vec![orientation.to_string()];
    for n in &names {
        if !tags.contains(n) {
            tags.push(n.clone());
        }
    }
    // Several histogram bins can share a colour name: describe by name, shares added up.
    let mut named: Vec<(String, f64)> = Vec::new();
    for c in &colours {
        let name = c["name"].as_str().unwrap_or("").to_string();
        let share = c["share"].as_f64().unwrap_or(0.0);
        match named.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 += share,
            None => named.push((name, share)),
        }
    }
    named.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top = named
        .iter()
        .take(2)
        .map(|(n, share)| format!("{n} ({:.0}%)", share * 100.0))
        .collect::<Vec<_>>()
        .join(" and ");
    let description = format!(
        "A {orientation} {w}×{h} image, {} and {}, dominated by {top}.",
        if brightness < 0.35 {
            "dark"
        } else if brightness > 0.7 {
            "bright"
        } else {
            "evenly lit"
        },
        if blurry { "blurry" } else { "sharp" },
    );
    Ok(json!({
        "description": description,
        "category": "photo",
        "tags": tags,
        "objects": [],
        "text": "",
        "quality_issues": issues,
        "metrics": {
            "width": w,
            "height": h,
            "dominant_colors": colours,
            "brightness": round3(brightness),
            "contrast": round3(contrast),
            "sharpness": round3(sharpness),
            "blurry": blurry,
            "perceptual_hash": format!("{hash:016x}"),
            "hash_algorithm": "phash-dct-64"
        }
    }))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Histogram over 3 bits per channel; the biggest bins, each with its mean colour and share.
fn dominant_colours(img: &RgbImage, n: usize) -> Vec<Value> {
    let mut bins = vec![(0u64, [0u64; 3]); 512];
    for p in img.pixels() {
        let [r, g, b] = p.0;
        let idx = (usize::from(r >> 5) << 6) | (usize::from(g >> 5) << 3) | usize::from(b >> 5);
        let bin = &mut bins[idx];
        bin.0 += 1;
        bin.1[0] += u64::from(r);
        bin.1[1] += u64::from(g);
        bin.1[2] += u64::from(b);
    }
    let total = (img.width() as u64 * img.height() as u64).max(1);
    let mut order: Vec<usize> = (0..bins.len()).filter(|&i| bins[i].0 > 0).collect();
    order.sort_by(|&a, &b| bins[b].0.cmp(&bins[a].0));
    order
        .into_iter()
        .take(n.max(3))
        .map(|i| {
            let (count, sum) = bins[i];
            let rgb = [
                (sum[0] / count) as u8,
                (sum[1] / count) as u8,
                (sum[2] / count) as u8,
            ];
            json!({
                "hex": format!("#{:02x}{:02x}{:02x}", rgb[0], rgb[1], rgb[2]),
                "name": colour_name(rgb),
                "share": round3(count as f64 / total as f64),
            })
        })
        .collect()
}

/// A coarse English colour name from hue, saturation and value.
fn colour_name([r, g, b]: [u8; 3]) -> &'static str {
    let (r, g, b) = (
        f64::from(r) / 255.0,
        f64::from(g) / 255.0,
        f64::from(b) / 255.0,
    );
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let v = max;
    let s = if max > 0.0 { (max - min) / max } else { 0.0 };
    if v < 0.15 {
        return "black";
    }
    if s < 0.15 {
        return if v > 0.85 { "white" } else { "gray" };
    }
    let d = max - min;
    let mut hue = if max == r {
        60.0 * (((g - b) / d) % 6.0)
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    if hue < 0.0 {
        hue += 360.0;
    }
    match hue {
        h if !(15.0..345.0).contains(&h) => {
            if v < 0.6 && s > 0.4 {
                "brown"
            } else if s < 0.5 && v > 0.7 {
                "pink"
            } else {
                "red"
            }
        }
        h if h < 45.0 => {
            if v < 0.6 {
                "brown"
            } else {
                "orange"
            }
        }
        h if h < 70.0 => "yellow",
        h if h < 165.0 => "green",
        h if h < 200.0 => "cyan",
        h if h < 260.0 => "blue",
        h if h < 300.0 => "purple",
        _ => "pink",
    }
}

/// Mean luma and RMS contrast, both in 0..1.
fn brightness_contrast(gray: &GrayImage) -> (f64, f64) {
    let n = (gray.width() as u64 * gray.height() as u64).max(1) as f64;
    let mean = gray.pixels().map(|p| f64::from(p.0[0])).sum::<f64>() / n;
    let var = gray
        .pixels()
        .map(|p| (f64::from(p.0[0]) - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean / 255.0, var.sqrt() / 255.0)
}

/// Variance of the 4-neighbour Laplacian: low means few edges, i.e. blur.
fn laplacian_variance(gray: &GrayImage) -> f64 {
    let (w, h) = gray.dimensions();
    if w < 3 || h < 3 {
        return 0.0;
    }
    let px = |x: u32, y: u32| f64::from(gray.get_pixel(x, y).0[0]);
    let (mut sum, mut sum_sq, mut n) = (0.0, 0.0, 0.0);
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let l = px(x - 1, y) + px(x + 1, y) + px(x, y - 1) + px(x, y + 1) - 4.0 * px(x, y);
            sum += l;
            sum_sq += l * l;
            n += 1.0;
        }
    }
    let mean = sum / n;
    sum_sq / n - mean * mean
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, Luma, Rgb};

    fn jpeg(img: DynamicImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn spec(prompt: &str, seed: Option<u64>, model: &str) -> CheckSpec {
        CheckSpec {
            prompt: prompt.into(),
            model: model.into(),
            size: sightline_core::generate::Size::Pixels {
                width: 1536,
                height: 1024,
            },
            seed,
        }
    }

    /// A picture of the offline generator as the pipeline analyses it: drawn at its request's
    /// size, then prepared (resized to 1024, JPEG) like any upload.
    fn generated(prompt: &str, seed: Option<u64>) -> Vec<u8> {
        let png = jpeg(DynamicImage::ImageRgb8(draw(prompt, seed, 1536, 1024)));
        sightline_core::prepare(&png, &Default::default())
            .unwrap()
            .jpeg
    }

    #[test]
    fn offline_check_passes_the_picture_its_request_draws() {
        let img = generated("a red lamp on a desk", Some(4));
        let out = check_bytes(
            &img,
            &spec("a red lamp on a desk", Some(4), LOCAL_IMAGE_MODEL),
        )
        .unwrap();
        assert_eq!(out["matches_prompt"], true, "{out:?}");
        assert_eq!(out["prompt_issues"], json!([]));
    }

    #[test]
    fn offline_check_fails_a_picture_of_another_prompt_or_seed() {
        let img = generated("a red lamp on a desk", Some(4));
        for other in [
            spec("a blue chair in a garden", Some(4), LOCAL_IMAGE_MODEL),
            spec("a red lamp on a desk", Some(5), LOCAL_IMAGE_MODEL),
        ] {
            let out = check_bytes(&img, &other).unwrap();
            assert_eq!(out["matches_prompt"], false, "{other:?}: {out:?}");
            assert_eq!(out["prompt_issues"].as_array().unwrap().len(), 1);
        }
    }

    #[test]
    fn offline_check_says_it_cannot_judge_other_models_pictures() {
        let img = generated("a red lamp", None);
        let out = check_bytes(&img, &spec("a red lamp", None, "gpt-image-1-mini")).unwrap();
        let verdict = sightline_core::genjob::CheckVerdict::of_analysis(&Value::Object(out));
        assert_eq!(verdict.matches, None);
        assert!(verdict.issues[0].contains("gpt-image-1-mini"));
    }

    #[test]
    fn measures_colours_brightness_and_blur() {
        // Left 3/4 blue, right 1/4 red: shares and names come out in order.
        let img = RgbImage::from_fn(200, 100, |x, _| {
            if x < 150 {
                Rgb([20, 40, 220])
            } else {
                Rgb([230, 20, 20])
            }
        });
        let v = analyze_bytes(&jpeg(DynamicImage::ImageRgb8(img))).unwrap();
        let colours = v["metrics"]["dominant_colors"].as_array().unwrap();
        assert_eq!(colours[0]["name"], "blue");
        assert!((colours[0]["share"].as_f64().unwrap() - 0.75).abs() < 0.01);
        assert_eq!(colours[1]["name"], "red");
        assert_eq!(v["tags"][0], "landscape");

        // A flat image is blurry and low-contrast; a checkerboard is sharp.
        let flat = GrayImage::from_pixel(64, 64, Luma([128]));
        let v = analyze_bytes(&jpeg(DynamicImage::ImageLuma8(flat))).unwrap();
        assert_eq!(v["metrics"]["blurry"], true);
        assert!(v["quality_issues"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i == "low_contrast"));
        let checker = GrayImage::from_fn(64, 64, |x, y| {
            Luma([if (x + y) % 2 == 0 { 0 } else { 255 }])
        });
        let v = analyze_bytes(&jpeg(DynamicImage::ImageLuma8(checker))).unwrap();
        assert_eq!(v["metrics"]["blurry"], false);
        assert_eq!(v["metrics"]["perceptual_hash"].as_str().unwrap().len(), 16);
    }

    #[test]
    fn the_reported_hash_is_the_near_duplicate_rules_hash() {
        let img =
            image::RgbImage::from_fn(256, 256, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 90]));
        let v = analyze_bytes(&jpeg(DynamicImage::ImageRgb8(img.clone()))).unwrap();
        let reported =
            u64::from_str_radix(v["metrics"]["perceptual_hash"].as_str().unwrap(), 16).unwrap();
        assert_eq!(reported, sightline_core::embed::perceptual_hash(&img));
        assert_eq!(v["metrics"]["hash_algorithm"], "phash-dct-64");
    }

    #[test]
    fn garbage_is_an_invalid_image() {
        let e = analyze_bytes(b"nope").unwrap_err();
        assert!(e.to_string().contains("cannot decode"), "{e}");
    }
}
