"""The command-line plumbing every stage shares: `--params`, its inputs checked first, and
one `error: ...` line (exit status 1) instead of a traceback for what a user can fix.

A stage run by hand (`python -m stages.<name>`) before its inputs exist should say which stage
to run, not end in a `FileNotFoundError` traceback from deep inside the work:

    require_inputs({"data/raw/vgg16/vgg16.pth": "download_vgg16"})
    -> MissingInputsError: data/raw/vgg16/vgg16.pth: not found (made by the DVC stage
       download_vgg16: run `dvc repro download_vgg16`)

A stage's `main` is built from `stage_parser` and wrapped in `stage_main`, which turns a bad
params file (`ParamsError`), a missing input and the stage's own expected errors into that line.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from pipeline.config import ParamsError


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


StageMain = Callable[[list[str] | None], int]


def stage_parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser for a stage: `description` (its module docstring) as `--help` text,
    line breaks kept, and `--params` (default params.yaml), the file every stage reads."""
    ap = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    return ap


def stage_main(*errors: type[Exception]) -> Callable[[StageMain], StageMain]:
    """Decorate a stage's `main(argv) -> exit status`: a `ParamsError`, a `MissingInputsError`
    or one of `errors` ends it with `error: <message>` on stderr and exit status 1.

    Anything else (a bug) keeps its traceback; `--help` and argparse's usage errors still
    exit through `SystemExit` (0 and 2).
    """
    expected = (ParamsError, MissingInputsError, *errors)

    def wrap(main: StageMain) -> StageMain:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except expected as e:
                print(f"error: {e}", file=sys.stderr)
                return 1

        return run

    return wrap
