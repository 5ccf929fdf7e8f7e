"""Preallocated key/value caches that roll back by moving accepted entries into place.

The target's cache plugs into an unmodified transformers model through its `Cache` API: each layer
owns `[1, kv_heads, max_len, head_dim]` buffers allocated once, writes the new keys at
`[length, length + q)` and hands attention a view of `[0, length + q)`. Nothing grows inside the
decode loop. After verification, `compact` copies the accepted tree nodes to the slots right after
the committed prefix and `length` is set past them; whatever lies beyond `length` is garbage that
the next forward overwrites and the attention mask never reads.

The buffers may be wider than the model's dtype: with eaglespec's fp32 attention (bf16 targets)
keys and values are kept in float64, the precision its sums run in, so each
step converts only its q new rows instead of the whole cache, in every layer (the conversion is
exact, so the attention's output bits do not change).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class PreallocatedLayer(CacheLayerMixin):
    """One attention layer's keys and values, `[1, kv_heads, max_len, head_dim]`."""

    is_compileable = False
    is_sliding = False

    def __init__(self, max_len: int, owner: "TargetKVCache") -> None:
        super().__init__()
        self.max_len = max_len
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        key_dtype = self.owner.key_dtype or key_states.dtype
        value_dtype = self.owner.value_dtype or value_states.dtype
        # uninitialized: a slot is always written before it is read (attention sees [0, length + q)),
        # so zeroing would only cost a pass over the whole buffer at the first forward (188 MB for
        # SmolLM2's 2,048 float64 slots), touching pages that a short answer never uses
        self.keys = torch.empty(b, h, self.max_len, d, dtype=key_dtype, device=key_states.device)
        self.values = torch.empty(b, h, self.max_len, value_states.shape[-1], dtype=value_dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.owner.length
        end = start + key_states.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: need {end} slots, have {self.max_len}")
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.max_len


class TargetKVCache(Cache):
    """The target model's cache: one `PreallocatedLayer` per decoder layer and one shared length.

    `length` counts the committed tokens whose keys are valid. A forward over q new tokens writes
    slots `[length, length + q)` without moving `length`; the decode loop decides what to keep.
    """

    def __init__(self, num_layers: int, max_len: int, key_dtype: torch.dtype | None = None,
                 value_dtype: torch.dtype | None = None) -> None:
        """key_dtype, value_dtype: storage precision (None: the model's); attention then receives
        the cached keys and values in these dtypes."""
        self.length = 0
        self.max_len = max_len
        self.key_dtype, self.value_dtype = key_dtype, value_dtype
        super().__init__(layers=[PreallocatedLayer(max_len, self) for _ in range(num_layers)])

    @torch.inference_mode()
    def compact(self, keep: torch.Tensor) -> None:
        """Keep the entries at slots `length + keep` (ascending), moved to `length, length+1, ...`.

        keep: [k] long, offsets from `length` of the accepted nodes, e.g. [0, 2, 5] for the root,
        its child at tree index 2 and that child's child at tree index 5. Advanced indexing reads a
        copy before the write, so overlapping ranges are safe.
        """
        n = keep.shape[0]
        dst_end = self.length + n
        if n == 1 and keep.device.type == "cpu" and int(keep[0]) == 0:  # only the root: already in place
            self.length = dst_end
            return
        src = keep + self.length
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            layer.keys[:, :, self.length : dst_end] = layer.keys[:, :, src]
            layer.values[:, :, self.length : dst_end] = layer.values[:, :, src]
        self.length = dst_end

    def reset(self) -> None:
        self.length = 0

    def set_storage(self, key_dtype: torch.dtype | None, value_dtype: torch.dtype | None) -> None:
        """Change the storage dtypes; the buffers are reallocated on the next write if they change."""
        if (key_dtype, value_dtype) != (self.key_dtype, self.value_dtype):
            self.key_dtype, self.value_dtype = key_dtype, value_dtype
            for layer in self.layers:
                layer.is_initialized = False
                layer.keys = layer.values = None
