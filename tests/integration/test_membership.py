"""Membership, the same behaviour from both implementations: in memory (with an injected
clock) and in a real etcd (with real time and short leases)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import pytest

from conductor.membership import InMemoryMembership, Membership, MembershipUnavailableError
from conductor.membership_etcd import EtcdMembership
from conductor.types import NodeInfo, Role
from kvstore.errors import InvalidArgumentError
from tests.etcd import EtcdProcess

NODE = NodeInfo("node-a", Role.PREFILL, "127.0.0.1:1", "127.0.0.1:2", "default", 1234)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Subject:
    """A membership and a way to let time pass for it."""

    def __init__(self, membership: Membership, wait: Callable[[float], None]) -> None:
        self.membership = membership
        self.wait = wait


@pytest.fixture(params=["memory", "etcd"])
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    if request.param == "memory":
        clock = Clock()

        def advance(seconds: float) -> None:
            clock.now += seconds

        yield Subject(InMemoryMembership(clock), advance)
    else:
        server: EtcdProcess = request.getfixturevalue("etcd")
        membership = EtcdMembership(server.endpoint, timeout_s=2.0)
        yield Subject(membership, time.sleep)
        membership.close()


def test_a_registered_node_is_live_with_every_field(subject: Subject) -> None:
    subject.membership.register(NODE, 2.0)
    assert subject.membership.live() == {"node-a": NODE}


def test_renewal_keeps_a_node_and_silence_lets_it_lapse(subject: Subject) -> None:
    m = subject.membership
    m.register(NODE, 2.0)
    for _ in range(3):
        subject.wait(1.0)
        assert m.renew("node-a")
    assert "node-a" in m.live()
    subject.wait(3.5)  # past its ttl without a renewal (etcd may keep a lease up to ~1 s longer)
    assert m.live() == {}
    assert not m.renew("node-a")  # it must register again


def test_remove_and_reregister(subject: Subject) -> None:
    m = subject.membership
    m.register(NODE, 5.0)
    m.remove("node-a")
    assert m.live() == {} and not m.renew("node-a")
    m.remove("node-a")  # unknown: ignored
    moved = NodeInfo("node-a", Role.DECODE, "127.0.0.1:3", "127.0.0.1:4", "default", 99)
    m.register(NODE, 5.0)
    m.register(moved, 5.0)
    assert m.live() == {"node-a": moved}


def test_bad_ttl_is_refused_and_changes_nothing(subject: Subject) -> None:
    for ttl in (0.0, 0.5, 7200.0):
        with pytest.raises(InvalidArgumentError, match="ttl_s"):
            subject.membership.register(NODE, ttl)
    assert subject.membership.live() == {}


def test_a_restarted_conductor_sees_and_renews_leases_it_did_not_grant(etcd: EtcdProcess) -> None:
    first = EtcdMembership(etcd.endpoint, timeout_s=2.0)
    first.register(NODE, 2.0)
    first.close()
    second = EtcdMembership(etcd.endpoint, timeout_s=2.0)
    assert second.live() == {"node-a": NODE}
    time.sleep(1.2)
    assert second.renew("node-a")
    time.sleep(1.2)
    assert "node-a" in second.live()  # 2.4 s after registering: the renewal held it
    second.close()


def test_a_malformed_record_is_skipped(etcd: EtcdProcess) -> None:
    membership = EtcdMembership(etcd.endpoint, prefix="/test", timeout_s=2.0)
    membership.register(NODE, 5.0)
    etcd.client().put("/test/nodes/broken", "{not json")  # another writer's mistake
    etcd.client().put("/test/nodes/liar", json.dumps({**json.loads('{"node_id": "other"}')}))
    assert membership.live() == {"node-a": NODE}
    membership.close()


def test_bad_arguments_name_what_is_wrong() -> None:
    with pytest.raises(InvalidArgumentError, match="host:port"):
        EtcdMembership("")
    with pytest.raises(InvalidArgumentError, match="prefix"):
        EtcdMembership("127.0.0.1:2379", prefix="no-slash")
    with pytest.raises(InvalidArgumentError, match="timeout_s"):
        EtcdMembership("127.0.0.1:2379", timeout_s=0)


def test_an_unreachable_etcd_is_reported_with_its_endpoint(etcd: EtcdProcess) -> None:
    membership = EtcdMembership(etcd.endpoint, timeout_s=1.0)
    membership.register(NODE, 5.0)
    etcd.stop()
    started = time.monotonic()
    with pytest.raises(MembershipUnavailableError, match=etcd.endpoint):
        membership.live()
    assert time.monotonic() - started < 5
    with pytest.raises(MembershipUnavailableError, match="renewing node-a"):
        membership.renew("node-a")
