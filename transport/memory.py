"""In-memory doubles for the engine's two ends, shipped beside the real ones (as wireguard-go's
tun/tuntest and conn/bindtest): a TUN device, transports, and a network joining them that can
lose, duplicate and reorder datagrams. With them the whole engine (readers, timers, UAPI,
back-pressure) runs in ordinary unit tests: no root, no namespaces, no sockets but the UAPI's.

    net = MemoryNetwork(loss=0.2, seed=1)
    a, b = net.attach(("10.0.0.1", 51820)), net.attach(("10.0.0.2", 51820))
    tun = MemoryTun("wg0")
    tun.inject(ip_packet)                    # the host sends into the tunnel
    packet = await tun.next_written()        # what the engine wrote towards the host
"""

from __future__ import annotations

import errno
import random
from collections import deque

import trio

from .base import Datagram, Drops, Endpoint, ReceiveFunc, Transport, UDP

BATCH = 128


class MemoryTun:
    """A TUN device in memory, with the interface the engine uses (tunnel.tun.Tun)."""

    def __init__(self, name: str = "mem0", mtu: int = 1420, *, queue: int = 1024) -> None:
        self.name = name
        self.mtu = mtu
        self.ifindex: int | None = None  # no kernel link to watch
        self.queue = queue
        self.drops = Drops()
        self.written: deque[bytes] = deque()  # towards the host, oldest first
        self._to_engine: deque[bytes] = deque()
        self._readable = trio.Event()
        self._wrote = trio.Event()
        self.closed = False
        self.offloads = "off"  # whole packets only, as a TUN without IFF_VNET_HDR

    def statistics(self) -> dict:
        return {"offloads": self.offloads}

    # ---- the host's side

    def inject(self, *packets: bytes) -> None:
        """Packets the host routes into the tunnel."""
        self._to_engine.extend(packets)
        self._readable.set()

    async def next_written(self) -> bytes:
        while not self.written:
            self._wrote = trio.Event()
            await self._wrote.wait()
        return self.written.popleft()

    # ---- the engine's side

    async def receive(self) -> list[bytes]:
        while not self._to_engine:
            if self.closed:
                raise trio.ClosedResourceError("TUN closed")
            self._readable = trio.Event()
            await self._readable.wait()
        q = self._to_engine
        return [q.popleft() for _ in range(min(len(q), BATCH))]

    def read_batch(self, limit: int) -> list[bytes]:
        """What the host has routed into the tunnel, without waiting (possibly nothing)."""
        q = self._to_engine
        return [q.popleft() for _ in range(min(len(q), limit))]

    def write_batch(self, packets: list[bytes]) -> None:
        for packet in packets:
            if len(self.written) >= self.queue:
                self.drops.add("tun write queue full")
                continue
            self.written.append(bytes(packet))
        self._wrote.set()

    def close(self) -> None:
        self.closed = True
        self._readable.set()


class MemoryNetwork:
    """Addresses joined in memory. Each datagram sent is lost with probability `loss`, else
    delivered (twice with probability `duplicate`; swapped with the next one to the same
    address with probability `reorder`). `partitioned` drops everything (a cable pulled).
    `delay` (+ up to `jitter`, uniformly) seconds of trio's clock before a datagram arrives: a
    path with latency, whose jitter reorders too (delivered by a trio system task, so a network
    with delay is used inside trio.run)."""

    def __init__(self, *, loss: float = 0.0, duplicate: float = 0.0, reorder: float = 0.0,
                 seed: int | None = None, delay: float = 0.0, jitter: float = 0.0) -> None:
        self.loss, self.duplicate, self.reorder = loss, duplicate, reorder
        self.delay, self.jitter = delay, jitter
        self.rng = random.Random(seed)
        self.partitioned = False
        self.transports: dict[tuple[str, int], MemoryTransport] = {}
        self.drops = Drops()

    def attach(self, address: tuple[str, int], *, ident: int = UDP, capacity: int = 4096) -> "MemoryTransport":
        t = MemoryTransport(self, (address[0], int(address[1])), ident=ident, capacity=capacity)
        self.transports[t.address] = t
        return t

    def carry(self, source: "MemoryTransport", datagrams: list[Datagram]) -> None:
        rng = self.rng
        held: dict[tuple[str, int], tuple[bytes, MemoryTransport]] = {}
        for data, endpoint in datagrams:
            dest = self.transports.get((endpoint[0], endpoint[1]))
            if dest is None or dest.closed:
                self.drops.add("no such address")
                continue
            if self.partitioned:
                self.drops.add("partitioned")
                continue
            if self.loss and rng.random() < self.loss:
                self.drops.add("lost")
                continue
            copies = 2 if self.duplicate and rng.random() < self.duplicate else 1
            data = bytes(data)
            if self.delay or self.jitter:
                for _ in range(copies):
                    after = self.delay + self.jitter * rng.random()
                    trio.lowlevel.spawn_system_task(self._deliver_later, after, dest, data, source.address)
                continue
            for _ in range(copies):
                if self.reorder and rng.random() < self.reorder and dest.address not in held:
                    held[dest.address] = (data, dest)  # goes after the next one to dest
                    continue
                dest.arrive(data, source.address)
                previous = held.pop(dest.address, None)
                if previous is not None:
                    dest.arrive(previous[0], source.address)
        for data, dest in held.values():
            dest.arrive(data, source.address)


    @staticmethod
    async def _deliver_later(after: float, dest: "MemoryTransport", data: bytes, source: tuple[str, int]) -> None:
        await trio.sleep(after)
        if not dest.closed:
            dest.arrive(data, source)


class MemoryTransport(Transport):
    """A transport at `address` on a MemoryNetwork. Received datagrams come from
    `Endpoint(sender_host, sender_port, ident)`. `block()` makes sends would-block (a full socket
    buffer) until `unblock()`, to exercise the engine's back-pressure."""

    kind = "memory"

    def __init__(self, network: MemoryNetwork, address: tuple[str, int], *, ident: int = UDP,
                 capacity: int = 4096) -> None:
        Transport.__init__(self)  # not super(): tests mix this into other transport classes
        self.network = network
        self.address = address
        self.ident = ident
        self.capacity = capacity
        self.closed = False
        self._inbox: deque[Datagram] = deque()
        self._arrived = trio.Event()
        self._blocked = False
        self._unblocked = trio.Event()
        self.would_block_count = 0
        self._generation = 0  # a bind() ends the receive functions handed out before it

    @property
    def port(self) -> int:
        return self.address[1]

    def bind(self, port: int) -> None:
        """Move to another port of the same host (0: stay), as a UDP rebind: raises
        OSError(EADDRINUSE) if another transport has it; the old receive function ends."""
        if port == 0 or port == self.address[1]:
            return
        new = (self.address[0], port)
        if new in self.network.transports:
            raise OSError(errno.EADDRINUSE, "address in use")
        del self.network.transports[self.address]
        self.network.transports[new] = self
        self.address = new
        old, self._arrived = self._arrived, trio.Event()
        self._generation += 1
        old.set()

    def arrive(self, data: bytes, source: tuple[str, int]) -> None:
        if len(self._inbox) >= self.capacity:
            self.drops.add("receive queue full")
            return
        self._inbox.append((data, Endpoint(source[0], source[1], self.ident)))
        self._arrived.set()

    def receivers(self) -> list[ReceiveFunc]:
        generation = self._generation

        async def receive() -> list[Datagram]:
            return await self._receive(generation)

        return [receive]

    async def _receive(self, generation: int) -> list[Datagram]:
        while not self._inbox:
            if self.closed or generation != self._generation:
                raise trio.ClosedResourceError("transport closed or rebound")
            self._arrived = trio.Event()
            await self._arrived.wait()
        q = self._inbox
        batch = [q.popleft() for _ in range(min(len(q), BATCH))]
        self.received += len(batch)
        return batch

    def send(self, datagrams: list[Datagram]) -> list[Datagram]:
        if self.closed:
            self.drops.add("closed", len(datagrams))
            return []
        if self._blocked:
            self.would_block_count += 1
            return datagrams
        self.network.carry(self, datagrams)
        self.sent += len(datagrams)
        return []

    async def wait_writable(self) -> None:
        if self._blocked:
            await self._unblocked.wait()

    def block(self) -> None:
        self._blocked = True
        self._unblocked = trio.Event()

    def unblock(self) -> None:
        self._blocked = False
        self._unblocked.set()

    def close(self) -> None:
        self.closed = True
        self._arrived.set()
        self.unblock()
