"""Multihop in memory: a client engine reaches a destination through an entry relay and an exit
relay, all three complete engines on transport.memory doubles; the relays forward and masquerade
as `ip_forward` + nftables masquerade would (a small model here). No root, and a driven clock for
the hours-long runs."""

from __future__ import annotations

import tempfile

import pytest
import trio

from bridge.multihop import parse_udp_untrusted, udp_packet
from transport.base import UDP, Endpoint
from transport.memory import MemoryNetwork, MemoryTun
from tunnel.engine import Engine
from tunnel.keys import generate_private_key
from tunnel.noise.crypto import public_key

from ..helpers import ip4, ip6

CLIENT = ("192.0.2.10", 51820)
ENTRY = ("198.51.100.1", 51820)
ENTRY_FWD = ("198.51.100.1", 40000)  # the entry relay's masquerade source towards the exit
EXIT = ("203.0.113.1", 51820)
TUN4, TUN6 = "10.64.0.2", "fd00:64::2"
DEST4, DEST6 = "10.99.0.1", "fd00:99::1"


class Node:
    def __init__(self, name, net, address, socket_dir, **options) -> None:
        self.key = generate_private_key()
        self.public = public_key(self.key)
        self.tun = MemoryTun(name, mtu=1420)
        self.udp = net.attach(address)
        self.engine = Engine(name, socket_dir=socket_dir, tun=self.tun, udp=self.udp, **options)

    async def set(self, *lines: str) -> None:
        stream = await trio.open_unix_socket(self.engine.socket_path)
        async with stream:
            await stream.send_all(("set=1\n" + "".join(f"{x}\n" for x in lines) + "\n").encode())
            reply = b""
            while not reply.endswith(b"\n\n"):
                reply += await stream.receive_some(4096)
        assert reply == b"errno=0\n\n", reply

    async def get(self, what: str = "get=wgpy") -> str:
        stream = await trio.open_unix_socket(self.engine.socket_path)
        async with stream:
            await stream.send_all(f"{what}\n\n".encode())
            reply = b""
            while not reply.endswith(b"\n\n"):
                reply += await stream.receive_some(65536)
        return reply.decode()


async def entry_forwarding(entry: Node, fwd) -> None:
    """The entry relay's kernel: packets out of its tunnel that are UDP to elsewhere leave from
    ENTRY_FWD (masquerade); replies come back into the tunnel addressed to the client."""
    client_side: dict[tuple[str, int], tuple[str, int]] = {}

    async def out_of_tunnel() -> None:
        while True:
            pkt = await entry.tun.next_written()
            parsed = parse_udp_untrusted(pkt)
            if parsed is None:
                continue
            src, dst, payload = parsed
            client_side[dst] = src
            fwd.send([(payload, Endpoint(dst[0], dst[1], UDP))])

    async def back_into_tunnel() -> None:
        (receive,) = fwd.receivers()
        while True:
            for payload, source in await receive():
                to = client_side.get((source[0], source[1]))
                if to is not None:
                    entry.tun.inject(udp_packet((source[0], source[1]), to, payload))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(out_of_tunnel)
        nursery.start_soon(back_into_tunnel)


async def destination(exit_: Node, seen_sources: list) -> None:
    """Behind the exit: every packet to DEST4/DEST6 is echoed back with addresses swapped."""
    while True:
        pkt = await exit_.tun.next_written()
        seen_sources.append(pkt)
        if pkt[0] >> 4 == 4:
            exit_.tun.inject(ip4(DEST4, TUN4, b"echo:" + pkt[20:]))
        else:
            exit_.tun.inject(ip6(DEST6, TUN6, b"echo:" + pkt[40:]))


async def three_hops(nursery, net, socket_dir, *, via: bool, keepalive: int = 0):
    client = Node("wgc", net, CLIENT, socket_dir, addresses=(TUN4, TUN6))
    entry = Node("wge", net, ENTRY, socket_dir)
    exit_ = Node("wgx", net, EXIT, socket_dir)
    fwd = net.attach(ENTRY_FWD)
    for node in (client, entry, exit_):
        await nursery.start(node.engine.run)
    nursery.start_soon(entry_forwarding, entry, fwd)
    dest_seen: list[bytes] = []
    nursery.start_soon(destination, exit_, dest_seen)
    for relay, port in ((entry, ENTRY[1]), (exit_, EXIT[1])):
        await relay.set(f"private_key={relay.key.hex()}", f"listen_port={port}",
                        f"public_key={client.public.hex()}", f"allowed_ip={TUN4}/32", f"allowed_ip={TUN6}/128")
    exit_lines = [f"public_key={exit_.public.hex()}", f"endpoint={EXIT[0]}:{EXIT[1]}",
                  "allowed_ip=0.0.0.0/0", "allowed_ip=::/0"]
    if keepalive:
        exit_lines.append(f"persistent_keepalive_interval={keepalive}")
    if via:  # explicit: the entry carries nothing of its own
        entry_lines = [f"public_key={entry.public.hex()}", f"endpoint={ENTRY[0]}:{ENTRY[1]}"]
        exit_lines.append(f"wgpy_via={entry.public.hex()}")
    else:  # the layout kernel and Mullvad users write: entry AllowedIPs = the exit's address
        entry_lines = [f"public_key={entry.public.hex()}", f"endpoint={ENTRY[0]}:{ENTRY[1]}",
                       f"allowed_ip={EXIT[0]}/32"]
    if keepalive:
        entry_lines.append(f"persistent_keepalive_interval={keepalive}")
    await client.set(f"private_key={client.key.hex()}", f"listen_port={CLIENT[1]}", *exit_lines, *entry_lines)
    return client, entry, exit_, dest_seen


@pytest.fixture
def socket_dir():
    with tempfile.TemporaryDirectory(prefix="wgpy-multihop-test-") as d:
        yield d


@pytest.mark.parametrize("via", [True, False], ids=["Via", "detected"])
async def test_client_reaches_the_destination_through_both_relays(socket_dir, via):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, entry, exit_, dest_seen = await three_hops(nursery, net, socket_dir, via=via)
        sent_to = set()  # every address the client's UDP port sent to
        send = client.udp.send

        def spy(datagrams):
            sent_to.update((e[0], e[1]) for _, e in datagrams)
            return send(datagrams)

        client.udp.send = spy
        peer_exit = client.engine.device.peers[exit_.public]
        nested = client.engine.nested[exit_.public]
        assert peer_exit.endpoint == Endpoint(*EXIT, nested.ident) and peer_exit.pinned
        for packet, reply in ((ip4(TUN4, DEST4, b"ping"), ip4(DEST4, TUN4, b"echo:ping")),
                              (ip6(TUN6, DEST6, b"ping6"), ip6(DEST6, TUN6, b"echo:ping6"))):
            client.tun.inject(packet)
            with trio.fail_after(10):
                assert await client.tun.next_written() == reply
        # What each party saw: the exit only the entry's (masqueraded) address, never the client.
        assert exit_.engine.device.peers[client.public].endpoint == Endpoint(*ENTRY_FWD, UDP)
        assert sent_to == {ENTRY}  # the client's UDP went to the entry only
        assert exit_.udp.received > 0 and net.drops.total == 0
        get = await client.get()
        assert f"wgpy_entry={entry.public.hex()}\n" in get
        assert ("wgpy_via=" in get) == via
        nursery.cancel_scope.cancel()


async def test_nothing_reaches_the_exit_from_the_client_directly(socket_dir):
    """Pull the entry relay off the network: the exit hop's traffic stops instead of going
    around it (the exit's address is reachable directly here, and never used)."""
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, entry, exit_, _ = await three_hops(nursery, net, socket_dir, via=True)
        client.tun.inject(ip4(TUN4, DEST4, b"one"))
        with trio.fail_after(10):
            await client.tun.next_written()
        received_by_exit = exit_.udp.received
        del net.transports[ENTRY]  # the entry relay is gone
        for i in range(20):
            client.tun.inject(ip4(TUN4, DEST4, b"x%d" % i))
        await trio.sleep(0.2)
        assert exit_.udp.received == received_by_exit
        assert net.drops.reasons["no such address"] > 0
        nursery.cancel_scope.cancel()


async def test_removing_the_via_entry_keeps_the_exit_inside(socket_dir):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, entry, exit_, _ = await three_hops(nursery, net, socket_dir, via=True)
        await client.set(f"public_key={entry.public.hex()}", "remove=true")
        peer_exit = client.engine.device.peers[exit_.public]
        assert peer_exit.pinned and peer_exit.endpoint[2] != UDP
        sent_before = client.udp.sent
        client.tun.inject(ip4(TUN4, DEST4, b"lost"))
        await trio.sleep(0.1)
        assert client.udp.sent == sent_before  # nothing leaves: no entry, no path
        assert client.engine.io_drops["multihop: entry peer missing"] >= 1
        # Via off: the exit is a direct peer again.
        await client.set(f"public_key={exit_.public.hex()}", "wgpy_via=")
        assert client.engine.device.peers[exit_.public].endpoint == Endpoint(*EXIT, UDP)
        assert not client.engine.device.peers[exit_.public].pinned
        nursery.cancel_scope.cancel()


async def test_via_cycle_sends_nothing_and_does_not_recurse(socket_dir):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        client, entry, exit_, _ = await three_hops(nursery, net, socket_dir, via=True)
        await client.set(f"public_key={entry.public.hex()}", f"wgpy_via={exit_.public.hex()}")
        sent_before = client.udp.sent
        client.tun.inject(ip4(TUN4, DEST4, b"loop"))
        await trio.sleep(0.1)
        assert client.udp.sent == sent_before
        assert client.engine.nested[exit_.public].drops.reasons["Via forms a cycle"] >= 1
        nursery.cancel_scope.cancel()


async def test_both_hops_rekey_for_hours_under_loss(socket_dir, autojump_clock):
    """10% loss on every link, three hours of driven clock: the entry and the exit sessions each
    rekey about every two minutes, independently, and the echo keeps coming back."""
    net = MemoryNetwork(loss=0.1, reorder=0.02, seed=3)
    async with trio.open_nursery() as nursery:
        client, entry, exit_, _ = await three_hops(nursery, net, socket_dir, via=False, keepalive=25)
        device = client.engine.device
        sent = got = 0
        start = trio.current_time()
        handshakes_seen = {entry.public: set(), exit_.public: set()}
        while trio.current_time() - start < 3 * 3600:
            client.tun.inject(ip4(TUN4, DEST4, b"t%d" % sent))
            sent += 1
            await trio.sleep(15)
            got += len(client.tun.written)
            client.tun.written.clear()
            for pk in handshakes_seen:
                handshakes_seen[pk].add(device.peers[pk].last_handshake_wall)
        assert got >= 0.5 * sent, (got, sent)
        for pk, times in handshakes_seen.items():
            assert len(times) >= 3 * 3600 / 240, (pk == entry.public, len(times))
        nursery.cancel_scope.cancel()
