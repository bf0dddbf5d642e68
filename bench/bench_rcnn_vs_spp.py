"""The paper's Table 6 timing rows, measured honestly: R-CNN vs SPP-net, conv + pool + fc.

Both sides run the same full-width ZF-5 trunk (random weights, seeded) at the same precision, and
each its own fc head with 4,096-d fc6 and fc7:

* R-CNN, per window: crop, warp to 224 x 224, conv1-5 (at the batch size and memory layout that
  ran fastest in a calibration round), pool5 (max 3x3/2: 6 x 6 x 256 = 9,216-d),
  fc6, fc7. The conv work is timed on ``--rcnn-sample`` windows and extrapolated linearly to all
  of them (each window is one fixed-size forward pass; the output says so); fc6/fc7 run on all
  the windows.
* SPP-net, per image: resize to every scale (one: min side 688; five: the release's
  480, 576, 688, 874, 1200) and run conv1-5 once per scale; pool every window on its scale's map
  (the stages' own code: float16 maps as stored, 1x1 + 2x2 + 3x3 + 6x6 = 12,800-d, windows with
  identical cells pooled once, one thread) and run fc6/fc7 on the distinct windows, as `detect`
  does.

The image is a real photo (voc-elephants 000003.jpg, 500 x 375 as most VOC images) and the windows its selective-search
boxes, topped up with random boxes to ``--windows`` if selective search found fewer (the output
says how many). Each side is timed in every one of ``--rounds`` interleaved rounds and the medians
are reported, beside each side's achieved GFLOP/s and the FLOP ratio of the conv work, which is
the ceiling of the conv speed-up when both sides run equally efficiently.

``--svd R6 R7`` adds rows with fc6 / fc7 replaced by their rank-R truncated SVD (Fast R-CNN's
trick, ``detect.svd_ranks``) on *both* sides, so that the SVD speed-ups still compare one head
with its own kind; their mAP cost is measured on the embedded data (bench/RESULTS.md). ``pool_vs_floor`` is spp_pool's time for the windows over the time of one
write of a freshly allocated array of its output's size and dtype (both one thread). The last
line is machine-readable:

    table6: conv_1=<x> conv_5=<x> overall_1=<x> overall_5=<x> pool_vs_floor=<x>

Run: python bench/bench_rcnn_vs_spp.py [--precision float32|bfloat16] [--svd 512 256] [--rounds 5]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sppcli.data.voc import load_rgb
from sppcli.detector.pooled_features import pool_rows
from sppcli.detector.windows import distinct_windows
from sppcli.nets.checkpoint import build_net
from sppcli.nets.heads import FcHead, truncated_svd_head
from sppcli.nets.sppnet import normalize
from sppcli.ops.geometry import best_scale_index, scaled_size, window_to_cells
from sppcli.stages.features import prepare_trunk, resize_uint8, scale_image

REPO = Path(__file__).resolve().parents[1]
ELEPHANTS = REPO.parent / "shared" / "data" / "voc-elephants" / "VOC2007"
if not ELEPHANTS.exists():
    ELEPHANTS = Path("/work/shared/data/voc-elephants/VOC2007")
ONE_SCALE, FIVE_SCALES = (688,), (480, 576, 688, 874, 1200)
LEVELS = (1, 2, 3, 6)
PAPER = {"rcnn_conv": 8.96, "rcnn_fc": 0.07, "spp_conv_1": 0.053, "spp_conv_5": 0.293, "spp_fc": 0.089}


def windows_of(image: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """``count`` boxes: the image's selective-search windows, then random ones if too few."""
    from sppcli.stages.proposals import selective_search

    boxes = selective_search(image, "fast", count, 16, 500)
    found = len(boxes)
    if found < count:
        rng = np.random.default_rng(0)
        height, width = image.shape[:2]
        sides = np.exp(rng.uniform(np.log(16), np.log(max(width, height)), (count - found, 2)))
        sides = np.minimum(sides, [width, height])
        corners = rng.uniform(0, 1, (count - found, 2)) * ([width, height] - sides)
        boxes = np.concatenate([boxes, np.round(np.c_[corners, corners + sides])]).astype(np.float32)
    return boxes[:count], found


def conv_macs(trunk: torch.nn.Module, height: int, width: int) -> int:
    """Multiply-adds of the trunk's convolutions on one ``height x width`` input."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() // output.shape[0] * module.in_channels // module.groups * kh * kw

    handles = [m.register_forward_hook(hook) for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        trunk(torch.zeros(1, 3, height, width))
    for handle in handles:
        handle.remove()
    return total


def head_macs(head: FcHead) -> int:
    return sum(m.in_features * m.out_features for m in head.modules() if isinstance(m, torch.nn.Linear)
               and m is not getattr(head, "fc8", None))


DEVICE = "cpu"


def sync() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn):
    sync()
    started = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - started, result


class Rcnn:
    """R-CNN's test-time features of windows: warp, conv, pool5, fc6, fc7 (one head of its own)."""

    def __init__(self, trunk, head: FcHead, image: np.ndarray, precision: torch.dtype | None):
        self.base = trunk
        self.trunk, self.head, self.precision = copy.deepcopy(trunk), head, precision
        self.image = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        self.batch, self.channels_last = 32, False

    def autocast(self):
        return torch.autocast(torch.device(DEVICE).type, dtype=self.precision or torch.float32,
                              enabled=self.precision is not None)

    def warp(self, boxes: np.ndarray) -> torch.Tensor:
        crops = [resize_uint8(self.image[:, y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)], 224, 224)
                 for x1, y1, x2, y2 in boxes.astype(int)]
        return torch.stack(crops)

    def pool5(self, warped: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.inference_mode(), self.autocast():
            for begin in range(0, len(warped), self.batch):
                x = normalize(warped[begin:begin + self.batch].to(DEVICE))
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)

                conv5 = self.trunk(x)
                out.append(F.max_pool2d(conv5, 3, 2, ceil_mode=True).flatten(1).float())
        return torch.cat(out)

    def fc(self, pool5: torch.Tensor, head: FcHead | None = None) -> torch.Tensor:
        with torch.inference_mode(), self.autocast():
            return (head or self.head).fc7_features(pool5)

    def calibrate(self, boxes: np.ndarray) -> str:
        """Pick the fastest batch size and memory layout for the conv work."""
        warped = self.warp(boxes)
        best = (float("inf"), None)
        for channels_last in (False, True):
            self.trunk = copy.deepcopy(self.base).to(
                DEVICE, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            for batch in (8, 16, 32, 64):
                self.batch, self.channels_last = batch, channels_last
                self.pool5(warped[:batch])  # warm-up of this shape
                seconds = min(timed(lambda: self.pool5(warped))[0] for _ in range(2))
                best = min(best, (seconds, (batch, channels_last)))
        self.batch, self.channels_last = best[1]
        self.trunk = copy.deepcopy(self.base).to(
            DEVICE, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return f"batch {self.batch}, {'channels_last' if self.channels_last else 'contiguous'}"


class Spp:
    """SPP-net's test-time features of windows, as the stages compute them."""

    def __init__(self, trunk, head: FcHead, image: np.ndarray, scales, precision: torch.dtype | None):
        # as the features stage runs it (features.memory_format = channels_last)
        self.trunk = prepare_trunk(copy.deepcopy(trunk).to(DEVICE), "channels_last")
        self.head, self.image, self.scales, self.precision = head, image, scales, precision
        self.geometry = trunk.geometry

    def autocast(self):
        return torch.autocast(torch.device(DEVICE).type, dtype=self.precision or torch.float32,
                              enabled=self.precision is not None)

    def conv(self) -> tuple[list[np.ndarray], list[float]]:
        resized, factors = scale_image(self.image, self.scales, max_side=2000)
        maps = []
        with torch.inference_mode(), self.autocast():
            for image in resized:
                x = normalize(image[None].to(DEVICE)).contiguous(memory_format=torch.channels_last)
                maps.append(self.trunk(x)[0].to(torch.float16).contiguous().cpu().numpy())  # stored as float16
        return maps, factors

    def assign(self, boxes: np.ndarray, maps, factors) -> tuple[np.ndarray, np.ndarray]:
        boxes_t = torch.from_numpy(boxes.astype(np.float64))
        scale = best_scale_index(boxes_t, factors, target_area=208.0 ** 2).numpy()
        cells = np.zeros((len(boxes), 4), np.int64)
        for s, (factor, fmap) in enumerate(zip(factors, maps)):
            rows = np.flatnonzero(scale == s)
            if rows.size:
                cells[rows] = window_to_cells(boxes_t[rows] * factor, self.geometry, fmap.shape[1], fmap.shape[2]).numpy()
        return scale, cells

    def pool(self, maps, scale: np.ndarray, cells: np.ndarray) -> np.ndarray:
        first, _ = distinct_windows(scale, cells)
        out = np.empty((len(first), 256 * 50), np.float16)
        torch.set_num_threads(1)  # as the stages pool (parallelism comes from processes)
        try:
            for s, fmap in enumerate(maps):
                rows = np.flatnonzero(scale[first] == s)
                if rows.size:
                    out[rows] = pool_rows(fmap, cells[first[rows]], LEVELS, np.dtype(np.float16))
        finally:
            torch.set_num_threads(self.threads)
        return out

    def fc(self, pooled: np.ndarray, head: FcHead | None = None) -> torch.Tensor:
        with torch.inference_mode(), self.autocast():
            return (head or self.head).fc7_features(torch.from_numpy(pooled).to(DEVICE).float())


def pool_floor(rows: int, dim: int, dtype) -> float:
    """Seconds of one write of a freshly allocated ``[rows, dim]`` array (the output's floor)."""
    seconds = []
    for _ in range(5):
        started = time.perf_counter()
        np.empty((rows, dim), dtype).fill(1)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # 500 x 375, VOC's most common size (the FLOP ratio depends on the aspect ratio)
    parser.add_argument("--image", type=Path, default=ELEPHANTS / "JPEGImages" / "000003.jpg")
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--rcnn-sample", type=int, default=64, help="windows R-CNN's conv is timed on")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                        help="both sides' conv and fc")
    parser.add_argument("--svd", type=int, nargs=2, default=None, metavar=("R6", "R7"))
    parser.add_argument("--device", default="cpu", help="cpu | cuda: the convolutions and fc layers (pooling stays "
                                                         "on the CPU, as the stages run it)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(args.threads)
    precision = None if args.precision == "float32" else torch.bfloat16

    torch.manual_seed(0)
    net = build_net({"trunk": "zf5", "width": 1.0, "levels": [6, 3, 2, 1], "hidden": 4096, "num_classes": 21}).eval()
    trunk = net.trunk
    spp_head = net.head.to(DEVICE).eval()
    rcnn_head = FcHead(256 * 36, 4096, 0.5).to(DEVICE).eval()
    image = load_rgb(args.image)
    height, width = image.shape[:2]
    boxes, found = windows_of(image, args.windows)
    rcnn = Rcnn(trunk, rcnn_head, image, precision)
    layout = rcnn.calibrate(boxes[:args.rcnn_sample])
    sample = boxes[:args.rcnn_sample]
    sides = {"1": Spp(trunk, spp_head, image, ONE_SCALE, precision), "5": Spp(trunk, spp_head, image, FIVE_SCALES, precision)}
    for side in sides.values():
        side.threads = args.threads
    svd_head = truncated_svd_head(spp_head, *args.svd).eval() if args.svd else None
    rcnn_svd_head = truncated_svd_head(rcnn_head, *args.svd).eval() if args.svd else None

    # warm-up, then interleaved rounds
    rcnn.fc(rcnn.pool5(rcnn.warp(sample[:2])))
    for side in sides.values():
        maps, factors = side.conv()
        side.fc(side.pool(maps, *side.assign(boxes[:4], maps, factors)))
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    distinct = {}
    first_maps = None
    for _ in range(args.rounds):
        warp_s, warped = timed(lambda: rcnn.warp(sample))
        conv_s, pool5 = timed(lambda: rcnn.pool5(warped))
        record("rcnn_warp", warp_s / len(sample) * len(boxes))
        record("rcnn_conv", conv_s / len(sample) * len(boxes))
        all_pool5 = pool5.to(DEVICE).repeat((len(boxes) + len(sample) - 1) // len(sample), 1)[:len(boxes)]
        record("rcnn_fc", timed(lambda: rcnn.fc(all_pool5))[0])
        if rcnn_svd_head is not None:
            record("rcnn_fc_svd", timed(lambda: rcnn.fc(all_pool5, rcnn_svd_head))[0])
        for key, side in sides.items():
            conv_s, (maps, factors) = timed(side.conv)
            assign_s, (scale, cells) = timed(lambda: side.assign(boxes, maps, factors))
            pool_s, pooled = timed(lambda: side.pool(maps, scale, cells))
            fc_s, _ = timed(lambda: side.fc(pooled))
            distinct[key] = len(pooled)
            record(f"spp{key}_conv", conv_s)
            record(f"spp{key}_pool", assign_s + pool_s)
            record(f"spp{key}_fc", fc_s)
            if svd_head is not None:
                record(f"spp{key}_fc_svd", timed(lambda: side.fc(pooled, svd_head))[0])
        # Every round, so that the median leaves out the first call's one-off cost (the pooling
        # kernel's JIT compile or its cache load), as it does for every other row.
        if first_maps is None:
            maps, factors = sides["1"].conv()
            first_maps = (maps, sides["1"].assign(boxes, maps, factors)[1])
        maps, cells = first_maps
        torch.set_num_threads(1)
        pool_only = timed(lambda: pool_rows(maps[0], cells, LEVELS, np.dtype(np.float16)))[0]
        torch.set_num_threads(args.threads)
        record("floor", pool_floor(len(boxes), 256 * 50, np.float16))
        record("pool_only", pool_only)
        record("pool_ratio", pool_only / times["floor"][-1])  # paired: the floor alone varies +-20%
    med = {k: statistics.median(v) for k, v in times.items()}

    # work, for GFLOP/s and the ceiling of the conv speed-up
    rcnn_conv_macs = conv_macs(trunk, 224, 224) * len(boxes)
    spp_conv_macs = {key: sum(conv_macs(trunk, *scaled_size(width, height, s, 2000)[1::-1]) for s in side.scales)
                     for key, side in sides.items()}
    rcnn_fc_macs = head_macs(rcnn_head) * len(boxes)
    spp_fc_macs = {key: head_macs(spp_head) * distinct[key] for key in sides}

    print(f"image {args.image.name} ({width} x {height}), {len(boxes)} windows ({found} from selective search"
          f"{'' if found >= len(boxes) else f', {len(boxes) - found} random'}), full-width ZF-5 (random weights), "
          f"{args.precision} on both sides, {DEVICE}, torch {torch.__version__}, {args.threads} CPU threads, medians of "
          f"{args.rounds} interleaved rounds")
    print(f"R-CNN: conv timed on {len(sample)} warped 224 x 224 windows ({layout}) and EXTRAPOLATED linearly to "
          f"{len(boxes)}; its conv time includes the warping ({med['rcnn_warp']:.2f} s) as SPP's includes the resizing")
    rows = [("R-CNN", med["rcnn_conv"] + med["rcnn_warp"], 0.0, med["rcnn_fc"], rcnn_conv_macs, rcnn_fc_macs)]
    if rcnn_svd_head is not None:
        rows.append((f"R-CNN, SVD {args.svd[0]}/{args.svd[1]}", rows[0][1], 0.0, med["rcnn_fc_svd"], rcnn_conv_macs,
                     head_macs(rcnn_svd_head) * len(boxes)))
    for key in sides:
        rows.append((f"SPP {key}-scale", med[f"spp{key}_conv"], med[f"spp{key}_pool"], med[f"spp{key}_fc"],
                     spp_conv_macs[key], spp_fc_macs[key]))
        if svd_head is not None:
            rows.append((f"SPP {key}-scale, SVD {args.svd[0]}/{args.svd[1]}", med[f"spp{key}_conv"],
                         med[f"spp{key}_pool"], med[f"spp{key}_fc_svd"], spp_conv_macs[key],
                         head_macs(svd_head) * distinct[key]))
    base_conv, base_total = rows[0][1], rows[0][1] + rows[0][3]
    print(f"{'':<26}{'conv s':>9}{'pool s':>8}{'fc s':>8}{'total s':>9}{'conv x':>8}{'total x':>9}"
          f"{'conv GFLOP/s':>14}{'fc GFLOP/s':>12}")
    # an SVD row's speed-up is against R-CNN with the same truncated head (rows[1])
    rcnn_svd_total = rows[1][1] + rows[1][3] if rcnn_svd_head is not None else None
    for name, conv, pool, fc, cmacs, fmacs in rows:
        total = conv + pool + fc
        reference = rcnn_svd_total if "SVD" in name else base_total
        print(f"{name:<26}{conv:>9.3f}{pool:>8.3f}{fc:>8.3f}{total:>9.3f}{base_conv / conv:>8.1f}"
              f"{reference / total:>9.1f}{2 * cmacs / conv / 1e9:>14.1f}{2 * fmacs / fc / 1e9:>12.1f}")
    ceiling = {key: rcnn_conv_macs / spp_conv_macs[key] for key in sides}
    print("FLOP ratio of the conv work (the conv speed-up's ceiling at equal efficiency): "
          + ", ".join(f"{key}-scale {ceiling[key]:.0f}x" for key in sides)
          + f"; windows pooled and through fc after dedup: {distinct['1']} (1-scale), {distinct['5']} (5-scale)")
    print(f"paper (GPU): R-CNN conv {PAPER['rcnn_conv']} s + fc {PAPER['rcnn_fc']} s; SPP conv {PAPER['spp_conv_1']} s "
          f"(1-scale) / {PAPER['spp_conv_5']} s (5-scale) + fc {PAPER['spp_fc']} s; overall 64x / 24x")
    pool_vs_floor = med["pool_ratio"]
    print(f"spp_pool of {len(boxes)} windows, one thread, float16: {med['pool_only'] * 1e3:.1f} ms; one write of its "
          f"output {med['floor'] * 1e3:.1f} ms; ratio {pool_vs_floor:.1f}")
    # overall_* compare the exact network on both sides; the SVD rows approximate both sides' fc
    # layers (a smaller head, not the paper's), so they are reported beside, never as the headline.
    exact = {key: next(r for r in rows if r[0] == f"SPP {key}-scale") for key in sides}
    line = (f"table6: conv_1={base_conv / exact['1'][1]:.1f} conv_5={base_conv / exact['5'][1]:.1f} "
            f"overall_1={base_total / sum(exact['1'][1:4]):.1f} overall_5={base_total / sum(exact['5'][1:4]):.1f} "
            f"pool_vs_floor={pool_vs_floor:.1f}")
    if svd_head is not None:
        svd = {key: next(r for r in rows if r[0].startswith(f"SPP {key}-scale, SVD")) for key in sides}
        line += (f" overall_1_svd={rcnn_svd_total / sum(svd['1'][1:4]):.1f}"
                 f" overall_5_svd={rcnn_svd_total / sum(svd['5'][1:4]):.1f}")
    print(line)


if __name__ == "__main__":
    main()
