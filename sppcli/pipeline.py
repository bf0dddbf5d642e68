"""The stage graph: which params and upstream artifacts make each stage's key.

A :class:`Plan` is what a stage *would* produce from a config: its key chains the keys its
upstream plans would have, so ``sppcli status`` can say that a detection is stale because the
SVM params changed three stages up, and a stage run finds its inputs by key rather than by a
mutable "latest" pointer (two SVM variants can live side by side, as Table 6 needs).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Mapping

from sppcli.artifacts import (ArtifactError, ArtifactStore, DamagedItem, DamagedManifest, Manifest, StageState,
                              check_sizes, count_items, stage_key)
from sppcli.config import Config, as_dict
from sppcli.stages import STAGES

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Plan:
    stage: str
    split: str
    dataset: str  # artifact dataset name, e.g. "VOC2007_test"
    params: dict
    upstream: Mapping[str, "Plan"]
    external: Mapping[str, str]

    @property
    def version(self) -> int:
        return STAGES[self.stage].version

    @property
    def upstream_keys(self) -> dict[str, str]:
        return {role: p.key for role, p in self.upstream.items()}

    @property
    def key(self) -> str:
        return stage_key(self.stage, self.version, self.params, self.upstream_keys, self.external)

    @property
    def command(self) -> str:
        """The command that makes this artifact (without --config / --set, which the caller adds)."""
        split = f" --split {self.split}" if STAGES[self.stage].per_image or self.stage == "evaluate" else ""
        return f"{STAGES[self.stage].command}{split}"


def open_dataset(config: Config, split: str):
    """The dataset of one split: a VOC devkit's image set, or one COCO instances JSON.

    VOC: ``dataset.devkit`` is the devkit folder and ``split`` names ``ImageSets/Main/<split>.txt``.

    COCO: ``dataset.devkit`` ends in ``.json``. A COCO file holds one split, so a split *name*
    picks a file: ``dataset.train_split`` reads ``dataset.devkit`` (images under
    ``dataset.images``), ``dataset.test_split`` reads ``dataset.test_devkit`` (images under
    ``dataset.test_images``, default ``dataset.images``). COCO itself ships one JSON per split
    and one image folder per split (``instances_val2017.json`` + ``val2017/``), which is why
    the test split has its own two keys; the split names stay labels, as they are in every
    command (``--split test``), artifact path and status line. With no ``test_devkit`` the
    test split is the train file itself (a warning says so): enough to try the pipeline, not
    to measure it. Any other split name is an error rather than a guess.
    """
    from sppcli.data.coco import CocoDataset, CocoError, is_coco_file
    from sppcli.data.voc import VocDataset

    d = config.dataset
    classes = d.classes or None
    if not is_coco_file(d.devkit):
        return VocDataset(Path(d.devkit), split, classes, missing_annotations=d.missing_annotations)
    if split == d.test_split and (split != d.train_split or d.test_devkit):
        if split == d.train_split and d.test_devkit != d.devkit:
            raise CocoError(f"dataset.train_split and dataset.test_split are both {split!r} but "
                            f"dataset.devkit ({d.devkit}) and dataset.test_devkit ({d.test_devkit}) "
                            "differ; give the splits different names")
        if not d.test_devkit:
            _log.warning("dataset.test_devkit is not set: the %r split reads %s, the training file; "
                         "results on it say nothing about new images", split, d.devkit)
        return CocoDataset(Path(d.test_devkit or d.devkit), d.test_images or d.images or None,
                           split, classes)
    if split == d.train_split:
        return CocoDataset(Path(d.devkit), d.images or None, split, classes)
    raise CocoError(f"split {split!r}: a COCO dataset has the splits {d.train_split!r} "
                    f"(dataset.devkit = {d.devkit}) and {d.test_split!r} (dataset.test_devkit = "
                    f"{d.test_devkit or d.devkit})")


class Planner:
    """Builds plans from one config; memoises datasets and external digests."""

    def __init__(self, store: ArtifactStore, config: Config):
        self.store = store
        self.config = config
        self._datasets: dict[str, object] = {}
        self._digests: dict[str, str] = {}

    def with_overrides(self, overrides) -> "Planner":
        """A planner for this config plus ``section.key=value`` overrides, sharing the memos."""
        from sppcli.config import with_overrides

        other = Planner(self.store, with_overrides(self.config, overrides, "variant"))
        other._datasets, other._digests = self._datasets, self._digests
        return other

    def dataset(self, split: str):
        if split not in self._datasets:
            self._datasets[split] = open_dataset(self.config, split)
        return self._datasets[split]

    def dataset_digest(self, split: str) -> str:
        """Digest of the split's image list and its annotations (what ground truth depends on)."""
        if split not in self._digests:
            ds = self.dataset(split)
            self._digests[split] = self.store.digests.files(ds.external_files(), base=ds.devkit)
        return self._digests[split]

    def weights_digest(self, path: str) -> str:
        if not Path(path).is_file():
            raise FileNotFoundError(f"features.weights: no such file {path!r} (give a checkpoint from "
                                    "`sppcli pretrain` or a torchvision .pth file)")
        return self.store.digests.file(Path(path))

    def split_of(self, role: str) -> str:
        return self.config.dataset.train_split if role == "train" else self.config.dataset.test_split

    def plan(self, stage: str, split: str | None = None) -> Plan:
        c = self.config
        if stage == "classify" and c.classify.folder:
            return self._plan_folder_classify()
        train = c.dataset.train_split
        split = split or (c.dataset.test_split if stage in ("detect", "evaluate") else train)
        ds = self.dataset(split)
        external: dict[str, str] = {}
        upstream: dict[str, Plan] = {}
        classes = list(ds.classes)
        if stage == "proposals":
            params = as_dict(c.proposals)
            external["dataset"] = self.dataset_digest(split)
            if c.proposals.imported:
                external["imported"] = self.store.digests.file(Path(c.proposals.imported))
        elif stage == "pretrain":
            split = train
            ds = self.dataset(split)
            params = {"net": as_dict(c.net), "pretrain": as_dict(c.pretrain), "classes": classes}
            external["dataset"] = self.dataset_digest(split)
            if c.pretrain.source == "folder":
                folder = Path(c.pretrain.folder)
                external["folder"] = self.store.digests.files(
                    [p for p in folder.rglob("*") if p.is_file()], base=folder)
        elif stage == "features":
            params = {"net": as_dict(c.net), "features": as_dict(c.features)}
            if c.finetune.flip and split == train:
                # Fine-tuning on flipped images needs their maps too; only then does the key say so.
                params["flip"] = True
            external["dataset"] = self.dataset_digest(split)
            if c.features.weights:
                external["weights"] = self.weights_digest(c.features.weights)
            else:
                upstream["pretrain"] = self.plan("pretrain")
        elif stage == "pool":
            params = {"pool": as_dict(c.pool), "classes": classes}
            upstream["proposals"] = self.plan("proposals", split)
            upstream["features"] = self.plan("features", split)
            external["dataset"] = self.dataset_digest(split)
        elif stage == "finetune":
            params = as_dict(c.finetune)
            upstream["pool"] = self.plan("pool", train)
            upstream["features"] = self.plan("features", train)
        elif stage == "svm":
            params = as_dict(c.svm)
            upstream["pool"] = self.plan("pool", train)
            upstream["features"] = self.plan("features", train)
            if c.svm.finetuned and c.svm.layer != "pool5":
                upstream["finetune"] = self.plan("finetune")
        elif stage == "bbox_reg":
            params = as_dict(c.bbox_reg)
            upstream["pool"] = self.plan("pool", train)
            upstream["features"] = self.plan("features", train)
        elif stage == "detect":
            params = as_dict(c.detect)
            upstream["pool"] = self.plan("pool", split)
            upstream["features"] = self.plan("features", split)
            upstream["svm"] = self.plan("svm")
            if c.detect.bbox_reg:
                upstream["bbox_reg"] = self.plan("bbox_reg")
        elif stage == "evaluate":
            params = as_dict(c.evaluate)
            upstream["detect"] = self.plan("detect", split)
            external["dataset"] = self.dataset_digest(split)
        elif stage == "classify":
            params = {"classify": as_dict(c.classify), "classes": classes}
            upstream["features_net"] = self.plan("features", train)
            external["train"] = self.dataset_digest(train)
            external["test"] = self.dataset_digest(c.dataset.test_split)
        else:
            raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
        return Plan(stage=stage, split=split, dataset=ds.name, params=params, upstream=upstream,
                    external=external)

    def _plan_folder_classify(self) -> Plan:
        """classify on a folder-per-class set: the images and the net, no VOC split."""
        c = self.config
        folder = Path(c.classify.folder).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"classify.folder = {c.classify.folder!r}: no such folder")
        folder = folder.resolve()
        external = {"folder": self.store.digests.files([p for p in sorted(folder.rglob("*")) if p.is_file()],
                                                       base=folder)}
        upstream: dict[str, Plan] = {}
        params = {"classify": as_dict(c.classify), "net": as_dict(c.net)}
        if c.features.weights:
            external["weights"] = self.weights_digest(c.features.weights)
        else:
            upstream["pretrain"] = self.plan("pretrain")
        return Plan(stage="classify", split="folder", dataset=f"{folder.parent.name}_{folder.name}",
                    params=params, upstream=upstream, external=external)

    # -- resolution and execution

    def upstream_manifests(self, plan: Plan) -> dict[str, Manifest]:
        """The complete artifacts ``plan`` reads, or an error naming the command that makes each."""
        out = {}
        for role, up in plan.upstream.items():
            try:
                m = self.store.manifest(up.stage, up.dataset, up.key)
            except DamagedManifest as e:
                raise ArtifactError(f"{e.path} is damaged; rebuild it with: {up.command} --force") from None
            if m is None or not m.complete:
                st = self.state(up)
                why = "; ".join(st.reasons) if st.reasons else st.state
                raise ArtifactError(
                    f"{plan.stage} needs a complete {up.stage} artifact for {up.dataset} ({why}); "
                    f"run `{up.command}` with the same --config/--set first")
            check_sizes(m, f"{up.command} --force")
            out[role] = m
        return out

    def rebuild_command(self, plan: Plan, path: Path) -> str:
        """The command that rebuilds the artifact holding ``path``: an upstream of ``plan``."""
        path = Path(path).resolve()
        for up in plan.upstream.values():
            run_dir = self.store.run_dir(up.stage, up.dataset, up.key).resolve()
            if run_dir in path.parents:
                return f"{up.command} --force"
            found = self.rebuild_command(up, path)
            if found:
                return found
        return ""

    def state(self, plan: Plan) -> StageState:
        total = len(self.dataset(plan.split)) if STAGES[plan.stage].per_image else None
        return self.store.state(plan.stage, plan.dataset, plan.key, plan.version, plan.params,
                                plan.upstream_keys, plan.external, total_items=total)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a stage; the message says how far it got and that rerunning resumes.
    Still a KeyboardInterrupt, so callers that stop on Ctrl-C keep stopping."""


def execute(planner: Planner, plan: Plan, run: Callable[[dict[str, Manifest], "object"], Manifest],
            force: bool = False, log: Callable[[str], None] | None = None, wait: bool = True,
            hint_args: str = "") -> tuple[Manifest, bool]:
    """Run ``plan`` unless a complete artifact with its key exists. Returns (manifest, ran).

    ``run(upstream_manifests, stage_run)`` does the work and returns ``stage_run.finish(...)``.
    A partial run directory with the same key is resumed (its finished items are kept); a forced
    run builds beside the complete one, which stays until the new one is complete. The run
    directory is locked for the whole run (``wait=False``: fail if another process holds it).
    ``hint_args`` (the user's --config/--set/--cache-dir) are added to commands in messages.
    """
    log = log or _log.info
    store = planner.store
    if not force:
        existing = _complete_manifest(store, plan)
        if existing is not None:
            log(f"{plan.stage} {plan.dataset}: up to date ({plan.key[:12]})")
            return existing, False
    try:
        upstream = planner.upstream_manifests(plan)
    except DamagedItem as e:
        raise _with_hint(e, hint_args) from None
    # Waiting is news even with -q: the command seems to hang otherwise.
    lock = store.lock(plan.stage, plan.dataset, plan.key).acquire(wait=wait, log=_log.warning)
    try:
        if not force:
            existing = _complete_manifest(store, plan)  # another process may have made it meanwhile
            if existing is not None:
                log(f"{plan.stage} {plan.dataset}: up to date ({plan.key[:12]})")
                return existing, False
        state = planner.state(plan)
        if force:
            log(f"{plan.stage} {plan.dataset}: --force, running again")
        else:
            log(f"{plan.stage} {plan.dataset}: running ({'; '.join(state.reasons) or state.state})")
        out = store.begin(plan.stage, plan.dataset, plan.version, plan.params, plan.upstream_keys,
                          plan.external, force=force)
        t0 = time.time()
        try:
            manifest = run(upstream, out)
        except KeyboardInterrupt:
            message = _interrupted_message(planner, plan, out)
            out.abandon()
            raise Interrupted(message) from None
        except DamagedItem as e:
            out.abandon()
            if not e.command:
                e = DamagedItem(e.path, planner.rebuild_command(plan, e.path))
            raise _with_hint(e, hint_args) from None
        except BaseException:
            out.abandon()
            raise
    finally:
        lock.release()
    log(f"{plan.stage} {plan.dataset}: done in {time.time() - t0:.1f}s -> {manifest.dir}")
    return manifest, True


def _complete_manifest(store: ArtifactStore, plan: Plan) -> Manifest | None:
    m = store.manifest(plan.stage, plan.dataset, plan.key)  # DamagedManifest says: use --force
    return m if m is not None and m.complete else None


def _with_hint(e: DamagedItem, hint_args: str) -> DamagedItem:
    return DamagedItem(e.path, f"{e.command} {hint_args}".strip()) if e.command and hint_args else e


def _interrupted_message(planner: Planner, plan: Plan, out) -> str:
    resume = "run the same command again to resume"
    if out.forced:  # its sibling is gone: a forced run starts over
        resume = "the old artifact is untouched; run the same command again to start over"
    if STAGES[plan.stage].per_image:
        total = len(planner.dataset(plan.split))
        done = count_items(out.dir)
        return f"interrupted after {done} of {total} images; {resume}"
    progress = out.progress()
    if progress is not None:
        done, total, unit = progress
        return f"interrupted after {done} of {total} {unit}; {resume}"
    return f"interrupted; {resume}"


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run, not what to compute: none of these enter a key."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 1
    scheduler: str | None = None  # tcp://host:8786 -> Dask cluster through joblib
    wait: bool = True  # False (--no-wait): fail at once if another process is running this stage


def run_stage(planner: Planner, module, plan: Plan, options: RunOptions = RunOptions(),
              force: bool = False, log: Callable[[str], None] | None = None,
              hint_args: str = "") -> tuple[Manifest, bool]:
    """Run a stage module (``sppcli.stages.<name>``, or its full name) for ``plan``.

    A stage module exposes ``Params``, ``params_from(config)``, an ``Inputs`` dataclass,
    ``inputs_for(planner, plan, upstream, options)`` and ``run(params, inputs, out)``. Given by
    name, it is imported only if the stage has to run, so an up-to-date check never pays for
    importing torch.
    """

    def _run(upstream, out):
        import importlib

        stage = importlib.import_module(module) if isinstance(module, str) else module
        inputs = stage.inputs_for(planner, plan, upstream, options)
        return stage.run(stage.params_from(planner.config), inputs, out)

    return execute(planner, plan, _run, force=force, log=log, wait=options.wait, hint_args=hint_args)


# The rows of the paper's Table 6, as config overrides on top of a pipeline config.
VARIANTS: dict[str, tuple[str, ...]] = {
    "pool5": ("svm.layer=\"pool5\"", "svm.finetuned=false", "detect.bbox_reg=false"),
    "fc6": ("svm.layer=\"fc6\"", "svm.finetuned=false", "detect.bbox_reg=false"),
    "ftfc6": ("svm.layer=\"fc6\"", "svm.finetuned=true", "detect.bbox_reg=false"),
    "ftfc7": ("svm.layer=\"fc7\"", "svm.finetuned=true", "detect.bbox_reg=false"),
    "ftfc7bb": ("svm.layer=\"fc7\"", "svm.finetuned=true", "detect.bbox_reg=true"),
}
VARIANT_LABELS = {"pool5": "pool5", "fc6": "fc6", "ftfc6": "ftfc6", "ftfc7": "ftfc7", "ftfc7bb": "ftfc7 bb"}
