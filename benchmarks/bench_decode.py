"""Image codecs: today's torchvision.io path vs the project's path, same real VOC files, same run.

    python benchmarks/bench_decode.py                 # ~30 s: the 108 VOC sample pairs, 7 repeats
    python benchmarks/bench_decode.py --quick         # seconds: checks the script still runs
    python benchmarks/bench_decode.py --voc DIR       # another VOC2012 folder (JPEGImages/, ...)

torchvision 0.29 deprecates `torchvision.io.decode_jpeg` / `decode_png` / `encode_png` (TorchCodec
supersedes them) and the next torchvision removes them. Per task, one core
(torch.set_num_threads(1)), img/s:

    JPEG -> RGB       today    torchvision.io.decode_jpeg(mode=RGB)
                      project  pipeline.data.datasets.decode_image_rgb: simplejpeg (libjpeg-turbo,
                               accurate DCT and fancy upsampling, its defaults)
    label PNG -> ids  today    torchvision.io.decode_png(mode=UNCHANGED)
                      project  pipeline.data.datasets.decode_label: Pillow; on the VOC palette
                               PNGs (val records) and on the mode-L PNGs preprocess writes (train)
    ids -> label PNG  today    torchvision.io.encode_png(compression_level=6)
                      project  pipeline.data.preprocess_image.encode_label_png: Pillow, level 6
                      ref      pipeline.data.coco_paint.encode_label_png: zlib level 1, Z_RLE,
                               no row filter (the COCO label writer); and the bytes each writes
    PNG -> RGB        today    torchvision.io.decode_png(mode=RGB)
                      project  decode_image_rgb: Pillow; on the JPEGs re-encoded as RGB PNGs
                               (rare in the data: VOC and COCO images are JPEGs)

When TorchCodec is importable, its `decoders.decode_jpeg` / `decode_png` and `encoders.PngEncoder`
are timed as a third column (it is no dependency of the project: install it beside to compare).
Before timing, the outputs are compared with today's: JPEG pixels and label ids must be identical.
All paths run in this process, interleaved repeat by repeat; the figures are medians.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import PIL  # noqa: E402
import simplejpeg  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from machine import cpu_model, shared_data  # noqa: E402  (benchmarks/machine.py)
from PIL import Image  # noqa: E402

from pipeline.data.datasets import decode_image_rgb, decode_label  # noqa: E402
from pipeline.data.preprocess_image import encode_label_png  # noqa: E402

try:  # today's path: deprecated in torchvision 0.29, gone in a later one
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode_jpeg
    from torchvision.io import decode_png as tv_decode_png
    from torchvision.io import encode_png as tv_encode_png
except ImportError:
    tv_decode_jpeg = None
try:  # TorchCodec: no dependency of the project; compared when it is installed
    import torchcodec
    from torchcodec.decoders import decode_jpeg as tc_decode_jpeg
    from torchcodec.decoders import decode_png as tc_decode_png
    from torchcodec.encoders import PngEncoder
except ImportError:
    torchcodec = None

# the benchmark times the deprecated calls on purpose: their warning would print on every call
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities", category=DeprecationWarning
)

Candidates = dict[str, Callable[[bytes | torch.Tensor], object]]


def _u8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # what today's code passed


def _as_bytes(png: bytes | torch.Tensor) -> bytes:
    return png if isinstance(png, bytes) else png.numpy().tobytes()


def load_voc(voc: Path, n: int | None) -> tuple[list[bytes], list[bytes]]:
    jpegs = sorted((voc / "JPEGImages").glob("*.jpg"))
    if not jpegs:
        sys.exit(f"no JPEGs under {voc}/JPEGImages (set FCN_SHARED_DATA or pass --voc)")
    labels = sorted((voc / "SegmentationClass").glob("*.png"))
    jpegs, labels = jpegs[:n], labels[:n]
    return [f.read_bytes() for f in jpegs], [f.read_bytes() for f in labels]


def check(jpegs: list[bytes], palettes: list[bytes], labels_l: list[bytes]) -> None:
    """Outputs against today's path before any timing: pixels and ids identical, or say so."""
    if tv_decode_jpeg is None:
        print("torchvision.io codecs not available: no comparison with today's path")
        return
    rgb = ImageReadMode.RGB
    same = sum(
        torch.equal(decode_image_rgb(d, "x"), tv_decode_jpeg(_u8(d), mode=rgb)) for d in jpegs
    )
    print(f"JPEG -> RGB: project identical to torchvision on {same}/{len(jpegs)} JPEGs")
    ids = sum(
        torch.equal(decode_label(d, "x"), tv_decode_png(_u8(d), mode=ImageReadMode.UNCHANGED)[0])
        for d in palettes + labels_l
    )
    print(f"label PNG -> ids: project identical to torchvision on {ids}/{len(palettes + labels_l)}")
    if torchcodec is not None:
        same = sum(
            torch.equal(tc_decode_jpeg(d, mode="RGB"), tv_decode_jpeg(_u8(d), mode=rgb))
            for d in jpegs
        )
        shape = tuple(tc_decode_png(palettes[0], mode="UNCHANGED").shape)
        print(
            f"TorchCodec {torchcodec.__version__}: JPEG identical on {same}/{len(jpegs)}; a VOC "
            f"palette label PNG (UNCHANGED) decodes to {shape} "
            + ("(palette colours, not class ids)" if shape[0] != 1 else "(ids)")
        )


def time_all(what: str, inputs: list, candidates: Candidates, repeats: int) -> None:
    wall: dict[str, list[float]] = {k: [] for k in candidates}
    cpu: dict[str, list[float]] = {k: [] for k in candidates}
    for fn in candidates.values():  # warm-up (library init, caches)
        for x in inputs[:3]:
            fn(x)
    for _ in range(repeats):
        for name, fn in candidates.items():  # interleaved: load changes hit all alike
            t, c = time.perf_counter(), time.process_time()
            for x in inputs:
                fn(x)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    print(f"\n{what} ({len(inputs)} per repeat, median of {repeats}, 1 thread):")
    base = None
    for name in candidates:
        w = len(inputs) / statistics.median(wall[name])
        c = len(inputs) / statistics.median(cpu[name])
        base = base or w
        ratio = "" if w == base else f"   {w / base:.2f}x today's"
        print(f"  {name:42s} {w:8.0f} img/s wall, {c:8.0f} img/s CPU{ratio}")


def main(argv: list[str] | None = None) -> None:
    default_voc = shared_data() / "voc2012-sample" / "VOCdevkit" / "VOC2012"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--voc",
        type=Path,
        default=default_voc,
        help="VOC2012 folder with JPEGImages/ and SegmentationClass/ (default: %(default)s)",
    )
    ap.add_argument(
        "--repeats", type=int, default=7, help="timed repeats per path (default: %(default)s)"
    )
    ap.add_argument("--quick", action="store_true", help="seconds: 12 pairs, 1 repeat")
    args = ap.parse_args(argv)
    n = 12 if args.quick else None
    repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(1)
    print(f"nproc {os.cpu_count()}, CPU: {cpu_model()}, torch {torch.__version__}")
    print(
        f"torchvision {torchvision.__version__}, simplejpeg {simplejpeg.__version__} "
        f"(libjpeg-turbo), Pillow {PIL.__version__}"
        + (f", torchcodec {torchcodec.__version__}" if torchcodec is not None else "")
    )
    jpegs, palettes = load_voc(args.voc, n)
    maps = [decode_label(d, "x") for d in palettes]
    labels_l = [encode_label_png(m) for m in maps]  # what preprocess writes into train records
    sizes = sorted({Image.open(io.BytesIO(d)).size for d in jpegs}, key=lambda s: -s[0] * s[1])
    print(
        f"{args.voc}: {len(jpegs)} JPEGs ({len(sizes)} sizes, {sizes[0]} .. {sizes[-1]}), "
        f"{len(palettes)} label PNGs"
    )
    check(jpegs, palettes, labels_l)

    from pipeline.data.coco_paint import encode_label_png as coco_encode_png  # pycocotools

    have_tv, have_tc = tv_decode_jpeg is not None, torchcodec is not None
    rgb_pngs = []
    for d in jpegs:
        buf = io.BytesIO()
        Image.open(io.BytesIO(d)).save(buf, "PNG")
        rgb_pngs.append(buf.getvalue())

    tasks: list[tuple[str, list, Candidates]] = []
    jpeg: Candidates = {}
    if have_tv:
        jpeg["today: torchvision.io.decode_jpeg"] = lambda d: tv_decode_jpeg(
            _u8(d), mode=ImageReadMode.RGB
        )
    jpeg["project: decode_image_rgb (simplejpeg)"] = lambda d: decode_image_rgb(d, "x")
    if have_tc:
        jpeg["torchcodec.decoders.decode_jpeg"] = lambda d: tc_decode_jpeg(d, mode="RGB")
    tasks.append(("JPEG -> RGB uint8 [3, H, W]", jpegs, jpeg))
    for kind, pngs in (("VOC palette", palettes), ("mode L, as preprocess writes", labels_l)):
        dec: Candidates = {}
        if have_tv:
            dec["today: torchvision.io.decode_png"] = lambda d: tv_decode_png(
                _u8(d), mode=ImageReadMode.UNCHANGED
            )[0]
        dec["project: decode_label (Pillow)"] = lambda d: decode_label(d, "x")
        if have_tc and kind.startswith("mode L"):  # palettes: colours, not ids (see above)
            dec["torchcodec.decoders.decode_png"] = lambda d: tc_decode_png(d, mode="UNCHANGED")
        tasks.append((f"label PNG -> class ids, {kind}", pngs, dec))
    enc: Candidates = {}
    if have_tv:
        enc["today: torchvision.io.encode_png (6)"] = lambda m: tv_encode_png(
            m[None].contiguous(), compression_level=6
        )
    enc["project: encode_label_png (Pillow, 6)"] = encode_label_png
    if have_tc:
        enc["torchcodec.encoders.PngEncoder (6)"] = lambda m: PngEncoder(m[None]).to_tensor(
            compression_level=6
        )
    enc["ref: coco_paint.encode_label_png (1, RLE)"] = lambda m: coco_encode_png(m.numpy())
    tasks.append(("class ids -> label PNG (mode L)", maps, enc))
    png: Candidates = {}
    if have_tv:
        png["today: torchvision.io.decode_png"] = lambda d: tv_decode_png(
            _u8(d), mode=ImageReadMode.RGB
        )
    png["project: decode_image_rgb (Pillow)"] = lambda d: decode_image_rgb(d, "x")
    tasks.append(("RGB PNG -> RGB uint8 [3, H, W]", rgb_pngs, png))

    for what, inputs, candidates in tasks:
        time_all(what, inputs, candidates, repeats)

    print(f"\nlabel PNG bytes for the {len(maps)} maps (VOC originals: {sum(map(len, palettes))}):")
    written = {name: [_as_bytes(fn(m)) for m in maps] for name, fn in enc.items()}
    first = None
    for name, blobs in written.items():
        total = sum(map(len, blobs))
        first = first or total
        same = all(torch.equal(decode_label(b, "x"), m) for b, m in zip(blobs, maps, strict=True))
        print(f"  {name:42s} {total:8d} bytes  {total / first:.3f}x   ids round-trip: {same}")


if __name__ == "__main__":
    main()
