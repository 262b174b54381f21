"""Which findings of one chest X-ray source are the same finding in another: the synonym table
of cross-dataset evaluation (`lsemil evaluate --source S` on a model trained on another source).

`FINDINGS` is the table: one row per shared finding, the name each source gives it (the exact
class names of `lsemil.data.sources`' readers). A model class and a data class are scored
against each other when one row names both. The rows follow the sources' own definitions:

- NIH ChestX-ray14 (Wang et al., CVPR 2017, Table 1) and the CheXpert labeller (Irvin et al.,
  AAAI 2019, Table 1; MIMIC-CXR-JPG uses the same labeller and its 14 names, Johnson et al.
  2019, so those two share every row): Atelectasis, Cardiomegaly, Consolidation, Edema,
  Pneumonia, Pneumothorax by the same name; NIH `Effusion` is CheXpert's `Pleural Effusion`
  (TorchXRayVision renames CheXpert's column to `Effusion` for the same reason,
  mlmed/torchxrayvision `datasets.py`).
- CheXlocalize (Saporta et al., Nature Machine Intelligence 2022): CheXpert's observations by
  CheXpert's names, but `Airspace Opacity` for CheXpert's `Lung Opacity` (its
  eval_constants.py lists CHEXPERT_TASKS with that one name changed).
- VinDr-CXR (Nguyen et al., Scientific Data 2022, Table 1): its `Pleural effusion`,
  `Pleural thickening` and `Pulmonary fibrosis` are NIH's Effusion, Pleural_Thickening and
  Fibrosis; Atelectasis, Cardiomegaly, Consolidation, Infiltration, Lung Opacity,
  Calcification and Pneumothorax by name.
- ChestX-Det10 (Liu et al. 2020): NIH images re-annotated under NIH's names (Atelectasis,
  Consolidation, Effusion, Emphysema, Fibrosis, Mass, Nodule, Pneumothorax), plus
  Calcification (VinDr's) and Fracture (CheXpert's).
- RSNA Pneumonia Detection (Shih et al., Radiology: AI 2019): its one class, `Lung Opacity`
  (Target 1), marks "lung opacities suspicious for pneumonia" on NIH images, so it is scored
  as Pneumonia and as Lung Opacity (TorchXRayVision's RSNA dataset sets both from Target).
- SIIM-ACR Pneumothorax Segmentation: its positive is Pneumothorax.

Left out on purpose, because the names do not truly correspond: NIH `Nodule` and `Mass`
against VinDr `Nodule/Mass` or CheXpert `Lung Lesion` (each a union of several findings: its
positives are not the class's), NIH `Infiltration` against CheXpert `Lung Opacity` (a broader
finding), and `No Finding` outside the CheXpert labeller (each source's 'normal' rests on its
own list of findings).

`resolve` pairs a model's classes with a data source's classes through the table; a source not
in the table (the generic `csv` source) matches a row by any of its names, compared without
case, spaces or underscores (not by a name that stands for a finding by a source's definition,
`DEFINED`: a csv column 'Lung Opacity' is not Pneumonia).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping, Sequence

_CX = ("chexpert", "mimic-cxr-jpg")  # one labeller, one set of names
_CXL = (*_CX, "chexlocalize")  # and CheXlocalize's masks of the same observations


def _same(name: str, *sources: str) -> dict[str, str]:
  return dict.fromkeys(sources, name)


# finding -> {source: that source's class name}
FINDINGS: Mapping[str, Mapping[str, str]] = types.MappingProxyType({
  "Atelectasis": _same("Atelectasis", "nih", *_CXL, "vindr-cxr", "chestx-det10"),
  "Cardiomegaly": _same("Cardiomegaly", "nih", *_CXL, "vindr-cxr"),
  "Consolidation": _same("Consolidation", "nih", *_CXL, "vindr-cxr", "chestx-det10"),
  "Edema": _same("Edema", "nih", *_CXL),
  "Pleural effusion": {**_same("Effusion", "nih", "chestx-det10"),
                       **_same("Pleural Effusion", *_CXL), "vindr-cxr": "Pleural effusion"},
  "Pneumonia": {**_same("Pneumonia", "nih", *_CX), "rsna-pneumonia": "Lung Opacity"},
  "Pneumothorax": _same("Pneumothorax", "nih", *_CXL, "vindr-cxr", "siim-acr", "chestx-det10"),
  "Lung opacity": {**_same("Lung Opacity", *_CX, "vindr-cxr", "rsna-pneumonia"),
                   "chexlocalize": "Airspace Opacity"},
  "Infiltration": _same("Infiltration", "nih", "vindr-cxr"),
  "Pleural thickening": {"nih": "Pleural_Thickening", "vindr-cxr": "Pleural thickening"},
  "Fibrosis": {**_same("Fibrosis", "nih", "chestx-det10"), "vindr-cxr": "Pulmonary fibrosis"},
  "Emphysema": _same("Emphysema", "nih", "chestx-det10"),
  "Mass": _same("Mass", "nih", "chestx-det10"),
  "Nodule": _same("Nodule", "nih", "chestx-det10"),
  "Calcification": _same("Calcification", "vindr-cxr", "chestx-det10"),
  "Fracture": _same("Fracture", *_CX, "chestx-det10"),
  "Enlarged cardiomediastinum": _same("Enlarged Cardiomediastinum", *_CXL),
  "Lung lesion": _same("Lung Lesion", *_CXL),
  "Support devices": _same("Support Devices", *_CXL),
  "Pleural other": _same("Pleural Other", *_CX),
  "No finding": _same("No Finding", *_CX),
})
# A source's class that stands for a finding by the source's definition, not by its name:
# a source outside the table never matches through it.
DEFINED: frozenset[tuple[str, str]] = frozenset({("rsna-pneumonia", "Pneumonia")})


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


def _names(finding: str, source: str) -> set[str]:
  """The names a source gives a finding: its own, or any source's for a source not in the
  table (compared by `_key`; not the names in `DEFINED`)."""
  row = FINDINGS[finding]
  if any(source in r for r in FINDINGS.values()):
    return {row[source]} if source in row else set()
  return {_key(n) for s, n in row.items() if (s, finding) not in DEFINED}


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
        found = [f for f in FINDINGS
                 if _matches(m, _names(f, model_source), model_source)
                 and _matches(d, _names(f, data_source), data_source)]  # fmt: skip
      pairs.extend(Pair(m, d, f) for f in found[:1])
  used_m, used_d = {p.model for p in pairs}, {p.data for p in pairs}
  return Resolution(
    pairs=tuple(pairs),
    model_only=tuple(c for c in model_classes if c not in used_m),
    data_only=tuple(c for c in data_classes if c not in used_d),
  )
