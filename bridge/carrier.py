"""Bridge transports: a bridged peer's WireGuard datagrams leave through a Shadowsocks or
udp-over-tcp client instead of the interface's UDP port, inside the same process.

    Device --(datagram, Endpoint(via=N))--> engine --> transport N .send --> bridge server --> peer
    Device <--(datagram, Endpoint(via=N))-- engine <-- transport N receive function <--

Both implement transport.base.Transport, so the engine drives them exactly as it drives UDP.
A bridged peer's endpoint is an `Endpoint(host, port, via=N)`: the WireGuard endpoint as the
bridge server sees it (the Shadowsocks target; informational for udp2tcp, whose server has a
fixed target) and the number of the transport that reaches it. The peer is pinned (the core
never moves it to a packet's source), so an authentic packet arriving some other way cannot
take its traffic off the bridge.

Transports never raise out of `send` and never stop on a network error: a socket that cannot be
opened or connected is retried with backoff (the route to the server may come up later), and
every datagram lost is counted by reason. Their sockets carry the interface's fwmark, so a full
tunnel's policy routing sends them outside the tunnel; `set_fwmark` follows changes.

`ShadowsocksTransport` is the one Shadowsocks client: bridge.ss_local (the standalone forwarder
for wireguard-go or the kernel) is this transport plus a local UDP socket.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections import deque

import trio

from transport.base import Datagram, Endpoint, ReceiveFunc, Transport
from transport.udp import GsoState, send_datagrams

from .netio import errname
from .shadowsocks import ShadowsocksError, Udp2022Client
from .shadowsocks.errors import AuthenticationError, ReplayError
from .spec import BridgeSpec
from .udp2tcp import DatagramTooLarge, Udp2TcpClient

log = logging.getLogger("wgpy.bridge")

BATCH = 128  # datagrams read per wakeup
MAX_DATAGRAM = 0xFFFF
SOCKET_BUFFER = 4 << 20  # requested SO_RCVBUF / SO_SNDBUF (best effort)
RETRY_MIN, RETRY_MAX = 0.1, 5.0  # backoff for a socket that cannot be opened or connected
RECEIVE_QUEUE = 4096  # udp2tcp: datagrams decoded but not yet taken by the engine
# Send errors meaning the socket's source address or route is gone (the host moved to another
# network): a connected UDP socket keeps the source it was given, so only a new socket recovers.
REOPEN_ERRNOS = frozenset({errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH})


class BridgeTransport(Transport):
    """What both bridges share: a spec, a number, the endpoint values they produce, and when a
    reply last came back through them.

    `last_reply` (Unix time, None: never) is when a reply last arrived that the bridge accepted:
    for Shadowsocks one that authenticated (opened with our key), for udp-over-tcp a complete
    frame. A socket or TCP connection to the server proves nothing (UDP is connectionless, and
    a server with another password takes packets and stays silent): `wgpy show` says
    "no reply yet" until there is one."""

    last_reply: float | None = None

    def __init__(self, spec: BridgeSpec, ident: int, fwmark: int = 0) -> None:
        super().__init__()
        self.spec = spec
        self.ident = ident
        self.fwmark = fwmark

    def endpoint(self, target: tuple[str, int] | None) -> Endpoint | None:
        """The endpoint the device uses for a peer at `target` (its WireGuard endpoint as the
        server sees it) through us. Without a target: None for Shadowsocks, which must name
        one in every packet; the server itself for udp2tcp, whose server has a fixed target."""
        if target is None:
            if self.kind != "udp2tcp":
                return None
            target = self.spec.server
        return Endpoint(target[0], target[1], self.ident)

    def statistics(self) -> dict:
        return {**super().statistics(), "bridge": self.spec.redacted(), "last_reply": self.last_reply}


def open_bridge(spec: BridgeSpec, ident: int, fwmark: int = 0) -> BridgeTransport:
    if spec.kind == "udp2tcp":
        return Udp2TcpTransport(spec, ident, fwmark)
    return ShadowsocksTransport(spec, ident, fwmark)


class ShadowsocksTransport(BridgeTransport):
    """Shadowsocks UDP: every datagram sealed for its endpoint (the target address inside the
    packet) and sent from one UDP socket connected to the server; replies opened, their source
    address becoming the endpoint the device sees them from.

    The receive function owns the socket's life: it opens it (retrying with backoff), and opens
    a new one when `reopen` closed the old (after sends showed the host's address is gone)."""

    kind = "ss"

    def __init__(self, spec: BridgeSpec, ident: int, fwmark: int = 0) -> None:
        super().__init__(spec, ident, fwmark)
        self.cipher = spec.cipher()
        # 2022: one client session for the transport's life (session id, packet ids, replay window).
        self.session = Udp2022Client(self.cipher) if self.cipher.method.is_2022 else None
        self._sock: socket.socket | None = None
        self._retry = RETRY_MIN
        self._buf = bytearray(MAX_DATAGRAM)
        self._closed = False
        # A refusal is counted as for the interface's UDP port: `wgpy show` tells why.
        self._gso = GsoState(drops=self.drops)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    # ---- the sans-IO halves

    def seal(self, datagram: bytes | memoryview, target: tuple[str, int], now: float) -> bytes:
        """Raises ShadowsocksError (a 2022 session out of packet ids, a bad clock)."""
        if self.session is not None:
            return self.session.seal(target, datagram, now)
        return self.cipher.seal_udp(target, datagram)

    def open_reply(self, packet: bytes | memoryview, now: float):
        """(source address, payload) of a reply from the server, or None after counting why
        it was dropped."""
        drops = self.drops
        try:
            if self.session is not None:
                return self.session.open(packet, now)
            return self.cipher.open_udp(packet)
        except AuthenticationError:
            drops.add("reply failed authentication")
        except ReplayError:
            drops.add("reply replayed")
        except ShadowsocksError:
            drops.add("reply malformed")
        return None

    # ---- sending

    def send(self, datagrams: list[Datagram]) -> list[Datagram]:
        sock = self._sock
        if sock is None:
            self.drops.add("no socket to the server yet", len(datagrams))
            return []
        now = time.time()
        seal, drops = self.seal, self.drops
        # Sealed first, sent after: equal-sized WireGuard datagrams seal to equal-sized packets
        # (no padding), which send_datagrams sends as runs in one sendmsg each (UDP GSO).
        packets: list[bytes] = []
        origin: list[int] | None = None  # packets[k] seals datagrams[origin[k]]; None: k itself
        for i, (datagram, endpoint) in enumerate(datagrams):
            try:
                packets.append(seal(datagram, (endpoint[0], endpoint[1]), now))
            except ShadowsocksError as exc:
                drops.add(f"seal: {type(exc).__name__}")
                if origin is None:
                    origin = list(range(len(packets)))
                continue
            if origin is not None:
                origin.append(i)
        gso = self._gso
        n = len(packets)
        k = 0
        while k < n:
            stop, exc, m = send_datagrams(sock, packets, None, gso, k)
            self.sent += stop - k
            if exc is None:
                break
            if isinstance(exc, BlockingIOError):
                # The 2022 packet ids of the unsent are spent; the resend seals again with new ones.
                # Those whose seal failed are counted already and not offered again.
                if origin is None:
                    return datagrams[stop:]
                return [datagrams[j] for j in origin[stop:]]
            # EMSGSIZE (MTU too high for the bridge), ECONNREFUSED, EPERM
            drops.add(f"udp send: {errname(exc)}", m)
            k = stop + m
            if exc.errno in REOPEN_ERRNOS:
                self.reopen(errname(exc))
                drops.add("no socket to the server yet", n - k)
                break
        return []

    async def wait_writable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            await trio.lowlevel.wait_writable(sock)
        except trio.ClosedResourceError:
            pass

    def reopen(self, why: str) -> None:
        """Replace the socket (the receive function wakes and opens a new one at once)."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        log.warning("bridge %s: new socket to the server (%s)", self.spec.redacted(), why)
        trio.lowlevel.notify_closing(sock)
        sock.close()

    def set_fwmark(self, mark: int) -> None:
        self.fwmark = mark
        if self._sock is not None:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)

    # ---- receiving

    def receivers(self) -> list[ReceiveFunc]:
        return [self._receive]

    async def _receive(self) -> list[Datagram]:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("transport closed")
            sock = self._sock
            if sock is None:
                sock = await self._open_with_retry()
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                continue  # reopen() or close(): the loop decides
            batch = self._drain(sock)
            if batch:
                return batch

    def _drain(self, sock: socket.socket) -> list[Datagram]:
        buf = self._buf
        view = memoryview(buf)
        drops, ident = self.drops, self.ident
        open_reply = self.open_reply
        now = time.time()
        batch: list[Datagram] = []
        for _ in range(BATCH):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    break
                drops.add(f"udp receive: {errname(exc)}")  # ICMP: the server port is closed
                continue
            opened = open_reply(view[:n], now)
            if opened is None:
                continue
            source, payload = opened
            batch.append((payload, Endpoint(str(source[0]), int(source[1]), ident)))
        if batch:
            self.last_reply = now  # authenticated: the server has our key and answers
            self.received += len(batch)
        return batch

    async def _open_with_retry(self) -> socket.socket:
        while True:
            try:
                sock = self._open()
            except OSError as exc:
                log.warning("bridge %s: cannot reach the server: %s; retrying in %.1f s",
                            self.spec.redacted(), exc.strerror or exc, self._retry)
                await trio.sleep(self._retry)
                self._retry = min(self._retry * 2, RETRY_MAX)
                continue
            self._retry = RETRY_MIN
            log.info("bridge %s: transport %d up", self.spec.redacted(), self.ident)
            self._sock = sock
            return sock

    def _open(self) -> socket.socket:
        host, port = self.spec.server
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                except OSError:
                    pass
            if self.fwmark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.fwmark)
            sock.connect((host, port))  # replies from anyone but the server never reach us
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                trio.lowlevel.notify_closing(sock)
            except RuntimeError:
                pass  # not inside trio: nobody waits on it
            sock.close()


class Udp2TcpTransport(BridgeTransport):
    """udp-over-tcp: one TCP connection to the server, kept up by `run` (Udp2TcpClient). The
    framing carries no address, so replies are delivered as coming from the endpoint the peer
    was last sent to (or the server, before anything was sent)."""

    kind = "udp2tcp"

    def __init__(self, spec: BridgeSpec, ident: int, fwmark: int = 0) -> None:
        super().__init__(spec, ident, fwmark)
        self.client = Udp2TcpClient(spec.server, on_datagrams=self._on_datagrams, fwmark=fwmark)
        self._source = self.endpoint(None)
        self._inbox: deque[bytes] = deque()
        self._arrived = trio.Event()
        self._closed = False

    @property
    def connected(self) -> bool:
        return self.client.connected

    async def run(self, *, task_status) -> None:
        await self.client.run(task_status=task_status)

    def send(self, datagrams: list[Datagram]) -> list[Datagram]:
        client = self.client
        for i, (datagram, endpoint) in enumerate(datagrams):
            if client.would_block:
                return datagrams[i:]
            self._source = endpoint
            try:
                client.send(datagram)  # never blocks; drops counted by the client
            except DatagramTooLarge:  # over the u16 frame: an interface MTU above 65503
                self.drops.add("datagram too large for udp2tcp")
        return []

    async def wait_writable(self) -> None:
        await self.client.wait_writable()

    def set_fwmark(self, mark: int) -> None:
        self.fwmark = mark
        self.client.set_fwmark(mark)

    def receivers(self) -> list[ReceiveFunc]:
        return [self._receive]

    def _on_datagrams(self, datagrams: list[bytes]) -> None:
        self.last_reply = time.time()
        inbox = self._inbox
        room = RECEIVE_QUEUE - len(inbox)
        if len(datagrams) > room:
            self.drops.add("receive queue full", len(datagrams) - max(room, 0))
            datagrams = datagrams[:max(room, 0)]
        inbox.extend(datagrams)
        self._arrived.set()

    async def _receive(self) -> list[Datagram]:
        while not self._inbox:
            if self._closed:
                raise trio.ClosedResourceError("transport closed")
            self._arrived = trio.Event()
            await self._arrived.wait()
        inbox, source = self._inbox, self._source
        n = min(len(inbox), BATCH)
        batch = [(inbox.popleft(), source) for _ in range(n)]
        self.received += n
        return batch

    def statistics(self) -> dict:
        stats = self.client.statistics()
        return {"kind": self.kind, "bridge": self.spec.redacted(), "connected": stats.connected,
                "sent": stats.sent, "received": stats.received,
                "dropped": stats.dropped + self.drops.total,
                "drop_reasons": {**stats.drop_reasons, **self.drops.reasons},
                "reconnects": stats.reconnects, "last_reply": self.last_reply}

    def close(self) -> None:
        self._closed = True
        self._arrived.set()
        self.client.disconnect()
