"""Linux TUN device: the only place that makes TUN syscalls. Batch-shaped, non-blocking.

Opened IFF_TUN | IFF_NO_PI: every read is one IP packet, every write one IP packet. Reads go into
one reusable buffer and are copied out at their real size, so a 64 KiB-capable buffer costs one
allocation per device, not per packet.

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

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
IFNAMSIZ = 16

MAX_PACKET = 65535
BATCH = 128  # packets read per wakeup


class TunError(OSError):
    pass


def valid_ifname(name: str) -> bool:
    """Linux interface name rules (dev_valid_name): 1-15 bytes, no '/', ':' or whitespace,
    not '.' or '..'."""
    if not name or len(name.encode()) >= IFNAMSIZ or name in (".", ".."):
        return False
    return not any(c in name for c in "/: \t\n\r\v\f")


class Tun:
    def __init__(self, name: str, mtu: int | None = None) -> None:
        if not valid_ifname(name):
            raise TunError(22, f"invalid interface name {name!r}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TunError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from None
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            raise TunError(exc.errno, f"cannot create TUN device {name}: {exc.strerror}") from None
        self.fd = fd
        self.name = res[:16].rstrip(b"\0").decode()
        self._buf = bytearray(MAX_PACKET)
        self._view = memoryview(self._buf)
        self.drops = Drops()  # packets the kernel would not take (write_batch)
        if mtu is not None:
            self.set_mtu(mtu)

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
        """Up to `limit` packets that are ready now (possibly none)."""
        out: list[bytes] = []
        view = self._view
        readv = os.readv
        bufs = [self._buf]
        fd = self.fd
        for _ in range(limit):
            try:
                n = readv(fd, bufs)
            except BlockingIOError:
                break
            out.append(bytes(view[:n]))
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
        """Write each packet; a full kernel queue drops it, as a NIC would (counted in drops)."""
        write, fd = os.write, self.fd
        for packet in packets:
            try:
                write(fd, packet)
            except BlockingIOError:
                self.drops.add("tun write queue full")
            except OSError as exc:
                self.drops.add(f"tun write: {errno.errorcode.get(exc.errno, exc.errno)}")

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
