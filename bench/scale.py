"""The scale scenario of `wgpy bench`: packets per second through the protocol core of a relay
with N peers configured, against the same relay with one peer, in the same round.

The relay (a `Device`) has N peers, each with its own /32. Traffic goes to and from 16 of them
(all of them when N < 16), round-robin within every batch, as a relay's traffic mixes peers; the
others sit idle with their timers, allowed IPs and endpoints, which is what a big relay is. Each
batch is followed by `next_deadline()`, as the engine asks once per wakeup. A core whose
per-packet work does not depend on the peer count gives a flat curve.
"""

from __future__ import annotations

import gc
import os
import struct
import time

from tunnel.noise import Device
from tunnel.noise.crypto import clamp, public_key

ACTIVE = 16  # peers that carry traffic
BATCH = 128
_RELAY_IP = bytes([10, 99, 0, 1])


def _peer_ip(i: int) -> bytes:
    return bytes([10, 100, i >> 8 & 255, i & 255]) if i < 65536 else bytes([10, 101 + (i >> 16), i >> 8 & 255, i & 255])


def _packet(src: bytes, dst: bytes, size: int) -> bytes:
    hdr = bytearray(20)
    hdr[0] = 0x45
    struct.pack_into("!H", hdr, 2, size)
    hdr[8], hdr[9] = 64, 17
    hdr[12:16], hdr[16:20] = src, dst
    return bytes(hdr) + bytes(size - 20)


def _relay(peers: int, now: float) -> tuple[Device, list[Device]]:
    """The relay with `peers` peers, and the devices of the active ones with sessions up."""
    relay_key = clamp(os.urandom(32))
    relay = Device(relay_key, wall_offset=0.0)
    relay_pub = public_key(relay_key)
    active = []
    for i in range(peers):
        key = clamp(os.urandom(32))
        ip = _peer_ip(i)
        endpoint = ("192.0.2.1", 10000 + i % 50000)
        relay.add_peer(public_key(key), endpoint=endpoint, allowed_ips=[f"{'.'.join(map(str, ip))}/32"])
        if i < ACTIVE:
            dev = Device(key, wall_offset=0.0)
            dev.add_peer(relay_pub, endpoint=("192.0.2.254", 51820), allowed_ips=["0.0.0.0/0"])
            dev.bench_ip = ip  # type: ignore[attr-defined]
            dev.bench_endpoint = endpoint  # type: ignore[attr-defined]
            active.append(dev)
    for dev in active:  # handshake: the peer initiates, the relay answers, the peer confirms
        init = dev.outbound([_packet(dev.bench_ip, _RELAY_IP, 64)], now)
        resp = relay.inbound([(d, dev.bench_endpoint) for d, _ in init], now)
        confirm = dev.inbound([(d, ("192.0.2.254", 51820)) for d, _ in resp.to_net], now)
        done = relay.inbound([(d, dev.bench_endpoint) for d, _ in confirm.to_net], now)
        if len(done.to_tun) != 1:
            raise RuntimeError(f"scale bench: handshake with peer failed: {relay.drops}")
    return relay, active


def measure(peers: int, packets: int, size: int = 1420) -> tuple[float, float]:
    """(seal packets/s, open packets/s) of the relay with `peers` peers."""
    now = 1.0
    relay, active = _relay(peers, now)
    batches = max(1, packets // BATCH)
    n = batches * BATCH
    out_batch = [_packet(_RELAY_IP, active[j % len(active)].bench_ip, size) for j in range(BATCH)]
    # What the active peers send the relay, interleaved as they would arrive (sealed beforehand).
    per_peer = [dev.outbound([_packet(dev.bench_ip, _RELAY_IP, size)] * (n // len(active) + 1), now) for dev in active]
    arrivals = []
    for j in range(n):
        dev_i = j % len(active)
        arrivals.append((per_peer[dev_i][j // len(active)][0], active[dev_i].bench_endpoint))
    in_batches = [arrivals[k:k + BATCH] for k in range(0, n, BATCH)]

    outbound, inbound, deadline = relay.outbound, relay.inbound, relay.next_deadline
    # Building N peers leaves a full collection due: a running relay pays it once, after its
    # configuration, so it is paid here, not inside the timed loops.
    gc.collect()
    t0 = time.perf_counter()
    sent = 0
    for _ in range(batches):
        sent += len(outbound(out_batch, now))
        deadline()
    t1 = time.perf_counter()
    got = 0
    for batch in in_batches:
        got += len(inbound(batch, now).to_tun)
        deadline()
    t2 = time.perf_counter()
    if sent != n or got != n:
        raise RuntimeError(f"scale bench: sealed {sent}, opened {got} of {n}: {relay.drops}")
    return n / (t1 - t0), n / (t2 - t1)
