#!/usr/bin/env bash
# The GPU benchmark of issue 6, in one call on a lent H100/H200, inside 10 minutes; results to $OUT.
#
# The device image has torch, numpy, pillow, httpx, anyio, h11, prometheus-client and safetensors but
# not the web stack. Before the call, once, here in the repository root (Python 3.12 wheels, the
# versions the CPU venv was tested with):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 \
#     pydantic-settings==2.16.3 python-dotenv==1.2.4 python-multipart==0.0.34 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 typing-extensions==4.16.0 annotated-doc
#
# then the call: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600).
# DRY=1 bash bench/gpu.sh runs every step on the CPU with tiny sizes (OUT defaults to ./gpu-dry-out),
# to check the plumbing without a GPU.
#
# Planned for about 400 s (an estimate: not yet run on a GPU). Steps run goals first, each under its own timeout, and after each
# one summary.md and the merged JSON files are rewritten, so a call stopped at its limit keeps what finished.
# Files written (8): env.txt, summary.md, model_bench.json, model_bench_channels_last.json,
# loadgen.json, latency_720p.json, tiling.json, log.txt.
set -u -o pipefail
cd "$(dirname "$0")/.."
DRY=${DRY:-0}
OUT=${OUT:-$PWD/gpu-dry-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
started=$SECONDS
step() { echo; echo "== $* (at ${SECONDS}s)"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { echo "wheel install failed"; exit 1; }
fi
PY=${PY:-python3}
[ -x .venv/bin/python ] && [ "$DRY" = 1 ] && PY=.venv/bin/python

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; HALF=fp32; PRECISIONS=fp32; TILE=32; BATCHES=1,2; REPEATS=1; CONFIGS=bundled
  LOAD_SIZE=64x64; LOAD_TILE=64; OVERLAP=8; BIG=72x128; BIG_TILE=64; TILES=32,48; DURATION=2; ENGINE_S=1; CLIENTS=4
  NET=(--random-config tiny); TILING_CONFIG=bundled
else
  DEVICE=cuda; HALF=bf16; PRECISIONS=fp32,fp16,bf16; TILE=512; BATCHES=1,4,16; REPEATS=5
  CONFIGS=deblurring,denoising,deraining,bundled
  LOAD_SIZE=512x512; LOAD_TILE=512; OVERLAP=32; BIG=720x1280; BIG_TILE=512; TILES=256,384,512,768; DURATION=8; ENGINE_S=2
  CLIENTS=32; TILING_CONFIG=deblurring
  # The released deblurring network with random weights: its speed is the trained one's.
  $PY -c "import sys, torch; sys.path.insert(0, '.'); from models import RELEASED_CONFIGS, save_safetensors; \
torch.manual_seed(0); save_safetensors(RELEASED_CONFIGS['deblurring'].build(), '$WORK/deblurring.safetensors')"
  NET=(--weights "$WORK/deblurring.safetensors")
fi

summarise() {  # merges what has finished into $OUT; run after each step
$PY - "$WORK" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
def load(name):
    path = work / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
runs = {name: load(name) for name in ("batched_c1", "batched_c32", "batched_c4", "unbatched_c1", "unbatched_c32",
                                       "unbatched_c4")}
(out / "loadgen.json").write_text(json.dumps({k: v for k, v in runs.items() if v}, indent=2))
latency = {name: load(name) for name in ("latency_whole", "latency_tiled")}
(out / "latency_720p.json").write_text(json.dumps(latency, indent=2))
lines = ["# bench/gpu.sh results", "", (out / "env.txt").read_text(), "## Goals", ""]
def summary(run):
    return run["summary"] if run else None
many = summary(runs.get("batched_c32") or runs.get("batched_c4"))
one = summary(runs.get("batched_c1"))
if many and one:
    lines.append(f"- batching: {many['service_images_per_s']:.2f} vs {one['service_images_per_s']:.2f} images/s "
                 f"at high vs 1 client = {many['service_images_per_s'] / one['service_images_per_s']:.2f}x (goal >= 2x)")
for name, run in runs.items():
    if run:
        s = run["summary"]
        lines.append(f"  - {name}: {s['service_images_per_s']:.2f} images/s, p50 {s['p50_ms']} ms, "
                     f"p95 {s['p95_ms']} ms, p99 {s['p99_ms']} ms")
bench = json.loads((out / "model_bench.json").read_text()) if (out / "model_bench.json").is_file() else None
if bench:
    rows = [r for r in bench["rows"] if "error" not in r]
    for r in rows:
        if r["precision"] == "fp32":
            continue
        base = next((b for b in rows if b["model"] == r["model"] and b["batch_size"] == r["batch_size"]
                     and b["precision"] == "fp32"), None)
        if base:
            lines.append(f"- {r['model']} {r['precision']} batch {r['batch_size']}: "
                         f"{r['megapixels_per_s'] / base['megapixels_per_s']:.2f}x fp32 (goal >= 2x), "
                         f"{r.get('psnr_vs_fp32_db', float('nan')):.1f} dB (goal >= 45)")
    best = max((r for r in rows if r.get("fraction_of_peak")), key=lambda r: r["fraction_of_peak"], default=None)
    if best:
        lines.append(f"- best fraction of peak: {best['fraction_of_peak']:.1%} ({best['model']}, {best['precision']}, "
                     f"batch {best['batch_size']}, against {best['peak_unit']}; goal > 30%)")
for name, run in latency.items():
    if run:
        s = run["summary"]
        lines.append(f"- {name} ({run['settings']['size']}): p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms "
                     f"(goal under 100 ms)")
if (work / "model_bench.md").is_file():
    lines += ["", "## Model forward", "", *(work / "model_bench.md").read_text().splitlines()[-40:]]
if (work / "model_bench_cl.md").is_file():
    lines += ["", "## Channels-last", "", *(work / "model_bench_cl.md").read_text().splitlines()[-6:]]
if (work / "tiling.md").is_file():
    lines += ["", "## Tiling", "", *(work / "tiling.md").read_text().splitlines()[-10:]]
(out / "summary.md").write_text("\n".join(lines) + "\n")
EOF
}

step environment
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  nproc; } | tee "$OUT/env.txt"

step "model forward: every configuration, precision and batch size"
timeout 200 $PY -m bench.model_bench --device $DEVICE --configs $CONFIGS --precisions $PRECISIONS \
  --batch-sizes $BATCHES --tile $TILE --repeats $REPEATS --json "$OUT/model_bench.json" | tee "$WORK/model_bench.md"
summarise

loadgen() {  # name, then loadgen's arguments
  local name=$1; shift
  # Its own session, so that a service left behind by a timed-out loadgen dies with its group.
  setsid timeout 75 $PY -m bench.loadgen --task deblurring "${NET[@]}" --device $DEVICE --precision $HALF \
    --warmup 2 --duration $DURATION --engine-seconds $ENGINE_S --images 8 --tile-overlap $OVERLAP \
    --json "$WORK/$name.json" "$@" \
    > "$WORK/$name.log" 2>&1 &
  local pid=$!
  wait $pid || echo "$name failed or timed out (exit $?)"
  kill -- -$pid 2>/dev/null
  grep -E "^(service|  round|engine)" "$WORK/$name.log" || tail -5 "$WORK/$name.log"
}
step "released deblurring on ${BIG} through HTTP, one client: whole image and tiled"
loadgen latency_whole --size $BIG --tile-size 0 --clients 1 --max-batch-size 1 --max-batch-wait-ms 0
loadgen latency_tiled --size $BIG --tile-size $BIG_TILE --clients 1 --max-batch-size 8 --max-batch-wait-ms 0

summarise

step "service, ${LOAD_SIZE} uploads: concurrency 1 and $CLIENTS, batching on and off"
for clients in 1 $CLIENTS; do
  loadgen "batched_c$clients" --size $LOAD_SIZE --tile-size $LOAD_TILE --clients $clients --max-batch-size 16 \
    --max-batch-wait-ms 5 --max-queued-tiles 256
  loadgen "unbatched_c$clients" --size $LOAD_SIZE --tile-size $LOAD_TILE --clients $clients --max-batch-size 1 \
    --max-batch-wait-ms 0 --max-queued-tiles 256
done
summarise

step "tiling overhead and best tile size"
timeout 90 $PY -m bench.tiling_bench --device $DEVICE --config $TILING_CONFIG --precision $HALF --size $BIG \
  --tiles $TILES --overlap $OVERLAP --batch 8 --repeats $REPEATS --json "$OUT/tiling.json" | tee "$WORK/tiling.md"
summarise

step "model forward, channels-last"
timeout 60 $PY -m bench.model_bench --device $DEVICE --configs ${CONFIGS%%,*} --precisions fp32,$HALF \
  --batch-sizes ${BATCHES##*,} --tile $TILE --repeats $REPEATS --channels-last \
  --json "$OUT/model_bench_channels_last.json" | tee "$WORK/model_bench_cl.md"

summarise
cat "$OUT/summary.md"
echo "total ${SECONDS}s"
rm -rf "$WORK"
