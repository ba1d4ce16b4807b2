"""The nested (multihop) transport: a peer's datagrams carried inside another peer's tunnel.
The rules and the IP/UDP codec are bridge/multihop.py (sans-IO). It makes no syscalls: it hands
what it seals to the entry peer's transport."""

from __future__ import annotations

from collections import deque
from typing import Callable

from transport.base import Datagram, ReceiveFunc, Transport

from .multihop import udp_packet


Seal = Callable[[bytes, list[bytes]], list[Datagram]]  # (entry public key, IP packets) -> datagrams
Route = Callable[[int], "Transport | None"]  # Endpoint.via -> the transport that reaches it
Source = Callable[[int], "tuple[str, int] | None"]  # IP version -> our (tunnel address, port)


class NestedTransport(Transport):
    """The datagrams of a peer reached through the entry peer `entry` (its public key).

    `send` wraps each datagram in IP/UDP from `source(version)` to its endpoint, has the core
    seal the packets for the entry (`seal`) and hands the result to the entry's own transport
    (`route`), with its back-pressure: sealed datagrams the entry's transport could not take
    wait here, and until they have gone, `send` takes nothing new (it returns it, so the engine
    waits on `wait_writable`, which flushes them). Replies are picked out of what the entry delivers
    by the engine (Engine._divert) and go to the core as datagrams from the nested peer's endpoint
    `Endpoint(exit host, exit port, ident)`."""

    kind = "nested"

    def __init__(self, ident: int, entry: bytes, *, seal: Seal, route: Route, source: Source) -> None:
        super().__init__()
        self.ident = ident
        self.entry = entry
        self._seal = seal
        self._route = route
        self._source = source
        self._pending: deque[tuple[Transport, list[Datagram]]] = deque()
        self._ip_id = 0
        self.closed = False
        self.blocked = False  # part of a cycle of Vias: nothing can be carried
        # The UDP checksum of a full-size datagram costs ~4 us in Python, more than sealing it.
        # Over IPv4 it is optional, and what it would protect is a WireGuard message that
        # authenticates itself; so IPv4 sends none (checksum 0) unless this is set. IPv6: always.
        self.udp_checksum = False

    # ---- sending

    def send(self, datagrams: list[Datagram]) -> list[Datagram]:
        if self.closed or self.blocked:
            self.drops.add("closed" if self.closed else "Via forms a cycle", len(datagrams))
            return []
        if self._pending and not self._flush():
            return datagrams
        packets = []
        drops = self.drops
        sources: dict[int, tuple[str, int] | None] = {}  # looked up once per batch
        for data, endpoint in datagrams:
            host = endpoint[0]
            version = 6 if ":" in host else 4
            src = sources.get(version, False)
            if src is False:
                src = sources[version] = self._source(version)
            if src is None:
                drops.add("no tunnel address of the endpoint's family")
                continue
            self._ip_id = (self._ip_id + 1) & 0xFFFF
            packets.append(udp_packet(src, (host, endpoint[1]), data, self._ip_id,
                                      udp_checksum=self.udp_checksum))
        if not packets:
            return []
        outer = self._seal(self.entry, packets)
        self.sent += len(packets)
        if outer:
            self._queue(outer)
            self._flush()
        return []

    def _queue(self, outer: list[Datagram]) -> None:
        groups: dict[int, list[Datagram]] = {}
        for d in outer:
            groups.setdefault(d[1][2], []).append(d)
        for via, group in groups.items():
            transport = self._route(via)
            if transport is None:
                self.drops.add("entry's transport gone", len(group))
            else:
                self._pending.append((transport, group))

    def _flush(self) -> bool:
        """Offer what waits to the entry's transport; True once nothing waits."""
        pending = self._pending
        while pending:
            transport, group = pending[0]
            rest = transport.send(group)
            if rest:
                pending[0] = (transport, rest)
                return False
            pending.popleft()
        return True

    async def wait_writable(self) -> None:
        while self._pending and not self.closed:
            await self._pending[0][0].wait_writable()
            self._flush()

    # ---- receiving

    def receivers(self) -> list[ReceiveFunc]:
        """None: the nested peer's datagrams arrive inside the entry's packets, and the engine
        hands them to the core in the same wakeup (Engine._divert), counting them in `received`."""
        return []

    def statistics(self) -> dict:
        return {**super().statistics(), "entry": self.entry.hex()}

    def close(self) -> None:
        self.closed = True
        self._pending.clear()
