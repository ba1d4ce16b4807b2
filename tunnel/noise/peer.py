"""A peer as the device sees it: keys, sessions, timers, endpoint, queue and counters.

Everything here is changed by `Device` only (configuration methods, the data path, `tick`);
for the I/O layer and `wg show` the fields are read-only.
"""

from __future__ import annotations

import base64
from collections import deque
from typing import Callable

from transport.base import Endpoint

from .cookie import CookieGenerator
from .handshake import Handshake, Identity
from .session import Keypairs
from .timers import PeerTimers


class Peer:
    __slots__ = (
        "public_key",
        "handshake",
        "keypairs",
        "timers",
        "cookie",
        "endpoint",
        "pinned",
        "roam_via",
        "carries",
        "staged",
        "rx_bytes",
        "tx_bytes",
        "last_handshake_wall",
        "initiations_sent",
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
        # Where to send (None: unknown until the peer sends to us). Set by Device.set_endpoint;
        # the peer roams (follows the source of its authenticated packets) unless `pinned`,
        # the rule in Device._authenticated_from.
        self.endpoint: Endpoint | None = None
        self.pinned = False
        self.roam_via: int | None = None  # roaming keeps this Endpoint.via (Device.set_endpoint)
        # Packed addresses of nested hops reached through this peer (Device.set_carries).
        self.carries: frozenset[bytes] = frozenset()
        # Packets waiting for a session, oldest first (bounded by the device).
        self.staged: deque[bytes] = deque()
        self.rx_bytes = 0
        self.tx_bytes = 0
        # Unix time of the last completed handshake, for `wg show`; None if never.
        self.last_handshake_wall: float | None = None
        # Handshake initiations sent to this peer, ever (retries included): what a caller
        # judging whether a way to the peer works counts (bridge/fallback.py).
        self.initiations_sent = 0
        # Set by configuration (persistent keepalive turned on): the next tick sends a keepalive.
        self.keepalive_requested = False

    @property
    def persistent_keepalive(self) -> int:
        return self.timers.persistent_keepalive

    @property
    def preshared_key(self) -> bytes:
        return self.handshake.preshared_key

    def __repr__(self) -> str:
        key = base64.b64encode(self.public_key).decode()[:8]
        pinned = " pinned" if self.pinned else ""
        return f"<Peer {key}... endpoint={self.endpoint!r}{pinned}>"
