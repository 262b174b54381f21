"""`lsemil demo --quick` end to end: the whole method (Sec 4) on synthetic data, on a CPU.

Runs the real command in a subprocess (synth -> prepare -> train -> evaluate -> reproduce)
from a regular (non-editable) install of the package, in an empty directory, and checks the
bar of the quick mode: mean test AUC >= 0.75 and DICE above a uniform map.
"""

import json
import math
import pathlib


def test_demo_quick_end_to_end(tmp_path, installed):
  out, empty = tmp_path / "demo", tmp_path / "empty"
  empty.mkdir()
  # `lsemil demo --quick` of a regular install in a fresh virtualenv, not of the source tree
  proc = installed("demo", "--quick", "--out", out, cwd=empty, timeout=1800)
  assert sorted(empty.iterdir()) == []  # everything went to --out
  results = out / "results"
  # figure_levels.png: one model's saliency at each level of the up path (the paper's Figure 1
  # proper, figure1.png, needs the N = 8..64 models of `--figure1`); index.html: everything.
  for name in ("table1.md", "table2.md", "table3.md", "figure_levels.png", "figure3.png",
               "summary.json", "demo_summary.json", "report.md", "index.html"):
    assert (results / name).is_file(), f"missing {name}"
    assert (results / name).stat().st_size > 100, f"{name} is nearly empty"
  demo = json.loads((results / "demo_summary.json").read_text())
  (run,) = demo["runs"].values()
  # On a CPU the run trained as a pinned `lsemil train` subprocess with its own log.
  log = pathlib.Path(run["workdir"]) / "train.log"
  assert "best checkpoint:" in log.read_text(), log
  assert " on core " in proc.stderr
  assert run["mean_auc"] >= 0.75, run
  assert not math.isnan(run["mean_dice"])
  assert run["mean_dice"] > run["mean_dice_uniform"], run
  # The printed summary names the results and states the bar.
  assert "test mean AUC" in proc.stdout and "bar:" in proc.stdout
  # The layout of the paper's Table 3 with its reference columns.
  table3 = (results / "table3.md").read_text()
  assert "(paper)" in table3 and "Nodule" in table3 and "A.V.G." in table3
