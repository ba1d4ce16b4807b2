"""TUN offloads (tunnel/offload.py) against a reference model written independently: segments
built field by field with the textbook checksum (16-bit words, end-around carry), super-packets
as the kernel hands them over (TSO, USO, a checksum left to finish), and coalesced writes that
must give back exactly the segments they were made of."""

from __future__ import annotations

import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel import offload
from tunnel.offload import (F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4,
                            PLAIN_HEADER, VNET_HDR, OffloadError, coalesce, split)

from ..helpers import checksum, checksums_valid, pseudo_header

ACK, PSH, FIN, SYN, CWR = 16, 8, 1, 2, 128


# ------------------------------------------------------------------ the reference model


def ref_sum(data: bytes) -> int:
    """RFC 1071 sum (16-bit words, carries folded back in), not inverted."""
    return ~checksum(data) & 0xFFFF


ref_checksum = checksum
pseudo = pseudo_header


def ip_header(v4: bool, src, dst, proto: int, payload_len: int, ip_id=0, ttl=64, tos=0) -> bytes:
    if v4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + payload_len, ip_id, 0x4000, ttl,
                          proto, 0, src, dst)
        return hdr[:10] + struct.pack("!H", ref_checksum(hdr)) + hdr[12:]
    return struct.pack("!IHBB16s16s", 0x60000000 | tos << 20, payload_len, proto, ttl, src, dst)


def tcp_packet(v4, src, dst, sport, dport, seq, ack, flags, payload, *, options=b"", window=501,
               ip_id=0, ttl=64, tos=0) -> bytes:
    off = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0)
    tcp += options + payload
    csum = ref_checksum(pseudo(v4, src, dst, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    return ip_header(v4, src, dst, 6, len(tcp), ip_id, ttl, tos) + tcp


def udp_packet(v4, src, dst, sport, dport, payload, *, ip_id=0) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = ref_checksum(pseudo(v4, src, dst, 17, len(udp)) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    return ip_header(v4, src, dst, 17, len(udp), ip_id) + udp


TIMESTAMPS = bytes([1, 1, 8, 10]) + bytes(range(1, 9))


@st.composite
def flows(draw, v4=None):
    v4 = draw(st.booleans()) if v4 is None else v4
    n = 4 if v4 else 16
    return dict(v4=v4, src=draw(st.binary(min_size=n, max_size=n)),
                dst=draw(st.binary(min_size=n, max_size=n)),
                sport=draw(st.integers(1, 65535)), dport=draw(st.integers(1, 65535)),
                seq=draw(st.integers(0, 2**32 - 1)), ack=draw(st.integers(0, 2**32 - 1)),
                options=draw(st.sampled_from([b"", TIMESTAMPS])),
                ip_id=draw(st.integers(0, 65535)), ttl=draw(st.integers(1, 255)),
                tos=draw(st.sampled_from([0, 0x10, 0xB8])))


def segments(flow, payload: bytes, gso: int, *, last_flags=ACK, first_cwr=False) -> list[bytes]:
    """What the kernel's segmentation of a super-packet gives: MSS-sized pieces, seq and IPv4 id
    counting up, FIN/PSH on the last only, CWR on the first only."""
    out = []
    pieces = [payload[i:i + gso] for i in range(0, len(payload), gso)]
    for i, piece in enumerate(pieces):
        flags = last_flags if i == len(pieces) - 1 else ACK
        if i == 0 and first_cwr:
            flags |= CWR
        out.append(tcp_packet(flow["v4"], flow["src"], flow["dst"], flow["sport"], flow["dport"],
                              (flow["seq"] + i * gso) % 2**32, flow["ack"], flags, piece,
                              options=flow["options"], ip_id=(flow["ip_id"] + i) % 65536,
                              ttl=flow["ttl"], tos=flow["tos"]))
    return out


def super_packet(flow, payload: bytes, gso: int, *, flags=ACK, cwr=False, garbage=0) -> bytes:
    """A TSO read: vnet header + one IP/TCP header for the whole payload, whose checksum field
    holds whatever the kernel left there (`garbage`: it is recomputed)."""
    v4 = flow["v4"]
    whole = tcp_packet(v4, flow["src"], flow["dst"], flow["sport"], flow["dport"], flow["seq"],
                       flow["ack"], flags | (CWR if cwr else 0), payload,
                       options=flow["options"], ip_id=flow["ip_id"], ttl=flow["ttl"],
                       tos=flow["tos"]) if len(payload) < 65000 else None
    assert whole is not None
    iphlen = 20 if v4 else 40
    whole = bytearray(whole)
    struct.pack_into("!H", whole, iphlen + 16, garbage)
    hdr_len = iphlen + 20 + len(flow["options"])
    gso_type = (GSO_TCPV4 if v4 else GSO_TCPV6) | (GSO_ECN if cwr else 0)
    return VNET_HDR.pack(F_NEEDS_CSUM, gso_type, hdr_len, gso, iphlen, 16) + bytes(whole)


def expand(items) -> list[bytes]:
    """The packets a TUN would see from coalesce()'s output: each written item read back."""
    out = []
    for vnet, packet in items:
        out += split(bytes(vnet) + bytes(packet), len(vnet) + len(packet))
    return out


# ------------------------------------------------------------------ read side: split


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flows(), st.integers(1, 1500), st.integers(1, 12000), st.data())
def test_split_tcp_is_the_kernels_segmentation(flow, gso, length, data):
    payload = random.Random(length * 7 + gso).randbytes(length)
    last = data.draw(st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | PSH | FIN]))
    cwr = data.draw(st.booleans())
    garbage = data.draw(st.integers(0, 65535))
    sp = super_packet(flow, payload, gso, flags=last, cwr=cwr, garbage=garbage)
    got = split(sp, len(sp))
    want = segments(flow, payload, gso, last_flags=last, first_cwr=cwr)
    assert got == want
    assert all(checksums_valid(p) for p in got)
    assert all(len(p) <= (20 if flow["v4"] else 40) + 20 + len(flow["options"]) + gso for p in got)


@settings(max_examples=200, deadline=None)
@given(st.booleans(), st.integers(1, 1472), st.integers(1, 9000), st.integers(0, 65535))
def test_split_udp_l4(v4, gso, length, ip_id):
    n = 4 if v4 else 16
    src, dst = bytes(range(1, n + 1)), bytes(range(101, 101 + n))
    payload = random.Random(length + gso).randbytes(length)
    whole = bytearray(udp_packet(v4, src, dst, 4000, 5000, payload, ip_id=ip_id))
    iphlen = 20 if v4 else 40
    struct.pack_into("!H", whole, iphlen + 6, 0x1234)  # left for us to finish
    sp = VNET_HDR.pack(F_NEEDS_CSUM, GSO_UDP_L4, iphlen + 8, gso, iphlen, 6) + bytes(whole)
    got = split(sp, len(sp))
    pieces = [payload[i:i + gso] for i in range(0, length, gso)]
    want = [udp_packet(v4, src, dst, 4000, 5000, piece, ip_id=(ip_id + i) % 65536)
            for i, piece in enumerate(pieces)]
    assert got == want
    assert all(checksums_valid(p) for p in got)


@settings(max_examples=200, deadline=None)
@given(flows(), st.binary(max_size=3000), st.booleans())
def test_split_finishes_a_partial_checksum(flow, payload, udp):
    """No GSO but NEEDS_CSUM (checksum offload): the field holds the pseudo-header sum."""
    v4 = flow["v4"]
    iphlen = 20 if v4 else 40
    if udp:
        packet = udp_packet(v4, flow["src"], flow["dst"], flow["sport"], flow["dport"], payload)
        at = 6
    else:
        packet = tcp_packet(v4, flow["src"], flow["dst"], flow["sport"], flow["dport"],
                            flow["seq"], flow["ack"], ACK, payload, options=flow["options"])
        at = 16
    proto = 17 if udp else 6
    partial = bytearray(packet)
    body_len = len(packet) - iphlen
    psum = ref_sum(pseudo(v4, flow["src"], flow["dst"], proto, body_len))
    struct.pack_into("!H", partial, iphlen + at, psum)
    read = VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, iphlen, at) + bytes(partial)
    (got,) = split(read, len(read))
    assert checksums_valid(got)
    assert got[:iphlen + at] == packet[:iphlen + at] and got[iphlen + at + 2:] == packet[iphlen + at + 2:]
    if udp:
        assert got[iphlen + 6:iphlen + 8] != b"\0\0"  # 0 would mean "no checksum"


def test_split_plain_packet_is_returned_as_is():
    packet = udp_packet(True, b"\1\2\3\4", b"\5\6\7\10", 1, 2, b"hello")
    read = PLAIN_HEADER + packet
    assert split(read, len(read)) == [packet]


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_split_of_garbage_raises_only_offload_error(junk):
    try:
        out = split(junk, len(junk))
    except OffloadError:
        return
    assert all(isinstance(p, bytes) for p in out)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 255), st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x85, 7]),
       st.integers(0, 200), st.integers(0, 300), st.integers(0, 120), st.integers(0, 40),
       st.binary(max_size=300))
def test_split_of_bad_headers_raises_only_offload_error(flags, gso_type, hdr_len, gso, start,
                                                        offset, body):
    read = VNET_HDR.pack(flags, gso_type, hdr_len, gso, start, offset) + body
    try:
        out = split(read, len(read))
    except OffloadError:
        return
    assert all(isinstance(p, bytes) for p in out)


# ------------------------------------------------------------------ write side: coalesce


@settings(max_examples=300, deadline=None)
@given(flows(), st.integers(1, 1460), st.integers(1, 20000), st.booleans())
def test_coalesce_then_split_gives_back_the_segments(flow, gso, length, push):
    payload = random.Random(gso ^ length).randbytes(length)
    segs = segments(flow, payload, gso, last_flags=ACK | PSH if push else ACK)
    items = coalesce(segs)
    assert expand(items) == segs
    for vnet, packet in items:
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack(vnet)
        if vnet == PLAIN_HEADER:
            assert checksums_valid(bytes(packet))
            continue
        v4 = flow["v4"]
        iphlen = 20 if v4 else 40
        assert (flags, gso_type, gso_size, csum_start, csum_offset) == (
            F_NEEDS_CSUM, GSO_TCPV4 if v4 else GSO_TCPV6, gso, iphlen, 16)
        assert hdr_len == iphlen + 20 + len(flow["options"])
        assert len(packet) <= offload.MAX_COALESCED_BYTES
        if v4:
            assert struct.unpack_from("!H", packet, 2)[0] == len(packet)
            assert ref_sum(bytes(packet[:20])) == 0xFFFF
        else:
            assert struct.unpack_from("!H", packet, 4)[0] == len(packet) - 40
        # CHECKSUM_PARTIAL: the pseudo-header sum for the whole length, not inverted.
        src, dst = (packet[12:16], packet[16:20]) if v4 else (packet[8:24], packet[24:40])
        psum = ref_sum(pseudo(v4, bytes(src), bytes(dst), 6, len(packet) - iphlen))
        assert struct.unpack_from("!H", packet, iphlen + 16)[0] == psum
    if len(segs) > 1 and length <= 60000 and len(segs) <= offload.MAX_COALESCED_SEGMENTS:
        assert len(items) == 1  # one run, one write


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(flows(), min_size=1, max_size=4), st.data())
def test_coalesce_keeps_every_flows_order(flow_list, data):
    """Several flows' segments interleaved with other packets, some out of order, some pure
    ACKs: every packet comes out once, and each flow's packets in the order they went in."""
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    streams = []
    for k, flow in enumerate(flow_list):
        flow = dict(flow, sport=1000 + k)  # distinct flows
        gso = data.draw(st.integers(1, 1400))
        segs = segments(flow, rng.randbytes(data.draw(st.integers(1, 6000))), gso)
        if len(segs) > 2 and data.draw(st.booleans()):
            i = rng.randrange(len(segs) - 1)
            segs[i], segs[i + 1] = segs[i + 1], segs[i]  # reordered on the way
        if data.draw(st.booleans()):  # a pure ACK in the middle
            segs.insert(rng.randrange(len(segs) + 1),
                        tcp_packet(flow["v4"], flow["src"], flow["dst"], flow["sport"],
                                   flow["dport"], 7, 9, ACK, b""))
        streams.append(segs)
    others = [udp_packet(True, b"\1\1\1\1", b"\2\2\2\2", 53, 53, rng.randbytes(20)),
              b"\x60" + bytes(50), b"junk"]
    streams.append(others)
    merged = []
    queues = [list(s) for s in streams]
    while any(queues):
        q = rng.choice([q for q in queues if q])
        merged.append(q.pop(0))
    out = expand(coalesce(merged))
    assert sorted(out) == sorted(merged)
    for stream in streams:
        members = set(stream)
        assert [p for p in out if p in members] == stream


def test_coalesce_does_not_glue_what_the_kernel_would_not():
    flow = dict(v4=True, src=b"\1\2\3\4", dst=b"\5\6\7\10", sport=1, dport=2, seq=100, ack=5,
                options=b"", ip_id=7, ttl=64, tos=0)
    a, b, c = segments(flow, bytes(3000), 1000)
    gap = bytearray(b)
    struct.pack_into("!I", gap, 24, 999)  # not the next sequence number
    assert len(coalesce([a, bytes(gap)])) == 2
    other_ttl = tcp_packet(True, flow["src"], flow["dst"], 1, 2, 1100, 5, ACK, bytes(1000),
                           ip_id=8, ttl=63)
    assert len(coalesce([a, other_ttl])) == 2
    other_ack = tcp_packet(True, flow["src"], flow["dst"], 1, 2, 1100, 6, ACK, bytes(1000), ip_id=8)
    assert len(coalesce([a, other_ack])) == 2
    bigger = tcp_packet(True, flow["src"], flow["dst"], 1, 2, 1100, 5, ACK, bytes(1200), ip_id=8)
    assert len(coalesce([a, bigger])) == 2
    fin = tcp_packet(True, flow["src"], flow["dst"], 1, 2, 1100, 5, ACK | FIN, bytes(1000), ip_id=8)
    assert len(coalesce([a, fin])) == 2
    pushed = segments(flow, bytes(3000), 1000, last_flags=ACK | PSH)
    assert len(coalesce([*pushed, c])) == 2  # a PSH ends its run
    assert len(coalesce([a, b, c])) == 1


def test_coalesce_splits_runs_at_the_size_limits():
    flow = dict(v4=False, src=bytes(16), dst=bytes(15) + b"\1", sport=1, dport=2, seq=0, ack=0,
                options=TIMESTAMPS, ip_id=0, ttl=64, tos=0)
    segs = segments(flow, bytes(100 * 100), 100)  # 100 segments
    items = coalesce(segs)
    assert [VNET_HDR.unpack(v)[1] for v, _ in items] == [GSO_TCPV6, GSO_TCPV6]
    assert expand(items) == segs
    big = segments(flow, bytes(1400 * 60), 1400)
    assert all(len(p) <= offload.MAX_COALESCED_BYTES for _, p in coalesce(big))
    assert expand(coalesce(big)) == big


def test_segment_sums_match_the_reference_for_odd_and_even_sizes():
    data = random.Random(1).randbytes(5000)
    for size in (1, 2, 3, 1379, 1380):
        count = 3
        sums = offload.segment_sums(data, 7, size, count)
        for i in range(count):
            piece = data[7 + i * size:7 + (i + 1) * size]
            assert offload.checksum(sums[i]) == ref_checksum(piece) or ref_sum(piece) in (0, 0xFFFF)
