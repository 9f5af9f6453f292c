"""Atomic output files: a failed run leaves no half-written file and destroys nothing.

Usage::

    with atomic_path("heatmap.tif") as tmp:
        write_something(tmp)          # writes to a temporary file beside the target
    # on success the temp file is renamed over the target; on any exception it is removed

    with atomic_outputs():            # several outputs of one run: all or none
        with atomic_path("a.tif") as tmp: ...
        with atomic_path("b.json") as tmp: ...
    # renamed into place together when the block ends without an exception

The rules (README: "nothing left behind, nothing destroyed"):

- **Symlinks are written through**: an output path that is a symlink (or lies behind symlinked
  folders) is resolved and the link's *target* is replaced, so the link keeps pointing at the
  new data. A symlink loop is an ``OutputError``.
- **Only regular files are outputs**: an existing output path that is a device (``/dev/sda1``),
  a FIFO or a socket is refused with an ``OutputError`` before any work. An atomic rename would
  replace the device node itself; streaming would lose the all-or-nothing promise. Write to a
  file and ``cat`` it instead.
- **Nothing under /dev, /proc or /sys** (``/dev/shm`` excepted, a plain memory file system), nor
  a symlink that leads there: ``/dev/stdout`` is a link to ``/proc/self/fd/1``, whose target is
  whatever the shell redirected stdout to (``> log.txt``); following it would rename the output
  over that file. Every name on the way to the target is checked, not only the last one.
- **A failure removes only what the run created**: the temporary files. The previous version of
  an output stays untouched until its replacement is complete (inside ``atomic_outputs`` until
  every output of the run is complete; a rename that fails half-way restores the previous
  versions of the outputs already renamed).
- **Short temporary names**: the temp file is ``.<at most 24 chars of the name>.<8 random>.part``
  plus the target's suffix (at most 16 chars), so any legal output name (up to NAME_MAX = 255
  bytes) gets a legal temp name.
- **A full disk is an OutputError** (``ENOSPC``, ``EDQUOT``, ``EFBIG``, ``EROFS``, also when a
  writer library wraps it in its own exception), with the output named; the exit code is
  ``OutputError.exit_code``, never a traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fastinsight.errors import FastInsightError, OutputError
from fastinsight.inputs import file_kind
from fastinsight.signals import deferred

# errno values that mean "this output cannot be stored here", whatever wrote it.
_SPACE_ERRNOS = frozenset(
    e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EROFS) if e
)
# The texts libraries (safetensors' Rust core, h5py, PIL) put in their own exceptions.
_SPACE_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "file too large")
_MAX_SYMLINKS = 40  # Linux's MAXSYMLINKS
_TEMP_NAME_CHARS = 24
_TEMP_SUFFIX_CHARS = 16


# Kernel file systems: their names are devices, process state and open file descriptors, never
# files an output may replace. /dev/shm is an ordinary (memory) file system.
_SPECIAL_ROOTS = ("/dev", "/proc", "/sys")
_SPECIAL_ALLOWED = ("/dev/shm",)
_STREAM = re.compile(
    r"^/dev/(?:stdin|stdout|stderr|tty|fd/\d+)$|^/proc/[^/]+(?:/task/\d+)?/fd/\d+$"
)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def special_location(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is in words when it lies under /dev, /proc or /sys (not /dev/shm), else None.

    Only the name is looked at (nothing is opened or followed).
    """
    text = os.path.abspath(os.fspath(path))
    if any(_under(text, root) for root in _SPECIAL_ALLOWED):
        return None
    if _STREAM.match(text):
        return "a standard stream or open file descriptor"
    root = next((r for r in _SPECIAL_ROOTS if _under(text, r)), None)
    if root is None:
        return None
    return f"under {root} (a kernel file system of devices and process state)"


def _special(path: Path) -> str | None:
    what = special_location(path)
    return None if what is None else f"{str(path)!r}, {what}"


def _resolve(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """(the file an output path really names, the first special name on the way or None)."""
    given = Path(path).expanduser()
    current = Path(os.path.abspath(given))
    special = _special(current)
    for _ in range(_MAX_SYMLINKS):
        # Resolve the folders first (they may be links too), then the last component.
        try:
            parent = Path(os.path.realpath(current.parent, strict=True))
        except FileNotFoundError:
            return current, special  # the folder is missing: check_writable says so
        except OSError as exc:
            raise _loop_or(exc, given) from None
        candidate = parent / current.name
        special = special or _special(candidate)
        try:
            if not candidate.is_symlink():
                return candidate, special
            link = Path(os.readlink(candidate))
        except OSError as exc:  # a name longer than the file system allows (ENAMETOOLONG)
            raise _loop_or(exc, given) from None
        current = link if link.is_absolute() else parent / link
        current = Path(os.path.abspath(current))
        special = special or _special(current)
    raise OutputError(
        f"output {str(given)!r} is a symbolic link loop (more than {_MAX_SYMLINKS} links); "
        "fix or remove the link, or choose another path"
    )


def resolve_output(path: str | os.PathLike[str]) -> Path:
    """The file an output path really names: symlinks followed, ``~`` expanded.

    A dangling symlink resolves to the (missing) file it points at, which is then created. A
    symlink loop, or a chain longer than 40 links, is an ``OutputError``. (Whether the path may
    be written at all, e.g. not ``/dev/stdout``, is :func:`check_writable`'s question.)
    """
    return _resolve(path)[0]


def _loop_or(exc: OSError, given: Path) -> OutputError:
    if exc.errno == errno.ELOOP:
        return OutputError(
            f"output {str(given)!r} lies behind a symbolic link loop; fix the link or choose "
            "another path"
        )
    if exc.errno == errno.ENAMETOOLONG:
        return OutputError(
            f"output path is too long for the file system (a name over 255 bytes?): "
            f"{str(given)[:80]!r}...; choose a shorter name"
        )
    return OutputError(f"cannot resolve output {str(given)!r}: {exc.strerror or exc}")


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early (before hours of work) if ``path`` cannot be written as an output.

    Returns the resolved target (symlinks followed). Refuses a directory, a device, a FIFO or a
    socket at the path, a missing folder, and any name under /dev, /proc or /sys on the way to
    the target (``/dev/stdout``, ``/proc/self/fd/1``; /dev/shm is allowed). Creates and removes a probe file beside the target:
    permission bits say too little (root passes every access check, /proc refuses files anyway).
    """
    given = Path(path).expanduser()
    target, special = _resolve(given)
    shown = str(given) if target == Path(os.path.abspath(given)) else f"{given} -> {target}"
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _loop_or(exc, given) from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"output path {shown!r} is a directory; pass a file name")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(
            f"output path {shown!r} is {file_kind(st.st_mode)}, not a regular file; fastinsight "
            "writes every output to a temporary file and renames it into place, which would "
            "replace it: pass a regular file path (then cat it if you want it on screen)"
        )
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(
            f"the folder of output {shown!r} does not exist; create {str(parent)!r} or "
            "choose another path"
        )
    # Created and removed with Ctrl-C / SIGTERM held back: a run stopped here leaves no probe.
    with deferred():
        try:
            fd, probe = tempfile.mkstemp(prefix=".fastinsight-", suffix=".probe", dir=parent)
        except OSError as exc:
            why = f"; it leads through {special}" if special is not None else ""
            raise OutputError(
                f"cannot create files in {str(parent)!r} for output {shown!r} "
                f"({exc.strerror or exc}){why}; choose another path (a regular file)"
            ) from None
        os.close(fd)
        os.unlink(probe)
    if special is not None:
        # After the checks above, which name a device or an uncreatable /proc file as such: what
        # remains is a name there that leads to a regular file (/dev/stdout -> the file a shell
        # redirected stdout to), which the rename would replace behind the user's back.
        raise OutputError(
            f"output path {shown!r} leads through {special}, not to a regular file of its own; "
            "fastinsight writes every output to a temporary file and renames it into place, "
            "which would replace whatever that name leads to (a shell's redirect file): pass a "
            "regular file path (then cat it if you want it on screen)"
        )
    return target


def _default_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give: 0666 minus the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_affixes(target: Path) -> tuple[str, str]:
    """(prefix, suffix) of a short temp name that is legal wherever the target's name is."""
    name = target.name[:_TEMP_NAME_CHARS]
    suffix = target.suffix if len(target.suffix) <= _TEMP_SUFFIX_CHARS else ""
    return f".{name}.", ".part" + suffix


def is_out_of_space(exc: BaseException) -> bool:
    """True for "the disk is full" (or quota, file size limit, read-only fs) in any wrapping."""
    if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
        return True
    text = str(exc).lower()
    return any(t in text for t in _SPACE_TEXTS)


def _space_error(target: Path, exc: BaseException) -> OutputError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return OutputError(
        f"cannot write {str(target)!r}: {reason.splitlines()[0] if reason else 'no space'}; "
        "free space on that file system or choose another output path (nothing was changed)"
    )


def _sync(tmp: Path) -> None:
    """Flush the temp file to disk so a full disk shows up now, not after the rename."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _final_mode(target: Path) -> int:
    """Keep an existing output's permission bits; new outputs get the usual 0666 - umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return _default_mode()


@dataclass
class _Batch:
    """Outputs written by one ``atomic_outputs`` block, waiting to be renamed into place."""

    pending: list[tuple[Path, Path]] = field(default_factory=list)

    def discard(self) -> None:
        for tmp, _ in self.pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.pending.clear()

    def commit(self) -> None:
        """Rename every temp onto its target; on a failure put the previous versions back."""
        done: list[tuple[Path, Path | None]] = []  # (target, hard link to its previous data)
        backup: Path | None = None
        try:
            for tmp, target in self.pending:
                backup = _hard_link_backup(target)
                os.replace(tmp, target)
                done.append((target, backup))
                backup = None
        except BaseException as exc:
            # Undo what was renamed: the previous version back, or the new file removed.
            for target, old in done:
                with contextlib.suppress(OSError):
                    if old is not None:
                        os.replace(old, target)
                    else:
                        target.unlink()
            if backup is not None:
                with contextlib.suppress(OSError):
                    backup.unlink()
            self.discard()
            if isinstance(exc, OSError):
                raise OutputError(
                    f"cannot rename the finished outputs into place ({exc.strerror or exc}); "
                    "the previous outputs were kept"
                ) from None
            raise
        for _, old in done:
            if old is not None:
                with contextlib.suppress(OSError):
                    old.unlink()
        self.pending.clear()


def _hard_link_backup(target: Path) -> Path | None:
    """A second name for an existing output's data (to restore it), or None."""
    if not target.exists():
        return None
    prefix, _ = _temp_affixes(target)
    backup = target.parent / f"{prefix}{secrets.token_hex(4)}.old"
    try:
        os.link(target, backup)
    except OSError:
        return None  # no hard links on this file system: each rename is still atomic
    return backup


_BATCH: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar("_BATCH", default=None)


@contextlib.contextmanager
def atomic_outputs() -> Iterator[None]:
    """Group the ``atomic_path`` writes of one run: renamed into place only when all succeed.

    If the block raises (a failed write, a full disk, Ctrl-C, SIGTERM), every temp file is removed
    and every output keeps its previous version. Nested blocks join the outermost one.
    """
    if _BATCH.get() is not None:
        yield
        return
    batch = _Batch()
    token = _BATCH.set(batch)
    try:
        yield
    except BaseException:
        _BATCH.reset(token)
        batch.discard()
        raise
    _BATCH.reset(token)
    batch.commit()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success.

    ``path`` may be a symlink (its target is replaced). Inside ``atomic_outputs`` the rename
    waits for the end of that block.
    """
    target = check_writable(path)
    prefix, suffix = _temp_affixes(target)
    tmp: Path | None = None
    try:
        # Ctrl-C / SIGTERM held back until ``tmp`` names the file, so the cleanup below sees
        # every temp file it must remove (a signal delivered on unblocking lands inside this try).
        with deferred():
            try:
                fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=target.parent)
            except OSError as exc:
                if is_out_of_space(exc):
                    raise _space_error(target, exc) from None
                raise OutputError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
            os.close(fd)
            tmp = Path(tmp_name)
        yield tmp
        _sync(tmp)
        # mkstemp creates 0600 (and some writers recreate the file): give the result the mode
        # of the file it replaces, or the usual one, so shared outputs stay readable.
        os.chmod(tmp, _final_mode(target))
        batch = _BATCH.get()
        if batch is not None:
            batch.pending.append((tmp, target))
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if isinstance(exc, Exception) and not isinstance(exc, FastInsightError):
            if is_out_of_space(exc):
                raise _space_error(target, exc) from None
        raise


def prepare_outputs(
    outputs: dict[str, str | os.PathLike[str] | None],
    inputs: dict[str, str | os.PathLike[str] | None],
) -> None:
    """Before hours of work: every output (flag -> path) is writable, no two outputs are the same
    file, and no output would overwrite an input (the slide, a feature file, the model)."""
    seen: dict[Path, str] = {}
    for flag, path in inputs.items():
        if path is not None:
            seen[Path(path).expanduser().resolve()] = f"the input {flag}"
    for flag, path in outputs.items():
        if path is None:
            continue
        resolved = Path(path).expanduser().resolve()
        if resolved in seen:
            raise OutputError(
                f"{flag} {str(path)!r} is also {seen[resolved]}; writing it would destroy that "
                "file: choose another output path"
            )
        seen[resolved] = f"the output of {flag}"
        check_writable(path)


# Written into every demo folder: a folder holding it is a demo's own and may be run into again;
# any other non-empty folder is the user's, and no demo writes into it.
DEMO_MARK = ".fastinsight-demo"


def claim_demo_folder(out_dir: str | os.PathLike[str]) -> Path:
    """``out_dir``, created if needed and marked as a demo folder; OutputError when it holds
    files a demo did not write (a demo's model.safetensors or report.json would replace the
    user's own)."""
    out = Path(out_dir).expanduser()
    for name in (out, out.resolve()):
        if (what := special_location(name)) is not None:
            raise OutputError(
                f"demo folder {str(out)!r} is {what}; pass a new or empty folder on an ordinary "
                "file system"
            )
    if out.exists() and not out.is_dir():
        raise OutputError(f"demo folder {str(out)!r} is a file; pass a new or empty folder")
    if out.is_dir() and not (out / DEMO_MARK).is_file():
        foreign = sorted(p.name for p in out.iterdir())
        if foreign:
            shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
            raise OutputError(
                f"{str(out)!r} holds files a demo did not write ({shown}); pass a new or empty "
                "folder (a demo only replaces its own earlier run)"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / DEMO_MARK).write_text(
            "written by fastinsight demo; runs into it replace its outputs\n"
        )
    except OSError as exc:
        raise OutputError(f"cannot create {str(out)!r}: {exc.strerror or exc}") from None
    return out


__all__ = [
    "atomic_outputs",
    "atomic_path",
    "check_writable",
    "claim_demo_folder",
    "is_out_of_space",
    "prepare_outputs",
    "resolve_output",
    "special_location",
]
