"""The conductor's state and behaviour, behind the gRPC service (conductor/service.py):
members (through a `Membership`), one index feed per live node, the cluster state, and the
router.

- `register` / `heartbeat`: the node's lease in the membership; its load into the cluster
  state (queued prefill tokens become a busy-until through its profile's prefill model).
- `reconcile`, every `reconcile_interval_s` on its own thread: the membership's live nodes
  join the cluster (a feed starts following their events), nodes no longer live leave it (their
  feed stops and their blocks leave the index). A conductor that restarts rebuilds everything
  this way: the members from etcd, the index from the nodes' snapshots.
  Entries of nodes that left are swept from the index afterwards, a chunk at a time.
- `route`: the router, under the lock; decisions go to `WatchDecisions` subscribers and
  their reused prefixes to the hot-prefix counter (conductor/replication.py), whose plan the
  reconcile thread carries out with the target nodes' `Fetch`.

Owner: gRPC handler threads, the reconcile thread and the feed threads; `_lock` guards the
cluster state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from conductor.cluster import ClusterState
from conductor.membership import Membership, check_ttl
from conductor.placement.base import PlacementPolicy
from conductor.replication import HotPrefixes, Replication
from conductor.router import Router
from conductor.types import Decision, NodeInfo, NodeLoad, PrefixHolding, RouteRequest
from conductor.watch import NodeFeed
from kvstore.errors import InvalidArgumentError, UnknownNamespaceError
from kvstore.node.auth import PLAINTEXT, Access
from kvstore.proto import kvstore_pb2 as pb
from kvstore.proto import kvstore_pb2_grpc as pb_grpc
from kvstore.types import BlockKey, EngineLoad, NamespaceId, TierKind

log = logging.getLogger(__name__)

WATCH_QUEUE = 1024  # decisions a slow WatchDecisions subscriber may fall behind before it is dropped
INFO_TIMEOUT_S = 2.0
FETCH_TIMEOUT_S = 60.0
LEARN_INTERVAL_S = 1.0  # unknown namespaces make the conductor ask the nodes at most this often
SWEEP_CHUNK = 20_000  # index entries swept per hold of the lock (~3 ms) after a node leaves


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """One member as `ClusterStatus` shows it, copied under the lock."""

    info: NodeInfo
    load: NodeLoad
    prefill_queue_s: float  # predicted wait before a new prefill starts there
    indexed_blocks: int  # blocks the global index holds for it
    resyncs: int  # times its feed rebuilt its part of the index from a fresh snapshot
    load_reported: bool = False  # its engines report its load; else the conductor's own account


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    policy: str
    members: tuple[MemberStatus, ...]  # by node id
    indexed_blocks: int  # distinct keys in the global index
    routed: int
    rejected: int


class Conductor:
    def __init__(
        self,
        cluster: ClusterState,
        policy: PlacementPolicy,
        membership: Membership,
        *,
        node_access: Access = PLAINTEXT,
        reconcile_interval_s: float = 1.0,
        default_ttl_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_decision: Callable[[Decision, float], None] | None = None,
        on_resync: Callable[[str, str], None] | None = None,
        on_replicate: Callable[[Replication, bool], None] | None = None,
        hot_prefixes: HotPrefixes | None = None,
    ) -> None:
        self.cluster = cluster
        self.router = Router(cluster, policy)
        self.membership = membership
        self._node_access = node_access  # the nodes' token and TLS roots
        self._interval_s = reconcile_interval_s
        self._default_ttl_s = default_ttl_s
        self._clock = clock
        self._on_decision = on_decision
        self._on_resync = on_resync
        self._on_replicate = on_replicate
        self._hot = hot_prefixes or HotPrefixes()
        self._lock = threading.Lock()
        self._reconciling = threading.Lock()  # one reconcile at a time (it starts and stops feeds)
        self._feeds: dict[str, NodeFeed] = {}
        self._watchers: list[queue.Queue[Decision | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._reconcile_loop, name="reconcile", daemon=True)
        self.routed = 0
        self._next_learn_s = 0.0
        self.rejected = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.reconcile()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for feed in list(self._feeds.values()):
            feed.stop()
        self._feeds.clear()
        with self._lock:
            for watcher in self._watchers:
                with contextlib.suppress(queue.Full):
                    watcher.put_nowait(None)
        self.membership.close()

    # -- membership ------------------------------------------------------------------------------

    def register(self, info: NodeInfo, ttl_s: float) -> None:
        """Add (or replace) a member for `ttl_s` seconds (0: the configured default); the
        reconcile that follows starts its feed. Bad fields raise InvalidArgumentError and
        register nothing."""
        ttl_s = ttl_s or self._default_ttl_s
        if not info.node_id or "/" in info.node_id or len(info.node_id) > 256:
            raise InvalidArgumentError(f"node_id must be 1-256 characters without '/', got {info.node_id!r}")
        if not info.grpc_address:
            raise InvalidArgumentError(f"node {info.node_id!r}: grpc_address is empty (the conductor watches it)")
        check_ttl(ttl_s)
        self.cluster.costs.profile(info.profile)  # ConfigError (INVALID_ARGUMENT) when unknown
        self.membership.register(info, ttl_s)
        self.reconcile()

    def leave(self, node_id: str) -> bool:
        """Remove a member now (it drains or stops): the reconcile that follows drops it from
        placement and its blocks from the index. False when it was not a live member."""
        if not node_id:
            raise InvalidArgumentError("node_id is empty")
        was_member = node_id in self.membership.live()
        self.membership.remove(node_id)
        self.reconcile()
        return was_member

    def heartbeat(self, node_id: str, load: EngineLoad | None) -> bool:
        """Renew the node's lease and take its load (the sum of its engines' reports), when it
        reports one; False when it must register again. A node that reports no load (its
        engines report none to it) gets the conductor's own account of its placements; one that
        reported before starts that account from nothing. A load out of range (`EngineLoad.check`:
        a pause budget that is not a finite number >= 0) is refused, and nothing changes."""
        if load is not None:
            try:
                load.check()
            except InvalidArgumentError as error:
                raise InvalidArgumentError(f"node {node_id!r}: {error}") from None
        if not self.membership.renew(node_id):
            return False
        if load is None:
            if self.cluster.is_reporting(node_id):
                with self._lock:
                    self.cluster.stop_reporting(node_id)
            return True
        now = self._clock()
        with self._lock:
            info = self.cluster.nodes.get(node_id)
            if info is None:
                return True  # live in the membership; the next reconcile adds it
            profile = self.cluster.costs.profile(info.profile)
            queued = load.queued_prefill_tokens
            busy_s = profile.prefill.seconds(queued) if queued else 0.0
            self.cluster.report_load(
                node_id,
                NodeLoad(
                    prefill_busy_until_s=now + busy_s,
                    queued_prefill_tokens=queued,
                    running_decodes=load.running_decodes,
                    decode_kv_tokens=load.decode_kv_tokens,
                    decode_pause_budget_s=load.decode_pause_budget_s,
                ),
            )
        return True

    def reconcile(self) -> None:
        """Join the live members the cluster lacks, and remove those no longer live. Called by
        the reconcile thread and by `register`, one at a time."""
        with self._reconciling:
            self._reconcile()

    def _reconcile(self) -> None:
        live = self.membership.live()
        with self._lock:
            known = dict(self.cluster.nodes)
            for node_id in known.keys() - live.keys():
                self.cluster.leave(node_id)
            for info in live.values():
                if known.get(info.node_id) != info:
                    self.cluster.join(info)
        for node_id in known.keys() - live.keys():
            feed = self._feeds.pop(node_id, None)
            if feed is not None:
                feed.stop()
            log.info("node %s left the cluster", node_id, extra={"node_id": node_id})
        for info in live.values():
            feed = self._feeds.get(info.node_id)
            if feed is not None and feed.grpc_address == info.grpc_address:
                continue
            if feed is not None:
                feed.stop()
            self._feeds[info.node_id] = feed = NodeFeed(
                info.node_id, info.grpc_address, self, access=self._node_access, on_resync=self._on_resync
            )
            feed.start()
            log.info(
                "node %s (%s) joined as %s",
                info.node_id,
                info.grpc_address,
                info.role.value,
                extra={"node_id": info.node_id, "role": info.role.value, "grpc_address": info.grpc_address},
            )

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.reconcile()
            except Exception:  # the membership store is down: keep the cluster as it is, retry
                log.exception("reconciling the membership failed; retrying in %.1f s", self._interval_s)
            with self._lock:
                plan = self._hot.plan(self.cluster, self._clock())
            for copy in plan:
                self.replicate(copy)
            self.sweep_index()

    def sweep_index(self) -> None:
        """Clear the index entries of nodes that left, a chunk at a time under the lock, so
        routing never waits for a whole pass (conductor/index.py). Called by the reconcile
        thread."""
        index = self.cluster.index
        with self._lock:
            mask = index.stale_mask
            if not mask:
                return
            keys = index.snapshot_keys()
        for start in range(0, len(keys), SWEEP_CHUNK):
            with self._lock:
                index.sweep(keys[start : start + SWEEP_CHUNK], mask)
        with self._lock:
            index.release(mask)

    def replicate(self, copy: Replication) -> bool:
        """Have `copy.target` pull `copy.keys` from `copy.source`'s data plane (node Fetch);
        False (logged) when a node is gone or a call failed. The index learns the new copy from
        the target's events."""
        source, target = self.cluster.nodes.get(copy.source), self.cluster.nodes.get(copy.target)
        done = False
        if source is not None and target is not None:
            try:
                fetched = self._pull(source, target, copy)
                done = True
                log.info(
                    "replicated a hot prefix of %d blocks from %s to %s (%d copied)",
                    len(copy.keys),
                    copy.source,
                    copy.target,
                    fetched,
                )
            except grpc.RpcError as error:
                log.warning("replicating to %s from %s failed: %s", copy.target, copy.source, error.details())
        if self._on_replicate is not None:
            self._on_replicate(copy, done)
        return done

    def _pull(self, source: NodeInfo, target: NodeInfo, copy: Replication) -> int:
        access = self._node_access
        metadata = access.metadata
        with access.channel(source.grpc_address) as channel:
            info = pb_grpc.KVStoreStub(channel).Info(pb.InfoRequest(), timeout=INFO_TIMEOUT_S, metadata=metadata)
        described = [n.namespace for n in info.namespaces if n.namespace_id == copy.namespace_id]
        with access.channel(target.grpc_address) as channel:
            node = pb_grpc.KVStoreStub(channel)
            if described:  # the target may never have seen the namespace: register it as the source has it
                request = pb.RegisterNamespaceRequest(namespace=described[0])
                node.RegisterNamespace(request, timeout=INFO_TIMEOUT_S, metadata=metadata)
            fetch = pb.FetchRequest(namespace_id=copy.namespace_id, keys=b"".join(copy.keys), peer=source.data_address)
            return int(node.Fetch(fetch, timeout=FETCH_TIMEOUT_S, metadata=metadata).num_fetched)

    def feed_of(self, node_id: str) -> NodeFeed | None:
        return self._feeds.get(node_id)

    def status(self) -> ClusterSnapshot:
        """The members, their loads and index shares, consistent with each other (under the lock)."""
        now = self._clock()
        with self._lock:
            cluster = self.cluster
            members = []
            for node_id in sorted(cluster.nodes):
                feed = self._feeds.get(node_id)
                load = cluster.loads[node_id]
                members.append(
                    MemberStatus(
                        cluster.nodes[node_id],
                        dataclasses.replace(load),
                        load.queue_s(now),
                        cluster.index.blocks_of(node_id),
                        feed.resyncs if feed is not None else 0,
                        cluster.is_reporting(node_id),
                    )
                )
            policy = self.router.policy.name
            return ClusterSnapshot(policy, tuple(members), len(cluster.index), self.routed, self.rejected)

    # -- the index sink (called by the feeds) ---------------------------------------------------

    def replace_node(
        self, node_id: str, blocks: dict[BlockKey, tuple[TierKind, ...]], namespaces: set[NamespaceId]
    ) -> None:
        with self._lock:
            if node_id not in self.cluster.nodes:
                return
            self.cluster.index.drop_node(node_id)
            for key, tiers in blocks.items():
                self.cluster.index.set_tiers(node_id, key, tiers)
            self.cluster.namespaces |= namespaces

    def apply(self, node_id: str, key: BlockKey, namespace: NamespaceId, tiers: tuple[TierKind, ...]) -> None:
        with self._lock:
            if node_id in self.cluster.nodes:
                self.cluster.index.set_tiers(node_id, key, tiers)
                self.cluster.namespaces.add(namespace)

    # -- routing ---------------------------------------------------------------------------------

    def locate(self, keys: Sequence[BlockKey]) -> list[PrefixHolding]:
        """The nodes holding a leading run of `keys`, the longest first (then by node id)."""
        with self._lock:
            holdings = self.cluster.index.match(keys)
        return sorted(holdings.values(), key=lambda held: (-held.blocks, held.node_id))

    def route(self, request: RouteRequest) -> Decision:
        if request.namespace_id not in self.cluster.namespaces and self._clock() >= self._next_learn_s:
            # Registered on a node, nothing stored under it yet? Ask the nodes, at most once a second.
            self._next_learn_s = self._clock() + LEARN_INTERVAL_S
            self._learn_namespaces()
            if request.namespace_id not in self.cluster.namespaces:
                raise UnknownNamespaceError(
                    f"request {request.request_id!r}: namespace {request.namespace_id.hex()} "
                    "is not registered on any node"
                )
        now = self._clock()
        with self._lock:
            decision = self.router.route(request, now)
            if decision.accepted:
                self._hot.observe(request, decision, now)
            self.routed += 1
            self.rejected += not decision.accepted
            for watcher in list(self._watchers):
                try:
                    watcher.put_nowait(decision)
                except queue.Full:  # too slow: dropped; its stream ends once it has read the backlog
                    self._watchers.remove(watcher)
        if self._on_decision is not None:
            self._on_decision(decision, now)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(explain(decision), extra={"request_id": decision.request_id, "policy": decision.policy})
        return decision

    def _learn_namespaces(self) -> None:
        """Ask every member which namespaces it has registered."""
        metadata = self._node_access.metadata
        for info in list(self.cluster.nodes.values()):
            try:
                with self._node_access.channel(info.grpc_address) as channel:
                    reply = pb_grpc.KVStoreStub(channel).Info(
                        pb.InfoRequest(), timeout=INFO_TIMEOUT_S, metadata=metadata
                    )
            except grpc.RpcError as error:
                log.warning("asking %s for its namespaces failed: %s", info.node_id, error)
                continue
            with self._lock:
                self.cluster.namespaces.update(NamespaceId(n.namespace_id) for n in reply.namespaces)

    def decisions(self, is_active: Callable[[], bool]) -> Iterator[Decision]:
        """Every decision from now on, while `is_active()`; ends when the conductor closes or the
        subscriber falls more than WATCH_QUEUE decisions behind."""
        watcher: queue.Queue[Decision | None] = queue.Queue(maxsize=WATCH_QUEUE)
        with self._lock:
            self._watchers.append(watcher)
        try:
            while is_active() and not self._stop.is_set():
                try:
                    decision = watcher.get(timeout=0.5)
                except queue.Empty:
                    with self._lock:
                        if watcher not in self._watchers:
                            return  # dropped for falling behind
                    continue
                if decision is None:
                    return
                yield decision
        finally:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)


def explain(decision: Decision) -> str:
    """One line saying where a request goes and why (or why not), for the log."""
    if not decision.accepted:
        return f"request {decision.request_id!r} rejected by {decision.policy}: {decision.rejected}"
    prefill, decode = decision.prefill, decision.decode
    if prefill is None or decode is None:
        return f"request {decision.request_id!r} accepted by {decision.policy} without a breakdown"
    fetched = f", {prefill.fetch_tokens} fetched from {prefill.fetch_from}" if prefill.fetch_from else ""
    return (
        f"request {decision.request_id!r} -> prefill {prefill.node_id} (TTFT {prefill.ttft_s:.4f} s = queue "
        f"{prefill.queue_s:.4f} + load {prefill.load_s:.4f} + fetch {prefill.fetch_s:.4f} + prefill "
        f"{prefill.prefill_s:.4f}; {prefill.reused_tokens} tokens reused, {prefill.local_tokens} local{fetched}), "
        f"decode {decode.node_id} (TBT {decode.tbt_s:.4f} s, {decode.free_kv_tokens} KV tokens free after)"
    )
