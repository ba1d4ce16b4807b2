"""rtnetlink link-event parsing: real message layouts, and never a crash on odd bytes."""

from __future__ import annotations

import struct

from hypothesis import given, strategies as st

from tunnel.netlink import IFLA_IFNAME, IFLA_MTU, RTM_DELLINK, RTM_NEWLINK, parse_link_events


def attr(atype: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), atype) + payload
    return raw + b"\0" * (-len(raw) % 4)


def link_msg(mtype: int, index: int, attrs: bytes = b"") -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), mtype, 0, 0, 0) + body


def test_new_and_del_link():
    data = link_msg(RTM_NEWLINK, 7, attr(IFLA_IFNAME, b"wg0\0") + attr(IFLA_MTU, struct.pack("=I", 1380)))
    data += link_msg(RTM_DELLINK, 7, attr(IFLA_IFNAME, b"wg0\0"))
    data += link_msg(20, 7)  # RTM_NEWADDR: not a link event
    events = parse_link_events(data)
    assert [(e.deleted, e.ifindex, e.mtu, e.name) for e in events] == [
        (False, 7, 1380, "wg0"), (True, 7, None, "wg0"),
    ]


def test_truncated_message_stops_cleanly():
    data = link_msg(RTM_DELLINK, 3)
    assert parse_link_events(data[:-4]) == []
    assert len(parse_link_events(data + data[:10])) == 1


@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(data):
    parse_link_events(data)


@given(st.lists(st.tuples(st.sampled_from([RTM_NEWLINK, RTM_DELLINK]), st.integers(-5, 100),
                          st.binary(max_size=40)), max_size=5))
def test_attribute_garbage_never_raises(msgs):
    data = b"".join(link_msg(t, i, junk) for t, i, junk in msgs)
    assert len(parse_link_events(data)) <= len(msgs)
