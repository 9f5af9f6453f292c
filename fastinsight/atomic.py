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

    Creates and removes a probe file beside the target: permission bits say too little (root
    passes every access check, /proc refuses files anyway). Returns the path.
    """
    target = Path(path).expanduser()
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputError(f"output path {str(target)!r} is a directory; pass a file name")
    if not parent.is_dir():
        raise OutputError(
            f"the folder of output {str(target)!r} does not exist; create {str(parent)!r} or "
            "choose another path"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise OutputError(
            f"cannot create files in {str(parent)!r} for output {str(target)!r} "
            f"({exc.strerror or exc}); choose another path"
        ) from None
    os.close(fd)
    os.unlink(probe)
    return target


def _default_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success."""
    target = check_writable(path)
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=".part" + target.suffix, dir=target.parent
        )
    except OSError as exc:
        raise OutputError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 (and some writers recreate the file): give the result the usual
        # mode so outputs on a shared filesystem are readable by the group as any file is.
        os.chmod(tmp, _default_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
