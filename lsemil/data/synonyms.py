"""Which findings of one chest X-ray source are the same finding in another: the synonym table
of cross-dataset evaluation (`lsemil evaluate --source S` on a model trained on another source).

`FINDINGS` is the table: one row per shared finding, the name each source gives it (the exact
class names of `lsemil.data.sources`' readers). A model class and a data class are scored
against each other when one row names both. The rows follow the sources' own definitions:

- NIH ChestX-ray14 (Wang et al., CVPR 2017, Table 1) and the CheXpert labeller (Irvin et al.,
  AAAI 2019, Table 1; MIMIC-CXR-JPG uses the same labeller and names, Johnson et al. 2019):
  Atelectasis, Cardiomegaly, Consolidation, Edema, Pneumonia, Pneumothorax by the same name;
  NIH `Effusion` is CheXpert's `Pleural Effusion` (TorchXRayVision renames CheXpert's column to
  `Effusion` for the same reason, mlmed/torchxrayvision `datasets.py`).
- VinDr-CXR (Nguyen et al., Scientific Data 2022, Table 1): its `Pleural effusion`,
  `Pleural thickening` and `Pulmonary fibrosis` are NIH's Effusion, Pleural_Thickening and
  Fibrosis; Atelectasis, Cardiomegaly, Consolidation, Infiltration, Lung Opacity and
  Pneumothorax by name.
- RSNA Pneumonia Detection (Shih et al., Radiology: AI 2019): its one class, `Lung Opacity`
  (Target 1), marks "lung opacities suspicious for pneumonia" on NIH images, so it is scored
  as Pneumonia and as Lung Opacity (TorchXRayVision's RSNA dataset sets both from Target).
- SIIM-ACR Pneumothorax Segmentation: its positive is Pneumothorax.

Left out on purpose, because the names do not truly correspond: NIH `Nodule` and `Mass`
against VinDr `Nodule/Mass` or CheXpert `Lung Lesion` (each a union of several findings: its
positives are not the class's), NIH `Infiltration` against CheXpert `Lung Opacity` (a broader
finding), and `No Finding`.

`resolve` pairs a model's classes with a data source's classes through the table; a source not
in the table (the generic `csv` source) matches a row by any of its names, compared without
case, spaces or underscores.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence

_CX = ("chexpert", "mimic-cxr-jpg")  # one labeller, one set of names

# finding -> {source: that source's class name}
FINDINGS: Mapping[str, Mapping[str, str]] = types.MappingProxyType({
  "Atelectasis": {"nih": "Atelectasis", **dict.fromkeys(_CX, "Atelectasis"),
                  "vindr-cxr": "Atelectasis"},
  "Cardiomegaly": {"nih": "Cardiomegaly", **dict.fromkeys(_CX, "Cardiomegaly"),
                   "vindr-cxr": "Cardiomegaly"},
  "Consolidation": {"nih": "Consolidation", **dict.fromkeys(_CX, "Consolidation"),
                    "vindr-cxr": "Consolidation"},
  "Edema": {"nih": "Edema", **dict.fromkeys(_CX, "Edema")},
  "Pleural effusion": {"nih": "Effusion", **dict.fromkeys(_CX, "Pleural Effusion"),
                       "vindr-cxr": "Pleural effusion"},
  "Pneumonia": {"nih": "Pneumonia", **dict.fromkeys(_CX, "Pneumonia"),
                "rsna-pneumonia": "Lung Opacity"},
  "Pneumothorax": {"nih": "Pneumothorax", **dict.fromkeys(_CX, "Pneumothorax"),
                   "vindr-cxr": "Pneumothorax", "siim-acr": "Pneumothorax"},
  "Lung opacity": {**dict.fromkeys(_CX, "Lung Opacity"), "vindr-cxr": "Lung Opacity",
                   "rsna-pneumonia": "Lung Opacity"},
  "Infiltration": {"nih": "Infiltration", "vindr-cxr": "Infiltration"},
  "Pleural thickening": {"nih": "Pleural_Thickening", "vindr-cxr": "Pleural thickening"},
  "Fibrosis": {"nih": "Fibrosis", "vindr-cxr": "Pulmonary fibrosis"},
})  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Pair:
  """A model class scored against a data class, and the table row (or 'same name') joining
  them."""

  model: str
  data: str
  finding: str


@dataclasses.dataclass(frozen=True)
class Resolution:
  """`resolve`'s answer: the pairs in model-class order, and the names left out each side."""

  pairs: tuple[Pair, ...]
  model_only: tuple[str, ...]  # model classes without a data class
  data_only: tuple[str, ...]  # data classes without a model class

  def to_dict(self) -> dict:
    return {
      "pairs": [dataclasses.asdict(p) for p in self.pairs],
      "model_only": list(self.model_only),
      "data_only": list(self.data_only),
    }


def _key(name: str) -> str:
  return "".join(name.lower().replace("_", " ").split())


def _names(finding: Mapping[str, str], source: str) -> set[str]:
  """The names a source gives a finding: its own, or any source's for a source not in the
  table (compared by `_key`)."""
  if any(source in row for row in FINDINGS.values()):
    return {finding[source]} if source in finding else set()
  return {_key(n) for n in finding.values()}


def _matches(name: str, names: set[str], source: str) -> bool:
  known = any(source in row for row in FINDINGS.values())
  return (name if known else _key(name)) in names


def resolve(
  model_classes: Sequence[str], model_source: str, data_classes: Sequence[str], data_source: str
) -> Resolution:
  """Pairs each class of a model trained on `model_source` with the classes of `data_source`
  that the table calls the same finding (one data class may serve several model classes:
  RSNA's Lung Opacity is Pneumonia and Lung Opacity). The same source pairs equal names."""
  pairs: list[Pair] = []
  for m in model_classes:
    for d in data_classes:
      if model_source == data_source:
        found = ["same name"] if m == d else []
      else:
        found = [f for f, row in FINDINGS.items()
                 if _matches(m, _names(row, model_source), model_source)
                 and _matches(d, _names(row, data_source), data_source)]  # fmt: skip
      pairs.extend(Pair(m, d, f) for f in found[:1])
  used_m, used_d = {p.model for p in pairs}, {p.data for p in pairs}
  return Resolution(
    pairs=tuple(pairs),
    model_only=tuple(c for c in model_classes if c not in used_m),
    data_only=tuple(c for c in data_classes if c not in used_d),
  )
