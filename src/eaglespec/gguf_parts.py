"""What the llama.cpp backend reads of a GGUF file besides llama.cpp's own weights: the tokenizer,
the config and generation config, and the token embedding and LM head that a draft head uses as
torch modules. They are extracted once per file, keyed by its contents, into a small folder
(`eaglespec.paths.parts_dir`): the embedding alone is dequantized, where a converted folder
(`eaglespec.target.convert_gguf`, what the PyTorch backend runs) holds every weight in fp32 (517
MB for the default model, against 113 MB here).

The tokenizer and configs are the ones a conversion writes (the same transformers calls on the same
file), and the embedding the same dequantized values (gguf-py's `dequantize`, which transformers'
GGUF loader calls too; tests/test_gguf_parts.py compares both folders).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from eaglespec.paths import (CONVERTED_MARKER, PARTS_FILE, PARTS_LAYOUT, TargetLoadError, find_parts, parts_dir,
                             write_folder)

log = logging.getLogger(__name__)

#: GGUF tensor names (llama.cpp's) -> the names a converted folder gives them
EMBEDDING = ("token_embd.weight", "model.embed_tokens.weight")
LM_HEAD = ("output.weight", "lm_head.weight")


def extract_parts(gguf: Path) -> Path:
    """The GGUF's parts folder: found in the cache, else written there once. Most of that is
    parsing the file's metadata, its vocabulary included, once each for the config, the tokenizer
    and gguf-py's reader (`tools/startup_time.py --first-start` times a first start)."""
    found = find_parts(gguf)
    if found is not None:
        return found
    out = parts_dir(gguf)
    log.warning("reading the tokenizer, config and embedding of %s into %s (once)", gguf.name, out)
    return write_folder(out, lambda tmp: write_parts(gguf, tmp), prefix=".parts-")


def write_parts(gguf: Path, folder: Path) -> None:
    """Write `gguf`'s config.json, generation_config.json, tokenizer files, PARTS_FILE and
    CONVERTED_MARKER into `folder`."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from eaglespec.target import save_tokenizer

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    d = config.to_dict()
    d.pop("quantization_config", None)
    d.pop("_name_or_path", None)  # the folder the file was read from: the parts serve any copy of it
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    GenerationConfig.from_model_config(config).save_pretrained(folder)  # what from_pretrained gives a GGUF model
    save_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name), folder)
    save_file(read_embeddings(gguf), str(folder / PARTS_FILE), metadata={"format": "pt"})
    (folder / CONVERTED_MARKER).write_text(json.dumps({"layout": PARTS_LAYOUT, "source": gguf.name, "parts": True}))


def read_embeddings(gguf: Path) -> dict[str, torch.Tensor]:
    """The token embedding [V, H] and, where the file has its own, the LM head [V, H], dequantized
    to float32 under a converted folder's names. A model without an LM head of its own (tied, as
    SmolLM2) reuses the embedding."""
    from gguf import GGUFReader, dequantize

    wanted = dict((EMBEDDING, LM_HEAD))
    found = {}
    for t in GGUFReader(gguf).tensors:
        if t.name in wanted:
            w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a copy: not the file's mapping
            found[wanted[t.name]] = torch.from_numpy(w)
    if EMBEDDING[1] not in found:
        raise TargetLoadError(f"{gguf}: no {EMBEDDING[0]} tensor (not a language model's GGUF?)")
    return found
