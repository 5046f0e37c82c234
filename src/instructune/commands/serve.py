"""`instructune serve`: an OpenAI-compatible server for one model, and a chat page at `/`."""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys

from instructune.commands.arguments import add_model_arguments, add_template_argument
from instructune.errors import UserError

HELP = "serve a model over an OpenAI-compatible HTTP API, with a chat page"
EXAMPLES = (
    'instructune serve --model runs/default/checkpoint-57',
    'instructune serve --model smollm2-135m-instruct --port 8080 --api-key "$MY_KEY"',
)
"""What `--help` ends with: command lines to copy (tests/commands/test_help_examples.py parses them)."""
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The model, where to listen, an optional API key and how requests are answered."""
    add_model_arguments(p)
    add_template_argument(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on the /v1/ endpoints")
    p.add_argument("--model-name", help="the model's id in the API (default: the --model value)")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="answer length when a request gives no max_tokens (default 512, less if the context is full)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="most waiting requests answered together in one batch (default 16)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="most requests waiting for a batch; more get 503 with Retry-After (default: twice "
                        "--batch-size)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take, waiting included, before it ends with 504 (default 600; "
                        "0: no limit)")


def check_serving_stack() -> None:
    """Refuse clearly when FastAPI or uvicorn is not installed."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"instructune serve needs {' and '.join(missing)}: pip install 'instructune[serve]'")


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that is taken before the model is loaded (uvicorn would only say so after)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror}); "
                            "choose another --port") from None


def run(args: argparse.Namespace) -> int:
    """Load `--model` and serve it until interrupted."""
    check_serving_stack()
    check_port_free(args.host, args.port)
    from instructune.use.loading import load_for_inference
    from instructune.use.server import create_app, serve

    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)
    loaded = load_for_inference(args.model, template=args.template, device=args.device,
                                trust_remote_code=args.trust_remote_code)
    name = args.model_name or args.model
    app = create_app(loaded, model_name=name, api_key=args.api_key, default_max_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, max_queue=args.max_queue, request_timeout=args.request_timeout)
    service = app.state.service
    limit = f"{service.request_timeout:g} s per request" if service.request_timeout else "no time limit"
    print(f"serving {name} on http://{args.host}:{args.port} (chat page at /, API at /v1/; at most "
          f"{service.max_queue} requests waiting, {limit}; SIGTERM or Ctrl-C drains and exits)", flush=True)
    serve(app, host=args.host, port=args.port)
    return 0
