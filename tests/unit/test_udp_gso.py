"""UDP GSO in the UDP transport (transport/udp.py): runs of equal-sized datagrams to one address
leave in one sendmsg with UDP_SEGMENT and arrive as the same ordinary datagrams, in order; the
plain path (forced off) gives the same; a socket that refuses GSO falls back to plain sends by
itself, losing nothing. On loopback, no root needed."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from transport.base import UDP, Endpoint
from transport.udp import UdpTransport


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

    def sendmsg(self, buffers, ancillary, flags, addr):
        self.gso_calls += 1
        if self.refuse is not None:
            raise OSError(self.refuse, os.strerror(self.refuse))
        return self.sock.sendmsg(buffers, ancillary, flags, addr)

    def sendto(self, data, addr):
        self.plain_calls += 1
        return self.sock.sendto(data, addr)

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
