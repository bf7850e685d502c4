"""Named params overrides (profiles/NAME.yaml) for `dvc exp run` or for writing params.yaml.

    dvc exp run $(python -m pipeline.profile micro)          # -S key=value ... flags
    python -m pipeline.profile micro --write params.yaml     # apply in place
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import yaml

from pipeline.config import parse_params

PROFILES = Path(__file__).resolve().parent.parent / "profiles"


def load_profile(name: str) -> dict:
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise SystemExit(f"error: profile {name!r} not found in {PROFILES} (have: {names})")
    return yaml.safe_load(path.read_text()) or {}


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """Set dotted keys (``learn.tau: 4``) in a nested params dict; validates the result."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    parse_params(out)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name")
    ap.add_argument("--write", metavar="PARAMS_YAML", help="apply the profile to this params file in place")
    args = ap.parse_args(argv)
    overrides = load_profile(args.name)
    if args.write:
        raw = yaml.safe_load(Path(args.write).read_text())
        Path(args.write).write_text(yaml.safe_dump(apply_overrides(raw, overrides), sort_keys=False))
    else:
        print(" ".join(f"-S {k}={json.dumps(v)}" for k, v in overrides.items()))


if __name__ == "__main__":
    main()
