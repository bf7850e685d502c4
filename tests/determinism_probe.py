"""The first MaskLLM steps of the default model's shapes, in a fresh stage process: ``python -m
tests.determinism_probe MODEL_DIR JUNK`` prints each step's CE (exact, as float.hex) and a hash of the
logits. ``JUNK`` > 0 first allocates and frees blocks of odd sizes (seeded by it), so that the run's
tensors land elsewhere in memory than in a process that did not (tests/test_determinism.py)."""
import hashlib
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.maskllm.checkpoint import Checkpoint
from pipeline.maskllm.memory_plan import CONFIGS
from pipeline.maskllm.train import learn_masks
from pipeline.model.loading import load_model
from pipeline.stage import run_stage


ROOT = Path(__file__).resolve().parent.parent


def save_model(path: Path) -> None:
    """The probe's model: SmolLM2-135M's widths and vocabulary, 2 of its blocks, seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(CONFIGS / "smollm2-135m.json")
    config.num_hidden_layers = 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def probe(model: Path, junk: int, env: dict) -> dict:
    """This probe in a fresh process (``env``: its environment): {"ce": [hex per step], "logits": sha256}."""
    res = subprocess.run([sys.executable, "-m", "tests.determinism_probe", str(model), str(junk)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.split("] ", 1)[1].rsplit(" (", 1)[0])


def main(params, model_dir: str, junk: int):
    if junk:
        rng, kept = random.Random(junk), []
        for _ in range(300):
            block = torch.empty(rng.randint(1, 2_000_000) + rng.randint(0, 15)).fill_(rng.random())
            if rng.random() < 0.3:
                kept.append(block)
    model = load_model(model_dir, "float32", "cpu")
    train = torch.randint(0, model.config.vocab_size, (50_000,), generator=torch.Generator().manual_seed(0))
    cfg = params.learn.model_copy(update={"steps": 3, "checkpoint_every": 100})
    with tempfile.TemporaryDirectory() as folder:
        result = learn_masks(model, None, train, cfg, params.sparsity, Checkpoint(Path(folder), "probe"),
                             progress=False, log_every=1)
    digest = hashlib.sha256()
    for name, logits in sorted(result.masks.logits_state_dict().items()):
        digest.update(name.encode() + logits.numpy().tobytes())
    return json.dumps({"ce": [row["ce"].hex() for row in result.curve], "logits": digest.hexdigest()})


if __name__ == "__main__":
    run_stage("determinism probe", lambda p: main(p, sys.argv[1], int(sys.argv[2])))
