"""lsemil's configs, installed as the package `lsemil.configs` (see pyproject's package-dir).

`paper.py` states every default; `demo.py`, `smoke.py` and `baseline_gap.py` start from it.
Commands take a config by name (`paper:r0=5`) or by file path (`configs/paper.py:r0=5`).
"""
