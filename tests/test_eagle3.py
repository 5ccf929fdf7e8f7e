"""EAGLE-3: fused target features, the head, its checkpoint and what loaders expect, and training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from eaglespec.aux_features import aux_layer_ids, capture_aux
from eaglespec.eagle3 import (AUX_KEY, Eagle3Error, Eagle3Head, check_vocab_maps, eagle3_config, head_kind,
                              read_aux_ids)
from eaglespec.target import Target
from eaglespec.train.pack import draft_vocab, read_pack, write_pack

VOCAB, HIDDEN, LAYERS = 96, 32, 8  # aux layers of an 8-layer target: inputs of 2, 4, 5


def target_model(seed: int = 0, logit_scale: float = 40.0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale)  # sharper, learnable next-token distributions
    return model.eval()


def new_head(k: int = 64, seed: int = 1) -> Eagle3Head:
    torch.manual_seed(seed)
    head = Eagle3Head(eagle3_config(target_model().config, k))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
    head.set_vocab(torch.arange(k) * VOCAB // k)  # spread over the vocabulary: k=48 -> 0, 2, 4, ...
    return head.eval()


# -- fused features ------------------------------------------------------------------------------------


def test_aux_layers_are_the_official_ones():
    assert aux_layer_ids(30) == (2, 15, 27)  # SmolLM2-135M
    assert aux_layer_ids(32) == (2, 16, 29)  # Llama-3.1-8B, as EAGLE-3's modeling_llama_kv.py picks them


def test_capture_equals_output_hidden_states():
    model = target_model()
    ids = torch.randint(0, VOCAB, (2, 11))
    ids_ = aux_layer_ids(LAYERS)
    with torch.no_grad(), capture_aux(model.get_decoder(), ids_) as aux:
        out = model(input_ids=ids, output_hidden_states=True)
    want = torch.cat([out.hidden_states[i] for i in ids_], dim=-1)  # hidden_states[i]: the input of layer i
    assert aux.fused().shape == (2, 11, 3 * HIDDEN)
    torch.testing.assert_close(aux.fused(), want, rtol=0, atol=0)


def test_capture_concatenates_calls_with_a_cache():
    """A prefill and a later forward over the cache (the engine's pattern) give the whole sequence's
    features, as one forward does."""
    from transformers import DynamicCache

    model = target_model()
    ids = torch.randint(0, VOCAB, (1, 9))
    decoder = model.get_decoder()
    with torch.no_grad():
        with capture_aux(decoder, aux_layer_ids(LAYERS)) as whole:
            decoder(input_ids=ids)
        cache = {Target(model, tokenizer=None).cache_arg: DynamicCache()}  # the argument name this transformers takes
        with capture_aux(decoder, aux_layer_ids(LAYERS)) as parts:
            decoder(input_ids=ids[:, :6], use_cache=True, **cache)
            decoder(input_ids=ids[:, 6:], use_cache=True, **cache)
    torch.testing.assert_close(parts.fused(), whole.fused(), rtol=1e-5, atol=1e-5)
    assert not decoder.layers[2]._forward_pre_hooks  # hooks are removed on exit


def test_capture_around_the_engines_target():
    """The engine's use: wrap Target.prefill / Target.forward (a tree forward, run in blocks where
    the target verifies big trees that way) and read [n, 3H] per call."""
    from helpers import tiny_target

    target = tiny_target(layers=LAYERS, hidden=HIDDEN, vocab=VOCAB)
    ids = torch.randint(0, VOCAB, (10,))
    decoder = target.decoder
    with torch.no_grad(), capture_aux(decoder, aux_layer_ids(LAYERS)) as whole:
        decoder(input_ids=ids[None])
    with capture_aux(decoder, aux_layer_ids(LAYERS)) as aux:
        target.prefill(ids[:6])
    prefix = aux.fused()[0]  # [6, 3H]
    target.exact_rows = 2  # verify in blocks of 2 nodes: three decoder calls for one tree
    with capture_aux(decoder, aux_layer_ids(LAYERS)) as aux:
        target.forward(ids[6:], tree_mask=torch.ones(4, 4, dtype=torch.bool).tril_())
    tree = aux.fused()[0]  # [4, 3H]
    torch.testing.assert_close(torch.cat([prefix, tree]), whole.fused()[0], rtol=1e-4, atol=1e-4)


# -- the head ------------------------------------------------------------------------------------------


def test_head_shapes():
    head = new_head(k=48)
    feats = torch.randn(1, 5, 3 * HIDDEN)
    emb = torch.randn(1, 5, HIDDEN)
    pos = torch.arange(5)[None]
    assert head.fc.weight.shape == (HIDDEN, 3 * HIDDEN)
    assert head.midlayer.self_attn.q_proj.weight.shape == (4 * (HIDDEN // 4), 2 * HIDDEN)
    assert head.midlayer.self_attn.k_proj.weight.shape == (2 * (HIDDEN // 4), 2 * HIDDEN)
    h = head.commit(feats, emb, pos)
    assert h.shape == (1, 5, HIDDEN)
    h2 = head.step(h[:, -1:], emb[:, :1], torch.tensor([[5]]))
    assert h2.shape == (1, 1, HIDDEN)
    assert head.logits(h2).shape == (1, 1, 48)
    lp = head.logprobs(h2)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(1, 1))
    assert head.draft_token_ids().tolist() == list(range(0, 96, 2))
    assert not hasattr(head, "embed_tokens")  # the target's embedding is used, not stored


def test_vocab_maps_agree():
    head = new_head(k=5)
    head.set_vocab(torch.tensor([40, 3, 9, 5, 90]))
    assert head.d2t.dtype == torch.int64 and head.t2d.dtype == torch.bool
    assert head.draft_token_ids().tolist() == [3, 5, 9, 40, 90]  # sorted: d2t = [3, 4, 7, 37, 86]
    assert head.d2t.tolist() == [3, 4, 7, 37, 86]
    assert head.t2d.nonzero().flatten().tolist() == [3, 5, 9, 40, 90]
    check_vocab_maps(head)
    head.t2d[4] = True
    with pytest.raises(Eagle3Error, match="disagree"):
        check_vocab_maps(head)
    with pytest.raises(Eagle3Error):
        head.set_vocab(torch.tensor([1, 2]))  # not lm_head's size


def engine_chain(head: Eagle3Head, feats, embeds, anchor: int, steps: int) -> list[torch.Tensor]:
    """What the engine does: commit pairs 0..anchor into the cache, then draft `steps` more along one
    chain, each step fed the previous output and seeing the context and its own chain."""
    cache = head.new_cache(64, "cpu", torch.float32)
    n = anchor + 1
    visible = torch.ones(n, n, dtype=torch.bool).tril_()
    h = head.commit(feats[:, :n], embeds[0][:, :n], torch.arange(n)[None], visible[None, None], cache)[:, -1:]
    outs = [h]
    for s in range(1, steps):
        mask = torch.ones(1, 1, 1, n + s, dtype=torch.bool)  # the context and the chain so far, itself included
        h = head.step(h, embeds[s][:, anchor: anchor + 1], torch.tensor([[anchor + s]]), mask, cache)
        outs.append(h)
    return outs


def test_unrolled_training_forward_equals_engine_steps():
    """Step s of the training forward at anchor i is exactly commit(0..i) then s `step`s."""
    head = new_head()
    torch.manual_seed(3)
    t, steps = 12, 4
    feats = torch.randn(1, t, 3 * HIDDEN)
    tokens = torch.randn(1, t + steps, HIDDEN)  # embeddings of x_0 .. x_{t+steps-1}
    embeds = [tokens[:, 1 + s: 1 + s + t] for s in range(steps)]  # step s at anchor i: x_{i+1+s}
    with torch.no_grad():
        unrolled = head.forward_unrolled(feats, embeds)
        for anchor in (0, 5, t - 1):
            chain = engine_chain(head, feats, embeds, anchor, steps)
            for s in range(steps):
                torch.testing.assert_close(head.logits(unrolled[s][:, anchor]), head.logits(chain[s][:, 0]),
                                           rtol=1e-4, atol=1e-4)


# -- checkpoint ----------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    head = new_head()
    head.save_pretrained(tmp_path)
    back = Eagle3Head.from_pretrained(tmp_path)
    for k, v in head.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    feats, emb = torch.randn(1, 4, 3 * HIDDEN), torch.randn(1, 4, HIDDEN)
    pos = torch.arange(4)[None]
    with torch.no_grad():
        torch.testing.assert_close(back.logits(back.commit(feats, emb, pos)), head.logits(head.commit(feats, emb, pos)))
    assert back.aux_layer_ids == (2, 4, 5)
    assert head_kind(tmp_path) == "eagle3"
    bf16 = tmp_path / "bf16"
    head.save_pretrained(bf16, dtype=torch.bfloat16)
    state = load_file(str(bf16 / "model.safetensors"))
    assert state["fc.weight"].dtype == torch.bfloat16 and state["d2t"].dtype == torch.int64
    assert state["t2d"].dtype == torch.bool


def test_head_kind_tells_eagle_from_eagle3(tmp_path):
    from eaglespec.draft import DraftHead, head_config_from_target

    DraftHead(head_config_from_target(target_model().config)).save_pretrained(tmp_path / "eagle")
    new_head().save_pretrained(tmp_path / "eagle3")
    assert head_kind(tmp_path / "eagle") == "eagle"
    assert head_kind(tmp_path / "eagle3") == "eagle3"


def official_checkpoint(path, k: int = 40, with_maps: bool = True, config_extra: dict | None = None) -> dict:
    """A tiny random checkpoint written the way the official EAGLE-3 trainer saves one (Model's
    state_dict without the frozen target: `midlayer.*`, `fc`, `norm`, `lm_head`, `embed_tokens`,
    `d2t`/`t2d`; a LlamaConfig with draft_vocab_size), with no eaglespec code involved."""
    g = torch.Generator().manual_seed(7)
    h, heads, kv, hd, inter = HIDDEN, 4, 2, HIDDEN // 4, 64

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    used = torch.randperm(VOCAB, generator=g)[:k].sort().values
    state = {"fc.weight": w(h, 3 * h), "embed_tokens.weight": w(VOCAB, h), "lm_head.weight": w(k, h),
             "norm.weight": 1 + w(h), "midlayer.hidden_norm.weight": 1 + w(h),
             "midlayer.input_layernorm.weight": 1 + w(h), "midlayer.post_attention_layernorm.weight": 1 + w(h),
             "midlayer.self_attn.q_proj.weight": w(heads * hd, 2 * h), "midlayer.self_attn.k_proj.weight": w(kv * hd, 2 * h),
             "midlayer.self_attn.v_proj.weight": w(kv * hd, 2 * h), "midlayer.self_attn.o_proj.weight": w(h, heads * hd),
             "midlayer.mlp.gate_proj.weight": w(inter, h), "midlayer.mlp.up_proj.weight": w(inter, h),
             "midlayer.mlp.down_proj.weight": w(h, inter)}
    if with_maps:
        state["d2t"] = used - torch.arange(k)
        t2d = torch.zeros(VOCAB, dtype=torch.bool)
        t2d[used] = True
        state["t2d"] = t2d
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv,
              "num_hidden_layers": 1, "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "vocab_size": VOCAB, "draft_vocab_size": k, "hidden_act": "silu", "tie_word_embeddings": False,
              "torch_dtype": "float16", "bos_token_id": 0, "eos_token_id": 1, **(config_extra or {})}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, str(path / "model.safetensors"))
    return state


def test_official_layout_loads(tmp_path):
    state = official_checkpoint(tmp_path)
    head = Eagle3Head.from_pretrained(tmp_path, num_target_layers=LAYERS)
    own = head.state_dict()
    for k, v in state.items():
        if k != "embed_tokens.weight":
            assert torch.equal(own[k], v.to(own[k].dtype)), k
    assert head.draft_vocab_size == 40 and head.target_hidden_size == HIDDEN
    assert head.aux_layer_ids == (2, 4, 5)  # none in the config: the default for the target
    check_vocab_maps(head)
    assert head.draft_token_ids().tolist() == state["t2d"].nonzero().flatten().tolist()


def test_official_layout_without_maps_and_with_sglang_ids(tmp_path):
    official_checkpoint(tmp_path / "a", with_maps=False, config_extra={"draft_vocab_size": VOCAB})
    state = load_file(str(tmp_path / "a" / "model.safetensors"))
    state["lm_head.weight"] = torch.randn(VOCAB, HIDDEN)
    save_file(state, str(tmp_path / "a" / "model.safetensors"))
    head = Eagle3Head.from_pretrained(tmp_path / "a", num_target_layers=LAYERS)
    assert head.draft_token_ids().tolist() == list(range(VOCAB)) and bool(head.t2d.all())
    # ids given only inside eagle_config are SGLang's (layer outputs): one more as layer inputs
    official_checkpoint(tmp_path / "b", config_extra={"eagle_config": {AUX_KEY: [1, 3, 4]}})
    assert Eagle3Head.from_pretrained(tmp_path / "b").aux_layer_ids == (2, 4, 5)
    with pytest.raises(Eagle3Error, match="names no aux layers"):
        Eagle3Head.from_pretrained(tmp_path / "a")


# -- what each consumer reads --------------------------------------------------------------------------

# Each loader's contract, as read from its source. `layers(config)` gives the decoder layers whose
# *input* it feeds the head (all three capture a layer's input before running it).
WEIGHTS = {  # name -> (shape in terms of H, Ht, K, V, heads, kv, head_dim, I), dtype kind
    "fc.weight": (("H", "3Ht"), "float"),
    "midlayer.input_layernorm.weight": (("H",), "float"),
    "midlayer.hidden_norm.weight": (("H",), "float"),
    "midlayer.post_attention_layernorm.weight": (("H",), "float"),
    "midlayer.self_attn.q_proj.weight": (("heads*hd", "2H"), "float"),
    "midlayer.self_attn.k_proj.weight": (("kv*hd", "2H"), "float"),
    "midlayer.self_attn.v_proj.weight": (("kv*hd", "2H"), "float"),
    "midlayer.self_attn.o_proj.weight": (("H", "heads*hd"), "float"),
    "midlayer.mlp.gate_proj.weight": (("I", "H"), "float"),
    "midlayer.mlp.up_proj.weight": (("I", "H"), "float"),
    "midlayer.mlp.down_proj.weight": (("H", "I"), "float"),
    "norm.weight": (("H",), "float"),
    "lm_head.weight": (("K", "H"), "float"),
    "d2t": (("K",), torch.int64),  # draft id -> target id offset; llama.cpp adds arange itself
    "t2d": (("V",), torch.bool),  # vLLM and llama.cpp skip it; SGLang and the official code may read it
}
CONSUMERS = {
    # vllm/model_executor/models/llama_eagle3.py + eagle3_utils.get_eagle3_aux_layers_from_config:
    # the top-level ids, as the layer whose input is captured (llama.py appends hidden+residual
    # before layer idx); `midlayer.` -> `layers.0.`, `d2t` -> draft_id_to_target_id, `t2d` skipped;
    # eagle_config.use_aux_hidden_state (default true) turns on fc; norm_before_residual defaults false.
    "vllm": {"config": ["architectures", "hidden_size", "intermediate_size", "num_attention_heads",
                        "num_key_value_heads", "num_hidden_layers", "rms_norm_eps", "vocab_size",
                        "draft_vocab_size", "target_hidden_size", AUX_KEY],
             "layers": lambda c: c[AUX_KEY]},
    # sglang/srt/models/llama_eagle3.py + the target's set_eagle3_layers_to_capture: the ids inside
    # eagle_config, captured at [id + 1 for id in ids] (the input of layer id + 1); none -> [2, L//2, L-3].
    "sglang": {"config": ["architectures", "hidden_size", "num_attention_heads", "num_key_value_heads",
                          "draft_vocab_size", "target_hidden_size", "eagle_config"],
               "layers": lambda c: [i + 1 for i in c["eagle_config"][AUX_KEY]]},
    # llama.cpp conversion/llama.py: an EAGLE-3 draft is recognised by draft_vocab_size with
    # num_hidden_layers == 1; target_layers = the top-level ids, else [2, L//2, L-3]; the runtime
    # (common/speculative.cpp) extracts llama_set_embeddings_layer_inp(id): the input of layer id.
    "llama.cpp": {"config": ["draft_vocab_size", "num_hidden_layers", "target_hidden_size", AUX_KEY],
                  "layers": lambda c: c.get(AUX_KEY) or [2, LAYERS // 2, LAYERS - 3]},
}


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_exported_checkpoint_meets_each_consumers_contract(tmp_path, consumer):
    head = new_head(k=64)
    head.save_pretrained(tmp_path, dtype=torch.bfloat16)
    config = json.loads((tmp_path / "config.json").read_text())
    contract = CONSUMERS[consumer]
    missing = [k for k in contract["config"] if k not in config]
    assert not missing, f"{consumer} reads {missing}"
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["num_hidden_layers"] == 1
    assert config["tie_word_embeddings"] is False and config["vocab_size"] == VOCAB
    assert config["draft_vocab_size"] == 64 and config["target_hidden_size"] == HIDDEN
    assert config["eagle_config"]["use_aux_hidden_state"] is True
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "rope_theta", "max_position_embeddings", "head_dim"):
        assert key in config, key
    # the layers each consumer feeds the head are the ones it was trained on
    assert list(contract["layers"](config)) == list(head.aux_layer_ids) == [2, 4, 5]
    state = load_file(str(tmp_path / "model.safetensors"))
    assert set(state) == set(WEIGHTS), "no embedding, nothing else"
    hd = HIDDEN // 4
    sizes = {"H": HIDDEN, "3Ht": 3 * HIDDEN, "2H": 2 * HIDDEN, "K": 64, "V": VOCAB, "heads*hd": 4 * hd,
             "kv*hd": 2 * hd, "I": 64}
    for name, (shape, dtype) in WEIGHTS.items():
        assert tuple(state[name].shape) == tuple(sizes[s] for s in shape), name
        assert state[name].dtype == (torch.bfloat16 if dtype == "float" else dtype), name
    target_ids = state["d2t"] + torch.arange(64)  # what llama.cpp writes and vLLM maps logits to
    assert target_ids.unique().numel() == 64 and int(target_ids.max()) < VOCAB
    assert torch.equal(state["t2d"].nonzero().flatten(), target_ids)


def test_read_aux_ids_prefers_the_top_level():
    assert read_aux_ids({AUX_KEY: [2, 15, 27], "eagle_config": {AUX_KEY: [1, 14, 26]}}) == [2, 15, 27]
    assert read_aux_ids({"eagle_config": {AUX_KEY: [1, 14, 26]}}) == [2, 15, 27]
    assert read_aux_ids({}) is None


# -- packed data and training --------------------------------------------------------------------------


def toy_rows(n: int = 48, length: int = 24, seed: int = 0) -> list[dict]:
    """Rows of a few repeated phrases (a learnable toy), the second half the answer."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(2, VOCAB, size=6).tolist() for _ in range(4)]
    rows = []
    for i in range(n):
        ids = [0] + [t for _ in range(length // 6) for t in phrases[rng.integers(4)]][: length - 1]
        half = len(ids) // 2
        rows.append({"id": f"r{i}", "input_ids": ids, "loss_mask": [0] * half + [1] * (len(ids) - half),
                     "split": "val" if i % 8 == 0 else "train"})
    return rows


def test_pack_round_trip(tmp_path):
    rows = toy_rows(10) + [{"id": "long#t2", "input_ids": list(range(VOCAB)) * 3, "loss_mask": [0, 1] * 144,
                            "split": "train"}]
    packed = write_pack(tmp_path / "p.npz", rows, vocab_size=VOCAB, meta={"note": "x"})
    again = read_pack(tmp_path / "p.npz")
    assert len(again) == len(rows) and again.tokens.dtype == np.uint16
    for r, row in enumerate(rows):
        ids, mask = again.row(r)
        assert ids.tolist() == row["input_ids"] and mask.astype(int).tolist() == row["loss_mask"]
        assert again.row_ids[r] == row["id"] and again.split[r] == (1 if row["split"] == "val" else 0)
    answer = [t for row in rows if row["split"] == "train" for t, m in zip(row["input_ids"], row["loss_mask"]) if m]
    assert again.token_counts.tolist() == np.bincount(answer, minlength=VOCAB).tolist()
    assert again.meta["note"] == "x" and again.meta["rows"] == {"train": 9, "val": 2}  # rows 0 and 8 are val
    assert packed.meta == again.meta
    top = draft_vocab(again.token_counts, 8)
    counts = again.token_counts
    assert len(top) == 8 and list(top) == sorted(top)
    assert counts[top].min() >= np.sort(counts)[::-1][7]  # the 8 most frequent


@pytest.fixture()
def toy_run(tmp_path):
    target_model(seed=0).save_pretrained(tmp_path / "target")
    write_pack(tmp_path / "data.npz", toy_rows(), vocab_size=VOCAB)
    return tmp_path


def toy_config(**kw):
    from eaglespec.train.eagle3 import Eagle3TrainConfig

    base = dict(ttt_steps=3, draft_vocab=64, batch_tokens=8 * 24, lr=1e-2, warmup_steps=2, max_steps=40,
                checkpoint_every=7, eval_every=1000, val_rows=8, mixed_precision="no", seed=0)
    return Eagle3TrainConfig(**{**base, **kw})


def test_training_smoke_loss_falls(toy_run):
    from eaglespec.train.eagle3 import train

    final = train(toy_run / "data.npz", str(toy_run / "target"), toy_run / "run", toy_config(), device="cpu")
    metrics = json.loads((toy_run / "run" / "metrics.json").read_text())
    losses = metrics["train_loss"]
    assert len(losses) == 40 and final["finished"]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8])  # about 5.3 -> 2.7
    assert len(final["acc"]) == 3 and 1.0 <= final["tau_chain"] <= 4.0 and 1.0 <= final["tau_est"] <= 4.0
    head = Eagle3Head.from_pretrained(toy_run / "run" / "final")
    assert head.aux_layer_ids == (2, 4, 5) and head.draft_vocab_size == 64
    assert load_file(str(toy_run / "run" / "final" / "model.safetensors"))["fc.weight"].dtype == torch.bfloat16


def test_kill_and_resume_reach_the_same_state(toy_run):
    from eaglespec.train.eagle3 import Stop, train

    cfg = toy_config(max_steps=12)
    train(toy_run / "data.npz", str(toy_run / "target"), toy_run / "whole", cfg, device="cpu")
    stopped = train(toy_run / "data.npz", str(toy_run / "target"), toy_run / "split", cfg, device="cpu", stop=Stop(after=5))
    assert stopped == {"stopped": 5}
    train(toy_run / "data.npz", str(toy_run / "target"), toy_run / "split", cfg, device="cpu")
    a = torch.load(toy_run / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(toy_run / "split" / "checkpoint.pt", weights_only=False)
    assert a["state"]["step"] == b["state"]["step"] == 12
    assert a["state"]["train_loss"] == b["state"]["train_loss"]
    for k, v in a["head"].items():
        assert torch.equal(v, b["head"][k]), k


def test_compile_falls_back_to_eager(monkeypatch):
    from eaglespec.train import eagle3 as trainer

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(trainer.torch, "compile", lambda fn, **kw: broken)
    wrapped = trainer.CompiledOrEager(lambda x: x + 1)
    assert wrapped(1) == 2 and wrapped.works is False
    assert wrapped(2) == 3


# -- continuing a saved head (--init-from) -------------------------------------------------------------


def test_init_from_continues_a_saved_head(toy_run):
    """A run started from a trained head starts at that head's loss, not a new head's, and keeps its
    draft vocabulary."""
    from eaglespec.train.eagle3 import train

    data, target = toy_run / "data.npz", str(toy_run / "target")
    train(data, target, toy_run / "first", toy_config(max_steps=24), device="cpu")
    first = json.loads((toy_run / "first" / "metrics.json").read_text())["train_loss"]
    train(data, target, toy_run / "more", toy_config(max_steps=3), device="cpu", init_from=toy_run / "first" / "final")
    more = json.loads((toy_run / "more" / "metrics.json").read_text())
    assert more["init_from"] == str(toy_run / "first" / "final")
    # the same first batch (seed 0, epoch 0): about 4.7 against 8.1, the trained weights were loaded
    assert more["train_loss"][0] < 0.8 * first[0]
    a = Eagle3Head.from_pretrained(toy_run / "first" / "final")
    b = Eagle3Head.from_pretrained(toy_run / "more" / "final")
    assert torch.equal(a.d2t, b.d2t) and torch.equal(a.t2d, b.t2d)


def test_init_from_keeps_the_heads_vocabulary_and_weights(toy_run):
    """The draft vocabulary comes from the head (d2t/t2d), not from the pack's counts, and the run
    starts from the head's weights: at a vanishing learning rate they come out unchanged."""
    from eaglespec.train.eagle3 import train

    saved = new_head(k=48)  # draft ids 0, 2, 4, ...: not the pack's 48 most frequent answer tokens
    saved.save_pretrained(toy_run / "saved")
    packed = read_pack(toy_run / "data.npz")
    assert not np.array_equal(draft_vocab(packed.token_counts, 48), saved.draft_token_ids().numpy())
    out = toy_run / "run"
    train(toy_run / "data.npz", str(toy_run / "target"), out, toy_config(max_steps=1, lr=1e-12, draft_vocab=None),
          device="cpu", init_from=toy_run / "saved")
    assert json.loads((out / "metrics.json").read_text())["draft_vocab"] == 48
    state = torch.load(out / "checkpoint.pt", weights_only=False)["head"]  # float32, as trained
    for name, value in saved.state_dict().items():
        assert torch.allclose(state[name].float(), value.float(), atol=1e-6), name
    final = Eagle3Head.from_pretrained(out / "final")
    assert torch.equal(final.draft_token_ids(), saved.draft_token_ids())


def _misfit(kind: str, path) -> None:
    """Save an EAGLE-3 head that does not fit the 8-layer test target in one way."""
    if kind == "hidden size":
        config = LlamaConfig(**{**target_model().config.to_dict(), "hidden_size": 48, "head_dim": 12})
        head = Eagle3Head(eagle3_config(config, 64))
    elif kind == "layer ids":
        head = Eagle3Head(eagle3_config(target_model().config, 64, layer_ids=(2, 4, 9)))
    else:
        config = LlamaConfig(**{**target_model().config.to_dict(), "vocab_size": VOCAB + 8})
        head = Eagle3Head(eagle3_config(config, 64))
    head.set_vocab(torch.arange(64))
    head.save_pretrained(path)


@pytest.mark.parametrize("kind, words", [
    ("hidden size", "reads 3 x 48 features, the target has hidden size 32"),
    ("layer ids", "reads layers (2, 4, 9), the target has 8"),
    ("vocab", f"vocabulary {VOCAB + 8}, target vocabulary {VOCAB}"),
    ("draft vocab", "drafts over 64 tokens, not --draft-vocab 32"),
    ("missing", "no EAGLE-3 head there"),
])
def test_init_from_refuses_a_head_that_does_not_fit(toy_run, capsys, kind, words):
    from eaglespec.cli import main

    head_dir = toy_run / "head"
    head_dir.mkdir()
    if kind == "draft vocab":
        new_head(k=64).save_pretrained(head_dir)
    elif kind != "missing":
        _misfit(kind, head_dir)
    extra = ["--draft-vocab", "32"] if kind == "draft vocab" else []
    code = main(["train", "eagle3", "--data", str(toy_run / "data.npz"), "--target", str(toy_run / "target"),
                 "--out", str(toy_run / "run"), "--device", "cpu", "--init-from", str(head_dir), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("eaglespec: error: --init-from") and words in err, err
    assert not (toy_run / "run" / "checkpoint.pt").exists()


def test_train_eagle3_and_pack_are_cli_subcommands(toy_run, capsys):
    """`eaglespec train eagle3` maps its flags onto Eagle3TrainConfig and trains as train() does with
    that config; `train pack` refuses a missing answer store in one line."""
    from eaglespec.cli import main
    from eaglespec.train.eagle3 import train

    argv = ["train", "eagle3", "--data", str(toy_run / "data.npz"), "--target", str(toy_run / "target"),
            "--device", "cpu", "--max-steps", "2", "--ttt-steps", "2", "--draft-vocab", "32", "--batch-tokens", "192",
            "--val-rows", "4", "--mixed-precision", "no", "--out", str(toy_run / "cli")]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["finished"] and len(result["acc"]) == 2
    cfg = toy_config(max_steps=2, ttt_steps=2, draft_vocab=32, batch_tokens=192, val_rows=4, lr=6e-4,
                     warmup_steps=100, checkpoint_every=200, eval_every=200)
    assert json.loads((toy_run / "cli" / "metrics.json").read_text())["config"] == dataclasses.asdict(cfg)
    train(toy_run / "data.npz", str(toy_run / "target"), toy_run / "direct", cfg, device="cpu")
    a = load_file(str(toy_run / "cli" / "final" / "model.safetensors"))
    b = load_file(str(toy_run / "direct" / "final" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # same seed, same run
    capsys.readouterr()
    code = main(["train", "pack", "--out", str(toy_run / "p.npz"), "--answer-store", str(toy_run / "none")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--answer-store" in err
