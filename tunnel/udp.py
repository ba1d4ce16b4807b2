"""The tunnel's UDP sockets: one IPv4 and one IPv6 (v6only) on the same port. The only place that
makes UDP syscalls; batch-shaped and non-blocking.

Endpoints are `(ip_string, port)`; IPv6 addresses are kept in compressed form so the same peer
always has the same endpoint value (it is hashed by the core and bound into cookies).
"""

from __future__ import annotations

import errno
import ipaddress
import socket

SO_MARK = 36
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
RECV_SIZE = 65535
# Like wireguard-go: deep socket buffers absorb bursts while the single-threaded engine is busy
# with a batch; the FORCE variants (root) pass net.core.rmem_max.
SOCKET_BUFFER = 7 << 20

Endpoint = tuple[str, int]


def normalize_endpoint(addr: tuple) -> Endpoint:
    """A socket address (v4 2-tuple or v6 4-tuple) as `(ip, port)`; v4-mapped v6 becomes v4."""
    host, port = addr[0], addr[1]
    if ":" in host:
        ip = ipaddress.IPv6Address(host.split("%", 1)[0])
        if ip.ipv4_mapped is not None:
            return (str(ip.ipv4_mapped), port)
        return (ip.compressed, port)
    return (host, port)


class UdpSockets:
    def __init__(self) -> None:
        self.v4: socket.socket | None = None
        self.v6: socket.socket | None = None
        self.port = 0
        self.fwmark = 0
        self._buf = bytearray(RECV_SIZE)
        # IPv6 source -> normalized endpoint: parsing an address per datagram is costly in Python.
        self._v6_endpoints: dict[tuple, Endpoint] = {}

    @property
    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.v4, self.v6) if s is not None]

    def bind(self, port: int) -> None:
        """(Re)bind both sockets to `port` (0: a random port, the same for both families).
        On failure the old sockets stay as they were; raises OSError (e.g. EADDRINUSE)."""
        v4, v6, bound = self._open_pair(port)
        self.close()
        self.v4, self.v6, self.port = v4, v6, bound
        if self.fwmark:
            self._apply_mark(self.fwmark)

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

    def recv_batch(self, sock: socket.socket, limit: int) -> list[tuple[bytes, Endpoint]]:
        out: list[tuple[bytes, Endpoint]] = []
        buf = self._buf
        view = memoryview(buf)
        recv = sock.recvfrom_into
        v6 = sock.family == socket.AF_INET6
        cache = self._v6_endpoints
        for _ in range(limit):
            try:
                n, addr = recv(buf)
            except BlockingIOError:
                break
            except OSError:
                # ICMP errors surface here (ECONNREFUSED...); they say nothing we act on.
                continue
            if v6:
                ep = cache.get(addr)
                if ep is None:
                    if len(cache) >= 4096:  # bounded: sources are attacker-chosen
                        cache.clear()
                    ep = cache[addr] = normalize_endpoint(addr)
                addr = ep
            out.append((bytes(view[:n]), addr))
        return out

    def socket_for(self, endpoint: Endpoint) -> socket.socket | None:
        return self.v6 if ":" in endpoint[0] else self.v4

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        self.v4 = self.v6 = None
