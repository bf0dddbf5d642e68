"""Content-keyed, resumable, atomically written stage artifacts (DESIGN section 2).

Layout under the artifact root (``--cache-dir``, default ``cache/``)::

    <root>/<stage>/<dataset>/<key12>/manifest.json     written last; "complete": true means done
    <root>/<stage>/<dataset>/<key12>/items/<id>.h5     per-image outputs of per-image stages
    <root>/<stage>/<dataset>/<key12>/items/.sums/      size and blake2b of each item, as written
    <root>/<stage>/<dataset>/<key12>/...               whole-stage outputs (models, tables, PNGs)
    <root>/<stage>/<dataset>/LATEST                    key of the newest complete run
    <root>/<stage>/<dataset>/.<key12>.lock[.json]      the run's lock and who holds it
    <root>/<stage>/<dataset>/.<key12>.forced-<pid>/    a --force run, renamed over <key12> when complete

The manifest records every output's size and blake2b: consumers compare sizes before they
start, ``sppcli status --verify`` compares hashes.

A stage's key hashes canonical JSON of {stage, VERSION, params, upstream keys, external file
digests}. Downstream stages hash upstream *keys*, never feature content, so checking whether a
stage is up to date costs a few small JSON reads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import platform
import shutil
import socket
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
SUMS = ".sums"  # items/.sums/<item name>.json: size and blake2b of each item, written with it


class ArtifactError(RuntimeError):
    """A required artifact is missing or unusable; the message says which command makes it."""


class DiskError(ArtifactError):
    """The disk refused a write (full, failing, read-only, over quota). Nothing damaged is left
    under a final name, so rerunning the same command after fixing the disk resumes."""


_DISK_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                errno.EIO: "disk I/O error", errno.EROFS: "read-only file system"}
_DISK_ADVICE = {errno.ENOSPC: "free space and rerun the same command",
                errno.EDQUOT: "free space (or raise the quota) and rerun the same command",
                errno.EIO: "check the disk (dmesg) and rerun the same command",
                errno.EROFS: "give a writable --cache-dir or remount it read-write, then rerun the same command"}


def disk_errno(e: BaseException) -> int | None:
    """The errno of a disk-level failure, or None. h5py raises a bare OSError whose message
    carries the C library's errno (``errno = 28``), so the text is read as well."""
    if not isinstance(e, OSError):
        return None
    if e.errno in _DISK_ERRNOS:
        return e.errno
    text = str(e)
    for code in _DISK_ERRNOS:
        if f"errno = {code}," in text or os.strerror(code) in text:
            return code
    return None


def disk_error(e: OSError, path: Path | str) -> DiskError:
    code = disk_errno(e)
    assert code is not None
    return DiskError(f"{_DISK_ERRNOS[code]} writing {path}; {_DISK_ADVICE[code]}")


@contextlib.contextmanager
def disk_errors_name(path: Path | str) -> Iterator[None]:
    """Inside the block, a disk-level OSError becomes one :class:`DiskError` naming ``path``."""
    try:
        yield
    except OSError as e:
        if disk_errno(e) is None:
            raise
        raise disk_error(e, path) from None


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable: without it a power cut can lose the new name."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if disk_errno(e) is not None:
            raise
    finally:
        os.close(fd)


def file_sum(path: Path) -> tuple[int, str]:
    """(size, blake2b hex) of a file's bytes."""
    h = hashlib.blake2b(digest_size=20)
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _sum_path(item: Path) -> Path:
    return item.parent / SUMS / f"{item.name}.json"


# ---------------------------------------------------------------------------------------------
# atomic writes


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` so that readers see either the old file or the whole new one.

    ``durable=False`` skips the fsyncs, for hints that a reader checks and can rebuild (an
    item's sum): after a power cut such a file may be missing or empty, never half another's."""
    path = Path(path)
    with disk_errors_name(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if disk_errno(e) is not None:
            raise disk_error(e, path) from None
        raise


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode(),
                       durable)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces ``path`` only if the block succeeds.

    For writers that want a file name (h5py, np.savez, torch.save, PIL) rather than bytes.
    A crash or Ctrl-C inside the block leaves ``path`` untouched and removes the temporary file.
    The file's bytes are fsync'd before the rename and the directory after it, so a name that
    survives a power cut names complete bytes. A per-image item (a file in an ``items/`` folder)
    also gets its size and blake2b recorded in ``items/.sums/`` before it takes its name: what
    ``finish`` copies into the manifest and ``sppcli status --verify`` checks. A full or failing
    disk anywhere in the block (the writer, h5py's close, the fsync) becomes one
    :class:`DiskError` naming ``path``.
    """
    path = Path(path)
    with disk_errors_name(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last: np.savez and PIL pick behaviour from it.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{time.monotonic_ns()}.tmp{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if path.parent.name == ITEMS:
            size, digest = file_sum(tmp)
            # finish() re-hashes an item whose sum is missing or unreadable, so it need not be durable
            atomic_write_json(_sum_path(path), {"bytes": size, "blake2b": digest}, durable=False)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if disk_errno(e) is not None and not isinstance(e, DiskError):
            raise disk_error(e, path) from None
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
    checksums: dict = dataclasses.field(default_factory=dict)  # relative path -> blake2b hex
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
        """The manifest at ``path``; :class:`DamagedManifest` if it is not a manifest's JSON."""
        try:
            d = json.loads(Path(path).read_text())
            if not isinstance(d, dict) or "key" not in d:
                raise ValueError("not a manifest")
        except (ValueError, UnicodeDecodeError):
            raise DamagedManifest(Path(path)) from None
        known = {f.name for f in dataclasses.fields(cls)}
        m = cls(**{k: v for k, v in d.items() if k in known and k != "dir"})
        m.dir = Path(path).parent
        return m

    def path(self, name: str) -> Path:
        assert self.dir is not None
        return self.dir / name

    def item_path(self, image_id: str) -> Path:
        return self.path(ITEMS) / f"{image_id}.h5"


class DamagedManifest(ArtifactError):
    """A ``manifest.json`` that does not parse (truncated, overwritten): the run it describes
    cannot be trusted, and only ``--force`` (which builds beside it) replaces it."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.path = Path(path)

    def __str__(self) -> str:
        return f"{self.path} is damaged; rerun with --force to rebuild"


class DamagedItem(ArtifactError):
    """An artifact file whose size differs from its record, or that h5py cannot read.
    ``command`` (when known) rebuilds it."""

    def __init__(self, path: Path | str, command: str = ""):
        super().__init__(str(path), command)
        self.path = Path(path)
        self.command = command

    def __str__(self) -> str:
        fix = self.command or "the command that wrote it, with --force"
        return f"{self.path} is damaged (truncated / unreadable); rebuild it with: {fix}"


@contextlib.contextmanager
def open_item(path: Path | str) -> Iterator[Any]:
    """``h5py.File(path, "r")`` that turns an unreadable file into one :class:`DamagedItem`."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError:
        raise DamagedItem(path) from None
    with f:
        yield f


def check_sizes(manifest: Manifest, command: str = "") -> None:
    """Raise :class:`DamagedItem` for the first output of ``manifest`` whose size is not the
    recorded one (a truncated copy, a disk that lost a tail): one ``stat`` per file."""
    assert manifest.dir is not None
    for rel, size in manifest.outputs.items():
        path = manifest.dir / rel
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            actual = -1
        if actual != size:
            raise DamagedItem(path, command)


def verify(manifest: Manifest) -> list[Path]:
    """The outputs of ``manifest`` whose bytes no longer hash to their record (or are missing)."""
    assert manifest.dir is not None
    bad = []
    for rel, size in sorted(manifest.outputs.items()):
        path = manifest.dir / rel
        try:
            actual_size, digest = file_sum(path)
        except FileNotFoundError:
            bad.append(path)
            continue
        if actual_size != size or (rel in manifest.checksums and manifest.checksums[rel] != digest):
            bad.append(path)
    return bad


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
        """The manifest of this key's run (complete or not), None if it has none;
        :class:`DamagedManifest` if it has one that does not parse."""
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
        size = _tree_size(run_dir)
        try:
            m = self.manifest(stage, dataset, key)
        except DamagedManifest as e:
            return StageState("damaged", (f"damaged: {e.path}",), size_bytes=size)
        if m is not None and m.complete:
            return StageState("complete", manifest=m, size_bytes=size,
                              done_items=m.n_items or 0, total_items=m.n_items)
        done = count_items(run_dir)
        if run_dir.exists():
            if total_items is None:
                # A whole-stage run has no items to count; its folder only says it began.
                why = "started, not finished"
            elif done >= total_items:
                why = (f"started, not finished ({done} of {total_items} images written; "
                       "the stage failed or was stopped before finishing)")
            else:
                why = f"partial: {done} of {total_items} images"
            return StageState("partial", (why,), done_items=done, total_items=total_items, size_bytes=size)
        try:
            old = self.latest(stage, dataset)
        except DamagedManifest:
            old = None
        if old is not None:
            return StageState("stale", tuple(describe_changes(old, version, params, upstream, external)),
                              manifest=old, size_bytes=_tree_size(old.dir) if old.dir else 0)
        return StageState("missing", ("missing",))

    def lock(self, stage: str, dataset: str, key: str) -> "RunLock":
        return RunLock(self.run_dir(stage, dataset, key))

    def begin(self, stage: str, dataset: str, version: int, params: Mapping, upstream: Mapping[str, str],
              external: Mapping[str, str], force: bool = False) -> "StageRun":
        """Open the run directory of this key: resumed as it is, or with ``force`` a fresh
        sibling ``.<key12>.forced-<pid>`` that ``finish`` swaps in, so that the complete run
        stays complete until its replacement is. Call it holding the run's :class:`RunLock`:
        siblings left by forced runs that died are then known to be dead and are removed."""
        key = stage_key(stage, version, params, upstream, external)
        final_dir = self.run_dir(stage, dataset, key)
        for replaced in final_dir.parent.glob(f".{final_dir.name}.replaced-*"):
            if final_dir.exists():  # a swap that died after the new run took the name
                shutil.rmtree(replaced, ignore_errors=True)
            else:  # ... or before: the old complete run goes back
                os.replace(replaced, final_dir)
        for leftover in final_dir.parent.glob(f".{final_dir.name}.forced-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        # Half-written files of a run that was killed (SIGKILL leaves atomic_path no chance to
        # clean up): dead too, for the same reason, and never read, but they hold disk.
        for half_written in (*final_dir.glob(".*.tmp*"), *(final_dir / ITEMS).glob(".*.tmp*")):
            half_written.unlink(missing_ok=True)
        work_dir = final_dir
        if force and final_dir.exists():
            work_dir = final_dir.with_name(f".{final_dir.name}.forced-{os.getpid()}")
        with disk_errors_name(work_dir):
            work_dir.mkdir(parents=True, exist_ok=True)
        manifest = Manifest(stage=stage, dataset=dataset, key=key, version=int(version),
                            params=json.loads(canonical_json(dict(params))), upstream=dict(upstream),
                            external=dict(external), dir=work_dir)
        return StageRun(self, manifest, final_dir)


def count_items(run_dir: Path) -> int:
    items = run_dir / ITEMS
    if not items.is_dir():
        return 0
    return sum(1 for p in items.iterdir() if p.suffix == ".h5" and not p.name.startswith("."))


def _is_output(path: Path, root: Path) -> bool:
    """A file ``finish`` records: not the manifest, nothing hidden (temporaries, item sums)."""
    rel = path.relative_to(root)
    return path.is_file() and rel.name != MANIFEST and not any(part.startswith(".") for part in rel.parts)


def _tree_size(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class StageRun:
    """An open (possibly resumed) run directory of one stage; ``finish`` makes it complete.

    ``dir`` is where the stage writes; for a forced run it is a hidden sibling of
    ``final_dir``, which ``finish`` renames into place.
    """

    def __init__(self, store: ArtifactStore, manifest: Manifest, final_dir: Path | None = None):
        self.store = store
        self.manifest = manifest
        self.dir: Path = manifest.dir  # type: ignore[assignment]
        self.final_dir: Path = final_dir or self.dir
        self.items_dir = self.dir / ITEMS
        self.started = time.time()
        self._progress: tuple[Any, str] | None = None

    @property
    def key(self) -> str:
        return self.manifest.key

    def track_progress(self, done_and_total, unit: str) -> None:
        """Let a whole-stage run say how far it has got (and saved), e.g. epochs:
        ``done_and_total()`` returns ``(done, total)`` when asked, on Ctrl-C."""
        self._progress = (done_and_total, unit)

    def progress(self) -> tuple[int, int, str] | None:
        """(done, total, unit) from :meth:`track_progress`, or None if the stage gave none."""
        if self._progress is None:
            return None
        fn, unit = self._progress
        done, total = fn()
        return int(done), int(total), unit

    @property
    def forced(self) -> bool:
        return self.dir != self.final_dir

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

    def abandon(self) -> None:
        """Drop a forced run's sibling after a failure (a forced run cannot resume)."""
        if self.forced:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _checksums(self, outputs: Iterable[str]) -> dict[str, str]:
        sums = {}
        for rel in outputs:
            path = self.dir / rel
            record = None
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(_sum_path(path).read_text())
            if path.parent.name == ITEMS and record and record.get("bytes") == path.stat().st_size:
                sums[rel] = record["blake2b"]
            else:  # whole-stage outputs, and items written before sums were recorded
                sums[rel] = file_sum(path)[1]
        return sums

    def finish(self, metrics: Mapping | None = None, timings: Mapping | None = None,
               n_items: int | None = None, device: str | None = None) -> Manifest:
        m = self.manifest
        m.metrics.update(metrics or {})
        m.timings.update(timings or {})
        m.timings.setdefault("wall_seconds", round(time.time() - self.started, 3))
        m.n_items = n_items
        m.outputs = {str(p.relative_to(self.dir)): p.stat().st_size
                     for p in sorted(self.dir.rglob("*")) if _is_output(p, self.dir)}
        m.checksums = self._checksums(m.outputs)
        m.environment = environment_info(device)
        m.created = time.time()
        m.complete = True
        atomic_write_json(self.dir / MANIFEST, m.to_json())
        if self.forced:
            self._swap_in()
        m.dir = self.final_dir
        atomic_write_bytes(self.final_dir.parent / LATEST, (m.key + "\n").encode())
        return m

    def _swap_in(self) -> None:
        """Replace the old run by this complete one: old aside, new in, old removed."""
        final = self.final_dir
        aside = final.with_name(f".{final.name}.replaced-{os.getpid()}")
        if final.exists():
            os.replace(final, aside)
        os.replace(self.dir, final)
        _fsync_dir(final.parent)
        shutil.rmtree(aside, ignore_errors=True)
        self.dir = final
        self.items_dir = final / ITEMS


class RunInUse(ArtifactError):
    """Another process holds the run directory's lock and the caller asked not to wait."""


class RunLock:
    """One process at a time per run directory: ``<dataset dir>/.<key12>.lock`` (flock, through
    the ``filelock`` package), with who holds it in ``.<key12>.lock.json`` beside it.

    What it promises: on a local file system, two ``sppcli`` processes on one machine never
    write the same run directory at once, and a holder that dies (even by SIGKILL or a power
    cut) releases the lock with its file descriptor, so a stale lock file never blocks. On NFS
    and other shared file systems flock is only as good as the server: Linux NFS clients map it
    to POSIX byte-range locks, which need a working lock manager (NFSv3 lockd / NFSv4) and are
    honoured across machines only then; some FUSE and SMB mounts ignore it. The Dask engine
    (``--scheduler``) takes the lock in the process that runs the command (the scheduler side),
    not in the workers, so two commands on different machines sharing one cache are kept apart
    only where the file system honours flock.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.with_name(f".{self.run_dir.name}.lock")
        self.info_path = self.run_dir.with_name(f".{self.run_dir.name}.lock.json")
        self._lock = None

    def holder(self) -> dict:
        """Who holds the lock, from its sidecar ({} if unknown)."""
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return {}

    def _describe(self) -> str:
        h = self.holder()
        return f"pid {h.get('pid', '?')} on {h.get('host', '?')}"

    def acquire(self, wait: bool = True, log=None) -> "RunLock":
        """Take the lock; if it is held, say so once (``log``) and wait, or with ``wait=False``
        raise :class:`RunInUse`."""
        from filelock import FileLock, Timeout

        with disk_errors_name(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if not wait:
                raise RunInUse(f"{self.run_dir} is in use by {self._describe()}; "
                               "rerun without --no-wait to wait") from None
            since = self.holder().get("since", "?")
            (log or print)(f"waiting for {self.run_dir}: held by {self._describe()} since {since}")
            lock.acquire()
        self._lock = lock
        with contextlib.suppress(OSError):
            atomic_write_json(self.info_path, {"pid": os.getpid(), "host": socket.gethostname(),
                                               "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                               "argv": sys.argv[1:]})
        return self

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.info_path)
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
