"""Train an EAGLE-3 head with online target features and the training-time test.

    eaglespec train eagle3 --data runs/eagle3/sharegpt-smollm2.npz --target MODEL.gguf \
        --out runs/eagle3/train --max-minutes 6 [--init-from HEAD_DIR]

Each step runs the frozen target over a batch of packed rows (train/pack.py) to get the fused
features of layers (2, L//2, L-3) and its logits, then unrolls the head `ttt_steps` draft steps
from every position at once (Eagle3Head.forward_unrolled) and scores step s against the target's
distribution over the draft vocabulary at the token it predicts, weighted ttt_decay ** s.

Loss, as the official EAGLE-3 trainer: soft cross-entropy -sum_v p_target(v) log q(v), p the
target's softmax restricted to the draft vocabulary, on positions whose target argmax lies in the
draft vocabulary (elsewhere the head cannot be right and the position is left out). Two deviations,
both about which positions count: a position counts when the token it predicts is an answer token
(the official code shifts the loss mask by s where the prediction sits s + 2 ahead, and scores the
zero-padded logits past a row's end), and a step's loss is averaged over the counted positions of
step 0, not over all B x T padded positions, so the scale does not depend on padding.

Resumable: RUN/checkpoint.pt holds the head, optimizer, schedule, data position and RNG states; it
is written every --checkpoint-every steps, at --max-minutes, and on SIGTERM / Ctrl-C; the same
command continues from it. RUN/final/ gets the head in the EAGLE-3 layout (bf16), RUN/metrics.json
the held-out accuracy of each unrolled step and the chain tau after each evaluation. --init-from
starts a new run from a saved head (RUN/final/ of an earlier run, or a shipped one) with its draft
vocabulary, so a later GPU lease continues a head instead of starting over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eaglespec.aux_features import aux_layer_ids, capture_aux
from eaglespec.eagle3 import Eagle3Error, Eagle3Head, check_fits, eagle3_config
from eaglespec.train.config import DEFAULT_DRAFT_VOCAB, Eagle3TrainConfig
from eaglespec.train.pack import Packed, draft_vocab, read_pack

log = logging.getLogger(__name__)


# -- data --------------------------------------------------------------------------------------------


def length_batches(lengths: np.ndarray, rows: np.ndarray, batch_tokens: int, rng: np.random.Generator
                   ) -> list[np.ndarray]:
    """Rows cut into batches of similar length, each with rows x longest <= batch_tokens (a longer
    row makes a batch alone), in random order. Equal lengths are ordered at random, so batches
    differ between epochs."""
    order = rows[rng.permutation(len(rows))]
    order = order[np.argsort(lengths[order], kind="stable")]
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * lengths[order[end]] <= batch_tokens:
            end += 1
        batches.append(order[start:end])
        start = end
    return [batches[i] for i in rng.permutation(len(batches))]


def epoch_batches(packed: Packed, rows: np.ndarray, batch_tokens: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch: fixed by (seed, epoch), so a resumed run sees the same ones."""
    return length_batches(packed.lengths(), rows, batch_tokens, np.random.default_rng([seed, epoch]))


def collate(packed: Packed, batch: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] (right-padded with 0) and loss mask [B, T] bool (False on padding)."""
    t = int(packed.lengths()[batch].max())
    ids = np.zeros((len(batch), t), dtype=np.int64)
    mask = np.zeros((len(batch), t), dtype=bool)
    for i, r in enumerate(batch):
        row_ids, row_mask = packed.row(int(r))
        ids[i, : len(row_ids)] = row_ids
        mask[i, : len(row_ids)] = row_mask
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


# -- the target's side -------------------------------------------------------------------------------


@dataclass
class TargetBatch:
    """What the frozen target gives one batch."""

    features: torch.Tensor  # [B, T, 3H] fused aux hidden states
    embeds: torch.Tensor  # [B, T, H] token embeddings
    predicted: torch.Tensor  # [B, T] bool: x_t is an answer token, so it is a prediction to score
    top: torch.Tensor  # [n] long: the target's argmax at position t - 1 of each predicted token (full vocab)
    logp: torch.Tensor  # [n, K] float32: log of its softmax over the draft vocabulary
    index: torch.Tensor  # [B, T] long: row of `top`/`logp` of predicted token x_t, -1 elsewhere


@torch.no_grad()
def run_target(model, ids: torch.Tensor, mask: torch.Tensor, layer_ids, vocab_ids: torch.Tensor) -> TargetBatch:
    """The target over right-padded rows (causal: padding after a row never reaches its tokens).
    Logits are computed only where they are a soft label: at t - 1 for each answer token x_t."""
    decoder = model.get_decoder()
    with capture_aux(decoder, layer_ids) as aux:
        last = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [B, T, H]
    predicted = mask.clone()
    predicted[:, 0] = False  # x_0 has no position before it
    b, t = ids.shape
    src = predicted.roll(-1, dims=1)  # [B, T]: position t - 1 of each predicted token
    src[:, -1] = False
    index = torch.full((b, t), -1, dtype=torch.long, device=ids.device)
    n = int(predicted.sum())  # host sync, once per batch
    index[predicted] = torch.arange(n, device=ids.device)
    logits = model.get_output_embeddings()(last[src])  # [n, V]
    top = logits.argmax(-1)
    logp = logits[:, vocab_ids].float().log_softmax(-1)  # [n, K]
    return TargetBatch(features=aux.fused(), embeds=model.get_input_embeddings()(ids), predicted=predicted,
                       top=top, logp=logp, index=index)


# -- the head's side ---------------------------------------------------------------------------------


@dataclass
class StepStats:
    loss: torch.Tensor  # weighted loss of all steps (scalar, with grad)
    correct: list[torch.Tensor]  # per step: [B, T] bool, the draft argmax equals the target's (full vocab)
    valid: list[torch.Tensor]  # per step: [B, T] bool, the position predicts an answer token


def unrolled_loss(head: Eagle3Head, tb: TargetBatch, ids: torch.Tensor, steps: int, decay: float,
                  with_grad: bool = True) -> StepStats:
    """The training-time test over one batch. Step s at anchor i is fed token x_{i+1+s} and predicts
    x_{i+2+s}; it is scored where that token is an answer token, against the target's distribution
    at position i+1+s."""
    b, t = ids.shape
    embeds = []
    for s in range(steps):
        e = tb.embeds[:, 1 + s:]  # embedding of x_{i+1+s} at anchor i
        embeds.append(F.pad(e, (0, 0, 0, t - e.shape[1])))  # anchors past the row's end see zeros
    with torch.set_grad_enabled(with_grad):
        outs = head.forward_unrolled(tb.features, embeds)
        ids_map = head.draft_token_ids()
        t2d = head.t2d
        total = ids.new_zeros((), dtype=torch.float32)
        correct, valid = [], []
        norm = None
        for s, h in enumerate(outs):
            m = max(t - 2 - s, 0)  # anchors whose prediction x_{i+2+s} lies inside the row
            at = tb.index[:, 2 + s:]  # [B, m] row of x_{i+2+s}'s label, or -1
            ok = at >= 0
            val = torch.cat([ok, ok.new_zeros(b, t - m)], dim=1)  # [B, T] by anchor
            rows = at[ok]
            in_vocab = t2d[tb.top[rows]]  # the official rule: a target argmax outside the vocabulary is left out
            logits = head.logits(h[:, :m][ok]).float()  # [n_s, K]
            logq = logits.log_softmax(-1)
            per_pos = -(tb.logp[rows].exp() * logq).sum(-1)  # [n_s]
            if norm is None:
                norm = max(int(ok.sum()), 1)  # host sync: positions scored by step 0
            total = total + decay**s * (per_pos * in_vocab).sum() / norm
            hit = torch.zeros_like(val)
            hit[:, :m][ok] = ids_map[logits.argmax(-1)] == tb.top[rows]
            correct.append(hit)
            valid.append(val)
    return StepStats(loss=total, correct=correct, valid=valid)


def chain_metrics(correct: list[torch.Tensor], valid: list[torch.Tensor]) -> dict:
    """acc@k: share of positions whose step-k draft equals the target's argmax; tau_est: 1 + sum of
    the cumulative products of acc@k (the chain length if steps failed independently); tau_chain:
    1 + the mean count of leading correct steps per anchor (a step past a row's answer ends it)."""
    acc = [float(c.sum()) / max(float(v.sum()), 1.0) for c, v in zip(correct, valid)]
    tau_est = 1.0 + float(np.cumprod(acc).sum())
    alive = valid[0].clone()
    run = torch.zeros_like(valid[0], dtype=torch.float32)
    for c in correct:
        alive &= c
        run += alive.float()
    anchors = max(float(valid[0].sum()), 1.0)
    return {"acc": acc, "tau_est": tau_est, "tau_chain": 1.0 + float(run[valid[0]].sum()) / anchors}


# -- checkpoint --------------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic torch.save: a kill mid-write leaves the previous checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the loop ----------------------------------------------------------------------------------------


class Stop:
    """Set by SIGTERM / SIGINT: the loop saves and ends after the current step. `after` stops at
    that step, as a kill would (tests)."""

    def __init__(self, after: int | None = None) -> None:
        self.requested = False
        self.after = after

    def check(self, step: int) -> bool:
        if self.after is not None and step >= self.after:
            self.requested = True
        return self.requested

    def __call__(self, signum, frame) -> None:
        log.warning("signal %d: saving a checkpoint and stopping after this step", signum)
        self.requested = True


class CompiledOrEager:
    """torch.compile of `fn`, falling back to `fn` itself if the first compiled call fails (compiling
    happens then, not at torch.compile); a failure after a compiled call worked is raised."""

    def __init__(self, fn) -> None:
        self.eager = fn
        self.compiled = torch.compile(fn, dynamic=True)
        self.works: bool | None = None

    def __call__(self, *args, **kwargs):
        if self.works is False:
            return self.eager(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compile failure means eager, which is always correct
            if self.works:
                raise
            log.warning("torch.compile failed (%s: %s): training eagerly", type(e).__name__, e)
            self.works = False
            return self.eager(*args, **kwargs)
        self.works = True
        return out


def load_target_model(path: str | None, device: torch.device, dtype: torch.dtype):
    """The frozen target: a transformers folder, or a GGUF file (converted once; needs `gguf`)."""
    from transformers import AutoModelForCausalLM

    from eaglespec.target import resolve_model_path

    folder = resolve_model_path(path)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval().requires_grad_(False)


def new_head(target_config, vocab_ids: torch.Tensor, model, init_from_target: bool, seed: int) -> Eagle3Head:
    torch.manual_seed(seed)
    head = Eagle3Head(eagle3_config(target_config, len(vocab_ids), aux_layer_ids(target_config.num_hidden_layers)))
    head.set_vocab(vocab_ids)
    if init_from_target:  # the head then starts from the target's own read-out of a last hidden state
        with torch.no_grad():
            w = model.get_output_embeddings().weight
            head.lm_head.weight.copy_(w[vocab_ids.to(w.device)].float().cpu())
            final_norm = getattr(model.get_decoder(), "norm", None)
            if final_norm is not None:
                head.norm.weight.copy_(final_norm.weight.float().cpu())
    return head


def saved_head(path: Path, target_config, size: int | None) -> Eagle3Head:
    """A saved EAGLE-3 head (float32) to continue training, checked against the target: it reads the
    target's layers and embeddings, so its widths, aux layers and vocabulary must fit the target's.
    Its draft vocabulary (d2t/t2d) is kept: `size` (--draft-vocab), when given, must be its size."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise Eagle3Error(f"--init-from {path}: no EAGLE-3 head there (expected config.json and model.safetensors)")
    try:
        head = Eagle3Head.from_pretrained(path, num_target_layers=target_config.num_hidden_layers)
        check_fits(head, target_config.hidden_size, target_config.vocab_size, target_config.num_hidden_layers)
    except Eagle3Error as e:
        raise Eagle3Error(f"--init-from {path}: {e}") from None
    if head.hidden_size != target_config.hidden_size:  # its attention reads the target's token embeddings
        raise Eagle3Error(f"--init-from {path}: the head is {head.hidden_size} wide, the target's embeddings "
                          f"{target_config.hidden_size}")
    if size is not None and size != head.draft_vocab_size:
        raise Eagle3Error(f"--init-from {path}: the head drafts over {head.draft_vocab_size} tokens, not "
                          f"--draft-vocab {size} (leave --draft-vocab out to keep the head's vocabulary)")
    return head


def evaluate(head, model, packed: Packed, rows: np.ndarray, cfg: Eagle3TrainConfig, layer_ids, vocab_ids, device,
             accelerator) -> dict:
    head.eval()
    correct: list[list[torch.Tensor]] = [[] for _ in range(cfg.ttt_steps)]
    valid: list[list[torch.Tensor]] = [[] for _ in range(cfg.ttt_steps)]
    loss, n = 0.0, 0
    for batch in length_batches(packed.lengths(), rows, cfg.batch_tokens, np.random.default_rng(0)):
        ids, mask = collate(packed, batch, device)
        tb = run_target(model, ids, mask, layer_ids, vocab_ids)
        with accelerator.autocast():
            st = unrolled_loss(head, tb, ids, cfg.ttt_steps, cfg.ttt_decay, with_grad=False)
        loss += float(st.loss) * len(batch)
        n += len(batch)
        for s in range(cfg.ttt_steps):
            correct[s].append(st.correct[s].flatten())
            valid[s].append(st.valid[s].flatten())
    head.train()
    out = chain_metrics([torch.cat(c) for c in correct], [torch.cat(v) for v in valid])
    out["loss"] = loss / max(n, 1)
    return out


def train(data: Path, target: str | None, out: Path, cfg: Eagle3TrainConfig, device: str | None = None,
          stop: Stop | None = None, init_from: Path | None = None) -> dict:
    """Train (or resume) a head; returns the final metrics (also in out/metrics.json). `init_from`:
    a saved EAGLE-3 head folder to start from (weights, aux layers and draft vocabulary) instead of
    a new head; a checkpoint in `out` still wins, as for any resumed run."""
    from accelerate import Accelerator
    from tqdm import tqdm

    started = time.monotonic()
    deadline = None if cfg.max_minutes is None else started + 60 * cfg.max_minutes
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(cpu=dev.type == "cpu", mixed_precision=mixed)
    dev = accelerator.device
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    if init_from is not None and cfg.init_from_target:
        raise ValueError("--init-from and --init-from-target exclude each other: a saved head has its own lm_head and norm")
    packed = read_pack(data)
    train_rows, val_rows = packed.rows_of("train"), packed.rows_of("val")[: cfg.val_rows]
    model = load_target_model(target, dev, torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if model.config.vocab_size != packed.meta["vocab_size"]:
        raise ValueError(f"the target's vocabulary ({model.config.vocab_size}) is not the pack's ({packed.meta['vocab_size']})")
    if init_from is not None:
        head = saved_head(init_from, model.config, cfg.draft_vocab)
        vocab_np = head.draft_token_ids().numpy()  # [K] sorted target ids: the head's, so d2t/t2d stay its own
    else:
        vocab_np = draft_vocab(packed.token_counts, cfg.draft_vocab or DEFAULT_DRAFT_VOCAB)
        head = new_head(model.config, torch.from_numpy(vocab_np), model, cfg.init_from_target, cfg.seed)
    vocab_ids = torch.from_numpy(vocab_np).to(dev)
    layer_ids = head.aux_layer_ids  # a saved head keeps the layers it was trained on (check_fits: they exist)
    head = head.to(dev)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    head, optimizer = accelerator.prepare(head, optimizer)
    raw_head: Eagle3Head = accelerator.unwrap_model(head)
    unrolled = raw_head.forward_unrolled
    if cfg.compile:
        raw_head.forward_unrolled = CompiledOrEager(unrolled)

    per_epoch = len(epoch_batches(packed, train_rows, cfg.batch_tokens, cfg.seed, 0))
    state = {"step": 0, "epoch": 0, "batch": 0, "total_steps": None, "history": [], "train_loss": []}
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        differ = {k: v for k, v in saved["config"].items() if v != getattr(cfg, k) and k != "max_minutes"}
        if differ:
            log.warning("resuming with other settings than the checkpoint's (checkpoint: %s)", differ)
        raw_head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        set_rng_state(saved["rng"])
        log.warning("resumed at step %d (epoch %d, batch %d)", state["step"], state["epoch"], state["batch"])
    total = state["total_steps"] or cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    calibrate = state["total_steps"] is None and cfg.max_steps is None and deadline is not None
    scheduler = _schedule(optimizer, cfg, total, state["step"])
    if state["total_steps"] is None and not calibrate:
        state["total_steps"] = total

    stop = stop or Stop()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    metrics_path = out / "metrics.json"

    def checkpoint() -> None:
        # the schedule is a function of (step, total_steps), both in `state`; its own state rides along
        save_checkpoint(ckpt, {"head": raw_head.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                               "scheduler": scheduler.state_dict(), "rng": rng_state(), "config": asdict(cfg)})

    def write_metrics(final: dict | None = None) -> None:
        doc = {"config": asdict(cfg), "init_from": None if init_from is None else str(init_from),
               "aux_layer_ids": list(layer_ids), "draft_vocab": int(len(vocab_np)),
               "draft_vocab_coverage": packed.meta.get("draft_vocab_coverage"), "train_rows": int(len(train_rows)),
               "val_rows": int(len(val_rows)), "batches_per_epoch": per_epoch, "device": str(dev),
               "total_steps": state["total_steps"], "history": state["history"], "train_loss": state["train_loss"]}
        if final is not None:
            doc["final"] = final
        metrics_path.write_text(json.dumps(doc, indent=2))

    def run_eval() -> dict:
        m = evaluate(head, model, packed, val_rows, cfg, layer_ids, vocab_ids, dev, accelerator)
        m.update(step=state["step"], epoch=state["epoch"], minutes=(time.monotonic() - started) / 60)
        state["history"].append(m)
        write_metrics()
        log.warning("eval step %d: loss %.3f acc %s tau_est %.2f tau_chain %.2f", state["step"], m["loss"],
                    " ".join(f"{a:.3f}" for a in m["acc"]), m["tau_est"], m["tau_chain"])
        return m

    eval_seconds = 0.0
    bar = tqdm(total=total, initial=state["step"], desc="eagle3", unit="step", dynamic_ncols=True, mininterval=2.0)
    step_times: list[float] = []
    try:
        head.train()
        batches = epoch_batches(packed, train_rows, cfg.batch_tokens, cfg.seed, state["epoch"])
        while state["step"] < total and not stop.check(state["step"]):
            if state["batch"] >= len(batches):
                state["epoch"] += 1
                state["batch"] = 0
                batches = epoch_batches(packed, train_rows, cfg.batch_tokens, cfg.seed, state["epoch"])
            t0 = time.monotonic()
            ids, mask = collate(packed, batches[state["batch"]], dev)
            tb = run_target(model, ids, mask, layer_ids, vocab_ids)
            with accelerator.autocast():
                st = unrolled_loss(raw_head, tb, ids, cfg.ttt_steps, cfg.ttt_decay)
            accelerator.backward(st.loss)
            accelerator.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch"] += 1
            loss = float(st.loss.detach())  # host sync, once per step
            step_times.append(time.monotonic() - t0)
            state["train_loss"].append(loss)
            acc0 = float(st.correct[0].sum()) / max(float(st.valid[0].sum()), 1.0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", acc0=f"{acc0:.3f}", epoch=state["epoch"],
                            lr=f"{scheduler.get_last_lr()[0]:.1e}")
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {state['step']}")
            if calibrate and state["step"] >= min(30, cfg.warmup_steps or 30):
                # the schedule's length: what fits before the deadline at the measured pace (steps
                # after the first few, which include warm-up of kernels), less time for evals and saving
                pace = float(np.mean(step_times[len(step_times) // 3:]))
                left = deadline - time.monotonic() - 45 - 3 * max(eval_seconds, 5.0)
                evals = max(1, (left / pace) // cfg.eval_every)
                total = state["step"] + max(1, int((left - evals * max(eval_seconds, 5.0)) / pace))
                state["total_steps"] = total
                scheduler = _schedule(optimizer, cfg, total, state["step"])
                bar.total = total
                bar.refresh()
                calibrate = False
                log.warning("%.2f s/step: the schedule runs %d steps to fit --max-minutes", pace, total)
            if state["step"] % cfg.eval_every == 0 and state["step"] < total:
                e0 = time.monotonic()
                run_eval()
                eval_seconds = time.monotonic() - e0
            if state["step"] % cfg.checkpoint_every == 0:
                checkpoint()
            if deadline is not None and time.monotonic() > deadline - 30 - eval_seconds:
                log.warning("--max-minutes reached at step %d of %d", state["step"], total)
                break
    finally:
        bar.close()
        for s, h in previous.items():
            signal.signal(s, h)
        checkpoint()
        write_metrics()
    if stop.requested:
        return {"stopped": state["step"]}
    final = run_eval()
    raw_head.forward_unrolled = unrolled
    raw_head.save_pretrained(out / "final", dtype=torch.bfloat16)
    final["finished"] = state["step"] >= total
    final["minutes"] = (time.monotonic() - started) / 60
    final["seconds_per_step"] = float(np.mean(step_times)) if step_times else None
    if dev.type == "cuda":
        final["max_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    write_metrics(final)
    return final


def _schedule(optimizer, cfg: Eagle3TrainConfig, total: int, step: int):
    """Warm-up then cosine decay to min_lr_ratio * lr over `total` steps, positioned at `step`."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", cfg.lr)
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(total, cfg.warmup_steps + 1),
        min_lr_rate=cfg.min_lr_ratio, last_epoch=step - 1)
