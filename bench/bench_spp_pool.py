"""Speed of spp_pool against the per-window adaptive_max_pool2d loop it reproduces.

Workload: one conv5-sized map (256 x 43 x 57, a ZF-5 map of a ~688 x 912 image) and 2,000
random proposal-like windows in image coordinates, mapped onto cells by window_to_cells (so
the duplicate rate is the realistic one: small windows often collapse onto the same cells).

Run: python bench/bench_spp_pool.py [--windows 2000] [--repeats 5] [--seed 0] [--threads N]
Prints the best-of-repeats wall-clock seconds and the speed-up over the loop; a CUDA row when
available. For float32 and float16 it also prints ``pool_vs_floor=<x>``: spp_pool's time over
the time of one write of its output (a fresh output-sized array filled by one copy), the least
any implementation must spend, in process CPU time (wall-clock in brackets); the torch path
(the fallback without numba) is timed beside it. Timings on a machine shared with other jobs are meaningless with several threads
(OpenMP threads wait on each other); ``--threads 1`` is the steadier comparison there.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import sppcli.ops.spp_pool as spp_module
from sppcli.ops.geometry import receptive_field, window_to_cells
from sppcli.ops.spp_pool import spp_pool, spp_pool_reference

ZF5_LAYERS = [(7, 2, 1), (3, 2, 0), (5, 2, 2), (3, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1)]
CHANNELS, HEIGHT, WIDTH = 256, 43, 57


def random_windows(count: int, generator: torch.Generator) -> torch.Tensor:
    """Continuous image boxes of log-uniform size (8 px to the full image) inside the image."""
    geometry = receptive_field(ZF5_LAYERS)
    image_w, image_h = WIDTH * geometry.stride, HEIGHT * geometry.stride
    sides = torch.exp(torch.empty(count, 2).uniform_(2.0, 6.8, generator=generator))
    sides = torch.minimum(sides, torch.tensor([image_w, image_h], dtype=torch.float32))
    corners = torch.rand(count, 2, generator=generator) * (torch.tensor([image_w, image_h]) - sides)
    boxes = torch.cat([corners, corners + sides], dim=1)
    return window_to_cells(boxes, geometry, HEIGHT, WIDTH)


def best_time(fn, repeats: int, sync=None) -> tuple[float, float]:
    """Best wall-clock and best process-CPU seconds over ``repeats`` calls."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        if sync:
            sync()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if sync:
            sync()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(args.seed)
    fmap = torch.randn(CHANNELS, HEIGHT, WIDTH, generator=generator).clamp(min=0)  # post-ReLU
    cells = random_windows(args.windows, generator)
    unique = torch.unique(cells, dim=0).shape[0]

    expected = spp_pool_reference(fmap, cells)
    assert torch.equal(spp_pool(fmap, cells), expected), "spp_pool differs from the loop"
    assert torch.equal(spp_pool(fmap, cells, _dedup=False), expected), "spp_pool (no dedup) differs"

    rows = []
    loop = best_time(lambda: spp_pool_reference(fmap, cells), max(1, args.repeats // 2))
    rows.append(("cpu", "loop (adaptive_max_pool2d per window)", loop))
    rows.append(("cpu", "spp_pool, no dedup", best_time(lambda: spp_pool(fmap, cells, _dedup=False), args.repeats)))
    rows.append(("cpu", "spp_pool", best_time(lambda: spp_pool(fmap, cells), args.repeats)))
    with torch_path():
        rows.append(("cpu", "spp_pool, torch path", best_time(lambda: spp_pool(fmap, cells), args.repeats)))

    if torch.cuda.is_available():
        gpu_map, gpu_cells = fmap.cuda(), cells.cuda()
        sync = torch.cuda.synchronize
        assert torch.equal(spp_pool(gpu_map, gpu_cells).cpu(), expected), "CUDA spp_pool differs"
        rows.append(("cuda", "loop (adaptive_max_pool2d per window)", best_time(
            lambda: spp_pool_reference(gpu_map, gpu_cells), 1, sync)))
        rows.append(("cuda", "spp_pool", best_time(lambda: spp_pool(gpu_map, gpu_cells), args.repeats, sync)))

    print(f"map {CHANNELS}x{HEIGHT}x{WIDTH}, {args.windows} windows ({unique} distinct cell windows), "
          f"levels (1, 2, 3, 6), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("ratios are against the CPU loop; CPU seconds are process time summed over threads")
    print(f"{'device':<7}{'method':<40}{'wall s':>9}{'ratio':>8}{'CPU s':>9}{'ratio':>8}")
    for device, name, (wall, cpu) in rows:
        print(f"{device:<7}{name:<40}{wall:>9.4f}{loop[0] / wall:>7.1f}x{cpu:>9.4f}{loop[1] / cpu:>7.1f}x")

    print("against the memory floor (one write of the output):")
    for dtype in (torch.float32, torch.float16):
        typed = fmap.to(dtype)
        assert torch.equal(spp_pool(typed, cells), spp_pool_reference(typed, cells)), f"{dtype} differs"
        output = spp_pool(typed, cells).numpy()
        # Each repeat times the floor and spp_pool back to back, and the ratio reported is the
        # median of those paired ratios: on a shared machine the floor alone (page faults and
        # memory bandwidth) varies by +-20% between calls, so best-of-N of each side separately
        # pairs a lucky floor with an unlucky pool or the reverse.
        # The floor is one write of a fresh array of the output's size (a fill, as in
        # bench_rcnn_vs_spp.py); a copy, which also reads as much, is shown beside it.
        def write_once():
            np.empty_like(output).fill(1)

        def copy_once():
            np.copyto(np.empty_like(output), output)

        ratios, copy_ratios, pooled_cpu, floor_cpu = [], [], [], []
        for _ in range(args.repeats):
            floor = best_time(write_once, 1)[1]
            copied = best_time(copy_once, 1)[1]
            pooled = best_time(lambda: spp_pool(typed, cells), 1)[1]
            ratios.append(pooled / floor)
            copy_ratios.append(pooled / copied)
            pooled_cpu.append(pooled)
            floor_cpu.append(floor)
        with torch_path():
            fallback = [best_time(lambda: spp_pool(typed, cells), 1)[1] / best_time(write_once, 1)[1]
                        for _ in range(args.repeats)]
        name = str(dtype).removeprefix("torch.")
        print(f"{name}: spp_pool {np.median(pooled_cpu) * 1e3:.1f} ms, floor {np.median(floor_cpu) * 1e3:.1f} ms "
              f"({output.nbytes / 1e6:.0f} MB) (medians of CPU time, one thread), "
              f"pool_vs_floor={np.median(ratios):.2f} (paired ratios {min(ratios):.2f} to {max(ratios):.2f}; "
              f"against a copy {np.median(copy_ratios):.2f}); torch path pool_vs_floor={np.median(fallback):.2f}")


class torch_path:
    """Within the block, spp_pool takes its torch path on the CPU as well (the numba-less fallback)."""

    def __enter__(self):
        self.saved = spp_module._USE_NUMBA
        spp_module._USE_NUMBA = False

    def __exit__(self, *exc):
        spp_module._USE_NUMBA = self.saved


if __name__ == "__main__":
    main()
