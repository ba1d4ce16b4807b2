"""Transport sessions: a keypair per completed handshake, and a peer's previous/current/next set.

The initiator uses a new keypair at once. The responder parks its keypair in `next` until the
initiator's first transport message arrives under it (key confirmation), then promotes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .constants import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME
from transport.replay import ReplayFilter

if TYPE_CHECKING:
    from .peer import Peer


class Keypair:
    __slots__ = (
        "peer",
        "send",
        "recv",
        "send_counter",
        "replay",
        "created",
        "is_initiator",
        "local_index",
        "remote_index",
    )

    def __init__(
        self,
        peer: "Peer",
        send_key: bytes,
        recv_key: bytes,
        is_initiator: bool,
        local_index: int,
        remote_index: int,
        now: float,
    ) -> None:
        self.peer = peer
        # One AEAD context per direction, built once: the hot path never re-derives a key.
        self.send = ChaCha20Poly1305(send_key)
        self.recv = ChaCha20Poly1305(recv_key)
        self.send_counter = 0
        self.replay = ReplayFilter()
        self.created = now
        self.is_initiator = is_initiator
        self.local_index = local_index
        self.remote_index = remote_index

    def can_send(self, now: float, count: int = 1) -> bool:
        return (
            self.send_counter + count <= REJECT_AFTER_MESSAGES
            and now - self.created < REJECT_AFTER_TIME
        )

    def can_receive(self, now: float) -> bool:
        return now - self.created < REJECT_AFTER_TIME


class Keypairs:
    __slots__ = ("previous", "current", "next")

    def __init__(self) -> None:
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None

    def all(self) -> list[Keypair]:
        return [k for k in (self.previous, self.current, self.next) if k is not None]

    def install(self, keypair: Keypair) -> list[Keypair]:
        """Place a fresh keypair; returns the keypairs it retires (their indices must go)."""
        retired: list[Keypair] = []
        if keypair.is_initiator:
            if self.next is not None:
                # A responder keypair never confirmed is still the newest we had: keep it as
                # previous so late packets under it decrypt; the old current goes.
                if self.current is not None:
                    retired.append(self.current)
                if self.previous is not None:
                    retired.append(self.previous)
                self.previous = self.next
                self.next = None
            else:
                if self.previous is not None:
                    retired.append(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            if self.next is not None:
                retired.append(self.next)
            if self.previous is not None:
                retired.append(self.previous)
            self.next = keypair
            self.previous = None
        return retired

    def confirm(self, keypair: Keypair) -> Keypair | None:
        """First packet received under `next`: promote it. Returns the retired keypair, if any.
        Does nothing unless `keypair` is `next`."""
        if keypair is not self.next:
            return None
        retired = self.previous
        self.previous = self.current
        self.current = keypair
        self.next = None
        return retired

    def clear(self) -> list[Keypair]:
        gone = self.all()
        self.previous = self.current = self.next = None
        return gone
