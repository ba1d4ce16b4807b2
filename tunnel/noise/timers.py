"""Peer timers as deadlines: events in, `due(now)` out. No clock reads, no callbacks.

Each rule of wireguard-go device/timers.go is a method named after the event that arms or stops a
timer; `due(now)` returns the timers that expired, in a fixed order, and disarms them. The device
acts on them (send an initiation, a keepalive, zero keys). Jitter comes from the caller's `jitter`
function so tests can fix it.
"""

from __future__ import annotations

import enum
from typing import Callable

from .constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT, ZERO_KEYS_AFTER


class Timer(enum.Enum):
    RETRANSMIT_HANDSHAKE = "retransmit_handshake"
    SEND_KEEPALIVE = "send_keepalive"
    NEW_HANDSHAKE = "new_handshake"
    ZERO_KEY_MATERIAL = "zero_key_material"
    PERSISTENT_KEEPALIVE = "persistent_keepalive"


_ORDER = tuple(Timer)


class PeerTimers:
    __slots__ = (
        "deadlines",
        "handshake_attempts",
        "need_another_keepalive",
        "sent_last_minute_handshake",
        "persistent_keepalive_interval",
        "_jitter",
    )

    def __init__(self, jitter: Callable[[], float]) -> None:
        self.deadlines: dict[Timer, float] = {}
        self.handshake_attempts = 0
        self.need_another_keepalive = False
        self.sent_last_minute_handshake = False
        self.persistent_keepalive_interval = 0
        self._jitter = jitter

    def pending(self, timer: Timer) -> bool:
        return timer in self.deadlines

    def next_deadline(self) -> float | None:
        return min(self.deadlines.values(), default=None)

    def due(self, now: float) -> list[Timer]:
        fired = [t for t in _ORDER if t in self.deadlines and self.deadlines[t] <= now]
        for t in fired:
            del self.deadlines[t]
        return fired

    def stop_all(self) -> None:
        self.deadlines.clear()

    # --- events (wireguard-go names) ---

    def data_sent(self, now: float) -> None:
        """Data sent: expect something back within 15 s, else start a new handshake."""
        if Timer.NEW_HANDSHAKE not in self.deadlines:
            self.deadlines[Timer.NEW_HANDSHAKE] = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()

    def data_received(self, now: float) -> None:
        """Data received: answer with a keepalive in 10 s unless we send something first."""
        if Timer.SEND_KEEPALIVE not in self.deadlines:
            self.deadlines[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def any_authenticated_packet_sent(self, now: float) -> None:
        self.deadlines.pop(Timer.SEND_KEEPALIVE, None)

    def any_authenticated_packet_received(self, now: float) -> None:
        self.deadlines.pop(Timer.NEW_HANDSHAKE, None)

    def any_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive_interval > 0:
            self.deadlines[Timer.PERSISTENT_KEEPALIVE] = now + self.persistent_keepalive_interval

    def handshake_initiated(self, now: float) -> None:
        self.deadlines[Timer.RETRANSMIT_HANDSHAKE] = now + REKEY_TIMEOUT + self._jitter()

    def handshake_complete(self, now: float) -> None:
        self.deadlines.pop(Timer.RETRANSMIT_HANDSHAKE, None)
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

    def session_derived(self, now: float) -> None:
        self.deadlines[Timer.ZERO_KEY_MATERIAL] = now + ZERO_KEYS_AFTER

    def rearm_keepalive(self, now: float) -> None:
        self.deadlines[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT

    def arm_zero_key_material_if_idle(self, now: float) -> None:
        if Timer.ZERO_KEY_MATERIAL not in self.deadlines:
            self.deadlines[Timer.ZERO_KEY_MATERIAL] = now + ZERO_KEYS_AFTER
