"""Per-source token bucket for handshake messages under load (wireguard-go ratelimiter/).

Each source may pass 20 handshake messages per second with a burst of 5. A source is an IPv4
address, or an IPv6 /64 (as the kernel's ratelimiter.c: one host usually holds a whole /64, so
keying by full address would give it 2**64 buckets): `source_key`. Memory is bounded: idle
entries are swept, and when the table is full the source is refused rather than tracked.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from .constants import RATELIMIT_BURST, RATELIMIT_MAX_ENTRIES, RATELIMIT_PACKETS_PER_SECOND

_COST = 1.0 / RATELIMIT_PACKETS_PER_SECOND
_MAX_TOKENS = _COST * RATELIMIT_BURST
_IDLE = 1.0  # an entry untouched this long is as good as full: drop it


@lru_cache(maxsize=4096)
def source_key(host: str) -> str:
    """The bucket of a source host: an IPv4 address as itself, an IPv6 address as its /64
    ("2001:db8:1:2::/64"; an IPv4-mapped one as its IPv4 address). Anything that is not an IP
    address is its own bucket (no transport produces one). Never raises."""
    try:
        ip = ipaddress.ip_address(host)
    except (ValueError, TypeError):
        return repr(host)
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return f"{ipaddress.IPv6Address(ip.packed[:8] + bytes(8))}/64"


class RateLimiter:
    def __init__(self, max_entries: int = RATELIMIT_MAX_ENTRIES) -> None:
        self._table: dict[object, list[float]] = {}  # key -> [tokens, last_time]
        self._max_entries = max_entries
        self._last_sweep = None

    def __len__(self) -> int:
        return len(self._table)

    def _sweep(self, now: float) -> None:
        stale = [k for k, (_, t) in self._table.items() if now - t > _IDLE]
        for k in stale:
            del self._table[k]
        self._last_sweep = now

    def allow(self, source: object, now: float) -> bool:
        if self._last_sweep is None or now - self._last_sweep > _IDLE:
            self._sweep(now)
        entry = self._table.get(source)
        if entry is None:
            if len(self._table) >= self._max_entries:
                return False
            self._table[source] = [_MAX_TOKENS - _COST, now]
            return True
        tokens = min(_MAX_TOKENS, entry[0] + (now - entry[1]))
        entry[1] = now
        # A tiny epsilon keeps float rounding from refusing a packet that is exactly due.
        if tokens + 1e-9 >= _COST:
            entry[0] = tokens - _COST
            return True
        entry[0] = tokens
        return False
