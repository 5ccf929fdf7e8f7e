"""Train an EAGLE head on stored target features (the EAGLE-1 recipe).

    input   pair i = (feature f_i + U(-noise, noise), embedding of token t_{i+1})
    target  f_{i+1}, and the target's next-token distribution softmax(lm_head(f_{i+1}))
    loss    SmoothL1(pred, f_{i+1}) + p_weight * CE(target distribution, draft distribution)
            averaged over positions whose token t_{i+1} is an assistant token
    unrolled with ttt_steps > 1 (training-time test, as HASS and EAGLE-3): the head also drafts
            steps 2.. from its own predicted features, as the engine does, each step's loss
            weighted ttt_decay ** step

Runs on one CPU as is and unchanged under `accelerate launch` on several GPUs or machines:
accelerate prepares the head, optimizer, scheduler and data loader. A checkpoint (every
`checkpoint_every` steps) holds the head, optimizer, scheduler, RNG states and the position in
the epoch's data order, so a killed run resumes where the last checkpoint left it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from eaglespec.backends import auto_dtype
from eaglespec.draft import DraftHead, check_fits, head_config_from_target
from eaglespec.train.config import DEFAULT_DRAFT_VOCAB, TrainConfig

log = logging.getLogger(__name__)


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """accelerate's mixed-precision setting for `device`: "auto" autocasts to the dtype that
    `auto_dtype` picks for a target there (bf16 on CPUs with AMX or AVX-512 bf16, where autocast is
    fast; none on an AVX2 CPU, whose bf16 matmuls are emulated); any other setting is kept."""
    if setting != "auto":
        return setting
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(auto_dtype(device), "no")


class FrozenTargetParts:
    """The target's embedding and LM head (frozen, float32): all the head training needs."""

    def __init__(self, embed: torch.Tensor, lm_head: torch.Tensor, config) -> None:
        self.embed = embed.detach().float()  # [V, H]
        self.lm_head = lm_head.detach().float()  # [V, H]
        self.config = config

    @classmethod
    def from_target(cls, target) -> "FrozenTargetParts":
        return cls(target.embed.weight, target.lm_head.weight, target.config)


def top_token_ids(rows: list[dict], k: int, vocab_size: int) -> torch.Tensor:
    """The k most frequent tokens on the loss-masked positions of the training rows."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for r in rows:
        counts += torch.bincount(r["input_ids"][r["loss_mask"].bool()], minlength=vocab_size)
    k = min(k, int((counts > 0).sum()) or vocab_size)
    return counts.topk(k).indices


def pick_vocab(head: DraftHead, rows: list[dict], k: int, vocab_size: int) -> None:
    """Draft over the k most frequent loss tokens of `rows`, or the whole vocabulary for k = 0 or k >= V.
    Only what the head proposes changes; its weights stay, since the LM head rows are the target's."""
    if k and k < vocab_size:
        head.set_vocab(top_token_ids(rows, k, vocab_size))
    else:
        head.set_vocab(torch.arange(vocab_size))


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest: ids [B, T], features [B, T, H], mask [B, T] (0 on padding)."""
    t = max(r["input_ids"].shape[0] for r in rows)
    h = rows[0]["features"].shape[1]
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    feats = torch.zeros(len(rows), t, h, dtype=torch.bfloat16)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[0]
        ids[i, :n] = r["input_ids"]
        feats[i, :n] = r["features"]
        mask[i, :n] = r["loss_mask"].bool()
    return {"input_ids": ids, "features": feats, "loss_mask": mask}


def epoch_batches(lengths: list[int], batch_size: int, group: int, seed: int) -> list[list[int]]:
    """One epoch's batches of row indices, fixed by `seed` (so a resumed run replays them).

    A seeded shuffle of the rows, cut into full batches (the last partial one is dropped). With
    group > 1, each run of group * batch_size shuffled rows is first sorted by length, and the
    batches of all runs are then shuffled: a batch's rows have similar lengths, so it pads little,
    while which rows meet in a batch, and the order batches come in, stay random."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group > 1:
        span = group * batch_size
        order = [i for s in range(0, len(order), span)
                 for i in sorted(order[s:s + span], key=lambda i: lengths[i], reverse=True)]
    batches = [order[s:s + batch_size] for s in range(0, len(order) - batch_size + 1, batch_size)]
    if group > 1:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


class EpochBatches(torch.utils.data.Sampler):
    """A fixed list of batches as a batch sampler, with the attributes accelerate reads when it
    shards one across processes (full batches only, as drop_last)."""

    def __init__(self, batches: list[list[int]], batch_size: int) -> None:
        self.batches, self.batch_size, self.drop_last = batches, batch_size, True

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def shifted(x: torch.Tensor, s: int) -> torch.Tensor:
    """x[:, s:] padded with zeros at the end back to x's length (dim 1)."""
    if s == 0:
        return x
    pad = torch.zeros_like(x[:, :s])
    return torch.cat([x[:, s:], pad], dim=1)


def head_loss(head: DraftHead, parts: FrozenTargetParts, lm_draft: torch.Tensor, batch: dict, cfg: TrainConfig,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The EAGLE-1 loss on one batch, over `cfg.ttt_steps` unrolled draft steps; returns (loss, metrics).

    Step s (0-based) at anchor i is fed the head's own step s-1 prediction and token t_{i+1+s} and
    is scored against f_{i+1+s}, where token t_{i+1+s} is an assistant token. Step s's loss weighs
    ttt_decay ** s. With ttt_steps = 1 this is the plain EAGLE-1 loss."""
    feats = batch["features"].float()  # [B, T, H]
    ids = batch["input_ids"]
    # what step 0 is fed at each position: the features, unless the batch brings other inputs
    # (an experiment that adds information the target has there, e.g. more of its layers)
    inp = batch.get("inputs", feats).float()[:, :-1]
    if cfg.noise > 0:
        noise = torch.rand(inp.shape, generator=generator, device=inp.device) * (2 * cfg.noise) - cfg.noise
        inp = inp + noise
    next_feat = feats[:, 1:]  # [B, N = T-1, H]
    next_ids = ids[:, 1:]  # [B, N]
    mask = batch["loss_mask"][:, 1:].bool()  # [B, N]
    steps = min(cfg.ttt_steps, next_ids.shape[1])
    preds = head.forward_unrolled(inp, [F.embedding(shifted(next_ids, s), parts.embed) for s in range(steps)])
    loss = torch.zeros((), device=inp.device)
    metrics: dict[str, float] = {}
    for s, pred in enumerate(preds):
        # only loss positions are scored: prompt and padding rows never meet the two LM-head
        # products (skipping them cut a step by 29% on target-written rows, README Training)
        m = shifted(mask, s)
        denom = m.sum().clamp(min=1)
        pred_m, next_m = pred[m], shifted(next_feat, s)[m]  # [M, H]
        vloss = F.smooth_l1_loss(pred_m, next_m, reduction="none").mean(-1).sum() / denom
        with torch.no_grad():
            target_p = F.linear(next_m, lm_draft).softmax(-1)  # [M, K]
        logq = F.linear(pred_m, lm_draft).log_softmax(-1)
        ploss = -(target_p * logq).sum() / denom
        loss = loss + cfg.ttt_decay**s * (vloss + cfg.p_weight * ploss)
        with torch.no_grad():
            acc = (logq.argmax(-1) == target_p.argmax(-1)).sum() / denom
        tag = "" if s == 0 else str(s)
        metrics.update({f"vloss{tag}": vloss.item(), f"ploss{tag}": ploss.item(), f"acc{tag}": acc.item()})
    return loss, {"loss": loss.item(), **metrics}


@torch.no_grad()
def simulate_chains(head: DraftHead, parts: FrozenTargetParts, lm_draft: torch.Tensor, vocab_ids: torch.Tensor,
                    rows: list[dict], depth: int = 5, stride: int = 16) -> dict:
    """Draft a chain of `depth` guesses at every `stride`-th assistant position of each row, the way
    the engine drafts (cache, own predicted features), and score it against the target's greedy
    choice (argmax of its LM head on the stored features).

    A guess can only be checked while the row's own tokens follow the target's greedy path, so on
    human-written rows the simulated tau is a lower bound; on `--regenerate` rows it is close.
    A row may carry `inputs` [T, H]: what the head is fed at committed positions instead of its
    features (the greedy tokens still come from the features).
    Returns per-step top-1 accuracy (given all earlier steps right) and tau = 1 + mean accepted.
    """
    head.eval()
    right = torch.zeros(depth)
    tried = torch.zeros(depth)
    accepted_total, chains = 0, 0
    for r in rows:
        ids, feats = r["input_ids"], r["features"].float()
        inputs = r["inputs"].float() if "inputs" in r else feats
        n = ids.shape[0]
        greedy = F.linear(feats, parts.lm_head).argmax(-1)  # [T]: target's choice after each position
        cache = head.new_cache(n + depth, feats.device, feats.dtype)
        starts = [i for i in range(0, n - depth - 2, stride) if r["loss_mask"][i + 1]]
        done = 0  # pairs committed
        for i in starts:
            # commit the real pairs (f_j, t_{j+1}) for j in [done, i]
            js = torch.arange(done, i + 1)
            vis = torch.ones(len(js), i + 1, dtype=torch.bool).tril_(diagonal=done)
            h = head(inputs[js][None], F.embedding(ids[js + 1], parts.embed)[None], js[None], vis[None, None], cache, commit=True)[0, -1]
            done = i + 1
            accepted = 0
            for k in range(depth):
                guess = vocab_ids[F.linear(h, lm_draft).argmax()]
                pos = i + 1 + k  # the guess is for token pos + 1, after feature pos
                tried[k] += 1
                if guess != greedy[pos]:
                    break
                right[k] += 1
                accepted += 1
                if pos + 1 >= n or ids[pos + 1] != guess:
                    break  # the row leaves the target's greedy path: nothing further to check
                vis = torch.ones(1, cache.length + cache.tree_len + 1, dtype=torch.bool)
                h = head(h[None, None], F.embedding(guess.reshape(1, 1), parts.embed), torch.tensor([[pos]]),
                         vis[None, None], cache)[0, -1]
            cache.drop_tree()
            accepted_total += accepted
            chains += 1
    head.train()
    acc = (right / tried.clamp(min=1)).tolist()
    return {"chains": chains, "step_acc": [round(a, 4) for a in acc],
            "sim_tau": round(1 + accepted_total / max(chains, 1), 4)}


def unseen_prompts(val_rows: list[dict], train_rows: list[dict]) -> list[dict]:
    """The validation rows whose prompt (the tokens before the first assistant token) is no
    training row's prompt. ShareGPT repeats conversations under other ids, and the split hashes
    ids, so a few validation prompts are also training prompts; scoring those flatters a head."""

    def prompt(r: dict) -> tuple[int, ...]:
        mask = r["loss_mask"]
        first = int(mask.nonzero()[0]) if bool(mask.any()) else len(mask)
        return tuple(r["input_ids"][:first].tolist())

    seen = {prompt(r) for r in train_rows}
    return [r for r in val_rows if prompt(r) not in seen]


def grow_head(head: DraftHead, num_layers: int) -> DraftHead:
    """The head with decoder layers appended up to `num_layers`, computing the same function: each
    new layer's residual branches end in zeroed projections (o_proj, down_proj), so it starts as the
    identity and training grows it from there."""
    if num_layers < head.num_layers:
        raise ValueError(f"cannot shrink a {head.num_layers}-layer head to {num_layers} layers")
    config = copy.deepcopy(head.config)
    config.num_hidden_layers = num_layers
    grown = DraftHead(config).to(dtype=head.fc.weight.dtype, device=head.fc.weight.device)
    missing, unexpected = grown.load_state_dict(head.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("layers.") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in grown.layers[head.num_layers:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return grown


def train_head(parts: FrozenTargetParts, train_rows: list[dict], val_rows: list[dict], out_dir: Path,
               cfg: TrainConfig, extra_card: dict | None = None, init_from: Path | None = None) -> dict:
    """Train (or resume) a head in `out_dir`; write the final head to `out_dir / 'head'`.

    init_from: a head to start from (its weights and draft vocabulary), e.g. to fine-tune a head
    trained on human-written text on the target's own answers. A checkpoint in `out_dir` wins.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision, device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
    log.warning("mixed precision: %s", mixed_precision)
    set_seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir, state_path = out_dir / "checkpoint", out_dir / "checkpoint" / "trainer.json"
    if not train_rows:
        raise ValueError("no training rows")

    vocab_size = parts.embed.shape[0]
    if init_from is not None:
        head = DraftHead.from_pretrained(init_from)
        check_fits(head, parts.embed.shape[1], vocab_size)
        log.warning("starting from the head in %s (its draft vocabulary of %d tokens kept)", init_from,
                    head.draft_token_ids().shape[0])
        if cfg.layers > head.num_layers:
            head = grow_head(head, cfg.layers)
        if cfg.draft_vocab is not None:
            pick_vocab(head, train_rows, cfg.draft_vocab, vocab_size)
            log.warning("draft vocabulary picked afresh from the training rows: %d tokens",
                        head.draft_token_ids().shape[0])
    else:
        head = DraftHead(head_config_from_target(parts.config, num_layers=cfg.layers))
        pick_vocab(head, train_rows, DEFAULT_DRAFT_VOCAB if cfg.draft_vocab is None else cfg.draft_vocab, vocab_size)
    vocab_ids = head.draft_token_ids()
    lm_draft = parts.lm_head[vocab_ids]  # [K, H]
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    # linear warm-up, then cosine decay to min_lr_ratio * lr at cfg.steps
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(cfg.steps, cfg.warmup_steps + 1),
        min_lr_rate=cfg.min_lr_ratio)
    head, optimizer, scheduler = accelerator.prepare(head, optimizer, scheduler)
    parts.embed, lm_draft = parts.embed.to(accelerator.device), lm_draft.to(accelerator.device)

    step, epoch, pos = 0, 0, 0
    history: list[dict] = []
    done_seconds, tokens_seen = 0.0, 0  # over all resumed runs, as of the last checkpoint
    swapped = out_dir / "checkpoint.tmp" / "trainer.json"
    if not state_path.is_file() and swapped.is_file() and accelerator.is_main_process:
        swapped.parent.replace(ckpt_dir)  # killed between removing the old checkpoint and renaming the new
    accelerator.wait_for_everyone()
    if state_path.is_file():
        accelerator.load_state(str(ckpt_dir))
        state = json.loads(state_path.read_text())
        if "length_group" not in state["config"]:  # begun before length groups: replay that run's order
            cfg = dataclasses.replace(cfg, length_group=1)
        if state["config"] != asdict(cfg):
            log.warning("resuming with changed settings: %s -> %s", state["config"], asdict(cfg))
        step, epoch, pos, history = state["step"], state["epoch"], state["pos"], state["history"]
        done_seconds, tokens_seen = state.get("seconds", 0.0), state.get("tokens_seen", 0)
        log.warning("resumed at step %d (epoch %d, batch %d)", step, epoch, pos)

    lengths = [r["input_ids"].shape[0] for r in train_rows]

    def epoch_loader(e: int):
        batches = EpochBatches(epoch_batches(lengths, cfg.batch_size, cfg.length_group, cfg.seed + e), cfg.batch_size)
        dl = torch.utils.data.DataLoader(train_rows, batch_sampler=batches, collate_fn=collate)
        return accelerator.prepare_data_loader(dl)

    def save_checkpoint() -> None:
        """Every process takes part in save_state (sharded setups need it); only the main one
        writes the trainer record and swaps the folder in."""
        tmp = out_dir / "checkpoint.tmp"
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            seconds = done_seconds + time.perf_counter() - started
            (tmp / "trainer.json").write_text(json.dumps(
                {"step": step, "epoch": epoch, "pos": pos, "history": history, "config": asdict(cfg),
                 "seconds": round(seconds, 1), "tokens_seen": tokens_seen}))
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            tmp.replace(ckpt_dir)
        accelerator.wait_for_everyone()

    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not accelerator.is_main_process)
    noise_gen = torch.Generator(device=accelerator.device)
    started = time.perf_counter()
    while step < cfg.steps:
        loader = epoch_loader(epoch)
        if pos >= len(loader):
            epoch, pos = epoch + 1, 0
            continue
        batches = accelerator.skip_first_batches(loader, pos) if pos else loader
        for batch in batches:
            noise_gen.manual_seed(cfg.seed * 1_000_003 + step)  # noise fixed by step: resume-exact
            with accelerator.autocast():
                loss, metrics = head_loss(head, parts, lm_draft, batch, cfg, noise_gen)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step, pos = step + 1, pos + 1
            tokens_seen += int(batch["loss_mask"].sum())
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['acc']:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if step % 10 == 0 or step == 1:
                history.append({"step": step, **{k: round(v, 5) for k, v in metrics.items()}})
            if step % cfg.eval_every == 0 and val_rows and accelerator.is_main_process:
                ev = simulate_chains(accelerator.unwrap_model(head), parts, lm_draft, vocab_ids, val_rows)
                history.append({"step": step, "val": ev})
                log.warning("step %d validation: %s", step, ev)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint()
            if step >= cfg.steps:
                break
        else:
            epoch, pos = epoch + 1, 0
    bar.close()
    final = {}
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(head)
        final = simulate_chains(model, parts, lm_draft, vocab_ids, val_rows) if val_rows else {}
        card = {"steps": step, "epochs": round(step * cfg.batch_size / len(train_rows), 2),
                "train_rows": len(train_rows), "train_seconds": round(done_seconds + time.perf_counter() - started, 1),
                "loss_tokens_seen": tokens_seen, "validation": final,
                "config": asdict(cfg), "mixed_precision": mixed_precision, **(extra_card or {})}
        model.save_pretrained(out_dir / "head")
        (out_dir / "head" / "training.json").write_text(json.dumps(card, indent=2))
        (out_dir / "history.json").write_text(json.dumps(history))
    return final
