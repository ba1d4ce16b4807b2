"""udp-over-tcp with Mullvad's framing (mullvad/udp-over-tcp): WireGuard datagrams carried over one
TCP connection, for networks that only let TCP through.

Wire format (the whole protocol): every datagram is preceded by its length as an unsigned 16-bit
big-endian integer. Nothing else: no handshake, no target address, no keepalive.

    client side                                        server side
    UDP app --> LocalForwarder --> Udp2TcpClient ==TCP==> Udp2TcpServer --> UDP target (fixed)
              <--                <--                   <==               <--

Layers:
    encode / encode_batch / FrameDecoder   sans-IO framing; no sockets, no trio, no clock
    Udp2TcpClient                          trio: one TCP connection, kept up (reconnect, backoff)
    LocalForwarder, run_local_forwarder    trio: a local UDP port whose one peer talks through it
    Udp2TcpServer, serve                   trio: TCP listener, one connected UDP socket per client
    python -m bridge.udp2tcp server|client the same as a command

I/O follows tunnel/engine.py: stdlib non-blocking sockets, trio.lowlevel.wait_readable/writable,
and each wakeup drains what is there (bounded) before waiting again.

Facts taken from mullvad/udp-over-tcp, and where we decide differently:
  * Zero-length frames are valid and carry an empty datagram (Mullvad splits off a 0-byte datagram
    and sends it as an empty UDP datagram; its own tests send one). We do the same, both ways.
  * A frame's length is at most 65535 (u16). Mullvad's server reads into a 65535-byte buffer, so a
    frame announcing more than 65533 bytes can never complete and the connection ends; a datagram
    the UDP socket refuses (EMSGSIZE) also ends it. We make that explicit: the server refuses frames
    longer than the largest UDP payload towards its target (65507 IPv4, 65527 IPv6) with
    FrameTooLarge and closes the connection. The client accepts anything up to 65535.
  * TCP_NODELAY: Mullvad has a --nodelay flag and its relays run with it; we always set it (one
    WireGuard packet per segment, no Nagle delay).
  * Mullvad's server ends a connection on any UDP send error. We count the drop and go on instead:
    an ICMP port unreachable on the connected UDP socket (the target restarting) or one oversized
    datagram should not cost the client its TCP connection. TCP errors, EOF, and protocol errors end
    the connection, as in Mullvad.
  * Idle timeout: Mullvad has --tcp-recv-timeout (its relays use 130 s): no bytes from the TCP
    client for that long closes the connection. Default IDLE_TIMEOUT = 130 s here too, but only a
    complete frame resets it: a client dribbling one byte now and then (slowloris) is closed.
  * Slots (ConnectionSlots): at most MAX_CONNECTIONS at once and max(1, max_connections // 4) from
    one source (an IPv4 address, an IPv6 /64). A new connection beyond either cap evicts, among
    the connections of that source or of all, one that never sent a complete frame (the oldest
    first), else the least recently active: one source, or many idle connections, can never
    lock everyone else out. Mullvad refuses nothing; we never refuse either.
  * Accept errors (EMFILE...) are followed by a cool-down doubling from 50 ms to 5 s (Mullvad), so a
    full fd table cannot turn the accept loop into a busy loop.
  * Target selection: the framing carries no address, so a client can never choose where its
    datagrams go; the server forwards every connection to one fixed target (Mullvad's
    --udp-forward). `serve(listen, allow, forward=None)`: `forward` must be one of `allow`; without
    `forward`, `allow` must hold exactly one address, which is the target. (`allow` keeps the API
    the same shape as the other bridges; a configuration naming a target outside it is refused.)
  * The client connects at once (not, as Mullvad's udp2tcp, on the first datagram) and reconnects
    whenever the connection breaks: exponential backoff 50 ms .. 5 s with +-20% jitter; the delay
    returns to 50 ms after a connection that stayed up for STABLE_AFTER seconds. Datagrams sent while
    disconnected are dropped and counted, as UDP would lose them; `send` never blocks.
  * MTU: the 2-byte header travels inside a TCP stream, which the kernel segments to the path, so
    unlike Shadowsocks this bridge needs no lower tunnel MTU (datagrams up to 65535 bytes fit).
    The cost is TCP's: head-of-line blocking and retransmission under the tunnel's own.
  * The local forwarder remembers the first local address that sends to it and connects its UDP
    socket there (Mullvad's udp2tcp does the same): one local flow per forwarder; datagrams from
    any other address are dropped and counted.
"""

from __future__ import annotations

import argparse
import errno
import functools
import ipaddress
import logging
import random
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import trio

from transport.address import AddressError, format_address, split_host_port
from transport.base import Drops
from transport.udp import GsoState, enable_gro, recv_datagrams, send_datagrams, send_or_drop

from .netio import errname, exit_code, resolve, send_all

log = logging.getLogger("wgpy.udp2tcp")

HEADER_LEN = 2
MAX_DATAGRAM = 0xFFFF  # what a u16 length can announce
MAX_UDP_PAYLOAD_V4 = 65535 - 20 - 8
MAX_UDP_PAYLOAD_V6 = 65535 - 8

BATCH = 128  # UDP datagrams read per wakeup
TCP_READ_SIZE = 256 * 1024
TCP_READS_PER_WAKEUP = 8
MAX_PENDING = 1 << 20  # client: bytes of frames waiting for TCP send space before new ones drop
RECEIVE_QUEUE = 1024  # client without a callback: datagrams waiting for receive()
CONNECT_TIMEOUT = 5.0
BACKOFF_MIN = 0.05
BACKOFF_MAX = 5.0
STABLE_AFTER = 1.0
IDLE_TIMEOUT = 130.0
MAX_CONNECTIONS = 256
PER_SOURCE_DIVISOR = 4  # one source may hold at most max_connections // 4 (at least 1)

Address = tuple[str, int]

_HDR = struct.Struct("!H")


# ---------------------------------------------------------------- errors


class Udp2TcpError(Exception):
    """Base of every error this module raises on purpose."""


class ProtocolError(Udp2TcpError):
    """The peer's bytes are not valid udp-over-tcp. `datagrams` holds what was decoded from the
    same input before the violation; the stream cannot be resynchronised afterwards."""

    def __init__(self, message: str, datagrams: list[bytes] | None = None) -> None:
        super().__init__(message)
        self.datagrams = datagrams if datagrams is not None else []


class FrameTooLarge(ProtocolError):
    """A frame header announces more bytes than the decoder's limit."""

    def __init__(self, length: int, limit: int, datagrams: list[bytes] | None = None) -> None:
        super().__init__(f"frame of {length} bytes exceeds the limit of {limit}", datagrams)
        self.length = length
        self.limit = limit


class UsageError(Udp2TcpError, ValueError):
    """The caller misused the API (bad configuration, a datagram that cannot be framed)."""


class DatagramTooLarge(UsageError):
    def __init__(self, length: int) -> None:
        super().__init__(f"datagram of {length} bytes cannot be framed (at most {MAX_DATAGRAM})")
        self.length = length


# ---------------------------------------------------------------- sans-IO framing


def encode(datagram: bytes) -> bytes:
    """One frame: u16 big-endian length, then the datagram. Raises DatagramTooLarge over 65535."""
    n = len(datagram)
    if n > MAX_DATAGRAM:
        raise DatagramTooLarge(n)
    return _HDR.pack(n) + bytes(datagram)


def encode_batch(datagrams: Iterable[bytes]) -> bytes:
    """The frames of several datagrams, concatenated (one TCP send)."""
    parts = []
    pack = _HDR.pack
    for d in datagrams:
        n = len(d)
        if n > MAX_DATAGRAM:
            raise DatagramTooLarge(n)
        parts.append(pack(n))
        parts.append(d)
    return b"".join(parts)


class FrameDecoder:
    """Turns a TCP byte stream, cut anywhere, back into datagrams.

    Between calls it keeps at most one incomplete frame: `buffered` < HEADER_LEN + max_datagram.
    A header announcing more than `max_datagram` raises FrameTooLarge (a ProtocolError); the
    decoder is then broken and every later feed raises ProtocolError. Nothing else is raised for
    any input."""

    __slots__ = ("max_datagram", "_buf", "_need", "_error")

    def __init__(self, max_datagram: int = MAX_DATAGRAM) -> None:
        if not 0 <= max_datagram <= MAX_DATAGRAM:
            raise UsageError(f"max_datagram must be within 0..{MAX_DATAGRAM}")
        self.max_datagram = max_datagram
        self._buf = bytearray()
        self._need = 0  # total size of the frame in _buf once its header is known, else 0
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._error is not None:
            raise ProtocolError(f"stream already broken: {self._error}")
        out: list[bytes] = []
        mv = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        n = len(mv)
        pos = 0
        buf = self._buf
        limit = self.max_datagram
        if buf:  # complete the frame left over from the last call first
            if len(buf) < HEADER_LEN:
                take = min(HEADER_LEN - len(buf), n)
                buf += mv[:take]
                pos = take
                if len(buf) < HEADER_LEN:
                    return out
                length = (buf[0] << 8) | buf[1]
                if length > limit:
                    self._fail(FrameTooLarge(length, limit, out))
                self._need = HEADER_LEN + length
            take = min(self._need - len(buf), n - pos)
            buf += mv[pos:pos + take]
            pos += take
            if len(buf) < self._need:
                return out
            out.append(bytes(buf[HEADER_LEN:]))
            buf.clear()
            self._need = 0
        while n - pos >= HEADER_LEN:
            length = (mv[pos] << 8) | mv[pos + 1]
            if length > limit:
                self._fail(FrameTooLarge(length, limit, out))
            end = pos + HEADER_LEN + length
            if end > n:
                self._need = HEADER_LEN + length
                break
            out.append(bytes(mv[pos + HEADER_LEN:end]))
            pos = end
        if pos < n:
            buf += mv[pos:]
        return out

    def _fail(self, exc: ProtocolError) -> None:
        self._error = exc
        self._buf.clear()
        self._need = 0
        raise exc


# ---------------------------------------------------------------- I/O helpers


def parse_hostport(text: str) -> Address:
    """A command-line address: "H:P" or "[v6]:P" -> (host, port); port 0 allowed (a listening
    address: any port). Raises UsageError naming the value and what is wrong."""
    try:
        return split_host_port(text, port_zero=True)
    except AddressError as exc:
        raise UsageError(f"expected HOST:PORT (IPv6 as [ADDR]:PORT), got {text!r}: {exc}") from None


def _same_address(a: Address, b: Address) -> bool:
    if a[1] != b[1]:
        return False
    try:
        return ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0])
    except ValueError:
        return a[0] == b[0]


def _set_nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _recv_frames(sock: socket.socket, decoder: FrameDecoder,
                       view: memoryview) -> tuple[list[bytes], bool]:
    """Wait until `sock` is readable once, then drain it (bounded). Returns (datagrams, eof).
    Raises OSError, or ProtocolError (with the datagrams decoded before the violation)."""
    await trio.lowlevel.wait_readable(sock)
    out: list[bytes] = []
    size = len(view)
    for _ in range(TCP_READS_PER_WAKEUP):
        try:
            n = sock.recv_into(view)
        except BlockingIOError:
            break
        if n == 0:
            return out, True
        try:
            out += decoder.feed(view[:n])
        except ProtocolError as exc:
            exc.datagrams = out + exc.datagrams
            raise
        if n < size:
            break  # most likely drained; the next wakeup will tell
    return out, False


class _Backoff:
    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high
        self.current = low

    def reset(self) -> None:
        self.current = self.low

    def next_delay(self) -> float:
        delay = self.current
        self.current = min(self.current * 2, self.high)
        return delay * random.uniform(0.8, 1.2)


# ---------------------------------------------------------------- client


@dataclass
class ClientStatistics:
    connected: bool
    sent: int  # datagrams accepted into a TCP stream
    received: int  # datagrams decoded from the server
    dropped: int
    reconnects: int  # successful connections after the first
    connect_failures: int
    protocol_errors: int
    drop_reasons: dict[str, int] = field(default_factory=dict)


class Udp2TcpClient:
    """One TCP connection to a udp-over-tcp server, kept up while `run` runs.

        client = Udp2TcpClient(("203.0.113.5", 443), on_datagrams=handle_batch)
        await nursery.start(client.run)
        client.send(datagram)            # synchronous, never blocks; dropped while disconnected

    Received datagrams go to `on_datagrams(list_of_datagrams)` (called synchronously, one list per
    wakeup), or, without a callback, into a bounded queue read by `await receive()` or
    `async for datagram in client`.

    `send` writes straight to the socket when it can; what the kernel does not take waits in a
    user-space buffer of at most `max_pending` bytes, flushed by a writer task; beyond that new
    datagrams are dropped (counted), as a full UDP socket buffer would."""

    def __init__(self, server: Address, *,
                 on_datagrams: Callable[[list[bytes]], None] | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 backoff_min: float = BACKOFF_MIN, backoff_max: float = BACKOFF_MAX,
                 max_pending: int = MAX_PENDING, receive_queue: int = RECEIVE_QUEUE,
                 fwmark: int = 0) -> None:
        self.server = server
        self.on_datagrams = on_datagrams
        self.connect_timeout = connect_timeout
        self.max_pending = max_pending
        self.fwmark = fwmark
        self._backoff = _Backoff(backoff_min, backoff_max)
        self._sock: socket.socket | None = None
        self._conn_scope: trio.CancelScope | None = None
        self._pending = bytearray()
        self._pending_count = 0
        self._flush = trio.Event()
        self._drained = trio.Event()
        self._connected = trio.Event()
        self._queue_send, self._queue_recv = trio.open_memory_channel[bytes](receive_queue)
        self._drops = Drops()
        self._sent = 0
        self._received = 0
        self._connects = 0
        self._connect_failures = 0
        self._protocol_errors = 0

    # ---- public API

    @property
    def connected(self) -> bool:
        return self._sock is not None

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            connected=self.connected, sent=self._sent, received=self._received,
            dropped=self._drops.total, reconnects=max(0, self._connects - 1),
            connect_failures=self._connect_failures, protocol_errors=self._protocol_errors,
            drop_reasons=dict(self._drops.reasons),
        )

    @property
    def would_block(self) -> bool:
        """The user-space send buffer is half full: a caller that can wait should (see
        `wait_writable`) rather than have datagrams dropped when it fills."""
        return self._sock is not None and len(self._pending) >= self.max_pending // 2

    async def wait_writable(self) -> None:
        """Return when `would_block` is false (the writer drained, or the connection is gone)."""
        while self.would_block:
            self._drained = trio.Event()
            await self._drained.wait()

    def send(self, datagram: bytes) -> None:
        self.send_batch((datagram,))

    def send_batch(self, datagrams: Sequence[bytes]) -> None:
        """Frame and send; never blocks. Raises DatagramTooLarge (nothing is sent then)."""
        frames = encode_batch(datagrams)
        count = len(datagrams)
        sock = self._sock
        if sock is None:
            self._drops.add("not connected", count)
            return
        if self._pending:
            if len(self._pending) + len(frames) > self.max_pending:
                self._drops.add("send buffer full", count)
                return
            self._pending += frames
            self._pending_count += count
            self._sent += count
            return
        try:
            n = sock.send(frames)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._drops.add(f"tcp send: {errname(exc)}", count)
            self._break(f"send failed: {exc}")
            return
        self._sent += count
        if n < len(frames):
            self._pending += memoryview(frames)[n:]
            self._pending_count += count
            self._flush.set()

    async def receive(self) -> bytes:
        """The next received datagram (only without an `on_datagrams` callback)."""
        return await self._queue_recv.receive()

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._queue_recv.receive()
        except trio.EndOfChannel:  # pragma: no cover - the channel is never closed
            raise StopAsyncIteration

    def set_fwmark(self, mark: int) -> None:
        """Mark the connection's packets from now on (Linux re-routes a socket whose mark
        changes), and every later connection."""
        self.fwmark = mark
        if self._sock is not None:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)

    def disconnect(self) -> None:
        """Drop the current connection (it is re-established after the backoff delay)."""
        self._break("disconnect requested")

    # ---- the connection loop

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and reconnect whenever the connection breaks, until cancelled. Reports
        started at once (sends before the first connection are dropped; see wait_connected)."""
        task_status.started(self)
        while True:
            try:
                sock = await self._connect()
            except OSError as exc:
                self._connect_failures += 1
                log.info("udp2tcp: connecting to %s failed: %s", format_address(self.server), exc)
            else:
                self._connects += 1
                log.info("udp2tcp: connected to %s/TCP", format_address(self.server))
                started = trio.current_time()
                await self._run_connection(sock)
                if trio.current_time() - started >= STABLE_AFTER:
                    self._backoff.reset()
            await trio.sleep(self._backoff.next_delay())

    async def _connect(self) -> socket.socket:
        family, sockaddr = await resolve(self.server, socket.SOCK_STREAM)
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            _set_nodelay(sock)
            if self.fwmark:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.fwmark)
            err = sock.connect_ex(sockaddr)
            if err == errno.EINPROGRESS:
                with trio.move_on_after(self.connect_timeout) as timeout:
                    await trio.lowlevel.wait_writable(sock)
                if timeout.cancelled_caught:
                    raise OSError(errno.ETIMEDOUT, "connect timed out")
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, errno.errorcode.get(err, str(err)))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _run_connection(self, sock: socket.socket) -> None:
        self._pending = bytearray()
        self._pending_count = 0
        self._flush = trio.Event()
        self._sock = sock
        self._connected.set()
        try:
            with trio.CancelScope() as scope:
                self._conn_scope = scope
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, sock, nursery.cancel_scope)
                    nursery.start_soon(self._writer, sock, nursery.cancel_scope)
        finally:
            self._sock = None
            self._conn_scope = None
            self._connected = trio.Event()
            self._drops.add("lost with the connection", self._pending_count)
            self._pending = bytearray()
            self._pending_count = 0
            self._drained.set()
            sock.close()
            log.info("udp2tcp: connection to %s closed", format_address(self.server))

    def _break(self, why: str) -> None:
        if self._conn_scope is not None:
            log.info("udp2tcp: dropping connection to %s: %s", format_address(self.server), why)
            self._sock = None  # sends drop from now on; the connection task closes the socket
            self._conn_scope.cancel()

    async def _reader(self, sock: socket.socket, done: trio.CancelScope) -> None:
        decoder = FrameDecoder()
        view = memoryview(bytearray(TCP_READ_SIZE))
        try:
            while True:
                datagrams, eof = await _recv_frames(sock, decoder, view)
                if datagrams:
                    self._deliver(datagrams)
                if eof:
                    log.info("udp2tcp: server closed the connection")
                    break
        except ProtocolError as exc:
            self._protocol_errors += 1
            if exc.datagrams:
                self._deliver(exc.datagrams)
            log.warning("udp2tcp: protocol error from server: %s", exc)
        except OSError as exc:
            log.info("udp2tcp: receive failed: %s", exc)
        done.cancel()

    def _deliver(self, datagrams: list[bytes]) -> None:
        self._received += len(datagrams)
        if self.on_datagrams is not None:
            self.on_datagrams(datagrams)
            return
        for d in datagrams:
            try:
                self._queue_send.send_nowait(d)
            except trio.WouldBlock:
                self._drops.add("receive queue full")

    async def _writer(self, sock: socket.socket, done: trio.CancelScope) -> None:
        try:
            while True:
                await self._flush.wait()
                self._flush = trio.Event()
                while self._pending:
                    await trio.lowlevel.wait_writable(sock)
                    try:
                        n = sock.send(self._pending)
                    except BlockingIOError:
                        continue
                    del self._pending[:n]
                    self._drained.set()
                self._pending_count = 0
        except OSError as exc:
            log.info("udp2tcp: send failed: %s", exc)
            done.cancel()


# ---------------------------------------------------------------- local forwarder


class LocalForwarder:
    """A local UDP socket bound to `listen`; datagrams from the first local address that sends
    (remembered, the socket is connected to it) go to `server` over TCP, replies come back to it."""

    def __init__(self, listen: Address, server: Address, **client_options) -> None:
        self.listen = listen
        self.client = Udp2TcpClient(server, on_datagrams=self._to_local, **client_options)
        self.local_address: tuple | None = None  # where we are bound (after run started)
        self.peer: tuple | None = None
        self._sock: socket.socket | None = None
        self._drops = Drops()
        self._gso = GsoState()  # a refusal is logged, not a drop: nothing is lost

    def statistics(self) -> dict:
        stats = self.client.statistics()
        return {
            "client": stats,
            "local_drops": dict(self._drops.reasons),
            "peer": self.peer,
        }

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        family, sockaddr = await resolve(self.listen, socket.SOCK_DGRAM, passive=True)
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.bind(sockaddr)
            # The local WireGuard (wgpy, wireguard-go) sends bursts with UDP GSO: with GRO a
            # burst is one read here, not one syscall a datagram (see transport/udp.py).
            enable_gro(sock)
            self._sock = sock
            self.local_address = sock.getsockname()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.client.run)
                log.info("udp2tcp: forwarding UDP %s to %s/TCP", format_address(self.local_address),
                         format_address(self.client.server))
                task_status.started(self)
                await self._from_local(sock)
        finally:
            self._sock = None
            sock.close()

    async def _from_local(self, sock: socket.socket) -> None:
        buf = bytearray(MAX_DATAGRAM)
        bufs, view = [buf], memoryview(buf)
        client = self.client
        while True:
            await trio.lowlevel.wait_readable(sock)
            batch: list[bytes] = []
            for _ in range(BATCH):  # reads; and about BATCH datagrams (a read is taken whole)
                try:
                    datagrams, addr = recv_datagrams(sock, bufs, view)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # ICMP errors from the local peer (ECONNREFUSED); nothing to act on
                if addr != self.peer:
                    if self.peer is not None:
                        self._drops.add("not the local peer")
                        continue
                    self.peer = addr
                    sock.connect(addr)
                    log.info("udp2tcp: local peer is %s", format_address(addr))
                batch += datagrams
                if len(batch) >= BATCH:
                    break
            if batch:
                client.send_batch(batch)

    def _to_local(self, datagrams: list[bytes]) -> None:
        sock = self._sock
        if sock is None or self.peer is None:
            self._drops.add("no local peer yet", len(datagrams))
            return
        # A TCP read's datagrams in one sendmsg a run of equal sizes (UDP GSO): the local
        # WireGuard reads a burst with GRO, or the kernel cuts it into the same datagrams again.
        for exc, m in send_or_drop(sock, datagrams, None, self._gso)[1]:
            if isinstance(exc, BlockingIOError):
                self._drops.add("local socket full", m)
            else:
                self._drops.add(f"udp send: {errname(exc)}", m)


async def run_local_forwarder(listen: Address, server: Address, *,
                              task_status=trio.TASK_STATUS_IGNORED, **client_options) -> None:
    """Run a LocalForwarder until cancelled; `task_status.started(forwarder)` once bound (its
    `local_address` tells the port when `listen` asked for port 0)."""
    await LocalForwarder(listen, server, **client_options).run(task_status=task_status)


# ---------------------------------------------------------------- server


def source_key(peer: tuple) -> str:
    """Who a connection comes from, for per-source caps: the IPv4 address (also when written as
    ::ffff:a.b.c.d), or the /64 of an IPv6 address (one host often holds a whole /64)."""
    host = str(peer[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class Slot:
    """One admitted connection: enter `scope` around its work; eviction cancels it."""

    __slots__ = ("source", "last_active", "framed", "scope", "evicted")

    def __init__(self, source: str, now: float) -> None:
        self.source = source
        self.last_active = now
        self.framed = False  # has it ever sent a complete frame / chunk?
        self.scope = trio.CancelScope()
        self.evicted = False


class ConnectionSlots:
    """The connection table of a TCP server that must not be held by one prober (slowloris).

    `admit(peer)` always admits: beyond `max_per_source` connections from the peer's source, or
    `max_total` in all, it first evicts a victim among that source's connections or all of them.
    The victim is a connection that never completed a frame (oldest first), else the least
    recently active one. `touch(slot)` marks progress (call it for complete frames or chunks only,
    never for bare bytes); `release(slot)` when the connection ends. Sans-IO apart from the
    CancelScope it hands out; `now` comes from the caller."""

    def __init__(self, max_total: int, max_per_source: int | None = None) -> None:
        if max_total < 1:
            raise UsageError("max_total must be at least 1")
        self.max_total = max_total
        self.max_per_source = max(1, max_per_source if max_per_source is not None
                                  else max_total // PER_SOURCE_DIVISOR)
        self._never: dict[Slot, None] = {}  # no complete frame yet, in admission order
        self._active: dict[Slot, None] = {}  # framed, least recently active first
        self._by_source: dict[str, dict[Slot, None]] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._never) + len(self._active)

    def count(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def admit(self, peer: tuple, now: float) -> Slot:
        source = source_key(peer)
        mine = self._by_source.get(source)
        if mine is not None and len(mine) >= self.max_per_source:
            self._evict(min(mine, key=lambda s: (s.framed, s.last_active)))
        if len(self) >= self.max_total:
            self._evict(next(iter(self._never)) if self._never else next(iter(self._active)))
        slot = Slot(source, now)
        self._never[slot] = None
        self._by_source.setdefault(source, {})[slot] = None
        return slot

    def touch(self, slot: Slot, now: float) -> None:
        slot.last_active = now
        if slot.evicted:
            return
        if not slot.framed:
            slot.framed = True
            self._never.pop(slot, None)
        else:
            self._active.pop(slot, None)
        self._active[slot] = None  # to the end: most recently active

    def release(self, slot: Slot) -> None:
        self._never.pop(slot, None)
        self._active.pop(slot, None)
        mine = self._by_source.get(slot.source)
        if mine is not None:
            mine.pop(slot, None)
            if not mine:
                del self._by_source[slot.source]

    def _evict(self, slot: Slot) -> None:
        self.release(slot)
        slot.evicted = True
        slot.scope.cancel()
        self.evicted += 1


@dataclass
class ServerStatistics:
    active: int
    accepted: int
    refused: int  # always 0 now: beyond the caps a connection evicts another (see `evicted`)
    accept_errors: int
    closed_idle: int
    protocol_errors: int
    to_udp: int  # datagrams forwarded TCP -> UDP
    to_tcp: int  # datagrams forwarded UDP -> TCP
    dropped: int
    drop_reasons: dict[str, int] = field(default_factory=dict)
    evicted: int = 0  # connections closed to make room for a new one (see ConnectionSlots)


class Udp2TcpServer:
    """Accepts udp-over-tcp connections on `listen`; each gets its own UDP socket connected to the
    target (see `serve`)."""

    def __init__(self, listen: Address, allow: Sequence[Address], *, forward: Address | None = None,
                 max_connections: int = MAX_CONNECTIONS, idle_timeout: float = IDLE_TIMEOUT,
                 max_per_source: int | None = None) -> None:
        allow = [tuple(a) for a in allow]
        if forward is None:
            if len(allow) != 1:
                raise UsageError("udp2tcp forwards to one fixed target: give `forward`, or exactly "
                                 f"one allowed address (got {len(allow)})")
            forward = allow[0]
        elif not any(_same_address(tuple(forward), a) for a in allow):
            raise UsageError(f"forward target {format_address(forward)} is not in the allowed list")
        if max_connections < 1:
            raise UsageError("max_connections must be at least 1")
        self.listen = listen
        self.forward: Address = tuple(forward)  # type: ignore[assignment]
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.slots = ConnectionSlots(max_connections, max_per_source)
        self.local_address: tuple | None = None
        self._target: tuple[int, tuple] | None = None
        self._active = 0
        self._accepted = 0
        self._refused = 0
        self._accept_errors = 0
        self._closed_idle = 0
        self._protocol_errors = 0
        self._to_udp = 0
        self._to_tcp = 0
        self._drops = Drops()
        self._gso = GsoState()  # the target sockets' refusals: logged, not drops

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            active=self._active, accepted=self._accepted, refused=self._refused,
            accept_errors=self._accept_errors, closed_idle=self._closed_idle,
            protocol_errors=self._protocol_errors, to_udp=self._to_udp, to_tcp=self._to_tcp,
            dropped=self._drops.total, drop_reasons=dict(self._drops.reasons),
            evicted=self.slots.evicted,
        )

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._target = await resolve(self.forward, socket.SOCK_DGRAM)
        family, sockaddr = await resolve(self.listen, socket.SOCK_STREAM, passive=True)
        listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind(sockaddr)
            listener.listen(1024)
            self.local_address = listener.getsockname()
            log.info("udp2tcp server: listening on %s/TCP, forwarding to %s/UDP",
                     format_address(self.local_address), format_address(self.forward))
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                await self._accept_loop(listener, nursery)
        finally:
            listener.close()

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        cooldown = _Backoff(0.05, 5.0)
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(BATCH):
                try:
                    conn, peer = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    # EMFILE and friends leave the connection queued: wait, or this busy-loops.
                    self._accept_errors += 1
                    log.error("udp2tcp server: accept failed: %s", exc)
                    await trio.sleep(cooldown.next_delay())
                    break
                cooldown.reset()
                self._accepted += 1
                self._active += 1  # counted here so a burst of accepts respects the limit
                slot = self.slots.admit(peer, trio.current_time())  # may evict another
                nursery.start_soon(self._connection, conn, peer, slot)

    async def _connection(self, tcp: socket.socket, peer: tuple, slot: Slot) -> None:
        assert self._target is not None
        family, target = self._target
        udp: socket.socket | None = None
        try:
            with slot.scope:
                tcp.setblocking(False)
                _set_nodelay(tcp)
                try:
                    udp = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                        | socket.SOCK_CLOEXEC)
                except OSError as exc:  # EMFILE: a drop, not the end of the server
                    self._drops.add(f"udp socket: {errname(exc)}")
                    return
                udp.connect(target)
                # The target WireGuard's replies come in GSO bursts (wgpy, wireguard-go): with
                # GRO a burst is one read (see transport/udp.py).
                enable_gro(udp)
                log.debug("udp2tcp server: %s connected", format_address(peer))
                limit = MAX_UDP_PAYLOAD_V6 if family == socket.AF_INET6 else MAX_UDP_PAYLOAD_V4
                idle = trio.CancelScope(deadline=trio.current_time() + self.idle_timeout)
                with idle:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._tcp_to_udp, tcp, udp, FrameDecoder(limit), idle,
                                           nursery.cancel_scope, peer, slot)
                        nursery.start_soon(self._udp_to_tcp, udp, tcp, nursery.cancel_scope, peer)
                if idle.cancelled_caught:
                    self._closed_idle += 1
                    log.info("udp2tcp server: %s idle for %.0f s, closed", format_address(peer),
                             self.idle_timeout)
            if slot.evicted:
                log.info("udp2tcp server: %s evicted to make room (%d connections, %d from its "
                         "source at most)", format_address(peer), self.slots.max_total,
                         self.slots.max_per_source)
        except OSError as exc:
            log.error("udp2tcp server: %s: %s", format_address(peer), exc)
        finally:
            self._active -= 1
            self.slots.release(slot)
            if udp is not None:
                udp.close()
            tcp.close()
            log.debug("udp2tcp server: %s closed", format_address(peer))

    async def _tcp_to_udp(self, tcp: socket.socket, udp: socket.socket, decoder: FrameDecoder,
                          idle: trio.CancelScope, done: trio.CancelScope, peer: tuple,
                          slot: Slot) -> None:
        view = memoryview(bytearray(TCP_READ_SIZE))
        try:
            while True:
                datagrams, eof = await _recv_frames(tcp, decoder, view)
                if datagrams:  # only complete frames count as activity (slowloris)
                    now = trio.current_time()
                    idle.deadline = now + self.idle_timeout
                    self.slots.touch(slot, now)
                    await self._send_udp(udp, datagrams)
                if eof:
                    break
        except ProtocolError as exc:
            self._protocol_errors += 1
            log.warning("udp2tcp server: %s: %s; closing", format_address(peer), exc)
            if exc.datagrams:
                await self._send_udp(udp, exc.datagrams)
        except OSError as exc:
            log.info("udp2tcp server: %s: TCP receive failed: %s", format_address(peer), exc)
        done.cancel()

    async def _send_udp(self, udp: socket.socket, datagrams: list[bytes]) -> None:
        # A TCP read's datagrams in one sendmsg a run of equal sizes (UDP GSO). A full socket is
        # waited for once per send that finds it full; failing again, that send's datagrams
        # are dropped.
        n = len(datagrams)
        i = 0
        waited = -1  # the index whose send already waited for room
        while i < n:
            stop, exc, m = send_datagrams(udp, datagrams, None, self._gso, i)
            self._to_udp += stop - i
            if exc is None:
                break
            if isinstance(exc, BlockingIOError) and waited != stop:
                waited = i = stop
                await trio.lowlevel.wait_writable(udp)
                continue
            # ECONNREFUSED (the target is not listening right now), EMSGSIZE: count, go on.
            self._drops.add(f"udp send: {errname(exc)}", m)
            i = stop + m

    async def _udp_to_tcp(self, udp: socket.socket, tcp: socket.socket, done: trio.CancelScope,
                          peer: tuple) -> None:
        # A read may hold many datagrams (GRO): each becomes header and datagram in the join,
        # copied twice as a frame built in the buffer would be (once out of it, once joined).
        buf = bytearray(MAX_DATAGRAM)
        bufs, view = [buf], memoryview(buf)
        pack = _HDR.pack
        try:
            while True:
                await trio.lowlevel.wait_readable(udp)
                pieces: list[bytes] = []
                count = 0
                for _ in range(BATCH):  # reads; and about BATCH datagrams (a read is taken whole)
                    try:
                        datagrams, _ = recv_datagrams(udp, bufs, view)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        self._drops.add(f"udp receive: {errname(exc)}")
                        continue
                    for d in datagrams:
                        pieces.append(pack(len(d)))
                        pieces.append(d)
                    count += len(datagrams)
                    if count >= BATCH:
                        break
                if pieces:
                    await send_all(tcp, b"".join(pieces))
                    self._to_tcp += count
        except OSError as exc:
            log.info("udp2tcp server: %s: TCP send failed: %s", format_address(peer), exc)
        done.cancel()


async def serve(listen: Address, allow: Sequence[Address], *, forward: Address | None = None,
                max_connections: int = MAX_CONNECTIONS, idle_timeout: float = IDLE_TIMEOUT,
                max_per_source: int | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run a udp-over-tcp server until cancelled; `task_status.started(server)` once listening.

    Every connection is relayed to one fixed UDP target: `forward`, which must be in `allow`, or,
    without `forward`, the single address in `allow` (UsageError otherwise). At most
    `max_connections` at once, and `max_per_source` (default max_connections // 4) from one
    source: a connection beyond either evicts another (see ConnectionSlots); a connection that
    sends no complete frame for `idle_timeout` seconds is closed, and with it its UDP socket."""
    server = Udp2TcpServer(listen, allow, forward=forward, max_connections=max_connections,
                           idle_timeout=idle_timeout, max_per_source=max_per_source)
    await server.run(task_status=task_status)


# ---------------------------------------------------------------- command line


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bridge.udp2tcp",
                                description="udp-over-tcp (Mullvad framing) client and server")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server", help="accept TCP, forward to a fixed UDP target")
    s.add_argument("--listen", required=True, type=parse_hostport, help="TCP HOST:PORT")
    s.add_argument("--forward", required=True, type=parse_hostport, help="UDP target HOST:PORT")
    s.add_argument("--allow", action="append", type=parse_hostport, default=None,
                   help="allowed targets (default: the --forward target)")
    s.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    s.add_argument("--max-per-source", type=int, default=None,
                   help="connections from one IPv4 address or IPv6 /64 (default: max/4)")
    s.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT)
    c = sub.add_parser("client", help="a local UDP port forwarded over TCP")
    c.add_argument("--listen", required=True, type=parse_hostport, help="local UDP HOST:PORT")
    c.add_argument("--server", required=True, type=parse_hostport, help="server TCP HOST:PORT")
    c.add_argument("--fwmark", type=lambda v: int(v, 0), default=0)
    return p


async def _main_async(args: argparse.Namespace) -> None:
    async with trio.open_nursery() as nursery:
        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        if args.mode == "server":
            server = await nursery.start(functools.partial(
                serve, args.listen, args.allow or [args.forward], forward=args.forward,
                max_connections=args.max_connections, idle_timeout=args.idle_timeout,
                max_per_source=args.max_per_source))
            print(f"udp2tcp server: listening on {format_address(server.local_address)}/TCP, "
                  f"forwarding to {format_address(server.forward)}/UDP", flush=True)
        else:
            fwd = await nursery.start(functools.partial(
                run_local_forwarder, args.listen, args.server, fwmark=args.fwmark))
            print(f"udp2tcp client: listening on {format_address(fwd.local_address)}/UDP, "
                  f"server {format_address(args.server)}/TCP", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        trio.run(_main_async, args)
    except (Udp2TcpError, OSError, BaseExceptionGroup) as exc:
        code = exit_code("udp2tcp", exc, UsageError)
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
