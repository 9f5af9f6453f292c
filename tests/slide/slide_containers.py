"""Write the same pixels into three TIFF containers, the way scanners and converters do.

- ``svs``: Aperio layout (baseline, a stripped thumbnail, then the reduced levels as plain tiled
  main-chain IFDs, SubFileType 0, as Aperio writes them) with
  an Aperio ImageDescription carrying ``MPP``;
- ``tiff``: generic tiled pyramidal TIFF, reduced levels with SubFileType 1, mpp only in the
  X/YResolution tags (CENTIMETER);
- ``ome``: OME-TIFF with the reduced levels in SubIFDs and the mpp only in the OME-XML
  ``PhysicalSizeX`` (OpenSlide sees one level and no mpp).

Tests and the read benchmark use it; nothing here is committed data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile

CONTAINERS = ("svs", "tiff", "ome")


def box_pyramid(level0: np.ndarray, n_levels: int) -> list[np.ndarray]:
    """Level 0 and ``n_levels - 1`` 2x area-averaged reductions (odd edges cropped).

    Shapes: ``[h, w, 3]`` -> ``[h // 2^k, w // 2^k, 3]``.
    """
    levels = [level0]
    for _ in range(n_levels - 1):
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        b = a[:h, :w].astype(np.uint16).reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3))
        levels.append(((b + 2) // 4).astype(np.uint8))
    return levels


def write_container(
    path: Path,
    levels: list[np.ndarray],
    mpp: float,
    kind: str,
    *,
    compression: Any = "zlib",
    tile: int = 256,
) -> Path:
    """Write ``levels`` (level 0 first, uint8 ``[h, w, 3]``) as ``kind`` (see module doc)."""
    common: dict[str, Any] = {
        "photometric": "rgb",
        "compression": compression,
        "tile": (tile, tile),
        "metadata": None,
    }
    h, w = levels[0].shape[:2]
    if kind == "svs":
        desc = (
            f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) "
            f"J2K/YUV16 Q=70|AppMag = 20|StripeWidth = 2040|MPP = {mpp:.4f}|Filename = test"
        )
        with tifffile.TiffWriter(path, bigtiff=False) as tw:
            tw.write(levels[0], description=desc, **common)
            thumb = levels[-1][::4, ::4]
            tw.write(
                thumb,
                photometric="rgb",
                compression=compression,
                description=f"Aperio Image Library v12.0.15\r\n{w}x{h} -> "
                f"{thumb.shape[1]}x{thumb.shape[0]}",
                metadata=None,
            )
            for lvl in levels[1:]:
                tw.write(
                    lvl,
                    description=f"Aperio Image Library v12.0.15\r\n{w}x{h} -> "
                    f"{lvl.shape[1]}x{lvl.shape[0]}",
                    **common,  # Aperio's levels are plain (SubFileType 0) tiled IFDs
                )
    elif kind == "tiff":
        with tifffile.TiffWriter(path, bigtiff=True) as tw:
            for k, lvl in enumerate(levels):
                scale = w / lvl.shape[1]
                px_per_cm = 10000.0 / (mpp * scale)
                tw.write(
                    lvl,
                    resolution=(px_per_cm, px_per_cm),
                    resolutionunit="CENTIMETER",
                    subfiletype=1 if k else 0,
                    **common,
                )
    elif kind == "ome":
        meta = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
        with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tw:
            tw.write(
                levels[0],
                subifds=len(levels) - 1,
                photometric="rgb",
                compression=compression,
                tile=(tile, tile),
                metadata=meta,
            )
            for lvl in levels[1:]:
                tw.write(lvl, subfiletype=1, **common)
    else:
        raise ValueError(f"unknown container {kind!r}")
    return path


def sample_tile_payloads(
    tiles: list[np.ndarray], compression: Any = "jpeg"
) -> tuple[list[bytes], dict[int, Any]]:
    """Compressed bytes of ``tiles`` (each uint8 ``[T, T, 3]``) as tifffile writes them, and the
    TIFF tags (Compression, Photometric, JPEGTables, YCbCrSubSampling) they need.

    Writes a small one-row TIFF in memory with tifffile and harvests its tile bytes, so the
    payloads are exactly what a real TIFF JPEG / deflate tile is.
    """
    import io

    t = tiles[0].shape[0]
    row = np.concatenate(tiles, axis=1)
    buf = io.BytesIO()
    tifffile.imwrite(buf, row, tile=(t, t), photometric="rgb", compression=compression)
    buf.seek(0)
    with tifffile.TiffFile(buf) as tif:
        page = tif.pages[0]
        payloads = []
        for off, cnt in zip(page.dataoffsets, page.databytecounts, strict=True):
            buf.seek(off)
            payloads.append(buf.read(cnt))
        tags: dict[int, Any] = {259: int(page.compression), 262: int(page.photometric)}
        if page.jpegtables:
            tags[347] = bytes(page.jpegtables)
        if 530 in page.tags:
            tags[530] = tuple(page.tags[530].value)
    return payloads, tags


def write_tiled_tiff_from_payloads(
    path: Path,
    levels: list[tuple[int, int, np.ndarray]],
    payloads: list[bytes],
    tags: dict[int, Any],
    mpp: float,
    tile: int,
) -> Path:
    """Write a tiled BigTIFF pyramid whose tiles are given compressed payloads, fast.

    ``levels``: ``(width, height, choice)`` per level, level 0 first, with ``choice`` an int
    array ``[ceil(h / tile), ceil(w / tile)]`` naming the payload of every tile (-1: a sparse,
    empty tile). Each distinct payload is stored once and shared by the tiles that use it (valid
    TIFF; keeps a 200k x 200k file small). Reduced levels are main-chain IFDs with SubFileType
    1; the mpp is in X/YResolution (CENTIMETER).
    """
    import struct

    blob = bytearray(struct.pack("<2sHHHQ", b"II", 43, 8, 0, 0))
    starts = []
    for p in payloads:
        starts.append(len(blob))
        blob += p
        if len(blob) % 2:
            blob += b"\0"
    starts_a = np.asarray(starts, dtype=np.uint64)
    counts_a = np.asarray([len(p) for p in payloads], dtype=np.uint64)
    w0 = levels[0][0]
    ifd_offsets = []
    for k, (w, h, choice) in enumerate(levels):
        choice = np.asarray(choice).ravel()
        offsets = np.where(choice >= 0, starts_a[np.maximum(choice, 0)], 0).astype("<u8")
        counts = np.where(choice >= 0, counts_a[np.maximum(choice, 0)], 0).astype("<u8")
        off_pos = len(blob)
        blob += offsets.tobytes()
        cnt_pos = len(blob)
        blob += counts.tobytes()
        px_per_cm = 10000.0 / (mpp * w0 / w)
        res = (round(px_per_cm * 1000), 1000)
        entries: list[tuple[int, int, int, bytes]] = [
            (254, 4, 1, struct.pack("<I", 1 if k else 0)),
            (256, 4, 1, struct.pack("<I", w)),
            (257, 4, 1, struct.pack("<I", h)),
            (258, 3, 3, struct.pack("<HHH", 8, 8, 8)),
            (259, 3, 1, struct.pack("<H", tags[259])),
            (262, 3, 1, struct.pack("<H", tags[262])),
            (277, 3, 1, struct.pack("<H", 3)),
            (282, 5, 1, struct.pack("<II", *res)),
            (283, 5, 1, struct.pack("<II", *res)),
            (284, 3, 1, struct.pack("<H", 1)),
            (296, 3, 1, struct.pack("<H", 3)),
            (322, 4, 1, struct.pack("<I", tile)),
            (323, 4, 1, struct.pack("<I", tile)),
            # BigTIFF keeps values of at most 8 bytes inside the entry (one tile's offset)
            (
                324,
                16,
                offsets.size,
                offsets.tobytes() if offsets.size == 1 else struct.pack("<Q", off_pos),
            ),
            (
                325,
                16,
                counts.size,
                counts.tobytes() if counts.size == 1 else struct.pack("<Q", cnt_pos),
            ),
        ]
        if 347 in tags:
            tables = tags[347]
            tpos = len(blob)
            blob += tables + (b"\0" if len(tables) % 2 else b"")
            entries.append((347, 7, len(tables), struct.pack("<Q", tpos)))
        if 530 in tags:
            entries.append((530, 3, 2, struct.pack("<HH", *tags[530])))
        ifd_offsets.append(len(blob))
        ifd = bytearray(struct.pack("<Q", len(entries)))
        for tag, typ, count, value in sorted(entries):
            ifd += struct.pack("<HHQ", tag, typ, count) + value.ljust(8, b"\0")
        ifd += struct.pack("<Q", 0)  # next IFD, patched below
        blob += ifd
    struct.pack_into("<Q", blob, 8, ifd_offsets[0])
    for a, b in zip(ifd_offsets, ifd_offsets[1:], strict=False):
        n = struct.unpack_from("<Q", blob, a)[0]
        struct.pack_into("<Q", blob, a + 8 + 20 * n, b)
    path.write_bytes(bytes(blob))
    return path


def ellipse_choice(rows: int, cols: int, inside: int, outside: int) -> np.ndarray:
    """Tile payload indices: ``inside`` on a centred ellipse of tiles, ``outside`` elsewhere."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    ell = ((yy - rows / 2) / (rows * 0.3)) ** 2 + ((xx - cols / 2) / (cols * 0.3)) ** 2 < 1
    return np.where(ell, inside, outside).astype(np.int64)
