"""The replay bitmap against the set-of-seen-counters model it implements exactly
(8128 = 127 full blocks: two live counters never share a ring slot)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from transport.replay import WINDOW_SIZE, ReplayFilter

LIMIT = 1 << 40

steps = st.lists(
    st.one_of(
        st.integers(-WINDOW_SIZE - 200, 200),            # near the top of the window
        st.integers(1, 3 * WINDOW_SIZE),                 # slides of every size
        st.sampled_from([64, 128, 8128, 8129, 8192, 8256]),  # block and window edges
    ),
    min_size=1, max_size=300,
)


@settings(max_examples=400, deadline=None)
@given(steps)
def test_matches_model(deltas):
    f = ReplayFilter()
    seen: set[int] = set()
    last = 0
    for d in deltas:
        counter = max(0, last + d)
        expected = counter < LIMIT and not (counter <= last and last - counter > WINDOW_SIZE) and counter not in seen
        assert f.check_and_update(counter, LIMIT) == expected, (counter, last)
        if expected:
            seen.add(counter)
            last = max(last, counter)


def test_big_jump_forgets_old_bits():
    f = ReplayFilter()
    for c in range(0, 200):
        assert f.check_and_update(c)
    # jump a whole ring ahead: slots that held 0..199 now stand for new counters
    base = 128 * 64 * 3
    assert all(f.check_and_update(base + c) for c in range(0, 200))
    assert not f.check_and_update(base + 5)


runs = st.lists(
    st.tuples(
        st.one_of(st.integers(1, 70), st.integers(1, 3 * WINDOW_SIZE)),  # gap above the highest
        st.one_of(st.integers(1, 130), st.integers(1, 2 * WINDOW_SIZE)),  # run length
        st.lists(st.integers(-WINDOW_SIZE - 100, 0), max_size=5),        # then some stragglers
    ),
    min_size=1, max_size=20,
)


@settings(max_examples=300, deadline=None)
@given(runs)
def test_accept_run_is_check_and_update_in_order(steps):
    bulk, one = ReplayFilter(), ReplayFilter()
    for gap, length, stragglers in steps:
        first = one.last + gap
        for c in range(first, first + length):
            assert one.check_and_update(c)
        bulk.accept_run(first, first + length - 1)
        assert (bulk.last, bulk._ring) == (one.last, one._ring)
        for d in stragglers:
            c = max(0, one.last + d)
            assert bulk.check_and_update(c) == one.check_and_update(c)


def test_accept_run_refuses_what_is_not_a_run_above_the_highest():
    f = ReplayFilter()
    f.accept_run(1, 10)
    for first, last in ((10, 12), (5, 12), (12, 11)):
        with pytest.raises(ValueError):
            f.accept_run(first, last)
