"""The pipeline benchmark's arithmetic (the benchmark itself is run by hand, not timed in tests)."""

from __future__ import annotations

import os

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
    hz = os.sysconf("SC_CLK_TCK")  # 200 busy ticks over 4 clips
    assert busy_and_steal(before, after, clips=4) == f"busy 74%, steal 7%, {200 / hz / 4:.3f} CPU-s/clip"


def test_cached_shards_are_rewritten_whole_when_the_video_count_changes(tmp_path):
    """A cache left by a bigger run must not leave its extra shards behind: the bench reads the whole dir."""
    from pipeline.bench import PER_SHARD, make_shards
    from pipeline.read import list_shards

    video = dict(frames=8, fps=8, height=32, width=32, gop=8, seed=1)
    make_shards(tmp_path / "s", PER_SHARD + 2, 2, **video)
    assert len(list_shards(str(tmp_path / "s"))[1]) == 2
    stamp = (tmp_path / "s" / "params.txt").stat().st_mtime_ns
    make_shards(tmp_path / "s", PER_SHARD + 2, 2, **video)  # same parameters: reused
    assert (tmp_path / "s" / "params.txt").stat().st_mtime_ns == stamp
    make_shards(tmp_path / "s", 3, 2, **video)
    _, shards = list_shards(str(tmp_path / "s"))
    assert len(shards) == 1
