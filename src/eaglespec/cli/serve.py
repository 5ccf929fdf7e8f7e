"""`eaglespec serve`: the flags, and running uvicorn on the app."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from eaglespec.cli.common import UsageError, add_draft_args, add_model_args, load_engine

log = logging.getLogger("eaglespec")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page and metrics")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("EAGLESPEC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $EAGLESPEC_API_KEY; unset = open)")
    g.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait while one is generated; past it, 429 with Retry-After")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="seconds from arrival (queueing included) until a request is ended with an error")
    g.add_argument("--served-model-name", default=None,
                   help="model id for clients and /v1/models (default: the model's file or folder name)")
    g.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    add_model_args(p)
    add_draft_args(p)
    p.set_defaults(func=run)
    return p


def served_name(args) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        return DEFAULT_MODEL_NAME
    path = Path(args.model)
    return path.stem if path.suffix == ".gguf" else path.name or str(path)


def run(args) -> int:
    try:
        import uvicorn

        from eaglespec.serve.app import ServeConfig, create_app
        from eaglespec.serve.loadtest import is_loopback_host
    except ImportError as e:
        raise UsageError(f"serving needs the serve extra: pip install 'eaglespec[serve]' ({e})") from None
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    config = ServeConfig(model_name=served_name(args), api_key=args.api_key or None, max_queue=args.max_queue,
                         request_timeout=args.request_timeout, max_request_bytes=args.max_request_bytes)
    if config.api_key is None and not is_loopback_host(args.host):
        log.warning("eaglespec: listening on %s without --api-key: anyone who can reach it can use it", args.host)
    engine = load_engine(args)
    app = create_app(engine, config)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=args.verbose,
                timeout_graceful_shutdown=5)
    return 0
