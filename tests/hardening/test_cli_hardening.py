"""Issue #16 through the real command line (subprocesses): classes 1, 3, 4, 5 and 8.

Each case checks the README's promises: one line ``fastinsight: error: ...``, the documented exit
code, nothing left behind, nothing destroyed."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from safetensors.torch import save_file

from fastinsight.errors import CheckpointError, ConfigError, InputError, SlideError
from fastinsight.models.checkpoints import CONFIG_KEY, FORMAT_KEY
from fastinsight.models.insight import InsightModel
from tests.hardening.conftest import assert_one_error_line, run_cli, run_main, tiny_config
from tests.support.h5_layouts import grid_coords, write_trident


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _strict_unicode(value) -> None:
    """Every string in a parsed JSON document is valid Unicode (no lone surrogates)."""
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for k, v in value.items():
            _strict_unicode(k)
            _strict_unicode(v)
    elif isinstance(value, list):
        for v in value:
            _strict_unicode(v)


def _reject_constants(name: str):
    raise ValueError(f"invalid JSON constant {name}")


# -- class 1: names that are not ASCII (or not even UTF-8) ---------------------------------------
def test_non_ascii_and_undecodable_names(tmp_path: Path, tiny_features: Path) -> None:
    names = ("腫瘍", "Präparat_µ")
    model_path = tmp_path / "modèle_腫瘍.safetensors"
    InsightModel(tiny_config(num_classes=2, class_names=names), backend="reference").save(
        str(model_path)
    )
    features = Path(os.fsdecode(bytes(tmp_path) + b"/Pr\xe4parat.h5"))  # Latin-1 bytes
    shutil.copy(tiny_features, features)
    out = tmp_path / "résultats"
    out.mkdir()
    proc = run_cli(
        "predict", "--features", features, "-m", model_path,
        "--report", out / "rapport.json", "--geojson", out / "tuiles.geojson",
        "--scores", out / "scores.npz",
        env={**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONUTF8": "0"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in ("rapport.json", "tuiles.geojson"):
        text = (out / name).read_bytes().decode("utf-8")  # strict UTF-8
        doc = json.loads(text, parse_constant=_reject_constants)
        _strict_unicode(doc)
    report = json.loads((out / "rapport.json").read_text(encoding="utf-8"))
    assert set(report["scores"]) == set(names)
    assert "\\xe4" in report["slide_id"]


# -- class 3: NaN and nonsense must not pass -----------------------------------------------------
def _model_with(tmp_path: Path, name: str, edit) -> Path:
    model = InsightModel(tiny_config(), backend="reference")
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    edit(state)
    path = tmp_path / name
    save_file(state, str(path), metadata={CONFIG_KEY: model.config.to_json(), FORMAT_KEY: "1"})
    return path


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_weights_are_refused_at_load(tmp_path: Path, tiny_features, bad, capsys) -> None:
    def poison(state):
        state["context_block.1.weight"].view(-1)[3] = bad

    path = _model_with(tmp_path, "poisoned.safetensors", poison)
    proc = run_main(
        capsys, "predict", "--features", tiny_features, "-m", path, "--report", tmp_path / "r.json"
    )
    line = assert_one_error_line(proc, CheckpointError.exit_code)
    assert "context_block.1.weight" in line and ("NaN" in line or "inf" in line)
    assert not (tmp_path / "r.json").exists()


def test_overflow_is_reported_as_overflow(tmp_path: Path) -> None:
    """Finite features whose products overflow float32 give inf/NaN logits: say so."""
    rc = np.array([(r, c) for r in range(4) for c in range(4)])
    feats = np.full((len(rc), 8), 3e38, dtype=np.float32)
    h5 = write_trident(tmp_path / "huge.h5", feats, grid_coords(rc, 512), level0_size=(2048, 2048))
    model = tmp_path / "m.safetensors"
    InsightModel(tiny_config(), backend="reference").save(str(model))
    proc = run_cli("predict", "--features", h5, "-m", model, "--report", tmp_path / "r.json")
    line = assert_one_error_line(proc, InputError.exit_code)
    assert "overflow" in line and "tissue mask is empty" not in line
    assert _listing(tmp_path) == ["huge.h5", "m.safetensors"]


# -- class 4: limits on sizes --------------------------------------------------------------------
@pytest.mark.parametrize("mpp", ["0", "-1", "nan", "inf", "5000", "0.000001"])
def test_absurd_mpp_is_refused_before_work(
    tmp_path: Path, tiny_model, tiny_features, mpp, capsys
) -> None:
    proc = run_main(
        capsys,
        "predict", "--features", tiny_features, "-m", tiny_model, "--mpp", mpp,
        "--report", tmp_path / "r.json",
    )  # fmt: skip
    line = assert_one_error_line(proc, ConfigError.exit_code)  # a flag's value: exit 2
    assert "--mpp" in line and "1000" in line
    assert _listing(tmp_path) == []


def test_h5_declaring_terabytes_is_refused_before_reading(
    tmp_path: Path, tiny_model, capsys
) -> None:
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:  # a few KB on disk, 4 TB declared
        f.create_dataset("features", shape=(10**9, 1024), dtype="f4", chunks=(1, 1024))
        f.create_dataset("coords", shape=(10**9, 2), dtype="i8", chunks=(1, 2))
    proc = run_main(
        capsys, "predict", "--features", path, "-m", tiny_model, "--report", tmp_path / "r.json"
    )
    line = assert_one_error_line(proc, InputError.exit_code)
    assert "GiB" in line and "limit" in line


def test_coordinates_near_2_63_are_refused(tmp_path: Path, tiny_model, capsys) -> None:
    coords = np.array([[0, 0], [2**62, 512], [512, 2**63 - 1]], dtype=np.int64)
    path = write_trident(tmp_path / "far.h5", np.ones((3, 8), np.float32), coords)
    proc = run_main(
        capsys, "predict", "--features", path, "-m", tiny_model, "--report", tmp_path / "r.json"
    )
    line = assert_one_error_line(proc, InputError.exit_code)
    assert "1000000" in line


@pytest.mark.parametrize("size", ["nan", "-512", "0", "1e12"])
def test_absurd_patch_size_l0(tmp_path: Path, tiny_model, tiny_features, size, capsys) -> None:
    proc = run_main(
        capsys, "predict", "--features", tiny_features, "-m", tiny_model,
        "--patch-size-l0", size, "--report", tmp_path / "r.json",
    )  # fmt: skip
    assert "--patch-size-l0" in assert_one_error_line(proc, ConfigError.exit_code)


def test_absurd_recorded_slide_size_and_magnification(tmp_path: Path, tiny_model, capsys) -> None:
    rc = np.array([(0, 0), (0, 1)])
    huge = write_trident(
        tmp_path / "huge_size.h5", np.ones((2, 8), np.float32), grid_coords(rc, 512),
        level0_size=(3_000_000_000, 2048),
    )  # fmt: skip
    proc = run_main(
        capsys, "predict", "--features", huge, "-m", tiny_model, "--report", tmp_path / "r.json"
    )
    assert "1000000" in assert_one_error_line(proc, SlideError.exit_code)
    zero_mag = write_trident(
        tmp_path / "zero_mag.h5", np.ones((2, 8), np.float32), grid_coords(rc, 512),
        level0_magnification=0, level0_size=(2048, 2048),
    )  # fmt: skip
    proc = run_main(
        capsys, "predict", "--features", zero_mag, "-m", tiny_model, "--report", tmp_path / "r.json"
    )
    # A magnification of 0 counts as "not recorded" (it used to be a ZeroDivisionError): the mpp
    # then comes from the file's level-0 patch size (issue #16 class 6), and the report says so.
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["slide"]["mpp_source"] == "file attributes"
    assert np.isfinite(report["slide"]["mpp"]) and report["slide"]["mpp"] > 0


# -- class 5: special files and signals ----------------------------------------------------------
def test_fifo_model_and_features_do_not_hang(tmp_path: Path, tiny_model, tiny_features) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    start = time.monotonic()
    proc = run_cli(
        "predict",
        "--features",
        tiny_features,
        "-m",
        fifo,
        "--report",
        tmp_path / "r.json",
        timeout=120,
    )
    assert "named pipe" in assert_one_error_line(proc, CheckpointError.exit_code)
    fifo_h5 = tmp_path / "features.h5"
    os.mkfifo(fifo_h5)
    proc = run_cli(
        "predict",
        "--features",
        fifo_h5,
        "-m",
        tiny_model,
        "--report",
        tmp_path / "r.json",
        timeout=120,
    )
    assert "named pipe" in assert_one_error_line(proc, InputError.exit_code)
    assert time.monotonic() - start < 240


def test_directory_named_svs_and_symlink_loop(tmp_path: Path, tiny_model, capsys) -> None:
    folder = tmp_path / "slide.svs"
    folder.mkdir()
    proc = run_main(capsys, "predict", folder, "-m", tiny_model, "--report", tmp_path / "r.json")
    assert "folder" in assert_one_error_line(proc, SlideError.exit_code)
    loop = tmp_path / "loop.svs"
    loop.symlink_to(loop)
    proc = run_main(capsys, "predict", loop, "-m", tiny_model, "--report", tmp_path / "r.json")
    assert "loop" in assert_one_error_line(proc, SlideError.exit_code)


_SLOW_WRITE = textwrap.dedent(
    """
    import os, sys, time
    real_fsync = os.fsync
    def slow_fsync(fd):  # the report is half-way to its place when SIGTERM comes
        print("READY", flush=True)
        time.sleep(60)
    os.fsync = slow_fsync
    from fastinsight.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigterm_cleans_up_like_ctrl_c(tmp_path: Path, tiny_model, tiny_features) -> None:
    report = tmp_path / "report.json"
    report.write_text('{"previous": true}')
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITE, "predict", "--features", str(tiny_features),
         "-m", str(tiny_model), "--report", str(report), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("fastinsight: terminated")
    assert "Traceback" not in err
    assert report.read_text() == '{"previous": true}'
    assert _listing(tmp_path) == ["report.json"]


# -- class 8: flags checked before work ----------------------------------------------------------
def test_overlay_without_a_slide_is_refused_before_work(
    tmp_path: Path, tiny_model, tiny_features, capsys
) -> None:
    proc = run_main(
        capsys,
        "predict", "--features", tiny_features, "-m", tiny_model,
        "--overlay", tmp_path / "o.png", "--report", tmp_path / "r.json",
    )  # fmt: skip
    line = assert_one_error_line(proc, InputError.exit_code)
    assert "--overlay" in line and "--slide" in line
    assert proc.stdout == ""  # no prediction ran (it prints the scores)
    assert _listing(tmp_path) == []


_RAY_SESSION = textwrap.dedent(
    """
    import os, sys, time
    from fastinsight.cohort import CohortOptions, _ray_session
    from fastinsight.signals import Terminated, handle_sigterm

    try:
        with handle_sigterm():
            with _ray_session(CohortOptions(num_cpus=1), quiet=True) as session:
                print("READY", session.temp_dir, flush=True)
                time.sleep(120)
    except Terminated as exc:
        sys.exit(exc.exit_code)
    """
)


def test_sigterm_stops_the_local_ray_instance(tmp_path: Path) -> None:
    """predict-cohort's Ray session: SIGTERM (which ray.init would turn into exit(15)) shuts Ray
    down with a message, removes its session folder and leaves no Ray process behind."""
    pytest.importorskip("ray")
    proc = subprocess.Popen(
        [sys.executable, "-c", _RAY_SESSION],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: find Ray's processes by it
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line and line[0] == "READY", proc.stderr.read() if proc.stderr else ""
        temp_dir = Path(line[1])
        assert temp_dir.is_dir()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    assert "shutting Ray down" in err
    assert not temp_dir.exists()
    time.sleep(2)  # Ray's raylet and workers exit on shutdown; give them a moment
    # Ray's own daemons may leave the process group, but they all name the session folder.
    for how in (["-g", str(proc.pid)], ["-f", str(temp_dir)]):
        left = subprocess.run(["pgrep", *how], capture_output=True, text=True)
        assert left.stdout.strip() == "", f"Ray processes left ({how}): {left.stdout}"
