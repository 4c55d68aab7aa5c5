"""`olmo2-fast` / `python -m olmo2_fast`: generate text from the command line."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from . import __version__
from .errors import Olmo2Error

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """`--stop "\\n\\n"` as a shell passes it (backslash, n) -> two newlines; also \\t, \\r and \\\\.
    Any other backslash stays as it is."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m[1]], text)


def _add_model_args(parser: argparse.ArgumentParser):
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the built-in random-weight demo)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit), e.g. an intermediate checkpoint")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", help="bfloat16, float32 or float16 (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--backend", default="auto",
                        help="triton, torch or auto (default: triton on CUDA, torch on CPU)")
    parser.add_argument("--int4", action="store_true", help="int4 group-128 weight-only quantisation (triton backend)")


def _add_sampling_args(parser: argparse.ArgumentParser):
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", type=unescape,
                        help="stop string (repeatable); \\n, \\t, \\r and \\\\ are interpreted, e.g. --stop '\\n\\n'")


def _load(args):
    from .api import OLMo2
    from .demo import demo_checkpoint

    path = args.model
    if path is None:
        path = demo_checkpoint()
        print(f"[olmo2-fast] no --model given: using the built-in demo checkpoint at {path} "
              "(tiny, RANDOM weights: the text is gibberish; pass --model PATH for a real OLMo 2)", file=sys.stderr)
    model = OLMo2.from_pretrained(path, device=args.device, dtype=args.dtype, backend=args.backend,
                                  revision=args.revision, quantize="int4" if args.int4 else None)
    print(f"[olmo2-fast] {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
          f"{model.dtype} on {model.device}, backend {model.backend}", file=sys.stderr)
    return model


def cmd_generate(args) -> int:
    model = _load(args)
    for piece in model.stream(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                              min_p=args.min_p, repetition_penalty=args.repetition_penalty):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    """A terminal conversation: each line you type is a user turn; the reply streams back."""
    model = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = []
        for piece in model.stream_chat(messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                       min_p=args.min_p, repetition_penalty=args.repetition_penalty):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _add_bench_parser(commands):
    """`olmo2-fast bench kernels|generate`: options and commands live in the benchmark package."""
    from .benchmarks.cli import add_bench_parser

    add_bench_parser(commands)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olmo2-fast", description="Low-latency OLMo 2 inference")
    parser.add_argument("--version", action="version", version=f"olmo2-fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="complete a prompt, streaming to the terminal")
    generate.add_argument("prompt", nargs="?", default="The capital of France is")
    _add_model_args(generate)
    _add_sampling_args(generate)
    generate.set_defaults(func=cmd_generate)
    chat = commands.add_parser("chat", help="talk to an instruct model with its chat template (one line per turn)")
    chat.add_argument("--system", help="a system message to open the conversation")
    _add_model_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat, max_new_tokens=256)
    _add_bench_parser(commands)
    from .eval_cli import add_eval_parser  # `eval perplexity | compare`; imports no torch at load

    add_eval_parser(commands)
    from .serve_cli import add_serve_parser  # `serve`: the OpenAI-compatible server; imports no torch at load

    add_serve_parser(commands)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # The library reports through logging (e.g. the KV cache size before it is allocated); show it.
    log = logging.getLogger("olmo2_fast")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[olmo2-fast] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        return args.func(args)
    except Olmo2Error as e:
        print(f"olmo2-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`olmo2-fast generate ... | head -1`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot fail again
        return 0
