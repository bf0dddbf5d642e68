"""The paper's headline (section 4.3, Table 6): conv features for K windows, R-CNN vs SPP-net.

* R-CNN: crop every window from the image, warp it to 224 x 224 (227 for AlexNet), and run the
  conv trunk on each warped crop (batched).
* SPP-net: resize the whole image once (min(w, h) = 688; also the 5-scale
  {480, 576, 688, 864, 1200} variant), run the trunk once per scale, then map every window onto
  its best scale's conv5 cells and pyramid-pool it (levels 1, 2, 3, 6) with the pool stage's code
  (single-threaded, as the stage runs it; float16 output, without the HDF5 write).

To stay runnable on a 2-core CPU, R-CNN is timed on a sample of ``--rcnn-sample`` windows and
extrapolated linearly to K (its cost is exactly linear in the window count: each window is one
fixed-size forward pass); the output says so. SPP is timed on all K windows. Windows are random
proposal-like boxes (log-uniform sides from 16 px to the whole image): R-CNN's cost does not
depend on them, and SPP's pooling depends only on their number.

Run: python bench/bench_rcnn_vs_spp.py [--image PATH] [--trunk zf5|alexnet] [--windows 100 500 2000]
     [--rcnn-sample 32] [--device cpu|cuda] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sppcli.data.voc import load_rgb  # noqa: E402
from sppcli.nets.checkpoint import build_net  # noqa: E402
from sppcli.nets.sppnet import normalize  # noqa: E402
from sppcli.stages.features import FeatureItem, conv5_map, resize_uint8, scale_image  # noqa: E402
from sppcli.stages.pool import pool_windows, single_torch_thread  # noqa: E402

ELEPHANTS = REPO.parent / "shared" / "data" / "voc-elephants" / "VOC2007"
if not ELEPHANTS.exists():
    ELEPHANTS = Path("/work/shared/data/voc-elephants/VOC2007")
WARP = {"zf5": 224, "alexnet": 227}
ONE_SCALE, FIVE_SCALES = (688,), (480, 576, 688, 864, 1200)
LEVELS = (1, 2, 3, 6)


def random_windows(rng: np.random.Generator, width: int, height: int, count: int) -> np.ndarray:
    sides = np.exp(rng.uniform(np.log(16), np.log(max(width, height)), size=(count, 2)))
    sides = np.minimum(sides, [width, height])
    corners = rng.uniform(0, 1, size=(count, 2)) * ([width, height] - sides)
    return np.round(np.concatenate([corners, corners + sides], axis=1)).astype(np.float32)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_of(repeats: int, fn) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def rcnn_seconds(trunk, image: torch.Tensor, boxes: np.ndarray, warp: int, batch: int, device: str) -> tuple[float, float]:
    """(warp seconds, conv seconds) for ``boxes``: crop + warp each window, run the trunk on each."""
    started = time.perf_counter()
    crops = []
    for x1, y1, x2, y2 in boxes.astype(int):
        crop = image[:, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
        crops.append(resize_uint8(crop, warp, warp))
    warped = torch.stack(crops)
    warp_seconds = time.perf_counter() - started
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for begin in range(0, len(warped), batch):
            trunk(normalize(warped[begin:begin + batch].to(device)))
    sync(device)
    return warp_seconds, time.perf_counter() - started


def spp_conv(trunk, image_hwc: np.ndarray, scales, device: str) -> tuple[float, FeatureItem]:
    """(seconds, features item): resize the whole image to every scale and run the trunk once per scale.

    The seconds cover the resizing, the forward passes and the copy of the maps to the host (the
    pool stage pools stored maps on the CPU).
    """
    started = time.perf_counter()
    resized, factors = scale_image(image_hwc, scales, max_side=2000)
    maps = [conv5_map(trunk, image, device, "none")[0].float().cpu().numpy() for image in resized]
    seconds = time.perf_counter() - started
    item = FeatureItem(width=image_hwc.shape[1], height=image_hwc.shape[0], scales=tuple(scales),
                       scale_factors=tuple(factors), scaled_sizes=np.zeros((len(scales), 2), np.int64),
                       maps=tuple(maps))
    return seconds, item


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=ELEPHANTS / "JPEGImages" / "000001.jpg")
    parser.add_argument("--trunk", choices=sorted(WARP), default="zf5")
    parser.add_argument("--windows", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--rcnn-sample", type=int, default=32, help="windows R-CNN is actually timed on")
    parser.add_argument("--batch", type=int, default=32, help="R-CNN warped crops per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-five-scale", action="store_true", help="skip the 5-scale SPP rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = build_net({"trunk": args.trunk, "width": 1.0, "num_classes": 21}).to(args.device).eval()
    trunk, geometry = net.trunk, net.trunk.geometry
    image_hwc = load_rgb(args.image)
    height, width = image_hwc.shape[:2]
    image_chw = torch.from_numpy(np.array(image_hwc)).permute(2, 0, 1).contiguous()
    rng = np.random.default_rng(0)
    all_boxes = random_windows(rng, width, height, max(args.windows))
    warp = WARP[args.trunk]

    # warm-up: first calls allocate and pick kernels
    rcnn_seconds(trunk, image_chw, all_boxes[:2], warp, args.batch, args.device)
    spp_conv(trunk, image_hwc, ONE_SCALE, args.device)

    sample = all_boxes[:args.rcnn_sample]
    _, (warp_s, conv_s) = best_of(args.repeats, lambda: rcnn_seconds(trunk, image_chw, sample, warp, args.batch,
                                                                        args.device))
    per_window = (warp_s + conv_s) / len(sample)

    variants = [("1-scale", ONE_SCALE)] + ([] if args.no_five_scale else [("5-scale", FIVE_SCALES)])
    spp = {}
    for name, scales in variants:
        # The conv work does not depend on K: measured once per variant, pooling per K.
        conv, item = best_of(args.repeats, lambda: spp_conv(trunk, image_hwc, scales, args.device)[1])
        for k in args.windows:
            with single_torch_thread():  # as the pool stage runs it
                pool_s, _ = best_of(args.repeats, lambda: pool_windows(all_boxes[:k], item, geometry, LEVELS,
                                                                       np.float16))
            spp[name, k] = (conv, pool_s)

    print(f"image {args.image.name} ({width} x {height}), {args.trunk} full width (random weights), "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, best of "
          f"{args.repeats}")
    print(f"R-CNN: timed on {len(sample)} windows (warp {warp_s:.3f} s + conv {conv_s:.3f} s, batch {args.batch}, "
          f"{warp} x {warp}) = {per_window * 1e3:.1f} ms/window, EXTRAPOLATED linearly to K windows")
    header = ["K", "R-CNN s (extrap.)"]
    for name, scales in variants:
        header += [f"SPP {name} resize+conv s", f"SPP {name} pool s", f"SPP {name} total s", f"speed-up {name}"]
    print(" | ".join(header))
    for k in args.windows:
        rcnn = per_window * k
        cells = [str(k), f"{rcnn:.2f}"]
        for name, _ in variants:
            conv, pool_s = spp[name, k]
            total = conv + pool_s
            cells += [f"{conv:.3f}", f"{pool_s:.3f}", f"{total:.3f}", f"{rcnn / total:.0f}x"]
        print(" | ".join(cells))
    conv_only = {name: spp[name, max(args.windows)][0] for name, _ in variants}
    k = max(args.windows)
    print("conv only at K = %d (the paper's Table 6 'conv time' row): R-CNN %.2f s; %s" % (
        k, conv_s / len(sample) * k,
        "; ".join(f"SPP {name} {conv_only[name]:.3f} s ({conv_s / len(sample) * k / conv_only[name]:.0f}x)"
                  for name in conv_only)))
    print("paper (GPU, ZF-5, ~2000 windows): R-CNN 8.96 s, SPP 1-scale 0.053 s (170x), 5-scale 0.293 s (30x)")


if __name__ == "__main__":
    main()
