"""The driver benchmark's two drivers (the bench itself is run by hand): the old one writing every shard and the
new one starting commit tasks write the same bytes, and each reports the clips it saw written."""

from __future__ import annotations

import argparse

from pipeline.bench_driver import measure, same_files


def test_both_drivers_write_the_same_files(ray_local, tmp_path):
    args = argparse.Namespace(clips=16, batch=4, per_shard=8)
    before = measure(args, tmp_path, "before", through_ray_data=False)
    after = measure(args, tmp_path, "after", through_ray_data=False)
    assert before["clips"] == after["clips"] == 16
    assert same_files([before["out"], after["out"]]) == (True, 4)  # 2 shards x clips, rejected
    assert after["cpu_s"] > 0 and before["cpu_s"] > 0
