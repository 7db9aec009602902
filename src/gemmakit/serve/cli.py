"""`gemmakit serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def register(subparsers) -> None:
    from ..cli.options import add_model_args

    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--model-name", default=None, help="the id clients pass as `model` (default: the file's name)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a free row; more get 503")
    p.add_argument("--context", type=int, default=4096,
                   help="tokens per request, prompt and completion (sizes the KV cache)")
    p.add_argument("--prefill-budget", type=int, default=512,
                   help="prompt tokens prefilled per step at most while other requests decode (chunked prefill)")
    p.add_argument("--prefill-share", type=float, default=1.0,
                   help="besides, a step's prefill takes at most this share of a decode step's time, so the "
                        "running streams' inter-token latency stays within (1 + share) of their own pace")
    p.add_argument("--prefix-cache", type=int, default=None,
                   help="tokens the prefix cache keeps (0: off; default: as many as the rows hold, at most 1 GiB)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on Ctrl-C/SIGTERM before they are cancelled")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..cli.options import load_model
    from ..errors import GemmaError

    for name in ("port", "max_batch", "max_queue", "context", "prefill_budget"):
        if getattr(args, name) < 1 or (name == "port" and args.port > 65535):
            raise GemmaError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if not args.prefill_share > 0:
        raise GemmaError(f"--prefill-share must be a number > 0, got {args.prefill_share}")
    if args.prefix_cache is not None and args.prefix_cache < 0:
        raise GemmaError(f"--prefix-cache must be a number of tokens >= 0, got {args.prefix_cache}")
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise GemmaError(f"serving needs the 'serve' extra ({e.name} is missing): "
                         "pip install 'gemmakit[serve]'") from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    lm = load_model(args)
    app = create_app(lm, model_name=args.model_name, api_key=args.api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue, max_len=args.context, prefill_budget=args.prefill_budget,
                     prefill_share=args.prefill_share, prefix_cache=args.prefix_cache, own_thread=False)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: {args.host} is reachable from other machines and --api-key is not set", file=sys.stderr)
    # The engine runs here, on the thread that loaded the model (serve/scheduler.py says why), and
    # the HTTP server on a thread beside it; signals come to this thread and end the HTTP server
    # gracefully, whose shutdown then stops the engine.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                           timeout_graceful_shutdown=args.shutdown_timeout))
    http = threading.Thread(target=server.run, name="gemmakit-http", daemon=True)

    def stop(signum, frame):
        if server.should_exit:  # a second Ctrl-C: do not wait for the requests in flight
            server.force_exit = True
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    http.start()
    print(f"serving {app.state.model_name} on http://{args.host}:{args.port}/v1 (a chat page at "
          f"http://{args.host}:{args.port}/)", flush=True)
    scheduler = app.state.scheduler
    watcher = threading.Thread(target=_stop_when_done, args=(http, scheduler), daemon=True)
    watcher.start()
    scheduler.run()
    http.join(args.shutdown_timeout + 5)
    return 0 if server.started else 1


def _stop_when_done(http, scheduler) -> None:
    """Stops the engine when the HTTP server ends without a shutdown of its own (it could not bind)."""
    http.join()
    scheduler.stop()
