"""Int8 and fp16 draft weights (eaglespec/backends/cpu/quant.py, half.py): close to the full-precision
draft, never lossy."""

import pytest
import torch
import torch.nn.functional as F
from helpers import oracle_head, tiny_target
from torch import nn

from eaglespec.attention import register
from eaglespec.backends import draft_setup, optimize_target
from eaglespec.backends.base import DraftSetup
from eaglespec.backends.cpu import optimize
from eaglespec.backends.cpu.half import Fp16Linear, fp16_kernel_available, fp16_pays
from eaglespec.backends.cpu.quant import (Int8Linear, dynamic_int8_available, int8_kernel_available, quantize_linears,
                                          quantize_weight, swap_linears)
from eaglespec.drafter import EagleDrafter, TreeConfig
from eaglespec.generate import GenerationConfig, Generator
from eaglespec.head_runner import EagleHeadRunner
from eaglespec.target import Target


def test_quantized_weight_is_within_half_a_step_per_channel():
    torch.manual_seed(0)
    w = torch.randn(48, 80) * torch.linspace(0.01, 3.0, 48)[:, None]  # rows of very different scale
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(dim=1) == 127).all()  # each row uses its full range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_is_close_to_the_linear_on_both_paths(dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(96, 200, bias=bias).to(dtype)
    q = Int8Linear(lin)
    x = torch.randn(3, 5, 96, dtype=dtype)
    with torch.inference_mode():
        want = lin(x).float()
        got = q(x)
        assert got.shape == (3, 5, 200) and got.dtype == dtype
        rel = (got.float() - want).norm() / want.norm()
        assert rel < 0.02
        fused, dynamic = q.fused, q.dynamic
        q.fused, q.dynamic = False, None  # the dequantizing fallback (non-CPU devices, torch without the kernels)
        slow = q(x)
    assert fused == int8_kernel_available(torch.device("cpu"))
    # fp32 activations take fbgemm's dynamic kernel where this torch has it, which rounds them too
    assert (dynamic is not None) == (dtype == torch.float32 and dynamic_int8_available())
    assert (slow.float() - want).norm() / want.norm() < 0.01  # the weights' rounding alone
    if dynamic is None:
        assert (slow.float() - got.float()).norm() / want.norm() < 0.01


def test_quantize_linears_swaps_every_linear_once():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(4, 8), shared, nn.ReLU(), shared)
    assert quantize_linears(model) == 3
    assert isinstance(model[0], Int8Linear) and model[1] is model[3]
    assert not any(type(m) is nn.Linear for m in model.modules())


def run(gen: Generator, prompt: torch.Tensor, cfg: GenerationConfig) -> list[int]:
    return [t for chunk in gen.generate_ids(prompt, cfg) for t in chunk]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_draft_is_lossless_and_proposes_nearly_what_the_full_draft_does(dtype):
    target = tiny_target("llama", copyable=True, logit_scale=30.0, pack=dtype == torch.float32)
    if dtype == torch.bfloat16:  # as load_target sets up a bf16 target: exact attention, packed linears
        model = target.model.to(dtype)
        model.set_attn_implementation(register())
        target = Target(model, tokenizer=None, max_len=512)
        optimize_target(target)
    head = oracle_head(target, noise=0.2)
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    plain = Generator(target)
    setups = {w: draft_setup(target.device, target.dtype, weights=w) for w in ("full", "int8")}
    assert setups["int8"].weights == "int8" and setups["full"].weights != "int8"
    drafters = {w: EagleDrafter.from_head(head, target, TreeConfig(kind="dynamic"), setup) for w, setup in setups.items()}
    assert any(isinstance(m, Int8Linear) for m in drafters["int8"].runner.head.modules())
    assert isinstance(drafters["int8"].runner.lm, Int8Linear)
    assert all(type(m) is nn.Linear for m in head.modules() if isinstance(m, (nn.Linear, Int8Linear)))  # caller's head untouched
    g = torch.Generator().manual_seed(7)
    taus = {w: [] for w in drafters}
    for _ in range(8):
        prompt = torch.randint(2, target.vocab_size, (10,), generator=g)
        want = run(plain, prompt, cfg)
        for w, d in drafters.items():
            spec = Generator(target, d)
            assert run(spec, prompt, cfg) == want
            taus[w].append(spec.last_stats.mean_accept_len)
    full, int8 = (sum(taus[w]) / len(taus[w]) for w in ("full", "int8"))
    assert full > 2.5  # the head is good, so a worse proposal would show
    assert int8 > 0.9 * full


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_weights_pick_int8_only_for_bf16_drafts_on_avx512_cpus_and_bad_values_are_refused(
        monkeypatch, capability, dtype):
    """bf16 drafts on AVX-512 draft faster with int8 weights; fp32 drafts gained no speed from
    them on an AVX2 EPYC and proposed worse (quant.int8_pays)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    target = tiny_target("llama")
    head = oracle_head(tiny_target("llama", copyable=True))
    setup = draft_setup(target.device, target.dtype, dtype=dtype)
    want = capability == "AVX512" and dtype == torch.bfloat16 and int8_kernel_available(torch.device("cpu"))
    assert (setup.weights == "int8") == want and setup.dtype == dtype
    runner = EagleHeadRunner(head, target, setup)
    assert isinstance(runner.lm, Int8Linear) == want
    assert draft_setup(target.device, target.dtype, weights="int8").weights == "int8"
    with pytest.raises(ValueError, match="draft weights"):
        draft_setup(target.device, target.dtype, weights="int4")


@pytest.mark.skipif(not fp16_kernel_available(), reason="this torch build has no fbgemm fp16 linear")
@pytest.mark.parametrize("bias", [False, True])
def test_fp16_linear_rounds_the_weights_and_nothing_else(bias):
    """fp16 weights, fp32 activations and sums: the product of the fp16-rounded weight in fp32,
    even with an outlier input channel (which the 7-bit int8 kernel rounds its neighbours against)."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 200, bias=bias)
    half = Fp16Linear(lin)
    x = torch.randn(3, 5, 96)
    x[..., 7] = 31.0  # an outlier channel, as the default head's inputs carry
    with torch.inference_mode():
        got = half(x)
        rounded = F.linear(x, lin.weight.half().float(), lin.bias)
        exact = lin(x)
    assert got.shape == (3, 5, 200) and got.dtype == torch.float32
    assert torch.allclose(got, rounded, rtol=1e-5, atol=1e-5)  # the weights' rounding is all it does
    assert not torch.equal(got, exact)  # and it does round them


def test_swapped_draft_linears_take_fp16_weights_once():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(nn.Linear(4, 8), shared, nn.ReLU(), shared)
    if not fp16_kernel_available():
        with pytest.raises(RuntimeError, match="fbgemm"):
            swap_linears(model, Fp16Linear)
        return
    assert swap_linears(model, Fp16Linear) == 3
    assert isinstance(model[0], Fp16Linear) and model[1] is model[3]
    assert not any(type(m) is nn.Linear for m in model.modules())


@pytest.mark.skipif(not fp16_kernel_available(), reason="this torch build has no fbgemm fp16 linear")
def test_fp16_draft_is_lossless_and_proposes_what_the_full_draft_does():
    target = tiny_target("llama", copyable=True, logit_scale=30.0, pack=True)
    head = oracle_head(target, noise=0.2)
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    plain = Generator(target)
    setups = {w: draft_setup(target.device, target.dtype, weights=w) for w in ("full", "fp16", "auto")}
    assert setups["fp16"] == DraftSetup(torch.float32, "fp16")
    assert (setups["auto"] == setups["fp16"]) == fp16_pays()  # auto takes it where fbgemm has vector kernels
    drafters = {w: EagleDrafter.from_head(head, target, TreeConfig(kind="dynamic"), setups[w]) for w in ("full", "fp16")}
    assert isinstance(drafters["fp16"].runner.lm, Fp16Linear)
    # fc, q k v stacked, o, gate and up stacked, down (`fuse_projections`)
    assert sum(isinstance(m, Fp16Linear) for m in drafters["fp16"].runner.head.modules()) == 5
    assert all(type(m) is nn.Linear for m in head.modules() if isinstance(m, (nn.Linear, Fp16Linear)))  # caller's head untouched
    g = torch.Generator().manual_seed(7)
    for _ in range(4):
        prompt = torch.randint(2, target.vocab_size, (10,), generator=g)
        want = run(plain, prompt, cfg)
        for d in drafters.values():
            assert run(Generator(target, d), prompt, cfg) == want
    # what each proposes from the same committed pairs: the same guesses, scores within the rounding
    runners = {w: d.runner for w, d in drafters.items()}
    same, worst = 0, 0.0
    with torch.inference_mode():
        for _ in range(8):
            tokens = torch.randint(2, target.vocab_size, (6,), generator=g)
            feats = torch.randn(6, target.hidden_size, generator=g)
            scores = {}
            for w, r in runners.items():
                r.reset()
                scores[w] = r.logprobs(r.commit(tokens, feats)[None])[0]
            same += torch.equal(scores["full"].topk(4).indices, scores["fp16"].topk(4).indices)
            worst = max(worst, (scores["full"] - scores["fp16"]).abs().max().item())
    assert same >= 7 and 0 < worst < 0.05


def test_fp16_draft_weights_are_refused_where_they_cannot_run(monkeypatch):
    target = tiny_target("llama")
    with pytest.raises(ValueError, match="float32"):
        draft_setup(target.device, target.dtype, weights="fp16", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CPU layout"):
        draft_setup("cuda", torch.float32, weights="fp16")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")  # no AVX2: fbgemm's scalar code
    assert draft_setup(target.device, target.dtype).weights != "fp16"  # auto keeps full weights there
    monkeypatch.setattr(optimize, "fp16_kernel_available", lambda: False)
    with pytest.raises(ValueError, match="fbgemm"):
        draft_setup(target.device, target.dtype, weights="fp16")
