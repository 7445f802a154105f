"""The serving engine without HTTP: an adapter unloaded while a request decodes on it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import deltatune
from deltatune.generate import Row, SamplingParams, TextTracker
from deltatune.models import load_model

pytest.importorskip("fastapi")

from deltatune.serve.engine import Engine, EngineError  # noqa: E402


@pytest.fixture
def engine(model_dir, tmp_path):
    model, tok = load_model(model_dir, dtype="fp32")
    deltatune.inject(model, deltatune.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(model):
            for t in layer.factors("default"):
                t.normal_(0, 0.3)
    path = deltatune.save_adapter(model, tmp_path / "x")
    base, tok = load_model(model_dir, dtype="fp32")
    eng = Engine(base, tok, base_name="base", max_batch_size=4)
    eng.load_adapter("x", path)
    eng.batch.stop_ids = set()  # never stop early: every request decodes max_tokens steps
    eng.start()
    yield eng
    eng.stop(timeout=5)


async def _reply(eng: Engine, ids: list[int], n: int, on_first=None) -> tuple[str, str]:
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    row = Row(ids, SamplingParams(n), "x", TextTracker(eng.tokenizer))
    eng.submit([row], loop, queue)
    while True:
        event = await asyncio.wait_for(queue.get(), 60)
        if event[0] == "delta" and on_first is not None:
            on_first()
            on_first = None
        if event[0] == "done":
            return event[2], event[4]
        assert event[0] != "error", event


def test_unload_during_a_request_finishes_it_on_the_adapter(engine, monkeypatch):
    ids = engine.tokenizer("the quick brown fox")["input_ids"]
    reference = asyncio.run(_reply(engine, ids, 80))
    seen: dict[str, object] = {}
    # On a quiet machine the engine thread could decode all 80 tokens before the client has read the
    # first one: hold the engine's next iteration after the prefill until the adapter is unloaded, so
    # the unload always lands while the row is decoding.
    prefilled, unloaded = threading.Event(), threading.Event()
    iteration = engine._iteration

    def gated() -> bool:
        if prefilled.is_set() and not unloaded.is_set():
            unloaded.wait(30)
        worked = iteration()
        if engine.batch.active:
            prefilled.set()
        return worked

    monkeypatch.setattr(engine, "_iteration", gated)

    def unload() -> None:
        engine.unload_adapter("x")
        seen["running"] = engine.load["running"]
        seen["listed"] = engine.has_model("x")
        unloaded.set()

    got = asyncio.run(_reply(engine, ids, 80, on_first=unload))
    assert seen == {"running": 1, "listed": False}  # unloaded while the row was decoding
    assert got == reference
    deadline = time.monotonic() + 10
    while "x" in engine.model.deltatune_state.configs:
        assert time.monotonic() < deadline, "adapter weights never freed"
        time.sleep(0.02)
    with pytest.raises(EngineError) as e:
        engine.unload_adapter("x")
    assert e.value.status == 404
