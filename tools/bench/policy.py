"""The cache-policy benchmark (issue 4): hit ratios of the store's policies against the offline
optimum, on Mooncake's conversation trace and on generated traces.

    .venv/bin/python tools/bench/policy.py [--trace PATH ...] [--capacities 1000,2000,...]
        [--policies a,b] [--split-minutes 30] [--generated] [--plot PATH]

Every policy registered in kvstore.policy is replayed through tools/bench/policy_sim.py (the
real policy object and block table, as the tier manager drives them) over an empty tier of each
capacity; Belady with bypass (`policy_sim.belady`) is the ceiling. Each trace (`--trace` may be
given several times) is reported whole and, if it runs past `--split-minutes`, in two parts
replayed separately, each from an empty tier: the first `--split-minutes` (where a policy is
tuned) and the rest (where it is judged). A shorter trace is reported whole only. With
`--generated`, two traces from tools/traces/generate.py with different shapes are reported the
same way.

Prints one markdown table per trace part (block and token hit ratios in percent, and the
microseconds the policy's calls took per request) and draws hit ratio against capacity.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs installed

matplotlib.use("Agg")  # no display: render to a file
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter

if not __package__:  # run as a script: make the `tools` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kvstore.errors import InvalidArgumentError
from kvstore.policy import POLICIES
from kvstore.trace import TraceRequest, load_trace
from tools.bench import harness
from tools.bench.policy_sim import BELADY, ReplayResult, belady, replay
from tools.traces.generate import TraceParams, generate_trace

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = REPO / "../shared/data/traces/conversation_trace.jsonl"
DEFAULT_CAPACITIES = (1000, 2000, 5000, 10000, 20000, 50000)
DOC_PATH = REPO / "docs" / "policy.md"
PLOT_PATH = REPO / "docs" / "policy-hit-ratio.png"
BEGIN_MARKER, END_MARKER = "<!-- bench:policy:begin -->", "<!-- bench:policy:end -->"
DOC_HEADER = "# Cache policy\n"
GENERATED = {
    # many short chats on a few popular system prompts
    "generated-chat (seed 1)": TraceParams(seed=1, duration_minutes=60.0),
    # fewer, longer sessions over deep shared documents, flatter popularity
    "generated-docs (seed 2)": TraceParams(
        seed=2,
        duration_minutes=60.0,
        session_rate_per_s=0.6,
        mean_turns=5.0,
        mean_think_s=120.0,
        num_prefixes=1000,
        zipf_exponent=0.8,
        min_prefix_blocks=8,
        max_prefix_blocks=48,
        mean_tail_tokens=800,
    ),
}


@dataclass(frozen=True, slots=True)
class TracePart:
    """A named run of requests, replayed from an empty tier."""

    name: str
    requests: list[TraceRequest]


def split(name: str, requests: list[TraceRequest], split_minutes: float) -> list[TracePart]:
    """The whole trace, its first `split_minutes`, and the rest; the whole trace alone when either
    part would be empty (the trace ends before the minute, or the minute is 0)."""
    cut_ms = split_minutes * 60_000
    first = [request for request in requests if request.timestamp_ms < cut_ms]
    rest = requests[len(first) :]
    end_minutes = requests[-1].timestamp_ms / 60_000 if requests else 0.0
    whole = TracePart(f"{name}, whole ({end_minutes:.0f} min)", requests)
    if not first or not rest:
        return [whole]
    return [
        whole,
        TracePart(f"{name}, first {split_minutes:g} min (tune)", first),
        TracePart(f"{name}, last {end_minutes - split_minutes:.0f} min (judge)", rest),
    ]


def run_part(part: TracePart, capacities: Sequence[int], policies: Sequence[str], progress: tqdm) -> list[ReplayResult]:
    """Every policy and the optimum at every capacity."""
    results = []
    for capacity in capacities:
        for name in policies:
            make = POLICIES[name]
            progress.set_postfix_str(f"{name} @ {capacity}")
            requests = tqdm(part.requests, desc=part.name, unit="req", leave=False, mininterval=1.0)
            results.append(replay(requests, make(), capacity))
            progress.update()
        progress.set_postfix_str(f"belady @ {capacity}")
        results.append(belady(part.requests, capacity))
        progress.update()
    return results


def markdown_table(part: TracePart, results: list[ReplayResult]) -> str:
    """One row per capacity and policy: block and token hit ratios (%), the block hit ratio as a
    fraction of the optimum's at that capacity, and the policy's microseconds per block access."""
    optimum = {result.capacity_blocks: result for result in results if result.policy == BELADY}
    num_blocks = sum(len(request.hash_ids) for request in part.requests)
    lines = [
        f"### {part.name}: {len(part.requests)} requests, {num_blocks} blocks",
        "",
        "| capacity (blocks) | policy | block hits % | token hits % | x optimum | us/access |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for result in sorted(results, key=lambda r: (r.capacity_blocks, r.policy == BELADY, -r.block_hit_ratio)):
        best = optimum[result.capacity_blocks].block_hit_ratio
        share = f"{result.block_hit_ratio / best:.2f}" if best else "-"
        cost = "-" if result.policy == BELADY else f"{result.policy_us_per_access:.1f}"
        lines.append(
            f"| {result.capacity_blocks} | {result.policy} | {100 * result.block_hit_ratio:.2f} | "
            f"{100 * result.token_hit_ratio:.2f} | {share} | {cost} |"
        )
    return "\n".join(lines)


def plot_hit_ratios(parts: list[tuple[TracePart, list[ReplayResult]]], path: Path) -> None:
    """One panel per trace part: block hit ratio against capacity (log scale), a line per policy."""
    columns = 3
    rows = -(-len(parts) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for axis, (part, results) in zip(axes.flat, parts, strict=False):
        for policy in dict.fromkeys(result.policy for result in results):
            points = sorted((r.capacity_blocks, 100 * r.block_hit_ratio) for r in results if r.policy == policy)
            style = "--" if policy == BELADY else "-"
            axis.plot([c for c, _ in points], [h for _, h in points], style, marker="o", label=policy)
        axis.set_xscale("log")
        capacities = sorted({r.capacity_blocks for r in results})
        axis.set_xticks(capacities, labels=[f"{c / 1000:g}k" if c >= 1000 else str(c) for c in capacities])
        axis.xaxis.set_minor_formatter(NullFormatter())
        axis.set_title(part.name, fontsize=9)
        axis.set_xlabel("tier capacity (512-token blocks)")
        axis.set_ylabel("block hit ratio (%)")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(parts) :]:
        axis.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Hit ratios of the store's cache policies against Belady.")
    parser.add_argument(
        "--trace",
        type=Path,
        action="append",
        help=f"Mooncake-format trace (JSON lines); repeat for several (default {DEFAULT_TRACE.name} in ../shared)",
    )
    parser.add_argument(
        "--capacities",
        default=",".join(map(str, DEFAULT_CAPACITIES)),
        help="tier sizes in blocks, comma-separated",
    )
    parser.add_argument(
        "--policies", default=",".join(sorted(POLICIES)), help="store policies to replay, comma-separated"
    )
    parser.add_argument(
        "--split-minutes", type=float, default=30.0, help="tune on the trace before this minute (0: no split)"
    )
    parser.add_argument("--generated", action="store_true", help="also report two generated traces")
    parser.add_argument("--no-trace", action="store_true", help="skip --trace (with --generated)")
    parser.add_argument("--plot", type=Path, default=Path("policy_hit_ratio.png"), help="PNG to write")
    parser.add_argument(
        "--doc", action="store_true", help=f"write the tables into {DOC_PATH.name} and the plot next to it"
    )
    return parser.parse_args(argv)


def parse_capacities(text: str) -> list[int]:
    """`--capacities`: positive integers, comma-separated; SystemExit naming the flag otherwise."""
    try:
        capacities = [int(value) for value in text.split(",")]
    except ValueError:
        raise SystemExit(f"--capacities must be comma-separated integers, got {text!r}") from None
    if not capacities or min(capacities) < 1:
        raise SystemExit(f"--capacities must be positive, got {text!r}")
    return capacities


def load_trace_or_exit(path: Path) -> list[TraceRequest]:
    """The trace at `path`; SystemExit saying what is wrong with it (missing, or its bad line)."""
    if not path.is_file():
        raise SystemExit(f"no trace at {path} (pass --trace PATH)")
    try:
        return load_trace(path)
    except InvalidArgumentError as error:
        raise SystemExit(str(error)) from None


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    capacities = parse_capacities(args.capacities)
    policies = [name for name in args.policies.split(",") if name]
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown or not policies:
        wrong = unknown or args.policies
        raise SystemExit(f"--policies must name store policies {sorted(POLICIES)}; unknown: {wrong!r}")
    if not args.split_minutes >= 0:
        raise SystemExit(f"--split-minutes must be 0 or more, got {args.split_minutes:g}")
    parts: list[TracePart] = []
    if not args.no_trace:
        for trace_path in [path.resolve() for path in args.trace or [DEFAULT_TRACE]]:
            parts += split(trace_path.stem, load_trace_or_exit(trace_path), args.split_minutes)
    if args.generated:
        for name, params in GENERATED.items():
            parts += split(name, generate_trace(params), args.split_minutes)
    num_runs = len(parts) * len(capacities) * (len(policies) + 1)
    reports: list[tuple[TracePart, list[ReplayResult]]] = []
    with tqdm(total=num_runs, desc="replays", unit="run") as progress:
        for part in parts:
            reports.append((part, run_part(part, capacities, policies, progress)))
    tables = [markdown_table(part, results) for part, results in reports]
    for table in tables:
        print(table, end="\n\n")
    plot = PLOT_PATH if args.doc else args.plot
    plot_hit_ratios(reports, plot)
    print(f"plot: {plot}")
    if args.doc:
        command = "tools/bench/policy.py " + " ".join(argv if argv is not None else sys.argv[1:])
        machine = ", ".join(f"{key} {value}" for key, value in harness.machine_info().items())
        section = "\n\n".join(
            [
                f"Written by `.venv/bin/python {command.strip()}` on {time.strftime('%Y-%m-%d')}; {machine}.",
                f"![block hit ratio against capacity]({PLOT_PATH.name})",
                *tables,
            ]
        )
        harness.write_doc_section(DOC_PATH, section, BEGIN_MARKER, END_MARKER, DOC_HEADER)
        print(f"written: {DOC_PATH}")


if __name__ == "__main__":
    main()
