"""What kind of weight file a path holds, told by its first bytes (never by its name)."""

from __future__ import annotations

import hashlib
import os
import struct

SNIFF_BYTES = 16


def weights_format(head: bytes) -> str | None:
    """``"torch"`` (zip or legacy pickle), ``"safetensors"``, or None, from a file's first bytes."""
    if head[:4] == b"PK\x03\x04" or head[:2] == b"\x80\x02":
        return "torch"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return None


def file_sha256(path: str | os.PathLike[str], chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (a UNI weight file is 1.2 GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
