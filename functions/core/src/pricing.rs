//! The versioned price table and the image-token rules.
//!
//! One estimator for the browser (via wasm-client) and the server: both call
//! [`PriceTable::estimate`]. Rules are data (see `data/prices.toml`) because
//! providers change them.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::generate::{Quality, Size};
use crate::model::{Detail, Estimate};

/// The source of the built-in table (read by build.rs; the tests compare both readings).
#[cfg(test)]
const BUILTIN_TABLE: &str = include_str!("../data/prices.toml");
/// The same table as JSON, written by build.rs: read without a TOML parser (the browser's
/// first-load module is half the size without one).
const BUILTIN_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/prices.json"));

#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("price table is not valid TOML: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("price table lists model {0:?} twice")]
    Duplicate(String),
    #[error("unknown model {model:?}; known models: {known}")]
    UnknownModel { model: String, known: String },
    #[error("embedding model {0:?} lists no dimensions")]
    NoDims(String),
    #[error("image model {model:?}: price key {key:?} is not WIDTHxHEIGHT:QUALITY")]
    BadImagePriceKey { model: String, key: String },
    #[error("image model {model:?} has no price for {size} at {quality} quality")]
    NoImagePrice {
        model: String,
        size: String,
        quality: String,
    },
}

/// How a provider turns an image into input tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum ImageTokenRule {
    /// OpenAI gpt-4o / gpt-4.1: fit in 2048², shortest side to 768, 512-px tiles.
    OpenaiTile {
        base_tokens: u64,
        tile_tokens: u64,
        #[serde(default = "default_fit")]
        fit: u32,
        #[serde(default = "default_short_side")]
        short_side: u32,
        #[serde(default = "default_tile")]
        tile: u32,
    },
    /// OpenAI gpt-4.1-mini/nano, o4-mini: 32-px patches, capped, times a multiplier.
    OpenaiPatch {
        max_patches: u64,
        multiplier: f64,
        #[serde(default = "default_patch")]
        patch: u32,
    },
    /// Anthropic Claude: ⌈w·h / `pixels_per_token`⌉ tokens for the size Claude sees. An image
    /// whose long edge is over `max_long_edge`, or that covers more than `max_patches`
    /// `patch`-px squares, is first scaled down, aspect ratio kept, to the largest size within
    /// both (see [`anthropic_fit`] for why the budget is counted in patches).
    Anthropic {
        max_long_edge: u32,
        #[serde(default = "default_anthropic_patch")]
        patch: u32,
        max_patches: u64,
        pixels_per_token: u64,
    },
    /// Gemini: small images are one block; larger ones are 768-px tiles.
    Gemini {
        small_max_edge: u32,
        small_tokens: u64,
        tile: u32,
        tile_tokens: u64,
    },
    /// Amazon Nova (v1 Lite and Pro), an approximation: Amazon publishes no formula, only a
    /// table of approximate counts by size and the note that an image is rescaled until a side
    /// reaches 896 px. The image is seen at a long edge of at least `min_long_edge` (smaller
    /// ones are scaled up), cut into a grid of `tile`-px tiles (each side's count rounded, at
    /// least one), `tile_tokens` each, plus one tile more (an overview) when the grid has more
    /// than one. See [`nova_tiles`] for how it compares with Amazon's table.
    NovaTile {
        tile: u32,
        tile_tokens: u64,
        min_long_edge: u32,
    },
}

impl ImageTokenRule {
    /// The rule's name as written in `prices.toml` (`rule = "..."`).
    pub fn name(&self) -> &'static str {
        match self {
            ImageTokenRule::OpenaiTile { .. } => "openai_tile",
            ImageTokenRule::OpenaiPatch { .. } => "openai_patch",
            ImageTokenRule::Anthropic { .. } => "anthropic",
            ImageTokenRule::Gemini { .. } => "gemini",
            ImageTokenRule::NovaTile { .. } => "nova_tile",
        }
    }
}

fn default_fit() -> u32 {
    2048
}
fn default_short_side() -> u32 {
    768
}
fn default_tile() -> u32 {
    512
}
fn default_patch() -> u32 {
    32
}
fn default_anthropic_patch() -> u32 {
    28
}

/// One model's prices (USD per 1M tokens), its image rule and where they came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPrice {
    pub id: String,
    pub provider: String,
    pub input_per_mtok: f64,
    pub cached_input_per_mtok: f64,
    pub output_per_mtok: f64,
    pub batch_input_per_mtok: f64,
    pub batch_output_per_mtok: f64,
    pub source: String,
    pub as_of: String,
    pub image: ImageTokenRule,
}

/// Token counts reported by a provider (or estimated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Part of `input_tokens` served from the provider's prompt cache.
    #[serde(default)]
    pub cached_tokens: u64,
}

impl ModelPrice {
    /// Input tokens the provider bills for one image of `width`×`height` (as sent).
    pub fn image_tokens(&self, width: u32, height: u32, detail: Detail) -> u64 {
        if width == 0 || height == 0 {
            return 0;
        }
        match &self.image {
            ImageTokenRule::OpenaiTile {
                base_tokens,
                tile_tokens,
                fit,
                short_side,
                tile,
            } => {
                if detail == Detail::Low {
                    return *base_tokens;
                }
                openai_tiles(width, height, *fit, *short_side, *tile) * tile_tokens + base_tokens
            }
            ImageTokenRule::OpenaiPatch {
                max_patches,
                multiplier,
                patch,
            } => {
                let patches = openai_patches(width, height, *patch, *max_patches);
                (patches as f64 * multiplier).ceil() as u64
            }
            ImageTokenRule::Anthropic {
                max_long_edge,
                patch,
                max_patches,
                pixels_per_token,
            } => {
                let (w, h) = anthropic_fit(width, height, *max_long_edge, *patch, *max_patches);
                (u64::from(w) * u64::from(h)).div_ceil((*pixels_per_token).max(1))
            }
            ImageTokenRule::Gemini {
                small_max_edge,
                small_tokens,
                tile,
                tile_tokens,
            } => {
                if width <= *small_max_edge && height <= *small_max_edge {
                    *small_tokens
                } else {
                    let t = (*tile).max(1);
                    u64::from(width.div_ceil(t)) * u64::from(height.div_ceil(t)) * tile_tokens
                }
            }
            ImageTokenRule::NovaTile {
                tile,
                tile_tokens,
                min_long_edge,
            } => nova_tiles(width, height, *tile, *min_long_edge) * tile_tokens,
        }
    }

    /// Whether the provider reads the image `detail` parameter (only OpenAI's models do; the
    /// others answer the same whatever detail was asked).
    pub fn reads_detail(&self) -> bool {
        self.provider == "openai"
    }

    /// Dollar cost of a call with this usage.
    pub fn cost_usd(&self, usage: &Usage) -> f64 {
        let cached = usage.cached_tokens.min(usage.input_tokens);
        let fresh = usage.input_tokens - cached;
        (fresh as f64 * self.input_per_mtok
            + cached as f64 * self.cached_input_per_mtok
            + usage.output_tokens as f64 * self.output_per_mtok)
            / 1_000_000.0
    }

    /// Dollar cost of the same usage through the provider's batch API.
    pub fn batch_cost_usd(&self, usage: &Usage) -> f64 {
        (usage.input_tokens as f64 * self.batch_input_per_mtok
            + usage.output_tokens as f64 * self.batch_output_per_mtok)
            / 1_000_000.0
    }
}

/// Tiles for the OpenAI tile rule: fit in `fit`², shrink the shortest side to `short`, count `tile` squares.
fn openai_tiles(width: u32, height: u32, fit: u32, short: u32, tile: u32) -> u64 {
    let (mut w, mut h) = (width as f64, height as f64);
    let fit = fit as f64;
    if w > fit || h > fit {
        let s = fit / w.max(h);
        w *= s;
        h *= s;
    }
    let short = short as f64;
    if w.min(h) > short {
        let s = short / w.min(h);
        w *= s;
        h *= s;
    }
    let tile = tile.max(1) as f64;
    // Round the scaled sides first: OpenAI works in whole pixels.
    let tw = (w.round() / tile).ceil() as u64;
    let th = (h.round() / tile).ceil() as u64;
    tw.max(1) * th.max(1)
}

/// Patches for the OpenAI patch rule, scaled down when over the budget (OpenAI's published algorithm).
fn openai_patches(width: u32, height: u32, patch: u32, max_patches: u64) -> u64 {
    let p = patch.max(1) as f64;
    let (w, h) = (width as f64, height as f64);
    let raw = (w / p).ceil() * (h / p).ceil();
    if raw as u64 <= max_patches {
        return raw as u64;
    }
    let mut r = (p * p * max_patches as f64 / (w * h)).sqrt();
    let wr = w * r / p;
    let hr = h * r / p;
    // A side already under one patch keeps its one patch (flooring it would zero the image).
    let fit = |x: f64| if x >= 1.0 { x.floor() / x } else { 1.0 };
    r *= fit(wr).min(fit(hr));
    let patches = ((w * r) / p).ceil().max(1.0) * ((h * r) / p).ceil().max(1.0);
    (patches as u64).min(max_patches)
}

/// The size Claude sees an image at: as sent when its long edge is at most `max_long_edge` and
/// it covers at most `max_patches` squares of `patch` px (partial squares count); otherwise the
/// largest size with the same aspect ratio (short side rounded) within both limits.
///
/// Why a patch budget and not the "~1,600 tokens" of the vision page's text: Anthropic's
/// table of the largest sizes that are not resized (1:1 1092x1092, 3:4 951x1268, 2:3
/// 896x1344, 9:16 819x1456, 1:2 784x1568) fits no pixel or w·h/750 budget. 951x1268 is
/// 1,205,868 px (1,608 tokens) and listed, while 1093x1093 (1,194,649 px, 1,593 tokens) would be
/// over, so every such budget either resizes a listed size or lets a larger square through.
/// Counting 28-px squares, as Anthropic's current vision page does, with the budget of 1,568
/// squares it gives for these models reproduces the table exactly: each listed size fits and
/// the next size of the same ratio does not (any budget from 1,568 to 1,589 would; the test
/// `anthropic_table_sizes_are_the_largest_not_resized` checks all five).
fn anthropic_fit(
    width: u32,
    height: u32,
    max_long_edge: u32,
    patch: u32,
    max_patches: u64,
) -> (u32, u32) {
    let patch = u64::from(patch.max(1));
    let fits = |w: u64, h: u64| {
        w.max(h) <= u64::from(max_long_edge) && w.div_ceil(patch) * h.div_ceil(patch) <= max_patches
    };
    let (w, h) = (u64::from(width), u64::from(height));
    if fits(w, h) {
        return (width, height);
    }
    let (long, short) = (w.max(h), w.min(h));
    // The short side for a long side of `l`, rounded half up, never below one pixel.
    let short_at = |l: u64| {
        ((u128::from(short) * u128::from(l) * 2 + u128::from(long)) / (2 * u128::from(long))).max(1)
            as u64
    };
    // Patches grow with the long side, so the largest long side that fits is found by
    // bisection; 1 px is the floor even when nothing fits (a zero budget in the table).
    let (mut lo, mut hi) = (1u64, long.min(u64::from(max_long_edge)).max(1));
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid, short_at(mid)) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let (l, s) = (lo as u32, short_at(lo) as u32);
    if width >= height {
        (l, s)
    } else {
        (s, l)
    }
}

/// Tiles for the Nova rule (see [`ImageTokenRule::NovaTile`]).
///
/// Amazon's image page lists approximate token counts for five sizes: 900x450 ~800, 900x900
/// ~1300, 1400x900 ~1800, 1800x900 ~2400, 1300x1300 ~2600. No pixel budget fits them (900x450
/// is 506 px a token, 1300x1300 650). Tiles of 448 px at 256 tokens, the sides' counts
/// rounded, and an overview tile for a grid of several, give 768, 1280, 1792, 2304 and 2560:
/// every listed size within 4 %, under it for all five (the figures are "approximate"; the
/// ledger books the usage Nova reports, this only sizes estimates and budget holds). Sizes
/// unlike the table's (very large or very elongated images) are guesses.
fn nova_tiles(width: u32, height: u32, tile: u32, min_long_edge: u32) -> u64 {
    let (w, h) = (f64::from(width), f64::from(height));
    let long = w.max(h);
    // Nova scales a small image up until a side reaches 896 px.
    let scale = if long > 0.0 && long < f64::from(min_long_edge) {
        f64::from(min_long_edge) / long
    } else {
        1.0
    };
    let tile = f64::from(tile.max(1));
    let count = |side: f64| ((side * scale / tile).round() as u64).max(1);
    let grid = count(w) * count(h);
    if grid > 1 {
        grid + 1
    } else {
        grid
    }
}

/// Rough text token count (≈4 characters per token) for prompts; good enough for reservations.
pub fn text_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// What an estimate assumes besides the image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EstimateParams {
    pub detail: Detail,
    /// Text tokens of the prompt sent with the image.
    pub prompt_tokens: u64,
    /// Output tokens expected (used for the cost estimate).
    pub expected_output_tokens: u64,
}

/// The prompt asking for the analysis object: here, so the browser, the CLI and the server
/// count the same prompt tokens.
pub const DEFAULT_PROMPT: &str = "Analyse this image. Answer with one JSON object and nothing else, with keys: \
\"description\" (one or two sentences), \"category\" (one word), \"tags\" (up to 10 lowercase strings), \
\"objects\" (visible objects, strings), \"text\" (visible text, empty string if none), \
\"quality_issues\" (strings such as \"blurry\", \"dark\", \"overexposed\"; empty if none).";

/// Output tokens a call may use at most (`max_tokens`), by default.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u32 = 400;

/// Tokens of the request around the prompt text (message framing, the JSON-mode instruction).
pub const PROMPT_OVERHEAD_TOKENS: u64 = 10;

/// Output tokens an analysis is expected to use (the estimate's output part).
pub const EXPECTED_OUTPUT_TOKENS: u64 = 250;

impl EstimateParams {
    /// The one rule for what an estimate assumes besides the image, for a prompt, an output
    /// cap and a detail level.
    pub fn for_prompt(prompt: &str, max_output_tokens: u32, detail: Detail) -> EstimateParams {
        EstimateParams {
            detail,
            prompt_tokens: text_tokens(prompt) + PROMPT_OVERHEAD_TOKENS,
            expected_output_tokens: EXPECTED_OUTPUT_TOKENS.min(u64::from(max_output_tokens)),
        }
    }
}

impl Default for EstimateParams {
    /// The defaults the server runs with: [`DEFAULT_PROMPT`], [`DEFAULT_MAX_OUTPUT_TOKENS`],
    /// high detail.
    fn default() -> Self {
        EstimateParams::for_prompt(DEFAULT_PROMPT, DEFAULT_MAX_OUTPUT_TOKENS, Detail::High)
    }
}

/// One embedding model: what an image and text cost, which dimensions it can return, and
/// whether its text vectors share the image space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingPrice {
    pub id: String,
    pub provider: String,
    /// Dimensions the model can return; the first is its default.
    pub dims: Vec<u32>,
    /// USD per image embedded.
    pub per_image_usd: f64,
    /// USD per 1,000 text tokens embedded.
    pub per_1k_text_tokens_usd: f64,
    /// Text queries land in the image space (a CLIP-style model). False for the offline
    /// embedder, whose text search falls back to keywords.
    pub understands_text: bool,
    /// The longest image edge the model accepts (the resized JPEG is scaled down to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_image_edge: Option<u32>,
    pub source: String,
    pub as_of: String,
}

impl EmbeddingPrice {
    pub fn default_dims(&self) -> u32 {
        self.dims.first().copied().unwrap_or(0)
    }

    /// What `images` images and `text_tokens` text tokens cost.
    pub fn cost_usd(&self, images: u64, text_tokens: u64) -> f64 {
        images as f64 * self.per_image_usd
            + text_tokens as f64 / 1000.0 * self.per_1k_text_tokens_usd
    }
}

/// One image generation model: USD per image by size and quality, and token prices where the
/// provider bills tokens (an answer's reported usage is then what is booked).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImagePrice {
    pub id: String,
    pub provider: String,
    /// `"WIDTHxHEIGHT:quality"` → USD per image (quality `low`, `medium` or `high`).
    pub prices: BTreeMap<String, f64>,
    /// USD per 1M text input tokens (the prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_input_per_mtok: Option<f64>,
    /// USD per 1M image output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_output_per_mtok: Option<f64>,
    pub source: String,
    pub as_of: String,
}

/// A parsed price key.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tier {
    width: u32,
    height: u32,
    quality: Quality,
    usd: f64,
}

fn parse_key(key: &str) -> Option<(u32, u32, Quality)> {
    let (size, quality) = key.split_once(':')?;
    let Size::Pixels { width, height } = Size::parse(size).ok()? else {
        return None;
    };
    let quality = Quality::parse(quality).ok()?;
    (quality != Quality::Auto).then_some((width, height, quality))
}

impl ImagePrice {
    fn tiers(&self) -> impl Iterator<Item = Tier> + '_ {
        self.prices.iter().filter_map(|(k, usd)| {
            parse_key(k).map(|(width, height, quality)| Tier {
                width,
                height,
                quality,
                usd: *usd,
            })
        })
    }

    /// The per-image price of one `size` at `quality`: the exact size, else the smallest listed
    /// size covering both sides (providers price "up to" a resolution). `auto` (size or quality)
    /// takes the dearest candidate: the provider picks, and an estimate must not fall short.
    pub fn per_image_usd(&self, size: Size, quality: Quality) -> Result<f64, PricingError> {
        let fits_quality = |t: &Tier| quality == Quality::Auto || t.quality == quality;
        let candidates: Vec<Tier> = match size {
            Size::Auto => self.tiers().filter(fits_quality).collect(),
            Size::Pixels { width, height } => {
                let exact: Vec<Tier> = self
                    .tiers()
                    .filter(|t| fits_quality(t) && t.width == width && t.height == height)
                    .collect();
                if !exact.is_empty() {
                    exact
                } else {
                    let covering: Vec<Tier> = self
                        .tiers()
                        .filter(|t| fits_quality(t) && t.width >= width && t.height >= height)
                        .collect();
                    // The smallest covering tier by area, then every quality of that tier.
                    let area_of = |t: &Tier| u64::from(t.width) * u64::from(t.height);
                    let area = covering.iter().map(area_of).min();
                    covering
                        .into_iter()
                        .filter(|t| Some(area_of(t)) == area)
                        .collect()
                }
            }
        };
        candidates
            .iter()
            .map(|t| t.usd)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
            .ok_or_else(|| PricingError::NoImagePrice {
                model: self.id.clone(),
                size: size.to_string(),
                quality: quality.to_string(),
            })
    }

    /// Whether answers are priced by their tokens (when they report them).
    pub fn bills_tokens(&self) -> bool {
        self.text_input_per_mtok.is_some() || self.image_output_per_mtok.is_some()
    }

    /// What one generated image cost: its reported tokens at the token prices when the model
    /// bills tokens and `usage` is known, else the per-image price of `size` and `quality`.
    pub fn cost_usd(
        &self,
        size: Size,
        quality: Quality,
        usage: Option<&Usage>,
    ) -> Result<f64, PricingError> {
        match usage {
            Some(u) if self.bills_tokens() => Ok(u.input_tokens as f64 / 1e6
                * self.text_input_per_mtok.unwrap_or(0.0)
                + u.output_tokens as f64 / 1e6 * self.image_output_per_mtok.unwrap_or(0.0)),
            _ => self.per_image_usd(size, quality),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TableFile {
    version: String,
    models: Vec<ModelPrice>,
    #[serde(default)]
    embedding_models: Vec<EmbeddingPrice>,
    #[serde(default)]
    image_models: Vec<ImagePrice>,
}

/// All known models, by id.
#[derive(Debug, Clone)]
pub struct PriceTable {
    version: String,
    models: BTreeMap<String, ModelPrice>,
    embedding_models: BTreeMap<String, EmbeddingPrice>,
    image_models: BTreeMap<String, ImagePrice>,
}

impl PriceTable {
    /// The table shipped with this build.
    pub fn builtin() -> &'static PriceTable {
        static TABLE: OnceLock<PriceTable> = OnceLock::new();
        TABLE.get_or_init(|| {
            // The builtin file is checked by a unit test; a broken one is a build bug, not input.
            #[allow(clippy::expect_used)]
            let file: TableFile =
                serde_json::from_str(BUILTIN_JSON).expect("builtin price table parses");
            #[allow(clippy::expect_used)]
            PriceTable::from_file(file).expect("builtin price table is valid")
        })
    }

    pub fn from_toml(text: &str) -> Result<PriceTable, PricingError> {
        PriceTable::from_file(toml::from_str(text)?)
    }

    fn from_file(file: TableFile) -> Result<PriceTable, PricingError> {
        let mut models = BTreeMap::new();
        for m in file.models {
            if models.contains_key(&m.id) {
                return Err(PricingError::Duplicate(m.id));
            }
            models.insert(m.id.clone(), m);
        }
        let mut embedding_models = BTreeMap::new();
        for m in file.embedding_models {
            if models.contains_key(&m.id) || embedding_models.contains_key(&m.id) {
                return Err(PricingError::Duplicate(m.id));
            }
            if m.dims.is_empty() {
                return Err(PricingError::NoDims(m.id));
            }
            embedding_models.insert(m.id.clone(), m);
        }
        let mut image_models = BTreeMap::new();
        for m in file.image_models {
            if models.contains_key(&m.id)
                || embedding_models.contains_key(&m.id)
                || image_models.contains_key(&m.id)
            {
                return Err(PricingError::Duplicate(m.id));
            }
            // A key that does not parse would be a price silently never used.
            if let Some(key) = m.prices.keys().find(|k| parse_key(k).is_none()) {
                return Err(PricingError::BadImagePriceKey {
                    model: m.id.clone(),
                    key: key.clone(),
                });
            }
            image_models.insert(m.id.clone(), m);
        }
        Ok(PriceTable {
            version: file.version,
            models,
            embedding_models,
            image_models,
        })
    }

    pub fn image_models(&self) -> impl Iterator<Item = &ImagePrice> {
        self.image_models.values()
    }

    pub fn image_model(&self, id: &str) -> Result<&ImagePrice, PricingError> {
        self.image_models
            .get(id)
            .ok_or_else(|| PricingError::UnknownModel {
                model: id.to_string(),
                known: self
                    .image_models
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn embedding_models(&self) -> impl Iterator<Item = &EmbeddingPrice> {
        self.embedding_models.values()
    }

    pub fn embedding_model(&self, id: &str) -> Result<&EmbeddingPrice, PricingError> {
        self.embedding_models
            .get(id)
            .ok_or_else(|| PricingError::UnknownModel {
                model: id.to_string(),
                known: self
                    .embedding_models
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn models(&self) -> impl Iterator<Item = &ModelPrice> {
        self.models.values()
    }

    pub fn model(&self, id: &str) -> Result<&ModelPrice, PricingError> {
        self.models
            .get(id)
            .ok_or_else(|| PricingError::UnknownModel {
                model: id.to_string(),
                known: self.models.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// Estimate tokens and cost of analysing one `width`×`height` image with `model`.
    pub fn estimate(
        &self,
        model: &str,
        width: u32,
        height: u32,
        params: &EstimateParams,
    ) -> Result<Estimate, PricingError> {
        let m = self.model(model)?;
        let image_tokens = m.image_tokens(width, height, params.detail);
        let input_tokens = image_tokens + params.prompt_tokens;
        let usage = Usage {
            input_tokens,
            output_tokens: params.expected_output_tokens,
            cached_tokens: 0,
        };
        Ok(Estimate {
            model: m.id.clone(),
            image_tokens,
            input_tokens,
            output_tokens: params.expected_output_tokens,
            tokens: input_tokens + params.expected_output_tokens,
            cost_usd: m.cost_usd(&usage),
            price_version: self.version.clone(),
        })
    }

    /// What the same estimate costs through the provider's batch API: its tokens at the
    /// model's batch prices (the CLI and the browser both show this figure).
    pub fn batch_cost_usd(&self, estimate: &Estimate) -> Result<f64, PricingError> {
        let m = self.model(&estimate.model)?;
        Ok(m.batch_cost_usd(&Usage {
            input_tokens: estimate.input_tokens,
            output_tokens: estimate.output_tokens,
            cached_tokens: 0,
        }))
    }
}

/// The table as `{version, models: [...]}`, each model as in `prices.toml` (`sightline models
/// --json` prints this).
impl Serialize for PriceTable {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct View<'a> {
            version: &'a str,
            models: Vec<&'a ModelPrice>,
            embedding_models: Vec<&'a EmbeddingPrice>,
            image_models: Vec<&'a ImagePrice>,
        }
        View {
            version: &self.version,
            models: self.models.values().collect(),
            embedding_models: self.embedding_models.values().collect(),
            image_models: self.image_models.values().collect(),
        }
        .serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_models_are_priced_per_image_and_per_thousand_text_tokens() {
        let table = PriceTable::builtin();
        let titan = table
            .embedding_model("amazon.titan-embed-image-v1")
            .unwrap();
        assert_eq!(titan.default_dims(), 1024);
        assert!(titan.understands_text);
        // 1,000 images and 2,000 text tokens.
        let cost = titan.cost_usd(1000, 2000);
        assert!(
            (cost - (1000.0 * titan.per_image_usd + 2.0 * titan.per_1k_text_tokens_usd)).abs()
                < 1e-12
        );
        let local = table
            .embedding_model(crate::embed::LOCAL_EMBED_MODEL)
            .unwrap();
        assert_eq!(local.cost_usd(1_000_000, 1_000_000), 0.0);
        assert!(!local.understands_text);
        assert_eq!(
            local.default_dims() as usize,
            crate::embed::LOCAL_EMBED_DIMS
        );
        assert!(
            table.model("amazon.titan-embed-image-v1").is_err(),
            "not a vision model"
        );
    }

    #[test]
    fn image_models_are_priced_by_size_and_quality_or_by_tokens() {
        let table = PriceTable::builtin();
        let px = |width, height| Size::Pixels { width, height };
        let g = table.image_model("gpt-image-1").unwrap();
        assert_eq!(
            g.per_image_usd(px(1024, 1024), Quality::Low).unwrap(),
            0.011
        );
        assert_eq!(
            g.per_image_usd(px(1536, 1024), Quality::High).unwrap(),
            0.25
        );
        // auto: the dearest candidate.
        assert_eq!(
            g.per_image_usd(px(1024, 1024), Quality::Auto).unwrap(),
            0.167
        );
        assert_eq!(g.per_image_usd(Size::Auto, Quality::Medium).unwrap(), 0.063);
        // A smaller size is priced at the smallest listed size covering it.
        assert_eq!(g.per_image_usd(px(512, 512), Quality::Low).unwrap(), 0.011);
        assert!(matches!(
            g.per_image_usd(px(4096, 4096), Quality::Low),
            Err(PricingError::NoImagePrice { .. })
        ));
        // Reported usage: text input tokens and image output tokens at their prices.
        let usage = Usage {
            input_tokens: 50,
            output_tokens: 4160,
            cached_tokens: 0,
        };
        let cost = g
            .cost_usd(px(1024, 1024), Quality::High, Some(&usage))
            .unwrap();
        assert!(
            (cost - (50.0 * 5.0 + 4160.0 * 40.0) / 1e6).abs() < 1e-12,
            "{cost}"
        );
        assert_eq!(
            g.cost_usd(px(1024, 1024), Quality::High, None).unwrap(),
            0.167
        );

        // Bedrock: per image only, by resolution tier; usage does not change it.
        let nova = table.image_model("amazon.nova-canvas-v1:0").unwrap();
        assert!(!nova.bills_tokens());
        assert_eq!(
            nova.per_image_usd(px(512, 512), Quality::Low).unwrap(),
            0.04
        );
        assert_eq!(
            nova.per_image_usd(px(1280, 720), Quality::High).unwrap(),
            0.08
        );
        assert_eq!(
            nova.cost_usd(px(1024, 1024), Quality::Medium, Some(&usage))
                .unwrap(),
            0.04
        );
        let local = table.image_model("local-canvas").unwrap();
        assert_eq!(
            local.cost_usd(px(4096, 2048), Quality::Auto, None).unwrap(),
            0.0
        );
        assert!(table.model("gpt-image-1").is_err(), "not a vision model");
        assert!(table.image_model("gpt-4.1").is_err());
    }

    #[test]
    fn an_image_price_key_that_does_not_parse_is_refused() {
        let text = r#"
version = "t"
models = []
[[image_models]]
id = "i"
provider = "p"
prices = { "1024:low" = 0.1 }
source = "s"
as_of = "2026-01-01"
"#;
        assert!(matches!(
            PriceTable::from_toml(text),
            Err(PricingError::BadImagePriceKey { .. })
        ));
    }

    #[test]
    fn an_embedding_model_without_dimensions_is_refused() {
        let text = r#"
version = "t"
models = []
[[embedding_models]]
id = "e"
provider = "p"
dims = []
per_image_usd = 0.0
per_1k_text_tokens_usd = 0.0
understands_text = true
source = "s"
as_of = "2026-01-01"
"#;
        assert!(matches!(
            PriceTable::from_toml(text),
            Err(PricingError::NoDims(_))
        ));
    }

    fn tokens(model: &str, w: u32, h: u32, detail: Detail) -> u64 {
        PriceTable::builtin()
            .model(model)
            .unwrap()
            .image_tokens(w, h, detail)
    }

    #[test]
    fn builtin_table_read_from_json_equals_prices_toml_to_the_bit() {
        let json = serde_json::to_value(PriceTable::builtin()).unwrap();
        let toml = serde_json::to_value(PriceTable::from_toml(BUILTIN_TABLE).unwrap()).unwrap();
        assert_eq!(json, toml);
        // serde_json's Value compares f64 by value: check the bits of every price too.
        let from_toml = PriceTable::from_toml(BUILTIN_TABLE).unwrap();
        for (a, b) in PriceTable::builtin().models().zip(from_toml.models()) {
            for (x, y) in [
                (a.input_per_mtok, b.input_per_mtok),
                (a.cached_input_per_mtok, b.cached_input_per_mtok),
                (a.output_per_mtok, b.output_per_mtok),
                (a.batch_input_per_mtok, b.batch_input_per_mtok),
                (a.batch_output_per_mtok, b.batch_output_per_mtok),
            ] {
                assert_eq!(x.to_bits(), y.to_bits(), "{}", a.id);
            }
            assert_eq!(a, b);
        }
        for (a, b) in PriceTable::builtin()
            .image_models()
            .zip(from_toml.image_models())
        {
            assert_eq!(a, b);
        }
        for (a, b) in PriceTable::builtin()
            .embedding_models()
            .zip(from_toml.embedding_models())
        {
            assert_eq!(a, b);
        }
    }

    #[test]
    fn builtin_table_has_required_models() {
        let t = PriceTable::builtin();
        for id in [
            "gpt-4.1",
            "gpt-4.1-mini",
            "gpt-4.1-nano",
            "gpt-4o",
            "gpt-4o-mini",
            "claude-sonnet-4-5",
            "claude-haiku-4-5",
            "gemini-2.5-flash",
            "gemini-2.5-pro",
        ] {
            let m = t.model(id).unwrap();
            assert!(m.source.starts_with("https://"), "{id} has a source");
            assert!(!m.as_of.is_empty());
            assert!(m.input_per_mtok > 0.0 && m.output_per_mtok > m.input_per_mtok);
        }
    }

    // OpenAI's published worked examples (vision guide, "Calculating costs").
    #[test]
    fn openai_tile_examples() {
        assert_eq!(tokens("gpt-4o", 1024, 1024, Detail::High), 765);
        assert_eq!(tokens("gpt-4o", 1024, 1024, Detail::Low), 85);
        assert_eq!(tokens("gpt-4o", 2048, 4096, Detail::High), 1105);
        assert_eq!(tokens("gpt-4o", 4096, 8192, Detail::Low), 85);
        assert_eq!(tokens("gpt-4.1", 1024, 1024, Detail::High), 765);
        // Small images are one tile: 85 + 170.
        assert_eq!(tokens("gpt-4o", 300, 200, Detail::High), 255);
        // gpt-4o-mini: 2833 base + 5667 per tile.
        assert_eq!(
            tokens("gpt-4o-mini", 1024, 1024, Detail::High),
            2833 + 4 * 5667
        );
    }

    #[test]
    fn openai_patch_examples() {
        // 1024×1024 → 32×32 = 1024 patches, × 1.62 for gpt-4.1-mini.
        assert_eq!(
            tokens("gpt-4.1-mini", 1024, 1024, Detail::High),
            (1024.0f64 * 1.62).ceil() as u64
        );
        // 1800×2400 is over budget → scaled to 33×44 = 1452 patches (OpenAI's example).
        assert_eq!(openai_patches(1800, 2400, 32, 1536), 1452);
        assert_eq!(
            tokens("gpt-4.1-nano", 1800, 2400, Detail::High),
            (1452.0f64 * 2.46).ceil() as u64
        );
        // Detail does not change the patch rule.
        assert_eq!(
            tokens("gpt-4.1-mini", 512, 512, Detail::Low),
            tokens("gpt-4.1-mini", 512, 512, Detail::High)
        );
    }

    // Anthropic's cost examples (vision page): 200x200 ≈ 54, 1000x1000 ≈ 1334, 1092x1092 ≈
    // 1590. 40000/750 = 53.3 and 1e6/750 = 1333.3: the page rounds up, so do we.
    #[test]
    fn anthropic_cost_examples_round_up() {
        assert_eq!(tokens("claude-sonnet-4-5", 200, 200, Detail::High), 54);
        assert_eq!(tokens("claude-sonnet-4-5", 1000, 1000, Detail::High), 1334);
        assert_eq!(tokens("claude-haiku-4-5", 1092, 1092, Detail::High), 1590);
    }

    /// Anthropic's table of the largest sizes per aspect ratio that are not resized.
    const ANTHROPIC_TABLE: [(u32, u32, u32, u32); 5] = [
        (1, 1, 1092, 1092),
        (3, 4, 951, 1268),
        (2, 3, 896, 1344),
        (9, 16, 819, 1456),
        (1, 2, 784, 1568),
    ];

    fn claude_fit(w: u32, h: u32) -> (u32, u32) {
        match &PriceTable::builtin()
            .model("claude-sonnet-4-5")
            .unwrap()
            .image
        {
            ImageTokenRule::Anthropic {
                max_long_edge,
                patch,
                max_patches,
                ..
            } => anthropic_fit(w, h, *max_long_edge, *patch, *max_patches),
            other => panic!("claude-sonnet-4-5 has rule {other:?}"),
        }
    }

    #[test]
    fn anthropic_table_sizes_are_the_largest_not_resized() {
        for (a, b, w, h) in ANTHROPIC_TABLE {
            let k = w / a;
            assert_eq!((a * k, b * k), (w, h), "{a}:{b} is exact");
            // Listed: not resized, in both orientations, billed at ⌈w·h/750⌉.
            assert_eq!(claude_fit(w, h), (w, h), "{w}x{h}");
            assert_eq!(claude_fit(h, w), (h, w), "{h}x{w}");
            let expect = (u64::from(w) * u64::from(h)).div_ceil(750);
            for id in ["claude-sonnet-4-5", "claude-haiku-4-5"] {
                assert_eq!(tokens(id, w, h, Detail::High), expect, "{id} {w}x{h}");
            }
            // The next size of the same ratio is resized.
            let (nw, nh) = (a * (k + 1), b * (k + 1));
            assert_ne!(claude_fit(nw, nh), (nw, nh), "{nw}x{nh} must be resized");
        }
        // The sizes the old 1.2 MP cap priced low are now whole: 951x1268 is 1608 tokens.
        assert_eq!(tokens("claude-sonnet-4-5", 951, 1268, Detail::High), 1608);
        assert_eq!(tokens("claude-sonnet-4-5", 896, 1344, Detail::High), 1606);
        assert_eq!(tokens("claude-sonnet-4-5", 784, 1568, Detail::High), 1640);
    }

    #[test]
    fn anthropic_large_images_scale_to_the_table_budget() {
        for (a, b, w, h) in ANTHROPIC_TABLE {
            let listed = (u64::from(w) * u64::from(h)).div_ceil(750);
            for n in [2, 3, 5] {
                // n× the listed size, both orientations.
                for (bw, bh) in [(w * n, h * n), (h * n, w * n)] {
                    let (fw, fh) = claude_fit(bw, bh);
                    // Aspect ratio kept to the rounding of one pixel.
                    let ratio = f64::from(bw) / f64::from(bh);
                    let got = f64::from(fw) / f64::from(fh);
                    assert!(
                        (got - ratio).abs() * f64::from(fw.min(fh)) <= 1.0,
                        "{bw}x{bh} -> {fw}x{fh}"
                    );
                    // As large as the budget allows: the listed size, or one pixel more where
                    // rounding the short side still fits (3:4 → 952x1269).
                    assert!(
                        fw.max(fh) >= w.max(h) && fw.max(fh) <= w.max(h) + 1,
                        "{a}:{b} {bw}x{bh} -> {fw}x{fh}"
                    );
                    let t = tokens("claude-sonnet-4-5", bw, bh, Detail::High);
                    assert!(
                        (listed..=listed + 3).contains(&t),
                        "{bw}x{bh}: {t} tokens, listed {listed}"
                    );
                }
            }
        }
        // A 12 MP phone photo (4032x3024, 4:3) is seen at 1269x952: 1611 tokens.
        assert_eq!(claude_fit(4032, 3024), (1269, 952));
        assert_eq!(tokens("claude-sonnet-4-5", 4032, 3024, Detail::High), 1611);
        // Only the long edge limits a long strip: 4000x500 → 1568x196.
        assert_eq!(claude_fit(4000, 500), (1568, 196));
        // Extreme strips keep one pixel, never zero.
        assert_eq!(claude_fit(100_000, 10), (1568, 1));
        assert!(tokens("claude-haiku-4-5", 10, 100_000, Detail::High) > 0);
    }

    #[test]
    fn gemini_examples() {
        assert_eq!(tokens("gemini-2.5-flash", 384, 384, Detail::High), 258);
        assert_eq!(tokens("gemini-2.5-flash", 768, 768, Detail::High), 258);
        assert_eq!(tokens("gemini-2.5-pro", 1024, 768, Detail::High), 516);
        assert_eq!(tokens("gemini-2.5-pro", 1536, 1536, Detail::High), 1032);
    }

    /// Amazon's table of approximate counts (Nova image understanding page).
    #[test]
    fn nova_tiles_stay_within_four_percent_of_amazons_table() {
        for (w, h, approx) in [
            (900, 450, 800.0),
            (900, 900, 1300.0),
            (1400, 900, 1800.0),
            (1800, 900, 2400.0),
            (1300, 1300, 2600.0),
        ] {
            for id in ["amazon.nova-lite-v1:0", "us.amazon.nova-pro-v1:0"] {
                for (a, b) in [(w, h), (h, w)] {
                    let t = tokens(id, a, b, Detail::High) as f64;
                    assert!(
                        (t - approx).abs() / approx <= 0.04,
                        "{id} {a}x{b}: {t} vs ~{approx}"
                    );
                }
            }
        }
        // A small image is scaled up to 896 px first; one tile has no overview.
        assert_eq!(
            tokens("amazon.nova-lite-v1:0", 400, 300, Detail::High),
            tokens("amazon.nova-lite-v1:0", 896, 672, Detail::High)
        );
        assert_eq!(nova_tiles(448, 448, 448, 0), 1);
        assert_eq!(nova_tiles(10, 100_000, 448, 896), 224);
        assert_eq!(nova_tiles(0, 0, 448, 896), 1);
        // Nova ignores detail.
        assert_eq!(
            tokens("amazon.nova-pro-v1:0", 1024, 768, Detail::Low),
            tokens("amazon.nova-pro-v1:0", 1024, 768, Detail::High)
        );
    }

    #[test]
    fn bedrock_models_are_priced_and_claude_keeps_its_image_rule() {
        let t = PriceTable::builtin();
        let bedrock: Vec<&ModelPrice> = t.models().filter(|m| m.provider == "bedrock").collect();
        assert!(bedrock.len() >= 4);
        for m in &bedrock {
            assert!(m.source.starts_with("https://"), "{}", m.id);
            assert!(m.output_per_mtok > m.input_per_mtok, "{}", m.id);
            assert!(m.batch_input_per_mtok < m.input_per_mtok, "{}", m.id);
            assert!(!m.reads_detail(), "{}", m.id);
        }
        // A regional profile costs 10 % more than the global one; the image rule is Claude's.
        let global = t
            .model("global.anthropic.claude-haiku-4-5-20251001-v1:0")
            .unwrap();
        let us = t
            .model("us.anthropic.claude-haiku-4-5-20251001-v1:0")
            .unwrap();
        assert!((us.input_per_mtok - 1.1 * global.input_per_mtok).abs() < 1e-9);
        assert!((us.output_per_mtok - 1.1 * global.output_per_mtok).abs() < 1e-9);
        assert_eq!(global.image, t.model("claude-haiku-4-5").unwrap().image);
        assert_eq!(
            tokens(
                "global.anthropic.claude-haiku-4-5-20251001-v1:0",
                1000,
                1000,
                Detail::High
            ),
            1334
        );
    }

    #[test]
    fn cost_uses_cached_and_output_prices() {
        let m = PriceTable::builtin().model("gpt-4o").unwrap();
        let usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            cached_tokens: 500_000,
        };
        let expected = 0.5 * 2.5 + 0.5 * 1.25 + 10.0;
        assert!((m.cost_usd(&usage) - expected).abs() < 1e-9);
        assert!((m.batch_cost_usd(&usage) - (1.25 + 5.0)).abs() < 1e-9);
    }

    #[test]
    fn estimate_includes_prompt_and_expected_output() {
        let t = PriceTable::builtin();
        let params = EstimateParams::default();
        // The default prompt's text plus the request overhead.
        let prompt = text_tokens(DEFAULT_PROMPT) + PROMPT_OVERHEAD_TOKENS;
        assert_eq!(params.prompt_tokens, prompt);
        let e = t.estimate("gpt-4o", 1024, 1024, &params).unwrap();
        assert_eq!(e.image_tokens, 765);
        assert_eq!(e.input_tokens, 765 + prompt);
        assert_eq!(e.tokens, 765 + prompt + 250);
        let expected = ((765 + prompt) as f64 * 2.5 + 250.0 * 10.0) / 1e6;
        assert!((e.cost_usd - expected).abs() < 1e-12);
        assert_eq!(e.price_version, t.version());
    }

    #[test]
    fn batch_cost_prices_the_same_tokens_at_batch_rates() {
        let t = PriceTable::builtin();
        let params = EstimateParams::default();
        for m in t.models() {
            let e = t.estimate(&m.id, 768, 1024, &params).unwrap();
            let batch = t.batch_cost_usd(&e).unwrap();
            let expected = (e.input_tokens as f64 * m.batch_input_per_mtok
                + e.output_tokens as f64 * m.batch_output_per_mtok)
                / 1e6;
            assert_eq!(batch, expected, "{}", m.id);
            assert!(
                batch > 0.0 && batch < e.cost_usd,
                "{}: batch is cheaper",
                m.id
            );
        }
    }

    #[test]
    fn the_table_serializes_with_every_price_and_rule() {
        let t = PriceTable::builtin();
        let v = serde_json::to_value(t).unwrap();
        assert_eq!(v["version"], t.version());
        let models = v["models"].as_array().unwrap();
        assert_eq!(models.len(), t.models().count());
        let claude = models
            .iter()
            .find(|m| m["id"] == "claude-haiku-4-5")
            .unwrap();
        for key in [
            "provider",
            "input_per_mtok",
            "cached_input_per_mtok",
            "output_per_mtok",
            "batch_input_per_mtok",
            "batch_output_per_mtok",
            "source",
            "as_of",
        ] {
            assert!(!claude[key].is_null(), "{key}");
        }
        assert_eq!(claude["image"]["rule"], "anthropic");
        for (m, v) in t.models().zip(models) {
            assert_eq!(v["image"]["rule"], m.image.name(), "{}", m.id);
        }
        assert_eq!(claude["image"]["max_patches"], 1568);
        // What it prints parses back into the same table.
        let back: TableFile = serde_json::from_value(v).unwrap();
        assert_eq!(back.models.len(), t.models().count());
    }

    #[test]
    fn unknown_model_lists_known_ones() {
        let err = PriceTable::builtin()
            .model("gpt-99")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpt-99") && err.contains("gpt-4o"), "{err}");
    }

    #[test]
    fn duplicate_models_are_rejected() {
        let text = format!(
            "{BUILTIN_TABLE}\n{}",
            &BUILTIN_TABLE[BUILTIN_TABLE.find("[[models]]").unwrap()..]
        );
        assert!(matches!(
            PriceTable::from_toml(&text),
            Err(PricingError::Duplicate(_))
        ));
    }

    #[test]
    fn patch_rule_never_prices_a_thin_image_at_zero() {
        for (w, h) in [(10, 100_000), (20, 60_000), (1, 65_535), (65_535, 3)] {
            let p = openai_patches(w, h, 32, 1536);
            assert!((1..=1536).contains(&p), "{w}x{h}: {p}");
        }
        assert!(tokens("gpt-4.1-mini", 10, 100_000, Detail::High) > 0);
    }
}
