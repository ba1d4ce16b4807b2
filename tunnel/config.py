"""wg-quick configuration files, sans-IO: text in, a validated Config (or every error) out.

    ifname, path = interface_name_for("wg0")      # ("wg0", "/etc/wireguard/wg0.conf")
    cfg, warnings = load_config(path)             # the only function here that touches the disk
    lines = uapi_set_lines(cfg, endpoints)        # the body of a UAPI "set=1" request
    text = render_config(cfg)                     # back to a file (SaveConfig)

The format is the one wg-quick(8) reads: `[Interface]` and `[Peer]` sections of `Key = Value`
lines. wg-quick takes MTU, Table, DNS, Address, PreUp, PostUp, PreDown, PostDown and SaveConfig
out of [Interface] and hands everything else to `wg setconf` (wg(8), src/config.c). wgpy adds two
[Interface] keys, `KillSwitch` and `AllowLAN` (on/off: tunnel/killswitch.py; AllowLAN = on needs
KillSwitch = on), which `wgpy up` takes out like wg-quick's own, and two
peer keys: `Bridge`, a carrier URL that another module validates, and `Via`, the base64 public
key of another peer of the file through which this one is reached (multihop; bridge/multihop.py
holds the rules: no unknown peer, not itself, no cycle, one level at most). A Via'd peer (an
exit) may not have a Bridge: a bridge wraps only the first hop, so it belongs on the entry.
A third peer key, `Obfuscation = lwo` (any case; `off` for none), sends the peer's datagrams as
LWO (bridge/lwo.py) on the UDP port; it cannot go with Bridge or Via (they carry the peer instead).

    nest = nesting(cfg, endpoints)                # {exit key: entry key}: Via, else detected

As wg-quick and wg (checked against wireguard-tools v1.0.20210914 and its source):
- `#` starts a comment anywhere on a line, so no value can contain `#` (hook commands included);
- keys and section names are matched ignoring ASCII case; whitespace around keys and values
  (space, \\t, \\n, \\v, \\f, \\r) does not count; a CRLF file reads like an LF one;
- Address and DNS are lists split on commas and whitespace, empty items ignored (wg-quick word
  splitting); AllowedIPs is split on commas after removing all whitespace, and an empty item is
  an error (wg); all three may repeat and accumulate;
- a DNS item that is all digits and dots, or contains `:`, is a server; anything else is a
  search domain (wg-quick's test);
- AllowedIPs without `/bits` means the host (/32, /128); host bits are cleared (the kernel and
  wireguard-go do it) with a warning, as `wg` prints;
- FwMark: `off` (any case), decimal, or hex with a lowercase `0x` prefix, up to 0xffffffff;
- PersistentKeepalive: `off` (any case) or a decimal 0..65535 (leading zeros allowed);
- SaveConfig: true or false in any case (wg-quick reads it with nocasematch on);
- a peer needs a PublicKey; an empty value (`AllowedIPs =`) is an error (wg: "Line unrecognized");
- a key is 44 characters of base64 with one '=' and the unused low bits of its last character
  zero (wg's key_from_base64).

The value grammars (keys, numbers, addresses, prefixes, endpoints) live in tunnel/grammar.py,
next to the UAPI's, with the differences between the two named there.

Stricter than wg / wg-quick, each for a clear error instead of a surprise later:
- a key given twice in one section is an error, except the list keys above and the hooks
  (wg and wg-quick keep the last value); so are a second [Interface] section and two peers with
  the same PublicKey (the kernel would merge them);
- a missing PrivateKey is an error (`wg setconf` would silently remove the interface's key);
- a key with whitespace inside (`Listen Port`) or a section header with whitespace inside the
  brackets (`[ Peer ]`) is refused: wg deletes all whitespace and accepts them, but wg-quick
  would pass `[ Interface ]`'s Address etc. to wg, which refuses them;
- ports are numbers only (wg also takes service names from /etc/services, and 65536);
  an Endpoint's port must be 1..65535;
- Endpoint (transport/address.py): an IPv6 address must be in brackets and brackets are only
  for IPv6 (wg also takes `fd00::1:51820` and `[1.2.3.4]:5`); a name must look like a DNS name,
  and a name whose last label is numeric must be a dotted-quad IPv4 address (getaddrinfo would
  read `1.2.3` as 1.2.0.3);
- Address takes `addr` or `addr/bits` (`ip` also takes a dotted netmask), no `%zone`;
- MTU must be 68..65535 (the Linux minimum and the TUN maximum), and at least 1280 when an IPv6
  Address is configured: Linux turns IPv6 off on a link whose MTU is below 1280, so the
  address could not be added;
- Table must be `auto`, `off` (any case, stored lower case), a table number (decimal or 0x hex,
  up to 0xffffffff) or a table name; wg-quick compares auto/off case-sensitively and gives
  anything else to `ip route`, which fails for an unknown name only when the interface comes up;
- AllowedIPs with a `+`/`-` prefix (incremental changes, newer wg) are refused, as the
  installed wg does.

No error message contains a key (PrivateKey, PresharedKey, PublicKey) or a Bridge value (it may
hold a password); unknown keys that could be key material are shown as their length only, and a
long base64 or hex run in any other value is redacted. The dataclass reprs hide them too.

Warnings (returned by load_config): wg-quick's world-accessible file, an AllowedIP with host
bits set (as wg), the same AllowedIP on two peers (WireGuard keeps it on the last one
only), a peer with the interface's own public key (WireGuard ignores it).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Union

from bridge import multihop
from bridge.fallback import DIRECT, LWO, parse_ways
from bridge.spec import BridgeError, parse_bridge
from transport.address import format_address

from .grammar import BadValue, base64_key, config_endpoint, config_ip, config_name, config_prefix, show, uint
from .keys import encode_base64_key
from .keys import public_key as derive_public_key

__all__ = [
    "Config",
    "ConfigError",
    "InterfaceConfig",
    "MAX_CONFIG_BYTES",
    "PeerConfig",
    "interface_name_for",
    "load_config",
    "nesting",
    "parse_config",
    "render_config",
    "uapi_set_lines",
]

CONFIG_DIR = "/etc/wireguard"
MAX_CONFIG_BYTES = 16 * 1024 * 1024
MIN_MTU = 68  # Linux ETH_MIN_MTU
MAX_MTU = 65535  # TUN
MIN_MTU_IPV6 = 1280  # RFC 8200; Linux disables IPv6 on a link below it

IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class ConfigError(Exception):
    """Every problem found in a configuration, as (path, line, message); line is 1-based, 0 when
    the problem is not on one line. Messages never contain key material."""

    def __init__(self, errors: list[tuple[str, int, str]]) -> None:
        self.errors: list[tuple[str, int, str]] = list(errors)
        super().__init__(self.errors)

    def __str__(self) -> str:
        return "\n".join(f"{path}:{line}: {message}" for path, line, message in self.errors)


def _safe_repr(obj: object, secret: tuple[str, ...]) -> str:
    """A dataclass repr with secrets (and a Bridge URL, which may hold a password) replaced, so
    that a config in a log line or traceback leaks nothing; public keys are shown in base64."""
    parts = []
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if f.name in secret and value is not None:
            text = "<hidden>"
        elif f.name == "public_key" and isinstance(value, bytes) and len(value) == 32:
            text = repr(encode_base64_key(value))
        else:
            text = repr(value)
        parts.append(f"{f.name}={text}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass
class InterfaceConfig:
    private_key: bytes
    listen_port: int | None = None
    fwmark: int | None = None  # "off" -> None; 0 stays 0 (also off)
    addresses: list[IPInterface] = field(default_factory=list)
    dns_servers: list[IPAddress] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    mtu: int | None = None
    table: str = "auto"  # "auto", "off", or a table number / name as written
    pre_up: list[str] = field(default_factory=list)
    post_up: list[str] = field(default_factory=list)
    pre_down: list[str] = field(default_factory=list)
    post_down: list[str] = field(default_factory=list)
    save_config: bool = False
    kill_switch: bool = False  # wgpy extension: KillSwitch = on (tunnel/killswitch.py)
    allow_lan: bool = False  # wgpy extension: AllowLAN = on (only with the kill switch)
    # canonical key name -> line of its (first) value, for FILE:LINE messages (not compared)
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __repr__(self) -> str:
        return _safe_repr(self, ("private_key",))


@dataclass
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None = None
    allowed_ips: list[IPNetwork] = field(default_factory=list)  # host bits cleared
    endpoint: tuple[str, int] | None = None  # (IPv4 | IPv6 without brackets | DNS name, port)
    persistent_keepalive: int | None = None  # "off" -> None
    bridge: str | None = None  # the `Bridge = ...` value as written (bridge/spec.py checked it)
    via: bytes | None = None  # `Via = ...`: the public key of the peer this one is reached through
    obfuscation: str | None = None  # `Obfuscation = lwo` (wgpy): LWO on the UDP port; None: plain
    line: int = field(default=0, compare=False)  # line of the [Peer] header (not compared)
    # canonical key name -> line of its (first) value, for FILE:LINE messages (not compared)
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __repr__(self) -> str:
        return _safe_repr(self, ("preshared_key", "bridge"))


@dataclass
class Config:
    path: str
    interface: InterfaceConfig
    peers: list[PeerConfig] = field(default_factory=list)


# ---------------------------------------------------------------------------- values

_SPACE = " \t\n\v\f\r"  # wg's char_is_space; also bash's [[:space:]] in the C locale
_DIGITS = re.compile(r"[0-9]+")
_HEX = re.compile(r"0x[0-9a-fA-F]+")
_SPLIT_LIST = re.compile(r"[,\s]+", re.ASCII)  # wg-quick: ${value//,/ } then word splitting
_LABEL = r"[A-Za-z0-9_-]{1,63}"
_SEARCH_DOMAIN = re.compile(rf"~?(?:\.|{_LABEL}(?:\.{_LABEL})*\.?)")
_DNS_SERVER = re.compile(r"[0-9.]+|.*:.*", re.DOTALL)  # wg-quick's (^[0-9.]+$)|(^.*:.*$)
_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_IFNAME = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}")  # wg-quick
_IFNAME_CONF = re.compile(r"(?:^|/)([a-zA-Z0-9_=+.-]{1,15})\.conf\Z")  # wg-quick

# The value grammars (keys, numbers, addresses, prefixes, endpoints) are tunnel/grammar.py's,
# shared with the UAPI; the ones below are only a configuration file's.


def _private_key(value: str, notes: list) -> bytes:
    return base64_key(value)


def _listen_port(value: str, notes: list) -> int:
    return uint(value, 65535, "a port is 0..65535")


def _fwmark(value: str, notes: list) -> int | None:
    """wg's parse_fwmark: off, decimal, or 0x hex (lowercase x), at most 0xffffffff."""
    if value.lower() == "off":
        return None
    bad = BadValue(f"{show(value)} is neither off nor 0..0xffffffff (decimal or 0x hex)")
    if _HEX.fullmatch(value):
        digits = value[2:].lstrip("0") or "0"
        if len(digits) > 8:
            raise bad
        return int(digits, 16)
    if not _DIGITS.fullmatch(value):
        raise bad
    try:
        return uint(value, 0xFFFFFFFF, "")
    except BadValue:
        raise bad from None


def _addresses(value: str, notes: list) -> list[IPInterface]:
    """wg-quick's Address: `addr[/bits]` items; unlike AllowedIPs, the host bits are the point."""
    out: list[IPInterface] = []
    for item in _SPLIT_LIST.split(value):
        if not item:
            continue
        net, addr = config_prefix(item)
        out.append(ipaddress.ip_interface((addr, net.prefixlen)))
    return out


def _dns(value: str, notes: list) -> tuple[list[IPAddress], list[str]]:
    servers: list[IPAddress] = []
    search: list[str] = []
    for item in _SPLIT_LIST.split(value):
        if not item:
            continue
        if _DNS_SERVER.fullmatch(item):
            servers.append(config_ip(item, zone=True))
        elif len(item) <= 253 and _SEARCH_DOMAIN.fullmatch(item):
            search.append(item)
        else:
            raise BadValue(f"{show(item)} is neither an IP address nor a search domain")
    return servers, search


def _mtu(value: str, notes: list) -> int:
    mtu = uint(value, MAX_MTU, f"an MTU is {MIN_MTU}..{MAX_MTU}")
    if mtu < MIN_MTU:
        raise BadValue(f"{mtu} is below {MIN_MTU}, the smallest MTU Linux allows")
    return mtu


def _table(value: str, notes: list) -> str:
    lower = value.lower()
    if lower in ("auto", "off"):
        return lower
    if _HEX.fullmatch(value) and len(value[2:].lstrip("0")) <= 8:
        return value
    if _DIGITS.fullmatch(value):
        uint(value, 0xFFFFFFFF, "a table number is 0..4294967295")
        return value
    if _TABLE_NAME.fullmatch(value):
        return value
    raise BadValue(f"{show(value)} is not auto, off, a table number (0..4294967295) or a table name")


def _hook(value: str, notes: list) -> str:
    return value


def _save_config(value: str, notes: list) -> bool:
    lower = value.lower()
    if lower in ("true", "false"):
        return lower == "true"
    raise BadValue(f"{show(value)} is neither true nor false")


def _on_off(value: str, notes: list) -> bool:
    """KillSwitch, AllowLAN: on/off (or true/false, as SaveConfig), any case."""
    lower = value.lower()
    if lower in ("on", "true"):
        return True
    if lower in ("off", "false"):
        return False
    raise BadValue(f"{show(value)} is neither on nor off")


def _public_key(value: str, notes: list) -> bytes:
    return base64_key(value)


def _preshared_key(value: str, notes: list) -> bytes:
    return base64_key(value)


def _allowed_ips(value: str, notes: list) -> list[IPNetwork]:
    """wg's parse_allowedips: all whitespace removed, comma separated, `addr[/bits]`."""
    out: list[IPNetwork] = []
    for item in "".join(value.split()).split(","):
        if not item:
            raise BadValue("empty item in the list")
        if item[:1] in ("+", "-"):
            raise BadValue(f"{show(item)}: +/- prefixes are for `wg set`, not configuration files")
        net, addr = config_prefix(item)
        if net.network_address != addr:
            notes.append(f"AllowedIP has nonzero host part: {item} (using {net})")
        out.append(net)
    return out


def _endpoint(value: str, notes: list) -> tuple[str, int]:
    return config_endpoint(value)


def _keepalive(value: str, notes: list) -> int | None:
    if value.lower() == "off":
        return None
    try:
        return uint(value, 65535, "")
    except BadValue:
        raise BadValue(f"{show(value)} is neither off nor 0..65535 seconds") from None


def _bridge(value: str, notes: list) -> str:
    """One bridge URI, or several ways to try in order (`direct, lwo, ss://..., udp2tcp://...`:
    automatic fallback, bridge/fallback.py)."""
    try:
        if is_fallback(value):
            parse_ways(value)
        else:
            parse_bridge(value)  # the syntax; `wgpy up` resolves the server's name later
    except BridgeError as exc:  # never quotes the value: an ss:// URI holds a password
        raise BadValue(str(exc)) from None
    return value


def is_fallback(bridge: str) -> bool:
    """A Bridge value that lists ways (a comma, or `direct`/`lwo` alone) rather than one bridge."""
    return "," in bridge or bridge.strip().lower() in (DIRECT, LWO)


def _via(value: str, notes: list) -> bytes:
    return base64_key(value)


def _obfuscation(value: str, notes: list) -> str | None:
    lower = value.lower()
    if lower in ("lwo", "off"):
        return None if lower == "off" else lower
    raise BadValue(f"{show(value)} is not an obfuscation wgpy knows (lwo, or off)")


_Handler = Callable[[str, list], object]

# canonical name -> handler; the lists below say which keys accumulate.
_INTERFACE_KEYS: dict[str, _Handler] = {
    "PrivateKey": _private_key,
    "ListenPort": _listen_port,
    "FwMark": _fwmark,
    "Address": _addresses,
    "DNS": _dns,
    "MTU": _mtu,
    "Table": _table,
    "PreUp": _hook,
    "PostUp": _hook,
    "PreDown": _hook,
    "PostDown": _hook,
    "SaveConfig": _save_config,
    "KillSwitch": _on_off,
    "AllowLAN": _on_off,
}
_PEER_KEYS: dict[str, _Handler] = {
    "PublicKey": _public_key,
    "PresharedKey": _preshared_key,
    "AllowedIPs": _allowed_ips,
    "Endpoint": _endpoint,
    "PersistentKeepalive": _keepalive,
    "Bridge": _bridge,
    "Via": _via,
    "Obfuscation": _obfuscation,
}
_REPEATABLE = frozenset({"Address", "DNS", "PreUp", "PostUp", "PreDown", "PostDown", "AllowedIPs"})
_BY_LOWER = {
    "Interface": {k.lower(): k for k in _INTERFACE_KEYS},
    "Peer": {k.lower(): k for k in _PEER_KEYS},
}
_HANDLERS = {"Interface": _INTERFACE_KEYS, "Peer": _PEER_KEYS}


class _Section:
    __slots__ = ("kind", "line", "values", "lines")

    def __init__(self, kind: str, line: int) -> None:
        self.kind = kind
        self.line = line
        self.values: dict[str, list[object]] = {}  # canonical key -> parsed values in order
        self.lines: dict[str, int] = {}  # canonical key -> first line

    def one(self, key: str, default: Any = None) -> Any:
        vals = self.values.get(key)
        return vals[0] if vals else default

    def many(self, key: str) -> list[Any]:
        return self.values.get(key, [])


# ---------------------------------------------------------------------------- parsing


def _parse(text: str, path: str) -> tuple[Config, list[str]]:
    errors: list[tuple[str, int, str]] = []
    notes: list[tuple[int, str]] = []

    def err(line: int, message: str) -> None:
        errors.append((path, line, message))

    interface: _Section | None = None
    peers: list[_Section] = []
    current: _Section | None = None
    in_unknown = False  # after an unknown section header: its keys are not reported again

    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.split("#", 1)[0].strip(_SPACE)
        if not line:
            continue
        if line.startswith("["):
            header = line.lower() if line.isascii() else line
            in_unknown = False
            if header == "[interface]":
                if interface is not None:
                    err(n, f"more than one [Interface] section (the first is on line {interface.line})")
                    current = _Section("Interface", n)  # checked, then dropped
                else:
                    interface = current = _Section("Interface", n)
            elif header == "[peer]":
                current = _Section("Peer", n)
                peers.append(current)
            else:
                inner = line[1:-1] if line.endswith("]") else line[1:]
                err(n, f"unknown section {config_name(inner)}; expected [Interface] or [Peer]")
                current, in_unknown = None, True
            continue
        key, eq, value = line.partition("=")
        key = key.strip(_SPACE)
        value = value.strip(_SPACE)
        if in_unknown:
            continue
        if not eq:
            err(n, "expected 'Key = Value'")
            continue
        if not key:
            err(n, "no key before '='")
            continue
        if current is None:
            err(n, f"{config_name(key)} is outside any section; keys follow [Interface] or [Peer]")
            continue
        canon = _BY_LOWER[current.kind].get(key.lower()) if key.isascii() else None
        if canon is None:
            other = "Peer" if current.kind == "Interface" else "Interface"
            elsewhere = _BY_LOWER[other].get(key.lower()) if key.isascii() else None
            if elsewhere is not None:
                err(n, f"{elsewhere} belongs in [{other}], not [{current.kind}]")
            else:
                err(n, f"unknown key {config_name(key)} in [{current.kind}]")
            continue
        if not value:
            err(n, f"{canon} has no value")
            continue
        if canon not in _REPEATABLE and canon in current.lines:
            err(n, f"{canon} is given twice in this section (first on line {current.lines[canon]})")
            continue
        current.lines.setdefault(canon, n)
        line_notes: list[str] = []
        try:
            parsed = _HANDLERS[current.kind][canon](value, line_notes)
        except BadValue as e:
            err(n, f"{canon}: {e}")
            continue
        notes.extend((n, note) for note in line_notes)
        current.values.setdefault(canon, []).append(parsed)

    config = _build(path, interface, peers, err, notes)
    if errors:
        errors.sort(key=lambda e: e[1])  # stable: same-line errors keep their order
        raise ConfigError(errors)
    assert config is not None
    notes.sort(key=lambda x: x[0])
    return config, [f"Warning: {path}:{line}: {message}" for line, message in notes]


def _build(
    path: str,
    interface: _Section | None,
    peers: list[_Section],
    err: Callable[[int, str], None],
    notes: list[tuple[int, str]],
) -> Config | None:
    iface: InterfaceConfig | None = None
    if interface is None:
        err(0, "no [Interface] section")
    else:
        addresses = [a for group in interface.many("Address") for a in group]
        mtu = interface.one("MTU")
        if mtu is not None and mtu < MIN_MTU_IPV6:
            v6 = [a for a in addresses if a.version == 6]
            if v6:
                err(
                    interface.lines["MTU"],
                    f"MTU {mtu} is below {MIN_MTU_IPV6}, the IPv6 minimum, but an IPv6 Address ({v6[0]}) "
                    f"is configured (line {interface.lines['Address']}); Linux turns IPv6 off on such a link",
                )
        if "PrivateKey" not in interface.lines:
            err(interface.line, "[Interface] has no PrivateKey")
        elif "PrivateKey" in interface.values:  # else a bad PrivateKey was already reported
            dns = interface.many("DNS")
            iface = InterfaceConfig(
                private_key=interface.one("PrivateKey"),
                listen_port=interface.one("ListenPort"),
                fwmark=interface.one("FwMark"),
                addresses=addresses,
                dns_servers=[s for servers, _ in dns for s in servers],
                dns_search=[d for _, search in dns for d in search],
                mtu=mtu,
                table=interface.one("Table", "auto"),
                pre_up=interface.many("PreUp"),
                post_up=interface.many("PostUp"),
                pre_down=interface.many("PreDown"),
                post_down=interface.many("PostDown"),
                save_config=interface.one("SaveConfig", False),
                kill_switch=interface.one("KillSwitch", False),
                allow_lan=interface.one("AllowLAN", False),
                lines=dict(interface.lines),
            )
        if interface.one("AllowLAN", False) and not interface.one("KillSwitch", False):
            err(interface.lines["AllowLAN"],
                "AllowLAN = on opens the kill switch to the local network, but KillSwitch is not on "
                "(add KillSwitch = on, or remove AllowLAN)")

    out: list[PeerConfig] = []
    first_line: dict[bytes, int] = {}
    owner: dict[IPNetwork, int] = {}  # AllowedIP -> header line of the peer that has it
    own = derive_public_key(iface.private_key) if iface is not None else None
    for sec in peers:
        pk = sec.one("PublicKey")
        if pk is None:
            if "PublicKey" not in sec.lines:
                err(sec.line, "[Peer] has no PublicKey")
            continue
        pk_line = sec.lines["PublicKey"]
        if pk in first_line:
            err(pk_line, f"duplicate peer: the same PublicKey is on line {first_line[pk]}")
            continue
        first_line[pk] = pk_line
        if own is not None and pk == own:
            notes.append((pk_line, "this PublicKey is the interface's own; WireGuard ignores such a peer"))
        allowed_ips = [n for group in sec.many("AllowedIPs") for n in group]
        for net in dict.fromkeys(allowed_ips):
            if net in owner:
                notes.append((sec.line, f"AllowedIP {net} is also in the [Peer] on line {owner[net]}; "
                                        "WireGuard gives it to the last peer only"))
            owner[net] = sec.line
        out.append(
            PeerConfig(
                public_key=pk,
                preshared_key=sec.one("PresharedKey"),
                allowed_ips=allowed_ips,
                endpoint=sec.one("Endpoint"),
                persistent_keepalive=sec.one("PersistentKeepalive"),
                bridge=sec.one("Bridge"),
                via=sec.one("Via"),
                obfuscation=sec.one("Obfuscation"),
                line=sec.line,
                lines=dict(sec.lines),
            )
        )
    for line, message in _via_errors(path, out):
        err(line, message)
    if iface is None:
        return None
    return Config(path=path, interface=iface, peers=out)


# ---------------------------------------------------------------------------- multihop


def _chain_errors(via: dict[bytes, bytes], known: list[bytes], where: Callable[[bytes], tuple[str, int]]
                  ) -> list[tuple[bytes, str]]:
    """Every (peer, message) bridge.multihop.check_chains finds in `via`: it stops at the first,
    so the peer it names is set aside and the rest checked again. `where(peer)` is the
    (path, line) its message is about; the message is returned without that prefix."""
    if not via:
        return []
    via = dict(via)
    found: list[tuple[bytes, str]] = []
    culprit: list[bytes] = []

    def label(peer: bytes) -> str:
        culprit.append(peer)
        path, line = where(peer)
        return f"{path}:{line}"

    while via:
        culprit.clear()
        try:
            multihop.check_chains(via, known, label)
            break
        except multihop.NestingError as exc:
            peer = culprit[-1]
            prefix = label(peer) + ": "
            text = str(exc)
            found.append((peer, text[len(prefix):] if text.startswith(prefix) else text))
            del via[peer]
    return found


def _via_errors(path: str, peers: list[PeerConfig]) -> list[tuple[int, str]]:
    """The explicit Vias of a file: check_chains' rules, and no Bridge on a peer that has one."""
    by_key = {p.public_key: p for p in peers}
    via = {p.public_key: p.via for p in peers if p.via is not None}

    def line_of(key: bytes) -> int:
        return by_key[key].lines.get("Via", by_key[key].line)

    found = _chain_errors(via, list(by_key), lambda k: (path, line_of(k)))
    errors = [(line_of(peer), message) for peer, message in found]
    bad = {peer for peer, _ in found}
    for p in peers:
        if p.via is not None and p.bridge is not None and p.public_key not in bad:
            errors.append((p.lines.get("Bridge", p.line),
                           f"Bridge on a peer reached Via another peer: a bridge wraps only the first hop; "
                           f"put it on the entry peer ([Peer] on line {by_key[p.via].line})"))
        if p.obfuscation is not None and (p.bridge is not None or p.via is not None):
            errors.append((p.lines.get("Obfuscation", p.line),
                           f"Obfuscation on a peer with {'Bridge' if p.bridge is not None else 'Via'}: LWO is a way "
                           f"to send on the UDP port, and this peer's datagrams go another way"))
    return errors


def _numeric(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def nesting(config: Config, endpoints: dict[int, tuple[str, int]] | None = None) -> dict[bytes, bytes]:
    """The effective nesting of a configuration: {exit public key: entry public key} for each
    peer reached through another one; peers reached directly are absent.

    A peer's `Via` says it; without one, a peer whose endpoint lies in another peer's AllowedIPs
    (longest prefix, /0 ignored; an AllowedIP on two peers counts for the last, as WireGuard
    keeps it) is nested in that peer (bridge.multihop.entry_for): the layout Mullvad and kernel
    users write (entry: AllowedIPs = exit/32; exit: AllowedIPs = 0.0.0.0/0, ::/0). `endpoints`
    maps a peer's index to its resolved numeric (ip, port), as for uapi_set_lines; without an
    entry there, a peer's endpoint counts only when it is already numeric (names are resolved
    by `wgpy up`, which passes them here).

    Raises ConfigError (FILE:LINE, the line of the Endpoint) for a detected layout that cannot
    work: nested more than one level, a cycle, or a Bridge on the nested peer. Explicit Vias were
    checked by parse_config already."""
    if endpoints is None:
        endpoints = {}
    peers = config.peers
    owner: dict[IPNetwork, bytes] = {}
    for p in peers:
        for net in p.allowed_ips:
            owner[net] = p.public_key  # the last peer keeps it, as in WireGuard
    allowed: dict[bytes, list[IPNetwork]] = {}
    for net, key in owner.items():
        allowed.setdefault(key, []).append(net)
    result: dict[bytes, bytes] = {p.public_key: p.via for p in peers if p.via is not None}
    detected: dict[bytes, tuple[PeerConfig, str]] = {}
    for i, p in enumerate(peers):
        if p.via is not None:
            continue
        endpoint = endpoints.get(i, p.endpoint)
        host = _numeric(endpoint[0]) if endpoint is not None else None
        if host is None:
            continue
        entry = multihop.entry_for(host, p.public_key, allowed) if allowed else None
        if entry is not None:
            result[p.public_key] = entry
            detected[p.public_key] = (p, host)
    if not detected:
        return result
    by_key = {p.public_key: p for p in peers}
    errors: list[tuple[str, int, str]] = []

    def where(key: bytes) -> tuple[str, int]:
        peer = by_key[key]
        return config.path, peer.lines.get("Via" if peer.via is not None else "Endpoint", peer.line)

    for key, message in _chain_errors(result, list(by_key), where):
        path, line = where(key)
        if key in detected:
            peer, host = detected[key]
            message = (f"Endpoint {host} lies in the AllowedIPs of the [Peer] on line {by_key[result[key]].line}, "
                       f"so this peer is reached through that one (as with Via), but: {message}")
        errors.append((path, line, message))
    for key, (peer, host) in detected.items():
        if peer.bridge is not None:
            errors.append((config.path, peer.lines.get("Bridge", peer.line),
                           f"Bridge on a peer reached through another one (its Endpoint {host} lies in the "
                           f"AllowedIPs of the [Peer] on line {by_key[result[key]].line}): a bridge wraps only "
                           f"the first hop; put it on that peer"))
    if errors:
        errors.sort(key=lambda e: e[1])
        raise ConfigError(errors)
    return result


def parse_config(text: str, path: str) -> Config:
    """Parse a wg-quick configuration. Raises ConfigError listing every error found."""
    return _parse(text, path)[0]


def load_config(path: str) -> tuple[Config, list[str]]:
    """Read and parse `path`. Warnings: wg-quick's "Warning: `REALPATH' is world accessible"
    (when the file's and its directory's modes share a bit of 0o007, wg-quick's exact test),
    AllowedIPs with host bits set, and a peer with the interface's own public key."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError([(path, 0, "does not exist")]) from None
    except OSError as e:
        raise ConfigError([(path, 0, f"cannot read: {e.strerror or e}")]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([(path, 0, f"larger than {MAX_CONFIG_BYTES} bytes")])
    warnings: list[str] = []
    real = os.path.realpath(path)
    try:
        dir_mode = os.stat(os.path.dirname(real) or "/").st_mode
    except OSError:
        dir_mode = 0
    if stat.S_IMODE(st.st_mode) & stat.S_IMODE(dir_mode) & 0o007:
        warnings.append(f"Warning: `{real}' is world accessible")
    # Undecodable bytes survive as lone surrogates: harmless in comments, an error in a value.
    config, notes = _parse(data.decode("utf-8", "surrogateescape"), path)
    return config, warnings + notes


def interface_name_for(path_or_name: str) -> tuple[str, str]:
    """wg-quick's rule: a valid interface name means /etc/wireguard/NAME.conf (so `wg0.conf`
    means /etc/wireguard/wg0.conf.conf, as with wg-quick); otherwise a path whose file name is an
    interface name followed by `.conf`. "." and ".." are refused too (Linux refuses them)."""
    if _IFNAME.fullmatch(path_or_name):
        name, path = path_or_name, f"{CONFIG_DIR}/{path_or_name}.conf"
    else:
        m = _IFNAME_CONF.search(path_or_name)
        if m is None:
            raise ConfigError([(path_or_name, 0, "The config file must be a valid interface name, followed by .conf")])
        name, path = m.group(1), path_or_name
    if name in (".", ".."):
        raise ConfigError([(path_or_name, 0, f"{name!r} is not a valid interface name")])
    return name, path


# ---------------------------------------------------------------------------- output


def _ntop(addr: IPAddress) -> str:
    """inet_ntop's text, as `wg` writes addresses (e.g. ::ffff:1.2.3.4); a zone is kept."""
    if addr.version == 4:
        return str(addr)
    text = socket.inet_ntop(socket.AF_INET6, addr.packed)
    return f"{text}%{addr.scope_id}" if addr.scope_id else text


def uapi_set_lines(config: Config, endpoints: dict[int, tuple[str, int]] | None = None,
                   bridges: dict[int, str] | None = None, fallbacks: dict[int, str] | None = None) -> list[str]:
    """The lines `wg setconf` sends after `set=1` (without it and without the final empty line):
    private_key, listen_port and fwmark always (0 when not set), replace_peers=true, then per
    peer public_key, preshared_key, endpoint, persistent_keepalive_interval (when set),
    replace_allowed_ips=true and allowed_ip lines. `endpoints` maps a peer's index to its
    resolved numeric (ip, port); a peer whose endpoint is already numeric needs no entry.
    `bridges` maps a peer's index to its bridge with a numeric server (wgpy's `wgpy_bridge=`
    extension, sent after the endpoint: a daemon other than wgpy-daemon refuses the request).
    A peer's `Via` becomes `wgpy_via=<hex key>` (also an extension; the daemon resolves it once
    the whole request is applied, so the entry may come later). Nesting detected from AllowedIPs
    is not sent: the daemon detects it the same way.
    Raises ValueError for a peer whose endpoint is a name that `endpoints` does not resolve."""
    iface = config.interface
    lines = [
        f"private_key={iface.private_key.hex()}",
        f"listen_port={iface.listen_port or 0}",
        f"fwmark={iface.fwmark or 0}",
        "replace_peers=true",
    ]
    for i, peer in enumerate(config.peers):
        lines.append(f"public_key={peer.public_key.hex()}")
        if peer.preshared_key is not None:
            lines.append(f"preshared_key={peer.preshared_key.hex()}")
        endpoint = endpoints.get(i) if endpoints is not None and i in endpoints else peer.endpoint
        if endpoint is not None:
            host, port = endpoint
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(
                    f"peer {i} ({config.path}:{peer.line}): endpoint host {host!r} is not numeric; resolve it first"
                ) from None
            if not 0 < port <= 65535:
                raise ValueError(f"peer {i} ({config.path}:{peer.line}): endpoint port {port} out of range")
            lines.append(f"endpoint={format_address((_ntop(addr), port))}")
        if bridges is not None and i in bridges:
            lines.append(f"wgpy_bridge={bridges[i]}")
        if fallbacks is not None and i in fallbacks:  # its ways, servers numeric (`wgpy_fallback=`)
            lines.append(f"wgpy_fallback={fallbacks[i]}")
        if peer.via is not None:
            lines.append(f"wgpy_via={peer.via.hex()}")
        if peer.obfuscation is not None:
            lines.append(f"wgpy_obfuscation={peer.obfuscation}")
        if peer.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={_ntop(net.network_address)}/{net.prefixlen}" for net in peer.allowed_ips)
    return lines


def _value(key: str, value: str) -> str:
    """A value as it can be written back: one line, no '#', no outer whitespace."""
    if not value or "#" in value or value != value.strip(_SPACE) or any(c in value for c in "\n\r\v\f"):
        raise ValueError(f"{key} value cannot be written to a configuration file")
    return f"{key} = {value}"


def render_config(config: Config) -> str:
    """The configuration in wg-quick's format: the wg-quick keys in the order `wg-quick save`
    writes them, then the wg keys in `wg showconf` order. parse_config(render_config(c)) == c
    (peer line numbers aside). Raises ValueError for a value no file can hold (e.g. a hook with
    '#')."""
    iface = config.interface
    out = ["[Interface]"]
    out += [f"Address = {a}" for a in iface.addresses]
    out += [f"DNS = {s}" for s in iface.dns_servers]
    out += [_value("DNS", d) for d in iface.dns_search]
    if iface.mtu is not None:
        out.append(f"MTU = {iface.mtu}")
    if iface.table != "auto":
        out.append(_value("Table", iface.table))
    if iface.save_config:
        out.append("SaveConfig = true")
    if iface.kill_switch:
        out.append("KillSwitch = on")
    if iface.allow_lan:
        out.append("AllowLAN = on")
    for key, cmds in (("PreUp", iface.pre_up), ("PostUp", iface.post_up), ("PreDown", iface.pre_down),
                      ("PostDown", iface.post_down)):
        out += [_value(key, c) for c in cmds]
    if iface.listen_port is not None:
        out.append(f"ListenPort = {iface.listen_port}")
    if iface.fwmark is not None:
        out.append(f"FwMark = {iface.fwmark:#x}" if iface.fwmark else "FwMark = 0")
    out.append(f"PrivateKey = {encode_base64_key(iface.private_key)}")
    for peer in config.peers:
        out += ["", "[Peer]", f"PublicKey = {encode_base64_key(peer.public_key)}"]
        if peer.preshared_key is not None:
            out.append(f"PresharedKey = {encode_base64_key(peer.preshared_key)}")
        if peer.allowed_ips:
            out.append("AllowedIPs = " + ", ".join(f"{_ntop(n.network_address)}/{n.prefixlen}" for n in peer.allowed_ips))
        if peer.endpoint is not None:
            out.append(_value("Endpoint", format_address(peer.endpoint)))
        if peer.persistent_keepalive is not None:
            out.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
        if peer.bridge is not None:
            out.append(_value("Bridge", peer.bridge))
        if peer.via is not None:
            out.append(f"Via = {encode_base64_key(peer.via)}")
        if peer.obfuscation is not None:
            out.append(f"Obfuscation = {peer.obfuscation}")
    return "\n".join(out) + "\n"
