"""Multihop: a peer reached *through* another peer (nested WireGuard in one process).

The exit peer's WireGuard datagrams are wrapped in an IPv4/IPv6 + UDP header (from our tunnel
address and port to the exit's endpoint) and sealed for the entry peer like any packet from the
host; on the way back, a packet the entry peer delivers that is UDP from the exit's endpoint to
our tunnel address and port is unwrapped (IPv4 fragments reassembled) and handed to the core as a
datagram from the exit. The exit's address never enters the host's routing table.

    host --IP--> Device.outbound --(exit datagram, Endpoint(exit, via=N))--> NestedTransport N
        wrap in IP/UDP --> Device.outbound_to(entry) --(entry datagram)--> entry's transport --> net

This module is sans-IO (the nesting rule, chain checks, the codec, reassembly): `wgpy up`'s
configuration checks use it without an event loop. The transport is bridge/nested.py. Facts: ../shared/reference/bridge-and-multihop.md.

Each nested layer costs 60 bytes of MTU over IPv4 and 80 over IPv6 (IP + UDP + WireGuard's 32);
like wg-quick we take 80 per level, whatever the family.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections import OrderedDict
from typing import Callable, Hashable, Iterable, Mapping, TypeVar

NEST_OVERHEAD = 80  # bytes of MTU per nesting level (IPv6 40 + UDP 8 + WireGuard 32)
MAX_DEPTH = 1  # exit via entry; a chain of three relays is not supported (yet)

K = TypeVar("K", bound=Hashable)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NestingError(ValueError):
    """A `Via` that cannot work; the message names the peers by the caller's labels."""


# ---------------------------------------------------------------- which peer is nested in which


def entry_for(endpoint_host: str, own: K, allowed: Mapping[K, Iterable[Network]]) -> K | None:
    """The peer through which a peer with endpoint `endpoint_host` is reached, when no `Via`
    says so: the other peer whose AllowedIPs hold the endpoint, longest prefix first, ignoring
    /0 entries (a full tunnel's default route does not make every relay nested). None: reached
    directly. This is the layout Mullvad and kernel users write (entry: AllowedIPs = exit/32)."""
    try:
        ip = ipaddress.ip_address(endpoint_host)
    except ValueError:
        return None
    best: tuple[int, K] | None = None
    for key, networks in allowed.items():
        for net in networks:
            if net.prefixlen == 0 or net.version != ip.version or ip not in net:
                continue
            if best is None or net.prefixlen > best[0]:
                best = (net.prefixlen, key)
    if best is None or best[1] == own:
        return None
    return best[1]


def check_chains(via: Mapping[K, K], known: Iterable[K], label: Callable[[K], str] = str) -> None:
    """Raise NestingError if a `Via` names an unknown peer or the peer itself, forms a cycle, or
    nests deeper than MAX_DEPTH."""
    known = set(known)
    for peer, entry in via.items():
        if entry == peer:
            raise NestingError(f"{label(peer)}: Via names the peer itself")
        if entry not in known:
            raise NestingError(f"{label(peer)}: Via names no peer of this interface")
    for peer in via:
        seen = [peer]
        hop = via.get(peer)
        while hop is not None:
            if hop in seen:
                raise NestingError(f"{label(peer)}: Via forms a cycle")
            seen.append(hop)
            hop = via.get(hop)
        if len(seen) - 1 > MAX_DEPTH:
            raise NestingError(f"{label(peer)}: Via nests {len(seen) - 1} levels deep; "
                               f"at most {MAX_DEPTH} (entry and exit) is supported")


def depth(peer: K, via: Mapping[K, K]) -> int:
    """How many peers `peer`'s datagrams travel inside (0: sent directly)."""
    n = 0
    hop = via.get(peer)
    while hop is not None and n <= MAX_DEPTH:
        n += 1
        hop = via.get(hop)
    return n


# ---------------------------------------------------------------- IP/UDP codec


def _checksum(data: bytes | bytearray) -> int:
    """The Internet checksum (RFC 1071). The one's complement sum of 16-bit words is the number
    the bytes spell modulo 0xFFFF (2**16 = 1 there), so one C-speed big-int remainder replaces a
    Python loop over the words."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big")
    total = n % 0xFFFF
    if total == 0 and n:
        total = 0xFFFF  # a nonzero sum that wrapped to all ones
    return ~total & 0xFFFF


@functools.lru_cache(maxsize=1024)
def _packed(host: str) -> bytes:
    return ipaddress.ip_address(host).packed


@functools.lru_cache(maxsize=1024)
def _text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


_UDP = struct.Struct("!HHHH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")


def udp_packet(src: tuple[str, int], dst: tuple[str, int], payload: bytes, ident: int = 0, *,
               udp_checksum: bool = True) -> bytes:
    """An IPv4 or IPv6 packet carrying one UDP datagram, with a correct IP header checksum and
    UDP checksum. IPv4 packets carry DF: the MTU arithmetic guarantees they fit, and a relay must
    not fragment them silently. `udp_checksum=False` sends IPv4 UDP with checksum 0 ("none",
    RFC 768), which every stack accepts; IPv6 always gets one (RFC 8200 requires it)."""
    s, d = _packed(src[0]), _packed(dst[0])
    if len(s) != len(d):
        raise ValueError("source and destination of different IP versions")
    length = 8 + len(payload)
    csum = 0
    if udp_checksum or len(s) == 16:
        if len(s) == 4:
            pseudo = s + d + struct.pack("!BBH", 0, 17, length)
        else:
            pseudo = s + d + struct.pack("!IxxxB", length, 17)
        csum = _checksum(pseudo + _UDP.pack(src[1], dst[1], length, 0) + payload) or 0xFFFF
    header = _UDP.pack(src[1], dst[1], length, csum)
    if len(s) == 4:
        ip = _IPV4.pack(0x45, 0, 20 + length, ident & 0xFFFF, 0x4000, 64, 17, 0, s, d)
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        return ip + header + payload
    return _IPV6.pack(6 << 28, length, 17, 64, s, d) + header + payload


def parse_udp_untrusted(packet: bytes, *, verify_checksum: bool = True
                        ) -> tuple[tuple[str, int], tuple[str, int], bytes] | None:
    """The UDP datagram inside an unfragmented IPv4 or IPv6 packet, or None (not UDP, truncated,
    a fragment, extension headers, a bad checksum when `verify_checksum`). Never raises."""
    n = len(packet)
    if n < 1:
        return None
    version = packet[0] >> 4
    if version == 4:
        if n < 20:
            return None
        ihl = (packet[0] & 0x0F) * 4
        total = (packet[2] << 8) | packet[3]
        if ihl < 20 or total < ihl + 8 or total > n or packet[9] != 17:
            return None
        if (packet[6] & 0x3F) or packet[7]:  # MF or a fragment offset: reassemble first
            return None
        src_ip, dst_ip = packet[12:16], packet[16:20]
        start, end = ihl, total
    elif version == 6:
        if n < 48 or packet[6] != 17:
            return None
        end = 40 + ((packet[4] << 8) | packet[5])
        if end > n or end < 48:
            return None
        src_ip, dst_ip = packet[8:24], packet[24:40]
        start = 40
    else:
        return None
    sport, dport, ulen, csum = _UDP.unpack_from(packet, start)
    if ulen < 8 or start + ulen > end:
        return None
    udp = packet[start:start + ulen]
    if verify_checksum and (csum or version == 6):  # IPv6 requires it; IPv4's 0 means none
        length = struct.pack("!BBH", 0, 17, ulen) if version == 4 else struct.pack("!IxxxB", ulen, 17)
        if _checksum(src_ip + dst_ip + length + udp) != 0:
            return None
    return ((_text(bytes(src_ip)), sport), (_text(bytes(dst_ip)), dport), bytes(udp[8:]))


class Reassembler:
    """IPv4 reassembly for the packets a nested hop receives (RFC 791, bounded): at most
    `max_packets` partial packets and `max_bytes` buffered, each kept `timeout` seconds; `now`
    is passed in. Overlapping fragments discard the packet (RFC 5722's rule, applied to v4)."""

    def __init__(self, *, timeout: float = 30.0, max_packets: int = 64, max_bytes: int = 1 << 20) -> None:
        self.timeout = timeout
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self._partial: OrderedDict[tuple, _Partial] = OrderedDict()
        self._bytes = 0
        self.dropped = 0

    def feed_untrusted(self, packet: bytes, now: float) -> bytes | None:
        """The packet itself if it is not a fragment; the whole packet once its last missing
        fragment arrives; else None (kept, or dropped and counted)."""
        if len(packet) < 20 or packet[0] >> 4 != 4:
            return packet
        flags_off = (packet[6] << 8) | packet[7]
        more, offset = bool(flags_off & 0x2000), (flags_off & 0x1FFF) * 8
        if not more and offset == 0:
            return packet
        self._expire(now)
        ihl = (packet[0] & 0x0F) * 4
        total = (packet[2] << 8) | packet[3]
        if ihl < 20 or total > len(packet) or total <= ihl:
            self.dropped += 1
            return None
        key = (bytes(packet[12:20]), packet[4:6], packet[9])
        part = self._partial.get(key)
        if part is None:
            if len(self._partial) >= self.max_packets:
                self._evict_oldest()
            part = self._partial[key] = _Partial(now)
        data = bytes(packet[ihl:total])
        if offset == 0:
            part.header = bytes(packet[:ihl])
        if not more:
            part.length = offset + len(data)
        if not part.add(offset, data):
            self._drop(key)
            return None
        self._bytes += len(data)
        while self._bytes > self.max_bytes and self._partial:
            self._evict_oldest()
        if key not in self._partial or not part.complete():
            return None
        del self._partial[key]
        self._bytes -= part.size
        payload = part.join()
        header = bytearray(part.header)
        header[0] = 0x45 if len(header) == 20 else header[0]
        struct.pack_into("!H", header, 2, len(header) + len(payload))
        struct.pack_into("!H", header, 6, 0)
        struct.pack_into("!H", header, 10, 0)
        struct.pack_into("!H", header, 10, _checksum(header))
        return bytes(header) + payload

    def _expire(self, now: float) -> None:
        while self._partial:
            key, part = next(iter(self._partial.items()))
            if now - part.started < self.timeout:
                break
            self._drop(key)

    def _evict_oldest(self) -> None:
        self._drop(next(iter(self._partial)))

    def _drop(self, key: tuple) -> None:
        part = self._partial.pop(key)
        self._bytes -= part.size
        self.dropped += 1


class _Partial:
    __slots__ = ("started", "header", "length", "pieces", "size")

    def __init__(self, now: float) -> None:
        self.started = now
        self.header: bytes | None = None
        self.length: int | None = None
        self.pieces: dict[int, bytes] = {}
        self.size = 0

    def add(self, offset: int, data: bytes) -> bool:
        end = offset + len(data)
        if end > 0xFFFF or (self.length is not None and end > self.length):
            return False
        for start, piece in self.pieces.items():
            if offset < start + len(piece) and start < end:
                return False  # overlap
        self.pieces[offset] = data
        self.size += len(data)
        return True

    def complete(self) -> bool:
        if self.header is None or self.length is None:
            return False
        at = 0
        for start in sorted(self.pieces):
            if start != at:
                return False
            at += len(self.pieces[start])
        return at == self.length

    def join(self) -> bytes:
        return b"".join(self.pieces[s] for s in sorted(self.pieces))
