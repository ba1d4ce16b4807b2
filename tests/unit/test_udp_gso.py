"""UDP GSO in the UDP transport (transport/udp.py): runs of equal-sized datagrams to one address
leave in one sendmsg with UDP_SEGMENT and arrive as the same ordinary datagrams, in order; the
plain path (forced off) gives the same; a socket that refuses GSO falls back to plain sends by
itself, losing nothing. The same for the shared helper `send_datagrams` (what the bridges use),
on connected and unconnected sockets. On loopback, no root needed."""

from __future__ import annotations

import errno
import os
import socket

import pytest

import transport.udp as udp
from transport.base import UDP, Drops, Endpoint
from transport.udp import GsoState, UdpTransport, send_datagrams, send_or_drop


@pytest.fixture
def pair():
    t = UdpTransport()
    t.bind(0)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # room for every test's burst
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    yield t, rx, Endpoint("127.0.0.1", rx.getsockname()[1], UDP)
    t.close()
    rx.close()


def _receive(rx, n: int) -> list[bytes]:
    return [rx.recv(65535) for _ in range(n)]


def _batch(ep, sizes):
    return [(os.urandom(s), ep) for s in sizes]


class Spy:
    """Wraps a socket to count (or refuse) GSO sends."""

    def __init__(self, sock, refuse: int | None = None) -> None:
        self.sock, self.refuse, self.gso_calls, self.plain_calls = sock, refuse, 0, 0

    def sendmsg(self, buffers, ancillary, flags=0, addr=None):
        self.gso_calls += 1
        if self.refuse is not None:
            raise OSError(self.refuse, os.strerror(self.refuse))
        if addr is None:  # a connected socket
            return self.sock.sendmsg(buffers, ancillary)
        return self.sock.sendmsg(buffers, ancillary, flags, addr)

    def sendto(self, data, addr):
        self.plain_calls += 1
        return self.sock.sendto(data, addr)

    def send(self, data):
        self.plain_calls += 1
        return self.sock.send(data)

    def __getattr__(self, name):  # everything else (fileno, close, ...) is the socket's
        return getattr(self.sock, name)


@pytest.mark.parametrize("gso", [True, False])
def test_runs_arrive_as_the_same_datagrams_in_order(pair, gso):
    t, rx, ep = pair
    t.gso = gso
    spy = t.v4 = Spy(t.v4)
    other = Endpoint("127.0.0.1", 9, UDP)  # a different address breaks the run (discard port)
    batch = _batch(ep, [1452] * 50 + [700]) + _batch(other, [1452]) + _batch(ep, [1452] * 3 + [1400, 1452])
    assert t.send(batch) == []
    wanted = [d for d, e in batch if e == ep]
    assert _receive(rx, len(wanted)) == wanted
    if gso:
        # 44 (64 KB a call), then 6 + the shorter 700; 3 + the shorter 1400; one plain each for
        # the other address and the last 1452.
        assert spy.gso_calls == 3 and spy.plain_calls == 2
    else:
        assert spy.gso_calls == 0 and spy.plain_calls == len(batch)
    assert t.sent == len(batch)


def test_a_run_longer_than_64_segments_is_split(pair):
    t, rx, ep = pair
    spy = t.v4 = Spy(t.v4)
    batch = _batch(ep, [1000] * 130)
    assert t.send(batch) == []
    assert _receive(rx, 130) == [d for d, _ in batch]
    assert spy.gso_calls == 3  # 64 + 64 + 2


@pytest.mark.parametrize("refusal", [errno.EIO, errno.EINVAL, errno.ENOPROTOOPT])
def test_a_socket_that_refuses_gso_sends_plainly_from_then_on(pair, refusal):
    t, rx, ep = pair
    spy = t.v4 = Spy(t.v4, refuse=refusal)
    batch = _batch(ep, [1200] * 10)
    assert t.send(batch) == []
    assert _receive(rx, 10) == [d for d, _ in batch]
    assert t.drops.reasons["udp gso refused: plain sends"] == 1
    assert spy.gso_calls == 1 and spy.plain_calls == 10
    again = _batch(ep, [1200] * 10)
    assert t.send(again) == []
    assert _receive(rx, 10) == [d for d, _ in again]
    assert spy.gso_calls == 1  # never tried again on this socket


def test_real_kernel_accepts_gso_on_loopback(pair):
    t, rx, ep = pair
    batch = _batch(ep, [1452] * 44)
    assert t.send(batch) == []
    assert _receive(rx, 44) == [d for d, _ in batch]
    assert not t.drops.reasons  # the kernel took the GSO send (Linux >= 4.18)


# ---- send_datagrams, the helper shared with the bridges


@pytest.fixture
def sockets():
    """(an unconnected sender, a sender connected to rx, rx)."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    tx.bind(("127.0.0.1", 0))
    conn = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    conn.connect(rx.getsockname())
    yield tx, conn, rx
    for s in (tx, conn, rx):
        s.close()


# Runs: 44 x 1452 (64 KB a call) | 6 + a shorter 700 | a lone 1452 before a longer one (plain) |
# 3 x 1500 + a shorter 1400 | 1452 alone before an empty one, which never joins a run (it would
# vanish) (plain) | the empty one (plain) | 2 x 100 + a shorter 10 | 64 x 10 (64 segments a call).
MIXED = [1452] * 50 + [700, 1452, 1500, 1500, 1500, 1400, 1452, 0, 100, 100] + [10] * 65
MIXED_CALLS = (5, 3)  # GSO calls, plain sends


def _counted(sock, refuse=None):
    return Spy(sock, refuse)


@pytest.mark.parametrize("connected", [False, True], ids=["sendto", "connected"])
@pytest.mark.parametrize("enabled", [True, False], ids=["gso", "plain"])
def test_send_datagrams_sends_the_same_datagrams_in_order(sockets, connected, enabled):
    tx, conn, rx = sockets
    spy = _counted(conn if connected else tx)
    addr = None if connected else rx.getsockname()
    payloads = [os.urandom(n) for n in MIXED]
    assert send_datagrams(spy, payloads, addr, GsoState(enabled)) == (len(payloads), None, 0)
    assert _receive(rx, len(payloads)) == payloads
    if enabled:
        assert (spy.gso_calls, spy.plain_calls) == MIXED_CALLS
    else:
        assert (spy.gso_calls, spy.plain_calls) == (0, len(payloads))


def test_send_datagrams_without_state_sends_plainly(sockets):
    tx, _, rx = sockets
    spy = _counted(tx)
    payloads = [os.urandom(500) for _ in range(5)]
    assert send_datagrams(spy, payloads, rx.getsockname(), None) == (5, None, 0)
    assert _receive(rx, 5) == payloads and spy.gso_calls == 0


def test_send_datagrams_follows_the_environment_switch(monkeypatch):
    monkeypatch.setattr(udp, "GSO_ENABLED", False)
    assert GsoState().enabled is False
    monkeypatch.setattr(udp, "GSO_ENABLED", True)
    assert GsoState().enabled is True


def test_send_datagrams_starts_where_told(sockets):
    tx, _, rx = sockets
    spy = _counted(tx)
    payloads = [os.urandom(800) for _ in range(10)]
    assert send_datagrams(spy, payloads, rx.getsockname(), GsoState(True), 4) == (10, None, 0)
    assert _receive(rx, 6) == payloads[4:] and spy.gso_calls == 1


@pytest.mark.parametrize("connected", [False, True], ids=["sendto", "connected"])
@pytest.mark.parametrize("refusal", [errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP])
def test_send_datagrams_falls_back_once_per_socket(sockets, connected, refusal):
    tx, conn, rx = sockets
    spy = _counted(conn if connected else tx, refuse=refusal)
    addr = None if connected else rx.getsockname()
    drops = Drops()
    gso = GsoState(True, drops)
    payloads = [os.urandom(n) for n in MIXED]
    assert send_datagrams(spy, payloads, addr, gso) == (len(payloads), None, 0)
    assert _receive(rx, len(payloads)) == payloads
    assert spy.gso_calls == 1 and spy.plain_calls == len(payloads)
    assert drops.reasons == {"udp gso refused: plain sends": 1}
    assert spy in gso.refused
    assert send_datagrams(spy, payloads, addr, gso) == (len(payloads), None, 0)
    assert _receive(rx, len(payloads)) == payloads
    assert spy.gso_calls == 1  # remembered: never tried again on this socket
    # Another socket of the same sender still tries (a refusal is the socket's, or its route's).
    other = _counted(tx if connected else conn)
    assert send_datagrams(other, payloads[:3], None if not connected else rx.getsockname(),
                          gso) == (3, None, 0)
    assert _receive(rx, 3) == payloads[:3] and other.gso_calls == 1


def test_a_refused_socket_leaves_the_state_when_closed():
    gso = GsoState(True)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gso.refuse(s, OSError(errno.EIO, "no"))
    assert len(gso.refused) == 1
    s.close()
    del s
    assert len(gso.refused) == 0


class Failing:
    """Fails the `fail`-th send (1-based) with `exc`; records what was sent."""

    def __init__(self, fail: int, exc: OSError) -> None:
        self.fail, self.exc, self.calls, self.sent = fail, exc, 0, []

    def _call(self, payloads):
        self.calls += 1
        if self.calls == self.fail:
            raise self.exc
        self.sent += payloads

    def sendmsg(self, buffers, ancillary, flags=0, addr=None):
        self._call(list(buffers))

    def send(self, data):
        self._call([data])


@pytest.mark.parametrize("exc", [BlockingIOError(errno.EAGAIN, "full"),
                                 OSError(errno.EMSGSIZE, "too long")], ids=["eagain", "emsgsize"])
def test_send_datagrams_reports_the_failed_send_and_stops_there(exc):
    payloads = [b"a" * 100] * 3 + [b"b" * 200] * 4 + [b"c" * 300]
    sock = Failing(2, exc)  # the run of four fails
    gso = GsoState(True)
    stop, got, n = send_datagrams(sock, payloads, None, gso)
    assert (stop, got, n) == (3, exc, 4) and sock.sent == payloads[:3]
    assert not gso.refused  # a failure, not a refusal
    # The caller goes on after the lost run (or from `stop` again after waiting, for EAGAIN).
    assert send_datagrams(sock, payloads, None, gso, stop + n) == (len(payloads), None, 0)
    assert sock.sent == payloads[:3] + payloads[7:]
    # A plain send that fails covers one datagram.
    sock = Failing(2, exc)
    assert send_datagrams(sock, payloads, None, GsoState(False)) == (1, exc, 1)


@pytest.mark.parametrize("exc", [BlockingIOError(errno.EAGAIN, "full"),
                                 OSError(errno.EMSGSIZE, "too long")], ids=["eagain", "emsgsize"])
def test_send_or_drop_skips_what_a_failed_send_carried_and_sends_the_rest(exc):
    payloads = [b"a" * 100] * 3 + [b"b" * 200] * 4 + [b"c" * 300]
    sock = Failing(2, exc)  # the run of four fails
    assert send_or_drop(sock, payloads, None, GsoState(True)) == (4, [(exc, 4)])
    assert sock.sent == payloads[:3] + payloads[7:]
    sock = Failing(0, exc)  # nothing fails
    assert send_or_drop(sock, payloads, None, GsoState(True)) == (len(payloads), [])
    assert sock.sent == payloads
