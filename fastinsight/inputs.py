"""Input paths checked before they are opened: special files give one clear error, never a hang.

``open()`` on a FIFO blocks until a writer appears, a directory named ``slide.svs`` gives
``IsADirectoryError`` deep inside a reader, a symlink loop gives ``ELOOP`` from whichever library
tried first. ``check_input_path`` looks at the file with ``stat`` (which never blocks) and raises
the caller's error class with what was expected and what was found.

Also the size limits of class 4 (README "Bad input"): ``check_mpp`` and ``check_dimensions``
refuse absurd values before anything is allocated, with the limit in the message.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
import threading
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastinsight.errors import BackendError, ConfigError, FastInsightError, InputError, SlideError

if TYPE_CHECKING:
    import torch

_O = TypeVar("_O")

# Microscopy spans ~0.05 um/px (oil immersion at 100x, super-resolution) to ~100 um/px (a
# macro photograph); radiographs and CT reach ~1000 um/px. Outside this it is a typo or garbage.
MPP_MIN = 0.01
MPP_MAX = 1000.0
# A 75 x 25 mm glass slide at 0.25 um/px is 300k x 100k px; a side beyond 1M px is a damaged
# header (or an attack), and the tile grid alone would take gigabytes.
MAX_SLIDE_SIDE_PX = 1_000_000


def file_kind(mode: int) -> str:
    """A file type in words, for messages: "a folder", "a named pipe (FIFO)", ... (any kind
    that is not a regular file; inputs and outputs name them alike)."""
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    )
    return next((words for test, words in kinds if test(mode)), "not a regular file")


def check_input_path(
    path: str | os.PathLike[str],
    what: str,
    error: type[FastInsightError] = InputError,
    *,
    allow_dir: bool = False,
) -> Path:
    """Return ``path`` (``~`` expanded) if it names a readable regular file; else raise ``error``.

    ``what`` names the input in the message ("slide", "model file", "feature file"). Never opens
    the path, so a FIFO cannot block. ``allow_dir`` accepts a folder too (e.g. a slide format
    stored as a folder, or a features folder).
    """
    p = Path(path).expanduser()
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            raise error(
                f"{what} {str(p)!r} is a symbolic link to {os.readlink(p)!r}, which does not "
                "exist; fix the link or pass the file itself"
            ) from None
        raise error(f"{what} {str(p)!r} does not exist; check the path") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(
                f"{what} {str(p)!r} is a symbolic link loop; fix the link or pass the file itself"
            ) from None
        if exc.errno == errno.ENAMETOOLONG:
            raise error(
                f"{what} path is too long for the file system: {str(p)[:80]!r}..."
            ) from None
        raise error(f"cannot read {what} {str(p)!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        if allow_dir:
            return p
        raise error(f"{what} {str(p)!r} is a folder, not a file; pass the file itself")
    if not stat.S_ISREG(st.st_mode):
        raise error(
            f"{what} {str(p)!r} is {file_kind(st.st_mode)}, not a regular file; fastinsight "
            f"reads each {what} from a file on disk (a pipe or device would block or stream): "
            "save it to a file first"
        )
    if not os.access(p, os.R_OK):
        raise error(f"cannot read {what} {str(p)!r}: permission denied")
    return p


def check_mpp(
    value: float,
    what: str = "--mpp",
    field: str | None = None,
    error: type[FastInsightError] = SlideError,
) -> float:
    """A microns-per-pixel value as a float in [MPP_MIN, MPP_MAX]; else ``error`` (a slide's
    mpp: ``SlideError``; an options object's field: ``ConfigError``).

    ``field`` names the options field the value came from, so the CLI can show its flag.
    """
    fields = (field,) if field else ()
    try:
        if isinstance(value, bool):
            raise TypeError("a bool is not an mpp")
        mpp = float(value)
    except (TypeError, ValueError):
        raise error(
            f"{what} must be a number of microns per pixel, got {value!r}", fields=fields
        ) from None
    if not math.isfinite(mpp) or not MPP_MIN <= mpp <= MPP_MAX:
        raise error(
            f"{what} must be a finite number of microns per pixel in [{MPP_MIN}, {MPP_MAX}] "
            f"(0.25 at 40x, 0.5 at 20x), got {value!r}",
            fields=fields,
        )
    return mpp


# -- fields of options objects: checked when the object is made (ConfigError naming the field) ----
def option_int(
    value: object, name: str, minimum: int = 0, maximum: int | None = None, what: str = ""
) -> int:
    """``value`` as an int in ``[minimum, maximum]``; else a ConfigError naming field ``name``.

    A bool, a float (``1.5``, even ``8.0``) or a string is refused: the run would fail later
    with a TypeError (``slice indices must be integers``) or mean something else."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(
            f"{name} must be an integer{what}, got {value!r} ({type(value).__name__})",
            fields=(name,),
        )
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{name} must be {bound}{what}, got {number}", fields=(name,))
    return number


def option_fraction(value: object, name: str) -> float:
    """``value`` as a finite float in [0, 1]; else a ConfigError naming field ``name``."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"{name} is a fraction in [0, 1], got {value!r} ({type(value).__name__})",
            fields=(name,),
        )
    number = float(value)
    if not 0.0 <= number <= 1.0:  # NaN fails too
        raise ConfigError(f"{name} is a fraction in [0, 1], got {value!r}", fields=(name,))
    return number


def option_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else a ConfigError naming field ``name``."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}", fields=(name,))
    return value


def option_bool(value: object, name: str) -> bool:
    """``value`` if it is a bool; else a ConfigError naming field ``name``."""
    if not isinstance(value, bool):
        raise ConfigError(
            f"{name} must be True or False, got {value!r} ({type(value).__name__})",
            fields=(name,),
        )
    return value


def option_path(value: object, name: str) -> None:
    """``value`` is None, a str or an ``os.PathLike``; else a ConfigError naming field ``name``."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise ConfigError(
            f"{name} must be a file path (str or Path) or None, got {type(value).__name__}",
            fields=(name,),
        )


def option_device(value: object, name: str = "device") -> None:
    """``value`` names a device fastinsight runs on (``None``/``"auto"``, ``cpu``, ``cuda``,
    ``cuda:1``); else ConfigError. Whether it is present is checked by :func:`resolve_device`
    when a run starts (options may be made on one machine and run on another)."""
    if value is None or str(value) == "auto":
        return
    _parse_device(value, name)


def _parse_device(device: object, label: str = "--device") -> torch.device:
    import torch

    try:
        dev = torch.device(device)  # type: ignore[call-overload]
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{label} {device!r} is not a device; use cuda, cuda:1 or cpu") from None
    if dev.type not in ("cpu", "cuda"):
        # meta, xpu, mps, ...: fastinsight's pipelines run on CPUs and CUDA GPUs.
        raise ConfigError(
            f"{label} {device!r} is a {dev.type} device; fastinsight runs on cuda, cuda:1 or cpu"
        )
    return dev


def check_dimensions(width: int, height: int, what: str) -> tuple[int, int]:
    """Slide dimensions as positive ints of at most ``MAX_SLIDE_SIDE_PX``; else ``SlideError``."""
    try:
        w, h = int(width), int(height)
    except (TypeError, ValueError, OverflowError):
        raise SlideError(f"{what}: dimensions {width!r} x {height!r} are not integers") from None
    if w < 1 or h < 1 or w > MAX_SLIDE_SIDE_PX or h > MAX_SLIDE_SIDE_PX:
        raise SlideError(
            f"{what}: level-0 dimensions {w} x {h} px are outside 1..{MAX_SLIDE_SIDE_PX} px per "
            "side; the file's header is damaged or not a slide"
        )
    return w, h


def memory_bytes() -> int:
    """This machine's physical memory in bytes (0 when unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def allocation_limit() -> int:
    """The most bytes one input may take in memory: 80 % of physical memory (1 TiB if unknown)."""
    total = memory_bytes()
    return int(total * 0.8) if total else 1 << 40


def check_allocation(nbytes: int, what: str, error: type[FastInsightError] = InputError) -> None:
    """Refuse to allocate ``nbytes`` for ``what`` when it exceeds 80 % of physical memory.

    A file can declare a dataset of terabytes in a few bytes of header; reading it would be a
    MemoryError (a traceback) at best and the OOM killer at worst.
    """
    limit = allocation_limit()
    if nbytes > limit:
        raise error(
            f"{what} would need {nbytes / 2**30:.1f} GiB of memory, more than the "
            f"{limit / 2**30:.1f} GiB limit (80 % of this machine's memory); the file's header is "
            "damaged, or split the data"
        )


def check_coordinates(lo: int, hi: int, what: str) -> None:
    """Level-0 coordinates within +-MAX_SLIDE_SIDE_PX; else ``InputError`` with the limit."""
    if lo < -MAX_SLIDE_SIDE_PX or hi > MAX_SLIDE_SIDE_PX:
        raise InputError(
            f"{what}: coordinates span {lo}..{hi} level-0 px, beyond +-{MAX_SLIDE_SIDE_PX} px "
            "(no slide is that large); the coordinates are damaged or in other units"
        )


CSV_FIELD_LIMIT = 2**31 - 1


def allow_long_csv_fields() -> None:
    """Let the csv module read fields of any length (its default stops at 131072 characters
    with ``_csv.Error: field larger than field limit``; a manifest's notes or a long path list
    can be longer). Process-wide, as the csv module's setting is."""
    import csv

    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)


__all__ = [
    "CSV_FIELD_LIMIT",
    "allow_long_csv_fields",
    "MAX_SLIDE_SIDE_PX",
    "allocation_limit",
    "check_allocation",
    "check_coordinates",
    "memory_bytes",
    "MPP_MAX",
    "MPP_MIN",
    "check_dimensions",
    "check_input_path",
    "check_mpp",
    "lent_to",
    "option_bool",
    "option_choice",
    "option_device",
    "option_fraction",
    "option_int",
    "option_path",
    "resolve_device",
]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``--device``: None/"auto" -> CUDA when visible, else the CPU; a bad name is a ConfigError,
    CUDA asked for on a machine without it a BackendError (one line each, never a traceback)."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = _parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(
            f"--device {device!r} was asked for but no CUDA GPU is visible; use --device cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendError(
            f"--device {device!r} was asked for but this machine shows "
            f"{torch.cuda.device_count()} CUDA GPU(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}); "
            "pick one of them or check CUDA_VISIBLE_DEVICES"
        )
    return dev


def check_options(options: object, kind: type[_O], name: str) -> _O:
    """``options`` (None: ``kind()``, the defaults) as ``kind``; anything else is a ConfigError
    naming ``name`` (how the user knows the class), with a hint for a dict of its fields."""
    if options is None:
        return kind()
    if not isinstance(options, kind):
        hint = f"; pass {kind.__name__}(**options)" if isinstance(options, Mapping) else ""
        raise ConfigError(f"options must be a {name}, got {type(options).__name__}{hint}")
    return options


def check_loaded_model(model: object, kind: type, what: str, loader: str) -> None:
    """``model`` is an instance of ``kind`` (an INSIGHT model for ``what``: "slide", "CT
    volume"); a radiograph model, a path or anything else is an InputError that names it and
    what to call instead (``loader``: the function that loads such a model from its file)."""
    if getattr(model, "modality", None) == "radiograph":
        family = getattr(model, "family", type(model).__name__)
        raise InputError(
            f"model family {family!r} is a radiograph model, not a {what} (INSIGHT) model; "
            "predict radiographs with fastinsight.radiograph.predict.predict_radiographs"
        )
    if isinstance(model, (str, os.PathLike)):
        raise InputError(
            f"model must be a loaded model, got the path {os.fspath(model)!r}; load it with "
            f"{loader}(path)"
        )
    if not isinstance(model, kind):
        raise InputError(
            f"model must be an INSIGHT {what} model ({loader}(path)), got {type(model).__name__}"
        )


@dataclass
class _Loan:
    """A module lent to running calls: how many, the device they run it on (None: where it
    was), and what to give back when the last one leaves."""

    users: int
    device: Any
    flags: list[tuple[Any, bool]]
    places: list[tuple[Any, str, bool, Any]]


# Modules inside lent_to, by identity. Concurrent or nested calls with one model share one loan:
# the first sets it up, the last gives it back, so no call restores train mode (or moves the
# weights) under another that is still running. The lock guards only this bookkeeping and the
# moves, never a forward pass.
_LOANS: weakref.WeakKeyDictionary[Any, _Loan] = weakref.WeakKeyDictionary()
_LOANS_LOCK = threading.Lock()


@contextlib.contextmanager
def lent_to(device: torch.device | str | None, *modules: Any) -> Iterator[None]:
    """Run the caller's ``modules`` in eval mode on ``device`` (None: where they are) for the
    block, then put back every submodule's training flag and every tensor's device, also when
    the block raises.

    The Python API works on objects the caller owns: a model in train mode (mid-training
    validation) or kept on the CPU must come back as it was, not silently in eval mode on the
    GPU. Parameters keep their identity (``.to`` moves their data in place), so an optimizer
    holding them is unaffected. ``None`` entries are skipped. Calls that overlap on one module
    (threads sharing a model, or one call inside another) share the loan: the module is given
    back when the last of them leaves. One asking for another device than a running call's is
    an InputError (a module runs on one device at a time).
    """
    import torch

    target = None if device is None else _normal_device(torch.device(device))
    taken: list[Any] = []
    try:
        with _LOANS_LOCK:
            for module in dict.fromkeys(m for m in modules if isinstance(m, torch.nn.Module)):
                loan = _LOANS.get(module)
                if loan is None:
                    flags = [(sub, sub.training) for sub in module.modules()]
                    loan = _LOANS[module] = _Loan(1, target, flags, _tensor_places(module))
                    taken.append(module)  # given back below even if the move fails half-way
                    if target is not None and {dev for *_, dev in loan.places} != {target}:
                        module.to(target)
                    module.eval()
                    continue
                if target is not None and loan.device not in (None, target):
                    raise InputError(
                        f"this {type(module).__name__} is in use on {loan.device} by another "
                        f"call, and this one asks for {target}; a model runs on one device at a "
                        f"time: wait for that call, or run this one on {loan.device}"
                    )
                elif target is not None and loan.device is None:
                    here = {_normal_device(dev) for *_, dev in _tensor_places(module)}
                    if here - {target}:
                        raise InputError(
                            f"this {type(module).__name__} is in use by another call where it "
                            f"lies ({', '.join(sorted(map(str, here)))}), and this one asks for "
                            f"{target}; wait for that call, or run this one where it lies"
                        )
                loan.users += 1
                taken.append(module)
        yield
    finally:
        with _LOANS_LOCK:
            for module in taken:
                loan = _LOANS[module]
                loan.users -= 1
                if loan.users:
                    continue
                del _LOANS[module]
                for sub, training in loan.flags:
                    sub.training = training
                if loan.device is not None:
                    _put_back(module, loan.places)


def _normal_device(device: torch.device) -> torch.device:
    """``cuda`` as the ``cuda:N`` it means now (tensors report their index)."""
    import torch

    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _tensor_places(module: Any) -> list[tuple[Any, str, bool, Any]]:
    """(submodule, name, is a parameter, device) of every tensor a module holds."""
    out = []
    for sub in module.modules():
        out += [(sub, n, True, p.device) for n, p in sub._parameters.items() if p is not None]
        out += [(sub, n, False, b.device) for n, b in sub._buffers.items() if b is not None]
    return out


def _put_back(module: Any, places: list[tuple[Any, str, bool, Any]]) -> None:
    """Every tensor of ``module`` back on the device ``places`` recorded (one ``.to`` when they
    shared one device, which also lets a module re-resolve what depends on its device)."""
    homes = {dev for *_, dev in places}
    if len(homes) == 1:
        (home,) = homes
        if {dev for *_, dev in _tensor_places(module)} != homes:
            module.to(home)
        return
    for sub, name, is_param, home in places:  # a module split over devices: tensor by tensor
        if is_param:
            param = sub._parameters[name]
            if param is not None and param.device != home:
                param.data = param.data.to(home)
        else:
            buf = sub._buffers[name]
            if buf is not None and buf.device != home:
                sub._buffers[name] = buf.to(home)
