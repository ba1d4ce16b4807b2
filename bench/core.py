"""Seal and open batches through the sans-IO core, side by side with raw ChaCha20-Poly1305.

The raw reference does only what no WireGuard can avoid: one AEAD call per packet with the
transport nonce. The ratio core/raw is therefore the share of the AEAD's speed the core keeps
after routing, padding, framing, replay checks, source checks and timers.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import asdict, dataclass

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tunnel.noise import Device
from tunnel.noise.crypto import clamp, public_key

_NONCE = struct.Struct("<4xQ")
_SRC = bytes([10, 77, 0, 1])
_DST = bytes([10, 77, 0, 2])
_EP_A = ("192.0.2.1", 51820)
_EP_B = ("192.0.2.2", 51820)


@dataclass
class Result:
    size: int
    op: str
    packets: int
    core_pps: float
    raw_pps: float

    @property
    def core_gbps(self) -> float:
        return self.core_pps * self.size * 8 / 1e9

    @property
    def raw_gbps(self) -> float:
        return self.raw_pps * self.size * 8 / 1e9

    @property
    def ratio(self) -> float:
        return self.core_pps / self.raw_pps

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(core_gbps=self.core_gbps, raw_gbps=self.raw_gbps, ratio=self.ratio)
        return d


def ipv4_packet(size: int) -> bytes:
    if size < 28:
        raise ValueError("packet size must be at least 28 bytes (IPv4 + UDP headers)")
    hdr = bytearray(20)
    hdr[0] = 0x45
    struct.pack_into("!H", hdr, 2, size)
    hdr[8], hdr[9] = 64, 17
    hdr[12:16], hdr[16:20] = _SRC, _DST
    return bytes(hdr) + os.urandom(size - 20)


def _connected_pair(now: float) -> tuple[Device, Device]:
    ka, kb = clamp(os.urandom(32)), clamp(os.urandom(32))
    a = Device(ka, wall_offset=0.0)
    b = Device(kb, wall_offset=0.0)
    a.add_peer(public_key(kb), endpoint=_EP_B, allowed_ips=["10.77.0.2/32"])
    b.add_peer(public_key(ka), endpoint=_EP_A, allowed_ips=["10.77.0.1/32"])
    init = a.outbound([ipv4_packet(64)], now)
    resp = b.inbound([(d, _EP_A) for d, _ in init], now)
    confirm = a.inbound([(d, _EP_B) for d, _ in resp.to_net], now)
    done = b.inbound([(d, _EP_A) for d, _ in confirm.to_net], now)
    if len(done.to_tun) != 1:
        raise RuntimeError(f"benchmark handshake failed: {a.drops} {b.drops}")
    return a, b


def _padded(pkt: bytes) -> bytes:
    pad = -len(pkt) % 16
    return pkt + bytes(pad) if pad else pkt


def measure(size: int, packets: int, batch: int) -> list[Result]:
    now = 1.0
    a, b = _connected_pair(now)
    pkt = ipv4_packet(size)
    batches = [[pkt] * batch for _ in range(max(1, packets // batch))]
    n = len(batches) * batch

    # Core: seal every batch, then open what was sealed (fresh counters, so nothing is a replay).
    t0 = time.perf_counter()
    sealed = [a.outbound(bt, now) for bt in batches]
    t1 = time.perf_counter()
    received = [[(d, _EP_A) for d, _ in dg] for dg in sealed]  # as a UDP socket hands them over
    t1_open = time.perf_counter()
    opened = 0
    for dg in received:
        opened += len(b.inbound(dg, now).to_tun)
    t2 = time.perf_counter()
    if opened != n:
        raise RuntimeError(f"core delivered {opened} of {n} packets: {b.drops}")

    # Raw AEAD on the same plaintext: one call per packet.
    key = os.urandom(32)
    aead = ChaCha20Poly1305(key)
    plain = _padded(pkt)
    nonce = _NONCE.pack
    enc = aead.encrypt
    t3 = time.perf_counter()
    cts = [enc(nonce(i), plain, None) for i in range(n)]
    t4 = time.perf_counter()
    dec = aead.decrypt
    for i, ct in enumerate(cts):
        dec(nonce(i), ct, None)
    t5 = time.perf_counter()
    return [
        Result(size, "seal", n, n / (t1 - t0), n / (t4 - t3)),
        Result(size, "open", n, n / (t2 - t1_open), n / (t5 - t4)),
    ]
