"""The transport interface: what the engine needs from anything that carries WireGuard datagrams.

Modelled on wireguard-go's conn.Bind: a transport hands the engine *receive functions* (one per
socket or stream it reads), each returning a batch of (datagram, endpoint) when something
arrived; the engine sends batches and gets back what would have blocked. Implementations:

    transport.udp.UdpTransport            the interface's UDP port (IPv4 + IPv6)
    bridge.carrier.ShadowsocksTransport   Shadowsocks UDP to a server (every method)
    bridge.carrier.Udp2TcpTransport       udp-over-tcp to a server
    transport.memory.MemoryTransport      in-memory, for tests (and a lossy MemoryLink)

One back-pressure rule for all of them (tunnel/engine.py `_send`): `send` never blocks and
never raises; what would block comes back, the engine waits for `wait_writable()` and offers
it again. Everything else a transport cannot send (no connection yet, a network error) it drops
and counts in `drops`, as UDP would lose it.

Batches are lists because the next transports (UDP GSO, a nested WireGuard hop) move runs of
equal-sized datagrams to one endpoint with one call; a transport may send a batch in any
number of syscalls, but keeps the order of datagrams to each endpoint.

No trio here: the interface is plain Python, so sans-IO code (the core, the UAPI parser) can
name `Endpoint` without loading an event loop.
"""

from __future__ import annotations

from collections import Counter
from typing import Awaitable, Callable, NamedTuple

UDP = 0  # Endpoint.via of the interface's own UDP port; bridges get 1, 2, ...


class Endpoint(NamedTuple):
    """Where a peer is, and which transport reaches it.

    `host` is an IP address in canonical text (IPv6 compressed, IPv4-mapped IPv6 as IPv4), so the
    same peer always has an equal endpoint; `port` its UDP port. For a bridge, (host, port) is the
    peer's WireGuard endpoint as the bridge server sees it (the Shadowsocks target). Equal
    addresses through different transports are different endpoints. Indexing [0], [1] gives the
    (host, port) that `wg show` prints and cookies are bound to.
    """

    host: str
    port: int
    via: int = UDP

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        text = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return text if self.via == UDP else f"{text} via transport {self.via}"


Datagram = tuple[bytes, Endpoint]
ReceiveFunc = Callable[[], Awaitable[list[Datagram]]]


class Drops:
    """Datagrams lost, counted by reason."""

    __slots__ = ("reasons",)

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.reasons[reason] += n

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


class Transport:
    """Base class of every transport. Subclasses implement the methods that raise here.

    Life cycle: the engine calls `run` (in the transport's own cancel scope, for transports that
    keep a connection up; the default returns at once), then starts one task per function of
    `receivers()`; `receivers()` is called again after anything that replaces the transport's
    sockets (`rebind`), whose old receive functions then raise or return nothing. `close()` ends
    it all; after it `send` drops everything.
    """

    ident: int = UDP  # Endpoint.via of the endpoints it reaches
    kind: str = "transport"  # for logs and statistics: "udp", "ss", "udp2tcp", "memory"

    def __init__(self) -> None:
        self.drops = Drops()
        self.sent = 0  # datagrams handed to the network
        self.received = 0  # datagrams returned by receive functions
        self.fwmark = 0

    async def run(self, *, task_status) -> None:
        """Keep the transport usable (connect, reconnect). Returns at once unless overridden."""
        task_status.started()

    def receivers(self) -> list[ReceiveFunc]:
        raise NotImplementedError

    def send(self, datagrams: list[Datagram]) -> list[Datagram]:
        """Send what can go now, in order; return the datagrams that would block (to be offered
        again after `wait_writable`). Never raises, never blocks."""
        raise NotImplementedError

    async def wait_writable(self) -> None:
        """Return when `send` may make progress again (or when waiting is pointless)."""
        raise NotImplementedError

    def set_fwmark(self, mark: int) -> None:
        """Mark the transport's sockets (Linux re-routes a socket whose mark changes)."""
        self.fwmark = mark

    @property
    def connected(self) -> bool:
        return True

    def statistics(self) -> dict:
        return {"kind": self.kind, "connected": self.connected, "sent": self.sent,
                "received": self.received, "dropped": self.drops.total,
                "drop_reasons": dict(self.drops.reasons)}

    def close(self) -> None:
        raise NotImplementedError
