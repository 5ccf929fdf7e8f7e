import json
import shutil
from collections import Counter

import pytest
import torch
from helpers import WORDS, greedy_rows, tiny_target

from eaglespec.backends import auto_dtype
from eaglespec.cli import main
from eaglespec.target import load_target
from eaglespec.train.data import heldout_prompts, prepare, read_rows, render, split_of
from eaglespec.train.features import dump_features, load_shards, shard_name
from eaglespec.draft import DraftHead, head_config_from_target
from eaglespec.train.trainer import EpochBatches, FrozenTargetParts, TrainConfig, epoch_batches, train_head


def conv(i: int, n_words: int = 12) -> dict:
    words = " ".join(WORDS[7 + (i * 7 + j) % 89] for j in range(n_words))
    return {"id": f"row{i}", "conversations": [{"from": "human", "value": words}, {"from": "gpt", "value": words}]}


def write_jsonl(path, rows, raw_lines=()):
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return path


def train_ids(n: int) -> list[int]:
    """Row indices whose ids fall in the training split."""
    return [i for i in range(10 * n) if split_of(f"row{i}") == "train"][:n]


def test_malformed_rows_are_counted_not_fatal(tmp_path, tiny_model_dir):
    good = [conv(i) for i in train_ids(5)]
    bad = [
        {"id": "x1", "conversations": []},
        {"id": "x2", "conversations": [{"from": "gpt", "value": "w1"}]},
        {"id": "x3", "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "w1"}]},
        {"id": "x4", "conversations": [{"from": "alien", "value": "w1"}]},
        {"id": "x5", "conversations": [{"from": "human", "value": "w1"}]},
    ]
    src = write_jsonl(tmp_path / "d.jsonl", good + bad, raw_lines=["{not json"])
    tok = load_target(str(tiny_model_dir)).tokenizer
    report = prepare(tok, tmp_path / "out", src, max_len=64)
    assert report.kept["train"] == 5
    assert sum(report.skipped.values()) == 6
    assert report.skipped["bad_json"] == 1 and report.skipped["not_user_first"] == 1
    rows = [json.loads(x) for x in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    for r in rows:  # the loss mask covers the assistant words and the closing <eos>
        masked = [WORDS[t] for t, m in zip(r["input_ids"], r["loss_mask"]) if m]
        assert masked[-1] == "<eos>" and all(w.startswith("w") for w in masked[:-1])


def test_skip_rows_leaves_out_the_leading_training_rows_and_keeps_validation(tmp_path, tiny_model_dir):
    """A run that continues from a head trained on the first N rows renders the next ones; the val
    rows of the skipped stretch stay, so validation compares heads on the same rows."""
    val = [i for i in range(2000) if split_of(f"row{i}") == "val"][:2]
    train = train_ids(12)
    rows = [conv(i) for i in train[:2] + val[:1] + train[2:6] + val[1:] + train[6:]]  # val rows in the skipped stretch
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = load_target(str(tiny_model_dir)).tokenizer

    def written(out, split):
        return [json.loads(x)["id"] for x in (tmp_path / out / f"{split}.jsonl").read_text().splitlines()]

    full = prepare(tok, tmp_path / "full", src, max_len=64, max_rows=9)
    part = prepare(tok, tmp_path / "part", src, max_len=64, max_rows=5, skip_rows=4)
    assert part.skip_rows == 4 and part.kept["train"] == 5
    assert written("part", "train") == written("full", "train")[4:]
    assert written("part", "val") == written("full", "val") == [f"row{i}" for i in val]
    assert part.tokens < full.tokens


def test_rows_opening_with_the_assistant_are_skipped_dropped_or_kept_alone(tmp_path, tiny_model_dir):
    """A later part of a split ShareGPT conversation opens with the assistant's turn."""
    def part(i):  # gpt, human, gpt
        c = conv(i)["conversations"]
        return {"id": f"row{i}", "conversations": [c[1], c[0], c[1]]}

    train, val = train_ids(6), [i for i in range(2000) if split_of(f"row{i}") == "val"][:2]
    rows = [conv(i) for i in train[:3]] + [part(i) for i in train[3:]] + [conv(val[0]), part(val[1])]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    tok = load_target(str(tiny_model_dir)).tokenizer

    def written(out, split):
        return [json.loads(x) for x in (tmp_path / out / f"{split}.jsonl").read_text().splitlines()]

    report = {m: prepare(tok, tmp_path / m, src, max_len=64, leading_assistant=m) for m in ("skip", "drop", "only")}
    assert report["skip"].skipped["not_user_first"] == 4 and not report["drop"].skipped
    ids = {m: [r["id"] for r in written(m, "train")] for m in report}
    assert ids["skip"] == [f"row{i}" for i in train[:3]]
    assert ids["drop"] == [f"row{i}" for i in train] and ids["only"] == [f"row{i}" for i in train[3:]]
    assert [r["id"] for r in written("drop", "val")] == [f"row{i}" for i in val]
    assert written("only", "val") == written("skip", "val") and [r["id"] for r in written("skip", "val")] == [f"row{val[0]}"]
    # the dropped turn leaves a conversation that opens with the user: same tokens as a plain row's
    same = {r["id"]: r for r in written("drop", "train")}
    assert same[f"row{train[3]}"]["input_ids"] == render(
        [{"role": "user", "content": conv(train[3])["conversations"][0]["value"]},
         {"role": "assistant", "content": conv(train[3])["conversations"][1]["value"]}], tok, 64)[0]
    with pytest.raises(ValueError, match="leading_assistant"):
        prepare(tok, tmp_path / "bad", src, leading_assistant="keep")


def test_truncated_json_list_counts_the_broken_tail(tmp_path):
    text = json.dumps([conv(1), conv(2)])
    (tmp_path / "cut.json").write_text(text[:-40])
    rows = list(read_rows(tmp_path / "cut.json"))
    assert rows[0]["id"] == "row1" and rows[1] == {"_bad_json": 1}


def test_killed_feature_dump_resumes_to_the_same_shards(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "d.jsonl", [conv(i, 6 + i % 5) for i in train_ids(7)])
    target = load_target(str(tiny_model_dir))
    prepare(target.tokenizer, tmp_path / "data", src, max_len=64)
    rows = tmp_path / "data" / "train.jsonl"
    assert dump_features(target, rows, tmp_path / "whole", rows_per_shard=2) == 4
    assert dump_features(target, rows, tmp_path / "resumed", rows_per_shard=2, max_shards=2) == 2  # "killed"
    (tmp_path / "resumed" / (shard_name(2) + ".tmp")).write_text("half-written junk")  # as a kill leaves it
    assert dump_features(target, rows, tmp_path / "resumed", rows_per_shard=2) == 4
    from safetensors.torch import load_file

    for i in range(4):
        a = load_file(str(tmp_path / "whole" / shard_name(i)))
        b = load_file(str(tmp_path / "resumed" / shard_name(i)))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert len(load_shards(tmp_path / "resumed")) == 7


def test_feature_dump_extends_over_appended_rows(tmp_path, tiny_model_dir):
    """A regeneration that went on appends rows: the dump keeps its full shards, redoes the short
    last one and adds the rest, the same shards as a dump of the longer file from scratch."""
    from safetensors.torch import load_file

    src = write_jsonl(tmp_path / "d.jsonl", [conv(i, 6 + i % 5) for i in train_ids(8)])
    target = load_target(str(tiny_model_dir))
    prepare(target.tokenizer, tmp_path / "data", src, max_len=64)
    rows = tmp_path / "data" / "train.jsonl"
    lines = rows.read_text().splitlines(keepends=True)
    assert len(lines) == 8
    short = tmp_path / "short.jsonl"
    short.write_text("".join(lines[:5]))
    assert dump_features(target, short, tmp_path / "grown", rows_per_shard=2) == 3  # the last shard holds 1 row
    kept = (tmp_path / "grown" / shard_name(1)).stat().st_mtime_ns
    short.write_text("".join(lines))  # appended
    assert dump_features(target, short, tmp_path / "grown", rows_per_shard=2) == 4
    assert (tmp_path / "grown" / shard_name(1)).stat().st_mtime_ns == kept  # a full shard is not redone
    assert dump_features(target, rows, tmp_path / "whole", rows_per_shard=2) == 4
    for i in range(4):
        a, b = load_file(str(tmp_path / "whole" / shard_name(i))), load_file(str(tmp_path / "grown" / shard_name(i)))
        assert all(torch.equal(a[k], b[k]) for k in a), i
    assert len(load_shards(tmp_path / "grown")) == 8
    # a row dropped from the middle and another appended (a repaired regeneration): the shards
    # from the change on are redone, the ones before it kept, as a dump from scratch would be
    repaired = lines[:3] + lines[4:] + [lines[3]]
    short.write_text("".join(repaired))
    fresh = tmp_path / "repaired.jsonl"
    fresh.write_text("".join(repaired))
    first = (tmp_path / "grown" / shard_name(0)).stat().st_mtime_ns
    assert dump_features(target, short, tmp_path / "grown", rows_per_shard=2) == 4
    assert (tmp_path / "grown" / shard_name(0)).stat().st_mtime_ns == first  # rows 0-1 unchanged: kept
    assert (tmp_path / "grown" / shard_name(1)).stat().st_mtime_ns != kept  # rows 2-3 changed: redone
    assert dump_features(target, fresh, tmp_path / "fresh", rows_per_shard=2) == 4
    for i in range(4):
        a, b = load_file(str(tmp_path / "fresh" / shard_name(i))), load_file(str(tmp_path / "grown" / shard_name(i)))
        assert all(torch.equal(a[k], b[k]) for k in a), i
    short.write_text("".join(repaired[:3]))  # rows dropped at the end: the shards past them go
    assert dump_features(target, short, tmp_path / "grown", rows_per_shard=2) == 2
    assert not (tmp_path / "grown" / shard_name(2)).exists()
    assert len(load_shards(tmp_path / "grown")) == 3


@pytest.fixture(scope="module")
def tiny_training():
    target = tiny_target("llama")
    rows = greedy_rows(target, n_rows=12, new_tokens=24)
    return FrozenTargetParts.from_target(target), rows


def test_loss_decreases(tmp_path, tiny_training):
    parts, rows = tiny_training
    cfg = TrainConfig(steps=40, batch_size=4, lr=3e-3, warmup_steps=5, draft_vocab=0, eval_every=1000,
                      checkpoint_every=1000)
    train_head(parts, rows, rows[:2], tmp_path, cfg)
    hist = [h for h in json.loads((tmp_path / "history.json").read_text()) if "loss" in h]
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    card = json.loads((tmp_path / "head" / "training.json").read_text())
    assert card["steps"] == 40 and "sim_tau" in card["validation"]
    assert card["mixed_precision"] in {"no", "bf16", "fp16"}  # "auto" resolved for this machine


def test_mixed_precision_auto_follows_the_targets_auto_dtype(monkeypatch):
    import eaglespec.train.trainer as trainer

    for dtype, want in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "no")):
        monkeypatch.setattr(trainer, "auto_dtype", lambda device, d=dtype: d)
        assert trainer.resolve_mixed_precision("auto", torch.device("cpu")) == want
        assert trainer.resolve_mixed_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")


def test_length_groups_keep_batches_random_but_pad_less():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(20, 1000, (203,), generator=g).tolist()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = epoch_batches(lengths, 4, 1, seed=7)
    # group 1 is the order training always had: a seeded permutation cut into full batches
    order = torch.randperm(203, generator=torch.Generator().manual_seed(7)).tolist()
    assert plain == [order[s:s + 4] for s in range(0, 200, 4)]
    grouped = epoch_batches(lengths, 4, 10, seed=7)
    assert len(grouped) == 50 and all(len(b) == 4 for b in grouped)
    flat = [i for b in grouped for i in b]
    assert len(set(flat)) == 200  # no row twice in an epoch
    assert padding(grouped) < 0.3 * padding(plain)
    assert grouped == epoch_batches(lengths, 4, 10, seed=7)  # fixed by the seed: resumable
    assert grouped != epoch_batches(lengths, 4, 10, seed=8)
    # the batches come shuffled, not longest first
    firsts = [max(lengths[i] for i in b) for b in grouped]
    assert firsts != sorted(firsts, reverse=True)
    # under `accelerate launch`, each of 3 processes gets its own full batches, none dropped but the tail
    from accelerate.data_loader import BatchSamplerShard

    shards = [list(BatchSamplerShard(EpochBatches(grouped, 4), num_processes=3, process_index=p)) for p in range(3)]
    assert [len(x) for x in shards] == [16, 16, 16]
    assert sorted(map(tuple, sum(shards, []))) == sorted(map(tuple, grouped[:48]))


@pytest.mark.parametrize("begun_before_length_groups", [False, True])
def test_resumed_training_restores_step_optimizer_and_data_order(tmp_path, tiny_training, monkeypatch,
                                                                 begun_before_length_groups):
    """A run killed mid-epoch resumes to the very weights of an uninterrupted one. A checkpoint
    written before length groups existed resumes with the plain random order it began with."""
    parts, rows = tiny_training
    # rows of several lengths, so the length groups shape the batches
    rows = [{k: v[: 14 + 2 * i] for k, v in r.items()} for i, r in enumerate(rows)]
    cfg = TrainConfig(steps=12, batch_size=3, lr=1e-3, warmup_steps=2, draft_vocab=40, checkpoint_every=4,
                      eval_every=1000, length_group=1 if begun_before_length_groups else 4)
    train_head(parts, rows, [], tmp_path / "straight", cfg)

    import eaglespec.train.trainer as trainer

    real_loss, calls = trainer.head_loss, {"n": 0}

    def dies_at_step_7(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # killed mid-run, after the step-4 checkpoint
        return real_loss(*a, **k)

    monkeypatch.setattr(trainer, "head_loss", dies_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_head(parts, rows, [], tmp_path / "killed", cfg)
    state = json.loads((tmp_path / "killed" / "checkpoint" / "trainer.json").read_text())
    assert state["step"] == 4
    if begun_before_length_groups:  # its checkpoint has no such setting; this version's default does
        del state["config"]["length_group"]
        (tmp_path / "killed" / "checkpoint" / "trainer.json").write_text(json.dumps(state))
        cfg = TrainConfig(**{**cfg.__dict__, "length_group": TrainConfig().length_group})
    monkeypatch.setattr(trainer, "head_loss", real_loss)
    train_head(parts, rows, [], tmp_path / "killed", cfg)

    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "head" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "head" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_training_can_start_from_an_existing_head(tmp_path, tiny_training):
    """--init: the weights and the draft vocabulary come from the given head, not a fresh one; a
    draft_vocab given with it picks the vocabulary afresh from the new rows and keeps the weights."""
    from safetensors.torch import load_file

    from eaglespec.train.trainer import top_token_ids

    parts, rows = tiny_training
    cfg = TrainConfig(steps=6, batch_size=3, lr=3e-3, warmup_steps=1, draft_vocab=40, checkpoint_every=1000,
                      eval_every=1000)
    train_head(parts, rows, [], tmp_path / "first", cfg)
    still = TrainConfig(steps=1, batch_size=3, lr=1e-12, warmup_steps=0, checkpoint_every=1000, eval_every=1000)
    train_head(parts, rows[6:], [], tmp_path / "second", still, init_from=tmp_path / "first" / "head")
    a = load_file(str(tmp_path / "first" / "head" / "model.safetensors"))
    b = load_file(str(tmp_path / "second" / "head" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=1e-5, msg=k)  # d2t/t2d included
    repick = TrainConfig(**{**still.__dict__, "draft_vocab": 25})
    train_head(parts, rows[6:], [], tmp_path / "repick", repick, init_from=tmp_path / "first" / "head")
    r = DraftHead.from_pretrained(tmp_path / "repick" / "head")
    want = top_token_ids(rows[6:], 25, parts.embed.shape[0]).sort().values
    assert torch.equal(r.draft_token_ids(), want)
    assert not torch.equal(r.draft_token_ids()[:25], DraftHead.from_pretrained(tmp_path / "first" / "head").draft_token_ids()[:25])
    torch.testing.assert_close(r.fc.weight, DraftHead.from_pretrained(tmp_path / "first" / "head").fc.weight, rtol=0, atol=1e-5)
    fresh = TrainConfig(**{**still.__dict__, "draft_vocab": 20})
    train_head(parts, rows[6:], [], tmp_path / "fresh", fresh)
    c = load_file(str(tmp_path / "fresh" / "head" / "model.safetensors"))
    assert not torch.allclose(a["fc.weight"].float(), c["fc.weight"].float())


def test_train_run_end_to_end(tmp_path, tiny_model_dir, capsys):
    # row219 hashes to the validation split, and its prompt opens no training row
    src = write_jsonl(tmp_path / "d.jsonl", [conv(219, 10)] + [conv(i, 10) for i in range(40)])
    args = ["train", "run", "--out", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--source", str(src),
            "--max-rows", "20", "--seq-len", "48", "--steps", "6", "--batch-size", "2", "--draft-vocab", "30",
            "--checkpoint-every", "3", "--rows-per-shard", "8", "--ttt-steps", "2", "--p-weight", "0.5"]
    assert main(args) == 0
    head_dir = tmp_path / "run" / "head"
    assert (head_dir / "model.safetensors").is_file()
    config = json.loads((head_dir / "training.json").read_text())["config"]
    assert (config["ttt_steps"], config["p_weight"]) == (2, 0.5)
    # the head is usable by the engine, and running the same command again resumes (nothing to redo)
    assert main(args) == 0
    out = capsys.readouterr().out
    assert main(["generate", "w1 w2", "--model", str(tiny_model_dir), "--draft", str(head_dir),
                 "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["new_tokens"] == 6
    assert "head" in out
    # `train eval` scores a head of any target (--model) on its run's rows
    assert main(["train", "eval", str(head_dir), "--model", str(tiny_model_dir), "--run", str(tmp_path / "run"),
                 "--rows", "3"]) == 0
    table = capsys.readouterr().out
    assert "| train (3) |" in table and "| held-out (1) |" in table
    # a fine-tune from that head carries its training card, so a shipped card can list every stage
    # even after the earlier run folders are gone
    run2 = tmp_path / "run2"
    run2.mkdir()
    (run2 / "features").symlink_to(tmp_path / "run" / "features")
    # (--also-features: another run's rows join the training rows, here the same rows twice)
    assert main(["train", "head", "--out", str(run2), "--model", str(tiny_model_dir), "--init", str(head_dir),
                 "--steps", "2", "--batch-size", "2", "--checkpoint-every", "3",
                 "--also-features", str(tmp_path / "run" / "features")]) == 0
    first = json.loads((head_dir / "training.json").read_text())
    second = json.loads((run2 / "head" / "training.json").read_text())
    assert second["parent"] == first and second["initialized_from"] == str(head_dir)
    assert second["train_rows"] == 2 * first["train_rows"]
    assert second["also_features"] == {str(tmp_path / "run" / "features"): first["train_rows"]}
    # shipping the second stage over the first keeps the first's section as it was shipped
    from eaglespec.train.card import lineage

    dest = tmp_path / "shipped"
    assert main(["train", "ship", str(tmp_path / "run"), str(dest), "--feature-log", "features took 7 s"]) == 0
    assert "features took 7 s" in (dest / "README.md").read_text()
    assert main(["train", "ship", str(run2), str(dest)]) == 0
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(dest / "model.safetensors")).values() if t.is_floating_point()} == {torch.bfloat16}
    card_text = (dest / "README.md").read_text()
    assert "### Stage 1 of 2" in card_text and "### Stage 2 of 2" in card_text
    stage1 = card_text.split("### Stage 1 of 2")[1].split("### Stage 2 of 2")[0]
    assert "features took 7 s" in stage1 and "features took 7 s" not in card_text.split("### Stage 2 of 2")[1]
    shutil.rmtree(tmp_path / "run")
    assert lineage(second) == [first, second]
    # a run folder without a trained head is refused in one line
    capsys.readouterr()
    assert main(["train", "ship", str(tmp_path / "nothing"), str(tmp_path / "dest2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eaglespec: error:") and "no trained head" in err and err.count("\n") == 1
    assert not (tmp_path / "dest2").exists()


def test_train_data_regenerate_from_the_command_line(tmp_path, tiny_model_dir):
    """`train data --regenerate` runs bf16 with sdpa over left-padded batches: every row gets a real
    answer (no NaN rows, which greedy turns into id 0 throughout), and a second call resumes."""
    from eaglespec.train.data import load_jsonl

    src = write_jsonl(tmp_path / "d.jsonl", [conv(i, 3 + i % 5) for i in train_ids(6)])
    args = ["train", "data", "--out", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--source", str(src),
            "--regenerate", "--gen-tokens", "5", "--gen-batch", "3"]
    assert main(args) == 0
    rows = load_jsonl(tmp_path / "run" / "data" / "train.regen.jsonl")
    assert len(rows) == 6
    prompts = {len(r["loss_mask"]) - sum(r["loss_mask"]) for r in rows}
    assert len(prompts) > 1  # prompts of several lengths: the batches were padded
    for r in rows:
        answer = [t for t, m in zip(r["input_ids"], r["loss_mask"]) if m]
        assert 1 <= len(answer) <= 5 and any(answer)
    assert main(args) == 0
    assert len(load_jsonl(tmp_path / "run" / "data" / "train.regen.jsonl")) == 6
    report = json.loads((tmp_path / "run" / "data" / "data_report.json").read_text())
    assert report["regen_dtypes"] == [str(auto_dtype(torch.device("cpu"))).removeprefix("torch.")]  # once, not per run
    # --answer-store: the first run fills the store, a run into a new folder restores every answer
    store = tmp_path / "store"
    assert main(args + ["--answer-store", str(store)]) == 0
    assert main([a if a != str(tmp_path / "run") else str(tmp_path / "run2") for a in args]
                + ["--answer-store", str(store)]) == 0
    restored = load_jsonl(tmp_path / "run2" / "data" / "train.regen.jsonl")
    assert {r["id"]: r["input_ids"] for r in restored} == {r["id"]: r["input_ids"] for r in rows}
    assert json.loads((store / "store.json").read_text())["max_new_tokens"] == 5 and list(store.glob("answers-*.npz"))


def test_regenerate_writes_the_targets_own_answers(tmp_path, tiny_model_dir):
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.train.data import load_jsonl, regenerate

    src = write_jsonl(tmp_path / "d.jsonl", [conv(i, 5 + i % 4) for i in train_ids(5)])
    target = load_target(str(tiny_model_dir))
    prepare(target.tokenizer, tmp_path / "data", src, max_len=64, splits=("train",))
    regenerate(target, tmp_path / "data", max_new_tokens=10, batch_size=2, splits=("train",))
    rows = load_jsonl(tmp_path / "data" / "train.regen.jsonl")
    assert len(rows) == 5
    plain = Generator(target)
    for r in rows:
        first = r["loss_mask"].index(1)
        prompt, answer = r["input_ids"][:first], r["input_ids"][first:]
        assert all(r["loss_mask"][first:]) and len(answer) <= 10
        want = [t for c in plain.generate_ids(torch.tensor(prompt), GenerationConfig(max_new_tokens=10)) for t in c]
        assert answer == want  # batched, left-padded generation = the target's greedy answer
    # resumable: a second call writes nothing new
    regenerate(target, tmp_path / "data", max_new_tokens=10, batch_size=2, splits=("train",))
    assert len(load_jsonl(tmp_path / "data" / "train.regen.jsonl")) == 5
    # killed mid-write: the unfinished last line is dropped and that row written again
    path = tmp_path / "data" / "train.regen.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]) + lines[3][:20])
    regenerate(target, tmp_path / "data", max_new_tokens=10, batch_size=2, splits=("train",))
    again = load_jsonl(path)
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in rows)
    assert {r["id"]: r["input_ids"] for r in again} == {r["id"]: r["input_ids"] for r in rows}


def multi_turn_conv(i: int, turns: int) -> dict:
    def say(k: int, n: int) -> str:
        return " ".join(WORDS[7 + (i * 5 + k * 11 + j) % 89] for j in range(n))

    msgs = []
    for k in range(turns):
        msgs += [{"from": "human", "value": say(2 * k, 3 + (i + k) % 3)}, {"from": "gpt", "value": say(2 * k + 1, 4)}]
    return {"id": f"row{i}", "conversations": msgs}


def test_regenerate_later_turns_continue_the_targets_own_conversation(tmp_path, tiny_model_dir):
    """With turns=3 each row gets `{id}#t2` and `{id}#t3` rows: the target's earlier conversation, closed
    with EOS where it was cut, then the row's next user turn, then the target's greedy answer to all of
    it, which alone carries the loss. Rows with fewer turns stop early; a rerun resumes."""
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.train.data import load_jsonl, regenerate

    ids = train_ids(4)
    rows = [multi_turn_conv(i, 1 + n % 3) for n, i in enumerate(ids)]  # 1, 2, 3, 1 user turns
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    target = load_target(str(tiny_model_dir))
    tok = target.tokenizer
    prepare(tok, tmp_path / "data", src, max_len=256, splits=("train",))
    regenerate(target, tmp_path / "data", max_new_tokens=6, batch_size=3, splits=("train",), turns=3)
    out = {r["id"]: r for r in load_jsonl(tmp_path / "data" / "train.regen.jsonl")}
    assert sorted(out) == sorted([f"row{i}" for i in ids] + [f"row{ids[1]}#t2", f"row{ids[2]}#t2", f"row{ids[2]}#t3"])
    plain = Generator(target)
    for n, i in enumerate(ids):
        for t in range(2, 1 + n % 3 + 1):
            prev, row = out[f"row{i}" if t == 2 else f"row{i}#t{t - 1}"], out[f"row{i}#t{t}"]
            first = row["loss_mask"].index(1)
            ctx, answer = row["input_ids"][:first], row["input_ids"][first:]
            assert all(row["loss_mask"][first:]) and 1 <= len(answer) <= 6
            closed = prev["input_ids"] + ([] if prev["input_ids"][-1] == tok.eos_token_id else [tok.eos_token_id])
            user_turn = rows[n]["conversations"][2 * (t - 1)]["value"]
            assert ctx == closed + tok.encode(f"user : {user_turn} <eos> assistant :", add_special_tokens=False)
            want = [x for c in plain.generate_ids(torch.tensor(ctx), GenerationConfig(max_new_tokens=6)) for x in c]
            assert answer == want
    regenerate(target, tmp_path / "data", max_new_tokens=6, batch_size=3, splits=("train",), turns=3)
    assert len(load_jsonl(tmp_path / "data" / "train.regen.jsonl")) == len(out)


def test_train_data_renders_more_rows_when_asked_and_regeneration_appends(tmp_path, tiny_model_dir, caplog):
    from eaglespec.train.data import load_jsonl

    src = write_jsonl(tmp_path / "d.jsonl", [conv(i, 3 + i % 4) for i in train_ids(8)])
    base = ["train", "data", "--out", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--source", str(src),
            "--regenerate", "--gen-tokens", "4", "--gen-batch", "2"]
    data = tmp_path / "run" / "data"
    with caplog.at_level("WARNING"):
        assert main(base + ["--max-rows", "3"]) == 0
    assert "kept the first 3 training rows" in caplog.text  # the file's other rows are not silently lost
    first = load_jsonl(data / "train.regen.jsonl")
    assert len(load_jsonl(data / "train.jsonl")) == 3 and len(first) == 3
    assert main(base + ["--max-rows", "6"]) == 0
    grown = load_jsonl(data / "train.regen.jsonl")
    assert len(load_jsonl(data / "train.jsonl")) == 6 and grown[:3] == first and len(grown) == 6
    report = json.loads((data / "data_report.json").read_text())
    assert report["kept"]["train"] == 6 and not report["exhausted"]
    caplog.clear()
    assert main(base + ["--max-rows", "50"]) == 0  # the source has 8: rendered, then never again
    assert "kept the first" not in caplog.text
    assert json.loads((data / "data_report.json").read_text())["exhausted"]
    assert len(load_jsonl(data / "train.regen.jsonl")) == 8


@pytest.mark.parametrize("layers", [1, 2])
def test_unrolled_steps_equal_the_engines_cached_drafting(layers):
    """Training-time test must train the computation the engine runs: step s at anchor i equals
    committing the real pairs up to i in the cache, then drafting s steps from the head's own features."""
    import torch.nn.functional as F

    from eaglespec.draft import DraftHead, head_config_from_target

    target = tiny_target("llama")
    torch.manual_seed(1)
    head = DraftHead(head_config_from_target(target.config, num_layers=layers))
    for p in head.parameters():  # large enough that every input matters
        torch.nn.init.normal_(p, std=0.1)
    n, steps = 10, 3
    feats = torch.randn(1, n, target.hidden_size)
    ids = torch.randint(0, target.config.vocab_size, (1, n + steps))  # token t_{i+1+s} = ids[i + 1 + s]
    embed = target.embed.weight.detach()
    with torch.no_grad():
        preds = head.forward_unrolled(feats, [F.embedding(ids[:, 1 + s: 1 + s + n], embed) for s in range(steps)])
        torch.testing.assert_close(preds[0], head(feats, F.embedding(ids[:, 1:n + 1], embed), torch.arange(n)[None]))
        for i in (0, 4, n - 1):
            cache = head.new_cache(n + steps, "cpu", torch.float32)
            js = torch.arange(i + 1)
            vis = torch.ones(i + 1, i + 1, dtype=torch.bool).tril_()
            h = head(feats[:, js], F.embedding(ids[:, js + 1], embed), js[None], vis[None, None], cache, commit=True)[0, -1]
            torch.testing.assert_close(preds[0][0, i], h, rtol=1e-4, atol=1e-4)
            for s in range(1, steps):
                vis = torch.ones(1, cache.length + cache.tree_len + 1, dtype=torch.bool)
                h = head(h[None, None], F.embedding(ids[:, i + 1 + s, None], embed), torch.tensor([[i + s]]),
                         vis[None, None], cache)[0, -1]
                torch.testing.assert_close(preds[s][0, i], h, rtol=1e-4, atol=1e-4, msg=f"anchor {i} step {s}")


def test_unrolled_training_lowers_later_step_loss(tmp_path, tiny_training):
    """Trained on its own predicted features, a head predicts the feature two drafts ahead better
    than one trained on step 1 alone, by both runs' own step-3 metric on the same batches. (A random
    tiny target's token distributions are near uniform, so its agreement figures are noise-level;
    the feature loss at the unrolled steps carries the signal: lower in 8 of 8 runs over seeds and
    batch orders when this test was written.)"""
    from eaglespec.train.trainer import collate, head_loss

    parts, rows = tiny_training
    base = dict(steps=60, batch_size=4, lr=3e-3, warmup_steps=5, draft_vocab=0, eval_every=1000,
                checkpoint_every=1000, noise=0.0)
    scores = {}
    for name, ttt in (("plain", 1), ("ttt", 3)):
        train_head(parts, rows, [], tmp_path / name, TrainConfig(**base, ttt_steps=ttt))
        head = DraftHead.from_pretrained(tmp_path / name / "head")
        lm_draft = parts.lm_head[head.draft_token_ids()]
        with torch.no_grad():
            _, m = head_loss(head, parts, lm_draft, collate(rows), TrainConfig(**base, ttt_steps=3))
        scores[name] = m
    assert scores["ttt"]["vloss2"] < scores["plain"]["vloss2"] - 0.004, scores


def test_loss_scores_loss_positions_only_as_the_dense_masked_loss_does(tiny_training):
    """The loss runs the LM head on loss positions alone; it equals the dense loss that scores
    every position and masks afterwards, at every unrolled step, on padded rows with prompts."""
    import torch.nn.functional as F

    from eaglespec.train.trainer import collate, head_loss, shifted

    parts, rows = tiny_training
    rows = [{**{k: v[: 20 + 3 * i] for k, v in r.items()}} for i, r in enumerate(rows[:4])]
    for i, r in enumerate(rows):  # a prompt of 5 + i tokens carries no loss
        r["loss_mask"] = r["loss_mask"].clone()
        r["loss_mask"][: 5 + i] = 0
    torch.manual_seed(0)
    head = DraftHead(head_config_from_target(parts.config))
    lm_draft = parts.lm_head
    cfg = TrainConfig(noise=0.0, ttt_steps=3)
    batch = collate(rows)
    loss, metrics = head_loss(head, parts, lm_draft, batch, cfg)

    feats, ids = batch["features"].float(), batch["input_ids"]
    next_feat, mask = feats[:, 1:], batch["loss_mask"][:, 1:].float()
    target_p = F.linear(next_feat, lm_draft).softmax(-1)
    preds = head.forward_unrolled(feats[:, :-1], [F.embedding(shifted(ids[:, 1:], s), parts.embed) for s in range(3)])
    want = torch.zeros(())
    for s, pred in enumerate(preds):
        m = shifted(mask, s)
        vloss = (F.smooth_l1_loss(pred, shifted(next_feat, s), reduction="none").mean(-1) * m).sum() / m.sum()
        logq = F.linear(pred, lm_draft).log_softmax(-1)
        ploss = (-(shifted(target_p, s) * logq).sum(-1) * m).sum() / m.sum()
        want = want + cfg.ttt_decay**s * (vloss + cfg.p_weight * ploss)
        tag = "" if s == 0 else str(s)
        assert metrics[f"vloss{tag}"] == pytest.approx(vloss.item(), rel=1e-5)
        assert metrics[f"ploss{tag}"] == pytest.approx(ploss.item(), rel=1e-5)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0)


def test_validation_leaves_out_rows_whose_prompt_was_trained_on():
    from eaglespec.train.trainer import unseen_prompts

    def row(prompt: list[int], answer: list[int]) -> dict:
        ids = torch.tensor(prompt + answer)
        return {"input_ids": ids, "loss_mask": torch.tensor([0] * len(prompt) + [1] * len(answer))}

    train = [row([1, 5, 6], [7, 8]), row([1, 9], [3])]
    val = [row([1, 5, 6], [4, 4]),  # the same prompt, another answer: seen
           row([1, 5], [6, 7, 8]),  # a prefix of a training prompt: unseen
           row([1, 9, 3], [2])]
    assert [r["input_ids"].tolist() for r in unseen_prompts(val, train)] == [[1, 5, 6, 7, 8], [1, 9, 3, 2]]


def test_heldout_prompts_leave_out_prompts_that_open_a_training_row(tmp_path):
    ids = {s: [i for i in range(2000) if split_of(f"row{i}") == s][:2] for s in ("bench", "val", "train")}

    def row(i: int, prompt: str) -> dict:
        return {"id": f"row{i}", "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "ok"}]}

    rows = [
        row(ids["bench"][0], "a repeated prompt"),  # listed before the training row that repeats it
        row(ids["bench"][1], "a fresh bench prompt"),
        row(ids["val"][0], " a repeated prompt "),  # the same prompt up to whitespace
        row(ids["val"][1], "a fresh val prompt"),
        row(ids["train"][0], "a repeated prompt"),
        row(ids["train"][1], "a training prompt"),
    ]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    assert [t for _, t in heldout_prompts("bench", src)] == [["a fresh bench prompt"]]
    assert [i for i, _ in heldout_prompts("val", src)] == [f"row{ids['val'][1]}"]
    with pytest.raises(ValueError):
        next(heldout_prompts("train", src))


def test_grown_head_computes_what_it_grew_from_then_trains_its_new_layer(tmp_path, tiny_training):
    from eaglespec.train.trainer import grow_head

    parts, rows = tiny_training
    train_head(parts, rows, [], tmp_path / "one", TrainConfig(steps=3, batch_size=4, draft_vocab=0, eval_every=1000))
    one = DraftHead.from_pretrained(tmp_path / "one" / "head")
    two = grow_head(one, 2)
    feats, embeds = torch.randn(1, 7, one.hidden_size), torch.randn(1, 7, one.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(two(feats, embeds, torch.arange(7)[None]), one(feats, embeds, torch.arange(7)[None]))
    # training with --init and layers=2 grows the head, saves it as two layers, and moves the new layer
    train_head(parts, rows, [], tmp_path / "two", TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=1,
                                                          draft_vocab=0, eval_every=1000, layers=2),
               init_from=tmp_path / "one" / "head")
    trained = DraftHead.from_pretrained(tmp_path / "two" / "head")
    assert trained.num_layers == 2 and "layers.1.input_layernorm.weight" in trained.state_dict()
    assert trained.layers[1].mlp.down_proj.weight.abs().sum() > 0


def test_train_features_attention_choice(tmp_path, tiny_model_dir):
    """`train features` dumps with sdpa by default and with the exact attention on request: both
    record which one ran, and in bf16 they agree to rounding (the exact path is not the dump's)."""
    src = write_jsonl(tmp_path / "d.jsonl", [conv(i, 20 + i % 5) for i in train_ids(4)])
    feats = {}
    for attention in ("sdpa", "exact"):
        out = tmp_path / attention
        assert main(["train", "data", "--out", str(out), "--model", str(tiny_model_dir), "--source", str(src)]) == 0
        assert main(["train", "features", "--out", str(out), "--model", str(tiny_model_dir),
                     "--feature-dtype", "bfloat16", "--feature-attention", attention]) == 0
        meta = json.loads((out / "features" / "features.json").read_text())
        assert meta["attention"] == ("sdpa" if attention == "sdpa" else "eaglespec_fp32")
        feats[attention] = torch.cat([r["features"].float() for r in load_shards(out / "features")])
    a, b = feats["sdpa"], feats["exact"]
    assert a.shape == b.shape
    assert (a - b).abs().mean() < 0.02 * a.abs().mean()


def test_other_inputs_change_what_the_head_is_fed_not_what_it_is_scored_against(tiny_training):
    """`inputs` (features from elsewhere, e.g. more of the target's layers) replaces the head's input at committed
    positions; the targets (next feature, the target's distribution, its greedy tokens) stay."""
    from eaglespec.train.trainer import collate, head_loss, simulate_chains
    from helpers import random_head

    parts, rows = tiny_training
    head = random_head(tiny_target("llama"), seed=3)
    lm_draft = parts.lm_head[head.draft_token_ids()]
    cfg = TrainConfig(noise=0.0)
    batch = collate(rows[:4])
    with torch.no_grad():
        _, plain = head_loss(head, parts, lm_draft, batch, cfg)
        _, same = head_loss(head, parts, lm_draft, {**batch, "inputs": batch["features"].clone()}, cfg)
        _, other = head_loss(head, parts, lm_draft, {**batch, "inputs": torch.zeros_like(batch["features"])}, cfg)
    assert same == plain
    assert other["vloss"] != plain["vloss"]
    # zero inputs: the head's prediction no longer depends on the features, its targets still do
    with torch.no_grad():
        _, other2 = head_loss(head, parts, lm_draft, {**batch, "features": batch["features"] * 2,
                                                        "inputs": torch.zeros_like(batch["features"])}, cfg)
    assert other2["vloss"] != other["vloss"]

    vocab = head.draft_token_ids()
    sim = lambda rs: simulate_chains(head, parts, lm_draft, vocab, rs, stride=4)
    assert sim([{**r, "inputs": r["features"]} for r in rows]) == sim(rows)
    fed = []
    forward = head.forward
    head.forward = lambda feats, *a, **k: (fed.append(feats.clone()), forward(feats, *a, **k))[1]
    sim([{**r, "inputs": torch.full_like(r["features"], 7.0)} for r in rows[:1]])
    assert bool((fed[0] == 7.0).all())  # the first commit was fed the inputs, not the features


def test_an_answer_store_restores_a_lost_run_without_generating(tmp_path, tiny_model_dir, monkeypatch):
    """Answers kept in a store folder rebuild a lost run's regenerated rows, later turns included,
    with no generation; a run killed before its last chunk was written adds those answers next time;
    a store written with another answer budget is refused."""
    from eaglespec.train import answers
    from eaglespec.train.answers import AnswerStore, StoreMismatch, fingerprint
    from eaglespec.train.data import load_jsonl, regenerate

    monkeypatch.setattr(answers, "CHUNK_ROWS", 2)
    rows = [multi_turn_conv(i, 1 + n % 3) for n, i in enumerate(train_ids(5))]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    target = load_target(str(tiny_model_dir))
    store_dir = tmp_path / "store"
    runs = {}
    for name in ("a", "b"):
        prepare(target.tokenizer, tmp_path / name, src, max_len=256, splits=("train",))
    regenerate(target, tmp_path / "a", max_new_tokens=6, batch_size=3, splits=("train",), turns=2,
               store=AnswerStore(store_dir, fingerprint(target, 6)))
    runs["a"] = {r["id"]: r for r in load_jsonl(tmp_path / "a" / "train.regen.jsonl")}
    assert len(runs["a"]) == 5 + 3  # 3 rows have a second user turn
    chunks = sorted(store_dir.glob("answers-*.npz"))
    assert len(chunks) == 4  # chunks of 2 answers, the last one written at the end

    def no_generation(*args, **kwargs):
        raise AssertionError("the store held every answer: nothing should be generated")

    monkeypatch.setattr(target.model, "generate", no_generation)
    regenerate(target, tmp_path / "b", max_new_tokens=6, batch_size=3, splits=("train",), turns=2,
               store=AnswerStore(store_dir, fingerprint(target, 6)))
    runs["b"] = {r["id"]: r for r in load_jsonl(tmp_path / "b" / "train.regen.jsonl")}
    assert runs["b"] == runs["a"]
    # a kill lost the last chunk: the run folder still has those rows, and the next run adds them
    lost = answers.read_chunk(chunks[-1])
    chunks[-1].unlink()
    assert all(k not in AnswerStore(store_dir, fingerprint(target, 6)) for k in lost)
    regenerate(target, tmp_path / "a", max_new_tokens=6, batch_size=3, splits=("train",), turns=2,
               store=AnswerStore(store_dir, fingerprint(target, 6)))
    again = AnswerStore(store_dir, fingerprint(target, 6))
    assert all(again.answers[k] == v for k, v in lost.items()) and len(again) == 8
    assert sorted(p.name for p in store_dir.glob("answers-*.npz"))[:3] == [p.name for p in chunks[:3]]
    with pytest.raises(StoreMismatch, match="max_new_tokens"):
        AnswerStore(store_dir, fingerprint(target, 7))



def test_a_regeneration_stopped_with_ctrl_c_keeps_its_answers_in_the_store(tmp_path, tiny_model_dir, monkeypatch):
    """Chunks are written every CHUNK_ROWS answers; a run stopped between them (Ctrl-C) still writes
    what it has, so nothing it generated is missing from the store."""
    from eaglespec.train import answers, data
    from eaglespec.train.answers import AnswerStore, fingerprint
    from eaglespec.train.data import load_jsonl, regenerate

    monkeypatch.setattr(answers, "CHUNK_ROWS", 100)
    src = write_jsonl(tmp_path / "d.jsonl", [conv(i, 3 + i % 5) for i in train_ids(6)])
    target = load_target(str(tiny_model_dir))
    prepare(target.tokenizer, tmp_path / "run", src, max_len=64, splits=("train",))
    real = data._answer_continuous

    def stopped_after_some_rows(*args, on_row, **kwargs):
        def row_then_stop(k, answer):
            on_row(k, answer)
            if len(load_jsonl(tmp_path / "run" / "train.regen.jsonl")) >= 3:
                raise KeyboardInterrupt
        return real(*args, on_row=row_then_stop, **kwargs)

    monkeypatch.setattr(data, "_answer_continuous", stopped_after_some_rows)
    with pytest.raises(KeyboardInterrupt):
        regenerate(target, tmp_path / "run", max_new_tokens=5, batch_size=2, splits=("train",),
                   store=AnswerStore(tmp_path / "store", fingerprint(target, 5)))
    written = load_jsonl(tmp_path / "run" / "train.regen.jsonl")
    assert 3 <= len(written) < 6
    kept = AnswerStore(tmp_path / "store", fingerprint(target, 5))
    assert {r["id"] for r in written} == set(kept.answers)


@pytest.mark.parametrize("refill", [1, 3])
def test_continuous_batching_gives_each_row_the_targets_greedy_answer(tmp_path, tiny_model_dir, refill):
    """Rows leave the batch when they end and new prompts join the running batch, padded into its
    KV cache (to the left of shorter rows or of longer ones); each row must still get the target's
    own greedy answer to its prompt alone."""
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.train.data import _answer_continuous, load_jsonl

    target = load_target(str(tiny_model_dir))
    plain = Generator(target)
    g = torch.Generator().manual_seed(1)
    prompts = {f"p{i}": torch.randint(7, target.vocab_size, (3 + (i * 7) % 11,), generator=g).tolist()
               for i in range(13)}
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    full = {k: [t for c in plain.generate_ids(torch.tensor(p), cfg) for t in c] for k, p in prompts.items()}
    counts = Counter(t for a in full.values() for t in a[1:9])
    eos = counts.most_common(1)[0][0]  # a token that ends answers at different points
    want = {k: a[: a.index(eos) + 1] if eos in a else a for k, a in full.items()}
    assert len({len(a) for a in want.values()}) > 2
    seen = []
    prefills = _answer_continuous(target, prompts, tmp_path / "a.jsonl", max_new_tokens=12, batch_size=4, desc="t",
                                  eos_id=eos, on_row=lambda k, a: seen.append((k, a)), refill=refill)
    assert prefills > 13 // 4  # newcomers joined running batches
    rows = {r["id"]: r for r in load_jsonl(tmp_path / "a.jsonl")}
    assert sorted(rows) == sorted(prompts) and dict(seen) == want
    for k, r in rows.items():
        first = r["loss_mask"].index(1)
        assert r["input_ids"][:first] == prompts[k] and all(r["loss_mask"][first:])
        assert r["input_ids"][first:] == want[k], k


def test_train_data_killed_in_the_background_writes_its_answers_to_the_store(tmp_path, tiny_model_dir):
    """`kill PID` (SIGTERM) on a background `train data --regenerate` flushes the partial chunk, as Ctrl-C does."""
    import signal
    import subprocess
    import sys
    import time

    from eaglespec.train.answers import read_chunk
    from eaglespec.train.data import load_jsonl

    src = write_jsonl(tmp_path / "d.jsonl", [conv(i, 3 + i % 5) for i in train_ids(200)])
    run, store = tmp_path / "run", tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "eaglespec.cli", "train", "data", "--out", str(run), "--model",
                             str(tiny_model_dir), "--source", str(src), "--regenerate", "--gen-tokens", "64",
                             "--gen-batch", "2", "--answer-store", str(store)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    rows = run / "data" / "train.regen.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (rows.is_file() and rows.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    written = {r["id"] for r in load_jsonl(rows)}
    assert 3 <= len(written) < 200
    kept = {k for chunk in store.glob("answers-*.npz") for k in read_chunk(chunk)}
    assert written <= kept


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_init_head_commit_is_named_only_while_the_folder_is_as_committed(tmp_path):
    """A stage fine-tuned from the shipped head records the commit that holds that head, since the
    next stage overwrites the folder; an edited or untracked folder gets no commit."""
    import subprocess

    from eaglespec.train.card import committed_at

    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text("{}")
    assert committed_at(head) is None  # not a git work tree
    git("init", "-q")
    assert committed_at(head) is None  # untracked
    git("add", "head")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "head")
    shipped = git("rev-parse", "HEAD")
    (tmp_path / "other.txt").write_text("x")
    git("add", "other.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "later")
    assert committed_at(head) == shipped  # the commit that last changed the folder, not HEAD
    (head / "model.safetensors").write_text("new")
    assert committed_at(head) is None  # a file git does not know
    (head / "model.safetensors").unlink()
    (head / "config.json").write_text('{"a": 1}')
    assert committed_at(head) is None  # edited


def test_ship_card_counts_a_runs_own_rows_apart_from_joined_folders(tmp_path):
    """A multi-turn run joined by other runs' feature folders: the card counts the run's own rows
    per turn, and gives the all-rows totals once, with the joined folders."""
    from eaglespec.train import card as ship_head

    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.regen.jsonl",
                [{"id": i, "input_ids": [1, 2], "loss_mask": [0, 1]} for i in ("a_0", "b_0", "a_0#t2")])
    card = {"regenerated": True, "train_rows": 7, "also_features": {"runs/x/features": 4},
            "train_tokens": 70, "train_loss_tokens": 30, "data": {}, "config": {}}
    turns = ship_head.turn_counts(tmp_path, card)
    assert turns == {1: 2, 2: 1}
    data_line = ship_head.stage_lines(card, None, turns)[0]
    assert "in 3 rows: 2 to the first user turn" in data_line and "1 to turn 2" in data_line
    assert "runs/x/features (4 rows); 7 rows, 70 tokens" in data_line
    assert data_line.count("70 tokens") == 1
    # a run whose own rows are all later turns, or all first turns, counts its own rows too
    later_only = ship_head.stage_lines(card, None, {2: 3})[0]
    assert "in 3 rows: 3 to turn 2 of ShareGPT V3 conversations, whose context" in later_only
    assert "first user turn" not in later_only and later_only.count("70 tokens") == 1
    first_only = ship_head.stage_lines(card, None, {1: 3})[0]
    assert "to the first user turn of 3 ShareGPT V3 conversations" in first_only and first_only.count("70 tokens") == 1
    # rows rendered from a file of prompts say so
    card["data"] = {"source": "runs/synth/prompts.jsonl"}
    from_file = ship_head.stage_lines(card, None, {1: 3})[0]
    assert "to the first user turn of 3 conversations of `prompts.jsonl`" in from_file and "ShareGPT" not in from_file


def prose(i: int, marker: str = "") -> str:
    """An English-looking passage of about 400 characters, different for each i."""
    words = ["river", "stone", "market", "garden", "window", "letter", "bridge", "winter", "signal", "harbor",
             "lantern", "meadow", "copper", "season", "travel", "pocket", "silver", "forest", "planet", "basket"]
    return " ".join([marker] * bool(marker) + [f"entry{i}"] + [words[(i * 3 + j * 7) % len(words)] for j in range(60)]) + "."


def test_make_prompts_writes_fresh_prompts_that_train_data_answers(tmp_path, tiny_model_dir, capsys):
    """`train prompts`: passages come only from ShareGPT's training split, the same seed writes the
    same rows, ids follow the prompt, math problems have the answers they claim, and `train data
    --regenerate` answers every row, replacing the placeholder."""
    import random
    import re

    from eaglespec.train import prompts as mp
    from eaglespec.train.data import load_jsonl

    rows = []
    for i in range(400):
        rid = f"p{i}"
        held_out = split_of(rid) != "train"
        ask = f"please tell me about thing {i}" + (" HELDOUT" if held_out else "")
        rows.append({"id": rid, "conversations": [{"from": "human", "value": ask},
                                                  {"from": "gpt", "value": prose(i, "HELDOUT" if held_out else "")}]})
    src = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    counts = {"extraction": 30, "math": 60, "stem": 20, "humanities": 20,
              "reasoning": 40, "classify": 20, "writing": 20, "explain": 20}
    built = mp.build(random.Random(0), counts, str(src))
    assert built == mp.build(random.Random(0), counts, str(src))
    assert built != mp.build(random.Random(1), counts, str(src))
    kinds = Counter(r["kind"] for r in built)
    assert kinds["extraction"] == 30 and kinds["math"] > 40 and kinds["stem"] > 10 and kinds["humanities"] > 10
    assert kinds["reasoning"] > 30 and kinds["classify"] > 15 and kinds["writing"] > 15 and kinds["explain"] > 10
    # kinds added later leave an older set's file as it was: zero of them rebuilds it exactly
    first = {k: counts[k] for k in ("extraction", "math", "stem", "humanities")}
    assert mp.build(random.Random(0), first, str(src)) == mp.build(
        random.Random(0), {**first, "reasoning": 0, "classify": 0, "writing": 0, "explain": 0}, str(src))
    assert len({r["id"] for r in built}) == len(built)
    for r in built:
        prompt = r["conversations"][0]["value"]
        assert "HELDOUT" not in prompt and "{" not in prompt.replace('{"', "")  # templates fully filled
        assert r["id"].endswith(hashlib_digest(prompt)) and r["id"].startswith(f"synth-{r['kind']}-")
    # a sample of generated problems, solved: they have the answers their numbers promise
    rng = random.Random(3)
    templates = {f.__name__: f for f in mp._math_templates()}
    for _ in range(50):
        m = re.fullmatch(r"Solve for x: (\d+)x ([+-]) (\d+) = (-?\d+)\. Show each step\.", templates["linear"](rng))
        a, sign, b, rhs = int(m[1]), m[2], int(m[3]), int(m[4])
        assert (rhs - (b if sign == "+" else -b)) % a == 0  # an integer solution
        m = re.search(r"is (\d+) years older .* In (\d+) years the sum of their ages will be (\d+)\.", templates["ages"](rng))
        diff, k, total = int(m[1]), int(m[2]), int(m[3])
        assert (total - 2 * k - diff) % 2 == 0 and total - 2 * k - diff > 0  # the younger one's age is a whole number
    # classification prompts list short user turns (of the training split only: HELDOUT above)
    listed = [r for r in built if r["kind"] == "classify" and "\n1. please tell me about thing " in r["conversations"][0]["value"]]
    assert len(listed) >= 5
    # ordering puzzles state a chain without a contradiction, and walks end a whole number of km away
    for _ in range(50):
        m = re.fullmatch(r"(.*) (Who is the \w+\?|Rank them from first to last\.) Explain your reasoning\.",
                         mp._reasoning_templates()[0](rng))
        pairs = re.findall(r"(\w+) is \w+ than (\w+)\.", m[1])
        names = {a for a, _ in pairs} | {b for _, b in pairs}
        assert len(pairs) == len(names) - 1 and len({a for a, _ in pairs}) == len(pairs)  # one chain
        m = re.search(r"walks (\d+) km north, then turns right and walks (\d+) km", mp._reasoning_templates()[6](rng))
        assert (int(m[1]) ** 2 + int(m[2]) ** 2) ** 0.5 % 1 == 0
    # --exclude leaves out the prompts of an earlier file
    earlier = write_jsonl(tmp_path / "earlier.jsonl", built[:10])
    again = tmp_path / "again.jsonl"
    flags = [a for k, n in counts.items() for a in (f"--{k}", str(n))]
    assert main(["train", "prompts", "--out", str(again), "--source", str(src), "--exclude", str(earlier), *flags]) == 0
    assert "left out 10 prompts" in capsys.readouterr().out
    again_ids = {r["id"] for r in load_jsonl(again)}
    assert again_ids == {r["id"] for r in built[10:]}
    # without --exclude the file holds every built row, shuffled by seed + 1: the same bytes each time
    whole = tmp_path / "whole.jsonl"
    assert main(["train", "prompts", "--out", str(whole), "--source", str(src), *flags]) == 0
    shuffled = list(built)
    random.Random(1).shuffle(shuffled)
    assert whole.read_text() == "".join(json.dumps(r) + "\n" for r in shuffled)
    assert main(["train", "prompts", "--out", str(again), "--source", str(src), "--exclude", str(tmp_path / "no.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    # the file runs through train data --regenerate: every row answered, no placeholder left
    out = tmp_path / "prompts.jsonl"
    write_jsonl(out, built[:6])
    assert main(["train", "data", "--out", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--source", str(out),
                 "--regenerate", "--gen-tokens", "4", "--gen-batch", "3", "--threads", "1"]) == 0
    kept = load_jsonl(tmp_path / "run" / "data" / "train.jsonl")
    regen = load_jsonl(tmp_path / "run" / "data" / "train.regen.jsonl")
    assert kept and {r["id"] for r in regen} == {r["id"] for r in kept}
    for r in regen:
        assert 1 <= sum(r["loss_mask"]) <= 4
    report = json.loads((tmp_path / "run" / "data" / "data_report.json").read_text())
    assert report["source"] == str(out)
    # the report counts the target's answers, not the placeholders they replaced
    written = report["regenerated"]["train"]
    assert written == {"rows": len(regen), "tokens": sum(len(r["input_ids"]) for r in regen),
                       "loss_tokens": sum(sum(r["loss_mask"]) for r in regen)}
    assert written["loss_tokens"] < report["loss_tokens"]  # a placeholder is longer than 4 tokens
    # the folder's rows came from that file: asking it for the package's rows is refused, not mixed in
    capsys.readouterr()
    assert main(["train", "data", "--out", str(tmp_path / "run"), "--model", str(tiny_model_dir), "--regenerate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eaglespec: error: data:") and "prompts.jsonl" in err and err.count("\n") == 1


def hashlib_digest(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:12]


@pytest.mark.parametrize("flags", [["--max-rows", "0"], ["--max-rows", "-1"], ["--skip-rows", "-2"]])
def test_data_refuses_row_counts_below_range_before_rendering(tmp_path, capsys, flags):
    assert main(["train", "data", "--out", str(tmp_path / "run"), *flags]) == 2
    assert "--max-rows must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run" / "data").exists()
