"""PeerTimers alone: events in, actions out (wireguard-go device/timers.go), with fixed jitter."""

from __future__ import annotations

from hypothesis import given, strategies as st

from tunnel.noise.constants import KEEPALIVE_TIMEOUT, MAX_TIMER_HANDSHAKES, REKEY_TIMEOUT, ZERO_KEYS_AFTER
from tunnel.noise.timers import Action, PeerTimers

JITTER = 0.1


def timers() -> PeerTimers:
    return PeerTimers(lambda: JITTER)


def test_idle_timers_have_nothing_due():
    t = timers()
    assert t.next_deadline() is None and list(t.due(1e9)) == []


def test_retransmit_retries_then_gives_up():
    t = timers()
    now = 0.0
    t.handshake_requested(now)
    t.handshake_initiated(now)
    retries = 0
    while True:
        now = t.next_deadline()
        assert now is not None
        actions = list(t.due(now))
        if actions == [Action.GIVE_UP]:
            break
        assert actions == [Action.SEND_INITIATION_RETRY]
        retries += 1
        t.handshake_initiated(now)  # the device sent the retry
    assert retries == MAX_TIMER_HANDSHAKES + 1  # as wireguard-go: 19 retries after the first
    # giving up arms zeroing (the keys of a peer that stopped answering go) and nothing else
    assert t.next_deadline() == now + ZERO_KEYS_AFTER
    # a new handshake counts its retries from zero again
    t.handshake_requested(now)
    t.handshake_initiated(now)
    assert list(t.due(now + REKEY_TIMEOUT + JITTER)) == [Action.SEND_INITIATION_RETRY]


def test_give_up_keeps_a_zeroing_already_armed_and_stops_the_keepalive():
    t = timers()
    t.session_derived(0.0)
    for _ in range(MAX_TIMER_HANDSHAKES + 1):
        t.handshake_initiated(0.0)
        assert list(t.due(REKEY_TIMEOUT + JITTER)) == [Action.SEND_INITIATION_RETRY]
    t.handshake_initiated(0.0)
    t.data_received(0.0)  # would send a keepalive at 10 s
    assert list(t.due(REKEY_TIMEOUT + JITTER)) == [Action.GIVE_UP]
    assert t.next_deadline() == ZERO_KEYS_AFTER  # armed at 0 by the session, not moved


def test_handshake_complete_stops_retries_and_resets_attempts():
    t = timers()
    t.handshake_initiated(0.0)
    assert list(t.due(10.0)) == [Action.SEND_INITIATION_RETRY]
    t.handshake_initiated(10.0)
    t.handshake_complete(11.0)
    assert list(t.due(100.0)) == []
    # the retries count from zero again: a full round before giving up
    for _ in range(MAX_TIMER_HANDSHAKES + 1):
        t.handshake_initiated(100.0)
        assert list(t.due(100.0 + REKEY_TIMEOUT + JITTER)) == [Action.SEND_INITIATION_RETRY]


def test_keepalive_after_data_received_unless_something_sent():
    t = timers()
    t.data_received(0.0)
    assert list(t.due(KEEPALIVE_TIMEOUT - 0.01)) == []
    assert list(t.due(KEEPALIVE_TIMEOUT)) == [Action.SEND_KEEPALIVE]
    t.data_received(20.0)
    t.any_authenticated_packet_sent(21.0)
    assert list(t.due(100.0)) == []


def test_another_keepalive_is_armed_after_the_keepalive_went_out():
    """Data received while a keepalive is pending asks for one more, armed after the first is
    sent, so the send (which disarms the keepalive timer) does not cancel it."""
    t = timers()
    t.data_received(0.0)
    t.data_received(1.0)
    for action in t.due(KEEPALIVE_TIMEOUT):
        assert action is Action.SEND_KEEPALIVE
        t.any_authenticated_packet_sent(KEEPALIVE_TIMEOUT)  # the device sends it
    assert t.next_deadline() == 2 * KEEPALIVE_TIMEOUT
    assert list(t.due(2 * KEEPALIVE_TIMEOUT)) == [Action.SEND_KEEPALIVE]
    assert t.next_deadline() is None


def test_new_handshake_when_nothing_comes_back():
    t = timers()
    t.data_sent(0.0)
    t.data_sent(3.0)  # does not push it back
    deadline = KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + JITTER
    assert t.next_deadline() == deadline
    assert list(t.due(deadline)) == [Action.SEND_INITIATION]
    t.data_sent(20.0)
    t.any_authenticated_packet_received(21.0)
    assert list(t.due(100.0)) == []


def test_zero_keys_540s_after_the_session():
    t = timers()
    t.session_derived(0.0)
    assert list(t.due(ZERO_KEYS_AFTER - 1)) == []
    assert list(t.due(ZERO_KEYS_AFTER)) == [Action.ZERO_KEYS]


def test_persistent_keepalive():
    t = timers()
    t.any_authenticated_packet_traversal(0.0)
    assert t.next_deadline() is None  # off
    t.set_persistent_keepalive(25)
    assert t.persistent_keepalive == 25
    t.any_authenticated_packet_traversal(0.0)
    assert list(t.due(25.0)) == [Action.SEND_KEEPALIVE]
    t.any_authenticated_packet_traversal(25.0)
    t.set_persistent_keepalive(0)
    assert t.next_deadline() is None


def test_last_minute_handshake_once_per_handshake():
    t = timers()
    assert t.last_minute_handshake(0.0)
    assert not t.last_minute_handshake(1.0)
    t.handshake_complete(2.0)
    assert t.last_minute_handshake(3.0)


def test_actions_come_in_a_fixed_order_and_expired_timers_disarm():
    t = timers()
    t.set_persistent_keepalive(1)
    t.session_derived(-ZERO_KEYS_AFTER)
    t.any_authenticated_packet_traversal(0.0)
    t.data_sent(-100.0)
    t.data_received(0.0)
    t.handshake_initiated(0.0)
    assert list(t.due(1000.0)) == [
        Action.SEND_INITIATION_RETRY,  # retransmit handshake
        Action.SEND_KEEPALIVE,  # keepalive
        Action.SEND_INITIATION,  # new handshake
        Action.ZERO_KEYS,  # zero key material
        Action.SEND_KEEPALIVE,  # persistent keepalive
    ]
    assert list(t.due(1000.0)) == [] and t.next_deadline() is None


def test_stop_disarms_everything():
    t = timers()
    t.session_derived(0.0)
    t.data_sent(0.0)
    t.handshake_initiated(0.0)
    t.stop()
    assert t.next_deadline() is None


# A timer state reached by a random history of events, then one combined event against the
# events it stands for: the same state, the same changes reported.
_EVENTS = st.sampled_from(["data_sent", "data_received", "any_authenticated_packet_sent",
                           "any_authenticated_packet_received", "any_authenticated_packet_traversal",
                           "handshake_initiated", "handshake_complete", "session_derived"])


@given(history=st.lists(st.tuples(_EVENTS, st.floats(0, 100)), max_size=8),
       keepalive=st.sampled_from([0, 25]), data=st.booleans(), now=st.floats(0, 200),
       combined=st.sampled_from(["transport_sent", "transport_received"]))
def test_combined_transport_events_equal_the_events_they_stand_for(history, keepalive, data, now, combined):
    pair = []
    for _ in range(2):
        t = timers()
        t.set_persistent_keepalive(keepalive)
        for name, at in history:
            getattr(t, name)(at)
        changes = []
        t.on_change = lambda t=t, changes=changes: changes.append(t.next_deadline())
        pair.append((t, changes))
    (one, one_changes), (many, many_changes) = pair
    getattr(one, combined)(now, data)
    many.any_authenticated_packet_traversal(now)
    if combined == "transport_sent":
        many.any_authenticated_packet_sent(now)
        if data:
            many.data_sent(now)
    else:
        many.any_authenticated_packet_received(now)
        if data:
            many.data_received(now)
    assert one.state() == many.state()
    # Every deadline that moved was reported (removals need no report: Device.next_deadline
    # drops what no longer holds), so the schedule ends at the same place.
    assert one_changes[-1:] == many_changes[-1:] or (not one_changes and not many_changes)
