"""Head training hyper-parameters, in a module of their own: the command line reads their
defaults for its help without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_DRAFT_VOCAB = 8192


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (betas 0.9, 0.95) with linear warm-up, cosine decay and gradient clipping: what both
    head trainers share."""

    lr: float = 5e-4  # peak learning rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 0.5


@dataclass(frozen=True)
class TrainConfig(OptimizerConfig):
    """Head training hyper-parameters."""

    steps: int = 2000  # optimizer steps in all
    batch_size: int = 4  # rows per step (per process)
    # batches per length group: each epoch's shuffled rows are sorted by length in runs of
    # length_group * batch_size rows, cut into batches, and the batches shuffled, so a batch pads
    # to a length near its rows' own (1 = plain random batches)
    length_group: int = 50
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


@dataclass(frozen=True)
class Eagle3TrainConfig(OptimizerConfig):
    """EAGLE-3 training hyper-parameters (train/eagle3.py; `eaglespec train eagle3` maps onto them
    one to one)."""

    ttt_steps: int = 7  # draft steps unrolled per position, each fed the head's own output
    ttt_decay: float = 0.8  # step s's loss weighs ttt_decay ** s
    # the K most frequent answer tokens of the packed training rows. None: DEFAULT_DRAFT_VOCAB for a
    # new head, the head's own draft vocabulary when starting from one (--init-from)
    draft_vocab: int | None = None
    # rows x padded length per batch, at most. 16k: on an H200 in 8.5 minutes, 16k-token batches
    # (1,486 steps) reached a held-out chain tau of 2.63, 64k-token batches (443 steps) 1.92
    batch_tokens: int = 16384
    lr: float = 6e-4  # peak learning rate
    max_steps: int | None = None  # optimizer steps in all; None: epochs, or what --max-minutes fits
    epochs: float = 3.0  # passes over the training rows when neither max_steps nor max_minutes bounds the run
    max_minutes: float | None = None  # wall-clock budget of this process, loading and saving included
    checkpoint_every: int = 200
    eval_every: int = 200
    val_rows: int = 256  # held-out rows evaluated (all the pack's val rows, at most)
    # lm_head <- the target's rows of the draft vocabulary, norm <- its final norm. Off: on 30 steps of
    # SmolLM2 batches the random init (the official one) had the lower loss (19 vs 30 train, 35 vs 42
    # held out): the target's read-out of a random hidden starts confidently wrong; on an H200 over
    # 1,500 steps it ended behind too (chain tau 2.60 against 2.63, docs/training.md)
    init_from_target: bool = False
    seed: int = 0
    mixed_precision: str = "auto"  # accelerate's "no" | "bf16" | "fp16"; auto: bf16 on GPUs with it, else no
    compile: bool = False  # torch.compile the unrolled head (falls back to eager if compiling fails)

    def __post_init__(self) -> None:
        for name in ("ttt_steps", "batch_tokens", "checkpoint_every", "eval_every", "val_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise ValueError(f"draft_vocab must be >= 1, got {self.draft_vocab}")
        if self.lr <= 0 or not 0 < self.ttt_decay <= 1 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0, ttt_decay in (0, 1], warmup_steps >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
