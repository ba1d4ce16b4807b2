"""`wgpy bridge serve`'s allow list: which targets a client may reach. Verdicts are remembered per
target; they must be exactly what the list says, however often and in whatever order asked."""

from __future__ import annotations

import ipaddress

from hypothesis import given, strategies as st

from bridge.serve import AllowList

ENTRIES = [("127.0.0.1", 51820), ("::1", 51820), ("10.0.0.2", 53)]


def _allowed(host: object, port: int) -> bool:
    """The rule, written out: an IP address (IPv4-mapped IPv6 as its IPv4 address, a scope id
    ignored) and port on the list; never a name."""
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip == ipaddress.ip_address(h) and port == p for h, p in ENTRIES)


HOSTS = st.sampled_from(["127.0.0.1", "::ffff:127.0.0.1", "::1", "::1%lo", "10.0.0.2", "10.0.0.3",
                         "localhost", "example.org", "", "not an address"])
PORTS = st.sampled_from([51820, 53, 51821, 0, 65535])


@given(st.lists(st.tuples(HOSTS, PORTS), max_size=60))
def test_verdicts_are_the_lists_whatever_the_order(targets):
    allow = AllowList(ENTRIES)
    for host, port in targets + targets:  # asked again: the remembered verdict
        assert allow.allows((host, port)) is _allowed(host, port), (host, port)


def test_ip_objects_and_many_targets():
    allow = AllowList(ENTRIES)
    assert allow.allows((ipaddress.ip_address("127.0.0.1"), 51820))
    assert not allow.allows((ipaddress.ip_address("127.0.0.2"), 51820))
    # More distinct targets than are remembered: still right, and the memory stays bounded.
    for i in range(3 * AllowList.REMEMBERED):
        assert not allow.allows((f"10.1.{i >> 8 & 255}.{i & 255}", 51820))
        assert len(allow._verdicts) <= AllowList.REMEMBERED
    assert allow.allows(("127.0.0.1", 51820)) and allow.allows(("::ffff:127.0.0.1", 51820))
