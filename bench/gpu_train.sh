#!/usr/bin/env bash
# Fine-tunes the bundled weights of all three tasks at once on a lent H100/H200, in one call; the
# run folders (last.pt, train.log) land in $OUT and come back. Issue 4: a few GPU minutes are worth
# many CPU hours. The device has no ../shared, so the training photos travel with the call:
#
#   echo /.gpu_data/ >> .git/info/exclude
#   mkdir -p .gpu_data && cp -r ../shared/datasets/train/CBSD432 .gpu_data/
#
# then: run(command="bash bench/gpu_train.sh", carry=[".gpu_data"], timeout_s=570).
# Here, afterwards: python -m training.bundle TASK $FILES_AT/TASK/last.pt, then training.evaluate.
#
# The three trainers share the GPU: the bundled network is small (n_feat 16), so one trainer
# leaves most of an H100 idle between its kernel launches. Deblurring, the task furthest from its
# goal, gets the largest batch and most patch workers (its degradations cost the most CPU). Its
# batch is 96, up from the 32 of every GPU run so far: alone on an H200 those ran 7.5 steps/s with
# the GPU 28-47 % busy, held back most likely by the step's own overhead, not by the patches. One
# training step is about 20,000 aten calls, nested ones counted (50-67 ms of CPU even on 32 px
# patches; sixteenth session, torch profiler), while one patch process degrades a batch of 32 in
# 0.17-0.29 s, so 12 make five times what the trainer took. At 28-47 % busy, three times the batch
# should about fill the GPU, for two to three times the pixels per second. Not yet timed on a GPU:
# the trainer's log and gpu_util.csv will say.
# TASKS="deblurring" trains only the tasks named (one alone gets the GPU to itself: deblurring ran
# 9.4 steps/s alone against 6.8 sharing); WORKERS overrides each trainer's patch processes (16
# cores: 12 suit a trainer alone). MINUTES is the training budget of each (default 7); INIT_DIR
# holds the starting TASK.safetensors (default models/weights; carry it if it is ignored); LR sets
# the peak learning rate of every trainer named. ARCH="16 16 4 2" (n_feat, scale_unetfeats,
# scale_orsnetfeats, num_cab) grows the starting weights into that wider network, which starts out
# computing what they compute (training/widen.py), and fine-tunes it. That one widens only the
# U-Net's lower levels, the one growth measured under the 2 s per 512x512 budget on the slowest CPU
# this project has met (an AVX2-only Zen 1: 1.77 s with OpenVINO against 1.72 s for the bundled
# width; 20/12/8/3 took 3.28 s there). Wider growths fit only faster CPUs (models/MODEL_CARD.md,
# Architecture). Trainers run bf16 autocast; TRAIN_PRECISION="" trains in fp32 instead, where the
# device has no bf16 instructions (a GPU before Ampere, an AVX2-only CPU), which the trainer refuses.
# PATCH sets the training crops' side (default 128); ATTENTION_PATCH=N trains channel attention
# that pools over windows the size of what it pooled on N x N crops (training.train
# --attention-patch; 0: the paper's whole-input pooling; unset: whatever the starting weights
# record). The twenty-eighth session's untried recipe: PATCH=192 ATTENTION_PATCH=128, with
# TASKS=deblurring (26 s a step on an AVX2 CPU; models/TRAINING_LOG.md).
# MIXTURE picks the degradations (training.train --mixture): "broad" by default, issue 16's
# realistic families (camera-pipeline noise, saturating/smeared/misty rain, some of it saved as
# JPEG, more blur trajectories with noise and JPEG) mixed with the classic ones, and some patches
# of each task left untouched (8-10 %, so that clean photos come back unchanged); "classic" is what
# the weights were first trained on; "randomized" is broad with randomized rain for deraining
# (every streak trait drawn on its own; tried on the CPU in the thirteenth session, untried at GPU
# scale). The camera pipeline costs more CPU per patch than white noise: give denoising more
# WORKERS than before (4 suit it when it shares the GPU).
# Files written: log.txt, gpu_util.csv, {task}/last.pt, {task}/train.log (a call brings back 8 files at most:
# after bench/gpu.sh's 4 in the same call, one task fits). The forward benchmark is bench/gpu.sh's.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-train-out}
DATA=${DATA:-.gpu_data/CBSD432}
MINUTES=${MINUTES:-7}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec >>"$OUT/log.txt" 2>&1
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
  nproc; ls "$DATA" | wc -l; } 2>&1
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 10 >"$OUT/gpu_util.csv" 2>&1 &
monitor=$!

start_from() {  # task -> the trainer's flags for its starting point
  echo "--init ${INIT_DIR:-models/weights}/$1.safetensors"
  if [ -n "${ARCH:-}" ]; then
    read -r feat unet orsnet cab <<<"$ARCH"
    echo "--n-feat $feat --scale-unetfeats $unet --scale-orsnetfeats $orsnet --num-cab $cab"
  fi
}

train() {  # task seed batch lr workers
  mkdir -p "$OUT/$1"
  # shellcheck disable=SC2046  # start_from's flags are meant to split
  $PY -m training.train --task "$1" --mixture "${MIXTURE:-broad}" --data "$DATA" --out "$OUT/$1" $(start_from "$1") \
    --seed "$2" --batch "$3" --lr "$4" --workers "$5" --patch "${PATCH:-128}" ${ATTENTION_PATCH:+--attention-patch "$ATTENTION_PATCH"} \
    --minutes "$MINUTES" ${TRAIN_PRECISION---bf16} --threads 2 \
    --warmup 200 --val-minutes 1.5 --save-minutes 1 --log-every 200 > /dev/null &
  trainers+=($!)
}
trainers=()
for task in ${TASKS:-deblurring deraining denoising}; do
  case $task in
    deblurring) train deblurring 21 96 "${LR:-1e-3}" "${WORKERS:-8}" ;;
    deraining) train deraining 22 16 "${LR:-1e-3}" "${WORKERS:-3}" ;;
    denoising) train denoising 23 16 "${LR:-5e-4}" "${WORKERS:-4}" ;;
    *) echo "unknown task $task"; exit 2 ;;
  esac
done
wait "${trainers[@]}"
echo "training done at ${SECONDS}s"
tail -n 2 "$OUT"/*/train.log
kill $monitor 2>/dev/null
echo "total ${SECONDS}s"
