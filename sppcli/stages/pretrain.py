"""`sppcli pretrain`: train an SPP-net classifier (paper sections 2.3 and 3.1).

Trunk + SPP layer + fc6/fc7 (dropout) + a K-way fc8 with softmax, trained from scratch on object
crops of the dataset's train split (or on an image folder, one sub-folder per class); see
:mod:`sppcli.data.crops` for the samples and the views.

* Single-size (``sizes = [224]``) or multi-size (``sizes = [224, 180]``) training: epoch ``e``
  trains at ``sizes[e % len(sizes)]``, one full epoch per size, all weights shared; the smaller
  inputs are the largest size's crops *resized*, not smaller crops.
* SGD with momentum and weight decay; the learning rate is divided by 10 when the held-out
  top-1 error (centre crop at ``sizes[0]``) has not improved for ``lr_patience`` epochs;
  training stops when the rate falls below ``min_lr`` or after ``epochs`` epochs.
* Resumable per epoch: ``train_state.pt`` (model, optimizer, schedule, RNG states, history) is
  replaced atomically after every epoch; a rerun continues from the last finished epoch and, on
  the CPU with ``--workers 0/1``, ends with the same weights as an uninterrupted run.

Outputs in the run directory: ``model.pt`` (an sppcli checkpoint: arch, class names, weights),
``train_state.pt``, ``eval.json``. Metrics: ``checkpoint``, ``classes``, ``arch``, ``history``,
``train_seconds`` and ``eval_table``: held-out top-1 error of one centre crop, the full image
(SPP's full view), and 10 views (the analog of the paper's Table 2 and Table 1's 10-view test).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from sppcli.data import crops
from sppcli.artifacts import Manifest, StageRun, atomic_path, atomic_write_json
from sppcli.config import Config, NetParams, PretrainParams
from sppcli.nets import build_net, normalize, save_checkpoint
from sppcli.nets.sppnet import SppNet
from sppcli.parallel import progress, resolve_device, worker_errors_unwrapped

log = logging.getLogger(__name__)

CHECKPOINT = "model.pt"
TRAIN_STATE = "train_state.pt"
EVAL_JSON = "eval.json"
STATE_FORMAT = 1

#: Rows of the evaluation table, in print order: view name -> how the view is made.
EVAL_VIEWS = ("1 centre crop", "1 full image", "10 views")


@dataclasses.dataclass(frozen=True)
class Params:
    net: NetParams
    pretrain: PretrainParams


def params_from(config: Config) -> Params:
    return Params(net=config.net, pretrain=config.pretrain)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """dataset: the train split (source "crops"); folder: the image folder (source "folder")."""

    dataset: Any | None
    folder: Path | None
    device: str
    workers: int


def inputs_for(planner, plan, upstream: dict[str, Manifest], options) -> Inputs:
    source = planner.config.pretrain.source
    if source == "crops":
        return Inputs(dataset=planner.dataset(plan.split), folder=None, device=resolve_device(options.device),
                      workers=options.workers)
    if source == "folder":
        return Inputs(dataset=None, folder=Path(planner.config.pretrain.folder),
                      device=resolve_device(options.device), workers=options.workers)
    raise ValueError(f"pretrain.source = {source!r}; use 'crops' or 'folder'")


def arch_for(net: NetParams, num_classes: int) -> dict:
    """The :func:`sppcli.nets.build_net` arch of the classifier ``[net]`` describes."""
    return {"trunk": net.trunk, "width": float(net.width), "levels": [int(n) for n in net.levels],
            "hidden": int(net.hidden), "num_classes": int(num_classes), "dropout": float(net.dropout)}


# ---------------------------------------------------------------------------------------------
# learning-rate schedule


class PlateauSchedule:
    """lr / 10 after ``patience`` epochs in a row without a new best held-out error.

    ``state_dict()`` holds primitives only (a weights_only checkpoint can carry it).
    """

    def __init__(self, lr: float, patience: int, min_lr: float):
        if patience < 1:
            raise ValueError(f"lr_patience must be >= 1, got {patience}")
        self.lr = float(lr)
        self.patience = int(patience)
        self.min_lr = float(min_lr)
        self.best = math.inf
        self.bad_epochs = 0

    @property
    def finished(self) -> bool:
        return self.lr < self.min_lr

    def step(self, error: float) -> bool:
        """Record one epoch's held-out error; True if the rate was just divided by 10."""
        if error < self.best:
            self.best, self.bad_epochs = float(error), 0
            return False
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.lr /= 10.0
            self.bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.best, self.bad_epochs = float(state["lr"]), float(state["best"]), int(state["bad_epochs"])


# ---------------------------------------------------------------------------------------------
# RNG states as tensors (weights_only checkpoints hold tensors and primitives only)


def rng_state(device: str) -> dict:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_kind": str(np_kind),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "python_version": int(py_version),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_gauss": py_gauss,
    }
    if device.startswith("cuda"):
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict, device: str) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state((state["numpy_kind"], state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_internal"].tolist()),
                     state["python_gauss"]))
    if device.startswith("cuda") and "cuda" in state and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# ---------------------------------------------------------------------------------------------
# evaluation views


class EvalViews(Dataset):
    """Held-out views: ``mode`` "crop" -> uint8 [3, s, s]; "ten" -> [10, 3, s, s];
    "full" -> [3, H, W] with min(H, W) = round(s * 256 / 224) (varying sizes: batch size 1)."""

    def __init__(self, samples: Sequence[crops.Sample], size: int, mode: str):
        self.samples, self.size, self.mode = list(samples), int(size), mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = crops.load_sample(sample)
        if self.mode == "crop":
            view = crops.centre_view(image, self.size)
        elif self.mode == "ten":
            view = crops.ten_views(image, self.size)
        elif self.mode == "full":
            view = crops.full_view(image, self.size)
        else:
            raise ValueError(f"unknown view mode {self.mode!r}")
        return crops.to_chw(view), sample.label


@torch.no_grad()
def predict(net: SppNet, samples: Sequence[crops.Sample], size: int, mode: str, device: str, workers: int,
            batch_size: int) -> np.ndarray:
    """float32 ``[N, K]`` softmax probabilities of the held-out ``samples`` (``mode`` as in
    :class:`EvalViews`; "ten" averages the 10 views' probabilities)."""
    net.eval()
    if not samples:
        return np.zeros((0, net.head.num_outputs or 0), dtype=np.float32)
    loader = DataLoader(EvalViews(samples, size, mode), batch_size=1 if mode == "full" else batch_size,
                        shuffle=False, num_workers=_loader_workers(workers))
    out = []
    for views, _labels in worker_errors_unwrapped(loader):
        views = views.to(device)
        if mode == "ten":
            b = views.shape[0]
            probs = F.softmax(net(normalize(views.flatten(0, 1))), dim=1).view(b, 10, -1).mean(dim=1)
        else:
            probs = F.softmax(net(normalize(views)), dim=1)
        out.append(probs.float().cpu())
    return torch.cat(out).numpy()


def top1_error(probs: np.ndarray, labels: Sequence[int]) -> float:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return float("nan")
    return float(np.mean(np.argmax(probs, axis=1) != labels))


def evaluate_views(net: SppNet, samples: Sequence[crops.Sample], size: int, device: str, workers: int,
                   batch_size: int) -> dict:
    """The evaluation table: held-out top-1 error of each of :data:`EVAL_VIEWS` at ``size``."""
    labels = [s.label for s in samples]
    modes = {"1 centre crop": "crop", "1 full image": "full", "10 views": "ten"}
    # JSON has no NaN: without held-out samples every entry is null.
    errors = {view: top1_error(predict(net, samples, size, modes[view], device, workers, batch_size), labels)
              if samples else None for view in EVAL_VIEWS}
    return {"size": int(size), "n_images": len(samples), "top1_error": errors}


def format_eval_table(metrics: dict) -> str:
    """The held-out evaluation table of a pretrain manifest's ``metrics`` as text (Table 2 analog)."""
    table = metrics.get("eval_table") or {}
    errors = table.get("top1_error") or {}
    sizes = metrics.get("sizes") or []
    trained = "multi-size" if len(sizes) > 1 else "single-size"
    lines = [f"held-out top-1 error, {table.get('n_images', 0)} images, test size {table.get('size', '?')} "
             f"({trained} trained, sizes {list(sizes)})",
             f"{'test view':<16} {'top-1 err':>9}"]
    for view in EVAL_VIEWS:
        value = errors.get(view)
        text = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"
        lines.append(f"{view:<16} {text:>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# training


def _loader_workers(workers: int) -> int:
    # --workers 1 means "this process" everywhere in sppcli; a loader with 1 worker would add a
    # process without adding parallelism.
    return 0 if workers <= 1 else int(workers)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s shuffle, independent of any global RNG."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def train_one_epoch(net: SppNet, optimizer: torch.optim.Optimizer, data: crops.TrainCrops, epoch: int, size: int,
                    batch_size: int, seed: int, device: str, workers: int) -> dict:
    """One pass over ``data`` at ``size``; returns {"loss": mean loss, "train_error": top-1 error}."""
    net.train()
    data.set_epoch(epoch, size)
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator,
                        num_workers=_loader_workers(workers), pin_memory=device.startswith("cuda"))
    total_loss, wrong, seen = 0.0, 0, 0
    # Only worker processes wrap errors; iterating the loader itself in-process keeps the
    # training order (and the demo's pretrained net) exactly what it was before the wrapper.
    batches = worker_errors_unwrapped(loader) if loader.num_workers else loader
    bar = progress(batches, total=len(loader), desc=f"pretrain epoch {epoch + 1} @{size}", unit="batch")
    for views, labels in bar:
        views = normalize(views.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        logits = net(views)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.shape[0]
        total_loss += float(loss.detach()) * n
        wrong += int((logits.detach().argmax(dim=1) != labels).sum())
        seen += n
    if not math.isfinite(total_loss):
        raise FloatingPointError(f"pretrain epoch {epoch + 1}: the loss diverged; lower pretrain.lr (now "
                                 f"{optimizer.param_groups[0]['lr']})")
    return {"loss": total_loss / max(seen, 1), "train_error": wrong / max(seen, 1)}


def save_train_state(path: Path, net: SppNet, optimizer, schedule: PlateauSchedule, epoch: int,
                     history: list[dict], device: str) -> None:
    """Atomically replace ``path`` with everything a resumed run needs after ``epoch`` epochs."""
    state = {
        "format": STATE_FORMAT,
        "epoch": int(epoch),
        "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": rng_state(device),
        "history": history,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: training state format {state.get('format')!r}, expected {STATE_FORMAT}")
    return state


def training_samples(params: Params, inputs: Inputs) -> tuple[list[crops.Sample], tuple[str, ...]]:
    p = params.pretrain
    if p.source == "crops":
        if inputs.dataset is None:
            raise ValueError("pretrain.source = 'crops' needs a dataset")
        return crops.voc_crop_samples(inputs.dataset, p.crop_context), tuple(inputs.dataset.classes)
    if p.source == "folder":
        if inputs.folder is None or not str(inputs.folder):
            raise ValueError("pretrain.source = 'folder' needs pretrain.folder = <folder with one sub-folder per class>")
        return crops.folder_samples(inputs.folder)
    raise ValueError(f"pretrain.source = {p.source!r}; use 'crops' or 'folder'")


@dataclasses.dataclass
class Training:
    """What training carries from epoch to epoch (and through ``train_state.pt`` across runs)."""

    net: SppNet
    optimizer: torch.optim.Optimizer
    schedule: PlateauSchedule
    history: list[dict]
    next_epoch: int


def start_or_resume(arch: dict, p: PretrainParams, state_path: Path, device: str) -> Training:
    """A fresh net seeded with ``p.seed``, or the state a previous run left after its last epoch."""
    torch.manual_seed(p.seed)
    net = build_net(arch).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    training = Training(net, optimizer, PlateauSchedule(p.lr, p.lr_patience, p.min_lr), [], 0)
    if state_path.exists():
        state = load_train_state(state_path)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        training.schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"], device)
        training.history = list(state["history"])
        training.next_epoch = int(state["epoch"])
        log.info("pretrain: resuming after epoch %d of %d", training.next_epoch, p.epochs)
    return training


def train_epochs(training: Training, data: crops.TrainCrops, monitored: Sequence[crops.Sample], sizes: Sequence[int],
                 p: PretrainParams, state_path: Path, device: str, workers: int) -> None:
    """Epochs until ``p.epochs`` or the schedule's end; the state is saved after each one.

    Epoch ``e`` trains at ``sizes[e % len(sizes)]``; the held-out error that drives the
    schedule is measured on ``monitored`` with a centre crop at ``sizes[0]``.
    """
    batch_size = max(1, p.batch_size)
    net, optimizer, schedule = training.net, training.optimizer, training.schedule
    for epoch in range(training.next_epoch, p.epochs):
        if schedule.finished:
            break
        size = sizes[epoch % len(sizes)]
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr
        t0 = time.perf_counter()
        stats = train_one_epoch(net, optimizer, data, epoch, size, batch_size, p.seed, device, workers)
        held_error = top1_error(predict(net, monitored, sizes[0], "crop", device, workers, batch_size),
                                [s.label for s in monitored])
        record = {"epoch": epoch + 1, "size": size, "lr": schedule.lr, "loss": stats["loss"],
                  "train_error": stats["train_error"], "heldout_error": held_error,
                  "seconds": round(time.perf_counter() - t0, 3)}
        training.history.append(record)
        schedule.step(held_error)
        log.info("pretrain epoch %d/%d size %d: loss %.4f, train err %.1f%%, held-out err %.1f%%, lr %g, %.1fs",
                 epoch + 1, p.epochs, size, stats["loss"], 100 * stats["train_error"], 100 * held_error,
                 record["lr"], record["seconds"])
        training.next_epoch = epoch + 1
        save_train_state(state_path, net, optimizer, schedule, epoch + 1, training.history, device)


def run(params: Params, inputs: Inputs, out: StageRun) -> Manifest:
    p = params.pretrain
    sizes = [int(s) for s in p.sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"pretrain.sizes must list positive sizes, got {p.sizes!r}")
    device = inputs.device
    samples, classes = training_samples(params, inputs)
    if not samples:
        raise ValueError("pretrain: no training samples (no non-difficult objects of the dataset's classes)")
    train, held = crops.holdout_split(samples, p.holdout_fraction, p.seed)
    num_classes = len(classes)
    arch = arch_for(params.net, num_classes)
    log.info("pretrain: %d classes, %d training / %d held-out samples, sizes %s, device %s",
             num_classes, len(train), len(held), sizes, device)
    if not held:
        log.warning("pretrain: holdout_fraction gave no held-out samples; the schedule watches the training "
                    "error and the evaluation table is empty")

    state_path = out.dir / TRAIN_STATE
    training = start_or_resume(arch, p, state_path, device)
    out.track_progress(lambda: (training.next_epoch, p.epochs), "epochs")  # what Ctrl-C reports
    data = crops.TrainCrops(train, base=max(sizes), seed=p.seed, jitter=p.jitter)
    train_epochs(training, data, held if held else train, sizes, p, state_path, device, inputs.workers)

    t0 = time.perf_counter()
    table = evaluate_views(training.net, held, sizes[0], device, inputs.workers, max(1, p.batch_size))
    eval_seconds = time.perf_counter() - t0
    save_checkpoint(out.dir / CHECKPOINT, training.net.to("cpu").eval(), arch,
                    {"classes": list(classes), "sizes": sizes, "eval_table": table, "source": p.source})
    history = training.history
    train_seconds = float(sum(h["seconds"] for h in history))
    metrics = {
        "checkpoint": CHECKPOINT,
        "classes": list(classes),
        "arch": arch,
        "sizes": sizes,
        "n_train": len(train),
        "n_heldout": len(held),
        "train_class_counts": crops.class_counts(train, num_classes),
        "epochs_run": len(history),
        "stopped": "min_lr" if training.schedule.finished else "epochs",
        "final_lr": training.schedule.lr,
        "history": history,
        "train_seconds": round(train_seconds, 3),
        "eval_table": table,
    }
    atomic_write_json(out.dir / EVAL_JSON, {"eval_table": table, "history": history})
    return out.finish(metrics=metrics, timings={"train_seconds": round(train_seconds, 3),
                                                "eval_seconds": round(eval_seconds, 3)},
                      n_items=len(samples), device=device)
