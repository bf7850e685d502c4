"""What every stage script shares: params first, user errors as one clear line, a summary line."""
from __future__ import annotations

import sys
import time
from typing import Callable

from pipeline.config import Params, load_params_or_exit

# Errors a user can cause (bad paths, missing packages, N:M that does not divide a layer):
# one line naming the problem and the fix, exit 1; anything else keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, RuntimeError)


def flush_denormals() -> None:
    """Flush float subnormals to zero (FTZ/DAZ) in this process's compute threads.

    Late in MaskLLM's schedule (tau -> 0.05) the soft masks hold subnormal floats, and every op
    that reads them runs up to ~80x slower on x86 (measured on Intel; 2-6x on AMD Zen 3).
    Threads inherit the setting from the thread that creates them, so it is set before torch
    starts its OpenMP pool (no parallel op has run yet when a stage starts).
    """
    if "torch" in sys.modules:  # stages that never import torch (hash-only ones) skip it
        sys.modules["torch"].set_flush_denormal(True)


def run_stage(name: str, body: Callable[[Params], str | None], params_path: str = "params.yaml") -> None:
    params = load_params_or_exit(params_path)  # before any work or write
    flush_denormals()
    t0 = time.time()
    try:
        summary = body(params)
    except KeyboardInterrupt:
        print(f"[{name}] interrupted; rerun `dvc repro` to resume", file=sys.stderr)
        raise SystemExit(130)
    except USER_ERRORS as e:
        if isinstance(e, FileNotFoundError) or type(e).__module__.startswith("pipeline"):
            print(f"[{name}] error: {e}", file=sys.stderr)
            raise SystemExit(1)
        raise
    if summary is not None:  # (None: a secondary process of a torchrun job; rank 0 summarises)
        print(f"[{name}] {summary} ({time.time() - t0:.1f} s)")
