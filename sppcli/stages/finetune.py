"""Stage "finetune": fc6, fc7 and a new (K+1)-way fc8 fine-tuned on pooled windows (paper 4.1).

As in the paper (following R-CNN), only the fully-connected layers are fine-tuned: the data are
the fixed-length pooled conv5 vectors of the pool stage. fc6 and fc7 start from the net of the
features artifact; fc8 is new, ``K + 1`` outputs (class 0 = background) initialised
N(0, ``fc8_std``^2) with zero bias. Windows with max IoU in ``[fg_iou, 1]`` are positives
labelled with the class of their max IoU (ground-truth windows included); windows with max IoU
in ``[bg_iou_low, fg_iou)`` are background. Each mini-batch holds ``fg_fraction`` positives
(:class:`sppcli.detector.windows.FinetuneSampler`). SGD with momentum and weight decay, dropout
after fc6 and fc7, ``lr`` for ``lr_step`` mini-batches and ``lr / 10`` after, ``iterations``
mini-batches in all. Biases learn at twice the rate and without weight decay, as in the
authors' Caffe definitions (``blobs_lr: 1, 2``; ``weight_decay: 1, 0``).

Augmentations (``random_scale``, ``flip``; both on in pipelines/voc2007.toml, as the release's
``spp_finetune_voc.m`` and ``Script_spp_voc.m`` run): each sampled window is pooled at a scale
drawn uniformly from all of them, and the horizontally flipped training images join the
originals, their windows pooled from the conv5 maps of the flipped images themselves (the
features stage extracts them when fine-tuning asks; :class:`SplitGeometry` maps a mirrored
window onto them).

Memory: only the selected windows' (image, row, label, scale, cells, box), about 43 bytes each,
are held for the whole split (:class:`~sppcli.detector.windows.WindowSet`; ~120 MB for VOC
2007's ~2.8M fine-tuning windows). Their pooled vectors
(:class:`~sppcli.detector.pooled_features.PooledFeatures`) are made all at once when they fit in
``max_cache_bytes`` (the demo), otherwise per chunk of up to 500 mini-batches (the release's data
load), grouped by image so each image's conv5 map is read once per chunk, with the next chunk
made in a background thread while the current one trains: two chunks of at most
``max_cache_bytes / 2`` each, plus ``map_cache_bytes`` of maps kept in memory (the whole split's
when they fit). Both ways give the same result.

Resuming: every ``checkpoint_every`` mini-batches the head's weights, the optimizer state and the
statistics so far are written atomically to ``resume.pt`` in the run directory (a dict of
tensors and plain values, read with ``torch.load(weights_only=True)``). Mini-batch ``i`` and its
dropout masks are drawn from generators seeded with ``(seed, i)``, so the iteration number is
the whole sampler state: a run killed at any point and restarted produces bit-for-bit (on the
same device and library versions) the weights of an uninterrupted run.

Output: ``fc.pt``, an sppcli net checkpoint (:func:`sppcli.nets.checkpoint.save_checkpoint`) of
the whole net (trunk unchanged, fine-tuned fc6/fc7, the new fc8 with ``K + 1`` outputs), fc6 in
the net's own pyramid order, so :func:`sppcli.nets.net_source.load_net` and
:func:`~sppcli.nets.heads.detection_head` serve it like any other net. ``metrics["net"]``
describes it in the features manifest's format.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sppcli.artifacts import Manifest, StageRun, atomic_path
from sppcli.config import Config, FinetuneParams
from sppcli.nets.heads import detection_head, pooled_permutation
from sppcli.nets.net_source import load_net_for_features
from sppcli.nets.checkpoint import arch_of, save_checkpoint
from sppcli.nets.heads import FcHead
from sppcli.ops.geometry import FieldGeometry, window_to_cells
from sppcli.parallel import map_images, progress, resolve_device, single_torch_thread
from sppcli.stages.features import read_feature_item
from sppcli.stages.pool import geometry_of, pooled_features_of
from sppcli.detector.pooled_features import PooledFeatures
from sppcli.detector.windows import (
    FinetuneSampler,
    WindowSet,
    finetune_selection,
    read_pool_windows,
)

Params = FinetuneParams
log = logging.getLogger(__name__)

OUTPUT = "fc.pt"
RESUME = "resume.pt"
RESUME_FORMAT = "sppcli-finetune-resume"
RESUME_VERSION = 1
DEFAULT_MAX_CACHE_BYTES = 2 << 30
DEFAULT_MAP_CACHE_BYTES = 6 << 30  # VOC 2007 trainval at one scale: ~6.0 GB of float16 maps
# Mini-batches per request to the feature reader when every row is in memory: large enough to
# keep the prefetch thread useful, small enough that the gathered copy stays small.
IN_MEMORY_CHUNK = 8
STREAMING_CHUNK_LIMIT = 500  # the SPP release prepares 500 mini-batches per data load
BACKGROUND = "__background__"


def params_from(config: Config) -> FinetuneParams:
    return config.finetune


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The training split's pool items, the net whose fc layers start the fine-tuning, and
    how to run.

    Attributes:
        pool: the pool manifest of the training split.
        features: the features manifest (``metrics["net"]`` names the net).
        image_ids: the training images, in dataset order.
        classes: class names, label order (fc8 output ``k + 1`` is ``classes[k]``).
        device: ``cpu`` or ``cuda[:N]``.
        max_cache_bytes: memory the selected windows' pooled vectors may take (streaming keeps
            two chunks within it).
        map_cache_bytes: memory the conv5 maps kept between chunks may take.
    """

    pool: Manifest
    features: Manifest
    image_ids: tuple[str, ...]
    classes: tuple[str, ...]
    device: str = "cpu"
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES
    map_cache_bytes: int = DEFAULT_MAP_CACHE_BYTES
    workers: int = 1
    scheduler: str | None = None


def inputs_for(planner, plan, upstream: Mapping[str, Manifest], options) -> Inputs:
    dataset = planner.dataset(plan.split)
    pool = upstream["pool"]
    return Inputs(pool=pool, features=upstream["features"], image_ids=tuple(dataset.ids),
                  classes=tuple(pool.metrics.get("classes") or dataset.classes),
                  device=resolve_device(options.device), max_cache_bytes=DEFAULT_MAX_CACHE_BYTES,
                  map_cache_bytes=DEFAULT_MAP_CACHE_BYTES,
                  workers=options.workers, scheduler=options.scheduler)


def check_params(params: FinetuneParams) -> None:
    """Raise ValueError naming the bad field and what it accepts."""
    if params.iterations < 1:
        raise ValueError(f"finetune.iterations must be >= 1, got {params.iterations}")
    if params.lr_step < 0:
        raise ValueError(f"finetune.lr_step must be >= 0, got {params.lr_step}")
    if params.batch_size < 1:
        raise ValueError(f"finetune.batch_size must be >= 1, got {params.batch_size}")
    if not 0.0 <= params.fg_fraction <= 1.0:
        raise ValueError(f"finetune.fg_fraction must be in [0, 1], got {params.fg_fraction}")
    if not 0.0 <= params.bg_iou_low < params.fg_iou <= 1.0:
        raise ValueError(f"finetune needs 0 <= bg_iou_low < fg_iou <= 1, got bg_iou_low={params.bg_iou_low}, "
                         f"fg_iou={params.fg_iou}")
    if params.checkpoint_every < 1:
        raise ValueError(f"finetune.checkpoint_every must be >= 1, got {params.checkpoint_every}")
    if params.lr <= 0 or params.momentum < 0 or params.weight_decay < 0 or params.fc8_std <= 0:
        raise ValueError("finetune.lr and fc8_std must be > 0, momentum and weight_decay >= 0")


# ---------------------------------------------------------------------------------------------
# window selection


def select_image(path: str, fg_iou: float, bg_iou_low: float, num_classes: int) -> tuple[tuple, tuple]:
    """Positive and negative windows of one pool item, each ``(rows, labels, scale_index,
    cells, boxes)`` (labels 1..K for positives, 0 for negatives); top level for process pools."""
    windows = read_pool_windows(Path(path))
    if len(windows) and windows.overlaps.shape[1] != num_classes:
        raise ValueError(f"{path}: overlaps has {windows.overlaps.shape[1]} classes, expected {num_classes}")
    fg, labels, bg = finetune_selection(windows.overlaps, fg_iou, bg_iou_low)
    return ((fg, labels, windows.scale_index[fg], windows.cells[fg], windows.boxes[fg]),
            (bg, np.zeros(len(bg), np.int16), windows.scale_index[bg], windows.cells[bg], windows.boxes[bg]))


def select_windows(paths: Sequence[str], params: FinetuneParams, num_classes: int, workers: int = 1,
                   scheduler: str | None = None) -> tuple[WindowSet, WindowSet]:
    """Positive and negative windows of the whole split (where they are, not their vectors)."""
    fn = functools.partial(select_image, fg_iou=params.fg_iou, bg_iou_low=params.bg_iou_low,
                           num_classes=num_classes)
    per_image = map_images(fn, list(paths), workers=workers, scheduler=scheduler, desc="finetune: select")
    positives = WindowSet.concat([(i, *fg) for i, (fg, _) in enumerate(per_image)])
    negatives = WindowSet.concat([(i, *bg) for i, (_, bg) in enumerate(per_image)])
    return positives, negatives


@dataclasses.dataclass(frozen=True, eq=False)
class SplitGeometry:
    """Where each image's windows land on its maps at every scale, for the augmentations.

    Attributes:
        widths: int ``[I]`` image widths (flipping mirrors ``x`` about them).
        factors: float ``[I, S]`` resize factor of each image at each scale.
        map_hw: int ``[I, S, 2]`` conv5 map height and width (the flipped image's are the same).
        field: the trunk's receptive-field geometry.
    """

    widths: np.ndarray
    factors: np.ndarray
    map_hw: np.ndarray
    field: FieldGeometry

    @classmethod
    def of(cls, features: Manifest, image_ids: Sequence[str]) -> "SplitGeometry":
        items = [read_feature_item(features.item_path(i), load_maps=False) for i in image_ids]
        return cls(widths=np.array([it.width for it in items], np.float64),
                   factors=np.array([it.scale_factors for it in items], np.float64).reshape(len(items), -1),
                   map_hw=np.array([[shape[1:] for shape in it.map_shapes] for it in items],
                                   np.int64).reshape(len(items), -1, 2),
                   field=geometry_of(features))

    @property
    def scales(self) -> int:
        return int(self.factors.shape[1])

    def cells(self, image: np.ndarray, boxes: np.ndarray, scale: np.ndarray, flip: np.ndarray) -> np.ndarray:
        """int32 ``[M, 4]`` cells of windows ``boxes`` of images ``image`` at ``scale``, on the
        flipped image's map where ``flip`` (its window is the box mirrored: ``x -> W - x``)."""
        boxes = np.asarray(boxes, np.float64).copy()
        width = self.widths[image]
        mirrored = np.stack([width - boxes[:, 2], width - boxes[:, 0]], axis=1)
        boxes[flip, 0], boxes[flip, 2] = mirrored[flip, 0], mirrored[flip, 1]
        scaled = torch.from_numpy(boxes * self.factors[image, scale][:, None])
        hw = torch.from_numpy(self.map_hw[image, scale])
        return window_to_cells(scaled, self.field, hw[:, 0], hw[:, 1]).numpy().astype(np.int32)


class SelectedFeatures:
    """Pooled vectors of the selected windows (positives, then negatives) by index.

    In memory when all of them fit in ``max_cache_bytes`` (made in one pass over the images;
    with the augmentations, every (window, flip, scale) they can ask for), otherwise made per
    request (:meth:`PooledFeatures.gather`). Both give the same rows.
    """

    def __init__(self, pooled: PooledFeatures, image_ids: Sequence[str], selected: WindowSet,
                 max_cache_bytes: int, geometry: SplitGeometry | None = None, flip: bool = False,
                 random_scale: bool = False, progress=None):
        self.pooled = pooled
        self.image_ids = list(image_ids)
        self.selected = selected
        self.geometry = geometry
        self.flips = 2 if flip else 1
        self.scale_choices = geometry.scales if random_scale else 1
        self.random_scale = random_scale
        self.row_bytes = pooled.row_bytes
        self.cache: np.ndarray | None = None
        variants = self.flips * self.scale_choices
        if variants * len(selected) * self.row_bytes <= max_cache_bytes:
            # Filled in place, variant by variant: concatenating per-variant parts would hold the
            # cache twice at its peak.
            count = len(selected)
            self.cache = np.empty((variants * count, pooled.dim), dtype=pooled.dtype)
            for f in range(self.flips):
                for s in range(self.scale_choices):
                    variant = f * self.scale_choices + s
                    self._make(np.arange(count), np.full(count, bool(f)), np.full(count, s if random_scale else -1),
                               progress, out=self.cache[variant * count:(variant + 1) * count])

    @property
    def in_memory(self) -> bool:
        return self.cache is not None

    def _make(self, indices: np.ndarray, flip: np.ndarray, scale: np.ndarray, progress=None,
              out: np.ndarray | None = None) -> np.ndarray:
        w = self.selected.take(indices)
        moved = flip | (scale >= 0)
        if not moved.any():
            return self.pooled.gather(self.image_ids, w.image, w.row, w.scale_index, w.cells, progress=progress,
                                      out=out)
        scale = np.where(scale >= 0, scale, w.scale_index).astype(np.int64)
        cells = w.cells.copy()
        cells[moved] = self.geometry.cells(w.image[moved], w.boxes[moved], scale[moved], flip[moved])
        return self.pooled.gather(self.image_ids, w.image, w.row, scale, cells, flip=flip, stored=False,
                                  progress=progress, out=out)

    def get(self, indices: np.ndarray, flip: np.ndarray | None = None, scale: np.ndarray | None = None
            ) -> np.ndarray:
        """Rows ``[len(indices), D]`` (storage dtype) of the selected windows ``indices``, on the
        flipped image where ``flip`` and at ``scale`` where it is >= 0 (else the chosen one)."""
        indices = np.asarray(indices, dtype=np.int64)
        flip = np.zeros(indices.size, bool) if flip is None else np.asarray(flip, bool)
        scale = np.full(indices.size, -1) if scale is None else np.asarray(scale, np.int64)
        if self.cache is None or (self.random_scale and (scale < 0).any()):  # a chosen scale was not cached
            return self._make(indices, flip, scale)
        variant = flip.astype(np.int64) * self.scale_choices + (scale if self.random_scale else 0)
        return self.cache[indices + len(self.selected) * variant]

    def chunk_batches(self, batch_rows: int, max_cache_bytes: int, limit: int = STREAMING_CHUNK_LIMIT) -> int:
        """How many mini-batches of ``batch_rows`` rows fit in ``max_cache_bytes`` (1 to ``limit``)."""
        return int(min(limit, max(1, max_cache_bytes // max(1, batch_rows * self.row_bytes))))


# ---------------------------------------------------------------------------------------------
# training


def make_optimizer(head: FcHead, params: FinetuneParams) -> torch.optim.SGD:
    """SGD with momentum; weights at ``lr`` with weight decay, biases at ``2 lr`` without."""
    weights = [p for name, p in head.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in head.named_parameters() if name.endswith("bias")]
    return torch.optim.SGD(
        [{"params": weights, "lr": params.lr, "weight_decay": params.weight_decay, "lr_mult": 1.0},
         {"params": biases, "lr": 2 * params.lr, "weight_decay": 0.0, "lr_mult": 2.0}],
        lr=params.lr, momentum=params.momentum)


def learning_rate(params: FinetuneParams, iteration: int) -> float:
    """Base learning rate of (0-based) mini-batch ``iteration``."""
    return params.lr if iteration < params.lr_step else params.lr / 10.0


def iteration_seed(seed: int, iteration: int) -> int:
    """Seed of mini-batch ``iteration``'s dropout masks (a 63-bit int)."""
    return int(np.random.SeedSequence([int(seed), int(iteration), 1]).generate_state(1, np.uint64)[0] >> 1)


def train_step(head: FcHead, optimizer: torch.optim.Optimizer, features: torch.Tensor,
               labels: torch.Tensor) -> np.ndarray:
    """One SGD step on a mini-batch; returns float64 ``[5]``: loss, correct positives,
    positives, correct negatives, negatives (before the step's update)."""
    logits = head(features)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        correct = logits.argmax(dim=1) == labels
        fg = labels > 0
        counts = torch.stack([correct[fg].sum(), fg.sum(), correct[~fg].sum(), (~fg).sum()])
    return np.concatenate([[float(loss.detach())], counts.cpu().numpy().astype(np.float64)])


def _rng_devices(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


def save_resume(path: Path, iteration: int, head: FcHead, optimizer: torch.optim.Optimizer,
                stats: np.ndarray, key: str) -> None:
    """Atomically write the state after ``iteration`` mini-batches (weights_only loadable)."""
    payload = {
        "format": RESUME_FORMAT,
        "format_version": RESUME_VERSION,
        "key": key,
        "iteration": int(iteration),
        "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "optimizer": _to_cpu(optimizer.state_dict()),
        "stats": torch.from_numpy(np.ascontiguousarray(stats[:iteration])),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def load_resume(path: Path, key: str, head: FcHead, optimizer: torch.optim.Optimizer,
                stats: np.ndarray) -> int:
    """Restore a :func:`save_resume` state into ``head``/``optimizer``/``stats``; returns the
    iteration to continue from (0 when there is no usable state)."""
    if not path.exists():
        return 0
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated file cannot exist (atomic writes), but be safe
        log.warning("finetune: ignoring unreadable %s (%s); starting over", path, error)
        return 0
    if payload.get("format") != RESUME_FORMAT or payload.get("format_version") != RESUME_VERSION \
            or payload.get("key") != key:
        log.warning("finetune: %s belongs to another run; starting over", path)
        return 0
    iteration = int(payload["iteration"])
    if iteration > len(stats):
        log.warning("finetune: %s is past this run's %d iterations; starting over", path, len(stats))
        return 0
    head.load_state_dict(payload["head"])
    optimizer.load_state_dict(payload["optimizer"])
    stats[:iteration] = payload["stats"].numpy()
    return iteration


def _chunk(sampler: FinetuneSampler, reader: SelectedFeatures, n_positive: int, start: int, stop: int):
    """The mini-batches ``start..stop-1`` and their features, read in one request."""
    batches = [sampler.batch(i) for i in range(start, stop)]
    index = np.concatenate([np.concatenate([b.fg, n_positive + b.bg]) for b in batches])
    return batches, reader.get(index, np.concatenate([b.flip for b in batches]),
                               np.concatenate([b.scale for b in batches]))


def train(head: FcHead, reader: SelectedFeatures, sampler: FinetuneSampler, params: FinetuneParams,
          device: torch.device, resume_path: Path, key: str, max_cache_bytes: int
          ) -> tuple[np.ndarray, int]:
    """Run (or finish) the ``params.iterations`` mini-batches; returns (stats ``[iterations, 5]``
    as :func:`train_step` rows, the iteration this call started from)."""
    optimizer = make_optimizer(head, params)
    stats = np.zeros((params.iterations, 5), dtype=np.float64)
    start = load_resume(resume_path, key, head, optimizer, stats)
    if start:
        log.info("finetune: resuming after %d of %d mini-batches", start, params.iterations)
    if start >= params.iterations:
        return stats, start
    if reader.in_memory:
        chunk = IN_MEMORY_CHUNK
    else:
        # two chunks in flight: the one training and the one being read
        chunk = reader.chunk_batches(params.batch_size, max_cache_bytes // 2, limit=STREAMING_CHUNK_LIMIT)
    n_positive = len(sampler.positives)
    head.train()
    bar = progress(range(start, params.iterations), total=params.iterations - start, desc="finetune", unit="batch")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        def submit(begin: int):
            if begin >= params.iterations:
                return None
            return pool.submit(_chunk, sampler, reader, n_positive, begin, min(begin + chunk, params.iterations))

        pending = submit(start)
        begin = start
        while pending is not None:
            batches, features = pending.result()
            pending = submit(begin + len(batches))
            offset = 0
            for batch in batches:
                iteration = begin
                rows = len(batch.labels)
                x = torch.from_numpy(features[offset:offset + rows]).to(device, dtype=torch.float32)
                y = torch.from_numpy(batch.labels).to(device)
                offset += rows
                lr = learning_rate(params, iteration)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_mult"]
                with torch.random.fork_rng(devices=_rng_devices(device)):
                    torch.manual_seed(iteration_seed(params.seed, iteration))
                    stats[iteration] = train_step(head, optimizer, x, y)
                begin += 1
                next(bar, None)
                done = iteration + 1
                if done % params.checkpoint_every == 0 and done < params.iterations:
                    save_resume(resume_path, done, head, optimizer, stats, key)
    head.eval()
    return stats, start


# ---------------------------------------------------------------------------------------------
# metrics


def summarize(stats: np.ndarray, params: FinetuneParams) -> dict[str, Any]:
    """Loss and accuracy over the first / last stretch of mini-batches, and a short history."""
    n = len(stats)
    window = max(1, min(100, n // 10))

    def block(rows: np.ndarray) -> dict[str, float | None]:
        fg_n, bg_n = rows[:, 2].sum(), rows[:, 4].sum()
        return {"loss": float(rows[:, 0].mean()),
                "fg_accuracy": float(rows[:, 1].sum() / fg_n) if fg_n else None,
                "bg_accuracy": float(rows[:, 3].sum() / bg_n) if bg_n else None}

    first, last = block(stats[:window]), block(stats[-window:])
    step = max(1, math.ceil(n / 20))
    history = [{"iteration": min(s + step, n), "lr": learning_rate(params, s), **block(stats[s:s + step])}
               for s in range(0, n, step)]
    return {"initial_loss": first["loss"], "final_loss": last["loss"],
            "train_accuracy_fg": last["fg_accuracy"], "train_accuracy_bg": last["bg_accuracy"],
            "stats_window": window, "history": history}


# ---------------------------------------------------------------------------------------------
# the stage


def finetuned_net(net, head: FcHead, pool_levels: Sequence[int]):
    """``net`` with ``head`` (trained on vectors in ``pool_levels`` order) as its head, fc6
    columns put back into the net's own pyramid order."""
    perm = torch.from_numpy(pooled_permutation(net.levels, pool_levels, net.trunk.out_channels))
    with torch.random.fork_rng(devices=[]):  # its initial values are overwritten below
        net.head.new_fc8(head.fc8.out_features)
    with torch.no_grad():
        net.head.fc6.weight[:, perm.to(net.head.fc6.weight.device)] = head.fc6.weight.to(net.head.fc6.weight.device)
        for name in ("fc6.bias", "fc7.weight", "fc7.bias", "fc8.weight", "fc8.bias"):
            layer, param = name.split(".")
            getattr(getattr(net.head, layer), param).copy_(getattr(getattr(head, layer), param))
    return net


def train_on_pool_items(head: FcHead, pooled: PooledFeatures, image_ids: Sequence[str], positives: WindowSet,
                        negatives: WindowSet, sampler: FinetuneSampler, params: FinetuneParams, device: torch.device,
                        out: StageRun, max_cache_bytes: int, geometry: SplitGeometry | None = None
                        ) -> tuple[np.ndarray, int, dict[str, Any]]:
    """:func:`train` on the selected windows' pooled vectors.

    Returns (stats, the iteration this run started from, ``{"in_memory", "cache_seconds",
    "train_seconds", "map_reads", "map_cache_bytes", "feature_cache_bytes"}``).
    """
    t_read = time.perf_counter()
    selected = WindowSet.join(positives, negatives)
    reader = SelectedFeatures(pooled, image_ids, selected, max_cache_bytes, geometry, params.flip, params.random_scale,
                              progress=lambda it, total: progress(it, total=total, desc="finetune: cache"))
    if reader.in_memory:
        log.info("finetune: %d windows' features in memory (%.1f MB)", len(selected),
                 len(selected) * reader.row_bytes / 1e6)
    else:
        log.info("finetune: %.1f GB of selected features exceed max_cache_bytes; pooling them per chunk of "
                 "mini-batches", len(selected) * reader.row_bytes / 1e9)
    cache_seconds = time.perf_counter() - t_read
    # What the pooled vectors hold at most: all of them, or the two chunks in flight.
    feature_cache_bytes = (reader.cache.nbytes if reader.in_memory else
                           2 * reader.chunk_batches(params.batch_size, max_cache_bytes // 2) * params.batch_size
                           * reader.row_bytes)
    t_train = time.perf_counter()
    stats, resumed_from = train(head, reader, sampler, params, device, out.dir / RESUME, out.key, max_cache_bytes)
    return stats, resumed_from, {"in_memory": reader.in_memory, "cache_seconds": cache_seconds,
                                 "train_seconds": time.perf_counter() - t_train, "map_reads": pooled.maps.reads,
                                 "map_cache_bytes": pooled.maps.bytes, "feature_cache_bytes": feature_cache_bytes}


@single_torch_thread()  # small matrix work: a second OpenMP thread only waits on a busy core
def run(params: FinetuneParams, inputs: Inputs, out: StageRun) -> Manifest:
    check_params(params)
    started = time.perf_counter()
    device = torch.device(inputs.device)
    classes = list(inputs.classes)
    pool_levels = [int(n) for n in inputs.pool.metrics["levels"]]
    paths = [str(inputs.pool.item_path(i)) for i in inputs.image_ids]

    positives, negatives = select_windows(paths, params, len(classes), inputs.workers, inputs.scheduler)
    geometry = SplitGeometry.of(inputs.features, inputs.image_ids) if params.flip or params.random_scale else None
    sampler = FinetuneSampler(positives, negatives, params.batch_size, params.fg_fraction, params.seed,
                              flip=params.flip, random_scales=geometry.scales if params.random_scale else 0)
    if len(positives) == 0 or len(negatives) == 0:
        log.warning("finetune: %d positive and %d negative windows; every mini-batch is all %s",
                    len(positives), len(negatives), "negatives" if len(positives) == 0 else "positives")
    log.info("finetune: %d positive, %d negative windows in %d images; %d + %d per mini-batch",
             len(positives), len(negatives), len(paths), sampler.n_fg, sampler.n_bg)
    select_seconds = time.perf_counter() - started

    net, _ = load_net_for_features(inputs.features, map_location="cpu")
    head = detection_head(net, pool_levels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        head.new_fc8(len(classes) + 1, std=params.fc8_std)
    head.to(device)
    pooled = pooled_features_of(inputs.pool, inputs.features, map_cache_bytes=inputs.map_cache_bytes)
    stats, resumed_from, reading = train_on_pool_items(head, pooled, inputs.image_ids, positives, negatives, sampler,
                                                       params, device, out, inputs.max_cache_bytes, geometry)

    net = finetuned_net(net, head.cpu(), pool_levels)
    arch = arch_of(net)
    save_checkpoint(out.dir / OUTPUT, net, arch, extra={
        "stage": "finetune", "labels": [BACKGROUND] + classes, "pool_levels": pool_levels,
        "initialised_from": inputs.features.metrics["net"]["path"]})
    (out.dir / RESUME).unlink(missing_ok=True)

    record = dict(inputs.features.metrics["net"])
    record.update({"source": "finetune", "path": str((out.dir / OUTPUT).resolve()), "arch": arch})
    summary = summarize(stats, params)
    trained_now = params.iterations - resumed_from
    metrics = {
        **summary,
        "iterations": params.iterations,
        "resumed_from": resumed_from,
        "positive_windows": len(positives),
        "negative_windows": len(negatives),
        "positives_per_batch": sampler.n_fg,
        "negatives_per_batch": sampler.n_bg,
        "features_in_memory": reading["in_memory"],
        "random_scale": bool(params.random_scale),
        "flip": bool(params.flip),
        "map_reads": reading["map_reads"],
        "map_cache_bytes": reading["map_cache_bytes"],
        "feature_cache_bytes": int(reading["feature_cache_bytes"]),
        "classes": classes,
        "labels": [BACKGROUND] + classes,
        "checkpoint": OUTPUT,
        "net": record,
        "seconds": round(time.perf_counter() - started, 3),
        "seconds_per_iteration": reading["train_seconds"] / trained_now if trained_now else None,
    }
    log.info("finetune: loss %.4f -> %.4f; train accuracy fg %s bg %s", summary["initial_loss"],
             summary["final_loss"], _pct(summary["train_accuracy_fg"]), _pct(summary["train_accuracy_bg"]))
    return out.finish(metrics=metrics, timings={"select_seconds": round(select_seconds, 3),
                                                "cache_seconds": round(reading["cache_seconds"], 3),
                                                "train_seconds": round(reading["train_seconds"], 3)},
                      device=str(device))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
