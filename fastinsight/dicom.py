"""DICOM for all three modalities: compressed pixel data, and whole-slide images told apart.

**Whole-slide images.** A DICOM WSI (VL Whole Slide Microscopy Image Storage, one file per
pyramid level in one folder) is a slide, not a CT series: :func:`whole_slide_file` says whether a
file or folder holds one and names the file of its largest level, which OpenSlide opens (it finds
the other levels beside it).

**Compressed pixel data.** Out of the box pydicom decodes uncompressed and RLE pixel data itself,
and JPEG baseline / JPEG 2000 through Pillow. The syntaxes clinical archives use most for
radiographs and CT are not among them: **JPEG lossless** (process 14, selection value 1 or any
predictor), **12-bit JPEG extended** and **JPEG-LS**, plus **HTJ2K**; for those pydicom wants
pylibjpeg-libjpeg (GPL), GDCM or pyjpegls. imagecodecs, already a dependency for slide tiles,
carries the codecs: libjpeg-turbo 3 (8- and 12-bit lossy, 2-16-bit lossless JPEG), CharLS (JPEG-LS)
and OpenJPEG (JPEG 2000 and HTJ2K).

:func:`install` adds one decoding plugin, ``"fastinsight-imagecodecs"``, to pydicom's decoder of
each of those transfer syntaxes. It goes *after* the plugins pydicom already has, so pydicom tries
it only when they are not installed or fail on a file. The plugin follows pydicom's plugin
contract (``is_available``, ``DECODER_DEPENDENCIES``, a frame function); pydicom itself then does
what it does for every plugin: the pixel representation, the sign of JPEG-LS / JPEG 2000 samples,
unused high bits, YBR to RGB.

Importing this module loads neither numpy nor pydicom (the cohort's slide list uses it).
Readers take pixels through :func:`pixel_array`, which installs the plugin (idempotent and
thread-safe) and turns every failure into one :class:`~fastinsight.errors.InputError` line that
names the file and the transfer syntax.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import TYPE_CHECKING, Any

from fastinsight.codestreams import codestream_size
from fastinsight.errors import InputError
from fastinsight.quiet import quiet

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    import numpy as np

PLUGIN = "fastinsight-imagecodecs"

WSM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
# Folders are searched this deep / this wide for a whole-slide image's files.
WSI_SCAN_DEPTH = 2
WSI_SCAN_FILES = 2000

# Transfer syntax UIDs (DICOM PS3.6 annex A), by codec family.
JPEG_LOSSY = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")  # baseline 8-bit, extended 12
JPEG_LOSSLESS = ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")  # process 14, its SV1
JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")
JPEG_2000 = (
    "1.2.840.10008.1.2.4.90",  # lossless only
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless, RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
)
SYNTAXES = JPEG_LOSSY + JPEG_LOSSLESS + JPEG_LS + JPEG_2000

# pydicom's plugin contract: what the plugin needs, per transfer syntax.
DECODER_DEPENDENCIES = {syntax: ("numpy", "imagecodecs") for syntax in SYNTAXES}

# EOI (JPEG, JPEG-LS) and EOC (JPEG 2000) are the same two bytes; a fragment may pad after it.
END_OF_IMAGE = b"\xff\xd9"

_lock = threading.Lock()
_installed = False


def _codec(name: str) -> bool:
    try:
        import imagecodecs
    except ImportError:
        return False
    codec = getattr(imagecodecs, name, None)
    return bool(getattr(codec, "available", False))


def is_available(syntax: str) -> bool:
    """pydicom's plugin contract: whether imagecodecs can decode ``syntax`` here."""
    if syntax in JPEG_LOSSY:
        return _codec("JPEG8")
    if syntax in JPEG_LOSSLESS:
        return _codec("JPEG8") or _codec("LJPEG") or _codec("JPEGSOF3")
    if syntax in JPEG_LS:
        return _codec("JPEGLS")
    if syntax in JPEG_2000:
        return _codec("JPEG2K") or _codec("HTJ2K")
    return False


def _first_that_decodes(src: bytes, names: tuple[str, ...]) -> np.ndarray:
    """The first of imagecodecs' ``<name>_decode`` functions that decodes ``src``."""
    import imagecodecs
    import numpy as np

    errors = []
    for name in names:
        func = getattr(imagecodecs, f"{name}_decode", None)
        codec = getattr(imagecodecs, name.upper(), None)
        if func is None or not getattr(codec, "available", False):
            continue
        try:
            return np.asarray(func(src))
        except Exception as exc:  # each codec raises its own error type
            errors.append(f"{name}: {exc}")
    raise ValueError("; ".join(errors) or "no imagecodecs codec for this transfer syntax")


def decode_frame(src: bytes, runner: Any) -> bytes:
    """pydicom's plugin contract: one encoded frame -> its raw samples.

    ``runner`` is pydicom's ``DecodeRunner``; its options are set to describe what is returned:
    the container size the codec chose (8 or 16 bits: the codestream's precision, as pydicom's
    own plugins do, so it sign-extends JPEG-LS and JPEG 2000 samples itself), colour samples
    interleaved by pixel, and RGB where the codec already converted from YCbCr.
    """
    import numpy as np

    syntax = str(runner.transfer_syntax)
    photometric = str(runner.photometric_interpretation)
    if END_OF_IMAGE not in bytes(src[-8:]):
        # libjpeg-turbo and OpenJPEG decode a cut-off codestream without an error, inventing the
        # lost part; no scan data can hold the end marker (stuffing forbids 0xFF 0xD9), so its
        # absence is a reliable sign of a truncated frame.
        raise ValueError("the frame's codestream has no end-of-image marker (truncated file?)")
    rows, cols = int(runner.rows), int(runner.columns)
    declared = codestream_size(src)
    if declared is not None and declared != (rows, cols):
        # Checked before decoding: a small file must not make the codec allocate a huge image.
        raise ValueError(
            f"the codestream is {declared[0]} x {declared[1]} px but the dataset says "
            f"{rows} x {cols}"
        )
    if syntax in JPEG_LS:
        arr = _first_that_decodes(src, ("jpegls",))
    elif syntax in JPEG_2000:
        arr = _first_that_decodes(src, ("jpeg2k", "htj2k"))
        if photometric in ("YBR_ICT", "YBR_RCT"):
            # OpenJPEG undoes the codestream's colour transform itself.
            runner.set_option("photometric_interpretation", "RGB")
    elif syntax in JPEG_LOSSLESS:
        arr = _first_that_decodes(src, ("jpeg8", "ljpeg", "jpegsof3"))
    else:
        arr = _first_that_decodes(src, ("jpeg8",))
        if arr.ndim == 3 and photometric.startswith("YBR_FULL"):
            # libjpeg-turbo converts lossy YCbCr JPEGs to RGB as it decodes.
            runner.set_option("photometric_interpretation", "RGB")
    if arr.dtype.itemsize not in (1, 2) or arr.dtype.kind not in "ui":
        raise ValueError(f"the codestream decoded to {arr.dtype} samples; expected 8 or 16 bits")
    samples = int(runner.samples_per_pixel)
    expected = (rows, cols) if samples == 1 else (rows, cols, samples)
    if arr.shape != expected:
        raise ValueError(
            f"the codestream holds {arr.shape} samples but the dataset says {expected}"
        )
    runner.set_option("bits_allocated", 8 * arr.dtype.itemsize)
    if samples > 1:
        runner.set_option("planar_configuration", 0)  # every codec here returns [rows, cols, s]
    return np.ascontiguousarray(arr).tobytes()


def install() -> None:
    """Add the imagecodecs plugin to pydicom's decoders of :data:`SYNTAXES` (once)."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        from pydicom.pixels.decoders.base import get_decoder

        for syntax in SYNTAXES:
            try:
                decoder = get_decoder(syntax)
            except (NotImplementedError, ValueError, KeyError):
                continue  # a pydicom that does not know this syntax
            if PLUGIN in decoder.available_plugins or PLUGIN in getattr(
                decoder, "_unavailable", {}
            ):
                continue
            decoder.add_plugin(PLUGIN, (__name__, "decode_frame"))
        _installed = True


SUPPORTED = (
    "uncompressed, deflated, RLE, JPEG (baseline, 12-bit extended, lossless), JPEG-LS, "
    "JPEG 2000 and HTJ2K"
)


def pixel_array(ds: Any, name: str) -> np.ndarray:
    """``ds.pixel_array`` with the imagecodecs plugin installed.

    Raises InputError, one line naming ``name`` (the file) and the transfer syntax, when no
    decoder here handles the syntax or the pixel data does not decode (truncated, corrupt, or
    not what the header says).
    """
    import numpy as np

    install()
    try:
        with quiet():
            # pydicom warns on each lenient fix (NumberOfFrames 0 read as 1, excess pixel
            # data): harmless for the frame decoded, and never a message for a good run.
            return np.asarray(ds.pixel_array)
    except (NotImplementedError, RuntimeError, ValueError, TypeError, KeyError, AttributeError,
            IndexError, OverflowError, EOFError, OSError, ImportError,
            MemoryError) as exc:  # fmt: skip
        text = str(exc)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = f"{getattr(syntax, 'name', syntax)}"
        if syntax is not None and syntax_name != str(syntax):
            syntax_name += f" ({syntax})"
        if "No pixel data decoders" in text or "missing dependencies" in text:
            raise InputError(
                f"{name}: no decoder here handles its transfer syntax {syntax_name}; fastinsight "
                f"reads {SUPPORTED} pixel data: convert the file first (e.g. `gdcmconv --raw` "
                "or dcmtk's `dcmdjpeg`)"
            ) from None
        raise InputError(
            f"{name}: cannot decode its {syntax_name} pixel data ({_first_reason(text, exc)})"
        ) from None


def _first_reason(text: str, exc: BaseException) -> str:
    """The first plugin's own message from pydicom's multi-line "all plugins failed" text."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and "raised by all available plugins" in lines[0]:
        return "; ".join(lines[1:3])[:300]
    return (lines[0] if lines else type(exc).__name__)[:300]


def has_preamble(path: os.PathLike[str] | str) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble (an unreadable file: False)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


# A DICOM dataset written without the Part 10 preamble (old exports, some PACS dumps) starts
# with its first element's tag: group 0002 (file meta) or 0008 (identification), little endian.
_BARE_GROUPS = (b"\x02\x00", b"\x08\x00")


def read_header(path: os.PathLike[str] | str, *, pixels: bool = False) -> Any | None:
    """The dataset of a DICOM file (without its pixels unless ``pixels``), or None when the file
    is not DICOM (a README, a hidden file, DICOMDIR's siblings).

    Part 10 files and bare datasets (no preamble; their encoding is recorded as the transfer
    syntax, so their pixels decode). A Part 10 file that does not parse, or whose image header
    ends before its size (an image SOP class without Rows), is damaged: InputError naming it,
    rather than a slice silently missing from its series.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    part10 = head[128:132] == b"DICM"
    if not part10 and head[:2] not in _BARE_GROUPS:
        return None
    try:
        with quiet():  # pydicom warns on every lenient fix
            ds = pydicom.dcmread(str(path), stop_before_pixels=not pixels, force=True)
    except Exception as exc:  # pydicom raises many kinds for damaged files
        if not part10:
            return None  # bytes that only looked like a bare dataset
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(
            f"{str(path)!r} is a damaged DICOM file ({msg}); remove it or export it again"
        ) from None
    if part10 and len(ds) == 0:
        # Only the file meta parsed: every DICOM object has a dataset (its SOP class at least).
        raise InputError(
            f"{str(path)!r} is a damaged DICOM file: it ends after its file meta, before any of "
            f"its {sop_class_name(ds)} dataset (cut short?); remove it or export it again"
        )
    if "Rows" not in ds and is_image_sop(ds):
        if not part10:
            return None
        raise InputError(
            f"{str(path)!r} is a damaged DICOM file: a {sop_class_name(ds)} header that ends before "
            "the image's size (no Rows; cut short?); remove it or export it again"
        )
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        syntax = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
        ds.file_meta = meta if meta is not None else FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def damaged_series_uid(path: os.PathLike[str] | str) -> str | None:
    """The SeriesInstanceUID of a DICOM file that :func:`read_header` refused as damaged, read
    from the elements before the damage (the UID precedes the image's size and pixels), or None
    when the file is cut or broken before it.
    """
    from pydicom.filereader import read_partial

    series_tag = 0x0020000E

    def past_series_uid(tag: Any, vr: Any, length: int) -> bool:
        return int(tag) > series_tag

    try:
        with quiet():
            with open(path, "rb") as fh:
                ds = read_partial(fh, stop_when=past_series_uid, force=True)
            uid = ds.get("SeriesInstanceUID")
    except Exception:  # pydicom raises many kinds for damaged files
        return None
    return str(uid) if uid else None


def _sop_uids(ds: Any) -> list[str]:
    """The dataset's SOPClassUID and the file meta's MediaStorageSOPClassUID, those present."""
    meta = getattr(ds, "file_meta", None)
    uids = [str(ds.get("SOPClassUID", "") or "").strip()]
    if meta is not None:
        uids.append(str(meta.get("MediaStorageSOPClassUID", "") or "").strip())
    return [uid for uid in uids if uid]


def is_image_sop(ds: Any) -> bool:
    """Whether ``ds`` declares an image storage SOP class (CT, CR, DX, secondary capture, ...)
    in its dataset or in its file meta: a file cut short after its file meta (or inside its
    SOPClassUID) still says there what it held. Such a dataset without Rows or pixel data is
    damaged, not "another kind of DICOM object"."""
    from pydicom.uid import UID

    return any("Image Storage" in UID(uid).name for uid in _sop_uids(ds))


def sop_class_name(ds: Any) -> str:
    """The name of ``ds``'s SOP class (the first known of the dataset's and file meta's UIDs)."""
    from pydicom.uid import UID

    uids = _sop_uids(ds)
    for uid in uids:
        if UID(uid).name != uid:
            return str(UID(uid).name)
    return uids[0] if uids else "DICOM"


def _files_under(folder: Path) -> Iterator[Path]:
    """The files in ``folder`` and its subfolders down to :data:`WSI_SCAN_DEPTH`, sorted."""
    from pathlib import Path

    for root, dirs, files in os.walk(folder):
        depth = len(Path(root).relative_to(folder).parts)
        dirs[:] = sorted(dirs) if depth < WSI_SCAN_DEPTH else []
        yield from (Path(root) / name for name in sorted(files))


# ImageType value 3 of a VL Whole Slide Microscopy image (PS3.3 C.8.12.4.1.1): VOLUME and
# THUMBNAIL images are pyramid levels; LABEL and OVERVIEW are images of the same slide beside
# the pyramid, never read as the slide.
_WSI_LEVEL_KINDS = ("VOLUME", "THUMBNAIL")
_WSI_ASSOCIATED_KINDS = {"LABEL": "label image", "OVERVIEW": "overview (macro) image"}


def _wsi_image(path: os.PathLike[str] | str) -> tuple[str, str, int] | None:
    """``(SeriesInstanceUID, kind, pixels)`` of a DICOM VL Whole Slide Microscopy file, or None.

    ``kind`` is ImageType value 3 (VOLUME, THUMBNAIL, LABEL, OVERVIEW; "" when absent). Reads
    the header only (never pixels).
    """
    if not has_preamble(path):  # first: an SVS or TIFF never needs pydicom imported
        return None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with quiet():  # a probe: a bad header just means "not a level"
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=[
                    "SOPClassUID",
                    "ImageType",
                    "SeriesInstanceUID",
                    "TotalPixelMatrixColumns",
                    "TotalPixelMatrixRows",
                ],
            )
    except (OSError, InvalidDicomError, ValueError, EOFError, KeyError, TypeError):
        return None
    if str(ds.get("SOPClassUID", "")) != WSM_SOP_CLASS:
        return None
    image_type = ds.get("ImageType") or []
    if isinstance(image_type, str):
        image_type = [image_type]
    kind = [str(v).strip().upper() for v in image_type]
    try:
        size = int(ds.get("TotalPixelMatrixColumns", 0)) * int(ds.get("TotalPixelMatrixRows", 0))
    except (TypeError, ValueError):
        size = 0
    return str(ds.get("SeriesInstanceUID", "")), (kind[2] if len(kind) > 2 else ""), size


def _wsi_level(path: os.PathLike[str] | str) -> tuple[str, int] | None:
    """``(SeriesInstanceUID, pixels in the level)`` of a DICOM WSI pyramid-level file, or None.

    Reads the header only (never pixels); label and overview images are not pyramid levels.
    """
    found = _wsi_image(path)
    if found is None or found[1] in _WSI_ASSOCIATED_KINDS:
        return None
    return found[0], found[2]


def whole_slide_file(path: os.PathLike[str] | str) -> Path | None:
    """The file to open of the DICOM whole-slide image that ``path`` is or holds, else None.

    ``path`` may be one file of the image (any level, or its label, overview or thumbnail
    image; its folder holds the levels) or the folder (searched :data:`WSI_SCAN_DEPTH` levels
    deep). Returns the file of the image's largest level; None when there is no whole-slide
    image there (a CT series, a TIFF, ...). A folder with several whole-slide images (series)
    raises InputError naming them: pass one file instead. A label or overview file with no
    pyramid level of its series beside it (or a folder holding only such files) raises
    InputError: those images are not the slide.
    """
    from pathlib import Path

    p = Path(path).expanduser()
    only: str | None = None
    associated: tuple[Path, str] | None = None  # (a label/overview file, its kind)
    if p.is_file():
        found = _wsi_image(p)
        if found is None:
            return None
        only = found[0]
        if found[1] in _WSI_ASSOCIATED_KINDS:
            associated = (p, found[1])
        candidates = sorted(f for f in p.parent.iterdir() if f.is_file())
    elif p.is_dir():
        candidates = list(itertools.islice(_files_under(p), WSI_SCAN_FILES))
    else:
        return None
    largest: dict[str, tuple[int, Path]] = {}
    for f in candidates[:WSI_SCAN_FILES]:
        image = _wsi_image(f)
        if image is None or (only is not None and image[0] != only):
            continue
        series, kind, size = image
        if kind in _WSI_ASSOCIATED_KINDS:
            associated = associated or (f, kind)
            continue
        if series not in largest or size > largest[series][0]:
            largest[series] = (size, f)
    if associated is not None and not largest:
        what = f"the {_WSI_ASSOCIATED_KINDS[associated[1]]} of a DICOM whole-slide image"
        if p.is_file():
            raise InputError(
                f"{str(p)!r} is {what}, not the slide; its pyramid levels (the VOLUME images of "
                "its series) are not beside it: pass the slide's folder"
            )
        raise InputError(
            f"{str(p)!r} holds only {what} ({associated[0].name!r}), not its pyramid levels "
            "(VOLUME images): pass the slide's folder"
        )
    if p.is_file() and only not in largest:
        return p  # its folder listing failed to show it again: open the file given
    if len(largest) > 1:
        names = ", ".join(sorted(str(f) for _, f in largest.values())[:4])
        raise InputError(
            f"{str(p)!r} holds {len(largest)} DICOM whole-slide images (series); pass one file "
            f"of the one to read, e.g. one of: {names}"
        )
    return next(iter(largest.values()))[1] if largest else None


def is_whole_slide_image(path: os.PathLike[str] | str) -> bool:
    """Cheap test for dispatch: ``path`` is a DICOM WSI file (any image of the slide: a level,
    its thumbnail, label or overview), or a folder whose first DICOM files (up to 8,
    :data:`WSI_SCAN_DEPTH` deep) include one."""
    from pathlib import Path

    p = Path(path).expanduser()
    if p.is_file():
        return _wsi_image(p) is not None
    if not p.is_dir():
        return False
    dicoms = (f for f in _files_under(p) if has_preamble(f))
    return any(_wsi_image(f) is not None for f in itertools.islice(dicoms, 8))
