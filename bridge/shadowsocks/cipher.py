"""Methods, keys and the AEAD-2017 UDP packet (SIP004/SIP007, shadowsocks-org aead.md; SIP022).

A `Cipher` is a method plus its master key. For the AEAD-2017 methods the key is the raw key or
is derived from a password with OpenSSL's EVP_BytesToKey(MD5, no salt, one round), exactly as
shadowsocks-libev's crypto_derive_key; every salt gives a session subkey
HKDF-SHA1(key, salt, info="ss-subkey"). For the 2022 methods the key is a base64 PSK of exactly
the key length (never derived from a password); subkeys are BLAKE3 derive_key("shadowsocks 2022
session subkey", key || salt).

AEAD-2017 UDP packet:  salt || AEAD(subkey, nonce 0, address || payload), a fresh salt each time.
Sealing and opening run once per datagram, so the subkey derivation and the address parsing
(parse_udp_address, shared with udp2022) are tuned for it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import blake3  # a declared dependency: Shadowsocks 2022 session subkeys
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher as _BlockCipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .address import (
    ATYP_IPV4,
    ATYP_IPV6,
    Address,
    address_length,
    encode_address,
    parse_address_untrusted,
)
from .errors import AuthenticationError, ConfigError, ProtocolError, ReplayError, UsageError

NONCE_LEN = 12
TAG_LEN = 16
SUBKEY_INFO = b"ss-subkey"
BLAKE3_SUBKEY_CONTEXT = "shadowsocks 2022 session subkey"
_ZERO_NONCE = bytes(NONCE_LEN)


@dataclass(frozen=True, slots=True)
class Method:
    """One cipher method's sizes (bytes) and AEAD."""

    name: str
    key_len: int
    salt_len: int
    is_2022: bool
    aead: Callable[[bytes], Any]
    nonce_len: int = NONCE_LEN
    tag_len: int = TAG_LEN


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("chacha20-ietf-poly1305", 32, 32, False, ChaCha20Poly1305),
        Method("aes-256-gcm", 32, 32, False, AESGCM),
        Method("aes-128-gcm", 16, 16, False, AESGCM),
        Method("2022-blake3-aes-128-gcm", 16, 16, True, AESGCM),
        Method("2022-blake3-aes-256-gcm", 32, 32, True, AESGCM),
    )
}


def get_method(name: str) -> Method:
    """The Method called `name` (case-insensitive). Raises ConfigError naming the supported ones."""
    method = METHODS.get(name.lower()) if isinstance(name, str) else None
    if method is None:
        raise ConfigError(f"unsupported method {name!r} (supported: {', '.join(METHODS)})")
    return method


# ---- key derivation


def evp_bytes_to_key(password: bytes, key_len: int) -> bytes:
    """OpenSSL EVP_BytesToKey with MD5, no salt, one iteration: D1 = MD5(password),
    Di = MD5(D(i-1) || password), key = D1 || D2 || ... cut to key_len."""
    out = b""
    block = b""
    while len(out) < key_len:
        block = hashlib.md5(block + password, usedforsecurity=False).digest()
        out += block
    return out[:key_len]


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_SHA1_BLOCK = 64
_SHA1_LEN = 20
_sha1 = hashlib.sha1


def _hmac_sha1_key_blocks(key: bytes) -> tuple[bytes, bytes]:
    """HMAC-SHA1's (RFC 2104) key blocks, K xor ipad and K xor opad."""
    if len(key) > _SHA1_BLOCK:
        key = _sha1(key).digest()
    key = key.ljust(_SHA1_BLOCK, b"\0")
    return key.translate(_IPAD), key.translate(_OPAD)


def hkdf_sha1(key: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF (RFC 5869) with HMAC-SHA1. An empty salt means HashLen zero bytes, as the RFC says:
    HMAC pads both to the same key block.

    Each HMAC is two one-shot SHA-1 calls over key block || message: with OpenSSL 3 behind
    hashlib, copying a hash object costs as much as making one, so precomputed pad states do not
    pay, and hmac.digest costs several SHA-1 calls. See aead_subkey for the per-packet use."""
    if not 0 <= length <= 255 * _SHA1_LEN:
        raise UsageError("HKDF-SHA1 output is at most 5100 bytes")
    inner, outer = _hmac_sha1_key_blocks(salt)
    prk = _sha1(outer + _sha1(inner + key).digest()).digest()
    inner, outer = _hmac_sha1_key_blocks(prk)
    okm = block = b""
    counter = 1
    while len(okm) < length:
        block = _sha1(outer + _sha1(inner + block + info + bytes((counter,))).digest()).digest()
        okm += block
        counter += 1
    return okm[:length]


_SUBKEY_INFO_1 = SUBKEY_INFO + b"\x01"
_SUBKEY_INFO_2 = SUBKEY_INFO + b"\x02"


def aead_subkey(master_key: bytes, salt: bytes) -> bytes:
    """The AEAD-2017 session subkey: HKDF-SHA1(master key, salt, "ss-subkey"), key-sized.

    Every AEAD-2017 UDP packet has a fresh salt, so this runs once per packet and is most of its
    cost. For keys of up to two SHA-1 outputs (every method's) it is hkdf_sha1 unrolled: about
    10% faster than the loop, as fast as cryptography's HKDF for 32-byte keys and faster for
    16-byte ones."""
    n = len(master_key)
    if n > 2 * _SHA1_LEN:
        return hkdf_sha1(master_key, salt, SUBKEY_INFO, n)
    inner, outer = _hmac_sha1_key_blocks(salt)
    prk = _sha1(outer + _sha1(inner + master_key).digest()).digest()
    inner, outer = _hmac_sha1_key_blocks(prk)
    okm = _sha1(outer + _sha1(inner + _SUBKEY_INFO_1).digest()).digest()
    if n > _SHA1_LEN:
        okm += _sha1(outer + _sha1(inner + okm + _SUBKEY_INFO_2).digest()).digest()
    return okm[:n]


def session_subkey_2022(psk: bytes, salt: bytes) -> bytes:
    """The SIP022 session subkey: BLAKE3 derive_key(context, psk || salt), psk-sized. For TCP the
    salt is the stream's salt, for UDP the 8-byte session id."""
    hasher = blake3.blake3(psk + salt, derive_key_context=BLAKE3_SUBKEY_CONTEXT)
    return hasher.digest(length=len(psk))


def decode_psk(text: str | bytes, key_len: int) -> bytes:
    """A SIP022 PSK from its standard base64 text, which must decode to exactly key_len bytes.
    The error never quotes the text."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError("the 2022 key is not base64 text") from None
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(
            f"the 2022 key must be standard base64 of exactly {key_len} bytes "
            f"(e.g. from `openssl rand -base64 {key_len}`); it is not valid base64"
        ) from None
    if len(raw) != key_len:
        raise ConfigError(
            f"the 2022 key must be standard base64 of exactly {key_len} bytes "
            f"(e.g. from `openssl rand -base64 {key_len}`); it decodes to {len(raw)} bytes"
        )
    return raw


# ---- the keyed method


class Cipher:
    """A method and its master key; makes session AEADs and seals/opens AEAD-2017 UDP packets.

    Cipher("aes-256-gcm", "mullvad")                          # password, EVP_BytesToKey
    Cipher("aes-256-gcm", key=raw32)                          # raw key (ss-server --key)
    Cipher("2022-blake3-aes-256-gcm", "<base64 PSK>")          # 2022: the password IS the PSK
    """

    __slots__ = ("method", "_key", "_ecb_enc", "_ecb_dec")

    def __init__(self, method: str | Method, password: str | bytes | None = None, *,
                 key: bytes | None = None) -> None:
        self.method = method if isinstance(method, Method) else get_method(method)
        m = self.method
        if (password is None) == (key is None):
            raise ConfigError(f"{m.name}: give exactly one of a password or a key")
        if key is not None:
            key = bytes(key)
            if len(key) != m.key_len:
                raise ConfigError(f"{m.name}: the key must be {m.key_len} bytes, not {len(key)}")
        elif m.is_2022:
            key = decode_psk(password, m.key_len)  # type: ignore[arg-type]
        else:
            raw = password.encode("utf-8") if isinstance(password, str) else bytes(password)
            if not raw:
                raise ConfigError(f"{m.name}: the password is empty")
            key = evp_bytes_to_key(raw, m.key_len)
        self._key = key
        self._ecb_enc = self._ecb_dec = None
        if m.is_2022:
            block = _BlockCipher(algorithms.AES(key), modes.ECB())
            self._ecb_enc = block.encryptor()
            self._ecb_dec = block.decryptor()

    def __repr__(self) -> str:
        return f"Cipher({self.method.name!r})"

    @property
    def key(self) -> bytes:
        """The master key (2017) or PSK (2022)."""
        return self._key

    @property
    def salt_len(self) -> int:
        return self.method.salt_len

    def new_salt(self) -> bytes:
        return os.urandom(self.method.salt_len)

    def session_aead(self, salt: bytes) -> Any:
        """The AEAD keyed with the session subkey for `salt` (a 2022 UDP session id for 2022 UDP)."""
        m = self.method
        if m.is_2022:
            return m.aead(session_subkey_2022(self._key, bytes(salt)))
        return m.aead(aead_subkey(self._key, bytes(salt)))

    # ---- 2022 separate-header block cipher (AES-ECB under the PSK, one 16-byte block)

    def encrypt_block(self, block: bytes) -> bytes:
        self._require_2022()
        return self._ecb_enc.update(block)  # type: ignore[union-attr]

    def decrypt_block(self, block: bytes) -> bytes:
        self._require_2022()
        return self._ecb_dec.update(block)  # type: ignore[union-attr]

    def _require_2022(self) -> None:
        if not self.method.is_2022:
            raise UsageError(f"{self.method.name} is not a 2022 method")

    def _require_2017(self, what: str) -> None:
        if self.method.is_2022:
            raise UsageError(
                f"{what} is the AEAD-2017 UDP packet; {self.method.name} UDP uses "
                "Udp2022Client / Udp2022Server"
            )

    # ---- AEAD-2017 UDP

    def udp_overhead(self, target: Any) -> int:
        """Bytes an AEAD-2017 UDP packet adds to a payload sent to `target`."""
        self._require_2017("udp_overhead")
        return self.method.salt_len + address_length(target) + self.method.tag_len

    def seal_udp(self, target: Any, payload: bytes, salt: bytes | None = None) -> bytes:
        """salt || AEAD(subkey(salt), nonce 0, address(target) || payload). The salt is fresh
        from os.urandom unless given (tests)."""
        self._require_2017("seal_udp")
        m = self.method
        if salt is None:
            salt = os.urandom(m.salt_len)
        elif len(salt) != m.salt_len:
            raise UsageError(f"{m.name}: salt must be {m.salt_len} bytes")
        else:
            salt = bytes(salt)
        # bytes + any buffer is bytes: the payload (a whole datagram) is copied once, here
        plaintext = encode_address(target) + payload
        return salt + m.aead(aead_subkey(self._key, salt)).encrypt(_ZERO_NONCE, plaintext, None)

    def open_udp(self, packet: bytes, *, salt_filter: Any = None,
                 now: float | None = None) -> tuple[Address, bytes]:
        """(address, payload) from an AEAD-2017 UDP packet; the address is the target (on a
        server) or the source (on a client). With a SaltFilter, an authentic packet whose salt was
        seen before raises ReplayError (pass `now` then). Raises ProtocolError or a subclass for
        anything that is not a valid packet, and nothing else."""
        self._require_2017("open_udp")
        if salt_filter is not None and now is None:
            raise UsageError("open_udp with a salt_filter needs `now`")
        m = self.method
        packet = bytes(packet)
        salt_len = m.salt_len
        if len(packet) <= salt_len + m.tag_len:
            raise ProtocolError("UDP packet too short")
        salt = packet[:salt_len]
        try:
            plaintext = m.aead(aead_subkey(self._key, salt)).decrypt(
                _ZERO_NONCE, packet[salt_len:], None)
        except InvalidTag:
            raise AuthenticationError("UDP packet failed authentication") from None
        if salt_filter is not None and salt_filter.seen(salt, now):
            raise ReplayError("UDP packet: salt seen before")
        parsed = parse_udp_address(plaintext, 0)
        if parsed is None:
            raise ProtocolError("UDP packet: truncated address")
        address, end = parsed
        return address, plaintext[end:]


_IP_ADDRESS_LEN = {ATYP_IPV4: 1 + 4 + 2, ATYP_IPV6: 1 + 16 + 2}


@functools.lru_cache(maxsize=256)
def _ip_address(raw: bytes) -> Address:
    return parse_address_untrusted(raw, 0)[0]  # type: ignore[index]


def parse_udp_address(data: bytes, offset: int) -> tuple[Address, int] | None:
    """parse_address_untrusted for the address in a UDP packet. A bridge sees the same few IP
    addresses in packet after packet, and building an Address from the wire costs about as much
    as decrypting the datagram, so IP addresses (any 7 or 19 bytes starting with their type
    parse, and always to the same Address) are looked up by their wire bytes."""
    if offset < len(data):
        size = _IP_ADDRESS_LEN.get(data[offset])
        if size is not None and offset + size <= len(data):
            return _ip_address(data[offset:offset + size]), offset + size
    return parse_address_untrusted(data, offset)
