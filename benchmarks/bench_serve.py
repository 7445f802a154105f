"""Serving many LoRA adapters on one base: forward cost of mixed-adapter batches, and the HTTP server.

    PYTHONPATH=src python benchmarks/bench_serve.py [--model default] [--threads 1] [--part forward|serve|all]

forward: one decode step (B rows × 1 token over a KV cache of T tokens) and one prefill (B × T) of
  a batch whose rows use 1, 8 or 64 different adapters (deltatune's AdapterBank: in decode two
  masked dense GEMMs over the resident adapters' factors, in prefill one gathered bmm), against the same batch through ``adapter_per_sample`` (an index_select /
  index_add per adapter) and against the base alone. Ratios are to the one-adapter batch.
serve: ``deltatune serve`` (in process, real HTTP, the openai client) with 8 adapters; 1, 4 and 16
  concurrent clients, each request for a random adapter; against the naive baseline — one request
  at a time, switching PEFT's active adapter (``PeftModel.set_adapter`` + ``generate``).
  Generated tokens/s over the whole run, p50/p95 request latency.

Random non-zero adapters (r=8 on LoraConfig's default q_proj,v_proj, or --targets all-linear) stand in for trained ones: the cost does not depend on
the values. Timings on a shared CPU are noisy; the script prints its settings with the figures.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import deltatune
from deltatune.generate import encode_prompt
from deltatune.methods.lora_batched import AdapterBank
from deltatune.models import load_model

PROMPTS = ["Write one sentence about the sea.", "What is 17 times 3?", "Name three colours.",
           "Translate 'good morning' to French.", "Give a synonym for 'quick'.", "What is the capital of Italy?",
           "Describe a cat in five words.", "Count from one to five."]


def _randomize(model: torch.nn.Module, names: list[str], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(model):
            for n in names:
                if n in layer.adapters:
                    for t in layer.factors(n):
                        t.copy_(torch.randn(t.shape, generator=g) * 0.01)


def _targets(args: argparse.Namespace) -> list[str] | str:
    return "all-linear" if args.targets == "all-linear" else args.targets.split(",")


def _cpu_times(variants: dict[str, Any], reps: int) -> dict[str, float]:
    """Min CPU seconds of the calling thread per variant, variants interleaved round-robin.

    With one torch thread every op runs in the calling thread, so its CPU time is the forward's
    cost; unlike wall time it hardly moves when other processes share the cores. Interleaving
    spreads any drift (frequency, caches) over all variants alike."""
    best = {k: float("inf") for k in variants}
    for rep in range(reps + 1):
        for label, (setup, fn) in variants.items():
            with setup():
                t0 = time.thread_time()
                fn()
                dt = time.thread_time() - t0
            if rep:  # the first round warms up
                best[label] = min(best[label], dt)
    return best


def bench_forward(args: argparse.Namespace) -> None:
    model, tok = load_model(args.model, dtype=args.dtype)
    names = [f"a{i}" for i in range(64)]
    cfg = deltatune.LoraConfig(r=8, alpha=16, target_modules=_targets(args))
    for n in names:
        deltatune.inject(model, cfg, name=n)
    _randomize(model, names)
    bank = AdapterBank(model)
    b, t = args.batch, args.context
    ids = torch.randint(10, 1000, (b, t), generator=torch.Generator().manual_seed(0))
    step_ids = ids[:, -1:]
    mask = torch.ones(b, t + 1, dtype=torch.long)
    pos = torch.full((b, 1), t, dtype=torch.long)
    with torch.inference_mode():
        res = model(input_ids=ids, use_cache=True)
    cache_kw = "cache" if "cache" in res else "past_key_values"
    cache = res[cache_kw]

    def decode() -> None:
        with torch.inference_mode():
            model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                  **{cache_kw: cache})
        cache.crop(-1)  # back to the T cached tokens: every call decodes the same step

    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=ids, logits_to_keep=1)

    # With b < 64 rows a batch cannot hold 64 distinct adapters; rows then take every 64/b-th one
    # (the gathered product's cost depends on the rows, not on how many adapters are loaded).
    rows = {"1 adapter": ["a0"] * b, "8 adapters": [names[i % 8] for i in range(b)],
            "64 adapters": [names[(i * 64 // b) % 64] for i in range(b)] if b < 64 else [names[i % 64] for i in range(b)]}
    print(f"\nforward: {args.model}, {args.dtype}, {torch.get_num_threads()} thread(s), batch {b}, "
          f"context {t}, 64 LoRA adapters r=8 on {args.targets} loaded; min CPU time of {args.reps} interleaved runs")
    import contextlib

    def with_bank(names_: list[str], warm: Any = None) -> Any:
        @contextlib.contextmanager
        def ctx() -> Any:
            if not bank._hooks:
                bank.install()
            if warm is not None:
                # A steady decode step: the previous step had the same adapters, so their factors
                # are resident (in serving they change only when a request for a new adapter joins).
                with bank.route(names_):
                    warm()
            with bank.route(names_):
                yield
        return ctx

    @contextlib.contextmanager
    def base_only() -> Any:
        bank.close()
        try:
            with deltatune.disable_adapters(model):
                yield
        finally:
            bank.install()

    def per_sample(names_: list[str]) -> Any:
        @contextlib.contextmanager
        def ctx() -> Any:
            bank.close()
            deltatune.set_active(model, sorted(set(names_)))
            try:
                with deltatune.adapter_per_sample(model, names_):
                    yield
            finally:
                bank.install()
        return ctx

    variants = {"base only": base_only}
    variants.update({f"bank, {k}": with_bank(v) for k, v in rows.items()})
    variants.update({f"adapter_per_sample, {k}": per_sample(v) for k, v in rows.items() if k != "64 adapters"})
    steady = dict(variants, **{f"bank, {k}": with_bank(v, warm=decode) for k, v in rows.items()})
    dec = _cpu_times({k: (ctx, decode) for k, ctx in steady.items()}, args.reps)
    # the first step after the batch's set of adapters changed (their factors made resident)
    cold = _cpu_times({k: (with_bank(v), decode) for k, v in rows.items() if k != "1 adapter"}, args.reps)
    pre = (_cpu_times({k: (ctx, prefill) for k, ctx in variants.items()}, max(1, args.reps // 3))
           if not args.no_prefill else {k: float("nan") for k in variants})
    print(f"{'routing':<36}{'decode step ms':>16}{'ratio':>8}{'prefill ms':>12}{'ratio':>8}")
    one_d, one_p = dec["bank, 1 adapter"], pre["bank, 1 adapter"]
    for label in variants:
        print(f"{label:<36}{1e3 * dec[label]:>16.1f}{dec[label] / one_d:>8.2f}{1e3 * pre[label]:>12.1f}"
              f"{pre[label] / one_p:>8.2f}", flush=True)
    for k, v in cold.items():
        print(f"{'bank, ' + k + ', adapters changed':<36}{1e3 * v:>16.1f}{v / one_d:>8.2f}", flush=True)


# ------------------------------------------------------------------------------------------ serving
def _make_adapters(args: argparse.Namespace, out: Path) -> dict[str, str]:
    model, _ = load_model(args.model, dtype=args.dtype)
    paths = {}
    for i in range(8):
        deltatune.inject(model, deltatune.LoraConfig(r=8, alpha=16, target_modules=_targets(args)), name=f"a{i}")
        _randomize(model, [f"a{i}"], seed=i)
        paths[f"a{i}"] = str(deltatune.save_adapter(model, out / f"a{i}", name=f"a{i}"))
    return paths


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def bench_serve(args: argparse.Namespace) -> None:
    import openai

    from deltatune.serve import build_server

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    adapters = _make_adapters(args, tmp)
    model, tok = load_model(args.model, dtype=args.dtype)
    server = build_server(model, tok, base_name="base", adapters=adapters, max_batch_size=16, max_queue=64)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    names = sorted(adapters)

    def request(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=names[i % 8], temperature=0, max_tokens=args.tokens,
                                           messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        return time.perf_counter() - t0, r.usage.completion_tokens

    print(f"\nserve: {args.model}, {args.dtype}, {torch.get_num_threads()} thread(s), 8 adapters r=8 on {args.targets}, "
          f"greedy, max_tokens={args.tokens}, requests = one per client (at least 4)")
    print(f"{'clients':>8} {'mode':<34}{'tokens/s':>10}{'p50 s':>8}{'p95 s':>8}")
    table = {}
    for clients in args.clients:
        n = max(4, clients)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            out = list(pool.map(request, range(n)))
        wall = time.perf_counter() - t0
        lat = [x for x, _ in out]
        table[clients] = (sum(k for _, k in out) / wall, _pct(lat, 0.5), _pct(lat, 0.95))
        print(f"{clients:>8} {'deltatune serve (batched)':<34}{table[clients][0]:>10.1f}{table[clients][1]:>8.2f}"
              f"{table[clients][2]:>8.2f}", flush=True)
    server.should_exit = True
    thread.join(60)
    del server, model

    # the naive baseline: one request at a time, PEFT's active adapter switched per request
    import peft

    base, tok = load_model(args.model, dtype=args.dtype)
    pm = peft.PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(adapters[n], adapter_name=n)
    pm.eval()

    def one(i: int) -> int:
        pm.set_adapter(names[i % 8])
        ids = torch.tensor([encode_prompt(tok, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])])
        with torch.inference_mode():
            out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                              do_sample=False, pad_token_id=tok.pad_token_id)
        return int(out.shape[1] - ids.shape[1])

    for clients in args.clients:
        n = max(4, clients)
        # `clients` requests arrive together, are served one after another; the next wave follows.
        lat, tokens = [], 0
        t0 = time.perf_counter()
        for wave in range(0, n, clients):
            w0 = time.perf_counter()
            for i in range(wave, min(n, wave + clients)):
                tokens += one(i)
                lat.append(time.perf_counter() - w0)
        wall = time.perf_counter() - t0
        print(f"{clients:>8} {'one at a time, PEFT set_adapter':<34}{tokens / wall:>10.1f}{_pct(lat, 0.5):>8.2f}"
              f"{_pct(lat, 0.95):>8.2f}  (batched: {table[clients][0] / (tokens / wall):.2f}x tokens/s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--part", default="all", choices=["forward", "serve", "all"])
    p.add_argument("--batch", type=int, default=16, help="forward: rows in the batch")
    p.add_argument("--context", type=int, default=32, help="forward: tokens in the KV cache / prefill length")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-prefill", action="store_true", help="forward: time decode steps only")
    p.add_argument("--targets", default="q_proj,v_proj",
                   help="LoRA target modules of the random adapters: comma list (default: LoraConfig's) or all-linear")
    p.add_argument("--tokens", type=int, default=24, help="serve: max_tokens per request")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("forward", "all"):
        bench_forward(args)
    if args.part in ("serve", "all"):
        bench_serve(args)


if __name__ == "__main__":
    main()
