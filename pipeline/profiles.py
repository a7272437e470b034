"""The profiles in conf/profile/ as `dvc exp run -S profile=<name>` composes them (Hydra), for
code that needs another profile than the one params.yaml holds: benchmarks and tests. The
stages read params.yaml only (`pipeline.config.load_params`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PROFILES, ParamsError, ParamsLoader


def compose_profile(profile: str, conf_dir: str | os.PathLike = "conf") -> dict[str, Any]:
    """params.yaml's content for `profile` as `dvc exp run -S profile=<profile>` writes it:
    Hydra's composition of `conf_dir` (DVC's own `compose_and_dump`), not validated.
    For code that needs another profile than the active one (benchmarks, tests).

    Raises:
        ParamsError: `profile` is not one of PROFILES.
    """
    from dvc.utils.hydra import compose_and_dump  # DVC's own: what `dvc exp run` writes

    if profile not in PROFILES:
        raise ParamsError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    conf = Path(conf_dir).resolve()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "params.yaml"
        compose_and_dump(out, str(conf), None, "config", str(conf.parent), [f"profile={profile}"])
        return yaml.load(out.read_text(), Loader=ParamsLoader)
