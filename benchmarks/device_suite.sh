#!/usr/bin/env bash
# The one prepared device run: kernel == reference checks, attention timings against the
# XLA reference and cuDNN, GPT-2-small ARMD/AR train steps with MFU, sampling speed.
# At most 8 minutes on one H100/H200; writes $OUT/device_suite.json and $OUT/log.txt.
#   OUT=/some/dir bash benchmarks/device_suite.sh [extra device_suite.py flags]
#   SMOKE=1 OUT=/tmp/x bash benchmarks/device_suite.sh     # CPU: tiny shapes, interpreter
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_suite}
mkdir -p "$OUT"
flags=(--out_dir="$OUT" --poison)
if [ "${SMOKE:-0}" = 1 ]; then flags+=(--smoke); fi
PYTHONUNBUFFERED=1 timeout "${SUITE_TIMEOUT_S:-470}" "${PYTHON:-python3}" \
  benchmarks/device_suite.py "${flags[@]}" "$@" 2>&1 | tee "$OUT/log.txt"
