"""Seconds per image of the features stage (conv5 maps) and the pool stage, and bytes on disk.

Runs the real stage code (``sppcli.stages.features`` and ``sppcli.stages.pool`` through
``run_stage``) on a temporary artifact root, for each dataset x scale x device:

* datasets: the embedded synthetic devkit (generated under /tmp if missing: 320 x 240 images)
  and ``shared/data/voc-elephants`` (real photos, about 500 x 334);
* scales: one scale at a time, ``min(w, h) = s`` for s in {480, 688} (paper: 688);
* net: full-width ZF-5 with random weights (speed does not depend on the values);
* windows: ``--windows`` random proposal-like boxes per image (log-uniform sizes from 16 px to
  the whole image) plus the ground truth, standing in for selective search, whose windows cost
  the pool stage the same.

Run: python bench/bench_features.py [--images 8] [--windows 2000] [--scales 480 688]
     [--devices cpu cuda] [--workers 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sppcli.artifacts import ArtifactStore  # noqa: E402
from sppcli.config import load_config  # noqa: E402
from sppcli.nets.checkpoint import build_net, save_checkpoint  # noqa: E402
from sppcli.pipeline import Planner, RunOptions, run_stage  # noqa: E402
from sppcli.stages import features, pool  # noqa: E402

ELEPHANTS = REPO.parent / "shared" / "data" / "voc-elephants" / "VOC2007"
if not ELEPHANTS.exists():
    ELEPHANTS = Path("/work/shared/data/voc-elephants/VOC2007")
ZF5 = {"trunk": "zf5", "width": 1.0, "levels": [6, 3, 2, 1], "hidden": 4096, "num_classes": 21}


def synthetic_devkit(images: int) -> Path:
    from sppcli.data.synth import make_dataset

    out = Path(tempfile.gettempdir()) / f"sppcli-bench-synth-{images}" / "VOC2007"
    if not (out / "ImageSets" / "Main" / "trainval.txt").exists():
        print(f"generating the embedded dataset ({images} trainval images) under {out}", file=sys.stderr)
        make_dataset(out, seed=0, n_trainval=images, n_test=1)
    return out


def random_windows(rng: np.random.Generator, width: int, height: int, count: int) -> np.ndarray:
    sides = np.exp(rng.uniform(np.log(16), np.log(max(width, height)), size=(count, 2)))
    sides = np.minimum(sides, [width, height])
    corners = rng.uniform(0, 1, size=(count, 2)) * ([width, height] - sides)
    return np.round(np.concatenate([corners, corners + sides], axis=1)).astype(np.float32)


def write_proposals(planner: Planner, split: str, count: int) -> None:
    plan = planner.plan("proposals", split)
    if planner.store.manifest(plan.stage, plan.dataset, plan.key) is not None:
        return
    out = planner.store.begin(plan.stage, plan.dataset, plan.version, plan.params, plan.upstream_keys, plan.external)
    rng = np.random.default_rng(0)
    dataset = planner.dataset(split)
    for image_id in dataset.ids:
        height, width = dataset.load_image(image_id).shape[:2]
        with out.write_item(image_id) as f:
            f.create_dataset("boxes", data=random_windows(rng, width, height, count))
            f.attrs["width"], f.attrs["height"] = width, height
    out.finish(n_items=len(dataset))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="trainval images of the synthetic devkit")
    parser.add_argument("--windows", type=int, default=2000, help="random windows per image")
    parser.add_argument("--scales", type=int, nargs="+", default=[480, 688])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--workers", type=int, default=1, help="DataLoader / pool worker processes")
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "voc-elephants"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary artifact root")
    args = parser.parse_args()
    os.environ.setdefault("SPPCLI_NO_PROGRESS", "1")

    root = Path(tempfile.mkdtemp(prefix="sppcli-bench-features-"))
    torch.manual_seed(0)
    weights = root / "zf5-random.pt"
    save_checkpoint(weights, build_net(ZF5), ZF5, {})
    devkits = {"synthetic": lambda: synthetic_devkit(args.images), "voc-elephants": lambda: ELEPHANTS}

    rows = []
    for name in args.datasets:
        devkit = devkits[name]()
        classes = ['dataset.classes=["elephant"]'] if name == "voc-elephants" else []
        split = "trainval"  # the synthetic devkit is generated with --images trainval images; elephants has 8
        for scale in args.scales:
            for device in args.devices:
                config = load_config(None, [f"dataset.devkit={str(devkit)!r}", f"features.weights={str(weights)!r}",
                                            f"features.scales=[{scale}]", *classes])
                cache = root / f"{name}-{scale}-{device}"
                planner = Planner(ArtifactStore(cache), config)
                write_proposals(planner, split, args.windows)
                options = RunOptions(device=device, workers=args.workers)
                t0 = time.perf_counter()
                feats, _ = run_stage(planner, features, planner.plan("features", split), options,
                                     log=lambda _msg: None)
                feat_wall = time.perf_counter() - t0
                pooled, _ = run_stage(planner, pool, planner.plan("pool", split), options, log=lambda _msg: None)
                fm, pm = feats.metrics, pooled.metrics
                rows.append((name, scale, device, feats.n_items, fm["conv_seconds_per_image"],
                             fm["decode_seconds_per_image"], feat_wall / feats.n_items, fm["bytes_per_image"],
                             pm["pool_seconds_per_image"], pm["bytes_per_image"], pm["boxes_per_image"],
                             fm["peak_memory_bytes"]))
                print(f"done {name} s={scale} {device}", file=sys.stderr)

    print(f"ZF-5 full width (random weights), torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"features float16, pool float16 levels (1,2,3,6), {args.windows} random windows + GT per image")
    header = ("dataset", "s", "device", "imgs", "conv s/img", "decode s/img", "stage s/img", "conv5 KB/img",
              "pool s/img", "pool MB/img", "windows/img", "peak MB")
    print(" | ".join(header))
    for (name, scale, device, n, conv, decode, stage, fbytes, pool_s, pbytes, windows, peak) in rows:
        print(f"{name} | {scale} | {device} | {n} | {conv:.4f} | {decode:.4f} | {stage:.4f} | {fbytes / 1e3:.0f} | "
              f"{pool_s:.4f} | {pbytes / 1e6:.1f} | {windows:.0f} | {peak / 2**20:.0f}")
    by_key = {(r[0], r[1], r[2]): r for r in rows}
    for name in args.datasets:
        for device in args.devices:
            if all((name, s, device) in by_key for s in (480, 688)):
                a, b = by_key[(name, 480, device)], by_key[(name, 688, device)]
                print(f"{name} {device}: conv s=688 / s=480 = {b[4] / a[4]:.2f}x "
                      f"(pixel ratio {(688 / 480) ** 2:.2f}x); pool 688/480 = {b[8] / a[8]:.2f}x")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"artifacts kept under {root}", file=sys.stderr)


if __name__ == "__main__":
    main()
