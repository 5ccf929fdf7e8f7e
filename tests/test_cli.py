import json
import subprocess
import sys

import pytest
import torch
from helpers import random_head

from eaglespec.cli import main
from eaglespec.target import load_target


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_plain_and_speculative_agree(capsys, tiny_model_dir, tmp_path):
    base = ["generate", "w1 w2 w3 w4", "--model", str(tiny_model_dir), "--max-new-tokens", "24", "--json"]
    code, out, _ = cli(capsys, *base, "--no-draft")
    assert code == 0
    plain = json.loads(out)
    assert set(plain) == {"text", "new_tokens", "target_forwards", "mean_accept_len", "mean_tree_size",
                          "tokens_per_s", "elapsed_s", "first_token_s"}
    assert plain["mean_accept_len"] == 1.0 and plain["target_forwards"] == plain["new_tokens"]
    assert 0 < plain["first_token_s"] <= plain["elapsed_s"]
    assert plain["mean_tree_size"] == 1.0  # the root alone at every step

    random_head(load_target(str(tiny_model_dir))).save_pretrained(tmp_path / "head")
    for tree in ("static", "dynamic"):
        code, out, _ = cli(capsys, *base, "--draft", str(tmp_path / "head"), "--tree", tree)
        assert code == 0
        spec = json.loads(out)
        assert spec["text"] == plain["text"]


def test_generate_streams_text(capsys, tiny_model_dir):
    code, out, err = cli(capsys, "generate", "w5 w6", "--model", str(tiny_model_dir), "--max-new-tokens", "8",
                         "--temperature", "0.8", "--top-p", "0.9", "--seed", "3")
    assert code == 0
    assert out.strip() and all(w.startswith("w") for w in out.split())
    assert "tok/s" in err and "nodes verified per step" in err


def test_messages_file(capsys, tiny_model_dir, tmp_path):
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "w1 w2"}]))
    code, out, _ = cli(capsys, "generate", "--messages", str(msgs), "--model", str(tiny_model_dir),
                       "--max-new-tokens", "5", "--json")
    assert code == 0 and json.loads(out)["new_tokens"] == 5


@pytest.mark.parametrize("extra, words", [
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--top-p", "1.5"], "top_p"),
    (["--draft", "/nonexistent/head"], "no draft head"),
    (["--max-len", "20", "--max-new-tokens", "15"], "exceeds the cache"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, tiny_model_dir, extra, words):
    code, out, err = cli(capsys, "generate", "w1 w2 w3", "--model", str(tiny_model_dir), *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("eaglespec: error:") and words in err
    assert "Traceback" not in err


def test_empty_prompt(capsys, tiny_model_dir):
    code, _, err = cli(capsys, "generate", "  ", "--model", str(tiny_model_dir))
    assert code == 2 and "empty" in err


def test_mismatched_head(capsys, tiny_model_dir, tmp_path):
    from helpers import tiny_target

    random_head(tiny_target(hidden=32)).save_pretrained(tmp_path / "small")
    code, _, err = cli(capsys, "generate", "w1", "--model", str(tiny_model_dir), "--draft", str(tmp_path / "small"))
    assert code == 2 and "[32, 64]" in err and "[64, 128]" in err


def test_missing_model(capsys, tmp_path):
    code, _, err = cli(capsys, "generate", "hi", "--model", str(tmp_path / "nothing"))
    assert code == 2 and "config.json" in err


def test_real_process_exit_code(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "eaglespec.cli", "generate", "w1", "--model", str(tiny_model_dir),
                        "--top-p", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "top_p" in r.stderr


@pytest.mark.parametrize("dtype, extra, want", [
    # on a CPU every dtype gets a tree sized each step by the measured cost of a node, up to 64
    ("float32", [], (4, 8, 64, 0.0, "cost")),
    ("bfloat16", [], (4, 8, 64, 0.0, "cost")),
    ("float32", ["--total-tokens", "6", "--top-k-draft", "2", "--min-draft-prob", "0.1"], (2, 8, 6, 0.1, "fixed")),
    ("float32", ["--tree-sizing", "fixed"], (4, 8, 16, 0.0, "fixed")),
    ("float32", ["--tree-sizing", "cost", "--total-tokens", "20"], (4, 8, 20, 0.0, "cost")),
])
def test_the_default_tree_is_sized_by_measured_cost_on_cpus(tiny_model_dir, tmp_path, monkeypatch, dtype, extra, want):
    from eaglespec.cli import build_parser
    from eaglespec.cli.common import load_engine

    monkeypatch.setenv("EAGLESPEC_CACHE", str(tmp_path / "cache"))
    random_head(load_target(str(tiny_model_dir))).save_pretrained(tmp_path / "head")
    args = build_parser().parse_args(["generate", "w1", "--model", str(tiny_model_dir), "--dtype", dtype,
                                      "--draft", str(tmp_path / "head"), "--lookup", "0", *extra])
    drafter = load_engine(args).drafter
    tree = drafter.tree_config
    assert (tree.top_k, tree.depth, tree.total_tokens, tree.min_prob, tree.sizing) == want
    assert (drafter.sizer is not None) == (tree.sizing == "cost")
    if drafter.sizer is not None:  # measured on the tiny target, up to the bound
        assert drafter.sizer.max_nodes == tree.total_tokens - 1 and drafter.sizer.curve.sizes[0] == 1


@pytest.mark.parametrize("flags, want", [
    ("fpu avx2 fma sse4_2", False),  # Zen 3 EPYC: bf16 emulated
    ("avx2 avx512f avx512bw avx512_bf16 avx512_vnni", True),  # Zen 4 EPYC
    ("avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", True),  # Sapphire Rapids Xeon
    ("avx512f avx512_vnni xamx_bf16_like", False),  # a flag that only contains the name does not count
])
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it(monkeypatch, flags, want):
    import eaglespec.backends.cpu.flags as flags_mod
    from eaglespec.backends import auto_dtype

    assert flags_mod.native_bf16(f"processor : 0\nflags\t\t: {flags}\n") == want
    monkeypatch.setattr(flags_mod.Path, "read_text", lambda self, *a, **k: f"flags\t\t: {flags}\n")
    assert auto_dtype(torch.device("cpu")) == (torch.bfloat16 if want else torch.float32)


def test_gpus_keep_the_fixed_tree():
    from eaglespec.backends import default_tree

    gpu = default_tree(torch.device("cuda"), torch.bfloat16)
    assert (gpu.min_prob, gpu.depth, gpu.total_tokens, gpu.sizing) == (0.0, 5, 16, "fixed")
    assert default_tree(torch.device("cpu"), torch.float16).sizing == "cost"


HEAVY = ("torch", "transformers", "safetensors", "gguf", "matplotlib", "numpy")
CLI_MODULES = ("eaglespec.cli", "eaglespec.cli.common", "eaglespec.cli.generate", "eaglespec.cli.bench",
               "eaglespec.cli.train", "eaglespec.cli.serve")


def test_help_imports_nothing_heavy():
    """`eaglespec --help` and every subcommand's help answer without torch or transformers: the
    parsers are built, every help text formatted, in a fresh interpreter."""
    code = f"""
import argparse, sys
import eaglespec.cli
def walk(p):
    p.format_help()
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                walk(sub)
walk(eaglespec.cli.build_parser())
print(" ".join(m for m in {HEAVY!r} if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ""


@pytest.mark.parametrize("module", CLI_MODULES)
def test_each_cli_module_imports_alone(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_cli_import_graph_has_no_cycle():
    """Subcommand modules import only `common` of the cli package; `common` imports none of it, and
    nothing outside the package imports it."""
    import ast
    from pathlib import Path

    import eaglespec

    root = Path(eaglespec.__file__).parent
    for path in root.rglob("*.py"):
        name = ".".join(("eaglespec", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        imported = set()  # modules, including those of `from PACKAGE import MODULE`
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names if node.module == "eaglespec.cli"}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        cli = {m for m in imported if m == "eaglespec.cli" or m.startswith("eaglespec.cli.")}
        if name in ("eaglespec.cli", "eaglespec.cli.__main__"):
            continue  # the entry point imports the subcommands
        if name == "eaglespec.cli.common" or not name.startswith("eaglespec.cli"):
            assert not cli, f"{name} imports {cli}"
        else:
            assert cli <= {"eaglespec.cli.common"}, f"{name} imports {cli}"


def test_lookup_means_the_same_in_every_subcommand(tiny_model_dir, tmp_path):
    """--lookup N grafts an N-token lookup chain into the tree, 8 by default, 0 = the tree alone,
    in generate and bench alike."""
    from eaglespec.cli import build_parser
    from eaglespec.cli.bench import chosen_methods
    from eaglespec.cli.common import load_engine
    from eaglespec.drafter import EagleDrafter
    from eaglespec.lookup import HybridDrafter

    parser = build_parser()
    assert parser.parse_args(["generate", "hi"]).lookup == parser.parse_args(["bench"]).lookup == 8
    random_head(load_target(str(tiny_model_dir))).save_pretrained(tmp_path / "head")
    base = ["generate", "w1", "--model", str(tiny_model_dir), "--draft", str(tmp_path / "head")]
    engine = load_engine(parser.parse_args(base))
    assert isinstance(engine.drafter, HybridDrafter) and engine.drafter.lookup.num_tokens == 8
    assert type(load_engine(parser.parse_args(base + ["--lookup", "0"])).drafter) is EagleDrafter
    assert {"eagle-lookup", "weighed-lookup"} <= set(chosen_methods(parser.parse_args(["bench"])))
    assert not {"eagle-lookup", "weighed-lookup"} & set(chosen_methods(parser.parse_args(["bench", "--lookup", "0"])))
    assert chosen_methods(parser.parse_args(["bench", "--trees"])) == ["plain"]


@pytest.mark.parametrize("argv, words", [
    (["generate", "w1", "--lookup", "-1"], "--lookup must be >= 0"),
    (["generate", "w1", "--threads", "0"], "--threads must be >= 1"),
    (["generate", "w1", "--max-len", "8"], "--max-len must be >= 16"),
    (["bench", "--methods", "plain,eagle-lookup", "--lookup", "0"], "needs --lookup >= 1"),
    (["bench", "--methods", "plain,weighed-lookup", "--lookup", "0"], "weighed-lookup drafts with the --lookup chain"),
    (["bench", "--trees", "4,5"], "--trees 4,5"),
    (["bench", "--trees", "4,x,16"], "--trees 4,x,16"),
    (["bench", "--trees", "4,5,1"], "total_tokens >= 2"),
    (["train", "prompts", "--out", "x.jsonl", "--math", "-1"], "--math must be >= 0"),
])
def test_bad_flags_fail_before_anything_loads(capsys, tiny_model_dir, argv, words):
    code, _, err = cli(capsys, *argv, *(["--model", str(tiny_model_dir)] if argv[0] != "train" else []))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("eaglespec: error:") and words in err


@pytest.mark.parametrize("device, built, gpus, words", [
    ("cuda", False, 0, "CPU build"),
    ("cuda", True, 0, "no CUDA GPU is visible"),
    ("cuda:2", True, 1, "only 1 CUDA GPU"),
    ("banana", False, 0, "unknown device"),
])
def test_a_device_this_torch_cannot_use_is_one_clear_line(capsys, monkeypatch, tiny_model_dir, device, built, gpus,
                                                          words):
    """Before anything loads: not a traceback from deep inside the model's .to()."""
    monkeypatch.setattr(torch.version, "cuda", "12.4" if built else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    code, out, err = cli(capsys, "generate", "hi", "--model", str(tiny_model_dir), "--device", device)
    assert code == 2 and out == ""
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
