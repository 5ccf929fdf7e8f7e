"""The measured cost of a verified node, and tree sizes chosen from it."""

import json
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


def test_no_tree_when_none_beats_the_root_alone():
    """Where each row costs most of a forward (llama.cpp's Q4_1 on a Zen 3: 2 rows 1.8x one), an
    unsure guess is not worth its row: the root is verified alone. A sure guess still is."""
    per_row = curve(0.8)
    unsure = torch.tensor([0.5 * 0.6 ** i for i in range(40)]).log()
    sure = torch.tensor([0.97 * 0.9 ** i for i in range(40)]).log()
    sizer = TreeSizer(per_row, 63, draft_s=0.002)
    assert sizer.best(unsure) == 0 and sizer.choose(unsure) == 0 and sizer.pending == 0.0
    assert sizer.best(sure) >= 1
    assert TreeSizer(FLAT, 63, draft_s=0.002).best(unsure) >= 1  # where rows are cheap, unsure guesses pay
    # by hand: the best tree's rate against the root alone's, the same draft time in both
    p = unsure.exp().double()
    best_tree = max((1 + p[:n].sum()) / (per_row.at(n + 1) + 0.002) for n in range(1, 41))
    assert best_tree < 1 / (per_row.at(1) + 0.002)
    # and no deeper drafting for a tree that cannot beat the root alone
    assert not sizer.deeper_pays(unsure[:4], unsure[:4] + math.log(0.5))


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


def test_the_draft_times_are_moving_averages_unless_fixed():
    sizer = TreeSizer(FLAT, 63)
    for depth_runs, total in [([0.002, 0.002], 0.010), ([0.004], 0.020)]:
        for d in depth_runs:
            sizer.record_depth(d)
        sizer.record_draft(total)
    assert sizer.depth_s == pytest.approx(0.8 * 0.002 + 0.2 * 0.004)  # per head run
    assert sizer.base_s == pytest.approx(0.8 * 0.006 + 0.2 * 0.016)  # the rest of a proposal
    assert sizer.draft_time(3) == pytest.approx(sizer.base_s + 3 * sizer.depth_s)
    fixed = TreeSizer(FLAT, 63, draft_s=0.5, depth_s=0.1)
    fixed.record_depth(0.01)
    fixed.record_draft(0.02)
    assert fixed.draft_time(2) == pytest.approx(0.7)


def test_the_draft_time_of_the_depths_run_counts_in_the_choice():
    """A step that drafted deeper has spent more: its forward is a smaller share, more nodes pay."""
    sizer = TreeSizer(STEEP, 63, draft_s=0.0, depth_s=0.05)
    shallow = sizer.best(CONFIDENCES, depths=0)
    assert sizer.best(CONFIDENCES, depths=6) > shallow
    for _ in range(6):
        sizer.record_depth(0.05)
    assert sizer.best(CONFIDENCES) == sizer.best(CONFIDENCES, depths=6)


def expand_sized(c: CostCurve, depth_s: float):
    tree = TreeConfig(top_k=2, depth=3, total_tokens=8, sizing="cost")
    step, logprobs, calls = fake_model()
    sized, stopped = expand_dynamic(tree, torch.tensor([7]), torch.zeros(1), step, logprobs, VOCAB_IDS,
                                    stop_early=True, sizer=TreeSizer(c, 7, draft_s=0.0, depth_s=depth_s))
    return sized, stopped, len(calls)


def test_a_sized_expansion_drafts_deeper_only_where_it_may_pay():
    """The fake model's candidates (test_tree.fake_model): .5 and .3 at depth 1, then .4, .18, ...
    A free head on a flat curve drafts every depth and keeps all seven nodes the bound allows; on a
    steep curve even the best node (.5) is not worth a row costing 0.6 of a forward, so it
    verifies the root alone and drafts nothing deeper; a head run of a third of a forward
    (10 ms) pays for depth 2 but not depth 3; one of a whole forward not even for depth 2."""
    flat, stopped, runs = expand_sized(FLAT, 0.0)
    assert flat.size == 8 and not stopped and runs == 2
    steep, stopped, runs = expand_sized(STEEP, 0.0)
    assert steep.tokens.tolist() == [7] and stopped and runs == 0
    slow, stopped, runs = expand_sized(FLAT, 0.01)
    assert stopped and runs == 1 and slow.size < 8
    slower, stopped, runs = expand_sized(FLAT, 0.03)
    assert stopped and runs == 0 and slower.size <= 3
    # sizing never keeps a node the fixed tree of the same bound would drop
    fixed, _ = expand_dynamic(TreeConfig(top_k=2, depth=3, total_tokens=8), torch.tensor([7]), torch.zeros(1),
                              *fake_model()[:2], VOCAB_IDS)
    assert flat.tokens.tolist() == fixed.tokens.tolist()


class CountingTarget:
    """Not a torch Target: the calls `probe_cost_curve` needs, counted, with a forward that costs
    a sleep of `per_token` seconds a token."""

    def __init__(self, key: str = "weights A", per_token: float = 0.0005, max_tree: int | None = None) -> None:
        self.key, self.per_token, self.max_tree = key, per_token, max_tree
        self.forwards, self.resets, self.length = 0, 0, 0
        self.pending = False  # like llama.cpp: a forward's tokens stay until compact drops them

    @property
    def cache(self):
        return self

    def compact(self, nodes):
        assert nodes.shape[0] == 0  # the probe keeps nothing
        self.pending = False

    def cost_key(self) -> str:
        return self.key

    def prefill(self, tokens):
        self.length = tokens.shape[0]

    def forward(self, tokens, positions=None, tree_mask=None):
        import time

        q = tokens.shape[0]
        assert torch.equal(tree_mask, torch.ones(q, q, dtype=torch.bool).tril())  # a chain's tree mask
        assert positions.tolist() == list(range(self.length, self.length + tokens.shape[0]))  # nothing committed
        assert not self.pending, "a forward over the last one's uncommitted tokens"
        assert self.max_tree is None or q <= self.max_tree
        self.pending = True
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


def test_greedy_stays_token_identical_when_steps_verify_the_root_alone():
    """Each row costs 0.7 of a forward: only sure guesses get verified, the other drafted steps
    verify the root alone (a tree of one node without resting), and the tokens stay plain's."""
    target = tiny_target("llama", copyable=True, logit_scale=30.0)
    head = oracle_head(target, noise=0.6)
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    g = torch.Generator().manual_seed(5)
    ps = [torch.randint(2, target.vocab_size, (int(n),), generator=g) for n in (6, 14)]
    plain = Generator(target)
    tree = TreeConfig(top_k=4, depth=6, total_tokens=24, sizing="cost")
    sizer = TreeSizer(curve(0.7), 23, draft_s=0.0, depth_s=0.0)
    sizer.record_accepted = lambda accepted, tree_accepted=None: None  # no rests: every step drafts and chooses
    spec = Generator(target, EagleDrafter(head_runner(head, target), tree, sizer=sizer))
    sizes = []
    for p in ps:
        assert [t for ch in spec.generate_ids(p, cfg) for t in ch] == [t for ch in plain.generate_ids(p, cfg) for t in ch]
        sizes += spec.last_stats.tree_sizes
    assert 1 in sizes and max(sizes) > 1 and sizer.rested == 0


def test_a_cost_sized_tree_needs_a_sizer():
    target = tiny_target(copyable=True)
    with pytest.raises(ValueError, match="TreeSizer"):
        EagleDrafter(head_runner(oracle_head(target), target), TreeConfig(sizing="cost"))
    with pytest.raises(ValueError, match="sizing"):
        TreeConfig(sizing="measured")


def test_the_probe_keeps_within_what_the_target_verifies_at_once():
    """A backend that verifies at most 8 nodes per forward (llama.cpp's max_tree) is probed up to 8,
    and each timed chain is dropped before the next (it refuses a forward on top of another)."""
    target = CountingTarget(max_tree=8)
    curve = probe_cost_curve(target, sizes=(1, 2, 4, 8, 16, 32), repeats=2, cache=False, announce=False)
    assert curve.sizes == (1, 2, 4, 8) and not target.pending


def test_the_sizer_rests_while_drafted_steps_pay_less_than_plain_decoding():
    """Every node costs half a forward, and so does the draft: a step that gains one token loses
    to plain decoding, so the drafter rests 1, 2, 4 ... steps between tries; steps that gain
    several tokens bring drafting back."""
    per_row = TreeSizer(curve(0.5), 63, draft_s=0.015)
    pattern = []
    for _ in range(20):
        drafting = per_row.should_draft()
        pattern.append(drafting)
        if drafting:
            per_row.choose(CONFIDENCES)
            per_row.record_draft(0.0)
            per_row.record_accepted(0)
    assert per_row.spec_rate < per_row.plain_rate
    assert pattern[:10] == [True, False, True, False, False, True, False, False, False, False]
    assert per_row.rested == pattern.count(False)
    lucky = 0
    while lucky < 200:  # the head turns reliable: twice the nodes it is sure of are accepted
        if per_row.should_draft():
            n = per_row.choose(CONFIDENCES)
            per_row.record_draft(0.0)
            per_row.record_accepted(2 * n)
        lucky += 1
    assert per_row.spec_rate > per_row.plain_rate
    assert all(per_row.should_draft() for _ in range(5))


def test_a_timed_sizer_weighs_measured_steps_where_the_probed_curve_flatters_trees():
    """The curve says nodes are nearly free (probed after a short context); after a long prompt a
    step of the root alone measures 30 ms and a drafted step 90 ms for one token more. A timed
    sizer times plain decoding first, finds drafting slower and rests; an untimed one, reading the
    curve, keeps drafting. Steps that measure fast bring drafting back."""
    timed, untimed = TreeSizer(FLAT, 63, draft_s=0.005, timed=True), TreeSizer(FLAT, 63, draft_s=0.005)
    drafted: dict[bool, list[bool]] = {True: [], False: []}  # per sizer (timed or not): drafted each step
    for sizer in (timed, untimed):
        sizer.begin()
        for _ in range(12):
            drafting = sizer.should_draft()
            drafted[sizer.timed].append(drafting)
            nodes = sizer.choose(CONFIDENCES) if drafting else 0
            if drafting:
                sizer.record_draft(0.0)
            sizer.record_step(0.090 if nodes else 0.030)  # ignored by the untimed one
            sizer.record_accepted(1 if nodes else 0)
    assert drafted[False] == [True] * 12
    assert drafted[True][0] is False  # the first step times plain decoding
    assert timed.plain_s == pytest.approx(0.030) and timed.spec_rate < timed.plain_rate
    assert drafted[True].count(True) <= 4
    for _ in range(100):  # the same trees now verify fast: drafting pays again
        if timed.should_draft():
            timed.choose(CONFIDENCES)
            timed.record_draft(0.0)
            timed.record_step(0.032)
            timed.record_accepted(4)
        else:
            timed.record_step(0.030)
            timed.record_accepted(0)
    assert timed.spec_rate > timed.plain_rate and timed.should_draft()


def test_a_timed_sizer_drafts_nothing_now_and_then_to_time_undrafted_steps():
    """While drafting pays, one step in PLAIN_TIMING_EVERY + 1 drafts nothing (a lookup chain may
    still hang below the root), so what resting earns stays measured; an untimed sizer never
    does."""
    from eaglespec.cost import PLAIN_TIMING_EVERY

    for timed in (True, False):
        sizer = TreeSizer(FLAT, 63, draft_s=0.0, timed=timed)
        plain_steps, chains = [], []
        for step in range(3 * (PLAIN_TIMING_EVERY + 1)):
            drafting = sizer.should_draft()
            if drafting:
                sizer.choose(CONFIDENCES)
                sizer.record_draft(0.0)
            else:
                plain_steps.append(step)
                chains.append(sizer.extend([0.99] * 4))
            sizer.record_step(0.03 if sizer.pending_nodes == 0 else 0.031)
            sizer.record_accepted(5 if drafting else min(sizer.pending_nodes, 1))
        if timed:
            assert plain_steps == [0, PLAIN_TIMING_EVERY + 1, 2 * (PLAIN_TIMING_EVERY + 1)]
            assert chains == [4, 4, 4] and sizer.rest_rate == pytest.approx(2 / 0.031)
        else:
            assert plain_steps == []


def test_extend_keeps_the_chain_nodes_that_pay_for_their_rows():
    """Nearly free nodes are all kept when the chain is sure and a few when it is not; nodes
    that cost 0.6 of a forward each are kept only while they are likely right."""
    sure, unsure = [0.95, 0.9, 0.86, 0.82, 0.78, 0.74], [0.3, 0.09, 0.03, 0.01, 0.003, 0.001]
    kept = {}
    for c, name in [(FLAT, "flat"), (STEEP, "steep")]:
        for odds, which in [(sure, "sure"), (unsure, "unsure")]:
            sizer = TreeSizer(c, 63, draft_s=0.01)
            n = sizer.choose(CONFIDENCES)
            m = kept[name, which] = sizer.extend(odds)
            assert sizer.pending_nodes == n + m
            assert sizer.pending_extra == pytest.approx(sum(odds[:m]))
    assert kept["flat", "sure"] == 6 and 1 <= kept["flat", "unsure"] < 6
    assert 1 <= kept["steep", "sure"] < 6 and kept["steep", "unsure"] == 0
    for odds, pays in [(sure, True), (unsure, False)]:  # no tree this step: the chain alone is weighed
        resting = TreeSizer(STEEP, 63, draft_s=0.01)
        assert not resting.should_draft() or resting.pending is None
        assert (resting.extend(odds) > 0) == pays


def test_the_hybrid_learns_how_often_the_lookup_chain_is_right():
    from eaglespec.lookup import CHAIN_PRIOR, HybridDrafter, PromptLookupDrafter

    target = tiny_target("llama", copyable=True, logit_scale=30.0)
    eagle = EagleDrafter(head_runner(oracle_head(target), target), TreeConfig(top_k=2, depth=3, total_tokens=8,
                                                                             sizing="cost"),
                         sizer=TreeSizer(STEEP, 7, draft_s=0.01))
    hybrid = HybridDrafter(eagle, PromptLookupDrafter(max_ngram=3, num_tokens=4))
    assert hybrid.odds == [[CHAIN_PRIOR] * 4] * 4
    hybrid._guess, hybrid.lookup.matched = [5, 6, 7, 8], 3
    hybrid._learn(torch.tensor([5, 6, 9]))  # two right, the third wrong, the fourth unseen
    assert hybrid.odds[3][:3] == [pytest.approx(0.55), pytest.approx(0.55), pytest.approx(0.45)]
    assert hybrid.odds[3][3] == CHAIN_PRIOR
    assert hybrid.odds[1] == [CHAIN_PRIOR] * 4  # chains found by a one-token match learn apart
    hybrid._learn(torch.tensor([5, 6]))  # nothing guessed last step: nothing learnt
    assert hybrid.odds[3][0] == pytest.approx(0.55)
    hybrid._guess, hybrid.lookup.matched = [7, 8], 1
    hybrid._learn(torch.tensor([9]))
    assert hybrid.odds[1][0] == pytest.approx(0.45) and hybrid.odds[3][0] == pytest.approx(0.55)


def test_the_calibration_counts_the_trees_own_accepted_nodes_not_a_chains():
    """With a lookup chain hung below the tree, the sizer is told how many accepted nodes were the
    head's own (those on the accepted path through the head's tree), so the chain's runs are not
    taken for a head that is right more often than it says."""
    from eaglespec.lookup import HybridDrafter, PromptLookupDrafter

    target = tiny_target("llama", copyable=True, logit_scale=30.0)
    tree = TreeConfig(top_k=2, depth=3, total_tokens=8, sizing="cost")
    eagle = EagleDrafter(head_runner(oracle_head(target, noise=0.6), target), tree,
                         sizer=TreeSizer(FLAT, 7, draft_s=0.001, depth_s=0.0))
    hybrid = HybridDrafter(eagle, PromptLookupDrafter(num_tokens=6))
    trees, told = [], []
    propose, record = eagle._propose, eagle.sizer.record_accepted

    def recording_propose(root):
        trees.append(propose(root))
        return trees[-1]

    def recording_accepted(accepted, tree_accepted=None):
        told.append((trees[-1] if trees else None, accepted, tree_accepted))
        record(accepted, tree_accepted)

    eagle._propose, eagle.sizer.record_accepted = recording_propose, recording_accepted
    guesses, alone = [[]], []  # the chain of each proposal; what the sizer is told the chain alone got
    guess, record_alone = hybrid.lookup.guess, eagle.sizer.record_chain_alone
    hybrid.lookup.guess = lambda: (guesses.append(guess()), guesses[-1])[1]
    eagle.sizer.record_chain_alone = lambda nodes, right: (alone.append((nodes, right)), record_alone(nodes, right))
    committed = []
    observe = hybrid.observe
    hybrid.observe = lambda tokens, features: (committed.append(tokens.tolist()), observe(tokens, features))
    base = torch.randint(2, target.vocab_size, (10,), generator=torch.Generator().manual_seed(3))
    list(Generator(target, hybrid).generate_ids(base.repeat(3), GenerationConfig(max_new_tokens=48, ignore_eos=True)))
    drafted = [(t, a, ta, c) for (t, a, ta), c in zip(told, committed, strict=True) if ta is not None]
    assert drafted
    for t, accepted, tree_accepted, tokens in drafted:
        # by hand: follow the committed tokens down the head's tree
        node, own = 0, 0
        for tok in tokens[:-1]:
            kids = [i for i in range(1, t.size) if int(t.parents[i]) == node and int(t.tokens[i]) == tok]
            if not kids:
                break
            node, own = kids[0], own + 1
        assert tree_accepted == own <= accepted == len(tokens) - 1
    assert any(tree_accepted < accepted for _, accepted, tree_accepted, _ in drafted)  # the chain's, not counted
    # the chain alone's count, per step: its leading tokens the target chose (the proposal's chain)
    assert len(alone) == len(committed) and any(right > 0 for _, right in alone)
    for chain, tokens, (_, right) in zip(guesses, committed, alone, strict=True):
        lead = 0
        while lead < min(len(chain), len(tokens)) and chain[lead] == tokens[lead]:
            lead += 1
        assert right == lead


def test_the_lookup_drafter_says_how_long_a_match_found_its_chain():
    from eaglespec.lookup import PromptLookupDrafter

    d = PromptLookupDrafter(max_ngram=3, num_tokens=2)
    d.observe(torch.tensor([1, 2, 3, 4, 9, 2, 3]), torch.empty(0))
    assert d.guess() == [4, 9] and d.matched == 2  # "2 3" occurred before; "9 2 3" did not
    d.observe(torch.tensor([7]), torch.empty(0))
    assert d.guess() == [] and d.matched == 0


@pytest.mark.parametrize("c", [FLAT, curve(1.0)], ids=["flat", "per-row"])
def test_greedy_stays_token_identical_with_a_weighed_chain_and_rests(c):
    """The hybrid drafter with a cost-sized tree, a weighed lookup chain and, where every row
    costs a forward, rests between drafted steps: the same tokens as plain decoding."""
    from eaglespec.lookup import HybridDrafter, PromptLookupDrafter

    target = tiny_target("llama", copyable=True, logit_scale=30.0)
    head = oracle_head(target, noise=0.6)
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    g = torch.Generator().manual_seed(3)
    base = torch.randint(2, target.vocab_size, (10,), generator=g)
    ps = [base.repeat(3), torch.randint(2, target.vocab_size, (16,), generator=g)]  # repeats: lookup matches
    plain = Generator(target)
    want = [[t for ch in plain.generate_ids(p, cfg) for t in ch] for p in ps]
    tree = TreeConfig(top_k=4, depth=6, total_tokens=24, sizing="cost")
    eagle = EagleDrafter(head_runner(head, target), tree, sizer=TreeSizer(c, 23, draft_s=0.02))
    spec = Generator(target, HybridDrafter(eagle, PromptLookupDrafter(num_tokens=6)))
    for p, w in zip(ps, want):
        assert [t for ch in spec.generate_ids(p, cfg) for t in ch] == w
    if c is not FLAT:
        assert eagle.sizer.rested > 0


@pytest.mark.parametrize("c", [FLAT, curve(1.0)], ids=["flat", "per-row"])
def test_the_chain_alone_verifies_what_pays_and_writes_plain_decodings_tokens(c):
    """A model without a head drafts with the weighed lookup chain alone: on a repeating prompt,
    where rows are cheap, it verifies chain tokens and the target accepts some, in fewer forwards;
    where every row costs a forward, it verifies the root alone (plain decoding), and still learns
    the chain's odds from the bonus token. Greedy output is plain decoding's either way."""
    from eaglespec.lookup import CHAIN_PRIOR, PromptLookupDrafter, WeighedLookupDrafter

    target = tiny_target("llama", copyable=True, logit_scale=30.0)
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    base = torch.randint(2, target.vocab_size, (10,), generator=torch.Generator().manual_seed(3))
    prompt = base.repeat(3)  # the copyable target goes on repeating it: the chain matches
    plain = Generator(target)
    want = [t for ch in plain.generate_ids(prompt, cfg) for t in ch]
    drafter = WeighedLookupDrafter(PromptLookupDrafter(num_tokens=6), TreeSizer(c, 6))
    spec = Generator(target, drafter)
    assert [t for ch in spec.generate_ids(prompt, cfg) for t in ch] == want
    learnt = drafter.chain_odds.odds[3][0]
    assert learnt > CHAIN_PRIOR  # the repeats' chains were right, verified or not
    if c is FLAT:
        assert drafter.verified > 0 and spec.last_stats.target_forwards < plain.last_stats.target_forwards
    else:  # a chain token pays only if right more often than a whole forward costs: never
        assert drafter.verified == 0 and spec.last_stats.target_forwards == plain.last_stats.target_forwards


def test_the_timed_draft_leaves_out_the_catch_up_commit():
    """The first proposal runs the head over the prompt, and one after rests over the rested
    steps' tokens; neither is what drafting a step costs, so neither is in the recorded draft
    time: only the last verification's tokens (the prompt's last one) are committed within it.
    The catch-up is recorded apart (a probe's loss counts it)."""
    import time

    target = tiny_target("llama", copyable=True, logit_scale=30.0)
    runner = head_runner(oracle_head(target, noise=0.2), target)
    committed = []
    inner = runner.commit

    def slow_commit(tokens, features):  # 5 ms a token
        committed.append(tokens.shape[0])
        time.sleep(0.005 * tokens.shape[0])
        return inner(tokens, features)

    runner.commit = slow_commit
    sizer = TreeSizer(FLAT, 15)
    drafts = []
    record = sizer.record_draft
    sizer.record_draft = lambda seconds: (drafts.append(seconds), record(seconds))
    catch_ups = []
    record_catch_up = sizer.record_catch_up
    sizer.record_catch_up = lambda seconds: (catch_ups.append(seconds), record_catch_up(seconds))
    drafter = EagleDrafter(runner, TreeConfig(top_k=2, depth=3, total_tokens=16, sizing="cost"), sizer=sizer)
    spec = Generator(target, drafter)
    prompt = torch.randint(2, target.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    list(spec.generate_ids(prompt, GenerationConfig(max_new_tokens=4, ignore_eos=True)))
    assert committed[:2] == [39, 1]  # the prompt caught up, then its last token within the timed draft
    assert drafts[0] < 0.1  # not the 0.2 s of the whole prompt
    assert catch_ups[0] >= 39 * 0.005 and all(c < 0.1 for c in catch_ups[1:])
    committed.clear()
    pattern = iter([True, False, False, False] + [True] * 20)  # draft, rest three steps, draft on
    sizer.should_draft = lambda: next(pattern)
    list(spec.generate_ids(prompt, GenerationConfig(max_new_tokens=12, ignore_eos=True)))
    # the prompt, its last token; then the rested steps' tokens apart from the last step's
    assert committed[:2] == [39, 1] and committed[2] >= 3 and committed[3] == 1


def test_a_step_or_two_that_accept_nothing_do_not_stop_drafting_that_pays_on_the_whole():
    """Drafted steps of two nodes take 0.06 s (a forward of three tokens, 0.05 s, and 0.01 s of
    draft) against 0.03 s for plain decoding's one token: a step that accepts both nodes makes 50
    tokens a second, one that accepts none 17, plain decoding 33. Where steps accept both, none,
    none, over and over (28 a second), the drafter rests now and then, as it should. Where they
    accept both three steps in five (37 a second), two failures in a row must not set off a rest,
    which they did while the rate was an average of each step's rate."""
    def run(pattern: list[int], steps: int) -> list[bool]:
        sizer = TreeSizer(curve(1 / 3), 2, draft_s=0.01, calibrate=False)
        drafted = []
        for i in range(steps):
            drafting = sizer.should_draft()
            drafted.append(drafting)
            if drafting:
                assert sizer.choose(CONFIDENCES) == 2
                sizer.record_draft(0.0)
                sizer.record_accepted(pattern[i % len(pattern)])
        return drafted

    assert not all(run([2, 0, 0], 40))
    assert all(run([2, 2, 2, 0, 0], 40))


def test_a_rest_in_progress_goes_on_into_the_next_sequence():
    """Drafting has not paid: the sizer rests 1, 2, 4 ... steps. A new sequence does not end the
    rest (a short answer would pay for a probe each time), and the rest still ends when it is over."""
    sizer = TreeSizer(curve(0.5), 63, draft_s=0.015)
    while sizer._rest_next < 8:  # steps that gain nothing, until a rest of 4 is under way
        if sizer.should_draft():
            sizer.choose(CONFIDENCES)
            sizer.record_draft(0.0)
            sizer.record_accepted(0)
    left = sizer._rest_left
    assert left > 0
    sizer.begin()
    assert [sizer.should_draft() for _ in range(left + 1)] == [False] * left + [True]


def test_a_timed_sizer_weighs_drafting_against_what_resting_earns_with_a_lookup_chain():
    """Resting steps verify the root and a lookup chain: 2 tokens in 30 ms (67 tokens/s). Drafted
    steps make 2.5 tokens in 45 ms (56 tokens/s): faster than plain decoding's lone token in 30 ms
    (33 tokens/s), slower than resting. The sizer rests more and more; when drafted steps turn
    faster than resting, it drafts again."""
    sizer = TreeSizer(FLAT, 63, draft_s=0.0, timed=True)
    sizer.begin()
    drafted = []

    def step(drafted_s: float, drafted_tokens: int) -> None:
        drafting = sizer.should_draft()
        drafted.append(drafting)
        if drafting:
            sizer.choose(CONFIDENCES)
            sizer.record_draft(0.0)
            sizer.record_step(drafted_s)
            sizer.record_accepted(drafted_tokens - 1)
        elif sizer.extend([0.9] * 4):  # the chain below the root alone
            sizer.record_step(0.030)
            sizer.record_accepted(1)
        else:  # the root alone: plain decoding timed
            sizer.record_step(0.030)
            sizer.record_accepted(0)

    for _ in range(40):
        step(0.045, 2)  # 2 tokens... and the half token on average below
        step(0.045, 3)
    assert sizer.plain_rate == pytest.approx(1 / 0.030)
    assert sizer.undrafted_rate == pytest.approx(2 / 0.030, rel=0.05)
    assert sizer.plain_rate < sizer.spec_rate < sizer.undrafted_rate and sizer.resting
    assert drafted[40:].count(True) <= 8  # rests of 1, 2, 4 ... steps between tries
    for _ in range(100):
        step(0.030, 4)  # drafted steps now make 4 tokens in 30 ms
    assert sizer.spec_rate > sizer.undrafted_rate and not sizer.resting
    assert all(drafted[-5:])


def rest_lengths(sizer: TreeSizer, steps: int, probe: dict, plain_s: float = 0.014, accepted: int = 0) -> list[int]:
    """Run a timed sizer for `steps` steps where every probe (drafted step) costs what `probe`
    says ({"catch_up", "draft", "step"} seconds) and accepts `accepted` nodes, and each undrafted
    step takes `plain_s` for its one token; return the lengths of the rests between probes."""
    sizer.begin()
    rests, run = [], 0
    for _ in range(steps):
        if sizer.should_draft():
            rests.append(run)
            run = 0
            sizer.record_catch_up(probe["catch_up"])
            sizer.choose(CONFIDENCES)
            sizer.record_draft(probe["draft"])
            sizer.record_step(probe["step"])
            sizer.record_accepted(accepted)
        else:
            run += 1
            sizer.record_step(plain_s)
            sizer.record_accepted(0)
    return rests


def test_a_timed_sizer_rests_longer_where_probes_lose_more():
    """A probe that costs 13 ms of draft, 5 ms of catch-up and a 22 ms forward for one token, where
    undrafted steps make one token in 14 ms, loses 26 ms: rests grow past MAX_REST until the probes
    lose 1% of the time (ceil(0.026 / (0.01 * 0.014)) = 186 steps), and the probes then cost
    about that. A cheap probe (1 ms lost) keeps MAX_REST, as does an untimed sizer."""
    from eaglespec.cost import MAX_REST, PROBE_SHARE

    costly = {"catch_up": 0.005, "draft": 0.013, "step": 0.022}
    sizer = TreeSizer(FLAT, 63, timed=True)
    rests = rest_lengths(sizer, 2000, costly)
    assert sizer.probe_loss_s == pytest.approx(0.026)
    assert sizer.max_rest == 186
    assert rests[1:9] == [1, 2, 4, 8, 16, 32, 64, 128] and set(rests[9:-1]) == {186}
    late = rests[9:-1]
    lost = len(late) * sizer.probe_loss_s
    assert lost / (sum(late) * 0.014) == pytest.approx(PROBE_SHARE, rel=0.02)

    cheap = TreeSizer(FLAT, 63, timed=True)
    assert max(rest_lengths(cheap, 600, {"catch_up": 0.0, "draft": 0.001, "step": 0.014})) == MAX_REST
    assert cheap.probe_loss_s == pytest.approx(0.001) and cheap.max_rest == MAX_REST

    untimed = TreeSizer(FLAT, 63, draft_s=0.013)
    for _ in range(600):
        if untimed.should_draft():
            untimed.choose(CONFIDENCES)
            untimed.record_draft(0.0)
            untimed.record_step(0.022)  # ignored
            untimed.record_accepted(0)
    assert untimed.probe_loss_s is None and untimed.max_rest == MAX_REST and untimed.resting


def test_a_probe_that_pays_ends_the_long_rests():
    """After rests have grown past MAX_REST, probes that pay bring drafting back within a few
    rests (speculation's rate remembers the last ten or so drafted steps)."""
    sizer = TreeSizer(FLAT, 63, timed=True)
    rest_lengths(sizer, 800, {"catch_up": 0.005, "draft": 0.013, "step": 0.022})
    assert sizer.resting and sizer.max_rest > 32
    drafted = []
    for _ in range(4 * sizer.max_rest + 20):  # the same probes now accept four nodes each
        drafting = sizer.should_draft()
        drafted.append(drafting)
        if drafting:
            sizer.record_catch_up(0.0)
            sizer.choose(CONFIDENCES)
            sizer.record_draft(0.004)
            sizer.record_step(0.016)
            sizer.record_accepted(4)
        else:
            sizer.record_step(0.014)
            sizer.record_accepted(0)
    assert not sizer.resting and drafted[-20:].count(True) >= 19  # (one undrafted step in 65 is timed)


def test_a_long_rest_ahead_reads_no_prompt_features_and_stays_token_identical():
    """While a rest longer than MAX_REST lies ahead the head reads none of the prompt's features
    (a short rest: RESTING_PROMPT_FEATURES of them); a probe later in the answer then runs the head
    over the answer's tokens alone, and the output is still plain decoding's."""
    from eaglespec.cost import MAX_REST
    from eaglespec.drafter import RESTING_PROMPT_FEATURES

    target = tiny_target("llama", copyable=True, logit_scale=30.0)
    sizer = TreeSizer(FLAT, 15, timed=True)
    rest_lengths(sizer, 700, {"catch_up": 0.005, "draft": 0.013, "step": 0.022})
    while sizer.rest_left <= MAX_REST:  # on to the start of a long rest
        if sizer.should_draft():
            sizer.choose(CONFIDENCES)
            sizer.record_draft(0.013)
            sizer.record_step(0.022)
            sizer.record_accepted(0)
    drafter = EagleDrafter(head_runner(oracle_head(target, noise=0.2), target),
                           TreeConfig(top_k=2, depth=3, total_tokens=16, sizing="cost"), sizer=sizer)
    assert drafter.prompt_features == 0
    committed = []
    inner = drafter.runner.commit
    drafter.runner.commit = lambda tokens, features: (committed.append(tokens.shape[0]), inner(tokens, features))[1]
    left = sizer.rest_left
    prompt = torch.randint(2, target.vocab_size, (30,), generator=torch.Generator().manual_seed(3))
    cfg = GenerationConfig(max_new_tokens=left + 8, ignore_eos=True)
    spec, plain = Generator(target, drafter), Generator(target)
    want = [t for ch in plain.generate_ids(prompt, cfg) for t in ch]
    assert [t for ch in spec.generate_ids(prompt, cfg) for t in ch] == want
    # the first probe's head saw the answer's tokens, not the prompt's 30
    assert committed and sum(committed[:2]) <= left + 2
    sizer._rest_left = 3  # a short rest ahead: the window's last few
    assert sizer.resting and drafter.prompt_features == RESTING_PROMPT_FEATURES


# -- a sizer that remembers, across processes ----------------------------------------------------


def test_a_resumed_sizer_goes_on_where_the_last_one_stopped():
    """A sizer that learnt to rest long hands its rates, draft times, probe loss and the rest in
    progress to a new one, which then rests at once: no probes at 1, 2, 4, ... steps to relearn."""
    costly = {"catch_up": 0.005, "draft": 0.013, "step": 0.022}
    old = TreeSizer(FLAT, 63, timed=True)
    rest_lengths(old, 900, costly)
    assert old.resting and old.rest_left > 0
    state = json.loads(json.dumps(old.learnt()))  # as kept on disk

    new = TreeSizer(FLAT, 63, timed=True)
    assert new.resume(state)
    assert new.learnt() == old.learnt() and new.resting
    left = new.rest_left
    new.begin()
    assert [new.should_draft() for _ in range(left)] == [False] * left

    fresh = TreeSizer(FLAT, 63, timed=True)  # without the state: it probes within the first steps
    assert rest_lengths(fresh, 40, costly)[1:4] == [1, 2, 4]


@pytest.mark.parametrize("change", [
    {"version": 0}, {"_rest_left": -1}, {"_rest_next": 10**6}, {"spec_rate": float("nan")},
    {"scale": "1.0"}, {"_rest_left": 2.5}, {"base_s": -0.1}])
def test_a_state_of_another_version_or_out_of_place_is_not_resumed(change):
    old = TreeSizer(FLAT, 63, timed=True)
    rest_lengths(old, 300, {"catch_up": 0.005, "draft": 0.013, "step": 0.022})
    new = TreeSizer(FLAT, 63, timed=True)
    before = new.learnt()
    assert not new.resume({**old.learnt(), **change})
    assert new.learnt() == before
    missing = old.learnt()
    missing.pop("probe_loss_s")
    assert not new.resume(missing) and not new.resume(None)


def test_fixed_draft_times_stay_fixed_when_resumed():
    old = TreeSizer(FLAT, 63, timed=True)
    rest_lengths(old, 300, {"catch_up": 0.005, "draft": 0.013, "step": 0.022})
    fixed = TreeSizer(FLAT, 63, draft_s=0.002, depth_s=0.001)
    assert fixed.resume(old.learnt())
    assert (fixed.base_s, fixed.depth_s) == (0.002, 0.001) and fixed.spec_rate == old.spec_rate


@pytest.mark.sizer_memory
def test_a_drafter_keeps_its_sizers_state_for_the_next_process(tmp_path, monkeypatch, tiny_model_dir):
    """`load_drafter` keys the memory by the machine, target, head files, tree, setup and lookup.
    After a sequence (here one cut short by the caller) the state is on disk; a drafter loaded
    alike resumes it, one with another lookup chain does not, and output stays plain decoding's."""
    from helpers import random_head

    from eaglespec import cost
    from eaglespec.heads import load_drafter
    from eaglespec.target import load_target

    monkeypatch.setenv("EAGLESPEC_CACHE", str(tmp_path / "cache"))
    target = load_target(str(tiny_model_dir))
    random_head(target).save_pretrained(tmp_path / "head")
    tree = TreeConfig(top_k=2, depth=3, total_tokens=16, sizing="cost")
    first = load_drafter(tmp_path / "head", target, tree, lookup=4)
    assert first.eagle.memory is not None and not first.eagle.memory.load(first.sizer)  # nothing kept yet
    prompt = torch.tensor([2, 9, 14, 30, 7])
    cfg = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    want = [t for ch in Generator(target).generate_ids(prompt, cfg) for t in ch]
    run = Generator(target, first).generate_ids(prompt, cfg)
    got = [t for _, ch in zip(range(6), run) for t in ch]
    run.close()  # the caller stops reading: the drafter still keeps its state
    assert got == want[: len(got)]
    assert first.sizer.resting  # a random head's drafts cost more than they earn: the state worth keeping
    kept = first.sizer.learnt()
    saves = []
    monkeypatch.setattr(cost.SizerMemory, "save", lambda self, sizer, force=False: saves.append(sizer))

    second = load_drafter(tmp_path / "head", target, tree, lookup=4)
    assert second.sizer.learnt() == kept
    other = load_drafter(tmp_path / "head", target, tree, lookup=2)
    assert other.sizer.learnt() != kept
    assert [t for ch in Generator(target, second).generate_ids(prompt, cfg) for t in ch] == want
    assert saves == [second.sizer]


@pytest.mark.sizer_memory
def test_a_server_saves_the_sizers_state_at_most_every_so_often(tmp_path, monkeypatch):
    from eaglespec import cost

    monkeypatch.setenv("EAGLESPEC_CACHE", str(tmp_path / "cache"))
    clock = [100.0]
    monkeypatch.setattr(cost.time, "monotonic", lambda: clock[0])
    memory, sizer = cost.SizerMemory("machine", "key"), TreeSizer(FLAT, 63, timed=True)
    rest_lengths(sizer, 300, {"catch_up": 0.005, "draft": 0.013, "step": 0.022})
    assert memory.save(sizer) and not memory.save(sizer)
    clock[0] += cost.MEMORY_SAVE_EVERY_S
    assert memory.save(sizer) and memory.save(sizer, force=True)
    fresh = TreeSizer(FLAT, 63, timed=True)
    assert not cost.SizerMemory("machine", "other").load(fresh)
    assert cost.SizerMemory("machine", "key").load(fresh) and fresh.learnt() == sizer.learnt()


@pytest.mark.sizer_memory
def test_a_state_where_drafting_paid_is_not_resumed(tmp_path, monkeypatch):
    """A fresh sizer drafts from the first step anyway; only a resting state spares probes."""
    from eaglespec import cost

    monkeypatch.setenv("EAGLESPEC_CACHE", str(tmp_path / "cache"))
    paying = TreeSizer(FLAT, 63, timed=True)
    rest_lengths(paying, 200, {"catch_up": 0.0, "draft": 0.002, "step": 0.016}, accepted=4)
    assert not paying.resting and paying.spec_rate is not None
    cost.SizerMemory("machine", "key").save(paying)
    fresh = TreeSizer(FLAT, 63, timed=True)
    assert not cost.SizerMemory("machine", "key").load(fresh) and fresh.spec_rate is None


def test_drafted_evidence_ages_while_resting_so_paying_probes_end_the_rests_soon():
    """An answer where drafting lost leaves the head resting; in the next one the probes between
    rests pay. Drafted steps' sums decay only with drafted steps, one probe a rest, so without
    aging the lost answer's evidence outweighed the paying probes for hundreds of steps; with
    REST_AGING the head drafts again within a few probes, and where the probes keep losing it
    keeps resting."""
    def run(probe_accepts: int, steps: int = 600) -> tuple[int, int]:
        """(the step at which drafting resumed for good, or -1; the probes before it)."""
        sizer = TreeSizer(FLAT, 63, draft_s=0.005, timed=True)
        sizer.begin()
        for _ in range(200):  # the lost answer: slow drafted steps that accept nothing
            if sizer.should_draft():
                sizer.choose(CONFIDENCES)
                sizer.record_draft(0.0)
                sizer.record_step(0.060)
            else:
                sizer.record_step(0.030)
            sizer.record_accepted(0)
        assert sizer.resting
        sizer.begin()  # the next answer: the rest in progress carries over
        probes, streak = 0, 0
        for step in range(steps):
            if sizer.should_draft():
                probes += streak == 0
                streak += 1
                sizer.choose(CONFIDENCES)
                sizer.record_draft(0.0)
                sizer.record_step(0.033)
                sizer.record_accepted(probe_accepts)
                if streak >= 8:
                    return step, probes
            else:
                streak = 0
                sizer.record_step(0.030)
                sizer.record_accepted(0)
        return -1, probes

    # drafted steps of 2 tokens for 1.3 forwards' time pay; without aging drafting resumed at
    # the 370th step, after 7 probes
    resumed, probes = run(probe_accepts=1)
    assert 0 <= resumed < 300 and probes <= 4
    assert run(probe_accepts=0)[0] == -1  # still losing: still resting


def test_a_pause_inside_one_head_run_does_not_make_drafting_look_dear():
    """Draft times are moving averages; a pause of the machine inside one head run (100 ms where
    a depth takes 1 ms) used to leave the average at about 20 ms, and deeper trees looked
    unaffordable. A sample counts as at most DRAFT_OUTLIER times the average; a lasting change
    still moves it within a few samples."""
    from eaglespec.cost import DRAFT_OUTLIER

    sizer = TreeSizer(FLAT, 63, timed=True)
    for _ in range(20):
        sizer.record_depth(0.001)
        sizer.record_draft(0.003)
    sizer.record_depth(0.100)
    sizer.record_draft(0.102)
    assert sizer.depth_s <= 0.001 * (1 + 0.2 * (DRAFT_OUTLIER - 1)) + 1e-12 and sizer.base_s < 0.005
    before = sizer.best(CONFIDENCES)
    for _ in range(12):  # the head really became slower: 10 ms a depth
        sizer.record_depth(0.010)
        sizer.record_draft(0.012)
    assert sizer.depth_s > 0.008 and sizer.best(CONFIDENCES) <= before


def test_drafts_are_weighed_against_the_chain_alone_on_the_same_steps():
    """Where a lookup chain hangs below every step, a drafted step is weighed against what the
    chain alone would have earned on that same step (`record_chain_alone`), not against the
    undrafted steps of other stretches: a copy-heavy stretch earlier (undrafted steps of 6 tokens)
    no longer keeps the head resting where its drafts beat the chain, and drafts that a chain
    alone would have matched for less are not kept up."""
    def sizer_after_copying() -> TreeSizer:
        sizer = TreeSizer(FLAT, 63, draft_s=0.002, timed=True)
        sizer.begin()
        for _ in range(30):  # undrafted steps while the answer copies its prompt
            if sizer.should_draft():
                sizer.choose(CONFIDENCES)
                sizer.record_draft(0.002)
            sizer.record_step(0.031)
            sizer.record_accepted(5)
        return sizer

    def drafting(sizer: TreeSizer, accepted: int, chain_nodes: int, chain_right: int, steps: int = 60) -> int:
        drafted = 0
        for _ in range(steps):
            if sizer.should_draft():
                drafted += 1
                sizer.choose(CONFIDENCES)
                sizer.record_draft(0.002)
                sizer.record_step(0.033)
                sizer.record_chain_alone(chain_nodes, chain_right)
                sizer.record_accepted(accepted)
            else:
                sizer.record_step(0.030)
                sizer.record_accepted(0)
        return drafted

    # the copying is over: drafts accept 2 tokens, the chain alone would have got none
    paying = sizer_after_copying()
    assert drafting(paying, accepted=2, chain_nodes=1, chain_right=0) > 50
    assert paying.chain_rate < paying.spec_rate < paying.rest_rate and not paying.resting  # the old bar: rest
    # the chain alone would have got the same 2 tokens with 2 nodes and no draft: rest
    matched = sizer_after_copying()
    assert drafting(matched, accepted=2, chain_nodes=2, chain_right=2) < 15
    assert matched.resting and matched.chain_rate > matched.spec_rate
