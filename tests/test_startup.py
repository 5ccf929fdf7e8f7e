"""Work that `eaglespec generate` skips: a converted folder loads the short way
(`target.load_converted`, not `from_pretrained`) and its tokenizer without parsing tokenizer.json
in Python, each building what the long way builds; and the process ends without the
interpreter's teardown once the answer is out."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import WORDS, save_tiny_model, tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from eaglespec.attention import default_implementation
from eaglespec.target import (CONVERTED_MARKER, TargetLoadError, load_converted, load_model, save_tokenizer,
                              write_converted)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{tied: folder}: a tiny Llama with a word-level tokenizer, written as `convert_gguf` writes,
    with and without tied embeddings (SmolLM2's are tied)."""
    tokenizer = AutoTokenizer.from_pretrained(save_tiny_model(tmp_path_factory.mktemp("plain")))
    folders = {}
    for tied in (False, True):
        config = tiny_config("llama", vocab=len(WORDS))
        config.tie_word_embeddings = tied
        torch.manual_seed(int(tied))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():  # values that a bf16 cast rounds
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        model.generation_config.eos_token_id = 1
        folder = tmp_path_factory.mktemp(f"converted-tied{int(tied)}")
        write_converted(model, tokenizer, folder, source="tiny.gguf")
        folders[tied] = folder
    return folders


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_load_builds_what_from_pretrained_builds(converted, tied, dtype):
    folder = converted[tied]
    attn = default_implementation(dtype)
    want = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=attn)
    got = load_converted(folder, dtype, attn)
    assert type(got) is type(want) and not got.training
    want_params = dict(want.named_parameters(remove_duplicate=False))
    got_params = dict(got.named_parameters(remove_duplicate=False))
    assert got_params.keys() == want_params.keys()
    for name, p in want_params.items():
        assert got_params[name].dtype == p.dtype and torch.equal(got_params[name], p), name
    for (name, b), (name2, b2) in zip(want.named_buffers(), got.named_buffers(), strict=True):
        assert name == name2 and b.dtype == b2.dtype and torch.equal(b, b2), name  # RoPE's inv_freq
    tied_got = got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    assert tied_got == tied == (want.lm_head.weight.data_ptr() == want.model.embed_tokens.weight.data_ptr())
    assert got.config.to_dict() == want.config.to_dict()
    assert got.generation_config.to_dict() == want.generation_config.to_dict()
    assert got.name_or_path == str(folder)  # the probe cache finds the weights file through it
    ids = torch.tensor([[2, 3, 6, 9, 12, 40, 41]])
    with torch.inference_mode():
        assert torch.equal(got(ids).logits, want(ids).logits)


def test_load_model_takes_the_short_path_for_a_converted_folder(converted, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained called for a converted folder")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    model, tokenizer = load_model(str(converted[True]), dtype="float32")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    (converted[True].parent / "unmarked").mkdir(exist_ok=True)
    for f in converted[True].iterdir():  # the same files without the marker: a user's folder
        if f.name != CONVERTED_MARKER:
            (converted[True].parent / "unmarked" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(AssertionError, match="from_pretrained called"):
        load_model(str(converted[True].parent / "unmarked"), dtype="float32")


def test_short_load_refuses_a_folder_missing_a_weight(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    for f in converted[False].iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.0.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TargetLoadError, match="up_proj"):
        load_converted(tmp_path, torch.float32, "sdpa")


def spy_json_loads(monkeypatch) -> list[str]:
    """The names of the files that json.load parses from now on."""
    parsed: list[str] = []
    real = json.load

    def load(fp, *args, **kwargs):
        parsed.append(getattr(fp, "name", "?"))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(json, "load", load)
    return parsed


def test_converted_tokenizer_skips_parsing_tokenizer_json_and_is_the_same(tiny_model_dir, tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.save_pretrained(tmp_path / "plain")
    save_tokenizer(tokenizer, tmp_path / "ours")
    parsed = spy_json_loads(monkeypatch)
    plain = AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert any(name.endswith("tokenizer.json") for name in parsed)  # what transformers does on its own
    parsed.clear()
    ours = AutoTokenizer.from_pretrained(tmp_path / "ours")
    assert not any(name.endswith("tokenizer.json") for name in parsed), parsed
    assert type(ours) is type(plain)
    assert repr(ours.added_tokens_decoder) == repr(plain.added_tokens_decoder) and ours.added_tokens_decoder
    assert ours.all_special_tokens == plain.all_special_tokens and ours.all_special_ids == plain.all_special_ids
    text = "<bos> user : w1 w2 <eos> w3 nonsense <unk>"
    assert ours(text).input_ids == plain(text).input_ids
    assert ours.decode(ours(text).input_ids) == plain.decode(plain(text).input_ids)
    messages = [{"role": "user", "content": "w5 w6"}]
    want = plain.apply_chat_template(messages, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == want


def test_generate_ends_without_the_interpreters_teardown(tiny_model_dir, capsys):
    """Run as the program, `generate` writes its whole answer into a pipe and ends at once: the
    atexit handlers (the teardown) do not run. Called with arguments, `main` returns as before."""
    from eaglespec.cli import main

    argv = ["generate", "w1 w2", "--model", str(tiny_model_dir), "--max-new-tokens", "6", "--json"]
    code = ("import atexit, sys; atexit.register(lambda: print('teardown', file=sys.stderr)); "
            "from eaglespec.cli import main; sys.exit(main())")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "teardown" not in r.stderr
    got = json.loads(r.stdout)
    assert main(argv) == 0
    want = json.loads(capsys.readouterr().out)
    assert got["text"] == want["text"] and got["new_tokens"] == want["new_tokens"] == 6
    bad = subprocess.run([sys.executable, "-c", code, *argv, "--top-p", "2"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "top_p" in bad.stderr and "teardown" not in bad.stderr


def test_llamacpp_backend_builds_the_tokenizer_autotokenizer_builds(converted, tmp_path):
    """The llama.cpp backend builds a converted folder's tokenizers-backed tokenizer by its class,
    without AutoTokenizer's detour through the model config; any other class goes through
    AutoTokenizer."""
    from eaglespec.backends.llamacpp import _tokenizer

    folder = converted[True]
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    want, got = AutoTokenizer.from_pretrained(folder), _tokenizer(folder)
    assert type(got) is type(want)
    assert got.all_special_tokens == want.all_special_tokens and got.eos_token_id == want.eos_token_id
    text = "<bos> user : w1 w2 <eos> w3 nonsense <unk>"
    assert got(text).input_ids == want(text).input_ids and got.decode(got(text).input_ids) == want.decode(want(text).input_ids)
    messages = [{"role": "user", "content": "w5 w6"}]
    assert got.apply_chat_template(messages, add_generation_prompt=True) == \
        want.apply_chat_template(messages, add_generation_prompt=True)
    other = tmp_path / "other"
    other.mkdir()
    for f in folder.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    assert type(_tokenizer(other)) is type(AutoTokenizer.from_pretrained(other))
