"""Head training hyper-parameters, in a module of their own: the command line reads their
defaults for its help without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DRAFT_VOCAB = 8192


@dataclass(frozen=True)
class TrainConfig:
    """Head training hyper-parameters."""

    steps: int = 2000  # optimizer steps in all
    batch_size: int = 4  # rows per step (per process)
    # batches per length group: each epoch's shuffled rows are sorted by length in runs of
    # length_group * batch_size rows, cut into batches, and the batches shuffled, so a batch pads
    # to a length near its rows' own (1 = plain random batches)
    length_group: int = 50
    lr: float = 5e-4  # peak learning rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    noise: float = 0.1  # uniform noise U(-noise, noise) on input features
    p_weight: float = 0.1  # weight of the cross-entropy term
    ttt_steps: int = 1  # draft steps unrolled in training, each fed the head's own prediction (1 = EAGLE-1)
    ttt_decay: float = 0.8  # step s's loss weighs ttt_decay ** s
    # K most frequent training tokens (0 = full vocabulary). None: DEFAULT_DRAFT_VOCAB for a new head,
    # the init head's own vocabulary when fine-tuning; a number with an init head picks it afresh.
    draft_vocab: int | None = None
    layers: int = 1  # decoder layers of a new head (EAGLE: 1); with an init head, grow it to this many
    checkpoint_every: int = 100
    eval_every: int = 500
    seed: int = 0
    # accelerate's setting: "no", "bf16" or "fp16"; "auto" follows the target's auto dtype for the
    # device (bf16 autocast on native-bf16 CPUs and bf16 GPUs, none on CPUs without native bf16)
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "length_group", "checkpoint_every", "eval_every", "ttt_steps", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or (self.draft_vocab or 0) < 0 or self.noise < 0:
            raise ValueError("lr must be > 0; draft_vocab and noise must be >= 0")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {sorted(MIXED_PRECISION)}, got {self.mixed_precision!r}")


MIXED_PRECISION = {"auto", "no", "bf16", "fp16"}
