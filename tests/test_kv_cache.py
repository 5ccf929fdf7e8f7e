import warnings

import pytest
import torch
from helpers import tiny_target

from eaglespec.layers import DraftKVCache
from eaglespec.tree import make_tree


def test_compaction_equals_running_prefix_plus_path():
    target = tiny_target("llama")
    prefix = torch.tensor([4, 9, 13, 27, 5, 6])
    tree = make_tree(torch.tensor([30, 31, 32, 33, 34, 35]), torch.tensor([-1, 0, 0, 2, 2, 4]))
    target.prefill(prefix)
    target.forward(tree.tokens, target.cache.length + tree.depths, tree.mask)
    path = torch.tensor([0, 2, 4, 5])  # root -> 32 -> 34 -> 35
    target.cache.compact(path)
    n = target.cache.length
    assert n == prefix.shape[0] + path.shape[0]
    got = [(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone()) for layer in target.cache.layers]

    fresh = tiny_target("llama")
    fresh.prefill(torch.cat([prefix, tree.tokens[path]]))
    for (k, v), layer in zip(got, fresh.cache.layers):
        torch.testing.assert_close(k, layer.keys[:, :, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, layer.values[:, :, :n], rtol=1e-5, atol=1e-5)

    # and decoding continues as if the path had been decoded one by one
    nxt = torch.tensor([7])
    a = target.forward(nxt).logits
    b = fresh.forward(nxt).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cache_never_reallocates():
    target = tiny_target("llama")
    target.prefill(torch.tensor([1, 2, 3]))
    ptrs = [layer.keys.data_ptr() for layer in target.cache.layers]
    for step in range(5):
        tree = make_tree(torch.tensor([5, 6, 7]), torch.tensor([-1, 0, 1]))
        target.forward(tree.tokens, target.cache.length + tree.depths, tree.mask)
        target.cache.compact(torch.tensor([0, 1]))
    assert [layer.keys.data_ptr() for layer in target.cache.layers] == ptrs
    assert target.cache.length == 3 + 5 * 2


def test_cache_overflow_is_an_error():
    target = tiny_target("llama", max_len=8)
    target.prefill(torch.arange(6))
    try:
        target.forward(torch.arange(4))
    except ValueError as e:
        assert "exceeds the cache" in str(e)
    else:
        raise AssertionError("overflow not detected")


def test_draft_cache_tree_is_dropped():
    cache = DraftKVCache(16, kv_heads=2, head_dim=4, device=torch.device("cpu"), dtype=torch.float32)
    k = torch.randn(1, 2, 3, 4)

    def update(k, commit):  # what one forward of a one-layer head does
        out = cache.write(0, k, k)
        cache.advance(k.shape[-2], commit)
        return out

    update(k, commit=True)
    update(k[:, :, :2], commit=False)
    assert (cache.length, cache.tree_len) == (3, 2)
    cache.drop_tree()
    keys, _ = update(k[:, :, :1], commit=True)
    assert cache.length == 4 and keys.shape[2] == 4
    torch.testing.assert_close(keys[:, :, 3], k[:, :, 0])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_passes_the_cache_as_transformers_asks_without_warnings(arch):
    """transformers deprecated the decoder's `past_key_values` for `cache` (a FutureWarning on every
    forward); plain and speculative generation must not warn at all (warnings are errors here)."""
    from helpers import oracle_head, tiny_target

    from eaglespec.drafter import EagleDrafter, TreeConfig
    from eaglespec.generate import GenerationConfig, Generator

    target = tiny_target(arch, copyable=True, logit_scale=30.0)
    drafter = EagleDrafter.from_head(oracle_head(target, noise=0.2), target, TreeConfig())
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for gen in (Generator(target), Generator(target, drafter)):
            assert sum(len(chunk) for chunk in gen.generate_ids(torch.arange(2, 9), cfg)) == 12
