"""``--patch-size``, ``--mean``, ``--std`` of a ``torchscript:PATH`` encoder on the export commands.

The stated normalisation is the one inside the exported graph (and in its metadata); the flags
are refused without an encoder or with a named one, and a patch size that does not divide the
tile (the model's, for ``triton-repo``) is exit 2 before anything is written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("tritonclient.grpc.model_config_pb2")

from fastinsight.cli import main  # noqa: E402
from fastinsight.errors import ConfigError  # noqa: E402
from tests.support.export_helpers import make_model  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


@pytest.fixture
def conv(tmp_path: Path) -> tuple[nn.Conv2d, Path]:
    """A patchify convolution [B, 3, 32, 32] -> [B, 6, 4, 4] and its TorchScript file."""
    torch.manual_seed(0)
    module = nn.Conv2d(3, 6, 8, stride=8).eval()
    path = tmp_path / "enc.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(module), str(path))
    return module, path


def _run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip().splitlines()


def _flags(mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> list[str]:
    return ["--mean", *map(str, mean), "--std", *map(str, std)]


def test_the_stated_normalisation_is_in_the_graph(
    tmp_path: Path, conv: tuple[nn.Conv2d, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    module, path = conv
    out = tmp_path / "enc.onnx"
    argv = ["export", "onnx", "--encoder", f"torchscript:{path}", "--tile-size", "32"]
    rc, stdout, err = _run([*argv, "--patch-size", "8", *_flags(), "--out", out], capsys)
    assert rc == 0, err
    assert f"wrote {out}" in stdout
    gen = torch.Generator().manual_seed(3)
    tiles = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=gen)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"tiles": tiles.numpy()})
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = module((tiles.permute(0, 3, 1, 2).float() / 255 - mean) / std).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    identity = json.loads(meta["fastinsight.encoder"])
    assert identity["mean"] == list(MEAN) and identity["std"] == list(STD)
    assert identity["given_options"] == ["patch_size_px", "mean", "std"]


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--model", "{model}", "--patch-size", "8"], "--patch-size applies to torchscript:PATH"),
        (["--encoder", "vit-tiny", *_flags()], "--mean, --std apply to torchscript:PATH"),
        (
            ["--encoder", "torchscript:{module}", "--tile-size", "32", "--patch-size", "5"],
            "--patch-size 5 px does not divide the 32 px tile",
        ),
        (
            ["--encoder", "torchscript:{module}", "--tile-size", "32", *_flags(std=(1, 0, 1))],
            "std (--std) must be > 0",
        ),
    ],
    ids=["head", "named-encoder", "patch-5", "std-0"],
)
def test_export_onnx_refuses_in_one_line(
    tmp_path: Path,
    conv: tuple[nn.Conv2d, Path],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    words: str,
) -> None:
    model = tmp_path / "m.safetensors"
    make_model(num_classes=1).save(str(model))
    out = tmp_path / "x.onnx"
    filled = [a.format(model=model, module=conv[1]) for a in argv]
    rc, stdout, err = _run(["export", "onnx", *filled, "--out", out], capsys)
    assert rc == ConfigError.exit_code and stdout == ""
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--encoder", "vit-tiny", "--patch-size", "16"], "--patch-size applies to torchscript"),
        (["--patch-size", "16"], "this run has no encoder"),
        (
            ["--encoder", "torchscript:{module}", "--patch-size", "5"],
            "--patch-size 5 px does not divide the 32 px tile",  # the model's tile
        ),
        (["--encoder", "torchscript:{module}", *_flags(mean=(0, 0, "inf"))], "3 finite numbers"),
    ],
    ids=["named-encoder", "no-encoder", "patch-5", "mean-inf"],
)
def test_triton_repo_refuses_before_writing(
    tmp_path: Path,
    conv: tuple[nn.Conv2d, Path],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    words: str,
) -> None:
    model = tmp_path / "m.safetensors"
    cfg = {"grid_size": (4, 4), "tile_size_px": 32, "patch_size_px": 8}
    make_model(in_dim=6, num_classes=1, encoder="torchscript:enc.pt", **cfg).save(str(model))
    out = tmp_path / "repo"
    filled = [a.format(module=conv[1]) for a in argv]
    base = ["export", "triton-repo", "--model", model, "--out", out, "--instance-kind", "cpu"]
    rc, stdout, err = _run([*base, *filled], capsys)
    assert rc == ConfigError.exit_code and stdout == ""
    assert len(err) == 1 and words in err[0], err
    assert not out.exists()
