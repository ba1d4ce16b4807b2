"""Automatic fallback between the ways a peer can be reached (sans-IO: no sockets, no clock).

A peer may list several ways, in order of preference:

    Bridge = direct, lwo, ss://..., udp2tcp://HOST:PORT

`Fallback` decides which one is in use. The engine polls it (about once a second, and after
every handshake event) with the peer's handshake state, and applies what it returns:

* A way **fails** when `attempts` + 1 handshake initiations in a row went out on it unanswered.
  WireGuard sends one every REKEY_TIMEOUT (5 s), so with the default 2 a way has 15 s. The
  engine polls just before its timers fire, so the retry that is due goes out on the next way
  (`retries`: the peer's count of retries of its current handshake; a way chosen mid-handshake
  has the retry about to be sent as its first initiation). The next way in the list is tried,
  wrapping around, so a network that blocks everything keeps cycling until one works.
* A way **works** once a handshake completes on it. It is kept as long as handshakes keep
  completing; when later ones go unanswered the same rule moves on.
* While a way other than the first works, the earlier ones are **tried again later**: after
  `retry_after` seconds the first way is chosen again (the list is walked in order from there,
  so it comes back to the working way if the earlier ones still fail). Each probe that does not
  bring the peer back to an earlier way doubles the wait, up to `retry_max`; a success resets it.

Time and handshake completions come in as arguments: `now` is the caller's clock, and
`handshake` is any value that changes when a handshake completes (the engine passes the time of
the peer's latest one), so this module holds no references into the protocol core.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTEMPTS = 2  # unanswered handshake retries on a way before the next is tried
RETRY_AFTER = 30.0  # seconds on a later way before the earlier ones are tried again
RETRY_MAX = 1800.0  # the longest wait between such probes


@dataclass(frozen=True)
class Switch:
    """Use way `index` from now on; `reason` says why, for the log and `wgpy show`.
    `handshake_now`: start a handshake on it at once (a probe; after a failure the retry that is
    due does it)."""

    index: int
    reason: str
    handshake_now: bool = False


class Fallback:
    def __init__(self, count: int, *, attempts: int = ATTEMPTS, retry_after: float = RETRY_AFTER,
                 retry_max: float = RETRY_MAX) -> None:
        if count < 1:
            raise ValueError("a fallback needs at least one way")
        if attempts < 1 or retry_after <= 0 or retry_max < retry_after:
            raise ValueError("attempts >= 1 and 0 < retry_after <= retry_max")
        self.count = count
        self.attempts = attempts
        self.retry_after = retry_after
        self.retry_max = retry_max
        self.index = 0
        self.working = False  # a handshake completed on the current way since it was chosen
        self.home: int | None = None  # the way that worked before a probe of the earlier ones
        self._backoff = retry_after
        self._retry_at: float | None = None
        self._base = 0  # the retry count at which the current way's first initiation went out
        self._last_retries = 0
        self._seen: object = None  # the last `handshake` value seen
        self._started = False

    def __repr__(self) -> str:
        return (f"Fallback(index={self.index}/{self.count}, working={self.working}, home={self.home}, "
                f"retry_at={self._retry_at})")

    def next_deadline(self) -> float | None:
        """When `poll` has something to do by the clock alone (a probe of the earlier ways)."""
        return self._retry_at

    def poll(self, now: float, retries: int, handshake: object) -> Switch | None:
        """`retries`: retries of the peer's current handshake (they fall back to 0 when a new
        handshake starts); `handshake`: a value that changes when a handshake completes."""
        if not self._started:
            self._started = True
            self._seen = handshake
            self._base = self._last_retries = retries
        if handshake != self._seen:
            self._seen = handshake
            if handshake is not None:
                self._completed(now)
        if retries < self._last_retries:  # a new handshake started: count from its first initiation
            self._base = retries
        self._last_retries = retries
        if self.count > 1 and retries - self._base >= self.attempts:
            # The retry about to go out is the new way's first initiation.
            return self._move((self.index + 1) % self.count, retries + 1, "no handshake completed on it")
        if self._retry_at is not None and now >= self._retry_at and self.working and self.index > 0:
            self.home = self.index
            self._backoff = min(self._backoff * 2, self.retry_max)
            return self._move(0, retries, "trying the earlier ways again", handshake_now=True)
        return None

    def _completed(self, now: float) -> None:
        self.working = True
        if self.home is not None and self.index < self.home:
            self._backoff = self.retry_after  # an earlier way is back
        self.home = None
        self._retry_at = now + self._backoff if self.index > 0 else None

    def _move(self, index: int, base: int, reason: str, handshake_now: bool = False) -> Switch:
        self.index = index
        self.working = False
        self._base = base
        self._retry_at = None
        return Switch(index, reason, handshake_now)
