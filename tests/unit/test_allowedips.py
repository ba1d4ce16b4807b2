"""Cryptokey routing table: longest-prefix match, moves between peers, removal."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import example, given, strategies as st

from tunnel.noise.allowedips import ROUTES_REMEMBERED, AllowedIPs


def a(s: str) -> bytes:
    return ipaddress.ip_address(s).packed


def test_longest_prefix_v4_v6():
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(ipaddress.ip_network("0.0.0.0/0"), "default")
    t.insert(ipaddress.ip_network("10.0.0.0/8"), "ten")
    t.insert(ipaddress.ip_network("10.1.0.0/16"), "ten-one")
    t.insert(ipaddress.ip_network("10.1.2.3/32"), "host")
    t.insert(ipaddress.ip_network("2001:db8::/32"), "doc6")
    t.insert(ipaddress.ip_network("2001:db8:1::/48"), "doc6-1")
    assert t.lookup(a("10.1.2.3")) == "host"
    assert t.lookup(a("10.1.2.4")) == "ten-one"
    assert t.lookup(a("10.2.0.1")) == "ten"
    assert t.lookup(a("192.0.2.1")) == "default"
    assert t.lookup(a("2001:db8:1::5")) == "doc6-1"
    assert t.lookup(a("2001:db8:2::5")) == "doc6"
    assert t.lookup(a("2001:db9::")) is None  # no v6 default
    assert t.lookup(b"\x01\x02") is None


def test_insert_moves_prefix_and_remove():
    t: AllowedIPs[str] = AllowedIPs()
    n = ipaddress.ip_network("192.168.0.0/24")
    t.insert(n, "p1")
    t.insert(n, "p2")
    assert t.lookup(a("192.168.0.9")) == "p2"
    assert list(t.prefixes_of("p1")) == []
    assert list(t.prefixes_of("p2")) == [n]
    t.remove(n)
    assert t.lookup(a("192.168.0.9")) is None


def test_remove_value():
    t: AllowedIPs[object] = AllowedIPs()
    p1, p2 = object(), object()
    for i in range(10):
        t.insert(ipaddress.ip_network(f"10.0.{i}.0/24"), p1)
        t.insert(ipaddress.ip_network(f"fd00:{i}::/64"), p2)
    t.insert(ipaddress.ip_network("10.0.0.0/16"), p2)
    t.remove_value(p1)
    assert t.lookup(a("10.0.3.1")) is p2
    assert len(list(t.prefixes_of(p2))) == 11


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), max_size=40),
       st.lists(st.integers(0, 2**32 - 1), max_size=40))
def test_matches_brute_force(prefixes, probes):
    t: AllowedIPs[int] = AllowedIPs()
    nets = {}
    for i, (addr, plen) in enumerate(prefixes):
        n = ipaddress.ip_network((addr, plen), strict=False)
        t.insert(n, i)
        nets[n] = i  # later insert of the same prefix wins
    for probe in probes:
        ip = ipaddress.IPv4Address(probe)
        best = max((n for n in nets if ip in n), key=lambda n: n.prefixlen, default=None)
        assert t.lookup(ip.packed) == (nets[best] if best is not None else None)


# Few addresses and prefixes, so that changes hit what earlier lookups remembered.
_OPS = st.lists(st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 3), st.sampled_from([0, 24, 31, 32]), st.integers(0, 3)),
    st.tuples(st.just("remove"), st.integers(0, 3), st.sampled_from([0, 24, 31, 32])),
    st.tuples(st.just("remove_value"), st.integers(0, 3)),
    st.tuples(st.just("lookup"), st.integers(0, 3)),
), max_size=40)


@given(_OPS)
@example([("insert", 1, 24, 1), ("lookup", 1), ("remove", 1, 24), ("lookup", 1)])
@example([("insert", 1, 24, 1), ("lookup", 1), ("remove_value", 1), ("lookup", 1)])
def test_remembered_lookups_follow_every_change(ops):
    """Lookups are remembered (AllowedIPs.routes) between changes: after any sequence of
    inserts, removals and lookups, every lookup answers what the table holds then."""
    t: AllowedIPs[int] = AllowedIPs()
    nets: dict[ipaddress.IPv4Network, int] = {}

    def expected(ip: ipaddress.IPv4Address) -> int | None:
        best = max((n for n in nets if ip in n), key=lambda n: n.prefixlen, default=None)
        return nets[best] if best is not None else None

    for op in ops:
        if op[0] == "insert":
            n = ipaddress.ip_network((f"10.0.0.{op[1]}", op[2]), strict=False)
            t.insert(n, op[3])
            nets[n] = op[3]
        elif op[0] == "remove":
            n = ipaddress.ip_network((f"10.0.0.{op[1]}", op[2]), strict=False)
            t.remove(n)
            nets.pop(n, None)
        elif op[0] == "remove_value":
            t.remove_value(op[1])
            nets = {n: v for n, v in nets.items() if v != op[1]}
        else:
            ip = ipaddress.IPv4Address(f"10.0.0.{op[1]}")
            # What a hot path reads first (False: not remembered, call lookup()):
            remembered = t.routes.get(ip.packed, False)
            assert remembered is False or remembered == expected(ip)
            assert t.lookup(ip.packed) == expected(ip)
            assert t.routes[ip.packed] == expected(ip)


def test_remembered_lookups_are_bounded():
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(ipaddress.ip_network("0.0.0.0/0"), "default")
    for i in range(3 * ROUTES_REMEMBERED):
        assert t.lookup(i.to_bytes(4, "big")) == "default"
        assert len(t.routes) <= ROUTES_REMEMBERED
