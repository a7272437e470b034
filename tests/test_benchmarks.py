"""Every benchmark script still runs: its `--quick` mode (tiny inputs) exits 0 and prints its
figures, so each figure in BENCHMARKS.md can be re-measured with the command printed beside it."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    "bench_gpu.py": rf"train bf16 batch\s+1\s+{NUMBER} img/s",  # CPU where there is no GPU
    "bench_sample_compute.py": rf"total training: {NUMBER} TFLOP, {NUMBER} s at the measured rate",
}
# these read the real VOC/COCO sample JPEGs
QUICK_REAL_DATA = {
    "bench_preprocess.py": rf"decode\+resize\s+wall: naive PIL\s+{NUMBER} img/s, project\s+"
    rf"{NUMBER} img/s, ratio {NUMBER}x",
    "bench_dataloader.py": rf"ratio project / baseline: {NUMBER}x img/s",
    "bench_recipe.py": rf"loss first window {NUMBER}(?:e[-+]\d+)? -> last",
    "bench_decode.py": rf"project: decode_image_rgb \(simplejpeg\)\s+{NUMBER} img/s wall",
    "bench_backbone_scale.py": rf"lr x lambda_max = {NUMBER}(?:e[-+]\d+)?, stable below lr "
    rf"{NUMBER}(?:e[-+]\d+)?",
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


def test_gpu_check_exits_2_at_once_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check.sh would run the whole benchmark")
    p = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh")],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert (
        "gpu_check: no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine"
        in p.stderr
    )
    assert "img/s" not in p.stdout  # the benchmark did not start


def test_bench_gpu_imports_and_runs_on_cpu_at_a_tiny_size(capsys) -> None:
    """The GPU benchmark's code path, on CPU: width 1/16, crop 64, batch 1, 2 timed steps."""
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = "--device cpu --width 0.0625 --crop 64 --batches 1 --steps 2 --warmup 1"
    args += " --precisions fp32 --infer-size 64 --runs 3"
    assert bench.main(args.split()) == 0
    out = capsys.readouterr().out
    assert "cpu (no GPU), torch " + torch.__version__ in out.splitlines()[0]
    train = re.search(rf"train fp32 batch\s+1\s+({NUMBER}) img/s\s+peak n/a", out)
    infer = re.search(
        rf"infer fp32\s+({NUMBER}) img/s\s+p50\s+({NUMBER}) ms\s+p95\s+({NUMBER}) ms", out
    )
    assert train and infer, out
    assert float(train[1]) > 0 and float(infer[1]) > 0
    assert 0 < float(infer[2]) <= float(infer[3])  # p50 <= p95
