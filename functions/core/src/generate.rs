//! Generation jobs, the pure part: templates, rows, and the requests they become.
//!
//! A job is a template plus rows. Templates are `{name}`-style strings kept in a
//! `templates.toml` file ([`TemplateSet::from_toml`]) or sent inline ([`TemplateSet::inline`]);
//! rows come from a CSV whose header names the variables ([`parse_csv_rows`]) or from a JSON
//! array of objects ([`parse_json_rows`]). [`plan`] turns them into [`GenerationRequest`]s,
//! one per row, and refuses the whole job, with row numbers, when any row is wrong: nothing is
//! paid for a job that would fail half way.
//!
//! # Rows
//!
//! Row numbers are 1-based and count data rows only (the CSV header is not a row; wholly blank
//! CSV lines are skipped and not counted). Values are trimmed, and an empty value is no value:
//! a template variable whose cell is empty is a missing variable.
//!
//! Columns (or JSON keys) starting with `_` are per-row settings, not variables:
//! `_template` (a template name from the set), `_model`, `_size`, `_quality`,
//! `_output_format` and `_seed`. An empty setting cell keeps the template's value. Any other
//! `_` name is refused, so a typo such as `_sead` cannot be silently ignored. Template
//! variables therefore cannot start with `_`.
//!
//! # templates.toml
//!
//! ```toml
//! # Optional: the template used by rows that name none (a file with one template needs none).
//! default = "product_hero"
//!
//! # Optional: settings every template starts from.
//! [defaults]
//! model = "gpt-image-1"
//! size = "1024x1024"        # "auto" or WIDTHxHEIGHT, each 64..=4096
//! quality = "high"          # low | medium | high | auto
//! output_format = "png"     # png | jpeg | webp
//!
//! [templates.product_hero]
//! prompt = "A studio photo of {product} on a {background} background"
//! output_key = "products/{sku}.png"   # optional; rendered per row, must stay a relative key
//! size = "1536x1024"                  # overrides [defaults]
//! seed = 7                            # optional
//! ```
//!
//! A template must end up with a `prompt` and a `model`; `size`, `quality` and
//! `output_format` fall back to `1024x1024`, `auto` and `png`. Unknown keys are refused.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Most rows one job may have: a bigger run is split by the caller into several jobs, so one
/// mistake cannot queue an unbounded bill and the whole plan stays small enough to hold.
pub const MAX_ROWS: usize = 10_000;
/// Longest rendered prompt, in characters (gpt-image-1 accepts 32,000; smaller models less,
/// which their providers check).
pub const MAX_PROMPT_CHARS: usize = 32_000;
/// Errors collected before giving up: enough to fix a file in one go, not a wall of text.
pub const MAX_ERRORS: usize = 100;
/// Longest rendered output key, in bytes (S3's limit for an object key).
pub const MAX_OUTPUT_KEY_BYTES: usize = 1024;
/// Smallest and largest width or height accepted in a `WIDTHxHEIGHT` size.
pub const MIN_SIDE: u32 = 64;
pub const MAX_SIDE: u32 = 4096;

/// Name given to the template of [`TemplateSet::inline`].
pub const INLINE_TEMPLATE: &str = "inline";

// ---------------------------------------------------------------------------------------------
// Templates
// ---------------------------------------------------------------------------------------------

/// Why a template string cannot be parsed or rendered. Byte offsets point into the template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{{` at byte {at} is never closed (write `{{{{` for a literal brace)")]
    Unclosed { at: usize },
    #[error("`}}` at byte {at} closes nothing (write `}}}}` for a literal brace)")]
    StrayClose { at: usize },
    #[error("`{{{name}}}` at byte {at} is not a variable name: {why}")]
    BadName {
        name: String,
        at: usize,
        why: &'static str,
    },
    #[error("{}", missing_message(.names))]
    Missing { names: Vec<String> },
}

fn missing_message(names: &[String]) -> String {
    let list = names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let s = if names.len() == 1 { "" } else { "s" };
    format!("missing variable{s} {list}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(String),
}

/// A parsed `{name}` template. `{{` and `}}` stand for literal braces. A name is the trimmed
/// text between the braces: any characters but braces and control characters, not starting
/// with `_` (those are row settings), so spreadsheet headers such as `Product Name` work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

/// Where a template looks its variables up.
pub trait Vars {
    fn var(&self, name: &str) -> Option<&str>;
}

impl Vars for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl<S: std::hash::BuildHasher> Vars for HashMap<String, String, S> {
    fn var(&self, name: &str) -> Option<&str> {
        self.get(name).map(String::as_str)
    }
}

impl Template {
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = source.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => return Err(TemplateError::StrayClose { at }),
                '{' => {
                    let mut raw = String::new();
                    let mut closed = false;
                    for (_, n) in chars.by_ref() {
                        match n {
                            '}' => {
                                closed = true;
                                break;
                            }
                            '{' => return Err(TemplateError::Unclosed { at }),
                            _ => raw.push(n),
                        }
                    }
                    if !closed {
                        return Err(TemplateError::Unclosed { at });
                    }
                    let name = check_var_name(&raw).map_err(|why| TemplateError::BadName {
                        name: raw.clone(),
                        at,
                        why,
                    })?;
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(Part::Var(name.to_string()));
                }
                _ => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template {
            source: source.to_string(),
            parts,
        })
    }

    /// The template as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every variable the template uses, once each, sorted.
    pub fn variables(&self) -> BTreeSet<&str> {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Var(v) => Some(v.as_str()),
                Part::Text(_) => None,
            })
            .collect()
    }

    /// Fill every `{name}`; all missing names are reported together (sorted), so one pass
    /// over a file finds every gap in a row.
    pub fn render<V: Vars + ?Sized>(&self, vars: &V) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(self.source.len());
        let mut missing = BTreeSet::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(name) => match vars.var(name) {
                    Some(v) => out.push_str(v),
                    None => {
                        missing.insert(name.clone());
                    }
                },
            }
        }
        if missing.is_empty() {
            Ok(out)
        } else {
            Err(TemplateError::Missing {
                names: missing.into_iter().collect(),
            })
        }
    }
}

fn check_var_name(raw: &str) -> Result<&str, &'static str> {
    let name = raw.trim();
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.starts_with('_') {
        return Err("names starting with `_` are reserved for row settings");
    }
    if name.chars().any(char::is_control) {
        return Err("it holds a control character");
    }
    Ok(name)
}

// ---------------------------------------------------------------------------------------------
// Settings: size, quality, output format
// ---------------------------------------------------------------------------------------------

/// The requested image size: `auto` (the provider picks) or `WIDTHxHEIGHT`. Which sizes a
/// given model accepts is the provider's check; this one only refuses nonsense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Size {
    Auto,
    Pixels { width: u32, height: u32 },
}

impl Size {
    /// `auto`, or `WIDTHxHEIGHT` (`x` or `X`) with each side in [`MIN_SIDE`]..=[`MAX_SIDE`].
    pub fn parse(s: &str) -> Result<Size, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Size::Auto);
        }
        let bad = || format!("{s:?} is not `auto` or WIDTHxHEIGHT such as 1024x1024");
        let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
        let side = |v: &str| -> Result<u32, String> {
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let n: u32 = v.parse().map_err(|_| bad())?;
            if (MIN_SIDE..=MAX_SIDE).contains(&n) {
                Ok(n)
            } else {
                Err(format!(
                    "{s:?}: each side must be {MIN_SIDE} to {MAX_SIDE} pixels"
                ))
            }
        };
        Ok(Size::Pixels {
            width: side(w)?,
            height: side(h)?,
        })
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Auto => f.write_str("auto"),
            Size::Pixels { width, height } => write!(f, "{width}x{height}"),
        }
    }
}

impl TryFrom<String> for Size {
    type Error = String;
    fn try_from(s: String) -> Result<Size, String> {
        Size::parse(&s)
    }
}

impl From<Size> for String {
    fn from(s: Size) -> String {
        s.to_string()
    }
}

/// Rendering quality asked of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    Low,
    Medium,
    High,
    Auto,
}

impl Quality {
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Low => "low",
            Quality::Medium => "medium",
            Quality::High => "high",
            Quality::Auto => "auto",
        }
    }

    /// `low`, `medium`, `high` or `auto`, any case.
    pub fn parse(s: &str) -> Result<Quality, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "low" => Ok(Quality::Low),
            "medium" => Ok(Quality::Medium),
            "high" => Ok(Quality::High),
            "auto" => Ok(Quality::Auto),
            _ => Err(format!("{s:?} is not low, medium, high or auto")),
        }
    }
}

impl fmt::Display for Quality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Encoding of the generated image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    /// `png`, `jpeg` (or `jpg`) or `webp`, any case.
    pub fn parse(s: &str) -> Result<OutputFormat, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "png" => Ok(OutputFormat::Png),
            "jpeg" | "jpg" => Ok(OutputFormat::Jpeg),
            "webp" => Ok(OutputFormat::Webp),
            _ => Err(format!("{s:?} is not png, jpeg or webp")),
        }
    }
}

impl fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn parse_seed(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?} is not a whole number from 0"));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is larger than {}", u64::MAX))
}

// ---------------------------------------------------------------------------------------------
// Template sets (templates.toml, inline)
// ---------------------------------------------------------------------------------------------

/// One template as written in `templates.toml` (a `[templates.NAME]` table or `[defaults]`) or
/// sent inline in a request body. Every field is optional here; [`TemplateSet`] fills the
/// gaps from `[defaults]` and the built-in defaults and checks the result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplatesFile {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    defaults: TemplateSpec,
    #[serde(default)]
    templates: BTreeMap<String, TemplateSpec>,
}

/// A template with every setting decided.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationTemplate {
    pub name: String,
    pub prompt: Template,
    pub model: String,
    pub size: Size,
    pub quality: Quality,
    pub output_format: OutputFormat,
    pub seed: Option<u64>,
    pub output_key: Option<Template>,
}

/// Why a templates file or an inline template is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateFileError {
    #[error("templates file: {0}")]
    Toml(String),
    #[error("templates file names no template")]
    NoTemplates,
    #[error("template name {name:?}: use letters, digits, `_` and `-`")]
    BadName { name: String },
    #[error("default template `{name}` is not in the file")]
    UnknownDefault { name: String },
    #[error("template `{name}` has no prompt")]
    NoPrompt { name: String },
    #[error("template `{name}` has no model (set `model` in it or in [defaults])")]
    NoModel { name: String },
    #[error("template `{name}`, {field}: {error}")]
    Template {
        name: String,
        field: &'static str,
        error: TemplateError,
    },
    #[error("template `{name}`, {field}: {message}")]
    Setting {
        name: String,
        field: &'static str,
        message: String,
    },
}

impl GenerationTemplate {
    /// Settle `spec` over `defaults` over the built-in defaults, parse both templates and
    /// check every setting.
    pub fn from_spec(
        name: &str,
        spec: &TemplateSpec,
        defaults: &TemplateSpec,
    ) -> Result<GenerationTemplate, TemplateFileError> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(TemplateFileError::BadName {
                name: name.to_string(),
            });
        }
        let pick = |a: &Option<String>, b: &Option<String>| a.clone().or_else(|| b.clone());
        let setting = |field: &'static str, message: String| TemplateFileError::Setting {
            name: name.to_string(),
            field,
            message,
        };
        let template = |field: &'static str, error: TemplateError| TemplateFileError::Template {
            name: name.to_string(),
            field,
            error,
        };
        let prompt = pick(&spec.prompt, &defaults.prompt).ok_or(TemplateFileError::NoPrompt {
            name: name.to_string(),
        })?;
        let prompt = Template::parse(&prompt).map_err(|e| template("prompt", e))?;
        let model = pick(&spec.model, &defaults.model)
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .ok_or(TemplateFileError::NoModel {
                name: name.to_string(),
            })?;
        let size = match pick(&spec.size, &defaults.size) {
            Some(s) => Size::parse(&s).map_err(|m| setting("size", m))?,
            None => Size::Pixels {
                width: 1024,
                height: 1024,
            },
        };
        let quality = match pick(&spec.quality, &defaults.quality) {
            Some(q) => Quality::parse(&q).map_err(|m| setting("quality", m))?,
            None => Quality::Auto,
        };
        let output_format = match pick(&spec.output_format, &defaults.output_format) {
            Some(f) => OutputFormat::parse(&f).map_err(|m| setting("output_format", m))?,
            None => OutputFormat::Png,
        };
        let output_key = pick(&spec.output_key, &defaults.output_key)
            .map(|k| Template::parse(&k))
            .transpose()
            .map_err(|e| template("output_key", e))?;
        Ok(GenerationTemplate {
            name: name.to_string(),
            prompt,
            model,
            size,
            quality,
            output_format,
            seed: spec.seed.or(defaults.seed),
            output_key,
        })
    }
}

/// The templates a job may use, and which one rows without `_template` get.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateSet {
    templates: BTreeMap<String, GenerationTemplate>,
    default: Option<String>,
}

impl TemplateSet {
    /// Parse a `templates.toml` (format in the module docs). Every template is checked now,
    /// so a broken one is found when the file is loaded, not when a row first names it.
    pub fn from_toml(text: &str) -> Result<TemplateSet, TemplateFileError> {
        let file: TemplatesFile =
            toml::from_str(text).map_err(|e| TemplateFileError::Toml(e.to_string()))?;
        if file.templates.is_empty() {
            return Err(TemplateFileError::NoTemplates);
        }
        let mut templates = BTreeMap::new();
        for (name, spec) in &file.templates {
            templates.insert(
                name.clone(),
                GenerationTemplate::from_spec(name, spec, &file.defaults)?,
            );
        }
        let default = match file.default {
            Some(name) if templates.contains_key(&name) => Some(name),
            Some(name) => return Err(TemplateFileError::UnknownDefault { name }),
            None if templates.len() == 1 => templates.keys().next().cloned(),
            None => None,
        };
        Ok(TemplateSet { templates, default })
    }

    /// A set of one template sent with the job, named [`INLINE_TEMPLATE`] and used by every row.
    pub fn inline(spec: &TemplateSpec) -> Result<TemplateSet, TemplateFileError> {
        let t = GenerationTemplate::from_spec(INLINE_TEMPLATE, spec, &TemplateSpec::default())?;
        Ok(TemplateSet {
            templates: BTreeMap::from([(INLINE_TEMPLATE.to_string(), t)]),
            default: Some(INLINE_TEMPLATE.to_string()),
        })
    }

    pub fn get(&self, name: &str) -> Option<&GenerationTemplate> {
        self.templates.get(name)
    }

    /// Template names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.templates.keys().map(String::as_str)
    }

    /// The template rows get when neither they nor the job name one.
    pub fn default_name(&self) -> Option<&str> {
        self.default.as_deref()
    }
}

// ---------------------------------------------------------------------------------------------
// Errors with row numbers
// ---------------------------------------------------------------------------------------------

/// What is wrong with a job, a row or a cell.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobErrorKind {
    #[error("{}", missing_message(.names))]
    MissingVariables { names: Vec<String> },
    #[error("the row is empty")]
    EmptyRow,
    #[error("unknown template `{name}`")]
    UnknownTemplate { name: String },
    #[error("no template: name one with `_template` or choose one for the job")]
    NoTemplate,
    #[error("{0}")]
    BadSize(String),
    #[error("{0}")]
    BadQuality(String),
    #[error("{0}")]
    BadOutputFormat(String),
    #[error("seed {0}")]
    BadSeed(String),
    #[error("more than {max} rows; split the job")]
    TooManyRows { max: usize },
    #[error("the job has no rows")]
    NoRows,
    #[error("the prompt is {chars} characters, more than {max}")]
    PromptTooLong { chars: usize, max: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("output key {key:?} is unsafe: {why}")]
    UnsafeOutputKey { key: String, why: &'static str },
    #[error("output key {key:?} is also row {first_row}'s, for a different image")]
    DuplicateOutputKey { key: String, first_row: usize },
    #[error("{found} fields where the header has {expected}")]
    FieldCount { expected: usize, found: usize },
    #[error("not UTF-8 text")]
    NotUtf8,
    #[error("unknown row setting; settings are {}", ROW_SETTINGS.join(", "))]
    UnknownSetting,
    #[error("the column name appears twice")]
    DuplicateColumn,
    #[error("a column has no name")]
    EmptyColumnName,
    #[error("a {0} is not a row value (use a string or a number)")]
    UnsupportedValue(&'static str),
    #[error("a row must be a JSON object")]
    NotAnObject,
    #[error("rows must be a JSON array of objects")]
    NotAnArray,
    #[error("not JSON: {0}")]
    Json(String),
    #[error("CSV: {0}")]
    Csv(String),
}

/// One problem, placed: `row` is the 1-based data row (None for the job as a whole or the
/// header), `column` the variable, setting or header cell it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub row: Option<usize>,
    pub column: Option<String>,
    pub kind: JobErrorKind,
}

impl JobError {
    fn at(row: usize, kind: JobErrorKind) -> JobError {
        JobError {
            row: Some(row),
            column: None,
            kind,
        }
    }

    fn cell(row: Option<usize>, column: &str, kind: JobErrorKind) -> JobError {
        JobError {
            row,
            column: Some(column.to_string()),
            kind,
        }
    }

    fn job(kind: JobErrorKind) -> JobError {
        JobError {
            row: None,
            column: None,
            kind,
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.row, &self.column) {
            (Some(r), Some(c)) => write!(f, "row {r}, `{c}`: {}", self.kind),
            (Some(r), None) => write!(f, "row {r}: {}", self.kind),
            (None, Some(c)) => write!(f, "column `{c}`: {}", self.kind),
            (None, None) => write!(f, "{}", self.kind),
        }
    }
}

impl std::error::Error for JobError {}

/// Every problem found in a job (up to [`Limits::max_errors`]; `truncated` says there were
/// more). A job with any error is refused whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobErrors {
    pub errors: Vec<JobError>,
    pub truncated: bool,
}

impl fmt::Display for JobErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "{n}{} problem{} in the job",
            if self.truncated { "+" } else { "" },
            if n == 1 && !self.truncated { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        if self.truncated {
            write!(f, "\n  (more not shown)")?;
        }
        Ok(())
    }
}

impl std::error::Error for JobErrors {}

/// Collects errors up to a cap; `full()` tells a loop to stop looking.
struct Collector {
    errors: Vec<JobError>,
    max: usize,
    truncated: bool,
}

impl Collector {
    fn new(max: usize) -> Collector {
        Collector {
            errors: Vec::new(),
            max: max.max(1),
            truncated: false,
        }
    }

    fn push(&mut self, e: JobError) {
        if self.errors.len() < self.max {
            self.errors.push(e);
        } else {
            self.truncated = true;
        }
    }

    fn full(&self) -> bool {
        self.errors.len() >= self.max
    }

    fn finish<T>(self, ok: T) -> Result<T, JobErrors> {
        if self.errors.is_empty() {
            Ok(ok)
        } else {
            Err(JobErrors {
                errors: self.errors,
                truncated: self.truncated,
            })
        }
    }
}

/// The caps of a job; [`Default`] is the production set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_rows: usize,
    pub max_prompt_chars: usize,
    pub max_errors: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_rows: MAX_ROWS,
            max_prompt_chars: MAX_PROMPT_CHARS,
            max_errors: MAX_ERRORS,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------

/// Row settings: columns or keys that steer a row instead of filling a variable.
pub const ROW_SETTINGS: [&str; 6] = [
    "_template",
    "_model",
    "_size",
    "_quality",
    "_output_format",
    "_seed",
];

/// One data row: its 1-based number and its non-empty values, trimmed, by column name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub number: usize,
    pub values: BTreeMap<String, String>,
}

/// Check a column or key name: trimmed, non-empty, and a known setting if it starts with `_`.
fn column_name(raw: &str, row: Option<usize>) -> Result<String, JobError> {
    let name = raw.trim();
    if name.is_empty() {
        return Err(JobError {
            row,
            column: None,
            kind: JobErrorKind::EmptyColumnName,
        });
    }
    if name.starts_with('_') && !ROW_SETTINGS.contains(&name) {
        return Err(JobError::cell(row, name, JobErrorKind::UnknownSetting));
    }
    Ok(name.to_string())
}

/// Rows of a CSV whose first record names the columns. A UTF-8 byte-order mark is skipped
/// (spreadsheets write one). Every row must have as many fields as the header; a row whose
/// cells are all empty is refused; each problem carries its row number.
pub fn parse_csv_rows(input: &[u8], limits: &Limits) -> Result<Vec<Row>, JobErrors> {
    let input = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
    let mut out = Collector::new(limits.max_errors);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(input);
    let mut records = reader.byte_records();

    let header = match records.next() {
        Some(Ok(h)) => h,
        Some(Err(e)) => {
            out.push(JobError::job(JobErrorKind::Csv(e.to_string())));
            return out.finish(Vec::new());
        }
        None => {
            out.push(JobError::job(JobErrorKind::NoRows));
            return out.finish(Vec::new());
        }
    };
    let mut columns = Vec::with_capacity(header.len());
    let mut seen = BTreeSet::new();
    for raw in header.iter() {
        let Ok(raw) = std::str::from_utf8(raw) else {
            out.push(JobError::job(JobErrorKind::NotUtf8));
            continue;
        };
        match column_name(raw, None) {
            Ok(name) if !seen.insert(name.clone()) => {
                out.push(JobError::cell(None, &name, JobErrorKind::DuplicateColumn))
            }
            Ok(name) => columns.push(name),
            Err(e) => out.push(e),
        }
    }
    if !out.errors.is_empty() {
        return out.finish(Vec::new());
    }

    let mut rows = Vec::new();
    for (i, record) in records.enumerate() {
        let number = i + 1;
        if number > limits.max_rows {
            out.push(JobError::at(
                number,
                JobErrorKind::TooManyRows {
                    max: limits.max_rows,
                },
            ));
            break;
        }
        if out.full() {
            out.truncated = true;
            break;
        }
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                out.push(JobError::at(number, JobErrorKind::Csv(e.to_string())));
                continue;
            }
        };
        if record.len() != columns.len() {
            out.push(JobError::at(
                number,
                JobErrorKind::FieldCount {
                    expected: columns.len(),
                    found: record.len(),
                },
            ));
            continue;
        }
        let mut values = BTreeMap::new();
        for (column, raw) in columns.iter().zip(record.iter()) {
            match std::str::from_utf8(raw) {
                Ok(v) if !v.trim().is_empty() => {
                    values.insert(column.clone(), v.trim().to_string());
                }
                Ok(_) => {}
                Err(_) => out.push(JobError::cell(Some(number), column, JobErrorKind::NotUtf8)),
            }
        }
        rows.push(Row { number, values });
    }
    if rows.is_empty() && out.errors.is_empty() {
        out.push(JobError::job(JobErrorKind::NoRows));
    }
    out.finish(rows)
}

/// Rows of a JSON array of flat objects. Values are strings or numbers (numbers keep their
/// JSON spelling); `null` is no value; booleans, arrays and objects are refused, naming the
/// row and key.
pub fn parse_json_rows(input: &[u8], limits: &Limits) -> Result<Vec<Row>, JobErrors> {
    let mut out = Collector::new(limits.max_errors);
    let value: serde_json::Value = match serde_json::from_slice(input) {
        Ok(v) => v,
        Err(e) => {
            out.push(JobError::job(JobErrorKind::Json(e.to_string())));
            return out.finish(Vec::new());
        }
    };
    let serde_json::Value::Array(items) = value else {
        out.push(JobError::job(JobErrorKind::NotAnArray));
        return out.finish(Vec::new());
    };
    if items.is_empty() {
        out.push(JobError::job(JobErrorKind::NoRows));
    }
    let mut rows = Vec::with_capacity(items.len().min(limits.max_rows));
    for (i, item) in items.into_iter().enumerate() {
        let number = i + 1;
        if number > limits.max_rows {
            out.push(JobError::at(
                number,
                JobErrorKind::TooManyRows {
                    max: limits.max_rows,
                },
            ));
            break;
        }
        if out.full() {
            out.truncated = true;
            break;
        }
        let serde_json::Value::Object(object) = item else {
            out.push(JobError::at(number, JobErrorKind::NotAnObject));
            continue;
        };
        let mut values = BTreeMap::new();
        for (key, value) in object {
            let name = match column_name(&key, Some(number)) {
                Ok(n) => n,
                Err(e) => {
                    out.push(e);
                    continue;
                }
            };
            let text = match value {
                serde_json::Value::String(s) => s.trim().to_string(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Null => continue,
                serde_json::Value::Bool(_) => {
                    out.push(JobError::cell(
                        Some(number),
                        &name,
                        JobErrorKind::UnsupportedValue("boolean"),
                    ));
                    continue;
                }
                serde_json::Value::Array(_) => {
                    out.push(JobError::cell(
                        Some(number),
                        &name,
                        JobErrorKind::UnsupportedValue("list"),
                    ));
                    continue;
                }
                serde_json::Value::Object(_) => {
                    out.push(JobError::cell(
                        Some(number),
                        &name,
                        JobErrorKind::UnsupportedValue("object"),
                    ));
                    continue;
                }
            };
            if text.is_empty() {
                continue;
            }
            if values.insert(name.clone(), text).is_some() {
                // Two keys that trim to the same name ("sku" and " sku").
                out.push(JobError::cell(
                    Some(number),
                    &name,
                    JobErrorKind::DuplicateColumn,
                ));
            }
        }
        rows.push(Row { number, values });
    }
    out.finish(rows)
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// One image to generate: one row of a job, fully rendered and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationRequest {
    /// The 1-based data row it came from.
    pub row: usize,
    pub template: String,
    pub prompt: String,
    pub model: String,
    pub size: Size,
    pub quality: Quality,
    pub output_format: OutputFormat,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Where the image is stored, relative to the tenant's generated-images area.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_key: Option<String>,
}

/// Domain tag that starts every idempotency-key preimage; a new encoding gets a new tag, so
/// keys of different versions can never collide.
pub const IDEMPOTENCY_TAG: &[u8] = b"sightline/generation/v1\0";

impl GenerationRequest {
    /// The key under which this image is paid for once: rerunning the same rows finds the
    /// images already made. Lowercase hex SHA-256 of
    ///
    /// ```text
    /// "sightline/generation/v1" 0x00
    /// u64be(len(prompt))  prompt     (UTF-8 bytes, len in bytes)
    /// u64be(len(model))   model
    /// u64be(len(size))    size       ("auto" or "WIDTHxHEIGHT", canonical)
    /// u64be(len(quality)) quality    ("low" | "medium" | "high" | "auto")
    /// 0x00                           when there is no seed, or
    /// 0x01 u64be(seed)               when there is one
    /// ```
    ///
    /// Every field is length-prefixed, so no two different field lists share a preimage
    /// (`("ab", "c")` and `("a", "bc")` differ). The output format and key are left out on
    /// purpose: they change where and how the same picture is stored, not what is paid for.
    pub fn idempotency_key(&self) -> String {
        let mut h = Sha256::new();
        h.update(IDEMPOTENCY_TAG);
        let size = self.size.to_string();
        for field in [
            self.prompt.as_bytes(),
            self.model.as_bytes(),
            size.as_bytes(),
            self.quality.as_str().as_bytes(),
        ] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field);
        }
        match self.seed {
            None => h.update([0u8]),
            Some(seed) => {
                h.update([1u8]);
                h.update(seed.to_be_bytes());
            }
        }
        hex::encode(h.finalize())
    }
}

/// Check a rendered output key: it must stay a relative, clean key wherever it is stored (an
/// S3 prefix or a directory of the local file store), so a row value cannot climb out of the
/// tenant's area or write somewhere odd.
pub fn check_output_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("it is empty");
    }
    if key.len() > MAX_OUTPUT_KEY_BYTES {
        return Err("it is longer than 1024 bytes");
    }
    if key.starts_with('/') {
        return Err("it starts with `/`");
    }
    if key.contains('\\') {
        return Err("it contains a backslash");
    }
    if key.chars().any(char::is_control) {
        return Err("it contains a control character");
    }
    for segment in key.split('/') {
        match segment {
            "" => return Err("it has an empty path segment"),
            "." | ".." => return Err("it has a `.` or `..` segment"),
            _ => {}
        }
    }
    Ok(())
}

/// Turn rows into requests. `template` is the job's choice (overriding the set's default);
/// a row's `_template` overrides both. Every row is checked before anything is returned, and
/// every problem found (up to [`Limits::max_errors`]) is reported with its row number.
pub fn plan(
    set: &TemplateSet,
    template: Option<&str>,
    rows: &[Row],
    limits: &Limits,
) -> Result<Vec<GenerationRequest>, JobErrors> {
    let mut out = Collector::new(limits.max_errors);
    let job_template = template.or(set.default_name());
    if let Some(name) = template {
        if set.get(name).is_none() {
            out.push(JobError::job(JobErrorKind::UnknownTemplate {
                name: name.to_string(),
            }));
            return out.finish(Vec::new());
        }
    }
    if rows.is_empty() {
        out.push(JobError::job(JobErrorKind::NoRows));
    }
    if rows.len() > limits.max_rows {
        out.push(JobError::at(
            limits.max_rows + 1,
            JobErrorKind::TooManyRows {
                max: limits.max_rows,
            },
        ));
        return out.finish(Vec::new());
    }

    let mut requests = Vec::with_capacity(rows.len());
    // Output key → (row, idempotency key) of the first row that claimed it.
    let mut keys: HashMap<String, (usize, String)> = HashMap::new();
    for row in rows {
        if out.full() {
            out.truncated = true;
            break;
        }
        let before = out.errors.len();
        if let Some(request) = plan_row(set, job_template, row, limits, &mut out) {
            if let Some(key) = &request.output_key {
                let idem = request.idempotency_key();
                match keys.get(key) {
                    Some((first_row, first_idem)) if *first_idem != idem => {
                        out.push(JobError::at(
                            row.number,
                            JobErrorKind::DuplicateOutputKey {
                                key: key.clone(),
                                first_row: *first_row,
                            },
                        ));
                    }
                    Some(_) => {}
                    None => {
                        keys.insert(key.clone(), (row.number, idem));
                    }
                }
            }
            if out.errors.len() == before {
                requests.push(request);
            }
        }
    }
    out.finish(requests)
}

/// One row → one request, or its errors pushed to `out` (None then).
fn plan_row(
    set: &TemplateSet,
    job_template: Option<&str>,
    row: &Row,
    limits: &Limits,
    out: &mut Collector,
) -> Option<GenerationRequest> {
    let n = row.number;
    if row.values.is_empty() {
        out.push(JobError::at(n, JobErrorKind::EmptyRow));
        return None;
    }
    let setting = |name: &str| row.values.get(name).map(String::as_str);
    let template = match setting("_template").or(job_template) {
        Some(name) => match set.get(name) {
            Some(t) => t,
            None => {
                out.push(JobError::cell(
                    Some(n),
                    "_template",
                    JobErrorKind::UnknownTemplate {
                        name: name.to_string(),
                    },
                ));
                return None;
            }
        },
        None => {
            out.push(JobError::at(n, JobErrorKind::NoTemplate));
            return None;
        }
    };
    let before = out.errors.len();

    let model = setting("_model").unwrap_or(&template.model).to_string();
    let size = match setting("_size").map(Size::parse).transpose() {
        Ok(s) => s.unwrap_or(template.size),
        Err(m) => {
            out.push(JobError::cell(Some(n), "_size", JobErrorKind::BadSize(m)));
            template.size
        }
    };
    let quality = match setting("_quality").map(Quality::parse).transpose() {
        Ok(q) => q.unwrap_or(template.quality),
        Err(m) => {
            out.push(JobError::cell(
                Some(n),
                "_quality",
                JobErrorKind::BadQuality(m),
            ));
            template.quality
        }
    };
    let output_format = match setting("_output_format")
        .map(OutputFormat::parse)
        .transpose()
    {
        Ok(f) => f.unwrap_or(template.output_format),
        Err(m) => {
            out.push(JobError::cell(
                Some(n),
                "_output_format",
                JobErrorKind::BadOutputFormat(m),
            ));
            template.output_format
        }
    };
    let seed = match setting("_seed").map(parse_seed).transpose() {
        Ok(s) => s.or(template.seed),
        Err(m) => {
            out.push(JobError::cell(Some(n), "_seed", JobErrorKind::BadSeed(m)));
            None
        }
    };

    // Variables missing from either template are reported together.
    let mut missing = BTreeSet::new();
    let prompt = match template.prompt.render(&row.values) {
        Ok(p) => Some(p),
        Err(TemplateError::Missing { names }) => {
            missing.extend(names);
            None
        }
        Err(_) => None,
    };
    let output_key = match template.output_key.as_ref().map(|k| k.render(&row.values)) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(TemplateError::Missing { names })) => {
            missing.extend(names);
            None
        }
        Some(Err(_)) => None,
    };
    if !missing.is_empty() {
        out.push(JobError::at(
            n,
            JobErrorKind::MissingVariables {
                names: missing.into_iter().collect(),
            },
        ));
    }
    if let Some(p) = &prompt {
        let chars = p.chars().count();
        if p.trim().is_empty() {
            out.push(JobError::at(n, JobErrorKind::EmptyPrompt));
        } else if chars > limits.max_prompt_chars {
            out.push(JobError::at(
                n,
                JobErrorKind::PromptTooLong {
                    chars,
                    max: limits.max_prompt_chars,
                },
            ));
        }
    }
    if let Some(k) = &output_key {
        if let Err(why) = check_output_key(k) {
            out.push(JobError::cell(
                Some(n),
                "output_key",
                JobErrorKind::UnsafeOutputKey {
                    key: k.clone(),
                    why,
                },
            ));
        }
    }
    if out.errors.len() != before || (template.output_key.is_some() && output_key.is_none()) {
        return None;
    }
    Some(GenerationRequest {
        row: n,
        template: template.name.clone(),
        prompt: prompt?,
        model,
        size,
        quality,
        output_format,
        seed,
        output_key,
    })
}

/// Where a job's rows come from.
#[derive(Debug, Clone, Copy)]
pub enum RowsInput<'a> {
    Csv(&'a [u8]),
    Json(&'a [u8]),
}

/// Parse rows and plan them in one call (the CLI's and the API's entry point).
pub fn plan_job(
    set: &TemplateSet,
    template: Option<&str>,
    input: RowsInput<'_>,
    limits: &Limits,
) -> Result<Vec<GenerationRequest>, JobErrors> {
    let rows = match input {
        RowsInput::Csv(b) => parse_csv_rows(b, limits)?,
        RowsInput::Json(b) => parse_json_rows(b, limits)?,
    };
    plan(set, template, &rows, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const FILE: &str = r#"
default = "product_hero"

[defaults]
model = "gpt-image-1"
quality = "high"

[templates.product_hero]
prompt = "A studio photo of {product} on a {background} background"
output_key = "products/{sku}.png"
size = "1536x1024"

[templates.plain]
prompt = "{product}, plain"
model = "other-model"
seed = 7
"#;

    fn set() -> TemplateSet {
        TemplateSet::from_toml(FILE).unwrap()
    }

    fn request(prompt: &str, model: &str, seed: Option<u64>) -> GenerationRequest {
        GenerationRequest {
            row: 1,
            template: "t".into(),
            prompt: prompt.into(),
            model: model.into(),
            size: Size::Pixels {
                width: 1024,
                height: 1024,
            },
            quality: Quality::High,
            output_format: OutputFormat::Png,
            seed,
            output_key: None,
        }
    }

    fn kinds(e: &JobErrors) -> Vec<(Option<usize>, JobErrorKind)> {
        e.errors.iter().map(|e| (e.row, e.kind.clone())).collect()
    }

    // --- templates --------------------------------------------------------------------------

    #[test]
    fn template_fills_each_placeholder_and_keeps_escaped_braces() {
        let t = Template::parse("{{literal}} {a} and {a}, { b } }}").unwrap();
        let out = t.render(&vars(&[("a", "x"), ("b", "y")])).unwrap();
        assert_eq!(out, "{literal} x and x, y }");
        assert_eq!(t.variables().into_iter().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn template_accepts_spreadsheet_header_names_with_spaces() {
        let t = Template::parse("{Product Name}!").unwrap();
        assert_eq!(
            t.render(&vars(&[("Product Name", "Lamp")])).unwrap(),
            "Lamp!"
        );
    }

    #[test]
    fn template_reports_every_missing_variable_sorted() {
        let t = Template::parse("{b} {a} {c}").unwrap();
        let err = t.render(&vars(&[("c", "1")])).unwrap_err();
        assert_eq!(
            err,
            TemplateError::Missing {
                names: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(err.to_string(), "missing variables `a`, `b`");
    }

    #[test]
    fn template_refuses_unbalanced_braces_with_their_offset() {
        assert_eq!(
            Template::parse("ab {c"),
            Err(TemplateError::Unclosed { at: 3 })
        );
        assert_eq!(
            Template::parse("a {b {c}"),
            Err(TemplateError::Unclosed { at: 2 })
        );
        assert_eq!(
            Template::parse("a } b"),
            Err(TemplateError::StrayClose { at: 2 })
        );
    }

    #[test]
    fn template_refuses_empty_and_reserved_names() {
        assert!(matches!(
            Template::parse("x {} y"),
            Err(TemplateError::BadName { at: 2, .. })
        ));
        assert!(matches!(
            Template::parse("{_seed}"),
            Err(TemplateError::BadName { .. })
        ));
        assert!(matches!(
            Template::parse("{a\tb}"),
            Err(TemplateError::BadName { .. })
        ));
    }

    #[test]
    fn template_without_placeholders_renders_as_written() {
        let t = Template::parse("just text").unwrap();
        assert_eq!(t.render(&BTreeMap::new()).unwrap(), "just text");
        assert!(t.variables().is_empty());
    }

    // --- templates.toml ---------------------------------------------------------------------

    #[test]
    fn templates_file_layers_template_over_defaults_over_builtins() {
        let s = set();
        assert_eq!(s.names().collect::<Vec<_>>(), ["plain", "product_hero"]);
        assert_eq!(s.default_name(), Some("product_hero"));
        let hero = s.get("product_hero").unwrap();
        assert_eq!(hero.model, "gpt-image-1");
        assert_eq!(
            hero.size,
            Size::Pixels {
                width: 1536,
                height: 1024
            }
        );
        assert_eq!(hero.quality, Quality::High);
        assert_eq!(hero.output_format, OutputFormat::Png);
        assert_eq!(hero.seed, None);
        assert_eq!(
            hero.output_key.as_ref().unwrap().source(),
            "products/{sku}.png"
        );
        let plain = s.get("plain").unwrap();
        assert_eq!(plain.model, "other-model");
        assert_eq!(plain.size.to_string(), "1024x1024");
        assert_eq!(plain.seed, Some(7));
        assert!(plain.output_key.is_none());
    }

    #[test]
    fn templates_file_with_one_template_makes_it_the_default() {
        let s =
            TemplateSet::from_toml("[templates.only]\nprompt = \"{x}\"\nmodel = \"m\"\n").unwrap();
        assert_eq!(s.default_name(), Some("only"));
    }

    #[test]
    fn templates_file_refuses_a_template_without_a_model() {
        let err = TemplateSet::from_toml("[templates.a]\nprompt = \"x\"\n").unwrap_err();
        assert_eq!(err, TemplateFileError::NoModel { name: "a".into() });
    }

    #[test]
    fn templates_file_refuses_bad_settings_naming_template_and_field() {
        let err = TemplateSet::from_toml(
            "[templates.a]\nprompt = \"x\"\nmodel = \"m\"\nsize = \"big\"\n",
        )
        .unwrap_err();
        assert!(
            matches!(&err, TemplateFileError::Setting { name, field: "size", .. } if name == "a"),
            "{err:?}"
        );
        let err = TemplateSet::from_toml(
            "[templates.a]\nprompt = \"x\"\nmodel = \"m\"\nquality = \"ultra\"\n",
        )
        .unwrap_err();
        assert!(matches!(
            err,
            TemplateFileError::Setting {
                field: "quality",
                ..
            }
        ));
        let err =
            TemplateSet::from_toml("[templates.a]\nprompt = \"x {\"\nmodel = \"m\"\n").unwrap_err();
        assert!(matches!(
            err,
            TemplateFileError::Template {
                field: "prompt",
                ..
            }
        ));
    }

    #[test]
    fn templates_file_refuses_unknown_keys_and_unknown_default() {
        assert!(matches!(
            TemplateSet::from_toml("[templates.a]\nprompt = \"x\"\nmodel = \"m\"\nsede = 1\n"),
            Err(TemplateFileError::Toml(_))
        ));
        assert_eq!(
            TemplateSet::from_toml(
                "default = \"b\"\n[templates.a]\nprompt = \"x\"\nmodel = \"m\"\n"
            ),
            Err(TemplateFileError::UnknownDefault { name: "b".into() })
        );
        assert_eq!(
            TemplateSet::from_toml("[defaults]\nmodel = \"m\"\n"),
            Err(TemplateFileError::NoTemplates)
        );
    }

    #[test]
    fn inline_template_is_the_default_of_its_set() {
        let spec: TemplateSpec =
            serde_json::from_str(r#"{"prompt": "a {x}", "model": "m", "quality": "low"}"#).unwrap();
        let s = TemplateSet::inline(&spec).unwrap();
        assert_eq!(s.default_name(), Some(INLINE_TEMPLATE));
        let reqs = plan(
            &s,
            None,
            &[Row {
                number: 1,
                values: vars(&[("x", "cat")]),
            }],
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(reqs[0].prompt, "a cat");
        assert_eq!(reqs[0].quality, Quality::Low);
        assert_eq!(reqs[0].template, INLINE_TEMPLATE);
    }

    #[test]
    fn sizes_parse_auto_and_bounded_pixels_only() {
        assert_eq!(Size::parse("AUTO"), Ok(Size::Auto));
        assert_eq!(
            Size::parse(" 1024X1536 "),
            Ok(Size::Pixels {
                width: 1024,
                height: 1536
            })
        );
        for bad in [
            "",
            "1024",
            "1024x",
            "x1024",
            "10x1024",
            "1024x8192",
            "-1x5",
            "+64x64",
            "1e3x64",
            "99999999999x64",
        ] {
            assert!(Size::parse(bad).is_err(), "{bad}");
        }
    }

    // --- CSV rows ---------------------------------------------------------------------------

    #[test]
    fn csv_rows_are_numbered_from_one_after_the_header_with_trimmed_values() {
        let csv = "\u{feff}sku, product ,background\nA1, Lamp ,white\n\"B,2\",\"Desk\nlamp\",\n";
        let rows = parse_csv_rows(csv.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].number, 1);
        assert_eq!(
            rows[0].values,
            vars(&[("sku", "A1"), ("product", "Lamp"), ("background", "white")])
        );
        assert_eq!(rows[1].number, 2);
        assert_eq!(
            rows[1].values,
            vars(&[("sku", "B,2"), ("product", "Desk\nlamp")]),
            "quoted commas and newlines kept; the empty cell is no value"
        );
    }

    #[test]
    fn csv_row_with_a_wrong_field_count_is_refused_with_its_number() {
        let csv = "a,b\n1,2\n3\n4,5,6\n";
        let err = parse_csv_rows(csv.as_bytes(), &Limits::default()).unwrap_err();
        assert_eq!(
            kinds(&err),
            [
                (
                    Some(2),
                    JobErrorKind::FieldCount {
                        expected: 2,
                        found: 1
                    }
                ),
                (
                    Some(3),
                    JobErrorKind::FieldCount {
                        expected: 2,
                        found: 3
                    }
                ),
            ]
        );
    }

    #[test]
    fn csv_header_with_duplicate_empty_or_unknown_setting_columns_is_refused() {
        let err = parse_csv_rows(b"a,b,a\n1,2,3\n", &Limits::default()).unwrap_err();
        assert_eq!(err.errors[0].column.as_deref(), Some("a"));
        assert_eq!(err.errors[0].kind, JobErrorKind::DuplicateColumn);
        let err = parse_csv_rows(b"a,,b\n1,2,3\n", &Limits::default()).unwrap_err();
        assert_eq!(err.errors[0].kind, JobErrorKind::EmptyColumnName);
        let err = parse_csv_rows(b"a,_sead\n1,2\n", &Limits::default()).unwrap_err();
        assert_eq!(err.errors[0].column.as_deref(), Some("_sead"));
        assert_eq!(err.errors[0].kind, JobErrorKind::UnknownSetting);
        assert!(parse_csv_rows(b"a,_seed,_template\n1,2,t\n", &Limits::default()).is_ok());
    }

    #[test]
    fn csv_cell_that_is_not_utf8_is_refused_with_row_and_column() {
        let err = parse_csv_rows(b"a,b\nok,\xff\xfe\n", &Limits::default()).unwrap_err();
        assert_eq!(err.errors[0].row, Some(1));
        assert_eq!(err.errors[0].column.as_deref(), Some("b"));
        assert_eq!(err.errors[0].kind, JobErrorKind::NotUtf8);
    }

    #[test]
    fn csv_with_only_a_header_or_nothing_has_no_rows() {
        for input in [&b""[..], b"a,b\n", b"\n\n"] {
            let err = parse_csv_rows(input, &Limits::default()).unwrap_err();
            assert_eq!(kinds(&err), [(None, JobErrorKind::NoRows)]);
        }
    }

    #[test]
    fn csv_over_the_row_cap_is_refused_at_the_first_row_too_many() {
        let mut csv = String::from("x\n");
        for i in 0..5 {
            csv.push_str(&format!("{i}\n"));
        }
        let limits = Limits {
            max_rows: 3,
            ..Limits::default()
        };
        let err = parse_csv_rows(csv.as_bytes(), &limits).unwrap_err();
        assert_eq!(
            kinds(&err),
            [(Some(4), JobErrorKind::TooManyRows { max: 3 })]
        );
        assert_eq!(
            err.to_string(),
            "1 problem in the job\n  row 4: more than 3 rows; split the job"
        );
    }

    #[test]
    fn errors_stop_being_collected_at_the_cap_and_say_so() {
        let mut csv = String::from("a,b\n");
        for _ in 0..10 {
            csv.push_str("1\n");
        }
        let limits = Limits {
            max_errors: 3,
            ..Limits::default()
        };
        let err = parse_csv_rows(csv.as_bytes(), &limits).unwrap_err();
        assert_eq!(err.errors.len(), 3);
        assert!(err.truncated);
        assert!(err.to_string().contains("3+ problems"));
    }

    // --- JSON rows --------------------------------------------------------------------------

    #[test]
    fn json_rows_take_strings_and_numbers_and_skip_nulls() {
        let json = br#"[{"sku": " A1 ", "n": 12, "price": 9.5, "gone": null}, {"sku": "B"}]"#;
        let rows = parse_json_rows(json, &Limits::default()).unwrap();
        assert_eq!(
            rows[0].values,
            vars(&[("sku", "A1"), ("n", "12"), ("price", "9.5")])
        );
        assert_eq!(rows[1].number, 2);
    }

    #[test]
    fn json_rows_refuse_nested_values_and_non_objects_with_row_and_key() {
        let json = br#"[{"a": "x"}, {"a": true}, 3, {"b": [1]}, {"c": {"d": 1}}]"#;
        let err = parse_json_rows(json, &Limits::default()).unwrap_err();
        let placed: Vec<_> = err
            .errors
            .iter()
            .map(|e| (e.row, e.column.clone(), e.kind.clone()))
            .collect();
        assert_eq!(
            placed,
            [
                (
                    Some(2),
                    Some("a".into()),
                    JobErrorKind::UnsupportedValue("boolean")
                ),
                (Some(3), None, JobErrorKind::NotAnObject),
                (
                    Some(4),
                    Some("b".into()),
                    JobErrorKind::UnsupportedValue("list")
                ),
                (
                    Some(5),
                    Some("c".into()),
                    JobErrorKind::UnsupportedValue("object")
                ),
            ]
        );
    }

    #[test]
    fn json_rows_must_be_an_array_of_json() {
        assert_eq!(
            kinds(&parse_json_rows(br#"{"a": 1}"#, &Limits::default()).unwrap_err()),
            [(None, JobErrorKind::NotAnArray)]
        );
        assert!(matches!(
            parse_json_rows(b"[{", &Limits::default())
                .unwrap_err()
                .errors[0]
                .kind,
            JobErrorKind::Json(_)
        ));
        assert_eq!(
            kinds(&parse_json_rows(b"[]", &Limits::default()).unwrap_err()),
            [(None, JobErrorKind::NoRows)]
        );
    }

    // --- planning ---------------------------------------------------------------------------

    #[test]
    fn plan_makes_one_request_per_row_from_the_default_template() {
        let csv = "sku,product,background\nA1,Lamp,white\nB2,Desk,grey\n";
        let reqs = plan_job(
            &set(),
            None,
            RowsInput::Csv(csv.as_bytes()),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(reqs.len(), 2);
        assert_eq!(
            reqs[0],
            GenerationRequest {
                row: 1,
                template: "product_hero".into(),
                prompt: "A studio photo of Lamp on a white background".into(),
                model: "gpt-image-1".into(),
                size: Size::Pixels {
                    width: 1536,
                    height: 1024
                },
                quality: Quality::High,
                output_format: OutputFormat::Png,
                seed: None,
                output_key: Some("products/A1.png".into()),
            }
        );
        assert_eq!(reqs[1].output_key.as_deref(), Some("products/B2.png"));
    }

    #[test]
    fn plan_row_settings_override_the_template() {
        let csv = "_template,product,_model,_size,_quality,_output_format,_seed\n\
                   plain,Lamp,m2,auto,low,jpg,42\n\
                   plain,Desk,,,,,\n";
        let reqs = plan_job(
            &set(),
            None,
            RowsInput::Csv(csv.as_bytes()),
            &Limits::default(),
        )
        .unwrap();
        let r = &reqs[0];
        assert_eq!(
            (r.template.as_str(), r.model.as_str(), r.size, r.quality),
            ("plain", "m2", Size::Auto, Quality::Low)
        );
        assert_eq!((r.output_format, r.seed), (OutputFormat::Jpeg, Some(42)));
        let r = &reqs[1];
        assert_eq!(
            (r.model.as_str(), r.seed, r.quality),
            ("other-model", Some(7), Quality::High),
            "empty setting cells keep the template's values"
        );
    }

    #[test]
    fn plan_refuses_missing_variables_with_the_row_number() {
        let csv = "sku,product,background\nA1,Lamp,white\nB2,,grey\nC3,,\n";
        let err = plan_job(
            &set(),
            None,
            RowsInput::Csv(csv.as_bytes()),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(
            kinds(&err),
            [
                (
                    Some(2),
                    JobErrorKind::MissingVariables {
                        names: vec!["product".into()]
                    }
                ),
                (
                    Some(3),
                    JobErrorKind::MissingVariables {
                        names: vec!["background".into(), "product".into()]
                    }
                ),
            ]
        );
        assert_eq!(
            err.errors[0].to_string(),
            "row 2: missing variable `product`"
        );
    }

    #[test]
    fn plan_counts_a_variable_missing_only_from_the_output_key() {
        let csv = "product,background\nLamp,white\n";
        let err = plan_job(
            &set(),
            None,
            RowsInput::Csv(csv.as_bytes()),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(
            kinds(&err),
            [(
                Some(1),
                JobErrorKind::MissingVariables {
                    names: vec!["sku".into()]
                }
            )]
        );
    }

    #[test]
    fn plan_refuses_an_empty_row_with_its_number() {
        let csv = "sku,product,background\nA1,Lamp,white\n , ,\n";
        let err = plan_job(
            &set(),
            None,
            RowsInput::Csv(csv.as_bytes()),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(kinds(&err), [(Some(2), JobErrorKind::EmptyRow)]);
    }

    #[test]
    fn plan_refuses_unknown_templates_per_row_and_for_the_job() {
        let csv = "_template,product\nplain,Lamp\nnope,Desk\n";
        let err = plan_job(
            &set(),
            None,
            RowsInput::Csv(csv.as_bytes()),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(
            kinds(&err),
            [(
                Some(2),
                JobErrorKind::UnknownTemplate {
                    name: "nope".into()
                }
            )]
        );
        assert_eq!(err.errors[0].column.as_deref(), Some("_template"));

        let err = plan_job(
            &set(),
            Some("missing"),
            RowsInput::Csv(b"product\nLamp\n"),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(
            kinds(&err),
            [(
                None,
                JobErrorKind::UnknownTemplate {
                    name: "missing".into()
                }
            )]
        );
    }

    #[test]
    fn plan_without_any_template_choice_refuses_each_row() {
        let two = TemplateSet::from_toml(
            "[templates.a]\nprompt = \"{x}\"\nmodel = \"m\"\n[templates.b]\nprompt = \"{x}\"\nmodel = \"m\"\n",
        )
        .unwrap();
        assert_eq!(two.default_name(), None);
        let err = plan_job(&two, None, RowsInput::Csv(b"x\n1\n"), &Limits::default()).unwrap_err();
        assert_eq!(kinds(&err), [(Some(1), JobErrorKind::NoTemplate)]);
        assert!(plan_job(
            &two,
            Some("b"),
            RowsInput::Csv(b"x\n1\n"),
            &Limits::default()
        )
        .is_ok());
    }

    #[test]
    fn plan_refuses_bad_size_quality_format_and_seed_naming_the_column() {
        let csv = "_template,product,_size,_quality,_output_format,_seed\n\
                   plain,a,12x12,,,\nplain,b,,best,,\nplain,c,,,gif,\nplain,d,,,,-1\n";
        let err = plan_job(
            &set(),
            None,
            RowsInput::Csv(csv.as_bytes()),
            &Limits::default(),
        )
        .unwrap_err();
        let placed: Vec<_> = err
            .errors
            .iter()
            .map(|e| (e.row, e.column.clone().unwrap()))
            .collect();
        assert_eq!(
            placed,
            [
                (Some(1), "_size".to_string()),
                (Some(2), "_quality".to_string()),
                (Some(3), "_output_format".to_string()),
                (Some(4), "_seed".to_string()),
            ]
        );
        assert!(matches!(err.errors[0].kind, JobErrorKind::BadSize(_)));
        assert!(matches!(err.errors[3].kind, JobErrorKind::BadSeed(_)));
    }

    #[test]
    fn plan_refuses_an_over_long_or_blank_prompt() {
        let limits = Limits {
            max_prompt_chars: 20,
            ..Limits::default()
        };
        // "{product}, plain": 23 characters is too long; 17 characters in 27 bytes is not,
        // since the cap counts characters, not bytes.
        let long = "é".repeat(16);
        let fits = "é".repeat(10);
        let rows = [
            Row {
                number: 1,
                values: vars(&[("product", &long)]),
            },
            Row {
                number: 2,
                values: vars(&[("product", &fits)]),
            },
        ];
        let err = plan(&set(), Some("plain"), &rows, &limits).unwrap_err();
        assert_eq!(
            kinds(&err),
            [(Some(1), JobErrorKind::PromptTooLong { chars: 23, max: 20 })]
        );
        assert!(plan(&set(), Some("plain"), &rows[1..], &limits).is_ok());

        let blank =
            TemplateSet::from_toml("[templates.a]\nprompt = \"{x}\"\nmodel = \"m\"\n").unwrap();
        let err = plan(
            &blank,
            None,
            &[Row {
                number: 1,
                values: vars(&[("x", "  ")]),
            }],
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(kinds(&err), [(Some(1), JobErrorKind::EmptyPrompt)]);
    }

    #[test]
    fn plan_refuses_output_keys_that_climb_or_are_absolute() {
        for (sku, why) in [
            ("../../etc/passwd", "it has a `.` or `..` segment"),
            ("a/./b", "it has a `.` or `..` segment"),
            ("a//b", "it has an empty path segment"),
            ("a\\b", "it contains a backslash"),
            ("a\u{7}b", "it contains a control character"),
            ("a\nb", "it contains a control character"),
        ] {
            let rows = [Row {
                number: 3,
                values: vars(&[("sku", sku), ("product", "p"), ("background", "b")]),
            }];
            let err = plan(&set(), None, &rows, &Limits::default()).unwrap_err();
            assert_eq!(err.errors[0].row, Some(3), "{sku}");
            assert_eq!(err.errors[0].column.as_deref(), Some("output_key"));
            assert!(
                matches!(&err.errors[0].kind, JobErrorKind::UnsafeOutputKey { why: w, .. } if *w == why),
                "{sku}: {:?}",
                err.errors[0]
            );
        }
        let abs = TemplateSet::from_toml(
            "[templates.a]\nprompt = \"x\"\nmodel = \"m\"\noutput_key = \"{k}.png\"\n",
        )
        .unwrap();
        let err = plan(
            &abs,
            None,
            &[Row {
                number: 1,
                values: vars(&[("k", "/root/x")]),
            }],
            &Limits::default(),
        )
        .unwrap_err();
        assert!(matches!(
            err.errors[0].kind,
            JobErrorKind::UnsafeOutputKey {
                why: "it starts with `/`",
                ..
            }
        ));
        assert_eq!(
            check_output_key(&"k".repeat(1025)),
            Err("it is longer than 1024 bytes")
        );
        assert_eq!(check_output_key("products/a b/ü.png"), Ok(()));
        assert_eq!(
            check_output_key("a..b/c..png"),
            Ok(()),
            "dots inside a name are fine"
        );
    }

    #[test]
    fn plan_refuses_two_rows_writing_different_images_to_one_key() {
        let csv = "sku,product,background\nA1,Lamp,white\nA1,Desk,grey\nA1,Lamp,white\n";
        let err = plan_job(
            &set(),
            None,
            RowsInput::Csv(csv.as_bytes()),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(
            kinds(&err),
            [(
                Some(2),
                JobErrorKind::DuplicateOutputKey {
                    key: "products/A1.png".into(),
                    first_row: 1
                }
            )],
            "row 3 repeats row 1 exactly: the same image, so not a conflict"
        );
    }

    #[test]
    fn plan_collects_errors_of_every_row_before_refusing() {
        let csv = "sku,product,background\n,Lamp,white\nB2,,grey\n,,\nD4,Desk,grey\n";
        let err = plan_job(
            &set(),
            None,
            RowsInput::Csv(csv.as_bytes()),
            &Limits::default(),
        )
        .unwrap_err();
        let rows: Vec<_> = err.errors.iter().map(|e| e.row).collect();
        assert_eq!(rows, [Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn plan_refuses_more_rows_than_the_cap() {
        let rows: Vec<Row> = (1..=3)
            .map(|n| Row {
                number: n,
                values: vars(&[("product", "p")]),
            })
            .collect();
        let limits = Limits {
            max_rows: 2,
            ..Limits::default()
        };
        let err = plan(&set(), Some("plain"), &rows, &limits).unwrap_err();
        assert_eq!(
            kinds(&err),
            [(Some(3), JobErrorKind::TooManyRows { max: 2 })]
        );
    }

    #[test]
    fn json_rows_plan_like_csv_rows() {
        let json = br#"[{"sku": 17, "product": "Lamp", "background": "white", "_seed": 3}]"#;
        let reqs = plan_job(&set(), None, RowsInput::Json(json), &Limits::default()).unwrap();
        assert_eq!(reqs[0].output_key.as_deref(), Some("products/17.png"));
        assert_eq!(reqs[0].seed, Some(3));
    }

    #[test]
    fn requests_round_trip_through_json_with_canonical_settings() {
        let r = request("p", "m", Some(1));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["size"], "1024x1024");
        assert_eq!(json["quality"], "high");
        assert_eq!(json["output_format"], "png");
        assert!(json.get("output_key").is_none());
        let back: GenerationRequest = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    // --- idempotency keys -------------------------------------------------------------------

    #[test]
    fn idempotency_key_is_stable_lowercase_sha256_hex() {
        let r = request("a red fox", "gpt-image-1", Some(42));
        let key = r.idempotency_key();
        assert_eq!(key.len(), 64);
        assert!(key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        // The documented encoding, spelled out by hand: a change of encoding must be deliberate.
        let mut pre = b"sightline/generation/v1\0".to_vec();
        for f in ["a red fox", "gpt-image-1", "1024x1024", "high"] {
            pre.extend((f.len() as u64).to_be_bytes());
            pre.extend(f.as_bytes());
        }
        pre.push(1);
        pre.extend(42u64.to_be_bytes());
        assert_eq!(key, hex::encode(Sha256::digest(&pre)));
    }

    #[test]
    fn idempotency_key_separates_fields_unambiguously() {
        assert_ne!(
            request("ab", "c", None).idempotency_key(),
            request("a", "bc", None).idempotency_key()
        );
        assert_ne!(
            request("", "abc", None).idempotency_key(),
            request("abc", "", None).idempotency_key()
        );
    }

    #[test]
    fn idempotency_key_depends_on_seed_presence_and_value() {
        let none = request("p", "m", None).idempotency_key();
        let zero = request("p", "m", Some(0)).idempotency_key();
        let one = request("p", "m", Some(1)).idempotency_key();
        assert_ne!(none, zero);
        assert_ne!(zero, one);
    }

    #[test]
    fn idempotency_key_depends_on_size_and_quality_but_not_on_where_it_is_stored() {
        let base = request("p", "m", None);
        let mut other = base.clone();
        other.size = Size::Auto;
        assert_ne!(base.idempotency_key(), other.idempotency_key());
        let mut other = base.clone();
        other.quality = Quality::Low;
        assert_ne!(base.idempotency_key(), other.idempotency_key());
        let mut other = base.clone();
        other.row = 9;
        other.template = "x".into();
        other.output_format = OutputFormat::Webp;
        other.output_key = Some("k.webp".into());
        assert_eq!(base.idempotency_key(), other.idempotency_key());
    }

    #[test]
    fn rerunning_the_same_csv_gives_the_same_keys() {
        let csv = "sku,product,background\nA1,Lamp,white\nB2,Desk,grey\n";
        let keys = || {
            plan_job(
                &set(),
                None,
                RowsInput::Csv(csv.as_bytes()),
                &Limits::default(),
            )
            .unwrap()
            .iter()
            .map(GenerationRequest::idempotency_key)
            .collect::<Vec<_>>()
        };
        let first = keys();
        assert_eq!(first, keys());
        assert_ne!(first[0], first[1]);
    }
}
