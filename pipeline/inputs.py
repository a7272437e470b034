"""Check a stage's input files before any work, naming the DVC stage that makes each one.

A stage run by hand (`python -m stages.<name>`) before its inputs exist should say which stage
to run, not end in a `FileNotFoundError` traceback from deep inside the work:

    require_inputs({"data/raw/vgg16/vgg16.pth": "download_vgg16"})
    -> MissingInputsError: data/raw/vgg16/vgg16.pth: not found (made by the DVC stage
       download_vgg16: run `dvc repro download_vgg16`)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


class MissingInputsError(FileNotFoundError):
    """One or more stage inputs do not exist; the message lists each with its DVC stage."""


Inputs = Mapping[str | os.PathLike, str | tuple[str, str]]


def missing_inputs(inputs: Inputs) -> list[str]:
    """One line per path of `inputs` that does not exist.

    `inputs` maps a path to the DVC stage that makes it, or to (stage, what the file is, e.g.
    "model file"), which the line names.
    """
    lines = []
    for path, made_by in inputs.items():
        stage, what = (made_by, "") if isinstance(made_by, str) else made_by
        if not Path(path).exists():
            lines.append(
                f"{path}: {what + ' ' if what else ''}not found (made by the DVC stage "
                f"{stage}: run `dvc repro {stage}`)"
            )
    return lines


def require_inputs(inputs: Inputs) -> None:
    """Raise MissingInputsError listing every missing path of `inputs` and its DVC stage.

    `inputs` maps a file or directory to the name of the DVC stage (dvc.yaml) that writes it,
    or to (stage, what it is). Every path is checked, so one run reports all of them at once.
    """
    lines = missing_inputs(inputs)
    if lines:
        raise MissingInputsError("missing input(s):\n  " + "\n  ".join(lines))


def exit_if_missing(inputs: Inputs) -> None:
    """`require_inputs` for a stage's `main`: print `error: ...` to stderr and exit 1."""
    try:
        require_inputs(inputs)
    except MissingInputsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
