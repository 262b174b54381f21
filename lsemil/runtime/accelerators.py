"""TPU generations, topologies and the roofline, for compiling ahead of time on a CPU host.

With `jax[tpu]` installed (it brings libtpu), `jax.experimental.topologies` describes the
devices of a real TPU slice without one: a program jitted with shardings over a mesh of
those devices lowers and compiles exactly as on the TPU (MaxText's `train_compile.py`).
This module holds what the compiler does not know:

- `CHIPS`: per generation the published peak bf16 FLOP/s, HBM bandwidth and HBM capacity
  per chip (each value cited from its Google Cloud TPU page);
- `topology_devices`: the compile-only devices of a topology name such as 'v5e:2x2';
- `roofline`: step time from XLA's flops and bytes against those peaks (XLA's own
  `optimal_seconds` is negative for TPU programs compiled this way);
- `collectives`: the cross-device operations of a compiled program's HLO text;
- `quiet_libtpu`: on a host without TPU chips, the settings that keep libtpu from
  querying the GCE metadata server and printing errors whenever jax starts, and from
  refusing a second process.

Only `topology_devices` imports jax (inside the function): `lsemil.commands.cli` calls
`quiet_libtpu` before any command and stays fast.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import math
import os
import re
from typing import Any

from lsemil.core.errors import ConfigError, UserError


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's published per-chip peaks (one jax device per chip: megacore)."""

  name: str
  peak_bf16_flops: float  # FLOP/s
  hbm_bytes_per_s: float
  hbm_bytes: int  # capacity
  source: str  # the Google Cloud TPU page the three values are from
  megacore: bool = False  # two TensorCores shown as one device ('megacore' chip config)


GiB = 2**30
# Values as the pages state them (checked 2026-12-03); GB and GBps are decimal, GiB binary.
CHIPS = {
  # "Peak compute per chip 275 teraflops (bf16 or int8)"; "HBM2 capacity and bandwidth
  # 32 GiB, 1200 GBps". Two TensorCores per chip.
  "v4": Chip("v4", 275e12, 1200e9, 32 * GiB, "https://cloud.google.com/tpu/docs/v4", True),
  # "Peak compute per chip (bf16) 197 TFLOPs"; "HBM capacity per chip 16 GiB"; "HBM
  # bandwidth per chip 819 GBps".
  "v5e": Chip("v5e", 197e12, 819e9, 16 * GiB, "https://cloud.google.com/tpu/docs/v5e"),
  # "Peak compute per chip (BF16) (TFLOPs) 459"; "HBM capacity per chip (GiB) 95"; "HBM
  # bandwidth per chip (GBps) 2765". Two TensorCores per chip.
  "v5p": Chip("v5p", 459e12, 2765e9, 95 * GiB, "https://cloud.google.com/tpu/docs/v5p", True),
  # "Peak compute per chip (bf16) 918 TFLOPs"; "HBM capacity per chip 32 GB" (taken as
  # stated: 32e9 bytes, the smaller reading); "HBM bandwidth per chip 1640 GBps".
  "v6e": Chip("v6e", 918e12, 1640e9, 32 * 10**9, "https://cloud.google.com/tpu/docs/v6e"),
}

_TOPOLOGY = re.compile(r"^(v[0-9][a-z]?):([0-9]+(?:x[0-9]+){1,2})$")
# Compiled TPU HLO runs collectives asynchronously: `-start` ops carry them, `-done` waits.
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {
  "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
  "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
}  # fmt: skip
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_OP = re.compile(
  r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(",
)


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
  """'v5e:2x2' -> (the chip of v5e, (2, 2)); ConfigError naming --topology otherwise."""
  m = _TOPOLOGY.match(name.strip())
  if not m:
    raise ConfigError(
      f"--topology {name!r}: expected GENERATION:SHAPE, e.g. v5e:2x2, v4:2x2x2 "
      f"(generations: {', '.join(CHIPS)})"
    )
  if m.group(1) not in CHIPS:
    raise ConfigError(
      f"--topology {name!r}: no peak table for {m.group(1)}; known: {', '.join(CHIPS)}"
    )
  return CHIPS[m.group(1)], tuple(int(s) for s in m.group(2).split("x"))


def _tpu_chips_attached() -> int:
  """Google TPU PCI functions on this host (the check jax makes; gVNIC shares the vendor)."""
  count = 0
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
        if f.read().strip() == "0x1ae0" and g.read().strip() in _TPU_PCI_IDS:
          count += 1
    except OSError:
      continue
  return count


_TPU_PCI_IDS = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
_QUIET = {
  "TPU_SKIP_MDS_QUERY": "1",  # no GCE metadata server off Google Cloud
  "TPU_WORKER_HOSTNAMES": "localhost",
  "TPU_ACCELERATOR_TYPE": "v5litepod-1",  # the local host's bounds; topologies are explicit
  # libtpu lets one process per host hold it (/tmp/libtpu_lockfile); with no chip to share,
  # compile-only processes (pytest workers, two `lsemil aot`) may load it side by side.
  "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def quiet_libtpu(environ: dict[str, str] | None = None) -> None:
  """On a host with libtpu installed but no TPU chip, jax's start-up asks libtpu for the
  local TPU, which prints metadata-server errors to stderr in every command. Set the
  variables that answer its questions (only those unset, and only without a chip)."""
  environ = os.environ if environ is None else environ
  if _tpu_chips_attached():
    return
  for key, value in _QUIET.items():
    environ.setdefault(key, value)


def topology_devices(name: str, num_slices: int = 1) -> list[Any]:
  """The compile-only jax devices of a TPU topology ('v5e:2x2'; `num_slices` copies over
  DCN), one per chip. UserError when jax[tpu] (libtpu) is not installed."""
  chip, _ = parse_topology(name)
  if num_slices < 1:
    raise ConfigError(f"--num-slices must be >= 1, got {num_slices}")
  quiet_libtpu()
  from jax.experimental import topologies

  kwargs: dict[str, Any] = {"num_slices": num_slices} if num_slices > 1 else {}
  if chip.megacore:
    kwargs["chip_config_name"] = "megacore"
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices)
  except Exception as e:  # noqa: BLE001 - jax raises RuntimeError / ValueError by version
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "libtpu" in text.lower() or "not found" in text.lower() or "unknown backend" in text:
      raise UserError(
        f"--topology {name}: compiling for a TPU needs jax[tpu] (libtpu) installed here: "
        f"pip install -e '.[tpu]' ({text})"
      ) from None
    raise ConfigError(f"--topology {name}: libtpu refused it: {text}") from None


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> dict[str, Any]:
  """Step time bounds from XLA's per-device flops and bytes against `chip`'s peaks."""
  compute_s = flops / chip.peak_bf16_flops
  memory_s = bytes_accessed / chip.hbm_bytes_per_s
  return {
    "compute_s": compute_s,
    "memory_s": memory_s,
    "step_s": max(compute_s, memory_s),
    "bound": "compute" if compute_s >= memory_s else "memory",
    "ratio": (max(compute_s, memory_s) / min(compute_s, memory_s))
    if min(compute_s, memory_s) > 0
    else math.inf,
  }


_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\](\{[^}]*\})?")
_TILE = re.compile(r":T\(([0-9,]+)\)")


def shape_bytes(text: str, *, tiled: bool = False) -> int:
  """Bytes of every array shape in an HLO type ('(f32[2,3]{1,0}, bf16[4])' -> 32). With
  `tiled`, as they lie in TPU memory: each array's most minor dimensions padded to its
  layout's tile (`{1,0:T(8,128)}`: f32[2,3] takes 8 x 128 x 4 bytes), in HBM or on chip
  (`S(1)`: XLA's bytes accessed counts both)."""
  total = 0
  for dtype, dims, layout in _ARRAY.findall(text):
    shape = [int(d) for d in dims.split(",") if d]
    if tiled and layout:
      tile = _TILE.search(layout)
      minor_to_major = [int(d) for d in layout.strip("{}").split(":")[0].split(",") if d]
      if tile and minor_to_major:
        sizes = reversed([int(t) for t in tile.group(1).split(",")])
        for dim, size in zip(minor_to_major, sizes, strict=False):
          shape[dim] = -(-shape[dim] // size) * size
    total += _DTYPE_BYTES[dtype] * math.prod(shape)
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Count and result bytes of each collective in a compiled module's HLO text.

  A synchronous op and the `-start` of an async pair count once (`-done` only waits); the
  bytes are those of its result type (for an async start, a tuple that also holds the
  operand: an upper bound).
  """
  out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if m is None:
      continue
    out[m.group(2)]["count"] += 1
    out[m.group(2)]["bytes"] += shape_bytes(m.group(1))
  return out


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.+?)\s([a-z][\w\-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_NO_TRAFFIC = ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all")


def _where(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(MultiResolutionMIL))/dense4/...' -> 'dense4 backward';
  ops outside the model (the optimizer, the loss) -> their first named step."""
  parts = [p for p in op_name.split("/") if p]
  for i, part in enumerate(parts):
    if part.endswith(")") and "(" in part and i + 1 < len(parts) and i > 0:
      if "MultiResolutionMIL" in part or "GlobalAveragePooling" in part:
        return f"{parts[i + 1]} {'backward' if part.startswith('transpose(') else 'forward'}"
  return parts[1] if len(parts) > 1 else (parts[0] if parts else "unnamed")


def _operands(rest: str) -> list[str]:
  """The %names of an op's operand list: `rest` up to its closing parenthesis."""
  depth = 1
  for i, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", rest[:i])
  return re.findall(r"%([\w.\-]+)", rest)


def traffic(hlo_text: str) -> dict[str, int]:
  """Bytes each part of the model moves, from a compiled module's entry computation: for
  every op that reads or writes memory (fusions, convolutions, copies, collectives), its
  result and operand bytes, summed by where in the model the op comes from ('dense4
  backward', 'up1 forward', the optimizer's step). Arrays count padded to their TPU tiles
  (a narrow channel dimension fills a 128-lane tile; `shape_bytes`); an async copy or
  slice (`-start`) counts its source once; an op without metadata belongs
  to the part of its first operand that has one. An estimate that ranks the parts; XLA's
  bytes accessed (`cost_analysis`) stays the total."""
  shapes: dict[str, int] = {}
  part: dict[str, str] = {}
  out: dict[str, int] = collections.Counter()
  entry = False
  for line in hlo_text.splitlines():
    if line.startswith("ENTRY"):
      entry = True
      continue
    if entry and line.startswith("}"):
      break
    m = _INSTRUCTION.match(line)
    if m is None:
      continue
    name, kind, op, rest = m.groups()
    shapes[name] = shape_bytes(kind, tiled=True)
    operands = _operands(rest)
    where = _OP_NAME.search(line)
    inherited = next((part[o] for o in operands if o in part), op)
    part[name] = _where(where.group(1)) if where else inherited
    if not entry or op in _NO_TRAFFIC or op.endswith("-done"):
      continue
    moved = sum(shapes.get(o, 0) for o in operands)
    if not op.endswith("-start"):  # a start's result holds its source again
      moved += shapes[name]
    out[part[name]] += moved
  return dict(out)
