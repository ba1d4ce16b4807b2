"""Automatic fallback between the ways a peer can be reached (sans-IO: no sockets, no clock).

A peer may list several ways, in order of preference:

    Bridge = direct, lwo, ss://..., udp2tcp://HOST:PORT

`Fallback` decides which one is in use. The engine polls it (about once a second, and after
every handshake event) with the peer's handshake state, and applies what it returns:

* A way **fails** when `attempts` + 1 handshake initiations went out on it, none was answered
  by a completed handshake, and the latest has waited ANSWER_WAIT (4 s) for its answer.
  WireGuard sends one every REKEY_TIMEOUT (5 s) while it wants a session, and the engine polls
  every second, so the switch comes before the next initiation, which goes out on the next way;
  with the default 2 a way has 15 s. The next way in the list is tried, wrapping around, so a
  network that blocks everything keeps cycling until one works.
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
from typing import Union

from .spec import BridgeError, BridgeSpec, parse_bridge

DIRECT = "direct"
LWO = "lwo"
Way = Union[str, BridgeSpec]  # DIRECT, LWO, or a bridge
MAX_WAYS = 8

ATTEMPTS = 2  # unanswered handshake retries on a way before the next is tried
RETRY_AFTER = 30.0  # seconds on a later way before the earlier ones are tried again
RETRY_MAX = 1800.0  # the longest wait between such probes
# An initiation unanswered this long is lost: WireGuard sends the next at REKEY_TIMEOUT (5 s), and
# the poll that judges it must come before that one (the engine polls every second).
ANSWER_WAIT = 4.0
FAILED = "no handshake completed on it"  # Switch.reason when a way is given up


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
        self._base = 0  # initiations sent before the current way was chosen (or last worked)
        self._seen: object = None  # the last `handshake` value seen
        self._started = False

    def __repr__(self) -> str:
        return (f"Fallback(index={self.index}/{self.count}, working={self.working}, home={self.home}, "
                f"retry_at={self._retry_at})")

    def next_deadline(self) -> float | None:
        """When `poll` has something to do by the clock alone (a probe of the earlier ways)."""
        return self._retry_at

    def poll(self, now: float, sent: int, last_sent: float | None, handshake: object) -> Switch | None:
        """`sent`: handshake initiations sent to the peer so far (a counter that only grows);
        `last_sent`: when the latest went out (the caller's clock); `handshake`: a value that
        changes when a handshake completes."""
        if not self._started:
            self._started = True
            self._seen = handshake
            self._base = sent
        if handshake != self._seen:
            self._seen = handshake
            if handshake is not None:
                self._completed(now, sent)
        if (self.count > 1 and sent - self._base > self.attempts and last_sent is not None
                and now - last_sent >= ANSWER_WAIT):
            return self._move((self.index + 1) % self.count, sent, FAILED)
        if self._retry_at is not None and now >= self._retry_at and self.working and self.index > 0:
            self.home = self.index
            self._backoff = min(self._backoff * 2, self.retry_max)
            return self._move(0, sent, "trying the earlier ways again", handshake_now=True)
        return None

    def _completed(self, now: float, sent: int) -> None:
        self.working = True
        self._base = sent  # initiations from here on are judged afresh
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


def parse_ways(text: str, *, numeric: bool = False) -> tuple[Way, ...]:
    """`direct, lwo, ss://..., udp2tcp://HOST:PORT` -> the ways, in order. Raises BridgeError
    naming the position of a bad one (never quoting it: an ss:// URI holds a password)."""
    ways: list[Way] = []
    items = [item.strip() for item in text.split(",")]
    if len(items) > MAX_WAYS:
        raise BridgeError(f"at most {MAX_WAYS} ways to reach a peer")
    for n, item in enumerate(items, 1):
        if item.lower() in (DIRECT, LWO):
            way: Way = item.lower()
        elif not item:
            raise BridgeError(f"way {n} of {len(items)} is empty")
        else:
            try:
                way = parse_bridge(item, numeric=numeric)
            except BridgeError as exc:
                raise BridgeError(f"way {n} of {len(items)}: {exc}" if len(items) > 1 else str(exc)) from None
        if way in ways:
            raise BridgeError(f"way {n} of {len(items)} repeats an earlier one")
        ways.append(way)
    return tuple(ways)


def describe(way: Way) -> str:
    """For logs and `wgpy show`: never the password."""
    return way if isinstance(way, str) else way.redacted()


def format_ways(ways: tuple[Way, ...]) -> str:
    """The UAPI value (bridges as their canonical URI, which holds the password)."""
    return ",".join(w if isinstance(w, str) else w.uri for w in ways)
