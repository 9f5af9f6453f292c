"""Reading radiographs: PNG/JPEG (8/16-bit grey) and DICOM, to one display-ready uint8 picture.

What each kind goes through (in this order):

- **DICOM** (pydicom): stored values -> modality LUT (rescale slope/intercept or a Modality LUT,
  ``apply_modality_lut``) -> VOI LUT or window (``apply_voi_lut``, the file's first window) ->
  linear map of the VOI output range to 0..255 (of the data's min..max when the file has no VOI)
  -> inverted when ``PhotometricInterpretation`` is MONOCHROME1 (so bone is bright). Compressed
  pixel data is decoded by pydicom's plugins and ``fastinsight.dicom`` (JPEG lossless,
  12-bit JPEG, JPEG-LS, JPEG 2000, HTJ2K).
- **PNG/TIFF/JPEG** (Pillow): 8-bit grey as is; 16-bit grey scaled by its bit depth
  (``v * 255 / 65535``, rounded) so the stored contrast is kept; colour is refused unless every
  channel is equal (a grey picture saved as RGB).

Refused with one line (``InputError``): not an image, a DICOM without pixel data, a multi-frame
DICOM, a CT/MR/PT/NM slice (``Modality``) given to a radiograph model, a colour picture.
``PixelSpacing`` / ``ImagerPixelSpacing`` is reported when present and non-zero; missing or zero
spacing (as in the NEMA CR test films) is tolerated and reported as ``None``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.dicom import pixel_array
from fastinsight.errors import InputError

# Modalities whose pixels are cross-sections or functional maps, not projection radiographs.
NOT_RADIOGRAPH = {
    "CT": "CT slice",
    "MR": "MR slice",
    "PT": "PET slice",
    "NM": "nuclear-medicine image",
}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
# The largest picture read (Pillow's own decompression-bomb limit); chest films are ~5-20 MP.
MAX_PIXELS = 178_956_970


@dataclass(frozen=True, eq=False)
class Radiograph:
    """A radiograph ready for display and for a model.

    ``image``: uint8 ``[H, W]``, 0 = black, higher = brighter (MONOCHROME2 convention).
    ``facts``: what was read and done (kind, modality, photometric, bits, transfer syntax, …).
    """

    path: str
    image: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def is_dicom(path: Path) -> bool:
    """A file with the DICOM preamble marker, or a ``.dcm``-like name."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise InputError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    return head[128:132] == b"DICM" or path.suffix.lower() in DICOM_SUFFIXES


def read_radiograph(path: str | os.PathLike[str]) -> Radiograph:
    """Read a PNG/JPEG/TIFF or DICOM radiograph as display-ready uint8 ``[H, W]``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"image {str(p)!r} does not exist or is not a file")
    return _read_dicom(p) if is_dicom(p) else _read_picture(p)


# ========================================================================================= DICOM


def _spacing(ds: Any) -> tuple[float, float] | None:
    for name in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(name)
        try:
            row, col = (float(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
            return row, col
    return None


def _read_dicom(p: Path) -> Radiograph:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(p, force=p.suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as exc:
        raise InputError(f"{str(p)!r} is not a readable DICOM file ({exc})") from None
    modality = str(ds.get("Modality", "") or "")
    if modality.upper() in NOT_RADIOGRAPH:
        raise InputError(
            f"{str(p)!r} is a {NOT_RADIOGRAPH[modality.upper()]} (Modality {modality}); a "
            "radiograph model needs a projection radiograph (CR, DX, DR); use a CT model for "
            "volumes"
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(
            f"{str(p)!r} is a DICOM file without pixel data (SOP class "
            f"{getattr(ds.get('SOPClassUID'), 'name', ds.get('SOPClassUID'))}); pass an image"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise InputError(
            f"{str(p)!r} holds {frames} frames; a radiograph is one frame (split the file first)"
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    try:
        _check_size(p, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
    except (TypeError, ValueError):
        raise InputError(f"{str(p)!r}: its Rows / Columns are not numbers") from None
    stored = pixel_array(ds, repr(str(p)))
    if stored.ndim == 3:
        stored = _grey_from_colour(stored, p, photometric)
    elif photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(
            f"{str(p)!r} has PhotometricInterpretation {photometric}; expected MONOCHROME1/2"
        )
    if stored.ndim != 2 or 0 in stored.shape:
        raise InputError(f"{str(p)!r}: pixel data of shape {stored.shape} is not one 2-D image")
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    has_voi = any(k in ds for k in ("VOILUTSequence", "WindowCenter"))
    if has_voi:
        shown = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        # The VOI output range (where the window saturates): probe the same transform with
        # values far outside the data, so the map to 0..255 is the file's, not the image's.
        span = float(values.max() - values.min()) + 1.0
        probe = np.linspace(values.min() - 4 * span, values.max() + 4 * span, 8193)
        out = np.asarray(apply_voi_lut(probe, ds, index=0), dtype=np.float64)
        lo, hi = float(out.min()), float(out.max())
    else:
        shown = values
        lo, hi = float(values.min()), float(values.max())
    image = _to_u8(shown, lo, hi)
    inverted = photometric == "MONOCHROME1"
    if inverted:
        image = 255 - image
    syntax = ds.file_meta.TransferSyntaxUID if hasattr(ds, "file_meta") else None
    facts = {
        "kind": "dicom",
        "modality": modality or None,
        "photometric": photometric,
        "inverted": inverted,
        "bits_stored": int(ds.get("BitsStored", 0) or 0) or None,
        "transfer_syntax": getattr(syntax, "name", None),
        "voi": "window/LUT from the file" if has_voi else "min-max of the data",
        "body_part": str(ds.get("BodyPartExamined", "") or "") or None,
    }
    return Radiograph(str(p), image, _spacing(ds), facts)


def _to_u8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto 0..255 (rounded, clipped); a flat image gives 0."""
    if not hi > lo:
        return np.zeros(values.shape, np.uint8)
    scaled = (values - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _grey_from_colour(arr: np.ndarray, p: Path, what: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return rgb[..., 0]
    raise InputError(
        f"{str(p)!r} is a colour image ({what}, shape {arr.shape}); a radiograph model expects "
        "a grey image; save it as single-channel grey"
    )


# ================================================================================ PNG/JPEG/TIFF


def _check_size(p: Path, height: int, width: int) -> None:
    """Refuse, before decoding, a picture larger than any radiograph (a decompression bomb)."""
    if height * width > MAX_PIXELS:
        raise InputError(
            f"{str(p)!r} is {width} x {height} px ({height * width / 1e6:.0f} MP); a radiograph "
            f"is at most {MAX_PIXELS / 1e6:.0f} MP: refusing to decode it (a decompression bomb?)"
        )


def _read_picture(p: Path) -> Radiograph:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            _check_size(p, im.height, im.width)  # from the header, before any pixel is decoded
            im.load()
            mode, fmt = im.mode, im.format
            arr = np.asarray(im.convert("RGBA") if mode == "P" else im)
    except Image.DecompressionBombError:
        raise InputError(
            f"{str(p)!r} declares an image larger than {MAX_PIXELS:,} pixels; a radiograph is "
            "at most a few tens of megapixels (a decompression bomb?)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(
            f"{str(p)!r} is not an image fastinsight can read (PNG, JPEG, TIFF or DICOM): {exc}"
        ) from None
    if arr.ndim == 3:
        arr = _grey_from_colour(arr, p, f"mode {mode}")
    if arr.ndim != 2 or 0 in arr.shape:
        raise InputError(f"{str(p)!r}: image of shape {arr.shape} is not one 2-D picture")
    if arr.dtype == np.uint8:
        image, bits = arr, 8
    elif arr.dtype == bool:
        image, bits = arr.astype(np.uint8) * 255, 1
    elif np.issubdtype(arr.dtype, np.integer):
        # 16-bit PNG/TIFF: keep the stored contrast, scale by the bit depth.
        image, bits = _to_u8(arr.astype(np.float64), 0.0, 65535.0), 16
        if int(arr.min()) < 0 or int(arr.max()) > 65535:
            raise InputError(f"{str(p)!r}: integer pixels outside 0..65535 ({arr.dtype})")
    else:
        raise InputError(
            f"{str(p)!r}: pixels of type {arr.dtype} (mode {mode}); expected 8- or 16-bit grey"
        )
    facts = {"kind": (fmt or p.suffix.lstrip(".")).lower(), "mode": mode, "bits_stored": bits}
    return Radiograph(str(p), np.ascontiguousarray(image), None, facts)


__all__ = ["Radiograph", "is_dicom", "read_radiograph"]
