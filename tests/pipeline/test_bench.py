"""The pipeline benchmark's arithmetic (the benchmark itself is run by hand, not timed in tests)."""

from __future__ import annotations

import pytest

from pipeline.bench import busy_and_steal, middle_rate


def test_steady_state_is_the_rate_between_a_quarter_and_three_quarters_out():
    start_up = [(10.0, 4)]  # the first clips after 10 s of start-up
    steady = [(10.0 + 0.5 * i, 4 + 4 * i) for i in range(1, 60)]  # then 8 clips/s
    t_end, n_end = steady[-1]
    drain = [(t_end + 0.1, n_end + 40)]  # the tail: clips decoded while the models loaded
    assert middle_rate(start_up + steady + drain) == pytest.approx(8.0)


def test_cpu_busy_and_steal_from_proc_stat_counters():
    before = [100, 0, 50, 1000, 10, 0, 0, 5]
    after = [250, 0, 100, 1040, 20, 0, 0, 25]  # +150 user +50 system +40 idle +10 iowait +20 steal
    assert busy_and_steal(before, after) == "busy 74%, steal 7%"
    assert busy_and_steal([], after) == "n/a"
