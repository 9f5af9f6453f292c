"""What a compressed image's header declares, read without decoding it.

Decoders allocate the image their codestream's header asks for, so a few hundred bytes can ask
for gigabytes (a decompression bomb). Readers compare :func:`codestream_size` with the size the
container (a TIFF tile, a DICOM frame) promises before they call a codec.
"""

from __future__ import annotations

_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def codestream_size(src: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` a JPEG / JPEG-LS / JPEG 2000 codestream declares in its header (SOF or
    SIZ marker), read without decoding; None when the header does not say (or is not found)."""
    data = bytes(src[:65536])
    if data[:2] == b"\xff\xd8":  # JPEG family: walk the marker segments up to the frame header
        pos = 2
        while pos + 4 <= len(data):
            if data[pos] != 0xFF:
                return None
            marker = data[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            length = int.from_bytes(data[pos + 2 : pos + 4], "big")
            if marker in _JPEG_SOF and pos + 9 <= len(data):
                rows = int.from_bytes(data[pos + 5 : pos + 7], "big")
                cols = int.from_bytes(data[pos + 7 : pos + 9], "big")
                return (rows, cols) if rows else None  # 0 rows: set later by a DNL marker
            if marker == 0xDA or length < 2:
                return None
            pos += 2 + length
        return None
    # JPEG 2000: SOC then SIZ, at the start of a codestream or of a JP2 file's jp2c box (only
    # there: other compressed data may hold these bytes by chance).
    if data[:4] == _J2K_SOC_SIZ:
        at = 0
    elif data[:12] == _JP2_SIGNATURE:
        box = data.find(b"jp2c")
        at = box + 4 if box >= 0 and data[box + 4 : box + 8] == _J2K_SOC_SIZ else -1
    else:
        return None
    if at < 0 or at + 24 > len(data):
        return None
    x, y, x0, y0 = (int.from_bytes(data[at + 8 + 4 * i : at + 12 + 4 * i], "big") for i in range(4))
    return (y - y0, x - x0) if x > x0 and y > y0 else None


def check_fits(data: bytes, rows: int, cols: int) -> tuple[int, int] | None:
    """The declared ``(rows, cols)`` if it exceeds ``rows x cols`` (the container's segment),
    else None; a codestream whose header cannot be read passes (its codec will judge it)."""
    declared = codestream_size(data)
    if declared is not None and (declared[0] > rows or declared[1] > cols):
        return declared
    return None
