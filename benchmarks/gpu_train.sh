#!/usr/bin/env bash
# One prepared GPU call (issue 5): train-step img/s of PSM-W48 384x288, batch 128, bf16,
# channels_last: eager, then torch.compile with scope "blocks" (regional: each residual block
# compiled in place), "exchange" (each exchange module in place) and "model" (the whole model),
# each within its timeout and the time left of BUDGET.
# The device tool runs it from the repo root; JSON per run goes to $OUT, compile seconds and img/s
# to stdout. Needs torch, pyyaml and OpenCV (psm_model.geometry), as gpu_check.sh: it runs the
# handler of `psm bench train` (benchmarks.train, psm_model) with ray, mlflow and pycocotools made
# unimportable, so a run that needed them would fail at once, also in a CPU dry run.
#
#   bash benchmarks/gpu_train.sh                      # on the GPU machine: <= BUDGET (530) s
#   CONFIG=configs/tiny.yaml BATCH=2 AMP=none CL=false STEPS=2 WARMUP=1 SCOPES=blocks \
#       bash benchmarks/gpu_train.sh                  # dry run of the same commands on a CPU
# The first of the WARMUP steps compiles: its seconds are "first step s" (compile + one step).
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
CONFIG=${CONFIG:-configs/psm_w48_384x288.yaml}
BATCH=${BATCH:-128} AMP=${AMP:-bf16} CL=${CL:-true} STEPS=${STEPS:-20} WARMUP=${WARMUP:-3}
BUDGET=${BUDGET:-530}        # seconds for the whole script (the device allows 600 per command)
REGION_LIMIT=${REGION_LIMIT:-240}  # per regional scope; "model" gets what is left
SCOPES=${SCOPES:-"blocks exchange model"}
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

bench() {  # NAME LIMIT_S OVERRIDES...
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET - SECONDS - 5))
    if ((limit > left)); then limit=$left; fi
    if ((limit < 30)); then echo "== $name: skipped, ${left}s of the budget left"; return; fi
    echo "== $name (timeout ${limit}s, $(date +%T))"
    local t0=$SECONDS
    timeout -k 10 "$limit" $PY -c "$BENCH_TRAIN" "$CONFIG" train.batch_size="$BATCH" \
        train.amp="$AMP" data.channels_last="$CL" "$@" --steps "$STEPS" --warmup "$WARMUP" \
        --json "$OUT/$name.json" 2>"$OUT/$name.err" | tail -1
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc, $((SECONDS - t0)) s wall"
    if ((rc != 0)); then tail -5 "$OUT/$name.err"; fi
}

bench eager 120
for scope in $SCOPES; do
    if [[ $scope == model ]]; then lim=$BUDGET; else lim=$REGION_LIMIT; fi
    bench "compile_$scope" "$lim" train.compile=true train.compile_scope="$scope"
done

$PY - "$OUT" <<'EOF'
import json, pathlib, sys
print("\n| run | img/s | step ms | first step s (compile) | peak GiB |")
print("|---|---:|---:|---:|---:|")
for name in ("eager", "compile_blocks", "compile_exchange", "compile_model"):
    p = pathlib.Path(sys.argv[1]) / f"{name}.json"
    if p.exists():
        r = json.loads(p.read_text())
        print(f"| {name} | {r['images_per_s']:.0f} | {r['step_ms']:.1f} "
              f"| {r['first_step_s']:.1f} | {r['peak_memory_gb']:.1f} |")
    else:
        print(f"| {name} | - | - | not finished | - |")
EOF
