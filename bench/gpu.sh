#!/usr/bin/env bash
# The GPU run of issue 18 in one call on a lent H100/H200: every GPU goal measured, results to $OUT.
#
# Before the call, here: `bash bench/gpu_wheels.sh` (the web stack's wheels, which the device image
# lacks, into .whl/); then run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600).
# The device has no ../shared and no package index: uploads are synthetic photos made here
# (bench/loadgen.py), and the networks are the released configurations with random weights (their
# speed is the trained ones').
#
# DRY=1 PY=<python> bash bench/gpu.sh runs every step on the CPU with tiny sizes through the same
# interpreter and wheel path (OUT defaults to ./gpu-dry-out), bf16 included (emulated) and a
# stand-in peak, so that every line of summary.md is produced without a GPU. A device-like Python
# to try it with: a venv holding only torch, numpy, pillow, httpx, prometheus-client, safetensors.
#
# Time plan: BUDGET seconds in all (default 570). Steps run goals first, each estimated (from the
# first H200 run's timings: all of them need about 630 s, so the last ones may be skipped) and capped
# at what is left; a step that would not fit is skipped and says so, and summary.md is rewritten
# after every step, so a run cut short still reports what it measured. Each step runs in its own
# process session, killed with everything it started (a loadgen's service) when it ends.
# Files written (4): summary.md and results.json (every step's JSON; both by bench/gpu_summary.py),
# log.txt, logs.tar.gz (each step's log).
set -u -o pipefail
cd "$(dirname "$0")/.."
DRY=${DRY:-0}
OUT=${OUT:-$PWD/gpu-dry-out}
BUDGET=${BUDGET:-570}
PY=${PY:-python3}
RESERVE=12  # for the last summary and the log archive
mkdir -p "$OUT"
WORK=$(mktemp -d)
SITE=$(mktemp -d)
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

record() {  # step status seconds
  printf '{"step": "%s", "status": "%s", "seconds": %s}\n' "$1" "$2" "$3" >> "$WORK/steps.jsonl"
}

summarise() {
  $PY -m bench.gpu_summary "$WORK" "$OUT" || echo "summary failed"
  tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.safetensors' . 2>/dev/null
}

running=  # the process session of the step in progress, ended with this script however it ends
trap '[ -n "$running" ] && kill -- -"$running" 2>/dev/null' EXIT
trap 'exit 143' INT TERM

step() {  # name estimate_s limit_s command... ; runs it if about estimate_s are left
  local name=$1 estimate=$2 limit=$3; shift 3
  local left=$((BUDGET - SECONDS - RESERVE))
  echo; echo "== $name (at ${SECONDS}s, ${left}s left)"
  if [ "$left" -lt "$estimate" ]; then
    record "$name" "skipped: ${left}s left, needs about ${estimate}s" 0
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local started=$SECONDS
  setsid timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1 &
  local pid=$!
  running=$pid
  wait $pid
  local code=$?
  kill -- -$pid 2>/dev/null
  running=
  local status=ok
  [ $code -eq 124 ] && status="timed out after ${limit}s"
  [ $code -ne 0 ] && [ $code -ne 124 ] && status="failed (exit $code)"
  record "$name" "$status" $((SECONDS - started))
  echo "$status in $((SECONDS - started))s"
  grep -E "^(service:|  round|engine\.|\| |tile |  (fp|bf)|- |PASS|FAIL|[0-9]+ passed)" "$WORK/$name.log" | tail -n 30
  [ "$status" = ok ] || tail -n 15 "$WORK/$name.log"
  summarise
}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m bench.install_wheels .whl "$SITE" && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} \
    || echo "wheels could not be unpacked: the service steps will fail their import check"
fi

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; HALF=fp32; PRECISIONS=fp32-no-tf32,fp32,bf16; TILE=32; BATCHES=1,2; REPEATS=1; CONFIGS=bundled
  LOAD_SIZE=64x64; LOAD_TILE=64; OVERLAP=8; BIG=72x128; BIG_TILE=64; TILES=32,48; DURATION=2; ENGINE_S=0.5
  CLIENTS=4; TILING_CONFIG=bundled; EXTRA_BENCH=(--allow-emulated-precision --stand-in-peak 2e11)
  # No CUDA graphs on a CPU: the graphs step runs eager, to exercise its plumbing and summary line.
  GRAPHS_SETTING=channels_last=false
  $PY -c "import torch; from models import MPRNet, save_safetensors; from bench.loadgen import RANDOM_CONFIGS; \
torch.manual_seed(0); save_safetensors(MPRNet(**RANDOM_CONFIGS['tiny']), '$WORK/net.safetensors')"
else
  DEVICE=cuda; HALF=bf16; PRECISIONS=fp32-no-tf32,fp32,fp16,bf16; TILE=512; BATCHES=1,4; REPEATS=3
  CONFIGS=deblurring,denoising,deraining,bundled
  LOAD_SIZE=512x512; LOAD_TILE=512; OVERLAP=32; BIG=720x1280; BIG_TILE=512; TILES=256,384,512,768; DURATION=6
  ENGINE_S=1; CLIENTS=32; TILING_CONFIG=deblurring; EXTRA_BENCH=(); GRAPHS_SETTING=cuda_graphs=true
  # The released deblurring network with random weights: its speed is the trained one's.
  $PY -c "import torch; from models import RELEASED_CONFIGS, save_safetensors; \
torch.manual_seed(0); save_safetensors(RELEASED_CONFIGS['deblurring'].build(), '$WORK/net.safetensors')"
fi

echo "== environment"
{ date -u; echo "budget ${BUDGET}s, dry $DRY"; uname -m; nproc
  grep -m1 "model name" /proc/cpuinfo
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || true
  echo "python: $($PY -V 2>&1) at $(command -v "$PY")"
  echo "pip: $($PY -m pip --version 2>&1 | head -1)"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', \
torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None, 'gpus', torch.cuda.device_count())"
  $PY -c "import importlib.metadata as m
print(', '.join(f'{n} {m.version(n)}' for n in ('fastapi', 'starlette', 'uvicorn', 'pydantic', 'pydantic-core', \
'pydantic-settings', 'python-multipart', 'httpx', 'numpy', 'pillow', 'prometheus-client', 'safetensors')))" 2>&1
} | tee "$WORK/env.txt"

# The web stack imports before any step depends on it, and says why not if it does not.
if $PY -c "import service.app, bench.loadgen" > "$WORK/import.log" 2>&1; then
  record import ok 0; SERVICE=1
else
  record import "failed: $(tail -n 1 "$WORK/import.log" | tr -d '"\\')" 0; SERVICE=0
  cat "$WORK/import.log"
fi

loadgen() {  # name estimate limit, then loadgen's own arguments (the network: --weights)
  local name=$1 estimate=$2 limit=$3; shift 3
  if [ $SERVICE = 0 ]; then record "$name" "skipped: the service does not import" 0; return; fi
  step "$name" "$estimate" "$limit" $PY -m bench.loadgen --task deblurring \
    --device $DEVICE --precision $HALF --warmup 2 --duration $DURATION --engine-seconds 0 --images 8 \
    --tile-overlap $OVERLAP --json "$WORK/$name.json" "$@"
}
released=(--weights "$WORK/net.safetensors")
# The fast-path switches are judged on the network the service serves by default (the bundled
# weights, n_feat 16), since their defaults are chosen for it.
bundled=(--weights models/weights/deblurring.safetensors)

step model_bench 100 150 $PY -m bench.model_bench --device $DEVICE --configs $CONFIGS --precisions $PRECISIONS \
  --batch-sizes $BATCHES --tile $TILE --repeats $REPEATS "${EXTRA_BENCH[@]}" --json "$WORK/model_bench.json"

loadgen latency_whole 30 70 "${released[@]}" --size $BIG --tile-size 0 --clients 1 --max-batch-size 1 --max-batch-wait-ms 0
loadgen latency_tiled 30 70 "${released[@]}" --size $BIG --tile-size $BIG_TILE --clients 1 --max-batch-size 8 --max-batch-wait-ms 0

batched=(--size $LOAD_SIZE --tile-size $LOAD_TILE --max-batch-size 16 --max-batch-wait-ms 5 --max-queued-tiles 256)
loadgen batched_c1 35 70 "${released[@]}" "${batched[@]}" --clients 1
# The one service run set against the engine alone in this process (full batches: the ceiling).
loadgen batched_c32 50 90 "${released[@]}" "${batched[@]}" --clients $CLIENTS --engine-seconds $ENGINE_S

step tiling 20 60 $PY -m bench.tiling_bench --device $DEVICE --config $TILING_CONFIG --precision $HALF --size $BIG \
  --tiles $TILES --overlap $OVERLAP --batch 8 --repeats $REPEATS --json "$WORK/tiling.json"

# Its own budget, below the step's cap, so that it skips its slowest part (compilation) rather than being killed.
fastpath_budget=$((BUDGET - SECONDS - RESERVE - 15)); [ $fastpath_budget -gt 110 ] && fastpath_budget=110
step fastpath 75 125 $PY -m bench.fastpath_check --device $DEVICE --json "$WORK/fastpath.json" \
  --time-budget $fastpath_budget

# Each switch alone against eager NCHW (the CUDA defaults turn both on).
eager=(--serve-setting cuda_graphs=false --serve-setting channels_last=false)
loadgen bundled_c32 35 70 "${bundled[@]}" "${batched[@]}" --clients $CLIENTS "${eager[@]}"
loadgen bundled_graphs_c32 35 70 "${bundled[@]}" "${batched[@]}" --clients $CLIENTS "${eager[@]}" \
  --serve-setting $GRAPHS_SETTING
loadgen bundled_channels_last_c32 35 70 "${bundled[@]}" "${batched[@]}" --clients $CLIENTS "${eager[@]}" \
  --serve-setting channels_last=true

loadgen unbatched_c32 35 70 "${released[@]}" --size $LOAD_SIZE --tile-size $LOAD_TILE --clients $CLIENTS \
  --max-batch-size 1 --max-batch-wait-ms 0 --max-queued-tiles 256

if [ "$DRY" = 1 ]; then
  record pytest "skipped: dry run (the CUDA-only tests skip on a CPU)" 0
elif [ $SERVICE = 1 ]; then
  step pytest 60 120 $PY -m pytest -q -p no:cacheprovider --timeout 60 tests/test_fastpath.py
  [ -s "$WORK/pytest.log" ] && tail -n 1 "$WORK/pytest.log" > "$WORK/pytest.txt"
fi

summarise
cat "$OUT/summary.md"
echo "total ${SECONDS}s"
rm -rf "$WORK" "$SITE"
