"""Prometheus metrics, named as vLLM names its own (`vllm:x` -> `eaglespec:x`), so dashboards
and PromQL written for vLLM read these too. Counters get the `_total` suffix on the wire.

Mirrored from vLLM: num_requests_running, num_requests_waiting, request_success (by
finished_reason), prompt_tokens, generation_tokens, time_to_first_token_seconds,
e2e_request_latency_seconds, request_queue_time_seconds, spec_decode_num_drafts,
spec_decode_num_draft_tokens, spec_decode_num_accepted_tokens,
spec_decode_num_accepted_tokens_per_pos (by position).
Our own: http_requests (by handler, method and status, as vLLM's API server gets from
prometheus-fastapi-instrumentator), target_forwards, and spec_decode_mean_acceptance_length,
a gauge of vLLM's PromQL formula 1 + accepted / drafts over the server's life.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from eaglespec.generate import GenerationStats

PREFIX = "eaglespec:"
FINISH_REASONS = ("stop", "length", "abort", "error")

# seconds; a CPU answer of a few hundred tokens takes tens of seconds
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def spec_decode_counts(stats: GenerationStats) -> tuple[int, int, int, list[int]]:
    """(drafts, drafted tokens, accepted tokens, accepted per draft position) of one request.

    A decode step verifies a tree of `tree_sizes[i]` nodes, the root (the last committed token)
    included, so it drafted tree_sizes[i] - 1 tokens; it adds accept_lengths[i] tokens, the
    bonus token included, so it accepted accept_lengths[i] - 1 drafted ones, at positions
    0 .. accept_lengths[i] - 2 of the accepted path (vLLM's per-position convention):
    accept_lengths [3, 1, 2] -> accepted per position [2, 1].
    A step with a root-only tree (plain decoding) is no draft.
    """
    drafts = drafted = accepted = 0
    per_pos: list[int] = []
    for size, length in zip(stats.tree_sizes, stats.accept_lengths):
        if size <= 1:
            continue
        drafts += 1
        drafted += size - 1
        accepted += length - 1
        per_pos.extend([0] * (length - 1 - len(per_pos)))
        for pos in range(length - 1):
            per_pos[pos] += 1
    return drafts, drafted, accepted, per_pos


class ServerMetrics:
    """One registry per app, so tests can run several servers in one process."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        reg, lab = self.registry, ["model_name"]

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, lab + list(extra), registry=reg)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, lab, buckets=buckets, registry=reg)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(PREFIX + name, doc, lab, registry=reg)

        m = model_name
        self.http_requests = Counter(PREFIX + "http_requests", "HTTP requests by handler, method and status.",
                                     ["handler", "method", "status"], registry=reg)
        self.running = gauge("num_requests_running", "Requests being generated (0 or 1: one model thread).").labels(m)
        self.waiting = gauge("num_requests_waiting", "Requests waiting in the queue.").labels(m)
        success = counter("request_success", "Finished generation requests by finish reason "
                          "(abort: client gone or past --request-timeout; error: failed).", ("finished_reason",))
        self.request_success = {r: success.labels(m, r) for r in FINISH_REASONS}
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.").labels(m)
        self.generation_tokens = counter("generation_tokens", "Generation tokens produced.").labels(m)
        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first text.",
                              TTFT_BUCKETS).labels(m)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last text.",
                             LATENCY_BUCKETS).labels(m)
        self.queue_time = histogram("request_queue_time_seconds", "Time spent waiting for the model thread.",
                                    LATENCY_BUCKETS).labels(m)
        self.target_forwards = counter("target_forwards", "Target forward passes (prefills included).").labels(m)
        self.num_drafts = counter("spec_decode_num_drafts", "Number of spec decoding drafts.").labels(m)
        self.num_draft_tokens = counter("spec_decode_num_draft_tokens", "Number of draft tokens.").labels(m)
        self.num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Number of accepted tokens.").labels(m)
        self._per_pos = counter("spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft position.",
                                ("position",))
        self.mean_acceptance_length = gauge(
            "spec_decode_mean_acceptance_length",
            "1 + accepted / drafts since the server started (bonus token included, vLLM's convention).").labels(m)
        self._lock = threading.Lock()
        self._drafts = self._accepted = 0

    def observe_generation(self, prompt_tokens: int, stats: GenerationStats) -> None:
        """Count the work of one generation (also of an aborted one: the model did it)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(stats.new_tokens)
        self.target_forwards.inc(stats.target_forwards)
        drafts, drafted, accepted, per_pos = spec_decode_counts(stats)
        self.num_drafts.inc(drafts)
        self.num_draft_tokens.inc(drafted)
        self.num_accepted_tokens.inc(accepted)
        for pos, n in enumerate(per_pos):
            self._per_pos.labels(self.model_name, str(pos)).inc(n)
        with self._lock:
            self._drafts += drafts
            self._accepted += accepted
            if self._drafts:
                self.mean_acceptance_length.set(1 + self._accepted / self._drafts)
