"""`l4compile serve BUILD`: an OpenAI-compatible HTTP server (registered by l4compile.cli).

Needs the `serve` extra (fastapi, uvicorn); without it the command says so in one line.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from l4compile.errors import L4Error

SHUTDOWN_MARGIN = 5.0   # seconds uvicorn waits, after the scheduler's grace, for responses to be written


class ServeError(L4Error):
    """The server cannot start (missing extra, a port in use)."""


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from l4compile.serve.app import ServeSettings, create_app
    except ImportError as exc:
        raise ServeError(f"serving needs the serve extra ({exc.name} is missing): pip install 'l4compile[serve]'") \
            from None
    from l4compile.runtime import Engine
    from l4compile.serve.scheduler import Scheduler

    from l4compile.progress import current
    progress = current()
    sock = _listen(args.host, args.port)   # a port in use fails here, before the model loads
    with progress.phase("load engine"):
        engine = Engine.load(args.build, threads=args.threads, backend=args.backend)
        engine.tokenizer   # a build without a tokenizer fails here, in one line
    scheduler = Scheduler(engine, max_batch=args.max_batch, max_queue=args.max_queue, context=args.context,
                          prefill_chunk=args.prefill_chunk)
    name = args.model_name or Path(args.build).resolve().name
    settings = ServeSettings(name, max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout or None)
    app = create_app(scheduler, settings)
    mode = (f"continuous batching, {scheduler.batch_rows} rows" if scheduler.in_place else
            "one request at a time: this build's KV cache keeps one position for the whole batch "
            "(sequence-major: a TensorRT or sharded build)")
    progress.flush()   # the start-up's lines now, not when the server stops
    progress.note(f"serving {args.build} as {name!r} on http://{args.host}:{args.port}/v1 ({mode}; context "
                  f"{scheduler.context} tokens, queue {scheduler.max_queue})")
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout + SHUTDOWN_MARGIN, lifespan="on")
    server = _server(uvicorn, config, scheduler, args.shutdown_timeout)
    scheduler.start()
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        sock.close()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound here so that an address in use is one line of ours."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _server(uvicorn, config, scheduler, grace: float):
    """uvicorn's server, whose SIGTERM / Ctrl-C also drains the scheduler: no new requests; those in flight get
    `grace` seconds to finish, then a clean error event. uvicorn waits SHUTDOWN_MARGIN more for their last
    bytes before it cancels what is left."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                scheduler.drain(grace)
                try:
                    print(f"shutting down: {scheduler.active_rows + scheduler.queue_depth} requests in flight get "
                          f"{grace:g} s to finish", file=sys.stderr, flush=True)
                except RuntimeError:   # stderr was being written when the signal came
                    pass
            super().handle_exit(sig, frame)

    return Server(config)


def add_serve_command(sub: argparse._SubParsersAction, count) -> None:
    from l4compile.runtime import options
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat and completions, continuous batching)")
    p.add_argument("build", help="build directory with a tokenizer (--weights HF_DIR or --tokenizer DIR)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=options.cli_type(options.count("--port", 1, 65535), int, "a port number"), default=8000,
                   help="1-65535 (default 8000)")
    p.add_argument("--max-batch", type=count, default=8, help="rows decoded together (default 8)")
    p.add_argument("--max-queue", type=count, default=64,
                   help="requests waiting for a row; more get 429 with Retry-After (default 64)")
    p.add_argument("--context", type=count, help="tokens per row, prompt and completion together "
                                                 "(default: the model's, at most 8192)")
    p.add_argument("--prefill-chunk", type=count,
                   help="most prompt tokens prefilled between two decode steps (default: the attention chunk)")
    p.add_argument("--model-name", help="the model id clients use (default: the build directory's name)")
    p.add_argument("--request-timeout", type=options.cli_type(options.number("--request-timeout", 0, 1e9), float,
                                                              "seconds"), default=600.0,
                   help="seconds a request may take from arrival to its last token; 0: none (default 600)")
    p.add_argument("--shutdown-timeout", type=options.cli_type(options.number("--shutdown-timeout", 0, 1e9), float,
                                                               "seconds"), default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish (default 30)")
    p.add_argument("--max-body-bytes", type=count, default=8 << 20, help="larger bodies get 413 (default 8 MiB)")
    p.add_argument("--threads", type=options.cli_type(options.threads, int, "a thread count"),
                   help="onnxruntime intra-op threads")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"])
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning; info logs every request)")
    from l4compile.progress import add_progress_args
    add_progress_args(p)
    p.set_defaults(func=cmd_serve)
