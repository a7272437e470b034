"""pipeline.data.splits: the seg11valid list, split selection and the train/eval overlap guard."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.shards import ShardWriter
from pipeline.data.splits import (
    SEG11VALID_MD5,
    SEG11VALID_PATH,
    check_no_overlap,
    overlap,
    seg11valid_ids,
    select_split,
)
from tests.repo_utils import tiny_params


class Keyed:
    """A dataset of keys only: item i is its key."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> str:
        return self.keys[i]

    def key(self, i: int) -> str:
        return self.keys[i]


def test_the_list_is_the_published_one():
    ids = seg11valid_ids()
    assert hashlib.md5(SEG11VALID_PATH.read_bytes()).hexdigest() == SEG11VALID_MD5
    assert len(ids) == len(set(ids)) == 736
    assert all(len(i) == 11 and i[4] == "_" and i[:4] in {"2007", "2008", "2009", "2010", "2011"}
               for i in ids)  # fmt: skip


def test_an_altered_list_is_refused(tmp_path: Path):
    bad = tmp_path / "seg11valid.txt"
    bad.write_bytes(SEG11VALID_PATH.read_bytes().replace(b"2007_000033", b"2007_000034"))
    with pytest.raises(ValueError, match="md5 .* expected 7984b6ce"):
        seg11valid_ids(bad)


def test_seg11valid_keeps_exactly_its_voc_images_in_order():
    ids = seg11valid_ids()
    others = ["voc/2099_000001", "coco/000000000139", f"sbd/{ids[0]}"]
    keys = [others[0], *[f"voc/{i}" for i in reversed(ids)], *others[1:]]
    data = Keyed(keys)
    assert select_split(data, "voc2012_val") is data
    sub = select_split(data, "seg11valid")
    assert len(sub) == 736
    assert [sub.key(i) for i in range(len(sub))] == [f"voc/{i}" for i in reversed(ids)]
    assert sub[0] == f"voc/{ids[-1]}"


def test_seg11valid_on_other_val_shards_names_the_problem():
    ids = seg11valid_ids()
    with pytest.raises(ValueError, match="736 images, the val shards hold 2 of them"):
        select_split(Keyed([f"voc/{ids[0]}", f"voc/{ids[1]}", "voc/2099_000001"]), "seg11valid")
    with pytest.raises(ValueError, match="unknown evaluation split 'val'"):
        select_split(Keyed([]), "val")


def test_a_partial_seg11valid_is_scored_only_when_allowed():
    ids = seg11valid_ids()
    data = Keyed([f"voc/{ids[5]}", "voc/2099_000001", f"sbd/{ids[6]}", f"voc/{ids[7]}"])
    with pytest.raises(ValueError, match="736 images, the val shards hold 2 of them"):
        select_split(data, "seg11valid")
    sub = select_split(data, "seg11valid", allow_partial=True)
    assert [sub.key(i) for i in range(len(sub))] == [f"voc/{ids[5]}", f"voc/{ids[7]}"]
    with pytest.raises(ValueError, match="hold 0 of them"):  # none at all is still refused
        select_split(Keyed(["voc/2099_000001"]), "seg11valid", allow_partial=True)


def test_overlap_compares_voc_and_sbd_ids_but_not_coco():
    train = ["voc/2008_000002", "sbd/2008_000003", "coco/000000000139"]
    val = ["voc/2008_000003", "voc/2008_000004", "coco/000000000139"]
    assert overlap(train, val) == ["2008_000003"]  # SBD re-annotates the same VOC photo
    check_no_overlap(["voc/2008_000002"], val, "voc2012_val")  # disjoint: nothing raised
    with pytest.raises(ValueError, match=r"1 image\(s\) of the seg11valid split .*2008_000003"):
        check_no_overlap(train, val, "seg11valid")


def _shards(out: Path, keys: list[str]) -> Path:
    import io

    def png(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    def jpg(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG")
        return buf.getvalue()

    with ShardWriter(out, shard_size=4) as w:
        for k in keys:
            image = np.full((24, 32, 3), 100, np.uint8)
            label = np.zeros((24, 32), np.uint8)
            label[5:15, 5:20] = 3
            w.add(k, {"image": jpg(image), "label": png(label)}, {"height": 24, "width": 32})
    return out


def test_evaluate_refuses_to_score_training_images(tmp_path: Path):
    from pipeline.evaluation.evaluate import ReportSettings, RunSettings, ValSet, evaluate_all
    from tests.helpers import TinyFCN

    val = _shards(tmp_path / "val", ["voc/2008_000003", "voc/2008_000004"])
    train = _shards(tmp_path / "train", ["voc/2008_000003", "coco/000000000139"])
    kw = dict(run=RunSettings("cpu", "fp32", progress=False), report=ReportSettings(1))
    with pytest.raises(ValueError, match=r"1 image\(s\) of the voc2012_val split.*2008_000003"):
        evaluate_all(
            lambda n: TinyFCN(), ["fcn8s"], ValSet(val, train_dir=train), tmp_path / "out", **kw
        )
    assert not (tmp_path / "out").exists()  # refused before writing anything
    clean = _shards(tmp_path / "train2", ["voc/2008_000005"])
    results = evaluate_all(
        lambda n: TinyFCN(), ["fcn8s"], ValSet(val, train_dir=clean), tmp_path / "out", **kw
    )
    assert results["fcn8s"]["num_pixels"] == 2 * 24 * 32


def test_the_summary_names_seg11valid():
    import dataclasses

    from pipeline.data.settings import download_config
    from pipeline.evaluation.settings import evaluate_config
    from pipeline.evaluation.summary import val_set_name

    params = tiny_params({"evaluate.split": "seg11valid", "download.generate_sample": False})
    evaluate, download = evaluate_config(params), download_config(params)
    assert val_set_name(evaluate, download).startswith("seg11valid (736 images")
    # a subset is never named as the paper's set
    partial = dataclasses.replace(evaluate, allow_partial_split=True)
    name = val_set_name(partial, download)
    assert "subset" in name and "not comparable" in name and "736 images" not in name
