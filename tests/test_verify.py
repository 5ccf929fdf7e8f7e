import pytest
import torch

from eaglespec.tree import make_tree
from eaglespec.verify import SampleNoise, SamplingParams, choose, process_logits, sample_next, verify


def one_hot_logits(choices: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.full((len(choices), vocab), -5.0)
    logits[torch.arange(len(choices)), torch.tensor(choices)] = 5.0
    return logits


def test_greedy_accepts_longest_agreeing_path():
    # root -> 3 (node 1), 4 (node 2); node 1 -> 5 (node 3); node 2 -> 6 (node 4)
    tree = make_tree(torch.tensor([9, 3, 4, 5, 6]), torch.tensor([-1, 0, 0, 1, 2]))
    # the target picks 4 after the root, 6 after node 2, then 8
    v = verify(tree, one_hot_logits([4, 0, 6, 0, 8]), SamplingParams())
    assert v.nodes.tolist() == [0, 2, 4]
    assert v.tokens.tolist() == [4, 6, 8]  # two accepted guesses and the bonus token


def test_greedy_rejects_everything():
    tree = make_tree(torch.tensor([9, 3, 4]), torch.tensor([-1, 0, 0]))
    v = verify(tree, one_hot_logits([7, 0, 0]), SamplingParams())
    assert v.nodes.tolist() == [0]
    assert v.tokens.tolist() == [7]  # the target's own token


def test_process_logits_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = process_logits(logits, SamplingParams(1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and p[0, :2].sum().item() == pytest.approx(1.0)
    full = torch.softmax(logits, -1)[0]
    p = process_logits(logits, SamplingParams(1.0, top_p=0.8))
    kept = int((p[0] > 0).sum())
    # the smallest prefix of sorted tokens whose mass reaches 0.8
    assert full[: kept - 1].sum() < 0.8 <= full[:kept].sum()
    p = process_logits(logits, SamplingParams(0.5))
    torch.testing.assert_close(p, torch.softmax(logits / 0.5, -1))


@pytest.mark.parametrize("scale", [8.0, 1.0, 0.05])  # peaked; a nucleus past the first 64; nearly flat
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.995])
def test_the_nucleus_is_the_smallest_sorted_prefix_that_reaches_top_p(scale, top_p):
    """Rows of a tree at once; the search widens past its first 64 tokens where it must. Logits
    spaced apart (a shuffled ramp) leave no tie at the edge, so the set is exactly defined."""
    from eaglespec.verify import nucleus

    g = torch.Generator().manual_seed(int(scale * 100 + top_p * 1000))
    vocab = 3000
    logits = torch.stack([torch.linspace(0, 10, vocab)[torch.randperm(vocab, generator=g)] * scale for _ in range(3)])
    probs = logits.softmax(-1)
    keep = nucleus(probs, top_p)
    for row in range(3):
        ranked = probs[row].sort(descending=True).values
        k = int(keep[row].sum())
        assert ranked[: k - 1].sum() < top_p <= ranked[:k].sum() + 1e-6
        assert torch.equal(keep[row], probs[row] >= ranked[k - 1])  # the top k, no other
    if scale == 0.05:
        assert (keep.sum(-1) > 64).all()  # the search had to widen


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)])
def test_bad_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_first_token_follows_p_whatever_the_guesses():
    """The token emitted right after the root is distributed as p(root), exactly, for any set of
    guessed children (including a low-probability one and a duplicate-free top set), and it is the
    token plain sampling with the same seed would choose."""
    torch.manual_seed(0)
    vocab = 6
    logits = torch.randn(5, vocab) * 1.5
    params = SamplingParams(1.0)
    p = process_logits(logits[0], params)
    tree = make_tree(torch.tensor([0, int(p.argmax()), int(p.argmin()), 2, 1]), torch.tensor([-1, 0, 0, 1, 2]))
    n = 20000
    counts = torch.zeros(vocab)
    for seed in range(n):
        noise = SampleNoise(seed)
        v = verify(tree, logits, params, noise, position=11)
        assert int(v.tokens[0]) == int(sample_next(logits[0], params, SampleNoise(seed), position=11))
        counts[v.tokens[0]] += 1
    freq = counts / n
    # 5 standard errors of a binomial proportion
    tol = 5 * torch.sqrt(p * (1 - p) / n) + 1e-3
    assert ((freq - p).abs() <= tol).all(), (freq, p)


def test_noise_depends_on_seed_and_position_alone():
    a, b = SampleNoise(3), SampleNoise(3)
    first = a.at(7)
    b.at(9), b.at(2)  # other positions first, in another order
    assert torch.equal(b.at(7), first)
    assert not torch.equal(a.at(8), first)
    assert not torch.equal(SampleNoise(4).at(7), first)
    draws = SampleNoise(0).span(0, 4000)
    assert 0 <= float(draws.min()) and float(draws.max()) < 1
    # uniform: each tenth of [0, 1) holds a tenth of the draws, within 5 standard errors
    counts = torch.histc(draws, bins=10, min=0, max=1)
    assert ((counts - 400).abs() <= 5 * (4000 * 0.1 * 0.9) ** 0.5).all(), counts


def test_choose_takes_the_token_whose_interval_holds_u_and_never_a_filtered_one():
    p = torch.tensor([0.0, 0.5, 0.0, 0.5])
    picks = {u: int(choose(p, torch.tensor(u, dtype=torch.float64))) for u in (0.0, 0.25, 0.5 - 1e-12, 0.5, 0.9,
                                                                                 1 - 2.0**-53)}
    assert picks == {0.0: 1, 0.25: 1, 0.5 - 1e-12: 1, 0.5: 3, 0.9: 3, 1 - 2.0**-53: 3}
    rows = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    assert choose(rows, torch.tensor([0.1, 0.95], dtype=torch.float64)).tolist() == [0, 1]  # row by row


def test_sampling_verifier_needs_noise():
    tree = make_tree(torch.tensor([9, 3]), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="SampleNoise"):
        verify(tree, one_hot_logits([3, 0]), SamplingParams(1.0))
