"""What each training or test rule does to detection mAP on the embedded data.

Runs the demo pipeline (pipelines/demo.toml, after `make demo` has made the dataset and the
pretrained net) once per variant, each a set of `--set` overrides on top of the demo's config,
and prints the test mAP of the Table 6 rows asked for (default: ftfc7 bb). Variants share every
artifact they can (the cache is content-keyed), so only the stages a rule touches run again.
Nothing is tuned: every variant is run once, as listed, and the numbers are what the test split
gives.

    python bench/bench_rules.py                    # the release's rules (issue list below)
    python bench/bench_rules.py --rows pool5 ftfc7bb --variant "3 scales" features.scales=[180,240,320]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MULTI = ("features.scales=[180,240,320]",)

# name -> overrides; each compared with the one it names as its base
RULES = [
    ("demo defaults (release test order, per-class cap)", (), None),
    ("test order: regress first, NMS once", ("detect.order=regress_first",), 0),
    ("SVM negatives: release's identical-cells dedup", ('svm.neg_dedup="cells"',), 0),
    ("fine-tuning on flipped images too", ("finetune.flip=true",), 0),
    ("3 scales (180, 240, 320), target 224", MULTI, None),
    ("3 scales, release's target 208", MULTI + ("pool.target_size=208",), 4),
    ("3 scales, fine-tuning at random scales", MULTI + ("finetune.random_scale=true",), 4),
    ("3 scales, all of the release's rules", MULTI + ("pool.target_size=208", "finetune.random_scale=true",
                                                      "finetune.flip=true", 'svm.neg_dedup="cells"'), 4),
]

STAGES = [("proposals", "trainval"), ("proposals", "test"), ("extract-features", "trainval"),
          ("extract-features", "test"), ("pool-windows", "trainval"), ("pool-windows", "test"),
          ("finetune-fc", None), ("train-bbox-reg", None)]
PER_ROW = ["train-svm", "detect", "evaluate"]


def sppcli(args: list[str]) -> str:
    result = subprocess.run([sys.executable, "-m", "sppcli", *args], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sppcli {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def run_variant(overrides: tuple[str, ...], rows: list[str], cache: str) -> dict[str, float]:
    common = ["--config", "pipelines/demo.toml", "--cache-dir", cache, "-q"]
    for item in overrides:
        common += ["--set", item]
    for command, split in STAGES:
        sppcli([command, *common] + (["--split", split] if split else []) + (
            ["--workers", "2"] if command in ("proposals", "pool-windows") else []))
    out = {}
    for row in rows:
        for command in PER_ROW:
            sppcli([command, *common, "--variant", row] + (["--json"] if command == "evaluate" else []))
        out[row] = json.loads(sppcli(["evaluate", *common, "--variant", row, "--json"]))["mAP"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=["ftfc7bb"])
    parser.add_argument("--cache-dir", default="cache")
    parser.add_argument("--variant", nargs="+", action="append", default=None, metavar="NAME SET...",
                        help="run only this variant: a name, then section.key=value overrides")
    args = parser.parse_args()
    rules = [(v[0], tuple(v[1:]), None) for v in args.variant] if args.variant else RULES
    results = []
    for name, overrides, base in rules:
        maps = run_variant(overrides, args.rows, args.cache_dir)
        results.append(maps)
        delta = ""
        if base is not None:
            delta = "  (" + ", ".join(f"{100 * (maps[r] - results[base][r]):+.1f} vs {rules[base][0]!r}"
                                      for r in args.rows) + ")"
        print(f"{name:<52} " + " ".join(f"{r} {100 * maps[r]:.1f}" for r in args.rows) + delta, flush=True)


if __name__ == "__main__":
    main()
