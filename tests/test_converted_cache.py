"""The cache of converted GGUF targets: a folder per file contents, not per path, so that a new
virtual environment's copy of the default model finds the folder already written; and folders
that no file on the machine converts to any more are deleted before a conversion writes another."""

import json
import os

import pytest

from eaglespec import paths
from eaglespec.paths import (CONVERTED_MARKER, converted_dir, converted_root, find_converted, parts_dir,
                             prune_converted)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLESPEC_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def hashed(monkeypatch):
    """The files `file_sha256` read, in order."""
    seen = []
    stock = paths.file_sha256

    def counting(path):
        seen.append(path)
        return stock(path)

    monkeypatch.setattr(paths, "file_sha256", counting)
    return seen


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def fake_conversion(folder):
    """A finished converted folder, as `write_converted` leaves it (its marker and weights file)."""
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / CONVERTED_MARKER).write_text(json.dumps({"layout": paths.CONVERTED_LAYOUT, "source": "x.gguf"}))
    return folder


def test_the_same_file_at_two_paths_shares_one_folder(tmp_path, hashed):
    a = write(tmp_path / "venv1" / "model.gguf", b"GGUF" + bytes(range(200)) * 50)
    b = write(tmp_path / "venv2" / "model.gguf", a.read_bytes())
    other = write(tmp_path / "venv3" / "model.gguf", a.read_bytes()[:-1] + b"!")
    assert converted_dir(a) == converted_dir(b)
    assert converted_dir(other) != converted_dir(a)
    assert converted_dir(a).parent == converted_root()
    fake_conversion(converted_dir(a))
    assert find_converted(b) == converted_dir(a)


def test_a_file_is_read_once_until_it_changes(tmp_path, hashed):
    a = write(tmp_path / "model.gguf", b"GGUF one")
    first = converted_dir(a)
    for _ in range(3):
        assert converted_dir(a) == first
    assert len(hashed) == 1
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, the same bytes: read again, same folder
    assert converted_dir(a) == first
    a.write_bytes(b"GGUF two")  # rewritten: another folder
    assert converted_dir(a) != first
    assert len(hashed) == 3


def test_pruning_keeps_live_conversions_and_deletes_stale_ones(tmp_path):
    live = write(tmp_path / "live.gguf", b"GGUF live")
    gone = write(tmp_path / "old-venv" / "model.gguf", b"GGUF gone")
    changed = write(tmp_path / "changed.gguf", b"GGUF before")
    new = write(tmp_path / "new.gguf", b"GGUF new")
    kept = fake_conversion(converted_dir(live))
    kept_parts = fake_conversion(parts_dir(live))  # what the llama.cpp backend extracts (gguf_parts)
    stale = fake_conversion(converted_dir(gone))
    stale_parts = fake_conversion(parts_dir(gone))
    outdated = fake_conversion(converted_dir(changed))
    older_key = fake_conversion(converted_root() / "SmolLM2-135M-Instruct.Q4_1-0123456789abcdef")
    users = converted_root() / "not-ours"  # no marker: not something convert_gguf wrote
    users.mkdir()
    writing = converted_root() / ".convert-abc"
    writing.mkdir()
    (writing / CONVERTED_MARKER).write_text("{}")
    gone.unlink()
    changed.write_bytes(b"GGUF after")

    removed = prune_converted(keep=converted_dir(new))

    assert sorted(removed) == sorted([stale, stale_parts, outdated, older_key])
    for folder in removed:
        assert not folder.exists()
    for folder in (kept, kept_parts, users, writing):
        assert folder.is_dir()


def test_conversion_prunes_before_it_writes(tmp_path, monkeypatch):
    """A conversion frees the room of stale folders before it writes its own."""
    from transformers import AutoModelForCausalLM

    from eaglespec.target import convert_gguf

    gone = write(tmp_path / "old-venv" / "model.gguf", b"GGUF gone")
    stale = fake_conversion(converted_dir(gone))
    gone.unlink()

    def stop(*args, **kwargs):
        assert not stale.exists(), "the stale folder was still there when the conversion began"
        raise RuntimeError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        convert_gguf(write(tmp_path / "model.gguf", b"GGUF new"))
