#!/usr/bin/env bash
# The GPU checks on a CUDA machine.  By default (at most 4 minutes) these four, in this order:
#   0. the `gpu`-marked tests (pytest -m gpu tests/), reading the real files from $DATA (as NEUMONIA_DATA)
#   1. the DALI GPU loader against DALI on the CPU on real files (scripts/dali_gpu_smoke.py): should it fail,
#      training and evaluation use the torchvision loader
#   2. the loader benchmark on the real full-resolution files and on the 224 set (DALI GPU where DALI imports)
#   3. training fed by each loader against the same batches already in GPU memory (feed)
# With FULL=1 these follow (at most 10 minutes in all):
#   4. parameters and step times of both variants, fp32, fp32 + channels-last, bf16 + channels-last (train.py --count-params)
#   5. a whole training run on chest_xray_224 to early stop with the default recipe, fed by DALI when it
#      imports, else torchvision, then its modelo.h5 tested again by --eval-only under its stored rule;
#      should DALI training fail with a minute of its limit left, the torchvision loader trains in the time
#      left (step_train)
#   6. LIME: our 1,000-sample explanation of inception_v3 (random weights) at two batch sizes
# The default steps' limits add up to GPU_BUDGET (225 s: 40 + 90 + 45 + 50), FULL=1's to 525 s, under
# FULL_BUDGET (560 s); start-up and packing take about 15 s more.
# BUDGET (seconds; default GPU_BUDGET, FULL_BUDGET with FULL=1, 3600 for the CPU part) caps them all
# together: a step gets at most what is left of it and is skipped with under 15 s left, so that a run given
# less time still ends by writing the summary and packing the logs.  To stop the whole run within T seconds:
# BUDGET=T-20.
# Results go to $OUT (default out/device_check): summary.txt, the benchmark JSONs, with FULL=1 the training
# run's metrics, epoch log and figures, and every step's log packed into logs.tgz to keep $OUT small (the
# training run's modelo.h5 is not kept).
# Data: $DATA (default .data, else ../shared/data) holding chest_xray_224/ and chest_xray_fullres/.
# DALI is used when it imports (a DALI installed under .dali/site is put on PYTHONPATH); without it the
# checks run too, with the torchvision rows only.
#   bash scripts/device_check.sh                     # on a CUDA machine: the four default steps
#   FULL=1 bash scripts/device_check.sh              # the same, then the training run, --count-params, LIME
#   BUDGET=130 bash scripts/device_check.sh          # the default steps, in at most 150 s
#   DEVICE_CHECK_CPU=1 OUT=/tmp/dc bash scripts/device_check.sh   # the CPU part: every step, smaller sizes
# The CPU part runs FULL=1's steps too, on the CPU; its gpu_tests step finds and skips every gpu test.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device_check}
mkdir -p "$OUT"
DATA=${DATA:-.data}
[ -d "$DATA/chest_xray_224" ] || DATA=../shared/data
[ -d .dali/site ] && export PYTHONPATH=$PWD/.dali/site${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
[ -x .venv/bin/python ] && [ -z "${DEVICE_CHECK_GPU_PY:-}" ] && PY=.venv/bin/python
CPU=${DEVICE_CHECK_CPU:-0}
FULL=${FULL:-0}
GPU_BUDGET=225  # the GPU part's default BUDGET, seconds
FULL_BUDGET=560  # the same with FULL=1
if [ "$CPU" = 1 ]; then BUDGET=${BUDGET:-3600}
elif [ "$FULL" = 1 ]; then BUDGET=${BUDGET:-$FULL_BUDGET}
else BUDGET=${BUDGET:-$GPU_BUDGET}
fi
T0=$SECONDS
LOADER=torchvision
$PY -c "import nvidia.dali" 2>/dev/null && LOADER=dali
NPROC=$(nproc)
IMAGE=$(find "$DATA/chest_xray_224/test" -name "*.jpeg" 2>/dev/null | sort | head -n 1)  # LIME's image
{
  echo "== machine"; nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  [ -d .dali ] && [ ! -f .dali/site/.done ] && echo "WARNING: .dali/ present but not installed (run bash .dali/install.sh first): no DALI rows"
  echo "loader for training: $LOADER; cores: $NPROC; data: $DATA ($(find "$DATA/chest_xray_fullres" -name "*.jpeg" 2>/dev/null | wc -l) full-resolution files)"
} | tee "$OUT/summary.txt"

step() {  # name, seconds, command...: at most what is left of BUDGET; skipped with under 15 s left
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 15 ]; then
    echo "== $name: skipped, $left s of the $BUDGET s budget left" | tee -a "$OUT/summary.txt"
    return 125
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit $limit s)" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log" | tr "\r" "\n" | grep -E '^[|{]|img/s|ms/image|^[0-9]+ +[|] |[Ee]rror|FAILED|^[0-9]+ (passed|failed|skipped)' | tail -n 25 >> "$OUT/summary.txt"
  echo "($name: rc=$rc, $((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
  return $rc
}

step_train() {  # seconds, train.py options...: train with $LOADER; should DALI fail with a minute or
  # more of the limit left, torchvision gets what is left, so that the run still yields a trained model
  # (the DALI log and any epochs it logged are kept in logs.tgz)
  local limit=$1; shift
  local t0=$SECONDS
  step train "$limit" $PY train.py --loader "$LOADER" "$@" && return 0
  local rc=$?
  # skipped (no time left) or stopped at its limit (training, not failing): nothing to fall back from
  [ "$rc" = 125 ] || [ "$rc" = 124 ] && return "$rc"
  local left=$((limit - (SECONDS - t0)))
  local budget_left=$((BUDGET - (SECONDS - T0)))
  [ "$budget_left" -lt "$left" ] && left=$budget_left
  [ "$LOADER" = dali ] && [ "$left" -ge 60 ] || return 1
  echo "DALI training failed: the torchvision loader gets the remaining $left s" | tee -a "$OUT/summary.txt"
  [ -f "$OUT/run/log.jsonl" ] && mv "$OUT/run/log.jsonl" "$OUT/train_dali_epochs.log"
  rm -rf "$OUT/run"
  LOADER=torchvision
  step train_torchvision "$left" $PY train.py --loader torchvision "$@"
}

step_smoke() {  # seconds, dali_gpu_smoke.py options...: where DALI imports, check its loader; should a
  # check fail, train and evaluate with torchvision rather than with a loader that gives wrong batches
  local limit=$1; shift
  if [ "$LOADER" != dali ]; then
    echo "== smoke: skipped, DALI does not import" | tee -a "$OUT/summary.txt"
    return 0
  fi
  step smoke "$limit" $PY scripts/dali_gpu_smoke.py "$@" && return 0
  local rc=$?
  [ "$rc" = 125 ] && return 125  # skipped: no time left
  echo "DALI smoke check failed (rc=$rc$([ "$rc" = 124 ] && echo ": not done in $limit s")): training and" \
       "evaluation use the torchvision loader" | tee -a "$OUT/summary.txt"
  LOADER=torchvision
  return 1
}

if [ "$CPU" = 1 ]; then
  step gpu_tests 120 env NEUMONIA_DATA="$DATA" $PY -m pytest -q -p no:cacheprovider -m gpu tests/
  step_smoke 120 --data "$DATA" --cpu
  step bench 300 $PY -m benchmarks --data "$DATA" --sections loaders --repeats 1 \
       --min-images 64 --n224 64 --batch-sizes 16 --json "$OUT/bench.json"
  step feed 300 $PY -m benchmarks --data "$DATA" --sections training --train-steps 1 \
       --train-batch-size 2 --json "$OUT/feed.json"
  step count_params 300 $PY train.py --count-params --device cpu --batch-size 4
  step_train 300 --data-dir "$DATA/chest_xray_224" --no-pretrained \
       --train-subset 16 --epochs 1 --tta 2 --batch-size 8 --out "$OUT/run" --weights-out "$OUT/run/modelo.h5"
  step eval_only 300 $PY train.py --data-dir "$DATA/chest_xray_224" --eval-only --loader "$LOADER" \
       --weights "$OUT/run/modelo.h5" --no-tta --batch-size 8 --json
  step lime 120 $PY -m benchmarks.lime_comparison --sweep 8 --sweep-samples 16 --sweep-model inception_v3 --repeats 1 \
       --image "$IMAGE"
else
  step gpu_tests 40 env NEUMONIA_DATA="$DATA" $PY -m pytest -q -p no:cacheprovider -m gpu tests/
  step_smoke 90 --data "$DATA" --threads 4
  step bench 45 $PY -m benchmarks --data "$DATA" --sections loaders --repeats 8 \
       --min-images 3200 --n224 400 --batch-sizes 64 --json "$OUT/bench.json"
  step feed 50 $PY -m benchmarks --data "$DATA" --sections training --train-steps 300 \
       --train-batch-size 16 --json "$OUT/feed.json"
  if [ "$FULL" = 1 ]; then
    step count_params 60 $PY train.py --count-params --device cuda --batch-size 64
    step_train 195 --data-dir "$DATA/chest_xray_224" --no-pretrained \
         --batch-size 16 --num-workers "$NPROC" --epochs 30 --tta 4 8 --out "$OUT/run" --weights-out "$OUT/run/modelo.h5"
    step eval_only 25 $PY train.py --data-dir "$DATA/chest_xray_224" --eval-only --loader "$LOADER" \
         --weights "$OUT/run/modelo.h5" --no-tta --json
    step lime 20 $PY -m benchmarks.lime_comparison --sweep 64 256 --sweep-samples 1000 --sweep-model inception_v3 --repeats 3 \
         --image "$IMAGE"
  fi
fi
cp "$OUT"/run/{metrics.json,log.jsonl,learning_curves.png,confusion_matrix.png} "$OUT"/ 2>/dev/null
rm -rf "$OUT/run"
# the step logs packed into one archive, to keep $OUT small
(cd "$OUT" && tar czf logs.tgz ./*.log && rm -f ./*.log)
cat "$OUT/summary.txt"
ls "$OUT"
