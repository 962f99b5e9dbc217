"""EtcdMembership's argument checks, which run before any request (no etcd here: its endpoint
is a closed port, so a check that came after a request would fail differently)."""

from __future__ import annotations

import math

import pytest

from conductor.membership_etcd import EtcdMembership
from conductor.types import NodeInfo, Role
from kvstore.errors import InvalidArgumentError

CLOSED = "127.0.0.1:1"


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        ("127.0.0.1:2379", ("127.0.0.1:2379",)),
        ("http://etcd-0.etcd:2379", ("etcd-0.etcd:2379",)),
        ("[::1]:2379", ("[::1]:2379",)),
        (["10.0.0.1:2379", "10.0.0.2:2379"], ("10.0.0.1:2379", "10.0.0.2:2379")),
    ],
)
def test_endpoints_are_host_and_port(endpoints: str | list[str], expected: tuple[str, ...]) -> None:
    assert EtcdMembership(endpoints).endpoints == expected


@pytest.mark.parametrize(
    "endpoint",
    ["", "etcd", "etcd:", "etcd:0", "etcd:65536", "etcd:port", "https://etcd:2379", "etcd:2379/v3", "etcd :2379",
     "user@etcd:2379", "[::1:2379"],
)  # fmt: skip
def test_a_bad_endpoint_is_named(endpoint: str) -> None:
    with pytest.raises(InvalidArgumentError, match="etcd endpoint must be host:port") as raised:
        EtcdMembership(endpoint)
    assert repr(endpoint) in str(raised.value)
    with pytest.raises(InvalidArgumentError, match="etcd endpoint"):
        EtcdMembership(["127.0.0.1:2379", endpoint])  # every endpoint is checked, not only the first


def test_no_endpoint_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="at least one"):
        EtcdMembership([])


@pytest.mark.parametrize("prefix", ["", "kvstore", "/kvstore/", "/kv//store"])
def test_a_bad_prefix_is_named(prefix: str) -> None:
    with pytest.raises(InvalidArgumentError, match="etcd prefix") as raised:
        EtcdMembership(CLOSED, prefix=prefix)
    assert repr(prefix) in str(raised.value)


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, math.nan, math.inf])
def test_a_bad_timeout_is_named(timeout_s: float) -> None:
    with pytest.raises(InvalidArgumentError, match="timeout_s"):
        EtcdMembership(CLOSED, timeout_s=timeout_s)


@pytest.mark.parametrize(
    ("node", "ttl_s", "match"),
    [
        (NodeInfo("node-a", Role.DECODE), 0.5, "ttl_s"),
        (NodeInfo("node-a", Role.DECODE), 3601.0, "ttl_s"),
        (NodeInfo("", Role.DECODE), 5.0, "node_id"),
        (NodeInfo("a/b", Role.DECODE), 5.0, "node_id"),
    ],
)
def test_a_bad_registration_is_refused_before_any_request(node: NodeInfo, ttl_s: float, match: str) -> None:
    membership = EtcdMembership(CLOSED, timeout_s=0.5)
    with pytest.raises(InvalidArgumentError, match=match):
        membership.register(node, ttl_s)
    membership.close()
