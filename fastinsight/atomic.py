"""Atomic output files: a failed run leaves no half-written file behind.

Usage::

    with atomic_path("heatmap.tif") as tmp:
        write_something(tmp)          # writes to a temporary file beside the target
    # on success the temp file is renamed over the target; on any exception it is removed
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastinsight.errors import OutputError


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early (before hours of work) if ``path`` cannot be created.

    Returns the resolved path. Raises OutputError naming the path and the reason.
    """
    target = Path(path).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputError(f"output path {str(target)!r} is a directory; pass a file name")
    if not parent.exists():
        raise OutputError(
            f"output folder {str(parent)!r} does not exist; create it or choose another --out"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(parent)!r} is not writable; choose another path")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success."""
    target = check_writable(path)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".part" + target.suffix, dir=target.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; give the file the mode a plain open() would (0666 minus the umask),
    # so results on a shared filesystem are readable by the group as usual.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
