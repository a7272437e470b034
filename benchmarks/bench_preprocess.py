"""Preprocessing throughput: the project's image path vs a naive PIL path, same JPEGs, same run.

    python benchmarks/bench_preprocess.py            # ~1 min: 240 JPEGs, 1 core, max_size 320
    python benchmarks/bench_preprocess.py --full     # 2000 JPEGs, 7 repeats, + max_size 512
    python benchmarks/bench_preprocess.py --quick    # seconds: checks the script still runs

Inputs are the real VOC (500x375-ish) and COCO (640x480-ish) sample JPEGs from ../shared/data,
re-used to reach the requested count. Per image, both paths decode and resize so the longer side is
max_size (the issue's baseline), then also encode a JPEG (quality 90), which is what a training
record stores:

    project  pipeline.data.preprocess_image.prepare_image: libjpeg-turbo decode (simplejpeg) with 1/2, 1/4
             or 1/8 DCT scaling where the target allows it + torch's channels-last uint8
             antialiased bilinear resize + libjpeg-turbo encode (4:2:0), no layout copies
    naive    PIL Image.open + convert("RGB") (full decode) + resize(BILINEAR) + save(JPEG)

Both run in this process on one core (torch.set_num_threads(1)), interleaved repeat by repeat;
the figures are medians. Then the whole stage (`preprocess_voc`, VOC pairs packed in a tar)
runs with 1 and 2 worker processes.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from machine import cpu_model, shared_data  # noqa: E402  (benchmarks/machine.py)
from PIL import Image  # noqa: E402

from pipeline.data.preprocess import preprocess_voc  # noqa: E402
from pipeline.data.preprocess_image import (  # noqa: E402
    decode_resized,
    prepare_image,
    target_size,
)

SHARED = shared_data()
VOC = SHARED / "voc2012-sample" / "VOCdevkit" / "VOC2012"
COCO = SHARED / "coco2017-sample" / "images" / "val2017"


def load_jpegs(n: int) -> list[bytes]:
    files = sorted(VOC.glob("JPEGImages/*.jpg")) + sorted(COCO.glob("*.jpg"))
    if not files:
        sys.exit(f"no sample JPEGs under {SHARED} (set FCN_SHARED_DATA)")
    data = [f.read_bytes() for f in files]
    return [data[i % len(data)] for i in range(n)]


def naive(data: bytes, max_size: int, quality: int) -> bytes:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    h, w = target_size(im.height, im.width, max_size)
    if (h, w) != (im.height, im.width):
        im = im.resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def project(data: bytes, max_size: int, quality: int) -> bytes:
    return prepare_image(data, "bench.jpg", max_size=max_size, jpeg_quality=quality)


def naive_no_encode(data: bytes, max_size: int, quality: int) -> Image.Image:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    return im.resize(target_size(im.height, im.width, max_size)[::-1], Image.BILINEAR)


def project_no_encode(data: bytes, max_size: int, quality: int) -> torch.Tensor:
    return decode_resized(data, "bench.jpg", max_size)[0]


def compare(jpegs: list[bytes], max_size: int, repeats: int) -> None:
    pairs = {  # name: (naive, project)
        "decode+resize": (naive_no_encode, project_no_encode),
        "decode+resize+encode": (naive, project),
    }
    print(f"\nmax_size {max_size}, {len(jpegs)} JPEGs, median of {repeats}, 1 core:")
    for what, fns in pairs.items():
        wall: list[list[float]] = [[], []]
        cpu: list[list[float]] = [[], []]
        for _ in range(repeats):
            for k, fn in enumerate(fns):  # interleaved: load changes hit both alike
                t, c = time.perf_counter(), time.process_time()
                for d in jpegs:
                    fn(d, max_size, 90)
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
        # CPU time is what one process costs; wall time also counts waiting for a busy machine
        for label, t in (("wall", wall), ("CPU", cpu)):
            naive_rate, project_rate = (len(jpegs) / statistics.median(v) for v in t)
            print(
                f"  {what:21s} {label:4s}: naive PIL {naive_rate:6.1f} img/s, project "
                f"{project_rate:6.1f} img/s, ratio {project_rate / naive_rate:.2f}x"
            )


def voc_tar(path: Path, n: int) -> Path:
    """A VOC-layout tar with n labelled pairs (the sample's pairs re-used under new ids)."""
    ids = (VOC / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    ids += (VOC / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    files = {}
    new = [f"{2000 + k // 1000000}_{k:06d}" for k in range(n)]
    for k, nid in enumerate(new):
        src = ids[k % len(ids)]
        files[f"VOCdevkit/VOC2012/JPEGImages/{nid}.jpg"] = (
            VOC / "JPEGImages" / f"{src}.jpg"
        ).read_bytes()
        files[f"VOCdevkit/VOC2012/SegmentationClass/{nid}.png"] = (
            VOC / "SegmentationClass" / f"{src}.png"
        ).read_bytes()
    split = max(1, n // 10)
    files["VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt"] = "\n".join(new[split:]).encode()
    files["VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"] = "\n".join(new[:split]).encode()
    with tarfile.open(path, "w") as tf:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            tf.addfile(info, io.BytesIO(files[name]))
    return path


def end_to_end(n: int, max_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tar = voc_tar(Path(tmp) / "voc.tar", n)
        print(
            f"\nstage preprocess_voc, {n} VOC pairs (90% train resized, 10% val kept), max_size {max_size}:"
        )
        for workers in (1, 2):
            t = time.perf_counter()
            preprocess_voc(
                tar, Path(tmp) / f"out{workers}", max_size=max_size, workers=workers, progress=False
            )
            dt = time.perf_counter() - t
            print(f"  workers={workers}: {n / dt:8.1f} pairs/s ({dt:.2f} s)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--images", type=int, default=240, help="JPEGs per repeat (default: %(default)s)"
    )
    ap.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per path (default: %(default)s)"
    )
    ap.add_argument(
        "--max-size",
        type=int,
        default=320,
        help="longer side after resizing (default: %(default)s)",
    )
    ap.add_argument(
        "--full", action="store_true", help="2000 JPEGs, 7 repeats, max_size 320 and 512"
    )
    ap.add_argument("--quick", action="store_true", help="seconds: 12 JPEGs, 1 repeat")
    args = ap.parse_args(argv)
    if args.full:
        args.images, args.repeats = 2000, 7
    if args.quick:
        args.images, args.repeats = 12, 1
    torch.set_num_threads(1)
    print(f"nproc {os.cpu_count()}, CPU: {cpu_model()}, torch {torch.__version__}")
    jpegs = load_jpegs(args.images)
    sizes = sorted({Image.open(io.BytesIO(d)).size for d in jpegs}, key=lambda s: -s[0] * s[1])
    print(
        f"{len(jpegs)} JPEGs, {len(sizes)} distinct sizes, largest {sizes[0]}, smallest {sizes[-1]}"
    )
    for d in jpegs[:3]:  # warm-up (library init, page cache)
        naive(d, args.max_size, 90), project(d, args.max_size, 90)
    for max_size in (args.max_size, 512) if args.full else (args.max_size,):
        compare(jpegs, max_size, args.repeats)
    end_to_end(args.images, args.max_size)


if __name__ == "__main__":
    main()
