"""`olmo2-fast bench generate`: end-to-end generation speed of our engines and of HF transformers.

Engines are built in memory, on the device, from random weights at a published shape
(`demo.random_state_dict`, always seed 0, so every engine and HF hold the same weights) or from
`--model PATH`; nothing is written to disk. One engine is alive at a time.

Our engines run the library's own generation loop (`scheduler.Scheduler`: packed prefill,
greedy sampling on the device, one host read per token, the next step queued first) on random
prompt ids. No EOS and no
detokenisation: every run produces exactly the requested number of tokens, like HF's
`generate(min_new_tokens=N)` on the other side. For each (engine, batch B, prompt length P):
  T(n)        median wall time of a whole generation of n new tokens per row (host clock, after
              the last token's id reached the host), over `rep` runs after `warmup` runs;
  ttft        T(1): prefill of the B prompts and the first token;
  decode      (T(N) - T(1)) / (N - 1) ms per step (each step makes B tokens); p20/p80 from the
              spread of T(N);
  tokens/s    B * 1000 / decode;
  peak memory torch.cuda.max_memory_allocated() over the runs (weights, cache, activations).
The same formulas time HF, so `vs_hf` (decode tokens/s ratio) and `ttft_vs_hf` compare like with like.
"""
from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from olmo2_fast.cache import KVCache
from olmo2_fast.config import Olmo2Config
from olmo2_fast.engine import build_engine as build_our_engine
from olmo2_fast.progress import Progress
from olmo2_fast.scheduler import Request, Scheduler

from . import hf_baseline
from .environment import Environment
from .report import Column, number, text, times
from .timing import summarize

COLUMNS = [
    Column("engine", "engine"), Column("batch", "B"), Column("prompt_len", "prompt"), Column("new_tokens", "new"),
    Column("ttft_ms", "TTFT ms", number(4)), Column("decode_ms_per_token", "decode ms/step", number(4)),
    Column("decode_p20_ms", "p20", number(3)), Column("decode_p80_ms", "p80", number(3)),
    Column("tokens_per_s", "tokens/s", number(4)), Column("floor_pct", "% floor", number(3)),
    Column("peak_mem_gb", "peak GB", number(3)),
    Column("vs_hf", "x HF tok/s", times), Column("ttft_vs_hf", "x HF TTFT", times), Column("note", "note", text),
]
CPU_COLUMNS = [Column(c.key, "CPU-smoke " + c.header, c.fmt) if c.key in ("ttft_ms", "decode_ms_per_token") else c
               for c in COLUMNS]
INTERPRETER_MAX_NEW_TOKENS = 4  # Triton's interpreter takes ~0.5 s per tiny decode step


@dataclass(frozen=True)
class EngineSpec:
    name: str
    backend: str                 # "triton", "torch" or "hf"
    quantize: str | None = None
    graphs: bool = False         # CUDA-graph decode (triton on CUDA)
    decode_path: str = "auto"    # the kernel engine's decode step: "auto", "fused" or "cublas" (model.Olmo2Fast)


def engine_specs(on_gpu: bool, int4: bool, graphs: bool, hf: bool, decode_path: str = "auto") -> list[EngineSpec]:
    """GPU: our kernels with CUDA graphs on and off (bf16, and int4 with --int4), then HF.
    CPU: the torch backend (the CPU default), the kernels under the interpreter, then HF.
    decode_path: the kernel engine's decode step; "both" gives each of "fused" and "cublas" its rows."""
    paths = ("fused", "cublas") if decode_path == "both" else (decode_path,)
    specs = []
    if not on_gpu:
        specs.append(EngineSpec("olmo2_fast torch", "torch"))
    for quantize in (None, "int4") if int4 else (None,):
        for path in paths:
            label = "olmo2_fast triton" + (" int4" if quantize else "") + ("" if path == "auto" else f" {path}")
            if not on_gpu:
                specs.append(EngineSpec(label + " (interpreter)", "triton", quantize, decode_path=path))
                continue
            if graphs:
                specs.append(EngineSpec(label + " graphs", "triton", quantize, graphs=True, decode_path=path))
            specs.append(EngineSpec(label + " no-graphs", "triton", quantize, decode_path=path))
    if hf:
        specs.append(EngineSpec("hf transformers", "hf"))
    return specs


def grid_points(batches, seqs) -> list[tuple[int, int]]:
    """TTFT at batch 1 for every prompt length; decode at every batch size for the first one."""
    points = [(1, p) for p in seqs] + [(b, seqs[0]) for b in batches]
    return sorted(set(points), key=points.index)


class _IdsOnly:
    """What the scheduler needs of a tokenizer when only token ids matter: the vocabulary bound,
    no EOS (every run produces exactly max_new_tokens) and no text."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eos_ids = vocab_size, ()

    def stream_decoder(self):
        return self

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""


def drain(state: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield and forget a state dict's entries, so each tensor is freed once the engine has used it."""
    while state:
        name = next(iter(state))
        yield name, state.pop(name)


def build_engine(spec: EngineSpec, config: Olmo2Config, tensors, device: torch.device):
    if spec.backend == "hf":
        return hf_baseline.build_hf_model(config, tensors, device)
    options = dict(decode_path=spec.decode_path) if spec.backend == "triton" else {}
    return build_our_engine(config, tensors, backend=spec.backend, device=device, quantize=spec.quantize,
                            cuda_graphs=spec.graphs, **options)


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def our_generate_seconds(engine, cache: KVCache, prompts: list[list[int]], new_tokens: int) -> float:
    scheduler = Scheduler(engine, _IdsOnly(engine.config.vocab_size), cache)
    _sync(cache.k.device)
    start = time.perf_counter()
    sequences = [scheduler.add(Request(tuple(p), new_tokens)) for p in prompts]
    while not scheduler.idle:
        scheduler.step()
    seconds = time.perf_counter() - start
    produced = len(sequences[0].ids)
    if produced != new_tokens:
        raise RuntimeError(f"generation produced {produced} tokens, expected {new_tokens}")
    return seconds


def measure_point(run: Callable[[int], float], new_tokens: int, warmup: int, rep: int, batch: int) -> dict:
    """TTFT and decode figures from `run(n)` = seconds for n new tokens (see the module docstring)."""
    for _ in range(warmup):
        run(new_tokens)
        run(1)
    full = [run(new_tokens) * 1e3 for _ in range(rep)]
    first = summarize([run(1) * 1e3 for _ in range(rep)], "wall")
    steps = max(new_tokens - 1, 1)
    decode = summarize([(t - first.median_ms) / steps for t in full], "wall")
    return {"ttft_ms": first.median_ms, "ttft_p20_ms": first.p20_ms, "ttft_p80_ms": first.p80_ms,
            "decode_ms_per_token": decode.median_ms, "decode_p20_ms": decode.p20_ms, "decode_p80_ms": decode.p80_ms,
            "tokens_per_s": batch * 1e3 / decode.median_ms if decode.median_ms > 0 else None}


@dataclass(frozen=True)
class GenerateSettings:
    batches: tuple[int, ...]
    seqs: tuple[int, ...]
    new_tokens: int
    warmup: int
    rep: int


def _runner(spec: EngineSpec, engine, config: Olmo2Config, dtype, device, batch: int, prompt_len: int,
            new_tokens: int) -> Callable[[int], float]:
    ids = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    if spec.backend == "hf":
        prompts = ids.to(device)
        return lambda n: hf_baseline.hf_generate_seconds(engine, prompts, n)
    rows = engine.cache_rows(batch)  # a graph bucket pads the batch with spare cache rows
    cache = KVCache(config, rows, prompt_len + new_tokens, dtype, device)
    prompts = ids.tolist()
    return lambda n: our_generate_seconds(engine, cache, prompts, n)


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"


def measure_engine_point(spec: EngineSpec, engine, config: Olmo2Config, dtype, device, batch: int, prompt_len: int,
                         new_tokens: int, warmup: int, rep: int) -> dict:
    """One row's figures; the KV cache it allocates is freed on return."""
    run = _runner(spec, engine, config, dtype, device, batch, prompt_len, new_tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    figures = measure_point(run, new_tokens, warmup, rep, batch)
    figures["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    if spec.backend != "hf":
        figures["decode_path"] = getattr(engine, "last_decode_path", None) or "torch"
        # The bytes a decode step must read: every projection and lm_head once, and each row's KV cache
        # (at the context halfway through the run's new tokens).
        figures["decode_bytes"] = weight_bytes(engine) + batch * (prompt_len + new_tokens // 2) * kv_bytes_per_token(
            config, dtype)
    return figures


def weight_bytes(engine) -> int:
    """Bytes of every weight a decode step reads: the layers' projections and lm_head (not the embedding,
    a gather), as the engine holds them (packed int4 counts its codes, scales and zeros)."""
    _, tensors = engine.checkpoint_tensors()
    head = any(name.startswith("lm_head.") for name in tensors)  # else tied and dense: the embedding is lm_head
    gathered = ("model.embed_tokens.weight",) if head else ()
    return sum(t.numel() * t.element_size() for name, t in tensors.items()
               if name not in gathered and not name.endswith("norm.weight"))


def kv_bytes_per_token(config: Olmo2Config, dtype: torch.dtype) -> int:
    """K and V of one cached position, every layer."""
    return 2 * config.num_hidden_layers * config.kv_width * torch.empty((), dtype=dtype).element_size()


def floor_fractions(rows: list[dict], bandwidth: float):
    """floor_pct: the decode step's HBM floor (decode_bytes / the measured copy bandwidth) over its measured
    time, in percent; how close a step comes to reading its bytes at the card's speed."""
    for row in rows:
        if row.get("decode_bytes") and row.get("decode_ms_per_token"):
            row["floor_ms"] = row["decode_bytes"] / bandwidth * 1e3
            row["floor_pct"] = 100 * row["floor_ms"] / row["decode_ms_per_token"]


def run_engine(spec: EngineSpec, weights: Callable[[], Iterator], config: Olmo2Config, dtype, device,
               settings: GenerateSettings, bar: Progress) -> list[dict]:
    """Build one engine, measure it at every grid point, free it. Under Triton's interpreter only the
    first point, with few tokens and one run: a tiny decode step takes about half a second there."""
    interpreted = spec.backend == "triton" and device.type == "cpu"
    points = grid_points(settings.batches, settings.seqs)
    new_tokens, warmup, rep, note = settings.new_tokens, settings.warmup, settings.rep, ""
    if interpreted:
        points, warmup, rep = points[:1], 0, 1
        new_tokens = min(new_tokens, INTERPRETER_MAX_NEW_TOKENS)
        note = "Triton interpreter: first shape only, 1 run"
    rows = [{"engine": spec.name, "backend": spec.backend, "quantize": spec.quantize or "none", "graphs": spec.graphs,
             "interpreted": interpreted, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}
            for batch, prompt_len in points]
    engine = None
    try:
        engine = build_engine(spec, config, weights(), device)
    except Exception as e:  # out of memory, a shape the kernels do not support, ...: every row says so
        print(f"warning: {spec.name} could not be built: {_first_line(e)}", file=sys.stderr)
        for row in rows:
            row["note"] = f"engine build failed: {_first_line(e)}"
        bar.advance(len(rows))
        return rows
    try:
        for row in rows:
            try:
                row.update(measure_engine_point(spec, engine, config, dtype, device, row["batch"], row["prompt_len"],
                                                new_tokens, warmup, rep))
                row["note"] = hf_baseline.describe(engine) if spec.backend == "hf" else note
            except Exception as e:  # recorded in the row; the other shapes and engines still run
                row["note"] = f"failed: {_first_line(e)}"
            bar.advance()
    finally:
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def compare_with_hf(rows: list[dict]):
    """vs_hf: our decode tokens/s over HF's at the same (batch, prompt); ttft_vs_hf: HF's TTFT over ours.
    None for HF itself and for runs under Triton's interpreter (a ratio to an interpreter means nothing)."""
    hf = {(r["batch"], r["prompt_len"]): r for r in rows if r["backend"] == "hf" and r.get("tokens_per_s")}
    for row in rows:
        ref = hf.get((row["batch"], row["prompt_len"]))
        ok = ref is not None and row["backend"] != "hf" and not row["interpreted"] and row.get("tokens_per_s")
        row["vs_hf"] = row["tokens_per_s"] / ref["tokens_per_s"] if ok else None
        row["ttft_vs_hf"] = ref["ttft_ms"] / row["ttft_ms"] if ok and row.get("ttft_ms") else None


def run_generate(specs: list[EngineSpec], weights: Callable[[], Iterator], config: Olmo2Config, dtype,
                 device: torch.device, settings: GenerateSettings, env: Environment, common: dict,
                 progress: bool | None = None, on_rows: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """All rows of `bench generate`; `common` (model, dtype) and the environment go into every row.
    `on_rows` gets the rows so far after each engine, so a run stopped midway (gpu_check's time
    caps) keeps what it measured."""
    total = 0
    for spec in specs:
        interpreted = spec.backend == "triton" and device.type == "cpu"
        total += 1 if interpreted else len(grid_points(settings.batches, settings.seqs))
    bar = Progress(total, "bench generate", enabled=progress)
    rows = []
    try:
        for spec in specs:
            rows += run_engine(spec, weights, config, dtype, device, settings, bar)
            compare_with_hf(rows)
            for row in rows:
                row.update(common)
                row.update(env.fields())
            if on_rows is not None:
                on_rows(rows)
    finally:
        bar.close()
    return rows
