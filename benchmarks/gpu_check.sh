#!/usr/bin/env bash
# One prepared GPU session (the device tool runs it from the repo root; results go to $OUT).
# Needs only torch + pyyaml: psm_model and the bench are importable without Ray.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
python3 benchmarks/nccl_check.py 2>&1 | tail -3
python3 -m jobs.cli bench model configs/psm_w48_384x288.yaml --skip-cpu --gpu-batch 64 \
    --gpu-steps 20 --json "$OUT/w48_384x288_b64.json"
python3 -m jobs.cli bench model configs/psm_w32_256x192.yaml --skip-cpu --gpu-batch 128 \
    --gpu-steps 20 --json "$OUT/w32_256x192_b128.json"
python3 -m jobs.cli bench model configs/psm_w48_384x288.yaml --skip-cpu --gpu-batch 128 \
    --gpu-steps 15 --json "$OUT/w48_384x288_b128.json"
timeout 240 python3 -m jobs.cli bench model configs/psm_w48_384x288.yaml --skip-cpu --compile \
    --gpu-batch 64 --gpu-steps 20 --json "$OUT/w48_384x288_compile.json" || echo "compile: rc=$?"
