"""Class 2 of issue #16: outputs never destroy what is at the path.

Symlinks are written through, non-regular files are refused, a failed run removes only its own
temp files (never the previous version of an output), temp names stay short, a full disk is an
OutputError."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from fastinsight import atomic
from fastinsight.atomic import atomic_outputs, atomic_path, check_writable
from fastinsight.errors import OutputError
from tests.hardening.conftest import assert_one_error_line, run_cli


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- symlinks ------------------------------------------------------------------------------------
def test_symlink_output_is_written_through(tmp_path: Path) -> None:
    real = tmp_path / "data" / "report.json"
    real.parent.mkdir()
    real.write_text("old")
    link = tmp_path / "report.json"
    link.symlink_to(real)
    with atomic_path(link) as tmp:
        tmp.write_text("new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new"
    assert _listing(tmp_path) == ["data", "report.json"] and _listing(real.parent) == [
        "report.json"
    ]


def test_relative_and_dangling_symlinks(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    link = tmp_path / "latest.txt"
    link.symlink_to("out/run1.txt")  # relative, target missing
    with atomic_path(link) as tmp:
        tmp.write_text("first")
    assert link.is_symlink() and (tmp_path / "out" / "run1.txt").read_text() == "first"


def test_symlink_loop_is_an_output_error(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(OutputError, match="loop"):
        check_writable(a)
    assert a.is_symlink() and b.is_symlink()


# -- special files -------------------------------------------------------------------------------
def test_fifo_and_devices_are_refused_before_any_write(tmp_path: Path) -> None:
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="named pipe"):
        with atomic_path(fifo) as tmp:
            tmp.write_text("x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # (/dev/stdout is a link to fd 1: a regular file under pytest's capture, a tty or pipe in a
    # shell; the CLI test below covers the pipe.)
    with pytest.raises(OutputError, match="character device, not a regular file"):
        check_writable("/dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_directory_output_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="directory"):
        check_writable(tmp_path)


# -- failures keep the previous version ----------------------------------------------------------
def test_out_of_space_is_an_output_error_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "heatmap.tif"
    target.write_bytes(b"previous heatmap")
    with pytest.raises(OutputError, match="No space left"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_bytes() == b"previous heatmap"
    assert _listing(tmp_path) == ["heatmap.tif"]


def test_out_of_space_wrapped_by_a_library_is_an_output_error(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    with pytest.raises(OutputError, match="No space left"):
        with atomic_path(target):
            raise RuntimeError(
                "Error while serializing: IoError(No space left on device (os error 28))"
            )
    assert _listing(tmp_path) == []


def test_other_errors_propagate_unchanged_and_clean_up(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("x")
            raise ValueError("writer bug")
    assert _listing(tmp_path) == []


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    return proc.returncode == 0


@contextlib.contextmanager
def tiny_disk(tmp_path: Path, size: str = "64k"):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, size):
        pytest.skip("mounting a tmpfs needs root (and a kernel that allows it here)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_really_full_disk(tmp_path: Path) -> None:
    with tiny_disk(tmp_path) as disk:
        target = disk / "scores.npz"
        target.write_bytes(b"p" * 20_000)
        with pytest.raises(OutputError, match="No space left"):
            with atomic_path(target) as tmp:
                tmp.write_bytes(os.urandom(200_000))
        assert target.read_bytes() == b"p" * 20_000
        assert _listing(disk) == ["scores.npz"]


# -- names ---------------------------------------------------------------------------------------
def test_longest_legal_name_gets_a_legal_temp_name(tmp_path: Path) -> None:
    target = tmp_path / ("h" * 250 + ".json")  # 255 bytes: NAME_MAX
    seen: list[str] = []
    with atomic_path(target) as tmp:
        seen.append(tmp.name)
        tmp.write_text("{}")
    assert target.read_text() == "{}" and len(seen[0].encode()) <= 64
    long_suffix = tmp_path / ("x." + "y" * 200)
    with atomic_path(long_suffix) as tmp:
        tmp.write_text("ok")
    assert long_suffix.read_text() == "ok"


def test_existing_permissions_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")
    target.chmod(0o640)
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


# -- several outputs of one run: all or none -----------------------------------------------------
def test_batch_failure_keeps_every_previous_output(tmp_path: Path) -> None:
    a, b = tmp_path / "heatmap.tif", tmp_path / "report.json"
    a.write_text("old heatmap")
    b.write_text("old report")
    with pytest.raises(OutputError):
        with atomic_outputs():
            with atomic_path(a) as tmp:
                tmp.write_text("new heatmap")
            assert a.read_text() == "old heatmap"  # not renamed before the run is done
            with atomic_path(b) as tmp:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert a.read_text() == "old heatmap" and b.read_text() == "old report"
    assert _listing(tmp_path) == ["heatmap.tif", "report.json"]


def test_batch_success_and_interrupt(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    with atomic_outputs():
        for p in (a, b):
            with atomic_path(p) as tmp:
                tmp.write_text(p.name)
    assert a.read_text() == "a.txt" and b.read_text() == "b.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_outputs():
            with atomic_path(a) as tmp:
                tmp.write_text("new")
            raise KeyboardInterrupt
    assert a.read_text() == "a.txt" and _listing(tmp_path) == ["a.txt", "b.txt"]


def test_batch_rename_failing_half_way_restores_the_renamed(tmp_path: Path, monkeypatch) -> None:
    a, b, c = (tmp_path / n for n in ("a.txt", "b.txt", "c.txt"))
    a.write_text("old a")
    b.write_text("old b")
    real_replace = os.replace
    calls = {"n": 0}

    def flaky_replace(src, dst):
        if Path(dst) == b and not str(src).endswith(".old"):
            raise OSError(errno.EIO, "I/O error")
        calls["n"] += 1
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    with pytest.raises(OutputError, match="previous outputs were kept"):
        with atomic_outputs():
            for p in (a, b, c):
                with atomic_path(p) as tmp:
                    tmp.write_text("new")
    assert a.read_text() == "old a" and b.read_text() == "old b" and not c.exists()
    assert _listing(tmp_path) == ["a.txt", "b.txt"]


# -- the command line ----------------------------------------------------------------------------
def test_cli_report_through_a_symlink_and_refused_fifo(
    tmp_path: Path, tiny_model: Path, tiny_features: Path
) -> None:
    real = tmp_path / "kept" / "report.json"
    real.parent.mkdir()
    real.write_text("{}")
    link = tmp_path / "report.json"
    link.symlink_to(real)
    proc = run_cli("predict", "--features", tiny_features, "-m", tiny_model, "--report", link, "-q")
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and '"scores"' in real.read_text()

    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    proc = run_cli("predict", "--features", tiny_features, "-m", tiny_model, "--report", fifo, "-q")
    line = assert_one_error_line(proc, OutputError.exit_code)
    assert "named pipe" in line
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_cli_full_disk_keeps_previous_outputs(
    tmp_path: Path, tiny_model: Path, tiny_features: Path
) -> None:
    with tiny_disk(tmp_path, "64k") as disk:  # 16 pages of 4 KiB
        report, scores, geo = disk / "report.json", disk / "scores.npz", disk / "tiles.geojson"
        report.write_text('{"previous": true}')  # 1 page
        geo.write_text("p" * 100)  # 1 page
        # 12 pages: 2 left. The new tiles.geojson (2 pages) fits, scores.npz and report.json
        # (1 page each) do not: the run must fail and keep both previous outputs.
        (disk / "filler").write_bytes(b"f" * 12 * 4096)
        proc = run_cli(
            "predict", "--features", tiny_features, "-m", tiny_model, "-q",
            "--report", report, "--scores", scores, "--geojson", geo,
        )  # fmt: skip
        line = assert_one_error_line(proc, OutputError.exit_code)
        assert "No space left" in line
        assert report.read_text() == '{"previous": true}' and geo.read_text() == "p" * 100
        assert _listing(disk) == ["filler", "report.json", "tiles.geojson"]
