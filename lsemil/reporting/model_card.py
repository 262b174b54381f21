"""The README.md of an exported model: a Hugging Face model card (text only, no JAX).

`card` writes YAML front matter (license, library, tags, datasets, metrics) and the sections
Hugging Face's model card guide asks for: the model, intended use (research, not for clinical
use), training data and its licence, the input contract, the files, evaluation (per-class AUC
with its 95 % patient-bootstrap interval, DICE, the weak-localization protocols) when the
workdir holds evaluations, limitations and the citation. Every number comes from the
`lsemil evaluate` results it is given; none is written when there are none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

NIH_SITE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
NIH_CITATION = (
  "Xiaosong Wang, Yifan Peng, Le Lu, Zhiyong Lu, Mohammadhadi Bagheri, Ronald Summers. "
  "ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised "
  "Classification and Localization of Common Thorax Diseases. IEEE CVPR 2017, pp. 3462-3471."
)
PAPER = (
  "Li Yao, Jordan Prosky, Eric Poblenz, Ben Covington, Kevin Lyman. Weakly Supervised Medical "
  "Diagnosis and Localization from Multiple Resolutions. arXiv:1803.07703, 2018."
)
TAGS = (
  "chest-x-ray",
  "medical-imaging",
  "image-classification",
  "weakly-supervised-localization",
  "multiple-instance-learning",
  "saliency",
  "jax",
  "flax",
  "safetensors",
  "onnx",
)


def _num(v: Any, digits: int = 3) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  return f"{float(v):.{digits}f}"


def _front_matter(data_kind: str, has_metrics: bool, onnx: bool) -> str:
  tags = [t for t in TAGS if onnx or t != "onnx"]
  lines = ["---", "license: apache-2.0", "library_name: lsemil"]
  lines += ["pipeline_tag: image-classification", "tags:"] + [f"- {t}" for t in tags]
  if data_kind == "nih":
    lines += ["datasets:", "- nih-chest-x-ray-14"]
  if has_metrics:
    lines += ["metrics:", "- roc_auc", "- dice"]
  return "\n".join([*lines, "---"])


def _training_data(data_kind: str, classes: Sequence[str]) -> str:
  if data_kind not in ("nih", "synthetic", "unknown"):  # another source's release
    return (
      f"The `{data_kind}` release as lsemil's `{data_kind}` reader reads it "
      f"(`lsemil.data.sources`; the run's config records the label policies), "
      f"{len(classes)} classes: {', '.join(classes)}. Its licence and citation are the "
      "release's own: follow its data use agreement."
    )
  if data_kind == "synthetic":
    return (
      "**Synthetic phantoms** (`lsemil synth`: planted findings of all its classes, in the "
      f"layout of a chest X-ray release; {len(classes)} classes here), not real radiographs. "
      "This model demonstrates the method and the file formats; it has never seen a chest "
      "X-ray and says nothing about real images."
    )
  text = (
    "NIH ChestX-ray14 (112,120 frontal chest radiographs of 30,805 patients, 14 labels "
    "text-mined from the radiology reports, estimated > 90 % accurate; 984 boxes of 8 "
    "findings on 880 test images), patient-wise splits as in the paper (Sec 4.1).\n\n"
    "**Data licence.** The images are released by the NIH Clinical Center without "
    "restrictions on their use, with three attribution requirements: link to the NIH "
    f"download site ({NIH_SITE}), cite the CVPR 2017 paper ({NIH_CITATION}), and acknowledge "
    "the NIH Clinical Center as the data provider. This model was trained on data provided "
    "by the NIH Clinical Center."
  )
  if data_kind != "nih":
    text = (
      "A dataset folder in the NIH ChestX-ray14 layout (its provenance was not recorded "
      "with the run; the description below applies if it is the NIH release).\n\n" + text
    )
  return text


def _per_class(ev: Mapping, classes: Sequence[str]) -> list[str]:
  head = "| class | AUC | 95 % CI | positives | DICE | uniform-map DICE |"
  lines = [head, "|:---|---:|---:|---:|---:|---:|"]
  lo, hi = ev.get("auc_lo") or {}, ev.get("auc_hi") or {}
  dice, unif = ev.get("dice") or {}, ev.get("dice_uniform") or {}
  pos = ev.get("num_positives") or {}
  for c in classes:
    auc = (ev.get("auc") or {}).get(c)
    ci = f"{_num(lo.get(c))}-{_num(hi.get(c))}" if lo.get(c) is not None else "-"
    lines.append(
      f"| {c} | {_num(auc)} | {ci} | {pos.get(c, '-')} | {_num(dice.get(c))} "
      f"| {_num(unif.get(c))} |"
    )
  lines.append(f"| **mean** | **{_num(ev.get('mean_auc'))}** | | | | |")
  return lines


def _protocols(ev: Mapping) -> list[str]:
  protocols = {k: v for k, v in (ev.get("protocols") or {}).items() if k != "settings"}
  if not protocols:
    return []
  lines = ["| protocol | mean over box classes | classes |", "|:---|---:|---:|"]
  for name, by_class in protocols.items():
    values = [
      float(e["value"])
      for e in by_class.values()
      if isinstance(e, Mapping) and e.get("value") is not None and not math.isnan(e["value"])
    ]
    mean = sum(values) / len(values) if values else None
    lines.append(f"| {name} | {_num(mean)} | {len(values)} |")
  return lines


def _operating_points(ops: Mapping | None) -> list[str]:
  if not ops or not any(t is not None for t in ops.get("thresholds") or ()):
    return []
  lines = [
    f"### Operating thresholds (`{ops.get('rule')}`, chosen on the valid split)",
    "",
    "Decision: p >= threshold (thresholds.json); sensitivity and specificity on the valid "
    "split they were chosen on (optimistic for new data).",
    "",
    "| class | threshold | sensitivity | specificity |",
    "|:---|---:|---:|---:|",
  ]
  cols = [ops.get(k) or [] for k in ("thresholds", "sensitivity", "specificity")]
  for c, t, se, sp in zip(ops.get("classes") or [], *cols, strict=False):
    lines.append(f"| {c} | {_num(t)} | {_num(se)} | {_num(sp)} |")
  return [*lines, ""]


def _evaluation(metrics: Mapping[str, Mapping], classes: Sequence[str]) -> list[str]:
  if not metrics:
    return [
      "No evaluation was found in the workdir for the exported step: run `lsemil evaluate "
      "--workdir W --split test` (and `--split valid`) before `lsemil export` to have the "
      "scores here and in metrics.json."
    ]
  out = []
  for split, ev in metrics.items():
    out += [
      f"### Split `{split}`: {ev.get('num_images', '?')} images of "
      f"{ev.get('num_patients', '?')} patients (step {ev.get('step')})",
      "",
      "AUC with its 95 % bootstrap interval over patients (Sec 4.3); DICE: the paper's "
      "continuous DICE of the saliency map against the class's boxes, beside the best "
      "constant map's (Sec 4.2).",
      "",
      *_per_class(ev, classes),
      "",
    ]
    if lines := _protocols(ev):
      out += ["Weak-localization protocols (`lsemil evaluate`, README: Table 4):", "", *lines, ""]
  return out


def card(
  head: Mapping,
  *,
  metrics: Mapping[str, Mapping],
  data_kind: str,
  calibration_note: str,
  thresholds_note: str,
  onnx: bool,
  thresholds: Mapping | None = None,
) -> str:
  """The model card's Markdown. `head`: config.json of the export (`lsemil.runtime.bundle`);
  `metrics`: {split: evaluation} (metrics.json);
  `data_kind`: 'nih', 'synthetic', 'unknown' or another source's name
  (`lsemil.data.sources`); the notes: one line each on calibration.json and thresholds.json;
  `thresholds`: thresholds.json, tabled when it holds thresholds."""
  m, classes = head["model"], list(head["classes"])
  size, n = int(head["input_size"]), m.get("saliency_size")
  pooling = (
    f"LSE-LBA pooling, r0 = {m.get('r0')}"
    if m.get("pooling") == "lse_lba"
    else (f"{m.get('pooling')} pooling")
  )
  files = [
    "- `model.safetensors`: every variable (params, batch_stats), flattened names "
    "`params/<module>/.../<leaf>`, float32;",
    "- `config.json`: the model config, the class list (output order), the whole run config;",
    "- `preprocessing.json`: the input contract of the Input section, every rule;",
  ]
  if onnx:
    files.append(
      f"- `model.onnx`: input `image` uint8 (B, {size}, {size}, 1), outputs `probs` float32 "
      f"(B, {len(classes)}) and `saliency` float32 (B, {n}, {n}, {len(classes)});"
    )
  files += [
    f"- `calibration.json`: {calibration_note};",
    f"- `thresholds.json`: {thresholds_note};",
    "- `metrics.json`: the last `lsemil evaluate` of each split for this step.",
  ]
  sections = [
    _front_matter(data_kind, bool(metrics), onnx),
    "",
    f"# lsemil: multi-resolution MIL chest X-ray model ({head.get('config', {}).get('name', '')}"
    f", step {head.get('step')})",
    "",
    f"A reimplementation in JAX/Flax of {PAPER} The network reads one grey {size} x {size} "
    f"chest X-ray and returns, for each of {len(classes)} findings, a probability and a "
    f"{n} x {n} saliency map saying where the finding is ({pooling} turns each map into the "
    "probability). It was trained with image-level labels only.",
    "",
    "## Intended use",
    "",
    "**Research, not for clinical use.** For research on weakly supervised classification "
    "and localization of chest X-ray findings: reproducing and comparing methods, studying "
    "saliency maps, teaching. It is not a medical device, has not been validated "
    "clinically or by any regulator, and must not be used to diagnose, triage or treat "
    "anyone.",
    "",
    "## Training data",
    "",
    _training_data(data_kind, classes),
    "",
    "## Input",
    "",
    "8-bit grey images (RGB by ITU-R 601 luma, 16-bit scaled to 8 bits over the full range; "
    "DICOM through its modality and VOI LUT or window, MONOCHROME1 inverted), resized to "
    f"512 x 512 when larger or not square (anti-aliased, as the paper), then to {size} x {size}; "
    "uint8 "
    "NHWC (B, S, S, 1), scaled to [0, 1] inside the model (no mean or std normalisation). "
    "`preprocessing.json` states every rule.",
    "",
    "```python",
    "import lsemil",
    "model = lsemil.load('THIS_FOLDER')",
    "result = model.predict('chest.png')  # .probs, .decisions, .boxes, .saliency_map(class)",
    "```",
    "",
    "or `lsemil predict --checkpoint THIS_FOLDER image.png`"
    + (", or `model.onnx` in any ONNX runtime with the same preprocessing." if onnx else "."),
    "",
    "## Files",
    "",
    *files,
    "",
    "## Evaluation",
    "",
    *_evaluation(metrics, classes),
    *_operating_points(thresholds),
    "",
    "## Limitations",
    "",
    *(["- The labels are text-mined from reports (NIH estimate: > 90 % accurate) and the "
       "test boxes cover 8 of the 14 findings on 880 images; scores inherit that noise."]
      if data_kind in ("nih", "unknown") else []),
    "- One hospital's frontal radiographs: other sites, scanners, lateral views, children or "
    "portable films may shift both probabilities and maps; check on your own data first.",
    "- The probabilities are not calibrated to any population's prevalence unless "
    "calibration.json holds fitted parameters, and no operating threshold is a clinical one.",
    "- A saliency map shows where the model's evidence is, not the extent of a lesion; "
    "its localization scores above are weak (image-level) supervision's.",
    "",
    "## Citation",
    "",
    f"- The method: {PAPER}",
    f"- The data (when NIH ChestX-ray14): {NIH_CITATION}",
    "",
  ]
  return "\n".join(sections)
