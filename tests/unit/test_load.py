"""Under load: cookie replies instead of handshakes, mac2 retries, per-source rate limiting."""

from __future__ import annotations

from tests.helpers import EP_A, Pair
from tunnel.noise import Drop
from tunnel.noise.constants import (
    HANDSHAKES_PER_BATCH,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
)
from tunnel.noise.ratelimit import RateLimiter


def loaded_pair() -> Pair:
    # Every handshake message puts the responder b under load (threshold 1), as a flood would.
    p = Pair()
    p.b.handshake_load_threshold = 1
    return p


def test_cookie_reply_then_retry_with_mac2_succeeds():
    p = loaded_pair()
    p.send_a()
    assert p.b.drops[Drop.COOKIE_SENT] == 1
    assert len(p.sent("b", MSG_COOKIE_REPLY)) == 1
    assert p.a.stats["cookie replies received"] == 1
    assert p.tun["b"] == [] and p.pb.keypairs.all() == []
    first = p.sent("a", MSG_INITIATION)[0].data
    assert first[-16:] == bytes(16)  # no cookie yet: mac2 is zero
    p.advance(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    retry = p.sent("a", MSG_INITIATION)[1].data
    assert retry[-16:] != bytes(16)  # the retry carries mac2
    assert len(p.tun["b"]) == 1, (p.a.drops, p.b.drops)
    assert p.b.drops[Drop.COOKIE_SENT] == 1


def test_cookie_bound_to_source_address():
    p = loaded_pair()
    p.send_a()
    p.advance(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    assert len(p.tun["b"]) == 1
    # the same mac2 from another address is worthless: another cookie reply, no handshake
    n = p.b.drops[Drop.COOKIE_SENT]
    init = p.sent("a", MSG_INITIATION)[-1].data
    res = p.b.inbound([(init, ("203.0.113.9", 1234))], p.now)
    assert [d[0] for d, _ in res.to_net] == [MSG_COOKIE_REPLY]
    assert p.b.drops[Drop.COOKIE_SENT] == n + 1


def test_cookie_reply_for_unknown_mac1_is_rejected():
    p = loaded_pair()
    p.send_a()
    reply = p.sent("b", MSG_COOKIE_REPLY)[0].data
    forged = bytearray(reply)
    forged[40] ^= 1
    assert p.a.inbound([(bytes(forged), p.addr["b"])], p.now).to_net == []
    assert p.a.drops[Drop.BAD_COOKIE] == 1


def test_rate_limit_holds_under_load():
    p = loaded_pair()
    p.send_a()  # cookie reply; a now holds a cookie
    p.advance(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)
    init = p.sent("a", MSG_INITIATION)[-1].data  # valid mac2 for EP_A
    before = p.b.drops[Drop.RATELIMIT]
    # 100 copies in the same instant from the same source: the bucket (burst 5) has been
    # partly spent by the accepted retry; everything past the burst is refused. (Sent in
    # batches within the per-batch handshake budget, as a socket delivers a flood.)
    send_100 = lambda: [p.b.inbound([(init, EP_A)] * n, p.now) for n in (16,) * 6 + (4,)]  # noqa: E731
    send_100()
    limited = p.b.drops[Drop.RATELIMIT] - before
    assert 95 <= limited <= 99
    # a second later, ~20 more pass
    p.now += 1.0
    before = p.b.drops[Drop.RATELIMIT]
    send_100()
    passed = 100 - (p.b.drops[Drop.RATELIMIT] - before)
    assert 5 <= passed <= 6
    assert p.b.drops[Drop.HANDSHAKE_BUDGET] == 0


def test_handshake_budget_per_batch():
    """At most HANDSHAKES_PER_BATCH valid-mac1 handshake messages of one batch go on; the rest
    are dropped and counted, but all count toward under load; invalid mac1 uses no budget."""
    p = Pair()
    p.send_a()
    init = p.sent("a", MSG_INITIATION)[0].data
    junk = bytearray(init)
    junk[-20] ^= 1  # mac1 broken
    batch = [(bytes(junk), EP_A)] * 50 + [(init, EP_A)] * (HANDSHAKES_PER_BATCH + 10)
    p.b.inbound(batch, p.now)
    assert p.b.drops[Drop.MAC1] == 50
    assert p.b.drops[Drop.HANDSHAKE_BUDGET] == 10
    assert p.b._load_count == HANDSHAKES_PER_BATCH + 10 + 1  # and the first, real, initiation


def test_ratelimiter_bucket():
    rl = RateLimiter()
    assert [rl.allow("1.2.3.4", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert rl.allow("5.6.7.8", 0.0)  # per source
    assert rl.allow("1.2.3.4", 0.05)  # 1/20 s refills one token
    assert not rl.allow("1.2.3.4", 0.05)
    assert [rl.allow("1.2.3.4", 10.0) for _ in range(6)] == [True] * 5 + [False]


def test_ratelimiter_memory_bounded():
    rl = RateLimiter(max_entries=100)
    for i in range(1000):
        rl.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(rl) == 100
    rl.allow("new", 5.0)  # stale entries are swept
    assert len(rl) == 1


def test_not_under_load_without_flood():
    p = Pair()
    p.send_a()
    assert len(p.tun["b"]) == 1
    assert p.b.drops[Drop.COOKIE_SENT] == 0 and not p.b.under_load(p.now)
