"""pipeline.inference.predict (the fcn-predict command) and pipeline.visualize on real VOC photos."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.classes import NUM_CLASSES, voc_palette, voc_palette_flat
from pipeline.inference.predict import find_images, load_rgb, main, predict_files, predict_labels
from pipeline.models import fcn
from pipeline.visualize import colorize, label_image, overlay
from tests.helpers import TinyFCN


@pytest.fixture()
def photos(tmp_path: Path, generated_voc: Path) -> Path:
    """VOC-like photos (the generated sample: any photo will do) as given, and as grayscale,
    CMYK, RGBA, nested, plus two broken files."""
    jpgs = sorted((generated_voc / "JPEGImages").glob("*.jpg"))[:3]
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    shutil.copy(jpgs[0], d / "good.jpg")
    shutil.copy(jpgs[1], d / "sub" / "nested.JPEG")
    with Image.open(jpgs[2]) as im:
        im.convert("L").save(d / "gray.png")
        im.convert("CMYK").save(d / "cmyk.jpg")
        rgba = im.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(d / "rgba.png")
    (d / "truncated.jpg").write_bytes(jpgs[0].read_bytes()[:2000])
    (d / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (d / "notes.txt").write_text("ignored: not an image suffix")
    return d


GOOD = ["cmyk", "good", "gray", "rgba", "sub/nested"]
BAD = ["garbage.png", "truncated.jpg"]


def check_prediction(out: Path, stem: str, src: Path, fmt: str = "jpg") -> None:
    with Image.open(src) as im:
        size = im.size
    with Image.open(out / f"{stem}.png") as lab:
        assert lab.mode == "P" and lab.size == size
        assert lab.getpalette()[:768] == voc_palette_flat()
        assert np.array(lab).max() < NUM_CLASSES
    with Image.open(out / f"{stem}_overlay.{fmt}") as ov:
        assert ov.mode == "RGB" and ov.size == size
        assert ov.format == {"jpg": "JPEG", "png": "PNG"}[fmt]


@pytest.mark.parametrize("workers", [0, 1])
def test_good_images_written_bad_ones_reported(photos: Path, tmp_path: Path, workers: int):
    items, missing = find_images([photos])
    assert [str(stem) for _, stem in items] == sorted(
        ["cmyk", "garbage", "good", "gray", "rgba", "sub/nested", "truncated"]
    )
    assert not missing
    out = tmp_path / "out"
    result = predict_files(TinyFCN(), items, out, batch_size=2, workers=workers, progress=False)
    assert sorted(str(p.relative_to(out).with_suffix("")) for p in result.written) == GOOD
    for stem in GOOD:
        src = next(s for s, st in items if str(st) == stem)
        check_prediction(out, stem, src)
    failed = {p.name: why for p, why in result.failed}
    assert sorted(failed) == BAD
    for name, why in failed.items():
        assert name in why and "cannot read image" in why
    assert not (out / "garbage.png").exists() and not (out / "truncated.png").exists()


def test_batches_and_downscaling_keep_full_size(voc_sample: Path):
    jpgs = [
        p
        for p in sorted((voc_sample / "JPEGImages").glob("*.jpg"))[:12]
        if Image.open(p).size == (500, 375)
    ][:3]
    images = torch.from_numpy(np.stack([load_rgb(p) for p in jpgs])).permute(0, 3, 1, 2)
    model = TinyFCN()
    batched = predict_labels(model, images)
    single = torch.cat([predict_labels(model, images[i : i + 1]) for i in range(len(jpgs))])
    assert batched.dtype == torch.uint8 and batched.shape == (len(jpgs), 375, 500)
    assert (batched != single).float().mean() < 1e-4  # same up to float rounding
    small = predict_labels(model, images[:1], max_size=128)
    assert small.shape == (1, 375, 500) and small.max() < NUM_CLASSES
    # scoring a 128-pixel version and scaling back: the same picture, coarser
    assert (small == batched[:1]).float().mean() > 0.3


def test_color_modes_become_rgb(photos: Path):
    gray, cmyk, rgba = (load_rgb(photos / n) for n in ("gray.png", "cmyk.jpg", "rgba.png"))
    for a in (gray, cmyk, rgba):
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    with pytest.raises(ValueError, match=r"garbage\.png: cannot read image"):
        load_rgb(photos / "garbage.png")


def test_find_images_names_and_missing(tmp_path: Path, photos: Path):
    (tmp_path / "b").mkdir()
    shutil.copy(photos / "good.jpg", tmp_path / "b" / "good.png")  # same stem, other folder
    items, missing = find_images([photos / "good.jpg", tmp_path / "b", tmp_path / "nope.jpg"])
    assert [str(stem) for _, stem in items] == ["good", "good_2"]
    assert missing == [(tmp_path / "nope.jpg", "no such file or directory")]


def test_refuses_to_overwrite_an_input(tmp_path: Path, photos: Path):
    d = tmp_path / "same"
    d.mkdir()
    shutil.copy(photos / "gray.png", d / "x.png")
    before = (d / "x.png").read_bytes()
    items, _ = find_images([d])
    result = predict_files(TinyFCN(), items, d, progress=False)
    assert result.failed and "refusing to overwrite" in result.failed[0][1]
    assert (d / "x.png").read_bytes() == before


def test_visualize_helpers():
    label = np.array([[0, 1, 15], [20, 255, 0]], dtype=np.uint8)
    assert (colorize(label)[1, 1] == (224, 224, 192)).all()  # VOC void colour
    img = label_image(label)
    assert img.mode == "P" and np.array_equal(np.array(img), label)
    photo = np.full((2, 3, 3), 200, np.uint8)
    blended = overlay(photo, label, alpha=0.5)
    assert (blended[label == 0] == 200).all()  # background left as it was
    expected = np.round(0.5 * 200 + 0.5 * voc_palette(256)[15].astype(float)).astype(np.uint8)
    assert (blended[0, 2] == expected).all()
    with pytest.raises(ValueError, match="do not match"):
        overlay(photo[:1], label)


def test_cli_without_images_is_a_usage_error(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path / "m.pt"), str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "no .jpg/.jpeg/.png images found" in capsys.readouterr().err


def test_cli_end_to_end_with_a_real_model(tmp_path: Path, photos: Path, capsys):
    torch.manual_seed(0)
    model_path = tmp_path / "fcn8s.pt"
    fcn.save_model(model_path, fcn.build_model("fcn8s", num_classes=NUM_CLASSES, width=1 / 32))
    out = tmp_path / "pred"
    args = ["--model", model_path, photos, "--out", out, "--device", "cpu", "--workers", 0]
    rc = main([str(a) for a in [*args, "--overlay-format", "png", "--no-progress"]])
    assert rc == 1  # two inputs failed
    captured = capsys.readouterr()
    assert "5 image(s) written" in captured.out and "2 failed" in captured.out
    assert "truncated.jpg" in captured.err and "garbage.png" in captured.err
    for stem in GOOD:
        src = next(photos.rglob(Path(stem).name + ".*"))
        check_prediction(out, stem, src, fmt="png")
