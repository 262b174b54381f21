"""Smoke configuration: seconds on a CPU, for tests and a first `lsemil train`.

  lsemil train --config configs/smoke.py --workdir W

Without --data-dir it synthesizes `data.synth_patients` patients into W/data first.
"""

from lsemil.core import configuration


def get_config(arg: str | None = None):
  config = configuration.load_config("demo", arg)
  config.name = "smoke"
  m = config.model
  m.input_size = 64
  m.stem_features = 8
  m.widths = (8, 16, 32)
  m.blocks_per_level = (0, 0, 0)
  m.dense_layers = 1
  m.dense_growth = 8
  m.up_features = 16
  m.saliency_size = 16
  m.group_norm_groups = 4
  # No --data-dir: synthesize this many patients into WORKDIR/data (lsemil.data.phantoms).
  config.data.synth_patients = 40
  config.train.batch_size = 8
  config.train.eval_batch_size = 16
  config.train.num_epochs = 1
  config.train.num_steps = 6
  config.train.eval_every_steps = 3
  config.train.log_every_steps = 1
  return config
