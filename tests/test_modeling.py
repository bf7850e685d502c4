"""Dense model sources: hf (local stand-in), tiny (trained here, resumable)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pipeline.model.loading as modeling
from pipeline.config import TinyModel, parse_params


def test_hf_source_loads_a_local_save_pretrained_dir(tmp_path):
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1))
    ref.save_pretrained(tmp_path / "m")
    params = parse_params({"model": {"source": "hf", "hf_id": str(tmp_path / "m")}})
    model, info = modeling.build_dense(params, 64, None, tmp_path / "ckpt")
    assert info["hf_id"] == str(tmp_path / "m") and info["params"] == sum(p.numel() for p in ref.parameters())
    for (k, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


def test_saved_model_reloads_identically(tmp_path):
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1)).eval()
    modeling.save_model(ref, None, tmp_path / "out", {"source": "test"})
    back = modeling.load_model(tmp_path / "out", device="cpu")
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(ref(ids).logits, back(ids).logits)
    assert not list(tmp_path.glob(".out*"))  # no temporary left behind


def test_tiny_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = TinyModel(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, steps=6, batch_size=2, seqlen=8, checkpoint_every=2)
    tokens = torch.randint(0, 50, (2000,))
    full, _ = modeling.train_tiny(cfg, 50, tokens, tmp_path / "a")

    real, calls = modeling.sample_windows, {"n": 0}

    def dies_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling, "sample_windows", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        modeling.train_tiny(cfg, 50, tokens, tmp_path / "b")
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(modeling, "sample_windows", real)
    resumed, _ = modeling.train_tiny(cfg, 50, tokens, tmp_path / "b")
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_stale_checkpoint_of_another_config_is_ignored(tmp_path):
    cfg = TinyModel(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, steps=4, batch_size=2, seqlen=8, checkpoint_every=2)
    tokens = torch.randint(0, 50, (2000,))
    modeling.train_tiny(cfg.model_copy(update={"steps": 40}), 50, tokens, tmp_path)  # leaves step-38 state
    a, _ = modeling.train_tiny(cfg, 50, tokens, tmp_path)
    b, _ = modeling.train_tiny(cfg, 50, tokens, tmp_path / "fresh")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
