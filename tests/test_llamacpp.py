import argparse
import json
import stat
import sys
from pathlib import Path

import pytest
import torch
from fake_llama_server import FakeServer

from eaglespec.bench import llamacpp
from eaglespec.bench.llamacpp import LlamaCppConfig, LlamaServer
from eaglespec.bench.run import BenchError
from eaglespec.cli import main
from eaglespec.generate import GenerationConfig, Generator
from eaglespec.target import load_target

FAKE = Path(__file__).parent / "fake_llama_server.py"


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    q = tmp_path_factory.mktemp("llamacpp") / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "category": "writing", "turns": [f"w{i} w{i + 1}", "w9 w8"]})
                         + "\n" for i in range(2)))
    return q


@pytest.fixture
def fake_bin(tmp_path):
    """A folder holding an executable `llama-server` that is the fake one."""
    exe = tmp_path / "bin" / "llama-server"
    exe.parent.mkdir()
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe.parent


def greedy_answerer(model_dir):
    """Answers as our own plain greedy decoding of the tiny model does."""
    gen = Generator(load_target(str(model_dir), dtype="float32"))

    def answer(prompt: list[int], n_predict: int) -> list[int]:
        cfg = GenerationConfig(max_new_tokens=n_predict)
        return [t for chunk in gen.generate_ids(torch.tensor(prompt), cfg) for t in chunk]
    return answer


def test_server_command_line(tmp_path):
    cfg = LlamaCppConfig(gguf=tmp_path / "m.gguf", binary=tmp_path / "llama-server", threads=3, ctx=512,
                         eagle3_head=tmp_path / "head.gguf", extra_args=("--spec-draft-n-max", "6"))
    plain = llamacpp.server_args("llamacpp", cfg, 8123)
    assert plain[:2] == ["-m", str(tmp_path / "m.gguf")]
    joined = " ".join(plain)
    assert "--host 127.0.0.1 --port 8123" in joined and "-t 3 -tb 3" in joined and "-c 512" in joined
    assert "--spec-type" not in plain and plain[-2:] == ["--spec-draft-n-max", "6"]
    assert "--spec-type ngram-simple" in " ".join(llamacpp.server_args("llamacpp-ngram", cfg, 1))
    eagle = " ".join(llamacpp.server_args("llamacpp-eagle3", cfg, 1))
    assert f"-md {tmp_path / 'head.gguf'}" in eagle and "--spec-type draft-eagle3" in eagle
    with pytest.raises(BenchError, match="EAGLE-3 head"):
        llamacpp.server_args("llamacpp-eagle3", LlamaCppConfig(gguf=None, binary=None, threads=1, ctx=64), 1)


def test_eagle3_without_a_head_fails_before_loading(tiny_model_dir, questions, fake_bin, tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    code = main(["bench", "--model", str(tiny_model_dir), "--methods", "plain,llamacpp-eagle3", "--questions",
                 str(questions), "--llamacpp-bin", str(fake_bin), "--llamacpp-gguf", str(gguf),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "needs an EAGLE-3 head converted to GGUF" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, words", [
    (["--llamacpp-bin", "/nonexistent"], "no llama-server in /nonexistent"),
    (["--llamacpp-url", "warp=http://x"], "not a llama.cpp method"),
    (["--llamacpp-url", "localhost:8080"], "needs an http:// address"),
])
def test_bad_llamacpp_flags(tiny_model_dir, questions, tmp_path, capsys, argv, words):
    code = main(["bench", "--model", str(tiny_model_dir), "--methods", "plain,llamacpp", "--questions",
                 str(questions), "--out", str(tmp_path / "out"), *argv])
    assert code == 2 and words in capsys.readouterr().err


def test_a_transformers_folder_needs_a_gguf(tiny_model_dir, fake_bin):
    args = argparse.Namespace(llamacpp_url=[], llamacpp_bin=str(fake_bin), llamacpp_gguf=None, model=str(tiny_model_dir),
                              llamacpp_eagle3_head=None, llamacpp_args="", max_len=256)
    with pytest.raises(BenchError, match="--llamacpp-gguf"):
        llamacpp.config_from_args(args, ["llamacpp"], threads=1)


def test_bench_against_a_fake_server(tiny_model_dir, questions, tmp_path):
    """The same prompt ids go to the server; its answer is compared with plain decoding, and its
    timings, not the HTTP round trip, make its seconds."""
    out = tmp_path / "out"
    with FakeServer(greedy_answerer(tiny_model_dir)) as same, FakeServer(speculative=True) as other:
        code = main(["bench", "--model", str(tiny_model_dir), "--methods", "plain,llamacpp,llamacpp-ngram",
                     "--questions", str(questions), "--max-new-tokens", "8", "--dtype", "float32",
                     "--llamacpp-url", f"llamacpp={same.url}", "--llamacpp-url", f"llamacpp-ngram={other.url}",
                     "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    assert len(runs) == 2 * 2 * 3  # questions x turns x methods
    same_runs = [r for r in runs if r["method"] == "llamacpp"]
    assert all(r["equal_to_baseline"] for r in same_runs)
    assert all(r["tau"] == 1.0 for r in same_runs)
    other_runs = [r for r in runs if r["method"] == "llamacpp-ngram"]
    assert not any(r["equal_to_baseline"] for r in other_runs)
    for r in other_runs:  # the fake answers 8 tokens, drafts 16 and accepts 4 of them
        assert r["new_tokens"] == 8 and r["seconds"] == pytest.approx((2.0 + 4.0 * 8) / 1000)
        assert r["extra"]["draft_n"] == 16 and r["extra"]["draft_n_accepted"] == 4
        assert r["target_forwards"] == 8 - 4 and r["extra"]["server_decode_tok_s"] == 250.0
        assert r["first_token_s"] == pytest.approx(2.0 / 1000)  # the prompt's time: the first token's
    # the prompt and the rest apart: 2 ms to the first token, then 7 tokens in 32 ms
    other = res["summary"]["overall"]["llamacpp-ngram"]
    assert other["first_token_s"] == pytest.approx(0.002, abs=1e-3)
    assert other["decode_tokens_per_s"] == pytest.approx(7 / 0.032, rel=1e-3)
    # every request: our chat-templated prompt ids, fresh prefill, greedy, the same budget
    tok = load_target(str(tiny_model_dir), dtype="float32").tokenizer
    first = tok.apply_chat_template([{"role": "user", "content": "w0 w1"}], add_generation_prompt=True, tokenize=True)
    first = first["input_ids"] if isinstance(first, dict) or hasattr(first, "input_ids") else first
    bodies = [b for b in same.requests if b["n_predict"] == 8]
    assert bodies[0]["prompt"] == list(first)
    assert all(b["cache_prompt"] is False and b["temperature"] == 0.0 and b["return_tokens"] for b in bodies)
    md = (out / "results.md").read_text()
    assert "| llamacpp | 4 |" in md and "| 4/4 |" in md and "| 16/64 (25%) |" in md


def test_started_servers_are_stopped(fake_bin, tmp_path, monkeypatch):
    started = []
    real_start = LlamaServer.start.__func__

    def start(cls, *a, **kw):
        started.append(real_start(cls, *a, **kw))
        return started[-1]
    monkeypatch.setattr(LlamaServer, "start", classmethod(start))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = LlamaCppConfig(gguf=gguf, binary=llamacpp.find_server(fake_bin), threads=1, ctx=64, startup_timeout_s=60)
    with llamacpp.llamacpp_runners(["llamacpp", "llamacpp-ngram"], cfg) as runners:
        ans = runners["llamacpp-ngram"](torch.tensor([3, 4, 5]), GenerationConfig(max_new_tokens=6))
        assert ans.tokens == [5, 6, 7, 8, 9, 10] and ans.extra["draft_n"] == 12
        assert "draft_n" not in runners["llamacpp"](torch.tensor([3]), GenerationConfig(max_new_tokens=2)).extra
    assert len(started) == 2 and all(s.process.poll() is not None for s in started)
    assert "--spec-type ngram-simple" in " ".join(started[1].process.args)

    started.clear()
    with pytest.raises(KeyboardInterrupt):
        with llamacpp.llamacpp_runners(["llamacpp"], cfg):
            raise KeyboardInterrupt
    assert len(started) == 1 and started[0].process.poll() is not None


def test_a_server_that_dies_is_reported(tmp_path):
    exe = tmp_path / "llama-server"
    exe.write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    cfg = LlamaCppConfig(gguf=tmp_path / "m.gguf", binary=exe, threads=1, ctx=64)
    with pytest.raises(BenchError, match="exited with status 1.*failed to load model"):
        with llamacpp.llamacpp_runners(["llamacpp"], cfg):
            pass


def test_find_server(fake_bin, tmp_path, monkeypatch):
    assert llamacpp.find_server(fake_bin) == fake_bin / "llama-server"
    assert llamacpp.find_server(fake_bin.parent) == fake_bin / "llama-server"  # DIR/bin, as an install prefix has
    build = tmp_path / "tree" / "build" / "bin"
    build.mkdir(parents=True)
    (build / "llama-server").symlink_to(fake_bin / "llama-server")
    assert llamacpp.find_server(tmp_path / "tree") == build / "llama-server"
    monkeypatch.setenv("LLAMACPP_BIN", str(fake_bin))
    assert llamacpp.find_server() == fake_bin / "llama-server"
    assert llamacpp.find_server(tmp_path / "empty") is None  # an explicit folder wins over the environment


@pytest.mark.slow
@pytest.mark.skipif(llamacpp.find_server() is None, reason="no llama-server in $LLAMACPP_BIN or on PATH")
def test_real_llama_server_on_one_question(tmp_path):
    torch.set_num_threads(2)
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["Write a haiku about the sea."]}) + "\n")
    out = tmp_path / "out"
    code = main(["bench", "--methods", "plain,llamacpp,llamacpp-ngram", "--questions", str(q), "--max-new-tokens", "32",
                 "--warmup", "0", "--out", str(out)])
    assert code == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    by = {r["method"]: r for r in runs}
    assert set(by) == {"plain", "llamacpp", "llamacpp-ngram"}
    for m in ("llamacpp", "llamacpp-ngram"):
        assert by[m]["new_tokens"] > 0 and by[m]["tokens_per_s"] > 0 and by[m]["extra"]["server_decode_tok_s"] > 0
        assert isinstance(by[m]["equal_to_baseline"], bool)  # reported, not required
    # llama.cpp's own plain and n-gram decoding are both greedy on the same weights: the same text
    assert by["llamacpp"]["text"] == by["llamacpp-ngram"]["text"]
