"""LWO, Mullvad's lightweight WireGuard obfuscation: the codec, sans-IO (no sockets, no trio,
no clock, no randomness of its own: the caller passes the random byte).

The format, as Mullvad's client implements it (mullvadvpn-app tunnel-obfuscation/src/lwo.rs,
used inline by talpid-wireguard/src/gotatun/obfuscation/lwo.rs):

- The key is a WireGuard public key: the **receiver's**. A client sends with the server's public
  key and reads with its own; a server reads with its own and answers with the client's. So a
  receiver deobfuscates every LWO datagram with one key, its own, before it knows the sender.
- A "header region" at the start of each message is XORed with the key repeated (byte i with
  key[i % 32]). Its length depends on the WireGuard message type: the whole message for a
  handshake initiation (148 bytes), a response (92) and a cookie reply (64), mac1 and mac2
  included; the first 32 bytes of a transport data message (type, reserved, receiver index,
  counter, and the first 16 bytes of the ciphertext, or all of a keepalive's tag). The rest of
  a data message is left as it is (it is ciphertext already).
- Then byte 1 (the first reserved byte, 0 in WireGuard) is replaced by a random byte with its top
  bit (0x80) set. That bit is what tells LWO from plain WireGuard on one port: WireGuard requires
  the byte to be 0.
- The receiver finds the type as byte 0 XOR key[0], XORs the header region back and sets byte 1
  to 0. Bytes 2 and 3 come back as they were (0 for any real message).
- Nothing is added or removed: zero bytes of overhead, sizes unchanged.

Mullvad's client leaves a datagram whose type is not 1..4, or that is shorter than its header
region, untouched (and so sends it in the clear). `obfuscate` refuses such input instead
(LwoError): every datagram wgpy sends comes from its protocol core, which makes none, and a
plain datagram must never leave by accident. `deobfuscate` returns None for anything that is not
an LWO message (see there); it never raises for any bytes.
"""

from __future__ import annotations

from typing import Union

KEY_SIZE = 32
OBFUSCATION_BIT = 0x80  # set in byte 1 of every LWO message; 0 in plain WireGuard

# WireGuard message type -> bytes of the header region.
HEADER_SIZES = {
    1: 148,  # handshake initiation (the whole message)
    2: 92,  # handshake response (the whole message)
    3: 64,  # cookie reply (the whole message)
    4: 32,  # transport data: header 16 + the first 16 bytes of ciphertext
}


class LwoError(ValueError):
    """What `obfuscate` or `LwoKey` cannot work with; the message says why (never the data)."""


class LwoKey:
    """A receiver's public key, prepared for the codec (the XOR masks as integers, per message
    type). Make one per key and reuse it: building it costs more than a datagram."""

    __slots__ = ("key", "first", "_table")

    def __init__(self, key: bytes) -> None:
        key = bytes(key)
        if len(key) != KEY_SIZE:
            raise LwoError(f"an LWO key is a {KEY_SIZE}-byte public key, not {len(key)} bytes")
        self.key = key
        self.first = key[0]
        repeated = key * (max(HEADER_SIZES.values()) // KEY_SIZE + 1)
        # type -> (size, XOR mask, mask that clears byte 1, shift of byte 1), big-endian integers
        self._table = {}
        for mtype, size in HEADER_SIZES.items():
            shift = (size - 2) * 8
            mask = int.from_bytes(repeated[:size], "big")
            keep = ((1 << (size * 8)) - 1) ^ (0xFF << shift)
            self._table[mtype] = (size, mask, keep, shift)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LwoKey) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"LwoKey({self.key[:4].hex()}...)"


KeyLike = Union[LwoKey, bytes]


def _prepared(key: KeyLike) -> LwoKey:
    return key if isinstance(key, LwoKey) else LwoKey(key)


def obfuscate(datagram: bytes, key: KeyLike, noise: int) -> bytes:
    """The LWO form of one WireGuard message, for the receiver whose public key is `key`.

    `noise` is the random byte (0..255; its top bit is set here, as Mullvad does): take it from a
    good random source per datagram. Raises LwoError if `datagram` is not a WireGuard message
    (type 1..4, at least as long as its header region) or `noise` is not a byte."""
    k = _prepared(key)
    if not 0 <= noise <= 0xFF:
        raise LwoError("the random byte must be 0..255")
    entry = k._table.get(datagram[0]) if datagram else None
    if entry is None:
        raise LwoError("not a WireGuard message: the first byte is not a message type 1..4")
    size, mask, keep, shift = entry
    if len(datagram) < size:
        raise LwoError(f"a type {datagram[0]} message is at least {size} bytes, this one {len(datagram)}")
    head = ((int.from_bytes(datagram[:size], "big") ^ mask) & keep) | ((noise | OBFUSCATION_BIT) << shift)
    return head.to_bytes(size, "big") + datagram[size:]


def deobfuscate(datagram: bytes, key: KeyLike) -> bytes | None:
    """The WireGuard message inside one LWO datagram, read with our own public key `key`; None if
    the datagram is not an LWO message: empty, byte 0 XOR key[0] not a type 1..4, shorter than
    that type's header region, or without the obfuscation bit (0x80 of byte 1). Never raises for
    any `datagram`. What comes back is not authenticated: the protocol core checks it as any
    datagram (bytes 2 and 3 of a forged datagram may well be nonzero)."""
    k = _prepared(key)
    if len(datagram) < 2 or not datagram[1] & OBFUSCATION_BIT:
        return None
    entry = k._table.get(datagram[0] ^ k.first)
    if entry is None:
        return None
    size, mask, keep, _ = entry
    if len(datagram) < size:
        return None
    head = (int.from_bytes(datagram[:size], "big") ^ mask) & keep
    return head.to_bytes(size, "big") + datagram[size:]


def is_lwo(datagram: bytes) -> bool:
    """Whether a datagram on a port that serves both could be LWO (its obfuscation bit is set);
    plain WireGuard never sets it. Cheap: one byte."""
    return len(datagram) >= 2 and bool(datagram[1] & OBFUSCATION_BIT)
