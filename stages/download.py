"""DVC stages `download_voc`, `download_coco`, `download_sbd`, `download_vgg16`: put the raw
inputs in data/raw/.

With `download.generate_sample: true` (the `sample` profile) the archives are generated offline
by pipeline/data/sample.py in the real layout (SBD's from the generated VOC tar, by pipeline/data/sbd.py,
as the real SBD re-annotates VOC images), and the VGG16 weights are those of a width-reduced
VGG16 classifier trained on the sample's own object crops (pipeline/training/pretrain.py), the stand-in
for ImageNet; otherwise they are fetched from the `urls` of the
active profile (tried in order: official, mirrors, local paths / file:// URLs) and verified
against the pinned md5 / sha256 prefix and size before they appear.

Partial downloads live in data/partial/, outside the DVC outputs: DVC deletes a stage's outputs
before running it, and a 19 GB partial must survive that to be resumed by the next run.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python stages/download.py`: make `pipeline` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.atomic import atomic_write_json  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data.download import fetch  # noqa: E402
from pipeline.data.download_verify import DownloadError  # noqa: E402
from pipeline.data.settings import DownloadConfig, download_config  # noqa: E402
from pipeline.inputs import stage_main, stage_parser  # noqa: E402
from pipeline.training.recipe import model_config  # noqa: E402

RAW = Path("data/raw")
PARTIAL = Path("data/partial")
VOC_TAR = RAW / "voc" / "VOCtrainval_11-May-2012.tar"
COCO_DIR = RAW / "coco"
COCO_FILES = {  # params key -> file name
    "coco_train": "train2017.zip",
    "coco_val": "val2017.zip",
    "coco_annotations": "annotations_trainval2017.zip",
}
SBD_TGZ = RAW / "sbd" / "benchmark.tgz"
VGG16 = RAW / "vgg16" / "vgg16.pth"
# what the backbone is, in either profile: a plain output of download_vgg16, not a DVC metric
BACKBONE_REPORT = Path("reports/vgg16.json")
# torchvision's published accuracy of VGG16_Weights.IMAGENET1K_V1 (the file the full profile
# fetches), so that reports/vgg16.json states what the backbone is in either profile
IMAGENET_VGG16_REPORT = {
    "source": "torchvision VGG16_Weights.IMAGENET1K_V1",
    "classes": 1000,
    "val_top1": 0.71592,
    "val_top5": 0.90382,
}
# The FCN release's backbone (`download.vgg16.format: caffe`): the file is fetched into
# data/partial/ (kept there, so a re-run converts without fetching 528 MB again) and converted
# into VGG16 with its input convention recorded (pipeline.models.caffe_vgg16)
CAFFE_VGG16 = PARTIAL / "VGG_ILSVRC_16_layers.caffemodel"  # caffe_vgg16.VGG16_CAFFEMODEL
CAFFE_VGG16_REPORT = {
    "source": "Caffe VGG_ILSVRC_16_layers (Simonyan and Zisserman), the FCN release's VGG16",
    "classes": 1000,
    "input": "BGR 0..255 minus the mean (104.00699, 116.66877, 122.67892)",
}
TARGETS = ("voc", "coco", "sbd", "vgg16")


def _fetch_source(d: DownloadConfig, key: str, dest: Path, progress: bool, profile: str) -> Path:
    src = getattr(d, key)
    return fetch(
        list(src.urls),
        dest,
        md5=src.md5,
        sha256_prefix=getattr(src, "sha256_prefix", None),  # vgg16 only
        size=src.size,
        retries=d.retries,
        timeout=float(d.timeout_s),
        progress=progress,
        partial_dir=PARTIAL,
        hint=(
            "To use a copy you already have, add its local path or a file:// URL to "
            f"`download.{key}.urls` in conf/profile/{profile}.yaml (sources are tried in "
            f"order), or `dvc exp run -S 'download.{key}.urls=[PATH]'`."
        ),
    )


def download(target: str, d: DownloadConfig, profile: str, progress: bool = True) -> list[Path]:
    """Fetch the real files of `target` (voc | coco | sbd | vgg16) into data/raw/; return them.
    `profile`: the active profile's name, for the hint of a failed fetch."""

    def fetch_source(key: str, dest: Path) -> Path:
        return _fetch_source(d, key, dest, progress, profile)

    if target == "voc":
        return [fetch_source("voc", VOC_TAR)]
    if target == "sbd":
        return [fetch_source("sbd", SBD_TGZ)]
    if target == "coco":
        return [fetch_source(k, COCO_DIR / n) for k, n in COCO_FILES.items()]
    if target == "vgg16" and d.vgg16.format == "caffe":
        from pipeline.models.caffe_vgg16 import convert_caffe_vgg16

        caffemodel = fetch_source("vgg16", CAFFE_VGG16)
        convert_caffe_vgg16(caffemodel, VGG16)
        atomic_write_json(BACKBONE_REPORT, CAFFE_VGG16_REPORT)
        return [VGG16, BACKBONE_REPORT]
    if target == "vgg16":
        path = fetch_source("vgg16", VGG16)
        atomic_write_json(BACKBONE_REPORT, IMAGENET_VGG16_REPORT)
        return [path, BACKBONE_REPORT]
    raise ValueError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")


def generate(target: str, d: DownloadConfig, width: float) -> list[Path]:
    """Generate the offline sample of `target` in the real layout (the `sample` profile);
    `width`: the VGG16 channel multiplier of the stand-in backbone (`model.width`)."""
    s = d.sample
    sizes = {"seed": s.seed, "min_side": s.min_side, "max_side": s.max_side}
    if target == "voc":
        from pipeline.data.sample import make_voc_sample

        make_voc_sample(VOC_TAR, n_train=s.voc_train, n_val=s.voc_val, **sizes)
        return [VOC_TAR]
    if target == "coco":
        from pipeline.data.sample import make_coco_sample

        make_coco_sample(COCO_DIR, n_train=s.coco_train, n_val=s.coco_val, **sizes)
        return [COCO_DIR / n for n in COCO_FILES.values()]
    if target == "sbd":
        from pipeline.data.sbd import make_sbd_sample

        make_sbd_sample(VOC_TAR, SBD_TGZ)
        return [SBD_TGZ]
    if target == "vgg16":
        from pipeline.training.pretrain import pretrain_vgg16, save_state_dict

        state, report = pretrain_vgg16(
            width=width, seed=s.seed, **dataclasses.asdict(d.vgg16.pretrain)
        )
        save_state_dict(VGG16, state)
        atomic_write_json(BACKBONE_REPORT, report)
        return [VGG16, BACKBONE_REPORT]
    raise ValueError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")


@stage_main(DownloadError, ValueError)  # ValueError: a malformed pin
def main(argv: list[str] | None = None) -> int:
    ap = stage_parser(__doc__)
    ap.add_argument(
        "target",
        choices=TARGETS,
        help="voc: data/raw/voc/VOCtrainval_11-May-2012.tar\n"
        "coco: data/raw/coco/{train2017,val2017,annotations_trainval2017}.zip\n"
        "sbd: data/raw/sbd/benchmark.tgz (SBD: img/, cls/*.mat, train.txt, val.txt)\n"
        "vgg16: data/raw/vgg16/vgg16.pth (VGG16 state dict; format caffe: converted from the\n"
        "  Caffe VGG_ILSVRC_16_layers.caffemodel, its input convention recorded) + reports/vgg16.json",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    cfg = load_params(args.params)
    d = download_config(cfg)
    if d.generate_sample:
        paths = generate(args.target, d, model_config(cfg).width)
    else:
        paths = download(args.target, d, cfg["profile"], progress=not args.no_progress)
    for p in paths:
        logging.info("ready: %s (%d bytes)", p, p.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
