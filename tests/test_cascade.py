"""The sample's recipe in miniature, shortened: pretrain the classifier, convolutionalize it into
FCN-32s, fine-tune FCN-16s from that and FCN-8s from FCN-16s, each with the sample profile's
own settings (width, lr, fp32, crop) but fewer images and epochs. Every stage must beat
the all-background predictor by a clear margin on images it never saw.
"""

from __future__ import annotations

import copy
import tarfile
from pathlib import Path

import pytest
import torch
from repo_utils import scores_on, voc_ids, write_voc_shards

from pipeline.config import load_params
from pipeline.data.sample import VOC_ROOT, make_voc_sample
from pipeline.evaluation.metrics import segmentation_scores
from pipeline.models.fcn import load_model
from pipeline.training.pretrain import pretrain_vgg16, save_state_dict
from pipeline.training.train import train

REPO = Path(__file__).resolve().parents[1]
MODELS = ("fcn32s", "fcn16s", "fcn8s")
# the sample profile's recipe with its backbone pretraining as is, and about a third of its
# segmentation training: 32 instead of 88 training images, 12 / 4 / 8 epochs
SHORT = {"voc_train": 32, "voc_val": 12, "epochs": {"fcn32s": 12, "fcn16s": 4, "fcn8s": 8}}


def _all_background(hist: torch.Tensor) -> torch.Tensor:
    """The confusion matrix of saying "background" at every labelled pixel."""
    out = torch.zeros_like(hist)
    out[:, 0] = hist.sum(1)
    return out


@pytest.mark.slow
def test_shortened_cascade_beats_all_background_at_every_stage(tmp_path) -> None:
    cfg = copy.deepcopy(load_params(REPO / "params.yaml"))
    assert cfg["profile"] == "sample"
    sample = cfg["download"]["sample"]
    tar = tmp_path / "VOCtrainval_11-May-2012.tar"
    make_voc_sample(
        tar,
        seed=0,
        n_train=SHORT["voc_train"],
        n_val=SHORT["voc_val"],
        min_side=sample["min_side"],
        max_side=sample["max_side"],
    )
    with tarfile.open(tar) as tf:
        tf.extractall(tmp_path, filter="data")
    voc = tmp_path / VOC_ROOT
    side = cfg["preprocess"]["max_size"]
    train_dir = write_voc_shards(voc, voc_ids(voc, "train"), tmp_path / "train", side, False)
    val_dir = write_voc_shards(voc, voc_ids(voc, "val"), tmp_path / "val", side, False)

    pretrain = dict(cfg["download"]["vgg16"]["pretrain"])
    pretrain.update(workers=0, progress=False)
    state, report = pretrain_vgg16(width=cfg["model"]["width"], seed=0, **pretrain)
    save_state_dict(tmp_path / "vgg16.pth", state)

    cfg["train"].update(workers=0, checkpoint_every=10_000, checkpoint_minutes=None, val_every=100)
    mean_iu = {}
    previous = None
    for name in MODELS:
        cfg["train"][name]["epochs"] = SHORT["epochs"][name]
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
        hist, _ = scores_on(load_model(out), val_dir)
        mean_iu[name] = segmentation_scores(hist)["mean_iou"]
        previous = out
    floor = segmentation_scores(_all_background(hist))["mean_iou"]
    print(f"backbone {report}\nmean IU {mean_iu}, all-background {floor:.4f}")
    # a clear margin: twice the all-background mean IU, i.e. objects found and placed, not a
    # few boundary pixels of one class
    for name in MODELS:
        assert mean_iu[name] >= 2 * floor, (name, mean_iu, floor, report)
