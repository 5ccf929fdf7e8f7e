"""eaglespec's float32 attention: correct, and in bf16 the same bits for a token whatever else is
verified with it, which is what keeps half-precision speculative decoding lossless."""

import pytest
import torch
import torch.nn.functional as F
from helpers import oracle_head, tiny_target

from eaglespec.attention import FP32_ATTENTION, fp32_attention, register
from eaglespec.backends import optimize_target
from eaglespec.drafter import EagleDrafter, TreeConfig
from eaglespec.generate import GenerationConfig, Generator
from eaglespec.target import Target


def reference(query, key, value, mask):
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_fp32_attention_equals_sdpa(heads, kv_heads, mask_kind):
    g = torch.Generator().manual_seed(0)
    q, length, d = 5, 9, 16
    query = torch.randn(2, heads, q, d, generator=g)
    key = torch.randn(2, kv_heads, length, d, generator=g)
    value = torch.randn(2, kv_heads, length, d, generator=g)
    visible = torch.ones(q, length, dtype=torch.bool).tril(length - q)  # causal, q new tokens last
    visible[3, 5] = False  # and a tree-like hole
    mask = {"none": None, "bool": visible[None, None],
            "additive": torch.zeros(q, length).masked_fill(~visible, torch.finfo(torch.float32).min)[None, None]}[mask_kind]
    want = reference(query, key, value, visible[None, None] if mask_kind != "none" else
                     torch.ones(q, length, dtype=torch.bool).tril(length - q)[None, None])
    got, _ = fp32_attention(torch.nn.Module(), query, key, value, mask)
    assert got.shape == (2, q, heads, d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def bf16_target(attn: str, pack: bool = True):
    """A tiny bf16 target; with pack, its linears pre-packed as load_target does on CPU."""
    model = tiny_target("llama", copyable=True, logit_scale=30.0, hidden=128, pack=False).model.to(torch.bfloat16)
    model.set_attn_implementation(attn)
    target = Target(model, tokenizer=None, max_len=512)
    if pack:
        optimize_target(target)
    return target


def chain_vs_steps(target, prompt, cont) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of `cont` after `prompt`: in one tree forward (a chain) and one token at a time."""
    target.prefill(prompt)
    n = cont.shape[0]
    with torch.inference_mode():
        chain = target.forward(cont, None, torch.ones(n, n, dtype=torch.bool).tril()).features
        target.prefill(prompt)
        steps = []
        for i in range(n):
            steps.append(target.forward(cont[i : i + 1]).features)
            target.cache.length += 1
    return chain, torch.cat(steps)


def test_bf16_token_gets_the_same_bits_alone_or_in_a_tree():
    register()
    target = bf16_target(FP32_ATTENTION)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        prompt = torch.randint(2, target.vocab_size, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g)
        cont = torch.randint(2, target.vocab_size, (12,), generator=g)
        chain, steps = chain_vs_steps(target, prompt, cont)
        assert torch.equal(chain, steps)


def test_bf16_speculative_greedy_equals_plain():
    register()
    target = bf16_target(FP32_ATTENTION)
    plain = Generator(target)
    spec = Generator(target, EagleDrafter.from_head(oracle_head(target, noise=0.2), target, TreeConfig(kind="dynamic")))
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(8):
        prompt = torch.randint(2, target.vocab_size, (int(torch.randint(3, 24, (1,), generator=g)),), generator=g)
        want = [t for c in plain.generate_ids(prompt, cfg) for t in c]
        got = [t for c in spec.generate_ids(prompt, cfg) for t in c]
        assert got == want
    assert spec.last_stats.mean_accept_len > 1.5  # multi-token paths were accepted


def test_load_target_picks_fp32_attention_for_half_types(tiny_model_dir):
    from eaglespec.target import load_target

    assert load_target(str(tiny_model_dir), dtype="float32").model.config._attn_implementation == "sdpa"
    assert load_target(str(tiny_model_dir), dtype="bfloat16").model.config._attn_implementation == FP32_ATTENTION


def test_bf16_sdpa_does_differ_between_tree_and_steps():
    """The control: with stock sdpa the bits do depend on the query count, so the test above
    checks something real."""
    target = bf16_target("sdpa")
    g = torch.Generator().manual_seed(1)
    differ = 0
    for _ in range(5):
        prompt = torch.randint(2, target.vocab_size, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g)
        cont = torch.randint(2, target.vocab_size, (12,), generator=g)
        chain, steps = chain_vs_steps(target, prompt, cont)
        differ += not torch.equal(chain, steps)
    assert differ > 0


def test_cache_keeps_keys_and_values_in_the_attention_precision():
    """With the fp32 attention the cache stores float64 keys and values (no per-step
    conversion of the whole cache); switching the attention back gives model-dtype buffers."""
    register()
    target = bf16_target("sdpa")
    prompt = torch.arange(2, 20)
    target.prefill(prompt)
    layer = target.cache.layers[0]
    assert (layer.keys.dtype, layer.values.dtype) == (torch.bfloat16, torch.bfloat16)
    target.model.set_attn_implementation(FP32_ATTENTION)
    wide = target.prefill(prompt).features
    assert (layer.keys.dtype, layer.values.dtype) == (torch.float64, torch.float64)
    # the stored keys are the exact bf16 keys, widened: same values as a bf16 cache holds
    target.model.set_attn_implementation("sdpa")
    target.prefill(prompt)
    narrow_keys = layer.keys[:, :, : prompt.shape[0]].clone()
    target.model.set_attn_implementation(FP32_ATTENTION)
    target.prefill(prompt)
    assert torch.equal(layer.keys[:, :, : prompt.shape[0]], narrow_keys.float())
    # and the attention's output is unchanged by where the widening happens
    key = layer.keys[:, :, : prompt.shape[0]]
    value = layer.values[:, :, : prompt.shape[0]]
    q = torch.randn(1, target.config.num_attention_heads, 3, key.shape[-1]).to(torch.bfloat16)
    mod = torch.nn.Module().eval()
    a, _ = fp32_attention(mod, q, key, value, None)
    b, _ = fp32_attention(mod, q, key.to(torch.bfloat16), value.to(torch.bfloat16), None)
    assert torch.equal(a, b)
    assert wide.dtype == torch.bfloat16


def test_bf16_trees_over_32_nodes_run_in_blocks_and_keep_their_bits():
    """Above 32 rows oneDNN may switch matmul kernels; the target verifies such trees in blocks of
    32, so a 48-token chain still gets the bits of one-at-a-time decoding, and a 48-node dynamic
    tree decodes exactly like plain decoding."""
    from helpers import random_head

    register()
    target = bf16_target(FP32_ATTENTION)
    assert target.exact_rows == 32
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        prompt = torch.randint(2, target.vocab_size, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g)
        cont = torch.randint(2, target.vocab_size, (48,), generator=g)
        chain, steps = chain_vs_steps(target, prompt, cont)
        assert torch.equal(chain, steps)
    plain = Generator(target)
    spec = Generator(target, EagleDrafter.from_head(random_head(target), target, TreeConfig(kind="dynamic", top_k=8, total_tokens=48)))
    cfg = GenerationConfig(max_new_tokens=32, ignore_eos=True)
    for _ in range(3):
        prompt = torch.randint(2, target.vocab_size, (12,), generator=g)
        assert [t for c in spec.generate_ids(prompt, cfg) for t in c] == [t for c in plain.generate_ids(prompt, cfg) for t in c]


def test_a_query_that_sees_no_key_gets_zeros_not_nan():
    """A left-padding slot of a batch sees no key; its NaN would reach every real token of its row
    through the next layer's values (0 * NaN), as it did in bf16 batched regeneration."""
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 4, 8, generator=g) for _ in range(3))
    visible = torch.ones(4, 4, dtype=torch.bool).tril()
    visible[0] = False  # query 0: a padding slot
    got, _ = fp32_attention(torch.nn.Module(), query, key, value, visible[None, None])
    assert torch.equal(got[0, 0], torch.zeros(2, 8))
    want = reference(query, key, value, visible[None, None])[0, 1:]
    torch.testing.assert_close(got[0, 1:], want, atol=1e-5, rtol=1e-5)


def test_bf16_left_padded_batch_generates_what_each_prompt_does_alone():
    target = bf16_target(register())
    prompts = [torch.tensor([5, 9, 3]), torch.tensor([7, 2, 8, 4, 6, 11, 12, 13])]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    attn = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], attn[i, width - len(p):] = p, 1
    with torch.inference_mode():
        batched = target.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=6, do_sample=False,
                                        pad_token_id=0)[:, width:]
        for i, p in enumerate(prompts):
            alone = target.model.generate(input_ids=p[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
            new = alone[0, len(p):].tolist()  # may stop early at EOS; the batch then pads the row
            assert len(new) >= 2 and batched[i, : len(new)].tolist() == new, i


def test_prefill_runs_sdpa_close_to_the_exact_attention(monkeypatch):
    """Target.prefill hands the prompt to sdpa (one call per layer) and the exact path stays a
    switch away; the two prefills agree to bf16 rounding, and the next step, from either cache,
    still gets the same bits alone or in a tree (checked with the prefill's sdpa above)."""
    import eaglespec.attention as attention

    register()
    target = bf16_target(FP32_ATTENTION)
    calls = []
    real = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = torch.randint(2, target.vocab_size, (60,), generator=torch.Generator().manual_seed(3))
    fast = target.prefill(prompt).features.float()
    assert len(calls) == target.config.num_hidden_layers
    target.sdpa_prefill = False
    exact = target.prefill(prompt).features.float()
    assert len(calls) == target.config.num_hidden_layers  # not called again
    assert (fast - exact).abs().mean() < 0.02 * exact.abs().mean()
    cont = torch.randint(2, target.vocab_size, (8,), generator=torch.Generator().manual_seed(4))
    chain, steps = chain_vs_steps(target, prompt, cont)
    assert torch.equal(chain, steps)


def test_sdpa_prefill_only_takes_forwards_over_an_empty_cache():
    """Inside sdpa_prefill a step after the prompt (fewer queries than keys) keeps the exact path."""
    from eaglespec.attention import sdpa_prefill

    g = torch.Generator().manual_seed(5)
    query = torch.randn(1, 4, 3, 16, generator=g).to(torch.bfloat16)
    key = torch.randn(1, 2, 9, 16, generator=g)
    value = torch.randn(1, 2, 9, 16, generator=g).double()
    exact, _ = fp32_attention(torch.nn.Module(), query, key, value, None)
    with sdpa_prefill():
        inside, _ = fp32_attention(torch.nn.Module(), query, key, value, None)
        prompt, _ = fp32_attention(torch.nn.Module(), query, key[:, :, :3], value[:, :, :3], None)
    assert torch.equal(inside, exact)
    want = reference(query.float(), key[:, :, :3].bfloat16().float(), value[:, :, :3].bfloat16().float(),
                     torch.ones(3, 3, dtype=torch.bool).tril()[None, None])
    torch.testing.assert_close(prompt.float(), want, atol=2e-2, rtol=2e-2)


def test_each_query_row_gets_the_bits_it_gets_alone():
    """The exact attention over a block of query rows against each row alone over its own causal
    prefix, at SmolLM2's head shapes (9 query heads over 3 kv heads, head_dim 64). With float32
    score products, 31 of these 240 rows differed on an AVX2 EPYC, whose matmul kernel groups the
    head_dim sum by the number of rows."""
    mod = torch.nn.Module().eval()
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        q, length = 12, 120
        query = torch.randn(1, 9, q, 64, generator=g).to(torch.bfloat16)
        key = (torch.randn(1, 3, length, 64, generator=g) * 2).to(torch.bfloat16).double()
        value = torch.randn(1, 3, length, 64, generator=g).to(torch.bfloat16).double()
        block, _ = fp32_attention(mod, query, key, value, None)  # causal: the q new tokens are the last
        for i in range(q):
            n = length - q + i + 1
            one, _ = fp32_attention(mod, query[:, :, i : i + 1], key[:, :, :n], value[:, :, :n], None)
            assert torch.equal(one[:, 0], block[:, i]), (seed, i)
