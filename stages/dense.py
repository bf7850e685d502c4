"""DVC stage `dense`: the model to prune, saved as a safetensors HF checkpoint."""
from pathlib import Path

from pipeline.data.tokens import load_tokens
from pipeline.model.loading import build_dense, save_model
from pipeline.stage import run_stage
from pipeline.model.tokenizer import load_tokenizer

DATA, OUT, CKPT = Path("artifacts/data"), Path("artifacts/dense"), Path("artifacts/dense_ckpt")


def main(params):
    tokenizer = load_tokenizer(DATA / "tokenizer")
    train = load_tokens(DATA / "train.npy") if params.model.source == "tiny" else None
    model, info = build_dense(params, len(tokenizer), train, CKPT)
    save_model(model, tokenizer, OUT, info)
    return f"{params.model.source}: {info['params'] / 1e6:.1f}M parameters -> {OUT}"


if __name__ == "__main__":
    run_stage("dense", main)
