"""The value grammars of WireGuard's two configuration languages, sans-IO: one function each.

    wg(8) configuration files (tunnel/config.py: `Key = Value`, as wg and wg-quick read them)
    wireguard-go's UAPI     (tunnel/uapi.py: `key=value`, as wireguard-go's device/uapi.go reads it)

Both describe the same things (keys, ports, addresses, prefixes, endpoints), but not in the same
words. The deliberate differences, each kept because the other side's tool does it that way:

                    configuration file (wg)                  UAPI (wireguard-go)
    key             base64, 44 characters, one '=', the      hex, 64 characters, either case
                    unused low bits zero (key_from_base64)
    endpoint host   an IP address or a DNS name (wg          an IP address only (netip.ParseAddrPort:
                    resolves it; wgpy up resolves it first)  the daemon never resolves)
    endpoint port   1..65535                                 0..65535
    endpoint text   kept as written (`[FD00::1]:1`)           canonical; an IPv4-mapped address
                                                             becomes plain IPv4, as transport.udp
                                                             reports sources
    prefix          `addr[/bits]`: without bits the host     `addr/bits`: bits required, no sign,
                    (/32, /128); bits may have leading       no leading zero (netip.ParsePrefix)
                    zeros (wg's strtoul)
    key names       CamelCase (`PersistentKeepalive`)        lower_snake (`persistent_keepalive_interval`)

Shared: decimal numbers are ASCII digits with leading zeros allowed; no address takes a %zone
except an endpoint's IPv6 address; `host:port` follows transport/address.py (IPv6 in brackets,
brackets only for IPv6).

Every error is BadValue, whose message shows values through `show`, which redacts anything that
looks like key material; callers add file, line and key.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Union

from transport.address import AddressError, ip_address, split_host_port

from .keys import KeyError_, decode_base64_key

__all__ = [
    "BadValue",
    "base64_key",
    "config_endpoint",
    "config_ip",
    "config_name",
    "config_prefix",
    "format_ip",
    "format_prefix",
    "hex_key",
    "show",
    "uapi_endpoint",
    "uapi_name",
    "uapi_prefix",
    "uint",
]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_KEYLIKE = re.compile(r"[A-Za-z0-9+/]{40,}=*")  # base64 or hex key material
_CONFIG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_ .-]{0,23}")
_UAPI_NAME = re.compile(r"[a-z_]{1,40}")
_DIGITS = re.compile(r"[0-9]+")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_GO_PREFIX_BITS = re.compile(r"0|[1-9][0-9]{0,2}")
KEY_HEX_LEN = 64


class BadValue(ValueError):
    """A value that does not fit its grammar; the message never contains key material."""


def show(value: str) -> str:
    """A value that is not secret, for a message: repr, cut short. Anything that looks like a
    key (a long base64 or hex run) is redacted anyway, in case one was put in the wrong place."""
    value = _KEYLIKE.sub("<redacted>", value)
    return repr(value if len(value) <= 64 else value[:64] + "...")


def config_name(text: str) -> str:
    """A configuration key or section name for a message; anything that could be key material
    (a pasted key has no '=' before its padding) is replaced by its length."""
    return repr(text) if _CONFIG_NAME.fullmatch(text) else f"<{len(text)} characters>"


def uapi_name(text: str) -> str:
    """A UAPI key or operation name for a message, or its length (a client out of step may be
    sending a key where a name belongs)."""
    return repr(text) if _UAPI_NAME.fullmatch(text) else f"<{len(text)} characters>"


def uint(text: str, maximum: int, what: str | None = None) -> int:
    """A decimal number 0..maximum: ASCII digits, leading zeros allowed (wg's strtoul without
    sign or space; Go's strconv.ParseUint). `what` ends the messages (default: the range)."""
    what = what if what is not None else f"0..{maximum}"
    if not _DIGITS.fullmatch(text):
        raise BadValue(f"{show(text)} is not a decimal number ({what})")
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(maximum)) or int(digits) > maximum:
        raise BadValue(f"{show(text)} is out of range ({what})")
    return int(digits)


# ---------------------------------------------------------------------------- keys


def base64_key(text: str) -> bytes:
    """wg's key_from_base64: 44 characters, one '=', and (unlike Python's decoder) the unused low
    bits of the last character zero, so a key has exactly one spelling."""
    try:
        return decode_base64_key(text)
    except KeyError_:
        raise BadValue("not a base64 key (44 characters ending in '=', as `wg genkey` prints)") from None


def hex_key(text: str) -> bytes:
    """A UAPI key: 64 hex digits (either case)."""
    if not _HEX_KEY.fullmatch(text):
        raise BadValue("not 64 hex characters" if len(text) != KEY_HEX_LEN else "invalid hex")
    return bytes.fromhex(text)


# ---------------------------------------------------------------------------- addresses


def config_ip(text: str, *, zone: bool = False) -> IPAddress:
    """An IP address as a configuration file writes it; `%zone` only where `zone` (DNS servers)."""
    try:
        return ip_address(text, zone=zone)
    except AddressError as exc:
        raise BadValue(f"{show(text)} is {exc}") from None


def format_ip(addr: IPAddress) -> str:
    """As Go's netip.Addr.String: RFC 5952, and an IPv4-mapped address as ::ffff:a.b.c.d."""
    if addr.version == 4:
        return str(addr)
    scope = addr.scope_id
    mapped = addr.ipv4_mapped
    text = f"::ffff:{mapped}" if mapped is not None else str(ipaddress.IPv6Address(int(addr)))
    return f"{text}%{scope}" if scope else text


def format_prefix(net: IPNetwork) -> str:
    """As Go's netip.Prefix.String."""
    return f"{format_ip(net.network_address)}/{net.prefixlen}"


def config_prefix(text: str) -> tuple[IPNetwork, IPAddress]:
    """wg's `addr[/bits]` (AllowedIPs): without bits the host; no zone. Returns the network (host
    bits cleared, as the kernel and wireguard-go do) and the address as written, so the caller
    can warn when they differ."""
    addr_text, slash, bits = text.partition("/")
    addr = config_ip(addr_text)
    if slash:
        plen = uint(bits, addr.max_prefixlen, f"an IPv{addr.version} prefix length is 0..{addr.max_prefixlen}")
    else:
        plen = addr.max_prefixlen
    return ipaddress.ip_network((addr, plen), strict=False), addr


def uapi_prefix(text: str) -> IPNetwork:
    """Go's netip.ParsePrefix: `addr/bits`, no zone, bits without sign or leading zero. Host
    bits are cleared, as wireguard-go's trie does."""
    addr_text, slash, bits_text = text.rpartition("/")
    if not slash:
        raise BadValue(f"{show(text)} is not addr/bits")
    if "%" in addr_text:
        raise BadValue(f"{show(text)}: no zone allowed in a prefix")
    try:
        addr = ip_address(addr_text, zone=False)
    except AddressError:
        raise BadValue(f"{show(text)}: not an IP address") from None
    if not _GO_PREFIX_BITS.fullmatch(bits_text) or int(bits_text) > addr.max_prefixlen:
        raise BadValue(f"{show(text)}: bad prefix length")
    return ipaddress.ip_network((addr, int(bits_text)), strict=False)


# ---------------------------------------------------------------------------- endpoints


def config_endpoint(text: str) -> tuple[str, int]:
    """wg's parse_endpoint, stricter (transport/address.py): an IP address or a DNS name, port
    1..65535. The host is returned as written (IPv6 without brackets); nothing is resolved."""
    try:
        return split_host_port(text)
    except AddressError as exc:
        raise BadValue(f"{show(text)}: {exc}") from None


def uapi_endpoint(text: str) -> tuple[str, int]:
    """Go's netip.ParseAddrPort: `a.b.c.d:port` or `[v6%zone]:port`, numeric only, port 0..65535.
    Returns (ip, port) with the address in its canonical text, in the form transport.udp gives
    received addresses: an IPv4-mapped IPv6 address becomes plain IPv4 (so it is sent from the
    IPv4 socket), a zone is kept."""
    try:
        host, port = split_host_port(text, numeric=True, port_zero=True)
    except AddressError as exc:
        raise BadValue(f"{show(text)}: {exc}") from None
    addr = ip_address(host)  # checked by split_host_port
    if addr.version == 6 and addr.ipv4_mapped is not None and not addr.scope_id:
        return str(addr.ipv4_mapped), port
    return format_ip(addr), port
