"""Untrusted bytes into the inbound path: never raise, never change protocol state."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from tests.helpers import EP_A, EP_B, Pair, fingerprint, ip4
from tunnel.noise.constants import MSG_COOKIE_REPLY, MSG_INITIATION, MSG_RESPONSE, MSG_TRANSPORT

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def established() -> tuple[Pair, dict[int, bytes]]:
    """A pair after a handshake and some traffic, plus one valid message of each type."""
    p = Pair(device_kwargs={"handshake_load_threshold": 10**9})
    p.send_a()
    p.send_b()
    samples = {
        MSG_INITIATION: p.sent("a", MSG_INITIATION)[0].data,
        MSG_RESPONSE: p.sent("b", MSG_RESPONSE)[0].data,
        MSG_TRANSPORT: p.sent("a", MSG_TRANSPORT)[-1].data,
    }
    loaded = Pair(seed=7)
    loaded.b.handshake_load_threshold = 1
    loaded.send_a()
    samples[MSG_COOKIE_REPLY] = loaded.sent("b", MSG_COOKIE_REPLY)[0].data
    return p, samples


PAIR, SAMPLES = established()

type_prefixed = st.builds(
    lambda t, body: bytes([t, 0, 0, 0]) + body,
    st.integers(1, 4),
    st.binary(max_size=200),
)


@SETTINGS
@given(st.lists(st.one_of(st.binary(max_size=300), type_prefixed), min_size=1, max_size=8))
def test_arbitrary_datagrams_never_raise_or_change_state(datagrams):
    for dev, src in ((PAIR.a, EP_B), (PAIR.b, EP_A), (PAIR.b, ("203.0.113.1", 9))):
        before = fingerprint(dev)
        res = dev.inbound([(d, src) for d in datagrams], PAIR.now)
        assert res.to_tun == [] and res.to_net == []
        assert fingerprint(dev) == before


@st.composite
def mutated(draw):
    kind = draw(st.sampled_from(sorted(SAMPLES)))
    data = bytearray(SAMPLES[kind])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] if draw(st.booleans()) else data + draw(st.binary(min_size=1, max_size=40))
    return bytes(data)


@SETTINGS
@given(st.lists(mutated(), min_size=1, max_size=4))
def test_mutated_valid_messages_change_nothing(datagrams):
    for dev, src in ((PAIR.a, EP_B), (PAIR.b, EP_A)):
        before = fingerprint(dev)
        res = dev.inbound([(d, src) for d in datagrams], PAIR.now)
        assert res.to_tun == []
        assert fingerprint(dev) == before


def test_replayed_valid_messages_change_nothing():
    for dev, src in ((PAIR.a, EP_B), (PAIR.b, EP_A)):
        before = fingerprint(dev)
        dev.inbound([(m, src) for m in SAMPLES.values()], PAIR.now)
        assert fingerprint(dev) == before


@SETTINGS
@given(st.lists(st.binary(max_size=1600), max_size=8))
def test_arbitrary_outbound_packets_never_raise(packets):
    PAIR.a.outbound(packets, PAIR.now)


def test_still_works_after_fuzzing():
    PAIR.send_a(ip4("10.9.0.1", "10.9.0.2", b"alive"))
    assert PAIR.tun["b"][-1].endswith(b"alive")
