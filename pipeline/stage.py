"""What every stage script shares: params first, user errors as one clear line, a summary line."""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

from pipeline.config import Params, load_params_or_exit

# Errors a user can cause (bad paths, missing packages, N:M that does not divide a layer):
# one line naming the problem and the fix, exit 1; anything else keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, ValueError, RuntimeError)


def default_device() -> str:
    """Where the stages compute: ``$MASKLLM_DEVICE``, else ``cuda`` where torch sees a GPU, else ``cpu``."""
    import torch

    return os.environ.get("MASKLLM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def flush_denormals() -> None:
    """Flush float subnormals to zero (FTZ/DAZ) in this process's compute threads.

    Late in MaskLLM's schedule (tau -> 0.05) the soft masks hold subnormal floats, and every op
    that reads them runs up to ~80x slower on x86 (measured on Intel; 2-6x on AMD Zen 3).
    Threads inherit the setting from the thread that creates them, so it is set before torch
    starts its OpenMP pool (no parallel op has run yet when a stage starts).
    """
    if "torch" in sys.modules:  # stages that never import torch (hash-only ones) skip it
        sys.modules["torch"].set_flush_denormal(True)


def reproducible_math() -> None:
    """Have Intel MKL (torch's CPU BLAS and LAPACK) give the same bits in every run on this machine.

    Without it MKL may pick code paths by the alignment of each buffer and change its thread count at
    run time (``MKL_DYNAMIC``), and on Intel CPUs with AVX-512 both can move a GEMM's last bits
    (oneMKL's "Conditional Numerical Reproducibility" chapter): allocations land at other addresses in
    every process, so the same learn run drifted. Strict CNR (``MKL_CBWR=AUTO,STRICT``) makes its GEMMs
    bitwise reproducible for a given thread count whatever the alignment, and turning MKL's dynamic
    threading off fixes that count (torch's ``set_num_threads`` does it). MKL reads ``MKL_CBWR`` at its
    first call, so this runs before any. A user's own ``MKL_CBWR`` is left as it is.
    """
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    if "torch" in sys.modules:  # (a torch-free stage makes no MKL call)
        torch = sys.modules["torch"]
        torch.set_num_threads(torch.get_num_threads())  # also mkl_set_dynamic(0): no thread count chosen at run time


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """On CPU, have glibc's malloc keep the memory torch frees, for its next allocations: True if set.

    By default glibc serves every block over 32 MiB (a batch's vocabulary-sized logits, their
    log-softmax and gradients: 200-400 MB each) with a fresh mmap, and hands the top of its heap
    back to the kernel once 2x that much is free. Every step then touches fresh pages again:
    200-570 K page faults per training step or evaluation batch of the default model, each a
    kernel entry and a 4 KiB zeroing: 15-20 % of the time of a step (bench/maskllm_step.py
    --default-malloc). With mmap off and trimming off, a freed block is reused as it is.

    The price is some fragmentation (peak RSS 3-6 % higher, measured there), and memory is not
    given back until the process ends, so it is only done where the stage computes on CPU in one
    process: a GPU run's host memory (e.g. ranks that load a model and move it to the GPU) and the
    ranks of a distributed run keep glibc's default.
    A malloc setting of the user's own (``MALLOC_*_`` or ``glibc.malloc`` in ``GLIBC_TUNABLES``)
    is left as it is.
    """
    import ctypes
    import platform

    if "torch" not in sys.modules or platform.libc_ver()[0] != "glibc":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
            k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    if default_device() != "cpu":  # (torch is imported already: the check costs no import)
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun rank (FSDP, DDP on CPU) gathers and frees block-sized buffers of many sizes, which a
        # heap that never gives memory back fragments: an FSDP rank peaked at 2,083 MiB so, 1,458 without
        # (a 51 M-parameter model, 2 ranks, one step)
        return False
    libc = ctypes.CDLL("libc.so.6")
    # -1: never trim (man mallopt); 0 mmaps: every block from the heap, reusable once freed
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def run_stage(name: str, body: Callable[[Params], str | None], params_path: str = "params.yaml") -> None:
    params = load_params_or_exit(params_path)  # before any work or write
    flush_denormals()
    reproducible_math()
    keep_freed_memory()
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
