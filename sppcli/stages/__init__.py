"""The stages of the pipeline: one module per stage, and the one table of what each stage is.

A stage module (``sppcli.stages.<name>``) exposes ``Params`` (a frozen dataclass),
``params_from(config)``, ``Inputs``, ``inputs_for(planner, plan, upstream, options)`` and
``run(params, inputs, out) -> Manifest``. What the orchestrator needs to know *without importing
the module* (which would import torch) is here: the code VERSION that enters the stage's key,
the command that makes its artifact, and whether it writes one item per image.

The stage name is also the artifact folder (``cache/<stage>/...``) and the module name; the
command differs from it for several stages, which this table (and the README's code map) records.
This module must stay light: ``sppcli status`` reads it.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stage:
    """version: bump when the stage's output for the same inputs changes (a fix, a new field);
    it enters the stage's key. command: the CLI command that makes the artifact. per_image:
    the stage writes ``items/<image_id>.h5`` and resumes image by image."""

    version: int
    command: str
    per_image: bool


STAGES: dict[str, Stage] = {
    "proposals": Stage(1, "sppcli proposals", per_image=True),
    "pretrain": Stage(2, "sppcli pretrain", per_image=False),
    "features": Stage(3, "sppcli extract-features", per_image=True),
    "pool": Stage(2, "sppcli pool-windows", per_image=True),
    "finetune": Stage(1, "sppcli finetune-fc", per_image=False),
    "svm": Stage(1, "sppcli train-svm", per_image=False),
    "bbox_reg": Stage(1, "sppcli train-bbox-reg", per_image=False),
    "detect": Stage(1, "sppcli detect", per_image=True),
    "evaluate": Stage(1, "sppcli evaluate", per_image=False),
    "classify": Stage(2, "sppcli classify", per_image=False),
}
