"""Training input pipeline throughput: DataLoader images/s (decode + augment + collate).

    python benchmarks/bench_dataloader.py            # ~1-2 min: 480 samples/epoch, 3 repeats
    python benchmarks/bench_dataloader.py --full     # 2000 samples/epoch, 5 repeats
    python benchmarks/bench_dataloader.py --quick    # seconds: checks the script still runs

The full profile's augmentation: crop 320, scale 0.5-2.0, mirror, no colour jitter (params.yaml
`full.train`), 2 worker processes, batches of 8, a new DataLoader per epoch like pipeline/training/train.py
(worker start-up included). Records are the real VOC sample pairs preprocessed with the full
profile's max_size 512 (so: original JPEGs, mode-L label PNGs), re-used to fill an epoch.

    project   pipeline.data.datasets.SegmentationShards + pipeline.data.transforms.train_transform:
              simplejpeg and Pillow decoders, v2 transforms on uint8 tv_tensors
    baseline  the same records through PIL, torchvision references/segmentation style: PIL decode,
              PIL resize (bilinear image, nearest mask), pad, crop, flip, to float, normalise

Both are timed in the same run, interleaved repeat by repeat; medians.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from machine import cpu_model, shared_data  # noqa: E402  (benchmarks/machine.py)
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from pipeline.classes import IGNORE_INDEX  # noqa: E402
from pipeline.data.datasets import SegmentationShards  # noqa: E402
from pipeline.data.preprocess_image import prepare_train_pair  # noqa: E402
from pipeline.data.shards import ShardReader, ShardWriter  # noqa: E402
from pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MEAN_FILL,
    normalize,
    train_transform,
)  # noqa: E402

SHARED = shared_data()
VOC = SHARED / "voc2012-sample" / "VOCdevkit" / "VOC2012"


def build_shards(out: Path, max_size: int) -> Path:
    ids = sorted(p.stem for p in (VOC / "SegmentationClass").glob("*.png"))
    if not ids:
        sys.exit(f"no VOC sample under {VOC} (set FCN_SHARED_DATA)")
    with ShardWriter(out, 1000) as w:
        for i in ids:
            blobs, meta = prepare_train_pair(
                (VOC / "JPEGImages" / f"{i}.jpg").read_bytes(),
                (VOC / "SegmentationClass" / f"{i}.png").read_bytes(),
                image_name=i,
                label_name=i,
                max_size=max_size,
                jpeg_quality=90,
                source="voc",
            )
            w.add(f"voc/{i}", blobs, meta)
    return out


class PILShards(Dataset):
    """The baseline: same records, PIL decoding and PIL geometry (references/segmentation)."""

    def __init__(self, directory: Path, crop: int, scale_range: tuple[float, float]) -> None:
        self.reader, self.crop, self.scale_range = ShardReader(directory), crop, scale_range
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        image = Image.open(io.BytesIO(self.reader.blob(i, "image"))).convert("RGB")
        mask = Image.open(io.BytesIO(self.reader.blob(i, "label")))
        s = float(torch.empty(()).uniform_(*self.scale_range))
        size = (max(1, round(image.width * s)), max(1, round(image.height * s)))
        image, mask = image.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
        c = self.crop
        if image.width < c or image.height < c:
            w, h = max(c, image.width), max(c, image.height)
            padded, padded_mask = (
                Image.new("RGB", (w, h), MEAN_FILL),
                Image.new("L", (w, h), IGNORE_INDEX),
            )
            padded.paste(image, (0, 0))
            padded_mask.paste(mask, (0, 0))
            image, mask = padded, padded_mask
        top = int(torch.randint(0, image.height - c + 1, ()))
        left = int(torch.randint(0, image.width - c + 1, ()))
        image = image.crop((left, top, left + c, top + c))
        mask = mask.crop((left, top, left + c, top + c))
        if torch.rand(()) < 0.5:
            image, mask = (
                image.transpose(Image.FLIP_LEFT_RIGHT),
                mask.transpose(Image.FLIP_LEFT_RIGHT),
            )
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, torch.from_numpy(np.array(mask)).long()


def cpu_seconds() -> float:
    t = os.times()  # children: DataLoader workers, counted once they have exited (end of epoch)
    return t.user + t.system + t.children_user + t.children_system


def run_epoch(ds: Dataset, indices: list[int], batch: int, workers: int) -> tuple[float, float]:
    """(images/s wall, CPU ms per image over all processes) of one epoch, new DataLoader."""
    t, c = time.perf_counter(), cpu_seconds()
    n = 0
    loader = DataLoader(ds, batch_size=batch, sampler=indices, num_workers=workers)
    for x, _ in loader:
        n += x.shape[0]
    del loader
    return n / (time.perf_counter() - t), 1e3 * (cpu_seconds() - c) / n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--samples", type=int, default=480, help="samples per epoch (default: %(default)s)"
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed epochs per path (default: %(default)s)"
    )
    ap.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers (default: %(default)s)"
    )
    ap.add_argument("--batch-size", type=int, default=8, help="(default: %(default)s)")
    ap.add_argument("--crop", type=int, default=320, help="crop size (default: %(default)s)")
    ap.add_argument(
        "--max-size", type=int, default=512, help="preprocess max_size (default: %(default)s)"
    )
    ap.add_argument("--full", action="store_true", help="2000 samples per epoch, 5 repeats")
    ap.add_argument(
        "--quick", action="store_true", help="seconds: 16 samples, crop 64, 1 repeat, 1 worker"
    )
    args = ap.parse_args(argv)
    if args.full:
        args.samples, args.repeats = 2000, 5
    if args.quick:
        args.samples, args.repeats, args.workers, args.batch_size = 16, 1, 1, 4
        args.crop, args.max_size = 64, 128
    torch.set_num_threads(1)  # workers=0: one core, like a worker (2 threads thrash a busy box)
    print(f"nproc {os.cpu_count()}, CPU: {cpu_model()}, torch {torch.__version__}")
    scale = (0.5, 2.0)
    with tempfile.TemporaryDirectory() as tmp:
        shards = build_shards(Path(tmp) / "train", args.max_size)
        project = SegmentationShards(
            shards, transform=train_transform(args.crop, scale, True, 0.0), seed=0
        )
        baseline = PILShards(shards, args.crop, scale)
        g = torch.Generator().manual_seed(0)
        indices = torch.randint(0, len(project), (args.samples,), generator=g).tolist()
        x, y = project[0]
        assert x.shape == (3, args.crop, args.crop) and y.dtype == torch.int64
        assert torch.allclose(
            normalize(torch.tensor(MEAN_FILL, dtype=torch.uint8).view(3, 1, 1)),
            torch.zeros(3, 1, 1),
            atol=0.01,
        )
        print(
            f"{len(project)} records (max_size {args.max_size}), {args.samples} samples/epoch, crop "
            f"{args.crop}, scale {scale}, mirror, batch {args.batch_size}, {args.workers} workers"
        )
        runs: dict[str, list[tuple[float, float]]] = {"baseline (PIL)": [], "project": []}
        for _ in range(args.repeats):  # interleaved: load changes hit both alike
            runs["baseline (PIL)"].append(
                run_epoch(baseline, indices, args.batch_size, args.workers)
            )
            runs["project"].append(run_epoch(project, indices, args.batch_size, args.workers))
        med = {
            k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
            for k, v in runs.items()
        }
        for k, (rate, cpu) in med.items():
            epochs = ", ".join(f"{r:.0f}" for r, _ in runs[k])
            print(f"  {k:15s} {rate:7.1f} img/s (epochs: {epochs}), CPU {cpu:.2f} ms/img")
        (b_rate, b_cpu), (p_rate, p_cpu) = med["baseline (PIL)"], med["project"]
        print(
            f"  ratio project / baseline: {p_rate / b_rate:.2f}x img/s, {b_cpu / p_cpu:.2f}x less CPU per image"
        )


if __name__ == "__main__":
    main()
