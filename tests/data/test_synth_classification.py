"""Folder-per-class synthetic sets (make-dataset --kind classification / caltech): determinism,
layout, class sets, the stage's reuse rules, and a pretrain run on one."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sppcli.artifacts import ArtifactStore
from sppcli.data import synth, synth_classification as sc
from sppcli.data.crops import folder_samples
from sppcli.pipeline import Planner, RunOptions, run_stage
from sppcli.stages import pretrain
from sppcli.stages.dataset import MARKER, classification_folder, make_classification_dataset
from tests.conftest import tiny_config

PER_CLASS, SIZE = 2, 32


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def caltech(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("caltech")
    return out, sc.make_classification_set(out, kind="caltech", seed=1, per_class=PER_CLASS, size=SIZE)


def test_same_seed_same_bytes_other_seed_differs(caltech, tmp_path):
    out, _ = caltech
    sc.make_classification_set(tmp_path / "again", kind="caltech", seed=1, per_class=PER_CLASS, size=SIZE)
    assert _digests(tmp_path / "again") == _digests(out)
    other = sc.render_crop(2, "caltech", "heptagon", 0, SIZE)
    assert not np.array_equal(other, sc.render_crop(1, "caltech", "heptagon", 0, SIZE))


def test_a_crop_depends_only_on_its_own_identity():
    first = sc.render_crop(0, "classification", "heart", 3, SIZE)
    sc.render_crop(0, "classification", "gear", 3, SIZE)
    np.testing.assert_array_equal(first, sc.render_crop(0, "classification", "heart", 3, SIZE))
    # the same class name in another kind is another crop
    assert not np.array_equal(sc.render_crop(0, "caltech", "heptagon", 0, SIZE),
                              sc.render_crop(0, "classification", "heptagon", 0, SIZE))


def test_layout_sizes_and_counts(caltech):
    out, summary = caltech
    assert summary["classes"] == list(sc.CALTECH_CLASSES)
    assert summary["images"] == len(sc.CALTECH_CLASSES) * PER_CLASS
    assert sorted(p.name for p in out.iterdir()) == sorted(sc.CALTECH_CLASSES)
    for name in sc.CALTECH_CLASSES:
        files = sorted((out / name).iterdir())
        assert [f.name for f in files] == [f"{i + 1:05d}.jpg" for i in range(PER_CLASS)]
        for f in files:
            with Image.open(f) as image:
                assert image.size == (SIZE, SIZE) and image.mode == "RGB"
    samples, classes = folder_samples(out)
    assert classes == tuple(sorted(sc.CALTECH_CLASSES)) and len(samples) == summary["images"]


def test_class_sets_superset_and_disjoint():
    pretraining, table4 = set(sc.KINDS["classification"]), set(sc.KINDS["caltech"])
    assert set(synth.CLASS_NAMES) <= pretraining
    assert len(pretraining) >= len(synth.CLASS_NAMES) + 24
    assert not table4 & pretraining
    assert len(table4) == len(sc.KINDS["caltech"]) and len(pretraining) == len(sc.KINDS["classification"])


@pytest.mark.parametrize("kind", sorted(sc.KINDS))
def test_every_class_draws_a_sizeable_object(kind):
    for name in sc.KINDS[kind]:
        for index in range(3):
            coverage = sc.shape_mask(name, sc.crop_rng(0, kind, name, index)) / 255.0
            share = coverage.mean()
            assert share > 0.05, (name, share)
            # the object fills its canonical frame rather than a corner of it
            rows, cols = np.nonzero(coverage > 0.5)
            assert rows.max() - rows.min() > 0.6 * coverage.shape[0] or cols.max() - cols.min() > 0.6 * coverage.shape[1], name


def test_detection_classes_use_the_detection_painters():
    """A disc is the detection set's polygon: its coverage matches a filled circle of radius 1."""
    mask = sc.shape_mask("disc", sc.crop_rng(0, "classification", "disc", 0)) > 0
    centre = (np.arange(mask.shape[0]) + 0.5) / (mask.shape[0] / 2) - 1
    circle = centre[None, :] ** 2 + centre[:, None] ** 2 < 1
    assert np.mean(mask != circle) < 0.01


def test_bad_arguments_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="unknown classification set 'imagenet'"):
        sc.make_classification_set(tmp_path / "x", kind="imagenet")
    with pytest.raises(ValueError, match="at least one image per class"):
        sc.make_classification_set(tmp_path / "x", per_class=0)
    assert not (tmp_path / "x").exists()


def test_stage_reuses_regenerates_identically_and_refuses_foreign_folders(tiny_devkit, tmp_path):
    config = tiny_config(tiny_devkit)
    assert classification_folder(config, "caltech") == tiny_devkit.parent / "caltech"
    out = tmp_path / "set"
    info = make_classification_dataset(config, "caltech", out=out, per_class=1, size=SIZE)
    assert not info["up_to_date"] and info["summary"]["images"] == len(sc.CALTECH_CLASSES)
    first = _digests(out)
    assert make_classification_dataset(config, "caltech", out=out, per_class=1, size=SIZE)["up_to_date"]
    # the pretrain key digests every file, the marker included: --force must give the same bytes
    make_classification_dataset(config, "caltech", out=out, per_class=1, size=SIZE, force=True)
    assert _digests(out) == first
    assert json.loads((out / MARKER).read_text())["params"] == {"seed": 0, "per_class": 1, "size": SIZE}

    foreign = tmp_path / "photos"
    (foreign / "cats").mkdir(parents=True)
    (foreign / "cats" / "1.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="not written by `sppcli make-dataset`"):
        make_classification_dataset(config, "caltech", out=foreign, per_class=1, size=SIZE)
    assert (foreign / "cats" / "1.jpg").read_bytes() == b"mine"


def test_tiny_pretrain_on_a_generated_set(tiny_devkit, tmp_path):
    folder = tmp_path / "imagenet"
    config = tiny_config(tiny_devkit, None, "pretrain.source='folder'", f"pretrain.folder={str(folder)!r}",
                         "pretrain.epochs=1", "pretrain.sizes=[32]", "pretrain.batch_size=16",
                         "pretrain.holdout_fraction=0.25")
    make_classification_dataset(config, "classification", per_class=2, size=SIZE)
    planner = Planner(ArtifactStore(tmp_path / "cache"), config)
    manifest, _ = run_stage(planner, pretrain, planner.plan("pretrain"), RunOptions(device="cpu", workers=1),
                            log=lambda msg: None)
    m = manifest.metrics
    assert m["classes"] == sorted(sc.KINDS["classification"])
    assert m["n_train"] + m["n_heldout"] == 2 * len(sc.KINDS["classification"])
    assert m["arch"]["num_classes"] == len(sc.KINDS["classification"])
    key = planner.plan("pretrain").key
    # the key follows the folder's content
    (folder / "disc" / "00001.jpg").write_bytes(Image.new("RGB", (SIZE, SIZE)).tobytes()[:10] + b"x")
    assert Planner(ArtifactStore(tmp_path / "cache"), config).plan("pretrain").key != key


def test_cli_writes_a_set_and_rejects_detection_options(tiny_devkit, tmp_path):
    from click.testing import CliRunner

    from sppcli.cli import main

    out = tmp_path / "caltech"
    args = ["make-dataset", "--kind", "caltech", "--out", str(out), "--per-class", "1", "--size", "24",
            "--cache-dir", str(tmp_path / "cache"), "--set", f"dataset.devkit={str(tiny_devkit)!r}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"{len(sc.CALTECH_CLASSES)} classes x 1, 24 px" in result.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(sc.CALTECH_CLASSES)
    result = CliRunner().invoke(main, args + ["--trainval", "4"])
    assert result.exit_code != 0 and "--trainval and --test are for --kind detection, not caltech" in result.output
