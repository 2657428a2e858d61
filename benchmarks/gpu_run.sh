#!/usr/bin/env bash
# One prepared GPU call (issue 28): the whole project on the GPU machine within 540 s, results as
# JSON files in OUTDIR (the device tool brings back 8 files: these 7):
#   environment.json  the machine, its packages and the bundle's (pip list, pip check)
#   ladder.json       gpu_train.sh's ladder of model-only train steps, and the fastest rung
#   train.json        the whole `psm train` job at that rung's settings: Ray Data (the other
#                     CPUs) feeding one Ray Train worker on the GPU, on synthetic COCO-size images
#                     made here: samples/s, data_wait_frac, the data side's samples/s per epoch,
#                     and job / model-only
#   data.json         `psm bench data`: Ray Data samples/s at DATA_WORKERS workers, SIZE crops
#   infer.json        `psm bench infer`: the infer (detector + pose) and eval (given boxes)
#                     graphs with the pose model on the GPU, against the model alone
#   summary.md        the headline figures;  logs.tar.gz  every part's log
# First the bundle (benchmarks/device_bundle.sh) is installed offline into SITE and put on
# PYTHONPATH. Each part has its own timeout, cut to what is left of BUDGET: a part that hangs
# costs its own time only, and the script ends inside BUDGET.
#
#   bash benchmarks/gpu_run.sh "$OUT"     # the device tool, from the repo root, with
#                                         # carry: [".device_bundle"]
# A dry run on a CPU (tests/test_gpu_run.py), the venv's packages instead of the bundle:
#   BUNDLE= PY=.venv/bin/python CONFIG=configs/tiny.yaml BASE=configs/tiny.yaml BATCH=2 AMP=none \
#     CL=false STEPS=2 WARMUP=1 RUNS="eager fused" TRAIN_IMAGES=12 EPOCHS=2 SIZE=128x96 \
#     DATA_WORKERS=1 DATA_MIN_SAMPLES=32 INFER_IMAGES=8 DETECTORS=1 bash benchmarks/gpu_run.sh OUT
set -u
OUTDIR=${1:?usage: benchmarks/gpu_run.sh OUTDIR}
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RAY_ADDRESS=local  # every Ray part starts its own, never joins one
BUDGET=${BUDGET:-520}  # seconds for the whole script: <= 540 whatever hangs (the device: 600)
PY=${PY:-python3}
BUNDLE=${BUNDLE-.device_bundle}  # empty: no install, the Python's own packages (a dry run)
SITE=${SITE:-/tmp/psm-site}
WORK=${WORK:-$(mktemp -d /tmp/psm-gpu-run.XXXXXX)}  # data, checkpoints, MLflow, logs
CONFIG=${CONFIG:-configs/psm_w48_384x288.yaml}
# each part's seconds, at most (the ladder's runs share LADDER_S: gpu_train.sh's BUDGET)
INSTALL_S=${INSTALL_S:-120} LADDER_S=${LADDER_S:-120} TRAIN_S=${TRAIN_S:-150}
DATA_S=${DATA_S:-80} INFER_S=${INFER_S:-100}
MAX_COMPILE_S=${MAX_COMPILE_S:-40}  # a rung whose first step took longer is not trained on
TRAIN_IMAGES=${TRAIN_IMAGES:-2000} EPOCHS=${EPOCHS:-4} CHUNK=${CHUNK:-480}  # 15 blocks of 32
SIZE=${SIZE:-384x288} DATA_WORKERS=${DATA_WORKERS:-"1 2 4 8 15"}
DATA_MIN_SAMPLES=${DATA_MIN_SAMPLES:-6000}
INFER_IMAGES=${INFER_IMAGES:-400} DETECTORS=${DETECTORS:-8}
RUNTIMES=${RUNTIMES:-torch}  # ONNX Runtime has no GPU provider here; a CPU dry run takes both
INFER_ARGS=${INFER_ARGS:-}  # more arguments of the infer part: options, config overrides (words)
mkdir -p "$WORK/logs"
echo "gpu_run: OUTDIR $OUTDIR, work $WORK, budget ${BUDGET}s, $(date +%T)"

part() {  # NAME LIMIT COMMAND...: its log in $WORK/logs/NAME.log; its tail when it fails
    # what is left, less 10 s for a kill after the timeout and 20 s for the steps after the parts
    local name=$1 limit=$2 left=$((BUDGET - SECONDS - 30))
    shift 2
    if ((limit > left)); then limit=$left; fi
    if ((limit < 20)); then
        echo "== $name: skipped, ${left}s of the budget left"
        return 1
    fi
    echo "== $name (timeout ${limit}s, $(date +%T))"
    local t0=$SECONDS
    # timeout signals the command's process group; Ray's processes die with their driver
    timeout -k 10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc, $((SECONDS - t0)) s"
    if ((rc != 0)); then tail -15 "$WORK/logs/$name.log"; fi
    return $rc
}

# 0. the bundle, offline, into SITE; the working tree before it on the path
INSTALL_SECONDS=
if [[ -n $BUNDLE ]]; then
    t0=$SECONDS
    rm -rf "$SITE"
    part install "$INSTALL_S" "$PY" -m benchmarks.device_bundle install "$BUNDLE" "$SITE" &&
        INSTALL_SECONDS=$((SECONDS - t0))
    export PYTHONPATH="$PWD:$SITE"
else
    export PYTHONPATH="$PWD"
fi
USE_GPU=$("$PY" -c "import torch; print(str(torch.cuda.is_available()).lower())")
timeout 60 "$PY" -m benchmarks.gpu_run environment "$SITE" "$OUTDIR/environment.json" \
    ${INSTALL_SECONDS:+--install-s "$INSTALL_SECONDS"}
# the training images, made on one core while the ladder runs on the GPU
timeout 120 "$PY" -m jobs.make_data "$WORK/data" --images "$TRAIN_IMAGES" --val-fraction 0.1 \
    >"$WORK/logs/make_data.log" 2>&1 &
MAKE_DATA=$!

# 1. the ladder (gpu_train.sh: its own runs, timeouts and table), then the fastest rung
part ladder $((LADDER_S + 10)) env OUT="$WORK/ladder" BUDGET="$LADDER_S" PY="$PY" \
    CONFIG="$CONFIG" bash benchmarks/gpu_train.sh
tail -12 "$WORK/logs/ladder.log"
RUNG=$(timeout 30 "$PY" -m benchmarks.gpu_run ladder "$WORK/ladder" "$CONFIG" "$MAX_COMPILE_S" \
    "$OUTDIR/ladder.json")
echo "fastest rung's settings: ${RUNG:-none (the configured ones)}"

# 2. the whole training job at those settings, its figures read back from its MLflow run
wait $MAKE_DATA || echo "make-data: rc=$?, $(tail -3 "$WORK/logs/make_data.log")"
MLFLOW="sqlite:///$WORK/mlflow.db"
# shellcheck disable=SC2086  # RUNG is words
part train "$TRAIN_S" "$PY" -m jobs.train "$CONFIG" data.root="$WORK/data" \
    train.use_gpu="$USE_GPU" train.num_workers=1 train.cpus_per_worker=1 train.epochs="$EPOCHS" \
    train.val_every=0 data.chunk_images="$CHUNK" train.storage_path="$WORK/runs" \
    train.mlflow_uri="$MLFLOW" train.name=gpu-run $RUNG
timeout 60 "$PY" -m benchmarks.gpu_run train "$MLFLOW" gpu-run "$OUTDIR/ladder.json" "$CONFIG" \
    "$OUTDIR/train.json" ||
    # importing MLflow alone took over 30 s on a loaded machine: train.json says so, never absent
    echo "{\"error\": \"the run's figures were not read (rc=$?)\"}" >"$OUTDIR/train.json"

# 3. Ray Data alone: the val split's images, repeated to DATA_MIN_SAMPLES crops an epoch
# shellcheck disable=SC2086  # DATA_WORKERS is words
part data "$DATA_S" "$PY" -m jobs.cli bench data "$CONFIG" data.train_images=val2017 \
    data.train_annotations=annotations/person_keypoints_val2017.json --coco-root "$WORK/data" \
    --synthetic 0 --sizes "$SIZE" --workers $DATA_WORKERS --repeats 1 \
    --min-samples "$DATA_MIN_SAMPLES" --json "$OUTDIR/data.json"

# 4. the infer and eval graphs against the pose model alone, per runtime in RUNTIMES
# shellcheck disable=SC2086  # RUNTIMES and INFER_ARGS are words
part infer "$INFER_S" "$PY" -m jobs.cli bench infer "$CONFIG" --images "$INFER_IMAGES" \
    --runtimes $RUNTIMES --repeats 2 infer.detector.workers="$DETECTORS" $INFER_ARGS \
    --json "$OUTDIR/infer.json"

timeout 10 "$PY" -m benchmarks.gpu_run summary "$OUTDIR" | tee "$OUTDIR/summary.md"
tar -czf "$OUTDIR/logs.tar.gz" -C "$WORK" logs
echo "gpu_run: done in ${SECONDS}s"
