"""A VOC-size rehearsal: every stage of `make voc2007-detect` on synthetic splits of growing size.

What it runs, and what is not the real thing:

* images: the project's own generator (sppcli.data.synth) at VOC's 500 x 375, 8 classes;
* windows: *random* proposal-like boxes, ``--windows`` per image (2,000 by default, as selective
  search gives on VOC), imported with `sppcli import-proposals`: a third jittered around the
  ground truth so that every IoU range is populated, the rest uniform over positions with
  log-uniform sides. Selective search itself is timed separately on a few of the same images;
* net: a random full-width ZF-5 (256 conv5 channels, fc6/fc7 4,096-d), seeded, or the
  full-width ZF-5 checkpoint given with ``--weights`` (one trained with `sppcli pretrain`, or a
  converted release model). conv5 of a random net is ~46% zeros where a trained one has ~85%,
  so a random net's maps compress less than real ones would (bench/bench_feature_storage.py
  measures both): with it the disk figures are pessimistic. The net's measured zero fraction is
  printed with every table;
* config: pipelines/voc2007.toml (the paper's settings) with the 8 synthetic classes, and
  fine-tuning cut to ``--finetune-iterations`` mini-batches (its time per mini-batch is
  measured and multiplied by the paper's 300,000).

Every stage is a separate `python -m sppcli` process, so each one's peak RSS is its own (read
from wait4). Per stage it prints seconds per image, bytes per image on disk and peak RSS at each
split size, then extrapolates to VOC 2007 (5,011 trainval + 4,952 test images): disk in GB and
CPU hours per stage from the measured per-image figures, peak RSS from what each stage holds
(the part that grows with the split scaled, the rest as measured: see ``peak_rss``), and GPU hours from the paper's per-image timings (conv 0.053 s at 1 scale and
0.293 s at 5, fc 0.089 s). Its last line is machine-readable:

    voc07: disk_1scale_gb=<x> disk_5scale_gb=<y> peak_rss_gb=<z> cpu_hours_1scale=<h>

    python bench/bench_scale.py --images 100 300

With a self-trained full-width ZF-5 instead of the random one (how bench/RESULTS.md's trained
rehearsal got its weights: 24 epochs on the synthetic ImageNet analog, ~15 minutes here;
pretrain's folder mode still asks for a devkit, which it does not train on):

    sppcli make-dataset --kind classification --out cache/data/synth/imagenet
    sppcli make-dataset --out cache/data/synth/VOC2007
    sppcli pretrain --config pipelines/voc2007.toml --dataset cache/data/synth/VOC2007 \
        --folder cache/data/synth/imagenet --sizes 80,64 --epochs 24
    python bench/bench_scale.py --images 10 30 --weights cache/pretrain/<...>/model.pt
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VOC_TRAINVAL, VOC_TEST = 5011, 4952
PAPER_GPU_SECONDS = {"conv_1": 0.053, "conv_5": 0.293, "fc": 0.089}  # per image, the paper's Table 6
SCALES = {1: [688], 5: [480, 576, 688, 874, 1200]}  # the release's five (Script_spp_voc.m)
CLASSES = ["disc", "ring", "triangle", "cross", "star", "crescent", "stripes", "checker"]

# (command, split or None, the stage's artifact folder); order = the Makefile's voc2007-detect
STAGES = [
    ("import-proposals", "trainval", "proposals"), ("import-proposals", "test", "proposals"),
    ("extract-features", "trainval", "features"), ("extract-features", "test", "features"),
    ("pool-windows", "trainval", "pool"), ("pool-windows", "test", "pool"),
    ("finetune-fc", None, "finetune"), ("train-bbox-reg", None, "bbox_reg"), ("train-svm", None, "svm"),
    ("detect", "test", "detect"), ("evaluate", "test", "evaluate"),
]


def random_windows(rng: np.random.Generator, gt: np.ndarray, width: int, height: int, count: int) -> np.ndarray:
    """Proposal-like boxes (internal convention, whole pixels): see the module docstring."""
    near = count // 3 if len(gt) else 0
    boxes = []
    if near:
        base = gt[rng.integers(0, len(gt), near)].astype(np.float64)
        w, h = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
        spread = rng.uniform(0.02, 0.6, (near, 1))
        shift = rng.standard_normal((near, 4)) * spread * np.stack([w, h, w, h], axis=1)
        boxes.append(base + shift)
    rest = count - near
    side_w = np.exp(rng.uniform(np.log(12), np.log(width), rest))
    side_h = np.exp(rng.uniform(np.log(12), np.log(height), rest))
    x1 = rng.uniform(0, 1, rest) * (width - side_w)
    y1 = rng.uniform(0, 1, rest) * (height - side_h)
    boxes.append(np.stack([x1, y1, x1 + side_w, y1 + side_h], axis=1))
    boxes = np.round(np.concatenate(boxes))
    return np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)


def make_split(root: Path, n_trainval: int, n_test: int, windows: int) -> tuple[Path, Path]:
    """A VOC-format devkit of 500 x 375 synthetic images and an NPZ of random windows per image."""
    from sppcli.data.synth import make_dataset
    from sppcli.data.voc import VocDataset

    devkit = root / "VOC2007"
    make_dataset(devkit, seed=11, n_trainval=n_trainval, n_test=n_test, size=(500, 375))
    rng = np.random.default_rng(5)
    arrays = {}
    for split in ("trainval", "test"):
        ds = VocDataset(devkit, split)
        for image_id in ds.ids:
            gt = ds.ground_truth(image_id)
            arrays[image_id] = random_windows(rng, gt.boxes, gt.width, gt.height, windows)
    np.savez(root / "windows.npz", **arrays)
    return devkit, root / "windows.npz"


def make_weights(path: Path) -> Path:
    import torch

    from sppcli.nets.checkpoint import build_net, save_checkpoint

    arch = {"trunk": "zf5", "width": 1.0, "levels": [6, 3, 2, 1], "hidden": 4096, "num_classes": len(CLASSES),
            "dropout": 0.5}
    torch.manual_seed(0)
    save_checkpoint(path, build_net(arch), arch, {})
    return path


def conv5_zero_fraction(net, devkit: Path, scale: int = 688, images: int = 3) -> float:
    """Fraction of exact zeros in ``net``'s conv5 on the split's first images at ``scale``
    (the sparsity the stored maps' compression depends on)."""
    import torch
    from PIL import Image

    from sppcli.nets import normalize

    fractions = []
    for path in sorted((devkit / "JPEGImages").glob("*.jpg"))[:images]:
        image = Image.open(path).convert("RGB")
        factor = scale / min(image.size)
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            fractions.append(float((net.trunk(normalize(pixels)) == 0).float().mean()))
    return float(np.mean(fractions))


def load_full_width(weights: Path):
    """The net in ``weights`` if it is the one pipelines/voc2007.toml runs (a ZF-5 with 256 conv5
    channels and 4,096-d fc6/fc7); exits with the reason otherwise."""
    from sppcli.nets.net_source import load_net

    net, arch = load_net(weights)
    if arch["trunk"] != "zf5" or net.trunk.out_channels != 256 or arch["hidden"] != 4096:
        raise SystemExit(f"{weights}: a {arch['trunk']} with {net.trunk.out_channels} conv5 channels and "
                         f"{arch['hidden']}-d fc layers; the rehearsal needs voc2007.toml's full-width ZF-5 "
                         "(256 channels, 4,096-d)")
    return net


def run_command(args: list[str], env: dict) -> tuple[float, float]:
    """Run one sppcli command; (wall seconds, peak RSS in bytes) of that process."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "sppcli", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"sppcli {' '.join(args[:1])} failed:\n{stderr[-3000:]}")
    return time.perf_counter() - started, usage.ru_maxrss * 1024.0


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def selective_search_seconds(devkit: Path, images: int = 4) -> float:
    """Seconds per image of the project's selective search ("fast", 500 px) on a few images."""
    from sppcli.data.voc import VocDataset
    from sppcli.stages.proposals import selective_search

    ds = VocDataset(devkit, "trainval")
    times = []
    for image_id in ds.ids[:images]:
        image = ds.load_image(image_id)
        started = time.perf_counter()
        selective_search(image, "fast", 2000, 16, 500)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def rehearse(workdir: Path, n_trainval: int, n_test: int, scales: int, windows: int, iterations: int,
             weights: Path) -> dict:
    root = workdir / f"n{n_trainval}_s{scales}"
    devkit, windows_file = make_split(root, n_trainval, n_test, windows)
    cache = root / "cache"
    common = ["--config", "pipelines/voc2007.toml", "--cache-dir", str(cache), "-q",
              "--set", f"dataset.devkit={json.dumps(str(devkit))}", "--set", f"dataset.classes={json.dumps(CLASSES)}",
              "--set", f"features.weights={json.dumps(str(weights))}",
              "--set", f"features.scales={json.dumps(SCALES[scales])}",
              "--set", f"proposals.imported={json.dumps(str(windows_file))}",
              "--set", f"finetune.iterations={iterations}", "--set", f"finetune.lr_step={iterations}",
              "--set", f"finetune.checkpoint_every={iterations}"]
    env = {**os.environ, "SPPCLI_NO_PROGRESS": "1"}
    rows = {}
    for command, split, stage in STAGES:
        args = [command] + ([str(windows_file)] if command == "import-proposals" else []) + common
        if split:
            args += ["--split", split]
        if command in ("train-svm", "detect", "evaluate"):
            args += ["--variant", "ftfc7bb"]
        if command in ("extract-features", "finetune-fc", "train-svm", "detect"):
            args += ["--device", "cpu"]
        before = tree_bytes(cache / stage)
        seconds, rss = run_command(args, env)
        images = {"trainval": n_trainval, "test": n_test, None: n_trainval}[split]
        rows[(command, split)] = {"seconds": seconds, "images": images, "bytes": tree_bytes(cache / stage) - before,
                                  "rss": rss}
    for command, stage in (("finetune-fc", "finetune"), ("train-bbox-reg", "bbox_reg"), ("train-svm", "svm")):
        manifest = json.loads(next((cache / stage).rglob("manifest.json")).read_text())
        rows[command, None].update(metrics=manifest["metrics"], params=manifest["params"],
                                   map_cache_bytes=manifest["metrics"].get("map_cache_bytes", 0),
                                   feature_cache_bytes=manifest["metrics"].get("feature_cache_bytes", 0))
    rows["finetune-fc", None]["seconds_per_iteration"] = rows["finetune-fc", None]["metrics"]["seconds_per_iteration"]
    return {"rows": rows, "selective_search": selective_search_seconds(devkit), "root": root, "devkit": devkit}


# Person is 4,690 of VOC 2007 trainval's 15,662 objects: the class whose regression windows are
# the most vectors train-bbox-reg holds at once.
VOC_LARGEST_CLASS_SHARE = 4690 / 15662
VOC_CLASSES = 20


def peak_rss(command: str, split: str | None, rows: list[dict], metrics: dict, voc_images: int,
             voc_disk: float) -> float:
    """Peak RSS at VOC size, from what each stage holds in memory and why.

    ``rows`` are the stage's runs, smallest split first; ``metrics`` the largest run's manifest
    metrics. A line fitted through two noisy peaks would extrapolate noise (and page-cache
    luck) by a factor of 15, so each stage's memory is split into the part that grows with the
    split, which the stage reports, and the rest, which does not:

    * per-image stages (proposals, features, pooling) stream image by image: the largest peak
      measured; detect and evaluate also hold every detection (their output) at once;
    * finetune-fc holds the window lists (linear in images), a conv5 map cache capped at
      ``map_cache_bytes`` and the selected windows' pooled vectors (all of them when they fit in
      ``finetune.DEFAULT_MAX_CACHE_BYTES``, else two chunks of mini-batches within it): the
      rest's growth between the two sizes, plus both caches scaled to VOC up to their caps;
    * train-bbox-reg holds one class's vectors (person's share of VOC's objects) and a map cache
      capped at 2 GiB;
    * train-svm holds every class's hard-negative cache: scaled by images and classes, and at
      most ``VOC_CLASSES x (max_cache + retrain_limit + one image's windows)`` vectors.
    """
    from sppcli.stages.bbox_reg import MAP_CACHE_BYTES as BBOX_MAP_CACHE
    from sppcli.stages.finetune import DEFAULT_MAP_CACHE_BYTES as FINETUNE_MAP_CACHE
    from sppcli.stages.finetune import DEFAULT_MAX_CACHE_BYTES as FINETUNE_FEATURE_CACHE

    big = rows[-1]
    scale = voc_images / big["images"]
    if command == "finetune-fc":
        cache, features = metrics.get("map_cache_bytes", 0), metrics.get("feature_cache_bytes", 0)
        rest = [r["rss"] - r.get("map_cache_bytes", 0) - r.get("feature_cache_bytes", 0) for r in rows]
        slope = max(0.0, (rest[-1] - rest[0]) / max(1, rows[-1]["images"] - rows[0]["images"])) if len(rows) > 1 else 0.0
        return (rest[-1] + slope * (voc_images - big["images"]) + min(FINETUNE_MAP_CACHE, cache * scale)
                + min(FINETUNE_FEATURE_CACHE, features * scale))
    if command == "train-bbox-reg":
        cache = metrics.get("map_cache_bytes", 0)
        vectors = metrics["peak_vector_bytes"]
        row_bytes = vectors / max(1, max((e["windows"] for e in metrics["per_class"].values()), default=1))
        voc_vectors = metrics["training_windows"] * scale * VOC_LARGEST_CLASS_SHARE * row_bytes
        return big["rss"] - cache - vectors + min(BBOX_MAP_CACHE, cache * scale) + max(vectors, voc_vectors)
    if command == "train-svm":
        bound = metrics["cache_bound_bytes"]
        classes = len(metrics["classes"])
        itemsize = bound / max(1, sum(metrics["cache_peak_windows"].values()))
        cap = big["params"].get("max_cache") or 0
        grown = bound * scale * VOC_CLASSES / classes
        if cap:
            grown = min(grown, VOC_CLASSES * (cap + big["params"]["retrain_limit"] + 2000) * itemsize)
        return max(rows[0]["rss"], big["rss"] - bound) + grown
    held = voc_disk if command in ("detect", "evaluate") else 0.0
    return max(r["rss"] for r in rows) + held


def extrapolate(runs: dict[int, dict], scales: int) -> dict:
    """Per stage at VOC size: disk bytes, CPU seconds (from the largest run) and peak RSS
    (:func:`peak_rss`)."""
    sizes = sorted(runs)
    big = runs[sizes[-1]]["rows"]
    out = {}
    for (command, split), row in big.items():
        voc_images = VOC_TEST if split == "test" else VOC_TRAINVAL
        seconds = row["seconds"] / row["images"] * voc_images
        if command == "finetune-fc":  # the paper's 300k mini-batches, at the measured rate
            seconds = row["seconds"] + row["seconds_per_iteration"] * (300_000 - 1)
        disk = row["bytes"] / row["images"] * voc_images
        if command in ("finetune-fc", "train-svm", "train-bbox-reg", "evaluate"):
            disk = row["bytes"]  # model files: not per image
        history = [runs[n]["rows"][(command, split)] for n in sizes]
        rss = peak_rss(command, split, history, row.get("metrics", {}), voc_images, disk)
        out[(command, split)] = {"disk": disk, "seconds": seconds, "rss": rss}
    conv = PAPER_GPU_SECONDS[f"conv_{scales}"]
    gpu = {("extract-features", "trainval"): conv * VOC_TRAINVAL, ("extract-features", "test"): conv * VOC_TEST,
           ("train-svm", None): PAPER_GPU_SECONDS["fc"] * VOC_TRAINVAL,
           ("detect", "test"): PAPER_GPU_SECONDS["fc"] * VOC_TEST}
    for key, seconds in gpu.items():
        out[key]["gpu_seconds"] = seconds
    return out


def report(runs: dict[int, dict], scales: int, voc: dict) -> None:
    sizes = sorted(runs)
    zeros = conv5_zero_fraction(NET, runs[sizes[-1]]["devkit"])
    print(f"\n== {scales} scale(s) {SCALES[scales]}: {NET_DESCRIPTION} ({100 * zeros:.1f}% zeros in conv5), "
          f"{args.windows} random windows per image")
    head = "".join(f"{'n=' + str(n) + ' s/img':>13}{'KB/img':>9}{'RSS GB':>8}" for n in sizes)
    print(f"{'stage':<28}{head}{'VOC disk GB':>13}{'CPU h':>8}{'GPU h*':>8}{'RSS GB':>8}")
    for (command, split), est in voc.items():
        cells = ""
        for n in sizes:
            row = runs[n]["rows"][(command, split)]
            cells += f"{row['seconds'] / row['images']:>13.3f}{row['bytes'] / row['images'] / 1e3:>9.1f}{row['rss'] / 1e9:>8.2f}"
        gpu = est.get("gpu_seconds")
        print(f"{command + (' ' + split if split else ''):<28}{cells}{est['disk'] / 1e9:>13.2f}"
              f"{est['seconds'] / 3600:>8.2f}{'-' if gpu is None else f'{gpu / 3600:.2f}':>8}{est['rss'] / 1e9:>8.2f}")
    ss = np.median([r["selective_search"] for r in runs.values()])
    print(f"{'selective search (not run)':<28}{'':>{21 * len(sizes)}}{'':>13}{ss * (VOC_TRAINVAL + VOC_TEST) / 3600:>8.2f}"
          f"{'-':>8}  ({ss:.2f} s/img measured, CPU only)")
    big = runs[sizes[-1]]["rows"]
    print(f"fine-tuning: {big['finetune-fc', None]['seconds_per_iteration']:.3f} s per mini-batch of 128 on this CPU; "
          f"SVM caches bound at n={sizes[-1]}: {big['train-svm', None]['metrics']['cache_bound_bytes'] / 1e9:.2f} GB "
          "(every class at its peak at once)")
    print("* GPU hours from the paper's per-image conv and fc times (Table 6), for the stages it times")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[100, 300], help="trainval images per rehearsal")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="test images per trainval image")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 5], choices=[1, 5])
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--finetune-iterations", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the rehearsal's files here")
    parser.add_argument("--weights", type=Path, default=None,
                        help="a full-width ZF-5 checkpoint (e.g. from `sppcli pretrain`) instead of a random one")
    global args, NET, NET_DESCRIPTION
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sppcli-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.weights is None:
        weights = make_weights(workdir / "zf5_random.pt")
        NET_DESCRIPTION = "random full-width ZF-5"
    else:
        weights = args.weights.resolve()
        NET_DESCRIPTION = f"full-width ZF-5 from {args.weights}"
    NET = load_full_width(weights)  # loaded once: checked here, its conv5 sparsity measured per table
    print(f"net: {NET_DESCRIPTION}")
    totals = {}
    try:
        for scales in args.scales:
            runs = {}
            for n in sorted(args.images):
                runs[n] = rehearse(workdir, n, max(4, int(round(n * args.test_fraction))), scales, args.windows,
                                   args.finetune_iterations, weights)
            voc = extrapolate(runs, scales)
            report(runs, scales, voc)
            totals[scales] = {"disk": sum(e["disk"] for e in voc.values()), "rss": max(e["rss"] for e in voc.values()),
                              "cpu": sum(e["seconds"] for e in voc.values())}
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    disk = {s: totals[s]["disk"] / 1e9 if s in totals else float("nan") for s in (1, 5)}
    print(f"load average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())} on "
          f"{os.cpu_count()} cores (seconds are wall seconds: other load on the machine inflates them)")
    print("\nVOC 2007 totals: " + "; ".join(f"{s} scale(s): disk {t['disk'] / 1e9:.1f} GB, peak RSS "
                                             f"{t['rss'] / 1e9:.1f} GB, CPU {t['cpu'] / 3600:.1f} h"
                                             for s, t in totals.items()))
    print(f"voc07: disk_1scale_gb={disk[1]:.2f} disk_5scale_gb={disk[5]:.2f} "
          f"peak_rss_gb={max(t['rss'] for t in totals.values()) / 1e9:.2f} "
          f"cpu_hours_1scale={totals[1]['cpu'] / 3600 if 1 in totals else float('nan'):.2f}")


if __name__ == "__main__":
    main()
