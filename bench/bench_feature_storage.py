"""How to store conv5 maps: bytes per image against read time per image, per encoding.

SPP-net keeps one conv5 map per image and scale and pools every window from it on the fly, so
the maps are the detector's whole feature cache: at VOC 2007 size (9,963 images) their bytes set
the disk bill and their read time is paid once per image by every consumer. This bench extracts
real conv5 maps (VOC-sized 500 x 375 synthetic images from the project's generator, min side
688) with two nets whose ReLU sparsity differs:

* a random full-width ZF-5 (256 channels, seeded): about half its conv5 values are zero;
* a trained net given with ``--weights`` (e.g. the demo's ``cache/pretrain/.../model.pt``).

and writes each map with every candidate encoding, then reads it back (open + read + decode to
a float16 array) in the same run, interleaved over ``--rounds`` rounds, medians reported.
Encodings: float16 or bfloat16 storage; HDF5 filters shuffle + lzf / gzip (h5py ships both);
a sparse encoding of the ReLU zeros (bit mask + non-zero values); and, when the hdf5plugin
package is installed, bitshuffle + lz4 and zstd. The last line is machine-readable.

    python bench/bench_feature_storage.py --images 6 --weights cache/pretrain/<ds>/<key>/model.pt
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from sppcli.data.synth import render_image
from sppcli.nets.checkpoint import build_net, load_weights
from sppcli.nets.sppnet import normalize
from sppcli.ops.geometry import scaled_size


def conv5_maps(net, images, scale: int) -> list[np.ndarray]:
    maps = []
    for image in images:
        h, w = image.shape[:2]
        new_w, new_h, _ = scaled_size(w, h, scale, 2000)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True,
                                            align_corners=False).round().clamp(0, 255).to(torch.uint8)
        with torch.inference_mode():
            maps.append(net.trunk(normalize(x))[0].to(torch.float16).numpy())
    return maps


def _bf16_bits(fmap16: np.ndarray) -> np.ndarray:
    return torch.from_numpy(fmap16.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _from_bf16(bits: np.ndarray) -> np.ndarray:
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy().astype(np.float16)


def encodings():
    """name -> (write(h5, fmap16), read(h5) -> float16 array)."""
    def plain(**filters):
        def write(f, m):
            f.create_dataset("m", data=m, chunks=m.shape if filters else None, **filters)

        def read(f):
            return f["m"][()]
        return write, read

    def bf16(**filters):
        def write(f, m):
            bits = _bf16_bits(m)
            f.create_dataset("m", data=bits, chunks=bits.shape, **filters)

        def read(f):
            return _from_bf16(f["m"][()])
        return write, read

    def sparse(**filters):
        def write(f, m):
            nonzero = m != 0
            f.create_dataset("mask", data=np.packbits(nonzero.reshape(-1)))
            values = m[nonzero]
            f.create_dataset("values", data=values, chunks=(max(1, values.size),) if filters else None, **filters)
            f.attrs["shape"] = m.shape

        def read(f):
            shape = tuple(f.attrs["shape"])
            mask = np.unpackbits(f["mask"][()], count=int(np.prod(shape))).astype(bool)
            out = np.zeros(mask.size, np.float16)
            out[mask] = f["values"][()]
            return out.reshape(shape)
        return write, read

    table = {
        "f16 raw": plain(),
        "f16 shuffle+lzf": plain(shuffle=True, compression="lzf"),
        "f16 shuffle+gzip1": plain(shuffle=True, compression="gzip", compression_opts=1),
        "f16 shuffle+gzip4": plain(shuffle=True, compression="gzip", compression_opts=4),
        "f16 shuffle+gzip9": plain(shuffle=True, compression="gzip", compression_opts=9),
        "bf16 shuffle+lzf": bf16(shuffle=True, compression="lzf"),
        "bf16 shuffle+gzip1": bf16(shuffle=True, compression="gzip", compression_opts=1),
        "sparse f16": sparse(),
        "sparse f16 shuffle+lzf": sparse(shuffle=True, compression="lzf"),
        "sparse f16 shuffle+gzip1": sparse(shuffle=True, compression="gzip", compression_opts=1),
        "sparse f16 shuffle+gzip4": sparse(shuffle=True, compression="gzip", compression_opts=4),
    }
    try:
        import hdf5plugin
    except ImportError:
        return table
    table["f16 bitshuffle+lz4"] = plain(**hdf5plugin.Bitshuffle(cname="lz4"))
    table["f16 bitshuffle+zstd"] = plain(**hdf5plugin.Bitshuffle(cname="zstd"))
    table["f16 zstd3"] = plain(**hdf5plugin.Zstd(clevel=3))
    table["f16 blosc shuffle+lz4"] = plain(**hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    return table


def measure(maps: list[np.ndarray], rounds: int, workdir: Path) -> dict[str, dict]:
    table = encodings()
    times = {name: {"write": [], "read": []} for name in table}
    sizes = {name: 0 for name in table}
    errors = {name: 0.0 for name in table}
    for round_index in range(rounds):
        for name, (write, read) in table.items():  # interleaved: every encoding sees the same machine state
            for i, m in enumerate(maps):
                path = workdir / f"{abs(hash(name))}_{i}.h5"
                t0 = time.perf_counter()
                with h5py.File(path, "w") as f:
                    write(f, m)
                t1 = time.perf_counter()
                with h5py.File(path, "r") as f:
                    back = read(f)
                t2 = time.perf_counter()
                times[name]["write"].append(t1 - t0)
                times[name]["read"].append(t2 - t1)
                if round_index == 0:
                    sizes[name] += path.stat().st_size
                    scale = float(np.abs(m.astype(np.float32)).max()) or 1.0
                    errors[name] = max(errors[name], float(np.abs(back.astype(np.float32) - m).max()) / scale)
                path.unlink()
    return {name: {"bytes": sizes[name] / len(maps), "write_ms": 1e3 * statistics.median(times[name]["write"]),
                   "read_ms": 1e3 * statistics.median(times[name]["read"]), "max_rel_error": errors[name]}
            for name in table}


def report(title: str, maps: list[np.ndarray], results: dict[str, dict]) -> None:
    zeros = float(np.mean([np.mean(m == 0) for m in maps]))
    raw = results["f16 raw"]["bytes"]
    print(f"\n{title}: {len(maps)} maps of {maps[0].shape} (C, H, W), {100 * zeros:.1f}% zeros")
    print(f"{'encoding':<26}{'KB/image':>10}{'ratio':>8}{'write ms':>10}{'read ms':>9}{'max rel err':>13}")
    for name, r in results.items():
        print(f"{name:<26}{r['bytes'] / 1e3:>10.1f}{raw / r['bytes']:>8.2f}{r['write_ms']:>10.2f}{r['read_ms']:>9.2f}"
              f"{r['max_rel_error']:>13.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--scale", type=int, default=688)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--weights", type=Path, default=None, help="a trained sppcli checkpoint to measure too")
    args = parser.parse_args()
    torch.set_num_threads(2)
    images = [render_image(7, i, size=(500, 375))[0] for i in range(args.images)]
    nets = []
    torch.manual_seed(0)
    nets.append(("random full-width ZF-5", build_net({"trunk": "zf5", "width": 1.0, "num_classes": 10}).eval()))
    if args.weights is not None:
        nets.append((f"trained {args.weights}", load_weights(args.weights).net.eval()))
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for title, net in nets:
            maps = conv5_maps(net, images, args.scale)
            results = measure(maps, args.rounds, Path(tmp))
            report(title, maps, results)
            best = min(results, key=lambda n: results[n]["bytes"] if results[n]["max_rel_error"] == 0 else np.inf)
            summary.append(f"{'random' if 'random' in title else 'trained'}_ratio="
                           f"{results['f16 raw']['bytes'] / results['f16 shuffle+gzip1']['bytes']:.2f}"
                           f" smallest_lossless={best.replace(' ', '_')}")
    print("\nstorage: " + " ".join(summary))


if __name__ == "__main__":
    main()
