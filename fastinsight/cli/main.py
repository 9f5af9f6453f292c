"""The ``fastinsight`` command line. Thin: every subcommand calls the same functions as the API.

Exit codes: 0 success; 1 an unexpected internal error (a bug: please report it);
2-7 a ``FastInsightError`` (bad input or environment; see ``fastinsight.errors``), with a
one-line message and no traceback; 7 also for a required third-party package that is missing or
cannot be imported (one line naming the pip distribution: ``missing_dependency_message``); 8
``predict-cohort`` finished but some slides failed (see its summary.csv); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM); 129 hung up (SIGHUP, unless ignored as under ``nohup``); 141
stdout closed early (a pipe into ``head``: output stops quietly); 6 also for a stdout that cannot
be written (``> /dev/full``), 7 also for a deleted current directory. Messages go to stderr only;
one that cannot be written there is lost, and the exit code stays the same. docs/exit-codes.md
has the table.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fastinsight._version import __version__
from fastinsight.errors import BackendError, FastInsightError, OutputError

Runner = Callable[[argparse.Namespace], int]

# subcommand -> (module, help). Each module has add_arguments(parser) and run(args) -> int.
# Modules are imported only when their command runs, so `fastinsight --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": (
        "fastinsight.cli.predict",
        "slide (or feature file) -> heatmap TIFF, scores, overlay",
    ),
    "demo": (
        "fastinsight.cli.demo",
        "synthetic cohort end to end: train, predict, evaluate (no downloads)",
    ),
    "info": ("fastinsight.cli.info", "show a checkpoint's architecture and settings"),
}
GROUPS: dict[str, dict[str, tuple[str, str]]] = {}


# Option fields (as the library's options objects name them) -> the flags that set them. The
# library's messages speak in field names; the CLI shows its own flags.
FIELD_FLAGS: dict[str, str] = {
    "batch_size": "--batch-size",
    "num_workers": "--num-workers",
    "min_tissue_fraction": "--min-tissue",
    "min_cell_fraction": "--min-cell-tissue",
    "mpp": "--mpp",
    "encoding": "--encoding",
    "cpus_per_slide": "--cpus-per-slide",
    "gpus_per_slide": "--gpus-per-slide",
    "max_retries": "--max-retries",
    "num_cpus": "--num-cpus",
    "class_": "--class",
    "tile_size": "--tile-size",
    "patch_size_px": "--patch-size",
    "slices": "--slices",
    "lung_mask": "--lung-mask",
    "slice_context": "--slice-context",
}


def error_message(exc: FastInsightError) -> str:
    """``exc``'s message with the option fields it names written as CLI flags."""
    message = str(exc)
    for name in getattr(exc, "fields", ()):
        flag = FIELD_FLAGS.get(name)
        if flag is not None:
            message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flag, message)
    return message


def register(name: str, module: str, help_text: str, group: str | None = None) -> None:
    """Add a subcommand (or ``group subcommand``) implemented by ``module``."""
    if group is None:
        COMMANDS[name] = (module, help_text)
    else:
        GROUPS.setdefault(group, {})[name] = (module, help_text)


register("train", "fastinsight.cli.train", "train INSIGHT on precomputed features and slide labels")
register("evaluate", "fastinsight.cli.evaluate", "slide AUC and heatmap Dice against ground truth")
register(
    "predict-volume",
    "fastinsight.cli.volume:predict",
    "CT volume (NIfTI or DICOM series) -> heatmap NIfTI on the scan's grid, report, overlay",
)
register(
    "train-volume",
    "fastinsight.cli.volume:train",
    "train INSIGHT on CT volumes (NIfTI / DICOM) and volume labels",
)
register(
    "predict-radiograph",
    "fastinsight.cli.radiograph",
    "chest radiograph(s) -> PYLON/Yao heatmap TIFF, overlay, report; many -> scores CSV",
)
register(
    "evaluate-radiographs",
    "fastinsight.cli.radiograph:evaluate",
    "radiographs + NIH box/label CSVs -> point localisation, IoU/IoBB hit rates, AUROC",
)
register(
    "predict-cohort", "fastinsight.cli.cohort", "many slides over local or cluster GPUs with Ray"
)
register(
    "check",
    "fastinsight.cli.kernels:check",
    "compile every kernel ahead of time; report spills and tensor-core use",
    group="kernels",
)
register(
    "list",
    "fastinsight.cli.encoders:list",
    "the patch encoders: architecture, tile, grid, weights to fetch",
    group="encoders",
)
register(
    "check",
    "fastinsight.cli.encoders:check",
    "load an encoder's weight file, run one tile, print grid, dims and sha256",
    group="encoders",
)
register(
    "onnx", "fastinsight.cli.export:onnx", "export the head (or an encoder) to ONNX", group="export"
)
register(
    "tensorrt",
    "fastinsight.cli.export:tensorrt",
    "build a TensorRT engine from ONNX",
    group="export",
)
register(
    "triton-repo",
    "fastinsight.cli.export:triton_repo",
    "write a Triton Inference Server model repository",
    group="export",
)

GROUP_HELP = {
    "kernels": "Triton kernel tools",
    "export": "ONNX, TensorRT and Triton Inference Server export",
    "encoders": "patch encoders: list them, check a weight file",
}


def _resolve(spec: str) -> tuple[Callable[[argparse.ArgumentParser], None], Runner]:
    module_name, _, prefix = spec.partition(":")
    module = importlib.import_module(module_name)
    add = getattr(module, f"add_{prefix}_arguments" if prefix else "add_arguments")
    run = getattr(module, f"run_{prefix}" if prefix else "run")
    return add, run


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastinsight",
        description="INSIGHT whole-slide heatmaps, fast. Run `fastinsight COMMAND --help`.",
        # Flags are taken only as spelt in full: with argparse's prefix matching, a prefix
        # unique today (``--patch-size`` was read as ``--patch-size-l0`` until a real
        # ``--patch-size`` came) silently changes meaning when a flag is added.
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"fastinsight {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the module of the command being run is imported (argv decides which).
    wanted = [a for a in argv if not a.startswith("-")][:2]
    for name, (spec, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if wanted[:1] == [name]:
            add, run = _resolve(spec)
            add(p)
            p.set_defaults(_run=run)
    for group, commands in GROUPS.items():
        gp = sub.add_parser(group, help=GROUP_HELP.get(group, group), allow_abbrev=False)
        gsub = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
        for name, (spec, help_text) in commands.items():
            p = gsub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
            if wanted == [group, name]:
                add, run = _resolve(spec)
                add(p)
                p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    guard = _StreamGuard.install()
    try:
        return _main(argv)
    finally:
        guard.restore()


def _main(argv: list[str]) -> int:
    from fastinsight.malloc import keep_freed_memory
    from fastinsight.signals import HungUp, Terminated, handle_sigterm, interrupt_exit_code

    # Before any command imports torch: in a deleted folder its import dies with MKL's "Cannot
    # load libtorch_cpu.so" and exit 2, which reads like a bad option.
    if not _cwd_exists():
        _report(f"fastinsight: error: {CWD_GONE}")
        return EXIT_CWD_GONE
    try:
        # SIGTERM (and SIGHUP) unwind like Ctrl-C: temp files removed, Ray stopped, exit 143/129.
        with handle_sigterm():
            parser = build_parser(argv)
            args = parser.parse_args(argv)
            run: Runner | None = getattr(args, "_run", None)
            if run is None:
                parser.parse_args([*argv, "--help"])
                return 2
            # Batches reuse the pages the last one freed (``FASTINSIGHT_MALLOC=system``: not).
            keep_freed_memory()
            code = int(run(args) or 0)
            # Buffered output meets a closed pipe here, inside the handler below, rather than
            # at interpreter exit ("Exception ignored ... BrokenPipeError").
            if sys.stdout is not None:  # None when the shell closed it (`>&-`)
                sys.stdout.flush()
            return code
    except BrokenPipeError:
        return _stdout_closed()
    except StdoutUnwritable as exc:
        # `> /dev/full`, a full disk under `> log`: the outputs already written stay.
        _report(f"fastinsight: error: {_one_line(str(exc))}")
        _stdout_closed()  # the unwritten buffer must not fail again at interpreter exit
        return EXIT_STDOUT_UNWRITABLE
    except FastInsightError as exc:
        _report(f"fastinsight: error: {_one_line(error_message(exc))}")
        return exc.exit_code
    except KeyboardInterrupt as exc:
        if isinstance(exc, HungUp):
            what = "hung up"
        elif isinstance(exc, Terminated):
            what = "terminated (SIGTERM)"
        else:
            what = "interrupted"
        _report(f"fastinsight: {what}; temporary files were removed")
        return interrupt_exit_code(exc)
    except ImportError as exc:  # ModuleNotFoundError too
        message = missing_dependency_message(exc, _command_words(argv))
        if message is None:
            raise  # fastinsight's own module or the standard library's: a bug, with traceback
        _report(f"fastinsight: error: {_one_line(message)}")
        return EXIT_MISSING_DEPENDENCY


# -- the environment the command runs in ----------------------------------------------------------

CWD_GONE = "the current directory no longer exists; cd to an existing folder"
# Like a missing backend or package: the environment, not the input, is at fault.
EXIT_CWD_GONE = BackendError.exit_code
# Standard output cannot be written (`> /dev/full`, a full disk or a broken NFS under `> log`):
# an output that cannot be stored, as with --out on a full disk (OutputError).
EXIT_STDOUT_UNWRITABLE = OutputError.exit_code


def _cwd_exists() -> bool:
    try:
        os.getcwd()
    except FileNotFoundError:
        return False
    except OSError:  # EACCES on a parent, ...: not ours to judge; the command may still work
        return True
    return True


class StdoutUnwritable(Exception):
    """Writing standard output failed (not a closed pipe: that is ``BrokenPipeError``).

    Not an ``OSError``, so code that turns a full disk into an error about its own output file
    (``fastinsight.atomic``) does not claim it; ``main`` reports it as exit 6.
    """

    def __init__(self, error: OSError) -> None:
        self.error = error
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(
            f"cannot write to standard output: {reason}; the outputs already written are kept; "
            "redirect standard output to a writable place"
        )


class _GuardedStdout:
    """``sys.stdout`` during ``main``: a write error other than a closed pipe becomes
    ``StdoutUnwritable``, whoever printed. Everything else is the wrapped stream's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            raise  # the reader went away: main stops quietly (141)
        except OSError as exc:
            raise StdoutUnwritable(exc) from exc

    def write(self, text: str) -> int:
        return int(self._call("write", text) or 0)

    def writelines(self, lines: Any) -> None:
        self._call("writelines", lines)

    def flush(self) -> None:
        self._call("flush")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _QuietStderr:
    """``sys.stderr`` during ``main``: notes, logs, progress bars and the error line are
    best-effort. A stderr that cannot be written (``2>/dev/full``, a closed pipe) loses them, but
    never turns a success into exit 1 or changes a failure's exit code."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            self._stream.write(text)
        except (OSError, ValueError):  # ValueError: a closed file
            pass
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _NoStderr(io.TextIOBase):
    """``sys.stderr`` when the shell closed it (``2>&-``: Python's is None): messages are lost
    rather than printed to stdout, which ``print(file=None)`` would do."""

    def write(self, text: str) -> int:
        return len(text)


class _StreamGuard:
    """Installs the stream wrappers for one ``main`` call and puts the originals back."""

    def __init__(self, stdout: Any, stderr: Any) -> None:
        self.stdout, self.stderr = stdout, stderr

    @classmethod
    def install(cls) -> _StreamGuard:
        guard = cls(sys.stdout, sys.stderr)
        # Names in any script reach the terminal: a non-UTF-8 encoding (PYTHONIOENCODING=ascii,
        # a legacy console code page) gets \xe9 / \u4e2d escapes rather than a
        # UnicodeEncodeError after the outputs were written. The encoding itself is kept.
        for stream in (sys.stdout, sys.stderr):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                try:
                    reconfigure(errors="backslashreplace")
                except (OSError, ValueError, TypeError, AttributeError):
                    pass
        if sys.stdout is not None:
            sys.stdout = _GuardedStdout(sys.stdout)  # type: ignore[assignment]
        sys.stderr = _NoStderr() if sys.stderr is None else _QuietStderr(sys.stderr)  # type: ignore[assignment]
        return guard

    def restore(self) -> None:
        if isinstance(sys.stdout, _GuardedStdout):
            sys.stdout = self.stdout
        if isinstance(sys.stderr, (_QuietStderr, _NoStderr)):
            sys.stderr = self.stderr


def _report(line: str) -> None:
    """One message line on stderr, never on stdout; lost (not raised) when stderr is unwritable."""
    stream = sys.stderr
    if stream is None:
        return
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


# A required package that is missing or cannot be imported (`pip install --no-deps`, a broken
# environment): the environment lacks something, as with a missing backend (BackendError).
EXIT_MISSING_DEPENDENCY = BackendError.exit_code

# Top-level module -> the pip distributions that provide it, where the names differ. Others are
# installed under their module's name (pip treats "_" and "-" alike).
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "PIL": ("pillow",),
    "openslide": ("openslide-python", "openslide-bin"),
    "openslide_bin": ("openslide-bin",),
    "skimage": ("scikit-image",),
    "sklearn": ("scikit-learn",),
    "cv2": ("opencv-python",),
    "yaml": ("pyyaml",),
    "google": ("protobuf",),
    "dateutil": ("python-dateutil",),
    "attr": ("attrs",),
    "pkg_resources": ("setuptools",),
    "tritonclient": ("tritonclient[grpc]",),
}
# Modules of fastinsight's optional extras: the extra installs them with the right versions.
EXTRAS: dict[str, str] = {
    "onnx": "export",
    "onnxruntime": "export",
    "onnxscript": "export",
    "tritonclient": "export",
    "ray": "cohort",
}
# Packages that load a native library shipped by another distribution: an ImportError they raise
# without a module name means that library is missing.
NATIVE: dict[str, tuple[str, str]] = {"openslide": ("openslide-bin", "the OpenSlide C library")}
# Top-level names that are fastinsight itself (kernels/ and export/ ship inside it): an import
# error naming one of them is a packaging bug, never "pip install kernels".
_OWN_MODULES = frozenset({"fastinsight", "kernels", "export", "tests", "bench"})


def _command_words(argv: Sequence[str]) -> str:
    """``predict-volume`` or ``export onnx``: the command being run, for messages."""
    words = [a for a in argv if not a.startswith("-")][:2]
    if not words:
        return "this command"
    return " ".join(words if words[0] in GROUPS else words[:1])


def _third_party(name: str | None) -> str | None:
    """The top-level module of ``name`` when it is neither fastinsight's nor the standard
    library's; else None."""
    if not name:
        return None
    top = name.partition(".")[0]
    if not top or top in _OWN_MODULES or top in sys.stdlib_module_names:
        return None
    return top


def _raised_in(exc: BaseException) -> str | None:
    """The third-party package whose code raised ``exc`` (its innermost frame outside the
    standard library), for an ImportError without ``.name`` such as openslide's "Couldn't locate
    OpenSlide shared library"; None when fastinsight's own code raised it."""
    import traceback

    names = [f.f_globals.get("__name__") or "" for f, _ in traceback.walk_tb(exc.__traceback__)]
    for name in reversed(names):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names:
            continue
        return _third_party(name)
    return None


def _installed(top: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError, AttributeError):
        return False


def missing_dependency_message(exc: ImportError, command: str = "this command") -> str | None:
    """One line for an ImportError raised by a third-party package fastinsight needs: which
    distribution is missing (or cannot be imported) and the ``pip install`` that fixes it.

    None when the error is not about a third-party package (a fastinsight module or one of the
    standard library's: a packaging bug or a broken Python, left to show its traceback).
    """
    top = _third_party(exc.name)
    if top is None:
        if exc.name is not None:
            return None
        top = _raised_in(exc)
        if top is None:
            return None
    dists = DISTRIBUTIONS.get(top, (top.replace("_", "-"),))
    package = dists[0]
    extra = EXTRAS.get(top)
    if extra is not None:
        install = f"pip install 'fastinsight[{extra}]'"
    else:
        install = "pip install " + " ".join(f"'{d}'" if "[" in d else d for d in dists)
    upgrade = install.replace("pip install", "pip install -U", 1)  # newer, or a fresh copy
    if exc.name is None:
        # The package is there but failed to load (openslide without its shared library).
        detail = str(exc).split(". ")[0].strip().rstrip(".")
        if top in NATIVE:
            dist, what = NATIVE[top]
            return (
                f"{command} needs {what} ({dist!r}), which was not found ({detail}); "
                f"pip install {dist}"
            )
        return (
            f"{command} needs {package!r}, which is installed but cannot be loaded ({detail}); "
            f"{upgrade}"
        )
    if not _installed(top):
        return f"{command} needs the Python package {package!r}, which is not installed; {install}"
    # Installed, but a name or submodule fastinsight uses is not in it: an old or broken copy
    # ("cannot import name 'X' from 'Y'", "No module named 'pydicom.pixels'").
    detail = " ".join(str(exc).split())
    return f"{command} needs a newer or intact {package!r} ({detail}); {upgrade}"


# What a process killed by SIGPIPE reports (128 + 13), as `yes | head -1` does.
EXIT_BROKEN_PIPE = 141


def _stdout_closed() -> int:
    """The reader of stdout went away (``fastinsight encoders list | head -1``): stop quietly,
    as command-line tools do, without a traceback. Python's recipe: point stdout at /dev/null so
    the interpreter's final flush of the unwritable buffer does not raise again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is no file (captured, replaced)
        pass
    return EXIT_BROKEN_PIPE


def _one_line(message: str) -> str:
    """The README promises one error line: fold any newline a message (or a library) carried,
    and write undecodable bytes of file names as ``\\xNN``."""
    from fastinsight.text import clean_text

    return " ".join(clean_text(message).split("\n"))


if __name__ == "__main__":
    sys.exit(main())
