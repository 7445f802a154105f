"""The OpenAI-compatible HTTP API over an :class:`~deltatune.serve.engine.Engine` (FastAPI).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the tokenizer's chat
template), POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names). The request's
``model`` field picks the adapter; an unknown name is a 404, never the base. Streaming answers are
server-sent events in OpenAI's chunk format ending with ``data: [DONE]``. Every error has OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate import Row, SamplingParams, TextTracker, encode_prompt
from .engine import Engine, EngineError, Job

__all__ = ["create_app", "ServeLimits"]


class ServeLimits(BaseModel):
    """Caps that keep a laptop server safe; the CLI flags set them."""

    max_tokens: int = 1024  # the largest max_tokens a request may ask for (and the default)
    max_body_bytes: int = 1 << 20
    max_prompts: int = 16  # prompts in one /v1/completions request
    shutdown_timeout: float = 10.0


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


# ------------------------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields we do not use (user, metadata, …) are ignored

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    logprobs: Any = None


class ChatBody(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class LoadBody(BaseModel):
    lora_name: str = Field(min_length=1, max_length=200)
    lora_path: str = Field(min_length=1)


class UnloadBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str = Field(min_length=1)


def _chat_messages(body: ChatBody) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(body.messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise EngineError(400, f"messages[{i}].role must be a string", param=f"messages.{i}.role")
        if isinstance(content, list):  # content parts: only text parts can be read by a text model
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise EngineError(400, f"messages[{i}].content: only text parts are supported",
                                      param=f"messages.{i}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise EngineError(400, f"messages[{i}].content must be a string or a list of text parts",
                              param=f"messages.{i}.content")
        out.append({"role": role, "content": content})
    return out


# ------------------------------------------------------------------------------------------ the app
class _Guard:
    """Outermost ASGI layer: the API key and the body-size cap, checked before FastAPI parses anything.
    A body without Content-Length (chunked) is read here up to the cap and replayed to the app."""

    def __init__(self, app: Any, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def _reject(self, send: Any, status: int, body: dict[str, Any]) -> None:
        raw = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                msg = "Incorrect API key provided." if given else "Missing API key (send Authorization: Bearer KEY)."
                await self._reject(send, 401, error_body(msg, "authentication_error", code="invalid_api_key"))
                return
        too_big = error_body(f"request body exceeds {self.max_body} bytes", code="request_too_large")
        size = headers.get(b"content-length")
        if size is not None:
            if not size.isdigit() or int(size) > self.max_body:
                await self._reject(send, 413, too_big)
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(msg.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_body:
                await self._reject(send, 413, too_big)
                return
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(engine: Engine, *, api_key: str | None = None, limits: ServeLimits | None = None) -> Any:
    """The ASGI application (FastAPI inside an API-key / body-size guard) serving ``engine``;
    run it with uvicorn. The engine's scheduler starts and stops with the app's lifespan."""
    limits = limits or ServeLimits()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop, limits.shutdown_timeout)

    app = FastAPI(title="deltatune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(EngineError)
    async def _engine_error(_r: Request, e: EngineError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return _error(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(e.status_code, str(e.detail), kind)

    # -------------------------------------------------------------- models
    def _model_card(name: str, parent: str | None, root: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": engine.created, "owned_by": "deltatune",
                "root": root, "parent": parent}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [_model_card(engine.base_name, None, engine.base_name)]
        data += [_model_card(n, engine.base_name, p) for n, p in sorted(engine.adapters.items())]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.load}

    # -------------------------------------------------------------- adapters
    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadBody) -> dict[str, Any]:
        path = engine.resolve_path(body.lora_path)
        await asyncio.to_thread(engine.load_adapter, body.lora_name, path)
        return {"status": "ok", "message": f"LoRA adapter {body.lora_name!r} loaded", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadBody) -> dict[str, Any]:
        engine.unload_adapter(body.lora_name)
        return {"status": "ok", "message": f"LoRA adapter {body.lora_name!r} unloaded", "lora_name": body.lora_name}

    # -------------------------------------------------------------- generation
    def _params(body: _Body, max_tokens: int | None, prompt_len: int, what: str) -> SamplingParams:
        if body.n != 1:
            raise EngineError(400, "n must be 1 (one choice per prompt)", param="n")
        if body.logprobs not in (None, False, 0):
            raise EngineError(400, "logprobs are not supported", param="logprobs")
        if max_tokens is not None and max_tokens > limits.max_tokens:
            raise EngineError(400, f"max_tokens={max_tokens} exceeds this server's limit of {limits.max_tokens}",
                              param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise EngineError(400, "stop: up to 4 non-empty strings", param="stop")
        ctx = engine.context
        if ctx is not None:
            room = ctx - prompt_len
            if max_tokens is not None and prompt_len + max_tokens > ctx or room < 1:
                raise EngineError(
                    400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                    f"{prompt_len + (max_tokens or 1)} tokens ({prompt_len} in the {what}, {max_tokens or 1} in the "
                    "completion). Please reduce the length of the prompt or max_tokens.",
                    param="messages" if what == "messages" else "prompt", code="context_length_exceeded")
        n_new = max_tokens if max_tokens is not None else min(limits.max_tokens, ctx - prompt_len if ctx else limits.max_tokens)
        return SamplingParams(max_new_tokens=n_new, temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=tuple(stop))

    def _check_model(name: str) -> str | None:
        if not engine.has_model(name):
            raise EngineError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return None if name == engine.base_name else name

    async def _run(request: Request, body: _Body, prompts: list[list[int]], max_tokens: int | None, what: str,
                   chat: bool) -> Any:
        adapter = _check_model(body.model)
        rows = []
        for ids in prompts:
            params = _params(body, max_tokens, len(ids), what)
            rows.append(Row(ids, params, adapter, TextTracker(engine.tokenizer, params.stop)))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        jobs = engine.submit(rows, loop, queue)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(jobs, queue, rid, created, body.model, chat, prompt_tokens, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(request, jobs, queue, rid, created, body.model, chat, prompt_tokens)

    async def _collect(request: Request, jobs: list[Job], queue: asyncio.Queue[tuple[Any, ...]], rid: str, created: int,
                       model: str, chat: bool, prompt_tokens: int) -> Any:
        results: dict[int, tuple[str, int, str]] = {}
        try:
            while len(results) < len(jobs):
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return None  # nobody to answer; the finally frees the slots
                    continue
                if event[0] == "error":
                    raise EngineError(503, event[2], "server_error", code="service_unavailable")
                if event[0] == "done":
                    _, i, reason, n, text = event
                    results[i] = (reason, n, text)
        finally:
            engine.cancel([j for j in jobs if j.index not in results])
        completion = sum(n for _, n, _ in results.values())
        choices = []
        for i in range(len(jobs)):
            reason, _, text = results[i]
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": choices, "system_fingerprint": None,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    async def _stream(jobs: list[Job], queue: asyncio.Queue[tuple[Any, ...]], rid: str, created: int, model: str,
                      chat: bool, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            payload: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        def choice(i: int, text: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {} if text is None else {"content": text})
                return {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}

        done: set[int] = set()
        completion = 0
        try:
            if chat:
                for j in jobs:
                    yield chunk([choice(j.index, None, None, role=True)])
            while len(done) < len(jobs):
                event = await queue.get()
                if event[0] == "delta":
                    yield chunk([choice(event[1], event[2], None)])
                elif event[0] == "done":
                    done.add(event[1])
                    completion += event[3]
                    yield chunk([choice(event[1], None, event[2])])
                else:
                    body = error_body(event[2], "server_error", code="service_unavailable")
                    yield f"data: {json.dumps(body)}\n\n"
                    break
            if include_usage:
                yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                 "total_tokens": prompt_tokens + completion})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): free the slots
            engine.cancel([j for j in jobs if j.index not in done])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request, body: ChatBody) -> Any:
        _check_model(body.model)
        messages = _chat_messages(body)
        try:
            ids = encode_prompt(engine.tokenizer, messages)
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault
            raise EngineError(400, f"messages: the chat template failed: {e}", param="messages") from e
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await _run(request, body, [ids], max_tokens, "messages", chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request, body: CompletionBody) -> Any:
        _check_model(body.model)
        if body.echo or body.suffix or (body.best_of not in (None, 1)):
            raise EngineError(400, "echo, suffix and best_of are not supported", param="echo")
        p = body.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]  # type: ignore[list-item]
        else:
            prompts = list(p)  # type: ignore[arg-type]
        if not prompts or len(prompts) > limits.max_prompts:
            raise EngineError(400, f"prompt: 1 to {limits.max_prompts} prompts", param="prompt")
        encoded: list[list[int]] = []
        vocab = len(engine.tokenizer)
        for x in prompts:
            if isinstance(x, str):
                encoded.append(list(engine.tokenizer(x)["input_ids"]))
            elif isinstance(x, list) and x and all(isinstance(t, int) and 0 <= t < vocab for t in x):
                encoded.append(list(x))
            else:
                raise EngineError(400, f"prompt: a string, or a non-empty list of token ids in [0, {vocab})",
                                  param="prompt")
        if any(not e for e in encoded):
            raise EngineError(400, "prompt: empty prompt", param="prompt")
        return await _run(request, body, encoded, body.max_tokens, "prompt", chat=False)

    guarded = _Guard(app, api_key, limits.max_body_bytes)
    guarded.fastapi = app  # type: ignore[attr-defined]
    return guarded
