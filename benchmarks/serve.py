"""`olmo2-fast bench serve`: latency percentiles and tokens/s of the OpenAI server under concurrent streaming clients.

The server runs in this process exactly as `olmo2-fast serve` builds it (server.create_app, uvicorn
on a loopback port, the worker thread on the model); the clients are asyncio tasks on this
process's main thread, each a closed loop: send a streaming completion, read it to [DONE], send
the next. They share the process (and the GIL) with the server: reading SSE lines is light next
to a model step, but on a tiny model the figures include it, so they bound the server's overhead
from above.

Per request: TTFT, the time from sending to the first text chunk (queueing and prefill included);
per-token latency (TPOT), (total - TTFT) / (completion tokens - 1), what a streaming reader waits
for each next token; total time. Per run: completion tokens / wall time from the first send to the
last [DONE]. Each request has its own random prompt (seeded, EOS ids left out), so the
scheduler's prefix reuse cannot shorten a prefill; decoding is greedy and stops at max_tokens or
EOS (the usage chunk says how many tokens came).
"""
from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time

from olmo2_fast.errors import ConfigError

CLIENTS = (1, 4, 16)
PERCENTILES = (50, 90, 99)


def add_serve_bench_parser(sub):
    """Register `bench serve` on the bench command's subparsers."""
    serve = sub.add_parser("serve", help="the OpenAI server: TTFT, per-token latency and tokens/s under "
                                         "concurrent streaming clients")
    serve.add_argument("--model", help="checkpoint directory (default: the built-in demo checkpoint)")
    serve.add_argument("--clients", nargs="+", type=int, metavar="C", help="concurrent clients (default 1 4 16)")
    serve.add_argument("--requests", type=int, metavar="N", help="requests per client (default 8; smoke 2)")
    serve.add_argument("--max-tokens", type=int, metavar="N", help="new tokens per request (default 128; smoke 16)")
    serve.add_argument("--prompt-tokens", type=int, metavar="N", help="prompt length (default 128; smoke 16)")
    serve.add_argument("--max-batch-size", type=int, metavar="B",
                       help="the server's batch (default: the most clients)")
    serve.add_argument("--backend", default="auto",
                       help="triton, torch or auto (default: triton on CUDA, torch on CPU)")
    # the flags the bench's shared _environment and _save read, as the other bench commands take them
    serve.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                       help="weight dtype (default: bfloat16 on a GPU, float32 in the CPU smoke mode)")
    serve.add_argument("--json", metavar="PATH", help="write the rows (with GPU, versions, date) as JSON")
    serve.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    serve.add_argument("--smoke", action="store_true", help="few, short requests (always on without a GPU)")
    serve.set_defaults(func=cmd_bench_serve)


def _percentiles(name: str, values: list[float]) -> dict:
    if len(values) < 2:
        return {f"{name}_p{p}": values[0] if values else None for p in PERCENTILES}
    cuts = statistics.quantiles(values, n=100, method="inclusive")  # linear between ranks, as numpy's default
    return {f"{name}_p{p}": cuts[p - 1] for p in PERCENTILES}


async def _one_request(http, url: str, body: dict) -> dict:
    """Send one streaming completion and read it to the end -> its timings (seconds) and token count."""
    start = time.perf_counter()
    first, tokens, error = None, 0, None
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]["message"]
            elif event["choices"] and event["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            elif event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    if error or first is None:
        return {"error": error or "no text arrived"}
    return {"ttft": first - start, "total": end - start, "tokens": tokens,
            "tpot": (end - first) / (tokens - 1) if tokens > 1 else None}


async def _run_clients(url: str, bodies: list[list[dict]]) -> tuple[list[dict], float]:
    """One task per client, each sending its bodies in turn -> (every request's result, wall seconds)."""
    import httpx

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        async def client(own: list[dict]) -> list[dict]:
            return [await _one_request(http, url, body) for body in own]
        start = time.perf_counter()
        results = await asyncio.gather(*(client(own) for own in bodies))
        return [r for own in results for r in own], time.perf_counter() - start


def measure(url: str, clients: int, requests: int, prompt_tokens: int, max_tokens: int, vocab: list[int],
            seed: int) -> dict:
    """One row: `clients` closed-loop clients sending `requests` streaming completions each."""
    rng = random.Random(seed)
    bodies = [[{"prompt": [rng.choice(vocab) for _ in range(prompt_tokens)], "max_tokens": max_tokens,
                "temperature": 0, "stream": True} for _ in range(requests)] for _ in range(clients)]
    results, wall = asyncio.run(_run_clients(url, bodies))
    good = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in good)
    row = {"clients": clients, "requests": len(results), "errors": len(results) - len(good),
           "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
           "mean_completion_tokens": tokens / len(good) if good else None,
           "tokens_per_s": tokens / wall, "requests_per_s": len(good) / wall, "wall_s": wall}
    for name in ("ttft", "tpot", "total"):
        row.update(_percentiles(f"{name}_ms", [1000 * r[name] for r in good if r[name] is not None]))
    if len(good) < len(results):
        row["first_error"] = next(r["error"] for r in results if "error" in r)
    return row


def _columns():
    from .report import Column, number

    return [Column("clients", "clients"), Column("requests", "requests"), Column("errors", "errors"),
            Column("mean_completion_tokens", "tokens/req", number(3)), Column("tokens_per_s", "tokens/s", number(4)),
            Column("ttft_ms_p50", "TTFT p50 ms", number()), Column("ttft_ms_p99", "TTFT p99 ms", number()),
            Column("tpot_ms_p50", "per-token p50 ms", number()), Column("tpot_ms_p99", "per-token p99 ms", number()),
            Column("total_ms_p50", "total p50 ms", number()), Column("total_ms_p99", "total p99 ms", number())]


def cmd_bench_serve(args) -> int:
    from .cli import _environment, _save  # the bench's shared steps: interpreter decision first, then --json/--csv

    env, device, dtype, notes = _environment(args)
    from olmo2_fast.api import OLMo2
    from olmo2_fast.demo import demo_checkpoint
    from olmo2_fast.server import create_app, serving

    from .report import print_report

    clients = args.clients or list(CLIENTS)
    requests = args.requests or (2 if env.smoke else 8)
    max_tokens = args.max_tokens or (16 if env.smoke else 128)
    prompt_tokens = args.prompt_tokens or (16 if env.smoke else 128)
    for name, value in (("--clients", min(clients)), ("--requests", requests), ("--max-tokens", max_tokens),
                        ("--prompt-tokens", prompt_tokens), ("--max-batch-size", args.max_batch_size or 1)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    path = args.model or demo_checkpoint()
    if args.model is None:
        notes.append(f"the built-in demo checkpoint (tiny, random weights) at {path}")
    model = OLMo2.from_pretrained(path, device=device, dtype=dtype, backend=args.backend)
    context = model.config.max_position_embeddings
    if prompt_tokens + max_tokens > context:
        raise ConfigError(f"--prompt-tokens {prompt_tokens} + --max-tokens {max_tokens} exceeds the model's context "
                          f"of {context} positions")
    batch = args.max_batch_size or max(clients)
    vocab = [t for t in range(model.tokenizer.vocab_size) if t not in model.tokenizer.eos_ids]
    notes.append(f"server batch {batch}; {requests} streaming requests per client, prompts of {prompt_tokens} random "
                 f"token ids, up to {max_tokens} greedy new tokens; clients share the server's process (and GIL)")
    common = {"model": str(path), "dtype": str(dtype).removeprefix("torch."), "backend": model.backend,
              "max_batch_size": batch}
    app = create_app(model, model_name="bench", max_batch_size=batch, max_queue=max(clients) * requests)
    rows = []
    with serving(app) as base:
        url = f"{base}/v1/completions"
        measure(url, 1, 1, prompt_tokens, max_tokens, vocab, seed=0)  # warm-up: first steps, graph captures
        for count in clients:
            rows.append({**measure(url, count, requests, prompt_tokens, max_tokens, vocab, seed=count), **common,
                         **env.fields()})
            _save(args, "serve", env, rows, complete=False)
    print_report(f"olmo2-fast bench serve: {path}, {common['dtype']}, backend {model.backend}", env, rows, _columns(),
                 notes)
    _save(args, "serve", env, rows)
    failed = [row for row in rows if row["errors"]]
    if failed:
        print(f"olmo2-fast bench serve: {sum(row['errors'] for row in failed)} requests failed; the first: "
              f"{failed[0]['first_error']}", file=sys.stderr)
    return 1 if failed else 0
