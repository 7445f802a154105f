"""``deltatune serve``: one base model and many LoRA adapters behind an OpenAI-compatible API.

    deltatune serve --model SPEC --adapter NAME=DIR [...] [--host 127.0.0.1] [--port 8000]
                    [--api-key KEY] [--max-batch-size 8] [--max-queue 64] [--adapter-root DIR]

``engine.py`` owns the model (a scheduler thread, continuous batching, hot load/unload);
``app.py`` is the HTTP layer (FastAPI + uvicorn, server-sent events). Neither imports the
training code.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_server", "parse_adapter_args", "base_model_name"]

log = logging.getLogger("deltatune.serve")


def parse_adapter_args(items: Sequence[str]) -> dict[str, str]:
    """``NAME=DIR`` pairs (``--adapter``); a bare DIR is named after its directory."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        if not name or not path:
            raise ValueError(f"--adapter {item!r}: expected NAME=DIR")
        if name in out:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        out[name] = path
    return out


def base_model_name(spec: str, model: Any) -> str:
    """The ``model`` id clients use for the base: the config's name, else the spec's file/dir name."""
    if spec == "default":
        from ..models import DEFAULT_GGUF

        return DEFAULT_GGUF.split(".")[0]
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or spec
    return Path(str(name).rstrip("/")).name or str(spec)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_server(model: Any, tokenizer: Any, *, base_name: str, adapters: dict[str, str], host: str = "127.0.0.1",
                 port: int = 8000, api_key: str | None = None, max_batch_size: int = 8, max_queue: int = 64,
                 adapter_root: str | None = None, max_tokens: int = 1024, max_body_bytes: int = 1 << 20,
                 shutdown_timeout: float = 10.0) -> Any:
    """A ready ``uvicorn.Server`` (``.run()`` blocks until SIGINT/SIGTERM or ``should_exit``) with
    every ``adapters`` entry loaded and validated first (a bad adapter fails before listening)."""
    import uvicorn

    from .app import ServeLimits, create_app
    from .engine import Engine, EngineError

    if not _is_loopback(host) and api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    engine = Engine(model, tokenizer, base_name=base_name, max_batch_size=max_batch_size, max_queue=max_queue,
                    adapter_root=adapter_root)
    for name, path in adapters.items():
        try:
            engine.load_adapter(name, path)
        except EngineError as e:
            raise ValueError(f"--adapter {name}={path}: {e.message}") from e
    limits = ServeLimits(max_tokens=max_tokens, max_body_bytes=max_body_bytes, shutdown_timeout=shutdown_timeout)
    app = create_app(engine, api_key=api_key, limits=limits)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 1)
    server = uvicorn.Server(config)
    server.engine = engine  # type: ignore[attr-defined]
    return server
