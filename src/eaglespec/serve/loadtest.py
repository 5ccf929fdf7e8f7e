"""Load test for a running `eaglespec serve`: N streaming requests from C concurrent clients.

    python -m eaglespec.serve.loadtest --url http://127.0.0.1:8000 --clients 16 --requests 32

First every distinct request is sent once, alone, for its reference answer; then all N go out
from C clients at once (each client sends its next request when the last one ends). Reported:
requests completed / rejected (429) / failed, time to first token (p50, p95), aggregate
generated tokens per second, and whether every answer equals its one-at-a-time reference
(greedy ones, and sampled ones with a fixed seed): a batch-1 server must never mix requests up.

Only loopback servers unless --allow-remote. Needs the `openai` package.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

#: mixed lengths and kinds: questions, code, lists, rewriting, a longer context
PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "List five fruits that are red.",
    "Explain what a hash table is to a ten-year-old.",
    "Translate to French: The weather is nice today and we are going to the park.",
    "Summarize in two sentences: The printing press, invented by Johannes Gutenberg around 1440, made books "
    "cheaper and faster to produce. Literacy spread, ideas travelled across Europe, and the Reformation and the "
    "Scientific Revolution both drew on the flood of printed pamphlets and books that followed.",
    "Give me three tips for writing clear emails.",
    "What is 17 times 23? Show your steps.",
]


@dataclass(frozen=True)
class LoadRequest:
    prompt: str
    temperature: float
    seed: int

    @property
    def key(self) -> tuple:
        return self.prompt, self.temperature, self.seed


@dataclass
class Outcome:
    status: str  # ok | rejected | failed
    text: str = ""
    tokens: int = 0
    ttft_s: float | None = None
    error: str = ""


@dataclass
class LoadReport:
    url: str
    model: str
    clients: int
    requests: int
    max_tokens: int
    completed: int = 0
    rejected: int = 0
    failed: int = 0
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    wall_s: float = 0.0
    generated_tokens: int = 0
    tokens_per_s: float = 0.0
    checked: int = 0  # completed answers compared with their one-at-a-time reference
    mismatches: int = 0
    errors: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        pct = (f"p50 {self.ttft_p50_s:.2f} s, p95 {self.ttft_p95_s:.2f} s" if self.ttft_p50_s is not None
               else "n/a")
        return [
            f"server {self.url} ({self.model}); {self.clients} clients, {self.requests} streaming requests, "
            f"max_tokens {self.max_tokens}",
            f"completed {self.completed}, rejected (429) {self.rejected}, failed {self.failed}",
            f"time to first token: {pct}",
            f"generated {self.generated_tokens} tokens in {self.wall_s:.1f} s: {self.tokens_per_s:.1f} tokens/s",
            f"answers equal to their one-at-a-time answer: {self.checked - self.mismatches}/{self.checked}",
        ] + [f"error: {e}" for e in self.errors[:5]]


def requests_for(n: int) -> list[LoadRequest]:
    """Request i asks prompt i mod P; every other round of prompts samples (temperature 0.8) with
    a seed fixed per prompt, the others are greedy."""
    out = []
    for i in range(n):
        k, sampled = i % len(PROMPTS), (i // len(PROMPTS)) % 2 == 1
        out.append(LoadRequest(PROMPTS[k], 0.8 if sampled else 0.0, 1000 + k))
    return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def is_loopback(url: str) -> bool:
    return is_loopback_host(urlparse(url).hostname or "")


def is_loopback_host(host: str) -> bool:
    """`localhost` or an address in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _one(client, model: str, req: LoadRequest, max_tokens: int, timeout_s: float) -> Outcome:
    import openai

    start = time.perf_counter()
    out = Outcome("ok")
    parts: list[str] = []
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": req.prompt}], max_tokens=max_tokens,
            temperature=req.temperature, seed=req.seed, stream=True, stream_options={"include_usage": True},
            timeout=timeout_s)
        async for chunk in stream:
            if chunk.usage is not None:
                out.tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                if out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - start
                parts.append(chunk.choices[0].delta.content)
    except openai.RateLimitError:
        return Outcome("rejected")
    except (openai.APIError, OSError, asyncio.TimeoutError) as e:
        return Outcome("failed", error=f"{type(e).__name__}: {e}")
    out.text = "".join(parts)
    return out


async def run_load(url: str, clients: int, n_requests: int, max_tokens: int = 64, timeout_s: float = 600.0,
                   max_seconds: float = 3600.0, api_key: str | None = None, check: bool = True) -> LoadReport:
    """Send the requests (after their one-at-a-time references when `check`) and measure."""
    import openai

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none", max_retries=0,
                                timeout=timeout_s)
    try:
        model = (await client.models.list()).data[0].id
        reqs = requests_for(n_requests)
        report = LoadReport(url=url, model=model, clients=clients, requests=n_requests, max_tokens=max_tokens)
        reference: dict[tuple, str] = {}
        if check:
            for req in {r.key: r for r in reqs}.values():
                ref = await _one(client, model, req, max_tokens, timeout_s)
                if ref.status != "ok":
                    raise RuntimeError(f"the reference request failed: {ref.status} {ref.error}")
                reference[req.key] = ref.text

        todo = list(enumerate(reqs))
        outcomes: list[Outcome | None] = [None] * n_requests
        deadline = time.monotonic() + max_seconds

        async def worker() -> None:
            while todo and time.monotonic() < deadline:
                i, req = todo.pop(0)
                outcomes[i] = await _one(client, model, req, max_tokens, timeout_s)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        report.wall_s = time.perf_counter() - start
    finally:
        await client.close()

    done = [o for o in outcomes if o is not None]
    report.completed = sum(o.status == "ok" for o in done)
    report.rejected = sum(o.status == "rejected" for o in done)
    report.failed = sum(o.status == "failed" for o in done) + (n_requests - len(done))  # unsent past max_seconds
    report.errors = [o.error for o in done if o.error]
    ttfts = [o.ttft_s for o in done if o.ttft_s is not None]
    if ttfts:
        report.ttft_p50_s, report.ttft_p95_s = round(percentile(ttfts, 50), 3), round(percentile(ttfts, 95), 3)
    report.generated_tokens = sum(o.tokens for o in done)
    report.tokens_per_s = round(report.generated_tokens / report.wall_s, 2) if report.wall_s else 0.0
    if check:
        pairs = [(reqs[i], o) for i, o in enumerate(outcomes) if o is not None and o.status == "ok"]
        report.checked = len(pairs)
        report.mismatches = sum(o.text != reference[r.key] for r, o in pairs)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eaglespec.serve.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=32, help="requests in all")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="stop sending new requests after this")
    p.add_argument("--api-key", default=None)
    p.add_argument("--no-check", action="store_true", help="skip the one-at-a-time reference answers")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--allow-remote", action="store_true", help="allow a server that is not on this machine")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not is_loopback(args.url) and not args.allow_remote:
        print(f"loadtest: error: {args.url} is not a loopback address (pass --allow-remote to load a remote server)",
              file=sys.stderr)
        return 2
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1:
        print("loadtest: error: --clients, --requests and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        import openai  # noqa: F401
    except ImportError:
        print("loadtest: error: needs the openai package (pip install openai)", file=sys.stderr)
        return 2
    report = asyncio.run(run_load(args.url, args.clients, args.requests, args.max_tokens, args.timeout,
                                  args.max_seconds, args.api_key, check=not args.no_check))
    if args.json:
        print(json.dumps({**asdict(report), "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name()}))
    else:
        print("\n".join(report.lines()))
    return 0 if report.failed == 0 and report.mismatches == 0 else 1


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
