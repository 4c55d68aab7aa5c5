"""`olmo2-fast eval perplexity | compare`: the command line of olmo2_fast/evaluate.py.

olmo2_fast/cli.py registers the parser with `add_eval_parser`. Nothing here imports torch at
module load, so `olmo2-fast --help` stays fast; the commands import it when they run.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

LM_EVAL_COMMAND = "python -m olmo2_fast.lm_eval_adapter --model olmo2_fast --model_args pretrained=PATH --tasks ..."


def add_eval_parser(commands):
    """Register `eval` with its `perplexity` and `compare` subcommands on the CLI's subparsers."""
    evaluate = commands.add_parser(
        "eval", help="perplexity and bits per byte of a text; int4 / backend / model comparison",
        description="Sliding-window perplexity with the windows of Hugging Face's perplexity recipe. "
                    f"lm-evaluation-harness tasks run through our engine with: {LM_EVAL_COMMAND}")
    sub = evaluate.add_subparsers(dest="eval_command", required=True)

    ppl = sub.add_parser("perplexity", help="perplexity and bits per byte of a text file")
    _add_common(ppl)
    ppl.add_argument("--backend", default="auto", help="triton, torch or auto (default: triton on CUDA, torch on CPU)")
    ppl.add_argument("--int4", action="store_true", help="int4 group-128 weight-only quantisation at load")
    ppl.add_argument("--int4-lm-head", action="store_true", help="quantise lm_head to int4 too (implies --int4)")
    ppl.set_defaults(func=cmd_perplexity)

    cmp = sub.add_parser("compare", help="the model against its int4 version, another backend or another checkpoint",
                         description="Model a is --model with the default backend; model b differs in one thing. "
                                     "Reports the perplexity of each, top-1 agreement and mean KL(a || b) of the "
                                     "next-token distributions over the same windows.")
    _add_common(cmp)
    variant = cmp.add_mutually_exclusive_group(required=True)
    variant.add_argument("--int4", action="store_true", help="b: the same checkpoint quantised to int4 at load")
    cmp.add_argument("--int4-lm-head", action="store_true", help="with --int4: b's lm_head is quantised too")
    variant.add_argument("--backend", help="b: the same checkpoint on this backend (triton or torch)")
    variant.add_argument("--other", metavar="PATH", help="b: another checkpoint with the same tokenizer")
    cmp.set_defaults(func=cmd_compare)


def _add_common(parser: argparse.ArgumentParser):
    parser.add_argument("--model", required=True, help="checkpoint directory (or hub id with huggingface_hub)")
    parser.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file to evaluate")
    parser.add_argument("--max-len", type=int, metavar="N",
                        help="tokens per window (default: the model's context, max_position_embeddings)")
    parser.add_argument("--stride", type=int, metavar="S", help="tokens each window advances (default: max-len / 2)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="windows per forward (default: by logits size)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", help="bfloat16, float32 or float16 (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--json", metavar="F", help="also write the figures and settings as JSON")


def cmd_perplexity(args) -> int:
    from .evaluate import perplexity

    text = _read_text(args.text)
    model = _load(args, args.model, backend=args.backend, quantized=True)
    result = perplexity(model, text, max_len=args.max_len, stride=args.stride, batch_size=args.batch_size)
    print(f"perplexity     {result.perplexity:.4f}   (Hugging Face's sliding-window recipe: {result.windows} "
          f"windows of up to {result.max_len} tokens, stride {result.stride})")
    print(f"bits per byte  {result.bits_per_byte:.4f}   ({result.scored_tokens} scored tokens of {result.tokens}, "
          f"{result.bytes} bytes)")
    _write_json(args, {"model": _describe(model, args.model, args), **result.as_dict()})
    return 0


def cmd_compare(args) -> int:
    from .cli import quantize_label
    from .errors import EvaluationError
    from .evaluate import compare

    if args.int4_lm_head and not args.int4:
        raise EvaluationError("--int4-lm-head compares against b quantised to int4: give --int4 too")
    text = _read_text(args.text)
    other = args.other or args.model
    # b first: if it runs the kernels on a CPU, Triton's interpreter must be switched on before anything imports triton
    b = _load(args, other, backend=args.backend or "auto", quantized=True)
    a = _load(args, args.model, backend="auto", quantized=False)
    if args.backend and a.backend == b.backend:
        raise EvaluationError(f"--backend {args.backend} is the backend model a already uses on {a.device}: "
                              "compare against the other one")
    result = compare(a, b, text, max_len=args.max_len, stride=args.stride, batch_size=args.batch_size)
    names = _describe(a, args.model, None), _describe(b, other, args)
    for tag, name, label in zip("ab", names, ("", quantize_label(args))):
        print(f"{tag}: {name['path']} ({name['dtype']}, backend {name['backend']}{label})")
    print(f"{'':16} {'a':>10} {'b':>10}")
    print(f"{'perplexity':16} {result.a.perplexity:10.4f} {result.b.perplexity:10.4f}")
    print(f"{'bits per byte':16} {result.a.bits_per_byte:10.4f} {result.b.bits_per_byte:10.4f}")
    print(f"top-1 agreement  {result.top1_agreement:.4f}   over {result.positions} positions "
          f"({result.a.windows} windows of up to {result.a.max_len} tokens, stride {result.a.stride})")
    print(f"mean KL(a || b)  {result.mean_kl:.6f} nats")
    data = result.as_dict()
    data["a"], data["b"] = {"model": names[0], **data["a"]}, {"model": names[1], **data["b"]}
    _write_json(args, data)
    return 0


def _load(args, path: str, *, backend: str, quantized: bool):
    """A model as the arguments say; quantized: with --int4 / --int4-lm-head as given (False: unquantised)."""
    from .api import OLMo2
    from .cli import quantize_label, quantize_options

    options = quantize_options(args) if quantized else {}
    model = OLMo2.from_pretrained(path, device=args.device, dtype=args.dtype, backend=backend,
                                  revision=args.revision, **options)
    print(f"[olmo2-fast] {path}: {str(model.dtype).removeprefix('torch.')} on {model.device}, backend {model.backend}"
          f"{quantize_label(args) if quantized else ''}", file=sys.stderr)
    return model


def _describe(model, path: str, args) -> dict:
    """What a JSON result says of a model; args: the quantisation flags it was loaded with (None: none)."""
    from .cli import quantize_options

    options = quantize_options(args) if args is not None else {}
    return {"path": str(path), "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device),
            "backend": model.backend, "int4": options.get("quantize") == "int4",
            "int4_lm_head": options.get("quantize_lm_head", False)}


def _read_text(path: str) -> str:
    from .errors import EvaluationError

    file = Path(path)
    if not file.is_file():
        raise EvaluationError(f"--text {path}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EvaluationError(f"--text {path} is not UTF-8 text (byte {e.start})") from None
    if not text:
        raise EvaluationError(f"--text {path} is empty")
    return text


def _write_json(args, data: dict):
    if not args.json:
        return
    import torch

    from .errors import EvaluationError

    data = {"command": f"eval {args.eval_command}", "text": str(args.text), **data,
            "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    except OSError as e:
        raise EvaluationError(f"--json {args.json}: cannot write ({e.strerror})") from None
