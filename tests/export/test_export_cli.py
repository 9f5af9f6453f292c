"""The three `fastinsight export` commands as the CLI mounts them."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("tritonclient.grpc.model_config_pb2")

from fastinsight.cli import main
from fastinsight.errors import ConfigError
from tests.support.export_helpers import make_model


def test_triton_repo_command_writes_a_checked_repository(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastinsight.export.triton import check_repo

    ckpt = tmp_path / "m.safetensors"
    make_model(num_classes=2).save(str(ckpt))
    out = tmp_path / "repo"
    argv = ["export", "triton-repo", "--model", str(ckpt), "--out", str(out), "--no-verify"]
    argv += ["--instance-kind", "cpu", "--instances", "2"]
    assert main(argv) == 0
    assert "insight_head" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["insight_head"]
    assert check_repo(out) == []
    assert "KIND_CPU" in (out / "insight_head" / "config.pbtxt").read_text()
    # A second run refuses to clobber it.
    assert main(argv) == 6
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,code",
    [
        (
            ["export", "onnx", "--model", "m.pth", "--encoder-weights", "w.bin", "--out", "x.onnx"],
            ConfigError.exit_code,  # a flag without its partner: a usage error, exit 2
        ),
        (["export", "onnx", "--model", "missing.pth", "--out", "x.onnx"], 3),
        (["export", "tensorrt", "--onnx", "missing.onnx", "--out", "x.plan"], None),
    ],
    ids=["weights-without-encoder", "missing-checkpoint", "tensorrt-missing-input"],
)
def test_usage_errors_are_one_line(
    argv: list[str],
    code: int | None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and (code is None or rc == code)
    assert len(err.splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["onnx", "tensorrt", "triton-repo"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", command, "--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_repository_folder_gets_a_plain_mkdir_mode(tmp_path: Path) -> None:
    import os

    from fastinsight.export.triton import _atomic_dir

    umask = os.umask(0o022)
    try:
        with _atomic_dir(tmp_path / "repo", overwrite=False) as root:
            (root / "x").mkdir()
    finally:
        os.umask(umask)
    assert (tmp_path / "repo" / "x").is_dir()
    assert ((tmp_path / "repo").stat().st_mode & 0o777) == 0o755
