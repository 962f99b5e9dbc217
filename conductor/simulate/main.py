"""`conductor simulate`: replay a trace through the real placement code over a simulated
cluster, and print what each policy achieved (a Markdown table; optionally JSON and a plot).

    conductor simulate --trace conversation_trace.jsonl --prefill 8 --decode 8 \\
        --policy kv-centric,prefix-flow --rate-scale 1,2 --goodput --plot sim.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from conductor.cluster import Slo
from conductor.costs import DEFAULT_COSTS
from conductor.placement import PLACEMENTS
from conductor.simulate.nodes import KNOWN_OUTPUT, PAUSE_BUDGETS
from conductor.simulate.report import Goodput, Summary, goodput, markdown_table, summarize
from conductor.simulate.sim import SimConfig, simulate
from kvstore.errors import KVStoreError
from kvstore.policy import POLICIES
from kvstore.trace import load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, required=True, help="a Mooncake-format trace (JSON lines)")
    parser.add_argument("--prefill", type=int, default=8, help="prefill instances (default 8)")
    parser.add_argument("--decode", type=int, default=8, help="decode instances (default 8)")
    parser.add_argument(
        "--policy",
        default="all",
        help=f"placement policies, comma-separated, or 'all' (default): {', '.join(sorted(PLACEMENTS))}",
    )
    parser.add_argument(
        "--rate-scale", default="1", help="arrival-rate multipliers, comma-separated (default 1: the trace's own)"
    )
    parser.add_argument(
        "--cache-blocks", type=int, default=6000, help="each node's DRAM tier, in trace blocks (default 6000)"
    )
    parser.add_argument(
        "--cache-policy", default="leaf-first-lru", help=f"the tiers' eviction policy: {', '.join(sorted(POLICIES))}"
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=0,
        help="0 (default): a prefill runs to its end once started; N: prefills are computed in chunks of N "
        "tokens, and between two a request placed with a priority (prefix-flow) may be set aside for one that "
        "ranks higher",
    )
    parser.add_argument(
        "--pause-budget",
        choices=PAUSE_BUDGETS,
        default=KNOWN_OUTPUT,
        help="how a decode engine works out how long its batch could pause for a prefill: knowing each "
        "sequence's output length (default), or only its tokens so far, as the vLLM connector does",
    )
    parser.add_argument("--slo-ttft", type=float, default=30.0, help="TTFT SLO in seconds (default 30)")
    parser.add_argument("--slo-tbt", type=float, default=0.1, help="TBT SLO in seconds per token (default 0.1)")
    parser.add_argument("--limit", type=int, default=0, help="replay only the first N requests (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random placement (default 0)")
    parser.add_argument("--goodput", action="store_true", help="also search each policy's goodput (many runs)")
    parser.add_argument("--json", type=Path, help="write every summary (and goodput) to this JSON file")
    parser.add_argument("--plot", type=Path, help="write a PNG of mean TTFT and SLO attainment per policy")


def run(args: argparse.Namespace) -> int:
    try:
        policies = _policies(args.policy)
        scales = _scales(args.rate_scale)
        trace = load_trace(args.trace)
        if args.limit:
            trace = trace[: args.limit]
        if not trace:
            raise KVStoreError(f"{args.trace}: no requests")
        base = SimConfig(
            prefill_nodes=args.prefill,
            decode_nodes=args.decode,
            cache_blocks=args.cache_blocks,
            cache_policy=args.cache_policy,
            prefill_chunk_tokens=args.prefill_chunk_tokens,
            slo=Slo(args.slo_ttft, args.slo_tbt),
            pause_budget=args.pause_budget,
            seed=args.seed,
        )
        base.check()
        summaries = _table(base, trace, policies, scales)
        goodputs = _goodputs(base, trace, policies) if args.goodput else {}
    except (KVStoreError, OSError) as error:
        print(f"conductor simulate: {error}", file=sys.stderr)
        return 2
    print(markdown_table(summaries, goodputs or None))
    if args.json:
        payload = {
            "summaries": [dataclasses.asdict(s) for s in summaries],
            "goodput": {name: dataclasses.asdict(g) for name, g in goodputs.items()},
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        from conductor.simulate.plot import plot_summaries  # noqa: PLC0415 - matplotlib, only when asked

        plot_summaries(summaries, args.plot)
    return 0


def _policies(text: str) -> list[str]:
    names = sorted(PLACEMENTS) if text == "all" else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PLACEMENTS]
    if unknown or not names:
        raise KVStoreError(f"unknown placement policies {unknown}; known: {sorted(PLACEMENTS)}")
    return names


def _scales(text: str) -> list[float]:
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise KVStoreError(f"--rate-scale must be numbers separated by commas, got {text!r}") from None
    if not scales or any(not scale > 0 for scale in scales):
        raise KVStoreError(f"--rate-scale values must be positive, got {text!r}")
    return scales


def _table(base: SimConfig, trace: Sequence, policies: list[str], scales: list[float]) -> list[Summary]:  # type: ignore[type-arg]
    summaries = []
    runs = [(policy, scale) for scale in scales for policy in policies]
    with tqdm(total=len(runs) * len(trace), unit="req", file=sys.stderr, desc="simulating") as bar:
        for policy, scale in runs:
            bar.set_postfix_str(f"{policy} at {scale:g}x")
            config = dataclasses.replace(base, placement=policy, rate_scale=scale)
            done = 0

            def progress(arrived: int, total: int) -> None:
                nonlocal done
                bar.update(arrived - done)
                done = arrived

            summaries.append(summarize(simulate(config, trace, DEFAULT_COSTS, progress)))
    return summaries


def _goodputs(base: SimConfig, trace: Sequence, policies: list[str]) -> dict[str, Goodput]:  # type: ignore[type-arg]
    found = {}
    for policy in policies:
        config = dataclasses.replace(base, placement=policy)

        def show(scale: float, summary: Summary, policy: str = policy) -> None:
            print(f"goodput {policy}: {scale:.3g}x -> {summary.attainment:.1%} met both SLOs", file=sys.stderr)

        found[config.label] = goodput(config, trace, on_run=show)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conductor simulate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
