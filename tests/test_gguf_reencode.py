"""GGUF files re-encoded as F32, F16 and BF16 (eaglespec.gguf_reencode), and lossless speculation
over them through llama.cpp: set-up's patch multiplies those formats with kernels of its own
(F32 rows that ride on the weight stream, F16 and BF16 with ggml's one-row arithmetic), so a
tree's rows must still round as plain decoding's. Each file is the shipped Q4_1 model, re-encoded."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from eaglespec.gguf_reencode import ReencodeError, main, reencode_gguf

needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                    reason="llama-cpp-python is not installed (pip install 'eaglespec[llamacpp]')")


def default_gguf() -> Path:
    from eaglespec.target import TargetLoadError, default_gguf_path

    try:
        return default_gguf_path()
    except TargetLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def reencoded(tmp_path_factory):
    """outtype -> the default model re-encoded so (written once per module). The backend extracts
    each new file's tokenizer and embedding into its cache (eaglespec.gguf_parts), so the cache is
    the module's own here, and files and cache are deleted afterwards: runs of the suite must not
    fill the user's disk."""
    folder, made = tmp_path_factory.mktemp("reencoded"), {}

    def get(outtype: str) -> Path:
        if outtype not in made:
            made[outtype] = reencode_gguf(default_gguf(), folder / f"model.{outtype}.gguf", outtype, progress=False)
        return made[outtype]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EAGLESPEC_CACHE", str(folder / "cache"))
        yield get
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_reencoding_keeps_the_metadata_and_the_values_it_can(reencoded):
    src = gguf.GGUFReader(default_gguf())
    out = gguf.GGUFReader(reencoded("f16"))
    skip = {"general.file_type", "GGUF.kv_count"}
    assert {k for k in src.fields if k not in skip} == {k for k in out.fields if k not in skip}
    for key in ("tokenizer.chat_template", "llama.context_length", "tokenizer.ggml.tokens"):
        assert src.fields[key].contents() == out.fields[key].contents(), key
    assert out.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_F16)
    assert [t.name for t in src.tensors] == [t.name for t in out.tensors]
    for a, b in zip(src.tensors, out.tensors):
        want = gguf.quants.dequantize(a.data, a.tensor_type)
        got = gguf.quants.dequantize(b.data, b.tensor_type)
        if want.ndim < 2:  # norms stay float32, bit for bit
            assert b.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), a.name
        else:  # matrices: the source's values, rounded once to float16
            assert b.tensor_type == gguf.GGMLQuantizationType.F16, a.name
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), a.name


def test_bad_requests_are_refused_before_anything_is_written(tmp_path, capsys):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"")
    with pytest.raises(ReencodeError, match="outtype"):
        reencode_gguf(src, tmp_path / "out.gguf", "q4_0")
    with pytest.raises(ReencodeError, match="overwrite"):
        reencode_gguf(src, src, "f32")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing.gguf"), str(tmp_path / "out.gguf")])
    assert e.value.code == 2 and "missing.gguf" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no partial file left behind


def llama_target(path: Path):
    from eaglespec.backends.llamacpp import LlamaCppTarget, LlamaCppTargetConfig

    return LlamaCppTarget(path, LlamaCppTargetConfig(max_len=1024, max_tree=32, threads=2))


@needs_llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
def test_greedy_speculation_over_reencoded_weights_equals_plain_decoding(reencoded, outtype):
    """Trees of up to 12 nodes plus the lookup chain: rows in decodes of many sizes go through the
    patch's F32, F16 or BF16 kernels, and every answer is plain decoding's, token for token."""
    from test_llamacpp_backend import check_greedy_equals_plain

    from eaglespec.paths import parts_dir

    target = llama_target(reencoded(outtype))
    try:
        assert target.folder == parts_dir(target.gguf)  # its parts, not a dequantized copy of every weight
        if (Path(sys.prefix) / ".eaglespec-llamacpp").exists():
            assert target.min_rows == 1  # set-up's build rounds a lone row as it rounds in a tree
        check_greedy_equals_plain(target, ["Explain what a hash table is, in three sentences.",
                                           "List five fruits, one per line, then repeat the list in reverse order."],
                                  max_new_tokens=48)
    finally:
        target.close()


@needs_llamacpp
@pytest.mark.slow
def test_sampling_over_f16_weights_follows_the_backends_distribution(reencoded):
    from test_llamacpp_backend import check_sampling_follows_the_backend

    target = llama_target(reencoded("f16"))
    try:
        check_sampling_follows_the_backend(target)
    finally:
        target.close()
