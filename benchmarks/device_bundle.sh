#!/usr/bin/env bash
# The folder a GPU-machine run takes along (issue 28; benchmarks/device_bundle.py says what is in
# it and why). On the CPU machine, with the project's venv (its pip and `packaging`) and PyPI:
#
#   PY=.venv/bin/python bash benchmarks/device_bundle.sh .device_bundle  # build, prove complete
#   PY=.venv/bin/python bash benchmarks/device_bundle.sh check .device_bundle   # proof, offline
#   bash benchmarks/device_bundle.sh install .device_bundle /tmp/psm-site   # on the GPU machine
#
# A build takes about a minute; the first one also xz-packs Ray (~20 CPU-seconds, then cached in
# ~/.cache/psm-pose). .device_bundle/ is git-ignored: the device tool takes it along with
# `carry: [".device_bundle"]`.
set -euo pipefail
PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
case ${1:?usage: device_bundle.sh OUT | check BUNDLE | install BUNDLE TARGET} in
    check | install) exec "${PY:-python3}" -m benchmarks.device_bundle "$@" ;;
    *) exec "${PY:-python3}" -m benchmarks.device_bundle build "$1" ;;
esac
