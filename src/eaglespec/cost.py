"""What a verified node costs on the machine at hand, and how many nodes a draft tree should verify.

A target forward over a tree of n nodes costs c(n) seconds. How c grows with n depends on the
machine and the weights far more than on the method: a 16-token forward cost 1.31x a one-token one
in bf16 on a Xeon with AMX, 1.49x on a Zen 4 EPYC, and 8x with llama.cpp's Q4_1 weights on a
Zen 3. So c is measured, once per machine and target (`probe_cost_curve`, cached on disk), on
causal chains of q tokens, through nothing but the target's public interface:

    target.prefill(tokens [n])                                 commit a prompt
    target.forward(tokens [q], positions [q], tree_mask [q, q]) run q nodes without committing
    target.cache.compact(nodes [0])                            drop them again
    target.reset()                                             forget the sequence
    target.cost_key() -> str                                   what the cost depends on besides
                                                               the machine (weights, dtype, threads)

and optionally `device`, `vocab_size` and `max_len`. Any target with these calls can be probed
(the torch `Target`, a llama.cpp-backed one).

`TreeSizer` turns the curve into a node budget per step. EAGLE-2 ranks the candidate nodes by
path confidence p (the product of draft probabilities along the path); with p_1 >= p_2 >= ...,
verifying N of them beside the root yields about 1 + a * sum_{i<=N} p_i tokens (the bonus token,
plus each node accepted with probability p_i when the draft is calibrated) for c(N+1) + d seconds
(d: the drafting itself). The sizer picks the N of the most tokens per second, and learns a (how
observed acceptance compares with the confidence) and d (the measured draft time) as it goes.
Sizing only chooses which candidates are verified, never what is accepted: outputs do not change.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, Union

import torch

from eaglespec.paths import ProbeCache

#: log path confidences, as a tensor or as floats
Scores = Union[torch.Tensor, Sequence[float]]


def floats(scores: Scores) -> list[float]:
    """Scores as Python floats (a host copy of a tensor)."""
    return scores.tolist() if isinstance(scores, torch.Tensor) else list(scores)


#: chain lengths the probe times: dense where trees live (a few to 32 nodes), up to 64
DEFAULT_SIZES: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
#: committed context before the timed chains, about a short prompt's
PROBE_CONTEXT = 30
#: bounds of the calibration factor a: observed acceptance may differ from the draft's confidence,
#: but a few unlucky steps must not shrink the tree to nothing or blow it up
CALIBRATION_BOUNDS = (0.5, 2.0)
#: weight of the newest step in the moving averages of the draft time and the acceptance
DRAFT_EMA = 0.2
#: a draft time folds into its moving average as at most this many times the average: on a shared
#: host the sizer's depth time ended four of about a dozen F32 runs at 21-24 ms, against 0.8-1.1 ms
#: in the others (tools/spec_overhead.py), so one slow head run late in a sequence made deeper
#: trees look unaffordable; a real change still moves the average by up to 60% a sample
DRAFT_OUTLIER = 4.0
CALIBRATION_EMA = 0.05
#: at most this many blocks of `repeats` rounds when the curve looks disturbed (`plausible`)
MAX_PROBE_BLOCKS = 3
#: what a drafted step's tokens and seconds still weigh in speculation's rate after each later
#: drafted step (about the last ten steps count)
RATE_DECAY = 0.9
#: weight of the newest step of the root alone in the moving average of its measured time
PLAIN_EMA = 0.2
#: what the drafted steps' evidence still weighs after each rested step, down to REST_AGING_FLOOR
#: drafted steps' worth: the probe after a rest of MAX_REST steps then counts about as much as
#: what came before it, instead of a tenth, so the drafted steps of an answer where drafting lost
#: no longer keep the head resting through the next answers while their probes pay
REST_AGING = 0.95
REST_AGING_FLOOR = 2.0
#: the most steps the drafter rests at a stretch when speculation pays less than plain decoding;
#: a timed sizer rests longer where its probes lose more (`TreeSizer.max_rest`)
MAX_REST = 32
#: timed: the share of resting time that the probes between rests may lose at most
PROBE_SHARE = 0.01
#: timed: the longest rest whatever a probe loses
MAX_REST_CAP = 512
#: weight of the newest probe in the moving average of what probes lose
PROBE_LOSS_EMA = 0.5
#: a timed sizer drafts nothing at the start of each sequence and after this many drafted steps
#: without such a step, to time undrafted steps at the cache length and load of the moment
PLAIN_TIMING_EVERY = 64
#: what `TreeSizer.learnt` keeps for another process (`SizerMemory`); a state of another version
#: is not resumed (2: the calibration counts the tree's own accepted nodes, not a lookup chain's;
#: 3: the drafted steps' evidence ages while resting, its weight kept; 4: the chain's rate on the
#: drafted steps themselves)
LEARNT_VERSION = 4
#: the fields of that state: the rates of drafted and undrafted steps (their decaying sums), the
#: draft times, the calibration, what probes lose, and the rest in progress
LEARNT_FLOATS = ("base_s", "depth_s", "scale", "_predicted_ema", "_accepted_ema", "spec_rate", "_spec_tokens",
                 "_spec_seconds", "_spec_weight", "chain_rate", "_chain_tokens", "_chain_seconds", "rest_rate",
                 "_rest_tokens", "_rest_seconds", "probe_loss_s")
LEARNT_INTS = ("_rest_left", "_rest_next")
#: a process saves its sizer's state after a sequence at most this often (a server answers many)
MEMORY_SAVE_EVERY_S = 30.0


class CostTarget(Protocol):
    """What `probe_cost_curve` needs of a target (the torch `Target` has it; so can any other)."""

    def prefill(self, tokens: torch.Tensor) -> Any: ...

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None) -> Any: ...

    def reset(self) -> None: ...

    def cost_key(self) -> str: ...

    @property
    def cache(self) -> Any: ...  # with compact(nodes): compact of no nodes drops a forward's tokens


@dataclass(frozen=True)
class CostCurve:
    """Seconds of one target forward over n new tokens, measured at `sizes` (ascending, from 1)."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.seconds):
            raise ValueError(f"a cost curve needs as many seconds as sizes, got {len(self.sizes)} and {len(self.seconds)}")
        if self.sizes[0] != 1 or any(b <= a for a, b in zip(self.sizes, self.sizes[1:])):
            raise ValueError(f"cost curve sizes must ascend from 1, got {list(self.sizes)}")
        if any(not s > 0 for s in self.seconds):
            raise ValueError(f"cost curve seconds must be > 0, got {list(self.seconds)}")

    def at(self, n: float) -> float:
        """c(n) in seconds: linear between measured sizes, the last segment's slope past the last
        (never below the last measurement), c(1) below 1."""
        xs, ys = self.sizes, self.seconds
        if n <= xs[0] or len(xs) == 1:
            return ys[0] if n <= xs[0] else ys[-1]
        for i in range(1, len(xs)):
            if n <= xs[i]:
                t = (n - xs[i - 1]) / (xs[i] - xs[i - 1])
                return ys[i - 1] + t * (ys[i] - ys[i - 1])
        slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
        return ys[-1] + slope * (n - xs[-1])

    def rel(self, n: float) -> float:
        """c(n) / c(1): what n nodes cost in one-token forwards."""
        return self.at(n) / self.at(1)

    def as_dict(self) -> dict:
        return {"sizes": list(self.sizes), "seconds": list(self.seconds)}

    @classmethod
    def from_dict(cls, d: dict) -> CostCurve:
        return cls(tuple(int(s) for s in d["sizes"]), tuple(float(s) for s in d["seconds"]))


def probe_cost_curve(target: CostTarget, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 5,
                     cache: bool = True, announce: bool = True) -> CostCurve:
    """The target's cost curve on this machine: read from the probe cache, keyed by the machine
    (CPU model and flags, threads, torch build) and `target.cost_key()`, or measured
    (`measure_cost_curve`) and kept there. A measurement says so in one line on stderr (`announce`)."""
    from eaglespec.backends import machine_id  # hardware lives in backends; cost.py only keys by it

    sizes = tuple(sorted(set(int(s) for s in sizes)))
    entry = hashlib.sha256(f"cost curve\n{target.cost_key()}".encode()).hexdigest()[:16] if cache else None
    probes = ProbeCache(machine_id(getattr(target, "device", "cpu")), entry)
    found = probes.get("cost_curve", kind=dict)
    if found is not None and found.get("asked") == list(sizes):
        try:
            return CostCurve.from_dict(found)
        except (KeyError, TypeError, ValueError):
            pass  # an unreadable entry: measure again
    curve = measure_cost_curve(target, sizes, repeats, announce=announce)
    probes.put("cost_curve", {"asked": list(sizes), **curve.as_dict()})
    probes.save()
    return curve


@torch.inference_mode()
def measure_cost_curve(target: CostTarget, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 5,
                       context: int = PROBE_CONTEXT, announce: bool = True) -> CostCurve:
    """Time `target.forward` on causal chains of q tokens (the tree mask of a chain) after a
    `context`-token prompt, without committing them: the median of `repeats` runs per q, after a
    warm-up. Sizes that do not fit the target's `max_len` (or its `max_tree`, where it has one) are
    left out. Leaves the target reset."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(getattr(target, "device", "cpu"))
    max_len = getattr(target, "max_len", None)
    max_tree = getattr(target, "max_tree", None)  # a backend may verify at most this many nodes at once
    sizes = [q for q in sorted(set(sizes)) if q >= 1 and (max_len is None or context + q <= max_len)
             and (max_tree is None or q <= max_tree)]
    if not sizes or sizes[0] != 1:
        raise ValueError(f"the probe needs size 1 and room for it after {context} tokens of context")
    vocab = int(getattr(target, "vocab_size", 0) or 256)
    # [context + max q] arbitrary valid ids: the cost of a forward does not depend on them
    ids = (torch.arange(context + sizes[-1], device=device) * 7 + 3) % vocab
    try:
        target.prefill(ids[:context])

        def timed(q: int) -> float:
            tokens = ids[context:context + q]
            positions = torch.arange(context, context + q, device=device)
            chain = torch.ones(q, q, dtype=torch.bool, device=device).tril_()  # [q, q] a chain's tree mask
            start = time.perf_counter()
            target.forward(tokens, positions, chain)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            target.cache.compact(torch.zeros(0, dtype=torch.long, device=device))  # keep none of the chain
            return seconds

        timed(sizes[-1])  # first calls set up kernels and buffers
        one = min(timed(1) for _ in range(2))
        if announce:
            # a rough guess: q nodes cost about 1 + q/16 one-token forwards on a CPU
            guess = repeats * one * sum(1 + q / 16 for q in sizes)
            print(f"measuring what a verified node costs on this machine (once, ~{max(1, math.ceil(guess))} s)",
                  file=sys.stderr, flush=True)
        # rounds over all sizes rather than all repeats of one size at once: a burst of load from
        # elsewhere then slows one run of many sizes, which the median drops, not every run of one.
        # A curve that falls where it should rise (a busy machine) gets more rounds, up to thrice.
        runs: dict[int, list[float]] = {q: [] for q in sizes}
        for _ in range(MAX_PROBE_BLOCKS):
            for _ in range(repeats):
                for q in sizes:
                    runs[q].append(timed(q))
            seconds = [statistics.median(runs[q]) for q in sizes]
            if plausible(seconds):
                break
    finally:
        target.reset()
    return CostCurve(tuple(sizes), tuple(seconds))


def plausible(seconds: Sequence[float], tolerance: float = 0.85) -> bool:
    """Whether times measured at ascending sizes never fall below `tolerance` times an earlier one
    (a forward of more tokens does not run faster; where it seems to, the machine was busy)."""
    peak = 0.0
    for s in seconds:
        if s < tolerance * peak:
            return False
        peak = max(peak, s)
    return True


class TreeSizer:
    """How big a dynamic tree is this step: how deep to draft, and how many nodes to verify.

    Verifying the N best candidates (path confidences p_1 >= p_2 >= ...) yields about
    1 + a * sum_{i<=N} p_i tokens for c(N+1) + d seconds, where c comes from a `CostCurve` (made
    non-decreasing: a forward of more nodes is never counted cheaper, which keeps noise in the
    measurement from picking odd sizes) and d is the step's draft time: a base (the head over the
    committed tokens, the selection) plus one head run per depth drafted. `choose` keeps the N of
    the most tokens per second; `deeper_pays` tells the expansion whether one more depth could
    raise that rate enough to pay for its head run.

    Draft times are fixed (`draft_s`, `depth_s`; for tests) or moving averages of what the drafter
    reports (`record_depth` per head run, `record_draft` per proposal). a starts at 1 and follows
    the ratio of observed to predicted accepted nodes (`record_accepted`), within
    CALIBRATION_BOUNDS, unless `calibrate` is off.

    Nodes guessed otherwise (a prompt-lookup chain below the tree) are weighed the same way:
    `extend` keeps as many as raise the expected rate, given each one's acceptance odds.

    Where verifying costs per row (a 4-bit GGUF on a CPU without a batched kernel for it) even
    the best tree can pay less than plain decoding. The sizer keeps the rate drafted steps reached
    lately, their accepted tokens over their seconds (the modelled forward plus the draft time),
    both sums decaying by RATE_DECAY per drafted step, and, while it is below plain decoding's
    1 / c(1), `should_draft` says to rest: 1 step, then 2, 4, ... up to `max_rest`, drafting once
    between rests to measure again. A ratio of sums weighs each step by its time; an average of
    per-step rates, which it replaced, sank below plain decoding's after a step or two that
    accepted nothing and rested where drafting paid on the whole (F32 targets on a CPU).

    The curve is probed after a short context, where a verified row's attention is cheap; after a
    long prompt each row costs more than it says. A `timed` sizer is told each step's measured
    verification (`record_step`): steps of the root alone time plain decoding as it runs now (one is
    taken at the start of each sequence and after every PLAIN_TIMING_EVERY drafted steps without
    one), and drafted steps' rates count their measured forward instead of the modelled one. So
    the rests weigh speculation against plain decoding both as measured in the moment.

    Timed, the bar is what resting earns, not plain decoding alone: while the head rests a
    prompt-lookup chain may still hang below the root, and its accepted tokens are no reason to
    draft. So drafted steps are weighed against the rate of the undrafted steps lately (the same
    decaying ratio of sums, `undrafted_rate`). Against plain decoding alone, drafted steps that
    owed most of their tokens to the chain looked faster than resting: on the shipped Q4_1 GGUF
    the head drafted where resting was as fast, and cheaper drafts (fp16 weights) drafted more
    often and lost 2.7-3.8% in two runs (docs/benchmarks.md, "fp16 draft weights"). Where the
    drafter reports what its chain alone would have earned on each drafted step
    (`record_chain_alone`, the hybrid drafter), that rate over the same steps is the bar instead
    (`bar`): the undrafted steps were other stretches of text, and a copy-heavy one had the bar
    at 191-384 tokens/s against plain decoding's 76-149.

    Timed, the rests also grow past MAX_REST where probes lose much: each probe that ends in a
    rest is charged its measured loss (its draft, the head's catch-up over the rested tokens and
    its forward, less what resting earns in that time; a moving average, `probe_loss_s`), and
    rests may grow until the probes cost at most PROBE_SHARE of the time (`max_rest`). The
    catch-up is mostly a fixed cost (the head's weights read again, its calls), which longer rests
    do save; its part that grows with the rest is one reason the rests stop at MAX_REST_CAP. Where
    verifying a row costs most of a forward (Q4_1 on a Zen 3 where two rows cost 1.6x one), a
    probe lost 20-60 ms, and probes every 33 steps cost speculation about 4% against plain
    decoding while it rested (docs/benchmarks.md, "Longer rests where probes lose").
    """

    def __init__(self, curve: CostCurve, max_nodes: int, draft_s: float | None = None, depth_s: float | None = None,
                 calibrate: bool = True, timed: bool = False) -> None:
        if max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
        self.curve = curve
        self.max_nodes = max_nodes
        # [max_nodes + 1] costs[N]: a forward of the root and N nodes, c(N + 1), made non-decreasing
        self._costs: list[float] = list(itertools.accumulate((curve.at(n + 1) for n in range(max_nodes + 1)), max))
        self.fixed_draft = draft_s is not None or depth_s is not None
        self.base_s = float(draft_s or 0.0) if self.fixed_draft else None  # draft time besides the depths
        self.depth_s = float(depth_s or 0.0) if self.fixed_draft else None  # one depth's head run
        self.calibrate = calibrate
        self.scale = 1.0  # a
        self._predicted_ema = 0.0
        self._accepted_ema = 0.0
        self.pending: float | None = None  # sum of p over the nodes of the last chosen tree
        self.pending_nodes = 0  # nodes the last step verifies besides the root (tree and extension)
        self.pending_extra = 0.0  # expected accepted nodes of the extension (`extend`)
        self.last_draft_s = 0.0  # the last proposal's draft time
        self._depths: list[float] = []  # this proposal's head runs so far (seconds)
        self.spec_rate: float | None = None  # tokens per second of drafted steps, lately
        self._spec_tokens = 0.0  # decaying sums over drafted steps: tokens, and seconds
        self._spec_seconds = 0.0
        self._spec_weight = 0.0  # the same sum of the steps' weights: how many drafted steps they amount to
        # what a lookup chain alone would have earned on those same drafted steps (`record_chain_alone`):
        # the bar a drafted step is weighed against where a chain is hung below every step
        self.chain_rate: float | None = None
        self._chain_tokens = 0.0
        self._chain_seconds = 0.0
        self._chain_alone: tuple[float, float] | None = None  # this step's (tokens, seconds), until recorded
        self.rest_rate: float | None = None  # timed: tokens per second of undrafted steps, lately
        self._rest_tokens = 0.0  # decaying sums over undrafted steps: tokens, and seconds
        self._rest_seconds = 0.0
        self._rest_left = 0  # steps still to rest
        self._rest_next = 1  # the next rest's length
        self.rested = 0  # steps decoded without drafting (for reports)
        self.timed = timed
        self.plain_s: float | None = None  # moving average: measured seconds of a step of the root alone
        self._step_s: float | None = None  # the last step's measured verification (`record_step`)
        self._since_undrafted = PLAIN_TIMING_EVERY  # drafted steps since the last undrafted one (timed: time one first)
        self._catch_up_s = 0.0  # the head's catch-up before the last proposal (`record_catch_up`)
        self.probe_loss_s: float | None = None  # timed: moving average of what probes that ended in a rest lost

    @property
    def resting(self) -> bool:
        """Drafted steps have lately paid less than steps without a draft: than the lookup chain
        alone would have on the same steps (`chain_rate`, where a drafter reports it), else than
        undrafted steps lately (`undrafted_rate`)."""
        return self.spec_rate is not None and self.spec_rate < self.bar

    @property
    def bar(self) -> float:
        """The rate drafted steps must beat: `chain_rate` where known, else `undrafted_rate`."""
        return self.chain_rate if self.chain_rate is not None else self.undrafted_rate

    @property
    def costs(self) -> torch.Tensor:
        """[max_nodes + 1] float64: c(N + 1) for a forward of the root and N nodes, non-decreasing."""
        return torch.tensor(self._costs, dtype=torch.float64)

    @property
    def rest_left(self) -> int:
        """Steps still to rest before the next probe."""
        return self._rest_left

    @property
    def max_rest(self) -> int:
        """The longest rest: MAX_REST; timed, once a probe's loss is measured, as many steps as
        make that loss PROBE_SHARE of plain decoding's time for them, within [MAX_REST, MAX_REST_CAP]."""
        if not self.timed or self.probe_loss_s is None or self.plain_s is None:
            return MAX_REST
        steps = math.ceil(self.probe_loss_s / (PROBE_SHARE * self.plain_s))
        return min(MAX_REST_CAP, max(MAX_REST, steps))

    @property
    def undrafted_rate(self) -> float:
        """What resting earns, in tokens per second: timed, the rate undrafted steps reached lately,
        a prompt-lookup chain's accepted tokens included (`extend` hangs one below the root while
        the head rests); before any was timed, or untimed, plain decoding's `plain_rate`."""
        return self.rest_rate if self.rest_rate is not None else self.plain_rate

    @property
    def plain_rate(self) -> float:
        """Tokens per second of plain decoding: one token per step of the root alone, as measured
        (timed) or modelled (one forward of one)."""
        return 1.0 / (self.plain_s if self.plain_s is not None else self._costs[0])

    def cost(self, nodes: int) -> float:
        """Seconds of a forward of the root and `nodes` nodes, never decreasing in `nodes`."""
        if nodes < len(self._costs):
            return self._costs[nodes]
        return max(self._costs[-1], self.curve.at(nodes + 1))

    def should_draft(self) -> bool:
        """Whether to draft this step, or rest (verify the root, and a lookup chain if one pays)
        because drafted steps have been paying less than undrafted ones, or, timed, to time an
        undrafted step now."""
        timing = self.timed and self._since_undrafted >= PLAIN_TIMING_EVERY  # draft nothing: time an undrafted step
        if self._rest_left > 0 or timing:
            if self._rest_left > 0:
                self._age_drafted()
            self._rest_left = max(0, self._rest_left - 1)
            self.rested += 1
            self.pending, self.pending_nodes, self.pending_extra = None, 0, 0.0
            return False
        self._since_undrafted += 1
        return True

    def _age_drafted(self) -> None:
        """A rested step: the drafted steps' evidence weighs REST_AGING less (its rate unchanged),
        but never under REST_AGING_FLOOR drafted steps. Their sums decay only with drafted steps,
        and while resting those are the probes, one a rest, so the evidence from where drafting
        lost outweighed ten later probes that paid. On an F32 target the cost-sized tree alone
        rested through two answers after the extraction turn (tau 1.02 and 1.06) where one node a
        step ran at 1.24x and 1.14x of plain decoding (docs/benchmarks.md)."""
        if self._spec_weight > REST_AGING_FLOOR:
            keep = max(REST_AGING, REST_AGING_FLOOR / self._spec_weight)
            self._spec_tokens *= keep
            self._spec_seconds *= keep
            self._spec_weight *= keep
            self._chain_tokens *= keep  # the same steps' bar ages alike
            self._chain_seconds *= keep

    def chain_alone(self, odds: list[float]) -> int:
        """How many nodes of a chain an undrafted step would verify below the root alone (as
        `extend` chooses them with no tree), odds as there. Changes nothing."""
        return self._chain_length(odds, 0, 1.0, 0.0)

    def _chain_length(self, odds: list[float], nodes: int, gain: float, draft_s: float) -> int:
        """The m (0..len(odds)) of the most expected tokens per second for a step of `nodes` nodes
        expecting `gain` tokens after `draft_s` of drafting, with m chain nodes more (odds[j]: the
        chance that the chain's j-th node is accepted, the chain up to it included)."""
        best_m, best_rate = 0, gain / (self.cost(nodes) + draft_s)
        for m, g in enumerate(odds, start=1):
            gain += g
            rate = gain / (self.cost(nodes + m) + draft_s)
            if rate > best_rate:
                best_m, best_rate = m, rate
        return best_m

    def record_chain_alone(self, nodes: int, accepted: int) -> None:
        """What the lookup chain alone would have earned on this step, had the head not drafted:
        `accepted` of its first `nodes` tokens (those the target committed), for a forward of the
        root and `nodes` nodes (modelled, scaled to plain decoding's measured step where timed).
        Called before `record_accepted`; counted only for a drafted step."""
        seconds = self.cost(nodes)
        if self.timed and self.plain_s is not None:
            seconds *= self.plain_s / self.cost(0)
        self._chain_alone = (1.0 + min(accepted, nodes), seconds)

    def extend(self, odds: list[float]) -> int:
        """How many nodes of a chain hung below the chosen tree to verify too: the m (0..len) of
        the most expected tokens per second, where odds[j] is the chance that the chain's j-th new
        node is accepted (its whole chain up to it). Counted in this step's prediction."""
        n = self.pending_nodes
        draft_s = self.last_draft_s if self.pending is not None else 0.0
        best_m = self._chain_length(odds, n, 1.0 + self.scale * (self.pending or 0.0), draft_s)
        self.pending_nodes = n + best_m
        self.pending_extra = float(sum(odds[:best_m]))
        return best_m

    def draft_time(self, depths: int) -> float:
        """The estimated draft time of a step that runs `depths` head runs."""
        return (self.base_s or 0.0) + depths * (self.depth_s or 0.0)

    def rates(self, scores: Scores, draft_s: float) -> list[float]:
        """[n] expected tokens per second of keeping the first 1..n of `scores` ([n] log path
        confidences, sorted descending; n <= max_nodes) after drafting for `draft_s`. In Python
        floats, as the sizer's other per-step arithmetic: on a few dozen numbers each tensor
        operation would cost more than the whole sum."""
        out, mass = [], 0.0
        for n, score in enumerate(floats(scores), start=1):
            mass += math.exp(score)
            out.append((1.0 + self.scale * mass) / (self._costs[n] + draft_s))  # bonus + accepted nodes
        return out

    def best(self, scores: Scores, depths: int | None = None) -> int:
        """How many of the sorted `scores` to keep after `depths` head runs (None: those recorded
        for this proposal): the smallest N of the highest rate, 0 (the root alone, one token for a
        forward of one) when no tree beats that, which happens where every row of a forward costs
        nearly a whole forward and the guesses are unsure."""
        scores = floats(scores)[: self.max_nodes]
        if not scores:
            return 0
        d = self.draft_time(len(self._depths) if depths is None else depths)
        rates = self.rates(scores, d)
        top = max(rates)
        return rates.index(top) + 1 if top > 1.0 / (self._costs[0] + d) else 0  # the first maximum: the smaller tree

    def choose(self, scores: Scores) -> int:
        """`best` (0: verify the root alone), remembering the predicted number of accepted nodes
        for `record_accepted`."""
        scores = floats(scores)
        n = self.best(scores)
        self.pending = sum(math.exp(x) for x in scores[:n])
        self.pending_nodes, self.pending_extra = n, 0.0
        return n

    def deeper_pays(self, scores: Scores, front: Scores) -> bool:
        """Whether drafting one more depth could raise the rate of the best tree, given the
        candidates so far (`scores`, [C] log confidences, any order) and the frontier to expand
        (`front`, [k]). The next depth's children of a frontier node share at most its
        probability, so m of them add at most the m best frontier confidences (m <= k); the bound
        takes the best n current candidates with such m, against one more head run."""
        depths = len(self._depths)
        ranked = sorted(floats(scores), reverse=True)[: self.max_nodes]
        d_now = self.draft_time(depths)
        # the best choice if drafting stops here: a tree of the candidates, or the root alone
        now = max([*self.rates(ranked, d_now), 1.0 / (self._costs[0] + d_now)])
        gain_cur = list(itertools.accumulate((math.exp(x) for x in ranked), initial=0.0))  # best n current, n = 0..
        gain_new = list(itertools.accumulate(math.exp(x) for x in sorted(floats(front), reverse=True)))  # m = 1..k
        d_next = self.draft_time(depths + 1)
        for n, cur in enumerate(gain_cur):
            for m, new in enumerate(gain_new[: self.max_nodes - n], start=1):  # n + m nodes fit
                if (1.0 + self.scale * (cur + new)) / (self._costs[n + m] + d_next) > now:
                    return True
        return False

    def record_depth(self, seconds: float) -> None:
        """One depth's head run of this proposal took `seconds`."""
        self._depths.append(seconds)

    def record_draft(self, seconds: float) -> None:
        """This proposal took `seconds` in all (its depths recorded before); fold both into the
        moving averages (kept as they are with fixed draft times)."""
        depths, self._depths = self._depths, []
        self.last_draft_s = seconds
        if self.fixed_draft:
            self.last_draft_s = self.draft_time(len(depths))
            return
        self.base_s = fold_draft_time(self.base_s, max(0.0, seconds - sum(depths)))
        for d in depths:
            self.depth_s = fold_draft_time(self.depth_s, d)

    def record_catch_up(self, seconds: float) -> None:
        """The head's catch-up over the tokens of rested steps took `seconds` before this proposal
        (left out of its draft time, charged to a probe's loss)."""
        self._catch_up_s = seconds

    def record_step(self, seconds: float) -> None:
        """The step just verified took `seconds` from its proposal to its verdict (the target's
        forward, acceptance, cache compaction); called before `record_accepted`. An undrafted step
        counts toward `undrafted_rate` (and, of the root alone, times plain decoding); a drafted
        step's time replaces its modelled forward. Untimed sizers ignore it."""
        if not self.timed:
            return
        self._step_s = seconds
        if self.pending is None:
            self._since_undrafted = 0
        if self.pending_nodes == 0:
            self.plain_s = seconds if self.plain_s is None else (1 - PLAIN_EMA) * self.plain_s + PLAIN_EMA * seconds

    def record_accepted(self, accepted: int, tree_accepted: int | None = None) -> None:
        """The target accepted `accepted` nodes of the last chosen tree and its extension (bonus
        token excluded), `tree_accepted` of them the tree's own (None: not known; the
        extension's expected share is then taken off `accepted`). The calibration follows the
        tree's own: credited with whatever a lookup chain got beyond its expected share, it swung
        with the chain's runs (on an F32 target it ended 8 answers at 1.71, where the kept nodes
        had been accepted 1.07x as often as their confidence said; tools/tree_acceptance.py)."""
        step_s, self._step_s = self._step_s, None
        chain_alone, self._chain_alone = self._chain_alone, None
        if self.pending is None:  # no draft this step: the root alone, or with a lookup chain
            if step_s is not None:
                self._rest_tokens = RATE_DECAY * self._rest_tokens + accepted + 1
                self._rest_seconds = RATE_DECAY * self._rest_seconds + step_s
                self.rest_rate = self._rest_tokens / self._rest_seconds
            return
        predicted, self.pending = self.pending, None
        catch_up_s, self._catch_up_s = self._catch_up_s, 0.0
        # measured against measured: the step's own time once an undrafted step has been timed too
        forward_s = step_s if step_s is not None and self.rest_rate is not None else self.cost(self.pending_nodes)
        self._spec_tokens = RATE_DECAY * self._spec_tokens + accepted + 1
        self._spec_seconds = RATE_DECAY * self._spec_seconds + forward_s + self.last_draft_s
        self._spec_weight = RATE_DECAY * self._spec_weight + 1.0
        if chain_alone is not None:
            self._chain_tokens = RATE_DECAY * self._chain_tokens + chain_alone[0]
            self._chain_seconds = RATE_DECAY * self._chain_seconds + chain_alone[1]
            self.chain_rate = self._chain_tokens / self._chain_seconds
        self.spec_rate = self._spec_tokens / self._spec_seconds
        if self.resting:
            if self.timed and step_s is not None:
                spent = catch_up_s + self.last_draft_s + step_s
                loss = max(0.0, spent - (accepted + 1) / self.bar)
                old = self.probe_loss_s
                self.probe_loss_s = loss if old is None else (1 - PROBE_LOSS_EMA) * old + PROBE_LOSS_EMA * loss
            self._rest_left, self._rest_next = self._rest_next, min(2 * self._rest_next, self.max_rest)
        else:
            self._rest_next = 1
        if tree_accepted is None:
            accepted_tree = max(0.0, accepted - self.pending_extra)  # the extension's share, as expected
        else:
            accepted_tree = float(tree_accepted)
        if not self.calibrate:
            return
        self._predicted_ema = (1 - CALIBRATION_EMA) * self._predicted_ema + CALIBRATION_EMA * predicted
        self._accepted_ema = (1 - CALIBRATION_EMA) * self._accepted_ema + CALIBRATION_EMA * accepted_tree
        if self._predicted_ema > 0:
            lo, hi = CALIBRATION_BOUNDS
            self.scale = min(hi, max(lo, self._accepted_ema / self._predicted_ema))

    def learnt(self) -> dict:
        """What this sizer has learnt of drafting here, as JSON: the rates, draft times and
        calibration, what probes lose, and the rest in progress (`resume` takes it up)."""
        return {"version": LEARNT_VERSION, **{k: getattr(self, k) for k in LEARNT_FLOATS + LEARNT_INTS}}

    def resume(self, state: dict) -> bool:
        """Start from what a sizer of the same target, head and tree learnt in another process
        (`learnt`): where drafting did not pay, a new process rests at once, the rest it was in
        going on, instead of probing its way there again (each probe a draft and a forward of
        several rows). Returns whether `state` was taken: one of another version, or with a value
        out of place, is not, and this sizer starts afresh. Fixed draft times stay fixed."""
        if not isinstance(state, dict) or state.get("version") != LEARNT_VERSION:
            return False
        floats = {k: state.get(k, "missing") for k in LEARNT_FLOATS}
        ints = {k: state.get(k, "missing") for k in LEARNT_INTS}
        if not all(v is None or (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) for v in floats.values()):
            return False
        if not all(isinstance(v, int) and 0 <= v <= MAX_REST_CAP for v in ints.values()):
            return False
        if self.fixed_draft:
            floats.pop("base_s"), floats.pop("depth_s")
        for k, v in {**floats, **ints}.items():
            setattr(self, k, v)
        return True

    def begin(self) -> None:
        """A new sequence: the prompt is no verdict on a tree. What was learnt of the rates stays,
        and so does a rest in progress: drafting has not paid lately, a new prompt is no sign that
        it will, and a probe costs a draft and the head's catch-up over the prompt's last
        positions, which a short answer feels most."""
        self.pending, self.pending_nodes, self.pending_extra = None, 0, 0.0
        self._depths = []
        # another cache length: time plain decoding again, and an undrafted step first
        self.plain_s, self._step_s, self._since_undrafted = None, None, PLAIN_TIMING_EVERY


def fold_draft_time(average: float | None, sample: float) -> float:
    """A draft time's moving average after `sample` (DRAFT_EMA), the sample capped at DRAFT_OUTLIER
    times the average."""
    if average is None:
        return sample
    return (1 - DRAFT_EMA) * average + DRAFT_EMA * min(sample, DRAFT_OUTLIER * average)


class SizerMemory:
    """A sizer's learnt state kept across processes, per machine and `key` (what the state
    depends on: the target's weights and backend, the head, the tree, the lookup chain), in the
    probe cache. Each `eaglespec generate` starts a new process: without it every one of them
    learns again, by probing, that drafting does not pay on a machine and model where it does not,
    which cost 4-11% of the default's speed over 256-token answers (docs/benchmarks.md, "A sizer that
    remembers")."""

    def __init__(self, machine: str, key: str) -> None:
        self.machine = machine
        self.entry = hashlib.sha256(f"sizer\n{key}".encode()).hexdigest()[:16]
        self._saved_at: float | None = None

    def load(self, sizer: TreeSizer) -> bool:
        """Resume `sizer` from the kept state (`TreeSizer.resume`) if there is one and it was
        resting (`TreeSizer.resting`, judged on a copy). Where drafting paid, a fresh sizer
        drafts from the first step anyway, and rates carried over from other answers (a lookup
        chain's rich stretches among them) made a resumed one rest more: on an F32 target 484-666
        of about 950 steps against 98-183, at 1.36-1.45x of plain decoding against 1.42-1.44x."""
        state = ProbeCache(self.machine, self.entry).get("sizer", kind=dict)
        trial = copy.copy(sizer)  # resume sets numbers only, so a shallow copy keeps `sizer` as it is
        if state is None or not trial.resume(state) or not trial.resting:
            return False
        return sizer.resume(state)

    def save(self, sizer: TreeSizer, force: bool = False) -> bool:
        """Keep `sizer`'s state: after the first sequence, then at most every MEMORY_SAVE_EVERY_S
        (`force`: now). Returns whether it was written."""
        now = time.monotonic()
        if not force and self._saved_at is not None and now - self._saved_at < MEMORY_SAVE_EVERY_S:
            return False
        self._saved_at = now
        probes = ProbeCache(self.machine, self.entry)
        probes.put("sizer", sizer.learnt())
        probes.save()
        return True

