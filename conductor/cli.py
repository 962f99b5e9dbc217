"""`conductor`: `serve` runs the conductor; `status` shows what a running one knows of the
cluster (conductor/status_cli.py); `simulate` replays a trace through the placement policies
(conductor/simulate/main.py)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from conductor import status_cli
from conductor.config import load_conductor_config
from conductor.server import ConductorServer
from conductor.simulate import main as simulate_main
from kvstore.errors import KVStoreError
from kvstore.node.logs import configure_logging

log = logging.getLogger("conductor")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conductor", description="kvstore's conductor: places requests on nodes.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the conductor",
        description="Run the conductor: config file, then CONDUCTOR_<SECTION>_<FIELD> variables, then flags.",
    )
    serve.add_argument("--config", type=Path, help="TOML config file (see deploy/config/conductor.example.toml)")
    serve.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one field (repeatable)"
    )
    serve.add_argument("--bind", help="server.bind_host")
    serve.add_argument("--grpc-port", help="server.grpc_port (0: any free port)")
    serve.add_argument("--metrics-port", help="server.metrics_port (-1: off)")
    serve.add_argument("--policy", help="placement.policy")
    status = commands.add_parser(
        "status",
        help="what a running conductor knows of the cluster: members, loads, index",
        description=status_cli.__doc__.split("\n\n")[0] if status_cli.__doc__ else None,
    )
    status_cli.add_arguments(status)
    simulate = commands.add_parser(
        "simulate", help="replay a trace through the placement policies", description=simulate_main.__doc__
    )
    simulate_main.add_arguments(simulate)
    args = parser.parse_args(argv)
    if args.command == "simulate":
        return simulate_main.run(args)
    if args.command == "status":
        return status_cli.run(args, environ)
    return _serve(args)


_SHORTCUTS = {
    "bind": "server.bind_host",
    "grpc_port": "server.grpc_port",
    "metrics_port": "server.metrics_port",
    "policy": "placement.policy",
}


def _serve(args: argparse.Namespace) -> int:
    overrides = [f"{key}={getattr(args, name)}" for name, key in _SHORTCUTS.items() if getattr(args, name) is not None]
    stop = threading.Event()

    def on_signal(number: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)  # from here a SIGTERM is a graceful stop, even mid-start
    signal.signal(signal.SIGINT, on_signal)
    try:
        config = load_conductor_config(args.config, overrides=[*args.set, *overrides])
        configure_logging(config.logging.level, config.logging.format)
        server = ConductorServer(config)
        server.start()
    except (KVStoreError, OSError, ValueError) as error:
        print(f"conductor serve: {error}", file=sys.stderr)
        return 2
    ready = {
        "ready": True,
        "grpc": server.grpc_address,
        "metrics_port": server.metrics_port,
        "policy": config.placement.policy,
        "membership": config.membership.backend.value,
    }
    print(json.dumps(ready), flush=True)
    stop.wait()
    log.info("stopping: refusing new calls, ending streams")
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
