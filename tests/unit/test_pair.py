"""Two devices in memory with a driven clock: handshakes, data, timers, rekeying, roaming."""

from __future__ import annotations

import pytest

from tests.helpers import EP_A, EP_B, Pair, ip4, ip6
from transport.base import Endpoint
from tunnel.noise import Drop
from tunnel.noise.constants import (
    MAX_TIMER_HANDSHAKES,
    MSG_INITIATION,
    MSG_RESPONSE,
    MSG_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    STAGED_QUEUE_SIZE,
)


def keepalives(pair: Pair, sender: str, since: float = float("-inf")):
    return [w for w in pair.sent(sender, MSG_TRANSPORT, since) if len(w.data) == 32]


def test_handshake_initiated_by_a_and_data_both_ways():
    p = Pair()
    pkt = ip4("10.9.0.1", "10.9.0.2", b"ping")
    p.send_a(pkt)
    assert p.tun["b"] == [pkt]
    assert len(p.sent("a", MSG_INITIATION)) == 1 and len(p.sent("b", MSG_RESPONSE)) == 1
    reply = ip4("10.9.0.2", "10.9.0.1", b"pong")
    p.send_b(reply)
    assert p.tun["a"] == [reply]
    assert p.pa.last_handshake_wall is not None and p.pb.last_handshake_wall is not None
    assert p.pa.tx_bytes > 0 and p.pb.rx_bytes > 0
    assert not p.a.drops and not p.b.drops


def test_handshake_initiated_by_b():
    p = Pair()
    pkt = ip4("10.9.0.2", "10.9.0.1")
    p.send_b(pkt)
    assert p.tun["a"] == [pkt]
    assert p.sent("b", MSG_INITIATION) and p.sent("a", MSG_RESPONSE)
    p.send_a()
    assert len(p.tun["b"]) == 1


def test_ipv6_inside():
    p = Pair()
    pkt = ip6("fd00::1", "fd00::2", b"six")
    p.send_a(pkt)
    assert p.tun["b"] == [pkt]
    back = ip6("fd00::2", "fd00::1", b"xis")
    p.send_b(back)
    assert p.tun["a"] == [back]


def test_padding_is_trimmed_and_multiple_of_16():
    p = Pair()
    p.handshake()
    for n in (1, 15, 16, 17, 100, 1400):
        pkt = ip4("10.9.0.1", "10.9.0.2", b"x" * n)
        p.send_a(pkt)
        assert p.tun["b"][-1] == pkt
        wire = p.wire[-1].data
        assert (len(wire) - 32) % 16 == 0 or len(wire) - 32 == p.a.mtu


def test_matching_psk_works_and_wrong_psk_fails():
    psk = bytes(range(32))
    good = Pair(psk_a=psk, psk_b=psk)
    good.send_a()
    assert len(good.tun["b"]) == 1

    bad = Pair(psk_a=psk, psk_b=bytes(32))
    bad.send_a()
    assert bad.tun["b"] == []
    assert bad.a.drops[Drop.BAD_RESPONSE] == 1
    assert bad.pa.keypairs.current is None


def test_queued_packets_delivered_in_order_after_handshake():
    p = Pair()
    p.deliver = lambda sender, data: False  # network down while we queue
    pkts = [ip4("10.9.0.1", "10.9.0.2", bytes([i]) * 10) for i in range(5)]
    for pkt in pkts:
        p.send_a(pkt)
    assert len(p.pa.staged) == 5
    p.deliver = lambda sender, data: True
    p.advance(REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX)  # the retry gets through
    assert p.tun["b"] == pkts
    assert not p.pa.staged


def test_staged_queue_is_bounded():
    p = Pair()
    p.deliver = lambda sender, data: False
    p.send_a(*[ip4("10.9.0.1", "10.9.0.2", i.to_bytes(2, "big")) for i in range(STAGED_QUEUE_SIZE + 10)])
    assert len(p.pa.staged) == STAGED_QUEUE_SIZE
    assert p.a.drops[Drop.STAGED_FULL] == 10
    assert p.pa.staged[0][-2:] == (10).to_bytes(2, "big")  # the oldest went first


def test_responder_keeps_next_until_first_data_then_promotes():
    p = Pair()
    init = p.a.outbound([ip4("10.9.0.1", "10.9.0.2")], p.now)
    res = p.b.inbound([(init[0][0], EP_A)], p.now)
    assert p.pb.keypairs.next is not None and p.pb.keypairs.current is None
    nxt = p.pb.keypairs.next
    # b cannot send under an unconfirmed keypair: its packet waits
    out = p.b.outbound([ip4("10.9.0.2", "10.9.0.1")], p.now)
    assert all(d[0] != MSG_TRANSPORT for d, _ in out)
    assert len(p.pb.staged) == 1
    res2 = p.a.inbound([(res.to_net[0][0], EP_B)], p.now)
    confirm = res2.to_net  # a's staged packet, under the new session
    assert confirm and confirm[0][0][0] == MSG_TRANSPORT
    res3 = p.b.inbound([(confirm[0][0], EP_A)], p.now)
    assert p.pb.keypairs.current is nxt and p.pb.keypairs.next is None
    # promotion flushed b's staged packet to a
    assert [d[0] for d, _ in res3.to_net] == [MSG_TRANSPORT]
    assert p.a.inbound([(res3.to_net[0][0], EP_B)], p.now).to_tun


def test_simultaneous_initiation_resolves():
    p = Pair()
    out_a = p.a.outbound([ip4("10.9.0.1", "10.9.0.2", b"from a")], p.now)
    out_b = p.b.outbound([ip4("10.9.0.2", "10.9.0.1", b"from b")], p.now)
    assert out_a[0][0][0] == out_b[0][0][0] == MSG_INITIATION
    # both initiations cross on the wire
    p._route("a", out_a)
    p._route("b", out_b)
    p.advance(3 * (REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX))
    assert [pk[-6:] for pk in p.tun["b"]] == [b"from a"]
    assert [pk[-6:] for pk in p.tun["a"]] == [b"from b"]
    p.send_a()
    p.send_b()
    assert len(p.tun["b"]) == 2 and len(p.tun["a"]) == 2


def test_rekey_after_120s_loses_no_packets():
    p = Pair()
    sent = 0
    first_index = None
    for second in range(400):
        p.send_a(ip4("10.9.0.1", "10.9.0.2", second.to_bytes(4, "big")))
        p.send_b(ip4("10.9.0.2", "10.9.0.1", second.to_bytes(4, "big")))
        sent += 1
        if first_index is None:
            first_index = p.pa.keypairs.current.local_index
        p.advance(1.0)
    assert len(p.tun["b"]) == sent and len(p.tun["a"]) == sent
    assert [pk[-4:] for pk in p.tun["b"]] == [i.to_bytes(4, "big") for i in range(sent)]
    # a rekeyed every ~120 s (it is the initiator); 400 s -> at least 3 handshakes
    inits = p.sent("a", MSG_INITIATION)
    assert len(inits) >= 3
    assert inits[1].time - inits[0].time == pytest.approx(120, abs=2)
    assert p.pa.keypairs.current.local_index != first_index
    assert not p.a.drops and not p.b.drops


def test_passive_keepalive_after_10s():
    p = Pair()
    p.handshake()  # b got data from a; b has nothing to send
    t0 = p.now
    p.advance(9.9)
    assert keepalives(p, "b", since=t0) == []
    p.advance(0.2)
    ka = keepalives(p, "b", since=t0)
    assert len(ka) == 1 and ka[0].time == pytest.approx(t0 + 10)
    p.advance(60)
    assert len(keepalives(p, "b", since=t0)) == 1  # no data since: no more keepalives


def test_no_passive_keepalive_when_reply_sent():
    p = Pair()
    p.handshake()
    t0 = p.now
    p.advance(3)
    p.send_b()
    p.advance(20)
    assert keepalives(p, "b", since=t0) == []


def test_persistent_keepalive():
    p = Pair()
    p.a.set_persistent_keepalive(p.pa, 25)
    p.tick()  # turning it on sends a keepalive now: that starts the handshake
    assert p.pa.keypairs.current is not None
    t0 = p.now
    p.advance(100.5)
    times = [w.time - t0 for w in keepalives(p, "a", since=t0 + 0.001)]
    assert times == pytest.approx([25, 50, 75, 100])


def test_retries_every_5s_then_give_up():
    p = Pair()
    p.deliver = lambda sender, data: sender != "a"  # a's datagrams vanish
    p.send_a()
    p.advance(200)
    inits = p.sent("a", MSG_INITIATION)
    gaps = [b.time - a.time for a, b in zip(inits, inits[1:])]
    assert all(REKEY_TIMEOUT <= g <= REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX for g in gaps), gaps
    assert len(inits) == MAX_TIMER_HANDSHAKES + 2  # the first plus 19 retries, as wireguard-go
    assert inits[-1].time - inits[0].time >= 90
    assert p.a.stats["handshake attempts given up"] == 1
    assert not p.pa.staged and p.a.drops[Drop.GAVE_UP] == 1
    # new traffic starts a fresh round of attempts
    n = len(inits)
    p.send_a()
    assert len(p.sent("a", MSG_INITIATION)) == n + 1


def test_new_handshake_when_nothing_comes_back():
    p = Pair()
    p.handshake()
    p.advance(11)  # b's passive keepalive arrives; everything quiet
    t0 = p.now
    p.deliver = lambda sender, data: sender != "b"  # b goes silent
    p.send_a()
    p.advance(14.9)
    assert p.sent("a", MSG_INITIATION, since=t0) == []
    p.advance(0.5)
    inits = p.sent("a", MSG_INITIATION, since=t0)
    assert len(inits) == 1 and 15 <= inits[0].time - t0 <= 15 + REKEY_TIMEOUT_JITTER_MAX


def test_keys_zeroed_after_540s():
    p = Pair()
    p.handshake()
    t0 = p.now
    assert p.pa.keypairs.current is not None
    p.advance(539)
    assert p.pa.keypairs.current is not None
    p.advance(2)
    assert p.pa.keypairs.all() == [] and p.pb.keypairs.all() == []
    assert p.a._index == {} and p.b._index == {}
    assert p.a.stats["key material zeroed"] == 1
    # and a new handshake works afterwards
    p.send_a()
    assert len(p.tun["b"]) == 1


def test_keypair_expires_after_reject_after_time():
    p = Pair()
    p.handshake()
    kp = p.pa.keypairs.current
    stale = p.a.outbound([ip4("10.9.0.1", "10.9.0.2")], p.now)[0][0]
    p.now += 180.5
    assert not kp.can_send(p.now)
    res = p.b.inbound([(stale, EP_A)], p.now)
    assert res.to_tun == [] and p.b.drops[Drop.EXPIRED_KEYPAIR] == 1


def test_rekey_after_messages_and_reject_after_messages():
    p = Pair()
    p.handshake()
    kp = p.pa.keypairs.current
    kp.send_counter = REKEY_AFTER_MESSAGES + 1
    n = len(p.sent("a", MSG_INITIATION))
    p.now += REKEY_TIMEOUT + 1
    p.send_a()
    assert len(p.sent("a", MSG_INITIATION)) == n + 1
    assert p.pa.keypairs.current is not kp
    kp2 = p.pa.keypairs.current
    kp2.send_counter = REJECT_AFTER_MESSAGES
    assert not kp2.can_send(p.now)


def test_replayed_transport_dropped():
    p = Pair()
    p.handshake()
    out = p.a.outbound([ip4("10.9.0.1", "10.9.0.2")], p.now)
    assert len(p.b.inbound([(out[0][0], EP_A)], p.now).to_tun) == 1
    assert p.b.inbound([(out[0][0], EP_A)], p.now).to_tun == []
    assert p.b.drops[Drop.REPLAY] == 1


def test_inner_source_must_be_allowed():
    p = Pair()
    p.handshake()
    spoof = ip4("10.9.0.99", "10.9.0.1")  # b may only send as 10.9.0.2
    p.send_b(spoof)
    assert p.tun["a"] == []
    assert p.a.drops[Drop.SOURCE_NOT_ALLOWED] == 1


def test_no_route_dropped():
    p = Pair()
    assert p.a.outbound([ip4("10.9.0.1", "10.200.0.1")], p.now) == []
    assert p.a.drops[Drop.NO_ROUTE] == 1
    assert p.a.outbound([b"\x00" * 10, b""], p.now) == []
    assert p.a.drops[Drop.BAD_OUTBOUND] == 2


def test_roaming_follows_authenticated_source():
    p = Pair()
    p.handshake()
    new_ep = Endpoint("203.0.113.7", 40000)
    p.addr["a"] = new_ep  # a's underlay address changes (NAT rebinding, new network)
    p.send_a()
    assert p.pb.endpoint == new_ep
    p.send_b(ip4("10.9.0.2", "10.9.0.1", b"follow"))
    assert p.tun["a"][-1].endswith(b"follow")
    # a forged datagram from elsewhere does not move the endpoint
    p.b.inbound([(b"\x04\0\0\0" + bytes(40), Endpoint("192.0.2.66", 1))], p.now)
    assert p.pb.endpoint == new_ep


def test_pinned_endpoint_does_not_roam():
    """A peer pinned to a path (a bridge) keeps its endpoint whatever source its authenticated
    packets come from, and handshake responses go to the endpoint, not to the source."""
    p = Pair()
    p.a.set_endpoint(p.pa, EP_B, pinned=True)
    assert p.pa.pinned and p.pa.endpoint == EP_B
    elsewhere = Endpoint("203.0.113.7", 40000)  # b reaches a another way
    init = [d for d, _ in p.b.outbound([ip4("10.9.0.2", "10.9.0.1")], p.now)]
    assert init and init[0][0] == 1
    res = p.a.inbound([(init[0], elsewhere)], p.now)
    assert [(d[0], ep) for d, ep in res.to_net] == [(2, EP_B)]
    assert p.pa.endpoint == EP_B
    # The session works, and authentic data from elsewhere does not move the endpoint either.
    res = p.b.inbound([(res.to_net[0][0], EP_A)], p.now)
    for data, _ in res.to_net:
        p.a.inbound([(data, elsewhere)], p.now)
    p.send_b(ip4("10.9.0.2", "10.9.0.1", b"data"))
    assert p.pa.endpoint == EP_B
    p.addr["b"] = elsewhere
    p.send_b(ip4("10.9.0.2", "10.9.0.1", b"moved"))
    assert p.tun["a"][-1].endswith(b"moved")  # accepted: it is authentic
    assert p.pa.endpoint == EP_B


def test_pinned_endpoint_without_endpoint_answers_nothing():
    p = Pair(b_endpoint_of_a=None)
    p.b.set_endpoint(p.pb, None, pinned=True)
    p.send_a()
    assert p.tun["b"] == [] and p.pb.endpoint is None
    assert p.b.drops[Drop.NO_ENDPOINT] == 1


def test_set_endpoint_pins_and_unpinning_restores_roaming():
    p = Pair()
    assert not p.pb.pinned  # add_peer(endpoint=...) leaves the peer roaming
    via_bridge = Endpoint("192.0.2.1", 51820, via=1)  # the same address, through transport 1
    p.b.set_endpoint(p.pb, via_bridge, pinned=True)
    init = p.a.outbound([ip4("10.9.0.1", "10.9.0.2")], p.now)
    res = p.b.inbound([(init[0][0], EP_A)], p.now)  # arrives over plain UDP
    assert [ep for _, ep in res.to_net] == [via_bridge] and p.pb.endpoint == via_bridge
    p.b.set_endpoint(p.pb, via_bridge)  # unpinned: the next authenticated packet moves it
    assert not p.pb.pinned and p.pb.endpoint == via_bridge
    data = p.a.inbound([(res.to_net[0][0], EP_B)], p.now).to_net
    assert len(p.b.inbound([(data[0][0], EP_A)], p.now).to_tun) == 1
    assert p.pb.endpoint == EP_A
    p.b.set_endpoint(p.pb, None)
    assert p.pb.endpoint is None and not p.pb.pinned


@pytest.mark.parametrize("kind", ["initiation", "response", "transport"])
@pytest.mark.parametrize("pinned", [False, True])
def test_one_endpoint_rule_for_every_authenticated_message(kind, pinned):
    """Initiations, responses and transport data all go through the same rule: a roaming peer
    moves to the source, a pinned one stays (and answers go to the pinned endpoint)."""
    p = Pair()
    elsewhere = Endpoint("203.0.113.7", 40000)
    if kind == "initiation":  # a initiates; b receives it from elsewhere
        p.b.set_endpoint(p.pb, EP_A, pinned=pinned)
        init = p.a.outbound([ip4("10.9.0.1", "10.9.0.2")], p.now)
        res = p.b.inbound([(init[0][0], elsewhere)], p.now)
        assert [(d[0], ep) for d, ep in res.to_net] == [(MSG_RESPONSE, EP_A if pinned else elsewhere)]
    elif kind == "response":  # b initiates; the response comes from elsewhere
        p.b.set_endpoint(p.pb, EP_A, pinned=pinned)
        init = p.b.outbound([ip4("10.9.0.2", "10.9.0.1")], p.now)
        resp = p.a.inbound([(init[0][0], EP_B)], p.now).to_net
        res = p.b.inbound([(resp[0][0], elsewhere)], p.now)
        assert p.pb.keypairs.current is not None  # authenticated
        assert {ep for _, ep in res.to_net} == {EP_A if pinned else elsewhere}
    else:
        p.handshake()
        p.b.set_endpoint(p.pb, EP_A, pinned=pinned)
        data = p.a.outbound([ip4("10.9.0.1", "10.9.0.2", b"x")], p.now)
        assert len(p.b.inbound([(data[0][0], elsewhere)], p.now).to_tun) == 1
    assert p.pb.endpoint == (EP_A if pinned else elsewhere)
    assert p.pb.pinned == pinned


def test_roaming_in_a_batch_follows_the_order_of_datagrams():
    """Transport data applies the rule once per peer per batch, but as if per datagram: the
    last source wins, and packets staged for key confirmation go where the peer now is."""
    p = Pair()
    p.handshake()
    one, two = Endpoint("203.0.113.1", 1), Endpoint("203.0.113.2", 2)
    out = p.a.outbound([ip4("10.9.0.1", "10.9.0.2", bytes([i])) for i in range(3)], p.now)
    res = p.b.inbound([(out[0][0], one), (out[1][0], two), (out[2][0], one)], p.now)
    assert len(res.to_tun) == 3 and p.pb.endpoint == one
    # data, then a new initiation from elsewhere in the same batch: the initiation is later
    p.now += 1.0
    data = p.a.outbound([ip4("10.9.0.1", "10.9.0.2")], p.now)
    init = _fresh_initiation(p, 1.0)
    res = p.b.inbound([(data[0][0], one), (init, two)], p.now)
    assert [(d[0], ep) for d, ep in res.to_net] == [(MSG_RESPONSE, two)] and p.pb.endpoint == two
    # b as responder: its reply waits for key confirmation, then goes to the confirming source
    q = Pair()
    init = q.a.outbound([ip4("10.9.0.1", "10.9.0.2")], q.now)  # staged at a
    resp = q.b.inbound([(init[0][0], EP_A)], q.now).to_net
    q.b.outbound([ip4("10.9.0.2", "10.9.0.1", b"staged")], q.now)  # waits for confirmation
    assert q.pb.staged
    confirm = q.a.inbound([(resp[0][0], EP_B)], q.now).to_net
    res = q.b.inbound([(confirm[0][0], two)], q.now)
    assert [ep for _, ep in res.to_net] == [two] and q.pb.endpoint == two


def test_responder_without_endpoint_learns_it():
    p = Pair(b_endpoint_of_a=None)
    p.send_a()
    assert len(p.tun["b"]) == 1
    assert p.pb.endpoint == EP_A
    p.send_b()
    assert len(p.tun["a"]) == 1


def test_batches_route_once_and_keep_order():
    p = Pair()
    p.handshake()
    batch = [ip4("10.9.0.1", "10.9.0.2", i.to_bytes(2, "big")) for i in range(64)]
    batch += [ip6("fd00::1", "fd00::2", i.to_bytes(2, "big")) for i in range(64)]
    out = p.a.outbound(batch, p.now)
    assert len(out) == 128
    counters = [int.from_bytes(d[8:16], "little") for d, _ in out]
    assert counters == sorted(counters)
    res = p.b.inbound([(d, EP_A) for d, _ in out], p.now)
    assert res.to_tun == batch


def test_remove_peer_and_change_private_key():
    p = Pair()
    p.handshake()
    p.a.remove_peer(p.pa.public_key)
    assert p.a._index == {} and p.a.outbound([ip4("10.9.0.1", "10.9.0.2")], p.now) == []
    q = Pair()
    q.handshake()
    kp = q.pa.keypairs.current
    q.a.set_private_key(bytes(range(32)))
    assert not kp.can_send(q.now)


def _fresh_initiation(p: Pair, wall_shift: float) -> bytes:
    """A new initiation from a, as if a's clock read `wall_shift` seconds later."""
    p.pa.handshake.last_sent_handshake = None  # lift a's own 5 s rate limit for the test
    p.a.wall_offset += wall_shift
    out = []
    p.a._send_initiation(p.pa, p.now, out, is_retry=False)
    return out[0][0]


def test_replayed_initiation_rejected_by_timestamp():
    p = Pair()
    first = _fresh_initiation(p, 0)
    assert p.b.inbound([(first, EP_A)], p.now).to_net
    p.now += 1.0  # well past the flood window: only the timestamp can reject it
    assert p.b.inbound([(first, EP_A)], p.now).to_net == []
    assert p.b.drops[Drop.BAD_INITIATION] == 1
    older = _fresh_initiation(p, -10)  # a clock that went backwards
    assert p.b.inbound([(older, EP_A)], p.now).to_net == []
    assert p.b.drops[Drop.BAD_INITIATION] == 2


def test_initiation_flood_rejected_within_20ms():
    p = Pair()
    assert p.b.inbound([(_fresh_initiation(p, 0), EP_A)], p.now).to_net
    p.now += 0.010
    assert p.b.inbound([(_fresh_initiation(p, 1), EP_A)], p.now).to_net == []
    assert p.b.drops[Drop.BAD_INITIATION] == 1
    p.now += 0.015
    assert p.b.inbound([(_fresh_initiation(p, 1), EP_A)], p.now).to_net


def test_initiator_rekeys_on_receive_after_165s():
    p = Pair()
    p.handshake()
    created = p.pa.keypairs.current.created
    # b sends only keepalives (no data): a has no reason to send, so only the receive rule
    # can make it rekey before its keypair expires at 180 s.
    p.b.set_persistent_keepalive(p.pb, 25)
    p.advance(200)
    inits = p.sent("a", MSG_INITIATION, since=created + 1)
    assert inits, "initiator never rekeyed"
    assert 165 < inits[0].time - created <= 190
    assert p.sent("b", MSG_INITIATION) == []

