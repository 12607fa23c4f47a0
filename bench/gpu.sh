#!/usr/bin/env bash
# GPU checks for a machine with CUDA, capped to end within 8 minutes:
#   1. the test suite with REFORMER_TEST_DEVICE=cuda (cap 120 s; the suite may ignore it),
#   2. bench.attention in bf16 on cuda against SDPA (cap 200 s),
#   3. bench.flat in bf16 on cuda (cap 130 s).
# Results: bench/results/gpu-tests.log, gpu-attention.json/.png, gpu-flat.json/.png (the JSON
# is rewritten after every row, so a capped run still leaves what it measured); all are
# copied to $OUT when it is set. Memory on cuda is torch.cuda.max_memory_allocated().
#
#   bash bench/gpu.sh          # PYTHON=/path/to/python picks the interpreter
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in .venv/bin/python python3 python; do
    if command -v "$cand" >/dev/null 2>&1 &&
      "$cand" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
      PY=$cand
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "gpu.sh: no python whose torch sees a CUDA device (set PYTHON=...)" >&2
  exit 2
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p bench/results
"$PY" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"

echo "== 1. tests on cuda"
REFORMER_TEST_DEVICE=cuda timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests \
  >bench/results/gpu-tests.log 2>&1
echo "pytest exit code $? (124: capped at 120 s)" | tee -a bench/results/gpu-tests.log
tail -n 3 bench/results/gpu-tests.log

echo "== 2. attention, bf16"
timeout 200 "$PY" -m bench.attention --device cuda --dtype bfloat16 --name gpu-attention \
  --lengths 4096 16384 65536 --max-peer-length 65536 \
  --configs lsh-1 lsh-4 lsh-8 local full sdpa reformer-pytorch transformers \
  --max-seconds 10 --max-mem-gib 60 --time-budget 170
echo "attention exit code $?"

echo "== 3. flat, bf16"
timeout 130 "$PY" -m bench.flat --device cuda --dtype bfloat16 --name gpu-flat \
  --lengths 1024 4096 16384 65536 --max-step-seconds 10 --max-mem-gib 60 --time-budget 100
echo "flat exit code $?"

if [ -n "${OUT:-}" ]; then
  cp bench/results/gpu-* "$OUT"/ 2>/dev/null
fi
