"""The flags of `kvstore demo`, apart from the demo itself so that `kvstore --help` does not
import torch."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=12, help="requests to run (default 12)")
    parser.add_argument(
        "--sessions", type=int, default=4, help="conversations, each behind a system prompt (default 4)"
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per request (default 8)")
    parser.add_argument("--model", type=Path, help="model folder (built with tools/make_tiny_model.py if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload's order")
    parser.add_argument(
        "--profile-tokens",
        type=int,
        default=512,
        metavar="N",
        help="profile the model's prefills up to N tokens for the conductor's predictions (default 512; "
        "lower it for a large model on CPU)",
    )
    parser.add_argument(
        "--stop-prefill-node-after",
        type=int,
        metavar="N",
        help="kill the prefill node's daemon after request N (a crash), to show requests still served "
        "(computed, not loaded)",
    )
