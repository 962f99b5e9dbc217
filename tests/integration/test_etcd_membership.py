"""EtcdMembership against a real etcd (tests/etcd.py): what it writes there, its leases, several
endpoints, a frozen etcd, concurrent callers. The behaviour both memberships share is the
contract test in tests/integration/test_membership.py."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from etcd3gw.client import Etcd3Client

from conductor.membership import MembershipUnavailableError
from conductor.membership_etcd import EtcdMembership
from conductor.types import NodeInfo, Role
from kvstore.errors import InvalidArgumentError
from tests.etcd import EtcdProcess, free_port

NODE = NodeInfo("node-a", Role.PREFILL, "127.0.0.1:1", "127.0.0.1:2", "h100-llama", 1234)
KEY = "/kvstore/conductor/nodes/node-a"


def lease_of(client: Etcd3Client, key: str) -> int:
    records = client.get(key, metadata=True)
    return int(records[0][1].get("lease", 0)) if records else 0


def lease_ttls(client: Etcd3Client, lease_id: int) -> tuple[int, int]:
    """(seconds left, truncated; -1 once gone), (seconds granted)."""
    answer = client.post(client.get_url("/kv/lease/timetolive"), json={"ID": lease_id})
    return int(answer["TTL"]), int(answer.get("grantedTTL", 0))


def fields(node_id: str) -> dict[str, object]:
    return {"node_id": node_id, "role": "decode", "grpc_address": "", "data_address": "", "profile": "default",
            "kv_capacity_tokens": 0}  # fmt: skip


def test_the_record_is_the_nodes_json_on_a_lease_of_its_ttl_rounded_up(etcd: EtcdProcess) -> None:
    membership, client = EtcdMembership(etcd.endpoint), etcd.client()
    membership.register(NODE, 2.5)
    assert json.loads(client.get(KEY)[0]) == {
        "node_id": "node-a",
        "role": "prefill",
        "grpc_address": "127.0.0.1:1",
        "data_address": "127.0.0.1:2",
        "profile": "h100-llama",
        "kv_capacity_tokens": 1234,
    }
    assert lease_ttls(client, lease_of(client, KEY))[1] == 3
    membership.close()


def test_reregistering_moves_the_record_to_a_new_lease_and_revokes_the_old(etcd: EtcdProcess) -> None:
    membership, client = EtcdMembership(etcd.endpoint), etcd.client()
    membership.register(NODE, 5.0)
    first = lease_of(client, KEY)
    membership.register(NODE, 10.0)
    second = lease_of(client, KEY)
    assert second not in (0, first)
    assert lease_ttls(client, first)[0] == -1
    assert lease_ttls(client, second)[1] == 10
    membership.close()


def test_remove_revokes_the_lease_and_deletes_a_record_without_one(etcd: EtcdProcess) -> None:
    membership, client = EtcdMembership(etcd.endpoint), etcd.client()
    membership.register(NODE, 5.0)
    lease = lease_of(client, KEY)
    membership.remove("node-a")
    assert client.get(KEY) == [] and lease_ttls(client, lease)[0] == -1
    client.put("/kvstore/conductor/nodes/by-hand", json.dumps(fields("by-hand")))  # no lease
    assert "by-hand" in membership.live()
    membership.remove("by-hand")
    assert membership.live() == {}
    membership.close()


def test_a_restarted_conductor_extends_a_lease_it_did_not_grant(etcd: EtcdProcess) -> None:
    first = EtcdMembership(etcd.endpoint)
    first.register(NODE, 3.0)
    first.close()
    restarted, client = EtcdMembership(etcd.endpoint), etcd.client()
    lease = lease_of(client, KEY)
    time.sleep(1.1)
    left_before = lease_ttls(client, lease)[0]
    assert restarted.renew("node-a")
    left_after = lease_ttls(client, lease)[0]
    assert left_before <= 1 < left_after  # 3 s granted: under 2 s left before the renewal, over 2 s after
    assert restarted.live() == {"node-a": NODE}
    restarted.close()


def test_a_bad_registration_changes_nothing_in_etcd(etcd: EtcdProcess) -> None:
    membership, client = EtcdMembership(etcd.endpoint), etcd.client()
    membership.register(NODE, 5.0)
    before = client.get(KEY, metadata=True)
    for node, ttl_s in [(NodeInfo("node-a", Role.DECODE), 0.5), (NodeInfo("node-a", Role.DECODE), 4000.0)]:
        with pytest.raises(InvalidArgumentError, match="ttl_s"):
            membership.register(node, ttl_s)
    with pytest.raises(InvalidArgumentError, match="node_id"):
        membership.register(NodeInfo("node-a/x", Role.DECODE), 5.0)
    assert client.get(KEY, metadata=True) == before  # same value, same lease, same revision
    assert client.get_prefix("/kvstore/conductor/") == before
    membership.close()


def test_malformed_records_are_skipped_and_logged_with_their_keys(
    etcd: EtcdProcess, caplog: pytest.LogCaptureFixture
) -> None:
    membership, client = EtcdMembership(etcd.endpoint, prefix="/test"), etcd.client()
    membership.register(NODE, 5.0)
    malformed: dict[str, str | bytes] = {
        "not-json": "{not json",
        "not-utf8": b"\xff\xfe",
        "a-list": "[]",
        "missing-field": json.dumps({k: v for k, v in fields("missing-field").items() if k != "profile"}),
        "bad-role": json.dumps({**fields("bad-role"), "role": "conductor"}),
        "bad-capacity": json.dumps({**fields("bad-capacity"), "kv_capacity_tokens": "lots"}),
        "impostor": json.dumps(fields("node-a")),  # a whole record, under another node's key
    }
    for name, value in malformed.items():
        client.put(f"/test/nodes/{name}", value)
    with caplog.at_level(logging.WARNING, logger="conductor.membership_etcd"):
        assert membership.live() == {"node-a": NODE}
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for name in malformed:
        assert f"/test/nodes/{name}" in logged
    membership.close()


def test_prefixes_keep_clusters_apart(etcd: EtcdProcess) -> None:
    one = EtcdMembership(etcd.endpoint, prefix="/kvstore/one")
    other = EtcdMembership(etcd.endpoint, prefix="/kvstore/one-more")  # the first's prefix plus more
    one.register(NODE, 5.0)
    assert other.live() == {} and not other.renew("node-a")
    other.remove("node-a")
    assert one.live() == {"node-a": NODE}
    one.close()
    other.close()


def test_a_later_endpoint_answers_when_the_first_is_down(etcd: EtcdProcess) -> None:
    down = f"127.0.0.1:{free_port()}"
    membership = EtcdMembership([down, etcd.endpoint], timeout_s=1.0)
    membership.register(NODE, 5.0)
    assert membership.renew("node-a")
    assert membership.live() == {"node-a": NODE}
    membership.close()


def test_no_endpoint_answering_names_every_endpoint(etcd: EtcdProcess) -> None:
    down = f"127.0.0.1:{free_port()}"
    membership = EtcdMembership([down, etcd.endpoint], timeout_s=1.0)
    membership.register(NODE, 5.0)
    etcd.stop()
    with pytest.raises(MembershipUnavailableError, match="registering node-a") as raised:
        membership.register(NODE, 5.0)
    assert down in str(raised.value) and etcd.endpoint in str(raised.value)
    assert "ConnectionFailedError" in str(raised.value)


def test_a_frozen_etcd_times_out_naming_its_endpoint_and_is_used_again_once_it_answers(etcd: EtcdProcess) -> None:
    membership = EtcdMembership(etcd.endpoint, timeout_s=0.5)
    membership.register(NODE, 10.0)
    etcd.pause()
    try:
        started = time.monotonic()
        with pytest.raises(MembershipUnavailableError, match="ConnectionTimeoutError") as raised:
            membership.live()
        assert 0.5 <= time.monotonic() - started < 2.0
        assert etcd.endpoint in str(raised.value)
    finally:
        etcd.resume()
    assert membership.live() == {"node-a": NODE}
    membership.close()


def test_concurrent_callers(etcd: EtcdProcess) -> None:
    membership = EtcdMembership(etcd.endpoint)
    nodes = [NodeInfo(f"node-{i}", Role.DECODE, f"127.0.0.1:{i + 1}", "", "default", i) for i in range(8)]
    renewed: list[bool] = []
    errors: list[BaseException] = []

    def heartbeat(node: NodeInfo) -> None:
        try:
            membership.register(node, 5.0)
            for _ in range(5):
                renewed.append(membership.renew(node.node_id))
                assert node.node_id in membership.live()
        except BaseException as error:  # reported below, in the test's own thread
            errors.append(error)

    threads = [threading.Thread(target=heartbeat, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert renewed == [True] * 40
    assert membership.live() == {node.node_id: node for node in nodes}
    membership.close()
