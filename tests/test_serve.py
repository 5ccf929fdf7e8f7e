"""`eaglespec serve` through the official openai client (and plain HTTP for what it refuses to
send): lossless answers, streaming, errors in OpenAI's shape, the queue, timeouts, metrics."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from helpers import random_head  # noqa: E402
from serving import ENCODE_FAIL_WORD, FAIL_WORD, PacedGenerator, http, metric, metrics, running_server  # noqa: E402

from eaglespec.cli import build_parser  # noqa: E402
from eaglespec.cli.common import load_engine  # noqa: E402
from eaglespec.generate import GenerationConfig, Generator  # noqa: E402
from eaglespec.target import load_target  # noqa: E402

MAX_LEN = 256
HELLO = [{"role": "user", "content": "w1 w2 w3 w4"}]


def serve_args(model_dir, head_dir, *extra):
    return build_parser().parse_args(["serve", "--model", str(model_dir), "--draft", str(head_dir), "--dtype",
                                      "float32", "--max-len", str(MAX_LEN), *extra])


@pytest.fixture(scope="module")
def head_dir(tiny_model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("head")
    random_head(load_target(str(tiny_model_dir))).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tiny_model_dir, head_dir) -> Generator:
    """An engine of its own, for the answers the server must give."""
    return load_engine(serve_args(tiny_model_dir, head_dir))


@pytest.fixture(scope="module")
def server(tiny_model_dir, head_dir):
    with running_server(load_engine(serve_args(tiny_model_dir, head_dir)), model_name="tiny") as url:
        yield url


def client(url: str, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def paced_engine(tiny_model_dir):
    """Plain decoding (one token per chunk) at 20 ms a token."""
    target = load_target(str(tiny_model_dir), max_len=MAX_LEN)
    return PacedGenerator(target, pace_s=0.02)


def chat_text(reference: Generator, messages, **config) -> str:
    return reference.generate(messages, GenerationConfig(**config)).text


# -- answers ---------------------------------------------------------------------------------


def test_chat_completion_is_the_generate_answer(server, reference):
    r = client(server).chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == chat_text(reference, HELLO, max_new_tokens=24)
    n_prompt = reference.encode(HELLO).shape[0]
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (n_prompt, n_prompt + r.usage.completion_tokens)
    spec = r.model_extra["speculative"]
    assert spec["target_forwards"] >= 1 and spec["drafted_tokens"] > 0
    assert spec["mean_accept_len"] == pytest.approx(r.usage.completion_tokens / spec["target_forwards"], abs=1e-3)
    if r.usage.completion_tokens == 24:
        assert r.choices[0].finish_reason == "length"


def test_streamed_chat_equals_the_whole_answer(server, reference):
    stream = client(server).chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0,
                                                    stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # one event per accepted piece, not one blob
    assert "".join(pieces) == chat_text(reference, HELLO, max_new_tokens=24)
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
    assert last.choices[0].finish_reason in ("stop", "length") and "speculative" in last.model_extra
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions_use_the_raw_prompt(server, reference):
    c = client(server)
    r = c.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=16, temperature=0)
    expected = reference.generate("w5 w6 w7", GenerationConfig(max_new_tokens=16), chat=False).text
    assert r.object == "text_completion" and r.choices[0].text == expected
    assert r.usage.prompt_tokens == 3
    streamed = "".join(ch.choices[0].text for ch in
                       c.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=16, temperature=0, stream=True)
                       if ch.choices)
    assert streamed == expected


def test_stop_strings_cut_the_answer(server, reference):
    full = chat_text(reference, HELLO, max_new_tokens=24)
    words = full.split()
    stop = next(w for w in words[3:] if w != words[0])  # a word past the start
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0,
                                                 stop=stop, stream=True) if ch.choices)
    assert streamed == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible(server, tiny_model_dir):
    """With the default cost-sized tree, which changes with measured timings and with what earlier
    requests taught it, a seed still fixes the sample: it is plain sampling's with that seed."""
    c = client(server)

    def sample(seed):
        return c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].message.content

    plain = Generator(load_target(str(tiny_model_dir), max_len=MAX_LEN))
    a = sample(7)
    assert sample(7) == a == chat_text(plain, HELLO, max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    assert any(sample(s) != a for s in (8, 9, 10))


def test_models_health_and_chat_page(server):
    assert [m.id for m in client(server).models.list()] == ["tiny"]
    status, _, body = http(server, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, headers, page = http(server, "/")
    assert status == 200 and "chat.js" in page and "http" not in page.split("<body>")[1]  # nothing remote
    for asset in ("/static/chat.js", "/static/chat.css"):
        assert http(server, asset)[0] == 200


def test_metrics_count_requests_and_speculation(server):
    before = metrics(server)
    r = client(server).chat.completions.create(model="tiny", messages=HELLO, max_tokens=20, temperature=0)
    after = metrics(server)
    moved = {name: metric(after, name) - metric(before, name) for name in (
        "eaglespec:generation_tokens_total", "eaglespec:prompt_tokens_total", "eaglespec:target_forwards_total",
        "eaglespec:spec_decode_num_drafts_total", "eaglespec:spec_decode_num_draft_tokens_total",
        "eaglespec:spec_decode_num_accepted_tokens_total", "eaglespec:spec_decode_num_accepted_tokens_per_pos_total",
        "eaglespec:time_to_first_token_seconds_count", "eaglespec:e2e_request_latency_seconds_count")}
    spec = r.model_extra["speculative"]
    assert moved["eaglespec:generation_tokens_total"] == r.usage.completion_tokens
    assert moved["eaglespec:prompt_tokens_total"] == r.usage.prompt_tokens
    assert moved["eaglespec:target_forwards_total"] == spec["target_forwards"]
    assert moved["eaglespec:spec_decode_num_drafts_total"] == spec["drafts"]
    assert 1 <= spec["drafts"] <= spec["target_forwards"] - 1  # not the prefill, nor steps that rested
    assert moved["eaglespec:spec_decode_num_draft_tokens_total"] == spec["drafted_tokens"]
    accepted = moved["eaglespec:spec_decode_num_accepted_tokens_total"]
    assert accepted == spec["accepted_tokens"] == moved["eaglespec:spec_decode_num_accepted_tokens_per_pos_total"]
    # each forward adds the accepted tokens and one more; the last step may accept past max_tokens
    assert accepted >= r.usage.completion_tokens - spec["target_forwards"]
    assert moved["eaglespec:time_to_first_token_seconds_count"] == 1
    assert moved["eaglespec:e2e_request_latency_seconds_count"] == 1
    reason = r.choices[0].finish_reason
    assert metric(after, "eaglespec:request_success_total", finished_reason=reason) == \
        metric(before, "eaglespec:request_success_total", finished_reason=reason) + 1
    ok = dict(handler="/v1/chat/completions", method="POST", status="200")
    http_ok = "eaglespec:http_requests_total"
    assert metric(after, http_ok, **ok) == metric(before, http_ok, **ok) + 1
    if metric(after, "eaglespec:spec_decode_num_drafts_total"):
        assert metric(after, "eaglespec:spec_decode_mean_acceptance_length") >= 1.0


def test_concurrent_requests_do_not_mix(server, reference):
    prompts = [[{"role": "user", "content": f"w{i} w{i + 1} w{2 * i}"}] for i in range(2, 10)]
    expected = [chat_text(reference, p, max_new_tokens=12) for p in prompts]
    c = client(server)

    def ask(messages):
        if messages[0]["content"].startswith("w3 "):  # one streams while the others wait
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
                model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True) if ch.choices)
        return c.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                         temperature=0).choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(ask, prompts)) == expected


# -- bad input -------------------------------------------------------------------------------

MSG = [{"role": "user", "content": "w1"}]
LONG = [{"role": "user", "content": "w1 " * MAX_LEN}]
BAD = [
    ("chat", b"{not json", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", b"", 400, None),
    ("chat", {"model": "tiny"}, 400, "messages"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"messages": "hello"}, 400, "messages"),
    ("chat", {"messages": [{"role": "robot", "content": "w1"}]}, 400, "messages.0.role"),
    ("chat", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("chat", {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("chat", {"messages": MSG, "max_tokens": "ten"}, 400, "max_tokens"),
    ("chat", {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"messages": MSG, "max_tokens": -3}, 400, "max_tokens"),
    ("chat", {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("chat", {"messages": MSG, "max_tokens": 10 * MAX_LEN}, 400, "max_tokens"),
    ("chat", {"messages": MSG, "temperature": -0.1}, 400, "temperature"),
    ("chat", {"messages": MSG, "temperature": 2.5}, 400, "temperature"),
    ("chat", {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("chat", {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    ("chat", {"messages": MSG, "seed": "x"}, 400, "seed"),
    ("chat", {"messages": MSG, "stop": ""}, 400, "stop"),
    ("chat", {"messages": MSG, "stop": [1]}, 400, "stop"),
    ("chat", {"messages": MSG, "n": 2}, 400, "n"),
    ("chat", {"messages": MSG, "logprobs": True}, 400, "logprobs"),
    ("chat", {"messages": MSG, "stream": "yes"}, 400, "stream"),
    ("chat", {"messages": LONG}, 400, "messages"),
    ("chat", {"messages": MSG, "model": "gpt-4o"}, 404, "model"),
    ("chat", b'{"messages": [], "pad": "' + b"x" * (2 << 20) + b'"}', 413, None),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": 42}, 400, "prompt"),
    ("completions", {"prompt": "w1 " * MAX_LEN}, 400, "prompt"),
    ("completions", {"prompt": "w1", "logprobs": 2}, 400, "logprobs"),
    ("completions", {"prompt": "w1", "max_tokens": 0}, 400, "max_tokens"),
]
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@pytest.mark.parametrize("endpoint, body, status, param", BAD,
                         ids=[f"{e}-{i}-{s}" for i, (e, _, s, _) in enumerate(BAD)])
def test_bad_input_gets_an_openai_error(server, endpoint, body, status, param):
    code, _, text = http(server, PATHS[endpoint], body)
    assert code == status, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}[status]


def test_errors_leave_the_server_serving(server):
    assert http(server, "/v1/chat/completions", method="GET")[0] == 405
    assert json.loads(http(server, "/nowhere")[2])["error"]["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="other", messages=MSG)
    assert client(server).chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices


def test_api_key(tiny_model_dir, paced_engine):
    with running_server(paced_engine, api_key="s3cret") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            code, _, text = http(url, "/v1/models", headers=headers)
            assert code == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        code, _, _ = http(url, "/v1/chat/completions", b"{broken", headers={"Authorization": "Bearer nope"})
        assert code == 401  # the key is checked before the body
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        assert client(url, "s3cret").chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices
        assert http(url, "/health")[0] == 200 and http(url, "/metrics")[0] == 200  # no key needed


def test_engine_failure_is_a_500_and_the_server_goes_on(paced_engine, caplog):
    with running_server(paced_engine) as url:
        c = client(url)
        with pytest.raises(openai.InternalServerError) as err:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"w1 {FAIL_WORD}"}])
        assert err.value.status_code == 500 and err.value.body["code"] == "internal_error"
        assert any(r.exc_info and "deliberate failure" in str(r.exc_info[1]) for r in caplog.records)  # traceback
        assert c.chat.completions.create(model="tiny", messages=MSG, max_tokens=3).choices[0].message.content
        assert metric(metrics(url), "eaglespec:request_success_total", finished_reason="error") == 1
        code, _, text = http(url, "/v1/completions", {"prompt": f"w1 {ENCODE_FAIL_WORD}"})  # fails in the handler
        assert code == 500 and json.loads(text)["error"]["type"] == "server_error"
        assert any(r.exc_info and "while encoding" in str(r.exc_info[1]) for r in caplog.records)
        assert c.completions.create(model="tiny", prompt="w1 w2", max_tokens=3).choices[0].text


# -- queue, disconnects, timeouts ----------------------------------------------------------


def wait_until(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_full_queue_answers_429_and_drops_nothing(paced_engine):
    with running_server(paced_engine, max_queue=1) as url:
        c = client(url)
        long = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=150, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
        next(iter(long))  # generating: the model thread is busy
        queued = {}
        waiter = threading.Thread(target=lambda: queued.update(r=c.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=3, temperature=0)))
        waiter.start()
        wait_until(lambda: json.loads(http(url, "/health")[2])["waiting"] == 1)
        code, headers, text = http(url, "/v1/chat/completions", {"messages": MSG, "max_tokens": 3})
        assert code == 429 and int(headers["Retry-After"]) >= 1
        assert json.loads(text)["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=3)
        long.close()  # the client leaves mid-stream: the queued request runs next
        waiter.join(30)
        assert queued["r"].choices[0].message.content
        samples = metrics(url)
        assert metric(samples, "eaglespec:request_success_total", finished_reason="abort") == 1
        assert metric(samples, "eaglespec:http_requests_total", status="429") == 2


def test_max_queue_zero_serves_one_at_a_time(paced_engine):
    with running_server(paced_engine, max_queue=0) as url:
        c = client(url)
        assert c.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices  # idle: admitted
        stream = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=100, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        assert http(url, "/v1/chat/completions", {"messages": MSG, "max_tokens": 2})[0] == 429
        stream.close()


def test_disconnect_mid_stream_cancels_the_generation(paced_engine):
    with running_server(paced_engine) as url:
        c = client(url)
        stream = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=200, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        it = iter(stream)
        for _ in range(3):
            next(it)
        stream.close()
        wait_until(lambda: metric(metrics(url), "eaglespec:request_success_total", finished_reason="abort") == 1)
        generated = metric(metrics(url), "eaglespec:generation_tokens_total")
        assert generated < 60  # stopped within a few steps, not after 200 tokens
        r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_request_timeout_is_a_clear_error(paced_engine):
    with running_server(paced_engine, request_timeout=0.5) as url:
        c = client(url)
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=200, extra_body={"ignore_eos": True})
        assert err.value.status_code == 504 and err.value.body["code"] == "timeout"
        assert time.monotonic() - start < 5
        with pytest.raises(openai.APIError, match="request-timeout"):
            for _ in c.chat.completions.create(model="tiny", messages=MSG, max_tokens=200, stream=True,
                                               extra_body={"ignore_eos": True}):
                pass
        r = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, temperature=0)
        assert r.choices[0].message.content


# -- the real default model ------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_greedy_answer_equals_generate(tmp_path, capsys, monkeypatch):
    """The server's greedy answer is the text `eaglespec generate --temperature 0` prints. Both
    run one engine (loaded once, used by one of them at a time) to halve the test's time."""
    import torch

    from eaglespec import cli
    from eaglespec.cli import generate as generate_command

    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Name three uses of a paperclip."}]
    (tmp_path / "m.json").write_text(json.dumps(messages))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    engine = load_engine(build_parser().parse_args(["serve"]))
    monkeypatch.setattr(generate_command, "load_engine", lambda args: engine)
    try:
        assert cli.main(["generate", "--messages", str(tmp_path / "m.json"), "--temperature", "0",
                         "--max-new-tokens", "48", "--json"]) == 0
        expected = json.loads(capsys.readouterr().out)["text"]
        with running_server(engine, model_name="smol") as url:
            r = client(url).chat.completions.create(model="smol", messages=messages, max_tokens=48, temperature=0)
    finally:
        torch.set_num_threads(threads)
    assert r.choices[0].message.content == expected


def test_loadtest_reports_and_finds_no_crosstalk(server, capsys):
    import asyncio

    from eaglespec.serve.loadtest import main, run_load

    report = asyncio.run(run_load(server, clients=4, n_requests=10, max_tokens=12))
    assert (report.completed, report.rejected, report.failed) == (10, 0, 0)
    assert report.checked == 10 and report.mismatches == 0  # 8 greedy, 2 seeded sampled
    assert report.generated_tokens > 0 and report.tokens_per_s > 0
    assert main(["--url", "http://192.0.2.1:8000"]) == 2  # refuses a non-loopback server, sends nothing
    assert "not a loopback address" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [(["--port", "0"], "--port"), (["--max-queue", "-1"], "max_queue"),
                                          (["--request-timeout", "0"], "request_timeout")])
def test_serve_flags_fail_before_the_model_loads(capsys, flags, words):
    from eaglespec.cli import main

    assert main(["serve", "--model", "/nonexistent/model", *flags]) == 2
    assert words in capsys.readouterr().err


def test_served_model_name():
    from eaglespec.cli.serve import served_name

    def name(*argv):
        return served_name(build_parser().parse_args(["serve", *argv]))

    assert name() == "SmolLM2-135M-Instruct"
    assert name("--model", "/models/qwen2-0.5b/") == "qwen2-0.5b"
    assert name("--model", "x/tiny.Q4_0.gguf") == "tiny.Q4_0"
    assert name("--model", "x", "--served-model-name", "mine") == "mine"
