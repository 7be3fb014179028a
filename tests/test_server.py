"""The OpenAI-compatible server, through the official `openai` client against a real uvicorn server."""
from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import layerskip_ext

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from layerskip_ext.server.app import create_app  # noqa: E402

DEMO = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "layerskip-demo")
TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")
NAME = "demo-chat"
PROMPT = "It is a truth universally acknowledged, that"
SPEC = {"strategy": "self_speculative", "exit_layer": 3, "num_speculations": 2}
MESSAGES = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me of Emma."}]


def demo_chat_dir(directory):
    """The demo checkpoint (symlinked) plus a tokenizer_config.json holding a chat template."""
    os.makedirs(directory, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        os.symlink(os.path.abspath(os.path.join(DEMO, name)), os.path.join(directory, name))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": TEMPLATE, "eos_token": "<|endoftext|>"}, f)
    return str(directory)


class LiveServer:
    """uvicorn serving an app in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.app = app

    def client(self, **kwargs):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kwargs)

    def metrics(self) -> dict:
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return demo_chat_dir(tmp_path_factory.mktemp("serve") / "demo")


@pytest.fixture(scope="module")
def offline(model_dir):
    """A separate load of the same checkpoint: the reference for what the server returns."""
    return layerskip_ext.load(model_dir)


@pytest.fixture(scope="module")
def live(model_dir):
    server = LiveServer(create_app(layerskip_ext.load(model_dir), model_name=NAME, max_batch=8, max_queue=256))
    yield server
    server.close()


def test_models_health_metrics(live):
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    models = live.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    m = live.metrics()
    assert {"layerskip_queue_depth", "layerskip_active_rows", "layerskip_tokens_per_second",
            "layerskip_acceptance_rate"} <= set(m)


ADAPTIVE = {"strategy": "self_speculative", "exit_layer": 3, "num_speculations": 4, "adaptive": True,
            "draft_threshold": 0.05}


@pytest.mark.parametrize("settings", [{}, SPEC, ADAPTIVE], ids=["autoregressive", "self_speculative", "adaptive"])
def test_completion_equals_offline_generate(live, offline, settings):
    expected = layerskip_ext.generate(offline, PROMPT, max_new_tokens=24, stop_token_ids=None, **settings)
    r = live.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                         extra_body=settings)
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(offline.encode(PROMPT)), len(expected.tokens))
    stats = r.model_extra["layerskip"]
    assert stats["strategy"] == (settings.get("strategy") or "autoregressive")
    if settings:
        assert (stats["drafted"], stats["accepted"]) == (expected.stats.drafted, expected.stats.accepted)
        assert stats["drafted"] > 0 and 0 <= stats["acceptance_rate"] <= 1
        assert stats["accepted"] == round(stats["acceptance_rate"] * stats["drafted"])
    # streamed: the pieces concatenate to the same text
    pieces, finish = [], None
    for chunk in live.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0,
                                                  stream=True, extra_body=settings):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == expected.text and len([p for p in pieces if p]) > 1
    assert finish == r.choices[0].finish_reason


def test_chat_equals_offline_chat(live, offline):
    expected = layerskip_ext.chat(offline, MESSAGES, max_new_tokens=20, **SPEC)
    client = live.client()
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=20, temperature=0, extra_body=SPEC)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(expected.prompt_tokens)
    stream = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=20, temperature=0,
                                            extra_body=SPEC, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stop_seed_and_sampling(live, offline):
    full = layerskip_ext.generate(offline, PROMPT, max_new_tokens=30, **SPEC)
    stop = full.text[10:14]
    r = live.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                         extra_body=SPEC)
    assert r.choices[0].text == full.text[:full.text.find(stop)] and r.choices[0].finish_reason == "stop"
    sampled = layerskip_ext.generate(offline, PROMPT, max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7, **SPEC)
    texts = {live.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.9,
                                              seed=7, extra_body=SPEC).choices[0].text for _ in range(2)}
    assert texts == {sampled.text}


def test_many_concurrent_clients(live, offline):
    """32 clients x 4 requests, mixed streaming / not, chat / completions: each answer is its own prompt's."""
    prompts = [f"Chapter {i}. {w}" for i, w in enumerate(["It was", "She said", "The house", "Mr. Darcy"] * 32)]
    expected = [layerskip_ext.generate(offline, p, max_new_tokens=8).text for p in prompts]

    def one(i):
        client = live.client(timeout=300)
        if i % 2:
            return client.completions.create(model=NAME, prompt=prompts[i], max_tokens=8, temperature=0).choices[0].text
        stream = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=8, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream)

    def client_run(c):
        return [(i, one(i)) for i in range(c * 4, c * 4 + 4)]

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = dict(kv for rows in pool.map(client_run, range(32)) for kv in rows)
    assert len(results) == 128
    assert [results[i] for i in range(128)] == expected


def error_of(response):
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return response.status_code, body["error"]["message"]


def test_bad_requests_get_openai_errors(live):
    post = lambda path, **kw: httpx.post(live.url + path, timeout=60, **kw)  # noqa: E731
    good = {"model": NAME, "prompt": "It was", "max_tokens": 4}
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
        (dict(json={"model": NAME}), 400, "prompt"),
        (dict(json={**good, "max_tokens": "many"}), 400, "max_tokens"),
        (dict(json={**good, "max_tokens": "4"}), 400, "max_tokens"),  # strict types: no coercion
        (dict(json={**good, "max_tokens": 4.0}), 400, "max_tokens"),
        (dict(json={**good, "strategy": "early_exit", "exit_layer": True}), 400, "exit_layer"),
        (dict(json={**good, "temperature": "0.5"}), 400, "temperature"),
        (dict(json={**good, "model": "gpt-4"}), 404, "does not exist"),
        (dict(json={**good, "strategy": "self_speculative", "exit_layer": 99}), 400, "exit_layer"),
        (dict(json={**good, "n": 2}), 400, "unsupported"),
        (dict(json={**good, "max_tokens": 5000}), 400, "context length"),
        (dict(json={**good, "prompt": [99999]}), 400, "out of range"),
        (dict(json={**good, "stop": [""]}), 400, "stop"),
        (dict(json={**good, "temperature": -1}), 400, "temperature"),
        (dict(json={**good, "strategy": "self_speculative", "draft_threshold": 2}), 400, "draft_threshold"),
        (dict(json={**good, "strategy": "self_speculative", "adaptive": "sometimes"}), 400, "adaptive"),
        # checked whatever the strategy, as generate() checks them; strict stream_options (the audit's finds)
        (dict(json={**good, "exit_layer": -5}), 400, "exit_layer"),
        (dict(json={**good, "strategy": "autoregressive", "num_speculations": -1}), 400, "num_speculations"),
        (dict(json={**good, "stream": True, "stream_options": {"include_usage": "yes"}}), 400, "include_usage"),
    ]
    # JSON can hold a lone surrogate ("\\ud800"), which no tokenizer takes
    surrogate = lambda body: dict(content=json.dumps(body).encode(), headers={"content-type": "application/json"})  # noqa: E731
    cases += [(surrogate({**good, "prompt": "a\ud800"}), 400, "not valid Unicode"),
              (surrogate({**good, "stop": ["\ud800"]}), 400, "not valid Unicode")]
    for kwargs, status, text in cases:
        code, message = error_of(post("/v1/completions", **kwargs))
        assert code == status and text in message, (kwargs, code, message)
    code, message = error_of(post("/v1/chat/completions", **surrogate(
        {"model": NAME, "messages": [{"role": "user", "content": "\udfff"}]})))
    assert code == 400 and "not valid Unicode" in message, (code, message)
    code, message = error_of(post("/v1/chat/completions", json={"model": NAME, "messages": []}))
    assert code == 400 and "messages" in message
    code, _ = error_of(httpx.get(live.url + "/v1/nothing"))
    assert code == 404
    with pytest.raises(openai.BadRequestError):
        live.client().completions.create(model=NAME, prompt="x", max_tokens=4, extra_body={"exit_layer": 0,
                                                                                          "strategy": "early_exit"})
    assert live.client().completions.create(model=NAME, prompt="It was", max_tokens=2).usage.completion_tokens == 2
    # an integer for a float field stays valid JSON usage
    assert post("/v1/completions", json={**good, "temperature": 1, "top_p": 1, "seed": 3}).status_code == 200


def test_stored_settings_are_the_self_speculative_default(tmp_path, offline):
    """A request naming only the strategy runs at the settings stored with the model (layerskip-ext tune)."""
    from layerskip_ext.settings import Settings, save_settings

    directory = demo_chat_dir(tmp_path / "tuned")
    save_settings(directory, Settings(exit_layer=2, num_speculations=3, adaptive=True), offline.num_layers)
    server = LiveServer(create_app(layerskip_ext.load(directory), model_name=NAME))
    try:
        r = server.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0,
                                               extra_body={"strategy": "self_speculative"})
        stats = r.model_extra["layerskip"]
        assert (stats["exit_layer"], stats["num_speculations"]) == (2, 3)
        expected = layerskip_ext.generate(offline, PROMPT, max_new_tokens=16, strategy="self_speculative",
                                          exit_layer=2, num_speculations=3, adaptive=True)
        assert r.choices[0].text == expected.text
        assert (stats["drafted"], stats["accepted"]) == (expected.stats.drafted, expected.stats.accepted)
        r = server.client().completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0,
                                               extra_body={"strategy": "self_speculative", "exit_layer": 4})
        assert r.model_extra["layerskip"]["exit_layer"] == 4  # the request's own field wins
    finally:
        server.close()


def test_chat_without_template_is_a_400(tmp_path):
    server = LiveServer(create_app(layerskip_ext.load(DEMO), model_name=NAME))
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            server.client().chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4)
    finally:
        server.close()


def test_stop_strings_without_a_tokenizer_are_a_400(tmp_path):
    """A model without a tokenizer cannot match stop strings: the request is refused, as offline generate() refuses
    it (the server answered 200 and ignored the stop strings)."""
    from conftest import make_hf_checkpoint
    directory = make_hf_checkpoint(tmp_path, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=64, vocab_size=32,
                                   max_position_embeddings=64)
    server = LiveServer(create_app(layerskip_ext.load(directory), model_name=NAME))
    try:
        body = {"model": NAME, "prompt": [1, 2, 3], "max_tokens": 4}
        code, message = error_of(httpx.post(server.url + "/v1/completions", json={**body, "stop": ["the"]},
                                            timeout=60))
        assert code == 400 and "tokenizer" in message
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        server.close()


def wait_for(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_disconnects_cancel_their_rows(live):
    before = live.metrics().get('layerskip_requests_finished_total{reason="cancelled"}', 0)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
        next(r.iter_lines())  # the first event arrived: the row is decoding; leave
    # a non-streaming request whose client closes the socket right after sending it
    raw = json.dumps({**body, "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(raw) + raw)
        time.sleep(0.3)
    wait_for(lambda: live.metrics().get('layerskip_requests_finished_total{reason="cancelled"}', 0) >= before + 2,
             "both rows to be cancelled")
    wait_for(lambda: live.metrics()["layerskip_active_rows"] == 0, "the rows to leave")
    assert live.client().completions.create(model=NAME, prompt="It was", max_tokens=3).usage.completion_tokens == 3


class GatedCore:
    """A core whose steps wait for a gate: lets a test fill the batch and the queue deterministically."""

    def __init__(self, core):
        self.core, self.max_rows, self.gate = core, core.max_rows, threading.Event()

    def add(self, key, args):
        self.core.add(key, args)

    def step(self):
        self.gate.wait()
        return self.core.step()

    def remove(self, key):
        return self.core.remove(key)


def test_full_queue_is_a_429(model_dir):
    from layerskip_ext.server.scheduler import BatchedCore
    model = layerskip_ext.load(model_dir)
    core = GatedCore(BatchedCore(model, 1))
    server = LiveServer(create_app(model, model_name=NAME, max_batch=1, max_queue=1, core=core))
    try:
        client = server.client(timeout=120)
        ask = lambda: client.completions.create(model=NAME, prompt="It was", max_tokens=3)  # noqa: E731
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask)
            wait_for(lambda: server.metrics()["layerskip_active_rows"] == 1, "the first row")
            second = pool.submit(ask)
            wait_for(lambda: server.metrics()["layerskip_queue_depth"] == 1, "the second request to wait")
            with pytest.raises(openai.RateLimitError):
                ask()
            core.gate.set()
            assert first.result().usage.completion_tokens == second.result().usage.completion_tokens == 3
    finally:
        core.gate.set()
        server.close()


@pytest.mark.slow
def test_cli_serve(model_dir):
    """`layerskip-ext serve` in its own process answers the openai client."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "layerskip_ext.cli", "serve", "--model", model_dir, "--port",
                             str(port), "--model-name", NAME], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, "the server to start", timeout=300)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=5, temperature=0)
        assert r.usage.completion_tokens <= 5 and r.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# ----------------------------------------------------------------------------------------------
# the scheduler alone, on a scripted core: who is in each step


class ScriptedCore:
    """Each row yields one token per step until it has args.max_new_tokens; logs the rows of every step."""

    max_rows = 2

    def __init__(self):
        self.rows, self.log, self.removed = {}, [], []

    def add(self, key, args):
        self.rows[key] = [args.max_new_tokens, 0]

    def step(self):
        from layerskip_ext.server.scheduler import CoreStep
        self.log.append(sorted(self.rows))
        out = {}
        for key, row in self.rows.items():
            row[1] += 1
            out[key] = CoreStep([row[1] % 26], "length" if row[1] >= row[0] else None)
        return out

    def remove(self, key):
        from layerskip_ext.generation import GenerationStats
        self.removed.append(key)
        del self.rows[key]
        return GenerationStats("autoregressive", None, None)


class LetterModel:
    @staticmethod
    def decode(ids):
        return "".join(chr(ord("a") + t) for t in ids)


def scripted_args(n):
    from layerskip_ext.generation import GenerationArgs
    return GenerationArgs([1], n, "autoregressive", 1, 1, 0.0, 0, 1.0, 0, (), 64)


def test_scheduler_joins_rows_and_frees_slots_at_once():
    import asyncio
    from layerskip_ext.server.scheduler import Scheduler
    core = ScriptedCore()
    scheduler = Scheduler(LetterModel(), max_batch=2, max_queue=8, core=core)

    async def run():
        a, b, c = (scheduler.submit(scripted_args(n)) for n in (6, 2, 2))  # max_batch 2: c waits
        scheduler.start()  # after the submissions, so that the first step sees a and b
        try:
            results = [await r.result() for r in (a, b, c)]
            d = scheduler.submit(scripted_args(1000))
            async for kind, _ in d:  # the first piece of text: d is decoding; its client goes away
                d.cancel()
                break
            return results, await d.result()
        finally:
            scheduler.stop()

    (ra, rb, rc), rd = asyncio.run(run())
    assert [r.text for r in (ra, rb, rc)] == ["bcdefg", "bc", "bc"]
    a, b, c, d = 0, 1, 2, 3
    # b and c share steps with a; c takes b's row at the step right after b finished; a finishes alone
    assert core.log[:6] == [[a, b], [a, b], [a, c], [a, c], [a], [a]]
    assert core.removed[:3] == [b, c, a]
    assert rd.finish_reason == "cancelled" and core.removed[3] == d and len(core.log) < 6 + 1000
    assert scheduler.metrics.requests_finished["cancelled"] == 1


def test_waiting_text_events_are_taken_together():
    """A client that reads slower than the engine steps gets the texts waiting on its row in one piece
    (Row.take_text, one SSE chunk); the event after them (done) still comes next, in order."""
    import asyncio
    from layerskip_ext.server.scheduler import Row

    async def run():
        row = Row(0, scripted_args(3), None, asyncio.get_running_loop())
        for piece in ("a", "b", "c"):
            row.events.put_nowait(("text", piece))
        row.events.put_nowait(("done", "result"))
        first = await row.__anext__()
        rest = row.take_text()
        assert row.take_text() == ""  # the held event stops further taking
        return first, rest, [event async for event in row]

    first, rest, tail = asyncio.run(run())
    assert first == ("text", "a") and rest == "bc"
    assert tail == [("done", "result")]
