#!/usr/bin/env bash
# One prepared GPU call (issue 16): train-step img/s of the report's model (PSM-W48 384x288,
# heatmaps at stride 2) up the ladder of GPU settings, each rung adding one thing, next to the
# plain fp32 eager step of the official-equivalent HRNet-W48 (the 2.5x goal), all in one run:
#   hrnet_fp32       HRNet-W48 (fusion hrnet, stride 4), fp32, eager, NCHW: the baseline
#   eager            PSM-W48, bf16, channels_last, eager
#   fused            + Adam's fused kernel (train.fused_optimizer)
#   blocks           + torch.compile of each residual block in place (train.compile_scope=blocks)
#   blocks_graphs    + CUDA graphs (train.compile_mode=reduce-overhead)
#   model_graphs     the whole model compiled, CUDA graphs
#   big_batch        the rung named by BIG_FROM at batch BIG_BATCH (the H200's memory)
# Each run has its timeout and the time left of BUDGET; JSON per run goes to $OUT, a table to
# stdout. Needs torch, pyyaml and OpenCV, as gpu_check.sh: it runs `psm bench train`
# (benchmarks.train) with ray, mlflow and pycocotools made unimportable, so a run that needed
# them fails at once, also in a CPU dry run.
#
#   bash benchmarks/gpu_train.sh                      # on the GPU machine: <= BUDGET (530) s
#   CONFIG=configs/tiny.yaml BASE=configs/tiny.yaml BATCH=2 BIG_BATCH=4 AMP=none CL=false \
#       STEPS=2 WARMUP=1 RUNS="hrnet_fp32 eager fused big_batch" bash benchmarks/gpu_train.sh
#                                                     # dry run of the same commands on a CPU
# The first of the WARMUP steps compiles: its seconds are "first step s" (compile + one step).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
CONFIG=${CONFIG:-configs/psm_w48_384x288.yaml}
BASE=${BASE:-configs/hrnet_w48_384x288.yaml}  # the baseline's model
BATCH=${BATCH:-128} AMP=${AMP:-bf16} CL=${CL:-true} STEPS=${STEPS:-20} WARMUP=${WARMUP:-3}
BIG_BATCH=${BIG_BATCH:-256} BIG_FROM=${BIG_FROM:-fused}
BUDGET=${BUDGET:-530}        # seconds for the whole script (the device allows 600 per command)
RUNS=${RUNS:-"hrnet_fp32 eager fused blocks blocks_graphs big_batch model_graphs"}
PY=${PY:-python3}
BENCH_TRAIN="import sys
for m in ('ray', 'mlflow', 'pycocotools'):
    sys.modules[m] = None  # an import of these fails at once: the bench must not need them
from benchmarks.train import main
sys.exit(main(sys.argv[1:]))"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU: CPU dry run')"
echo "cpus: $(nproc)"

FAST="train.amp=$AMP data.channels_last=$CL"
COMPILED="train.fused_optimizer=true train.compile=true"
declare -A SETTINGS=(  # name: config, limit (s), overrides
    [hrnet_fp32]="$BASE|90|train.amp=none data.channels_last=false"
    [eager]="$CONFIG|90|$FAST"
    [fused]="$CONFIG|90|$FAST train.fused_optimizer=true"
    [blocks]="$CONFIG|180|$FAST $COMPILED train.compile_scope=blocks"
    [blocks_graphs]="$CONFIG|180|$FAST $COMPILED train.compile_scope=blocks train.compile_mode=reduce-overhead"
    [model_graphs]="$CONFIG|530|$FAST $COMPILED train.compile_scope=model train.compile_mode=reduce-overhead"
)

bench() {  # NAME BATCH CONFIG LIMIT OVERRIDES...
    local name=$1 batch=$2 config=$3 limit=$4; shift 4
    local left=$((BUDGET - SECONDS - 5))
    if ((limit > left)); then limit=$left; fi
    if ((limit < 30)); then echo "== $name: skipped, ${left}s of the budget left"; return; fi
    echo "== $name (batch $batch, timeout ${limit}s, $(date +%T)): $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" $PY -c "$BENCH_TRAIN" "$config" train.batch_size="$batch" "$@" \
        --steps "$STEPS" --warmup "$WARMUP" --json "$OUT/$name.json" 2>"$OUT/$name.err" | tail -1
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc, $((SECONDS - t0)) s wall"
    if ((rc != 0)); then tail -5 "$OUT/$name.err"; fi
}

for name in $RUNS; do
    if [[ $name == big_batch ]]; then
        IFS='|' read -r config limit overrides <<<"${SETTINGS[$BIG_FROM]}"
        batch=$BIG_BATCH
    else
        IFS='|' read -r config limit overrides <<<"${SETTINGS[$name]}"
        batch=$BATCH
    fi
    # shellcheck disable=SC2086  # the overrides are words
    bench "$name" "$batch" "$config" "$limit" $overrides
done

$PY - "$OUT" $RUNS <<'EOF'
import json, pathlib, sys
out, names = pathlib.Path(sys.argv[1]), sys.argv[2:]
base = out / "hrnet_fp32.json"
base_rate = json.loads(base.read_text())["images_per_s"] if base.exists() else None
print("\n| run | batch | img/s | x HRNet fp32 | step ms | first step s (compile) | peak GiB |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name in names:
    p = out / f"{name}.json"
    if not p.exists():
        print(f"| {name} | - | - | - | - | not finished | - |")
        continue
    r = json.loads(p.read_text())
    ratio = f"{r['images_per_s'] / base_rate:.2f}" if base_rate else "-"
    print(f"| {name} | {r['batch']} | {r['images_per_s']:.0f} | {ratio} | {r['step_ms']:.1f} "
          f"| {r['first_step_s']:.1f} | {r['peak_memory_gb']:.1f} |")
EOF
