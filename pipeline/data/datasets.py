"""Datasets over preprocessed shards: decode JPEG/PNG records into tv_tensors, seeded per sample.

A record of `data/preprocessed/{train,val}` holds `{"image": JPEG, "label": PNG}`. The image is
decoded by simplejpeg (libjpeg-turbo, accurate DCT and fancy upsampling: the pixels
torchvision.io gave, about twice as fast as PIL on these machines) straight to RGB, so a grayscale
or CMYK JPEG still gives 3 channels; PNGs are read by Pillow. The label PNG holds class indices:
mode L (written by preprocess) or the original VOC palette PNG (val), whose palette indices *are*
the class ids - it is decoded to indices, never to colours.

Seeding: `__getitem__` runs the transform under a private copy of torch's CPU generator seeded
with `sample_seed(seed, epoch, index)`, so sample i of epoch e gets the same crop, flip and jitter
whatever the number of DataLoader workers or DDP ranks, and the caller's global RNG (dropout, the
sampler) is left exactly as it was. The epoch comes with the index, `dataset[(e, i)]` (what
`pipeline.training.distributed.EpochKeySampler` yields), so DataLoader workers that persist across epochs use the
right one; a plain `dataset[i]` uses the epoch of `set_epoch(e)`.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections.abc import Callable

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from pipeline.data.shards import ShardReader

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_GRAY, _PNG_PALETTE = 0, 3  # IHDR colour types whose single channel is a class index
_JPEG_EOF = "Premature end of JPEG file"  # libjpeg's warning when the data runs out


# --- the image-reading policy, shared by training/preprocess decoding and predict ---------------
#
# Images are read as 8 bits per channel. 16-bit samples (PNG bit depth 16: PIL modes I;16*, or
# I for a PNG on older Pillow; 48/64-bit RGB(A) PNGs) keep their high byte, value >> 8, which
# maps 0..65535 onto 0..255 evenly (what libpng's png_set_strip_16 and PIL's own RGB;16 reader
# do). Images whose value range is not known from the format - 32-bit integer (mode I from
# TIFF and others) and floating point (mode F) - are refused with a ValueError naming the file
# and the mode: whether 1.0 or 255 or 65535 is white is a guess, and clipping them gives a
# nearly binary image.

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def pil_to_rgb8(img: Image.Image, name: str) -> np.ndarray:
    """A decoded PIL image as (H, W, 3) uint8 RGB under the policy above.

    High-bit-depth greyscale: value >> 8, then grey to RGB. Other modes: PIL's `convert("RGB")`
    (palette, CMYK, 1-bit, L, LA/RGBA without their alpha; callers that want alpha composited
    do it before). Raises ValueError naming `name` and the mode for 32-bit integer and float
    images.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and img.format == "PNG"):
        grey = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)  # PNG: max 65535
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("I", "F") or mode.startswith(("I;", "F;")):
        kind = "floating-point" if mode.startswith("F") else "32-bit integer"
        raise ValueError(
            f"{name}: {kind} image (PIL mode {mode!r}) refused: its value range is unknown, so "
            "it cannot be mapped to 8 bits without guessing; save it as 8- or 16-bit"
        )
    return np.asarray(img.convert("RGB"))


def decode_image_rgb(data: bytes, name: str) -> Tensor:
    """Decode JPEG or PNG bytes to a uint8 RGB tensor [3, H, W] (grayscale and CMYK included).

    JPEG: simplejpeg (libjpeg-turbo with its defaults, accurate integer DCT and fancy
    upsampling), the pixels torchvision.io.decode_jpeg gave; the result is a [3, H, W] view of
    an [H, W, 3] array, the layout torchvision returned. CMYK/YCCK JPEGs are decoded to their
    stored (Adobe-inverted) CMYK and turned into RGB as torchvision did: round(c * k / 255). A
    JPEG that libjpeg decodes only with warnings (e.g. extraneous bytes) is accepted, as it was,
    unless it is incomplete; one whose header TurboJPEG cannot classify (unusual chroma
    subsampling) is read by Pillow (libjpeg-turbo too, the same pixels). PNG: Pillow, under
    the shared policy (`pil_to_rgb8`: 16-bit -> value >> 8); alpha is dropped, never
    composited (a palette PNG keeps its palette colours).
    EXIF orientation is not applied: VOC and COCO annotations are drawn on the stored pixels.
    Raises ValueError naming `name` for data that is not a JPEG/PNG or does not decode fully
    (a truncated file says "truncated").
    """
    if data[:3] == _JPEG_MAGIC:
        return _decode_jpeg_rgb(data, name)
    if data[:8] != _PNG_MAGIC:
        raise ValueError(f"{name}: not a JPEG or PNG image (starts with {bytes(data[:8])!r})")
    return _pil_rgb(data, name, "PNG")


def _pil_rgb(data: bytes, name: str, fmt: str) -> Tensor:
    img = _pil_open(data, name, fmt)
    if img.mode == "P" and "transparency" in img.info:
        # the palette colours, alpha dropped below (libpng's RGB read); Pillow's direct P -> RGB
        # warns about the tRNS chunk
        img = img.convert("RGBA")
    array = pil_to_rgb8(img, name)
    if not array.flags.writeable:  # np.asarray of a PIL image is read-only: torch would warn
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1)


def _decode_jpeg_rgb(data: bytes, name: str) -> Tensor:
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
    except ValueError:
        # TurboJPEG refuses a header it cannot classify (chroma subsampling other than its six,
        # which libjpeg decodes; or a cut or broken header): Pillow's libjpeg-turbo decides
        return _pil_rgb(data, name, "JPEG")
    cmyk = colorspace in ("CMYK", "YCCK")  # libjpeg-turbo gives these as CMYK only
    out = "CMYK" if cmyk else "RGB"
    try:
        array = simplejpeg.decode_jpeg(data, colorspace=out)  # strict: any libjpeg warning fails
    except ValueError as e:
        if str(e) == _JPEG_EOF:
            raise ValueError(f"{name}: corrupt image (truncated: {e})") from None
        try:  # a warning (decodes without strict) or an error (fails without strict too)?
            array = simplejpeg.decode_jpeg(data, colorspace=out, strict=False)
        except ValueError as fatal:
            raise ValueError(f"{name}: corrupt image ({fatal})") from None
        # only warnings, but the data may still run out after the first: Pillow refuses a JPEG
        # whose decoder wants more bytes than there are, as torchvision did
        _pil_open(data, name, "JPEG")
    if cmyk:
        cmy, k = array[..., :3].astype(np.uint16), array[..., 3:]
        array = ((cmy * k + 127) // 255).astype(np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1)


def decode_label(data: bytes, name: str) -> Tensor:
    """Decode a label PNG (palette of any bit depth, or 8-bit grayscale) to class indices,
    uint8 [H, W].

    Read by Pillow (mode P or L): `np.asarray` gives the stored indices, whatever the palette's
    bit depth (Pillow saves a palette image of <= 16 colours as a 1-, 2- or 4-bit PNG) and
    whatever its colours or transparency. Refused, with a ValueError naming `name`: grayscale
    below 8 bits (ambiguous: PIL and libpng scale the samples to 0..255, 1-bit to 0/255, 4-bit
    x17, so the stored index is not what a reader sees; save such maps as 8-bit or palette),
    16-bit, colour PNGs (colours, not class ids), and data that is not a PNG or does not decode
    fully ("corrupt PNG").
    """
    if data[:8] != _PNG_MAGIC or data[12:16] != b"IHDR" or len(data) < 33:
        raise ValueError(f"{name}: not a PNG file (starts with {bytes(data[:8])!r})")
    bit_depth, colour_type = data[24], data[25]
    palette = colour_type == _PNG_PALETTE and bit_depth in (1, 2, 4, 8)
    if not palette and (bit_depth != 8 or colour_type != _PNG_GRAY):
        raise ValueError(
            f"{name}: label PNG must be a palette PNG (any bit depth) or 8-bit grayscale "
            f"(class indices), got bit depth {bit_depth}, colour type {colour_type}"
        )
    img = _pil_open(data, name, "PNG", what="PNG")
    expected = "P" if palette else "L"
    if img.mode != expected:
        raise ValueError(f"{name}: label PNG decoded to mode {img.mode!r}, expected {expected!r}")
    return torch.from_numpy(np.array(img, dtype=np.uint8))


def _pil_open(data: bytes, name: str, fmt: str, what: str = "image") -> Image.Image:
    """PIL image of `data` read as `fmt` only, fully decoded; ValueError naming `name` (and
    saying "corrupt <what>") if it does not decode."""
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
        img.load()
    except Exception as e:  # PIL raises many types for corrupt data
        raise ValueError(f"{name}: corrupt {what} ({type(e).__name__}: {e})") from None
    return img


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch; a hash, so neighbouring samples are unrelated."""
    digest = hashlib.blake2b(struct.pack("<3q", seed, epoch, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SegmentationShards(Dataset):
    """(image, mask) pairs of a preprocess shard directory (`data/preprocessed/train` or `val`).

    Without a transform: image uint8 [3, H, W] `tv_tensors.Image`, mask int64 [H, W]
    `tv_tensors.Mask` (0..20, 255 = ignore). With one, `transform(image, mask)` receives the uint8
    image and uint8 mask and its result is returned (masks always come back int64). Index-based,
    so DistributedSampler and any sampler work; picklable into DataLoader workers (shard files
    are opened lazily per process).
    """

    def __init__(
        self, directory: str | os.PathLike, transform: Callable | None = None, seed: int = 0
    ) -> None:
        self.reader = ShardReader(directory)
        self.directory = self.reader.directory
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.reader)

    def set_epoch(self, epoch: int) -> None:
        """Pick the augmentation stream of `epoch` (call before creating the epoch's DataLoader)."""
        self.epoch = epoch

    def _index(self, i: int) -> int:
        n = len(self.reader)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"index {i} out of range for {n} records in {self.directory}")
        return j

    def key(self, i: int) -> str:
        return self.reader.records[self._index(i)]["key"]

    def meta(self, i: int) -> dict:
        return self.reader.meta(self._index(i))

    def load(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """Record i decoded, untransformed: uint8 image [3, H, W] and uint8 mask [H, W]."""
        i = self._index(i)
        where = f"{self.directory}[{i}] {self.key(i)!r}"
        image = decode_image_rgb(self.reader.blob(i, "image"), f"{where} image")
        mask = decode_label(self.reader.blob(i, "label"), f"{where} label")
        if image.shape[1:] != mask.shape:
            raise ValueError(
                f"{where}: image is {tuple(image.shape[1:])} but label is {tuple(mask.shape)}"
            )
        return tv_tensors.Image(image), tv_tensors.Mask(mask)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Sample `key`: an index (augmented as epoch `self.epoch`), or (epoch, index)."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        i = self._index(i)
        image, mask = self.load(i)
        if self.transform is not None:
            # fork_rng(devices=[]) restores only the CPU generator, and only that one is seeded
            # (torch.manual_seed would also reseed every CUDA generator of a training process)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
                image, mask = self.transform(image, mask)
        if mask.dtype != torch.int64:  # the loss wants long targets
            mask = tv_tensors.Mask(mask, dtype=torch.int64)
        return image, mask
