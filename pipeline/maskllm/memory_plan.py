"""Per-rank peak memory of MaskLLM ``learn`` and of the one-shot priors, from a model's config alone.

    python -m pipeline.maskllm.memory_plan pipeline/maskllm/model_configs/llama-2-7b.json --nm 2:4 --world 8 --parallel fsdp \\
        --dtype bfloat16 --batch 8 --seqlen 4096 --activation-checkpointing
    python -m pipeline.maskllm.memory_plan pipeline/maskllm/model_configs/llama-2-7b.json --stage prior --nsamples 128 --seqlen 2048
    python -m pipeline.maskllm.memory_plan --table          # README: 80 GB GPUs per model, 2:4 and 4:8, DDP and FSDP

The model is built on the meta device (transformers' ``from_config``: shapes, no weights, nothing
downloaded). What follows from shapes is counted from them: frozen weights, the N:M targets
(``pipeline.model.nm.find_prunable_layers``), their logits ``[G, C]`` and AdamW's state. What follows
from the code is counted by running that code on meta tensors (exact, free, any size):

- the tensors one block keeps for backward (``saved_tensors_hooks``), with the N:M targets'
  weights requiring grad as the masked weights do; attention is counted as what flash /
  memory-efficient SDPA keeps (q, k, v, out, logsumexp) unless ``--attention math``;
- what the torch mask path (``pipeline.maskllm.kernel.masked_weight`` on a device other than CPU, the CUDA path) keeps per
  layer (its inputs only: it recomputes the sample in backward), the transient peaks of its
  forward and backward (the recompute included) and of the LM loss
  (:class:`LiveBytes`: every tensor an op creates, until it is freed).

A training step is then a timeline of moments (loss, backward of each block, optimizer step), each
with the tensors alive then; the plan's peak is the largest. Not counted on the device: the CUDA
context and the caching allocator's fragmentation (``--table`` keeps 8 % of each GPU for them), and
on the host the interpreter and libraries (a constant per process: ``memory_measure.py`` measures it).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline.maskllm.kernel import masked_weight
from pipeline.model.nm import candidates as make_candidates, find_blocks, find_prunable_layers
from pipeline.oneshot import registry

CONFIGS = Path(__file__).resolve().parent / "model_configs"  # shipped configs, by name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TABLE_MODELS = ("smollm2-135m", "llama-3.2-1b", "llama-2-7b", "llama-3.1-8b", "llama-2-70b")
GB = 1e9


class PlanError(ValueError):
    """A config or setting the plan cannot take; the message names it and the fix."""


# ------------------------------------------------------------------ the model, on meta

def load_config(path: str | Path):
    """A transformers config from a config.json (or a folder holding one), e.g. pipeline/maskllm/model_configs/llama-2-7b.json."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        named = CONFIGS / (path.name if path.name.endswith(".json") else f"{path.name}.json")
        if named.is_file():
            path = named
        else:
            known = ", ".join(p.stem for p in sorted(CONFIGS.glob("*.json")))
            raise PlanError(f"{path}: no such config; pass a config.json or a model folder, or one of: {known}")
    config = load_config_dict(json.loads(path.read_text()), str(path))
    config.name_or_path = path.parent.name if path.name == "config.json" else path.name.removesuffix(".json")
    return config


def load_config_dict(raw: dict, source: str = "config"):
    """A transformers config from the dict of a config.json."""
    from transformers import AutoConfig

    if "model_type" not in raw:
        raise PlanError(f"{source}: no 'model_type' key: not a transformers config.json")
    return AutoConfig.for_model(**raw)


@functools.lru_cache(maxsize=8)
def _meta_model_cached(key: str, dtype: str):
    from transformers import AutoModelForCausalLM

    config = load_config(key)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.config.use_cache = False
    return model.eval()


def meta_model(config_path: str | Path, dtype: str = "float32"):
    """The causal LM of ``config_path`` on the meta device (no memory, no weights)."""
    return _meta_model_cached(str(config_path), dtype)


@dataclass
class Target:
    """One N:M target: its parameter's stored shape and its logical ``[.., out, in]`` width."""

    name: str
    shape: tuple[int, ...]
    numel: int
    block: int


@dataclass
class Shapes:
    """What the plan needs of a model: its blocks' parameters, its N:M targets, the rest (root)."""

    name: str
    block_params: list[list[tuple[int, ...]]]  # per block: the shape of every parameter
    root_params: list[tuple[int, ...]]  # embeddings, final norm, LM head (a tied head counted once)
    targets: list[Target]
    vocab: int
    hidden: int

    @property
    def blocks(self) -> int:
        return len(self.block_params)

    @property
    def params(self) -> int:
        return sum(math.prod(s) for b in self.block_params for s in b) + sum(math.prod(s) for s in self.root_params)

    @property
    def prunable(self) -> int:
        return sum(t.numel for t in self.targets)

    def block_numel(self, b: int) -> int:
        return sum(math.prod(s) for s in self.block_params[b])

    def block_targets(self, b: int) -> list[Target]:
        return [t for t in self.targets if t.block == b]


def shapes_of(model, m: int) -> Shapes:
    """Blocks, targets and root parameters of a (meta) model; a target whose width m does not divide raises."""
    _, blocks = find_blocks(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    layers = find_prunable_layers(model, m)
    head = model.get_output_embeddings().weight
    return Shapes(
        name=str(getattr(model.config, "name_or_path", type(model).__name__)),
        block_params=[[tuple(p.shape) for p in block.parameters()] for block in blocks],
        root_params=[tuple(p.shape) for p in model.parameters() if id(p) not in in_blocks],
        targets=[Target(layer.param_name, tuple(layer.param().shape), layer.param().numel(), layer.block)
                 for layer in layers],
        vocab=head.shape[0], hidden=head.shape[1])


# ------------------------------------------------------------------ counting code on meta tensors

def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors ops create inside the mode, while they are alive: ``live`` now, ``peak`` so far.

    A tensor kept only by autograd (saved for backward) keeps its Python object alive (PyTorch
    preserves it), so it counts until autograd releases it. Views share their base's storage.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage -> [bytes, tensors alive on it]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view of a tensor made before the mode (a weight's transpose) is no new memory
        inputs = {_storage_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key in self._storages or key not in inputs:
                    self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [t.untyped_storage().nbytes(), 0]
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.live -= entry[0]
                del self._storages[key]

    def reset_peak(self) -> None:
        self.peak = self.live


@contextlib.contextmanager
def saved_bytes(exclude: set[int]):
    """Count the distinct storages autograd saves inside the block (not those in ``exclude``) -> [bytes]."""
    seen: dict[int, int] = {}
    total = [0]

    def pack(t):
        key = _storage_key(t)
        if key not in exclude and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            total[0] += seen[key]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


class _FlashLikeAttention(torch.autograd.Function):
    """What flash / memory-efficient SDPA keeps for backward: q, k, v, out and a float32 logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    return _FlashLikeAttention.apply(query, key, value)


class _Stop(Exception):
    pass


@contextlib.contextmanager
def as_learn_sees_it(block, attention: str):
    """The block as MaskLLM trains it: weights frozen, but every weight matrix's W * mask requires grad
    (so each product keeps its input); SDPA replaced by the flash-like stand-in unless ``attention`` is math."""
    flags = [(p, p.requires_grad) for p in block.parameters()]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    try:
        for p, _ in flags:
            p.requires_grad_(p.ndim >= 2)
        if attention == "flash":
            torch.nn.functional.scaled_dot_product_attention = _flash_like_sdpa
        yield block
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for p, flag in flags:
            p.requires_grad_(flag)


def block_call(model, seqlen: int, dtype: torch.dtype, batch: int = 1):
    """Block 0's (args, kwargs) for ``batch`` sequences of ``seqlen`` tokens, captured from a meta forward."""
    import transformers.masking_utils as masking

    _, blocks = find_blocks(model)
    got = {}

    def grab(module, args, kwargs):
        got["call"] = (args, kwargs)
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    # meta tensors hold no values: the packed-sequence check (which reads position ids) cannot run;
    # the plan is for unpacked sequences, which it would find
    packed, masking.find_packed_sequence_indices = masking.find_packed_sequence_indices, lambda position_ids: None
    try:
        model(input_ids=torch.zeros(1, seqlen, dtype=torch.long, device="meta"), use_cache=False)
    except _Stop:
        pass
    except Exception as e:
        raise PlanError(f"{type(model).__name__}: its forward cannot run on the meta device ({type(e).__name__}: "
                        f"{e}); the plan needs it to count activations") from None
    finally:
        handle.remove()
        masking.find_packed_sequence_indices = packed
    args, kwargs = got["call"]
    # (the captured position embeddings are [1, seqlen, head_dim]: they broadcast over the batch)
    hidden = torch.empty(batch, seqlen, args[0].shape[-1], dtype=dtype, device="meta", requires_grad=True)
    return (hidden, *args[1:]), kwargs


@functools.lru_cache(maxsize=64)
def block_saved_per_sequence(config_path: str, dtype: str, seqlen: int, attention: str) -> int:
    """Bytes block 0 keeps for backward for one sequence, beyond its parameters (masked weights apart)."""
    model = meta_model(config_path, dtype)
    _, blocks = find_blocks(model)
    block = blocks[0]
    args, kwargs = block_call(model, seqlen, DTYPES[dtype])
    exclude = {_storage_key(p) for p in model.parameters()}
    exclude |= {_storage_key(t) for t in tree_leaves(kwargs) if isinstance(t, torch.Tensor)}  # shared by all blocks
    with as_learn_sees_it(block, attention), saved_bytes(exclude) as total:
        block(*args, **kwargs)
    return total[0]


@functools.lru_cache(maxsize=64)
def block_backward_transient(config_path: str, dtype: str, seqlen: int, attention: str) -> int:
    """Bytes a block's backward adds, for one sequence, above what its forward left (activation gradients)."""
    model = meta_model(config_path, dtype)
    _, blocks = find_blocks(model)
    args, kwargs = block_call(model, seqlen, DTYPES[dtype])
    tracker = LiveBytes()
    with as_learn_sees_it(blocks[0], attention), tracker:
        out = blocks[0](*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        tracker.reset_peak()
        after_forward = tracker.live
        # the gradient with respect to the input only: the weights' gradients are the masks' (counted there)
        grad = torch.autograd.grad(out, args[0], torch.empty_like(out))
        del grad, out
    return max(0, tracker.peak - after_forward)


@dataclass(frozen=True)
class MaskCost:
    """Bytes of the torch mask path on one layer (the CUDA path), beyond its inputs and output."""

    saved: int  # kept for backward until the layer's backward
    forward_transient: int  # above saved + output, at the peak of its forward
    backward_transient: int  # above what backward starts with, incl. the incoming gradient of W * mask


@functools.lru_cache(maxsize=256)
def mask_cost(shape: tuple[int, ...], n: int, m: int, dtype: str) -> MaskCost:
    """:class:`MaskCost` of one stored weight ``shape`` ([out, in] or [E, out, in]), counted on meta tensors."""
    cands = make_candidates(n, m).to("meta")  # a buffer of the mask, not per step
    numel = math.prod(shape)
    weight = torch.empty(shape, dtype=DTYPES[dtype], device="meta")
    logits = torch.empty(numel // m, cands.shape[0], device="meta", requires_grad=True)
    exclude = {_storage_key(weight), _storage_key(logits), _storage_key(cands)}
    out_bytes = numel * weight.element_size()
    tracker = LiveBytes()
    with tracker, saved_bytes(exclude) as saved:
        out, sq, _ = masked_weight(weight, logits, cands, (1, 2), 1.0, 100.0)  # meta tensors: the torch path
        forward_peak = tracker.peak
        after_forward = tracker.live
        tracker.reset_peak()
        grad = torch.empty_like(out)  # what F.linear hands back: the gradient of W * mask
        torch.autograd.backward([out, sq], [grad, torch.ones((), dtype=sq.dtype, device="meta")])
        backward_peak = tracker.peak - after_forward
        del out, sq, grad
    # the logits' gradient outlives the backward: the plan counts it as a gradient, not a transient
    return MaskCost(saved[0], max(0, forward_peak - saved[0] - out_bytes), max(0, backward_peak - logits.numel() * 4))


@functools.lru_cache(maxsize=64)
def loss_cost(vocab: int, hidden: int, tokens: int, dtype: str) -> tuple[int, int]:
    """(forward peak, backward peak) bytes of the LM head + loss on ``tokens`` tokens, as transformers computes it."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    head = torch.empty(vocab, hidden, dtype=DTYPES[dtype], device="meta")
    x = torch.empty(1, tokens, hidden, dtype=DTYPES[dtype], device="meta", requires_grad=True)
    labels = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    tracker = LiveBytes()
    with tracker:
        logits = torch.nn.functional.linear(x, head)
        loss = ForCausalLMLoss(logits, labels, vocab_size=vocab)
        del logits  # the model's output (which holds them) is dropped once `.loss` is read
        forward_peak = tracker.peak
        tracker.reset_peak()
        loss.backward()
        backward_peak = tracker.peak
    return forward_peak, backward_peak


@functools.lru_cache(maxsize=64)
def block_forward_transient(config_path: str, batch: int, seqlen: int) -> int:
    """Peak bytes of a no-grad float32 block forward on ``batch`` x ``seqlen`` tokens (input and output included)."""
    model = meta_model(config_path, "float32")
    _, blocks = find_blocks(model)
    args, kwargs = block_call(model, seqlen, torch.float32, batch)
    tracker = LiveBytes()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_like_sdpa  # inference: no [T, T] matrix either
    try:
        with torch.no_grad(), tracker:
            hidden = torch.empty_like(args[0]).requires_grad_(False)
            out = blocks[0](hidden, *args[1:], **kwargs)
            del out, hidden
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
    return tracker.peak


# ------------------------------------------------------------------ the plans

@dataclass(frozen=True)
class LearnSetup:
    """One `learn` run: what the params say (learn.*, sparsity.*) and where it runs."""

    n: int = 2
    m: int = 4
    world: int = 1  # learn.nproc x learn.nnodes: processes, one per GPU
    parallel: str = "ddp"  # ddp | fsdp
    dtype: str = "float32"  # frozen weights and activations
    activation_checkpointing: bool = False
    batch: int = 2  # learn.batch_size: global, in micro-batches over the ranks
    seqlen: int = 512
    micro_batch: int = 2  # learn.micro_batch_size: sequences per forward (the activations scale with it)
    nodes: int = 1  # learn.nnodes: host memory per node = per rank x world / nodes
    device: str = "cuda"  # cuda: one GPU per rank, the host apart; cpu: one memory
    prior_masks: bool = True  # the stage holds the prior's bool masks while it learns
    attention: str = "flash"  # what SDPA keeps: flash (flash / memory-efficient kernels) | math
    kernel: str = ""  # masked_weight: torch (ops under autograd) | cpp (the CPU kernel); "": as the device uses
    # False (the code): each block caches its layers' W * mask only while it runs (pipeline.maskllm.masks
    # _cache_in); True: a cache over the whole forward (what the code did before; it matters with
    # activation checkpointing only: without it, autograd keeps recipes of W * mask (FSDP: every W * mask))
    weight_cache: bool = False
    recompute: bool = True  # learn.recompute_masked_weights (FSDP keeps W * mask regardless)

    def check(self) -> None:
        if self.parallel not in ("ddp", "fsdp"):
            raise PlanError(f"parallel={self.parallel!r}: choose ddp or fsdp")
        if self.dtype not in DTYPES:
            raise PlanError(f"dtype={self.dtype!r}: choose one of {list(DTYPES)}")
        if self.device not in ("cuda", "cpu"):
            raise PlanError(f"device={self.device!r}: choose cuda or cpu")
        if self.kernel not in ("", "torch", "cpp"):
            raise PlanError(f"kernel={self.kernel!r}: choose torch or cpp")
        if self.attention not in ("flash", "math"):
            raise PlanError(f"attention={self.attention!r}: choose flash or math")
        if self.world < 1 or self.micro_batch < 1 or self.batch % (self.micro_batch * self.world):
            raise PlanError(f"batch={self.batch} must be a multiple of micro_batch={self.micro_batch} x world="
                            f"{self.world} (learn.batch_size, learn.micro_batch_size, learn.nproc x learn.nnodes): "
                            "every rank takes the same number of micro-batches")
        if self.nodes < 1 or self.world % self.nodes:
            raise PlanError(f"world={self.world} processes do not divide over nodes={self.nodes}")
        if not 1 <= self.n < self.m:
            raise PlanError(f"N:M = {self.n}:{self.m}: need 1 <= N < M (N = weights kept)")


@dataclass
class Plan:
    """Per-rank bytes: the peak moment's tensors by name, every moment's total, and the host side."""

    stage: str
    model: str
    setup: dict
    moment: str  # when the device peak happens
    terms: dict[str, int]  # what is alive then
    moments: dict[str, int]
    device_peak_bytes: int
    host_peak_bytes: int  # CPU memory of one process, without the interpreter (cpu runs: the device peak included)
    host_terms: dict[str, int]
    host_per_node_bytes: int = 0  # every rank of a node: host_peak_bytes x ranks per node
    mask_state_bytes: int = 0  # logits + gradients + AdamW state held by this rank between steps
    params: int = 0
    prunable: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _shard(shape: tuple[int, ...], world: int) -> int:
    """Elements of one rank's FSDP2 shard of a parameter (dim 0 split evenly, padded)."""
    return math.ceil(shape[0] / world) * math.prod(shape[1:]) if world > 1 else math.prod(shape)


def plan_learn(config_path: str | Path, s: LearnSetup) -> Plan:
    """Per-rank peak memory of one `learn` step (after the first: AdamW's state exists)."""
    s.check()
    model = meta_model(config_path, s.dtype)
    sh = shapes_of(model, s.m)
    C = math.comb(s.m, s.n)
    bw = DTYPES[s.dtype].itemsize
    fsdp = s.parallel == "fsdp" and s.world > 1
    ddp = s.parallel == "ddp" and s.world > 1
    W = s.world if fsdp else 1
    seqs = s.micro_batch  # sequences per forward: the accumulation steps run one after the other
    tokens = seqs * s.seqlen

    def logits(t: Target, sharded: bool = True) -> int:  # float32 [G, C], split over the groups by FSDP
        groups = t.numel // s.m
        return 4 * C * (math.ceil(groups / W) if sharded else groups)

    block_logits = [sum(logits(t, False) for t in sh.block_targets(b)) for b in range(sh.blocks)]
    block_weights = [sh.block_numel(b) * bw for b in range(sh.blocks)]
    local_logits = sum(logits(t) for t in sh.targets)
    frozen = (sum(_shard(p, W) for b in sh.block_params for p in b) + sum(_shard(p, W) for p in sh.root_params)) * bw
    static = {"frozen weights": frozen, "logits": local_logits, "AdamW state": 2 * local_logits,
              "mask choices (flip rate)": sum(math.ceil(t.numel // s.m / W) for t in sh.targets) * 2}
    if fsdp:  # the root stays gathered from its forward to the end of backward (FSDP2's root heuristic)
        static["root weights (gathered)"] = sum(math.prod(p) for p in sh.root_params) * bw
    if ddp:  # the reducer's flat buckets: one more copy of the gradients
        static["DDP gradient buckets"] = local_logits

    per_seq = block_saved_per_sequence(str(config_path), s.dtype, s.seqlen, s.attention)
    block_bwd = block_backward_transient(str(config_path), s.dtype, s.seqlen, s.attention) * seqs
    activations = [per_seq * seqs] * sh.blocks
    masked = [sum(t.numel for t in sh.block_targets(b)) * bw for b in range(sh.blocks)]  # W * mask, one per layer
    # mask_kernel.kernel_name: the C++ kernel on CPU up to 128 candidates, torch ops elsewhere
    torch_path = (s.kernel or ("cpp" if s.device == "cpu" else "torch")) == "torch" or C > 128
    costs = {t.name: (mask_cost(t.shape, s.n, s.m, s.dtype) if torch_path else MaskCost(0, 0, t.numel * bw))
             for t in sh.targets}
    kept = [sum(costs[t.name].saved for t in sh.block_targets(b)) for b in range(sh.blocks)]
    # pipeline.maskllm.masks.RecomputedWeights (learn: all but FSDP): autograd keeps a recipe, not W * mask; a
    # layer's product recomputes it in backward (the C++ kernel with the layer's sample y), and the layer's
    # mask backward, which autograd runs next, frees both: one layer's at a time
    recompute = s.recompute and not fsdp
    recomputed = [max((t.numel * bw + (0 if torch_path else logits(t, False)) for t in sh.block_targets(b)),
                      default=0) for b in range(sh.blocks)]
    saved = [a + w + k for a, w, k in zip(activations, masked, kept)]
    grads = [sum(logits(t) for t in sh.block_targets(b)) for b in range(sh.blocks)]
    hidden_in = tokens * sh.hidden * bw  # a block's input: what a checkpointed block keeps
    gathered = 2 if fsdp else 0  # FSDP2 prefetches one block ahead: two blocks' weights and logits unsharded

    def unsharded(b: int) -> int:
        return (block_weights[b] + block_logits[b]) if fsdp else 0

    moments: dict[str, dict[str, int]] = {}
    loss_fwd, loss_bwd = loss_cost(sh.vocab, sh.hidden, tokens, s.dtype)
    # forward end and loss: every block's saved tensors (a checkpointed block: its input; the cache of
    # parametrize.cached() still holds every layer's W * mask until the forward returns)
    if s.activation_checkpointing:
        fwd_saved = {"block inputs (checkpoints)": hidden_in * sh.blocks,
                     "masked weights (cached)": sum(masked) if s.weight_cache else max(masked)}
    else:
        fwd_saved = {"activations": sum(activations), "masked weights": 0 if recompute else sum(masked),
                     "mask intermediates": sum(kept)}
    last = sh.blocks - 1
    # (FSDP2 reshards every block after its forward; backward gathers them again, from the last)
    moments["loss forward"] = {**static, **fwd_saved, "loss": loss_fwd}
    bwd_saved = dict(fwd_saved)
    bwd_saved.pop("masked weights (cached)", None)
    moments["loss backward"] = {**static, **bwd_saved, "loss": loss_bwd}
    for b in reversed(range(sh.blocks)):
        if s.activation_checkpointing:
            alive = {"block inputs (checkpoints)": hidden_in * (b + 1), "recomputed block": saved[b]}
        elif recompute:
            alive = {"activations": sum(activations[: b + 1]), "recomputed masked weight (a layer)": recomputed[b],
                     "mask intermediates": sum(kept[: b + 1])}
        else:
            alive = {"activations": sum(activations[: b + 1]), "masked weights": sum(masked[: b + 1]),
                     "mask intermediates": sum(kept[: b + 1])}
        worst = max((costs[t.name] for t in sh.block_targets(b)), key=lambda c: c.backward_transient,
                    default=MaskCost(0, 0, 0))
        moment = {**static, **alive, "gradients": sum(grads[b + 1:]) + grads[b],
                  "layer backward transient": worst.backward_transient,
                  "activation gradients": block_bwd,
                  "gathered blocks": gathered * unsharded(b)}
        if fsdp:  # the block's logit gradients, whole, until reduce-scatter
            moment["unsharded gradients"] = block_logits[b]
        if s.activation_checkpointing:  # the recompute runs the layers' forwards again
            moment["layer forward transient"] = max((costs[t.name].forward_transient for t in sh.block_targets(b)),
                                                    default=0)
        moments[f"backward block {b}"] = moment
    # the forward's own worst moment: a layer's mask sampled at the last block (all earlier blocks saved)
    fwd_worst = max((costs[t.name].forward_transient for t in sh.targets), default=0)
    if fwd_worst:
        moments["forward (mask sampling)"] = {**static, **fwd_saved, "layer forward transient": fwd_worst,
                                              "gathered blocks": gathered * unsharded(last)}
    if recompute and not s.activation_checkpointing:  # the running block's cache of W * mask
        moments["forward (last block)"] = {**static, **fwd_saved, "masked weights (block cache)": masked[last]}
    # optimizer: AdamW fused (plain parameters) or foreach on CUDA DTensors (one temporary per state tensor)
    opt_tmp = local_logits if fsdp and s.device == "cuda" else (max(logits(t) for t in sh.targets) if fsdp else 0)
    moments["optimizer step"] = {**static, "gradients": sum(grads), "optimizer temporaries": opt_tmp}

    totals = {name: sum(terms.values()) for name, terms in moments.items()}
    peak_moment = max(totals, key=totals.get)
    # the prior's masks are read a layer at a time (pipeline.model.masks_io.LazyMasks); each group's prior
    # candidate (int16) is kept for the diagnostics, sharded with the logits under FSDP
    largest = max((t.numel for t in sh.targets), default=0)
    prior = {"prior mask (a layer as read)": largest if s.prior_masks else 0,
             "prior choices": 2 * sum(math.ceil(t.numel // s.m / W) for t in sh.targets) if s.prior_masks else 0}
    if fsdp:  # the model is built on meta and read block by block, each sharded once its masks exist
        read = max((w + l for w, l in zip(block_weights, block_logits)), default=0)
        host = {"frozen weight shards": frozen, "a block as read (weights, logits)": read, **prior}
    else:
        host = {"model as loaded": sh.params * bw, **prior}
    host = {k: v for k, v in host.items() if v}
    if s.device == "cpu":  # one memory: the peak is the larger of the load and the step
        host_peak = max(sum(host.values()), totals[peak_moment])
    else:
        host_peak = sum(host.values())
    notes = [f"attention counted as {s.attention} SDPA keeps it",
             "masked_weight: " + ("torch ops (CUDA path): nothing kept, the sample recomputed in backward" if torch_path
                                  else "the C++ kernel (CPU): it keeps nothing beyond W * mask"),
             "W * mask: " + ("kept from the forward to the backward" if not recompute
                             else "recomputed in backward, a layer at a time (not kept from the forward)"),
             ("each rank reads the frozen weights block by block and keeps its shards" if fsdp
              else "every rank loads the whole model on the host before it is moved to its device"),
             f"{s.batch // (s.micro_batch * s.world)} micro-batch(es) of {s.micro_batch} per rank and step"]
    return Plan("learn", sh.name, asdict(s), peak_moment, moments[peak_moment], totals, totals[peak_moment],
                host_peak, host, host_peak * (s.world // s.nodes), mask_state_bytes=4 * local_logits,  # logits, gradients, AdamW's two moments
                params=sh.params, prunable=sh.prunable, notes=notes)


@dataclass(frozen=True)
class PriorSetup:
    """One `prior@<method>` run (prior.*): calibration windows, and where the blocks compute."""

    n: int = 2
    m: int = 4
    method: str = "sparsegpt"
    nsamples: int = 64
    seqlen: int = 512
    batch: int = 8  # calibration sequences per block forward (pipeline.oneshot.calibration)
    device: str = "cuda"  # where each block computes; the model and the captured activations stay on the host
    threads: int = 16  # SparseGPT sweeps this many layers of a block at once

    def check(self) -> None:
        if self.method not in registry.METHODS:
            raise PlanError(f"method={self.method!r}: choose one of {', '.join(registry.METHODS)}")
        if self.device not in ("cuda", "cpu"):
            raise PlanError(f"device={self.device!r}: choose cuda or cpu")


def plan_prior(config_path: str | Path, s: PriorSetup) -> Plan:
    """Peak memory of a one-shot prior: one float32 block at a time on the device, the rest on the host."""
    s.check()
    model = meta_model(config_path, "float32")
    sh = shapes_of(model, s.m)
    method = registry.get(s.method)
    hessian = "hessian" in method.statistics
    forward = block_forward_transient(str(config_path), min(s.batch, s.nsamples), s.seqlen)
    moments: dict[str, dict[str, int]] = {}
    for b in range(sh.blocks):
        targets = sh.block_targets(b)
        # layers fed the same input share one statistics object: for a LLaMA block q/k/v and gate/up
        widths = _input_widths(targets)
        weights = {"block weights": sh.block_numel(b) * 4}
        # H = 2 X^T X accumulated as its upper triangle (float32), or ||X_j||^2 (float64)
        stats = sum(w * w * 4 if hessian else w * 8 for w in widths) if method.statistics else 0
        moments[f"block {b}: calibration forward"] = {**weights, "input statistics": stats, "block forward": forward}
        if hessian:
            groups = _stacked(targets, widths)
            at_once = sorted(groups, key=lambda g: g[1], reverse=True)[: max(1, s.threads)]
            moments[f"block {b}: prune"] = {
                **weights, "input statistics": 2 * stats,  # the full symmetric H is built beside its triangle
                # the block's weights stacked per shared input, then per sweep in flight (up to `threads`):
                # H's copy, H^-1 and U [in, in] at most three at once, W^T, the new weights, the mask
                "stacked weights": sum(rows * w * 4 for rows, w in groups),
                "sweeps in flight": sum(3 * w * w * 4 + rows * w * (4 + 4 + 1) for rows, w in at_once)}
    totals = {name: sum(terms.values()) for name, terms in moments.items()}
    moment = max(totals, key=totals.get) if totals else "none"
    worst, worst_terms = totals.get(moment, 0), moments.get(moment, {})
    host = {"model (float32)": sh.params * 4,
            "calibration activations": s.nsamples * s.seqlen * sh.hidden * 4,
            "masks": sh.prunable}
    if method.updates_weights:
        host["updated weights"] = sh.prunable * 4
    if not method.statistics:  # the stage runs no calibration pass (magnitude)
        worst, worst_terms, host = 0, {}, {"model (float32)": sh.params * 4, "masks": sh.prunable}
    # on CPU the block computes where it lives: its weights are the model's, not a copy
    host_peak = sum(host.values()) + (worst - worst_terms.get("block weights", 0) if s.device == "cpu" else 0)
    notes = ["the model and the captured block inputs stay on the host; each block visits the device in turn"]
    return Plan("prior", sh.name, asdict(s), moment, worst_terms, totals, worst, host_peak, host,
                params=sh.params, prunable=sh.prunable, notes=notes)


def _input_widths(targets: list[Target]) -> list[int]:
    """Widths of the distinct inputs of a block's targets (LLaMA: q/k/v share one, gate/up another)."""
    return [targets[group[0]].shape[-1] for group in _share_groups(targets)]


def _share_groups(targets: list[Target]) -> list[list[int]]:
    """Targets that read the same input, by name: q/k/v (and query_key_value), gate/up."""
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu",
              "w1": "gu", "w3": "gu"}
    out: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        module = t.name.rsplit(".", 2)[-2]
        parent = t.name.rsplit(".", 3)[-3]
        out.setdefault(f"{parent}:{shared.get(module, module)}", []).append(i)
    return list(out.values())


def _stacked(targets: list[Target], widths: list[int]) -> list[tuple[int, int]]:
    """(rows, in) of each stacked matrix SparseGPT sweeps (the targets sharing an input, stacked by rows)."""
    return [(sum(targets[i].numel // targets[i].shape[-1] for i in group), targets[group[0]].shape[-1])
            for group in _share_groups(targets)]


# ------------------------------------------------------------------ the README table

def gpus_needed(config_path, nm: tuple[int, int], parallel: str, gpu_bytes: float, headroom: float = 0.92,
                seqs_per_rank: int = 1, seqlen: int = 4096, dtype: str = "bfloat16", ac: bool = True,
                max_world: int = 512, weight_cache: bool = False) -> tuple[int | None, Plan]:
    """Fewest GPUs (powers of two) whose per-rank peak fits ``headroom * gpu_bytes`` -> (count or None, its plan)."""
    world = 1
    plan = None
    while world <= max_world:
        if parallel == "fsdp" and world == 1:
            world = 2  # learn.parallel=fsdp needs learn.nproc > 1
        setup = LearnSetup(n=nm[0], m=nm[1], world=world, parallel=parallel, dtype=dtype, activation_checkpointing=ac,
                           batch=seqs_per_rank * world, micro_batch=seqs_per_rank, seqlen=seqlen, device="cuda",
                           nodes=max(1, world // 8), weight_cache=weight_cache)
        plan = plan_learn(config_path, setup)
        if plan.device_peak_bytes <= headroom * gpu_bytes:
            return world, plan
        if parallel == "ddp":  # DDP replicates everything: more GPUs never lower the per-rank figure
            return None, plan
        world *= 2
    return None, plan


def table(gpu_gb: float = 80, seqlen: int = 4096, dtype: str = "bfloat16", ac: bool = True) -> tuple[str, list[dict]]:
    """The README table as Markdown, and its rows."""
    rows, lines = [], []
    lines.append("| model | params | prunable | N:M | mask state (GB) | DDP: GPUs | DDP: GB per rank | "
                 "FSDP: GPUs | FSDP: GB per rank | FSDP: host GB per rank | per 8-GPU node |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in TABLE_MODELS:
        path = CONFIGS / f"{name}.json"
        for nm in ((2, 4), (4, 8)):
            row = {"model": name, "nm": f"{nm[0]}:{nm[1]}"}
            for parallel in ("ddp", "fsdp"):
                count, plan = gpus_needed(path, nm, parallel, gpu_gb * GB, seqlen=seqlen, dtype=dtype, ac=ac)
                row[parallel] = {"gpus": count, "per_rank_bytes": plan.device_peak_bytes, "moment": plan.moment,
                                 "world": plan.setup["world"], "terms": plan.terms}
                row["params"], row["prunable"] = plan.params, plan.prunable
                row[parallel]["host_bytes"] = plan.host_peak_bytes
                row[parallel]["host_per_node_bytes"] = plan.host_peak_bytes * min(8, plan.setup["world"])
                if parallel == "ddp":
                    row["mask_state_bytes"] = plan.mask_state_bytes
            rows.append(row)

            def cell(p):
                gpus = str(p["gpus"]) if p["gpus"] else f"no fit (≥ {p['world']})" if p["world"] > 1 else "no fit"
                return gpus, f"{p['per_rank_bytes'] / GB:,.1f}"
            ddp, fsdp = cell(row["ddp"]), cell(row["fsdp"])
            lines.append(f"| {name} | {row['params'] / 1e9:.2f} B | {row['prunable'] / 1e9:.2f} B | {row['nm']} | "
                         f"{row['mask_state_bytes'] / GB:,.1f} | {ddp[0]} | {ddp[1]} | {fsdp[0]} | {fsdp[1]} | "
                         f"{row['fsdp']['host_bytes'] / GB:,.1f} | {row['fsdp']['host_per_node_bytes'] / GB:,.1f} |")
    return "\n".join(lines), rows


# ------------------------------------------------------------------ command line

def _print_plan(plan: Plan, gpu_bytes: float | None = None, headroom: float = 0.92) -> None:
    gib = 2**30
    print(f"{plan.stage} {plan.model}: {plan.params / 1e9:.3f} B parameters, {plan.prunable / 1e9:.3f} B N:M targets")
    print(f"per-rank device peak {plan.device_peak_bytes / gib:,.2f} GiB at '{plan.moment}':")
    for name, value in sorted(plan.terms.items(), key=lambda kv: -kv[1]):
        if value:
            print(f"  {name:32s} {value / gib:10.3f} GiB")
    print(f"host per rank (without the interpreter) {plan.host_peak_bytes / gib:,.2f} GiB: "
          + ", ".join(f"{k} {v / gib:.2f}" for k, v in plan.host_terms.items()))
    if plan.host_per_node_bytes:
        print(f"host per node ({plan.host_per_node_bytes // max(1, plan.host_peak_bytes)} ranks) "
              f"{plan.host_per_node_bytes / gib:,.2f} GiB")
    if gpu_bytes and plan.stage == "learn":
        fits = plan.device_peak_bytes <= headroom * gpu_bytes
        print(f"{'fits' if fits else 'does NOT fit'} a {gpu_bytes / GB:.0f} GB GPU ({headroom:.0%} of it usable: "
              f"{headroom * gpu_bytes / gib:,.1f} GiB)")
    if plan.mask_state_bytes:
        print(f"mask state per rank between steps {plan.mask_state_bytes / gib:,.3f} GiB")
    for note in plan.notes:
        print(f"  note: {note}")


def model_config(params) -> str:
    """The config a pipeline's params learn on: a local model folder, a shipped config named like the hub
    id (``meta-llama/Llama-2-7b-hf`` -> llama-2-7b), or the hub's config.json (downloaded, no weights)."""
    if params.model.source == "smollm2":
        return str(CONFIGS / "smollm2-135m.json")
    if params.model.source == "tiny":
        raise PlanError("model.source=tiny: a model trained by the dense stage; plan artifacts/dense/config.json instead")
    hf_id = params.model.hf_id
    if Path(hf_id).is_dir():
        return hf_id
    stem = Path(hf_id).name.lower().removesuffix("-hf")
    if (CONFIGS / f"{stem}.json").is_file():
        return str(CONFIGS / f"{stem}.json")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(hf_id, "config.json")
    except Exception as e:  # offline, gated, no such repo
        raise PlanError(f"model.hf_id={hf_id!r}: no shipped config by that name and the hub's config.json cannot "
                        f"be read ({type(e).__name__}); pass a config.json or a model folder") from None


def learn_setup(params, device: str = "cuda") -> LearnSetup:
    """The LearnSetup of a pipeline's params (learn.*, sparsity.*)."""
    cfg, sp = params.learn, params.sparsity
    return LearnSetup(n=sp.n, m=sp.m, world=cfg.nproc * cfg.nnodes, parallel=cfg.parallel, dtype=cfg.dtype,
                      activation_checkpointing=cfg.activation_checkpointing, batch=cfg.batch_size,
                      micro_batch=cfg.micro(), seqlen=cfg.seqlen, nodes=cfg.nnodes, device=device,
                      prior_masks=cfg.prior != "none" and cfg.prior_strength > 0,
                      recompute=cfg.recompute_masked_weights)


def check_fits(config_path: str | Path, setup: LearnSetup, device_bytes: float, headroom: float = 0.92) -> Plan:
    """The plan of a run about to start on a device of ``device_bytes``; raises, with its figures, if it
    does not fit (``headroom``: what the CUDA context and the allocator's fragmentation leave)."""
    plan = plan_learn(config_path, setup)
    if plan.device_peak_bytes > headroom * device_bytes:
        gib = 2**30
        terms = ", ".join(f"{k} {v / gib:.1f}" for k, v in sorted(plan.terms.items(), key=lambda kv: -kv[1]) if v)
        raise PlanError(
            f"learn will not fit: the memory plan puts a rank's peak at {plan.device_peak_bytes / gib:.1f} GiB "
            f"('{plan.moment}': {terms} GiB) against {headroom:.0%} of the device's {device_bytes / gib:.1f} GiB. "
            "Lower learn.micro_batch_size or learn.seqlen, set learn.activation_checkpointing=true or "
            "learn.dtype=bfloat16, or shard over more GPUs (learn.parallel=fsdp, learn.nproc / learn.nnodes); "
            "`python -m pipeline.maskllm.memory_plan --params` shows the plan")
    return plan


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", help="a config.json, a model folder, or a name in pipeline/maskllm/model_configs/")
    ap.add_argument("--params", action="store_true", help="plan the run params.yaml describes (model, learn.*, sparsity.*)")
    ap.add_argument("--profile", help="plan the run of params.yaml with profiles/NAME.yaml applied (implies --params)")
    ap.add_argument("--stage", choices=["learn", "prior"], default="learn")
    ap.add_argument("--nm", help="N:M, N = weights kept (default 2:4)")
    ap.add_argument("--gpus", type=int, help="processes, one per GPU: learn.nproc x learn.nnodes (default 1)")
    ap.add_argument("--nodes", type=int, help="learn.nnodes: host memory per node follows (default 1)")
    ap.add_argument("--parallel", choices=["ddp", "fsdp"])
    ap.add_argument("--dtype", choices=list(DTYPES))
    ap.add_argument("--activation-checkpointing", action="store_true", default=None)
    ap.add_argument("--batch", type=int, help="learn.batch_size (global, default 2)")
    ap.add_argument("--micro-batch", type=int, help="learn.micro_batch_size: sequences per forward (default: the batch per GPU)")
    ap.add_argument("--seqlen", type=int, default=None, help="tokens per sequence (default 512; --table: 4096)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--attention", choices=["flash", "math"], default="flash")
    ap.add_argument("--whole-forward-cache", action="store_true",
                    help="plan as if every W * mask were cached for the whole forward (see LearnSetup.weight_cache)")
    ap.add_argument("--method", default="sparsegpt", help="prior method (--stage prior)")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows (--stage prior)")
    ap.add_argument("--table", action="store_true", help="80 GB GPUs per model, 2:4 and 4:8, DDP and FSDP")
    ap.add_argument("--out", help="--table: also write the table as JSON to this file")
    ap.add_argument("--gpu-gb", type=float, default=80, help="the GPU's memory: the plan says whether the run fits")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    try:
        if args.table:
            text, rows = table(args.gpu_gb, args.seqlen or 4096, "bfloat16")
            print(text)
            from pipeline.io import write_json
            from pipeline.provenance import provenance

            if not args.out:
                return
            write_json(args.out, {
                "gpu_gb": args.gpu_gb, "headroom": 0.92, "seqlen": args.seqlen or 4096, "sequences_per_gpu": 1,
                "dtype": "bfloat16", "activation_checkpointing": True, "rows": rows,
                "provenance": provenance("meta", "bfloat16")})
            return
        if args.params or args.profile:
            from pipeline.config import load_params
            from pipeline.profile import profile_params

            params = profile_params(args.profile) if args.profile else load_params()
            base, config = learn_setup(params, args.device), args.config or model_config(params)
        elif args.config:
            base, config = LearnSetup(seqlen=512, device=args.device), args.config
        else:
            ap.error("give a config (e.g. llama-2-7b), --params, --profile NAME or --table")
        try:
            n, m = (int(v) for v in args.nm.split(":")) if args.nm else (base.n, base.m)
        except ValueError:
            ap.error(f"--nm {args.nm!r}: write N:M, e.g. 2:4")
        world = args.gpus or base.world
        batch = args.batch or (base.batch if (args.params or args.profile) else max(base.batch, world))
        micro = args.micro_batch or (base.micro_batch if (args.params or args.profile) else batch // world)
        if args.stage == "learn":
            setup = LearnSetup(n, m, world, args.parallel or base.parallel, args.dtype or base.dtype,
                               args.activation_checkpointing or base.activation_checkpointing, batch,
                               args.seqlen or base.seqlen, micro, args.nodes or base.nodes, args.device,
                               prior_masks=base.prior_masks, attention=args.attention,
                               weight_cache=args.whole_forward_cache, recompute=base.recompute)
            plan = plan_learn(config, setup)
        else:
            plan = plan_prior(config, PriorSetup(n, m, args.method, args.nsamples, args.seqlen or 512,
                                                 device=args.device))
    except PlanError as e:
        print(f"memory_plan: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        _print_plan(plan, args.gpu_gb * GB if args.device == "cuda" else None)


if __name__ == "__main__":
    main()
