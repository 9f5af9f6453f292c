"""Classes 4 and 5 of issue #16 (the shared checks): special files as inputs give one clear error
and never hang; absurd mpp and slide sizes are refused with the limit named; SIGTERM unwinds."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fastinsight.errors import CheckpointError, InputError, SlideError
from fastinsight.inputs import (
    MAX_SLIDE_SIDE_PX,
    MPP_MAX,
    MPP_MIN,
    check_dimensions,
    check_input_path,
    check_mpp,
)
from fastinsight.signals import EXIT_SIGTERM, Terminated, handle_sigterm


def test_regular_file_passes(tmp_path: Path) -> None:
    f = tmp_path / "slide.svs"
    f.write_bytes(b"II*\0")
    assert check_input_path(f, "slide", SlideError) == f
    link = tmp_path / "link.svs"
    link.symlink_to(f)
    assert check_input_path(link, "slide", SlideError) == link


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="named pipe"):
        check_input_path(fifo, "model file", CheckpointError)
    assert time.monotonic() - start < 5  # opening it would block forever


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.mkdir(), "is a folder"),
        (lambda p: None, "does not exist"),
        (lambda p: p.symlink_to(p.parent / "gone.svs"), "does not exist; fix the link"),
        (lambda p: (p.symlink_to(p.parent / "b.svs"), (p.parent / "b.svs").symlink_to(p)), "loop"),
    ],
)
def test_special_paths_have_clear_errors(tmp_path: Path, make, message: str) -> None:
    p = tmp_path / "a.svs"
    make(p)
    with pytest.raises(SlideError, match=message):
        check_input_path(p, "slide", SlideError)


def test_character_device_is_refused() -> None:
    with pytest.raises(InputError, match="character device"):
        check_input_path("/dev/zero", "feature file")


def test_folder_allowed_when_asked(tmp_path: Path) -> None:
    assert check_input_path(tmp_path, "slide", SlideError, allow_dir=True) == tmp_path


@pytest.mark.parametrize("value", [0, -0.5, math.nan, math.inf, 1e-9, MPP_MAX * 2, "abc", None])
def test_absurd_mpp_is_refused_with_the_limits(value) -> None:
    with pytest.raises(SlideError, match=rf"\[{MPP_MIN}, {MPP_MAX}\]|must be a number"):
        check_mpp(value)


def test_sane_mpp_passes() -> None:
    assert check_mpp(0.25) == 0.25 and check_mpp("0.5") == 0.5 and check_mpp(200) == 200.0


@pytest.mark.parametrize("dims", [(0, 100), (100, -1), (MAX_SLIDE_SIDE_PX + 1, 10), (2**63, 5)])
def test_absurd_dimensions_are_refused(dims) -> None:
    with pytest.raises(SlideError, match=str(MAX_SLIDE_SIDE_PX)):
        check_dimensions(*dims, what="slide.svs")


_SIGTERM_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from fastinsight.atomic import atomic_path
    from fastinsight.signals import Terminated, handle_sigterm
    target = sys.argv[1]
    try:
        with handle_sigterm():
            with atomic_path(target) as tmp:
                tmp.write_text("half")
                print("READY", flush=True)
                time.sleep(60)
    except Terminated as exc:
        print("terminated", file=sys.stderr)
        sys.exit(exc.exit_code)
    """
)


def test_sigterm_unwinds_and_removes_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("previous")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGTERM_SCRIPT, str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_SIGTERM, err
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_terminated_is_a_keyboard_interrupt() -> None:
    assert issubclass(Terminated, KeyboardInterrupt)
    before = signal.getsignal(signal.SIGTERM)
    with handle_sigterm():
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def test_deferred_holds_sigterm_until_the_block_ends() -> None:
    """``signals.deferred``: a SIGTERM sent inside the block is delivered when it ends, not
    lost and not earlier (without it, the handler would interrupt the sleep)."""
    import signal as signal_module

    from fastinsight.signals import deferred

    done = []
    with pytest.raises(Terminated), handle_sigterm():
        with deferred():
            os.kill(os.getpid(), signal_module.SIGTERM)
            time.sleep(0.05)
            done.append("block")
        time.sleep(1)  # the handler runs before this ends
        done.append("after")
    assert done == ["block"]


@pytest.mark.parametrize("where", ["probe", "temp file"])
def test_sigterm_right_after_a_file_is_created_leaves_nothing(
    tmp_path: Path, monkeypatch, where
) -> None:
    """A SIGTERM that arrives the instant ``mkstemp`` has made the writability probe or the
    atomic temp file still unwinds with nothing left in the folder."""
    import signal as signal_module
    import tempfile

    from fastinsight.atomic import atomic_path, check_writable

    real = tempfile.mkstemp

    def mkstemp_then_sigterm(*args, **kwargs):
        made = real(*args, **kwargs)
        if where in ("probe" if made[1].endswith(".probe") else "temp file",):
            os.kill(os.getpid(), signal_module.SIGTERM)
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_sigterm)
    target = tmp_path / "report.json"
    with pytest.raises(Terminated), handle_sigterm():
        if where == "probe":
            check_writable(target)
        else:
            with atomic_path(target) as tmp:
                tmp.write_text("{}")
        time.sleep(1)
    assert list(tmp_path.iterdir()) == []
