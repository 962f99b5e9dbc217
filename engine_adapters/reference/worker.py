"""An engine worker process: the reference engine attached to one node, serving commands
from a pipe. The demo (engine_adapters/demo.py) runs one per node.

Commands (dicts): {"op": "prefill", "tokens": [...]} -> the prefill's counts, first token and
seconds, and the sequence's blocks are kept until {"op": "release"}; {"op": "generate",
"tokens": [...], "max_new_tokens": n} -> a prefill (loading what the node holds) then greedy
decode; {"op": "stop"}. Errors are answered as {"error": "..."}.
"""

from __future__ import annotations

import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from engine_adapters.reference.engine import Engine
from engine_adapters.reference.model import LlamaModel, PagedCache
from kvstore.client import Client


def worker_main(
    connection: Connection, model_folder: str, node_address: str, block_size: int, cache_blocks: int
) -> None:
    model = LlamaModel.load(Path(model_folder))
    with Client(node_address) as client, Client(node_address) as saver:  # saves overlap the next chunk
        cache = PagedCache(model.config, cache_blocks, block_size)
        engine = Engine(model, cache, client=client, chunk_blocks=4, saver=saver)
        connection.send({"ready": True, "namespace_id": engine.namespace_id})
        while True:
            command: dict[str, Any] = connection.recv()
            if command["op"] == "stop":
                engine.close()
                break
            try:
                connection.send(_serve(engine, command))
            except Exception as error:  # reported to the driver, which reports the request as failed
                connection.send({"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()})


def _serve(engine: Engine, command: dict[str, Any]) -> dict[str, Any]:
    tokens: list[int] = command["tokens"]
    started = time.perf_counter()
    result = engine.prefill(tokens)
    prefill_s = time.perf_counter() - started
    reply: dict[str, Any] = {
        "first_token": result.first_token,
        "reused_tokens": result.reused_tokens,
        "computed_tokens": result.computed_tokens,
        "loaded_blocks": result.loaded_blocks,
        "saved_blocks": result.saved_blocks,
        "node_error": result.node_error,
        "prefill_s": prefill_s,
    }
    if command["op"] == "generate":
        started = time.perf_counter()
        generated = engine.decode([*tokens, result.first_token], result.block_table, command["max_new_tokens"] - 1)
        reply["tokens"] = [result.first_token, *generated]
        reply["decode_s"] = time.perf_counter() - started
    engine.release(result.block_table)
    return reply
