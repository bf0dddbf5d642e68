import pytest

from sppcli.config import ConfigError, load_config, parse_override


def test_pipeline_files_load_and_hold_the_paper_settings():
    c = load_config("pipelines/voc2007.toml")
    assert c.pool.levels == (1, 2, 3, 6)
    assert c.svm.C == 0.001 and c.svm.pos_loss_weight == 2 and c.svm.bias_value == 10
    assert c.svm.hard_threshold == -1.0001 and c.svm.evict_threshold == -1.2
    assert c.detect.nms_iou == 0.3 and c.detect.max_per_image == 100
    assert c.finetune.fg_fraction == 0.25 and c.bbox_reg.lam == 4000
    assert c.proposals.mode == "fast" and c.features.scales == (688,)
    demo = load_config("pipelines/demo.toml")
    assert demo.dataset.devkit.startswith("cache/")


def test_set_overrides_and_types():
    c = load_config("pipelines/voc2007.toml", ["svm.C=0.5", "features.scales=[480, 688]", "svm.finetuned=false",
                                               "features.scales=480,576", "dataset.devkit=/data/VOC2007"])
    assert c.svm.C == 0.5 and c.svm.finetuned is False
    assert c.features.scales == (480, 576)
    assert c.dataset.devkit == "/data/VOC2007"


@pytest.mark.parametrize("override, message", [
    ("svm.Cee=1", "known keys of [svm]: layer, finetuned, C"),
    ("nosuch.key=1", "known sections: dataset"),
    ("svm.C=abc", "expected a number"),
    ("svm.retrain_limit=1.5", "expected an integer"),
    ("svm.finetuned=maybe", "expected true/false"),
    ("svmC", "expected section.key=value"),
])
def test_bad_overrides_say_what_is_known(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_bad_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[svm]\nC = 'x'\n")
    with pytest.raises(ConfigError, match="svm.C: expected a number"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_parse_override_values():
    assert parse_override("a.b=1") == ("a", "b", 1)
    assert parse_override("a.b=hello") == ("a", "b", "hello")
    assert parse_override('a.b="x=y"') == ("a", "b", "x=y")
