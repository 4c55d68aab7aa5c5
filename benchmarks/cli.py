"""`olmo2-fast bench kernels | generate | serve`: the command line of the benchmark engine.

olmo2_fast/cli.py registers the parser with `add_bench_parser`. Nothing here imports triton at
module load: without CUDA the command switches Triton's interpreter on first (it must be set
before triton is imported) and says that it runs the CPU smoke mode, whose numbers are never
GPU figures.
"""
from __future__ import annotations

import argparse
import sys

from olmo2_fast.config import PRESETS
from olmo2_fast.errors import ConfigError

from .shapes import KERNELS

NO_GPU = ("olmo2-fast bench: no CUDA GPU is present. Running the CPU smoke mode instead: tiny shapes, the torch "
          "backend and Triton's interpreter. Its numbers are CPU smoke timings that check the code paths; "
          "they are not GPU figures.")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers such as 1,4,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _flat(lists) -> list[int] | None:
    return None if lists is None else [v for values in lists for v in values]


def _add_common(parser: argparse.ArgumentParser, batch_help: str, seq_help: str):
    parser.add_argument("--size", default="7b", choices=list(PRESETS), help="published OLMo 2 shape (default: 7b)")
    parser.add_argument("--batch", nargs="+", type=_int_list, metavar="B", help=batch_help)
    parser.add_argument("--seq", nargs="+", type=_int_list, metavar="S", help=seq_help)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="activation/weight dtype (default: bfloat16 on a GPU, float32 in the CPU smoke mode)")
    parser.add_argument("--json", metavar="PATH", help="write the rows (with GPU, versions, date) as JSON")
    parser.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, a quick check of every path (always on without a GPU)")


def add_bench_parser(commands):
    """Register `bench` with its `kernels`, `generate` and `serve` subcommands on the CLI's subparsers."""
    bench = commands.add_parser("bench", help="benchmark the kernels or end-to-end generation",
                                description="Benchmarks on a CUDA GPU; without one, a CPU smoke run of every path.")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    kernels = sub.add_parser("kernels", help="each Triton kernel vs the eager PyTorch it replaces and torch.compile")
    _add_common(kernels, "decode batch sizes, e.g. 1 4 16 or 1,4,16 (default 1 4 16; also int4 M)",
                "prompt lengths for the prefill cases (default 2048; also int4 M)")
    kernels.add_argument("--context", nargs="+", type=_int_list, metavar="L",
                         help="cached positions for the attention-decode cases (default 4096)")
    kernels.add_argument("--kernels", nargs="+", choices=KERNELS, metavar="NAME",
                         help=f"only these kernels ({', '.join(KERNELS)})")
    kernels.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    kernels.add_argument("--warmup", type=float, default=25.0, metavar="MS", help="GPU warm-up per candidate, ms")
    kernels.add_argument("--rep", type=float, default=100.0, metavar="MS", help="GPU timing per candidate, ms")
    kernels.set_defaults(func=cmd_bench_kernels)

    generate = sub.add_parser("generate", help="time to first token and decode speed, ours and HF transformers")
    _add_common(generate, "decode batch sizes (default 1 4 16), each with the first --seq",
                "prompt lengths (default 128 2048): TTFT at batch 1 for each")
    generate.add_argument("--model", help="checkpoint directory (default: random weights at --size, in memory)")
    generate.add_argument("--int4", action="store_true", help="also run int4 weight-only quantisation")
    generate.add_argument("--no-graphs", action="store_true", help="only run without CUDA graphs")
    generate.add_argument("--decode-path", default="auto", choices=["auto", "fused", "cublas", "both"],
                          help="the kernels' decode step: auto (fused where it applies; with graphs, the faster per "
                               "bucket), fused, cublas, or both (rows for each)")
    generate.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    generate.add_argument("--new-tokens", type=int, metavar="N", help="tokens per run (default 128; smoke 8)")
    generate.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs per shape (default 1)")
    generate.add_argument("--rep", type=int, default=3, metavar="N", help="timed runs per shape (default 3)")
    speculation = generate.add_argument_group(
        "speculative decoding", "with --draft or --prompt-lookup: batch 1 on --prompt, plain and speculative "
        "greedy decoding of the --model side by side (acceptance, tokens per target forward, tokens/s)")
    drafting = speculation.add_mutually_exclusive_group()
    drafting.add_argument("--draft", metavar="PATH", help="a draft model for --model (same tokenizer)")
    drafting.add_argument("--prompt-lookup", type=int, metavar="N", help="prompt lookup of N-grams")
    speculation.add_argument("--num-speculative-tokens", nargs="+", type=_int_list, metavar="K",
                             help="drafts per target forward, one row each, e.g. 1 2 4 (default: the library's)")
    speculation.add_argument("--prompt", help="the prompt (default: a short function given twice, begun a third time)")
    generate.set_defaults(func=cmd_bench_generate)

    from .serve import add_serve_bench_parser  # `bench serve`: the OpenAI server under concurrent clients

    add_serve_bench_parser(sub)


def _environment(args):
    """(environment, device, dtype, notes): the interpreter decision comes first, before any kernel import."""
    import torch

    from olmo2_fast.engine import enable_triton_interpreter
    from olmo2_fast.checkpoint import parse_dtype

    from .environment import detect

    notes = []
    if not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        enable_triton_interpreter()
    env = detect(args.smoke)
    dtype = parse_dtype(args.dtype or ("bfloat16" if env.on_gpu else "float32"))
    if env.mode == "cpu-smoke" and dtype == torch.bfloat16:
        notes.append("dtype float32 instead of bfloat16: Triton's interpreter computes bf16 tl.dot wrongly")
        dtype = torch.float32
    return env, torch.device(env.device), dtype, notes


def _save(args, benchmark: str, env, rows: list[dict], extra: dict | None = None, complete: bool = True):
    """Write --json / --csv. Called after every engine or case with complete=False (the JSON's
    `complete` says so), so a run that is stopped keeps its rows; then once more at the end."""
    from .report import write_csv, write_json

    if args.json:
        write_json(args.json, benchmark, env, rows, {**(extra or {}), "complete": complete})
    if args.csv:
        write_csv(args.csv, rows)
    if complete:
        for path in filter(None, (args.json, args.csv)):
            print(f"wrote {len(rows)} rows to {path}", file=sys.stderr)


def cmd_bench_kernels(args) -> int:
    env, device, dtype, notes = _environment(args)
    from .kernel_cases import build_cases
    from .kernels import COLUMNS, CPU_COLUMNS, run_kernels
    from .report import print_report
    from .shapes import KERNEL_GRID, KERNEL_SMOKE_GRID, model_config, resolve_grid
    from .timing import TimingPlan, measure_peaks

    config = model_config(args.size, env.smoke)
    grid = resolve_grid(KERNEL_SMOKE_GRID if env.smoke else KERNEL_GRID, _flat(args.batch), _flat(args.seq),
                        _flat(args.context))
    plan = TimingPlan(device, warmup_ms=args.warmup, rep_ms=args.rep)
    peaks = measure_peaks(plan, dtype, env.smoke)
    notes.append(f"measured ceilings: {peaks.bandwidth / 1e9:.4g} GB/s, {peaks.flops / 1e12:.4g} TFLOP/s ({peaks.how})")
    backend = None if args.no_compile else ("inductor" if env.on_gpu else "eager")
    if backend == "eager":
        notes.append("torch.compile rows use backend='eager' (dynamo only): inductor's CPU compile would take "
                     "minutes per shape")
    if env.on_gpu:
        notes.append("every candidate timed as CUDA-graph replays over rotating inputs > 2x L2")
    common = {"model": "smoke" if env.smoke else args.size, "dtype": str(dtype).removeprefix("torch.")}
    cases = build_cases(config, dtype, device, grid, args.kernels or KERNELS)
    extra = {"peaks": {**peaks.fields(), "how": peaks.how}}
    rows = run_kernels(cases, plan, peaks, env, backend, common,
                       on_rows=lambda so_far: _save(args, "kernels", env, so_far, extra, complete=False))
    print_report(f"olmo2-fast bench kernels: {common['model']} shapes, {common['dtype']}", env, rows,
                 CPU_COLUMNS if env.mode == "cpu-smoke" else COLUMNS, notes)
    _save(args, "kernels", env, rows, extra)
    return 0


def cmd_bench_generate(args) -> int:
    if args.draft or args.prompt_lookup:
        return cmd_bench_speculative(args)
    env, device, dtype, notes = _environment(args)
    from olmo2_fast.checkpoint import CONFIG_FILE, iter_checkpoint, resolve_checkpoint
    from olmo2_fast.config import Olmo2Config
    from olmo2_fast.demo import random_state_dict

    from . import hf_baseline
    from .generate import COLUMNS, CPU_COLUMNS, GenerateSettings, drain, engine_specs, run_generate
    from .report import print_report
    from .shapes import GENERATE_GRID, GENERATE_SMOKE_GRID, model_config, resolve_grid

    if args.model:
        directory = resolve_checkpoint(args.model)
        config = Olmo2Config.from_json_file(directory / CONFIG_FILE)
        weights = lambda: iter_checkpoint(directory, config, dtype, device)  # noqa: E731
        label = str(args.model)
    else:
        config = model_config(args.size, env.smoke)
        weights = lambda: drain(random_state_dict(config, seed=0, dtype=dtype, device=device))  # noqa: E731
        label = "smoke" if env.smoke else args.size
        notes.append("random weights (seed 0), built in memory; prompts are random token ids")
    grid = resolve_grid(GENERATE_SMOKE_GRID if env.smoke else GENERATE_GRID, _flat(args.batch), _flat(args.seq))
    new_tokens = args.new_tokens or (8 if env.smoke else 128)
    if new_tokens < 2 or args.warmup < 0 or args.rep < 1:
        raise ConfigError("--new-tokens must be >= 2 (decode speed needs two tokens), --warmup >= 0 and --rep >= 1")
    if max(grid.seqs) + new_tokens > config.max_position_embeddings:
        raise ConfigError(f"prompt {max(grid.seqs)} + {new_tokens} new tokens exceeds the model's context of "
                          f"{config.max_position_embeddings} positions")
    hf_reason = "--no-hf" if args.no_hf else hf_baseline.unavailable_reason(config)
    if hf_reason:
        notes.append(f"HF transformers baseline skipped: {hf_reason}")
    if not env.on_gpu:
        notes.append("no CUDA graphs on a CPU; HF runs plain generate (dynamic cache, eager)")
    specs = engine_specs(env.on_gpu, args.int4, graphs=not args.no_graphs, hf=hf_reason is None,
                         decode_path=args.decode_path)
    settings = GenerateSettings(grid.batches, grid.seqs, new_tokens, args.warmup, args.rep)
    common = {"model": label, "dtype": str(dtype).removeprefix("torch.")}
    from .generate import floor_fractions
    from .timing import TimingPlan, measure_peaks

    peaks = measure_peaks(TimingPlan(device), dtype, env.smoke)
    notes.append(f"% floor: weight + KV bytes per decode step / measured copy bandwidth "
                 f"{peaks.bandwidth / 1e9:.4g} GB/s ({peaks.how}), over the step's time")

    def with_floor(so_far):
        floor_fractions(so_far, peaks.bandwidth)
        return so_far
    rows = run_generate(specs, weights, config, dtype, device, settings, env, common,
                        on_rows=lambda so_far: _save(args, "generate", env, with_floor(so_far), complete=False))
    floor_fractions(rows, peaks.bandwidth)
    print_report(f"olmo2-fast bench generate: {label}, {common['dtype']}, {new_tokens} new tokens per run", env, rows,
                 CPU_COLUMNS if env.mode == "cpu-smoke" else COLUMNS, notes)
    _save(args, "generate", env, rows)
    return 0


def cmd_bench_speculative(args) -> int:
    env, device, dtype, notes = _environment(args)
    from olmo2_fast.api import OLMo2
    from olmo2_fast.speculative import DEFAULT_DRAFT_TOKENS, DEFAULT_LOOKUP_TOKENS

    from .report import print_report
    from .speculative import COLUMNS, CPU_COLUMNS, PROMPT, machine_note, run_speculative

    if not args.model:
        raise ConfigError("bench generate --draft / --prompt-lookup needs --model PATH, the target checkpoint")
    new_tokens = args.new_tokens or (64 if env.smoke else 128)
    if new_tokens < 2 or args.warmup < 0 or args.rep < 1:
        raise ConfigError("--new-tokens must be >= 2 (decode speed needs two tokens), --warmup >= 0 and --rep >= 1")
    target = OLMo2.from_pretrained(args.model, device=device, dtype=dtype, draft=args.draft,
                                   prompt_lookup=args.prompt_lookup)
    speculation = target.speculation
    default = DEFAULT_DRAFT_TOKENS if args.draft else DEFAULT_LOOKUP_TOKENS
    ks = _flat(args.num_speculative_tokens) or [default]
    rows = run_speculative(target, speculation.draft, speculation.prompt_lookup, ks, args.prompt or PROMPT,
                           new_tokens, args.warmup, args.rep)
    common = {"model": str(args.model), "dtype": str(dtype).removeprefix("torch.")}
    for row in rows:
        row.update(common)
        row.update(env.fields())
    notes.append("greedy, batch 1, no EOS (every run makes --new-tokens tokens); plain and speculative runs alternate")
    if not env.on_gpu:
        notes.append(machine_note())
    print_report(f"olmo2-fast bench generate, speculative: {args.model}, {common['dtype']}, {new_tokens} new tokens "
                 "per run", env, rows, CPU_COLUMNS if env.mode == "cpu-smoke" else COLUMNS, notes)
    _save(args, "generate", env, rows)
    return 0
