#!/usr/bin/env bash
# The one GPU check (at most 8 minutes on one GPU): MaskLLM steps in float32 and bfloat16, a SparseGPT
# prior, their peaks against pipeline/maskllm/memory_plan.py, CUDA against CPU masks. Writes bench/results/gpu_check.json
# (and a copy under $OUT when the device tool sets it). No network, no DVC / MLflow, no weights:
#
#   bash bench/gpu_check.sh                  # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --cpu-dry-run    # anywhere: every part on CPU with tiny configs
#
# Python: $PYTHON, else the first of python3 / python that imports torch. A package it lacks
# (transformers, numpy, tqdm) is installed from wheels carried in bench/wheels/ (built for that
# machine's Python), never from the network.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}     # the parts stop starting at this many seconds ...
HARD_LIMIT_S=${GPU_CHECK_LIMIT_S:-470}  # ... and the whole script is stopped here (8 minutes with start-up)

if [ -z "${PYTHON:-}" ]; then
  for candidate in python3 python .venv/bin/python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null; then
      PYTHON=$candidate; break
    fi
  done
fi
if [ -z "${PYTHON:-}" ]; then
  echo "gpu_check: no Python with torch found (set PYTHON=/path/to/python)" >&2; exit 2
fi

missing=$("$PYTHON" - <<'PY'
import importlib.util
print(" ".join(name for name in ("transformers", "numpy", "tqdm", "safetensors")
               if importlib.util.find_spec(name) is None))
PY
)
if [ -n "$missing" ]; then
  if compgen -G "bench/wheels/*.whl" >/dev/null; then
    echo "gpu_check: installing $missing from bench/wheels/" >&2
    "$PYTHON" -m pip install --quiet --no-index --find-links bench/wheels $missing
  else
    echo "gpu_check: $PYTHON lacks $missing and bench/wheels/ has no wheels for it; carry them" \
         "(pip download --only-binary=:all: --python-version 3.12 -d bench/wheels $missing)" >&2
    exit 2
  fi
fi

"$PYTHON" -c "import torch, transformers; print('gpu_check: torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
# SIGINT first: Python unwinds and the result file keeps every part finished so far
exec timeout --signal=INT --kill-after=15 "$HARD_LIMIT_S" "$PYTHON" -m bench.gpu_check --budget-s "$BUDGET_S" "$@"
