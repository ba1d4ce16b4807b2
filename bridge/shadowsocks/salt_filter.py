"""A server's memory of the salts it has accepted, so that a replayed packet or stream is dropped.

Bounded by count, not by time, as shadowsocks-libev's ping-pong Bloom filter is: two exact sets
(no Bloom filter: SIP022 forbids false positives) of at most max_entries/2 salts each. New salts
go into the current set; when it is full, the older set is dropped and the current one becomes
the older. So a salt is remembered until at least max_entries/2 (and at most max_entries)
newer salts have been recorded after it, however long that takes.

Why not by time: AEAD-2017 streams carry no timestamp, so a filter that forgets after 60-120 s
lets a recorded stream be replayed later and accepted. Size max_entries for the memory you can
spend (each salt costs ~120 bytes in a Python set); the count of salts forgotten is in
`rotations` (each rotation forgets at most max_entries/2).

`now` is accepted by `seen` and `contains` for the callers' sake (2022 streams and packets also
check a timestamp there) and ignored.
"""

from __future__ import annotations

from .errors import UsageError

DEFAULT_MAX_ENTRIES = 1 << 20


class SaltFilter:
    __slots__ = ("max_entries", "_current", "_previous", "rotations")

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 2:
            raise UsageError("max_entries must be an int >= 2")
        self.max_entries = max_entries
        self._current: set[bytes] = set()
        self._previous: set[bytes] = set()
        self.rotations = 0

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def contains(self, salt: bytes, now: float | None = None) -> bool:
        """Whether `salt` is remembered, without recording it."""
        salt = bytes(salt)
        return salt in self._current or salt in self._previous

    def seen(self, salt: bytes, now: float | None = None) -> bool:
        """True if `salt` is remembered (a replay); otherwise record it and return False. Call it
        only for authentic packets/streams, so forgeries cannot fill it."""
        salt = bytes(salt)
        if salt in self._current or salt in self._previous:
            return True
        if len(self._current) >= self.max_entries // 2:
            self._previous, self._current = self._current, set()
            self.rotations += 1
        self._current.add(salt)
        return False
