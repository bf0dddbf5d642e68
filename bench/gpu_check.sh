#!/usr/bin/env bash
# The CUDA paths, once, on a machine with a GPU (the project's device sessions; ~15 minutes of
# device time a task, so this stays under 8 minutes): extract-features on the GPU against the CPU,
# spp_pool on the GPU (bit-identical to the CPU, and its speed), the fc head, and the Table 6
# comparison with the R-CNN baseline on the GPU. Appends the rows, with the card's name, to
# bench/RESULTS.md. Never part of `make test`.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   SPPCLI_GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh   # a dry run of the script itself, here
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${SPPCLI_GPU_CHECK_DEVICE:-cuda}"
PY=python3
if [ ! -x .venv/bin/python ]; then
  # A CUDA build of torch: the device machine's own index (its README says which), or PyPI's default.
  $PY -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "${TORCH_SPEC:-torch}"
  .venv/bin/pip install -q -e ".[test]"
fi
PY=.venv/bin/python
OUT=$(mktemp -d)
card=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA (dry run on CPU)')")
echo "device: $card ($DEVICE)"

timeout 150 $PY - "$DEVICE" > "$OUT/pool.txt" <<'EOF'
import sys, time, statistics, torch
from sppcli.ops.spp_pool import spp_pool
from sppcli.ops.geometry import receptive_field, window_to_cells
device = sys.argv[1]
torch.manual_seed(0)
fmap = torch.relu(torch.randn(256, 43, 57))
geometry = receptive_field([(7, 2, 1), (3, 2, 0), (5, 2, 0), (3, 2, 0), (3, 1, 1), (3, 1, 1), (3, 1, 1)])
g = torch.Generator().manual_seed(0)
sides = torch.exp(torch.empty(2000, 2).uniform_(2.0, 6.8, generator=g)).minimum(torch.tensor([912.0, 688.0]))
corners = torch.rand(2000, 2, generator=g) * (torch.tensor([912.0, 688.0]) - sides)
cells = window_to_cells(torch.cat([corners, corners + sides], 1), geometry, 43, 57)
cpu = spp_pool(fmap, cells)
for dtype in (torch.float32, torch.float16):
    f, c = fmap.to(device, dtype), cells.to(device)
    out = spp_pool(f, c)
    same = torch.equal(out.cpu(), cpu.to(dtype))
    times = []
    for _ in range(10):
        if device == "cuda": torch.cuda.synchronize()
        t = time.perf_counter(); spp_pool(f, c)
        if device == "cuda": torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(f"| spp_pool, 2,000 windows, {str(dtype)[6:]} | {1e3 * statistics.median(times):.2f} ms | equal to CPU: {same} |")
EOF

timeout 150 $PY - "$DEVICE" > "$OUT/fc.txt" <<'EOF'
import sys, time, statistics, torch
from sppcli.nets.heads import FcHead
device = sys.argv[1]
head = FcHead(12800, 4096, 0.5).to(device).eval()
x = torch.randn(2000, 12800, device=device)
for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
    if device == "cpu" and dtype is torch.float16:
        continue
    times = []
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(10):
            if device == "cuda": torch.cuda.synchronize()
            t = time.perf_counter(); head.fc7_features(x)
            if device == "cuda": torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    print(f"| fc6 + fc7, 2,000 windows, {name} | {1e3 * statistics.median(times):.1f} ms | |")
EOF

# extract-features on the device vs the CPU, on the real photos (the stage's own code)
timeout 200 $PY - "$DEVICE" > "$OUT/features.txt" <<'EOF'
import sys, json, tempfile, time
from pathlib import Path
import numpy as np, torch
from sppcli.artifacts import ArtifactStore
from sppcli.config import load_config
from sppcli.nets.checkpoint import build_net, save_checkpoint
from sppcli.pipeline import Planner, RunOptions, run_stage
from sppcli.stages import features
device = sys.argv[1]
root = Path(tempfile.mkdtemp())
arch = {"trunk": "zf5", "width": 1.0, "hidden": 4096, "num_classes": 21}
torch.manual_seed(0); save_checkpoint(root / "w.pt", build_net(arch), arch, {})
devkit = Path("../shared/data/voc-elephants/VOC2007")
if not devkit.exists():
    devkit = Path("/work/shared/data/voc-elephants/VOC2007")
maps = {}
for dev in ("cpu", device):
    config = load_config(None, [f"dataset.devkit={json.dumps(str(devkit))}", f"features.weights={json.dumps(str(root / 'w.pt'))}",
                                'dataset.classes=["elephant"]', 'features.dtype="float32"'])
    planner = Planner(ArtifactStore(root / dev), config)
    t = time.perf_counter()
    m, _ = run_stage(planner, features, planner.plan("features"), RunOptions(device=dev), log=lambda s: None)
    wall = time.perf_counter() - t
    maps[dev] = features.read_feature_item(m.item_path(planner.dataset("trainval").ids[0])).maps[0]
    print(f"| extract-features, {dev}, 688 | {m.metrics['conv_seconds_per_image']:.4f} s/img conv | {wall / m.n_items:.3f} s/img stage |")
a, b = maps["cpu"], maps[device]
print(f"| conv5 maps, {device} vs cpu | max rel diff {float(np.abs(a - b).max() / np.abs(a).max()):.1e} | |")
EOF

timeout 240 $PY bench/bench_rcnn_vs_spp.py --rounds 3 --svd 1024 256 --device "$DEVICE" > "$OUT/table6.txt" 2>&1 || \
  echo "bench_rcnn_vs_spp.py did not finish in 240 s" > "$OUT/table6.txt"

{
  echo
  echo "## \`bench/gpu_check.sh\` on $card, $(date -u +%Y-%m-%d)"
  echo
  echo "| what | time | note |"
  echo "| --- | --- | --- |"
  cat "$OUT/pool.txt" "$OUT/fc.txt" "$OUT/features.txt"
  echo
  echo '```'
  tail -n 14 "$OUT/table6.txt"
  echo '```'
} | tee -a bench/RESULTS.md
