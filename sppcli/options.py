"""Options shared by every stage command; each means the same thing everywhere."""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from sppcli.artifacts import ArtifactError, ArtifactStore, disk_error, disk_errno
from sppcli.config import ConfigError, load_config


def _dataset_shorthands(f):
    """Fold ``--dataset``, ``--images`` and ``--classes`` into ``--set`` overrides (before the
    user's own, so an explicit ``--set`` still wins): every command then sees one list of overrides."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        extra = []
        dataset = kwargs.pop("dataset", None)
        classes = kwargs.pop("classes", None)
        images = kwargs.pop("images", None)
        if dataset is not None:
            extra.append(f"dataset.devkit={json.dumps(str(dataset))}")
        if images is not None:
            extra.append(f"dataset.images={json.dumps(str(images))}")
        if classes is not None:
            names = [c.strip() for c in classes.split(",") if c.strip()]
            extra.append(f"dataset.classes={json.dumps(names)}")
        kwargs["overrides"] = tuple(extra) + tuple(kwargs.get("overrides") or ())
        return f(*args, **kwargs)

    return wrapper


def _common(f):
    f = _dataset_shorthands(f)
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="Pipeline TOML (pipelines/voc2007.toml, pipelines/demo.toml)."),
        click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="Override one config value, e.g. --set svm.C=0.001 (repeatable)."),
        click.option("--dataset", type=click.Path(path_type=Path), default=None,
                     help="The dataset: a VOC-format devkit folder or a COCO instances JSON "
                          "(shorthand for --set dataset.devkit=...)."),
        click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="COCO only: the folder its file_names are relative to (--set dataset.images=...)."),
        click.option("--classes", default=None, metavar="A,B,C",
                     help="Class names in label order (shorthand for --set dataset.classes=[...])."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("cache"),
                     show_default=True, help="Artifact root."),
        click.option("-v", "--verbose", count=True, help="More logging (-vv for debug)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars, warnings only."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def stage_options(split: bool = True, runtime: bool = True):
    """Decorator adding the shared options of a stage command."""

    def decorate(f):
        f = _common(f)
        f = click.option("--force", is_flag=True, help="Run again even if an up-to-date artifact exists "
                         "(the old one stays until the new one is complete).")(f)
        f = click.option("--no-wait", "no_wait", is_flag=True,
                         help="If another sppcli process is running this stage, exit at once instead of waiting.")(f)
        f = click.option("--json", "as_json", is_flag=True, help="Print the stage's manifest as JSON on stdout.")(f)
        if split:
            f = click.option("--split", default=None,
                             help="ImageSets/Main split (default: the config's train or test split).")(f)
        if runtime:
            f = click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")(f)
            f = click.option("--workers", type=int, default=1, show_default=True,
                             help="Local processes (or DataLoader workers for the net stages).")(f)
            f = click.option("--scheduler", default=None, metavar="tcp://HOST:8786",
                             help="Run per-image work on this Dask cluster.")(f)
        return f

    return decorate


def setup_logging(verbose: int, quiet: bool) -> None:
    import os

    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    if quiet:
        os.environ["SPPCLI_NO_PROGRESS"] = "1"


def friendly_errors(f):
    """Turn the library's expected errors into one clear line and exit status 1, not a traceback;
    Ctrl-C into one line and exit status 130 (the shell's code for SIGINT)."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from sppcli.data.voc import VocError
        from sppcli.pipeline import Interrupted

        try:
            return f(*args, **kwargs)
        except (Interrupted, KeyboardInterrupt) as e:
            click.echo(str(e) if isinstance(e, Interrupted) else
                       "interrupted; run the same command again to resume", err=True)
            raise click.exceptions.Exit(130) from None
        except OSError as e:
            if disk_errno(e) is None and not isinstance(e, FileNotFoundError):
                raise
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            message = str(disk_error(e, e.filename or "the cache")) if disk_errno(e) is not None else str(e)
            raise click.ClickException(message) from None
        except (ConfigError, ArtifactError, VocError, ValueError, RuntimeError) as e:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            raise click.ClickException(str(e)) from None

    return wrapper


def make_planner(config_path, overrides, cache_dir, extra_overrides=()):
    from sppcli.pipeline import Planner

    config = load_config(config_path, list(overrides) + list(extra_overrides))
    return Planner(ArtifactStore(cache_dir), config)


def emit(manifest, as_json: bool, summary: str) -> None:
    """Machine-readable manifest on stdout with --json; a one-line human summary on stderr."""
    if as_json:
        click.echo(json.dumps(manifest.to_json(), indent=2, sort_keys=True, default=str))
    click.echo(summary, err=True)
