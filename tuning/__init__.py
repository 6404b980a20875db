"""Ray Tune sweeps over training and sampling configs: `config.py` (`SweepConfig`), `space.py` (YAML
distributions -> Tune domains, checked before any trial), `objectives.py` (the trial functions),
`results.py` (best.yaml, trials.csv, objective.png), `run.py` (the `python -m tuning.run` CLI),
`bench.py` (Tune's overhead per trial).

May import `training` and `pipeline`; nothing imports `tuning`.
"""
