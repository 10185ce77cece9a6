#!/usr/bin/env bash
# The one prepared device call (issue 13 priority 1, issue 14's CUDA/NCCL test), run ON the lent GPU machine:
#
#   here:   bash benchmarks/device/prepare.sh
#   device: run(command="bash benchmarks/device/run.sh", carry=[".device"], timeout_s=590)
#
# Stage 1 (<= 150 s): the CUDA tests (tests/test_device.py, the NCCL group of one in tests/test_dist.py).
# Stage 2 (<= STAGE2_S s): EfficientNet-Lite0 10x with the rate-menu allocation computed on the CPU
#   (benchmarks/results/alloc_efficientnet_lite0_10_sensitivity_0.3_menu-int8-int4-int2-fp16.json), all 500
#   calibration images of the seeded split, long block reconstruction (RECON_STEPS per block) and GLOBAL_STEPS
#   of distillation on the GPU; top-1 on the held-out 500. Compare with the CPU row of session 10 (78.40 %,
#   no reconstruction, 150 global steps x 32, 128 calibration images) in benchmarks/results/budget_menu_effnet.json.
# Everything lands in $OUT (logs, the JSON row); each stage has its own timeout so the first one's log survives.
# Timings at session 6 (H100): statistics + EM of the 46 layers 80 s on 16 cores, 14.7 global steps/s at batch 64.
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:=/tmp/out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/.device/site" BITDOWN_ASSETS="$PWD/.device/assets" PYTHONUNBUFFERED=1
RECON_STEPS="${RECON_STEPS:-1000}"; GLOBAL_STEPS="${GLOBAL_STEPS:-1000}"; STAGE2_S="${STAGE2_S:-400}"
DEVICE="${DEVICE:-cuda}"; CALIB="${CALIB:-500}"
stamp() { echo "[$(date -u +%T)] $*" | tee -a "$OUT/stages.log"; }

stamp "start; $(python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())')"
[ -f .device/assets/imagenet/imagenet-sample-images-256.zip ] || { stamp "no .device luggage: run prepare.sh here and carry .device"; exit 2; }

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stamp "stage 1: CUDA tests"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_device.py tests/test_dist.py -k "cuda or nccl" \
    2>&1 | tee "$OUT/tests.log"
  stamp "stage 1 done: rc ${PIPESTATUS[0]}"
fi

stamp "stage 2: EfficientNet-Lite0 10x, menu allocation, reconstruction ${RECON_STEPS} x block, ${GLOBAL_STEPS} global steps"
timeout "$STAGE2_S" python3 benchmarks/budget.py --models efficientnet_lite0 --ratios 10 --methods alloc \
  --device "$DEVICE" --calib-images "$CALIB" --codebook-bits 8 --alloc-weighting sensitivity --alloc-max-error 0.3 \
  --alloc-menu int8,int4,int2,fp16 \
  --allocation benchmarks/results/alloc_efficientnet_lite0_10_sensitivity_0.3_menu-int8-int4-int2-fp16.json \
  --layer-steps 0 --global-steps "$GLOBAL_STEPS" --batch-size 64 \
  --reconstruct "{\"steps\": ${RECON_STEPS}, \"lr\": 0.001, \"batch_size\": 32}" \
  --out "$OUT/effnet10_device.json" 2>&1 | tee "$OUT/effnet10.log"
stamp "stage 2 done: rc ${PIPESTATUS[0]}"
