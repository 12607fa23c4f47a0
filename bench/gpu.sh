#!/usr/bin/env bash
# GPU checks for a machine with CUDA, capped to end within 9 minutes:
#   1. the test suite with REFORMER_TEST_DEVICE=cuda (cap 120 s; the suite may ignore it),
#   2. bench.attention in bf16 on cuda against SDPA (cap 150 s),
#   3. bench.flat in bf16 on cuda (cap 90 s),
#   4. `reformer plan` against torch.cuda.max_memory_allocated, fp32, 3 lengths (cap 60 s),
#   5. bench.step: the whole LM step against the peers and SDPA, fp32 (cap 120 s).
# Results: bench/results/gpu-tests.log, gpu-attention.json/.png, gpu-flat.json/.png,
# gpu-plan.log, gpu-step.json (the JSON
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
timeout 150 "$PY" -m bench.attention --device cuda --dtype bfloat16 --name gpu-attention \
  --lengths 4096 16384 65536 --max-peer-length 65536 \
  --configs lsh-1 lsh-4 lsh-8 local full sdpa reformer-pytorch transformers \
  --max-seconds 10 --max-mem-gib 60 --time-budget 120
echo "attention exit code $?"

echo "== 3. flat, bf16"
timeout 90 "$PY" -m bench.flat --device cuda --dtype bfloat16 --name gpu-flat \
  --lengths 1024 4096 16384 65536 --max-step-seconds 10 --max-mem-gib 60 --time-budget 70
echo "flat exit code $?"

echo "== 4. plan against max_memory_allocated"
timeout 60 "$PY" - <<'PYEOF' 2>&1 | tee bench/results/gpu-plan.log
from reformer import ReformerConfig
from reformer.plan import measure_step, plan_memory
for length in (16384, 65536, 262144):
    cfg = ReformerConfig(vocab_size=256, d_model=256, n_heads=4, d_ff=1024, n_layers=6,
                         max_seq_len=length, attention="lsh", n_hashes=4, chunk_len=64)
    pred, got = plan_memory(cfg, length).peak, measure_step(cfg, length, device="cuda")
    print(f"L {length}: plan {pred / 2**20:.0f} MiB, cuda {got / 2**20:.0f} MiB, "
          f"plan {pred / got - 1:+.1%}", flush=True)
PYEOF

echo "== 5. whole step against the peers"
timeout 120 "$PY" -m bench.step --device cuda --name gpu-step --repeats 3 --time-budget 100
echo "step exit code $?"

if [ -n "${OUT:-}" ]; then
  cp bench/results/gpu-* "$OUT"/ 2>/dev/null
fi
