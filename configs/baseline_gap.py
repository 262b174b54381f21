"""The Grad-CAM / CAM baseline: the paper's single-resolution, post-hoc alternative.

The MIL model's stem and down path, global average pooling of the coarsest level and a linear
head (`lsemil.models.gap_classifier`, `model.arch = 'gap'`), trained by the same trainer, input
pipeline, optimizer and schedule as the MIL run of the same size; its saliency maps come
afterwards from Grad-CAM or CAM (`lsemil.models.posthoc`).

  lsemil train --config configs/baseline_gap.py:size=demo --workdir W --data-dir P
  lsemil train --config configs/baseline_gap.py:size=paper --workdir W --data-dir P

`size=paper` (default) starts from configs/paper.py, `size=demo` from configs/demo.py; other
arguments go to that config.
"""

from lsemil.core import configuration
from lsemil.core.errors import ConfigError

SIZES = ("demo", "paper")
# Fields of the MIL model that the GAP classifier does not have (no dense blocks, no up path,
# no MIL pooling).
MIL_ONLY = (
  "dense_layers",
  "dense_growth",
  "up_features",
  "up_convs",
  "saliency_size",
  "pooling",
  "r0",
  "per_class_beta",
  "beta_init",
  "dense_impl",
  "up_impl",
)


def get_config(arg: str | None = None):
  args, rest = configuration.split_arg(arg, size="paper")
  size = args.size
  if size not in SIZES:
    raise ConfigError(f"configs/baseline_gap.py: size must be one of {SIZES}, got {size!r}")
  config = configuration.load_config(size, rest)
  config.name = f"baseline_gap_{size}"
  m = config.model
  for field in MIL_ONLY:
    if field in m:
      del m[field]
  # Which model lsemil.models.registry.from_config builds: 'gap' = lsemil.models.gap_classifier.
  m.arch = "gap"
  # The saliency map source `lsemil evaluate` uses for this run: 'gradcam' or 'cam', and the
  # level (index into the down path's levels, -1 = the coarsest) Grad-CAM differentiates at.
  config.saliency = {"source": "gradcam", "gradcam_level": -1}
  return config
