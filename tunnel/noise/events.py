"""Handshake events the core reports, for the I/O layer to log as wireguard-go does at verbose level.

The core never logs (it does no I/O). When `Device.events` is a list, the device appends an
`Event` for each handshake event: initiations and responses sent and received, keypairs created,
handshakes completed, retries and give-ups of the timers, cookie replies, and invalid handshake
messages (with their source). Nothing is recorded per transport data packet, and nothing at all
while `Device.events` is None (the default), so the hot path pays nothing when nobody listens.
The engine drains the list after each call into the core and logs `describe(event)`.

Events caused by the network (invalid messages, cookie replies under a flood) could come at any
rate: at most EVENTS_PER_SECOND are recorded per second of the caller's clock; the rest are
counted, and the next window's first record is a SUPPRESSED event saying how many were left out.

Peers are named as wireguard-go names them, `peer(AbCd…wxYz)` (first and last four characters
of the base64 public key); no private or preshared key ever appears in an event.
"""

from __future__ import annotations

import base64
from typing import NamedTuple

from transport.base import Endpoint

from .constants import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT, ZERO_KEYS_AFTER

EVENTS_PER_SECOND = 64


class Kind:
    """What happened (Event.kind)."""

    INITIATION_SENT = "initiation sent"
    INITIATION_RECEIVED = "initiation received"
    RESPONSE_SENT = "response sent"
    RESPONSE_RECEIVED = "response received"
    KEYPAIR_CREATED = "keypair created"
    HANDSHAKE_COMPLETED = "handshake completed"
    RETRY = "handshake retry"  # value: the try number
    STOPPED_HEARING = "stopped hearing back"
    GAVE_UP = "handshake gave up"  # value: the number of attempts
    KEYS_ZEROED = "keys zeroed"
    INVALID_INITIATION = "invalid initiation"
    INVALID_RESPONSE = "invalid response"
    INVALID_MAC1 = "invalid mac1"
    COOKIE_SENT = "cookie reply sent"
    COOKIE_RECEIVED = "cookie reply received"
    INVALID_COOKIE = "invalid cookie reply"
    SUPPRESSED = "suppressed"  # value: how many events were not recorded


class Event(NamedTuple):
    kind: str
    peer: bytes | None = None  # the peer's public key, when the event is about a known peer
    source: Endpoint | None = None  # where a received message came from
    value: int = 0  # a count or an index (see Kind)


def short_key(public_key: bytes) -> str:
    """`peer(AbCd…wxYz)`, wireguard-go's name for a peer in its logs."""
    text = base64.b64encode(public_key).decode()
    return f"peer({text[:4]}…{text[39:43]})"


def _where(source: Endpoint | None) -> str:
    return str(source) if source is not None else "an unknown source"


def describe(event: Event) -> str:
    """The log line for an event (wireguard-go's wording, where it has one)."""
    kind, peer = event.kind, short_key(event.peer) if event.peer is not None else "peer(?)"
    src, value = _where(event.source), event.value
    if kind == Kind.INITIATION_SENT:
        return f"{peer} - sending handshake initiation"
    if kind == Kind.INITIATION_RECEIVED:
        return f"{peer} - received handshake initiation from {src}"
    if kind == Kind.RESPONSE_SENT:
        return f"{peer} - sending handshake response"
    if kind == Kind.RESPONSE_RECEIVED:
        return f"{peer} - received handshake response from {src}"
    if kind == Kind.KEYPAIR_CREATED:
        return f"{peer} - keypair {value} created"
    if kind == Kind.HANDSHAKE_COMPLETED:
        return f"{peer} - handshake completed"
    if kind == Kind.RETRY:
        return (f"{peer} - handshake did not complete after {REKEY_TIMEOUT:g} seconds, "
                f"retrying (try {value})")
    if kind == Kind.STOPPED_HEARING:
        return (f"{peer} - retrying handshake because we stopped hearing back after "
                f"{KEEPALIVE_TIMEOUT + REKEY_TIMEOUT:g} seconds")
    if kind == Kind.GAVE_UP:
        return f"{peer} - handshake did not complete after {value} attempts, giving up"
    if kind == Kind.KEYS_ZEROED:
        return (f"{peer} - removing all keys, since we haven't received a new one in "
                f"{ZERO_KEYS_AFTER:g} seconds")
    if kind == Kind.INVALID_INITIATION:
        return f"received invalid initiation message from {src}"
    if kind == Kind.INVALID_RESPONSE:
        return f"received invalid response message from {src}"
    if kind == Kind.INVALID_MAC1:
        return f"received handshake message with invalid mac1 from {src}"
    if kind == Kind.COOKIE_SENT:
        return f"under load: sending cookie reply for a denied handshake message from {src}"
    if kind == Kind.COOKIE_RECEIVED:
        return f"{peer} - received cookie reply from {src}"
    if kind == Kind.INVALID_COOKIE:
        return f"received invalid cookie reply from {src}"
    if kind == Kind.SUPPRESSED:
        return f"{value} more handshake events not logged (over {EVENTS_PER_SECOND} a second)"
    return kind
