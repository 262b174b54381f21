"""A regular (non-editable) install runs from any directory: the configs ship with the package.

`pip install` (not editable) of the source into a fresh virtualenv V (the `installed` fixture
of conftest.py), then V's `lsemil` entry point from an empty directory: `lsemil` and
`lsemil.configs` import from V, not from the source tree, and `info --config paper:r0=5`,
`train --config smoke` and `train --config paper:r0=5` (shrunk to one step of the smoke model
by --config.* overrides) find their configs by name. `tests/system/test_demo.py` runs
`lsemil demo --quick` through the same install.
"""

from __future__ import annotations

import json
from pathlib import Path

# The smoke config's model (configs/demo.py and configs/smoke.py) as overrides of the paper's.
SMOKE_MODEL = {
  "input_size": "64",
  "stem_features": "8",
  "widths": "(8,16,32)",
  "blocks_per_level": "(0,0,0)",
  "bottleneck_ratio": "2",
  "dense_layers": "1",
  "dense_growth": "8",
  "up_features": "16",
  "up_convs": "1",
  "saliency_size": "16",
}



def test_regular_install_runs_named_configs_from_an_empty_directory(tmp_path, installed):
  lsemil, target = installed, installed.venv
  empty = tmp_path / "empty"
  empty.mkdir()
  env = lsemil.env()

  where = lsemil.python(
    "import lsemil, lsemil.configs\n"
    "from lsemil.core import configuration\n"
    "print(lsemil.__file__); print(lsemil.configs.__file__)\n"
    "print(configuration.config_path('paper'))",
    cwd=empty,
    env=env,
  )
  out, err = where.communicate(timeout=120)
  assert where.returncode == 0, err
  for line in out.splitlines():
    assert Path(line).resolve().is_relative_to(target.resolve()), (line, target)
  assert sorted(p.name for p in empty.iterdir()) == []

  info = lsemil("info", "--config", "paper:r0=5", cwd=empty, env=env).stdout
  assert "config   paper:r0=5 (paper)" in info and "(r0=5.0)" in info
  assert "params   5,993,244" in info  # the paper model (README's model size table)

  w = tmp_path / "W"
  lsemil("train", "--config", "smoke", "--workdir", w, cwd=empty, env=env)
  assert json.loads((w / "config.json").read_text())["name"] == "smoke"
  assert (w / "result.json").is_file()

  w2 = tmp_path / "W2"
  overrides = [f"--config.model.{k}={v}" for k, v in SMOKE_MODEL.items()]
  overrides += ["--config.train.num_steps=1", "--config.train.batch_size=8"]
  overrides += ["--config.train.eval_batch_size=16"]
  argv = ["train", "--config", "paper:r0=5", "--workdir", w2, "--data-dir", w / "data"]
  lsemil(*argv, *overrides, cwd=empty, env=env)
  config = json.loads((w2 / "config.json").read_text())
  assert (config["name"], config["model"]["r0"], config["train"]["num_steps"]) == ("paper", 5.0, 1)
  assert (w2 / "checkpoints" / "1").is_dir()
  assert sorted(p.name for p in empty.iterdir()) == []  # nothing written where it ran

  bad = lsemil.run("train", "--config", "papr:r0=5", "--workdir", w2, cwd=empty, env=env)
  assert bad.returncode == 1
  message = bad.stderr.strip().splitlines()[-1]
  assert "no config named 'papr'" in message and "baseline_gap, demo, paper, smoke" in message
