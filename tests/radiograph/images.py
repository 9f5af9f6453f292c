"""Small test radiographs written in real formats (PNG via Pillow, DICOM via pydicom)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def picture(h: int = 300, w: int = 280, seed: int = 0) -> np.ndarray:
    """A smooth grey picture with a bright blob, spanning exactly 0..255 (uint8 ``[h, w]``)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 80 + 60 * np.sin(xx / 23.0) * np.cos(yy / 31.0) + rng.normal(0, 8, (h, w))
    img += 120 * np.exp(-((yy - h * 0.4) ** 2 + (xx - w * 0.6) ** 2) / (2 * 15.0**2))
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return np.rint(img).astype(np.uint8)


def write_png(path: Path, arr: np.ndarray) -> Path:
    if arr.dtype == np.uint16:
        Image.fromarray(arr.astype(np.uint16)).save(path)  # Pillow picks mode I;16
    else:
        Image.fromarray(arr).save(path)
    return path


def write_dicom(
    path: Path,
    stored: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    modality: str = "CR",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    spacing: tuple[float, float] | None = None,
) -> Path:
    """Write a single-frame uncompressed DICOM (explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName = "Test^Phantom"
    if stored is not None:
        arr = np.ascontiguousarray(stored.astype(np.uint16))
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = arr.tobytes()
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    ds.save_as(path, enforce_file_format=True)
    return path
