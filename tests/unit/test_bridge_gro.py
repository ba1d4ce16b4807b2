"""UDP GRO in the bridges, over loopback: a WireGuard that sends with UDP GSO (wgpy, wireguard-go)
sends bursts to the local forwarders (ss_local, udp2tcp's local side) and replies in bursts to the
bridge servers (`wgpy bridge serve`'s Shadowsocks sessions, the udp2tcp server). Each burst is one
read there (transport.udp.recv_datagrams) and comes out as the same datagrams, in order; with GRO
off, the same datagrams come through one read each."""

from __future__ import annotations

import os
import socket

import pytest
import trio

import transport.udp as udp
from bridge import serve as bridge_serve, ss_local, udp2tcp
from bridge.serve import AllowList, ShadowsocksServer
from bridge.shadowsocks import Cipher

LOOP = "127.0.0.1"
BURST = [os.urandom(1000) for _ in range(30)]  # from the app (the local WireGuard)
REPLY = [os.urandom(1200) for _ in range(19)] + [os.urandom(500)]  # from the target, short last


def _gso_send(sock: socket.socket, datagrams: list[bytes], addr) -> None:
    sock.sendmsg(datagrams, [(udp.SOL_UDP, udp.UDP_SEGMENT, udp._SEGMENT.pack(len(datagrams[0])))],
                 0, addr)


async def gso_replier(task_status=trio.TASK_STATUS_IGNORED):
    """The far WireGuard: takes BURST, then answers with REPLY in one GSO send."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    sock.bind((LOOP, 0))
    seen: list[bytes] = []
    task_status.started((sock.getsockname(), seen))
    try:
        while len(seen) < len(BURST):
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data, source = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                seen.append(data)
        _gso_send(sock, REPLY, source)
        await trio.sleep_forever()
    finally:
        sock.close()


async def _app_round_trip(local_address) -> list[bytes]:
    """The local WireGuard: BURST in one GSO send to the forwarder; what comes back."""
    app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    app.bind((LOOP, 0))
    try:
        _gso_send(app, BURST, local_address)
        got: list[bytes] = []
        with trio.fail_after(5):
            while len(got) < len(REPLY):
                await trio.lowlevel.wait_readable(app)
                got.append(app.recv(65535))
        return got
    finally:
        app.close()


@pytest.fixture(params=[True, False], ids=["gro", "no-gro"])
def gro(request, monkeypatch):
    monkeypatch.setattr(udp, "GRO_ENABLED", request.param)
    return request.param


def count_reads(monkeypatch, module) -> list[int]:
    """The number of datagrams each of `module`'s reads brought."""
    counts: list[int] = []
    real = udp.recv_datagrams

    def counting(sock, bufs, view):
        datagrams, addr = real(sock, bufs, view)
        counts.append(len(datagrams))
        return datagrams, addr

    monkeypatch.setattr(module, "recv_datagrams", counting)
    return counts


async def udp2tcp_chain(nursery):
    """An udp2tcp forwarder, connected to an udp2tcp server in front of a target that answers
    bursts with bursts: what the target sees, the server, the forwarder."""
    target, seen = await nursery.start(gso_replier)
    server = await nursery.start(lambda task_status: udp2tcp.serve(
        (LOOP, 0), [target], task_status=task_status))
    fwd = await nursery.start(lambda task_status: udp2tcp.run_local_forwarder(
        (LOOP, 0), server.local_address, task_status=task_status))
    with trio.fail_after(5):
        await fwd.client.wait_connected()
    return seen, server, fwd


async def test_udp2tcp_forwarder_and_server_read_bursts_whole(gro, monkeypatch):
    counts = count_reads(monkeypatch, udp2tcp)
    async with trio.open_nursery() as nursery:
        seen, server, fwd = await udp2tcp_chain(nursery)
        assert await _app_round_trip(fwd.local_address) == REPLY
        assert seen == BURST
        # The forwarder's read of the app's burst, the server's of the target's.
        assert sorted(counts) == ([len(REPLY), len(BURST)] if gro else [1] * (len(BURST) + len(REPLY)))
        assert server.statistics().to_tcp == len(REPLY)
        nursery.cancel_scope.cancel()


async def ss_round_trip(nursery):
    """A burst from an app through ss_local and `wgpy bridge serve` (aes-256-gcm) to a target
    that answers with a burst (checked): what the target saw, the server, the forwarder."""
    target, seen = await nursery.start(gso_replier)
    server = ShadowsocksServer(Cipher("aes-256-gcm", "burst-test"), LOOP, 0, AllowList([target]))
    server.open()
    nursery.start_soon(server.run)
    uri = f"ss://aes-256-gcm:burst-test@{LOOP}:{server.udp_sock.getsockname()[1]}"
    fwd = await nursery.start(lambda task_status: ss_local.run_local_forwarder(
        (LOOP, 0), uri, target, task_status=task_status))
    assert await _app_round_trip(fwd.local_address) == REPLY
    return seen, server, fwd


async def test_ss_local_and_serve_read_bursts_whole(gro, monkeypatch):
    local_reads = count_reads(monkeypatch, ss_local)
    serve_reads = count_reads(monkeypatch, bridge_serve)
    async with trio.open_nursery() as nursery:
        seen, server, _ = await ss_round_trip(nursery)
        assert seen == BURST
        # ss_local's read of the app's burst; serve's session read of the target's reply.
        assert local_reads == ([len(BURST)] if gro else [1] * len(BURST))
        assert serve_reads == ([len(REPLY)] if gro else [1] * len(REPLY))
        assert server.stats.udp_out == len(REPLY)
        nursery.cancel_scope.cancel()
