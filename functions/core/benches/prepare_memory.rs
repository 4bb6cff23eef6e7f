//! Peak heap of one `prepare` per input, measured by a counting global allocator (no
//! sampling, no external profiler): every byte the decoder, resizer and encoder hold at once.
//! The input file's size is printed beside it as the baseline figure, and the crate's own
//! header-only `memory_estimate` as the figure callers budget with.
//!
//!   cargo bench -p sightline-core --bench prepare_memory
//!
//! The target is ≤ 64 MiB for the 12 MP phone photo; the run fails if it is missed.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use sightline_core::prepare::memory_estimate;
use sightline_core::{prepare, PrepareOptions};

/// The system allocator, counting bytes live now and the most live since the last reset.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are updated around it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // A moving realloc holds both blocks for a moment; count the larger end state,
            // as the old block is freed before realloc returns.
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MB: f64 = 1024.0 * 1024.0;
/// The budget for one 12 MP prepare.
const TARGET_12MP: usize = 64 * 1024 * 1024;

fn fixture(rel: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (a benchmark input)", path.display()))
}

fn main() {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let inputs = [
        ("large/phone12mp.jpg", "12 MP phone JPEG, EXIF 6"),
        ("large/elephants_progressive.jpg", "progressive JPEG"),
        ("../fixtures-icc/p3_coffee.jpg", "Display P3 JPEG"),
        ("../fixtures-icc/cmyk_astronaut.jpg", "profiled CMYK JPEG"),
        ("samples/astronaut.png", "PNG"),
    ];
    let opts = PrepareOptions::default();
    println!(
        "{:<46} {:>12} {:>12} {:>11} {:>9} {:>12}  {:<9}  sha256 (output)",
        "input", "file", "decoded", "peak heap", "peak/file", "estimate", "out"
    );
    let mut missed = false;
    for (rel, what) in inputs {
        let bytes = fixture(rel);
        let name = rel.rsplit('/').next().unwrap_or(rel);
        let estimate = memory_estimate(&bytes, &opts).unwrap_or(0);
        // Warm up once (lazy statics, thread-locals), then measure a second prepare.
        let _ = prepare(&bytes, &opts);
        let before = CURRENT.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let result = prepare(&bytes, &opts);
        let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
        let p = match result {
            Ok(p) => p,
            Err(e) => panic!("{rel}: {e}"),
        };
        let decoded = u64::from(p.original_width) * u64::from(p.original_height) * 3;
        println!(
            "{:<46} {:>8.2} MiB {:>8.2} MiB {:>7.2} MiB {:>8.1}x {:>8.2} MiB  {:<9}  {}",
            format!("{name} ({what})"),
            bytes.len() as f64 / MB,
            decoded as f64 / MB,
            peak as f64 / MB,
            peak as f64 / bytes.len() as f64,
            estimate as f64 / MB,
            format!("{}x{}", p.width, p.height),
            p.sha256,
        );
        if rel == "large/phone12mp.jpg" && peak > TARGET_12MP {
            missed = true;
        }
    }
    println!(
        "(peak heap = most bytes live during one prepare, input excluded; decoded = full-size RGB)"
    );
    if missed {
        eprintln!("12 MP prepare peak is over the 64 MiB target");
        std::process::exit(1);
    }
}
