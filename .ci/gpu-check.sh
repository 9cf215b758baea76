#!/usr/bin/env bash
# A first GPU run in one command, for a machine that has torch, transformers, accelerate and peft but no network
# and none of the kit's other packages: run from the repository root, writes the table to $OUT (default
# ./gpu-check). Installs nothing from the network; wheels carried in $WHEELS (default .ci/wheels, e.g. bitsandbytes)
# are installed from that folder only, where it exists. Exit code: 0 all ok or skipped, 1 a check failed, 124 timeout.
#   OUT=/some/folder bash .ci/gpu-check.sh            # GPU_CHECK_STEPS=4 steps per fit, GPU_CHECK_TIMEOUT=480 s
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
WHEELS="${WHEELS:-.ci/wheels}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install --no-index --find-links "$WHEELS" "$WHEELS"/*.whl >"$OUT/pip.log" 2>&1 \
    || echo "installing the wheels in $WHEELS failed: see $OUT/pip.log"
fi
{ nvidia-smi || echo "nvidia-smi: not found"; } >"$OUT/nvidia-smi.txt" 2>&1
timeout --kill-after=20 "${GPU_CHECK_TIMEOUT:-480}" \
  "$PY" -m mfkit.gpucheck "$OUT" --steps "${GPU_CHECK_STEPS:-4}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "gpu-check: stopped after ${GPU_CHECK_TIMEOUT:-480} s; the rows above are what ran"
exit "$status"
