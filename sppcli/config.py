"""Stage parameters: defaults in frozen dataclasses, a pipeline TOML over them, ``--set`` over that.

One plain layer, no global state: :func:`load_config` returns a :class:`Config` value that the CLI
passes down. The defaults here are the paper's settings (DESIGN section 4);
``pipelines/voc2007.toml`` restates them explicitly, ``pipelines/demo.toml`` shrinks them for a
2-core CPU. Every resolved section is written into the manifest of the stage that used it.

This module must stay light (no torch): ``sppcli --help`` imports it.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    pass


#: Storage dtypes of conv5 maps and pooled features (``features.dtype``, ``pool.dtype``), by the
#: name numpy and torch both give them.
STORAGE_DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class DatasetParams:
    """Which dataset the pipeline runs on: a VOC-format devkit, or COCO instances JSON files.

    A ``devkit`` that ends in ``.json`` is the train split's COCO file; see
    :func:`sppcli.pipeline.open_dataset` for how the splits map to files. None of these keys
    enters a stage key: the dataset's name and its files' digests do.
    """

    devkit: str = "cache/data/synth/VOC2007"
    train_split: str = "trainval"
    test_split: str = "test"
    classes: tuple[str, ...] = ()  # empty: classes.txt / the COCO categories, else the 20 VOC classes
    # COCO only. images: the folder a relative file_name is joined to ("" = the JSON's folder);
    # test_devkit / test_images: the test split's JSON and folder ("" = devkit / images).
    images: str = ""
    test_devkit: str = ""
    test_images: str = ""
    # VOC only: an id of the split without Annotations/<id>.xml is an "error", has no objects
    # ("empty", size read from the image), or is dropped from the split ("skip").
    missing_annotations: str = "error"


@dataclasses.dataclass(frozen=True)
class SynthParams:
    """The embedded default dataset (``sppcli make-dataset``)."""

    seed: int = 0
    trainval: int = 200
    test: int = 100
    width: int = 320
    height: int = 240


@dataclasses.dataclass(frozen=True)
class ProposalParams:
    """Selective search (OpenCV ximgproc), paper section 4.1: "fast" mode, ~2,000 windows."""

    mode: str = "fast"  # fast | quality | single
    max_boxes: int = 2000
    min_size: int = 16  # windows with a side shorter than this (original pixels) are dropped
    max_side: int = 500  # images are shrunk to this longer side for the segmentation only
    # Boxes the user already has (.npz / .h5 / R-CNN .mat); empty = compute with selective search.
    # The file's digest enters the key through Planner.plan("proposals").
    imported: str = ""
    # auto (.mat: 1-based inclusive yxyx; .npz/.h5: internal 0-based xyxy) | xyxy0 | xyxy1 | yxyx0 | yxyx1
    imported_convention: str = "auto"
    # imported boxes kept per image, 0 = all (both releases use every selective-search box; many
    # VOC images have more than 2,000). max_boxes applies to computed proposals only.
    imported_max_boxes: int = 0


@dataclasses.dataclass(frozen=True)
class NetParams:
    """The SPP-net: conv trunk, pyramid and fc head."""

    trunk: str = "zf5"  # zf5 | alexnet | vgg16
    width: float = 1.0  # channel multiplier of the trunk (small CPU nets in the demo)
    hidden: int = 4096  # fc6 / fc7 width
    levels: tuple[int, ...] = (6, 3, 2, 1)  # classification pyramid (SPP-net6)
    dropout: float = 0.5


@dataclasses.dataclass(frozen=True)
class PretrainParams:
    """SPP-net classifier training on object crops or an image folder (paper section 3)."""

    source: str = "crops"  # crops (VOC-format dataset's objects) | folder (one sub-folder per class)
    folder: str = ""  # for source = folder
    sizes: tuple[int, ...] = (224, 180)  # multi-size training; (224,) = single-size
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_patience: int = 3  # epochs without held-out improvement before lr /= 10
    min_lr: float = 1e-5
    crop_context: float = 0.3  # object crops include this fraction of context around the box
    holdout_fraction: float = 0.2
    jitter: float = 0.2  # colour jitter strength
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FeatureParams:
    """conv5 feature maps of whole images (paper section 4.1)."""

    weights: str = ""  # a checkpoint or torchvision-format file; empty: the pretrain artifact
    scales: tuple[int, ...] = (688,)  # min(w, h) = s; paper 5-scale: 480,576,688,864,1200
    max_side: int = 2000  # cap on the longer side after resizing
    dtype: str = "float16"  # storage dtype of the maps
    storage: str = "sparse"  # sparse (ReLU zeros as a bit mask) | dense; both lossless
    memory_format: str = "channels_last"  # of the convolutions: ~1.8x faster than contiguous on CPU
    autocast: str = "none"  # none | bf16 | fp16 (compute precision on the device)


@dataclasses.dataclass(frozen=True)
class PoolParams:
    """Spatial pyramid pooling of every window on its best scale's conv5 map."""

    levels: tuple[int, ...] = (1, 2, 3, 6)  # 50 bins -> 12,800-d for 256 channels
    dtype: str = "float16"
    # each window is pooled at the scale where its side is nearest this (the paper: "closest to
    # 224 x 224"; the release's spm_expected_scale.m uses 208 = 13 cells x stride 16)
    target_size: int = 224
    # false: items hold the window table only and every consumer pools its rows from the conv5
    # maps on the fly (bit-identical); true: items also hold every window's pooled vector
    # (~51 MB per VOC image at 12,800-d float16).
    store_features: bool = False


@dataclasses.dataclass(frozen=True)
class FinetuneParams:
    """fc6, fc7 and a new (K+1)-way fc8 fine-tuned on pooled features (paper section 4.1)."""

    iterations: int = 300000
    lr_step: int = 250000  # lr / 10 after this many mini-batches (250k + 50k in the paper)
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    fg_fraction: float = 0.25
    fg_iou: float = 0.5  # positives: IoU in [0.5, 1]
    bg_iou_low: float = 0.1  # negatives: IoU in [0.1, 0.5)
    fc8_std: float = 0.01
    checkpoint_every: int = 5000
    seed: int = 0
    # The release's augmentations (spp_finetune_voc.m, Script_spp_voc.m): each sampled window is
    # pooled at a scale drawn uniformly from all of them instead of its chosen one, and the
    # horizontally flipped training images (their own conv5 maps) join the originals.
    random_scale: bool = False
    flip: bool = False


@dataclasses.dataclass(frozen=True)
class SvmParams:
    """Per-class linear SVMs with the R-CNN / SPP release's hard-negative mining."""

    layer: str = "fc7"  # pool5 | fc6 | fc7
    finetuned: bool = True
    C: float = 0.001
    pos_loss_weight: float = 2.0
    bias_value: float = 10.0
    hard_threshold: float = -1.0001
    evict_threshold: float = -1.2
    retrain_limit: int = 2000
    target_norm: float = 20.0
    neg_iou: float = 0.3
    neg_dedup: str = "iou"  # iou: the paper's 0.7-IoU rule | cells: the release's identical-cells rule
    neg_dedup_iou: float = 0.7
    # dtype of the hard-negative caches: float16 halves their memory (20 classes x ~10k x 4,096-d
    # fc7 on VOC) at the cost of rounding the cached negatives the retrains see
    cache_dtype: str = "float32"
    # at most this many cached negatives per class after each retrain's eviction (the hardest
    # kept); 0 = no bound, as the releases
    max_cache: int = 0


@dataclasses.dataclass(frozen=True)
class BBoxRegParams:
    """Ridge regression from pooled conv5 features to R-CNN's (dx, dy, dw, dh)."""

    lam: float = 4000.0
    min_iou: float = 0.5


@dataclasses.dataclass(frozen=True)
class DetectParams:
    """Scoring, thresholding and NMS at test time."""

    bbox_reg: bool = True
    score_threshold: float = -1.5  # start; tightened so a class keeps <= max_per_class_factor x #images
    max_per_class_factor: float = 5.0
    nms_iou: float = 0.3
    max_per_image: int = 100  # per class, in each image
    # release: threshold, NMS, top max_per_image, then regress, clip, NMS again (spp_test.m +
    # spp_test_bbox_regressor.m); regress_first: regress, clip, NMS once
    order: str = "release"
    # Speed at test time (both move scores a little; their mAP cost is in bench/RESULTS.md):
    # fc6 / fc7 replaced by rank-r truncated SVDs (Fast R-CNN), 0 = exact; and the fc layers'
    # matrix products in bfloat16 (float32 = exact).
    svd_ranks: tuple[int, ...] = (0, 0)
    precision: str = "float32"
    combine: tuple[str, ...] = ()  # other detect artifacts whose scored windows are merged (Table 9)


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    metric: str = "voc2007"  # voc2007 (11-point) | voc2010 (area) | coco (mAP@[.5:.95], pycocotools)
    iou: float = 0.5


@dataclasses.dataclass(frozen=True)
class ClassifyParams:
    """Full-image classification with SPP features (paper section 3.1.4 / Table 9 analog)."""

    size: int = 392  # min(w, h) = s
    layer: str = "fc7"  # pool5 (the whole pyramid) | pool5_6x6 (its 6 x 6 level) | fc6 | fc7
    C: float = 1.0
    view: str = "full"  # full: the whole image | crop: its centre size x size (Table 3 (a), (b))
    # A folder of <class>/<image> files instead of the VOC splits: Caltech101's protocol (Table 4)
    folder: str = ""
    train_per_class: int = 30
    test_per_class: int = 50
    splits: int = 10
    seed: int = 0


# Explicit table, no registry magic: section name in the TOML -> its dataclass.
SECTIONS: dict[str, type] = {
    "dataset": DatasetParams,
    "synth": SynthParams,
    "proposals": ProposalParams,
    "net": NetParams,
    "pretrain": PretrainParams,
    "features": FeatureParams,
    "pool": PoolParams,
    "finetune": FinetuneParams,
    "svm": SvmParams,
    "bbox_reg": BBoxRegParams,
    "detect": DetectParams,
    "evaluate": EvaluateParams,
    "classify": ClassifyParams,
}


@dataclasses.dataclass(frozen=True)
class Config:
    """All sections, resolved. ``config.svm`` etc. are frozen dataclass instances."""

    dataset: DatasetParams = DatasetParams()
    synth: SynthParams = SynthParams()
    proposals: ProposalParams = ProposalParams()
    net: NetParams = NetParams()
    pretrain: PretrainParams = PretrainParams()
    features: FeatureParams = FeatureParams()
    pool: PoolParams = PoolParams()
    finetune: FinetuneParams = FinetuneParams()
    svm: SvmParams = SvmParams()
    bbox_reg: BBoxRegParams = BBoxRegParams()
    detect: DetectParams = DetectParams()
    evaluate: EvaluateParams = EvaluateParams()
    classify: ClassifyParams = ClassifyParams()
    source: str = "<defaults>"

    def replace(self, section: str, **changes: Any) -> "Config":
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def as_dict(params: Any) -> dict:
    """JSON-able dict of a params dataclass (tuples become lists), for keys and manifests."""
    return json.loads(json.dumps(dataclasses.asdict(params)))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check and convert one TOML / --set value to the field's declared type."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, where) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {annotation!r}")  # pragma: no cover


def _apply(config: Config, section: str, values: Mapping[str, Any], origin: str) -> Config:
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section [{section}]; known sections: {', '.join(SECTIONS)}")
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    changes = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{origin}: unknown key {section}.{key}; known keys of [{section}]: {', '.join(known)}")
        changes[key] = _coerce(value, hints[key], f"{origin}: {section}.{key}")
    return config.replace(section, **changes)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value); value parsed as TOML when it can be."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. svm.C=0.001")
    lhs, raw = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words: strings, comma lists
    return section, key, value


def load_config(path: Path | str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- the pipeline TOML at ``path`` <- each ``section.key=value`` override."""
    config = Config()
    if path is not None:
        path = Path(path)
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: {e}") from None
        for section, values in doc.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]; known sections: {', '.join(SECTIONS)}")
            config = _apply(config, section, values, str(path))
        config = dataclasses.replace(config, source=str(path))
    return with_overrides(config, overrides)


def with_overrides(config: Config, overrides: Sequence[str], origin: str = "--set") -> Config:
    """``config`` with each ``section.key=value`` applied in order."""
    for text in overrides:
        section, key, value = parse_override(text)
        config = _apply(config, section, {key: value}, origin)
    return config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML")  # pragma: no cover


def config_to_toml(config: Config, comments: Mapping[str, str] | None = None, header: str = "") -> str:
    """``config`` as a pipeline TOML that :func:`load_config` reads back to the same values;
    ``comments``: ``"section.key" -> text`` written above that key."""
    comments = dict(comments or {})
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for section, cls in SECTIONS.items():
        lines += ["", f"[{section}]"]
        values = getattr(config, section)
        for field in dataclasses.fields(cls):
            note = comments.get(f"{section}.{field.name}")
            if note:
                lines += [f"# {part}" for part in note.splitlines()]
            lines.append(f"{field.name} = {_toml_value(getattr(values, field.name))}")
    return "\n".join(lines).lstrip("\n") + "\n"
