"""``fastinsight encoders list|check`` and the encoder benchmark's smoke mode.

Bad weight files must give one clear error line and a non-zero exit through the real CLI
(subprocess), never a traceback, and a pickle carrying code must never run it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastinsight.cli import main
from fastinsight.encoders import build_encoder, check_encoder, encoder_table
from fastinsight.errors import CheckpointError
from fastinsight.fileformat import file_sha256

REPO = Path(__file__).resolve().parents[2]


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        # main() rather than -m: works whether fastinsight.cli is a module or a package.
        [
            sys.executable,
            "-c",
            "import sys; from fastinsight.cli import main; sys.exit(main())",
            *argv,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )


class Payload:
    """Unpickling this would run a shell command (what weights_only=True must refuse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_bad_files_through_the_cli_one_line_nonzero(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    torch.save({"cls_token": torch.zeros(1), "x": Payload(marker)}, evil)
    proc = run_cli("encoders", "check", "vit-tiny", "--weights", str(evil))
    assert proc.returncode == CheckpointError.exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastinsight: error: ")
    assert "holds objects other than tensors" in lines[0] or "cannot load" in lines[0]
    assert "Traceback" not in proc.stderr and not marker.exists()


@pytest.mark.parametrize(
    "problem", ["architecture", "missing-key", "truncated", "uni-without-weights"]
)
def test_bad_files_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str], problem) -> None:
    path = tmp_path / "pytorch_model.bin"
    if problem == "architecture":
        torch.save(build_encoder("resnet-tiny").state_dict(), path)
        argv = ["encoders", "check", "vit-tiny", "--weights", str(path)]
        want = "another architecture"
    elif problem == "missing-key":
        state = build_encoder("dinov2-tiny", tile_size_px=28).state_dict()
        state.pop("reg_token")
        torch.save(state, path)
        argv = ["encoders", "check", "dinov2-tiny", "--weights", str(path), "--tile-size", "28"]
        want = "missing key 'reg_token'"
    elif problem == "truncated":
        good = tmp_path / "vit.safetensors"
        build_encoder("vit-tiny", seed=1).save_weights(good)
        path = tmp_path / "truncated.safetensors"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        argv = ["encoders", "check", "vit-tiny", "--weights", str(path)]
        want = "truncated or corrupt"
    else:
        argv = ["encoders", "check", "uni2-h"]
        want = "MahmoodLab/UNI2-h"
    assert main(argv) == CheckpointError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err


def test_check_reports_grid_dims_and_sha(tmp_path: Path, capsys) -> None:
    path = tmp_path / "model.safetensors"
    build_encoder("dinov2-tiny", tile_size_px=70, seed=2).save_weights(path)
    report = check_encoder("dinov2-tiny", path, tile_size_px=70)
    assert report["grid"] == [5, 5] and report["embed_dim"] == 64
    assert report["num_prefix_tokens"] == 5 and report["tokens_shape"] == [1, 25, 64]
    assert report["sha256"] == file_sha256(path) and report["tokens_dtype"] == "float32"
    assert (
        main(
            [
                "encoders",
                "check",
                "dinov2-tiny",
                "--weights",
                str(path),
                "--tile-size",
                "70",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["sha256"] == file_sha256(path)
    assert (
        main(["encoders", "check", "dinov2-tiny", "--weights", str(path), "--tile-size", "70"]) == 0
    )
    out = capsys.readouterr().out
    assert "grid 5 x 5, 64 channels" in out and file_sha256(path) in out


def test_list(capsys) -> None:
    assert main(["encoders", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("uni2-h", "virchow2", "h-optimus-1", "prov-gigapath", "dinov2-vitl14-reg4"):
        assert name in out
    assert main(["encoders", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["dinov2-vitl14-reg4"]["grid"] == [37, 37]
    assert rows["uni2-h"]["num_prefix_tokens"] == 9
    assert rows == {r["name"]: r for r in encoder_table()}


def test_bench_smoke(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_encoders
    finally:
        sys.path.pop(0)
    out = tmp_path / "encoders.csv"
    assert (
        bench_encoders.main(
            ["--smoke", "--csv", str(out), "--models", "dinov2-tiny", "resnet-tiny"]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert {(r["model"], r["mode"]) for r in rows} == {
        ("dinov2-tiny", "eager"),
        ("dinov2-tiny", "compiled"),
        ("resnet-tiny", "eager"),
        ("resnet-tiny", "compiled"),
    }
    for r in rows:
        assert r["device"].startswith("cpu") and float(r["tiles_per_s"]) > 0
        assert float(r["input_gb_per_s"]) > 0 and r["git_rev"]
    dino = next(r for r in rows if r["model"] == "dinov2-tiny")
    assert dino["grid"] == "5x5" and float(dino["tflop_per_s"]) > 0
