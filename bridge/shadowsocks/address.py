"""SOCKS5-style addresses as Shadowsocks carries them (RFC 1928 section 5, without the reserved
byte): ATYP then the address then the port, big-endian.

    0x01 | 4-byte IPv4          | port u16
    0x03 | length | domain      | port u16     (length 1..255; the name is UTF-8 here)
    0x04 | 16-byte IPv6         | port u16

Addresses are `Address(host, port)` named tuples, so they can be handed to `socket.sendto` as they
are. IP hosts come back in their canonical text form ("::1", not "0:0:0:0:0:0:0:1"). Encoding picks
the type from the host: an IP literal (or an `ipaddress` object) becomes 0x01/0x04, anything else a
domain; so a domain that is spelled like an IP literal comes back from a round trip as an IP.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any, NamedTuple

from .errors import ProtocolError, UsageError

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04
MAX_DOMAIN_LEN = 255
MIN_ADDRESS_LEN = 1 + 1 + 1 + 2  # a one-byte domain
MAX_ADDRESS_LEN = 1 + 1 + MAX_DOMAIN_LEN + 2


class Address(NamedTuple):
    host: str
    port: int


def encode_address(address: Any) -> bytes:
    """The wire form of `address`, a (host, port) pair (an Address, a socket tuple, or a 4-tuple
    from an AF_INET6 socket). `host` is a str or an ipaddress object. Raises UsageError."""
    try:
        host, port = address[0], address[1]
    except (TypeError, IndexError, KeyError):
        raise UsageError("an address is a (host, port) pair") from None
    if type(host) is str and type(port) is int:
        return _encode_cached(host, port)  # a bridge sends to the same few addresses all the time
    return _encode(host, port)


@functools.lru_cache(maxsize=256)
def _encode_cached(host: str, port: int) -> bytes:
    return _encode(host, port)


def _encode(host: Any, port: Any) -> bytes:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise UsageError(f"port must be an int in 0..65535, not {port!r}")
    tail = port.to_bytes(2, "big")
    if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip = host
    elif isinstance(host, str):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
    else:
        raise UsageError(f"host must be a str or an IP address, not {type(host).__name__}")
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes((ATYP_IPV4,)) + ip.packed + tail
    if isinstance(ip, ipaddress.IPv6Address):
        return bytes((ATYP_IPV6,)) + ip.packed + tail
    try:
        name = host.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("domain name is not encodable as UTF-8") from None
    if not 1 <= len(name) <= MAX_DOMAIN_LEN:
        raise UsageError(f"domain name must be 1..{MAX_DOMAIN_LEN} bytes, not {len(name)}")
    return bytes((ATYP_DOMAIN, len(name))) + name + tail


def address_length(address: Any) -> int:
    """len(encode_address(address)), for overhead and MTU arithmetic."""
    return len(encode_address(address))


@functools.lru_cache(maxsize=1024)
def _ip_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def parse_address_untrusted(data: bytes, offset: int = 0) -> tuple[Address, int] | None:
    """(address, end offset) of the address starting at data[offset], or None when data ends
    before it does. Raises ProtocolError when it is malformed (whatever follows)."""
    n = len(data)
    if offset >= n:
        return None
    atyp = data[offset]
    if atyp == ATYP_IPV4:
        end = offset + 1 + 4 + 2
        if end > n:
            return None
        host = _ip_text(bytes(data[offset + 1:offset + 5]))
    elif atyp == ATYP_IPV6:
        end = offset + 1 + 16 + 2
        if end > n:
            return None
        host = _ip_text(bytes(data[offset + 1:offset + 17]))
    elif atyp == ATYP_DOMAIN:
        if offset + 1 >= n:
            return None
        length = data[offset + 1]
        if length == 0:
            raise ProtocolError("address: empty domain name")
        end = offset + 2 + length + 2
        if end > n:
            return None
        try:
            host = bytes(data[offset + 2:offset + 2 + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("address: domain name is not UTF-8") from None
    else:
        raise ProtocolError(f"address: unknown type 0x{atyp:02x}")
    port = int.from_bytes(data[end - 2:end], "big")
    return Address(host, port), end


def parse_address(data: bytes, offset: int = 0) -> tuple[Address, int]:
    """(address, bytes consumed) for the address at data[offset]. Raises ProtocolError when it is
    truncated or malformed, never anything else."""
    if offset < 0:
        raise UsageError("offset must not be negative")
    parsed = parse_address_untrusted(data, offset)
    if parsed is None:
        raise ProtocolError("address: truncated")
    address, end = parsed
    return address, end - offset
