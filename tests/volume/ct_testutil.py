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
    """One file per slice ``hu[:, :, k]`` (pixel rows = voxel axis 1), files named in shuffled
    order. ``positions`` overrides the ImagePositionPatient of each slice (LPS), for tilt/gap tests.
    Returns the SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    a0, a1, a2 = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    dc, dr = float(np.linalg.norm(a0)), float(np.linalg.norm(a1))
    r, c = a0 / dc, a1 / dr
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
        ipp = lps[:3, 3] + k * a2 if positions is None else positions[k]
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
        stored = np.rint((hu[:, :, k].T.astype(np.float64) - intercept) / slope).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds.save_as(str(path), enforce_file_format=True)
    return series_uid


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
