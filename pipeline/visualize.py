"""Pictures of label maps: VOC colours, overlays, the confusion matrix and the qualitative sheet.

Everything returns arrays or PNG bytes, so callers write them atomically (pipeline.atomic).
matplotlib is used through `Figure` + the Agg canvas only: no pyplot, no global backend state,
no display needed.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipeline.classes import IGNORE_INDEX, VOC_CLASSES, voc_palette, voc_palette_flat

VOID_NAME = "void"  # how VOC calls label 255 (object boundaries, difficult pixels)


def _as_uint8_labels(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D (H, W), got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label map values must lie in 0..255, got {label.min()}..{label.max()}")
    return label.astype(np.uint8, copy=False)


def colorize(label: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 in the VOC palette (255 -> the VOC void colour)."""
    return voc_palette(256)[_as_uint8_labels(label)]


def label_image(label: np.ndarray) -> Image.Image:
    """A mode-P image with the VOC palette: the format of VOC's own SegmentationClass PNGs."""
    img = Image.fromarray(_as_uint8_labels(label))  # mode L
    img.putpalette(voc_palette_flat())  # turns L into P without touching the indices
    return img


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured label map into an (H, W, 3) uint8 RGB image.

    Background (0) is left unblended: its VOC colour is black, and darkening the whole photo
    would hide exactly the context one wants to see around the objects.
    """
    image = np.asarray(image)
    label = _as_uint8_labels(label)
    if image.shape[:2] != label.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image {image.shape} and label {label.shape} do not match as (H,W,3)/(H,W)"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colour = voc_palette(256)[label].astype(np.float32)
    out = image.astype(np.float32)
    fg = label != 0
    out[fg] = (1.0 - alpha) * out[fg] + alpha * colour[fg]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def confusion_png(
    hist: np.ndarray, class_names: Sequence[str] = VOC_CLASSES, title: str = ""
) -> bytes:
    """The row-normalised confusion matrix (rows: ground truth) as a PNG with class names.

    Row normalisation shows where each class's pixels go whatever its frequency; background
    would otherwise swamp the colour scale. Rows of classes with no ground truth stay blank.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    h = np.asarray(hist, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1] or h.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix {h.shape} does not match {len(class_names)} classes")
    rows = h.sum(1, keepdims=True)
    norm = np.full_like(h, np.nan)
    np.divide(h, rows, out=norm, where=rows > 0)
    n = len(class_names)
    size = max(4.0, 0.36 * n + 2.0)
    fig = Figure(figsize=(size + 1.2, size))
    ax = fig.add_subplot()
    cmap = colormaps["Blues"].with_extremes(bad="0.85")  # grey: no ground truth, not 0
    im = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels=class_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("ground-truth class")
    for i in range(n):  # per-class accuracy (recall) on the diagonal
        if rows[i, 0] > 0:
            v = norm[i, i]
            ax.text(i, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if v > 0.5 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the row's pixels")
    if title:
        ax.set_title(title)
    return _png_bytes(fig)


def _legend_handles(labels: np.ndarray, class_names: Sequence[str]):
    """Coloured patches for the sorted unique label values `labels`."""
    from matplotlib.patches import Patch

    palette = voc_palette(256) / 255.0
    handles = []
    for v in labels.tolist():
        if v == IGNORE_INDEX:
            name = VOID_NAME
        elif v < len(class_names):
            name = class_names[v]
        else:
            name = str(v)
        handles.append(Patch(facecolor=palette[v], edgecolor="black", linewidth=0.5, label=name))
    return handles


def qualitative_png(
    samples: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    class_names: Sequence[str] = VOC_CLASSES,
    title: str = "",
) -> bytes:
    """One row per sample: image | ground truth | prediction, plus a legend of the classes present.

    `samples` holds (key, RGB uint8 (H, W, 3), ground truth (H, W), prediction (H, W)).
    """
    from matplotlib.figure import Figure

    if not samples:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no qualitative images requested", ha="center", va="center")
        return _png_bytes(fig)
    fig = Figure(figsize=(13, 3.3 * len(samples)))
    axes = fig.subplots(len(samples), 3, squeeze=False)
    for r, (key, image, gt, pred) in enumerate(samples):
        panels = (("image", np.asarray(image)), ("ground truth", colorize(gt)),
                  ("prediction", colorize(pred)))  # fmt: skip
        for c, (name, arr) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(arr, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{key}" if c == 0 else name, fontsize=9)
        present = np.union1d(np.unique(gt), np.unique(pred))
        handles = _legend_handles(present, class_names)
        axes[r, 2].legend(
            handles=handles,
            ncol=(len(handles) + 11) // 12,  # 12 entries fit beside one row
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize=8,
            frameon=False,
        )
    if title:
        fig.suptitle(title)
    return _png_bytes(fig)
