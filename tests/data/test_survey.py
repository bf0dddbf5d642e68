"""sppcli init: a dataset's sizes, the settings chosen from them, and the file written."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

from sppcli.cli import main
from sppcli.config import config_to_toml, load_config
from sppcli.data.survey import Survey, suggest, survey
from sppcli.data.voc import VocDataset


def _survey(image, objects):
    return Survey("trainval", np.array([image] * 10), np.array(objects, float), {"car": len(objects)}, 0)


def test_small_objects_in_big_images_get_a_big_segmentation_and_scale():
    traffic = suggest(_survey((1920, 1080), [(20, 40)] * 10 + [(60, 120)] * 40 + [(300, 500)] * 10))
    assert traffic["proposals.max_side"][0] == 1536  # 16 px x 1920 / 20 px: the 10th percentile spans 16 px
    assert traffic["proposals.min_size"][0] == 16
    assert traffic["features.scales"][0] == [1200]  # capped
    assert "10% of objects are under 20 px" in traffic["proposals.max_side"][1]


def test_voc_like_sizes_give_the_papers_settings():
    voc = suggest(_survey((500, 375), [(40, 60)] * 10 + [(100, 150)] * 40 + [(250, 300)] * 10))
    assert voc["proposals.max_side"][0] == 500
    assert voc["features.scales"][0] == [688]  # the paper's ratio caps 224 x 375 / 100 = 840
    assert voc["features.scales_5"][0] == [480, 576, 688, 880, 1200]
    tiny = suggest(_survey((500, 375), [(6, 8)] * 20))
    assert tiny["proposals.min_size"][0] == 4 and tiny["proposals.max_side"][0] == 500  # no upscaling
    with pytest.raises(ValueError, match="no images"):
        suggest(Survey("x", np.zeros((0, 2)), np.zeros((0, 2)), {}, 0))


def test_survey_reads_every_object_name(tiny_devkit):
    found = survey(VocDataset(tiny_devkit, "trainval", ["-"]))
    assert found.images == 8 and len(found.image_sizes) == 8 and tuple(found.image_sizes[0]) == (160, 120)
    assert sum(found.class_counts.values()) == len(found.object_sides) > 0
    assert set(found.class_counts) <= set(VocDataset(tiny_devkit, "trainval").classes)


def test_config_toml_round_trips(tmp_path):
    config = load_config(None, ["features.scales=[480, 688]", 'dataset.classes=["a", "b"]', "svm.C=0.5",
                                "finetune.flip=true"])
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(config, {"svm.C": "why\non two lines"}, "head"))
    again = load_config(path)
    assert dataclasses.replace(again, source=config.source) == config

def test_init_writes_a_pipeline_the_stages_run_with(tiny_devkit, tmp_path):
    out = tmp_path / "mine.toml"
    runner = CliRunner()
    r = runner.invoke(main, ["init", str(tiny_devkit), "--out", str(out)])
    assert r.exit_code == 0, r.output
    config = load_config(out)
    expected = suggest(survey(VocDataset(tiny_devkit, "trainval", ["-"])))
    assert config.proposals.max_side == expected["proposals.max_side"][0]
    assert list(config.features.scales) == expected["features.scales"][0]
    assert config.dataset.devkit == str(tiny_devkit.resolve()) and config.dataset.classes
    assert "# images are" in out.read_text()
    r = runner.invoke(main, ["init", str(tiny_devkit), "--out", str(out)])
    assert r.exit_code != 0 and "--force" in r.output
    r = runner.invoke(main, ["status", "--config", str(out), "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 0 and "missing" in r.output
