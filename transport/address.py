"""`host:port` text: the one grammar wgpy reads and writes for an address, sans-IO.

    split_host_port("192.0.2.1:51820")        -> ("192.0.2.1", 51820)
    split_host_port("[2001:db8::1]:443")      -> ("2001:db8::1", 443)
    split_host_port("vpn.example.net:51820")  -> ("vpn.example.net", 51820)
    format_address(("2001:db8::1", 443))      -> "[2001:db8::1]:443"

Every reader of `host:port` uses `split_host_port`: wg-quick files (`Endpoint =`, via
tunnel/grammar.py), the UAPI (`endpoint=`, numeric only), bridge URIs (ss://, udp2tcp://) and the
carriers' command lines. The rules all of them share:
- an IPv6 address is in square brackets, and square brackets hold only an IPv6 address (wg also
  takes `fd00::1:51820` and `[1.2.3.4]:5`; the last ':' of an unbracketed IPv6 address is
  ambiguous);
- an IPv6 zone (`%eth0`) only in brackets, made of interface-name characters;
- a host name is a DNS name: labels of 1..63 letters, digits, '-' and '_', up to 253
  characters, an optional final '.';
- the port is ASCII decimal digits (leading zeros allowed, as wg and Go's strconv take them),
  up to 65535; never a service name.

The differences, each a keyword, each deliberate:
- `numeric`: the host must be an IP address (the UAPI, as wireguard-go's netip.ParseAddrPort:
  the daemon never resolves a name);
- `port_zero`: port 0 is allowed (a UAPI endpoint as wireguard-go takes it; a listening address,
  where 0 means any port); a destination elsewhere needs 1..65535;
- `numeric_last_label_is_ipv4` (default on): a name whose last label is all digits must be a
  dotted-quad IPv4 address, since getaddrinfo would read `1.2.3` as 1.2.0.3 and `0x7f.1` as
  127.0.0.1 (no top-level domain is numeric). ss:// URIs turn it off: a SIP002 host is taken as
  other Shadowsocks clients take it.

Errors are AddressError, whose message says what is wrong and quotes nothing from the text (the
text may be part of a URI that holds a password); callers add which value and where.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Union

__all__ = ["AddressError", "canonical_host", "check_host", "format_address", "ip_address", "split_host_port"]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Python's ipaddress also reads non-ASCII digits; these keep it to what every other parser takes.
_V4_CHARS = re.compile(r"[0-9.]+")
_V6_CHARS = re.compile(r"[0-9a-fA-F:.]+")
_ZONE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")  # an interface name (IFNAMSIZ) or index
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")  # as wg takes names; the resolver decides the rest
_DIGITS = re.compile(r"[0-9]+")
MAX_NAME_LEN = 253


class AddressError(ValueError):
    """Address text that does not fit the grammar; the message quotes nothing from it."""


def ip_address(text: str, *, zone: bool = True) -> IPAddress:
    """An IPv4 or IPv6 address literal (no brackets). `zone`: an IPv6 address may carry
    `%zone`. Raises AddressError."""
    if ":" not in text:
        if _V4_CHARS.fullmatch(text):
            try:
                return ipaddress.IPv4Address(text)
            except ValueError:
                pass
        raise AddressError("not an IPv4 address")
    addr, pct, scope = text.partition("%")
    if pct and not zone:
        raise AddressError("not an IPv6 address (no %zone here)")
    if _V6_CHARS.fullmatch(addr) and (not pct or _ZONE.fullmatch(scope)):
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            pass
    raise AddressError("not an IPv6 address")


def check_host(host: str, *, numeric: bool = False, numeric_last_label_is_ipv4: bool = True) -> str:
    """`host` (without brackets) if it is an IP address or (unless `numeric`) a DNS name, as
    split_host_port checks it; raises AddressError otherwise."""
    if not host:
        raise AddressError("the host is empty (no host before ':port')")
    if ":" in host:
        try:
            ip_address(host)
        except AddressError:
            raise AddressError("the host is not an IPv6 address") from None
        return host
    if numeric:
        try:
            ip_address(host, zone=False)
        except AddressError:
            raise AddressError("the host is not a numeric IP address") from None
        return host
    name = host[:-1] if host.endswith(".") else host
    last = name.rpartition(".")[2]
    if numeric_last_label_is_ipv4 and _DIGITS.fullmatch(last):
        try:
            ip_address(host, zone=False)
        except AddressError:
            raise AddressError("the host is not an IPv4 address, and a name cannot end in a "
                               "numeric label") from None
        return host
    if len(name) > MAX_NAME_LEN or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise AddressError("the host is not a valid host name: neither an IP address nor a DNS name")
    return host


def _port(text: str, *, port_zero: bool) -> int:
    if not text:
        raise AddressError("missing ':port' after the host (no port)")
    if not _DIGITS.fullmatch(text):
        raise AddressError("the port is not a decimal number (not a number, or not in ASCII digits)")
    lowest = 0 if port_zero else 1
    digits = text.lstrip("0") or "0"
    if len(digits) > 5 or int(digits) > 65535:
        raise AddressError(f"the port is out of range {lowest}..65535")
    port = int(digits)
    if port < lowest:
        raise AddressError("port 0 is out of range 1..65535 (not a destination)")
    return port


def split_host_port(text: str, *, numeric: bool = False, port_zero: bool = False,
                    numeric_last_label_is_ipv4: bool = True) -> tuple[str, int]:
    """`host:port` or `[ipv6]:port` -> (host as written, without brackets; port). The host is
    an IP address or (unless `numeric`) a DNS name; see the module docstring for the keywords.
    Raises AddressError and nothing else."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise AddressError("unclosed '[': no ']' after the IPv6 address")
        host, rest = text[1:close], text[close + 1:]
        if not rest.startswith(":"):
            raise AddressError("missing ':port' after the ']' (no port)")
        port = _port(rest[1:], port_zero=port_zero)
        try:
            addr = ip_address(host)
        except AddressError:
            addr = None
        if addr is None or addr.version != 6:
            raise AddressError("square brackets are only for an IPv6 address: the host in them "
                               "is not an IPv6 address")
        return host, port
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise AddressError("missing ':port' after the host (no port)")
    if ":" in host:
        raise AddressError("an IPv6 address must be in square brackets, e.g. [2001:db8::1]:51820")
    if "[" in host or "]" in host:
        raise AddressError("misplaced square brackets (only around an IPv6 address)")
    port = _port(port_text, port_zero=port_zero)
    check_host(host, numeric=numeric, numeric_last_label_is_ipv4=numeric_last_label_is_ipv4)
    return host, port


def canonical_host(host: str) -> str:
    """An IP address in its canonical text (IPv6 compressed, lower case); a name unchanged."""
    try:
        return str(ip_address(host))
    except AddressError:
        return host


def format_address(address: tuple) -> str:
    """`host:port`, with an IPv6 host in brackets; the inverse of split_host_port. `address` is
    (host, port, ...) as a socket gives it (extra items, e.g. IPv6 flow info, are ignored)."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
