"""`eaglespec bench` argument wiring (the benchmark itself lives in eaglespec.bench.run)."""

from __future__ import annotations


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark methods side by side on a prompt set")
    p.add_argument("--methods", default="plain,eagle-static,eagle-dynamic,hf-generate,hf-prompt-lookup")


def cmd_bench(args) -> int:
    from eaglespec.cli import UsageError

    raise UsageError("eaglespec bench is not built yet")
