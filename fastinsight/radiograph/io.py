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
DICOM, a DICOM whose modality is not a projection radiograph (CT/MR/PT/NM slices, ultrasound,
segmentations, RT objects, reports, ...: :data:`NOT_RADIOGRAPH`) given to a radiograph model, a
colour picture, a header value pydicom cannot use (WindowWidth 0, NumberOfFrames "1A"), and
pixels that are NaN or infinite (float pixel data): a picture scaled with a NaN in it would come
out black, which a model happily scores.
``PixelSpacing`` / ``ImagerPixelSpacing`` is reported when present and non-zero; missing or zero
spacing (as in the NEMA CR test films) is tolerated and reported as ``None``.

DICOM is told by content, not by name: a Part 10 file (``DICM`` after the preamble) or a bare
dataset without preamble and file meta (old exports, some PACS dumps) is read through
:func:`fastinsight.dicom.read_header`, which records the bare dataset's encoding as its transfer
syntax so its pixels decode. Pictures are shown the way viewers show them: an Adobe CMYK JPEG is
converted to RGB by Pillow (its channels are stored inverted; taking C as grey gave the
negative), and the EXIF orientation is applied (``ImageOps.exif_transpose``), so the heatmap and
overlay line up with what a radiologist sees.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastinsight.dicom import is_image_sop, pixel_array, sop_class_name
from fastinsight.errors import InputError
from fastinsight.quiet import quiet

# Modalities (DICOM PS3.3 C.7.3.1.1.1 defined terms) whose pixels are not a projection
# radiograph: cross-sections, functional maps, other kinds of camera, and objects that are not
# images at all. A deny-list, not an allow-list: CR, DX, RG (radiographic imaging), OT (films
# converted by a scanner are often "other"), projection X-ray relatives (MG, XA, RF, IO, PX) and
# a missing or site-specific code stay accepted, as the image itself may well be a chest film.
NOT_RADIOGRAPH = {
    "CT": "CT slice",
    "MR": "MR slice",
    "PT": "PET slice",
    "NM": "nuclear-medicine image",
    "US": "ultrasound image",
    "IVUS": "intravascular ultrasound image",
    "SEG": "segmentation (a label mask, not an image)",
    "RTDOSE": "radiotherapy dose grid",
    "RTSTRUCT": "radiotherapy structure set",
    "RTPLAN": "radiotherapy plan",
    "RTRECORD": "radiotherapy treatment record",
    "RTIMAGE": "radiotherapy portal image",
    "PLAN": "plan",
    "REG": "registration object",
    "FID": "fiducials object",
    "SR": "structured report",
    "PR": "presentation state",
    "KO": "key object selection",
    "DOC": "document",
    "SM": "slide microscopy image",
    "GM": "general microscopy image",
    "OP": "ophthalmic photograph",
    "OPT": "ophthalmic tomography image",
    "OPM": "ophthalmic mapping image",
    "OAM": "ophthalmic axial measurement",
    "XC": "external-camera photograph",
    "ES": "endoscopy image",
    "ECG": "ECG waveform",
    "EEG": "EEG waveform",
    "EMG": "EMG waveform",
    "HD": "hemodynamic waveform",
    "RWV": "real-world value map",
    "OSS": "optical surface scan",
    "LS": "laser surface scan",
    "M3D": "3-D model",
}
VOLUMES = {"CT", "MR", "PT", "NM"}
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
# The largest image read: 64 MP (8192 x 8192). The largest flat-panel detectors are about
# 4300 x 4300 px (18 MP) at 0.1 mm, and a 14 x 17 inch film digitised at 50 um is 61 MP; a
# larger "radiograph" is a decompression bomb or a wrong file, and reading it would take
# gigabytes (the display pipeline and the heatmap are proportional to the pixel count).
MAX_PIXELS = 64 * 2**20
# Pixels per block when mapping values to 0..255 (bounds _to_u8's float64 temporaries: 32 MiB).
_U8_BLOCK = 1 << 22
EXIF_ORIENTATION = 0x0112
# Pillow modes whose channels are not R, G, B: converted to RGB before the grey check.
CONVERT_TO_RGB = {"CMYK", "YCbCr", "LAB", "HSV"}


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
    """A DICOM file by content (Part 10 preamble, or a bare dataset that parses), or a file with
    a ``.dcm``-like name (read as DICOM so a damaged one is refused in DICOM's words)."""
    from fastinsight.dicom import has_preamble, read_header

    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise InputError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if path.suffix.lower() in DICOM_SUFFIXES or has_preamble(path):
        return True
    try:
        return read_header(path) is not None
    except InputError:
        return True  # a damaged Part 10 file: _read_dicom refuses it naming the damage


def read_radiograph(path: str | os.PathLike[str]) -> Radiograph:
    """Read a PNG/JPEG/TIFF or DICOM radiograph as display-ready uint8 ``[H, W]``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"image {str(p)!r} does not exist or is not a file")
    try:
        with quiet(), np.errstate(all="ignore"):
            # pydicom's lenient fixes, Pillow's and numpy's warnings are not messages for the
            # user: what matters (NaN/inf pixels, a rescale overflow, a non-finite window) is
            # checked and refused with one line below. In this thread only (fastinsight.quiet).
            return _read_dicom(p) if is_dicom(p) else _read_picture(p)
    except MemoryError:
        raise InputError(
            f"not enough memory to read {str(p)!r} (a radiograph is at most "
            f"{MAX_PIXELS // 2**20} MP); free memory or use a machine with more"
        ) from None


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
    """Header checks, then the display pipeline of the module docstring.

    pydicom converts header values when they are first used, so a value it cannot use (IS
    "1A", WindowWidth 0, a VOI LUT descriptor it does not support) surfaces as ValueError /
    TypeError / NotImplementedError anywhere below; each becomes one InputError line naming the
    file (and, under ``--skip-bad``, one row's error instead of a traceback ending the run).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from fastinsight.dicom import has_preamble, read_header

    ds: Any
    if has_preamble(p):
        try:
            with quiet(UserWarning):
                ds = pydicom.dcmread(p)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
            raise InputError(f"{str(p)!r} is not a readable DICOM file ({exc})") from None
    else:
        # A bare dataset: read_header records its encoding as the transfer syntax, so its
        # pixels decode (pydicom alone reads the header, then cannot decode the pixels).
        ds = read_header(p, pixels=True)
        if ds is None:
            raise InputError(
                f"{str(p)!r} is not a readable DICOM file (no DICM preamble and no dataset at "
                "its start); pass a DICOM, PNG, JPEG or TIFF radiograph"
            )
    try:
        with quiet(UserWarning):
            # pydicom warns on each lenient fix (IS "1A", float input to a VOI LUT, ...): the
            # value is then either refused below or harmless, never a message for a good run.
            return _dicom_radiograph(p, ds)
    except (ValueError, TypeError, NotImplementedError, IndexError, KeyError,
            AttributeError, OverflowError) as exc:  # fmt: skip
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(
            f"{str(p)!r} has a DICOM header value that cannot be used ({reason}); fix or "
            "remove the element (e.g. with dcmodify) or export the image again"
        ) from None


def _frames(p: Path, ds: Any) -> int:
    raw = ds.get("NumberOfFrames", 1)
    try:
        return int(str(raw).strip() or 1) if raw is not None else 1
    except ValueError:
        raise InputError(
            f"{str(p)!r}: NumberOfFrames {str(raw)!r} is not a number; fix the header "
            "(a radiograph is one frame)"
        ) from None


def _check_modality(p: Path, modality: str) -> None:
    kind = NOT_RADIOGRAPH.get(modality.strip().upper())
    if kind is not None:
        raise InputError(
            f"{str(p)!r} is a {kind} (Modality {modality}); a radiograph model needs a "
            "projection radiograph (CR, DX, DR)"
            + ("; use a CT model for volumes" if modality.strip().upper() in VOLUMES else "")
        )


def _voi(p: Path, values: np.ndarray, ds: Any) -> tuple[np.ndarray, float, float]:
    """The file's first VOI LUT or window applied, and the VOI output range.

    Float input to a VOI LUT makes pydicom warn ("may give incorrect results"); the LUT is
    indexed by truncation either way (what it does for integers, and the values come from
    integer samples), so the caller silences the warning rather than show it on every good run.
    """
    from pydicom.multival import MultiValue
    from pydicom.pixels import apply_voi_lut

    invalid = (
        f"{str(p)!r}: its VOI LUT / window (WindowCenter {ds.get('WindowCenter')}, "
        f"WindowWidth {ds.get('WindowWidth')}) is invalid"
    )
    if not ds.get("VOILUTSequence"):  # the window is used (its first value, index 0)
        for key in ("WindowCenter", "WindowWidth"):
            value = ds.get(key)
            first = value[0] if isinstance(value, (MultiValue, list, tuple)) and value else value
            try:
                number = float(first)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue  # pydicom refuses it below, in its own words
            if not math.isfinite(number):
                # pydicom's "width >= 1" test lets NaN through (all pixels NaN: a black picture)
                # and an infinite width or centre maps every pixel to one grey level.
                raise InputError(
                    f"{invalid} ({key} is not finite); remove it or fix it (a window needs a "
                    "finite centre and a finite width >= 1)"
                )
    try:
        shown = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        # The VOI output range (where the window saturates): probe the same transform with
        # values far outside the data, so the map to 0..255 is the file's, not the image's.
        span = float(values.max() - values.min()) + 1.0
        probe = np.linspace(values.min() - 4 * span, values.max() + 4 * span, 8193)
        out = np.asarray(apply_voi_lut(probe, ds, index=0), dtype=np.float64)
    except (ValueError, TypeError, NotImplementedError, IndexError, AttributeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(
            f"{invalid} ({reason}); remove it or fix it (a window width must be >= 1)"
        ) from None
    lo, hi = float(out.min()), float(out.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or not np.isfinite(shown).all():
        # WindowWidth / WindowCenter "NaN" or "inf" pass pydicom's width >= 1 test and turn
        # every pixel NaN: the picture would come out black and be scored.
        raise InputError(
            f"{invalid} (it gives NaN or infinite values); remove it or fix it (a window needs "
            "a finite centre and a finite width >= 1)"
        )
    return shown, lo, hi


def _dicom_radiograph(p: Path, ds: Any) -> Radiograph:
    from pydicom.pixels import apply_modality_lut

    modality = str(ds.get("Modality", "") or "")
    _check_modality(p, modality)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        if is_image_sop(ds):
            # An image SOP class (in the dataset or the file meta) without pixel data: a file
            # cut short, not another kind of DICOM object.
            raise InputError(
                f"{str(p)!r} is a damaged DICOM file: a {sop_class_name(ds)} without pixel "
                "data (cut short?); export the image again"
            )
        raise InputError(
            f"{str(p)!r} is a DICOM file without pixel data (SOP class "
            f"{getattr(ds.get('SOPClassUID'), 'name', ds.get('SOPClassUID'))}); pass an image"
        )
    frames = _frames(p, ds)
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
    _check_finite(p, values)
    has_voi = any(k in ds for k in ("VOILUTSequence", "WindowCenter"))
    if has_voi:
        shown, lo, hi = _voi(p, values, ds)
        del values  # (the display copy is all that is left to map: peak memory)
    else:
        shown = values
        lo, hi = float(values.min()), float(values.max())
    image = _to_u8(shown, lo, hi)
    del shown
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


def _check_finite(p: Path, values: np.ndarray) -> None:
    """NaN/inf pixels (Float Pixel Data, a rescale overflow) are refused: one NaN would make the
    min-max window NaN and the whole picture black, and the model would score that."""
    finite = np.isfinite(values)
    if not finite.all():
        n = int(values.size - np.count_nonzero(finite))
        raise InputError(
            f"{str(p)!r}: {n} of its {values.size} pixels are NaN or infinite; the pixel data is "
            "damaged (replace the non-finite values or export the image again)"
        )


def _to_u8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto 0..255 (rounded, clipped); a flat image gives 0.

    Bounds that are not finite are a bug upstream (a NaN window would silently give a black
    picture): ValueError. Computed in float64 blocks of :data:`_U8_BLOCK` pixels, so the extra
    memory is bounded whatever the image's size (a full float64 copy was 8 bytes per pixel).
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"the display range {lo!r}..{hi!r} is not finite")
    if not hi > lo:
        return np.zeros(values.shape, np.uint8)
    scale = 255.0 / (hi - lo)
    flat = values.reshape(-1)
    out = np.empty(flat.shape, np.uint8)
    for start in range(0, flat.size, _U8_BLOCK):
        block = np.subtract(flat[start : start + _U8_BLOCK], lo, dtype=np.float64)
        block *= scale
        np.rint(block, out=block)
        np.clip(block, 0, 255, out=block)
        out[start : start + _U8_BLOCK] = block
    return out.reshape(values.shape)


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
            f"{str(p)!r} is {width} x {height} px ({height * width / 2**20:.0f} MP); a radiograph "
            f"is at most {MAX_PIXELS // 2**20} MP (e.g. 8192 x 8192): refusing to decode it (a "
            "decompression bomb, or not a radiograph?)"
        )


def _read_picture(p: Path) -> Radiograph:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            _check_size(p, im.height, im.width)  # from the header, before any pixel is decoded
            frames = int(getattr(im, "n_frames", 1) or 1)
            if frames > 1:  # an animated GIF/APNG, a multi-page TIFF: as multi-frame DICOM
                raise InputError(
                    f"{str(p)!r} holds {frames} frames ({im.format} "
                    f"{'pages' if im.format == 'TIFF' else 'animation'}); a radiograph is one "
                    "frame (split the file first)"
                )
            im.load()
            mode, fmt = im.mode, im.format
            orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
            shown = ImageOps.exif_transpose(im) if orientation != 1 else im
            if mode == "P":
                shown = shown.convert("RGBA")
            elif mode in CONVERT_TO_RGB:
                # Pillow undoes Adobe's inverted CMYK storage and converts YCbCr/LAB/HSV; the
                # raw channels are not what viewers show (C taken as grey is the negative).
                shown = shown.convert("RGB")
            arr = np.asarray(shown)
    except Image.DecompressionBombError:
        raise InputError(
            f"{str(p)!r} declares an image larger than {MAX_PIXELS:,} pixels; a radiograph is "
            "at most a few tens of megapixels (a decompression bomb?)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError) as exc:
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
        if int(arr.min()) < 0 or int(arr.max()) > 65535:
            raise InputError(f"{str(p)!r}: integer pixels outside 0..65535 ({arr.dtype})")
        image, bits = _to_u8(arr, 0.0, 65535.0), 16
    else:
        raise InputError(
            f"{str(p)!r}: pixels of type {arr.dtype} (mode {mode}); expected 8- or 16-bit grey"
        )
    facts: dict[str, Any] = {
        "kind": (fmt or p.suffix.lstrip(".")).lower(),
        "mode": mode,
        "bits_stored": bits,
    }
    if orientation != 1:
        facts["exif_orientation"] = orientation
    return Radiograph(str(p), np.ascontiguousarray(image), None, facts)


__all__ = ["Radiograph", "is_dicom", "read_radiograph"]
