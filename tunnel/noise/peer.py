"""A peer as the device sees it: keys, sessions, timers, endpoint, queue and counters."""

from __future__ import annotations

from collections import deque
from typing import Callable, Hashable

from .cookie import CookieGenerator
from .handshake import Handshake, Identity
from .session import Keypairs
from .timers import PeerTimers

Endpoint = Hashable  # what the I/O layer uses for a UDP address, e.g. ("192.0.2.1", 51820)


class Peer:
    __slots__ = (
        "public_key",
        "handshake",
        "keypairs",
        "timers",
        "cookie",
        "endpoint",
        "roaming",
        "staged",
        "rx_bytes",
        "tx_bytes",
        "last_handshake_wall",
        "keepalive_requested",
        "__weakref__",
    )

    def __init__(
        self,
        identity: Identity | None,
        public_key: bytes,
        preshared_key: bytes,
        jitter: Callable[[], float],
    ) -> None:
        self.public_key = public_key
        self.handshake = Handshake(identity, public_key, preshared_key)
        self.keypairs = Keypairs()
        self.timers = PeerTimers(jitter)
        self.cookie = CookieGenerator(public_key)
        self.endpoint: Endpoint | None = None
        # Follow the peer to the source address of its authenticated packets. Off for a peer
        # pinned to a path (a bridge): a packet arriving another way must not move our replies
        # off that path, and replies to its handshakes go to `endpoint`, not to the source.
        self.roaming = True
        # Packets waiting for a session, oldest first (bounded by the device).
        self.staged: deque[bytes] = deque()
        self.rx_bytes = 0
        self.tx_bytes = 0
        # Unix time of the last completed handshake, for `wg show`; None if never.
        self.last_handshake_wall: float | None = None
        # Set by configuration (persistent keepalive turned on): the next tick sends a keepalive.
        self.keepalive_requested = False

    @property
    def persistent_keepalive(self) -> int:
        return self.timers.persistent_keepalive_interval

    @property
    def preshared_key(self) -> bytes:
        return self.handshake.preshared_key

    def __repr__(self) -> str:
        import base64

        return f"<Peer {base64.b64encode(self.public_key).decode()[:8]}... endpoint={self.endpoint!r}>"
