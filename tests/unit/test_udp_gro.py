"""UDP GRO in the UDP transport (transport/udp.py): a GSO send arrives at a socket with UDP_GRO as
one coalesced read, which recv_batch splits back into the datagrams that were sent, in order,
byte-exact, from the right endpoint; GRO forced off (attribute, WGPY_UDP_GRO=0) or refused by the
kernel gives the same datagrams through plain reads. On loopback, no root needed."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings, strategies as st

import transport.udp as udp
from transport.base import UDP, Endpoint
from transport.udp import UdpTransport, enable_gro, split_gro

from .test_bridge_gro import count_reads

ROOT = Path(__file__).resolve().parents[2]


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


FAMILIES = [
    pytest.param(socket.AF_INET, "127.0.0.1", id="ipv4"),
    pytest.param(socket.AF_INET6, "::1", id="ipv6",
                 marks=pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback")),
]


class Sender:
    """A loopback socket sending runs of datagrams with UDP_SEGMENT, as a GSO sender does."""

    def __init__(self, family: int, host: str, port: int) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.addr = (host, port)
        self.endpoint = Endpoint(host, self.sock.getsockname()[1], UDP)

    def gso(self, datagrams: list[bytes]) -> None:
        self.sock.sendmsg(datagrams, [(udp.SOL_UDP, udp.UDP_SEGMENT,
                                       udp._SEGMENT.pack(len(datagrams[0])))], 0, self.addr)

    def plain(self, datagram: bytes) -> None:
        self.sock.sendto(datagram, self.addr)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def reads(monkeypatch):
    """The number of datagrams each GRO read brought (recv_batch looks recv_datagrams up per call)."""
    return count_reads(monkeypatch, udp)


def _transport(gro: bool = True) -> UdpTransport:
    t = UdpTransport()
    t.gro = gro
    t.bind(0)
    return t


def _socket_of(t: UdpTransport, family: int) -> socket.socket:
    sock = t.v4 if family == socket.AF_INET else t.v6
    assert sock is not None
    return sock


def _drain(t: UdpTransport, sock: socket.socket, limit: int = udp.BATCH) -> list:
    out = []
    while batch := t.recv_batch(sock, limit):
        out += batch
    return out


def _send_mixed(tx: Sender) -> list[bytes]:
    """Runs of several sizes, a short last segment, a plain datagram between; what was sent."""
    sent: list[bytes] = []
    for run in ([os.urandom(1452) for _ in range(40)],
                [os.urandom(1000) for _ in range(10)] + [os.urandom(300)],  # short last one
                [os.urandom(77)],
                [os.urandom(148) for _ in range(3)] + [os.urandom(1)],
                [os.urandom(1000) for _ in range(64)]):
        if len(run) == 1:
            tx.plain(run[0])
        else:
            tx.gso(run)
        sent += run
    return sent


# ---- split_gro, the pure part


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=4000), st.integers(min_value=1, max_value=4100),
       st.binary(min_size=0, max_size=200))
def test_split_gro_gives_back_the_segments(payload, segment, stale):
    # The buffer beyond the read holds older bytes: they must not leak into the last segment.
    buf = bytearray(payload + stale + b"\xee" * 64)
    got = split_gro(memoryview(buf), len(payload), segment)
    assert b"".join(got) == payload
    assert all(len(d) == segment for d in got[:-1])
    assert 0 < len(got[-1]) <= segment
    assert len(got) == -(-len(payload) // segment)
    assert all(type(d) is bytes for d in got)


def test_split_gro_edges():
    view = memoryview(bytearray(b"abcdefgXYZ"))
    assert split_gro(view, 7, 3) == [b"abc", b"def", b"g"]
    assert split_gro(view, 6, 3) == [b"abc", b"def"]
    assert split_gro(view, 7, 7) == [b"abcdefg"]
    assert split_gro(view, 7, 100) == [b"abcdefg"]
    assert split_gro(view, 7, 0) == [b"abcdefg"]  # a nonsensical size: one datagram


# ---- enable_gro


class RefusingSocket:
    def __init__(self, error: int) -> None:
        self.error, self.calls = error, 0

    def setsockopt(self, *args):
        self.calls += 1
        raise OSError(self.error, os.strerror(self.error))


@pytest.mark.parametrize("refusal", [errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP])
def test_enable_gro_refused_is_off(refusal):
    s = RefusingSocket(refusal)
    assert enable_gro(s) is False
    assert s.calls == 1


def test_enable_gro_off_by_flag_never_asks(monkeypatch):
    monkeypatch.setattr(udp, "GRO_ENABLED", False)
    s = RefusingSocket(errno.EINVAL)
    assert enable_gro(s) is False
    assert s.calls == 0


def test_env_turns_gro_off():
    code = "import transport.udp as u; print(u.GRO_ENABLED, u.UdpTransport().gro)"
    for value, expected in (("0", "False False"), ("1", "True True")):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, text=True,
                             capture_output=True, env={**os.environ, "WGPY_UDP_GRO": value})
        assert out.stdout.split() == expected.split()


# ---- the transport


@pytest.mark.parametrize("family, host", FAMILIES)
def test_gso_sends_arrive_coalesced_and_split(family, host, reads):
    t = _transport()
    sock = _socket_of(t, family)
    tx = Sender(family, host, t.port)
    try:
        assert sock in t._gro  # the kernel took UDP_GRO (Linux >= 5.0)
        sent = _send_mixed(tx)
        got = _drain(t, sock)
        assert [d for d, _ in got] == sent
        assert all(ep == tx.endpoint for _, ep in got)
        assert t.received == len(sent)
        # Coalesced for real: one read per send (the runs arrive intact over loopback).
        assert reads == [40, 11, 1, 4, 64]
    finally:
        tx.close()
        t.close()


@pytest.mark.parametrize("family, host", FAMILIES)
def test_gro_forced_off_gives_the_same_datagrams(family, host, reads):
    t = _transport(gro=False)
    sock = _socket_of(t, family)
    tx = Sender(family, host, t.port)
    try:
        assert not t._gro
        sent = _send_mixed(tx)
        got = _drain(t, sock)
        assert [d for d, _ in got] == sent  # the kernel cut the sends apart again
        assert all(ep == tx.endpoint for _, ep in got)
        assert reads == []  # plain reads
    finally:
        tx.close()
        t.close()


def test_gro_off_by_module_flag(monkeypatch):
    monkeypatch.setattr(udp, "GRO_ENABLED", False)
    t = UdpTransport()
    t.bind(0)
    try:
        assert t.gro is False and not t._gro
    finally:
        t.close()


def test_refused_setsockopt_falls_back_to_plain_reads(monkeypatch, reads):
    # An option number no kernel knows: the real kernel refuses it (ENOPROTOOPT), as Linux < 5.0
    # refuses UDP_GRO.
    monkeypatch.setattr(udp, "UDP_GRO", 9999)
    t = _transport()
    tx = Sender(socket.AF_INET, "127.0.0.1", t.port)
    try:
        assert t.gro is True and not t._gro
        sent = _send_mixed(tx)
        assert [d for d, _ in _drain(t, t.v4)] == sent
        assert reads == []
    finally:
        tx.close()
        t.close()


def test_rebind_keeps_gro():
    t = _transport()
    try:
        t.bind(0)
        assert t._gro == set(t.sockets)
        t.close()
        assert not t._gro
    finally:
        t.close()


def test_batch_limit_counts_datagrams_and_takes_reads_whole(reads):
    t = _transport()
    tx = Sender(socket.AF_INET, "127.0.0.1", t.port)
    try:
        sent = []
        for _ in range(3):
            run = [os.urandom(1200) for _ in range(40)]
            tx.gso(run)
            sent += run
        first = t.recv_batch(t.v4, 50)
        assert len(first) == 80  # 40 < 50: one more read, all of it
        rest = t.recv_batch(t.v4, 50)
        assert len(rest) == 40
        assert [d for d, _ in first + rest] == sent
        assert t.recv_batch(t.v4, 50) == []
    finally:
        tx.close()
        t.close()


def test_endpoint_cache_is_shared_across_reads():
    t = _transport()
    tx = Sender(socket.AF_INET, "127.0.0.1", t.port)
    try:
        tx.gso([b"a" * 100] * 5)
        tx.gso([b"b" * 100] * 5)
        got = _drain(t, t.v4)
        assert len(got) == 10
        assert len({id(ep) for _, ep in got}) == 1  # one parsed endpoint, reused
    finally:
        tx.close()
        t.close()


def test_engine_receiver_reads_coalesced(reads):
    # The async receiver the engine calls: wait_readable, then recv_batch.
    t = _transport()
    tx = Sender(socket.AF_INET, "127.0.0.1", t.port)
    try:
        run = [os.urandom(900) for _ in range(20)]

        async def main():
            receive = t.receivers()[0]
            tx.gso(run)
            return await receive()

        got = trio.run(main)
        assert [d for d, _ in got] == run
        assert reads == [20]
    finally:
        tx.close()
        t.close()
