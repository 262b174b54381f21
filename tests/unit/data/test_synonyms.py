"""The synonym table of cross-dataset evaluation: `synonyms.resolve`, table-driven."""

import pytest

from lsemil.data import chestx_det10, chexlocalize_truth, chexpert, nih, rsna, siim, synonyms, vindr

CX = chexpert.LABELS

CASES = [
  # (model classes, model source, data classes, data source, pairs, model_only, data_only)
  (nih.CLASSES, "nih", CX, "chexpert",
   [("Atelectasis", "Atelectasis"), ("Cardiomegaly", "Cardiomegaly"),
    ("Effusion", "Pleural Effusion"), ("Pneumonia", "Pneumonia"),
    ("Pneumothorax", "Pneumothorax"), ("Consolidation", "Consolidation"), ("Edema", "Edema")],
   ["Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"],
   ["No Finding", "Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Pleural Other",
    "Fracture", "Support Devices"]),
  (nih.CLASSES, "nih", rsna.CLASSES, "rsna-pneumonia",
   [("Pneumonia", "Lung Opacity")], [c for c in nih.CLASSES if c != "Pneumonia"], []),
  (CX, "chexpert", rsna.CLASSES, "rsna-pneumonia",
   [("Lung Opacity", "Lung Opacity"), ("Pneumonia", "Lung Opacity")],
   [c for c in CX if c not in ("Lung Opacity", "Pneumonia")], []),
  (CX, "mimic-cxr-jpg", siim.CLASSES, "siim-acr",
   [("Pneumothorax", "Pneumothorax")], [c for c in CX if c != "Pneumothorax"], []),
  (nih.CLASSES[:4], "nih", ("Pleural effusion", "Nodule/Mass", "Infiltration"), "vindr-cxr",
   [("Effusion", "Pleural effusion"), ("Infiltration", "Infiltration")],
   ["Atelectasis", "Cardiomegaly"], ["Nodule/Mass"]),
  (("Nodule", "Mass", "Fibrosis"), "nih", vindr.COMPETITION_CLASSES, "vindr-cxr",
   [("Fibrosis", "Pulmonary fibrosis")], ["Nodule", "Mass"],
   [c for c in vindr.COMPETITION_CLASSES if c != "Pulmonary fibrosis"]),
  # a csv source matches by any source's name, without case or underscores
  (("effusion", "PNEUMO_THORAX", "Fracture"), "csv", nih.CLASSES[:3], "nih",
   [("effusion", "Effusion")], ["PNEUMO_THORAX", "Fracture"], ["Atelectasis", "Cardiomegaly"]),
  # one labeller: CheXpert and MIMIC-CXR pair all 14
  (CX, "chexpert", CX, "mimic-cxr-jpg", [(c, c) for c in CX], [], []),
  # CheXlocalize calls CheXpert's Lung Opacity Airspace Opacity
  (("Lung Opacity", "Pneumonia"), "chexpert", chexlocalize_truth.CLASSES, "chexlocalize",
   [("Lung Opacity", "Airspace Opacity")], ["Pneumonia"],
   [c for c in chexlocalize_truth.CLASSES if c != "Airspace Opacity"]),
  # ChestX-Det10: NIH's names, Mass and Nodule included
  (nih.CLASSES, "nih", chestx_det10.CLASSES, "chestx-det10",
   [("Atelectasis", "Atelectasis"), ("Effusion", "Effusion"), ("Mass", "Mass"),
    ("Nodule", "Nodule"), ("Pneumothorax", "Pneumothorax"),
    ("Consolidation", "Consolidation"), ("Emphysema", "Emphysema"), ("Fibrosis", "Fibrosis")],
   ["Cardiomegaly", "Infiltration", "Pneumonia", "Edema", "Pleural_Thickening", "Hernia"],
   ["Calcification", "Fracture"]),
  # a csv 'Lung Opacity' is RSNA's Lung Opacity, not (by RSNA's definition) Pneumonia
  (("Lung Opacity", "Pneumonia"), "csv", rsna.CLASSES, "rsna-pneumonia",
   [("Lung Opacity", "Lung Opacity"), ("Pneumonia", "Lung Opacity")], [], []),
  # the same source pairs equal names only
  (("a", "b", "c"), "csv", ("c", "a", "d"), "csv", [("a", "a"), ("c", "c")], ["b"], ["d"]),
]  # fmt: skip


@pytest.mark.parametrize(("model", "msrc", "data", "dsrc", "pairs", "model_only", "data_only"),
                         CASES)
def test_resolve(model, msrc, data, dsrc, pairs, model_only, data_only):
  got = synonyms.resolve(model, msrc, data, dsrc)
  assert [(p.model, p.data) for p in got.pairs] == pairs
  assert list(got.model_only) == model_only
  assert list(got.data_only) == data_only


def test_pairs_name_their_row():
  got = synonyms.resolve(nih.CLASSES, "nih", CX, "chexpert")
  assert {p.model: p.finding for p in got.pairs}["Effusion"] == "Pleural effusion"
  same = synonyms.resolve(("a",), "csv", ("a",), "csv")
  assert same.to_dict() == {"pairs": [{"model": "a", "data": "a", "finding": "same name"}],
                            "model_only": [], "data_only": []}


def test_every_name_in_the_table_is_a_class_of_its_source():
  classes = {"nih": nih.CLASSES, "chexpert": CX, "mimic-cxr-jpg": CX,
             "vindr-cxr": vindr.COMPETITION_CLASSES, "rsna-pneumonia": rsna.CLASSES,
             "siim-acr": siim.CLASSES, "chestx-det10": chestx_det10.CLASSES,
             "chexlocalize": chexlocalize_truth.CLASSES}  # fmt: skip
  for finding, row in synonyms.FINDINGS.items():
    for source, name in row.items():
      assert name in classes[source], (finding, source, name)


def test_the_csv_fallback_never_matches_through_a_defined_name():
  got = synonyms.resolve(("Lung Opacity",), "csv", ("Pneumonia",), "nih")
  assert got.pairs == () and got.model_only == ("Lung Opacity",)
