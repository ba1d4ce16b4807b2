"""Noise_IKpsk2 as WireGuard frames it: initiation and response, each a create/consume pair.

`SymmetricState` is the generic Noise object (MixHash, MixKey, MixKeyAndHash, EncryptAndHash,
Split); it is checked against the cacophony IKpsk2 vector. The WireGuard functions below add the
IDENTIFIER prologue, the TAI64N payload and the type/index/mac framing. Each consume function
changes a peer's `Handshake` only after every check has passed.
"""

from __future__ import annotations

import enum
from typing import Callable

from . import crypto, tai64n
from .constants import CONSTRUCTION, HANDSHAKE_INITIATION_RATE, IDENTIFIER, INITIATION_SIZE, RESPONSE_SIZE
from .messages import (
    HEADER_INIT,
    HEADER_RESPONSE,
    INIT_EPHEMERAL,
    INIT_SENDER,
    INIT_STATIC,
    INIT_TIMESTAMP,
    RESP_EMPTY,
    RESP_EPHEMERAL,
    RESP_RECEIVER,
    RESP_SENDER,
    U32,
    u32,
)

_ZERO_KEY = bytes(32)


class HandshakeError(Exception):
    """We cannot create a handshake message (e.g. the peer's public key is a low-order point)."""


class SymmetricState:
    """Noise's SymmetricState + CipherState for one handshake. Every key is used for one message,
    so the nonce counts up from zero per key as Noise says."""

    __slots__ = ("ck", "h", "k", "n")

    def __init__(self, protocol_name: bytes = CONSTRUCTION) -> None:
        if len(protocol_name) <= 32:
            self.h = protocol_name.ljust(32, b"\0")
        else:
            self.h = crypto.hash_(protocol_name)
        self.ck = self.h
        self.k: bytes | None = None
        self.n = 0

    def copy(self) -> "SymmetricState":
        other = SymmetricState.__new__(SymmetricState)
        other.ck, other.h, other.k, other.n = self.ck, self.h, self.k, self.n
        return other

    def mix_hash(self, data: bytes) -> None:
        self.h = crypto.hash_(self.h, data)

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = crypto.kdf2(self.ck, ikm)
        self.n = 0

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, self.k = crypto.kdf3(self.ck, ikm)
        self.mix_hash(temp_h)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self.k is None:
            ciphertext = plaintext
        else:
            ciphertext = crypto.aead_seal(self.k, self.n, plaintext, self.h)
            self.n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """Raises crypto.InvalidTag."""
        if self.k is None:
            plaintext = ciphertext
        else:
            plaintext = crypto.aead_open(self.k, self.n, ciphertext, self.h)
            self.n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        return crypto.kdf2(self.ck, b"")


class State(enum.Enum):
    ZEROED = 0
    INITIATION_CREATED = 1
    INITIATION_CONSUMED = 2
    RESPONSE_CREATED = 3
    RESPONSE_CONSUMED = 4


class Identity:
    """Our static key pair, with the handshake prefix every initiation to us starts from."""

    __slots__ = ("private", "public", "_prefix")

    def __init__(self, private: bytes) -> None:
        if len(private) != 32:
            raise ValueError("a private key is 32 bytes")
        self.private = private
        self.public = crypto.public_key(private)
        self._prefix = _prefix_for(self.public)

    def responder_prefix(self) -> SymmetricState:
        return self._prefix.copy()


def _prefix_for(responder_public: bytes) -> SymmetricState:
    s = SymmetricState(CONSTRUCTION)
    s.mix_hash(IDENTIFIER)  # the prologue
    s.mix_hash(responder_public)  # pre-message: the responder's static key
    return s


class Handshake:
    """One peer's handshake state (wireguard-go: Peer.handshake)."""

    __slots__ = (
        "remote_static",
        "preshared_key",
        "precomputed_static_static",
        "state",
        "sym",
        "local_ephemeral",
        "remote_ephemeral",
        "local_index",
        "remote_index",
        "last_timestamp",
        "last_initiation_consumed",
        "last_sent_handshake",
        "_initiator_prefix",
    )

    def __init__(self, identity: Identity | None, remote_static: bytes, preshared_key: bytes = _ZERO_KEY) -> None:
        if len(remote_static) != 32:
            raise ValueError("a public key is 32 bytes")
        self.remote_static = remote_static
        self.preshared_key = preshared_key
        self.state = State.ZEROED
        self.sym: SymmetricState | None = None
        self.local_ephemeral: bytes | None = None
        self.remote_ephemeral: bytes | None = None
        self.local_index = 0
        self.remote_index = 0
        self.last_timestamp = bytes(tai64n.TAI64N_LEN)
        self.last_initiation_consumed: float | None = None
        self.last_sent_handshake: float | None = None
        self._initiator_prefix = _prefix_for(remote_static)
        self.precomputed_static_static: bytes | None = None
        self.set_identity(identity)

    def set_identity(self, identity: Identity | None) -> None:
        """Recompute DH(our static, their static) after our private key changes."""
        self.precomputed_static_static = None
        if identity is not None:
            try:
                self.precomputed_static_static = crypto.dh(identity.private, self.remote_static)
            except ValueError:
                self.precomputed_static_static = None  # low-order key: never handshakes

    def clear(self) -> None:
        """Forget the in-progress handshake (keeps replay/flood history, as wireguard-go does)."""
        self.state = State.ZEROED
        self.sym = None
        self.local_ephemeral = None
        self.remote_ephemeral = None
        self.local_index = 0
        self.remote_index = 0


def create_initiation(
    identity: Identity, hs: Handshake, sender_index: int, ephemeral_private: bytes, wall_time: float
) -> bytearray:
    """The 148-byte initiation with zero macs (CookieGenerator.add_macs fills them)."""
    if hs.precomputed_static_static is None:
        raise HandshakeError("no usable static-static key for this peer")
    sym = hs._initiator_prefix.copy()
    e_pub = crypto.public_key(ephemeral_private)
    sym.mix_hash(e_pub)
    sym.mix_key(e_pub)
    try:
        sym.mix_key(crypto.dh(ephemeral_private, hs.remote_static))
    except ValueError as exc:
        raise HandshakeError("peer public key is a low-order point") from exc
    enc_static = sym.encrypt_and_hash(identity.public)
    sym.mix_key(hs.precomputed_static_static)
    enc_timestamp = sym.encrypt_and_hash(tai64n.stamp(wall_time))

    msg = bytearray(INITIATION_SIZE)
    msg[0:4] = HEADER_INIT
    msg[INIT_SENDER] = U32.pack(sender_index)
    msg[INIT_EPHEMERAL] = e_pub
    msg[INIT_STATIC] = enc_static
    msg[INIT_TIMESTAMP] = enc_timestamp

    hs.sym = sym
    hs.local_ephemeral = ephemeral_private
    hs.local_index = sender_index
    hs.state = State.INITIATION_CREATED
    return msg


def consume_initiation(
    identity: Identity,
    msg: bytes,
    find_peer: Callable[[bytes], Handshake | None],
    now: float,
) -> Handshake | None:
    """Authenticate an initiation and record it in the sender's Handshake. Returns that Handshake,
    or None (unknown peer, bad crypto, replayed timestamp, or a flood)."""
    sym = identity.responder_prefix()
    e_pub = bytes(msg[INIT_EPHEMERAL])
    sym.mix_hash(e_pub)
    sym.mix_key(e_pub)
    try:
        sym.mix_key(crypto.dh(identity.private, e_pub))
        static = sym.decrypt_and_hash(bytes(msg[INIT_STATIC]))
    except (ValueError, crypto.InvalidTag):
        return None
    hs = find_peer(static)
    if hs is None or hs.precomputed_static_static is None:
        return None
    sym.mix_key(hs.precomputed_static_static)
    try:
        timestamp = sym.decrypt_and_hash(bytes(msg[INIT_TIMESTAMP]))
    except crypto.InvalidTag:
        return None
    # Replay: the timestamp must be strictly newer. Flood: not within 20 ms of the last one.
    if timestamp <= hs.last_timestamp:
        return None
    if hs.last_initiation_consumed is not None and now - hs.last_initiation_consumed <= HANDSHAKE_INITIATION_RATE:
        return None

    hs.sym = sym
    hs.remote_ephemeral = e_pub
    hs.remote_index = u32(msg, INIT_SENDER)
    hs.last_timestamp = timestamp
    hs.last_initiation_consumed = now
    hs.state = State.INITIATION_CONSUMED
    return hs


def create_response(hs: Handshake, sender_index: int, ephemeral_private: bytes) -> bytearray:
    """The 92-byte response to the initiation `hs` consumed (zero macs)."""
    if hs.state is not State.INITIATION_CONSUMED or hs.sym is None or hs.remote_ephemeral is None:
        raise HandshakeError("no consumed initiation to respond to")
    sym = hs.sym.copy()
    e_pub = crypto.public_key(ephemeral_private)
    sym.mix_hash(e_pub)
    sym.mix_key(e_pub)
    try:
        sym.mix_key(crypto.dh(ephemeral_private, hs.remote_ephemeral))
        sym.mix_key(crypto.dh(ephemeral_private, hs.remote_static))
    except ValueError as exc:
        raise HandshakeError("low-order ephemeral or static key") from exc
    sym.mix_key_and_hash(hs.preshared_key)
    empty = sym.encrypt_and_hash(b"")

    msg = bytearray(RESPONSE_SIZE)
    msg[0:4] = HEADER_RESPONSE
    msg[RESP_SENDER] = U32.pack(sender_index)
    msg[RESP_RECEIVER] = U32.pack(hs.remote_index)
    msg[RESP_EPHEMERAL] = e_pub
    msg[RESP_EMPTY] = empty

    hs.sym = sym
    hs.local_ephemeral = ephemeral_private
    hs.local_index = sender_index
    hs.state = State.RESPONSE_CREATED
    return msg


def consume_response(identity: Identity, msg: bytes, hs: Handshake) -> bool:
    """Authenticate a response to the initiation `hs` created; on success `hs` holds the final
    chaining key and state RESPONSE_CONSUMED."""
    if hs.state is not State.INITIATION_CREATED or hs.sym is None or hs.local_ephemeral is None:
        return False
    sym = hs.sym.copy()
    e_pub = bytes(msg[RESP_EPHEMERAL])
    sym.mix_hash(e_pub)
    sym.mix_key(e_pub)
    try:
        sym.mix_key(crypto.dh(hs.local_ephemeral, e_pub))
        sym.mix_key(crypto.dh(identity.private, e_pub))
        sym.mix_key_and_hash(hs.preshared_key)
        sym.decrypt_and_hash(bytes(msg[RESP_EMPTY]))
    except (ValueError, crypto.InvalidTag):
        return False
    hs.sym = sym
    hs.remote_index = u32(msg, RESP_SENDER)
    hs.state = State.RESPONSE_CONSUMED
    return True


def derive_transport_keys(hs: Handshake) -> tuple[bytes, bytes, bool]:
    """(send key, receive key, we are the initiator) from a finished handshake; zeroes the
    handshake's secrets."""
    if hs.sym is None:
        raise HandshakeError("no handshake to derive keys from")
    if hs.state is State.RESPONSE_CONSUMED:
        initiator = True
    elif hs.state is State.RESPONSE_CREATED:
        initiator = False
    else:
        raise HandshakeError(f"cannot derive keys in state {hs.state.name}")
    first, second = hs.sym.split()
    hs.sym = None
    hs.local_ephemeral = None
    hs.remote_ephemeral = None
    hs.state = State.ZEROED
    if initiator:
        return first, second, True
    return second, first, False
