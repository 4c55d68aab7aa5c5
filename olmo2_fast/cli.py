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


def add_model_args(parser: argparse.ArgumentParser):
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the built-in demo model)")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit), e.g. an intermediate checkpoint")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", help="bfloat16, float32 or float16 (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--backend", default="auto",
                        help="triton, torch or auto (default: triton on CUDA, torch on CPU)")
    parser.add_argument("--int4", action="store_true", help="int4 group-128 weight-only quantisation")
    parser.add_argument("--int4-lm-head", action="store_true",
                        help="quantise lm_head to int4 too (implies --int4; accuracy cost in the README)")
    speculation = parser.add_argument_group("speculative decoding (one prompt at a time; output as without it)")
    drafting = speculation.add_mutually_exclusive_group()
    drafting.add_argument("--draft", metavar="PATH", help="a smaller checkpoint with the same tokenizer drafts tokens")
    drafting.add_argument("--prompt-lookup", type=int, metavar="N",
                          help="draft what followed the last earlier occurrence of the last N tokens (no draft model)")
    speculation.add_argument("--num-speculative-tokens", type=int, metavar="K",
                             help="drafts verified per target forward (default 4 with --draft, 6 with --prompt-lookup)")


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


def _generation_options(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def quantize_options(args) -> dict:
    """from_pretrained's quantisation arguments from --int4 / --int4-lm-head (which implies --int4)."""
    lm_head = args.int4_lm_head
    return dict(quantize="int4" if args.int4 or lm_head else None, quantize_lm_head=lm_head)


def quantize_label(args) -> str:
    """", int4" / ", int4 (lm_head too)" for the line that describes a loaded model; "" unquantised."""
    options = quantize_options(args)
    return "" if options["quantize"] is None else ", int4" + (" (lm_head too)" if options["quantize_lm_head"] else "")


def load_model(args):
    """The model the command line names (--model, or the built-in demo model), said on stderr."""
    from .api import OLMo2
    from .demo import demo_model

    path = args.model
    if path is None:
        path, description = demo_model()
        print(f"[olmo2-fast] no --model given: using {description}", file=sys.stderr)
    model = OLMo2.from_pretrained(path, device=args.device, dtype=args.dtype, backend=args.backend,
                                  revision=args.revision, **quantize_options(args), draft=args.draft,
                                  num_speculative_tokens=args.num_speculative_tokens, prompt_lookup=args.prompt_lookup)
    spec = model.speculation
    drafting = "" if spec is None else (f", speculative: {spec.num_tokens} drafts per step from "
                                        + (f"{args.draft}" if spec.draft is not None else
                                           f"prompt lookup of {spec.prompt_lookup}-grams"))
    print(f"[olmo2-fast] {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
          f"{model.dtype} on {model.device}, backend {model.backend}{quantize_label(args)}{drafting}",
          file=sys.stderr)
    return model


FINISHED = {"eos": "the model ended the text", "stop": "a stop string", "length": "--max-new-tokens reached",
            "context": "the model's context is full"}


def summary(result) -> str:
    """One line on how a generation went: new tokens, speed, time to first token, why it stopped."""
    speed = f", {result.decode_tokens_per_s:.1f} tokens/s after the first" if result.decode_tokens_per_s else ""
    return (f"[olmo2-fast] {len(result.token_ids)} new tokens in {result.total_time:.2f} s{speed}, first token after "
            f"{result.time_to_first_token * 1e3:.0f} ms; stopped: {FINISHED[result.finish_reason]}")


def cmd_generate(args) -> int:
    model = load_model(args)
    stream = model.stream(args.prompt, **_generation_options(args))
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        print(summary(stream.result), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    """A terminal conversation: each line you type is a user turn; the reply streams back. The KV cache
    carries over between turns, so each turn prefills only itself (chat.ChatSession)."""
    from .errors import GenerationError

    model = load_model(args)
    session = model.chat_session(args.system, **_generation_options(args))  # refuses a model without a template
    # Undecodable input bytes become lone surrogates, which the tokenizer refuses with their position.
    if hasattr(sys.stdin, "reconfigure"):  # a real text stream (tests pass a StringIO)
        sys.stdin.reconfigure(errors="surrogateescape")
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
        try:
            for piece in session.send(line.rstrip("\n")):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except GenerationError as e:  # this turn only: the conversation goes on
            print(f"olmo2-fast: error: {e}", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()


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
    generate.add_argument("--quiet", action="store_true", help="no summary line on stderr after the text")
    add_model_args(generate)
    _add_sampling_args(generate)
    generate.set_defaults(func=cmd_generate)
    chat = commands.add_parser("chat", help="talk to an instruct model with its chat template (one line per turn)")
    chat.add_argument("--system", help="a system message to open the conversation")
    add_model_args(chat)
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
