"""The client side of the Shadowsocks UDP carrier: a local UDP port whose one peer (normally a
WireGuard interface, Endpoint = this port) talks to a fixed target through a Shadowsocks server.

    client side                                                   server side
    WireGuard --> SsLocalForwarder 127.0.0.1:P --UDP (sealed)--> ss-server / wgpy bridge serve --> target
              <--                               <--(sealed)---                                <--

    python -m bridge.ss_local --listen H:P --server-uri ss://... --target H:P [--fwmark N]

Same shape as bridge.udp2tcp's LocalForwarder:
  * the first local source address that sends is remembered and the local socket is connected to
    it; datagrams from any other address are dropped and counted;
  * every datagram from it is sealed for `target` (AEAD-2017: Cipher.seal_udp, a fresh salt per
    packet; 2022: one Udp2022Client session per forwarder, Udp2022Client.seal with the wall clock)
    and sent from ONE UDP socket, connected to the server, marked with SO_MARK=fwmark when nonzero
    (so a full tunnel's policy routing sends it outside the tunnel);
  * replies are opened; anything that fails (wrong key, replay, malformed, an old 2022 session) is
    dropped silently and counted by reason; the payload goes back to the local peer;
  * stdlib non-blocking sockets + trio.lowlevel.wait_readable, each wakeup drains up to BATCH
    datagrams.

For wireguard-go or the kernel module; wgpy-daemon carries a bridge itself (bridge/carrier.py,
`wgpy set IFNAME peer KEY bridge URI`).

MTU: every WireGuard datagram grows by up to `overhead(server_uri, target)` bytes on the way to the
server (AEAD-2017: salt + SOCKS address + tag; 2022: separate header + tag + main header +
address, no padding since WireGuard never sends an empty datagram). Lower the tunnel MTU by that
much; the outer packet is then `overhead + 28` (IPv4+UDP) bytes bigger than the WireGuard
datagram, `overhead + 48` over IPv6.

A datagram the socket refuses (EMSGSIZE, ENOBUFS, ECONNREFUSED from an ICMP error) is dropped and
counted; nothing here ever ends the forwarder except cancellation.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import trio

from .shadowsocks import Cipher, ShadowsocksError, Udp2022Client, parse_uri
from .carrier import open_reply
from .netio import Drops, errname, exit_code, format_address, resolve, split_hostport
from .spec import BridgeError, parse_bridge

log = logging.getLogger("wgpy.ss_local")

PROG = "ss_local"
BATCH = 128  # datagrams read per wakeup, each direction
MAX_DATAGRAM = 0xFFFF
SOCKET_BUFFER = 1 << 20  # requested SO_RCVBUF / SO_SNDBUF on both sockets (best effort)

Address = tuple[str, int]


class SsLocalError(Exception):
    """Base of every error this module raises on purpose."""


class UsageError(SsLocalError, ValueError):
    """Bad configuration (URI, method, target)."""


def _cipher(server_uri: str) -> tuple[Any, Cipher]:
    try:
        config = parse_uri(server_uri)
        if config.plugin:
            raise UsageError("ss URI: plugins are not supported")
        return config, config.cipher()
    except ShadowsocksError as exc:  # messages never contain the password
        raise UsageError(str(exc)) from None


def overhead(server_uri: str, target: Any) -> int:
    """What the tunnel MTU must leave for this bridge (bridge.spec.BridgeSpec.overhead: the larger
    direction, outer IP/UDP headers not counted: add 28 for IPv4, 48 for IPv6)."""
    _cipher(server_uri)  # the same checks and errors as the forwarder
    try:
        return parse_bridge(server_uri).overhead(target)
    except BridgeError as exc:
        raise UsageError(str(exc)) from None


@dataclass
class Statistics:
    peer: tuple | None
    sent: int  # datagrams sealed and sent to the server
    received: int  # replies opened and delivered to the local peer
    dropped: int
    drop_reasons: dict[str, int] = field(default_factory=dict)


class SsLocalForwarder:
    """A local UDP socket bound to `listen`; datagrams from the first local address that sends go
    sealed to the Shadowsocks server of `server_uri`, addressed to `target`; replies come back.

        fwd = await nursery.start(SsLocalForwarder(("127.0.0.1", 0), uri, ("127.0.0.1", 51820)).run)
        fwd.local_address   # where WireGuard's Endpoint should point
    """

    def __init__(self, listen: Address, server_uri: str, target: Address, *, fwmark: int = 0) -> None:
        config, cipher = _cipher(server_uri)
        self.listen = tuple(listen)
        self.server: Address = (config.host, config.port)
        self.target: Address = (str(target[0]), int(target[1]))
        self.fwmark = fwmark
        self.cipher = cipher
        self.is_2022 = cipher.method.is_2022
        self.session: Udp2022Client | None = Udp2022Client(cipher) if self.is_2022 else None
        self.overhead = overhead(server_uri, self.target)  # also validates the target
        self.local_address: tuple | None = None
        self.server_address: tuple | None = None  # the resolved server sockaddr
        self.peer: tuple | None = None
        self._local: socket.socket | None = None
        self._remote: socket.socket | None = None
        self._sent = 0
        self._received = 0
        self._drops = Drops()

    def __repr__(self) -> str:
        return (f"SsLocalForwarder({self.cipher.method.name}, server={format_address(self.server)}, "
                f"target={format_address(self.target)})")

    def statistics(self) -> Statistics:
        return Statistics(peer=self.peer, sent=self._sent, received=self._received,
                          dropped=self._drops.total, drop_reasons=dict(self._drops.reasons))

    # ---- sans-IO half (the reply side is carrier.open_reply, shared with the daemon)

    def seal(self, payload: bytes, now: float | None = None) -> bytes:
        if self.session is not None:
            return self.session.seal(self.target, payload, time.time() if now is None else now)
        return self.cipher.seal_udp(self.target, payload)

    # ---- I/O

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        family, sockaddr = await resolve(self.listen, socket.SOCK_DGRAM, passive=True)
        rfamily, rsockaddr = await resolve(self.server, socket.SOCK_DGRAM)
        local = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        remote: socket.socket | None = None
        try:
            _buffers(local)
            local.bind(sockaddr)
            remote = socket.socket(rfamily, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            _buffers(remote)
            if self.fwmark:
                remote.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.fwmark)
            remote.connect(rsockaddr)  # replies from anyone else never reach us
            self._local, self._remote = local, remote
            self.local_address = local.getsockname()
            self.server_address = rsockaddr
            log.info("ss_local: forwarding UDP %s via %s (%s) to %s, overhead %d bytes",
                     format_address(self.local_address), format_address(rsockaddr),
                     self.cipher.method.name, format_address(self.target), self.overhead)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._from_local, local, remote)
                nursery.start_soon(self._from_server, remote, local)
                task_status.started(self)
        finally:
            self._local = self._remote = None
            local.close()
            if remote is not None:
                remote.close()

    async def _from_local(self, local: socket.socket, remote: socket.socket) -> None:
        buf = bytearray(MAX_DATAGRAM)
        view = memoryview(buf)
        drops = self._drops
        while True:
            await trio.lowlevel.wait_readable(local)
            for _ in range(BATCH):
                try:
                    n, addr = local.recvfrom_into(buf)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # an ICMP error about the local peer; nothing to act on
                if addr != self.peer:
                    if self.peer is not None:
                        drops.add("not the local peer")
                        continue
                    self.peer = addr
                    local.connect(addr)
                    log.info("ss_local: local peer is %s", format_address(addr))
                try:
                    packet = self.seal(view[:n])
                except ShadowsocksError as exc:  # a 2022 session out of packet ids, a bad clock
                    drops.add(f"seal: {type(exc).__name__}")
                    continue
                try:
                    remote.send(packet)
                except BlockingIOError:
                    drops.add("server socket full")
                    continue
                except OSError as exc:
                    drops.add(f"udp send: {errname(exc)}")
                    continue
                self._sent += 1

    async def _from_server(self, remote: socket.socket, local: socket.socket) -> None:
        buf = bytearray(MAX_DATAGRAM)
        view = memoryview(buf)
        drops = self._drops
        while True:
            await trio.lowlevel.wait_readable(remote)
            now = time.time()
            for _ in range(BATCH):
                try:
                    n = remote.recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as exc:  # ECONNREFUSED: the server port is closed right now
                    drops.add(f"udp receive: {errname(exc)}")
                    continue
                opened = open_reply(self.cipher, self.session, view[:n], now, drops)
                if opened is None:
                    continue
                payload = opened[1]
                if self.peer is None:
                    drops.add("no local peer yet")
                    continue
                try:
                    local.send(payload)
                except BlockingIOError:
                    drops.add("local socket full")
                    continue
                except OSError as exc:
                    drops.add(f"local send: {errname(exc)}")
                    continue
                self._received += 1


def _buffers(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


async def run_local_forwarder(listen: Address, server_uri: str, target: Address, *,
                              fwmark: int = 0, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run an SsLocalForwarder until cancelled; `task_status.started(forwarder)` once bound."""
    fwd = SsLocalForwarder(listen, server_uri, target, fwmark=fwmark)
    await fwd.run(task_status=task_status)


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would echo the bad value: not the URI
        self.exit(2, f"{PROG}: {message.split(': ss://')[0]}\n")


def _hostport(text: str) -> Address:
    try:
        return split_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m bridge.ss_local",
                description="a local UDP port forwarded through a Shadowsocks server (UDP)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--listen", required=True, type=_hostport,
                   help="local UDP HOST:PORT (port 0: pick one, printed on stdout)")
    p.add_argument("--server-uri", required=True, help="ss://METHOD:PASSWORD@HOST:PORT (SIP002)")
    p.add_argument("--target", required=True, type=_hostport,
                   help="HOST:PORT the server forwards to (e.g. its WireGuard port)")
    p.add_argument("--fwmark", type=lambda v: int(v, 0), default=0)
    return p


async def _main_async(args: argparse.Namespace) -> None:
    fwd = SsLocalForwarder(args.listen, args.server_uri, args.target, fwmark=args.fwmark)
    async with trio.open_nursery() as nursery:
        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        await nursery.start(fwd.run)
        if args.listen[1] == 0:
            print(format_address(fwd.local_address), flush=True)
    stats = fwd.statistics()
    log.info("ss_local: stopped; sent %d, received %d, dropped %d %s", stats.sent, stats.received,
             stats.dropped, stats.drop_reasons or "")


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        trio.run(_main_async, args, restrict_keyboard_interrupt_to_checkpoints=True)
    except KeyboardInterrupt:
        return 0
    except (SsLocalError, OSError, BaseExceptionGroup) as exc:
        code = exit_code(PROG, exc, UsageError)
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
