from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real VOC/COCO samples live beside the checkout (../shared/data), in CI too. Never copied in.
SHARED_DATA = Path(os.environ.get("FCN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real sample data not found at {SHARED_DATA} (set FCN_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def voc_sample(shared_data: Path) -> Path:
    """The VOC2012 directory of the real sample (JPEGImages, SegmentationClass, ImageSets)."""
    return shared_data / "voc2012-sample" / "VOCdevkit" / "VOC2012"


@pytest.fixture(scope="session")
def coco_sample(shared_data: Path) -> Path:
    """The real COCO 2017 val sample: annotations/instances_val2017.json, images/val2017/*.jpg."""
    return shared_data / "coco2017-sample"
