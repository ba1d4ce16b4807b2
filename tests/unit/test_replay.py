"""The replay bitmap against the set-of-seen-counters model it implements exactly
(8128 = 127 full blocks: two live counters never share a ring slot)."""

from __future__ import annotations

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
