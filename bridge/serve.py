"""`wgpy bridge serve`: the server side of bridge mode (what a relay runs in front of WireGuard).

    wgpy bridge serve [--listen URI ...] [--config FILE] [--allow HOST:PORT ...] [-v]
    python -m bridge.serve --listen URI ...

Listeners:
  ss://METHOD:PASSWORD@HOST:PORT        Shadowsocks (SIP002 base64 user info, or plain
  ss://BASE64(METHOD:PASSWORD)@HOST:PORT  percent-encoded user info; parse_uri reads both).
                                        Serves UDP (AEAD-2017 and 2022) and TCP on HOST:PORT.
  ss://METHOD@HOST:PORT                  the same, the password taken from $WGPY_SS_PASSWORD
                                        (so that it is not in the process list).
  udp2tcp://HOST:PORT                   Mullvad udp-over-tcp (bridge.udp2tcp.serve); every
                                        connection is relayed to the FIRST --allow entry.
--config FILE                           a Shadowsocks listener from a file in ss-server's JSON
                                        shape: {"server": "0.0.0.0" (or a list), "server_port":
                                        8388, "password": "...", "method": "aes-256-gcm"}; the
                                        password may instead come from $WGPY_SS_PASSWORD. A file
                                        readable by every user is warned about.

--allow HOST:PORT (repeatable) is the complete list of targets clients may reach; HOST must be an
IP address. Default: 127.0.0.1:51820 and [::1]:51820 (the local WireGuard port). This is never an
open proxy: any other target, and any domain-name target, is refused.

Behaviour towards clients (anti-probing): a UDP packet that fails authentication, replays a salt
(or a 2022 packet id), is malformed, or names a target not allowed is dropped silently, counted by
reason and logged at debug level without secrets. A TCP stream that does so gets no reply: the
server reads and discards until the client closes, or until PROBE_TIMEOUT after the connection
was accepted, whatever was sent and whenever it failed (an incomplete header times out at the
same moment), so neither how many bytes were consumed nor the salt length shows. Salts are
remembered by count (SaltFilter), not for a time: a recorded AEAD-2017 stream does not replay later.

UDP: one outbound UDP socket per (client session, target), connected to the target, closed after
IDLE_TIMEOUT seconds without traffic; at most MAX_SESSIONS at once (a new one beyond evicts the
least recently active). A socket() that fails (EMFILE, EAFNOSUPPORT) drops the packet, counted.
Replies are sealed with the target as source address and sent back to the client.

TCP: at most MAX_TCP connections per listener and a quarter of that from one source (IPv4
address, IPv6 /64); beyond either, a new connection evicts one (udp2tcp.ConnectionSlots). Only
complete chunks count as activity for the idle timer, so a slowloris client is closed.

File descriptors: at start the soft RLIMIT_NOFILE is raised towards the hard limit (as far as the
caps need), and the caps above are lowered to fit what it allows, leaving headroom (derive_caps).

SIGINT / SIGTERM stop the server; statistics are logged at exit. Exit status: 0 after a signal,
2 for bad arguments, 1 when a listener cannot be opened.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from urllib.parse import quote, unquote

try:
    import resource
except ImportError:  # pragma: no cover - not Unix
    resource = None  # type: ignore[assignment]
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import trio

from transport.address import format_address
from transport.udp import GsoState, enable_gro, recv_datagrams, send_or_drop

from . import udp2tcp
from .netio import errname, leaf_exception, send_all
from .shadowsocks import (
    Address,
    AuthenticationError,
    Cipher,
    ReplayError,
    SaltFilter,
    ShadowsocksError,
    TcpDecryptor,
    TcpEncryptor,
    Udp2022Server,
    parse_uri,
)
from .shadowsocks.cipher import METHODS
from .shadowsocks.errors import ProtocolError

log = logging.getLogger("wgpy.bridge.serve")

PROG = "wgpy bridge serve"
DEFAULT_ALLOW: tuple[tuple[str, int], ...] = (("127.0.0.1", 51820), ("::1", 51820))
IDLE_TIMEOUT = 60.0  # seconds without traffic before a UDP session / TCP relay is closed
MAX_SESSIONS = 1024  # UDP sessions per listener (at most: derive_caps may lower it)
MAX_TCP = 512  # TCP connections per listener (at most: derive_caps may lower it)
PROBE_TIMEOUT = 30.0  # a failed TCP stream is closed this long after it was accepted
HANDSHAKE_TIMEOUT = PROBE_TIMEOUT  # a TCP client must have sent its target address by then
FD_HEADROOM = 64  # descriptors kept free of the caps (logs, resolver, trio, bursts of accepts)
PASSWORD_ENV = "WGPY_SS_PASSWORD"
BATCH = 64  # datagrams / accepts per wakeup
UDP_BUF = 65536
TCP_READ = 65536
SALT_FILTER_ENTRIES = 1 << 18


class ArgumentError(Exception):
    """A bad command-line argument (the message names it and never contains a secret)."""


# ---------------------------------------------------------------- allow list


def _norm_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class AllowList:
    # Targets whose verdict is remembered at most (a client sends to the same target packet after
    # packet, and parsing its address costs a tenth of the packet's CPU); past it, afresh.
    REMEMBERED = 1024

    def __init__(self, entries: Sequence[tuple[str, int]]) -> None:
        self.entries = [(str(h), int(p)) for h, p in entries]
        self._set = {(_norm_ip(h), p) for h, p in self.entries}
        self._verdicts: dict[tuple, bool] = {}

    def allows(self, target: tuple) -> bool:
        key = (target[0], target[1])
        verdict = self._verdicts.get(key)
        if verdict is None:
            ip = _norm_ip(str(target[0]))
            verdict = ip is not None and (ip, target[1]) in self._set
            if len(self._verdicts) >= self.REMEMBERED:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def __str__(self) -> str:
        return ", ".join(format_address(e) for e in self.entries)


# ---------------------------------------------------------------- statistics


@dataclass
class Stats:
    name: str
    udp_in: int = 0  # authentic client datagrams forwarded to a target
    udp_out: int = 0  # replies sealed and sent back to clients
    sessions_opened: int = 0
    sessions_idle: int = 0
    sessions_evicted: int = 0
    tcp_accepted: int = 0
    tcp_evicted: int = 0
    tcp_relayed: int = 0  # TCP streams that reached their target
    tcp_bytes_up: int = 0
    tcp_bytes_down: int = 0
    drops: Counter = field(default_factory=Counter)

    def drop(self, reason: str, detail: str = "", n: int = 1) -> None:
        self.drops[reason] += n
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: dropped (%s)%s", self.name, reason, f" {detail}" if detail else "")

    def summary(self) -> str:
        parts = [f"udp in {self.udp_in}", f"udp out {self.udp_out}",
                 f"sessions {self.sessions_opened} (idle-closed {self.sessions_idle}, "
                 f"evicted {self.sessions_evicted})",
                 f"tcp accepted {self.tcp_accepted} (evicted {self.tcp_evicted})",
                 f"tcp relayed {self.tcp_relayed}",
                 f"tcp bytes up {self.tcp_bytes_up} down {self.tcp_bytes_down}"]
        drops = ", ".join(f"{k} {v}" for k, v in sorted(self.drops.items())) or "none"
        return f"{self.name}: " + "; ".join(parts) + f"; dropped: {drops}"


def _fmt(addr: tuple) -> str:
    return format_address((str(addr[0]), addr[1]))


# ---------------------------------------------------------------- sockets


def _bind(host: str, port: int, type_: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=type_, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, type_ | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if type_ == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        if type_ == socket.SOCK_STREAM:
            sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


def _target_sockaddr(target: tuple) -> tuple[int, tuple]:
    ip = _norm_ip(str(target[0]))
    assert ip is not None  # only allowed (IP) targets get here
    if ip.version == 4:
        return socket.AF_INET, (str(ip), target[1])
    return socket.AF_INET6, (str(ip), target[1], 0, 0)


# ---------------------------------------------------------------- file descriptors


@dataclass(frozen=True)
class Caps:
    udp_sessions: int  # per Shadowsocks listener (1 descriptor each)
    tcp: int  # per Shadowsocks listener (2 descriptors each)
    udp2tcp: int  # per udp2tcp listener (2 descriptors each)


def fds_wanted(n_ss: int, n_u2t: int, open_fds: int = 0) -> int:
    """Descriptors the default caps need, with headroom."""
    return (open_fds + FD_HEADROOM + n_ss * (MAX_SESSIONS + 2 * MAX_TCP + 2)
            + n_u2t * (2 * udp2tcp.MAX_CONNECTIONS + 1))


def derive_caps(nofile: int, n_ss: int, n_u2t: int, open_fds: int = 0) -> Caps:
    """The per-listener caps that fit in `nofile` descriptors, `open_fds` being in use already:
    the default caps, lowered when the limit is smaller. Headroom (FD_HEADROOM, less for tiny
    limits) stays free; each listener gets an equal share, a Shadowsocks listener half of it for
    UDP sessions and half for TCP connections."""
    headroom = max(8, min(FD_HEADROOM, nofile // 8))
    budget = nofile - open_fds - headroom - 2 * n_ss - n_u2t
    share = max(0, budget) // max(1, n_ss + n_u2t)
    return Caps(udp_sessions=max(1, min(MAX_SESSIONS, share // 2)),
                tcp=max(1, min(MAX_TCP, share // 4)),
                udp2tcp=max(1, min(udp2tcp.MAX_CONNECTIONS, share // 2)))


def raise_nofile_limit(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit, as far as `want`; return the soft limit
    now in force (`want` when unlimited or unknown)."""
    if resource is None:  # pragma: no cover - not Unix
        return want
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return want
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("%s: cannot raise the open-file limit from %d to %d: %s", PROG, soft,
                        target, exc)
    return soft


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - no /proc
        return 16


def plan_caps(n_ss: int, n_u2t: int) -> Caps:
    """Raise the descriptor limit for these listeners and derive the caps from it (logged)."""
    used = open_fds()
    nofile = raise_nofile_limit(fds_wanted(n_ss, n_u2t, used))
    caps = derive_caps(nofile, n_ss, n_u2t, used)
    log.info("%s: open-file limit %d: per listener at most %d UDP sessions and %d TCP "
             "connections (Shadowsocks), %d connections (udp2tcp)", PROG, nofile,
             caps.udp_sessions, caps.tcp, caps.udp2tcp)
    return caps


# ---------------------------------------------------------------- Shadowsocks UDP


class _UdpSession:
    __slots__ = ("key", "client", "target", "sock", "last_active", "session_id", "scope")

    def __init__(self, key: tuple, client: tuple, target: Address, sock: socket.socket,
                 session_id: bytes | None) -> None:
        self.key = key
        self.client = client
        self.target = target
        self.sock = sock
        # Traffic stamps this (cheap); the idle deadline is only moved when it expires, since
        # moving a trio deadline costs ~5 us, as much as opening the packet.
        self.last_active = trio.current_time()
        self.session_id = session_id
        self.scope = trio.CancelScope()  # cancelled when the session is evicted


class ShadowsocksServer:
    """UDP and TCP Shadowsocks on one host:port, relaying only to allowed targets."""

    def __init__(self, cipher: Cipher, host: str, port: int, allow: AllowList, *,
                 idle_timeout: float = IDLE_TIMEOUT, max_sessions: int = MAX_SESSIONS,
                 max_tcp: int | None = None, max_tcp_per_source: int | None = None) -> None:
        self.cipher = cipher
        self.is_2022 = cipher.method.is_2022
        self.host, self.port = host, port
        self.allow = allow
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self.name = f"ss {cipher.method.name} {_fmt((host, port))}"
        self.stats = Stats(self.name)
        self.udp_salts = SaltFilter(max_entries=SALT_FILTER_ENTRIES)
        self.tcp_salts = SaltFilter(max_entries=SALT_FILTER_ENTRIES)
        # Its table costs no descriptors; ours (self.sessions) is the one evicting.
        self.udp2022 = (Udp2022Server(cipher, max_sessions=4 * max(max_sessions, 1024))
                        if self.is_2022 else None)
        # Least recently active first (a session moves to the end on traffic).
        self.sessions: dict[tuple, _UdpSession] = {}
        self.tcp_slots = udp2tcp.ConnectionSlots(MAX_TCP if max_tcp is None else max_tcp,
                                                 max_tcp_per_source)
        self.tcp_active = 0
        self.udp_sock: socket.socket | None = None
        self.tcp_sock: socket.socket | None = None
        # The listening socket's and the session sockets' GSO refusals (logged, not drops).
        self._gso = GsoState()

    def open(self) -> None:
        self.udp_sock = _bind(self.host, self.port, socket.SOCK_DGRAM)
        try:
            self.tcp_sock = _bind(self.host, self.port, socket.SOCK_STREAM)
        except BaseException:
            self.udp_sock.close()
            raise

    def close(self) -> None:
        for s in (self.udp_sock, self.tcp_sock):
            if s is not None:
                s.close()

    async def run(self) -> None:
        assert self.udp_sock is not None and self.tcp_sock is not None
        log.info("%s: listening (UDP+TCP), allowed targets: %s", self.name, self.allow)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._udp_loop, nursery)
                nursery.start_soon(self._tcp_accept_loop, nursery)
        finally:
            for s in list(self.sessions.values()):
                s.sock.close()
            self.sessions.clear()
            self.close()

    # ---- UDP, client -> target

    async def _udp_loop(self, nursery: trio.Nursery) -> None:
        sock = self.udp_sock
        assert sock is not None
        buf = bytearray(UDP_BUF)
        view = memoryview(buf)
        while True:
            await trio.lowlevel.wait_readable(sock)
            # Each session's payloads of this batch, in arrival order, sent after the batch: a
            # client's burst (WireGuard datagrams of one size) then leaves in one sendmsg.
            pending: dict[_UdpSession, list[bytes]] = {}
            for _ in range(BATCH):
                try:
                    n, client = sock.recvfrom_into(buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    self.stats.drop(f"receive {errname(exc)}")
                    continue
                opened = self._udp_packet(bytes(view[:n]), client, nursery)
                if opened is not None:
                    session, payload = opened
                    queued = pending.get(session)
                    if queued is None:
                        pending[session] = [payload]
                    else:
                        queued.append(payload)
            for session, payloads in pending.items():
                self._to_target(session, payloads)

    def _to_target(self, session: _UdpSession, payloads: list[bytes]) -> None:
        """Send a session's payloads to its target. A session evicted meanwhile still has its
        socket (its task closes it, and has not run since): they go out as they would have
        before the eviction."""
        sent, failed = send_or_drop(session.sock, payloads, None, self._gso)
        self.stats.udp_in += sent
        for exc, m in failed:  # EAGAIN, ECONNREFUSED (target not up), EMSGSIZE: count, go on
            self.stats.drop(f"send {errname(exc)}", n=m)

    def _udp_packet(self, packet: bytes, client: tuple,
                    nursery: trio.Nursery) -> tuple[_UdpSession, bytes] | None:
        """The session an authentic packet belongs to (opened now if new) and its payload, or
        None after counting why it was dropped."""
        stats = self.stats
        session_id = None
        try:
            if self.udp2022 is not None:
                opened = self.udp2022.open(packet, time.time())
                session_id, target, payload = opened.session_id, opened.target, opened.payload
            else:
                target, payload = self.cipher.open_udp(packet, salt_filter=self.udp_salts,
                                                       now=time.monotonic())
        except ReplayError:
            stats.drop("replay", f"from {_fmt(client)}")
            return None
        except AuthenticationError:
            stats.drop("authentication", f"from {_fmt(client)}")
            return None
        except ProtocolError:
            stats.drop("malformed", f"from {_fmt(client)}")
            return None
        except ShadowsocksError:  # pragma: no cover - the codec raises ProtocolError only
            stats.drop("malformed", f"from {_fmt(client)}")
            return None
        if not self.allow.allows(target):
            stats.drop("target not allowed", f"{_fmt(client)} -> {_fmt(target)}")
            return None
        key = (session_id if session_id is not None else client, tuple(target))
        sessions = self.sessions
        session = sessions.pop(key, None)
        if session is None:
            if len(sessions) >= self.max_sessions:
                self._evict_session()
            family, sockaddr = _target_sockaddr(target)
            try:
                out = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                    | socket.SOCK_CLOEXEC)
            except OSError as exc:  # EMFILE, EAFNOSUPPORT ([::1] without IPv6): a drop
                stats.drop(f"socket {errname(exc)}", _fmt(target))
                return None
            try:
                out.connect(sockaddr)
            except OSError as exc:
                out.close()
                stats.drop(f"connect {errname(exc)}", _fmt(target))
                return None
            # The target WireGuard's replies come in GSO bursts (wgpy, wireguard-go): with GRO a
            # burst is one read in _udp_replies, not one syscall a datagram (transport/udp.py).
            enable_gro(out)
            session = _UdpSession(key, client, target, out, session_id)
            sessions[key] = session
            stats.sessions_opened += 1
            log.debug("%s: session %s -> %s opened", self.name, _fmt(client), _fmt(target))
            nursery.start_soon(self._udp_session, session)
        else:
            sessions[key] = session  # back in, at the end: the most recently active
            session.client = client  # 2022: a session follows its client's latest address
            session.last_active = trio.current_time()
        return session, payload

    def _evict_session(self) -> None:
        """Make room: close the least recently active session (the first in the table)."""
        key = next(iter(self.sessions))
        victim = self.sessions.pop(key)
        victim.scope.cancel()
        self.stats.sessions_evicted += 1
        log.debug("%s: session %s -> %s evicted (table full)", self.name, _fmt(victim.client),
                  _fmt(victim.target))

    # ---- UDP, target -> client

    async def _udp_session(self, session: _UdpSession) -> None:
        try:
            with session.scope:
                while True:
                    with trio.move_on_at(session.last_active + self.idle_timeout):
                        await self._udp_replies(session)
                    if trio.current_time() - session.last_active >= self.idle_timeout:
                        break
                    # Traffic came after the deadline was set: wait again, from the latest packet.
                self.stats.sessions_idle += 1
                log.debug("%s: session %s -> %s idle, closed", self.name, _fmt(session.client),
                          _fmt(session.target))
        finally:
            if self.sessions.get(session.key) is session:
                del self.sessions[session.key]
            session.sock.close()

    async def _udp_replies(self, session: _UdpSession) -> None:
        sock = session.sock
        listen = self.udp_sock
        assert listen is not None
        buf = bytearray(UDP_BUF)
        bufs, view = [buf], memoryview(buf)
        sessions = self.sessions
        while True:
            await trio.lowlevel.wait_readable(sock)
            session.last_active = trio.current_time()
            if sessions.pop(session.key, None) is session:
                sessions[session.key] = session  # to the end: the most recently active
            # Sealed as read, sent after the batch: equal-sized payloads seal to equal-sized
            # replies, which leave in one sendmsg a run (UDP GSO).
            replies: list[bytes] = []
            count = 0
            for _ in range(BATCH):  # reads; and about BATCH datagrams (a read is taken whole)
                try:
                    payloads, _ = recv_datagrams(sock, bufs, view)
                except BlockingIOError:
                    break
                except OSError as exc:  # ECONNREFUSED from an earlier send
                    self.stats.drop(f"target receive {errname(exc)}")
                    continue
                for payload in payloads:
                    try:
                        if self.udp2022 is not None:
                            reply = self.udp2022.seal(session.session_id, session.target,
                                                      payload, time.time())
                        else:
                            reply = self.cipher.seal_udp(session.target, payload)
                    except ShadowsocksError:  # e.g. the 2022 session expired meanwhile
                        self.stats.drop("reply: session gone")
                        continue
                    replies.append(reply)
                count += len(payloads)
                if count >= BATCH:
                    break
            sent, failed = send_or_drop(listen, replies, session.client, self._gso)
            self.stats.udp_out += sent
            for exc, m in failed:
                self.stats.drop(f"reply send {errname(exc)}", n=m)

    # ---- TCP

    async def _tcp_accept_loop(self, nursery: trio.Nursery) -> None:
        listener = self.tcp_sock
        assert listener is not None
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(BATCH):
                try:
                    conn, peer = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    self.stats.drop(f"accept {errname(exc)}")
                    await trio.sleep(0.1)
                    break
                self.tcp_active += 1
                self.stats.tcp_accepted += 1
                slot = self.tcp_slots.admit(peer, trio.current_time())  # may evict another
                nursery.start_soon(self._tcp_connection, conn, peer, slot)

    def _now(self) -> float:
        return time.time()

    async def _tcp_connection(self, conn: socket.socket, peer: tuple,
                              slot: udp2tcp.Slot) -> None:
        accepted = trio.current_time()  # every failure is closed on one schedule from here
        target_sock: socket.socket | None = None
        try:
            with slot.scope:
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                dec = TcpDecryptor(self.cipher, expect_target=True, salt_filter=self.tcp_salts)
                pending: list[bytes] = []
                reason = None
                with trio.move_on_at(accepted + HANDSHAKE_TIMEOUT) as handshake:
                    while dec.target is None and reason is None:
                        await trio.lowlevel.wait_readable(conn)
                        try:
                            data = conn.recv(TCP_READ)
                        except BlockingIOError:
                            continue
                        if not data:
                            return  # closed before a target: nothing to do
                        try:
                            pending += dec.feed(data, self._now())
                        except ReplayError:
                            reason = "replay"
                        except AuthenticationError:
                            reason = "authentication"
                        except ShadowsocksError:
                            reason = "malformed"
                if handshake.cancelled_caught:
                    reason = "handshake timeout"
                target = dec.target
                if reason is None and target is not None and not self.allow.allows(target):
                    reason = "target not allowed"
                if reason is not None:
                    self.stats.drop(f"tcp {reason}", f"from {_fmt(peer)}")
                    await self._drain(conn, accepted + PROBE_TIMEOUT)
                    return
                assert target is not None
                self.tcp_slots.touch(slot, trio.current_time())
                family, sockaddr = _target_sockaddr(target)
                try:
                    target_sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                                | socket.SOCK_CLOEXEC)
                except OSError as exc:  # EMFILE, EAFNOSUPPORT: a drop
                    self.stats.drop(f"tcp socket {errname(exc)}", _fmt(target))
                    return
                err = target_sock.connect_ex(sockaddr)
                if err == errno.EINPROGRESS:
                    with trio.move_on_after(10):
                        await trio.lowlevel.wait_writable(target_sock)
                    err = target_sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or (
                        0 if _connected(target_sock) else errno.ETIMEDOUT)
                if err:
                    self.stats.drop(f"tcp connect {errno.errorcode.get(err, err)}", _fmt(target))
                    return
                target_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.stats.tcp_relayed += 1
                log.debug("%s: tcp %s -> %s", self.name, _fmt(peer), _fmt(target))
                if pending:
                    data = b"".join(pending)
                    await send_all(target_sock, data)
                    self.stats.tcp_bytes_up += len(data)
                enc = (TcpEncryptor(self.cipher, request_salt=dec.salt) if self.is_2022
                       else TcpEncryptor(self.cipher))
                idle = trio.CancelScope(deadline=trio.current_time() + self.idle_timeout)
                with idle:
                    async with trio.open_nursery() as nursery:
                        done = [0]
                        nursery.start_soon(self._tcp_up, conn, target_sock, dec, idle, nursery,
                                           done, slot)
                        nursery.start_soon(self._tcp_down, target_sock, conn, enc, idle, nursery,
                                           done, slot)
            if slot.evicted:
                self.stats.tcp_evicted += 1
                log.debug("%s: tcp %s evicted to make room", self.name, _fmt(peer))
        except OSError as exc:
            log.debug("%s: tcp %s: %s", self.name, _fmt(peer), errname(exc))
        finally:
            self.tcp_active -= 1
            self.tcp_slots.release(slot)
            if target_sock is not None:
                target_sock.close()
            conn.close()

    async def _drain(self, conn: socket.socket, deadline: float) -> None:
        """Read and discard until the client closes or `deadline` (one schedule for every failed
        stream, whatever it sent): reveal nothing."""
        with trio.move_on_at(deadline):
            while True:
                await trio.lowlevel.wait_readable(conn)
                try:
                    if not conn.recv(TCP_READ):
                        return
                except BlockingIOError:
                    continue
                except OSError:
                    return

    async def _tcp_up(self, conn: socket.socket, target: socket.socket, dec: TcpDecryptor,
                      idle: trio.CancelScope, nursery: trio.Nursery, done: list[int],
                      slot: udp2tcp.Slot) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(conn)
                try:
                    data = conn.recv(TCP_READ)
                except BlockingIOError:
                    continue
                if not data:
                    dec.feed_eof()
                    target.shutdown(socket.SHUT_WR)
                    break
                pieces = dec.feed(data, self._now())
                if pieces:  # only complete chunks count as activity (slowloris)
                    now = trio.current_time()
                    idle.deadline = now + self.idle_timeout
                    self.tcp_slots.touch(slot, now)
                    out = b"".join(pieces)
                    await send_all(target, out)
                    self.stats.tcp_bytes_up += len(out)
        except ShadowsocksError:
            self.stats.drop("tcp stream corrupt")
            nursery.cancel_scope.cancel()
            return
        except OSError:
            nursery.cancel_scope.cancel()
            return
        done[0] += 1
        if done[0] == 2:
            nursery.cancel_scope.cancel()

    async def _tcp_down(self, target: socket.socket, conn: socket.socket, enc: TcpEncryptor,
                        idle: trio.CancelScope, nursery: trio.Nursery, done: list[int],
                        slot: udp2tcp.Slot) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(target)
                try:
                    data = target.recv(TCP_READ)
                except BlockingIOError:
                    continue
                now = trio.current_time()
                idle.deadline = now + self.idle_timeout
                self.tcp_slots.touch(slot, now)
                if not data:
                    if not enc.started:
                        await send_all(conn, enc.encrypt(b"", self._now()))
                    conn.shutdown(socket.SHUT_WR)
                    break
                await send_all(conn, enc.encrypt(data, self._now()))
                self.stats.tcp_bytes_down += len(data)
        except OSError:
            nursery.cancel_scope.cancel()
            return
        done[0] += 1
        if done[0] == 2:
            nursery.cancel_scope.cancel()


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- command line


@dataclass
class Options:
    ss: list[tuple[Cipher, str, int]]
    udp2tcp: list[tuple[str, int]]
    allow: AllowList
    verbose: bool = False
    caps: Caps | None = None  # None: plan_caps() at start


USAGE = (f"usage: {PROG} [--listen URI ...] [--config FILE] [--allow HOST:PORT ...] [-v]\n"
         "  URI: ss://METHOD:PASSWORD@HOST:PORT (or SIP002 base64) | udp2tcp://HOST:PORT\n"
         f"       ss://METHOD@HOST:PORT takes the password from ${PASSWORD_ENV}\n"
         "  --config FILE: a Shadowsocks listener in ss-server's JSON shape:\n"
         '       {"server": "0.0.0.0", "server_port": 8388, "password": "...", '
         '"method": "aes-256-gcm"}\n'
         f"       (mode 0600; without \"password\", ${PASSWORD_ENV} is used)\n"
         "  --allow: targets clients may reach (IP:PORT); default 127.0.0.1:51820 and [::1]:51820\n"
         "  udp2tcp listeners relay to the first --allow entry")


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep else ""


def _parse_hostport(text: str, what: str) -> tuple[str, int]:
    try:
        host, port = udp2tcp.parse_hostport(text)
    except udp2tcp.UsageError:
        raise ArgumentError(f"{what}: expected HOST:PORT (IPv6 as [ADDR]:PORT)") from None
    if not 1 <= port <= 65535:
        raise ArgumentError(f"{what}: port out of range 1..65535")
    return host, port


def _ss_listener(uri: str, what: str, env: dict) -> tuple[Cipher, str, int]:
    """An ss:// listener; `ss://METHOD@HOST:PORT` takes the password from the environment."""
    rest = uri.partition("://")[2]
    info, at, hostport = rest.rpartition("@")
    method = unquote(info)
    if at and ":" not in method and method.lower() in METHODS:
        password = env.get(PASSWORD_ENV)
        if not password:
            raise ArgumentError(f"{what}: the URI has no password and ${PASSWORD_ENV} is not set")
        uri = f"ss://{quote(method, safe='')}:{quote(password, safe='')}@{hostport}"
    try:
        config = parse_uri(uri)
        if config.plugin:
            raise ArgumentError(f"{what}: plugins are not supported")
        return config.cipher(), config.host, config.port
    except ShadowsocksError as exc:
        raise ArgumentError(f"{what}: {_oneline(exc)}") from None


def load_config(path: str, env: dict) -> list[tuple[Cipher, str, int]]:
    """Shadowsocks listeners from a file in ss-server's JSON shape (one per "server" address).
    Errors name the file and what is wrong, never the password; a file readable by every user
    gets a warning on stderr."""
    what = f"--config {path}"
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(1 << 20)
    except OSError as exc:
        raise ArgumentError(f"{what}: cannot read it: {exc.strerror or exc}") from None
    if mode & 0o004:
        print(f"{PROG}: warning: {path} is readable by every user and holds the password: "
              f"chmod 600 {path}", file=sys.stderr)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArgumentError(f"{what}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:  # its message quotes no content, only a position
        raise ArgumentError(f"{what}: not valid JSON: line {exc.lineno} column {exc.colno}: "
                            f"{exc.msg}") from None
    if not isinstance(data, dict):
        raise ArgumentError(f'{what}: expected a JSON object like {{"server": "0.0.0.0", '
                            f'"server_port": 8388, "password": "...", "method": "aes-256-gcm"}}')
    servers = data.get("server", "0.0.0.0")
    if isinstance(servers, str):
        servers = [servers]
    if (not isinstance(servers, list) or not servers
            or not all(isinstance(h, str) and h.strip() for h in servers)):
        raise ArgumentError(f'{what}: "server" must be an address or a list of addresses')
    port = data.get("server_port")
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if port is None:
        raise ArgumentError(f'{what}: "server_port" is missing')
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ArgumentError(f'{what}: "server_port" must be a port number 1..65535')
    method = data.get("method")
    if not isinstance(method, str) or not method:
        raise ArgumentError(f'{what}: "method" is missing (e.g. "aes-256-gcm")')
    password = data.get("password")
    if password is None:
        password = env.get(PASSWORD_ENV)
        if not password:
            raise ArgumentError(f'{what}: "password" is missing and ${PASSWORD_ENV} is not set')
    elif not isinstance(password, str) or not password:
        raise ArgumentError(f'{what}: "password" must be a non-empty string')
    if data.get("plugin"):
        raise ArgumentError(f'{what}: "plugin": plugins are not supported')
    try:
        cipher = Cipher(method, password)
    except ShadowsocksError as exc:
        raise ArgumentError(f"{what}: {_oneline(exc)}") from None
    out = []
    for host in servers:
        host = host.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        out.append((cipher, host, port))
    return out


def parse_args(argv: Sequence[str], env: dict | None = None) -> Options:
    """The options of `wgpy bridge serve`. `env` (default os.environ) supplies $WGPY_SS_PASSWORD."""
    if env is None:
        env = dict(os.environ)
    listens: list[str] = []
    allows: list[str] = []
    configs: list[str] = []
    verbose = False
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in ("-h", "--help"):
            raise SystemExit(_help())
        if name in ("-v", "--verbose") and not eq:
            verbose = True
        elif name in ("--listen", "--allow", "--config"):
            if not eq:
                if i >= len(args):
                    raise ArgumentError(f"{name}: needs a value")
                value = args[i]
                i += 1
            {"--listen": listens, "--allow": allows, "--config": configs}[name].append(value)
        else:
            shown = name if name.startswith("-") and "@" not in name and len(name) < 40 else None
            raise ArgumentError(f"unknown argument {shown!r}" if shown
                                else f"unexpected argument #{i} (not shown: it may hold a secret)")
    if not listens and not configs:
        raise ArgumentError("--listen or --config: at least one listener is required")
    allow_entries = []
    for n, text in enumerate(allows, 1):
        host, port = _parse_hostport(text, f"--allow {text!r}")
        if _norm_ip(host) is None:
            raise ArgumentError(f"--allow {text!r}: HOST must be an IP address")
        allow_entries.append((host, port))
    allow = AllowList(allow_entries or DEFAULT_ALLOW)
    ss: list[tuple[Cipher, str, int]] = []
    u2t: list[tuple[str, int]] = []
    for path in configs:
        ss += load_config(path, env)
    for n, uri in enumerate(listens, 1):
        scheme = _scheme(uri)
        what = f"--listen #{n} ({scheme or '?'}://)"
        if scheme == "ss":
            ss.append(_ss_listener(uri, what, env))
        elif scheme == "udp2tcp":
            rest = uri.partition("://")[2].rstrip("/")
            if "@" in rest:
                raise ArgumentError(f"{what}: udp2tcp takes no user info")
            u2t.append(_parse_hostport(rest, what))
        else:
            raise ArgumentError(f"--listen #{n}: unknown scheme (use ss:// or udp2tcp://)")
    return Options(ss, u2t, allow, verbose)


def _oneline(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _help() -> int:
    print(USAGE)
    return 0


async def _run(opts: Options, ready: list[str]) -> dict[str, Stats]:
    servers = []
    stats: dict[str, Stats] = {}
    caps = opts.caps or plan_caps(len(opts.ss), len(opts.udp2tcp))
    try:
        for cipher, host, port in opts.ss:
            s = ShadowsocksServer(cipher, host, port, opts.allow, max_sessions=caps.udp_sessions,
                                  max_tcp=caps.tcp)
            s.open()
            servers.append(s)
            stats[s.name] = s.stats
    except OSError:
        for s in servers:
            s.close()
        raise
    u2t_servers: list = []
    async with trio.open_nursery() as nursery:
        async def stop_on_signal(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                task_status.started()
                async for signum in signals:
                    log.info("%s: %s, stopping", PROG, signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

        await nursery.start(stop_on_signal)
        for s in servers:
            nursery.start_soon(s.run)
            ready.append(s.name)
        for host, port in opts.udp2tcp:
            forward = opts.allow.entries[0]
            u = await nursery.start(
                lambda task_status, h=host, p=port, f=forward: udp2tcp.serve(
                    (h, p), opts.allow.entries, forward=f, max_connections=caps.udp2tcp,
                    task_status=task_status))
            u2t_servers.append(u)
            ready.append(f"udp2tcp {_fmt(u.local_address)} -> {_fmt(forward)}")
        print(f"{PROG}: ready: " + "; ".join(ready), flush=True)
    for u in u2t_servers:
        st = u.statistics()
        log.info("udp2tcp %s: accepted %d (evicted %d), to udp %d, to tcp %d, dropped %d %s",
                 _fmt(u.local_address), st.accepted, st.evicted, st.to_udp, st.to_tcp,
                 st.dropped, st.drop_reasons)
    return stats


def main(argv: list[str] | None = None) -> int:
    """`wgpy bridge serve ARGS`: argv is the arguments after `serve`."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        opts = parse_args(argv)
    except ArgumentError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.DEBUG if opts.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    ready: list[str] = []
    stats: dict[str, Stats] = {}
    try:
        stats = trio.run(_run, opts, ready)
    except KeyboardInterrupt:
        pass
    except (OSError, udp2tcp.Udp2TcpError, BaseExceptionGroup) as exc:
        leaf = leaf_exception(exc)
        if isinstance(leaf, (OSError, udp2tcp.Udp2TcpError)):
            print(f"{PROG}: cannot serve: {_oneline(leaf)}", file=sys.stderr)
            return 1
        raise
    for st in stats.values():
        log.info("%s", st.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
