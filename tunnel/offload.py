"""TUN offloads, sans-IO: cutting the kernel's super-packets into MTU-sized IP packets on the way
out, and gluing consecutive TCP segments back into super-packets on the way in.

With IFF_VNET_HDR and TUNSETOFFLOAD (tunnel/tun.py), every TUN read and write carries a
`virtio_net_hdr` in front of the IP packet. The kernel then hands over a whole TCP send of up to
64 KB in one read (TSO), with the TCP/UDP checksum left for us to finish (NEEDS_CSUM), and takes a
64 KB run of a flow's segments in one write (the GRO that a NIC would have done), so its TCP stack
works once per super-packet instead of once per 1.4 KB segment. What goes on the wire is ordinary
WireGuard: every packet sealed is a complete IP packet no larger than the MTU, with valid
checksums, as wireguard-go's tun/offload_linux produces.

    split(packet_with_vnet_header)  -> [ip_packet, ...]      (TUN read -> Device.outbound)
    coalesce([ip_packet, ...])      -> [vnet_header + packet] (Device.inbound -> TUN write)

Checksums: the Internet checksum of a buffer is its big-endian value modulo 0xFFFF (2**16 is 1
modulo 0xFFFF), so a header's sum is one `int.from_bytes`; the payload sums of all the segments of
a super-packet are computed at once with numpy (measured: 7 us for 47 segments of 1368 bytes, 0.15
us a segment, against 2.7 us a segment with int.from_bytes). Nothing here reads a clock or a socket.
"""

from __future__ import annotations

import struct

import numpy as np

# struct virtio_net_hdr (linux/virtio_net.h), host byte order: the TUN is little-endian unless
# TUNSETVNETBE was used, and we never use it.
VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size  # 10
F_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
PLAIN_HEADER = bytes(VNET_HDR_LEN)  # "nothing to do": a complete packet with valid checksums

IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = 1, 2, 4, 8, 16, 32, 64, 128

# Coalescing limits: an IPv4 total length is 16 bits, and the kernel's GRO stops at 64 segments.
MAX_COALESCED_BYTES = 65535
MAX_COALESCED_SEGMENTS = 64

_U16 = struct.Struct("!H")
_U16_PAIR = struct.Struct("!HH")
# From byte 2 of an IPv4 header: total length, id, flags+fragment offset, TTL, protocol, checksum.
_IP4_FIELDS = struct.Struct("!HHHBBH")
# From byte 4 of a TCP header: seq, ack, data offset byte, flags, window, checksum.
_TCP_FIELDS = struct.Struct("!IIBBHH")
# A TCP segment's fields read at once for coalescing: IPv4 (no options) and IPv6 (no extension
# headers) header, then the addresses and ports as one key, seq, ack, data offset, flags.
_V4_TCP = struct.Struct("!BBHHBBBB2x12sIIBB")
_V6_TCP = struct.Struct("!IHBB36sIIBB")


class OffloadError(ValueError):
    """A super-packet that cannot be what the kernel sends (it is dropped and counted)."""


def ones_sum(data) -> int:
    """The Internet checksum's running sum of `data`, reduced modulo 0xFFFF (an odd length is
    padded with a zero byte, RFC 1071)."""
    x = int.from_bytes(data, "big")
    if len(data) & 1:
        x <<= 8
    return x % 0xFFFF


def checksum(total: int) -> int:
    """The checksum field for a running sum: ~fold(total), as the kernel computes it."""
    r = total % 0xFFFF
    return 0xFFFF - r if r else 0


def segment_sums(buf, offset: int, size: int, count: int) -> list[int]:
    """The running sums of `count` consecutive `size`-byte slices of `buf` from `offset`, in one
    numpy reduction (the payload of every segment of a super-packet)."""
    if size % 2 == 0:
        # Summed in the host's (little-endian) order, which needs no byte swap of the data: the
        # one's complement sum of byte-swapped words is the byte-swapped sum (RFC 1071), so the
        # reduced sums are swapped back at the end, 47 values instead of 32,000 words (2x faster).
        # uint32 cannot overflow: at most 32,767 words of 0xFFFF a segment.
        words = np.frombuffer(buf, "<u2", size * count // 2, offset).reshape(count, size // 2)
        reduced = words.sum(axis=1, dtype=np.uint32) % _FFFF
        return reduced.astype("<u2").view(">u2").tolist()
    octets = np.frombuffer(buf, np.uint8, size * count, offset).reshape(count, size)
    high = octets[:, 0::2].sum(axis=1, dtype=np.uint64)
    low = octets[:, 1::2].sum(axis=1, dtype=np.uint64)
    return ((high << np.uint64(8)) + low).tolist()


def _pseudo_sum(packet, version: int, protocol: int) -> int:
    """Source and destination addresses and protocol of the pseudo-header (the length is added
    per segment)."""
    addrs = packet[12:20] if version == 4 else packet[8:40]
    return ones_sum(addrs) + protocol


_FFFF = np.uint32(0xFFFF)


# ---------------------------------------------------------------------------- TUN read side


def split(buf, n: int) -> list[bytes]:
    """The IP packets in a TUN read of `n` bytes of `buf` (virtio_net_hdr first): one packet
    unless it is a GSO super-packet; checksums left to us (NEEDS_CSUM) completed."""
    if n < VNET_HDR_LEN:
        raise OffloadError(f"a {n}-byte read is shorter than its vnet header")
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf)
    view = memoryview(buf)[VNET_HDR_LEN:n]
    length = n - VNET_HDR_LEN
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        if not flags & F_NEEDS_CSUM:
            return [bytes(view)]
        at = csum_start + csum_offset
        if csum_start >= length or at + 2 > length:
            raise OffloadError(f"checksum offset {at} outside a {length}-byte packet")
        packet = bytearray(view)
        # The field holds the pseudo-header sum already: summing from csum_start finishes it.
        value = checksum(ones_sum(packet[csum_start:]))
        protocol = packet[9] if packet[0] >> 4 == 4 and length > 9 else packet[6] if length > 6 else 0
        if value == 0 and protocol == IPPROTO_UDP:
            value = 0xFFFF  # a UDP checksum of 0 means "none"
        _U16.pack_into(packet, at, value)
        return [bytes(packet)]
    if not flags & F_NEEDS_CSUM or gso_size == 0:
        raise OffloadError(f"GSO type {gso_type} without a checksum to complete or a segment size")
    if kind == GSO_TCPV4 or kind == GSO_TCPV6:
        return _split_tcp(view, length, csum_start, gso_size, kind == GSO_TCPV4)
    if kind == GSO_UDP_L4:
        return _split_udp(view, length, csum_start, gso_size)
    raise OffloadError(f"unsupported GSO type {gso_type}")


def _ip_header(view, length: int, iphlen: int, v4: bool, protocol: int) -> None:
    if length < max(iphlen, 20) + 8:
        raise OffloadError(f"a {length}-byte super-packet is shorter than its headers")
    version = view[0] >> 4
    if version != (4 if v4 else 6):
        raise OffloadError(f"GSO super-packet for IPv{4 if v4 else 6} holds IP version {version}")
    if v4:
        if iphlen != (view[0] & 15) * 4 or iphlen < 20 or view[9] != protocol:
            raise OffloadError("IPv4 super-packet header does not match its checksum start")
    elif iphlen != 40 or view[6] != protocol:
        raise OffloadError("IPv6 super-packet with extension headers or another protocol")


def _payload_sums(view, length: int, hdr_len: int, gso: int) -> tuple[int, int, list[int]]:
    """(full-sized segments, size of a shorter last one or 0, every segment's payload sum) of a
    super-packet whose headers take `hdr_len` bytes."""
    full, last = divmod(length - hdr_len, gso)
    if not full and not last:
        raise OffloadError("super-packet without payload")
    sums = segment_sums(view, hdr_len, gso, full) if full else []
    if last:
        sums.append(ones_sum(view[hdr_len + full * gso:]))
    return full, last, sums


def _split_tcp(view, length: int, iphlen: int, gso: int, v4: bool) -> list[bytes]:
    _ip_header(view, length, iphlen, v4, IPPROTO_TCP)
    if length < iphlen + 20:
        raise OffloadError("TCP super-packet shorter than its headers")
    tcphlen = (view[iphlen + 12] >> 4) * 4
    hdr_len = iphlen + tcphlen
    if tcphlen < 20 or hdr_len > length:
        raise OffloadError("TCP header length out of range")
    full, last, sums = _payload_sums(view, length, hdr_len, gso)
    count = len(sums)
    template = bytearray(view[:hdr_len])
    seq, ack, offset_byte, flags, window = _TCP_FIELDS.unpack_from(template, iphlen + 4)[:5]
    last_i = count - 1
    first_flags = flags & ~(TCP_FIN | TCP_PSH)  # FIN and PSH belong to the last segment only
    middle_flags = first_flags & ~TCP_CWR  # CWR to the first only
    last_flags = flags & ~TCP_CWR if last_i else flags
    # The sums of the headers with the fields that change per segment zeroed: each segment's
    # checksum is then that plus the fields' values, no bytes summed again.
    _TCP_FIELDS.pack_into(template, iphlen + 4, 0, ack, offset_byte, 0, window, 0)
    tcp_base = _pseudo_sum(template, 4 if v4 else 6, IPPROTO_TCP) + tcphlen \
        + ones_sum(template[iphlen:])
    if v4:
        ip_id, fragment, ttl, protocol = _IP4_FIELDS.unpack_from(template, 2)[1:5]
        _IP4_FIELDS.pack_into(template, 2, 0, 0, fragment, ttl, protocol, 0)
        ip_base = ones_sum(template[:iphlen])
    out = []
    start = hdr_len
    pack_tcp = _TCP_FIELDS.pack_into
    tcp_at = iphlen + 4
    join = b"".join
    # This loop is the per-segment cost of a TSO read (~0.8 us, checksums inlined). Building the
    # segments as a numpy array instead would take some 30 array operations of ~1 us each per
    # super-packet, about what the loop costs for 47 segments, so the loop stays.
    for i, part in enumerate(sums):
        size = gso if i < full else last
        if v4:
            total = hdr_len + size
            pid = (ip_id + i) & 0xFFFF
            r = (ip_base + total + pid) % 0xFFFF
            _IP4_FIELDS.pack_into(template, 2, total, pid, fragment, ttl, protocol,
                                  0xFFFF - r if r else 0)
        else:
            _U16.pack_into(template, 4, hdr_len - 40 + size)
        s = (seq + i * gso) & 0xFFFFFFFF
        f = middle_flags if 0 < i < last_i else (first_flags if i < last_i else last_flags)
        r = (tcp_base + f + (s >> 16) + (s & 0xFFFF) + size + part) % 0xFFFF
        pack_tcp(template, tcp_at, s, ack, offset_byte, f, window, 0xFFFF - r if r else 0)
        out.append(join((template, view[start:start + size])))
        start += size
    return out


def _split_udp(view, length: int, iphlen: int, gso: int) -> list[bytes]:
    v4 = length > 0 and view[0] >> 4 == 4
    _ip_header(view, length, iphlen, v4, IPPROTO_UDP)
    hdr_len = iphlen + 8
    if hdr_len > length:
        raise OffloadError("UDP super-packet shorter than its headers")
    full, last, sums = _payload_sums(view, length, hdr_len, gso)
    count = len(sums)
    template = bytearray(view[:hdr_len])
    base = _pseudo_sum(template, 4 if v4 else 6, IPPROTO_UDP)
    if v4:
        ip_id = _U16.unpack_from(template, 4)[0]
    out = []
    start = hdr_len
    pack16 = _U16.pack_into
    for i in range(count):
        size = gso if i < full else last
        if v4:
            _U16_PAIR.pack_into(template, 2, hdr_len + size, (ip_id + i) & 0xFFFF)
            template[10:12] = b"\0\0"
            pack16(template, 10, checksum(ones_sum(template[:iphlen])))
        else:
            pack16(template, 4, 8 + size)
        pack16(template, iphlen + 4, 8 + size)
        template[iphlen + 6] = template[iphlen + 7] = 0
        value = checksum(base + 8 + size + ones_sum(template[iphlen:]) + sums[i])
        pack16(template, iphlen + 6, value or 0xFFFF)
        out.append(bytes(template) + view[start:start + size])
        start += size
    return out


# ---------------------------------------------------------------------------- TUN write side


class _Run:
    """Consecutive segments of one TCP flow being glued into one super-packet."""

    __slots__ = ("first", "hdr_len", "iphlen", "v4", "next_seq", "next_id", "gso", "payloads",
                 "size", "closed", "psh", "match")

    def __init__(self, first, hdr_len, iphlen, v4, seq, ip_id, match, psh):
        self.first = first  # the first segment: its headers become the super-packet's
        self.hdr_len = hdr_len
        self.iphlen = iphlen
        self.v4 = v4
        self.gso = len(first) - hdr_len
        self.next_seq = (seq + self.gso) & 0xFFFFFFFF
        self.next_id = (ip_id + 1) & 0xFFFF
        self.payloads = [memoryview(first)[hdr_len:]]
        self.size = len(first)
        self.closed = psh  # a PSH segment ends a run, as in the kernel's GRO
        self.psh = psh
        self.match = match  # what must be equal for a segment to join


def _tcp_segment(packet: bytes):
    """(flow key, match, iphlen, tcphlen, v4, seq, IPv4 id, flags) of a TCP segment that may be
    coalesced, or None for any other packet (those are written as they are). One struct unpack
    reads every field needed."""
    n = len(packet)
    if n <= 40:  # no room for an IPv4 and a TCP header and a byte of data
        return None
    if packet[0] == 0x45:  # IPv4 without options
        (_, tos, total, ip_id, frag, frag2, ttl, protocol, key, seq, ack, offset,
         flags) = _V4_TCP.unpack_from(packet)
        # TCP, not a fragment, the length its own; data only: no SYN, FIN, RST, URG, ECE, CWR.
        if protocol != IPPROTO_TCP or frag & 0x3F or frag2 or total != n or flags & ~TCP_PSH != TCP_ACK:
            return None
        tcphlen = (offset >> 4) * 4
        if tcphlen < 20 or 20 + tcphlen >= n:  # no payload: pure ACKs stay as they are
            return None
        # TOS, DF, TTL, the ack number and the options (timestamps) must agree: the kernel
        # gives the super-packet's header to all of its segments.
        match = (tos, frag, ttl, ack, packet[40:20 + tcphlen] if tcphlen > 20 else None)
        return key, match, 20, tcphlen, True, seq, ip_id, flags
    if packet[0] >> 4 == 6 and n > 60:
        (first, length, protocol, hops, key, seq, ack, offset,
         flags) = _V6_TCP.unpack_from(packet)
        if protocol != IPPROTO_TCP or length != n - 40 or flags & ~TCP_PSH != TCP_ACK:
            return None
        tcphlen = (offset >> 4) * 4
        if tcphlen < 20 or 40 + tcphlen >= n:
            return None
        # Traffic class, flow label, hop limit, ack number and options.
        match = (first, hops, ack, packet[60:40 + tcphlen] if tcphlen > 20 else None)
        return key, match, 40, tcphlen, False, seq, 0, flags
    return None


def _flow_key(packet: bytes) -> bytes | None:
    """Addresses and ports of a TCP packet, as _tcp_segment keys it (None for others)."""
    if len(packet) >= 24 and packet[0] >> 4 == 4 and packet[9] == IPPROTO_TCP:
        return packet[12:24]
    if len(packet) >= 44 and packet[0] >> 4 == 6 and packet[6] == IPPROTO_TCP:
        return packet[8:44]
    return None


def coalesce(packets: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(vnet header, packet) to write to a TUN for `packets`, in order: runs of consecutive
    segments of a TCP flow (in sequence, same headers, all but the last of one size) as one
    super-packet each, everything else as it came (a zero header). A flow's order is kept; only
    packets of different flows may pass each other, as they may on any network."""
    out: list = []
    runs: dict[bytes, _Run] = {}
    for packet in packets:
        seg = _tcp_segment(packet)
        if seg is None:
            out.append((PLAIN_HEADER, packet))
            if runs:  # a pure ACK, a FIN...: its flow's run ends before it, keeping the order
                runs.pop(_flow_key(packet), None)
            continue
        key, match, iphlen, tcphlen, v4, seq, ip_id, flags = seg
        hdr_len = iphlen + tcphlen
        size = len(packet) - hdr_len
        psh = bool(flags & TCP_PSH)
        run = runs.get(key)
        # IPv4 ids must count up, as the kernel's GRO wants and its segmentation restores.
        if (run is not None and not run.closed and seq == run.next_seq and match == run.match
                and (not v4 or ip_id == run.next_id) and size <= run.gso and run.size + size <= MAX_COALESCED_BYTES
                and len(run.payloads) < MAX_COALESCED_SEGMENTS):
            run.payloads.append(memoryview(packet)[hdr_len:])
            run.size += size
            run.next_seq = (seq + size) & 0xFFFFFFFF
            run.next_id = (ip_id + 1) & 0xFFFF
            run.closed = psh or size < run.gso  # a short segment is the last of its run
            run.psh = psh
            continue
        # A segment that cannot join starts its flow's next run, after the previous one.
        run = runs[key] = _Run(packet, hdr_len, iphlen, v4, seq, ip_id, match, psh)
        out.append(run)
    return [_finish(item) if type(item) is _Run else item for item in out]


def _finish(run: _Run) -> tuple[bytes, bytes]:
    if len(run.payloads) == 1:
        return PLAIN_HEADER, run.first
    header = bytearray(run.first[:run.hdr_len])
    iphlen = run.iphlen
    total = run.size
    if run.v4:
        _U16.pack_into(header, 2, total)
        header[10:12] = b"\0\0"
        _U16.pack_into(header, 10, checksum(ones_sum(header[:iphlen])))
        gso_type = GSO_TCPV4
    else:
        _U16.pack_into(header, 4, total - 40)
        gso_type = GSO_TCPV6
    if run.psh:
        header[iphlen + 13] |= TCP_PSH
    # CHECKSUM_PARTIAL: the field holds the pseudo-header sum (folded, not inverted), which the
    # kernel finishes from csum_start if the packet is ever segmented again (forwarded).
    r = (_pseudo_sum(header, 4 if run.v4 else 6, IPPROTO_TCP) + total - iphlen) % 0xFFFF
    _U16.pack_into(header, iphlen + 16, r if r else 0xFFFF)
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, gso_type, run.hdr_len, run.gso, iphlen, 16)
    return vnet, b"".join([header, *run.payloads])
