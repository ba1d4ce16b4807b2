"""The wireguard-go configuration protocol (UAPI): both sides of it, in one place.

Server side (the daemon), sans-IO: bytes in, replies out. Client side (`wgpy up`, `wgpy show`,
`wgpy set`, what `wg` does): `get_status`, `set_config`, `list_interfaces`, blocking calls on
the socket (the only I/O in this module; importing it opens nothing and loads no trio). Both
read values with tunnel/grammar.py, so a reply is parsed with the grammar a request is.

`wg` speaks it on the UNIX socket /var/run/wireguard/IFNAME.sock. A connection carries requests
one after another; each is an operation line followed by `key=value` lines and an empty line:

    get=1\\n\\n                 -> private_key=..., listen_port=..., peers ..., errno=0\\n\\n
    set=1\\nkey=value\\n...\\n\\n  -> errno=0\\n\\n  or  errno=-22\\n\\n

    reader = RequestReader()                    # one per connection
    for request in reader.feed(data):           # raises UapiError on a framing violation
        reply = handle(request, device, iface)  # "...errno=0\\n\\n" or "errno=-N\\n\\n"

`handle` is `format_get`, or `parse_set` (validates the whole request, changes nothing) then
`apply_set` (listen port and fwmark first, the only steps that can fail; then the rest, which
cannot). A set request is therefore all or nothing, which wireguard-go's is not (it applies each
line as it reads it and stops at the first bad one).

Errnos (positive in `UapiError.errno`, negative on the wire, as wireguard-go):
    EINVAL      a bad key or value, a device key after a peer section, too many peers,
                junk after `get=1`
    EPROTO      framing: a line without '=', an unknown operation, a line longer than
                MAX_LINE_BYTES, a set request over MAX_REQUEST_BYTES or MAX_REQUEST_LINES
    errno of the OSError from InterfaceSettings (EADDRINUSE when it has none); wireguard-go
                reports every bind or fwmark failure as EADDRINUSE

Deliberate differences from wireguard-go (device/uapi.go):
- all or nothing, as above; a set request cut off before its empty line is never applied
  (wireguard-go applies what it read when the connection ends);
- `update_only=true` on a peer that does not exist skips its whole section; wireguard-go creates
  the peer, applies the lines before `update_only`, then deletes it, so an `allowed_ip` line
  placed before `update_only` would still have taken that prefix from another peer;
- lines are limited to 4096 bytes, not counting "\\r\\n" (wireguard-go: 64 KiB, then EIO);
- an IPv6 zone in an endpoint is limited to interface-name characters, and an IPv4-mapped
  endpoint is stored (and reported) as plain IPv4, the form transport.udp uses.
Peers are reported in the order they were added (wireguard-go: Go map order, i.e. random), and
a peer's prefixes IPv4 first, longest first (wireguard-go: the order they were added).

Error messages number the lines of a set request from 1 = the line after `set=1`.
After `apply_set` the device may want a tick at once (a persistent keepalive turned on makes
`device.next_deadline()` -inf): the caller should wake its timer loop.

No key material ever appears in an error message: hex values are never echoed.

wgpy extensions (refused by wireguard-go, which answers an unknown key with EINVAL and closes the
connection on an unknown operation, so a client learns at once that they are not there):
    peer key `wgpy_bridge=URI`   carry this peer's datagrams through a bridge (bridge/spec.py:
                                 ss://... or udp2tcp://IP:PORT, numeric hosts only, as `endpoint=`);
                                 an empty value removes it. The peer's `endpoint` is then the
                                 WireGuard endpoint as the bridge server sees it, and it no longer
                                 roams (see Peer.pinned).
    peer key `wgpy_via=HEX`      reach this peer through another peer of the interface (multihop,
                                 bridge/multihop.py): its datagrams travel inside the tunnel of the
                                 peer with that public key (64 hex characters, not the peer itself);
                                 an empty value removes it. The entry need not exist yet: the daemon
                                 resolves nesting once the whole request is applied (an unknown entry,
                                 a cycle or a chain deeper than one level leaves the peer unreachable
                                 and says so in `get=wgpy`, it is not an error of the request).
                                 Without it, a peer whose endpoint lies in another peer's allowed ips
                                 (/0 ignored) is nested in that peer all the same.
    peer key `wgpy_obfuscation=lwo`  send this peer's datagrams on the UDP port as LWO (Mullvad's
                                 lightweight WireGuard obfuscation, bridge/lwo.py), and accept LWO on
                                 the port while any peer has it; once the peer has sent, in the form
                                 of its latest authenticated datagram (a plain one is answered
                                 plainly); an empty value makes it plain again.
                                 A bridge or nesting of the same peer takes precedence.
    peer key `wgpy_fallback=WAY,...`  the ways this peer can be reached, in order (bridge/fallback.py):
                                 `direct`, `lwo`, or a bridge URI as for `wgpy_bridge`; the daemon
                                 uses the first, moves to the next when handshakes go unanswered and
                                 tries the earlier ones again later. It then sets the bridge and
                                 obfuscation itself; an empty value turns it off (the peer keeps the
                                 way in use).
    operation `get=wgpy`         `get=1`'s reply plus, per peer, `InterfaceSettings.extension_lines`:
                                 the bridge, its counters and the Unix time of its last accepted
                                 reply (`wgpy_bridge=`, ..., `wgpy_bridge_last_reply=`, 0: none),
                                 `wgpy_via=HEX`
                                 (the peer's explicit via) and `wgpy_entry=HEX` (the peer it is
                                 reached through now, by wgpy_via or detected; absent when direct),
                                 `wgpy_obfuscation=lwo` for an LWO peer.
                                 `get=1` stays exactly wireguard-go's format, so `wg` and other UAPI
                                 clients never see an extension.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Callable, Protocol, Union

from bridge.fallback import parse_ways
from bridge.spec import BridgeError, BridgeSpec, parse_bridge
from transport.address import format_address

from .grammar import (
    BadValue,
    format_ip,
    format_prefix,
    hex_key,
    show,
    uapi_endpoint,
    uapi_name,
    uapi_prefix,
    uint,
)
from .noise import crypto
from .noise.allowedips import Network

__all__ = [
    "AllowedIP",
    "ControlError",
    "InterfaceSettings",
    "InterfaceStatus",
    "MAX_LINE_BYTES",
    "MAX_PEERS",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_LINES",
    "PeerSection",
    "PeerStatus",
    "Remove",
    "ReplaceAllowedIPs",
    "ReplacePeers",
    "Request",
    "RequestReader",
    "SetBridge",
    "SetEndpoint",
    "SetKeepalive",
    "SetPresharedKey",
    "SetPrivateKey",
    "SetTransaction",
    "SetObfuscation",
    "SetFallback",
    "SetVia",
    "UapiError",
    "apply_set",
    "format_get",
    "get_status",
    "handle",
    "list_interfaces",
    "parse_get_reply",
    "parse_set",
    "set_config",
    "socket_path",
]

MAX_LINE_BYTES = 4096  # one line, without its '\n'; `wg` never sends more than ~100
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # one set request (~50k peers as `wg setconf` writes them)
MAX_REQUEST_LINES = 262_144
MAX_PEERS = 1 << 16  # wireguard-go device.MaxPeers

EINVAL = _errno.EINVAL
EPROTO = _errno.EPROTO
EADDRINUSE = _errno.EADDRINUSE


class UapiError(Exception):
    """A request that is refused. `errno` is positive (the reply carries `errno=-errno`);
    `message` says what is wrong and on which line, and never contains key material.

    From `RequestReader.feed`, `requests` holds the requests completed in the same data before
    the violation (usually none); a daemon may answer them before the error."""

    def __init__(self, errno: int, message: str, requests: list[Request] | None = None) -> None:
        super().__init__(errno, message)
        self.errno = errno
        self.message = message
        self.requests: list[Request] = requests if requests is not None else []

    def __str__(self) -> str:
        return f"{self.message} ({_errno.errorcode.get(self.errno, self.errno)})"


class InterfaceSettings(Protocol):
    """What the daemon owns and the protocol only asks for: the UDP port, the fwmark, and how a
    peer's datagrams leave (directly, or through a bridge)."""

    listen_port: int  # the port actually bound (0 if not bound)
    fwmark: int

    def set_listen_port(self, port: int) -> None:
        """Rebind (0: any port). May raise OSError; then nothing may have changed."""

    def set_fwmark(self, mark: int) -> None:
        """0: none. May raise OSError; then nothing may have changed."""

    def set_endpoint(self, peer, endpoint: tuple[str, int]) -> None:
        """Set `peer.endpoint` (for a bridged peer: reached through its bridge). Cannot fail."""

    def set_bridge(self, peer, bridge: BridgeSpec | None) -> None:
        """Carry the peer's datagrams through `bridge` (None: directly). Cannot fail."""

    def set_via(self, peer, entry: bytes | None) -> None:
        """Reach `peer` through the peer whose public key is `entry` (None: no explicit via, so
        directly or as detected from allowed ips). The entry may not exist yet: nesting is
        resolved after the whole set request. Cannot fail."""

    def set_obfuscation(self, peer, kind: str | None) -> None:
        """"lwo": the peer's datagrams on the UDP port are LWO; None: plain. Cannot fail."""

    def set_fallback(self, peer, ways: tuple | None) -> None:
        """Reach `peer` by the first of `ways` that works (bridge/fallback.py); None: off.
        Cannot fail."""

    def extension_lines(self, peer) -> list[str]:
        """`key=value` lines about `peer` for `get=wgpy`."""


# ("get", None) | ("get-wgpy", None) | ("set", [line, ...])
Request = tuple[str, Union[list[str], None]]


# ---------------------------------------------------------------------------- framing

_OP, _GET_END, _SET = range(3)
_GET_OPS = {b"get=1": "get", b"get=wgpy": "get-wgpy"}


class RequestReader:
    """Splits one connection's bytes into requests. After a UapiError the connection is
    unusable: answer `errno=-N` and close it (wireguard-go closes on an unknown operation);
    further calls raise the same error again.

    Set lines are decoded as Latin-1 (byte for byte, so nothing is lost and every bad byte is
    reported by `parse_set` as an invalid key or value) with one trailing '\\r' dropped, as
    wireguard-go's line scanner does."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _OP
        self._lines: list[str] = []
        self._size = 0
        self._failed: UapiError | None = None
        self._get = "get"

    def feed(self, data: bytes) -> list[Request]:
        if self._failed is not None:
            raise UapiError(self._failed.errno, f"connection already failed: {self._failed.message}")
        out: list[Request] = []
        buf = self._buf
        buf += data
        start = 0
        try:
            while True:
                if self._state == _GET_END:
                    # wireguard-go reads exactly one more byte and wants it to be '\n'.
                    if start >= len(buf):
                        break
                    if buf[start] != 0x0A:
                        raise UapiError(EINVAL, "get must be followed by an empty line")
                    start += 1
                    self._state = _OP
                    out.append((self._get, None))
                    continue
                nl = buf.find(b"\n", start)
                if nl < 0:
                    # Room for a '\r' that may precede the '\n' still to come.
                    if len(buf) - start > MAX_LINE_BYTES + 1:
                        raise UapiError(EPROTO, f"line longer than {MAX_LINE_BYTES} bytes")
                    break
                if nl - start - (nl > start and buf[nl - 1] == 0x0D) > MAX_LINE_BYTES:
                    raise UapiError(EPROTO, f"line longer than {MAX_LINE_BYTES} bytes")
                line = bytes(buf[start:nl])
                start = nl + 1
                self._line(line, out)
        except UapiError as e:
            e.requests = out
            self._failed = e
            buf.clear()
            self._lines = []
            raise
        del buf[:start]
        return out

    def _line(self, line: bytes, out: list[Request]) -> None:
        if self._state == _OP:
            if line in _GET_OPS:
                self._state = _GET_END
                self._get = _GET_OPS[line]
            elif line == b"set=1":
                self._state = _SET
                self._lines = []
                self._size = 0
            else:
                # Never echo the line: a client out of step may be sending a key.
                op = uapi_name(line.partition(b"=")[0].decode("latin-1"))
                raise UapiError(EPROTO, f"unknown operation {op} (expected get=1 or set=1)")
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            out.append(("set", self._lines))
            self._lines = []
            self._state = _OP
            return
        self._size += len(line) + 1
        if self._size > MAX_REQUEST_BYTES:
            raise UapiError(EPROTO, f"set request larger than {MAX_REQUEST_BYTES} bytes")
        if len(self._lines) >= MAX_REQUEST_LINES:
            raise UapiError(EPROTO, f"set request longer than {MAX_REQUEST_LINES} lines")
        self._lines.append(line.decode("latin-1"))


# ---------------------------------------------------------------------------- get


def _fmt_endpoint(endpoint: object) -> str | None:
    """`ip:port` / `[ip6]:port` for an (ip, port, ...) tuple; None for anything else (a `wg`
    that cannot parse an endpoint fails the whole `wg show`, so such endpoints are left out)."""
    try:
        host, port = endpoint[0], endpoint[1]  # type: ignore[index]
        if not isinstance(host, str) or not isinstance(port, int) or not 0 <= port <= 65535:
            return None
        addr = ipaddress.ip_address(host)
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return format_address((format_ip(addr), port))


def _handshake_time(wall: float | None) -> tuple[int, int]:
    if wall is None or not math.isfinite(wall) or wall <= 0:
        return 0, 0
    sec = int(wall)
    nsec = min(max(int((wall - sec) * 1e9), 0), 999_999_999)
    return sec, nsec


def format_get(device, iface: InterfaceSettings, *, extensions: bool = False) -> str:
    """The whole reply to `get=1`, as wireguard-go's IpcGetOperation writes it; with `extensions`
    (`get=wgpy`), each peer's `iface.extension_lines` too."""
    out: list[str] = []
    if device.identity is not None:
        out.append(f"private_key={device.identity.private.hex()}")
    if iface.listen_port:
        out.append(f"listen_port={iface.listen_port}")
    if iface.fwmark:
        out.append(f"fwmark={iface.fwmark}")
    for peer in device.peers.values():
        out.append(f"public_key={peer.public_key.hex()}")
        out.append(f"preshared_key={peer.preshared_key.hex()}")  # zeros when none, as wireguard-go
        out.append("protocol_version=1")
        if peer.endpoint is not None:
            ep = _fmt_endpoint(peer.endpoint)
            if ep is not None:
                out.append(f"endpoint={ep}")
        sec, nsec = _handshake_time(peer.last_handshake_wall)
        out.append(f"last_handshake_time_sec={sec}")
        out.append(f"last_handshake_time_nsec={nsec}")
        out.append(f"tx_bytes={peer.tx_bytes}")
        out.append(f"rx_bytes={peer.rx_bytes}")
        out.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        for net in device.allowed_ips.prefixes_of(peer):
            out.append(f"allowed_ip={format_prefix(net)}")
        if extensions:
            out.extend(iface.extension_lines(peer))
    out.append("errno=0")
    return "\n".join(out) + "\n\n"


# ---------------------------------------------------------------------------- set: the plan


@dataclass(frozen=True)
class SetPrivateKey:
    key: bytes | None  # clamped; None removes it


@dataclass(frozen=True)
class ReplacePeers:
    pass


@dataclass(frozen=True)
class SetPresharedKey:
    key: bytes | None  # None: no preshared key (all zeros)


@dataclass(frozen=True)
class SetEndpoint:
    endpoint: tuple[str, int]


@dataclass(frozen=True)
class SetBridge:
    bridge: BridgeSpec | None  # None: no bridge


@dataclass(frozen=True)
class SetVia:
    entry: bytes | None  # the entry peer's public key; None: no explicit via


@dataclass(frozen=True)
class SetObfuscation:
    kind: str | None  # "lwo"; None: plain WireGuard


@dataclass(frozen=True)
class SetFallback:
    ways: tuple | None  # bridge.fallback.Way values, in order; None: off


@dataclass(frozen=True)
class SetKeepalive:
    seconds: int


@dataclass(frozen=True)
class ReplaceAllowedIPs:
    pass


@dataclass(frozen=True)
class AllowedIP:
    network: Network
    remove: bool = False


@dataclass(frozen=True)
class Remove:
    pass


PeerOp = Union[SetPresharedKey, SetEndpoint, SetBridge, SetVia, SetObfuscation, SetFallback, SetKeepalive,
               ReplaceAllowedIPs, AllowedIP, Remove]
DeviceOp = Union[SetPrivateKey, ReplacePeers]


@dataclass(frozen=True)
class PeerSection:
    """One `public_key=` line and the lines after it, in order. `Remove` is always last: lines
    after `remove=true` are validated and then ignored, as wireguard-go ignores them."""

    public_key: bytes
    line: int
    update_only: bool
    ops: tuple[PeerOp, ...]

    @property
    def removes(self) -> bool:
        return bool(self.ops) and isinstance(self.ops[-1], Remove)


@dataclass(frozen=True)
class SetTransaction:
    """A validated set request; `apply_set` carries it out. `listen_port`/`fwmark` are the last
    value given (None: not given)."""

    listen_port: int | None
    fwmark: int | None
    device_ops: tuple[DeviceOp, ...]
    peers: tuple[PeerSection, ...]


# ---------------------------------------------------------------------------- set: parsing

_DEVICE_KEYS = frozenset({"private_key", "listen_port", "fwmark", "replace_peers"})
_PEER_KEYS = frozenset({
    "update_only", "remove", "preshared_key", "endpoint", "persistent_keepalive_interval",
    "replace_allowed_ips", "allowed_ip", "protocol_version", "wgpy_bridge", "wgpy_via", "wgpy_obfuscation",
    "wgpy_fallback",
})

# The value grammars (keys, numbers, prefixes, endpoints) are tunnel/grammar.py's, shared with
# configuration files; the ones below are only the UAPI's.


def _true(value: str) -> None:
    if value != "true":
        raise BadValue(f"{show(value)} is not 'true' (the only accepted value)")


def _bridge(value: str) -> BridgeSpec | None:
    if not value:
        return None
    try:
        return parse_bridge(value, numeric=True)
    except BridgeError as e:  # never quotes the value: an ss:// URI holds a password
        raise BadValue(str(e)) from None


def _fallback(value: str) -> tuple | None:
    if not value:
        return None
    try:
        return parse_ways(value, numeric=True)
    except BridgeError as e:  # never quotes the value
        raise BadValue(str(e)) from None


def _via(value: str, peer: bytes) -> bytes | None:
    if not value:
        return None
    entry = hex_key(value)
    if entry == peer:
        raise BadValue("a peer cannot be reached via itself")
    return entry


def _obfuscation(value: str) -> str | None:
    if not value:
        return None
    if value != "lwo":
        raise BadValue(f"{show(value)} is not an obfuscation wgpy knows (lwo, or empty for none)")
    return value


def _allowed_ip(value: str) -> AllowedIP:
    """`[-]addr/bits`: a '-' removes the prefix (wgpy and wireguard-go's `wg set ... -addr`)."""
    remove = value.startswith("-")
    return AllowedIP(uapi_prefix(value[1:] if remove else value), remove)


def parse_set(lines: list[str]) -> SetTransaction:
    """Validate a whole set request (the lines between `set=1` and the empty line, numbered
    from 1). Changes nothing; raises UapiError at the first bad line."""
    listen_port: int | None = None
    fwmark: int | None = None
    device_ops: list[DeviceOp] = []
    peers: list[PeerSection] = []
    section: tuple[bytes, int] | None = None
    update_only = False
    ops: list[PeerOp] = []
    removed = False

    def close_section() -> None:
        if section is not None:
            peers.append(PeerSection(section[0], section[1], update_only, tuple(ops)))

    for n, line in enumerate(lines, 1):
        key, eq, value = line.partition("=")
        if not eq:
            raise UapiError(EPROTO, f"line {n}: no '=' in line")
        try:
            if key == "public_key":
                close_section()
                section = (hex_key(value), n)
                update_only, ops, removed = False, [], False
            elif section is None:
                if key == "private_key":
                    k = hex_key(value)
                    device_ops.append(SetPrivateKey(crypto.clamp(k) if any(k) else None))
                elif key == "listen_port":
                    listen_port = uint(value, 65535)
                elif key == "fwmark":
                    fwmark = uint(value, 0xFFFFFFFF)
                elif key == "replace_peers":
                    _true(value)
                    device_ops.append(ReplacePeers())
                elif key in _PEER_KEYS:
                    raise BadValue("a peer key needs a public_key line before it")
                else:
                    raise BadValue("invalid UAPI device key")
            else:
                op: PeerOp | None = None
                if key == "update_only":
                    _true(value)
                    update_only = True
                elif key == "remove":
                    _true(value)
                    op = Remove()
                elif key == "preshared_key":
                    k = hex_key(value)
                    op = SetPresharedKey(k if any(k) else None)
                elif key == "endpoint":
                    op = SetEndpoint(uapi_endpoint(value))
                elif key == "persistent_keepalive_interval":
                    op = SetKeepalive(uint(value, 65535))
                elif key == "wgpy_bridge":
                    op = SetBridge(_bridge(value))
                elif key == "wgpy_via":
                    op = SetVia(_via(value, section[0]))
                elif key == "wgpy_obfuscation":
                    op = SetObfuscation(_obfuscation(value))
                elif key == "wgpy_fallback":
                    op = SetFallback(_fallback(value))
                elif key == "replace_allowed_ips":
                    _true(value)
                    op = ReplaceAllowedIPs()
                elif key == "allowed_ip":
                    op = _allowed_ip(value)
                elif key == "protocol_version":
                    if value != "1":
                        raise BadValue(f"{show(value)}: only protocol version 1 exists")
                elif key in _DEVICE_KEYS:
                    raise BadValue("a device key cannot follow a peer section")
                else:
                    raise BadValue("invalid UAPI peer key")
                if op is not None and not removed:
                    ops.append(op)
                    removed = isinstance(op, Remove)
        except BadValue as e:
            raise UapiError(EINVAL, f"line {n}: {uapi_name(key)}: {e}") from None
    close_section()
    return SetTransaction(listen_port, fwmark, tuple(device_ops), tuple(peers))


# ---------------------------------------------------------------------------- set: applying


def _check_peer_limit(tx: SetTransaction, device) -> None:
    """Refuse (EINVAL, as wireguard-go's NewPeer) a request that would exceed MAX_PEERS at
    any point, simulating the request against the device's current peers."""
    if len(device.peers) + sum(1 for s in tx.peers if not s.update_only) <= MAX_PEERS:
        return
    keys = set(device.peers)
    private = device.identity.private if device.identity is not None else None
    for op in tx.device_ops:
        if isinstance(op, ReplacePeers):
            keys.clear()
        elif op.key is None:
            private = None
        elif private is None or not crypto.constant_time_eq(op.key, private):
            private = op.key
            keys.discard(crypto.public_key(private))
    own = crypto.public_key(private) if private is not None else None
    for sec in tx.peers:
        if sec.public_key == own:
            continue
        if sec.public_key not in keys:
            if sec.update_only:
                continue
            keys.add(sec.public_key)
            if len(keys) > MAX_PEERS:
                raise UapiError(EINVAL, f"line {sec.line}: too many peers (at most {MAX_PEERS})")
        if sec.removes:
            keys.discard(sec.public_key)


def _os_error(what: str, e: OSError) -> UapiError:
    code = e.errno if isinstance(e.errno, int) and e.errno > 0 else EADDRINUSE
    return UapiError(code, f"{what}: {e.strerror or e}")


def apply_set(tx: SetTransaction, device, iface: InterfaceSettings) -> None:
    """Carry out a validated request. The listen port, then the fwmark, are set first; if
    either raises OSError, UapiError (with its errno) is raised and nothing else has changed
    (a port already rebound is put back, best effort). Everything after cannot fail."""
    _check_peer_limit(tx, device)
    old_port = iface.listen_port
    if tx.listen_port is not None:
        try:
            iface.set_listen_port(tx.listen_port)
        except OSError as e:
            raise _os_error("listen_port", e) from e
    if tx.fwmark is not None:
        try:
            iface.set_fwmark(tx.fwmark)
        except OSError as e:
            if tx.listen_port is not None:
                try:
                    iface.set_listen_port(old_port)
                except OSError:
                    pass
            raise _os_error("fwmark", e) from e

    for dop in tx.device_ops:
        if isinstance(dop, ReplacePeers):
            for pk in list(device.peers):
                device.remove_peer(pk)
        else:
            device.set_private_key(dop.key)

    for sec in tx.peers:
        pk = sec.public_key
        own = device.public_key
        if own is not None and crypto.constant_time_eq(pk, own):
            continue  # wireguard-go ignores a peer with our own public key, silently
        peer = device.peers.get(pk)
        if peer is None:
            if sec.update_only:
                continue
            peer = device.add_peer(pk)
        for op in sec.ops:
            if isinstance(op, AllowedIP):
                if op.remove:
                    device.remove_allowed_ip(peer, op.network)
                else:
                    device.add_allowed_ip(peer, op.network)
            elif isinstance(op, SetEndpoint):
                iface.set_endpoint(peer, op.endpoint)
            elif isinstance(op, SetBridge):
                iface.set_bridge(peer, op.bridge)
            elif isinstance(op, SetVia):
                iface.set_via(peer, op.entry)
            elif isinstance(op, SetObfuscation):
                iface.set_obfuscation(peer, op.kind)
            elif isinstance(op, SetFallback):
                iface.set_fallback(peer, op.ways)
            elif isinstance(op, SetPresharedKey):
                device.set_preshared_key(peer, op.key)
            elif isinstance(op, SetKeepalive):
                device.set_persistent_keepalive(peer, op.seconds)
            elif isinstance(op, ReplaceAllowedIPs):
                device.clear_allowed_ips(peer)
            elif isinstance(op, Remove):
                device.remove_peer(pk)


def handle(
    request: Request,
    device,
    iface: InterfaceSettings,
    *,
    on_error: Callable[[UapiError], None] | None = None,
) -> str:
    """Answer one request: the whole reply text. A refused request is reported to `on_error`
    (for the daemon's log) and answered `errno=-N`."""
    kind, body = request
    try:
        if kind == "get":
            return format_get(device, iface)
        if kind == "get-wgpy":
            return format_get(device, iface, extensions=True)
        if kind == "set" and body is not None:
            apply_set(parse_set(body), device, iface)
            return "errno=0\n\n"
        raise UapiError(EPROTO, f"unknown request kind {kind!r}")
    except UapiError as e:
        if on_error is not None:
            on_error(e)
        return f"errno={-e.errno}\n\n"


# ---------------------------------------------------------------------------- client


SOCKET_DIR = "/var/run/wireguard"
CLIENT_TIMEOUT = 5.0  # seconds for a daemon to answer one request
MAX_REPLY_BYTES = 64 * 1024 * 1024  # a get reply: ~100 bytes per allowed IP, 65536 peers
U64_MAX = (1 << 64) - 1
_ERRNO_VALUE = re.compile(r"-?[0-9]{1,9}")


class ControlError(Exception):
    """An interface whose daemon cannot be reached, refuses a request, or answers something
    that is not a UAPI reply. The message starts with the interface name."""


def socket_path(ifname: str, socket_dir: str = SOCKET_DIR) -> str:
    return os.path.join(socket_dir, f"{ifname}.sock")


def list_interfaces(socket_dir: str = SOCKET_DIR) -> list[str]:
    """The interfaces with a UAPI socket (wgpy-daemon's or wireguard-go's), sorted."""
    try:
        names = os.listdir(socket_dir)
    except FileNotFoundError:
        return []
    return sorted(n[: -len(".sock")] for n in names if n.endswith(".sock"))


def _request(ifname: str, body: str, socket_dir: str = SOCKET_DIR, timeout: float = CLIENT_TIMEOUT) -> str:
    """Send one request, as `wg` does (blocking, one connection each); the reply without its
    `errno=0` line. Raises ControlError."""
    path = socket_path(ifname, socket_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    data = bytearray()
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"{ifname}: no such WireGuard interface ({path} missing)") from None
        except OSError as exc:
            raise ControlError(f"{ifname}: cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            sock.sendall(body.encode("latin-1"))
            while not data.endswith(b"\n\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_REPLY_BYTES:
                    raise ControlError(f"{ifname}: the daemon's reply is longer than {MAX_REPLY_BYTES} bytes")
        except socket.timeout:
            raise ControlError(f"{ifname}: the daemon did not answer in {timeout:.0f} s") from None
        except OSError as exc:  # a daemon that closes the connection (wireguard-go on get=wgpy)
            raise ControlError(f"{ifname}: the connection to the daemon failed: {exc.strerror or exc}") from None
    finally:
        sock.close()
    lines = data.decode("utf-8", "replace").rstrip("\n").split("\n")
    last = lines[-1]
    code = last[len("errno="):]
    if not last.startswith("errno=") or not _ERRNO_VALUE.fullmatch(code):
        raise ControlError(f"{ifname}: malformed reply from the daemon")
    if int(code):
        raise ControlError(f"{ifname}: the daemon refused the request: {os.strerror(abs(int(code)))}")
    return "\n".join(lines[:-1])


def set_config(ifname: str, lines: list[str], socket_dir: str = SOCKET_DIR) -> None:
    """A `set=1` request of `lines` (as uapi_set_lines in tunnel/config.py writes them)."""
    _request(ifname, "set=1\n" + "".join(line + "\n" for line in lines) + "\n", socket_dir)


@dataclass
class PeerStatus:
    """A peer as a `get` reply describes it. The preshared key is left out of repr()."""

    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: tuple[str, int] | None = None  # numeric, canonical (as uapi_endpoint reads it)
    allowed_ips: list[Network] = field(default_factory=list)
    latest_handshake: int = 0  # Unix seconds, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0
    # wgpy-daemon only (`get=wgpy`): the bridge, without its password, and its counters.
    bridge: str | None = None
    bridge_connected: bool = False
    bridge_tx_packets: int = 0
    bridge_rx_packets: int = 0
    bridge_dropped: int = 0
    # Unix seconds of the last reply the bridge accepted (authenticated, for Shadowsocks);
    # 0: none yet (a wrong password, a server that does not answer).
    bridge_last_reply: int = 0
    # wgpy-daemon only: the explicit via (`wgpy_via`) and the peer this one is reached through
    # now (`wgpy_entry`: by via or detected from allowed ips; None when reached directly).
    via: bytes | None = None
    entry: bytes | None = None
    obfuscation: str | None = None  # wgpy-daemon only: "lwo" (`wgpy_obfuscation`), None: plain
    # wgpy-daemon only: the ways to reach the peer (`wgpy_fallback`, bridges without passwords)
    # and the index of the one in use.
    fallback: list[str] = field(default_factory=list)
    fallback_in_use: int = 0


@dataclass
class InterfaceStatus:
    """An interface as a `get` reply describes it. The private key is left out of repr()."""

    name: str
    private_key: bytes | None = field(default=None, repr=False)
    public_key: bytes | None = None  # derived from the private key
    listen_port: int = 0
    fwmark: int = 0
    peers: list[PeerStatus] = field(default_factory=list)


_PEER_COUNTERS = {
    "last_handshake_time_sec": ("latest_handshake", U64_MAX),
    "rx_bytes": ("rx_bytes", U64_MAX),
    "tx_bytes": ("tx_bytes", U64_MAX),
    "persistent_keepalive_interval": ("persistent_keepalive", 65535),
    "wgpy_bridge_tx_packets": ("bridge_tx_packets", U64_MAX),
    "wgpy_bridge_rx_packets": ("bridge_rx_packets", U64_MAX),
    "wgpy_bridge_dropped": ("bridge_dropped", U64_MAX),
    "wgpy_bridge_last_reply": ("bridge_last_reply", U64_MAX),
}


def parse_get_reply(ifname: str, text: str) -> InterfaceStatus:
    """The reply to `get=1` or `get=wgpy` (without its errno line), as format_get writes it and
    wireguard-go does, read with the grammar `set` lines have. Keys this version does not know
    are skipped (a newer daemon may add some). Raises ControlError."""
    status = InterfaceStatus(ifname)
    peer: PeerStatus | None = None
    for n, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        key, eq, value = line.partition("=")
        try:
            if not eq:
                raise BadValue("no '=' in line")
            if key == "private_key":
                status.private_key = hex_key(value)
                status.public_key = crypto.public_key(status.private_key)
            elif key == "listen_port":
                status.listen_port = uint(value, 65535)
            elif key == "fwmark":
                status.fwmark = uint(value, 0xFFFFFFFF)
            elif key == "public_key":
                peer = PeerStatus(hex_key(value))
                status.peers.append(peer)
            elif peer is None:
                continue
            elif key == "preshared_key":
                psk = hex_key(value)
                peer.preshared_key = psk if any(psk) else None
            elif key == "endpoint":
                peer.endpoint = uapi_endpoint(value)
            elif key == "allowed_ip":
                peer.allowed_ips.append(uapi_prefix(value))
            elif key in _PEER_COUNTERS:
                attr, maximum = _PEER_COUNTERS[key]
                setattr(peer, attr, uint(value, maximum))
            elif key == "wgpy_bridge":
                peer.bridge = value
            elif key == "wgpy_bridge_connected":
                peer.bridge_connected = value == "1"
            elif key == "wgpy_via":
                peer.via = hex_key(value) if value else None
            elif key == "wgpy_entry":
                peer.entry = hex_key(value) if value else None
            elif key == "wgpy_obfuscation":
                peer.obfuscation = value or None
            elif key == "wgpy_fallback":
                peer.fallback = value.split(",") if value else []
            elif key == "wgpy_fallback_in_use":
                peer.fallback_in_use = uint(value, 64)
        except BadValue as exc:
            raise ControlError(f"{ifname}: malformed reply from the daemon, line {n}: {uapi_name(key)}: {exc}") from None
    return status


def get_status(ifname: str, socket_dir: str = SOCKET_DIR) -> InterfaceStatus:
    """The interface's keys, port, fwmark and peers; with wgpy-daemon also each peer's bridge
    (`get=wgpy`; anything else, e.g. wireguard-go, closes the connection on it, so `get=1`
    follows)."""
    try:
        text = _request(ifname, "get=wgpy\n\n", socket_dir)
    except ControlError:
        text = _request(ifname, "get=1\n\n", socket_dir)
    return parse_get_reply(ifname, text)
