"""`olmo2-fast bench generate --model PATH --draft PATH | --prompt-lookup N`: speculative against plain decoding.

One prompt (`--prompt`, default PROMPT: a short function given twice and begun a third time, a prompt
with repetition), batch 1, greedy, N new tokens and no EOS, so every run makes exactly N. The target
runs the library's plain loop (`scheduler.Scheduler`) and its speculative loop
(`speculative.SpeculativeDecoder`, once per K of --num-speculative-tokens) over the same engine; runs
alternate (plain, each K, plain, ...), so load on a shared machine falls on every row alike. The
models load as the API loads them (`OLMo2.from_pretrained`: a draft of another tokenizer is refused).
Per row, with generate.py's formulas:
  ttft                median T(1), the prefill and the first token (no drafting for one token);
  decode              (T(N) - T(1)) / (N - 1) ms per token, median and p20/p80 over the runs;
  tokens/s            1000 / decode;
  acceptance          drafts kept / drafts verified, over the timed runs;
  tokens per forward  tokens emitted / target forwards (verify steps, the prompt's included);
  x plain             tokens/s over the plain row's, measured in the same run;
  same                the speculative run's tokens equal plain greedy's (they must).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from olmo2_fast.cache import KVCache
from olmo2_fast.errors import ConfigError
from olmo2_fast.scheduler import Request, Scheduler
from olmo2_fast.speculative import Speculation, SpeculationStats, SpeculativeDecoder

from .generate import _IdsOnly, _sync
from .report import Column, number, text, times
from .timing import summarize

PROMPT = ('def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n        return n\n'
          '    return fibonacci(n - 1) + fibonacci(n - 2)\n\n') * 2 + "def fibonacci(n):\n"

COLUMNS = [
    Column("drafting", "drafting", text), Column("k", "K"), Column("prompt_len", "prompt"),
    Column("new_tokens", "new"), Column("ttft_ms", "TTFT ms", number(4)),
    Column("decode_ms_per_token", "decode ms/token", number(4)), Column("decode_p20_ms", "p20", number(3)),
    Column("decode_p80_ms", "p80", number(3)), Column("tokens_per_s", "tokens/s", number(4)),
    Column("acceptance", "acceptance", number(3)), Column("tokens_per_forward", "tokens/forward", number(3)),
    Column("vs_plain", "x plain tok/s", times), Column("same_as_plain", "same tokens"),
]
CPU_COLUMNS = [Column(c.key, "CPU-smoke " + c.header, c.fmt) if c.key in ("ttft_ms", "decode_ms_per_token") else c
               for c in COLUMNS]


@dataclass
class _Loop:
    """One row's generation loop and what its runs measured."""
    label: str
    k: int | None
    loop: object
    full_ms: list[float]
    first_ms: list[float]
    ids: list[int] | None = None

    def run(self, prompt: tuple[int, ...], n: int) -> float:
        """Seconds for n new tokens (the last one's id on the host)."""
        _sync(self.loop.cache.k.device)
        start = time.perf_counter()
        sequence = self.loop.add(Request(prompt, n))
        while not self.loop.idle:
            self.loop.step()
        seconds = time.perf_counter() - start
        if len(sequence.ids) != n:
            raise RuntimeError(f"{self.label} produced {len(sequence.ids)} tokens, expected {n}")
        self.ids = sequence.ids
        return seconds


def run_speculative(target, draft, prompt_lookup: int | None, ks: list[int], prompt_text: str, new_tokens: int,
                    warmup: int, rep: int) -> list[dict]:
    """The plain row and one speculative row per K (see the module docstring); target and draft: OLMo2 models."""
    prompt = tuple(target.tokenizer.encode(prompt_text))
    seq = len(prompt) + new_tokens + max(ks)
    if seq > target.config.max_position_embeddings:
        raise ConfigError(f"a prompt of {len(prompt)} tokens, {new_tokens} new tokens and {max(ks)} drafts exceed the "
                         f"model's context of {target.config.max_position_embeddings} positions")
    ids_only = _IdsOnly(target.tokenizer.vocab_size)

    def cache(model) -> KVCache:
        return KVCache(model.config, model.engine.cache_rows(1), seq, model.dtype, model.device)

    target_cache = cache(target)
    loops = [_Loop("none", None, Scheduler(target.engine, ids_only, target_cache), [], [])]
    drafting = f"draft {draft.source_dir}" if draft is not None else f"prompt lookup n={prompt_lookup}"
    draft_cache = cache(draft) if draft is not None else None
    for k in ks:
        speculation = Speculation(k, draft=draft, prompt_lookup=prompt_lookup)
        decoder = SpeculativeDecoder(target.engine, ids_only, target_cache, speculation, draft_cache)
        loops.append(_Loop(drafting, k, decoder, [], []))
    for _ in range(warmup):
        for loop in loops:
            loop.run(prompt, new_tokens)
            loop.run(prompt, 1)
    for loop in loops[1:]:
        loop.loop.stats = SpeculationStats()  # count the timed runs only
    for _ in range(rep):
        for loop in loops:
            loop.full_ms.append(loop.run(prompt, new_tokens) * 1e3)
        for loop in loops:
            loop.first_ms.append(loop.run(prompt, 1) * 1e3)
    rows = []
    plain_ids = loops[0].ids
    for loop in loops:
        first = summarize(loop.first_ms, "wall")
        decode = summarize([(t - first.median_ms) / (new_tokens - 1) for t in loop.full_ms], "wall")
        stats = getattr(loop.loop, "stats", None)
        rows.append({
            "engine": f"olmo2_fast {target.backend}", "backend": target.backend, "drafting": loop.label, "k": loop.k,
            "batch": 1, "prompt_len": len(prompt), "new_tokens": new_tokens, "ttft_ms": first.median_ms,
            "decode_ms_per_token": decode.median_ms, "decode_p20_ms": decode.p20_ms, "decode_p80_ms": decode.p80_ms,
            "tokens_per_s": 1e3 / decode.median_ms if decode.median_ms > 0 else None,
            "acceptance": stats.acceptance if stats else None,
            "tokens_per_forward": stats.tokens_per_forward if stats else None,
            "same_as_plain": loop.ids == plain_ids,
        })
    for row in rows:
        plain = rows[0]["tokens_per_s"]
        row["vs_plain"] = row["tokens_per_s"] / plain if row["tokens_per_s"] and plain else None
    return rows


def machine_note() -> str:
    """What a CPU figure depends on: intra-op threads and the load other processes put on the cores."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"torch threads {torch.get_num_threads()}, load average {load} (1, 5, 15 min) at the end of the run"
