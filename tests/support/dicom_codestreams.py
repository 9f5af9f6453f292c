"""Compressed DICOM files as PACS and converters write them: one frame per encapsulated item,
made by imagecodecs' encoders (JPEG lossless / 12-bit, JPEG-LS, JPEG 2000, HTJ2K)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pattern(values: np.ndarray, bits: int) -> np.ndarray:
    """Stored samples as the codec sees them: the low ``bits`` bits (two's complement if signed)."""
    return (values.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint16)


def encode(syntax: str, values: np.ndarray, bits: int) -> bytes:
    """One frame of ``values`` (stored samples, signed or not) as ``syntax``'s codestream."""
    import imagecodecs

    u = _pattern(values, bits)
    if bits <= 8:
        u = u.astype(np.uint8)
    if syntax == "1.2.840.10008.1.2.4.70":
        return imagecodecs.jpeg8_encode(u, lossless=True, bitspersample=bits, predictor=1)
    if syntax == "1.2.840.10008.1.2.4.57":
        return imagecodecs.jpeg8_encode(u, lossless=True, bitspersample=bits, predictor=7)
    if syntax == "1.2.840.10008.1.2.4.51":
        return imagecodecs.jpeg8_encode(u, level=100, bitspersample=bits)
    if syntax == "1.2.840.10008.1.2.4.80":
        return imagecodecs.jpegls_encode(u)
    if syntax == "1.2.840.10008.1.2.4.81":
        return imagecodecs.jpegls_encode(u, level=2)
    if syntax == "1.2.840.10008.1.2.4.201":
        return imagecodecs.htj2k_encode(u)
    if syntax == "1.2.840.10008.1.2.4.90":
        signed = values.min() < 0
        data = values.astype(np.int16) if signed else u
        return imagecodecs.jpeg2k_encode(data, level=0, codecformat="J2K", bitspersample=bits)
    raise AssertionError(syntax)


def write_compressed(
    path: Path,
    values: np.ndarray,
    syntax: str,
    *,
    bits: int,
    signed: bool,
    modality: str = "CR",
    codestream: bytes | None = None,
) -> Path:
    """One frame, encapsulated in ``syntax`` (explicit VR little endian, as PS3.5 wants)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(signed)
    frame = codestream if codestream is not None else encode(syntax, values, bits)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(path), enforce_file_format=True)
    return path
