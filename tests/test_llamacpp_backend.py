"""The llama.cpp backend (eaglespec.backends.llamacpp): trees as llama.cpp sequences, the cache
keeping exactly the accepted path, and lossless decoding through it (greedy output equal to the
backend's own plain decoding, sampling that follows its distribution).

The tree mapping is pure; everything else runs the default GGUF (SmolLM2-135M-Instruct, Q4_1)
through llama-cpp-python and is skipped, saying why, where either is missing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math

import numpy as np
import pytest
import torch

from eaglespec.backends.llamacpp import MAX_TREE, LlamaCppTargetConfig, TreeSequences, tree_sequences
from eaglespec.tree import make_tree

needs_llamacpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                    reason="llama-cpp-python is not installed (pip install 'eaglespec[llamacpp]')")


def ancestor_mask(parents: list[int]) -> np.ndarray:
    """[q, q] ancestor-or-self mask of a parent list, written out the slow way."""
    q = len(parents)
    mask = np.zeros((q, q), dtype=bool)
    for i in range(q):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask


@pytest.mark.parametrize("parents, leaves, seqs", [
    ([-1], [0], [[0]]),  # the root alone
    ([-1, 0, 1, 2], [3], [[0], [0], [0], [0]]),  # a chain: one sequence
    # root 0 with children 1, 2; node 3 under 1: leaf 2 is sequence 0, leaf 3 sequence 1
    ([-1, 0, 0, 1], [2, 3], [[0, 1], [1], [0], [1]]),
    # root with children 1, 2, 3; 4, 5 under 1; 6 under 4
    ([-1, 0, 0, 0, 1, 1, 4], [2, 3, 5, 6], [[0, 1, 2, 3], [2, 3], [0], [1], [3], [2], [3]]),
])
def test_each_node_holds_the_sequences_of_the_leaves_below_it(parents, leaves, seqs):
    tree = tree_sequences(ancestor_mask(parents))
    assert tree.leaves.tolist() == leaves
    assert [tree.seq_ids(i) for i in range(len(parents))] == seqs


@pytest.mark.parametrize("parents", [[-1, 0, 0, 1], [-1, 0, 0, 0, 1, 1, 4], [-1, 0, 1, 1, 0, 4, 5, 2]])
def test_a_nodes_first_sequence_shows_it_exactly_its_ancestors(parents):
    """llama.cpp lets node i see cell j iff j holds i's first sequence and pos(j) <= pos(i)
    (src/llama-kv-cache.cpp): over the tree's own cells that must be the ancestor-or-self mask."""
    mask = ancestor_mask(parents)
    tree = tree_sequences(mask)
    depth = mask.sum(axis=1) - 1
    for i in range(len(parents)):
        first = tree.seq_ids(i)[0]
        seen = [j for j in range(len(parents)) if first in tree.seq_ids(j) and depth[j] <= depth[i]]
        assert seen == np.flatnonzero(mask[i]).tolist()


def test_the_mapping_reads_the_masks_eaglespec_builds():
    tree = make_tree(torch.tensor([5, 6, 7, 8, 9]), torch.tensor([-1, 0, 0, 1, 1]), max_depth=2)
    seqs = tree_sequences(tree.mask.numpy())
    assert isinstance(seqs, TreeSequences)
    assert seqs.leaves.tolist() == [2, 3, 4]


def test_config_refuses_trees_past_llamacpps_sequences():
    with pytest.raises(ValueError, match="max_tree"):
        LlamaCppTargetConfig(max_tree=MAX_TREE + 1)
    assert LlamaCppTargetConfig(max_tree=MAX_TREE).n_seq_needed <= 256  # llama.cpp's LLAMA_MAX_SEQ


# -- the real default GGUF ---------------------------------------------------------------------------

def default_gguf():
    from eaglespec.target import TargetLoadError, default_gguf_path

    try:
        return default_gguf_path()
    except TargetLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def llama_target():
    from eaglespec.backends.llamacpp import LlamaCppTarget

    target = LlamaCppTarget(default_gguf(), LlamaCppTargetConfig(max_len=1024, max_tree=32, threads=2))
    yield target
    target.close()


@pytest.fixture(scope="module")
def prompt(llama_target):
    from eaglespec.generate import Generator

    return Generator(llama_target).encode("Name the planets of the solar system in order.")


def plain_logits(target, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The backend's plain decoding: prefill the prompt, then step through `tokens` one at a
    time; the logits after the last one ([V])."""
    out = target.prefill(prompt)
    for t in tokens:
        out = target.forward(torch.tensor([t]))
        target.cache.compact(torch.tensor([0]))
    return out.logits[-1]


@needs_llamacpp
@pytest.mark.slow
def test_compaction_keeps_exactly_the_accepted_path(llama_target, prompt):
    """Verify a hand-made tree, keep one root-to-node path; the next plain step then gives the
    logits a fresh decoding of prompt + path + token gives, bit for bit, and keeping another
    path does not."""
    target = llama_target
    tokens = torch.tensor([1000, 2000, 3000, 4000, 5000, 6000, 7000])
    parents = torch.tensor([-1, 0, 0, 1, 1, 3, 2])  # paths 0-1-3-5, 0-1-4, 0-2-6
    tree = make_tree(tokens, parents, max_depth=3)

    def step_after(path: list[int]) -> torch.Tensor:
        target.prefill(prompt)
        target.forward(tree.tokens, target.cache.length + tree.depths, tree.mask)
        target.cache.compact(torch.tensor(path))
        assert target.cache.length == prompt.shape[0] + len(path)
        return target.forward(torch.tensor([42])).logits[0]

    got = step_after([0, 1, 3])
    fresh = plain_logits(target, prompt, tokens[[0, 1, 3]].tolist() + [42])
    assert torch.equal(got, fresh)
    assert not torch.equal(step_after([0, 2, 6]), fresh)  # control: another path, other logits


@needs_llamacpp
@pytest.mark.slow
def test_tree_rows_equal_plain_decoding_along_each_branch(llama_target, prompt):
    """Each node's logits in one tree forward equal plain decoding's along its branch (exact mode)."""
    target = llama_target
    tokens = torch.tensor([1000, 2000, 3000, 4000, 5000])
    parents = torch.tensor([-1, 0, 0, 1, 2])
    tree = make_tree(tokens, parents, max_depth=2)
    target.prefill(prompt)
    rows = target.forward(tree.tokens, target.cache.length + tree.depths, tree.mask).logits
    for node, branch in [(3, [0, 1, 3]), (4, [0, 2, 4])]:
        assert torch.equal(rows[node], plain_logits(target, prompt, tokens[branch].tolist()))


@needs_llamacpp
@pytest.mark.slow
def test_rows_stay_exact_over_blocks_of_cells_with_rejected_cells_between(llama_target):
    """After 180 cached tokens (set-up's build attends over the cells a row sees in blocks of 64 of
    them), three tree steps each keep one path and leave the rejected nodes' cells parked between
    the kept ones, so the kept tokens sit in other cells than plain decoding puts them in. Every
    node of a fourth tree, and the next token, still get the bits that plain decoding of prompt +
    kept path gives them."""
    target = llama_target
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 20000, (180,), generator=gen)
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3])  # branches 0-1-3-6, 0-1-4, 0-2-5
    kept = []
    target.prefill(prompt)
    for _ in range(3):
        tree = make_tree(torch.randint(100, 20000, (7,), generator=gen), parents, max_depth=3)
        target.forward(tree.tokens, target.cache.length + tree.depths, tree.mask)
        target.cache.compact(torch.tensor([0, 1, 4]))
        kept += tree.tokens[[0, 1, 4]].tolist()
    assert target.cache.parked >= 12  # the rejected nodes' cells, between the kept ones
    tree = make_tree(torch.randint(100, 20000, (7,), generator=gen), parents, max_depth=3)
    rows = target.forward(tree.tokens, target.cache.length + tree.depths, tree.mask).logits
    target.cache.compact(torch.tensor([0, 2, 5]))
    after = target.forward(torch.tensor([42])).logits[0]
    target.cache.compact(torch.tensor([0]))
    for node, branch in [(6, [0, 1, 3, 6]), (4, [0, 1, 4]), (5, [0, 2, 5])]:
        assert torch.equal(rows[node], plain_logits(target, prompt, kept + tree.tokens[branch].tolist()))
    assert torch.equal(after, plain_logits(target, prompt, kept + tree.tokens[[0, 2, 5]].tolist() + [42]))


@needs_llamacpp
@pytest.mark.slow
def test_a_row_rounds_alike_in_decodes_of_any_size_and_cache_length(llama_target):
    """After 600 cached tokens (where an f16 cache would split a lone row's attention across
    threads), a token decoded alone (padded to the measured `min_rows`), first in a chain of 8 and
    first in a chain of 100 (where an f16 cache would tile the attention) gets the same bits."""
    target = llama_target
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(100, 20000, (600,), generator=gen)
    chain = torch.randint(100, 20000, (100,), generator=gen)
    target.prefill(context)
    rows = []
    for q in (1, 8, 100):
        rows.append(target.forward(chain[:q]).logits[0])
        target.cache.compact(torch.empty(0, dtype=torch.long))
    assert target.cache.length == 600
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[1], rows[2])
    if (target.min_rows or 1) > 1:  # the probe's verdict holds: one row fewer rounds otherwise
        target.min_rows, measured = target.min_rows - 1, target.min_rows
        try:
            alone = target.forward(chain[:1]).logits[0]
            target.cache.compact(torch.empty(0, dtype=torch.long))
        finally:
            target.min_rows = measured
        assert not torch.equal(alone, rows[1])


def test_the_patch_set_up_builds_carries_the_revision_the_backend_expects():
    """setup.sh builds patches/llama-cpp-python-*.patch; its ggml_cpu_eaglespec_patch() must return
    the PATCH_REVISION the backend compares a loaded build with."""
    import re
    from pathlib import Path

    from eaglespec.backends.llamacpp import PATCH_REVISION

    patches = sorted((Path(__file__).resolve().parents[1] / "patches").glob("llama-cpp-python-*.patch"))
    assert len(patches) == 1
    text = patches[0].read_text()
    body = text[text.index("ggml_cpu_eaglespec_patch(void) {"):]
    assert int(re.search(r"^\+\s+return (\d+);", body, re.M).group(1)) == PATCH_REVISION
    assert f"revision ({PATCH_REVISION})" in text  # and its header says so


class GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


#: ggml's type ids of the weight types `ggml_products` takes
GGML_TYPES = {"f32": 0, "f16": 1, "bf16": 30}


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounded to nearest even as ggml rounds (no NaNs here)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def stored(x: np.ndarray, weights: str) -> np.ndarray:
    """float32 values as ggml stores them in a tensor of that type."""
    if weights == "bf16":
        return to_bf16(x)
    return x.astype({"f32": np.float32, "f16": np.float16}[weights])


def widened(x: np.ndarray, weights: str) -> np.ndarray:
    """float32 values rounded to that type (what ggml multiplies them as)."""
    if weights == "bf16":
        return (to_bf16(x).astype(np.uint32) << 16).view(np.float32)
    return stored(x, weights).astype(np.float32)


def vec_dot_reference(folder, weight: np.ndarray, column: np.ndarray, weights: str) -> np.ndarray:
    """[m] ggml's own one-row product of the ggml libraries in `folder`, ggml_vec_dot_f16 or
    ggml_vec_dot_bf16 (what ggml runs for each weight row and column where llamafile's sgemm takes
    no batch), for each row of weight [m, k] and column [k] (float32 values, stored as `weights`)."""
    cpu = ctypes.CDLL(str(next(folder.glob("libggml-cpu.so*"))))
    dot = getattr(cpu, f"ggml_vec_dot_{weights}")
    dot.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_void_p,
                    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dot.restype = None
    m, k = weight.shape
    rows, col = np.ascontiguousarray(stored(weight, weights)), np.ascontiguousarray(stored(column, weights))
    out, s = np.empty(m, dtype=np.float32), ctypes.c_float()
    for i in range(m):
        dot(k, ctypes.byref(s), 0, rows[i].ctypes.data, 0, col.ctypes.data, 0, 1)
        out[i] = s.value
    return out


def ggml_products(folder, weights: str, weight: np.ndarray, columns: np.ndarray,
                  counts: list[int]) -> list[np.ndarray]:
    """ggml's mul_mat of weight [m, k] (float32 values, stored as `weights`: f32, f16 or bf16) by the
    first n rows of columns [N, k] (float32), for each n in counts, on 2 threads, through the ggml
    libraries in `folder`: one [n, m] float32 array per count."""
    base = ctypes.CDLL(str(next(folder.glob("libggml-base.so*"))))
    cpu = ctypes.CDLL(str(next(folder.glob("libggml-cpu.so*"))))
    p = ctypes.c_void_p
    base.ggml_init.argtypes, base.ggml_init.restype = [GgmlInitParams], p
    base.ggml_new_tensor_2d.argtypes = [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    base.ggml_new_tensor_2d.restype = p
    base.ggml_mul_mat.argtypes, base.ggml_mul_mat.restype = [p, p, p], p
    base.ggml_new_graph.argtypes, base.ggml_new_graph.restype = [p], p
    base.ggml_build_forward_expand.argtypes = [p, p]
    base.ggml_get_data.argtypes, base.ggml_get_data.restype = [p], p
    base.ggml_free.argtypes = [p]
    cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
    cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
    m, k = weight.shape
    need = 4 * (m * k + 3 * sum(counts) * max(m, k)) + (len(counts) + 1) * (1 << 20)
    ctx = base.ggml_init(GgmlInitParams(need, None, False))
    assert ctx

    def tensor(rows: int, cols: int, values: np.ndarray, kind: str) -> int:
        t = base.ggml_new_tensor_2d(ctx, GGML_TYPES[kind], cols, rows)  # ne0 = the contiguous dimension
        data = np.ascontiguousarray(stored(values, kind))
        ctypes.memmove(base.ggml_get_data(t), data.ctypes.data, data.nbytes)
        return t

    try:
        w = tensor(m, k, weight, weights)
        out = []
        for n in counts:
            y = base.ggml_mul_mat(ctx, w, tensor(n, k, columns[:n], "f32"))
            graph = base.ggml_new_graph(ctx)
            base.ggml_build_forward_expand(graph, y)
            assert cpu.ggml_graph_compute_with_ctx(ctx, graph, 2) == 0
            out.append(np.ctypeslib.as_array(ctypes.cast(base.ggml_get_data(y), ctypes.POINTER(ctypes.c_float)),
                                             shape=(n, m)).copy())
        return out
    finally:
        base.ggml_free(ctx)


@needs_llamacpp
@pytest.mark.parametrize("weights, revision", [("f32", 3), ("f16", 4), ("bf16", 5)])
def test_the_set_up_builds_products_give_each_column_its_bits_alone(weights, revision):
    """The patch's F32 kernel takes 2 to 64 rows with AVX2 and 1 to 8 with AVX-512 (llamafile's
    sgemm the rest), its F16 and BF16 kernels any number with AVX2 and up to 64 with AVX-512 (BF16
    where AVX-512 BF16 is): every column of a product of any width must get the bits it gets alone, so that
    trees of such models are exact without padding; and F16 and BF16 products the bits of ggml's
    own one-row dot products, so that plain decoding is llama.cpp's. At an LM head's width and at
    a layer's, and with an input width that is a multiple of 8 but not of 32 or 64."""
    import llama_cpp

    from eaglespec.backends.llamacpp import lib_folder, patch_revision

    if patch_revision(llama_cpp) < revision:
        pytest.skip(f"this llama-cpp-python lacks revision {revision} of eaglespec's patch (setup.sh builds it)")
    folder = lib_folder(llama_cpp)
    rng = np.random.default_rng(0)
    counts = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64, 65, 100, 129, 300]
    for m, k in ((4099, 576), (576, 1536), (301, 200)):
        weight = rng.standard_normal((m, k), dtype=np.float32)
        columns = rng.standard_normal((max(counts), k), dtype=np.float32)
        products = ggml_products(folder, weights, weight, columns, counts)
        last = {n: ggml_products(folder, weights, weight, columns[n - 1:n], [1])[0][0] for n in counts}
        # F16 and BF16 weights take their activations rounded to their type too
        exact = widened(columns, weights) @ widened(weight, weights).T
        if weights != "f32":
            reference = vec_dot_reference(folder, weight, columns[0], weights)
            assert np.array_equal(products[0][0], reference), f"m={m} k={k}: not ggml_vec_dot_{weights}'s bits"
        for n, product in zip(counts, products):
            assert np.array_equal(product[-1], last[n]), f"m={m} k={k}: column {n} of {n} differs from itself alone"
            assert np.array_equal(product[0], products[0][0]), f"m={m} k={k}: column 1 of {n} differs from itself alone"
            assert np.allclose(product, exact[:n], rtol=1e-4, atol=1e-3)  # and it is the product


@needs_llamacpp
@pytest.mark.slow
def test_the_set_up_build_verifies_the_default_model_without_padding(llama_target):
    """setup.sh builds llama.cpp with patches/llama-cpp-python-*.patch: llamafile's sgemm compiled
    in, with a batched Q4_1 and Q8_0 kernel that rounds as ggml's one-row kernels do. So the
    default model (Q4_1 layers, a Q8_0 LM head) decodes a lone token unpadded and still rounds
    each row of a tree as it rounds alone."""
    import sys
    from pathlib import Path

    import llama_cpp

    from eaglespec.backends.llamacpp import PATCH_REVISION, patch_revision

    if not (Path(sys.prefix) / ".eaglespec-llamacpp").exists():
        pytest.skip("this llama-cpp-python is not the one setup.sh builds (no .eaglespec-llamacpp in the environment)")
    assert patch_revision(llama_cpp) == PATCH_REVISION  # the checkout's patch, not an older build's
    assert "eaglespec's patch" in llama_target.build  # as bench reports it
    assert "LLAMAFILE = 1" in llama_cpp.llama_print_system_info().decode()
    assert llama_target.min_rows == 1


@needs_llamacpp
@pytest.mark.slow
def test_greedy_speculative_output_equals_plain_output(llama_target):
    """The EAGLE-2 head with the prompt-lookup chain, through llama.cpp: the same tokens as the
    backend's plain greedy decoding, on real prompts."""
    check_greedy_equals_plain(llama_target, ["Write a haiku about autumn leaves.",
                                             "Explain what a hash table is, in three sentences.",
                                             "List five fruits, one per line, then repeat the list in reverse order."],
                              max_new_tokens=96)


def check_greedy_equals_plain(target, questions: list[str], max_new_tokens: int) -> None:
    """The shipped head with a 12-node tree and the lookup chain writes, on each question, what
    `target`'s plain greedy decoding writes, and is accepted often enough for that to mean
    something (also run on re-encoded GGUF files, tests/test_gguf_reencode.py)."""
    from eaglespec.backends import default_tree, draft_setup
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.heads import default_head_path, load_drafter

    head = default_head_path()
    if head is None:
        pytest.skip("no draft head ships with this install")
    tree = default_tree("cpu", torch.float32, total_tokens=12)
    plain, spec = Generator(target), Generator(target, load_drafter(head, target, tree, draft_setup("cpu", torch.float32), lookup=8))
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    taus = []
    for question in questions:
        ids = plain.encode(question)
        a, b = plain.generate(ids, cfg), spec.generate(ids, cfg)
        assert a.token_ids == b.token_ids, question
        taus.append(b.stats.mean_accept_len)
    assert max(taus) > 1.5, f"the draft was hardly accepted (tau {taus}): the test would be vacuous"


@needs_llamacpp
@pytest.mark.slow
def test_repacking_the_cache_when_parked_cells_fill_it_stays_exact():
    """With room for only 16 parked cells the committed sequence is copied into a contiguous
    block several times during one answer; the output still equals plain decoding's."""
    from eaglespec.backends import default_tree, draft_setup
    from eaglespec.backends.llamacpp import LlamaCppTarget
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.heads import default_head_path, load_drafter

    head = default_head_path()
    if head is None:
        pytest.skip("no draft head ships with this install")
    target = LlamaCppTarget(default_gguf(), LlamaCppTargetConfig(max_len=256, max_tree=32, spare_cells=16, threads=2))
    repacks = []
    room = target.cache.room

    def counted(q: int) -> None:
        before = target.cache.parked
        room(q)
        repacks.append(target.cache.parked < before)

    target.cache.room = counted
    tree = default_tree("cpu", torch.float32, total_tokens=12)
    plain = Generator(target)
    spec = Generator(target, load_drafter(head, target, tree, draft_setup("cpu", torch.float32), lookup=8))
    ids = plain.encode("Write a short story about a lighthouse keeper.")
    cfg = GenerationConfig(max_new_tokens=128, ignore_eos=True)
    assert plain.generate(ids, cfg).token_ids == spec.generate(ids, cfg).token_ids
    assert sum(repacks) >= 2, repacks.count(True)
    target.close()


def chi_square_excess(samples: list[tuple], joint: dict[tuple, float]) -> tuple[float, float]:
    from test_lossless import chi_square_excess as check

    return check(samples, joint)


@needs_llamacpp
@pytest.mark.slow
def test_sampling_follows_the_backends_distribution(llama_target):
    """Three sampled tokens (top-k 3, so 27 outcomes) through the EAGLE-2 tree on llama.cpp follow
    the joint distribution of the backend's own plain steps (chi-square, p = 1e-4)."""
    check_sampling_follows_the_backend(llama_target)


def check_sampling_follows_the_backend(target) -> None:
    """The chi-square check of three sampled tokens with the shipped head against `target`'s own
    plain steps (also run on re-encoded GGUF files, tests/test_gguf_reencode.py)."""
    from eaglespec.backends import draft_setup
    from eaglespec.drafter import TreeConfig
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.heads import default_head_path, load_drafter
    from eaglespec.verify import SamplingParams, process_logits

    head = default_head_path()
    if head is None:
        pytest.skip("no draft head ships with this install")
    params = SamplingParams(1.0, top_k=3)
    # a bare 4-token prompt: each prompt row costs about a decoded token on Q4_1, and the chat
    # template's ~30 tokens made this test a sixth of the suite
    prompt = Generator(target).encode("My favourite colour is", chat=False)

    def dist(tokens: list[int]) -> torch.Tensor:
        return process_logits(plain_logits(target, prompt, tokens), params)

    joint: dict[tuple, float] = {}
    p1 = dist([])
    for a in p1.nonzero().flatten().tolist():
        p2 = dist([a])
        for b in p2.nonzero().flatten().tolist():
            p3 = dist([a, b])
            for c in p3.nonzero().flatten().tolist():
                joint[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    assert math.isclose(sum(joint.values()), 1.0, abs_tol=1e-4)
    drafter = load_drafter(head, target, TreeConfig(top_k=3, depth=2, total_tokens=6), draft_setup("cpu", torch.float32))
    spec = Generator(target, drafter)
    draws, merged = [], 0
    for seed in range(400):
        cfg = GenerationConfig(max_new_tokens=3, temperature=1.0, top_k=3, seed=seed, ignore_eos=True)
        draws.append(tuple(spec.generate(prompt, cfg).token_ids))
        merged += spec.last_stats.target_forwards < 3
    assert merged > 40, "the draft was (almost) never accepted: the test would be vacuous"
    stat, crit = chi_square_excess(draws, joint)
    assert stat < crit, f"chi-square {stat:.1f} exceeds the 1e-4 critical value {crit:.1f}"


# -- choosing the backend -----------------------------------------------------------------------------

@pytest.mark.parametrize("model, device, installed, want", [
    (None, "cpu", True, "llamacpp"),  # the default GGUF on a CPU
    ("m.gguf", "cpu", True, "llamacpp"),
    ("some/folder", "cpu", True, "torch"),  # a transformers folder
    ("m.gguf", "cuda", True, "torch"),
    (None, "cpu", False, "torch"),  # llama-cpp-python missing
])
def test_auto_picks_llamacpp_for_a_gguf_on_a_cpu_when_installed(monkeypatch, model, device, installed, want):
    from eaglespec.backends import llamacpp
    from eaglespec.cli import build_parser
    from eaglespec.cli.common import chosen_backend

    monkeypatch.setattr(llamacpp, "llamacpp_available", lambda: installed)
    argv = ["generate", "hi", "--device", device] + ([] if model is None else ["--model", model])
    assert chosen_backend(build_parser().parse_args(argv)) == want
    assert chosen_backend(build_parser().parse_args(argv + ["--backend", "torch"])) == "torch"


def test_asking_for_llamacpp_without_the_package_is_one_clear_line(monkeypatch, capsys):
    from eaglespec.backends import llamacpp
    from eaglespec.cli import main

    monkeypatch.setattr(llamacpp, "llamacpp_available", lambda: False)
    assert main(["generate", "hi", "--backend", "llamacpp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "llama-cpp-python" in err and "eaglespec[llamacpp]" in err


def test_training_keeps_the_torch_target():
    from eaglespec.cli import build_parser

    assert not hasattr(build_parser().parse_args(["train", "features", "--out", "x"]), "backend")


@needs_llamacpp
@pytest.mark.slow
def test_the_cli_default_on_llamacpp_writes_what_plain_decoding_writes(capsys, tmp_path, monkeypatch):
    """`eaglespec generate --backend llamacpp` with its defaults: the cost-sized tree (its probe runs
    through the backend, within the nodes one llama_decode verifies) and the lookup chain. The
    prompt asks for a copy, so that drafting pays whatever this machine's row costs: on an answer
    written anew the sizer may rightly rest on every step."""
    import json

    from eaglespec.cli import main
    from eaglespec.paths import cache_root
    from eaglespec.target import convert_gguf, default_gguf_path

    convert_gguf(default_gguf_path())  # the converted target is shared; the probe cache is fresh,
    (tmp_path / "targets").symlink_to(cache_root() / "targets")  # so the curve is measured here
    monkeypatch.setenv("EAGLESPEC_CACHE", str(tmp_path))
    base = ["generate", "Repeat this sentence three times: The quick brown fox jumps over the lazy dog.",
            "--backend", "llamacpp", "--max-new-tokens", "48", "--json"]
    answers = []
    for extra in (["--no-draft"], []):
        assert main(base + extra) == 0
        answers.append(json.loads(capsys.readouterr().out))
    plain, spec = answers
    assert spec["text"] == plain["text"] and spec["mean_accept_len"] > 1.0


@needs_llamacpp
@pytest.mark.slow
def test_a_target_whose_rows_depend_on_the_batch_refuses_drafting_and_auto_falls_back(capsys, monkeypatch):
    """Where no padding makes a file's rows batch-invariant (measured `min_rows` None, as a K-quant
    may be), exact drafting on llama.cpp is refused in one line; --backend auto then drafts on the
    PyTorch backend instead and writes what that backend's plain decoding writes."""
    import json

    from eaglespec.backends.llamacpp import LlamaCppError, LlamaCppTarget
    from eaglespec.cli import main
    from eaglespec.heads import default_head_path, load_drafter

    head = default_head_path()
    if head is None:
        pytest.skip("no draft head ships with this install")
    monkeypatch.setattr(LlamaCppTarget, "_min_rows", lambda self: None)
    target = LlamaCppTarget(default_gguf(), LlamaCppTargetConfig(max_len=256, threads=2))
    assert target.min_rows is None
    with pytest.raises(LlamaCppError, match="exactly"):
        load_drafter(head, target)
    target.close()

    base = ["generate", "Name three colours.", "--max-new-tokens", "24", "--json"]
    assert main(base + ["--backend", "llamacpp"]) == 2
    assert "--backend torch" in capsys.readouterr().err
    assert main(base + ["--backend", "auto"]) == 0
    out = capsys.readouterr()
    assert "PyTorch instead" in out.err and "use --backend" not in out.err
    assert main(base + ["--backend", "torch", "--no-draft"]) == 0
    assert json.loads(out.out)["text"] == json.loads(capsys.readouterr().out)["text"]


@needs_llamacpp
@pytest.mark.slow
def test_a_model_without_a_head_drafts_with_the_chain_alone_where_rows_round_alike(monkeypatch):
    """The default model has a head: even --no-draft decodes in the exact mode, as drafting would,
    so its text is the default's. A model without a head drafts with the lookup chain alone, in the
    exact mode, where its rows round alike in every batch without padding (the shipped Q4_1 file
    with set-up's build), writing what plain decoding writes. With --lookup 0, or where exact
    decodes would need padding rows (measured on loading, or kept from an earlier run), it gets
    llama.cpp's own mode (f16 cache, no padding) and decodes plainly."""
    from eaglespec.backends import llamacpp
    from eaglespec.cli import build_parser
    from eaglespec.cli.common import load_engine
    from eaglespec.drafter import NoDrafter
    from eaglespec.generate import GenerationConfig
    from eaglespec.lookup import WeighedLookupDrafter

    def engine(*extra: str):
        return load_engine(build_parser().parse_args(["generate", "Hi", "--backend", "llamacpp", *extra]))

    for extra in ([], ["--no-draft"]):
        target = engine(*extra).target
        assert target.config.exact, extra
        target.close()
    explicit = ["--model", str(default_gguf())]  # an explicit model: no shipped head applies
    chain = engine(*explicit)
    if chain.target.min_rows == 1:
        assert chain.target.config.exact and type(chain.drafter) is WeighedLookupDrafter
        prompt = "List the days of the week, then list them again in the same order."
        cfg = GenerationConfig(max_new_tokens=40)
        spec = chain.generate(prompt, cfg)
        plain = engine(*explicit, "--no-draft")
        assert plain.target.config.exact and type(plain.drafter) is NoDrafter
        assert spec.token_ids == plain.generate(prompt, cfg).token_ids
        plain.target.close()
    else:  # a build whose Q4_1 rows round by batch size
        assert not chain.target.config.exact and type(chain.drafter) is NoDrafter
    chain.target.close()

    def lean(*extra: str) -> None:
        gen = engine(*explicit, *extra)
        assert not gen.target.config.exact and gen.target.min_rows == 1 and not gen.target.config.features
        assert type(gen.drafter) is NoDrafter
        gen.target.close()

    lean("--lookup", "0")
    exact_loads = []  # exact targets measure their rows (here: as Q4_K's round on x86, say)
    monkeypatch.setattr(llamacpp.LlamaCppTarget, "_min_rows", lambda self: exact_loads.append(1) or 8)
    monkeypatch.setattr(llamacpp, "kept_min_rows", lambda gguf, config: 0)  # never measured here
    lean()
    assert exact_loads == [1]  # loaded exact, measured, then loaded again as llama.cpp runs it
    monkeypatch.setattr(llamacpp, "kept_min_rows", lambda gguf, config: 8)  # kept from an earlier run
    lean()
    assert exact_loads == [1]  # no exact target loaded first


@needs_llamacpp
@pytest.mark.slow
def test_without_features_a_prompt_computes_one_row_of_logits_and_decodes_alike():
    """Without a head the target returns no hidden states, so llama.cpp computes a prompt's LM head
    for its last token only (a 262k vocabulary made that most of Gemma 3's prefill); the tokens
    decoded are those of the same mode with features."""
    from eaglespec.backends.llamacpp import LlamaCppTarget
    from eaglespec.generate import GenerationConfig, Generator

    with pytest.raises(ValueError, match="exact=False"):
        LlamaCppTargetConfig(features=False)
    lean = LlamaCppTarget(default_gguf(), LlamaCppTargetConfig(max_len=512, threads=2, exact=False, features=False))
    full = LlamaCppTarget(default_gguf(), LlamaCppTargetConfig(max_len=512, threads=2, exact=False))
    ids = Generator(lean).encode("Name three rivers of Europe.")
    out = lean.prefill(ids)
    assert out.logits.shape == (1, lean.vocab_size) and out.features.shape == (1, 0)
    assert torch.equal(out.logits, full.prefill(ids).logits)
    cfg = GenerationConfig(max_new_tokens=32)
    assert Generator(lean).generate(ids, cfg).token_ids == Generator(full).generate(ids, cfg).token_ids
    lean.close()
    full.close()


@needs_llamacpp
@pytest.mark.slow
def test_a_prompt_asked_for_fewer_hidden_states_commits_the_same_bits(llama_target, prompt):
    """A prompt whose first tokens' hidden states are not wanted runs as two decodes, the first
    without llama.cpp's embeddings (so without their LM head). The last token's logits, the
    hidden states returned and every later step must be those of the one-decode prompt."""
    full = llama_target.prefill(prompt)
    after_full = plain_logits(llama_target, prompt, [int(full.logits[-1].argmax()), 42])
    n = prompt.shape[0]
    for rows in (0, 1, 3, n - 1):
        out = llama_target.prefill(prompt, feature_rows=rows)
        assert torch.equal(out.logits, full.logits)
        assert out.features.shape == (rows, llama_target.hidden_size)
        assert torch.equal(out.features, full.features[n - rows:])
        step = llama_target.forward(torch.tensor([int(full.logits[-1].argmax())]))
        llama_target.cache.compact(torch.tensor([0]))
        step = llama_target.forward(torch.tensor([42]))
        llama_target.cache.compact(torch.tensor([0]))
        assert torch.equal(step.logits[-1], after_full)  # the cache holds what one decode wrote
    assert llama_target._returns_hidden  # embeddings are back on for the steps


def test_the_probe_key_names_the_llamacpp_build(tmp_path, monkeypatch):
    """Measured row padding and cost curves are kept per llama.cpp build: a rebuilt library (other
    compile flags), another version, or libraries loaded from LLAMA_CPP_LIB_PATH may round rows
    otherwise, so each is measured again."""
    from types import SimpleNamespace

    monkeypatch.delenv("LLAMA_CPP_LIB_PATH", raising=False)

    from eaglespec.backends.llamacpp import LlamaCppTarget

    (tmp_path / "llama_cpp" / "lib").mkdir(parents=True)
    so = tmp_path / "llama_cpp" / "lib" / "libggml-cpu.so"
    so.write_bytes(b"build one")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    target = LlamaCppTarget.__new__(LlamaCppTarget)  # only what cost_key reads
    target.gguf, target.config = gguf, LlamaCppTargetConfig(threads=2)
    target._lib = SimpleNamespace(__file__=str(tmp_path / "llama_cpp" / "__init__.py"), __version__="0.3.36")
    first = target.cost_key()
    assert target.cost_key() == first
    so.write_bytes(b"build two, other flags")
    rebuilt = target.cost_key()
    target._lib.__version__ = "0.3.37"
    upgraded = target.cost_key()
    elsewhere = tmp_path / "own-build"
    elsewhere.mkdir()
    (elsewhere / "libggml-cpu.so").write_bytes(b"a build of one's own")
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(elsewhere))
    assert len({first, rebuilt, upgraded, target.cost_key()}) == 4


# -- EAGLE-3 features: the inputs of decoder layers ----------------------------------------------

EAGLE3_LAYERS = (2, 15, 27)  # the official choice for a 30-layer target


@needs_llamacpp
@pytest.mark.slow
def test_layer_inputs_are_the_torch_targets_features(prompt):
    """With feature layers set, a prefill returns the inputs of those layers for every prompt
    token ([n, 3H]), close to what the PyTorch target computes from the dequantized weights (4-bit
    weights and 8-bit activations round otherwise), and greedy logits of the last token only."""
    from eaglespec.backends.llamacpp import LlamaCppTarget
    from eaglespec.target import load_target

    target = LlamaCppTarget(default_gguf(), LlamaCppTargetConfig(max_len=256, threads=2))
    try:
        hidden = target.prefill(prompt)
        target.set_feature_layers(EAGLE3_LAYERS)
        out = target.prefill(prompt)
        n, h = prompt.shape[0], target.hidden_size
        assert out.features.shape == (n, 3 * h) and out.logits.shape == (1, target.vocab_size)
        assert int(out.logits[0].argmax()) == int(hidden.logits[0].argmax())
        step = target.forward(torch.tensor([int(out.logits[0].argmax())]))
        assert step.features.shape == (1, 3 * h)
        target.cache.compact(torch.tensor([0]))
        torch_target = load_target(dtype="float32", max_len=256)
        torch_target.set_feature_layers(EAGLE3_LAYERS)
        want = torch_target.prefill(prompt).features
        cos = torch.nn.functional.cosine_similarity(out.features.view(n * 3, h), want.view(n * 3, h), dim=-1)
        assert cos.min() > 0.98, cos.min()
        # and back to the last hidden state
        target.set_feature_layers(None)
        assert target.prefill(prompt).features.shape == (n, h)
    finally:
        target.close()


@needs_llamacpp
@pytest.mark.slow
def test_greedy_with_an_eagle3_head_equals_plain_output(llama_target):
    """An EAGLE-3 head (random, so the lookup chain makes the acceptances) drafts fixed-size trees
    through llama.cpp's layer inputs: the same tokens as plain decoding with the same target."""
    from helpers import random_eagle3_head

    from eaglespec.drafter import EagleDrafter, TreeConfig
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.lookup import HybridDrafter, PromptLookupDrafter
    from eaglespec.target import load_target

    target = llama_target
    head = random_eagle3_head(load_target(dtype="float32", max_len=64), k=2048)
    assert head.aux_layer_ids == EAGLE3_LAYERS
    eagle = EagleDrafter.from_head(head, target, TreeConfig(top_k=4, depth=4, total_tokens=8))
    target.set_feature_layers(eagle.feature_layers)
    try:
        plain, spec = Generator(target), Generator(target, HybridDrafter(eagle, PromptLookupDrafter(num_tokens=8)))
        cfg = GenerationConfig(max_new_tokens=80)
        ids = plain.encode("Copy this text exactly: The quick brown fox jumps over the lazy dog, then the fox "
                           "runs into the green forest and the dog sleeps under the old oak tree.")
        a, b = plain.generate(ids, cfg), spec.generate(ids, cfg)
        assert a.token_ids == b.token_ids
        assert b.stats.mean_accept_len > 1.3 and max(b.stats.tree_sizes) > 8  # trees and chains were verified
    finally:
        target.set_feature_layers(None)


@needs_llamacpp
def test_layer_inputs_are_refused_where_llama_cpp_lacks_them(llama_target, monkeypatch):
    import eaglespec.backends.llamacpp as backend

    monkeypatch.setattr(backend, "LAYER_INPUT_ARCHS", frozenset({"gemma3"}))
    with pytest.raises(backend.LlamaCppError, match="'llama' models"):
        llama_target.set_feature_layers(EAGLE3_LAYERS)
    monkeypatch.undo()
    with pytest.raises(backend.LlamaCppError, match="outside the model's 30 layers"):
        llama_target.set_feature_layers((2, 30))
    assert llama_target.feature_layers is None
    monkeypatch.setattr(backend, "layer_input_api", lambda lib: None)
    llama_target._layer_api = None
    with pytest.raises(backend.LlamaCppError, match="does not export"):
        llama_target.set_feature_layers(EAGLE3_LAYERS)
