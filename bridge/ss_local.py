"""The client side of the Shadowsocks UDP carrier: a local UDP port whose one peer (normally a
WireGuard interface, Endpoint = this port) talks to a fixed target through a Shadowsocks server.

    client side                                                   server side
    WireGuard --> SsLocalForwarder 127.0.0.1:P --UDP (sealed)--> ss-server / wgpy bridge serve --> target
              <--                               <--(sealed)---                                <--

    python -m bridge.ss_local --listen H:P --server-uri ss://... --target H:P [--fwmark N]

It is the daemon's Shadowsocks transport (bridge.carrier.ShadowsocksTransport: sealing, the
one server socket with its fwmark, reopening it when the host's address goes away, opening
and counting replies) plus a local UDP socket, so both clients behave the same:
  * the first local source address that sends is remembered and the local socket is connected to
    it; datagrams from any other address are dropped and counted;
  * every datagram from it is sealed for `target` and sent through the transport, with the
    engine's back-pressure rule (a full server socket is waited for, not dropped);
  * replies that fail (wrong key, replay, malformed, an old 2022 session) are dropped silently
    and counted by reason; the payload goes back to the local peer.

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
from dataclasses import dataclass, field
from typing import Any, Sequence

import trio

from transport.address import AddressError, format_address, split_host_port
from transport.base import Drops, Endpoint
from transport.udp import GsoState, enable_gro, recv_datagrams, send_or_drop

from .carrier import ShadowsocksTransport
from .netio import errname, exit_code, resolve
from .spec import BridgeError, BridgeSpec, parse_bridge

log = logging.getLogger("wgpy.ss_local")

PROG = "ss_local"
BATCH = 128  # datagrams read per wakeup from the local peer
MAX_DATAGRAM = 0xFFFF
SOCKET_BUFFER = 1 << 20  # requested SO_RCVBUF / SO_SNDBUF on the local socket (best effort)
IDENT = 1  # the transport's number in the Endpoints it produces (there is only one here)

Address = tuple[str, int]


class SsLocalError(Exception):
    """Base of every error this module raises on purpose."""


class UsageError(SsLocalError, ValueError):
    """Bad configuration (URI, method, target)."""


def _spec(server_uri: str) -> BridgeSpec:
    if not server_uri.lower().startswith("ss://"):
        raise UsageError("expected an ss:// URI")
    try:
        return parse_bridge(server_uri)
    except BridgeError as exc:  # messages never contain the password
        raise UsageError(str(exc)) from None


def overhead(server_uri: str, target: Any) -> int:
    """What the tunnel MTU must leave for this bridge (bridge.spec.BridgeSpec.overhead: the larger
    direction, outer IP/UDP headers not counted: add 28 for IPv4, 48 for IPv6)."""
    try:
        return _spec(server_uri).overhead(target)
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
    The Shadowsocks side is the daemon's own bridge transport (bridge.carrier).

        fwd = await nursery.start(SsLocalForwarder(("127.0.0.1", 0), uri, ("127.0.0.1", 51820)).run)
        fwd.local_address   # where WireGuard's Endpoint should point
    """

    def __init__(self, listen: Address, server_uri: str, target: Address, *, fwmark: int = 0) -> None:
        self.spec = _spec(server_uri)
        self.listen = tuple(listen)
        self.server: Address = self.spec.server
        self.target = Endpoint(str(target[0]), int(target[1]), IDENT)
        self.fwmark = fwmark
        self.overhead = overhead(server_uri, self.target.address)  # also validates the target
        self.transport: ShadowsocksTransport | None = None
        self.local_address: tuple | None = None
        self.server_address: tuple | None = None  # the resolved server sockaddr
        self.peer: tuple | None = None
        self._drops = Drops()  # the local side's; the server side counts in the transport
        self._received = 0

    def __repr__(self) -> str:
        return (f"SsLocalForwarder({self.spec.method}, server={format_address(self.server)}, "
                f"target={format_address(self.target)})")

    def statistics(self) -> Statistics:
        t = self.transport
        reasons = dict(self._drops.reasons)
        if t is not None:
            for reason, n in t.drops.reasons.items():
                reasons[reason] = reasons.get(reason, 0) + n
        return Statistics(peer=self.peer, sent=t.sent if t is not None else 0,
                          received=self._received, dropped=sum(reasons.values()),
                          drop_reasons=reasons)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        family, sockaddr = await resolve(self.listen, socket.SOCK_DGRAM, passive=True)
        _, rsockaddr = await resolve(self.server, socket.SOCK_DGRAM)
        transport = ShadowsocksTransport(self.spec.with_host(rsockaddr[0]), IDENT, self.fwmark)
        local = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    local.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                except OSError:
                    pass
            local.bind(sockaddr)
            # The local WireGuard (wgpy, wireguard-go) sends bursts with UDP GSO: with GRO a
            # burst is one read here, not one syscall a datagram (see transport/udp.py).
            enable_gro(local)
            self.transport = transport
            self.local_address = local.getsockname()
            self.server_address = rsockaddr
            log.info("ss_local: forwarding UDP %s via %s (%s) to %s, overhead %d bytes",
                     format_address(self.local_address), format_address(rsockaddr),
                     self.spec.method, format_address(self.target), self.overhead)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._from_local, local, transport)
                (receive,) = transport.receivers()
                nursery.start_soon(self._from_server, receive, local)
                task_status.started(self)
        finally:
            transport.close()
            local.close()

    async def _from_local(self, local: socket.socket, transport: ShadowsocksTransport) -> None:
        buf = bytearray(MAX_DATAGRAM)
        bufs, view = [buf], memoryview(buf)
        drops, target = self._drops, self.target
        while True:
            await trio.lowlevel.wait_readable(local)
            batch = []
            for _ in range(BATCH):  # reads; and about BATCH datagrams (a read is taken whole)
                try:
                    datagrams, addr = recv_datagrams(local, bufs, view)
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
                batch += [(d, target) for d in datagrams]
                if len(batch) >= BATCH:
                    break
            # The transport's back-pressure rule, as in the engine: wait, offer again.
            rest = transport.send(batch) if batch else []
            while rest:
                await transport.wait_writable()
                rest = transport.send(rest)

    async def _from_server(self, receive, local: socket.socket) -> None:
        drops = self._drops
        gso = GsoState()
        while True:
            batch = await receive()
            if self.peer is None:
                drops.add("no local peer yet", len(batch))
                continue
            # The replies in one sendmsg a run of equal sizes (UDP GSO): the local WireGuard reads
            # a burst with GRO, or the kernel cuts it into the same datagrams again.
            sent, failed = send_or_drop(local, [payload for payload, _ in batch], None, gso)
            self._received += sent
            for exc, m in failed:
                if isinstance(exc, BlockingIOError):
                    drops.add("local socket full", m)
                else:
                    drops.add(f"local send: {errname(exc)}", m)


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
        return split_host_port(text, port_zero=True)
    except AddressError as exc:
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
