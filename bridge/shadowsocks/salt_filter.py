"""A server's memory of the salts it has accepted, so that a replayed packet or stream is dropped.

Two exact sets (no Bloom filter: SIP022 forbids false positives) cover two consecutive epochs of
`ttl` seconds; each new epoch drops the older set. So a salt is remembered for at least `ttl` and
at most 2*ttl seconds, which is what shadowsocks-libev's ping-pong Bloom filter does by count.
Memory is bounded: each set holds at most max_entries/2 salts; when the newer one is full it is
rotated early (as libev does), which forgets the oldest salts before their time. That is counted
in `early_rotations`; size max_entries for the salt rate you expect (one per UDP packet for
AEAD-2017, one per stream otherwise) times 2*ttl.

SIP022 asks servers to keep salts for 60 s, the default. Any monotonic-enough clock works for
`now`, as long as it is the same one on every call; a clock going backwards never rotates.
"""

from __future__ import annotations

import math

from .errors import UsageError

DEFAULT_TTL = 60.0
DEFAULT_MAX_ENTRIES = 1 << 20


class SaltFilter:
    __slots__ = ("ttl", "max_entries", "_current", "_previous", "_epoch", "early_rotations")

    def __init__(self, ttl: float = DEFAULT_TTL, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl > 0):
            raise UsageError("ttl must be a positive number of seconds")
        if not isinstance(max_entries, int) or max_entries < 2:
            raise UsageError("max_entries must be an int >= 2")
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self._current: set[bytes] = set()
        self._previous: set[bytes] = set()
        self._epoch: int | None = None
        self.early_rotations = 0

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def _advance(self, now: float) -> None:
        epoch = math.floor(now / self.ttl)
        if self._epoch is None:
            self._epoch = epoch
        elif epoch == self._epoch + 1:
            self._previous, self._current = self._current, set()
            self._epoch = epoch
        elif epoch > self._epoch + 1:
            self._previous, self._current = set(), set()
            self._epoch = epoch
        # epoch <= self._epoch: same epoch, or the clock went back: nothing to do

    def contains(self, salt: bytes, now: float) -> bool:
        """Whether `salt` is remembered, without recording it."""
        self._advance(now)
        return salt in self._current or salt in self._previous

    def seen(self, salt: bytes, now: float) -> bool:
        """True if `salt` was recorded within the window (a replay); otherwise record it and
        return False. Call it only for authentic packets/streams, so forgeries cannot fill it."""
        salt = bytes(salt)
        if self.contains(salt, now):
            return True
        if len(self._current) >= self.max_entries // 2:
            self._previous, self._current = self._current, set()
            self.early_rotations += 1
        self._current.add(salt)
        return False
