"""LWO in the whole engine, in memory (transport.memory, as tests/unit/test_engine.py): two engines
through a network that drops what a simple DPI rule matches (a WireGuard message type followed by
three zero bytes), roaming, and plain and LWO peers on one listen port."""

from __future__ import annotations

import os
import tempfile

import pytest
import trio

from bridge.lwo import HEADER_SIZES, deobfuscate, is_lwo
from bridge.lwo_transport import LwoPort, LwoTransport
from transport.base import UDP, Endpoint
from transport.memory import MemoryNetwork

from ..helpers import ip4
from .test_engine import A_ADDR, A_IN, B_ADDR, B_IN, Node, peer_lines

C_ADDR, C_IN = ("203.0.113.3", 51823), "10.9.0.3"


def looks_like_wireguard(data: bytes) -> bool:
    return len(data) >= 4 and 1 <= data[0] <= 4 and data[1:4] == b"\x00\x00\x00"


class DpiNetwork(MemoryNetwork):
    """A MemoryNetwork that records every datagram it carries, as (from, to, bytes), and with
    `dpi` on drops the ones that look like WireGuard."""

    def __init__(self, *, dpi: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dpi = dpi
        self.blocked = 0
        self.seen: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []

    def carry(self, source, datagrams):
        passed = []
        for data, endpoint in datagrams:
            data = bytes(data)
            if self.dpi and looks_like_wireguard(data):
                self.blocked += 1
                continue
            self.seen.append((source.address, (endpoint[0], endpoint[1]), data))
            passed.append((data, endpoint))
        super().carry(source, passed)

    def between(self, x: tuple[str, int], y: tuple[str, int]) -> list[bytes]:
        return [d for s, t, d in self.seen if {s, t} == {x, y}]


@pytest.fixture
def socket_dir():
    with tempfile.TemporaryDirectory(prefix="wgpy-lwo-test-") as d:
        yield d


async def start(nursery, net, socket_dir, *addresses):
    nodes = []
    for i, address in enumerate(addresses):
        node = Node(f"wg{i}", net, address, socket_dir)
        await nursery.start(node.engine.run)
        nodes.append(node)
    return nodes


async def configure(node: Node, port: int, *peers: list[str]) -> None:
    await node.set(f"private_key={node.key.hex()}", f"listen_port={port}", *[line for p in peers for line in p])


async def test_the_dpi_rule_blocks_plain_wireguard(socket_dir, autojump_clock):
    net = DpiNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, socket_dir, A_ADDR, B_ADDR)
        await configure(a, A_ADDR[1], peer_lines(b, B_ADDR, f"{B_IN}/32"))
        await configure(b, B_ADDR[1], peer_lines(a, None, f"{A_IN}/32"))
        a.tun.inject(ip4(A_IN, B_IN, b"plain"))
        await trio.sleep(30)
        assert not b.tun.written and net.blocked >= 3  # the initiation and its retries
        assert a.engine.device.stats["handshakes completed"] == 0
        nursery.cancel_scope.cancel()


async def test_lwo_pair_gets_through_the_dpi_rule(socket_dir, autojump_clock):
    """Handshake, data both ways and ten minutes of keepalives: every datagram on the wire is LWO,
    of the sizes plain WireGuard would have (zero overhead), and the responder, which learnt the
    initiator's address from its packets, answers in LWO too."""
    net = DpiNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, socket_dir, A_ADDR, B_ADDR)
        await configure(a, A_ADDR[1], peer_lines(b, B_ADDR, f"{B_IN}/32", keepalive=25) + ["wgpy_obfuscation=lwo"])
        await configure(b, B_ADDR[1], peer_lines(a, None, f"{A_IN}/32") + ["wgpy_obfuscation=lwo"])
        a.tun.inject(ip4(A_IN, B_IN, b"ping" * 100))
        with trio.fail_after(10):
            assert await b.tun.next_written() == ip4(A_IN, B_IN, b"ping" * 100)
        b.tun.inject(ip4(B_IN, A_IN, b"pong"))
        with trio.fail_after(10):
            assert await a.tun.next_written() == ip4(B_IN, A_IN, b"pong")
        await trio.sleep(600)
        assert net.blocked == 0
        wire = net.between(A_ADDR, B_ADDR)
        assert len(wire) >= 20 and all(is_lwo(d) for d in wire)
        sizes = {len(d) for d in wire}
        assert {148, 92, 32} <= sizes  # initiation, response, keepalive: WireGuard's own sizes
        # ping: IPv4 20 + 400 bytes, padded to 16, + 32 of WireGuard
        assert 32 + (20 + 400 + 15) // 16 * 16 in sizes
        # b's peer a: the address it learnt, as LWO (the LWO side of the port: answered as it sent).
        lwo_a = b.engine.lwo[a.public]
        assert b.engine.device.peers[a.public].endpoint == Endpoint(*A_ADDR, b.engine._lwo_port.ident)
        assert lwo_a.sent >= 3 and b.engine.udp.sent == lwo_a.sent and b.engine._lwo_port.sent >= 3
        assert "wgpy_obfuscation=lwo\n" in await b.uapi("get=wgpy\n\n")
        assert "wgpy_obfuscation" not in await b.uapi("get=1\n\n")
        nursery.cancel_scope.cancel()


async def test_lwo_peer_roams_and_stays_lwo(socket_dir):
    """The initiator moves to another port (a NAT rebinding): the responder follows it, still in
    LWO, and its reply reaches the new address."""
    net = DpiNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, socket_dir, A_ADDR, B_ADDR)
        await configure(a, A_ADDR[1], peer_lines(b, B_ADDR, f"{B_IN}/32") + ["wgpy_obfuscation=lwo"])
        await configure(b, B_ADDR[1], peer_lines(a, A_ADDR, f"{A_IN}/32") + ["wgpy_obfuscation=lwo"])
        a.tun.inject(ip4(A_IN, B_IN, b"before"))
        with trio.fail_after(5):
            await b.tun.next_written()
        moved = (A_ADDR[0], 40000)
        await a.set("listen_port=40000")
        a.tun.inject(ip4(A_IN, B_IN, b"after"))
        with trio.fail_after(5):
            assert await b.tun.next_written() == ip4(A_IN, B_IN, b"after")
        peer_a = b.engine.device.peers[a.public]
        assert peer_a.endpoint == Endpoint(*moved, b.engine._lwo_port.ident) and not peer_a.pinned
        b.tun.inject(ip4(B_IN, A_IN, b"reply"))
        with trio.fail_after(5):
            assert await a.tun.next_written() == ip4(B_IN, A_IN, b"reply")
        to_moved = [d for s, t, d in net.seen if t == moved]
        assert to_moved and all(is_lwo(d) for d in to_moved)
        assert net.blocked == 0
        nursery.cancel_scope.cancel()


async def test_plain_and_lwo_peers_share_one_listen_port(socket_dir):
    """A server with a plain peer and an LWO peer on one port: each gets its own format, both
    ways, from the first datagram; nothing plain goes to the LWO peer, nothing LWO to the other."""
    net = DpiNetwork(dpi=False)
    async with trio.open_nursery() as nursery:
        s, plain, obf = await start(nursery, net, socket_dir, A_ADDR, B_ADDR, C_ADDR)
        await configure(s, A_ADDR[1], peer_lines(plain, None, f"{B_IN}/32"),
                        peer_lines(obf, None, f"{C_IN}/32") + ["wgpy_obfuscation=lwo"])
        await configure(plain, B_ADDR[1], peer_lines(s, A_ADDR, f"{A_IN}/32"))
        await configure(obf, C_ADDR[1], peer_lines(s, A_ADDR, f"{A_IN}/32") + ["wgpy_obfuscation=lwo"])
        for client, address in ((plain, B_IN), (obf, C_IN)):
            client.tun.inject(ip4(address, A_IN, b"hello from " + address.encode()))
        got = set()
        with trio.fail_after(5):
            while len(got) < 2:
                got.add(await s.tun.next_written())
        assert got == {ip4(B_IN, A_IN, b"hello from " + B_IN.encode()), ip4(C_IN, A_IN, b"hello from " + C_IN.encode())}
        s.tun.inject(ip4(A_IN, B_IN, b"to plain"), ip4(A_IN, C_IN, b"to lwo"))
        with trio.fail_after(5):
            assert await plain.tun.next_written() == ip4(A_IN, B_IN, b"to plain")
            assert await obf.tun.next_written() == ip4(A_IN, C_IN, b"to lwo")
        plain_wire, lwo_wire = net.between(A_ADDR, B_ADDR), net.between(A_ADDR, C_ADDR)
        assert len(plain_wire) >= 4 and all(looks_like_wireguard(d) for d in plain_wire)
        assert len(lwo_wire) >= 4 and all(is_lwo(d) for d in lwo_wire)
        assert s.engine.device.peers[plain.public].endpoint == Endpoint(*B_ADDR, UDP)
        assert not s.engine.device.drops.get("unknown message type")
        nursery.cancel_scope.cancel()


async def test_lwo_from_a_peer_not_configured_for_it_is_never_answered(socket_dir, autojump_clock):
    """The server has one LWO peer (so it reads LWO) and a plain peer that sends LWO anyway: its
    initiations are read, but the answer has no LWO key to go out with and nothing plain
    answers an LWO datagram, so no handshake completes."""
    net = DpiNetwork(dpi=False)
    async with trio.open_nursery() as nursery:
        s, wrong, other = await start(nursery, net, socket_dir, A_ADDR, B_ADDR, C_ADDR)
        await configure(s, A_ADDR[1], peer_lines(wrong, None, f"{B_IN}/32"),
                        peer_lines(other, None, f"{C_IN}/32") + ["wgpy_obfuscation=lwo"])
        await configure(wrong, B_ADDR[1], peer_lines(s, A_ADDR, f"{A_IN}/32") + ["wgpy_obfuscation=lwo"])
        wrong.tun.inject(ip4(B_IN, A_IN, b"x"))
        await trio.sleep(12)
        assert not s.tun.written and wrong.engine.device.stats["handshakes completed"] == 0
        assert s.engine._lwo_port.drops.reasons["no LWO peer at this address"] >= 2
        assert not net.between(A_ADDR, B_ADDR) or all(is_lwo(d) for d in net.between(A_ADDR, B_ADDR))
        assert all(s_ == B_ADDR for s_, t, d in net.seen)  # the server never sent anything
        nursery.cancel_scope.cancel()


async def test_without_lwo_peers_the_port_reads_no_lwo(socket_dir, autojump_clock):
    net = DpiNetwork(dpi=False)
    async with trio.open_nursery() as nursery:
        s, c = await start(nursery, net, socket_dir, A_ADDR, B_ADDR)
        await configure(s, A_ADDR[1], peer_lines(c, None, f"{B_IN}/32"))
        await configure(c, B_ADDR[1], peer_lines(s, A_ADDR, f"{A_IN}/32") + ["wgpy_obfuscation=lwo"])
        c.tun.inject(ip4(B_IN, A_IN, b"x"))
        await trio.sleep(6)
        assert not s.tun.written and s.engine._lwo_open is None
        assert s.engine.device.drops["unknown message type"] >= 1
        nursery.cancel_scope.cancel()


async def test_junk_with_the_lwo_bit_is_dropped_and_the_tunnel_goes_on(socket_dir):
    net = DpiNetwork(dpi=False)
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, socket_dir, A_ADDR, B_ADDR)
        await configure(a, A_ADDR[1], peer_lines(b, B_ADDR, f"{B_IN}/32") + ["wgpy_obfuscation=lwo"])
        await configure(b, B_ADDR[1], peer_lines(a, A_ADDR, f"{A_IN}/32") + ["wgpy_obfuscation=lwo"])
        junk = net.attach(("192.0.2.66", 6666))
        b_key = b.engine.device.public_key
        samples = [b"", b"\x01", bytes([0x00, 0x80]), os.urandom(1) + b"\x80" + os.urandom(5),
                   bytes([4 ^ b_key[0], 0xFF]) + os.urandom(10), bytes([1 ^ b_key[0], 0x81]) + os.urandom(147)]
        samples += [bytes([i, 0x80 | i]) + os.urandom(i * 7) for i in range(256)]
        junk.send([(d, Endpoint(*B_ADDR)) for d in samples])
        a.tun.inject(ip4(A_IN, B_IN, b"still"))
        with trio.fail_after(5):
            assert await b.tun.next_written() == ip4(A_IN, B_IN, b"still")
        assert b.engine._lwo_port.drops.reasons["not an LWO message"] >= 200
        assert not b.engine.io_drops
        nursery.cancel_scope.cancel()


async def test_obfuscation_off_and_peer_removal(socket_dir):
    net = DpiNetwork(dpi=False)
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, socket_dir, A_ADDR, B_ADDR)
        await configure(a, A_ADDR[1], peer_lines(b, B_ADDR, f"{B_IN}/32") + ["wgpy_obfuscation=lwo"])
        await configure(b, B_ADDR[1], peer_lines(a, A_ADDR, f"{A_IN}/32"))
        lwo_b = a.engine.lwo[b.public]
        peer_b = a.engine.device.peers[b.public]
        assert peer_b.endpoint == Endpoint(*B_ADDR, lwo_b.ident)
        await a.set(f"public_key={b.public.hex()}", "wgpy_obfuscation=lwo")  # the same again: kept
        assert a.engine.lwo[b.public] is lwo_b
        await a.set(f"public_key={b.public.hex()}", "wgpy_obfuscation=")
        assert peer_b.endpoint == Endpoint(*B_ADDR, UDP) and peer_b.roam_via is None
        assert lwo_b.closed and lwo_b.ident not in a.engine.transports and a.engine._lwo_open is None
        a.tun.inject(ip4(A_IN, B_IN, b"plain now"))
        with trio.fail_after(5):
            assert await b.tun.next_written() == ip4(A_IN, B_IN, b"plain now")
        # LWO again, then `wg setconf` (replace_peers) without the extension: LWO is gone with
        # the old peer, as a bridge is.
        await a.set(f"public_key={b.public.hex()}", "wgpy_obfuscation=lwo")
        assert a.engine._lwo_open is not None
        await configure(a, A_ADDR[1], ["replace_peers=true"] + peer_lines(b, B_ADDR, f"{B_IN}/32"))
        assert not a.engine.lwo and a.engine._lwo_open is None
        assert a.engine.device.peers[b.public].endpoint == Endpoint(*B_ADDR, UDP)
        reply = await a.uapi(f"set=1\npublic_key={b.public.hex()}\nwgpy_obfuscation=xor\n\n")
        assert reply == "errno=-22\n\n"
        nursery.cancel_scope.cancel()


async def test_lwo_transports_keep_back_pressure_and_answer_known_addresses():
    """Direct: what would block comes back in its plain form; the port's own send (a cookie reply
    to an LWO source) uses the key of the LWO peer last sent to at that address, else drops."""
    net = MemoryNetwork()
    udp = net.attach(A_ADDR)
    far = net.attach(B_ADDR)
    port = LwoPort(5, udp)
    key = os.urandom(32)
    peer = LwoTransport(6, key, port)
    message = bytes([4, 0, 0, 0]) + os.urandom(60)
    udp.block()
    batch = [(message, peer.endpoint(B_ADDR))] * 3
    assert peer.send(batch) == batch
    udp.unblock()
    assert peer.send(batch) == [] and peer.sent == 3
    cookie = bytes([3, 0, 0, 0]) + os.urandom(60)
    assert port.send([(cookie, Endpoint(*B_ADDR, 5)), (cookie, Endpoint("192.0.2.9", 1, 5))]) == []
    assert port.drops.reasons["no LWO peer at this address"] == 1
    got = [d for d, _ in await far.receivers()[0]()]
    assert len(got) == 4 and all(deobfuscate(d, key) in (message, cookie) for d in got)
    assert deobfuscate(got[-1], key) == cookie and HEADER_SIZES[3] == len(cookie)
    peer.close()
    assert port.send([(cookie, Endpoint(*B_ADDR, 5))]) == [] and port.drops.reasons["no LWO peer at this address"] == 2


async def test_wgpy_set_obfuscation_on_a_running_engine(socket_dir, autojump_clock, monkeypatch):
    """`wgpy set IFNAME peer KEY obfuscation lwo|off` (quick.set_peers, through the engine's UAPI
    socket): a client blocked by the DPI rule gets through once it is set to LWO, and `off` makes
    it plain (and blocked) again."""
    from functools import partial  # noqa: PLC0415

    from tunnel import quick, uapi  # noqa: PLC0415

    monkeypatch.setattr(quick.uapi, "get_status", partial(uapi.get_status, socket_dir=socket_dir))
    monkeypatch.setattr(quick.uapi, "set_config", partial(uapi.set_config, socket_dir=socket_dir))

    async def in_thread(func, *args):
        """A blocking UAPI client (as the `wgpy` command is) with the mock clock held still: it
        must not jump over the UAPI server's idle timeout while the thread talks to it."""
        autojump_clock.autojump_threshold = float("inf")
        try:
            return await trio.to_thread.run_sync(func, *args)
        finally:
            autojump_clock.autojump_threshold = 0

    net = DpiNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, socket_dir, A_ADDR, B_ADDR)
        await configure(a, A_ADDR[1], peer_lines(b, B_ADDR, f"{B_IN}/32"))
        await configure(b, B_ADDR[1], peer_lines(a, None, f"{A_IN}/32") + ["wgpy_obfuscation=lwo"])
        a.tun.inject(ip4(A_IN, B_IN, b"plain"))
        await trio.sleep(6)
        assert not b.tun.written and net.blocked
        await in_thread(quick.set_peers, a.engine.ifname, [(b.public, "obfuscation", "lwo")])
        assert "wgpy_obfuscation=lwo\n" in await a.uapi("get=wgpy\n\n")
        assert a.engine.device.peers[b.public].endpoint == Endpoint(*B_ADDR, a.engine.lwo[b.public].ident)
        a.tun.inject(ip4(A_IN, B_IN, b"obfuscated"))
        with trio.fail_after(10):
            while await b.tun.next_written() != ip4(A_IN, B_IN, b"obfuscated"):
                pass
        status = await in_thread(quick.uapi.get_status, a.engine.ifname)
        assert status.peers[0].obfuscation == "lwo"
        await in_thread(quick.set_peers, a.engine.ifname, [(b.public, "obfuscation", None)])
        assert "wgpy_obfuscation" not in await a.uapi("get=wgpy\n\n") and not a.engine.lwo
        blocked = net.blocked
        a.tun.inject(ip4(A_IN, B_IN, b"plain again"))
        await trio.sleep(1)
        assert net.blocked > blocked and ip4(A_IN, B_IN, b"plain again") not in b.tun.written
        nursery.cancel_scope.cancel()


async def test_a_direct_lwo_client_returns_to_direct_once_the_dpi_block_is_lifted(socket_dir, autojump_clock):
    """A server with its client set to LWO answers it in the form its latest authenticated
    datagram came in: a client with `Bridge = direct, lwo` falls back to LWO while the DPI rule
    blocks plain WireGuard, and comes back to direct (plain, both ways) once the block is lifted;
    while it uses LWO, nothing plain goes to it."""
    from .test_fallback_engine import _deliver, _in_use  # noqa: PLC0415

    net = DpiNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, socket_dir, A_ADDR, B_ADDR)
        await configure(b, B_ADDR[1], peer_lines(a, None, f"{A_IN}/32") + ["wgpy_obfuscation=lwo"])
        await configure(a, A_ADDR[1], peer_lines(b, B_ADDR, f"{B_IN}/32") + ["wgpy_fallback=direct,lwo"])
        took = await _deliver(a, b, b"blocked", within=60)
        assert 14 <= took <= 21 and _in_use(await a.uapi("get=wgpy\n\n")) == 1
        assert net.blocked >= 3 and all(is_lwo(d) for d in net.between(A_ADDR, B_ADDR))
        # The block is lifted: the direct way is probed 30 s after LWO worked, and kept.
        net.dpi = False
        seen = len(net.seen)
        start_ = trio.current_time()
        while _in_use(await a.uapi("get=wgpy\n\n")) != 0:
            assert trio.current_time() - start_ < 45
            a.tun.inject(ip4(A_IN, B_IN, b"flowing"))
            await trio.sleep(1)
        await trio.sleep(20)  # longer than a way takes to fail (15 s): direct is kept
        assert _in_use(await a.uapi("get=wgpy\n\n")) == 0
        await _deliver(a, b, b"direct again", within=5)
        b.tun.inject(ip4(B_IN, A_IN, b"back"))
        with trio.fail_after(5):
            while await a.tun.next_written() != ip4(B_IN, A_IN, b"back"):
                pass
        assert b.engine.device.peers[a.public].endpoint == Endpoint(*A_ADDR, UDP)
        assert b.engine.lwo[a.public]  # still an LWO peer: it is answered as it sends
        # From the probe's plain initiation on, plain both ways: the server answered it plainly.
        after = [(s_, d) for s_, t, d in net.seen[seen:]]
        probe = next(i for i, (s_, d) in enumerate(after) if s_ == A_ADDR and looks_like_wireguard(d) and d[0] == 1)
        assert after[probe + 1][0] == B_ADDR and after[probe + 1][1][:4] == b"\x02\x00\x00\x00"
        assert all(looks_like_wireguard(d) for _, d in after[probe:]), [(s_, d[:4]) for s_, d in after[probe:]]
        assert sum(s_ == B_ADDR for s_, _ in after[probe:]) >= 2  # the response, and data
        nursery.cancel_scope.cancel()


async def test_only_an_authenticated_plain_datagram_gets_a_plain_answer(socket_dir):
    """An LWO peer is answered plainly only after a plain datagram that authenticated: a replay of
    one of its datagrams in plain form (stripped of LWO by someone who knows the server's key),
    a forged initiation or a data message that does not decrypt, from its very address, leave
    the answers LWO."""
    net = DpiNetwork(dpi=False)
    async with trio.open_nursery() as nursery:
        a, b = await start(nursery, net, socket_dir, A_ADDR, B_ADDR)
        await configure(a, A_ADDR[1], peer_lines(b, B_ADDR, f"{B_IN}/32") + ["wgpy_obfuscation=lwo"])
        await configure(b, B_ADDR[1], peer_lines(a, None, f"{A_IN}/32") + ["wgpy_obfuscation=lwo"])
        a.tun.inject(ip4(A_IN, B_IN, b"first"))
        with trio.fail_after(5):
            assert await b.tun.next_written() == ip4(A_IN, B_IN, b"first")
        peer_a = b.engine.device.peers[a.public]
        lwo_side = Endpoint(*A_ADDR, b.engine._lwo_port.ident)
        assert peer_a.endpoint == lwo_side
        # What a sent, in plain form, sent again from a's own address.
        b_key = b.engine.device.public_key
        sent = [deobfuscate(d, b_key) for s_, t, d in net.seen if s_ == A_ADDR]
        data = [d for d in sent if d is not None and d[0] == 4 and len(d) > 32]
        assert data
        forged = [data[-1],  # a replay: its counter was seen
                  bytes([1, 0, 0, 0]) + os.urandom(144),  # an initiation: no valid mac1
                  data[-1][:16] + os.urandom(len(data[-1]) - 16)]  # data that does not decrypt
        drops = dict(b.engine.device.drops)
        a.udp.send([(d, Endpoint(*B_ADDR)) for d in forged])
        await trio.sleep(0.5)
        assert sum(b.engine.device.drops.values()) >= sum(drops.values()) + 3, b.engine.device.drops
        assert peer_a.endpoint == lwo_side
        wire = len(net.seen)
        b.tun.inject(ip4(B_IN, A_IN, b"still lwo"))
        with trio.fail_after(5):
            assert await a.tun.next_written() == ip4(B_IN, A_IN, b"still lwo")
        from_b = [d for s_, t, d in net.seen[wire:] if s_ == B_ADDR]
        assert from_b and all(is_lwo(d) for d in from_b)
        nursery.cancel_scope.cancel()


async def test_the_port_answers_the_lwo_peer_whose_endpoint_it_is():
    """LwoPort.send: a datagram to Endpoint(host, port, port.ident) goes out obfuscated with the
    key of the LWO peer whose endpoint that is (found among its peers, then by address); none,
    or one that has moved since: dropped."""
    from types import SimpleNamespace  # noqa: PLC0415

    net = MemoryNetwork()
    udp = net.attach(A_ADDR)
    far = net.attach(B_ADDR)
    port = LwoPort(5, udp)
    to_far = Endpoint(*B_ADDR, 5)
    keys = os.urandom(32), os.urandom(32)
    peers = SimpleNamespace(endpoint=Endpoint("192.0.2.7", 7, 5)), SimpleNamespace(endpoint=to_far)
    transports = [LwoTransport(6 + i, k, port, p) for i, (k, p) in enumerate(zip(keys, peers))]
    message = bytes([4, 0, 0, 0]) + os.urandom(60)
    assert port.send([(message, to_far)] * 2) == [] and port.by_address[B_ADDR] is transports[1]
    got = [d for d, _ in await far.receivers()[0]()]
    assert len(got) == 2 and all(deobfuscate(d, keys[1]) == message for d in got)
    assert transports[1].sent == 2 and not transports[0].sent
    peers[1].endpoint = Endpoint(*B_ADDR, UDP)  # its latest datagram came plain: not ours to answer
    assert port.send([(message, to_far)]) == [] and port.drops.reasons["no LWO peer at this address"] == 1
    transports[1].close()
    peers[1].endpoint = to_far
    assert port.send([(message, to_far)]) == [] and port.drops.reasons["no LWO peer at this address"] == 2
