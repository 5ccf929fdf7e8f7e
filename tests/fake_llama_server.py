"""A stand-in for llama.cpp's llama-server: /health and /completion on 127.0.0.1, nothing else.

In a test, `FakeServer(answer)` serves from a thread, answering each /completion with
`answer(prompt_ids, n_predict)`. Run as a program it takes llama-server's command line (only
--port and --spec-type matter), says 503 "loading" to its first health checks as the real one
does while it loads, and answers every prompt with the tokens 5, 6, 7, ... up to n_predict.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Answerer = Callable[[list[int], int], list[int]]


def counting_answer(prompt: list[int], n_predict: int) -> list[int]:
    return [5 + i for i in range(n_predict)]


def make_handler(answer: Answerer, requests: list[dict], speculative: bool, loading_polls: int):
    state = {"polls": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _json(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path != "/health":
                return self._json(404, {"error": {"code": 404, "message": "File Not Found"}})
            state["polls"] += 1
            if state["polls"] <= loading_polls:
                return self._json(503, {"error": {"code": 503, "message": "Loading model"}})
            self._json(200, {"status": "ok"})

        def do_POST(self) -> None:
            if self.path != "/completion":
                return self._json(404, {"error": {"code": 404, "message": "File Not Found"}})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            prompt = body["prompt"]
            if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
                return self._json(400, {"error": {"code": 400, "message": "prompt must be token ids here"}})
            tokens = answer(prompt, body["n_predict"])
            n = len(tokens)
            timings = {"cache_n": 0, "prompt_n": len(prompt), "prompt_ms": 2.0, "prompt_per_token_ms": 2.0 / len(prompt),
                       "prompt_per_second": len(prompt) / 0.002, "predicted_n": n, "predicted_ms": 4.0 * n,
                       "predicted_per_token_ms": 4.0, "predicted_per_second": 250.0}
            if speculative:
                timings.update(draft_n=2 * n, draft_n_accepted=n // 2)
            self._json(200, {"content": " ".join(map(str, tokens)), "tokens": tokens, "tokens_predicted": n,
                             "tokens_evaluated": len(prompt), "stop_type": "limit", "timings": timings})

    return Handler


class FakeServer:
    """A fake llama-server on a free loopback port, served from a daemon thread; `url`, `requests`."""

    def __init__(self, answer: Answerer = counting_answer, speculative: bool = False, loading_polls: int = 0,
                 port: int = 0) -> None:
        self.requests: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port),
                                         make_handler(answer, self.requests, speculative, loading_polls))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv: list[str]) -> None:
    port = int(argv[argv.index("--port") + 1])
    speculative = "--spec-type" in argv
    print("fake llama-server:", " ".join(argv), flush=True)
    server = FakeServer(speculative=speculative, loading_polls=2, port=port)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
