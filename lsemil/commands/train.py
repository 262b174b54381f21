"""`lsemil train`: train the multi-resolution MIL model (paper Sec 4.2) into a workdir.

  lsemil train --config configs/paper.py:r0=5 --workdir W --data-dir D [--config.x=y ...]
  lsemil train --config paper:r0=5 --workdir W --data-dir D   # the same config, by name
  lsemil train --config smoke --workdir W      # synthesizes W/data, < 1 min on CPU
  lsemil train --config paper:r0=5 --workdir W2 --data-dir D2 --init-from W  # fine-tune

Thin entry point (flax's main.py): flags, optional jax.distributed start-up, then
`lsemil.training.trainer.train_and_evaluate` (importable from notebooks and other commands).
Any config field can be overridden on the command line (`--config.train.batch_size=16`).
Running again with the same workdir resumes from its latest checkpoint at the exact next batch.
`--init-from SOURCE` (= `--config.train.init_from=SOURCE`) starts a new workdir from another
model: a workdir, a checkpoint step folder or a `lsemil export` folder; its backbone and the
head rows of the classes both models have are copied (`lsemil.training.initialization`), and
`--config.train.freeze=backbone` trains the head only. A resumed run ignores it.

Multi-host (one process per host): pass --coordinator-address/--num-processes/--process-id,
or set LSEMIL_MULTIHOST=1 (Cloud TPU: no other argument needed).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from lsemil.core import configuration, fileio
from lsemil.core.errors import ConfigError

_USAGE = (
  "lsemil train --config FILE|NAME[:ARGS] --workdir W [--data-dir D] [--init-from SOURCE] "
  "[--config.FIELD=VALUE ...]"
)


def _define_flags(argv: list[str]) -> flags.FlagValues:
  """Fresh flags (not absl's global FLAGS) for `argv` = ['lsemil train', *args]."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file or name and argument, e.g. configs/paper.py:r0=5 or paper:r0=5 (see "
    "configs/). Override any field with --config.FIELD=VALUE, e.g. "
    "--config.train.batch_size=16.",
    flag_values=fv,
    lock_config=True,
    sys_argv=argv,  # config_flags reads the --config.FIELD overrides from here
  )
  flags.DEFINE_string(
    "workdir", None, "Output folder (local or gs://): checkpoints, metrics, config.", flag_values=fv
  )
  flags.DEFINE_string(
    "data_dir",
    None,
    "Dataset folder: `lsemil prepare` output (png or tfds), a `lsemil synth` folder or a raw "
    "NIH ChestX-ray14 folder. Default: config.data.data_dir; the smoke config synthesizes "
    "a tiny dataset into WORKDIR/data.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "source",
    None,
    "The dataset's source (lsemil.data.sources: nih, chexpert, mimic-cxr-jpg, vindr-cxr, "
    "rsna-pneumonia, siim-acr, csv); the same as --config.data.source. Its class list "
    "becomes config.data.classes and model.num_classes.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "init_from",
    None,
    "Fine-tune: start from this model (a workdir's best checkpoint, a checkpoint step folder "
    "or a `lsemil export` folder) when WORKDIR has no checkpoint; the same as "
    "--config.train.init_from.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0.", flag_values=fv
  )
  flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.", flag_values=fv)
  return fv


def _normalise(argv: list[str]) -> list[str]:
  """--data-dir -> --data_dir (absl flag names use underscores); --config.* untouched."""
  out = []
  for arg in argv:
    if arg.startswith("--") and not arg.startswith("--config"):
      name, eq, value = arg[2:].partition("=")
      arg = "--" + name.replace("-", "_") + eq + value
    out.append(arg)
  return out


def _resolve_config_name(argv: list[str]) -> list[str]:
  """--config paper:r0=5 -> --config <installed lsemil/configs/paper.py>:r0=5 (config_flags
  reads a file path); a file path stays. ConfigError for an unknown name."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      head, spec = "--config=", arg[len("--config=") :]
    elif arg == "--config" and i + 1 < len(out):
      head, spec, i = "", out[i + 1], i + 1
    else:
      continue
    name, sep, config_arg = spec.partition(":")
    out[i] = head + str(configuration.config_path(name)) + sep + config_arg
  return out


def _help(fv: flags.FlagValues) -> str:
  doc = (__doc__ or "").strip()
  return f"usage: {_USAGE}\n\n{doc}\n\nflags:\n{fv.get_help(include_special_flags=False)}"


def parse_flags(argv: list[str]) -> flags.FlagValues:
  """Parses `lsemil train` arguments (without the command names) into a fresh FlagValues.

  `--config` takes a config file or the name of an installed config (`paper:r0=5`). Raises
  flags.Error for bad flags, a bad config file or override, or a missing --config /
  --workdir; ConfigError for an unknown config name.
  """
  argv = ["lsemil train", *_resolve_config_name(_normalise(argv))]
  fv = _define_flags(argv)
  fv(argv)
  if fv.config is None or not fv.workdir:
    raise flags.Error("--config and --workdir are required")
  fv.config.keys()  # config_flags defers a failed load until first use: fail here
  if fv.source:
    given = [a.split("=", 1)[-1] for a in argv if a.startswith("--config.data.source=")]
    if given and given[-1] != fv.source:
      raise flags.Error(f"--source {fv.source} and --config.data.source={given[-1]} disagree")
    fv.config.data.source = fv.source
  if fv.init_from:
    given = fv.config.train.init_from
    if given and fileio.resolve(given) != fileio.resolve(fv.init_from):
      raise flags.Error(
        f"--init-from {fv.init_from} and --config.train.init_from={given} disagree; give one"
      )
    fv.config.train.init_from = fileio.resolve(fv.init_from)
  return fv


def _config_spec(argv: list[str]) -> str | None:
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  return spec


def _missing_config(argv: list[str]) -> str | None:
  spec = _config_spec(argv)
  if spec is None:
    return None
  try:
    path = configuration.config_path(spec.partition(":")[0])
  except ConfigError as e:  # an unknown name: the message lists the available ones
    return f"--config {spec}: {e}"
  return None if path.is_file() else f"--config {spec}: no config file {path}"


def _unknown_override(argv: list[str]) -> str | None:
  """The config's own ConfigError (a bad config argument), else the first --config.FIELD
  override that names no field of the config, as a message."""
  spec = _config_spec(argv)
  if spec is None:
    return None
  try:
    config = configuration.load_config(spec)
  except ConfigError as e:  # absl would wrap it in the config file's traceback
    return f"--config {spec}: {e}"
  except Exception:  # noqa: BLE001  (the config file's own error is reported by absl)
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config.") :].split("=", 1)[0]
    node, walked = config, []
    for key in path.split("."):
      if not hasattr(node, "keys") or key not in node:
        where = ".".join(walked) or "the config"
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
        return f"--config.{path}: {where} has no field {key!r} (its fields: {known})"
      node, walked = node[key], [*walked, key]
  return None


def main(argv: list[str]) -> int:
  if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
    print(_help(_define_flags(["lsemil train"])))
    return 0
  argv = _normalise(argv)
  try:
    fv = parse_flags(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, OSError, SyntaxError) as e:
    # config_flags reports an unknown --config.FIELD as AttributeError / KeyError naming only
    # the last key, a bad file as OSError: say which field of which file.
    msg = " ".join((_missing_config(argv) or _unknown_override(argv) or str(e)).split())
    raise ConfigError(f"{msg} (usage: {_USAGE})") from None

  # grain's worker processes read absl flags; mark the global set parsed for them.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

  from absl import logging

  from lsemil.runtime import sharding

  sharding.maybe_initialize_distributed(fv.coordinator_address, fv.num_processes, fv.process_id)

  import jax

  from lsemil.commands import progress
  from lsemil.training import trainer

  logging.info(
    "process %d of %d, local devices %s",
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  data_dir = fileio.resolve(fv.data_dir) if fv.data_dir else None
  main_process = jax.process_index() == 0
  with progress.bars(main_process) as bar:
    result = trainer.train_and_evaluate(
      fv.config, fileio.resolve(fv.workdir), data_dir=data_dir, progress=bar
    )
  if main_process:
    print(trainer.final_line(result), flush=True)
  return 0
