"""Start-up of `eaglespec generate` at several commits, side by side: each commit is checked out
into a temporary worktree and run as `python -m eaglespec.cli` with PYTHONPATH set to it, the
commits alternating which goes first; prints the median, min and max wall clock of the whole
process and the text each wrote.

    python tools/startup_time.py feba06e HEAD                    # generate "Hi" --max-new-tokens 1
    python tools/startup_time.py --runs 9 HEAD -- generate "Hello there" --max-new-tokens 8

Caches (converted targets, probe results) are shared, so run one warm-up of each commit first
(done here) and keep other jobs off the machine. `--first-start` gives each run an empty cache of
its own instead ($EAGLESPEC_CACHE): what a first run on a new machine, or of a new model file,
costs (conversions and probes included).

    python tools/startup_time.py --runs 3 --first-start 20dc304 HEAD    # options before the commits
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worktree(repo: Path, commit: str, parent: Path) -> Path:
    path = parent / commit.replace("/", "_")
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(path), commit], check=True)
    return path


def run_once(src: Path, argv: list[str], cache: Path | None = None) -> tuple[float, str]:
    """Wall clock and stdout of one run; `cache`: an empty folder for $EAGLESPEC_CACHE, deleted after."""
    env = dict(os.environ, PYTHONPATH=str(src))
    if cache is not None:
        env["EAGLESPEC_CACHE"] = str(cache)
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "eaglespec.cli", *argv], env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
    if r.returncode != 0:
        raise SystemExit(f"{src}: exit {r.returncode}\n{r.stderr[-2000:]}")
    return took, r.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("commits", nargs="+")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--first-start", action="store_true", help="each run with an empty cache of its own")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="after --: the eaglespec command line")
    args = parser.parse_args()
    argv = [a for a in args.argv if a != "--"] or ["generate", "Hi", "--max-new-tokens", "1"]
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="startup-") as tmp:
        trees = {c: worktree(repo, c, Path(tmp)) / "src" for c in args.commits}
        try:
            for src in trees.values():  # warm-up: page cache, converted folder, probes
                run_once(src, argv)
            times: dict[str, list[float]] = {c: [] for c in trees}
            texts: dict[str, str] = {}
            for i in range(args.runs):
                order = list(trees) if i % 2 == 0 else list(trees)[::-1]
                for c in order:
                    cache = Path(tmp) / f"cache-{i}-{c.replace('/', '_')}" if args.first_start else None
                    took, texts[c] = run_once(trees[c], argv, cache)
                    times[c].append(took)
            fresh = ", each from an empty cache" if args.first_start else ""
            print(f"eaglespec {' '.join(argv)}; {args.runs} runs each{fresh}")
            print("| commit | median | min-max | text |\n|---|---|---|---|")
            for c, ts in times.items():
                text = texts[c].replace("\n", " ")[:60]
                print(f"| {c} | {statistics.median(ts):.2f} s | {min(ts):.2f}-{max(ts):.2f} s | {text} |")
        finally:
            for src in trees.values():
                subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(src.parent)], check=False)


if __name__ == "__main__":
    main()
