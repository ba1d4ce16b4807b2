"""Shadowsocks TCP streams, sans-IO: bytes in, bytes out, `now` passed in, no clock, no socket.

AEAD-2017 (SIP004/SIP007, aead.md):
    salt || { AEAD(len u16 BE) || AEAD(payload) }...
    payload <= 0x3FFF (the two high bits of the length are reserved, zero); the nonce is a 12-byte
    little-endian counter, incremented after every seal/open (so twice per chunk). The request's
    first payload starts with the target address.

AEAD-2022 (SIP022 section 3.1), same chunks with payloads up to 0xFFFF, and headers:
    request:  salt || AEAD(type 0, timestamp u64, length u16) || AEAD(address, padding length u16,
              padding, initial payload) || chunks...          (the fixed header is 11 bytes)
    response: salt || AEAD(type 1, timestamp u64, request salt, length u16) || AEAD(payload)
              || chunks...                                   (the header is the first length)
    Timestamps more than 30 s from `now` (Unix time) are replays; the server checks the request
    salt against its SaltFilter, the client checks the request salt echoed in the response.

Roles (the same classes for both editions):
    client, request out    TcpEncryptor(cipher, target)
    server, request in     TcpDecryptor(cipher, expect_target=True, salt_filter=...)
    server, response out   TcpEncryptor(cipher, request_salt=dec.salt)
    client, response in    TcpDecryptor(cipher, request_salt=enc.salt)
(AEAD-2017 ignores request_salt: its response stream carries no header.)

A decryptor holds at most one incomplete chunk (< 2 + 0xFFFF + 2*16 bytes) plus, until the target
address is complete, at most one address: its memory is bounded whatever the peer sends. After an
error it stays failed and re-raises the same error.

Detection resistance (SIP022 3.1.4) is the I/O layer's job: write the salt and headers in one call
(encrypt() returns them as one bytes object), read the salt and fixed header with one read, and on
failure do not reveal how many bytes were consumed. `established` tells when the header passed.
"""

from __future__ import annotations

import hmac
import math
import os
import secrets
from typing import Any

from cryptography.exceptions import InvalidTag

from .address import Address, MAX_ADDRESS_LEN, encode_address, parse_address_untrusted
from .cipher import Cipher, NONCE_LEN
from .errors import AuthenticationError, ProtocolError, ReplayError, ShadowsocksError, UsageError

MAX_PAYLOAD_2017 = 0x3FFF
MAX_PAYLOAD_2022 = 0xFFFF
LENGTH_RESERVED_BITS = 0xC000
MAX_PADDING = 900
TIMESTAMP_WINDOW = 30  # seconds, either way
TYPE_CLIENT = 0
TYPE_SERVER = 1
REQUEST_FIXED_HEADER_LEN = 1 + 8 + 2


def check_timestamp(timestamp: int, now: float, what: str) -> None:
    """Raise ReplayError when `timestamp` is more than 30 s away from `now` (SIP022)."""
    diff = timestamp - int(now)
    if abs(diff) > TIMESTAMP_WINDOW:
        raise ReplayError(f"{what}: timestamp is {diff:+d} s from now (window is ±{TIMESTAMP_WINDOW} s)")


def unix_timestamp(now: Any) -> int:
    """`now` as the u64 a 2022 header carries; UsageError when it is missing or not a time."""
    if (now is None or isinstance(now, bool) or not isinstance(now, (int, float))
            or not math.isfinite(now) or now < 0):
        raise UsageError("a 2022 stream needs `now`: the Unix time in seconds (time.time())")
    return int(now)


def random_padding_length() -> int:
    """1..900, uniformly: what a 2022 request without initial payload must carry."""
    return 1 + secrets.randbelow(MAX_PADDING)


class _ChunkAead:
    """The session AEAD with its little-endian nonce counter."""

    __slots__ = ("_aead", "_counter")

    def __init__(self, aead: Any) -> None:
        self._aead = aead
        self._counter = 0

    def _nonce(self) -> bytes:
        nonce = self._counter.to_bytes(NONCE_LEN, "little")
        self._counter += 1
        return nonce

    def seal(self, plaintext: bytes) -> bytes:
        return self._aead.encrypt(self._nonce(), plaintext, None)

    def open(self, ciphertext: bytes, what: str) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(), ciphertext, None)
        except InvalidTag:
            raise AuthenticationError(f"TCP stream: {what} failed authentication") from None


class TcpEncryptor:
    """Turns plaintext into one direction of a Shadowsocks TCP stream. `encrypt(data, now)`
    returns the bytes to write; the first call returns the salt and headers too."""

    __slots__ = ("cipher", "salt", "_aead", "_max", "_target", "_request_salt", "_padding",
                 "_started")

    def __init__(self, cipher: Cipher, target: Any = None, *, request_salt: bytes | None = None,
                 salt: bytes | None = None, padding: int | None = None) -> None:
        m = cipher.method
        self.cipher = cipher
        if salt is None:
            salt = os.urandom(m.salt_len)
        elif len(salt) != m.salt_len:
            raise UsageError(f"{m.name}: salt must be {m.salt_len} bytes")
        self.salt = bytes(salt)
        self._aead = _ChunkAead(cipher.session_aead(self.salt))
        self._max = MAX_PAYLOAD_2022 if m.is_2022 else MAX_PAYLOAD_2017
        self._target = encode_address(target) if target is not None else None
        self._request_salt = None
        if m.is_2022:
            if (target is None) == (request_salt is None):
                raise UsageError(
                    "a 2022 TcpEncryptor is either a request (give target) or a response "
                    "(give request_salt), exactly one"
                )
            if request_salt is not None:
                if len(request_salt) != m.salt_len:
                    raise UsageError(f"{m.name}: request_salt must be {m.salt_len} bytes")
                self._request_salt = bytes(request_salt)
        if padding is not None:
            if not (m.is_2022 and target is not None):
                raise UsageError("padding exists only in a 2022 request header")
            if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= MAX_PADDING:
                raise UsageError(f"padding must be an int in 0..{MAX_PADDING}")
        self._padding = padding
        self._started = False

    @property
    def started(self) -> bool:
        """Whether the salt (and headers) have been emitted."""
        return self._started

    def encrypt(self, data: bytes, now: float | None = None) -> bytes:
        """The stream bytes carrying `data` (any length; split into chunks). `now` (Unix time) is
        needed by 2022 streams for their header. A 2022 response holds its header back until there
        is payload to send with it (returns b"" for empty data until then)."""
        data = bytes(data)
        if self._started:
            return self._chunks(data)
        m = self.cipher.method
        if not m.is_2022:
            self._started = True
            first = (self._target or b"") + data
            return self.salt + self._chunks(first)
        if self._target is not None:
            out = self._request_2022(data, unix_timestamp(now))
        else:
            if not data:
                return b""
            out = self._response_2022(data, unix_timestamp(now))
        self._started = True
        return out

    def _chunks(self, data: bytes) -> bytes:
        out = []
        seal = self._aead.seal
        step = self._max
        for i in range(0, len(data), step):
            piece = data[i:i + step]
            out.append(seal(len(piece).to_bytes(2, "big")))
            out.append(seal(piece))
        return b"".join(out)

    def _request_2022(self, data: bytes, timestamp: int) -> bytes:
        assert self._target is not None
        padding = self._padding
        if padding is None:
            padding = 0 if data else random_padding_length()
        elif padding == 0 and not data:
            raise UsageError("a 2022 request header without initial payload needs padding (1..900)")
        room = MAX_PAYLOAD_2022 - len(self._target) - 2 - padding
        initial, rest = data[:room], data[room:]
        variable = self._target + padding.to_bytes(2, "big") + bytes(padding) + initial
        fixed = bytes((TYPE_CLIENT,)) + timestamp.to_bytes(8, "big") + len(variable).to_bytes(2, "big")
        seal = self._aead.seal
        return self.salt + seal(fixed) + seal(variable) + self._chunks(rest)

    def _response_2022(self, data: bytes, timestamp: int) -> bytes:
        assert self._request_salt is not None
        first, rest = data[:MAX_PAYLOAD_2022], data[MAX_PAYLOAD_2022:]
        fixed = (bytes((TYPE_SERVER,)) + timestamp.to_bytes(8, "big") + self._request_salt
                 + len(first).to_bytes(2, "big"))
        seal = self._aead.seal
        return self.salt + seal(fixed) + seal(first) + self._chunks(rest)


# decryptor states
_SALT, _FIXED, _VARIABLE, _LENGTH, _PAYLOAD = range(5)


class TcpDecryptor:
    """Turns one direction of a Shadowsocks TCP stream back into plaintext, whatever the
    fragmentation: feed(bytes, now) -> list of plaintext pieces (possibly empty).

    expect_target: the stream is a request; its target address is taken off the front of the
    plaintext into `.target`. A 2022 decryptor without expect_target is a response stream and
    needs `request_salt` (the salt of the request this answers). With a SaltFilter (servers), an
    authentic stream whose salt was seen before raises ReplayError.
    """

    __slots__ = ("cipher", "salt", "target", "established", "_expect_target", "_request_salt",
                 "_salt_filter", "_aead", "_state", "_need", "_buf", "_address_buf", "_error",
                 "_is_2022", "_got_any")

    def __init__(self, cipher: Cipher, *, expect_target: bool = False,
                 request_salt: bytes | None = None, salt_filter: Any = None) -> None:
        m = cipher.method
        self.cipher = cipher
        self._is_2022 = m.is_2022
        self._expect_target = bool(expect_target)
        self._request_salt = None
        if m.is_2022 and not expect_target:
            if request_salt is None or len(request_salt) != m.salt_len:
                raise UsageError(
                    f"a 2022 response TcpDecryptor needs the {m.salt_len}-byte request_salt"
                )
            self._request_salt = bytes(request_salt)
        self._salt_filter = salt_filter
        self.salt: bytes | None = None
        self.target: Address | None = None
        self.established = False  # the salt and header (2017: the first length) authenticated
        self._aead: _ChunkAead | None = None
        self._state = _SALT
        self._need = m.salt_len
        self._buf = bytearray()
        self._address_buf: bytearray | None = bytearray() if (expect_target and not m.is_2022) else None
        self._error: ShadowsocksError | None = None
        self._got_any = False

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a chunk (or of the target address)."""
        return len(self._buf) + (len(self._address_buf) if self._address_buf else 0)

    @property
    def failed(self) -> bool:
        return self._error is not None

    def feed(self, data: bytes, now: float | None = None) -> list[bytes]:
        """Consume `data`; return the plaintext pieces completed by it. Raises ProtocolError (or
        AuthenticationError / ReplayError) when the stream is invalid; the decryptor then stays
        failed. `now` is needed until `established` by 2022 streams (Unix time) and by streams
        with a salt filter (its clock)."""
        if self._error is not None:
            raise self._error
        if not self.established and (self._is_2022 or self._salt_filter is not None):
            if self._is_2022:
                unix_timestamp(now)
            elif now is None:
                raise UsageError("a TcpDecryptor with a salt_filter needs `now`")
        if data:
            self._got_any = True
            self._buf += data
        out: list[bytes] = []
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= self._need:
                need = self._need
                chunk = bytes(buf[pos:pos + need])
                pos += need
                self._step(chunk, now, out)
        except ShadowsocksError as exc:
            self._error = exc
            self._buf = bytearray()
            self._address_buf = None
            raise
        del buf[:pos]
        return out

    def feed_eof(self) -> None:
        """The peer closed its side: raise ProtocolError if that cut a chunk (or the header, or
        the target address) short. A stream that ended between chunks, or never started, is fine."""
        if self._error is not None:
            raise self._error
        if not self._got_any:
            return
        if self._buf or self._state not in (_LENGTH,):
            raise ProtocolError("TCP stream: ended inside a chunk")
        if self._expect_target and self.target is None:
            raise ProtocolError("TCP stream: ended before the target address was complete")

    # ---- the state machine

    def _step(self, chunk: bytes, now: float | None, out: list[bytes]) -> None:
        state = self._state
        m = self.cipher.method
        tag = m.tag_len
        if state == _SALT:
            self.salt = chunk
            self._aead = _ChunkAead(self.cipher.session_aead(chunk))
            if self._is_2022:
                self._state = _FIXED
                if self._expect_target:
                    self._need = REQUEST_FIXED_HEADER_LEN + tag
                else:
                    self._need = 1 + 8 + m.salt_len + 2 + tag
            else:
                self._state, self._need = _LENGTH, 2 + tag
            return
        assert self._aead is not None
        if state == _FIXED:
            self._fixed_header(self._aead.open(chunk, "header"), now)
        elif state == _VARIABLE:
            self._variable_header(self._aead.open(chunk, "request header"), out)
        elif state == _LENGTH:
            plain = self._aead.open(chunk, "length")
            length = int.from_bytes(plain, "big")
            if not self._is_2022:
                if length & LENGTH_RESERVED_BITS:
                    raise ProtocolError("TCP stream: reserved length bits set")
                if length == 0:
                    raise ProtocolError("TCP stream: empty chunk")
                if not self.established:
                    self._check_salt(now)
                    self.established = True
            self._state, self._need = _PAYLOAD, length + tag
        else:  # _PAYLOAD
            self._deliver(self._aead.open(chunk, "payload"), out)
            self._state, self._need = _LENGTH, 2 + tag

    def _check_salt(self, now: float | None) -> None:
        if self._salt_filter is not None and self._salt_filter.seen(self.salt, now):
            raise ReplayError("TCP stream: salt seen before")

    def _fixed_header(self, plain: bytes, now: float | None) -> None:
        m = self.cipher.method
        expected = TYPE_CLIENT if self._expect_target else TYPE_SERVER
        if plain[0] != expected:
            raise ProtocolError(f"TCP stream: header type {plain[0]}, expected {expected}")
        check_timestamp(int.from_bytes(plain[1:9], "big"), now, "TCP stream")  # type: ignore[arg-type]
        if not self._expect_target:
            assert self._request_salt is not None
            if not hmac.compare_digest(plain[9:9 + m.salt_len], self._request_salt):
                raise ProtocolError("TCP stream: the response is for another request")
        length = int.from_bytes(plain[-2:], "big")
        self._check_salt(now)
        self.established = True
        if self._expect_target:
            if length == 0:
                raise ProtocolError("TCP stream: empty request header")
            self._state = _VARIABLE
        else:
            self._state = _PAYLOAD
        self._need = length + m.tag_len

    def _variable_header(self, plain: bytes, out: list[bytes]) -> None:
        parsed = parse_address_untrusted(plain, 0)
        if parsed is None:
            raise ProtocolError("TCP stream: request header ends inside the address")
        address, pos = parsed
        if pos + 2 > len(plain):
            raise ProtocolError("TCP stream: request header ends before the padding length")
        padding = int.from_bytes(plain[pos:pos + 2], "big")
        if padding > MAX_PADDING:
            raise ProtocolError(f"TCP stream: padding {padding} > {MAX_PADDING}")
        pos += 2 + padding
        if pos > len(plain):
            raise ProtocolError("TCP stream: padding extends beyond the request header")
        if pos == len(plain) and padding == 0:
            raise ProtocolError("TCP stream: request header has neither payload nor padding")
        self.target = address
        if pos < len(plain):
            out.append(plain[pos:])
        self._state, self._need = _LENGTH, 2 + self.cipher.method.tag_len

    def _deliver(self, plain: bytes, out: list[bytes]) -> None:
        pending = self._address_buf
        if pending is None:
            if plain:
                out.append(plain)
            return
        pending += plain
        parsed = parse_address_untrusted(pending, 0)
        if parsed is None:
            if len(pending) > MAX_ADDRESS_LEN:  # cannot happen: a parse decides by then
                raise ProtocolError("TCP stream: target address too long")
            return
        self.target, end = parsed
        self._address_buf = None
        if end < len(pending):
            out.append(bytes(pending[end:]))
