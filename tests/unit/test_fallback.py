"""bridge/fallback.py: which way a peer is reached by, driven by retries, completed handshakes
and a clock passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.fallback import ATTEMPTS, RETRY_AFTER, RETRY_MAX, Fallback, Switch


class Wire:
    """WireGuard's side of it, as the engine drives the policy: an initiation goes out on the
    current way at once and then every 5 s (a retry) until one is answered; the policy is polled
    just before each retry and after each handshake. `works(t)`: the ways that get through at
    time t."""

    def __init__(self, fb: Fallback, works) -> None:
        self.fb, self.works = fb, works
        self.t, self.handshake, self.pending = 0.0, None, True
        self.sent: list[tuple[float, int]] = []  # (time, way) of every initiation
        self.switches: list[tuple[float, Switch]] = []
        self.poll()
        self._send()

    def poll(self):
        return self.fb.poll(self.t, len(self.sent), self.sent[-1][0] if self.sent else None, self.handshake)

    def _send(self) -> None:
        self.sent.append((self.t, self.fb.index))
        if self.fb.index in self.works(self.t):
            self.handshake, self.pending = self.t, False
            assert self.poll() is None  # the engine polls after a handshake

    def run(self, until: float) -> None:
        while self.t < until:
            deadline = self.fb.next_deadline()
            nxt = self.t + 5.0 if self.pending else (deadline if deadline is not None else until)
            if nxt > until:
                self.t = until
                return
            self.t = max(nxt, self.t)
            sw = self.poll()
            if sw is not None:
                self.switches.append((self.t, sw))
            if sw is not None and sw.handshake_now:
                self.pending = True
                self._send()
            elif self.pending:
                self._send()


def test_stays_on_the_first_way_while_it_works():
    wire = Wire(Fallback(3), lambda t: {0})
    wire.run(600)
    assert wire.switches == [] and wire.fb.working and wire.fb.next_deadline() is None


def test_each_way_gets_three_initiations_then_the_next_is_tried():
    wire = Wire(Fallback(3, attempts=2), lambda t: {2})
    wire.run(59)
    assert wire.sent[:7] == [(0, 0), (5, 0), (10, 0), (15, 1), (20, 1), (25, 1), (30, 2)]
    assert [(t, s.index) for t, s in wire.switches] == [(15, 1), (30, 2)]
    assert wire.fb.index == 2 and wire.fb.working


def test_everything_blocked_keeps_cycling():
    wire = Wire(Fallback(2, attempts=2), lambda t: set())
    wire.run(89)
    assert [s.index for _, s in wire.switches] == [1, 0, 1, 0, 1]


def test_earlier_ways_are_tried_again_with_backoff_and_the_working_one_kept():
    # The first way is blocked for good: probes every 30, 60, 120 s... capped at 100.
    wire = Wire(Fallback(2, attempts=2, retry_after=30.0, retry_max=100.0), lambda t: {1})
    wire.run(600)
    probes = [t for t, s in wire.switches if s.reason == "trying the earlier ways again"]
    assert probes[:4] == [15 + 30, 45 + 15 + 60, 120 + 15 + 100, 235 + 15 + 100]
    assert all(s.handshake_now for t, s in wire.switches if t in probes)
    assert wire.fb.index == 1 or wire.t - max(probes) < 15


def test_unblocked_first_way_is_returned_to_and_the_backoff_reset():
    blocked_until = 100.0
    wire = Wire(Fallback(2, attempts=2, retry_after=30.0, retry_max=1800.0),
                lambda t: {1} if t < blocked_until else {0, 1})
    wire.run(400)
    # 15: to the second way; 45: probe fails (back at 60); 120: probe works and stays.
    assert [(t, s.index) for t, s in wire.switches] == [(15, 1), (45, 0), (60, 1), (120, 0)]
    assert wire.fb.index == 0 and wire.fb.working and wire.fb.next_deadline() is None
    assert wire.fb._backoff == 30.0


def test_a_working_way_that_breaks_later_is_left():
    wire = Wire(Fallback(2, attempts=2), lambda t: {0} if t < 50 else {1})
    wire.run(50)
    assert wire.switches == []
    wire.pending = True  # traffic after t=50 needs a new handshake
    wire.run(120)
    assert wire.fb.index == 1 and wire.fb.working
    assert wire.switches[0] == (70, Switch(1, "no handshake completed on it"))  # sent at 55, 60, 65


def test_a_single_way_never_switches():
    wire = Wire(Fallback(1), lambda t: set())
    wire.run(200)
    assert wire.switches == []


def test_no_probe_while_the_current_way_is_not_working():
    fb = Fallback(2, attempts=2, retry_after=5.0, retry_max=5.0)
    fb.poll(0.0, 0, None, None)
    assert fb.poll(16.0, 3, 10.0, None).index == 1
    assert fb.next_deadline() is None
    assert fb.poll(100.0, 3, 10.0, None) is None  # never worked there: nothing to fall back from


def test_a_way_is_judged_only_once_its_latest_initiation_waited_four_seconds():
    fb = Fallback(2, attempts=2)
    fb.poll(0.0, 0, None, None)
    assert fb.poll(11.0, 3, 10.0, None) is None  # the third initiation is 1 s old
    assert fb.poll(13.9, 3, 10.0, None) is None
    assert fb.poll(14.0, 3, 10.0, None) == Switch(1, "no handshake completed on it")


def test_data_that_keeps_asking_for_a_handshake_does_not_hide_the_failure():
    # Initiations are counted, not WireGuard's retry counter (which new data resets to zero).
    fb = Fallback(2, attempts=2)
    fb.poll(0.0, 5, 0.0, None)  # 5 initiations before: only what follows counts
    assert fb.poll(5.0, 6, 5.0, None) is None
    assert fb.poll(10.0, 7, 10.0, None) is None
    assert fb.poll(15.0, 8, 15.0, None) is None  # 3 sent, the latest only just went out
    assert fb.poll(20.0, 8, 15.0, None) == Switch(1, "no handshake completed on it")


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"retry_after": 0}, {"retry_after": 10, "retry_max": 5}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Fallback(2, **kwargs)
    with pytest.raises(ValueError):
        Fallback(0)


def test_defaults_leave_a_blocked_way_within_20_seconds():
    wire = Wire(Fallback(3), lambda t: {2})
    wire.run(120)
    assert wire.switches[0][0] <= 20 and (ATTEMPTS + 1) * 5 <= 20
    assert RETRY_AFTER <= RETRY_MAX


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5), st.lists(st.tuples(st.floats(0, 10), st.integers(0, 3), st.booleans()), max_size=60))
def test_any_history_keeps_the_index_in_range_and_time_moving(count, steps):
    fb = Fallback(count, attempts=2, retry_after=3.0, retry_max=12.0)
    now, handshakes, sent, last = 0.0, 0, 0, None
    for dt, new, completed in steps:
        now += dt
        if new:
            sent, last = sent + new, now
        if completed:
            handshakes += 1
        switch = fb.poll(now, sent, last, handshakes or None)
        assert 0 <= fb.index < count
        if switch is not None:
            assert switch.index == fb.index and not fb.working
        deadline = fb.next_deadline()
        assert deadline is None or deadline >= now or fb.index == 0 or not fb.working
