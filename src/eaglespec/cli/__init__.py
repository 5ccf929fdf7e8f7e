"""`eaglespec` command line: generate, bench, train, serve.

Each subcommand is a module with `register(subparsers)`, which adds its parser (and sets `func`,
the function that runs it), and `run(args)`; what they share is in `common`. Parsing imports
nothing heavy, so `--help` answers at once: torch, transformers and the engine load inside `run`.

Every user error ends in one line on stderr (`eaglespec: error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from eaglespec.cli import bench, generate, serve, train
from eaglespec.cli.common import UsageError, setup_torch

SUBCOMMANDS = (generate, bench, train, serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eaglespec", description="Lossless speculative decoding with EAGLE draft heads")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress, and show tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.register(sub)
    return p


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a bad input, not a bug: printed as one line. A target that fails to
    load raises TargetLoadError (or LlamaCppError), which can only happen once its module has been
    imported."""
    errors: tuple[type[BaseException], ...] = (UsageError, ValueError, FileNotFoundError)
    target = sys.modules.get("eaglespec.target")
    llamacpp = sys.modules.get("eaglespec.backends.llamacpp")
    errors += (target.TargetLoadError,) if target is not None else ()
    return errors + ((llamacpp.LlamaCppError,) if llamacpp is not None else ())


def main(argv: list[str] | None = None) -> int:
    """Run the command in `argv` (None: the program's own arguments) and return its exit status.
    Run as the program (argv None), a command that sets `exit_at_once` ends the process here."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        setup_torch(args)
        code = args.func(args)
    except KeyboardInterrupt:
        print("eaglespec: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose or not isinstance(e, user_errors()):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"eaglespec: error: {msg}", file=sys.stderr)
        code = 2
    if argv is None and getattr(args, "exit_at_once", False):
        exit_now(code)
    return code


def exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown, which after torch and transformers are
    imported takes about 0.9 s (unloading some 3,000 modules; docs/benchmarks.md). Only for a
    command that has finished all it writes: the standard streams are flushed here, and atexit
    handlers do not run."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
