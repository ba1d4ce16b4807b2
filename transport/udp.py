"""Plain UDP: the interface's port, one IPv4 and one IPv6 (v6only) socket on the same port.
The only place that makes the tunnel's UDP syscalls; batch-shaped and non-blocking.

Received sources become `Endpoint(host, port, UDP)` with IPv6 in compressed form and IPv4-mapped
IPv6 as IPv4, so the same peer always has an equal endpoint (it is hashed by the core and bound
into cookies). Each socket address is parsed once and cached (bounded: sources are chosen by
whoever sends to us): parsing an address per datagram costs more than the rest of the receive.

Both directions batch in the kernel where it can: sends of equal-sized datagrams to one address
go out in one sendmsg (UDP GSO), and with UDP GRO one read may bring many datagrams from one
source, which `recv_datagrams` splits back into the datagrams that were sent.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import operator
import os
import socket
import struct
import weakref

import trio

from .base import UDP, Datagram, Drops, Endpoint, ReceiveFunc, Transport

log = logging.getLogger("wgpy.udp")
_ENDPOINT = operator.itemgetter(1)  # of a Datagram

SO_MARK = 36
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
RECV_SIZE = 65535
BATCH = 128  # datagrams read per wakeup
ENDPOINT_CACHE = 4096
# Like wireguard-go: deep socket buffers absorb bursts while the single-threaded engine is busy
# with a batch; the FORCE variants (root) pass net.core.rmem_max.
SOCKET_BUFFER = 7 << 20
# UDP GSO (Linux 4.18+): a run of equal-sized datagrams to one address leaves in one sendmsg with
# UDP_SEGMENT; the kernel cuts it into ordinary datagrams (what goes on the wire is unchanged).
# At most 64 segments and 64 KB a call. WGPY_UDP_GSO=0 turns it off; a kernel or path that
# refuses it turns it off for that socket by itself.
SOL_UDP = 17
UDP_SEGMENT = 103
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
GSO_ENABLED = os.environ.get("WGPY_UDP_GSO", "1") != "0"
_SEGMENT = struct.Struct("=H")
# What a socket answers to a GSO send it cannot make: EIO when the route's device cannot
# checksum (udp_send_skb), EINVAL when a segment exceeds the route's MTU or the socket sends
# without checksums, ENOPROTOOPT/EOPNOTSUPP before Linux 4.18. The socket then sends plainly
# for good (a too-large datagram then fails alone with EMSGSIZE, counted as before).
GSO_REFUSALS = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
# UDP GRO (Linux 5.0+): the kernel may hand a socket that asks for it a run of equal-sized
# datagrams from one source (the last may be shorter) as one read, with a UDP_GRO cmsg saying
# the segment size: a GSO send arriving intact (loopback, veth), or datagrams a NIC coalesced.
# Without it, the kernel cuts such a send apart again and each datagram costs a syscall. Each
# read must fit a 64 KB buffer: the kernel caps a coalesced UDP packet at 64 KB with headers.
# A read without the cmsg is one datagram. WGPY_UDP_GRO=0 turns it off; a kernel that refuses
# the option (ENOPROTOOPT before 5.0) leaves it off for that socket.
UDP_GRO = 104
GRO_ENABLED = os.environ.get("WGPY_UDP_GRO", "1") != "0"
GRO_ANCILLARY = socket.CMSG_SPACE(4)  # the UDP_GRO cmsg carries one int
_GRO_SEGMENT = struct.Struct("=i")


def enable_gro(sock: socket.socket) -> bool:
    """Ask for coalesced reads on `sock`; whether it got them (never when WGPY_UDP_GRO=0). A socket
    with GRO must be read with `recv_datagrams`: a plain read would take a coalesced read for one
    datagram."""
    if not GRO_ENABLED:
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:  # ENOPROTOOPT (Linux < 5.0), EINVAL, EOPNOTSUPP: read plainly instead
        return False
    return True


def split_gro(view: memoryview, n: int, segment: int) -> list[bytes]:
    """The datagrams in the first `n` bytes of `view`, a coalesced read of `segment`-sized
    datagrams (the last may be shorter), in order."""
    if segment <= 0 or segment >= n:
        return [bytes(view[:n])]
    data = view[:n]  # the buffer beyond n holds older reads: the last segment must stop at n
    return [bytes(data[i:i + segment]) for i in range(0, n, segment)]


def recv_datagrams(sock: socket.socket, bufs: list[bytearray],
                   view: memoryview) -> tuple[list[bytes], tuple]:
    """One read from `sock`: the datagrams it brought, in order, and their source. `bufs` is [the
    buffer], 64 KB, and `view` a memoryview of it. Raises what recvmsg_into raises
    (BlockingIOError when nothing is ready). Right for a socket whether `enable_gro` got GRO or
    not (without it no cmsg comes: one datagram a read), so a caller has one loop; without GRO,
    recvfrom_into is about 15% faster a datagram (UdpTransport.recv_batch uses it then)."""
    n, ancdata, _flags, addr = sock.recvmsg_into(bufs, GRO_ANCILLARY)
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO:
            return split_gro(view, n, _GRO_SEGMENT.unpack(data)[0]), addr
    return [bytes(view[:n])], addr


class GsoState:
    """One sender's UDP GSO state for `send_datagrams`: whether to try GSO (WGPY_UDP_GSO when
    made) and the sockets that refused it, which send plainly from then on. Weak: a closed
    socket (a rebind, a bridge session gone idle) leaves the set with its last reference.
    A refusal is logged, and counted in `drops` when given (as "udp gso refused: plain sends":
    nothing is lost, but a statistics reader then sees why sends cost a syscall a datagram)."""

    __slots__ = ("enabled", "refused", "drops")

    def __init__(self, enabled: bool | None = None, drops: Drops | None = None) -> None:
        self.enabled = GSO_ENABLED if enabled is None else enabled
        self.refused: weakref.WeakSet = weakref.WeakSet()
        self.drops = drops

    def refuse(self, sock, exc: OSError) -> None:
        self.refused.add(sock)
        if self.drops is not None:
            self.drops.add("udp gso refused: plain sends")
        log.info("UDP GSO refused (%s): plain sends on this socket",
                 errno.errorcode.get(exc.errno, exc.errno))


def send_or_drop(sock, payloads: list, addr: tuple | None,
                 gso: GsoState | None) -> tuple[int, list[tuple[OSError, int]]]:
    """Send every payload as send_datagrams does; what a failed send carried is skipped, not
    retried (a full buffer included): (how many were sent, [(error, how many it lost), ...])
    for the caller to count, for the paths whose rule is to drop rather than wait."""
    sent, failed = 0, []
    n = len(payloads)
    i = 0
    while i < n:
        stop, exc, m = send_datagrams(sock, payloads, addr, gso, i)
        sent += stop - i
        if exc is None:
            break
        failed.append((exc, m))
        i = stop + m
    return sent, failed


def send_datagrams(sock, payloads: list, addr: tuple | None, gso: GsoState | None,
                   start: int = 0) -> tuple[int, OSError | None, int]:
    """Send `payloads[start:]` in order as datagrams through `sock`, to `addr` (None: the socket
    is connected). With `gso` enabled and not refused by `sock`, each run of equal-sized
    payloads (the last may be shorter; at most GSO_MAX_SEGMENTS and GSO_MAX_BYTES) leaves in one
    sendmsg with UDP_SEGMENT; a socket that refuses that is remembered in `gso` and the same
    payloads go again plainly, one send each: the wire sees the same datagrams either way.

    Stops at the first send that fails and returns (i, exc, n): the send of `payloads[i:i + n]`
    raised `exc` and nothing from `i` on was sent (a UDP send is all or nothing, a GSO one too).
    BlockingIOError means the socket buffer is full: the caller waits, drops, or queues as it
    did per datagram; for any other error it counts `n` datagrams lost and calls again from
    `i + n`. Returns (len(payloads), None, 0) when everything was sent."""
    n = len(payloads)
    i = start
    # Checked once a call: a socket refuses for good (its kernel or route), not per datagram.
    grouped = gso is not None and gso.enabled and n - start > 1 and sock not in gso.refused
    lens = list(map(len, payloads)) if grouped else None
    while i < n:
        if grouped:
            size = lens[i]
            # Empty datagrams never join a run: the kernel cuts by size, so they would vanish.
            limit = (min(n, i + GSO_MAX_SEGMENTS, i + max(1, GSO_MAX_BYTES // size)) if size
                     else i + 1)
            window = lens[i:limit]
            if window.count(size) == len(window):  # the usual burst: all alike, counted in C
                j = limit
            else:
                j = i + 1
                while lens[j] == size:
                    j += 1
                if 0 < lens[j] < size:
                    j += 1  # a shorter last segment joins the run
            if j - i > 1:
                segment = [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(size))]
                try:
                    if addr is None:
                        sock.sendmsg(payloads[i:j], segment)
                    else:
                        sock.sendmsg(payloads[i:j], segment, 0, addr)
                except OSError as exc:
                    if exc.errno in GSO_REFUSALS:
                        gso.refuse(sock, exc)
                        grouped = False
                        continue  # the same payloads again, one send each
                    return i, exc, j - i
                i = j
                continue
        try:
            if addr is None:
                sock.send(payloads[i])
            else:
                sock.sendto(payloads[i], addr)
        except OSError as exc:
            return i, exc, 1
        i += 1
    return n, None, 0


def endpoint_of(addr: tuple, via: int = UDP) -> Endpoint:
    """A socket address (v4 2-tuple or v6 4-tuple) as an Endpoint; v4-mapped v6 becomes v4."""
    host, port = addr[0], addr[1]
    if ":" in host:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
        if ip.ipv4_mapped is not None:
            return Endpoint(str(ip.ipv4_mapped), port, via)
        return Endpoint(ip.compressed, port, via)
    return Endpoint(host, port, via)


class UdpTransport(Transport):
    kind = "udp"

    def __init__(self) -> None:
        super().__init__()
        self.v4: socket.socket | None = None
        self.v6: socket.socket | None = None
        self.port = 0
        self._buf = bytearray(RECV_SIZE)
        self._bufs = [self._buf]
        self._view = memoryview(self._buf)
        self._endpoints: dict[tuple, Endpoint] = {}
        self._blocked: socket.socket | None = None  # the socket whose buffer was full
        # Sockets that refused a GSO send (an old kernel, a path without it): plain sends there.
        self._gso = GsoState(drops=self.drops)
        # Read when (re)binding: the sockets that got GRO, read with recv_datagrams.
        self.gro = GRO_ENABLED
        self._gro: set = set()

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.v4, self.v6) if s is not None]

    def bind(self, port: int) -> None:
        """(Re)bind both sockets to `port` (0: a random port, the same for both families).

        As wireguard-go (BindUpdate), the old sockets are closed first, so that the port they
        hold can be taken again (rebinding the current port must not fail with EADDRINUSE). If
        `port` cannot be bound, the old port is bound again (best effort: someone may have
        taken it meanwhile, and then the transport is left unbound, `port` 0) and the OSError
        (e.g. EADDRINUSE) is raised. Either way the old receive functions end
        (ClosedResourceError); call `receivers()` again."""
        old_port = self.port if self.sockets else 0
        self.close()
        try:
            self._bind_now(port)
        except OSError:
            if old_port:
                try:
                    self._bind_now(old_port)
                except OSError:
                    pass
            raise

    def _bind_now(self, port: int) -> None:
        v4, v6, bound = self._open_pair(port)
        self.v4, self.v6, self.port = v4, v6, bound
        self._gro = {s for s in self.sockets if self.gro and enable_gro(s)}
        if self.fwmark:
            try:
                self._apply_mark(self.fwmark)
            except OSError:
                self.close()
                raise

    def _open_pair(self, port: int) -> tuple[socket.socket | None, socket.socket | None, int]:
        attempts = 10 if port == 0 else 1
        last_exc: OSError | None = None
        for _ in range(attempts):
            v4 = v6 = None
            try:
                v4 = self._open(socket.AF_INET, port)
                bound = v4.getsockname()[1] if v4 is not None else port
                v6 = self._open(socket.AF_INET6, bound)
                if v6 is not None and v4 is None:
                    bound = v6.getsockname()[1]
                if v4 is None and v6 is None:
                    raise OSError(errno.EAFNOSUPPORT, "no IPv4 or IPv6 UDP available")
                return v4, v6, bound
            except OSError as exc:
                for s in (v4, v6):
                    if s is not None:
                        s.close()
                last_exc = exc
                if exc.errno != errno.EADDRINUSE:
                    break
        assert last_exc is not None
        raise last_exc

    @staticmethod
    def _open(family: int, port: int) -> socket.socket | None:
        try:
            s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                return None  # this host has no such family
            raise
        for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
            try:
                s.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)
        try:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(("::", port))
            else:
                s.bind(("0.0.0.0", port))
        except OSError as exc:
            s.close()
            if family == socket.AF_INET6 and exc.errno == errno.EADDRNOTAVAIL:
                return None  # IPv6 disabled on this host
            raise
        return s

    def set_fwmark(self, mark: int) -> None:
        self._apply_mark(mark)
        self.fwmark = mark

    def _apply_mark(self, mark: int) -> None:
        for s in self.sockets:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)

    # ---- receiving

    def receivers(self) -> list[ReceiveFunc]:
        return [self._receiver(s) for s in self.sockets]

    def _receiver(self, sock: socket.socket) -> ReceiveFunc:
        async def receive() -> list[Datagram]:
            while True:
                await trio.lowlevel.wait_readable(sock)
                batch = self.recv_batch(sock, BATCH)
                if batch:
                    return batch

        return receive

    def recv_batch(self, sock: socket.socket, limit: int) -> list[Datagram]:
        """About `limit` datagrams ready now on `sock` (possibly none); with GRO, all of the last
        read's datagrams, which may pass `limit` by up to 63."""
        if sock in self._gro:
            return self._recv_batch_gro(sock, limit)
        # Without GRO, recvfrom_into: a loopback timeit of 1452-byte datagrams, about 1,050 ns a
        # datagram against 1,200 for recvmsg_into (with or without room for a cmsg).
        out: list[Datagram] = []
        buf = self._buf
        view = self._view
        recv = sock.recvfrom_into
        cache = self._endpoints
        for _ in range(limit):
            try:
                n, addr = recv(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EBADF:  # closed by a rebind: this receiver is done
                    raise trio.ClosedResourceError from None
                # ICMP errors surface here (ECONNREFUSED...); they say nothing we act on.
                continue
            ep = cache.get(addr)
            if ep is None:
                if len(cache) >= ENDPOINT_CACHE:
                    cache.clear()
                ep = cache[addr] = endpoint_of(addr)
            out.append((bytes(view[:n]), ep))
        self.received += len(out)
        return out

    def _recv_batch_gro(self, sock: socket.socket, limit: int) -> list[Datagram]:
        out: list[Datagram] = []
        bufs, view = self._bufs, self._view
        cache = self._endpoints
        # Counted in datagrams, but a read is taken whole: its datagrams are only in the buffer
        # until the next read. At most `limit` reads too: errors read nothing.
        for _ in range(limit):
            try:
                datagrams, addr = recv_datagrams(sock, bufs, view)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EBADF:  # closed by a rebind: this receiver is done
                    raise trio.ClosedResourceError from None
                continue  # ICMP errors, as above
            ep = cache.get(addr)
            if ep is None:
                if len(cache) >= ENDPOINT_CACHE:
                    cache.clear()
                ep = cache[addr] = endpoint_of(addr)
            out += [(d, ep) for d in datagrams]
            if len(out) >= limit:
                break
        self.received += len(out)
        return out

    # ---- sending

    def send(self, datagrams: list[Datagram]) -> list[Datagram]:
        v4, v6 = self.v4, self.v6
        drops = self.drops
        gso = self._gso
        sent = 0
        n = len(datagrams)
        endpoints = list(map(_ENDPOINT, datagrams))
        i = 0
        while i < n:
            # The run of datagrams to one endpoint gets one lookup, and send_datagrams groups it
            # further by size. Usually it is the whole batch, which a count in C tells.
            endpoint = endpoints[i]
            if i == 0 and endpoints.count(endpoint) == n:
                j = n
            else:
                j = i + 1
                while j < n:
                    ep = endpoints[j]
                    if ep is not endpoint and ep != endpoint:
                        break
                    j += 1
            host = endpoint[0]
            sock = v6 if ":" in host else v4
            if sock is None:
                drops.add("no socket for endpoint family", j - i)
                i = j
                continue
            payloads = [d for d, _ in datagrams[i:j]]
            addr = (host, endpoint[1])
            k = 0
            while True:
                stop, exc, m = send_datagrams(sock, payloads, addr, gso, k)
                sent += stop - k
                if exc is None:
                    break
                if isinstance(exc, BlockingIOError):
                    self.sent += sent
                    self._blocked = sock
                    return datagrams[i + stop:]
                # Unreachable networks, EPERM from a firewall, EMSGSIZE: count, never stop.
                drops.add(f"udp send: {errno.errorcode.get(exc.errno, exc.errno)}", m)
                k = stop + m
            i = j
        self.sent += sent
        return []

    @property
    def gso(self) -> bool:
        """Whether sends try UDP GSO (GSO_ENABLED when made)."""
        return self._gso.enabled

    @gso.setter
    def gso(self, on: bool) -> None:
        self._gso.enabled = on

    async def wait_writable(self) -> None:
        sock, self._blocked = self._blocked, None
        if sock is None or sock.fileno() < 0:
            return
        try:
            await trio.lowlevel.wait_writable(sock)
        except trio.ClosedResourceError:
            pass

    def close(self) -> None:
        for s in self.sockets:
            try:
                trio.lowlevel.notify_closing(s)  # wake its receiver, which then ends
            except RuntimeError:
                pass  # not inside trio: nobody waits on it
            s.close()
        self.v4 = self.v6 = None
        self.port = 0
        self._gro = set()
