"""`kvstore serve`: the daemon's entry point. Loads the config once, sets up logging, starts a
`NodeServer`, prints one JSON "ready" line on stdout, and shuts down gracefully on SIGTERM or
SIGINT (see `NodeServer.shutdown`).

The launcher also tunes glibc's allocator before the process starts: large gRPC buffers
otherwise go through mmap/munmap on every call, paying fresh page faults each time (2-3 us per
4 KiB here). The variables are set and the process re-executes itself once; `--no-tune-malloc`
or an environment that already sets them leaves it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from kvstore.errors import ConfigError
from kvstore.node.config import load_node_config
from kvstore.node.logs import configure_logging
from kvstore.node.server import NodeServer

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(256 * 1024 * 1024),  # keep big buffers on the heap, reused
    "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024),  # and do not hand freed heap back at once
}
_TUNED_MARK = "KVSTORE_MALLOC_TUNED"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the node daemon",
        description="Run a kvstore node: config file, then KVSTORE_<SECTION>_<FIELD> variables, then flags.",
    )
    serve.add_argument("--config", type=Path, help="TOML config file (see deploy/config/node.example.toml)")
    serve.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one field (repeatable)"
    )
    serve.add_argument("--bind", help="server.bind_host")
    serve.add_argument("--grpc-port", help="server.grpc_port (0: any free port)")
    serve.add_argument("--data-port", help="server.data_port (0: any free port)")
    serve.add_argument("--metrics-port", help="server.metrics_port (-1: off)")
    serve.add_argument("--data-dir", help="node.data_dir")
    serve.add_argument("--node-id", help="node.node_id")
    serve.add_argument("--no-tune-malloc", action="store_true", help="do not set glibc MALLOC_* thresholds")


_SHORTCUTS = {
    "bind": "server.bind_host",
    "grpc_port": "server.grpc_port",
    "data_port": "server.data_port",
    "metrics_port": "server.metrics_port",
    "data_dir": "node.data_dir",
    "node_id": "node.node_id",
}


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if not args.no_tune_malloc and os.environ.get(_TUNED_MARK) != "1":
        environment = {**MALLOC_ENV, **os.environ, _TUNED_MARK: "1"}  # what the operator set wins
        os.execve(sys.executable, [sys.executable, "-m", "kvstore.cli", *argv], environment)
    overrides = [f"{key}={getattr(args, name)}" for name, key in _SHORTCUTS.items() if getattr(args, name) is not None]
    try:
        config = load_node_config(args.config, overrides=[*args.set, *overrides])
    except ConfigError as error:
        print(f"kvstore serve: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(config.logging.level, config.logging.format)
    server = NodeServer(config)
    stop = threading.Event()

    def on_signal(number: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    ready = {
        "event": "ready",
        "node_id": server.node.node_id,
        "grpc": server.grpc_address,
        "data": server.data_address,
        "metrics_port": server.metrics_port,
        "segment": server.node.segment_name,
    }
    print(json.dumps(ready), flush=True)
    while not stop.wait(1.0):
        pass
    server.shutdown()
    return 0
