"""params.yaml, validated: one pydantic model per section, extra keys forbidden.

Every stage calls :func:`load_params` before doing any work, so a bad value stops the
pipeline with a message naming the key path and the allowed values, and nothing is written.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.oneshot import registry


def _unique_list(v: list) -> list:
    if len(set(v)) != len(v) or not v:
        raise ValueError("must be a non-empty list without repeats")
    return v


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _regexes(patterns: list[str]) -> list[str]:
    # sparsity.ignore: each must compile here; that each matches a weight is checked once the model is known
    for i, pattern in enumerate(patterns):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"[{i}] {pattern!r} is not a valid regular expression ({e})") from None
    if len(set(patterns)) != len(patterns):
        raise ValueError("must not repeat a pattern")
    return patterns


class Sparsity(Section):
    n: int = Field(2, ge=1, description="weights kept in every group")
    m: int = Field(4, ge=2, le=16, description="group size along the input dimension")
    # regexes (re.search) on parameter names of block weights to leave dense, e.g. ['self_attn\.o_proj']
    ignore: Annotated[list[str], AfterValidator(_regexes)] = []

    @model_validator(mode="after")
    def _n_le_m(self):
        if self.n >= self.m:
            raise ValueError(f"n must be smaller than m (N = weights kept), got n={self.n}, m={self.m}")
        return self


class Data(Section):
    source: Literal["wiki", "shakespeare", "numpy", "pydocs", "wikitext2", "c4"] = "wiki"
    hf_path: Optional[str] = None  # override of the hub dataset (a local dir / files for offline use)
    pydocs_path: Optional[str] = None  # folder of Python's .rst.txt doc sources; None = Debian's python3.11-doc
    test_fraction: float = Field(0.02, gt=0, lt=0.5)
    # article-level, disjoint from train and test (the test articles stay those of test_fraction alone)
    validation_fraction: float = Field(0.02, gt=0, lt=0.5)
    max_articles: Optional[int] = Field(None, ge=10)  # cap for quick runs; None = all
    seed: int = 0
    tokenizer_vocab: int = Field(4096, ge=260, le=65536)  # byte-level BPE size, model.source=tiny only


class TinyModel(Section):
    """A small LLaMA trained from scratch by the dense stage (micro profile, tests)."""
    hidden_size: int = Field(64, ge=8)
    intermediate_size: int = Field(128, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    seqlen: int = Field(128, ge=8)
    lr: float = Field(3e-3, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _heads(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        return self


class Model(Section):
    source: Literal["smollm2", "tiny", "hf"] = "smollm2"
    hf_id: Optional[str] = None  # hub id or local path, model.source=hf only
    tiny: TinyModel = TinyModel()

    @model_validator(mode="after")
    def _hf_needs_id(self):
        if self.source == "hf" and not self.hf_id:
            raise ValueError("model.source=hf needs model.hf_id (a hub id or a local save_pretrained dir)")
        return self


def _method(name: str) -> str:
    """A one-shot method of the registry (pipeline/oneshot/registry.py)."""
    if name not in registry.METHODS:
        raise ValueError(f"must be one of {list(registry.METHODS)}, got {name!r}")
    return name


def _learn_prior(prior: str) -> str:
    if prior not in ("none", "file", *registry.METHODS):
        raise ValueError(f"must be 'none', 'file' or a one-shot method {list(registry.METHODS)}, got {prior!r}")
    return prior


class Prior(Section):
    # every method of the registry by default: a method added there is computed (and a row) at once
    methods: Annotated[list[Annotated[str, AfterValidator(_method)]], AfterValidator(_unique_list)] = Field(
        default_factory=lambda: list(registry.METHODS))
    nsamples: int = Field(64, ge=1)
    seqlen: int = Field(512, ge=8)
    seed: int = 0
    percdamp: float = Field(0.01, gt=0, lt=1)
    blocksize: int = Field(128, ge=1)
    # each layer's ||(W - W')X||^2 / ||WX||^2 in metrics/prior/: costs magnitude a calibration
    # pass and Wanda a Gram matrix per input; the SparseGPT methods report it always (free)
    reconstruction_error: bool = False
    # precision of the calibration forwards, Hessians, H^-1 factors and sweeps. float64 makes the
    # masks the same on other CPUs and kernels (float32's differ in ~2 % of entries: near-ties flip
    # and the flips cascade block by block), at about twice the time of a float32 prior
    dtype: Literal["float32", "float64"] = "float64"



class Learn(Section):
    steps: int = Field(64, ge=1)
    batch_size: int = Field(2, ge=1, description="sequences per step (the global batch)")
    # sequences per forward, each micro-batch with a Gumbel sample of its own; the gradient accumulates
    # over batch_size / (micro_batch_size x processes) micro-batches per process. None: one micro-batch
    # per process (the batch split over the processes, no accumulation)
    micro_batch_size: Optional[int] = Field(None, ge=1)
    seqlen: int = Field(512, ge=8)
    lr: float = Field(5e-4, gt=0)
    tau: float = Field(4.0, gt=0, description="temperature at step 0")
    tau_end: float = Field(0.05, gt=0)
    kappa: float = Field(1e3, gt=0, description="logit scale at step 0")
    kappa_end: float = Field(5e2, gt=0)
    prior: Annotated[str, AfterValidator(_learn_prior)] = "sparsegpt"
    prior_file: Optional[str] = None  # learn.prior=file: a mask file (transfer of a learned mask)
    prior_strength: float = Field(3.0, ge=0)
    weight_reg: float = Field(1e-4, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(16, ge=1)
    # scale: processes (torchrun, launched by the stage itself), how they split the work, precision
    nproc: int = Field(1, ge=1)  # processes per node
    nnodes: int = Field(1, ge=1)  # nodes; > 1 needs rdzv_endpoint, and the stage started on every node
    rdzv_endpoint: Optional[str] = None  # host:port of the rendezvous (on the first node), nnodes > 1
    parallel: Literal["ddp", "fsdp"] = "ddp"
    dtype: Literal["float32", "bfloat16"] = "float32"  # frozen weights and activations; logits stay float32
    activation_checkpointing: bool = False
    # W * mask recomputed in backward instead of kept from the forward (the same bits): one model-sized
    # tensor less for ~4 % more step time on CPU (bench/maskllm_step.py); FSDP keeps it regardless
    recompute_masked_weights: bool = True

    def micro(self, world: int | None = None) -> int:
        """Sequences per micro-batch on ``world`` processes (default: learn.nproc x learn.nnodes)."""
        world = world or self.nproc * self.nnodes
        return self.micro_batch_size or max(1, self.batch_size // world)

    @model_validator(mode="after")
    def _parallel(self):
        world = self.nproc * self.nnodes
        if self.batch_size % (self.micro(world) * world):
            raise ValueError(
                f"learn.batch_size={self.batch_size} must be a multiple of learn.micro_batch_size="
                f"{self.micro(world)} x {world} process(es) (learn.nproc={self.nproc} x learn.nnodes={self.nnodes}): "
                "every process takes the same number of micro-batches; change one of them")
        if self.parallel == "fsdp" and world == 1:
            raise ValueError("learn.parallel=fsdp shards the model over processes and needs learn.nproc x learn.nnodes > 1; "
                             "set learn.nproc (e.g. the number of GPUs) or learn.parallel=ddp")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"learn.nnodes={self.nnodes} needs learn.rdzv_endpoint (host:port on the first node, "
                             "e.g. node001:29500), where every node's torchrun meets")
        if self.rdzv_endpoint and not re.fullmatch(r"[\w.\-\[\]:]+:\d+", self.rdzv_endpoint):
            raise ValueError(f"learn.rdzv_endpoint={self.rdzv_endpoint!r} is not host:port (e.g. node001:29500)")
        return self

    @model_validator(mode="after")
    def _prior_file(self):
        if self.prior == "file" and not self.prior_file:
            raise ValueError("learn.prior=file needs learn.prior_file (a mask file: "
                             "python -m pipeline.maskllm.transfer export masks/general.safetensors)")
        if self.prior_file and self.prior != "file":
            raise ValueError(f"learn.prior_file is set but learn.prior={self.prior!r}: "
                             "set learn.prior=file to use it, or learn.prior_file=null")
        return self


class Harden(Section):
    export_npz: bool = True
    export_checkpoint: bool = False


# zero-shot tasks of the MaskLLM paper (lm-eval's task names): their datasets are on the hub
HUB_TASKS = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq")


def zeroshot_leaves(task: str, domains: list[str]) -> list[str]:
    """An entry of evaluate.zeroshot_tasks -> the lm-eval tasks it runs ('lastword': one per domain)."""
    return [f"lastword_{d}" for d in domains] if task == "lastword" else [task]


# the rows whose validation PPL the choices, sweeps and the budget curve read (pipeline.records)
VALIDATION_READ = ("dense", "sparsegpt", "maskllm")


class Evaluate(Section):
    seqlen: int = Field(512, ge=8)
    batch_size: int = Field(4, ge=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_windows: Optional[int] = Field(40, ge=1)  # per domain; None = the whole test split
    # test text of each domain (the training domain's test split must be among them)
    domains: Annotated[list[Literal["wiki", "shakespeare", "numpy", "pydocs", "wikitext2", "c4"]],
                       AfterValidator(_unique_list)] = ["wiki", "shakespeare", "numpy"]
    # --- zero-shot accuracy through lm-evaluation-harness (stages/zeroshot.py, tasks/) ---
    # lastword: LAMBADA-style last word on every domain's test articles (lastword_<domain>: one);
    # hub tasks (HUB_TASKS) need the hub or a local copy in zeroshot_data
    zeroshot_tasks: list[str] = ["lastword"]
    zeroshot_limit: Optional[int] = Field(32, ge=1)  # examples per task (lm-eval's limit); None = all
    zeroshot_seqlen: int = Field(64, ge=8)  # context length in tokens (contexts are cut from the left)
    zeroshot_data: dict[str, str] = {}  # hub task -> local copy of its dataset (a folder load_dataset reads)
    # rows evaluated on the validation split: what the choices and sweeps read (MaskLLM's PPL, and the
    # gap it closes between dense and SparseGPT); any other row may be added
    validation_rows: Annotated[list[str], AfterValidator(_unique_list)] = ["dense", "sparsegpt", "maskllm"]

    @model_validator(mode="after")
    def _zeroshot(self):
        known = ["lastword", *(f"lastword_{d}" for d in self.domains), *HUB_TASKS]
        for task in self.zeroshot_tasks:
            if task not in known:
                hint = (f"lastword_{task[9:]} needs {task[9:]!r} in evaluate.domains"
                        if task.startswith("lastword_") else f"one of {known}")
                raise ValueError(f"evaluate.zeroshot_tasks: unknown task {task!r} ({hint})")
        leaves = [leaf for t in self.zeroshot_tasks for leaf in zeroshot_leaves(t, self.domains)]
        if len(set(leaves)) != len(leaves):
            raise ValueError(f"evaluate.zeroshot_tasks {self.zeroshot_tasks} names a task twice "
                             "('lastword' already holds every lastword_<domain>)")
        rows = [r.name for r in registry.comparison()]
        for row in self.validation_rows:
            if row not in rows:
                raise ValueError(f"evaluate.validation_rows: unknown row {row!r}; one of {rows}")
        missing = [r for r in VALIDATION_READ if r not in self.validation_rows]
        if missing:
            raise ValueError(f"evaluate.validation_rows {self.validation_rows} lacks {missing}: the choices read "
                             "MaskLLM's validation PPL and the gap it closes between dense and SparseGPT")
        for task in self.zeroshot_data:
            if task not in HUB_TASKS or task not in self.zeroshot_tasks:
                raise ValueError(f"evaluate.zeroshot_data.{task}: {task!r} is not in evaluate.zeroshot_tasks "
                                 f"(a local copy is only for hub tasks {list(HUB_TASKS)} that are run)")
        return self



class Plot(Section):
    dpi: int = Field(150, ge=50, le=600)


class Params(Section):
    sparsity: Sparsity = Sparsity()
    data: Data = Data()
    model: Model = Model()
    prior: Prior = Prior()
    learn: Learn = Learn()
    harden: Harden = Harden()
    evaluate: Evaluate = Evaluate()
    plot: Plot = Plot()

    @model_validator(mode="after")
    def _cross(self):
        if self.learn.prior not in ("none", "file", *self.prior.methods):
            raise ValueError(
                f"learn.prior={self.learn.prior!r} is not computed: add it to prior.methods {self.prior.methods} or use 'none' or 'file'"
            )
        if self.data.source not in self.evaluate.domains:
            raise ValueError(
                f"evaluate.domains {self.evaluate.domains} must include the training domain data.source={self.data.source!r}"
            )
        return self


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names key paths."""


def _describe(err: dict) -> str:
    path = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key (remove it or check its spelling)"
    elif err["type"] == "literal_error":
        msg = f"must be one of {err['ctx']['expected']}, got {err['input']!r}"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return f"  {path}: {msg}"


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        raise ParamsError(f"{source} is invalid:\n" + "\n".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found (run from the repository root, where params.yaml lives)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    return parse_params(raw, str(path))


def load_params_or_exit(path: str | Path = "params.yaml") -> Params:
    """For stage scripts: print the error and exit 2 before any work."""
    try:
        return load_params(path)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
