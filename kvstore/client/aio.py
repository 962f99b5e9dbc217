"""`AsyncClient`: the SDK for asyncio code (an engine's event loop, the conductor).

Each call runs the blocking `Client`'s call on a small thread pool and awaits it, so the event
loop never blocks: not on gRPC, and not on the payload copies, which are CPU and memory work
that would stall a loop whichever gRPC API issued the metadata calls. One implementation of
the protocol logic serves both clients. `watch_events` relays the stream through a queue.
`lease_in_place` has no async form: its lease is held around a GPU kernel's own launch.

Owner: one event loop. Close it with `await client.close()` or `async with`.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from kvstore.client.client import Client, NodeStatus, Transport
from kvstore.events import BlockEvent
from kvstore.types import (
    BlockInfo,
    BlockKey,
    EngineLoad,
    FetchResult,
    LookupResult,
    Namespace,
    NamespaceId,
    PutResult,
    RemoveResult,
)

Result = TypeVar("Result")

_END = object()


class AsyncClient:
    def __init__(self, client: Client, *, max_threads: int = 8) -> None:
        self._client = client
        self._executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="kvstore-client")

    @classmethod
    async def connect(
        cls,
        address: str,
        *,
        token: str | None = None,
        tls_root_certificates: bytes | None = None,
        timeout_s: float = 10.0,
        transport: Transport = Transport.AUTO,
    ) -> AsyncClient:
        make = functools.partial(
            Client,
            address,
            token=token,
            tls_root_certificates=tls_root_certificates,
            timeout_s=timeout_s,
            transport=transport,
        )
        return cls(await asyncio.get_running_loop().run_in_executor(None, make))

    @property
    def uses_shared_memory(self) -> bool:
        return self._client.uses_shared_memory

    async def close(self) -> None:
        await self._run(self._client.close)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def register_namespace(self, namespace: Namespace) -> NamespaceId:
        return await self._run(self._client.register_namespace, namespace)

    async def namespaces(self) -> tuple[Namespace, ...]:
        return await self._run(self._client.namespaces)

    async def lookup(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> LookupResult:
        return await self._run(self._client.lookup, namespace_id, keys)

    async def put_blocks(
        self,
        namespace_id: NamespaceId,
        keys: Sequence[BlockKey],
        payloads: Sequence[Any],
        *,
        parent: BlockKey | None = None,
    ) -> PutResult:
        return await self._run(functools.partial(self._client.put_blocks, parent=parent), namespace_id, keys, payloads)

    async def get_into(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], dests: Sequence[Any], *, verify: bool = False
    ) -> int:
        return await self._run(functools.partial(self._client.get_into, verify=verify), namespace_id, keys, dests)

    async def get_blocks(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> list[npt.NDArray[np.uint8]]:
        return await self._run(self._client.get_blocks, namespace_id, keys)

    async def fetch(
        self, namespace_id: NamespaceId, keys: Sequence[BlockKey], peer: str, *, parent: BlockKey | None = None
    ) -> FetchResult:
        return await self._run(functools.partial(self._client.fetch, parent=parent), namespace_id, keys, peer)

    async def remove(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> RemoveResult:
        return await self._run(self._client.remove, namespace_id, keys)

    async def pin(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> int:
        return await self._run(self._client.pin, namespace_id, keys)

    async def unpin(self, namespace_id: NamespaceId, keys: Sequence[BlockKey]) -> int:
        return await self._run(self._client.unpin, namespace_id, keys)

    async def report_load(self, engine_id: str, load: EngineLoad) -> None:
        await self._run(self._client.report_load, engine_id, load)

    async def status(self) -> NodeStatus:
        return await self._run(self._client.status)

    async def inspect(self, keys: Sequence[BlockKey]) -> list[BlockInfo]:
        return await self._run(self._client.inspect, keys)

    async def list_blocks(
        self, namespace_id: NamespaceId | None = None, *, page_size: int = 1000
    ) -> AsyncIterator[BlockInfo]:
        """As `Client.list_blocks`: every stored block, a page of calls at a time off the loop."""
        blocks = self._client.list_blocks(namespace_id, page_size=page_size)
        while page := await self._run(lambda: list(itertools.islice(blocks, page_size))):
            for info in page:
                yield info

    async def drain(self, *, flush: bool = True) -> int:
        return await self._run(functools.partial(self._client.drain, flush=flush))

    async def watch_events(self) -> AsyncIterator[BlockEvent]:
        """As `Client.watch_events`; stop iterating to end the stream."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=4096)
        watch = self._client.watch_events()

        def pump() -> None:
            try:
                for event in watch:
                    asyncio.run_coroutine_threadsafe(queue.put(event), loop).result()
                asyncio.run_coroutine_threadsafe(queue.put(_END), loop).result()
            except BaseException as error:  # delivered to the consumer, raised there
                asyncio.run_coroutine_threadsafe(queue.put(error), loop).result()

        task = loop.run_in_executor(self._executor, pump)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, BlockEvent)
                yield item
        finally:
            watch.cancel()
            task.cancel()

    async def _run(self, call: Callable[..., Result], *args: Any) -> Result:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)
