"""Methods, keys and the AEAD-2017 UDP packet (SIP004/SIP007, shadowsocks-org aead.md; SIP022).

A `Cipher` is a method plus its master key. For the AEAD-2017 methods the key is the raw key or
is derived from a password with OpenSSL's EVP_BytesToKey(MD5, no salt, one round), exactly as
shadowsocks-libev's crypto_derive_key; every salt gives a session subkey
HKDF-SHA1(key, salt, info="ss-subkey"). For the 2022 methods the key is a base64 PSK of exactly
the key length (never derived from a password); subkeys are BLAKE3 derive_key("shadowsocks 2022
session subkey", key || salt).

AEAD-2017 UDP packet:  salt || AEAD(subkey, nonce 0, address || payload), a fresh salt each time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher as _BlockCipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .address import Address, address_length, encode_address, parse_address_untrusted
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


def _hmac_sha1_pads(key: bytes) -> tuple[Any, Any]:
    """The inner and outer SHA-1 states of HMAC-SHA1 keyed with `key`, to be copied per message
    (hmac.digest looks the digest up by name on every call: this is several times faster)."""
    if len(key) > _SHA1_BLOCK:
        key = hashlib.sha1(key).digest()
    key = key.ljust(_SHA1_BLOCK, b"\0")
    return hashlib.sha1(key.translate(_IPAD)), hashlib.sha1(key.translate(_OPAD))


def _hmac_sha1(pads: tuple[Any, Any], message: bytes) -> bytes:
    inner = pads[0].copy()
    inner.update(message)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()


def hkdf_sha1(key: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF (RFC 5869) with HMAC-SHA1. An empty salt means HashLen zero bytes, as the RFC says."""
    if not 0 <= length <= 255 * 20:
        raise UsageError("HKDF-SHA1 output is at most 5100 bytes")
    prk = _hmac_sha1(_hmac_sha1_pads(salt or bytes(20)), key)
    pads = _hmac_sha1_pads(prk)
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = _hmac_sha1(pads, block + info + bytes((counter,)))
        out += block
        counter += 1
    return out[:length]


def aead_subkey(master_key: bytes, salt: bytes) -> bytes:
    """The AEAD-2017 session subkey: HKDF-SHA1(master key, salt, "ss-subkey"), key-sized."""
    return hkdf_sha1(master_key, salt, SUBKEY_INFO, len(master_key))


def _blake3() -> Any:
    try:
        import blake3
    except ImportError:
        raise ConfigError(
            "Shadowsocks 2022 methods need the 'blake3' package (pip install blake3)"
        ) from None
    return blake3


def session_subkey_2022(psk: bytes, salt: bytes) -> bytes:
    """The SIP022 session subkey: BLAKE3 derive_key(context, psk || salt), psk-sized. For TCP the
    salt is the stream's salt, for UDP the 8-byte session id."""
    hasher = _blake3().blake3(psk + salt, derive_key_context=BLAKE3_SUBKEY_CONTEXT)
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
            _blake3()  # fail now, not on the first packet
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
        plaintext = encode_address(target) + bytes(payload)
        return bytes(salt) + self.session_aead(salt).encrypt(_ZERO_NONCE, plaintext, None)

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
        if len(packet) <= m.salt_len + m.tag_len:
            raise ProtocolError("UDP packet too short")
        salt = packet[:m.salt_len]
        try:
            plaintext = self.session_aead(salt).decrypt(_ZERO_NONCE, packet[m.salt_len:], None)
        except InvalidTag:
            raise AuthenticationError("UDP packet failed authentication") from None
        if salt_filter is not None and salt_filter.seen(salt, now):
            raise ReplayError("UDP packet: salt seen before")
        parsed = parse_address_untrusted(plaintext, 0)
        if parsed is None:
            raise ProtocolError("UDP packet: truncated address")
        address, end = parsed
        return address, plaintext[end:]
