"""`lsemil reproduce` with the statistics the paper lacks and Table 4's localization protocols.

Runs are real checkpoints of the smoke model with deterministic random weights (different
seeds give different models), over the `synth_dir` fixture: seeds grouped by label (mean ± sd,
per-seed values), Table 3's significance (paired DeLong / paired patient bootstrap recomputed
here from the per-image CSV and the saliency .npz), calibration, Table 4 with the model-free
sources, the Figure 1 / figure_levels split and the HTML report's structure.

The paper's Figure 1 (one image and class, one model per target resolution N, each map at
its own N) and the per-level view of one model, which is not Figure 1.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from lsemil.commands import cli, reproduce
from lsemil.core import configuration
from lsemil.data import layouts, nih
from lsemil.inference import engine
from lsemil.metrics import calibration, overlap, significance
from lsemil.models import mil
from lsemil.reporting import drawing, paper_tables
from lsemil.training import trainer
from lsemil.workflows import evaluation, reproduction

N_BOOT = 20


@pytest.fixture(scope="module")
def make_run(synth_dir, random_variables, write_checkpoint):
  """fn(workdir, r0, seed=0, N=None) -> workdir with a random-weight smoke checkpoint."""

  def make(workdir, r0, seed=0, n=None):
    arg = f"r0={r0},seed={seed}"
    config = configuration.load_config("smoke", arg)
    if n is not None:
      config.model.saliency_size = int(n)
    config.data.data_dir = str(synth_dir)
    model = mil.from_config(config.model)
    write_checkpoint(workdir, config, random_variables(model, seed), 7)
    return workdir

  return make


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, make_run):
  """Two seeds of r0=5, one r0=0, reproduced once, with Table 4 on a synthetic RSNA folder's
  boxes and a SIIM-ACR folder's masks too."""
  tmp = tmp_path_factory.mktemp("rep")
  runs = [
    ("r0=5", 5.0, make_run(tmp / "w5a", 5, seed=0)),
    ("r0=5", 5.0, make_run(tmp / "w5b", 5, seed=1)),
    ("r0=0", 0.0, make_run(tmp / "w0", 0, seed=2)),
  ]
  extra = [(s, tmp / s) for s in ("rsna-pneumonia", "siim-acr")]
  for source, folder in extra:
    layouts.write(source, folder, patients=16, size=128, seed=1)
  out = tmp / "R"
  summary = reproduction.reproduce_runs(
    runs, None, out, n_boot=N_BOOT, progress=False, n_figure=2, extra_truth=extra
  )
  return tmp, out, summary


def _csv(path) -> list[dict]:
  return list(csv.DictReader(io.StringIO(path.read_text())))


def _test_arrays(workdir, index):
  """(labels, probs) of the test split from a run's per-image CSV, in index-row order."""
  rows = index.rows("test")
  from lsemil.inference import engine

  by_id = engine.read_predictions_csv(workdir / "evaluation_test_predictions.csv")
  probs = np.stack([by_id[index.image_ids[r]] for r in rows])
  return np.asarray(index.labels, np.float64)[rows], probs


def test_config_arguments_n_and_seed():
  c = configuration.load_config("demo", "r0=10,N=8,seed=3")
  assert (c.model.r0, c.model.saliency_size, c.seed) == (10.0, 8, 3)
  assert configuration.load_config("demo").model.saliency_size == 32
  assert configuration.load_config("paper", "N=16").model.saliency_size == 16
  for n in (8, 16, 32, 64):  # every Figure 1 variant of the demo builds
    spec = mil.validate(configuration.load_config("demo", f"N={n}").model)
    assert n in spec.level_sides
  from lsemil.core.errors import ConfigError

  with pytest.raises(ConfigError, match="N='x'"):
    configuration.load_config("demo", "N=x")
  with pytest.raises(ConfigError, match="known: r0, N, seed"):
    configuration.load_config("paper", "bogus=1")


def test_seeds_grouped_mean_sd_and_per_seed(reproduced):
  tmp, out, summary = reproduced
  assert summary["labels"] == ["r0=5", "r0=0"]
  assert [r["name"] for r in summary["runs"]] == ["r0=5 (seed 0)", "r0=5 (seed 1)", "r0=0"]
  a = evaluation.load_evaluation(tmp / "w5a" / "evaluation_test.json")
  b = evaluation.load_evaluation(tmp / "w5b" / "evaluation_test.json")
  assert a["mean_auc"] != b["mean_auc"]  # two different models
  spread = {r["run"] + "/" + r["seed"]: r for r in _csv(out / "spread.csv")}
  m = np.mean([a["mean_auc"], b["mean_auc"]])
  sd = np.std([a["mean_auc"], b["mean_auc"]], ddof=1)
  assert float(spread["r0=5/mean"]["mean_auc"]) == pytest.approx(m)
  assert float(spread["r0=5/sd"]["mean_auc"]) == pytest.approx(sd)
  assert float(spread["r0=5/0"]["mean_auc"]) == pytest.approx(a["mean_auc"])
  assert float(spread["r0=5/1"]["mean_auc"]) == pytest.approx(b["mean_auc"])
  assert spread["r0=0/sd"]["mean_auc"] == ""  # one seed: no sd
  dice_a = np.mean([v for v in a["dice"].values() if not math.isnan(v)])
  assert float(spread["r0=5/0"]["mean_dice"]) == pytest.approx(dice_a)
  md = (out / "spread.md").read_text()
  assert f"{m:.3f} ± {sd:.3f}" in md
  # Table 3: the label's mean AUC with its sd, per class too.
  t3 = (out / "table3.md").read_text()
  assert f"{m:.3f} ± {sd:.3f}" in t3
  row = next(r for r in _csv(out / "table3.csv") if r["abnormality"] == "Mass")
  assert float(row["auc_r0=5"]) == pytest.approx(np.mean([a["auc"]["Mass"], b["auc"]["Mass"]]))
  assert float(row["auc_r0=5_sd"]) == pytest.approx(
    np.std([a["auc"]["Mass"], b["auc"]["Mass"]], ddof=1)
  )


def test_table3_significance_from_the_per_image_files(reproduced, synth_dir):
  tmp, out, summary = reproduced
  config = configuration.load_config("smoke")
  index = evaluation.open_index(config, synth_dir)
  y, pa = _test_arrays(tmp / "w5a", index)
  _, pb = _test_arrays(tmp / "w5b", index)
  _, p0 = _test_arrays(tmp / "w0", index)
  expect = significance.delong_paired(y, (pa + pb) / 2, p0)  # the seed-averaged probabilities
  sig = json.loads((out / "significance.json").read_text())
  (pair,) = sig["auc"]["pairs"]
  assert (pair["a"], pair["b"]) == ("r0=5", "r0=0")
  for k, cls in enumerate(nih.CLASSES):
    want = expect.p[k]
    got = pair["p"][cls]
    assert (got is None and math.isnan(want)) or got == pytest.approx(want, rel=1e-9)
  rows = {r["abnormality"]: r for r in _csv(out / "table3.csv")}
  for cls in nih.CLASSES:
    cell = rows[cls]["p_auc_r0=5_vs_r0=0"]
    assert (cell == "") == (pair["p"][cls] is None)
  # DICE: the paired bootstrap on per-case DICE recomputed from the saliency files.
  cases = evaluation.box_cases(index, index.rows("test"))
  per = {}
  for w in ("w5a", "w5b", "w0"):
    sal = evaluation.load_saliency(tmp / w / "evaluation_test_saliency_boxes.npz")
    per[w] = reproduction.case_dice(sal, cases, index.box_space)
  keys = sorted(per["w0"])
  assert keys and all(sorted(per[w]) == keys for w in per)
  by_cls = {}
  for row, k in keys:
    by_cls.setdefault(nih.CLASSES[k], []).append(per["w0"][(row, k)])
  stored = evaluation.load_evaluation(tmp / "w0" / "evaluation_test.json")
  for cls, vals in by_cls.items():  # the per-case values average to the evaluation's DICE
    assert np.mean(vals) == pytest.approx(stored["dice"][cls], abs=1e-4)
  da = np.array([(per["w5a"][c] + per["w5b"][c]) / 2 for c in keys])
  d0 = np.array([per["w0"][c] for c in keys])
  names, boot = significance.paired_bootstrap_dice(
    da, d0, np.asarray(index.patient_ids)[[r for r, _ in keys]],
    [nih.CLASSES[k] for _, k in keys], n_boot=reproduction.SIG_N_BOOT,
  )  # fmt: skip
  (dpair,) = sig["dice"]["pairs"]
  for cls, p in zip(names, boot.p, strict=True):
    assert dpair["p"][cls] == pytest.approx(p)
  assert "Holm" in (out / "table3.md").read_text().split("\n|")[-1]  # the rule under it


def test_table3_bold_needs_the_test_and_the_displayed_best():
  from lsemil.reporting import paper_tables

  runs = [
    {"label": "a", "auc": {c: 0.9 for c in nih.CLASSES}, "dice": {"Mass": 0.5, "Nodule": 0.2}},
    {"label": "b", "auc": {c: 0.8 for c in nih.CLASSES}, "dice": {"Mass": 0.4, "Nodule": 0.3}},
  ]
  nan = float("nan")
  sig = {
    "auc": {
      "pairs": [{"a": "a", "b": "b", "p": {c: 0.001 for c in nih.CLASSES},
                 "p_holm": {c: 0.01 if c == "Mass" else 0.2 for c in nih.CLASSES}}],
      "bold": {"a": ["Mass", "Edema"], "b": ["Nodule"]},  # b is not the displayed best there
    },
    "dice": {
      "pairs": [{"a": "a", "b": "b", "p": {"Mass": 0.04, "Nodule": nan},
                 "p_holm": {"Mass": 0.08, "Nodule": nan}}],
      "bold": {"a": [], "b": ["Nodule"]},
    },
  }  # fmt: skip
  md, text = paper_tables.table3(runs, sig)
  rows = {
    r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in md.splitlines())
  }
  header = rows["abnormality"]
  a, b = header.index("AUC a (ours)"), header.index("AUC b (ours)")
  da, db = header.index("DICE a (ours)"), header.index("DICE b (ours)")
  assert rows["Mass"][a] == "**0.900**" and rows["Edema"][a] == "**0.900**"
  assert rows["Nodule"][a] == "0.900" and rows["Nodule"][b] == "0.800"  # b bold-listed, lower
  assert rows["Atelectasis"][a] == "0.900"  # best but not significant: plain
  assert rows["Mass"][da] == "0.500" and rows["Nodule"][db] == "**0.300**"
  assert "**" not in "".join(rows["A.V.G."])
  csv_rows = {r["abnormality"]: r for r in csv.DictReader(io.StringIO(text))}
  assert float(csv_rows["Mass"]["p_holm_auc_a_vs_b"]) == 0.01
  assert float(csv_rows["Mass"]["p_dice_a_vs_b"]) == 0.04
  assert csv_rows["Nodule"]["p_dice_a_vs_b"] == "" and csv_rows["Edema"]["p_dice_a_vs_b"] == ""
  # Without a significance dict: the paper's bold (best of ours), unchanged.
  md, _ = paper_tables.table3(runs)
  assert "**0.900**" in md.split("Atelectasis", 1)[1].split("\n", 1)[0]


def test_bold_only_where_significant(reproduced):
  _, out, _ = reproduced
  sig = json.loads((out / "significance.json").read_text())
  md_rows = [
    [c.strip() for c in line.strip("|").split("|")]
    for line in (out / "table3.md").read_text().splitlines()
    if line.startswith("|")
  ]
  header = md_rows[0]
  j = [header.index("AUC r0=5 (ours)"), header.index("AUC r0=0 (ours)")]
  for row in md_rows[2:-1]:
    from lsemil.reporting import paper_tables

    cls = paper_tables.canonical_class(row[0])
    for lb, col in zip(("r0=5", "r0=0"), j, strict=True):
      assert row[col].startswith("**") == (cls in sig["auc"]["bold"][lb]), (cls, lb, row[col])
  assert "**" not in "|".join(md_rows[-1])  # the mean row is not tested


def test_calibration_table_and_reliability(reproduced, synth_dir):
  tmp, out, _ = reproduced
  index = evaluation.open_index(configuration.load_config("smoke"), synth_dir)
  y, p0 = _test_arrays(tmp / "w0", index)
  rows = {(r["run"], r["class"]): r for r in _csv(out / "calibration.csv")}
  assert float(rows[("r0=0", "")]["ece"]) == pytest.approx(calibration.ece(p0, y))
  assert float(rows[("r0=0", "")]["brier"]) == pytest.approx(calibration.brier(p0, y))
  k = nih.CLASSES.index("Mass")
  assert float(rows[("r0=0", "Mass")]["ece"]) == pytest.approx(calibration.ece(p0[:, k], y[:, k]))
  assert (out / "reliability.png").stat().st_size > 1000
  assert (out / "roc_curves.png").stat().st_size > 1000


def test_table4_model_free_sources(reproduced, synth_dir):
  _, out, summary = reproduced
  t4 = summary["table4"]
  sources = {r["source"] for r in t4["rows"]}
  assert {"constant", "centre"} <= sources
  # The best constant map's DICE is the oracle of overlap.uniform_dice, case by case.
  index = evaluation.open_index(configuration.load_config("smoke"), synth_dir)
  cases = evaluation.box_cases(index, index.rows("test"))
  by_cls = {}
  for by in cases.values():
    for k, boxes in by:
      mask = overlap.boxes_to_mask(boxes, 512, index.box_space)
      by_cls.setdefault(nih.CLASSES[k], []).append(overlap.uniform_dice(mask))
  const = t4["results"]["constant"]["dice"]
  for cls, vals in by_cls.items():
    assert const[cls]["value"] == pytest.approx(np.mean(vals), abs=1e-9)
  text = (out / "table4.md").read_text()
  assert "| constant |" in text and "| centre |" in text and "**" in text
  if any("protocols" not in r for r in summary["runs"]):  # evaluate without protocols yet
    assert "Not scored" in text


def _table_header(path) -> list[str]:
  line = next(x for x in path.read_text().splitlines() if x.startswith("| "))
  return [c.strip() for c in line.strip("|").split("|")]


def test_table4_is_lsemil_scores_on_the_same_maps(reproduced, synth_dir, tmp_path):
  """cheXlocalize's protocols first; their values and the WSRPN-style table's are `lsemil
  score`'s on the r0=0 run's stored maps, written here as score's inputs (one scoring path)."""
  tmp, out, summary = reproduced
  assert _table_header(out / "table4.md")[2:5] == [
    "chexlocalize_miou_otsu", "chexlocalize_miou_tuned", "chexlocalize_hit_rate"]  # fmt: skip
  index = evaluation.open_index(configuration.load_config("smoke"), synth_dir)
  with np.load(tmp / "w0" / "evaluation_test_saliency_boxes.npz") as z:
    rows, ids = z["rows"], z["image_ids"]
    maps = z["saliency"].astype(np.float32).transpose(0, 3, 1, 2)
  probs = [engine.read_predictions_csv(tmp / "w0" / "evaluation_test_predictions.csv")[i]
           for i in ids]  # fmt: skip
  side = int(index.box_space)
  np.savez(tmp_path / "maps.npz", image_ids=ids, classes=np.array(nih.CLASSES), maps=maps,
           probs=np.array(probs), image_sizes=np.full((len(ids), 2), side),
           patient_ids=np.asarray(index.patient_ids)[rows])  # fmt: skip
  lines = ["image_id,class,x,y,w,h"] + [
    f"{index.image_ids[r]},{nih.CLASSES[k]},{','.join(repr(float(v)) for v in xywh)}"
    for r, k, xywh in zip(index.box_rows, index.box_classes, index.box_xywh, strict=True)
    if r in set(rows.tolist())
  ]
  (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
  argv = ["score", "--maps", str(tmp_path / "maps.npz"), "--boxes", str(tmp_path / "boxes.csv"),
          "--out", str(tmp_path / "S"), "--n-boot", str(N_BOOT)]  # fmt: skip
  assert cli.main(argv) == 0
  scores = json.loads((tmp_path / "S" / "scores.json").read_text())
  t4, wsrpn = summary["table4"]["results"]["r0=0"], summary["wsrpn"]["r0=0"]
  checked = 0
  for p in ("chexlocalize_miou_otsu", "chexlocalize_miou_tuned", "chexlocalize_hit_rate",
            "detection_ap@0.3", "detection_rodeo_total", "detection_loc_acc@0.5"):  # fmt: skip
    got = t4[p] if p.startswith("chexlocalize_") else wsrpn[p]
    assert set(got) == set(scores[p]), p
    for cls, e in scores[p].items():
      want = [math.nan if e[k] is None else e[k] for k in ("value", "lo")]
      assert [got[cls]["value"], got[cls]["lo"]] == pytest.approx(want, abs=1e-12, nan_ok=True)
      checked += 1
  assert checked > 12
  row = next(r for r in _csv(out / "table_wsrpn.csv") if r["source"] == "r0=0")
  assert float(row["detection_ap@0.5_value"]) == pytest.approx(
    scores["detection_ap@0.5"]["(all)"]["value"], abs=1e-12)  # fmt: skip
  assert _table_header(out / "table_wsrpn.md") == [
    "source", "RoDeO total", "RoDeO loc", "RoDeO shape", "RoDeO cls", "AP@0.3", "AP@0.5",
    "loc-acc@0.3", "loc-acc@0.5"]  # fmt: skip
  assert [r["source"] for r in _csv(out / "table_wsrpn.csv")] == [
    "r0=5 (seed 0)", "r0=0", "constant", "centre"]  # fmt: skip


def test_table4_of_extra_truth_sources(reproduced):
  """RSNA's boxes (Lung Opacity = the run's Pneumonia) and SIIM-ACR's masks: a Table 4 each,
  cheXlocalize's protocols first, the class under its data name; a WSRPN table for boxes only."""
  tmp, out, summary = reproduced
  for source, cls in (("rsna-pneumonia", "Lung Opacity"), ("siim-acr", "Pneumothorax")):
    header = _table_header(out / f"table4_{source}.md")
    assert header[2:] == list(paper_tables.TABLE4_SOURCE_PROTOCOLS)
    rows = _csv(out / f"table4_{source}.csv")
    assert {r["class"] for r in rows} == {cls, "mean"}
    assert [r["source"] for r in rows if r["class"] == cls] == [
      "r0=5 (seed 0)", "r0=0", "constant", "centre"]  # fmt: skip
    model = next(r for r in rows if r["class"] == cls and r["source"] == "r0=0")
    assert model["chexlocalize_hit_rate_value"] != ""
    data = summary["table4_sources"][source]
    assert data["results"]["r0=0"]["settings"]["classes"] == [cls]
  assert (out / "table_wsrpn_rsna-pneumonia.md").is_file()
  assert not (out / "table_wsrpn_siim-acr.md").exists()
  pairs = summary["table4_sources"]["rsna-pneumonia"]["mapping"]["pairs"]
  assert [(p["model"], p["data"]) for p in pairs] == [("Pneumonia", "Lung Opacity")]


def test_figures_html_and_figure1_split(reproduced):
  _, out, summary = reproduced
  assert "figure1.png" not in summary["figures"] and not (out / "figure1.png").exists()
  assert "figure_levels.png" in summary["figures"] and "figure3.png" in summary["figures"]
  page = (out / "index.html").read_text()
  assert page.count('class="gallery-item"') == summary["gallery_items"] > 0
  assert not re.search(r"(src|href)=\"(https?:)?//", page)
  for name in ("Table 3", "Table 4", "Spread", "Calibration"):
    assert name in page


def test_cli_parsing_errors(tmp_path, capsys):
  for argv, words in [
    (["--baseline", "lime:W"], "gradcam"),
    (["--figure1", "8:W"], "N=<side>"),
    (["--figure1", "N=x:W"], "N=<side>"),
    (["--extra-truth", "rsna=D"], "SOURCE=DIR with SOURCE one of"),
    (["--extra-truth", "nih=D"], "rsna-pneumonia"),
  ]:
    with pytest.raises(SystemExit) as e:
      cli.main(["reproduce", "--run", f"x:{tmp_path}", "--out", str(tmp_path / "R"), *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err
  assert reproduce.parse_truth("siim-acr=a=b") == ("siim-acr", "a=b")


# --------------------------------------------------------------------------- Figure 1

def test_report_figure1_panels_and_boxes(tmp_path):
  rng = np.random.default_rng(0)
  img = rng.random((64, 64))
  panels = [(f"N={n}", rng.random((n, n))) for n in (8, 16, 32, 64)]
  fig = drawing.figure1(tmp_path / "f.png", img, panels, title="Nodule", boxes=[(0, 0, 512, 256)])
  assert [ax.get_title() for ax in fig.axes] == [
    "Nodule", "N=8 (8x8)", "N=16 (16x16)", "N=32 (32x32)", "N=64 (64x64)",
  ]  # fmt: skip
  (box,) = fig.axes[0].patches  # the box on the image panel, scaled from 1024 px to 64 px
  assert box.get_width() == pytest.approx(32) and box.get_height() == pytest.approx(16)
  assert all(not ax.patches for ax in fig.axes[1:])
  with Image.open(tmp_path / "f.png") as im:
    assert im.size[0] > 4 * im.size[1]


def test_parse_figure1():
  assert reproduce.parse_figure1("N=16:runs/w") == (16, "runs/w")
  assert reproduce.parse_figure1("N=8:gs://b/w") == (8, "gs://b/w")


@pytest.fixture(scope="module")
def runs_by_n(tmp_path_factory, synth_dir, random_variables, write_checkpoint):
  """Random-weight smoke checkpoints at N = 8 and 16 (the smoke input has levels 32/16/8)."""
  tmp = tmp_path_factory.mktemp("fig1")
  out = {}
  for n in (8, 16):
    config = configuration.load_config("smoke", f"r0=5,N={n}")
    config.model.saliency_size = n  # the smoke config sets its own N after the paper's
    config.data.data_dir = str(synth_dir)
    model = mil.from_config(config.model)
    write_checkpoint(tmp / f"w{n}", config, random_variables(model, n), 7)
    out[n] = tmp / f"w{n}"
  return tmp, out


def test_figure1_one_model_per_n(runs_by_n, synth_dir):
  tmp, by_n = runs_by_n
  out = tmp / "R"
  summary = reproduction.reproduce_runs(
    [("r0=5", 5.0, by_n[16])], None, out, n_boot=0, progress=False, n_figure=1,
    figure1=[(16, by_n[16]), (8, by_n[8])], html=False,
  )  # fmt: skip
  assert summary["figures"][0] == "figure1.png"
  fig1 = summary["figure1"]
  assert fig1["N"] == [8, 16]  # sorted by N
  index = evaluation.open_index(configuration.load_config("smoke"), synth_dir)
  row = fig1["row"]
  assert index.image_ids[row] == fig1["image_id"] and row in index.rows("test").tolist()
  for n in (8, 16):  # each model's map at its own N
    sal = evaluation.load_saliency(by_n[n] / "evaluation_test_saliency_boxes.npz")
    assert sal["maps"][row].shape[:2] == (n, n)
  with Image.open(out / "figure1.png") as im:  # image + 2 panels
    assert im.size[0] / im.size[1] == pytest.approx(3, rel=0.05)
  # One model's levels are figure_levels.png, never Figure 1.
  assert "figure_levels.png" in summary["figures"]
  assert not (out / "index.html").exists()


def test_figure1_needs_a_shared_box_image(runs_by_n):
  tmp, by_n = runs_by_n
  (r,) = [
    reproduction.Run("N=8", None, str(by_n[8]), {}, {"maps": {}}, None, None, name="N=8"),
  ]
  with pytest.raises(reproduction.UserError, match="share no test image"):
    reproduction.figure1(tmp / "x.png", [(8, r)], None, "test", None)


def test_train_step_of_every_demo_n_builds():
  for n in (8, 16, 32, 64):
    config = configuration.load_config("demo", f"N={n}")
    model = mil.from_config(config.model)
    assert model.saliency_size == n
    trainer.validate_config(config)


def test_a_run_of_another_source_is_refused_before_evaluating(
  tmp_path, synth_dir, random_variables, write_checkpoint
):
  config = configuration.load_config("smoke")
  with config.unlocked():
    config.data.source, config.data.classes = "siim-acr", ["Pneumothorax"]
    config.model.num_classes = 1
  w = tmp_path / "w"
  write_checkpoint(w, config, random_variables(mil.from_config(config.model), seed=0), 1)
  with pytest.raises(reproduction.UserError, match="a siim-acr run; reproduce writes the paper's"):
    reproduction.reproduce_runs([("r0=5", 5.0, str(w))], str(synth_dir), tmp_path / "R")
  assert not list(w.glob("evaluation_*"))  # refused before anything was evaluated
