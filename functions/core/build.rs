//! The built-in price table, `data/prices.toml`, re-written as JSON into `OUT_DIR` so that
//! `PriceTable::builtin()` reads it with serde_json instead of a TOML parser: the browser's
//! first-load WebAssembly module then carries no TOML parser (about half of its size). The TOML
//! file stays the one source; a unit test checks that both readings give the same table.
use std::path::Path;

fn main() {
    let src = Path::new("data/prices.toml");
    println!("cargo::rerun-if-changed={}", src.display());
    let text = std::fs::read_to_string(src)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
    let value: toml::Value =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{} does not parse: {e}", src.display()));
    let json = serde_json::to_string(&value).unwrap_or_else(|e| panic!("to JSON: {e}"));
    let out = Path::new(&std::env::var("OUT_DIR").unwrap_or_else(|e| panic!("OUT_DIR: {e}")))
        .join("prices.json");
    std::fs::write(&out, json).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}
