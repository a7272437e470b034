"""A short run of a full-width training recipe on real VOC images: does its loss fall?

The project's own training loop (`pipeline.training.train.train`, the data path of `pipeline.data.preprocess`
and `pipeline.data.datasets`) runs `--iters` iterations of FCN-32s, FCN-16s or FCN-8s with the params
of the `full` profile of params.yaml, changed only by the recipe below and the size flags. The
loss of the steps between two logged points and the val mean IU at each are printed, with the
first and last window side by side: a run whose loss does not fall, or turns NaN, fails (exit 1).

Recipes (`--recipe`):
  paper   the full profile as it is: batch 1, summed loss, fixed lr, momentum 0.99 (the release's
          solver.prototxt)
  batch8  batch 8 per process, per-pixel mean loss, poly lr 0.01, momentum 0.9, weight decay 1e-4
          (torchvision's references/segmentation recipe)

No ImageNet weights here (offline): the backbone is initialised at random, as `backbone_init:
random` does, which makes the run harder than a real one, not easier.

    python benchmarks/bench_recipe.py                              # paper, 50 its, CPU, < 10 min
    python benchmarks/bench_recipe.py --recipe batch8 --iters 20
    python benchmarks/bench_recipe.py --device cuda --iters 300 --log-every 20   # on a GPU
    python benchmarks/bench_recipe.py --quick                      # seconds: the script still runs
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_recipe.py ...   # 2 processes (DDP)

Real data: the VOC 2012 sample folder `voc2012-sample/VOCdevkit/VOC2012`, looked up as the tests
do (README, "Tests and the real data"): `$FCN_SHARED_DATA`, then `../shared/data` beside the
checkout; or `--voc DIR`. `--generated` uses the project's generated sample instead (a machine
that receives only the working tree, as benchmarks/gpu_check.sh's does).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's `pipeline`
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from machine import machine_line, shared_data  # noqa: E402  (benchmarks/machine.py)

from pipeline.config import validate_params  # noqa: E402
from pipeline.data.preprocess import preprocess_voc  # noqa: E402
from pipeline.profiles import compose_profile  # noqa: E402
from pipeline.training.train import train  # noqa: E402

RECIPES = {
    "paper": {},
    "batch8": {
        "batch_size": 8,
        "loss": "mean",
        "lr_policy": "poly",
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "lr": 0.01,
    },
}


def find_voc(explicit: Path | None) -> Path:
    """The real VOC2012 sample folder (JPEGImages, SegmentationClass, ImageSets)."""
    if explicit is not None:
        return explicit
    return shared_data() / "voc2012-sample" / "VOCdevkit" / "VOC2012"


def voc_tar(voc: Path, out: Path, train_images: int, val_images: int) -> Path:
    """The VOC folder as the real tar's layout, train/val lists cut to the first N ids."""
    seg = voc / "ImageSets" / "Segmentation"
    train = (seg / "train.txt").read_text().split()[:train_images]
    val = (seg / "val.txt").read_text().split()[:val_images]
    root = "VOCdevkit/VOC2012"
    with tarfile.open(out, "w") as tf:
        for i in train + val:
            tf.add(voc / "JPEGImages" / f"{i}.jpg", f"{root}/JPEGImages/{i}.jpg")
            tf.add(voc / "SegmentationClass" / f"{i}.png", f"{root}/SegmentationClass/{i}.png")
        for name, ids in (("train", train), ("val", val), ("trainval", train + val)):
            path = out.parent / f"{name}.txt"
            path.write_text("".join(f"{i}\n" for i in ids))
            tf.add(path, f"{root}/ImageSets/Segmentation/{name}.txt")
    return out


def recipe_cfg(recipe: str, model: str, args: argparse.Namespace) -> dict:
    """The `full` profile (conf/) with the recipe and the size flags applied."""
    cfg = copy.deepcopy(validate_params(compose_profile("full", REPO / "conf")))
    t = cfg["train"]
    changes = dict(RECIPES[recipe])
    lr = changes.pop("lr", t[model]["lr"])
    t.update(changes)
    t[model] = {"epochs": 1, "lr": lr, "max_iter": args.iters}
    t.update(
        device=args.device,
        crop_size=args.crop,
        workers=args.workers,
        val_every_iter=args.log_every,
        checkpoint_every=10**9,
        checkpoint_minutes=None,
    )
    cfg["model"].update(width=args.width, backbone_init="random")
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="paper")
    ap.add_argument("--model", choices=("fcn32s", "fcn16s", "fcn8s"), default="fcn32s")
    ap.add_argument("--iters", type=int, default=50, help="iterations (default 50)")
    ap.add_argument("--log-every", type=int, default=5, help="iterations per logged point")
    ap.add_argument("--width", type=float, default=1.0, help="VGG16 width (1.0: full)")
    ap.add_argument("--crop", type=int, default=320, help="training crop (full profile: 320)")
    ap.add_argument("--train-images", type=int, default=76)
    ap.add_argument("--val-images", type=int, default=2, help="scored at each logged point")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--voc", type=Path, help="VOC2012 folder (default: the shared-data lookup)")
    ap.add_argument(
        "--generated",
        action="store_true",
        help="train on the generated sample (pipeline/data/sample.py) instead of real VOC images",
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the script runs (no verdict)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.iters, args.log_every, args.width, args.crop = 4, 2, 0.0625, 64
        args.train_images, args.val_images, args.workers = 4, 1, 0

    voc = None if args.generated else find_voc(args.voc)
    if voc is not None and not (voc / "ImageSets" / "Segmentation" / "train.txt").is_file():
        print(
            f"bench_recipe: no VOC sample at {voc} (set FCN_SHARED_DATA, --voc or --generated)",
            file=sys.stderr,
        )
        return 2
    print(f"# machine: {machine_line()}, torch {torch.__version__}, device {args.device}")
    cfg = recipe_cfg(args.recipe, args.model, args)
    t = cfg["train"]
    print(
        f"# {args.recipe}: {args.model} width {args.width}, {args.iters} its, batch "
        f"{t['batch_size']}, loss {t['loss']}, lr {t[args.model]['lr']:g} {t['lr_policy']}, "
        f"momentum {t['momentum']}, crop {args.crop}, precision {t['precision']}, "
        f"{args.train_images} {'generated' if voc is None else 'real VOC'} train images"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if voc is None:
            from pipeline.data.sample import make_voc_sample

            tar = tmp / "voc.tar"
            make_voc_sample(
                tar,
                seed=0,
                n_train=args.train_images,
                n_val=args.val_images,
                min_side=240,
                max_side=480,
            )
        else:
            tar = voc_tar(voc, tmp / "voc.tar", args.train_images, args.val_images)
        shards = tmp / "shards"
        preprocess_voc(tar, shards, max_size=cfg["preprocess"]["max_size"], progress=False)
        t0 = time.perf_counter()
        result = train(
            args.model,
            cfg,
            train_dir=shards / "train",
            val_dir=shards / "val",
            out_model=tmp / "model.pt",
            resume_dir=tmp / "resume",
            live_dir=None,
            progress=False,
        )
        wall = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: rank 0 reports
        return 0
    print("iteration  loss(window)  val_mean_iou")
    for h in result["history"]:
        print(f"{int(h['iteration']):9d}  {h['train/loss']:12.5g}  {h['val/mean_iou']:12.4f}")
    losses = [h["train/loss"] for h in result["history"]]
    first, last = losses[0], losses[-1]
    finite = all(math.isfinite(v) for v in losses)
    print(
        f"{args.recipe}: {result['iterations']} its in {wall:.0f} s "
        f"({wall / result['iterations']:.2f} s/it incl. validation); loss first window "
        f"{first:.5g} -> last {last:.5g} ({last / first:.3f}x); finite: {finite}"
    )
    if args.quick:
        return 0 if finite else 1
    return 0 if finite and last < first else 1


if __name__ == "__main__":
    sys.exit(main())
