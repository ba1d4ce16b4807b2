"""Cryptographic primitives of WireGuard, exactly as the protocol names them.

HASH/MAC/HMAC/KDF are BLAKE2s from the standard library; AEAD is ChaCha20-Poly1305 from
`cryptography` (OpenSSL); XAEAD (cookie replies) is XChaCha20-Poly1305 from PyNaCl, because
`cryptography` has no XChaCha. Nothing here reads a clock or touches I/O; randomness comes only
from callers (they pass bytes in).
"""

from __future__ import annotations

import hashlib
import hmac as _hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as _nacl

KEY_LEN = 32
TAG_LEN = 16
MAC_LEN = 16
XNONCE_LEN = 24

__all__ = [
    "InvalidTag",
    "hash_",
    "mac",
    "hmac",
    "kdf1",
    "kdf2",
    "kdf3",
    "dh",
    "public_key",
    "clamp",
    "aead_seal",
    "aead_open",
    "xaead_seal",
    "xaead_open",
    "constant_time_eq",
]

_NONCE = struct.Struct("<4xQ")


def hash_(*parts: bytes) -> bytes:
    """HASH(parts...) = BLAKE2s-256 of their concatenation."""
    h = hashlib.blake2s()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data) = keyed BLAKE2s with a 16-byte digest."""
    return hashlib.blake2s(data, digest_size=MAC_LEN, key=key).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 over BLAKE2s, block size 64)."""
    return _hmac.new(key, data, hashlib.blake2s).digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    t0 = hmac(key, data)
    return hmac(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    t2 = hmac(t0, t1 + b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    t2 = hmac(t0, t1 + b"\x02")
    t3 = hmac(t0, t2 + b"\x03")
    return t1, t2, t3


def clamp(private: bytes) -> bytes:
    """Curve25519 clamping, as `wg genkey` applies it to fresh random bytes."""
    if len(private) != KEY_LEN:
        raise ValueError("a Curve25519 private key is 32 bytes")
    b = bytearray(private)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def public_key(private: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes_raw()
    )


def dh(private: bytes, public: bytes) -> bytes:
    """X25519. Raises ValueError for a low-order public key (all-zero shared secret),
    which WireGuard must reject."""
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )


def aead_seal(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(_NONCE.pack(counter), plaintext, ad)


def aead_open(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """Raises InvalidTag when authentication fails."""
    return ChaCha20Poly1305(key).decrypt(_NONCE.pack(counter), ciphertext, ad)


def xaead_seal(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return _nacl.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def xaead_open(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Raises InvalidTag when authentication fails."""
    try:
        return _nacl.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except Exception as exc:  # nacl.exceptions.CryptoError
        raise InvalidTag() from exc


def constant_time_eq(a: bytes, b: bytes) -> bool:
    return _hmac.compare_digest(a, b)
