"""Tiny random models and heads for tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from eaglespec.backends import optimize_target
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
    if arch == "gemma3":  # a sliding-window layer (window 4) before a full-attention one
        common.update(num_hidden_layers=2, head_dim=hidden // 4)
        return Gemma3TextConfig(**common, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                                query_pre_attn_scalar=hidden // 4, final_logit_softcapping=None,
                                attn_logit_softcapping=None)
    raise ValueError(arch)


def tiny_target(arch: str = "llama", seed: int = 0, max_len: int = 512, logit_scale: float = 1.0,
                copyable: bool = False, pack: bool = True, **kw) -> Target:
    """A random tiny target. copyable=True makes one a draft head can copy exactly (see
    `oracle_head`): one layer, unit-RMS embedding rows (so the input norm is the identity) and no
    attention biases. pack: optimized as load_target does (pre-packed linears on CPU); else stock."""
    torch.manual_seed(seed)
    if copyable:
        kw["layers"] = 1
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        if logit_scale != 1.0:  # sharper next-token distributions
            model.get_output_embeddings().weight.mul_(logit_scale)
        if copyable:
            emb = model.get_input_embeddings().weight
            emb.div_(emb.pow(2).mean(-1, keepdim=True).sqrt())
            attn = model.get_decoder().layers[0].self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                if proj.bias is not None:
                    proj.bias.zero_()
    target = Target(model, tokenizer=None, max_len=max_len)
    if pack:
        optimize_target(target)
    return target


def oracle_head(target: Target, noise: float = 0.0, seed: int = 0) -> DraftHead:
    """A head that is the copyable target's own layer: fed (anything, embed(t+1)) at position i it
    computes the target's pre-norm hidden state at t+1 (RoPE sees the same relative positions),
    whose LM-head argmax is the target's (the final norm has unit weight). `noise` (relative to
    each weight's std) nudges it away from perfect."""
    g = torch.Generator().manual_seed(seed)
    head = DraftHead(head_config_from_target(target.config))
    layer = target.model.get_decoder().layers[0]
    h = target.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, :h] = torch.eye(h)  # pass the token embedding, ignore the feature
        head.fc.bias.zero_()
        if noise:  # mix some of the feature in, and blur the embedding pass-through
            head.fc.weight.add_(torch.randn(head.fc.weight.shape, generator=g) * noise / h**0.5)
        src = dict(layer.named_parameters())
        for name, p in head.layers[0].named_parameters():
            p.copy_(src[name])
    return head.eval()


def random_head(target: Target, seed: int = 1) -> DraftHead:
    torch.manual_seed(seed)
    head = DraftHead(head_config_from_target(target.config))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return head


def greedy_rows(target: Target, n_rows: int = 16, prompt_len: int = 8, new_tokens: int = 48, seed: int = 0) -> list[dict]:
    """The target's own greedy continuations of random prompts, with their features."""
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.train.features import row_features

    gen = Generator(target)
    g = torch.Generator().manual_seed(seed)
    cfg = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    rows = []
    for _ in range(n_rows):
        prompt = torch.randint(2, target.vocab_size, (prompt_len,), generator=g)
        out = [t for chunk in gen.generate_ids(prompt, cfg) for t in chunk]
        ids = torch.cat([prompt, torch.tensor(out)])
        rows.append({"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.uint8),
                     "features": row_features(target, ids.tolist()).to(torch.bfloat16)})
    return rows


def nudged_head(target: Target, steps: int = 150, seed: int = 0, draft_vocab: int | None = None) -> DraftHead:
    """A head trained briefly on the target's own greedy text: long acceptances, not perfect."""
    from eaglespec.train.trainer import FrozenTargetParts, TrainConfig, collate, head_loss, top_token_ids

    rows = greedy_rows(target, seed=seed)
    parts = FrozenTargetParts.from_target(target)
    torch.manual_seed(seed)
    head = DraftHead(head_config_from_target(target.config))
    if draft_vocab:
        head.set_vocab(top_token_ids(rows, draft_vocab, target.vocab_size))
    lm = parts.lm_head[head.draft_token_ids()]
    cfg = TrainConfig(noise=0.0)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    batch = collate(rows)
    for _ in range(steps):
        loss, _ = head_loss(head, parts, lm, batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval()


WORDS = ["<unk>", "<eos>", "<bos>", "user", "assistant", "system", ":"] + [f"w{i}" for i in range(89)]


def save_tiny_model(path, seed: int = 0, layers: int = 2):
    """Save a tiny random Llama (vocab = WORDS) with a fast word-level tokenizer and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab=len(WORDS), layers=layers), dtype=torch.float32)
    model.generation_config.eos_token_id = 1
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def random_eagle3_head(target: Target, k: int | None = None, seed: int = 1):
    """A random EAGLE-3 head for a target of >= 6 layers, over k draft tokens spread across the
    vocabulary (all of it by default)."""
    from eaglespec.eagle3 import Eagle3Head, eagle3_config

    v = target.vocab_size
    k = k or v
    torch.manual_seed(seed)
    head = Eagle3Head(eagle3_config(target.config, k))
    with torch.no_grad():
        for name, p in head.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else torch.nn.init.normal_(p, std=0.1)
    head.set_vocab(torch.arange(k) * v // k)  # k=48 of 96 -> 0, 2, 4, ...
    return head.eval()


def nudged_eagle3_head(target: Target, steps: int = 300, seed: int = 0, n_rows: int = 32):
    """An EAGLE-3 head (default init, the whole vocabulary) trained briefly, 3 unrolled steps, on
    the target's own greedy text: long acceptances, far from perfect."""
    from eaglespec.eagle3 import Eagle3Head, eagle3_config
    from eaglespec.train.eagle3 import run_target, unrolled_loss

    prompt_len = 8
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, target.vocab_size, (n_rows, prompt_len), generator=g)  # [B, 8]
    with torch.no_grad():  # greedy continuations, all rows at once (one decode loop each would take 10 s)
        for _ in range(48):
            ids = torch.cat([ids, target.model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    # ids: [B, T]
    answer = torch.ones_like(ids, dtype=torch.bool)
    answer[:, :prompt_len] = False
    torch.manual_seed(seed)
    head = Eagle3Head(eagle3_config(target.config, target.vocab_size))
    batch = run_target(target.model, ids, answer, head.aux_layer_ids, head.draft_token_ids())
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    head.train()
    for _ in range(steps):
        loss = unrolled_loss(head, batch, ids, steps=3, decay=0.8).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval().requires_grad_(False)
