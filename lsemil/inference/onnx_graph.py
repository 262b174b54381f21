"""The model as an ONNX graph (jax2onnx), for runtimes without JAX.

`convert` traces the forward of `lsemil.inference.engine.Predictor` (`engine.forward`: the MIL
model's `apply` with the weights bound as constants) and writes it with jax2onnx:

  input   image     uint8 (B, S, S, 1): the model input of `engine.model_input` (NHWC, one
                    grey channel, 0..255; the graph scales it to [0, 1] itself), B dynamic
  output  probs     float32 (B, K): the class probabilities (LSE-LBA pooling, Sec 3.5)
  output  saliency  float32 (B, N, N, K): the per-class saliency maps S, in [0, 1]

K = the run's classes in config.json's order (`lsemil.data.findings.of_config`),
S = config.model.input_size, N = config.model.saliency_size. onnxruntime reproduces JAX's
outputs to float32 rounding (tests/system/test_export_cli.py on the smoke config;
`benchmarks/onnx_parity.py` at the demo and paper sizes, README). Only the MIL model
converts (a GAP baseline's Grad-CAM needs gradients: ConfigError).

jax2onnx 0.12.5 imports every plugin it ships on first use, including example models that
build equinox networks at import (about 20 s of XLA compiles on 2 CPU cores) and two dm_pix
plugins that fail to import under jax 0.10 (logged warnings with tracebacks); `_plugins`
imports the jax and flax primitive plugins only, which is all this model needs. Its conv
plugin prints a debug line per convolution and onnx_ir logs a warning per unannotated shape:
both are kept off the output (library code prints nothing). The value_info shape annotations
jax2onnx writes for its NCHW convolutions are partly wrong (NHWC shapes on NCHW values, which
onnxruntime reports when it loads the graph); they are dropped, as onnxruntime infers shapes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np

from lsemil.core import fileio
from lsemil.core.errors import ConfigError
from lsemil.inference import engine
from lsemil.models import registry

OPSET = 23
INPUT_NAME = "image"
OUTPUT_NAMES = ("probs", "saliency")
_QUIET_LOGGERS = ("jax2onnx", "onnx_ir")


def _plugins() -> None:
  """Registers jax2onnx's jax and flax plugins (not its examples), once."""
  from jax2onnx.plugins import plugin_system

  if getattr(plugin_system, "_already_imported_plugins", True):
    return
  root = Path(plugin_system.__file__).parent
  for sub in ("jax", "flax"):
    plugin_system._import_tree(root / sub, f"jax2onnx.plugins.{sub}")
  plugin_system._already_imported_plugins = True


@contextlib.contextmanager
def _quiet():
  """jax2onnx's prints and warnings off stdout / the log while it converts."""
  loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for lg, level in zip(loggers, levels, strict=True):
      lg.setLevel(level)


def check(loaded: engine.LoadedModel) -> None:
  """ConfigError unless `loaded` converts: the MIL model only (a GAP baseline's Grad-CAM
  needs gradients, which the graph would not hold)."""
  if registry.arch_of(loaded.model) != registry.MIL:
    raise ConfigError(
      f"{loaded.checkpoint}: ONNX export covers the MIL model only (config.model.arch = "
      f"{registry.arch_of(loaded.model)!r}; Grad-CAM needs gradients); export with --no-onnx"
    )


def convert(loaded: engine.LoadedModel) -> bytes:
  """The serialized ONNX model of `loaded` (see the module docstring for its signature)."""
  check(loaded)
  with _quiet():
    import jax2onnx

    _plugins()
    fwd = engine.forward(loaded.model, loaded.variables, saliency=True)
    s = int(loaded.model.input_size)
    spec = jax.ShapeDtypeStruct(("B", s, s, 1), np.uint8)
    proto = jax2onnx.to_onnx(
      lambda x: tuple(fwd(x)[k] for k in OUTPUT_NAMES),
      [spec],
      model_name="lsemil",
      opset=OPSET,
      input_names=[INPUT_NAME],
      output_names=list(OUTPUT_NAMES),
    )
  del proto.graph.value_info[:]
  return proto.SerializeToString()


def write(loaded: engine.LoadedModel, path: str | os.PathLike) -> float:
  """Writes `convert(loaded)` to `path`; returns the seconds the conversion took."""
  start = time.perf_counter()
  data = convert(loaded)
  seconds = time.perf_counter() - start
  fileio.write_bytes(path, data)
  return seconds


def session(path_or_bytes: str | os.PathLike | bytes):
  """An onnxruntime CPU InferenceSession of a model file (or its bytes)."""
  import onnxruntime

  model = path_or_bytes if isinstance(path_or_bytes, bytes) else os.fspath(path_or_bytes)
  return onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])


def run(sess, images: np.ndarray) -> dict[str, np.ndarray]:
  """{'probs', 'saliency'} of uint8 (B, S, S, 1) images through an onnxruntime session."""
  outs = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: np.asarray(images, np.uint8)})
  return dict(zip(OUTPUT_NAMES, outs, strict=True))
