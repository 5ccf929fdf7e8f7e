"""Draft heads: the ones shipped with the package, and loading a head folder of either kind into a
drafter for a target.

    target = load_target(...)
    drafter = load_drafter("path/to/head", target, default_tree(target.device, target.dtype),
                           draft_setup(target.device, target.dtype), lookup=8)
    Generator(target, drafter)

A folder holds an EAGLE-1/2 head (draft.py) or an EAGLE-3 head (eagle3.py); its config.json says
which (`eagle3.head_kind`). An EAGLE-3 head reads the inputs of three target layers, so building
its drafter sets the target's features to those (`Target.set_feature_layers`); an EAGLE-1/2 head's
drafter sets them back to the last hidden state.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from eaglespec.draft import DraftHead
from eaglespec.drafter import Drafter, EagleDrafter, TreeConfig
from eaglespec.eagle3 import Eagle3Head, head_kind
from eaglespec.lookup import HybridDrafter, PromptLookupDrafter

if TYPE_CHECKING:
    from eaglespec.backends import DraftSetup
    from eaglespec.backends.base import TargetModel

DEFAULT_HEAD = Path(__file__).parent / "smollm2-135m-instruct"


def default_head_path() -> Path | None:
    """The head trained for the default target (SmolLM2-135M-Instruct), if this install ships one."""
    return DEFAULT_HEAD if (DEFAULT_HEAD / "config.json").is_file() else None


def load_head(path: str | Path, num_target_layers: int | None = None) -> DraftHead | Eagle3Head:
    """The head in a folder, EAGLE-1/2 or EAGLE-3 as its config.json says, in float32 on the CPU.
    num_target_layers: the target's depth, for an EAGLE-3 config that names no feature layers
    (the default ones of such a target are then read). Raises `DraftHeadError` (one line)."""
    if head_kind(path) == "eagle3":
        return Eagle3Head.from_pretrained(path, num_target_layers=num_target_layers)
    return DraftHead.from_pretrained(path)


def make_drafter(head: DraftHead | Eagle3Head, target: TargetModel, tree: TreeConfig = TreeConfig(),
                 setup: DraftSetup | None = None, lookup: int = 0) -> Drafter:
    """The drafter of a loaded head for `target`, which is set to return the features the head
    reads. setup: the head's dtype and weight layout (`backends.draft_setup`; None: float32 as
    loaded); lookup > 0 grafts a prompt-lookup chain of up to that many tokens into each tree
    (`HybridDrafter`). Raises `DraftHeadError` (one line) for a head that does not fit the target."""
    if lookup < 0:
        raise ValueError(f"lookup must be >= 0, got {lookup}")
    check = getattr(target, "check_drafting", None)  # a target that cannot verify trees exactly says so
    if check is not None:
        check()
    limit = getattr(target, "max_tree", None)  # most nodes one forward of this target verifies
    if limit is not None and tree.kind == "dynamic" and tree.total_tokens + lookup > limit:
        tree = replace(tree, total_tokens=max(2, limit - lookup))
    drafter: Drafter = EagleDrafter.from_head(head, target, tree, setup)
    target.set_feature_layers(drafter.feature_layers)
    if lookup:
        drafter = HybridDrafter(drafter, PromptLookupDrafter(num_tokens=lookup))
    if limit is not None and drafter.max_tree_size > limit:
        raise ValueError(f"draft trees of up to {drafter.max_tree_size} nodes exceed the {limit} this target "
                         "verifies in one forward: use a smaller tree or --lookup")
    return drafter


def load_drafter(path: str | Path, target: TargetModel, tree: TreeConfig = TreeConfig(), setup: DraftSetup | None = None,
                 lookup: int = 0, remember: bool = True) -> Drafter:
    """`make_drafter` for the head in a folder of either kind (`load_head`). remember: a cost-sized
    tree's sizer starts from what the last process with the same machine, target weights, head
    files, tree, setup and lookup learnt, and keeps what it learns (`eaglespec.cost.SizerMemory`)."""
    drafter = make_drafter(load_head(path, target.num_layers), target, tree, setup, lookup)
    eagle = drafter.eagle if isinstance(drafter, HybridDrafter) else drafter
    if remember and isinstance(eagle, EagleDrafter) and eagle.sizer is not None:
        from eaglespec.backends import machine_id
        from eaglespec.cost import SizerMemory
        from eaglespec.paths import file_stamp

        files = sorted(f for f in Path(path).resolve().iterdir() if f.is_file())  # the head's, as they are now
        key = "\n".join([*map(file_stamp, files), target.cost_key(), repr(eagle.tree_config), repr(setup),
                         f"lookup {lookup}"])
        eagle.remember(SizerMemory(machine_id(target.device), key))
    return drafter

