"""What one `llama_decode` costs through eaglespec's llama.cpp backend: a lone token (padded to
the measured `min_rows` in the exact mode, or forced with --rows) and chains of q tokens, after a
context of cached tokens. Prints the median milliseconds of each and its multiple of a lone token.

    PYTHONPATH=src python tools/llamacpp_decode_cost.py model.gguf
    PYTHONPATH=src python tools/llamacpp_decode_cost.py model.gguf --fast --chains 1 --repeats 200
    PYTHONPATH=src python tools/llamacpp_decode_cost.py model.gguf --rows 1      # no padding, for timing only
    PYTHONPATH=src python tools/llamacpp_decode_cost.py model.gguf --prompts 32,300 --feature-layers 2,15,27

--prompts times prefills of those lengths instead (median of 5): with the last hidden state every
prompt row computes its logits; with --feature-layers (an EAGLE-3 head's) only the last does.

Compare with llama.cpp's own `llama-bench -m model.gguf -t 2 -p 0 -n 128 -d 300 -fa 1` (a token
after 300 cached tokens). Which llama-cpp-python is used is printed with its llama.cpp features
(LLAMAFILE = 1: built with llamafile's sgemm). Keep other jobs off the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf")
    parser.add_argument("--context", type=int, default=300, help="cached tokens before each decode")
    parser.add_argument("--chains", default="1,2,4,8,16,32", help="chain lengths q to time")
    parser.add_argument("--repeats", type=int, default=12, help="decodes timed per chain length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="llama.cpp's own mode (f16 cache, no padding)")
    parser.add_argument("--rows", type=int, default=None, help="pad lone tokens to this many rows instead of min_rows")
    parser.add_argument("--prompts", default=None, help="time prefills of these lengths instead of chains")
    parser.add_argument("--feature-layers", default=None, help="features: these layers' inputs (EAGLE-3), e.g. 2,15,27")
    parser.add_argument("--feature-rows", default=None,
                        help="with --prompts: the prompt's last positions to return features of, e.g. all,256,0")
    args = parser.parse_args()

    import llama_cpp

    from eaglespec.backends.llamacpp import LlamaCppTarget, LlamaCppTargetConfig

    target = LlamaCppTarget(args.gguf, LlamaCppTargetConfig(max_len=max(2048, args.context + 512),
                                                            threads=args.threads, exact=not args.fast))
    features = llama_cpp.llama_print_system_info().decode().strip()
    print(f"llama-cpp-python {llama_cpp.__version__} at {llama_cpp.__file__}\n{features}")
    print(f"min_rows measured: {target.min_rows}" + (f", timed with {args.rows}" if args.rows else ""))
    if args.rows:
        target.min_rows = args.rows
    if args.feature_layers:
        target.set_feature_layers([int(i) for i in args.feature_layers.split(",")])
    if args.prompts:
        windows = [None if w == "all" else int(w) for w in (args.feature_rows or "all").split(",")]
        for n in (int(c) for c in args.prompts.split(",")):
            tokens = torch.arange(n) * 7919 % (target.vocab_size - 100) + 100
            for rows in windows:
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    out = target.prefill(tokens, feature_rows=rows)
                    times.append(time.perf_counter() - start)
                print(f"prompt {n:4d}  {statistics.median(times) * 1e3:8.1f} ms  features {tuple(out.features.shape)}")
        target.close()
        return
    target.prefill(torch.arange(args.context) * 7919 % (target.vocab_size - 100) + 100)
    lone = None
    for q in (int(c) for c in args.chains.split(",")):
        tokens = torch.arange(1000, 1000 + q)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            target.forward(tokens)
            target.cache.compact(torch.empty(0, dtype=torch.long))  # keep nothing: the context stays as it was
            times.append(time.perf_counter() - start)
        ms = statistics.median(times) * 1e3
        lone = lone or ms
        print(f"q={q:4d}  {ms:8.2f} ms  {ms / lone:6.2f}x")
    target.close()


if __name__ == "__main__":
    main()
