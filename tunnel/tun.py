"""Linux TUN device: the only place that makes TUN syscalls. Batch-shaped, non-blocking.

Opened IFF_TUN | IFF_NO_PI | IFF_VNET_HDR with offloads (TUNSETOFFLOAD: checksum, TSO4/6, and
UDP segmentation where the kernel has it, Linux 6.2+): a read may return a whole TCP send of up to
64 KB, which tunnel/offload.py cuts into MTU-sized packets, and the packets written are first
glued back into super-packets per TCP flow, so the kernel's stack works per 64 KB, not per
segment. A kernel that refuses the offloads, or WGPY_TUN_OFFLOAD=0, gives plain IP packets, one
per read and write. Reads go into one reusable buffer and are copied out at their real size, so a
64 KiB-capable buffer costs one allocation per device, not per packet.

The engine uses `receive()` (wait for readiness once, then drain up to BATCH packets) and
`write_batch()`; transport.memory.MemoryTun has the same interface for tests without root.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

import trio

from transport.base import Drops

from .offload import PLAIN_HEADER, VNET_HDR_LEN, OffloadError, coalesce, split

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
OFFLOAD_ENABLED = os.environ.get("WGPY_TUN_OFFLOAD", "1") != "0"
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
IFNAMSIZ = 16

MAX_PACKET = 65535
BATCH = 128  # reads per wakeup, and at least this many packets once super-packets are cut up


class TunError(OSError):
    pass


def valid_ifname(name: str) -> bool:
    """Linux interface name rules (dev_valid_name): 1-15 bytes, no '/', ':' or whitespace,
    not '.' or '..'."""
    if not name or len(name.encode()) >= IFNAMSIZ or name in (".", ".."):
        return False
    return not any(c in name for c in "/: \t\n\r\v\f")


class Tun:
    """`offload` (default: WGPY_TUN_OFFLOAD, on) asks for the vnet header and offloads; what
    the kernel granted is in `vnet_hdr` (headers on every read and write), `tso` (super-packets
    both ways) and `uso` (UDP super-packets read)."""

    def __init__(self, name: str, mtu: int | None = None, *, offload: bool | None = None) -> None:
        if not valid_ifname(name):
            raise TunError(22, f"invalid interface name {name!r}")
        if offload is None:
            offload = OFFLOAD_ENABLED
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from None
        # A kernel without IFF_VNET_HDR refuses the flag (EINVAL): then plain packets.
        for flags in ((IFF_TUN | IFF_NO_PI | IFF_VNET_HDR, IFF_TUN | IFF_NO_PI) if offload
                      else (IFF_TUN | IFF_NO_PI,)):
            try:
                res = fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
                break
            except OSError as exc:
                if flags & IFF_VNET_HDR and exc.errno == errno.EINVAL:
                    continue
                os.close(fd)
                raise TunError(exc.errno,
                               f"cannot create TUN device {name}: {exc.strerror}") from None
        self.fd = fd
        self.name = res[:16].rstrip(b"\0").decode()
        self.vnet_hdr = bool(flags & IFF_VNET_HDR)
        self.tso = self.uso = False
        if self.vnet_hdr:
            self._enable_offloads()
        self._buf = bytearray(MAX_PACKET + VNET_HDR_LEN)
        self._view = memoryview(self._buf)
        self.drops = Drops()  # packets the kernel would not take (write_batch)
        # What the offloads did: super-packets read and the packets cut from them; super-packets
        # written and the segments glued into them.
        self.gso_reads = self.gso_read_packets = 0
        self.gro_writes = self.gro_write_segments = 0
        if mtu is not None:
            self.set_mtu(mtu)

    def _enable_offloads(self) -> None:
        """TSO with checksum offload, and UDP segmentation where the kernel knows it (6.2+). A
        kernel that refuses leaves the vnet header on with nothing in it: plain packets."""
        tcp = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        for wanted in (tcp | TUN_F_USO4 | TUN_F_USO6, tcp):
            try:
                fcntl.ioctl(self.fd, TUNSETOFFLOAD, wanted)
            except OSError:
                continue
            self.tso = True
            self.uso = bool(wanted & TUN_F_USO4)
            return

    @property
    def offloads(self) -> str:
        """What is on, for logs and `wgpy show`-style reports."""
        if not self.tso:
            return "off"
        return "tso, uso, gro" if self.uso else "tso, gro"

    def _ifreq_ioctl(self, request: int, value: int = 0) -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifr = struct.pack("16si20x", self.name.encode(), value)
            res = fcntl.ioctl(s.fileno(), request, ifr)
        return struct.unpack_from("i", res, 16)[0]

    @property
    def mtu(self) -> int:
        return self._ifreq_ioctl(SIOCGIFMTU)

    def set_mtu(self, mtu: int) -> None:
        if not 68 <= mtu <= MAX_PACKET:
            raise TunError(22, f"MTU {mtu} out of range 68..65535")
        self._ifreq_ioctl(SIOCSIFMTU, mtu)

    @property
    def ifindex(self) -> int:
        return socket.if_nametoindex(self.name)

    def read_batch(self, limit: int) -> list[bytes]:
        """The packets of up to `limit` reads that are ready now (possibly none); with offloads
        a read's super-packet comes out cut into packets, and reading stops once `limit`
        packets are in."""
        out: list[bytes] = []
        view = self._view
        readv = os.readv
        buf = self._buf
        bufs = [buf]
        fd = self.fd
        if not self.vnet_hdr:
            for _ in range(limit):
                try:
                    n = readv(fd, bufs)
                except BlockingIOError:
                    break
                out.append(bytes(view[:n]))
            return out
        for _ in range(limit):
            try:
                n = readv(fd, bufs)
            except BlockingIOError:
                break
            if not buf[0] and not buf[1]:  # no flags, no GSO: a complete packet
                out.append(bytes(view[VNET_HDR_LEN:n]))
                continue
            try:
                packets = split(buf, n)
            except OffloadError as exc:
                self.drops.add(f"tun offload: {exc}")
                continue
            if len(packets) > 1:
                self.gso_reads += 1
                self.gso_read_packets += len(packets)
            out += packets
            if len(out) >= limit:
                break
        return out

    async def receive(self) -> list[bytes]:
        """The packets ready after one wakeup (at least one). Raises OSError if the device
        fails (the link was deleted under us), trio.ClosedResourceError once closed."""
        while True:
            if self.fd < 0:
                raise trio.ClosedResourceError("TUN closed")
            await trio.lowlevel.wait_readable(self.fd)
            batch = self.read_batch(BATCH)
            if batch:
                return batch

    def write_batch(self, packets: list[bytes]) -> None:
        """Write each packet (with offloads: each run of a TCP flow's segments as one
        super-packet); a full kernel queue drops it, as a NIC would (counted in drops)."""
        if self.vnet_hdr:
            if self.tso:
                items = coalesce(packets)
                if len(items) < len(packets):
                    glued = [item for item in items if item[0] is not PLAIN_HEADER]
                    self.gro_writes += len(glued)
                    self.gro_write_segments += len(glued) + len(packets) - len(items)
            else:
                items = [(PLAIN_HEADER, p) for p in packets]
            write = os.writev  # vnet header and packet, without joining them
        else:
            items, write = packets, os.write
        fd = self.fd
        for item in items:
            try:
                write(fd, item)
            except BlockingIOError:
                self.drops.add("tun write queue full")
            except OSError as exc:
                self.drops.add(f"tun write: {errno.errorcode.get(exc.errno, exc.errno)}")

    def statistics(self) -> dict:
        return {"offloads": self.offloads, "gso_reads": self.gso_reads,
                "gso_read_packets": self.gso_read_packets, "gro_writes": self.gro_writes,
                "gro_write_segments": self.gro_write_segments}

    def close(self) -> None:
        if self.fd >= 0:
            try:
                trio.lowlevel.notify_closing(self.fd)
            except RuntimeError:
                pass  # not inside trio: nobody waits on it
            os.close(self.fd)
            self.fd = -1

    def fileno(self) -> int:
        return self.fd
