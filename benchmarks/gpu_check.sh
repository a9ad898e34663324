#!/usr/bin/env bash
# One-GPU check of lmcleaner at a realistic size (finishes in under 8 minutes on one GPU):
# builds a ~100M-parameter Llama from a config, trains 200 steps in bf16 with the trajectory
# recorder, unlearns 4 samples with exact replay and with LMCleaner, retrains as the oracle, and
# writes $OUT/gpu_check.json: throughput (tokens/s), peak GPU memory, the HVP/gradient cost ratio,
# LMCleaner's relative error to replay, bytes on disk against `lmcleaner plan`. See gpu_check.py.
#
#   OUT=/path/to/out bash benchmarks/gpu_check.sh                 # on a GPU machine
#   LMCLEANER_GPU_CHECK_SMOKE=1 OUT=/tmp/x bash benchmarks/gpu_check.sh   # CPU smoke test, tiny model
#
# Needs the package importable (pip install -e . or PYTHONPATH=src). Exit status 0 when every
# phase succeeded; a failed phase is recorded in the JSON with its error and the others still run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
# Bit-exact replay on CUDA needs deterministic cuBLAS workspaces (and deterministic kernels, set in Python).
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
export TOKENIZERS_PARALLELISM=false
if ! python -c "import lmcleaner" 2>/dev/null; then
    export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
fi
smoke=()
if [[ -n "${LMCLEANER_GPU_CHECK_SMOKE:-}" && "${LMCLEANER_GPU_CHECK_SMOKE}" != "0" ]]; then
    smoke=(--smoke)
fi
# 8 minutes in all; the JSON is rewritten after every phase, so a timeout still leaves results.
exec timeout 480 python "$here/gpu_check.py" --out "$OUT" "${smoke[@]}" "$@"
