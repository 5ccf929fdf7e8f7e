"""Re-encode a GGUF file's weight matrices as F32, F16 or BF16, keeping everything else.

Where a verified row costs little (set-up's llama.cpp verifies a few F32, F16 or BF16 rows for
not much more than one, docs/design.md), a GGUF in one of those formats runs speculation faster
than the 4-bit file it came from. This writes one from any GGUF that llama.cpp and gguf-py read:
each matrix is dequantized (gguf-py's reference code) and stored in `outtype`; vectors (norms,
biases) stay F32, as llama.cpp's converter leaves them; the metadata (tokenizer, chat template,
hyperparameters) is copied, with `general.file_type` set to the new format.

The weights stay the values the source file holds: re-encoding a Q4_1 file as F32 gives its
dequantized weights exactly (F16 and BF16 round them once more), not the original checkpoint's.

    python -m eaglespec.gguf_reencode SmolLM2-135M-Instruct.Q4_1.gguf SmolLM2-135M-Instruct.F32.gguf --outtype f32
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

#: output format -> (tensor type, `general.file_type`)
OUTTYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}


class ReencodeError(ValueError):
    """The source cannot be re-encoded as asked."""


def reencode_gguf(src: str | os.PathLike, dst: str | os.PathLike, outtype: str = "f32", progress: bool = True) -> Path:
    """Write `src`'s model to `dst` with its matrices in `outtype` (f32, f16 or bf16); returns dst.
    The file appears whole or not at all (written beside it, then renamed)."""
    if outtype not in OUTTYPES:
        raise ReencodeError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ReencodeError(f"{dst} would overwrite its own source")
    qtype, file_type = OUTTYPES[outtype]
    reader = gguf.GGUFReader(src)
    arch = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise ReencodeError(f"{src} names no {gguf.Keys.General.ARCHITECTURE}")
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch.contents())
    try:
        copy_metadata(reader, writer, file_type)
        bar = tqdm(reader.tensors, desc=f"re-encoding as {outtype.upper()}", unit="tensor", disable=not progress)
        for tensor in bar:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [..., ne0] float32
            name = tensor.name
            if values.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, np.ascontiguousarray(values, dtype=np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, values.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
    """Every key of `reader` but those the writer sets itself, with `general.file_type` replaced."""
    written_here = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE)
    for field in reader.fields.values():
        if field.name in written_here or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(int(file_type))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eaglespec.gguf_reencode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a GGUF file")
    parser.add_argument("dst", help="the GGUF file to write")
    parser.add_argument("--outtype", choices=sorted(OUTTYPES), default="f32")
    args = parser.parse_args(argv)
    try:
        out = reencode_gguf(args.src, args.dst, args.outtype)
    except (ReencodeError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
