"""Cryptokey routing: AllowedIPs as longest-prefix match for IPv4 and IPv6.

One dict per prefix length, keyed by the masked address as an int; a lookup probes the lengths in
use from longest to shortest. Tables hold few distinct lengths in practice, so a lookup is a handful
of dict probes, cheaper in Python than walking a bit trie. Inserting a prefix that another peer
holds moves it, as in WireGuard.

Lookups are remembered per address (`routes`) until the table changes: a tunnel's packets go to
and come from a few addresses, so the hot paths pay one dict probe a packet whatever the number
of prefixes, peers or destinations in a batch.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")

# Addresses remembered at most; past it the memo starts afresh (a flood of distinct addresses
# costs lookups, never memory).
ROUTES_REMEMBERED = 4096

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Family(Generic[T]):
    __slots__ = ("bits", "tables", "lengths")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, T]] = {}
        self.lengths: list[int] = []  # descending

    def insert(self, addr: int, plen: int, value: T) -> None:
        table = self.tables.get(plen)
        if table is None:
            table = self.tables[plen] = {}
            self.lengths = sorted(self.tables, reverse=True)
        table[addr >> (self.bits - plen)] = value

    def remove(self, addr: int, plen: int) -> T | None:
        table = self.tables.get(plen)
        if table is None:
            return None
        value = table.pop(addr >> (self.bits - plen), None)
        if not table:
            del self.tables[plen]
            self.lengths = sorted(self.tables, reverse=True)
        return value

    def lookup(self, addr: int, shortest: int = 0) -> T | None:
        bits = self.bits
        tables = self.tables
        for plen in self.lengths:
            if plen < shortest:
                break
            value = tables[plen].get(addr >> (bits - plen))
            if value is not None:
                return value
        return None


class AllowedIPs(Generic[T]):
    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)
        # Packed address -> what lookup() gave for it, emptied by every change. Hot paths read
        # it directly (`routes.get(addr, False)`) and call lookup() on a miss, which fills it.
        self.routes: dict[bytes, T | None] = {}

    def insert(self, network: Network, value: T) -> None:
        fam = self._v4 if network.version == 4 else self._v6
        fam.insert(int(network.network_address), network.prefixlen, value)
        self.routes.clear()

    def remove(self, network: Network) -> None:
        fam = self._v4 if network.version == 4 else self._v6
        fam.remove(int(network.network_address), network.prefixlen)
        self.routes.clear()

    def remove_value(self, value: T) -> None:
        """Drop every prefix routed to `value` (a removed peer)."""
        for fam in (self._v4, self._v6):
            for plen, table in list(fam.tables.items()):
                for key in [k for k, v in table.items() if v is value]:
                    del table[key]
                if not table:
                    del fam.tables[plen]
            fam.lengths = sorted(fam.tables, reverse=True)
        self.routes.clear()

    def prefixes_of(self, value: T) -> Iterator[Network]:
        for fam, cls in ((self._v4, ipaddress.IPv4Network), (self._v6, ipaddress.IPv6Network)):
            for plen in sorted(fam.tables, reverse=True):
                for key, v in fam.tables[plen].items():
                    if v is value:
                        yield cls((key << (fam.bits - plen), plen))

    def lookup_exact(self, network: Network) -> T | None:
        fam = self._v4 if network.version == 4 else self._v6
        table = fam.tables.get(network.prefixlen)
        if table is None:
            return None
        return table.get(int(network.network_address) >> (fam.bits - network.prefixlen))

    def lookup_specific(self, addr: bytes) -> T | None:
        """Longest-prefix match ignoring /0 entries (a default route says nothing about where a
        particular address is): multihop's nesting rule (bridge.multihop.entry_for)."""
        if len(addr) == 4:
            return self._v4.lookup(int.from_bytes(addr, "big"), 1)
        if len(addr) == 16:
            return self._v6.lookup(int.from_bytes(addr, "big"), 1)
        return None

    def lookup(self, addr: bytes) -> T | None:
        """Longest-prefix match of a packed 4- or 16-byte address (remembered in `routes`)."""
        if len(addr) == 4:
            value = self._v4.lookup(int.from_bytes(addr, "big"))
        elif len(addr) == 16:
            value = self._v6.lookup(int.from_bytes(addr, "big"))
        else:
            return None
        routes = self.routes
        if len(routes) >= ROUTES_REMEMBERED:
            routes.clear()
        routes[bytes(addr)] = value
        return value
