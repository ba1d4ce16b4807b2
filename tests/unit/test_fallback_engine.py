"""Automatic fallback in the whole engine, in memory on a driven clock: `wgpy_fallback=` over
the UAPI, a direct path that a censor blocks, the bridge the engine falls back to, and the way
back once the direct path opens again."""

from __future__ import annotations

import trio

from transport.memory import MemoryNetwork

from ..helpers import ip4
from .test_engine import A_ADDR, A_IN, B_ADDR, B_IN, MemoryBridge, Node, peer_lines, socket_dir  # noqa: F401

BRIDGE = "udp2tcp://203.0.113.9:443"


class CensoredNetwork(MemoryNetwork):
    """Drops every datagram from or to the addresses in `blocked` (UDP blocked at a's uplink);
    the bridge's own address gets through."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: set[tuple[str, int]] = set()

    def carry(self, source, datagrams):
        if source.address in self.blocked:
            self.drops.add("censored", len(datagrams))
            return
        kept = [d for d in datagrams if (d[1][0], d[1][1]) not in self.blocked]
        if len(kept) != len(datagrams):
            self.drops.add("censored", len(datagrams) - len(kept))
        super().carry(source, kept)


async def _start(nursery, net, socket_dir):  # noqa: F811
    def open_bridge(spec, ident, fwmark):
        return MemoryBridge(net, spec, ident)

    a = Node("wga", net, A_ADDR, socket_dir, open_bridge=open_bridge)
    b = Node("wgb", net, B_ADDR, socket_dir)
    await nursery.start(a.engine.run)
    await nursery.start(b.engine.run)
    await b.set(f"private_key={b.key.hex()}", f"listen_port={B_ADDR[1]}", *peer_lines(a, None, f"{A_IN}/32"))
    await a.set(f"private_key={a.key.hex()}", f"listen_port={A_ADDR[1]}", *peer_lines(b, B_ADDR, f"{B_IN}/32"),
                f"wgpy_fallback=direct,{BRIDGE}")
    return a, b


async def _deliver(a, b, text: bytes, within: float) -> float:
    """Keep offering a packet every second until b gets one; returns how long it took."""
    start = trio.current_time()
    with trio.fail_after(within):
        while True:
            a.tun.inject(ip4(A_IN, B_IN, text))
            with trio.move_on_after(1):
                while True:
                    if await b.tun.next_written() == ip4(A_IN, B_IN, text):
                        return trio.current_time() - start


def _in_use(get: str) -> int:
    return int(next(line for line in get.splitlines() if line.startswith("wgpy_fallback_in_use=")).split("=")[1])


async def test_blocked_direct_falls_back_to_the_bridge_then_returns(socket_dir, autojump_clock):  # noqa: F811
    net = CensoredNetwork()
    net.blocked.add(A_ADDR)
    async with trio.open_nursery() as nursery:
        a, b = await _start(nursery, net, socket_dir)
        took = await _deliver(a, b, b"censored", within=60)
        assert 14 <= took <= 21  # three initiations unanswered on the direct path, then the bridge
        get = await a.uapi("get=wgpy\n\n")
        assert _in_use(get) == 1 and f"wgpy_fallback=direct,{BRIDGE}\n" in get
        assert "wgpy_bridge=udp2tcp://203.0.113.9:443\n" in get
        assert net.drops.reasons["censored"] >= 3
        # The censor goes away: the direct path is tried again (30 s after the bridge worked) and kept.
        net.blocked.clear()
        start = trio.current_time()
        while _in_use(await a.uapi("get=wgpy\n\n")) != 0:
            assert trio.current_time() - start < 45
            a.tun.inject(ip4(A_IN, B_IN, b"flowing"))
            await trio.sleep(1)
        await trio.sleep(6)  # the probe's handshake (a new session over the direct path)
        sent_direct = a.udp.sent
        await _deliver(a, b, b"direct again", within=5)
        assert a.udp.sent > sent_direct  # over the UDP port, no bridge
        assert "wgpy_bridge=" not in await a.uapi("get=wgpy\n\n")
        nursery.cancel_scope.cancel()


async def test_fallback_off_keeps_the_way_in_use_and_bad_values_are_refused(socket_dir, autojump_clock):  # noqa: F811
    net = CensoredNetwork()
    net.blocked.add(A_ADDR)
    async with trio.open_nursery() as nursery:
        a, b = await _start(nursery, net, socket_dir)
        await _deliver(a, b, b"x", within=60)
        await a.set(f"public_key={b.public.hex()}", "wgpy_fallback=")
        get = await a.uapi("get=wgpy\n\n")
        assert "wgpy_fallback" not in get and "wgpy_bridge=udp2tcp://203.0.113.9:443\n" in get
        for bad, why in (("direct,,lwo", "way 2 of 3 is empty"), ("direct,direct", "repeats an earlier one"),
                         ("direct,udp2tcp://example.com:443", "IP address")):
            reply = await a.uapi(f"set=1\npublic_key={b.public.hex()}\nwgpy_fallback={bad}\n\n")
            assert reply == "errno=-22\n\n", reply
        await _deliver(a, b, b"still", within=5)
        nursery.cancel_scope.cancel()
