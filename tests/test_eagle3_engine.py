"""EAGLE-3 heads in the engine: lossless exactly as EAGLE-1/2 heads (token for token when greedy, the
target's distribution when sampling), through the Python API, the CLI and the bench."""

import json
from pathlib import Path

import pytest
import torch
from helpers import nudged_eagle3_head, random_eagle3_head, random_head, save_tiny_model, tiny_target
from test_lossless import TREES, VOCAB, chi_square_excess, draw, exact_joint, prompts, run

from eaglespec.attention import FP32_ATTENTION, register
from eaglespec.aux_features import capture_aux
from eaglespec.backends import DraftSetup, draft_setup, optimize_target
from eaglespec.backends.cpu import Int8Linear
from eaglespec.draft import DraftHeadError
from eaglespec.drafter import Drafter, EagleDrafter, TreeConfig
from eaglespec.generate import GenerationConfig, Generator
from eaglespec.head_runner import Eagle3HeadRunner
from eaglespec.heads import load_drafter, make_drafter
from eaglespec.lookup import HybridDrafter
from eaglespec.target import Target
from eaglespec.verify import SamplingParams

LAYERS = 8  # an 8-layer target: EAGLE-3 reads the inputs of its layers 2, 4 and 5
FEATURE_LAYERS = (2, 4, 5)
N_PROMPTS, NEW_TOKENS = 12, 48


@pytest.fixture(scope="module")
def setup():
    """A sharp tiny 8-layer target, its plain greedy outputs, and two EAGLE-3 heads for it."""
    target = tiny_target("llama", layers=LAYERS, logit_scale=30.0)
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    ps = prompts(target.vocab_size, n=N_PROMPTS)
    plain = Generator(target)
    expected = [run(plain, p, cfg) for p in ps]
    heads = {"random": random_eagle3_head(target, k=48), "nudged": nudged_eagle3_head(target)}
    return target, cfg, ps, expected, heads


def check_greedy(target, drafter, cfg, ps, expected) -> list[int]:
    """Speculative greedy output equals plain decoding's on every prompt; returns the accepted
    lengths of all steps."""
    spec = Generator(target, drafter)
    accepted = []
    for p, want in zip(ps, expected):
        assert run(spec, p, cfg) == want
        accepted += spec.last_stats.accept_lengths
    return accepted


@pytest.mark.parametrize("kind", list(TREES))
@pytest.mark.parametrize("head_kind", ["random", "nudged"])
def test_greedy_is_token_identical(setup, kind, head_kind):
    target, cfg, ps, expected, heads = setup
    drafter = make_drafter(heads[head_kind], target, TREES[kind])
    assert target.feature_layers == FEATURE_LAYERS  # set for the head it drafts with
    accepted = check_greedy(target, drafter, cfg, ps, expected)
    tau = sum(accepted) / len(accepted)
    if head_kind == "random":
        assert tau < 1.5  # mostly rejections: the rejection paths were exercised
    else:
        assert tau > 1.6 and max(accepted) >= 4  # multi-token paths through the head's own steps


@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_greedy_with_a_lookup_chain_is_token_identical(setup, kind):
    target, cfg, ps, expected, heads = setup
    drafter = make_drafter(heads["random"], target, TREES[kind], lookup=8)
    assert isinstance(drafter, HybridDrafter) and drafter.feature_layers == FEATURE_LAYERS
    accepted = check_greedy(target, drafter, cfg, ps, expected)
    assert max(accepted) > 3  # the chain was accepted: long commits into the head's cache


def test_the_runner_drafts_what_training_unrolls(setup):
    """Commit pairs 0..i, then step along the real text: each output equals the training forward's
    step s at anchor i (eagle3.forward_unrolled), so positions, masks and the pre-norm feedback
    match what the head was trained on."""
    target, _, ps, expected, heads = setup
    head, steps, anchor = heads["nudged"], 4, 20
    seq = torch.cat([ps[0], torch.tensor(expected[0])])[:32]
    target.set_feature_layers(FEATURE_LAYERS)
    feats = target.prefill(seq).features  # [T, 3H]
    with torch.no_grad():
        embeds = target.embed(seq)  # [T, H]
        # step s at anchor i is fed token i + 1 + s; anchors past the end see zeros
        shifted = [torch.cat([embeds[1 + s :], embeds.new_zeros(1 + s, embeds.shape[1])])[None] for s in range(steps)]
        want = head.forward_unrolled(feats[None], shifted)  # steps x [1, T, H]
    runner = Eagle3HeadRunner(head, target)
    runner.allocate(steps)
    runner.reset()
    with torch.inference_mode():
        h = runner.commit(seq[1 : anchor + 2], feats[: anchor + 1])  # pairs (f_i, x_{i+1}), i <= anchor
        torch.testing.assert_close(h, want[0][0, anchor], rtol=1e-4, atol=1e-4)
        for depth in range(1, steps):
            rows = torch.zeros(1, steps, dtype=torch.bool)
            rows[0, :depth] = True  # its chain: the nodes of depths 1..depth, in slots 0..depth-1
            h = runner.step(h[None], seq[anchor + 1 + depth : anchor + 2 + depth], depth, rows)[0]
            torch.testing.assert_close(h, want[depth][0, anchor], rtol=1e-4, atol=1e-4)
        got, ref = runner.logprobs(h[None])[0], head.logprobs(want[-1][0, anchor])  # [K]
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class Recorder(Drafter):
    """Passes every call to `inner` and keeps what the target committed."""

    def __init__(self, inner: Drafter) -> None:
        self.inner, self.max_tree_size, self.feature_layers = inner, inner.max_tree_size, inner.feature_layers
        self.tokens, self.features = [], []

    def begin(self) -> None:
        self.tokens.clear()
        self.features.clear()
        self.inner.begin()

    def observe(self, tokens, features) -> None:
        self.tokens.append(tokens)
        self.features.append(features)
        self.inner.observe(tokens, features)

    def propose(self, root):
        return self.inner.propose(root)


@pytest.mark.parametrize("block", [None, 4])
def test_the_head_is_fed_the_fused_features_of_what_was_committed(setup, block):
    """The features the drafter observes (a prefill, then each tree's accepted nodes gathered with
    `features[verdict.nodes]`, also where a tree is verified in blocks of 4 nodes) are the fused
    features of one plain forward over the committed text, row for row."""
    target, cfg, ps, expected, heads = setup
    rec = Recorder(make_drafter(heads["nudged"], target, TreeConfig(kind="dynamic"), lookup=8))
    spec = Generator(target, rec)
    target.exact_rows = block
    try:
        longest = 0
        for p, want in zip(ps[:4], expected):
            got = run(spec, p, cfg)
            assert got == want
            longest = max(longest, *spec.last_stats.accept_lengths)
            seq = torch.cat([p, torch.tensor(got)])
            feats = torch.cat(rec.features)  # [n, 3H]: row i is position i's
            # what was committed: the last step's tokens may run past max_new_tokens (cut from the output)
            committed = torch.cat([p[:1], *rec.tokens])  # [n + 1]
            n = feats.shape[0]
            assert feats.shape[1] == 3 * target.hidden_size and torch.equal(committed[: seq.shape[0]], seq)
            with torch.no_grad(), capture_aux(target.decoder, FEATURE_LAYERS) as aux:
                target.decoder(input_ids=committed[None, :n], use_cache=False)
            torch.testing.assert_close(feats, aux.fused()[0], rtol=1e-4, atol=1e-4)
        assert longest > 3  # multi-node paths were gathered
    finally:
        target.exact_rows = None


def bf16_target() -> Target:
    """The 8-layer target in bf16 with eaglespec's exact attention, optimized as load_target does."""
    model = tiny_target("llama", layers=LAYERS, logit_scale=30.0, pack=False).model.to(torch.bfloat16)
    model.set_attn_implementation(register())
    target = Target(model, tokenizer=None, max_len=512)
    optimize_target(target)
    return target


@pytest.mark.parametrize("weights", ["backend", "int8"])
def test_bf16_greedy_is_token_identical(setup, weights):
    """bf16 target; the head as the backend sets it up for bf16, or int8 (fc, the decoder layer and
    lm_head); a 40-node tree is verified in blocks of 32."""
    _, cfg, ps, _, heads = setup
    target = bf16_target()
    assert target.model.config._attn_implementation == FP32_ATTENTION
    ps = ps[:6]
    plain = Generator(target)
    expected = [run(plain, p, cfg) for p in ps]
    head = heads["nudged"]
    setup_ = draft_setup(target.device, target.dtype) if weights == "backend" else DraftSetup(torch.bfloat16, "int8")
    tree = TreeConfig(kind="dynamic", top_k=8, depth=6, total_tokens=40)
    drafter = make_drafter(head, target, tree, setup_)
    if weights == "int8":
        runner = drafter.runner
        assert isinstance(runner.head.lm_head, Int8Linear) and isinstance(runner.head.fc, Int8Linear)
        assert type(head.fc) is torch.nn.Linear and head.fc.weight.dtype == torch.float32  # the caller's head is kept
    accepted = check_greedy(target, drafter, cfg, ps, expected)
    assert max(accepted) >= 4


def test_a_target_left_on_its_last_hidden_state_is_refused(setup):
    target, cfg, ps, _, heads = setup
    drafter = EagleDrafter.from_head(heads["random"], target)
    assert isinstance(drafter.runner, Eagle3HeadRunner)
    target.set_feature_layers(None)
    with pytest.raises(DraftHeadError, match=r"set_feature_layers\(\[2, 4, 5\]\)"):
        run(Generator(target, drafter), ps[0], cfg)
    # an EAGLE-1/2 head's drafter sets the features back; an EAGLE-3 one's to its layers
    make_drafter(heads["random"], target)
    assert target.feature_layers == FEATURE_LAYERS
    make_drafter(random_head(target), target)
    assert target.feature_layers is None
    with pytest.raises(ValueError, match="layers in"):
        target.set_feature_layers([2, 8])


# -- sampling ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampling_setup():
    """test_lossless's sampling target (12 tokens), 8 layers deep for EAGLE-3, with a nudged head
    (100 steps: drafts still merge in over a tenth of the draws, as `draw` requires)."""
    target = tiny_target("llama", layers=LAYERS, logit_scale=12.0, vocab=VOCAB, seed=3)
    return target, nudged_eagle3_head(target, steps=100), torch.tensor([2, 7, 4, 9])


# test_lossless runs the verifier at each temperature and filter over EAGLE-2 trees; here an
# EAGLE-3 drafter's trees under the case with the most to get wrong (temperature and top-p)
@pytest.mark.parametrize("params", [SamplingParams(0.7, top_p=0.9)], ids=["t0.7-p0.9"])
def test_sampling_matches_target_distribution(sampling_setup, params):
    target, head, prompt = sampling_setup
    joint = exact_joint(target, prompt, params)
    drafter = make_drafter(head, target, TreeConfig(kind="dynamic", top_k=3, depth=3, total_tokens=8))
    stat, crit = chi_square_excess(draw(target, head, prompt, params, drafter=drafter), joint)
    assert stat < crit, f"chi-square {stat:.1f} exceeds the 1e-4 critical value {crit:.1f}"


# -- the command line and the bench ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """An 8-layer tiny model folder (word tokenizer, chat template) with an EAGLE-3 and an EAGLE-2
    head for it, and an EAGLE-3 head for a narrower target."""
    from eaglespec.target import load_target

    d = tmp_path_factory.mktemp("tiny8")
    save_tiny_model(d / "model", layers=LAYERS)
    target = load_target(str(d / "model"))
    random_eagle3_head(target, k=48).save_pretrained(d / "eagle3")
    random_head(target).save_pretrained(d / "eagle2")
    random_eagle3_head(tiny_target(layers=LAYERS, hidden=32)).save_pretrained(d / "narrow3")
    return d


def cli(capsys, *argv):
    from eaglespec.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cli_generate_with_an_eagle3_head(capsys, tiny8, dtype):
    base = ["generate", "w1 w2 w3 w4", "--model", str(tiny8 / "model"), "--max-new-tokens", "24", "--json",
            "--dtype", dtype]
    code, out, _ = cli(capsys, *base, "--no-draft")
    assert code == 0
    plain = json.loads(out)
    # fixed 16-node trees: a cost-sized tree over a random head may rest on every step of so short
    # an answer, as timings on the machine at hand decide, and then no tree is verified at all
    fixed = ["--tree-sizing", "fixed"]
    for extra in (["--tree", "static"], ["--tree", "dynamic", *fixed], ["--lookup", "0", *fixed]):
        code, out, err = cli(capsys, *base, "--draft", str(tiny8 / "eagle3"), *extra)
        assert code == 0, err
        spec = json.loads(out)
        assert spec["text"] == plain["text"] and spec["mean_tree_size"] > 1  # trees were verified


def test_cli_refuses_an_eagle3_head_for_another_width(capsys, tiny8):
    code, _, err = cli(capsys, "generate", "w1", "--model", str(tiny8 / "model"), "--draft", str(tiny8 / "narrow3"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("eaglespec: error:") and "Traceback" not in err
    assert "3 x 32" in err and "hidden size 64" in err


def test_load_drafter_reads_either_kind(tiny8):
    from eaglespec.target import load_target

    target = load_target(str(tiny8 / "model"))
    drafter = load_drafter(tiny8 / "eagle3", target, lookup=4)
    assert isinstance(drafter.eagle.runner, Eagle3HeadRunner) and target.feature_layers == FEATURE_LAYERS
    drafter = load_drafter(tiny8 / "eagle2", target)
    assert type(drafter.runner).__name__ == "EagleHeadRunner" and target.feature_layers is None
    with pytest.raises(DraftHeadError, match="3 x 32"):
        load_drafter(tiny8 / "narrow3", target)


def test_bench_compares_heads_of_both_kinds_side_by_side(capsys, tiny8):
    """An EAGLE-2 head against an EAGLE-3 one on the same target, interleaved: each run reads the
    features its own head needs, and every answer is plain decoding's."""
    q = tiny8 / "q.jsonl"
    q.write_text("".join(json.dumps({"question_id": i, "turns": [f"w{i} w{i + 1} w{i + 2}"]}) + "\n" for i in range(2)))
    out = tiny8 / "cmp"
    code, _, err = cli(capsys, "bench", "--model", str(tiny8 / "model"), "--draft", str(tiny8 / "eagle2"),
                       "--compare-draft", str(tiny8 / "eagle3"), "--methods", "plain,eagle-dynamic,eagle-lookup",
                       "--questions", str(q), "--max-new-tokens", "12", "--dtype", "float32", "--out", str(out))
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in res["runs"]} == {"plain", "eagle-dynamic", "eagle-lookup", "eagle-dynamic@eagle3",
                                                  "eagle-lookup@eagle3"}
    assert all(r["equal_to_baseline"] for r in res["runs"])


# -- the real default model -----------------------------------------------------------------------

TRAINED = Path(__file__).parents[1] / "runs" / "eagle3" / "gpu-head"  # not in git: skipped where absent


@pytest.mark.slow
@pytest.mark.parametrize("head_kind", ["random", "trained"])
def test_greedy_equals_plain_on_the_default_model(head_kind):
    from eaglespec.heads import load_head
    from eaglespec.target import load_target

    if head_kind == "trained" and not (TRAINED / "config.json").is_file():
        pytest.skip(f"no trained EAGLE-3 head at {TRAINED}")
    torch.set_num_threads(2)
    try:
        target = load_target(dtype="float32", max_len=1024)
        head = random_eagle3_head(target, k=8192) if head_kind == "random" else load_head(TRAINED, 30)
        spec = Generator(target, make_drafter(head, target, TreeConfig(), draft_setup(target.device, target.dtype)))
        plain = Generator(target)
        cfg = GenerationConfig(max_new_tokens=32)
        taus = []
        for prompt in ["What is the capital of France? Answer in one sentence.",
                       "Write a Python function that reverses a string."]:
            got = spec.generate(prompt, cfg)
            assert got.token_ids == plain.generate(prompt, cfg).token_ids, prompt
            taus.append(got.stats.mean_accept_len)
        if head_kind == "trained":
            assert sum(taus) / len(taus) > 1.5, taus
    finally:
        torch.set_num_threads(1)
