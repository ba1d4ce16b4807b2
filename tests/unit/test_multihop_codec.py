"""bridge/multihop.py sans-IO: the nesting rule, chain checks, the IP/UDP codec (checksums
verified by an independent implementation), IPv4 reassembly; hypothesis for untrusted bytes."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from hypothesis import given, settings, strategies as st

from bridge.multihop import (
    NestingError,
    Reassembler,
    check_chains,
    depth,
    entry_for,
    parse_udp_untrusted,
    udp_packet,
)

from ..helpers import checksum as reference_checksum

net = ipaddress.ip_network


# ---------------------------------------------------------------- nesting rule


def test_entry_is_the_peer_whose_allowed_ips_hold_the_endpoint():
    allowed = {"entry": [net("203.0.113.1/32")], "exit": [net("0.0.0.0/0"), net("::/0")]}
    assert entry_for("203.0.113.1", "exit", allowed) == "entry"
    assert entry_for("198.51.100.1", "entry", allowed) is None  # only /0 holds it: direct


def test_longest_prefix_wins_and_own_allowed_ips_mean_direct():
    allowed = {"a": [net("10.0.0.0/8")], "b": [net("10.1.0.0/16")], "c": [net("10.1.2.3/32")]}
    assert entry_for("10.1.9.9", "x", allowed) == "b"
    assert entry_for("10.2.0.1", "x", allowed) == "a"
    assert entry_for("10.1.2.3", "c", allowed) is None  # its own prefix: not nested in itself
    assert entry_for("not-an-ip", "x", allowed) is None
    assert entry_for("2001:db8::1", "x", allowed) is None


def test_chain_checks_name_what_is_wrong():
    check_chains({"exit": "entry"}, ["exit", "entry"])
    with pytest.raises(NestingError, match="itself"):
        check_chains({"a": "a"}, ["a"])
    with pytest.raises(NestingError, match="no peer"):
        check_chains({"a": "ghost"}, ["a"])
    with pytest.raises(NestingError, match="cycle"):
        check_chains({"a": "b", "b": "a"}, ["a", "b"])
    with pytest.raises(NestingError, match="2 levels"):
        check_chains({"a": "b", "b": "c"}, ["a", "b", "c"])
    assert depth("a", {"a": "b"}) == 1 and depth("b", {"a": "b"}) == 0


# ---------------------------------------------------------------- codec


def _independent_udp_checksum(packet: bytes) -> bool:
    """The UDP checksum over the pseudo-header, with tests/helpers' RFC 1071 sum."""
    if packet[0] >> 4 == 4:
        ihl = (packet[0] & 15) * 4
        udp = packet[ihl:]
        pseudo = packet[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    else:
        udp = packet[40:]
        pseudo = packet[8:40] + struct.pack("!I3xB", len(udp), 17)
    return reference_checksum(pseudo + udp) == 0


hosts4 = st.integers(1, 2**32 - 2).map(lambda n: str(ipaddress.IPv4Address(n)))
hosts6 = st.integers(1, 2**128 - 2).map(lambda n: str(ipaddress.IPv6Address(n)))
ports = st.integers(1, 65535)


@given(st.one_of(st.tuples(hosts4, hosts4), st.tuples(hosts6, hosts6)), ports, ports,
       st.binary(max_size=1500), st.integers(0, 0xFFFF))
def test_udp_packet_round_trips_with_valid_checksums(hosts, sport, dport, payload, ident):
    src, dst = (hosts[0], sport), (hosts[1], dport)
    packet = udp_packet(src, dst, payload, ident)
    assert _independent_udp_checksum(packet)
    if packet[0] >> 4 == 4:
        assert reference_checksum(packet[:20]) == 0  # the IPv4 header checksum
        assert packet[6] & 0x40  # DF
    parsed = parse_udp_untrusted(packet)
    assert parsed == ((str(ipaddress.ip_address(src[0])), sport), (str(ipaddress.ip_address(dst[0])), dport), payload)


@given(st.binary(max_size=200), st.booleans())
def test_parse_never_raises_on_any_bytes(data, verify):
    parse_udp_untrusted(data, verify_checksum=verify)


@given(hosts4, hosts4, st.binary(max_size=300))
def test_ipv4_without_udp_checksum_is_zero_and_accepted(src, dst, payload):
    packet = udp_packet((src, 1), (dst, 2), payload, udp_checksum=False)
    assert packet[26:28] == b"\0\0" and reference_checksum(packet[:20]) == 0
    assert parse_udp_untrusted(packet)[2] == payload


@given(hosts6, hosts6, st.binary(max_size=300))
def test_ipv6_always_gets_a_udp_checksum(src, dst, payload):
    packet = udp_packet((src, 1), (dst, 2), payload, udp_checksum=False)
    assert _independent_udp_checksum(packet)


@given(st.binary(min_size=1, max_size=64), st.integers(0, 200), st.integers(0, 255))
def test_a_flipped_byte_is_refused_or_still_consistent(payload, at, value):
    packet = bytearray(udp_packet(("10.0.0.1", 1000), ("10.0.0.2", 2000), payload))
    at %= len(packet)
    packet[at] = value
    parsed = parse_udp_untrusted(bytes(packet))
    if parsed is not None:  # accepted only if still a consistent UDP packet
        assert _independent_udp_checksum(bytes(packet)[: 20 + 8 + len(parsed[2])]) or packet[26:28] == b"\0\0"


def test_not_udp_truncated_and_fragments_are_refused():
    packet = udp_packet(("10.0.0.1", 1), ("10.0.0.2", 2), b"x" * 40)
    assert parse_udp_untrusted(packet[:30]) is None
    tcp = bytearray(packet)
    tcp[9] = 6
    assert parse_udp_untrusted(bytes(tcp)) is None
    frag = bytearray(packet)
    frag[6] |= 0x20  # MF
    assert parse_udp_untrusted(bytes(frag)) is None
    with pytest.raises(ValueError):
        udp_packet(("10.0.0.1", 1), ("::1", 2), b"")


# ---------------------------------------------------------------- reassembly


def fragments(packet: bytes, size: int) -> list[bytes]:
    """Split an IPv4 packet into fragments carrying `size` bytes (a multiple of 8) each."""
    header, body = bytearray(packet[:20]), packet[20:]
    header[6] &= ~0x40 & 0xFF  # clear DF
    out = []
    for off in range(0, len(body), size):
        chunk = body[off:off + size]
        h = bytearray(header)
        more = off + size < len(body)
        struct.pack_into("!H", h, 2, 20 + len(chunk))
        struct.pack_into("!H", h, 6, (0x2000 if more else 0) | (off // 8))
        struct.pack_into("!H", h, 10, 0)
        struct.pack_into("!H", h, 10, reference_checksum(bytes(h)))
        out.append(bytes(h) + chunk)
    return out


@settings(max_examples=50)
@given(st.binary(min_size=9, max_size=3000), st.sampled_from([8, 64, 512, 1400]), st.randoms())
def test_fragments_in_any_order_reassemble_to_the_packet(payload, size, rnd):
    packet = udp_packet(("192.0.2.1", 51820), ("10.64.0.2", 51820), payload, ident=7)
    parts = fragments(packet, size)
    rnd.shuffle(parts)
    r = Reassembler()
    results = [r.feed_untrusted(p, 0.0) for p in parts]
    whole = [x for x in results if x is not None]
    assert len(whole) == 1
    parsed = parse_udp_untrusted(whole[0])
    assert parsed is not None and parsed[2] == payload


def test_unfragmented_packets_pass_through():
    packet = udp_packet(("192.0.2.1", 1), ("10.64.0.2", 2), b"whole")
    assert Reassembler().feed_untrusted(packet, 0.0) == packet


def test_overlaps_timeouts_and_bounds_drop_and_count():
    packet = udp_packet(("192.0.2.1", 1), ("10.64.0.2", 2), bytes(100), ident=1)
    parts = fragments(packet, 16)
    r = Reassembler(timeout=5.0, max_packets=2)
    assert r.feed_untrusted(parts[0], 0.0) is None
    assert r.feed_untrusted(parts[0], 0.0) is None and r.dropped == 1  # the same piece again: overlap
    r.feed_untrusted(parts[0], 0.0)
    assert r.feed_untrusted(parts[1], 10.0) is None  # the first piece expired meanwhile
    assert r.dropped == 2
    for ident in (2, 3, 4):  # more partial packets than max_packets: the oldest goes
        r.feed_untrusted(fragments(udp_packet(("192.0.2.1", 1), ("10.64.0.2", 2), bytes(100), ident), 16)[0], 11.0)
    assert len(r._partial) <= 2


@given(st.lists(st.binary(max_size=80), max_size=20))
def test_reassembler_never_raises_on_any_bytes(packets):
    r = Reassembler(max_packets=4, max_bytes=4096)
    for i, p in enumerate(packets):
        r.feed_untrusted(p, float(i))
