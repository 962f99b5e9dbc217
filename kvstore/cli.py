"""The `kvstore` command. Subcommands: `serve` (the node daemon, `kvstore.node.serve`),
`demo` (what `make run` runs: a disaggregated cluster end to end, engine_adapters/demo.py) and
`tour` (one store through every tier).

`kvstore tour` builds a real store (HBM slab, shared-memory DRAM pool, NVMe slab files with an
LMDB index, in a temporary directory), writes prompts' KV blocks, reads them back through
every tier, restarts the store to show NVMe recovery, and prints the tier statistics.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kvstore.config import DramConfig, HbmConfig, MiB, NvmeConfig, StoreConfig, WritePolicy
from kvstore.hashing import block_keys
from kvstore.node import serve
from kvstore.stats import StoreStats
from kvstore.store import Store
from kvstore.types import DType, KVLayout, Namespace, NamespaceId, TierKind


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kvstore", description="KV-cache-centric tiered storage")
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(commands)
    demo = commands.add_parser(
        "demo",
        help="run a conductor, a prefill and a decode node with engines, and a workload, end to end",
        description="A disaggregated cluster on this machine: every request placed, prefilled, its KV moved, "
        "decoded, and checked token for token against a colocated run.",
    )
    from engine_adapters.demo_arguments import add_arguments as demo_arguments  # noqa: PLC0415 - flags only

    demo_arguments(demo)
    tour = commands.add_parser("tour", help="put and read back KV blocks through every tier, then restart")
    tour.add_argument("--prompts", type=int, default=24, help="number of prompts to store (default 24)")
    tour.add_argument("--prompt-tokens", type=int, default=4096, help="tokens per prompt (default 4096)")
    tour.add_argument("--seed", type=int, default=0, help="seed for token ids and KV payloads")
    args = parser.parse_args(arguments)
    if args.command == "serve":
        return serve.run(args, arguments)
    if args.command == "demo":
        from engine_adapters.demo import run as run_demo  # noqa: PLC0415 - torch and the engine, only here

        return run_demo(args)
    if args.prompts <= 0 or args.prompt_tokens < 16:
        parser.error("--prompts must be > 0 and --prompt-tokens >= 16")
    return run_tour(args.prompts, args.prompt_tokens, args.seed)


def run_tour(num_prompts: int, prompt_tokens: int, seed: int) -> int:
    namespace = Namespace("tour-model", DType.FLOAT16, KVLayout(num_layers=4, num_kv_heads=4, head_size=64), 16)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 32000, prompt_tokens, dtype=np.uint32) for _ in range(num_prompts)]
    with tempfile.TemporaryDirectory(prefix="kvstore-tour-") as directory:
        config = StoreConfig(
            hbm=HbmConfig(capacity_bytes=16 * MiB, slab_bytes=1 * MiB),
            dram=DramConfig(capacity_bytes=32 * MiB, slab_bytes=1 * MiB),
            nvme=NvmeConfig(
                directory=Path(directory), capacity_bytes=256 * MiB, file_bytes=64 * MiB, slab_bytes=1 * MiB
            ),
            write_policy=WritePolicy.WRITE_BACK,
        )
        print(f"kvstore tour: {num_prompts} prompts x {prompt_tokens} tokens, {namespace.block_bytes} B blocks")
        print(f"  namespace {namespace.model_id} id={namespace.namespace_id.hex()}  NVMe in {directory}")
        import torch  # noqa: PLC0415 - seconds to import; `kvstore serve` without HBM never needs it

        print(f"  HBM tier on {'cuda' if torch.cuda.is_available() else 'cpu (no CUDA here)'}")
        with Store(config) as store:
            namespace_id = store.register_namespace(namespace)
            payloads = _write(store, namespace_id, namespace, prompts, seed)
            _print_stats("after writing (HBM fills, evictions demote to DRAM, then NVMe)", store.stats())
            errors = _read_back(store, namespace_id, namespace, prompts, payloads)
            _print_stats("after reading every prompt back (NVMe hits promoted to DRAM)", store.stats())
        with Store(config) as store:
            survived = sum(store.lookup(namespace_id, block_keys(namespace_id, p, 16)).num_hits for p in prompts)
            errors += _read_back(store, namespace_id, namespace, prompts, payloads)
            _print_stats(f"after a restart: {survived} leading blocks recovered from NVMe", store.stats())
    if errors:
        print(f"FAILED: {errors} blocks read back with wrong bytes", file=sys.stderr)
        return 1
    print("every block read back matched what was written")
    return 0


def _write(
    store: Store, namespace_id: NamespaceId, namespace: Namespace, prompts: list[np.ndarray], seed: int
) -> dict[bytes, np.ndarray]:
    payloads: dict[bytes, np.ndarray] = {}
    rng = np.random.default_rng(seed + 1)
    started = time.perf_counter()
    for tokens in prompts:
        keys = block_keys(namespace_id, tokens, namespace.block_tokens)
        blocks = [rng.integers(0, 256, namespace.block_bytes, dtype=np.uint8) for _ in keys]
        payloads.update(zip(keys, blocks, strict=True))
        store.put_blocks(namespace_id, keys, blocks, tier=TierKind.HBM)
    elapsed = time.perf_counter() - started
    total = sum(p.nbytes for p in payloads.values())
    print(f"  wrote {len(payloads)} blocks ({total / MiB:.0f} MiB) in {elapsed:.2f} s")
    return payloads


def _read_back(
    store: Store,
    namespace_id: NamespaceId,
    namespace: Namespace,
    prompts: list[np.ndarray],
    payloads: dict[bytes, np.ndarray],
) -> int:
    errors = hits = 0
    started = time.perf_counter()
    for tokens in prompts:
        keys = block_keys(namespace_id, tokens, namespace.block_tokens)
        blocks = store.get_blocks(namespace_id, keys)
        hits += len(blocks)
        errors += sum(not np.array_equal(block, payloads[key]) for key, block in zip(keys, blocks, strict=False))
    elapsed = time.perf_counter() - started
    print(f"  read {hits} leading blocks back in {elapsed:.2f} s, {errors} mismatches")
    return errors


def _print_stats(title: str, stats: StoreStats) -> None:
    print(f"\n  {title}")
    print(
        f"  {'tier':<6}{'used MiB':>10}{'cap MiB':>9}{'blocks':>8}{'hits':>7}{'evict':>7}{'demo in':>9}{'promo in':>10}"
    )
    for tier in stats.tiers:
        print(
            f"  {tier.kind.label:<6}{tier.used_bytes / MiB:>10.1f}{tier.capacity_bytes / MiB:>9.0f}"
            f"{tier.num_blocks:>8}{tier.hits:>7}{tier.evictions:>7}{tier.demotions_in:>9}{tier.promotions_in:>10}"
        )
    print(f"  {stats.num_blocks} distinct blocks, {stats.num_leases} leases, {stats.num_reservations} reservations\n")


if __name__ == "__main__":
    sys.exit(main())
