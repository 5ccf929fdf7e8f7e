"""What the exact mode's bf16 keys cost, against f16 keys made exact by ggml's reference switch.

The llama.cpp backend keeps keys in bf16 because with f16 keys llama.cpp's CPU flash attention
splits a lone row over the cache (512+ cells) and tiles 64+ rows, and either changes a row's bits
with the batch (docs/design.md, "llama.cpp backend"). ggml has a per-backend switch that turns both
paths off, `ggml_backend_cpu_set_use_ref`, but llama.cpp gives no handle to the CPU backend a
context creates. This tool gets one for measurement only: it wraps the CPU device's
`init_backend` entry while a second target is created (after checking the entries before it
against ggml's exported getters), then compares, in one process and interleaved:

- A: the exact mode as shipped (bf16 keys, f16 values);
- B: f16 keys and values, the switch on for decodes; prompts with it off (tiled, as llama.cpp
  runs them) and on.

    PYTHONPATH=src python tools/llamacpp_use_ref.py [--gguf F.gguf] [--contexts 100,300,700]
    PYTHONPATH=src python tools/llamacpp_use_ref.py --check ../shared/data/spec_bench/question.jsonl

--check also decodes long prompts plainly and with a fixed 12-node tree on B (prompts tiled, so
the drafter's prompt split differs from plain decoding's) and reports whether the texts match.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

CPU_DEVICE = 0  # enum ggml_backend_dev_type
#: struct ggml_backend_device_i: get_name, get_description, get_memory, get_type, get_props, init_backend
GET_NAME, GET_TYPE, INIT_BACKEND = 0, 3, 5


class CpuBackendCatcher:
    """Records the CPU backends created while installed (a context manager)."""

    def __init__(self) -> None:
        import llama_cpp

        from eaglespec.backends.llamacpp import lib_folder

        lib = lib_folder(llama_cpp)
        llama_cpp.llama_backend_init()
        self.ggml = ctypes.CDLL(str(lib / "libggml.so"))
        self.cpu = ctypes.CDLL(str(lib / "libggml-cpu.so"))
        g = self.ggml
        g.ggml_backend_dev_by_type.restype, g.ggml_backend_dev_by_type.argtypes = ctypes.c_void_p, [ctypes.c_int]
        g.ggml_backend_dev_name.restype, g.ggml_backend_dev_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        g.ggml_backend_dev_type.restype, g.ggml_backend_dev_type.argtypes = ctypes.c_int, [ctypes.c_void_p]
        self.cpu.ggml_backend_cpu_set_use_ref.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        self.cpu.ggml_backend_is_cpu.restype, self.cpu.ggml_backend_is_cpu.argtypes = ctypes.c_bool, [ctypes.c_void_p]
        self.dev = g.ggml_backend_dev_by_type(CPU_DEVICE)
        slot = ctypes.c_void_p.from_address
        name = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(slot(self.dev + 8 * GET_NAME).value)(self.dev)
        kind = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(slot(self.dev + 8 * GET_TYPE).value)(self.dev)
        if name != g.ggml_backend_dev_name(self.dev) or kind != g.ggml_backend_dev_type(self.dev):
            raise SystemExit("this ggml's device interface is laid out otherwise; nothing measured")
        self.slot = slot(self.dev + 8 * INIT_BACKEND)
        init = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)
        self.original = init(self.slot.value)
        self.backends: list[int] = []

        def wrapped(dev, params):
            backend = self.original(dev, params)
            self.backends.append(backend)
            return backend

        self.wrapper = init(wrapped)  # kept referenced while installed

    def __enter__(self) -> CpuBackendCatcher:
        self.saved = self.slot.value
        self.slot.value = ctypes.cast(self.wrapper, ctypes.c_void_p).value
        return self

    def __exit__(self, *exc) -> None:
        self.slot.value = self.saved

    def use_ref(self, on: bool) -> None:
        for b in self.backends:
            if self.cpu.ggml_backend_is_cpu(b):
                self.cpu.ggml_backend_cpu_set_use_ref(b, on)


def f16_target(gguf: str, catcher: CpuBackendCatcher):
    """A llama.cpp target with f16 keys and values, its CPU backend caught."""
    from eaglespec.backends import llamacpp as L

    shipped = L.LlamaCppTargetConfig.kv_types
    L.LlamaCppTargetConfig.kv_types = property(lambda self: (L.GGML_TYPE_F16, L.GGML_TYPE_F16))
    try:
        with catcher:
            return L.LlamaCppTarget(gguf, L.LlamaCppTargetConfig(threads=2))
    finally:
        L.LlamaCppTargetConfig.kv_types = shipped


def timed(target, ids: torch.Tensor, n: int, before_prompt, before_decode, decodes: int = 20) -> tuple[float, float]:
    """(seconds of an n-token prompt, median seconds of a one-token decode after it)."""
    target.reset()
    before_prompt()
    start = time.perf_counter()
    target.prefill(ids[:n], feature_rows=0)
    prompt = time.perf_counter() - start
    before_decode()
    one = []
    for i in range(decodes):
        start = time.perf_counter()
        target.forward(ids[n + i:n + i + 1], torch.tensor([n + i]), torch.ones(1, 1, dtype=torch.bool))
        target.cache.compact(torch.tensor([0]))
        one.append(time.perf_counter() - start)
    return prompt, statistics.median(one)


def check(target, catcher: CpuBackendCatcher, questions: str) -> None:
    from eaglespec.backends import draft_setup
    from eaglespec.bench.run import load_questions, select
    from eaglespec.drafter import TreeConfig
    from eaglespec.generate import GenerationConfig, Generator
    from eaglespec.heads import default_head_path, load_drafter

    original_forward, original_prefill = target.forward, target.prefill

    def forward(*a, **k):
        catcher.use_ref(True)
        return original_forward(*a, **k)

    def prefill(*a, **k):
        catcher.use_ref(False)
        return original_prefill(*a, **k)

    target.forward, target.prefill = forward, prefill
    tree = TreeConfig(kind="dynamic", top_k=4, depth=5, total_tokens=12)  # fixed: every step drafts
    drafter = load_drafter(default_head_path(), target, tree, draft_setup("cpu", torch.float32), lookup=8)
    plain, spec = Generator(target), Generator(target, drafter)
    cfg = GenerationConfig(max_new_tokens=160, ignore_eos=True)
    for q in select(load_questions(questions), ["summarization", "rag"], 3):
        ids = plain.encode(q.turns[0])
        a = [t for c in plain.generate_ids(ids, cfg) for t in c]
        b = [t for c in spec.generate_ids(ids, cfg) for t in c]
        print(f"{ids.shape[0]} prompt tokens: speculative text {'equals' if a == b else 'DIFFERS FROM'} plain, "
              f"tau {spec.last_stats.mean_accept_len:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="GGUF target (default: the shipped SmolLM2 Q4_1 file)")
    parser.add_argument("--contexts", default="100,300,700", help="prompt lengths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--check", default=None, metavar="SPEC_BENCH_JSONL",
                        help="also compare plain and speculative text on long prompts with f16 keys")
    args = parser.parse_args()

    from eaglespec.backends.llamacpp import LlamaCppTarget, LlamaCppTargetConfig
    from eaglespec.paths import default_gguf_path

    torch.set_num_threads(2)
    gguf = args.gguf or str(default_gguf_path())
    catcher = CpuBackendCatcher()
    shipped = LlamaCppTarget(gguf, LlamaCppTargetConfig(threads=2))
    f16 = f16_target(gguf, catcher)
    if not catcher.backends:
        raise SystemExit("no CPU backend was caught; nothing measured")
    lengths = [int(x) for x in args.contexts.split(",")]
    ids = (torch.arange(max(lengths) + 64) * 7 + 3) % 49152
    noop = lambda: None  # noqa: E731
    variants = {
        "A: bf16 keys (shipped exact mode)": (shipped, noop, noop),
        "B: f16 keys, prompt tiled": (f16, lambda: catcher.use_ref(False), lambda: catcher.use_ref(True)),
        "B: f16 keys, prompt by reference": (f16, lambda: catcher.use_ref(True), lambda: catcher.use_ref(True)),
    }
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):  # interleaved, so load elsewhere hits every variant alike
        for n in lengths:
            for name, (target, before_prompt, before_decode) in variants.items():
                runs.setdefault((name, n), []).append(timed(target, ids, n, before_prompt, before_decode))
    print("| prompt tokens | variant | prompt (s) | one decode after it (ms) |\n|---|---|---|---|")
    for n in lengths:
        for name in variants:
            prompt = statistics.median(p for p, _ in runs[(name, n)])
            decode = statistics.median(d for _, d in runs[(name, n)])
            print(f"| {n} | {name} | {prompt:.3f} | {1000 * decode:.2f} |")
    if args.check:
        check(f16, catcher, args.check)


if __name__ == "__main__":
    main()
