"""bridge/fallback.py: which way a peer is reached by, driven by retries, completed handshakes
and a clock passed in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.fallback import ATTEMPTS, RETRY_AFTER, RETRY_MAX, Fallback, Switch


def test_stays_on_the_first_way_while_handshakes_complete():
    fb = Fallback(3)
    assert fb.poll(0.0, 0, None) is None
    assert fb.poll(1.0, 1, None) is None  # one retry: not yet
    assert fb.poll(2.0, 0, 1.5) is None  # completed
    assert fb.index == 0 and fb.working
    assert fb.next_deadline() is None  # nothing earlier to go back to


def test_moves_on_after_unanswered_retries_and_wraps_around():
    fb = Fallback(3, attempts=2)
    fb.poll(0.0, 0, None)
    assert fb.poll(5.0, 1, None) is None
    assert fb.poll(10.0, 2, None) == Switch(1, "no handshake completed on it")
    # The engine starts a new handshake on the new way: retries count from there.
    assert fb.poll(10.1, 0, None) is None
    assert fb.poll(15.0, 1, None) is None
    assert fb.poll(20.0, 2, None) == Switch(2, "no handshake completed on it")
    assert fb.poll(30.0, 2, None) is None  # the count is from the switch, not from zero
    assert fb.poll(35.0, 4, None) == Switch(0, "no handshake completed on it")


def test_retries_that_continue_across_a_switch_count_from_the_switch():
    fb = Fallback(2, attempts=2)
    fb.poll(0.0, 3, None)  # first seen mid-handshake: counts from 3
    assert fb.poll(1.0, 4, None) is None
    assert fb.poll(2.0, 5, None) == Switch(1, "no handshake completed on it")
    assert fb.poll(3.0, 6, None) is None


def test_a_single_way_never_switches():
    fb = Fallback(1)
    fb.poll(0.0, 0, None)
    for t in range(1, 50):
        assert fb.poll(float(t), t, None) is None


def test_earlier_ways_are_tried_again_with_backoff():
    fb = Fallback(2, attempts=2, retry_after=30.0, retry_max=100.0)
    fb.poll(0.0, 0, None)
    assert fb.poll(10.0, 2, None).index == 1
    fb.poll(10.5, 0, None)
    assert fb.poll(11.0, 0, 11.0) is None  # works on the second way
    assert fb.next_deadline() == pytest.approx(41.0)
    assert fb.poll(40.0, 0, 11.0) is None
    assert fb.poll(41.0, 0, 11.0) == Switch(0, "trying the earlier ways again")
    assert fb.home == 1
    # The first way still fails: back to the second, and the next probe waits twice as long.
    fb.poll(41.1, 0, 11.0)
    assert fb.poll(51.0, 2, 11.0).index == 1
    fb.poll(51.1, 0, 11.0)
    fb.poll(52.0, 0, 52.0)
    assert fb.next_deadline() == pytest.approx(52.0 + 60.0)
    assert fb.poll(112.0, 0, 52.0).index == 0
    fb.poll(112.1, 0, 52.0)
    assert fb.poll(122.0, 2, 52.0).index == 1
    fb.poll(122.1, 0, 52.0)
    fb.poll(123.0, 0, 123.0)
    assert fb.next_deadline() == pytest.approx(123.0 + 100.0)  # capped at retry_max


def test_a_probe_that_succeeds_stays_and_resets_the_backoff():
    fb = Fallback(3, attempts=1, retry_after=10.0, retry_max=80.0)
    fb.poll(0.0, 0, None)
    assert fb.poll(5.0, 1, None).index == 1
    fb.poll(5.1, 0, None)
    assert fb.poll(10.0, 1, None).index == 2
    fb.poll(10.1, 0, None)
    fb.poll(11.0, 0, 11.0)
    assert fb.poll(21.0, 0, 11.0).index == 0  # probe
    fb.poll(21.1, 0, 11.0)
    fb.poll(22.0, 0, 22.0)  # the first way works again
    assert fb.index == 0 and fb.working and fb.home is None
    assert fb.next_deadline() is None
    # Later, the first way breaks: the next probe waits retry_after again, not the doubled wait.
    assert fb.poll(100.0, 1, 22.0).index == 1
    fb.poll(100.1, 0, 22.0)
    fb.poll(101.0, 0, 101.0)
    assert fb.next_deadline() == pytest.approx(111.0)


def test_no_probe_while_the_current_way_is_not_working():
    fb = Fallback(2, attempts=3, retry_after=5.0, retry_max=5.0)
    fb.poll(0.0, 0, None)
    assert fb.poll(1.0, 3, None).index == 1
    assert fb.next_deadline() is None
    assert fb.poll(100.0, 0, None) is None  # never worked there: nothing to fall back from


@pytest.mark.parametrize("kwargs", [{"attempts": 0}, {"retry_after": 0}, {"retry_after": 10, "retry_max": 5}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Fallback(2, **kwargs)
    with pytest.raises(ValueError):
        Fallback(0)


def test_defaults_switch_within_a_bounded_time():
    # WireGuard retries every 5 s (+ jitter up to 1/3 s): the first way is left after ATTEMPTS retries.
    assert ATTEMPTS * 5.34 < 15
    assert RETRY_AFTER <= RETRY_MAX


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5), st.lists(st.tuples(st.floats(0, 10), st.integers(0, 20), st.booleans()), max_size=60))
def test_any_history_keeps_the_index_in_range_and_time_moving(count, steps):
    fb = Fallback(count, attempts=2, retry_after=3.0, retry_max=12.0)
    now, handshakes = 0.0, 0
    for dt, retries, completed in steps:
        now += dt
        if completed:
            handshakes += 1
        switch = fb.poll(now, retries, handshakes or None)
        assert 0 <= fb.index < count
        if switch is not None:
            assert switch.index == fb.index and not fb.working
        deadline = fb.next_deadline()
        assert deadline is None or deadline >= now or fb.index == 0 or not fb.working
