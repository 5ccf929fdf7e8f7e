"""llama.cpp's `llama-server` as bench methods, run on the same GGUF file and the same prompt tokens.

Methods (interleaved with ours per question, as any other bench method):

- `llamacpp`: its plain greedy decoding;
- `llamacpp-ngram`: its own n-gram self-speculation (`--spec-type ngram-simple`);
- `llamacpp-eagle3`: an EAGLE-3 head converted to GGUF (`-md HEAD.gguf --spec-type draft-eagle3`).

Each method gets its own server on 127.0.0.1 (or attaches to one given by `--llamacpp-url`),
started once before the warm-up and stopped at the end, also on Ctrl-C or an error. A turn's
prompt goes to `/completion` as the token ids of our chat template, with `cache_prompt` off so
every run processes its whole prompt, as ours does.

Seconds are the server's own prompt plus generation time (what ours measures: prefill to the last
token, without HTTP); the server's decode-only rate (`predicted_per_second`), the wall time of the
request and, for speculative methods, the drafted and accepted token counts go to the record's
`extra`. tau there is estimated as new tokens / (new tokens - accepted drafts): the prompt's forward
gives the first token and every later forward one token plus the drafts it accepted.

llama.cpp's greedy text may differ from ours (other kernels, other rounding, a quantized GGUF
against our dequantized weights): the bench reports how often it equals plain decoding and never
fails on it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from eaglespec.bench.methods import BenchError

if TYPE_CHECKING:  # the command line imports this module for its flags: no torch at parse time
    import torch

    from eaglespec.bench.run import Answer, Runner
    from eaglespec.generate import GenerationConfig

log = logging.getLogger(__name__)

METHODS = ("llamacpp", "llamacpp-ngram", "llamacpp-eagle3")
SERVER_NAME = "llama-server"

#: the server flags that make each method, besides the common ones (`server_args`)
SPEC_FLAGS = {
    "llamacpp": (),
    "llamacpp-ngram": ("--spec-type", "ngram-simple"),
    "llamacpp-eagle3": ("--spec-type", "draft-eagle3"),  # with -md HEAD.gguf
}


@dataclass(frozen=True)
class LlamaCppConfig:
    """How to run or reach llama-server for the llama.cpp methods."""

    gguf: Path | None  # the target's GGUF (None: every method attaches to a URL)
    binary: Path | None  # llama-server (None: every method attaches to a URL)
    threads: int  # -t and -tb: the same as our torch threads
    ctx: int  # -c: our KV cache length
    cpu: bool = True  # our target runs on CPU: keep llama.cpp's layers there too (-ngl 0)
    eagle3_head: Path | None = None  # -md for llamacpp-eagle3
    urls: dict[str, str] = field(default_factory=dict)  # method -> a running server to attach to
    extra_args: tuple[str, ...] = ()  # appended to every started server's command line
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise BenchError(f"llama.cpp threads must be >= 1, got {self.threads}")
        if self.ctx < 16:
            raise BenchError(f"llama.cpp context must be >= 16, got {self.ctx}")


# -- finding things ----------------------------------------------------------------------------

def find_server(bin_dir: str | Path | None = None) -> Path | None:
    """llama-server in `bin_dir` (or its build/bin), else in $LLAMACPP_BIN, else on PATH; None if absent."""
    dirs = [Path(bin_dir)] if bin_dir else []
    if not bin_dir and os.environ.get("LLAMACPP_BIN"):
        dirs.append(Path(os.environ["LLAMACPP_BIN"]))
    for d in dirs:
        d = d.expanduser()
        if d.is_file() and os.access(d, os.X_OK):  # the binary itself was given
            return d
        for cand in (d / SERVER_NAME, d / "build" / "bin" / SERVER_NAME, d / "bin" / SERVER_NAME):
            if cand.is_file() and os.access(cand, os.X_OK):
                return cand
    if bin_dir:
        return None  # an explicit folder without the binary is not silently replaced by PATH's
    found = shutil.which(SERVER_NAME)
    return Path(found) if found else None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_args(method: str, cfg: LlamaCppConfig, port: int) -> list[str]:
    """llama-server's arguments for `method` (without the binary)."""
    if method not in SPEC_FLAGS:
        raise BenchError(f"unknown llama.cpp method {method!r}; choose from {', '.join(METHODS)}")
    args = ["-m", str(cfg.gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(cfg.threads), "-tb", str(cfg.threads), "-c", str(cfg.ctx),
            "-np", "1",  # one slot: the whole context for the one request at a time
            "--cache-ram", "0"]  # no prompt cache kept across requests (each run prefills)
    if cfg.cpu:
        args += ["-ngl", "0"]
    if method == "llamacpp-eagle3":
        if cfg.eagle3_head is None:
            raise BenchError("llamacpp-eagle3 needs an EAGLE-3 head converted to GGUF: pass --llamacpp-eagle3-head HEAD.gguf")
        args += ["-md", str(cfg.eagle3_head)] + (["-ngld", "0"] if cfg.cpu else [])
    return args + list(SPEC_FLAGS[method]) + list(cfg.extra_args)


# -- one server --------------------------------------------------------------------------------

class LlamaServer:
    """A llama-server reached over HTTP: one this process started (and stops), or one attached to."""

    def __init__(self, url: str, process: subprocess.Popen | None = None, log_path: Path | None = None,
                 request_timeout_s: float = 1800.0) -> None:
        self.url = url.rstrip("/")
        self.process = process
        self.log_path = log_path
        self.request_timeout_s = request_timeout_s

    @classmethod
    def start(cls, binary: Path, args: list[str], log_path: Path, startup_timeout_s: float = 300.0,
              request_timeout_s: float = 1800.0) -> "LlamaServer":
        """Start `binary args` (which must hold --port) and wait until /health says it is ready."""
        port = args[args.index("--port") + 1]
        log.info("starting %s %s", binary, " ".join(args))
        with open(log_path, "wb") as out:
            process = subprocess.Popen([str(binary), *args], stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT)
        server = cls(f"http://127.0.0.1:{port}", process, log_path, request_timeout_s)
        try:
            server.wait_ready(startup_timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_ready(self, timeout_s: float) -> None:
        """Poll /health (503 while the model loads) until 200, the process exits, or the timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise BenchError(f"llama-server exited with status {self.process.returncode} before it was ready: "
                                 f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or still loading (503)
            if time.monotonic() > deadline:
                raise BenchError(f"llama-server at {self.url} not ready after {timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(0.2)

    def complete(self, body: dict) -> dict:
        """POST /completion; the parsed JSON answer."""
        req = urllib.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise BenchError(f"llama-server at {self.url}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError) as e:
            raise BenchError(f"llama-server at {self.url} did not answer: {e}; {self.log_tail()}") from None

    def log_tail(self, lines: int = 5) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(tail) or "(empty log)"

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop a server this process started (SIGTERM, then SIGKILL); an attached one is left alone."""
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# -- the runner --------------------------------------------------------------------------------

def completion_body(ids: torch.Tensor, cfg: GenerationConfig) -> dict:
    """/completion's request for a prompt of token ids [n]: no template (ids are ours), no prompt cache."""
    body = {"prompt": ids.tolist(),  # host sync: once per turn, outside the timing
            "n_predict": cfg.max_new_tokens, "cache_prompt": False, "return_tokens": True, "stream": False,
            "seed": cfg.seed, "ignore_eos": cfg.ignore_eos}
    if cfg.temperature > 0:
        body.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=0.0)
    else:
        body.update(temperature=0.0, top_k=1)  # greedy: the argmax
    return body


def answer_from_response(res: dict, wall_s: float) -> Answer:
    """Our `Answer` from a /completion response (tokens include an EOS as ours do)."""
    from eaglespec.bench.run import Answer

    tokens = [int(t) for t in res.get("tokens") or []]
    t = res.get("timings") or {}
    n = len(tokens) or int(res.get("tokens_predicted", 0))
    seconds = (float(t.get("prompt_ms", 0.0)) + float(t.get("predicted_ms", 0.0))) / 1000.0 or wall_s
    extra = {"server_prompt_ms": t.get("prompt_ms"), "server_predicted_ms": t.get("predicted_ms"),
             "server_decode_tok_s": t.get("predicted_per_second"), "wall_s": round(wall_s, 5),
             "server_predicted_n": t.get("predicted_n"), "prompt_tokens": t.get("prompt_n"),
             "stop_type": res.get("stop_type")}
    accepted = None
    if "draft_n" in t:
        accepted = int(t.get("draft_n_accepted", 0))
        extra.update(draft_n=int(t["draft_n"]), draft_n_accepted=accepted)
    # forwards: the prompt's gives the first token; each later one gives 1 + its accepted drafts
    forwards = max(1, n - (accepted or 0)) if n else 0
    # the first token is sampled from the prompt's logits: the prompt's time is the time to it
    first = float(t["prompt_ms"]) / 1000.0 if t.get("prompt_ms") is not None else None
    return Answer(tokens, seconds, forwards, [], extra=extra, first_token_s=first)


def llamacpp_runner(server: LlamaServer) -> Runner:
    def run(ids: torch.Tensor, cfg: GenerationConfig) -> Answer:
        body = completion_body(ids, cfg)
        start = time.perf_counter()
        res = server.complete(body)
        return answer_from_response(res, time.perf_counter() - start)
    return run


@contextmanager
def llamacpp_runners(methods: list[str], cfg: LlamaCppConfig) -> Iterator[dict[str, Runner]]:
    """Start (or attach to) one server per method; yield their runners; stop what was started."""
    with ExitStack() as stack:
        runners: dict[str, Runner] = {}
        logs = None
        for m in methods:
            if m in cfg.urls:
                server = LlamaServer(cfg.urls[m], request_timeout_s=cfg.request_timeout_s)
                server.wait_ready(cfg.startup_timeout_s)
            else:
                if cfg.binary is None or cfg.gguf is None:
                    raise BenchError(f"{m}: no llama-server found and no --llamacpp-url for it; pass "
                                     "--llamacpp-bin DIR or set LLAMACPP_BIN")
                if logs is None:
                    logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eaglespec-llamacpp-")))
                server = LlamaServer.start(cfg.binary, server_args(m, cfg, free_port()), logs / f"{m}.log",
                                           cfg.startup_timeout_s, cfg.request_timeout_s)
                stack.callback(server.stop)
            runners[m] = llamacpp_runner(server)
        yield runners


# -- command line ------------------------------------------------------------------------------

def add_llamacpp_args(p) -> None:
    g = p.add_argument_group("llama.cpp methods (" + ", ".join(METHODS) + ")")
    g.add_argument("--llamacpp-bin", default=None, metavar="DIR",
                   help="folder with llama-server (or its build folder; default: $LLAMACPP_BIN, else PATH)")
    g.add_argument("--llamacpp-gguf", default=None, metavar="FILE",
                   help="GGUF the servers load (default: the target's own GGUF)")
    g.add_argument("--llamacpp-url", action="append", default=[], metavar="[METHOD=]URL",
                   help="attach to a running llama-server instead of starting one (repeatable; a bare URL "
                        "serves every llama.cpp method, and its own flags then decide what it does)")
    g.add_argument("--llamacpp-eagle3-head", default=None, metavar="HEAD.gguf",
                   help="EAGLE-3 head converted to GGUF, for llamacpp-eagle3")
    g.add_argument("--llamacpp-args", default="", metavar="ARGS",
                   help="more llama-server flags, split on spaces (e.g. '--spec-draft-n-max 8')")


def split_methods(methods: list[str]) -> tuple[list[str], list[str]]:
    """(ours, llama.cpp's) from the --methods list."""
    return [m for m in methods if m not in METHODS], [m for m in methods if m in METHODS]


def parse_urls(values: list[str], methods: list[str]) -> dict[str, str]:
    urls: dict[str, str] = {}
    for v in values:
        name, sep, url = v.partition("=")
        if sep and name in METHODS:
            urls[name] = url
        elif sep and not name.startswith("http"):
            raise BenchError(f"--llamacpp-url {v}: {name!r} is not a llama.cpp method ({', '.join(METHODS)})")
        else:
            urls.update({m: v for m in methods if m not in urls})
    bad = [u for u in urls.values() if not u.startswith(("http://", "https://"))]
    if bad:
        raise BenchError(f"--llamacpp-url needs an http:// address, got {bad[0]!r}")
    return urls


def target_gguf(model: str | None) -> Path | None:
    """The GGUF file our target was loaded from (None for a transformers folder)."""
    from eaglespec.paths import default_gguf_path

    if model is None:
        return default_gguf_path()
    path = Path(model).expanduser()
    return path if path.suffix == ".gguf" else None


def config_from_args(args, methods: list[str], threads: int, cpu: bool = True) -> LlamaCppConfig:
    """Check the llama.cpp flags for `methods` before anything loads; raise BenchError on a problem."""
    urls = parse_urls(args.llamacpp_url, methods)
    started = [m for m in methods if m not in urls]
    binary = gguf = head = None
    if started:
        binary = find_server(args.llamacpp_bin)
        if binary is None:
            where = args.llamacpp_bin or "$LLAMACPP_BIN or PATH"
            raise BenchError(f"{', '.join(started)}: no {SERVER_NAME} in {where}; pass --llamacpp-bin DIR "
                             "(tools/llamacpp_roundtrip.sh builds one) or --llamacpp-url")
        gguf = Path(args.llamacpp_gguf).expanduser() if args.llamacpp_gguf else target_gguf(args.model)
        if gguf is None:
            raise BenchError(f"{args.model} is a transformers folder: pass --llamacpp-gguf FILE for llama.cpp")
        if not gguf.is_file():
            raise BenchError(f"--llamacpp-gguf {gguf}: not found")
    if "llamacpp-eagle3" in started:
        if not args.llamacpp_eagle3_head:
            raise BenchError("llamacpp-eagle3 needs an EAGLE-3 head converted to GGUF: pass "
                             "--llamacpp-eagle3-head HEAD.gguf (tools/llamacpp_roundtrip.sh converts one)")
        head = Path(args.llamacpp_eagle3_head).expanduser()
        if not head.is_file():
            raise BenchError(f"--llamacpp-eagle3-head {head}: not found")
    return LlamaCppConfig(gguf=gguf, binary=binary, threads=threads, ctx=args.max_len, cpu=cpu, eagle3_head=head,
                          urls=urls, extra_args=tuple(args.llamacpp_args.split()))


def markdown(records: list[dict]) -> str:
    """A section on the llama.cpp runs: server-side rates, drafts accepted, agreement with plain."""
    rows = [r for r in records if r["method"] in METHODS]
    if not rows:
        return ""
    plain = {(r["question_id"], r["turn"]): r["text"] for r in records if r["method"] == "plain"}
    lines = ["", "llama.cpp (llama-server on the same GGUF and prompt tokens; tokens/s above is its prompt + "
             "generation time; decode tok/s its own `predicted_per_second`):", "",
             "| method | runs | decode tok/s (server) | wall tok/s | drafts accepted | equal to plain | "
             "shared prefix with plain |", "|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        ms = sum(r["extra"].get("server_predicted_ms") or 0.0 for r in mine)
        gen = sum(r["extra"].get("server_predicted_n") or 0 for r in mine)
        wall = sum(r["extra"].get("wall_s") or 0.0 for r in mine)
        drafted = sum(r["extra"].get("draft_n", 0) for r in mine)
        accepted = sum(r["extra"].get("draft_n_accepted", 0) for r in mine)
        eq = [r["equal_to_baseline"] for r in mine if r["equal_to_baseline"] is not None]
        shared = [_shared_prefix(r["text"], plain[k]) for r in mine
                  if (k := (r["question_id"], r["turn"])) in plain and plain[k]]
        lines.append(f"| {m} | {len(mine)} | {gen / (ms / 1000) if ms else 0.0:.2f} | "
                     f"{sum(r['new_tokens'] for r in mine) / wall if wall else 0.0:.2f} | "
                     f"{f'{accepted}/{drafted} ({accepted / drafted:.0%})' if drafted else 'n/a'} | "
                     f"{f'{sum(eq)}/{len(eq)}' if eq else 'n/a'} | "
                     f"{f'{sum(shared) / len(shared):.0%}' if shared else 'n/a'} |")
    return "\n".join(lines) + "\n"


def _shared_prefix(text: str, plain: str) -> float:
    """Share of plain's text that `text` repeats from the start before they part."""
    n = 0
    for a, b in zip(text, plain):
        if a != b:
            break
        n += 1
    return n / len(plain)
