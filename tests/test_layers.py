"""The head's own Llama pieces compute what transformers' modeling_llama computes, bit for bit, and
its config reads both of transformers' RoPE layouts."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as llama

from eaglespec.draft import DraftHead, DraftHeadError
from eaglespec.layers import GatedMLP, HeadConfig, HeadConfigError, RMSNorm, Rotary, apply_rotary, rotary

CONFIG = dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
              rms_norm_eps=1e-5, rope_theta=50000.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pieces_give_modeling_llamas_bits(dtype):
    torch.manual_seed(0)
    ours_cfg, theirs_cfg = HeadConfig(**CONFIG), LlamaConfig(**CONFIG)
    x = torch.randn(2, 7, 48, dtype=dtype) * 3
    norm, their_norm = RMSNorm(48, eps=1e-5), llama.LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        their_norm.weight.copy_(norm.weight)
    norm, their_norm = norm.to(dtype), their_norm.to(dtype)
    assert torch.equal(norm(x), their_norm(x))
    mlp, their_mlp = GatedMLP(ours_cfg).to(dtype), llama.LlamaMLP(theirs_cfg).to(dtype)
    their_mlp.load_state_dict(mlp.state_dict())
    assert torch.equal(mlp(x), their_mlp(x))
    positions = torch.arange(3, 10).expand(2, -1)
    cos_sin, their_cos_sin = Rotary(ours_cfg)(x, positions), llama.LlamaRotaryEmbedding(theirs_cfg)(x, positions)
    assert all(torch.equal(a, b) for a, b in zip(cos_sin, their_cos_sin))
    q, k = torch.randn(2, 4, 7, 12, dtype=dtype), torch.randn(2, 2, 7, 12, dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(apply_rotary(q, k, *cos_sin), llama.apply_rotary_pos_emb(q, k, *cos_sin)))


def test_a_rope_variant_runs_transformers_own():
    scaling = {"rope_type": "linear", "factor": 4.0}
    config = HeadConfig.from_dict({**CONFIG, "rope_scaling": scaling})
    assert config.rope_type == "linear"
    x, positions = torch.randn(1, 5, 48), torch.arange(5)[None]
    theirs = llama.LlamaRotaryEmbedding(LlamaConfig(**{**CONFIG, "rope_parameters": {**scaling, "rope_theta": 50000.0}}))
    default = Rotary(HeadConfig(**CONFIG))(x, positions)
    got = rotary(config)(x, positions)
    assert all(torch.equal(a, b) for a, b in zip(got, theirs(x, positions)))
    assert not torch.equal(got[0], default[0])  # the scaling is applied


def test_config_reads_both_rope_layouts_and_writes_both():
    flat = HeadConfig.from_dict({**CONFIG, "rope_theta": None, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert flat.rope_theta == 7.0 and flat.rope_scaling is None
    per_type = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    assert HeadConfig.from_dict({**CONFIG, "rope_parameters": per_type}).rope_theta == 1e6
    out = HeadConfig.from_dict({**CONFIG, "architectures": ["X"], "transformers_version": "0"}).to_dict()
    assert out["rope_theta"] == 50000.0 and out["rope_parameters"] == {"rope_type": "default", "rope_theta": 50000.0}
    assert out["architectures"] == ["X"] and "transformers_version" not in out and out["head_dim"] == 12
    again = LlamaConfig(**{k: v for k, v in out.items() if k != "rope_scaling"})  # what loaders build from it
    assert again.head_dim == 12 and again.rope_parameters["rope_theta"] == 50000.0


@pytest.mark.parametrize("bad, words", [
    ({"hidden_size": 7}, "multiple of num_attention_heads"),
    ({"hidden_size": "576"}, "hidden_size must be a positive integer"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"rms_norm_eps": -1}, "rms_norm_eps"),
    ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
])
def test_bad_configs_are_refused_in_one_line(tmp_path, bad, words):
    with pytest.raises(HeadConfigError, match=words):
        HeadConfig.from_dict({**CONFIG, **bad})
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, **bad}))
    with pytest.raises(DraftHeadError, match=words) as e:
        DraftHead.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_drafting_imports_no_modeling_code(tmp_path):
    """Loading a head and the decode loop import none of transformers' modeling or masking code
    (about a second at each start)."""
    from helpers import tiny_config

    from eaglespec.draft import head_config_from_target

    DraftHead(head_config_from_target(tiny_config("llama", vocab=64))).save_pretrained(tmp_path)
    code = ("import sys; from eaglespec.draft import DraftHead; import eaglespec.generate, eaglespec.heads, "
            "eaglespec.backends.llamacpp; DraftHead.from_pretrained(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m.startswith('transformers.models') or m in "
            "('transformers.masking_utils', 'transformers.modeling_utils', 'transformers.cache_utils')))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_stacked_projections_compute_what_the_separate_ones_do(kind):
    """`fuse_projections` (the head runners' copies) stacks q, k, v and gate, up into one linear
    each: the same outputs, fewer matmul calls, and the separate linears gone."""
    import copy

    from helpers import random_eagle3_head, random_head, tiny_target
    from torch import nn

    from eaglespec.layers import StackedLinear, fuse_projections

    target = tiny_target("llama", layers=6)
    head = random_head(target) if kind == "eagle" else random_eagle3_head(target)
    fused = copy.deepcopy(head)
    linears = sum(type(m) is nn.Linear for m in head.modules())
    assert fuse_projections(fused) == 2 and fuse_projections(fused) == 0  # an attention and an MLP, once
    assert sum(isinstance(m, StackedLinear) for m in fused.modules()) == 2
    assert sum(type(m) is nn.Linear for m in fused.modules()) == linears - 3  # 3 + 2 linears became 2
    torch.manual_seed(0)
    features, embeds = torch.randn(1, 6, target.hidden_size), torch.randn(1, 6, target.hidden_size)
    positions = torch.arange(6)[None]
    with torch.inference_mode():
        want, got = head(features, embeds, positions), fused(features, embeds, positions)
    assert torch.allclose(want, got, rtol=1e-5, atol=1e-6)
