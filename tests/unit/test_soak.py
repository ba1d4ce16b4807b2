"""A long soak in memory: two whole engines through a link with loss, duplication, reordering and
delay (with jitter), four hours of driven clock with outages of 30 s to 15 min in between, dozens
of rekeys. After every outage delivery resumes within a bound; no keypair is ever kept or used
past its limits (sent under only while younger than REJECT_AFTER_TIME; zeroed in a silence
longer than ZERO_KEYS_AFTER); no table grows (receiver indices, staged packets, the rate limiter's table, the
timer schedule)."""

from __future__ import annotations

import trio

from transport.memory import MemoryNetwork
from tunnel.noise.constants import REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, ZERO_KEYS_AFTER

from ..helpers import ip4
from .test_engine import A_IN, B_IN, socket_dir, start_pair  # noqa: F401

HOURS = 4
STEP = 5.0  # a packet each way every STEP seconds
OUTAGES = [(1800, 30), (3600, 120), (6000, 400), (9000, 900)]  # (start, length) in seconds
RESUME_WITHIN = 40.0  # after an outage: a new handshake (data asks at once) through 10% loss


async def test_soak_hours_with_delay_outages_and_rekeys(socket_dir, autojump_clock):  # noqa: F811
    net = MemoryNetwork(loss=0.1, duplicate=0.05, reorder=0.05, delay=0.03, jitter=0.15, seed=2026)
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir, keepalive=25)
        devices = [(a.engine.device, a, b), (b.engine.device, b, a)]
        start = trio.current_time()
        sent = delivered = 0
        last_delivery = start
        resumed: list[float] = []
        pending_outage_end: float | None = None
        n = 0
        counters: dict[int, tuple[int, float]] = {}  # keypair -> (send counter, when seen)
        zeroed_in_silence = 0
        while (t := trio.current_time() - start) < HOURS * 3600:
            down = any(s <= t < s + length for s, length in OUTAGES)
            if net.partitioned and not down:
                pending_outage_end = t
            net.partitioned = down
            a.tun.inject(ip4(A_IN, B_IN, b"a%d" % n))
            b.tun.inject(ip4(B_IN, A_IN, b"b%d" % n))
            sent += 2
            n += 1
            await trio.sleep(STEP)
            got = len(a.tun.written) + len(b.tun.written)
            a.tun.written.clear()
            b.tun.written.clear()
            now = trio.current_time()
            if got:
                delivered += got
                last_delivery = now
                if pending_outage_end is not None:
                    resumed.append(now - start - pending_outage_end)
                    pending_outage_end = None
            if down:
                assert got == 0 or t - max(s for s, _ in OUTAGES if s <= t) < 1  # in flight at the cut
            else:  # silent no longer than the bound, counted from the end of the latest outage
                ended = max((start + s0 + length for s0, length in OUTAGES if s0 + length <= t), default=start)
                assert now - max(last_delivery, ended) <= RESUME_WITHIN + STEP, (t, now - last_delivery)
            for dev, node, other in devices:
                peer = dev.peers[other.public]
                for kp in peer.keypairs.all():
                    # Sent under only while young enough; never past the message limit.
                    before = counters.get(id(kp))
                    if before is not None and kp.send_counter > before[0]:
                        assert before[1] - kp.created < REJECT_AFTER_TIME, (t, before[1] - kp.created)
                    counters[id(kp)] = (kp.send_counter, now)
                    assert kp.send_counter < REJECT_AFTER_MESSAGES
                outage = max((s0 for s0, length in OUTAGES if s0 <= t < s0 + length), default=None)
                if outage is not None and t - outage > ZERO_KEYS_AFTER + 3 * STEP:
                    assert not peer.keypairs.all(), t  # key material zeroed in a long silence
                    zeroed_in_silence += 1
                assert len(dev._index) <= 4  # current, previous, next keypair + a handshake
                assert len(peer.staged) <= dev.staged_queue_size
                assert len(dev.ratelimiter._table) <= 4
                assert len(dev._heap) <= 2 * len(dev._scheduled) + 64
        handshakes = a.engine.device.stats["handshakes completed"] + b.engine.device.stats["handshakes completed"]
        assert handshakes >= HOURS * 3600 / 180 * 0.8, handshakes  # rekeys every ~2-3 minutes
        assert zeroed_in_silence > 0
        assert len(resumed) == len(OUTAGES) and max(resumed) <= RESUME_WITHIN, resumed
        outage_steps = sum(length for _, length in OUTAGES) / STEP * 2
        assert delivered >= 0.6 * (sent - outage_steps), (delivered, sent)
        assert net.drops.reasons["lost"] > 100 and net.drops.reasons["partitioned"] > 100
        nursery.cancel_scope.cancel()
