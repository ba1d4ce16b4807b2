"""Shadowsocks 2022 UDP (SIP022 section 3.2), AES-GCM methods, sans-IO.

Packet = AES-ECB(PSK, session id (8) || packet id u64 BE) || AEAD(subkey, nonce, body)
    subkey = BLAKE3 derive_key("shadowsocks 2022 session subkey", PSK || session id)
    nonce  = the plaintext separate header's bytes 4..16
    client body: type 0, timestamp u64, padding length u16, padding, address, payload
    server body: type 1, timestamp u64, client session id, padding length u16, padding, address,
                 payload

A client session (`Udp2022Client`) has a random session id and counts its packet ids from 0; the
server (`Udp2022Server`) keys its sessions by client session id, answers each with its own server
session id, and keeps a sliding replay window per session. Timestamps more than 30 s from `now`
(Unix time, time.time()) are replays. Windows are updated only after the whole header validated.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections import OrderedDict
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag

from transport.replay import ReplayFilter

from .address import Address, address_length, encode_address
from .cipher import Cipher, parse_udp_address
from .errors import AuthenticationError, ConfigError, ProtocolError, ReplayError, UsageError
from .stream import MAX_PADDING, TYPE_CLIENT, TYPE_SERVER, check_timestamp, unix_timestamp

SEPARATE_HEADER_LEN = 16
SESSION_ID_LEN = 8
PACKET_ID_LIMIT = 1 << 64
SESSION_TIMEOUT = 60.0  # SIP022: sessions (and server-session associations) live at least 60 s
CLIENT_HEADER_LEN = 1 + 8 + 2
SERVER_HEADER_LEN = 1 + 8 + SESSION_ID_LEN + 2

# Each packet's fixed fields in one struct call: cheaper than slicing and int.from_bytes per field.
_SEPARATE_HEADER = struct.Struct(">8sQ")  # session id, packet id
_CLIENT_HEADER = struct.Struct(">BQH")  # type, timestamp, padding length
_SERVER_HEADER = struct.Struct(">BQ8sH")  # type, timestamp, client session id, padding length


class ClientPacket(NamedTuple):
    """What the server learns from one client packet."""

    session_id: bytes
    packet_id: int
    target: Address
    payload: bytes


def _padding_length(padding: int | None, payload: bytes) -> int:
    if padding is None:  # as shadowsocks-rust: pad only packets without payload
        return 0 if payload else secrets.randbelow(MAX_PADDING + 1)
    if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= MAX_PADDING:
        raise UsageError(f"padding must be an int in 0..{MAX_PADDING}")
    return padding


def _require_2022_aes(cipher: Cipher) -> None:
    if not cipher.method.is_2022:
        raise ConfigError(f"{cipher.method.name} is not a 2022 method; use Cipher.seal_udp/open_udp")


def _seal(cipher: Cipher, aead: Any, header: bytes, body: bytes) -> bytes:
    return cipher.encrypt_block(header) + aead.encrypt(header[4:16], body, None)


def _open_header(cipher: Cipher, packet: bytes, body_min: int) -> tuple[bytes, bytes, int]:
    """(plaintext separate header, session id, packet id)."""
    if len(packet) < SEPARATE_HEADER_LEN + cipher.method.tag_len + body_min:
        raise ProtocolError("2022 UDP packet too short")
    header = cipher.decrypt_block(packet[:SEPARATE_HEADER_LEN])
    return (header, *_SEPARATE_HEADER.unpack(header))


def _open_body(aead: Any, header: bytes, packet: bytes) -> bytes:
    try:
        return aead.decrypt(header[4:16], packet[SEPARATE_HEADER_LEN:], None)
    except InvalidTag:
        raise AuthenticationError("2022 UDP packet failed authentication") from None


def _padding_and_address(body: bytes, pos: int, padding: int) -> tuple[Address, bytes]:
    """The address and payload after `padding` bytes of padding at body[pos]."""
    if padding > MAX_PADDING:
        raise ProtocolError(f"2022 UDP packet: padding {padding} > {MAX_PADDING}")
    parsed = parse_udp_address(body, pos + padding)
    if parsed is None:
        raise ProtocolError("2022 UDP packet: truncated padding or address")
    address, end = parsed
    return address, body[end:]


class _Peer:
    """One remote session as seen from this side: its AEAD, replay window and last packet."""

    __slots__ = ("session_id", "aead", "window", "last_seen")

    def __init__(self, session_id: bytes, aead: Any, now: float) -> None:
        self.session_id = session_id
        self.aead = aead
        self.window = ReplayFilter()
        self.last_seen = now


class Udp2022Client:
    """One client UDP session (a local socket/flow): seals requests, opens the server's replies.

    Replies may come from more than one server session (a server restart): the current and one
    old server session are accepted; a third is refused while the old one has been heard from in
    the last `server_session_timeout` seconds (SIP022 3.2.4)."""

    __slots__ = ("cipher", "session_id", "_aead", "_next_packet_id", "_current", "_old",
                 "server_session_timeout")

    def __init__(self, cipher: Cipher, *, session_id: bytes | None = None,
                 server_session_timeout: float = SESSION_TIMEOUT) -> None:
        _require_2022_aes(cipher)
        if session_id is None:
            session_id = os.urandom(SESSION_ID_LEN)
        elif len(session_id) != SESSION_ID_LEN:
            raise UsageError("session_id must be 8 bytes")
        self.cipher = cipher
        self.session_id = bytes(session_id)
        self._aead = cipher.session_aead(self.session_id)
        self._next_packet_id = 0
        self._current: _Peer | None = None
        self._old: _Peer | None = None
        self.server_session_timeout = server_session_timeout

    @property
    def next_packet_id(self) -> int:
        return self._next_packet_id

    @property
    def server_session_id(self) -> bytes | None:
        """The current server session's id, once a reply came."""
        return self._current.session_id if self._current else None

    def overhead(self, target: Any, padding: int = 0) -> int:
        """Bytes a request to `target` adds to its payload."""
        return (SEPARATE_HEADER_LEN + self.cipher.method.tag_len + CLIENT_HEADER_LEN + padding
                + address_length(target))

    def seal(self, target: Any, payload: bytes, now: float, *, padding: int | None = None) -> bytes:
        """A client packet carrying `payload` to `target`. padding: None = random 0..900 when the
        payload is empty, else none (as shadowsocks-rust)."""
        timestamp = unix_timestamp(now)
        pad = _padding_length(padding, payload)
        address = encode_address(target)
        packet_id = self._next_packet_id
        if packet_id >= PACKET_ID_LIMIT:
            raise UsageError("2022 UDP session exhausted its packet ids; start a new session")
        self._next_packet_id = packet_id + 1
        header = _SEPARATE_HEADER.pack(self.session_id, packet_id)
        # bytes + any buffer is bytes: the payload is copied once, as the last operand
        body = _CLIENT_HEADER.pack(TYPE_CLIENT, timestamp, pad) + bytes(pad) + address + payload
        return _seal(self.cipher, self._aead, header, body)

    def open(self, packet: bytes, now: float) -> tuple[Address, bytes]:
        """(source address, payload) of a server packet for this session. Raises ProtocolError
        (or AuthenticationError / ReplayError) for anything else, and nothing else."""
        unix_timestamp(now)
        packet = bytes(packet)
        header, server_id, packet_id = _open_header(self.cipher, packet, SERVER_HEADER_LEN + 1)
        peer = None
        for known in (self._current, self._old):
            if known is not None and known.session_id == server_id:
                peer = known
        aead = peer.aead if peer is not None else self.cipher.session_aead(server_id)
        body = _open_body(aead, header, packet)
        kind, timestamp, client_id, padding = _SERVER_HEADER.unpack_from(body)
        if kind != TYPE_SERVER:
            raise ProtocolError(f"2022 UDP packet: type {kind}, expected {TYPE_SERVER}")
        check_timestamp(timestamp, now, "2022 UDP packet")
        if client_id != self.session_id:
            raise ProtocolError("2022 UDP packet: for another client session")
        address, payload = _padding_and_address(body, SERVER_HEADER_LEN, padding)
        if peer is None:
            old = self._old
            if (self._current is not None and old is not None
                    and now - old.last_seen < self.server_session_timeout):
                raise ProtocolError("2022 UDP packet: a third server session while the old one is live")
            peer = _Peer(server_id, aead, now)
            if not peer.window.check_and_update(packet_id, PACKET_ID_LIMIT):  # pragma: no cover
                raise ReplayError("2022 UDP packet: packet id replayed")
            self._old, self._current = self._current, peer
        elif not peer.window.check_and_update(packet_id, PACKET_ID_LIMIT):
            raise ReplayError("2022 UDP packet: packet id replayed or too old")
        peer.last_seen = now
        return address, payload


class _ServerSession:
    __slots__ = ("client", "server_id", "server_aead", "next_packet_id")

    def __init__(self, client: _Peer, server_id: bytes, server_aead: Any) -> None:
        self.client = client
        self.server_id = server_id
        self.server_aead = server_aead
        self.next_packet_id = 0


class Udp2022Server:
    """The server side: opens client packets into ClientPacket (routing is by session id, not by
    source address: the I/O layer keeps each session's last client address), seals replies.

    Sessions idle for `session_timeout` seconds (at least 60, SIP022) are forgotten; at most
    `max_sessions` are kept, and a new session beyond that is refused (ProtocolError) until one
    expires."""

    __slots__ = ("cipher", "session_timeout", "max_sessions", "_sessions")

    def __init__(self, cipher: Cipher, *, session_timeout: float = SESSION_TIMEOUT,
                 max_sessions: int = 4096) -> None:
        _require_2022_aes(cipher)
        if not session_timeout >= SESSION_TIMEOUT:
            raise ConfigError(f"session_timeout must be at least {SESSION_TIMEOUT:g} s (SIP022)")
        if not isinstance(max_sessions, int) or max_sessions < 1:
            raise ConfigError("max_sessions must be a positive int")
        self.cipher = cipher
        self.session_timeout = session_timeout
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[bytes, _ServerSession] = OrderedDict()  # oldest activity first

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def expire(self, now: float) -> int:
        """Forget sessions idle for session_timeout; returns how many went."""
        dropped = 0
        sessions = self._sessions
        while sessions:
            sid, session = next(iter(sessions.items()))
            if now - session.client.last_seen < self.session_timeout:
                break
            del sessions[sid]
            dropped += 1
        return dropped

    def open(self, packet: bytes, now: float) -> ClientPacket:
        """The content of a client packet. Raises ProtocolError (or AuthenticationError /
        ReplayError) for anything that is not a fresh, authentic client packet, and nothing else."""
        unix_timestamp(now)
        self.expire(now)
        packet = bytes(packet)
        header, client_id, packet_id = _open_header(self.cipher, packet, CLIENT_HEADER_LEN + 1)
        session = self._sessions.get(client_id)
        aead = session.client.aead if session is not None else self.cipher.session_aead(client_id)
        body = _open_body(aead, header, packet)
        kind, timestamp, padding = _CLIENT_HEADER.unpack_from(body)
        if kind != TYPE_CLIENT:
            raise ProtocolError(f"2022 UDP packet: type {kind}, expected {TYPE_CLIENT}")
        check_timestamp(timestamp, now, "2022 UDP packet")
        target, payload = _padding_and_address(body, CLIENT_HEADER_LEN, padding)
        if session is None:
            if len(self._sessions) >= self.max_sessions:
                raise ProtocolError("2022 UDP: too many sessions")
            server_id = os.urandom(SESSION_ID_LEN)
            while server_id == client_id:  # SIP022: never reuse the client's id
                server_id = os.urandom(SESSION_ID_LEN)  # pragma: no cover
            session = _ServerSession(_Peer(client_id, aead, now), server_id,
                                     self.cipher.session_aead(server_id))
            session.client.window.check_and_update(packet_id, PACKET_ID_LIMIT)
            self._sessions[client_id] = session
        elif not session.client.window.check_and_update(packet_id, PACKET_ID_LIMIT):
            raise ReplayError("2022 UDP packet: packet id replayed or too old")
        session.client.last_seen = now
        self._sessions.move_to_end(client_id)
        return ClientPacket(client_id, packet_id, target, payload)

    def server_session_id(self, session_id: bytes) -> bytes:
        return self._session(session_id).server_id

    def _session(self, session_id: bytes) -> _ServerSession:
        session = self._sessions.get(bytes(session_id))
        if session is None:
            raise UsageError("no such 2022 UDP session (expired, or never opened)")
        return session

    def overhead(self, source: Any, padding: int = 0) -> int:
        """Bytes a reply from `source` adds to its payload."""
        return (SEPARATE_HEADER_LEN + self.cipher.method.tag_len + SERVER_HEADER_LEN + padding
                + address_length(source))

    def seal(self, session_id: bytes, source: Any, payload: bytes, now: float, *,
             padding: int | None = None) -> bytes:
        """A server packet for client session `session_id` carrying `payload` from `source`."""
        timestamp = unix_timestamp(now)
        session = self._session(session_id)
        pad = _padding_length(padding, payload)
        address = encode_address(source)
        packet_id = session.next_packet_id
        if packet_id >= PACKET_ID_LIMIT:
            raise UsageError("2022 UDP server session exhausted its packet ids")  # pragma: no cover
        session.next_packet_id = packet_id + 1
        header = _SEPARATE_HEADER.pack(session.server_id, packet_id)
        body = (_SERVER_HEADER.pack(TYPE_SERVER, timestamp, session.client.session_id, pad)
                + bytes(pad) + address + payload)
        return _seal(self.cipher, session.server_aead, header, body)
