//! The simulator's batch endpoints: OpenAI Files + Batches and Anthropic Message Batches.
//!
//! - OpenAI: `POST /v1/files` (multipart, `purpose=batch`, a JSONL `file` of
//!   `{custom_id, method:"POST", url:"/v1/chat/completions", body}` lines, custom_ids unique,
//!   at most [`BatchConfig::max_file_bytes`] and [`BatchConfig::max_file_lines`], else 400),
//!   `GET /v1/files/{id}/content`, `POST /v1/batches`, `GET /v1/batches/{id}` and
//!   `GET /v1/batches?limit=&after=` (newest first).
//! - Anthropic: `POST /v1/messages/batches` (`{requests:[{custom_id, params}]}`),
//!   `GET /v1/messages/batches/{id}`, `GET /v1/messages/batches/{id}/results` and
//!   `GET /v1/messages/batches?limit=&after_id=`.
//!
//! Every line is answered at create time by the real-time routes' own code (parse, poison rule,
//! [`super::answer_for`]), so a line costs exactly the tokens the same real-time call would; what
//! the client sees follows the clock: a batch is `validating` for the first third of
//! [`BatchConfig::delay_ms`], then `in_progress`, `finalizing` in the last third, and ended once
//! the delay has passed. A batch is billed ([`BatchStats`]) when it ends: its 200 lines, valid or
//! not, never its errored, expired or refused lines. Draws (line faults, the output shuffle) come
//! from the seed, the batch's number and the line's index, so a run is reproducible.
//!
//! Batch lines do not count in the real-time counters, windows or fault schedule.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{
    answer_for, anthropic_error_type, authenticate, authenticate_anthropic, json_response,
    poison_error, poison_images, Answer, Api, ApiError, Inner, Shared, SimConfig,
};

/// Largest body the batch routes read at all; the configured limits are checked inside.
const MAX_BATCH_BODY_BYTES: usize = 512 * 1024 * 1024;
/// The only endpoint the simulator batches.
const CHAT_URL: &str = "/v1/chat/completions";

/// Timing, limits and faults of the batch endpoints (`batch` in [`SimConfig`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Time from create until a batch ends.
    pub delay_ms: u64,
    /// OpenAI: largest input file (bytes) and most lines in it.
    pub max_file_bytes: u64,
    pub max_file_lines: u64,
    /// Anthropic: most requests and largest body (bytes) of one create.
    pub max_requests: u64,
    pub max_body_bytes: u64,
    /// OpenAI: input tokens that may be enqueued at once, summed over batches not ended (0 =
    /// unlimited). A batch over it is created, then fails `token_limit_exceeded`.
    pub enqueued_token_limit: u64,
    /// Refuse every batch as invalid (OpenAI: created, then `failed`; Anthropic: a 400 create).
    pub fail_validation: bool,
    /// Per-line probabilities: a transient error (500 or 429 class), a permanent 400, and a
    /// 200 whose content is not JSON (billed). They must add up to ≤ 1.
    pub transient_error_rate: f64,
    pub permanent_error_rate: f64,
    pub invalid_output_rate: f64,
    /// When set, batches end expired with this fraction of their lines (the first, in input
    /// order) done and the rest never processed.
    pub expire_done_fraction: Option<f64>,
    /// Answer lines in a shuffled (seeded) order instead of input order.
    pub shuffle: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            delay_ms: 300,
            max_file_bytes: 200 * 1024 * 1024,
            max_file_lines: 50_000,
            max_requests: 100_000,
            max_body_bytes: 256 * 1024 * 1024,
            enqueued_token_limit: 0,
            fail_validation: false,
            transient_error_rate: 0.0,
            permanent_error_rate: 0.0,
            invalid_output_rate: 0.0,
            expire_done_fraction: None,
            shuffle: false,
        }
    }
}

impl BatchConfig {
    pub(super) fn validate(&self) -> Result<(), String> {
        let rates = [
            ("transient_error_rate", self.transient_error_rate),
            ("permanent_error_rate", self.permanent_error_rate),
            ("invalid_output_rate", self.invalid_output_rate),
        ];
        for (name, r) in rates {
            if !(0.0..=1.0).contains(&r) {
                return Err(format!("batch.{name} must be in [0, 1], got {r}"));
            }
        }
        let sum: f64 = rates.iter().map(|(_, r)| r).sum();
        if sum > 1.0 + 1e-9 {
            return Err(format!("batch line fault rates add up to {sum} > 1"));
        }
        if let Some(f) = self.expire_done_fraction {
            if !(0.0..=1.0).contains(&f) {
                return Err(format!(
                    "batch.expire_done_fraction must be in [0, 1], got {f}"
                ));
            }
        }
        Ok(())
    }
}

/// What the batch endpoints did and billed, since start or the last reset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchStats {
    pub files_uploaded: u64,
    /// Creates that returned a batch (OpenAI's later failures included).
    pub batches_created: u64,
    /// Batches refused as a whole: OpenAI `failed`, Anthropic creates answered 400.
    pub batches_failed: u64,
    /// Batches that ended with lines never processed.
    pub batches_expired: u64,
    /// Batches that ended (completed or expired) and were billed.
    pub batches_ended: u64,
    /// Lines answered with a 200: what the provider bills (valid and invalid output).
    pub lines_billed: u64,
    /// Of those, answers whose content is not a usable analysis (injected, or cut).
    pub lines_invalid_output: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Lines answered with an error (not billed), poison images included.
    pub lines_errored: u64,
    /// Lines of them rejected for a poison image.
    pub lines_poisoned: u64,
    /// Lines never processed (expired).
    pub lines_unprocessed: u64,
    /// Downloads of output/error files and Anthropic results (each counts).
    pub results_fetches: u64,
}

/// Uploaded files and batches.
#[derive(Debug, Default)]
pub(super) struct BatchStore {
    files: HashMap<String, StoredFile>,
    /// In creation order.
    batches: Vec<SimBatch>,
    /// Numbers files, batches and lines.
    next: u64,
}

impl BatchStore {
    fn next_number(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn batch_mut(&mut self, api: Api, id: &str) -> Option<&mut SimBatch> {
        self.batches.iter_mut().find(|b| b.api == api && b.id == id)
    }
}

#[derive(Debug)]
struct StoredFile {
    bytes: Bytes,
    purpose: String,
    /// Output and error files: their downloads are results fetches.
    is_result: bool,
}

#[derive(Debug)]
enum Fate {
    /// Refused as a whole: OpenAI `errors.data` (code, message).
    Failed(Vec<(String, String)>),
    Runs,
}

#[derive(Debug)]
enum LineResult {
    /// A 200 (`invalid`: its content is not a usable analysis; billed all the same).
    Answered {
        body: Value,
        input_tokens: u64,
        output_tokens: u64,
        invalid: bool,
    },
    Error {
        error: ApiError,
        poisoned: bool,
    },
    /// The batch expired before this line ran.
    Unprocessed,
}

#[derive(Debug)]
struct SimLine {
    custom_id: String,
    request_id: String,
    result: LineResult,
}

#[derive(Debug)]
struct SimBatch {
    api: Api,
    id: String,
    number: u64,
    created: Instant,
    created_at: u64,
    delay: Duration,
    input_file_id: Option<String>,
    metadata: Value,
    fate: Fate,
    expired: bool,
    /// In output order.
    lines: Vec<SimLine>,
    /// Input tokens OpenAI counts against the enqueued-token limit.
    estimated_tokens: u64,
    /// Ended and billed (output files made).
    settled: bool,
    ended_at: Option<u64>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
}

impl SimBatch {
    fn ends(&self) -> Instant {
        self.created + self.delay
    }

    fn validated(&self, now: Instant) -> bool {
        now >= self.created + self.delay / 3
    }

    /// Still counting against the enqueued-token limit.
    fn running(&self, now: Instant) -> bool {
        matches!(self.fate, Fate::Runs) && now < self.ends()
    }

    fn count(&self, f: impl Fn(&LineResult) -> bool) -> u64 {
        self.lines.iter().filter(|l| f(&l.result)).count() as u64
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn rfc3339_unix(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// End every batch whose time has passed: bill its answered lines and, for OpenAI, make its
/// output and error files. Called before anything reads batches or stats.
pub(super) fn settle(inner: &mut Inner, now: Instant) {
    let Inner { batches, stats, .. } = inner;
    let mut new_files = Vec::new();
    for b in batches.batches.iter_mut() {
        if b.settled || !matches!(b.fate, Fate::Runs) || now < b.ends() {
            continue;
        }
        b.settled = true;
        b.ended_at = Some(unix_now());
        let s = &mut stats.batch;
        s.batches_ended += 1;
        if b.expired {
            s.batches_expired += 1;
        }
        for line in &b.lines {
            match &line.result {
                LineResult::Answered {
                    input_tokens,
                    output_tokens,
                    invalid,
                    ..
                } => {
                    s.lines_billed += 1;
                    s.input_tokens += input_tokens;
                    s.output_tokens += output_tokens;
                    if *invalid {
                        s.lines_invalid_output += 1;
                    }
                }
                LineResult::Error { poisoned, .. } => {
                    s.lines_errored += 1;
                    if *poisoned {
                        s.lines_poisoned += 1;
                    }
                }
                LineResult::Unprocessed => s.lines_unprocessed += 1,
            }
        }
        if b.api == Api::OpenAi {
            let (output, errors) = openai_result_files(b);
            for (kind, content, slot) in [
                ("out", output, &mut b.output_file_id),
                ("err", errors, &mut b.error_file_id),
            ] {
                if !content.is_empty() {
                    // Named after the batch, apart from the uploads' numbering.
                    let id = format!("file-sim{kind}{:016x}", b.number);
                    *slot = Some(id.clone());
                    new_files.push((id, content));
                }
            }
        }
    }
    for (id, content) in new_files {
        batches.files.insert(
            id,
            StoredFile {
                bytes: Bytes::from(content),
                purpose: "batch_output".into(),
                is_result: true,
            },
        );
    }
}

/// The output file (200 lines) and error file (the rest) of an ended OpenAI batch.
fn openai_result_files(b: &SimBatch) -> (Vec<u8>, Vec<u8>) {
    let (mut output, mut errors) = (Vec::new(), Vec::new());
    for (i, line) in b.lines.iter().enumerate() {
        let id = format!("batch_req_sim{:08}{i:06}", b.number);
        let (v, to) = match &line.result {
            LineResult::Answered { body, .. } => (
                json!({"id": id, "custom_id": line.custom_id, "response": {
                    "status_code": 200, "request_id": line.request_id, "body": body,
                }, "error": null}),
                &mut output,
            ),
            LineResult::Error { error, .. } => (
                json!({"id": id, "custom_id": line.custom_id, "response": {
                    "status_code": error.status.as_u16(), "request_id": line.request_id,
                    "body": error.body(),
                }, "error": null}),
                &mut errors,
            ),
            LineResult::Unprocessed => (
                json!({"id": id, "custom_id": line.custom_id, "response": null, "error": {
                    "code": "batch_expired",
                    "message": "This request could not be executed before the completion window expired.",
                }}),
                &mut errors,
            ),
        };
        to.extend_from_slice(v.to_string().as_bytes());
        to.push(b'\n');
    }
    (output, errors)
}

/// One line's request, before it runs.
struct Pending {
    custom_id: String,
    body: Vec<u8>,
}

/// Run every line as the real-time route would (parse, poison, draw a line fault, answer) and
/// apply the expiry; returns the lines in output order and the input tokens they hold.
async fn run_lines(
    api: Api,
    cfg: &SimConfig,
    number: u64,
    pending: Vec<Pending>,
) -> (Vec<SimLine>, u64) {
    let total = pending.len();
    let done = match cfg.batch.expire_done_fraction {
        Some(f) => ((total as f64) * f).floor() as usize,
        None => total,
    };
    let mut lines = Vec::with_capacity(total);
    let mut estimated = 0u64;
    for (i, p) in pending.into_iter().enumerate() {
        let seq = number * 1_000_000 + i as u64;
        let request_id = format!("req_simb{seq:014}");
        let parsed = api.parse(&p.body, None).await;
        if let Ok(parsed) = &parsed {
            estimated += parsed.prompt_tokens;
        }
        let result = if i >= done {
            LineResult::Unprocessed
        } else {
            match parsed {
                Err(error) => LineResult::Error {
                    error,
                    poisoned: false,
                },
                Ok(parsed) if !poison_images(cfg, &parsed).is_empty() => LineResult::Error {
                    error: poison_error(),
                    poisoned: true,
                },
                Ok(parsed) => {
                    let mut rng = line_rng(cfg.seed, number, i as u64);
                    let b = &cfg.batch;
                    let u: f64 = rng.gen();
                    if u < b.transient_error_rate {
                        LineResult::Error {
                            error: transient_error(rng.gen_bool(0.5)),
                            poisoned: false,
                        }
                    } else if u < b.transient_error_rate + b.permanent_error_rate {
                        LineResult::Error {
                            error: ApiError::invalid(
                                "Simulated invalid request: this line is refused.",
                                None,
                            ),
                            poisoned: false,
                        }
                    } else {
                        let bad = u < b.transient_error_rate
                            + b.permanent_error_rate
                            + b.invalid_output_rate;
                        let Answer {
                            body,
                            input_tokens,
                            output_tokens,
                        } = answer_for(api, seq, &parsed, bad);
                        let cut = matches!(
                            api.stop_reason(&body).as_deref(),
                            Some("length" | "max_tokens")
                        );
                        LineResult::Answered {
                            body,
                            input_tokens,
                            output_tokens,
                            invalid: bad || cut,
                        }
                    }
                }
            }
        };
        lines.push(SimLine {
            custom_id: p.custom_id,
            request_id,
            result,
        });
    }
    if cfg.batch.shuffle {
        lines.shuffle(&mut line_rng(cfg.seed, number, u64::MAX));
    }
    (lines, estimated)
}

fn line_rng(seed: u64, batch: u64, line: u64) -> StdRng {
    StdRng::seed_from_u64(
        seed ^ batch.wrapping_mul(0xA24B_AED4_963E_E407) ^ line.wrapping_mul(0x9FB2_1C65_1E98_DF25),
    )
}

/// A 500 `server_error` or a 429 `rate_limit_exceeded` line.
fn transient_error(rate_limited: bool) -> ApiError {
    if rate_limited {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: "Simulated rate limit while processing this batch line.".into(),
            kind: "rate_limit_error",
            code: Some("rate_limit_exceeded"),
            param: None,
        }
    } else {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "The server had an error while processing your request. Sorry about that!"
                .into(),
            kind: "server_error",
            code: None,
            param: None,
        }
    }
}

impl Api {
    /// `finish_reason` / `stop_reason` of an answer body.
    fn stop_reason(self, body: &Value) -> Option<String> {
        let ptr = match self {
            Api::OpenAi => "/choices/0/finish_reason",
            Api::Anthropic => "/stop_reason",
            Api::Bedrock => "/stopReason",
        };
        body.pointer(ptr)
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

pub(super) fn routes() -> Router<Arc<Shared>> {
    let big = || DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES);
    Router::new()
        .route("/v1/files", post(upload_file).layer(big()))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_openai).get(list_openai))
        .route("/v1/batches/{id}", get(get_openai))
        .route(
            "/v1/messages/batches",
            post(create_anthropic).get(list_anthropic).layer(big()),
        )
        .route("/v1/messages/batches/{id}", get(get_anthropic))
        .route("/v1/messages/batches/{id}/results", get(anthropic_results))
}

/// Authenticate for `api` and settle the batches.
fn enter(sh: &Shared, api: Api, headers: &HeaderMap) -> Result<SimConfig, ApiError> {
    let mut g = sh.lock();
    let cfg = g.cfg.clone();
    let auth = match api {
        Api::OpenAi => authenticate(headers, &cfg.api_key),
        Api::Anthropic => authenticate_anthropic(headers, &cfg.api_key),
        Api::Bedrock => super::bedrock::authenticate(headers),
    };
    if let Err(e) = auth {
        if e.status == StatusCode::UNAUTHORIZED {
            g.stats.unauthorized += 1;
        }
        return Err(e);
    }
    settle(&mut g, Instant::now());
    Ok(cfg)
}

fn not_found(api: Api, what: &str) -> Response {
    let mut e = ApiError::invalid(format!("No such {what}"), None);
    e.status = StatusCode::NOT_FOUND;
    e.render(api)
}

// --- OpenAI Files ----------------------------------------------------------------------------

/// One part of a `multipart/form-data` body.
struct Part {
    name: String,
    filename: Option<String>,
    data: Bytes,
}

/// Split a `multipart/form-data` body into its parts (the subset clients send: a
/// `Content-Disposition` with `name` and maybe `filename`, any other headers ignored).
fn multipart_parts(content_type: &str, body: &Bytes) -> Result<Vec<Part>, String> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or("the content type is not multipart/form-data with a boundary")?;
    let delimiter = format!("--{boundary}");
    let bytes = body.as_ref();
    let starts: Vec<usize> = find_all(bytes, delimiter.as_bytes());
    let mut parts = Vec::new();
    for w in starts.windows(2) {
        let mut start = w[0] + delimiter.len();
        if bytes.get(start..start + 2) == Some(b"\r\n") {
            start += 2;
        }
        // The part ends with CRLF before the next delimiter.
        let end = w[1].saturating_sub(2).max(start);
        let part = &bytes[start..end];
        let split = find_all(part, b"\r\n\r\n")
            .first()
            .copied()
            .ok_or("a part has no header end")?;
        let head = String::from_utf8_lossy(&part[..split]);
        let mut name = None;
        let mut filename = None;
        for line in head.lines() {
            let lower = line.to_ascii_lowercase();
            if !lower.starts_with("content-disposition:") {
                continue;
            }
            for attr in line.split(';').map(str::trim) {
                if let Some(v) = attr.strip_prefix("name=") {
                    name = Some(v.trim_matches('"').to_string());
                } else if let Some(v) = attr.strip_prefix("filename=") {
                    filename = Some(v.trim_matches('"').to_string());
                }
            }
        }
        let data_start = start + split + 4;
        parts.push(Part {
            name: name.ok_or("a part has no name")?,
            filename,
            data: body.slice(data_start..end.max(data_start)),
        });
    }
    Ok(parts)
}

fn find_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return Vec::new();
    }
    (0..=hay.len() - needle.len())
        .filter(|&i| &hay[i..i + needle.len()] == needle)
        .collect()
}

/// Check a batch input file: the line shape, unique custom_ids, the size and count limits.
fn validate_jsonl(data: &[u8], cfg: &super::batch::BatchConfig) -> Result<Vec<Pending>, String> {
    if data.len() as u64 > cfg.max_file_bytes {
        return Err(format!(
            "File is too large: {} bytes, the limit for batch input files is {} bytes.",
            data.len(),
            cfg.max_file_bytes
        ));
    }
    let text = std::str::from_utf8(data).map_err(|_| "The file is not UTF-8 text.".to_string())?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        if out.len() as u64 >= cfg.max_file_lines {
            return Err(format!(
                "The file has more than {} requests, the limit for one batch.",
                cfg.max_file_lines
            ));
        }
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("Line {n} is not valid JSON: {e}"))?;
        let custom_id = match v.get("custom_id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(format!("Line {n}: missing or empty `custom_id`.")),
        };
        if v.get("method").and_then(Value::as_str) != Some("POST") {
            return Err(format!("Line {n}: `method` must be \"POST\"."));
        }
        if v.get("url").and_then(Value::as_str) != Some(CHAT_URL) {
            return Err(format!("Line {n}: `url` must be \"{CHAT_URL}\"."));
        }
        let Some(body @ Value::Object(_)) = v.get("body") else {
            return Err(format!("Line {n}: `body` must be a JSON object."));
        };
        if !seen.insert(custom_id.clone()) {
            return Err(format!(
                "Line {n}: duplicate custom_id {custom_id:?}; custom_ids must be unique within a file."
            ));
        }
        out.push(Pending {
            custom_id,
            body: body.to_string().into_bytes(),
        });
    }
    if out.is_empty() {
        return Err("The file has no requests.".into());
    }
    Ok(out)
}

async fn upload_file(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let cfg = match enter(&sh, Api::OpenAi, &headers) {
        Ok(c) => c,
        Err(e) => return e.render(Api::OpenAi),
    };
    let invalid = |m: String| ApiError::invalid(m, None).render(Api::OpenAi);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parts = match multipart_parts(content_type, &body) {
        Ok(p) => p,
        Err(e) => return invalid(format!("Invalid multipart body: {e}")),
    };
    let purpose = parts
        .iter()
        .find(|p| p.name == "purpose")
        .map(|p| String::from_utf8_lossy(&p.data).trim().to_string());
    let Some(file) = parts.iter().find(|p| p.name == "file") else {
        return invalid("Missing required parameter: 'file'.".into());
    };
    match purpose.as_deref() {
        Some("batch") => {}
        Some(other) => {
            return invalid(format!(
                "The simulator accepts purpose 'batch' only, got '{other}'."
            ))
        }
        None => return invalid("Missing required parameter: 'purpose'.".into()),
    }
    if let Err(e) = validate_jsonl(&file.data, &cfg.batch) {
        return invalid(e);
    }
    let mut g = sh.lock();
    let number = g.batches.next_number();
    let id = format!("file-sim{number:016x}");
    let created_at = unix_now();
    let filename = file
        .filename
        .clone()
        .unwrap_or_else(|| "batch.jsonl".into());
    let resp = json!({
        "id": id, "object": "file", "bytes": file.data.len(), "created_at": created_at,
        "filename": filename, "purpose": "batch",
    });
    g.batches.files.insert(
        id,
        StoredFile {
            bytes: file.data.clone(),
            purpose: "batch".into(),
            is_result: false,
        },
    );
    g.stats.batch.files_uploaded += 1;
    json_response(StatusCode::OK, &resp)
}

async fn file_content(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = enter(&sh, Api::OpenAi, &headers) {
        return e.render(Api::OpenAi);
    }
    let mut g = sh.lock();
    let Some(file) = g.batches.files.get(&id) else {
        return not_found(Api::OpenAi, &format!("File with id '{id}'."));
    };
    let (bytes, is_result) = (file.bytes.clone(), file.is_result);
    if is_result {
        g.stats.batch.results_fetches += 1;
    }
    let mut resp = (StatusCode::OK, bytes).into_response();
    if let Ok(v) = "application/octet-stream".parse() {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

// --- OpenAI Batches --------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct CreateOpenAi {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    metadata: Option<Value>,
}

async fn create_openai(State(sh): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let cfg = match enter(&sh, Api::OpenAi, &headers) {
        Ok(c) => c,
        Err(e) => return e.render(Api::OpenAi),
    };
    let invalid = |m: &str, param: &'static str| {
        ApiError::invalid(m.to_string(), Some(param)).render(Api::OpenAi)
    };
    let req: CreateOpenAi = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return invalid(&format!("Invalid request body: {e}"), "body"),
    };
    if req.endpoint.as_deref() != Some(CHAT_URL) {
        return invalid(
            "The simulator batches '/v1/chat/completions' only.",
            "endpoint",
        );
    }
    if req.completion_window.as_deref() != Some("24h") {
        return invalid(
            "Invalid 'completion_window': the only supported value is '24h'.",
            "completion_window",
        );
    }
    let metadata = req.metadata.unwrap_or(Value::Null);
    match &metadata {
        Value::Null => {}
        Value::Object(m) if m.len() <= 16 && m.values().all(Value::is_string) => {}
        _ => return invalid("Invalid 'metadata': at most 16 string values.", "metadata"),
    }
    let Some(file_id) = req.input_file_id else {
        return invalid(
            "Missing required parameter: 'input_file_id'.",
            "input_file_id",
        );
    };
    let (data, number) = {
        let mut g = sh.lock();
        let data = match g.batches.files.get(&file_id) {
            Some(f) if f.purpose == "batch" => f.bytes.clone(),
            Some(_) => {
                return invalid(
                    "The input file must have been uploaded with purpose 'batch'.",
                    "input_file_id",
                )
            }
            None => return not_found(Api::OpenAi, &format!("File with id '{file_id}'.")),
        };
        (data, g.batches.next_number())
    };
    let pending = match validate_jsonl(&data, &cfg.batch) {
        Ok(p) => p,
        Err(e) => return invalid(&e, "input_file_id"),
    };
    let (lines, estimated) = run_lines(Api::OpenAi, &cfg, number, pending).await;
    let now = Instant::now();
    let mut g = sh.lock();
    let fate = if cfg.batch.fail_validation {
        Fate::Failed(vec![(
            "invalid_request".into(),
            "Simulated validation failure: the input file was refused.".into(),
        )])
    } else {
        let enqueued: u64 = g
            .batches
            .batches
            .iter()
            .filter(|b| b.api == Api::OpenAi && b.running(now))
            .map(|b| b.estimated_tokens)
            .sum();
        let limit = cfg.batch.enqueued_token_limit;
        if limit > 0 && enqueued + estimated > limit {
            Fate::Failed(vec![(
                "token_limit_exceeded".into(),
                format!(
                    "Enqueued token limit reached for this organization (org-sim). Limit: \
                     {limit} enqueued tokens, {enqueued} already enqueued, this batch holds \
                     {estimated}. Please try submitting fewer tokens or wait for some of your \
                     existing batches to complete."
                ),
            )])
        } else {
            Fate::Runs
        }
    };
    g.stats.batch.batches_created += 1;
    if matches!(fate, Fate::Failed(_)) {
        g.stats.batch.batches_failed += 1;
    }
    let batch = SimBatch {
        api: Api::OpenAi,
        id: format!("batch_sim{number:016x}"),
        number,
        created: now,
        created_at: unix_now(),
        delay: Duration::from_millis(cfg.batch.delay_ms),
        input_file_id: Some(file_id),
        metadata,
        fate,
        expired: cfg.batch.expire_done_fraction.is_some(),
        lines,
        estimated_tokens: estimated,
        settled: false,
        ended_at: None,
        output_file_id: None,
        error_file_id: None,
    };
    let v = openai_batch_json(&batch, now);
    g.batches.batches.push(batch);
    json_response(StatusCode::OK, &v)
}

fn openai_batch_json(b: &SimBatch, now: Instant) -> Value {
    let total = b.lines.len() as u64;
    let validated = b.validated(now);
    let (status, errors, completed, failed) = match &b.fate {
        Fate::Failed(errs) if validated => {
            let data: Vec<Value> = errs
                .iter()
                .map(|(code, message)| {
                    json!({"code": code, "message": message, "param": null, "line": null})
                })
                .collect();
            ("failed", json!({"object": "list", "data": data}), 0, 0)
        }
        Fate::Failed(_) => ("validating", Value::Null, 0, 0),
        Fate::Runs if b.settled => (
            if b.expired { "expired" } else { "completed" },
            Value::Null,
            b.count(|r| matches!(r, LineResult::Answered { .. })),
            b.count(|r| !matches!(r, LineResult::Answered { .. })),
        ),
        Fate::Runs if !validated => ("validating", Value::Null, 0, 0),
        Fate::Runs if now < b.created + b.delay * 2 / 3 => ("in_progress", Value::Null, 0, 0),
        Fate::Runs => ("finalizing", Value::Null, 0, 0),
    };
    let at = |cond: bool| {
        if cond {
            json!(b.created_at)
        } else {
            Value::Null
        }
    };
    let ended = b.ended_at.map(Value::from).unwrap_or(Value::Null);
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": CHAT_URL,
        "errors": errors,
        "input_file_id": b.input_file_id,
        "completion_window": "24h",
        "status": status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at,
        "in_progress_at": at(status != "validating" && status != "failed"),
        "expires_at": b.created_at + 86_400,
        "finalizing_at": null,
        "completed_at": if status == "completed" { ended.clone() } else { Value::Null },
        "failed_at": at(status == "failed"),
        "expired_at": if status == "expired" { ended } else { Value::Null },
        "cancelling_at": null,
        "cancelled_at": null,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": b.metadata,
    })
}

async fn get_openai(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = enter(&sh, Api::OpenAi, &headers) {
        return e.render(Api::OpenAi);
    }
    let mut g = sh.lock();
    match g.batches.batch_mut(Api::OpenAi, &id) {
        Some(b) => json_response(StatusCode::OK, &openai_batch_json(b, Instant::now())),
        None => not_found(Api::OpenAi, &format!("batch: {id}")),
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    /// OpenAI's cursor.
    after: Option<String>,
    /// Anthropic's cursor.
    after_id: Option<String>,
}

/// Newest first, a page of at most `limit` (1..=100, default 20) after the cursor.
fn page<'a>(batches: &'a [SimBatch], api: Api, q: &ListQuery) -> (Vec<&'a SimBatch>, bool) {
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let cursor = q.after.as_deref().or(q.after_id.as_deref());
    let mut newest: Vec<&SimBatch> = batches.iter().filter(|b| b.api == api).rev().collect();
    if let Some(c) = cursor {
        match newest.iter().position(|b| b.id == c) {
            Some(i) => newest.drain(..=i),
            None => newest.drain(..),
        };
    }
    let has_more = newest.len() > limit;
    newest.truncate(limit);
    (newest, has_more)
}

async fn list_openai(
    State(sh): State<Arc<Shared>>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = enter(&sh, Api::OpenAi, &headers) {
        return e.render(Api::OpenAi);
    }
    let g = sh.lock();
    let now = Instant::now();
    let (items, has_more) = page(&g.batches.batches, Api::OpenAi, &q);
    let data: Vec<Value> = items.iter().map(|b| openai_batch_json(b, now)).collect();
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "first_id": items.first().map(|b| b.id.clone()),
            "last_id": items.last().map(|b| b.id.clone()),
            "has_more": has_more,
        }),
    )
}

// --- Anthropic Message Batches ---------------------------------------------------------------

fn is_anthropic_custom_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

async fn create_anthropic(
    State(sh): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let cfg = match enter(&sh, Api::Anthropic, &headers) {
        Ok(c) => c,
        Err(e) => return e.render(Api::Anthropic),
    };
    let refuse = |m: String| {
        sh.lock().stats.batch.batches_failed += 1;
        ApiError::invalid(m, None).render(Api::Anthropic)
    };
    if body.len() as u64 > cfg.batch.max_body_bytes {
        sh.lock().stats.batch.batches_failed += 1;
        let mut e = ApiError::invalid(
            format!(
                "Request too large: {} bytes, the limit for a message batch is {} bytes.",
                body.len(),
                cfg.batch.max_body_bytes
            ),
            None,
        );
        e.status = StatusCode::PAYLOAD_TOO_LARGE;
        return e.render(Api::Anthropic);
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return refuse(format!("The request body is not valid JSON: {e}")),
    };
    let Some(requests) = v.get("requests").and_then(Value::as_array) else {
        return refuse("requests: Field required".into());
    };
    if requests.is_empty() || requests.len() as u64 > cfg.batch.max_requests {
        return refuse(format!(
            "requests: a batch holds 1 to {} requests, got {}",
            cfg.batch.max_requests,
            requests.len()
        ));
    }
    let mut seen = HashSet::new();
    let mut pending = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        let custom_id = r.get("custom_id").and_then(Value::as_str).unwrap_or("");
        if !is_anthropic_custom_id(custom_id) {
            return refuse(format!(
                "requests.{i}.custom_id: must match ^[a-zA-Z0-9_-]{{1,64}}$"
            ));
        }
        if !seen.insert(custom_id.to_string()) {
            return refuse(format!(
                "requests.{i}.custom_id: duplicate custom_id {custom_id:?}"
            ));
        }
        let Some(params @ Value::Object(_)) = r.get("params") else {
            return refuse(format!("requests.{i}.params: Field required"));
        };
        pending.push(Pending {
            custom_id: custom_id.to_string(),
            body: params.to_string().into_bytes(),
        });
    }
    if cfg.batch.fail_validation {
        return refuse("Simulated validation failure: the batch was refused.".into());
    }
    let number = sh.lock().batches.next_number();
    let (lines, estimated) = run_lines(Api::Anthropic, &cfg, number, pending).await;
    let now = Instant::now();
    let batch = SimBatch {
        api: Api::Anthropic,
        id: format!("msgbatch_sim{number:016x}"),
        number,
        created: now,
        created_at: unix_now(),
        delay: Duration::from_millis(cfg.batch.delay_ms),
        input_file_id: None,
        metadata: Value::Null,
        fate: Fate::Runs,
        expired: cfg.batch.expire_done_fraction.is_some(),
        lines,
        estimated_tokens: estimated,
        settled: false,
        ended_at: None,
        output_file_id: None,
        error_file_id: None,
    };
    let v = anthropic_batch_json(&batch, &host(&headers));
    let mut g = sh.lock();
    g.stats.batch.batches_created += 1;
    g.batches.batches.push(batch);
    json_response(StatusCode::OK, &v)
}

fn host(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string()
}

fn anthropic_batch_json(b: &SimBatch, host: &str) -> Value {
    let counts = if b.settled {
        json!({
            "processing": 0,
            "succeeded": b.count(|r| matches!(r, LineResult::Answered { .. })),
            "errored": b.count(|r| matches!(r, LineResult::Error { .. })),
            "canceled": 0,
            "expired": b.count(|r| matches!(r, LineResult::Unprocessed)),
        })
    } else {
        json!({"processing": b.lines.len(), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0})
    };
    json!({
        "id": b.id,
        "type": "message_batch",
        "processing_status": if b.settled { "ended" } else { "in_progress" },
        "request_counts": counts,
        "ended_at": b.ended_at.map(rfc3339_unix),
        "created_at": rfc3339_unix(b.created_at),
        "expires_at": rfc3339_unix(b.created_at + 86_400),
        "archived_at": null,
        "cancel_initiated_at": null,
        "results_url": b.settled.then(|| format!("http://{host}/v1/messages/batches/{}/results", b.id)),
    })
}

async fn get_anthropic(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = enter(&sh, Api::Anthropic, &headers) {
        return e.render(Api::Anthropic);
    }
    let mut g = sh.lock();
    match g.batches.batch_mut(Api::Anthropic, &id) {
        Some(b) => json_response(StatusCode::OK, &anthropic_batch_json(b, &host(&headers))),
        None => not_found(Api::Anthropic, &format!("message batch: {id}")),
    }
}

async fn list_anthropic(
    State(sh): State<Arc<Shared>>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = enter(&sh, Api::Anthropic, &headers) {
        return e.render(Api::Anthropic);
    }
    let g = sh.lock();
    let host = host(&headers);
    let (items, has_more) = page(&g.batches.batches, Api::Anthropic, &q);
    let data: Vec<Value> = items
        .iter()
        .map(|b| anthropic_batch_json(b, &host))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "data": data,
            "has_more": has_more,
            "first_id": items.first().map(|b| b.id.clone()),
            "last_id": items.last().map(|b| b.id.clone()),
        }),
    )
}

async fn anthropic_results(
    State(sh): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = enter(&sh, Api::Anthropic, &headers) {
        return e.render(Api::Anthropic);
    }
    let mut g = sh.lock();
    let Some(b) = g.batches.batch_mut(Api::Anthropic, &id) else {
        return not_found(Api::Anthropic, &format!("message batch: {id}"));
    };
    if !b.settled {
        return ApiError::invalid(
            format!(
                "Message batch {id} is still in progress; results are available once it has ended."
            ),
            None,
        )
        .render(Api::Anthropic);
    }
    let mut out = Vec::new();
    for line in &b.lines {
        let result = match &line.result {
            LineResult::Answered { body, .. } => json!({"type": "succeeded", "message": body}),
            LineResult::Error { error, .. } => json!({"type": "errored", "error": {
                "type": "error",
                "error": {"type": anthropic_error_type(error.status), "message": error.message},
            }}),
            LineResult::Unprocessed => json!({"type": "expired"}),
        };
        out.extend_from_slice(
            json!({"custom_id": line.custom_id, "result": result})
                .to_string()
                .as_bytes(),
        );
        out.push(b'\n');
    }
    g.stats.batch.results_fetches += 1;
    let mut resp = (StatusCode::OK, out).into_response();
    if let Ok(v) = "application/binary".parse() {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_bodies_split_into_named_parts() {
        let body = Bytes::from_static(
            b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
              --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
              Content-Type: application/jsonl\r\n\r\n{\"a\":1}\n{\"b\":2}\n\r\n--XyZ--\r\n",
        );
        let parts = multipart_parts("multipart/form-data; boundary=XyZ", &body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name, "purpose");
        assert_eq!(&parts[0].data[..], b"batch");
        assert_eq!(parts[1].filename.as_deref(), Some("in.jsonl"));
        assert_eq!(&parts[1].data[..], b"{\"a\":1}\n{\"b\":2}\n");
        assert!(multipart_parts("application/json", &body).is_err());
    }

    #[test]
    fn anthropic_custom_ids_follow_the_documented_pattern() {
        assert!(is_anthropic_custom_id("a-b_C9"));
        assert!(is_anthropic_custom_id(&"f".repeat(64)));
        assert!(!is_anthropic_custom_id(&"f".repeat(65)));
        assert!(!is_anthropic_custom_id(""));
        assert!(!is_anthropic_custom_id("a.b"));
    }
}
