"""Peer timers as deadlines: events in, actions out. No clock reads, no callbacks.

Every rule of wireguard-go device/timers.go lives here, and only here. The device reports what
happened through event methods named after wireguard-go's (`data_sent`, `data_received`,
`any_authenticated_packet_sent/received/traversal`, `handshake_initiated`, `handshake_complete`,
`session_derived`, ...) and asks `due(now)` what to do; it never reads or writes the fields.

    timer                 armed by                                  expiry -> Action
    retransmit handshake  handshake_initiated: 5 s + jitter          SEND_INITIATION_RETRY, or
                                                                     GIVE_UP past MAX_TIMER_HANDSHAKES
    send keepalive        data_received: 10 s                        SEND_KEEPALIVE
    new handshake         data_sent: 15 s + jitter                   SEND_INITIATION
    zero key material     session_derived: 540 s                     ZERO_KEYS
    persistent keepalive  any_authenticated_packet_traversal         SEND_KEEPALIVE

Jitter comes from the caller's `jitter` function so tests can fix it.
"""

from __future__ import annotations

import enum
from typing import Callable, Iterator

from .constants import KEEPALIVE_TIMEOUT, MAX_TIMER_HANDSHAKES, REKEY_TIMEOUT, ZERO_KEYS_AFTER


class Action(enum.Enum):
    """What the device must do for a peer when its timers expire."""

    SEND_INITIATION_RETRY = "send a handshake initiation (a retry)"
    GIVE_UP = "give up the handshake: flush the staged packets"
    SEND_KEEPALIVE = "send a keepalive"
    SEND_INITIATION = "send a handshake initiation (a new handshake)"
    ZERO_KEYS = "zero the keypairs and the handshake, flush the staged packets"


class Timer:
    """The timers' names, the keys of a peer's deadlines. Plain strings, not an Enum: the
    per-batch events probe the deadlines, and a str hashes in C (an Enum member in Python)."""

    RETRANSMIT_HANDSHAKE = "retransmit_handshake"
    SEND_KEEPALIVE = "send_keepalive"
    NEW_HANDSHAKE = "new_handshake"
    ZERO_KEY_MATERIAL = "zero_key_material"
    PERSISTENT_KEEPALIVE = "persistent_keepalive"


def _nothing() -> None:
    pass


# The order expired timers are acted on in one `due`.
_ORDER = (Timer.RETRANSMIT_HANDSHAKE, Timer.SEND_KEEPALIVE, Timer.NEW_HANDSHAKE, Timer.ZERO_KEY_MATERIAL,
          Timer.PERSISTENT_KEEPALIVE)
_NEVER = float("inf")


class PeerTimers:
    __slots__ = (
        "_deadlines",
        "_handshake_attempts",
        "_need_another_keepalive",
        "_sent_last_minute_handshake",
        "_persistent_keepalive",
        "_jitter",
        "on_change",
    )

    def __init__(self, jitter: Callable[[], float]) -> None:
        self._deadlines: dict[str, float] = {}
        self._handshake_attempts = 0
        self._need_another_keepalive = False
        self._sent_last_minute_handshake = False
        self._persistent_keepalive = 0
        self._jitter = jitter
        # Called after every change of a deadline (the device's schedule: Device.next_deadline
        # then looks again at this peer only, so nothing walks every peer per batch).
        self.on_change: Callable[[], None] = _nothing

    @property
    def persistent_keepalive(self) -> int:
        """The persistent keepalive interval in seconds (0: off)."""
        return self._persistent_keepalive

    @property
    def handshake_attempts(self) -> int:
        """Retries of the current handshake so far (for logs: "retrying (try N + 1)")."""
        return self._handshake_attempts

    def next_deadline(self) -> float | None:
        """When `due` next has something to do (None: no timer armed)."""
        return min(self._deadlines.values(), default=None)

    def due(self, now: float) -> Iterator[Action]:
        """The actions for the timers expired at `now`, in a fixed order; expired timers are
        disarmed. Carry out each action before taking the next: a rule that follows an action
        (re-arming the keepalive timer after the keepalive went out) runs when the next is
        taken, as wireguard-go runs it after the send, so exhaust the iterator."""
        deadlines = self._deadlines
        fired = [t for t in _ORDER if deadlines.get(t, _NEVER) <= now]
        for t in fired:
            del deadlines[t]
        self.on_change()  # also covers what the actions below arm again
        for t in fired:
            if t is Timer.RETRANSMIT_HANDSHAKE:
                if self._handshake_attempts > MAX_TIMER_HANDSHAKES:
                    # Give up: stop trying until new traffic asks for a session again.
                    deadlines.pop(Timer.SEND_KEEPALIVE, None)
                    if Timer.ZERO_KEY_MATERIAL not in deadlines:
                        deadlines[Timer.ZERO_KEY_MATERIAL] = now + ZERO_KEYS_AFTER
                    yield Action.GIVE_UP
                else:
                    self._handshake_attempts += 1
                    yield Action.SEND_INITIATION_RETRY
            elif t is Timer.SEND_KEEPALIVE:
                yield Action.SEND_KEEPALIVE
                if self._need_another_keepalive:
                    self._need_another_keepalive = False
                    deadlines[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
            elif t is Timer.NEW_HANDSHAKE:
                yield Action.SEND_INITIATION
            elif t is Timer.ZERO_KEY_MATERIAL:
                yield Action.ZERO_KEYS
            elif self._persistent_keepalive > 0:  # Timer.PERSISTENT_KEEPALIVE
                yield Action.SEND_KEEPALIVE

    def state(self) -> tuple:
        """Everything that decides what the timers do next, as a hashable value (for tests
        that prove an event changed nothing, and for debugging)."""
        return (
            tuple(sorted(self._deadlines.items())),
            self._handshake_attempts,
            self._need_another_keepalive,
            self._sent_last_minute_handshake,
            self._persistent_keepalive,
        )

    # --- configuration

    def set_persistent_keepalive(self, seconds: int) -> None:
        self._persistent_keepalive = seconds
        if seconds == 0:
            self._deadlines.pop(Timer.PERSISTENT_KEEPALIVE, None)
            self.on_change()

    def stop(self) -> None:
        """The peer is gone: disarm everything."""
        self._deadlines.clear()
        self.on_change()

    # --- events (wireguard-go names)

    def data_sent(self, now: float) -> None:
        """Data sent: expect something back within 15 s, else start a new handshake."""
        if Timer.NEW_HANDSHAKE not in self._deadlines:
            self._deadlines[Timer.NEW_HANDSHAKE] = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
            self.on_change()

    def data_received(self, now: float) -> None:
        """Data received: answer with a keepalive in 10 s unless we send something first."""
        if Timer.SEND_KEEPALIVE not in self._deadlines:
            self._deadlines[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
            self.on_change()
        else:
            self._need_another_keepalive = True

    # A deadline that only goes away needs no notice: the schedule drops what no longer holds
    # when it reaches it (Device.next_deadline), so the per-batch events below stay cheap.
    def any_authenticated_packet_sent(self, now: float) -> None:
        self._deadlines.pop(Timer.SEND_KEEPALIVE, None)

    def any_authenticated_packet_received(self, now: float) -> None:
        self._deadlines.pop(Timer.NEW_HANDSHAKE, None)

    def any_authenticated_packet_traversal(self, now: float) -> None:
        if self._persistent_keepalive > 0:
            self._deadlines[Timer.PERSISTENT_KEEPALIVE] = now + self._persistent_keepalive
            self.on_change()

    # The events of a batch's packets to or from one peer, in one call each (the hot paths
    # report them once per peer per batch): exactly the events named, in that order.
    def transport_sent(self, now: float, data: bool) -> None:
        """any_authenticated_packet_traversal, any_authenticated_packet_sent, and data_sent if
        `data` (not only keepalives) went out."""
        deadlines = self._deadlines
        if self._persistent_keepalive > 0:
            deadlines[Timer.PERSISTENT_KEEPALIVE] = now + self._persistent_keepalive
            self.on_change()
        deadlines.pop(Timer.SEND_KEEPALIVE, None)
        if data and Timer.NEW_HANDSHAKE not in deadlines:
            deadlines[Timer.NEW_HANDSHAKE] = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
            self.on_change()

    def transport_received(self, now: float, data: bool) -> None:
        """any_authenticated_packet_traversal, any_authenticated_packet_received, and
        data_received if `data` (not only keepalives) came in."""
        deadlines = self._deadlines
        if self._persistent_keepalive > 0:
            deadlines[Timer.PERSISTENT_KEEPALIVE] = now + self._persistent_keepalive
            self.on_change()
        deadlines.pop(Timer.NEW_HANDSHAKE, None)
        if data:
            if Timer.SEND_KEEPALIVE not in deadlines:
                deadlines[Timer.SEND_KEEPALIVE] = now + KEEPALIVE_TIMEOUT
                self.on_change()
            else:
                self._need_another_keepalive = True

    def handshake_requested(self, now: float) -> None:
        """A new handshake is wanted (not a retry): the retries count from zero again
        (wireguard-go: SendHandshakeInitiation(isRetry=false))."""
        self._handshake_attempts = 0

    def handshake_initiated(self, now: float) -> None:
        self._deadlines[Timer.RETRANSMIT_HANDSHAKE] = now + REKEY_TIMEOUT + self._jitter()
        self.on_change()

    def handshake_complete(self, now: float) -> None:
        self._deadlines.pop(Timer.RETRANSMIT_HANDSHAKE, None)
        self._handshake_attempts = 0
        self._sent_last_minute_handshake = False

    def session_derived(self, now: float) -> None:
        self._deadlines[Timer.ZERO_KEY_MATERIAL] = now + ZERO_KEYS_AFTER
        self.on_change()

    def last_minute_handshake(self, now: float) -> bool:
        """Data arrived under our own keypair close to REJECT_AFTER_TIME: True (send an
        initiation) the first time, then False until a handshake completes."""
        if self._sent_last_minute_handshake:
            return False
        self._sent_last_minute_handshake = True
        return True
