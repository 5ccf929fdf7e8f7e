import json

import pytest
from helpers import random_head

from eaglespec.cli import main
from eaglespec.target import load_target


@pytest.fixture(scope="module")
def bench_files(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    random_head(load_target(str(tiny_model_dir))).save_pretrained(d / "head")
    q = d / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": ["writing", "math"][i % 2],
                                     "turns": [f"w{i} w{i + 1} w{i + 2}", "w9 w8"]}) + "\n" for i in range(4)))
    return d


def test_quick_bench_on_a_tiny_model(tiny_model_dir, bench_files, capsys):
    out = bench_files / "out"
    code = main(["bench", "--model", str(tiny_model_dir), "--draft", str(bench_files / "head"),
                 "--questions", str(bench_files / "q.jsonl"), "--max-new-tokens", "12", "--limit", "1",
                 "--dtype", "float32", "--total-tokens", "6", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    methods = {r["method"] for r in runs}
    assert methods == {"plain", "eagle-static", "eagle-dynamic", "eagle-lookup", "prompt-lookup", "weighed-lookup",
                       "hf-generate", "hf-prompt-lookup"}
    # 2 questions (one per category) x 2 turns x 8 methods
    assert len(runs) == 2 * 2 * 8
    assert {r["turn"] for r in runs} == {0, 1}
    # greedy fp32: every method reproduces plain decoding exactly
    assert all(r["equal_to_baseline"] for r in runs)
    assert res["summary"]["overall"]["plain"]["speedup"] == 1.0
    assert res["summary"]["overall"]["hf-generate"]["tau"] == 1.0
    # nodes verified per step: the root alone for plain decoding, unknown for transformers' generate()
    summary = res["summary"]["overall"]
    assert summary["plain"]["tree_nodes"] == 1.0 and summary["hf-generate"]["tree_nodes"] is None
    tree = [r for r in runs if r["method"] == "eagle-dynamic"]
    assert all(len(r["tree_sizes"]) == r["target_forwards"] - 1 for r in tree)  # one per step after the prefill
    assert summary["eagle-dynamic"]["tree_nodes"] == 6.0  # a fixed size: the random head's guesses pay nowhere
    # time to the first token: the engine's methods say it, transformers' generate() does not
    for r in runs:
        if r["method"].startswith("hf-"):
            assert r["first_token_s"] is None
        else:
            assert 0 < r["first_token_s"] < r["seconds"]
    assert summary["hf-generate"]["first_token_s"] is None and summary["hf-generate"]["decode_tokens_per_s"] is None
    plain = [r for r in runs if r["method"] == "plain" and r["new_tokens"] > 1]
    after = sum(r["new_tokens"] - 1 for r in plain) / sum(r["seconds"] - r["first_token_s"] for r in plain)
    assert summary["plain"]["decode_tokens_per_s"] == pytest.approx(after, rel=1e-3)
    md = (out / "results.md").read_text()
    assert "| overall | eagle-dynamic |" in md and "| math |" in md and "| first token (s) |" in md
    for png in ("speedup.png", "accept_lengths.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_a_sampled_bench_checks_each_answer_against_plain_sampling(tiny_model_dir, bench_files):
    """With a seed, every eaglespec method samples plain decoding's text, and the bench says so."""
    out = bench_files / "sampled"
    code = main(["bench", "--model", str(tiny_model_dir), "--draft", str(bench_files / "head"),
                 "--questions", str(bench_files / "q.jsonl"), "--max-new-tokens", "12", "--limit", "1",
                 "--dtype", "float32", "--temperature", "1.0", "--methods", "plain,eagle-dynamic,eagle-lookup",
                 "--out", str(out)])
    assert code == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 2 * 2 * 3 and all(r["equal_to_baseline"] is True for r in runs)


@pytest.mark.parametrize("extra, words", [
    (["--methods", "plain,warp-drive"], "unknown methods"),
    (["--categories", "poetry"], "unknown categories"),
    (["--questions", "/nonexistent.jsonl"], "not found"),
])
def test_bad_bench_input_keeps_results(tiny_model_dir, bench_files, capsys, extra, words):
    out = bench_files / "kept"
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text("{\"old\": true}")
    args = ["bench", "--model", str(tiny_model_dir), "--questions", str(bench_files / "q.jsonl"),
            "--methods", "plain", "--out", str(out), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("eaglespec: error:") and words in err and err.count("\n") == 1
    assert json.loads((out / "results.json").read_text()) == {"old": True}


def test_malformed_questions_file(tiny_model_dir, bench_files, capsys):
    bad = bench_files / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["ok"]}\n{"question_id": 2, "turns": []}\n')
    assert main(["bench", "--model", str(tiny_model_dir), "--questions", str(bad), "--methods", "plain"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err


def test_mismatched_head_is_refused(tiny_model_dir, bench_files, capsys):
    from helpers import tiny_target

    random_head(tiny_target(hidden=32)).save_pretrained(bench_files / "small_head")
    code = main(["bench", "--model", str(tiny_model_dir), "--draft", str(bench_files / "small_head"),
                 "--questions", str(bench_files / "q.jsonl"), "--methods", "eagle-dynamic"])
    assert code == 2 and "does not fit" in capsys.readouterr().err


def test_compare_draft_runs_other_heads_in_the_same_loop(tiny_model_dir, bench_files, capsys):
    random_head(load_target(str(tiny_model_dir)), seed=5).save_pretrained(bench_files / "alt" / "head")
    out = bench_files / "cmp"
    code = main(["bench", "--model", str(tiny_model_dir), "--draft", str(bench_files / "head"),
                 "--compare-draft", str(bench_files / "alt" / "head"), "--methods", "plain,eagle-dynamic",
                 "--questions", str(bench_files / "q.jsonl"), "--max-new-tokens", "12", "--limit", "1",
                 "--dtype", "float32", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["runs"][:3]] == ["plain", "eagle-dynamic", "eagle-dynamic@alt"]  # interleaved
    assert all(r["equal_to_baseline"] for r in res["runs"])
    assert set(res["summary"]["overall"]) == {"plain", "eagle-dynamic", "eagle-dynamic@alt"}
    (pair,) = res["head_pairs"]
    assert (pair["method"], pair["compared"], pair["turns"]) == ("eagle-dynamic", "eagle-dynamic@alt", 4)
    assert "Heads side by side" in (out / "results.md").read_text()
    capsys.readouterr()
    assert main(["bench", "--model", str(tiny_model_dir), "--draft", str(bench_files / "head"),
                 "--compare-draft", str(bench_files / "nope"),
                 "--questions", str(bench_files / "q.jsonl"), "--methods", "plain,eagle-dynamic"]) == 2
    assert "nope: not found" in capsys.readouterr().err


def test_several_draft_weights_run_side_by_side(tiny_model_dir, bench_files, capsys):
    out = bench_files / "weights"
    base = ["bench", "--model", str(tiny_model_dir), "--draft", str(bench_files / "head"),
            "--questions", str(bench_files / "q.jsonl"), "--max-new-tokens", "12", "--limit", "1", "--turns", "1",
            "--dtype", "float32", "--out", str(out)]
    assert main(base + ["--methods", "plain,eagle-dynamic", "--draft-weights", "full", "int8"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]["overall"]) == {"plain", "eagle-dynamic", "eagle-dynamic@int8"}
    assert all(r["equal_to_baseline"] for r in res["runs"])  # int8 drafts propose otherwise, accept the same
    (pair,) = res["head_pairs"]
    assert (pair["method"], pair["compared"]) == ("eagle-dynamic", "eagle-dynamic@int8")
    capsys.readouterr()
    assert main(base + ["--methods", "plain", "--draft-weights", "full", "int8"]) == 2
    assert "need an eagle method" in capsys.readouterr().err
    assert main(base + ["--methods", "plain,eagle-dynamic", "--draft-weights", "int8", "int8"]) == 2
    assert "names a layout twice" in capsys.readouterr().err


def test_method_order_rotates_and_speedup_pairs_the_same_turns(tiny_model_dir, bench_files):
    out = bench_files / "rot"
    base = ["bench", "--model", str(tiny_model_dir), "--draft", str(bench_files / "head"),
            "--methods", "plain,eagle-dynamic,prompt-lookup", "--questions", str(bench_files / "q.jsonl"),
            "--turns", "1", "--max-new-tokens", "8", "--dtype", "float32", "--out", str(out)]
    assert main(base) == 0
    res = json.loads((out / "results.json").read_text())
    order = [r["method"] for r in res["runs"]]
    # 4 questions, 3 methods: question i starts with method i mod 3
    assert order[:3] == ["plain", "eagle-dynamic", "prompt-lookup"]
    assert order[3:6] == ["eagle-dynamic", "prompt-lookup", "plain"]
    assert order[6:9] == ["prompt-lookup", "plain", "eagle-dynamic"]
    # the equality check waits for the baseline even when plain ran last
    assert all(r["equal_to_baseline"] for r in res["runs"])
    for m, s in res["summary"]["overall"].items():
        mine = [r for r in res["runs"] if r["method"] == m]
        plain = [r for r in res["runs"] if r["method"] == "plain"]
        tps = lambda rs: sum(r["new_tokens"] for r in rs) / sum(r["seconds"] for r in rs)
        # the summary rounds to 3 decimals; the seconds of each run to 5
        assert s["tokens_per_s"] == pytest.approx(tps(mine), rel=1e-3, abs=5e-4)
        assert s["speedup"] == pytest.approx(tps(mine) / tps(plain), rel=1e-3, abs=5e-4)
    assert main(base + ["--fixed-order"]) == 0
    fixed = [r["method"] for r in json.loads((out / "results.json").read_text())["runs"]]
    assert fixed == ["plain", "eagle-dynamic", "prompt-lookup"] * 4


def test_head_pairs_pairs_turns_of_the_same_question():
    from eaglespec.bench.run import head_pairs

    def rec(method, q, turn, tau):
        return {"method": method, "question_id": q, "turn": turn, "tau": tau}

    records = [rec("plain", "1", 0, 1.0), rec("eagle-dynamic", "1", 0, 3.0), rec("eagle-dynamic@old", "1", 0, 2.5),
               rec("eagle-dynamic", "1", 1, 2.0), rec("eagle-dynamic@old", "1", 1, 2.5),
               rec("eagle-dynamic", "2", 0, 4.0), rec("eagle-dynamic@old", "2", 0, 3.0),
               rec("eagle-dynamic@old", "3", 0, 9.0)]  # no --draft run on this turn: left out
    (p,) = head_pairs(records)
    assert (p["method"], p["compared"], p["turns"], p["ahead"], p["behind"]) == ("eagle-dynamic", "eagle-dynamic@old", 3, 2, 1)
    assert p["tau_diff"] == pytest.approx((0.5 - 0.5 + 1.0) / 3, abs=1e-4)
    # differences 0.5, -0.5, 1.0: sample sd 0.7638, s.e. 0.441
    assert p["std_err"] == pytest.approx(0.441, abs=1e-3)
    assert head_pairs([rec("plain", "1", 0, 1.0)]) == []


def test_trees_sweep_shapes_side_by_side(tiny_model_dir, bench_files):
    """--trees runs each shape as one more method in the interleaved loop; in fp32 every shape,
    with or without a lookup chain or floor, reproduces plain decoding."""
    out = bench_files / "trees"
    shapes = ["2,3,4", "3,4,8,4", "3,4,8,0,0.2", "static:cpu_small"]
    assert main(["bench", "--model", str(tiny_model_dir), "--draft", str(bench_files / "head"), "--trees", *shapes,
                 "--questions", str(bench_files / "q.jsonl"), "--limit", "1", "--turns", "1", "--max-new-tokens", "10",
                 "--dtype", "float32", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in res["runs"][:5]] == ["plain"] + [f"tree:{s}" for s in shapes]
    assert all(r["equal_to_baseline"] for r in res["runs"])
    # nodes verified per step stay within each shape's size (root included; the chain adds its 4)
    overall = res["summary"]["overall"]
    assert overall["tree:2,3,4"]["tree_nodes"] <= 4 and overall["tree:3,4,8,4"]["tree_nodes"] <= 12


def test_trees_alone_take_the_default_sweep():
    from eaglespec.bench.methods import SWEEP_TREES
    from eaglespec.bench.run import parse_tree

    trees = [parse_tree(s) for s in SWEEP_TREES]
    assert [t.kind for t, _ in trees[:2]] == ["static", "static"]
    assert (trees[-1][0].top_k, trees[-1][0].depth, trees[-1][0].total_tokens) == (10, 6, 60)
    tree, lookup = parse_tree("3,6,12,8,0.05")
    assert (tree.top_k, tree.depth, tree.total_tokens, tree.min_prob, lookup) == (3, 6, 12, 0.05, 8)
    assert tree.sizing == "fixed" and [t.sizing for t, _ in trees].count("cost") == 1
    auto, lookup = parse_tree("4,8,auto,2")
    assert (auto.top_k, auto.depth, auto.total_tokens, auto.sizing, lookup) == (4, 8, 64, "cost", 2)


def test_profile_times_the_phases_of_a_step(tiny_model_dir, bench_files, capsys):
    code = main(["bench", "profile", "--model", str(tiny_model_dir), "--draft", str(bench_files / "head"),
                 "--questions", str(bench_files / "q.jsonl"), "--limit", "1", "--max-new-tokens", "8",
                 "--dtype", "float32", "--draft-weights", "full", "int8", "--forward-scan", "16"])
    assert code == 0
    out = capsys.readouterr().out
    assert "2 prompts, 8 new tokens, float32" in out
    rows = {line.split(" | ")[0].strip("| ") for line in out.splitlines() if line.startswith("| ")}
    assert {"full", "int8", "ms", "x one token"} <= rows
    assert main(["bench", "profile", "--model", str(tiny_model_dir), "--dtype", "float32", "--prefill-scan", "8", "16"]) == 0
    assert "| 16 |" in capsys.readouterr().out
    # the default model ships a head; another model needs --draft
    assert main(["bench", "profile", "--model", str(tiny_model_dir), "--questions", str(bench_files / "q.jsonl")]) == 2
    assert "pass --draft" in capsys.readouterr().err


def test_a_base_model_without_a_chat_template_is_benched_on_the_raw_turns(tiny_model_dir, bench_files, tmp_path, caplog):
    """A base model's tokenizer has no chat template: the bench says so once and prompts with the
    conversation's text instead of failing on the template."""
    import shutil

    base = tmp_path / "base_model"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code = main(["bench", "--model", str(base), "--draft", str(bench_files / "head"), "--questions",
                 str(bench_files / "q.jsonl"), "--max-new-tokens", "8", "--limit", "1", "--methods",
                 "plain,eagle-dynamic", "--dtype", "float32", "--out", str(out)])
    assert code == 0
    assert "no chat template" in caplog.text
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 2 * 2 * 2 and all(r["equal_to_baseline"] for r in runs)


def test_the_tools_prompts_spread_over_the_question_file(tmp_path):
    from eaglespec.bench.run import TOOL_PROMPTS, spread_prompts

    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": f"c{i // 10}", "turns": [f"first {i}", "second"]})
                         + "\n" for i in range(80)))
    assert spread_prompts(q, 8) == [f"first {i}" for i in range(0, 80, 10)]  # one per category
    assert spread_prompts(q, 8, spread=2) == [f"first {i}" for i in range(0, 40, 5)]
    assert spread_prompts(q, 200) == [f"first {i}" for i in range(80)]
    assert spread_prompts(None, 2) == list(TOOL_PROMPTS[:2])
