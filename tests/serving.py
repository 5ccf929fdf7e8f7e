"""Servers for tests: uvicorn on a free loopback port in a thread, and engines that are slow or
fail on purpose."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from email.message import Message

import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from eaglespec.generate import Generator
from eaglespec.serve.app import ServeConfig, create_app

#: a prompt holding this word makes `PacedGenerator` fail while generating (on the model thread)
FAIL_WORD = "w87"
#: a raw prompt holding this word makes it fail while encoding (in the request handler)
ENCODE_FAIL_WORD = "w86"


@contextlib.contextmanager
def running_server(engine: Generator, **config):
    """Serve `engine` on 127.0.0.1:<free port>; yields the base URL, stops the server after."""
    config.setdefault("model_name", "tiny")
    app = create_app(engine, ServeConfig(**config))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


class PacedGenerator(Generator):
    """Sleeps `pace_s` before each accepted chunk (a slow model), and raises an unexpected error
    on a prompt holding FAIL_WORD or ENCODE_FAIL_WORD (a bug in the model code)."""

    def __init__(self, *args, pace_s: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pace_s = pace_s
        self.fail_id = self.tokenizer.convert_tokens_to_ids(FAIL_WORD)

    def encode(self, prompt, chat=True):
        if isinstance(prompt, str) and ENCODE_FAIL_WORD in prompt:
            raise RuntimeError("a deliberate failure while encoding")
        return super().encode(prompt, chat)

    def generate_ids(self, input_ids, config):
        if (input_ids == self.fail_id).any():
            raise RuntimeError("a deliberate failure inside the engine")
        for chunk in super().generate_ids(input_ids, config):
            time.sleep(self.pace_s)
            yield chunk


def http(url: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
         method: str | None = None) -> tuple[int, Message, str]:
    """(status, headers, text) of one plain HTTP request; errors are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    _, _, text = http(url, "/metrics")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab))
