"""The tiny random models the unit tests share (seeded, in eval mode): a LLaMA and a GPT-2
of 2 blocks, 64 wide, 256 tokens. The architectures of the coverage tests are in test_coverage.py."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, layers: int = 2, intermediate_size: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256,
    )).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0,
    )).eval()
