"""Tiny random models and heads for tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from eaglespec.draft import DraftHead, head_config_from_target
from eaglespec.target import Target


def tiny_config(arch: str = "llama", vocab: int = 96, hidden: int = 64, layers: int = 2):
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(arch)


def tiny_target(arch: str = "llama", seed: int = 0, max_len: int = 512, logit_scale: float = 1.0, **kw) -> Target:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32, attn_implementation="sdpa")
    if logit_scale != 1.0:  # sharper next-token distributions
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)
    return Target(model, tokenizer=None, max_len=max_len)


def random_head(target: Target, seed: int = 1) -> DraftHead:
    torch.manual_seed(seed)
    head = DraftHead(head_config_from_target(target.config))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return head
