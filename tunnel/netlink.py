"""Link events from rtnetlink: the daemon exits when its interface is deleted (`wg-quick down`,
`ip link del`) and follows MTU changes (`ip link set mtu`), as wireguard-go does.

`parse_link_events` is pure (bytes in, events out) and tolerant of anything the kernel sends;
`open_link_monitor` is the only syscall site.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

RTMGRP_LINK = 1
RTM_NEWLINK = 16
RTM_DELLINK = 17
IFLA_MTU = 4
IFLA_IFNAME = 3

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTATTR = struct.Struct("=HH")  # len, type


@dataclass(frozen=True)
class LinkEvent:
    deleted: bool
    ifindex: int
    mtu: int | None
    name: str | None


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse_link_events(data: bytes) -> list[LinkEvent]:
    events: list[LinkEvent] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _, _, _ = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        body = off + _NLMSGHDR.size
        if mtype in (RTM_NEWLINK, RTM_DELLINK) and length >= _NLMSGHDR.size + _IFINFOMSG.size:
            _, _, index, _, _ = _IFINFOMSG.unpack_from(data, body)
            mtu = name = None
            a = body + _IFINFOMSG.size
            end = off + length
            while a + _RTATTR.size <= end:
                alen, atype = _RTATTR.unpack_from(data, a)
                if alen < _RTATTR.size or a + alen > end:
                    break
                payload = data[a + _RTATTR.size : a + alen]
                if atype == IFLA_MTU and len(payload) >= 4:
                    mtu = struct.unpack_from("=I", payload)[0]
                elif atype == IFLA_IFNAME:
                    name = payload.split(b"\0", 1)[0].decode(errors="replace")
                a += _align(alen)
            events.append(LinkEvent(mtype == RTM_DELLINK, index, mtu, name))
        off += _align(length)
    return events


def open_link_monitor() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                      socket.NETLINK_ROUTE)
    s.bind((0, RTMGRP_LINK))
    return s
