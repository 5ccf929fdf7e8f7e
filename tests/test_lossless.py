"""Speculative decoding must emit exactly what the target would: token for token when greedy, the
target's own distribution when sampling."""

import math

import pytest
import torch
from helpers import oracle_head, random_head, tiny_target

import eaglespec.generate as generate_module
from eaglespec.drafter import Drafter, EagleDrafter, TreeConfig
from eaglespec.generate import GenerationConfig, Generator
from eaglespec.head_runner import HeadRunner
from eaglespec.cost import CostCurve, TreeSizer
from eaglespec.lookup import HybridDrafter, PromptLookupDrafter, WeighedLookupDrafter
from eaglespec.verify import SamplingParams, Verdict, choose, process_logits

N_PROMPTS, NEW_TOKENS = 20, 64


def run(gen: Generator, prompt: torch.Tensor, cfg: GenerationConfig) -> list[int]:
    return [t for chunk in gen.generate_ids(prompt, cfg) for t in chunk]


def prompts(vocab: int, n: int = N_PROMPTS, seed: int = 1234) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (int(torch.randint(3, 24, (1,), generator=g)),), generator=g) for _ in range(n)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request):
    """A copyable, sharp tiny target of each architecture, and its plain greedy outputs."""
    target = tiny_target(request.param, copyable=True, logit_scale=30.0)
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ps = prompts(target.vocab_size)
    plain = Generator(target)
    return target, cfg, ps, [run(plain, p, cfg) for p in ps]


def two_layer_head(target):
    """The nudged oracle grown to two layers, the second small but not zero: long acceptances
    that run through both layers' draft caches."""
    from eaglespec.train.trainer import grow_head

    head = grow_head(oracle_head(target, noise=0.2), 2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in head.layers[1].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return head.eval()


TREES = {"static": TreeConfig(kind="static"), "dynamic": TreeConfig(kind="dynamic"),
         # a confidence floor: the number of nodes verified changes from step to step
         "floored": TreeConfig(kind="dynamic", top_k=4, depth=8, total_tokens=20, min_prob=0.1)}


@pytest.mark.parametrize("kind", list(TREES))
@pytest.mark.parametrize("head_kind", ["random", "nudged", "two_layer"])
def test_greedy_is_token_identical(setup, kind, head_kind):
    target, cfg, ps, expected = setup
    head = {"random": random_head, "nudged": lambda t: oracle_head(t, noise=0.2), "two_layer": two_layer_head}[head_kind](target)
    spec = Generator(target, EagleDrafter.from_head(head, target, TREES[kind]))
    taus = []
    for p, want in zip(ps, expected):
        got = run(spec, p, cfg)
        assert got == want
        taus.append(spec.last_stats.mean_accept_len)
    tau = sum(taus) / len(taus)
    if head_kind == "random":
        assert tau < 1.5  # mostly rejections: the rejection paths were exercised
    else:
        assert tau > 2.5  # long acceptances: compaction over multi-token paths was exercised


def test_a_head_reading_a_prompts_last_features_alone_stays_lossless_and_pairs_them(setup):
    """`prompt_features`: the target returns the features of a prompt's last m positions, and the
    drafter pairs each with the token after it (the head's cache then starts m positions before
    the root). Plain decoding asks for none."""
    target, cfg, ps, expected = setup

    class Windowed(EagleDrafter):
        prompt_features = 3

    drafter = Windowed.from_head(oracle_head(target, noise=0.2), target, TREES["dynamic"])
    seen = []
    commit = drafter.runner.commit
    drafter.runner.commit = lambda tokens, features: seen.append((tokens.shape[0], features.shape[0])) or commit(
        tokens, features)
    spec = Generator(target, drafter)
    for p, want in zip(ps[:6], expected):
        seen.clear()
        assert run(spec, p, cfg) == want
        assert seen[0] == (3, 3)  # the first commit: the prompt's last 3 pairs, not len(p)
    assert Generator(target).drafter.prompt_features == 0
    assert target.prefill(ps[0], feature_rows=0).features.shape[0] == 0


def test_a_resting_head_asks_for_a_prompts_last_features_alone(setup):
    """While drafted steps pay less than plain decoding (the sizer rests), a prompt's hidden
    states would mostly go unread: the drafter, and a hybrid around it, ask for the last few."""
    from eaglespec.cost import CostCurve, TreeSizer
    from eaglespec.drafter import RESTING_PROMPT_FEATURES

    target = setup[0]
    sizer = TreeSizer(CostCurve((1, 2, 4), (0.010, 0.012, 0.020)), max_nodes=8)
    tree = TreeConfig(kind="dynamic", sizing="cost", total_tokens=9)
    drafter = EagleDrafter(EagleDrafter.from_head(random_head(target), target).runner, tree, sizer=sizer)
    hybrid = HybridDrafter(drafter, PromptLookupDrafter())
    assert drafter.prompt_features is None and hybrid.prompt_features is None  # nothing measured yet
    sizer.spec_rate = 0.5 * sizer.plain_rate
    assert drafter.prompt_features == hybrid.prompt_features == RESTING_PROMPT_FEATURES
    sizer.spec_rate = 2.0 * sizer.plain_rate
    assert drafter.prompt_features is None


def test_a_head_reads_a_window_of_the_prompt_only_where_its_hidden_states_cost_logits(setup, monkeypatch):
    """On llama.cpp each prompt position a head of the last hidden state reads costs a row of LM
    head: such a head reads the prompt's last `PROMPT_WINDOW` positions (fewer while resting). A
    target whose hidden states come free, or a head of layer inputs, reads them all."""
    from helpers import random_eagle3_head

    from eaglespec.cost import CostCurve, TreeSizer
    from eaglespec.drafter import PROMPT_WINDOW, RESTING_PROMPT_FEATURES

    target = setup[0]
    assert EagleDrafter.from_head(random_head(target), target).prompt_features is None
    monkeypatch.setattr(target, "prompt_hidden_costs_logits", True, raising=False)
    drafter = EagleDrafter.from_head(random_head(target), target)
    assert drafter.prompt_window == drafter.prompt_features == PROMPT_WINDOW
    assert HybridDrafter(drafter, PromptLookupDrafter()).prompt_features == PROMPT_WINDOW
    deep = tiny_target(layers=6)  # EAGLE-3 reads three of >= 6 layers
    monkeypatch.setattr(deep, "prompt_hidden_costs_logits", True, raising=False)
    eagle3 = EagleDrafter.from_head(random_eagle3_head(deep), deep)
    assert eagle3.feature_layers is not None and eagle3.prompt_features is None

    sizer = TreeSizer(CostCurve((1, 2, 4), (0.010, 0.012, 0.020)), max_nodes=8)
    tree = TreeConfig(kind="dynamic", sizing="cost", total_tokens=9)
    resting = EagleDrafter(drafter.runner, tree, sizer=sizer, prompt_window=PROMPT_WINDOW)
    sizer.spec_rate = 0.5 * sizer.plain_rate
    assert resting.prompt_features == RESTING_PROMPT_FEATURES
    assert EagleDrafter(drafter.runner, tree, sizer=sizer, prompt_window=8).prompt_features == 8
    with pytest.raises(ValueError, match="prompt_window"):
        EagleDrafter(drafter.runner, tree, sizer=sizer, prompt_window=0)


@pytest.mark.parametrize("exact_rows", [None, 3])
def test_sliding_window_layers_keep_their_window_in_trees(exact_rows):
    """Gemma 3 style: a layer that sees only the last 4 positions. A tree forward must give each
    node that layer's window, relative to the node's own position, not the whole prefix; prompts
    and answers run well past the window. exact_rows=3 verifies trees in blocks of 3 nodes."""
    target = tiny_target("gemma3", logit_scale=30.0)
    target.exact_rows = exact_rows
    cfg = GenerationConfig(max_new_tokens=32, ignore_eos=True)
    plain = Generator(target)
    spec = Generator(target, EagleDrafter.from_head(random_head(target), target, TREES["dynamic"]))
    for p in prompts(target.vocab_size, n=6):
        assert run(spec, p, cfg) == run(plain, p, cfg)


class BigramRunner(HeadRunner):
    """Not EAGLE: it guesses from the target's next-token distribution after the last token alone,
    ignoring the features. The HeadRunner interface is all it takes to drive EagleDrafter."""

    def __init__(self, target) -> None:
        logits = []
        for t in range(target.vocab_size):
            target.reset()
            logits.append(target.forward(torch.tensor([t])).logits[-1])
        self.table = torch.stack(logits).log_softmax(-1)  # [V, V]
        self.vocab_ids = torch.arange(target.vocab_size)
        self.slots = None

    def allocate(self, tree_slots: int) -> None:
        self.slots = tree_slots

    def reset(self) -> None:
        pass

    def commit(self, tokens, features):
        assert features.shape[0] == tokens.shape[0]
        return tokens[-1:].float()  # [D = 1]: the root token stands for its own state

    def step(self, feats, tokens, depth, rows):
        assert rows.shape == (tokens.shape[0], self.slots) and depth >= 1
        return tokens.float()[:, None]

    def logprobs(self, hidden):
        return self.table[hidden[:, 0].long()]


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_another_head_runner_drives_the_same_drafter(setup, kind):
    target, cfg, ps, expected = setup
    spec = Generator(target, EagleDrafter(BigramRunner(target), TREES[kind]))
    accepted = []
    for p, want in zip(ps[:8], expected):
        assert run(spec, p, cfg) == want
        accepted += spec.last_stats.accept_lengths
    assert max(accepted) > 1  # the guesses were used


def test_greedy_stops_at_eos_like_plain():
    target = tiny_target("llama", copyable=True, logit_scale=30.0)
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS)  # eos id 1 is live here
    plain = Generator(target)
    spec = Generator(target, EagleDrafter.from_head(oracle_head(target, 0.2), target, TreeConfig(kind="dynamic")))
    hits = 0
    for eos in range(2, 12):  # make some token an EOS so that sequences do end early
        target.model.generation_config.eos_token_id = eos
        for p in prompts(target.vocab_size, n=4, seed=eos):
            want, got = run(plain, p, cfg), run(spec, p, cfg)
            assert got == want
            hits += want[-1] == eos
    assert hits > 0


# -- sampling ---------------------------------------------------------------------------------

# 1,000 draws: the t1, t0.7-p0.9 and k5 statistics came to 0.43-0.55 of the 1e-4 critical value,
# the biased verifier's to over 100 times it (2,000 draws doubled the time for no more verdicts).
# Token-for-token equality with plain sampling under the same seed
# (test_sampled_text_equals_plain_sampling_with_the_seed) checks every drafter exactly besides.
VOCAB, DRAWS = 12, 1000


def exact_joint(target, prompt: torch.Tensor, params: SamplingParams) -> dict[tuple, float]:
    """P(first three tokens) under plain sampling from the processed target distribution."""
    def dist(seq):
        target.reset()
        return process_logits(target.forward(seq).logits[-1], params)

    joint = {}
    p1 = dist(prompt)
    for a in range(VOCAB):
        if p1[a] == 0:
            continue
        p2 = dist(torch.cat([prompt, torch.tensor([a])]))
        for b in range(VOCAB):
            if p2[b] == 0:
                continue
            p3 = dist(torch.cat([prompt, torch.tensor([a, b])]))
            for c in range(VOCAB):
                if p3[c] > 0:
                    joint[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    return joint


def chi_square_excess(samples: list[tuple], joint: dict[tuple, float]) -> tuple[float, float]:
    """(statistic, critical value at p = 1e-4). Outcomes expected fewer than 5 times are pooled;
    an outcome of probability 0 that shows up makes the statistic infinite."""
    n = len(samples)
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    if any(s not in joint for s in counts):
        return math.inf, 0.0
    big = [o for o, p in joint.items() if p * n >= 5]
    stat, pooled_e, pooled_o = 0.0, 0.0, 0
    for o in joint:
        e = joint[o] * n
        if o in big:
            stat += (counts.get(o, 0) - e) ** 2 / e
        else:
            pooled_e += e
            pooled_o += counts.get(o, 0)
    df = len(big) - 1
    if pooled_e > 0:
        stat += (pooled_o - pooled_e) ** 2 / pooled_e
        df += 1
    z = 3.719  # one-sided normal quantile for 1e-4; Wilson-Hilferty chi-square quantile
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


@pytest.fixture(scope="module")
def sampling_setup():
    target = tiny_target("llama", copyable=True, logit_scale=12.0, vocab=VOCAB, seed=3)
    head = oracle_head(target, noise=0.3)
    return target, head, torch.tensor([2, 7, 4, 9])


def draw(target, head, prompt, params: SamplingParams, kind: str = "dynamic", drafter=None) -> list[tuple]:
    tree = TreeConfig(kind=kind, top_k=3, depth=3, total_tokens=8)
    spec = Generator(target, drafter or EagleDrafter.from_head(head, target, tree))
    cfg = dict(max_new_tokens=3, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
               ignore_eos=True)
    out, accepted_multi = [], 0
    for seed in range(DRAWS):
        toks = run(spec, prompt, GenerationConfig(seed=seed, **cfg))
        out.append(tuple(toks))
        accepted_multi += spec.last_stats.target_forwards < 3
    assert accepted_multi > DRAWS // 10, "the draft was (almost) never accepted: the test would be vacuous"
    return out


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_p=0.9), SamplingParams(1.0, top_k=5)],
                         ids=["t1", "t0.7-p0.9", "k5"])
def test_sampling_matches_target_distribution(sampling_setup, params):
    target, head, prompt = sampling_setup
    joint = exact_joint(target, prompt, params)
    assert abs(sum(joint.values()) - 1) < 1e-4
    stat, crit = chi_square_excess(draw(target, head, prompt, params), joint)
    assert stat < crit, f"chi-square {stat:.1f} exceeds the 1e-4 critical value {crit:.1f}"


def test_sampling_with_a_confidence_floor_matches_target_distribution(sampling_setup):
    target, head, prompt = sampling_setup
    params = SamplingParams(1.0)
    drafter = EagleDrafter.from_head(head, target, TreeConfig(top_k=3, depth=3, total_tokens=8, min_prob=0.2))
    stat, crit = chi_square_excess(draw(target, head, prompt, params, drafter=drafter), exact_joint(target, prompt, params))
    assert stat < crit, f"chi-square {stat:.1f} exceeds the 1e-4 critical value {crit:.1f}"


def test_sampling_check_catches_a_biased_verifier(sampling_setup, monkeypatch):
    """Negative control: a verifier that accepts the top draft child without the rejection test
    (a classic bug) must fail the same check."""
    target, head, prompt = sampling_setup
    params = SamplingParams(1.0)

    def accept_first_children(tree, logits, params, noise=None, position=0):
        p = process_logits(logits, params)
        path, node = [0], 0
        while True:
            kids = (tree.parents == node).nonzero().squeeze(1)
            if kids.numel() == 0:
                break
            node = int(kids[0])
            path.append(node)
        nodes = torch.tensor(path)
        bonus = choose(p[node], noise.at(position + len(path) - 1)).reshape(1)
        return Verdict(nodes=nodes, tokens=torch.cat([tree.tokens[nodes[1:]], bonus]))

    monkeypatch.setattr(generate_module, "verify", accept_first_children)
    joint = exact_joint(target, prompt, params)
    stat, crit = chi_square_excess(draw(target, head, prompt, params), joint)
    assert stat > crit


def test_seeded_sampling_is_deterministic(sampling_setup):
    target, head, prompt = sampling_setup
    spec = Generator(target, EagleDrafter.from_head(head, target, TreeConfig()))
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=42, ignore_eos=True)
    assert run(spec, prompt, cfg) == run(spec, prompt, cfg)
    assert run(spec, prompt, cfg) != run(spec, prompt, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=43, ignore_eos=True))



@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_k=8)],
                         ids=["t1", "t0.7-p0.9", "t1.3-k8"])
def test_sampled_text_equals_plain_sampling_with_the_seed(setup, sampling):
    """A seed fixes each position's sample, so every drafter and tree writes what plain sampling
    writes with that seed, token for token; and the drafts are accepted often enough for that to
    be tested."""
    target, _, ps, _ = setup
    head = oracle_head(target, noise=0.2)
    plain = Generator(target)
    drafters = {name: EagleDrafter.from_head(head, target, tree) for name, tree in TREES.items()}
    drafters["hybrid"] = hybrid(target, head)
    # a model without a head: the weighed chain alone, where rows are cheap (it verifies some)
    drafters["chain"] = WeighedLookupDrafter(PromptLookupDrafter(), TreeSizer(CostCurve((1, 16), (0.03, 0.0345)), 8))
    chain_steps = chain_tokens = 0
    for i, prompt in enumerate(ps[:6]):
        cfg = GenerationConfig(max_new_tokens=32, seed=100 + i, ignore_eos=True, **sampling)
        expected = run(plain, prompt, cfg)
        for name, drafter in drafters.items():
            spec = Generator(target, drafter)
            assert run(spec, prompt, cfg) == expected, (name, i)
            if name == "chain":  # lookup guesses hold less often under sampling: counted over all prompts
                chain_steps += len(spec.last_stats.accept_lengths)
                chain_tokens += sum(spec.last_stats.accept_lengths)
            else:
                assert spec.last_stats.mean_accept_len > 1.2, (name, spec.last_stats.mean_accept_len)
    assert chain_tokens > 1.05 * chain_steps, chain_tokens / chain_steps
    other = run(plain, ps[0], GenerationConfig(max_new_tokens=32, seed=99, ignore_eos=True, **sampling))
    assert other != run(plain, ps[0], GenerationConfig(max_new_tokens=32, seed=100, ignore_eos=True, **sampling))


def test_prompt_lookup_drafter_is_lossless_and_accepts_repeats():
    from eaglespec.lookup import PromptLookupDrafter

    target = tiny_target("llama", copyable=True, logit_scale=30.0)
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    plain, spec = Generator(target), Generator(target, PromptLookupDrafter())
    taus = []
    for p in prompts(target.vocab_size, n=8):
        assert run(spec, p, cfg) == run(plain, p, cfg)
        taus.append(spec.last_stats.mean_accept_len)
    # sharp tiny models fall into loops, which lookup drafting predicts
    assert max(taus) > 1.5


def test_prompt_lookup_finds_latest_match():
    from eaglespec.lookup import PromptLookupDrafter

    d = PromptLookupDrafter(max_ngram=2, num_tokens=3)
    d.observe(torch.tensor([5, 6, 7, 8, 1, 5, 6, 9, 4, 5, 6]), torch.zeros(11, 1))
    tree = d.propose(torch.tensor([6]))
    assert tree.tokens.tolist() == [6, 9, 4, 5]  # after the latest earlier "5 6": 9 4 5
    assert tree.parents.tolist() == [-1, 0, 1, 2]


def scan_guess(h: list[int], max_ngram: int, num_tokens: int) -> list[int]:
    """Prompt lookup by brute force: the latest earlier occurrence of the longest matching tail."""
    for n in range(min(max_ngram, len(h) - 1), 0, -1):
        for start in range(len(h) - n - 1, -1, -1):
            if h[start:start + n] == h[-n:]:
                return h[start + n:start + n + num_tokens]
    return []


def test_prompt_lookups_index_guesses_what_a_scan_of_the_history_finds():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        d = PromptLookupDrafter(max_ngram=3, num_tokens=4)
        d.begin()
        seen: list[int] = []
        for _ in range(40):  # chunks of 1-5 tokens from a small alphabet: many repeats
            chunk = torch.randint(0, 6, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)
            d.observe(chunk, torch.zeros(0, 1))
            seen += chunk.tolist()
            assert d.guess() == scan_guess(seen, 3, 4)


class Sizes(Drafter):
    """Passes every call to `inner`, a real drafter, and keeps the size of each tree it proposes."""

    def __init__(self, inner: Drafter) -> None:
        self.inner, self.sizes = inner, []
        self.max_tree_size = inner.max_tree_size

    def begin(self) -> None:
        self.inner.begin()

    def observe(self, tokens, features) -> None:
        self.inner.observe(tokens, features)

    def propose(self, root):
        tree = self.inner.propose(root)
        self.sizes.append(tree.size)
        return tree


class CountingHybrid(Sizes):
    """The production HybridDrafter, watched from outside: `grafted` counts the proposals where its
    lookup chain added nodes to EAGLE's tree, so a test can show that the chain mattered."""

    def __init__(self, eagle: Drafter, lookup: PromptLookupDrafter) -> None:
        self.eagle = Sizes(eagle)
        super().__init__(HybridDrafter(self.eagle, lookup))

    @property
    def grafted(self) -> int:
        return sum(merged > base for merged, base in zip(self.sizes, self.eagle.sizes))


def hybrid(target, head, tree=TreeConfig(kind="dynamic", top_k=3, depth=3, total_tokens=8), num_tokens=4):
    return CountingHybrid(EagleDrafter.from_head(head, target, tree), PromptLookupDrafter(max_ngram=2, num_tokens=num_tokens))


@pytest.mark.parametrize("head_kind", ["random", "nudged"])
def test_hybrid_greedy_is_token_identical(setup, head_kind):
    target, cfg, ps, expected = setup
    head = random_head(target) if head_kind == "random" else oracle_head(target, noise=0.2)
    drafter = hybrid(target, head, TreeConfig(kind="dynamic"), num_tokens=8)
    spec = Generator(target, drafter)
    for p, want in zip(ps, expected):
        assert run(spec, p, cfg) == want
    assert drafter.grafted > 0, "the lookup chain never added a node: the test would be vacuous"


def test_hybrid_sampling_matches_target_distribution(sampling_setup):
    target, head, _ = sampling_setup
    prompt = torch.tensor([2, 7, 4, 9, 2, 7])  # "2 7" repeats: the lookup proposes "4 9 2 7"
    params = SamplingParams(1.0)
    drafter = hybrid(target, random_head(target))
    joint = exact_joint(target, prompt, params)
    stat, crit = chi_square_excess(draw(target, head, prompt, params, drafter=drafter), joint)
    assert stat < crit, f"chi-square {stat:.1f} exceeds the 1e-4 critical value {crit:.1f}"
    assert drafter.grafted > DRAWS // 4  # the lookup chain took part in many draws
