"""The OpenAI-compatible server, driven by the real ``openai`` client on a free loopback port.

References: ``deltatune generate`` (the CLI, in process) for greedy replies; the non-streamed
reply for the streamed chunks; sequential requests for the concurrent load.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import deltatune  # noqa: E402
from deltatune.cli import main  # noqa: E402
from deltatune.models import load_model  # noqa: E402
from deltatune.serve import build_server  # noqa: E402

KEY = "test-key"
N_ADAPTERS = 8


def _make_adapters(model_dir: Path, out: Path) -> dict[str, str]:
    """8 random non-zero LoRA adapters of two shapes, saved in PEFT layout."""
    paths = {}
    for i in range(N_ADAPTERS):
        model, _ = load_model(model_dir, dtype="fp32")
        cfg = (deltatune.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]) if i % 2 == 0
               else deltatune.LoraConfig(r=8, alpha=4, use_rslora=True, target_modules="all-linear"))
        deltatune.inject(model, cfg)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for _, layer in deltatune.lora_layers(model):
                for t in layer.factors("default"):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
        paths[f"a{i}"] = str(deltatune.save_adapter(model, out / f"a{i}"))
    return paths


class Running:
    """A server on a free 127.0.0.1 port in a background thread; ``stop()`` must end the thread."""

    def __init__(self, model_dir: Path, adapters: dict[str, str], **kw: Any) -> None:
        model, tok = load_model(model_dir, dtype="fp32")
        self.server = build_server(model, tok, base_name="tiny-base", adapters=adapters, **kw)
        self.engine = self.server.engine
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, key: str = KEY) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, body: Any, key: str = KEY, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server did not stop"


@pytest.fixture(scope="module")
def adapters(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _make_adapters(model_dir, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapter-root")


@pytest.fixture(scope="module")
def srv(model_dir: Path, adapters: dict[str, str], root: Path):
    s = Running(model_dir, adapters, api_key=KEY, max_batch_size=8, max_queue=64, adapter_root=str(root),
                max_tokens=64, max_body_bytes=64 << 10)
    yield s
    s.stop()


def _cli_generate(model_dir: Path, adapter: str | None, prompt: str, n: int, capsys: pytest.CaptureFixture[str]) -> str:
    args = ["generate", "--model", str(model_dir), "--dtype", "fp32", "--prompt", prompt, "--max-new-tokens", str(n)]
    capsys.readouterr()
    assert main(args + (["--adapter", adapter] if adapter else [])) == 0
    return capsys.readouterr().out.strip()


def _chat(client: Any, model: str, prompt: str, n: int = 12, **kw: Any) -> Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                          temperature=0, max_tokens=n, **kw)


def _error_of(exc: Any) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_models_lists_base_and_adapters(srv):
    models = srv.client().models.list().data
    ids = [m.id for m in models]
    assert ids[0] == "tiny-base" and sorted(ids[1:]) == sorted(f"a{i}" for i in range(N_ADAPTERS))
    extra = {m.id: m.model_extra for m in models}
    assert extra["tiny-base"]["parent"] is None
    assert all(extra[f"a{i}"]["parent"] == "tiny-base" for i in range(N_ADAPTERS))


def test_greedy_chat_equals_cli_generate(srv, model_dir, adapters, capsys):
    client = srv.client()
    replies = {}
    for model, adapter in (("tiny-base", None), ("a0", adapters["a0"]), ("a1", adapters["a1"])):
        got = _chat(client, model, "What is the capital of France?", 12)
        replies[model] = got.choices[0].message.content
        assert replies[model].strip() == _cli_generate(model_dir, adapter, "What is the capital of France?", 12, capsys)
        assert got.usage.prompt_tokens > 0 and got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        assert got.choices[0].finish_reason in ("stop", "length")
    assert len(set(replies.values())) == 3  # the adapters really change the reply


def test_streamed_chunks_concatenate_to_the_reply(srv):
    client = srv.client()
    whole = _chat(client, "a3", "hello there", 20)
    chunks = list(_chat(client, "a3", "hello there", 20, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the completions endpoint, streamed and not, with a stop string cut from a free reply
    free = client.completions.create(model="a2", prompt="The quick brown", max_tokens=16, temperature=0)
    body = free.choices[0].text
    assert len(body) > 4
    stop = body[2:4]
    cut = client.completions.create(model="a2", prompt="The quick brown", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == body[: body.find(stop)] and cut.choices[0].finish_reason == "stop"
    parts = list(client.completions.create(model="a2", prompt="The quick brown", max_tokens=16, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == body


def test_raw_stream_ends_with_done(srv):
    req = urllib.request.Request(
        srv.url + "/v1/chat/completions", method="POST",
        data=json.dumps({"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                         "stream": True}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_error_statuses_and_shapes(srv):
    client = srv.client()
    with pytest.raises(openai.NotFoundError) as e404:
        _chat(client, "no-such-adapter", "hi")
    assert e404.value.status_code == 404 and _error_of(e404.value)["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e400:
        client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert _error_of(e400.value)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        _chat(client, "a0", "word " * 600, 8)
    err = _error_of(too_long.value)
    assert "512" in err["message"] and err["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as cap:
        _chat(client, "a0", "hi", 1000)
    assert "64" in _error_of(cap.value)["message"]
    with pytest.raises(openai.AuthenticationError) as e401:
        _chat(srv.client("wrong"), "a0", "hi")
    assert e401.value.status_code == 401 and _error_of(e401.value)["code"] == "invalid_api_key"
    status, body = srv.post("/v1/chat/completions", None, raw=b"{" + b" " * (70 << 10) + b"}")
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = srv.post("/v1/chat/completions", {"model": "a0", "messages": "nope"})
    assert status == 400 and body["error"]["param"] == "messages"


def test_hot_load_request_unload_then_404(srv, adapters, root, model_dir, tmp_path):
    shutil.copytree(adapters["a5"], root / "fresh")
    status, body = srv.post("/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": str(root / "fresh")})
    assert status == 200, body
    client = srv.client()
    assert "fresh" in [m.id for m in client.models.list().data]
    assert _chat(client, "fresh", "hi", 8).choices[0].message.content == _chat(client, "a5", "hi", 8).choices[0].message.content
    assert srv.post("/v1/unload_lora_adapter", {"lora_name": "fresh"})[0] == 200
    with pytest.raises(openai.NotFoundError):
        _chat(client, "fresh", "hi")
    assert srv.post("/v1/unload_lora_adapter", {"lora_name": "fresh"})[0] == 404
    # outside the root: refused; a shape mismatch: refused before anything changes
    status, body = srv.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": adapters["a1"]})
    assert status == 403 and body["error"]["param"] == "lora_path"
    other = deltatune.inject(deltatune.testing.make_tiny_llama(vocab_size=400, hidden_size=32),
                             deltatune.LoraConfig(r=2))
    deltatune.save_adapter(other, root / "wrong-base")
    before = [m.id for m in client.models.list().data]
    status, body = srv.post("/v1/load_lora_adapter", {"lora_name": "wrong", "lora_path": str(root / "wrong-base")})
    assert status == 400 and "[32, 32]" in body["error"]["message"] and "[64, 64]" in body["error"]["message"]
    assert [m.id for m in client.models.list().data] == before
    assert _chat(client, "a5", "hi", 8).choices[0].message.content  # still serving


def test_concurrent_load_matches_sequential(srv):
    """64 requests over 8 adapters (and prompts of different lengths), 8 in flight at a time."""
    client = srv.client()
    jobs = [(f"a{i % N_ADAPTERS}", f"request {i}: " + "abc " * (i % 5)) for i in range(64)]
    sequential = {j: _chat(client, m, p, 10).choices[0].message.content for j, (m, p) in enumerate(jobs[:16])}
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda mp: _chat(client, mp[0], mp[1], 10).choices[0].message.content, jobs))
    assert time.monotonic() - start < 120
    assert all(isinstance(g, str) for g in got)
    assert {j: got[j] for j in sequential} == sequential
    # the other 48 equal the same requests repeated (same prompt + adapter as one of the first 16 or not)
    again = [_chat(client, m, p, 10).choices[0].message.content for m, p in jobs[16:24]]
    assert again == got[16:24]
    load = srv.engine.load
    assert load["running"] == 0 and load["waiting"] == 0
    assert load["peak_rows"] > 1  # requests for different adapters really decoded together


def test_queue_full_disconnect_and_shutdown(model_dir, adapters):
    s = Running(model_dir, {"a0": adapters["a0"]}, api_key=KEY, max_batch_size=1, max_queue=0, max_tokens=400,
                shutdown_timeout=2)
    try:
        client = s.client()
        results: list[Any] = []
        with s.engine.lock:  # the scheduler is paused: the first request waits in the queue
            t = threading.Thread(target=lambda: results.append(_chat(client, "a0", "hi", 4)))
            t.start()
            deadline = time.monotonic() + 10
            while s.engine.load["waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e429:
                _chat(client, "a0", "hi", 4)
            assert e429.value.status_code == 429 and _error_of(e429.value)["code"] == "rate_limit_exceeded"
        t.join(30)
        assert results and results[0].choices[0].message.content is not None
        # a client that goes away mid-stream frees its slot
        stream = client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=400, temperature=0, stream=True)
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 10
        while s.engine.load["running"]:
            assert time.monotonic() < deadline, "slot not freed after the client left"
            time.sleep(0.02)
        assert _chat(client, "a0", "hi", 3).choices[0].message.content is not None
    finally:
        s.stop()
    with pytest.raises(openai.APIConnectionError):
        _chat(client, "a0", "hi", 3)


def test_server_never_imports_training():
    code = ("import sys, deltatune.serve, deltatune.serve.app, deltatune.serve.engine, deltatune.generate; "
            "bad = [m for m in sys.modules if m.startswith('deltatune.train')]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_cli_serve_answers_and_stops_on_sigterm(model_dir, adapters):
    """`deltatune serve` as a user runs it: a subprocess on a free port, one request, SIGTERM, exit 0."""
    import os
    import signal

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(deltatune.__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "serve", "--model", str(model_dir), "--dtype", "fp32",
                             "--adapter", f"a0={adapters['a0']}", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
        deadline = time.monotonic() + 120
        while True:
            try:
                assert [m.id for m in client.models.list().data] == [model_dir.name, "a0"]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.3)
        assert _chat(client, "a0", "hi", 4).choices[0].message.content is not None
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says SIGTERM
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        out = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in out and "serving" in out
    finally:
        if proc.poll() is None:
            proc.kill()
