"""Study launcher (launch.py), report rendering (report.py) and experiment kinds.

An experiment kind is a module here with `run_point(config, point) -> dict` (metrics of one
sweep point); configs/*.py name it in `config.experiment`. See docs/studies.md.
"""
