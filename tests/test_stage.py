"""pipeline.stage.keep_freed_memory: freed blocks are reused instead of mapped afresh (page faults)."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tensors of 256, 252, 248 ... MB allocated and freed in turn: glibc's default maps every such block
# afresh (and unmaps it when freed), so each round faults all its pages in again; with freed memory
# kept, each fits in the block the round before freed. (Each is a little smaller than the last:
# torch asks for 64-byte-aligned memory, which glibc pads, so a block of exactly the freed size
# may not fit in it until its neighbours are free too.) Minor page faults are counted, not timed.
PROBE = """
import json, resource, sys
import torch
from pipeline.stage import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for mib in range(256, 224, -4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(mib * 2**18)  # every page written
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt: Linux with glibc only")


def probe(mode: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    environ.update({"MASKLLM_DEVICE": "cpu", **env})
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=environ, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@glibc_only
def test_freed_blocks_are_reused_without_page_faults():
    pages = 224 * 2**20 // 4096  # the smallest round's
    default, kept = probe("default"), probe("keep")
    assert not default["kept"] and kept["kept"]
    assert all(f >= pages for f in default["faults"])  # glibc's default: every round faults afresh
    assert kept["faults"][0] >= pages  # the first touch always faults
    assert all(f < 0.01 * pages for f in kept["faults"][1:])  # then the freed pages are reused


@glibc_only
def test_a_users_own_malloc_setting_is_left_alone():
    assert not probe("keep", MALLOC_MMAP_THRESHOLD_="65536")["kept"]
    assert not probe("keep", GLIBC_TUNABLES="glibc.malloc.arena_max=1")["kept"]


@glibc_only
def test_only_where_the_stage_computes_on_cpu():
    assert not probe("keep", MASKLLM_DEVICE="cuda")["kept"]
