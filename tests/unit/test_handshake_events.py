"""Handshake events (issue 12, item 14): the sans-IO core reports them, the engine logs them at
debug level as wireguard-go does at verbose level; peers named peer(AbCd…wxYz), never a key;
nothing recorded unless someone listens, nothing per transport packet, floods capped."""

from __future__ import annotations

import base64
import logging
import random

import trio

from transport.base import UDP, Endpoint
from transport.memory import MemoryNetwork
from tunnel import daemon
from tunnel.noise import Device
from tunnel.noise.constants import MAX_TIMER_HANDSHAKES, MSG_INITIATION
from tunnel.noise.events import EVENTS_PER_SECOND, Event, Kind, describe, short_key
from tunnel.noise.crypto import public_key

from ..helpers import EP_A, Pair, ip4
from .test_engine import A_IN, B_IN, Node, peer_lines, socket_dir, start_pair  # noqa: F401


def kinds(dev: Device) -> list[str]:
    return [e.kind for e in dev.events]


def listening_pair(**kw) -> Pair:
    p = Pair(**kw)
    p.a.events, p.b.events = [], []
    return p


# ---------------------------------------------------------------------------- the core


def test_nothing_is_recorded_unless_someone_listens():
    p = Pair()
    p.handshake()
    p.send_a(*[ip4("10.9.0.1", "10.9.0.2", b"x%d" % i) for i in range(50)])
    assert p.a.events is None and p.b.events is None


def test_a_handshake_reports_both_sides():
    p = listening_pair()
    p.handshake()
    pa, pb = p.pa.public_key, p.pb.public_key  # a's peer is b, b's peer is a
    assert kinds(p.a) == [Kind.INITIATION_SENT, Kind.RESPONSE_RECEIVED, Kind.KEYPAIR_CREATED,
                          Kind.HANDSHAKE_COMPLETED]
    assert all(e.peer == pa for e in p.a.events)
    # b: initiation in, keypair, response out; completed when a's first data confirms the keys.
    assert kinds(p.b) == [Kind.INITIATION_RECEIVED, Kind.KEYPAIR_CREATED, Kind.RESPONSE_SENT,
                          Kind.HANDSHAKE_COMPLETED]
    assert all(e.peer == pb for e in p.b.events)
    assert p.b.events[0].source == EP_A
    created = p.a.events[2]
    assert created.value == p.pa.keypairs.current.local_index


def test_no_event_per_transport_packet():
    p = listening_pair()
    p.handshake()
    p.a.events.clear(), p.b.events.clear()
    for i in range(20):
        p.send_a(*[ip4("10.9.0.1", "10.9.0.2", b"%d" % j) for j in range(10)])
        p.send_b()
    assert p.a.events == [] and p.b.events == []


def test_invalid_initiation_names_its_source():
    """An initiation with a valid mac1 (it knows b's public key) from a key b does not know."""
    p = listening_pair()
    stranger = Device(bytes(range(1, 33)), wall_offset=0.0)
    peer = stranger.add_peer(public_key(p.key_b), endpoint=Endpoint("203.0.113.7", 4000, UDP))
    (init, _), = stranger.outbound_to(peer, [ip4("10.9.0.9", "10.9.0.2")], p.now)
    src = Endpoint("203.0.113.7", 4000, UDP)
    p.b.inbound([(init, src)], p.now)
    assert p.b.events == [Event(Kind.INVALID_INITIATION, None, src)]
    assert describe(p.b.events[0]) == "received invalid initiation message from 203.0.113.7:4000"


def test_invalid_mac1_and_response_and_cookie_name_their_source():
    p = listening_pair()
    src = Endpoint("2001:db8::5", 9, UDP)
    rng = random.Random(3)
    p.b.inbound([(b"\x01\0\0\0" + rng.randbytes(144), src)], p.now)  # initiation-sized, bad mac1
    p.b.inbound([(b"\x03\0\0\0" + rng.randbytes(60), src)], p.now)  # cookie reply, no such index
    assert [(e.kind, e.source) for e in p.b.events] == [(Kind.INVALID_MAC1, src), (Kind.INVALID_COOKIE, src)]
    assert describe(p.b.events[0]) == "received handshake message with invalid mac1 from [2001:db8::5]:9"


def test_a_flood_is_capped_per_second_and_the_rest_counted():
    p = listening_pair()
    rng = random.Random(4)
    junk = [(b"\x01\0\0\0" + rng.randbytes(144), Endpoint("198.51.100.9", 1000 + i, UDP)) for i in range(128)]
    for _ in range(10):
        p.b.inbound(junk, p.now)
    assert len(p.b.events) == EVENTS_PER_SECOND
    p.b.events.clear()
    p.now += 1.0
    p.b.inbound(junk[:1], p.now)
    assert p.b.events[0] == Event(Kind.SUPPRESSED, value=10 * 128 - EVENTS_PER_SECOND)
    assert p.b.events[1].kind == Kind.INVALID_MAC1
    assert describe(p.b.events[0]).startswith(f"{10 * 128 - EVENTS_PER_SECOND} more handshake events")


def test_timers_report_retries_giving_up_and_silence():
    p = listening_pair()
    p.handshake()
    p.a.events.clear()
    p.deliver = lambda sender, data: False  # the link is cut
    p.send_a()
    p.advance(16)  # no answer to data for 15 s: a new handshake
    assert Kind.STOPPED_HEARING in kinds(p.a)
    assert describe(next(e for e in p.a.events if e.kind == Kind.STOPPED_HEARING)).endswith(
        "retrying handshake because we stopped hearing back after 15 seconds")
    p.advance(120)
    retries = [e.value for e in p.a.events if e.kind == Kind.RETRY]
    assert retries[:3] == [2, 3, 4]  # wireguard-go's numbering: the first retry is try 2
    gave_up = [e for e in p.a.events if e.kind == Kind.GAVE_UP]
    assert len(gave_up) == 1 and gave_up[0].value == MAX_TIMER_HANDSHAKES + 2
    assert len([e for e in p.a.events if e.kind == Kind.INITIATION_SENT]) == len(retries) + 1
    p.advance(600)
    assert Kind.KEYS_ZEROED in kinds(p.a)


def test_cookie_reply_under_load_is_reported_on_both_sides():
    p = listening_pair()
    p.b.handshake_load_threshold = 1
    p.send_a()  # b under load: cookie reply; a takes the cookie
    assert Kind.COOKIE_SENT in kinds(p.b)
    assert Kind.COOKIE_RECEIVED in kinds(p.a)


def test_peer_short_form_is_wireguard_gos():
    key = bytes(range(32))
    text = base64.b64encode(key).decode()
    assert short_key(key) == f"peer({text[:4]}…{text[39:43]})"
    line = describe(Event(Kind.INITIATION_SENT, key))
    assert line == f"peer({text[:4]}…{text[39:43]}) - sending handshake initiation"
    assert text not in line


# ---------------------------------------------------------------------------- the engine's log


def _text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


async def test_engine_logs_handshakes_at_debug_and_never_a_key(socket_dir, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG, logger="wgpy")
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir)
        a.tun.inject(ip4(A_IN, B_IN, b"hello"))
        with trio.fail_after(5):
            await b.tun.next_written()
        # a stranger's initiation reaches b
        stranger = Device(bytes(range(1, 33)), wall_offset=0.0)
        peer = stranger.add_peer(b.public, endpoint=Endpoint("192.0.2.1", 51820, UDP))
        (init, _), = stranger.outbound_to(peer, [ip4("10.9.0.9", B_IN)], trio.current_time())
        assert init[0] == MSG_INITIATION
        net.transports[("198.51.100.2", 51821)].arrive(init, ("203.0.113.66", 777))
        with trio.fail_after(5):
            while "invalid initiation" not in _text(caplog):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    text = _text(caplog)
    sa, sb = short_key(a.public), short_key(b.public)
    assert f"wga: {sb} - sending handshake initiation" in text
    assert f"wga: {sb} - received handshake response from 198.51.100.2:51821" in text
    assert f"wga: {sb} - handshake completed" in text
    assert f"wgb: {sa} - received handshake initiation from 192.0.2.1:51820" in text
    assert f"wgb: {sa} - sending handshake response" in text
    assert "keypair" in text and f"wgb: {sa} - handshake completed" in text
    assert "wgb: received invalid initiation message from 203.0.113.66:777" in text
    for secret in (a.key, b.key):
        assert secret.hex() not in text and base64.b64encode(secret).decode() not in text
    assert all(r.levelno == logging.DEBUG for r in caplog.records if "handshake" in r.getMessage())


async def test_engine_logs_the_retry_after_silence(socket_dir, caplog, autojump_clock):  # noqa: F811
    caplog.set_level(logging.DEBUG, logger="wgpy")
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir)
        a.tun.inject(ip4(A_IN, B_IN, b"hello"))
        with trio.fail_after(5):
            await b.tun.next_written()
        net.partitioned = True
        a.tun.inject(ip4(A_IN, B_IN, b"lost"))
        await trio.sleep(22)
        nursery.cancel_scope.cancel()
    text = _text(caplog)
    assert "retrying handshake because we stopped hearing back after 15 seconds" in text
    assert "handshake did not complete after 5 seconds, retrying (try 2)" in text


async def test_engine_collects_nothing_below_debug(socket_dir, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="wgpy")
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        a, b = await start_pair(nursery, net, socket_dir)
        a.tun.inject(ip4(A_IN, B_IN, b"hello"))
        with trio.fail_after(5):
            await b.tun.next_written()
        assert a.engine.device.events is None and b.engine.device.events is None
        nursery.cancel_scope.cancel()
    assert "handshake" not in _text(caplog)


def test_daemon_verbose_is_debug_as_in_wireguard_go(monkeypatch):
    for value, level in (("verbose", logging.DEBUG), ("debug", logging.DEBUG), ("error", logging.ERROR),
                         ("", logging.ERROR)):
        monkeypatch.setenv("LOG_LEVEL", value)
        assert daemon._log_level() == level
