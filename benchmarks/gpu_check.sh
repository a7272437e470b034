#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one command: FCN-8s training img/s (batch 1/8/16, fp32 and
# bf16, crop 320, full width), inference img/s and p50/p95 latency at 500x500, peak GPU memory.
# Exits 2 at once on a machine without CUDA; the benchmark itself is stopped after 480 s.
#   benchmarks/gpu_check.sh [bench_gpu.py options]      PYTHON=... to pick the interpreter
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python}"

if ! "$py" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine" >&2
    exit 2
fi
exec timeout 480 "$py" benchmarks/bench_gpu.py --device cuda "$@"
