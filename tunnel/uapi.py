"""The wireguard-go configuration protocol (UAPI), sans-IO: bytes in, replies out.

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
  endpoint is stored (and reported) as plain IPv4, the form tunnel.udp uses.
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
                                 roams (see Peer.roaming).
    operation `get=wgpy`         `get=1`'s reply plus, per peer, `InterfaceSettings.extension_lines`
                                 (the bridge, its counters). `get=1` stays exactly wireguard-go's
                                 format, so `wg` and other UAPI clients never see an extension.
"""

from __future__ import annotations

import errno as _errno
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Callable, Protocol, Union

from bridge.spec import BridgeError, BridgeSpec, parse_bridge

from .noise import crypto
from .noise.allowedips import Network

__all__ = [
    "AllowedIP",
    "InterfaceSettings",
    "MAX_LINE_BYTES",
    "MAX_PEERS",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_LINES",
    "PeerSection",
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
    "UapiError",
    "apply_set",
    "format_get",
    "handle",
    "parse_set",
]

MAX_LINE_BYTES = 4096  # one line, without its '\n'; `wg` never sends more than ~100
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # one set request (~50k peers as `wg setconf` writes them)
MAX_REQUEST_LINES = 262_144
MAX_PEERS = 1 << 16  # wireguard-go device.MaxPeers

KEY_HEX_LEN = 64

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
                op = _name(line.partition(b"=")[0].decode("latin-1"))
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


def _fmt_ip(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """As Go's netip.Addr.String: RFC 5952, and an IPv4-mapped address as ::ffff:a.b.c.d."""
    if addr.version == 4:
        return str(addr)
    scope = addr.scope_id
    mapped = addr.ipv4_mapped
    text = f"::ffff:{mapped}" if mapped is not None else str(ipaddress.IPv6Address(int(addr)))
    return f"{text}%{scope}" if scope else text


def _fmt_prefix(net: Network) -> str:
    return f"{_fmt_ip(net.network_address)}/{net.prefixlen}"


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
    if addr.version == 4:
        return f"{addr}:{port}"
    return f"[{_fmt_ip(addr)}]:{port}"


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
            out.append(f"allowed_ip={_fmt_prefix(net)}")
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


PeerOp = Union[SetPresharedKey, SetEndpoint, SetBridge, SetKeepalive, ReplaceAllowedIPs, AllowedIP, Remove]
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

_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_DIGITS = re.compile(r"[0-9]+")
_PREFIX_BITS = re.compile(r"0|[1-9][0-9]{0,2}")
_ADDR_CHARS = re.compile(r"[0-9a-fA-F:.]+")
_ZONE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

_DEVICE_KEYS = frozenset({"private_key", "listen_port", "fwmark", "replace_peers"})
_PEER_KEYS = frozenset({
    "update_only", "remove", "preshared_key", "endpoint", "persistent_keepalive_interval",
    "replace_allowed_ips", "allowed_ip", "protocol_version", "wgpy_bridge",
})


class _Bad(Exception):
    """A value problem; parse_set adds the line number and key."""


def _show(value: str) -> str:
    """A non-secret value for an error message: repr, cut short."""
    return repr(value if len(value) <= 64 else value[:64] + "...")


_NAME = re.compile(r"[a-z_]{1,40}")


def _name(text: str) -> str:
    """A key name for an error message; anything that could be key material is replaced by
    its length."""
    return repr(text) if _NAME.fullmatch(text) else f"<{len(text)} characters>"


def _hex_key(value: str) -> bytes:
    if not _HEX_KEY.fullmatch(value):
        raise _Bad("not 64 hex characters" if len(value) != KEY_HEX_LEN else "invalid hex")
    return bytes.fromhex(value)


def _uint(value: str, maximum: int) -> int:
    """strconv.ParseUint(value, 10, bits): ASCII digits only (leading zeros allowed)."""
    if not _DIGITS.fullmatch(value):
        raise _Bad(f"{_show(value)} is not a decimal number")
    digits = value.lstrip("0")
    if len(digits) > len(str(maximum)) or int(digits or "0") > maximum:
        raise _Bad(f"{_show(value)} is out of range 0..{maximum}")
    return int(digits or "0")


def _true(value: str) -> None:
    if value != "true":
        raise _Bad(f"{_show(value)} is not 'true' (the only accepted value)")


def _parse_addr(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr_part, pct, zone = text.partition("%")
    if not _ADDR_CHARS.fullmatch(addr_part) or (pct and not _ZONE.fullmatch(zone)):
        raise ValueError
    addr = ipaddress.ip_address(addr_part)
    if pct:
        if addr.version == 4:
            raise ValueError
        addr = ipaddress.IPv6Address(f"{addr_part}%{zone}")
    return addr


def _endpoint(value: str) -> tuple[str, int]:
    """Go's netip.ParseAddrPort: `a.b.c.d:port` or `[v6]:port` (brackets exactly for IPv6),
    numeric only. Returns (ip, port) with the address in its canonical text, in the form
    tunnel.udp gives received addresses: an IPv4-mapped IPv6 address becomes plain IPv4 (so it
    is sent from the IPv4 socket), a zone is kept."""
    host, colon, port_text = value.rpartition(":")
    if not colon:
        raise _Bad(f"{_show(value)} is not ip:port")
    if not port_text:
        raise _Bad(f"{_show(value)} has no port")
    bracketed = host.startswith("[")
    if bracketed:
        if len(host) < 2 or not host.endswith("]"):
            raise _Bad(f"{_show(value)}: unbalanced brackets")
        host = host[1:-1]
    try:
        port = _uint(port_text, 65535)
    except _Bad:
        raise _Bad(f"{_show(value)}: bad port") from None
    try:
        addr = _parse_addr(host)
    except ValueError:
        raise _Bad(f"{_show(value)}: not a numeric IP address") from None
    if bracketed and addr.version == 4:
        raise _Bad(f"{_show(value)}: square brackets are only for IPv6")
    if not bracketed and addr.version == 6:
        raise _Bad(f"{_show(value)}: an IPv6 address must be in square brackets")
    if addr.version == 6 and addr.ipv4_mapped is not None and not addr.scope_id:
        return str(addr.ipv4_mapped), port
    return _fmt_ip(addr), port


def _bridge(value: str) -> BridgeSpec | None:
    if not value:
        return None
    try:
        return parse_bridge(value, numeric=True)
    except BridgeError as e:  # never quotes the value: an ss:// URI holds a password
        raise _Bad(str(e)) from None


def _allowed_ip(value: str) -> AllowedIP:
    """`[-]addr/bits` (Go's netip.ParsePrefix: no zone, bits without sign or leading zero);
    host bits are cleared, as wireguard-go's trie does."""
    remove = value.startswith("-")
    text = value[1:] if remove else value
    addr_text, slash, bits_text = text.rpartition("/")
    if not slash:
        raise _Bad(f"{_show(value)} is not addr/bits")
    if "%" in addr_text:
        raise _Bad(f"{_show(value)}: no zone allowed in a prefix")
    try:
        addr = _parse_addr(addr_text)
    except ValueError:
        raise _Bad(f"{_show(value)}: not an IP address") from None
    if not _PREFIX_BITS.fullmatch(bits_text) or int(bits_text) > addr.max_prefixlen:
        raise _Bad(f"{_show(value)}: bad prefix length")
    return AllowedIP(ipaddress.ip_network((addr, int(bits_text)), strict=False), remove)


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
                section = (_hex_key(value), n)
                update_only, ops, removed = False, [], False
            elif section is None:
                if key == "private_key":
                    k = _hex_key(value)
                    device_ops.append(SetPrivateKey(crypto.clamp(k) if any(k) else None))
                elif key == "listen_port":
                    listen_port = _uint(value, 65535)
                elif key == "fwmark":
                    fwmark = _uint(value, 0xFFFFFFFF)
                elif key == "replace_peers":
                    _true(value)
                    device_ops.append(ReplacePeers())
                elif key in _PEER_KEYS:
                    raise _Bad("a peer key needs a public_key line before it")
                else:
                    raise _Bad("invalid UAPI device key")
            else:
                op: PeerOp | None = None
                if key == "update_only":
                    _true(value)
                    update_only = True
                elif key == "remove":
                    _true(value)
                    op = Remove()
                elif key == "preshared_key":
                    k = _hex_key(value)
                    op = SetPresharedKey(k if any(k) else None)
                elif key == "endpoint":
                    op = SetEndpoint(_endpoint(value))
                elif key == "persistent_keepalive_interval":
                    op = SetKeepalive(_uint(value, 65535))
                elif key == "wgpy_bridge":
                    op = SetBridge(_bridge(value))
                elif key == "replace_allowed_ips":
                    _true(value)
                    op = ReplaceAllowedIPs()
                elif key == "allowed_ip":
                    op = _allowed_ip(value)
                elif key == "protocol_version":
                    if value != "1":
                        raise _Bad(f"{_show(value)}: only protocol version 1 exists")
                elif key in _DEVICE_KEYS:
                    raise _Bad("a device key cannot follow a peer section")
                else:
                    raise _Bad("invalid UAPI peer key")
                if op is not None and not removed:
                    ops.append(op)
                    removed = isinstance(op, Remove)
        except _Bad as e:
            raise UapiError(EINVAL, f"line {n}: {_name(key)}: {e}") from None
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
