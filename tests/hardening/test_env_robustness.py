"""The command line in a hostile environment (audit of environment variations).

- a NIfTI write that fails or is interrupted inside ``nibabel.save`` leaves no partial temp file;
- a stdout that cannot be written (``> /dev/full``) is one error line and exit 6, not a traceback;
- a non-UTF-8 stdout encoding (``PYTHONIOENCODING=ascii``) prints non-ASCII names escaped;
- a deleted current directory is one line and exit 7 before torch is imported;
- SIGHUP unwinds like SIGTERM (exit 129, temps removed) unless it is ignored (``nohup``);
- a stderr that cannot be written, or is closed, never changes the exit code and never sends
  the error line to stdout;
- ``fastinsight demo --device cuda`` without a GPU leaves no folder behind;
- ``terminal_text`` keeps a summary on one line; ``python -m fastinsight`` runs the CLI.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.hardening.conftest import assert_one_error_line

REPO = Path(__file__).resolve().parents[2]
ENTRY = "import sys; from fastinsight.cli import main; sys.exit(main())"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


# -- 1. the NIfTI writer's second temp name ------------------------------------------------------


@pytest.mark.parametrize("failure", ["enospc", "interrupt"])
def test_a_failed_nifti_write_leaves_no_partial_file(tmp_path, monkeypatch, failure) -> None:
    import nibabel as nib

    from fastinsight.errors import OutputError
    from fastinsight.volume.io import write_nifti

    out = tmp_path / "v.nii.gz"
    out.write_bytes(b"OLDV")
    real_save = nib.save

    def save_then_fail(img, filename, *args, **kwargs):
        real_save(img, filename, *args, **kwargs)  # the partial file exists, as on a full disk
        assert Path(filename).exists()
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", save_then_fail)
    expected = OutputError if failure == "enospc" else KeyboardInterrupt
    with pytest.raises(expected):
        write_nifti(np.zeros((4, 4, 3), np.float32), np.eye(4), out)
    assert out.read_bytes() == b"OLDV"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]


def test_nifti_write_still_works(tmp_path) -> None:
    import nibabel as nib

    from fastinsight.volume.io import write_nifti

    out = tmp_path / "v.nii.gz"
    write_nifti(np.ones((4, 4, 3), np.float32), np.eye(4), out)
    assert nib.load(str(out)).shape == (4, 4, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]


# -- 2. stdout that cannot be written ------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_unwritable_stdout_is_one_line_exit_6(tmp_path) -> None:
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-c", ENTRY, "encoders", "list"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            env=_env(),
        )
    line = assert_one_error_line(proc, 6)
    assert "cannot write to standard output" in line and "No space left" in line
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_stdout_error_inside_a_command_is_exit_6(monkeypatch, capsys) -> None:
    """In-process: an OSError (EIO) from a print is reported, not raised as a bug."""
    from fastinsight.cli import main

    class Broken:
        def write(self, text: str) -> int:
            raise OSError(errno.EIO, "Input/output error")

        def flush(self) -> None:
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sys, "stdout", Broken())
    code = main(["encoders", "list"])
    err = capsys.readouterr().err
    assert code == 6
    assert err.startswith("fastinsight: error: cannot write to standard output: Input/output")
    assert len(err.strip().splitlines()) == 1
    assert isinstance(sys.stdout, Broken)  # main put the caller's stream back


# -- 3. a stdout encoding that cannot show the name ----------------------------------------------


def test_ascii_stdout_prints_non_ascii_names_escaped(tmp_path) -> None:
    """``PYTHONIOENCODING=ascii``: what main prints is backslash-escaped, not a traceback."""
    script = textwrap.dedent(
        """
        import sys
        from fastinsight.cli import main, register
        sys.path.insert(0, sys.argv[1])
        register("say", "say_cmd", "print a name")
        sys.exit(main(["say"]))
        """
    )
    (tmp_path / "say_cmd.py").write_text(
        "def add_arguments(p):\n    pass\n\n"
        "def run(args):\n    print('Pr\\u00e4parat \\u816b\\u760d \\U0001f600.svs: lesion=0.9')\n"
        "    return 0\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        timeout=120,
        env=_env(PYTHONIOENCODING="ascii", LC_ALL="C", LANG="C"),
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout == b"Pr\\xe4parat \\u816b\\u760d \\U0001f600.svs: lesion=0.9\n"
    assert b"Traceback" not in proc.stderr


# -- 4. a deleted current directory --------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="a folder in use cannot be removed on Windows")
@pytest.mark.parametrize("how", ["-m fastinsight.cli", "-m fastinsight"])
def test_deleted_current_directory_is_one_line(tmp_path, how) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    proc = subprocess.run(
        ["sh", "-c", f'cd "$1" && rmdir "$1" && exec "$2" {how} info x.safetensors', "sh"]
        + [str(gone), sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    line = assert_one_error_line(proc, 7)
    assert (
        line
        == "fastinsight: error: the current directory no longer exists; cd to an existing folder"
    )
    assert "MKL" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_the_cli_module_loads_no_torch() -> None:
    """The cwd check must run before torch: importing the CLI's main module does not load it."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, fastinsight.cli.main; "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# -- 5. SIGHUP -----------------------------------------------------------------------------------

_HUP_CMD = """
import os, signal
from pathlib import Path

from fastinsight.atomic import atomic_path


def add_arguments(p):
    p.add_argument("out")


def run(args):
    with atomic_path(args.out) as tmp:
        tmp.write_text("NEW")
        os.kill(os.getpid(), signal.SIGHUP)  # the terminal closes during the output phase
        Path(str(args.out) + ".reached").write_text("after the signal")
    return 0
"""

_HUP_SCRIPT = """
import signal, sys
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "ignore":
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does
from fastinsight.cli import main, register
register("hup", "hup_cmd", "write an output; get SIGHUP half-way")
sys.exit(main(["hup", sys.argv[3]]))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
@pytest.mark.parametrize("mode", ["default", "ignore"])
def test_sighup_unwinds_unless_ignored(tmp_path, mode) -> None:
    (tmp_path / "hup_cmd.py").write_text(_HUP_CMD)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "h.tif"
    out.write_text("OLD")
    proc = subprocess.run(
        [sys.executable, "-c", _HUP_SCRIPT, str(tmp_path), mode, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    if mode == "ignore":  # nohup: the run goes on and finishes
        assert proc.returncode == 0, proc.stderr
        assert out.read_text() == "NEW"
        assert sorted(p.name for p in work.iterdir()) == ["h.tif", "h.tif.reached"]
    else:
        assert proc.returncode == 129, proc.stderr
        assert proc.stderr.strip() == "fastinsight: hung up; temporary files were removed"
        assert out.read_text() == "OLD"
        assert sorted(p.name for p in work.iterdir()) == ["h.tif"]


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_handle_sigterm_leaves_an_ignored_sighup_alone() -> None:
    from fastinsight.signals import EXIT_SIGHUP, HungUp, handle_sigterm, interrupt_exit_code

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with handle_sigterm():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        with pytest.raises(HungUp) as exc, handle_sigterm():
            os.kill(os.getpid(), signal.SIGHUP)
        assert interrupt_exit_code(exc.value) == EXIT_SIGHUP == 129
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # put back
    finally:
        signal.signal(signal.SIGHUP, previous)


# -- 6. stderr unwritable or closed --------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_unwritable_stderr_keeps_the_exit_code(tmp_path) -> None:
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-c", ENTRY, "info", str(tmp_path / "missing.safetensors")],
            stdout=subprocess.PIPE,
            stderr=full,
            text=True,
            timeout=120,
            env=_env(),
        )
    assert proc.returncode == 3
    assert proc.stdout == ""


def test_closed_stderr_never_sends_the_error_to_stdout(tmp_path) -> None:
    proc = subprocess.run(
        [
            "sh",
            "-c",
            f'exec "$1" -c "{ENTRY}" info "$2" 2>&-',
            "sh",
            sys.executable,
            str(tmp_path / "missing.safetensors"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 3
    assert proc.stdout == ""


def test_a_note_that_cannot_be_written_keeps_a_success(monkeypatch, capsys) -> None:
    """A command that logs its summary to stderr (predict-volume) still succeeds when stderr
    is unwritable; an error's code is unchanged; None (closed) prints nothing to stdout."""
    from fastinsight.cli import main, register
    from fastinsight.errors import SlideError

    class Full:
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    module = type(sys)("note_cmd")
    module.add_arguments = lambda p: p.add_argument("--fail", action="store_true")  # type: ignore[attr-defined]

    def run(args) -> int:
        print("wrote v.nii.gz", file=sys.stderr)
        if args.fail:
            raise SlideError("slide 'missing.tif' does not exist")
        return 0

    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "note_cmd", module)
    register("note", "note_cmd", "log a note to stderr")
    try:
        for stderr in (Full(), None):
            monkeypatch.setattr(sys, "stderr", stderr)
            assert main(["note"]) == 0
            assert main(["note", "--fail"]) == 5
            assert sys.stderr is stderr  # put back
            assert capsys.readouterr().out == ""
    finally:
        from fastinsight.cli.main import COMMANDS

        COMMANDS.pop("note", None)


# -- 7. demo --device cuda without a GPU ---------------------------------------------------------


@pytest.mark.parametrize(
    "modality", [[], ["--modality", "ct"], ["--modality", "radiograph"]], ids=["wsi", "ct", "cxr"]
)
def test_demo_without_the_asked_gpu_leaves_no_folder(
    tmp_path, monkeypatch, capsys, modality
) -> None:
    import torch

    from fastinsight.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "d"
    code = main(["demo", str(out), "--device", "cuda", *modality])
    err = capsys.readouterr().err
    assert code == 7, err
    assert "no CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


# -- 8. one summary line; python -m fastinsight ------------------------------------------------


def test_terminal_text_escapes_control_characters() -> None:
    from fastinsight.text import clean_text, terminal_text

    name = "a\nb\r\tc\x1b[31m\x7f\x9b\u2028 Präparat 腫瘍 \udcff"
    shown = terminal_text(name)
    assert shown == "a\\nb\\r\\tc\\x1b[31m\\x7f\\x9b\\u2028 Präparat 腫瘍 \\xff"
    assert shown.isprintable()
    # clean_text stays as it was: ids, CSV cells and JSON keep the name (read back unchanged).
    assert clean_text("a\nb") == "a\nb"


def test_python_dash_m_fastinsight_runs_the_cli() -> None:
    from fastinsight import __version__

    proc = subprocess.run(
        [sys.executable, "-m", "fastinsight", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fastinsight {__version__}"
