"""The `full` profile end to end on real data, every download served by a local HTTP server.

`dvc exp run -S profile=full` with `-S` overrides that point every `download.*` URL and
checksum at a server on 127.0.0.1. It serves archives in the official layout built here from
the real VOC/COCO samples, and a randomly initialised torchvision VGG16 state dict at the
model's width. Tiny sizes and epochs keep it short on a CPU; the stages, code and every other
`full` setting (fixed lr policy, scale range, dropout 0.5, device/precision auto, ...) are a real
full run's, except a per-pixel mean loss (see TINY).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import CASCADE
from pipeline.models.surgery import random_vgg16_state_dict
from tests.helpers import FileServer, caffe_vgg16_blobs, encode_caffe_vgg16
from tests.repo_utils import ALL_STAGES, FOUR, copy_repo, run, stages_run

pytestmark = pytest.mark.slow

WIDTH = 0.0625  # CPU-sized VGG16; the served weights must have the model's width
TRAIN_IMAGES, VAL_IMAGES = 16, 4  # of the sample's 76 VOC train and 32 val images
VGG_SEED = 1234  # not the sample profile's seed: the served file is not what `generate` makes

# Tiny sizes and epochs; everything not named here stays as params.yaml's `full` section has it.
TINY: dict[str, Any] = {
    "model.width": WIDTH,
    "coco_to_voc.min_pixels": 100,
    "preprocess.max_size": 96,
    "train.crop_size": 64,
    "train.batch_size": 4,
    "train.workers": 0,
    # a per-pixel mean loss at lr 0.01 with momentum 0.9: learns in one short epoch
    "train.loss": "mean",
    "train.momentum": 0.9,
    **{f"train.{m}.{k}": v for m in CASCADE for k, v in (("epochs", 1), ("lr", 0.01))},
    "evaluate.qualitative_images": 2,
    "inference.warmup": 0,
    "inference.repeats": 1,
    "inference.val_images": 1,
    "export.val_images": 1,
}


# --- the served files, in the official layouts, from the real samples -----------------------


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tf.addfile(info, io.BytesIO(data))


def voc_tar(voc_sample: Path, train_images: int, val_images: int) -> bytes:
    """VOCtrainval_11-May-2012.tar: VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets}.

    Every sample file goes in, but train.txt / val.txt list only their first `train_images` /
    `val_images` ids (fewer iterations and validation passes on a CPU); trainval.txt is
    train + val, as in the real tar.
    """
    seg = voc_sample / "ImageSets" / "Segmentation"
    train = (seg / "train.txt").read_text().split()[:train_images]
    val = (seg / "val.txt").read_text().split()[:val_images]
    return voc_tar_listing(voc_sample, train, val)


def voc_tar_listing(voc_sample: Path, train: list[str], val: list[str]) -> bytes:
    """`voc_tar` with the given train.txt / val.txt ids."""
    seg = voc_sample / "ImageSets" / "Segmentation"
    lists = {"train.txt": train, "val.txt": val, "trainval.txt": train + val}
    root = "VOCdevkit/VOC2012"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for path in sorted(voc_sample.rglob("*")):
            if path.is_file() and path.parent != seg:
                tf.add(path, arcname=f"{root}/{path.relative_to(voc_sample)}")
        for name, ids in lists.items():
            text = "".join(f"{i}\n" for i in ids).encode()
            _add_bytes(tf, f"{root}/ImageSets/Segmentation/{name}", text)
    return buf.getvalue()


def _train_name(file_name: str) -> str:
    # The sample has val2017 images only; train2017 reuses them under other names (same ids),
    # because record keys are file stems and the two splits must not share one.
    return f"9{file_name[1:]}"


def coco_zips(coco_sample: Path) -> dict[str, bytes]:
    """train2017.zip, val2017.zip, annotations_trainval2017.zip as the official ones nest them."""
    val_json = json.loads((coco_sample / "annotations" / "instances_val2017.json").read_text())
    train_json = dict(val_json)
    train_json["images"] = [
        {**img, "file_name": _train_name(img["file_name"])} for img in val_json["images"]
    ]
    images = sorted((coco_sample / "images" / "val2017").glob("*.jpg"))
    out = {}
    for split, rename in (("train2017", _train_name), ("val2017", str)):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
            for p in images:
                zf.write(p, f"{split}/{rename(p.name)}")
        out[f"{split}.zip"] = buf.getvalue()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("annotations/instances_train2017.json", json.dumps(train_json))
        zf.writestr("annotations/instances_val2017.json", json.dumps(val_json))
    out["annotations_trainval2017.zip"] = buf.getvalue()
    return out


def vgg16_pth(width: float, seed: int) -> bytes:
    buf = io.BytesIO()
    torch.save(random_vgg16_state_dict(width=width, seed=seed), buf)
    return buf.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _override(value: Any) -> str:
    # `-S` values use Hydra's override grammar; JSON scalars and lists of strings are valid
    # there, and quoted strings stay strings (an all-digit sha256 prefix is not a number)
    return json.dumps(value)


def sbd_tgz(voc_tar_bytes: bytes, tmp: Path) -> bytes:
    """benchmark.tgz in SBD's layout re-annotating the served VOC tar's images (pipeline.data.sbd)."""
    from pipeline.data.sbd import make_sbd_sample

    (tmp / "voc.tar").write_bytes(voc_tar_bytes)
    make_sbd_sample(tmp / "voc.tar", tmp / "benchmark.tgz")
    return (tmp / "benchmark.tgz").read_bytes()


def download_overrides(server: FileServer, served: dict[str, bytes]) -> dict[str, Any]:
    """`download.*` pointing every source at `server`, with its md5/sha256 and size."""
    out: dict[str, Any] = {}
    for key, name in (
        ("voc", "VOCtrainval_11-May-2012.tar"),
        ("coco_train", "train2017.zip"),
        ("coco_val", "val2017.zip"),
        ("coco_annotations", "annotations_trainval2017.zip"),
        ("sbd", "benchmark.tgz"),
    ):
        data = served[f"/{name}"]
        out[f"download.{key}.urls"] = [server.url(f"/{name}")]
        out[f"download.{key}.md5"] = _md5(data)
        out[f"download.{key}.size"] = len(data)
    (path,) = (p for p in served if p.endswith((".pth", ".caffemodel")))
    out["download.vgg16.urls"] = [server.url(path)]
    out["download.vgg16.sha256_prefix"] = hashlib.sha256(served[path]).hexdigest()
    out["download.vgg16.size"] = len(served[path])
    out["download.retries"] = 1
    return out


# --- one full run per module -----------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, voc_sample, coco_sample):
    vgg = vgg16_pth(WIDTH, VGG_SEED)
    voc = voc_tar(voc_sample, TRAIN_IMAGES, VAL_IMAGES)
    # torchvision's naming: vgg16-<first 8 hex digits of the sha256>.pth
    served = {
        "/VOCtrainval_11-May-2012.tar": voc,
        **{f"/{name}": data for name, data in coco_zips(coco_sample).items()},
        "/benchmark.tgz": sbd_tgz(voc, tmp_path_factory.mktemp("sbd")),
        f"/vgg16-{hashlib.sha256(vgg).hexdigest()[:8]}.pth": vgg,
    }
    # whole files only: a client resuming with Range must cope with a plain 200
    server = FileServer(served, ranges=False)
    try:
        repo = copy_repo(tmp_path_factory.mktemp("full") / "repo")
        overrides = {"profile": "full", **download_overrides(server, served), **TINY}
        args = ["dvc", "exp", "run", "-n", "full-local"]
        for key, value in overrides.items():
            args += ["-S", f"{key}={_override(value)}"]
        out = run(args, repo, timeout=900)
        yield repo, out.stdout + out.stderr, server, served
    finally:
        server.close()


def test_every_stage_ran_from_download_to_metrics(full_run):
    repo, out, _, _ = full_run
    assert stages_run(out) == ALL_STAGES, out
    status = run(["dvc", "status"], repo)
    assert "up to date" in status.stdout, status.stdout


def test_the_server_served_each_file_once_and_it_arrived_intact(full_run):
    repo, _, server, served = full_run
    raw = repo / "data" / "raw"
    landed = {
        "/VOCtrainval_11-May-2012.tar": raw / "voc" / "VOCtrainval_11-May-2012.tar",
        "/train2017.zip": raw / "coco" / "train2017.zip",
        "/val2017.zip": raw / "coco" / "val2017.zip",
        "/annotations_trainval2017.zip": raw / "coco" / "annotations_trainval2017.zip",
        "/benchmark.tgz": raw / "sbd" / "benchmark.tgz",  # downloaded, not trained on here
    }
    (vgg_path,) = (p for p in served if p.endswith(".pth"))
    landed[vgg_path] = raw / "vgg16" / "vgg16.pth"
    assert sorted(landed) == sorted(served)
    for path, dest in landed.items():
        hits = server.hits(path)
        assert [(r["status"], r["sent"]) for r in hits] == [(200, len(served[path]))], hits
        assert dest.read_bytes() == served[path], dest
    assert all(r["path"] in served for r in server.requests), server.requests


def test_the_experiment_ran_the_full_profile(full_run):
    repo, _, _, _ = full_run
    import yaml

    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["profile"] == "full"
    assert params["model"]["width"] == WIDTH
    shown = run(["dvc", "exp", "show", "--csv"], repo).stdout
    assert "full-local" in shown and "train.fcn8s.lr" in shown, shown


def test_coco_report_has_images_from_both_splits(full_run):
    repo, _, _, _ = full_run
    report = json.loads((repo / "data" / "coco_voc" / "report.json").read_text())
    assert report["params"]["min_pixels"] == 100
    for split in ("train2017", "val2017"):
        r = report["splits"][split]
        assert 0 < r["images_kept"] <= r["images_total"] == 32, (split, r)
    pre = json.loads((repo / "data" / "preprocessed" / "report.json").read_text())
    assert pre["train"]["by_source"]["voc"] == TRAIN_IMAGES, pre["train"]
    assert pre["train"]["by_source"]["coco"] == sum(
        report["splits"][s]["images_kept"] for s in ("train2017", "val2017")
    ), (pre["train"], report)
    assert pre["val"]["records"] == VAL_IMAGES  # val.txt as served, at original resolution


def test_fcn32s_started_from_the_served_vgg16(full_run):
    repo, out, _, served = full_run
    assert "VGG16 backbone from data/raw/vgg16/vgg16.pth" in out, out
    (vgg_path,) = (p for p in served if p.endswith(".pth"))
    served_vgg = torch.load(io.BytesIO(served[vgg_path]), weights_only=True)
    model = torch.load(repo / "models" / "fcn32s.pt", weights_only=True)
    assert model["width"] == WIDTH
    # one short epoch moves conv1_1 a little: it is still the served one, not a fresh init
    a = model["state_dict"]["features.0.weight"].flatten().float()
    b = served_vgg["features.0.weight"].flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9


def test_metrics_of_the_three_models(full_run):
    repo, _, _, _ = full_run
    for name in CASCADE:
        metrics = json.loads((repo / "metrics" / f"{name}.json").read_text())
        for key in FOUR:
            assert 0.0 <= metrics[key] <= 1.0, (name, key, metrics)
        live = json.loads((repo / "dvclive" / name / "metrics.json").read_text())
        loss = live["train"]["loss"]
        assert math.isfinite(loss), (name, live)
        for plot in ("per_class_iou.csv", "confusion.png", "qualitative.png"):
            assert (repo / "plots" / name / plot).stat().st_size > 0
    summary = (repo / "reports" / "summary.md").read_text()
    assert all(f"| FCN-{n} |" in summary for n in ("32s", "16s", "8s")), summary


# --- the `paper` profile: SBD train, seg11valid, the release's solver and backbone -------------

PAPER_SCORED = 4  # seg11valid images of the sample put in val.txt
PAPER_TINY: dict[str, Any] = {
    "model.width": WIDTH,
    "coco_to_voc.min_pixels": 100,
    "preprocess.max_size": 96,
    "train.crop_size": 96,
    "train.workers": 0,
    "train.val_every_iter": 3,
    # the release's solver as it is (summed loss, momentum 0.99, fixed 1e-10/1e-12/1e-14), for
    # a few iterations instead of 100k
    "train.fcn32s.max_iter": 6,
    "train.fcn16s.max_iter": 4,
    "train.fcn8s.max_iter": 4,
    # 4 of the 736: allowed here, and the summary says it is a subset
    "evaluate.allow_partial_split": True,
    "evaluate.qualitative_images": 2,
}


def paper_sbd(voc_sample: Path, sbd_train: list[str], sbd_val: list[str], out: Path) -> bytes:
    """benchmark.tgz re-annotating real VOC images (255 -> 0: SBD has no void border)."""
    import numpy as np
    from PIL import Image

    from pipeline.data.sbd import write_sbd_tgz

    ids = sbd_train + sbd_val
    images = {i: (voc_sample / "JPEGImages" / f"{i}.jpg").read_bytes() for i in ids}
    labels = {}
    for i in ids:
        label = np.asarray(Image.open(voc_sample / "SegmentationClass" / f"{i}.png"))
        labels[i] = np.where(label == 255, 0, label).astype(np.uint8)
    write_sbd_tgz(out, images, labels, {"train": sbd_train, "val": sbd_val})
    return out.read_bytes()


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, voc_sample, coco_sample):
    """`dvc exp run -S profile=paper ... evaluate` against a local server. As in reality, SBD
    re-annotates VOC images, SBD train holds none of seg11valid and VOC val.txt holds all of
    the seg11valid images there are (here: 4 of the sample's)."""
    from pipeline.data.splits import seg11valid_ids

    seg = voc_sample / "ImageSets" / "Segmentation"
    sample_ids = sorted(
        (seg / "train.txt").read_text().split() + (seg / "val.txt").read_text().split()
    )
    seg11 = set(seg11valid_ids())
    scored = [i for i in sample_ids if i in seg11][:PAPER_SCORED]
    others = [i for i in sample_ids if i not in seg11]
    sbd_train, voc_train = others[:TRAIN_IMAGES], others[TRAIN_IMAGES : TRAIN_IMAGES + 8]
    root = tmp_path_factory.mktemp("paper")
    # the release's backbone, as the paper profile fetches it: a Caffe VGG16 (V1 format, the
    # model zoo file's) at the model's width, converted by download_vgg16
    vgg = encode_caffe_vgg16(caffe_vgg16_blobs(seed=VGG_SEED, width=WIDTH), v1=True)
    served = {
        "/VOCtrainval_11-May-2012.tar": voc_tar_listing(voc_sample, voc_train, scored),
        **{f"/{name}": data for name, data in coco_zips(coco_sample).items()},
        "/benchmark.tgz": paper_sbd(voc_sample, sbd_train, scored, root / "benchmark.tgz"),
        "/VGG_ILSVRC_16_layers.caffemodel": vgg,
    }
    server = FileServer(served, ranges=False)
    try:
        repo = copy_repo(root / "repo")
        overrides = {
            "profile": "paper",
            **download_overrides(server, served),
            **PAPER_TINY,
        }
        args = ["dvc", "exp", "run", "-n", "paper-local"]
        for key, value in overrides.items():
            args += ["-S", f"{key}={_override(value)}"]
        out = run([*args, "evaluate"], repo, timeout=900)
        yield repo, out.stdout + out.stderr, scored, sbd_train
    finally:
        server.close()


def test_paper_profile_trains_on_sbd_alone_and_scores_seg11valid(paper_run):
    repo, out, scored, sbd_train = paper_run
    upstream = [s for s in ALL_STAGES[: ALL_STAGES.index("evaluate") + 1] if s != "data_card"]
    assert stages_run(out) == upstream, out  # `dvc exp run evaluate`: evaluate and its inputs
    pre = json.loads((repo / "data" / "preprocessed" / "report.json").read_text())
    assert pre["train"]["by_source"] == {"sbd": len(sbd_train)}  # no VOC train, no COCO
    assert pre["params"]["sbd"] == "train"
    summary = (repo / "reports" / "summary.md").read_text()
    assert "seg11valid" in summary and "subset" in summary, summary
    for name in CASCADE:
        per_image = (repo / "plots" / name / "per_image.csv").read_text().splitlines()
        assert sorted(line.split(",")[0] for line in per_image[1:]) == sorted(
            f"voc/{i}" for i in scored
        ), per_image
        metrics = json.loads((repo / "metrics" / f"{name}.json").read_text())
        assert all(0.0 <= metrics[key] <= 1.0 for key in FOUR), (name, metrics)


def test_paper_profile_budgets_are_iterations_with_validation_inside(paper_run):
    repo, _, _, _ = paper_run
    import yaml

    budget = yaml.safe_load((repo / "params.yaml").read_text())["train"]
    for name in CASCADE:
        live = json.loads((repo / "dvclive" / name / "metrics.json").read_text())
        assert live["iteration"] == budget[name]["max_iter"], (name, live)
        assert math.isfinite(live["train"]["loss"]), (name, live)
    # FCN-32s: 6 iterations over the 16 SBD images, scored at 3 and at the end
    curve = repo / "dvclive" / "fcn32s" / "plots" / "metrics" / "val" / "mean_iou.tsv"
    assert len(curve.read_text().splitlines()) == 1 + 2


def test_paper_profile_trains_from_the_caffe_vgg16_on_its_input_with_fixed_upsampling(paper_run):
    """download_vgg16 converted the served caffemodel (its convention recorded in vgg16.pth);
    every stage's model takes Caffe's input through its adapter, and its file says so; every
    upsampling is still the bilinear kernel it started as (train.learn_upsampling: false)."""
    from pipeline.models.caffe_vgg16 import load_vgg16_weights
    from pipeline.models.fcn import CAFFE_BGR, CaffeInput, load_model
    from pipeline.models.surgery import bilinear_kernel

    repo, out, _, _ = paper_run
    _, backbone_input = load_vgg16_weights(repo / "data" / "raw" / "vgg16" / "vgg16.pth")
    assert backbone_input == CaffeInput().spec()
    for name in CASCADE:
        payload = torch.load(repo / "models" / f"{name}.pt", weights_only=True)
        assert payload["normalization"]["kind"] == CAFFE_BGR, (name, payload["normalization"])
        model = load_model(repo / "models" / f"{name}.pt")
        assert isinstance(model.input_adapter, CaffeInput), name
        ups = [(k, m) for k, m in model.named_modules() if isinstance(m, torch.nn.ConvTranspose2d)]
        assert ups, name
        for key, m in ups:
            expected = bilinear_kernel(m.in_channels, m.out_channels, m.kernel_size[0])
            assert torch.equal(m.weight, expected), (name, key)
