"""summary.md for bench/gpu.sh: every goal of the GPU run on one line, measured or said why not;
and results.json, every step's JSON in one file.

Reads what the steps left in a work folder (JSON from model_bench, loadgen, tiling_bench and
fastpath_check; ``steps.jsonl`` from the script's time plan; ``env.txt``; ``pytest.txt``) and
writes the summary, whichever steps finished: it runs after every step, so a call stopped at
its limit still has one.

    python -m bench.gpu_summary WORK_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HALF_PRECISIONS = ("fp16", "bf16")
NO_TF32 = "fp32-no-tf32"


def _load(work: Path, name: str) -> dict | None:
    path = work / f"{name}.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None  # a step killed while writing


def write_results(work: Path, out: Path) -> None:
    merged = {}
    for path in sorted(work.glob("*.json")):
        loaded = _load(work, path.stem)
        merged[path.stem] = "unreadable (step killed while writing)" if loaded is None else loaded
    (out / "results.json").write_text(json.dumps(merged, indent=1))


def _verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


def _why_missing(steps: dict[str, str], *names: str) -> str:
    said = [f"{name}: {steps[name]}" for name in names if name in steps]
    return "not measured (" + ("; ".join(said) if said else "step not reached") + ")"


def _service_rate(run: dict | None) -> float | None:
    return run["summary"]["service_images_per_s"] if run else None


def _refusals(run: dict | None) -> str:
    """The responses other than 200 in a run's rounds, as a note; empty when every request succeeded."""
    counts: dict[str, int] = {}
    for round_ in (run or {}).get("service_rounds", []):
        for status, count in round_.get("statuses", {}).items():
            if status != "200":
                counts[status] = counts.get(status, 0) + count
    return f" (non-200 responses: {counts})" if counts else ""


def batching_line(work: Path, steps: dict[str, str]) -> str:
    many, one = _load(work, "batched_c32"), _load(work, "batched_c1")
    goal = "Batching >= 2x images/s at 32 clients vs 1 (512x512, released deblurring)"
    if not (many and one):
        return f"- {goal}: {_why_missing(steps, 'batched_c1', 'batched_c32')}"
    high, low = _service_rate(many), _service_rate(one)
    if not low:
        return (f"- {goal}: **missed**: no request finished at 1 client ({high:.2f} images/s at 32)"
                f"{_refusals(many)}{_refusals(one)}")
    line = (f"- {goal}: {high:.2f} vs {low:.2f} images/s = {high / low:.2f}x, {_verdict(high / low >= 2)}; "
            f"mean batch {many['service_rounds'][0]['mean_batch_size'] or 0:.1f} at 32 clients"
            f"{_refusals(many)}{_refusals(one)}")
    unbatched = _load(work, "unbatched_c32")
    if unbatched and _service_rate(unbatched):
        line += f"; batching off at 32 clients: {_service_rate(unbatched):.2f} images/s"
    return line


def precision_lines(work: Path, steps: dict[str, str]) -> list[str]:
    goal = "fp16/bf16 >= 2x fp32 with TF32 off, >= 45 dB agreement (released configurations' forward)"
    bench = _load(work, "model_bench")
    if not bench:
        return [f"- {goal}: {_why_missing(steps, 'model_bench')}"]
    rows = [row for row in bench["rows"] if "error" not in row]
    lines = [f"- {goal}:"]
    for row in rows:
        if row["precision"] not in HALF_PRECISIONS:
            continue
        strict = next((base for base in rows if base["model"] == row["model"] and base["precision"] == NO_TF32
                       and base["batch_size"] == row["batch_size"]), None)
        if strict is None:
            continue
        speedup = row["megapixels_per_s"] / strict["megapixels_per_s"]
        psnr = row.get("psnr_vs_fp32_db", float("nan"))
        lines.append(f"  - {row['model']}, {row['precision']}, batch {row['batch_size']}: {speedup:.2f}x, "
                     f"{psnr:.1f} dB, {_verdict(speedup >= 2 and psnr >= 45)}")
    if len(lines) == 1:
        lines[0] += " no half-precision row had a TF32-off fp32 row beside it"
    errors = [row for row in bench["rows"] if "error" in row]
    if errors:
        lines.append("  - out of memory: " + ", ".join(f"{r['model']} {r['precision']} batch {r['batch_size']}"
                                                       for r in errors))
    return lines


def peak_line(work: Path, steps: dict[str, str]) -> str:
    goal = "Forward above 30% of the device's peak"
    bench = _load(work, "model_bench")
    rows = [row for row in (bench or {}).get("rows", []) if row.get("fraction_of_peak")]
    if not rows:
        return f"- {goal}: {_why_missing(steps, 'model_bench')}"
    best = max(rows, key=lambda row: row["fraction_of_peak"])
    return (f"- {goal}: best {best['fraction_of_peak']:.1%} ({best['model']}, {best['precision']}, batch "
            f"{best['batch_size']}, against the {best['peak_unit']} peak), {_verdict(best['fraction_of_peak'] > 0.3)}")


def latency_line(work: Path, steps: dict[str, str]) -> str:
    goal = "Released deblurring, 1280x720, end to end through HTTP under 100 ms (one client, p50)"
    parts = []
    for name, label in (("latency_whole", "whole image"), ("latency_tiled", "tiled")):
        run = _load(work, name)
        if run and run["service_rounds"][0]["completed_in_window"]:
            summary, stage_ms = run["summary"], run["service_rounds"][0].get("server_timing_median_ms")
            stages = f" (service's own medians, ms: {stage_ms})" if stage_ms else ""
            parts.append((label, summary["p50_ms"], summary["p95_ms"], stages))
    if not parts:
        return f"- {goal}: {_why_missing(steps, 'latency_whole', 'latency_tiled')}"
    best = min(parts, key=lambda part: part[1])
    text = "; ".join(f"{label} p50 {p50} ms, p95 {p95} ms{stages}" for label, p50, p95, stages in parts)
    return f"- {goal}: {text}; {_verdict(best[1] < 100)} ({best[0]})"


def tiling_line(work: Path, steps: dict[str, str]) -> str:
    goal = "Tiling overhead and best tile size (1280x720)"
    tiling = _load(work, "tiling")
    if not tiling:
        return f"- {goal}: {_why_missing(steps, 'tiling')}"
    rows = [row for row in tiling["rows"] if "error" not in row]
    text = ", ".join(f"{row['tile']}: {row['seconds_median'] * 1000:.0f} ms"
                     + (f" ({row['overhead_vs_whole']:+.0%})" if row.get("overhead_vs_whole") is not None else "")
                     for row in rows)
    return f"- {goal}: {text}; best tile {tiling['best_tile']} (measured)"


def fast_path_lines(work: Path, steps: dict[str, str]) -> list[str]:
    lines = ["- Fast-path switches against eager (service, bundled network, 32 clients, 512x512):"]
    eager = _service_rate(_load(work, "bundled_c32"))
    for name, label in (("bundled_graphs_c32", "CUDA graphs"), ("bundled_channels_last_c32", "channels-last")):
        rate = _service_rate(_load(work, name))
        if rate is None or not eager:
            lines.append(f"  - {label}: {_why_missing(steps, name, 'bundled_c32')}")
        else:
            lines.append(f"  - {label}: {rate:.2f} vs eager {eager:.2f} images/s = {rate / eager:.2f}x"
                         f"{_refusals(_load(work, name))}")
    check = _load(work, "fastpath")
    if check is None:
        lines.append(f"  - forward-level checks: {_why_missing(steps, 'fastpath')}")
        return lines
    for name, part in check.get("parts", {}).items():
        lines.append(f"  - {name} ({check.get('network', '')}): {_fast_path_part(part)}")
    return lines


def _fast_path_part(part: dict) -> str:
    """One part of bench/fastpath_check's report in a line: its numbers, or why it has none."""
    if part.get("status") != "ok":
        return f"{part.get('status')}: {part.get('reason') or part.get('error')}"
    if "bytes_per_pixel" in part or "batch_size" in part:
        return (f"tile {part['tile_size']}, batch {part['batch_size']} "
                f"({part.get('bytes_per_pixel', 'n/a')} bytes per pixel, {part['precision']})")
    if "max_abs_difference" in part:
        agreement = "identical" if part["identical"] else f"{part['psnr_db']} dB"
        return (f"graphs vs eager, fp32 with TF32 off: max difference {part['max_abs_difference']:.2e}, "
                f"{agreement}; failed captures {part['failed_captures'] or 'none'}")
    if "sizes" in part:
        sizes = "; ".join(f"batch {size}: eager {row['eager_ms']} ms, replay {row['replay_ms']} ms "
                          f"({row['eager_over_replay']}x), capture {row['capture_s']} s"
                          for size, row in part["sizes"].items())
        return (f"{part['precision']} tile {part['tile']}: {sizes}; reserved "
                f"{part['memory_reserved_bytes'] / 2**30:.2f} GiB; failed captures {part['failed_captures'] or 'none'}")
    if "compiled_ms" in part:
        return (f"{part['precision']} tile {part['tile']} batch {part['batch']}: compiled {part['compiled_ms']} ms vs "
                f"eager {part['eager_ms']} ms ({part['eager_over_compiled']}x), warm-up {part['warmup_s']} s, "
                f"recompiled after warm-up: {part['recompiled']}")
    return json.dumps(part)


def tests_line(work: Path, steps: dict[str, str]) -> str:
    path = work / "pytest.txt"
    if not path.is_file() or not path.read_text().strip():
        return f"- CUDA-only tests: {_why_missing(steps, 'pytest')}"
    tail = [line for line in path.read_text().splitlines() if line.strip()]
    return f"- CUDA-only tests: {tail[-1] if tail else 'no output'}"


def write_summary(work: Path, out: Path) -> str:
    steps: dict[str, str] = {}
    timings = []
    if (work / "steps.jsonl").is_file():
        for line in (work / "steps.jsonl").read_text().splitlines():
            step = json.loads(line)
            steps[step["step"]] = step["status"]
            timings.append(f"| {step['step']} | {step['status']} | {step.get('seconds', '')} |")
    env = (work / "env.txt").read_text() if (work / "env.txt").is_file() else "(no environment recorded)\n"
    lines = ["# bench/gpu.sh results", "", "```", *env.rstrip().splitlines(), "```", "", "## Goals", "",
             precision_lines(work, steps), peak_line(work, steps), latency_line(work, steps),
             batching_line(work, steps), tiling_line(work, steps), fast_path_lines(work, steps),
             tests_line(work, steps), "", "## Steps", "", "| step | status | seconds |", "|---|---|---:|",
             *timings]
    flat = []
    for entry in lines:
        flat.extend(entry if isinstance(entry, list) else [entry])
    text = "\n".join(flat) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    write_summary(args.work, args.out)
    write_results(args.work, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
