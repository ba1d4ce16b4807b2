"""The whole engine (TUN reader, transport receivers, timers, UAPI server, bridges) in memory:
transport.memory doubles instead of a TUN device and sockets, so no root and no namespaces.
Two engines talk through a MemoryNetwork that can lose, duplicate and reorder datagrams; a
driven clock (trio's MockClock) runs hours of protocol time in a second."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
import trio
import trio.testing

from bridge.carrier import BridgeTransport
from bridge.spec import parse_bridge
from transport.base import UDP, Endpoint
from transport.memory import MemoryNetwork, MemoryTransport, MemoryTun
from transport.udp import UdpTransport
from tunnel import uapi
from tunnel import engine as engine_module
from tunnel.engine import Engine
from tunnel.keys import generate_private_key
from tunnel.noise.crypto import public_key

from ..helpers import ip4, ip6

A_ADDR, B_ADDR = ("192.0.2.1", 51820), ("198.51.100.2", 51821)
A_IN, B_IN = "10.9.0.1", "10.9.0.2"
A_IN6, B_IN6 = "fd00:9::1", "fd00:9::2"


class Node:
    def __init__(self, name: str, net: MemoryNetwork, address, socket_dir: str, **engine_options) -> None:
        self.key = generate_private_key()
        self.public = public_key(self.key)
        self.tun = MemoryTun(name)
        self.udp = net.attach(address)
        self.engine = Engine(name, socket_dir=socket_dir, tun=self.tun, udp=self.udp, **engine_options)

    async def uapi(self, request: str) -> str:
        """One request through the engine's UAPI socket, as `wg` sends it."""
        stream = await trio.open_unix_socket(self.engine.socket_path)
        async with stream:
            await stream.send_all(request.encode())
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = await stream.receive_some(65536)
                assert chunk, reply
                reply += chunk
        return reply.decode()

    async def set(self, *lines: str) -> None:
        reply = await self.uapi("set=1\n" + "".join(f"{line}\n" for line in lines) + "\n")
        assert reply == "errno=0\n\n", reply


def peer_lines(node: Node, endpoint, *allowed: str, keepalive: int = 0) -> list[str]:
    lines = [f"public_key={node.public.hex()}", "replace_allowed_ips=true"]
    if endpoint is not None:
        host, port = endpoint
        lines.append(f"endpoint={'[' + host + ']' if ':' in host else host}:{port}")
    lines += [f"allowed_ip={a}" for a in allowed]
    if keepalive:
        lines.append(f"persistent_keepalive_interval={keepalive}")
    return lines


@pytest.fixture
def socket_dir():
    with tempfile.TemporaryDirectory(prefix="wgpy-engine-test-") as d:
        yield d


async def start_pair(nursery, net: MemoryNetwork, socket_dir: str, *, b_knows_a: bool = True,
                     keepalive: int = 0):
    a = Node("wga", net, A_ADDR, socket_dir)
    b = Node("wgb", net, B_ADDR, socket_dir)
    await nursery.start(a.engine.run)
    await nursery.start(b.engine.run)
    await a.set(f"private_key={a.key.hex()}", f"listen_port={A_ADDR[1]}",
                *peer_lines(b, B_ADDR, f"{B_IN}/32", f"{B_IN6}/128", keepalive=keepalive))
    await b.set(f"private_key={b.key.hex()}", f"listen_port={B_ADDR[1]}",
                *peer_lines(a, A_ADDR if b_knows_a else None, f"{A_IN}/32", f"{A_IN6}/128"))
    return a, b


async def test_two_engines_carry_ip_packets_both_ways(socket_dir):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir, b_knows_a=False)
        ping = ip4(A_IN, B_IN, b"ping")
        a.tun.inject(ping)
        with trio.fail_after(5):
            assert await b.tun.next_written() == ping
        # b learnt a's endpoint from the handshake (roaming), so it can answer.
        pong = ip6(B_IN6, A_IN6, b"pong")
        b.tun.inject(pong)
        with trio.fail_after(5):
            assert await a.tun.next_written() == pong
        get = await b.uapi("get=1\n\n")
        assert f"endpoint={A_ADDR[0]}:{A_ADDR[1]}\n" in get
        assert b.engine.device.peers[a.public].endpoint == Endpoint(*A_ADDR, UDP)
        nursery.cancel_scope.cancel()
    assert not os.path.exists(a.engine.socket_path)  # removed on the way out


async def test_a_packet_to_no_peer_is_counted_and_the_engine_goes_on(socket_dir):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir)
        a.tun.inject(ip4(A_IN, "10.99.0.1"), b"\x00garbage", ip4(A_IN, B_IN, b"after"))
        with trio.fail_after(5):
            assert await b.tun.next_written() == ip4(A_IN, B_IN, b"after")
        drops = a.engine.device.drops
        assert drops["no peer for destination"] == 1 and drops["invalid outbound packet"] == 1
        nursery.cancel_scope.cancel()


async def test_back_pressure_waits_instead_of_dropping(socket_dir):
    """A transport that would block gets the datagrams again once writable: nothing is lost."""
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir)
        a.tun.inject(ip4(A_IN, B_IN, b"first"))
        with trio.fail_after(5):
            await b.tun.next_written()
        a.udp.block()
        packets = [ip4(A_IN, B_IN, b"n%03d" % i) for i in range(300)]
        a.tun.inject(*packets)
        await trio.sleep(0.05)
        assert a.udp.would_block_count >= 1 and not b.tun.written
        a.udp.unblock()
        got = []
        with trio.fail_after(5):
            while len(got) < len(packets):
                got.append(await b.tun.next_written())
        assert got == packets
        assert not a.udp.drops.total and not a.engine.io_drops
        nursery.cancel_scope.cancel()


async def test_tun_queue_full_drops_are_counted(socket_dir):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir)
        b.tun.queue = 5
        a.tun.inject(*[ip4(A_IN, B_IN, b"x%02d" % i) for i in range(20)])
        with trio.fail_after(5):
            while b.tun.drops.total + len(b.tun.written) < 20:
                await trio.sleep(0.01)
        assert len(b.tun.written) == 5 and b.tun.drops.reasons["tun write queue full"] == 15
        nursery.cancel_scope.cancel()


async def test_listen_port_change_moves_the_receivers(socket_dir):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir)
        a.tun.inject(ip4(A_IN, B_IN, b"one"))
        with trio.fail_after(5):
            await b.tun.next_written()
        await b.set("listen_port=40000")
        assert "listen_port=40000\n" in await b.uapi("get=1\n\n")
        await a.set(f"public_key={b.public.hex()}", "endpoint=198.51.100.2:40000")
        a.tun.inject(ip4(A_IN, B_IN, b"two"))
        with trio.fail_after(5):
            assert await b.tun.next_written() == ip4(A_IN, B_IN, b"two")
        nursery.cancel_scope.cancel()


async def test_bad_uapi_request_is_refused_and_the_tunnel_goes_on(socket_dir):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir)
        assert await a.uapi("set=1\nlisten_port=banana\n\n") == "errno=-22\n\n"
        a.tun.inject(ip4(A_IN, B_IN, b"still"))
        with trio.fail_after(5):
            assert await b.tun.next_written() == ip4(A_IN, B_IN, b"still")
        nursery.cancel_scope.cancel()


async def test_lossy_link_hours_of_rekeys_keep_the_tunnel_alive(socket_dir, autojump_clock):
    """20% loss, duplicates and reordering, three hours of driven clock: handshakes retry through
    the loss, sessions rekey every two minutes or so, and traffic keeps getting through."""
    net = MemoryNetwork(loss=0.2, duplicate=0.05, reorder=0.05, seed=7)
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir, keepalive=25)
        delivered = sent = 0
        start = trio.current_time()
        while trio.current_time() - start < 3 * 3600:
            a.tun.inject(ip4(A_IN, B_IN, b"t=%d" % sent))
            sent += 1
            await trio.sleep(20)
            delivered += len(b.tun.written)
            b.tun.written.clear()
        handshakes = a.engine.device.stats["handshakes completed"]
        assert handshakes >= 3 * 3600 / 180, a.engine.device.stats
        assert delivered >= 0.6 * sent, (delivered, sent)
        assert net.drops.reasons["lost"] > 100
        nursery.cancel_scope.cancel()


class MemoryBridge(MemoryTransport, BridgeTransport):
    """A bridge transport on the memory network: what `open_bridge` makes, without sockets."""

    def __init__(self, net: MemoryNetwork, spec, ident: int) -> None:
        MemoryTransport.__init__(self, net, ("203.0.113.9", 9000 + ident), ident=ident)
        net.transports[self.address] = self  # the bridge server's side of the network
        self.spec = spec


def memory_bridges(net: MemoryNetwork):
    """An engine's `open_bridge` that makes MemoryBridges on `net`, and the list of those made."""
    made: list[MemoryBridge] = []

    def open_bridge(spec, ident, fwmark):
        made.append(MemoryBridge(net, spec, ident))
        return made[-1]
    return open_bridge, made


async def test_bridged_peer_goes_through_its_transport_and_is_pinned(socket_dir):
    """A peer with a bridge: its datagrams leave through the bridge's transport, never the UDP
    port; an authentic packet arriving over UDP is accepted but does not move it."""
    net = MemoryNetwork()
    open_bridge, bridges = memory_bridges(net)

    async with trio.open_nursery() as nursery:
        a = Node("wga", net, A_ADDR, socket_dir, open_bridge=open_bridge)
        b = Node("wgb", net, B_ADDR, socket_dir)
        await nursery.start(a.engine.run)
        await nursery.start(b.engine.run)
        await b.set(f"private_key={b.key.hex()}", f"listen_port={B_ADDR[1]}",
                    *peer_lines(a, None, f"{A_IN}/32"))
        await a.set(f"private_key={a.key.hex()}", f"listen_port={A_ADDR[1]}",
                    *peer_lines(b, B_ADDR, f"{B_IN}/32"),
                    "wgpy_bridge=udp2tcp://203.0.113.9:443")
        (bridge,) = bridges
        peer_b = a.engine.device.peers[b.public]
        assert peer_b.endpoint == Endpoint(*B_ADDR, bridge.ident) and peer_b.pinned
        a.tun.inject(ip4(A_IN, B_IN, b"bridged"))
        with trio.fail_after(5):
            assert await b.tun.next_written() == ip4(A_IN, B_IN, b"bridged")
        assert bridge.sent >= 2 and a.udp.sent == 0  # initiation + data, all via the bridge
        # b answers to where the handshake came from: the bridge's address...
        assert b.engine.device.peers[a.public].endpoint == Endpoint(*bridge.address, UDP)
        # ...now b sends straight to a's UDP port: accepted, but a keeps using the bridge.
        await b.set(f"public_key={a.public.hex()}", f"endpoint={A_ADDR[0]}:{A_ADDR[1]}")
        b.tun.inject(ip4(B_IN, A_IN, b"direct"))
        with trio.fail_after(5):
            assert await a.tun.next_written() == ip4(B_IN, A_IN, b"direct")
        assert peer_b.endpoint == Endpoint(*B_ADDR, bridge.ident)
        get = await a.uapi("get=wgpy\n\n")
        assert "wgpy_bridge=udp2tcp://203.0.113.9:443\n" in get
        # Bridge off: the peer's own endpoint again, over UDP, and the transport is closed.
        await a.set(f"public_key={b.public.hex()}", "wgpy_bridge=")
        assert peer_b.endpoint == Endpoint(*B_ADDR, UDP) and not peer_b.pinned
        assert bridge.closed and bridge.ident not in a.engine.transports
        nursery.cancel_scope.cancel()


async def test_no_brief_poll_where_a_bridge_carries_the_answers(socket_dir, monkeypatch):
    """The brief poll looks at the TUN and the UDP port only. After a batch that went out by a
    bridge, or one that came in by it, the answers come on the bridge's own connection: the
    engine sleeps in trio (where the bridge's task can take them) instead of spinning blind.
    Direct traffic is polled after as before."""
    net = MemoryNetwork()
    open_bridge, bridges = memory_bridges(net)

    async with trio.open_nursery() as nursery:
        a = Node("wga", net, A_ADDR, socket_dir, open_bridge=open_bridge)
        b = Node("wgb", net, B_ADDR, socket_dir)
        polls = []

        async def poll_briefly():
            polls.append(trio.current_time())
        for node in (a, b):
            node.engine.poll_window = 0.001  # on, as with a real UDP port (the poll itself spied)
        monkeypatch.setattr(a.engine, "_poll_briefly", poll_briefly)
        monkeypatch.setattr(b.engine, "_poll_briefly", lambda: trio.sleep(0))
        await nursery.start(a.engine.run)
        await nursery.start(b.engine.run)
        await b.set(f"private_key={b.key.hex()}", f"listen_port={B_ADDR[1]}", *peer_lines(a, None, f"{A_IN}/32"))
        await a.set(f"private_key={a.key.hex()}", f"listen_port={A_ADDR[1]}", *peer_lines(b, B_ADDR, f"{B_IN}/32"),
                    "wgpy_bridge=udp2tcp://203.0.113.9:443")
        for payload in (b"bridged", b"again"):
            a.tun.inject(ip4(A_IN, B_IN, payload))
            with trio.fail_after(5):
                assert await b.tun.next_written() == ip4(A_IN, B_IN, payload)
            b.tun.inject(ip4(B_IN, A_IN, payload))  # the answer, back through the bridge
            with trio.fail_after(5):
                assert await a.tun.next_written() == ip4(B_IN, A_IN, payload)
        assert bridges[0].sent >= 3 and not polls
        # Direct: the TUN reader's small batch and the UDP receiver's are each followed by a poll.
        await a.set(f"public_key={b.public.hex()}", "wgpy_bridge=")
        a.tun.inject(ip4(A_IN, B_IN, b"direct"))
        with trio.fail_after(5):
            assert await b.tun.next_written() == ip4(A_IN, B_IN, b"direct")
        b.tun.inject(ip4(B_IN, A_IN, b"direct"))
        with trio.fail_after(5):
            assert await a.tun.next_written() == ip4(B_IN, A_IN, b"direct")
        await trio.sleep(0.1)
        assert len(polls) >= 2
        nursery.cancel_scope.cancel()


def test_nested_hops_in_a_bridged_entry_are_answered_by_the_bridge(socket_dir):
    """A nested hop's datagrams travel inside its entry peer: when the entry is bridged, their
    answers come by the bridge too, and the TUN reader does not poll after them."""
    from bridge.nested import NestedTransport
    net = MemoryNetwork()
    engine = Engine("wgn", socket_dir=socket_dir, tun=MemoryTun("wgn"), udp=net.attach(A_ADDR),
                    open_bridge=lambda spec, ident, fwmark: MemoryBridge(net, spec, ident))
    entry, direct_entry = engine.device.add_peer(b"e" * 32), engine.device.add_peer(b"d" * 32)
    engine.set_bridge(entry, parse_bridge("udp2tcp://203.0.113.9:443"))
    nested = {}
    for key, ident in ((entry.public_key, 40), (direct_entry.public_key, 41)):
        nested[key] = transport = NestedTransport.__new__(NestedTransport)
        transport.entry, transport.ident = key, ident
        engine.transports[ident] = transport
    sent = lambda via: [(b"datagram", Endpoint("192.0.2.7", 51820, via))]  # noqa: E731
    assert engine._answered_on_polled_sockets(sent(UDP))
    assert not engine._answered_on_polled_sockets(sent(engine.bridges[entry.public_key].transport.ident))  # the bridge
    assert not engine._answered_on_polled_sockets(sent(40))  # nested in the bridged entry
    assert engine._answered_on_polled_sockets(sent(41))  # nested in a direct one
    assert not engine._answered_on_polled_sockets(sent(UDP) + sent(40))  # any of them decides


async def test_removed_peer_stops_its_bridge(socket_dir):
    net = MemoryNetwork()
    open_bridge, bridges = memory_bridges(net)

    async with trio.open_nursery() as nursery:
        a = Node("wga", net, A_ADDR, socket_dir, open_bridge=open_bridge)
        await nursery.start(a.engine.run)
        other = generate_private_key()
        pk = public_key(other).hex()
        await a.set(f"private_key={a.key.hex()}", f"public_key={pk}", "endpoint=192.0.2.50:1",
                    "wgpy_bridge=udp2tcp://203.0.113.9:443")
        assert len(a.engine.transports) == 2
        await a.set(f"public_key={pk}", "remove=true")
        assert bridges[0].closed and len(a.engine.transports) == 1
        nursery.cancel_scope.cancel()


def test_parse_bridge_used_here_is_the_real_one():
    # The memory bridge above takes a real spec: a typo in the test would not silently pass.
    assert parse_bridge("udp2tcp://203.0.113.9:443").kind == "udp2tcp"


async def test_the_log_names_the_port_in_use_after_a_change(socket_dir, caplog):
    """The listen port is logged each time it is bound, so the log never names a port the
    daemon no longer uses (issue 12: the first line named the random start port only)."""
    caplog.set_level("INFO", logger="wgpy")
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir)
        await a.set("listen_port=41000")
        ports = [r.getMessage() for r in caplog.records if "listening on UDP port" in r.getMessage()]
        assert ports[-1] == "wga: listening on UDP port 41000"
        nursery.cancel_scope.cancel()


class AnsweringTun(MemoryTun):
    """A host whose stack answers every packet written to it at once, as the kernel queues an
    echo reply or a TCP ACK on the TUN before the write returns. The answer is queued without
    waking the TUN reader: only the same wakeup's read can take it."""

    def write_batch(self, packets: list[bytes]) -> None:
        super().write_batch(packets)
        for packet in packets:
            if packet.endswith(b"ping"):
                self._to_engine.append(ip4(B_IN, A_IN, b"pong"))


async def test_the_hosts_immediate_answer_leaves_in_the_same_wakeup(socket_dir):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir)
        b.tun.__class__ = AnsweringTun
        a.tun.inject(ip4(A_IN, B_IN, b"warm-up"))  # the handshake first
        with trio.fail_after(5):
            await b.tun.next_written()
        a.tun.inject(ip4(A_IN, B_IN, b"ping"))
        with trio.fail_after(5):
            assert await a.tun.next_written() == ip4(B_IN, A_IN, b"pong")
        nursery.cancel_scope.cancel()


class PolledUdp(UdpTransport):
    """A UDP transport whose socket has a datagram on the looks in `ready`, never otherwise."""

    def __init__(self, ready=(), size: int = 1) -> None:
        super().__init__()
        self.looks, self.ready, self.size = 0, ready, size

    @property
    def sockets(self):
        return ["sock"]

    def recv_batch(self, sock, limit):
        self.looks += 1
        if self.ready == "always" or self.looks in self.ready:
            return [(b"datagram", Endpoint(*A_ADDR, UDP))] * self.size
        return []


async def test_the_brief_poll_takes_what_arrives_within_its_window(socket_dir, monkeypatch):
    """After a small batch the engine looks at its sockets and TUN for `poll_window` before it
    sleeps: what arrives meanwhile is handled at once and the window starts again; nothing
    arriving, it stops at the end of the window; a full batch or POLL_ROUNDS windows give the
    thread back to trio."""
    udp = PolledUdp(ready=(3,))
    engine = Engine("wgp", socket_dir=socket_dir, tun=MemoryTun("wgp"), udp=udp)
    assert engine.poll_window > 0  # on by default with a real UDP transport
    handled = []
    monkeypatch.setattr(engine, "_inbound", lambda batch: handled.append(len(batch)) or [])
    window = engine.poll_window = 0.05
    start = time.perf_counter()
    await engine._poll_briefly()
    took = time.perf_counter() - start
    assert handled == [1] and udp.looks > 3  # handled, then looked on for another window
    assert window <= took < 20 * window
    engine.tun.inject(ip4(A_IN, B_IN))  # the TUN is looked at too (no key yet: counted, dropped)
    await engine._poll_briefly()
    assert sum(engine.device.drops.values()) == 1 and not engine.tun.read_batch(10)
    # Small traffic all the time: back to trio after POLL_ROUNDS windows.
    udp.ready, udp.looks = "always", 0
    start = time.perf_counter()
    await engine._poll_briefly()
    took = time.perf_counter() - start
    assert engine_module.POLL_ROUNDS * window <= took < engine_module.POLL_ROUNDS * window + 1.0
    # A full batch: back to trio at once.
    udp.size, handled[:] = engine_module.POLL_AFTER, []
    await engine._poll_briefly()
    assert handled == [engine_module.POLL_AFTER]


def test_the_brief_poll_is_off_for_memory_transports_and_by_environment(socket_dir):
    engine = Engine("wgm", socket_dir=socket_dir, tun=MemoryTun("wgm"), udp=MemoryNetwork().attach(A_ADDR))
    assert engine.poll_window == 0.0
    r = subprocess.run([sys.executable, "-c", "import tunnel.engine as e; print(e.POLL_WINDOW)"],
                       env={**os.environ, "WGPY_POLL_US": "0"}, capture_output=True, text=True)
    assert r.stdout.strip() == "0.0", r.stderr


@pytest.mark.parametrize("text, seconds, error", [
    (None, 0.0002, False), ("", 0.0002, False), ("0", 0.0, False), ("1000", 0.001, False),
    ("fast", 0.0002, True), ("-5", 0.0002, True), ("2.5", 0.0002, True), ("999999", 0.0002, True),
])
def test_a_bad_poll_window_setting_is_named_and_the_default_used(text, seconds, error):
    value, message = engine_module._poll_window(text)
    assert value == seconds and bool(message) == error
    if error:
        assert repr(text) in message and "WGPY_POLL_US" in message
