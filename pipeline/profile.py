"""Named params overrides (profiles/NAME.yaml) for `dvc exp run` or for writing params.yaml.

    dvc exp run $(python -m pipeline.profile micro)          # -S key=value ... flags, one shell word each
    python -m pipeline.profile micro --write params.yaml     # apply in place
    python -m pipeline.profile --set learn.nnodes=2 --write params.yaml   # one key in place, validated
    python -m pipeline.profile --list                        # the profiles and what each is for

Every override is printed as one shell word (``$(...)`` splits on spaces and removes no quotes) in the
syntax of DVC's ``-S`` (Hydra's): ``evaluate.domains=[wiki,shakespeare]``.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
from pathlib import Path

import yaml

from pipeline.config import Params, parse_params

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
_BARE = re.compile(r"[A-Za-z_][\w./:@-]*")  # a string Hydra reads as itself without quotes
_KEYWORDS = {"true", "false", "null", "none", "nan", "inf", "-inf"}


class ProfileError(ValueError):
    pass


def load_profile(name: str) -> dict:
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise ProfileError(f"profile {name!r} not found in {PROFILES} (have: {names})")
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
    parse_params(out, f"params.yaml with {len(overrides)} override(s)")
    return out


def profile_params(name: str, params_path: str | Path = "params.yaml") -> Params:
    """params.yaml with the profile applied, validated."""
    raw = yaml.safe_load(Path(params_path).read_text())
    return parse_params(apply_overrides(raw, load_profile(name)), f"{params_path} with profile {name!r}")


def override_value(value, key: str = "") -> str:
    """A value in the syntax of DVC's -S (Hydra's grammar), with no space: one shell word."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v, key) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v, key)}" for k, v in value.items()) + "}"
    text = str(value)
    if any(c.isspace() for c in text):
        raise ProfileError(f"{key}={text!r}: a value with a space cannot be one shell word; change it in the profile")
    return text if _BARE.fullmatch(text) and text.lower() not in _KEYWORDS else json.dumps(text)


def command_words(overrides: dict) -> list[str]:
    """``-S key=value`` pairs, every one a single shell word."""
    return [w for k, v in overrides.items() for w in ("-S", f"{k}={override_value(v, k)}")]


def write(path: Path, overrides: dict) -> None:
    """Apply overrides to a params file in place, as ``dvc exp run -S`` does (DVC's own code: comments
    and order kept), validated before the file is replaced."""
    from dvc.utils.hydra import apply_overrides as dvc_apply

    from pipeline.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(path.read_text())
        dvc_apply(tmp, [f"{k}={override_value(v, k)}" for k, v in overrides.items()])
        parse_params(yaml.safe_load(tmp.read_text()), f"{path} with {len(overrides)} override(s)")


def purpose(path: Path) -> str:
    """What a profile is for: the first sentence of its header comment, without its leading ``name:``."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").strip())
    text = " ".join(header)
    text = text.split(": ", 1)[-1] if text.startswith(path.stem) else text
    return text.split(". ")[0].rstrip(".")


def describe() -> str:
    """Each profile with what it is for."""
    return "\n".join(f"{path.stem:15s} {purpose(path)}" for path in sorted(PROFILES.glob("*.yaml")))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", nargs="?")
    ap.add_argument("--write", metavar="PARAMS_YAML", help="apply the profile to this params file in place")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override of its own (with --write: set it in the params file); repeatable")
    ap.add_argument("--list", action="store_true", help="the profiles and what each is for")
    args = ap.parse_args(argv)
    if args.list or not (args.name or args.set):
        print(describe())
        return
    try:
        overrides = load_profile(args.name) if args.name else {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ProfileError(f"--set {item!r}: write KEY=VALUE, e.g. learn.nnodes=2")
            overrides[key] = yaml.safe_load(value)
        if args.write:
            write(Path(args.write), overrides)
        else:
            apply_overrides(yaml.safe_load(Path("params.yaml").read_text()), overrides)  # valid before printed
            print(" ".join(command_words(overrides)))
    except (ProfileError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
