"""Print scripts/bench.sh's table from the files it wrote into OUT (argv[1])."""
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []


def row(metric, value, baseline, ratio, target, met):
    rows.append((metric, value, baseline, ratio, target, met))


def load(name):
    return json.loads((out / name).read_text())


sl, sharp, moz = load("prepare.json"), load("sharp.json"), load("sharp-mozjpeg.json")
r = sl["median_ms"] / sharp["median_ms"]
row("server prepare, 12 MP → 768×1024 q85, 1 core", f"{sl['median_ms']:.1f} ms ({sl['bytes']} B)",
    f"sharp {sharp['sharp']} {sharp['median_ms']:.1f} ms ({sharp['bytes']} B)", f"{r:.2f}", "≤ 0.90", "yes" if r <= 0.9 else "no")
r = sl["median_ms"] / moz["median_ms"]
row("  the same against sharp with mozjpeg", f"{sl['median_ms']:.1f} ms",
    f"sharp+mozjpeg {moz['median_ms']:.1f} ms ({moz['bytes']} B)", f"{r:.2f}", "≤ 0.90", "yes" if r <= 0.9 else "no")

mem = (out / "memory.txt").read_text()
m = re.search(r"phone12mp\.jpg.*?([\d.]+) MiB\s+([\d.]+) MiB\s+([\d.]+) MiB", mem)
if m:
    file_mib, decoded_mib, peak_mib = map(float, m.groups())
    row("peak heap, one 12 MP prepare", f"{peak_mib:.2f} MiB", f"full-size RGB {decoded_mib:.2f} MiB",
        f"{peak_mib / decoded_mib:.2f}", "≤ 64 MiB", "yes" if peak_mib <= 64 else "no")
else:
    row("peak heap, one 12 MP prepare", "(not read)", "", "", "≤ 64 MiB", "?")
rss_file = out / "resize-rss.json"
if rss_file.exists():
    rss = load("resize-rss.json")
    mb = rss["peak_rss_mib_median"] * 1.048576
    row("resize Lambda process, 12 MP end to end (peak RSS)", f"{rss['peak_rss_mib_median']:.1f} MiB (max {rss['peak_rss_mib_max']:.1f})",
        "", "", "≤ 128 MB", "yes" if mb <= 128 else "no")
else:
    row("resize Lambda process, end to end", "not measured", "", "", "≤ 128 MB", "?")

b = load("browser.json")
r = b["medianMs"] / b["platformMedianMs"]
row("browser prepareImage, 12 MP", f"{b['medianMs']:.1f} ms", f"platform path {b['platformMedianMs']:.1f} ms",
    f"{r:.2f}", "≤ 1.00", "yes" if r <= 1.0 else "no")
kb = b["firstLoadGzipBytes"] / 1024
row("widget first load, gzipped (JS + WASM)", f"{kb:.1f} KB",
    f"small wasm {b['lightWasmGzipBytes'] / 1024:.1f} KB; full wasm (lazy) {b['wasmGzipBytes'] / 1024:.1f} KB",
    "", "≤ 150 KB", "yes" if kb <= 150 else "no")

cold = (out / "cold-start.txt").read_text()
for line in cold.splitlines():
    m = re.match(r"(\w+)\s+([\d.]+) MiB\s+([\d.]+) MiB\s+([\d.]+) ms\s+([\d.]+) ms", line)
    if m:
        name, raw, zipped, init, p90 = m.groups()
        ok = float(init) <= 30 and float(zipped) <= 8
        row(f"Lambda {name}: init, zipped", f"{init} ms, {zipped} MiB", f"raw {raw} MiB", "",
            "≤ 30 ms, ≤ 8 MiB", "yes" if ok else "no")

limiter = out / "limiter.jsonl"
cases = [json.loads(l) for l in limiter.read_text().splitlines() if l.strip()] if limiter.exists() else []
labels = {
    "one": "1 process",
    "shared": "4 processes sharing one limit through the store",
    "split": "4 processes, a quarter of the limit each (no store)",
}
by_case = {}
for c in cases:
    by_case.setdefault(c["case"], []).append(c)
for name, runs in by_case.items():
    runs.sort(key=lambda c: c["wall_s"])
    c = runs[len(runs) // 2]
    limited = sum(r["rate_limited"] for r in runs)
    calls = sum(r["requests"] for r in runs)
    ok = c["ratio"] <= 1.05 and limited / max(calls, 1) < 0.001
    scale = c.get("time_scale", 1)
    limits = "600 RPM / 200k TPM" if scale == 1 else f"600 RPM / 200k TPM × {scale} (time-scaled)"
    spread = f", median of {len(runs)}: {runs[0]['wall_s']:.1f}–{runs[-1]['wall_s']:.1f} s" if len(runs) > 1 else ""
    row(f"limiter: {c['images']} images at {limits}, quantized per second; {labels.get(name, name)}",
        f"{c['wall_s']:.1f} s{spread}; {limited} × 429 of {calls} calls",
        f"ideal {c['ideal_s']:.1f} s", f"{c['ratio']:.3f}", "≤ 1.05, < 0.1 % 429", "yes" if ok else "no")
if not cases:
    row("limiter", "(not run)", "", "", "≤ 1.05, < 0.1 % 429", "?")

widths = [max(len(str(r[i])) for r in rows + [("metric", "value", "baseline", "ratio", "target", "met")]) for i in range(6)]
head = ("metric", "value", "baseline", "ratio", "target", "met")
print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
print("-+-".join("-" * w for w in widths))
for r in rows:
    print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
