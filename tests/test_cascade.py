"""The sample's recipe in miniature, shortened: pretrain the classifier, convolutionalize it into
FCN-32s, fine-tune FCN-16s from that and FCN-8s from FCN-16s, each with the sample recipe's
kind of settings (lr per stage, 10x score layers, poly decay, fp32) at a test's size: fewer and
smaller images, a narrower VGG16, fewer epochs. Every stage must beat the all-background
predictor by a clear margin on images it never saw.

The recipe is this test's own (RECIPE), not read from params.yaml: tuning the shipped sample
recipe must not change what this test runs.
"""

from __future__ import annotations

import tarfile

import pytest
import torch

from pipeline.config import CASCADE
from pipeline.data.sample import VOC_ROOT, make_voc_sample
from pipeline.evaluation.metrics import segmentation_scores
from pipeline.models.fcn import load_model
from pipeline.training.pretrain import pretrain_vgg16, save_state_dict
from pipeline.training.train import train
from tests.repo_utils import scores_on, tiny_cfg, voc_ids, write_voc_shards

# the sample recipe's settings (at the time this test was written) with about a third of its
# segmentation training: 32 instead of 88 training images, 12 / 4 / 8 epochs; the backbone
# pretrained on two thirds of the sample's crops (32 instead of 48 per class: 0.45x the time;
# held-out top-1 0.71 instead of 0.82, mean IU 4.4-5.5x the all-background floor instead of
# 5.4-5.8x, seed 0, 2-core AVX-512 machine)
RECIPE = {
    "images": {"voc_train": 32, "voc_val": 12, "min_side": 120, "max_side": 240},
    "side": 160,  # preprocess.max_size: the longer side of the training images
    "pretrain": {
        "train_per_class": 32,
        "val_per_class": 4,
        "epochs": 4,
        "batch_size": 16,
        "lr": 0.001,
    },
    "params": {
        "model.width": 0.125,
        "model.backbone_init": "vgg16",
        "model.dropout": 0.0,
        "train.crop_size": 160,
        "train.batch_size": 4,
        "train.score_lr_mult": 10,
        "train.checkpoint_every": 10_000,
        "train.checkpoint_minutes": None,
        "train.val_every": 100,
        "train.fcn32s.epochs": 12,
        "train.fcn32s.lr": 0.001,
        "train.fcn16s.epochs": 4,
        "train.fcn16s.lr": 0.0003,
        "train.fcn8s.epochs": 8,
        "train.fcn8s.lr": 0.001,
    },
}


def _all_background(hist: torch.Tensor) -> torch.Tensor:
    """The confusion matrix of saying "background" at every labelled pixel."""
    out = torch.zeros_like(hist)
    out[:, 0] = hist.sum(1)
    return out


@pytest.mark.slow
def test_shortened_cascade_beats_all_background_at_every_stage(tmp_path) -> None:
    cfg = tiny_cfg(RECIPE["params"], tmp_path)
    images = RECIPE["images"]
    tar = tmp_path / "VOCtrainval_11-May-2012.tar"
    make_voc_sample(
        tar,
        seed=0,
        n_train=images["voc_train"],
        n_val=images["voc_val"],
        min_side=images["min_side"],
        max_side=images["max_side"],
    )
    with tarfile.open(tar) as tf:
        tf.extractall(tmp_path, filter="data")
    voc = tmp_path / VOC_ROOT
    side = RECIPE["side"]
    train_dir = write_voc_shards(voc, voc_ids(voc, "train"), tmp_path / "train", side, False)
    val_dir = write_voc_shards(voc, voc_ids(voc, "val"), tmp_path / "val", side, False)

    state, report = pretrain_vgg16(
        width=cfg["model"]["width"], seed=0, workers=0, progress=False, **RECIPE["pretrain"]
    )
    save_state_dict(tmp_path / "vgg16.pth", state)

    mean_iu = {}
    previous = None
    for name in CASCADE:
        out = tmp_path / f"{name}.pt"
        train(
            name,
            cfg,
            train_dir=train_dir,
            val_dir=val_dir,
            out_model=out,
            resume_dir=tmp_path / "resume" / name,
            live_dir=None,
            vgg16_path=tmp_path / "vgg16.pth" if previous is None else None,
            init_from=previous,
            progress=False,
        )
        hist = scores_on(load_model(out), val_dir)
        mean_iu[name] = segmentation_scores(hist)["mean_iou"]
        previous = out
    floor = segmentation_scores(_all_background(hist))["mean_iou"]
    print(f"backbone {report}\nmean IU {mean_iu}, all-background {floor:.4f}")
    # a clear margin: twice the all-background mean IU, i.e. objects found and placed, not a
    # few boundary pixels of one class
    for name in CASCADE:
        assert mean_iu[name] >= 2 * floor, (name, mean_iu, floor, report)
