"""The measured cost of a verified node, and tree sizes chosen from it."""

import math

import pytest
import torch
from helpers import oracle_head, tiny_target
from test_tree import VOCAB_IDS, fake_model

from eaglespec.cost import CALIBRATION_BOUNDS, CostCurve, TreeSizer, measure_cost_curve, plausible, probe_cost_curve
from eaglespec.drafter import EagleDrafter, TreeConfig
from eaglespec.expand import expand_dynamic
from eaglespec.generate import GenerationConfig, Generator
from eaglespec.head_runner import head_runner

SIZES = (1, 2, 4, 8, 16, 32, 64)


def curve(per_node: float, one: float = 0.03) -> CostCurve:
    """A synthetic curve: one token costs `one` seconds, each further one `per_node` of that."""
    return CostCurve(SIZES, tuple(one * (1 + per_node * (n - 1)) for n in SIZES))


FLAT, STEEP = curve(0.01), curve(0.6)  # 16 nodes: 1.15x one token, 10x (llama.cpp's Q4_1 on a Zen 3: 8x)
# path confidences of 40 candidates, sorted, as a confident head gives them
CONFIDENCES = torch.tensor([0.9 * 0.85 ** i for i in range(40)]).log()


def test_the_curve_interpolates_and_extrapolates():
    c = CostCurve((1, 2, 4), (0.010, 0.012, 0.020))
    assert c.at(1) == 0.010 and c.at(0) == 0.010
    assert c.at(3) == pytest.approx(0.016) and c.rel(3) == pytest.approx(1.6)
    assert c.at(6) == pytest.approx(0.028)  # the last segment's 4 ms a node, continued
    assert CostCurve.from_dict(c.as_dict()) == c
    for sizes, seconds in [((2, 4), (1.0, 2.0)), ((1, 4, 2), (1.0, 2.0, 3.0)), ((1, 2), (1.0,)), ((1, 2), (1.0, 0.0))]:
        with pytest.raises(ValueError):
            CostCurve(sizes, seconds)


def test_a_steep_curve_gets_fewer_nodes_than_a_flat_one():
    steep = TreeSizer(STEEP, 63, draft_s=0.01).best(CONFIDENCES)
    flat = TreeSizer(FLAT, 63, draft_s=0.01).best(CONFIDENCES)
    assert 1 <= steep < flat <= 40
    # by hand, for the steep curve: the rate of each size, and the sizer's pick is its argmax
    p = CONFIDENCES.exp().double()
    rates = [(1 + p[:n].sum()) / (STEEP.at(n + 1) + 0.01) for n in range(1, 41)]
    assert steep == 1 + max(range(40), key=lambda i: (rates[i], -i))
    # a slower draft makes the forward's share of a step smaller, so more nodes pay
    assert TreeSizer(STEEP, 63, draft_s=1.0).best(CONFIDENCES) > steep
    # never more than the bound
    assert TreeSizer(FLAT, 5, draft_s=0.01).best(CONFIDENCES) == 5


def test_unsure_drafts_get_fewer_nodes():
    sizer = TreeSizer(curve(0.05), 63, draft_s=0.01)
    unsure = torch.tensor([0.3 * 0.7 ** i for i in range(40)]).log()
    assert sizer.best(unsure) < sizer.best(CONFIDENCES)


def test_a_noisy_curve_never_makes_more_nodes_look_cheaper():
    dip = CostCurve((1, 2, 4, 8, 16), (0.030, 0.034, 0.060, 0.040, 0.070))  # 8 measured below 4
    sizer = TreeSizer(dip, 15, draft_s=0.0)
    assert torch.all(sizer.costs[1:] >= sizer.costs[:-1])
    assert sizer.costs[7].item() == pytest.approx(0.060)  # c(8) counted as c(4)
    assert plausible(STEEP.seconds) and not plausible(dip.seconds)


def test_calibration_follows_observed_acceptance_within_bounds():
    sizer = TreeSizer(curve(0.2), 63, draft_s=0.01)
    before = sizer.best(CONFIDENCES)
    for _ in range(200):  # the head is right twice as often as it says, and more
        n = sizer.choose(CONFIDENCES)
        sizer.record_accepted(round(3 * float(CONFIDENCES[:n].exp().sum())))
    assert sizer.scale == CALIBRATION_BOUNDS[1]
    assert sizer.best(CONFIDENCES) > before
    for _ in range(400):  # and then never right
        sizer.choose(CONFIDENCES)
        sizer.record_accepted(0)
    assert sizer.scale == CALIBRATION_BOUNDS[0] and sizer.best(CONFIDENCES) < before
    sizer.record_accepted(5)  # no tree pending (e.g. the prompt): ignored
    assert sizer.scale == CALIBRATION_BOUNDS[0]


def test_the_draft_time_is_a_moving_average_unless_fixed():
    sizer = TreeSizer(FLAT, 63)
    sizer.record_draft(0.010)
    sizer.record_draft(0.020)
    assert sizer.draft_s == pytest.approx(0.012)
    fixed = TreeSizer(FLAT, 63, draft_s=0.5)
    fixed.record_draft(0.010)
    assert fixed.draft_s == 0.5


@pytest.mark.parametrize("c", [FLAT, curve(0.2), STEEP])
def test_a_sized_expansion_stops_early_only_where_the_tree_stays_the_same(c):
    """Stopping before a depth whose nodes could not pay (TreeSizer.deeper_may_pay) gives the
    tree of the full expansion."""
    tree = TreeConfig(top_k=2, depth=3, total_tokens=8, sizing="cost")
    root, h_root = torch.tensor([7]), torch.zeros(1)
    step, logprobs, calls = fake_model()
    early, stopped = expand_dynamic(tree, root, h_root, step, logprobs, VOCAB_IDS, stop_early=True,
                                    sizer=TreeSizer(c, 7, draft_s=0.0))
    full, _ = expand_dynamic(tree, root, h_root, *fake_model()[:2], VOCAB_IDS, sizer=TreeSizer(c, 7, draft_s=0.0))
    assert early.tokens.tolist() == full.tokens.tolist() and early.parents.tolist() == full.parents.tolist()
    if c is STEEP:  # the steep curve keeps one node (.5): not even depth 2 is drafted
        assert full.tokens.tolist() == [7, 10] and stopped and calls == []
    if c is FLAT:  # the flat one keeps all seven candidates the bound allows
        assert full.size == 8 and not stopped


class CountingTarget:
    """Not a torch Target: the calls `probe_cost_curve` needs, counted, with a forward that costs
    a sleep of `per_token` seconds a token."""

    def __init__(self, key: str = "weights A", per_token: float = 0.0005) -> None:
        self.key, self.per_token = key, per_token
        self.forwards, self.resets, self.length = 0, 0, 0

    def cost_key(self) -> str:
        return self.key

    def prefill(self, tokens):
        self.length = tokens.shape[0]

    def forward(self, tokens, positions=None, tree_mask=None):
        import time

        q = tokens.shape[0]
        assert torch.equal(tree_mask, torch.ones(q, q, dtype=torch.bool).tril())  # a chain's tree mask
        assert positions.tolist() == list(range(self.length, self.length + tokens.shape[0]))  # nothing committed
        self.forwards += 1
        time.sleep(0.001 + self.per_token * tokens.shape[0])

    def reset(self):
        self.resets += 1
        self.length = 0


def test_the_probe_is_cached_per_machine_and_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EAGLESPEC_CACHE", str(tmp_path))
    first = CountingTarget()
    c = probe_cost_curve(first, sizes=(1, 4, 16), repeats=3)
    assert c.sizes == (1, 4, 16) and c.at(16) > c.at(1) and first.forwards >= 9 and first.resets == 1
    assert "measuring what a verified node costs" in capsys.readouterr().err
    assert len(list((tmp_path / "probes").glob("*.json"))) == 1
    again = CountingTarget()
    assert probe_cost_curve(again, sizes=(1, 4, 16), repeats=3) == c and again.forwards == 0
    assert capsys.readouterr().err == ""  # the line is printed only when measuring
    other = CountingTarget("weights B")
    probe_cost_curve(other, sizes=(1, 4, 16), repeats=3)
    assert other.forwards > 0  # another key measures again
    more = CountingTarget()
    probe_cost_curve(more, sizes=(1, 4, 16, 32), repeats=3)
    assert more.forwards > 0  # so do other sizes
    uncached = CountingTarget()
    probe_cost_curve(uncached, sizes=(1, 4, 16), repeats=3, cache=False)
    assert uncached.forwards > 0


def test_the_probe_times_the_torch_target_and_leaves_it_reset():
    target = tiny_target(max_len=64)
    target.prefill(torch.arange(2, 12))
    c = measure_cost_curve(target, repeats=2, announce=False)
    assert c.sizes == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # 30 tokens of context + 48 or 64 do not fit
    assert all(s > 0 for s in c.seconds) and target.cache.length == 0


def test_the_torch_targets_cost_key_tells_apart_what_changes_the_cost(tiny_model_dir):
    from eaglespec.target import Target, load_model, load_target

    packed = load_target(str(tiny_model_dir))
    stock = Target(*load_model(str(tiny_model_dir)))
    bf16 = load_target(str(tiny_model_dir), dtype="bfloat16")
    keys = {packed.cost_key(), stock.cost_key(), bf16.cost_key()}
    assert len(keys) == 3 and packed.cost_key() == load_target(str(tiny_model_dir)).cost_key()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert packed.cost_key() not in keys
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("c", [FLAT, STEEP], ids=["flat", "steep"])
def test_greedy_stays_token_identical_with_sized_trees(c):
    target = tiny_target("llama", copyable=True, logit_scale=30.0)
    head = oracle_head(target, noise=0.2)
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    g = torch.Generator().manual_seed(7)
    ps = [torch.randint(2, target.vocab_size, (int(n),), generator=g) for n in (5, 12, 20)]
    plain = Generator(target)
    want = [[t for ch in plain.generate_ids(p, cfg) for t in ch] for p in ps]
    tree = TreeConfig(top_k=4, depth=8, total_tokens=64, sizing="cost")
    spec = Generator(target, EagleDrafter(head_runner(head, target), tree, sizer=TreeSizer(c, 63, draft_s=0.01)))
    sizes = []
    for p, w in zip(ps, want):
        assert [t for ch in spec.generate_ids(p, cfg) for t in ch] == w
        sizes += spec.last_stats.tree_sizes
    mean = sum(sizes) / len(sizes)
    assert (mean > 12) if c is FLAT else (mean < 6)  # steep: a few nodes a step; flat: many
    assert math.isfinite(spec.drafter.sizer.scale)


def test_a_cost_sized_tree_needs_a_sizer():
    target = tiny_target(copyable=True)
    with pytest.raises(ValueError, match="TreeSizer"):
        EagleDrafter(head_runner(oracle_head(target), target), TreeConfig(sizing="cost"))
    with pytest.raises(ValueError, match="sizing"):
        TreeConfig(sizing="measured")
