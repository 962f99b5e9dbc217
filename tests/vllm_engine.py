"""One vLLM engine process for the connector's tests: reads a JSON job on stdin, generates
greedily, prints one `RESULT {json}` line: every output's token ids, how many prompt tokens
vLLM did not compute (`num_cached_tokens`), and the connector's worker-side counters.

    {"model": DIR, "prompts": [[ids...], ...], "max_tokens": 8, "block_size": 32,
     "connector": {"node": "127.0.0.1:PORT", ...} | null, "kv_role": "kv_both",
     "phases": 1}

With `phases` > 1 the prompts are generated that many times in turn; between phases the
engine prints `PHASE n` and waits for a line on stdin (the test changes the node meanwhile),
and vLLM's own prefix cache is reset, so every phase asks the connector afresh.
"""

from __future__ import annotations

import json
import sys

from vllm import LLM, SamplingParams
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group
from vllm.inputs import TokensPrompt

from engine_adapters.vllm.config import transfer_config


def main() -> int:
    """With VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine core, and so the worker-side
    connector whose counters are printed, runs in this process; otherwise they are empty."""
    job = json.loads(sys.stdin.readline())
    transfer = None
    if job.get("connector") is not None:
        transfer = KVTransferConfig(**transfer_config(job["connector"], job.get("kv_role", "kv_both")))
    llm = LLM(
        model=job["model"],
        dtype="float32",
        block_size=job.get("block_size", 32),
        max_model_len=1024,
        enforce_eager=True,
        seed=0,
        max_num_seqs=8,
        kv_cache_memory_bytes=64 << 20,
        kv_transfer_config=transfer,
    )
    params = SamplingParams(max_tokens=job.get("max_tokens", 8), temperature=0.0)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    phases = []
    for phase in range(job.get("phases", 1)):
        if phase:
            print(f"PHASE {phase}", flush=True)
            sys.stdin.readline()
            llm.reset_prefix_cache()
        results = llm.generate(prompts, params, use_tqdm=False)
        phases.append(
            {
                "outputs": [list(result.outputs[0].token_ids) for result in results],
                "cached": [result.num_cached_tokens for result in results],
                "stats": _stats(),
            }
        )
    print("RESULT " + json.dumps(phases), flush=True)
    return 0


def _stats() -> dict[str, int]:
    if not has_kv_transfer_group():
        return {}
    connector = get_kv_transfer_group()
    connector.wait_for_saves()
    stats = connector.worker_stats
    return {name: getattr(stats, name) for name in ("loaded_blocks", "failed_blocks", "saved_blocks", "save_failures")}


if __name__ == "__main__":
    sys.exit(main())
