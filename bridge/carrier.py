"""Bridge carriers inside the engine: a bridged peer's WireGuard datagrams leave through a
Shadowsocks or udp-over-tcp client instead of the interface's UDP socket, in the same process.

    Device --(datagram, BridgedEndpoint)--> Engine._send --> carrier.send --> bridge server --> peer
    Device <--(datagram, BridgedEndpoint)-- deliver(batch) <-- carrier (receive task) <--

A bridged peer's endpoint is a BridgedEndpoint: the WireGuard endpoint as the bridge server sees
it (the Shadowsocks target; informational for udp2tcp, whose server has a fixed target) plus the
number of the carrier that reaches it. It is still an (ip, port) for `wg show` and cookies, and
the peer does not roam (Peer.roaming = False): an authentic packet that arrives some other way
is accepted but never moves the peer's traffic off the bridge.

Carriers never raise out of `send` and never stop on a network error: a socket that cannot be
opened or connected is retried with backoff (the route to the server may come up later), and
every datagram lost is counted by reason in `statistics()`. The Shadowsocks socket and the
udp2tcp connection carry the interface's fwmark, so a full tunnel's policy routing sends them
outside the tunnel; `set_fwmark` follows changes (Linux re-routes a socket whose mark changes).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Callable, NamedTuple

import trio

from .netio import Drops, errname
from .spec import BridgeSpec

log = logging.getLogger("wgpy.bridge")

BATCH = 128  # datagrams read per wakeup
MAX_DATAGRAM = 0xFFFF
SOCKET_BUFFER = 4 << 20  # requested SO_RCVBUF / SO_SNDBUF (best effort)
RETRY_MIN, RETRY_MAX = 0.1, 5.0  # backoff for a socket that cannot be opened or connected
# Send errors meaning the socket's source address or route is gone (the host moved to another
# network): a connected UDP socket keeps the source it was given, so only a new socket recovers.
REOPEN_ERRNOS = frozenset({errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENETUNREACH})


class BridgedEndpoint(NamedTuple):
    """A peer reached through carrier number `carrier`, at (host, port) as its server sees it."""

    host: str
    port: int
    carrier: int


Deliver = Callable[[list[tuple[bytes, BridgedEndpoint]]], None]


def open_reply(cipher, session, packet, now: float, drops: Drops):
    """(source address, payload) of a Shadowsocks reply from the server (`session`: the 2022
    client session, else AEAD-2017 `cipher`), or None after counting why it was dropped.
    Shared by the daemon's carrier and bridge.ss_local."""
    from .shadowsocks import ShadowsocksError
    from .shadowsocks.errors import AuthenticationError, ReplayError

    try:
        if session is not None:
            return session.open(packet, now)
        return cipher.open_udp(packet)
    except AuthenticationError:
        drops.add("reply failed authentication")
    except ReplayError:
        drops.add("reply replayed")
    except ShadowsocksError:
        drops.add("reply malformed")
    return None


class Carrier:
    """What the engine needs from any carrier."""

    def __init__(self, spec: BridgeSpec, ident: int, deliver: Deliver, fwmark: int) -> None:
        self.spec = spec
        self.ident = ident
        self.deliver = deliver
        self.fwmark = fwmark
        self.sent = 0  # datagrams handed to the network
        self.received = 0  # datagrams delivered to the device
        self.drops = Drops()
        self.scope = trio.CancelScope()  # the engine cancels it to stop the carrier

    def endpoint(self, target: tuple[str, int] | None) -> BridgedEndpoint:
        """The endpoint the device uses for a peer at `target` (the server's view) through us."""
        host, port = target if target is not None else self.spec.server
        return BridgedEndpoint(host, port, self.ident)

    @property
    def connected(self) -> bool:
        raise NotImplementedError

    def send(self, datagram: bytes, endpoint: BridgedEndpoint) -> None:
        raise NotImplementedError

    def set_fwmark(self, mark: int) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        raise NotImplementedError

    def statistics(self) -> dict:
        return {"bridge": self.spec.redacted(), "connected": self.connected, "sent": self.sent,
                "received": self.received, "dropped": self.drops.total,
                "drop_reasons": dict(self.drops.reasons)}


def open_carrier(spec: BridgeSpec, ident: int, deliver: Deliver, fwmark: int = 0) -> Carrier:
    if spec.kind == "udp2tcp":
        return Udp2TcpCarrier(spec, ident, deliver, fwmark)
    return ShadowsocksCarrier(spec, ident, deliver, fwmark)


class ShadowsocksCarrier(Carrier):
    """Shadowsocks UDP: every datagram sealed for the peer's endpoint (the target address inside
    the packet) and sent from one UDP socket connected to the server; replies opened, their
    source address becoming the endpoint the device sees them from."""

    def __init__(self, spec: BridgeSpec, ident: int, deliver: Deliver, fwmark: int) -> None:
        super().__init__(spec, ident, deliver, fwmark)
        from .shadowsocks import Udp2022Client, parse_uri

        self.cipher = parse_uri(spec.uri).cipher()
        # 2022: one client session for the carrier's life (session id, packet ids, replay window).
        self.session = Udp2022Client(self.cipher) if self.cipher.method.is_2022 else None
        self._sock: socket.socket | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def send(self, datagram: bytes, endpoint: BridgedEndpoint) -> None:
        from .shadowsocks import ShadowsocksError

        sock = self._sock
        if sock is None:
            self.drops.add("no socket to the server yet")
            return
        target = (endpoint.host, endpoint.port)
        try:
            if self.session is not None:
                packet = self.session.seal(target, datagram, time.time())
            else:
                packet = self.cipher.seal_udp(target, datagram)
        except ShadowsocksError as exc:  # a 2022 session out of packet ids, a bad clock
            self.drops.add(f"seal: {type(exc).__name__}")
            return
        try:
            sock.send(packet)
        except BlockingIOError:
            self.drops.add("server socket full")
            return
        except OSError as exc:  # EMSGSIZE (MTU too high for the bridge), ECONNREFUSED, EPERM
            self.drops.add(f"udp send: {errname(exc)}")
            if exc.errno in REOPEN_ERRNOS:
                self.reopen(errname(exc))
            return
        self.sent += 1

    def reopen(self, why: str) -> None:
        """Replace the socket (the receive task wakes, `run` opens a new one at once)."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        log.warning("bridge %s: new socket to the server (%s)", self.spec.redacted(), why)
        trio.lowlevel.notify_closing(sock)

    def set_fwmark(self, mark: int) -> None:
        self.fwmark = mark
        if self._sock is not None:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)

    async def run(self) -> None:
        delay = RETRY_MIN
        with self.scope:
            while True:
                try:
                    sock = self._open()
                except OSError as exc:
                    log.warning("bridge %s: cannot reach the server: %s; retrying in %.1f s",
                                self.spec.redacted(), exc.strerror or exc, delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                delay = RETRY_MIN
                log.info("bridge %s: carrier %d up", self.spec.redacted(), self.ident)
                self._sock = sock
                try:
                    await self._receive(sock)
                except trio.ClosedResourceError:
                    pass  # reopen(): a new socket now
                finally:
                    self._sock = None
                    sock.close()

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

    async def _receive(self, sock: socket.socket) -> None:
        buf = bytearray(MAX_DATAGRAM)
        view = memoryview(buf)
        drops, ident, session, cipher = self.drops, self.ident, self.session, self.cipher
        while True:
            await trio.lowlevel.wait_readable(sock)
            now = time.time()
            batch: list[tuple[bytes, BridgedEndpoint]] = []
            for _ in range(BATCH):
                try:
                    n = sock.recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EBADF:
                        return
                    drops.add(f"udp receive: {errname(exc)}")  # ICMP: the server port is closed
                    continue
                opened = open_reply(cipher, session, view[:n], now, drops)
                if opened is None:
                    continue
                source, payload = opened
                batch.append((payload, BridgedEndpoint(str(source[0]), int(source[1]), ident)))
            if batch:
                self.received += len(batch)
                self.deliver(batch)


class Udp2TcpCarrier(Carrier):
    """udp-over-tcp: one TCP connection to the server, kept up (bridge.udp2tcp.Udp2TcpClient).
    The framing carries no address, so replies are delivered as coming from the endpoint the
    peer was last sent to (or the server, before anything was sent)."""

    def __init__(self, spec: BridgeSpec, ident: int, deliver: Deliver, fwmark: int) -> None:
        super().__init__(spec, ident, deliver, fwmark)
        from .udp2tcp import Udp2TcpClient

        self.client = Udp2TcpClient(spec.server, on_datagrams=self._on_datagrams, fwmark=fwmark)
        self._source = self.endpoint(None)

    @property
    def connected(self) -> bool:
        return self.client.connected

    def send(self, datagram: bytes, endpoint: BridgedEndpoint) -> None:
        from .udp2tcp import DatagramTooLarge

        self._source = endpoint
        try:
            self.client.send(datagram)  # never blocks; drops counted by the client
        except DatagramTooLarge:  # over the u16 frame: an interface MTU above 65503
            self.drops.add("datagram too large for udp2tcp")

    def _on_datagrams(self, datagrams: list[bytes]) -> None:
        source = self._source
        self.deliver([(d, source) for d in datagrams])

    def set_fwmark(self, mark: int) -> None:
        self.fwmark = mark
        self.client.set_fwmark(mark)

    async def run(self) -> None:
        with self.scope:
            await self.client.run()

    def statistics(self) -> dict:
        stats = self.client.statistics()
        return {"bridge": self.spec.redacted(), "connected": stats.connected, "sent": stats.sent,
                "received": stats.received, "dropped": stats.dropped + self.drops.total,
                "drop_reasons": {**stats.drop_reasons, **self.drops.reasons},
                "reconnects": stats.reconnects}

