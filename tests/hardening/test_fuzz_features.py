"""Hostile feature h5 files (fuzz audit D1, D7, D8): data stored outside the file, links that
lead out of it or round in circles, a damaged chunk, and a NaN/inf TRIDENT overlap. Each is one
``InputError`` (exit 4) before a byte of feature data is read: never a hang, a traceback, or
zero-filled features."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from fastinsight.errors import InputError
from fastinsight.features import geometry_from_attrs, inspect_features, read_features
from tests.hardening.conftest import assert_one_error_line, run_main

N, D = 6, 8
COORDS = np.stack([np.arange(N) * 512, np.zeros(N)], axis=1).astype(np.int64)
TRIDENT = {"patch_size": 256, "patch_size_level0": 512, "target_magnification": 20}


def _coords(h: h5py.File) -> None:
    ds = h.create_dataset("coords", data=COORDS)
    ds.attrs.update(TRIDENT)


def _plain(path: Path) -> Path:
    with h5py.File(path, "w") as h:
        h["features"] = np.ones((N, D), np.float32)
        _coords(h)
    return path


@contextlib.contextmanager
def _fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO that cannot hang the test even if it is opened: a thread opens its write end
    (which waits for a reader) and closes it at once, so a reader sees end-of-file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def writer() -> None:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY))

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        yield fifo
    finally:
        # Release the writer if nothing opened the FIFO (the expected case).
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        thread.join(timeout=5)
        os.close(fd)


def _external(path: Path, target: str, which: str = "features") -> Path:
    with h5py.File(path, "w") as h:
        ext = [(target, 0, h5py.h5f.UNLIMITED)]
        if which == "features":
            h.create_dataset("features", shape=(N, D), dtype="f4", external=ext)
            _coords(h)
        else:
            h["features"] = np.ones((N, D), np.float32)
            c = h.create_dataset("coords", shape=(N, 2), dtype="i8", external=ext)
            c.attrs.update(TRIDENT)
    return path


@pytest.mark.parametrize("which", ["features", "coords"])
@pytest.mark.parametrize("kind", ["fifo", "missing", "short", "dev_zero", "full"])
def test_external_storage_is_refused_before_reading(tmp_path: Path, kind: str, which: str) -> None:
    raw = tmp_path / "raw.bin"
    if kind == "short":
        raw.write_bytes(b"\x00" * 100)  # HDF5 pads the rest with zeros, silently
    elif kind == "full":
        raw.write_bytes(np.ones((N, max(D, 2)), np.float32).tobytes() * 2)  # enough bytes
    with contextlib.ExitStack() as stack:
        if kind == "fifo":
            target = str(stack.enter_context(_fifo(tmp_path)))
        elif kind == "dev_zero":
            target = "/dev/zero"
        elif kind == "missing":
            target = str(tmp_path / "nonexistent.bin")
        else:
            target = str(raw)
        path = _external(tmp_path / f"{kind}.h5", target, which)
        with pytest.raises(InputError, match=f"'{which}' keeps its data in 1 external raw file"):
            read_features(path)
        with pytest.raises(InputError, match="external raw file"):
            inspect_features(path)


def test_virtual_dataset_is_refused(tmp_path: Path) -> None:
    source = _plain(tmp_path / "source.h5")
    path = tmp_path / "virtual.h5"
    layout = h5py.VirtualLayout(shape=(N, D), dtype="f4")
    layout[:] = h5py.VirtualSource(str(source), "features", shape=(N, D))
    with h5py.File(path, "w") as h:
        h.create_virtual_dataset("features", layout, fillvalue=0)
        _coords(h)
    with pytest.raises(InputError, match="'features' is a virtual dataset"):
        read_features(path)
    source.unlink()  # a virtual source that is gone reads as fill values, silently
    with pytest.raises(InputError, match="virtual dataset"):
        read_features(path)


@pytest.mark.parametrize("target", ["fifo", "valid"])
def test_external_link_is_not_followed(tmp_path: Path, target: str) -> None:
    with contextlib.ExitStack() as stack:
        if target == "fifo":
            other = str(stack.enter_context(_fifo(tmp_path)))
        else:
            other = str(_plain(tmp_path / "other.h5"))
        path = tmp_path / "link.h5"
        with h5py.File(path, "w") as h:
            h["features"] = h5py.ExternalLink(other, "/features")
            _coords(h)
        with pytest.raises(InputError, match="'features' is an external link .*cannot be opened"):
            read_features(path)


def test_external_link_hidden_behind_a_soft_link_is_not_followed(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        fifo = stack.enter_context(_fifo(tmp_path))
        path = tmp_path / "hidden.h5"
        with h5py.File(path, "w") as h:
            h["elsewhere"] = h5py.ExternalLink(str(fifo), "/")
            h["features"] = h5py.SoftLink("/elsewhere/features")
            _coords(h)
        with pytest.raises(InputError, match="external link"):
            read_features(path)


@pytest.mark.parametrize(
    "links",
    [
        {"features": "/coords", "coords": "/features"},
        {"features": "/features"},
        {"features": "/a", "a": "/b", "b": "/a"},
        {"features": "/g/x", "g": "/g"},
    ],
    ids=["pair", "self", "three", "through-group"],
)
def test_soft_link_loop_is_a_damaged_file(tmp_path: Path, links: dict[str, str]) -> None:
    path = tmp_path / "loop.h5"
    with h5py.File(path, "w") as h:
        for name, dest in links.items():
            h[name] = h5py.SoftLink(dest)
        if "coords" not in links:
            _coords(h)
    with pytest.raises(InputError, match="'features' is .*(loop|does not exist)"):
        read_features(path)
    with pytest.raises(InputError):
        inspect_features(path)


def test_soft_links_inside_the_file_still_work(tmp_path: Path) -> None:
    path = tmp_path / "soft.h5"
    with h5py.File(path, "w") as h:
        g = h.create_group("data")
        g["real"] = np.full((N, D), 2.0, np.float32)
        g["alias"] = h5py.SoftLink("real")  # relative to /data
        h["features"] = h5py.SoftLink("/data/alias")
        _coords(h)
    feats = read_features(path)
    assert feats.num_tiles == N and float(feats.tokens.mean()) == 2.0


def test_a_damaged_chunk_is_one_input_error(tmp_path: Path) -> None:
    path = tmp_path / "chunk.h5"
    with h5py.File(path, "w") as h:
        h.create_dataset(
            "features", data=np.random.default_rng(0).normal(size=(N, 64)), chunks=(N, 64),
            compression="gzip", dtype="f4",
        )  # fmt: skip
        _coords(h)
        info = h["features"].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    with pytest.raises(InputError, match="cannot read 'features' of .*damaged"):
        read_features(path)


@pytest.mark.parametrize("overlap", [float("nan"), float("inf"), -float("inf"), 1e308, "nan"])
def test_trident_overlap_that_is_not_finite(overlap: object) -> None:
    attrs = {"patch_size": 256, "patch_size_level0": 512, "overlap": overlap}
    with pytest.raises(InputError, match="overlap must be >= 0 and below the patch size"):
        geometry_from_attrs(attrs, "t.h5")


def test_cli_external_storage_is_exit_4(tmp_path: Path, tiny_model: Path, capsys) -> None:
    with _fifo(tmp_path) as fifo:
        path = _external(tmp_path / "ext.h5", str(fifo))
        out = tmp_path / "h.tif"
        proc = run_main(capsys, "predict", "--features", path, "-m", tiny_model, "--device",
                        "cpu", "-q", "--mpp", "0.25", "--out", out)  # fmt: skip
    line = assert_one_error_line(proc, 4)
    assert "external raw file" in line
    assert not out.exists()
