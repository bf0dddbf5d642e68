"""sppcli: SPP-net object detection as resumable command-line stages.

Each command is a thin shell: resolve the config, plan the stage, let ``sppcli.pipeline`` decide
whether it must run, print one summary line. The work lives in ``sppcli.stages.*``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sppcli.options import emit, friendly_errors, make_planner, setup_logging, stage_options


def _set(section_key: str, value) -> list[str]:
    """A CLI option as a --set override (None means: not given, keep the config's value)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        value = list(value)
    return [f"{section_key}={json.dumps(value)}"]


def _run_stage(stage: str, module: str, kw: dict, extra: list[str] = (), split_role: str | None = None):
    """Shared body of every stage command; returns (planner, manifest).

    ``module`` is the stage module's full name; it is imported only if the stage has to run.
    """
    from sppcli.pipeline import RunOptions, run_stage

    setup_logging(kw["verbose"], kw["quiet"])
    planner = make_planner(kw["config_path"], kw["overrides"], kw["cache_dir"], extra)
    split = kw.get("split") or (planner.split_of(split_role) if split_role else None)
    plan = planner.plan(stage, split)
    options = RunOptions(device=kw.get("device", "auto"), workers=kw.get("workers", 1),
                         scheduler=kw.get("scheduler"), wait=not kw.get("no_wait"))
    manifest, _ran = run_stage(planner, module, plan, options, force=kw["force"], hint_args=hint_args(kw))
    return planner, manifest


def hint_args(kw: dict) -> str:
    """The user's --config, --set and --cache-dir, as they must be repeated on later commands."""
    import shlex

    parts = []
    if kw.get("config_path"):
        parts += ["--config", str(kw["config_path"])]
    for item in kw.get("overrides") or ():
        parts += ["--set", item]
    if kw.get("cache_dir") is not None and Path(kw["cache_dir"]) != Path("cache"):
        parts += ["--cache-dir", str(kw["cache_dir"])]
    return " ".join(shlex.quote(p) for p in parts)


def _variant(name: str | None) -> list[str]:
    from sppcli.pipeline import VARIANTS

    if name is None:
        return []
    if name not in VARIANTS:
        raise click.BadParameter(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}", param_hint="--variant")
    return list(VARIANTS[name])


variant_option = click.option(
    "--variant", default=None,
    help="A Table 6 row: pool5 | fc6 | ftfc6 | ftfc7 | ftfc7bb (sets svm.layer, svm.finetuned, detect.bbox_reg).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="sppcli")
def main():
    """SPP-net object detection (He, Zhang, Ren, Sun): resumable stages over on-disk artifacts.

    \b
    Pipeline (each stage skips itself when its artifact is up to date):
      make-dataset -> proposals -> pretrain -> extract-features -> pool-windows
      -> finetune-fc -> train-svm -> train-bbox-reg -> detect -> evaluate -> show
    `sppcli status` tells what is complete, partial, stale or missing.
    """


# --------------------------------------------------------------------------------------------- data


@main.command("make-dataset")
@click.option("--kind", type=click.Choice(["detection", "classification", "caltech"]), default="detection",
              show_default=True,
              help="detection: the VOC-format devkit; classification: a folder-per-class pretraining set "
                   "(an ImageNet analog: the devkit's classes and 32 more); caltech: a folder-per-class set "
                   "of classes disjoint from both (Table 4, `sppcli paper --folder`).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write (default: the config's dataset.devkit; for classification "
                   "pretrain.folder, for caltech classify.folder, else beside the devkit).")
@click.option("--seed", type=int, default=None, help="Random seed (same seed -> same bytes).")
@click.option("--trainval", type=int, default=None, help="detection: number of trainval images.")
@click.option("--test", type=int, default=None, help="detection: number of test images.")
@click.option("--size", default=None, metavar="WxH",
              help="Image size, e.g. 320x240 (classification, caltech: the crop side, e.g. 80).")
@click.option("--per-class", type=int, default=None,
              help="classification, caltech: images per class (default 150, 80).")
@stage_options(split=False, runtime=False)
@friendly_errors
def make_dataset_cmd(kind, out, seed, trainval, test, size, per_class, **kw):
    """Write the embedded synthetic VOC2007-format dataset (the demo's default data), or a
    folder-per-class set of synthetic shape crops (--kind classification / caltech).

    Several shape-and-texture classes on real-photo backgrounds, with occlusion, truncation,
    tiny `difficult` objects and clutter; Annotations/, JPEGImages/, ImageSets/Main/ and
    classes.txt, exactly as a VOC devkit. The folder-per-class sets are <out>/<class>/<n>.jpg.

    \b
    Examples:
      sppcli make-dataset --out cache/data/synth/VOC2007 --trainval 200 --test 100 --size 320x240
      sppcli make-dataset --kind classification --per-class 150 --size 80
      sppcli make-dataset --kind caltech --out cache/data/synth/caltech
    """
    from sppcli.stages.dataset import make_classification_dataset, make_embedded_dataset

    setup_logging(kw["verbose"], kw["quiet"])
    extra = _set("synth.seed", seed)
    if kind != "detection":
        if trainval is not None or test is not None:
            raise click.UsageError(f"--trainval and --test are for --kind detection, not {kind}")
        try:
            side = int(size.lower().split("x")[0]) if size is not None else None
        except ValueError:
            raise click.BadParameter(f"{size!r}: expected a crop side, e.g. 80", param_hint="--size") from None
        planner = make_planner(kw["config_path"], kw["overrides"], kw["cache_dir"], extra)
        info = make_classification_dataset(planner.config, kind, out=out, per_class=per_class, size=side,
                                           force=kw["force"])
        if kw["as_json"]:
            click.echo(json.dumps(info, indent=2, sort_keys=True))
        summary = info["summary"]
        state = "up to date" if info["up_to_date"] else f"written in {info['seconds']:.1f}s"
        click.echo(f"make-dataset {info['folder']}: {state}; {summary['images']} images, "
                   f"{len(summary['classes'])} classes x {summary['per_class']}, {summary['size']} px", err=True)
        return
    if per_class is not None:
        raise click.UsageError("--per-class is for --kind classification or caltech")
    extra += _set("synth.trainval", trainval) + _set("synth.test", test)
    if size is not None:
        try:
            w, h = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"{size!r}: expected WxH, e.g. 320x240", param_hint="--size") from None
        extra += _set("synth.width", w) + _set("synth.height", h)
    if out is not None:
        extra += _set("dataset.devkit", str(out))
    planner = make_planner(kw["config_path"], kw["overrides"], kw["cache_dir"], extra)
    info = make_embedded_dataset(planner.config, force=kw["force"])
    if kw["as_json"]:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
    summary = info["summary"]
    state = "up to date" if info["up_to_date"] else f"written in {info['seconds']:.1f}s"
    click.echo(f"make-dataset {info['devkit']}: {state}; images per split {summary['images']}, "
               f"{len(summary['classes'])} classes ({', '.join(summary['classes'])})", err=True)


@main.command("init")
@click.argument("devkit", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The pipeline TOML to write.")
@click.option("--split", default="trainval", show_default=True, help="The split whose sizes are surveyed.")
@click.option("--base", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Start from this pipeline file (default: pipelines/voc2007.toml, the paper's and release's settings).")
@stage_options(split=False, runtime=False)
@friendly_errors
def init_cmd(devkit, out, split, base, **kw):
    """Write a pipeline file for your own dataset (a VOC-format devkit or a COCO instances JSON),
    with settings chosen from its sizes.

    Surveys the split's images and objects, then sets the dataset, its classes, the proposals'
    segmentation size and minimum window, and the feature scales, saying why in the file;
    everything else is the base file's (and any --set given here). Run every stage with
    `--config OUT` afterwards.

    \b
    Examples:
      sppcli init /data/traffic/VOC2007 --out traffic.toml
      sppcli init annotations/instances_train.json --images train/ --out coco.toml \\
          --set dataset.test_devkit='"annotations/instances_val.json"' --set dataset.test_images='"val/"'
      sppcli proposals --config traffic.toml --split trainval --workers 8
    """
    from sppcli.config import config_to_toml, load_config
    from sppcli.data.coco import is_coco_file
    from sppcli.data.survey import suggest, survey
    from sppcli.data.voc import MissingAnnotationsError, VocDataset, resolve_classes
    from sppcli.pipeline import open_dataset

    setup_logging(kw["verbose"], kw["quiet"])
    if out.exists() and not kw["force"]:
        raise click.ClickException(f"{out} exists; pass --force to replace it")
    base = base or Path(__file__).resolve().parents[1] / "pipelines" / "voc2007.toml"
    coco = is_coco_file(devkit)
    if not coco and not devkit.is_dir():
        raise click.ClickException(f"{devkit}: neither a VOC-format devkit folder nor a COCO instances .json")
    given = [f"dataset.devkit={json.dumps(str(devkit.resolve()))}"] if coco else []
    config = load_config(base if base.is_file() else None, list(kw["overrides"]) + given)
    if coco:
        # A COCO file names its categories: they are the classes unless --classes/--set picks some.
        dataset = open_dataset(config, config.dataset.train_split if split == "trainval" else split)
        found = survey(dataset)
        classes = list(dataset.classes)
        why = "as given" if config.dataset.classes else "the file's categories, in category-id order"
    else:
        # The annotations' own names (every object, whatever the classes) decide the classes unless
        # the config or a classes.txt names them.
        try:
            surveyed = VocDataset(devkit, split, list(config.dataset.classes) or ["-"],
                                  missing_annotations=config.dataset.missing_annotations)
        except MissingAnnotationsError as error:
            raise MissingAnnotationsError(f"{error}; e.g. sppcli init {devkit} --out {out} "
                           "--set dataset.missing_annotations='\"skip\"'") from None
        found = survey(surveyed)
        surveyed.report_data_issues(unknown_names=False)  # its "-" class is a placeholder
        if config.dataset.classes:
            classes, why = list(config.dataset.classes), "as given"
        elif (devkit / "classes.txt").is_file():
            classes, why = list(resolve_classes(devkit)), "from classes.txt"
        else:
            classes, why = list(found.class_counts), "the names in the annotations, most objects first"
    chosen = suggest(found)
    counts = ", ".join(f"{n} {c}" for n, c in found.class_counts.items())
    changes = {"dataset.devkit": (str(devkit.resolve()), f"{found.images} {split} images surveyed"),
               "dataset.classes": (classes, f"{why} ({counts})"),
               **{k: v for k, v in chosen.items() if k != "features.scales_5"}}
    overrides = [f"{key}={json.dumps(value)}" for key, (value, _) in changes.items()]
    config = load_config(base if base.is_file() else None, list(kw["overrides"]) + overrides)
    comments = {key: reason for key, (_, reason) in changes.items()}
    comments["features.scales"] += f"\n5 scales: {chosen['features.scales_5'][0]}"
    header = (f"sppcli pipeline for {devkit.resolve()}, written by `sppcli init` from {found.images} {split} images\n"
              f"and {len(found.object_sides)} objects; every other value is {base.name}'s.")
    from sppcli.artifacts import atomic_write_bytes

    atomic_write_bytes(out, config_to_toml(config, comments, header).encode())
    for key, (value, reason) in changes.items():
        click.echo(f"{key} = {json.dumps(value)}  ({reason})", err=True)
    click.echo(f"init: {out}; next: sppcli proposals --config {out} --split {split}", err=True)


@main.command("proposals")
@click.option("--mode", type=click.Choice(["fast", "quality", "single"]), default=None,
              help="Selective search mode (paper: fast).")
@click.option("--max-boxes", type=int, default=None, help="Keep at most this many windows per image.")
@click.option("--min-size", type=int, default=None, help="Drop windows with a side shorter than this (pixels).")
@click.option("--max-side", type=int, default=None, help="Segment images shrunk to this longer side (speed).")
@stage_options()
@friendly_errors
def proposals_cmd(mode, max_boxes, min_size, max_side, **kw):
    """Selective-search window proposals for every image of a split.

    OpenCV's ximgproc selective search, one process per image (--workers), one HDF5 item
    per image; resumable. Reports boxes per image, recall at IoU 0.5 / 0.7, MABO, s/image.

    \b
    Example:
      sppcli proposals --config pipelines/demo.toml --split test --workers 2
    """
    from sppcli.data.proposal_recall import format_recall_table

    extra = (_set("proposals.mode", mode) + _set("proposals.max_boxes", max_boxes) + _set("proposals.min_size", min_size)
             + _set("proposals.max_side", max_side))
    planner, m = _run_stage("proposals", "sppcli.stages.proposals", kw, extra, split_role="train")
    click.echo(format_recall_table(m.metrics, m.dataset), err=True)
    emit(m, kw["as_json"], f"proposals: {m.dir}")


@main.command("import-proposals")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--convention", type=click.Choice(["auto", "xyxy0", "xyxy1", "yxyx0", "yxyx1"]), default=None,
              help="Coordinate order and base of the file's boxes (auto: .mat = yxyx1, NPZ/HDF5 = xyxy0 continuous).")
@stage_options()
@friendly_errors
def import_proposals_cmd(source, convention, **kw):
    """Use boxes you already have (NPZ, HDF5, or R-CNN's selective-search .mat) as proposals.

    Writes the same artifact as `sppcli proposals`, so every later stage uses it unchanged.
    Later commands must be given the same `--set proposals.imported=SOURCE`.

    \b
    Example:
      sppcli import-proposals selective_search_data/voc_2007_test.mat --split test \\
          --config pipelines/voc2007.toml --set dataset.devkit=VOCdevkit/VOC2007
    """
    from sppcli.data.proposal_recall import format_recall_table

    extra = _set("proposals.imported", str(source.resolve())) + _set("proposals.imported_convention", convention)
    planner, m = _run_stage("proposals", "sppcli.stages.proposals", kw, extra, split_role="train")
    click.echo(format_recall_table(m.metrics, m.dataset), err=True)
    emit(m, kw["as_json"], f"proposals (imported): {m.dir}")


# --------------------------------------------------------------------------------------------- SPP-net


@main.command("pretrain")
@click.option("--sizes", default=None, metavar="224,180", help="Training sizes; two or more = multi-size training.")
@click.option("--epochs", type=int, default=None)
@click.option("--folder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Train on an image folder (one sub-folder per class) instead of the dataset's object crops.")
@stage_options(split=False)
@friendly_errors
def pretrain_cmd(sizes, epochs, folder, **kw):
    """Train an SPP-net classifier (conv trunk + SPP + fc6 + fc7 + softmax).

    On object crops of the dataset's train split, or an image folder. Single-size or
    multi-size (224 then 180, one epoch each, shared weights). Resumable per epoch. Prints top-1
    error of a centre crop, the full image and 10 views on a held-out split.

    \b
    Example:
      sppcli pretrain --config pipelines/demo.toml --sizes 64,48 --workers 2
    """
    from sppcli.stages.pretrain import format_eval_table

    extra = _set("pretrain.epochs", epochs)
    if sizes is not None:
        extra += _set("pretrain.sizes", [int(s) for s in sizes.split(",")])
    if folder is not None:
        extra += _set("pretrain.source", "folder") + _set("pretrain.folder", str(folder.resolve()))
    planner, m = _run_stage("pretrain", "sppcli.stages.pretrain", kw, extra)
    click.echo(format_eval_table(m.metrics), err=True)
    emit(m, kw["as_json"], f"pretrain: {m.dir / 'model.pt'}")


@main.command("extract-features")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Our checkpoint, or a torchvision alexnet/vgg16 .pth (with --set net.trunk=...). "
                   "Default: the pretrain artifact.")
@click.option("--scales", default=None, metavar="688 | 480,576,688,864,1200", help="Shorter-side sizes.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default=None, help="Storage dtype.")
@click.option("--autocast", type=click.Choice(["none", "bf16", "fp16"]), default=None, help="Compute precision.")
@stage_options()
@friendly_errors
def extract_features_cmd(weights, scales, dtype, autocast, **kw):
    """conv5 feature maps of whole images, once per image and scale, to HDF5.

    \b
    Example:
      sppcli extract-features --config pipelines/voc2007.toml --split test \\
          --weights zf5.pt --scales 480,576,688,864,1200 --device cuda --workers 4
    """
    extra = _set("features.dtype", dtype) + _set("features.autocast", autocast)
    if weights is not None:
        extra += _set("features.weights", str(weights.resolve()))
    if scales is not None:
        extra += _set("features.scales", [int(s) for s in scales.split(",")])
    planner, m = _run_stage("features", "sppcli.stages.features", kw, extra, split_role="train")
    emit(m, kw["as_json"], f"features: {m.metrics.get('conv_seconds_per_image', 0):.3f} s/image conv, "
                           f"{m.metrics.get('bytes_per_image', 0) / 1e6:.2f} MB/image -> {m.dir}")


@main.command("pool-windows")
@click.option("--levels", default=None, metavar="1,2,3,6", help="Pyramid levels (n x n bins each).")
@stage_options()
@friendly_errors
def pool_windows_cmd(levels, **kw):
    """Spatial pyramid pooling of every window (proposals + ground truth) on its best scale.

    \b
    Example:
      sppcli pool-windows --config pipelines/demo.toml --split trainval --workers 2
    """
    extra = _set("pool.levels", [int(s) for s in levels.split(",")]) if levels else []
    planner, m = _run_stage("pool", "sppcli.stages.pool", kw, extra, split_role="train")
    emit(m, kw["as_json"], f"pool: {m.metrics.get('feature_dim')}-d windows, "
                           f"{m.metrics.get('pool_seconds_per_image', 0):.3f} s/image -> {m.dir}")


@main.command("classify")
@click.option("--size", type=int, default=None, help="Images resized so min(w, h) = size.")
@click.option("--layer", type=click.Choice(["pool5", "pool5_6x6", "fc6", "fc7"]), default=None,
              help="pool5: the whole pyramid; pool5_6x6: its 6x6 level only.")
@click.option("--view", type=click.Choice(["full", "crop"]), default=None,
              help="full: the whole image; crop: its centre size x size square.")
@click.option("--folder", type=click.Path(file_okay=False), default=None,
              help="A <class>/<image> folder (e.g. Caltech101): its random-splits protocol instead of VOC.")
@stage_options(split=False)
@friendly_errors
def classify_cmd(size, layer, view, folder, **kw):
    """Image classification with SPP features and linear SVMs.

    On the VOC splits: per-class AP and mAP (the paper's Table 3). With --folder: Caltech101's
    protocol (classify.train_per_class / test_per_class / splits), mean class accuracy +- std
    over the random splits (Table 4).

    \b
    Examples:
      sppcli classify --config pipelines/demo.toml --size 224 --layer fc7
      sppcli classify --config pipelines/demo.toml --folder /data/101_ObjectCategories --size 224 --layer pool5
    """
    from sppcli.data.voc_eval import format_ap_table

    extra = (_set("classify.size", size) + _set("classify.layer", layer) + _set("classify.view", view)
             + _set("classify.folder", str(Path(folder).resolve()) if folder else None))
    planner, m = _run_stage("classify", "sppcli.stages.classify", kw, extra)
    if m.metrics.get("protocol") == "folder":
        emit(m, kw["as_json"], f"classify: mean class accuracy {100 * m.metrics['accuracy_mean']:.2f} "
                               f"+- {100 * m.metrics['accuracy_std']:.2f} % over {len(m.metrics['accuracy'])} "
                               f"splits ({m.metrics['layer']}, {m.metrics['view']} s={m.metrics['size']}) -> {m.dir}")
        return
    classes = planner.dataset(planner.split_of("train")).classes
    click.echo(format_ap_table({f"{m.metrics['layer']} s={m.metrics['size']}": m.metrics["ap"]}, classes), err=True)
    mAP = m.metrics.get("mAP")
    emit(m, kw["as_json"], f"classify: mAP {'n/a' if mAP is None else f'{100 * mAP:.1f}'} -> {m.dir}")


# --------------------------------------------------------------------------------------------- detector


@main.command("finetune-fc")
@click.option("--iterations", type=int, default=None, help="Mini-batches in all.")
@stage_options(split=False)
@friendly_errors
def finetune_fc_cmd(iterations, **kw):
    """Fine-tune fc6, fc7 and a new (K+1)-way fc8 on pooled window features.

    \b
    Example:
      sppcli finetune-fc --config pipelines/demo.toml --device cuda
    """
    planner, m = _run_stage("finetune", "sppcli.stages.finetune", kw, _set("finetune.iterations", iterations))
    emit(m, kw["as_json"], f"finetune-fc: -> {m.dir}")


@main.command("train-svm")
@click.option("--layer", type=click.Choice(["pool5", "fc6", "fc7"]), default=None)
@click.option("--finetuned/--no-finetuned", default=None, help="fc layers from finetune-fc or the pretrained net.")
@click.option("--C", "C", type=float, default=None, help="SVM regularisation (paper: 0.001).")
@variant_option
@stage_options(split=False)
@friendly_errors
def train_svm_cmd(layer, finetuned, C, variant, **kw):
    """Per-class linear SVMs with hard-negative mining on window features.

    \b
    Example:
      sppcli train-svm --config pipelines/demo.toml --layer fc7 --finetuned
    """
    extra = _variant(variant) + _set("svm.layer", layer) + _set("svm.finetuned", finetuned) + _set("svm.C", C)
    planner, m = _run_stage("svm", "sppcli.stages.svm", kw, extra)
    emit(m, kw["as_json"], f"train-svm: {m.params['layer']} -> {m.dir}")


@main.command("train-bbox-reg")
@click.option("--lam", type=float, default=None, help="Ridge lambda (release: 4000).")
@stage_options(split=False)
@friendly_errors
def train_bbox_reg_cmd(lam, **kw):
    """Per-class ridge regression from pooled conv5 features to box corrections.

    \b
    Example:
      sppcli train-bbox-reg --config pipelines/demo.toml
    """
    planner, m = _run_stage("bbox_reg", "sppcli.stages.bbox_reg", kw, _set("bbox_reg.lam", lam))
    emit(m, kw["as_json"], f"train-bbox-reg: -> {m.dir}")


@main.command("detect")
@click.option("--bbox-reg/--no-bbox-reg", default=None, help="Refine boxes with the regressors.")
@click.option("--combine", "combine", multiple=True, metavar="DETECT_DIR",
              help="Merge this other detect artifact's scored windows (NMS over the union; Table 9).")
@variant_option
@stage_options()
@friendly_errors
def detect_cmd(bbox_reg, combine, variant, **kw):
    """Score every window, threshold, NMS 0.3, at most 100 per image; VOC and COCO result files.

    \b
    Example:
      sppcli detect --config pipelines/demo.toml --split test --variant ftfc7bb
    """
    extra = _variant(variant) + _set("detect.bbox_reg", bbox_reg)
    if combine:
        extra += _set("detect.combine", [str(Path(c).resolve()) for c in combine])
    planner, m = _run_stage("detect", "sppcli.stages.detect", kw, extra, split_role="test")
    emit(m, kw["as_json"], f"detect: {m.metrics.get('n_detections')} detections -> {m.dir}")


@main.command("evaluate")
@click.option("--metric", type=click.Choice(["voc2007", "voc2010", "coco"]), default=None,
              help="voc2007: 11-point interpolated AP; voc2010: area under the PR curve; "
                   "coco: pycocotools' mAP@[.5:.95] with AP50 and AP75.")
@variant_option
@stage_options()
@friendly_errors
def evaluate_cmd(metric, variant, **kw):
    """PASCAL VOC or COCO evaluation: per-class AP table, mAP, PR-curve PNGs, ap.json.

    \b
    Example:
      sppcli evaluate --config pipelines/demo.toml --variant ftfc7bb --json
    """
    from sppcli.stages.evaluate import format_result

    planner, m = _run_stage("evaluate", "sppcli.stages.evaluate", _no_json(kw), _variant(variant) + _set("evaluate.metric", metric),
                            split_role="test")
    if kw["as_json"]:
        click.echo((m.dir / "ap.json").read_text())
    click.echo(format_result(m), err=True)


def _no_json(kw: dict) -> dict:
    return {**kw, "as_json": False}


@main.command("show")
@click.option("--score", type=float, default=0.0, show_default=True, help="Draw detections above this score.")
@click.option("--limit", type=int, default=20, show_default=True, help="How many images.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNGs (default: show/ inside the detect artifact).")
@variant_option
@stage_options(runtime=False)
@friendly_errors
def show_cmd(score, limit, out, variant, **kw):
    """Draw detections on images (class, score, a colour per class) into PNG files.

    \b
    Example:
      sppcli show --config pipelines/demo.toml --variant ftfc7bb --score 0.5 --limit 10
    """
    from sppcli.stages.detect import draw_detections_of, found_in_drawn

    setup_logging(kw["verbose"], kw["quiet"])
    planner = make_planner(kw["config_path"], kw["overrides"], kw["cache_dir"], _variant(variant))
    plan = planner.plan("detect", kw.get("split") or planner.split_of("test"))
    m = planner.store.manifest(plan.stage, plan.dataset, plan.key)
    if m is None or not m.complete:
        raise click.ClickException(f"no complete detections for {plan.dataset}; run `{plan.command}` first")
    dataset = planner.dataset(plan.split)
    written = draw_detections_of(m, dataset, out or m.dir / "show", score, limit)
    click.echo(f"show: {len(written)} PNGs -> {(out or m.dir / 'show')}", err=True)
    click.echo(f"show: at score > {score:g}, {found_in_drawn(m, dataset, score, limit)} (IoU >= 0.5)", err=True)


@main.command("export")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The bundle to write (e.g. detector.sppnet).")
@variant_option
@stage_options(split=False, runtime=False)
@friendly_errors
def export_cmd(out, variant, **kw):
    """Write a trained detector (net, SVMs, box regressors, settings) to one safetensors file.

    From the pipeline's complete artifacts (the same --config/--set/--variant as the commands
    that trained it); `sppcli predict --bundle` runs it anywhere.

    \b
    Example:
      sppcli export --config pipelines/demo.toml --variant ftfc7bb --out detector.sppnet
    """
    from sppcli.stages.predict import bundle_from_artifacts

    setup_logging(kw["verbose"], kw["quiet"])
    planner = make_planner(kw["config_path"], kw["overrides"], kw["cache_dir"], _variant(variant))
    path = bundle_from_artifacts(planner).save(out)
    click.echo(f"export: {path} ({path.stat().st_size / 1e6:.1f} MB)", err=True)


@main.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for <image>.json and <image>.png.")
@click.option("--bundle", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A detector from `sppcli export` (default: the pipeline's artifacts).")
@click.option("--score", type=float, default=0.0, show_default=True, help="Draw detections above this score.")
@click.option("--coco", is_flag=True, help="Also write detections.json in COCO's results format.")
@variant_option
@stage_options(split=False)
@friendly_errors
def predict_cmd(inputs, out, bundle, score, coco, variant, **kw):
    """Detect objects in new images (files or folders of JPEG/PNG), no annotations needed.

    Runs selective search, the conv5 maps, pooling, the SVMs, NMS and box regression on each
    image, as `detect` does on a split; writes one JSON per image and the drawn PNG.

    \b
    Examples:
      sppcli predict photos/ --out predictions --config pipelines/demo.toml --variant ftfc7bb
      sppcli predict photos/*.jpg --out predictions --bundle detector.sppnet
    """
    from sppcli.detector.bundle import DetectorBundle
    from sppcli.parallel import resolve_device
    from sppcli.stages.predict import Detector, bundle_from_artifacts, image_files, predict_images

    setup_logging(kw["verbose"], kw["quiet"])
    if bundle is not None:
        detector_bundle = DetectorBundle.load(bundle)
    else:
        planner = make_planner(kw["config_path"], kw["overrides"], kw["cache_dir"], _variant(variant))
        detector_bundle = bundle_from_artifacts(planner)
    files = image_files(inputs)
    records = predict_images(Detector(detector_bundle, resolve_device(kw["device"])), files, out, score, coco)
    if kw["as_json"]:
        click.echo(json.dumps(records, indent=2))
    found = sum(len(r["detections"]) for r in records)
    click.echo(f"predict: {len(records)} images, {found} detections -> {out}", err=True)


# --------------------------------------------------------------------------------------------- reports


@main.command("status")
@click.option("--variant", "variants", multiple=True, help="Also show these Table 6 rows (default: all).")
@click.option("--verify", is_flag=True,
              help="Re-read every file of the complete runs and list those whose bytes changed, "
                   "with the command that rebuilds each (reads everything: slow on big caches).")
@stage_options(split=False, runtime=False)
@friendly_errors
def status_cmd(variants, verify, **kw):
    """Every stage of the pipeline: complete / partial (n of m images) / stale (why) / missing
    / damaged.

    \b
    Example:
      sppcli status --config pipelines/demo.toml
    """
    from sppcli.status import pipeline_status, format_status

    setup_logging(kw["verbose"], kw["quiet"])
    planner = make_planner(kw["config_path"], kw["overrides"], kw["cache_dir"])
    rows = pipeline_status(planner, variants or None, hint_args(kw), verify=verify)
    if kw["as_json"]:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        click.echo(format_status(rows))


@main.command("report")
@click.option("--html", "as_html", is_flag=True,
              help="Also write the report page: report/index.html under the cache dir (or --out).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the HTML report (default: <cache-dir>/report).")
@click.option("--score", type=float, default=0.0, show_default=True,
              help="The page's detection grid draws detections above this score.")
@click.option("--scales", "scale_columns", multiple=True, metavar="S1,S2,...",
              help="Another Table 6 column: the rows run with features.scales=[S1,S2,...] (repeatable; "
                   "the paper's 1-scale vs 5-scale columns).")
@stage_options(split=False, runtime=False)
@friendly_errors
def report_cmd(as_html, out, score, scale_columns, **kw):
    """The paper's Table 6 on this pipeline: mAP per layer / fine-tuning / bbox regression row,
    with conv and fc seconds per image. Rows whose artifacts are missing are marked.

    With --html, also a self-contained page (open it from disk): Table 6, timings, per-class AP,
    PR curves, proposal recall and the first 12 test images with their detections.

    \b
    Examples:
      sppcli report --config pipelines/demo.toml --html
      sppcli report --config pipelines/demo.toml --scales 180,240,320
    """
    from sppcli.report.table6 import table6

    setup_logging(kw["verbose"], kw["quiet"])
    planner = make_planner(kw["config_path"], kw["overrides"], kw["cache_dir"])
    try:
        columns = [[int(v) for v in s.split(",") if v.strip()] for s in scale_columns]
    except ValueError:
        raise click.BadParameter(f"{', '.join(scale_columns)}: give scales as integers, e.g. 180,240,320",
                                 param_hint="--scales")
    text, data = table6(planner, columns)
    if kw["as_json"]:
        click.echo(json.dumps(data, indent=2, default=str))
    click.echo(text)
    if as_html:
        from sppcli.report.html import write_html_report

        page = write_html_report(planner, out or Path(kw["cache_dir"]) / "report", score=score,
                                 scale_columns=columns)
        click.echo(f"report: {page}", err=True)


@main.command("paper")
@click.option("--tables", default="1,2,3,4,9", show_default=True, metavar="1,2,3,4,9",
              help="Which of the paper's tables to build.")
@click.option("--folder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Table 4's folder-per-class set (<class>/<image>), one the pretraining never saw.")
@stage_options(split=False)
@friendly_errors
def paper_cmd(tables, folder, **kw):
    """The paper's Tables 1, 2, 3, 4 and 9 on this pipeline's data, each beside the paper's numbers.

    Runs every stage the tables need (nets with and without the pyramid, single- and multi-size,
    a second seed, classification runs), each skipped when up to date; writes
    <cache-dir>/paper/tables.txt and tables.json.

    \b
    Example:
      sppcli paper --config pipelines/demo.toml --folder cache/data/synth/caltech
    """
    from sppcli.artifacts import atomic_write_bytes, atomic_write_json
    from sppcli.report.paper import PaperRun, paper_tables
    from sppcli.pipeline import RunOptions

    setup_logging(kw["verbose"], kw["quiet"])
    planner = make_planner(kw["config_path"], kw["overrides"], kw["cache_dir"])
    options = RunOptions(device=kw["device"], workers=kw["workers"], scheduler=kw["scheduler"])
    numbers = [n.strip() for n in tables.split(",") if n.strip()]
    built = paper_tables(PaperRun(planner, options, folder=folder), numbers)
    text = "\n\n".join(t.format() for t in built)
    out = Path(kw["cache_dir"]) / "paper"
    atomic_write_bytes(out / "tables.txt", (text + "\n").encode())
    atomic_write_json(out / "tables.json", [t.to_json() for t in built])
    if kw["as_json"]:
        click.echo(json.dumps([t.to_json() for t in built], indent=2))
    click.echo(text)
    click.echo(f"paper: {out / 'tables.txt'}", err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
