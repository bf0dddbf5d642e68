"""spp_pool must equal, bit for bit, the per-window adaptive_max_pool2d loop."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import sppcli.ops.spp_pool as spp_module
from sppcli.ops.geometry import receptive_field, window_to_cells
from sppcli.ops.spp_pool import pooled_dim, spp_pool, spp_pool_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LEVEL_SETS = [(1, 2, 3, 6), (4, 3, 2, 1), (5,), (7, 1), (2, 4, 8)]


@pytest.fixture(autouse=True, params=["numba", "torch"])
def cpu_path(request, monkeypatch):
    """Every test runs on both CPU implementations: the numba kernel and the torch path that
    serves CUDA maps and machines without numba."""
    if request.param == "numba" and spp_module._cpu_kernel() is None:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(spp_module, "_USE_NUMBA", request.param == "numba")
    return request.param


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """The reference loop makes thousands of tiny adaptive_max_pool2d calls, each of which opens
    an OpenMP parallel region; on a busy machine the thread hand-offs make it 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def every_window(height: int, width: int) -> torch.Tensor:
    """All inclusive windows (x1, y1, x2, y2) of a height x width map."""
    rows = [
        (x1, y1, x2, y2)
        for y1 in range(height) for y2 in range(y1, height)
        for x1 in range(width) for x2 in range(x1, width)
    ]
    return torch.tensor(rows, dtype=torch.long)


def test_pooled_dim():
    assert pooled_dim(256) == 256 * 50
    assert pooled_dim(256, (4, 3, 2, 1)) == 256 * 30


def test_adaptive_bins_hand_worked():
    # One channel, one row [5, 1, 2]; a 1 x 3 window in 2 x 2 bins:
    # x bins [floor(0*3/2), ceil(1*3/2)) = [0, 2) -> max 5 and [floor(3/2), ceil(6/2)) = [1, 3) -> 2;
    # both y bins are row 0 (a bin larger than the window repeats it).
    fmap = torch.tensor([[[5.0, 1.0, 2.0]]])
    cells = torch.tensor([[0, 0, 2, 0]])
    assert spp_pool(fmap, cells, (2,)).tolist() == [[5.0, 2.0, 5.0, 2.0]]
    assert spp_pool_reference(fmap, cells, (2,)).tolist() == [[5.0, 2.0, 5.0, 2.0]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_every_window_of_a_small_map(device, levels):
    # Every shape from 1 x 1 to the full map, single rows and columns, windows smaller than
    # the 6 x 6 (and 8 x 8) bin grids; negative values.
    generator = torch.Generator().manual_seed(0)
    fmap = torch.randn(3, 5, 8, generator=generator).to(device)
    cells = every_window(5, 8).to(device)
    expected = spp_pool_reference(fmap, cells, levels)
    got = spp_pool(fmap, cells, levels)
    assert got.shape == (cells.shape[0], pooled_dim(3, levels))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("height, width", [(1, 1), (1, 5), (4, 1), (3, 2)])
def test_maps_smaller_than_the_finest_grid(height, width):
    generator = torch.Generator().manual_seed(height * 10 + width)
    fmap = torch.randn(4, height, width, generator=generator)
    cells = every_window(height, width)
    assert torch.equal(spp_pool(fmap, cells), spp_pool_reference(fmap, cells))


def test_ties_and_float16():
    generator = torch.Generator().manual_seed(1)
    # Few distinct values, so almost every bin has several maxima.
    fmap = torch.randint(-2, 3, (5, 7, 8), generator=generator).float()
    cells = every_window(7, 8)
    assert torch.equal(spp_pool(fmap, cells), spp_pool_reference(fmap, cells))
    half = torch.randn(5, 7, 8, generator=generator).half()
    got = spp_pool(half, cells)
    assert got.dtype == torch.float16
    assert torch.equal(got, spp_pool_reference(half, cells))


@pytest.mark.parametrize("channels", [16, 6, 3])
def test_float16_rows_of_every_alignment(channels):
    # 16 channels: every level's columns start on a multiple of 4 (the 2x2 and 6x6 levels are
    # written four bins to a word); 6 and 3: they do not (one element at a time).
    generator = torch.Generator().manual_seed(channels)
    fmap = torch.randn(channels, 19, 23, generator=generator).clamp(min=0).half()
    cells = every_window(19, 23)[::5]
    expected = spp_pool_reference(fmap, cells)
    for levels in ((1, 2, 3, 6), (6, 3, 2, 1), (2,), (4, 2)):
        assert torch.equal(spp_pool(fmap, cells, levels), spp_pool_reference(fmap, cells, levels))
    assert torch.equal(spp_pool(fmap, cells), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_conv5_sized_map_with_mapped_proposals_and_duplicates(device):
    generator = torch.Generator().manual_seed(2)
    fmap = torch.randn(16, 43, 57, generator=generator).clamp(min=0).to(device)
    corners = torch.rand(300, 2, generator=generator) * torch.tensor([900.0, 680.0])
    sides = torch.exp(torch.rand(300, 2, generator=generator) * 6)
    boxes = torch.cat([corners, corners + sides], dim=1)
    cells = window_to_cells(boxes, receptive_field([(7, 2, 1), (3, 2, 0), (5, 2, 2), (3, 2, 0)]), 43, 57)
    cells = torch.cat([cells, cells[:40], cells[5:6].repeat(10, 1)]).to(device)
    expected = spp_pool_reference(fmap, cells)
    assert torch.equal(spp_pool(fmap, cells), expected)
    assert torch.equal(spp_pool(fmap, cells, _dedup=False), expected)


@pytest.mark.parametrize("chunk_bytes, sparse_limit", [(1, 0.5), (3000, 0.0), (3000, 1.0), (10**9, 0.5)])
def test_chunking_and_both_correction_strategies(monkeypatch, chunk_bytes, sparse_limit):
    # Chunks of one window, a few windows and all windows; corner corrections gathered for
    # every bin (limit 0) or only for the bins that need them (limit 1).
    monkeypatch.setattr(spp_module, "_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(spp_module, "_SPARSE_LIMIT", sparse_limit)
    generator = torch.Generator().manual_seed(3)
    fmap = torch.randn(2, 13, 11, generator=generator)
    distinct = every_window(13, 11)[::7]
    # A run of repeats between two runs of new windows: with dedup, the chunks of distinct
    # windows write a contiguous run of output rows, except those that straddle the repeats.
    repeats = distinct[torch.randint(0, 295, (97,), generator=generator)]
    cells = torch.cat([distinct[:295], repeats, distinct[295:]])
    for levels in [(1, 2, 3, 6), (3,)]:
        expected = spp_pool_reference(fmap, cells, levels)
        assert torch.equal(spp_pool(fmap, cells, levels), expected)
        assert torch.equal(spp_pool(fmap, cells, levels, _dedup=False), expected)


def test_reference_is_the_documented_loop():
    generator = torch.Generator().manual_seed(4)
    fmap = torch.randn(2, 4, 5, generator=generator)
    x1, y1, x2, y2 = 1, 0, 3, 2
    row = torch.cat([F.adaptive_max_pool2d(fmap[:, y1:y2 + 1, x1:x2 + 1], n).flatten() for n in (1, 2, 3, 6)])
    assert torch.equal(spp_pool_reference(fmap, torch.tensor([[x1, y1, x2, y2]]))[0], row)
    # Channel-major within a level: the first 2 x 2 block of level 2 belongs to channel 0.
    assert torch.equal(row[2:6], F.adaptive_max_pool2d(fmap[0:1, 0:3, 1:4], 2).flatten())


def test_nan_propagates_like_adaptive_pooling_and_grad_is_dropped():
    generator = torch.Generator().manual_seed(5)
    fmap = torch.randn(3, 6, 7, generator=generator)
    fmap[1, 2, 3] = float("nan")
    cells = every_window(6, 7)
    expected = spp_pool_reference(fmap, cells)
    got = spp_pool(fmap.requires_grad_(), cells)
    assert not got.requires_grad
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().any()
    assert torch.equal(got.nan_to_num(0.0), expected.nan_to_num(0.0))


def test_empty_cells():
    fmap = torch.randn(8, 5, 5)
    out = spp_pool(fmap, torch.zeros(0, 4, dtype=torch.long))
    assert out.shape == (0, 8 * 50) and out.dtype == fmap.dtype


@pytest.mark.parametrize("bad", [[0, 0, 5, 0], [2, 0, 1, 0], [-1, 0, 0, 0], [0, 0, 0, 4]])
def test_invalid_cells_are_rejected(bad):
    with pytest.raises(ValueError):
        spp_pool(torch.randn(2, 4, 5), torch.tensor([bad]))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        spp_pool(torch.randn(2, 4, 5), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError):
        spp_pool(torch.randn(2, 4, 5), torch.tensor([[0, 0, 1, 1]]), levels=(0,))
    with pytest.raises(ValueError):
        spp_pool(torch.randn(4, 5), torch.tensor([[0, 0, 1, 1]]))


def test_without_numba_the_torch_path_answers(monkeypatch, cpu_path):
    if cpu_path == "torch":
        pytest.skip("one run is enough")
    # numba missing: importing the kernel module fails, and spp_pool falls back to torch.
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(sys.modules, "sppcli.ops._spp_pool_numba", raising=False)
    monkeypatch.setattr(spp_module, "_numba_module", None)
    assert spp_module._cpu_kernel() is None
    generator = torch.Generator().manual_seed(6)
    fmap = torch.randn(3, 6, 7, generator=generator)
    cells = every_window(6, 7)
    assert torch.equal(spp_pool(fmap, cells), spp_pool_reference(fmap, cells))
