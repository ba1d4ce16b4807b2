"""UDP GSO in the bridges, over loopback: a burst of equal-sized datagrams leaves each bridge UDP
send path in fewer sendmsg calls (transport.udp.send_datagrams) and arrives as the same datagrams,
in order; with WGPY_UDP_GSO=0, or a socket that refuses GSO, every datagram is a plain send and
the same datagrams arrive.

    app --GSO--> ss_local --[carrier]--> serve --[to target]--> target
    app <-[ss_local]-- ss_local <-- serve <-[replies]-- target (GSO)

    app --GSO--> udp2tcp forwarder ==TCP==> udp2tcp server --[server to target]--> target
    app <-[forwarder to app]-- forwarder <== server <-- target (GSO)
"""

from __future__ import annotations

import errno
import socket
from collections import Counter

import pytest
import trio

import transport.udp as udp
from bridge import carrier, serve as bridge_serve, ss_local, udp2tcp

from .test_bridge_gro import BURST, LOOP, REPLY, _app_round_trip, ss_round_trip, udp2tcp_chain


class Counted:
    """A socket whose sends are counted by path; `refuse` makes its GSO sends fail with EIO."""

    def __init__(self, sock: socket.socket, counts: Counter, path: str, refuse: bool) -> None:
        self.sock, self.counts, self.path, self.refuse = sock, counts, path, refuse

    def sendmsg(self, buffers, ancillary, flags=0, addr=None):
        self.counts[self.path, "gso"] += 1
        if self.refuse:
            raise OSError(errno.EIO, "no checksum offload")
        self.counts[self.path, "datagrams"] += len(buffers)
        if addr is None:
            return self.sock.sendmsg(buffers, ancillary)
        return self.sock.sendmsg(buffers, ancillary, flags, addr)

    def send(self, data):
        self.counts[self.path, "plain"] += 1
        self.counts[self.path, "datagrams"] += 1
        return self.sock.send(data)

    def sendto(self, data, addr):
        self.counts[self.path, "plain"] += 1
        self.counts[self.path, "datagrams"] += 1
        return self.sock.sendto(data, addr)


MODE = ["gso", "off", "refused"]


@pytest.fixture(params=MODE)
def mode(request, monkeypatch):
    """How the bridges send: GSO, WGPY_UDP_GSO=0 (read when their GsoStates are made), or GSO
    refused by every socket (each falls back once, then sends plainly)."""
    monkeypatch.setattr(udp, "GSO_ENABLED", request.param != "off")
    return request.param


def _count_sends(monkeypatch, mode: str, paths: dict) -> Counter:
    """Counts each bridge send path's calls: `paths` maps a module to a function naming the
    path of a send_datagrams or send_or_drop call from its (sock, addr), asked at a socket's
    first send."""
    counts: Counter = Counter()
    proxies: dict = {}  # one per socket: a refusal is remembered per socket object
    real = {"send_datagrams": udp.send_datagrams, "send_or_drop": udp.send_or_drop}

    for module, name_of in paths.items():
        for fn_name, fn in real.items():
            if not hasattr(module, fn_name):
                continue

            def counting(sock, payloads, addr, gso, *rest, fn=fn, name_of=name_of):
                proxy = proxies.get(sock)
                if proxy is None:
                    proxy = proxies[sock] = Counted(sock, counts, name_of(sock, addr),
                                                    mode == "refused")
                return fn(proxy, payloads, addr, gso, *rest)

            monkeypatch.setattr(module, fn_name, counting)
    return counts


def _expect(counts: Counter, mode: str, path: str, datagrams: list[bytes]) -> None:
    """The path sent `datagrams` (one size, the last maybe shorter: one GSO run) as one GSO send,
    or plainly, after one refused GSO send."""
    n = len(datagrams)
    got = (counts[path, "gso"], counts[path, "plain"], counts[path, "datagrams"])
    assert got == {"gso": (1, 0, n), "off": (0, n, n), "refused": (1, n, n)}[mode], path


async def test_shadowsocks_paths_send_bursts_with_gso(mode, monkeypatch):
    counts = _count_sends(monkeypatch, mode, {
        carrier: lambda sock, addr: "carrier",
        ss_local: lambda sock, addr: "ss_local to app",
        bridge_serve: lambda sock, addr: "serve to target" if addr is None else "serve replies",
    })
    async with trio.open_nursery() as nursery:
        seen, server, fwd = await ss_round_trip(nursery)
        assert seen == BURST
        _expect(counts, mode, "carrier", BURST)
        _expect(counts, mode, "serve to target", BURST)
        _expect(counts, mode, "serve replies", REPLY)
        _expect(counts, mode, "ss_local to app", REPLY)
        assert server.stats.udp_in == len(BURST) and server.stats.udp_out == len(REPLY)
        assert not server.stats.drops
        stats = fwd.statistics()
        assert stats.sent == len(BURST) and stats.received == len(REPLY)
        # Only the carrier (a daemon transport, like the interface's port) counts a refusal.
        assert stats.drop_reasons == ({"udp gso refused: plain sends": 1} if mode == "refused"
                                      else {})
        nursery.cancel_scope.cancel()


async def test_udp2tcp_paths_send_bursts_with_gso(mode, monkeypatch):
    forwarders: list = []  # both paths send on connected sockets: told apart by the socket
    counts = _count_sends(monkeypatch, mode, {udp2tcp: lambda sock, addr: (
        "forwarder to app" if sock is forwarders[0]._sock else "server to target")})
    async with trio.open_nursery() as nursery:
        seen, server, fwd = await udp2tcp_chain(nursery)
        forwarders.append(fwd)
        assert await _app_round_trip(fwd.local_address) == REPLY
        assert seen == BURST
        _expect(counts, mode, "server to target", BURST)
        _expect(counts, mode, "forwarder to app", REPLY)
        assert server.statistics().to_udp == len(BURST)
        assert not server.statistics().drop_reasons
        assert not fwd.statistics()["local_drops"]
        nursery.cancel_scope.cancel()


class FullOnce:
    """A connected UDP socket whose sends fail with EAGAIN on the calls numbered in `full`
    (1-based); what it sent, by call."""

    def __init__(self, sock: socket.socket, full: set[int]) -> None:
        self.sock, self.full, self.calls, self.sent = sock, full, 0, []

    def _call(self, payloads):
        self.calls += 1
        if self.calls in self.full:
            raise BlockingIOError(errno.EAGAIN, "full")
        self.sent.append(list(payloads))

    def sendmsg(self, buffers, ancillary, flags=0, addr=None):
        self._call(buffers)

    def send(self, data):
        self._call([data])

    def fileno(self) -> int:  # for trio.lowlevel.wait_writable
        return self.sock.fileno()


@pytest.mark.parametrize("full, sent, dropped", [
    ({1}, [[b"a" * 10] * 3, [b"b" * 20] * 2], 0),  # waited for, then sent whole
    ({1, 2}, [[b"b" * 20] * 2], 3),  # full again after the wait: that send's run is dropped
    ({2, 3}, [[b"a" * 10] * 3], 2),
])
async def test_udp2tcp_server_waits_once_per_full_send(full, sent, dropped, monkeypatch):
    """The udp2tcp server's rule for a full socket to the target, per GSO send as it was per
    datagram: wait for room once, then send again; still full, drop what that send carried."""
    monkeypatch.setattr(udp, "GSO_ENABLED", True)
    server = udp2tcp.Udp2TcpServer((LOOP, 0), [(LOOP, 9)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as real:
        sock = FullOnce(real, full)
        await server._send_udp(sock, [b"a" * 10] * 3 + [b"b" * 20] * 2)
    assert sock.sent == sent
    stats = server.statistics()
    assert stats.to_udp == 5 - dropped
    assert stats.drop_reasons == ({"udp send: EAGAIN": dropped} if dropped else {})
