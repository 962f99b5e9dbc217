"""The store benchmark (issue 2): the in-process data path, lookup, key hashing and index memory.

    .venv/bin/python tools/bench/store.py [--repeats N] [--runs N] [--quick] [--out-json PATH] [--no-doc]
        [--nvme-dir DIR]

What is measured, and against what (every reference is measured in the same run, interleaved
with the figure it calibrates, because the machine is shared and its speed drifts):

1. `Store.put_blocks` and `Store.get_into` of batches of 32 blocks (64 KiB, 512 KiB, 2 MiB) in
   each tier. Sources and destinations are preallocated, page-aligned and pre-faulted (a fresh
   page costs 2-3 us per 4 KiB here, which would swamp the copy). Every put writes fresh keys
   and the blocks are removed again outside the timed region, so the store really writes and
   the slots are reused. DRAM and HBM are compared with `np.copyto` of the same bytes
   ("memcpy"; on a CUDA device, torch copies to or from it). NVMe puts go to the NVMe tier and
   are compared with an O_DIRECT `pwritev` of the same bytes into a preallocated file followed
   by `fdatasync` (the store's durability contract). The ratio to the write without `fdatasync`
   is reported too; that write is flushed outside the clock, or the next trial's `fdatasync`
   would pay for it. NVMe gets are cold reads: the
   store runs with `promote_on_hit=False`, so no DRAM copy serves them, and O_DIRECT bypasses the
   page cache; they are compared with an O_DIRECT `preadv` of the same bytes into the same
   (anonymous-mmap) buffers.
2. `Store.lookup` of a 128-key chain that is stored, against 128 `dict.get` calls on the keys.
3. `block_keys` for 32k tokens in 16-token blocks, from a numpy array and from a list, against
   the bare chained xxh3_128 loop over the same token bytes.
4. Index memory per block: tracemalloc over `BlockTable` rows (key objects included) plus the
   LeafFirstLRU policy's per-row state, against one slotted Python object per block in a dict.
   Memory is deterministic, so it is measured once.

Each figure is the median over the repeats; its ratio is the median over the repeats of
(figure / reference) measured back to back; with `--runs N` (default 3) the whole benchmark runs
N times and each row reports the run with the median ratio, noting the range. The data-path
figures live in store_datapath.py, the index figures in store_index.py, what they share in
store_common.py; this module runs them and writes the report. Results go to a JSON file and to a section of
docs/benchmarks.md between `<!-- bench:store:begin -->` and `<!-- bench:store:end -->`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

if not __package__:  # run as a script (the documented way): make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvstore.config import MiB
from kvstore.types import TierKind
from tools.bench import harness
from tools.bench.harness import Figure, median_figures
from tools.bench.plot import plot_ratios
from tools.bench.store_common import (
    BLOCK_SIZES,
    DATA_GROUP,
    QUICK_BLOCK_SIZES,
    BlockPool,
    Settings,
)
from tools.bench.store_datapath import bench_memory_tier, bench_nvme
from tools.bench.store_index import bench_index

REPO = Path(__file__).resolve().parents[2]
DOC_PATH = REPO / "docs" / "benchmarks.md"
JSON_PATH = REPO / "docs" / "bench-store.json"
PLOT_PATH = REPO / "docs" / "bench-store.png"
SEED = 2
BEGIN_MARKER, END_MARKER = "<!-- bench:store:begin -->", "<!-- bench:store:end -->"
DOC_HEADER = "# Benchmarks\n\nEach section is written by the tool it names; rerun the tool to refresh it.\n"


# -- running ---------------------------------------------------------------------------------------


def run_all(settings: Settings, nvme_parent: Path) -> tuple[list[Figure], dict[str, str]]:
    rng = np.random.default_rng(SEED)
    num_steps = 6 * len(settings.block_sizes) + 4
    with tqdm(total=num_steps, file=sys.stderr, unit="figure", dynamic_ncols=True, disable=None) as progress:
        progress.set_description("preparing buffers")
        pool = BlockPool(max(settings.block_sizes), rng)
        # NVMe first, in a fresh process as a node daemon starts: once the memory-tier stores have
        # populated and freed 512 MiB, the NVMe tier's staging buffer gets physically scattered
        # pages, and O_DIRECT requests from it carry ~1 MiB (254 segments of 4 KiB on virtio-blk)
        # instead of 4 MiB. That made its writes 3-4x slower here while the reference, writing
        # from the pool allocated at start, was unaffected: an artefact of the order, not the store.
        nvme, nvme_context = bench_nvme(nvme_parent, pool, settings, rng, progress)
        dram, _ = bench_memory_tier(TierKind.DRAM, pool, settings, rng, progress)
        hbm, device = bench_memory_tier(TierKind.HBM, pool, settings, rng, progress)
        index = bench_index(pool, settings, rng, progress)
    context = {
        **harness.machine_info(),
        "numpy, torch": f"{np.__version__}, {torch.__version__}",
        "HBM tier device": str(device),
        **nvme_context,
    }
    return [*dram, *hbm, *nvme, *index], context


# -- report ----------------------------------------------------------------------------------------


def median_run(runs: list[tuple[list[Figure], dict[str, str]]]) -> tuple[list[Figure], dict[str, str]]:
    """`harness.median_figures` of the runs, with the last run's context."""
    return median_figures([figures for figures, _ in runs]), runs[-1][1]


def render_markdown(figures: list[Figure], context: dict[str, str], settings: Settings, command: str) -> str:
    lines = [
        "## Store (issue 2)",
        "",
        f"Written by `{command}` on {context['date']}.",
        "",
        *(f"- {name}: {value}" for name, value in context.items() if name != "date"),
        "",
        f"Every figure is the median of {settings.repeats} repeats in the median one of {settings.runs} runs "
        "(the note gives the runs' range). Ratio = figure / reference: the median over "
        "the repeats of the two measured back to back (higher is better for GB/s, lower for times and bytes). "
        "Sources and destinations are preallocated, page-aligned and pre-faulted; every put writes fresh keys.",
        "",
        harness.target_summary(figures),
        "",
        f"![Data-path ratios]({PLOT_PATH.name})",
        *harness.markdown_tables(figures),
    ]
    return "\n".join(lines)


# -- entry point -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark the store's data path, lookup, key hashing and index.")
    parser.add_argument(
        "--repeats", type=int, help="repeats per figure; each figure is their median (default 5, 3 with --quick)"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="whole runs; each row reports the median run (default 3, 1 with --quick)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats, sizes, calls and index entries, for development; implies --no-doc",
    )
    parser.add_argument(
        "--out-json",
        type=Path,
        default=JSON_PATH,
        help=f"where to write the results (default {JSON_PATH.relative_to(REPO)})",
    )
    parser.add_argument(
        "--no-doc", action="store_true", help=f"do not rewrite the section in {DOC_PATH.relative_to(REPO)}"
    )
    parser.add_argument(
        "--nvme-dir",
        type=Path,
        default=REPO.parent,
        help="where the temporary NVMe directory goes (default: the repository's parent)",
    )
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.quick:
        args.runs = 1
    if not args.nvme_dir.is_dir():
        parser.error(f"--nvme-dir {args.nvme_dir} is not a directory")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(
            args.repeats or 3,
            args.runs,
            QUICK_BLOCK_SIZES,
            16 * MiB,
            lookup_calls=300,
            hash_calls=10,
            index_entries=100_000,
        )
    return Settings(
        args.repeats or 5, args.runs, BLOCK_SIZES, 64 * MiB, lookup_calls=2000, hash_calls=40, index_entries=1_000_000
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(arguments)
    settings = settings_from(args)
    command = shlex.join([os.path.relpath(sys.executable), os.path.relpath(__file__), *arguments])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    runs = []
    for run in range(args.runs):
        print(f"run {run + 1} of {args.runs}", file=sys.stderr)
        runs.append(run_all(settings, args.nvme_dir))
    figures, context = median_run(runs)
    context = {"date": date, **context}
    section = render_markdown(figures, context, settings, command)
    print(section)
    payload = {"command": command, "settings": asdict(settings), "context": context}
    harness.write_json(args.out_json, {**payload, "figures": [asdict(figure) for figure in figures]})
    if not (args.no_doc or args.quick):
        harness.write_doc_section(DOC_PATH, section, BEGIN_MARKER, END_MARKER, DOC_HEADER)
        plot_ratios(figures, DATA_GROUP, "kvstore data path, batches of 32 blocks", PLOT_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
