"""The machine line every benchmark prints, so figures can be compared across runs."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}"


def shared_data() -> Path:
    """The folder of the real VOC/COCO samples, found as the tests find it (README, "Tests and
    the real data"): `$FCN_SHARED_DATA`, else `../shared/data` beside the checkout."""
    data = os.environ.get("FCN_SHARED_DATA")
    return (
        Path(data).expanduser() if data else Path(__file__).resolve().parents[2] / "shared" / "data"
    )
