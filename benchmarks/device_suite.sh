#!/usr/bin/env bash
# The one prepared device run: kernel == reference checks, attention timings against the
# XLA reference and cuDNN, GPT-2-small ARMD/AR train steps with MFU, sampling speed.
# At most 8 minutes on one H100/H200; writes $OUT/device_suite.json and $OUT/log.txt.
#   OUT=/some/dir bash benchmarks/device_suite.sh [extra device_suite.py flags]
#   SMOKE=1 OUT=/tmp/x bash benchmarks/device_suite.sh     # CPU: tiny shapes, interpreter
# RACE=1: only the training race (AR vs ARMD, 150 s of training each on the committed
# benchmarks/race_corpus.npz, then held-out perplexity and ARMD's S=4 decode time), its
# own run of about 7 minutes on an H200 (estimated; the rest of the suite takes ~400 s
# more, too much for one 10-minute call):
#   RACE=1 OUT=/some/dir bash benchmarks/device_suite.sh
#   RACE=1 SMOKE=1 OUT=/tmp/x bash benchmarks/device_suite.sh   # CPU: tiny race, ~2 min
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/device_suite}
mkdir -p "$OUT"
flags=(--out_dir="$OUT" --poison)
timeout_s=${SUITE_TIMEOUT_S:-470}
if [ "${SMOKE:-0}" = 1 ]; then flags+=(--smoke); fi
if [ "${RACE:-0}" = 1 ]; then
  flags+=(--sections=env,race --budget_s="${RACE_BUDGET_S:-540}")
  timeout_s=${SUITE_TIMEOUT_S:-590}
fi
PYTHONUNBUFFERED=1 timeout "$timeout_s" "${PYTHON:-python3}" \
  benchmarks/device_suite.py "${flags[@]}" "$@" 2>&1 | tee "$OUT/log.txt"
