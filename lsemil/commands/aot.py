"""`lsemil aot`: compile the train and eval steps for a TPU topology here, before renting it.

  lsemil aot --config paper:r0=5,dtype=bfloat16 --topology v5e:2x2 --per-chip-batch 32
  lsemil aot --config paper --dtype bfloat16 --topology v5e:4x4 --max-batch --json aot.json

Needs jax[tpu] on this host (`pip install -e '.[tpu]'`, no TPU): libtpu compiles for the
topology's chips exactly as on the slice (lsemil.training.compilation). Prints the mesh, the
sharding of the input and of every parameter group, HBM per device against the chip's
capacity, flops and bytes per step, the roofline step time and throughput (compile-time
estimates against published peaks, not measurements) and the collectives. Exit status 1,
with one line saying so, when the config does not fit: a preflight for tpu_scripts/create.sh.
"""

from __future__ import annotations

import argparse
import sys

from lsemil.commands import arguments

_EPILOG = "Exit status: 0 fits, 1 does not fit (or a bad config / topology), 2 bad arguments."


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="lsemil aot", description=__doc__.split("\n\n")[0], epilog=_EPILOG
  )
  parser.add_argument(
    "--config", required=True, help="config file or name with optional :arg (paper:dtype=bfloat16)"
  )
  parser.add_argument(
    "--topology",
    required=True,
    help="TPU generation and chip grid: v4:2x2x2, v5e:2x2, v5e:4x4, v5p:2x2x2, v6e:2x2, ...",
  )
  parser.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    help="compute dtype, as `lsemil train --config.model.dtype` (default: the config's; "
    "params stay float32; tpu_scripts train in bfloat16)",
  )
  parser.add_argument(
    "--fsdp",
    action="store_true",
    help="shard large parameters and Adam moments over the chips, as `lsemil train "
    "--config.train.fsdp=true` (default: the config's)",
  )
  batch = parser.add_mutually_exclusive_group()
  batch.add_argument(
    "--per-chip-batch",
    type=arguments.positive_int,
    help="images per chip and step (default: the config's train.batch_size over the chips)",
  )
  batch.add_argument(
    "--max-batch",
    action="store_true",
    help="find the largest per-chip batch that fits, by bisection over compiles",
  )
  parser.add_argument(
    "--batch-step",
    type=arguments.positive_int,
    default=1,
    help="with --max-batch: search multiples of this (fewer compiles; default 1)",
  )
  parser.add_argument(
    "--batch-start",
    type=arguments.positive_int,
    help="with --max-batch: start the search here, a guess of the answer (e.g. from HBM's "
    "linear growth with the batch), then step up or down from it: two compiles when the "
    "guess is right (default: from --batch-step, doubling)",
  )
  parser.add_argument(
    "--batch-limit",
    type=arguments.positive_int,
    default=1024,
    help="with --max-batch: the largest per-chip batch tried (default 1024)",
  )
  parser.add_argument(
    "--num-slices", type=arguments.positive_int, default=1, help="slices over DCN (default 1)"
  )
  parser.add_argument(
    "--hbm-bytes",
    type=arguments.positive_int,
    help="HBM capacity per chip to check against, instead of the generation's published one",
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="model.FIELD=VALUE",
    help="override a model field, e.g. --set model.dense_impl=split (repeatable; as "
    "`lsemil train --config.model.FIELD=VALUE`)",
  )
  parser.add_argument("--json", metavar="PATH", help="also write the report as JSON here")
  return parser


def _size(n: float) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def _hbm_rows(report: dict) -> list[list[str]]:
  rows = []
  for step in ("train", "eval"):
    if step not in report:
      continue
    s, h = report[step], report[step]["hbm"]
    batch = report["per_chip_batch"] if step == "train" else s["per_chip_batch"]
    rows.append(
      [step, str(batch), f"{s['compile_s']:.1f}"]
      + [_size(h[k]) for k in ("arguments", "outputs", "aliased", "temporaries", "code", "total")]
      + ["yes" if s["fits"] else "NO", _size(s["headroom_bytes"])]
    )
  return rows


def format_report(report: dict) -> str:
  """The report as text: a header, Markdown tables and the roofline lines."""
  from lsemil.core import tables

  r, t = report, report["train"]
  line = t["roofline"]
  mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
  inp = r["input_sharding"]
  out = [
    f"{r['config']} on {r['topology']} ({r['generation']}): {r['dtype']} compute, "
    f"{r['param_dtype']} params, BatchNorm {r['batch_norm_impl']}, conv weight gradients "
    f"{r['conv_weight_grad']}, dense blocks {r['dense_impl']}, up path {r['up_impl']}, "
    f"remat {r['remat']}, fsdp {r['fsdp']}",
    f"mesh {mesh}: {r['devices']} chips on {r['hosts']} host(s), {r['slices']} slice(s); "
    f"batch {r['per_chip_batch']} per chip, {r['global_batch']} global; input "
    f"{inp['spec']} over {inp['devices']} devices ({inp['images_per_device']} images each)",
    "",
    tables.markdown(
      ["parameter group", "params", "bytes", "sharding"],
      [
        [g["group"], f"{g['params']:,}", _size(g["bytes"]), " ".join(g["specs"])]
        for g in r["parameter_groups"]
      ],
    ),
    f"HBM per device (capacity {_size(r['hbm_capacity'])}):",
    "",
    tables.markdown(
      [
        "step",
        "per chip",
        "compile s",
        "arguments",
        "outputs",
        "aliased",
        "temporaries",
        "code",
        "total",
        "fits",
        "headroom",
      ],
      _hbm_rows(r),
    ),
    f"train step per device: {t['flops'] / 1e9:,.4g} GFLOP "
    f"({t['flops_per_image'] / 1e9:.4g} GFLOP/image), {t['bytes'] / 1e9:,.4g} GB accessed "
    f"-> compute {line['compute_s'] * 1e3:.4g} ms, memory {line['memory_s'] * 1e3:.4g} ms: "
    f"{line['bound']}-bound ({line['ratio']:.1f}x)",
    f"estimate: {t['images_per_s_chip']:,.0f} images/s per chip, "
    f"{t['images_per_s_slice']:,.0f} per slice; {t['hours_per_epoch']:.3g} h per epoch of "
    f"86,524 NIH train images (roofline from XLA's cost analysis against {r['peaks_source']}: "
    "a compile-time estimate, not a measurement)",
  ]
  moved = ", ".join(
    f"{x['where']} {_size(x['bytes'])} ({x['share']:.0%})" for x in t["traffic"][:6]
  )
  out.append(f"most bytes (train, tile-padded HLO operands and results): {moved}")
  for step in ("train", "eval"):
    if step in r:
      used = [f"{k} {v['count']} ({_size(v['bytes'])})" for k, v in r[step]["collectives"].items()
              if v["count"]]  # fmt: skip
      out.append(f"collectives ({step}): {', '.join(used) or 'none'}")
  return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
  args = _parser().parse_args(argv)

  from lsemil.core import configuration
  from lsemil.core.errors import ConfigError
  from lsemil.runtime import accelerators

  config = configuration.load_config(args.config)
  if args.dtype:
    config.model.dtype = args.dtype
  if args.fsdp:
    config.train.fsdp = True
  for item in args.set:
    _override(config, item)
  configuration.check_finite(config)
  chip, _ = accelerators.parse_topology(args.topology)
  devices = accelerators.topology_devices(args.topology, args.num_slices)

  from lsemil.training import compilation

  capacity = args.hbm_bytes or chip.hbm_bytes

  def compiled_report(batch: int, with_eval: bool = True) -> dict:
    c = compilation.compile_steps(config, devices, chip, batch, with_eval=with_eval)
    return dict(compilation.report(c, capacity), topology=args.topology)

  searched, reports = None, {}
  if args.max_batch:
    print(f"searching the largest per-chip batch on {args.topology} (a compile per try)")

    def fits(batch: int) -> bool:
      r = reports[batch] = compiled_report(batch)
      print(f"  per-chip batch {batch}: {_size(r['train']['hbm']['total'])} train, "
            f"{_size(r['eval']['hbm']['total'])} eval -> {'fits' if r['fits'] else 'does not fit'}",
            flush=True)  # fmt: skip
      return r["fits"]

    batch, tried = compilation.largest_batch(
      fits, args.batch_limit, args.batch_step, args.batch_start
    )
    searched = {"max_per_chip_batch": batch, "tried": {str(k): v for k, v in tried.items()}}
    if batch == 0:
      print(f"lsemil aot: {args.config} does not fit on {args.topology} even at a per-chip "
            f"batch of {args.batch_step}", file=sys.stderr)  # fmt: skip
      _write_json(args.json, {"topology": args.topology, "fits": False, "search": searched})
      return 1
  elif args.per_chip_batch:
    batch = args.per_chip_batch
  else:
    batch, rest = divmod(int(config.train.batch_size), len(devices))
    if batch < 1 or rest:
      raise ConfigError(
        f"config train.batch_size={config.train.batch_size} does not divide over the "
        f"{len(devices)} chips of {args.topology}: pass --per-chip-batch"
      )
  report = reports.get(batch) or compiled_report(batch)  # the search compiled it already
  if searched:
    report["search"] = searched
  print(format_report(report), end="")
  if searched:
    print(f"largest per-chip batch that fits: {batch} (tried {searched['tried']})")
  _write_json(args.json, report)
  if not report["fits"]:
    over = [s for s in ("train", "eval") if s in report and not report[s]["fits"]]
    need = max(report[s]["hbm"]["total"] for s in over)
    print(
      f"lsemil aot: {args.config} at {batch} per chip does not fit on {args.topology}: the "
      f"{' and '.join(over)} step needs {_size(need)} of HBM per chip, the chip has "
      f"{_size(capacity)}; lower the batch (--max-batch finds the largest)",
      file=sys.stderr,
    )
    return 1
  return 0


def _override(config, item: str) -> None:
  """--set model.FIELD=VALUE: the value parsed as the field's type (ConfigError naming it)."""
  from lsemil.core.errors import ConfigError

  key, sep, text = item.partition("=")
  section, _, field = key.partition(".")
  if not sep or section != "model" or field not in config.model:
    raise ConfigError(f"--set {item!r}: expected model.FIELD=VALUE with a field of config.model")
  current = config.model[field]
  if isinstance(current, bool):
    if text.lower() not in ("true", "false"):
      raise ConfigError(f"--set {item!r}: {key} is true or false")
    config.model[field] = text.lower() == "true"
  elif isinstance(current, int | float | str):
    try:
      config.model[field] = type(current)(text)
    except ValueError:
      raise ConfigError(f"--set {item!r}: {key} is a {type(current).__name__}") from None
  else:
    raise ConfigError(f"--set {item!r}: {key} is not a single value")


def _write_json(path: str | None, report: dict) -> None:
  if not path:
    return
  from lsemil.core import fileio

  fileio.write_json(path, report)
