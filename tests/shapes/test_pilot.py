"""shapes.pilot refuses a world that has not been built up to its stills, before it copies or trains anything."""

from __future__ import annotations

import pytest

from shapes.pilot import main


def test_a_world_without_base_or_stills_is_refused(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["--world", str(tmp_path), "--name", "v"])
    assert exit_.value.code == 2
    assert "has no latents/stills: build it first" in capsys.readouterr().err
    assert not (tmp_path / "pilots").exists()
