"""Per-image work: serially, in local processes (joblib/loky), or on a Dask cluster.

Every per-image stage funnels through :func:`map_images` so that the choice of engine is one
option (``--workers N``, ``--scheduler tcp://host:8786``) and not a property of each stage.
Workers write their own per-image HDF5 files and return small summaries; nothing large crosses
process boundaries, and no two processes ever write the same file.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "img",
             disable: bool | None = None) -> Iterator[T]:
    """A tqdm bar on stderr (never stdout: ``--json`` output must stay parseable)."""
    from tqdm.auto import tqdm

    if disable is None:
        disable = os.environ.get("SPPCLI_NO_PROGRESS") == "1"
    return iter(tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable,
                     dynamic_ncols=True, mininterval=0.5))


@contextlib.contextmanager
def _dask_backend(scheduler: str):
    try:
        from dask.distributed import Client
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError("--scheduler needs dask.distributed: pip install 'sppcli[dask]'") from e
    import joblib

    with Client(scheduler) as client, joblib.parallel_config(backend="dask"):
        yield client


def map_images(fn: Callable[[Any], T], items: Sequence[Any], workers: int = 1,
               scheduler: str | None = None, desc: str = "", unit: str = "img") -> list[T]:
    """``[fn(item) for item in items]`` with a progress bar, in order.

    ``workers <= 1`` and no scheduler: in this process (debuggable, no pickling).
    ``workers > 1``: joblib's loky processes on this machine.
    ``scheduler``: joblib's dask backend on that cluster; ``fn`` and items must be picklable and
    every worker must see the same file system paths (the artifact root, the dataset).
    """
    if not items:
        return []
    if scheduler is None and workers <= 1:
        return [fn(item) for item in progress(items, total=len(items), desc=desc, unit=unit)]

    from joblib import Parallel, delayed

    def run(n_jobs: int) -> list[T]:
        # return_as="generator" keeps results flowing so the bar moves as images finish.
        gen = Parallel(n_jobs=n_jobs, return_as="generator", batch_size=1)(delayed(fn)(it) for it in items)
        return list(progress(gen, total=len(items), desc=desc, unit=unit))

    if scheduler is not None:
        with _dask_backend(scheduler):
            return run(-1)
    return run(workers)


_WORKER_ERROR = "in DataLoader worker process"


def worker_errors_unwrapped(loader: Iterable[T]) -> Iterator[T]:
    """Iterate a torch DataLoader; an error raised in one of its worker processes comes out as
    the original exception type and one-line message (e.g. a corrupt image naming its file)
    instead of the DataLoader's "Caught ... in DataLoader worker process" plus traceback."""
    try:
        yield from loader
    except Exception as error:
        message = str(error)
        if _WORKER_ERROR not in message:
            raise
        kind = type(error)
        # The traceback's last entry is "<module>.<Name>: <message>" (or "<Name>: ...").
        original = message
        for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
            if prefix in message:
                original = message.rpartition(prefix)[2].strip()
                break
        try:
            unwrapped = kind(original)
        except Exception:  # an exception type that needs other arguments
            unwrapped = RuntimeError(original)
        raise unwrapped from None


@contextlib.contextmanager
def single_torch_thread():
    """Run torch single-threaded inside the block (restoring the count after); also a decorator.

    Pooling is thousands of small gathers and maxima; splitting each across OpenMP threads gains
    little, and when the cores are busy (``--workers`` processes, or other jobs) every one of those
    small parallel regions waits for a descheduled thread: on a loaded 2-core machine one image's
    2,000 windows took a median 8.5 s with 2 threads against 0.44 s with 1. Parallelism comes from
    ``--workers`` processes instead.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


VALID_DEVICES = "auto, cpu, cuda, cuda:N, mps"


def resolve_device(device: str) -> str:
    """``--device``: ``auto`` becomes ``cuda`` when CUDA is available, else ``cpu``.

    Raises:
        ValueError: an unknown device name (the message lists the valid ones), or a device this
            machine does not have.
    """
    import re

    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", device or ""):
        raise ValueError(f"--device {device}: unknown device; valid values: {VALID_DEVICES}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), numbered from 0")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: MPS (Apple GPU) is not available on this machine; use --device cpu")
    return device
