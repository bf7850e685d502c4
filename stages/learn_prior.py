"""DVC stage `learn_prior`: which mask file MaskLLM's prior is (``learn.prior``), and its content hash.

``learn`` depends on this file instead of on every one-shot prior: DVC cannot take a dependency
whose path is a param (``artifacts/prior/<learn.prior>``, or ``learn.prior_file`` for the transfer of
a learned mask), so this stage (always run, instant) writes the path and sha256 of the one in use to
``artifacts/learn_prior.json``. ``learn`` reruns when that mask changes, and not when another
prior does (its output is then the same bytes).
"""
from pathlib import Path

from pipeline.io import sha256_files, write_json
from pipeline.maskllm.transfer import PriorFileError, read_metadata
from pipeline.stage import run_stage

OUT, PRIOR = Path("artifacts/learn_prior.json"), Path("artifacts/prior")


def main(params):
    cfg = params.learn
    if cfg.prior == "none" or cfg.prior_strength == 0:
        write_json(OUT, {"prior": None})
        return f"learn.prior={cfg.prior}, learn.prior_strength={cfg.prior_strength}: no prior"
    if cfg.prior != "file":
        path = PRIOR / cfg.prior / "mask.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run `dvc repro prior@{cfg.prior}` first")
        sha = sha256_files(path)
        write_json(OUT, {"prior": cfg.prior, "file": str(path), "sha256": sha})
        return f"{cfg.prior}: {path}, sha256 {sha[:12]}"
    path = Path(cfg.prior_file)
    if not path.is_file():
        raise PriorFileError(f"learn.prior_file={cfg.prior_file!r} does not exist: export a mask "
                             "(python -m pipeline.maskllm.transfer export <file>; dvc add <file>) or fix the path")
    meta = read_metadata(path)
    sha = sha256_files(path)
    write_json(OUT, {"prior": "file", "file": cfg.prior_file, "sha256": sha, "provenance": meta})
    origin = f"{meta.get('method', '?')} mask learned on {meta['learned_on']}" if "learned_on" in meta else "no provenance"
    return f"{cfg.prior_file}: sha256 {sha[:12]} ({origin})"


if __name__ == "__main__":
    run_stage("learn_prior", main)
