"""LWO on the interface's UDP port: peers that use it and peers that do not share one port.

LWO (bridge/lwo.py) changes the bytes of each datagram and nothing else, so it needs no socket
of its own: it is a pair of thin transports over the interface's UdpTransport (transport/udp.py).

An LWO peer is answered in the form its latest authenticated datagram came in: the engine lets
its endpoint roam freely (Device.set_endpoint without `via`), so the core's roaming rule moves it
to Endpoint(host, port, LwoPort.ident) after an authenticated LWO datagram and to the plain UDP
port's endpoint after an authenticated plain one. A plain datagram thus goes to an LWO peer only
when the latest datagram that proved to come from it was plain (a client of `Bridge = direct,
lwo` that probes direct again gets a plain answer, and stays direct); until it sends at all, or
after configuration, it is sent LWO.

    LwoTransport (one per LWO peer, its own Endpoint.via)
        send: each datagram obfuscated with the peer's public key, then the UDP port's send.
        The peer's endpoint names it after configuration (`Endpoint =`, LWO turned on), before
        the peer has sent anything.
    LwoPort (one per interface, once a peer uses LWO)
        open(batch): the receiving side, run by the engine on each batch from the UDP port:
        a datagram with the obfuscation bit set (byte 1 & 0x80; plain WireGuard has 0 there) is
        deobfuscated with *our* public key (LWO is keyed by the receiver's key, so no peer need
        be known first) and comes out from Endpoint(host, port, LwoPort.ident); plain datagrams
        pass untouched. One bit test per datagram.
        send: what the core sends to such a source. To an LWO peer whose endpoint it is (its
        latest authenticated datagram came LWO from there): obfuscated with that peer's key (its
        LwoTransport, found by address; looked for among the LWO peers once per address it
        moves to). A cookie reply under load (sent before the peer is known): obfuscated for the
        LWO peer last sent to at that address. Anything else (a peer that sent LWO without
        being configured for it): dropped and counted. A plain WireGuard datagram never answers
        an LWO one.

Both send through the UDP transport, so its back-pressure rule and fwmark apply unchanged; what
would block comes back in its original (plain) form, to be obfuscated again with a new random
byte when offered again. No trio here: waiting is the UDP transport's.
"""

from __future__ import annotations

import os

from transport.base import Datagram, Endpoint, ReceiveFunc, Transport

from .lwo import LwoKey, deobfuscate, obfuscate

_POOL = 4096
MSG_COOKIE_REPLY = 3


class RandomBytes:
    """Random bytes for byte 1 of each LWO datagram, from the OS's CSPRNG in blocks (one
    getrandom per 4096 datagrams, not one per datagram). Not a predictable generator: a censor
    that could predict byte 1 would recognise LWO by it."""

    __slots__ = ("_pool", "_next")

    def __init__(self) -> None:
        self._pool = b""
        self._next = 0

    def __call__(self) -> int:
        i = self._next
        if i >= len(self._pool):
            self._pool, i = os.urandom(_POOL), 0
        self._next = i + 1
        return self._pool[i]


class LwoPort(Transport):
    """The LWO side of the interface's UDP port (see the module docstring)."""

    kind = "lwo"

    def __init__(self, ident: int, udp: Transport) -> None:
        super().__init__()
        self.ident = ident
        self.udp = udp
        self.own: LwoKey | None = None  # our public key: what LWO datagrams to us are keyed with
        self.noise = RandomBytes()
        # (host, port) -> the LWO peer's transport that last sent there (checked on use).
        self.by_address: dict[tuple[str, int], LwoTransport] = {}
        self.members: set[LwoTransport] = set()  # the open LwoTransports over this port

    def set_own_key(self, public_key: bytes | None) -> None:
        self.own = LwoKey(public_key) if public_key is not None else None

    def open(self, batch: list[Datagram]) -> list[Datagram]:
        """A batch from the UDP port with its LWO datagrams deobfuscated (their source endpoint
        names this transport); ones that are not LWO after all are dropped and counted."""
        own = self.own
        out: list[Datagram] = []
        opened = 0
        for data, src in batch:
            if len(data) < 2 or not data[1] & 0x80 or src[2] != self.udp.ident:
                out.append((data, src))
                continue
            plain = deobfuscate(data, own) if own is not None else None
            if plain is None:
                self.drops.add("not an LWO message")
                continue
            opened += 1
            out.append((plain, Endpoint(src[0], src[1], self.ident)))
        self.received += opened
        return out

    def receivers(self) -> list[ReceiveFunc]:
        return []  # the UDP port receives; the engine hands its batches to `open`

    def _owner(self, endpoint: Endpoint) -> LwoTransport | None:
        """The LWO peer whose endpoint `endpoint` is (the core put it there: its latest
        authenticated datagram came LWO from that address), by address, else by a look at every
        LWO peer (once per address a peer moves to)."""
        address = (endpoint[0], endpoint[1])
        transport = self.by_address.get(address)
        if transport is not None and not transport.closed and transport.peer is not None \
                and transport.peer.endpoint == endpoint:
            return transport
        for member in self.members:
            if member.peer is not None and member.peer.endpoint == endpoint:
                self.by_address[address] = member
                return member
        return None

    def _cookie_owner(self, endpoint: Endpoint) -> LwoTransport | None:
        """A cookie reply goes out before the peer is known: the LWO peer last sent to there."""
        address = (endpoint[0], endpoint[1])
        transport = self.by_address.get(address)
        if transport is None or transport.closed or transport.address != address:
            return None
        return transport

    def send(self, datagrams: list[Datagram]) -> list[Datagram]:
        groups: list[tuple[LwoTransport, list[Datagram]]] = []
        last, transport = None, None
        for data, endpoint in datagrams:
            if data[0] == MSG_COOKIE_REPLY:
                transport = self._cookie_owner(endpoint)
                last = None
            elif endpoint is not last:
                last = endpoint
                transport = self._owner(endpoint)
            if transport is None:
                self.drops.add("no LWO peer at this address")
                continue
            if groups and groups[-1][0] is transport:
                groups[-1][1].append((data, endpoint))
            else:
                groups.append((transport, [(data, endpoint)]))
        for i, (transport, group) in enumerate(groups):
            rest = transport.send(group)
            if rest:
                return rest + [d for _, g in groups[i + 1:] for d in g]
            self.sent += len(group)
        return []

    async def wait_writable(self) -> None:
        await self.udp.wait_writable()

    def statistics(self) -> dict:
        st = super().statistics()
        st["obfuscation"] = "lwo"
        return st

    def close(self) -> None:
        self.by_address.clear()
        self.members.clear()


class LwoTransport(Transport):
    """One LWO peer's datagrams: obfuscated with its public key, sent on the UDP port."""

    kind = "lwo"

    def __init__(self, ident: int, peer_key: bytes, port: LwoPort, peer: object = None) -> None:
        super().__init__()
        self.ident = ident
        self.key = LwoKey(peer_key)
        self.port = port
        self.peer = peer  # the core's Peer object (a peer removed and added again is another one)
        self.address: tuple[str, int] | None = None  # where it last sent
        self.closed = False
        port.members.add(self)

    def endpoint(self, address: tuple[str, int]) -> Endpoint:
        return Endpoint(address[0], address[1], self.ident)

    def receivers(self) -> list[ReceiveFunc]:
        return []

    def send(self, datagrams: list[Datagram]) -> list[Datagram]:
        if self.closed:
            self.drops.add("closed", len(datagrams))
            return []
        key, noise, by_address = self.key, self.port.noise, self.port.by_address
        sealed: list[Datagram] = []
        skipped: list[int] = []  # indices of datagrams not sent (none, from the core)
        last = None
        for i, (data, endpoint) in enumerate(datagrams):
            if endpoint is not last:
                last = endpoint
                address = (endpoint[0], endpoint[1])
                if address != self.address:
                    if by_address.get(self.address) is self:
                        del by_address[self.address]
                    self.address = address
                    by_address[address] = self
            try:
                sealed.append((obfuscate(data, key, noise()), endpoint))
            except ValueError:  # not a WireGuard message: never sent in the clear
                self.drops.add("not a WireGuard message")
                skipped.append(i)
        rest = self.port.udp.send(sealed)
        self.sent += len(sealed) - len(rest)
        if not rest:
            return []
        # What would block, in its plain form (obfuscated again, with a new random byte, when
        # offered again).
        if not skipped:
            return datagrams[len(datagrams) - len(rest):]
        skip = set(skipped)
        kept = [d for i, d in enumerate(datagrams) if i not in skip]
        return kept[len(kept) - len(rest):]

    async def wait_writable(self) -> None:
        await self.port.udp.wait_writable()

    def statistics(self) -> dict:
        st = super().statistics()
        st["obfuscation"] = "lwo"
        return st

    def close(self) -> None:
        self.closed = True
        self.port.members.discard(self)
        if self.address is not None and self.port.by_address.get(self.address) is self:
            del self.port.by_address[self.address]
