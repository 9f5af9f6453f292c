"""fastinsight's readers silence foreign warnings and nibabel's log lines in their own thread
only (fastinsight.quiet): reads from several threads at once leave ``warnings.filters`` and
nibabel's logger exactly as the user had them, keep a filter the user adds meanwhile, and drop
none of the other threads' warnings (``warnings.catch_warnings`` did all three wrong).

The ordered tests hold each reading thread inside its read (a patched inner function waits on
an event), so the interleavings that broke the old save/restore happen every time; the stress
test runs the real readers from several threads at once."""

from __future__ import annotations

import logging
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

import fastinsight.radiograph.io as radiograph_io
from fastinsight.quiet import quiet
from fastinsight.radiograph.io import read_radiograph
from fastinsight.volume.io import read_dicom_series, read_volume
from tests.radiograph.images import picture, write_dicom, write_png
from tests.volume.ct_testutil import write_dicom_series

NIB_LOG = "nibabel.global"
TIMEOUT = 30.0


def _filters() -> list[Any]:
    return list(warnings.filters)


def _log_state(logger: logging.Logger) -> tuple[Any, ...]:
    return (logger.disabled, logger.level, list(logger.filters), list(logger.handlers))


class _Records(logging.Handler):
    """The records that reach nibabel's logger's handlers, with the thread that logged each."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def nib_records() -> Iterator[_Records]:
    logger = logging.getLogger(NIB_LOG)
    handler = _Records()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class _Held:
    """Wraps a reader's inner function: in a worker thread it makes foreign chatter (a warning,
    a nibabel log line), says it is inside the read, and waits until told to go on."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.inside: dict[str, threading.Event] = {}
        self.go: dict[str, threading.Event] = {}

    def worker(self, name: str, target: Callable[[], object]) -> tuple[threading.Thread, list]:
        self.inside[name], self.go[name] = threading.Event(), threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                target()
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        return threading.Thread(target=run, name=name, daemon=True), errors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        name = threading.current_thread().name
        warnings.warn(f"foreign warning in {name}", UserWarning, stacklevel=1)
        logging.getLogger(NIB_LOG).warning("foreign log line in %s", name)
        self.inside[name].set()
        assert self.go[name].wait(TIMEOUT)
        return self.real(*args, **kwargs)


@pytest.fixture
def png(tmp_path: Path) -> Path:
    return write_png(tmp_path / "cxr.png", picture(40, 36, seed=0))


@pytest.fixture
def noisy_dicom(tmp_path: Path) -> Path:
    """A good radiograph that pydicom warns about (excess pixel data) as it reads it."""
    path = write_dicom(tmp_path / "cxr.dcm", picture(40, 36, seed=1).astype(np.uint16) * 16)
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData + b"\0" * 10
    ds.save_as(path)
    return path


@pytest.fixture
def noisy_nifti(tmp_path: Path) -> Path:
    """A NIfTI whose negative pixdim[1] nibabel fixes with a log line on nibabel.global."""
    path = tmp_path / "ct.nii"
    img = nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    nib.save(img, str(path))
    data = bytearray(path.read_bytes())
    data[80:84] = struct.pack("<f", -1.0)  # pixdim[1]
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def dicom_series(tmp_path: Path) -> Path:
    hu = np.random.default_rng(0).normal(0, 100, (8, 8, 3)).astype(np.float32)
    folder = tmp_path / "series"
    write_dicom_series(folder, hu, np.diag([-1.0, -1.0, 2.0, 1.0]))
    return folder


def _hold_two(held: _Held, target: Callable[[], object], last_out: str) -> dict[str, list]:
    """Threads "a" then "b" enter a read and wait inside it; the other of ``last_out`` leaves
    first. Returns each thread's errors."""
    threads = {}
    errors = {}
    for name in ("a", "b"):
        threads[name], errors[name] = held.worker(name, target)
        threads[name].start()
        assert held.inside[name].wait(TIMEOUT)
    for name in ("a", "b") if last_out == "b" else ("b", "a"):
        held.go[name].set()
        threads[name].join(TIMEOUT)
        assert not threads[name].is_alive()
    return errors


@pytest.mark.parametrize("last_out", ["a", "b"])
def test_overlapping_radiograph_reads_leave_the_filters_as_they_were(
    png: Path, monkeypatch: pytest.MonkeyPatch, last_out: str
) -> None:
    """a in, b in, a out, b out: catch_warnings left b's "ignore everything" behind for good."""
    held = _Held(radiograph_io._read_picture)
    monkeypatch.setattr(radiograph_io, "_read_picture", held)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = _filters()
        errors = _hold_two(held, lambda: read_radiograph(png), last_out)
        assert _filters() == before
        warnings.warn("the user's warning after the reads", UserWarning, stacklevel=1)
    assert errors == {"a": [], "b": []}
    assert [str(w.message) for w in caught] == ["the user's warning after the reads"]


def test_another_threads_warnings_and_filters_are_kept_during_a_read(
    png: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = _Held(radiograph_io._read_picture)
    monkeypatch.setattr(radiograph_io, "_read_picture", held)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = _filters()
        thread, errors = held.worker("reader", lambda: read_radiograph(png))
        thread.start()
        assert held.inside["reader"].wait(TIMEOUT)
        # Inside the read (of another thread): this thread's warnings are delivered, and a
        # filter added now is still there after the read.
        warnings.warn("the user's warning during the read", UserWarning, stacklevel=1)
        warnings.filterwarnings("error", message="my-marker")
        added = _filters()[0]
        held.go["reader"].set()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert _filters() == [added, *before]
        with pytest.raises(UserWarning, match="my-marker"):
            warnings.warn("my-marker", UserWarning, stacklevel=1)
    assert errors == []
    # the reader thread's own foreign warning was dropped
    assert [str(w.message) for w in caught] == ["the user's warning during the read"]


@pytest.mark.parametrize("last_out", ["a", "b"])
def test_overlapping_nifti_reads_leave_nibabels_logger_as_it_was(
    noisy_nifti: Path, monkeypatch: pytest.MonkeyPatch, nib_records: _Records, last_out: str
) -> None:
    """a in, b in, a out, b out: the old save/restore left nibabel.global disabled for good."""
    logger = logging.getLogger(NIB_LOG)
    held = _Held(nib.load)
    monkeypatch.setattr(nib, "load", held)
    before = _log_state(logger)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = _filters()
        errors = _hold_two(held, lambda: read_volume(noisy_nifti), last_out)
        assert _filters() == filters
    assert errors == {"a": [], "b": []}
    assert _log_state(logger) == before
    assert not caught, [str(w.message) for w in caught]
    assert not nib_records.records, [r.getMessage() for r in nib_records.records]
    logger.warning("the user's nibabel line")
    assert [r.getMessage() for r in nib_records.records] == ["the user's nibabel line"]


def test_another_threads_log_lines_are_kept_during_a_read(
    noisy_nifti: Path, monkeypatch: pytest.MonkeyPatch, nib_records: _Records
) -> None:
    logger = logging.getLogger(NIB_LOG)
    held = _Held(nib.load)
    monkeypatch.setattr(nib, "load", held)
    thread, errors = held.worker("reader", lambda: read_volume(noisy_nifti))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the held reader's chatter is dropped anyway
        thread.start()
        assert held.inside["reader"].wait(TIMEOUT)
        logger.warning("the user's nibabel line during the read")
        held.go["reader"].set()
        thread.join(TIMEOUT)
    assert not thread.is_alive() and errors == []
    assert [r.getMessage() for r in nib_records.records] == [
        "the user's nibabel line during the read"
    ]


def test_concurrent_real_reads_change_nothing_and_drop_no_other_warning(
    png: Path, noisy_dicom: Path, noisy_nifti: Path, dicom_series: Path, nib_records: _Records
) -> None:
    """Four threads run the real readers (two of them warn or log as they read) in a loop while
    this thread warns and logs: afterwards the filters and the logger are as they were, every
    one of this thread's warnings and lines arrived, and none of the readers' did."""
    logger = logging.getLogger(NIB_LOG)
    log_before = _log_state(logger)
    reads: list[Callable[[], object]] = [
        lambda: read_radiograph(png),
        lambda: read_radiograph(noisy_dicom),
        lambda: read_volume(noisy_nifti),
        lambda: read_dicom_series(dicom_series),
    ]
    rounds = 25
    start = threading.Barrier(len(reads) + 1, timeout=TIMEOUT)
    errors: list[BaseException] = []

    def loop(i: int) -> None:
        try:
            start.wait()
            for k in range(rounds * len(reads)):
                reads[(i + k) % len(reads)]()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        before = _filters()
        threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        start.wait()
        sent = 0
        while any(t.is_alive() for t in threads):
            warnings.warn(f"user {sent}", UserWarning, stacklevel=1)
            logger.warning("user line %d", sent)
            sent += 1
            if sent % 50 == 0:
                # a reader now and then in this thread too: its chatter is dropped
                read_radiograph(noisy_dicom)
        for t in threads:
            t.join(TIMEOUT)
            assert not t.is_alive()
        assert _filters() == before
    assert errors == []
    assert sent > 0
    assert [str(w.message) for w in caught] == [f"user {i}" for i in range(sent)]
    assert [r.getMessage() for r in nib_records.records] == [f"user line {i}" for i in range(sent)]
    assert _log_state(logger) == log_before


def test_warnings_as_errors_do_not_fail_a_read(noisy_dicom: Path, noisy_nifti: Path) -> None:
    """``-W error``: a foreign warning inside a read is still ignored, not raised; outside the
    read the same filter still raises."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = _filters()
        assert read_radiograph(noisy_dicom).image.shape == (40, 36)
        assert read_volume(noisy_nifti).shape == (8, 8, 3)
        assert _filters() == before
        with pytest.raises(UserWarning):
            warnings.warn("outside", UserWarning, stacklevel=1)


def test_quiet_nests_counts_per_thread_and_keeps_its_filter_in_front() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = _filters()
        with quiet():
            with quiet(), quiet(UserWarning):
                warnings.warn("nested", UserWarning, stacklevel=1)
            warnings.warn("after the inner block", UserWarning, stacklevel=1)  # still quiet
            # the user puts a filter in front mid-read; the next entry puts ours back in front
            warnings.filterwarnings("error", category=UserWarning)
            added = _filters()[0]
            with quiet():
                warnings.warn("entered again", UserWarning, stacklevel=1)
        assert _filters() == [added, *before]
        with pytest.raises(UserWarning):
            warnings.warn("after the outer block", UserWarning, stacklevel=1)


def test_quiet_by_category_and_message_leaves_other_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet(FutureWarning, r".*torch\.jit\.load.* is deprecated"), quiet(DeprecationWarning):
            warnings.warn("`torch.jit.load` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("old", DeprecationWarning, stacklevel=1)
            warnings.warn("something else", FutureWarning, stacklevel=1)
            warnings.warn("a user warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else", "a user warning"]
