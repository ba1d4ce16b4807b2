"""The device's timer schedule (Device.next_deadline / tick): never late, and no call walks every
peer, whatever the number of peers (a relay with 10,000 peers wakes for the peers that changed)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from tunnel.noise import Device
from tunnel.noise.crypto import clamp, public_key
from tunnel.noise.timers import PeerTimers

from ..helpers import ip4


def _brute_min(device: Device) -> float | None:
    ds = [p.timers.next_deadline() for p in device.peers.values()]
    ds = [d for d in ds if d is not None]
    return min(ds) if ds else None


def _device(peers: int, keepalive=lambda i: 0) -> Device:
    dev = Device(clamp(os.urandom(32)), wall_offset=0.0)
    for i in range(peers):
        dev.add_peer(public_key(clamp(os.urandom(32))), endpoint=("192.0.2.1", 1000 + i),
                     allowed_ips=[f"10.{i >> 8 & 255}.{i & 255}.1/32"], persistent_keepalive=keepalive(i))
    return dev


class Counting:
    """Counts PeerTimers.next_deadline calls (the per-peer work of a schedule lookup)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        real = PeerTimers.next_deadline

        def counted(timers):
            self.calls += 1
            return real(timers)
        monkeypatch.setattr(PeerTimers, "next_deadline", counted)


def test_a_batch_to_one_peer_costs_one_peers_work_among_thousands(monkeypatch):
    dev = _device(3000)
    dev.outbound([ip4("10.99.0.1", f"10.0.{i}.1", b"x") for i in range(200)], 1.0)  # 200 handshakes start
    dev.next_deadline()
    count = Counting(monkeypatch)
    for t in range(10):
        dev.outbound([ip4("10.99.0.1", "10.0.7.1", b"x")] * 64, 2.0 + t * 0.01)
        dev.next_deadline()
    assert count.calls <= 10  # the old schedule walked all 3000 peers each time
    due = dev.tick(6.5)  # the 200 retries (5 s + jitter) come due together
    assert len(due) == 200
    assert count.calls <= 10 + 200 + 5


def test_never_late_with_keepalives_retries_and_removals():
    dev = _device(40, keepalive=lambda i: (i % 7) * 3)
    now = 0.0
    removed = 0
    for step in range(400):
        nd = dev.next_deadline()
        truth = _brute_min(dev)
        if truth is not None:
            assert nd is not None and nd <= truth, (step, nd, truth)  # never late
        now = max(now + 0.25, nd if nd is not None and nd > now else now)
        dev.tick(now)
        for p in dev.peers.values():  # after a tick at `now`, nothing due at `now` is left
            d = p.timers.next_deadline()
            assert d is None or d > now, (step, d, now)
        if step % 50 == 49 and dev.peers:
            dev.remove_peer(next(iter(dev.peers)))
            removed += 1
        if step % 30 == 0:
            dev.outbound([ip4("10.99.0.1", f"10.0.{step % 40}.1", b"d")], now)
    assert removed == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["send", "keepalive", "remove", "tick"]), st.integers(0, 9),
                          st.floats(0, 30)), max_size=40))
def test_schedule_matches_the_peers_timers(ops):
    dev = _device(10)
    keys = list(dev.peers)
    now = 0.0
    for op, i, dt in ops:
        now += dt
        pk = keys[i]
        peer = dev.peers.get(pk)
        if op == "send" and peer is not None:
            dev.outbound([ip4("10.99.0.1", f"10.0.{i}.1", b"x")], now)
        elif op == "keepalive" and peer is not None:
            dev.set_persistent_keepalive(peer, int(dt) % 5)
        elif op == "remove":
            dev.remove_peer(pk)
        else:
            dev.tick(now)
        nd = dev.next_deadline()
        truth = _brute_min(dev)
        if truth is not None:
            assert nd is not None and nd <= truth
        if nd is not None and nd != float("-inf") and truth is not None and nd < truth:
            dev.tick(nd)  # a stale entry: a tick with nothing to do brings it back in line
            assert dev.next_deadline() is None or dev.next_deadline() <= truth
