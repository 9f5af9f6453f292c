"""Test helpers: write a volume as a real DICOM CT series with pydicom (independent of the reader)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from fastinsight.models.config import InsightConfig
from fastinsight.volume.checkpoint import VolumeModelInfo, save_volume_model
from fastinsight.volume.model import build_volume_model


def dcm2niix_layout(hu: np.ndarray, affine_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What dcm2niix (and fastinsight) read from a series written by :func:`write_dicom_series`
    or :func:`write_enhanced_ct` from ``(hu, affine_ras)``: the same voxels in the same world
    places, slices ascending along the normal ``r x c``. That normal is ``-(axis 0 x axis 1)``
    of the affine (RAS; axis 1 runs along ``-c``), so a right-handed affine (det > 0) comes back
    with its slice axis reversed and a left-handed one as it is."""
    affine = np.asarray(affine_ras, dtype=np.float64)
    if np.linalg.det(affine[:3, :3]) < 0:
        return hu, affine
    out = affine.copy()
    out[:3, 2] *= -1
    out[:3, 3] = affine[:3, 3] + (hu.shape[2] - 1) * affine[:3, 2]
    return hu[:, :, ::-1], out


def write_dicom_series(
    folder: Path,
    hu: np.ndarray,
    affine_ras: np.ndarray,
    *,
    series_uid: str | None = None,
    shuffle_seed: int | None = 0,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    positions: np.ndarray | None = None,
    prefix: str = "img",
) -> str:
    """One file per slice ``hu[:, :, k]``, files named in shuffled order, laid out as dcm2niix
    lays DICOM out: voxel axis 0 runs along the pixel columns and axis 1 along the pixel rows from
    the last row to the first, so pixel row ``m`` is ``hu[:, Y - 1 - m, k]`` and the column cosine
    is ``-affine[:, 1]`` (LPS). dcm2niix (and fastinsight's reader) turn it back into
    :func:`dcm2niix_layout` ``(hu, affine_ras)``: ``hu`` itself for a left-handed affine (as every
    dcm2niix NIfTI of DICOM has), the slices reversed for a right-handed one. ``positions``
    overrides the ImagePositionPatient of each slice (LPS), for tilt/gap tests. Returns the
    SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    a0, a1, a2 = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dc, dr = float(np.linalg.norm(a0)), float(np.linalg.norm(a1))
    r, c = a0 / dc, -a1 / dr
    first_row = lps[:3, 3] + (hu.shape[1] - 1) * a1  # pixel row 0 is voxel row Y - 1
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    nz = hu.shape[2]
    names = list(range(nz))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(names)
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{prefix}{names[k]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.PatientID = "SYNTH"
        ds.InstanceNumber = k + 1
        ipp = first_row + k * a2 if positions is None else positions[k]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*r, *c)]
        ds.PixelSpacing = [f"{dr:.6f}", f"{dc:.6f}"]
        ds.SliceThickness = f"{float(np.linalg.norm(a2)):.6f}"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        pixels = hu[:, ::-1, k].T.astype(np.float64)
        stored = np.rint((pixels - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds.save_as(str(path), enforce_file_format=True)
    return series_uid


def write_enhanced_ct(
    path: Path,
    hu: np.ndarray,
    affine_ras: np.ndarray,
    *,
    shuffle_seed: int | None = 0,
    jpeg_lossless: bool = False,
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> Path:
    """The volume as ONE enhanced CT file (Enhanced CT Image Storage, as current scanners
    export): frames in shuffled order, each placed by its PlanePositionSequence; orientation,
    spacing and rescale in the shared functional groups. Pixel layout as
    :func:`write_dicom_series` (dcm2niix reads it back as ``hu`` with ``affine_ras``).
    ``jpeg_lossless`` encapsulates every frame as JPEG lossless SV1."""
    from pydicom.dataset import Dataset

    path.parent.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    a0, a1, a2 = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dc, dr = float(np.linalg.norm(a0)), float(np.linalg.norm(a1))
    nz = hu.shape[2]
    order = list(range(nz))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.70" if jpeg_lossless else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality, ds.PatientID = "CT", "SYNTH"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = nz
    ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    orient, measures, rescale = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [f"{v:.8f}" for v in (*(a0 / dc), *(-a1 / dr))]
    first_row = lps[:3, 3] + (hu.shape[1] - 1) * a1  # pixel row 0 is voxel row Y - 1
    measures.PixelSpacing = [f"{dr:.6f}", f"{dc:.6f}"]
    measures.SliceThickness = f"{float(np.linalg.norm(a2)):.6f}"
    rescale.RescaleSlope, rescale.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    rescale.RescaleType = "HU"
    shared = Dataset()
    shared.PlaneOrientationSequence = [orient]
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames, per_frame = [], []
    for k in order:
        position, content, item = Dataset(), Dataset(), Dataset()
        position.ImagePositionPatient = [f"{v:.6f}" for v in first_row + k * a2]
        content.InStackPositionNumber = k + 1
        item.PlanePositionSequence = [position]
        item.FrameContentSequence = [content]
        per_frame.append(item)
        frames.append(
            np.rint((hu[:, ::-1, k].T.astype(np.float64) - intercept) / slope).astype(np.int16)
        )
    ds.PerFrameFunctionalGroupsSequence = per_frame
    if jpeg_lossless:
        import imagecodecs
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate(
            [
                imagecodecs.jpeg8_encode(
                    np.ascontiguousarray(f).view(np.uint16),
                    lossless=True,
                    bitspersample=16,
                    predictor=1,
                )
                for f in frames
            ]
        )
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.stack(frames).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def read_back(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(str(path))


# A small volume model: random head, vit-tiny slice encoder at 56 px -> 4 x 4 grid.
TILE = 56
ENCODER_OPTIONS = {"patch_size_px": 14, "seed": 0}


def small_model_file(folder: Path, slice_context: str = "2d", slices: str = "all") -> Path:
    torch.manual_seed(0)
    cfg = InsightConfig(
        in_dim=64,
        reduce_dim=16,
        widths=(16, 8, 8),
        grid_size=(4, 4),
        norm="channel",
        encoder="vit-tiny",
        tile_size_px=TILE,
        patch_size_px=14,
        class_names=("lesion",),
    )
    model = build_volume_model(cfg, slice_context, backend="reference")
    info = VolumeModelInfo(
        encoder="vit-tiny", encoder_options=ENCODER_OPTIONS, tile_size=TILE, slices=slices
    )
    path = folder / f"model_{slice_context}_{slices}.safetensors"
    save_volume_model(model, info, path)
    return path
