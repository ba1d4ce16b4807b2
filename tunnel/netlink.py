"""Link and address events from rtnetlink: the daemon exits when its interface is deleted
(`wg-quick down`, `ip link del`) and follows MTU changes (`ip link set mtu`), as wireguard-go
does, and knows the interface's addresses (multihop wraps a nested hop's datagrams in IP/UDP
from the tunnel address).

`parse_link_events` and `parse_address_events` are pure (bytes in, events out) and tolerant of
anything the kernel sends; `open_link_monitor` and `request_addresses` are the syscall sites.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

RTMGRP_LINK = 1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
NLM_F_REQUEST = 1
NLM_F_DUMP = 0x300
IFLA_MTU = 4
IFLA_IFNAME = 3
IFA_ADDRESS = 1
IFA_LOCAL = 2

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_RTATTR = struct.Struct("=HH")  # len, type
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index


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


@dataclass(frozen=True)
class AddressEvent:
    deleted: bool
    ifindex: int
    address: str  # canonical text (IFA_LOCAL, else IFA_ADDRESS: the local end on point-to-point)


def parse_address_events(data: bytes) -> list[AddressEvent]:
    events: list[AddressEvent] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _, _, _ = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        body = off + _NLMSGHDR.size
        if mtype in (RTM_NEWADDR, RTM_DELADDR) and length >= _NLMSGHDR.size + _IFADDRMSG.size:
            family, _, _, _, index = _IFADDRMSG.unpack_from(data, body)
            size = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
            found: dict[int, bytes] = {}
            a = body + _IFADDRMSG.size
            end = off + length
            while a + _RTATTR.size <= end:
                alen, atype = _RTATTR.unpack_from(data, a)
                if alen < _RTATTR.size or a + alen > end:
                    break
                payload = data[a + _RTATTR.size : a + alen]
                if atype in (IFA_ADDRESS, IFA_LOCAL) and size is not None and len(payload) == size:
                    found[atype] = payload
                a += _align(alen)
            packed = found.get(IFA_LOCAL, found.get(IFA_ADDRESS))
            if packed is not None:
                events.append(AddressEvent(mtype == RTM_DELADDR, index, str(ipaddress.ip_address(packed))))
        off += _align(length)
    return events


def open_link_monitor() -> socket.socket:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                      socket.NETLINK_ROUTE)
    s.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
    return s


def request_addresses(sock: socket.socket) -> None:
    """Ask for a dump of every address; the answers arrive on `sock` as RTM_NEWADDR messages."""
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    sock.send(header + body)
