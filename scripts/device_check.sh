#!/bin/bash
# One GPU session's checks and benchmarks, in order of value, each time-boxed so that one failure or
# slow part does not cost the rest (docs/BENCHMARKS.md records what it printed).
#
#   OUT=output/device_check bash scripts/device_check.sh CIFAR10_TAR_GZ [SECONDS]
#
# CIFAR10_TAR_GZ: ../shared/data/cifar10/cifar10.tar.gz (copy it into the checkout to carry it along).
# SECONDS: the whole budget (default 540). PARTS: which parts run (default "1 2 3 4 5"); MOCO_ONLY=1:
# part 2 measures MoCo only; COMPILE=1: part 2 runs with --compile (networks and augmentation);
# TTA=moco|simclr|byol|simsiam|barlowtwins|swav: part 4's method (default moco; the last three take their
# img/s from an earlier part 7 in the same OUT, else give TTA_EPOCHS); TTA_EPOCHS: part 4's epochs (default: what fits
# the budget at part 2's img/s); TTA_EXTRA: more flags for part 4's method (e.g. "--aug-prefetch 0");
# RESERVE: seconds kept back from part 4 (default 100). Parts:
#   1. the CUDA tests (tests/test_cuda.py, the CUDA test of tests/test_batch_aug.py)
#   2. CIFAR-10 ResNet-18 step profile (scripts/count_step_ops.py --profile), img/s of MoCo v2, SimCLR
#      and BYOL, batch 512, bf16, --device-aug memory (scripts/benchmark.py); MoCo also without the
#      prefetch thread (--aug-prefetch 0), with --compile (and CUDA graphs), and through the PIL loader
#   3. ResNet-50 224 px MoCo v2 img/s: synthetic uint8 input vs 500x375 JPEGs through each loader
#   4. CIFAR-10 time to accuracy of $TTA (scripts/bench_cifar.py) with the epochs that fit the budget left
#   5. what time remains: augmentation-only throughput (scripts/bench_augment.py)
#   6. (only when PARTS names it) ViT-S/16 MoCo v3 batch 128 and DINO 2x224 + 10x96, bf16, img/s and memory
#   7. (only when PARTS names it) ViT-B/16 MAE batch 256 and SimSiam / Barlow Twins / SwAV CIFAR-10 img/s;
#      their 200-epoch time to accuracy is part 4 with TTA=simsiam|barlowtwins|swav
# A whole 200-epoch run needs a call of its own, e.g. PARTS=4 TTA=simclr TTA_EPOCHS=200 ... 590.
set -u
OUT=${OUT:-output/device_check}
TAR=${1:?usage: device_check.sh CIFAR10_TAR_GZ [SECONDS]}
BUDGET=${2:-540}
T0=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/selfsup_check}
left() { echo $((BUDGET - ($(date +%s) - T0))); }
part() { echo; echo "=== [t=$(($(date +%s) - T0)) s, $(left) s left] $*"; }
result() { echo "$*" | tee -a "$OUT/results.txt"; }
PARTS=" ${PARTS:-1 2 3 4 5} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
# bench NAME TIMEOUT ARGS...: scripts/benchmark.py under a time limit, its summary line into results.txt
bench() {
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt $((limit / 2)) ]; then result "$name: skipped (budget)"; return; fi
  local line
  line=$(timeout "$limit" $PY scripts/benchmark.py "$@" 2>&1 | tee /dev/stderr | grep -E 'img/s over') \
    && result "$name: $line" || result "$name: FAILED or timed out (${limit} s)"
}

part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__,
  "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
nproc
rm -rf "$WORK" && mkdir -p "$WORK" && tar xzf "$TAR" -C "$WORK"
C10=$(dirname "$(find "$WORK" -maxdepth 3 -type d -name train | head -1)")
echo "CIFAR-10 at $C10: $(find "$C10/train" -type f | wc -l) train, $(find "$C10/val" -type f | wc -l) val"

if want 1; then
part "1. CUDA tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_batch_aug.py::test_cuda_equals_cpu \
  && result "CUDA tests: passed" || result "CUDA tests: FAILED"
fi

CIFAR="$C10 --arch resnet18 --cifar-stem --crop-size 32 -b 512 --amp bf16 --workers 16 ${COMPILE:+--compile}"
# each method with scripts/bench_cifar.py's flags (lightly's CIFAR-10 settings)
margs() { $PY -c "import sys; sys.path.insert(0, 'scripts'); import bench_cifar; print(bench_cifar.METHOD_ARGS['$1'])"; }
if want 2; then
part "2. CIFAR-10 ResNet-18 img/s, batch 512, bf16"
# where a step's time goes: wall time vs its kernels' device time, without the loader
timeout 120 $PY scripts/count_step_ops.py --profile --top 6 2>&1 | grep -v USDT | tee -a "$OUT/results.txt"
bench "moco-cifar memory" 75 moco --steps 50 --warmup 20 -- $CIFAR --device-aug memory $(margs moco)
bench "moco-cifar memory, no prefetch" 75 moco --steps 50 --warmup 20 -- $CIFAR --device-aug memory \
  --aug-prefetch 0 $(margs moco)
if [ -z "${MOCO_ONLY:-}" ]; then
  bench "simclr-cifar memory" 75 simclr --steps 50 --warmup 20 -- $CIFAR --device-aug memory $(margs simclr)
  bench "byol-cifar memory" 75 byol --steps 50 --warmup 20 -- $CIFAR --device-aug memory $(margs byol)
fi
[ -z "${COMPILE:-}" ] && bench "moco-cifar memory --compile" 150 moco --steps 50 --warmup 30 -- $CIFAR \
  --device-aug memory $(margs moco) --compile
bench "moco-cifar memory --compile-mode reduce-overhead" 150 moco --steps 50 --warmup 30 -- $CIFAR \
  --device-aug memory $(margs moco) --compile --compile-mode reduce-overhead
bench "moco-cifar PIL" 75 moco --steps 30 --warmup 10 -- $CIFAR --device-aug off $(margs moco)
fi

if want 3; then
part "3. ResNet-50 224 px MoCo v2 img/s, batch 256, bf16"
timeout 60 $PY scripts/make_jpeg_set.py "$C10" "$WORK/jpeg500" --images 6400 -j 16
R50="--v2 --moco-k 4096 -b 256 --amp bf16 --workers 16"
bench "r50 synthetic (device aug)" 60 moco --steps 20 --warmup 10 -- synthetic:224 $R50 --device-aug memory
bench "r50 jpeg500 PIL" 60 moco --steps 20 --warmup 5 -- "$WORK/jpeg500" $R50 --device-aug off
bench "r50 jpeg500 files" 60 moco --steps 20 --warmup 5 -- "$WORK/jpeg500" $R50 --device-aug files
bench "r50 jpeg500 jpeg" 60 moco --steps 20 --warmup 5 -- "$WORK/jpeg500" $R50 --device-aug jpeg
fi

TTA=${TTA:-moco}
if want 4; then
part "4. $TTA CIFAR-10 time to accuracy"
# epochs that fit what is left, keeping RESERVE (100) s for start-up, the final kNN and part 5; epoch time
# from part 2's figure for $TTA (50,000 images per epoch)
IMG_S=$(grep -E "^$TTA-cifar memory:" "$OUT/results.txt" 2>/dev/null | grep -oE '[0-9.]+ img/s' | grep -oE '^[0-9.]+')
if [ -n "${TTA_EPOCHS:-}" ] || [ -n "$IMG_S" ]; then
  EPOCHS=${TTA_EPOCHS:-$($PY -c "print(max(0, min(200, int(($(left) - ${RESERVE:-100}) * $IMG_S / 50000 * 0.85))))")}
  result "time to accuracy: $EPOCHS epochs (${IMG_S:-?} img/s in part 2, $(left) s left)"
  if [ "$EPOCHS" -ge 5 ]; then
    timeout $(($(left) - 20)) $PY scripts/bench_cifar.py "$C10" --methods "$TTA" --epochs "$EPOCHS" --workers 16 \
      --extra "$TTA=${COMPILE:+--compile} ${TTA_EXTRA:-}" \
      --output-dir "$WORK/bench_cifar" 2>&1 | tail -5 | tee -a "$OUT/results.txt"
    cp "$WORK/bench_cifar/bench_cifar.json" "$OUT/" 2>/dev/null
    cp "$WORK/bench_cifar/$TTA/log.jsonl" "$OUT/${TTA}_cifar_log.jsonl" 2>/dev/null
  fi
else
  result "time to accuracy: skipped (no $TTA img/s from part 2, no TTA_EPOCHS)"
fi
fi

if want 5; then
part "5. extras while time is left"
if [ "$(left)" -gt 40 ]; then
  timeout $(($(left) - 5)) $PY scripts/bench_augment.py "$C10" --device cuda --sizes 32 --paths memory \
    --batch-size 512 --batches 20 --compile | tee -a "$OUT/results.txt"
fi
if [ "$(left)" -gt 60 ]; then
  timeout $(($(left) - 5)) $PY scripts/bench_augment.py "$C10" --device cuda --sizes 32 224 --workers 16 \
    --batch-size 256 --batches 8 | tee -a "$OUT/results.txt"
fi
fi
if want 6; then
part "6. ViT-S/16 224 px img/s and peak memory, bf16, synthetic input (issue 15)"
bench "mocov3 vit_small batch 128" 150 mocov3 --steps 20 --warmup 5 -- synthetic:224 --arch vit_small -b 128 \
  --amp bf16 --workers 8
bench "dino vit_small 2x224 + 10x96 batch 64" 150 dino --steps 20 --warmup 5 -- synthetic:224 --arch vit_small \
  -b 64 --amp bf16 --local-crops-number 10 --device-aug memory --epochs 20 --warmup-epochs 1
fi

if want 7; then
part "7. issues 16-17: ViT-B/16 MAE batch 256; SimSiam, Barlow Twins, SwAV on CIFAR-10 batch 512 (bf16)"
bench "mae vit_base batch 256" 150 mae --steps 20 --warmup 5 -- synthetic:224 --arch vit_base -b 256 --amp bf16 \
  --workers 8
bench "simsiam-cifar memory" 75 simsiam --steps 50 --warmup 20 -- $CIFAR --device-aug memory $(margs simsiam)
bench "barlowtwins-cifar memory" 75 barlowtwins --steps 50 --warmup 20 -- $CIFAR --device-aug memory \
  $(margs barlowtwins)
# SwAV takes its crops as lists (bench_cifar.CROP_ARGS) instead of --crop-size
bench "swav-cifar memory" 75 swav --steps 50 --warmup 20 -- $C10 --arch resnet18 --cifar-stem -b 512 --amp bf16 \
  --workers 16 --size-crops 32 --nmb-crops 2 --min-scale-crops 0.14 --max-scale-crops 1 --device-aug memory \
  $(margs swav)
fi
part "done"
