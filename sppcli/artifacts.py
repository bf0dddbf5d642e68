"""Content-keyed, resumable, atomically written stage artifacts (DESIGN section 2).

Layout under the artifact root (``--cache-dir``, default ``cache/``)::

    <root>/<stage>/<dataset>/<key12>/manifest.json     written last; "complete": true means done
    <root>/<stage>/<dataset>/<key12>/items/<id>.h5     per-image outputs of per-image stages
    <root>/<stage>/<dataset>/<key12>/...               whole-stage outputs (models, tables, PNGs)
    <root>/<stage>/<dataset>/LATEST                    key of the newest complete run

A stage's key hashes canonical JSON of {stage, VERSION, params, upstream keys, external file
digests}. Downstream stages hash upstream *keys*, never feature content, so checking whether a
stage is up to date costs a few small JSON reads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

KEY_LENGTH = 12
MANIFEST = "manifest.json"
ITEMS = "items"
LATEST = "LATEST"
_DIGEST_MEMO = ".digests.json"


class ArtifactError(RuntimeError):
    """A required artifact is missing or unusable; the message says which command makes it."""


# ---------------------------------------------------------------------------------------------
# atomic writes


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces ``path`` only if the block succeeds.

    For writers that want a file name (h5py, np.savez, torch.save, PIL) rather than bytes.
    A crash or Ctrl-C inside the block leaves ``path`` untouched and removes the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last: np.savez and PIL pick behaviour from it.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{time.monotonic_ns()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_number(value: Any, digits: int | None = None) -> float | None:
    """A float for a JSON artifact: NaN (e.g. AP of a class without ground truth) and None
    become null, since standard JSON has no NaN; ``digits`` rounds."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return None
    return value if digits is None else round(value, digits)


def item_attrs(items_dir: Path, ids: Iterable[str], attrs: Iterable[str]) -> dict[str, list]:
    """Each named HDF5 attribute of every item, and ``bytes`` (file sizes), in ``ids`` order.

    The per-item numbers a per-image stage writes into its items (``conv_seconds``,
    ``seconds``...) are summarised for its manifest from these.
    """
    import h5py

    attrs = list(attrs)
    values: dict[str, list] = {name: [] for name in attrs + ["bytes"]}
    for image_id in ids:
        path = Path(items_dir) / f"{image_id}.h5"
        with h5py.File(path, "r") as f:
            for name in attrs:
                values[name].append(f.attrs[name])
        values["bytes"].append(path.stat().st_size)
    return values


def item_means(items_dir: Path, ids: Iterable[str], attrs: Iterable[str]) -> dict[str, float | None]:
    """Mean over the items of each named scalar attribute, and ``bytes`` (mean file size);
    None when there are no items."""
    values = item_attrs(items_dir, ids, attrs)
    return {name: (float(sum(v)) / len(v) if v else None) for name, v in values.items()}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


# ---------------------------------------------------------------------------------------------
# digests of external files


class FileDigests:
    """sha256 of external files, memoised by (path, size, mtime) in a JSON file under the root.

    Annotations and weights are hashed by content so that copying a dataset elsewhere keeps its
    keys, but a 500 MB weights file or 5,000 XML files are only read again when they change.
    """

    def __init__(self, root: Path):
        self.memo_path = Path(root) / _DIGEST_MEMO
        self._memo: dict[str, list] | None = None
        self._dirty = False

    def _load(self) -> dict[str, list]:
        if self._memo is None:
            try:
                self._memo = json.loads(self.memo_path.read_text())
            except (FileNotFoundError, ValueError):
                self._memo = {}
        return self._memo

    def file(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        memo = self._load()
        stamp = [st.st_size, st.st_mtime_ns]
        hit = memo.get(str(path))
        if hit is not None and hit[:2] == stamp:
            return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        memo[str(path)] = stamp + [h.hexdigest()]
        self._dirty = True
        return h.hexdigest()

    def files(self, paths: Iterable[Path], base: Path | None = None) -> str:
        """One digest for a set of files, naming each by its path relative to ``base``."""
        h = hashlib.sha256()
        for p in sorted(Path(p) for p in paths):
            name = str(p.relative_to(base)) if base is not None else p.name
            h.update(f"{name}\0{self.file(p)}\n".encode())
        self.save()
        return h.hexdigest()

    def save(self) -> None:
        if self._dirty and self._memo is not None:
            with contextlib.suppress(OSError):  # a read-only cache only loses the memo
                atomic_write_json(self.memo_path, self._memo)
            self._dirty = False


# ---------------------------------------------------------------------------------------------
# keys and manifests


def stage_key(stage: str, version: int, params: Mapping[str, Any], upstream: Mapping[str, str],
              external: Mapping[str, str]) -> str:
    """Content key of a stage run: a Merkle link over its params, code VERSION and inputs."""
    doc = {"stage": stage, "version": int(version), "params": params,
           "upstream": dict(upstream), "external": dict(external)}
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


@dataclasses.dataclass
class Manifest:
    stage: str
    dataset: str
    key: str
    version: int
    params: dict
    upstream: dict  # stage name -> key
    external: dict  # name -> digest
    complete: bool = False
    created: float = 0.0
    n_items: int | None = None
    outputs: dict = dataclasses.field(default_factory=dict)  # relative path -> bytes
    metrics: dict = dataclasses.field(default_factory=dict)
    timings: dict = dataclasses.field(default_factory=dict)
    environment: dict = dataclasses.field(default_factory=dict)
    dir: Path | None = dataclasses.field(default=None, compare=False)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("dir")
        return d

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        d = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        m = cls(**{k: v for k, v in d.items() if k in known and k != "dir"})
        m.dir = Path(path).parent
        return m

    def path(self, name: str) -> Path:
        assert self.dir is not None
        return self.dir / name

    def item_path(self, image_id: str) -> Path:
        return self.path(ITEMS) / f"{image_id}.h5"


def environment_info(device: str | None = None) -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "argv": sys.argv[1:]}
    for mod in ("numpy", "torch", "h5py", "sklearn", "cv2"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    if device:
        info["device"] = device
    return info


def describe_changes(old: Manifest, new_version: int, new_params: Mapping, new_upstream: Mapping,
                     new_external: Mapping) -> list[str]:
    """Human reasons why ``old`` does not match the run asked for, cheapest checks first."""
    reasons = []
    if old.version != new_version:
        reasons.append(f"code VERSION {old.version} -> {new_version}")
    for k in sorted(set(old.params) | set(new_params)):
        a, b = old.params.get(k, "<unset>"), new_params.get(k, "<unset>")
        if canonical_json(a) != canonical_json(b):
            reasons.append(f"params changed: {old.stage}.{k} {_short(a)} -> {_short(b)}")
    for k in sorted(set(old.upstream) | set(new_upstream)):
        if old.upstream.get(k) != new_upstream.get(k):
            reasons.append(f"upstream {k} changed")
    for k in sorted(set(old.external) | set(new_external)):
        if old.external.get(k) != new_external.get(k):
            reasons.append(f"external input changed: {k}")
    return reasons or ["key changed"]


def _short(v: Any) -> str:
    s = canonical_json(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ---------------------------------------------------------------------------------------------
# the store


@dataclasses.dataclass(frozen=True)
class StageState:
    """What ``sppcli status`` says of one stage: complete / partial / stale / missing."""

    state: str
    reasons: tuple[str, ...] = ()
    manifest: Manifest | None = None
    done_items: int = 0
    total_items: int | None = None
    size_bytes: int = 0


class ArtifactStore:
    def __init__(self, root: Path | str = "cache"):
        self.root = Path(root)
        self.digests = FileDigests(self.root)

    # -- locations
    def dataset_dir(self, stage: str, dataset: str) -> Path:
        return self.root / stage / dataset

    def run_dir(self, stage: str, dataset: str, key: str) -> Path:
        return self.dataset_dir(stage, dataset) / key[:KEY_LENGTH]

    # -- lookups
    def manifest(self, stage: str, dataset: str, key: str) -> Manifest | None:
        path = self.run_dir(stage, dataset, key) / MANIFEST
        if not path.exists():
            return None
        m = Manifest.read(path)
        return m if m.key == key else None

    def latest(self, stage: str, dataset: str) -> Manifest | None:
        """The newest complete run of ``stage`` on ``dataset``, or None."""
        pointer = self.dataset_dir(stage, dataset) / LATEST
        try:
            key = pointer.read_text().strip()
        except FileNotFoundError:
            return None
        m = self.manifest(stage, dataset, key)
        return m if m is not None and m.complete else None

    def state(self, stage: str, dataset: str, key: str, version: int, params: Mapping,
              upstream: Mapping, external: Mapping, total_items: int | None = None) -> StageState:
        """Classify the run that ``key`` names, explaining why it is not complete."""
        run_dir = self.run_dir(stage, dataset, key)
        m = self.manifest(stage, dataset, key)
        size = _tree_size(run_dir)
        if m is not None and m.complete:
            return StageState("complete", manifest=m, size_bytes=size,
                              done_items=m.n_items or 0, total_items=m.n_items)
        done = _count_items(run_dir)
        if run_dir.exists():
            return StageState("partial", (f"partial: {done} of {total_items if total_items is not None else '?'} images",),
                              done_items=done, total_items=total_items, size_bytes=size)
        old = self.latest(stage, dataset)
        if old is not None:
            return StageState("stale", tuple(describe_changes(old, version, params, upstream, external)),
                              manifest=old, size_bytes=_tree_size(old.dir) if old.dir else 0)
        return StageState("missing", ("missing",))

    def begin(self, stage: str, dataset: str, version: int, params: Mapping, upstream: Mapping[str, str],
              external: Mapping[str, str], force: bool = False) -> "StageRun":
        key = stage_key(stage, version, params, upstream, external)
        run_dir = self.run_dir(stage, dataset, key)
        if force and run_dir.exists():
            _remove_tree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(stage=stage, dataset=dataset, key=key, version=int(version),
                            params=json.loads(canonical_json(dict(params))), upstream=dict(upstream),
                            external=dict(external), dir=run_dir)
        return StageRun(self, manifest)


def _count_items(run_dir: Path) -> int:
    items = run_dir / ITEMS
    if not items.is_dir():
        return 0
    return sum(1 for p in items.iterdir() if p.suffix == ".h5" and not p.name.startswith("."))


def _tree_size(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _remove_tree(path: Path) -> None:
    import shutil

    # Rename first so that a crash half-way through deletion never leaves a half-deleted run
    # directory that looks like a resumable partial run.
    doomed = path.with_name(f".{path.name}.deleting.{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class StageRun:
    """An open (possibly resumed) run directory of one stage; ``finish`` makes it complete."""

    def __init__(self, store: ArtifactStore, manifest: Manifest):
        self.store = store
        self.manifest = manifest
        self.dir: Path = manifest.dir  # type: ignore[assignment]
        self.items_dir = self.dir / ITEMS
        self.started = time.time()

    @property
    def key(self) -> str:
        return self.manifest.key

    def item_path(self, image_id: str) -> Path:
        return self.items_dir / f"{image_id}.h5"

    def has_item(self, image_id: str) -> bool:
        return self.item_path(image_id).exists()

    def pending(self, image_ids: Iterable[str]) -> list[str]:
        return [i for i in image_ids if not self.has_item(i)]

    @contextlib.contextmanager
    def write_item(self, image_id: str) -> Iterator[Any]:
        """Open ``items/<id>.h5`` for writing; it appears under its real name only when complete."""
        import h5py

        with atomic_path(self.item_path(image_id)) as tmp:
            with h5py.File(tmp, "w") as f:
                yield f

    def finish(self, metrics: Mapping | None = None, timings: Mapping | None = None,
               n_items: int | None = None, device: str | None = None) -> Manifest:
        m = self.manifest
        m.metrics.update(metrics or {})
        m.timings.update(timings or {})
        m.timings.setdefault("wall_seconds", round(time.time() - self.started, 3))
        m.n_items = n_items
        m.outputs = {str(p.relative_to(self.dir)): p.stat().st_size
                     for p in sorted(self.dir.rglob("*")) if p.is_file() and not p.name.startswith(".")
                     and p.name != MANIFEST}
        m.environment = environment_info(device)
        m.created = time.time()
        m.complete = True
        atomic_write_json(self.dir / MANIFEST, m.to_json())
        atomic_write_bytes(self.dir.parent / LATEST, (m.key + "\n").encode())
        return m
