"""Pre-packed linears (eaglespec/backends/cpu/packed.py): bf16 with nn.Linear's bits, fp32 with bits
that do not depend on the block a row is in; swapped in only by the explicit optimization step."""

import pytest
import torch
from helpers import tiny_target
from torch import nn

from eaglespec.backends import draft_setup, optimize_target
from eaglespec.backends.cpu.packed import PackedLinear, pack_linears, packed_splits, packing_available, same_bits
from eaglespec.target import Target

needs_packing = pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.bfloat16),
                                   reason="this torch/CPU has no oneDNN packed bf16 linear")
needs_fp32_packing = pytest.mark.skipif(not packing_available(torch.device("cpu"), torch.float32),
                                        reason="this torch/CPU has no oneDNN packed fp32 linear")


def bf16_model(arch: str = "llama"):
    return tiny_target(arch, hidden=128, pack=False).model.to(torch.bfloat16)


@needs_packing
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_forward_has_the_same_bits(arch):
    model = bf16_model(arch)
    names = set(model.state_dict())
    ids = torch.randint(2, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(ids).logits
        n = pack_linears(model)
        got = model(ids).logits
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert n > 0 and len(linears) > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert pack_linears(model) == 0  # nothing left to pack: a second call does not wrap again
    assert set(model.state_dict()) == names  # parameter names unchanged
    assert torch.equal(got, want)


@needs_packing
def test_cached_splits_pack_without_checking_bits_again(monkeypatch):
    """A split table from an earlier probe (packed_splits) packs the same way with no bit check."""
    import eaglespec.backends.cpu.packed as packed_mod

    model = bf16_model()
    assert pack_linears(model) > 0
    splits = packed_splits(model)
    assert splits and all(k >= 1 for k in splits.values())
    again = bf16_model()
    monkeypatch.setattr(packed_mod, "same_bits", lambda *a, **k: pytest.fail("bits checked again"))
    assert pack_linears(again, splits=splits) > 0
    assert packed_splits(again) == splits


@needs_packing
def test_packed_linear_keeps_the_linear_interface_and_falls_back_for_gradients():
    lin = nn.Linear(64, 96).to(torch.bfloat16)
    p = PackedLinear(lin)
    assert p.weight is lin.weight and p.bias is lin.bias and (p.in_features, p.out_features) == (64, 96)
    assert same_bits(lin, p)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    p(x).float().sum().backward()  # the packed op has no backward: the wrapped linear runs instead
    assert x.grad is not None and lin.weight.grad is not None


def test_a_target_is_left_alone_until_optimized_and_opting_out_packs_nothing():
    model = bf16_model()
    target = Target(model, tokenizer=None)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())  # the constructor changes nothing
    assert optimize_target(target, pack=False).packed_linears == 0
    assert not any(isinstance(m, PackedLinear) for m in target.model.modules())


@needs_fp32_packing
def test_float32_packs_with_block_invariant_rows_close_to_stock():
    """fp32 packed products round unlike the stock ones (~1e-6) but give a row the same bits in any
    block, which is what speculative decoding needs."""
    model = tiny_target("llama", hidden=128, pack=False).model
    ids = torch.randint(2, model.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = model(ids).logits
        assert pack_linears(model) > 0
        got = model(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    lin = nn.Linear(576, 1536, bias=False)
    assert same_bits(lin, PackedLinear(lin))


@needs_fp32_packing
def test_a_model_cast_after_packing_runs_its_stock_product():
    model = tiny_target("llama", hidden=128, pack=False).model
    ids = torch.randint(2, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    stock = tiny_target("llama", hidden=128, pack=False).model.to(torch.bfloat16)  # the same weights, unpacked
    with torch.inference_mode():
        pack_linears(model)
        model.to(torch.bfloat16)
        got = model(ids).logits
        want = stock(ids).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@needs_packing
def test_optimizing_a_bf16_target_packs_it():
    target = Target(bf16_model(), tokenizer=None)
    assert optimize_target(target).packed_linears > 0
    assert isinstance(target.lm_head, PackedLinear)  # the LM head runs packed too


@needs_packing
def test_eagle_drafter_packs_a_copy_of_the_head_on_a_bf16_target():
    from helpers import random_head

    from eaglespec.drafter import EagleDrafter, TreeConfig

    target = Target(bf16_model(), tokenizer=None)
    optimize_target(target)
    head = random_head(target)
    setup = draft_setup(target.device, target.dtype, weights="full")  # int8 drafts are not packed
    assert (setup.dtype, setup.weights) == (torch.bfloat16, "packed")
    drafter = EagleDrafter.from_head(head, target, TreeConfig(kind="dynamic"), setup)
    assert drafter.runner.dtype == torch.bfloat16
    assert any(isinstance(m, PackedLinear) for m in drafter.runner.head.modules())
    assert isinstance(drafter.runner.lm, PackedLinear)
    assert not any(isinstance(m, PackedLinear) for m in head.modules())  # the caller's head is untouched
    assert head.fc.weight.dtype == torch.float32
    assert draft_setup("cpu", torch.float32).dtype == torch.float32


@needs_packing
def test_a_linear_shared_by_two_slots_is_packed_once_in_both():
    shared = nn.Linear(32, 32).to(torch.bfloat16)
    model = nn.Sequential(nn.Linear(16, 32).to(torch.bfloat16), shared, nn.ReLU(), shared)
    assert pack_linears(model) == 3
    assert isinstance(model[3], PackedLinear) and model[1] is model[3]


@needs_packing
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_split_input_is_row_invariant_and_close_to_the_whole_product(dtype):
    """Llama's down projection (1536 wide) packed in parts: each row gets its own bits in any block
    (same_bits), the parts add up to the stock product, and the bias is added once."""
    lin = nn.Linear(1536, 576).to(dtype)
    p = PackedLinear(lin, k_chunks=2)
    assert [(s.start, s.stop) for s in p.k_slices] == [(0, 768), (768, 1536)]
    assert same_bits(lin, p)
    x = torch.randn(7, 1536, dtype=dtype)
    with torch.inference_mode():
        want, got = lin(x).float(), p(x).float()
    assert got.shape == (7, 576)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())
    with pytest.raises(ValueError, match="k_chunks"):
        PackedLinear(lin, k_chunks=0)


@needs_packing
def test_a_shape_whose_whole_product_varies_by_block_is_packed_in_parts(monkeypatch):
    """As on a Zen 4 EPYC, where oneDNN splits inputs wider than 1024 differently for different row
    counts: pack_linears tries input splits until one is row-invariant, once per weight shape."""
    import eaglespec.backends.cpu.packed as packed_mod

    real = packed_mod.same_bits
    tried = []

    def whole_products_vary(lin, p, *a, **k):
        tried.append((lin.in_features, len(p.k_slices)))
        return (lin.in_features <= 64 or len(p.k_slices) >= 3) and real(lin, p, *a, **k)

    monkeypatch.setattr(packed_mod, "same_bits", whole_products_vary)
    model = nn.Sequential(nn.Linear(32, 384), nn.ReLU(), nn.Linear(384, 32), nn.Linear(384, 32)).to(torch.bfloat16)
    with torch.inference_mode():
        x = torch.randn(5, 32, dtype=torch.bfloat16)
        want = model[2](model[1](model[0](x))).float()
        assert pack_linears(model) == 3
        got = model[2](model[1](model[0](x))).float()
    assert len(model[0].k_slices) == 1 and len(model[2].k_slices) == 3 and len(model[3].k_slices) == 3
    assert tried.count((384, 3)) == 1  # the second 384-wide weight reuses the split found for the first
    assert torch.allclose(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


@needs_packing
def test_no_packing_when_bits_differ_or_the_ops_fail(monkeypatch):
    import eaglespec.backends.cpu.packed as packed_mod

    model = bf16_model()
    monkeypatch.setattr(packed_mod, "same_bits", lambda *a, **k: False)
    assert pack_linears(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())

    def broken(*a, **k):
        raise RuntimeError("unknown op signature")

    monkeypatch.setattr(packed_mod.PackedLinear, "__init__", broken)
    assert pack_linears(model) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


@needs_fp32_packing
def test_probe_outcomes_are_cached_per_machine_and_weights_file(tiny_model_dir, tmp_path, monkeypatch):
    """The bit probes run once per machine and weights file: a second load packs the same way, and
    finds the stock products' outcome, without probing."""
    import eaglespec.backends.cpu.optimize as optimize_mod
    import eaglespec.backends.cpu.packed as packed_mod
    from eaglespec.target import load_model

    monkeypatch.setenv("EAGLESPEC_CACHE", str(tmp_path))
    first = Target(*load_model(str(tiny_model_dir)))
    packed = optimize_target(first).packed_linears
    stock = optimize_target(Target(*load_model(str(tiny_model_dir))), pack=False).row_invariant
    assert packed > 0 and stock is not None
    assert len(list((tmp_path / "probes").glob("*.json"))) == 1  # one file per machine
    monkeypatch.setattr(packed_mod, "same_bits", lambda *a, **k: pytest.fail("packing probed again"))
    monkeypatch.setattr(optimize_mod, "stock_rows_vary", lambda *a, **k: pytest.fail("stock products probed again"))
    second = Target(*load_model(str(tiny_model_dir)))
    assert optimize_target(second).packed_linears == packed
    assert packed_splits(second.model) == packed_splits(first.model)
    assert optimize_target(Target(*load_model(str(tiny_model_dir))), pack=False).row_invariant == stock
    ids = torch.arange(2, 14)
    assert torch.equal(second.forward(ids).logits, first.forward(ids).logits)


def _row_by_row(lin: nn.Linear) -> None:
    """Make `lin` compute each row on its own: row-invariant on any CPU."""
    def forward(x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        rows = [nn.functional.linear(r, lin.weight, lin.bias) for r in x.reshape(-1, x.shape[-1])]
        return torch.stack(rows).reshape(*x.shape[:-1], lin.out_features)

    lin.forward = forward


@pytest.mark.parametrize("varies", [False, True])
def test_an_unpacked_target_says_whether_its_rows_keep_their_bits(caplog, varies):
    """A stock product that rounds a row differently inside a block (the stock fp32 one on a Zen 4
    EPYC) is found by the optimization step left to stock products, and warned about; a
    row-invariant one is not."""
    from eaglespec.backends.cpu.packed import stock_rows_vary

    model = tiny_target("llama", hidden=64, pack=False).model
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for lin in linears:
        _row_by_row(lin)
    assert stock_rows_vary(model) == []
    if varies:  # the down projections: the row count leaks into each row's result
        for lin in linears:
            if lin.in_features > lin.out_features:
                lin.forward = (lambda x, lin=lin:
                               nn.functional.linear(x, lin.weight, lin.bias) + 1e-3 * x[..., 0].numel())
    caplog.clear()
    with caplog.at_level("WARNING"):
        report = optimize_target(Target(model, tokenizer=None), pack=False)
    assert report.row_invariant == (not varies)
    assert ("nearly tie" in caplog.text) == varies
    if varies:
        assert all(shape[1] > shape[0] for shape in stock_rows_vary(model))
