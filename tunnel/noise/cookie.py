"""mac1/mac2 and cookie replies: WireGuard's defence against handshake floods.

`CookieChecker` guards messages addressed to us: it verifies mac1 always and mac2 under load, and
makes cookie replies. `CookieGenerator` belongs to one peer: it stamps our messages to that peer
with mac1 (and mac2 while we hold a fresh cookie) and consumes the peer's cookie replies.
"""

from __future__ import annotations

from typing import Callable

from . import crypto
from .constants import COOKIE_REFRESH_TIME, LABEL_COOKIE, LABEL_MAC1
from .messages import (
    COOKIE_NONCE,
    COOKIE_SEALED,
    HEADER_COOKIE,
    MAC1_FROM_END,
    MAC2_FROM_END,
    U32,
)

_ZERO_MAC = bytes(crypto.MAC_LEN)


class CookieChecker:
    def __init__(self, our_public: bytes, rng: Callable[[int], bytes]) -> None:
        self._rng = rng
        self.mac1_key = crypto.hash_(LABEL_MAC1, our_public)
        self.cookie_key = crypto.hash_(LABEL_COOKIE, our_public)
        self._secret = b""
        self._secret_time: float | None = None

    def check_mac1(self, msg: bytes) -> bool:
        n = len(msg)
        expected = crypto.mac(self.mac1_key, msg[: n - MAC1_FROM_END])
        return crypto.constant_time_eq(expected, msg[n - MAC1_FROM_END : n - MAC2_FROM_END])

    def _cookie(self, source: bytes) -> bytes:
        return crypto.mac(self._secret, source)

    def check_mac2(self, msg: bytes, source: bytes, now: float) -> bool:
        if self._secret_time is None or now - self._secret_time > COOKIE_REFRESH_TIME:
            return False
        n = len(msg)
        expected = crypto.mac(self._cookie(source), msg[: n - MAC2_FROM_END])
        return crypto.constant_time_eq(expected, msg[n - MAC2_FROM_END :])

    def create_reply(self, msg: bytes, receiver_index: int, source: bytes, now: float) -> bytes:
        """A cookie reply to `msg` (an initiation or response whose mac1 is valid)."""
        if self._secret_time is None or now - self._secret_time > COOKIE_REFRESH_TIME:
            self._secret = self._rng(32)
            self._secret_time = now
        n = len(msg)
        mac1 = msg[n - MAC1_FROM_END : n - MAC2_FROM_END]
        nonce = self._rng(crypto.XNONCE_LEN)
        sealed = crypto.xaead_seal(self.cookie_key, nonce, self._cookie(source), mac1)
        return HEADER_COOKIE + U32.pack(receiver_index) + nonce + sealed


class CookieGenerator:
    def __init__(self, peer_public: bytes) -> None:
        self.mac1_key = crypto.hash_(LABEL_MAC1, peer_public)
        self.cookie_key = crypto.hash_(LABEL_COOKIE, peer_public)
        self._cookie: bytes | None = None
        self._cookie_time = 0.0
        self._last_mac1: bytes | None = None

    def add_macs(self, msg: bytearray, now: float) -> None:
        """Fill in mac1 and mac2 (the last 32 bytes of `msg`)."""
        n = len(msg)
        mac1 = crypto.mac(self.mac1_key, bytes(msg[: n - MAC1_FROM_END]))
        msg[n - MAC1_FROM_END : n - MAC2_FROM_END] = mac1
        self._last_mac1 = mac1
        if self._cookie is not None and now - self._cookie_time < COOKIE_REFRESH_TIME:
            msg[n - MAC2_FROM_END :] = crypto.mac(self._cookie, bytes(msg[: n - MAC2_FROM_END]))
        else:
            msg[n - MAC2_FROM_END :] = _ZERO_MAC

    def consume_reply(self, reply: bytes, now: float) -> bool:
        """Take the cookie from a reply to the last message we stamped; False if it does not
        authenticate against that message's mac1."""
        if self._last_mac1 is None:
            return False
        try:
            cookie = crypto.xaead_open(
                self.cookie_key, reply[COOKIE_NONCE], reply[COOKIE_SEALED], self._last_mac1
            )
        except crypto.InvalidTag:
            return False
        self._cookie = cookie
        self._cookie_time = now
        return True
