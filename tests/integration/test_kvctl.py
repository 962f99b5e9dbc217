"""`kvctl` end to end against real `kvstore serve` daemons: blocks are written with the client
SDK, then every command's output (text and `--json`) and exit code is checked exactly, in
process through `kvctl.main.main` and once through the installed console script.

Daemons: `node` (read-only tests; a 16-block DRAM tier, so the first prompt's tail is demoted
to NVMe), `secured` (token required; tests that change blocks, each in its own namespace), and
one each for the drain test (a drained node takes no more writes) and the TLS test.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvstore.client import Client, EngineLoad, Transport
from kvstore.errors import NodeDrainingError
from kvstore.hashing import block_keys, checksum
from kvstore.kvctl import top
from kvstore.kvctl.main import main
from kvstore.node.node import VERSION
from kvstore.types import BlockKey, Namespace, NamespaceId
from tests import factories
from tests.nodes import TOKEN, Daemon, daemon

NUM_BLOCKS = 12  # per prompt
MISSING_KEY = "00" * 16


@dataclass
class Run:
    exit_code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def kvctl(capsys: pytest.CaptureFixture[str], address: str, *args: str, token: str | None = None) -> Run:
    environ = {"KVSTORE_AUTH_TOKEN": token} if token else {}
    exit_code = main(["--node", address, *args], environ=environ)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return Run(exit_code, captured.out, captured.err)


def prompt(num_blocks: int, seed: int) -> np.ndarray:
    """The token ids behind `factories.chain(namespace_id, num_blocks, seed)`."""
    return np.random.default_rng(seed).integers(0, 50000, num_blocks * factories.BLOCK_TOKENS, dtype=np.uint32)


def ids(tokens: np.ndarray) -> str:
    return ",".join(str(token) for token in tokens.tolist())


@dataclass
class Written:
    """The `node` daemon and what the fixture wrote to it."""

    daemon: Daemon
    namespace: Namespace
    first: list[BlockKey]  # keys 0-3 in DRAM, 4-11 demoted to NVMe by `second`
    second: list[BlockKey]  # all in DRAM
    first_payloads: list[np.ndarray]

    @property
    def address(self) -> str:
        return self.daemon.grpc_address


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Written]:
    with daemon(tmp_path_factory.mktemp("kvctl-node"), dram_kib=128) as process:
        namespace = factories.namespace()
        with Client(process.grpc_address) as client:
            namespace_id = client.register_namespace(namespace)
            first, second = (
                factories.chain(namespace_id, NUM_BLOCKS, seed=1),
                factories.chain(namespace_id, NUM_BLOCKS, seed=2),
            )
            assert first == block_keys(namespace_id, prompt(NUM_BLOCKS, seed=1), factories.BLOCK_TOKENS)
            first_payloads = factories.payloads(namespace, NUM_BLOCKS, seed=1)
            client.put_blocks(namespace_id, first, first_payloads)
            client.put_blocks(namespace_id, second, factories.payloads(namespace, NUM_BLOCKS, seed=2))
        yield Written(process, namespace, first, second, first_payloads)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with daemon(tmp_path_factory.mktemp("kvctl-secured"), token=TOKEN) as process:
        yield process


def write_chain(address: str, model_id: str, num_blocks: int, seed: int = 0) -> tuple[NamespaceId, list[BlockKey]]:
    """A chain of `num_blocks` in a namespace of its own, on a node that wants TOKEN."""
    namespace = factories.namespace(model_id)
    with Client(address, token=TOKEN) as client:
        namespace_id = client.register_namespace(namespace)
        keys = factories.chain(namespace_id, num_blocks, seed)
        client.put_blocks(namespace_id, keys, factories.payloads(namespace, num_blocks, seed))
    return namespace_id, keys


# -- status, tiers, top --------------------------------------------------------------------------


def test_status_json_reports_the_blocks_tiers_and_namespace(capsys, node):
    run = kvctl(capsys, node.address, "--json", "status")
    assert run.exit_code == 0, run.err
    status = run.json()
    assert (status["version"], status["grpc_address"], status["is_draining"]) == (VERSION, node.address, False)
    assert status["data_address"] == node.daemon.data_address
    assert status["segment_name"] == node.daemon.segment
    assert (status["num_blocks"], status["num_leases"], status["num_reservations"]) == (24, 0, 0)
    [namespace] = status["namespaces"]
    assert namespace["id"] == node.namespace.namespace_id.hex()
    assert (namespace["model_id"], namespace["block_tokens"], namespace["block_bytes"]) == ("tiny", 4, 8192)
    dram, nvme = status["tiers"]
    assert dram == {
        "tier": "dram",
        "capacity_bytes": 128 * 1024,
        "used_bytes": 128 * 1024,
        "num_blocks": 16,
        "hits": 0,
        "evictions": 8,
        "demotions_in": 0,
        "promotions_in": 0,
        "checksum_failures": 0,
    }
    assert (nvme["tier"], nvme["used_bytes"], nvme["num_blocks"], nvme["demotions_in"]) == ("nvme", 64 * 1024, 8, 8)


def test_status_text_names_the_node_and_its_namespace(capsys, node):
    run = kvctl(capsys, node.address, "status")
    assert run.exit_code == 0
    lines = run.out.splitlines()
    assert f"grpc:          {node.address}" in lines
    assert "blocks:        24 (0 not checksummed yet)" in lines
    assert "draining:      no" in lines
    assert lines[-1].split() == [node.namespace.namespace_id.hex()[:12], "tiny", "float16", "4", "8.0", "KiB", "0/1"]


def test_status_shows_the_load_the_engines_report_for_the_conductor(capsys, node):
    quiet = kvctl(capsys, node.address, "status").out.splitlines()
    assert "load:          no engine reports its load (the conductor keeps its own account of its placements)" in quiet
    with Client(node.address) as client:
        client.report_load("decode-0", EngineLoad(running_decodes=3, decode_kv_tokens=900, decode_pause_budget_s=2.5))
        client.report_load("prefill-0", EngineLoad(queued_prefill_tokens=4000))
    lines = kvctl(capsys, node.address, "status").out.splitlines()
    expected = "2 engines: 4000 prompt tokens queued, 3 decoding (900 KV tokens), decode pause budget none"
    assert f"load:          {expected}" in lines  # prefill-0 knows no budget, so the node reports none
    status = kvctl(capsys, node.address, "--json", "status").json()
    assert status["reporting_engines"] == 2
    assert status["load"] == {
        "queued_prefill_tokens": 4000,
        "running_decodes": 3,
        "decode_kv_tokens": 900,
        "decode_pause_budget_s": 0.0,
    }


def test_tiers_table(capsys, node):
    run = kvctl(capsys, node.address, "tiers")
    assert run.exit_code == 0
    assert run.out.splitlines() == [
        "TIER   CAPACITY       USED    FULL  BLOCKS  HITS  EVICTIONS  DEMOTED IN  PROMOTED IN  BAD SUMS",
        "DRAM  128.0 KiB  128.0 KiB  100.0%      16     0          8           0            0         0",
        "NVMe    2.0 MiB   64.0 KiB    3.1%       8     0          0           8            0         0",
    ]
    assert [tier["num_blocks"] for tier in kvctl(capsys, node.address, "tiers", "--json").json()["tiers"]] == [16, 8]


def test_top_draws_the_tiers_then_rates(capsys, node):
    run = kvctl(capsys, node.address, "top", "--iterations", "2", "--interval", "0.1")
    assert run.exit_code == 0
    frames = run.out.split("kvctl top - node ")[1:]
    assert len(frames) == 2
    for frame in frames:
        assert "DRAM  [##############################]  100.0%" in frame
        assert "NVMe  [#.............................]    3.1%" in frame
    assert "lookups/s -  hits/s -  evictions/s -" in frames[0]
    assert "lookups/s 0.0  hits/s 0.0  evictions/s 0.0  lookup hit ratio -" in frames[1]


def test_top_rates_come_from_the_counters_between_refreshes(node):
    """A clock that moves only when top sleeps, and three lookups of 12 cached blocks while it does
    (over TCP: a same-host client answers Lookups itself and tells the node within a second)."""
    now = [100.0]
    with Client(node.address, transport=Transport.TCP) as client:

        def sleep(seconds: float) -> None:
            for _ in range(3):
                client.lookup(node.namespace.namespace_id, node.first)
            now[0] += seconds

        out = io.StringIO()
        code = top.run(client, out, interval_s=2.0, iterations=2, as_json=True, clock=lambda: now[0], sleep=sleep)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert code == 0
    assert first["rates"] is None
    assert (second["at_s"] - first["at_s"], second["rates"]["lookups_per_s"]) == (2.0, 1.5)
    assert (second["rates"]["lookup_hit_ratio"], second["rates"]["evictions_per_s"]) == (1.0, 0.0)
    assert second["status"]["lookups"] - first["status"]["lookups"] == 3


# -- lookup --------------------------------------------------------------------------------------


def test_lookup_of_a_whole_prompt_counts_its_tiers(capsys, node):
    before = kvctl(capsys, node.address, "--json", "status").json()
    run = kvctl(capsys, node.address, "lookup", "--tokens", ids(prompt(NUM_BLOCKS, seed=1)))
    after = kvctl(capsys, node.address, "--json", "status").json()
    assert run.exit_code == 0, run.err
    assert run.out == "12 of 12 blocks cached (48 of 48 tokens): 4 DRAM, 8 NVMe; no miss\n"
    assert after["lookups"] - before["lookups"] == 1
    assert after["lookup_hit_blocks"] - before["lookup_hit_blocks"] == 12


def test_lookup_of_a_partial_prefix_names_the_first_miss(capsys, node, tmp_path):
    tokens = np.concatenate([prompt(8, seed=1), prompt(4, seed=99), [7, 7]])
    run = kvctl(capsys, node.address, "lookup", "--tokens", ids(tokens), "--verbose")
    assert run.exit_code == 0, run.err
    lines = run.out.splitlines()
    assert lines[:2] == [
        "8 of 12 blocks cached (32 of 50 tokens): 4 DRAM, 4 NVMe; first miss at block 8",
        "(2 trailing tokens not in a full 4-token block)",
    ]
    rows = [line.split() for line in lines[4:]]
    assert [row[3] for row in rows] == ["DRAM"] * 4 + ["NVMe"] * 4 + ["miss"] + ["-"] * 3
    assert [row[2] for row in rows[:8]] == [key.hex() for key in node.first[:8]]

    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text(" ".join(str(token) for token in tokens.tolist()).replace(" ", "\n", 5))
    document = kvctl(capsys, node.address, "--json", "lookup", "--tokens-file", str(tokens_file)).json()
    assert (document["num_hits"], document["num_blocks"], document["first_miss"]) == (8, 12, 8)
    assert document["tiers"] == {"dram": 4, "nvme": 4}
    assert [block["tier"] for block in document["blocks"]] == ["dram"] * 4 + ["nvme"] * 4 + [None] * 4


def test_lookup_rejects_a_malformed_token_list(capsys, node):
    run = kvctl(capsys, node.address, "lookup", "--tokens", "1,2,x")
    assert (run.exit_code, run.err) == (2, "kvctl: error: --tokens: token 2 is 'x', not an integer\n")
    assert kvctl(capsys, node.address, "lookup", "--tokens", "1,-2").exit_code == 2


# -- ls and inspect ------------------------------------------------------------------------------


def test_ls_lists_every_block_and_filters_by_tier(capsys, node):
    run = kvctl(capsys, node.address, "ls")
    assert run.exit_code == 0
    assert run.out.splitlines()[-1] == "24 blocks"
    assert len(run.out.splitlines()) == 1 + 24 + 1

    listed = kvctl(capsys, node.address, "--json", "ls").json()
    assert {block["key"] for block in listed["blocks"]} == {key.hex() for key in node.first + node.second}
    on_nvme = kvctl(capsys, node.address, "ls", "--tier", "nvme", "--json").json()["blocks"]
    assert {block["key"] for block in on_nvme} == {key.hex() for key in node.first[4:]}
    assert kvctl(capsys, node.address, "ls", "--tier", "hbm").out == "0 blocks\n"

    limited = kvctl(capsys, node.address, "ls", "--limit", "5", "--namespace", node.namespace.namespace_id.hex()[:6])
    assert limited.out.splitlines()[-1] == "5 blocks (the first 5; there are more)"
    assert limited.out.splitlines()[0].split() == ["KEY", "PARENT", "NAMESPACE", "TIERS", "SIZE", "LEASES", "PINNED"]


def test_inspect_shows_every_field_and_exits_1_for_a_missing_key(capsys, node):
    key, parent = node.first[5], node.first[4]
    run = kvctl(capsys, node.address, "inspect", key.hex())
    assert run.exit_code == 0
    assert run.out.splitlines() == [
        f"block {key.hex()}",
        f"  key:       {key.hex()}",
        f"  namespace: {node.namespace.namespace_id.hex()}",
        f"  parent:    {parent.hex()}",
        "  tiers:     NVMe",
        "  size:      8192 B",
        f"  checksum:  {checksum(node.first_payloads[5]):016x}",
        "  leases:    0",
        "  pinned:    no",
    ]

    run = kvctl(capsys, node.address, "--json", "inspect", node.first[0].hex(), MISSING_KEY)
    assert run.exit_code == 1
    document = run.json()
    assert document["missing"] == [MISSING_KEY]
    [block] = document["blocks"]
    assert (block["key"], block["parent"], block["tiers"], block["size_bytes"]) == (
        node.first[0].hex(),
        None,
        ["dram"],
        8192,
    )
    assert (block["num_leases"], block["is_pinned"]) == (0, False)
    assert kvctl(capsys, node.address, "inspect", MISSING_KEY).out == f"{MISSING_KEY}: not stored\n"


@pytest.mark.parametrize("bad_key", ["xyz", "ab" * 15 + "a", "g" * 32, "ab" * 17])
def test_a_malformed_key_is_a_usage_error_before_any_call(capsys, bad_key):
    run = kvctl(capsys, "127.0.0.1:1", "inspect", bad_key)  # nothing listens there: input is checked first
    assert run.exit_code == 2
    assert run.err == (
        f"kvctl: error: {bad_key!r} is not a block key: a key is 32 hex digits (16 bytes), "
        "as `kvctl ls` prints with --json\n"
    )


# -- evict, pin, unpin (each in its own namespace on the secured node) ---------------------------


def test_evict_then_lookup_finds_fewer_blocks(capsys, secured):
    namespace_id, keys = write_chain(secured.grpc_address, "evict-model", 6, seed=3)
    tokens, selector = ids(prompt(6, seed=3)), namespace_id.hex()[:10]
    address = secured.grpc_address
    run = kvctl(capsys, address, "lookup", "--namespace", selector, "--tokens", tokens, token=TOKEN)
    assert run.out == "6 of 6 blocks cached (24 of 24 tokens): 6 DRAM; no miss\n"

    run = kvctl(
        capsys, address, "evict", keys[3].hex(), keys[5].hex(), MISSING_KEY, "--namespace", selector, token=TOKEN
    )
    assert run.exit_code == 0, run.err
    assert run.out == (
        "removed 2 of 3 blocks; 0 busy (leased by a reader, kept); "
        f"1 not stored in namespace {namespace_id.hex()[:12]}\n"
    )
    run = kvctl(capsys, address, "lookup", "--namespace", selector, "--tokens", tokens, token=TOKEN)
    assert run.out == "3 of 6 blocks cached (12 of 24 tokens): 3 DRAM; first miss at block 3\n"
    assert kvctl(capsys, address, "inspect", keys[5].hex(), token=TOKEN).exit_code == 1


def test_pin_and_unpin_count_the_stored_blocks(capsys, secured):
    namespace_id, keys = write_chain(secured.grpc_address, "pin-model", 3, seed=4)
    address, selector = secured.grpc_address, namespace_id.hex()
    arguments = [key.hex() for key in keys] + [MISSING_KEY, "--namespace", selector]
    run = kvctl(capsys, address, "pin", *arguments, token=TOKEN)
    assert run.out == f"pinned 3 of 4 blocks; 1 not stored in namespace {selector[:12]}\n"
    listed = kvctl(capsys, address, "--json", "ls", "--namespace", selector, token=TOKEN).json()["blocks"]
    assert [block["is_pinned"] for block in listed] == [True, True, True]

    document = kvctl(capsys, address, "--json", "unpin", keys[0].hex(), "--namespace", selector, token=TOKEN).json()
    assert (document["num_requested"], document["num_changed"], document["pinned"]) == (1, 1, False)
    listed = kvctl(capsys, address, "--json", "inspect", *[key.hex() for key in keys], token=TOKEN).json()["blocks"]
    assert [block["is_pinned"] for block in listed] == [False, True, True]


def test_several_namespaces_need_the_namespace_flag(capsys, secured):
    write_chain(secured.grpc_address, "first-of-two", 1)
    write_chain(secured.grpc_address, "second-of-two", 1)
    run = kvctl(capsys, secured.grpc_address, "lookup", "--tokens", "1,2,3,4", token=TOKEN)
    assert run.exit_code == 2
    assert "namespaces are registered: pick one with --namespace" in run.err
    unknown = factories.namespace("never-registered").namespace_id.hex()
    run = kvctl(capsys, secured.grpc_address, "lookup", "--namespace", unknown, "--tokens", "1,2,3,4", token=TOKEN)
    assert run.exit_code == 1
    assert run.err.startswith(f"kvctl: error: no registered namespace id starts with {unknown}")


def test_lookup_of_text_through_a_tokenizer(capsys, secured, tmp_path):
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    try:
        from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415 (optional package)
    except ImportError:
        run = kvctl(capsys, secured.grpc_address, "lookup", "--text", " ".join(words), "--tokenizer", str(tmp_path))
        assert run.exit_code == 1
        assert "pip install tokenizers" in run.err
        return
    vocabulary = {"[UNK]": 0, **{word: index + 1 for index, word in enumerate(dict.fromkeys(words))}}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    namespace = factories.namespace("text-model")
    with Client(secured.grpc_address, token=TOKEN) as client:
        namespace_id = client.register_namespace(namespace)
        keys = block_keys(namespace_id, [vocabulary[word] for word in words], factories.BLOCK_TOKENS)
        client.put_blocks(namespace_id, keys, factories.payloads(namespace, len(keys)))
    text = " ".join(words)
    arguments = ["lookup", "--namespace", namespace_id.hex(), "--text", text, "--tokenizer", str(tmp_path)]
    run = kvctl(capsys, secured.grpc_address, *arguments, token=TOKEN)
    assert run.exit_code == 0, run.err
    assert run.out == (
        "2 of 2 blocks cached (8 of 9 tokens): 2 DRAM; no miss\n(1 trailing token not in a full 4-token block)\n"
    )


# -- connection failures and the console script ------------------------------------------------


def test_a_wrong_or_missing_token_exits_1_naming_the_token(capsys, secured):
    run = kvctl(capsys, secured.grpc_address, "status", token="not-the-token")
    assert run.exit_code == 1
    assert run.err.startswith(f"kvctl: error: node {secured.grpc_address} refused the call: ")
    assert "token" in run.err
    run = kvctl(capsys, secured.grpc_address, "status")
    assert run.exit_code == 1
    assert run.err.rstrip().endswith("pass --token or set KVSTORE_AUTH_TOKEN")
    assert kvctl(capsys, secured.grpc_address, "status", "--token", TOKEN).exit_code == 0


def test_an_unreachable_node_exits_1(capsys):
    run = kvctl(capsys, "127.0.0.1:1", "--timeout", "2", "status")
    assert run.exit_code == 1
    assert run.err.startswith("kvctl: error: cannot reach node 127.0.0.1:1: ")


def test_tls_with_the_nodes_certificate_as_ca(capsys, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    with daemon(tmp_path / "node", auth__tls_cert_file=cert, auth__tls_key_file=key) as process:
        run = kvctl(capsys, process.grpc_address, "--tls-ca", str(cert), "--json", "tiers")
        assert run.exit_code == 0, run.err
        assert [tier["tier"] for tier in run.json()["tiers"]] == ["dram", "nvme"]
        run = kvctl(capsys, process.grpc_address, "--timeout", "2", "tiers")  # plaintext to a TLS port
        assert run.exit_code == 1
        assert run.err.startswith(f"kvctl: error: cannot reach node {process.grpc_address}: ")
    run = kvctl(capsys, "127.0.0.1:1", "--tls-ca", str(tmp_path / "absent.pem"), "tiers")
    assert run.exit_code == 2
    assert run.err.startswith(f"kvctl: error: cannot read --tls-ca {tmp_path / 'absent.pem'}: ")


def test_the_console_script(secured):
    script = shutil.which("kvctl", path=str(Path(sys.executable).parent))
    assert script is not None, "the kvctl console script is not installed: pip install -e . (as `make` does)"
    environment = {"KVSTORE_AUTH_TOKEN": TOKEN, "KVCTL_NODE": secured.grpc_address, "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([script, *args], check=False, capture_output=True, text=True, env=environment, timeout=60)

    done = run("status", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["grpc_address"] == secured.grpc_address
    done = run("inspect", "not-a-key")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("kvctl: error: 'not-a-key' is not a block key")
    done = run("--token", "wrong", "tiers")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "token" in done.stderr


# -- drain ---------------------------------------------------------------------------------------


def test_drain_flushes_to_nvme_and_refuses_further_writes(capsys, tmp_path):
    with daemon(tmp_path) as process:
        namespace = factories.namespace()
        with Client(process.grpc_address) as client:
            namespace_id = client.register_namespace(namespace)
            client.put_blocks(namespace_id, factories.chain(namespace_id, 3), factories.payloads(namespace, 3))
            run = kvctl(capsys, process.grpc_address, "drain")
            assert run.exit_code == 0, run.err
            assert run.out == (
                f"node {client.node_id} is draining: it refuses new reads and writes; "
                "flushed 3 memory-only blocks to NVMe\n"
            )
            status = kvctl(capsys, process.grpc_address, "--json", "status").json()
            assert status["is_draining"] is True
            assert [tier["num_blocks"] for tier in status["tiers"]] == [3, 3]
            more = factories.chain(namespace_id, 2, seed=5)
            with pytest.raises(NodeDrainingError):
                client.put_blocks(namespace_id, more, factories.payloads(namespace, 2))
