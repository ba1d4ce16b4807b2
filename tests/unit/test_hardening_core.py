"""Issue 12, protocol core and the UDP port: each defect's regression test, and the handshake
flood fault test (in memory, not timed).

7. Setting the listen port to the port already bound (chosen at random at start, then sent back
   by `wg set listen-port` or `wg syncconf`) is no change; a real rebind closes the old sockets
   first (as wireguard-go), and a failed one binds the old port again.
8. Only handshake messages of the right size with a valid mac1 count toward "under load".
9. The handshake rate limiter keys IPv6 sources by their /64 (as the kernel), IPv4 by address.
"""

from __future__ import annotations

import errno
import random
import socket

import pytest
import trio

from tests.helpers import EP_A, Pair, ip4
from transport.base import UDP, Endpoint
from transport.memory import MemoryNetwork, MemoryTransport, MemoryTun
from transport.udp import UdpTransport
from tunnel.engine import Engine
from tunnel.noise import Drop
from tunnel.noise import crypto
from tunnel.noise.constants import HANDSHAKES_PER_BATCH, MSG_COOKIE_REPLY, MSG_INITIATION
from tunnel.noise.device import _source_bytes, _source_host
from tunnel.noise.ratelimit import RateLimiter

from .test_engine import A_ADDR, A_IN, B_IN, Node, socket_dir, start_pair  # noqa: F401 (fixture)

# ---------------------------------------------------------------------------- 7. listen port


def _free_udp_port() -> socket.socket:
    """A UDP socket holding a random port on every IPv4 address (close it when done)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 0))
    return s


def test_udp_rebind_to_its_own_port_succeeds():
    t = UdpTransport()
    try:
        t.bind(0)
        port = t.port
        assert port
        t.bind(port)  # the old sockets are closed first: not EADDRINUSE
        assert t.port == port and t.v4 is not None and t.v4.getsockname()[1] == port
    finally:
        t.close()


def test_udp_failed_rebind_keeps_the_old_port():
    t = UdpTransport()
    busy = _free_udp_port()
    try:
        t.bind(0)
        port = t.port
        with pytest.raises(OSError) as info:
            t.bind(busy.getsockname()[1])
        assert info.value.errno == errno.EADDRINUSE
        assert t.port == port and t.v4 is not None and t.v4.getsockname()[1] == port
        t.bind(0)  # and the transport still works afterwards
        assert t.port and t.v4 is not None
    finally:
        busy.close()
        t.close()


class KernelPortTransport(MemoryTransport):
    """A MemoryTransport whose bind() behaves as sockets that are still open: asking for the
    port they hold is EADDRINUSE (what the engine used to do with a port chosen at random)."""

    def bind(self, port: int) -> None:
        if port == self.port:
            raise OSError(errno.EADDRINUSE, "address in use")
        super().bind(port)


async def test_engine_set_listen_port_to_the_bound_port_is_no_change(socket_dir):  # noqa: F811
    """In memory: the engine compares with the port bound, not with the last one asked for (0)."""
    net = MemoryNetwork()
    a = Node("wga", net, A_ADDR, socket_dir)
    a.udp = net.transports[A_ADDR] = KernelPortTransport(net, A_ADDR)
    a.engine = Engine("wga", socket_dir=socket_dir, tun=a.tun, udp=a.udp)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.engine.run)
        await a.set(f"private_key={a.key.hex()}")  # no listen port: the one it has
        await a.set(f"listen_port={A_ADDR[1]}")  # `wg set wga listen-port <the same>`
        assert a.engine.listen_port == A_ADDR[1]
        nursery.cancel_scope.cancel()


async def test_engine_failed_rebind_keeps_serving_the_old_port(socket_dir):  # noqa: F811
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir)
        net.attach((A_ADDR[0], 51999))  # another socket holds this port on a's host
        reply = await a.uapi("set=1\nlisten_port=51999\n\n")
        assert reply == f"errno=-{errno.EADDRINUSE}\n\n"
        assert a.engine.listen_port == A_ADDR[1]
        b.tun.inject(ip4(B_IN, A_IN, b"still here"))
        with trio.fail_after(5):
            assert await a.tun.next_written() == ip4(B_IN, A_IN, b"still here")
        nursery.cancel_scope.cancel()


async def test_engine_on_real_udp_rebinds_its_random_port(socket_dir):  # noqa: F811
    """The defect itself, on real sockets: started with port 0, then `wg set listen-port <it>` and
    a `wg syncconf`-shaped request with it succeed, the port is unchanged and still receives;
    a busy port fails with EADDRINUSE and the interface keeps its port."""
    key = crypto.clamp(bytes(range(32)))
    udp = UdpTransport()
    engine = Engine("wgr", socket_dir=socket_dir, tun=MemoryTun("wgr"), udp=udp)
    node = Node.__new__(Node)
    node.engine = engine
    busy = _free_udp_port()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            port = engine.listen_port
            assert port
            await node.set(f"private_key={key.hex()}", f"listen_port={port}")
            await node.set(f"private_key={key.hex()}", f"listen_port={port}", "fwmark=0", "replace_peers=true")
            assert engine.listen_port == port
            reply = await node.uapi(f"set=1\nlisten_port={busy.getsockname()[1]}\n\n")
            assert reply == f"errno=-{errno.EADDRINUSE}\n\n"
            assert engine.listen_port == port
            # Still served: a datagram to the port reaches the engine (counted as a drop there).
            before = udp.received
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(50):
                    s.sendto(b"\x04\0\0\0junk", ("127.0.0.1", port))
                    await trio.sleep(0.02)
                    if udp.received > before:
                        break
            assert udp.received > before
            await node.set("listen_port=0")  # a new random port
            assert engine.listen_port
            nursery.cancel_scope.cancel()
    finally:
        busy.close()
        udp.close()


# ---------------------------------------------------------------------------- 8. load


def _junk(rng: random.Random) -> list[bytes]:
    """Handshake-typed datagrams that fail the size or mac1 check."""
    return [
        b"\x01\0\0\0",
        b"\x02\0\0\0",
        b"\x01\0\0\0" + rng.randbytes(144),  # initiation-sized, random mac1
        b"\x02\0\0\0" + rng.randbytes(88),  # response-sized, random mac1
        b"\x01\0\0\0" + rng.randbytes(100),  # wrong size
    ]


def test_junk_handshake_datagrams_never_put_the_device_under_load():
    p = Pair()
    rng = random.Random(7)
    for _ in range(20):  # 20 batches of 128 junk datagrams within one second
        batch = [(d, EP_A) for _ in range(26) for d in _junk(rng)][:128]
        assert p.b.inbound(batch, p.now).to_net == []
        p.now += 0.01
    assert not p.b.under_load(p.now)
    p.handshake()  # a new handshake needs no cookie round trip
    assert p.b.drops[Drop.COOKIE_SENT] == 0
    assert p.sent("b", MSG_COOKIE_REPLY) == []


def test_valid_mac1_handshakes_count_toward_load():
    p = Pair()
    p.handshake()
    init = p.sent("a", MSG_INITIATION)[0].data
    for i in range(16):  # 8 batches of 16 valid-mac1 replays: 128 in a second
        p.b.inbound([(init, Endpoint(f"203.0.113.{j}", 1000 + i, UDP)) for j in range(16)], p.now)
        p.now += 0.01
    assert p.b.under_load(p.now)
    res = p.b.inbound([(init, Endpoint("203.0.113.200", 9, UDP))], p.now)
    assert [d[0] for d, _ in res.to_net] == [MSG_COOKIE_REPLY]


# ---------------------------------------------------------------------------- 9. rate limit keys


def test_ratelimit_key_ipv6_by_64_ipv4_by_address():
    keys = {_source_host(Endpoint(f"2001:db8:1:2:{i:x}::{i:x}", 1000 + i, UDP)) for i in range(1, 200)}
    assert len(keys) == 1
    assert _source_host(Endpoint("2001:db8:1:3::1", 1, UDP)) not in keys  # another /64
    assert _source_host(Endpoint("2001:db8:1:2::1", 1, UDP)) == _source_host(Endpoint("2001:0db8:0001:0002::ffff", 2, UDP))
    v4 = {_source_host(Endpoint(f"192.0.2.{i}", 1, UDP)) for i in range(1, 200)}
    assert len(v4) == 199  # IPv4: every address its own bucket
    assert _source_host(Endpoint("192.0.2.1", 1, UDP)) == _source_host(Endpoint("192.0.2.1", 2, UDP))


@pytest.mark.parametrize("src", [
    None, (), ("",), ("not an ip", 1), (b"\x01\x02", 1), (None, None), 42, ("::1%eth0", 1),
    ("fe80::1%", 1), ("1.2.3.4.5", 1), ("[::1]", 1), ("2001:db8::" + "1" * 500, 1),
])
def test_ratelimit_key_of_garbage_never_raises(src):
    key = _source_host(src)
    assert key == _source_host(src)  # stable
    RateLimiter().allow(key, 0.0)


def _mac2(dev, msg: bytes, src: Endpoint) -> bytes:
    """`msg` (an initiation with a valid mac1) with the mac2 the device expects from `src`."""
    checker = dev.cookie_checker
    cookie = crypto.mac(checker._secret, _source_bytes(src))
    return msg[:-16] + crypto.mac(cookie, msg[:-16])


def test_many_sources_in_one_64_share_one_rate_limit_bucket():
    p = Pair()
    p.b.handshake_load_threshold = 1
    p.send_a()  # under load: b answers with a cookie reply (and so has a cookie secret)
    init = p.sent("a", MSG_INITIATION)[0].data
    assert p.b.under_load(p.now)
    sources = [Endpoint(f"2001:db8:7:7::{i:x}", 40000 + i, UDP) for i in range(1, 41)]
    before = p.b.drops[Drop.RATELIMIT]
    for src in sources:  # one each, same instant, each with its own valid mac2
        p.b.inbound([(_mac2(p.b, init, src), src)], p.now)
    assert p.b.drops[Drop.RATELIMIT] - before == 40 - 5  # one bucket: burst 5
    # IPv4: every address has its own bucket.
    before = p.b.drops[Drop.RATELIMIT]
    for i in range(1, 41):
        src = Endpoint(f"198.18.0.{i}", 40000 + i, UDP)
        p.b.inbound([(_mac2(p.b, init, src), src)], p.now)
    assert p.b.drops[Drop.RATELIMIT] == before


# ---------------------------------------------------------------------------- fault: flood


def test_handshake_flood_during_bulk_transfer():
    """Handshake flood (valid-mac1 replays from many sources, and junk) during a bulk transfer:
    every transport packet of the established session is delivered in the batch it came in;
    cookie replies answer the valid-mac1 replays once under load; junk alone never makes the
    device under load; handshake work per batch is bounded (HANDSHAKES_PER_BATCH), the rest
    dropped and counted."""
    p = Pair()
    p.handshake()
    replay = p.sent("a", MSG_INITIATION)[0].data
    kp = p.pb.keypairs.current
    rng = random.Random(12)
    budget_key = Drop.HANDSHAKE_BUDGET

    def bulk(n: int, tag: int) -> tuple[list[bytes], list]:
        packets = [ip4("10.9.0.1", "10.9.0.2", tag.to_bytes(4, "big") + i.to_bytes(4, "big") + bytes(1200))
                   for i in range(n)]
        return packets, [(d, EP_A) for d, _ in p.a.outbound(packets, p.now)]

    def mix(data: list, others: list) -> list:
        """`others` scattered among `data`, which keeps its order (a socket's)."""
        slots = set(rng.sample(range(len(data) + len(others)), len(data)))
        d, o = iter(data), iter(others)
        return [next(d) if i in slots else next(o) for i in range(len(data) + len(others))]

    # Phase 1: transport + junk only. Never under load, every packet delivered.
    for r in range(30):
        packets, data = bulk(64, r)
        junk = [(d, EP_A) for d in _junk(rng) for _ in range(13)][:64]
        res = p.b.inbound(mix(data, junk), p.now)
        assert res.to_tun == packets
        assert res.to_net == []
        p.now += 0.005
    assert not p.b.under_load(p.now)

    # Phase 2: transport + junk + valid-mac1 replays from many sources.
    cookie_replies = processed_max = 0
    for r in range(30, 90):
        packets, data = bulk(48, r)
        replays = [(replay, Endpoint(f"203.0.{r}.{j}", 20000 + j, UDP)) for j in range(48)]
        junk = [(d, EP_A) for d in _junk(rng) for _ in range(7)][:32]
        others = replays + junk
        rng.shuffle(others)
        mixed = mix(data, others)
        before = p.b.drops.copy()
        before_stats = p.b.stats.copy()
        res = p.b.inbound(mixed, p.now)
        assert res.to_tun == packets  # all of them, in order, in this batch
        kinds = [d[0] for d, _ in res.to_net]
        cookie_replies += kinds.count(MSG_COOKIE_REPLY)
        delta = p.b.drops - before
        processed = (delta[Drop.COOKIE_SENT] + delta[Drop.RATELIMIT] + delta[Drop.BAD_INITIATION]
                     + (p.b.stats - before_stats)["responses sent"])
        processed_max = max(processed_max, processed)
        assert processed <= HANDSHAKES_PER_BATCH
        assert delta[budget_key] == len(replays) - processed
        assert delta[Drop.MAC1] + delta[Drop.BAD_SIZE] + delta[Drop.SHORT] == len(junk)
        p.now += 0.005
    assert p.b.under_load(p.now)
    assert cookie_replies > 0 and processed_max == HANDSHAKES_PER_BATCH
    # The session is untouched: same keypair, and it still carries traffic both ways.
    assert p.pb.keypairs.current is kp
    p.send_b(ip4("10.9.0.2", "10.9.0.1", b"back"))
    assert p.tun["a"][-1] == ip4("10.9.0.2", "10.9.0.1", b"back")
