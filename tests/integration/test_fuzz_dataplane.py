"""Fuzzing the TCP data plane of a real node: garbage, broken headers, frames before or instead
of HELLO, wrong tokens, malformed GET and PUT bodies, PUTs cut off or corrupted mid-payload, and
a fake peer that answers a `Fetch` with malformed replies. tests/fuzzing.py says what every case
checks."""

from __future__ import annotations

import functools
import socket
from dataclasses import dataclass

from hypothesis import event, given
from hypothesis import strategies as st

from kvstore.dataplane import protocol
from kvstore.dataplane.protocol import FrameType
from kvstore.hashing import checksum
from kvstore.proto import kvstore_pb2 as pb
from kvstore.types import KEY_BYTES
from tests import factories
from tests.fuzzing import (
    CHAIN_BLOCKS,
    DATA_LOSS,
    FAILED_PRECONDITION,
    FETCH_REJECTIONS,
    FUZZ,
    FUZZ_SLOW,
    GRPC,
    INVALID_ARGUMENT,
    MAX_KEYS,
    NOT_FOUND,
    PUT_ENTRY_BYTES,
    RANDOM_KEY,
    UINT64,
    UNAUTHENTICATED,
    FakePeer,
    Fuzzed,
    Target,
    assert_serves_everyone,
    assert_unchanged,
    call,
    connect,
    error_codes,
    expect_known_run,
    fingerprint,
    frame,
    frames_until_closed,
    half_close_quietly,
    header,
    numbered_keys,
    peer_replies,
    put_body,
    put_prefix,
    remove_after_reads,
    say_hello,
    send_quietly,
    servicer_failures,
)
from tests.nodes import TOKEN

# -- data plane: before HELLO -------------------------------------------------------------------


@dataclass(frozen=True)
class Preamble:
    raw: bytes
    codes: frozenset[int]  # the error codes the node may answer with (at most one ERROR frame)
    must_answer: bool


def wrong_tokens() -> st.SearchStrategy[bytes]:
    token = TOKEN.encode()
    return st.one_of(
        st.binary(max_size=64),
        st.just(token[:-1]),
        st.just(token + b"x"),
        st.integers(0, len(token) - 1).map(lambda i: token[:i] + bytes([token[i] ^ 1]) + token[i + 1 :]),
    ).filter(lambda candidate: candidate != token)


@st.composite
def preambles(draw: st.DrawFn) -> Preamble:
    hello = frame(FrameType.HELLO, TOKEN.encode())
    case = draw(st.sampled_from(["garbage", "truncated", "magic", "version", "type", "oversized", "early", "token"]))
    if case == "garbage":
        return Preamble(draw(st.binary(max_size=64)), frozenset({INVALID_ARGUMENT, UNAUTHENTICATED}), False)
    if case == "truncated":  # a header or token cut short, then EOF
        return Preamble(hello[: draw(st.integers(0, len(hello) - 1))], frozenset(), False)
    length = len(TOKEN)
    if case == "magic":
        magic = draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != protocol.MAGIC))
        raw = header(FrameType.HELLO, length, magic=magic)
    elif case == "version":
        raw = header(FrameType.HELLO, length, version=draw(st.integers(0, 255).filter(lambda v: v != 1)))
    elif case == "type":
        raw = header(draw(st.one_of(st.just(0), st.integers(len(FrameType) + 1, 255))), length)
    elif case == "oversized":
        raw = header(FrameType.HELLO, draw(st.integers(protocol.MAX_TOKEN_BYTES + 1, 2**32 - 1)))
    elif case == "early":  # a well-formed frame, but not HELLO
        kind = draw(st.sampled_from([kind for kind in FrameType if kind is not FrameType.HELLO]))
        raw = frame(kind, draw(st.binary(max_size=64)))
    else:
        return Preamble(frame(FrameType.HELLO, draw(wrong_tokens())), frozenset({UNAUTHENTICATED}), True)
    return Preamble(raw, frozenset({INVALID_ARGUMENT}), True)


@FUZZ_SLOW
@given(preamble=preambles(), half_close=st.booleans())
def test_data_plane_refuses_connections_that_do_not_say_hello(
    target: Target, preamble: Preamble, half_close: bool
) -> None:
    with Fuzzed(target), connect(target) as sock:
        send_quietly(sock, preamble.raw)
        if not half_close and preamble.must_answer:
            replies = [protocol.recv_frame(sock)]  # the node answers without waiting for EOF
            replies += frames_until_closed(sock)
        else:
            half_close_quietly(sock)
            replies = frames_until_closed(sock)
        codes = error_codes(replies)
        assert len(codes) == 1 if preamble.must_answer else len(codes) <= 1
        assert set(codes) <= preamble.codes


# -- data plane: after HELLO --------------------------------------------------------------------


@dataclass(frozen=True)
class Script:
    """One frame after HELLO and what the node must do with it: `framing` errors get one ERROR
    and a closed connection; a `truncated` frame gets nothing; any other request gets exactly
    `expected` (frame type and error code, GET count, PUT_READY indexes or PUT_OK counts), and
    the connection stays usable."""

    raw: bytes
    outcome: str  # "framing", "truncated" or "answered"
    expected: tuple[tuple[FrameType, object], ...] = ()


@st.composite
def framing_errors(draw: st.DrawFn, target: Target) -> bytes:
    namespace_id = target.namespace_id
    case = draw(st.sampled_from(["short_get", "ragged_get", "long_get", "short_put", "ragged_put", "long_put"] * 2 + [
        "unexpected", "magic", "version", "type", "oversized"
    ]))  # fmt: skip
    if case == "short_get":
        return frame(FrameType.GET, draw(st.binary(max_size=KEY_BYTES)))
    if case == "ragged_get":
        keys = draw(st.binary(max_size=200).filter(lambda k: len(k) % KEY_BYTES))
        return frame(FrameType.GET, namespace_id + b"\x00" + keys)
    if case == "long_get":
        return frame(FrameType.GET, namespace_id + b"\x00" + numbered_keys(draw(st.integers(MAX_KEYS + 1, 300))))
    if case == "short_put":
        return frame(FrameType.PUT, draw(st.binary(max_size=2 * KEY_BYTES + 4)))
    if case == "ragged_put":  # the count field and the body length disagree
        count = draw(st.integers(0, MAX_KEYS))
        tail = draw(st.integers(0, (MAX_KEYS + 2) * PUT_ENTRY_BYTES).filter(lambda n: n != count * PUT_ENTRY_BYTES))
        return frame(FrameType.PUT, put_prefix(namespace_id, count) + bytes(tail))
    if case == "long_put":
        count = draw(st.integers(MAX_KEYS + 1, 2**32 - 1))
        return frame(FrameType.PUT, put_prefix(namespace_id, count) + draw(st.binary(max_size=48)))
    if case == "unexpected":  # HELLO again, or a frame only a server sends
        kind = draw(st.sampled_from([k for k in FrameType if k not in (FrameType.GET, FrameType.PUT)]))
        return frame(kind, draw(st.binary(max_size=32)))
    if case == "magic":
        return header(
            FrameType.GET, 0, magic=draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != protocol.MAGIC))
        )
    if case == "version":
        return header(FrameType.GET, 0, version=draw(st.integers(0, 255).filter(lambda v: v != 1)))
    if case == "type":
        return header(draw(st.one_of(st.just(0), st.integers(len(FrameType) + 1, 255))), 0)
    return header(
        draw(st.sampled_from([FrameType.GET, FrameType.PUT])), draw(st.integers(protocol.MAX_BODY_BYTES + 1, 2**32 - 1))
    )


@st.composite
def truncated_frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([FrameType.GET, FrameType.PUT]))
    length = draw(st.one_of(st.integers(1, 64), st.integers(1, protocol.MAX_BODY_BYTES)))
    whole = header(kind, length) + draw(st.binary(min_size=min(length, 64), max_size=min(length, 64)))
    return whole[: draw(st.integers(0, min(len(whole), protocol.HEADER.size + length) - 1))]


@st.composite
def answered_requests(draw: st.DrawFn, target: Target) -> Script:
    chain, known = target.chain, target.namespace_id
    random_keys = draw(st.lists(RANDOM_KEY, max_size=MAX_KEYS, unique=True).filter(lambda ks: not set(ks) & set(chain)))
    flags = bytes([draw(st.integers(0, 255))])
    expected: tuple[tuple[FrameType, object], ...]
    case = draw(st.sampled_from(["get_unknown", "get_random", "get_known", "get_other", "put_unknown", "put_known",
                                 "put_other", "put_repeat", "put_empty"]))  # fmt: skip
    if case == "get_unknown":
        namespace_id = draw(RANDOM_KEY.filter(lambda n: n not in (known, target.other_namespace_id)))
        raw, expected = namespace_id + flags + b"".join(random_keys), ((FrameType.ERROR, NOT_FOUND),)
    elif case in ("get_random", "get_known", "get_other"):
        count = draw(st.integers(0, CHAIN_BLOCKS))
        keys = chain[:count] + random_keys[: MAX_KEYS - count] if case != "get_random" else random_keys
        hits = count if case == "get_known" else 0
        namespace_id = target.other_namespace_id if case == "get_other" else known
        raw, expected = namespace_id + flags + b"".join(keys), ((FrameType.GET_OK, hits),)
    else:
        checksums = draw(st.lists(UINT64, min_size=CHAIN_BLOCKS, max_size=CHAIN_BLOCKS))
        if case == "put_unknown":
            body = put_body(draw(RANDOM_KEY.filter(lambda n: n != known)), chain, checksums)
            expected = ((FrameType.ERROR, NOT_FOUND),)
        elif case == "put_known":  # all stored: nothing to send, whatever the checksums claim
            body = put_body(known, chain, checksums)
            expected = ((FrameType.PUT_READY, ()), (FrameType.PUT_OK, (0, CHAIN_BLOCKS)))
        elif case == "put_other":
            body = put_body(target.other_namespace_id, chain, checksums)
            expected = ((FrameType.ERROR, FAILED_PRECONDITION),)
        elif case == "put_repeat":
            times = draw(st.integers(2, MAX_KEYS // CHAIN_BLOCKS))
            body = put_body(known, chain * times, checksums * times)
            expected = ((FrameType.ERROR, INVALID_ARGUMENT),)
        else:
            body, expected = put_body(known, [], []), ((FrameType.PUT_READY, ()), (FrameType.PUT_OK, (0, 0)))
        return Script(frame(FrameType.PUT, body), "answered", expected)
    return Script(frame(FrameType.GET, raw), "answered", expected)


# Strategies are built once per target: hypothesis validates a new strategy object on its
# first draw, which costs more than the call it generates.
@functools.cache
def scripts(target: Target) -> st.SearchStrategy[Script]:
    return st.one_of(
        framing_errors(target).map(lambda raw: Script(raw, "framing")),
        truncated_frames().map(lambda raw: Script(raw, "truncated")),
        answered_requests(target),
    )


def expect_answer(target: Target, sock: socket.socket, expected: tuple[tuple[FrameType, object], ...]) -> None:
    for wanted, detail in expected:
        kind, body = protocol.recv_frame(sock)
        assert kind is wanted, (kind, body)
        if kind is FrameType.ERROR:
            assert protocol.parse_error(body).code == detail
        elif kind is FrameType.GET_OK:
            reply = protocol.parse_get_ok(body, MAX_KEYS)
            assert len(reply.checksums) == detail
            payload = bytearray(reply.block_bytes * len(reply.checksums))
            protocol.recv_exactly_into(sock, memoryview(payload))
            assert bytes(payload) == target.known_bytes[: len(payload)]
        elif kind is FrameType.PUT_READY:
            assert tuple(protocol.parse_indexes(body, MAX_KEYS)) == detail
        else:
            assert protocol.parse_put_ok(body) == detail


@FUZZ
@given(data=st.data())
def test_data_plane_survives_malformed_frames_after_hello(target: Target, data: st.DataObject) -> None:
    script = data.draw(scripts(target), label="script")
    with Fuzzed(target), connect(target) as sock:
        say_hello(sock)
        if script.outcome == "framing":
            send_quietly(sock, script.raw)
            assert error_codes(frames_until_closed(sock)) == [INVALID_ARGUMENT]
        elif script.outcome == "truncated":
            sock.sendall(script.raw)
            sock.shutdown(socket.SHUT_WR)
            assert frames_until_closed(sock) == []
        else:
            sock.sendall(script.raw)
            expect_answer(target, sock, script.expected)
            expect_known_run(target, sock, target.chain)  # the connection is still usable


# -- data plane: PUT payloads cut off or corrupted ------------------------------------------------


@dataclass(frozen=True)
class BrokenPut:
    num_known: int  # the known chain's leading blocks come first; the node already has them
    fresh: tuple[bytes, ...]
    parent: bytes | None
    seed: int
    how: str  # "cut", "cut_and_close", "flip" or "lie"
    position: int  # the byte cut at or flipped, or the block whose checksum lies
    flip: int


@st.composite
def broken_puts(draw: st.DrawFn, target: Target) -> BrokenPut:
    num_known = draw(st.integers(0, CHAIN_BLOCKS))
    fresh = draw(
        st.lists(RANDOM_KEY, min_size=1, max_size=4, unique=True).filter(lambda ks: not set(ks) & set(target.chain))
    )
    parent = draw(st.one_of(st.none(), RANDOM_KEY)) if num_known == 0 else None
    how = draw(st.sampled_from(["cut", "cut_and_close", "flip", "lie"]))
    limit = len(fresh) if how == "lie" else len(fresh) * target.namespace.block_bytes
    position = draw(st.integers(0, limit - 1))
    return BrokenPut(
        num_known, tuple(fresh), parent, draw(st.integers(0, 2**32)), how, position, draw(st.integers(1, 255))
    )


@functools.cache  # once per target, as `scripts`
def broken_puts_of(target: Target) -> st.SearchStrategy[BrokenPut]:
    return broken_puts(target)


@FUZZ_SLOW
@given(data=st.data())
def test_put_cut_off_or_corrupted_stores_nothing(target: Target, data: st.DataObject) -> None:
    put = data.draw(broken_puts_of(target), label="put")
    keys = [*target.chain[: put.num_known], *put.fresh]
    payloads = [*target.payloads[: put.num_known], *factories.payloads(target.namespace, len(put.fresh), put.seed)]
    checksums = [checksum(payload) for payload in payloads]
    sent = bytearray(b"".join(payload.tobytes() for payload in payloads[put.num_known :]))
    if put.how == "lie":
        checksums[put.num_known + put.position] ^= put.flip
    elif put.how == "flip":
        sent[put.position] ^= put.flip

    with Fuzzed(target), connect(target) as sock:
        say_hello(sock)
        protocol.send_frame(sock, FrameType.PUT, put_body(target.namespace_id, keys, checksums, put.parent))
        kind, body = protocol.recv_frame(sock)
        assert kind is FrameType.PUT_READY
        assert protocol.parse_indexes(body, len(keys)) == list(range(put.num_known, len(keys)))
        if put.how == "cut_and_close":
            sock.sendall(sent[: put.position])
            return  # closed mid-payload; Fuzzed checks the reservation is gone
        if put.how == "cut":
            sock.sendall(sent[: put.position])
            sock.shutdown(socket.SHUT_WR)
            assert frames_until_closed(sock) == []  # no PUT_OK for a payload that never arrived
            return
        sock.sendall(sent)
        assert error_codes([protocol.recv_frame(sock)]) == [DATA_LOSS]
        expect_known_run(target, sock, keys)  # still usable, and nothing of the PUT is readable


# -- data plane: a peer answering Fetch with malformed replies ------------------------------------


@FUZZ_SLOW
@given(data=st.data())
def test_fetch_from_a_peer_with_malformed_replies_stores_nothing(target: Target, data: st.DataObject) -> None:
    seed = next(target.seeds)
    wanted = factories.chain(target.namespace_id, 3, seed=seed)
    block_bytes = target.namespace.block_bytes
    reply = data.draw(peer_replies(len(wanted), block_bytes), label="reply")
    payloads = factories.payloads(target.namespace, len(wanted) + 1, seed=seed)
    well_formed = reply.how == "get_ok" and (
        reply.count == 0
        or (reply.count <= len(wanted) and reply.block_bytes is None and reply.lie_at is None and reply.cut is None)
    )
    before, failures = fingerprint(target), servicer_failures(target.server)
    peer = FakePeer(reply, payloads, block_bytes)
    request = pb.FetchRequest(namespace_id=target.namespace_id, keys=b"".join(wanted), peer=peer.address)

    code, answer = call(target, "Fetch", request)
    peer.close()

    event(f"peer {reply.how}: {code.name}")
    if well_formed:
        assert code is GRPC.OK, (code, answer)
        assert (answer.num_fetched, answer.num_present) == (reply.count, 0)
        got = target.client.get_blocks(target.namespace_id, wanted)
        assert [block.tobytes() for block in got] == [payload.tobytes() for payload in payloads[: reply.count]]
        assert remove_after_reads(target, wanted) == (reply.count, 0)
    else:
        assert code in FETCH_REJECTIONS, (code, answer)
        assert_unchanged(target, before)
    assert servicer_failures(target.server) == failures
    assert target.thread_errors.take() == []
    assert_serves_everyone(target)
