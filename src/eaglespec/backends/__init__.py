"""Hardware choices, behind one small interface picked by device.

The method's modules (target, tree, verify, generate, drafter) call these and never ask what
hardware they run on. Optimizations that change weights or layouts are explicit steps here
(`optimize_target`; a draft head's `DraftSetup`), which the CLI, the bench and the server call and
any caller may skip. Only the CPU has a backend so far; other devices get plain defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import hashlib

import torch
from torch import nn

from eaglespec.backends import cpu
from eaglespec.backends.base import DraftSetup, DraftWeights, TargetOptimization

if TYPE_CHECKING:
    from eaglespec.drafter import TreeConfig
    from eaglespec.target import Target

__all__ = ["DraftSetup", "DraftWeights", "TargetOptimization", "auto_dtype", "cheap_host_sync", "check_device",
           "convert_draft", "default_tree", "draft_setup", "exact_rows", "machine_id", "optimize_target", "tree_sizes",
           "weights_fingerprint"]


def _device(device: str | torch.device) -> torch.device:
    return torch.device(device)


def check_device(device: str | torch.device) -> None:
    """Raise ValueError, saying why, unless `device` names a device this torch can use: "cpu", or
    an accelerator that is built in and present ("cuda", "cuda:1", "mps")."""
    try:
        dev = _device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r}: {why} (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
        return
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here (use --device cpu)")


def auto_dtype(device: str | torch.device) -> torch.dtype:
    """The fastest exact-enough dtype for a target: bfloat16 on GPUs that have it and on CPUs with
    native bf16 arithmetic (AMX or AVX-512 bf16); float32 elsewhere, where bf16 matmuls are emulated."""
    device = _device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu.native_bf16(cpu.cpu_flags()) else torch.float32
    return torch.float32


def exact_rows(device: str | torch.device, dtype: torch.dtype) -> int | None:
    """The most tree nodes a target forward may verify at once and still give each row the bits it
    gets alone (None: no limit). Bigger trees are verified in blocks of this many."""
    if _device(device).type == "cpu" and dtype != torch.float32:
        return cpu.EXACT_HALF_ROWS
    return None


def cheap_host_sync(device: str | torch.device) -> bool:
    """Whether reading a value back to the host (`.item()`, `.tolist()`) costs about nothing: on a
    CPU it does; on an accelerator it stalls the queue of kernels."""
    return _device(device).type == "cpu"


def optimize_target(target: Target, pack: bool = True) -> TargetOptimization:
    """Make `target` fast on its device, in place: on a CPU, pre-pack its linear weights (`pack`),
    or, where they stay stock, check and warn whether their bits depend on the rows in a block.
    Output bits stay those that lossless decoding needs; skip it for a stock model."""
    if target.device.type == "cpu":
        return cpu.optimize_target(target, pack=pack)
    return TargetOptimization()


def draft_setup(device: str | torch.device, target_dtype: torch.dtype,
                weights: Literal["auto", "int8", "fp16", "full"] = "auto", dtype: torch.dtype | None = None) -> DraftSetup:
    """How a draft head should run beside a target on `device` in `target_dtype`. weights: "int8"
    (int8 linears), "fp16" (fp16 weights, fp32 arithmetic; CPUs only), "full" (in `dtype`,
    pre-packed where the backend can), or "auto" (what pays on this hardware). dtype: what the
    head computes in (None: the backend's choice, else float32). Changes what is proposed, never
    what is accepted."""
    if weights not in ("auto", "int8", "fp16", "full"):
        raise ValueError(f"draft weights must be 'auto', 'int8', 'fp16' or 'full', got {weights!r}")
    if _device(device).type == "cpu":
        return cpu.draft_setup(target_dtype, weights, dtype)
    if weights == "fp16":
        raise ValueError("fp16 draft weights are a CPU layout (fbgemm); on a GPU the head runs in the target's dtype")
    return DraftSetup(dtype or torch.float32, "int8" if weights == "int8" else "plain")


def convert_draft(head: nn.Module, lm: nn.Linear, setup: DraftSetup) -> tuple[nn.Module, nn.Module]:
    """A draft's modules with their linears stored as `setup.weights` says (`head` changed in
    place: pass a copy you own). "plain" returns them as they are."""
    if setup.weights == "plain":
        return head, lm
    return cpu.convert_draft(head, lm, setup)


def machine_id(device: str | torch.device = "cpu") -> str:
    """A short name for what decides a kernel's speed and rounding here, to key cached probes by:
    the CPU (model, flags, threads, torch build) and, for an accelerator, its name."""
    device = _device(device)
    host = cpu.machine_id()
    if device.type == "cuda":
        name = f"{host}\n{torch.cuda.get_device_name(device)}\n{torch.version.cuda}"
        return hashlib.sha256(name.encode()).hexdigest()[:16]
    return host


def weights_fingerprint(model: nn.Module, dtype: torch.dtype) -> str | None:
    """A digest of the weight files `model` was loaded from and `dtype`; None for a model built in
    memory."""
    return cpu.weights_fingerprint(model, dtype)


def tree_sizes(device: str | torch.device, dtype: torch.dtype) -> dict:
    """Dynamic-tree fields (TreeConfig keywords) for a target on `device` in `dtype`; {} where
    there are none (TreeConfig's defaults: a fixed 16 nodes)."""
    return cpu.tree_sizes(dtype) if _device(device).type == "cpu" else {}


def default_tree(device: str | torch.device, dtype: torch.dtype, **overrides) -> TreeConfig:
    """The dynamic tree for a target on `device` in `dtype`; `overrides` that are not None (e.g.
    from the command line) win. On a CPU the node budget of each step is sized by the cost of a
    verified node measured on the machine (`eaglespec.cost`), up to `total_tokens`; an explicit
    `total_tokens` (with no `sizing`) asks for that many nodes every step instead, and
    `sizing="fixed"` alone TreeConfig's 16. GPUs keep a fixed 16 nodes."""
    from eaglespec.drafter import TreeConfig  # the method's config; backends sit below the method

    given = {k: v for k, v in overrides.items() if v is not None}
    if "total_tokens" in given and "sizing" not in given:
        given["sizing"] = "fixed"
    sizes = tree_sizes(device, dtype)
    if given.get("sizing") == "fixed" and sizes.get("sizing") == "cost":
        sizes.pop("total_tokens")  # a cost-sized tree's bound is no fixed size: TreeConfig's default
    return TreeConfig(**{**sizes, **given})
