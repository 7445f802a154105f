"""The serving engine: one base model, many LoRA adapters, continuous batching on a scheduler thread.

A single thread owns the model. Each loop iteration, under ``lock``:

1. retires unloaded adapters that no running row uses any more (in-flight requests finish on the
   adapter they started with);
2. marks rows whose client went away as cancelled;
3. admits waiting requests into the free slots (``max_batch_size`` rows in all) — they are
   prefilled together and merged into the running batch (``DecodeBatch.add``);
4. runs one decode step for every running row, each row through its own adapter
   (``AdapterBank``: one gathered low-rank product for the whole batch);
5. hands each row's new text to its request (an ``asyncio.Queue`` on the server's event loop) and
   drops finished rows, freeing their slots.

Hot load / unload take the same lock, so the model never changes during a forward call. The engine
imports generation and adapter I/O, never the training code.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..generate import DecodeBatch, Row, context_limit, pad_token_id, stop_token_ids
from ..methods.lora_batched import AdapterBank

log = logging.getLogger("deltatune.serve")

__all__ = ["Engine", "EngineError", "Job"]


class EngineError(Exception):
    """A request the engine refuses: carries the HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


@dataclass
class Job:
    """One row of one request. Events go to ``queue`` on ``loop`` as tuples:
    ("delta", index, text), ("done", index, finish_reason, completion_tokens, text), ("error", index, message)."""

    row: Row
    index: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[Any, ...]]
    cancelled: bool = False
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the server's loop is closed: nobody is listening any more
            self.cancelled = True


class Engine:
    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, base_name: str,
                 max_batch_size: int = 8, max_queue: int = 64, adapter_root: str | Path | None = None) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_queue >= 0 (got {max_batch_size}, {max_queue})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.adapter_root = Path(adapter_root).resolve() if adapter_root is not None else None
        self.context = context_limit(model)
        self.lock = threading.Lock()  # the model: held for each prefill/decode step and each (un)load
        self._qlock = threading.Lock()  # the waiting queue (submitting never waits for a step)
        self.adapters: dict[str, str] = {}  # servable name → source path
        self._retiring: set[str] = set()
        self.bank = AdapterBank(model)
        self.batch = DecodeBatch(model, tokenizer, stop_ids=stop_token_ids(tokenizer, model),
                                 pad_id=pad_token_id(tokenizer), bank=self.bank)
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._accepting = True
        self._thread: threading.Thread | None = None
        self.created = int(time.time())
        self.peak_rows = 0  # the most rows decoded together so far (tests and /health read it)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="deltatune-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown: refuse new requests, cancel queued ones, let running rows finish for up
        to ``timeout`` seconds, then cancel the rest and stop the thread."""
        self._accepting = False
        with self._qlock:
            while self._waiting:
                job = self._waiting.popleft()
                job.emit("error", job.index, "the server is shutting down")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.batch.active:
            time.sleep(0.02)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, timeout))
        with self.lock:
            for row in self.batch.rows:
                if not row.done:
                    row.finish_reason = "cancelled"
                    row.tag.emit("error", row.tag.index, "the server shut down before the reply was finished")

    # ------------------------------------------------------------------ requests
    def has_model(self, name: str) -> bool:
        return name == self.base_name or name in self.adapters

    def submit(self, rows: list[Row], loop: asyncio.AbstractEventLoop,
               queue: asyncio.Queue[tuple[Any, ...]]) -> list[Job]:
        if not self._accepting:
            raise EngineError(503, "the server is shutting down", "server_error", code="service_unavailable")
        with self._qlock:
            if len(self._waiting) + len(rows) > self.max_queue + max(0, self.max_batch_size - self.batch.active):
                raise EngineError(429, f"the request queue is full ({self.max_queue} waiting); retry later",
                                  "rate_limit_error", code="rate_limit_exceeded")
            jobs = [Job(r, i, loop, queue) for i, r in enumerate(rows)]
            for job in jobs:
                job.row.tag = job
                self._waiting.append(job)
        self._wake.set()
        return jobs

    def cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.cancelled = True
        self._wake.set()

    @property
    def load(self) -> dict[str, int]:
        return {"running": self.batch.active, "waiting": len(self._waiting), "peak_rows": self.peak_rows}

    # ------------------------------------------------------------------ adapters
    def resolve_path(self, path: str) -> Path:
        """An adapter path for hot loading: must lie inside --adapter-root (symlinks resolved)."""
        if self.adapter_root is None:
            raise EngineError(403, "hot loading is disabled; start the server with --adapter-root DIR",
                              "permission_error", "lora_path")
        p = Path(path)
        p = (p if p.is_absolute() else self.adapter_root / p).resolve()
        if not p.is_relative_to(self.adapter_root):
            raise EngineError(403, f"lora_path {path!r} is outside the adapter root {str(self.adapter_root)!r}",
                              "permission_error", "lora_path")
        return p

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Validate the adapter against the base, then add it; nothing changes if a check fails."""
        from ..inject import delete_adapter
        from ..io import (
            AdapterFileError,
            AdapterMismatchError,
            _check_fingerprint,
            load_adapter,
            read_adapter_info,
        )

        if not name or name == self.base_name or name in self.adapters:
            raise EngineError(400, f"a model named {name!r} is already served; unload it first or pick another name",
                              param="lora_name")
        try:
            info = read_adapter_info(path)
        except (AdapterFileError, OSError) as e:
            raise EngineError(400, f"cannot read adapter: {e}", param="lora_path") from e
        cfg = info.config
        problems = [
            f"peft_type={cfg.get('peft_type')!r} (only LORA is served)" if cfg.get("peft_type", "LORA") != "LORA" else "",
            "DoRA (use_dora)" if cfg.get("use_dora") else "",
            f"modules_to_save={cfg.get('modules_to_save')}" if cfg.get("modules_to_save") else "",
            f"bias={cfg.get('bias')!r}" if cfg.get("bias", "none") not in (None, "none") else "",
        ]
        if any(problems):
            raise EngineError(400, f"{path}: cannot be served per row: {'; '.join(p for p in problems if p)}",
                              param="lora_path")
        with self.lock:
            if name in self._retiring:
                raise EngineError(409, f"adapter {name!r} is still being unloaded; retry shortly", param="lora_name")
            if info.fingerprint:
                arch = getattr(getattr(self.model, "config", None), "model_type", None)
                if info.fingerprint.get("model_type") not in (None, arch):
                    raise EngineError(400, f"{path}: adapter was trained on a {info.fingerprint.get('model_type')} "
                                      f"model, the base is {arch}", param="lora_path")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        _check_fingerprint(self.model, info.fingerprint, Path(path))
                    except AdapterMismatchError as e:
                        raise EngineError(400, str(e), param="lora_path") from e
                if caught:
                    raise EngineError(400, f"the adapter does not fit this base: {caught[0].message}", param="lora_path")
            try:
                load_adapter(self.model, path, name=name, activate=False)
            except (AdapterFileError, AdapterMismatchError, ValueError, TypeError) as e:
                raise EngineError(400, str(e), param="lora_path") from e
            try:
                self.bank.rebuild()
            except ValueError as e:
                delete_adapter(self.model, name)
                self.bank.rebuild()
                raise EngineError(400, str(e), param="lora_path") from e
            self.adapters[name] = str(path)
        log.info("loaded adapter %s from %s", name, path)

    def unload_adapter(self, name: str) -> None:
        """New requests for ``name`` get 404 at once; the weights go when no running row uses them."""
        with self.lock:
            if name not in self.adapters:
                raise EngineError(404, f"The model `{name}` does not exist.", param="lora_name", code="model_not_found")
            del self.adapters[name]
            self._retiring.add(name)
        self._wake.set()

    def _retire(self) -> None:
        from ..inject import delete_adapter

        with self._qlock:
            queued = {j.row.adapter for j in self._waiting}
        busy = {r.adapter for r in self.batch.rows if not r.done} | queued
        gone = [n for n in self._retiring if n not in busy]
        for n in gone:
            delete_adapter(self.model, n)
            self._retiring.discard(n)
        if gone:
            self.bank.rebuild()
            log.info("unloaded adapters %s", gone)

    # ------------------------------------------------------------------ the scheduler
    def _run(self) -> None:
        while not self._stopping:
            try:
                worked = self._iteration()
            except Exception as e:  # noqa: BLE001 - a failed step fails its rows, never the server
                log.exception("decode step failed")
                with self.lock:
                    for row in self.batch.rows:
                        if not row.done:
                            row.finish_reason = "error"
                            row.tag.emit("error", row.tag.index, f"generation failed: {e}")
                    self.batch = DecodeBatch(self.model, self.tokenizer, stop_ids=self.batch.stop_ids,
                                             pad_id=self.batch.pad_id, bank=self.bank)
                worked = True
            if not worked:
                self._wake.wait(0.5)
                self._wake.clear()

    def _iteration(self) -> bool:
        with self.lock:
            if self._retiring:
                self._retire()
            for row in self.batch.rows:
                if not row.done and row.tag.cancelled:
                    row.finish_reason = "cancelled"
            joiners: list[Job] = []
            with self._qlock:
                while self._waiting and self.batch.active + len(joiners) < self.max_batch_size:
                    job = self._waiting.popleft()
                    if not job.cancelled:
                        joiners.append(job)
            if not joiners and not self.batch.active:
                self.batch.compact(force=True)
                return False
            if joiners:
                try:
                    self.batch.add([j.row for j in joiners])
                except Exception as e:  # noqa: BLE001 - the joiners fail; the running rows go on
                    log.exception("prefill failed")
                    for j in joiners:
                        j.finished = True
                        j.emit("error", j.index, f"generation failed: {e}")
                    return True
            else:
                self.batch.step()
            self.peak_rows = max(self.peak_rows, self.batch.active)
            for row in self.batch.rows:
                self._report(row.tag)
            self.batch.compact(force=bool(self._waiting))
        return True

    def _report(self, job: Job) -> None:
        if job.finished:
            return
        row = job.row
        assert row.text is not None
        delta = row.text.take_delta()
        if delta:
            job.emit("delta", job.index, delta)
        if row.done:
            job.finished = True
            if row.finish_reason != "cancelled":
                job.emit("done", job.index, row.finish_reason, len(row.tokens), row.text.text)
