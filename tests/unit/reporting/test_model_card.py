"""The model card of `lsemil export` (lsemil.reporting.model_card): Hugging Face front matter,
the data licence, and no scores where there are none (the export tests check the scores)."""

from __future__ import annotations

import yaml

from lsemil.core import configuration
from lsemil.data.nih import CLASSES
from lsemil.reporting import model_card


def _head() -> dict:
  config = configuration.load_config("paper")
  return {
    "classes": list(CLASSES), "input_size": 512, "model": config.model.to_dict(),
    "config": {"name": "paper"}, "step": 1200,
  }  # fmt: skip


def _card(**kw) -> tuple[dict, str]:
  args = {"metrics": {}, "data_kind": "nih", "calibration_note": "c", "thresholds_note": "t"}
  text = model_card.card(_head(), **(args | {"onnx": True} | kw))
  assert text.startswith("---\n")
  return yaml.safe_load(text.split("---\n")[1]), text


def test_nih_card_names_the_data_and_its_licence():
  front, text = _card()
  assert front["license"] == "apache-2.0" and front["datasets"] == ["nih-chest-x-ray-14"]
  assert front["pipeline_tag"] == "image-classification" and "onnx" in front["tags"]
  assert "metrics" not in front  # no evaluation, no metrics claimed
  assert "No evaluation was found" in text and "| Atelectasis |" not in text
  assert "NIH Clinical Center without restrictions" in text.replace("\n", " ")
  assert model_card.NIH_SITE in text and "ChestX-ray8" in text
  assert "**Research, not for clinical use.**" in text and "## Limitations" in text
  assert "paper, step 1200" in text and "(B, 512, 512, 1)" in text and "(B, 64, 64, 14)" in text


def test_without_onnx_or_known_data():
  front, text = _card(onnx=False, data_kind="unknown")
  assert "onnx" not in front["tags"] and "model.onnx" not in text and "datasets" not in front
  assert "provenance was not recorded" in text
