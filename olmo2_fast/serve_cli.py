"""`olmo2-fast serve`: the command line of the OpenAI-compatible server (olmo2_fast/server.py).

olmo2_fast/cli.py registers the parser with `add_serve_parser`. Nothing here imports torch or
fastapi at module load, so `olmo2-fast --help` stays fast; `serve` imports them when it runs.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from .cli import add_model_args, load_model
from .errors import Olmo2Error

API_KEY_ENV = "OLMO2_FAST_API_KEY"  # the key without putting it on the command line (visible in ps)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in [0, 65535], got {text!r}")
    return int(text)


def add_serve_parser(commands):
    """Register `serve` on the CLI's subparsers."""
    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
        description="Serve the model over OpenAI's HTTP API for one machine and a few users; requests that "
                    "arrive together share one decode batch. Needs the serve extra: pip install -e '.[serve]'.")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1, this machine only; another address without "
                            "--api-key is warned about)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000; 0: any free port)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require 'Authorization: Bearer KEY' on /v1 requests (default: ${API_KEY_ENV})")
    serve.add_argument("--max-batch-size", type=_positive, default=8,
                       help="sequences generated together, one KV cache row each (default 8)")
    serve.add_argument("--max-queue", type=_count, default=64,
                       help="sequences that may wait for a free row; beyond them requests get 429 (default 64)")
    serve.add_argument("--served-model-name", metavar="NAME",
                       help="the model id clients send and /v1/models lists (default: --model as given, or "
                            "'olmo2-fast-demo')")
    serve.set_defaults(func=cmd_serve)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server reachable from other machines without a key, or None."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if loopback:
        return None
    return (f"warning: serving on {host} without --api-key: anyone who can reach this address can use the model; "
            f"set --api-key (or ${API_KEY_ENV}), or bind 127.0.0.1")


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise Olmo2Error(f"olmo2-fast serve needs the serve extra ({e.name} is missing): "
                         "pip install -e '.[serve]'") from None
    from .server import bind, create_app

    try:
        sock = bind(args.host, args.port)  # before loading the model: a taken port fails at once
    except OSError as e:
        raise Olmo2Error(f"cannot listen on {args.host}:{args.port} (--host / --port): {e.strerror or e}") from None
    warning = exposure_warning(args.host, args.api_key)
    if warning:
        print(f"[olmo2-fast] {warning}", file=sys.stderr)
    model = load_model(args)
    if model.speculation is not None and args.max_batch_size > 1:  # speculation runs one sequence at a time
        print("[olmo2-fast] note: with --max-batch-size above 1 the server decodes its batches without speculative "
              "decoding; --max-batch-size 1 makes it speculate", file=sys.stderr)
    name = args.served_model_name or args.model or "olmo2-fast-demo"
    app = create_app(model, model_name=name, api_key=args.api_key, max_batch_size=args.max_batch_size,
                     max_queue=args.max_queue)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"[olmo2-fast] serving {name!r} at http://{shown}:{port}/v1 (max batch {args.max_batch_size}, "
          f"queue {args.max_queue}{', API key required' if args.api_key else ''}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    server = _signalled_server_class()(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0 if server.stopped_by is None else 128 + server.stopped_by  # Ctrl-C: 130, as the other commands


def _signalled_server_class():
    import uvicorn

    class SignalledServer(uvicorn.Server):
        """uvicorn's server, remembering the signal that stopped it. uvicorn re-raises that signal after
        its graceful shutdown, which gives the CLI's Ctrl-C status only where SIGINT was not ignored when
        the process started (e.g. not under `olmo2-fast serve &` in a script): the status comes from here."""

        stopped_by: int | None = None

        def handle_exit(self, sig, frame):
            if self.stopped_by is None:
                self.stopped_by = int(sig)
            super().handle_exit(sig, frame)

    return SignalledServer
