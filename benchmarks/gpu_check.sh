#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one command, under 8 minutes:
#  1. FCN-8s training img/s (batch 1/8/16, fp32 and bf16, crop 320, full width), inference img/s
#     and p50/p95 latency at 500x500, peak GPU memory (bench_gpu.py, stopped after 240 s);
#  2. 300 iterations of each training recipe (the paper's batch 1, summed loss; batch 8, mean
#     loss, poly lr) at full width with its loss curve (bench_recipe.py, 90 s each at most);
#  3. where two GPUs exist, the batch-8 recipe in 1 and in 2 processes (DDP), 100 iterations.
# The device machine receives only the working tree: the recipe runs train on the project's
# generated sample (--generated), not on the real VOC images. Exits 2 at once without CUDA.
#   benchmarks/gpu_check.sh                    PYTHON=... to pick the interpreter
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python}"

if ! "$py" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine" >&2
    exit 2
fi
status=0
timeout 240 "$py" benchmarks/bench_gpu.py --device cuda "$@" || status=$?
for recipe in paper batch8; do
    echo
    timeout 90 "$py" benchmarks/bench_recipe.py --device cuda --generated --recipe "$recipe" \
        --iters 300 --log-every 25 --train-images 64 --val-images 4 || status=$?
done
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
    for n in 1 2; do
        echo
        echo "# batch8 recipe, $n process(es)"
        timeout 60 "$py" -m torch.distributed.run --standalone --nproc-per-node "$n" \
            benchmarks/bench_recipe.py --device cuda --generated --recipe batch8 --iters 100 \
            --log-every 50 --train-images 64 --val-images 4 || status=$?
    done
else
    echo
    echo "# 1 vs 2 processes: skipped, $gpus GPU(s)"
fi
exit $status
