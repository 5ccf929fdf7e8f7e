"""llama.cpp as the target's backend: a GGUF file evaluated by llama.cpp's CPU kernels (through
llama-cpp-python's C API), drafted and verified by eaglespec.

`LlamaCppTarget` implements what the decode loop uses of a target (`eaglespec.backends.base.TargetModel`):
prefill, a forward over a token tree, and a cache of committed tokens that keeps an accepted path.
One `llama_decode` verifies a whole tree:

- each node carries the sequence ids of all leaves below it (`tree_sequences`); llama.cpp lets a
  token attend to a cell iff the cell holds the token's *first* sequence id and an earlier or equal
  position (`set_input_kq_mask_impl` in src/llama-kv-cache.cpp). A node's first sequence is a leaf
  below it, and the cells holding that leaf's sequence are the leaf's root path, so a node sees
  exactly its ancestors and itself (positions = prefix length + depth);
- the committed prefix belongs to every sequence a tree uses (llama.cpp checks that a batch
  continues each of its sequences at the next position);
- logits and the features come from the same decode: the last hidden state after the final norm
  (llama.cpp's per-token embeddings with pooling NONE: what transformers' decoder returns) for an
  EAGLE-1/2 head, or the inputs of three decoder layers for an EAGLE-3 head (`set_feature_layers`,
  through llama.cpp's `llama_set_embeddings_layer_inp`, which its own EAGLE-3 drafting uses).

After verification `compact` keeps only the accepted path: `seq_rm` drops every other sequence
and the accepted leaf's tail. In exact mode (the default) every row of a decode computes the bits
it computes in plain decoding (docs/design.md, "llama.cpp backend"):
- keys are kept in bf16 (values in f16): llama.cpp's CPU flash attention then runs each query row
  over the cells in order whatever the batch and the cache length (with an F16 or F32 cache it
  splits a lone row's cache across threads from 512 cells on, and tiles batches of 64 rows or
  more); setup.sh's patched build does so in blocks of the cells a row sees, with a kernel of its own;
- rejected cells stay occupied under a sequence no token reads, since a freed cell would be
  refilled by a later token out of position order, changing the order of the attention sums;
- a decode of fewer rows than `min_rows` gets padding rows. Some weight types switch matmul
  kernels at a batch size (stock llamafile sgemm starts at two rows for F32, F16 and Q8_0 on x86;
  setup.sh's patched build keeps every row of F32, Q4_1 and Q8_0 rounding as it does alone), so
  `min_rows` is measured once per machine, model file and build, not assumed.

The draft head needs the target's token embedding and LM head as torch modules: they are read,
with the tokenizer, the config and the generation config, from the GGUF's parts folder
(`eaglespec.gguf_parts`, extracted once), or from its converted folder where the PyTorch backend
has written one (`eaglespec.target.convert_gguf`).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from eaglespec.backends.base import TargetOutput

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'eaglespec[llamacpp]' (llama-cpp-python >= 0.3.36)"


class LlamaCppError(RuntimeError):
    """llama.cpp is missing, or refused a model or a batch; the message says what to do. `reason`
    is what went wrong, `advice` (if any) what to do instead, which a caller that acts on its own
    (`--backend auto` switching to PyTorch) leaves out."""

    def __init__(self, reason: str, advice: str | None = None) -> None:
        super().__init__(f"{reason}; {advice}" if advice else reason)
        self.reason, self.advice = reason, advice


def llamacpp_available() -> bool:
    """Whether llama-cpp-python is installed (found, not imported)."""
    return importlib.util.find_spec("llama_cpp") is not None


def _lib():
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamaCppError(f"the llama.cpp backend needs llama-cpp-python: {INSTALL_HINT} ({e})") from None
    return llama_cpp


def lib_folder(lib) -> Path:
    """Where llama-cpp-python loads its shared libraries from: LLAMA_CPP_LIB_PATH where that is
    set, its own lib folder otherwise."""
    return Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(lib.__file__).parent / "lib")


def build_id(lib) -> str:
    """What identifies the llama.cpp build in use: llama-cpp-python's version and the size and
    mtime of its shared libraries. Part of the probe cache's key, since another build (an upgrade,
    other compile flags) may round rows otherwise."""
    folder = lib_folder(lib)
    libs = sorted(folder.glob("*.so")) + sorted(folder.glob("*.dylib")) + sorted(folder.glob("*.dll"))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in libs]
    return f"{getattr(lib, '__version__', '?')} {hashlib.sha256(repr(stats).encode()).hexdigest()[:12]}"


#: the revision of patches/llama-cpp-python-*.patch in this checkout (its ggml_cpu_eaglespec_patch())
PATCH_REVISION = 8


def patch_revision(lib) -> int:
    """The revision of eaglespec's llama.cpp patch (patches/llama-cpp-python-*.patch, which
    setup.sh builds in) that the loaded build carries; 0 for a stock build. With it, Q4_1 and Q8_0
    trees are verified by a batched kernel whose rows round as llama.cpp's one-row kernels do, F32
    trees (revision 3) by one that streams the weights as fast as a lone row does, and F16 and BF16
    models (revisions 4 and 5) by one that converts each weight once for up to three rows; with
    AVX-512, F32 tokens (revision 6) by that F32 kernel, from one to eight rows, at sgemm's width,
    and with AVX-512 BF16, BF16 tokens (revision 7) by one with ggml's bf16 dot-product arithmetic,
    and with AVX-512, F16 tokens (revision 8) by one with ggml's f16 dot-product arithmetic."""
    for so in sorted(lib_folder(lib).glob("*ggml-cpu*")):
        try:
            fn = ctypes.CDLL(str(so)).ggml_cpu_eaglespec_patch
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        return int(fn())
    return 0


def physical_cores() -> int:
    """Physical CPU cores usable by this process (hyperthreads slow llama.cpp's matmuls down)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n or usable, usable))


#: the most nodes one forward may verify: each leaf is a llama.cpp sequence, two more are this
#: backend's (parked cells, padding rows), and llama.cpp allows 256 (LLAMA_MAX_SEQ)
MAX_TREE = 250
#: the largest batch the row probe compares a smaller one with (`LlamaCppTarget.min_rows`)
ROW_PROBE_ROWS = 8
#: ggml type ids of the KV cache (ggml.h): exact mode keeps keys in bf16 (`LlamaCppTargetConfig.kv_types`)
GGML_TYPE_F16, GGML_TYPE_BF16 = 1, 30
#: model architectures (GGUF `general.architecture`) whose llama.cpp graph records each decoder
#: layer's input, which `llama_set_embeddings_layer_inp` needs (llama.cpp asserts otherwise)
LAYER_INPUT_ARCHS = frozenset({"llama", "qwen3", "qwen3moe"})
#: llama.cpp declares the layer-input calls in src/llama-ext.h without C linkage: their symbols
#: are the Itanium C++ names (Linux and macOS compilers)
LAYER_INPUT_SYMBOLS = ("_Z30llama_set_embeddings_layer_inpP13llama_contextjb",
                       "_Z30llama_get_embeddings_layer_inpP13llama_contextj")


def layer_input_api(lib):
    """(set, get): llama.cpp's `llama_set_embeddings_layer_inp(ctx, layer, on)` and
    `llama_get_embeddings_layer_inp(ctx, layer) -> float*` (every token of the last decode, in
    batch order), bound from the loaded library; None where this build lacks them."""
    cdll = getattr(getattr(lib, "llama_cpp", None), "_lib", None)
    try:
        set_fn, get_fn = (getattr(cdll, name) for name in LAYER_INPUT_SYMBOLS)
    except (AttributeError, TypeError):
        return None
    set_fn.argtypes, set_fn.restype = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_bool], None
    get_fn.argtypes, get_fn.restype = [ctypes.c_void_p, ctypes.c_uint32], ctypes.POINTER(ctypes.c_float)
    return set_fn, get_fn


@dataclass(frozen=True)
class LlamaCppTargetConfig:
    """How llama.cpp runs the target."""

    threads: int | None = None  # llama.cpp threads (None: the physical cores)
    max_len: int = 2048  # committed tokens + one tree, as the torch target's cache
    max_tree: int = 48  # most nodes (and leaves) one forward verifies
    #: every row of a decode step gets the bits it gets in plain decoding, so greedy speculative
    #: output equals this backend's plain output (docs/design.md, "llama.cpp backend"): bf16 keys in the KV
    #: cache, rejected cells kept occupied so no later token lands before an earlier one
    #: (attention sums run in cell order), and padding rows up to the measured `min_rows`.
    #: False: llama.cpp's f16 cache, no padding, rejected cells freed and reused (not bit-exact)
    exact: bool = True
    #: return the last hidden state with the logits, what a draft head reads. llama.cpp then
    #: computes every row's logits, the prompt's too (for a 262k vocabulary, about 10 ms a prompt
    #: token). False (no head, and not exact): logits only, and a prompt's LM head runs for its
    #: last token alone
    features: bool = True
    #: KV cells beyond max_len for rejected nodes kept occupied (exact); when they run out the
    #: committed tokens are copied, bit for bit, into one contiguous block (0: max_len)
    spare_cells: int = 0

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.max_len < 16:
            raise ValueError(f"max_len must be >= 16, got {self.max_len}")
        if not 1 <= self.max_tree <= MAX_TREE:
            raise ValueError(f"max_tree must be in [1, {MAX_TREE}], got {self.max_tree}")
        if self.spare_cells < 0:
            raise ValueError(f"spare_cells must be >= 0, got {self.spare_cells}")
        if self.exact and not self.features:  # exact rows need every row's LM head, as trees compute it
            raise ValueError("features=False needs exact=False")

    @property
    def n_threads(self) -> int:
        return self.threads or physical_cores()

    @property
    def n_seq_needed(self) -> int:
        """llama.cpp sequences: one per leaf, one for parked cells, one for padding rows."""
        return self.max_tree + 2

    @property
    def kv_types(self) -> tuple[int, int]:
        """The ggml types of the cache's keys and values. Exact mode keeps keys in bf16: llama.cpp's
        CPU flash attention splits a lone row over the cache, or tiles 64+ rows, only when keys
        and values are both f16 or f32, and either changes a row's bits with the batch. Values stay
        f16, which the one-row path reads without converting each cell. The fast mode keeps
        llama.cpp's f16 for both."""
        return (GGML_TYPE_BF16 if self.exact else GGML_TYPE_F16), GGML_TYPE_F16

    @property
    def n_ctx(self) -> int:
        """KV cells: the sequence, plus room for rejected nodes when they stay occupied."""
        return self.max_len + (self.spare_cells or self.max_len) if self.exact else self.max_len


# -- trees as sequences ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TreeSequences:
    """A tree's nodes as llama.cpp sequences: leaf l is sequence l; node i belongs to the sequences
    of the leaves below it (itself included).

    For parents [-1, 0, 0, 1] (root 0 with children 1, 2; 3 under 1): leaves [2, 3];
    member[:, 0] = [1, 0, 1, 1] (leaf 2's path), member[:, 1] = [1, 1, 0, 1] (leaf 3's path), so
    node 0 holds sequences [0, 1], node 1 [1], node 2 [0], node 3 [1].
    """

    leaves: np.ndarray  # [L] node index of each leaf, ascending
    member: np.ndarray  # [q, L] bool: node i is on leaf l's root path

    def seq_ids(self, node: int) -> list[int]:
        return np.flatnonzero(self.member[node]).tolist()


def tree_sequences(tree_mask: np.ndarray) -> TreeSequences:
    """The sequences of a tree given its ancestor-or-self mask [q, q] (row i sees column j iff j is
    i or an ancestor of i). A leaf is a node no other node sees."""
    mask = np.asarray(tree_mask, dtype=bool)
    seen_by = mask.sum(axis=0)  # [q] how many nodes see each node (itself included)
    leaves = np.flatnonzero(seen_by == 1)
    return TreeSequences(leaves=leaves, member=mask[leaves].T.copy())


# -- the committed cache ---------------------------------------------------------------------------

class SequenceCache:
    """The committed tokens in llama.cpp's KV cache, and the last verified tree's layout.

    `length` counts the committed tokens. A forward puts its nodes in the cache under the tree's
    sequences (`TreeSequences`) without moving `length`; `compact(nodes)` then keeps the accepted
    path: the prefix and those nodes end up in one sequence (`home`), and every other cell of the
    tree is freed, or, in exact mode, parked under `trash`, a sequence no token ever reads."""

    def __init__(self, target: LlamaCppTarget) -> None:
        self._t = target
        self.length = 0
        self.home = 0  # the sequence that holds the committed tokens
        self.holders: set[int] = {0}  # the sequences that hold them (a tree may use any of them)
        self.leaf_limit = target.n_seq - 2
        self.trash = target.n_seq - 2  # parked rejected cells
        self.pad = target.n_seq - 1  # padding rows of a short decode, freed after it
        self.parked = 0  # cells under `trash`
        self._tree: TreeSequences | None = None
        self._seq_of_leaf: list[int] = []

    def reset(self) -> None:
        self._t._lib.llama_memory_clear(self._t._mem, True)
        self.length, self.home, self.holders, self.parked, self._tree = 0, 0, {0}, 0, None

    def leaf_seqs(self, n_leaves: int) -> list[int]:
        """Sequence ids for a tree's leaves, the home first; each gets the committed prefix
        (`seq_cp` only adds a sequence bit to the prefix's cells: no data moves)."""
        seqs = [self.home] + [s for s in range(self.leaf_limit) if s != self.home][: n_leaves - 1]
        for s in seqs:
            if s not in self.holders:
                self._t._lib.llama_memory_seq_cp(self._t._mem, self.home, s, -1, -1)
                self.holders.add(s)
        return seqs

    def hold_tree(self, tree: TreeSequences | None, seqs: list[int]) -> None:
        self._tree, self._seq_of_leaf = tree, seqs

    def drop(self, seq: int, park_from: int, remove_from: int) -> None:
        """Park `seq`'s cells from position `park_from` on under `trash` (exact mode; otherwise
        they are freed), then take `seq` off its cells from `remove_from` on (-1: all)."""
        lib, mem = self._t._lib, self._t._mem
        if self._t.config.exact:
            lib.llama_memory_seq_cp(mem, seq, self.trash, park_from, -1)
        lib.llama_memory_seq_rm(mem, seq, remove_from, -1)

    def compact(self, nodes: torch.Tensor) -> None:
        """Commit the accepted path `nodes` ([a] node indices, root first, in path order) of the
        last forward and drop the rest of its tree."""
        a = int(nodes.shape[0])  # host sync: once per step
        tree = self._tree
        self._tree = None
        if a == 0:  # nothing kept (the cost probe): drop all the last forward wrote
            for s in self._seq_of_leaf if tree is not None else ():
                if s != self.home:
                    self.drop(s, self.length, -1)
            self.drop(self.home, self.length, self.length)
            self.parked += 1 if tree is None else tree.member.shape[0]
            self.holders = {self.home}
            return
        if tree is None:  # a lone token: nothing else of ours was written
            self.length += a
            return
        q = tree.member.shape[0]
        keep = self._seq_of_leaf[int(np.flatnonzero(tree.member[int(nodes[-1])])[0])]
        for s in self._seq_of_leaf:
            if s != keep:
                self.drop(s, self.length, -1)
        self.drop(keep, self.length + a, self.length + a)  # the accepted leaf's own tail
        self.length += a
        self.parked += q - a
        self.home, self.holders = keep, {keep}

    def room(self, q: int) -> None:
        """Make sure q more cells fit: in exact mode, once the parked cells fill the spare room,
        copy the committed tokens' keys and values (bit for bit) into one contiguous block."""
        if self.length + self.parked + q + 1 <= self._t.config.n_ctx:
            return
        lib, ctx, mem = self._t._lib, self._t._ctx, self._t._mem
        size = lib.llama_state_seq_get_size(ctx, self.home)
        buf = (ctypes.c_uint8 * size)()
        if lib.llama_state_seq_get_data(ctx, buf, size, self.home) != size:
            raise LlamaCppError("llama.cpp could not save the committed sequence")
        lib.llama_memory_clear(mem, False)
        if lib.llama_state_seq_set_data(ctx, buf, size, 0) != size:
            raise LlamaCppError("llama.cpp could not restore the committed sequence")
        self.home, self.holders, self.parked = 0, {0}, 0


# -- the target ------------------------------------------------------------------------------------

def _silence(lib) -> None:
    """Route llama.cpp's log lines to this module's logger at debug level (once per process)."""
    if getattr(_silence, "cb", None) is not None:
        return

    @lib.llama_log_callback
    def cb(level, text, user_data):  # noqa: ARG001
        if log.isEnabledFor(logging.DEBUG):
            log.debug("llama.cpp: %s", text.decode(errors="replace").rstrip())

    _silence.cb = cb  # kept alive: llama.cpp holds the pointer
    lib.llama_log_set(cb, ctypes.c_void_p(0))


def target_key(gguf: Path, config: LlamaCppTargetConfig, lib=None) -> str:
    """What a measured cost curve or row probe of `gguf` run under `config` depends on: the llama.cpp
    build (`lib`, llama-cpp-python's module; None: the installed one), the weights (file name,
    size, mtime), threads, the mode and the cache types."""
    st = gguf.stat()
    ident = json.dumps(["llamacpp", build_id(lib or _lib()), gguf.name, st.st_size, st.st_mtime_ns, config.n_threads,
                        config.exact, *config.kv_types])
    return f"llamacpp-{gguf.stem}-t{config.n_threads}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def kept_min_rows(gguf: str | Path, config: LlamaCppTargetConfig) -> int | None:
    """The row probe's verdict for `gguf` under an exact `config`, as kept on this machine, without
    loading the model: `LlamaCppTarget.min_rows` (None: no padding makes rows round alike), or 0
    where it was never measured (or there is no such file)."""
    gguf = Path(gguf)
    return _kept(_row_probes(target_key(gguf, config))) if gguf.is_file() else 0


def _row_probes(key: str):
    """The probe cache entry of the row probe (`LlamaCppTarget._min_rows`) for a `target_key`."""
    from eaglespec.backends import machine_id
    from eaglespec.paths import ProbeCache

    return ProbeCache(machine_id("cpu"), hashlib.sha256(f"row kernels v2\n{key}".encode()).hexdigest()[:16])


def _kept(probes) -> int | None:
    """A kept `min_rows` (None included), or 0 for none or one out of range."""
    found = probes.get("min_rows", default=0, kind=int)  # None: no padding makes rows invariant
    return found if found is None or 1 <= found <= ROW_PROBE_ROWS else 0


class LlamaCppTarget:
    """A GGUF target run by llama.cpp, with eaglespec's tree forward and accepted-path cache.

    Implements `eaglespec.backends.base.TargetModel`. Features are the last hidden state (EAGLE-1/2
    heads) or, after `set_feature_layers`, the inputs of decoder layers (EAGLE-3 heads)."""

    #: llama.cpp returns a position's last hidden state only with its logits (layer inputs come
    #: without them: `set_feature_layers`)
    prompt_hidden_costs_logits = True

    def __init__(self, gguf: str | Path, config: LlamaCppTargetConfig = LlamaCppTargetConfig(), folder: str | Path | None = None) -> None:
        """gguf: the model file; folder: where its tokenizer, config, embedding and LM head are, a
        parts or a converted folder (None: `_torch_parts_folder(gguf)`, extracted once and cached)."""
        lib = self._lib = _lib()
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise LlamaCppError(f"GGUF file not found: {self.gguf}")
        self.config = config
        self.max_len = config.max_len
        self.n_seq = config.n_seq_needed
        self.folder = Path(folder) if folder is not None else _torch_parts_folder(self.gguf)
        self._load_torch_parts(self.folder)
        _silence(lib)
        lib.llama_backend_init()
        self.patch = patch_revision(lib)  # eaglespec's kernels in this build (0: a stock one)
        if not self.patch:
            log.info("this llama-cpp-python is a stock build: a draft tree of a Q4_1 or Q8_0 model is verified "
                     "without a batched kernel (setup.sh builds llama.cpp with eaglespec's, patches/)")
        elif self.patch < PATCH_REVISION:
            log.info("this llama-cpp-python carries revision %d of eaglespec's patch; the checkout has revision %d "
                     "(cheaper F32, F16 and BF16 trees, faster attention over the exact cache): "
                     "rerun setup.sh to build it", self.patch, PATCH_REVISION)
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self._model = lib.llama_model_load_from_file(str(self.gguf).encode(), mparams)
        if not self._model:
            raise LlamaCppError(f"llama.cpp could not load {self.gguf}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = max(config.max_len, 512)
        cparams.n_ubatch = cparams.n_batch  # a prompt or a tree is one graph
        cparams.n_seq_max = self.n_seq
        cparams.kv_unified = True  # one KV buffer that every sequence's tokens share
        cparams.embeddings = config.features
        cparams.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        cparams.n_threads = cparams.n_threads_batch = config.n_threads
        # flash attention: each query row runs over the cells in order, skipping masked ones, so a
        # row's bits do not depend on the other rows (the unfused path's matmuls over the batch do)
        cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        cparams.type_k, cparams.type_v = config.kv_types
        cparams.no_perf = True
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lib.llama_model_free(self._model)
            raise LlamaCppError(f"llama.cpp could not create a context for {self.gguf} (n_ctx {config.n_ctx})")
        self._mem = lib.llama_get_memory(self._ctx)
        n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model))
        n_embd = lib.llama_model_n_embd(self._model)
        if n_vocab != self.vocab_size or n_embd != self.hidden_size:
            raise LlamaCppError(f"{self.gguf}: llama.cpp reads vocab {n_vocab} x hidden {n_embd}, the converted folder "
                                f"{self.vocab_size} x {self.hidden_size}")
        self._batch = lib.llama_batch_init(cparams.n_batch, 0, self.n_seq)
        self._batch_cap = cparams.n_batch
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(self._batch_cap,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(self._batch_cap,))
        self._n_seq_id = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self._batch_cap,))
        self._logits_flag = np.ctypeslib.as_array(self._batch.logits, shape=(self._batch_cap,))
        self._seq_rows: list[np.ndarray | None] = [None] * self._batch_cap  # views made on first use
        self.cache = SequenceCache(self)
        self.feature_layers: tuple[int, ...] | None = None
        self._layer_api = None  # (set, get) of llama.cpp's layer inputs, bound on first use
        self._hidden_off = False  # llama.cpp's embeddings turned off for a while (`prefill`)
        #: decodes of fewer rows get padding rows up to this many (exact mode; `_probe_min_rows`);
        #: None: no padding makes rows batch-invariant (plain decoding only, `check_drafting`)
        self.min_rows: int | None = self._min_rows() if config.exact else 1

    def _load_torch_parts(self, folder: Path) -> None:
        """Tokenizer, config and the embedding and LM head from a parts or converted folder. The
        configs are read as JSON: transformers' config classes cost about half a second of imports
        at each start."""
        from safetensors import safe_open

        from eaglespec.paths import PARTS_FILE

        self.model_config: dict = _read_json(folder / "config.json")
        self.tokenizer: PreTrainedTokenizerBase | None = _tokenizer(folder)
        generation = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
        self.eos_token_ids = _ids(generation.get("eos_token_id"))
        weights = folder / PARTS_FILE if (folder / PARTS_FILE).is_file() else folder / "model.safetensors"
        with safe_open(str(weights), framework="pt") as f:
            keys = set(f.keys())
            embed_key = next(k for k in keys if k.endswith("embed_tokens.weight"))
            embed_w = f.get_tensor(embed_key)  # [V, H] float32
            head_w = f.get_tensor("lm_head.weight") if "lm_head.weight" in keys else embed_w
        self.embed = nn.Embedding.from_pretrained(embed_w, freeze=True)
        self.lm_head = nn.Linear(head_w.shape[1], head_w.shape[0], bias=False, device="meta")
        self.lm_head.weight = nn.Parameter(head_w, requires_grad=False)

    # -- what the engine reads --------------------------------------------------------------------

    device = torch.device("cpu")
    dtype = torch.float32  # of logits, features and the torch modules; the GGUF's own types may be smaller

    @property
    def hidden_size(self) -> int:
        return self.lm_head.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def num_layers(self) -> int:
        text = self.model_config.get("text_config") or {}  # a multimodal folder keeps the decoder's here
        return int(self.model_config.get("num_hidden_layers") or text["num_hidden_layers"])

    def set_feature_layers(self, layer_ids) -> None:
        """Features from here on: the inputs of these decoder layers side by side ([q, len * H], an
        EAGLE-3 head's), or None: the last hidden state ([q, H]). With layer inputs llama.cpp
        returns no hidden state, so a prompt's LM head runs for its last token alone."""
        ids = None if layer_ids is None else tuple(int(i) for i in layer_ids)
        if ids == self.feature_layers:
            return
        if ids is not None:
            self._check_layer_inputs(ids)
        setter = self._layer_api[0] if self._layer_api else None
        for i in self.feature_layers or ():
            setter(self._ctx, i, False)
        for i in ids or ():
            setter(self._ctx, i, True)
        self.feature_layers = ids
        self._sync_embeddings()

    def _check_layer_inputs(self, ids: tuple[int, ...]) -> None:
        lib = self._lib
        if not self.config.features:
            raise LlamaCppError("this llama.cpp target was made without features (features=False)")
        self._layer_api = self._layer_api or layer_input_api(lib)
        if self._layer_api is None:
            raise LlamaCppError("this llama-cpp-python build does not export llama.cpp's layer inputs, which an "
                                "EAGLE-3 head reads", f"use --backend torch, or {INSTALL_HINT}")
        arch = self.architecture
        if arch not in LAYER_INPUT_ARCHS:
            raise LlamaCppError(f"llama.cpp does not return the layer inputs an EAGLE-3 head reads for {arch!r} "
                                f"models (only {', '.join(sorted(LAYER_INPUT_ARCHS))})", "use --backend torch")
        n_layer = lib.llama_model_n_layer(self._model)
        if not ids or any(not 0 <= i < n_layer for i in ids):
            raise LlamaCppError(f"feature layers {list(ids)} outside the model's {n_layer} layers")

    @property
    def architecture(self) -> str:
        """The GGUF's `general.architecture` as llama.cpp read it."""
        buf = ctypes.create_string_buffer(128)
        n = self._lib.llama_model_meta_val_str(self._model, b"general.architecture", buf, len(buf))
        return buf.value.decode() if n >= 0 else "?"

    @property
    def build(self) -> str:
        """The llama.cpp build, for reports: llama-cpp-python's version and eaglespec's patch."""
        return f"llama-cpp-python {getattr(self._lib, '__version__', '?')}, " + (
            f"eaglespec's patch {self.patch}" if self.patch else "a stock build")

    @property
    def max_tree(self) -> int:
        """The most nodes one forward verifies (drafters and the cost probe keep within it)."""
        return self.config.max_tree

    def cost_key(self) -> str:
        """What a measured cost curve or row probe depends on (`target_key`)."""
        return target_key(self.gguf, self.config, self._lib)

    def reset(self) -> None:
        self.cache.reset()

    def _min_rows(self) -> int | None:
        """`_probe_min_rows`, measured once per machine and `cost_key()` and kept in the probe cache."""
        probes = _row_probes(self.cost_key())
        found = _kept(probes)
        if found != 0:
            return found
        print(f"measuring how llama.cpp rounds {self.gguf.name} in batches of each size (once, a few seconds)",
              file=sys.stderr, flush=True)
        rows = self._probe_min_rows()
        if rows is None:
            log.info("%s: a row's bits depend on the batch whatever the padding (measured); exact drafting "
                     "is refused on this backend", self.gguf.name)
        else:
            log.info("%s: decodes of fewer than %d rows get padding rows (measured)", self.gguf.name, rows)
        probes.put("min_rows", rows)
        probes.save()
        return rows

    @torch.inference_mode()
    def _probe_min_rows(self, context: int = 16) -> int | None:
        """The fewest rows m (1 .. ROW_PROBE_ROWS) such that, with decodes of fewer rows padded to
        m, every row of a chain of q tokens gets the bits it gets in a chain of 2 * ROW_PROBE_ROWS,
        for q = 1 .. ROW_PROBE_ROWS and 12: from m rows on, every matmul takes the kernel larger
        batches take, whatever a row's place in the batch. None when no m does (some kernels
        switch at other batch sizes, or treat rows by their place: llama.cpp's repacked K-quant
        GEMMs take rows in blocks of 4 and the rest one by one). Leaves the cache empty."""
        cache = self.cache
        cache.reset()
        longest = 2 * ROW_PROBE_ROWS
        tokens = torch.arange(context + longest) * 7919 % (self.vocab_size - 100) + 100  # fixed, varied ids
        self.min_rows = 1
        self.prefill(tokens[:context])

        def rows(q: int, pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:  # logits [q, V], features [q, H]
            self.min_rows = pad_to
            out = self.forward(tokens[context:context + q])
            cache.compact(torch.empty(0, dtype=torch.long))
            return out.logits, out.features

        ref_logits, ref_feats = rows(longest, 1)

        def agrees(q: int, pad_to: int) -> bool:
            logits, feats = rows(q, pad_to)
            return torch.equal(logits, ref_logits[:q]) and torch.equal(feats, ref_feats[:q])

        sizes = list(range(1, ROW_PROBE_ROWS + 1)) + [12]
        unpadded_ok = {q: agrees(q, 1) for q in sizes}
        found = None
        for m in range(1, ROW_PROBE_ROWS + 1):
            if all(unpadded_ok[q] for q in sizes if q >= m) and all(agrees(q, m) for q in range(1, m)):
                found = m
                break
        self.min_rows = found or 1
        cache.reset()
        return found

    def check_drafting(self) -> None:
        """Raise `LlamaCppError` where this target cannot verify draft trees exactly: in exact mode,
        when no padding makes its rows round alike in every batch (`min_rows` is None)."""
        if self.config.exact and self.min_rows is None:
            raise LlamaCppError(f"{self.gguf.name}: on this CPU llama.cpp rounds a token differently with the size "
                                "of its batch for this weight format (measured), so a draft tree cannot be verified "
                                "exactly", "use --backend torch, --no-draft, or --llamacpp-fast (not exact)")

    def close(self) -> None:
        """Free llama.cpp's context, model and batch (also done when the object is collected)."""
        lib = self._lib
        if getattr(self, "_batch", None) is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass

    # -- forwards ----------------------------------------------------------------------------------

    def _seq_row(self, i: int) -> np.ndarray:
        row = self._seq_rows[i]
        if row is None:
            row = self._seq_rows[i] = np.ctypeslib.as_array(self._batch.seq_id[i], shape=(self.n_seq,))
        return row

    def _decode(self, tokens: np.ndarray, positions: np.ndarray, seqs: list[list[int]] | None,
                outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One llama_decode. tokens, positions: [q]; seqs[i]: node i's sequence ids (None: all in
        `cache.home`); the last `outputs` rows return logits. Features: with `feature_layers`,
        those layers' inputs for all q rows ([q, len * H]); else with `config.features` the last
        hidden state, which llama.cpp returns for every row, each then an output with logits
        (outputs must be q); else none ([outputs, 0]). A decode of fewer rows than `min_rows`
        gets padding rows (under `cache.pad`, freed afterwards), flagged as outputs when its own
        rows all are, so the last layer runs on as many rows either way. Returns logits
        [outputs, V] float32 and the features, copies."""
        lib, cache = self._lib, self.cache
        q = tokens.shape[0]
        n = max(q, self.min_rows or 1)
        pad = n > q
        if n > self._batch_cap:
            raise ValueError(f"{q} tokens exceed llama.cpp's batch of {self._batch_cap}")
        hidden = self._returns_hidden  # llama.cpp's embeddings: every row an output
        if hidden and outputs != q:
            raise ValueError("with the last hidden state every row is an output")
        self._batch.n_tokens = n
        self._tokens[:q] = tokens
        self._pos[:q] = positions
        flagged = n if outputs == q else outputs  # llama.cpp's output rows, in batch order
        self._logits_flag[:n] = 1 if outputs == q else 0
        self._logits_flag[q - outputs:q] = 1
        if seqs is None:
            self._n_seq_id[:q] = 1
            for i in range(q):
                self._seq_row(i)[0] = cache.home
        else:
            for i, ids in enumerate(seqs):
                self._n_seq_id[i] = len(ids)
                self._seq_row(i)[: len(ids)] = ids
        if pad:  # the first token again, under a sequence of its own: only the row count matters
            self._tokens[q:n] = tokens[0]
            self._pos[q:n] = positions[0] + np.arange(n - q, dtype=np.int32)
            self._n_seq_id[q:n] = 1
            for i in range(q, n):
                self._seq_row(i)[0] = cache.pad
        rc = lib.llama_decode(self._ctx, self._batch)
        if pad:  # freed, not parked: they are the last cells written, so the next tokens refill them in order
            lib.llama_memory_seq_rm(self._mem, cache.pad, -1, -1)
        if rc != 0:
            raise LlamaCppError(f"llama_decode failed ({rc}) on {q} tokens from position {int(positions[0])}")
        logits = np.ctypeslib.as_array(lib.llama_get_logits(self._ctx), shape=(flagged, self.vocab_size))
        logits = torch.from_numpy(logits[:outputs].copy())  # the flagged rows of ours come first
        if self.feature_layers is not None:
            get = self._layer_api[1]
            feats = np.concatenate([np.ctypeslib.as_array(get(self._ctx, i), shape=(n, self.hidden_size))[:q]
                                    for i in self.feature_layers], axis=1)  # [q, len * H], a copy
            return logits, torch.from_numpy(feats)
        if not hidden:
            return logits, torch.empty(outputs, 0)
        feats = np.ctypeslib.as_array(lib.llama_get_embeddings(self._ctx), shape=(n, self.hidden_size))
        return logits, torch.from_numpy(feats[:q].copy())

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None, last_logits_only: bool = False) -> TargetOutput:
        """Run q new tokens after the committed prefix (as `Target.forward`): tokens [q] long,
        positions [q] (length + depth), tree_mask [q, q] bool ancestor-or-self (None: a causal
        chain); last_logits_only: logits [1, V] of the last row. Features of all rows either way
        ([q, F], `_decode`; [q or 1, 0] without features); the last hidden state makes every row
        an output, with its logits (`prefill` spares a prompt's first rows that).
        The nodes stay in the cache until `cache.compact` keeps the accepted ones."""
        from eaglespec.backends.base import TargetOutput

        q = tokens.shape[0]
        cache = self.cache
        if cache.length + q > self.max_len:
            raise ValueError(f"sequence of {cache.length + q} tokens exceeds the cache of {self.max_len}")
        tok = tokens.numpy().astype(np.int32, copy=False)  # host copy (CPU tensors: a view)
        pos = (np.arange(cache.length, cache.length + q, dtype=np.int32) if positions is None
               else positions.numpy().astype(np.int32, copy=False))
        cache.room(max(q, self.min_rows or 1))  # before the tree's sequences are set up: a repack renumbers them
        if q == 1:
            logits, feats = self._decode(tok, pos, None, 1)
            cache.hold_tree(None, [])
        else:
            if tree_mask is None:  # a causal chain: one leaf, the last node
                tree = TreeSequences(leaves=np.array([q - 1]), member=np.ones((q, 1), dtype=bool))
            else:
                tree = tree_sequences(tree_mask.numpy())
            n_leaves = tree.leaves.shape[0]
            if n_leaves > cache.leaf_limit:
                raise ValueError(f"a tree of {n_leaves} leaves exceeds llama.cpp's {cache.leaf_limit} sequences "
                                 "(raise max_tree)")
            if q > self.config.max_tree and tree_mask is not None:
                raise ValueError(f"a tree of {q} nodes exceeds max_tree {self.config.max_tree}")
            seqs = cache.leaf_seqs(n_leaves)
            node_seqs = [[seqs[l] for l in np.flatnonzero(row)] for row in tree.member]
            # the last hidden state needs every row as an output; layer inputs and no features do not
            last_only = last_logits_only and not self._returns_hidden
            logits, feats = self._decode(tok, pos, node_seqs, 1 if last_only else q)
            cache.hold_tree(tree, seqs)
        if last_logits_only:
            logits = logits[-1:]
        return TargetOutput(logits=logits, features=feats)

    @property
    def _returns_hidden(self) -> bool:
        """Decodes return the last hidden state (llama.cpp's embeddings), so every row is an output."""
        return self.config.features and self.feature_layers is None and not self._hidden_off

    def _sync_embeddings(self) -> None:
        """llama.cpp computes its embeddings exactly while decodes return the last hidden state."""
        self._lib.llama_set_embeddings(self._ctx, self._returns_hidden)

    @contextmanager
    def _without_hidden(self) -> Iterator[None]:
        """Decodes in this block return no hidden state, so only their flagged rows' LM head runs."""
        self._hidden_off = True
        self._sync_embeddings()
        try:
            yield
        finally:
            self._hidden_off = False
            self._sync_embeddings()

    def _commit_chain(self, tokens: torch.Tensor) -> TargetOutput:
        """Decode a causal chain after the committed tokens and commit it: logits of its last token."""
        out = self.forward(tokens, last_logits_only=True)
        self.cache.hold_tree(None, [])
        self.cache.length += tokens.shape[0]
        return out

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, feature_rows: int | None = None) -> TargetOutput:
        """Process a prompt from an empty cache and commit it: logits of the last token ([1, V]),
        features of the last `feature_rows` tokens (None: all; [n, F]).

        llama.cpp returns the last hidden state only with logits, for every row of a decode. So
        where fewer rows' hidden states are wanted, the prompt runs as two decodes: the head of it
        with embeddings off, which computes no LM head but the last row's, then the last
        max(feature_rows, min_rows) tokens with embeddings on. Each row's keys, values and
        outputs are those of one decode (rows round alike in decodes of min_rows or more, the
        exact mode's premise), and a small model's LM head costs a fair share of a token's forward:
        a 300-token SmolLM2 Q4_1 prompt took 1.92 s with every row's and 1.55 s
        without on a Zen 3 (docs/benchmarks.md)."""
        self.cache.reset()
        n = tokens.shape[0]
        tail = n
        if feature_rows is not None and self._returns_hidden:
            tail = min(n, max(feature_rows, self.min_rows or 1, 1))
        if tail < n:
            with self._without_hidden():
                self._commit_chain(tokens[: n - tail])
        return self._commit_chain(tokens[n - tail:]).last_features(feature_rows)


def _ids(value) -> frozenset[int]:
    if value is None:
        return frozenset()
    if isinstance(value, int):
        return frozenset({value})
    return frozenset(int(v) for v in value)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LlamaCppError(f"cannot read {path}: {e}") from None


def _tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer. A plain tokenizers-backed one (what a converted SmolLM2 holds) is
    built by its class directly: `AutoTokenizer` would first load the model's transformers config,
    about 0.7 s of imports, to end at the same class (tests/test_llamacpp_backend.py)."""
    path = folder / "tokenizer_config.json"
    config = _read_json(path) if path.is_file() else {}
    if config.get("tokenizer_class") == "TokenizersBackend" and "auto_map" not in config:
        from transformers import TokenizersBackend

        return TokenizersBackend.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _torch_parts_folder(gguf: Path) -> Path:
    """Where the GGUF's tokenizer, configs, embedding and LM head are: its converted folder where the
    PyTorch backend has written one, else its parts folder, extracted once (`eaglespec.gguf_parts`).
    Found in the cache without importing transformers."""
    from eaglespec.paths import find_converted, find_parts

    found = find_converted(gguf) or find_parts(gguf)
    if found is not None:
        return found
    from eaglespec.gguf_parts import extract_parts

    return extract_parts(gguf)
