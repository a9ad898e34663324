#!/usr/bin/env bash
# CI smoke run of `lmcleaner demo` in a small configuration (the whole story runs; the numbers are the
# tests' business), with a message instead of a silent exit 124 when it runs out of time.
# Usage: .ci/demo_smoke.sh OUT_DIR [extra demo overrides...]   (DEMO_TIMEOUT seconds, default 900)
set -uo pipefail
out="$1"; shift
limit="${DEMO_TIMEOUT:-900}"
mkdir -p "$out"
log="$out/demo.log"
timeout "$limit" lmcleaner demo demo.out_dir="$out/demo" demo.steps=60 'demo.Ks=[10]' 'demo.hessian_modes=[GGN]' \
    demo.eval_max_new_tokens=8 "$@" >"$log" 2>&1
status=$?
tail -n 25 "$log"
if [ "$status" -eq 124 ]; then
    echo "CI: lmcleaner demo smoke run timed out after ${limit} s (full log: $log)"
    exit 1
elif [ "$status" -ne 0 ]; then
    echo "CI: lmcleaner demo smoke run failed with exit status $status (full log: $log)"
    exit 1
fi
if [ ! -s "$out/demo/report.md" ]; then
    echo "CI: lmcleaner demo smoke run wrote no report ($out/demo/report.md)"
    exit 1
fi
echo "CI: lmcleaner demo smoke run ok ($out/demo/report.md)"
