"""In-memory test doubles: IP packet builders and a pair of Devices wired through a fake network
with a driven clock (the wgpy equivalent of boringtun's create_two_tuns_and_handshake)."""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass, field
from typing import Callable

from transport.base import Endpoint
from tunnel.noise import Device
from tunnel.noise.crypto import clamp, public_key

EP_A = Endpoint("192.0.2.1", 51820)
EP_B = Endpoint("198.51.100.2", 51820)
WALL = 1_700_000_000.0


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pseudo_header(v4: bool, src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """The TCP/UDP checksum's pseudo-header (RFC 793, RFC 8200 8.1)."""
    if v4:
        return src + dst + bytes([0, proto]) + struct.pack("!H", length)
    return src + dst + struct.pack("!I", length) + bytes([0, 0, 0, proto])


def checksums_valid(packet: bytes) -> bool:
    """Verified as a receiver would: the IPv4 header, and the TCP/UDP segment with its
    pseudo-header, each sum to 0xFFFF (IPv4 without options or IPv6 without extension headers)."""
    v4 = packet[0] >> 4 == 4
    iphlen = (packet[0] & 15) * 4 if v4 else 40
    if v4 and checksum(packet[:iphlen]) != 0:
        return False
    src, dst = (packet[12:16], packet[16:20]) if v4 else (packet[8:24], packet[24:40])
    proto = packet[9] if v4 else packet[6]
    body = packet[iphlen:]
    return checksum(pseudo_header(v4, src, dst, proto, len(body)) + body) == 0


def ip4(src: str, dst: str, payload: bytes = b"hello", proto: int = 17) -> bytes:
    total = 20 + len(payload)
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, proto, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def ip6(src: str, dst: str, payload: bytes = b"hello", next_header: int = 17) -> bytes:
    hdr = struct.pack(
        "!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
        ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed,
    )
    return hdr + payload


def seeded_rng(seed: int) -> Callable[[int], bytes]:
    r = random.Random(seed)
    return r.randbytes


@dataclass
class Wire:
    """One datagram seen on the fake network."""

    time: float
    sender: str  # "a" or "b"
    data: bytes

    @property
    def kind(self) -> int:
        return self.data[0]


@dataclass
class Pair:
    """Two devices, a and b, each with the other as its only peer. a is 10.9.0.1 / fd00::1,
    b is 10.9.0.2 / fd00::2. `now` only moves when a test moves it."""

    psk_a: bytes | None = None
    psk_b: bytes | None = None
    seed: int = 1
    now: float = 1000.0
    a_endpoint_of_b: Endpoint | None = EP_B
    b_endpoint_of_a: Endpoint | None = EP_A
    device_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.key_a = clamp(rng.randbytes(32))
        self.key_b = clamp(rng.randbytes(32))
        self.a = Device(self.key_a, wall_offset=WALL, rng=seeded_rng(self.seed * 2 + 1), **self.device_kwargs)
        self.b = Device(self.key_b, wall_offset=WALL, rng=seeded_rng(self.seed * 2 + 2), **self.device_kwargs)
        self.pa = self.a.add_peer(
            public_key(self.key_b), preshared_key=self.psk_a, endpoint=self.a_endpoint_of_b,
            allowed_ips=["10.9.0.2/32", "fd00::2/128"],
        )
        self.pb = self.b.add_peer(
            public_key(self.key_a), preshared_key=self.psk_b, endpoint=self.b_endpoint_of_a,
            allowed_ips=["10.9.0.1/32", "fd00::1/128"],
        )
        self.addr = {"a": EP_A, "b": EP_B}
        self.tun = {"a": [], "b": []}
        self.wire: list[Wire] = []
        # A filter deciding whether a datagram from `sender` is delivered (loss, partitions).
        self.deliver: Callable[[str, bytes], bool] = lambda sender, data: True

    def device(self, name: str) -> Device:
        return self.a if name == "a" else self.b

    def _route(self, sender: str, datagrams) -> None:
        """Deliver datagrams sent by `sender` to whichever side owns the destination, and keep
        delivering replies until the network is quiet."""
        queue = [(sender, d, ep) for d, ep in datagrams]
        while queue:
            sender, data, dest = queue.pop(0)
            self.wire.append(Wire(self.now, sender, data))
            if not self.deliver(sender, data):
                continue
            receiver = next((n for n, ep in self.addr.items() if ep == dest), None)
            if receiver is None or receiver == sender:
                continue
            res = self.device(receiver).inbound([(data, self.addr[sender])], self.now)
            self.tun[receiver].extend(res.to_tun)
            queue.extend((receiver, d, ep) for d, ep in res.to_net)

    def send(self, sender: str, packets: list[bytes]) -> None:
        self._route(sender, self.device(sender).outbound(packets, self.now))

    def send_a(self, *packets: bytes) -> None:
        self.send("a", list(packets) or [ip4("10.9.0.1", "10.9.0.2")])

    def send_b(self, *packets: bytes) -> None:
        self.send("b", list(packets) or [ip4("10.9.0.2", "10.9.0.1")])

    def tick(self) -> None:
        for name in ("a", "b"):
            self._route(name, self.device(name).tick(self.now))

    def advance(self, seconds: float) -> None:
        """Move time forward, firing every timer at its own deadline on the way."""
        target = self.now + seconds
        while True:
            deadlines = [d for d in (self.a.next_deadline(), self.b.next_deadline()) if d is not None]
            nxt = min(deadlines, default=None)
            if nxt is None or nxt > target:
                self.now = target
                self.tick()
                return
            self.now = max(self.now, nxt)
            self.tick()

    def handshake(self) -> None:
        self.send_a()
        assert self.tun["b"], f"handshake failed: a drops {self.a.drops}, b drops {self.b.drops}"
        self.tun["b"].clear()

    def sent(self, sender: str, kind: int, since: float = float("-inf")) -> list[Wire]:
        return [w for w in self.wire if w.sender == sender and w.kind == kind and w.time >= since]


def fingerprint(dev: Device) -> tuple:
    """Everything protocol state an unauthenticated datagram must not change."""
    peers = []
    for pk, p in sorted(dev.peers.items()):
        hs = p.handshake
        peers.append((
            pk, p.endpoint, p.pinned, p.rx_bytes, p.tx_bytes, p.last_handshake_wall, tuple(p.staged),
            hs.state, hs.local_index, hs.remote_index, hs.last_timestamp, hs.last_initiation_consumed,
            hs.last_sent_handshake, hs.sym.h if hs.sym else None,
            tuple((kp.local_index, kp.remote_index, kp.send_counter, kp.replay.last, tuple(kp.replay._ring))
                  for kp in (p.keypairs.previous, p.keypairs.current, p.keypairs.next) if kp),
            p.timers.state(), p.keepalive_requested, p.cookie._cookie, p.cookie._last_mac1,
        ))
    return (tuple(peers), tuple(sorted(dev._index)))
