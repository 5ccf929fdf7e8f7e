import dataclasses

import pytest
import torch
from helpers import tiny_target

from eaglespec.tree import MC_SIM_7B_63, graft_chain, make_tree, select_dynamic, static_plan, static_shape


def test_small_tree_by_hand():
    # root -> a(1), b(2); a -> c(3); c -> d(4)
    tree = make_tree(torch.tensor([10, 11, 12, 13, 14]), torch.tensor([-1, 0, 0, 1, 3]))
    assert tree.depths.tolist() == [0, 1, 1, 2, 3]
    assert tree.mask.int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],
        [1, 1, 0, 1, 0],
        [1, 1, 0, 1, 1],
    ]
    assert sorted(tree.retrieve.tolist()) == [[0, 1, 3, 4], [0, 2, -1, -1]]


def test_static_shape_from_paths():
    shape = static_shape([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    # nodes sorted by (depth, path): root, [0], [1], [0,0], [0,1], [1,0], [0,0,0]
    assert shape.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert shape.ranks.tolist() == [0, 0, 1, 0, 1, 0, 0]
    assert shape.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert shape.topk == (2, 2, 1)
    assert [lv.tolist() for lv in shape.levels] == [[1, 2], [3, 4, 5], [6]]


def test_static_plan_by_hand():
    """The docstring's example: which nodes the head runs at each depth, the tree slots they see,
    and which output each child is drafted from."""
    plan = static_plan([[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    assert plan.size == 6 and plan.slots == 2  # run nodes 1 and 3 take tree slots 0 and 1
    assert plan.template.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert plan.template.mask.equal(make_tree(torch.zeros(6, dtype=torch.long), plan.template.parents).mask)
    want = [  # children, ranks, k, run, rows, feat_rows, row_of_parent
        ([1, 2], [0, 1], 2, [], [], [], [0, 0]),
        ([3, 4], [0, 1], 2, [1], [[True, False]], [0], [0, 0]),
        ([5], [0], 1, [3], [[True, True]], [0], [0]),
    ]
    got = [(lv.children.tolist(), lv.ranks.tolist(), lv.k, lv.run.tolist(), lv.rows.tolist(), lv.feat_rows.tolist(),
            lv.row_of_parent.tolist()) for lv in plan.levels]
    assert got == want
    assert plan.levels[0].rows.shape == (0, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.slots = 3


def test_static_plan_of_the_eagle_preset_sees_exactly_its_ancestors():
    """Oracle: every run node sees the tree slots of its ancestors (root excluded) and itself, and
    every child is drafted from its parent's output."""
    plan = static_plan(MC_SIM_7B_63)
    parents = plan.template.parents.tolist()
    slot_of = {}
    for lv in plan.levels[1:]:
        for node in lv.run.tolist():
            slot_of[node] = len(slot_of)
    assert plan.slots == len(slot_of)
    for d, lv in enumerate(plan.levels, start=1):
        run = lv.run.tolist()
        for r, node in enumerate(run):
            chain, n = set(), node
            while n > 0:
                chain.add(slot_of[n])
                n = parents[n]
            assert set(lv.rows[r].nonzero().squeeze(1).tolist()) == chain
        for c, row in zip(lv.children.tolist(), lv.row_of_parent.tolist()):
            assert (parents[c] == 0) if d == 1 else (run[row] == parents[c])


# A draft model as two tables: `step` outputs the token it was fed, `logprobs` looks up that
# token's next-token distribution (the root's output is 0). Draft ids 0..3 are target ids 10..13.
NEXT = {0: [0.5, 0.3, 0.1, 0.1], 10: [0.8, 0.1, 0.06, 0.04], 11: [0.1, 0.2, 0.6, 0.1],
        12: [0.05, 0.1, 0.15, 0.7], 13: [0.25] * 4}
TABLE = torch.tensor([NEXT.get(i, [0.25] * 4) for i in range(14)]).log()
VOCAB_IDS = torch.arange(10, 14)


def fake_model():
    calls = []

    def step(feats, tokens, depth, rows):
        calls.append((depth, tokens.tolist(), rows.int().tolist()))
        return tokens.float()[:, None]

    def logprobs(hidden):
        return TABLE[hidden[:, 0].long()]

    return step, logprobs, calls


def test_dynamic_expansion_by_hand():
    """top_k 2, depth 3: candidates 10 (.5), 11 (.3); 10-10 (.4), 10-11 (.05), 11-12 (.18),
    11-11 (.06); from the best two, 10-10 and 11-12: 10-10-10 (.32), 10-10-11 (.04), 11-12-13
    (.126), 11-12-12 (.027). Five kept: .5, .4, .32, .3, .18."""
    from eaglespec.drafter import TreeConfig
    from eaglespec.expand import expand_dynamic

    step, logprobs, calls = fake_model()
    root, h_root = torch.tensor([7]), torch.zeros(1)
    tree, stopped = expand_dynamic(TreeConfig(top_k=2, depth=3, total_tokens=6), root, h_root, step, logprobs,
                                   VOCAB_IDS)
    assert tree.tokens.tolist() == [7, 10, 11, 10, 12, 10] and not stopped
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2, 3]
    # depth 1 runs both root children in slots 0, 1; depth 2 the best two grandchildren in slots 2, 3
    assert calls == [(1, [10, 11], [[1, 0, 0, 0], [0, 1, 0, 0]]), (2, [10, 12], [[1, 0, 1, 0], [0, 1, 0, 1]])]
    floored, _ = expand_dynamic(TreeConfig(top_k=2, depth=3, total_tokens=6, min_prob=0.2), root, h_root,
                                *fake_model()[:2], VOCAB_IDS)
    assert floored.tokens.tolist() == [7, 10, 11, 10, 10] and floored.parents.tolist() == [-1, 0, 0, 1, 3]
    # keeping two (.5, .4), depth 3 cannot change the tree: with stop_early it is not drafted
    small = TreeConfig(top_k=2, depth=3, total_tokens=3)
    step, logprobs, calls = fake_model()
    early, stopped = expand_dynamic(small, root, h_root, step, logprobs, VOCAB_IDS, stop_early=True)
    full, _ = expand_dynamic(small, root, h_root, *fake_model()[:2], VOCAB_IDS)
    assert stopped and len(calls) == 1
    assert early.tokens.tolist() == full.tokens.tolist() == [7, 10, 10]


def test_static_expansion_by_hand():
    from eaglespec.expand import expand_static

    step, logprobs, calls = fake_model()
    plan = static_plan([[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    tree = expand_static(plan, torch.tensor([7]), torch.zeros(1), step, logprobs, VOCAB_IDS)
    # root's top two 10, 11; node 1 (10) drafts 10, 11; node 3 (10) drafts 10
    assert tree.tokens.tolist() == [7, 10, 11, 10, 11, 10]
    assert calls == [(1, [10], [[1, 0]]), (2, [10], [[1, 1]])]


def test_eagle_preset_shape():
    shape = static_shape(MC_SIM_7B_63)
    assert shape.size == 26 and shape.max_depth == 5
    tree = make_tree(torch.zeros(shape.size, dtype=torch.long), shape.parents)
    assert tree.retrieve.shape == (len([p for p in MC_SIM_7B_63 if not any(
        len(q) == len(p) + 1 and tuple(q[:-1]) == tuple(p) for q in MC_SIM_7B_63)]), 6)


@pytest.mark.parametrize("paths", [[[0, 0]], [[-1]], []])
def test_static_shape_rejects_bad_paths(paths):
    with pytest.raises(ValueError):
        static_shape(paths)


def test_select_dynamic_keeps_parents_and_best_scores():
    # candidates in creation order; parents index candidates, -1 = root
    scores = torch.tensor([-0.1, -1.0, -0.3, -2.0, -0.2, -0.5])
    parents = torch.tensor([-1, -1, 0, 1, 0, 4])
    tokens = torch.tensor([5, 6, 7, 8, 9, 4])
    tree, kept = select_dynamic(scores, parents, tokens, total_tokens=5, max_depth=3)
    # best four: 0 (-0.1), 4 (-0.2), 2 (-0.3), 5 (-0.5); kept in creation order
    assert kept.tolist() == [0, 2, 4, 5]
    assert tree.tokens[1:].tolist() == [5, 7, 9, 4]
    assert tree.parents.tolist() == [-1, 0, 1, 1, 3]
    assert tree.depths.tolist() == [0, 1, 2, 2, 3]


def test_select_dynamic_floor_drops_unlikely_guesses_but_keeps_the_best():
    scores = torch.tensor([-0.1, -1.0, -0.3, -2.0, -0.2, -0.5])
    parents = torch.tensor([-1, -1, 0, 1, 0, 4])
    tokens = torch.tensor([5, 6, 7, 8, 9, 4])
    tree, kept = select_dynamic(scores, parents, tokens, total_tokens=6, max_depth=3, min_score=-0.4)
    assert kept.tolist() == [0, 2, 4]  # -0.5, -1.0 and -2.0 fall below the floor
    assert tree.parents.tolist() == [-1, 0, 1, 1]
    _, kept = select_dynamic(scores, parents, tokens, total_tokens=3, max_depth=3, min_score=-0.4)
    assert kept.tolist() == [0, 4]  # the node budget still binds
    _, kept = select_dynamic(scores, parents, tokens, total_tokens=6, max_depth=3, min_score=-0.01)
    assert kept.tolist() == [0]  # nothing passes: the best guess is verified anyway


def test_dynamic_tree_floor_shrinks_unsure_steps():
    """With min_prob, a step verifies only guesses the draft is sure enough of: a random head is
    unsure, so its tree keeps fewer nodes than total_tokens."""
    from helpers import random_head, tiny_target

    from eaglespec.drafter import EagleDrafter, TreeConfig

    target = tiny_target("llama")
    head = random_head(target)
    ids = torch.randint(2, target.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    sizes = {}
    for floor in (0.0, 0.2):
        d = EagleDrafter.from_head(head, target, TreeConfig(top_k=3, depth=4, total_tokens=10, min_prob=floor))
        d.stop_early = False
        out = target.prefill(ids)
        d.begin()
        d.observe(torch.cat([ids[1:], ids[-1:]]), out.features)
        sizes[floor] = d.propose(ids[-1:]).tokens.shape[0]
    assert sizes[0.0] == 10 and 2 <= sizes[0.2] < 10
    with pytest.raises(ValueError, match="min_prob"):
        TreeConfig(min_prob=1.0)


def test_select_dynamic_ties_keep_parent():
    # child has the same score as its parent (log-prob 0): the parent must still come first
    scores = torch.tensor([-1.0, -1.0, -1.0])
    parents = torch.tensor([-1, 0, 1])
    tree, kept = select_dynamic(scores, parents, torch.tensor([1, 2, 3]), total_tokens=3, max_depth=3)
    assert kept.tolist() == [0, 1]
    assert tree.parents.tolist() == [-1, 0, 1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tree_attention_equals_causal_on_each_branch(arch):
    """Oracle: the logits of every node under the tree mask equal those of running the prefix
    plus that node's root-to-node branch as a plain causal sequence."""
    target = tiny_target(arch)
    prefix = torch.tensor([3, 17, 42, 8, 11])
    tree = make_tree(torch.tensor([20, 21, 22, 23, 24, 25, 26]), torch.tensor([-1, 0, 0, 1, 1, 2, 4]))
    target.prefill(prefix)
    got = target.forward(tree.tokens, target.cache.length + tree.depths, tree.mask).logits
    for node in range(tree.size):
        branch = tree.mask[node].nonzero().squeeze(1)  # ancestors in depth order, then the node
        seq = torch.cat([prefix, tree.tokens[branch]])
        target.reset()
        want = target.forward(seq).logits[-1]
        torch.testing.assert_close(got[node], want, rtol=1e-4, atol=1e-4)
        target.prefill(prefix)
        target.forward(tree.tokens, target.cache.length + tree.depths, tree.mask)


def test_graft_chain_follows_matches_then_appends():
    # root(10) -> a(11), b(12); a -> c(13)
    tree = make_tree(torch.tensor([10, 11, 12, 13]), torch.tensor([-1, 0, 0, 1]))
    merged = graft_chain(tree, [11, 13, 14, 15])  # a, c match; 14, 15 hang below c
    assert merged.tokens.tolist() == [10, 11, 12, 13, 14, 15]
    assert merged.parents.tolist() == [-1, 0, 0, 1, 3, 4]
    assert merged.depths.tolist() == [0, 1, 1, 2, 3, 4]
    assert merged.retrieve.tolist() == [[0, 2, -1, -1, -1], [0, 1, 3, 4, 5]]
    assert merged.mask[5].tolist() == [True, True, False, True, True, True]
    diverging = graft_chain(tree, [12, 16])  # b matches, 16 is new below b
    assert diverging.parents.tolist() == [-1, 0, 0, 1, 2]
    assert graft_chain(tree, [11, 13]) is tree  # nothing new
    assert graft_chain(tree, []) is tree
    fresh = graft_chain(tree, [17])  # a new sibling of a and b
    assert fresh.parents.tolist() == [-1, 0, 0, 1, 0] and fresh.tokens.tolist()[-1] == 17


def test_dynamic_drafting_stops_early_only_when_the_tree_cannot_change():
    """Skipping depths whose nodes cannot enter the kept set must give the very same trees."""
    import torch
    from helpers import oracle_head, random_head, tiny_target

    from eaglespec.drafter import EagleDrafter, TreeConfig

    target = tiny_target("llama", copyable=True, logit_scale=30.0)
    g = torch.Generator().manual_seed(5)
    fired = 0
    for head in (random_head(target), oracle_head(target, noise=0.3)):
        for tree_cfg in (TreeConfig(), TreeConfig(top_k=3, depth=6, total_tokens=8),
                         TreeConfig(top_k=3, depth=6, total_tokens=16, min_prob=0.05)):
            drafters = [EagleDrafter.from_head(head, target, tree_cfg) for _ in range(2)]
            drafters[1].stop_early = False
            for _ in range(12):
                ids = torch.randint(2, target.vocab_size, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g)
                out = target.prefill(ids)
                trees = []
                for d in drafters:
                    d.begin()
                    d.observe(torch.cat([ids[1:], ids[-1:]]), out.features)
                    trees.append(d.propose(ids[-1:]))
                a, b = trees
                assert torch.equal(a.tokens, b.tokens) and torch.equal(a.parents, b.parents)
                assert torch.equal(a.mask, b.mask) and torch.equal(a.retrieve, b.retrieve)
            fired += drafters[0].early_stops
            assert drafters[1].early_stops == 0
    assert fired > 0  # the shortcut was taken, so the equality above tested it



def random_tree_parents(n: int, gen: torch.Generator) -> torch.Tensor:
    """Parents of a random topologically ordered tree of n nodes."""
    return torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)])


@pytest.mark.parametrize("seed", range(6))
def test_host_and_vectorised_trees_agree(seed):
    """CPU trees are built, selected and walked in Python lists; GPU ones in tensor operations.
    Both must give the same tensors and the same verdicts, ties included."""
    from eaglespec.tree import select_on_host, select_vectorised, tree_on_host, tree_vectorised
    from eaglespec.verify import accept_on_host, accept_vectorised

    gen = torch.Generator().manual_seed(seed)
    for n in (2, 5, 17, 30):
        parents = random_tree_parents(n, gen)
        tokens = torch.randint(0, 4, (n,), generator=gen)  # few distinct tokens: siblings repeat, paths tie
        for max_depth in (None, n):
            host, vec = tree_on_host(tokens, parents, max_depth), tree_vectorised(tokens, parents, max_depth or n)
            assert torch.equal(host.mask, vec.mask) and torch.equal(host.depths, vec.depths)
            width = host.retrieve.shape[1]  # the vectorised one pads to max_depth + 1 columns
            assert torch.equal(host.retrieve, vec.retrieve[:, :width]) and (vec.retrieve[:, width:] == -1).all()
        for _ in range(20):
            choice = torch.randint(0, 4, (n,), generator=gen)
            a, b = accept_on_host(host, choice), accept_vectorised(host, choice)
            assert a.nodes.tolist() == b.nodes.tolist() and a.tokens.tolist() == b.tokens.tolist()
    # candidates as a dynamic expansion makes them: children score at most their parent, ties common
    parents = random_tree_parents(40, gen)[1:] - 1  # candidate c's parent, -1 = the root
    scores = torch.zeros(39)
    for c in range(39):
        step = -torch.randint(0, 3, (1,), generator=gen).float() * 0.5
        scores[c] = (scores[parents[c]] if parents[c] >= 0 else 0.0) + step
    tokens = torch.randint(0, 100, (39,), generator=gen)
    for total, floor, size in ((8, None, None), (40, -1.0, None), (16, None, lambda v: 3), (16, None, lambda v: 0)):
        (t1, k1), (t2, k2) = (f(scores, parents, tokens, total, 40, floor, size) for f in (select_on_host, select_vectorised))
        assert k1.tolist() == k2.tolist() and t1.tokens.tolist() == t2.tokens.tolist()
        assert t1.parents.tolist() == t2.parents.tolist() and torch.equal(t1.mask, t2.mask)
