"""Device.inbound takes a batch at a time and keeps per-batch caches (keys per receiver index,
allowed-IPs answers, in-order replay runs) and defers endpoint and timer work to the end of the
batch. Pinned here: for what is delivered, dropped and recorded, a batch is exactly the same as
its datagrams handed over one call each, whatever the mix and order."""

from __future__ import annotations

import random

import pytest

from bench.flood import initiations
from tests.helpers import ip4, ip6, seeded_rng
from transport.base import Endpoint
from tunnel.noise import Device
from tunnel.noise.crypto import clamp, public_key

R_EP = Endpoint("192.0.2.254", 51820)
EP1 = Endpoint("198.51.100.1", 1111)
EP1_ROAMED = Endpoint("198.51.100.11", 1112)
EP2 = Endpoint("198.51.100.2", 2222)
T0 = 1000.0
T1 = 1010.0  # past REKEY_TIMEOUT: p2 may initiate again


def _world():
    """The relay r with peers p1 and p2 (each its own Device). p2's session with r is up and
    confirmed; p1 has just had r's response, so r still holds p1's keypair as `next` and p1's
    first transport datagram confirms it. Returns r, its two peers, and the two devices."""
    rng = random.Random(7)
    kr, k1, k2 = (clamp(rng.randbytes(32)) for _ in range(3))
    r = Device(kr, wall_offset=0.0, rng=seeded_rng(1))
    d1 = Device(k1, wall_offset=0.0, rng=seeded_rng(2))
    d2 = Device(k2, wall_offset=0.0, rng=seeded_rng(3))
    r1 = r.add_peer(public_key(k1), endpoint=EP1, allowed_ips=["10.0.0.1/32", "fd00::1/128"])
    r2 = r.add_peer(public_key(k2), endpoint=EP2, allowed_ips=["10.0.0.2/32"])
    d1.add_peer(public_key(kr), endpoint=R_EP, allowed_ips=["0.0.0.0/0", "::/0"])
    d2.add_peer(public_key(kr), endpoint=R_EP, allowed_ips=["0.0.0.0/0"])
    # p2: full handshake, confirmed by its data.
    init = d2.outbound([ip4("10.0.0.2", "10.0.0.254")], T0)
    resp = r.inbound([(d, EP2) for d, _ in init], T0)
    conf = d2.inbound([(d, R_EP) for d, _ in resp.to_net], T0)
    assert len(r.inbound([(d, EP2) for d, _ in conf.to_net], T0).to_tun) == 1
    # p1: initiation and response only.
    init = d1.outbound([ip4("10.0.0.1", "10.0.0.254")], T0)
    resp = r.inbound([(d, EP1) for d, _ in init], T0)
    assert r1.keypairs.next is not None
    d1.pending = d1.inbound([(d, R_EP) for d, _ in resp.to_net], T0).to_net  # its staged packet
    return r, r1, r2, d1, d2


def _datagrams(d1: Device, d2: Device, seed: int) -> list[tuple[bytes, Endpoint]]:
    """A shuffled-in-places mix: in-order runs, interleaved peers, replays, reordering, a gap, a
    key confirmation, a roam, keepalives, junk, forged tags, bad and foreign inner packets, and a
    handshake initiation in the middle."""
    rng = random.Random(seed)
    (p1,) = d1.peers.values()
    (p2,) = d2.peers.values()
    ones = [d for d, _ in d1.pending]
    ones += [d for d, _ in d1.outbound([ip4("10.0.0.1", "10.0.0.254", bytes([i]) * (i * 37 % 200))
                                         for i in range(40)], T1)]
    ones += [d for d, _ in d1.outbound([ip6("fd00::1", "fd00::fe", b"six")], T1)]
    ones += [d for d, _ in d1.outbound_to(p1, [b""], T1)]  # keepalive
    ones += [d for d, _ in d1.outbound_to(p1, [ip4("10.0.0.2", "10.0.0.254")], T1)]  # not its source
    ones += [d for d, _ in d1.outbound_to(p1, [b"\x45" + bytes(18)], T1)]  # bad inner
    twos = [d for d, _ in d2.outbound([ip4("10.0.0.2", "10.0.0.254", b"x" * i) for i in range(70)], T1)]
    twos += [d for d, _ in d2.outbound_to(p2, [b""], T1)]
    handshake = [d for d, _ in d2.initiate(p2, T1)]
    assert handshake
    for _ in range(200):  # skip counters: a gap in the run
        d2.outbound([ip4("10.0.0.2", "10.0.0.254")], T1)
    twos += [d for d, _ in d2.outbound([ip4("10.0.0.2", "10.0.0.254", b"late")] * 5, T1)]

    out: list[tuple[bytes, Endpoint]] = []
    i = j = 0
    while i < len(ones) or j < len(twos):
        pick = rng.random()
        if j >= len(twos) or (i < len(ones) and pick < 0.5):
            src = EP1_ROAMED if i > 30 else EP1
            out.append((ones[i], src))
            i += 1
        else:
            out.append((twos[j], EP2))
            j += 1
        roll = rng.random()
        if roll < 0.08 and out:  # replay something already in the batch
            out.append(rng.choice(out))
        elif roll < 0.12 and len(out) > 3:  # swap the last two: reordering
            out[-1], out[-2] = out[-2], out[-1]
        elif roll < 0.14:
            out.append((bytes([4, 0, 0, 0]) + rng.randbytes(rng.randrange(0, 40)), EP2))  # short/forged
        elif roll < 0.16:
            data, src = rng.choice(out)
            forged = bytearray(data)
            forged[-1] ^= 1
            out.append((bytes(forged), src))
        elif roll < 0.17:
            data, src = rng.choice(out)
            out.append((data[:4] + bytes([9, 9, 9, 9]) + data[8:], src))  # unknown receiver
        elif roll < 0.18:
            out.append((rng.randbytes(rng.randrange(0, 6)), EP1))  # junk
    out.insert(len(out) // 2, (handshake[0], EP2))
    out.insert(len(out) // 3, (twos[5], EP2))  # replay of an earlier counter, before its turn
    # A small flood between the data (fewer than make the relay "under load"): initiations with a
    # valid mac1 and random content, the genuine one replayed, forged cookie replies. They are
    # rejected.
    for flood in initiations(p1.public_key, 4) + [handshake[0]] + [bytes([3, 0, 0, 0]) + rng.randbytes(60)] * 2:
        out.insert(rng.randrange(len(out) // 2 + 1, len(out)), (flood, EP2))
    return out


def _state(r: Device, r1, r2) -> tuple:
    peers = []
    for p in (r1, r2):
        peers.append((
            p.endpoint, p.rx_bytes, p.last_handshake_wall,
            [(kp.send_counter, kp.replay.last, tuple(kp.replay._ring), kp.is_initiator)
             for kp in (p.keypairs.previous, p.keypairs.current, p.keypairs.next) if kp],
        ))
    return peers, dict(r.drops), dict(r.stats)


@pytest.mark.parametrize("seed", range(12))
def test_a_batch_is_its_datagrams_one_by_one(seed):
    r, r1, r2, d1, d2 = _world()
    batch = _datagrams(d1, d2, seed)
    res = r.inbound(batch, T1)

    s, s1, s2, e1, e2 = _world()
    tun: list[bytes] = []
    net = []
    for dg in _datagrams(e1, e2, seed):
        one = s.inbound([dg], T1)
        tun += one.to_tun
        net += one.to_net

    assert res.to_tun == tun
    assert sorted(len(d) for d, _ in res.to_net) == sorted(len(d) for d, _ in net)
    assert _state(r, r1, r2) == _state(s, s1, s2)
    assert r.drops["replayed counter"] > 0 and r.drops["transport authentication failed"] > 0
    assert r.drops["initiation rejected"] >= 5 and r.drops["cookie reply rejected"] == 2
    assert r1.keypairs.next is None and r1.endpoint == EP1_ROAMED


def test_a_replay_in_the_same_batch_is_dropped_and_later_ones_too():
    r, r1, r2, d1, d2 = _world()
    msgs = [d for d, _ in d2.outbound([ip4("10.0.0.2", "10.0.0.254")] * 6, T1)]
    res = r.inbound([(m, EP2) for m in msgs + msgs[2:4]], T1)
    assert len(res.to_tun) == 6 and r.drops["replayed counter"] == 2
    res = r.inbound([(m, EP2) for m in msgs], T1)
    assert not res.to_tun and r.drops["replayed counter"] == 8
    kp = r2.keypairs.current
    assert kp.replay.last == int.from_bytes(msgs[-1][8:16], "little")
