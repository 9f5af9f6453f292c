"""CT volumes in: NIfTI (nibabel) and DICOM series (pydicom), with their geometry carried exactly.

One in-memory form, :class:`Volume`: Hounsfield units as float32 ``[X, Y, Z]`` in NIfTI voxel
order and the 4x4 voxel-to-world affine in RAS+ millimetres (nibabel's convention), so a heatmap
written with the same shape and affine overlays the scan in 3D Slicer / ITK-SNAP unregistered.

DICOM (LPS+ patient coordinates) is laid out exactly as dcm2niix writes it to NIfTI (checked
against the real dcm2niix in tests/volume/test_volume_dcm2niix.py): voxel axis 0 runs along the
image columns (the row direction cosine ``r``), axis 1 along the pixel rows from the LAST row to
the first (``-c``, the column cosine reversed: dcm2niix flips the rows, so an axial series with
IOP (1,0,0,0,1,0) is an LAS volume), axis 2 along the slice normal ``n = r x c`` with slices
sorted by ``IPP . n`` (ascending), so the affine is always left-handed::

    voxel (i, j, k)    = pixel (row R - 1 - j, column i) of slice k     (R = Rows)
    world_LPS(i, j, k) = IPP_0 + i * dc * r + (R - 1 - j) * dr * c + k * step
    affine_RAS         = diag(-1, -1, 1, 1) @ affine_LPS                (dr, dc = PixelSpacing)

Every voxel keeps its world position either way, but the encoder sees ``data[:, :, k]`` as
stored, so the layout decides which way up each slice goes in: the official INSIGHT-CT code
reads NIfTI files as stored and its weights were trained on NIfTI slices (DICOM converted with
dcm2niix), so a DICOM series here gives the slices, and the heatmap, of its dcm2niix NIfTI.
NIfTI files are read as stored, not reoriented (as the official code).

``step`` is the mean offset between consecutive slice positions; a series whose offsets leave the
normal (gantry tilt) or vary in length is refused rather than silently resampled.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np

from fastinsight.dicom import damaged_series_uid, has_preamble, pixel_array, read_header
from fastinsight.errors import InputError
from fastinsight.inputs import check_allocation
from fastinsight.quiet import quiet

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Relative tolerance on slice spacing and on the offset's angle to the normal. Scanners write
# positions to ~1e-3 mm; 1 % catches real tilt/gaps while accepting rounding.
SPACING_RTOL = 0.01
TILT_TOL = 0.01
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# The largest Hounsfield value stored: float32's range (a rescale beyond it is a damaged header).
MAX_HU = float(np.finfo(np.float32).max)

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The readers' foreign chatter off: numpy's floating-point warnings, pydicom's and
    nibabel's warnings, and nibabel's header-fix log lines (``pixdim[1,2,3] should be
    positive``), which go straight to stderr. What matters among those conditions (HU beyond
    float32 after a rescale, non-finite spacing or geometry) is checked explicitly and refused
    with one line; the rest are lenient fixes that must not add lines to a good run.

    In this thread only (:func:`fastinsight.quiet.quiet`): other threads' warnings and log lines
    go through, and the process's filters and nibabel's logger are left as they were."""
    with quiet(loggers=("nibabel.global",)), np.errstate(all="ignore"):
        yield


def _quietly(func: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a reader under :func:`_quiet`; a MemoryError becomes one InputError line."""

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            with _quiet():
                return func(*args, **kwargs)
        except MemoryError:
            what = str(args[0]) if args else "the volume"
            raise InputError(
                f"not enough memory to read {what!r}; free memory or use a machine with more"
            ) from None

    return wrapper


@dataclass(frozen=True)
class NiftiGeometry:
    """Where a NIfTI header puts its voxels, as written: the qform and sform (None where the
    code is 0), their codes, the voxel sizes (``pixdim``, used when both codes are 0) and the
    ``xyzt_units`` byte (the unit of all of these: ITK-based viewers such as 3D Slicer scale by
    it, so a heatmap must carry the scan's)."""

    qform: np.ndarray | None
    qform_code: int
    sform: np.ndarray | None
    sform_code: int
    zooms: tuple[float, float, float]
    xyzt_units: int = 0

    @classmethod
    def of(cls, header: Any) -> NiftiGeometry:
        try:
            qform, qcode = header.get_qform(coded=True)
        except ValueError:  # a quaternion beyond unit length (|b, c, d| > 1, inf): no rotation
            qform, qcode = np.full((4, 4), np.nan), int(np.asarray(header["qform_code"]).item())
        sform, scode = header.get_sform(coded=True)
        zooms = tuple(float(z) for z in header.get_zooms()[:3])
        units = int(np.asarray(header["xyzt_units"]).item())
        return cls(qform, int(qcode), sform, int(scode), zooms, units)  # type: ignore[arg-type]

    def usable(self, affine: np.ndarray) -> tuple[NiftiGeometry, list[str]]:
        """This geometry with what cannot be written back dropped, and notes saying so.

        ``affine`` is the one the scan is read with (nibabel's choice: the sform when its code
        is set, else the qform, else the voxel sizes), already checked finite and non-singular.
        A qform that is not finite or singular (NaN/inf ``pixdim`` or quaternion) while the sform
        places the voxels is written with code 0, as no qform; voxel sizes that are not finite
        and positive become the affine's. The heatmap then lands where nibabel (and every viewer
        that reads the sform) puts the scan, and is a valid NIfTI file.
        """
        notes: list[str] = []
        qform, qcode = self.qform, self.qform_code
        if qform is not None and not _regular(qform):
            qform, qcode = None, 0
            notes.append(
                "the qform (quaternion / pixdim) is not finite or singular; the scan is placed by "
                "its sform, and the heatmap is written with the sform only"
            )
        zooms = self.zooms
        if not all(math.isfinite(z) and z > 0 for z in zooms):
            zooms = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))  # type: ignore[assignment]
            notes.append(
                f"pixdim {list(self.zooms)} is not finite and positive; written as the sform's "
                "voxel sizes"
            )
        return replace(self, qform=qform, qform_code=qcode, zooms=zooms), notes

    @property
    def mm_per_unit(self) -> float:
        """Millimetres per spatial unit of the header (NIfTI codes: 1 metre, 2 mm, 3 micron;
        0, unknown, is read as mm as ITK and nibabel do)."""
        return {1: 1000.0, 3: 0.001}.get(self.xyzt_units & 0x07, 1.0)


@dataclass(frozen=True)
class Volume:
    """A CT scan in Hounsfield units with its voxel-to-world geometry.

    Shapes: data float32 ``[X, Y, Z]`` (NIfTI voxel order); affine float64 ``[4, 4]`` mapping
    voxel indices ``(i, j, k, 1)`` to RAS+ millimetres. ``facts`` holds what the source said
    (format, path, series UID, modality, how many files were read, notes).
    """

    data: np.ndarray
    affine: np.ndarray
    facts: Mapping[str, Any] = field(default_factory=dict)
    # A NIfTI source's geometry header (qform, sform, their codes, voxel sizes): written back
    # as it was, so every viewer places a heatmap exactly where it places the scan.
    header: NiftiGeometry | None = None

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise InputError(f"a volume is 3-D [X, Y, Z]; found shape {list(self.data.shape)}")
        if self.affine.shape != (4, 4):
            raise InputError(f"the affine must be 4 x 4, found {list(self.affine.shape)}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three voxel axes (column norms of the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Three-letter axis codes (nibabel's ``aff2axcodes``), e.g. ``"RAS"`` or ``"LPS"``."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def geometry(self) -> dict[str, Any]:
        """Shape, spacing, orientation and affine, JSON-ready (for reports)."""
        return {
            "shape": list(self.shape),
            "spacing_mm": [round(s, 6) for s in self.spacing],
            "orientation": self.orientation,
            "affine": [[float(v) for v in row] for row in self.affine],
        }


# ------------------------------------------------------------------------------- checks
def _regular(affine: np.ndarray) -> bool:
    """A finite affine whose 3 x 3 part has a non-zero determinant (voxels with a size)."""
    if not np.all(np.isfinite(affine)):
        return False
    det = float(np.linalg.det(affine[:3, :3]))
    return math.isfinite(det) and abs(det) >= 1e-9


def check_volume(data: np.ndarray, affine: np.ndarray, where: str) -> None:
    """Refuse what no later step can use: a non-3-D array, a singular affine, NaN/inf voxels."""
    if data.ndim != 3:
        hint = (
            "a 2-D image is not a volume; pass the whole series/scan"
            if data.ndim == 2
            else "pass one 3-D scan (split 4-D series into 3-D volumes first)"
        )
        raise InputError(f"{where}: expected a 3-D volume, found shape {list(data.shape)}; {hint}")
    if min(data.shape) < 1:
        raise InputError(f"{where}: the volume is empty (shape {list(data.shape)})")
    if not _regular(affine):
        raise InputError(
            f"{where}: the voxel-to-world affine is singular or not finite "
            f"({np.round(affine[:3, :3], 4).tolist()}); fix the header (sform/qform) so voxels "
            "have a size and a direction"
        )
    if not np.all(np.isfinite(data)):
        bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise InputError(
            f"{where}: {bad} voxel(s) are NaN or infinite; a CT in Hounsfield units has none — "
            "fill them (e.g. with -1024 HU) before predicting"
        )


# ------------------------------------------------------------------------------- NIfTI
def is_nifti(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


# A .nii.gz may hold a little more than its header and voxels (padding some writers add).
_GZIP_SLACK = 1 << 20


def _check_nifti_size(p: Path, img: Any) -> int:
    """Refuse from the header alone a volume too large for this machine's memory, voxels that
    are not real numbers, or an uncompressed file shorter than its header says (truncated),
    before nibabel allocates. Returns the bytes the header says the file holds."""
    shape = tuple(int(n) for n in img.header.get_data_shape())
    voxels = math.prod(shape)
    dtype = np.dtype(img.header.get_data_dtype())
    if dtype.kind not in "biuf":
        kind = "complex" if dtype.kind == "c" else f"{dtype} (e.g. RGB)"
        raise InputError(
            f"{str(p)!r} holds {kind} voxels; a CT volume holds one real value per voxel "
            "(Hounsfield units)"
        )
    itemsize = dtype.itemsize
    # The stored values and their float32 copy.
    check_allocation(voxels * (4 + itemsize), f"{str(p)!r} ({' x '.join(map(str, shape))} voxels)")
    needed = int(img.header["vox_offset"]) + voxels * itemsize
    if p.name.lower().endswith(".nii"):
        have = p.stat().st_size
        if have < needed:
            raise InputError(
                f"{str(p)!r} is truncated: its header needs {needed:,} bytes, the file has {have:,}"
            )
    return needed


def _gunzip(p: Path, needed: int) -> bytes:
    """The whole gzip stream of ``p``, its CRC and length checked (nibabel stops reading at the
    last voxel, so a damaged stream would otherwise give wrong voxels silently), read no further
    than the header's size plus a little (a gzip bomb is refused, not inflated)."""
    import gzip
    import zlib

    limit = needed + _GZIP_SLACK
    parts, total = [], 0
    try:
        with gzip.open(p, "rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(chunk)
                if total > limit:
                    raise InputError(
                        f"{str(p)!r} inflates to more than {limit:,} bytes, but its header "
                        f"describes {needed:,}; the file is damaged or not this volume"
                    )
                parts.append(chunk)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(
            f"{str(p)!r} is damaged: its gzip stream does not check out ({exc}); re-export or "
            "re-download it"
        ) from None
    return b"".join(parts)


@_quietly
def read_nifti(path: str | os.PathLike[str]) -> Volume:
    """A NIfTI-1/2 file (``.nii`` / ``.nii.gz``) as a :class:`Volume` (scl_slope/inter applied).

    A trailing singleton 4th axis (``[X, Y, Z, 1]``) is dropped; any other 4-D file is refused.
    A qform or pixdim that is not finite is not carried into the heatmap when the sform places
    the scan (:meth:`NiftiGeometry.usable`); voxels that overflow float32 through scl_slope are
    refused.
    """
    import nibabel as nib

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"volume file {str(p)!r} does not exist")
    try:
        img: Any = nib.load(str(p))
    except Exception as exc:  # nibabel raises many kinds for damaged files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {str(p)!r} as NIfTI ({msg})") from exc
    needed = _check_nifti_size(p, img)
    raw = _gunzip(p, needed) if p.name.lower().endswith(".gz") else None
    try:
        if raw is not None:
            img = type(img).from_bytes(raw)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {str(p)!r} as NIfTI ({msg})") from exc
    notes = []
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
        notes.append("dropped a singleton 4th axis")
    codes = NiftiGeometry.of(img.header)
    file_affine = np.asarray(img.affine, dtype=np.float64)
    affine = file_affine.copy()
    if codes.mm_per_unit != 1.0:  # the Volume's affine is in mm whatever the file's unit
        affine[:3] *= codes.mm_per_unit
        unit = "metres" if codes.mm_per_unit > 1 else "microns"
        notes.append(f"the header's lengths are in {unit}; converted to mm")
    if not np.all(np.isfinite(data)):
        # nibabel moves scl_slope/inter from the header to the data proxy as it loads.
        slope = float(getattr(img.dataobj, "slope", 1.0))
        inter = float(getattr(img.dataobj, "inter", 0.0))
        if slope != 1.0 or inter != 0.0:
            bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            raise InputError(
                f"{str(p)!r}: {bad} voxel(s) are NaN or infinite after scl_slope {slope:g} / "
                f"scl_inter {inter:g} (a scaling beyond float32's range, or stored NaN/inf); "
                "fix the header's scl_slope/scl_inter or the data"
            )
    check_volume(data, affine, str(p))
    codes, fixed = codes.usable(file_affine)
    notes.extend(fixed)
    if codes.qform_code == 0 and codes.sform_code == 0:
        notes.append("qform and sform codes are 0 (orientation unknown); kept in the heatmap")
    facts = {"format": "nifti", "path": str(p), "notes": notes}
    return Volume(np.ascontiguousarray(data, dtype=np.float32), affine, facts, codes)


# ------------------------------------------------------------------------------- DICOM
@dataclass(frozen=True)
class _Slice:
    path: Path
    ds: Any  # pydicom Dataset without pixels (for a frame: its merged functional groups)
    frame: int | None = None  # index in a multi-frame (enhanced) file's pixel data

    @property
    def label(self) -> str:
        """The file's name, and the frame's number (from 1) in a multi-frame file."""
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame + 1}"


# Per-frame attributes of an enhanced (multi-frame) image: functional group -> attributes.
_FRAME_GROUPS = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept"),
}


def _frames(path: Path, ds: Any) -> list[_Slice]:
    """A multi-frame (enhanced CT) file as one slice per frame, each with the geometry and
    rescale of its shared and per-frame functional groups (per-frame wins); other files as
    themselves."""
    from pydicom.dataset import Dataset

    try:
        count = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise InputError(
            f"{str(path)!r} has NumberOfFrames {ds.get('NumberOfFrames')!r}, not a number; the "
            "file is damaged"
        ) from None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        return [_Slice(path, ds)]
    if len(per_frame) != count:
        raise InputError(
            f"{str(path)!r} has {count} frames but {len(per_frame)} per-frame functional groups; "
            "the file is damaged"
        )
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    out = []
    for index, groups in enumerate(per_frame):
        frame = Dataset()
        for key in ("Modality", "SeriesInstanceUID", "SeriesDescription", "Rows", "Columns"):
            if key in ds:
                frame[key] = ds[key]
        for source in (ds, shared, groups):
            for group, keys in _FRAME_GROUPS.items():
                items = source.get(group) if source is not ds else [source]
                if not items:
                    continue
                for key in keys:
                    if key in items[0]:
                        frame[key] = items[0][key]
        out.append(_Slice(path, frame, index))
    return out


def _float_list(ds: Any, key: str, n: int, path: Path) -> np.ndarray:
    """``n`` finite numbers (PixelSpacing: positive ones) of ``key``; else one InputError line."""
    value: Any = None
    try:
        value = ds.get(key)
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        arr = np.array([])
    if (
        arr.size != n
        or not np.all(np.isfinite(arr))
        or (key == "PixelSpacing" and not np.all(arr > 0))
    ):
        raise InputError(
            f"DICOM file {str(path)!r} lacks a usable {key} (found {_shown(value)}; expected "
            f"{n} finite numbers{', > 0' if key == 'PixelSpacing' else ''}); it cannot be placed "
            "in space — is it a CT image?"
        )
    return arr


def _shown(value: Any) -> str:
    """A header value for a one-line message (raw DS/IS text, never more than 80 characters)."""
    text = repr(value if value is None else str(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _size(s: _Slice, key: str) -> int:
    """A slice's Rows / Columns: a whole number >= 1, else one InputError line naming it."""
    value = s.ds.get(key)
    try:
        real = float(value)
        number = int(real) if real.is_integer() else 0
    except (TypeError, ValueError, OverflowError):
        number = 0
    if number < 1:
        found = f"lacks {key}" if value is None else f"has {key} {_shown(value)}"
        raise InputError(
            f"{str(s.path)!r} is a damaged DICOM file: it {found} (the image's size, a whole "
            "number >= 1); remove it or export it again"
        )
    return number


def _rescale(s: _Slice, key: str, default: float) -> float:
    """A slice's RescaleSlope / RescaleIntercept: one finite number (absent or empty: default)."""
    value = s.ds.get(key)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise InputError(
            f"{s.label} has {key} {value!r}; expected one number (the file is damaged or not a "
            "CT image)"
        )
    return number


def _scan_folder(
    folder: Path, *, recursive: bool = True, damaged: list[str] | None = None
) -> dict[str, list[_Slice]]:
    """Every DICOM image file in ``folder`` (and its subfolders), grouped by SeriesInstanceUID
    (whole files: a series' frames are expanded once it is chosen, by :func:`_frames`).

    Files that are not DICOM are skipped. A damaged DICOM file is an InputError naming it (a
    silently missing end slice would shift the volume), or, given ``damaged``, listed there.
    """
    series: dict[str, list[_Slice]] = {}
    files = folder.rglob("*") if recursive else folder.iterdir()
    for path in sorted(p for p in files if p.is_file()):
        try:
            ds = read_header(path)
        except InputError:
            if damaged is None:
                raise
            damaged.append(path.name)
            continue
        if ds is None or ("PixelData" not in ds and "Rows" not in ds):
            continue  # not DICOM; DICOMDIR, structured reports, ...
        uid = str(ds.get("SeriesInstanceUID", "<no SeriesInstanceUID>"))
        series.setdefault(uid, []).append(_Slice(path, ds))
    return series


@_quietly
def list_dicom_series(folder: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Series in a folder: UID -> number of files, modality, description."""
    out = {}
    for uid, files in _scan_folder(Path(folder)).items():
        ds = files[0].ds
        out[uid] = {
            "files": len(files),
            "slices": sum(len(_frames(f.path, f.ds)) for f in files),
            "modality": str(ds.get("Modality", "")),
            "description": str(ds.get("SeriesDescription", "")),
        }
    return out


@_quietly
def read_dicom_series(
    folder: str | os.PathLike[str],
    series_uid: str | None = None,
    *,
    allow_modalities: tuple[str, ...] = ("CT",),
) -> Volume:
    """A DICOM series (files in any order) as a :class:`Volume` in Hounsfield units.

    ``folder`` holds one series, or several and ``series_uid`` picks one (a folder mixing series
    without it is refused, listing them). Refused too: a non-CT modality, slices of different
    size or orientation, gantry tilt, uneven slice spacing, duplicate positions.
    HU = stored value * RescaleSlope + RescaleIntercept, per file. An enhanced (multi-frame) CT
    file counts as one slice per frame, placed and rescaled by its functional groups.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InputError(f"DICOM folder {str(root)!r} does not exist or is not a folder")
    return _series_volume(_scan_folder(root), root, series_uid, allow_modalities)


def _series_volume(
    groups: dict[str, list[_Slice]],
    root: Path,
    series_uid: str | None,
    allow_modalities: tuple[str, ...],
) -> Volume:
    """One series of ``groups`` (found in ``root``) as a :class:`Volume` (see read_dicom_series)."""
    if not groups:
        raise InputError(f"no DICOM image files found in {str(root)!r}")
    if series_uid is not None:
        if series_uid not in groups:
            raise InputError(
                f"series {series_uid!r} is not in {str(root)!r}; it holds "
                + ", ".join(f"{u} ({len(s)} files)" for u, s in groups.items())
            )
        slices = groups[series_uid]
    elif len(groups) > 1:
        listing = "; ".join(
            f"{u} ({len(s)} files, {s[0].ds.get('Modality', '?')}"
            f"{', ' + str(s[0].ds.get('SeriesDescription')) if s[0].ds.get('SeriesDescription') else ''})"
            for u, s in sorted(groups.items(), key=lambda kv: -len(kv[1]))
        )
        raise InputError(
            f"{str(root)!r} mixes {len(groups)} DICOM series: {listing}; pick one with "
            "--series UID (series_uid=...)"
        )
    else:
        series_uid, slices = next(iter(groups.items()))
    slices = [frame for f in slices for frame in _frames(f.path, f.ds)]
    first = slices[0].ds
    modality = str(first.get("Modality", ""))
    if modality not in allow_modalities:
        raise InputError(
            f"series {series_uid} has Modality {modality or '<missing>'!r}; this pipeline reads "
            f"{'/'.join(allow_modalities)} in Hounsfield units — pass a CT series"
        )
    # Geometry of every slice: one orientation, one size, one pixel spacing.
    iop = _float_list(first, "ImageOrientationPatient", 6, slices[0].path)
    spacing = _float_list(first, "PixelSpacing", 2, slices[0].path)
    rows, cols = _size(slices[0], "Rows"), _size(slices[0], "Columns")
    for s in slices[1:]:
        if not np.allclose(_float_list(s.ds, "ImageOrientationPatient", 6, s.path), iop, atol=1e-4):
            raise InputError(
                f"series {series_uid}: {s.label} has another ImageOrientationPatient than "
                f"{slices[0].label}; a volume needs one orientation"
            )
        if (_size(s, "Rows"), _size(s, "Columns")) != (rows, cols):
            raise InputError(
                f"series {series_uid}: {s.label} is {s.ds.Rows} x {s.ds.Columns} px, "
                f"{slices[0].label} {rows} x {cols}; a volume needs one slice size"
            )
        if not np.allclose(_float_list(s.ds, "PixelSpacing", 2, s.path), spacing, rtol=1e-4):
            raise InputError(
                f"series {series_uid}: {s.label} has another PixelSpacing; refusing to mix"
            )
    r, c = iop[:3], iop[3:]
    normal = np.cross(r, c)
    if not math.isclose(float(np.linalg.norm(normal)), 1.0, abs_tol=1e-3):
        raise InputError(
            f"series {series_uid}: ImageOrientationPatient {iop.tolist()} is not two orthonormal "
            "direction cosines"
        )
    positions = np.stack([_float_list(s.ds, "ImagePositionPatient", 3, s.path) for s in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    dist = positions @ normal
    if len(slices) > 1:
        gaps = np.diff(dist)
        if np.any(gaps < 1e-3):
            dup = slices[int(np.argmin(gaps)) + 1].label
            raise InputError(
                f"series {series_uid}: two slices share one position (e.g. {dup}); the folder "
                "holds duplicates or several acquisitions — keep one"
            )
        offsets = np.diff(positions, axis=0)
        along = offsets @ normal
        off_normal = np.linalg.norm(offsets - along[:, None] * normal, axis=1)
        if np.any(off_normal > TILT_TOL * np.abs(along) + 1e-3):
            angle = math.degrees(math.atan2(float(off_normal.max()), float(along.mean())))
            raise InputError(
                f"series {series_uid}: slice positions step off the slice normal by {angle:.2f} "
                "deg (gantry tilt); resample it to an orthogonal grid first (e.g. dcm2niix)"
            )
        if gaps.max() - gaps.min() > SPACING_RTOL * gaps.mean() + 1e-3:
            raise InputError(
                f"series {series_uid}: slice spacing varies from {gaps.min():.4g} to "
                f"{gaps.max():.4g} mm (missing slices or variable spacing); resample to even "
                "spacing first"
            )
        step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        thick = 1.0
        for key in ("SpacingBetweenSlices", "SliceThickness"):
            value = first.get(key)
            if value is None or str(value).strip() == "":
                continue
            try:
                thick = abs(float(value))
            except (TypeError, ValueError, OverflowError):
                thick = math.nan
            if not (math.isfinite(thick) and thick > 0):
                raise InputError(
                    f"{slices[0].label}: {key} {_shown(value)} is not a positive number; a "
                    "single slice needs it for its thickness (fix the header)"
                )
            break
        step = normal * thick
    # Pixels and HU: read each file once more, with pixels (a multi-frame file once for all its
    # frames, which may lie anywhere in the sorted order).
    check_allocation(cols * rows * len(slices) * 4, f"series {series_uid} ({len(slices)} slices)")
    data = np.empty((cols, rows, len(slices)), dtype=np.float32)
    # The last file decoded, kept for its other frames (a file's frames sort together).
    read_path: Path | None = None
    px_all = np.empty(0)
    for k, s in enumerate(slices):
        if s.path != read_path:
            full = read_header(s.path, pixels=True)
            if full is None:  # the file changed since it was scanned
                raise InputError(f"{str(s.path)!r} is no longer a readable DICOM file")
            px_all = pixel_array(full, repr(str(s.path)))
            read_path = s.path
        px = px_all
        if s.frame is not None and px.ndim == 3:
            px = px[s.frame]  # (a one-frame file decodes to a 2-D image: that frame)
        if px.ndim != 2:
            raise InputError(
                f"{str(s.path)!r} holds {px.shape} pixels without per-frame positions; a CT "
                "file is one slice, or an enhanced CT with functional groups"
            )
        slope = _rescale(s, "RescaleSlope", 1.0)
        intercept = _rescale(s, "RescaleIntercept", 0.0)
        hu = px.astype(np.float64) * slope + intercept
        if not np.all(np.abs(hu) <= MAX_HU):  # also NaN: RescaleSlope 1e308 overflows to inf
            raise InputError(
                f"{s.label}: RescaleSlope {slope:g} / RescaleIntercept {intercept:g} take its "
                "values beyond float32's range (not Hounsfield units); the header is damaged"
            )
        # dcm2niix's layout: voxel axis 0 = columns (along r), axis 1 = rows from the last to
        # the first (along -c); slices ascending along the normal.
        data[:, :, k] = hu[::-1, :].T
    lps = np.eye(4)
    lps[:3, 0] = r * spacing[1]
    lps[:3, 1] = -c * spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = positions[0] + (rows - 1) * spacing[0] * c  # the first slice's last row
    affine = LPS_TO_RAS @ lps
    check_volume(data, affine, f"series {series_uid}")
    facts = {
        "format": "dicom",
        "path": str(root),
        "series_uid": series_uid,
        "series_in_folder": len(groups),
        "files": len({s.path for s in slices}),
        "slices": len(slices),
        "modality": modality,
        "description": str(first.get("SeriesDescription", "")),
        "notes": [],
    }
    return Volume(data, affine, facts)


def read_volume(path: str | os.PathLike[str], series_uid: str | None = None) -> Volume:
    """A NIfTI file or a DICOM folder (or one DICOM file: its series in that folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return read_dicom_series(p, series_uid)
    if is_nifti(p):
        if series_uid is not None:
            raise InputError("--series applies to DICOM folders, not to a NIfTI file")
        return read_nifti(p)
    if not p.exists():
        raise InputError(f"input {str(p)!r} does not exist")
    if p.suffix.lower() == ".dcm" or has_preamble(p):
        return _read_single_dicom(p, series_uid)
    raise InputError(
        f"{str(p)!r} is neither a NIfTI file (.nii, .nii.gz) nor a DICOM folder/file; pass a "
        "CT volume"
    )


@_quietly
def _read_single_dicom(p: Path, series_uid: str | None) -> Volume:
    """One DICOM file: its series, from the files beside it (not below: a whole archive is not
    scanned); an enhanced CT file is a series of its own."""
    ds = read_header(p)
    if ds is None:
        raise InputError(f"{str(p)!r} is not a DICOM file; pass a CT series folder or NIfTI file")
    uid = str(ds.get("SeriesInstanceUID", "<no SeriesInstanceUID>"))
    if series_uid not in (None, uid):
        raise InputError(
            f"{str(p)!r} belongs to series {uid}, not {series_uid}; pass the series' folder "
            "with --series, or a file of that series"
        )
    # Damaged files beside it: one of this series is refused (as in a series folder: a missing
    # end slice would shift the volume); those of another series, or cut before their series
    # UID, are named in the notes.
    damaged: list[str] = []
    groups = _scan_folder(p.parent, recursive=False, damaged=damaged)
    for name in damaged:
        if damaged_series_uid(p.parent / name) == uid:
            raise InputError(
                f"{str(p.parent / name)!r}, a file of the same series as {str(p)!r}, is a damaged "
                "DICOM file; remove it or export the series again"
            )
    if uid not in groups:
        raise InputError(f"{str(p)!r} holds no image (no Rows / PixelData); pass a CT image file")
    vol = _series_volume({uid: groups[uid]}, p.parent, uid, ("CT",))
    facts = dict(vol.facts)
    facts["path"] = str(p)
    facts["series_in_folder"] = len(groups)
    if damaged:
        shown = ", ".join(damaged[:5]) + (", ..." if len(damaged) > 5 else "")
        facts["notes"] = [
            *facts["notes"],
            f"skipped {len(damaged)} damaged DICOM file(s) beside it: {shown}",
        ]
    return Volume(vol.data, vol.affine, facts)


def write_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike[str],
    *,
    dtype: Any = np.float32,
    header: NiftiGeometry | None = None,
) -> None:
    """Write ``data`` atomically: with ``header`` (a NIfTI source's geometry) its qform, sform,
    codes, voxel sizes and units as they were; else ``affine`` (mm) as sform and qform, code 1
    (scanner), units mm. A name ending in ``.gz`` (any case) is gzip-compressed."""
    import nibabel as nib

    from fastinsight.atomic import atomic_path

    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(affine, dtype=np.float64))
    if header is None:
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        img.header.set_xyzt_units(xyz="mm")
    else:
        img.header.set_zooms(header.zooms + tuple(img.header.get_zooms()[3:]))
        img.set_qform(header.qform, code=header.qform_code)
        img.set_sform(header.sform, code=header.sform_code)
        img.header["xyzt_units"] = header.xyzt_units
    gz = str(path).lower().endswith(".gz")
    # The temp file must keep the suffix nibabel uses to decide on gzip.
    with atomic_path(path) as tmp:
        real = tmp.with_name(tmp.name + (".nii.gz" if gz else ".nii"))
        # ``real`` is a second temp name that atomic_path does not know: removed here on any
        # failure (a full disk, Ctrl-C, SIGTERM inside nib.save), or a partial NIfTI stays.
        try:
            nib.save(img, str(real))
            os.replace(real, tmp)
        except BaseException:
            with contextlib.suppress(OSError):
                real.unlink()
            raise
