"""The client SDK: `Client` (blocking) and `AsyncClient` (asyncio), batched-first."""

from kvstore.client.aio import AsyncClient
from kvstore.client.client import Client, LeasedBlocks, NodeStatus, Transport
from kvstore.types import EngineLoad, FetchResult, PutResult, RemoveResult

__all__ = [
    "AsyncClient",
    "Client",
    "EngineLoad",
    "FetchResult",
    "LeasedBlocks",
    "NodeStatus",
    "PutResult",
    "RemoveResult",
    "Transport",
]
