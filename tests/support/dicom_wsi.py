"""Write a DICOM whole-slide image (VL Whole Slide Microscopy, PS3.3 A.32.8) with pydicom.

One file per pyramid level in one folder, as scanners and converters (wsidicomizer, Google's
converter, Sectra exports) write them: TILED_FULL frames of JPEG baseline tiles (or uncompressed
RGB), pixel spacing in the shared functional groups, ORIGINAL/DERIVED ImageType with VOLUME.
Independent of fastinsight's readers; OpenSlide (libdicom) reads the result.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np

WSM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _tiles(rgb: np.ndarray, tile: int) -> list[np.ndarray]:
    h, w = rgb.shape[:2]
    out = []
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            t = np.full((tile, tile, 3), 255, np.uint8)  # edge tiles padded white
            part = rgb[y : y + tile, x : x + tile]
            t[: part.shape[0], : part.shape[1]] = part
            out.append(t)
    return out


def write_dicom_wsi(
    folder: Path,
    rgb: np.ndarray,
    *,
    mpp: float = 0.5,
    tile: int = 256,
    downsamples: tuple[int, ...] = (1, 4),
    jpeg: bool = True,
    extra_series_file: bool = False,
    associated: tuple[str, ...] = (),
) -> list[Path]:
    """Level-0 ``rgb`` (uint8 ``[H, W, 3]``) and its block-mean downsamples, one file each.

    ``mpp``: level-0 pixel size in um. Returns the files, level 0 first. ``extra_series_file``
    also writes an unrelated non-WSI DICOM into the folder (as a PACS export folder might hold).
    ``associated``: also write these images of the slide (``"LABEL"``, ``"OVERVIEW"``,
    ``"THUMBNAIL"``), one small single-frame file each (``label.dcm``, ...), in the same series
    with ImageType ``ORIGINAL\\PRIMARY\\<kind>\\NONE``, as wsidicomizer writes them; they are
    not in the returned list (``folder / f"{kind.lower()}.dcm"``).
    """
    import imagecodecs
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_ref = generate_uid(), generate_uid(), generate_uid()
    h0, w0 = rgb.shape[:2]
    paths = []
    jobs: list[tuple[int, str | None]] = [(f, None) for f in downsamples]
    jobs += [(max(1, min(h0, w0) // 64), kind.upper()) for kind in associated]
    for index, (ds_factor, kind) in enumerate(jobs):
        if kind is not None and kind != "THUMBNAIL":
            # A label / overview: its own small picture (not a downsample), one frame.
            level = np.full((48, 80, 3), 240, np.uint8)
            level[8:40, 8:72] = (30, 30, 30) if kind == "LABEL" else (200, 120, 180)
        elif ds_factor == 1:
            level = rgb
        else:
            hh, ww = h0 // ds_factor, w0 // ds_factor
            level = (
                rgb[: hh * ds_factor, : ww * ds_factor]
                .reshape(hh, ds_factor, ww, ds_factor, 3)
                .mean(axis=(1, 3))
                .round()
                .astype(np.uint8)
            )
        h, w = level.shape[:2]
        tiles = _tiles(level, tile if kind is None else -(-max(h, w) // 16) * 16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = WSM_SOP_CLASS
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
        path = folder / (f"level{index}.dcm" if kind is None else f"{kind.lower()}.dcm")
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = WSM_SOP_CLASS
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_ref
        ds.Modality = "SM"
        ds.PatientName, ds.PatientID = "Test^Slide", "SLIDE1"
        ds.ContainerIdentifier = "SLIDE1"
        ds.Manufacturer = "fastinsight tests"
        now = datetime.datetime(2026, 1, 2, 3, 4, 5)
        ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
        ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
        ds.ImageType = (
            ["ORIGINAL", "PRIMARY", kind, "NONE"]
            if kind is not None
            else ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
            if index == 0
            else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        )
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.TotalPixelMatrixFocalPlanes = 1
        ds.Columns = ds.Rows = tile
        ds.NumberOfFrames = len(tiles)
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelRepresentation = 0
        ds.PhotometricInterpretation = "YBR_FULL_422" if jpeg else "RGB"
        ds.LossyImageCompression = "01" if jpeg else "00"
        if jpeg:
            ds.LossyImageCompressionMethod = "ISO_10918_1"
            ds.LossyImageCompressionRatio = 10
        on_label = "YES" if kind == "LABEL" else "NO"
        ds.BurnedInAnnotation, ds.SpecimenLabelInImage = on_label, on_label
        ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
        ds.VolumetricProperties = "VOLUME"
        ds.ImagedVolumeWidth = w0 * mpp / 1000.0
        ds.ImagedVolumeHeight = h0 * mpp / 1000.0
        ds.ImagedVolumeDepth = 0.001
        ds.NumberOfOpticalPaths = 1
        path_item = Dataset()
        path_item.OpticalPathIdentifier = "1"
        illum = Dataset()
        illum.CodeValue, illum.CodingSchemeDesignator = "111744", "DCM"
        illum.CodeMeaning = "Brightfield illumination"
        path_item.IlluminationTypeCodeSequence = [illum]
        colour = Dataset()
        colour.CodeValue, colour.CodingSchemeDesignator = "414298005", "SCT"
        colour.CodeMeaning = "Full Spectrum"
        path_item.IlluminationColorCodeSequence = [colour]
        ds.OpticalPathSequence = [path_item]
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem = 20.0
        origin.YOffsetInSlideCoordinateSystem = 40.0
        ds.TotalPixelMatrixOriginSequence = [origin]
        ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
        measures = Dataset()
        spacing_mm = mpp * ds_factor / 1000.0
        measures.PixelSpacing = [spacing_mm, spacing_mm]
        measures.SliceThickness = 0.001
        measures.SpacingBetweenSlices = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [shared]
        specimen = Dataset()
        specimen.ContainerIdentifier = "SLIDE1"
        specimen.SpecimenIdentifier = "S1"
        specimen.SpecimenUID = generate_uid()
        ds.SpecimenDescriptionSequence = [specimen]
        if jpeg:
            frames = [imagecodecs.jpeg8_encode(t, level=95) for t in tiles]
            ds.PixelData = encapsulate(frames)
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = np.stack(tiles).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        if kind is None:
            paths.append(path)
    if extra_series_file:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        other = FileDataset(str(folder / "note.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        other.SOPClassUID = meta.MediaStorageSOPClassUID
        other.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        other.StudyInstanceUID, other.SeriesInstanceUID = study, generate_uid()
        other.Modality = "OT"
        other.save_as(str(folder / "note.dcm"), enforce_file_format=True)
    return paths
