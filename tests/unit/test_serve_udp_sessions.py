"""`wgpy bridge serve`'s Shadowsocks UDP sessions over loopback: a session lives while traffic
flows in either direction and is closed after `idle_timeout` without any."""

from __future__ import annotations

import socket

import trio

from bridge.serve import AllowList, ShadowsocksServer
from bridge.shadowsocks import Cipher

LOOP = "127.0.0.1"
IDLE = 0.3


async def _setup(nursery):
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind((LOOP, 0))
    echo.setblocking(False)
    target = echo.getsockname()

    async def echo_loop():
        while True:
            await trio.lowlevel.wait_readable(echo)
            data, src = echo.recvfrom(65535)
            echo.sendto(b"echo:" + data, src)

    cipher = Cipher("aes-256-gcm", "session-test")
    server = ShadowsocksServer(cipher, LOOP, 0, AllowList([target]), idle_timeout=IDLE)
    server.open()
    server_addr = server.udp_sock.getsockname()
    nursery.start_soon(echo_loop)
    nursery.start_soon(server.run)
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await client.bind((LOOP, 0))

    async def round_trip(payload: bytes) -> bytes:
        await client.sendto(cipher.seal_udp(target, payload), server_addr)
        with trio.fail_after(5):
            packet = await client.recv(65535)
        source, reply = cipher.open_udp(packet)
        assert (source.host, source.port) == target
        return reply

    return server, round_trip, echo


async def test_a_busy_session_stays_and_an_idle_one_closes():
    async with trio.open_nursery() as nursery:
        server, round_trip, echo = await _setup(nursery)
        assert await round_trip(b"one") == b"echo:one"
        assert len(server.sessions) == 1
        start = trio.current_time()
        while trio.current_time() - start < 3 * IDLE:  # traffic keeps it alive past its deadline
            assert await round_trip(b"more") == b"echo:more"
            last = trio.current_time()
            await trio.sleep(IDLE / 4)
        assert server.stats.sessions_opened == 1 and server.stats.sessions_idle == 0
        with trio.fail_after(5):
            while server.sessions:  # then silence closes it
                await trio.sleep(IDLE / 10)
        assert trio.current_time() - last >= IDLE * 0.9
        assert server.stats.sessions_idle == 1
        assert await round_trip(b"again") == b"echo:again"  # a new session
        assert server.stats.sessions_opened == 2
        nursery.cancel_scope.cancel()
    echo.close()
