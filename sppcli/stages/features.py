"""Stage "features": conv5 feature maps of whole images at one or more scales (paper section 4.1).

SPP-net runs the convolutional layers once per image (per scale), not once per window: every
image is resized so that ``min(w, h) = s`` for each ``s`` in ``features.scales`` (the longer side
capped at ``features.max_side``), and the trunk's conv5 map of the whole resized image is stored.
These maps are the detector's whole feature cache: every later stage pools the windows it needs
from them on the fly (:mod:`sppcli.detector.pooled_features`).

Pipeline: a torch ``DataLoader`` (``--workers`` processes) decodes and resizes images while the
one process that owns the net runs it; images go through the net one at a time (their sizes
differ, and padding them into a batch would change the maps near the borders). Resizing is
bilinear with antialiasing on uint8 RGB, then the net's own normalisation
(:func:`sppcli.nets.sppnet.normalize`).

Output: ``items/<id>.h5`` per image with ``conv5_<i>`` ``[C, H_i, W_i]`` (``features.dtype``)
for scale ``i`` (and ``conv5f_<i>`` of the horizontally flipped image when fine-tuning asks for
flips; written by :func:`write_map`: with ``features.storage = "sparse"`` a group of a
``mask`` of the non-zero values, ``np.packbits`` of the flattened map, the ``values`` in that order
and a ``shape`` attribute; read it with :func:`read_map`) and attributes ``width``, ``height`` (stored pixels of the original image),
``scales``, ``scale_factors`` (resize factor at each scale: box coordinates times the factor are
coordinates on the resized image), ``scaled_sizes`` (``[S, 2]`` of ``[w, h]``), and
``conv_seconds`` / ``decode_seconds`` (that image's timings). The manifest's ``metrics["net"]``
names the weights file and the trunk geometry (stride, offsets) that maps windows onto cells.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from sppcli.artifacts import Manifest, StageRun, atomic_path, item_means, open_item
from sppcli.config import STORAGE_DTYPES, Config, FeatureParams, NetParams
from sppcli.nets.net_source import NetSource, load_source, net_record, resolve_net_source
from sppcli.nets.sppnet import normalize
from sppcli.ops.geometry import scaled_size
from sppcli.parallel import progress, resolve_device, worker_errors_unwrapped

log = logging.getLogger(__name__)

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Params:
    net: NetParams
    features: FeatureParams


def params_from(config: Config) -> Params:
    return Params(net=config.net, features=config.features)


@dataclasses.dataclass(frozen=True)
class Inputs:
    """dataset: the split (a :class:`~sppcli.data.voc.VocDataset`); source: the weights file;
    workers: DataLoader processes decoding images; scheduler: a Dask cluster to run on instead;
    flip: also store the maps of the horizontally flipped image (fine-tuning's augmentation)."""

    dataset: Any
    source: NetSource
    device: str = "cpu"
    workers: int = 1
    scheduler: str | None = None
    flip: bool = False


def inputs_for(planner, plan, upstream: Mapping[str, Manifest], options) -> Inputs:
    source = resolve_net_source(planner.config.features.weights, upstream.get("pretrain"))
    planner.dataset(plan.split).check_inputs()
    # The planner asks for flipped maps of the training split when fine-tuning uses flips.
    return Inputs(dataset=planner.dataset(plan.split), source=source, device=resolve_device(options.device),
                  workers=max(0, int(options.workers)), scheduler=options.scheduler,
                  flip=bool(plan.params.get("flip", False)))


# ---------------------------------------------------------------------------------------------
# decoding and resizing (runs in DataLoader workers)


def resize_uint8(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 RGB ``[3, H, W]`` to ``[3, height, width]`` uint8."""
    if image.shape[-2:] == (height, width):
        return image.contiguous()
    resized = F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized[0].contiguous()


def scale_image(image: np.ndarray, scales: Sequence[int], max_side: int) -> tuple[list[torch.Tensor], list[float]]:
    """One decoded image at every scale.

    Args:
        image: uint8 ``[H, W, 3]`` RGB.
        scales: target short sides.
        max_side: cap on the long side (:func:`sppcli.ops.geometry.scaled_size`).

    Returns:
        (uint8 ``[3, h_i, w_i]`` tensors, resize factors), one per scale.
    """
    height, width = image.shape[:2]
    # Decoders may hand out read-only arrays, which torch refuses to wrap without a copy.
    image = np.ascontiguousarray(image) if image.flags.writeable else np.array(image)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    resized, factors = [], []
    for s in scales:
        new_w, new_h, factor = scaled_size(width, height, int(s), int(max_side))
        resized.append(resize_uint8(chw, new_w, new_h))
        factors.append(float(factor))
    return resized, factors


class ScaledImages(Dataset):
    """Pending images of a split, decoded and resized to every scale (one sample per image)."""

    def __init__(self, dataset: Any, ids: Sequence[str], scales: Sequence[int], max_side: int):
        self.dataset = dataset
        self.ids = list(ids)
        self.scales = [int(s) for s in scales]
        self.max_side = int(max_side)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        started = time.perf_counter()
        image_id = self.ids[index]
        image = self.dataset.load_image(image_id)
        images, factors = scale_image(image, self.scales, self.max_side)
        return {"id": image_id, "width": int(image.shape[1]), "height": int(image.shape[0]),
                "images": images, "factors": factors, "decode_seconds": time.perf_counter() - started}


def prefetched(images: Dataset) -> Iterator[dict]:
    """The samples in order, each decoded and resized in a thread while the previous one goes
    through the net (PIL's decoder and torch's resize release the GIL), without the second
    process a DataLoader worker would be."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="features-reader") as reader:
        upcoming = reader.submit(images.__getitem__, 0) if len(images) else None
        for index in range(len(images)):
            sample = upcoming.result()
            upcoming = reader.submit(images.__getitem__, index + 1) if index + 1 < len(images) else None
            yield sample


# ---------------------------------------------------------------------------------------------
# the net


def autocast_context(device: str, mode: str):
    """``torch.autocast`` for ``mode`` (``none`` | ``bf16`` | ``fp16``) on ``device``."""
    if mode not in AUTOCAST:
        raise ValueError(f"features.autocast = {mode!r}; use one of {', '.join(AUTOCAST)}")
    if AUTOCAST[mode] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST[mode])


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def conv5_map(trunk: torch.nn.Module, image: torch.Tensor, device: str, autocast: str) -> tuple[torch.Tensor, float]:
    """conv5 of one uint8 ``[3, h, w]`` image: (float ``[C, H, W]`` on ``device``, forward seconds).

    The seconds cover the trunk's forward pass only (synchronised on CUDA), not the transfer
    or the normalisation.
    """
    x = normalize(image.to(device, non_blocking=True)[None])
    if _is_channels_last(trunk):
        x = x.contiguous(memory_format=torch.channels_last)
    _synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode(), autocast_context(device, autocast):
        fmap = trunk(x)
    _synchronize(device)
    return fmap[0].contiguous(), time.perf_counter() - started


MEMORY_FORMATS = ("channels_last", "contiguous")


def prepare_trunk(trunk: torch.nn.Module, memory_format: str) -> torch.nn.Module:
    """The trunk in eval mode and ``memory_format``: channels-last convolutions run ~1.8x faster
    on one large image on this project's CPU (oneDNN's preferred layout) and on GPUs' tensor
    cores; they round differently from the contiguous ones, so the format is a parameter."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"features.memory_format = {memory_format!r}; use one of {', '.join(MEMORY_FORMATS)}")
    trunk = trunk.eval()
    if memory_format == "channels_last":
        trunk = trunk.to(memory_format=torch.channels_last)
    return trunk


def _is_channels_last(trunk: torch.nn.Module) -> bool:
    weight = next((p for p in trunk.parameters() if p.dim() == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) \
        and not weight.is_contiguous()


def peak_memory_bytes(device: str) -> int:
    """CUDA: max allocated on ``device`` since the last reset. CPU: this process's peak RSS."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# items


#: How a conv5 map is written. ``sparse``: the ReLU zeros as a bit mask, the non-zero values as
#: one shuffled, gzip-1 compressed vector; ``dense``: the plain array. Both are lossless; the
#: choice and its numbers are in bench/RESULTS.md (bench/bench_feature_storage.py): sparse takes
#: 2.1x fewer bytes than dense float16 with a random full-width ZF-5 (46% zeros) and 6x with
#: the demo's trained net (89% zeros), and reads faster than gzip of the dense array.
STORAGES = ("sparse", "dense")


def write_map(h5: h5py.File, name: str, fmap: np.ndarray, storage: str) -> None:
    """Write one ``[C, H, W]`` map as ``name`` (a dataset when dense, a group when sparse)."""
    if storage == "dense":
        h5.create_dataset(name, data=fmap)
        return
    if storage != "sparse":
        raise ValueError(f"features.storage = {storage!r}; use one of {', '.join(STORAGES)}")
    nonzero = fmap != 0
    group = h5.create_group(name)
    group.attrs["shape"] = np.asarray(fmap.shape, dtype=np.int64)
    group.create_dataset("mask", data=np.packbits(nonzero.reshape(-1)))
    values = fmap[nonzero]
    # A chunked dataset cannot be empty-shaped; an all-zero map keeps its values unfiltered.
    filters = dict(chunks=values.shape, shuffle=True, compression="gzip", compression_opts=1) if values.size else {}
    group.create_dataset("values", data=values, **filters)


def map_shape(h5: h5py.File, name: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of a stored map, without reading it."""
    node = h5[name]
    return tuple(int(v) for v in (node.attrs["shape"] if isinstance(node, h5py.Group) else node.shape))


def read_map(h5: h5py.File, name: str) -> np.ndarray:
    """A stored map as written: ``[C, H, W]`` in the storage dtype."""
    node = h5[name]
    if not isinstance(node, h5py.Group):
        return node[()]
    shape = tuple(int(v) for v in node.attrs["shape"])
    mask = np.unpackbits(node["mask"][()], count=int(np.prod(shape))).view(bool)
    values = node["values"]
    out = np.zeros(mask.size, dtype=values.dtype)
    out[mask] = values[()]
    return out.reshape(shape)


def map_name(scale_index: int, flip: bool = False) -> str:
    """The item's name for the map of one scale (``conv5f_<i>``: of the flipped image)."""
    return f"conv5{'f' if flip else ''}_{int(scale_index)}"


def write_feature_item(h5: h5py.File, maps: Sequence[np.ndarray], width: int, height: int, scales: Sequence[int],
                       factors: Sequence[float], scaled_sizes: Sequence[Sequence[int]], conv_seconds: float,
                       decode_seconds: float, storage: str = "dense",
                       flipped: Sequence[np.ndarray] = ()) -> None:
    """Fill one opened features item (schema in the module docstring); ``scaled_sizes`` are
    the ``[w, h]`` of the resized images; ``flipped``: the maps of the flipped image, if any."""
    for i, fmap in enumerate(maps):
        write_map(h5, map_name(i), fmap, storage)
    for i, fmap in enumerate(flipped):
        write_map(h5, map_name(i, flip=True), fmap, storage)
    h5.attrs["width"] = int(width)
    h5.attrs["height"] = int(height)
    h5.attrs["scales"] = np.asarray(scales, dtype=np.int64)
    h5.attrs["scale_factors"] = np.asarray(factors, dtype=np.float64)
    h5.attrs["scaled_sizes"] = np.asarray(scaled_sizes, dtype=np.int64).reshape(-1, 2)
    h5.attrs["conv_seconds"] = float(conv_seconds)
    h5.attrs["decode_seconds"] = float(decode_seconds)


@dataclasses.dataclass(frozen=True)
class FeatureItem:
    """One features item, read back.

    Attributes:
        width, height: original image size (stored pixels).
        scales: target short sides; scale_factors: resize factor per scale;
        scaled_sizes: ``[S, 2]`` int ``[w, h]`` of the resized images;
        map_shapes: ``(C, H_i, W_i)`` per scale;
        maps: ``[C, H_i, W_i]`` per scale in the stored dtype (empty if not loaded).
    """

    width: int
    height: int
    scales: tuple[int, ...]
    scale_factors: tuple[float, ...]
    scaled_sizes: np.ndarray
    map_shapes: tuple[tuple[int, int, int], ...]
    maps: tuple[np.ndarray, ...]


def read_feature_item(path: Path, load_maps: bool = True) -> FeatureItem:
    """Read ``items/<id>.h5`` of a features artifact (maps only if ``load_maps``)."""
    with open_item(path) as f:
        scales = tuple(int(s) for s in f.attrs["scales"])
        names = [f"conv5_{i}" for i in range(len(scales))]
        maps = tuple(read_map(f, name) for name in names) if load_maps else ()
        return FeatureItem(width=int(f.attrs["width"]), height=int(f.attrs["height"]), scales=scales,
                           scale_factors=tuple(float(x) for x in f.attrs["scale_factors"]),
                           scaled_sizes=np.asarray(f.attrs["scaled_sizes"], dtype=np.int64).reshape(-1, 2),
                           map_shapes=tuple(map_shape(f, name) for name in names), maps=maps)


def read_scale_map(path: Path, scale_index: int, flip: bool = False) -> np.ndarray:
    """The conv5 map of one scale of a features item (of the flipped image when ``flip``),
    ``[C, H, W]`` in the storage dtype."""
    with open_item(path) as f:
        name = map_name(scale_index, flip)
        if name not in f:
            raise ValueError(f"{path} holds no map of the flipped image; extract features with fine-tuning's "
                             "flip on (the planner does this when finetune.flip = true)")
        return read_map(f, name)


@dataclasses.dataclass(frozen=True)
class FeatureMaps:
    """``maps(image_id, scale_index)``: the conv5 maps of a features artifact (a plain value,
    so it travels to worker processes)."""

    items_dir: Path

    def __call__(self, image_id: str, scale_index: int, flip: bool = False) -> np.ndarray:
        return read_scale_map(Path(self.items_dir) / f"{image_id}.h5", scale_index, flip)


# ---------------------------------------------------------------------------------------------
# the stage


def _check_params(features: FeatureParams) -> None:
    if features.dtype not in STORAGE_DTYPES:
        raise ValueError(f"features.dtype = {features.dtype!r}; use one of {', '.join(STORAGE_DTYPES)}")
    if features.autocast not in AUTOCAST:
        raise ValueError(f"features.autocast = {features.autocast!r}; use one of {', '.join(AUTOCAST)}")
    if not features.scales or min(features.scales) < 1:
        raise ValueError(f"features.scales must list positive short sides, got {features.scales!r}")
    if features.max_side < 1:
        raise ValueError(f"features.max_side must be positive, got {features.max_side}")
    if features.storage not in STORAGES:
        raise ValueError(f"features.storage = {features.storage!r}; use one of {', '.join(STORAGES)}")


def image_maps(trunk: torch.nn.Module, image_id: str, images: Sequence[torch.Tensor], scales: Sequence[int],
               fp: FeatureParams, device: str, trunk_name: str) -> tuple[list[np.ndarray], float]:
    """Stored conv5 maps (``fp.dtype``) of one image's scaled versions, and the forward seconds."""
    maps, conv_seconds = [], 0.0
    for scale, image in zip(scales, images):
        map_h, map_w = trunk.feature_map_size(int(image.shape[1]), int(image.shape[2]))
        if map_h < 1 or map_w < 1:
            raise ValueError(f"image {image_id} at scale {scale} ({image.shape[2]} x {image.shape[1]}) is "
                             f"too small for the {trunk_name} trunk; use larger features.scales")
        fmap, seconds = conv5_map(trunk, image, device, fp.autocast)
        conv_seconds += seconds
        # Cast on the device: half the bytes to copy back for float16 storage.
        stored = fmap.to(getattr(torch, fp.dtype)).cpu().numpy()
        if not np.isfinite(stored).all():
            raise ValueError(f"image {image_id} scale {scale}: conv5 values overflow {fp.dtype}; "
                             "set features.dtype=float32")
        maps.append(stored)
    return maps, conv_seconds


def sample_maps(trunk: torch.nn.Module, sample: dict, scales: Sequence[int], fp: FeatureParams, device: str,
                trunk_name: str, flip: bool) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """(maps, maps of the flipped image or [], forward seconds) of one decoded sample.

    The flipped image is the resized image mirrored: mirroring commutes with the symmetric
    bilinear resize, so it is the flipped original at that scale (the release writes flipped
    JPEGs and runs the net on those)."""
    maps, seconds = image_maps(trunk, sample["id"], sample["images"], scales, fp, device, trunk_name)
    flipped = []
    if flip:
        mirrored = [image.flip(-1).contiguous() for image in sample["images"]]
        flipped, more = image_maps(trunk, sample["id"], mirrored, scales, fp, device, trunk_name)
        seconds += more
    return maps, flipped, seconds


def _write_sample(path: Path, sample: dict, maps: Sequence[np.ndarray], scales: Sequence[int], conv_seconds: float,
                  storage: str, flipped: Sequence[np.ndarray] = ()) -> None:
    sizes = [[int(image.shape[2]), int(image.shape[1])] for image in sample["images"]]
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            write_feature_item(h5, maps, sample["width"], sample["height"], scales, sample["factors"], sizes,
                               conv_seconds, sample["decode_seconds"], storage, flipped)


# ---------------------------------------------------------------------------------------------
# on a Dask cluster: one task stream per worker (start GPU workers with --nthreads 1, one per GPU)


@dataclasses.dataclass(frozen=True)
class ExtractJob:
    """A few images for one cluster task: everything a worker needs, as plain values."""

    source: NetSource
    net: NetParams
    features: FeatureParams
    device: str
    images: tuple[tuple[str, str, str], ...]  # (image id, image path, item path)
    flip: bool = False


@functools.lru_cache(maxsize=1)
def _worker_trunk(source: NetSource, net: NetParams, device: str, memory_format: str) -> tuple[torch.nn.Module, str]:
    # Each worker process loads the net once, on its first task, and keeps it for the next ones.
    model, arch = load_source(source, net, map_location=device)
    return prepare_trunk(model.trunk, memory_format), arch["trunk"]


def extract_job(job: ExtractJob) -> list[str]:
    """Decode, scale and run the net on the job's images, writing each item; returns the ids."""
    from sppcli.data.voc import load_rgb

    trunk, trunk_name = _worker_trunk(job.source, job.net, job.device, job.features.memory_format)
    scales = [int(s) for s in job.features.scales]
    done = []
    for image_id, image_path, item_path in job.images:
        started = time.perf_counter()
        image = load_rgb(Path(image_path))
        images, factors = scale_image(image, scales, job.features.max_side)
        sample = {"id": image_id, "width": int(image.shape[1]), "height": int(image.shape[0]), "images": images,
                  "factors": factors, "decode_seconds": time.perf_counter() - started}
        maps, flipped, seconds = sample_maps(trunk, sample, scales, job.features, job.device, trunk_name, job.flip)
        _write_sample(Path(item_path), sample, maps, scales, seconds, job.features.storage, flipped)
        done.append(image_id)
    return done


# Images per cluster task: small enough to balance the load over workers, large enough that the
# scheduler's per-task overhead is noise beside a few forward passes.
IMAGES_PER_TASK = 8


def _extract_on_cluster(params: Params, inputs: Inputs, out: StageRun, pending: Sequence[str]) -> None:
    from sppcli.parallel import map_images

    dataset = inputs.dataset
    triples = [(i, str(dataset.image_path(i)), str(out.item_path(i))) for i in pending]
    jobs = [ExtractJob(inputs.source, params.net, params.features, inputs.device,
                       tuple(triples[k:k + IMAGES_PER_TASK]), inputs.flip)
            for k in range(0, len(triples), IMAGES_PER_TASK)]
    map_images(extract_job, jobs, scheduler=inputs.scheduler, desc="features", unit="task")


def run(params: Params, inputs: Inputs, out: StageRun) -> Manifest:
    fp = params.features
    _check_params(fp)
    device = inputs.device
    scales = [int(s) for s in fp.scales]
    ids = list(inputs.dataset.ids)
    pending = out.pending(ids)

    net, arch = load_source(inputs.source, params.net, map_location=device)
    trunk = prepare_trunk(net.trunk, fp.memory_format)
    record = net_record(inputs.source, net, arch)
    log.info("features: %d of %d images to do, scales %s, %s trunk (%d channels, stride %d) from %s, device %s%s",
             len(pending), len(ids), scales, arch["trunk"], record["channels"], record["stride"],
             inputs.source.path, device, f", on {inputs.scheduler}" if inputs.scheduler else "")
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    started = time.perf_counter()
    if inputs.scheduler:
        _extract_on_cluster(params, inputs, out, pending)
    else:
        images = ScaledImages(inputs.dataset, pending, scales, fp.max_side)
        if inputs.workers > 0:
            loader = DataLoader(images, batch_size=None, shuffle=False, num_workers=inputs.workers,
                                pin_memory=torch.device(device).type == "cuda")
        else:
            loader = prefetched(images)
        # Encoding and writing an item (~15 ms at 688) overlaps the next image's forward pass in a
        # writer thread; at most two items wait, so memory stays bounded.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="features-writer") as writer:
            waiting: collections.deque = collections.deque()
            for sample in progress(worker_errors_unwrapped(loader), total=len(pending), desc="features", unit="img"):
                maps, flipped, seconds = sample_maps(trunk, sample, scales, fp, device, arch["trunk"], inputs.flip)
                waiting.append(writer.submit(write_item, out, sample, maps, scales, seconds, fp.storage, flipped))
                while len(waiting) > 1 or (waiting and waiting[0].done()):
                    waiting.popleft().result()  # re-raises a failed write here, in the stage's thread
            while waiting:
                waiting.popleft().result()
    wall = time.perf_counter() - started

    means = item_means(out.items_dir, ids, ["conv_seconds", "decode_seconds"])
    metrics = {
        "net": record,
        "scales": scales,
        "max_side": int(fp.max_side),
        "dtype": fp.dtype,
        "storage": fp.storage,
        "memory_format": fp.memory_format,
        "flip": inputs.flip,
        "autocast": fp.autocast,
        "conv_seconds_per_image": means["conv_seconds"],
        "decode_seconds_per_image": means["decode_seconds"],
        "peak_memory_bytes": peak_memory_bytes(device),
        "bytes_per_image": means["bytes"],
        "images_this_run": len(pending),
    }
    if pending:
        metrics["images_per_second_this_run"] = len(pending) / wall if wall > 0 else None
    return out.finish(metrics=metrics, timings={"extract_seconds": round(wall, 3)}, n_items=len(ids), device=device)


def write_item(out: StageRun, sample: dict, maps: Sequence[np.ndarray], scales: Sequence[int], conv_seconds: float,
               storage: str, flipped: Sequence[np.ndarray] = ()) -> None:
    """Write one image's item atomically (a kill leaves no half-written item)."""
    _write_sample(out.item_path(sample["id"]), sample, maps, scales, conv_seconds, storage, flipped)
