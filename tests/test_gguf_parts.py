"""The parts folder the llama.cpp backend reads of a GGUF (eaglespec.gguf_parts): the tokenizer,
configs and embedding a conversion would write, without dequantizing every weight."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from eaglespec import gguf_parts
from eaglespec.gguf_parts import extract_parts, read_embeddings, write_parts
from eaglespec.paths import PARTS_FILE, TargetLoadError, find_parts, parts_dir


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLESPEC_CACHE", str(tmp_path / "cache"))


def tiny_gguf(path, tensors: dict[str, np.ndarray]):
    """A GGUF holding `tensors` (numpy [rows, cols], stored as they are) and no metadata to speak of."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_an_lm_head_of_its_own_is_read_beside_the_embedding(tmp_path):
    rng = np.random.default_rng(0)
    embed = rng.standard_normal((40, 8)).astype(np.float16)
    head = rng.standard_normal((40, 8)).astype(np.float32)
    path = tiny_gguf(tmp_path / "m.gguf", {"token_embd.weight": embed, "output.weight": head,
                                           "blk.0.ffn_up.weight": np.ones((8, 8), np.float32)})
    got = read_embeddings(path)
    assert sorted(got) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert got["model.embed_tokens.weight"].dtype == torch.float32
    assert torch.equal(got["model.embed_tokens.weight"], torch.from_numpy(embed.astype(np.float32)))
    assert torch.equal(got["lm_head.weight"], torch.from_numpy(head))


def test_a_file_without_an_embedding_is_refused(tmp_path):
    path = tiny_gguf(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": np.ones((8, 8), np.float32)})
    with pytest.raises(TargetLoadError, match="token_embd.weight"):
        read_embeddings(path)


def test_parts_are_extracted_once_and_found_by_contents(tmp_path, monkeypatch):
    calls = []

    def fake_write(src, folder):
        calls.append(src)
        (folder / PARTS_FILE).write_bytes(b"weights")

    monkeypatch.setattr(gguf_parts, "write_parts", fake_write)
    a = tmp_path / "venv1" / "m.gguf"
    a.parent.mkdir()
    a.write_bytes(b"GGUF some bytes")
    folder = extract_parts(a)
    assert folder == parts_dir(a) and find_parts(a) == folder
    b = tmp_path / "venv2" / "m.gguf"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    assert extract_parts(b) == folder  # the same bytes elsewhere: no second extraction
    assert calls == [a]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".parts-")]  # no temporary left


@pytest.mark.slow
def test_parts_hold_what_a_conversion_writes(tmp_path):
    """The same configs, tokenizer files and embedding as the default model's converted folder,
    and no other weight."""
    from eaglespec.target import convert_gguf, default_gguf_path

    src = default_gguf_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("EAGLESPEC_CACHE")  # the suite's shared conversion of the default model
        converted = convert_gguf(src)
    parts = tmp_path / "parts"
    parts.mkdir()
    write_parts(src, parts)
    names = {p.name for p in parts.iterdir()}
    assert names == {p.name for p in converted.iterdir()} - {"model.safetensors"} | {PARTS_FILE}
    for name in names - {PARTS_FILE, "eaglespec-converted.json"}:
        if name == "config.json":  # a conversion names the model class, its dtype and where the file was
            a, b = (json.loads((f / name).read_text()) for f in (converted, parts))
            assert "_name_or_path" not in b  # parts are shared by every copy of the file
            for key in ("architectures", "dtype", "torch_dtype", "_name_or_path"):
                a.pop(key, None), b.pop(key, None)
            assert a == b
        else:
            assert (converted / name).read_bytes() == (parts / name).read_bytes(), name
    full = load_file(str(converted / "model.safetensors"))
    embed = load_file(str(parts / PARTS_FILE))
    assert list(embed) == ["model.embed_tokens.weight"]  # tied: no LM head of its own
    assert torch.equal(embed["model.embed_tokens.weight"], full["model.embed_tokens.weight"])
