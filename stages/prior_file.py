"""DVC stage `prior_file`: the content hash of ``learn.prior_file`` (transfer of a learned mask).

DVC cannot take a dependency whose path is a param, so this stage (always run, instant)
writes the file's sha256 to ``artifacts/prior_file.json``, a dependency of ``learn``: learn
reruns when the file's content changes, and not at all when ``learn.prior`` is not ``file``
(the output is then constant).
"""
from pathlib import Path

from pipeline.io import write_json
from pipeline.stage import run_stage
from pipeline.io import sha256_files
from pipeline.transfer import PriorFileError, read_metadata

OUT = Path("artifacts/prior_file.json")


def main(params):
    cfg = params.learn
    if cfg.prior != "file":
        write_json(OUT, {"prior_file": None})
        return f"learn.prior={cfg.prior}: no prior file"
    path = Path(cfg.prior_file)
    if not path.is_file():
        raise PriorFileError(f"learn.prior_file={cfg.prior_file!r} does not exist: export a mask "
                             "(python -m pipeline.transfer export <file>; dvc add <file>) or fix the path")
    meta = read_metadata(path)
    sha = sha256_files(path)
    write_json(OUT, {"prior_file": cfg.prior_file, "sha256": sha, "provenance": meta})
    origin = f"{meta.get('method', '?')} mask learned on {meta['learned_on']}" if "learned_on" in meta else "no provenance"
    return f"{cfg.prior_file}: sha256 {sha[:12]} ({origin})"


if __name__ == "__main__":
    run_stage("prior_file", main)
