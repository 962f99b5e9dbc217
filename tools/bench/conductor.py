"""Benchmark the conductor (issue 5): Route decision latency on a large cluster, and every
placement policy in the simulator on Mooncake's conversation trace.

    .venv/bin/python tools/bench/conductor.py --trace /path/to/conversation_trace.jsonl

1. Decision latency: 64 instances (32 prefill, 32 decode), a global index of 1M blocks
   (chains of 64 blocks, each stored on one to three prefill nodes), requests whose chains
   share a random part of a stored one; `Router.route` timed per call for each policy,
   against the index match alone for the same requests (the part every policy shares).
2. The simulator (conductor/simulate/) in a setting modelled on Mooncake's FAST'25
   evaluation: 8 prefill and 8 decode instances of the LLaMA2-70B / 8xA800 profile
   (conductor/costs.py), a DRAM tier of 6,000 blocks of 512 tokens per node (about 0.94 TiB
   of KV; a decode node's is used only when prefix-flow computes prefills there), TTFT SLO
   30 s, TBT SLO 0.1 s per token; the trace at its own rate and at twice it; each policy's
   goodput. Also prefix-flow on prefill engines that may preempt a
   prefill between two chunks for a request it ranks higher, and with decode engines that know
   only each sequence's tokens so far (the vLLM connector's pause budget).

Writes the section between the markers in docs/benchmarks.md, docs/bench-conductor.json and
docs/bench-conductor.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from conductor.cluster import ClusterState
from conductor.costs import DEFAULT_COSTS
from conductor.placement import PLACEMENTS, make_placement
from conductor.router import Router
from conductor.simulate.nodes import TOKENS_SO_FAR
from conductor.simulate.plot import plot_summaries
from conductor.simulate.report import Goodput, Summary, goodput, markdown_table, percentile, summarize
from conductor.simulate.sim import SimConfig, simulate
from conductor.types import NodeInfo, NodeLoad, Role, RouteRequest
from kvstore.trace import load_trace
from kvstore.types import BlockKey, NamespaceId, TierKind
from tools.bench import harness

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = ROOT / "docs" / "benchmarks.md"
JSON_PATH = ROOT / "docs" / "bench-conductor.json"
PLOT_PATH = ROOT / "docs" / "bench-conductor.png"
BEGIN_MARKER, END_MARKER = "<!-- bench:conductor:begin -->", "<!-- bench:conductor:end -->"
DOC_HEADER = "# Benchmarks\n"
DEFAULT_TRACE = ROOT / "../shared/data/traces/conversation_trace.jsonl"
ORDER = ["random", "least-loaded", "cache-aware", "kv-centric"]  # Mooncake's: worst average TTFT first
OURS, THEIRS = "prefix-flow", "kv-centric"
CHUNK_TOKENS = 2048  # the preemptive engine's prefill chunk, for prefix-flow's extra rows
PREEMPTIVE = SimConfig(placement=OURS, prefill_chunk_tokens=CHUNK_TOKENS).label
SO_FAR = SimConfig(placement=OURS, pause_budget=TOKENS_SO_FAR).label  # decode engines as the vLLM connector
NAMESPACE = NamespaceId(b"\x01" * 16)
BLOCK_TOKENS = 512


# -- decision latency ----------------------------------------------------------------------


def build_cluster(instances: int, indexed_blocks: int, seed: int) -> tuple[ClusterState, list[tuple[BlockKey, ...]]]:
    rng = random.Random(seed)
    cluster = ClusterState(DEFAULT_COSTS)
    cluster.namespaces.add(NAMESPACE)
    prefill = [f"prefill-{i}" for i in range(instances // 2)]
    for node_id in prefill:
        cluster.join(NodeInfo(node_id, Role.PREFILL))
        cluster.loads[node_id] = NodeLoad(prefill_busy_until_s=rng.uniform(0, 5))
    for i in range(instances - instances // 2):
        cluster.join(NodeInfo(f"decode-{i}", Role.DECODE))
        # a budget to pause for prefills: prefix-flow scores every decode node too
        cluster.loads[f"decode-{i}"] = NodeLoad(decode_pause_budget_s=rng.uniform(1, 10))
    chains = []
    for chain_number in range(indexed_blocks // 64):
        chain = tuple(BlockKey((chain_number << 32 | depth).to_bytes(16, "big")) for depth in range(64))
        for node_id in rng.sample(prefill, rng.randint(1, 3)):
            cluster.index.set_many(node_id, chain, (TierKind.DRAM,))
        chains.append(chain)
    return cluster, chains


def make_requests(chains: list[tuple[BlockKey, ...]], count: int, seed: int) -> list[RouteRequest]:
    rng = random.Random(seed)
    requests = []
    for number in range(count):
        shared = rng.choice(chains)[: rng.randint(1, 64)]
        fresh = tuple(BlockKey((1 << 120 | number << 16 | i).to_bytes(16, "big")) for i in range(rng.randint(0, 16)))
        keys = shared + fresh
        requests.append(RouteRequest(str(number), NAMESPACE, keys, len(keys) * BLOCK_TOKENS, 300, BLOCK_TOKENS))
    return requests


def time_routes(cluster: ClusterState, policy: str, requests: list[RouteRequest]) -> list[float]:
    """Microseconds per Route; the cluster's loads are restored after, so every policy sees the same."""
    saved = {node: dataclasses.replace(load) for node, load in cluster.loads.items()}
    router = Router(cluster, make_placement(policy, seed=1))
    elapsed = []
    for request in requests:
        started = time.perf_counter_ns()
        router.route(request, 1.0)
        elapsed.append((time.perf_counter_ns() - started) / 1e3)
    cluster.loads.update(saved)
    return elapsed


def time_matches(cluster: ClusterState, requests: list[RouteRequest]) -> list[float]:
    elapsed = []
    for request in requests:
        started = time.perf_counter_ns()
        cluster.index.match(request.keys)
        elapsed.append((time.perf_counter_ns() - started) / 1e3)
    return elapsed


def decision_latency(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    print(f"a cluster of {args.instances} instances, {args.indexed_blocks:,} indexed blocks", file=sys.stderr)
    cluster, chains = build_cluster(args.instances, args.indexed_blocks, seed=1)
    requests = make_requests(chains, args.route_requests, seed=2)
    results: dict[str, dict[str, list[float]]] = {}
    policies = ["index match", *sorted(PLACEMENTS)]
    with tqdm(total=args.runs * len(policies), desc="Route latency", file=sys.stderr) as bar:
        for _ in range(args.runs):
            for policy in policies:
                timed = (
                    time_matches(cluster, requests)
                    if policy == "index match"
                    else time_routes(cluster, policy, requests)
                )
                runs = results.setdefault(policy, {"p50": [], "p99": []})
                runs["p50"].append(percentile(timed, 0.5))
                runs["p99"].append(percentile(timed, 0.99))
                bar.update()
    return {policy: {q: statistics.median(v) for q, v in runs.items()} for policy, runs in results.items()}


# -- simulation ----------------------------------------------------------------------------


def simulations(args: argparse.Namespace) -> tuple[list[Summary], dict[str, Goodput]]:
    trace = load_trace(args.trace)
    if args.limit:
        trace = trace[: args.limit]
    base = SimConfig(prefill_nodes=8, decode_nodes=8, cache_blocks=args.cache_blocks)
    # Every policy on an engine that runs each prefill to its end, and prefix-flow also on one
    # that may set a prefill aside between chunks for a request it ranks higher (Algorithm 1
    # serves in arrival order: preemption never applies to it).
    configs = [dataclasses.replace(base, placement=policy) for policy in sorted(PLACEMENTS)]
    configs.append(dataclasses.replace(base, placement=OURS, prefill_chunk_tokens=CHUNK_TOKENS))
    # And prefix-flow with decode engines that know only each sequence's tokens so far, as the
    # vLLM connector's reports do (they cannot know how many tokens a sequence will generate).
    configs.append(dataclasses.replace(base, placement=OURS, pause_budget=TOKENS_SO_FAR))
    summaries = []
    runs = [(config, scale) for scale in args.scales for config in configs]
    with tqdm(total=len(runs), desc="simulations", file=sys.stderr) as bar:
        for config, scale in runs:
            bar.set_postfix_str(f"{config.label} at {scale:g}x")
            summaries.append(summarize(simulate(dataclasses.replace(config, rate_scale=scale), trace)))
            bar.update()
    goodputs: dict[str, Goodput] = {}
    if args.goodput:
        for config in tqdm(configs, desc="goodput", file=sys.stderr):
            goodputs[config.label] = goodput(config, trace)
    return summaries, goodputs


# -- report --------------------------------------------------------------------------------


def verdicts(latency: dict[str, dict[str, float]], summaries: list[Summary], goodputs: dict[str, Goodput]) -> list[str]:
    lines = []
    worst_p99 = max(latency[policy]["p99"] for policy in PLACEMENTS)
    lines.append(f"- Route p99, the slowest policy: {worst_p99:.0f} us [<= 1000 us: {_ok(worst_p99 <= 1000)}]")
    for scale in sorted({s.rate_scale for s in summaries}):
        by = {s.placement: s for s in summaries if s.rate_scale == scale}
        ttft = [by[name].ttft_mean_s for name in ORDER]
        ordered = all(a > b for a, b in itertools.pairwise(ttft))
        shown = " > ".join(f"{name} {by[name].ttft_mean_s:.2f} s" for name in ORDER)
        lines.append(f"- average TTFT at {scale:g}x: {shown} [ordering as Mooncake reports: {_ok(ordered)}]")
        theirs = by[THEIRS].ttft_mean_s
        for name in (OURS, PREEMPTIVE, SO_FAR):
            ours = by[name].ttft_mean_s
            lines.append(
                f"- {name} vs {THEIRS} at {scale:g}x: average TTFT {ours:.2f} s vs {theirs:.2f} s "
                f"({1 - ours / theirs:+.1%} lower) [>= 10% lower: {_ok(ours <= 0.9 * theirs)}]"
            )
    if goodputs:
        theirs_g = goodputs[THEIRS]
        for name in (OURS, PREEMPTIVE, SO_FAR):
            ours_g = goodputs[name]
            higher = _ok(ours_g.rate_scale > theirs_g.rate_scale)
            lines.append(
                f"- goodput: {name} {ours_g.requests_per_s:.2f} req/s ({ours_g.rate_scale:.2f}x) vs {THEIRS} "
                f"{theirs_g.requests_per_s:.2f} req/s ({theirs_g.rate_scale:.2f}x) [higher: {higher}]"
            )
    return lines


def _ok(passed: bool) -> str:
    return "PASS" if passed else "**FAIL**"


def section(
    args: argparse.Namespace,
    latency: dict[str, dict[str, float]],
    summaries: list[Summary],
    goodputs: dict[str, Goodput],
) -> str:
    machine = harness.machine_info()
    lines = [
        "## Conductor (issue 5)",
        "",
        f"Written by `.venv/bin/python tools/bench/conductor.py --trace {args.trace}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        *(f"- {key}: {value}" for key, value in machine.items()),
        "",
        "Targets:",
        "",
        *verdicts(latency, summaries, goodputs),
        "",
        f"### Route decision latency: {args.instances} instances, {args.indexed_blocks:,} indexed blocks",
        "",
        f"`Router.route` in process, {args.route_requests:,} requests sharing 1-64 blocks of a stored chain plus"
        f" 0-16 new ones; medians of {args.runs} runs. The reference is the global index's match alone for the"
        " same requests (every policy but random and round-robin does it).",
        "",
        "| policy | p50 us | p99 us | p99 / index match p99 |",
        "|---|--:|--:|--:|",
    ]
    match_p99 = latency["index match"]["p99"]
    for policy, figures in latency.items():
        lines.append(f"| {policy} | {figures['p50']:.0f} | {figures['p99']:.0f} | {figures['p99'] / match_p99:.2f}x |")
    lines += [
        "",
        "### Simulator: every policy on the conversation trace",
        "",
        "8 prefill and 8 decode instances (LLaMA2-70B on 8xA800, profile in conductor/costs.py), a DRAM tier of"
        f" {args.cache_blocks:,} blocks per node (leaf-first LRU; a decode node's fills only when prefix-flow"
        " computes prefills there), TTFT SLO 30 s, TBT SLO 0.1 s/token;"
        " goodput is the largest arrival-rate multiple at which 90% of requests meet both. Rejected requests"
        " count as missing their SLO and have no latency. Reuse is the share of prompt tokens not computed"
        " (the trace's ceiling, every reuse an infinite cache could make, is 37.4% of all prompt tokens; of the"
        " served ones it is a little higher, as the rejected prompts are long and reuse little). Prefill engines"
        " run each"
        f" prefill to its end, as vLLM's does; the rows `{PREEMPTIVE}` put prefix-flow on engines that compute"
        f" prefills in chunks of {CHUNK_TOKENS} tokens and, between two, set a prefill aside for a waiting request"
        f" with a higher priority (docs/conductor.md). Decode engines work out how long their batch could pause"
        f" for a prefill knowing each sequence's output length (the trace's); the rows `{SO_FAR}` have them"
        " know only each sequence's tokens so far, as the vLLM connector's reports do.",
        "",
        markdown_table(summaries, goodputs or None),
        "",
        "![mean TTFT and SLO attainment per policy](bench-conductor.png)",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="the conversation trace (Mooncake format)")
    parser.add_argument("--quick", action="store_true", help="fewer requests, no goodput; implies --no-doc")
    parser.add_argument("--runs", type=int, default=3, help="decision-latency runs (median reported)")
    parser.add_argument("--instances", type=int, default=64)
    parser.add_argument("--indexed-blocks", type=int, default=1_000_000)
    parser.add_argument("--route-requests", type=int, default=5000)
    parser.add_argument("--cache-blocks", type=int, default=6000)
    parser.add_argument(
        "--scales",
        default="1,1.5,2",
        help="arrival-rate multiples to simulate (at 1.5x Algorithm 1's mean TTFT is near Mooncake's 3.07 s)",
    )
    parser.add_argument("--limit", type=int, default=0, help="simulate only the first N requests")
    parser.add_argument("--no-goodput", dest="goodput", action="store_false")
    parser.add_argument("--no-doc", dest="doc", action="store_false")
    args = parser.parse_args()
    args.scales = [float(s) for s in args.scales.split(",")]
    if args.quick:
        args.runs, args.indexed_blocks, args.route_requests, args.limit = 1, 200_000, 1000, 3000
        args.goodput = args.doc = False
    latency = decision_latency(args)
    summaries, goodputs = simulations(args)
    text = section(args, latency, summaries, goodputs)
    print(text)
    if args.doc:
        harness.write_doc_section(DOC_PATH, text, BEGIN_MARKER, END_MARKER, DOC_HEADER)
        plot_summaries(summaries, PLOT_PATH)
        harness.write_json(
            JSON_PATH,
            {
                "latency_us": latency,
                "summaries": [dataclasses.asdict(s) for s in summaries],
                "goodput": {name: dataclasses.asdict(g) for name, g in goodputs.items()},
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
