"""DVC stage `row@<row>`: a fingerprint of the files that define one row of the comparison.

Each evaluate@<row>-<domain> stage depends on its row's fingerprint, so that a new MaskLLM
mask re-evaluates the MaskLLM row on every domain and nothing else (DVC's matrix stages cannot
look up a per-row path themselves).
"""
import sys
from pathlib import Path

from pipeline.io import sha256_files, write_json
from pipeline.evaluation.rows import DENSE, row_mask_path, row_weights_path
from pipeline.stage import run_stage

OUT = Path("artifacts/rows")


def sha256(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run `dvc repro` to produce it")
    return sha256_files(path)


def main(params, row):
    files = [p for p in (row_weights_path(row), row_mask_path(row)) if p is not None] or [DENSE / "model.safetensors"]
    write_json(OUT / f"{row}.json", {"row": row, "inputs": {str(f): sha256(f) for f in files}})
    return f"{row}: " + ", ".join(str(f) for f in files)


if __name__ == "__main__":
    run_stage(f"row {sys.argv[1]}", lambda p: main(p, sys.argv[1]))
