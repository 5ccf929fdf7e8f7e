"""The target's hidden states at a few layers, fused into EAGLE-3's input feature.

EAGLE-3 feeds its head the concatenation of three of the target's hidden states instead of the
last one: the *inputs* of decoder layers 2, L//2 and L-3 (official `modeling_llama_kv.py` keeps
`hidden_states` when `idx in (2, L//2, L-3)` before running layer idx; for SmolLM2's 30 layers
that is 2, 15, 27). transformers' `output_hidden_states=True` gives the same tensors as
`hidden_states[i]` (the embedding output is index 0), but keeps all L+1 of them; the forward
pre-hooks here keep only the three, and work with any call of the decoder (a prefill, a tree
forward, a tree run in blocks, a batched training forward) without touching the model.

    with capture_aux(target.decoder, aux_layer_ids(L)) as aux:
        target.decoder(...)            # one or more calls; their tokens are concatenated
    fused = aux.fused()               # [B, T, 3H] (in the model's dtype)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn


def aux_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's default layers, as the index of the decoder layer whose input is taken:
    (2, L//2, L-3); 30 layers -> (2, 15, 27)."""
    if num_layers < 6:
        raise ValueError(f"EAGLE-3's default feature layers need a target of >= 6 layers, got {num_layers}")
    return 2, num_layers // 2, num_layers - 3


class AuxCapture:
    """What `capture_aux` collects: per layer, the inputs seen in each decoder call."""

    def __init__(self, layer_ids: Sequence[int]) -> None:
        self.layer_ids = tuple(layer_ids)
        self.parts: dict[int, list[torch.Tensor]] = {i: [] for i in self.layer_ids}  # a repeated id shares its list

    def fused(self) -> torch.Tensor:
        """[B, T, len(layer_ids) * H]: the layers' inputs side by side, in `layer_ids` order; the
        calls captured so far are concatenated along the tokens."""
        if not self.parts[self.layer_ids[0]]:
            raise RuntimeError("no decoder forward ran inside capture_aux")
        return torch.cat([torch.cat(self.parts[i], dim=1) for i in self.layer_ids], dim=-1)

    def clear(self) -> None:
        for v in self.parts.values():
            v.clear()


def _decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    layers = getattr(decoder, "layers", None)
    if layers is None:  # a *ForCausalLM was passed: use its decoder
        layers = getattr(decoder.get_decoder(), "layers", None)
    if layers is None:
        raise TypeError(f"{type(decoder).__name__} has no `layers` list of decoder layers")
    return layers


@contextmanager
def capture_aux(decoder: nn.Module, layer_ids: Sequence[int]) -> Iterator[AuxCapture]:
    """Record the input hidden state of decoder layers `layer_ids` while the block runs."""
    layers = _decoder_layers(decoder)
    capture = AuxCapture(layer_ids)
    handles = []
    for i in sorted(set(capture.layer_ids)):
        if not 0 <= i < len(layers):
            raise ValueError(f"aux layer {i} is outside the target's {len(layers)} layers")

        def hook(module, args, kwargs, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            capture.parts[i].append(x.detach())

        handles.append(layers[i].register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield capture
    finally:
        for h in handles:
            h.remove()
