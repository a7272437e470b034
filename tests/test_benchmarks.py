"""Every benchmark script still runs: its `--quick` mode (tiny inputs) exits 0 and prints its
figures, so each figure in BENCHMARKS.md can be re-measured with the command printed beside it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"-?\d+(?:\.\d+)?"

# script -> a line of figures its quick mode must print; slow: over ~10 s on 2 shared cores
QUICK = {
    "bench_coco_voc.py": rf"ratio project / baseline \(with PNG\): {NUMBER}x wall",
    "bench_download.py": rf"fetch\(\) streamed\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}",
    "bench_metrics.py": rf"ours, batched\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x",
}
QUICK_SLOW = {
    "bench_train.py": rf"project \(.+\)\s+{NUMBER} img/s\s+{NUMBER}x",
    "bench_dvc_scale.py": rf"no-op dvc status \(median\)\s+{NUMBER}\s+{NUMBER}",
}
# these read the real VOC/COCO sample JPEGs
QUICK_REAL_DATA = {
    "bench_preprocess.py": rf"decode\+resize\s+wall: naive PIL\s+{NUMBER} img/s, project\s+"
    rf"{NUMBER} img/s, ratio {NUMBER}x",
    "bench_dataloader.py": rf"ratio project / baseline: {NUMBER}x img/s",
}


def run_quick(script: str, pattern: str, extra_env: dict[str, str] | None = None) -> str:
    """Run `python benchmarks/<script> --quick` from the checkout; check exit 0 and figures."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(extra_env or {})}
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{script} --quick exited {p.returncode}:\n{out[-4000:]}"
    assert re.search(pattern, p.stdout), f"no figures:\n{p.stdout[-4000:]}"
    return p.stdout


def test_every_benchmark_has_a_quick_test() -> None:
    scripts = {p.name for p in (REPO / "benchmarks").glob("bench_*.py")}
    assert scripts == set(QUICK) | set(QUICK_SLOW) | set(QUICK_REAL_DATA)


@pytest.mark.parametrize("script", sorted(QUICK))
def test_quick_mode(script: str) -> None:
    run_quick(script, QUICK[script])


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(QUICK_SLOW))
def test_quick_mode_slow(script: str) -> None:
    run_quick(script, QUICK_SLOW[script])


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(QUICK_REAL_DATA))
def test_quick_mode_on_real_data(script: str, shared_data: Path) -> None:
    run_quick(script, QUICK_REAL_DATA[script], {"FCN_SHARED_DATA": str(shared_data)})
